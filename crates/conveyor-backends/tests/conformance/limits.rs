//! Rate limits ([`conveyor_core::ratelimit`]) and circuit breakers ([`conveyor_core::breaker`]),
//! directly and as job middleware: their state lives in the store, so concurrent callers (and
//! every process) see exact, shared decisions.

use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::Mutex;

use conveyor_core::backend::Page;
use conveyor_core::breaker::{self, Breaker, BreakerConfig, Permit};
use conveyor_core::clock::now_ms;
use conveyor_core::event;
use conveyor_core::middleware::Middleware;
use conveyor_core::ratelimit::{Decision, RateLimit, RateLimiter};
use conveyor_core::registry::{JobContext, JobError, Registry};
use conveyor_core::worker::WorkerReport;

use super::runtime::{all_in_state, config, start};
use super::support::*;
use super::*;

const MINUTE: Duration = Duration::from_secs(60);

pub async fn rate_limiter_admits_exactly_the_limit_under_concurrency(b: Backend) {
    let limiter = RateLimiter::new(b.clone(), unique_name("limiter"), RateLimit::per(5, MINUTE));
    assert_eq!(limiter.limit(), RateLimit { limit: 5, period: MINUTE, burst: 5 });
    let tasks: Vec<_> = (0..50)
        .map(|_| {
            let l = limiter.clone();
            tokio::spawn(async move { l.check("k1").await.expect("check") })
        })
        .collect();
    let mut decisions = Vec::new();
    for t in tasks {
        decisions.push(t.await.unwrap());
    }
    let allowed = decisions.iter().filter(|d| d.is_allowed()).count();
    assert_eq!(allowed, 5, "5 per minute admits exactly 5 of 50 concurrent checks: {decisions:?}");
    for d in &decisions {
        match d {
            Decision::Allowed { remaining } => assert!(*remaining < 5, "{d:?}"),
            Decision::Limited { retry_after } => {
                // The next unit frees up a fifth of the period after the first check.
                assert!(*retry_after > Duration::ZERO && *retry_after <= Duration::from_secs(13), "{d:?}");
            }
        }
    }
    assert!(!limiter.check("k1").await.unwrap().is_allowed(), "k1 is still limited");
    assert_eq!(limiter.check("k2").await.unwrap(), Decision::Allowed { remaining: 4 }, "another key has its own budget");
    let other = RateLimiter::new(b.clone(), unique_name("limiter"), RateLimit::per(5, MINUTE));
    assert!(other.check("k1").await.unwrap().is_allowed(), "another limiter has its own keys");

    // Several units at once (a job about to make several calls): all or none.
    let bulk = RateLimiter::new(b.clone(), unique_name("limiter"), RateLimit::per(6, MINUTE));
    assert_eq!(bulk.check_n("k", 4).await.unwrap(), Decision::Allowed { remaining: 2 });
    assert!(!bulk.check_n("k", 3).await.unwrap().is_allowed(), "4 + 3 units exceed 6");
    assert_eq!(bulk.check_n("k", 2).await.unwrap(), Decision::Allowed { remaining: 0 }, "the refused 3 took nothing");
    assert!(bulk.check_n("k", 7).await.is_err(), "more units than the burst can never pass");
    let narrow = RateLimiter::new(b.clone(), unique_name("limiter"), RateLimit::per(6, MINUTE).with_burst(1));
    assert!(narrow.check("k").await.unwrap().is_allowed());
    assert!(!narrow.check("k").await.unwrap().is_allowed(), "a burst of 1 spaces units by a sixth of a minute");

    // The budget comes back with time: 2 per 400 ms → one unit every 200 ms.
    let fast = RateLimiter::new(b.clone(), unique_name("limiter"), RateLimit::per(2, Duration::from_millis(400)));
    assert!(fast.check("k").await.unwrap().is_allowed());
    assert!(fast.check("k").await.unwrap().is_allowed());
    let third = fast.check("k").await.unwrap();
    let Decision::Limited { retry_after } = third else { panic!("the third of 2 per 400 ms: {third:?}") };
    assert!(retry_after <= Duration::from_millis(200), "{third:?}");
    tokio::time::sleep(retry_after + Duration::from_millis(20)).await;
    assert!(fast.check("k").await.unwrap().is_allowed(), "allowed again after retry_after");
}

