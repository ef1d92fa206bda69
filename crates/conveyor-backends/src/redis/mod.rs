//! The queue on Redis (`CONVEYOR_QUEUE=redis`), beside a relational store (SQLite or
//! PostgreSQL) that keeps the domain rows, batches, workflows, events and the rest of the engine's
//! tables.
//!
//! - Every queue state change is one Lua script ([`scripts`]): enqueue many, reserve many with
//!   their leases (promoting due delayed jobs first), apply many outcomes, extend leases, reap
//!   expired leases, retry / forget failed jobs, clear. No client-side read-modify-write.
//! - **Transactional enqueue** (`Tx::enqueue` inside [`QueueBackend::transaction`]) writes an
//!   outbox row in the store's transaction; after the commit the jobs are relayed to Redis and
//!   the rows deleted. Rows left by a crash are relayed by the next reaper pass; Redis remembers
//!   relayed ids for ten minutes so a row relayed twice enqueues once.
//! - **Hooks** (batch counters, workflow transitions) belong to the store. An outcome of a job
//!   with hooks is applied in Redis together with an *outcome record* (`T:h`); the store then
//!   runs the hooks in one transaction that also inserts the record's mark into `queue_marks`
//!   (so a record applied twice counts once) and the record is removed. Records left by a crash
//!   are applied by the next reaper pass.
//! - **Transactional completion** (`complete_with`): the work, the hooks and a mark
//!   `c:<job id>` commit in one store transaction, then the job is acknowledged in Redis. A job
//!   whose mark exists is acknowledged without running the work again, so its effect happens
//!   once even if the acknowledgement was lost.

mod conn;
mod durability;
mod scripts;
mod state;
pub mod testing;

pub use state::RedisState;

use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use std::time::Duration;

use async_trait::async_trait;
use redis::{Script, Value};
use serde::{Deserialize, Serialize};
use tokio::sync::OnceCell;

use conveyor_core::backend::{
    in_chunks, insert_many, BackendError, Cause, Cursor, FailedJob, JobFilter, MetricsQuery, Page, Paged, QueueBackend, QueueStats,
    ReserveRequest, Result, Row, SqlValue, Tx, TxFn, WorkerInfo,
};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{payload_value, Backoff, Completion, EnqueueOutcome, Job, JobId, JobInfo, JobState, NewJob, Outcome};
use conveyor_core::metrics::{last_minute_rates, minute_of, MetricsAccumulator, MetricsRow, BUCKETS};
use conveyor_core::state::{Deferred, SharedState, TxShared};
use conveyor_core::wakeup::Wakeup;

use conn::{int, items, pairs, text, Pool};

/// How the Redis queue is opened.
#[derive(Clone, Debug)]
pub struct RedisOptions {
    /// `redis://[:password@]host:port[/db]`.
    pub url: String,
    /// Every key starts with `{prefix}:` (the braces make it a Redis Cluster hash tag; a prefix
    /// that already has braces is used as it is).
    pub prefix: String,
    /// Completed jobs kept for the dashboard (0 keeps none).
    pub completed_history: usize,
}

impl RedisOptions {
    pub fn new(url: impl Into<String>) -> Self {
        RedisOptions { url: url.into(), prefix: "conveyor".into(), completed_history: 1_000 }
    }
}

/// Members scanned per state when the admin listing filters by kind, tag or batch.
const SCAN_CAP: isize = 10_000;
/// Outcome records and outbox rows older than this are taken over by the reaper pass.
const STALE_MS: i64 = 5_000;
/// How long Redis remembers a relayed outbox id.
const RELAYED_KEEP_MS: i64 = 600_000;
/// How long the store keeps marks of applied records and completions.
const MARKS_KEEP_MS: i64 = 7 * 86_400_000;

struct Scripts {
    enqueue: Script,
    reserve: Script,
    complete: Script,
    holds: Script,
    extend: Script,
    reap: Script,
    retry_failed: Script,
    forget_failed: Script,
    clear: Script,
    metrics: Script,
    lock_acquire: Script,
    lock_release: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    enqueue: Script::new(&scripts::enqueue()),
    reserve: Script::new(&scripts::reserve()),
    complete: Script::new(&scripts::complete()),
    holds: Script::new(&scripts::holds()),
    extend: Script::new(&scripts::extend()),
    reap: Script::new(&scripts::reap()),
    retry_failed: Script::new(&scripts::retry_failed()),
    forget_failed: Script::new(&scripts::forget_failed()),
    clear: Script::new(&scripts::clear()),
    metrics: Script::new(&scripts::metrics()),
    lock_acquire: Script::new(&scripts::lock_acquire()),
    lock_release: Script::new(&scripts::lock_release()),
});

/// Most jobs one script call takes (Lua's `unpack` takes at most 8,000 values).
const PER_CALL: usize = 1_000;

/// A job's immutable part as stored in `T:d` (see [`scripts`] for the packing).
struct Stored {
    queue: String,
    priority: i32,
    max_attempts: u32,
    created_at: i64,
    unique: Option<String>,
    data: Data,
}

impl Stored {
    fn pack(job: &NewJob, now: i64) -> Result<String> {
        let data = Data {
            k: job.kind.clone(),
            p: job.payload.clone(),
            b: job.backoff.clone(),
            to: job.timeout.map(|t| t.as_millis() as u64),
            tg: job.tags.clone(),
            bt: job.batch_id.clone(),
            wf: job.workflow.clone(),
        };
        let json = serde_json::to_string(&data).map_err(|e| BackendError::Other(e.to_string()))?;
        let unique = job.unique.as_ref().map_or("", |u| u.key.as_str());
        if unique.contains('\x1f') {
            return Err(BackendError::Invalid("a unique key may not contain U+001F".into()));
        }
        let hooks = if job.batch_id.is_some() || job.workflow.is_some() { "1" } else { "" };
        Ok(format!("{}\x1f{}\x1f{}\x1f{now}\x1f{unique}\x1f{hooks}\x1f{json}", job.queue, -(job.priority as i64), job.max_attempts))
    }

    fn parse(d: &str) -> Option<Stored> {
        let f: Vec<&str> = d.splitn(7, '\x1f').collect();
        if f.len() != 7 {
            return None;
        }
        Some(Stored {
            queue: f[0].to_string(),
            priority: -f[1].parse::<i64>().unwrap_or(0) as i32,
            max_attempts: f[2].parse().unwrap_or(0),
            created_at: f[3].parse().unwrap_or(0),
            unique: Some(f[4].to_string()).filter(|u| !u.is_empty()),
            data: Data::parse(f[6]),
        })
    }
}

/// A job's mutable part as stored in `T:s`: attempts, available at, lease token (empty unless
/// reserved), reserved at, worker, and for a completed job in the history: finished at,
/// runtime, wait.
#[derive(Default)]
struct State {
    attempts: u32,
    available_at: i64,
    token: String,
    reserved_at: i64,
    worker: String,
    /// Finished at, runtime and wait of a completed job.
    completed: Option<(i64, u64, u64)>,
}

impl State {
    /// The state of a job from its `T:s` field; a job without one was never reserved and
    /// became available when it was created.
    fn of(s: Option<&str>, stored: &Stored) -> State {
        match s {
            Some(s) => {
                let mut st = State::parse(s);
                // A job reserved for the first time keeps an empty available time.
                if s.split('\x1f').nth(1).is_none_or(str::is_empty) {
                    st.available_at = stored.created_at;
                }
                st
            }
            None => State { available_at: stored.created_at, ..State::default() },
        }
    }

    fn parse(s: &str) -> State {
        let f: Vec<&str> = s.split('\x1f').collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).map_or(0, |v| v as i64);
        State {
            attempts: n(0) as u32,
            available_at: n(1),
            token: f.get(2).unwrap_or(&"").to_string(),
            reserved_at: n(3),
            worker: f.get(4).unwrap_or(&"").to_string(),
            completed: (f.len() >= 8).then(|| (n(5), n(6).max(0) as u64, n(7).max(0) as u64)),
        }
    }
}

/// Everything Redis holds about one job.
struct Raw {
    d: Option<String>,
    s: Option<String>,
    error: Option<String>,
    /// `failed at` and runtime, for failed jobs.
    x: Option<String>,
}

/// The part of a job that never changes, stored as compact JSON in its hash's `d` field.
#[derive(Serialize, Deserialize, Default)]
struct Data {
    k: String,
    p: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    b: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    to: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    tg: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    wf: Option<String>,
}

impl Data {
    fn parse(d: &str) -> Data {
        serde_json::from_str(d).unwrap_or_default()
    }
}

