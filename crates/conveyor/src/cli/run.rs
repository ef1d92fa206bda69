//! `serve` and `work`: open the backend, start workers (and the HTTP API), and stop them all
//! on SIGINT / SIGTERM through one shared cancellation token.

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::Args;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use conveyor_backends::BackendConfig;
use conveyor_core::scheduler::Scheduler;
use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig};
use conveyor_core::{Conveyor, QueueBackend};

use crate::cli::config::Config;
use crate::cli::kinds;

#[derive(Args)]
pub(crate) struct ServeArgs {
    /// Serve the API without running workers
    #[arg(long)]
    no_workers: bool,
    /// Do not run the scheduler in this process
    #[arg(long)]
    no_scheduler: bool,
}

#[derive(Args)]
pub(crate) struct WorkArgs {
    /// Queues to work, in priority order (overrides the configured supervisors)
    #[arg(long, value_delimiter = ',')]
    queue: Vec<String>,
    /// Jobs run at once
    #[arg(long)]
    concurrency: Option<usize>,
    /// Also serve the Faktory work protocol on CONVEYOR_FAKTORY_ADDR
    #[arg(long)]
    faktory: bool,
}

/// The backend with every application's tables migrated.
pub(crate) async fn open_store(config: &Config) -> anyhow::Result<Arc<dyn QueueBackend>> {
    let backend = open_backend(config)?;
    conveyor_apps::migrate(backend.as_ref()).await.context("migrating the applications' tables")?;
    conveyor_server::access::migrate(backend.as_ref()).await.context("migrating the server's tables")?;
    conveyor_apps::kinds::prepare(backend.as_ref(), &config.apps.kinds).await.context("giving the HTTP kinds their signing secrets")?;
    Ok(backend)
}

/// Every job kind this process runs: the built-in ones, the applications' (HTTP kinds
/// included) and those of the application embedding Conveyor ([`crate::App`]), which may not
/// take a name already taken.
pub(crate) fn registry(config: &Config, backend: &Arc<dyn QueueBackend>) -> anyhow::Result<conveyor_core::Registry> {
    let mut r = kinds::registry();
    conveyor_apps::register(&mut r, backend.clone(), &config.apps).map_err(|e| anyhow::anyhow!(e))?;
    let mut mine = conveyor_core::Registry::new();
    for f in &config.app.registrations {
        f(&mut mine);
    }
    if let Some(k) = mine.kinds().find(|k| r.contains(k)) {
        bail!("the application registers kind {k:?}, which is already a built-in kind or an HTTP kind of the configuration");
    }
    for f in &config.app.registrations {
        f(&mut r);
    }
    for d in &config.kind_defaults {
        r.kind_options(&d.kind, d.options.clone());
    }
    Ok(r)
}

/// The store opened and migrated, and a handle with every kind ([`crate::App::connect`]).
pub(crate) async fn connect(config: &Config) -> anyhow::Result<Conveyor> {
    let backend = open_store(config).await?;
    let registry = registry(config, &backend)?;
    Ok(Conveyor::new(backend, registry))
}

pub(crate) fn open_backend(config: &Config) -> anyhow::Result<Arc<dyn QueueBackend>> {
    let bc = BackendConfig {
        database_url: config.database_url.clone(),
        queue: config.queue.clone(),
        completed_history: config.retention_completed,
        redis_url: config.redis_url.as_ref().map(|s| s.0.clone()),
        redis_prefix: config.redis_prefix.clone(),
        amqp_url: config.amqp_url.as_ref().map(|s| s.0.clone()),
        amqp_prefix: config.amqp_prefix.clone(),
    };
    conveyor_backends::connect(&bc).context("cannot open the backend")
}

fn worker_config(config: &Config, args: Option<&WorkArgs>) -> anyhow::Result<WorkerConfig> {
    let mut supervisors = config.supervisors.clone();
    if let Some(a) = args {
        if !a.queue.is_empty() {
            for q in &a.queue {
                conveyor_core::job::validate_queue_name(q).map_err(|e| anyhow::anyhow!("--queue: {e}"))?;
            }
            let lease = supervisors.first().map(|s| s.lease);
            let mut s = SupervisorConfig::new("cli", a.queue.clone(), a.concurrency.unwrap_or(8));
            if let Some(l) = lease {
                s.lease = l;
            }
            // The queues named are all this process works: no HTTP kind's supervisor is added.
            return Ok(WorkerConfig { supervisors: vec![s], shutdown_grace: config.shutdown_grace, ..WorkerConfig::default() });
        } else if let Some(c) = a.concurrency {
            if c == 0 {
                bail!("--concurrency: must be at least 1");
            }
            for s in &mut supervisors {
                s.concurrency = c;
                s.prefetch = c;
            }
        }
    }
    // HTTP kinds wait on the network: their queues get supervisors of their own unless a
    // configured one names them.
    let http = conveyor_apps::kinds::supervisors(&config.apps.kinds, &supervisors);
    supervisors.extend(http);
    Ok(WorkerConfig { supervisors, shutdown_grace: config.shutdown_grace, ..WorkerConfig::default() })
}

