//! The contract between the engine and a backend: the queue lifecycle, its administration,
//! metrics and the worker registry ([`QueueBackend`]), and SQL work that must share a
//! transaction with queue operations ([`Tx`]).
//!
//! Every backend — SQLite, PostgreSQL, Redis, RabbitMQ — implements [`QueueBackend`] and passes
//! the same conformance suite (`conveyor-backends/src/conformance.rs`).

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;

use crate::job::{Completion, EnqueueOutcome, Job, JobId, JobInfo, JobState, NewJob};
use crate::metrics::MetricsRow;
use crate::wakeup::Wakeup;

mod error;
mod page;

pub use error::{BackendError, Cause, ErrorKind};
pub use page::{count_sql, Cursor, Page, Paged, MAX_DEPTH};

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// What a worker asks for when it reserves jobs.
#[derive(Clone, Debug)]
pub struct ReserveRequest {
    /// In strict priority order: jobs are taken from the first queue before the second.
    pub queues: Vec<String>,
    pub max: usize,
    pub lease: Duration,
    pub worker: String,
}

/// What [`QueueBackend::act_on_delayed`] does with a job waiting for its time.
#[derive(Clone, Debug, PartialEq)]
pub enum DelayedAction {
    /// Ready at once.
    RunNow,
    /// Removed (a batch counts it as failed; a workflow compensates).
    Delete,
    /// Moved to the failed store with this error, unrun.
    Fail(String),
}

/// A queue's numbers, for `queue list` and `/api/queues`.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct QueueStats {
    pub queue: String,
    pub pending: u64,
    pub delayed: u64,
    pub reserved: u64,
    pub failed: u64,
    pub paused: bool,
    /// Attempts finished during the last full minute.
    pub per_minute: u64,
    /// How long the next job to run has been waiting, in seconds.
    pub oldest_wait_s: f64,
}

/// A job in the failed store.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct FailedJob {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = "uuid"))]
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub payload: serde_json::Value,
    pub attempts: u32,
    pub max_attempts: u32,
    pub error: String,
    pub tags: Vec<String>,
    pub batch_id: Option<String>,
    pub created_at: i64,
    pub failed_at: i64,
    pub runtime_ms: u64,
}

/// Filters for listing jobs; `None` means any.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub queue: Option<String>,
    pub kind: Option<String>,
    pub state: Option<JobState>,
    pub tag: Option<String>,
    pub batch_id: Option<String>,
}

/// A worker process as registered in the backend (a heartbeat keeps it listed).
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkerInfo {
    pub id: String,
    pub hostname: String,
    pub pid: u32,
    pub started_at: i64,
    pub last_seen: i64,
    /// `running` or `stopping`.
    pub status: String,
    pub supervisors: Vec<SupervisorInfo>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct SupervisorInfo {
    pub name: String,
    pub queues: Vec<String>,
    pub concurrency: usize,
    pub busy: usize,
    pub processed: u64,
    pub balance: crate::balance::Balance,
    /// How the executors are divided among the queues now.
    pub pools: Vec<PoolInfo>,
    /// Ids of the jobs running now (at most a few dozen are listed).
    pub current_jobs: Vec<String>,
}

#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct PoolInfo {
    pub queues: Vec<String>,
    pub workers: usize,
}

/// A query over the per-minute metric buckets.
#[derive(Clone, Debug, Default)]
pub struct MetricsQuery {
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// Unix ms, inclusive.
    pub since: i64,
}