/// An applied outcome waiting for the store's hooks (the JSON the scripts store in `T:h`).
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Record {
    id: String,
    queue: String,
    data: String,
    /// `completed`, `retry`, `failed` or `failed_retry` (a failed job put back on its queue).
    outcome: String,
    at: i64,
    error: String,
    wait_ms: u64,
    runtime_ms: u64,
}

impl Record {
    fn of(c: &Completion, data: String) -> Option<Record> {
        let (outcome, at, error) = match &c.outcome {
            Outcome::Completed => ("completed", 0, String::new()),
            Outcome::Retry { at, error } => ("retry", *at, error.clone()),
            Outcome::Failed { error } => ("failed", 0, error.clone()),
            Outcome::Release { .. } => return None,
        };
        Some(Record {
            id: c.id.to_string(),
            queue: c.queue.clone(),
            data,
            outcome: outcome.into(),
            at,
            error,
            wait_ms: c.wait_ms,
            runtime_ms: c.runtime_ms,
        })
    }

    /// Runs the store's side of this outcome.
    fn apply(&self, tx: &mut dyn Tx) -> Result<()> {
        let d = Data::parse(&self.data);
        if self.outcome == "failed_retry" {
            return match &d.bt {
                Some(batch) => conveyor_core::hooks::after_failed_retry(tx, batch),
                None => Ok(()),
            };
        }
        let outcome = match self.outcome.as_str() {
            "completed" => Outcome::Completed,
            "retry" => Outcome::Retry { at: self.at, error: self.error.clone() },
            _ => Outcome::Failed { error: self.error.clone() },
        };
        let c = Completion {
            id: self.id.parse().map_err(|e| BackendError::Other(format!("outcome record with a bad id: {e}")))?,
            lease_token: 0,
            queue: self.queue.clone(),
            kind: d.k,
            unique_key: None,
            batch_id: d.bt,
            workflow: d.wf,
            outcome,
            wait_ms: self.wait_ms,
            runtime_ms: self.runtime_ms,
        };
        conveyor_core::hooks::after_outcome(tx, &c)
    }
}

/// `Tx` for the store's transactions: SQL goes to the store, enqueues to the outbox, and so do
/// shared-state operations deferred to the commit (`queue_state_outbox`, applied once by id).
struct OutboxTx<'a> {
    inner: &'a mut dyn Tx,
    jobs: Vec<NewJob>,
    shared: Arc<RedisState>,
    /// Deferred operations with their outbox ids.
    deferred: Vec<(String, Deferred)>,
    /// What to undo if the transaction rolls back (outlives the closure, which an error drops).
    rollback: Arc<Mutex<Vec<Deferred>>>,
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

const STORE_TABLES: &str = "CREATE TABLE IF NOT EXISTS queue_outbox (id TEXT PRIMARY KEY, job TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS queue_state_outbox (id TEXT PRIMARY KEY, op TEXT NOT NULL, created_at BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS queue_marks (id TEXT PRIMARY KEY, at BIGINT NOT NULL)";

pub struct RedisBackend {
    pool: Arc<Pool>,
    store: Arc<dyn QueueBackend>,
    /// `{prefix}`: the first part of every key.
    tag: String,
    history: usize,
    wakeup: Arc<Wakeup>,
    tables: OnceCell<()>,
    /// Metrics writes under way (each holds a read guard); `metrics()` takes the write guard
    /// first, so a caller reads the metrics of every completion it has seen acknowledged.
    metrics_writes: Arc<tokio::sync::RwLock<()>>,
    /// The cache, sorted sets, rate limiters and breakers (see `state`).
    shared: Arc<RedisState>,
    /// What [`durability::judge`] found at open.
    warnings: Vec<String>,
}

impl RedisBackend {
    /// Connects to Redis (failing at once when it does not answer) and puts the queue there;
    /// `store` keeps everything relational.
    pub fn open(options: RedisOptions, store: Arc<dyn QueueBackend>) -> Result<Self> {
        let pool = Arc::new(Pool::new(&options.url)?);
        pool.with(|c| redis::cmd("PING").query::<String>(c))
            .map_err(|e| BackendError::Unavailable(Cause::new(format!("cannot reach Redis at {}: {e}", pool.shown)).with_source(e)))?;
        let settings = pool.with(durability::read)?;
        let warnings = durability::judge(&settings, &pool.shown)?;
        for w in &warnings {
            tracing::warn!(warning = %w, "Redis is not set up to keep the queue safely");
        }
        let tag = tag_of(&options.prefix);
        let wakeup = Arc::new(Wakeup::default());
        conn::spawn_subscriber(pool.client(), format!("{tag}:wake"), Arc::downgrade(&wakeup));
        let shared = Arc::new(RedisState::new(pool.clone(), tag.clone()));
        Ok(RedisBackend {
            pool,
            store,
            tag,
            history: options.completed_history,
            wakeup,
            tables: OnceCell::new(),
            metrics_writes: Arc::new(tokio::sync::RwLock::new(())),
            shared,
            warnings,
        })
    }

    /// The relational store beside the queue.
    pub fn store(&self) -> &Arc<dyn QueueBackend> {
        &self.store
    }

    /// Runs `f` with a pooled connection on a blocking thread.
    async fn redis<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnMut(&mut redis::Connection, &str) -> redis::RedisResult<R> + Send + 'static,
    {
        on_pool(self.pool.clone(), self.tag.clone(), f).await
    }

    /// Runs one script with `args` after the tag.
    async fn script(&self, pick: fn(&Scripts) -> &Script, args: Vec<String>) -> Result<Value> {
        run_script(self.pool.clone(), self.tag.clone(), pick, args).await
    }

