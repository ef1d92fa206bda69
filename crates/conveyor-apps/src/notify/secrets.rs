//! The webhook signing secrets of notification destinations — a webhook rule, a user with a
//! `webhook_url` — as the admin reveals and rotates them. The secrets themselves, their store
//! and the signing are [`crate::signing`]'s (HTTP kinds use the same).

use conveyor_core::backend::{BackendError, QueueBackend, RowExt, Tx};

use super::model::ModelError;
pub use crate::signing::{generate, key_of, legacy_as_whsec, Reveal, Rotated, Shown, DEFAULT_OVERLAP_S};

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

/// Gives a new owner its first secret, in the transaction that creates it.
pub(crate) fn create_in(tx: &mut dyn Tx, owner: Owner) -> Result<String, BackendError> {
    crate::signing::create_in(tx, &owner.key())
}

/// Drops an owner's secrets (the owner is being deleted).
pub(crate) fn delete_in(tx: &mut dyn Tx, owner: Owner) -> Result<(), BackendError> {
    crate::signing::delete_in(tx, &owner.key())
}

/// The owner's valid secrets, current first. An owner without rows is on the legacy secret.
pub async fn reveal(backend: &dyn QueueBackend, owner: Owner) -> Result<Reveal, ModelError> {
    exists(backend, owner).await?;
    Ok(crate::signing::reveal(backend, &owner.key()).await?)
}

/// Makes a new secret current; the previous one stays valid for `overlap_s` seconds.
pub async fn rotate(backend: &dyn QueueBackend, owner: Owner, overlap_s: i64) -> Result<Rotated, ModelError> {
    exists(backend, owner).await?;
    Ok(crate::signing::rotate(backend, &owner.key(), overlap_s).await?)
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
