//! A Faktory job and a Conveyor job, both ways.
//!
//! - `jobtype` is the kind, `queue` the queue, `at` the run time, `priority` (1–9, default 5)
//!   the priority, `retry` the attempts (`retry` + 1; 0 and -1 mean one attempt, whose failure
//!   goes to the failed store), `custom.unique_for` a unique key over (jobtype, args, queue).
//! - A **remote** job (a kind this build does not run) keeps the normalised Faktory job as its
//!   payload, so `FETCH` hands a worker what was pushed. A **local** job (a built-in, Rust or
//!   HTTP kind) gets its payload from `args`: one argument is the payload, several an array.
//! - Conveyor's job id is its own (time-ordered, so queues stay first in, first out); the
//!   `jid` is the job's name on the Faktory side and stays in the payload.

use std::time::Duration;

use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use conveyor_core::job::validate_queue_name;
use conveyor_core::{Job, NewJob};

/// Faktory's default `retry`.
pub(crate) const DEFAULT_RETRY: i64 = 25;
/// Faktory's default `reserve_for`, and its most.
pub(crate) const DEFAULT_RESERVE_S: u64 = 1800;
pub(crate) const MAX_RESERVE_S: u64 = 86_400;

/// A pushed job, checked.
pub(crate) struct Pushed {
    pub(crate) jid: String,
    pub(crate) job: NewJob,
}

