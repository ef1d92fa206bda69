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
mod schema;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use conveyor_core::backend::{count_sql, insert_many, BackendError, Page, Paged, QueueBackend, QueueBackendExt, RowExt, SqlValue, Tx};
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

// --- runs -----------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct Counts {
    pub seen: u64,
    pub changed: u64,
    pub pushed: u64,
    pub unchanged: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunInfo {
    pub id: String,
    /// `running`, `completed`, `completed_with_failures`, `failed` or `cancelled`.
    pub status: String,
    /// `incremental` or `full`.
    pub scope: String,
    pub batch_id: String,
    /// Unix ms.
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// Source pages read so far.
    pub pages: u64,
    pub error: Option<String>,
    pub counts: Counts,
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

async fn running(backend: &dyn QueueBackend) -> conveyor_core::backend::Result<Option<RunInfo>> {
    let rows = backend.query(&format!("SELECT {RUN_COLS} FROM sync_runs WHERE status = 'running'"), vec![]).await?;
    Ok(rows.first().map(run_info))
}

/// Whether a batch still has a job that can run.
async fn alive(backend: &dyn QueueBackend, batch_id: &str) -> conveyor_core::backend::Result<bool> {
    for state in [JobState::Pending, JobState::Reserved, JobState::Delayed] {
        let filter = conveyor_core::backend::JobFilter { batch_id: Some(batch_id.into()), state: Some(state), ..Default::default() };
        if backend.jobs(filter, Page::new(1, 1)).await?.total > 0 {
            return Ok(true);
        }
    }
    // Between the run's creation and its first page the listener job holds it (it is not in
    // the batch); a run younger than a minute counts as alive.
    let rows = backend.query("SELECT started_at FROM sync_runs WHERE batch_id = $1", vec![batch_id.into()]).await?;
    Ok(rows.first().is_some_and(|r| now_ms() - r.int(0) < 60_000))
}

const RUN_COLS: &str = "id, status, scope, batch_id, started_at, finished_at, pages, error, seen, changed, pushed, unchanged, failed";

fn run_info(r: &conveyor_core::backend::Row) -> RunInfo {
    let n = |i: usize| r.int(i).max(0) as u64;
    RunInfo {
        id: r.text(0).unwrap_or_default().into(),
        status: r.text(1).unwrap_or_default().into(),
        scope: r.text(2).unwrap_or_default().into(),
        batch_id: r.text(3).unwrap_or_default().into(),
        started_at: r.int(4),
        finished_at: r.opt_int(5),
        pages: n(6),
        error: r.text(7).map(str::to_string),
        counts: Counts { seen: n(8), changed: n(9), pushed: n(10), unchanged: n(11), failed: n(12) },
    }
}

/// Counts of a run so far, from its items.
fn live_counts(rows: &[conveyor_core::backend::Row]) -> Counts {
    let mut c = Counts::default();
    for r in rows {
        let (outcome, n, changed) = (r.text(0).unwrap_or_default(), r.int(1).max(0) as u64, r.int(2).max(0) as u64);
        c.seen += n;
        c.changed += changed;
        match outcome {
            "pushed" => c.pushed += n,
            "unchanged" => c.unchanged += n,
            "failed" => c.failed += n,
            _ => {}
        }
    }
    c
}

const COUNT_SQL: &str = "SELECT outcome, count(*), sum(changed) FROM sync_items WHERE run_id = $1 GROUP BY outcome";

pub async fn run(backend: &dyn QueueBackend, id: &str) -> conveyor_core::backend::Result<Option<RunInfo>> {
    let rows = backend.query(&format!("SELECT {RUN_COLS} FROM sync_runs WHERE id = $1"), vec![id.into()]).await?;
    let Some(mut info) = rows.first().map(run_info) else { return Ok(None) };
    if info.status == "running" {
        info.counts = live_counts(&backend.query(COUNT_SQL, vec![id.into()]).await?);
    }
    Ok(Some(info))
}

/// Runs, newest first.
pub async fn runs(backend: &dyn QueueBackend, page: Page) -> conveyor_core::backend::Result<Paged<RunInfo>> {
    let count = backend.query(&count_sql("FROM sync_runs"), vec![]).await?.first().map_or(0, |r| r.int(0)) as u64;
    let (after, limit, params) = page.sql("started_at", Some("id"), 1);
    let rows = backend
        .query(&format!("SELECT {RUN_COLS} FROM sync_runs WHERE 1 = 1{after} ORDER BY started_at DESC, id DESC{limit}"), params)
        .await?;
    let mut list = Paged::from_rows(rows.iter().map(run_info).collect(), &page, count, |r: &RunInfo| {
        conveyor_core::backend::Cursor::new(r.started_at, r.id.clone())
    });
    for r in list.items.iter_mut().filter(|r| r.status == "running") {
        r.counts = live_counts(&backend.query(COUNT_SQL, vec![r.id.clone().into()]).await?);
    }
    Ok(list)
}

/// Whether every run's batch has finished (nothing of any run is still queued or running).
pub async fn settled(backend: &dyn QueueBackend) -> conveyor_core::backend::Result<bool> {
    let rows = backend
        .query(
            "SELECT count(*) FROM sync_runs r JOIN batches b ON b.id = r.batch_id
             WHERE b.finished_at IS NULL AND (r.status = 'running' OR b.pending > 0)",
            vec![],
        )
        .await?;
    Ok(rows.first().map_or(0, |r| r.int(0)) == 0)
}

// --- jobs -----------------------------------------------------------------------------------

/// The source position: products after `(after_ms, after_id)` are new; `since` is what the
/// source is asked for (its own text for the cursor's time).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
struct Cursor {
    since: String,
    after_ms: i64,
    after_id: String,
}

impl Cursor {
    fn passes(&self, p: &Product) -> bool {
        p.key() > (self.after_ms, self.after_id.as_str())
    }
}

#[derive(Serialize, Deserialize)]
struct PageJob {
    run_id: String,
    batch_id: String,
    page: u32,
    cursor: Option<Cursor>,
}

#[derive(Serialize, Deserialize)]
struct PushJob {
    run_id: String,
    product: Product,
}

#[derive(Serialize, Deserialize)]
struct RunRef {
    run_id: String,
}

#[derive(Serialize, Deserialize, Default)]
struct StartJob {
    #[serde(default)]
    full: bool,
}

struct Syncer {
    config: SyncConfig,
    source: Option<Source>,
    target: Option<Target>,
    limiter: RateLimiter,
    breakers: ClosedCache,
}

fn page_job(p: &PageJob, max_attempts: u32) -> NewJob {
    NewJob::new(PAGE_KIND, p)
        .queue(QUEUE)
        .max_attempts(max_attempts.max(3))
        .backoff(Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30)))
        .tag(format!("sync:{}", p.run_id))
}

