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

mod loops;
mod task;

use loops::*;
use task::*;

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
    /// How long a concurrency slot a job ended with is kept for its key's next job while
    /// nobody waits for the key (see `crate::flow::Bank`).
    pub keep_slots: Duration,
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
            keep_slots: crate::flow::KEEP_IDLE,
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
    /// The concurrency key and slot name of each running job that holds a slot (see
    /// `crate::flow`).
    slots: Arc<Mutex<HashMap<JobId, (String, String)>>>,
    /// The process's kept slots, shared by its supervisors.
    bank: Arc<crate::flow::Bank>,
    processed: AtomicU64,
    cancelled: Arc<CancelledBatches>,
}

/// Runs workers until `shutdown` is cancelled, then drains them gracefully.
pub async fn run(conveyor: Conveyor, config: WorkerConfig, shutdown: CancellationToken) -> WorkerReport {
    // `<host>:<pid>:<machine>.<random>`: if this process dies, the reapers of this machine see
    // it ([`crate::liveness`]) and its jobs run again at once.
    let worker_id = crate::liveness::holder(&hostname(), Some(&JobId::new().to_string()[30..]));
    let backend = conveyor.backend().clone();
    let counters = Arc::new(Counters::default());
    let (done_tx, done_rx) = mpsc::unbounded_channel::<Completion>();
    let hard_stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let started_at = now_ms();

    let cancelled = Arc::new(CancelledBatches::default());
    let bank = Arc::new(crate::flow::Bank::default());
    let supervisors: Vec<Arc<Supervisor>> = config
        .supervisors
        .iter()
        .map(|s| {
            Arc::new(Supervisor {
                config: s.clone(),
                pools: pools_of(s),
                leases: Arc::default(),
                slots: Arc::default(),
                bank: bank.clone(),
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
    let reaper = tokio::spawn(reap_loop(conveyor.clone(), bank.clone(), config.keep_slots, config.reap_interval, background.clone()));

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
    // Kept concurrency slots go back to their keys (and to the jobs in line).
    for (key, name) in bank.idle(Duration::ZERO) {
        if let Err(e) = crate::flow::release_named(backend.as_ref(), &key, &name).await {
            warn!(error = %e, %key, "giving back a kept concurrency slot failed; it expires with the lease");
        }
    }
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

/// The pools of a supervisor: one over all its queues (strict order), or one per queue.
fn pools_of(s: &SupervisorConfig) -> Vec<Arc<Pool>> {
    if s.balance == Balance::Off || s.queues.len() < 2 {
        return vec![Arc::new(Pool::new(s.queues.clone(), s.concurrency, s.prefetch))];
    }
    let shares = allocate(s.concurrency, s.min_workers, &vec![0.0; s.queues.len()]);
    let prefetch = (s.prefetch / s.queues.len()).max(1);
    s.queues.iter().zip(shares).map(|(q, n)| Arc::new(Pool::new(vec![q.clone()], n, prefetch))).collect()
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
