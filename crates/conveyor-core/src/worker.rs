//! The worker runtime: supervisors that reserve jobs in batches, run them with bounded
//! concurrency, and acknowledge them in batches; lease heartbeats, the reaper, the worker
//! registry heartbeat, and graceful shutdown.
//!
//! Data flow inside one process:
//!
//! ```text
//! fetcher (per supervisor) ──reserve N──▶ job tasks (≤ concurrency run, ≤ prefetch wait)
//!        ▲ wakeup / poll                        │ Completion
//!        └──────── permits returned ◀───────────┤
//!                                               ▼
//!                                    flusher ──complete(batch)──▶ backend
//! ```

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, warn, Instrument};

use crate::backend::{PoolInfo, ReserveRequest, SupervisorInfo, WorkerInfo};
use crate::balance::{allocate, Balance, Pool};
use crate::clock::now_ms;
use crate::job::{Completion, Job, JobId, Outcome};
use crate::registry::{CompletionSlot, ErrorAction, JobContext, JobError};
use crate::Conveyor;

/// One supervisor: a set of queues served by a pool of executors.
#[derive(Clone, Debug)]
pub struct SupervisorConfig {
    pub name: String,
    /// In strict priority order.
    pub queues: Vec<String>,
    /// Jobs run at once.
    pub concurrency: usize,
    /// Jobs reserved ahead of a free executor, so executors never wait for a round trip.
    pub prefetch: usize,
    /// How long a reservation lasts without a heartbeat.
    pub lease: Duration,
    /// How executors are shared among the queues (see [`Balance`]).
    pub balance: Balance,
    /// With balancing, the fewest executors a queue gets.
    pub min_workers: usize,
}

impl SupervisorConfig {
    pub fn new(name: impl Into<String>, queues: Vec<String>, concurrency: usize) -> Self {
        let concurrency = concurrency.max(1);
        SupervisorConfig {
            name: name.into(),
            queues,
            concurrency,
            prefetch: concurrency,
            lease: Duration::from_secs(30),
            balance: Balance::Off,
            min_workers: 1,
        }
    }
}

/// The whole worker process.
#[derive(Clone, Debug)]
pub struct WorkerConfig {
    pub supervisors: Vec<SupervisorConfig>,
    /// After shutdown is requested, how long running jobs may take to finish before they are
    /// cancelled and released back to the queue.
    pub shutdown_grace: Duration,
    /// How often an idle fetcher looks for work enqueued by other processes.
    pub poll_interval: Duration,
    /// How often the reaper looks for expired leases.
    pub reap_interval: Duration,
    /// How often the worker registers itself.
    pub heartbeat_interval: Duration,
    /// The most completions acknowledged in one backend call.
    pub flush_max: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        WorkerConfig {
            supervisors: vec![SupervisorConfig::new("default", vec![crate::job::DEFAULT_QUEUE.into()], 8)],
            shutdown_grace: Duration::from_secs(30),
            poll_interval: Duration::from_millis(100),
            reap_interval: Duration::from_secs(5),
            heartbeat_interval: Duration::from_secs(5),
            flush_max: 1024,
        }
    }
}

/// Counts of what a worker did, returned when it stops.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct WorkerReport {
    pub completed: u64,
    pub retried: u64,
    pub failed: u64,
    pub released: u64,
}

#[derive(Default)]
struct Counters {
    completed: AtomicU64,
    retried: AtomicU64,
    failed: AtomicU64,
    released: AtomicU64,
}

/// Jobs this process holds a lease on, and whether each has started.
type Leases = Arc<Mutex<HashMap<JobId, (i64, bool)>>>;

/// Batches known to be cancelled. Only "cancelled" is remembered — cancelling is one-way, so
/// that answer never goes stale — while "not cancelled" is asked again for every job, so no
/// job starts after its batch's cancellation committed.
#[derive(Default)]
struct CancelledBatches {
    seen: Mutex<std::collections::HashSet<String>>,
}

