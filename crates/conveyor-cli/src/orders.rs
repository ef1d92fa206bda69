//! `orders import` and `products import`: stream a CSV into the store, report rejected lines on
//! stderr (`line N: FIELD: reason`) and the result on stdout; `--wait` settles the orders.

use std::io::{BufReader, IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use conveyor_apps::orders::{self, import, money::to_major};
use conveyor_core::clock::now_ms;
use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig};
use conveyor_core::Conveyor;

use crate::config::Config;
use crate::run::{open_store, registry};

#[derive(Subcommand)]
pub(crate) enum OrdersCommand {
    /// Import orders from a CSV file and start their workflows
    Import {
        file: String,
        /// Wait until every imported order has settled (runs workers here if none are running)
        #[arg(long)]
        wait: bool,
        /// Print one JSON document
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum ProductsCommand {
    /// Create or update products from a CSV file (sku,name,price,stock)
    Import { file: String },
}

fn open(file: &str) -> anyhow::Result<(std::fs::File, u64)> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot read {file}"))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((f, size))
}

/// A progress line on a terminal's stderr: rows, rows/s, and the ETA from bytes read.
fn progress(size: u64) -> impl Fn(import::Progress) + Send + 'static {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    move |p: import::Progress| {
        if !tty {
            return;
        }
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let eta = if p.bytes > 0 && size > p.bytes { (size - p.bytes) as f64 * secs / p.bytes as f64 } else { 0.0 };
        let pct = if size > 0 { p.bytes as f64 * 100.0 / size as f64 } else { 0.0 };
        eprint!("\r{} rows · {:.0} rows/s · {pct:.0}% · ETA {eta:.0}s   ", p.rows, p.rows as f64 / secs);
        let _ = std::io::stderr().flush();
    }
}

pub(crate) async fn orders(config: &Config, cmd: OrdersCommand) -> anyhow::Result<()> {
    let OrdersCommand::Import { file, wait, json } = cmd;
    let (f, size) = open(&file)?;
    let backend = open_store(config).await?;
    let conveyor = Conveyor::new(backend.clone(), registry(config, &backend));
    let since = now_ms();
    let started = Instant::now();
    let report = import::import_orders(&conveyor, BufReader::with_capacity(256 * 1024, f), progress(size)).await?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    for r in &report.rejected {
        eprintln!("line {}: {}", r.line, r.reason);
    }
    eprintln!(
        "read {} rows in {:.2}s ({:.0} rows/s)",
        report.rows,
        started.elapsed().as_secs_f64(),
        report.rows as f64 / started.elapsed().as_secs_f64().max(0.001)
    );
    let mut out = serde_json::to_value(&report)?;
    if wait {
        let (completed, failed, revenue) = settle(&conveyor, since).await?;
        out["completed"] = completed.into();
        out["failed"] = failed.into();
        out["revenue"] = to_major(revenue).into();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "imported {} orders from {} rows ({} duplicates, {} rejected lines)",
            report.orders,
            report.rows,
            report.duplicates,
            report.rejected.len()
        );
        if wait {
            println!("settled: {} completed, {} failed, revenue {:.2}", out["completed"], out["failed"], to_major(revenue_cents(&out)));
        }
    }
    Ok(())
}

fn revenue_cents(out: &serde_json::Value) -> i64 {
    (out["revenue"].as_f64().unwrap_or(0.0) * 100.0).round() as i64
}

/// Waits until the orders created since `since` have settled, running workers in this process
/// when no live worker serves the orders queue. Returns (completed, failed, revenue in cents).
async fn settle(conveyor: &Conveyor, since: i64) -> anyhow::Result<(u64, u64, i64)> {
    let backend = conveyor.backend().clone();
    let serving = backend
        .workers(Duration::from_secs(30))
        .await?
        .iter()
        .flat_map(|w| &w.supervisors)
        .flat_map(|s| &s.pools)
        .any(|p| p.queues.iter().any(|q| q == orders::QUEUE));
    let shutdown = CancellationToken::new();
    let local = (!serving).then(|| {
        eprintln!("no worker serves the {} queue: running 32 here until the import settles", orders::QUEUE);
        let mut sup = SupervisorConfig::new("orders", vec![orders::QUEUE.into()], 32);
        sup.prefetch = 64;
        tokio::spawn(worker::run(conveyor.clone(), WorkerConfig { supervisors: vec![sup], ..WorkerConfig::default() }, shutdown.clone()))
    });
    let started = Instant::now();
    let mut last = Instant::now();
    let result = loop {
        let (open, completed, failed, revenue) = orders::settlement(backend.as_ref(), since).await?;
        if open == 0 {
            break (completed, failed, revenue);
        }
        if last.elapsed() > Duration::from_secs(2) {
            eprintln!(
                "settling: {open} orders in flight, {completed} completed, {failed} failed after {:.0}s",
                started.elapsed().as_secs_f64()
            );
            last = Instant::now();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!("settled in {:.2}s", started.elapsed().as_secs_f64());
    shutdown.cancel();
    if let Some(w) = local {
        w.await.context("in-process workers")?;
    }
    Ok(result)
}

pub(crate) async fn products(config: &Config, cmd: ProductsCommand) -> anyhow::Result<()> {
    let ProductsCommand::Import { file } = cmd;
    let (f, _) = open(&file)?;
    let backend = open_store(config).await?;
    let conveyor = Conveyor::new(backend.clone(), registry(config, &backend));
    let report = import::import_products(&conveyor, BufReader::new(f)).await?;
    for r in &report.rejected {
        eprintln!("line {}: {}", r.line, r.reason);
    }
    println!("{} products created or updated from {} rows ({} rejected lines)", report.orders, report.rows, report.rejected.len());
    Ok(())
}
