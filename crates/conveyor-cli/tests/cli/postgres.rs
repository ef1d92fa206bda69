//! Several machines' worth of processes on one PostgreSQL database, and a PostgreSQL restart
//! under load. Each test has a database of its own (the restart test, a server of its own).

use std::time::Duration;

use conveyor_backends::postgres::testing::{TestDatabase, TestServer};
use conveyor_core::backend::RowExt;
use conveyor_core::NewJob;
use serde_json::json;

use crate::{sigterm, wait_exit, wait_for, TestEnv};

const CONFIG: &str = "[[supervisors]]\nname = \"default\"\nqueues = [\"default\"]\nconcurrency = 16\nlease = \"2s\"\n\n\
                      [retention]\ncompleted = 100000\n\n\
                      [[schedule]]\nname = \"every-second\"\ncron = \"@every 1s\"\njob = \"conveyor.noop\"\nqueue = \"ticks\"\n";

/// Every test job's completions: the effect of a job is its acknowledgement (the history row it
/// writes in the same transaction), so "once" means exactly one row per id. Only the test's
/// `conveyor.sleep` jobs count: the built-in KPI schedule (every 5 minutes, on `default`) may add
/// a job of its own while the test runs.
async fn completions(env: &TestEnv, queue: &str) -> (i64, i64, i64) {
    let rows = env
        .backend
        .query("SELECT count(*), count(DISTINCT id), coalesce(max(attempts), 0) FROM completed_jobs WHERE queue = $1 AND kind = 'conveyor.sleep'", vec![queue.into()])
        .await
        .unwrap();
    (rows[0].int(0), rows[0].int(1), rows[0].int(2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_and_a_scheduler_share_one_database_and_a_sigkill_loses_nothing() {
    let Some(env) = TestEnv::postgres(CONFIG, None) else { return };
    let total = 50_000i64;
    for chunk in 0..50 {
        let jobs: Vec<NewJob> = (0..1_000).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 2, "n": chunk * 1_000 + i }))).collect();
        env.backend.enqueue(jobs).await.unwrap();
    }
    let mut scheduler = env.spawn(&["schedule"]);
    let mut workers: Vec<_> = (0..3).map(|_| env.spawn(&["work"])).collect();
    wait_for("a fifth of the jobs to finish", Duration::from_secs(120), || async { completions(&env, "default").await.0 >= total / 5 })
        .await;
    let reserved = env.queue("default").await.reserved;
    workers[0].kill().expect("SIGKILL one worker");
    workers[0].wait().unwrap();
    wait_for("every job to finish", Duration::from_secs(300), || async {
        let q = env.queue("default").await;
        q.pending + q.reserved + q.delayed == 0
    })
    .await;
    for p in workers.iter_mut().skip(1).chain(std::iter::once(&mut scheduler)) {
        sigterm(p);
        assert!(wait_exit(p, Duration::from_secs(30)).await.success(), "exits 0 on SIGTERM");
    }

    let q = env.queue("default").await;
    assert_eq!(q.failed, 0, "no job failed: {q:?}");
    let (rows, distinct, max_attempts) = completions(&env, "default").await;
    assert_eq!((rows, distinct), (total, total), "every job completed, each exactly once");
    assert!(max_attempts <= 2, "only the killed worker's jobs ran again");
    assert!(reserved > 0, "the killed worker held jobs");
    let ticks = env.backend.query("SELECT count(*) FROM schedule_ticks WHERE name = 'every-second'", vec![]).await.unwrap()[0].int(0);
    let tick_jobs = env.backend.query("SELECT count(*) FROM completed_jobs WHERE queue = 'ticks'", vec![]).await.unwrap()[0].int(0);
    assert!(ticks >= 2, "the scheduler ticked while the workers ran ({ticks})");
    let pending_ticks = env.queue("ticks").await;
    assert_eq!(
        tick_jobs + pending_ticks.pending as i64 + pending_ticks.reserved as i64,
        ticks,
        "one job per tick (nothing serves `ticks`, so they wait): {pending_ticks:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_under_load_loses_nothing_and_workers_reconnect() {
    let Some(mut server) = TestServer::start() else { return };
    let db = TestDatabase::create_on(&server.admin_url()).expect("a database on the test's server");
    let Some(env) = TestEnv::postgres(CONFIG, Some(db)) else { return };
    let total = 10_000i64;
    for chunk in 0..10 {
        let jobs: Vec<NewJob> = (0..1_000).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 5, "n": chunk * 1_000 + i }))).collect();
        env.backend.enqueue(jobs).await.unwrap();
    }
    let mut worker = env.spawn(&["work"]);
    wait_for("a tenth of the jobs to finish", Duration::from_secs(120), || async { completions(&env, "default").await.0 >= total / 10 })
        .await;
    let before = completions(&env, "default").await.0;
    tokio::task::block_in_place(|| server.restart()).expect("restart PostgreSQL");
    assert!(worker.try_wait().unwrap().is_none(), "the worker survives the outage");
    wait_for("every job to finish after the restart", Duration::from_secs(300), || async {
        match env.backend.queues().await {
            Ok(qs) => qs.iter().filter(|q| q.queue == "default").all(|q| q.pending + q.reserved + q.delayed == 0),
            Err(_) => false,
        }
    })
    .await;
    sigterm(&worker);
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).await.success(), "work exits 0 on SIGTERM");
    let (rows, distinct, _) = completions(&env, "default").await;
    assert!(before < total, "the restart happened while jobs were flowing ({before} done before it)");
    assert_eq!((rows, distinct), (total, total), "every job completed exactly once");
    assert_eq!(env.queue("default").await.failed, 0);
}
