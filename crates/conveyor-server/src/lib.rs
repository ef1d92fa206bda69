//! Conveyor's HTTP API: the SPEC's envelopes and errors ([`error`]), health, queue
//! administration ([`admin`]), and Prometheus metrics. Only this crate serves HTTP.
//!
//! [`router`] builds the whole app so tests can call it without a socket; [`serve`] runs it
//! until the shared shutdown token is cancelled.

pub mod access;
pub mod error;
pub mod faktory;

mod admin;
mod dashboard;
mod health;
mod jobs;
mod kinds;
#[cfg(feature = "notify")]
mod notify;
mod openapi;
mod orchestration;
#[cfg(feature = "orders")]
mod orders;
#[cfg(feature = "sync")]
pub mod partners;
mod prometheus;
#[cfg(feature = "notify")]
mod secrets;
mod stats;
#[cfg(feature = "sync")]
mod sync;

use std::sync::Arc;

use axum::extract::Request;
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};

pub use access::{AccessConfig, Role};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use conveyor_core::scheduler::ScheduleInfo;
use conveyor_core::Conveyor;

use error::ApiError;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub conveyor: Conveyor,
    pub(crate) access: access::SharedAccess,
    /// The schedules this process fires, if it runs a scheduler.
    pub(crate) schedules: Option<Arc<Vec<ScheduleInfo>>>,
    /// The product sync's settings (its partners), when the process has them.
    #[cfg(feature = "sync")]
    pub(crate) sync: Option<Arc<conveyor_apps::sync::SyncConfig>>,
    /// The HTTP kinds this process runs (`[[kinds]]`).
    pub(crate) kinds: Arc<Vec<conveyor_apps::kinds::HttpKind>>,
}

impl AppState {
    pub fn new(conveyor: Conveyor, access: AccessConfig) -> Self {
        AppState {
            conveyor,
            access: Arc::new(access::Access::new(access)),
            schedules: None,
            #[cfg(feature = "sync")]
            sync: None,
            kinds: Arc::default(),
        }
    }

    #[cfg(feature = "sync")]
    pub fn with_sync(mut self, config: conveyor_apps::sync::SyncConfig) -> Self {
        self.sync = Some(Arc::new(config));
        self
    }

    pub fn with_kinds(mut self, kinds: Vec<conveyor_apps::kinds::HttpKind>) -> Self {
        self.kinds = Arc::new(kinds);
        self
    }

    pub fn with_schedules(mut self, schedules: Option<Vec<ScheduleInfo>>) -> Self {
        self.schedules = schedules.map(Arc::new);
        self
    }
}

pub fn router(state: AppState) -> Router {
    let app = Router::new()
        .route("/api/health", get(health::health))
        .route("/health", get(health::health))
        .route("/metrics", get(prometheus::metrics))
        .route("/api/stats", get(stats::stats))
        .route("/api/openapi.json", get(openapi::document))
        .merge(admin::routes())
        .merge(jobs::routes())
        .merge(orchestration::routes())
        .merge(kinds::routes())
        .merge(dashboard::routes());
    // The applications this build has (cargo features).
    #[cfg(feature = "orders")]
    let app = app.merge(orders::routes());
    #[cfg(feature = "notify")]
    let app = app.merge(notify::routes()).merge(secrets::routes());
    #[cfg(feature = "sync")]
    let app = app.merge(sync::routes());
    app.fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(envelope_errors))
        .layer(middleware::from_fn(trace_context))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), access::guard))
        .with_state(state)
}

/// Runs the request in the trace of its W3C `traceparent` header, if it has a valid one: the
/// jobs and events it creates join that trace ([`conveyor_core::trace`]).
async fn trace_context(req: Request, next: Next) -> Response {
    let ctx = req.headers().get("traceparent").and_then(|v| v.to_str().ok()).and_then(conveyor_core::trace::TraceContext::parse);
    conveyor_core::trace::in_context(ctx, next.run(req)).await
}

/// The largest CSV order import accepted (it streams, so it may be far larger than JSON).
#[cfg(feature = "orders")]
const MAX_IMPORT: usize = orders::MAX_IMPORT;
#[cfg(not(feature = "orders"))]
const MAX_IMPORT: usize = MAX_BODY;

