//! Traces over OTLP/HTTP, decoded by the reference: a receiver built on the generated classes of
//! the `opentelemetry-proto` Python package (`otlp_receiver.py`) decodes what Conveyor's
//! hand-written protobuf encoder sends, refusing unknown fields. Without python3 and pip the tests
//! are skipped outside CI and fail under `CI=true`.

use std::time::Duration;

use serde_json::{json, Value};

use conveyor_apps::otlp::{Exporter, Settings, Stats};
use conveyor_core::trace::{Exporter as _, Span, SpanKind, TraceContext, Value as Attr};

use crate::webhooks::{python_or_skip, Receiver};

const RECEIVER: &str = include_str!("otlp_receiver.py");

/// The receiver, and what it decoded.
struct Otlp {
    receiver: Receiver,
    http: reqwest::Client,
}

impl Otlp {
    /// `None` when the test is skipped (no Python with pip, outside CI).
    fn start(dir: &std::path::Path) -> Option<Otlp> {
        let python = python_or_skip("opentelemetry-proto", "opentelemetry.proto.collector.trace.v1.trace_service_pb2")?;
        Some(Otlp { receiver: Receiver::with_script(&python, dir, RECEIVER), http: reqwest::Client::new() })
    }

    fn url(&self) -> &str {
        &self.receiver.url
    }

    async fn get(&self, path: &str) -> Vec<Value> {
        let r = self.http.get(format!("{}{path}", self.url())).send().await.unwrap();
        assert!(r.status().is_success(), "GET {path}: {}", r.status());
        r.json().await.unwrap()
    }

    /// Every span decoded so far.
    async fn spans(&self) -> Vec<Value> {
        self.get("/spans").await
    }

    /// Every trace request: path, content type, headers, span count, decoding error.
    async fn requests(&self) -> Vec<Value> {
        self.get("/requests").await
    }

