//! Crash and shutdown behaviour of real worker processes.

use std::collections::HashMap;
use std::time::Duration;

use conveyor_core::backend::{JobFilter, Page};
use conveyor_core::job::JobState;
use conveyor_core::NewJob;
use serde_json::json;

use crate::{sigterm, wait_exit, wait_for, TestEnv};

const FAST_LEASE: &str =
    "[[supervisors]]\nname = \"default\"\nqueues = [\"default\"]\nconcurrency = 16\nlease = \"2s\"\n\n[retention]\ncompleted = 100000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_with_sigkill_loses_nothing_and_finishes_nothing_twice() {
    let env = TestEnv::new(FAST_LEASE);
    let total = 2_000u64;
    let jobs: Vec<NewJob> = (0..total).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 20, "n": i }))).collect();
    let ids: Vec<_> = env.backend.enqueue(jobs).await.unwrap().iter().map(|o| o.id()).collect();

    let mut first = env.spawn(&["work"]);
    wait_for("a quarter of the jobs to finish", Duration::from_secs(60), || async {
        let q = env.queue("default").await;
        total - (q.pending + q.reserved + q.delayed) >= total / 4
    })
    .await;
    first.kill().expect("SIGKILL the worker");
    first.wait().unwrap();
    let after_kill = env.queue("default").await;
    assert!(after_kill.reserved > 0, "the worker was killed holding jobs: {after_kill:?}");

    let mut second = env.spawn(&["work"]);
    wait_for("every job to finish", Duration::from_secs(90), || async {
        let q = env.queue("default").await;
        q.pending + q.reserved + q.delayed == 0
    })
    .await;
    sigterm(&second);
    assert!(wait_exit(&mut second, Duration::from_secs(30)).await.success(), "work exits 0 on SIGTERM");

    let q = env.queue("default").await;
    assert_eq!(q.failed, 0, "no job failed: {q:?}");
    let done = env.backend.jobs(JobFilter { state: Some(JobState::Completed), ..Default::default() }, Page::new(1, 10_000)).await.unwrap();
    let mut times_completed: HashMap<_, u32> = HashMap::new();
    for j in &done.items {
        *times_completed.entry(j.id).or_default() += 1;
    }
    for id in &ids {
        assert_eq!(times_completed.get(id).copied(), Some(1), "job {id} completed exactly once");
    }
    assert_eq!(done.items.len() as u64, total, "no other completions recorded");
    let retried = done.items.iter().filter(|j| j.attempts == 2).count();
    assert!(retried > 0, "the jobs the killed worker held ran again (attempt 2)");
    assert!(done.items.iter().all(|j| j.attempts <= 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_running_jobs_finish_and_returns_the_rest_unrun() {
    let env = TestEnv::new("[[supervisors]]\nqueues = [\"default\"]\nconcurrency = 4\nprefetch = 4\n\n[shutdown]\ngrace = \"20s\"\n");
    let jobs: Vec<NewJob> = (0..20).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 1500, "n": i }))).collect();
    env.backend.enqueue(jobs).await.unwrap();
    let mut worker = env.spawn(&["work"]);
    // Four running and four prefetched.
    wait_for("the worker to hold 8 jobs", Duration::from_secs(30), || async { env.queue("default").await.reserved == 8 }).await;
    sigterm(&worker);
    let status = wait_exit(&mut worker, Duration::from_secs(30)).await;
    assert!(status.success(), "work exits 0 after SIGTERM: {status:?}");

    let q = env.queue("default").await;
    assert_eq!(q.reserved, 0, "nothing left reserved: {q:?}");
    assert_eq!(q.failed, 0);
    let done = env.backend.jobs(JobFilter { state: Some(JobState::Completed), ..Default::default() }, Page::default()).await.unwrap();
    assert_eq!(done.total, 4, "the four running jobs finished");
    assert_eq!(q.pending, 16, "the rest went back to the queue");
    let pending = env.backend.jobs(JobFilter { state: Some(JobState::Pending), ..Default::default() }, Page::default()).await.unwrap();
    assert!(pending.items.iter().all(|j| j.attempts == 0), "jobs released unrun consumed no attempt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_auto_balanced_supervisor_moves_workers_to_the_waiting_queue() {
    let env = TestEnv::new(
        "[[supervisors]]\nname = \"balanced\"\nqueues = [\"busy\", \"idle\"]\nmax_workers = 10\nmin_workers = 1\nbalance = \"auto\"\n",
    );
    let jobs: Vec<NewJob> = (0..400).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 100, "n": i })).queue("busy")).collect();
    env.backend.enqueue(jobs).await.unwrap();
    let mut worker = env.spawn(&["work"]);
    let pools = || async {
        let workers = env.backend.workers(Duration::from_secs(30)).await.unwrap();
        workers.first().map(|w| w.supervisors[0].pools.iter().map(|p| (p.queues[0].clone(), p.workers)).collect::<Vec<_>>())
    };
    wait_for("the busy queue to get 9 of 10 workers", Duration::from_secs(30), || async {
        pools().await == Some(vec![("busy".to_string(), 9), ("idle".to_string(), 1)])
    })
    .await;
    let out = env.conveyor(&["queue", "list", "--json"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let busy = list.as_array().unwrap().iter().find(|q| q["queue"] == "busy").unwrap();
    assert_eq!(busy["workers"], 9, "queue list shows the allocation");
    sigterm(&worker);
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).await.success());
}

