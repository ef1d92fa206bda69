//! Notifications end to end: real receivers on loopback (SMTP, Slack-like, webhook, SMS
//! gateway), the real worker runtime, on every store.

use std::time::Duration;

use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use conveyor_apps::notify::channels::{verify, verify_legacy, Mailer};
use conveyor_apps::notify::model::{self, Kind, LogEntry, LogFilter};
use conveyor_apps::notify::{self, NotifyConfig};
use conveyor_apps::outbound::Policy;
use conveyor_core::backend::Page;
use conveyor_core::ratelimit::RateLimit;
use conveyor_core::trace;
use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig};
use conveyor_core::{Conveyor, Registry};

use crate::receivers;
use crate::{wait_for, Store};

const QUEUES: [&str; 6] = ["notify", "notify.email", "notify.sms", "notify.slack", "notify.webhook", "notify.database"];

pub(crate) struct Env {
    pub(crate) cv: Conveyor,
    pub(crate) http: String,
    pub(crate) inbox: receivers::Shared,
    mails: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    stop: CancellationToken,
    worker: tokio::task::JoinHandle<conveyor_core::worker::WorkerReport>,
    _store: Store,
}

const SECRET: &str = "test-secret";

/// The receivers live on loopback, which callers' URLs may reach only when allowed.
pub(crate) fn loopback_allowed() -> Policy {
    Policy::parse("127.0.0.1/32").unwrap()
}

async fn env(s: Store, rate_limit: RateLimit) -> Env {
    env_with(s, rate_limit, loopback_allowed()).await
}

/// The notifications with real receivers and a worker; callers' URLs go through `outbound`.
pub(crate) async fn env_with(s: Store, rate_limit: RateLimit, outbound: Policy) -> Env {
    let (http, inbox) = receivers::http().await;
    let (smtp_port, mails) = receivers::smtp().await;
    let config = NotifyConfig {
        mailer: Mailer::Smtp(vec![format!("smtp://127.0.0.1:{smtp_port}")]),
        mail_from: "Conveyor <noreply@example.com>".into(),
        sms_urls: vec![format!("{http}/sms")],
        sms_token: Some("sms-token".into()),
        sms_from: "+15550000".into(),
        slack_webhook: None,
        webhook_secret: Some(SECRET.into()),
        max_attempts: 3,
        backoff: vec![Duration::ZERO],
        rate_limit,
        outbound,
        ..NotifyConfig::default()
    };
    let (cv, stop, worker) = start(&s, config, 8);
    Env { cv, http, inbox, mails, stop, worker, _store: s }
}

/// The notifications with `config` on `s`, worked by `executors` workers until `stop`.
pub(crate) fn start(
    s: &Store,
    config: NotifyConfig,
    executors: usize,
) -> (Conveyor, CancellationToken, tokio::task::JoinHandle<conveyor_core::worker::WorkerReport>) {
    // As `conveyor serve` sees the store: through `Lanes` (telemetry and trace context).
    let backend = conveyor_core::lane::Lanes::wrap(s.backend.clone());
    let mut registry = Registry::new();
    notify::register(&mut registry, backend.clone(), config).unwrap();
    let cv = Conveyor::new(backend, registry);
    let stop = CancellationToken::new();
    let sup = SupervisorConfig::new("notify", QUEUES.iter().map(|q| q.to_string()).collect(), executors);
    let wc = WorkerConfig { supervisors: vec![sup], poll_interval: Duration::from_millis(20), ..WorkerConfig::default() };
    let worker = tokio::spawn(worker::run(cv.clone(), wc, stop.clone()));
    (cv, stop, worker)
}

impl Env {
    pub(crate) async fn logs(&self, f: LogFilter) -> Vec<LogEntry> {
        model::logs(self.cv.backend().as_ref(), f, Page::new(1, 1000)).await.unwrap().items
    }

    pub(crate) async fn settled(&self) -> bool {
        let qs = self.cv.backend().queues().await.unwrap();
        qs.iter().filter(|q| q.queue.starts_with("notify")).all(|q| q.pending + q.reserved + q.delayed == 0)
            && self.logs(LogFilter { status: Some("pending".into()), ..Default::default() }).await.is_empty()
    }

