//! Product sync: a supplier's catalogue (the source) comes in incrementally; price and stock
//! changes go out to a storefront (the target) through queued jobs that survive slow, failing
//! and rate-limiting partners.
//!
//! The flow, on the engine's mechanisms only:
//! - [`start`] stores a run, an empty batch (its `finally` job finishes the run) and the event
//!   `sync.run_started`, in one transaction. At most one run is running; a second start joins it.
//! - The event's queued listener adds the first **page job** to the batch. A page job reads one
//!   page of the source and, in its acknowledgement transaction: sets aside bad records (a
//!   recorded failure each), skips products whose stored hash says nothing changed, adds a
//!   **push job** per changed product and the next page job to the batch, emits
//!   `sync.product_changed`, and advances the cursor. The page chain keeps the batch open, so
//!   the batch finishes exactly when the last page and the last push are done.
//! - Paging is by keyset: `updated_since` = the cursor's time (inclusive), products at or
//!   before the cursor `(updated_at, id)` skipped; page numbers only advance inside a run of
//!   equal times. A product updated during a run moves behind the cursor and is read again later
//!   in the same run; nothing is skipped when the catalogue changes under the run.
//! - A push job compares each variant's price and stock with what was last pushed, and sends
//!   only the differences: through the circuit breaker `sync:target` (open: the job is released
//!   without spending an attempt), the rate limiter `sync:target` (several units at once, at
//!   most `target_rps` a second with a safety margin), with an idempotency key per change, and
//!   retries with backoff honouring `Retry-After`. Progress is kept per field, so a retry sends
//!   only what is still missing. Success commits with the job's acknowledgement.
//! - Every request is audited (`sync_requests`); failures are kept with their payload
//!   (`sync_failures`) until [`retry_failures`] replays them.

pub mod connector;
mod health;
mod runs;
mod schema;
mod state;
mod syncer;

pub use health::*;
pub use runs::*;
use state::*;
use syncer::*;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use conveyor_core::backend::{
    count_sql, insert_many, placeholders, BackendError, Page, Paged, QueueBackend, QueueBackendExt, RowExt, SqlValue, Tx,
};
use conveyor_core::batch::{self, Batch};
use conveyor_core::breaker::{self, Breaker, BreakerConfig, BreakerInfo, ClosedCache, Permit};
use conveyor_core::clock::now_ms;
use conveyor_core::event::{Event, EventEnvelope};
use conveyor_core::job::{Backoff, JobState};
use conveyor_core::ratelimit::{Decision, RateLimit, RateLimiter};
use conveyor_core::registry::{JobContext, JobError, JobResult};
use conveyor_core::{Conveyor, NewJob, Registry};

use connector::{Audit, CallError, Field, Product, Source, SourceConfig, Target, TargetConfig};

pub const QUEUE: &str = "sync";
const START_KIND: &str = "sync.start";
const PAGE_KIND: &str = "sync.page";
const PUSH_KIND: &str = "sync.push";
const FINISH_KIND: &str = "sync.finish";
const PRUNE_KIND: &str = "sync.prune";
pub const RUN_STARTED: &str = "sync.run_started";
pub const PRODUCT_CHANGED: &str = "sync.product_changed";
pub const PUSH_FAILED: &str = "sync.push_failed";
pub const RUN_FINISHED: &str = "sync.run_finished";
const TARGET_BREAKER: &str = "sync:target";
/// Audit rows and run items are kept this long.
const RETENTION: Duration = Duration::from_secs(7 * 24 * 3600);

#[derive(Clone, Debug)]
pub struct SyncConfig {
    pub source: Option<SourceConfig>,
    pub target: Option<TargetConfig>,
    /// The most requests a second the target receives from all processes together.
    pub target_rps: u32,
    /// How often the scheduler starts a run (zero: never).
    pub interval: Duration,
    pub breaker: BreakerConfig,
    /// Tries per push (the first included); pages get the same.
    pub max_attempts: u32,
}

impl Default for SyncConfig {
    fn default() -> Self {
        SyncConfig {
            source: None,
            target: None,
            target_rps: 50,
            interval: Duration::from_secs(15 * 60),
            // A partner's outage shows within seconds: a short window, a short open period.
            breaker: BreakerConfig {
                failure_rate: 0.5,
                min_calls: 10,
                window: Duration::from_secs(10),
                open_for: Duration::from_secs(10),
                probes: 1,
            },
            max_attempts: 8,
        }
    }
}

impl SyncConfig {
    /// Both partners are configured.
    pub fn is_configured(&self) -> bool {
        self.source.is_some() && self.target.is_some()
    }

