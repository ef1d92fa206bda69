//! `conveyor serve`: the HTTP API on a real socket.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use conveyor_core::NewJob;
use serde_json::{json, Value};

use crate::{sigterm, wait_exit, TestEnv};

/// Starts `conveyor serve` on a free port and returns it with its base URL.
pub(crate) fn serve(env: &TestEnv, extra_env: &[(&str, &str)]) -> (crate::Proc, String) {
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
    (crate::Proc(child), url)
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

    let held = env.backend.enqueue(vec![NewJob::new("conveyor.noop", &json!({})).queue("reports")]).await.unwrap()[0].id();
    let later = env.backend.enqueue(vec![NewJob::new("conveyor.noop", &json!({})).delay(Duration::from_secs(3600))]).await.unwrap()[0].id();
    let r = http.post(format!("{url}/api/queues/reports/pause")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // A waiting job says why: its queue is paused, or it is scheduled.
    let job = |id: conveyor_core::JobId| {
        let http = http.clone();
        let url = url.clone();
        async move { http.get(format!("{url}/api/jobs/{id}")).send().await.unwrap().json::<Value>().await.unwrap()["data"].clone() }
    };
    let j = job(held).await;
    assert_eq!(j["waiting"]["reason"], "paused", "{j}");
    let j = job(later).await;
    assert_eq!(j["waiting"]["reason"], "scheduled", "{j}");
    assert!(j["waiting"]["detail"].as_str().unwrap().contains("scheduled to run at"), "{j}");
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_keep_the_envelope_for_oversized_bodies_and_wrong_methods() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[]);
    let http = reqwest::Client::new();
    // A declared body over the limit is refused before it is sent (so speak HTTP by hand: a
    // client that insists on sending it would see the connection close under it).
    let addr = url.trim_start_matches("http://").to_string();
    let raw = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"POST /api/queues/default/pause HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 3145728\r\nConnection: close\r\n\r\n").unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    })
    .await
    .unwrap();
    assert!(raw.starts_with("HTTP/1.1 413"), "{raw}");
    assert!(raw.contains("\"payload_too_large\""), "{raw}");
    let r = http.delete(format!("{url}/api/queues")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["success"], false);
    let doc: Value = http.get(format!("{url}/api/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/api/jobs/failed/{id}/retry"]["post"].is_object(), "the document lists the real routes");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

