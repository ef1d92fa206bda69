//! The outbound policy end to end: callers' webhook and Slack URLs aimed at a loopback
//! "canary" (a real server that counts every request it gets), delivered by the real worker.
//! Blocked means the canary got nothing; allowed means it got the delivery.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::any;
use axum::Router;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use conveyor_apps::notify::model::{self, Kind, LogFilter, ModelError};
use conveyor_apps::notify::{self};
use conveyor_apps::outbound::{self, Client, OutboundError, Policy, Settings, Trust};
use conveyor_core::ratelimit::RateLimit;

use crate::notify::env_with;
use crate::Store;

/// Requests per path.
type Hits = Arc<Mutex<HashMap<String, usize>>>;

/// A server on 127.0.0.1:0 that counts what reaches it: `/redirect` answers 302 to `/landed`,
/// every other path 200.
async fn canary() -> (u16, Hits) {
    async fn hit(State(h): State<Hits>, Path(path): Path<String>) -> axum::response::Response {
        *h.lock().unwrap().entry(path.clone()).or_default() += 1;
        match path.as_str() {
            "redirect" => (StatusCode::FOUND, [(header::LOCATION, "/landed")]).into_response(),
            _ => (StatusCode::OK, "ok").into_response(),
        }
    }
    let hits: Hits = Arc::default();
    let app = Router::new().route("/{*path}", any(hit)).with_state(hits.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, hits)
}

/// A server whose answer never ends (chunked, no length): it writes 64 KiB chunks until the
/// client goes away, and counts the bytes it got to write.
async fn endless() -> (u16, Arc<AtomicUsize>) {
    let written = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let w = written.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let w = w.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                if sock.write_all(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n").await.is_err() {
                    return;
                }
                let chunk = format!("10000\r\n{}\r\n", "x".repeat(0x10000));
                while sock.write_all(chunk.as_bytes()).await.is_ok() {
                    w.fetch_add(0x10000, Ordering::Relaxed);
                }
            });
        }
    });
    (port, written)
}

/// The host name, when it resolves only to addresses callers may not reach.
async fn own_name_resolving_to_a_blocked_address() -> Option<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?.trim().to_string();
    let addrs: Vec<_> = tokio::net::lookup_host((host.as_str(), 0)).await.ok()?.collect();
    (!addrs.is_empty() && addrs.iter().all(|a| outbound::blocked(a.ip()).is_some())).then_some(host)
}

fn total(h: &Hits) -> usize {
    h.lock().unwrap().values().sum()
}

/// Every spelling of loopback (and names resolving to it) in a payload a webhook or Slack rule
/// renders into its URL: all refused at delivery, the canary untouched, the log saying why
/// without the resolved address.
pub(crate) async fn callers_urls_never_reach_loopback_in_any_spelling(s: Store) {
    let (port, hits) = canary().await;
    let e = env_with(s, RateLimit::per(1_000, Duration::from_secs(60)), Policy::default()).await;
    let hook = e.template("to-url", "webhook", None, "hi").await;
    e.rule(json!({ "event": "ping", "template_id": hook, "channel": "webhook", "recipient": "{{ url }}" })).await;
    let mut spellings = vec![
        format!("http://127.0.0.1:{port}/a"),
        format!("http://2130706433:{port}/a"),
        format!("http://0x7f000001:{port}/a"),
        format!("http://0177.0.0.1:{port}/a"),
        format!("http://127.1:{port}/a"),
        format!("http://0:{port}/a"),
        format!("http://0.0.0.0:{port}/a"),
        format!("http://[::1]:{port}/a"),
        format!("http://[::ffff:7f00:1]:{port}/a"),
        format!("http://[::ffff:127.0.0.1]:{port}/a"),
        format!("http://localhost:{port}/a"),
        format!("http://LOCALHOST.:{port}/a"),
        format!("http://127.0.0.1.:{port}/a"),
        format!("http://169.254.169.254:{port}/latest/meta-data"),
    ];
    // This machine's own name usually resolves to loopback or a private address: refused by
    // the client's resolver, after resolution (`localhost` is refused by name before that).
    if let Some(host) = own_name_resolving_to_a_blocked_address().await {
        spellings.push(format!("http://{host}:{port}/a"));
    }
    for url in &spellings {
        notify::ingest(&e.cv, "ping", json!({ "url": url }), None).await.unwrap();
    }
    let slack = e.template("slack-url", "slack", None, "hi").await;
    e.rule(json!({ "event": "nudge", "template_id": slack, "channel": "slack", "recipient": "{{ url }}" })).await;
    notify::ingest(&e.cv, "nudge", json!({ "url": format!("http://localhost:{port}/slack") }), None).await.unwrap();
    e.wait_settled().await;
    let logs = e.logs(LogFilter::default()).await;
    let blocked: Vec<_> = logs.iter().filter(|l| l.event == "ping" || l.event == "nudge").collect();
    assert_eq!(blocked.len(), spellings.len() + 1, "{blocked:?}");
    for l in &blocked {
        let error = l.error.as_deref().unwrap_or_default();
        assert_eq!((l.status.as_str(), l.attempts), ("failed", 1), "a refused destination fails at once: {l:?}");
        assert!(error.starts_with("destination not allowed"), "{} → {error}", l.recipient);
        assert!(!error.contains("127.0.0.1") && !error.contains("::1"), "no resolved address in the error: {error}");
    }
    assert_eq!(total(&hits), 0, "the canary got nothing: {:?}", hits.lock().unwrap());
    e.stop().await;
}

