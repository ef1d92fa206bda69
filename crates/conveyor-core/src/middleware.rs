//! Job middleware, composable per job kind and applied by the worker runtime in the order
//! given: rate limiting by key, circuit breakers, without-overlapping locks, retry only on
//! matching errors, and a default timeout.
//!
//! A job stopped by a rate limit, an open breaker or a held lock is *released* with the wait
//! time: it goes back to the queue without consuming an attempt.

use std::sync::Arc;
use std::time::Duration;

use crate::breaker::{Breaker, Permit};
use crate::clock::now_ms;
use crate::job::{Job, Outcome};
use crate::ratelimit::{Decision, RateLimiter};
use crate::registry::{ErrorAction, JobError, JobResult};
use crate::Conveyor;

/// Derives a key (a user, a partner, a resource) from a job's payload.
pub type KeyFn = Arc<dyn Fn(&serde_json::Value) -> String + Send + Sync>;

#[derive(Clone)]
pub enum Middleware {
    RateLimit { limiter: RateLimiter, key: KeyFn },
    Breaker(Breaker),
    WithoutOverlapping { key: KeyFn, expires: Duration, release_after: Duration },
    RetryOn(Arc<dyn Fn(&JobError) -> bool + Send + Sync>),
    Timeout(Duration),
}

impl Middleware {
    pub fn rate_limit(limiter: RateLimiter, key: impl Fn(&serde_json::Value) -> String + Send + Sync + 'static) -> Self {
        Middleware::RateLimit { limiter, key: Arc::new(key) }
    }
    pub fn breaker(breaker: Breaker) -> Self {
        Middleware::Breaker(breaker)
    }
    /// At most one job per key runs at a time; the lock expires after `expires` if its holder
    /// dies. A job that finds the lock taken is released for `release_after`.
    pub fn without_overlapping(
        key: impl Fn(&serde_json::Value) -> String + Send + Sync + 'static,
        expires: Duration,
        release_after: Duration,
    ) -> Self {
        Middleware::WithoutOverlapping { key: Arc::new(key), expires, release_after }
    }
    /// Retry only errors that match; any other error fails the job at once.
    pub fn retry_on(matches: impl Fn(&JobError) -> bool + Send + Sync + 'static) -> Self {
        Middleware::RetryOn(Arc::new(matches))
    }
    /// A timeout for jobs of this kind that set none themselves.
    pub fn timeout(t: Duration) -> Self {
        Middleware::Timeout(t)
    }
}

/// What `before` took and `after` must give back.
#[derive(Default)]
pub(crate) struct Guard {
    breakers: Vec<Breaker>,
    /// The without-overlapping lock held: (key, owner = the job's id).
    lock: Option<(String, String)>,
    pub(crate) timeout: Option<Duration>,
}

