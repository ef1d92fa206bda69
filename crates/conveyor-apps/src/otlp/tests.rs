use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::http::{HeaderMap as AxumHeaders, StatusCode};
use conveyor_core::trace::{Exporter as _, Span, SpanKind, Value};

use super::*;

fn settings(vars: &[(&str, &str)]) -> Result<Option<Settings>, OtlpError> {
    Settings::from_vars(vars.iter().copied())
}

fn some(vars: &[(&str, &str)]) -> Settings {
    settings(vars).expect("valid settings").expect("export configured")
}

const BASE: (&str, &str) = ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318");

#[test]
fn the_endpoint_is_the_traces_one_as_is_or_the_base_with_v1_traces() {
    assert!(settings(&[]).unwrap().is_none(), "no endpoint: no export");
    assert!(settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")]).unwrap().is_none(), "an empty value is unset");
    assert_eq!(some(&[BASE]).endpoint, "http://collector:4318/v1/traces");
    assert_eq!(some(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")]).endpoint, "http://collector:4318/v1/traces");
    assert_eq!(some(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "https://o.example/otlp/")]).endpoint, "https://o.example/otlp/v1/traces");
    let specific = [BASE, ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "https://o.example/custom/path")];
    assert_eq!(some(&specific).endpoint, "https://o.example/custom/path", "used as is, and wins");
    assert_eq!(some(&specific[1..]).endpoint, "https://o.example/custom/path");

    for (var, bad) in [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "collector:4318"),
        ("OTEL_EXPORTER_OTLP_ENDPOINT", "ftp://collector/"),
        ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "not a url"),
    ] {
        match settings(&[(var, bad)]) {
            Err(OtlpError::Invalid { var: named, .. }) => assert_eq!(named, var, "{bad}"),
            other => panic!("{var}={bad}: {other:?}"),
        }
    }
}