    pub(crate) async fn wait_settled(&self) {
        wait_for("every notification settled", Duration::from_secs(30), || self.settled()).await;
    }

    pub(crate) async fn stop(self) {
        self.stop.cancel();
        self.worker.await.unwrap();
    }

    pub(crate) async fn template(&self, name: &str, channel: &str, subject: Option<&str>, body: &str) -> i64 {
        let t = model::save(
            self.cv.backend().as_ref(),
            Kind::Templates,
            None,
            &json!({ "name": name, "channel": channel, "subject": subject, "body": body }),
            &loopback_allowed(),
        )
        .await
        .unwrap();
        t["id"].as_i64().unwrap()
    }

    pub(crate) async fn rule(&self, body: Value) -> Value {
        model::save(self.cv.backend().as_ref(), Kind::Rules, None, &body, &loopback_allowed()).await.unwrap()
    }

    pub(crate) async fn user(&self, name: &str, extra: Value) -> i64 {
        let mut body = json!({ "name": name, "email": format!("{}@example.com", name.to_lowercase()) });
        body.as_object_mut().unwrap().extend(extra.as_object().cloned().unwrap_or_default());
        notify::register_user(&self.cv, &body, &loopback_allowed()).await.unwrap().user_id
    }
}

pub(crate) async fn registration_sends_the_welcome_email_and_an_inbox_message(s: Store) {
    let e = env(s, RateLimit::per(5, Duration::from_secs(60))).await;
    // Registered in a trace (a request's traceparent): the mail carries it on.
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let (ada, policy) = (json!({ "name": "Ada", "email": "ada@example.com" }), Policy::default());
    let r = trace::in_context(trace::TraceContext::parse(tp), notify::register_user(&e.cv, &ada, &policy)).await.unwrap();
    let (user, event) = (r.user_id, r.event_id);
    assert_eq!(r.webhook_secret, None, "no webhook, no secret");
    e.wait_settled().await;
    let mails = e.mails.lock().unwrap().clone();
    assert_eq!(mails.len(), 1, "one welcome email: {mails:?}");
    assert!(mails[0].contains(&format!("traceparent: {tp}")), "the mail is in the registration's trace: {}", mails[0]);
    assert!(mails[0].contains("Subject: Welcome, Ada!"), "{}", mails[0]);
    assert!(mails[0].contains("To: ada@example.com"), "{}", mails[0]);
    assert!(mails[0].contains("Hi Ada,"), "the text part: {}", mails[0]);
    let (inbox, unread) = model::inbox(e.cv.backend().as_ref(), user, Page::default()).await.unwrap();
    assert_eq!((inbox.items.len(), unread), (1, 1));
    assert_eq!(inbox.items[0].title, "Welcome, Ada!");
    model::mark_read(e.cv.backend().as_ref(), user, &inbox.items[0].id).await.unwrap();
    assert_eq!(model::inbox(e.cv.backend().as_ref(), user, Page::default()).await.unwrap().1, 0, "read");
    let logs = e.logs(LogFilter { user_id: Some(user), ..Default::default() }).await;
    let mut channels: Vec<&str> = logs.iter().map(|l| l.channel.as_str()).collect();
    channels.sort_unstable();
    assert_eq!(channels, ["database", "email"]);
    assert!(logs.iter().all(|l| l.status == "sent" && l.event_id == event && l.attempts == 1), "{logs:?}");
    // The same registration event again (its default key): nothing new.
    let again = notify::ingest(&e.cv, "user_registered", json!({ "user_id": user, "name": "Ada", "email": "ada@example.com" }), None)
        .await
        .unwrap();
    assert_eq!((again.event_id.as_str(), again.duplicate), (event.as_str(), true));
    // A taken email is refused.
    assert!(matches!(
        notify::register_user(&e.cv, &json!({ "name": "Ada 2", "email": "ADA@example.com" }), &Policy::default()).await,
        Err(model::ModelError::Conflict(_))
    ));
    e.stop().await;
}

