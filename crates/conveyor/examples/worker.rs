//! A worker of your own job kinds: typed arguments, a retry, and workers in this process.
//!
//! `cargo run -p conveyor --example worker` (a scratch SQLite file unless
//! `CONVEYOR_DATABASE_URL` says otherwise).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use conveyor::{App, Backoff, JobArgs, JobContext, JobError, JobResult, NewJob, Workers};

#[derive(serde::Serialize, serde::Deserialize)]
struct ResizeImage {
    path: String,
    width: u32,
}

impl JobArgs for ResizeImage {
    const KIND: &'static str = "resize_image";
    const QUEUE: &'static str = "images";
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let scratch = tempfile::tempdir()?;
    if std::env::var_os("CONVEYOR_DATABASE_URL").is_none() {
        std::env::set_var("CONVEYOR_DATABASE_URL", format!("sqlite://{}/example.db", scratch.path().display()));
    }
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let done = Arc::new(AtomicU64::new(0));
    let counter = done.clone();
    let app = App::new().job(move |img: ResizeImage, ctx: JobContext| {
        let counter = counter.clone();
        async move {
            // The first attempt of one image fails: the engine retries it after its backoff.
            if img.path == "b.png" && ctx.attempt == 1 {
                return Err(JobError::retry("the image store timed out"));
            }
            println!("resized {} to {} px (attempt {})", img.path, img.width, ctx.attempt);
            counter.fetch_add(1, Ordering::Relaxed);
            JobResult::Ok(())
        }
    });
    let conveyor = app.connect().await?;
    for path in ["a.png", "b.png", "c.png"] {
        let job = NewJob::of(&ResizeImage { path: path.into(), width: 640 }).backoff(Backoff::fixed(Duration::from_millis(100)));
        conveyor.dispatch(job).await?;
    }
    let workers = Workers::on(&conveyor, &[ResizeImage::QUEUE], 4);
    wait(|| done.load(Ordering::Relaxed) == 3).await?;
    let report = workers.stop().await;
    println!("completed {}, retried {}", report.completed, report.retried);
    assert_eq!((report.completed, report.retried), (3, 1));
    Ok(())
}

/// Waits for `cond`, up to 30 s.
async fn wait(cond: impl Fn() -> bool) -> Result<(), &'static str> {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !cond() {
        if std::time::Instant::now() > deadline {
            return Err("timed out");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}