fn push_job(run_id: &str, product: Product, max_attempts: u32) -> NewJob {
    NewJob::new(PUSH_KIND, &PushJob { run_id: run_id.into(), product })
        .queue(QUEUE)
        .max_attempts(max_attempts)
        .backoff(Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60)))
        .tag(format!("sync:{run_id}"))
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

/// A transactional completion's result as a job result: a lost lease means another worker
/// owns the job now.
fn ack<T>(r: Result<T, BackendError>) -> JobResult {
    match r {
        Ok(_) | Err(BackendError::LeaseLost(_)) => Ok(()),
        Err(e) => Err(JobError::retry(e)),
    }
}

fn hex_hash(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// What the target should hold for a product, as one hash.
fn product_hash(p: &Product) -> String {
    let mut v: Vec<String> = p.variants.iter().map(|v| format!("{}\t{}\t{}", v.sku, v.price_cents, v.stock)).collect();
    v.sort();
    hex_hash(&v.join("\n"))
}

fn placeholders(from: usize, n: usize) -> String {
    (from..from + n).map(|i| format!("${i}")).collect::<Vec<_>>().join(", ")
}

fn audit_rows(tx: &mut dyn Tx, run_id: Option<&str>, audits: &[Audit]) -> Result<(), BackendError> {
    let rows: Vec<Vec<SqlValue>> = audits
        .iter()
        .map(|a| {
            vec![
                run_id.map(str::to_string).into(),
                a.partner.into(),
                a.method.into(),
                a.url.clone().into(),
                a.status.map(|s| s as i64).into(),
                a.duration_ms.into(),
                a.error.clone().into(),
                a.at.into(),
            ]
        })
        .collect();
    insert_many(tx, "INSERT INTO sync_requests (run_id, partner, method, url, status, duration_ms, error, at)", &rows, "")?;
    Ok(())
}

/// A failure kept for replay; the same (run, stage, product) is one row whose retries count up.
fn record_failure(
    tx: &mut dyn Tx,
    run_id: &str,
    stage: &str,
    product_id: Option<&str>,
    error: &str,
    payload: &str,
) -> Result<(), BackendError> {
    let id =
        hex_hash(&format!("{run_id}\n{stage}\n{}\n{}", product_id.unwrap_or_default(), if product_id.is_none() { payload } else { "" }));
    tx.execute(
        "INSERT INTO sync_failures (id, run_id, stage, product_id, error, payload, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (id) DO UPDATE SET error = excluded.error, payload = excluded.payload, retries = sync_failures.retries + 1, resolved_at = NULL",
        &[id.into(), run_id.into(), stage.into(), product_id.map(str::to_string).into(), error.into(), payload.into(), now_ms().into()],
    )?;
    Ok(())
}

fn set_item(tx: &mut dyn Tx, run_id: &str, product: &Product, outcome: &str, changed: bool) -> Result<(), BackendError> {
    tx.execute(
        "INSERT INTO sync_items (run_id, product_id, outcome, changed, since, updated_ms, at) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (run_id, product_id) DO UPDATE SET outcome = excluded.outcome, changed = CASE WHEN excluded.changed = 1 THEN 1 ELSE sync_items.changed END, at = excluded.at",
        &[
            run_id.into(),
            product.id.clone().into(),
            outcome.into(),
            (changed as i64).into(),
            product.updated_at.clone().into(),
            product.updated_ms.into(),
            now_ms().into(),
        ],
    )?;
    Ok(())
}

/// One change to send: a field of a variant, and the key that makes sending it twice harmless.
#[derive(Clone, Debug)]
struct Change {
    sku: String,
    field: Field,
    value: i64,
    key: String,
}

impl Syncer {
    fn source(&self) -> Result<&Source, JobError> {
        self.source.as_ref().ok_or_else(|| JobError::abort(SyncError::NotConfigured("CONVEYOR_SYNC_SOURCE_URL")))
    }

    fn target(&self) -> Result<&Target, JobError> {
        self.target.as_ref().ok_or_else(|| JobError::abort(SyncError::NotConfigured("CONVEYOR_SYNC_TARGET_URL")))
    }

    /// The run's listener: the first page job joins the batch (from the cursor, unless full).
    async fn first_page(&self, ev: RunEvent, ctx: JobContext) -> JobResult {
        let max = self.config.max_attempts;
        ack(ctx
            .complete_with(move |tx| {
                let rows = tx.query("SELECT status FROM sync_runs WHERE id = $1", &[ev.run_id.clone().into()])?;
                if rows.first().and_then(|r| r.text(0)) != Some("running") {
                    return Ok(());
                }
                let cursor = if ev.scope == "full" { None } else { read_cursor(tx)? };
                let job = page_job(&PageJob { run_id: ev.run_id, batch_id: ev.batch_id.clone(), page: 1, cursor }, max);
                batch::add_jobs_in(tx, &ev.batch_id, vec![job])
            })
            .await)
    }

    async fn page(&self, job: PageJob, ctx: JobContext) -> JobResult {
        let backend = ctx.backend().clone();
        let rows = backend.query("SELECT status, scope FROM sync_runs WHERE id = $1", vec![job.run_id.clone().into()]).await?;
        match rows.first().and_then(|r| r.text(0)) {
            Some("running") => {}
            // Cancelled, failed or gone: the chain stops here.
            _ => return Ok(()),
        }
        let source = self.source()?;
        let (result, audit) = source.page(job.page, job.cursor.as_ref().map(|c| c.since.as_str())).await;
        let page = match result {
            Ok(p) => p,
            Err(e) => {
                let last = ctx.attempt >= ctx.max_attempts || matches!(e, CallError::Permanent(_));
                let (run, error, at_page) = (job.run_id.clone(), e.to_string(), job.page);
                let cursor = serde_json::to_string(&job.cursor).unwrap_or_default();
                backend
                    .transact(move |tx| {
                        audit_rows(tx, Some(&run), &[audit])?;
                        if last {
                            let payload = json!({ "page": at_page, "cursor": cursor }).to_string();
                            record_failure(tx, &run, "page", None, &format!("source page {at_page}: {error}"), &payload)?;
                        }
                        Ok(())
                    })
                    .await?;
                return Err(match e {
                    CallError::Permanent(m) => JobError::abort(m),
                    CallError::RateLimited { retry_after } => JobError::release(retry_after.unwrap_or(Duration::from_secs(1))),
                    CallError::Transient { error, retry_after: Some(a) } => JobError::retry_after(error, a),
                    CallError::Transient { error, retry_after: None } => JobError::retry(error),
                });
            }
        };
        let cv = ctx.conveyor.clone();
        let max = self.config.max_attempts;
        ack(ctx.complete_with(move |tx| apply_page(&cv, tx, job, page, audit, max)).await)
    }

    async fn push(&self, job: PushJob, ctx: JobContext) -> JobResult {
        let backend = ctx.backend().clone();
        let target = self.target()?.clone();
        let product = job.product.clone();
        let skus: Vec<SqlValue> = product.variants.iter().map(|v| v.sku.clone().into()).collect();
        let sql = format!("SELECT sku, price_cents, stock FROM sync_variants WHERE sku IN ({})", placeholders(1, skus.len()));
        let stored: HashMap<String, (Option<i64>, Option<i64>)> = backend
            .query(&sql, skus)
            .await?
            .iter()
            .map(|r| (r.text(0).unwrap_or_default().to_string(), (r.opt_int(1), r.opt_int(2))))
            .collect();
        let mut changes = Vec::new();
        for v in &product.variants {
            let (price, stock) = stored.get(&v.sku).copied().unwrap_or((None, None));
            for (field, value, last) in [(Field::Price, v.price_cents, price), (Field::Stock, v.stock, stock)] {
                if last != Some(value) {
                    let key = hex_hash(&format!("{}\n{}\n{value}\n{}", v.sku, field.as_str(), product.updated_at));
                    changes.push(Change { sku: v.sku.clone(), field, value, key });
                }
            }
        }
        let run_id = job.run_id.clone();
        if changes.is_empty() {
            return ack(ctx.complete_with(move |tx| settle(tx, &run_id, &product, &[], &[], "unchanged")).await);
        }

        let breaker = Breaker::new(ctx.conveyor.clone(), TARGET_BREAKER, self.config.breaker.clone());
        if let Permit::Rejected { retry_after } = self.breakers.allow(&breaker).await? {
            return Err(JobError::release(retry_after));
        }
        let burst = self.limiter.limit().burst.max(1) as usize;
        let (mut done, mut audits): (Vec<Change>, Vec<Audit>) = (Vec::new(), Vec::new());
        let mut failure: Option<CallError> = None;
        'send: for chunk in changes.chunks(burst) {
            // Units for the whole chunk at once; a short wait is taken here, a long one releases
            // the job (progress kept).
            loop {
                match self.limiter.check_n("target", chunk.len() as u32).await? {
                    Decision::Allowed { .. } => break,
                    Decision::Limited { retry_after } if retry_after <= Duration::from_secs(5) => {
                        let jitter = Duration::from_millis(rand::random::<u64>() % (retry_after.as_millis() as u64 / 2 + 5));
                        tokio::time::sleep(retry_after + jitter).await;
                    }
                    Decision::Limited { retry_after } => {
                        failure = Some(CallError::RateLimited { retry_after: Some(retry_after) });
                        break 'send;
                    }
                }
            }
            for c in chunk {
                let (result, audit) = target.update(&c.sku, c.field, c.value, &c.key).await;
                audits.push(audit);
                match result {
                    Ok(()) => done.push(c.clone()),
                    Err(e) => {
                        failure = Some(e);
                        break 'send;
                    }
                }
            }
        }
        let Some(e) = failure else {
            let name = breaker.name().to_string();
            let out = ctx
                .complete_with(move |tx| {
                    breaker.record_in(tx, true, now_ms())?;
                    settle(tx, &run_id, &product, &done, &audits, "pushed")
                })
                .await;
            self.breakers.succeeded(&name);
            return ack(out);
        };

        // Not all sent: keep what was, and decide what the job does next.
        let mut open = false;
        if matches!(e, CallError::Transient { .. }) {
            self.breakers.failed(breaker.name());
            breaker.record(false).await?;
            open = matches!(breaker.info().await?.state.as_str(), "open");
        }
        let last = matches!(e, CallError::Permanent(_))
            || (!open && ctx.attempt >= ctx.max_attempts && !matches!(e, CallError::RateLimited { .. }));
        let cv = ctx.conveyor.clone();
        let error = e.to_string();
        backend
            .transact(move |tx| {
                audit_rows(tx, Some(&run_id), &audits)?;
                remember(tx, &product, &done)?;
                if last {
                    let payload = serde_json::to_string(&product).unwrap_or_default();
                    record_failure(tx, &run_id, "push", Some(&product.id), &error, &payload)?;
                    set_item(tx, &run_id, &product, "failed", true)?;
                    cv.emit_in(tx, Event::new(PUSH_FAILED, &json!({ "run_id": run_id, "product_id": product.id, "error": error })))?;
                }
                Ok(())
            })
            .await?;
        Err(match e {
            CallError::Permanent(m) => JobError::abort(m),
            CallError::RateLimited { retry_after } => JobError::release(retry_after.unwrap_or(Duration::from_secs(1))),
            // The breaker opened on this failure: wait for it without spending the attempt.
            CallError::Transient { .. } if open => JobError::release(self.config.breaker.open_for),
            CallError::Transient { error, retry_after: Some(a) } => JobError::retry_after(error, a),
            CallError::Transient { error, retry_after: None } => JobError::retry(error),
        })
    }
}