/// The job queue and everything the engine stores about jobs.
///
/// Implementations must keep these invariants, which the conformance suite checks:
/// - an accepted job is pending, delayed, reserved, in the failed store, or completed —
///   never lost, whatever crashes;
/// - a reserved job is held by exactly one lease; completions whose `lease_token` does not
///   match the current reservation change nothing;
/// - `Release` never consumes an attempt; a job whose lease expired goes back to the queue
///   (or to the failed store once its attempts are spent) with its attempt count kept.
#[async_trait]
pub trait QueueBackend: Send + Sync + 'static {
    /// `sqlite`, `postgres`, `redis` or `amqp`.
    fn name(&self) -> &'static str;

    /// Enqueues jobs durably; returns only once they are committed.
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>>;

    /// Reserves up to `max` ready jobs under a lease, moving due delayed jobs first.
    async fn reserve(&self, req: ReserveRequest) -> Result<Vec<Job>>;

    /// Enqueues `jobs`, then reserves up to `reserve.max` ready jobs, in one transaction where
    /// the backend can: a process that both receives jobs and hands them to workers (the
    /// Faktory server) then passes a pushed job on without a commit of its own. SQLite and
    /// PostgreSQL do both in one transaction (both happen or neither); the default makes the
    /// two calls and keeps the enqueue when the reservation fails (its jobs then wait).
    async fn enqueue_and_reserve(&self, jobs: Vec<NewJob>, reserve: ReserveRequest) -> Result<(Vec<EnqueueOutcome>, Vec<Job>)> {
        let out = self.enqueue(jobs).await?;
        match self.reserve(reserve).await {
            Ok(reserved) => Ok((out, reserved)),
            Err(e) => {
                tracing::warn!(error = %e, "reserving after an enqueue failed; the jobs wait for the next reserve");
                Ok((out, Vec::new()))
            }
        }
    }

    /// Records the outcome of many attempts at once.
    async fn complete(&self, completions: Vec<Completion>) -> Result<()>;

    /// Runs `work` and records `completion` in one transaction: either both happen or neither.
    /// Fails with [`BackendError::LeaseLost`] (and rolls `work` back) when the reservation is
    /// gone. Backends whose queue lives outside the relational store implement this with a
    /// completion marker written in the store's transaction.
    async fn complete_with(&self, completion: Completion, work: TxFn) -> Result<Box<dyn Any + Send>>;

    /// Extends the leases of jobs still running; jobs whose token no longer matches are skipped.
    async fn extend_leases(&self, leases: Vec<(JobId, i64)>, lease: Duration) -> Result<()>;

    /// Returns jobs whose lease expired to the queue (or to the failed store when their attempts
    /// are spent). Returns how many were reclaimed.
    async fn reap_expired(&self) -> Result<u64>;
    /// The processes holding reservations now (the `worker` of their `reserve`), so that the
    /// reaper can find dead ones ([`crate::liveness`]). Empty where the backend does not keep
    /// them (a broker's reservations end with its connection).
    async fn holders(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Ends the leases of `holders`, processes known to be dead, so that the next
    /// [`QueueBackend::reap_expired`] returns their jobs. Returns the reservations ended.
    async fn expire_leases_of(&self, _holders: Vec<String>) -> Result<u64> {
        Ok(0)
    }

    /// The signal workers sleep on when the queue is empty. A backend wakes it after committing
    /// ready work in this process (or on a LISTEN / pub-sub message from another); workers also
    /// poll, so work enqueued elsewhere is noticed within the poll interval.
    fn wakeup(&self) -> Arc<Wakeup>;

    // --- administration -------------------------------------------------------------------

    async fn queues(&self) -> Result<Vec<QueueStats>>;
    async fn pause(&self, queue: &str) -> Result<()>;
    async fn resume(&self, queue: &str) -> Result<()>;
    /// Deletes pending and delayed jobs of a queue; running jobs finish. Returns how many.
    async fn clear(&self, queue: &str) -> Result<u64>;

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>>;
    async fn jobs(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>>;

    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>>;
    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>>;
    /// Jobs that entered the failed store at or after `since` (unix ms) and are still there.
    async fn failed_since(&self, since: i64) -> Result<u64>;
    /// Moves failed jobs back to their queue with a fresh attempt count; keeps their ids.
    /// Returns the ids that were found and retried.
    async fn retry_failed(&self, ids: Vec<JobId>) -> Result<Vec<JobId>>;
    async fn retry_all_failed(&self, queue: Option<&str>) -> Result<u64>;
    async fn forget_failed(&self, id: JobId) -> Result<bool>;
    async fn flush_failed(&self, queue: Option<&str>) -> Result<u64>;

    /// Frees the unique key `key` if `holder` still holds it, before the job finishes (Faktory's
    /// `unique_until: "start"`): a job with the same key may then be enqueued while this one
    /// runs. A key another job holds is left alone. The default is the relational stores'
    /// (`unique_locks`, also a RabbitMQ transport's ledger); a queue that keeps its unique keys
    /// elsewhere overrides it.
    async fn release_unique(&self, key: &str, holder: JobId) -> Result<()> {
        let (key, id) = (key.to_string(), holder.as_bytes().to_vec());
        self.transaction(Box::new(move |tx| {
            tx.execute("DELETE FROM unique_locks WHERE key = $1 AND job_id = $2", &[SqlValue::Text(key), SqlValue::Blob(id)])
                .map(|n| Box::new(n) as Box<dyn std::any::Any + Send>)
        }))
        .await
        .map(|_| ())
    }

    /// Acts on delayed jobs (scheduled, or waiting to retry) by id; jobs that are not delayed
    /// are left alone. Returns the ids acted on. The default refuses: a backend that cannot.
    async fn act_on_delayed(&self, _ids: Vec<JobId>, _action: DelayedAction) -> Result<Vec<JobId>> {
        Err(BackendError::Invalid(format!("the {} queue cannot act on delayed jobs one by one yet", self.name())))
    }

    // --- metrics and workers ---------------------------------------------------------------

    /// Per-minute buckets (queue × kind) since `query.since`, oldest first.
    async fn metrics(&self, query: MetricsQuery) -> Result<Vec<MetricsRow>>;
    /// Drops metric buckets and completed-job history older than the retention.
    async fn prune(&self, metrics_before: i64) -> Result<()>;

    async fn worker_heartbeat(&self, info: WorkerInfo) -> Result<()>;
    async fn worker_gone(&self, id: &str) -> Result<()>;
    /// Workers seen within `within`.
    async fn workers(&self, within: Duration) -> Result<Vec<WorkerInfo>>;

    /// A cheap round trip to the relational store, for health checks.
    async fn ping(&self) -> Result<()>;

    /// The broker holding the queue outside the relational store (`redis`, `amqp`), if any.
    fn broker(&self) -> Option<&'static str> {
        None
    }

    /// A cheap round trip to [`broker`](Self::broker), for health checks.
    async fn ping_broker(&self) -> Result<()> {
        Ok(())
    }

    /// What an operator should know about how the backend is set up, found when it was opened
    /// (a Redis that persists nothing, say): shown by the health check, the backend still
    /// works. A backend that wraps another forwards the inner one's.
    fn warnings(&self) -> Vec<String> {
        Vec::new()
    }

    /// Where the cache, sorted sets, rate limiters and breakers keep their state when it is not
    /// the store (see [`crate::state`]); `None`: in the store, as SQL.
    fn shared_state(&self) -> Option<std::sync::Arc<dyn crate::state::SharedState>> {
        None
    }

    // --- named locks (see `lock`) ------------------------------------------------------------

    /// Takes `key` for `owner` for `ttl` unless another owner holds it (the holder extends
    /// it). The default keeps locks in the store's `locks` table; Redis keeps them in Redis.
    async fn lock_acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
        crate::lock::acquire_in_store(self, key, owner, ttl).await
    }

    /// Releases `key` if `owner` holds it.
    async fn lock_release(&self, key: &str, owner: &str) -> Result<bool> {
        crate::lock::release_in_store(self, key, owner).await
    }

    // --- dispatch support for brokers that deliver the store's jobs (RabbitMQ) ---------------

    /// Registers `hook`, called after every commit that made jobs ready (pending): enqueued,
    /// promoted from the delayed set, retried or released now, reaped, retried from the failed
    /// store. A broker transport publishes one message per ready job from it. Returns `false`
    /// when this backend keeps no such ledger (the default).
    fn set_dispatch(&self, _hook: DispatchHook) -> bool {
        false
    }

    /// Reserves the given jobs under a lease if they are pending and their queue is not paused
    /// (like [`reserve`](Self::reserve), but by id: the broker chose them). Jobs that are not
    /// pending are left alone and missing from the answer.
    async fn claim(&self, _ids: Vec<JobId>, _lease: Duration, _worker: &str) -> Result<Vec<Job>> {
        Err(BackendError::Other(format!("the {} backend cannot claim jobs by id", self.name())))
    }

    /// Moves due delayed jobs to pending (a bounded number per call) and returns how many; the
    /// dispatch hook hears of them.
    async fn promote_due(&self) -> Result<u64> {
        Ok(0)
    }

    /// A read-only query on the relational store, outside any write transaction (it sees what
    /// is committed). Parameters are `$1`, `$2`, ….
    async fn query(&self, sql: &str, params: Vec<SqlValue>) -> Result<Vec<Row>>;

    /// Runs `work` in one write transaction of the relational store. `tx.enqueue` inside it is
    /// transactional: a rolled-back transaction enqueues nothing.
    async fn transaction(&self, work: TxFn) -> Result<Box<dyn Any + Send>>;
}

