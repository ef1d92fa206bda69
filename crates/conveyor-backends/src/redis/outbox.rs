//! The store side of the Redis queue: the outbox of transactional enqueues (`OutboxTx`,
//! `store_tx`, `relay`), the outcome records applied to the store with their marks
//! (`apply_records`, `apply_marked`), and the recovery pass that finishes what a crash left.

use super::*;

/// `Tx` for the store's transactions: SQL goes to the store, enqueues to the outbox, and so do
/// shared-state operations deferred to the commit (`queue_state_outbox`, applied once by id).
pub(super) struct OutboxTx<'a> {
    pub(super) inner: &'a mut dyn Tx,
    pub(super) jobs: Vec<NewJob>,
    pub(super) shared: Arc<RedisState>,
    /// Deferred operations with their outbox ids.
    pub(super) deferred: Vec<(String, Deferred)>,
    /// What to undo if the transaction rolls back (outlives the closure, which an error drops).
    pub(super) rollback: Arc<Mutex<Vec<Deferred>>>,
}

impl TxShared for OutboxTx<'_> {
    fn state(&self) -> Arc<dyn SharedState> {
        self.shared.clone()
    }

    fn after_commit(&mut self, op: Deferred) -> Result<()> {
        let id = format!("s:{}", JobId::new());
        let body = serde_json::to_string(&op).map_err(|e| BackendError::Other(e.to_string()))?;
        self.inner.execute(
            "INSERT INTO queue_state_outbox (id, op, created_at) VALUES ($1, $2, $3)",
            &[SqlValue::Text(id.clone()), SqlValue::Text(body), SqlValue::Int(now_ms())],
        )?;
        self.deferred.push((id, op));
        Ok(())
    }

    fn on_rollback(&mut self, op: Deferred) {
        self.rollback.lock().unwrap_or_else(|e| e.into_inner()).push(op);
    }

    fn z_pending(&self, set: &str, member: &str) -> f64 {
        self.deferred
            .iter()
            .map(|(_, op)| match op {
                Deferred::ZIncr { set: s, member: m, delta } if s == set && m == member => *delta,
                _ => 0.0,
            })
            .sum()
    }
}

impl Tx for OutboxTx<'_> {
    fn execute(&mut self, sql: &str, params: &[SqlValue]) -> Result<u64> {
        self.inner.execute(sql, params)
    }
    fn query(&mut self, sql: &str, params: &[SqlValue]) -> Result<Vec<Row>> {
        self.inner.query(sql, params)
    }
    fn execute_script(&mut self, sql: &str) -> Result<()> {
        self.inner.execute_script(sql)
    }
    fn serialize_migrations(&mut self) -> Result<()> {
        self.inner.serialize_migrations()
    }
    fn for_update(&self) -> &'static str {
        self.inner.for_update()
    }
    fn insert_rows(&mut self, head: &str, rows: &[Vec<SqlValue>], tail: &str) -> Result<Vec<Row>> {
        self.inner.insert_rows(head, rows, tail)
    }
    fn enqueue(&mut self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        let now = now_ms();
        let mut rows = Vec::with_capacity(jobs.len());
        for job in &jobs {
            job.validate().map_err(BackendError::Invalid)?;
            let body = serde_json::to_string(job).map_err(|e| BackendError::Other(e.to_string()))?;
            rows.push(vec![SqlValue::Text(job.id.to_string()), SqlValue::Text(body), SqlValue::Int(now)]);
        }
        insert_many(self.inner, "INSERT INTO queue_outbox (id, job, created_at)", &rows, "")?;
        let out = jobs.iter().map(|j| EnqueueOutcome::Enqueued { id: j.id }).collect();
        self.jobs.extend(jobs);
        Ok(out)
    }
    fn shared_state(&mut self) -> Option<&mut dyn TxShared> {
        Some(self)
    }
}

pub(super) const STORE_TABLES: &str =
    "CREATE TABLE IF NOT EXISTS queue_outbox (id TEXT PRIMARY KEY, job TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS queue_state_outbox (id TEXT PRIMARY KEY, op TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS queue_marks (id TEXT PRIMARY KEY, at BIGINT NOT NULL)";