    async fn ensure_tables(&self) -> Result<()> {
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
    async fn store_tx(&self, work: TxFn) -> Result<Box<dyn Any + Send>> {
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
    async fn apply_deferred(&self, ops: Vec<(String, Deferred)>) -> Result<()> {
        let shared = self.shared.clone();
        let ids: Vec<String> = ops.iter().map(|(id, _)| id.clone()).collect();
        let now = now_ms();
        tokio::task::spawn_blocking(move || shared.apply_once(&ops, now))
            .await
            .map_err(|e| BackendError::Other(format!("shared-state task failed: {e}")))??;
        delete_rows(&self.store, "queue_state_outbox", ids).await
    }

    /// Pushes outbox jobs to Redis, then deletes their rows.
    async fn relay(&self, jobs: Vec<NewJob>) -> Result<()> {
        let ids: Vec<String> = jobs.iter().map(|j| j.id.to_string()).collect();
        self.push(jobs, true).await?;
        delete_rows(&self.store, "queue_outbox", ids).await
    }

    /// Enqueues jobs that need no check (no unique key, not from the outbox) in one MULTI: a
    /// variadic HSET of their data, a ZADD per queue and set, the queue names and a wake-up.
    /// A job available from its creation on gets no state field (see `State::of`); one with
    /// a `run_at` gets its own available time.
    /// Returns whether any job is ready now.
    async fn push_plain(&self, chunk: &[NewJob], now: i64) -> Result<bool> {
        let mut data = Vec::with_capacity(chunk.len() * 2);
        let mut states = Vec::new();
        let mut sets: Vec<(String, Vec<(i64, String)>)> = Vec::new();
        let mut queues: Vec<String> = Vec::new();
        let mut ready_any = false;
        for job in chunk {
            job.validate().map_err(BackendError::Invalid)?;
            let id = job.id.to_string();
            let av = job.run_at.unwrap_or(now);
            let ready = av <= now;
            ready_any |= ready;
            let set = format!("{}:q:{}:{}", self.tag, job.queue, if ready { "r" } else { "d" });
            let member = (if ready { -(job.priority as i64) } else { av }, id.clone());
            match sets.iter_mut().find(|(k, _)| *k == set) {
                Some((_, m)) => m.push(member),
                None => sets.push((set, vec![member])),
            }
            if !queues.contains(&job.queue) {
                queues.push(job.queue.clone());
            }
            if av != now {
                states.push(id.clone());
                states.push(format!("0\x1f{av}\x1f\x1f\x1f"));
            }
            data.push(id);
            data.push(Stored::pack(job, now)?);
        }
        self.redis(move |c, tag| {
            let mut p = redis::pipe();
            p.atomic();
            p.cmd("HSET").arg(format!("{tag}:d")).arg(&data).ignore();
            if !states.is_empty() {
                p.cmd("HSET").arg(format!("{tag}:s")).arg(&states).ignore();
            }
            for (set, members) in &sets {
                p.cmd("ZADD").arg(set).arg(members).ignore();
            }
            p.cmd("SADD").arg(format!("{tag}:queues")).arg(&queues).ignore();
            if ready_any {
                p.cmd("PUBLISH").arg(format!("{tag}:wake")).arg("1").ignore();
            }
            p.query::<()>(c)
        })
        .await?;
        Ok(ready_any)
    }

    /// The enqueue script over `jobs`.
    async fn push(&self, jobs: Vec<NewJob>, relayed: bool) -> Result<Vec<EnqueueOutcome>> {
        let now = now_ms();
        let mut out = Vec::with_capacity(jobs.len());
        let mut ready_any = false;
        for chunk in jobs.chunks(PER_CALL) {
            if !relayed && chunk.iter().all(|j| j.unique.is_none()) {
                ready_any |= self.push_plain(chunk, now).await?;
                out.extend(chunk.iter().map(|j| EnqueueOutcome::Enqueued { id: j.id }));
                continue;
            }
            let mut args = Vec::with_capacity(1 + chunk.len() * 10);
            args.push(now.to_string());
            for job in chunk {
                job.validate().map_err(BackendError::Invalid)?;
                let av = job.run_at.unwrap_or(now);
                args.push(job.id.to_string());
                args.push(job.queue.clone());
                args.push((-(job.priority as i64)).to_string());
                args.push(Stored::pack(job, now)?);
                args.push(if av == now { String::new() } else { format!("0\x1f{av}\x1f\x1f\x1f") });
                args.push(if av <= now { "1" } else { "" }.into());
                args.push(av.to_string());
                match &job.unique {
                    Some(u) => {
                        args.push(u.key.clone());
                        args.push(u.ttl.as_millis().max(1).to_string());
                    }
                    None => {
                        args.push(String::new());
                        args.push("0".into());
                    }
                }
                args.push(if relayed { "1" } else { "" }.into());
            }
            let res = items(self.script(|s| &s.enqueue, args).await?);
            for (job, r) in chunk.iter().zip(res) {
                let holder = text(&r);
                if holder.is_empty() {
                    ready_any |= job.run_at.is_none_or(|t| t <= now);
                    out.push(EnqueueOutcome::Enqueued { id: job.id });
                } else {
                    out.push(EnqueueOutcome::Duplicate { existing: holder.parse().unwrap_or(job.id) });
                }
            }
        }
        if ready_any {
            self.wakeup.wake();
        }
        Ok(out)
    }

    /// Applies the store's side of outcome records (`T:h` members), each at most once, then
    /// removes them from Redis. A record whose hooks fail stays for the reaper pass to retry.
    async fn apply_records(&self, members: Vec<String>) -> Result<()> {
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

    /// Adds the applied completions to the per-minute metrics; `detached`: in a task of its
    /// own, so that acknowledging the next batch need not wait for it (see `metrics_writes`).
    async fn record_metrics(&self, applied: Vec<&Completion>, now: i64, detached: bool) {
        if applied.is_empty() {
            return;
        }
        let mut acc = MetricsAccumulator::default();
        for c in applied {
            acc.record(minute_of(now), c);
        }
        let mut args = Vec::new();
        for row in acc.drain() {
            let mut cols: Vec<(String, u64)> = vec![
                ("c".into(), row.completed),
                ("r".into(), row.retried),
                ("f".into(), row.failed),
                ("rs".into(), row.runtime_sum_ms),
                ("ws".into(), row.wait_sum_ms),
            ];
            for i in 0..BUCKETS {
                cols.push((format!("rh{i}"), row.runtime_hist[i]));
                cols.push((format!("wh{i}"), row.wait_hist[i]));
            }
            cols.retain(|(_, n)| *n > 0);
            args.push(row.minute.to_string());
            args.push(row.queue);
            args.push(row.kind);
            args.push(row.runtime_max_ms.to_string());
            args.push(cols.len().to_string());
            for (col, n) in cols {
                args.push(col);
                args.push(n.to_string());
            }
        }
        if !detached {
            if let Err(e) = self.script(|s| &s.metrics, args).await {
                tracing::warn!(error = %e, "recording job metrics in Redis failed");
            }
            return;
        }
        let writing = self.metrics_writes.clone().read_owned().await;
        let (pool, tag) = (self.pool.clone(), self.tag.clone());
        tokio::spawn(async move {
            if let Err(e) = run_script(pool, tag, |s| &s.metrics, args).await {
                tracing::warn!(error = %e, "recording job metrics in Redis failed");
            }
            drop(writing);
        });
    }

    /// The completion script; returns which completions applied.
    async fn apply_outcomes(&self, completions: &[Completion], records: bool) -> Result<Vec<bool>> {
        let mut flags = Vec::with_capacity(completions.len());
        for chunk in completions.chunks(PER_CALL) {
            flags.extend(self.apply_chunk(chunk, records).await?);
        }
        Ok(flags)
    }

    async fn apply_chunk(&self, completions: &[Completion], records: bool) -> Result<Vec<bool>> {
        let now = now_ms();
        let mut args = Vec::with_capacity(2 + completions.len() * 10);
        args.push(now.to_string());
        args.push(self.history.to_string());
        for c in completions {
            let (kind, at, error) = match &c.outcome {
                Outcome::Completed => ("c", 0, ""),
                Outcome::Retry { at, error } => ("r", *at, error.as_str()),
                Outcome::Failed { error } => ("f", 0, error.as_str()),
                Outcome::Release { at } => ("l", *at, ""),
            };
            args.push(c.id.to_string());
            args.push(c.lease_token.to_string());
            args.push(kind.into());
            args.push(at.to_string());
            args.push(error.into());
            let record = if records && conveyor_core::hooks::wants(c) {
                let data = Data { k: c.kind.clone(), bt: c.batch_id.clone(), wf: c.workflow.clone(), ..Default::default() };
                let data = serde_json::to_string(&data).map_err(|e| BackendError::Other(e.to_string()))?;
                Record::of(c, data).map(|r| serde_json::to_string(&r).expect("a record serializes"))
            } else {
                None
            };
            args.push(record.unwrap_or_default());
            args.push(c.runtime_ms.to_string());
            args.push(c.wait_ms.to_string());
            args.push(c.queue.clone());
            args.push(c.unique_key.clone().unwrap_or_default());
        }
        let mut res = items(self.script(|s| &s.complete, args).await?).into_iter();
        let mut flags = vec![true; completions.len()];
        for at in res.next().map(items).unwrap_or_default() {
            if let Some(f) = usize::try_from(int(&at) - 1).ok().and_then(|i| flags.get_mut(i)) {
                *f = false;
            }
        }
        let members: Vec<String> = res.next().map(items).unwrap_or_default().iter().map(text).collect();
        if completions.iter().zip(&flags).any(|(c, f)| *f && matches!(c.outcome, Outcome::Retry { .. } | Outcome::Release { .. })) {
            self.wakeup.wake();
        }
        if let Err(e) = self.apply_records(members).await {
            tracing::warn!(error = %e, "outcome hooks are left for the reaper pass");
        }
        self.record_metrics(completions.iter().zip(&flags).filter(|(_, f)| **f).map(|(c, _)| c).collect(), now, true).await;
        Ok(flags)
    }

    /// Relays outbox rows and applies outcome records that their writers left behind (a crash
    /// between the commit and the relay, Redis down at the time).
    async fn recover(&self) -> Result<()> {
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

    /// The failed store's index: of one queue, or of all.
    fn failed_key(&self, queue: Option<&str>) -> String {
        match queue {
            Some(q) => format!("{}:q:{q}:f", self.tag),
            None => format!("{}:failed", self.tag),
        }
    }

    /// The oldest `n` ids of a failed-store index.
    async fn oldest_failed(&self, key: String, n: isize) -> Result<Vec<String>> {
        self.redis(move |c, _| redis::cmd("ZRANGE").arg(&key).arg(0).arg(n - 1).query(c)).await
    }

    async fn queue_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .redis(|c, tag| {
                let mut all: Vec<String> = redis::cmd("SMEMBERS").arg(format!("{tag}:queues")).query(c)?;
                let paused: Vec<String> = redis::cmd("SMEMBERS").arg(format!("{tag}:paused")).query(c)?;
                all.extend(paused);
                Ok(all)
            })
            .await?;
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// What Redis holds about each job (pipelined, 500 at a time); ids that are gone are dropped.
    async fn raw(&self, ids: Vec<String>) -> Result<Vec<(String, Raw)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.redis(move |c, tag| {
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(500) {
                let mut p = redis::pipe();
                for h in ["d", "s", "e", "x"] {
                    p.cmd("HMGET").arg(format!("{tag}:{h}")).arg(chunk);
                }
                let replies: Vec<Vec<Option<String>>> = p.query(c)?;
                for (i, id) in chunk.iter().enumerate() {
                    let at = |h: usize| replies.get(h).and_then(|r| r.get(i)).cloned().flatten();
                    if at(0).is_some() {
                        out.push((id.clone(), Raw { d: at(0), s: at(1), error: at(2), x: at(3) }));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// The completed history (newest first).
    async fn history(&self) -> Result<Vec<JobInfo>> {
        let ids: Vec<String> = self.redis(|c, tag| redis::cmd("LRANGE").arg(format!("{tag}:done")).arg(0).arg(-1).query(c)).await?;
        let found = self.raw(ids).await?;
        Ok(found.iter().filter_map(|(id, raw)| raw_info(id, raw, false)).filter(|j| j.state == JobState::Completed).collect())
    }
}

/// Deletes outbox rows by id, 500 a statement.
async fn delete_rows(store: &Arc<dyn QueueBackend>, table: &'static str, ids: Vec<String>) -> Result<()> {
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

/// Runs `f` with a connection of `pool` on a blocking thread.
async fn on_pool<R, F>(pool: Arc<Pool>, tag: String, mut f: F) -> Result<R>
where
    R: Send + 'static,
    F: FnMut(&mut redis::Connection, &str) -> redis::RedisResult<R> + Send + 'static,
{
    tokio::task::spawn_blocking(move || pool.with(|c| f(c, &tag)))
        .await
        .map_err(|e| BackendError::Other(format!("Redis task failed: {e}")))?
}

/// Runs one script with the tag and `args`, naming `T:queues` as its key so that Redis Cluster
/// routes it to the tag's slot.
async fn run_script(pool: Arc<Pool>, tag: String, pick: fn(&Scripts) -> &Script, args: Vec<String>) -> Result<Value> {
    let key = format!("{tag}:queues");
    on_pool(pool, tag, move |c, tag| {
        let mut inv = pick(&SCRIPTS).key(&key);
        inv.arg(tag);
        for a in &args {
            inv.arg(a);
        }
        inv.invoke::<Value>(c)
    })
    .await
}

/// Applies records whose mark is not in the store yet, marking them.
fn apply_marked(tx: &mut dyn Tx, records: &[(String, Record)]) -> Result<()> {
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

/// A job as the admin API shows it; `delayed` tells a waiting job that is not due yet.
fn raw_info(id: &str, raw: &Raw, delayed: bool) -> Option<JobInfo> {
    let stored = Stored::parse(raw.d.as_deref()?)?;
    let st = State::of(raw.s.as_deref(), &stored);
    let failed = raw.x.as_deref().map(failed_at);
    let state = match (&failed, st.completed, st.token.is_empty()) {
        (Some(_), _, _) => JobState::Failed,
        (None, Some(_), _) => JobState::Completed,
        (None, None, false) => JobState::Reserved,
        _ if delayed => JobState::Delayed,
        _ => JobState::Pending,
    };
    let ran = matches!(state, JobState::Reserved | JobState::Completed);
    let (finished_at, runtime_ms, wait_ms) = match (failed, st.completed) {
        (Some((at, rt)), _) => (Some(at), Some(rt), None),
        (None, Some((at, rt, wt))) => (Some(at), Some(rt), Some(wt)),
        _ => (None, None, None),
    };
    Some(JobInfo {
        id: id.parse().ok()?,
        queue: stored.queue,
        kind: stored.data.k,
        state,
        payload: payload_value(&stored.data.p),
        attempts: st.attempts,
        max_attempts: stored.max_attempts,
        priority: stored.priority,
        tags: stored.data.tg,
        unique_key: stored.unique.filter(|_| state != JobState::Completed),
        batch_id: stored.data.bt,
        error: raw.error.clone().filter(|_| state != JobState::Completed),
        created_at: stored.created_at,
        available_at: (state != JobState::Completed).then_some(st.available_at),
        reserved_at: ran.then_some(st.reserved_at),
        finished_at,
        runtime_ms,
        wait_ms,
        worker: ran.then_some(st.worker).filter(|w| !w.is_empty()),
    })
}

/// `failed at` and runtime of a failed job (`T:x`).
fn failed_at(x: &str) -> (i64, u64) {
    let (at, rt) = x.split_once('\x1f').unwrap_or((x, "0"));
    (at.parse().unwrap_or(0), rt.parse::<f64>().map_or(0, |v| v.max(0.0) as u64))
}

fn failed_info(id: &str, raw: &Raw) -> Option<FailedJob> {
    let (failed_at, runtime_ms) = failed_at(raw.x.as_deref()?);
    let stored = Stored::parse(raw.d.as_deref()?)?;
    let st = State::of(raw.s.as_deref(), &stored);
    Some(FailedJob {
        id: id.parse().ok()?,
        queue: stored.queue,
        kind: stored.data.k,
        payload: payload_value(&stored.data.p),
        attempts: st.attempts,
        max_attempts: stored.max_attempts,
        error: raw.error.clone().unwrap_or_default(),
        tags: stored.data.tg,
        batch_id: stored.data.bt,
        created_at: stored.created_at,
        failed_at,
        runtime_ms,
    })
}

fn matches(j: &JobInfo, f: &JobFilter) -> bool {
    f.kind.as_ref().is_none_or(|k| &j.kind == k)
        && f.tag.as_ref().is_none_or(|t| j.tags.contains(t))
        && f.batch_id.as_ref().is_none_or(|b| j.batch_id.as_ref() == Some(b))
        && f.queue.as_ref().is_none_or(|q| &j.queue == q)
}

#[async_trait]
impl QueueBackend for RedisBackend {
    fn name(&self) -> &'static str {
        "redis"
    }

    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        if jobs.is_empty() {
            return Ok(Vec::new());
        }
        // One script call per few thousand jobs keeps each call short for the other clients.
        let mut out = Vec::with_capacity(jobs.len());
        let mut jobs = jobs.into_iter().peekable();
        while jobs.peek().is_some() {
            let chunk: Vec<NewJob> = jobs.by_ref().take(2_000).collect();
            out.extend(self.push(chunk, false).await?);
        }
        Ok(out)
    }

    async fn reserve(&self, req: ReserveRequest) -> Result<Vec<Job>> {
        if req.max == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        let now = now_ms();
        let token: i64 = rand::random::<i64>() & i64::MAX;
        let max = req.max.min(PER_CALL);
        let mut args =
            vec![now.to_string(), (now + req.lease.as_millis() as i64).to_string(), token.to_string(), req.worker.clone(), max.to_string()];
        args.extend(req.queues.iter().cloned());
        let res = items(self.script(|s| &s.reserve, args).await?);
        let mut jobs = Vec::with_capacity(res.len() / 4);
        for v in res.chunks_exact(4) {
            let Ok(id) = text(&v[0]).parse::<JobId>() else { continue };
            let Some(stored) = Stored::parse(&text(&v[3])) else { continue };
            let available_at = if text(&v[2]).is_empty() { stored.created_at } else { int(&v[2]) };
            let d = stored.data;
            jobs.push(Job {
                id,
                queue: stored.queue,
                kind: d.k,
                payload: d.p,
                attempt: int(&v[1]) as u32,
                max_attempts: stored.max_attempts,
                backoff: d.b,
                timeout: d.to.map(Duration::from_millis),
                priority: stored.priority,
                tags: d.tg,
                unique_key: stored.unique,
                batch_id: d.bt,
                workflow: d.wf,
                created_at: stored.created_at,
                available_at,
                reserved_at: now,
                lease_token: token,
            });
        }
        Ok(jobs)
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<()> {
        if completions.is_empty() {
            return Ok(());
        }
        self.apply_outcomes(&completions, true).await.map(|_| ())
    }

    async fn complete_with(&self, completion: Completion, work: TxFn) -> Result<Box<dyn Any + Send>> {
        let id = completion.id;
        let args = vec![id.to_string(), completion.lease_token.to_string()];
        if int(&self.script(|s| &s.holds, args).await?) != 1 {
            return Err(BackendError::LeaseLost(id));
        }
        let c = completion.clone();
        let out = self
            .store_tx(Box::new(move |tx| {
                let fresh = tx.execute(
                    "INSERT INTO queue_marks (id, at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                    &[SqlValue::Text(format!("c:{}", c.id)), SqlValue::Int(now_ms())],
                )?;
                if fresh == 0 {
                    // Committed by an earlier attempt whose acknowledgement was lost.
                    return Ok(Box::new(None::<Box<dyn Any + Send>>) as Box<dyn Any + Send>);
                }
                let out = work(tx)?;
                if conveyor_core::hooks::wants(&c) {
                    conveyor_core::hooks::after_outcome(tx, &c)?;
                }
                Ok(Box::new(Some(out)) as Box<dyn Any + Send>)
            }))
            .await?;
        let out = *out.downcast::<Option<Box<dyn Any + Send>>>().expect("complete_with's transaction returns an option");
        // The effect is committed; the acknowledgement follows. If it is lost, the job runs
        // again after its lease and is acknowledged then without a second effect.
        if let Err(e) = self.apply_outcomes(std::slice::from_ref(&completion), false).await {
            tracing::warn!(error = %e, job = %id, "acknowledging a committed job in Redis failed; it is acknowledged when it comes back");
        }
        out.ok_or(BackendError::LeaseLost(id))
    }

    async fn extend_leases(&self, leases: Vec<(JobId, i64)>, lease: Duration) -> Result<()> {
        if leases.is_empty() {
            return Ok(());
        }
        for chunk in leases.chunks(PER_CALL) {
            let mut args = vec![(now_ms() + lease.as_millis() as i64).to_string()];
            for (id, token) in chunk {
                args.push(id.to_string());
                args.push(token.to_string());
            }
            self.script(|s| &s.extend, args).await?;
        }
        Ok(())
    }

    async fn reap_expired(&self) -> Result<u64> {
        let now = now_ms();
        let res = items(self.script(|s| &s.reap, vec![now.to_string(), "1000".into()]).await?);
        let mut res = res.into_iter();
        let reaped: Vec<Vec<Value>> = res.next().map(items).unwrap_or_default().into_iter().map(items).collect();
        let members: Vec<String> = res.next().map(items).unwrap_or_default().iter().map(text).collect();
        if let Err(e) = self.apply_records(members).await {
            tracing::warn!(error = %e, "outcome hooks of reclaimed jobs are left for the next pass");
        }
        let completions: Vec<Completion> = reaped
            .iter()
            .filter(|v| v.len() >= 6)
            .map(|v| {
                let d = Data::parse(&text(&v[2]));
                let outcome = if text(&v[3]) == "failed" {
                    Outcome::Failed { error: String::new() }
                } else {
                    Outcome::Retry { at: now, error: String::new() }
                };
                Completion {
                    id: text(&v[0]).parse().unwrap_or_default(),
                    lease_token: 0,
                    queue: text(&v[1]),
                    kind: d.k,
                    unique_key: None,
                    batch_id: None,
                    workflow: None,
                    outcome,
                    wait_ms: int(&v[4]).max(0) as u64,
                    runtime_ms: int(&v[5]).max(0) as u64,
                }
            })
            .collect();
        if completions.iter().any(|c| matches!(c.outcome, Outcome::Retry { .. })) {
            self.wakeup.wake();
        }
        self.record_metrics(completions.iter().collect(), now, false).await;
        if let Err(e) = self.recover().await {
            tracing::warn!(error = %e, "relaying the outbox / outcome records failed; retried on the next pass");
        }
        Ok(completions.len() as u64)
    }

    fn wakeup(&self) -> Arc<Wakeup> {
        self.wakeup.clone()
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        let names = self.queue_names().await?;
        let now = now_ms();
        let minute = minute_of(now);
        let stats_names = names.clone();
        let (stats, minutes): (Vec<(Vec<i64>, bool, Option<i64>)>, Vec<Vec<(String, Value)>>) = self
            .redis(move |c, tag| {
                let mut p = redis::pipe();
                for q in &stats_names {
                    let qk = format!("{tag}:q:{q}");
                    p.cmd("ZCARD").arg(format!("{qk}:r"));
                    p.cmd("ZCARD").arg(format!("{qk}:d"));
                    p.cmd("ZCARD").arg(format!("{qk}:l"));
                    p.cmd("ZCARD").arg(format!("{qk}:f"));
                    p.cmd("SISMEMBER").arg(format!("{tag}:paused")).arg(q);
                    p.cmd("ZRANGE").arg(format!("{qk}:r")).arg(0).arg(0);
                }
                let replies: Vec<Value> = if stats_names.is_empty() { Vec::new() } else { p.query(c)? };
                let mut heads = Vec::new();
                let mut out = Vec::new();
                for chunk in replies.chunks(6) {
                    let counts: Vec<i64> = chunk[..4].iter().map(int).collect();
                    let head = items(chunk[5].clone()).first().map(text);
                    heads.push(head);
                    out.push((counts, int(&chunk[4]) == 1, None));
                }
                // When the next job of each queue became available.
                let mut p = redis::pipe();
                for h in &heads {
                    p.cmd("HGET").arg(format!("{tag}:s")).arg(h.clone().unwrap_or_default());
                    p.cmd("HGET").arg(format!("{tag}:d")).arg(h.clone().unwrap_or_default());
                }
                let states: Vec<Option<String>> = if heads.is_empty() { Vec::new() } else { p.query(c)? };
                let avs: Vec<Option<i64>> = states
                    .chunks(2)
                    .map(|sd| {
                        let stored = Stored::parse(sd[1].as_deref()?)?;
                        Some(State::of(sd[0].as_deref(), &stored).available_at)
                    })
                    .collect();
                for ((o, h), av) in out.iter_mut().zip(&heads).zip(avs) {
                    o.2 = h.as_ref().and(av);
                }
                let mut p = redis::pipe();
                p.cmd("HGETALL").arg(format!("{tag}:m:{}", minute - 60_000));
                p.cmd("HGETALL").arg(format!("{tag}:m:{minute}"));
                let ms: Vec<Value> = p.query(c)?;
                Ok((out, ms.into_iter().map(pairs).collect()))
            })
            .await?;
        let mut counts = Vec::new();
        for (m, fields) in [minute - 60_000, minute].into_iter().zip(minutes) {
            for (f, v) in fields {
                let mut parts = f.split('\x1f');
                let (Some(q), Some(_), Some(col)) = (parts.next(), parts.next(), parts.next()) else { continue };
                if matches!(col, "c" | "r" | "f") {
                    counts.push((q.to_string(), m, int(&v)));
                }
            }
        }
        let rates = last_minute_rates(counts, now);
        Ok(names
            .into_iter()
            .zip(stats)
            .map(|(queue, (n, paused, head))| QueueStats {
                per_minute: rates.get(&queue).copied().unwrap_or(0.0).round() as u64,
                oldest_wait_s: head.map_or(0.0, |t| ((now - t).max(0) as f64) / 1000.0),
                queue,
                pending: n[0].max(0) as u64,
                delayed: n[1].max(0) as u64,
                reserved: n[2].max(0) as u64,
                failed: n[3].max(0) as u64,
                paused,
            })
            .collect())
    }

    async fn pause(&self, queue: &str) -> Result<()> {
        let q = queue.to_string();
        self.redis(move |c, tag| redis::cmd("SADD").arg(format!("{tag}:paused")).arg(&q).query::<i64>(c)).await.map(|_| ())
    }

    async fn resume(&self, queue: &str) -> Result<()> {
        let q = queue.to_string();
        self.redis(move |c, tag| {
            redis::cmd("SREM").arg(format!("{tag}:paused")).arg(&q).query::<i64>(c)?;
            redis::cmd("PUBLISH").arg(format!("{tag}:wake")).arg("1").query::<i64>(c)
        })
        .await?;
        self.wakeup.wake();
        Ok(())
    }

    async fn clear(&self, queue: &str) -> Result<u64> {
        in_chunks(|| {
            let args = vec![queue.to_string(), "5000".into()];
            async move { Ok(int(&self.script(|s| &s.clear, args).await?).max(0) as u64) }
        })
        .await
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
        let queues = match &filter.queue {
            Some(q) => vec![q.clone()],
            None => self.queue_names().await?,
        };
        let sets: Vec<(&str, JobState)> = match filter.state {
            Some(JobState::Pending) => vec![("r", JobState::Pending)],
            Some(JobState::Delayed) => vec![("d", JobState::Delayed)],
            Some(JobState::Reserved) => vec![("l", JobState::Reserved)],
            Some(JobState::Failed) => vec![("f", JobState::Failed)],
            Some(JobState::Completed) => vec![],
            None => vec![("r", JobState::Pending), ("d", JobState::Delayed), ("l", JobState::Reserved), ("f", JobState::Failed)],
        };
        let exact = filter.kind.is_none() && filter.tag.is_none() && filter.batch_id.is_none();
        let mut keys = Vec::new();
        for q in &queues {
            for (s, state) in &sets {
                keys.push((format!("{}:q:{q}:{s}", self.tag), *state));
            }
        }
        let scan_keys: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
        let scanned: Vec<(i64, Vec<String>)> = self
            .redis(move |c, _| {
                let mut p = redis::pipe();
                for k in &scan_keys {
                    p.cmd("ZCARD").arg(k);
                    p.cmd("ZRANGE").arg(k).arg(0).arg(SCAN_CAP - 1);
                }
                let replies: Vec<Value> = if scan_keys.is_empty() { Vec::new() } else { p.query(c)? };
                Ok(replies.chunks(2).map(|r| (int(&r[0]), items(r[1].clone()).iter().map(text).collect())).collect())
            })
            .await?;
        let mut items_out = Vec::new();
        let mut total = 0u64;
        for ((_, state), (card, ids)) in keys.iter().zip(scanned) {
            let found = self.raw(ids).await?;
            let infos: Vec<JobInfo> = found
                .iter()
                .filter_map(|(id, raw)| raw_info(id, raw, *state == JobState::Delayed))
                .filter(|j| matches(j, &filter))
                .collect();
            total += if exact { card.max(0) as u64 } else { infos.len() as u64 };
            items_out.extend(infos);
        }
        if matches!(filter.state, None | Some(JobState::Completed)) {
            let done: Vec<JobInfo> = self.history().await?.into_iter().filter(|j| matches(j, &filter)).collect();
            total += done.len() as u64;
            items_out.extend(done);
        }
        // Each set is read up to SCAN_CAP ids, so a page costs the same whatever its depth; a
        // cursor past what was read finds nothing more.
        let after = page.after_job()?;
        items_out.retain(|j| after.is_none_or(|a| j.id < a));
        items_out.sort_by_key(|j| std::cmp::Reverse(j.id));
        let items = items_out.into_iter().skip(page.offset() as usize).take(page.limit() as usize).collect();
        Ok(Paged::from_rows(items, &page, total, |j: &JobInfo| Cursor::new(0, j.id.to_string())))
    }

    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
        let key = self.failed_key(queue);
        let after = page.after_job()?.map(|id| id.to_string());
        let at = page.after.as_ref().map_or(0, |c| c.at);
        let (offset, limit) = (page.offset() as isize, page.limit() as isize);
        let (total, ids): (i64, Vec<String>) = self
            .redis(move |c, _| {
                let total: i64 = redis::cmd("ZCARD").arg(&key).query(c)?;
                // After a cursor: from the rank of its job (the set is ordered by failure time,
                // ties by id, as the relational stores order it), found in O(log n).
                let start = match &after {
                    None => offset,
                    Some(id) => match redis::cmd("ZREVRANK").arg(&key).arg(id).query::<Option<i64>>(c)? {
                        Some(rank) => rank as isize + 1,
                        // The job left the store (retried or forgotten) since: resume from its time
                        // (jobs that failed in the same millisecond are passed over).
                        None => {
                            let ids: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
                                .arg(&key)
                                .arg(format!("({at}"))
                                .arg("-inf")
                                .arg("LIMIT")
                                .arg(0)
                                .arg(limit)
                                .query(c)?;
                            return Ok((total, ids));
                        }
                    },
                };
                let ids: Vec<String> = redis::cmd("ZREVRANGE").arg(&key).arg(start).arg(start + limit - 1).query(c)?;
                Ok((total, ids))
            })
            .await?;
        let items = self.raw(ids).await?.iter().filter_map(|(id, raw)| failed_info(id, raw)).collect();
        Ok(Paged::from_rows(items, &page, total.max(0) as u64, |f: &FailedJob| Cursor::new(f.failed_at, f.id.to_string())))
    }

    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>> {
        let found = self.raw(vec![id.to_string()]).await?;
        Ok(found.iter().find_map(|(id, raw)| failed_info(id, raw)))
    }

    async fn failed_since(&self, since: i64) -> Result<u64> {
        let n: i64 = self.redis(move |c, tag| redis::cmd("ZCOUNT").arg(format!("{tag}:failed")).arg(since).arg("+inf").query(c)).await?;
        Ok(n.max(0) as u64)
    }

    async fn retry_failed(&self, ids: Vec<JobId>) -> Result<Vec<JobId>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let mut args = vec![now_ms().to_string()];
        args.extend(ids.iter().map(JobId::to_string));
        let mut res = items(self.script(|s| &s.retry_failed, args).await?).into_iter();
        let retried: Vec<JobId> = res.next().map(items).unwrap_or_default().iter().filter_map(|v| text(v).parse().ok()).collect();
        let members: Vec<String> = res.next().map(items).unwrap_or_default().iter().map(text).collect();
        self.apply_records(members).await?;
        if !retried.is_empty() {
            self.wakeup.wake();
        }
        Ok(retried)
    }

    async fn retry_all_failed(&self, queue: Option<&str>) -> Result<u64> {
        let key = self.failed_key(queue);
        in_chunks(|| {
            let key = key.clone();
            async move {
                let ids: Vec<JobId> = self.oldest_failed(key, 1_000).await?.iter().filter_map(|i| i.parse().ok()).collect();
                Ok(self.retry_failed(ids).await?.len() as u64)
            }
        })
        .await
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
        drop(self.metrics_writes.write().await);
        let since = query.since;
        let minutes: Vec<(i64, Vec<(String, Value)>)> = self
            .redis(move |c, tag| {
                let ms: Vec<i64> = redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:mi")).arg(since).arg("+inf").query(c)?;
                let mut p = redis::pipe();
                for m in &ms {
                    p.cmd("HGETALL").arg(format!("{tag}:m:{m}"));
                }
                let replies: Vec<Value> = if ms.is_empty() { Vec::new() } else { p.query(c)? };
                Ok(ms.into_iter().zip(replies.into_iter().map(pairs)).collect())
            })
            .await?;
        let mut out = Vec::new();
        for (minute, fields) in minutes {
            let mut rows: HashMap<(String, String), MetricsRow> = HashMap::new();
            for (f, v) in fields {
                let mut parts = f.splitn(3, '\x1f');
                let (Some(q), Some(kind), Some(col)) = (parts.next(), parts.next(), parts.next()) else { continue };
                if query.queue.as_deref().is_some_and(|x| x != q) || query.kind.as_deref().is_some_and(|x| x != kind) {
                    continue;
                }
                let row = rows.entry((q.to_string(), kind.to_string())).or_insert_with(|| MetricsRow {
                    minute,
                    queue: q.to_string(),
                    kind: kind.to_string(),
                    ..Default::default()
                });
                let n = int(&v).max(0) as u64;
                match col {
                    "c" => row.completed = n,
                    "r" => row.retried = n,
                    "f" => row.failed = n,
                    "rs" => row.runtime_sum_ms = n,
                    "rm" => row.runtime_max_ms = n,
                    "ws" => row.wait_sum_ms = n,
                    other => {
                        if let Some(i) = other.strip_prefix("rh").and_then(|i| i.parse::<usize>().ok()).filter(|i| *i < BUCKETS) {
                            row.runtime_hist[i] = n;
                        } else if let Some(i) = other.strip_prefix("wh").and_then(|i| i.parse::<usize>().ok()).filter(|i| *i < BUCKETS) {
                            row.wait_hist[i] = n;
                        }
                    }
                }
            }
            let mut rows: Vec<MetricsRow> = rows.into_values().collect();
            rows.sort_by(|a, b| (&a.queue, &a.kind).cmp(&(&b.queue, &b.kind)));
            out.extend(rows);
        }
        Ok(out)
    }

    async fn prune(&self, metrics_before: i64) -> Result<()> {
        let now = now_ms();
        self.redis(move |c, tag| {
            let old: Vec<i64> =
                redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:mi")).arg("-inf").arg(format!("({metrics_before}")).query(c)?;
            if !old.is_empty() {
                let keys: Vec<String> = old.iter().map(|m| format!("{tag}:m:{m}")).collect();
                redis::cmd("DEL").arg(&keys).query::<i64>(c)?;
                redis::cmd("ZREM").arg(format!("{tag}:mi")).arg(&old).query::<i64>(c)?;
            }
            let gone: Vec<String> = redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:ws")).arg("-inf").arg(now - 86_400_000).query(c)?;
            if !gone.is_empty() {
                redis::cmd("HDEL").arg(format!("{tag}:w")).arg(&gone).query::<i64>(c)?;
                redis::cmd("ZREM").arg(format!("{tag}:ws")).arg(&gone).query::<i64>(c)?;
            }
            Ok(())
        })
        .await?;
        self.ensure_tables().await?;
        self.store
            .transaction(Box::new(move |tx| {
                tx.execute("DELETE FROM queue_marks WHERE at < $1", &[SqlValue::Int(now - MARKS_KEEP_MS)])
                    .map(|n| Box::new(n) as Box<dyn Any + Send>)
            }))
            .await?;
        self.store.prune(metrics_before).await
    }

    async fn worker_heartbeat(&self, info: WorkerInfo) -> Result<()> {
        let json = serde_json::to_string(&info).map_err(|e| BackendError::Other(e.to_string()))?;
        self.redis(move |c, tag| {
            redis::pipe()
                .cmd("HSET")
                .arg(format!("{tag}:w"))
                .arg(&info.id)
                .arg(&json)
                .ignore()
                .cmd("ZADD")
                .arg(format!("{tag}:ws"))
                .arg(info.last_seen)
                .arg(&info.id)
                .ignore()
                .query::<()>(c)
        })
        .await
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
        let since = now_ms() - within.as_millis() as i64;
        let infos: Vec<Option<String>> = self
            .redis(move |c, tag| {
                let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:ws")).arg(since).arg("+inf").query(c)?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                redis::cmd("HMGET").arg(format!("{tag}:w")).arg(&ids).query(c)
            })
            .await?;
        let mut out: Vec<WorkerInfo> = infos.into_iter().flatten().filter_map(|j| serde_json::from_str(&j).ok()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    fn shared_state(&self) -> Option<Arc<dyn SharedState>> {
        Some(self.shared.clone())
    }

    fn broker(&self) -> Option<&'static str> {
        Some("redis")
    }

    fn warnings(&self) -> Vec<String> {
        let mut w = self.warnings.clone();
        w.extend(self.store.warnings());
        w
    }

    async fn ping_broker(&self) -> Result<()> {
        self.redis(|c, _| redis::cmd("PING").query::<String>(c)).await.map(|_| ())
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

    async fn transaction(&self, work: TxFn) -> Result<Box<dyn Any + Send>> {
        self.store_tx(work).await
    }
}

/// The hash tag every key of a deployment starts with: `{prefix}`, or the prefix itself when it
/// already has braces.
pub fn tag_of(prefix: &str) -> String {
    if prefix.contains('{') {
        prefix.to_string()
    } else {
        format!("{{{prefix}}}")
    }
}

#[cfg(all(test, feature = "sqlite"))]
mod tests {
    use super::*;
    use crate::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_core::backend::{QueueBackendExt, ReserveRequest};
    use conveyor_core::batch::{self, Batch};
    use testing::TestRedis;

    fn open(redis: &TestRedis, dir: &tempfile::TempDir) -> RedisBackend {
        let store = SqliteBackend::open(SqliteOptions::new(dir.path().join("s.db").to_str().unwrap())).unwrap();
        let mut options = RedisOptions::new(redis.url.clone());
        options.prefix = redis.prefix.clone();
        RedisBackend::open(options, Arc::new(store)).unwrap()
    }

    async fn pending(b: &RedisBackend, queue: &str) -> u64 {
        b.queues().await.unwrap().into_iter().find(|q| q.queue == queue).map_or(0, |q| q.pending)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn named_locks_live_in_redis_with_its_expiry() {
        let Some(redis) = TestRedis::create() else { return };
        let dir = tempfile::tempdir().unwrap();
        let b = open(&redis, &dir);
        b.ensure_tables().await.unwrap();
        let key_of = |k: &str| format!("{}:lock:{k}", tag_of(&redis.prefix));
        let ttl = |k: String| {
            let url = redis.url.clone();
            move || -> i64 {
                redis::cmd("PTTL").arg(&k).query(&mut redis::Client::open(url.as_str()).unwrap().get_connection().unwrap()).unwrap()
            }
        };
        assert!(conveyor_core::lock::acquire(&b, "nightly", "a", Duration::from_secs(30)).await.unwrap());
        assert!(!conveyor_core::lock::acquire(&b, "nightly", "b", Duration::from_secs(30)).await.unwrap());
        let left = ttl(key_of("nightly"))();
        assert!(left > 25_000 && left <= 30_000, "the key carries the lock's TTL: {left} ms");
        let rows = b.query("SELECT count(*) FROM locks", vec![]).await.unwrap();
        assert_eq!(rows[0][0], SqlValue::Int(0), "the store holds no lock row");
        assert!(conveyor_core::lock::release(&b, "nightly", "a").await.unwrap());
        assert_eq!(ttl(key_of("nightly"))(), -2, "released: the key is gone");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cache_sorted_sets_rate_limits_and_breakers_live_in_redis() {
        use conveyor_core::breaker::{Breaker, BreakerConfig, Permit};
        use conveyor_core::cache::{forget_prefix_in, incr_in, Cache, SortedSet};
        use conveyor_core::ratelimit::{RateLimit, RateLimiter};
        let Some(redis) = TestRedis::create() else { return };
        let dir = tempfile::tempdir().unwrap();
        let b = Arc::new(open(&redis, &dir));
        b.ensure_tables().await.unwrap();
        let tag = tag_of(&redis.prefix);
        let url = redis.url.clone();
        let conn = move || redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
        let backend: Arc<dyn QueueBackend> = b.clone();
        let store_rows = |table: &'static str| {
            let b = b.clone();
            async move { b.query(&format!("SELECT count(*) FROM {table}"), vec![]).await.map(|r| r[0][0].clone()).unwrap_or(SqlValue::Int(0)) }
        };

        // The cache: a Redis key with Redis' own expiry, indexed for prefix invalidation.
        let cache = Cache::new(backend.clone());
        cache.put("kpi:day:1", &42, Some(Duration::from_secs(60))).await.unwrap();
        cache.put("kpi:day:2", &43, None).await.unwrap();
        cache.put("other", &1, None).await.unwrap();
        let ttl: i64 = redis::cmd("PTTL").arg(format!("{tag}:c:kpi:day:1")).query(&mut conn()).unwrap();
        assert!(ttl > 55_000 && ttl <= 60_000, "the entry carries its TTL: {ttl}");
        assert_eq!(store_rows("cache").await, SqlValue::Int(0), "the store holds no cache row");
        assert_eq!(cache.get::<i64>("kpi:day:2").await.unwrap(), Some(43));
        // Invalidated in a transaction: not before it commits, and only then.
        let err = b
            .transact(|tx| {
                forget_prefix_in(tx, "kpi:")?;
                Err::<(), _>(BackendError::Other("rolled back".into()))
            })
            .await;
        assert!(err.is_err());
        assert_eq!(cache.get::<i64>("kpi:day:1").await.unwrap(), Some(42), "a rolled-back invalidation forgets nothing");
        b.transact(|tx| forget_prefix_in(tx, "kpi:")).await.unwrap();
        assert_eq!(cache.get::<i64>("kpi:day:1").await.unwrap(), None);
        assert_eq!(cache.get::<i64>("kpi:day:2").await.unwrap(), None);
        assert_eq!(cache.get::<i64>("other").await.unwrap(), Some(1));
        assert_eq!(store_rows("queue_state_outbox").await, SqlValue::Int(0), "applied operations leave the outbox");

        // A sorted set: a Redis zset (negated scores), incremented with the transaction.
        let z = SortedSet::new(backend.clone(), "board");
        z.set("ann", 5.0).await.unwrap();
        let score = b
            .transact(|tx| {
                incr_in(tx, "board", "bob", 2.0)?;
                incr_in(tx, "board", "bob", 5.0)
            })
            .await
            .unwrap();
        assert_eq!(score, 7.0, "increments earlier in the transaction count");
        let raw: Vec<(String, f64)> =
            redis::cmd("ZRANGE").arg(format!("{tag}:z:board")).arg(0).arg(-1).arg("WITHSCORES").query(&mut conn()).unwrap();
        assert_eq!(raw, vec![("bob".to_string(), -7.0), ("ann".to_string(), -5.0)]);
        assert_eq!(store_rows("zsets").await, SqlValue::Int(0), "the store holds no sorted set row");

        // A deferred operation left in the outbox by a crash is applied once, even twice relayed.
        let op = Deferred::ZIncr { set: "board".into(), member: "ann".into(), delta: 10.0 };
        let body = serde_json::to_string(&op).unwrap();
        b.transact(move |tx| {
            tx.execute(
                "INSERT INTO queue_state_outbox (id, op, created_at) VALUES ('s:crashed', $1, $2)",
                &[body.into(), (now_ms() - 60_000).into()],
            )
        })
        .await
        .unwrap();
        assert_eq!(z.score("ann").await.unwrap(), Some(5.0), "not applied before the relay");
        b.recover().await.unwrap();
        assert_eq!(b.shared.apply_once(&[("s:crashed".into(), op)], now_ms()).unwrap(), 0, "a second relay applies nothing");
        assert_eq!(z.score("ann").await.unwrap(), Some(15.0));
        assert_eq!(store_rows("queue_state_outbox").await, SqlValue::Int(0));

        // A rate limiter: one key in Redis; a unit taken in a rolled-back transaction comes back.
        let limiter = RateLimiter::new(backend.clone(), "mail", RateLimit::per(2, Duration::from_secs(3600)));
        assert!(limiter.check("u1").await.unwrap().is_allowed());
        let l = limiter.clone();
        let err = b
            .transact(move |tx| {
                assert!(l.check_in(tx, "u1")?.is_allowed());
                Err::<(), _>(BackendError::Other("rolled back".into()))
            })
            .await;
        assert!(err.is_err());
        assert!(limiter.check("u1").await.unwrap().is_allowed(), "the rolled-back unit was given back");
        assert!(!limiter.check("u1").await.unwrap().is_allowed(), "two an hour");
        let exists: i64 = redis::cmd("EXISTS").arg(format!("{tag}:rl:mail:u1")).query(&mut conn()).unwrap();
        assert_eq!(exists, 1);
        assert_eq!(store_rows("rate_limits").await, SqlValue::Int(0), "the store holds no rate-limit row");

        // A breaker: its state is a Redis hash; the transition's event is in the store.
        let conveyor = conveyor_core::Conveyor::new(backend.clone(), conveyor_core::registry::Registry::new());
        let config = BreakerConfig { min_calls: 2, failure_rate: 0.5, open_for: Duration::from_secs(60), ..Default::default() };
        let br = Breaker::new(conveyor, "partner", config);
        assert_eq!(br.allow().await.unwrap(), Permit::Allowed);
        br.record(false).await.unwrap();
        br.record(false).await.unwrap();
        assert!(matches!(br.allow().await.unwrap(), Permit::Rejected { .. }), "two failures of two calls open it");
        let state: String = redis::cmd("HGET").arg(format!("{tag}:b:partner")).arg("state").query(&mut conn()).unwrap();
        assert_eq!(state, "open");
        assert_eq!(br.info().await.unwrap().calls, 2);
        assert_eq!(store_rows("breakers").await, SqlValue::Int(0), "the store holds no breaker row");
        let events = b.query("SELECT count(*) FROM events WHERE name = 'breaker.open'", vec![]).await.unwrap();
        assert_eq!(events[0][0], SqlValue::Int(1), "the transition's event is in the store");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn completed_jobs_leave_redis_once_out_of_the_history() {
        let Some(redis) = TestRedis::create() else { return };
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteBackend::open(SqliteOptions::new(dir.path().join("s.db").to_str().unwrap())).unwrap();
        let mut options = RedisOptions::new(redis.url.clone());
        options.prefix = redis.prefix.clone();
        options.completed_history = 3;
        let b = RedisBackend::open(options, Arc::new(store)).unwrap();
        let tag = tag_of(&redis.prefix);
        let count = |cmd: &'static str, key: String| {
            let url = redis.url.clone();
            move || -> i64 {
                redis::cmd(cmd).arg(&key).query(&mut redis::Client::open(url.as_str()).unwrap().get_connection().unwrap()).unwrap()
            }
        };
        let jobs: Vec<NewJob> = (0..10).map(|n| NewJob::new("t.history", &serde_json::json!({ "n": n })).queue("history")).collect();
        b.enqueue(jobs).await.unwrap();
        assert_eq!(count("HLEN", format!("{tag}:s"))(), 0, "a job has no state field before its first reservation");
        let req = ReserveRequest { queues: vec!["history".into()], max: 10, lease: Duration::from_secs(30), worker: "w".into() };
        let reserved = b.reserve(req).await.unwrap();
        assert_eq!(reserved.len(), 10);
        assert!(reserved.iter().all(|j| j.attempt == 1 && j.available_at == j.created_at));
        // One at a time, so the history's order is the completion order.
        for j in &reserved {
            b.complete(vec![Completion::of(j, Outcome::Completed)]).await.unwrap();
        }
        assert_eq!(count("LLEN", format!("{tag}:done"))(), 3, "the history holds the last three");
        assert_eq!(count("HLEN", format!("{tag}:d"))(), 3, "older completed jobs left the data hash");
        assert_eq!(count("HLEN", format!("{tag}:s"))(), 3, "and the state hash");
        let last = b.job(reserved[9].id).await.unwrap().expect("the newest completed job is in the history");
        assert_eq!(last.state, JobState::Completed);
        assert_eq!((last.attempts, last.worker.as_deref()), (1, Some("w")));
        assert!(last.finished_at.is_some() && last.runtime_ms.is_some() && last.reserved_at.is_some());
        assert!(b.job(reserved[0].id).await.unwrap().is_none(), "the oldest is gone");
        let listed = b.jobs(JobFilter { state: Some(JobState::Completed), ..Default::default() }, Page::new(1, 50)).await.unwrap();
        assert_eq!(listed.total, 3);
        // A stale acknowledgement of a completed job changes nothing.
        b.complete(vec![Completion::of(&reserved[9], Outcome::Completed)]).await.unwrap();
        assert_eq!(count("LLEN", format!("{tag}:done"))(), 3);
        assert_eq!(b.job(reserved[8].id).await.unwrap().map(|j| j.state), Some(JobState::Completed));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outbox_row_left_by_a_crash_is_relayed_once_even_when_relayed_twice() {
        let Some(redis) = TestRedis::create() else { return };
        let dir = tempfile::tempdir().unwrap();
        let b = open(&redis, &dir);
        b.ensure_tables().await.unwrap();
        let job = NewJob::new("t.outbox", &serde_json::json!({ "n": 1 })).queue("outbox");
        // A transaction that committed its row, then the process died before relaying it.
        let crashed = |job: NewJob| {
            let body = serde_json::to_string(&job).unwrap();
            let id = job.id.to_string();
            b.transact(move |tx| {
                tx.execute(
                    "INSERT INTO queue_outbox (id, job, created_at) VALUES ($1, $2, $3)",
                    &[id.into(), body.into(), (now_ms() - 60_000).into()],
                )
            })
        };
        crashed(job.clone()).await.unwrap();
        assert_eq!(pending(&b, "outbox").await, 0, "nothing reaches Redis before the relay");
        b.reap_expired().await.unwrap();
        assert_eq!(pending(&b, "outbox").await, 1, "the reaper pass relays the row");
        let left = b.query("SELECT count(*) FROM queue_outbox", vec![]).await.unwrap();
        assert_eq!(left[0][0], SqlValue::Int(0), "a relayed row is deleted");
        // The same row relayed again (a relay that died between Redis and the delete).
        crashed(job.clone()).await.unwrap();
        b.reap_expired().await.unwrap();
        assert_eq!(pending(&b, "outbox").await, 1, "a row relayed twice enqueues once");
        let req = ReserveRequest { queues: vec!["outbox".into()], max: 10, lease: Duration::from_secs(30), worker: "w".into() };
        let got = b.reserve(req).await.unwrap();
        assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), vec![job.id]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_outcome_record_applied_twice_counts_once_and_is_removed() {
        let Some(redis) = TestRedis::create() else { return };
        let dir = tempfile::tempdir().unwrap();
        let b = open(&redis, &dir);
        let jobs: Vec<NewJob> = (0..2).map(|n| NewJob::new("t.batch", &serde_json::json!({ "n": n })).queue("records")).collect();
        let id = b.transact(move |tx| Batch::new("records").extend(jobs).dispatch_in(tx)).await.unwrap();
        let req = ReserveRequest { queues: vec!["records".into()], max: 10, lease: Duration::from_secs(30), worker: "w".into() };
        let reserved = b.reserve(req).await.unwrap();
        assert_eq!(reserved.len(), 2);
        // The acknowledgement script ran (records stored), then the process died.
        let c = Completion::of(&reserved[0], Outcome::Completed);
        let data = serde_json::to_string(&Data { k: c.kind.clone(), bt: c.batch_id.clone(), ..Default::default() }).unwrap();
        let record = serde_json::to_string(&Record::of(&c, data).unwrap()).unwrap();
        let args = vec![
            now_ms().to_string(),
            "10".into(),
            c.id.to_string(),
            c.lease_token.to_string(),
            "c".into(),
            "0".into(),
            String::new(),
            record,
            "1".into(),
            "0".into(),
            c.queue.clone(),
            String::new(),
        ];
        let res = items(b.script(|s| &s.complete, args).await.unwrap());
        let members: Vec<String> = items(res[1].clone()).iter().map(text).collect();
        assert_eq!(members.len(), 1);
        assert_eq!(batch::find(&b, &id).await.unwrap().unwrap().processed, 0, "the store has not seen the outcome yet");
        b.apply_records(members.clone()).await.unwrap();
        b.apply_records(members).await.unwrap();
        let info = batch::find(&b, &id).await.unwrap().unwrap();
        assert_eq!((info.processed, info.pending), (1, 1), "applied twice, counted once");
        let left: i64 = b.redis(|c, tag| redis::cmd("ZCARD").arg(format!("{tag}:h")).query(c)).await.unwrap();
        assert_eq!(left, 0, "applied records leave Redis");
    }
}
