//! Named locks with an owner and an expiry (without-overlapping jobs): taking one is a single
//! conditional write, so exactly one owner holds it at a time, and a crashed owner's lock frees
//! itself when it expires. They live where the backend keeps them
//! ([`Store::lock_acquire`](crate::backend::Store::lock_acquire)): a row of the store's `locks` table, or a Redis key when the
//! queue is on Redis.

use std::time::Duration;

use crate::backend::{QueueBackend, QueueBackendExt, Result, SqlValue};
use crate::clock::now_ms;
use crate::job::JobId;

/// Takes `key` for `owner` until `ttl` passes, unless someone else holds it. Taking a lock one
/// already holds extends it.
pub async fn acquire(backend: &dyn QueueBackend, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
    backend.lock_acquire(key, owner, ttl).await
}

/// Releases `key` if `owner` holds it.
pub async fn release(backend: &dyn QueueBackend, key: &str, owner: &str) -> Result<bool> {
    backend.lock_release(key, owner).await
}

/// [`acquire`] on the store: one conditional upsert.
pub async fn acquire_in_store<B: QueueBackend + ?Sized>(backend: &B, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
    let (key, owner) = (key.to_string(), owner.to_string());
    let now = now_ms();
    let n = backend
        .transact(move |tx| {
            tx.execute(
                "INSERT INTO locks (key, owner, expires_at) VALUES ($1, $2, $3)
                 ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at
                 WHERE locks.expires_at <= $4 OR locks.owner = excluded.owner",
                &[key.into(), owner.into(), (now + ttl.as_millis() as i64).into(), now.into()],
            )
        })
        .await?;
    Ok(n == 1)
}

/// [`release`] on the store.
/// Frees unique key `key` if `holder` holds it, in the store's `unique_locks` (see
/// [`Store::release_unique`](crate::backend::Store::release_unique)).
pub async fn release_unique_in_store<B: QueueBackend + ?Sized>(backend: &B, key: &str, holder: JobId) -> Result<()> {
    let (key, id) = (key.to_string(), holder.as_bytes().to_vec());
    backend
        .transact(move |tx| {
            tx.execute("DELETE FROM unique_locks WHERE key = $1 AND job_id = $2", &[SqlValue::Text(key), SqlValue::Blob(id)])
        })
        .await
        .map(|_| ())
}

pub async fn release_in_store<B: QueueBackend + ?Sized>(backend: &B, key: &str, owner: &str) -> Result<bool> {
    let (key, owner) = (key.to_string(), owner.to_string());
    let n = backend.transact(move |tx| tx.execute("DELETE FROM locks WHERE key = $1 AND owner = $2", &[key.into(), owner.into()])).await?;
    Ok(n == 1)
}