pub async fn rate_limiter_clock_readings_out_of_order_keep_the_burst(b: Backend) {
    // Callers read their clocks before they reach the key, and reach it in any order: a reading
    // a little older than the one before must not be refused within the burst.
    let limiter = RateLimiter::new(b.clone(), unique_name("limiter"), RateLimit::per(5, 60 * MINUTE));
    let t0 = now_ms() * 1000;
    let readings = [t0, t0 - 900, t0 - 400, t0 - 2_000, t0 - 1];
    for (i, now) in readings.iter().enumerate() {
        let d = limiter.check_n_at("k", 1, *now).await.unwrap();
        assert!(d.is_allowed(), "check {} of the burst of 5, read at t0 - {} µs: {d:?}", i + 1, t0 - now);
    }
    match limiter.check_n_at("k", 1, t0 - 3_000).await.unwrap() {
        Decision::Limited { retry_after } => {
            assert!(retry_after > Duration::from_secs(11 * 60), "the next unit is a fifth of the hour away: {retry_after:?}")
        }
        d => panic!("the sixth check within the hour is refused: {d:?}"),
    }
}

pub async fn rate_limit_middleware_releases_jobs_over_the_limit(b: Backend) {
    const KIND: &str = "conformance.limits.api_call";
    let q = queue_name();
    let log = Log::default();
    let mut registry = Registry::new();
    {
        let log = log.clone();
        registry.register(KIND, move |p: Value, _ctx: JobContext| {
            log.push(p["user"].as_str().unwrap_or_default());
            async { Ok(()) }
        });
    }
    // Five an hour: a released job is due again only after 12 minutes, so however slow the
    // machine, no released job comes back while the test watches.
    let limiter = RateLimiter::new(b.clone(), unique_name("limiter"), RateLimit::per(5, 60 * MINUTE));
    registry.middleware(KIND, Middleware::rate_limit(limiter, |p| p["user"].as_str().unwrap_or_default().to_string()));
    let job = |user: &str| NewJob::new(KIND, &json!({ "user": user })).queue(&q).max_attempts(1);
    let mut a_ids = Vec::new();
    for _ in 0..20 {
        a_ids.push(enqueue_one(&b, job("alice")).await);
    }
    let mut b_ids = Vec::new();
    for _ in 0..5 {
        b_ids.push(enqueue_one(&b, job("bob")).await);
    }

    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("5 of alice's and 5 of bob's jobs ran, the rest were released", Duration::from_secs(30), || async {
        let s = stats(&b, &q).await;
        log.len() >= 10 && s.pending + s.delayed == 15 && s.reserved == 0
    })
    .await;
    let report = w.stop().await;
    assert_eq!((log.count("alice"), log.count("bob")), (5, 5), "runs per user: {:?}", log.all());
    assert!(all_in_state(&b, &b_ids, JobState::Completed).await, "bob has his own budget");
    let mut waiting = 0;
    // When each waiting job is due again, in seconds from now: ~720 for a job the limit
    // released; a job released for another reason (e.g. the limiter unavailable) shows here.
    let mut due_in = Vec::new();
    for id in &a_ids {
        let info = b.job(*id).await.unwrap().unwrap();
        match info.state {
            JobState::Completed => {}
            JobState::Delayed | JobState::Pending => {
                waiting += 1;
                assert_eq!(info.attempts, 0, "a job released by the rate limit keeps its attempts: {info:?}");
                due_in.push((info.available_at.unwrap_or(0) - now_ms()) / 1000);
            }
            other => panic!("alice's job {id} is {other:?}"),
        }
    }
    assert_eq!(waiting, 15);
    assert_eq!(report, WorkerReport { completed: 10, retried: 0, failed: 0, released: 15 }, "due again in (s): {due_in:?}");
    assert_counts(&b, &q, [0, 15, 0, 0], "alice's jobs wait for her budget").await;
}

fn breaker_config(open_for: Duration) -> BreakerConfig {
    BreakerConfig { failure_rate: 0.5, min_calls: 4, window: Duration::from_secs(10), open_for, probes: 1 }
}

