//! Work over HTTP: `POST /api/jobs` (one job), `POST /api/jobs/bulk` (up to 1,000 in one commit)
//! and `POST /api/batches` (jobs with `then` / `catch` / `finally` callbacks). Each job option
//! of the Rust API has a JSON field; a wrong one is a 422 naming its JSON path.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Extension, Router};
use serde_json::{json, Map, Value};

use conveyor_core::batch::Batch;
use conveyor_core::job::EnqueueOutcome;
use conveyor_core::{Backoff, NewJob};

use crate::access::{Principal, Role};
use crate::error::{ok, ApiError};
use crate::openapi::ErrorEnvelope;
use crate::AppState;

/// Jobs in one bulk request or one batch.
pub(crate) const MAX_BULK: usize = 1000;
/// The body limit of a bulk enqueue or a batch (other JSON bodies: [`crate::MAX_BODY`]).
pub(crate) const MAX_BULK_BODY: usize = 16 * 1024 * 1024;

/// Kind prefixes of the built-in applications and the engine: only the admin creates such jobs
/// directly (a publisher goes through the applications' own endpoints, which validate).
const RESERVED: [&str; 4] = ["orders.", "notify.", "sync.", "conveyor."];

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/jobs", post(create_job))
        .route("/api/jobs/bulk", post(create_bulk).layer(axum::extract::DefaultBodyLimit::max(MAX_BULK_BODY)))
        .route("/api/batches", post(create_batch).layer(axum::extract::DefaultBodyLimit::max(MAX_BULK_BODY)))
}

#[utoipa::path(post, path = "/api/jobs", tag = "jobs",
    request_body(content = Object, description = "{kind, payload, queue?, delay_s?|run_at?, priority?, max_attempts?, backoff?, timeout_s?, unique_key?, unique_ttl_s?, tags?, concurrency_key?, concurrency_limit?, fairness_key?, debounce_key?, debounce_s?}"),
    responses((status = 201, description = "{id}: enqueued", body = Envelope<Object>),
              (status = 200, description = "{id, duplicate: true}: the unique key is held by this job", body = Envelope<Object>),
              (status = 403, description = "a built-in kind without the admin token", body = ErrorEnvelope),
              (status = 422, description = "a field is invalid (named in details.fields)", body = ErrorEnvelope)))]
pub(crate) async fn create_job(State(s): State<AppState>, Extension(who): Extension<Principal>, body: Bytes) -> Result<Response, ApiError> {
    let v = json_object(&body)?;
    let job = parse_job(&s, &who, &v, "")?;
    let out = s.conveyor.dispatch_many(vec![job]).await?;
    Ok(match out.first() {
        Some(EnqueueOutcome::Duplicate { existing }) => ok(json!({ "id": existing, "duplicate": true })),
        Some(EnqueueOutcome::Enqueued { id }) => (StatusCode::CREATED, ok(json!({ "id": id }))).into_response(),
        None => return Err(ApiError::Internal("the backend answered no outcome for one job".into())),
    })
}

#[utoipa::path(post, path = "/api/jobs/bulk", tag = "jobs",
    request_body(content = Object, description = "{jobs: [job, … up to 1000]}, each as for POST /api/jobs; one commit"),
    responses((status = 201, description = "[{id, duplicate}] in the order given", body = Envelope<Object>),
              (status = 422, description = "a field is invalid (jobs[i].field); nothing was enqueued", body = ErrorEnvelope)))]
pub(crate) async fn create_bulk(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let v = json_object(&body)?;
    let jobs = parse_jobs(&s, &who, v.get("jobs"), "jobs")?;
    let out = s.conveyor.dispatch_many(jobs).await?;
    let data: Vec<Value> =
        out.iter().map(|o| json!({ "id": o.id(), "duplicate": matches!(o, EnqueueOutcome::Duplicate { .. }) })).collect();
    Ok((StatusCode::CREATED, ok(data)).into_response())
}

#[utoipa::path(post, path = "/api/batches", tag = "batches",
    request_body(content = Object, description = "{jobs: [job, …], then?, catch?, finally?, allow_failures?, name?}: jobs and callbacks as for POST /api/jobs"),
    responses((status = 201, description = "{id}: the batch", body = Envelope<Object>),
              (status = 422, description = "a field is invalid", body = ErrorEnvelope)))]