/// Cancels the token on the first SIGINT or SIGTERM; a second one exits at once.
fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        for n in 0.. {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                info!("shutdown requested; finishing in-flight jobs (send the signal again to exit now)");
                t.cancel();
            } else {
                warn!("second signal: exiting now; unfinished jobs return to the queue when their lease expires");
                std::process::exit(130);
            }
        }
    });
    token
}

/// Drops old metric buckets and history, and expired cache entries (on Redis: the index entries
/// of values Redis expired), once an hour (and at start).
fn spawn_pruner(backend: Arc<dyn QueueBackend>, keep: std::time::Duration, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(3600));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    let before = conveyor_core::clock::now_ms() - keep.as_millis() as i64;
                    if let Err(e) = backend.prune(before).await {
                        warn!(error = %e, "pruning old metrics failed");
                    }
                    if let Err(e) = conveyor_core::cache::Cache::new(backend.clone()).prune().await {
                        warn!(error = %e, "pruning expired cache entries failed");
                    }
                }
            }
        }
    })
}

/// The OTLP trace exporter when `OTEL_EXPORTER_OTLP_ENDPOINT` (or its traces variant) is set.
fn start_tracing() -> anyhow::Result<Option<conveyor_apps::otlp::Flush>> {
    Ok(conveyor_apps::otlp::install_from_env()?)
}

/// Sends the spans still queued before the process exits.
async fn stop_tracing(flush: Option<conveyor_apps::otlp::Flush>) {
    if let Some(f) = flush {
        if !f.flush(std::time::Duration::from_secs(5)).await {
            tracing::warn!("some spans were not exported before exit");
        }
    }
}

pub(crate) async fn work(config: Config, args: WorkArgs) -> anyhow::Result<()> {
    let wc = worker_config(&config, Some(&args))?;
    let tracing_flush = start_tracing()?;
    let backend = open_store(&config).await?;
    let shutdown = shutdown_on_signals();
    let pruner = spawn_pruner(backend.clone(), config.retention_metrics, shutdown.clone());
    let conveyor = Conveyor::new(backend.clone(), registry(&config, &backend)?);
    let faktory = match args.faktory {
        true => Some(start_faktory(&config, &conveyor, &shutdown).await?.context("--faktory: CONVEYOR_FAKTORY_ADDR is off")?),
        false => None,
    };
    let metrics = start_metrics(&config, &conveyor, &shutdown).await?;
    for s in &wc.supervisors {
        info!(supervisor = %s.name, queues = ?s.queues, concurrency = s.concurrency, "supervisor ready");
    }
    worker::run(conveyor, wc, shutdown).await;
    if let Some(f) = faktory {
        f.await.context("Faktory server task")?.context("Faktory server")?;
    }
    if let Some(m) = metrics {
        m.await.context("metrics server task")?.context("metrics server")?;
    }
    let _ = pruner.await;
    stop_tracing(tracing_flush).await;
    Ok(())
}

pub(crate) async fn serve(config: Config, args: ServeArgs) -> anyhow::Result<()> {
    let addr = config.http_addr;
    if !addr.ip().is_loopback() && config.api_token.is_none() {
        bail!("refusing to serve on {addr} without CONVEYOR_API_TOKEN: set a token or bind a loopback address");
    }
    let wc = worker_config(&config, None)?;
    let tracing_flush = start_tracing()?;
    let backend = open_store(&config).await?;
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (CONVEYOR_HTTP_ADDR)"))?;
    let local = listener.local_addr()?;
    if config.api_token.is_none() {
        info!("no CONVEYOR_API_TOKEN: serving on loopback only; requests need no token (Host and cross-site checks still apply)");
    }
    eprintln!("conveyor listening on http://{local} (API at /api, health at /api/health)");
    let shutdown = shutdown_on_signals();
    let conveyor = Conveyor::new(backend.clone(), registry(&config, &backend)?);
    let scheduler = (!args.no_scheduler).then(|| Scheduler::new(conveyor.clone(), config.schedules.clone()));
    // The API checks callers' URLs against the same allow list deliveries use.
    conveyor_apps::outbound::install_api_policy(config.apps.outbound.clone());
    let state = conveyor_server::AppState::new(conveyor.clone(), config.access(local))
        .with_schedules(scheduler.as_ref().map(Scheduler::info))
        .with_kinds(config.apps.kinds.clone());
    #[cfg(feature = "sync")]
    let state = state.with_sync(config.apps.sync.clone());
    let http = tokio::spawn(conveyor_server::serve_with(listener, state, shutdown.clone(), config.http_max_connections));
    let faktory = start_faktory(&config, &conveyor, &shutdown).await?;
    let scheduler = scheduler.map(|s| tokio::spawn(s.run(shutdown.clone())));
    let pruner = spawn_pruner(backend, config.retention_metrics, shutdown.clone());
    if !args.no_workers {
        worker::run(conveyor, wc, shutdown.clone()).await;
    } else {
        shutdown.cancelled().await;
    }
    http.await.context("HTTP server task")?.context("HTTP server")?;
    if let Some(f) = faktory {
        f.await.context("Faktory server task")?.context("Faktory server")?;
    }
    if let Some(s) = scheduler {
        let _ = s.await;
    }
    let _ = pruner.await;
    stop_tracing(tracing_flush).await;
    Ok(())
}

