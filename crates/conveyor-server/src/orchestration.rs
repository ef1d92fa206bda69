//! Batches, workflows, circuit breakers, the event log and schedules, as the API shows them.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use conveyor_core::backend::{JobFilter, Page};
use conveyor_core::batch::BatchInfo;
use conveyor_core::breaker::BreakerInfo;
use conveyor_core::event::EventRecord;
use conveyor_core::job::{JobInfo, JobState};
use conveyor_core::scheduler::ScheduleInfo;
use conveyor_core::workflow::WorkflowInfo;
use conveyor_core::{batch, breaker, event, workflow};

use crate::admin::Paging;
use crate::error::{ok, page, ApiError};
use crate::openapi::{Envelope, ErrorEnvelope, PagedEnvelope};
use crate::AppState;

/// A batch with (up to 100 of) its failed jobs.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub(crate) struct BatchDetail {
    #[serde(flatten)]
    batch: BatchInfo,
    failed_jobs: Vec<JobInfo>,
}

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/batches", get(list_batches))
        .route("/api/batches/{id}", get(show_batch))
        .route("/api/batches/{id}/cancel", post(cancel_batch))
        .route("/api/workflows/{id}", get(show_workflow))
        .route("/api/breakers", get(breakers))
        .route("/api/concurrency", get(concurrency_keys))
        .route("/api/events/log", get(event_log))
        .route("/api/schedules", get(schedules))
}

#[utoipa::path(get, path = "/api/batches", tag = "batches", params(("page" = Option<u32>, Query, minimum = 1, description = "from 1; page × per_page is at most 10,000"), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 50"), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")), responses((status = 200, description = "batches, newest first", body = PagedEnvelope<BatchInfo>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn list_batches(State(s): State<AppState>, Query(p): Query<Paging>) -> Result<Response, ApiError> {
    let p = p.parse()?;
    let list = batch::list(s.conveyor.backend().as_ref(), p.clone()).await?;
    Ok(page(list, &p))
}

#[utoipa::path(get, path = "/api/batches/{id}", tag = "batches", params(("id" = String, Path, description = "batch id")), responses((status = 200, description = "a batch with its failed jobs", body = Envelope<BatchDetail>), (status = 404, description = "not found", body = ErrorEnvelope)))]
pub(crate) async fn show_batch(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let backend = s.conveyor.backend();
    let info = batch::find(backend.as_ref(), &id).await?.ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    let filter = JobFilter { state: Some(JobState::Failed), batch_id: Some(id), ..Default::default() };
    let failed = backend.jobs(filter, Page::new(1, 100)).await?;
    Ok(ok(BatchDetail { batch: info, failed_jobs: failed.items }))
}

#[utoipa::path(post, path = "/api/batches/{id}/cancel", tag = "batches", params(("id" = String, Path, description = "batch id")), responses((status = 200, description = "cancelled: jobs not yet run are skipped", body = Envelope<BatchInfo>), (status = 401, description = "a token is required", body = ErrorEnvelope), (status = 404, description = "not found", body = ErrorEnvelope), (status = 409, description = "already finished or cancelled", body = ErrorEnvelope)))]
pub(crate) async fn cancel_batch(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let backend = s.conveyor.backend();
    if batch::find(backend.as_ref(), &id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no batch {id}")));
    }
    if !batch::cancel(backend.as_ref(), &id).await? {
        return Err(ApiError::Conflict(format!("batch {id} has already finished or been cancelled")));
    }
    Ok(ok(batch::find(backend.as_ref(), &id).await?))
}

#[utoipa::path(get, path = "/api/workflows/{id}", tag = "workflows", params(("id" = String, Path, description = "workflow id")), responses((status = 200, description = "a workflow with its steps and compensations", body = Envelope<WorkflowInfo>), (status = 404, description = "not found", body = ErrorEnvelope)))]
pub(crate) async fn show_workflow(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match workflow::find(s.conveyor.backend().as_ref(), &id).await? {
        Some(w) => Ok(ok(w)),
        None => Err(ApiError::NotFound(format!("no workflow {id}"))),
    }
}

#[utoipa::path(get, path = "/api/breakers", tag = "breakers", responses((status = 200, description = "circuit breakers", body = Envelope<Vec<BreakerInfo>>)))]
pub(crate) async fn breakers(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(breaker::list(s.conveyor.backend().as_ref(), Duration::from_secs(60)).await?))
}

#[derive(Deserialize)]
pub(crate) struct KeysQuery {
    limit: Option<usize>,
}

#[utoipa::path(get, path = "/api/concurrency", tag = "breakers", params(("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "how many keys, default 20")), responses((status = 200, description = "the busiest concurrency keys (most running plus waiting), with their limits", body = Envelope<Vec<conveyor_core::flow::KeyStats>>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn concurrency_keys(State(s): State<AppState>, Query(q): Query<KeysQuery>) -> Result<Response, ApiError> {
    let limit = q.limit.unwrap_or(20);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::Validation(std::collections::BTreeMap::from([("limit".to_string(), "must be 1 to 1000".to_string())])));
    }
    Ok(ok(conveyor_core::flow::keys(s.conveyor.backend().as_ref(), limit).await?))
}

#[derive(Deserialize)]
pub(crate) struct EventQuery {
    name: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

#[utoipa::path(get, path = "/api/events/log", tag = "events", params(("name" = Option<String>, Query, description = "event name"), ("page" = Option<u32>, Query, minimum = 1, description = "from 1; page × per_page is at most 10,000"), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000, description = "1 to 1000, default 50"), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")), responses((status = 200, description = "the event log, newest first", body = PagedEnvelope<EventRecord>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn event_log(State(s): State<AppState>, Query(q): Query<EventQuery>) -> Result<Response, ApiError> {
    let p = q.paging.parse()?;
    let list = event::recent(s.conveyor.backend().as_ref(), q.name.as_deref().filter(|n| !n.is_empty()), p.clone()).await?;
    Ok(page(list, &p))
}

#[utoipa::path(get, path = "/api/schedules", tag = "schedules", responses((status = 200, description = "schedules fired by this process", body = Envelope<Vec<ScheduleInfo>>)))]
pub(crate) async fn schedules(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(s.schedules.as_deref().cloned().unwrap_or_default()))
}
