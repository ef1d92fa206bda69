//! Queue administration: queues, jobs, the failed store, workers and metrics (what the
//! dashboard and `conveyor queue|failed` use).

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{delete, get, post};
use axum::Router;
use serde::{Deserialize, Serialize};

use conveyor_core::backend::{Cursor, FailedJob, JobFilter, MetricsQuery, Page, QueueStats, WorkerInfo, MAX_DEPTH};
use conveyor_core::clock::now_ms;
use conveyor_core::job::JobInfo;
use conveyor_core::job::{validate_queue_name, JobId, JobState};
use conveyor_core::metrics::{summarize, MetricsRow};

use crate::error::{ok, page, ApiError};
use crate::openapi::{Cleared, Envelope, ErrorEnvelope, Forgotten, PagedEnvelope, QueueState, Retried, RetriedCount};
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
        .route("/api/workers/{id}/{signal}", post(signal_worker))
        .route("/api/metrics/queues", get(metrics_queues))
        .route("/api/metrics/jobs", get(metrics_jobs))
}

/// `page`, `per_page` and `cursor` as the SPEC defines them.
#[derive(Deserialize, Default)]
pub(crate) struct Paging {
    page: Option<String>,
    per_page: Option<String>,
    cursor: Option<String>,
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
        if let Some(c) = self.cursor.as_deref().filter(|c| !c.is_empty()) {
            // A cursor page costs the same at any depth; `page` has no meaning with it.
            let cursor =
                Cursor::decode(c).ok_or_else(|| ApiError::field("cursor", "is not a cursor this API returned (meta.next_cursor)"))?;
            return Ok(Page::after(cursor, per_page));
        }
        // An offset page reads every row before it, so how deep one reaches is bounded.
        if page as u64 * per_page as u64 > MAX_DEPTH {
            return Err(ApiError::field(
                "page",
                format!("page × per_page may be at most {MAX_DEPTH}; read further with `cursor` (meta.next_cursor)"),
            ));
        }
        Ok(Page::new(page, per_page))
    }
}

fn queue_name(name: &str) -> Result<(), ApiError> {
    validate_queue_name(name).map_err(|e| ApiError::field("name", e))
}

fn job_id(id: &str) -> Result<JobId, ApiError> {
    id.parse::<JobId>().map_err(|_| ApiError::NotFound(format!("no job {id}")))
}

#[utoipa::path(get, path = "/api/queues", tag = "queues", responses((status = 200, description = "every queue with its numbers", body = Envelope<Vec<QueueStats>>)))]
pub(crate) async fn list_queues(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(s.conveyor.backend().queues().await?))
}

#[utoipa::path(post, path = "/api/queues/{name}/pause", tag = "queues", params(("name" = String, Path, description = "queue name")), responses((status = 200, description = "paused", body = Envelope<QueueState>), (status = 401, description = "a token is required", body = ErrorEnvelope), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn pause(State(s): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    queue_name(&name)?;
    s.conveyor.backend().pause(&name).await?;
    Ok(ok(serde_json::json!({ "queue": name, "paused": true })))
}

#[utoipa::path(post, path = "/api/queues/{name}/resume", tag = "queues", params(("name" = String, Path, description = "queue name")), responses((status = 200, description = "resumed", body = Envelope<QueueState>), (status = 401, description = "a token is required", body = ErrorEnvelope), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn resume(State(s): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    queue_name(&name)?;
    s.conveyor.backend().resume(&name).await?;
    Ok(ok(serde_json::json!({ "queue": name, "paused": false })))
}

#[utoipa::path(post, path = "/api/queues/{name}/clear", tag = "queues", params(("name" = String, Path, description = "queue name")), responses((status = 200, description = "pending and delayed jobs deleted", body = Envelope<Cleared>), (status = 401, description = "a token is required", body = ErrorEnvelope), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn clear(State(s): State<AppState>, Path(name): Path<String>) -> Result<Response, ApiError> {
    queue_name(&name)?;
    let cleared = s.conveyor.backend().clear(&name).await?;
    Ok(ok(serde_json::json!({ "queue": name, "cleared": cleared })))
}

