//! HTTP kinds end to end: `conveyor serve` with `[[kinds]]` calls a real receiver that verifies
//! every call with the reference Standard Webhooks library (the `standardwebhooks` Python
//! package), answers per path as an application would (200, 429 + `Retry-After`, 500, 422), and
//! records what it got; a kind whose endpoint is down opens its breaker instead of spending its
//! jobs' attempts. Without python3 and pip the test is skipped outside CI and fails under CI.

use std::time::Duration;

use serde_json::{json, Value};

use crate::http::serve;
use crate::webhooks::{python_or_skip, Receiver};
use crate::{sigterm, wait_exit, wait_for, TestEnv};

/// Verifies each call with the secrets in `secrets.json` (label → secret, re-read per request),
/// answers by path, and appends `{path, id, body, results: {label: "OK" | "FAIL: why"}}`.
/// `/later` answers 429 with `Retry-After: 1` to a job's first call, `/flaky` 500; both 200
/// after. `/reject` answers 422 with a reason; `/slow` takes 2 s.
const RECEIVER: &str = r#"
import http.server, json, sys, threading, time
from standardwebhooks import Webhook

secrets_path, results_path = sys.argv[1], sys.argv[2]
seen = {}
lock = threading.Lock()

class Receiver(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            with open(secrets_path) as f:
                secrets = json.load(f)
        except FileNotFoundError:
            secrets = {}
        results = {}
        for label, secret in secrets.items():
            try:
                Webhook(secret).verify(body, dict(self.headers))
                results[label] = "OK"
            except Exception as e:
                results[label] = "FAIL: " + str(e)
        wid = self.headers.get("webhook-id")
        with lock:
            n = seen.get(wid, 0) + 1
            seen[wid] = n
            record = {"path": self.path, "id": wid, "call": n, "body": json.loads(body), "results": results,
                      "traceparent": self.headers.get("traceparent")}
            with open(results_path, "a") as f:
                f.write(json.dumps(record) + "\n")
        if self.path == "/slow":
            time.sleep(2)
        status, headers, text = 200, {}, b"ok"
        if self.path == "/later" and n == 1:
            status, headers = 429, {"Retry-After": "1"}
        elif self.path == "/flaky" and n == 1:
            status = 500
        elif self.path == "/reject":
            status, text = 422, b"unknown sku ABC-1"
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("content-length", str(len(text)))
        self.end_headers()
        self.wfile.write(text)

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// The calls made for job `id`, in order.
fn calls(receiver: &Receiver, id: &str) -> Vec<Value> {
    receiver.records().into_iter().filter(|r| r["id"] == id).collect()
}

async fn wait_calls(receiver: &Receiver, id: &str, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} call(s) of job {id} at the receiver"), Duration::from_secs(30), || async { calls(receiver, id).len() >= n })
        .await;
    calls(receiver, id)
}

