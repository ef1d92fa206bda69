//! Webhook signing secrets, one set per destination owner (a webhook rule, a user with a
//! `webhook_url`), Standard Webhooks style: `whsec_` + base64 of the key bytes.
//!
//! An owner's rows in `notify_secrets` are its current secret (`expires_at` NULL) and the
//! secrets it had before a rotation, each valid until its `expires_at`; deliveries are signed
//! with all of them, so a receiver verifies while it changes its secret. An owner with no rows
//! was created before per-destination secrets: it is signed with the legacy secret
//! (`CONVEYOR_WEBHOOK_SECRET`), which a rotation keeps valid for the overlap like any other
//! (a row whose `secret` is NULL stands for it — the legacy value lives in configuration, not
//! here).

use base64::Engine as _;
use serde::Serialize;

use conveyor_core::backend::{BackendError, QueueBackend, QueueBackendExt, RowExt, Tx};
use conveyor_core::clock::now_ms;

use super::model::ModelError;

/// Rotations made by this process: signers that cache secrets read again after one (another
/// process's rotation is seen when their cache expires; the previous secret is still valid).
pub(crate) static ROTATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How long a rotated-out secret stays valid by default.
pub const DEFAULT_OVERLAP_S: i64 = 24 * 3600;

const PREFIX: &str = "whsec_";

/// Who a secret belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owner {
    Rule(i64),
    User(i64),
}

impl Owner {
    /// The key in `notify_secrets` (and in a delivery's payload).
    pub fn key(self) -> String {
        match self {
            Owner::Rule(id) => format!("rule:{id}"),
            Owner::User(id) => format!("user:{id}"),
        }
    }
}

/// A fresh secret: `whsec_` + base64 of 24 random bytes.
pub fn generate() -> String {
    format!("{PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(rand::random::<[u8; 24]>()))
}

/// The HMAC key of a `whsec_…` secret (its base64-decoded bytes); `None` when malformed.
pub fn key_of(secret: &str) -> Option<Vec<u8>> {
    let b64 = secret.strip_prefix(PREFIX).unwrap_or(secret);
    base64::engine::general_purpose::STANDARD.decode(b64).ok().filter(|k| !k.is_empty())
}

/// The legacy secret in the Standard Webhooks form: its bytes are the key, as they were for the
/// old `X-Conveyor-Signature`, so a receiver can hand it to any Standard Webhooks library.
pub fn legacy_as_whsec(legacy: &str) -> String {
    format!("{PREFIX}{}", base64::engine::general_purpose::STANDARD.encode(legacy.as_bytes()))
}

/// Gives a new owner its first secret, in the transaction that creates it.
pub(crate) fn create_in(tx: &mut dyn Tx, owner: Owner) -> Result<String, BackendError> {
    let secret = generate();
    insert(tx, owner, Some(&secret), None)?;
    Ok(secret)
}

fn insert(tx: &mut dyn Tx, owner: Owner, secret: Option<&str>, expires_at: Option<i64>) -> Result<(), BackendError> {
    tx.execute(
        "INSERT INTO notify_secrets (id, owner, secret, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        &[
            uuid::Uuid::now_v7().to_string().into(),
            owner.key().into(),
            secret.map(str::to_string).into(),
            now_ms().into(),
            expires_at.into(),
        ],
    )?;
    Ok(())
}

/// Drops an owner's secrets (the owner is being deleted).
pub(crate) fn delete_in(tx: &mut dyn Tx, owner: Owner) -> Result<(), BackendError> {
    tx.execute("DELETE FROM notify_secrets WHERE owner = $1", &[owner.key().into()])?;
    Ok(())
}

/// One secret as the admin sees it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Shown {
    /// `None` for the legacy secret (`CONVEYOR_WEBHOOK_SECRET`, configured by the operator).
    pub secret: Option<String>,
    pub legacy: bool,
    pub created_at: Option<i64>,
    /// `None` for the current secret.
    pub expires_at: Option<i64>,
}

/// What `GET …/secret` answers: the current secret first, then those still valid.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Reveal {
    pub owner: String,
    pub secrets: Vec<Shown>,
}