/// A job that became ready in a committed transaction of the relational store.
#[derive(Clone, Debug, PartialEq)]
pub struct ReadyJob {
    pub id: JobId,
    pub queue: String,
    pub priority: i32,
}

/// Called (on the committing thread, so it must not block) with the jobs each commit made ready.
pub type DispatchHook = Arc<dyn Fn(Vec<ReadyJob>) + Send + Sync>;

/// A value passed to or read from SQL.
#[derive(Clone, Debug, PartialEq)]
pub enum SqlValue {
    Null,
    Int(i64),
    Real(f64),
    Text(String),
    Blob(Vec<u8>),
}

impl From<i64> for SqlValue {
    fn from(v: i64) -> Self {
        SqlValue::Int(v)
    }
}
impl From<i32> for SqlValue {
    fn from(v: i32) -> Self {
        SqlValue::Int(v as i64)
    }
}
impl From<f64> for SqlValue {
    fn from(v: f64) -> Self {
        SqlValue::Real(v)
    }
}
impl From<&str> for SqlValue {
    fn from(v: &str) -> Self {
        SqlValue::Text(v.to_string())
    }
}
impl From<String> for SqlValue {
    fn from(v: String) -> Self {
        SqlValue::Text(v)
    }
}
impl<T: Into<SqlValue>> From<Option<T>> for SqlValue {
    fn from(v: Option<T>) -> Self {
        v.map_or(SqlValue::Null, Into::into)
    }
}