pub(crate) async fn slack_webhook_and_sms_reach_their_receivers_with_conditions_and_signature(s: Store) {
    let e = env(s, RateLimit::per(100, Duration::from_secs(60))).await;
    let user = e.user("Bob", json!({ "phone": "+15551234" })).await;
    let slack = e.template("shipped-slack", "slack", None, "Order {{ order.id }} shipped to {{ order.city }}").await;
    let hook = e.template("shipped-hook", "webhook", None, "order {{ order.id }}").await;
    let sms = e.template("shipped-sms", "sms", None, "Hi {{ user.name }}, order {{ order.id }} is on its way").await;
    let big = json!([{ "path": "order.total", "op": "gte", "value": 100 }]);
    e.rule(json!({ "event": "order_shipped", "template_id": slack, "channel": "slack", "recipient": format!("{}/slack", e.http), "conditions": big })).await;
    let hook_rule = e
        .rule(json!({ "event": "order_shipped", "template_id": hook, "channel": "webhook", "recipient": format!("{}/hook", e.http),
                   "conditions": [{ "path": "order.city", "op": "in", "value": ["Paris", "Lyon"] }] }))
        .await;
    let hook_secret = hook_rule["secret"].as_str().expect("a webhook rule is created with its secret").to_string();
    assert!(hook_secret.starts_with("whsec_"));
    let shown = model::get(e.cv.backend().as_ref(), Kind::Rules, hook_rule["id"].as_i64().unwrap()).await.unwrap();
    assert!(shown.get("secret").is_none(), "never in a get: {shown}");
    e.rule(json!({ "event": "order_shipped", "template_id": sms, "channel": "sms" })).await;
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let a1 = json!({ "user_id": user, "order": { "id": "A1", "total": 150, "city": "Paris" } });
    let first = trace::in_context(trace::TraceContext::parse(tp), notify::ingest(&e.cv, "order_shipped", a1, None)).await.unwrap();
    // Below the Slack threshold and outside the webhook's cities: only the SMS.
    notify::ingest(&e.cv, "order_shipped", json!({ "user_id": user, "order": { "id": "A2", "total": 20, "city": "Oslo" } }), None)
        .await
        .unwrap();
    e.wait_settled().await;
    let reqs = e.inbox.lock().unwrap().requests.clone();
    let of = |p: &str| reqs.iter().filter(|r| r.0 == p).cloned().collect::<Vec<_>>();
    let slack_msgs = of("slack");
    assert_eq!(slack_msgs.len(), 1, "{reqs:?}");
    assert_eq!(serde_json::from_str::<Value>(&slack_msgs[0].2).unwrap(), json!({ "text": "Order A1 shipped to Paris" }));
    let hooks = of("hook");
    assert_eq!(hooks.len(), 1);
    let (headers, body) = (&hooks[0].1, &hooks[0].2);
    let now = jiff::Timestamp::now().as_second();
    let header_map: axum::http::HeaderMap = headers
        .iter()
        .map(|(k, v)| (k.parse::<axum::http::HeaderName>().unwrap(), v.parse::<axum::http::HeaderValue>().unwrap()))
        .collect();
    assert!(verify(&hook_secret, &header_map, body.as_bytes(), now, 300), "the receiver verifies the signature: {headers:?}");
    assert!(!verify(&conveyor_apps::notify::secrets::generate(), &header_map, body.as_bytes(), now, 300));
    // The old header, with the legacy secret, for one release.
    assert!(verify_legacy(SECRET, &headers["x-conveyor-signature"], body.as_bytes(), now, 300));
    assert!(!verify_legacy("wrong", &headers["x-conveyor-signature"], body.as_bytes(), now, 300));
    let hook: Value = serde_json::from_str(body).unwrap();
    assert_eq!(
        (hook["event"].as_str(), hook["event_id"].as_str(), hook["message"].as_str()),
        (Some("order_shipped"), Some(first.event_id.as_str()), Some("order A1"))
    );
    assert_eq!(hook["payload"]["order"]["city"], "Paris");
    assert!(hook["notification_id"].is_string());
    assert_eq!(headers["webhook-id"], hook["notification_id"].as_str().unwrap_or_default(), "the id is the notification's: {headers:?}");
    // The event was published in a trace: each call made for it passes the trace on; the
    // second event was in none.
    assert_eq!(headers.get("traceparent").map(String::as_str), Some(tp), "{headers:?}");
    assert_eq!(slack_msgs[0].1.get("traceparent").map(String::as_str), Some(tp));
    let texts = of("sms/Messages");
    assert_eq!(texts.len(), 2);
    assert_eq!(texts[0].1["authorization"], "Bearer sms-token");
    let traced: Vec<bool> = texts.iter().map(|t| t.1.get("traceparent").map(String::as_str) == Some(tp)).collect();
    assert_eq!(traced.iter().filter(|t| **t).count(), 1, "one text in the trace, one in none: {texts:?}");
    let forms: Vec<String> = texts.iter().map(|t| t.2.clone()).collect();
    assert!(
        forms.iter().any(|f| f.contains("To=%2B15551234") && f.contains("From=%2B15550000") && f.contains("order+A1+is+on+its+way")),
        "{forms:?}"
    );
    let sms_logs = e.logs(LogFilter { channel: Some("sms".into()), ..Default::default() }).await;
    assert!(sms_logs.iter().all(|l| l.status == "sent" && l.provider_id.as_deref().is_some_and(|p| p.starts_with("SM"))), "{sms_logs:?}");
    e.stop().await;
}

