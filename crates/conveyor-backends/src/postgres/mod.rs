//! The PostgreSQL backend: the relational store and the queue for deployments of several
//! machines. Every operation is a transaction on a pooled connection; reservations take jobs
//! with `FOR UPDATE SKIP LOCKED`, so any number of workers on any number of machines share a
//! queue without blocking one another; `NOTIFY conveyor_jobs` in a transaction that made work
//! ready wakes the workers of every process (a `LISTEN` connection each), with polling as the
//! fallback. Acknowledgements apply batch and workflow transitions in their own transaction, as
//! on SQLite.

mod admin;
mod dialect;
mod pipe;
mod pool;
mod read;
mod schema;
pub mod testing;
mod tls;
mod tx;
mod value;

use std::any::Any;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use postgres::fallible_iterator::FallibleIterator;

use conveyor_core::backend::{
    in_chunks, BackendError, DispatchHook, FailedJob, JobFilter, ManyTxFn, MetricsQuery, Page, Paged, Queue, QueueStats, ReserveRequest,
    Result, Row, SqlValue, Store, TxFn, WorkerInfo,
};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, EnqueueOutcome, Job, JobId, JobInfo, NewJob};
use conveyor_core::metrics::MetricsRow;
use conveyor_core::wakeup::Wakeup;

use crate::relational::{admin as queue_admin, lifecycle};
use pool::Pool;
use tx::PgTx;
use value::{params, pg_err, refs, row};

/// Completed-job history rows inserted between two trims of the history.
const TRIM_EVERY: usize = 256;

#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://user@host:port/database`.
    pub url: String,
    /// Completed jobs kept for the dashboard (0 keeps none).
    pub completed_history: usize,
    /// Connections this process opens at most.
    pub pool_size: usize,
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        PgOptions { url: url.into(), completed_history: 10_000, pool_size: 16 }
    }
}

pub struct PgBackend {
    pool: Arc<Pool>,
    wakeup: Arc<Wakeup>,
    history: usize,
    history_inserts: Arc<AtomicUsize>,
    last_notify: Arc<AtomicI64>,
    /// A transaction made work ready but skipped its NOTIFY (throttled): the LISTEN thread
    /// sends one shortly, so other processes still hear of it.
    owed_notify: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    dispatch: Arc<OnceLock<DispatchHook>>,
}

impl Drop for PgBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl PgBackend {
    /// Connects, brings the schema up to date and starts listening for wake-ups. Blocking work
    /// runs on a thread of its own, so this may be called from async code.
    pub fn open(options: PgOptions) -> Result<Self> {
        let (config, tls) = pool::config(&options.url)?;
        let pool = Pool::new(config, tls, options.pool_size);
        let p = pool.clone();
        std::thread::scope(|s| {
            s.spawn(move || -> Result<()> {
                let mut client = p.connect()?;
                schema::migrate(&mut client).map_err(pg_err)?;
                Ok(())
            })
            .join()
            .map_err(|_| BackendError::Other("migrating PostgreSQL panicked".into()))?
        })?;
        let wakeup = Arc::new(Wakeup::default());
        let stop = Arc::new(AtomicBool::new(false));
        let owed_notify = Arc::new(AtomicBool::new(false));
        listen(pool.clone(), wakeup.clone(), owed_notify.clone(), stop.clone());
        Ok(PgBackend {
            pool,
            wakeup,
            history: options.completed_history,
            history_inserts: Arc::default(),
            last_notify: Arc::default(),
            owed_notify,
            stop,
            dispatch: Arc::new(OnceLock::new()),
        })
    }

    pub fn schema_version() -> u32 {
        schema::latest_version()
    }

    /// Runs `f` in one transaction and commits it with its counter deltas.
    async fn tx<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut PgTx<'_>) -> Result<R> + Send + 'static,
    {
        let (history, inserts, wakeup, last_notify, owed) =
            (self.history, self.history_inserts.clone(), self.wakeup.clone(), self.last_notify.clone(), self.owed_notify.clone());
        let dispatch = self.dispatch.clone();
        self.pool
            .with(move |c| {
                let shard = c.shard;
                let mut t = PgTx::new(&mut c.client, &mut c.stmts, shard, history);
                t.collect_ready = dispatch.get().is_some();
                let out = f(&mut t)?;
                if t.history_inserts > 0 && inserts.fetch_add(t.history_inserts, Ordering::Relaxed) + t.history_inserts >= TRIM_EVERY {
                    inserts.store(0, Ordering::Relaxed);
                    t.trim_history()?;
                }
                let ready = std::mem::take(&mut t.ready);
                let (woke, notified) = t.commit(&last_notify)?;
                if let (false, Some(hook)) = (ready.is_empty(), dispatch.get()) {
                    hook(ready);
                }
                if woke {
                    wakeup.wake();
                    if !notified {
                        owed.store(true, Ordering::Relaxed);
                    }
                }
                Ok(out)
            })
            .await
    }