#[derive(Deserialize)]
pub(crate) struct JobsQuery {
    queue: Option<String>,
    kind: Option<String>,
    status: Option<String>,
    tag: Option<String>,
    batch_id: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

#[utoipa::path(get, path = "/api/jobs", tag = "jobs", params(("queue" = Option<String>, Query), ("kind" = Option<String>, Query), ("status" = Option<String>, Query, description = "pending, delayed, reserved, completed or failed"), ("tag" = Option<String>, Query), ("batch_id" = Option<String>, Query), ("page" = Option<u32>, Query, minimum = 1, description = "from 1; page × per_page is at most 10,000"), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 50"), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")), responses((status = 200, description = "jobs, newest first", body = PagedEnvelope<JobInfo>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn list_jobs(State(s): State<AppState>, Query(q): Query<JobsQuery>) -> Result<Response, ApiError> {
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
    let jobs = s.conveyor.backend().jobs(filter, p.clone()).await?;
    Ok(page(jobs, &p))
}

#[utoipa::path(get, path = "/api/jobs/{id}", tag = "jobs", params(("id" = String, Path, description = "job id")), responses((status = 200, description = "the job in any state; a waiting one has `waiting: {reason: paused|key_limit|rate_limit|breaker_open|no_worker|scheduled, detail}`", body = Envelope<JobInfo>), (status = 404, description = "not found", body = ErrorEnvelope)))]
pub(crate) async fn show_job(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let Some(job) = s.conveyor.backend().job(id).await? else { return Err(ApiError::NotFound(format!("no job {id}"))) };
    let remote = !s.conveyor.registry().contains(&job.kind);
    let mut v = serde_json::to_value(&job).map_err(|e| ApiError::Internal(e.to_string()))?;
    v["remote"] = serde_json::json!(remote);
    if let Some(w) = waiting(&s, &job, remote).await? {
        v["waiting"] = w;
    }
    Ok(ok(v))
}

/// Why a job that has not run yet waits, when the store can say (SPEC "Flow control"): its
/// queue is paused, its concurrency key is at its limit, it is a remote job no worker is
/// connected to fetch, a breaker or rate limit of its kind released it, or it is scheduled (a
/// delay, or a retry's backoff). `None` for a job that is simply next in line, or not waiting.
async fn waiting(s: &AppState, job: &conveyor_core::job::JobInfo, remote: bool) -> Result<Option<serde_json::Value>, ApiError> {
    if !matches!(job.state, JobState::Pending | JobState::Delayed) {
        return Ok(None);
    }
    let queues = s.conveyor.backend().queues().await?;
    if queues.iter().any(|q| q.queue == job.queue && q.paused) {
        return Ok(Some(serde_json::json!({ "reason": "paused", "detail": format!("queue {:?} is paused", job.queue) })));
    }
    if job.state == JobState::Delayed {
        let c = conveyor_core::flow::Concurrency::of(s.conveyor.registry(), &job.kind, || Some(job.payload.clone()), &job.tags);
        if let Some(c) = c {
            if let Some((limit, running)) = conveyor_core::flow::waiting(s.conveyor.backend().as_ref(), &c.key, job.id).await? {
                let detail =
                    format!("its concurrency key {:?} is at its limit ({running} of {limit} running); it runs when a slot frees", c.key);
                return Ok(Some(serde_json::json!({ "reason": "key_limit", "detail": detail })));
            }
        }
    }
    if remote && job.state == JobState::Pending {
        let workers = s.conveyor.backend().workers(Duration::from_secs(60)).await?;
        if !workers.iter().any(|w| w.supervisors.iter().any(|sup| sup.name.starts_with("faktory"))) {
            let detail = format!("{:?} is not a kind this server runs, and no Faktory worker is connected to fetch it", job.kind);
            return Ok(Some(serde_json::json!({ "reason": "no_worker", "detail": detail })));
        }
    }
    let now = conveyor_core::clock::now_ms();
    if let Some(at) = job.available_at.filter(|at| job.state == JobState::Delayed && *at > now) {
        let when = conveyor_core::clock::format_rfc3339_ms(at).unwrap_or_default();
        let secs = (at - now + 999) / 1000;
        // Reserved before, delayed now without an error: released by a middleware.
        if job.reserved_at.is_some() && job.error.is_none() {
            if let Some((reason, why)) = conveyor_core::middleware::release_cause(&s.conveyor, &job.kind).await {
                let detail = format!("{why}; it runs again at {when} (in {secs} s)");
                return Ok(Some(serde_json::json!({ "reason": reason, "detail": detail })));
            }
        }
        let detail = match &job.error {
            Some(_) if job.attempts > 0 => format!("its next attempt is due at {when} (in {secs} s), after its backoff"),
            _ => format!("it is scheduled to run at {when} (in {secs} s)"),
        };
        return Ok(Some(serde_json::json!({ "reason": "scheduled", "detail": detail })));
    }
    Ok(None)
}