/// Checks and converts one pushed job (`remote` when the kind is not run by this build).
/// The error is the reason for the client, in Faktory's words where it has them.
pub(crate) fn parse(v: Value, local: impl Fn(&str) -> bool) -> Result<Pushed, String> {
    let Value::Object(mut o) = v else { return Err("a job must be a JSON object".into()) };
    let jid = match o.get("jid") {
        Some(Value::String(j)) if j.len() >= 8 && j.len() <= 200 => j.clone(),
        _ => return Err("jobs must have a reasonable jid parameter".into()),
    };
    let kind = match o.get("jobtype") {
        Some(Value::String(k)) if !k.is_empty() && k.len() <= 200 => k.clone(),
        _ => return Err("jobs must have a jobtype parameter".into()),
    };
    let args = match o.get("args") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a.clone(),
        Some(_) => return Err("jobs must have an args parameter that is an array".into()),
    };
    o.insert("args".into(), Value::Array(args.clone()));
    let queue = match o.get("queue") {
        None | Some(Value::Null) => "default".to_string(),
        Some(Value::String(q)) if q.is_empty() => "default".to_string(),
        Some(Value::String(q)) => q.clone(),
        Some(_) => return Err("queue must be a string".into()),
    };
    validate_queue_name(&queue).map_err(|e| format!("queue: {e}"))?;
    o.insert("queue".into(), Value::String(queue.clone()));
    let priority = match o.get("priority") {
        None | Some(Value::Null) => 5,
        Some(p) => p.as_i64().filter(|p| (0..=9).contains(p)).ok_or("priority must be a whole number from 0 to 9")?,
    };
    let reserve_for = match o.get("reserve_for") {
        None | Some(Value::Null) => DEFAULT_RESERVE_S,
        Some(r) => match r.as_u64() {
            Some(r) if r > MAX_RESERVE_S => return Err("jobs cannot be reserved for more than one day".into()),
            Some(r) if r >= 1 => r,
            _ => return Err("reserve_for must be a whole number of seconds".into()),
        },
    };
    o.insert("reserve_for".into(), json!(reserve_for));
    let retry = match o.get("retry") {
        None | Some(Value::Null) => DEFAULT_RETRY,
        Some(r) => r.as_i64().filter(|r| (-1..=1000).contains(r)).ok_or("retry must be a whole number from -1 to 1000")?,
    };
    o.insert("retry".into(), json!(retry));
    let now = conveyor_core::clock::now_ms();
    let run_at = match o.get("at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(rfc3339_ms(s).ok_or("at must be an RFC 3339 time")?),
        Some(_) => return Err("at must be an RFC 3339 time".into()),
    };
    // pyfaktory sends `"at": ""`, which strict clients cannot read back: keep a due time only.
    match run_at {
        Some(t) if t > now => {}
        _ => {
            o.remove("at");
        }
    }
    if !matches!(o.get("created_at"), Some(Value::String(s)) if rfc3339_ms(s).is_some()) {
        o.insert("created_at".into(), Value::String(rfc3339(now)));
    }
    o.remove("enqueued_at");
    o.remove("failure");
    let custom = match o.get("custom") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(c)) => c.clone(),
        Some(_) => return Err("custom must be an object".into()),
    };
    // Expiring jobs: `expires_in` (seconds from now) becomes `expires_at`.
    let mut custom = custom;
    if let Some(secs) = custom.get("expires_in").filter(|v| !v.is_null()) {
        let secs =
            secs.as_f64().filter(|s| s.is_finite() && *s > 0.0 && *s <= 366.0 * 86400.0).ok_or("custom.expires_in must be seconds")?;
        custom.insert("expires_at".into(), Value::String(rfc3339(now + (secs * 1000.0) as i64)));
        custom.remove("expires_in");
        o.insert("custom".into(), Value::Object(custom.clone()));
    }
    if let Some(at) = custom.get("expires_at").filter(|v| !v.is_null()) {
        at.as_str().and_then(rfc3339_ms).ok_or("custom.expires_at must be an RFC 3339 time")?;
    }

    let remote = !local(&kind);
    let mut job = if remote {
        NewJob::raw(kind.clone(), Value::Object(o.clone()).to_string()).queue(conveyor_core::lane::remote(&queue))
    } else {
        let payload = match args.len() {
            0 => json!({}),
            1 => args[0].clone(),
            _ => Value::Array(args.clone()),
        };
        NewJob::raw(kind.clone(), payload.to_string()).queue(queue.clone())
    };
    job = job.priority(priority as i32).max_attempts(if retry <= 0 { 1 } else { retry as u32 + 1 }).tag("faktory");
    if let Some(t) = run_at.filter(|t| *t > now) {
        job = job.run_at(t);
    }
    if let Some(u) = custom.get("unique_for").filter(|v| !v.is_null()) {
        // Rails sends numbers as strings unless the application converts them.
        let secs = u.as_f64().or_else(|| u.as_str().and_then(|s| s.trim().parse().ok()));
        let secs = secs.filter(|s| s.is_finite() && *s >= 1.0 && *s <= 366.0 * 86400.0).ok_or("custom.unique_for must be seconds")?;
        if let Some(until) = custom.get("unique_until").filter(|v| !v.is_null()) {
            if !matches!(until.as_str(), Some("success" | "start")) {
                return Err(format!("custom.unique_until: {until} must be \"success\" or \"start\""));
            }
        }
        // The lock lasts until the job runs, plus unique_for (Faktory's rule).
        let wait = run_at.map_or(0, |t| (t - now).max(0)) as u64;
        job = job.unique(unique_key(&kind, &args, &queue), Duration::from_secs_f64(secs) + Duration::from_millis(wait));
    }
    match (custom.get("debounce_key").filter(|v| !v.is_null()), custom.get("debounce_for").filter(|v| !v.is_null())) {
        (None, None) => {}
        (None, Some(_)) => return Err("custom.debounce_for needs custom.debounce_key".into()),
        (Some(_), None) => return Err("custom.debounce_key needs custom.debounce_for (the quiet time, in seconds)".into()),
        (Some(k), Some(w)) => {
            let key = k
                .as_str()
                .map(str::to_string)
                .or_else(|| k.as_i64().map(|n| n.to_string()))
                .ok_or("custom.debounce_key must be a string")?;
            // Rails sends numbers as strings unless the application converts them.
            let secs = w
                .as_f64()
                .or_else(|| w.as_str().and_then(|s| s.trim().parse().ok()))
                .filter(|s| s.is_finite() && *s >= 0.001 && *s <= 86400.0)
                .ok_or("custom.debounce_for must be seconds from 0.001 to a day")?;
            let d = conveyor_core::debounce::Debounce::new(key, Duration::from_secs_f64(secs))
                .map_err(|e| format!("custom.debounce_key: {e}"))?;
            job = job.debounce(d);
        }
    }
    if let Some(k) = custom.get("fairness_key").filter(|v| !v.is_null()) {
        // Rails sends numbers as strings unless the application converts them.
        let key =
            k.as_str().map(str::to_string).or_else(|| k.as_i64().map(|n| n.to_string())).ok_or("custom.fairness_key must be a string")?;
        conveyor_core::fair::check_key(&key).map_err(|e| format!("custom.fairness_key: {e}"))?;
        job = job.fairness(key);
    }
    if let Some(bid) = custom.get("bid").filter(|v| !v.is_null()) {
        let bid = bid.as_str().ok_or("custom.bid must be a string")?;
        job = job.batch(bid);
    }
    match (custom.get("concurrency_key").filter(|v| !v.is_null()), custom.get("concurrency_limit").filter(|v| !v.is_null())) {
        (None, None) => {}
        (None, Some(_)) => return Err("custom.concurrency_limit needs custom.concurrency_key".into()),
        (Some(k), limit) => {
            // Rails sends numbers as strings unless the application converts them.
            let key = k
                .as_str()
                .map(str::to_string)
                .or_else(|| k.as_i64().map(|n| n.to_string()))
                .ok_or("custom.concurrency_key must be a string")?;
            let limit = match limit {
                None => 1,
                Some(l) => l
                    .as_u64()
                    .or_else(|| l.as_str().and_then(|s| s.trim().parse().ok()))
                    .filter(|n| (1..=conveyor_core::flow::MAX_LIMIT as u64).contains(n))
                    .ok_or_else(|| {
                        format!("custom.concurrency_limit must be a whole number from 1 to {}", conveyor_core::flow::MAX_LIMIT)
                    })? as u32,
            };
            let c = conveyor_core::flow::Concurrency::new(key, limit).map_err(|e| format!("custom.concurrency_key: {e}"))?;
            job = job.concurrency(c);
        }
    }
    // The producer's trace (W3C); a malformed value is ignored, as a tracer ignores a bad header.
    if let Some(tp) = custom.get("traceparent").and_then(Value::as_str) {
        job = job.traceparent(tp);
    }
    job.validate()?;
    Ok(Pushed { jid, job })
}

