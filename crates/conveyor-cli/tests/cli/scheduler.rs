//! The scheduler across processes.

use std::collections::HashSet;
use std::time::Duration;

use conveyor_core::backend::{JobFilter, Page, RowExt};
use conveyor_core::job::JobState;

use crate::{sigterm, wait_exit, wait_for, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_schedulers_fire_each_tick_once() {
    let env = TestEnv::new("[[schedule]]\nname = \"every-second\"\ncron = \"@every 1s\"\njob = \"conveyor.noop\"\nqueue = \"ticks\"\n");
    let mut procs: Vec<_> = (0..3).map(|_| env.spawn(&["schedule"])).collect();
    let ticks =
        || async { env.backend.query("SELECT tick, job_id FROM schedule_ticks WHERE name = 'every-second'", vec![]).await.unwrap() };
    wait_for("four ticks", Duration::from_secs(30), || async { ticks().await.len() >= 4 }).await;
    for p in &procs {
        sigterm(p);
    }
    for p in &mut procs {
        assert!(wait_exit(p, Duration::from_secs(15)).await.success(), "schedule exits 0 on SIGTERM");
    }

    let rows = ticks().await;
    let jobs = env
        .backend
        .jobs(JobFilter { queue: Some("ticks".into()), state: Some(JobState::Pending), ..Default::default() }, Page::new(1, 1000))
        .await
        .unwrap();
    assert_eq!(jobs.total as usize, rows.len(), "one job per tick, however many schedulers ran");
    let tick_jobs: HashSet<String> = rows.iter().map(|r| r.text(1).unwrap().to_string()).collect();
    let enqueued: HashSet<String> = jobs.items.iter().map(|j| j.id.to_string()).collect();
    assert_eq!(tick_jobs, enqueued, "each tick's job is the one enqueued");
    let mut times: Vec<i64> = rows.iter().map(|r| r.int(0)).collect();
    times.sort_unstable();
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], 1_000, "consecutive whole-second ticks, none missing or doubled: {times:?}");
    }
    assert!(jobs.items.iter().all(|j| j.tags.contains(&"schedule:every-second".to_string())));
}