pub(crate) async fn preferences_and_the_rate_limit_hold_back_notifications(s: Store) {
    let e = env(s, RateLimit::per(5, Duration::from_secs(3600))).await;
    let quiet = e.user("Cleo", json!({})).await;
    let busy = e.user("Dan", json!({})).await;
    e.wait_settled().await;
    let db = e.template("ping", "database", Some("Ping"), "ping {{ n }}").await;
    let mail = e.template("ping-mail", "email", Some("Ping {{ n }}"), "ping {{ n }}").await;
    e.rule(json!({ "event": "ping", "template_id": db, "channel": "database" })).await;
    e.rule(json!({ "event": "ping", "template_id": mail, "channel": "email" })).await;
    model::set_preferences(
        e.cv.backend().as_ref(),
        quiet,
        &json!({ "channels": { "email": false }, "events": { "ping": { "database": false } } }),
    )
    .await
    .unwrap();
    let prefs = model::preferences(e.cv.backend().as_ref(), quiet).await.unwrap();
    assert_eq!((prefs["channels"]["email"].as_bool(), prefs["channels"]["sms"].as_bool()), (Some(false), Some(true)));
    assert_eq!(prefs["events"]["ping"]["database"], false);
    notify::ingest(&e.cv, "ping", json!({ "user_id": quiet, "n": 0 }), None).await.unwrap();
    // Dan: 8 events × 2 channels = 16 notifications against a limit of 5 (the welcome pair
    // already took 2): exactly 3 more get through.
    for n in 0..8 {
        notify::ingest(&e.cv, "ping", json!({ "user_id": busy, "n": n }), None).await.unwrap();
    }
    e.wait_settled().await;
    let q = e.logs(LogFilter { user_id: Some(quiet), event: Some("ping".into()), ..Default::default() }).await;
    assert_eq!(q.len(), 2);
    assert!(q.iter().all(|l| l.status == "skipped"), "{q:?}");
    let d = e.logs(LogFilter { user_id: Some(busy), ..Default::default() }).await;
    let sent = d.iter().filter(|l| l.status == "sent").count();
    let limited = d.iter().filter(|l| l.status == "rate_limited").count();
    assert_eq!((sent, limited, d.len()), (5, 13, 18), "exactly the limit gets through: {d:?}");
    e.stop().await;
}

pub(crate) async fn fifty_concurrent_duplicates_notify_once(s: Store) {
    let e = env(s, RateLimit::per(100, Duration::from_secs(60))).await;
    let user = e.user("Eve", json!({})).await;
    let t = e.template("dup", "database", Some("Dup"), "once").await;
    e.rule(json!({ "event": "dup", "template_id": t, "channel": "database" })).await;
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let cv = e.cv.clone();
            tokio::spawn(async move { notify::ingest(&cv, "dup", json!({ "user_id": user }), Some("the-key".into())).await.unwrap() })
        })
        .collect();
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let firsts: Vec<_> = results.iter().filter(|r| !r.duplicate).collect();
    assert_eq!(firsts.len(), 1, "one original");
    assert!(results.iter().all(|r| r.event_id == firsts[0].event_id), "every answer names the original");
    e.wait_settled().await;
    let logs = e.logs(LogFilter { event: Some("dup".into()), ..Default::default() }).await;
    assert_eq!(logs.len(), 1, "{logs:?}");
    let (inbox, _) = model::inbox(e.cv.backend().as_ref(), user, Page::default()).await.unwrap();
    assert_eq!(inbox.items.iter().filter(|i| i.body == "once").count(), 1);
    e.stop().await;
}