#[derive(Deserialize)]
pub(crate) struct FailedQuery {
    queue: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

#[utoipa::path(get, path = "/api/jobs/failed", tag = "failed", params(("queue" = Option<String>, Query), ("page" = Option<u32>, Query, minimum = 1, description = "from 1; page × per_page is at most 10,000"), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 50"), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")), responses((status = 200, description = "failed jobs, newest first", body = PagedEnvelope<FailedJob>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn list_failed(State(s): State<AppState>, Query(q): Query<FailedQuery>) -> Result<Response, ApiError> {
    let p = q.paging.parse()?;
    let failed = s.conveyor.backend().failed(q.queue.as_deref().filter(|v| !v.is_empty()), p.clone()).await?;
    Ok(page(failed, &p))
}

#[utoipa::path(get, path = "/api/jobs/failed/{id}", tag = "failed", params(("id" = String, Path, description = "job id")), responses((status = 200, description = "a failed job", body = Envelope<FailedJob>), (status = 404, description = "not found", body = ErrorEnvelope)))]
pub(crate) async fn show_failed(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    match s.conveyor.backend().failed_job(id).await? {
        Some(job) => Ok(ok(job)),
        None => Err(ApiError::NotFound(format!("no failed job {id}"))),
    }
}

#[utoipa::path(post, path = "/api/jobs/failed/{id}/retry", tag = "failed", params(("id" = String, Path, description = "job id")), responses((status = 200, description = "back on its queue, same id", body = Envelope<Retried>), (status = 401, description = "a token is required", body = ErrorEnvelope), (status = 404, description = "not found", body = ErrorEnvelope)))]
pub(crate) async fn retry_failed(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    let retried = s.conveyor.backend().retry_failed(vec![id]).await?;
    if retried.is_empty() {
        return Err(ApiError::NotFound(format!("no failed job {id}")));
    }
    Ok(ok(serde_json::json!({ "retried": retried })))
}

#[utoipa::path(post, path = "/api/jobs/failed/retry-all", tag = "failed", responses((status = 200, description = "every failed job back on its queue", body = Envelope<RetriedCount>), (status = 401, description = "a token is required", body = ErrorEnvelope)))]
pub(crate) async fn retry_all(State(s): State<AppState>) -> Result<Response, ApiError> {
    let n = s.conveyor.backend().retry_all_failed(None).await?;
    Ok(ok(serde_json::json!({ "retried": n })))
}

#[utoipa::path(delete, path = "/api/jobs/failed/{id}", tag = "failed", params(("id" = String, Path, description = "job id")), responses((status = 200, description = "deleted", body = Envelope<Forgotten>), (status = 401, description = "a token is required", body = ErrorEnvelope), (status = 404, description = "not found", body = ErrorEnvelope)))]
pub(crate) async fn forget_failed(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id = job_id(&id)?;
    if !s.conveyor.backend().forget_failed(id).await? {
        return Err(ApiError::NotFound(format!("no failed job {id}")));
    }
    Ok(ok(serde_json::json!({ "forgotten": id })))
}

#[utoipa::path(get, path = "/api/workers", tag = "workers", responses((status = 200, description = "worker processes seen in the last 30 s", body = Envelope<Vec<WorkerInfo>>)))]
pub(crate) async fn workers(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(s.conveyor.backend().workers(Duration::from_secs(30)).await?))
}

#[utoipa::path(post, path = "/api/workers/{id}/{signal}", tag = "workers",
    params(("id" = String, Path, description = "the remote worker's wid"), ("signal" = String, Path, description = "`quiet` (stop fetching) or `stop` (terminate)")),
    responses((status = 200, description = "{id, state}: told on its next BEAT", body = Envelope<Object>),
              (status = 422, description = "not a signal, or not a wid", body = ErrorEnvelope)))]