    /// What is missing, naming the variable.
    pub fn missing(&self) -> Option<&'static str> {
        if self.source.is_none() {
            Some("CONVEYOR_SYNC_SOURCE_URL")
        } else if self.target.is_none() {
            Some("CONVEYOR_SYNC_TARGET_URL")
        } else {
            None
        }
    }

    /// The limiter that keeps the target under `target_rps` in every wall-clock second: a
    /// burst of a tenth of the limit and a rate of 80% of the rest, so that a burst plus a
    /// second's worth of requests (plus the jitter between deciding and arriving) stays below.
    pub fn target_limit(&self) -> RateLimit {
        let rps = self.target_rps.max(1);
        let burst = (rps / 10).max(1);
        let units = (rps - burst).max(1);
        RateLimit::per(units, Duration::from_millis(1250)).with_burst(burst)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error("product sync is not configured: set {0}")]
    NotConfigured(&'static str),
    #[error(transparent)]
    Backend(#[from] BackendError),
}

pub async fn migrate(backend: &dyn QueueBackend) -> conveyor_core::backend::Result<Vec<u32>> {
    conveyor_core::migrate::apply(backend, "sync", schema::MIGRATIONS).await
}

/// The scheduler's runs (when both partners are configured and the interval is not zero) and
/// the hourly pruning of old audit rows.
pub fn schedules(config: &SyncConfig) -> Vec<conveyor_core::scheduler::Schedule> {
    use conveyor_core::cron::CronSchedule;
    use conveyor_core::scheduler::Schedule;
    let mut out = vec![Schedule::new(
        "sync-prune",
        CronSchedule::parse("0 17 * * * *", "UTC").expect("a valid built-in cron expression"),
        NewJob::new(PRUNE_KIND, &json!({})).queue(QUEUE),
    )];
    if config.is_configured() && !config.interval.is_zero() {
        let every = format!("@every {}s", config.interval.as_secs().max(1));
        if let Ok(cron) = CronSchedule::parse(&every, "UTC") {
            out.push(Schedule::new("sync-products", cron, NewJob::new(START_KIND, &json!({ "full": false })).queue(QUEUE)));
        }
    }
    out
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Started {
    pub run_id: String,
    pub batch_id: String,
    /// A run was already going: this is it.
    pub joined: bool,
}

#[derive(Serialize, Deserialize)]
struct RunEvent {
    run_id: String,
    scope: String,
    batch_id: String,
}

/// Starts a run, or joins the one running. A running run whose jobs are all gone (a cleared
/// queue) is marked failed and a new one starts.
pub async fn start(conveyor: &Conveyor, full: bool) -> Result<Started, SyncError> {
    let backend = conveyor.backend().clone();
    for _ in 0..3 {
        if let Some(run) = running(backend.as_ref()).await? {
            if alive(backend.as_ref(), &run.batch_id).await? {
                return Ok(Started { run_id: run.id, batch_id: run.batch_id, joined: true });
            }
            let id = run.id.clone();
            backend
                .transact(move |tx| {
                    tx.execute(
                        "UPDATE sync_runs SET status = 'failed', finished_at = $2, error = $3 WHERE id = $1 AND status = 'running'",
                        &[id.into(), now_ms().into(), "abandoned: none of its jobs is left".into()],
                    )
                })
                .await?;
            tracing::warn!(run = %run.id, "sync run had no job left; marked failed");
        }
        let cv = conveyor.clone();
        let scope = if full { "full" } else { "incremental" };
        let created = backend
            .transact(move |tx| {
                let run_id = conveyor_core::job::JobId::new().to_string();
                let finish = NewJob::new(FINISH_KIND, &json!({ "run_id": run_id })).queue(QUEUE).max_attempts(20);
                let batch_id = Batch::new(format!("sync products {run_id}")).allow_failures().finally(finish).dispatch_in(tx)?;
                tx.execute(
                    "INSERT INTO sync_runs (id, scope, status, batch_id, started_at) VALUES ($1, $2, 'running', $3, $4)",
                    &[run_id.clone().into(), scope.into(), batch_id.clone().into(), now_ms().into()],
                )?;
                cv.emit_in(
                    tx,
                    Event::new(RUN_STARTED, &RunEvent { run_id: run_id.clone(), scope: scope.into(), batch_id: batch_id.clone() }),
                )?;
                Ok(Started { run_id, batch_id, joined: false })
            })
            .await;
        match created {
            Ok(s) => return Ok(s),
            // Another start won the race for the one running slot: join it.
            Err(e) if e.is_unique() => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(SyncError::Backend(BackendError::Other("could not start or join a sync run".into())))
}

/// Registers the run listener and the job kinds. Without partners, a run fails at its first
/// page naming the missing setting.
pub fn register(registry: &mut Registry, backend: Arc<dyn QueueBackend>, config: SyncConfig) {
    let limiter = RateLimiter::new(backend, "sync", config.target_limit());
    let s = Arc::new(Syncer {
        source: config.source.clone().map(Source::new),
        target: config.target.clone().map(Target::new),
        config,
        limiter,
        breakers: ClosedCache::default(),
    });
    registry.register(START_KIND, |j: StartJob, ctx: JobContext| async move {
        start(&ctx.conveyor, j.full).await.map_err(JobError::retry)?;
        Ok(())
    });
    let l = s.clone();
    registry.listen_queued(RUN_STARTED, "sync.pages", QUEUE, move |env: EventEnvelope<RunEvent>, ctx: JobContext| {
        let s = l.clone();
        async move { s.first_page(env.payload, ctx).await }
    });
    let p = s.clone();
    registry.register(PAGE_KIND, move |j: PageJob, ctx: JobContext| {
        let s = p.clone();
        async move { s.page(j, ctx).await }
    });
    let p = s.clone();
    registry.register(PUSH_KIND, move |j: PushJob, ctx: JobContext| {
        let s = p.clone();
        async move { s.push(j, ctx).await }
    });
    registry.register(FINISH_KIND, |j: RunRef, ctx: JobContext| async move {
        let cv = ctx.conveyor.clone();
        ack(ctx.complete_with(move |tx| finish(&cv, tx, &j.run_id)).await)
    });
    registry.register(PRUNE_KIND, |_: Value, ctx: JobContext| async move {
        let before = now_ms() - RETENTION.as_millis() as i64;
        ctx.backend()
            .transact(move |tx| {
                tx.execute("DELETE FROM sync_requests WHERE at < $1", &[before.into()])?;
                tx.execute("DELETE FROM sync_items WHERE at < $1", &[before.into()])?;
                tx.execute("DELETE FROM sync_failures WHERE resolved_at < $1", &[before.into()])?;
                // A run logs an event per changed product: its events are kept as long.
                tx.execute("DELETE FROM events WHERE name LIKE 'sync.%' AND created_at < $1", &[before.into()])
            })
            .await?;
        Ok(())
    });
}

#[cfg(test)]
mod tests;