impl CancelledBatches {
    async fn contains(&self, conveyor: &Conveyor, batch_id: &str) -> bool {
        if self.seen.lock().expect("batch cache poisoned").contains(batch_id) {
            return true;
        }
        let cancelled = crate::batch::is_cancelled(conveyor.backend().as_ref(), batch_id).await.unwrap_or(false);
        if cancelled {
            let mut seen = self.seen.lock().expect("batch cache poisoned");
            if seen.len() > 10_000 {
                seen.clear();
            }
            seen.insert(batch_id.to_string());
        }
        cancelled
    }
}

struct Supervisor {
    config: SupervisorConfig,
    pools: Vec<Arc<Pool>>,
    leases: Leases,
    processed: AtomicU64,
    cancelled: Arc<CancelledBatches>,
}

/// Runs workers until `shutdown` is cancelled, then drains them gracefully.
pub async fn run(conveyor: Conveyor, config: WorkerConfig, shutdown: CancellationToken) -> WorkerReport {
    let worker_id = format!("{}:{}:{}", hostname(), std::process::id(), &JobId::new().to_string()[24..]);
    let backend = conveyor.backend().clone();
    let counters = Arc::new(Counters::default());
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
    let hard_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let started_at = now_ms();

    let cancelled = Arc::new(CancelledBatches::default());
    let supervisors: Vec<Arc<Supervisor>> = config
        .supervisors
        .iter()
        .map(|s| {
            Arc::new(Supervisor {
                config: s.clone(),
                pools: pools_of(s),
                leases: Arc::default(),
                processed: AtomicU64::new(0),
                cancelled: cancelled.clone(),
            })
        })
        .collect();

    info!(worker = %worker_id, supervisors = supervisors.len(), "worker started");
    let flusher = tokio::spawn(flush_loop(conveyor.clone(), done_rx, config.flush_max));
    let background = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat_loop(
        conveyor.clone(),
        supervisors.clone(),
        worker_id.clone(),
        started_at,
        config.heartbeat_interval,
        shutdown.clone(),
        background.clone(),
    ));
    let reaper = tokio::spawn(reap_loop(conveyor.clone(), config.reap_interval, background.clone()));

    let mut fetchers = Vec::new();
    let mut balancers = Vec::new();
    for sup in &supervisors {
        if sup.config.balance == Balance::Auto && sup.pools.len() > 1 {
            balancers.push(tokio::spawn(balance_loop(conveyor.clone(), sup.clone(), background.clone())));
        }
        for pool in &sup.pools {
            let ctx = FetchCtx {
                conveyor: conveyor.clone(),
                sup: sup.clone(),
                pool: pool.clone(),
                worker_id: worker_id.clone(),
                done: done_tx.clone(),
                shutdown: shutdown.clone(),
                hard_stop: hard_stop.clone(),
                tracker: tracker.clone(),
                poll: config.poll_interval,
                counters: counters.clone(),
            };
            fetchers.push(tokio::spawn(fetch_loop(ctx)));
        }
    }
    drop(done_tx);

    shutdown.cancelled().await;
    info!(worker = %worker_id, grace_s = config.shutdown_grace.as_secs_f64(), "shutting down: no new reservations");
    let stopping = snapshot(&worker_id, started_at, &supervisors, "stopping");
    let _ = backend.worker_heartbeat(stopping).await;
    for f in fetchers {
        let _ = f.await;
    }
    tracker.close();
    if tokio::time::timeout(config.shutdown_grace, tracker.wait()).await.is_err() {
        warn!(worker = %worker_id, "grace period over: cancelling running jobs and releasing them");
        hard_stop.cancel();
        tracker.wait().await;
    }
    // Every job task has sent its completion and dropped its sender: the flusher drains and ends.
    let _ = flusher.await;
    background.cancel();
    let _ = heartbeat.await;
    let _ = reaper.await;
    for b in balancers {
        let _ = b.await;
    }
    if let Err(e) = backend.worker_gone(&worker_id).await {
        warn!(error = %e, "could not unregister the worker");
    }
    let report = WorkerReport {
        completed: counters.completed.load(Ordering::Relaxed),
        retried: counters.retried.load(Ordering::Relaxed),
        failed: counters.failed.load(Ordering::Relaxed),
        released: counters.released.load(Ordering::Relaxed),
    };
    info!(worker = %worker_id, ?report, "worker stopped");
    report
}