fn read_cursor(tx: &mut dyn Tx) -> Result<Option<Cursor>, BackendError> {
    let rows = tx.query("SELECT since, after_ms, after_id FROM sync_cursor WHERE name = 'products'", &[])?;
    Ok(rows.first().map(|r| Cursor {
        since: r.text(0).unwrap_or_default().into(),
        after_ms: r.int(1),
        after_id: r.text(2).unwrap_or_default().into(),
    }))
}

fn write_cursor(tx: &mut dyn Tx, c: &Cursor) -> Result<(), BackendError> {
    tx.execute(
        "INSERT INTO sync_cursor (name, since, after_ms, after_id, updated_at) VALUES ('products', $1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET since = excluded.since, after_ms = excluded.after_ms, after_id = excluded.after_id, updated_at = excluded.updated_at",
        &[c.since.clone().into(), c.after_ms.into(), c.after_id.clone().into(), now_ms().into()],
    )?;
    Ok(())
}

/// A page's effects, in its job's acknowledgement: failures, unchanged items, push jobs, the
/// next page, the cursor and the audit row.
fn apply_page(
    cv: &Conveyor,
    tx: &mut dyn Tx,
    job: PageJob,
    page: connector::SourcePage,
    audit: Audit,
    max: u32,
) -> Result<(), BackendError> {
    let run = tx.query("SELECT status FROM sync_runs WHERE id = $1", &[job.run_id.clone().into()])?;
    if run.first().and_then(|r| r.text(0)) != Some("running") {
        return Ok(());
    }
    audit_rows(tx, Some(&job.run_id), &[audit])?;
    let run_id = job.run_id.as_str();
    for b in &page.bad {
        let pid = b.id.clone().unwrap_or_else(|| format!("#{}", hex_hash(&b.raw.to_string())));
        let error = format!("record {}: {}", b.id.as_deref().unwrap_or("without id"), b.reason);
        record_failure(tx, run_id, "record", Some(&pid), &error, &b.raw.to_string())?;
        let placeholder =
            Product { id: pid, sku: String::new(), title: String::new(), updated_at: String::new(), updated_ms: 0, variants: vec![] };
        set_item(tx, run_id, &placeholder, "failed", false)?;
    }
    let fresh: Vec<Product> = page.products.into_iter().filter(|p| job.cursor.as_ref().is_none_or(|c| c.passes(p))).collect();
    let mut stored: HashMap<String, String> = HashMap::new();
    if !fresh.is_empty() {
        let ids: Vec<SqlValue> = fresh.iter().map(|p| p.id.clone().into()).collect();
        let sql = format!("SELECT id, hash FROM sync_products WHERE id IN ({})", placeholders(1, ids.len()));
        stored = tx
            .query(&sql, &ids)?
            .iter()
            .map(|r| (r.text(0).unwrap_or_default().to_string(), r.text(1).unwrap_or_default().to_string()))
            .collect();
    }
    let mut jobs = Vec::new();
    let mut items = Vec::new();
    let now = now_ms();
    let new_cursor = fresh.iter().max_by(|a, b| a.key().cmp(&b.key())).map(|p| Cursor {
        since: p.updated_at.clone(),
        after_ms: p.updated_ms,
        after_id: p.id.clone(),
    });
    for p in fresh {
        let changed = stored.get(&p.id) != Some(&product_hash(&p));
        items.push(vec![
            run_id.into(),
            p.id.clone().into(),
            (if changed { "pending" } else { "unchanged" }).into(),
            (changed as i64).into(),
            p.updated_at.clone().into(),
            p.updated_ms.into(),
            now.into(),
        ]);
        if changed {
            cv.emit_in(tx, Event::new(PRODUCT_CHANGED, &json!({ "run_id": run_id, "product_id": p.id, "sku": p.sku })))?;
            jobs.push(push_job(run_id, p, max));
        }
    }
    insert_many(
        tx,
        "INSERT INTO sync_items (run_id, product_id, outcome, changed, since, updated_ms, at)",
        &items,
        "ON CONFLICT (run_id, product_id) DO UPDATE SET outcome = excluded.outcome, changed = excluded.changed, since = excluded.since, updated_ms = excluded.updated_ms, at = excluded.at",
    )?;
    if page.has_more {
        // Keyset paging: from the newest product read, page 1 again; within a run of equal
        // times that fills whole pages, the next page number.
        let next = match &new_cursor {
            Some(c) => PageJob { run_id: run_id.into(), batch_id: job.batch_id.clone(), page: 1, cursor: Some(c.clone()) },
            None => PageJob { run_id: run_id.into(), batch_id: job.batch_id.clone(), page: job.page + 1, cursor: job.cursor.clone() },
        };
        jobs.push(page_job(&next, max));
    }
    if let Some(c) = &new_cursor {
        let ahead = match read_cursor(tx)? {
            Some(old) => (c.after_ms, c.after_id.as_str()) > (old.after_ms, old.after_id.as_str()),
            None => true,
        };
        if ahead {
            write_cursor(tx, c)?;
        }
    }
    tx.execute(
        "UPDATE sync_runs SET pages = pages + 1, cursor = $2 WHERE id = $1",
        &[run_id.into(), new_cursor.as_ref().or(job.cursor.as_ref()).map(|c| serde_json::to_string(c).unwrap_or_default()).into()],
    )?;
    if !jobs.is_empty() {
        batch::add_jobs_in(tx, &job.batch_id, jobs)?;
    }
    Ok(())
}