    /// No request failed to decode or held unknown fields.
    async fn assert_all_decoded(&self) {
        for r in self.requests().await {
            assert!(r["error"].is_null() || r["error"] == "answered busy", "the reference decoder refused a request: {r}");
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn otlp_export_decodes_with_the_reference_package() {
    let dir = tempfile::tempdir().unwrap();
    let Some(otlp) = Otlp::start(dir.path()) else { return };
    // Configured as an operator would; `/busy/` answers the first request 503 + Retry-After: 1.
    let settings = Settings::from_vars([
        ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("{}/busy/", otlp.url())),
        ("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=test%20key".into()),
        ("OTEL_SERVICE_NAME", "otel-test".into()),
        ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=ci%2Flocal".into()),
        ("OTEL_BSP_SCHEDULE_DELAY", "60000".into()),
    ])
    .unwrap()
    .expect("an endpoint is configured");
    assert_eq!(settings.endpoint, format!("{}/busy/v1/traces", otlp.url()));
    let (exporter, flush) = Exporter::new(settings).unwrap();

    let trace_id: [u8; 16] = *b"\x4b\xf9\x2f\x35\x77\xb3\x4d\xa6\xa3\xce\x92\x9d\x0e\x0e\x47\x36";
    let (producer_id, consumer_id) = ([0x00, 0xf0, 0x67, 0xaa, 0x0b, 0xa9, 0x02, 0xb7], [0xff, 1, 2, 3, 4, 5, 6, 0x80]);
    let linked = TraceContext { trace_id: [0xab; 16], span_id: [0xcd; 8], sampled: true };
    let start = 1_700_000_000_123_456_789u64;
    let producer = Span {
        trace_id,
        span_id: producer_id,
        parent_span_id: None,
        name: "publish default".into(),
        kind: SpanKind::Producer,
        start_ns: start,
        end_ns: start,
        attributes: vec![("messaging.system", Attr::Str("conveyor".into()))],
        links: Vec::new(),
        error: None,
    };
    let consumer = Span {
        trace_id,
        span_id: consumer_id,
        parent_span_id: Some(producer_id),
        name: "process défault ✓".into(),
        kind: SpanKind::Consumer,
        start_ns: start + 1_000,
        end_ns: u64::MAX - 1,
        attributes: vec![
            ("text", Attr::Str("naïve ✓".into())),
            ("empty", Attr::Str(String::new())),
            ("zero", Attr::Int(0)),
            ("negative", Attr::Int(-42)),
            ("big", Attr::Int(i64::MAX)),
            ("yes", Attr::Bool(true)),
            ("no", Attr::Bool(false)),
        ],
        links: vec![linked],
        error: Some("boom: ünïcode".into()),
    };
    exporter.export(producer);
    exporter.export(consumer);
    assert!(flush.flush(Duration::from_secs(30)).await, "flushed: {:?}", flush.stats());
    assert_eq!(flush.stats(), Stats { exported: 2, dropped: 0, failed: 0 });

    // One busy answer, then one request with both spans, as protobuf with the configured header.
    let requests = otlp.requests().await;
    assert_eq!(requests.len(), 2, "{requests:?}");
    assert_eq!(requests[0]["error"], "answered busy");
    let r = &requests[1];
    assert_eq!((r["path"].as_str(), r["error"].as_str(), r["spans"].as_u64()), (Some("/busy/v1/traces"), None, Some(2)), "{r}");
    assert_eq!(r["content_type"], "application/x-protobuf");
    assert_eq!(r["headers"]["x-api-key"], "test key");

    let spans = otlp.spans().await;
    assert_eq!(spans.len(), 2, "{spans:?}");
    let resource = &spans[0]["resource"];
    assert_eq!(resource["service.name"], "otel-test");
    assert_eq!(resource["deployment.environment"], "ci/local");
    assert_eq!(resource["service.version"], env!("CARGO_PKG_VERSION"));
    assert_eq!((resource["telemetry.sdk.name"].as_str(), resource["telemetry.sdk.language"].as_str()), (Some("conveyor"), Some("rust")));
    assert_eq!(spans[0]["scope"]["name"], "conveyor");

    let p = &spans[0];
    assert_eq!(p["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(p["span_id"], "00f067aa0ba902b7");
    assert_eq!(p["parent_span_id"], "", "a root span has no parent");
    assert_eq!(p["name"], "publish default");
    assert_eq!(p["kind"], "SPAN_KIND_PRODUCER");
    assert_eq!((p["start"].as_u64(), p["end"].as_u64()), (Some(start), Some(start)));
    assert_eq!(p["flags"], 1, "sampled");
    assert_eq!(p["attributes"], json!({ "messaging.system": "conveyor" }));
    assert_eq!(p["links"], json!([]));
    assert_eq!(p["status"], json!({ "set": false, "code": "STATUS_CODE_UNSET", "message": "" }));

    let c = &spans[1];
    assert_eq!(c["trace_id"], p["trace_id"]);
    assert_eq!(c["span_id"], hex(&consumer_id));
    assert_eq!(c["parent_span_id"], "00f067aa0ba902b7");
    assert_eq!(c["name"], "process défault ✓");
    assert_eq!(c["kind"], "SPAN_KIND_CONSUMER");
    assert_eq!((c["start"].as_u64(), c["end"].as_u64()), (Some(start + 1_000), Some(u64::MAX - 1)));
    assert_eq!(
        c["attributes"],
        json!({ "text": "naïve ✓", "empty": "", "zero": 0, "negative": -42, "big": i64::MAX, "yes": true, "no": false })
    );
    assert_eq!(c["links"], json!([{ "trace_id": hex(&[0xab; 16]), "span_id": hex(&[0xcd; 8]), "flags": 1 }]));
    assert_eq!(c["status"], json!({ "set": true, "code": "STATUS_CODE_ERROR", "message": "boom: ünïcode" }));
    otlp.assert_all_decoded().await;
}

const TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PARENT: &str = "00f067aa0ba902b7";

/// The spans whose `messaging.message.id` is `job` (its producer span and its attempts'), and
/// none other.
fn of_job<'a>(spans: &'a [Value], job: &str) -> Vec<&'a Value> {
    spans.iter().filter(|s| s["attributes"]["messaging.message.id"] == job).collect()
}

fn of_kind<'a>(spans: &[&'a Value], kind: &str) -> Vec<&'a Value> {
    spans.iter().copied().filter(|s| s["kind"] == kind).collect()
}

