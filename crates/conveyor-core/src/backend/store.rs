//! The store half of a backend ([`Store`]): what the engine keeps about jobs beside the queue
//! — their records and pages, the failed store, metrics, the worker registry, unique keys and
//! named locks, the reservation holders — plus the relational store's SQL, and the by-id hooks
//! a broker transport drives it with (dispatch, claim, promotion).
//!
//! A queue in front of a relational ledger (RabbitMQ) implements [`Fronts`] and gets its
//! [`Store`] from the ledger, so it forwards nothing by hand and cannot forget a method.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::*;

/// See the module documentation. Implemented by SQLite, PostgreSQL and Redis themselves, and
/// for every [`Fronts`] by its ledger.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The processes holding reservations now (the `worker` of their `reserve`), so that the
    /// reaper can find dead ones ([`crate::liveness`]). Empty where the backend keeps none.
    async fn holders(&self) -> Result<Vec<String>> {
        Ok(Vec::new())
    }

    /// Ends the leases of `holders`, processes known to be dead, so that the next
    /// [`Queue::reap_expired`] returns their jobs. Returns the reservations ended.
    async fn expire_leases_of(&self, _holders: Vec<String>) -> Result<u64> {
        Ok(0)
    }

    async fn queues(&self) -> Result<Vec<QueueStats>>;

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>>;

    async fn jobs(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>>;

    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>>;

    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>>;

    /// Jobs that entered the failed store at or after `since` (unix ms) and are still there.
    async fn failed_since(&self, since: i64) -> Result<u64>;

    async fn forget_failed(&self, id: JobId) -> Result<bool>;

    async fn flush_failed(&self, queue: Option<&str>) -> Result<u64>;

    /// Frees the unique key `key` if `holder` still holds it, before the job finishes (Faktory's
    /// `unique_until: "start"`): a job with the same key may then be enqueued while this one
    /// runs. A key another job holds is left alone. The relational stores keep unique keys in
    /// `unique_locks` (also as a RabbitMQ transport's ledger), Redis in Redis.
    async fn release_unique(&self, key: &str, holder: JobId) -> Result<()>;

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

    /// Takes `key` for `owner` for `ttl` unless another owner holds it (the holder extends
    /// it). The relational stores keep locks in their `locks` table
    /// ([`crate::lock::acquire_in_store`]); Redis keeps them in Redis.
    async fn lock_acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool>;

    /// Releases `key` if `owner` holds it.
    async fn lock_release(&self, key: &str, owner: &str) -> Result<bool>;

    /// Registers `hook`, called after every commit that made jobs ready (pending): enqueued,
    /// promoted from the delayed set, retried or released now, reaped, retried from the failed
    /// store. A broker transport publishes one message per ready job from it. Returns `false`
    /// when this backend keeps no such ledger (the default).
    fn set_dispatch(&self, _hook: DispatchHook) -> bool {
        false
    }

    /// Reserves the given jobs under a lease if they are pending and their queue is not paused
    /// (like [`Queue::reserve`], but by id: the broker chose them). Jobs that are not
    /// pending are left alone and missing from the answer.
    async fn claim(&self, _ids: Vec<JobId>, _lease: Duration, _worker: &str) -> Result<Vec<Job>> {
        Err(BackendError::Other("this backend keeps no dispatch ledger: it cannot claim jobs by id".into()))
    }

    /// Moves due delayed jobs to pending (a bounded number per call) and returns how many; the
    /// dispatch hook hears of them.
    async fn promote_due(&self) -> Result<u64> {
        Ok(0)
    }

    /// A read-only query on the relational store, outside any write transaction (it sees what
    /// is committed). Parameters are `$1`, `$2`, ….
    async fn query(&self, sql: &str, params: Vec<SqlValue>) -> Result<Vec<Row>>;
}

/// A queue kept outside the relational store that holds its ledger (RabbitMQ in front of
/// SQLite or PostgreSQL): it implements [`Queue`] — how jobs move — and the ledger answers
/// everything [`Store`] names.
pub trait Fronts: Queue {
    /// The relational backend that keeps this queue's ledger.
    fn ledger(&self) -> &Arc<dyn QueueBackend>;
}

#[async_trait]
impl<T: Fronts> Store for T {
    async fn holders(&self) -> Result<Vec<String>> {
        self.ledger().holders().await
    }
    async fn expire_leases_of(&self, holders: Vec<String>) -> Result<u64> {
        self.ledger().expire_leases_of(holders).await
    }
    async fn queues(&self) -> Result<Vec<QueueStats>> {
        self.ledger().queues().await
    }
    async fn job(&self, id: JobId) -> Result<Option<JobInfo>> {
        self.ledger().job(id).await
    }
    async fn jobs(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>> {
        self.ledger().jobs(filter, page).await
    }
    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
        self.ledger().failed(queue, page).await
    }
    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>> {
        self.ledger().failed_job(id).await
    }
    async fn failed_since(&self, since: i64) -> Result<u64> {
        self.ledger().failed_since(since).await
    }
    async fn forget_failed(&self, id: JobId) -> Result<bool> {
        self.ledger().forget_failed(id).await
    }
    async fn flush_failed(&self, queue: Option<&str>) -> Result<u64> {
        self.ledger().flush_failed(queue).await
    }
    async fn release_unique(&self, key: &str, holder: JobId) -> Result<()> {
        self.ledger().release_unique(key, holder).await
    }
    async fn metrics(&self, query: MetricsQuery) -> Result<Vec<MetricsRow>> {
        self.ledger().metrics(query).await
    }
    async fn prune(&self, metrics_before: i64) -> Result<()> {
        self.ledger().prune(metrics_before).await
    }
    async fn worker_heartbeat(&self, info: WorkerInfo) -> Result<()> {
        self.ledger().worker_heartbeat(info).await
    }
    async fn worker_gone(&self, id: &str) -> Result<()> {
        self.ledger().worker_gone(id).await
    }
    async fn workers(&self, within: Duration) -> Result<Vec<WorkerInfo>> {
        self.ledger().workers(within).await
    }
    async fn ping(&self) -> Result<()> {
        self.ledger().ping().await
    }
    fn warnings(&self) -> Vec<String> {
        self.ledger().warnings()
    }
    fn shared_state(&self) -> Option<std::sync::Arc<dyn crate::state::SharedState>> {
        self.ledger().shared_state()
    }
    async fn lock_acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.ledger().lock_acquire(key, owner, ttl).await
    }
    async fn lock_release(&self, key: &str, owner: &str) -> Result<bool> {
        self.ledger().lock_release(key, owner).await
    }
    fn set_dispatch(&self, hook: DispatchHook) -> bool {
        self.ledger().set_dispatch(hook)
    }
    async fn claim(&self, ids: Vec<JobId>, lease: Duration, worker: &str) -> Result<Vec<Job>> {
        self.ledger().claim(ids, lease, worker).await
    }
    async fn promote_due(&self) -> Result<u64> {
        self.ledger().promote_due().await
    }
    async fn query(&self, sql: &str, params: Vec<SqlValue>) -> Result<Vec<Row>> {
        self.ledger().query(sql, params).await
    }
}