/// Deletes outbox rows by id, 500 a statement.
pub(super) async fn delete_rows(store: &Arc<dyn QueueBackend>, table: &'static str, ids: Vec<String>) -> Result<()> {
    for chunk in ids.chunks(500) {
        let chunk = chunk.to_vec();
        store
            .transaction(Box::new(move |tx| {
                let marks: Vec<String> = (1..=chunk.len()).map(|i| format!("${i}")).collect();
                let sql = format!("DELETE FROM {table} WHERE id IN ({})", marks.join(", "));
                let params: Vec<SqlValue> = chunk.into_iter().map(SqlValue::Text).collect();
                tx.execute(&sql, &params).map(|n| Box::new(n) as Box<dyn Any + Send>)
            }))
            .await?;
    }
    Ok(())
}

/// Applies records whose mark is not in the store yet, marking them.
pub(super) fn apply_marked(tx: &mut dyn Tx, records: &[(String, Record)]) -> Result<()> {
    let now = now_ms();
    for (mark, rec) in records {
        let fresh = tx.execute(
            "INSERT INTO queue_marks (id, at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
            &[SqlValue::Text(mark.clone()), SqlValue::Int(now)],
        )?;
        if fresh == 1 {
            rec.apply(tx)?;
        }
    }
    Ok(())
}

impl RedisBackend {
    pub(super) async fn ensure_tables(&self) -> Result<()> {
        self.tables
            .get_or_try_init(|| async {
                self.store.transaction(Box::new(|tx| tx.execute_script(STORE_TABLES).map(|_| Box::new(()) as Box<dyn Any + Send>))).await?;
                Ok::<(), BackendError>(())
            })
            .await
            .map(|_| ())
    }

    /// Runs `work` in a store transaction whose enqueues go to the outbox; after the commit the
    /// jobs are relayed to Redis (a failed relay is retried by the reaper pass).
    pub(super) async fn store_tx(&self, work: TxFn) -> Result<Box<dyn Any + Send>> {
        self.ensure_tables().await?;
        let shared = self.shared.clone();
        let rollback = Arc::new(Mutex::new(Vec::new()));
        let undo = rollback.clone();
        let out = self
            .store
            .transaction(Box::new(move |tx| {
                let mut otx = OutboxTx { inner: tx, jobs: Vec::new(), shared, deferred: Vec::new(), rollback: undo };
                let r = work(&mut otx)?;
                Ok(Box::new((r, otx.jobs, otx.deferred)) as Box<dyn Any + Send>)
            }))
            .await;
        let out = match out {
            Ok(out) => out,
            Err(e) => {
                let undo: Vec<Deferred> = std::mem::take(&mut *rollback.lock().unwrap_or_else(|e| e.into_inner()));
                if !undo.is_empty() {
                    let shared = self.shared.clone();
                    let undone = tokio::task::spawn_blocking(move || undo.iter().try_for_each(|op| shared.apply(op))).await;
                    if !matches!(undone, Ok(Ok(()))) {
                        tracing::warn!("giving back rate-limit units of a rolled-back transaction failed");
                    }
                }
                return Err(e);
            }
        };
        let (r, jobs, deferred) = *out
            .downcast::<(Box<dyn Any + Send>, Vec<NewJob>, Vec<(String, Deferred)>)>()
            .expect("the outbox transaction returns its jobs and deferred operations");
        if !jobs.is_empty() {
            if let Err(e) = self.relay(jobs).await {
                tracing::warn!(error = %e, "relaying committed jobs to Redis failed; the reaper pass will relay them");
            }
        }
        if !deferred.is_empty() {
            if let Err(e) = self.apply_deferred(deferred).await {
                tracing::warn!(error = %e, "applying committed shared-state operations failed; the reaper pass will apply them");
            }
        }
        Ok(r)
    }

    /// Applies deferred shared-state operations, each once, then deletes their outbox rows.
    pub(super) async fn apply_deferred(&self, ops: Vec<(String, Deferred)>) -> Result<()> {
        let shared = self.shared.clone();
        let ids: Vec<String> = ops.iter().map(|(id, _)| id.clone()).collect();
        let now = now_ms();
        tokio::task::spawn_blocking(move || shared.apply_once(&ops, now))
            .await
            .map_err(|e| BackendError::Other(format!("shared-state task failed: {e}")))??;
        delete_rows(&self.store, "queue_state_outbox", ids).await
    }