pub(crate) async fn a_failing_provider_is_retried_then_failed_with_its_error(s: Store) {
    let e = env(s, RateLimit::per(100, Duration::from_secs(60))).await;
    e.inbox.lock().unwrap().fail.insert("down".into(), 100);
    e.inbox.lock().unwrap().fail.insert("flaky".into(), 2);
    let t = e.template("hook", "webhook", None, "hello").await;
    e.rule(json!({ "event": "down", "template_id": t, "channel": "webhook", "recipient": format!("{}/down", e.http) })).await;
    e.rule(json!({ "event": "flaky", "template_id": t, "channel": "webhook", "recipient": format!("{}/flaky", e.http) })).await;
    e.rule(json!({ "event": "gone", "template_id": t, "channel": "webhook", "recipient": format!("{}/nowhere-404", e.http) })).await;
    notify::ingest(&e.cv, "down", json!({}), None).await.unwrap();
    notify::ingest(&e.cv, "flaky", json!({}), None).await.unwrap();
    e.wait_settled().await;
    let down = e.logs(LogFilter { event: Some("down".into()), ..Default::default() }).await;
    assert_eq!(down.len(), 1);
    assert_eq!((down[0].status.as_str(), down[0].attempts), ("failed", 3), "{down:?}");
    assert!(down[0].error.as_deref().unwrap_or_default().contains("HTTP 500: provider down"), "{down:?}");
    let failed = e.cv.backend().failed(Some("notify.webhook"), Page::default()).await.unwrap();
    assert_eq!(failed.total, 1, "a retryable failed job");
    assert!(failed.items[0].error.contains("provider down"));
    let flaky = e.logs(LogFilter { event: Some("flaky".into()), ..Default::default() }).await;
    assert_eq!((flaky.len(), flaky[0].status.as_str(), flaky[0].attempts), (1, "sent", 3), "{flaky:?}");
    let hits = e.inbox.lock().unwrap().requests.iter().filter(|r| r.0 == "flaky").count();
    assert_eq!(hits, 3, "two failures, then one delivery");
    e.stop().await;
}

pub(crate) async fn rules_and_templates_are_validated_and_previewed(s: Store) {
    let e = env(s, RateLimit::per(5, Duration::from_secs(60))).await;
    let b = e.cv.backend().as_ref();
    let t = e.template("greet", "email", Some("Hi {{ customer.name }}"), "Total {{ total }}").await;
    let p = model::preview(b, t, &json!({ "customer": { "name": "Zoe" }, "total": 3 })).await.unwrap();
    assert_eq!(p, json!({ "subject": "Hi Zoe", "body": "Total 3" }));
    let err = model::preview(b, t, &json!({ "total": 3 })).await.unwrap_err().to_string();
    assert!(err.contains("customer.name"), "names the missing variable: {err}");
    let missing = model::save(b, Kind::Rules, None, &json!({ "event": "x", "template_id": 999, "channel": "email" }), &Policy::default())
        .await
        .unwrap_err();
    assert!(matches!(&missing, model::ModelError::Invalid { field, .. } if field == "template_id"), "{missing:?}");
    let wrong = model::save(b, Kind::Rules, None, &json!({ "event": "x", "template_id": t, "channel": "sms" }), &Policy::default())
        .await
        .unwrap_err();
    assert!(matches!(&wrong, model::ModelError::Invalid { field, .. } if field == "channel"), "{wrong:?}");
    let bad_op = model::save(
        b,
        Kind::Rules,
        None,
        &json!({ "event": "x", "template_id": t, "channel": "email", "conditions": [{ "path": "a", "op": "near", "value": 1 }] }),
        &Policy::default(),
    )
    .await
    .unwrap_err();
    assert!(matches!(&bad_op, model::ModelError::Invalid { field, .. } if field == "conditions[0].op"), "{bad_op:?}");
    let bad_template =
        model::save(b, Kind::Templates, None, &json!({ "name": "x", "channel": "email", "body": "{{ oops" }), &Policy::default())
            .await
            .unwrap_err();
    assert!(matches!(&bad_template, model::ModelError::Invalid { field, .. } if field == "body"), "{bad_template:?}");
    assert!(matches!(model::delete(b, Kind::Templates, 1).await, Err(model::ModelError::Conflict(_))), "the welcome rule uses template 1");
    // A source's schema validates payloads, naming the field.
    model::save(
        b,
        Kind::Sources,
        None,
        &json!({ "name": "paid", "schema": { "type": "object", "required": ["amount"], "properties": { "amount": { "type": "number" } } } }),
        &Policy::default(),
    )
    .await
        .unwrap();
    let err = notify::ingest(&e.cv, "paid", json!({ "amount": "ten" }), None).await.unwrap_err().to_string();
    assert_eq!(err, "payload.amount: must be number");
    assert!(notify::ingest(&e.cv, "paid", json!({ "amount": 10 }), None).await.is_ok());
    // A template whose variable the event lacks: a failed log saying which, nothing sent.
    let u = e.user("Finn", json!({})).await;
    let needy = e.template("needy", "database", Some("x"), "{{ missing_thing }}").await;
    e.rule(json!({ "event": "needy", "template_id": needy, "channel": "database" })).await;
    notify::ingest(&e.cv, "needy", json!({ "user_id": u }), None).await.unwrap();
    e.wait_settled().await;
    let logs = e.logs(LogFilter { event: Some("needy".into()), ..Default::default() }).await;
    assert_eq!(logs[0].status, "failed");
    assert!(logs[0].error.as_deref().unwrap_or_default().contains("missing_thing"), "{logs:?}");
    e.stop().await;
}

