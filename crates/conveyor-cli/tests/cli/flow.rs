//! Per-key concurrency over HTTP through `conveyor serve`: jobs of one key run one at a time,
//! the waiting ones say why, the busiest keys are listed, and bad input names its field.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{json, Value};

use crate::http::serve;
use crate::{sigterm, wait_exit, TestEnv};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_one_concurrency_key_run_one_at_a_time_and_say_why_they_wait() {
    let env = TestEnv::new("");
    let admin = "admin-token-flow-1";
    let (mut child, url) = serve(&env, &[("CONVEYOR_API_TOKEN", admin)]);
    let http = reqwest::Client::new();
    let post = |body: Value| http.post(format!("{url}/api/jobs")).bearer_auth(admin).json(&body).send();
    let get = |path: String| {
        let http = http.clone();
        async move { http.get(path).bearer_auth(admin).send().await.unwrap().json::<Value>().await.unwrap() }
    };

    let mut ids = Vec::new();
    for n in 0..3 {
        let r = post(
            json!({ "kind": "conveyor.sleep", "payload": { "ms": 1200, "n": n }, "concurrency_key": "shop-1", "concurrency_limit": 1 }),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        ids.push(r.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_string());
    }
    // While one runs, the other two wait for its slot, and say so.
    crate::wait_for("two jobs waiting for the key's slot", Duration::from_secs(20), || async {
        let mut parked = 0;
        for id in &ids {
            let j = get(format!("{url}/api/jobs/{id}")).await;
            if j["data"]["waiting"]["reason"] == "key_limit" {
                assert!(j["data"]["waiting"]["detail"].as_str().unwrap().contains("shop-1"), "{j}");
                parked += 1;
            }
        }
        parked == 2
    })
    .await;
    let keys = get(format!("{url}/api/concurrency")).await;
    let shop = keys["data"].as_array().unwrap().iter().find(|k| k["key"] == "shop-1").cloned().expect("the key is listed");
    assert_eq!((shop["running"].as_i64(), shop["limit"].as_i64(), shop["waiting"].as_i64()), (Some(1), Some(1), Some(2)), "{keys}");

    crate::wait_for("all three ran", Duration::from_secs(30), || all_completed(&http, &url, admin, &ids)).await;
    // One at a time: each run was reserved (for the last time) only after the one before had
    // slept its 1.2 s. (`finished_at` is when the outcome was recorded, after the slot was
    // given back, so it may pass the next run's start by a little.)
    let mut starts = Vec::new();
    for id in &ids {
        let j = get(format!("{url}/api/jobs/{id}")).await;
        assert_eq!(j["data"]["attempts"], 1, "waiting spent no attempt: {j}");
        starts.push(j["data"]["reserved_at"].as_i64().unwrap());
    }
    starts.sort();
    for w in starts.windows(2) {
        assert!(w[1] - w[0] >= 1200, "runs overlapped (reserved at {starts:?})");
    }

    // Bad input names its field.
    for (body, field) in [
        (json!({ "kind": "conveyor.noop", "concurrency_limit": 2 }), "concurrency_limit"),
        (json!({ "kind": "conveyor.noop", "concurrency_key": "k", "concurrency_limit": 0 }), "concurrency_limit"),
        (json!({ "kind": "conveyor.noop", "concurrency_key": "" }), "concurrency_key"),
        (json!({ "kind": "conveyor.noop", "concurrency_key": 5 }), "concurrency_key"),
        (json!({ "kind": "conveyor.noop", "fairness_key": "" }), "fairness_key"),
        (json!({ "kind": "conveyor.noop", "fairness_key": 7 }), "fairness_key"),
        (json!({ "kind": "conveyor.noop", "debounce_s": 2 }), "debounce_s"),
        (json!({ "kind": "conveyor.noop", "debounce_key": "k" }), "debounce_s"),
        (json!({ "kind": "conveyor.noop", "debounce_key": "k", "debounce_s": 0 }), "debounce_s"),
        (json!({ "kind": "conveyor.noop", "debounce_key": "", "debounce_s": 1 }), "debounce_key"),
    ] {
        let r = post(body.clone()).await.unwrap();
        assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let e: Value = r.json().await.unwrap();
        assert!(e["error"]["details"]["fields"][field].is_string(), "{body}: {e}");
    }
    // A fairness key is kept with the job (as its tag), for a local kind and a remote one.
    for kind in ["conveyor.noop", "no.such.kind"] {
        let r = post(json!({ "kind": kind, "fairness_key": "tenant-9", "delay_s": 3600 })).await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "{kind}");
        let id = r.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_string();
        let j = get(format!("{url}/api/jobs/{id}")).await;
        assert!(j["data"]["tags"].as_array().unwrap().contains(&json!("fairness:tenant-9")), "{j}");
    }
    // A debounced job waits for its window, and only the last of a burst runs.
    let mut burst = Vec::new();
    for n in 0..3 {
        let r =
            post(json!({ "kind": "conveyor.noop", "payload": { "n": n }, "debounce_key": "product-3", "debounce_s": 1 })).await.unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        burst.push(r.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_string());
    }
    let last = get(format!("{url}/api/jobs/{}", burst[2])).await;
    assert!(last["data"]["tags"].as_array().unwrap().contains(&json!("debounce:1000:product-3")), "{last}");
    crate::wait_for("the burst to complete", Duration::from_secs(30), || all_completed(&http, &url, admin, &burst)).await;
    let r = http.get(format!("{url}/api/concurrency?limit=0")).bearer_auth(admin).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

/// Whether every job of `ids` has completed, as `GET /api/jobs/{id}` says.
async fn all_completed(http: &reqwest::Client, url: &str, token: &str, ids: &[String]) -> bool {
    for id in ids {
        let j: Value = http.get(format!("{url}/api/jobs/{id}")).bearer_auth(token).send().await.unwrap().json().await.unwrap();
        if j["data"]["state"] != "completed" {
            return false;
        }
    }
    true
}

/// A worker SIGKILLed while two jobs of a key (limit 2) hold its slots and four wait in line:
/// the killed jobs run again within seconds in another worker, taking back their own slots (the
/// 120 s lease does not have to pass), the waiting ones follow, every job completes once, and no
/// more than 2 ever ran at once.
async fn a_worker_killed_holding_a_keys_slots_loses_nothing(env: TestEnv) {
    use conveyor_core::backend::{JobFilter, Page};
    use conveyor_core::job::{JobState, NewJob};
    const MS: i64 = 1500;
    let key = format!("shop-{}", conveyor_core::job::JobId::new());
    let c = conveyor_core::flow::Concurrency::new(&key, 2).unwrap();
    let jobs: Vec<NewJob> = (0..6).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": MS, "n": i })).concurrency(c.clone())).collect();
    let ids: Vec<_> = env.backend.enqueue(jobs).await.unwrap().iter().map(|o| o.id()).collect();
    let mut first = env.spawn(&["work"]);
    let busy = || async {
        conveyor_core::flow::keys(env.backend.as_ref(), 100)
            .await
            .unwrap()
            .into_iter()
            .find(|k| k.key == key)
            .map(|k| (k.running, k.waiting))
    };
    crate::wait_for("two jobs running with the key's slots, four in line", Duration::from_secs(30), || async {
        busy().await == Some((2, 4))
    })
    .await;
    first.kill().expect("SIGKILL the worker");
    first.wait().unwrap();
    let mut second = env.spawn(&["work"]);
    crate::wait_for("every job to finish, well within the 120 s lease", Duration::from_secs(40), || async {
        let q = env.queue("default").await;
        q.pending + q.reserved + q.delayed == 0
    })
    .await;
    sigterm(&second);
    assert!(wait_exit(&mut second, Duration::from_secs(30)).await.success());
    let done = env.backend.jobs(JobFilter { state: Some(JobState::Completed), ..Default::default() }, Page::new(1, 100)).await.unwrap();
    let mut starts = Vec::new();
    for id in &ids {
        let runs: Vec<_> = done.items.iter().filter(|j| j.id == *id).collect();
        assert_eq!(runs.len(), 1, "job {id} completed exactly once");
        starts.push(runs[0].reserved_at.unwrap());
    }
    assert_eq!(done.items.iter().filter(|j| j.attempts == 2).count(), 2, "the two killed jobs ran again (attempt 2)");
    // A job runs MS after its (last) reservation; at no start were more than 2 running.
    for s in &starts {
        let running = starts.iter().filter(|o| *o <= s && *s < *o + MS).count();
        assert!(running <= 2, "3 jobs of the key ran at once (starts {starts:?})");
    }
    assert_eq!(busy().await, None, "the key is idle and forgotten");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_a_keys_slots_loses_nothing_on_sqlite() {
    a_worker_killed_holding_a_keys_slots_loses_nothing(TestEnv::new(crate::process::LONG_LEASE)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_a_keys_slots_loses_nothing_on_postgres() {
    let Some(env) = TestEnv::postgres(crate::process::LONG_LEASE, None) else { return };
    a_worker_killed_holding_a_keys_slots_loses_nothing(env).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_holding_a_keys_slots_loses_nothing_with_the_queue_on_redis() {
    let Some(redis) = conveyor_backends::redis::testing::TestRedis::create() else { return };
    let (url, prefix) = (redis.url.clone(), redis.prefix.clone());
    a_worker_killed_holding_a_keys_slots_loses_nothing(TestEnv::redis(crate::process::LONG_LEASE, &url, &prefix, Some(redis))).await;
}

/// A job its kind's rate limit released says so: `waiting.reason` is `rate_limit`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_released_by_its_kinds_rate_limit_says_so() {
    // Nothing listens on the discard port: the one call the limit allows fails and retries.
    let env = TestEnv::new("[[kinds]]\nname = \"limited_call\"\nurl = \"http://127.0.0.1:9/\"\nrate_limit = \"1/3600\"\n");
    let admin = "admin-token-flow-2";
    let (mut child, url) = serve(&env, &[("CONVEYOR_API_TOKEN", admin)]);
    let http = reqwest::Client::new();
    let mut ids = Vec::new();
    for n in 0..2 {
        let r = http
            .post(format!("{url}/api/jobs"))
            .bearer_auth(admin)
            .json(&json!({ "kind": "limited_call", "payload": { "n": n } }))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
        ids.push(r.json::<Value>().await.unwrap()["data"]["id"].as_str().unwrap().to_string());
    }
    crate::wait_for("one job released by the rate limit, the other retrying", Duration::from_secs(30), || async {
        let mut reasons = Vec::new();
        for id in &ids {
            let j: Value = http.get(format!("{url}/api/jobs/{id}")).bearer_auth(admin).send().await.unwrap().json().await.unwrap();
            reasons.push(j["data"]["waiting"]["reason"].as_str().unwrap_or_default().to_string());
            if j["data"]["waiting"]["reason"] == "rate_limit" {
                assert!(j["data"]["waiting"]["detail"].as_str().unwrap().contains("1 per 3600 s"), "{j}");
            }
        }
        reasons.sort();
        reasons == ["rate_limit", "scheduled"]
    })
    .await;
    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}
