//! `conveyor bench`: throughput and latency through the configured backend and the real worker
//! runtime, on its own queue `bench` so a running server does not take its jobs.
//!
//! Phase 1 enqueues N jobs in batches (several batches in flight, as concurrent producers
//! would), then processes them. Phase 2 enqueues at a steady 1,000 jobs/s for 5 s while the
//! workers run and measures enqueue-to-finish (handler end) latency.
//!
//! With `--keys N`, job `n` carries the concurrency key `k<n mod N>` with `--key-limit`
//! (default: the executors, a limit never reached): the cost of keys, and with a low limit how
//! close the workers come to what the limits allow. The jobs count how many of each key run at
//! once and the report says the most seen.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use clap::Args;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig};
use conveyor_core::{Conveyor, JobContext, JobResult, NewJob, QueueBackend, Registry};

use crate::cli::config::Config;
use crate::cli::run::open_backend;

const QUEUE: &str = "bench";
const KIND: &str = "bench.job";

#[derive(Args)]
pub(crate) struct BenchArgs {
    /// Jobs in the throughput phase
    #[arg(long, default_value_t = 100_000)]
    jobs: u64,
    /// Jobs run at once
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Extra payload bytes per job
    #[arg(long, default_value_t = 0)]
    payload: usize,
    /// Simulated work per job (sleep), in milliseconds
    #[arg(long, default_value_t = 0)]
    work_ms: u64,
    /// Jobs reserved ahead of free executors (default: 16 x concurrency, at least 1024)
    #[arg(long)]
    prefetch: Option<usize>,
    /// Jobs per enqueue call in the throughput phase
    #[arg(long, default_value_t = 1_000)]
    batch: usize,
    /// Seconds of the steady-rate latency phase (0 skips it)
    #[arg(long, default_value_t = 5)]
    latency_secs: u64,
    /// Jobs per second in the latency phase
    #[arg(long, default_value_t = 1_000)]
    rate: u64,
    /// Concurrency keys over the jobs (job n has key n mod KEYS); 0: no keys
    #[arg(long, default_value_t = 0)]
    keys: u64,
    /// Each key's concurrency limit (default: --concurrency, never reached)
    #[arg(long)]
    key_limit: Option<u32>,
    /// Benchmark fair queueing instead: tenant A enqueues --jobs jobs of --work-ms, then
    /// tenant B 100; reports B's wait (use --prefetch to change the worker's default)
    #[arg(long)]
    fairness: bool,
    /// With --fairness: the same without fairness keys, first in first out, for comparison
    #[arg(long, requires = "fairness")]
    fifo: bool,
    /// Benchmark notifications instead: --jobs events, each delivered to a signed webhook
    /// receiver on loopback
    #[arg(long)]
    webhooks: bool,
    /// Benchmark an HTTP kind instead: --jobs jobs, each a signed POST to a receiver on
    /// loopback that verifies it
    #[arg(long)]
    http_kinds: bool,
}

#[derive(Deserialize)]
struct Payload {
    /// Enqueue time in unix microseconds (latency phase only).
    #[serde(default)]
    t: Option<u64>,
    /// The job's key (with --keys).
    #[serde(default)]
    k: Option<usize>,
}

struct Shared {
    done: AtomicU64,
    latencies_us: Mutex<Vec<u64>>,
    work: Duration,
    /// Per key: (running now, most at once), counted by the jobs.
    per_key: Vec<(AtomicU32, AtomicU32)>,
}