impl Otlp {
    /// Waits until job `id` has a producer span and `attempts` consumer spans; returns them, the
    /// consumer spans by attempt.
    async fn job_spans(&self, id: &str, attempts: usize) -> (Value, Vec<Value>) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let spans = self.spans().await;
            let mine = of_job(&spans, id);
            let (producers, mut consumers) = (of_kind(&mine, "SPAN_KIND_PRODUCER"), of_kind(&mine, "SPAN_KIND_CONSUMER"));
            if producers.len() == 1 && consumers.len() == attempts {
                assert_eq!(mine.len(), 1 + attempts, "only producer and consumer spans: {mine:?}");
                consumers.sort_by_key(|s| s["attributes"]["conveyor.job.attempt"].as_i64());
                return (producers[0].clone(), consumers.into_iter().cloned().collect());
            }
            assert!(
                producers.len() <= 1 && consumers.len() <= attempts,
                "more spans than expected for job {id}: {producers:?} {consumers:?}"
            );
            assert!(std::time::Instant::now() < deadline, "timed out waiting for the spans of job {id}; got {mine:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The HTTP kind calls the receiver got for job `id` (its webhook-id), in order.
    async fn calls(&self, id: &str) -> Vec<Value> {
        self.get("/calls").await.into_iter().filter(|c| c["webhook_id"] == id).collect()
    }
}

/// The producer span of a job enqueued over HTTP and the consumer span of its one attempt,
/// completed, run by `queue`.
fn assert_enqueued_and_completed(producer: &Value, consumer: &Value, id: &str, queue: &str, kind: &str) {
    assert_eq!(producer["name"], format!("publish {queue}"), "{producer}");
    assert_eq!(consumer["name"], format!("process {queue}"), "{consumer}");
    assert_eq!(consumer["trace_id"], producer["trace_id"], "one trace");
    assert_eq!(consumer["parent_span_id"], producer["span_id"], "the attempt is the child of the enqueue");
    for (s, operation) in [(producer, "send"), (consumer, "process")] {
        let a = &s["attributes"];
        assert_eq!(a["messaging.system"], "conveyor", "{s}");
        assert_eq!(a["messaging.operation.type"], operation, "{s}");
        assert_eq!(a["messaging.destination.name"], queue, "{s}");
        assert_eq!(a["messaging.message.id"], id, "{s}");
        assert_eq!(a["conveyor.job.kind"], kind, "{s}");
        assert_eq!(s["resource"]["service.name"], "conveyor-test", "{s}");
        assert_eq!(s["scope"]["name"], "conveyor", "{s}");
        assert_eq!(s["flags"], 1, "sampled: {s}");
        assert!(s["start"].as_u64().unwrap() <= s["end"].as_u64().unwrap(), "{s}");
    }
    // No order between the two: a worker may start the job before the enqueue's span is ended.
    assert_eq!(producer["status"]["set"], false);
    assert_eq!(producer["links"], json!([]));
}

/// `conveyor serve` with `OTEL_EXPORTER_OTLP_ENDPOINT` (and the receiver as an HTTP kind's
/// endpoint that fails a job's first call).
fn serve_traced(otlp: &Otlp, schedule_delay_ms: &str) -> (crate::TestEnv, crate::Proc, String) {
    let env = crate::TestEnv::new(&format!("[[kinds]]\nname = \"flaky\"\nurl = \"{}/flaky\"\n", otlp.url()));
    let (child, url) = crate::http::serve(
        &env,
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.url()),
            ("OTEL_BSP_SCHEDULE_DELAY", schedule_delay_ms),
            ("OTEL_SERVICE_NAME", "conveyor-test"),
        ],
    );
    (env, child, url)
}

