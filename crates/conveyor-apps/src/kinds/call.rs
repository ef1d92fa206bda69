//! One attempt of an HTTP kind's job: the signed `POST`, and what its answer means for the job.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use conveyor_core::breaker::{Breaker, ClosedCache, Permit};
use conveyor_core::clock::now_ms;
use conveyor_core::registry::ErrorAction;
use conveyor_core::{JobContext, JobError, JobResult};
use reqwest::StatusCode;
use tokio::sync::Semaphore;

use super::HttpKind;
use crate::outbound::{self, Client, OutboundError};
use crate::signing;

/// How long secrets read from the store are used before they are read again (a rotation by
/// this process is seen at once; the previous secret stays valid far longer than this).
const KEYS_FRESH: Duration = Duration::from_secs(1);

/// Runs one kind's jobs.
pub(crate) struct Runner {
    kind: HttpKind,
    client: Client,
    /// At most `concurrency` calls in flight in this process.
    slots: Semaphore,
    closed: ClosedCache,
    /// Configured secrets' keys, or the store's as last read (when, after how many rotations).
    keys: Mutex<Option<CachedKeys>>,
}

/// Signing keys, when they were read, and the count of this process's rotations then
/// (`u64::MAX` for configured keys, which never change).
type CachedKeys = (Instant, u64, Arc<Vec<Vec<u8>>>);

/// What an answer (or its absence) means for the job, and for the kind's breaker.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    /// 2xx.
    Done,
    /// 429 or 503 with `Retry-After`: released for that long, no attempt spent.
    Later(Duration),
    /// 429 without `Retry-After`, 408, other 5xx, a timeout or a connection error: retried with
    /// the job's backoff.
    Retry(String),
    /// Other 4xx, a redirect: failed at once with the reason.
    Fail(String),
}

impl Verdict {
    /// Whether the call says the endpoint is unhealthy (`Some(false)`), healthy (`Some(true)`),
    /// or says nothing of it (it asked to be called later).
    pub fn health(&self) -> Option<bool> {
        match self {
            Verdict::Done | Verdict::Fail(_) => Some(true),
            Verdict::Later(_) => None,
            Verdict::Retry(_) => Some(false),
        }
    }
}

/// The verdict on an answer's status (with its `Retry-After`, and a short excerpt of the body for
/// the job's error).
pub fn classify(status: StatusCode, retry_after: Option<Duration>, excerpt: &str) -> Verdict {
    let code = status.as_u16();
    let reason = || {
        let e = conveyor_core::redact::scrub(excerpt);
        if e.is_empty() {
            format!("HTTP {code}")
        } else {
            format!("HTTP {code}: {e}")
        }
    };
    match code {
        200..=299 => Verdict::Done,
        429 | 503 if retry_after.is_some() => Verdict::Later(retry_after.unwrap_or_default()),
        408 | 429 | 500..=599 => Verdict::Retry(reason()),
        _ => Verdict::Fail(reason()),
    }
}

/// The verdict on a call that got no answer.
pub fn classify_error(e: &OutboundError) -> Verdict {
    match e {
        OutboundError::Redirect(_) | OutboundError::BadUrl | OutboundError::Scheme | OutboundError::NotAllowed(_) => {
            Verdict::Fail(e.to_string())
        }
        _ => Verdict::Retry(e.to_string()),
    }
}

impl Runner {
    pub(crate) fn new(kind: HttpKind, client: Client) -> Runner {
        let slots = Semaphore::new(kind.concurrency);
        let keys = (!kind.secrets.is_empty()).then(|| {
            let keys: Vec<Vec<u8>> = kind.secrets.iter().filter_map(|s| signing::key_of(s)).collect();
            (Instant::now(), u64::MAX, Arc::new(keys))
        });
        Runner { kind, client, slots, closed: ClosedCache::default(), keys: Mutex::new(keys) }
    }

    /// One attempt.
    pub(crate) async fn run(self: Arc<Self>, payload: String, ctx: JobContext) -> JobResult {
        let _slot = self.slots.acquire().await.expect("the semaphore is never closed");
        let breaker = Breaker::new(ctx.conveyor.clone(), self.kind.owner(), self.kind.breaker_config());
        match self.closed.allow(&breaker).await {
            Ok(Permit::Allowed) => {}
            Ok(Permit::Rejected { retry_after }) => return Err(JobError::release(retry_after)),
            Err(e) => {
                tracing::warn!(kind = %self.kind.name, error = %e, "the kind's breaker is unavailable; released");
                return Err(JobError::release(Duration::from_secs(1)));
            }
        }
        let keys = self.keys(&ctx).await.map_err(|message| JobError::new(message, ErrorAction::Release(Duration::from_secs(1))))?;
        let body = body(&ctx, &payload);
        let id = ctx.id.to_string();
        let now = now_ms() / 1000;
        let req = self.client.post(&self.kind.url).map(|r| {
            r.timeout(self.kind.timeout)
                .header("content-type", "application/json")
                .header("user-agent", concat!("conveyor/", env!("CARGO_PKG_VERSION")))
                .header("webhook-id", &id)
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", signing::signatures(&keys, &id, now, body.as_bytes()))
                .body(body)
        });
        let verdict = tokio::select! {
            v = self.call(req) => v,
            _ = ctx.cancel.cancelled() => return Err(JobError::release(Duration::ZERO)),
        };
        self.report(&breaker, verdict.health()).await;
        match verdict {
            Verdict::Done => Ok(()),
            Verdict::Later(after) => Err(JobError::release(after)),
            Verdict::Retry(reason) => Err(JobError::retry(reason)),
            Verdict::Fail(reason) => Err(JobError::abort(reason)),
        }
    }