pub(crate) async fn create_batch(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let v = json_object(&body)?;
    let jobs = parse_jobs(&s, &who, v.get("jobs"), "jobs")?;
    let name = match v.get("name") {
        None | Some(Value::Null) => "batch".to_string(),
        Some(Value::String(n)) if !n.is_empty() && n.len() <= 200 => n.clone(),
        Some(_) => return Err(ApiError::field("name", "must be a string of 1 to 200 characters")),
    };
    let mut batch = Batch::new(name).extend(jobs);
    for key in ["then", "catch", "finally"] {
        match v.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::Object(cb)) => {
                let job = parse_job(&s, &who, cb, key)?;
                batch = match key {
                    "then" => batch.then(job),
                    "catch" => batch.catch(job),
                    _ => batch.finally(job),
                };
            }
            Some(_) => return Err(ApiError::field(key, "must be a job object")),
        }
    }
    match v.get("allow_failures") {
        None | Some(Value::Null) | Some(Value::Bool(false)) => {}
        Some(Value::Bool(true)) => batch = batch.allow_failures(),
        Some(_) => return Err(ApiError::field("allow_failures", "must be a boolean")),
    }
    let id = batch.dispatch(&s.conveyor).await?;
    Ok((StatusCode::CREATED, ok(json!({ "id": id }))).into_response())
}

fn json_object(body: &[u8]) -> Result<Map<String, Value>, ApiError> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::BadRequest("the body must be a JSON object".into())),
        Err(e) => Err(ApiError::BadRequest(format!("the body is not JSON: {e}"))),
    }
}

fn parse_jobs(s: &AppState, who: &Principal, v: Option<&Value>, path: &str) -> Result<Vec<NewJob>, ApiError> {
    let list = match v {
        Some(Value::Array(list)) => list,
        _ => return Err(ApiError::field(path, "must be an array of jobs")),
    };
    if list.is_empty() || list.len() > MAX_BULK {
        return Err(ApiError::field(path, format!("must hold 1 to {MAX_BULK} jobs (got {})", list.len())));
    }
    list.iter()
        .enumerate()
        .map(|(i, j)| match j {
            Value::Object(o) => parse_job(s, who, o, &format!("{path}[{i}]")),
            _ => Err(ApiError::field(&format!("{path}[{i}]"), "must be a job object")),
        })
        .collect()
}