/// With the canary allowed: a delivery arrives (the positive control), a redirect is not
/// followed, and what the API stores is checked against the same list.
pub(crate) async fn allowed_destinations_get_deliveries_but_no_redirects(s: Store) {
    let (port, hits) = canary().await;
    let allow = Policy::parse("127.0.0.1/32").unwrap();
    let e = env_with(s, RateLimit::per(1_000, Duration::from_secs(60)), allow.clone()).await;
    let hook = e.template("hook", "webhook", None, "hi").await;
    e.rule(json!({ "event": "ok", "template_id": hook, "channel": "webhook", "recipient": format!("http://2130706433:{port}/ok?token=s3cret") })).await;
    e.rule(
        json!({ "event": "moved", "template_id": hook, "channel": "webhook", "recipient": format!("http://127.0.0.1:{port}/redirect") }),
    )
    .await;
    notify::ingest(&e.cv, "ok", json!({}), None).await.unwrap();
    notify::ingest(&e.cv, "moved", json!({}), None).await.unwrap();
    e.wait_settled().await;
    let ok = e.logs(LogFilter { event: Some("ok".into()), ..Default::default() }).await;
    assert_eq!(ok[0].status, "sent", "{ok:?}");
    assert_eq!(ok[0].recipient, format!("http://2130706433:{port}/ok?token=***"), "logged without the secret");
    let moved = e.logs(LogFilter { event: Some("moved".into()), ..Default::default() }).await;
    assert_eq!((moved[0].status.as_str(), moved[0].attempts), ("failed", 1), "{moved:?}");
    assert_eq!(moved[0].error.as_deref(), Some("HTTP 302: redirects are not followed"));
    let h = hits.lock().unwrap().clone();
    assert_eq!((h.get("ok"), h.get("redirect"), h.get("landed")), (Some(&1), Some(&1), None), "{h:?}");

    // What the API stores: literal private addresses and other schemes are refused naming the
    // field, unless the list allows them; names wait for delivery.
    let b = e.cv.backend().as_ref();
    let none = Policy::default();
    for (url, field) in [(format!("http://0x7f000001:{port}/"), "recipient"), ("ftp://example.com/x".to_string(), "recipient")] {
        let err =
            model::save(b, Kind::Rules, None, &json!({ "event": "v", "template_id": hook, "channel": "webhook", "recipient": url }), &none)
                .await
                .unwrap_err();
        assert!(matches!(&err, ModelError::Invalid { field: f, .. } if f == field), "{url}: {err:?}");
    }
    assert!(model::save(
        b,
        Kind::Rules,
        None,
        &json!({ "event": "v", "template_id": hook, "channel": "webhook", "recipient": format!("http://127.0.0.1:{port}/") }),
        &allow
    )
    .await
    .is_ok());
    let user = |url: &str| json!({ "name": "V", "email": format!("v{}@example.com", url.len()), "webhook_url": url });
    for url in ["http://[::1]/", "http://10.0.0.1/", "http://[::ffff:192.168.0.1]/", "javascript:alert(1)"] {
        let err = notify::register_user(&e.cv, &user(url), &none).await.unwrap_err();
        assert!(matches!(&err, ModelError::Invalid { field, .. } if field == "webhook_url"), "{url}: {err:?}");
    }
    let r = notify::register_user(&e.cv, &user("https://hooks.example.com/in"), &none).await.unwrap();
    assert!(r.webhook_secret.as_deref().is_some_and(|s| s.starts_with("whsec_")), "a user with a webhook gets a secret");
    e.stop().await;
}

/// Answers are read up to the cap and no further; a redirect is an error, not a new request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn response_bodies_are_capped_and_redirects_refused() {
    let (port, hits) = canary().await;
    let (huge, written) = endless().await;
    let settings = Settings { body_limit: 64 * 1024, ..Settings::default() };
    let client = Client::new(Trust::Operator, Policy::default(), settings);
    let resp = client.send(client.get(&format!("http://127.0.0.1:{huge}/")).unwrap()).await.unwrap();
    assert_eq!(client.body(resp).await, Err(OutboundError::TooLarge(64 * 1024)));
    // The server writes until the dropped connection stops it: what it got out is what the
    // socket buffers took, nowhere near the endless body.
    assert!(
        written.load(Ordering::Relaxed) < 64 * 1024 * 1024,
        "read stopped at the cap: {} bytes written",
        written.load(Ordering::Relaxed)
    );
    let moved = client.send(client.get(&format!("http://127.0.0.1:{port}/redirect")).unwrap()).await.unwrap_err();
    assert_eq!(moved.to_string(), "HTTP 302: redirects are not followed");
    assert_eq!(hits.lock().unwrap().get("landed"), None);
    // A caller client refuses the same URL before sending anything.
    let caller = Client::new(Trust::Caller, Policy::default(), Settings::default());
    assert!(matches!(caller.get(&format!("http://127.1:{port}/x")), Err(OutboundError::NotAllowed(_))));
    assert_eq!(caller.get(&format!("http://localhost:{port}/x")).unwrap_err(), OutboundError::NotAllowed("localhost".into()));
    if let Some(host) = own_name_resolving_to_a_blocked_address().await {
        let refused = caller.send(caller.get(&format!("http://{host}:{port}/x")).unwrap()).await.unwrap_err();
        assert!(matches!(&refused, OutboundError::NotAllowed(why) if why.starts_with("resolves to a")), "{refused:?}");
    }
    assert_eq!(hits.lock().unwrap().get("x"), None);
    // A refused connection says so, and nothing more.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = client.send(client.get(&format!("http://127.0.0.1:{closed}/")).unwrap()).await.unwrap_err();
    assert_eq!(e, OutboundError::Refused);
}