/// The Faktory listener on `CONVEYOR_FAKTORY_ADDR` (`None` when it is `off`).
async fn start_faktory(
    config: &Config,
    conveyor: &Conveyor,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(addr) = config.faktory_addr else { return Ok(None) };
    if !addr.ip().is_loopback() && config.api_token.is_none() {
        bail!("refusing to serve Faktory on {addr} without CONVEYOR_API_TOKEN: set a token or a loopback CONVEYOR_FAKTORY_ADDR");
    }
    let settings = config.faktory()?;
    let tls = settings.tls.is_some();
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} (CONVEYOR_FAKTORY_ADDR; `off` disables the Faktory port)"))?;
    let local = listener.local_addr()?;
    eprintln!("conveyor speaks Faktory on {}://{local}", if tls { "tcp+tls" } else { "tcp" });
    Ok(Some(tokio::spawn(conveyor_server::faktory::serve(listener, conveyor.clone(), settings, shutdown.clone()))))
}

pub(crate) async fn schedule(config: Config) -> anyhow::Result<()> {
    let backend = open_store(&config).await?;
    let shutdown = shutdown_on_signals();
    let conveyor = Conveyor::new(backend.clone(), registry(&config, &backend)?);
    let metrics = start_metrics(&config, &conveyor, &shutdown).await?;
    for s in &config.schedules {
        info!(schedule = %s.name, cron = %s.cron, job = %s.job.kind, "scheduled");
    }
    Scheduler::new(conveyor, config.schedules.clone()).run(shutdown).await;
    if let Some(m) = metrics {
        m.await.context("metrics server task")?.context("metrics server")?;
    }
    Ok(())
}

/// `/metrics` and `/health` on `CONVEYOR_METRICS_ADDR`, for the processes without the API
/// (`work`, `schedule`): their counters are their own.
async fn start_metrics(
    config: &Config,
    conveyor: &Conveyor,
    shutdown: &CancellationToken,
) -> anyhow::Result<Option<tokio::task::JoinHandle<std::io::Result<()>>>> {
    let Some(addr) = config.metrics_addr else { return Ok(None) };
    if !addr.ip().is_loopback() && config.api_token.is_none() {
        bail!("refusing to serve /metrics on {addr} without CONVEYOR_API_TOKEN (CONVEYOR_METRICS_ADDR)");
    }
    let listener = tokio::net::TcpListener::bind(addr).await.with_context(|| format!("cannot listen on {addr} (CONVEYOR_METRICS_ADDR)"))?;
    let local = listener.local_addr()?;
    eprintln!("conveyor metrics on http://{local}/metrics");
    let state = conveyor_server::AppState::new(conveyor.clone(), config.access(local));
    Ok(Some(tokio::spawn(conveyor_server::serve_metrics(listener, state, shutdown.clone()))))
}

/// Runs `wait` while making sure someone works `supervisor`'s queues: workers of this process
/// start as soon as no live worker (heard from in the last 15 s) serves them, re-checked every
/// second — a worker killed a moment ago still looks alive for a while — and stop when `wait`
/// returns.
#[cfg(any(feature = "orders", feature = "sync"))]
pub(crate) async fn with_local_workers<T, F, Fut>(conveyor: &Conveyor, supervisor: SupervisorConfig, wait: F) -> anyhow::Result<T>
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    let shutdown = CancellationToken::new();
    let watcher = {
        let (conveyor, shutdown) = (conveyor.clone(), shutdown.clone());
        tokio::spawn(async move {
            loop {
                let workers = conveyor.backend().workers(std::time::Duration::from_secs(15)).await.unwrap_or_default();
                let serving = workers
                    .iter()
                    .flat_map(|w| &w.supervisors)
                    .flat_map(|s| &s.pools)
                    .any(|p| p.queues.iter().any(|q| supervisor.queues.contains(q)));
                if !serving {
                    eprintln!(
                        "no worker serves the {} queue: running {} here until this is done",
                        supervisor.queues.join(","),
                        supervisor.concurrency
                    );
                    let wc = WorkerConfig { supervisors: vec![supervisor], ..WorkerConfig::default() };
                    worker::run(conveyor, wc, shutdown).await;
                    return;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                }
            }
        })
    };
    let out = wait().await;
    shutdown.cancel();
    watcher.await.context("in-process workers")?;
    out
}
