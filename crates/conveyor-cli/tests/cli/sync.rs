//! Product sync end to end: `conveyor sync …` against `conveyor dev partners` over real HTTP,
//! with faults, a killed run, replayed failures, and the HTTP API.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::partners::partners;
use crate::{wait_exit, wait_for, TestEnv};

/// `conveyor ARGS` with the sync pointed at the simulator at `url`.
fn synced(env: &TestEnv, url: &str, args: &[&str]) -> Command {
    let mut c = env.conveyor(args);
    c.env("CONVEYOR_SYNC_SOURCE_URL", format!("{url}/source"))
        .env("CONVEYOR_SYNC_SOURCE_TOKEN", "src")
        .env("CONVEYOR_SYNC_TARGET_URL", format!("{url}/target"))
        .env("CONVEYOR_SYNC_TARGET_KEY", "tgt");
    c
}

fn run_json(mut c: Command) -> Value {
    let out = c.stderr(Stdio::inherit()).output().expect("running conveyor");
    assert!(out.status.success(), "conveyor failed: {}", String::from_utf8_lossy(&out.stdout));
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)))
}

async fn get(url: &str) -> Value {
    reqwest::get(url).await.unwrap().json().await.unwrap()
}

/// The source's whole catalogue: SKU → (price, stock).
async fn catalogue(url: &str) -> BTreeMap<String, (f64, i64)> {
    let http = reqwest::Client::new();
    let mut out = BTreeMap::new();
    for page in 1.. {
        let body: Value = http
            .get(format!("{url}/source/products?page={page}&per_page=1000"))
            .bearer_auth("src")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        for p in body["data"].as_array().unwrap() {
            for v in p["variants"].as_array().unwrap() {
                out.insert(v["sku"].as_str().unwrap().to_string(), (v["price"].as_f64().unwrap(), v["stock"].as_i64().unwrap()));
            }
        }
        if body["meta"]["has_more"] != true {
            break;
        }
    }
    out
}

