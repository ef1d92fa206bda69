//! The queue on Redis: two `conveyor work` processes sharing it, and Redis restarted under load
//! (gracefully with AOF, and killed with `appendfsync always`). Each test has a key prefix of its
//! own on the machine's Redis, or a Redis server of its own.

use std::collections::HashMap;
use std::time::Duration;

use conveyor_backends::redis::testing::{TestRedis, TestRedisServer};

use crate::{completions, drained, enqueue_sleeps as enqueue, sigterm, wait_exit, wait_for, TestEnv};

const CONFIG: &str = "[[supervisors]]\nname = \"default\"\nqueues = [\"default\"]\nconcurrency = 16\nlease = \"30s\"\n\n\
                      [retention]\ncompleted = 100000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_redis_queue_without_double_processing() {
    let Some(redis) = TestRedis::create() else { return };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    let env = TestEnv::redis(CONFIG, &url, &prefix, Some(redis));
    let total = 20_000;
    enqueue(&env, total, 1).await;
    let mut workers: Vec<_> = (0..2).map(|_| env.spawn(&["work"])).collect();
    wait_for("every job to finish", Duration::from_secs(180), || drained(&env)).await;
    for w in &mut workers {
        sigterm(w);
        assert!(wait_exit(w, Duration::from_secs(30)).await.success(), "work exits 0 on SIGTERM");
    }
    let done = completions(&env).await;
    assert_eq!(done.len(), total, "every job completed");
    let twice: Vec<_> = done.iter().filter(|(_, (n, _))| *n != 1).collect();
    assert!(twice.is_empty(), "jobs completed more than once: {:?}", &twice[..twice.len().min(5)]);
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for (_, w) in done.values() {
        *per_worker.entry(w.clone().unwrap_or_default()).or_default() += 1;
    }
    assert_eq!(per_worker.len(), 2, "both processes took jobs: {per_worker:?}");
    assert!(per_worker.values().all(|n| *n > total / 10), "the work is shared: {per_worker:?}");
    assert_eq!(env.queue("default").await.failed, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_under_load_lose_nothing_and_workers_reconnect() {
    // Under CI the test must run; elsewhere it needs the machine's redis-server binary.
    let dir = tempfile::tempdir().expect("temp dir");
    let mut server = match TestRedisServer::start(dir.path().to_path_buf(), "always") {
        Ok(s) => s,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: {e}");
            return;
        }
        Err(e) => panic!("a Redis server of the test's own is required under CI: {e}"),
    };
    let env = TestEnv::redis(CONFIG, &server.url(), "restart", None);
    let total = 10_000;
    enqueue(&env, total, 5).await;
    let mut worker = env.spawn(&["work"]);

    let done_count = || async { completions(&env).await.len() };
    wait_for("a fifth of the jobs to finish", Duration::from_secs(120), || async { done_count().await >= total / 5 }).await;
    // A graceful restart: SHUTDOWN writes the AOF, the server comes back with every job.
    tokio::task::block_in_place(|| {
        server.shutdown();
        std::thread::sleep(Duration::from_millis(500));
        server.launch()
    })
    .expect("restart Redis after SHUTDOWN");
    let after_first = done_count().await;
    assert!(after_first < total, "the first restart happened while jobs were flowing");
    wait_for("more jobs to finish after the graceful restart", Duration::from_secs(120), || async {
        done_count().await >= after_first + total / 5
    })
    .await;
    // A crash: SIGKILL with `appendfsync always` loses nothing that was acknowledged.
    tokio::task::block_in_place(|| {
        server.kill();
        std::thread::sleep(Duration::from_millis(500));
        server.launch()
    })
    .expect("restart Redis after SIGKILL");
    let after_second = done_count().await;
    assert!(after_second < total, "the second restart happened while jobs were flowing");
    assert!(worker.try_wait().unwrap().is_none(), "the worker survives both outages");

    wait_for("every job to finish after the restarts", Duration::from_secs(300), || drained(&env)).await;
    sigterm(&worker);
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).await.success(), "work exits 0 on SIGTERM");
    let done = completions(&env).await;
    assert_eq!(done.len(), total, "every job completed");
    let twice: Vec<_> = done.iter().filter(|(_, (n, _))| *n != 1).collect();
    assert!(twice.is_empty(), "jobs completed more than once although no lease expired: {:?}", &twice[..twice.len().min(5)]);
    assert_eq!(env.queue("default").await.failed, 0);
}
