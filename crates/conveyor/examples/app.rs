//! The whole `conveyor` command line and dashboard with your own kinds in it: `my-app serve`
//! serves the API and the dashboard and runs workers for the built-in applications and for
//! `send_receipt`; `my-app work`, `my-app queue list`, `my-app bench`… work as they do for
//! `conveyor`.
//!
//! `cargo run -p conveyor --example app -- serve` (or `-- --help`, `-- queue list`)

use conveyor::{App, JobArgs, JobContext, JobResult};

#[derive(serde::Serialize, serde::Deserialize)]
struct SendReceipt {
    order_id: i64,
}

impl JobArgs for SendReceipt {
    const KIND: &'static str = "send_receipt";
}

async fn send_receipt(args: SendReceipt, ctx: JobContext) -> JobResult {
    tracing::info!(order = args.order_id, attempt = ctx.attempt, "receipt sent");
    Ok(())
}

fn main() -> std::process::ExitCode {
    App::new().job(send_receipt).run()
}