/// The keys of a run: (count, limit); `None` without keys.
#[derive(Clone, Copy)]
struct Keys {
    count: u64,
    limit: u32,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub(crate) async fn run(config: Config, args: BenchArgs) -> anyhow::Result<()> {
    if args.webhooks {
        #[cfg(feature = "notify")]
        return crate::cli::bench_notify::run(config, args.jobs, args.concurrency).await;
        #[cfg(not(feature = "notify"))]
        bail!("--webhooks benchmarks the notifications, which this build does not have (feature notify)");
    }
    if args.fairness {
        return crate::cli::bench_fair::run(config, args.jobs, args.concurrency, args.work_ms, args.prefetch, args.fifo).await;
    }
    if args.http_kinds {
        return crate::cli::bench_http::run(config, args.jobs, args.concurrency).await;
    }
    if args.jobs == 0 || args.concurrency == 0 || args.batch == 0 {
        bail!("--jobs, --concurrency and --batch must be at least 1");
    }
    let limit = args.key_limit.unwrap_or(args.concurrency.min(conveyor_core::flow::MAX_LIMIT as usize) as u32);
    if args.keys > 0 {
        conveyor_core::flow::Concurrency::new("k0", limit).map_err(|e| anyhow::anyhow!("--key-limit: {e}"))?;
    } else if args.key_limit.is_some() {
        bail!("--key-limit needs --keys");
    }
    let keys = (args.keys > 0).then_some(Keys { count: args.keys, limit });
    let backend = open_backend(&config)?;
    let leftover = backend.clear(QUEUE).await?;
    if leftover > 0 {
        eprintln!("bench: removed {leftover} jobs left on queue {QUEUE} by an earlier run");
    }
    let shared = Arc::new(Shared {
        done: AtomicU64::new(0),
        latencies_us: Mutex::default(),
        work: Duration::from_millis(args.work_ms),
        per_key: (0..args.keys).map(|_| (AtomicU32::new(0), AtomicU32::new(0))).collect(),
    });
    let mut registry = Registry::new();
    let s = shared.clone();
    registry.register(KIND, move |p: Payload, _ctx: JobContext| {
        let s = s.clone();
        async move {
            let key = p.k.and_then(|k| s.per_key.get(k));
            if let Some((running, most)) = key {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
            }
            if !s.work.is_zero() {
                tokio::time::sleep(s.work).await;
            }
            if let Some((running, _)) = key {
                running.fetch_sub(1, Ordering::SeqCst);
            }
            if let Some(t) = p.t {
                let lat = now_us().saturating_sub(t);
                s.latencies_us.lock().expect("latency list poisoned").push(lat);
            }
            s.done.fetch_add(1, Ordering::Relaxed);
            JobResult::Ok(())
        }
    });
    let conveyor = Conveyor::new(backend.clone(), registry);
    let pad = "x".repeat(args.payload);

    // Phase 1a: enqueue.
    eprintln!("bench: enqueueing {} jobs on {} ({} per batch)…", args.jobs, backend.name(), args.batch);
    let t0 = Instant::now();
    let producers = 4u64;
    let mut tasks = Vec::new();
    for p in 0..producers {
        let conveyor = conveyor.clone();
        let pad = pad.clone();
        let (jobs, batch) = (args.jobs, args.batch as u64);
        tasks.push(tokio::spawn(async move {
            let mut i = p * batch;
            while i < jobs {
                let end = (i + batch).min(jobs);
                let batch_jobs: Vec<NewJob> = (i..end).map(|n| job(n, &pad, None, keys)).collect();
                conveyor.dispatch_many(batch_jobs).await?;
                i += producers * batch;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await.context("enqueue task")??;
    }
    let enqueue_s = t0.elapsed().as_secs_f64();
    let enqueue_per_s = args.jobs as f64 / enqueue_s;
    eprintln!("bench: enqueued {} jobs in {enqueue_s:.2}s ({enqueue_per_s:.0} jobs/s)", args.jobs);

    // Phase 1b: process.
    let shutdown = CancellationToken::new();
    let mut sup = SupervisorConfig::new("bench", vec![QUEUE.into()], args.concurrency);
    sup.prefetch = args.prefetch.unwrap_or((args.concurrency * 16).max(1024));
    let wc = WorkerConfig { supervisors: vec![sup], shutdown_grace: Duration::from_secs(30), ..WorkerConfig::default() };
    let t1 = Instant::now();
    let workers = tokio::spawn(worker::run(conveyor.clone(), wc, shutdown.clone()));
    wait_drained(&backend, &shared, args.jobs, "processing").await?;
    let process_s = t1.elapsed().as_secs_f64();
    let process_per_s = args.jobs as f64 / process_s;
    eprintln!("bench: processed {} jobs in {process_s:.2}s ({process_per_s:.0} jobs/s)", args.jobs);

    // Phase 2: steady rate, enqueue-to-finish latency.
    let (p50, p99) = if args.latency_secs > 0 && args.rate > 0 {
        let total = args.rate * args.latency_secs;
        eprintln!("bench: latency phase: {} jobs/s for {}s…", args.rate, args.latency_secs);
        let before = shared.done.load(Ordering::Relaxed);
        let tick = Duration::from_millis(10);
        let per_tick = (args.rate as f64 / 100.0).max(1.0);
        let start = Instant::now();
        let mut sent = 0u64;
        let mut interval = tokio::time::interval(tick);
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        while sent < total {
            interval.tick().await;
            let due = ((start.elapsed().as_secs_f64() / tick.as_secs_f64()) * per_tick).ceil() as u64;
            let n = due.min(total).saturating_sub(sent);
            if n == 0 {
                continue;
            }
            let t = now_us();
            conveyor.dispatch_many((0..n).map(|i| job(sent + i, &pad, Some(t), keys)).collect()).await?;
            sent += n;
        }
        wait_drained(&backend, &shared, before + total, "latency").await?;
        let mut lat = std::mem::take(&mut *shared.latencies_us.lock().expect("latency list poisoned"));
        lat.sort_unstable();
        (pct(&lat, 0.50), pct(&lat, 0.99))
    } else {
        (0.0, 0.0)
    };
    shutdown.cancel();
    workers.await.context("worker task")?;
    let keyed = match keys {
        None => String::new(),
        Some(k) => {
            let most = shared.per_key.iter().map(|(_, m)| m.load(Ordering::SeqCst)).max().unwrap_or(0);
            format!(" keys={} key_limit={} most_running_per_key={most}", k.count, k.limit)
        }
    };
    println!(
        "bench: backend={} jobs={} concurrency={} enqueue_per_s={:.0} process_per_s={:.0} p50_ms={:.2} p99_ms={:.2}{keyed}",
        backend.name(),
        args.jobs,
        args.concurrency,
        enqueue_per_s,
        process_per_s,
        p50,
        p99
    );
    Ok(())
}

fn job(n: u64, pad: &str, t: Option<u64>, keys: Option<Keys>) -> NewJob {
    let mut fields = format!("\"i\":{n}");
    if let Some(t) = t {
        fields.push_str(&format!(",\"t\":{t}"));
    }
    if let Some(k) = keys {
        fields.push_str(&format!(",\"k\":{}", n % k.count));
    }
    if !pad.is_empty() {
        fields.push_str(&format!(",\"pad\":\"{pad}\""));
    }
    let job = NewJob::raw(KIND, format!("{{{fields}}}")).queue(QUEUE);
    match keys {
        None => job,
        Some(k) => job.concurrency(
            conveyor_core::flow::Concurrency::new(format!("k{}", n % k.count), k.limit).expect("the limit was checked at start"),
        ),
    }
}

fn pct(sorted_us: &[u64], q: f64) -> f64 {
    if sorted_us.is_empty() {
        return 0.0;
    }
    let i = ((sorted_us.len() as f64 - 1.0) * q).round() as usize;
    sorted_us[i] as f64 / 1000.0
}

/// Waits until `target` jobs ran and the bench queue holds nothing (every ack is committed).
async fn wait_drained(backend: &Arc<dyn QueueBackend>, shared: &Shared, target: u64, phase: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut last_report = Instant::now();
    loop {
        let done = shared.done.load(Ordering::Relaxed);
        if done >= target {
            let q = backend.queues().await?;
            let busy = q.iter().find(|q| q.queue == QUEUE).map_or(0, |q| q.pending + q.reserved + q.delayed);
            if busy == 0 {
                return Ok(());
            }
        }
        if last_report.elapsed() > Duration::from_secs(2) {
            eprintln!("bench: {phase}: {done}/{target} jobs run after {:.1}s", started.elapsed().as_secs_f64());
            last_report = Instant::now();
        }
        if started.elapsed() > Duration::from_secs(600) {
            bail!("{phase} did not finish within 10 minutes ({done}/{target} jobs run)");
        }
        tokio::time::sleep(Duration::from_millis(if done >= target { 2 } else { 10 })).await;
    }
}
