//! The queue on Redis (`CONVEYOR_QUEUE=redis`), beside a relational store (SQLite or
//! PostgreSQL) that keeps the domain rows, batches, workflows, events and the rest of the engine's
//! tables.
//!
//! - Every queue state change is one Lua script ([`scripts`]): enqueue many, reserve many with
//!   their leases (promoting due delayed jobs first), apply many outcomes, extend leases, reap
//!   expired leases, retry / forget failed jobs, clear. No client-side read-modify-write.
//! - **Transactional enqueue** (`Tx::enqueue` inside [`Queue::transaction`]) writes an
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

mod admin;
mod conn;
mod durability;
mod enqueue;
mod flow;
mod model;
mod outbox;
mod outcomes;
mod read;
mod scripts;
mod state;
mod store;
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
    in_chunks, insert_many, BackendError, Cause, Cursor, DelayedAction, FailedJob, JobFilter, ManyTxFn, MetricsQuery, Page, Paged, Queue,
    QueueBackend, QueueStats, ReserveRequest, Result, Row, SqlValue, Store, Tx, TxFn, WorkerInfo,
};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{payload_value, Backoff, Completion, EnqueueOutcome, Job, JobId, JobInfo, JobState, NewJob, Outcome};
use conveyor_core::metrics::{last_minute_rates, minute_of, MetricsAccumulator, MetricsRow, BUCKETS};
use conveyor_core::state::{Deferred, SharedState, TxShared};
use conveyor_core::wakeup::Wakeup;

use conn::{int, items, pairs, text, Pool};
use model::{Data, Raw, Record, State, Stored};

use read::{failed_info, matches, raw_info};

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
    holders: Script,
    expire_holders: Script,
    extend: Script,
    reap: Script,
    retry_failed: Script,
    forget_failed: Script,
    clear: Script,
    metrics: Script,
    lock_acquire: Script,
    lock_release: Script,
    lease_delayed: Script,
    unique_release: Script,
}

static SCRIPTS: LazyLock<Scripts> = LazyLock::new(|| Scripts {
    enqueue: Script::new(&scripts::enqueue()),
    reserve: Script::new(&scripts::reserve()),
    complete: Script::new(&scripts::complete()),
    holds: Script::new(&scripts::holds()),
    holders: Script::new(&scripts::holders()),
    expire_holders: Script::new(&scripts::expire_holders()),
    extend: Script::new(&scripts::extend()),
    reap: Script::new(&scripts::reap()),
    retry_failed: Script::new(&scripts::retry_failed()),
    forget_failed: Script::new(&scripts::forget_failed()),
    clear: Script::new(&scripts::clear()),
    metrics: Script::new(&scripts::metrics()),
    lock_acquire: Script::new(&scripts::lock_acquire()),
    lock_release: Script::new(&scripts::lock_release()),
    lease_delayed: Script::new(&scripts::lease_delayed()),
    unique_release: Script::new(&scripts::unique_release()),
});

/// Most jobs one script call takes (Lua's `unpack` takes at most 8,000 values).
const PER_CALL: usize = 1_000;

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

/// The jobs a reserving script returned (4 values each: id, attempt, available at, packed
/// data), leased at `now` under `token`.
fn leased_jobs(res: Vec<Value>, now: i64, token: i64) -> Vec<Job> {
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
    jobs
}

#[async_trait]
impl Queue for RedisBackend {
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
        Ok(leased_jobs(res, now, token))
    }

    async fn act_on_delayed(&self, ids: Vec<JobId>, action: DelayedAction) -> Result<Vec<JobId>> {
        self.delayed_by_id(ids, action).await
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<()> {
        if completions.is_empty() {
            return Ok(());
        }
        self.apply_outcomes(&completions, true).await.map(|_| ())
    }

    async fn complete_with(&self, completion: Completion, work: TxFn) -> Result<Box<dyn Any + Send>> {
        let id = completion.id;
        let (out, held) = self.complete_many_with(vec![completion], Box::new(move |tx, _| work(tx))).await?;
        if held.first() == Some(&true) {
            Ok(out)
        } else {
            Err(BackendError::LeaseLost(id))
        }
    }

    async fn complete_many_with(&self, completions: Vec<Completion>, work: ManyTxFn) -> Result<(Box<dyn Any + Send>, Vec<bool>)> {
        let mut held = Vec::with_capacity(completions.len());
        for c in &completions {
            let args = vec![c.id.to_string(), c.lease_token.to_string()];
            held.push(int(&self.script(|s| &s.holds, args).await?) == 1);
        }
        if !held.contains(&true) {
            return Ok((Box::new(()), held));
        }
        let (cs, flags) = (completions.clone(), held.clone());
        let out = self
            .store_tx(Box::new(move |tx| {
                // A job whose marker exists was committed by an earlier attempt whose
                // acknowledgement was lost: not acted on again.
                let mut fresh = flags;
                for (c, f) in cs.iter().zip(fresh.iter_mut()) {
                    if *f {
                        *f = tx.execute(
                            "INSERT INTO queue_marks (id, at) VALUES ($1, $2) ON CONFLICT (id) DO NOTHING",
                            &[SqlValue::Text(format!("c:{}", c.id)), SqlValue::Int(now_ms())],
                        )? == 1;
                    }
                }
                let out = if fresh.contains(&true) { work(tx, &fresh)? } else { Box::new(()) };
                let hooked: Vec<&Completion> =
                    cs.iter().zip(&fresh).filter(|(c, f)| **f && conveyor_core::hooks::wants(c)).map(|(c, _)| c).collect();
                if !hooked.is_empty() {
                    conveyor_core::hooks::after_outcomes(tx, &hooked)?;
                }
                Ok(Box::new((out, fresh)) as Box<dyn Any + Send>)
            }))
            .await?;
        let (out, fresh) =
            *out.downcast::<(Box<dyn Any + Send>, Vec<bool>)>().expect("the transaction returns its work's result and flags");
        // The effects are committed; the acknowledgements follow. If one is lost, its job runs
        // again after its lease and is acknowledged then without a second effect.
        let acked: Vec<Completion> = completions.into_iter().zip(&held).filter(|(_, h)| **h).map(|(c, _)| c).collect();
        if let Err(e) = self.apply_outcomes(&acked, false).await {
            tracing::warn!(error = %e, jobs = acked.len(), "acknowledging committed jobs in Redis failed; they are acknowledged when they come back");
        }
        Ok((out, fresh))
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

    fn broker(&self) -> Option<&'static str> {
        Some("redis")
    }

    async fn ping_broker(&self) -> Result<()> {
        self.redis(|c, _| redis::cmd("PING").query::<String>(c)).await.map(|_| ())
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
mod tests;
