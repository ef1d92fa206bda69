//! Locks ([`conveyor_core::lock`]) and job middleware ([`conveyor_core::middleware`]):
//! without-overlapping, retry-on, timeouts, and how middleware that stops a job (releasing it)
//! interacts with a breaker earlier in the chain.

use std::collections::HashMap;
use std::sync::Mutex;

use conveyor_core::breaker::{Breaker, BreakerConfig};
use conveyor_core::lock;
use conveyor_core::middleware::Middleware;
use conveyor_core::ratelimit::{RateLimit, RateLimiter};
use conveyor_core::registry::{JobError, Registry};
use conveyor_core::worker::WorkerReport;

use super::runtime::{all_in_state, config, register, start, Seen};
use super::support::*;
use super::*;

pub async fn locks_have_one_owner_extend_and_expire(b: Backend) {
    let key = unique_name("lock");
    let (a, o) = ("owner-a", "owner-b");
    let t0 = Instant::now();
    assert!(lock::acquire(b.as_ref(), &key, a, Duration::from_millis(600)).await.unwrap(), "a free lock");
    assert!(!lock::acquire(b.as_ref(), &key, o, Duration::from_millis(600)).await.unwrap(), "a lock held by another owner");
    // Not synchronization: part of the first TTL passes before the holder extends it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(lock::acquire(b.as_ref(), &key, a, Duration::from_secs(5)).await.unwrap(), "the holder takes its lock again");
    assert!(!lock::release(b.as_ref(), &key, o).await.unwrap(), "another owner cannot release it");
    tokio::time::sleep_until((t0 + Duration::from_millis(800)).into()).await;
    assert!(!lock::acquire(b.as_ref(), &key, o, Duration::from_millis(600)).await.unwrap(), "the extension holds past the first TTL");
    assert!(lock::release(b.as_ref(), &key, a).await.unwrap(), "the holder releases it");
    assert!(!lock::release(b.as_ref(), &key, a).await.unwrap(), "released once");
    let taken = Instant::now();
    assert!(lock::acquire(b.as_ref(), &key, o, Duration::from_millis(300)).await.unwrap(), "a released lock is free");
    assert!(!lock::acquire(b.as_ref(), &key, a, Duration::from_millis(300)).await.unwrap());

    // Its holder dies: the lock frees itself when it expires.
    wait_until("the expired lock is taken by another owner", Duration::from_secs(5), || async {
        lock::acquire(b.as_ref(), &key, a, Duration::from_secs(10)).await.unwrap()
    })
    .await;
    assert!(taken.elapsed() >= Duration::from_millis(250), "a 300 ms lock was taken over after {:?}", taken.elapsed());
    assert!(lock::acquire(b.as_ref(), &unique_name("lock"), o, Duration::from_secs(1)).await.unwrap(), "keys are independent");
}

