//! `conveyor bench --fairness`: tenant A enqueues `--jobs` jobs of `--work-ms` each (in batches
//! of 1,000, as fast as the backend takes them), then tenant B enqueues 100, on a queue worked
//! by `--concurrency` executors with the worker's default prefetch (the buffered jobs count).
//! Reported: B's wait from its enqueue to each job's start (p50, p99, max), and how many of A's
//! jobs ran meanwhile. `--fifo` runs the same without fairness keys, for comparison. A's jobs
//! left when B is done are removed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig};
use conveyor_core::{Conveyor, JobContext, JobResult, NewJob, Registry};

use crate::cli::config::Config;
use crate::cli::run::open_backend;

const QUEUE: &str = "bench-fair";
const KIND: &str = "bench.fair";
/// Tenant B's jobs.
const LATE: u64 = 100;

#[derive(Deserialize)]
struct Payload {
    /// Tenant B's enqueue time, unix microseconds.
    #[serde(default)]
    t: Option<u64>,
}

#[derive(Default)]
struct Shared {
    a_started: AtomicU64,
    b_started: AtomicU64,
    b_waits_us: Mutex<Vec<u64>>,
}

fn now_us() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

pub(crate) async fn run(
    config: Config,
    jobs: u64,
    concurrency: usize,
    work_ms: u64,
    prefetch: Option<usize>,
    fifo: bool,
) -> anyhow::Result<()> {
    if jobs == 0 || concurrency == 0 {
        bail!("--jobs and --concurrency must be at least 1");
    }
    let backend = open_backend(&config)?;
    let leftover = backend.clear(QUEUE).await?;
    if leftover > 0 {
        eprintln!("bench: removed {leftover} jobs left on queue {QUEUE} by an earlier run");
    }
    let shared = Arc::new(Shared::default());
    let mut registry = Registry::new();
    let s = shared.clone();
    let work = Duration::from_millis(work_ms);
    registry.register(KIND, move |p: Payload, _ctx: JobContext| {
        let s = s.clone();
        async move {
            match p.t {
                Some(t) => {
                    s.b_waits_us.lock().expect("wait list poisoned").push(now_us().saturating_sub(t));
                    s.b_started.fetch_add(1, Ordering::SeqCst);
                }
                None => {
                    s.a_started.fetch_add(1, Ordering::Relaxed);
                }
            }
            if !work.is_zero() {
                tokio::time::sleep(work).await;
            }
            JobResult::Ok(())
        }
    });
    let conveyor = Conveyor::new(backend.clone(), registry);
    let job = |tenant: &str, n: u64, t: Option<u64>| {
        let payload = match t {
            Some(t) => format!("{{\"n\":{n},\"t\":{t}}}"),
            None => format!("{{\"n\":{n}}}"),
        };
        let job = NewJob::raw(KIND, payload).queue(QUEUE);
        if fifo {
            job
        } else {
            job.fairness(tenant)
        }
    };

    let shutdown = CancellationToken::new();
    let mut sup = SupervisorConfig::new("bench-fair", vec![QUEUE.into()], concurrency);
    if let Some(p) = prefetch {
        sup.prefetch = p;
    }
    let prefetch = sup.prefetch;
    let wc = WorkerConfig { supervisors: vec![sup], shutdown_grace: Duration::from_secs(30), ..WorkerConfig::default() };
    let workers = tokio::spawn(worker::run(conveyor.clone(), wc, shutdown.clone()));

    eprintln!("bench: tenant A enqueues {jobs} jobs of {work_ms} ms on {} ({concurrency} executors, prefetch {prefetch})…", backend.name());
    let t0 = Instant::now();
    let mut n = 0;
    while n < jobs {
        let end = (n + 1_000).min(jobs);
        conveyor.dispatch_many((n..end).map(|i| job("A", i, None)).collect()).await?;
        n = end;
    }
    let a_enqueue_s = t0.elapsed().as_secs_f64();
    let a_before = shared.a_started.load(Ordering::Relaxed);
    eprintln!("bench: A enqueued in {a_enqueue_s:.2}s; {a_before} of them started meanwhile; tenant B enqueues {LATE}…");
    let t = now_us();
    let tb = Instant::now();
    conveyor.dispatch_many((0..LATE).map(|i| job("B", i, Some(t))).collect()).await?;
    let deadline = Duration::from_secs(if fifo { 3600 } else { 120 });
    let mut last_report = Instant::now();
    while shared.b_started.load(Ordering::SeqCst) < LATE {
        if tb.elapsed() > deadline {
            bail!("tenant B's jobs did not all start within {}s", deadline.as_secs());
        }
        if last_report.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "bench: {}/{LATE} of B's jobs started after {:.1}s",
                shared.b_started.load(Ordering::SeqCst),
                tb.elapsed().as_secs_f64()
            );
            last_report = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let a_between = shared.a_started.load(Ordering::Relaxed) - a_before;
    shutdown.cancel();
    workers.await.context("worker task")?;
    let removed = backend.clear(QUEUE).await?;
    let mut waits = std::mem::take(&mut *shared.b_waits_us.lock().expect("wait list poisoned"));
    waits.sort_unstable();
    let pct = |q: f64| waits[((waits.len() as f64 - 1.0) * q).round() as usize] as f64 / 1e6;
    println!(
        "bench: backend={} fairness={} a_jobs={jobs} work_ms={work_ms} concurrency={concurrency} prefetch={prefetch} \
         b_wait_p50_s={:.3} b_wait_p99_s={:.3} b_wait_max_s={:.3} a_started_while_b_waited={a_between} a_removed_after={removed}",
        backend.name(),
        if fifo { "off" } else { "on" },
        pct(0.5),
        pct(0.99),
        pct(1.0),
    );
    Ok(())
}
