//! Flow control for jobs that remote workers fetch: a concurrency key takes its slot when
//! `FETCH` hands the job out, a job at its key's limit is parked (and says so) while `FETCH`
//! hands out another key's job, and `ACK` hands the slot to the parked job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use faktory::{Job, Worker};
use serde_json::{json, Value};
use tokio::sync::watch;

use super::support::*;
use crate::{wait_for, TestEnv};

fn keyed(n: i64, key: &str) -> Job {
    let mut job = Job::new("rs.keyed", vec![json!(n)]);
    job.custom.insert("concurrency_key".into(), json!(key));
    job.custom.insert("concurrency_limit".into(), json!(2));
    job
}

#[derive(Default)]
struct Seen {
    /// Per key: running now, most at once.
    shop1: (usize, usize),
    started: Vec<i64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn remote_jobs_take_their_keys_slots_when_fetched() {
    let env = TestEnv::new("");
    let server = Server::start(&env, &tokens()).await;
    let api = server.api();
    let mut producer = faktory::Client::connect_to(&server.url(PUBLISH)).await.expect("HELLO");
    // Three jobs of shop-1 (limit 2), then one of shop-2.
    for n in 1..=3 {
        producer.enqueue(keyed(n, "shop-1")).await.expect("PUSH");
    }
    producer.enqueue(keyed(10, "shop-2")).await.expect("PUSH");

    let seen: Arc<Mutex<Seen>> = Arc::default();
    let (open, gate) = watch::channel(false);
    let mut workers = Vec::new();
    for _ in 0..4 {
        let (seen, gate) = (seen.clone(), gate.clone());
        let mut worker = Worker::builder::<std::io::Error>()
            .register_fn("rs.keyed", move |job| {
                let (seen, mut gate) = (seen.clone(), gate.clone());
                async move {
                    let n = job.args()[0].as_i64().unwrap();
                    {
                        let mut s = seen.lock().unwrap();
                        s.started.push(n);
                        if n < 10 {
                            s.shop1.0 += 1;
                            s.shop1.1 = s.shop1.1.max(s.shop1.0);
                        }
                    }
                    gate.wait_for(|open| *open).await.map_err(std::io::Error::other)?;
                    if n < 10 {
                        seen.lock().unwrap().shop1.0 -= 1;
                    }
                    Ok(())
                }
            })
            .connect_to(&server.url(WORKER))
            .await
            .expect("HELLO with the worker token");
        workers.push(tokio::spawn(async move {
            // Each worker runs jobs until none is left for 2 s.
            let mut ran = 0;
            while worker.run_one(0, &["default"]).await.expect("FETCH, then ACK") {
                ran += 1;
            }
            ran
        }));
    }

    // Two of shop-1 and the one of shop-2 run; the third of shop-1 waits for a slot and says so.
    wait_for("three jobs running", Duration::from_secs(20), || async { seen.lock().unwrap().started.len() == 3 }).await;
    let parked = wait_for_parked(&api).await;
    assert!(parked["waiting"]["detail"].as_str().unwrap().contains("shop-1"), "{parked}");
    assert_eq!(parked["attempts"], 0, "parking spent no attempt: {parked}");
    {
        let s = seen.lock().unwrap();
        let mut started = s.started.clone();
        started.sort();
        assert!(started.contains(&10) && started.iter().filter(|n| **n < 10).count() == 2, "{started:?}");
    }
    let keys = api.data("/api/concurrency").await;
    let shop = keys.as_array().unwrap().iter().find(|k| k["key"] == "shop-1").cloned().expect("shop-1 is listed");
    assert_eq!((shop["running"].as_i64(), shop["waiting"].as_i64()), (Some(2), Some(1)), "{keys}");

    // The gate opens: the ACKs give the slots back, and the parked job gets one at once (not
    // at its 10 s recheck).
    open.send(true).unwrap();
    wait_for("the parked job to run", Duration::from_secs(8), || async { seen.lock().unwrap().started.len() == 4 }).await;
    let mut total = 0;
    for w in workers {
        total += w.await.unwrap();
    }
    assert_eq!(total, 4, "each job ran once");
    assert_eq!(seen.lock().unwrap().shop1.1, 2, "never more than shop-1's limit at once");
    wait_for("all four completed", Duration::from_secs(20), || async { api.jobs("rs.keyed", "completed").await.len() == 4 }).await;
}

async fn wait_for_parked(api: &Api) -> Value {
    let found: Arc<Mutex<Option<Value>>> = Arc::default();
    wait_for("the third shop-1 job to wait for its key", Duration::from_secs(20), || {
        let found = found.clone();
        async move {
            for j in api.jobs("rs.keyed", "delayed").await {
                let job = api.data(&format!("/api/jobs/{}", j["id"].as_str().unwrap())).await;
                if job["waiting"]["reason"] == "key_limit" {
                    *found.lock().unwrap() = Some(job);
                    return true;
                }
            }
            false
        }
    })
    .await;
    let job = found.lock().unwrap().take().unwrap();
    job
}