#[test]
fn headers_are_percent_decoded_the_traces_ones_win_and_values_never_show() {
    let s = some(&[
        BASE,
        ("OTEL_EXPORTER_OTLP_HEADERS", "Api-Key=s3cr%3Dt%20value, x-tenant = a%2Cb ,"),
        ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "api-key=traces-key"),
    ]);
    assert_eq!(s.headers, [("x-tenant".to_string(), "a,b".to_string()), ("api-key".to_string(), "traces-key".to_string())]);
    let debug = format!("{s:?}");
    assert!(debug.contains("api-key") && !debug.contains("traces-key") && !debug.contains("a,b"), "{debug}");
    assert_eq!(
        some(&[BASE, ("OTEL_EXPORTER_OTLP_HEADERS", "authorization=Basic%20dXNlcjpwYXNz")]).headers,
        [("authorization".to_string(), "Basic dXNlcjpwYXNz".to_string())]
    );

    for (list, why) in [
        ("Authorization Bearer hunter2", "entry 1 is not key=value"),
        ("a=1,=hunter2", "entry 2 has an empty key"),
        ("a=hunter2%zz", "entry 1: the value is not valid percent-encoded UTF-8"),
        ("a=hunter2%ff", "entry 1: the value is not valid percent-encoded UTF-8"),
        ("a=hunter2%0A", "the value of header \"a\" is not a valid header value"),
        ("bad name=hunter2", "\"bad name\" is not a valid header name"),
    ] {
        let e = settings(&[BASE, ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", list)]).unwrap_err();
        assert_eq!(e, OtlpError::Invalid { var: "OTEL_EXPORTER_OTLP_TRACES_HEADERS".into(), reason: why.into() }, "{list}");
        assert!(!e.to_string().contains("hunter2"), "{e}");
    }
}

#[test]
fn only_http_protobuf_is_spoken_and_the_error_names_the_variable() {
    assert!(settings(&[BASE, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")]).unwrap().is_some());
    let e = settings(&[BASE, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")]).unwrap_err();
    assert_eq!(e, OtlpError::UnsupportedProtocol { var: "OTEL_EXPORTER_OTLP_PROTOCOL".into(), value: "grpc".into() });
    assert!(e.to_string().starts_with("OTEL_EXPORTER_OTLP_PROTOCOL=\"grpc\" is not supported"), "{e}");
    // The traces variable wins over the general one, either way.
    let e = settings(&[BASE, ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"), ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")])
        .unwrap_err();
    assert_eq!(e, OtlpError::UnsupportedProtocol { var: "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL".into(), value: "http/json".into() });
    assert!(settings(&[BASE, ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"), ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/protobuf")])
        .unwrap()
        .is_some());
    assert!(settings(&[BASE, ("OTEL_EXPORTER_OTLP_COMPRESSION", "gzip")]).unwrap().is_some(), "sent uncompressed");
    assert!(matches!(settings(&[BASE, ("OTEL_EXPORTER_OTLP_COMPRESSION", "zstd")]), Err(OtlpError::Invalid { .. })));
}

#[test]
fn export_is_off_when_disabled_or_the_exporter_is_none() {
    for (var, v) in [("OTEL_SDK_DISABLED", "true"), ("OTEL_SDK_DISABLED", "TRUE"), ("OTEL_TRACES_EXPORTER", "none")] {
        assert!(settings(&[BASE, (var, v)]).unwrap().is_none(), "{var}={v}");
    }
    for (var, v) in [("OTEL_SDK_DISABLED", "false"), ("OTEL_TRACES_EXPORTER", "otlp"), ("OTEL_TRACES_EXPORTER", "none,otlp")] {
        assert!(settings(&[BASE, (var, v)]).unwrap().is_some(), "{var}={v}");
    }
    assert_eq!(
        settings(&[BASE, ("OTEL_TRACES_EXPORTER", "zipkin")]).unwrap_err(),
        OtlpError::UnsupportedExporter { var: "OTEL_TRACES_EXPORTER".into(), value: "zipkin".into() }
    );
    assert!(matches!(settings(&[BASE, ("OTEL_SDK_DISABLED", "yes")]), Err(OtlpError::Invalid { var, .. }) if var == "OTEL_SDK_DISABLED"));
    // Disabled wins over a malformed rest.
    assert!(settings(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "nonsense"), ("OTEL_SDK_DISABLED", "true")]).unwrap().is_none());
}

#[test]
fn timeouts_and_batching_have_opentelemetry_defaults_and_are_checked() {
    let s = some(&[BASE]);
    assert_eq!(
        (s.timeout, s.export_timeout, s.schedule_delay, s.max_queue_size, s.max_export_batch_size),
        (Duration::from_secs(10), Duration::from_secs(30), Duration::from_secs(5), 2048, 512)
    );
    let s = some(&[
        BASE,
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "7000"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "100"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "1000"),
    ]);
    assert_eq!(
        (s.timeout, s.export_timeout, s.schedule_delay, s.max_queue_size, s.max_export_batch_size),
        (Duration::from_millis(2500), Duration::from_secs(7), Duration::from_millis(200), 100, 100),
        "a batch is never larger than the queue"
    );
    assert_eq!(
        some(&[BASE, ("OTEL_EXPORTER_OTLP_TIMEOUT", "2500"), ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "300")]).timeout.as_millis(),
        300
    );
    for (var, v) in [
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "10s"),
        ("OTEL_EXPORTER_OTLP_TRACES_TIMEOUT", "-1"),
        ("OTEL_EXPORTER_OTLP_TIMEOUT", "0"),
        ("OTEL_BSP_EXPORT_TIMEOUT", "0"),
        ("OTEL_BSP_SCHEDULE_DELAY", "soon"),
        ("OTEL_BSP_MAX_QUEUE_SIZE", "0"),
        ("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "many"),
    ] {
        match settings(&[BASE, (var, v)]) {
            Err(OtlpError::Invalid { var: named, .. }) => assert_eq!(named, var),
            other => panic!("{var}={v}: {other:?}"),
        }
    }
}

#[test]
fn the_resource_names_the_service_and_takes_the_configured_attributes() {
    let attr = |s: &Settings, k: &str| s.resource.iter().find(|(name, _)| name == k).map(|(_, v)| v.clone());
    let s = some(&[BASE]);
    assert_eq!(s.resource[0], ("service.name".to_string(), "conveyor".to_string()));
    assert_eq!(attr(&s, "service.version").as_deref(), Some(env!("CARGO_PKG_VERSION")));
    assert_eq!(attr(&s, "telemetry.sdk.name").as_deref(), Some("conveyor"));
    assert_eq!(attr(&s, "telemetry.sdk.language").as_deref(), Some("rust"));

    let with_attrs = [BASE, ("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=prod,service.name=from-attrs,team=a%20b%2Cc")];
    let s = some(&with_attrs);
    assert_eq!(attr(&s, "service.name").as_deref(), Some("from-attrs"));
    assert_eq!(attr(&s, "deployment.environment").as_deref(), Some("prod"));
    assert_eq!(attr(&s, "team").as_deref(), Some("a b,c"));
    let mut named = with_attrs.to_vec();
    named.push(("OTEL_SERVICE_NAME", "billing-worker"));
    let s = some(&named);
    assert_eq!(attr(&s, "service.name").as_deref(), Some("billing-worker"), "OTEL_SERVICE_NAME wins");
    assert_eq!(s.resource.iter().filter(|(k, _)| k == "service.name").count(), 1);
    assert!(matches!(
        settings(&[BASE, ("OTEL_RESOURCE_ATTRIBUTES", "novalue")]),
        Err(OtlpError::Invalid { var, .. }) if var == "OTEL_RESOURCE_ATTRIBUTES"
    ));
}