impl SqlValue {
    pub fn as_i64(&self) -> Option<i64> {
        match self {
            SqlValue::Int(v) => Some(*v),
            SqlValue::Real(v) => Some(*v as i64),
            _ => None,
        }
    }
    pub fn as_str(&self) -> Option<&str> {
        match self {
            SqlValue::Text(v) => Some(v),
            _ => None,
        }
    }
}

pub type Row = Vec<SqlValue>;

/// Typed access to a row's columns; a NULL or missing column reads as 0 / `None`.
pub trait RowExt {
    fn int(&self, i: usize) -> i64;
    fn opt_int(&self, i: usize) -> Option<i64>;
    fn text(&self, i: usize) -> Option<&str>;
    fn real(&self, i: usize) -> f64;
}

impl RowExt for Row {
    fn int(&self, i: usize) -> i64 {
        self.opt_int(i).unwrap_or(0)
    }
    fn opt_int(&self, i: usize) -> Option<i64> {
        self.get(i).and_then(SqlValue::as_i64)
    }
    fn text(&self, i: usize) -> Option<&str> {
        self.get(i).and_then(SqlValue::as_str)
    }
    fn real(&self, i: usize) -> f64 {
        match self.get(i) {
            Some(SqlValue::Real(v)) => *v,
            Some(SqlValue::Int(v)) => *v as f64,
            _ => 0.0,
        }
    }
}

