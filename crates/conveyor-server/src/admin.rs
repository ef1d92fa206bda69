//! Queue administration: queues, jobs, the failed store, workers and metrics (what the
//! dashboard and `conveyor queue|failed` use).

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use conveyor_core::backend::{JobFilter, MetricsQuery, Page};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{validate_queue_name, JobId, JobState};
use conveyor_core::metrics::{summarize, MetricsRow};

use crate::error::{ok, page, ApiError};
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/queues", get(list_queues))
        .route("/api/queues/{name}/pause", post(pause))
        .route("/api/queues/{name}/resume", post(resume))
        .route("/api/queues/{name}/clear", post(clear))
        .route("/api/jobs", get(list_jobs))
        .route("/api/jobs/failed", get(list_failed))
        .route("/api/jobs/failed/retry-all", post(retry_all))
        .route("/api/jobs/failed/{id}", delete(forget_failed).get(show_failed))
        .route("/api/jobs/failed/{id}/retry", post(retry_failed))
        .route("/api/jobs/{id}", get(show_job))
        .route("/api/workers", get(workers))
        .route("/api/metrics/queues", get(metrics_queues))
        .route("/api/metrics/jobs", get(metrics_jobs))
}

/// `page` and `per_page` as the SPEC defines them.
#[derive(Deserialize, Default)]
pub(crate) struct Paging {
    page: Option<String>,
    per_page: Option<String>,
}

impl Paging {
    pub(crate) fn parse(&self) -> Result<Page, ApiError> {
        let page = match &self.page {
            None => 1,
            Some(p) => p.parse::<u32>().ok().filter(|p| *p >= 1).ok_or_else(|| ApiError::field("page", "must be a whole number from 1"))?,
        };
        let per_page = match &self.per_page {
            None => 50,
            Some(p) => p
                .parse::<u32>()
                .ok()
                .filter(|p| (1..=1000).contains(p))
                .ok_or_else(|| ApiError::field("per_page", "must be a whole number from 1 to 1000"))?,
        };
        Ok(Page { page, per_page })
    }
}

fn queue_name(name: &str) -> Result<(), ApiError> {
    validate_queue_name(name).map_err(|e| ApiError::field("name", e))
}

fn job_id(id: &str) -> Result<JobId, ApiError> {
    id.parse::<JobId>().map_err(|_| ApiError::NotFound(format!("no job {id}")))
}

async fn list_queues(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(s.conveyor.backend().queues().await?))
}

async fn pause(State(s): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    queue_name(&name)?;
    s.conveyor.backend().pause(&name).await?;
    Ok(ok(serde_json::json!({ "queue": name, "paused": true })))
}

async fn resume(State(s): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    queue_name(&name)?;
    s.conveyor.backend().resume(&name).await?;
    Ok(ok(serde_json::json!({ "queue": name, "paused": false })))
}

async fn clear(State(s): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    queue_name(&name)?;
    let cleared = s.conveyor.backend().clear(&name).await?;
    Ok(ok(serde_json::json!({ "queue": name, "cleared": cleared })))
}

