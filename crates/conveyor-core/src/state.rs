//! Shared state outside the relational store: where the cache, sorted sets, rate limiters and
//! circuit breakers keep their state when the queue lives in Redis (as Horizon and Sidekiq
//! keep theirs). A backend that has such a place returns it from
//! [`Store::shared_state`](crate::backend::Store::shared_state); otherwise these
//! mechanisms are SQL on the store, as before.
//!
//! Every method is one atomic operation on the shared state (a Redis script or command), and
//! synchronous: the `_in` forms call it inside store transactions, which run on blocking
//! threads; async callers go through [`blocking`].
//!
//! Inside a store transaction ([`Tx::shared_state`](crate::backend::Tx::shared_state)):
//! - a sorted set increment and a cache invalidation are *deferred*: written to the store's
//!   outbox in the transaction and applied once after it commits (nothing if it rolls back);
//! - a rate-limit unit is taken at once and given back if the transaction rolls back;
//! - a breaker outcome counts at once (the call it reports happened either way); its state
//!   change's event is part of the transaction.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::backend::{BackendError, Result};

/// A breaker's stored state.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct BreakerState {
    /// `closed`, `open` or `half_open`.
    pub state: String,
    pub opened_at: Option<i64>,
    /// Calls recorded since `from_bucket` (see [`SharedState::breaker_state`]).
    pub successes: i64,
    pub failures: i64,
}

/// What a breaker's configuration says, as the shared state needs it.
#[derive(Clone, Copy, Debug)]
pub struct BreakerRules {
    pub bucket_ms: i64,
    /// Buckets per window.
    pub buckets: i64,
    pub open_ms: i64,
    pub probes: u32,
    pub failure_rate: f64,
    pub min_calls: u32,
}

/// A breaker's answer to `allow`: allowed, or rejected for `retry_after_ms`; and the state it
/// moved to, if it moved.
#[derive(Clone, Debug, PartialEq)]
pub struct BreakerDecision {
    pub retry_after_ms: Option<i64>,
    pub transition: Option<String>,
}

/// An operation deferred until a store transaction commits (see the module docs).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Deferred {
    ZIncr {
        set: String,
        member: String,
        delta: f64,
    },
    CacheForgetPrefix {
        prefix: String,
    },
    /// Gives back rate-limit units taken in a transaction that rolled back.
    RateRefund {
        key: String,
        t: i64,
    },
}

pub trait SharedState: Send + Sync {
    // --- cache: JSON values by key, with an optional expiry (unix ms) ---
    fn cache_get(&self, key: &str) -> Result<Option<String>>;
    fn cache_put(&self, key: &str, json: &str, expires_at: Option<i64>) -> Result<()>;
    fn cache_forget(&self, key: &str) -> Result<bool>;
    fn cache_forget_prefix(&self, prefix: &str) -> Result<u64>;
    /// Drops bookkeeping of expired entries; returns how many.
    fn cache_prune(&self) -> Result<u64>;

    // --- sorted sets: score descending, ties by member ascending ---
    fn z_incr(&self, set: &str, member: &str, delta: f64) -> Result<f64>;
    fn z_set(&self, set: &str, member: &str, score: f64) -> Result<()>;
    fn z_remove(&self, set: &str, member: &str) -> Result<bool>;
    fn z_score(&self, set: &str, member: &str) -> Result<Option<f64>>;
    /// The first `n` members with their scores, by rank.
    fn z_top(&self, set: &str, n: usize) -> Result<Vec<(String, f64)>>;
    /// A member's rank (from 1) and score.
    fn z_rank(&self, set: &str, member: &str) -> Result<Option<(u64, f64)>>;
    fn z_len(&self, set: &str) -> Result<u64>;
    /// Replaces the whole set atomically.
    fn z_rebuild(&self, set: &str, entries: &[(String, f64)]) -> Result<()>;