/// SQL work inside a store transaction. It is synchronous on purpose: a transaction is never
/// held open across an `.await` (on SQLite the closure runs on the writer thread, inside a
/// group commit). Parameters are written `$1`, `$2`, … on every backend.
///
/// A statement that fails must fail the closure (return its error): PostgreSQL aborts the whole
/// transaction on an error, so a closure that swallows one and returns `Ok` gets the error from
/// the commit instead, with nothing committed. Use `ON CONFLICT …` rather than "try, then
/// recover".
pub trait Tx {
    fn execute(&mut self, sql: &str, params: &[SqlValue]) -> Result<u64>;
    fn query(&mut self, sql: &str, params: &[SqlValue]) -> Result<Vec<Row>>;
    /// Runs a statement whose answer the caller does not need, as soon as the backend likes but
    /// before the transaction commits and before any later statement of it runs. If it fails,
    /// the transaction fails (a later statement or the commit returns its error). PostgreSQL
    /// sends it with the next statement whose answer is awaited (no round trip of its own);
    /// the default runs it at once.
    fn defer(&mut self, sql: &str, params: &[SqlValue]) -> Result<()> {
        self.execute(sql, params).map(|_| ())
    }
    /// Runs several statements separated by `;`, without parameters (schema migrations).
    fn execute_script(&mut self, sql: &str) -> Result<()>;
    /// Enqueues in this transaction: the jobs exist if and only if it commits.
    fn enqueue(&mut self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>>;
    /// Makes concurrent schema migrations wait for one another until this transaction ends (a
    /// no-op where transactions are already serial, as on SQLite's single writer).
    fn serialize_migrations(&mut self) -> Result<()> {
        Ok(())
    }
    /// Inserts many rows (see [`insert_many`]). The default sends multi-row statements, one
    /// round trip per chunk; SQLite overrides it with cached statements of a few fixed row
    /// counts, so a batch's rows are bound to statements parsed once per process. A `Tx` that
    /// wraps another forwards it.
    fn insert_rows(&mut self, head: &str, rows: &[Vec<SqlValue>], tail: &str) -> Result<Vec<Row>> {
        multi_row_insert(self, head, rows, tail)
    }
    /// The shared state outside the store, when the backend has one (see [`crate::state`]);
    /// `None`: the cache, sorted sets, rate limits and breakers are SQL in this transaction.
    fn shared_state(&mut self) -> Option<&mut dyn crate::state::TxShared> {
        None
    }
    /// What this transaction did, for the process's counters once it commits
    /// ([`crate::telemetry`]); `None` outside [`crate::lane::Lanes`] (tests on a bare backend).
    fn telemetry(&mut self) -> Option<&mut crate::telemetry::Pending> {
        None
    }
}

/// A unit of transactional work; an `Err` rolls back everything it did.
pub type TxFn = Box<dyn FnOnce(&mut dyn Tx) -> Result<Box<dyn Any + Send>> + Send>;

/// Typed helpers over the object-safe trait.
#[async_trait]
pub trait QueueBackendExt: QueueBackend {
    /// Runs `work` in one transaction and returns its typed result.
    async fn transact<R, F>(&self, work: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R> + Send + 'static,
    {
        let out = self.transaction(Box::new(move |tx| work(tx).map(|r| Box::new(r) as Box<dyn Any + Send>))).await?;
        Ok(*out.downcast::<R>().expect("transaction returns what its closure returned"))
    }
}

impl<T: QueueBackend + ?Sized> QueueBackendExt for T {}

/// Most parameters one multi-row statement gets (PostgreSQL allows 65,535, SQLite 32,766).
const MAX_PARAMS: usize = 30_000;

/// Inserts many rows with as few statements as the parameter limits allow:
/// `head` is `INSERT INTO t (a, b, c)`, every row has the same number of values, and `tail`
/// follows the `VALUES` list (`ON CONFLICT …`, `RETURNING …`, or empty). Returns what the
/// statements return. On hot paths (imports) this is one round trip instead of one per row.
pub fn insert_many(tx: &mut dyn Tx, head: &str, rows: &[Vec<SqlValue>], tail: &str) -> Result<Vec<Row>> {
    match rows.first().map(Vec::len) {
        None => Ok(Vec::new()),
        Some(width) if width == 0 || rows.iter().any(|r| r.len() != width) => {
            Err(BackendError::Invalid("insert_many: every row needs the same number of values".into()))
        }
        Some(_) => tx.insert_rows(head, rows, tail),
    }
}

/// `Tx::insert_rows`' default: as few multi-row statements as the parameter limits allow.
pub fn multi_row_insert<T: Tx + ?Sized>(tx: &mut T, head: &str, rows: &[Vec<SqlValue>], tail: &str) -> Result<Vec<Row>> {
    let Some(width) = rows.first().map(Vec::len) else { return Ok(Vec::new()) };
    let per_statement = (MAX_PARAMS / width).max(1);
    let mut out = Vec::new();
    for chunk in rows.chunks(per_statement) {
        let mut sql = String::with_capacity(head.len() + tail.len() + chunk.len() * width * 6);
        sql.push_str(head);
        sql.push_str(" VALUES ");
        let mut n = 0;
        for (i, _) in chunk.iter().enumerate() {
            sql.push_str(if i == 0 { "(" } else { ", (" });
            for j in 0..width {
                n += 1;
                if j > 0 {
                    sql.push_str(", ");
                }
                sql.push('$');
                sql.push_str(&n.to_string());
            }
            sql.push(')');
        }
        sql.push(' ');
        sql.push_str(tail);
        let params: Vec<SqlValue> = chunk.iter().flatten().cloned().collect();
        if tail.to_ascii_uppercase().contains("RETURNING") {
            out.extend(tx.query(&sql, &params)?);
        } else {
            tx.defer(&sql, &params)?;
        }
    }
    Ok(out)
}

/// Repeats `chunk` (one bounded transaction that clears, retries or forgets up to some number
/// of rows and says how many) until it finds nothing left; returns the total. Backends use it
/// so no administrative command holds one huge transaction.
pub async fn in_chunks<F, Fut>(mut chunk: F) -> Result<u64>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64>>,
{
    let mut total = 0;
    loop {
        let n = chunk().await?;
        total += n;
        if n == 0 {
            return Ok(total);
        }
    }
}