/// What was sent is what the target now has: per variant and field.
fn remember(tx: &mut dyn Tx, product: &Product, done: &[Change]) -> Result<(), BackendError> {
    if done.is_empty() {
        return Ok(());
    }
    let mut by_sku: Vec<(String, Option<i64>, Option<i64>)> = Vec::new();
    for c in done {
        let i = match by_sku.iter().position(|(s, ..)| *s == c.sku) {
            Some(i) => i,
            None => {
                by_sku.push((c.sku.clone(), None, None));
                by_sku.len() - 1
            }
        };
        match c.field {
            Field::Price => by_sku[i].1 = Some(c.value),
            Field::Stock => by_sku[i].2 = Some(c.value),
        }
    }
    let now = now_ms();
    let rows: Vec<Vec<SqlValue>> = by_sku
        .into_iter()
        .map(|(sku, price, stock)| vec![sku.into(), product.id.clone().into(), price.into(), stock.into(), now.into()])
        .collect();
    insert_many(
        tx,
        "INSERT INTO sync_variants (sku, product_id, price_cents, stock, pushed_at)",
        &rows,
        "ON CONFLICT (sku) DO UPDATE SET price_cents = COALESCE(excluded.price_cents, sync_variants.price_cents),
                                         stock = COALESCE(excluded.stock, sync_variants.stock), pushed_at = excluded.pushed_at",
    )?;
    Ok(())
}

