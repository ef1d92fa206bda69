//! The library as an application uses it: its own typed kinds and listeners through
//! `App::connect` and in-process workers, beside the built-in kinds, on a store of its own.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor::{App, DomainEvent, JobArgs, JobContext, JobError, JobResult, NewJob, Workers};

#[derive(serde::Serialize, serde::Deserialize)]
struct Charge {
    cents: u64,
}

impl JobArgs for Charge {
    const KIND: &'static str = "test_charge";
    const QUEUE: &'static str = "payments";
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Charged {
    cents: u64,
}

impl DomainEvent for Charged {
    const NAME: &'static str = "test.charged";
}

/// An app on a scratch SQLite file (its own configuration file, not the environment's).
fn app(dir: &tempfile::TempDir) -> App {
    let file = dir.path().join("app.toml");
    std::fs::write(&file, format!("[database]\nurl = \"sqlite://{}/app.db\"\n", dir.path().display())).unwrap();
    App::new().config_file(file)
}

async fn wait(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_jobs_and_listeners_run_beside_the_built_in_kinds() {
    let dir = tempfile::tempdir().unwrap();
    let charged = Arc::new(AtomicU64::new(0));
    let heard = Arc::new(AtomicU64::new(0));
    let (c, h) = (charged.clone(), heard.clone());
    let app = app(&dir)
        .job(move |args: Charge, ctx: JobContext| {
            let c = c.clone();
            async move {
                if args.cents == 0 {
                    return Err(JobError::abort("nothing to charge"));
                }
                ctx.conveyor.publish(&Charged { cents: args.cents }).await?;
                c.fetch_add(args.cents, Ordering::Relaxed);
                JobResult::Ok(())
            }
        })
        .register(move |r| {
            let h = h.clone();
            r.on("test_receipt", "payments", move |e: Charged, _ctx: JobContext| {
                let h = h.clone();
                async move {
                    h.fetch_add(e.cents, Ordering::Relaxed);
                    JobResult::Ok(())
                }
            });
        });
    let conveyor = app.connect().await.unwrap();
    assert!(conveyor.registry().contains("test_charge") && conveyor.registry().contains("conveyor.noop"));
    // The built-in applications are there when the build has them, and only then.
    assert_eq!(conveyor.registry().kinds().any(|k| k.starts_with("orders.")), cfg!(feature = "orders"));
    assert_eq!(conveyor.registry().kinds().any(|k| k.starts_with("notify.")), cfg!(feature = "notify"));

    // A typed job lands on its kind's queue, also when dispatched untyped without a queue.
    conveyor.enqueue(&Charge { cents: 250 }).await.unwrap();
    conveyor.dispatch(NewJob::new("test_charge", &serde_json::json!({ "cents": 750 }))).await.unwrap();
    let failing = conveyor.enqueue(&Charge { cents: 0 }).await.unwrap();
    let queues = conveyor.backend().queues().await.unwrap();
    assert_eq!(queues.iter().find(|q| q.queue == "payments").map(|q| q.pending), Some(3), "{queues:?}");

    let workers = Workers::on(&conveyor, &["payments"], 4);
    wait("the charges and their listener", || charged.load(Ordering::Relaxed) == 1000 && heard.load(Ordering::Relaxed) == 1000).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while conveyor.backend().failed_job(failing).await.unwrap().is_none() {
        assert!(Instant::now() < deadline, "the aborted charge in the failed store");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let report = workers.stop().await;
    assert_eq!((report.completed, report.failed), (4, 1), "{report:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_name_taken_by_a_built_in_kind_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let app = app(&dir).register(|r| {
        r.register("conveyor.noop", |_: serde_json::Value, _ctx: JobContext| async { JobResult::Ok(()) });
    });
    let e = app.connect().await.err().expect("a clash is refused").to_string();
    assert!(e.contains("\"conveyor.noop\"") && e.contains("already a built-in kind"), "{e}");
}

#[test]
fn the_command_line_runs_with_the_apps_kinds_and_reports_usage_errors() {
    let dir = tempfile::tempdir().unwrap();
    let code = app(&dir).run_with(["my-app", "migrate"]);
    assert_eq!(code, std::process::ExitCode::SUCCESS);
    assert!(dir.path().join("app.db").exists(), "migrate created the configured store");
    assert_eq!(app(&dir).run_with(["my-app", "no-such-command"]), std::process::ExitCode::from(2));
}
