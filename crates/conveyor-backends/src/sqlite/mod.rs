//! The embedded default backend: the queue and the relational store in one SQLite file.
//!
//! One writer thread owns the write connection and group-commits every write ([`writer`]);
//! reads use their own connections ([`read`]). WAL mode with `synchronous=FULL`: an enqueue or
//! acknowledgement is answered only once its transaction is on disk.

mod admin;
mod dialect;
mod read;
mod schema;
mod tx;
mod writer;

use std::any::Any;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use rusqlite::Connection;

use conveyor_core::backend::{
    in_chunks, BackendError, Cause, DispatchHook, FailedJob, JobFilter, ManyTxFn, MetricsQuery, Page, Paged, Queue, QueueStats,
    ReserveRequest, Result, Row, SqlValue, Store, TxFn, WorkerInfo,
};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, EnqueueOutcome, Job, JobId, JobInfo, NewJob};
use conveyor_core::metrics::MetricsRow;
use conveyor_core::wakeup::Wakeup;

use crate::relational::{admin as queue_admin, lifecycle};
use read::Readers;
use writer::Writer;

/// How the SQLite backend is opened.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    pub path: String,
    /// Completed jobs kept for the dashboard (0 keeps none).
    pub completed_history: usize,
}

impl SqliteOptions {
    pub fn new(path: impl Into<String>) -> Self {
        SqliteOptions { path: path.into(), completed_history: 1_000 }
    }
}

pub struct SqliteBackend {
    writer: Writer,
    readers: Readers,
    wakeup: Arc<Wakeup>,
    path: String,
    dispatch: Arc<OnceLock<DispatchHook>>,
}

impl SqliteBackend {
    /// Opens (creating if missing) and migrates the database.
    pub fn open(options: SqliteOptions) -> Result<Self> {
        if options.path.is_empty() || options.path == ":memory:" {
            return Err(BackendError::Invalid(
                "the SQLite backend needs a file path (an in-memory database cannot be shared by its connections)".into(),
            ));
        }
        let mut conn = open_connection(&options.path)
            .map_err(|e| BackendError::Storage(Cause::new(format!("cannot open {}: {e}", options.path)).with_source(e)))?;
        schema::migrate(&mut conn).map_err(storage_err)?;
        let wakeup = Arc::new(Wakeup::default());
        let dispatch = Arc::new(OnceLock::new());
        Ok(SqliteBackend {
            writer: Writer::spawn(conn, wakeup.clone(), options.completed_history, dispatch.clone()),
            readers: Readers::new(options.path.clone()),
            wakeup,
            path: options.path,
            dispatch,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn schema_version() -> u32 {
        schema::latest_version()
    }
}

pub(crate) fn open_connection(path: &str) -> rusqlite::Result<Connection> {
    let conn = Connection::open(path)?;
    // WAL lets readers run beside the writer; FULL makes every commit durable before it is
    // acknowledged (the foundation's promise), which group commit keeps affordable.
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "busy_timeout", 10_000)?;
    conn.pragma_update(None, "cache_size", -8_000)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.set_prepared_statement_cache_capacity(256);
    Ok(conn)
}

/// A driver error as the engine's, the driver's error kept as the source: a primary key or
/// unique index refusing a row is `Unique` (told by SQLite's extended result code, not by the
/// message), anything else `Storage`.
pub(crate) fn storage_err(e: rusqlite::Error) -> BackendError {
    let unique = e.sqlite_error().is_some_and(|f| {
        f.code == rusqlite::ErrorCode::ConstraintViolation
            && matches!(f.extended_code, rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY)
    });
    let cause = Cause::new(e.to_string()).with_source(e);
    if unique {
        BackendError::Unique(cause)
    } else {
        BackendError::Storage(cause)
    }
}

#[async_trait]
impl Queue for SqliteBackend {
    fn name(&self) -> &'static str {
        "sqlite"
    }

    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        self.writer.call(move |w| lifecycle::enqueue(w, jobs)).await
    }