pub(crate) async fn signal_worker(State(s): State<AppState>, Path((id, signal)): Path<(String, String)>) -> Result<Response, ApiError> {
    let state = crate::faktory::signal_worker(s.conveyor.backend(), &id, &signal).await.map_err(|e| match e {
        conveyor_core::BackendError::Invalid(why) => ApiError::field("signal", why),
        other => other.into(),
    })?;
    Ok(ok(serde_json::json!({ "id": id, "state": state })))
}

#[derive(Deserialize)]
pub(crate) struct SeriesQuery {
    queue: Option<String>,
    kind: Option<String>,
    /// `hour` (default) or `day`.
    period: Option<String>,
}

/// One point of a throughput / runtime / wait series.
#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Point {
    minute: i64,
    processed: u64,
    completed: u64,
    failed: u64,
    avg_runtime_ms: f64,
    p95_runtime_ms: f64,
    avg_wait_ms: f64,
    p95_wait_ms: f64,
}

#[derive(Serialize, utoipa::ToSchema)]
pub(crate) struct Series {
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

#[utoipa::path(get, path = "/api/metrics/queues", tag = "metrics", params(("queue" = Option<String>, Query), ("kind" = Option<String>, Query), ("period" = Option<String>, Query, description = "hour (default) or day")), responses((status = 200, description = "per-minute series per queue", body = Envelope<Vec<Series>>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn metrics_queues(State(s): State<AppState>, Query(q): Query<SeriesQuery>) -> Result<Response, ApiError> {
    series(&s, q, false).await
}

#[utoipa::path(get, path = "/api/metrics/jobs", tag = "metrics", params(("queue" = Option<String>, Query), ("kind" = Option<String>, Query), ("period" = Option<String>, Query, description = "hour (default) or day")), responses((status = 200, description = "per-minute series per job kind", body = Envelope<Vec<Series>>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn metrics_jobs(State(s): State<AppState>, Query(q): Query<SeriesQuery>) -> Result<Response, ApiError> {
    series(&s, q, true).await
}