/// Runs the checks before a job; `Err(outcome)` means the job does not run now.
pub(crate) async fn before(conveyor: &Conveyor, job: &Job, chain: &[Middleware]) -> Result<Guard, Outcome> {
    let mut guard = Guard { timeout: job.timeout, ..Guard::default() };
    if chain.is_empty() {
        return Ok(guard);
    }
    let payload: serde_json::Value = serde_json::from_str(&job.payload).unwrap_or(serde_json::Value::Null);
    let release = |after: Duration| Outcome::Release { at: now_ms() + after.as_millis() as i64 };
    for mw in chain {
        match mw {
            Middleware::RateLimit { limiter, key } => match limiter.check(&key(&payload)).await {
                Ok(Decision::Allowed { .. }) => {}
                Ok(Decision::Limited { retry_after }) => {
                    tracing::debug!(retry_after_ms = retry_after.as_millis() as u64, "rate limited; released");
                    after(conveyor, guard, &not_run()).await;
                    return Err(release(retry_after));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "rate limiter unavailable; released");
                    after(conveyor, guard, &not_run()).await;
                    return Err(release(Duration::from_secs(1)));
                }
            },
            Middleware::Breaker(b) => match b.allow().await {
                Ok(Permit::Allowed) => guard.breakers.push(b.clone()),
                Ok(Permit::Rejected { retry_after }) => {
                    tracing::debug!(breaker = b.name(), "breaker open; released");
                    after(conveyor, guard, &not_run()).await;
                    return Err(release(retry_after));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "breaker unavailable; released");
                    after(conveyor, guard, &not_run()).await;
                    return Err(release(Duration::from_secs(1)));
                }
            },
            Middleware::WithoutOverlapping { key, expires, release_after } => {
                let k = format!("overlap:{}:{}", job.kind, key(&payload));
                let owner = job.id.to_string();
                match crate::lock::acquire(conveyor.backend().as_ref(), &k, &owner, *expires).await {
                    Ok(true) => guard.lock = Some((k, owner)),
                    Ok(false) | Err(_) => {
                        after(conveyor, guard, &not_run()).await;
                        return Err(release(*release_after));
                    }
                }
            }
            Middleware::Timeout(t) => guard.timeout = guard.timeout.or(Some(*t)),
            Middleware::RetryOn(_) => {}
        }
    }
    Ok(guard)
}

/// Why a job of `kind` that a middleware released may be waiting, as `(reason, detail)`: one of
/// its chain's breakers is open (`breaker_open`), else its chain has a rate limit
/// (`rate_limit`). `None` when its chain has neither. For `GET /api/jobs/{id}` (SPEC "Flow
/// control"): the release itself records no reason, so this reads the chain's state now.
pub async fn release_cause(conveyor: &Conveyor, kind: &str) -> Option<(&'static str, String)> {
    let chain = conveyor.registry().middleware_of(kind);
    for mw in chain {
        if let Middleware::Breaker(b) = mw {
            if b.info().await.is_ok_and(|i| i.state == "open") {
                return Some(("breaker_open", format!("the circuit breaker {:?} is open", b.name())));
            }
        }
    }
    chain.iter().find_map(|mw| match mw {
        Middleware::RateLimit { limiter, .. } => {
            let l = limiter.limit();
            Some(("rate_limit", format!("its kind's rate limit ({} per {} s) released it", l.limit, l.period.as_secs_f64())))
        }
        _ => None,
    })
}

/// The result `after` gets for a job a middleware stopped: a release, which is no verdict on
/// any breaker's dependency (the call never happened).
fn not_run() -> JobResult {
    Err(JobError::release(Duration::ZERO))
}

/// Gives back what `before` took and reports the call's outcome to breakers. Breakers that let
/// the job through but saw it released (not a verdict on the dependency) record nothing.
pub(crate) async fn after(conveyor: &Conveyor, guard: Guard, result: &JobResult) {
    let verdict = match result {
        Ok(()) => Some(true),
        Err(e) if matches!(e.action, ErrorAction::Release(_)) => None,
        Err(_) => Some(false),
    };
    for b in guard.breakers {
        if let Some(success) = verdict {
            if let Err(e) = b.record(success).await {
                tracing::warn!(breaker = b.name(), error = %e, "recording a breaker call failed");
            }
        }
    }
    if let Some((key, owner)) = guard.lock {
        if let Err(e) = crate::lock::release(conveyor.backend().as_ref(), &key, &owner).await {
            tracing::warn!(lock = %key, error = %e, "releasing a lock failed; it expires by itself");
        }
    }
}

/// Applies `RetryOn`: an error that no predicate accepts is not retried.
pub(crate) fn filter_error(chain: &[Middleware], mut e: JobError) -> JobError {
    for mw in chain {
        if let Middleware::RetryOn(accepts) = mw {
            if matches!(e.action, ErrorAction::Retry | ErrorAction::RetryAfter(_)) && !accepts(&e) {
                e.action = ErrorAction::Abort;
            }
        }
    }
    e
}