#[derive(Deserialize)]
struct JobsQuery {
    queue: Option<String>,
    kind: Option<String>,
    status: Option<String>,
    tag: Option<String>,
    batch_id: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

async fn list_jobs(State(s): State<AppState>, Query(q): Query<JobsQuery>) -> Result<Response, ApiError> {
    let p = q.paging.parse()?;
    let state = match q.status.as_deref() {
        None | Some("") => None,
        Some(st) => {
            Some(st.parse::<JobState>().map_err(|_| ApiError::field("status", "must be pending, delayed, reserved, completed or failed"))?)
        }
    };
    let filter = JobFilter {
        queue: q.queue.filter(|v| !v.is_empty()),
        kind: q.kind.filter(|v| !v.is_empty()),
        state,
        tag: q.tag.filter(|v| !v.is_empty()),
        batch_id: q.batch_id.filter(|v| !v.is_empty()),
    };
    let jobs = s.conveyor.backend().jobs(filter, p).await?;
    Ok(page(jobs.items, p.page, p.per_page, jobs.total))
}

async fn show_job(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    match s.conveyor.backend().job(id).await? {
        Some(job) => Ok(ok(job)),
        None => Err(ApiError::NotFound(format!("no job {id}"))),
    }
}

#[derive(Deserialize)]
struct FailedQuery {
    queue: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

async fn list_failed(State(s): State<AppState>, Query(q): Query<FailedQuery>) -> Result<Response, ApiError> {
    let p = q.paging.parse()?;
    let failed = s.conveyor.backend().failed(q.queue.as_deref().filter(|v| !v.is_empty()), p).await?;
    Ok(page(failed.items, p.page, p.per_page, failed.total))
}

async fn show_failed(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    match s.conveyor.backend().failed_job(id).await? {
        Some(job) => Ok(ok(job)),
        None => Err(ApiError::NotFound(format!("no failed job {id}"))),
    }
}

async fn retry_failed(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let retried = s.conveyor.backend().retry_failed(vec![id]).await?;
    if retried.is_empty() {
        return Err(ApiError::NotFound(format!("no failed job {id}")));
    }
    Ok(ok(serde_json::json!({ "retried": retried })))
}

async fn retry_all(State(s): State<AppState>) -> Result<Response, ApiError> {
    let n = s.conveyor.backend().retry_all_failed(None).await?;
    Ok(ok(serde_json::json!({ "retried": n })))
}

async fn forget_failed(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    if !s.conveyor.backend().forget_failed(id).await? {
        return Err(ApiError::NotFound(format!("no failed job {id}")));
    }
    Ok(ok(serde_json::json!({ "forgotten": id })))
}

async fn workers(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(s.conveyor.backend().workers(Duration::from_secs(30)).await?))
}

#[derive(Deserialize)]
struct SeriesQuery {
    queue: Option<String>,
    kind: Option<String>,
    /// `hour` (default) or `day`.
    period: Option<String>,
}

/// One point of a throughput / runtime / wait series.
#[derive(Serialize)]
struct Point {
    minute: i64,
    processed: u64,
    completed: u64,
    failed: u64,
    avg_runtime_ms: f64,
    p95_runtime_ms: f64,
    avg_wait_ms: f64,
    p95_wait_ms: f64,
}

#[derive(Serialize)]
struct Series {
    name: String,
    points: Vec<Point>,
    totals: Point,
}

fn point(minute: i64, r: &MetricsRow) -> Point {
    Point {
        minute,
        processed: r.processed(),
        completed: r.completed,
        failed: r.failed,
        avg_runtime_ms: r.avg_runtime_ms(),
        p95_runtime_ms: r.p95_runtime_ms(),
        avg_wait_ms: r.avg_wait_ms(),
        p95_wait_ms: r.p95_wait_ms(),
    }
}

async fn series(s: &AppState, q: SeriesQuery, by_kind: bool) -> Result<Response, ApiError> {
    let span = match q.period.as_deref() {
        None | Some("") | Some("hour") => 3_600_000,
        Some("day") => 86_400_000,
        Some(_) => return Err(ApiError::field("period", "must be hour or day")),
    };
    let rows = s.conveyor.backend().metrics(MetricsQuery { queue: q.queue, kind: q.kind, since: now_ms() - span }).await?;
    let mut groups: std::collections::BTreeMap<String, std::collections::BTreeMap<i64, MetricsRow>> = Default::default();
    for r in &rows {
        let name = if by_kind { r.kind.clone() } else { r.queue.clone() };
        groups.entry(name).or_default().entry(r.minute).or_default().merge(r);
    }
    let out: Vec<Series> = groups
        .into_iter()
        .map(|(name, minutes)| {
            let totals = summarize(minutes.values());
            Series { name, points: minutes.iter().map(|(m, r)| point(*m, r)).collect(), totals: point(0, &totals) }
        })
        .collect();
    Ok(ok(out))
}

async fn metrics_queues(State(s): State<AppState>, Query(q): Query<SeriesQuery>) -> Result<Response, ApiError> {
    series(&s, q, false).await
}

async fn metrics_jobs(State(s): State<AppState>, Query(q): Query<SeriesQuery>) -> Result<Response, ApiError> {
    series(&s, q, true).await
}
