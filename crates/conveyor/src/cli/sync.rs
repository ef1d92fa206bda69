//! `conveyor sync products|retry-failures|health`: run the product sync to the end (with
//! in-process workers when none serve the sync queue), replay failures, show its health.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Subcommand;

use conveyor_apps::sync;
use conveyor_core::worker::SupervisorConfig;
use conveyor_core::Conveyor;

use crate::cli::config::Config;
use crate::cli::run::{open_store, registry};

#[derive(Subcommand)]
pub(crate) enum SyncCommand {
    /// Run the product synchroniser to the end (joins a run already going)
    Products {
        /// Read the whole catalogue, not only what changed since the cursor
        #[arg(long)]
        full: bool,
        /// Print one JSON document
        #[arg(long)]
        json: bool,
    },
    /// Replay failed sync items and wait for them
    RetryFailures {
        #[arg(long)]
        json: bool,
    },
    /// Last runs, failure counts, breaker states, request durations per partner
    Health {
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(config: &Config, cmd: SyncCommand) -> anyhow::Result<()> {
    let backend = open_store(config).await?;
    let conveyor = Conveyor::new(backend.clone(), registry(config, &backend)?);
    let sc = &config.apps.sync;
    match cmd {
        SyncCommand::Products { full, json } => {
            if let Some(missing) = sc.missing() {
                bail!("product sync is not configured: set {missing}");
            }
            let started = sync::start(&conveyor, full).await?;
            if started.joined {
                eprintln!("a sync run is already going: following run {}", started.run_id);
            } else {
                eprintln!("sync run {} started ({})", started.run_id, if full { "full" } else { "incremental" });
            }
            let t0 = Instant::now();
            let run = with_workers(&conveyor, || async {
                let mut last = Instant::now();
                loop {
                    let r = sync::run(backend.as_ref(), &started.run_id).await?.context("the run disappeared")?;
                    if r.status != "running" && sync::settled(backend.as_ref()).await? {
                        return Ok(r);
                    }
                    if last.elapsed() >= Duration::from_secs(2) {
                        let c = &r.counts;
                        eprintln!(
                            "{}: {} pages, {} seen, {} pushed, {} unchanged, {} failed ({:.0} products/s)",
                            r.status,
                            r.pages,
                            c.seen,
                            c.pushed,
                            c.unchanged,
                            c.failed,
                            c.seen as f64 / t0.elapsed().as_secs_f64().max(0.001)
                        );
                        last = Instant::now();
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
            .await?;
            let secs = t0.elapsed().as_secs_f64();
            if json {
                println!("{}", serde_json::to_string(&serde_json::json!({ "run": run, "seconds": secs }))?);
            } else {
                let c = &run.counts;
                println!(
                    "run {} {}: {} seen, {} changed, {} pushed, {} unchanged, {} failed in {secs:.1}s ({:.0} products/s)",
                    run.id,
                    run.status,
                    c.seen,
                    c.changed,
                    c.pushed,
                    c.unchanged,
                    c.failed,
                    c.seen as f64 / secs.max(0.001)
                );
            }
            if run.status == "failed" {
                bail!("sync run {} failed: {}", run.id, run.error.unwrap_or_default());
            }
            Ok(())
        }
        SyncCommand::RetryFailures { json } => {
            let r = sync::retry_failures(&conveyor, sc).await?;
            let mut still_failing = 0;
            if let Some(batch_id) = &r.batch_id {
                eprintln!("replaying {} failures (batch {batch_id})", r.replayed);
                let info = with_workers(&conveyor, || async {
                    loop {
                        let b = conveyor_core::batch::find(backend.as_ref(), batch_id).await?.context("the batch disappeared")?;
                        if b.finished_at.is_some() {
                            return Ok(b);
                        }
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                })
                .await?;
                still_failing = info.failed;
            }
            if json {
                println!(
                    "{}",
                    serde_json::to_string(
                        &serde_json::json!({ "replayed": r.replayed, "still_invalid": r.still_invalid, "still_failing": still_failing, "batch_id": r.batch_id })
                    )?
                );
            } else {
                println!("replayed {}, still failing {still_failing}, records still invalid {}", r.replayed, r.still_invalid);
            }
            Ok(())
        }
        SyncCommand::Health { json } => {
            let h = sync::health(backend.as_ref(), sc).await?;
            if json {
                println!("{}", serde_json::to_string(&h)?);
                return Ok(());
            }
            println!("configured: {}", if h.configured { "yes" } else { "no (set CONVEYOR_SYNC_SOURCE_URL and CONVEYOR_SYNC_TARGET_URL)" });
            match &h.last_run {
                Some(r) => {
                    let c = &r.counts;
                    println!(
                        "last run:   {} {} ({}), {} seen, {} pushed, {} unchanged, {} failed",
                        r.id, r.status, r.scope, c.seen, c.pushed, c.unchanged, c.failed
                    );
                }
                None => println!("last run:   none yet"),
            }
            println!("failures:   {} in the last 24 h, {} unresolved", h.failures_24h, h.unresolved_failures);
            for b in &h.breakers {
                println!("breaker:    {} {} (failure rate {:.0}% over {} calls)", b.name, b.state, b.failure_rate * 100.0, b.calls);
            }
            for (name, p) in &h.partners {
                let ms = |v: Option<i64>| v.map_or("-".to_string(), |v| format!("{v} ms"));
                println!(
                    "{name:<11} {} requests, {} errors in 24 h; p50 {}, p95 {}, p99 {}",
                    p.requests_24h,
                    p.errors_24h,
                    ms(p.p50_ms),
                    ms(p.p95_ms),
                    ms(p.p99_ms)
                );
            }
            Ok(())
        }
    }
}

/// Runs `wait` with workers for the sync queue in this process whenever no live worker serves
/// it (re-checked every second: a worker killed a moment ago still looks alive for a while).
async fn with_workers<T, F, Fut>(conveyor: &Conveyor, wait: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    crate::cli::run::with_local_workers(conveyor, sync_supervisor(), wait).await
}

/// The sync queue's supervisor: pushes wait on the partner, not on the CPU; a short lease so a
/// killed worker's jobs come back within seconds.
pub(crate) fn sync_supervisor() -> SupervisorConfig {
    let mut sup = SupervisorConfig::new("sync", vec![sync::QUEUE.into()], 64);
    sup.prefetch = 64;
    sup.lease = Duration::from_secs(10);
    sup
}