pub(crate) async fn digests_delays_and_quiet_hours_defer_without_dropping(s: Store) {
    let e = env(s, RateLimit::per(100, Duration::from_secs(60))).await;
    let b = e.cv.backend().clone();
    let user = e.user("Gus", json!({})).await;
    e.wait_settled().await;
    // A digest per thread over a 3-second window.
    let t = e
        .template(
            "thread-digest",
            "database",
            Some("{{ count }} new in {{ digest_key }}"),
            "{% for e in events %}{{ e.text }};{% endfor %}",
        )
        .await;
    e.rule(json!({ "event": "comment", "template_id": t, "channel": "database", "digest": { "window": 3, "key": "{{ thread }}" } })).await;
    for (thread, text) in [("A", "a1"), ("B", "b1"), ("A", "a2"), ("A", "a3"), ("B", "b2")] {
        notify::ingest(&e.cv, "comment", json!({ "user_id": user, "thread": thread, "text": text }), None).await.unwrap();
    }
    wait_for("two digests", Duration::from_secs(15), || async {
        model::inbox(b.as_ref(), user, Page::default()).await.unwrap().0.items.iter().filter(|i| i.title.contains(" new in ")).count() == 2
    })
    .await;
    let (inbox, _) = model::inbox(b.as_ref(), user, Page::default()).await.unwrap();
    let mut digests: Vec<(String, String)> =
        inbox.items.iter().filter(|i| i.title.contains(" new in ")).map(|i| (i.title.clone(), i.body.clone())).collect();
    digests.sort();
    assert_eq!(
        digests,
        [("2 new in B".to_string(), "b1;b2;".to_string()), ("3 new in A".to_string(), "a1;a2;a3;".to_string())],
        "one message per key, nothing mixed or repeated"
    );

    // A delayed rule: the delivery waits.
    let late = e.template("late", "database", Some("Later"), "later").await;
    e.rule(json!({ "event": "later", "template_id": late, "channel": "database", "delay": 3600 })).await;
    notify::ingest(&e.cv, "later", json!({ "user_id": user }), None).await.unwrap();
    // Quiet hours around now (UTC), for another user: deferred to their end.
    let quinn = e.user("Quinn", json!({})).await;
    wait_for("Quinn's welcome messages", Duration::from_secs(15), || async {
        e.logs(LogFilter { user_id: Some(quinn), status: Some("sent".into()), ..Default::default() }).await.len() == 2
    })
    .await;
    let (now, hour) = (jiff::Timestamp::now(), jiff::SignedDuration::from_hours(1));
    let (start, end) = ((now - hour).strftime("%H:%M").to_string(), (now + 2 * hour).strftime("%H:%M").to_string());
    model::set_preferences(b.as_ref(), quinn, &json!({ "timezone": "UTC", "quiet_hours": { "start": start, "end": end } })).await.unwrap();
    let hush = e.template("hush", "database", Some("Hush"), "hush").await;
    e.rule(json!({ "event": "hush", "template_id": hush, "channel": "database" })).await;
    notify::ingest(&e.cv, "hush", json!({ "user_id": quinn }), None).await.unwrap();
    wait_for("both deliveries scheduled", Duration::from_secs(15), || async {
        let q = b.queues().await.unwrap();
        q.iter().find(|q| q.queue == "notify.database").is_some_and(|q| q.delayed == 2)
            && q.iter().find(|q| q.queue == "notify").is_some_and(|q| q.pending + q.reserved == 0)
    })
    .await;
    let delayed = b
        .jobs(
            conveyor_core::backend::JobFilter {
                queue: Some("notify.database".into()),
                state: Some(conveyor_core::job::JobState::Delayed),
                ..Default::default()
            },
            Page::default(),
        )
        .await
        .unwrap();
    let mut waits: Vec<i64> = delayed.items.iter().map(|j| j.available_at.unwrap() - conveyor_core::clock::now_ms()).collect();
    waits.sort_unstable();
    let minutes: Vec<i64> = waits.iter().map(|w| w / 60_000).collect();
    assert!((58..=60).contains(&minutes[0]), "the rule's delay is an hour: {minutes:?}");
    assert!((117..=120).contains(&minutes[1]), "quiet hours end in two hours (to the minute): {minutes:?}");
    let pending = e.logs(LogFilter { status: Some("pending".into()), ..Default::default() }).await;
    let mut who: Vec<Option<i64>> = pending.iter().map(|l| l.user_id).collect();
    who.sort_unstable();
    assert_eq!(who, [Some(user), Some(quinn)], "deferred, not dropped: {pending:?}");
    e.stop.cancel();
    e.worker.await.unwrap();
}

