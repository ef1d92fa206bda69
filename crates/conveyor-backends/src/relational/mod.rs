//! The relational queue core: the queue's state machine (enqueue, promote, claim, reserve,
//! outcomes, transactional completion, leases, reaping) written once, in [`lifecycle`], over
//! [`Dialect`] — what a relational store's transaction provides. SQLite (`sqlite::WriteCtx`, the
//! writer's group transaction) and PostgreSQL (`postgres::PgTx`, one pipelined transaction) are
//! the two dialects.
//!
//! The core decides: which state a job goes to, which counters move, which jobs are ready, what
//! a lease-expired job's outcome is, in which order hook rows are locked, when the outcome
//! hooks run. A dialect runs the statements, in its own SQL and through its own driver (no
//! conversion to `SqlValue` on the hot paths), and keeps the transaction's in-memory deltas.
//! Where the two truly differ, the difference is a dialect method and is named there:
//! - bulk statements (`insert_jobs`, `delete_completed_many`, `extend_rows`, `expire_rows_of`):
//!   PostgreSQL sends one array statement, SQLite runs a cached statement per row (in-process,
//!   so a row costs no round trip);
//! - locking (`reserve_rows`, `promote`, `expired`): PostgreSQL adds `FOR UPDATE SKIP LOCKED`,
//!   SQLite has one writer;
//! - the unique-key check (`take_unique`): one upsert on PostgreSQL (concurrent enqueues wait
//!   on the row), a read then a write under SQLite's single writer;
//! - a failure (`fail_reserved`): one `DELETE … RETURNING` feeding the failed store's upsert on
//!   PostgreSQL, the row read back and written on SQLite (which has no writable CTEs);
//! - history trimming (`outcomes_done`): SQLite trims every 256 history rows of its writer;
//!   PostgreSQL counts across its connections and trims before a commit (`PgBackend::tx`).

pub(crate) mod admin;
pub(crate) mod lifecycle;

use conveyor_core::backend::{Result, Tx};
use conveyor_core::job::{Backoff, Completion, Job, JobId};

/// Job states, as stored in `jobs.state` (the counters' indexes too).
pub(crate) const PENDING: usize = 0;
pub(crate) const RESERVED: usize = 1;
pub(crate) const DELAYED: usize = 2;
pub(crate) const FAILED: usize = 3;

/// The columns of `jobs` that make a reserved [`Job`], in [`JobColumns`]' order.
pub(crate) const JOB_COLS: &str = "id, queue, kind, payload, attempts, max_attempts, backoff, timeout_ms, priority, tags, \
                        unique_key, batch_id, created_at, available_at, reserved_at, lease_token, workflow";

/// A reservation being made: when, until when, under which token, for which holder.
pub(crate) struct Lease<'a> {
    pub now: i64,
    pub until: i64,
    pub token: i64,
    pub worker: &'a str,
}

/// A row of `jobs` to insert, as the core prepared it (state chosen, JSON columns serialized).
pub(crate) struct NewRow {
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    pub payload: String,
    pub state: usize,
    pub priority: i32,
    pub max_attempts: u32,
    pub backoff: Option<String>,
    pub timeout_ms: Option<i64>,
    pub available_at: i64,
    pub unique_key: Option<String>,
    pub tags: Option<String>,
    pub batch_id: Option<String>,
    pub workflow: Option<String>,
    /// The fair-queueing turn (`conveyor_core::fair`).
    pub fair: i64,
}

/// A reservation whose lease ended, as the reaper reads it.
pub(crate) struct Expired {
    pub id: Vec<u8>,
    pub attempts: i64,
    pub max_attempts: i64,
    pub queue: String,
    pub lease_token: i64,
    pub kind: String,
    pub unique_key: Option<String>,
    pub batch_id: Option<String>,
    pub workflow: Option<String>,
    pub available_at: i64,
    pub reserved_at: Option<i64>,
}

/// The columns [`JOB_COLS`] names, as a dialect's driver read them.
pub(crate) struct JobColumns {
    pub id: Vec<u8>,
    pub queue: String,
    pub kind: String,
    pub payload: String,
    pub attempts: i64,
    pub max_attempts: i64,
    pub backoff: Option<String>,
    pub timeout_ms: Option<i64>,
    pub priority: i64,
    pub tags: Option<String>,
    pub unique_key: Option<String>,
    pub batch_id: Option<String>,
    pub created_at: i64,
    pub available_at: i64,
    pub reserved_at: i64,
    pub lease_token: i64,
    pub workflow: Option<String>,
}