    async fn read<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut pool::Conn) -> Result<R> + Send + 'static,
    {
        self.pool.with(f).await
    }
}

/// Keeps a `LISTEN conveyor_jobs` connection and wakes local workers on each notification;
/// reconnects with backoff when the server goes away (and wakes them then too, since
/// notifications sent meanwhile are lost). It also sends the NOTIFYs that throttled
/// transactions owe, within a few tens of milliseconds.
fn listen(pool: Arc<Pool>, wakeup: Arc<Wakeup>, owed: Arc<AtomicBool>, stop: Arc<AtomicBool>) {
    let spawned = std::thread::Builder::new().name("conveyor-pg-listen".into()).spawn(move || {
        let mut backoff = Duration::from_millis(100);
        while !stop.load(Ordering::Relaxed) {
            let mut client = match pool.connect().and_then(|mut c| c.batch_execute("LISTEN conveyor_jobs").map(|_| c).map_err(pg_err)) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed; retrying");
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                    continue;
                }
            };
            backoff = Duration::from_millis(100);
            wakeup.wake();
            let mut last_check = std::time::Instant::now();
            while !stop.load(Ordering::Relaxed) && !client.is_closed() {
                let mut notes = client.notifications();
                let mut it = notes.timeout_iter(Duration::from_millis(tx::NOTIFY_EVERY_MS as u64));
                while !stop.load(Ordering::Relaxed) {
                    match it.next() {
                        Ok(Some(_)) => wakeup.wake(),
                        Ok(None) => break,
                        Err(e) => {
                            tracing::warn!(error = %e, "LISTEN connection lost; reconnecting");
                            break;
                        }
                    }
                }
                // A round trip notices a dead connection that sends nothing; it carries an owed
                // NOTIFY when there is one.
                drop(it);
                drop(notes);
                let sql = if owed.swap(false, Ordering::Relaxed) {
                    "NOTIFY conveyor_jobs"
                } else if last_check.elapsed() >= Duration::from_millis(250) {
                    ""
                } else {
                    continue;
                };
                last_check = std::time::Instant::now();
                if client.batch_execute(sql).is_err() {
                    break;
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the LISTEN thread; workers rely on polling");
    }
}

#[async_trait]
impl Queue for PgBackend {
    fn name(&self) -> &'static str {
        "postgres"
    }

    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        for job in &jobs {
            job.validate().map_err(BackendError::Invalid)?;
        }
        self.tx(move |t| lifecycle::enqueue(t, jobs)).await
    }

    async fn reserve(&self, req: ReserveRequest) -> Result<Vec<Job>> {
        if req.max == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        let lease_ms = req.lease.as_millis() as i64;
        self.tx(move |t| lifecycle::reserve(t, &req.queues, req.max, lease_ms, &req.worker)).await
    }

    async fn act_on_delayed(&self, ids: Vec<JobId>, action: conveyor_core::backend::DelayedAction) -> Result<Vec<JobId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.tx(move |t| queue_admin::act_on_delayed(t, &ids, &action)).await
    }

    /// One transaction, so one commit: both happen or neither.
    async fn enqueue_and_reserve(&self, jobs: Vec<NewJob>, req: ReserveRequest) -> Result<(Vec<EnqueueOutcome>, Vec<Job>)> {
        for job in &jobs {
            job.validate().map_err(BackendError::Invalid)?;
        }
        let lease_ms = req.lease.as_millis() as i64;
        self.tx(move |t| {
            let out = if jobs.is_empty() { Vec::new() } else { lifecycle::enqueue(t, jobs)? };
            if req.max == 0 || req.queues.is_empty() {
                return Ok((out, Vec::new()));
            }
            let reserved = lifecycle::reserve(t, &req.queues, req.max, lease_ms, &req.worker)?;
            Ok((out, reserved))
        })
        .await
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<()> {
        if completions.is_empty() {
            return Ok(());
        }
        self.tx(move |t| lifecycle::complete(t, completions)).await
    }

    async fn complete_with(&self, completion: Completion, work: TxFn) -> Result<Box<dyn Any + Send>> {
        // `work` first, as on SQLite: it sees the job's batch still open, and the outcome's
        // hooks see what it wrote. A lost lease rolls both back.
        self.tx(move |t| lifecycle::complete_with(t, completion, work)).await
    }

    async fn complete_many_with(&self, completions: Vec<Completion>, work: ManyTxFn) -> Result<(Box<dyn Any + Send>, Vec<bool>)> {
        self.tx(move |t| lifecycle::complete_many_with(t, completions, work)).await
    }

    async fn extend_leases(&self, leases: Vec<(JobId, i64)>, lease: Duration) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        let lease_ms = lease.as_millis() as i64;
        self.tx(move |t| lifecycle::extend_leases(t, &leases, lease_ms)).await
    }

    async fn reap_expired(&self) -> Result<u64> {
        self.tx(|t| lifecycle::reap_expired(t)).await
    }

    fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }

    async fn pause(&self, queue: &str) -> Result<()> {
        let q = queue.to_string();
        self.tx(move |t| t.set_paused(&q, true)).await
    }

    async fn resume(&self, queue: &str) -> Result<()> {
        let q = queue.to_string();
        self.tx(move |t| t.set_paused(&q, false)).await
    }

    async fn clear(&self, queue: &str) -> Result<u64> {
        in_chunks(|| {
            let q = queue.to_string();
            self.tx(move |t| queue_admin::clear_chunk(t, &q, 5_000))
        })
        .await
    }

    async fn retry_failed(&self, ids: Vec<JobId>) -> Result<Vec<JobId>> {
        let ids: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
        self.tx(move |t| queue_admin::retry_failed(t, &ids)).await
    }

    async fn retry_all_failed(&self, queue: Option<&str>) -> Result<u64> {
        in_chunks(|| {
            let q = queue.map(str::to_string);
            self.tx(move |t| {
                let ids = t.failed_ids(q.as_deref(), 1_000)?;
                Ok(queue_admin::retry_failed(t, &ids)?.len() as u64)
            })
        })
        .await
    }

    async fn transaction(&self, work: TxFn) -> Result<Box<dyn Any + Send>> {
        self.tx(move |t| work(t)).await
    }
}