/// Whether a fetched job's unique key is to be freed when a worker takes it
/// (`custom.unique_until: "start"`; the default, `success`, keeps it until the job succeeds).
pub(crate) fn unique_until_start(job: &Value) -> bool {
    job.get("custom").and_then(|c| c.get("unique_until")).and_then(Value::as_str) == Some("start")
}

/// When a fetched job (its Faktory JSON) expired, if it did: it is not handed out then.
pub(crate) fn expired_at(job: &Value, now: i64) -> Option<i64> {
    let at = job.get("custom")?.get("expires_at")?.as_str().and_then(rfc3339_ms)?;
    (at <= now).then_some(at)
}

/// Faktory's unique key: the jobtype, the arguments and the queue.
fn unique_key(kind: &str, args: &[Value], queue: &str) -> String {
    let digest = Sha256::digest(Value::Array(args.to_vec()).to_string().as_bytes());
    let hex: String = digest.iter().take(16).map(|b| format!("{b:02x}")).collect();
    format!("faktory:{queue}:{kind}:{hex}")
}

/// What `FETCH` hands a worker for a reserved job: the pushed job with `enqueued_at`, and
/// `failure` once an attempt failed. A remote job that did not come through Faktory (over
/// HTTP, say) is wrapped: its payload is the one argument, its id the jid.
pub(crate) fn fetched(job: &Job) -> (String, Value, u64) {
    let queue = conveyor_core::lane::base(&job.queue).to_string();
    let mut o = match serde_json::from_str::<Value>(&job.payload) {
        Ok(Value::Object(o)) if o.get("jid").is_some_and(Value::is_string) && o.get("args").is_some_and(Value::is_array) => o,
        other => {
            let payload = other.unwrap_or_else(|_| Value::String(job.payload.clone()));
            let mut o = Map::new();
            o.insert("jid".into(), Value::String(job.id.to_string()));
            o.insert("args".into(), json!([payload]));
            o.insert("retry".into(), json!(job.max_attempts.saturating_sub(1)));
            o.insert("reserve_for".into(), json!(DEFAULT_RESERVE_S));
            o.insert("created_at".into(), Value::String(rfc3339(job.created_at)));
            o
        }
    };
    o.insert("jobtype".into(), Value::String(job.kind.clone()));
    o.insert("queue".into(), Value::String(queue));
    o.insert("enqueued_at".into(), Value::String(rfc3339(job.available_at)));
    if job.attempt > 1 {
        // Faktory counts retries from 0 at the first failure.
        o.insert(
            "failure".into(),
            json!({
                "retry_count": job.attempt - 2,
                "remaining": job.max_attempts.saturating_sub(job.attempt - 1),
                "failed_at": rfc3339(job.available_at),
            }),
        );
    }
    let jid = o.get("jid").and_then(Value::as_str).unwrap_or_default().to_string();
    let reserve_for = o.get("reserve_for").and_then(Value::as_u64).unwrap_or(DEFAULT_RESERVE_S).clamp(1, MAX_RESERVE_S);
    (jid, Value::Object(o), reserve_for)
}