/// The owner's valid secrets, current first. An owner without rows is on the legacy secret.
pub async fn reveal(backend: &dyn QueueBackend, owner: Owner) -> Result<Reveal, ModelError> {
    exists(backend, owner).await?;
    let rows = backend
        .query(
            "SELECT secret, created_at, expires_at FROM notify_secrets WHERE owner = $1 AND (expires_at IS NULL OR expires_at > $2)
             ORDER BY CASE WHEN expires_at IS NULL THEN 0 ELSE 1 END, created_at DESC",
            vec![owner.key().into(), now_ms().into()],
        )
        .await?;
    let mut secrets: Vec<Shown> = rows
        .iter()
        .map(|r| Shown {
            secret: r.text(0).map(str::to_string),
            legacy: r.text(0).is_none(),
            created_at: r.opt_int(1),
            expires_at: r.opt_int(2),
        })
        .collect();
    if secrets.is_empty() {
        secrets.push(Shown { secret: None, legacy: true, created_at: None, expires_at: None });
    }
    Ok(Reveal { owner: owner.key(), secrets })
}

/// What a rotation answers: the new secret, and until when the previous one stays valid.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Rotated {
    pub owner: String,
    pub secret: String,
    pub previous_valid_until: i64,
}

/// Makes a new secret current; the previous one (the legacy secret for an owner that had
/// none) stays valid for `overlap_s` seconds. Secrets already past their end are dropped.
pub async fn rotate(backend: &dyn QueueBackend, owner: Owner, overlap_s: i64) -> Result<Rotated, ModelError> {
    exists(backend, owner).await?;
    let until = now_ms() + overlap_s.max(0) * 1000;
    let secret = backend
        .transact(move |tx| {
            let now = now_ms();
            tx.execute(
                "DELETE FROM notify_secrets WHERE owner = $1 AND expires_at IS NOT NULL AND expires_at <= $2",
                &[owner.key().into(), now.into()],
            )?;
            let had =
                tx.query("SELECT count(*) FROM notify_secrets WHERE owner = $1", &[owner.key().into()])?.first().map_or(0, |r| r.int(0));
            if had == 0 {
                insert(tx, owner, None, Some(until))?;
            } else {
                tx.execute(
                    "UPDATE notify_secrets SET expires_at = $2 WHERE owner = $1 AND expires_at IS NULL",
                    &[owner.key().into(), until.into()],
                )?;
            }
            create_in(tx, owner)
        })
        .await?;
    ROTATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Rotated { owner: owner.key(), secret, previous_valid_until: until })
}

/// The keys a delivery of `owner` is signed with, current first; `None` stands for the legacy
/// secret. An unknown owner (a delivery enqueued before this version) is signed with the legacy
/// secret.
pub(crate) async fn signing(backend: &dyn QueueBackend, owner: Option<&str>) -> Result<Vec<Option<String>>, BackendError> {
    let Some(owner) = owner else { return Ok(vec![None]) };
    let rows = backend
        .query(
            "SELECT secret FROM notify_secrets WHERE owner = $1 AND (expires_at IS NULL OR expires_at > $2)
             ORDER BY CASE WHEN expires_at IS NULL THEN 0 ELSE 1 END, created_at DESC",
            vec![owner.into(), now_ms().into()],
        )
        .await?;
    if rows.is_empty() {
        return Ok(vec![None]);
    }
    Ok(rows.iter().map(|r| r.text(0).map(str::to_string)).collect())
}

async fn exists(backend: &dyn QueueBackend, owner: Owner) -> Result<(), ModelError> {
    let (sql, id, noun) = match owner {
        Owner::Rule(id) => ("SELECT channel FROM notify_rules WHERE id = $1", id, "rule"),
        Owner::User(id) => ("SELECT webhook_url FROM users WHERE id = $1", id, "user"),
    };
    let rows = backend.query(sql, vec![id.into()]).await?;
    let Some(r) = rows.first() else { return Err(ModelError::NotFound(format!("no {noun} {id}"))) };
    let has_webhook = match owner {
        Owner::Rule(_) => r.text(0) == Some("webhook"),
        Owner::User(_) => r.text(0).is_some(),
    };
    if !has_webhook {
        return Err(ModelError::NotFound(format!("{noun} {id} has no webhook destination")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_whsec_base64_of_24_bytes() {
        let s = generate();
        assert!(s.starts_with("whsec_"));
        assert_eq!(key_of(&s).unwrap().len(), 24);
        assert_ne!(s, generate());
        assert_eq!(key_of(&legacy_as_whsec("test-secret")).unwrap(), b"test-secret");
        assert_eq!(key_of("whsec_!!"), None);
    }
}
