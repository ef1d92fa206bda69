//! `conveyor serve`: the HTTP API on a real socket.

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::Duration;

use conveyor_core::NewJob;
use serde_json::{json, Value};

use crate::{sigterm, wait_exit, TestEnv};

/// Starts `conveyor serve` on a free port and returns it with its base URL.
pub(crate) fn serve(env: &TestEnv, extra_env: &[(&str, &str)]) -> (Child, String) {
    let mut cmd = env.conveyor(&["serve"]);
    cmd.env("CONVEYOR_HTTP_ADDR", "127.0.0.1:0");
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let mut child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut lines = BufReader::new(stderr).lines();
    let url = loop {
        let line = lines.next().expect("serve printed its address").unwrap();
        if let Some(rest) = line.split("listening on ").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    // Keep draining stderr so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_answers_health_and_queue_administration() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[]);
    let http = reqwest::Client::new();

    let health: Value = http.get(format!("{url}/api/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["success"], true);
    assert_eq!(health["data"]["checks"]["database"]["status"], "ok");
    crate::wait_for("the worker to register", Duration::from_secs(15), || async {
        let h: Value = http.get(format!("{url}/health")).send().await.unwrap().json().await.unwrap();
        h["data"]["checks"]["workers"]["status"] == "ok"
    })
    .await;

    env.backend.enqueue(vec![NewJob::new("conveyor.noop", &json!({})).queue("reports")]).await.unwrap();
    let r = http.post(format!("{url}/api/queues/reports/pause")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let queues: Value = http.get(format!("{url}/api/queues")).send().await.unwrap().json().await.unwrap();
    let reports = queues["data"].as_array().unwrap().iter().find(|q| q["queue"] == "reports").unwrap().clone();
    assert_eq!(reports["paused"], true);

    let r = http.get(format!("{url}/api/jobs?per_page=5000")).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], false);
    assert_eq!(body["error"]["code"], "validation_failed");
    assert!(body["error"]["details"]["fields"]["per_page"].is_string());

    let jobs: Value = http.get(format!("{url}/api/jobs?queue=reports&status=pending")).send().await.unwrap().json().await.unwrap();
    assert_eq!(jobs["meta"]["total"], 1);
    let r = http.get(format!("{url}/api/jobs/not-a-job")).send().await.unwrap();
    assert_eq!(r.status(), 404);
    let r = http.get(format!("{url}/api/jobs/failed/00000000-0000-7000-8000-000000000000")).send().await.unwrap();
    assert_eq!(r.status(), 404);

    let workers: Value = http.get(format!("{url}/api/workers")).send().await.unwrap().json().await.unwrap();
    assert_eq!(workers["data"][0]["supervisors"][0]["queues"][0], "default");
    let metrics = http.get(format!("{url}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("conveyor_queue_jobs{queue=\"reports\",state=\"pending\"} 1"), "{metrics}");

    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_writes_need_it() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[("CONVEYOR_API_TOKEN", "s3cret")]);
    let http = reqwest::Client::new();
    let r = http.post(format!("{url}/api/queues/default/pause")).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");
    let r = http.post(format!("{url}/api/queues/default/pause")).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = http.post(format!("{url}/api/queues/default/pause")).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(http.get(format!("{url}/api/queues")).send().await.unwrap().status(), 200, "reads need no token");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

#[test]
fn serving_a_public_address_without_a_token_is_refused() {
    let env_dir = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_conveyor"))
        .arg("serve")
        .current_dir(env_dir.path())
        .env_clear()
        .env("CONVEYOR_HTTP_ADDR", "0.0.0.0:0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CONVEYOR_API_TOKEN"));
}