struct FetchCtx {
    conveyor: Conveyor,
    sup: Arc<Supervisor>,
    pool: Arc<Pool>,
    worker_id: String,
    done: mpsc::UnboundedSender<Completion>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    tracker: TaskTracker,
    poll: Duration,
    counters: Arc<Counters>,
}

/// How long a reserve already under way may still take once shutdown begins.
const RESERVE_AT_SHUTDOWN: Duration = Duration::from_secs(5);

async fn fetch_loop(ctx: FetchCtx) {
    let cfg = &ctx.sup.config;
    let slots = ctx.pool.slots.clone();
    // Refill at a low-water mark rather than per freed slot: reserve calls stay large under
    // load, and executors never starve because at least `concurrency` jobs are still held
    // whenever fewer than `refill` slots are free.
    let refill = (ctx.pool.prefetch / 2).max(1) as u32;
    let wakeup = ctx.conveyor.backend().wakeup();
    let mut error_delay = Duration::from_millis(50);
    loop {
        let first = tokio::select! {
            biased;
            _ = ctx.shutdown.cancelled() => return,
            p = slots.clone().acquire_many_owned(refill) => p.expect("semaphore never closed"),
        };
        let mut permits = first;
        let extra = slots.available_permits();
        if extra > 0 {
            if let Ok(more) = slots.clone().try_acquire_many_owned(extra as u32) {
                permits.merge(more);
            }
        }
        if ctx.pool.capacity() == 0 {
            // A balanced pool shrunk to nothing reserves nothing: jobs it held would wait for
            // an executor that never comes while their leases kept being extended.
            drop(permits);
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = tokio::time::sleep(ctx.poll) => {}
            }
            continue;
        }
        let want = permits.num_permits();
        let mark = wakeup.mark();
        let req = ReserveRequest { queues: ctx.pool.queues.clone(), max: want, lease: cfg.lease, worker: ctx.worker_id.clone() };
        // A reserve stuck on a broken connection must not hold shutdown up: once shutdown
        // begins it gets a few seconds more, then is abandoned (what it may have reserved comes
        // back when its lease expires).
        let reserve = ctx.conveyor.backend().reserve(req);
        tokio::pin!(reserve);
        let reserved = tokio::select! {
            r = &mut reserve => r,
            _ = ctx.shutdown.cancelled() => match tokio::time::timeout(RESERVE_AT_SHUTDOWN, &mut reserve).await {
                Ok(r) => r,
                Err(_) => {
                    warn!(supervisor = %cfg.name, "a reserve still pending at shutdown was abandoned");
                    return;
                }
            },
        };
        let jobs = match reserved {
            Ok(jobs) => {
                error_delay = Duration::from_millis(50);
                jobs
            }
            Err(e) => {
                warn!(supervisor = %cfg.name, error = %e, "reserve failed; retrying");
                drop(permits);
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(error_delay) => {}
                }
                error_delay = (error_delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        let got = jobs.len();
        {
            let mut leases = ctx.sup.leases.lock().expect("leases poisoned");
            for job in &jobs {
                leases.insert(job.id, (job.lease_token, false));
            }
        }
        for job in jobs {
            let permit = permits.split(1).expect("one permit per reserved job");
            let task = JobTask {
                conveyor: ctx.conveyor.clone(),
                sup: ctx.sup.clone(),
                pool: ctx.pool.clone(),
                done: ctx.done.clone(),
                shutdown: ctx.shutdown.clone(),
                hard_stop: ctx.hard_stop.clone(),
                counters: ctx.counters.clone(),
            };
            ctx.tracker.spawn(task.run(job, permit));
        }
        drop(permits);
        if got == 0 {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return,
                _ = wakeup.wait(mark, ctx.poll) => {}
            }
        }
    }
}