/// One job from its JSON form; errors name `prefix.field`.
fn parse_job(s: &AppState, who: &Principal, o: &Map<String, Value>, prefix: &str) -> Result<NewJob, ApiError> {
    let at = |field: &str| if prefix.is_empty() { field.to_string() } else { format!("{prefix}.{field}") };
    let bad = |field: &str, why: &str| ApiError::Validation(BTreeMap::from([(at(field), why.to_string())]));
    const KNOWN: [&str; 18] = [
        "debounce_key",
        "debounce_s",
        "concurrency_key",
        "concurrency_limit",
        "fairness_key",
        "kind",
        "payload",
        "queue",
        "delay_s",
        "run_at",
        "priority",
        "max_attempts",
        "backoff",
        "timeout_s",
        "unique_key",
        "unique_ttl_s",
        "tags",
        "id",
    ];
    for k in o.keys() {
        if !KNOWN.contains(&k.as_str()) {
            return Err(bad(k, "unknown field"));
        }
    }

    let kind = match o.get("kind") {
        Some(Value::String(k)) if !k.is_empty() && k.len() <= 200 => k.clone(),
        Some(Value::String(_)) => return Err(bad("kind", "must be 1 to 200 characters")),
        _ => return Err(bad("kind", "is required (a string)")),
    };
    if RESERVED.iter().any(|p| kind.starts_with(p)) && who.role != Some(Role::Admin) {
        return Err(ApiError::Forbidden(format!("jobs of the built-in kind {kind:?} can be created by the admin token only")));
    }
    // A kind this build cannot run is remote: workers in other languages fetch it over the
    // Faktory protocol (`conveyor_core::lane`).
    let remote = !s.conveyor.registry().contains(&kind);
    let payload = match o.get("payload") {
        None | Some(Value::Null) => "{}".to_string(),
        Some(p) => p.to_string(),
    };
    let mut job = NewJob::raw(kind, payload);
    if let Some(q) = o.get("queue").filter(|v| !v.is_null()) {
        let q = q.as_str().ok_or_else(|| bad("queue", "must be a string"))?;
        conveyor_core::job::validate_queue_name(q).map_err(|e| bad("queue", &e))?;
        job = job.queue(q);
    }
    match (o.get("delay_s").filter(|v| !v.is_null()), o.get("run_at").filter(|v| !v.is_null())) {
        (Some(_), Some(_)) => return Err(bad("run_at", "give delay_s or run_at, not both")),
        (Some(d), None) => {
            job = job.delay(seconds(d, 0.0, 366.0 * 86400.0).ok_or_else(|| bad("delay_s", "must be seconds from 0 to a year"))?)
        }
        (None, Some(t)) => job = job.run_at(timestamp_ms(t).ok_or_else(|| bad("run_at", "must be an RFC 3339 time or unix seconds"))?),
        (None, None) => {}
    }
    if let Some(p) = o.get("priority").filter(|v| !v.is_null()) {
        let p = p
            .as_i64()
            .filter(|p| (-1_000_000..=1_000_000).contains(p))
            .ok_or_else(|| bad("priority", "must be a whole number (higher first)"))?;
        job = job.priority(p as i32);
    }
    if let Some(n) = o.get("max_attempts").filter(|v| !v.is_null()) {
        let n =
            n.as_u64().filter(|n| (1..=1000).contains(n)).ok_or_else(|| bad("max_attempts", "must be a whole number from 1 to 1000"))?;
        job = job.max_attempts(n as u32);
    }
    if let Some(b) = o.get("backoff").filter(|v| !v.is_null()) {
        job = job.backoff(backoff(b).ok_or_else(|| {
            bad("backoff", "must be seconds (fixed), a list of seconds, or {\"type\": \"exponential\", \"base_s\", \"max_s\"}")
        })?);
    }
    if let Some(t) = o.get("timeout_s").filter(|v| !v.is_null()) {
        job = job.timeout(seconds(t, 0.001, 86400.0).ok_or_else(|| bad("timeout_s", "must be seconds from 0.001 to a day"))?);
    }
    match (o.get("unique_key").filter(|v| !v.is_null()), o.get("unique_ttl_s").filter(|v| !v.is_null())) {
        (None, Some(_)) => return Err(bad("unique_ttl_s", "needs unique_key")),
        (Some(k), ttl) => {
            let k =
                k.as_str().filter(|k| !k.is_empty() && k.len() <= 200).ok_or_else(|| bad("unique_key", "must be 1 to 200 characters"))?;
            let ttl = match ttl {
                None => Duration::from_secs(3600),
                Some(t) => seconds(t, 1.0, 366.0 * 86400.0).ok_or_else(|| bad("unique_ttl_s", "must be seconds from 1 to a year"))?,
            };
            job = job.unique(k, ttl);
        }
        (None, None) => {}
    }
    if let Some(t) = o.get("tags").filter(|v| !v.is_null()) {
        let tags = t.as_array().filter(|t| t.len() <= 20).ok_or_else(|| bad("tags", "must be a list of at most 20 strings"))?;
        for (i, tag) in tags.iter().enumerate() {
            let tag = tag
                .as_str()
                .filter(|t| !t.is_empty() && t.len() <= 200)
                .ok_or_else(|| bad(&format!("tags[{i}]"), "must be 1 to 200 characters"))?;
            job = job.tag(tag);
        }
    }
    match (o.get("concurrency_key").filter(|v| !v.is_null()), o.get("concurrency_limit").filter(|v| !v.is_null())) {
        (None, Some(_)) => return Err(bad("concurrency_limit", "needs concurrency_key")),
        (Some(k), limit) => {
            let k = k.as_str().ok_or_else(|| bad("concurrency_key", "must be a string"))?;
            let limit = match limit {
                None => 1,
                Some(l) => l.as_u64().filter(|l| (1..=conveyor_core::flow::MAX_LIMIT as u64).contains(l)).ok_or_else(|| {
                    bad("concurrency_limit", &format!("must be a whole number from 1 to {}", conveyor_core::flow::MAX_LIMIT))
                })? as u32,
            };
            job = job.concurrency(conveyor_core::flow::Concurrency::new(k, limit).map_err(|e| bad("concurrency_key", &e))?);
        }
        (None, None) => {}
    }
    match (o.get("debounce_key").filter(|v| !v.is_null()), o.get("debounce_s").filter(|v| !v.is_null())) {
        (None, None) => {}
        (None, Some(_)) => return Err(bad("debounce_s", "needs debounce_key")),
        (Some(_), None) => return Err(bad("debounce_s", "is required with debounce_key (the quiet time, in seconds)")),
        (Some(k), Some(w)) => {
            let k = k.as_str().ok_or_else(|| bad("debounce_key", "must be a string"))?;
            let w = seconds(w, 0.001, 86400.0).ok_or_else(|| bad("debounce_s", "must be seconds from 0.001 to a day"))?;
            job = job.debounce(conveyor_core::debounce::Debounce::new(k, w).map_err(|e| bad("debounce_key", &e))?);
        }
    }
    if let Some(k) = o.get("fairness_key").filter(|v| !v.is_null()) {
        let k = k.as_str().ok_or_else(|| bad("fairness_key", "must be a string"))?;
        conveyor_core::fair::check_key(k).map_err(|e| bad("fairness_key", &e))?;
        job = job.fairness(k);
    }
    if o.get("id").is_some_and(|v| !v.is_null()) {
        return Err(bad("id", "is chosen by Conveyor (use unique_key to deduplicate)"));
    }
    // A kind with a queue of its own (an HTTP kind, `[[kinds]] queue`) goes there unless the
    // job names another queue than `default`.
    s.conveyor.registry().route(&mut job);
    if remote {
        job.queue = conveyor_core::lane::remote(&job.queue);
    }
    job.validate().map_err(ApiError::BadRequest)?;
    Ok(job)
}

