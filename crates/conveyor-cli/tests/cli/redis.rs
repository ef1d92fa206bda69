//! The queue on Redis: two `conveyor work` processes sharing it, and Redis restarted under load
//! (gracefully with AOF, and killed with `appendfsync always`). Each test has a key prefix of its
//! own on the machine's Redis, or a Redis server of its own.

use std::time::Duration;

use conveyor_backends::redis::testing::{TestRedis, TestRedisServer};

use crate::{survive_two_restarts, two_workers_share, TestEnv};

const CONFIG: &str = "[[supervisors]]\nname = \"default\"\nqueues = [\"default\"]\nconcurrency = 16\nlease = \"30s\"\n\n\
                      [retention]\ncompleted = 100000\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_redis_queue_without_double_processing() {
    let Some(redis) = TestRedis::create() else { return };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    let env = TestEnv::redis(CONFIG, &url, &prefix, Some(redis));
    two_workers_share(&env, 20_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarts_under_load_lose_nothing_and_workers_reconnect() {
    // Under CI the test must run; elsewhere it needs the machine's redis-server binary.
    let dir = tempfile::tempdir().expect("temp dir");
    let server = match TestRedisServer::start(dir.path().to_path_buf(), "always") {
        Ok(s) => s,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: {e}");
            return;
        }
        Err(e) => panic!("a Redis server of the test's own is required under CI: {e}"),
    };
    let env = TestEnv::redis(CONFIG, &server.url(), "restart", None);
    let server = std::sync::Mutex::new(server);
    // Graceful: SHUTDOWN writes the AOF, the server comes back with every job. Crash: SIGKILL
    // with `appendfsync always` loses nothing that was acknowledged.
    let restart = |crash: bool| {
        let mut s = server.lock().unwrap();
        if crash {
            s.kill();
        } else {
            s.shutdown();
        }
        std::thread::sleep(Duration::from_millis(500));
        s.launch()
    };
    survive_two_restarts(&env, 10_000, || restart(false), || restart(true)).await;
}