/// A product fully in step with the target: its hash, its item, its audit rows, and any
/// failure it had is resolved.
fn settle(tx: &mut dyn Tx, run_id: &str, product: &Product, done: &[Change], audits: &[Audit], outcome: &str) -> Result<(), BackendError> {
    remember(tx, product, done)?;
    tx.execute(
        "INSERT INTO sync_products (id, hash, pushed_at) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, pushed_at = excluded.pushed_at",
        &[product.id.clone().into(), product_hash(product).into(), now_ms().into()],
    )?;
    set_item(tx, run_id, product, outcome, false)?;
    if !audits.is_empty() {
        audit_rows(tx, Some(run_id), audits)?;
    }
    tx.execute(
        "UPDATE sync_failures SET resolved_at = $2 WHERE product_id = $1 AND resolved_at IS NULL",
        &[product.id.clone().into(), now_ms().into()],
    )?;
    Ok(())
}

/// The batch's `finally`: the run's status and counts, the `sync.run_finished` event, and for
/// a cancelled run the cursor moved back to its first product not pushed.
fn finish(cv: &Conveyor, tx: &mut dyn Tx, run_id: &str) -> Result<(), BackendError> {
    let rows = tx.query("SELECT status, batch_id FROM sync_runs WHERE id = $1", &[run_id.into()])?;
    let Some(r) = rows.first() else { return Ok(()) };
    let (status, batch_id) = (r.text(0).unwrap_or_default().to_string(), r.text(1).unwrap_or_default().to_string());
    let counts = live_counts(&tx.query(COUNT_SQL, &[run_id.into()])?);
    let cancelled =
        tx.query("SELECT cancelled_at FROM batches WHERE id = $1", &[batch_id.into()])?.first().and_then(|r| r.opt_int(0)).is_some();
    let page_failed =
        tx.query("SELECT error FROM sync_failures WHERE run_id = $1 AND stage = 'page' AND resolved_at IS NULL", &[run_id.into()])?;
    let (new_status, error) = if status != "running" {
        (status.clone(), None)
    } else if cancelled {
        ("cancelled".to_string(), None)
    } else if let Some(e) = page_failed.first() {
        ("failed".to_string(), e.text(0).map(str::to_string))
    } else if counts.failed > 0 {
        ("completed_with_failures".to_string(), None)
    } else {
        ("completed".to_string(), None)
    };
    tx.execute(
        "UPDATE sync_runs SET status = $2, finished_at = COALESCE(finished_at, $3), error = COALESCE(error, $4),
                seen = $5, changed = $6, pushed = $7, unchanged = $8, failed = $9 WHERE id = $1",
        &[
            run_id.into(),
            new_status.clone().into(),
            now_ms().into(),
            error.into(),
            (counts.seen as i64).into(),
            (counts.changed as i64).into(),
            (counts.pushed as i64).into(),
            (counts.unchanged as i64).into(),
            (counts.failed as i64).into(),
        ],
    )?;
    if new_status == "cancelled" {
        // Products read but not pushed (their jobs were skipped) must be read again: the next
        // run starts just before the first of them.
        let first = tx.query(
            "SELECT since, updated_ms FROM sync_items WHERE run_id = $1 AND outcome = 'pending' ORDER BY updated_ms, product_id LIMIT 1",
            &[run_id.into()],
        )?;
        if let Some(f) = first.first() {
            write_cursor(tx, &Cursor { since: f.text(0).unwrap_or_default().into(), after_ms: f.int(1), after_id: String::new() })?;
        }
    }
    if new_status.starts_with("completed") {
        tx.execute("UPDATE sync_failures SET resolved_at = $1 WHERE stage = 'page' AND resolved_at IS NULL", &[now_ms().into()])?;
    }
    cv.emit_in(tx, Event::new(RUN_FINISHED, &json!({ "run_id": run_id, "status": new_status, "counts": counts })))?;
    Ok(())
}

