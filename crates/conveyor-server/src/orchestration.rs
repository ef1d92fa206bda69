//! Batches, workflows, circuit breakers, the event log and schedules, as the API shows them.

use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use conveyor_core::backend::{JobFilter, Page};
use conveyor_core::job::JobState;
use conveyor_core::{batch, breaker, event, workflow};

use crate::admin::Paging;
use crate::error::{ok, page, ApiError};
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/batches", get(list_batches))
        .route("/api/batches/{id}", get(show_batch))
        .route("/api/batches/{id}/cancel", post(cancel_batch))
        .route("/api/workflows/{id}", get(show_workflow))
        .route("/api/breakers", get(breakers))
        .route("/api/events/log", get(event_log))
        .route("/api/schedules", get(schedules))
}

async fn list_batches(State(s): State<AppState>, Query(p): Query<Paging>) -> Result<Response, ApiError> {
    let p = p.parse()?;
    let list = batch::list(s.conveyor.backend().as_ref(), p).await?;
    Ok(page(list.items, p.page, p.per_page, list.total))
}

async fn show_batch(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let backend = s.conveyor.backend();
    let info = batch::find(backend.as_ref(), &id).await?.ok_or_else(|| ApiError::NotFound(format!("no batch {id}")))?;
    let filter = JobFilter { state: Some(JobState::Failed), batch_id: Some(id), ..Default::default() };
    let failed = backend.jobs(filter, Page { page: 1, per_page: 100 }).await?;
    let mut data = serde_json::to_value(&info).map_err(|e| ApiError::Internal(e.to_string()))?;
    data["failed_jobs"] = serde_json::to_value(&failed.items).map_err(|e| ApiError::Internal(e.to_string()))?;
    Ok(ok(data))
}

async fn cancel_batch(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let backend = s.conveyor.backend();
    if batch::find(backend.as_ref(), &id).await?.is_none() {
        return Err(ApiError::NotFound(format!("no batch {id}")));
    }
    if !batch::cancel(backend.as_ref(), &id).await? {
        return Err(ApiError::Conflict(format!("batch {id} has already finished or been cancelled")));
    }
    Ok(ok(batch::find(backend.as_ref(), &id).await?))
}

async fn show_workflow(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match workflow::find(s.conveyor.backend().as_ref(), &id).await? {
        Some(w) => Ok(ok(w)),
        None => Err(ApiError::NotFound(format!("no workflow {id}"))),
    }
}

async fn breakers(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(breaker::list(s.conveyor.backend().as_ref(), Duration::from_secs(60)).await?))
}

#[derive(Deserialize)]
struct EventQuery {
    name: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

async fn event_log(State(s): State<AppState>, Query(q): Query<EventQuery>) -> Result<Response, ApiError> {
    let p = q.paging.parse()?;
    let list = event::recent(s.conveyor.backend().as_ref(), q.name.as_deref().filter(|n| !n.is_empty()), p).await?;
    Ok(page(list.items, p.page, p.per_page, list.total))
}

async fn schedules(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(s.schedules.as_deref().cloned().unwrap_or_default()))
}
