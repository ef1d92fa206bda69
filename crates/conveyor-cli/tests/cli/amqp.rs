//! The queue on RabbitMQ: 50,000 jobs through the machine's RabbitMQ while a `conveyor work`
//! is killed with SIGKILL and another has its connection closed by the broker; two workers
//! sharing a queue (each with a queue-name prefix of its own); and a node of the test's own
//! restarted under load, gracefully and by SIGKILL.

use std::time::Duration;

use conveyor_backends::amqp::testing::{close_connections, TestAmqp, TestRabbitServer};

use crate::{
    completions, drained, enqueue_sleeps as enqueue, sigterm, survive_two_restarts, two_workers_share, wait_exit, wait_for, TestEnv,
};

const CONFIG: &str = "[[supervisors]]\nname = \"default\"\nqueues = [\"default\"]\nconcurrency = 16\nlease = \"5s\"\n\n\
                      [retention]\ncompleted = 100000\n";

fn test_amqp() -> Option<TestAmqp> {
    let mut amqp = TestAmqp::create()?;
    amqp.cleanup.push("default".into());
    Some(amqp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_jobs_survive_a_killed_worker_and_a_closed_connection() {
    let Some(amqp) = test_amqp() else { return };
    let prefix = amqp.prefix.clone();
    let env = TestEnv::amqp(CONFIG, amqp);
    let total = 50_000;
    enqueue(&env, total, 1).await;
    assert_eq!(env.queue("default").await.pending, total as u64, "every job is pending in the ledger");

    let mut first = env.spawn(&["work"]);
    let done_count = || async { completions(&env).await.len() };
    wait_for("a fifth of the jobs to finish", Duration::from_secs(180), || async { done_count().await >= total / 5 }).await;
    // SIGKILL: the jobs it held stay reserved in the ledger until their 5 s leases expire; the
    // broker requeues their messages at once (dropped at claim: the jobs are not pending).
    first.kill().expect("SIGKILL the worker");
    let _ = first.wait();
    let at_kill = done_count().await;
    assert!(at_kill < total, "the worker was killed while jobs were flowing");

    let mut second = env.spawn(&["work"]);
    wait_for("more jobs to finish after the kill", Duration::from_secs(180), || async { done_count().await >= at_kill + total / 5 }).await;
    // The broker closes the worker's connection (as a restart does): it reconnects by itself.
    let closed = tokio::task::block_in_place(|| close_connections(&prefix));
    match closed {
        Ok(n) => assert!(n >= 1, "the worker's connection was found and closed"),
        Err(e) if std::env::var_os("CI").is_none() => eprintln!("not closing connections: {e}"),
        Err(e) => panic!("rabbitmqctl is required under CI: {e}"),
    }
    let after_close = done_count().await;
    assert!(after_close < total, "the connection was closed while jobs were flowing");

    wait_for("every job to finish", Duration::from_secs(300), || drained(&env)).await;
    assert!(second.try_wait().unwrap().is_none(), "the worker survived its connection's loss");
    sigterm(&second);
    assert!(wait_exit(&mut second, Duration::from_secs(30)).await.success(), "work exits 0 on SIGTERM");

    let done = completions(&env).await;
    assert_eq!(done.len(), total, "every job completed: none lost");
    let twice: Vec<_> = done.iter().filter(|(_, (n, _))| *n != 1).collect();
    assert!(twice.is_empty(), "jobs completed more than once: {:?}", &twice[..twice.len().min(5)]);
    let q = env.queue("default").await;
    assert_eq!((q.pending, q.reserved, q.delayed, q.failed), (0, 0, 0, 0), "nothing left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_rabbitmq_queue_without_double_processing() {
    let Some(amqp) = test_amqp() else { return };
    let env = TestEnv::amqp(CONFIG, amqp);
    two_workers_share(&env, 10_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rabbitmq_restarts_under_load_lose_nothing_and_workers_reconnect() {
    // A node of the test's own (restarting the machine's broker would disturb other tests).
    let dir = tempfile::tempdir().expect("temp dir");
    let server = match tokio::task::block_in_place(|| TestRabbitServer::start(dir.path().join("node"))) {
        Ok(s) => s,
        Err(e) if std::env::var_os("CI").is_none() => {
            eprintln!("skipping: {e}");
            return;
        }
        Err(e) => panic!("a RabbitMQ node of the test's own is required under CI: {e}"),
    };
    let amqp = TestAmqp { url: server.url(), prefix: "restart".into(), cleanup: Vec::new() };
    let env = TestEnv::amqp(CONFIG, amqp);
    // Graceful: the node stops (closing every connection) and comes back with its durable
    // queues and persistent messages. Crash: SIGKILL of the node; whatever it had not
    // persisted is republished from the ledger by the orphan sweep.
    let graceful = || {
        server.stop();
        server.launch()
    };
    let crash = || {
        server.kill();
        server.launch()
    };
    survive_two_restarts(&env, 10_000, graceful, crash).await;
}