#[test]
fn the_endpoint_is_logged_without_credentials() {
    let s = Settings::new("https://user:pass@o.example/v1/traces?api_key=k");
    assert_eq!(s.endpoint_for_logs(), "https://o.example/v1/traces");
    assert!(!format!("{s:?}").contains("pass"));
}

// --- the exporter against a collector of the test's own ---

/// What the collector got: each request's headers and body.
type Seen = Arc<Mutex<Vec<(AxumHeaders, Vec<u8>)>>>;

/// A collector on loopback answering requests in turn with `answers` (status, `Retry-After`,
/// body), then 200 with an empty body.
async fn collector(answers: Vec<(u16, Option<&'static str>, Vec<u8>)>) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let answers = Arc::new(Mutex::new(std::collections::VecDeque::from(answers)));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |headers: AxumHeaders, body: Bytes| {
            let (seen, answers) = (s.clone(), answers.clone());
            async move {
                seen.lock().unwrap().push((headers, body.to_vec()));
                let (status, after, body) = answers.lock().unwrap().pop_front().unwrap_or((200, None, Vec::new()));
                let mut resp = axum::response::Response::new(axum::body::Body::from(body));
                *resp.status_mut() = StatusCode::from_u16(status).unwrap();
                if let Some(a) = after {
                    resp.headers_mut().insert("retry-after", a.parse().unwrap());
                }
                resp
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}/v1/traces"), seen)
}

fn span(n: u8) -> Span {
    Span {
        trace_id: [n; 16],
        span_id: [n; 8],
        parent_span_id: None,
        name: format!("span {n}"),
        kind: SpanKind::Internal,
        start_ns: 1,
        end_ns: 2,
        attributes: vec![("n", Value::Int(n.into()))],
        links: Vec::new(),
        error: None,
    }
}

fn quick(endpoint: &str) -> Settings {
    let mut s = Settings::new(endpoint);
    s.schedule_delay = Duration::from_secs(3600);
    s
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn spans_go_out_in_batches_with_the_headers_and_the_protobuf_body() {
    let (url, seen) = collector(Vec::new()).await;
    let mut s = quick(&url);
    s.max_export_batch_size = 2;
    s.headers = vec![("x-api-key".into(), "k1".into())];
    let resource = s.resource.clone();
    let (exporter, flush) = Exporter::new(s).unwrap();
    for n in 1..=5 {
        exporter.export(span(n));
    }
    assert!(flush.flush(Duration::from_secs(10)).await);
    assert_eq!(flush.stats(), Stats { exported: 5, dropped: 0, failed: 0 });
    assert_eq!(flush.queued(), 0);
    let seen = seen.lock().unwrap().clone();
    assert!(seen.len() >= 3, "batches of at most 2: {}", seen.len());
    // Each body is the request for the next one or two spans, in order.
    let mut next = 1u8;
    for (headers, body) in &seen {
        assert_eq!(headers["content-type"], "application/x-protobuf");
        assert_eq!(headers["x-api-key"], "k1");
        assert!(headers["user-agent"].to_str().unwrap().starts_with("conveyor/"));
        let of = |k: u8| proto::export_request(&resource, (SCOPE, VERSION), &(next..next + k).map(span).collect::<Vec<_>>());
        let k = (1..=2).find(|k| *body == of(*k)).expect("a body of the next 1 or 2 spans");
        next += k;
    }
    assert_eq!(next, 6, "every span once");
}

#[tokio::test]
async fn a_full_batch_goes_at_once_and_the_rest_on_the_schedule() {
    let (url, seen) = collector(Vec::new()).await;
    let mut s = quick(&url);
    s.max_export_batch_size = 2;
    let (exporter, _flush) = Exporter::new(s).unwrap();
    exporter.export(span(1));
    exporter.export(span(2));
    wait_until("the full batch", || seen.lock().unwrap().len() == 1).await;

    let (url, seen) = collector(Vec::new()).await;
    let mut s = quick(&url);
    s.schedule_delay = Duration::from_millis(50);
    let (exporter, _flush) = Exporter::new(s).unwrap();
    exporter.export(span(1));
    wait_until("the scheduled export", || seen.lock().unwrap().len() == 1).await;
}

#[tokio::test]
async fn a_full_queue_drops_and_counts() {
    let (url, seen) = collector(Vec::new()).await;
    let mut s = quick(&url);
    s.max_queue_size = 3;
    let (exporter, flush) = Exporter::new(s).unwrap();
    // The test's runtime has one thread: the exporter's task cannot run before the next await.
    for n in 1..=5 {
        exporter.export(span(n));
    }
    assert_eq!(flush.queued(), 3);
    assert!(flush.flush(Duration::from_secs(10)).await);
    assert_eq!(flush.stats(), Stats { exported: 3, dropped: 2, failed: 0 });
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn busy_collectors_are_retried_and_refusals_are_not() {
    // 503 and 429 with Retry-After (0 s), then accepted: one batch, three tries.
    let (url, seen) = collector(vec![(503, Some("0"), Vec::new()), (429, Some("0"), Vec::new())]).await;
    let (exporter, flush) = Exporter::new(quick(&url)).unwrap();
    exporter.export(span(1));
    assert!(flush.flush(Duration::from_secs(10)).await);
    assert_eq!(flush.stats(), Stats { exported: 1, dropped: 0, failed: 0 });
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3);
    assert!(seen.iter().all(|(_, b)| *b == seen[0].1), "the same body each time");

    // Three busy answers: the batch is dropped.
    let busy = || (502, Some("0"), Vec::new());
    let (url, seen) = collector(vec![busy(), busy(), busy()]).await;
    let (exporter, flush) = Exporter::new(quick(&url)).unwrap();
    exporter.export(span(1));
    exporter.export(span(2));
    assert!(!flush.flush(Duration::from_secs(10)).await);
    assert_eq!(flush.stats(), Stats { exported: 0, dropped: 0, failed: 2 });
    assert_eq!(seen.lock().unwrap().len(), 3);

    // A refusal is final.
    let (url, seen) = collector(vec![(400, None, b"bad request".to_vec())]).await;
    let (exporter, flush) = Exporter::new(quick(&url)).unwrap();
    exporter.export(span(1));
    assert!(!flush.flush(Duration::from_secs(10)).await);
    assert_eq!(flush.stats().failed, 1);
    assert_eq!(seen.lock().unwrap().len(), 1);
    // …and the exporter carries on with the next spans.
    exporter.export(span(2));
    assert!(flush.flush(Duration::from_secs(10)).await);
    assert_eq!(flush.stats(), Stats { exported: 1, dropped: 0, failed: 1 });
}

#[tokio::test]
async fn a_collector_that_is_down_is_retried_with_backoff_then_given_up() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let (exporter, flush) = Exporter::new(quick(&format!("http://127.0.0.1:{port}/v1/traces"))).unwrap();
    exporter.export(span(1));
    let started = Instant::now();
    assert!(!flush.flush(Duration::from_secs(20)).await);
    // Two backoffs: [250, 500] ms, then [500, 1000] ms.
    assert!(started.elapsed() >= Duration::from_millis(750), "{:?}", started.elapsed());
    assert_eq!(flush.stats().failed, 1);

    // A flush gives up at its deadline.
    exporter.export(span(2));
    let started = Instant::now();
    assert!(!flush.flush(Duration::from_millis(300)).await);
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
}

#[tokio::test]
async fn a_partial_success_counts_the_rejected_spans() {
    // partial_success { rejected_spans 1, error_message "too old" }
    let body = vec![0x0a, 11, 0x08, 1, 0x12, 7, b't', b'o', b'o', b' ', b'o', b'l', b'd'];
    let (url, _seen) = collector(vec![(200, None, body)]).await;
    let (exporter, flush) = Exporter::new(quick(&url)).unwrap();
    exporter.export(span(1));
    exporter.export(span(2));
    assert!(flush.flush(Duration::from_secs(10)).await);
    assert_eq!(flush.stats(), Stats { exported: 1, dropped: 0, failed: 1 });
}

#[test]
fn outside_a_runtime_there_is_no_exporter() {
    assert_eq!(Exporter::new(Settings::new("http://127.0.0.1:1/v1/traces")).err(), Some(OtlpError::NoRuntime));
}
