//! `conveyor dev partners`: the partner simulator (a source catalogue API and a storefront
//! target API with fault knobs) on one port, for local runs and tests of the product sync.

use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};

use conveyor_server::partners::{self, PartnerConfig};

#[derive(Subcommand)]
pub(crate) enum DevCommand {
    /// Serve the simulated partners: /source/… (catalogue), /target/… (storefront), /stats
    Partners(PartnerArgs),
}

#[derive(Args)]
pub(crate) struct PartnerArgs {
    /// Port on 127.0.0.1 (0 picks a free one; the address is printed)
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Products in the catalogue
    #[arg(long, default_value_t = 1_000)]
    products: usize,
    /// Variants per product
    #[arg(long, default_value_t = 3)]
    variants: usize,
    /// Added to every answer, in milliseconds
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Share of requests answered 500 (0 to 1)
    #[arg(long, default_value_t = 0.0)]
    error_rate: f64,
    /// Target requests per second above which it answers 429 with Retry-After (0: no limit)
    #[arg(long, default_value_t = 0)]
    rate_limit: u32,
    /// START_S:LEN_S — the target answers 503 in that window after start
    #[arg(long)]
    outage: Option<String>,
    #[arg(long, default_value = "src")]
    source_token: String,
    #[arg(long, default_value = "tgt")]
    target_key: String,
}

fn outage(text: &str) -> anyhow::Result<(Duration, Duration)> {
    let (a, b) = text.split_once(':').context("--outage: expected START_S:LEN_S, like 10:20")?;
    let secs = |v: &str| v.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0).map(Duration::from_secs_f64);
    match (secs(a), secs(b)) {
        (Some(s), Some(l)) => Ok((s, l)),
        _ => bail!("--outage: expected START_S:LEN_S with seconds from 0, got {text:?}"),
    }
}

pub(crate) async fn run(cmd: DevCommand) -> anyhow::Result<()> {
    let DevCommand::Partners(a) = cmd;
    if !(0.0..=1.0).contains(&a.error_rate) {
        bail!("--error-rate: expected a number from 0 to 1, got {}", a.error_rate);
    }
    if a.variants == 0 {
        bail!("--variants: at least 1");
    }
    let config = PartnerConfig {
        products: a.products,
        variants: a.variants,
        latency: Duration::from_millis(a.latency_ms),
        error_rate: a.error_rate,
        rate_limit: a.rate_limit,
        outage: a.outage.as_deref().map(outage).transpose()?,
        source_token: a.source_token,
        target_key: a.target_key,
        ..PartnerConfig::default()
    };
    let listener =
        tokio::net::TcpListener::bind(("127.0.0.1", a.port)).await.with_context(|| format!("cannot listen on port {}", a.port))?;
    let addr = listener.local_addr()?;
    println!("listening on http://{addr}");
    eprintln!("source: GET http://{addr}/source/products (Bearer token) · target: http://{addr}/target/variants/SKU (X-Api-Key) · GET http://{addr}/stats");
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("a SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    axum::serve(listener, partners::router(config)).with_graceful_shutdown(shutdown).await?;
    Ok(())
}
