//! `conveyor bench --webhooks`: notifications end to end on the configured store — N events,
//! each matching one webhook rule, fanned out by the notifications listener and delivered
//! (signed) to a receiver on loopback that verifies every signature. Reports events stored per
//! second and deliveries completed per second.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use conveyor_apps::notify::{self, channels, model};
use conveyor_core::backend::{QueueBackendExt, RowExt};
use conveyor_core::event::Event;
use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig};
use conveyor_core::{Conveyor, Registry};

use crate::cli::config::Config;
use crate::cli::run::open_store;

pub(crate) async fn run(config: Config, deliveries: u64, concurrency: usize) -> anyhow::Result<()> {
    if deliveries == 0 || concurrency == 0 {
        bail!("--jobs and --concurrency must be at least 1");
    }
    let backend = open_store(&config).await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    // The receiver is on loopback, which callers' URLs may not reach unless allowed.
    let mut nc = config.apps.notify.clone();
    nc.outbound = conveyor_apps::outbound::Policy::parse(&format!("{},{}/32", nc.outbound, addr.ip())).map_err(|e| anyhow::anyhow!(e))?;

    // A rule for this run's event, to the receiver; its signing secret comes with it.
    let event = format!("bench.webhook.{}", rand_hex());
    let t = model::save(
        backend.as_ref(),
        model::Kind::Templates,
        None,
        &json!({ "name": event, "channel": "webhook", "body": "delivery {{ n }}" }),
        &nc.outbound,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rule = model::save(
        backend.as_ref(),
        model::Kind::Rules,
        None,
        &json!({ "event": event, "template_id": t["id"], "channel": "webhook", "recipient": format!("http://{addr}/hook") }),
        &nc.outbound,
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    let secret = rule["secret"].as_str().context("a webhook rule comes with its secret")?.to_string();

    // The receiver: counts deliveries whose Standard Webhooks signature verifies.
    let valid = Arc::new(AtomicU64::new(0));
    let invalid = Arc::new(AtomicU64::new(0));
    let (v, i, s) = (valid.clone(), invalid.clone(), secret.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let (v, i, s) = (v.clone(), i.clone(), s.clone());
            async move {
                let now = jiff::Timestamp::now().as_second();
                if channels::verify(&s, &headers, &body, now, 300) {
                    v.fetch_add(1, Ordering::Relaxed);
                    StatusCode::OK
                } else {
                    i.fetch_add(1, Ordering::Relaxed);
                    StatusCode::UNAUTHORIZED
                }
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await });

    let mut registry = Registry::new();
    notify::register(&mut registry, backend.clone(), nc).map_err(|e| anyhow::anyhow!(e))?;
    let conveyor = Conveyor::new(backend.clone(), registry);

    eprintln!("bench: storing {deliveries} events on {} (1,000 per transaction)…", backend.name());
    let t0 = Instant::now();
    let mut n = 0u64;
    while n < deliveries {
        let end = (n + 1_000).min(deliveries);
        let (cv, ev) = (conveyor.clone(), event.clone());
        backend
            .transact(move |tx| {
                for i in n..end {
                    cv.emit_in(tx, Event { name: ev.clone(), payload: json!({ "n": i }) })?;
                }
                Ok(())
            })
            .await?;
        n = end;
    }
    let store_s = t0.elapsed().as_secs_f64();
    eprintln!("bench: stored {deliveries} events in {store_s:.2}s ({:.0} events/s)", deliveries as f64 / store_s);

    let shutdown = CancellationToken::new();
    let mut sup = SupervisorConfig::new("notify", notify::queues(), concurrency);
    sup.prefetch = (concurrency * 8).max(512);
    let wc = WorkerConfig { supervisors: vec![sup], ..WorkerConfig::default() };
    let t1 = Instant::now();
    let workers = tokio::spawn(worker::run(conveyor.clone(), wc, shutdown.clone()));
    let mut last = Instant::now();
    // The receiver's count, not the store's: polling the logs would load the store it measures.
    loop {
        let sent = valid.load(Ordering::Relaxed);
        if sent >= deliveries {
            break;
        }
        if invalid.load(Ordering::Relaxed) > 0 {
            bail!("the receiver rejected a signature");
        }
        if last.elapsed() > Duration::from_secs(2) {
            eprintln!("bench: {sent}/{deliveries} delivered after {:.1}s", t1.elapsed().as_secs_f64());
            last = Instant::now();
        }
        if t1.elapsed() > Duration::from_secs(600) {
            bail!("deliveries did not finish within 10 minutes ({sent}/{deliveries})");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Delivered means logged `sent` too (the acknowledgement follows the receiver's answer).
    let logged = || async {
        backend
            .query("SELECT count(*) FROM notify_logs WHERE event = $1 AND status = 'sent'", vec![event.clone().into()])
            .await
            .map(|r| r.first().map_or(0, |r| r.int(0)) as u64)
    };
    while logged().await? < deliveries {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deliver_s = t1.elapsed().as_secs_f64();
    shutdown.cancel();
    workers.await.context("workers")?;
    let received = valid.load(Ordering::Relaxed);
    println!(
        "bench: backend={} deliveries={deliveries} concurrency={concurrency} events_per_s={:.0} deliveries_per_s={:.0} received={received} rejected={}",
        backend.name(),
        deliveries as f64 / store_s,
        deliveries as f64 / deliver_s,
        invalid.load(Ordering::Relaxed)
    );
    if received != deliveries {
        bail!("the receiver got {received} deliveries for {deliveries} notifications");
    }
    Ok(())
}

fn rand_hex() -> String {
    format!("{:016x}", rand::random::<u64>())
}
