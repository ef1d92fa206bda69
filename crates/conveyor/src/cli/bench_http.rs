//! `conveyor bench --http-kinds`: an HTTP kind end to end on the configured store — N jobs of a
//! kind whose URL is a receiver on loopback that verifies every Standard Webhooks signature
//! and answers 204. Reports jobs enqueued per second and jobs completed (called, answered,
//! acknowledged) per second, through the same runtime, supervisor and client `serve` uses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use tokio_util::sync::CancellationToken;

use conveyor_apps::kinds::{self, HttpKind};
use conveyor_apps::signing;
use conveyor_core::worker::{self, WorkerConfig};
use conveyor_core::{Conveyor, NewJob, Registry};

use crate::cli::config::Config;
use crate::cli::run::open_store;

pub(crate) async fn run(config: Config, jobs: u64, concurrency: usize) -> anyhow::Result<()> {
    if jobs == 0 || concurrency == 0 {
        bail!("--jobs and --concurrency must be at least 1");
    }
    let backend = open_store(&config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let secret = signing::generate();

    // The receiver: counts calls whose signature verifies.
    let valid = Arc::new(AtomicU64::new(0));
    let invalid = Arc::new(AtomicU64::new(0));
    let (v, i, s) = (valid.clone(), invalid.clone(), secret.clone());
    let app = axum::Router::new().route(
        "/job",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (v, i, s) = (v.clone(), i.clone(), s.clone());
            async move {
                if signing::verify(&s, &headers, &body, conveyor_core::clock::now_ms() / 1000, 300) {
                    v.fetch_add(1, Ordering::Relaxed);
                    StatusCode::NO_CONTENT
                } else {
                    i.fetch_add(1, Ordering::Relaxed);
                    StatusCode::UNAUTHORIZED
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let name = format!("bench.http.{:08x}", rand::random::<u32>());
    let mut kind = HttpKind::new(name.clone(), format!("http://{addr}/job"));
    kind.secrets = vec![secret];
    kind.concurrency = concurrency;
    let leftover = backend.clear(&kind.queue).await?;
    if leftover > 0 {
        eprintln!("bench: removed {leftover} jobs left on queue {}", kind.queue);
    }
    let mut registry = Registry::new();
    kinds::register(&mut registry, backend.clone(), std::slice::from_ref(&kind)).map_err(|e| anyhow::anyhow!(e))?;
    let conveyor = Conveyor::new(backend.clone(), registry);

    eprintln!("bench: enqueueing {jobs} jobs of HTTP kind {name} on {} (1,000 per call)…", backend.name());
    let t0 = Instant::now();
    let mut n = 0u64;
    while n < jobs {
        let end = (n + 1_000).min(jobs);
        let batch: Vec<NewJob> = (n..end).map(|i| NewJob::new(name.clone(), &serde_json::json!({ "n": i }))).collect();
        conveyor.dispatch_many(batch).await?;
        n = end;
    }
    let enqueue_s = t0.elapsed().as_secs_f64();
    eprintln!("bench: enqueued {jobs} jobs in {enqueue_s:.2}s ({:.0} jobs/s)", jobs as f64 / enqueue_s);

    let shutdown = CancellationToken::new();
    let supervisors = kinds::supervisors(std::slice::from_ref(&kind), &[]);
    let wc = WorkerConfig { supervisors, ..WorkerConfig::default() };
    let t1 = Instant::now();
    let workers = tokio::spawn(worker::run(conveyor.clone(), wc, shutdown.clone()));
    let mut last = Instant::now();
    loop {
        if invalid.load(Ordering::Relaxed) > 0 {
            bail!("the receiver rejected a signature");
        }
        // Done means acknowledged: the queue is empty (checked once the receiver saw them all).
        if valid.load(Ordering::Relaxed) >= jobs {
            let q = backend.queues().await?;
            if q.iter().find(|q| q.queue == kind.queue).is_none_or(|q| q.pending + q.reserved + q.delayed == 0) {
                break;
            }
        }
        if last.elapsed() > Duration::from_secs(2) {
            eprintln!("bench: {}/{jobs} called after {:.1}s", valid.load(Ordering::Relaxed), t1.elapsed().as_secs_f64());
            last = Instant::now();
        }
        if t1.elapsed() > Duration::from_secs(600) {
            bail!("the jobs did not finish within 10 minutes ({}/{jobs})", valid.load(Ordering::Relaxed));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run_s = t1.elapsed().as_secs_f64();
    shutdown.cancel();
    workers.await.context("workers")?;
    let received = valid.load(Ordering::Relaxed);
    println!(
        "bench: backend={} http_jobs={jobs} concurrency={concurrency} enqueue_per_s={:.0} http_jobs_per_s={:.0} received={received} rejected={}",
        backend.name(),
        jobs as f64 / enqueue_s,
        jobs as f64 / run_s,
        invalid.load(Ordering::Relaxed)
    );
    if received != jobs {
        bail!("the receiver got {received} calls for {jobs} jobs (a job called twice?)");
    }
    Ok(())
}