/// The largest request body accepted (CSV imports stream through their own limit).
pub const MAX_BODY: usize = 2 * 1024 * 1024;
/// How long a request may take before it is answered with 503.
pub const REQUEST_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Gives every request a deadline, and turns axum's own plain-text rejections (a body over the
/// limit, a malformed path) into the SPEC's error envelope.
async fn envelope_errors(req: Request, next: Next) -> Response {
    // A declared length over the limit is refused before anything reads the body (handlers
    // that take no body would otherwise accept it); undeclared lengths meet DefaultBodyLimit.
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let import = req.uri().path() == "/api/orders/import";
    let bulk = matches!(req.uri().path(), "/api/jobs/bulk" | "/api/batches");
    let limit = if import {
        MAX_IMPORT
    } else if bulk {
        jobs::MAX_BULK_BODY
    } else {
        MAX_BODY
    };
    if declared.is_some_and(|n| n > limit as u64) {
        return ApiError::PayloadTooLarge(limit).into_response();
    }
    // An import commits batch by batch: cutting it off halfway would leave it partial, so it
    // gets a deadline sized for its largest body rather than the usual one.
    let deadline = if import { std::time::Duration::from_secs(600) } else { REQUEST_TIMEOUT };
    let res = match tokio::time::timeout(deadline, next.run(req)).await {
        Ok(res) => res,
        Err(_) => return ApiError::Unavailable("request timed out".into()).into_response(),
    };
    let is_json = res.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.starts_with("application/json"));
    if is_json || res.status().is_success() || res.status().is_redirection() {
        return res;
    }
    match res.status() {
        axum::http::StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge(MAX_BODY).into_response(),
        axum::http::StatusCode::BAD_REQUEST => ApiError::BadRequest("malformed request".into()).into_response(),
        axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE => ApiError::BadRequest("unsupported content type".into()).into_response(),
        axum::http::StatusCode::UNPROCESSABLE_ENTITY => {
            ApiError::BadRequest("the request body does not match the expected shape".into()).into_response()
        }
        _ => res,
    }
}

/// How long a client may take to send a request's head: a connection that trickles its
/// headers (slowloris) is closed rather than held open.
pub const HEADER_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The most connections served at once by default (`CONVEYOR_HTTP_MAX_CONNECTIONS`); further
/// ones wait in the listen backlog until one closes.
pub const MAX_CONNECTIONS: usize = 1024;

/// Serves the API on `listener` until `shutdown` is cancelled, with at most [`MAX_CONNECTIONS`].
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> std::io::Result<()> {
    serve_with(listener, state, shutdown, MAX_CONNECTIONS).await
}

/// Serves the API on `listener` until `shutdown` is cancelled; in-flight requests finish (up
/// to their deadline). Each connection is HTTP/1.1 with [`HEADER_READ_TIMEOUT`], and at most
/// `max_connections` are open at once.
pub async fn serve_with(
    listener: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
    max_connections: usize,
) -> std::io::Result<()> {
    serve_app(listener, router(state), shutdown, max_connections).await
}

/// Only `GET /metrics` and `/health`, with the same access rules, for a process that runs
/// workers without the API (`conveyor work` with `CONVEYOR_METRICS_ADDR`): its counters are its
/// own, so Prometheus scrapes it too.
pub async fn serve_metrics(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(prometheus::metrics))
        .route("/health", get(health::health))
        .fallback(|| async { ApiError::NotFound("this port serves /metrics and /health only".into()) })
        .layer(middleware::from_fn(envelope_errors))
        .layer(middleware::from_fn_with_state(state.clone(), access::guard))
        .with_state(state);
    serve_app(listener, app, shutdown, 64).await
}

async fn serve_app(listener: TcpListener, app: Router, shutdown: CancellationToken, max_connections: usize) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use hyper_util::service::TowerToHyperService;

    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    loop {
        let slot = tokio::select! {
            s = slots.clone().acquire_owned() => s.expect("the semaphore is never closed"),
            _ = shutdown.cancelled() => break,
        };
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: wait a moment rather than spin.
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => break,
        };
        let _ = stream.set_nodelay(true);
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app.clone()));
        let conn = graceful.watch(conn);
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(REQUEST_TIMEOUT + std::time::Duration::from_secs(5), graceful.shutdown()).await.is_err() {
        tracing::warn!("HTTP connections still open at shutdown were closed");
    }
    Ok(())
}
