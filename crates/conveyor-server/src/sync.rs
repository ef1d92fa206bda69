//! The product sync endpoints: start a run (`POST /api/sync/products`, and `GET /trigger-sync`
//! for a quick local demo), the runs, health, and replaying failures.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde_json::Value;

use conveyor_apps::sync::{self, SyncError};

use crate::admin::Paging;
use crate::error::{ok, page, ApiError};
use crate::openapi::ErrorEnvelope;
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/sync/products", post(start))
        .route("/trigger-sync", get(trigger))
        .route("/api/sync/runs", get(runs))
        .route("/api/sync/runs/{id}", get(run))
        .route("/api/sync/health", get(health))
        .route("/api/sync/retry-failures", post(retry_failures))
}

impl From<SyncError> for ApiError {
    fn from(e: SyncError) -> Self {
        match e {
            SyncError::NotConfigured(var) => ApiError::NotConfigured(format!("product sync is not configured: set {var}")),
            SyncError::Backend(e) => e.into(),
        }
    }
}

fn configured(s: &AppState) -> Result<&sync::SyncConfig, ApiError> {
    match s.sync.as_deref() {
        Some(c) if c.is_configured() => Ok(c),
        Some(c) => Err(ApiError::NotConfigured(format!("product sync is not configured: set {}", c.missing().unwrap_or_default()))),
        None => Err(ApiError::NotConfigured("product sync is not configured: set CONVEYOR_SYNC_SOURCE_URL".into())),
    }
}

async fn started(s: &AppState, full: bool) -> Result<Response, ApiError> {
    configured(s)?;
    let r = sync::start(&s.conveyor, full).await?;
    Ok((StatusCode::ACCEPTED, ok(r)).into_response())
}

#[utoipa::path(post, path = "/api/sync/products", tag = "sync",
    request_body(content = Object, description = "{full: false}"),
    responses((status = 202, description = "{run_id, batch_id, joined}: the run started, or the one already running", body = Envelope<Object>),
              (status = 422, description = "`full` is not a boolean", body = ErrorEnvelope),
              (status = 409, description = "the partners are not configured", body = ErrorEnvelope)))]
pub(crate) async fn start(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let full = if body.iter().all(u8::is_ascii_whitespace) {
        false
    } else {
        let v: Value = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
        if !v.is_object() {
            return Err(ApiError::BadRequest("the body must be a JSON object".into()));
        }
        match v.get("full") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(b)) => *b,
            Some(_) => return Err(ApiError::field("full", "must be a boolean")),
        }
    };
    started(&s, full).await
}

#[utoipa::path(get, path = "/trigger-sync", tag = "sync",
    responses((status = 202, description = "{run_id, batch_id, joined}", body = Envelope<Object>),
              (status = 403, description = "disabled because an API token is set", body = ErrorEnvelope),
              (status = 409, description = "the partners are not configured", body = ErrorEnvelope)))]
pub(crate) async fn trigger(State(s): State<AppState>) -> Result<Response, ApiError> {
    // A GET that acts is only safe where nothing but this machine can reach the server and no
    // other site can make a browser call it: without tokens (loopback only), and past the
    // guard's `Host` and cross-site checks.
    if s.access.enabled() {
        return Err(ApiError::Forbidden("GET /trigger-sync is disabled when a token is set; use POST /api/sync/products".into()));
    }
    started(&s, false).await
}

#[utoipa::path(get, path = "/api/sync/runs", tag = "sync",
    params(("page" = Option<u32>, Query, minimum = 1), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")),
    responses((status = 200, description = "runs, newest first: {id, status, scope, batch_id, started_at, finished_at, pages, error, counts}", body = PagedEnvelope<Object>),
              (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn runs(State(s): State<AppState>, Query(q): Query<Paging>) -> Result<Response, ApiError> {
    let p = q.parse()?;
    let r = sync::runs(s.conveyor.backend().as_ref(), p.clone()).await?;
    Ok(page(r, &p))
}

#[utoipa::path(get, path = "/api/sync/runs/{id}", tag = "sync", params(("id" = String, Path)),
    responses((status = 200, description = "the run", body = Envelope<Object>), (status = 404, description = "no such run", body = ErrorEnvelope)))]
pub(crate) async fn run(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match sync::run(s.conveyor.backend().as_ref(), &id).await? {
        Some(r) => Ok(ok(r)),
        None => Err(ApiError::NotFound(format!("no sync run {id}"))),
    }
}

#[utoipa::path(get, path = "/api/sync/health", tag = "sync",
    responses((status = 200, description = "last run, failure counts, breakers, request durations per partner (what `conveyor sync health --json` prints)", body = Envelope<Object>)))]
pub(crate) async fn health(State(s): State<AppState>) -> Result<Response, ApiError> {
    let config = s.sync.as_deref().cloned().unwrap_or_default();
    Ok(ok(sync::health(s.conveyor.backend().as_ref(), &config).await?))
}

#[utoipa::path(post, path = "/api/sync/retry-failures", tag = "sync",
    responses((status = 202, description = "{replayed, still_invalid, batch_id}", body = Envelope<Object>),
              (status = 409, description = "the partners are not configured", body = ErrorEnvelope)))]
pub(crate) async fn retry_failures(State(s): State<AppState>) -> Result<Response, ApiError> {
    let config = configured(&s)?.clone();
    let r = sync::retry_failures(&s.conveyor, &config).await?;
    Ok((StatusCode::ACCEPTED, ok(r)).into_response())
}