struct JobTask {
    conveyor: Conveyor,
    sup: Arc<Supervisor>,
    pool: Arc<Pool>,
    done: mpsc::UnboundedSender<Completion>,
    shutdown: CancellationToken,
    hard_stop: CancellationToken,
    counters: Arc<Counters>,
}

impl JobTask {
    async fn run(self, job: Job, _slot: OwnedSemaphorePermit) {
        let span = tracing::info_span!("job", job_id = %job.id, queue = %job.queue, kind = %job.kind, attempt = job.attempt);
        async move {
            let template = Completion::of(&job, Outcome::Completed);
            // A job reserved ahead waits for an executor; if shutdown comes first it goes back
            // to the queue unrun, without consuming an attempt.
            let exec = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => None,
                p = self.pool.exec.clone().acquire_owned() => p.ok(),
            };
            let Some(_exec) = exec else {
                self.finish(Completion { outcome: Outcome::Release { at: now_ms() }, ..template });
                return;
            };
            if let Some(entry) = self.sup.leases.lock().expect("leases poisoned").get_mut(&job.id) {
                entry.1 = true;
            }
            let started = Instant::now();
            let slot = Arc::new(Mutex::new(CompletionSlot { template: template.clone(), reserved_at: now_ms(), done: false, lost: false }));
            let outcome = self.execute(&job, slot.clone()).await;
            let runtime_ms = started.elapsed().as_millis() as u64;
            self.sup.processed.fetch_add(1, Ordering::Relaxed);
            let (done, lost) = {
                let slot = slot.lock().expect("completion slot poisoned");
                (slot.done, slot.lost)
            };
            if done {
                // The handler recorded its completion itself (complete_with); if its lease was
                // lost, the job belongs to another worker now and nothing was committed here.
                self.sup.leases.lock().expect("leases poisoned").remove(&job.id);
                if !lost {
                    self.count(&Outcome::Completed);
                }
                return;
            }
            self.finish(Completion { outcome, runtime_ms, ..template });
        }
        .instrument(span)
        .await
    }

    async fn execute(&self, job: &Job, slot: Arc<Mutex<CompletionSlot>>) -> Outcome {
        if let Some(batch) = &job.batch_id {
            if self.sup.cancelled.contains(&self.conveyor, batch).await {
                info!(batch = %batch, "skipped: its batch was cancelled");
                return Outcome::Completed;
            }
        }
        let Some(handler) = self.conveyor.registry().get(&job.kind) else {
            let error = format!("no handler registered for job kind {:?}", job.kind);
            error!(%error, "job failed");
            return Outcome::Failed { error };
        };
        let ctx = JobContext {
            id: job.id,
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            tags: job.tags.clone(),
            batch_id: job.batch_id.clone(),
            workflow: job.workflow.clone(),
            cancel: self.hard_stop.child_token(),
            conveyor: self.conveyor.clone(),
            completion: slot,
        };
        let chain = self.conveyor.registry().middleware_of(&job.kind);
        let guard = match crate::middleware::before(&self.conveyor, job, chain).await {
            Ok(g) => g,
            Err(outcome) => return outcome,
        };
        let timeout = guard.timeout;
        let fut = std::panic::AssertUnwindSafe(handler(job, ctx)).catch_unwind();
        let timed = async {
            match timeout {
                Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| t),
                None => Ok(fut.await),
            }
        };
        let result: crate::registry::JobResult = tokio::select! {
            r = timed => match r {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) => Err(JobError::retry(format!("panicked: {}", panic_message(&panic)))),
                Err(t) => Err(JobError::retry(format!("timed out after {:.1}s", t.as_secs_f64()))),
            },
            _ = self.hard_stop.cancelled() => {
                debug!("cancelled at shutdown; released");
                crate::middleware::after(&self.conveyor, guard, &Err(JobError::release(Duration::ZERO))).await;
                return Outcome::Release { at: now_ms() };
            }
        };
        crate::middleware::after(&self.conveyor, guard, &result).await;
        let (message, action) = match result {
            Ok(()) => return Outcome::Completed,
            Err(e) => {
                let e = crate::middleware::filter_error(chain, e);
                // The message is stored with the job and shown by the API: no credential of
                // this process may ride along (a driver's error quoting its URL, say).
                (crate::redact::scrub(&e.message), e.action)
            }
        };
        let now = now_ms();
        let out_of_attempts = job.attempt >= job.max_attempts;
        let outcome = match action {
            ErrorAction::Release(after) => return Outcome::Release { at: now + after.as_millis() as i64 },
            ErrorAction::Abort => Outcome::Failed { error: message },
            _ if out_of_attempts => Outcome::Failed { error: message },
            ErrorAction::RetryAfter(after) => Outcome::Retry { at: now + after.as_millis() as i64, error: message },
            ErrorAction::Retry => {
                let delay = job.backoff.clone().unwrap_or_default().delay(job.attempt);
                Outcome::Retry { at: now + delay.as_millis() as i64, error: message }
            }
        };
        match &outcome {
            // An abort is the handler's decision (a declined payment, a bad payload), not an
            // operational problem: it is recorded, but not shouted about.
            Outcome::Failed { error } if action == ErrorAction::Abort => info!(%error, "job failed: aborted by its handler"),
            Outcome::Failed { error } => warn!(%error, "job failed for good"),
            Outcome::Retry { error, .. } => info!(%error, "job attempt failed; will retry"),
            _ => {}
        }
        outcome
    }

    fn finish(&self, completion: Completion) {
        self.sup.leases.lock().expect("leases poisoned").remove(&completion.id);
        self.count(&completion.outcome);
        // The flusher outlives every job task (it ends when the last sender is dropped).
        let _ = self.done.send(completion);
    }

    fn count(&self, outcome: &Outcome) {
        let c = &self.counters;
        let counter = match outcome {
            Outcome::Completed => &c.completed,
            Outcome::Retry { .. } => &c.retried,
            Outcome::Failed { .. } => &c.failed,
            Outcome::Release { .. } => &c.released,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}

/// Acknowledges completions in batches: whatever arrived while the previous batch was being
/// written goes in the next one, so under load one round trip serves many jobs.
async fn flush_loop(conveyor: Conveyor, mut rx: mpsc::UnboundedReceiver<Completion>, max: usize) {
    let backend = conveyor.backend().clone();
    let mut batch = Vec::with_capacity(max);
    while rx.recv_many(&mut batch, max).await > 0 {
        let mut delay = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            match backend.complete(batch.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    tries += 1;
                    if tries >= 20 {
                        // The jobs stay reserved; their leases expire and the reaper returns
                        // them, so nothing is lost — they run again.
                        error!(error = %e, jobs = batch.len(), "could not acknowledge jobs; they will be retried after their lease expires");
                        break;
                    }
                    warn!(error = %e, "acknowledging jobs failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        batch.clear();
    }
}

#[allow(clippy::too_many_arguments)]
async fn heartbeat_loop(
    conveyor: Conveyor,
    supervisors: Vec<Arc<Supervisor>>,
    worker_id: String,
    started_at: i64,
    every: Duration,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let backend = conveyor.backend().clone();
    let lease_every = supervisors.iter().map(|s| s.config.lease / 3).min().unwrap_or(every).max(Duration::from_millis(100));
    let mut lease_tick = tokio::time::interval(lease_every);
    let mut registry_tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lease_tick.tick() => {
                for sup in &supervisors {
                    let leases: Vec<(JobId, i64)> =
                        sup.leases.lock().expect("leases poisoned").iter().map(|(id, (token, _))| (*id, *token)).collect();
                    if leases.is_empty() {
                        continue;
                    }
                    if let Err(e) = backend.extend_leases(leases, sup.config.lease).await {
                        warn!(error = %e, "extending leases failed");
                    }
                }
            }
            _ = registry_tick.tick() => {
                // Once shutdown began the worker reports "stopping" until it is gone, not "running".
                let status = if shutdown.is_cancelled() { "stopping" } else { "running" };
                if let Err(e) = backend.worker_heartbeat(snapshot(&worker_id, started_at, &supervisors, status)).await {
                    warn!(error = %e, "worker heartbeat failed");
                }
            }
        }
    }
}

fn snapshot(worker_id: &str, started_at: i64, supervisors: &[Arc<Supervisor>], status: &str) -> WorkerInfo {
    WorkerInfo {
        id: worker_id.to_string(),
        hostname: hostname(),
        pid: std::process::id(),
        started_at,
        last_seen: now_ms(),
        status: status.to_string(),
        supervisors: supervisors
            .iter()
            .map(|s| {
                let leases = s.leases.lock().expect("leases poisoned");
                let current_jobs: Vec<String> =
                    leases.iter().filter(|(_, (_, started))| *started).take(25).map(|(id, _)| id.to_string()).collect();
                SupervisorInfo {
                    name: s.config.name.clone(),
                    queues: s.config.queues.clone(),
                    concurrency: s.config.concurrency,
                    busy: s.pools.iter().map(|p| p.capacity().saturating_sub(p.exec.available_permits())).sum(),
                    balance: s.config.balance,
                    pools: s.pools.iter().map(|p| PoolInfo { queues: p.queues.clone(), workers: p.capacity() }).collect(),
                    processed: s.processed.load(Ordering::Relaxed),
                    current_jobs,
                }
            })
            .collect(),
    }
}

async fn reap_loop(conveyor: Conveyor, every: Duration, stop: CancellationToken) {
    let backend = conveyor.backend().clone();
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => match backend.reap_expired().await {
                Ok(0) => {}
                Ok(n) => info!(jobs = n, "reclaimed jobs whose lease expired"),
                Err(e) => warn!(error = %e, "reaper failed"),
            }
        }
    }
}