    async fn call(&self, req: Result<reqwest::RequestBuilder, OutboundError>) -> Verdict {
        let resp = match req {
            Ok(req) => self.client.send(req).await,
            Err(e) => Err(e),
        };
        match resp {
            Err(e) => classify_error(&e),
            Ok(resp) if resp.status().is_success() => Verdict::Done,
            Ok(resp) => {
                let status = resp.status();
                let after = outbound::retry_after(resp.headers());
                let excerpt = outbound::excerpt(resp, 4096, 300).await;
                classify(status, after, &excerpt)
            }
        }
    }

    /// Tells the breaker what the call said of the endpoint. A failure always counts; a success
    /// is recorded when the breaker was not seen closed lately (after a failure, or a probe of
    /// a half-open breaker), so a healthy kind costs the store one write per process per
    /// quarter second, not one per call — and the breaker opens on consecutive failures.
    async fn report(&self, breaker: &Breaker, healthy: Option<bool>) {
        let Some(healthy) = healthy else { return };
        if healthy && self.closed.recently_closed(breaker.name()) {
            self.closed.succeeded(breaker.name());
            return;
        }
        if let Err(e) = breaker.record(healthy).await {
            tracing::warn!(breaker = breaker.name(), error = %e, "recording a breaker call failed");
        }
        if healthy {
            self.closed.succeeded(breaker.name());
        } else {
            self.closed.failed(breaker.name());
        }
    }

    /// The keys every call is signed with, current first.
    async fn keys(&self, ctx: &JobContext) -> Result<Arc<Vec<Vec<u8>>>, String> {
        let rotations = signing::ROTATIONS.load(std::sync::atomic::Ordering::Relaxed);
        if let Some((at, seen, keys)) = &*self.keys.lock().expect("keys lock") {
            // Configured keys are marked as seen after every rotation (they never change).
            if *seen == u64::MAX || (at.elapsed() < KEYS_FRESH && *seen == rotations) {
                return Ok(keys.clone());
            }
        }
        let stored = signing::signing(ctx.backend().as_ref(), Some(&self.kind.owner()))
            .await
            .map_err(|e| format!("cannot read the kind's signing secrets: {e}"))?;
        let keys: Vec<Vec<u8>> = stored.iter().flatten().filter_map(|s| signing::key_of(s)).collect();
        if keys.is_empty() {
            return Err(format!("kind {} has no signing secret yet", self.kind.name));
        }
        let keys = Arc::new(keys);
        *self.keys.lock().expect("keys lock") = Some((Instant::now(), rotations, keys.clone()));
        Ok(keys)
    }
}

/// `{id, kind, attempt, queue, payload, tags, batch_id?}`, the payload inserted as stored.
fn body(ctx: &JobContext, payload: &str) -> String {
    let s = |v: &str| serde_json::to_string(v).expect("a string serializes");
    let mut out = String::with_capacity(payload.len() + 160);
    out.push_str("{\"id\":");
    out.push_str(&s(&ctx.id.to_string()));
    out.push_str(",\"kind\":");
    out.push_str(&s(&ctx.kind));
    out.push_str(",\"attempt\":");
    out.push_str(&ctx.attempt.to_string());
    out.push_str(",\"queue\":");
    out.push_str(&s(&ctx.queue));
    out.push_str(",\"payload\":");
    out.push_str(if payload.trim().is_empty() { "null" } else { payload });
    out.push_str(",\"tags\":");
    out.push_str(&serde_json::to_string(&ctx.tags).expect("tags serialize"));
    if let Some(b) = &ctx.batch_id {
        out.push_str(",\"batch_id\":");
        out.push_str(&s(b));
    }
    out.push('}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_onto_the_job_as_the_spec_says() {
        let s = |c: u16| StatusCode::from_u16(c).unwrap();
        let after = Some(Duration::from_secs(7));
        assert_eq!(classify(s(200), None, ""), Verdict::Done);
        assert_eq!(classify(s(204), after, ""), Verdict::Done);
        assert_eq!(classify(s(429), after, ""), Verdict::Later(Duration::from_secs(7)));
        assert_eq!(classify(s(503), after, "busy"), Verdict::Later(Duration::from_secs(7)));
        assert_eq!(classify(s(429), None, ""), Verdict::Retry("HTTP 429".into()));
        assert_eq!(classify(s(503), None, "down"), Verdict::Retry("HTTP 503: down".into()));
        assert_eq!(classify(s(500), after, ""), Verdict::Retry("HTTP 500".into()));
        assert_eq!(classify(s(408), None, ""), Verdict::Retry("HTTP 408".into()));
        assert_eq!(classify(s(422), None, "bad sku"), Verdict::Fail("HTTP 422: bad sku".into()));
        assert_eq!(classify(s(404), after, ""), Verdict::Fail("HTTP 404".into()));
        assert_eq!(classify_error(&OutboundError::Timeout), Verdict::Retry("timed out".into()));
        assert_eq!(classify_error(&OutboundError::Refused), Verdict::Retry("connection refused".into()));
        assert!(matches!(classify_error(&OutboundError::Redirect(302)), Verdict::Fail(_)));
        // Only the endpoint's failures count against its breaker.
        assert_eq!(classify(s(422), None, "").health(), Some(true));
        assert_eq!(classify(s(503), None, "").health(), Some(false));
        assert_eq!(classify(s(429), after, "").health(), None);
    }
}
