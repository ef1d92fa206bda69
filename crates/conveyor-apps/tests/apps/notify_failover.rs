//! Provider failover and circuit breakers in notification delivery: SMS gateways that fail
//! over in order, a dead gateway's breaker, and deliveries that wait unspent while every
//! provider is down.

use std::time::Duration;

use serde_json::json;
use tokio_util::sync::CancellationToken;

use conveyor_apps::notify::model::{self, Kind, LogEntry, LogFilter};
use conveyor_apps::notify::{self, NotifyConfig};
use conveyor_apps::outbound::Policy;
use conveyor_core::backend::Page;
use conveyor_core::ratelimit::RateLimit;
use conveyor_core::Conveyor;

use crate::receivers;
use crate::{wait_for, Store};

/// Notifications with SMS through `gateways` (paths on a receiver whose first `down` gateways
/// answer 500), a breaker opening after `min_calls`, and `executors` workers; a user with a
/// phone and a rule turning `text` events into SMS.
async fn sms_env(
    s: &Store,
    gateways: &[&str],
    down: usize,
    min_calls: u32,
    open_for: Duration,
    executors: usize,
) -> (Conveyor, receivers::Shared, CancellationToken, tokio::task::JoinHandle<conveyor_core::worker::WorkerReport>, i64) {
    let (http, inbox) = receivers::http().await;
    for g in &gateways[..down] {
        inbox.lock().unwrap().fail.insert(format!("{g}/Messages"), 1_000_000);
    }
    let config = NotifyConfig {
        sms_urls: gateways.iter().map(|g| format!("{http}/{g}")).collect(),
        max_attempts: 3,
        backoff: vec![Duration::ZERO],
        rate_limit: RateLimit::per(1_000, Duration::from_secs(60)),
        breaker: conveyor_core::breaker::BreakerConfig {
            failure_rate: 0.5,
            min_calls,
            window: Duration::from_secs(60),
            open_for,
            probes: 1,
        },
        ..NotifyConfig::default()
    };
    let (cv, stop, worker) = crate::notify::start(s, config, executors);
    let user = notify::register_user(&cv, &json!({ "name": "Hal", "email": "hal@example.com", "phone": "+15550101" }), &Policy::default())
        .await
        .unwrap()
        .user_id;
    let t = model::save(
        cv.backend().as_ref(),
        Kind::Templates,
        None,
        &json!({ "name": "s", "channel": "sms", "body": "n={{ n }}" }),
        &Policy::default(),
    )
    .await
    .unwrap();
    model::save(
        cv.backend().as_ref(),
        Kind::Rules,
        None,
        &json!({ "event": "text", "template_id": t["id"], "channel": "sms" }),
        &Policy::default(),
    )
    .await
    .unwrap();
    (cv, inbox, stop, worker, user)
}

async fn sms_logs(cv: &Conveyor) -> Vec<LogEntry> {
    model::logs(cv.backend().as_ref(), LogFilter { channel: Some("sms".into()), ..Default::default() }, Page::default())
        .await
        .unwrap()
        .items
}

pub(crate) async fn sms_fails_over_and_a_dead_gateways_breaker_opens(s: Store) {
    let (cv, inbox, stop, worker, user) = sms_env(&s, &["gw1", "gw2"], 1, 3, Duration::from_secs(60), 2).await;
    for n in 0..12 {
        notify::ingest(&cv, "text", json!({ "user_id": user, "n": n }), None).await.unwrap();
    }
    let logs = || sms_logs(&cv);
    wait_for("every SMS sent", Duration::from_secs(30), || async { logs().await.iter().filter(|l| l.status == "sent").count() == 12 })
        .await;
    stop.cancel();
    worker.await.unwrap();
    let reqs = inbox.lock().unwrap().requests.clone();
    let (gw1, gw2) = (reqs.iter().filter(|r| r.0 == "gw1/Messages").count(), reqs.iter().filter(|r| r.0 == "gw2/Messages").count());
    assert_eq!(gw2, 12, "the second gateway delivered everything");
    assert!((3..=5).contains(&gw1), "the dead gateway was tried until its breaker opened ({gw1} times), then skipped");
    assert!(
        logs().await.iter().all(|l| l.attempts == 1 && l.provider_id.as_deref().is_some_and(|p| p.starts_with("SM"))),
        "failover spent no attempt"
    );
    let breakers = conveyor_core::breaker::list(cv.backend().as_ref(), Duration::from_secs(60)).await.unwrap();
    let gw1_breaker = breakers.iter().find(|b| b.name == "notify:sms#1").expect("the first gateway's breaker");
    assert_eq!(gw1_breaker.state, "open");
    assert_eq!(breakers.iter().find(|b| b.name == "notify:sms#2").map(|b| b.state.as_str()), Some("closed"));
    drop(s);
}

pub(crate) async fn with_every_provider_down_deliveries_wait_without_spending_attempts(s: Store) {
    let (cv, inbox, stop, worker, user) = sms_env(&s, &["gw"], 1, 2, Duration::from_secs(2), 1).await;
    for n in 0..6 {
        notify::ingest(&cv, "text", json!({ "user_id": user, "n": n }), None).await.unwrap();
    }
    let logs = || sms_logs(&cv);
    wait_for("the breaker to hold deliveries back", Duration::from_secs(20), || async {
        logs().await.iter().any(|l| l.error.as_deref().is_some_and(|e| e.contains("circuit breaker is open")))
    })
    .await;
    // The gateway comes back: everything is delivered once the breaker lets a probe through,
    // and the waiting did not spend the deliveries' attempts.
    inbox.lock().unwrap().fail.clear();
    wait_for("every SMS sent after the outage", Duration::from_secs(30), || async { logs().await.iter().all(|l| l.status == "sent") })
        .await;
    stop.cancel();
    worker.await.unwrap();
    let all = sms_logs(&cv).await;
    assert_eq!(all.len(), 6);
    assert!(all.iter().all(|l| l.attempts <= 3), "{all:?}");
    assert!(all.iter().filter(|l| l.attempts == 1).count() >= 3, "most were held back rather than retried: {all:?}");
    assert_eq!(cv.backend().failed(None, Page::default()).await.unwrap().total, 0, "nothing failed for good");
    drop(s);
}