// --- failures -------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Replayed {
    /// Failures sent again as push jobs.
    pub replayed: u64,
    /// Bad records that still do not validate (kept, their retries counted).
    pub still_invalid: u64,
    /// The batch of the replayed jobs (none when nothing was replayed).
    pub batch_id: Option<String>,
}

/// Replays stored failures: failed pushes and bad records that now validate go out again as
/// push jobs in one batch; a success resolves them. (A failed page is not replayed: the next
/// run resumes from the cursor, and completing resolves it.)
pub async fn retry_failures(conveyor: &Conveyor, config: &SyncConfig) -> Result<Replayed, SyncError> {
    if let Some(missing) = config.missing() {
        return Err(SyncError::NotConfigured(missing));
    }
    let fields = config.source.as_ref().map(|s| s.fields.clone()).unwrap_or_default();
    let max = config.max_attempts;
    let out = conveyor
        .backend()
        .transact(move |tx| {
            let rows = tx.query(
                "SELECT id, run_id, stage, payload FROM sync_failures WHERE resolved_at IS NULL AND stage IN ('push', 'record') ORDER BY created_at, id",
                &[],
            )?;
            let (mut jobs, mut invalid) = (Vec::new(), Vec::new());
            for r in &rows {
                let (id, run_id, stage, payload) =
                    (r.text(0).unwrap_or_default(), r.text(1).unwrap_or_default(), r.text(2).unwrap_or_default(), r.text(3).unwrap_or_default());
                let product = match stage {
                    "push" => serde_json::from_str::<Product>(payload).ok(),
                    _ => serde_json::from_str::<Value>(payload).ok().and_then(|raw| connector::product(&fields, &raw).ok()),
                };
                match product {
                    Some(p) => jobs.push(push_job(run_id, p, max)),
                    None => invalid.push(id.to_string()),
                }
            }
            for id in &invalid {
                tx.execute("UPDATE sync_failures SET retries = retries + 1 WHERE id = $1", &[id.clone().into()])?;
            }
            let replayed = jobs.len() as u64;
            let batch_id = if jobs.is_empty() { None } else { Some(Batch::new("sync retry-failures").allow_failures().extend(jobs).dispatch_in(tx)?) };
            Ok(Replayed { replayed, still_invalid: invalid.len() as u64, batch_id })
        })
        .await?;
    Ok(out)
}

