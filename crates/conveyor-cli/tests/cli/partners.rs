//! `conveyor dev partners`: the simulated source and target over real HTTP.

use std::io::{BufRead, BufReader};
use std::time::Duration;

use serde_json::{json, Value};

use crate::{sigterm, wait_exit, TestEnv};

pub(crate) fn partners(env: &TestEnv, args: &[&str]) -> (crate::Proc, String) {
    let mut all = vec!["dev", "partners", "--port", "0"];
    all.extend_from_slice(args);
    let mut child = env.conveyor(&all).stdout(std::process::Stdio::piped()).stderr(std::process::Stdio::null()).spawn().unwrap();
    let out = child.stdout.take().unwrap();
    let line = BufReader::new(out).lines().next().expect("the address line").unwrap();
    let url = line.strip_prefix("listening on ").expect("listening on URL").trim().to_string();
    (crate::Proc(child), url)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_simulated_partners_page_update_idempotently_and_misbehave_on_request() {
    let env = TestEnv::new("");
    let (mut sim, url) = partners(&env, &["--products", "50", "--variants", "2", "--rate-limit", "5"]);
    let http = reqwest::Client::new();
    let src = |q: &str| http.get(format!("{url}/source/products?{q}")).bearer_auth("src").send();

    assert_eq!(http.get(format!("{url}/source/products")).send().await.unwrap().status(), 401, "the source wants its token");
    let mut seen = Vec::new();
    for page in 1..=3 {
        let body: Value = src(&format!("page={page}&per_page=20")).await.unwrap().json().await.unwrap();
        assert_eq!(body["meta"]["total"], 50);
        assert_eq!(body["meta"]["has_more"], page < 3);
        for p in body["data"].as_array().unwrap() {
            assert_eq!(p["variants"].as_array().unwrap().len(), 2);
            seen.push((p["updated_at"].as_str().unwrap().to_string(), p["id"].as_str().unwrap().to_string()));
        }
    }
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!((seen.len(), seen.clone()), (50, sorted), "every product once, ordered by (updated_at, id)");

    // A touched product alone is newer than the last cursor.
    let cursor = seen.last().unwrap().0.clone();
    let touched: Value = http
        .post(format!("{url}/source/products/P000007/touch"))
        .json(&json!({ "price": 12.5 }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let newer: Value = src(&format!("updated_since={}", touched["updated_at"].as_str().unwrap())).await.unwrap().json().await.unwrap();
    assert_eq!(newer["data"].as_array().unwrap().len(), 1);
    assert_eq!(newer["data"][0]["variants"][0]["price"], 12.5);
    let inclusive: Value = src(&format!("updated_since={cursor}")).await.unwrap().json().await.unwrap();
    assert!(inclusive["meta"]["total"].as_u64().unwrap() >= 2, "updated_since is inclusive");

    // The target: stale at first, a repeated idempotency key applied once.
    let sku = newer["data"][0]["variants"][0]["sku"].as_str().unwrap().to_string();
    let tgt = |path: String| http.get(format!("{url}/target/variants/{path}")).header("x-api-key", "tgt").send();
    assert_eq!(http.get(format!("{url}/target/variants/{sku}")).send().await.unwrap().status(), 401);
    let before: Value = tgt(sku.clone()).await.unwrap().json().await.unwrap();
    assert_ne!(before["price"], 12.5, "the target starts stale");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    for _ in 0..2 {
        let r = http
            .put(format!("{url}/target/variants/{sku}/price"))
            .header("x-api-key", "tgt")
            .header("idempotency-key", "change-1")
            .json(&json!({ "price": 12.5 }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let stats: Value = http.get(format!("{url}/stats")).send().await.unwrap().json().await.unwrap();
    assert_eq!(stats["variants"][&sku], json!({ "price": 12.5, "stock": before["stock"], "updates": 1 }), "applied once");

    // Above 5 requests per second the target answers 429 with Retry-After.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = tgt(sku.clone()).await.unwrap();
        if r.status() == 429 {
            assert_eq!(r.headers()["retry-after"], "1");
        }
        statuses.push(r.status().as_u16());
    }
    assert!(statuses.contains(&429) && statuses.contains(&200), "{statuses:?}");
    let stats: Value = http.get(format!("{url}/stats")).send().await.unwrap().json().await.unwrap();
    assert!(stats["peak_rps"].as_u64().unwrap() >= 6, "{stats}");
    assert!(stats["requests"]["429"].as_u64().unwrap() >= 1);
    sigterm(&sim);
    assert!(wait_exit(&mut sim, Duration::from_secs(10)).await.success());

    // An outage window and a failure rate.
    let (_down, url) = partners(&env, &["--products", "3", "--outage", "0:60", "--error-rate", "0"]);
    let r = http.get(format!("{url}/target/variants/SKU-000000-0")).header("x-api-key", "tgt").send().await.unwrap();
    assert_eq!(r.status(), 503);
    let (_broken, url) = partners(&env, &["--products", "3", "--error-rate", "1"]);
    let r = http.get(format!("{url}/source/products")).bearer_auth("src").send().await.unwrap();
    assert_eq!(r.status(), 500);
    let bad = env.conveyor(&["dev", "partners", "--outage", "soon"]).output().unwrap();
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--outage"), "{}", String::from_utf8_lossy(&bad.stderr));
}