/// A template that would loop without bound (saved before templates were checked, or looping
/// over a payload's data) is a failed notification naming the limit, recorded at once; the
/// other rules of the event still notify.
pub(crate) async fn a_hostile_template_is_a_recorded_failure_not_a_hang(s: Store) {
    let e = env(s, RateLimit::per(100, Duration::from_secs(60))).await;
    let user = e.user("Cy", json!({})).await;
    let nested = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}";
    let hostile = e.template("hostile", "database", Some("loop"), nested).await;
    let fine = e.template("fine", "database", Some("ok"), "hello {{ user.name }}").await;
    e.rule(json!({ "event": "hostile_event", "template_id": hostile, "channel": "database" })).await;
    e.rule(json!({ "event": "hostile_event", "template_id": fine, "channel": "database" })).await;
    let started = std::time::Instant::now();
    notify::ingest(&e.cv, "hostile_event", json!({ "user_id": user }), None).await.unwrap();
    e.wait_settled().await;
    let logs = e.logs(LogFilter { event: Some("hostile_event".into()), ..Default::default() }).await;
    let mut statuses: Vec<(&str, Option<&str>)> = logs.iter().map(|l| (l.status.as_str(), l.error.as_deref())).collect();
    statuses.sort();
    assert_eq!(statuses.len(), 2, "{logs:?}");
    assert_eq!(statuses[0].0, "failed");
    assert!(statuses[0].1.unwrap().contains("too much work"), "{statuses:?}");
    assert_eq!(statuses[1], ("sent", None));
    assert!(started.elapsed() < Duration::from_secs(10), "settled in {:?}", started.elapsed());
    // Too long a body is refused when the template is saved, naming the field.
    let long = "x".repeat(64 * 1024 + 1);
    let refused = model::save(
        e.cv.backend().as_ref(),
        Kind::Templates,
        None,
        &json!({ "name": "long", "channel": "sms", "body": long }),
        &Policy::default(),
    )
    .await;
    assert!(matches!(&refused, Err(model::ModelError::Invalid { field, .. }) if field == "body"), "{refused:?}");
    e.stop().await;
}
