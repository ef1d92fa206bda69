//! Debounce: of a burst of jobs with the same debounce key, only the last runs, once the key
//! has been quiet for its window — "re-index the product after its last edit", "one digest
//! after a flurry of events".
//!
//! A job carries its key and window as the tag `debounce:<window ms>:<key>`. Enqueueing it
//! ([`crate::Conveyor::dispatch_many`], so also over HTTP and Faktory) delays it by the window
//! and, once the enqueue committed, records it as the key's latest job in the cache
//! (`conveyor:debounce:<key>`). When a debounced job comes up, the worker (or `FETCH`, for a
//! remote kind) looks the key up: a job that is no longer the latest completes at once without
//! running (it was superseded); the latest runs. Jobs enqueued in a store transaction
//! (`Tx::enqueue`) are delayed but not recorded, so each of them runs.

use std::time::Duration;

use crate::backend::{QueueBackend, Result};
use crate::cache::Cache;
use crate::clock::now_ms;
use crate::job::{Job, JobId, NewJob};

/// The tag that carries a job's key: `debounce:<window ms>:<key>`.
pub const TAG: &str = "debounce:";
/// The longest window.
pub const MAX_WINDOW: Duration = Duration::from_secs(86_400);
/// How long the latest job of a key is remembered after its window.
const REMEMBER: Duration = Duration::from_secs(86_400);

/// A job's debounce key and window.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Debounce {
    pub key: String,
    pub window: Duration,
}

impl Debounce {
    /// Checks a key and window from a caller; the error names what is wrong.
    pub fn new(key: impl Into<String>, window: Duration) -> std::result::Result<Self, String> {
        let key = key.into();
        crate::flow::check_key("debounce", &key)?;
        if window.is_zero() || window > MAX_WINDOW {
            return Err("the debounce window must be more than 0 and at most a day".into());
        }
        Ok(Debounce { key, window })
    }

    pub fn tag(&self) -> String {
        format!("{TAG}{}:{}", self.window.as_millis(), self.key)
    }

    /// The debounce a job's tags carry, if any.
    pub fn of_tags(tags: &[String]) -> Option<Self> {
        tags.iter().find_map(|t| {
            let (ms, key) = t.strip_prefix(TAG)?.split_once(':')?;
            Debounce::new(key, Duration::from_millis(ms.parse().ok()?)).ok()
        })
    }
}

fn cache_key(key: &str) -> String {
    format!("conveyor:debounce:{key}")
}

/// Delays a debounced job by its window (a later `run_at` stays).
pub fn delay(job: &mut NewJob) {
    if let Some(d) = Debounce::of_tags(&job.tags) {
        let at = now_ms() + d.window.as_millis() as i64;
        job.run_at = Some(job.run_at.map_or(at, |t| t.max(at)));
    }
}

/// Records each enqueued debounced job as its key's latest (in enqueue order).
pub async fn record(backend: &std::sync::Arc<dyn QueueBackend>, jobs: &[(String, JobId)]) -> Result<()> {
    if jobs.is_empty() {
        return Ok(());
    }
    let cache = Cache::new(backend.clone());
    for (key, id) in jobs {
        cache.put(&cache_key(key), &id.to_string(), Some(REMEMBER)).await?;
    }
    Ok(())
}

/// Whether `job` was superseded by a later job of its debounce key (then it should not run).
pub async fn superseded(backend: &std::sync::Arc<dyn QueueBackend>, job: &Job) -> Result<bool> {
    let Some(d) = Debounce::of_tags(&job.tags) else { return Ok(false) };
    let latest: Option<String> = Cache::new(backend.clone()).get(&cache_key(&d.key)).await?;
    Ok(latest.is_some_and(|l| l != job.id.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_carry_key_and_window() {
        let d = Debounce::new("product:7", Duration::from_millis(1500)).unwrap();
        assert_eq!(d.tag(), "debounce:1500:product:7");
        assert_eq!(Debounce::of_tags(&["x".into(), d.tag()]), Some(d));
        assert!(Debounce::new("", Duration::from_secs(1)).is_err());
        assert!(Debounce::new("k", Duration::ZERO).is_err());
        assert!(Debounce::new("k", MAX_WINDOW + Duration::from_secs(1)).is_err());
        let mut job = NewJob::new("k", &serde_json::json!({})).tag(Debounce::new("k", Duration::from_secs(60)).unwrap().tag());
        delay(&mut job);
        assert!(job.run_at.unwrap() >= now_ms() + 59_000);
    }
}
