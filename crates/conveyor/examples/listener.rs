//! Typed events and their listeners: a queued listener (a job per event, retried like any
//! job, enqueued in the transaction that logs the event) and an inline one (run in this process
//! after the event commits).
//!
//! `cargo run -p conveyor --example listener`

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conveyor::{App, DomainEvent, JobContext, JobResult, Workers};

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderPaid {
    order_id: i64,
    cents: i64,
}

impl DomainEvent for OrderPaid {
    const NAME: &'static str = "order.paid";
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scratch = tempfile::tempdir()?;
    if std::env::var_os("CONVEYOR_DATABASE_URL").is_none() {
        std::env::set_var("CONVEYOR_DATABASE_URL", format!("sqlite://{}/example.db", scratch.path().display()));
    }
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let queued = Arc::new(AtomicU64::new(0));
    let inline = Arc::new(AtomicU64::new(0));
    let (q, i) = (queued.clone(), inline.clone());
    let app = App::new().register(move |r| {
        let q = q.clone();
        r.on("thank_you_email", "mail", move |paid: OrderPaid, _ctx: JobContext| {
            let q = q.clone();
            async move {
                println!("queued: thank-you mail for order {} ({} cents)", paid.order_id, paid.cents);
                q.fetch_add(1, Ordering::Relaxed);
                JobResult::Ok(())
            }
        });
        let i = i.clone();
        r.listen_inline(OrderPaid::NAME, "audit", move |record| {
            let i = i.clone();
            async move {
                println!("inline: event {} logged as {}", record.name, record.id);
                i.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
        });
    });
    let conveyor = app.connect().await?;
    let workers = Workers::on(&conveyor, &["mail"], 4);
    for order_id in 1..=3 {
        conveyor.publish(&OrderPaid { order_id, cents: 1250 * order_id }).await?;
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while queued.load(Ordering::Relaxed) < 3 || inline.load(Ordering::Relaxed) < 3 {
        assert!(std::time::Instant::now() < deadline, "the listeners did not run in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers.stop().await;
    println!("3 events, 3 queued and 3 inline listener runs");
    Ok(())
}