async fn enqueue(http: &reqwest::Client, url: &str, body: Value, traceparent: Option<&str>) -> String {
    let mut req = http.post(format!("{url}/api/jobs")).json(&body);
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let r = req.send().await.unwrap();
    let status = r.status();
    let v: Value = r.json().await.unwrap();
    assert!(status.is_success(), "{status}: {v}");
    v["data"]["id"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_traces_requests_jobs_and_retries() {
    let dir = tempfile::tempdir().unwrap();
    let Some(otlp) = Otlp::start(dir.path()) else { return };
    let (_env, mut child, url) = serve_traced(&otlp, "200");
    let http = reqwest::Client::new();

    // In the caller's trace: the enqueue's span is the child of the request's, the attempt's
    // the child of the enqueue's.
    let traced = enqueue(&http, &url, json!({ "kind": "conveyor.noop" }), Some(&format!("00-{TRACE}-{PARENT}-01"))).await;
    let (producer, consumers) = otlp.job_spans(&traced, 1).await;
    assert_eq!((producer["trace_id"].as_str(), producer["parent_span_id"].as_str()), (Some(TRACE), Some(PARENT)), "{producer}");
    assert_enqueued_and_completed(&producer, &consumers[0], &traced, "default", "conveyor.noop");
    let c = &consumers[0];
    assert_eq!(c["attributes"]["conveyor.job.outcome"], "completed", "{c}");
    assert_eq!(c["attributes"]["conveyor.job.attempt"], 1, "{c}");
    assert_eq!(c["status"]["set"], false, "{c}");
    assert_eq!(c["links"], json!([]));

    // Without a traceparent: a trace of its own, rooted at the enqueue.
    let own = enqueue(&http, &url, json!({ "kind": "conveyor.noop" }), None).await;
    let (producer, consumers) = otlp.job_spans(&own, 1).await;
    assert_eq!(producer["parent_span_id"], "", "a root span: {producer}");
    assert_ne!(producer["trace_id"], TRACE);
    assert_enqueued_and_completed(&producer, &consumers[0], &own, "default", "conveyor.noop");
    // A malformed traceparent is ignored, as tracers ignore one.
    let junk = enqueue(&http, &url, json!({ "kind": "conveyor.noop" }), Some("00-not-a-trace-01")).await;
    let (producer, _) = otlp.job_spans(&junk, 1).await;
    assert_eq!(producer["parent_span_id"], "", "{producer}");

    // A retry: the HTTP kind's endpoint fails the first call (500). Attempt 1 is retried with the
    // error, attempt 2 completes and links to attempt 1; each call carries its attempt's context.
    let flaky =
        enqueue(&http, &url, json!({ "kind": "flaky", "payload": { "n": 1 }, "backoff": 0 }), Some(&format!("00-{TRACE}-{PARENT}-01")))
            .await;
    let (producer, attempts) = otlp.job_spans(&flaky, 2).await;
    assert_eq!((producer["trace_id"].as_str(), producer["parent_span_id"].as_str()), (Some(TRACE), Some(PARENT)), "{producer}");
    let (first, second) = (&attempts[0], &attempts[1]);
    assert_enqueued_and_completed(&producer, second, &flaky, "flaky", "flaky");
    assert_eq!(first["parent_span_id"], producer["span_id"], "{first}");
    assert_eq!(first["trace_id"], TRACE);
    assert_eq!(
        (first["attributes"]["conveyor.job.attempt"].as_i64(), second["attributes"]["conveyor.job.attempt"].as_i64()),
        (Some(1), Some(2))
    );
    assert_eq!(first["attributes"]["conveyor.job.outcome"], "retried", "{first}");
    assert_eq!(first["status"]["code"], "STATUS_CODE_ERROR", "{first}");
    assert!(first["status"]["message"].as_str().unwrap().contains("500"), "the error says what failed: {first}");
    assert_eq!(first["links"], json!([]), "the first attempt links to nothing");
    assert_eq!(second["attributes"]["conveyor.job.outcome"], "completed", "{second}");
    assert_eq!(second["status"]["set"], false, "{second}");
    assert_eq!(
        second["links"],
        json!([{ "trace_id": TRACE, "span_id": first["span_id"], "flags": 1 }]),
        "the retry links to the attempt before"
    );
    assert_ne!(first["span_id"], second["span_id"]);
    let calls = otlp.calls(&flaky).await;
    assert_eq!(calls.len(), 2, "{calls:?}");
    for (call, attempt) in calls.iter().zip([first, second]) {
        assert_eq!(call["traceparent"], format!("00-{TRACE}-{}-01", attempt["span_id"].as_str().unwrap()), "{call}");
    }

    otlp.assert_all_decoded().await;
    crate::sigterm(&child);
    assert!(crate::wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_sends_the_spans_it_holds_when_it_stops() {
    let dir = tempfile::tempdir().unwrap();
    let Some(otlp) = Otlp::start(dir.path()) else { return };
    // Nothing is sent on schedule within the test: only the flush at shutdown sends.
    let (env, mut child, url) = serve_traced(&otlp, "3600000");
    let http = reqwest::Client::new();
    let id = enqueue(&http, &url, json!({ "kind": "conveyor.noop" }), None).await;
    crate::wait_for("the job to complete", Duration::from_secs(30), || async {
        env.backend.job(id.parse().unwrap()).await.ok().flatten().is_some_and(|j| j.state == conveyor_core::job::JobState::Completed)
    })
    .await;
    assert!(otlp.spans().await.is_empty(), "nothing sent before the schedule or the shutdown");
    crate::sigterm(&child);
    assert!(crate::wait_exit(&mut child, Duration::from_secs(30)).await.success());
    let spans = otlp.spans().await;
    let mine = of_job(&spans, &id);
    assert_eq!(
        (of_kind(&mine, "SPAN_KIND_PRODUCER").len(), of_kind(&mine, "SPAN_KIND_CONSUMER").len()),
        (1, 1),
        "sent at shutdown: {spans:?}"
    );
    otlp.assert_all_decoded().await;
}