/// The states `breaker` went through, from the event log, oldest first.
async fn breaker_events(b: &Backend, breaker: &str) -> Vec<String> {
    let mut all = Vec::new();
    for state in ["open", "half_open", "closed"] {
        let page = event::recent(b.as_ref(), Some(&format!("breaker.{state}")), Page::new(1, 500)).await.unwrap();
        for e in page.items.into_iter().filter(|e| e.payload["breaker"] == breaker) {
            assert_eq!(e.payload["state"], state, "{e:?}");
            all.push((e.created_at, e.id, state.to_string()));
        }
    }
    all.sort();
    all.into_iter().map(|(_, _, s)| s).collect()
}

async fn open_it(br: &Breaker) -> Instant {
    for _ in 0..4 {
        br.record(false).await.unwrap();
    }
    Instant::now()
}

#[track_caller]
fn assert_rejected(p: Permit, at_most: Duration) {
    match p {
        Permit::Rejected { retry_after } => assert!(retry_after > Duration::ZERO && retry_after <= at_most, "{p:?}"),
        Permit::Allowed => panic!("expected a rejection"),
    }
}

pub async fn breaker_opens_probes_and_closes(b: Backend) {
    let name = unique_name("breaker");
    let open_for = Duration::from_secs(1);
    let br = Breaker::new(conveyor_of(&b, &Registry::new()), &name, breaker_config(open_for));
    assert_eq!(br.allow().await.unwrap(), Permit::Allowed, "a new breaker is closed");
    assert_eq!(br.info().await.unwrap().state, "closed");

    // Below min_calls nothing opens, whatever the failure rate.
    for _ in 0..3 {
        br.record(false).await.unwrap();
    }
    let info = br.info().await.unwrap();
    assert_eq!((info.state.as_str(), info.calls, info.failure_rate), ("closed", 3, 1.0), "{info:?}");
    assert_eq!(br.allow().await.unwrap(), Permit::Allowed);
    br.record(false).await.unwrap();
    let opened = Instant::now();
    let info = br.info().await.unwrap();
    assert_eq!((info.state.as_str(), info.calls), ("open", 4), "{info:?}");
    assert!(info.opened_at.is_some());
    let permit = br.allow().await.unwrap();
    if opened.elapsed() < Duration::from_millis(900) {
        assert_rejected(permit, open_for);
    }
    assert!(breaker::list(b.as_ref(), Duration::from_secs(10)).await.unwrap().iter().any(|i| i.name == name), "listed");

    // After open_for, exactly one of many concurrent callers gets the probe.
    tokio::time::sleep_until((opened + open_for + Duration::from_millis(50)).into()).await;
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let br = br.clone();
            tokio::spawn(async move { br.allow().await.unwrap() })
        })
        .collect();
    let mut permits = Vec::new();
    for t in tasks {
        permits.push(t.await.unwrap());
    }
    assert_eq!(permits.iter().filter(|p| **p == Permit::Allowed).count(), 1, "one probe while half-open: {permits:?}");
    for p in permits.into_iter().filter(|p| *p != Permit::Allowed) {
        assert_rejected(p, open_for);
    }
    assert_eq!(br.info().await.unwrap().state, "half_open");
    assert_rejected(br.allow().await.unwrap(), open_for);

    // The probe succeeds: closed, with a fresh window.
    br.record(true).await.unwrap();
    let info = br.info().await.unwrap();
    assert_eq!((info.state.as_str(), info.calls, info.opened_at), ("closed", 0, None), "{info:?}");
    assert_eq!(br.allow().await.unwrap(), Permit::Allowed);

    // A failed probe opens it again.
    let opened = open_it(&br).await;
    assert_eq!(br.info().await.unwrap().state, "open");
    tokio::time::sleep_until((opened + open_for + Duration::from_millis(50)).into()).await;
    assert_eq!(br.allow().await.unwrap(), Permit::Allowed, "the probe");
    br.record(false).await.unwrap();
    let reopened = Instant::now();
    assert_eq!(br.info().await.unwrap().state, "open");
    let permit = br.allow().await.unwrap();
    if reopened.elapsed() < Duration::from_millis(900) {
        assert_rejected(permit, open_for);
    }

    // Every transition is in the event log (as breaker.<state>).
    assert_eq!(breaker_events(&b, &name).await, ["open", "half_open", "closed", "open", "half_open", "open"]);
}