/// Spawns `conveyor args…` with `CONVEYOR_METRICS_ADDR` on a free port; returns it with the
/// URL of its `/metrics`.
fn spawn_with_metrics(env: &TestEnv, args: &[&str], extra_env: &[(&str, &str)]) -> (crate::Proc, String) {
    use std::io::{BufRead, BufReader};
    let mut cmd = env.conveyor(args);
    cmd.env("CONVEYOR_METRICS_ADDR", "127.0.0.1:0").envs(extra_env.iter().copied());
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let url = loop {
        let line = lines.next().expect("the process printed its metrics address").unwrap();
        if let Some(rest) = line.split("metrics on ").nth(1) {
            break rest.trim().to_string();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (crate::Proc(child), url)
}

/// A worker-only process serves its own counters on `CONVEYOR_METRICS_ADDR`, behind the read
/// token: what it ran is counted there, once per job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_process_serves_its_counters_on_the_metrics_port() {
    let env = TestEnv::new("");
    let total = 250u64;
    let jobs: Vec<NewJob> = (0..total).map(|i| NewJob::new("conveyor.noop", &json!({ "n": i })).queue("counted")).collect();
    env.backend.enqueue(jobs).await.unwrap();
    let (mut child, url) = spawn_with_metrics(
        &env,
        &["work", "--queue", "counted"],
        &[("CONVEYOR_API_TOKEN", "admin-token"), ("CONVEYOR_READ_TOKEN", "read-token")],
    );
    let http = reqwest::Client::new();
    assert_eq!(http.get(&url).send().await.unwrap().status(), 401, "/metrics needs a token");
    let series = r#"conveyor_jobs_total{queue="counted",kind="conveyor.noop",outcome="completed"} "#;
    let count = || async {
        let text = http.get(&url).bearer_auth("read-token").send().await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(series)).map(|n| n.parse::<u64>().unwrap()).unwrap_or(0)
    };
    wait_for("the worker's counter to reach every job", Duration::from_secs(60), || async { count().await == total }).await;
    assert_eq!(env.queue("counted").await.pending, 0);
    let api = url.replace("/metrics", "/api/queues");
    assert_eq!(http.get(&api).bearer_auth("admin-token").send().await.unwrap().status(), 404, "the metrics port serves no API");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

/// A lease far longer than the test: only the liveness check can bring jobs back in time.
pub(crate) const LONG_LEASE: &str =
    "[[supervisors]]\nname = \"default\"\nqueues = [\"default\"]\nconcurrency = 8\nlease = \"120s\"\n\n[retention]\ncompleted = 100000\n";

/// The jobs a SIGKILLed worker held run again within seconds (its process is gone, which the
/// reapers of this machine see), not when its 120 s lease expires; each completes once.
pub(crate) async fn a_dead_workers_jobs_run_again_within_seconds(env: TestEnv) {
    let total = 40u64;
    let jobs: Vec<NewJob> = (0..total).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 400, "n": i }))).collect();
    let ids: Vec<_> = env.backend.enqueue(jobs).await.unwrap().iter().map(|o| o.id()).collect();
    let mut first = env.spawn(&["work"]);
    wait_for("the first worker to hold jobs", Duration::from_secs(30), || async { env.queue("default").await.reserved >= 8 }).await;
    first.kill().expect("SIGKILL the worker");
    first.wait().unwrap();
    let killed = std::time::Instant::now();
    let mut second = env.spawn(&["work"]);
    wait_for("every job to finish, well within the lease", Duration::from_secs(30), || async {
        let q = env.queue("default").await;
        q.pending + q.reserved + q.delayed == 0
    })
    .await;
    let took = killed.elapsed();
    assert!(took < Duration::from_secs(30), "{took:?}");
    sigterm(&second);
    assert!(wait_exit(&mut second, Duration::from_secs(30)).await.success());
    let done = env.backend.jobs(JobFilter { state: Some(JobState::Completed), ..Default::default() }, Page::new(1, 1000)).await.unwrap();
    let mut times: HashMap<_, u32> = HashMap::new();
    for j in &done.items {
        *times.entry(j.id).or_default() += 1;
    }
    assert!(ids.iter().all(|id| times.get(id) == Some(&1)), "each job completed exactly once: {times:?}");
    assert!(done.items.iter().any(|j| j.attempts == 2), "the dead worker's jobs ran again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_jobs_run_again_within_seconds_on_sqlite() {
    a_dead_workers_jobs_run_again_within_seconds(TestEnv::new(LONG_LEASE)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_jobs_run_again_within_seconds_on_postgres() {
    let Some(env) = TestEnv::postgres(LONG_LEASE, None) else { return };
    a_dead_workers_jobs_run_again_within_seconds(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_workers_jobs_run_again_within_seconds_with_the_queue_on_redis() {
    let Some(redis) = conveyor_backends::redis::testing::TestRedis::create() else { return };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    a_dead_workers_jobs_run_again_within_seconds(TestEnv::redis(LONG_LEASE, &url, &prefix, Some(redis))).await;
}

/// A worker that is stopped (SIGSTOP: alive, but runs nothing) is not robbed: its jobs stay
/// reserved while another worker runs, and it finishes them once continued. On PostgreSQL: a
/// process stopped inside a SQLite write transaction would hold the file's one write lock and
/// stop every other writer, which is SQLite's nature, not what this test is about.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_but_living_worker_keeps_its_jobs() {
    let Some(env) = TestEnv::postgres(LONG_LEASE, None) else { return };
    let held: Vec<NewJob> = (0..8).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 300, "n": i }))).collect();
    env.backend.enqueue(held).await.unwrap();
    let mut stalled = env.spawn(&["work"]);
    wait_for("the worker to hold the 8 jobs", Duration::from_secs(30), || async { env.queue("default").await.reserved == 8 }).await;
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(stalled.id() as libc::pid_t, libc::SIGSTOP) }, 0);
    let mut other = env.spawn(&["work"]);
    // The other worker runs new jobs (so its reaper has run several times)…
    let more: Vec<NewJob> = (0..8).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 10, "n": 100 + i }))).collect();
    env.backend.enqueue(more).await.unwrap();
    wait_for("the other worker to run the new jobs", Duration::from_secs(30), || async {
        env.backend.jobs(JobFilter { state: Some(JobState::Completed), ..Default::default() }, Page::default()).await.unwrap().total >= 8
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await; // three more reaper rounds: nothing may change
    assert_eq!(env.queue("default").await.reserved, 8, "the stopped worker's jobs are still its own");
    assert_eq!(unsafe { libc::kill(stalled.id() as libc::pid_t, libc::SIGCONT) }, 0);
    wait_for("the continued worker to finish its jobs", Duration::from_secs(30), || async {
        let q = env.queue("default").await;
        q.pending + q.reserved + q.delayed == 0
    })
    .await;
    let done = env.backend.jobs(JobFilter { state: Some(JobState::Completed), ..Default::default() }, Page::default()).await.unwrap();
    assert_eq!(done.total, 16);
    assert!(done.items.iter().all(|j| j.attempts == 1), "nothing ran twice");
    for w in [&mut stalled, &mut other] {
        sigterm(w);
        assert!(wait_exit(w, Duration::from_secs(30)).await.success());
    }
}

/// `conveyor schedule` serves its counters too: the jobs it enqueued show there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scheduler_process_serves_its_counters_on_the_metrics_port() {
    let env = TestEnv::new("[[schedule]]\nname = \"tick\"\ncron = \"@every 1s\"\njob = \"conveyor.noop\"\nqueue = \"ticks\"\n");
    let (mut child, url) = spawn_with_metrics(&env, &["schedule"], &[]);
    let series = r#"conveyor_jobs_enqueued_total{queue="ticks",kind="conveyor.noop"} "#;
    let enqueued = || async {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        text.lines().find_map(|l| l.strip_prefix(series)).map(|n| n.parse::<u64>().unwrap()).unwrap_or(0)
    };
    wait_for("the scheduler's enqueues to be counted", Duration::from_secs(30), || async { enqueued().await >= 2 }).await;
    let stored = env.queue("ticks").await;
    assert!(stored.pending + stored.reserved + stored.delayed >= enqueued().await.min(2), "{stored:?}");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}