impl JobColumns {
    pub(crate) fn into_job(self) -> Job {
        Job {
            id: JobId::from_slice(&self.id).unwrap_or_default(),
            queue: self.queue,
            kind: self.kind,
            payload: self.payload,
            attempt: self.attempts as u32,
            max_attempts: self.max_attempts as u32,
            backoff: self.backoff.and_then(|b| serde_json::from_str::<Backoff>(&b).ok()),
            timeout: self.timeout_ms.map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
            priority: self.priority as i32,
            tags: self.tags.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
            unique_key: self.unique_key,
            batch_id: self.batch_id,
            created_at: self.created_at,
            available_at: self.available_at,
            reserved_at: self.reserved_at,
            lease_token: self.lease_token,
            workflow: self.workflow,
        }
    }
}

/// A relational store's transaction as the queue core sees it: the in-memory bookkeeping of the
/// transaction (counter deltas, jobs made ready, metrics) and the statements, each in the
/// dialect's SQL. Every statement method does one thing to the rows it names and nothing else:
/// the counters, readiness and hooks are the core's.
pub(crate) trait Dialect {
    // --- bookkeeping, in memory until the commit -----------------------------------------------

    /// Adds `delta` to `queue`'s counter of `state`.
    fn count(&mut self, queue: &str, state: usize, delta: i64);
    /// Notes a job that became pending (wakes workers; feeds a broker's dispatch hook).
    fn ready(&mut self, id: JobId, queue: &str, priority: i32);
    /// Records an applied outcome in the per-minute metrics.
    fn record(&mut self, minute: i64, c: Completion);
    /// Runs `f` with this transaction as the engine's [`Tx`] (fair-queueing turns, outcome
    /// hooks, a transactional completion's work).
    fn with_tx<R>(&mut self, f: impl FnOnce(&mut dyn Tx) -> R) -> R;

    // --- statements ----------------------------------------------------------------------------

    /// Takes unique key `key` for job `id` until `until` if it is free or expired at `now`;
    /// returns the job holding it otherwise.
    fn take_unique(&mut self, key: &str, id: JobId, until: i64, now: i64) -> Result<Option<JobId>>;
    /// Inserts the rows; `now` is their creation time.
    fn insert_jobs(&mut self, rows: Vec<NewRow>, now: i64) -> Result<()>;
    /// Moves up to 1,000 delayed jobs due at `now` to pending: their queue, id and priority.
    fn promote(&mut self, now: i64) -> Result<Vec<(String, Vec<u8>, i32)>>;
    /// The paused queues.
    fn paused(&mut self) -> Result<Vec<String>>;
    /// Reserves these pending jobs of unpaused queues under `lease`.
    fn claim_rows(&mut self, ids: &[JobId], lease: &Lease<'_>) -> Result<Vec<Job>>;
    /// Reserves up to `want` pending jobs of `queue` by priority, fair-queueing turn and id,
    /// each with its turn (the rows come back in no order).
    fn reserve_rows(&mut self, queue: &str, want: i64, lease: &Lease<'_>) -> Result<Vec<(Job, i64)>>;
    /// Deletes the completed job if its lease token still holds it, keeping it in the bounded
    /// history when there is one.
    fn delete_completed(&mut self, c: &Completion, now: i64) -> Result<bool>;
    /// The same for many plain completions; whether each applied, in their order.
    fn delete_completed_many(&mut self, cs: &[Completion], now: i64) -> Result<Vec<bool>> {
        cs.iter().map(|c| self.delete_completed(c, now)).collect()
    }
    /// Moves the reserved job to the failed store with `error` if its lease token still holds
    /// it: its queue and unique key.
    fn fail_reserved(&mut self, c: &Completion, error: &str, now: i64) -> Result<Option<(String, Option<String>)>>;
    /// Puts the reserved job back in `state` (pending or delayed) at `at` if `token` still
    /// holds it, giving back `give_back` attempts and keeping `error`: its priority.
    fn requeue_row(&mut self, id: &[u8], token: i64, state: usize, at: i64, give_back: i64, error: Option<&str>) -> Result<Option<i32>>;
    /// Frees unique key `key` if job `id` holds it.
    fn release_unique(&mut self, key: Option<&str>, id: &[u8]) -> Result<()>;
    /// Called once a call's outcomes are applied (see the module's notes on trimming).
    fn outcomes_done(&mut self) -> Result<()>;
    /// Which of these reservations their tokens still hold, in their order; on PostgreSQL the
    /// held rows stay locked until the transaction ends (in id order), so no reaper takes them
    /// meanwhile.
    fn lock_held(&mut self, leases: &[(JobId, i64)]) -> Result<Vec<bool>>;
    /// Sets the lease end of the reservations still held by their tokens.
    fn extend_rows(&mut self, leases: &[(JobId, i64)], until: i64) -> Result<()>;
    /// Ends the leases of these holders' reservations now; how many.
    fn expire_rows_of(&mut self, holders: &[String]) -> Result<u64>;
    /// Up to 1,000 reservations whose lease ended before `now`, oldest lease end first.
    fn expired(&mut self, now: i64) -> Result<Vec<Expired>>;
}