/// A probe whose caller never reports (it crashed, or its job was released or cancelled at
/// shutdown) must not keep the breaker half-open, rejecting every call, forever.
pub async fn breaker_with_a_lost_probe_lets_another_probe_through(b: Backend) {
    let open_for = Duration::from_millis(500);
    let br = Breaker::new(conveyor_of(&b, &Registry::new()), unique_name("breaker"), breaker_config(open_for));
    let opened = open_it(&br).await;
    tokio::time::sleep_until((opened + open_for + Duration::from_millis(50)).into()).await;
    assert_eq!(br.allow().await.unwrap(), Permit::Allowed, "the probe (whose caller then dies without recording)");
    wait_until(
        "the breaker lets a call through again after its probe was lost (it stays half_open with its probe taken)",
        Duration::from_secs(5),
        || async { br.allow().await.unwrap() == Permit::Allowed },
    )
    .await;
}

pub async fn breaker_middleware_releases_jobs_while_open(b: Backend) {
    const KIND: &str = "conformance.limits.partner_call";
    const JOBS: usize = 8;
    let q = queue_name();
    let open_for = Duration::from_secs(1);
    let failing = Arc::new(AtomicBool::new(true));
    // (when the handler was called, whether it failed)
    let calls: Arc<Mutex<Vec<(i64, bool)>>> = Arc::default();
    let mut registry = Registry::new();
    {
        let (failing, calls) = (failing.clone(), calls.clone());
        registry.register(KIND, move |_: Value, _ctx: JobContext| {
            let fail = failing.load(SeqCst);
            calls.lock().unwrap().push((now_ms(), fail));
            async move {
                if fail {
                    return Err(JobError::retry("the partner API is down"));
                }
                Ok(())
            }
        });
    }
    let br = Breaker::new(conveyor_of(&b, &registry), unique_name("breaker"), breaker_config(open_for));
    registry.middleware(KIND, Middleware::breaker(br.clone()));
    let mut ids = Vec::new();
    for n in 0..JOBS as u64 {
        ids.push(enqueue_one(&b, new_job(&q, KIND, n).max_attempts(10).backoff(Backoff::fixed(Duration::ZERO))).await);
    }

    // One executor: each call's verdict is recorded before the next job asks the breaker.
    let w = start(&b, registry, config(&q, 1, Duration::from_secs(5)));
    wait_until("the breaker opened", Duration::from_secs(10), || async { br.info().await.unwrap().state == "open" }).await;
    let opened_at = br.info().await.unwrap().opened_at.expect("an open breaker has opened_at");
    assert_eq!(calls.lock().unwrap().len(), 4, "min_calls failures open the breaker: {:?}", calls.lock().unwrap());
    failing.store(false, SeqCst);
    wait_until("every job completed once the breaker closed", Duration::from_secs(10), || async {
        all_in_state(&b, &ids, JobState::Completed).await
    })
    .await;
    let report = w.stop().await;

    let calls = calls.lock().unwrap().clone();
    // The fourth failure may share the breaker's opening millisecond; every later call waits
    // for open_for.
    assert!(calls[..4].iter().all(|(t, _)| *t <= opened_at), "{calls:?}");
    let during_open: Vec<_> = calls[4..].iter().filter(|(t, _)| *t < opened_at + open_for.as_millis() as i64).collect();
    assert!(during_open.is_empty(), "the handler ran while the breaker was open (opened at {opened_at}): {during_open:?}");
    assert_eq!(calls.iter().filter(|(_, failed)| *failed).count(), 4, "{calls:?}");
    assert_eq!(calls.len(), 4 + JOBS, "each job succeeded once after the outage: {calls:?}");
    let mut attempts = 0;
    for id in &ids {
        assert!(b.failed_job(*id).await.unwrap().is_none(), "job {id} reached the failed store");
        attempts += b.job(*id).await.unwrap().unwrap().attempts;
    }
    assert_eq!(attempts as usize, 4 + JOBS, "only handler runs consume attempts; releases by the open breaker do not");
    assert!(report.released >= 1, "jobs were released while the breaker was open: {report:?}");
    assert_eq!((report.completed, report.retried, report.failed), (JOBS as u64, 4, 0), "{report:?}");
    assert_eq!(br.info().await.unwrap().state, "closed");
    assert_counts(&b, &q, [0, 0, 0, 0], "after the outage").await;
}