#[async_trait]
impl Store for PgBackend {
    async fn holders(&self) -> Result<Vec<String>> {
        self.read(read::holders).await
    }

    async fn expire_leases_of(&self, holders: Vec<String>) -> Result<u64> {
        self.tx(move |t| lifecycle::expire_leases_of(t, &holders)).await
    }

    fn set_dispatch(&self, hook: DispatchHook) -> bool {
        self.dispatch.set(hook).is_ok()
    }

    async fn claim(&self, ids: Vec<JobId>, lease: Duration, worker: &str) -> Result<Vec<Job>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let (lease_ms, worker) = (lease.as_millis() as i64, worker.to_string());
        self.tx(move |t| lifecycle::claim(t, &ids, lease_ms, &worker)).await
    }

    async fn promote_due(&self) -> Result<u64> {
        self.tx(|t| lifecycle::promote_due(t, now_ms())).await
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        self.read(read::queues).await
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>> {
        self.read(move |c| read::job(c, id)).await
    }

    async fn jobs(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>> {
        self.read(move |c| read::jobs(c, &filter, page)).await
    }

    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
        let q = queue.map(str::to_string);
        self.read(move |c| read::failed(c, q.as_deref(), page)).await
    }

    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>> {
        self.read(move |c| read::failed_job(c, id)).await
    }

    async fn failed_since(&self, since: i64) -> Result<u64> {
        self.read(move |c| Ok(c.rows("SELECT count(*) FROM failed_jobs WHERE failed_at >= $1", &[&since])?[0].get::<_, i64>(0) as u64))
            .await
    }

    async fn forget_failed(&self, id: JobId) -> Result<bool> {
        let ids = vec![id.as_bytes().to_vec()];
        Ok(self.tx(move |t| queue_admin::forget_failed(t, &ids)).await? == 1)
    }

    async fn flush_failed(&self, queue: Option<&str>) -> Result<u64> {
        in_chunks(|| {
            let q = queue.map(str::to_string);
            self.tx(move |t| {
                let ids = t.failed_ids(q.as_deref(), 5_000)?;
                queue_admin::forget_failed(t, &ids)
            })
        })
        .await
    }

    async fn metrics(&self, query: MetricsQuery) -> Result<Vec<MetricsRow>> {
        self.read(move |c| read::metrics(c, &query)).await
    }

    async fn prune(&self, metrics_before: i64) -> Result<()> {
        self.tx(move |t| t.prune(metrics_before)).await
    }

    async fn worker_heartbeat(&self, info: WorkerInfo) -> Result<()> {
        let json = serde_json::to_string(&info).map_err(|e| BackendError::Other(e.to_string()))?;
        self.tx(move |t| t.worker_heartbeat(&info.id, info.last_seen, &json)).await
    }

    async fn worker_gone(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.read(move |c| c.client.execute("DELETE FROM workers WHERE id = $1", &[&id]).map(|_| ()).map_err(pg_err)).await
    }

    async fn workers(&self, within: Duration) -> Result<Vec<WorkerInfo>> {
        let since = now_ms() - within.as_millis() as i64;
        self.read(move |c| read::workers(c, since)).await
    }

    async fn ping(&self) -> Result<()> {
        self.read(|c| c.client.simple_query("SELECT 1").map(|_| ()).map_err(pg_err)).await
    }

    async fn query(&self, sql: &str, values: Vec<SqlValue>) -> Result<Vec<Row>> {
        let sql = sql.to_string();
        self.read(move |c| {
            let p = params(&values);
            c.rows(&sql, &refs(&p))?.iter().map(row).collect()
        })
        .await
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
