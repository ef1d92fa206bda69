//! A batch: jobs tracked together, with a callback when all of them succeeded (`then`), when
//! one failed (`catch`) or either way (`finally`).
//!
//! `cargo run -p conveyor --example batch`

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use conveyor::{App, Batch, JobArgs, JobContext, JobResult, NewJob, Workers};

#[derive(serde::Serialize, serde::Deserialize)]
struct ExportChunk {
    from: u32,
    to: u32,
}

impl JobArgs for ExportChunk {
    const KIND: &'static str = "export_chunk";
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ExportDone {
    file: String,
}

impl JobArgs for ExportDone {
    const KIND: &'static str = "export_done";
}

/// Set by the `then` callback.
static EXPORTED: AtomicBool = AtomicBool::new(false);

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scratch = tempfile::tempdir()?;
    if std::env::var_os("CONVEYOR_DATABASE_URL").is_none() {
        std::env::set_var("CONVEYOR_DATABASE_URL", format!("sqlite://{}/example.db", scratch.path().display()));
    }
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let app = App::new()
        .job(|c: ExportChunk, ctx: JobContext| async move {
            println!("exported rows {}..{} (batch {})", c.from, c.to, ctx.batch_id.as_deref().unwrap_or("-"));
            JobResult::Ok(())
        })
        .job(|d: ExportDone, _ctx: JobContext| async move {
            println!("all chunks done: {} is ready", d.file);
            EXPORTED.store(true, Ordering::Relaxed);
            JobResult::Ok(())
        });
    let conveyor = app.connect().await?;
    let chunks = (0..5).map(|i| NewJob::of(&ExportChunk { from: i * 1000, to: (i + 1) * 1000 }));
    let id =
        Batch::new("nightly export").extend(chunks).then(NewJob::of(&ExportDone { file: "export.csv".into() })).dispatch(&conveyor).await?;
    let workers = Workers::on(&conveyor, &["default"], 4);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let info = conveyor.batch(&id).await?.ok_or("the batch is gone")?;
        if info.status == "finished" && EXPORTED.load(Ordering::Relaxed) {
            println!("batch {}: {} of {} processed, status {}", info.name, info.processed, info.total, info.status);
            break;
        }
        assert!(std::time::Instant::now() < deadline, "the batch did not finish in time");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    workers.stop().await;
    Ok(())
}