/// The notification endpoints through `conveyor serve` (its own workers deliver): events with
/// idempotency, registration (201, then 409), the inbox, rule validation and preview.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_notification_endpoints_take_events_and_deliver_the_welcome_messages() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[]);
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| http.post(format!("{url}{path}")).json(&body).send();

    let r = post("/api/v1/users/register", json!({ "name": "Ada", "email": "ada@example.com" })).await.unwrap();
    assert_eq!(r.status(), 201);
    let user: Value = r.json().await.unwrap();
    let id = user["data"]["user_id"].as_i64().unwrap();
    assert!(user["data"]["event_id"].is_string());
    assert_eq!(post("/api/v1/users/register", json!({ "name": "Ada", "email": "ada@example.com" })).await.unwrap().status(), 409);
    let bad = post("/api/v1/users/register", json!({ "name": "Ada", "email": "nope" })).await.unwrap();
    assert_eq!(bad.status(), 422);
    assert!(bad.json::<Value>().await.unwrap()["error"]["details"]["fields"]["email"].is_string());

    crate::wait_for("the welcome messages", Duration::from_secs(30), || async {
        let logs: Value =
            http.get(format!("{url}/api/v1/notifications?user_id={id}&status=sent")).send().await.unwrap().json().await.unwrap();
        logs["meta"]["total"] == 2
    })
    .await;
    let inbox: Value = http.get(format!("{url}/api/v1/users/{id}/inbox")).send().await.unwrap().json().await.unwrap();
    assert_eq!((inbox["meta"]["unread"].as_i64(), inbox["data"][0]["title"].as_str()), (Some(1), Some("Welcome, Ada!")));
    let msg = inbox["data"][0]["id"].as_str().unwrap();
    assert_eq!(post(&format!("/api/v1/users/{id}/inbox/{msg}/read"), json!({})).await.unwrap().status(), 200);

    let first =
        post("/api/events", json!({ "event": "signup_nudge", "payload": { "user_id": id }, "idempotency_key": "k1" })).await.unwrap();
    assert_eq!(first.status(), 202);
    let first: Value = first.json().await.unwrap();
    let again =
        post("/api/events", json!({ "event": "signup_nudge", "payload": { "user_id": id }, "idempotency_key": "k1" })).await.unwrap();
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!((again["data"]["event_id"].clone(), again["data"]["duplicate"].clone()), (first["data"]["event_id"].clone(), json!(true)));
    assert_eq!(post("/api/events", json!({ "payload": {} })).await.unwrap().status(), 422);

    let r = post("/api/rules", json!({ "event": "x", "template_id": 424242, "channel": "email" })).await.unwrap();
    assert_eq!(r.status(), 422, "a rule pointing at a missing template");
    let t: Value = post("/api/templates", json!({ "name": "t", "channel": "slack", "body": "Hi {{ user.name }}" }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tid = t["data"]["id"].as_i64().unwrap();
    let p: Value = post(&format!("/api/templates/{tid}/preview"), json!({ "payload": { "user": { "name": "Bo" } } }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["data"]["body"], "Hi Bo");
    let missing = post(&format!("/api/templates/{tid}/preview"), json!({ "payload": {} })).await.unwrap();
    assert_eq!(missing.status(), 422);
    assert!(missing.json::<Value>().await.unwrap()["error"]["message"].as_str().unwrap().contains("user.name"));
    let prefs =
        http.put(format!("{url}/api/v1/users/{id}/preferences")).json(&json!({ "channels": { "sms": false } })).send().await.unwrap();
    assert_eq!(prefs.json::<Value>().await.unwrap()["data"]["channels"]["sms"], false);
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

/// A team alert: a Slack rule without a recipient, for an event that names no user, goes to
/// `CONVEYOR_SLACK_WEBHOOK` (the SPEC's default), not to "no known user".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slack_rule_without_recipient_goes_to_the_default_webhook() {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let app = {
        let got = got.clone();
        axum::Router::new().route(
            "/team",
            axum::routing::post(move |body: String| {
                let got = got.clone();
                async move {
                    got.lock().unwrap().push(body);
                    "ok"
                }
            }),
        )
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = format!("http://{}/team", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[("CONVEYOR_SLACK_WEBHOOK", receiver.as_str())]);
    let http = reqwest::Client::new();
    let post = |path: &str, body: Value| http.post(format!("{url}{path}")).json(&body).send();
    let t: Value = post("/api/templates", json!({ "name": "alert", "channel": "slack", "body": "Stock low: {{ sku }}" }))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let tid = t["data"]["id"].as_i64().unwrap();
    assert_eq!(post("/api/rules", json!({ "event": "stock_low", "template_id": tid, "channel": "slack" })).await.unwrap().status(), 201);
    assert_eq!(post("/api/events", json!({ "event": "stock_low", "payload": { "sku": "SKU-1" } })).await.unwrap().status(), 202);
    crate::wait_for("the team alert", Duration::from_secs(30), || {
        let n = got.lock().unwrap().len();
        std::future::ready(n == 1)
    })
    .await;
    assert_eq!(serde_json::from_str::<Value>(&got.lock().unwrap()[0]).unwrap(), json!({ "text": "Stock low: SKU-1" }));
    let logs: Value = http.get(format!("{url}/api/v1/notifications?event=stock_low")).send().await.unwrap().json().await.unwrap();
    assert_eq!(logs["data"][0]["status"], "sent", "{logs}");
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

/// The bounds a caller meets over a real socket: deep offset pages are refused, cursor pages
/// reach every job, and an import of bad lines lists 1,000 and counts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lists_and_imports_are_bounded_over_http() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[]);
    let http = reqwest::Client::new();

    let r = http.get(format!("{url}/api/jobs?page=10001&per_page=1")).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["details"]["fields"]["page"].as_str().unwrap().contains("cursor"), "{body}");

    // On a paused queue, so the served workers leave the jobs where they are.
    http.post(format!("{url}/api/queues/deep/pause")).send().await.unwrap();
    let jobs: Vec<NewJob> = (0..250).map(|i| NewJob::new("conveyor.noop", &json!({ "i": i })).queue("deep")).collect();
    env.backend.enqueue(jobs).await.unwrap();
    let mut seen = std::collections::HashSet::new();
    let mut next: Option<String> = None;
    loop {
        let cursor = next.as_deref().map_or(String::new(), |c| format!("&cursor={c}"));
        let page: Value = http.get(format!("{url}/api/jobs?queue=deep&per_page=100{cursor}")).send().await.unwrap().json().await.unwrap();
        assert_eq!((page["meta"]["total"].as_u64(), page["meta"]["total_capped"].as_bool()), (Some(250), Some(false)), "{}", page["meta"]);
        for j in page["data"].as_array().unwrap() {
            assert!(seen.insert(j["id"].as_str().unwrap().to_string()));
        }
        match page["meta"]["next_cursor"].as_str() {
            Some(c) => next = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(seen.len(), 250);

    let mut csv = String::from("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n");
    for i in 0..1_200 {
        csv.push_str(&format!("BAD-{i},1,Ann,ann@example.com,NOPE,1,1.00,2026-11-01\n"));
    }
    let r = http.post(format!("{url}/api/orders/import")).header("content-type", "text/csv").body(csv).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let report: Value = r.json().await.unwrap();
    assert_eq!(report["data"]["rejected"].as_array().unwrap().len(), 1_000, "{}", report["data"]["rejected_total"]);
    assert_eq!(report["data"]["rejected_total"], 1_200);

    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}