/// The bounds of lists (and of the other endpoints a caller could make work without bound),
/// through the whole router on a store of the test's own.
#[cfg(test)]
pub(crate) mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use http_body_util::BodyExt;
    use serde_json::{json, Value};
    use tower::ServiceExt;

    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_core::{Conveyor, NewJob, QueueBackend, Registry};

    use crate::{router, AppState};

    pub(crate) struct TestApp {
        pub(crate) conveyor: Conveyor,
        _dir: tempfile::TempDir,
    }

    pub(crate) async fn app() -> TestApp {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn QueueBackend> =
            Arc::new(SqliteBackend::open(SqliteOptions::new(dir.path().join("api.db").to_string_lossy().to_string())).unwrap());
        conveyor_apps::migrate(backend.as_ref()).await.unwrap();
        TestApp { conveyor: Conveyor::new(backend, Registry::new()), _dir: dir }
    }

    impl TestApp {
        pub(crate) async fn call(&self, method: &str, uri: &str, body: Option<Value>) -> (StatusCode, Value) {
            let mut req = Request::builder().method(method).uri(uri);
            let body = match body {
                Some(b) => {
                    req = req.header("content-type", "application/json");
                    Body::from(b.to_string())
                }
                None => Body::empty(),
            };
            let resp = router(AppState::new(self.conveyor.clone(), crate::AccessConfig::default()))
                .oneshot(req.body(body).unwrap())
                .await
                .unwrap();
            let status = resp.status();
            let bytes = resp.into_body().collect().await.unwrap().to_bytes();
            (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null))
        }

        pub(crate) async fn get(&self, uri: &str) -> (StatusCode, Value) {
            self.call("GET", uri, None).await
        }
    }

    fn field(v: &Value) -> Vec<&str> {
        v["error"]["details"]["fields"].as_object().map(|f| f.keys().map(String::as_str).collect()).unwrap_or_default()
    }

    #[tokio::test]
    async fn a_page_past_ten_thousand_rows_is_refused_naming_page() {
        let app = app().await;
        let (status, body) = app.get("/api/jobs?page=201&per_page=50").await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(field(&body), ["page"]);
        assert!(body["error"]["message"].as_str().unwrap().contains("cursor"), "{body}");
        assert_eq!(app.get("/api/jobs?page=200&per_page=50").await.0, StatusCode::OK, "exactly 10,000 deep is allowed");
        for list in ["/api/jobs/failed", "/api/batches", "/api/orders", "/api/v1/notifications", "/api/templates", "/api/events/log"] {
            let (status, body) = app.get(&format!("{list}?page=10001&per_page=1")).await;
            assert_eq!((status, field(&body)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["page"]), "{list}: {body}");
        }
        let (status, body) = app.get("/api/jobs?cursor=not-a-cursor").await;
        assert_eq!((status, field(&body)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["cursor"]), "{body}");
    }

    #[tokio::test]
    async fn cursor_pages_return_every_job_once_and_totals_stop_at_ten_thousand() {
        let app = app().await;
        let n = 10_050;
        let jobs: Vec<NewJob> = (0..n).map(|i| NewJob::new("bounds.test", &json!({ "i": i })).queue("bounds")).collect();
        for chunk in jobs.chunks(1000) {
            app.conveyor.backend().enqueue(chunk.to_vec()).await.unwrap();
        }
        let (status, first) = app.get("/api/jobs?queue=bounds&per_page=1000").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(first["meta"]["total"], 10_000);
        assert_eq!(first["meta"]["total_capped"], true);
        let mut seen = std::collections::HashSet::new();
        let mut page = first;
        let mut pages = 1;
        loop {
            for j in page["data"].as_array().unwrap() {
                assert!(seen.insert(j["id"].as_str().unwrap().to_string()), "a job listed twice: {}", j["id"]);
            }
            let Some(next) = page["meta"]["next_cursor"].as_str().map(str::to_string) else { break };
            let (status, body) = app.get(&format!("/api/jobs?queue=bounds&per_page=1000&cursor={next}")).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            assert_eq!(body["meta"]["page"], Value::Null, "a cursor page has no number");
            page = body;
            pages += 1;
        }
        assert_eq!((seen.len(), pages), (n, 11), "every job exactly once, past the offset limit");

        let (_, small) = app.get("/api/jobs?queue=none").await;
        assert_eq!((small["meta"]["total"].as_u64(), small["meta"]["total_capped"].as_bool()), (Some(0), Some(false)));
        assert!(small["meta"].get("next_cursor").is_none());
    }

    #[tokio::test]
    async fn a_hostile_template_fails_fast_on_preview_and_a_huge_one_is_refused() {
        let app = app().await;
        let (status, t) = app
            .call(
                "POST",
                "/api/templates",
                Some(json!({ "name": "loop", "channel": "sms", "body": "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}" })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{t}");
        let id = t["data"]["id"].as_i64().unwrap();
        let started = std::time::Instant::now();
        let (status, body) = app.call("POST", &format!("/api/templates/{id}/preview"), Some(json!({ "payload": {} }))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("too much work"), "{body}");
        assert!(started.elapsed() < std::time::Duration::from_secs(2), "{:?}", started.elapsed());

        let (status, t) =
            app.call("POST", "/api/templates", Some(json!({ "name": "wide", "channel": "sms", "body": "{{ 'x' * 1000000 }}" }))).await;
        assert_eq!(status, StatusCode::CREATED, "{t}");
        let id = t["data"]["id"].as_i64().unwrap();
        let (status, body) = app.call("POST", &format!("/api/templates/{id}/preview"), Some(json!({ "payload": {} }))).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert!(body["error"]["message"].as_str().unwrap().contains("256 KiB"), "{body}");

        let (status, body) =
            app.call("POST", "/api/templates", Some(json!({ "name": "huge", "channel": "sms", "body": "x".repeat(64 * 1024 + 1) }))).await;
        assert_eq!((status, field(&body)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["body"]), "{body}");
    }

    #[tokio::test]
    async fn a_kpi_range_over_366_days_is_refused_naming_end_date() {
        let app = app().await;
        let (status, body) = app.get("/api/kpis/range?start_date=2020-01-01&end_date=2026-01-01").await;
        assert_eq!((status, field(&body)), (StatusCode::UNPROCESSABLE_ENTITY, vec!["end_date"]), "{body}");
        assert_eq!(app.get("/api/kpis/range?start_date=2026-01-01&end_date=2026-01-31").await.0, StatusCode::OK);
    }
}