/// Every variant of the source is in the target with its price and stock, and every change was
/// applied exactly `updates` times.
async fn assert_in_step(url: &str, updates: u64) -> Value {
    let source = catalogue(url).await;
    let stats = get(&format!("{url}/stats")).await;
    let target = stats["variants"].as_object().unwrap();
    assert_eq!(target.len(), source.len());
    for (sku, (price, stock)) in &source {
        let t = &target[sku];
        assert_eq!((t["price"].as_f64().unwrap(), t["stock"].as_i64().unwrap()), (*price, *stock), "{sku} in the target");
        assert_eq!(t["updates"], updates, "{sku}: price and stock applied once each, never twice");
    }
    stats
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sync_through_faults_ends_in_step_with_every_change_applied_once() {
    let env = TestEnv::new("");
    // 5% errors on source and target, 429s above 60 requests a second, a 20-second outage of
    // the target starting 2 s in, and latency.
    let (_sim, url) = partners(
        &env,
        &["--products", "100", "--variants", "3", "--error-rate", "0.05", "--rate-limit", "60", "--outage", "2:20", "--latency-ms", "2"],
    );
    let mut c = synced(&env, &url, &["sync", "products", "--json"]);
    c.env("CONVEYOR_SYNC_TARGET_RPS", "100").env("CONVEYOR_SYNC_BREAKER_OPEN_FOR", "5s");
    let out = run_json(c);
    let run = &out["run"];
    assert_eq!(run["status"], "completed", "{out}");
    assert_eq!(run["counts"], json!({ "seen": 100, "changed": 100, "pushed": 100, "unchanged": 0, "failed": 0 }), "{out}");
    assert!(out["seconds"].as_f64().unwrap() >= 20.0, "the run waited out the outage: {out}");

    let stats = assert_in_step(&url, 2).await;
    assert!(stats["peak_rps"].as_u64().unwrap() <= 100, "the target never saw more than the configured 100 requests a second: {stats}");
    assert!(stats["requests"]["503"].as_u64().unwrap_or(0) > 0 && stats["requests"]["500"].as_u64().unwrap_or(0) > 0, "{stats}");

    // The breaker opened during the outage (and closed after it); jobs waited rather than
    // failing: nothing failed for good, nothing is left in the failed store.
    let backend = env.backend.clone();
    let events = backend.query("SELECT name, payload FROM events WHERE name LIKE 'breaker.%' ORDER BY created_at", vec![]).await.unwrap();
    let names: Vec<&str> = events.iter().map(|r| r[0].as_str().unwrap()).collect();
    assert!(names.contains(&"breaker.open") && names.last() == Some(&"breaker.closed"), "{names:?}");
    assert!(events.iter().all(|r| r[1].as_str().unwrap().contains("sync:target")));
    assert_eq!(env.queue("sync").await.failed, 0);
    let failures = backend.query("SELECT count(*) FROM sync_failures WHERE resolved_at IS NULL", vec![]).await.unwrap();
    assert_eq!(failures[0][0].as_i64(), Some(0));

    // Every request was audited: as many target rows as the simulator counted requests, and
    // no credentials in the log.
    let served: u64 = stats["requests"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    let audited = backend.query("SELECT count(*) FROM sync_requests WHERE partner = 'target'", vec![]).await.unwrap();
    assert_eq!(audited[0][0].as_i64(), Some(served as i64), "one audit row per target request");
    let leaked = backend.query("SELECT count(*) FROM sync_requests WHERE url LIKE '%tgt%' OR url LIKE '%src%'", vec![]).await.unwrap();
    assert_eq!(leaked[0][0].as_i64(), Some(0));

    // Health reports the run, the breaker and the partners' durations.
    let health = run_json(synced(&env, &url, &["sync", "health", "--json"]));
    assert_eq!(health["last_run"]["id"], run["id"]);
    assert_eq!(health["breakers"][0]["name"], "sync:target");
    assert!(health["partners"]["target"]["requests_24h"].as_u64().unwrap() >= 600, "{health}");
    assert!(health["partners"]["target"]["p99_ms"].as_i64().unwrap() >= health["partners"]["target"]["p50_ms"].as_i64().unwrap());
    assert!(health["p95_ms"]["source"].is_i64(), "{health}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_run_resumes_from_its_cursor_and_an_unchanged_source_pushes_nothing() {
    let env = TestEnv::new("");
    let (_sim, url) = partners(&env, &["--products", "1500", "--variants", "3", "--latency-ms", "1"]);
    let mut first = synced(&env, &url, &["sync", "products"]);
    first.env("CONVEYOR_SYNC_TARGET_RPS", "2000").env("CONVEYOR_SYNC_PAGE_SIZE", "50");
    let mut first = crate::Proc(first.stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap());
    let backend = env.backend.clone();
    let items = || async {
        let rows = backend.query("SELECT count(*) FROM sync_items WHERE outcome = 'pushed'", vec![]).await.unwrap_or_default();
        rows.first().and_then(|r| r[0].as_i64()).unwrap_or(0)
    };
    wait_for("a third of the products pushed", Duration::from_secs(60), || async { items().await >= 500 }).await;
    // SAFETY: kill(2) on a child we spawned and have not reaped.
    assert_eq!(unsafe { libc::kill(first.id() as libc::pid_t, libc::SIGKILL) }, 0);
    wait_exit(&mut first, Duration::from_secs(10)).await;
    let pushed_at_kill = items().await;
    assert!(pushed_at_kill < 1500, "killed halfway, not at the end: {pushed_at_kill}");

    // The next invocation follows the same run: it resumes from the page it had reached (the
    // killed worker's jobs come back when their leases expire).
    let mut again = synced(&env, &url, &["sync", "products", "--json"]);
    again.env("CONVEYOR_SYNC_TARGET_RPS", "2000").env("CONVEYOR_SYNC_PAGE_SIZE", "50");
    let out = run_json(again);
    assert_eq!(out["run"]["status"], "completed", "{out}");
    assert_eq!(out["run"]["counts"]["pushed"], 1500, "{out}");
    let pages = out["run"]["pages"].as_u64().unwrap();
    assert!((30..=40).contains(&pages), "each page read about once (1500 / 50, a page may be read again after the kill): {pages}");
    assert_in_step(&url, 2).await;

    // Nothing changed at the source: a second run pushes nothing.
    let before = get(&format!("{url}/stats")).await["requests"].clone();
    let out = run_json(synced(&env, &url, &["sync", "products", "--json"]));
    assert_eq!(out["run"]["status"], "completed");
    assert_eq!((out["run"]["counts"]["pushed"].as_u64(), out["run"]["counts"]["changed"].as_u64()), (Some(0), Some(0)), "{out}");
    assert_eq!(get(&format!("{url}/stats")).await["requests"], before, "the target got no request");

    // Two products change: an incremental run reads only them and pushes their variants.
    let http = reqwest::Client::new();
    for id in ["P000003", "P001200"] {
        assert!(http.post(format!("{url}/source/products/{id}/touch")).json(&json!({})).send().await.unwrap().status().is_success());
    }
    let out = run_json(synced(&env, &url, &["sync", "products", "--json"]));
    assert_eq!(out["run"]["counts"], json!({ "seen": 2, "changed": 2, "pushed": 2, "unchanged": 0, "failed": 0 }), "{out}");
    let stats = get(&format!("{url}/stats")).await;
    assert_eq!(stats["variants"]["SKU-000003-1"]["updates"], 4, "price and stock again, once each");
    assert_eq!(stats["variants"]["SKU-000004-1"]["updates"], 2, "an untouched product is left alone");
    let source = catalogue(&url).await;
    assert_eq!(stats["variants"]["SKU-001200-2"]["price"].as_f64(), Some(source["SKU-001200-2"].0));

    // A full run reads everything again and still pushes nothing new.
    let out = run_json(synced(&env, &url, &["sync", "products", "--full", "--json"]));
    assert_eq!((out["run"]["scope"].as_str(), out["run"]["counts"]["seen"].as_u64()), (Some("full"), Some(1500)));
    assert_eq!(out["run"]["counts"]["pushed"], 0, "{out}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_kept_with_their_payload_and_replayed_over_http() {
    let env = TestEnv::new("");
    let (_sim, url) = partners(&env, &["--products", "20", "--variants", "2"]);
    // A wrong target key: every push is refused (401), a failure that retrying cannot fix.
    let mut wrong = synced(&env, &url, &["sync", "products", "--json"]);
    wrong.env("CONVEYOR_SYNC_TARGET_KEY", "wrong");
    let out = run_json(wrong);
    assert_eq!(out["run"]["status"], "completed_with_failures", "{out}");
    assert_eq!(out["run"]["counts"]["failed"], 20, "{out}");
    let failures = env.backend.query("SELECT stage, error, payload FROM sync_failures WHERE resolved_at IS NULL", vec![]).await.unwrap();
    assert_eq!(failures.len(), 20);
    assert!(failures[0][1].as_str().unwrap().contains("HTTP 401"), "{:?}", failures[0]);
    assert!(failures[0][2].as_str().unwrap().contains("\"variants\""), "the payload is kept for the replay");
    let events = env.backend.query("SELECT count(*) FROM events WHERE name = 'sync.push_failed'", vec![]).await.unwrap();
    assert_eq!(events[0][0].as_i64(), Some(20));

    // With the key fixed, the server replays them.
    let (source, target) = (format!("{url}/source"), format!("{url}/target"));
    let (_server, api) = crate::http::serve(
        &env,
        &[
            ("CONVEYOR_SYNC_SOURCE_URL", &source),
            ("CONVEYOR_SYNC_SOURCE_TOKEN", "src"),
            ("CONVEYOR_SYNC_TARGET_URL", &target),
            ("CONVEYOR_SYNC_TARGET_KEY", "tgt"),
            ("CONVEYOR_SYNC_INTERVAL", "0"),
        ],
    );
    let http = reqwest::Client::new();
    let r = http.post(format!("{api}/api/sync/retry-failures")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"]["replayed"], 20, "{body}");
    wait_for("the replay", Duration::from_secs(30), || async {
        let h = get(&format!("{api}/api/sync/health")).await;
        h["data"]["unresolved_failures"] == 0
    })
    .await;
    assert_in_step(&url, 2).await;

    // Runs over HTTP: start, follow, list; a run started while one runs joins it.
    let r = http.post(format!("{api}/api/sync/products")).json(&json!({ "full": true })).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let started: Value = r.json().await.unwrap();
    let id = started["data"]["run_id"].as_str().unwrap().to_string();
    assert!(started["data"]["batch_id"].is_string());
    let again: Value = get(&format!("{api}/trigger-sync")).await;
    assert!(again["data"]["run_id"] == id || again["data"]["joined"] == false, "{again}");
    wait_for("the run to finish", Duration::from_secs(30), || async {
        get(&format!("{api}/api/sync/runs/{id}")).await["data"]["status"] == "completed"
    })
    .await;
    let run = get(&format!("{api}/api/sync/runs/{id}")).await;
    assert_eq!(run["data"]["counts"], json!({ "seen": 20, "changed": 0, "pushed": 0, "unchanged": 20, "failed": 0 }), "{run}");
    assert_eq!(run["data"]["scope"], "full");
    let list = get(&format!("{api}/api/sync/runs")).await;
    assert!(list["meta"]["total"].as_u64().unwrap() >= 2, "{list}");
    let health = get(&format!("{api}/health")).await;
    assert!(health["data"]["sync"]["last_run"]["id"].is_string(), "{health}");
    assert!(health["data"]["sync"]["p95_ms"]["target"].is_i64(), "{health}");
    let bad = http.post(format!("{api}/api/sync/products")).json(&json!({ "full": "yes" })).send().await.unwrap();
    assert_eq!(bad.status(), 422);
    let missing = get(&format!("{api}/api/sync/runs/nope")).await;
    assert_eq!(missing["error"]["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_without_partners_says_which_setting_is_missing() {
    let env = TestEnv::new("");
    let out = env.conveyor(&["sync", "products"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("CONVEYOR_SYNC_SOURCE_URL"), "{}", String::from_utf8_lossy(&out.stderr));
    let out = env.conveyor(&["sync", "products"]).env("CONVEYOR_SYNC_SOURCE_URL", "ftp://x").output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CONVEYOR_SYNC_SOURCE_URL: expected an http"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // `conveyor demo` wires the sync to the simulator through `.env`, which every command reads.
    let out = env.conveyor(&["demo"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("conveyor dev partners --port 8001"));
    let dotenv = std::fs::read_to_string(env.dir.path().join(".env")).unwrap();
    assert!(dotenv.contains("CONVEYOR_SYNC_SOURCE_URL=http://127.0.0.1:8001/source"), "{dotenv}");
    let health = run_json(env.conveyor(&["sync", "health", "--json"]));
    assert_eq!(health["configured"], true, "{health}");
}
