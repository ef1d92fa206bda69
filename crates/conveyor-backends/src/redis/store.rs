//! The store half of the Redis backend (`conveyor_core::backend::Store`): the jobs' records and
//! pages, the failed store, metrics and the worker registry read from Redis, unique keys,
//! named locks and reservation holders kept there, the shared state, and the relational
//! store's SQL.

use super::*;

#[async_trait]
impl Store for RedisBackend {
    async fn release_unique(&self, key: &str, holder: JobId) -> Result<()> {
        self.script(|s| &s.unique_release, vec![key.to_string(), holder.to_string()]).await.map(|_| ())
    }

    async fn holders(&self) -> Result<Vec<String>> {
        self.lease_holders().await
    }

    async fn expire_leases_of(&self, holders: Vec<String>) -> Result<u64> {
        self.expire_holders(holders).await
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        self.queue_stats().await
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>> {
        let key = id.to_string();
        if let Some((_, raw)) = self.raw(vec![key.clone()]).await?.into_iter().next() {
            let queue = raw.d.as_deref().and_then(Stored::parse).map(|s| s.queue).unwrap_or_default();
            let dk = format!("{}:q:{queue}:d", self.tag);
            let k = key.clone();
            let delayed = self.redis(move |c, _| redis::cmd("ZSCORE").arg(&dk).arg(&k).query::<Option<f64>>(c)).await?.is_some();
            return Ok(raw_info(&key, &raw, delayed));
        }
        // Completed jobs stay in `T:d` while they are in the history, so a job not found is gone.
        Ok(None)
    }

    async fn jobs(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>> {
        self.job_page(filter, page).await
    }

    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
        self.failed_page(queue, page).await
    }

    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>> {
        let found = self.raw(vec![id.to_string()]).await?;
        Ok(found.iter().find_map(|(id, raw)| failed_info(id, raw)))
    }

    async fn failed_since(&self, since: i64) -> Result<u64> {
        let n: i64 = self.redis(move |c, tag| redis::cmd("ZCOUNT").arg(format!("{tag}:failed")).arg(since).arg("+inf").query(c)).await?;
        Ok(n.max(0) as u64)
    }

    async fn forget_failed(&self, id: JobId) -> Result<bool> {
        Ok(int(&self.script(|s| &s.forget_failed, vec![id.to_string()]).await?) == 1)
    }

    async fn flush_failed(&self, queue: Option<&str>) -> Result<u64> {
        let key = self.failed_key(queue);
        in_chunks(|| {
            let key = key.clone();
            async move {
                let ids = self.oldest_failed(key, 5_000).await?;
                if ids.is_empty() {
                    return Ok(0);
                }
                Ok(int(&self.script(|s| &s.forget_failed, ids).await?).max(0) as u64)
            }
        })
        .await
    }

    async fn metrics(&self, query: MetricsQuery) -> Result<Vec<MetricsRow>> {
        self.metric_rows(query).await
    }

    async fn prune(&self, metrics_before: i64) -> Result<()> {
        self.prune_all(metrics_before).await
    }

    async fn worker_heartbeat(&self, info: WorkerInfo) -> Result<()> {
        self.heartbeat(info).await
    }

    async fn worker_gone(&self, id: &str) -> Result<()> {
        let id = id.to_string();
        self.redis(move |c, tag| {
            redis::pipe()
                .cmd("HDEL")
                .arg(format!("{tag}:w"))
                .arg(&id)
                .ignore()
                .cmd("ZREM")
                .arg(format!("{tag}:ws"))
                .arg(&id)
                .ignore()
                .query::<()>(c)
        })
        .await
    }

    async fn workers(&self, within: Duration) -> Result<Vec<WorkerInfo>> {
        self.worker_list(within).await
    }

    async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    fn shared_state(&self) -> Option<Arc<dyn SharedState>> {
        Some(self.shared.clone())
    }

    fn warnings(&self) -> Vec<String> {
        let mut w = self.warnings.clone();
        w.extend(self.store.warnings());
        w
    }

    async fn lock_acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
        // Redis' own clock expires it: no two machines' clocks have to agree.
        let ttl_ms = ttl.as_millis().clamp(1, i64::MAX as u128).to_string();
        let v = self.script(|s| &s.lock_acquire, vec![key.to_string(), owner.to_string(), ttl_ms]).await?;
        Ok(int(&v) == 1)
    }

    async fn lock_release(&self, key: &str, owner: &str) -> Result<bool> {
        let v = self.script(|s| &s.lock_release, vec![key.to_string(), owner.to_string()]).await?;
        Ok(int(&v) == 1)
    }

    async fn query(&self, sql: &str, params: Vec<SqlValue>) -> Result<Vec<Row>> {
        self.store.query(sql, params).await
    }
}