// --- health ---------------------------------------------------------------------------------

#[derive(Clone, Debug, Serialize, PartialEq, Default)]
pub struct PartnerStats {
    pub requests_24h: u64,
    /// Answers other than 2xx, and requests that got no answer.
    pub errors_24h: u64,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    pub p99_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Health {
    pub configured: bool,
    pub last_run: Option<RunInfo>,
    /// Failures recorded in the last 24 hours, and those not resolved yet (any age).
    pub failures_24h: u64,
    pub unresolved_failures: u64,
    pub breakers: Vec<BreakerInfo>,
    /// Per partner (`source`, `target`), over the last 24 hours.
    pub partners: std::collections::BTreeMap<String, PartnerStats>,
    /// The p95 request duration per partner (ms), as `GET /health` shows it.
    pub p95_ms: std::collections::BTreeMap<String, Option<i64>>,
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

pub async fn health(backend: &dyn QueueBackend, config: &SyncConfig) -> conveyor_core::backend::Result<Health> {
    let since = now_ms() - 24 * 3600 * 1000;
    let last = backend.query(&format!("SELECT {RUN_COLS} FROM sync_runs ORDER BY started_at DESC, id DESC LIMIT 1"), vec![]).await?;
    let last_run = match last.first().map(run_info) {
        Some(r) if r.status == "running" => run(backend, &r.id).await?,
        other => other,
    };
    let count = |rows: Vec<conveyor_core::backend::Row>| rows.first().map_or(0, |r| r.int(0)).max(0) as u64;
    let failures_24h = count(backend.query("SELECT count(*) FROM sync_failures WHERE created_at >= $1", vec![since.into()]).await?);
    let unresolved_failures = count(backend.query("SELECT count(*) FROM sync_failures WHERE resolved_at IS NULL", vec![]).await?);
    let mut breakers: Vec<BreakerInfo> =
        breaker::list(backend, config.breaker.window).await?.into_iter().filter(|b| b.name.starts_with("sync:")).collect();
    if !breakers.iter().any(|b| b.name == TARGET_BREAKER) {
        breakers.push(BreakerInfo { name: TARGET_BREAKER.into(), state: "closed".into(), failure_rate: 0.0, calls: 0, opened_at: None });
    }
    let mut partners = std::collections::BTreeMap::new();
    let mut p95 = std::collections::BTreeMap::new();
    for partner in ["source", "target"] {
        let rows = backend
            .query("SELECT duration_ms, status FROM sync_requests WHERE partner = $1 AND at >= $2", vec![partner.into(), since.into()])
            .await?;
        let errors = rows.iter().filter(|r| r.opt_int(1).is_none_or(|s| !(200..300).contains(&s))).count() as u64;
        let mut d: Vec<i64> = rows.iter().map(|r| r.int(0)).collect();
        d.sort_unstable();
        let stats = PartnerStats {
            requests_24h: d.len() as u64,
            errors_24h: errors,
            p50_ms: percentile(&d, 50.0),
            p95_ms: percentile(&d, 95.0),
            p99_ms: percentile(&d, 99.0),
        };
        p95.insert(partner.to_string(), stats.p95_ms);
        partners.insert(partner.to_string(), stats);
    }
    Ok(Health { configured: config.is_configured(), last_run, failures_24h, unresolved_failures, breakers, partners, p95_ms: p95 })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_target_limit_keeps_a_burst_and_a_second_under_the_configured_rps() {
        for rps in [1u32, 2, 5, 10, 50, 100, 1000, 100_000] {
            let c = SyncConfig { target_rps: rps, ..SyncConfig::default() };
            let l = c.target_limit();
            let per_second = l.limit as f64 / l.period.as_secs_f64();
            // Worst case in one wall-clock second: a full burst, then the rate for a second
            // plus 10% of jitter.
            let worst = l.burst as f64 + per_second * 1.1;
            assert!(worst <= rps.max(2) as f64, "rps {rps}: {l:?} allows {worst}");
            assert!(l.burst >= 1 && per_second >= 0.5 * (rps - l.burst) as f64, "rps {rps}: {l:?} wastes the limit");
        }
    }

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<i64> = (1..=100).collect();
        assert_eq!((percentile(&v, 50.0), percentile(&v, 95.0), percentile(&v, 99.0)), (Some(50), Some(95), Some(99)));
        assert_eq!(percentile(&[7], 99.0), Some(7));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn cursors_order_by_time_then_id() {
        let c = Cursor { since: "t".into(), after_ms: 10, after_id: "P2".into() };
        let p = |ms: i64, id: &str| Product {
            id: id.into(),
            sku: String::new(),
            title: String::new(),
            updated_at: String::new(),
            updated_ms: ms,
            variants: vec![],
        };
        assert!(
            !c.passes(&p(10, "P1"))
                && !c.passes(&p(10, "P2"))
                && c.passes(&p(10, "P3"))
                && c.passes(&p(11, "P0"))
                && !c.passes(&p(9, "P9"))
        );
    }
}