    // --- rate limits (GCRA): `key`'s theoretical arrival time, in µs ---
    /// Takes `t` µs of `key`'s budget if `max(tat, now) + t - now <= tolerance`; returns
    /// whether it did, the tat after and the `now` it used. A key's clock never runs back:
    /// `now` is at least the latest `now` the key has seen (callers read their clocks before
    /// they reach the key, in any order), or a caller whose reading is a little older than the
    /// last one's would be refused within the burst.
    fn rate_take(&self, key: &str, now_us: i64, t: i64, tolerance: i64) -> Result<(bool, i64, i64)>;

    // --- circuit breakers ---
    fn breaker_allow(&self, name: &str, now: i64, rules: &BreakerRules) -> Result<BreakerDecision>;
    /// Records a call's outcome; returns the state the breaker moved to, if it moved.
    fn breaker_record(&self, name: &str, success: bool, now: i64, rules: &BreakerRules) -> Result<Option<String>>;
    /// The breaker's state and its calls since `from_bucket`, or `None` when it has neither.
    fn breaker_state(&self, name: &str, from_bucket: i64) -> Result<Option<BreakerState>>;
    fn breaker_names(&self) -> Result<Vec<String>>;

    // --- per-key concurrency (see `flow`); job ids as text, times in unix ms ---
    /// Takes a slot of `key` for `job` if fewer than the key's limit hold one (slots whose
    /// `expires_at` passed no longer count). The key's limit is set by the first call while the
    /// key is idle, and by every `authoritative` one. Returns whether it took one (or already
    /// held one), the slots held after, and the limit.
    fn slot_acquire(&self, key: &str, job: &str, limit: i64, authoritative: bool, now: i64, expires_at: i64) -> Result<(bool, i64, i64)>;
    /// Puts `job` in line for `key` if the key is still at its limit; `false` (not in line):
    /// a slot is free now.
    fn slot_wait(&self, key: &str, job: &str, now: i64) -> Result<bool>;
    /// Gives back `job`'s slot (if `job` is not empty) and, when a slot is free, takes the
    /// first job in line out of it and returns it.
    fn slot_release(&self, key: &str, job: &str, now: i64) -> Result<Option<String>>;
    /// Moves the slots' expiry on (jobs still running).
    fn slot_extend(&self, slots: &[(String, String)], expires_at: i64) -> Result<()>;
    /// The keys with the most slots held or jobs in line: (key, limit, running, waiting).
    fn slot_keys(&self, max: usize, now: i64) -> Result<Vec<(String, i64, i64, i64)>>;
    /// The keys that have jobs in line.
    fn slot_waited(&self) -> Result<Vec<String>>;
    /// Whether `job` is in line for `key`, and the key's (limit, running).
    fn slot_waiting(&self, key: &str, job: &str, now: i64) -> Result<Option<(i64, i64)>>;

    /// Applies a deferred operation (the caller makes sure it runs once).
    fn apply(&self, op: &Deferred) -> Result<()>;
}

/// The shared state seen from inside a store transaction.
pub trait TxShared {
    /// For operations that happen at once.
    fn state(&self) -> Arc<dyn SharedState>;
    /// Applies `op` once after the transaction commits; nothing happens if it rolls back.
    fn after_commit(&mut self, op: Deferred) -> Result<()>;
    /// Applies `op` if the transaction rolls back (best effort: not after a crash).
    fn on_rollback(&mut self, op: Deferred);
    /// The sum of the increments of `member` deferred in this transaction so far.
    fn z_pending(&self, set: &str, member: &str) -> f64;
}

/// Runs `f` on the shared state on a blocking thread.
pub async fn blocking<R, F>(state: Arc<dyn SharedState>, f: F) -> Result<R>
where
    R: Send + 'static,
    F: FnOnce(&dyn SharedState) -> Result<R> + Send + 'static,
{
    tokio::task::spawn_blocking(move || f(state.as_ref()))
        .await
        .map_err(|e| BackendError::Other(format!("shared state task failed: {e}")))?
}
