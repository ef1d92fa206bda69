//! Standard Webhooks signing, and the signing secrets of every destination owner: a webhook
//! rule (`rule:<id>`), a user with a `webhook_url` (`user:<id>`), an HTTP kind (`kind:<name>`).
//! The one place deliveries and HTTP kinds sign, and receivers' tests verify.
//!
//! Secrets are `whsec_` + base64 of the key bytes. An owner's rows in `notify_secrets` are its
//! current secret (`expires_at` NULL) and the secrets it had before a rotation, each valid
//! until its `expires_at`; requests are signed with all of them, so a receiver verifies while
//! it changes its secret. A row whose `secret` is NULL stands for the legacy secret
//! (`CONVEYOR_WEBHOOK_SECRET`, which lives in configuration, not here).

use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;

use conveyor_core::backend::{BackendError, QueueBackend, QueueBackendExt, RowExt, Tx};
use conveyor_core::clock::now_ms;

/// Rotations made by this process: signers that cache secrets read again after one (another
/// process's rotation is seen when their cache expires; the previous secret is still valid).
pub(crate) static ROTATIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How long a rotated-out secret stays valid by default.
pub const DEFAULT_OVERLAP_S: i64 = 24 * 3600;

const PREFIX: &str = "whsec_";

/// The secrets' table, for a build without the notifications (which create the same table in
/// their own first migration; both say `IF NOT EXISTS`, so either may come first).
const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE IF NOT EXISTS notify_secrets (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    secret      TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT
);
CREATE INDEX IF NOT EXISTS notify_secrets_by_owner ON notify_secrets(owner, created_at);
"#];

/// Creates the secrets' table where the notifications have not.
pub async fn migrate(backend: &dyn QueueBackend) -> Result<(), BackendError> {
    conveyor_core::migrate::apply(backend, "signing", MIGRATIONS).await.map(|_| ())
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

/// The `webhook-signature` header: one `v1,…` entry per key, space-separated.
pub fn signatures(keys: &[Vec<u8>], id: &str, timestamp: i64, body: &[u8]) -> String {
    keys.iter().map(|k| sign(k, id, timestamp, body)).collect::<Vec<_>>().join(" ")
}

/// A Standard Webhooks signature: `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`.
pub fn sign(key: &[u8], id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(format!("{id}.{timestamp}.").as_bytes());
    mac.update(body);
    format!("v1,{}", base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes()))
}

/// Checks a delivery as a Standard Webhooks receiver does: `webhook-id`, `webhook-timestamp`
/// within `tolerance_s` seconds of `now_s`, and any of the space-separated `webhook-signature`
/// entries matching `secret` (`whsec_…`), compared in constant time.
pub fn verify(secret: &str, headers: &reqwest::header::HeaderMap, body: &[u8], now_s: i64, tolerance_s: i64) -> bool {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (Some(id), Some(ts), Some(sigs), Some(key)) =
        (header("webhook-id"), header("webhook-timestamp"), header("webhook-signature"), key_of(secret))
    else {
        return false;
    };
    let Ok(ts) = ts.trim().parse::<i64>() else { return false };
    if (now_s - ts).abs() > tolerance_s {
        return false;
    }
    let mac = {
        let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(&key).expect("HMAC takes any key length");
        m.update(format!("{id}.{ts}.").as_bytes());
        m.update(body);
        m
    };
    sigs.split(' ')
        .filter_map(|s| s.strip_prefix("v1,"))
        .filter_map(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .any(|given| mac.clone().verify_slice(&given).is_ok())
}

/// The old header (sent alongside for one release): `t=<unix>,v1=<hex HMAC-SHA256(secret,
/// "<t>.<body>")>`.
pub fn legacy_signature(secret: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={timestamp},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks the old `X-Conveyor-Signature` header (constant time), within `tolerance_s` seconds.
pub fn verify_legacy(secret: &str, header: &str, body: &[u8], now_s: i64, tolerance_s: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    if (now_s - t).abs() > tolerance_s {
        return false;
    }
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

/// Gives an owner a first secret, in the caller's transaction.
pub fn create_in(tx: &mut dyn Tx, owner: &str) -> Result<String, BackendError> {
    let secret = generate();
    insert(tx, owner, Some(&secret), None)?;
    Ok(secret)
}

fn insert(tx: &mut dyn Tx, owner: &str, secret: Option<&str>, expires_at: Option<i64>) -> Result<(), BackendError> {
    tx.execute(
        "INSERT INTO notify_secrets (id, owner, secret, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)",
        &[uuid::Uuid::now_v7().to_string().into(), owner.into(), secret.map(str::to_string).into(), now_ms().into(), expires_at.into()],
    )?;
    Ok(())
}

/// Drops an owner's secrets (the owner is being deleted).
pub fn delete_in(tx: &mut dyn Tx, owner: &str) -> Result<(), BackendError> {
    tx.execute("DELETE FROM notify_secrets WHERE owner = $1", &[owner.into()])?;
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
pub async fn reveal(backend: &dyn QueueBackend, owner: &str) -> Result<Reveal, BackendError> {
    let rows = backend
        .query(
            "SELECT secret, created_at, expires_at FROM notify_secrets WHERE owner = $1 AND (expires_at IS NULL OR expires_at > $2)
             ORDER BY CASE WHEN expires_at IS NULL THEN 0 ELSE 1 END, created_at DESC",
            vec![owner.into(), now_ms().into()],
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
    Ok(Reveal { owner: owner.to_string(), secrets })
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
pub async fn rotate(backend: &dyn QueueBackend, owner: &str, overlap_s: i64) -> Result<Rotated, BackendError> {
    let until = now_ms() + overlap_s.max(0) * 1000;
    let key = owner.to_string();
    let secret = backend
        .transact(move |tx| {
            let now = now_ms();
            tx.execute(
                "DELETE FROM notify_secrets WHERE owner = $1 AND expires_at IS NOT NULL AND expires_at <= $2",
                &[key.as_str().into(), now.into()],
            )?;
            let had =
                tx.query("SELECT count(*) FROM notify_secrets WHERE owner = $1", &[key.as_str().into()])?.first().map_or(0, |r| r.int(0));
            if had == 0 {
                insert(tx, &key, None, Some(until))?;
            } else {
                tx.execute(
                    "UPDATE notify_secrets SET expires_at = $2 WHERE owner = $1 AND expires_at IS NULL",
                    &[key.as_str().into(), until.into()],
                )?;
            }
            create_in(tx, &key)
        })
        .await?;
    ROTATIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Ok(Rotated { owner: owner.to_string(), secret, previous_valid_until: until })
}

/// The keys a request of `owner` is signed with, current first; `None` stands for the legacy
/// secret. An unknown owner (a delivery enqueued before per-owner secrets) is signed with the
/// legacy secret.
pub async fn signing(backend: &dyn QueueBackend, owner: Option<&str>) -> Result<Vec<Option<String>>, BackendError> {
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