/// The delay before the next attempt after failure number `count` (from 0), as Faktory waits:
/// 15 s + count⁴ + up to 30 s × (count + 1) of jitter.
pub(crate) fn backoff(count: u32) -> Duration {
    let c = count.min(100) as u64;
    let jitter = rand::random::<u64>() % 30 * (c + 1);
    Duration::from_secs(15 + c.pow(4) + jitter)
}

pub(crate) fn rfc3339(ms: i64) -> String {
    jiff::Timestamp::from_millisecond(ms).map(|t| t.to_string()).unwrap_or_default()
}

pub(crate) fn rfc3339_ms(s: &str) -> Option<i64> {
    s.parse::<jiff::Timestamp>().ok().map(|t| t.as_millisecond())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(_: &str) -> bool {
        false
    }

    #[test]
    fn a_pushed_job_is_normalised_and_keeps_its_faktory_shape() {
        let p = parse(json!({ "jid": "abcdefgh1234", "jobtype": "adder", "args": [1, 2], "at": "", "priority": null }), remote).unwrap();
        assert_eq!(p.jid, "abcdefgh1234");
        assert_eq!((p.job.kind.as_str(), p.job.queue.as_str(), p.job.priority, p.job.max_attempts), ("adder", "default@remote", 5, 26));
        let stored: Value = serde_json::from_str(&p.job.payload).unwrap();
        assert!(stored.get("at").is_none(), "a blank `at` is dropped: {stored}");
        assert_eq!(stored["reserve_for"], 1800);
        assert!(rfc3339_ms(stored["created_at"].as_str().unwrap()).is_some());
    }

    #[test]
    fn retry_zero_and_minus_one_mean_one_attempt() {
        for r in [0, -1] {
            let p = parse(json!({ "jid": "abcdefgh1234", "jobtype": "x", "args": [], "retry": r }), remote).unwrap();
            assert_eq!(p.job.max_attempts, 1);
        }
        let p = parse(json!({ "jid": "abcdefgh1234", "jobtype": "x", "args": [], "retry": 3 }), remote).unwrap();
        assert_eq!(p.job.max_attempts, 4);
    }

    #[test]
    fn bad_jobs_are_refused_with_faktorys_reasons() {
        let e = |v: Value| parse(v, remote).err().unwrap();
        assert_eq!(e(json!({ "jid": "abc", "jobtype": "x", "args": [] })), "jobs must have a reasonable jid parameter");
        assert_eq!(e(json!({ "jid": "abcdefgh1234", "jobtype": "", "args": [] })), "jobs must have a jobtype parameter");
        assert_eq!(
            e(json!({ "jid": "abcdefgh1234", "jobtype": "x", "args": [], "reserve_for": 86401 })),
            "jobs cannot be reserved for more than one day"
        );
        assert!(e(json!({ "jid": "abcdefgh1234", "jobtype": "x", "args": {} })).contains("args"));
        assert!(e(json!({ "jid": "abcdefgh1234", "jobtype": "x", "queue": "a b" })).starts_with("queue:"));
        assert!(e(json!([1])).contains("object"));
    }

    #[test]
    fn a_local_kind_takes_its_payload_from_args() {
        let p = parse(json!({ "jid": "abcdefgh1234", "jobtype": "conveyor.noop", "args": [{ "n": 1 }] }), |_| true).unwrap();
        assert_eq!((p.job.queue.as_str(), p.job.payload.as_str()), ("default", r#"{"n":1}"#));
    }

    #[test]
    fn custom_concurrency_key_limits_a_local_kind() {
        let job = |custom: Value| json!({ "jid": "abcdefgh1234", "jobtype": "conveyor.noop", "args": [{}], "custom": custom });
        let p = parse(job(json!({ "concurrency_key": "shop-7", "concurrency_limit": "3" })), |_| true).unwrap();
        assert!(p.job.tags.contains(&"concurrency:3:shop-7".to_string()), "{:?}", p.job.tags);
        let p = parse(job(json!({ "concurrency_key": 42 })), |_| true).unwrap();
        assert!(p.job.tags.contains(&"concurrency:1:42".to_string()), "the limit is 1 unless given: {:?}", p.job.tags);
        let e = |custom: Value, local: bool| parse(job(custom), move |_| local).err().unwrap();
        assert!(e(json!({ "concurrency_limit": 2 }), true).contains("needs custom.concurrency_key"));
        assert!(e(json!({ "concurrency_key": "k", "concurrency_limit": 0 }), true).contains("custom.concurrency_limit"));
        assert!(e(json!({ "concurrency_key": "" }), true).contains("custom.concurrency_key"));
        let p = parse(job(json!({ "concurrency_key": "k" })), |_| false).unwrap();
        assert!(p.job.tags.contains(&"concurrency:1:k".to_string()), "remote kinds too: {:?}", p.job.tags);
    }

    #[test]
    fn custom_debounce_key_and_window() {
        let job = |custom: Value| json!({ "jid": "abcdefgh1234", "jobtype": "x", "args": [{}], "custom": custom });
        let p = parse(job(json!({ "debounce_key": "product-7", "debounce_for": "2.5" })), |_| true).unwrap();
        assert!(p.job.tags.contains(&"debounce:2500:product-7".to_string()), "{:?}", p.job.tags);
        let e = |custom: Value| parse(job(custom), |_| true).err().unwrap();
        assert!(e(json!({ "debounce_for": 2 })).contains("needs custom.debounce_key"));
        assert!(e(json!({ "debounce_key": "k" })).contains("needs custom.debounce_for"));
        assert!(e(json!({ "debounce_key": "k", "debounce_for": 0 })).contains("custom.debounce_for"));
        assert!(e(json!({ "debounce_key": "", "debounce_for": 1 })).contains("custom.debounce_key"));
    }

    #[test]
    fn custom_fairness_key_orders_local_and_remote_kinds() {
        let job = |custom: Value| json!({ "jid": "abcdefgh1234", "jobtype": "x", "args": [{}], "custom": custom });
        for local in [true, false] {
            let p = parse(job(json!({ "fairness_key": "tenant-7" })), move |_| local).unwrap();
            assert_eq!(p.job.fairness_key(), Some("tenant-7"), "{:?}", p.job.tags);
        }
        let p = parse(job(json!({ "fairness_key": 42 })), |_| true).unwrap();
        assert_eq!(p.job.fairness_key(), Some("42"));
        let e = |custom: Value| parse(job(custom), |_| true).err().unwrap();
        assert!(e(json!({ "fairness_key": "" })).contains("custom.fairness_key"));
        assert!(e(json!({ "fairness_key": {} })).contains("custom.fairness_key must be a string"));
    }

    #[test]
    fn custom_traceparent_puts_the_job_in_that_trace() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let p = parse(json!({ "jid": "abcdefgh1234", "jobtype": "x", "custom": { "traceparent": tp } }), remote).unwrap();
        assert_eq!(conveyor_core::trace::of_tags(&p.job.tags).unwrap().traceparent(), tp);
        let p = parse(json!({ "jid": "abcdefgh1234", "jobtype": "x", "custom": { "traceparent": "junk" } }), remote).unwrap();
        assert!(conveyor_core::trace::of_tags(&p.job.tags).is_none());
    }

    #[test]
    fn unique_for_keys_on_jobtype_args_and_queue() {
        let a = parse(json!({ "jid": "abcdefgh1234", "jobtype": "x", "args": [1], "custom": { "unique_for": "60" } }), remote).unwrap();
        let b = parse(json!({ "jid": "zzzzzzzz9999", "jobtype": "x", "args": [1], "custom": { "unique_for": 60 } }), remote).unwrap();
        let c = parse(json!({ "jid": "zzzzzzzz9999", "jobtype": "x", "args": [2], "custom": { "unique_for": 60 } }), remote).unwrap();
        assert_eq!(a.job.unique, b.job.unique);
        assert_ne!(a.job.unique, c.job.unique);
        assert_eq!(a.job.unique.unwrap().ttl, Duration::from_secs(60));
    }

    #[test]
    fn expires_in_becomes_expires_at_and_an_expired_job_says_so() {
        let p = parse(json!({ "jid": "abcdefgh1234", "jobtype": "x", "custom": { "expires_in": 60 } }), remote).unwrap();
        let stored: Value = serde_json::from_str(&p.job.payload).unwrap();
        let at = rfc3339_ms(stored["custom"]["expires_at"].as_str().unwrap()).unwrap();
        let now = conveyor_core::clock::now_ms();
        assert!((now + 59_000..=now + 61_000).contains(&at));
        assert_eq!(expired_at(&stored, now), None);
        assert_eq!(expired_at(&stored, at + 1), Some(at));
        assert!(parse(json!({ "jid": "abcdefgh1234", "jobtype": "x", "custom": { "expires_at": "soon" } }), remote).is_err());
    }

    #[test]
    fn faktory_backoff_grows_from_fifteen_seconds() {
        for _ in 0..50 {
            let first = backoff(0).as_secs();
            assert!((15..45).contains(&first), "{first}");
            let tenth = backoff(10).as_secs();
            assert!((15 + 10_000..15 + 10_000 + 30 * 11).contains(&tenth), "{tenth}");
        }
    }
}
