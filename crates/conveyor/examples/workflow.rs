//! A workflow (a saga): steps that run one after another, each with a compensation that undoes
//! it when a later step fails for good. Here the shipping step fails, so the payment is
//! refunded and the stock released, in that order.
//!
//! `cargo run -p conveyor --example workflow`

use std::time::Duration;

use conveyor::{App, JobContext, JobError, JobResult, NewJob, Workers, Workflow};

#[derive(Clone, serde::Serialize, serde::Deserialize)]
struct Order {
    id: i64,
}

/// One handler per step; the workflow hands every step its input (the order).
fn step(name: &'static str, fails: bool) -> impl Fn(Order, JobContext) -> std::future::Ready<JobResult> + Clone + Send + Sync {
    move |order: Order, _ctx: JobContext| {
        println!("{name} for order {}", order.id);
        std::future::ready(if fails { Err(JobError::abort("the carrier refused the parcel")) } else { Ok(()) })
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scratch = tempfile::tempdir()?;
    if std::env::var_os("CONVEYOR_DATABASE_URL").is_none() {
        std::env::set_var("CONVEYOR_DATABASE_URL", format!("sqlite://{}/example.db", scratch.path().display()));
    }
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let app = App::new().register(|r| {
        r.register("reserve_stock", step("reserve stock", false));
        r.register("release_stock", step("release stock", false));
        r.register("charge", step("charge", false));
        r.register("refund", step("refund", false));
        r.register("ship", step("ship", true));
    });
    let conveyor = app.connect().await?;
    let job = |kind: &str| NewJob::new(kind, &serde_json::json!({})).max_attempts(1);
    let id = Workflow::new("checkout")
        .input(&Order { id: 42 })
        .step("reserve", job("reserve_stock"))
        .compensate(job("release_stock"))
        .step("charge", job("charge"))
        .compensate(job("refund"))
        .step("ship", job("ship"))
        .start(&conveyor)
        .await?;
    let workers = Workers::on(&conveyor, &["default"], 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let info = loop {
        let info = conveyor.workflow(&id).await?.ok_or("the workflow is gone")?;
        if info.status == "failed" {
            break info;
        }
        assert!(std::time::Instant::now() < deadline, "the workflow did not settle in time: {}", info.status);
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    workers.stop().await;
    for s in &info.steps {
        println!("  {:<20} {:<13} {}", s.name, s.role, s.status);
    }
    println!("workflow {}: {} ({})", info.name, info.status, info.error.unwrap_or_default());
    Ok(())
}