/// The pools of a supervisor: one over all its queues (strict order), or one per queue.
fn pools_of(s: &SupervisorConfig) -> Vec<Arc<Pool>> {
    if s.balance == Balance::Off || s.queues.len() < 2 {
        return vec![Arc::new(Pool::new(s.queues.clone(), s.concurrency, s.prefetch))];
    }
    let shares = allocate(s.concurrency, s.min_workers, &vec![0.0; s.queues.len()]);
    let prefetch = (s.prefetch / s.queues.len()).max(1);
    s.queues.iter().zip(shares).map(|(q, n)| Arc::new(Pool::new(vec![q.clone()], n, prefetch))).collect()
}

/// Re-divides an `auto` supervisor's executors every few seconds by how long each queue's
/// next job has waited (an idle queue keeps its minimum).
async fn balance_loop(conveyor: Conveyor, sup: Arc<Supervisor>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(stats) = conveyor.backend().queues().await else { continue };
        let weights: Vec<f64> = sup
            .pools
            .iter()
            .map(|p| {
                stats.iter().find(|q| q.queue == p.queues[0]).map_or(0.0, |q| {
                    if q.pending > 0 && !q.paused {
                        q.oldest_wait_s + 0.001
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let shares = allocate(sup.config.concurrency, sup.config.min_workers, &weights);
        for (pool, n) in sup.pools.iter().zip(shares) {
            if pool.capacity() != n {
                debug!(supervisor = %sup.config.name, queue = %pool.queues[0], workers = n, "rebalanced");
                pool.resize(n);
            }
        }
    }
}

static HOSTNAME: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn hostname() -> String {
    HOSTNAME
        .get_or_init(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|s| s.trim().to_string())
                .ok()
                .filter(|s| !s.is_empty())
                .or_else(|| std::env::var("HOSTNAME").ok())
                .unwrap_or_else(|| "localhost".into())
        })
        .clone()
}