fn seconds(v: &Value, min: f64, max: f64) -> Option<Duration> {
    v.as_f64().filter(|s| s.is_finite() && *s >= min && *s <= max).map(Duration::from_secs_f64)
}

/// Unix milliseconds of an RFC 3339 time or of unix seconds.
fn timestamp_ms(v: &Value) -> Option<i64> {
    match v {
        Value::String(t) => conveyor_core::clock::parse_rfc3339_ms(t),
        Value::Number(n) => n.as_f64().filter(|s| s.is_finite() && *s >= 0.0 && *s < 1e11).map(|s| (s * 1000.0) as i64),
        _ => None,
    }
}

fn backoff(v: &Value) -> Option<Backoff> {
    let secs = |v: &Value| seconds(v, 0.0, 30.0 * 86400.0);
    match v {
        Value::Number(_) => secs(v).map(Backoff::fixed),
        Value::Array(list) if !list.is_empty() && list.len() <= 100 => {
            list.iter().map(secs).collect::<Option<Vec<_>>>().map(|d| Backoff::list(&d))
        }
        Value::Object(o) if o.get("type").and_then(Value::as_str) == Some("exponential") => {
            let base = o.get("base_s").map_or(Some(Duration::from_secs(1)), secs)?;
            let max = o.get("max_s").map_or(Some(Duration::from_secs(3600)), secs)?;
            (base > Duration::ZERO && max >= base).then(|| Backoff::exponential(base, max))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::timestamp_ms;

    #[test]
    fn run_at_is_rfc3339_or_unix_seconds() {
        assert_eq!(timestamp_ms(&json!("2026-11-23T10:00:00Z")), Some(1_795_428_000_000));
        assert_eq!(timestamp_ms(&json!("2026-11-23T12:00:00.250+02:00")), Some(1_795_428_000_250));
        assert_eq!(timestamp_ms(&json!(1_795_428_000.5)), Some(1_795_428_000_500));
        for v in [
            json!("2026-11-23"),
            json!("2026-11-23T10:00:00"),
            json!("2026-11-23T10:00:00+0200"),
            json!(" 2026-11-23T10:00:00Z"),
            json!(-1),
            json!(1e11),
            json!(true),
        ] {
            assert_eq!(timestamp_ms(&v), None, "{v}");
        }
    }
}