    async fn reserve(&self, req: ReserveRequest) -> Result<Vec<Job>> {
        if req.max == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        let lease_ms = req.lease.as_millis() as i64;
        self.writer.call(move |w| lifecycle::reserve(w, &req.queues, req.max, lease_ms, &req.worker)).await
    }

    /// One request to the writer, so one commit.
    async fn enqueue_and_reserve(&self, jobs: Vec<NewJob>, req: ReserveRequest) -> Result<(Vec<EnqueueOutcome>, Vec<Job>)> {
        let lease_ms = req.lease.as_millis() as i64;
        self.writer
            .call(move |w| {
                let out = lifecycle::enqueue(w, jobs)?;
                if req.max == 0 || req.queues.is_empty() {
                    return Ok((out, Vec::new()));
                }
                let reserved = lifecycle::reserve(w, &req.queues, req.max, lease_ms, &req.worker)?;
                Ok((out, reserved))
            })
            .await
    }

    async fn act_on_delayed(&self, ids: Vec<JobId>, action: conveyor_core::backend::DelayedAction) -> Result<Vec<JobId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.writer.call(move |w| queue_admin::act_on_delayed(w, &ids, &action)).await
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<()> {
        if completions.is_empty() {
            return Ok(());
        }
        self.writer.call(move |w| lifecycle::complete(w, completions)).await
    }

    async fn complete_with(&self, completion: Completion, work: TxFn) -> Result<Box<dyn Any + Send>> {
        self.writer.call(move |w| lifecycle::complete_with(w, completion, work)).await
    }

    async fn complete_many_with(&self, completions: Vec<Completion>, work: ManyTxFn) -> Result<(Box<dyn Any + Send>, Vec<bool>)> {
        self.writer.call(move |w| lifecycle::complete_many_with(w, completions, work)).await
    }

    async fn extend_leases(&self, leases: Vec<(JobId, i64)>, lease: Duration) -> Result<()> {
        let lease_ms = lease.as_millis() as i64;
        self.writer.call(move |w| lifecycle::extend_leases(w, &leases, lease_ms)).await
    }

    async fn reap_expired(&self) -> Result<u64> {
        self.writer.call(lifecycle::reap_expired).await
    }

    fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }

    async fn pause(&self, queue: &str) -> Result<()> {
        let q = queue.to_string();
        self.writer.call(move |w| w.set_paused(&q, true)).await
    }

    async fn resume(&self, queue: &str) -> Result<()> {
        let q = queue.to_string();
        self.writer.call(move |w| w.set_paused(&q, false)).await
    }

    async fn clear(&self, queue: &str) -> Result<u64> {
        // In chunks, so other writers are not held up behind one huge delete.
        in_chunks(|| {
            let q = queue.to_string();
            self.writer.call(move |w| queue_admin::clear_chunk(w, &q, 5_000))
        })
        .await
    }

    async fn retry_failed(&self, ids: Vec<JobId>) -> Result<Vec<JobId>> {
        let ids: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
        self.writer.call(move |w| queue_admin::retry_failed(w, &ids)).await
    }

    async fn retry_all_failed(&self, queue: Option<&str>) -> Result<u64> {
        in_chunks(|| {
            let q = queue.map(str::to_string);
            self.writer.call(move |w| {
                let ids = w.failed_ids(q.as_deref(), 1_000)?;
                Ok(queue_admin::retry_failed(w, &ids)?.len() as u64)
            })
        })
        .await
    }

    async fn transaction(&self, work: TxFn) -> Result<Box<dyn Any + Send>> {
        self.writer.call(move |w| work(&mut tx::SqliteTx { ctx: w })).await
    }
}

#[async_trait]
impl Store for SqliteBackend {
    async fn holders(&self) -> Result<Vec<String>> {
        self.readers.with(read::holders).await
    }

