//! The contract between the engine and a backend: the queue lifecycle ([`Queue`]), what is
//! stored about jobs — records, failed store, metrics, worker registry — and the SQL
//! ([`Store`]), both together as [`QueueBackend`]; and SQL work that must share a transaction
//! with queue operations ([`Tx`]).
//!
//! Every backend — SQLite, PostgreSQL, Redis, RabbitMQ — is a [`QueueBackend`] and passes the
//! same conformance suite (`conveyor-backends/tests/conformance/`).

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
mod queue;
mod store;

pub use error::{BackendError, Cause, ErrorKind};
pub use page::{count_sql, Cursor, Page, Paged, MAX_DEPTH};
pub use queue::Queue;
pub use store::{Fronts, Store};

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

/// What [`Queue::act_on_delayed`] does with a job waiting for its time.
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

/// A backend: the job queue ([`Queue`]) and everything the engine stores about jobs
/// ([`Store`]). SQLite, PostgreSQL and Redis implement both; RabbitMQ implements the queue and
/// [`Fronts`] a relational backend, which answers the store's half.
pub trait QueueBackend: Queue + Store {}

impl<T: Queue + Store> QueueBackend for T {}

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
    /// The clause that makes a `SELECT` lock the rows it reads until the transaction ends, in
    /// the order it returns them (` FOR UPDATE` on PostgreSQL), so that work touching shared
    /// rows (a product's stock) takes them in one order and never deadlocks; empty where
    /// transactions are serial already (SQLite's single writer). A `Tx` that wraps another
    /// forwards it.
    fn for_update(&self) -> &'static str {
        ""
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

/// Set-wise work for many jobs' completions: it gets, in the completions' order, whether each
/// job's reservation still holds ([`Queue::complete_many_with`]).
pub type ManyTxFn = Box<dyn FnOnce(&mut dyn Tx, &[bool]) -> Result<Box<dyn Any + Send>> + Send>;

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

/// `$from, $from+1, …`: `n` parameter marks, for an `IN (…)` list.
pub fn placeholders(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

/// How many entries a generated list of `n` gets: the next power of two. Set-wise statements
/// pad their `IN (…)` and `VALUES` lists to it by repeating the last entry (which means the
/// same), so sets of any size run a few statement texts, each prepared once per PostgreSQL
/// connection, instead of a new one (a round trip to prepare, a cache entry) per size.
pub fn padded(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

/// An `IN` list of `values` as parameters from `$from`, padded (see [`padded`]): the marks and
/// the values to bind.
pub fn in_list(from: usize, values: impl IntoIterator<Item = SqlValue>) -> (String, Vec<SqlValue>) {
    let mut values: Vec<SqlValue> = values.into_iter().collect();
    if let Some(last) = values.last().cloned() {
        values.resize(padded(values.len()), last);
    }
    (placeholders(from, values.len()), values)
}

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