pub async fn without_overlapping_runs_one_job_per_key_at_a_time(b: Backend) {
    const KIND: &str = "conformance.mw.exclusive";
    let q = queue_name();
    // key → (running now, most running at once); then running now and most at once of any key.
    type Running = (HashMap<String, (usize, usize)>, usize, usize);
    let running: Arc<Mutex<Running>> = Arc::default();
    let seen = Seen::default();
    let mut registry = Registry::new();
    {
        let running = running.clone();
        register(&mut registry, KIND, &seen, move |p, _ctx| {
            let running = running.clone();
            async move {
                let key = p["key"].as_str().unwrap_or_default().to_string();
                {
                    let mut r = running.lock().unwrap();
                    let e = r.0.entry(key.clone()).or_default();
                    e.0 += 1;
                    e.1 = e.1.max(e.0);
                    r.1 += 1;
                    r.2 = r.2.max(r.1);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                let mut r = running.lock().unwrap();
                r.0.get_mut(&key).unwrap().0 -= 1;
                r.1 -= 1;
                Ok(())
            }
        });
    }
    registry.middleware(
        KIND,
        Middleware::without_overlapping(
            |p| p["key"].as_str().unwrap_or_default().to_string(),
            Duration::from_secs(30),
            Duration::from_millis(50),
        ),
    );
    let mut ids = Vec::new();
    for key in ["a", "a", "a", "b", "b"] {
        ids.push(enqueue_one(&b, NewJob::new(KIND, &json!({ "key": key })).queue(&q).max_attempts(1)).await);
    }
    let w = start(&b, registry, config(&q, 5, Duration::from_secs(5)));
    // The lock (30 s) is released when each job ends, or this would take minutes.
    wait_until("every job completed", Duration::from_secs(10), || async { all_in_state(&b, &ids, JobState::Completed).await }).await;
    let report = w.stop().await;
    let (per_key, _, most) = running.lock().unwrap().clone();
    assert_eq!(per_key["a"].1, 1, "jobs with key a overlapped");
    assert_eq!(per_key["b"].1, 1, "jobs with key b overlapped");
    assert!(most >= 2, "jobs with different keys can run at once (most at once: {most})");
    for id in &ids {
        assert_eq!(seen.of(*id), vec![1], "each job ran once, and waiting for the lock consumed no attempt");
    }
    assert!(report.released >= 1, "jobs that found the lock taken were released: {report:?}");
    assert_eq!((report.completed, report.failed, report.retried), (5, 0, 0), "{report:?}");
}

pub async fn retry_on_retries_only_matching_errors(b: Backend) {
    const KIND: &str = "conformance.mw.retry_on";
    let q = queue_name();
    let seen = Seen::default();
    let mut registry = Registry::new();
    register(&mut registry, KIND, &seen, |p, ctx| async move {
        match p["mode"].as_str() {
            Some("permanent") => Err(JobError::retry("card number is invalid")),
            Some("permanent_after") => Err(JobError::retry_after("account closed", Duration::from_millis(10))),
            Some("transient") if ctx.attempt < 3 => Err(JobError::retry("upstream timeout")),
            Some("transient_after") if ctx.attempt < 2 => Err(JobError::retry_after("gateway timeout", Duration::from_millis(50))),
            _ => Ok(()),
        }
    });
    registry.middleware(KIND, Middleware::retry_on(|e| e.message.contains("timeout")));
    let job = |mode: &str| NewJob::new(KIND, &json!({ "mode": mode })).queue(&q).max_attempts(5).backoff(Backoff::fixed(Duration::ZERO));
    let permanent = enqueue_one(&b, job("permanent")).await;
    let permanent_after = enqueue_one(&b, job("permanent_after")).await;
    let transient = enqueue_one(&b, job("transient")).await;
    let transient_after = enqueue_one(&b, job("transient_after")).await;
    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("two jobs failed and two completed", Duration::from_secs(10), || async {
        all_in_state(&b, &[permanent, permanent_after], JobState::Failed).await
            && all_in_state(&b, &[transient, transient_after], JobState::Completed).await
    })
    .await;
    let report = w.stop().await;
    for (id, error) in [(permanent, "card number is invalid"), (permanent_after, "account closed")] {
        assert_eq!(seen.of(id), vec![1], "an error retry_on does not match is not retried");
        let failed = b.failed_job(id).await.unwrap().unwrap();
        assert_eq!((failed.attempts, failed.max_attempts), (1, 5), "{failed:?}");
        assert!(failed.error.contains(error), "{:?}", failed.error);
    }
    assert_eq!(seen.of(transient), vec![1, 2, 3], "a matching error is retried");
    assert_eq!(seen.of(transient_after), vec![1, 2]);
    assert_eq!(report, WorkerReport { completed: 2, retried: 3, failed: 2, released: 0 });
}

pub async fn timeout_middleware_applies_to_jobs_without_their_own(b: Backend) {
    const KIND: &str = "conformance.mw.slow";
    let q = queue_name();
    let seen = Seen::default();
    let mut registry = Registry::new();
    register(&mut registry, KIND, &seen, |p, _ctx| async move {
        tokio::time::sleep(Duration::from_millis(p["ms"].as_u64().unwrap_or(0))).await;
        Ok(())
    });
    registry.middleware(KIND, Middleware::timeout(Duration::from_millis(200)));
    let job = |ms: u64| NewJob::new(KIND, &json!({ "ms": ms })).queue(&q).max_attempts(1);
    let started = Instant::now();
    let stuck = enqueue_one(&b, job(5_000)).await;
    let own = enqueue_one(&b, job(500).timeout(Duration::from_secs(3))).await;
    let quick = enqueue_one(&b, job(10)).await;
    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("the stuck job timed out and the others completed", Duration::from_secs(4), || async {
        state_of(&b, stuck).await == Some(JobState::Failed) && all_in_state(&b, &[own, quick], JobState::Completed).await
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(4));
    w.stop().await;
    let failed = b.failed_job(stuck).await.unwrap().unwrap();
    assert!(failed.error.contains("timed out"), "{:?}", failed.error);
    assert_eq!(seen.of(own), vec![1], "the job's own timeout wins over the middleware's");
}

/// A job that a breaker let through but a later middleware stopped (rate limited, released) never
/// called the dependency: it is no verdict on it and must not count as a breaker call.
pub async fn jobs_released_after_the_breaker_are_not_breaker_calls(b: Backend) {
    const KIND: &str = "conformance.mw.guarded";
    let q = queue_name();
    let seen = Seen::default();
    let mut registry = Registry::new();
    register(&mut registry, KIND, &seen, |_, _| async { Ok(()) });
    let config_ =
        BreakerConfig { failure_rate: 0.5, min_calls: 4, window: Duration::from_secs(10), open_for: Duration::from_secs(1), probes: 1 };
    let br = Breaker::new(conveyor_of(&b, &registry), unique_name("breaker"), config_);
    let limiter = RateLimiter::new(b.clone(), unique_name("limiter"), RateLimit::per(1, Duration::from_secs(60)));
    registry.middleware(KIND, Middleware::breaker(br.clone()));
    registry.middleware(KIND, Middleware::rate_limit(limiter, |_| "partner".to_string()));
    let mut ids = Vec::new();
    for n in 0..4 {
        ids.push(enqueue_one(&b, new_job(&q, KIND, n)).await);
    }
    let w = start(&b, registry, config(&q, 1, Duration::from_secs(5)));
    // Released jobs are due again after a minute: 30 s leaves a slow machine room without
    // letting one come back.
    wait_until("one job ran and three were released", Duration::from_secs(30), || async {
        let s = stats(&b, &q).await;
        s.delayed == 3 && s.pending == 0 && s.reserved == 0
    })
    .await;
    let report = w.stop().await;
    assert_eq!(report, WorkerReport { completed: 1, retried: 0, failed: 0, released: 3 });
    assert_eq!(ids.iter().map(|id| seen.of(*id).len()).sum::<usize>(), 1, "one job ran");
    let info = br.info().await.unwrap();
    assert_eq!(info.calls, 1, "the breaker counts the one call made, not the three rate-limited jobs that made none: {info:?}");
}