    /// Pushes outbox jobs to Redis, then deletes their rows.
    pub(super) async fn relay(&self, jobs: Vec<NewJob>) -> Result<()> {
        let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
        self.push(jobs, true).await?;
        delete_rows(&self.store, "queue_outbox", ids).await
    }

    /// Applies the store's side of outcome records (`T:h` members), each at most once, then
    /// removes them from Redis. A record whose hooks fail stays for the reaper pass to retry.
    pub(super) async fn apply_records(&self, members: Vec<String>) -> Result<()> {
        if members.is_empty() {
            return Ok(());
        }
        let mut parsed = Vec::with_capacity(members.len());
        for m in &members {
            let Some((seq, json)) = m.split_once('\x1f') else { continue };
            match serde_json::from_str::<Record>(json) {
                Ok(r) => parsed.push((format!("h:{}:{seq}", self.tag), r)),
                Err(e) => tracing::error!(error = %e, record = %m, "an unreadable outcome record is dropped"),
            }
        }
        let all = parsed.clone();
        let whole = self.store_tx(Box::new(move |tx| apply_marked(tx, &all).map(|_| Box::new(()) as Box<dyn Any + Send>))).await;
        let done: Vec<String> = match whole {
            Ok(_) => members,
            Err(e) => {
                // One failing record must not hold the others back.
                tracing::warn!(error = %e, "applying outcome records together failed; applying them one by one");
                let mut done = Vec::new();
                for (m, rec) in members.into_iter().zip(parsed) {
                    let one = vec![rec];
                    match self.store_tx(Box::new(move |tx| apply_marked(tx, &one).map(|_| Box::new(()) as Box<dyn Any + Send>))).await {
                        Ok(_) => done.push(m),
                        Err(e) => tracing::error!(error = %e, "an outcome record's hooks failed; the reaper pass retries it"),
                    }
                }
                done
            }
        };
        if !done.is_empty() {
            self.redis(move |c, tag| redis::cmd("ZREM").arg(format!("{tag}:h")).arg(&done).query::<i64>(c)).await?;
        }
        Ok(())
    }

    /// Relays outbox rows and applies outcome records that their writers left behind (a crash
    /// between the commit and the relay, Redis down at the time).
    pub(super) async fn recover(&self) -> Result<()> {
        self.ensure_tables().await?;
        let before = now_ms() - STALE_MS;
        let rows = self
            .store
            .query("SELECT job FROM queue_outbox WHERE created_at < $1 ORDER BY created_at LIMIT 500", vec![before.into()])
            .await?;
        let jobs: Vec<NewJob> =
            rows.iter().filter_map(|r| r.first().and_then(SqlValue::as_str)).filter_map(|j| serde_json::from_str(j).ok()).collect();
        if !jobs.is_empty() {
            tracing::info!(jobs = jobs.len(), "relaying jobs left in the outbox");
            self.relay(jobs).await?;
        }
        let rows = self
            .store
            .query("SELECT id, op FROM queue_state_outbox WHERE created_at < $1 ORDER BY created_at LIMIT 500", vec![before.into()])
            .await?;
        let ops: Vec<(String, Deferred)> =
            rows.iter().filter_map(|r| Some((r.first()?.as_str()?.to_string(), serde_json::from_str(r.get(1)?.as_str()?).ok()?))).collect();
        if !ops.is_empty() {
            tracing::info!(operations = ops.len(), "applying shared-state operations left in the outbox");
            self.apply_deferred(ops).await?;
        }
        let members: Vec<String> = self
            .redis(move |c, tag| {
                redis::cmd("ZREMRANGEBYSCORE").arg(format!("{tag}:relayed")).arg("-inf").arg(now_ms() - RELAYED_KEEP_MS).query::<i64>(c)?;
                redis::cmd("ZREMRANGEBYSCORE")
                    .arg(format!("{tag}:applied"))
                    .arg("-inf")
                    .arg(now_ms() - state::APPLIED_KEEP_MS)
                    .query::<i64>(c)?;
                redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:h")).arg("-inf").arg(before).arg("LIMIT").arg(0).arg(200).query(c)
            })
            .await?;
        if !members.is_empty() {
            tracing::info!(records = members.len(), "applying outcome hooks left behind");
            self.apply_records(members).await?;
        }
        Ok(())
    }
}
