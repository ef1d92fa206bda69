//! Work over HTTP through `conveyor serve`: one job, a bulk of 1,000 in one commit, a batch with
//! its callback, unique keys, and a 422 naming the field for each kind of bad input.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::http::serve;
use crate::{sigterm, wait_exit, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_and_batches_enqueue_over_http_with_every_option() {
    let env = TestEnv::new("");
    let (mut child, url) = serve(&env, &[("CONVEYOR_API_TOKEN", "admin-token-jobs-1"), ("CONVEYOR_PUBLISH_TOKEN", "publish-token-jobs-1")]);
    let http = reqwest::Client::new();
    let post = |path: &str, token: &str, body: Value| http.post(format!("{url}{path}")).bearer_auth(token).json(&body).send();
    let admin = "admin-token-jobs-1";

    // One job with every option; it runs.
    let r = post(
        "/api/jobs",
        admin,
        json!({ "kind": "conveyor.noop", "payload": { "n": 1 }, "queue": "default", "priority": 5, "max_attempts": 2,
                "backoff": [1, 5], "timeout_s": 10, "tags": ["http", "one"] }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_string();
    crate::wait_for("the job to run", Duration::from_secs(20), || async {
        let j: Value = http.get(format!("{url}/api/jobs/{id}")).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
        j["data"]["state"] == "completed"
    })
    .await;
    let j: Value = http.get(format!("{url}/api/jobs/{id}")).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
    assert_eq!((j["data"]["max_attempts"].as_u64(), j["data"]["tags"].clone()), (Some(2), json!(["http", "one"])), "{j}");

    // A unique key is held while its job waits (on a queue no worker serves here).
    let unique = json!({ "kind": "conveyor.noop", "queue": "parked", "unique_key": "http-one", "unique_ttl_s": 60 });
    let r = post("/api/jobs", admin, unique.clone()).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let holder = r.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_string();
    let again = post("/api/jobs", admin, unique).await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let again: Value = again.json().await.unwrap();
    assert_eq!((again["data"]["id"].as_str(), again["data"]["duplicate"].as_bool()), (Some(holder.as_str()), Some(true)));

    // A delayed job waits.
    let r = post("/api/jobs", admin, json!({ "kind": "conveyor.noop", "queue": "later", "delay_s": 3600 })).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(env.queue("later").await.delayed, 1);

    // Built-in kinds are the admin's: the publish token may not create them.
    let r = post("/api/jobs", "publish-token-jobs-1", json!({ "kind": "conveyor.noop" })).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);

    // A bulk of 1,000 in one request, and the limit.
    let jobs: Vec<Value> = (0..1000).map(|i| json!({ "kind": "conveyor.noop", "queue": "bulk", "payload": { "i": i } })).collect();
    let r = post("/api/jobs/bulk", admin, json!({ "jobs": jobs })).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let out: Value = r.json().await.unwrap();
    assert_eq!(out["data"].as_array().unwrap().len(), 1000);
    assert!(out["data"].as_array().unwrap().iter().all(|o| o["duplicate"] == false));
    assert_eq!(env.queue("bulk").await.pending, 1000, "no worker serves `bulk`: all 1,000 wait there");
    let too_many: Vec<Value> = (0..1001).map(|_| json!({ "kind": "conveyor.noop" })).collect();
    let r = post("/api/jobs/bulk", admin, json!({ "jobs": too_many })).await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    // One bad job refuses the whole bulk, naming it.
    let r = post(
        "/api/jobs/bulk",
        admin,
        json!({ "jobs": [{ "kind": "conveyor.noop", "queue": "none" }, { "kind": "conveyor.noop", "priority": "high" }] }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let e: Value = r.json().await.unwrap();
    assert!(e["error"]["details"]["fields"]["jobs[1].priority"].is_string(), "{e}");
    assert_eq!(env.queue("none").await.pending, 0, "nothing of a refused bulk was enqueued");

    // A batch whose `then` runs once its jobs are done.
    let r = post(
        "/api/batches",
        admin,
        json!({ "name": "http batch", "jobs": [{ "kind": "conveyor.noop" }, { "kind": "conveyor.noop" }],
                "then": { "kind": "conveyor.noop", "queue": "callbacks", "tags": ["then"] } }),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let bid = r.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_string();
    crate::wait_for("the batch's callback", Duration::from_secs(20), || async {
        let jobs: Value =
            http.get(format!("{url}/api/jobs?queue=callbacks&tag=then")).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
        jobs["meta"]["total"] == 1
    })
    .await;
    let b: Value = http.get(format!("{url}/api/batches/{bid}")).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
    assert_eq!(b["data"]["processed"], 2, "{b}");

    // Bad input: each names its field.
    for (body, field) in [
        (json!({}), "kind"),
        (json!({ "kind": "conveyor.noop", "queue": "" }), "queue"),
        (json!({ "kind": "conveyor.noop", "delay_s": -1 }), "delay_s"),
        (json!({ "kind": "conveyor.noop", "delay_s": 1, "run_at": 1 }), "run_at"),
        (json!({ "kind": "conveyor.noop", "run_at": "tomorrow" }), "run_at"),
        (json!({ "kind": "conveyor.noop", "max_attempts": 0 }), "max_attempts"),
        (json!({ "kind": "conveyor.noop", "backoff": "slow" }), "backoff"),
        (json!({ "kind": "conveyor.noop", "timeout_s": 0 }), "timeout_s"),
        (json!({ "kind": "conveyor.noop", "unique_ttl_s": 5 }), "unique_ttl_s"),
        (json!({ "kind": "conveyor.noop", "tags": "x" }), "tags"),
        (json!({ "kind": "conveyor.noop", "colour": "red" }), "colour"),
    ] {
        let r = post("/api/jobs", admin, body.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["details"]["fields"][field].is_string(), "{body}: {e}");
    }
    // A kind this server does not run is a remote kind: accepted, it waits for a worker in
    // another language (Faktory), in its queue's remote lane, which local workers never take.
    let r = post("/api/jobs", admin, json!({ "kind": "no.such.kind", "queue": "elsewhere" })).await.unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let id = r.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_string();
    let j: Value = http.get(format!("{url}/api/jobs/{id}")).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
    assert_eq!((j["data"]["queue"].as_str(), j["data"]["remote"].as_bool()), (Some("elsewhere"), Some(true)), "{j}");
    assert_eq!(env.queue("elsewhere@remote").await.pending, 1);
    let r = http
        .post(format!("{url}/api/jobs"))
        .bearer_auth(admin)
        .header("content-type", "application/json")
        .body("[1,2]")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}