    async fn expire_leases_of(&self, holders: Vec<String>) -> Result<u64> {
        self.writer.call(move |w| lifecycle::expire_leases_of(w, &holders)).await
    }

    fn set_dispatch(&self, hook: DispatchHook) -> bool {
        self.dispatch.set(hook).is_ok()
    }

    async fn claim(&self, ids: Vec<JobId>, lease: Duration, worker: &str) -> Result<Vec<Job>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (lease_ms, worker) = (lease.as_millis() as i64, worker.to_string());
        self.writer.call(move |w| lifecycle::claim(w, &ids, lease_ms, &worker)).await
    }

    async fn promote_due(&self) -> Result<u64> {
        self.writer.call(|w| lifecycle::promote_due(w, now_ms())).await
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        self.readers.with(read::queues).await
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>> {
        self.readers.with(move |c| read::job(c, id)).await
    }

    async fn jobs(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>> {
        self.readers.with(move |c| read::jobs(c, &filter, page)).await
    }

    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
        let q = queue.map(str::to_string);
        self.readers.with(move |c| read::failed(c, q.as_deref(), page)).await
    }

    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>> {
        self.readers.with(move |c| read::failed_job(c, id)).await
    }

    async fn failed_since(&self, since: i64) -> Result<u64> {
        self.readers
            .with(move |c| {
                c.query_row("SELECT count(*) FROM failed_jobs WHERE failed_at >= ?1", [since], |r| r.get::<_, i64>(0))
                    .map(|n| n as u64)
                    .map_err(storage_err)
            })
            .await
    }

    async fn forget_failed(&self, id: JobId) -> Result<bool> {
        let ids = vec![id.as_bytes().to_vec()];
        Ok(self.writer.call(move |w| queue_admin::forget_failed(w, &ids)).await? == 1)
    }

    async fn flush_failed(&self, queue: Option<&str>) -> Result<u64> {
        in_chunks(|| {
            let q = queue.map(str::to_string);
            self.writer.call(move |w| {
                let ids = w.failed_ids(q.as_deref(), 5_000)?;
                queue_admin::forget_failed(w, &ids)
            })
        })
        .await
    }

    async fn metrics(&self, query: MetricsQuery) -> Result<Vec<MetricsRow>> {
        self.readers.with(move |c| read::metrics(c, &query)).await
    }

    async fn prune(&self, metrics_before: i64) -> Result<()> {
        self.writer.call(move |w| w.prune(metrics_before)).await
    }

    async fn worker_heartbeat(&self, info: WorkerInfo) -> Result<()> {
        let json = serde_json::to_string(&info).map_err(|e| BackendError::Other(e.to_string()))?;
        self.writer.call(move |w| w.worker_heartbeat(&info.id, info.last_seen, &json)).await
    }

    async fn worker_gone(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.writer.call(move |w| w.conn.execute("DELETE FROM workers WHERE id = ?1", [&id]).map(|_| ()).map_err(storage_err)).await
    }

    async fn workers(&self, within: Duration) -> Result<Vec<WorkerInfo>> {
        let since = now_ms() - within.as_millis() as i64;
        self.readers.with(move |c| read::workers(c, since)).await
    }

    async fn ping(&self) -> Result<()> {
        self.readers.with(|c| c.query_row("SELECT 1", [], |_| Ok(())).map_err(storage_err)).await
    }

    async fn query(&self, sql: &str, params: Vec<SqlValue>) -> Result<Vec<Row>> {
        let sql = sql.to_string();
        self.readers.with(move |c| tx::query(c, &sql, &params)).await
    }

    async fn release_unique(&self, key: &str, holder: JobId) -> Result<()> {
        conveyor_core::lock::release_unique_in_store(self, key, holder).await
    }

    async fn lock_acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
        conveyor_core::lock::acquire_in_store(self, key, owner, ttl).await
    }

    async fn lock_release(&self, key: &str, owner: &str) -> Result<bool> {
        conveyor_core::lock::release_in_store(self, key, owner).await
    }
}