const ADMIN: &str = "admin-token-for-http-kinds";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_kinds_call_a_standard_webhooks_receiver_and_map_its_answers() {
    let Some(python) = python_or_skip("standardwebhooks", "standardwebhooks") else { return };
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::with_script(&python, dir.path(), RECEIVER);
    // A port nothing listens on: the endpoint of a kind that is down.
    let down = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let configured = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    let r = &receiver.url;
    let env = TestEnv::new(&format!(
        "[[kinds]]\nname = \"receipt\"\nurl = \"{r}/ok\"\nlisten = [\"order.paid\"]\n\
         [[kinds]]\nname = \"later\"\nurl = \"{r}/later\"\nqueue = \"partner\"\n\
         [[kinds]]\nname = \"flaky\"\nurl = \"{r}/flaky\"\nqueue = \"partner\"\nsecret = \"{configured}\"\n\
         [[kinds]]\nname = \"reject\"\nurl = \"{r}/reject\"\nconcurrency = 2\n\
         [[kinds]]\nname = \"slow\"\nurl = \"{r}/slow\"\nconcurrency = 2\n\
         [[kinds]]\nname = \"down\"\nurl = \"http://127.0.0.1:{down}/\"\nbreaker_failures = 3\nbreaker_open_for = \"1h\"\n"
    ));
    let (mut child, url) = serve(&env, &[("CONVEYOR_API_TOKEN", ADMIN)]);
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{url}{path}")).bearer_auth(ADMIN).send();
    let post = |path: &str, body: Value| http.post(format!("{url}{path}")).bearer_auth(ADMIN).json(&body).send();
    let data = |r: reqwest::Response| async move {
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{status}: {v}");
        v["data"].clone()
    };
    let enqueue = |kind: &str, extra: Value| {
        let mut body = json!({ "kind": kind, "payload": { "sku": "ABC-1", "n": 7 } });
        body.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        async move { data(post("/api/jobs", body).await.unwrap()).await["id"].as_str().unwrap().to_string() }
    };

    // Listed with every other kind, with their queues and no secret.
    let listed = get("/api/kinds").await.unwrap().text().await.unwrap();
    assert!(!listed.contains("whsec_"), "no secret in the list: {listed}");
    let kinds: Value = serde_json::from_str(&listed).unwrap();
    let kind = |name: &str| kinds["data"].as_array().unwrap().iter().find(|k| k["name"] == name).cloned().unwrap_or(Value::Null);
    assert_eq!((kind("receipt")["type"].as_str(), kind("receipt")["queue"].as_str()), (Some("http"), Some("receipt")));
    assert_eq!(kind("later")["queue"], "partner");
    assert_eq!(kind("flaky")["http"]["secret_source"], "configuration");
    assert_eq!(kind("receipt")["http"]["listen"], json!(["order.paid"]));
    assert_eq!(kind("conveyor.noop")["type"], "local");

    // The store's secret of a kind without one configured: the admin's only.
    let hidden = http.get(format!("{url}/api/kinds/receipt/secret")).send().await.unwrap();
    assert_eq!(hidden.status(), 401);
    let shown = data(get("/api/kinds/receipt/secret").await.unwrap()).await;
    let first = shown["secrets"][0]["secret"].as_str().unwrap().to_string();
    assert!(first.starts_with("whsec_") && shown["source"] == "store", "{shown}");
    let refused = post("/api/kinds/flaky/secret/rotate", json!({})).await.unwrap();
    assert_eq!(refused.status(), 409, "a configured secret is rotated in the configuration");
    receiver.expect(json!({ "store": first, "configured": configured }));

    // 2xx completes; the call carries the job as the SPEC says, signed with the kind's secret.
    let id = enqueue("receipt", json!({ "tags": ["t1"] })).await;
    let calls = wait_calls(&receiver, &id, 1).await;
    let b = &calls[0]["body"];
    assert_eq!(
        (b["id"].as_str(), b["kind"].as_str(), b["attempt"].as_i64(), b["queue"].as_str()),
        (Some(id.as_str()), Some("receipt"), Some(1), Some("receipt"))
    );
    assert_eq!(b["payload"], json!({ "sku": "ABC-1", "n": 7 }));
    assert_eq!(b["tags"], json!(["t1"]));
    assert_eq!(calls[0]["results"]["store"], "OK", "{}", calls[0]);
    assert_ne!(calls[0]["results"]["configured"], "OK", "each kind has its own secret");
    wait_for("the receipt job to complete", Duration::from_secs(20), || async {
        data(get(&format!("/api/jobs/{id}")).await.unwrap()).await["state"] == "completed"
    })
    .await;

    assert_eq!(calls[0]["traceparent"], Value::Null, "a job in no trace passes none on");

    // A job enqueued in a trace (W3C traceparent on the request) passes it on to the endpoint
    // (no exporter here, so the context goes on as it came).
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = http.post(format!("{url}/api/jobs")).bearer_auth(ADMIN).header("traceparent", tp).json(&json!({ "kind": "receipt" })).send();
    let traced = data(r.await.unwrap()).await["id"].as_str().unwrap().to_string();
    let calls = wait_calls(&receiver, &traced, 1).await;
    assert_eq!(calls[0]["traceparent"], tp, "{}", calls[0]);
    let job = data(get(&format!("/api/jobs/{traced}")).await.unwrap()).await;
    assert!(job["tags"].as_array().unwrap().iter().any(|t| t == &json!(format!("traceparent:{tp}"))), "{job}");

    // 429 + Retry-After: released without spending an attempt, then done.
    let id = enqueue("later", json!({})).await;
    let calls = wait_calls(&receiver, &id, 2).await;
    assert_eq!(calls.iter().map(|c| c["body"]["attempt"].as_i64().unwrap()).collect::<Vec<_>>(), vec![1, 1]);
    assert_eq!(calls[0]["body"]["queue"], "partner");
    // 500: retried with the job's backoff, as attempt 2; signed with the configured secret.
    let id = enqueue("flaky", json!({ "backoff": 0 })).await;
    let calls = wait_calls(&receiver, &id, 2).await;
    assert_eq!(calls.iter().map(|c| c["body"]["attempt"].as_i64().unwrap()).collect::<Vec<_>>(), vec![1, 2]);
    assert_eq!(calls[1]["results"]["configured"], "OK", "{}", calls[1]);
    assert_eq!(calls[0]["id"], calls[1]["id"], "webhook-id is the job id on every attempt");
    // Another 4xx: failed at once with the answer's reason, attempts left or not.
    let id = enqueue("reject", json!({ "max_attempts": 5 })).await;
    wait_calls(&receiver, &id, 1).await;
    wait_for("the rejected job in the failed store", Duration::from_secs(20), || async {
        get(&format!("/api/jobs/failed/{id}")).await.unwrap().status().is_success()
    })
    .await;
    let failed = data(get(&format!("/api/jobs/failed/{id}")).await.unwrap()).await;
    assert!(failed["error"].as_str().unwrap().contains("HTTP 422: unknown sku ABC-1"), "{failed}");
    assert_eq!(failed["attempts"], 1, "{failed}");

    // An event the kind listens to becomes one job of it, with the event's payload.
    let ev = data(post("/api/events", json!({ "event": "order.paid", "payload": { "order": 42 } })).await.unwrap()).await;
    let log = data(get("/api/events/log?per_page=100").await.unwrap()).await;
    let ev = log.as_array().unwrap().iter().find(|e| e["id"] == ev["event_id"]).cloned().unwrap_or_else(|| panic!("{ev} in {log}"));
    let job = ev["listeners"].as_array().and_then(|l| l.iter().find(|l| l["listener"] == "receipt")).cloned().unwrap_or(ev.clone());
    let job_id = job["job_id"].as_str().unwrap_or_else(|| panic!("the event queued a receipt job: {ev}")).to_string();
    let calls = wait_calls(&receiver, &job_id, 1).await;
    assert_eq!(calls[0]["body"]["payload"], json!({ "order": 42 }));

    // A rotation: the next call is signed with the new secret and the previous one.
    let rotated = data(post("/api/kinds/receipt/secret/rotate", json!({})).await.unwrap()).await;
    let second = rotated["secret"].as_str().unwrap().to_string();
    receiver.expect(json!({ "old": first, "new": second }));
    let id = enqueue("receipt", json!({})).await;
    let calls = wait_calls(&receiver, &id, 1).await;
    assert_eq!((calls[0]["results"]["old"].as_str(), calls[0]["results"]["new"].as_str()), (Some("OK"), Some("OK")), "{}", calls[0]);

    // A kind whose endpoint is down: its breaker opens after 3 failures, and its jobs then wait
    // without spending attempts (of 20 jobs with 10 attempts each, none reaches the failed store).
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(enqueue("down", json!({ "max_attempts": 10, "backoff": 0 })).await);
    }
    wait_for("the down kind's breaker to open", Duration::from_secs(30), || async {
        let kinds = data(get("/api/kinds").await.unwrap()).await;
        kinds.as_array().unwrap().iter().any(|k| k["name"] == "down" && k["http"]["breaker_state"] == "open")
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let failed = data(get("/api/jobs/failed?per_page=100").await.unwrap()).await;
    assert!(!failed.as_array().unwrap().iter().any(|f| f["kind"] == "down"), "no down job failed: {failed}");
    let attempts: i64 = {
        let mut sum = 0;
        for id in &ids {
            sum += data(get(&format!("/api/jobs/{id}")).await.unwrap()).await["attempts"].as_i64().unwrap_or(0);
        }
        sum
    };
    assert!(attempts <= 40, "attempts spent while the breaker was open: {attempts} for 20 jobs");

    // A slow endpoint holds its own executors only: while 20 two-second calls queue behind its
    // concurrency of 2, jobs of the CPU-bound kinds run at once.
    for _ in 0..20 {
        enqueue("slow", json!({})).await;
    }
    let mut quick = Vec::new();
    for _ in 0..20 {
        quick.push(data(post("/api/jobs", json!({ "kind": "conveyor.noop" })).await.unwrap()).await["id"].as_str().unwrap().to_string());
    }
    wait_for("the noop jobs to complete", Duration::from_secs(15), || async {
        let mut done = true;
        for id in &quick {
            done &= data(get(&format!("/api/jobs/{id}")).await.unwrap()).await["state"] == "completed";
        }
        done
    })
    .await;
    let slow = data(get("/api/queues").await.unwrap()).await;
    let slow = slow.as_array().unwrap().iter().find(|q| q["queue"] == "slow").cloned().unwrap();
    assert!(slow["pending"].as_i64().unwrap() > 0, "the slow kind's calls are still queued: {slow}");

    // Each HTTP kind's queue has a supervisor of its own.
    wait_for("the HTTP kinds' supervisors to report", Duration::from_secs(15), || async {
        let workers = data(get("/api/workers").await.unwrap()).await;
        let names: Vec<String> = workers
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|w| w["supervisors"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap().to_string()))
            .collect();
        ["http:receipt", "http:partner", "http:reject", "http:slow", "http:down"].iter().all(|n| names.iter().any(|x| x == n))
    })
    .await;

    sigterm(&child.0);
    assert!(wait_exit(&mut child.0, Duration::from_secs(30)).await.success());
}
