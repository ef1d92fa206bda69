//! The one-shot commands: output on stdout, errors on stderr with the right exit codes.

use conveyor_core::NewJob;
use serde_json::{json, Value};

use crate::TestEnv;

fn run(env: &TestEnv, args: &[&str]) -> (i32, String, String) {
    let out = env.conveyor(args).output().expect("running conveyor");
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queue_commands_show_and_steer_queues() {
    let env = TestEnv::new("");
    let jobs: Vec<NewJob> = (0..5).map(|i| NewJob::new("conveyor.noop", &json!({ "i": i })).queue("mail")).collect();
    env.backend.enqueue(jobs).await.unwrap();
    env.backend
        .enqueue(vec![NewJob::new("conveyor.noop", &json!({})).queue("mail").delay(std::time::Duration::from_secs(600))])
        .await
        .unwrap();

    let (code, out, _) = run(&env, &["queue", "list", "--json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).expect("queue list --json prints JSON only");
    let mail = list.as_array().unwrap().iter().find(|q| q["queue"] == "mail").expect("mail queue listed");
    assert_eq!(mail["pending"], 5);
    assert_eq!(mail["delayed"], 1);
    for key in ["reserved", "failed", "paused", "per_minute", "oldest_wait_s"] {
        assert!(mail.get(key).is_some(), "queue list --json has {key}");
    }

    assert_eq!(run(&env, &["queue", "pause", "mail"]).0, 0);
    assert!(env.queue("mail").await.paused);
    assert_eq!(run(&env, &["queue", "resume", "mail"]).0, 0);
    assert!(!env.queue("mail").await.paused);
    let (code, out, _) = run(&env, &["queue", "clear", "--queue", "mail"]);
    assert_eq!(code, 0);
    assert!(out.contains("cleared 6"), "{out}");
    assert_eq!(env.queue("mail").await.pending, 0);

    let (code, _, err) = run(&env, &["queue", "pause", "no spaces"]);
    assert_eq!(code, 1);
    assert_eq!(err.lines().count(), 1, "one-line reason: {err}");
    assert_eq!(run(&env, &["queue", "frobnicate"]).0, 2, "usage errors exit 2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_commands_list_show_retry_forget_and_flush() {
    let env = TestEnv::new("");
    // No handler is registered for this kind, so a worker fails it at once.
    let jobs: Vec<NewJob> = (0..3).map(|i| NewJob::new("no.such.kind", &json!({ "i": i }))).collect();
    let ids: Vec<String> = env.backend.enqueue(jobs).await.unwrap().iter().map(|o| o.id().to_string()).collect();
    let mut worker = env.spawn(&["work"]);
    crate::wait_for("three failed jobs", std::time::Duration::from_secs(30), || async { env.queue("default").await.failed == 3 }).await;
    crate::sigterm(&worker);
    assert!(crate::wait_exit(&mut worker, std::time::Duration::from_secs(30)).await.success());

    let (code, out, _) = run(&env, &["failed", "list", "--json"]);
    assert_eq!(code, 0);
    let list: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 3);
    assert!(list[0]["error"].as_str().unwrap().contains("no handler registered"));

    let (code, out, _) = run(&env, &["failed", "show", &ids[0], "--json"]);
    assert_eq!(code, 0);
    let shown: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["id"], ids[0].as_str());
    assert_eq!(shown["payload"]["i"], 0);

    let (code, out, _) = run(&env, &["failed", "retry", &ids[0]]);
    assert_eq!(code, 0, "{out}");
    let q = env.queue("default").await;
    assert_eq!((q.pending, q.failed), (1, 2));
    let job = env.backend.job(ids[0].parse().unwrap()).await.unwrap().unwrap();
    assert_eq!(job.attempts, 0, "a retried job starts with a fresh attempt count");

    assert_eq!(run(&env, &["failed", "forget", &ids[1]]).0, 0);
    assert_eq!(env.queue("default").await.failed, 1);
    let (code, _, err) = run(&env, &["failed", "forget", &ids[1]]);
    assert_eq!(code, 1, "forgetting twice is an error");
    assert!(err.contains("no failed job"), "{err}");
    let (code, out, _) = run(&env, &["failed", "flush"]);
    assert_eq!(code, 0);
    assert!(out.contains("flushed 1"), "{out}");
    let (code, _, err) = run(&env, &["failed", "show", "not-a-uuid"]);
    assert_eq!(code, 1);
    assert!(err.contains("not a job id"), "{err}");
}

#[test]
fn invalid_configuration_names_the_key() {
    let env_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .args(["queue", "list"])
        .current_dir(env_dir.path())
        .env_clear()
        .env("CONVEYOR_QUEUE", "redis")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CONVEYOR_REDIS_URL"), "{err}");
}
