//! Conveyor's HTTP API: the SPEC's envelopes and errors ([`error`]), health, queue
//! administration ([`admin`]), and Prometheus metrics. Only this crate serves HTTP.
//!
//! [`router`] builds the whole app so tests can call it without a socket; [`serve`] runs it
//! until the shared shutdown token is cancelled.

pub mod error;

mod admin;
mod dashboard;
mod health;
mod notify;
mod openapi;
mod orchestration;
mod orders;
pub mod partners;
mod prometheus;
mod secrets;
mod stats;
mod sync;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, Method};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
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
    pub(crate) token: Option<Arc<Secret>>,
    /// The schedules this process fires, if it runs a scheduler.
    pub(crate) schedules: Option<Arc<Vec<ScheduleInfo>>>,
    /// The product sync's settings (its partners), when the process has them.
    pub(crate) sync: Option<Arc<conveyor_apps::sync::SyncConfig>>,
}

impl AppState {
    pub fn new(conveyor: Conveyor, api_token: Option<String>) -> Self {
        AppState { conveyor, token: api_token.filter(|t| !t.is_empty()).map(|t| Arc::new(Secret(t))), schedules: None, sync: None }
    }

    pub fn with_sync(mut self, config: conveyor_apps::sync::SyncConfig) -> Self {
        self.sync = Some(Arc::new(config));
        self
    }

    pub fn with_schedules(mut self, schedules: Option<Vec<ScheduleInfo>>) -> Self {
        self.schedules = schedules.map(Arc::new);
        self
    }
}

/// A credential that never prints.
pub struct Secret(pub(crate) String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/api/health", get(health::health))
        .route("/health", get(health::health))
        .route("/metrics", get(prometheus::metrics))
        .route("/api/stats", get(stats::stats))
        .route("/api/openapi.json", get(openapi::document))
        .merge(admin::routes())
        .merge(orchestration::routes())
        .merge(orders::routes())
        .merge(notify::routes())
        .merge(secrets::routes())
        .merge(sync::routes())
        .merge(dashboard::routes())
        .fallback(|| async { ApiError::NotFound("no such endpoint".into()) })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn(envelope_errors))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), require_token))
        .with_state(state)
}

/// With a token configured: every API call that changes something needs it (as a bearer
/// token, or the dashboard's cookie plus its `X-Conveyor-Dashboard` header — a header no other
/// site can make a browser send, so the cookie cannot be used across sites), and every
/// dashboard page needs the cookie.
async fn require_token(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let Some(token) = &s.token else { return next.run(req).await };
    let path = req.uri().path();
    let headers = req.headers();
    if path.starts_with("/dashboard") {
        let open = matches!(path, "/dashboard/login" | "/dashboard/logout" | "/dashboard/app.css");
        if !open && !dashboard::has_cookie(headers, &token.0) {
            return axum::response::Redirect::to("/dashboard/login").into_response();
        }
        return next.run(req).await;
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), token.0.as_bytes()));
        let dashboard = headers.contains_key("x-conveyor-dashboard") && dashboard::has_cookie(headers, &token.0);
        if !bearer && !dashboard {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

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
    let limit = if import { orders::MAX_IMPORT } else { MAX_BODY };
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

/// Compares without an early exit, so response time does not reveal how much of a guess matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = (a.len() ^ b.len()) as u8 | ((a.len() ^ b.len()) >> 8) as u8;
    for i in 0..a.len().max(b.len()) {
        diff |= a.get(i).copied().unwrap_or(0) ^ b.get(i).copied().unwrap_or(0xff);
    }
    diff == 0
}

/// Serves the API on `listener` until `shutdown` is cancelled; in-flight requests finish.
pub async fn serve(listener: TcpListener, state: AppState, shutdown: CancellationToken) -> std::io::Result<()> {
    axum::serve(listener, router(state)).with_graceful_shutdown(shutdown.cancelled_owned()).await
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret1"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
