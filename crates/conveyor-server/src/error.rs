//! The API's one error type and the SPEC's envelopes. Handlers return `Result<_, ApiError>`
//! and use `?`; 5xx bodies say nothing internal, and the cause is logged once, here.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Serialize;
use serde_json::json;

use conveyor_core::backend::{Page, Paged};
use conveyor_core::BackendError;

#[derive(Debug)]
pub enum ApiError {
    BadRequest(String),
    Unauthorized,
    NotFound(String),
    Conflict(String),
    /// A field (JSON path) and why it is wrong.
    Validation(BTreeMap<String, String>),
    MethodNotAllowed,
    /// With the limit that applied, in bytes.
    PayloadTooLarge(usize),
    Unavailable(String),
    /// A feature whose settings are missing (409: a configuration state, not a server error;
    /// the message names the variable).
    NotConfigured(String),
    Forbidden(String),
    /// A body of a type the endpoint does not take (415).
    UnsupportedMediaType(String),
    Internal(String),
}

impl ApiError {
    pub fn field(path: &str, reason: impl Into<String>) -> Self {
        ApiError::Validation(BTreeMap::from([(path.to_string(), reason.into())]))
    }
}

impl From<BackendError> for ApiError {
    fn from(e: BackendError) -> Self {
        match e {
            BackendError::Invalid(m) => ApiError::BadRequest(m),
            BackendError::NotFound(m) => ApiError::NotFound(m),
            BackendError::Unavailable(cause) => ApiError::Unavailable(cause.to_string()),
            // The constraint's own text names tables and columns: the caller learns what it
            // needs, not the schema.
            BackendError::Unique(_) => ApiError::Conflict("a record with the same unique value already exists".into()),
            other => ApiError::Internal(other.to_string()),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code, message, fields) = match self {
            ApiError::BadRequest(m) => (StatusCode::BAD_REQUEST, "bad_request", m, None),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized", "a valid API token is required".into(), None),
            ApiError::NotFound(m) => (StatusCode::NOT_FOUND, "not_found", m, None),
            ApiError::Conflict(m) => (StatusCode::CONFLICT, "conflict", m, None),
            ApiError::MethodNotAllowed => {
                (StatusCode::METHOD_NOT_ALLOWED, "bad_request", "method not allowed on this endpoint".into(), None)
            }
            ApiError::PayloadTooLarge(limit) => {
                (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", format!("the request body is over {limit} bytes"), None)
            }
            ApiError::Validation(f) => {
                let first = f.iter().next().map(|(k, v)| format!("{k}: {v}")).unwrap_or_default();
                (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed", first, Some(f))
            }
            ApiError::Unavailable(m) => {
                tracing::warn!(error = %m, "request failed: dependency unavailable");
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable", "a dependency is unavailable; try again later".into(), None)
            }
            ApiError::NotConfigured(m) => (StatusCode::CONFLICT, "conflict", m, None),
            ApiError::Forbidden(m) => (StatusCode::FORBIDDEN, "forbidden", m, None),
            ApiError::UnsupportedMediaType(m) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type", m, None),
            ApiError::Internal(m) => {
                tracing::error!(error = %m, "request failed");
                (StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error".into(), None)
            }
        };
        let mut error = json!({ "code": code, "message": message });
        if let Some(fields) = fields {
            error["details"] = json!({ "fields": fields });
        }
        (status, Json(json!({ "success": false, "error": error }))).into_response()
    }
}

/// `{"success": true, "data": …}`.
pub fn ok<T: Serialize>(data: T) -> Response {
    Json(json!({ "success": true, "data": data })).into_response()
}

/// A page of a list: `{"success": true, "data": [...], "meta": {page, per_page, total,
/// total_capped, next_cursor?}}`. `page` is null for a page read after a cursor (it has no
/// number); `next_cursor` is there when more rows follow.
pub fn page<T: Serialize>(list: Paged<T>, p: &Page) -> Response {
    let meta = page_meta(&list, p);
    Json(json!({ "success": true, "data": list.items, "meta": meta })).into_response()
}

/// The `meta` of a page, for lists that add their own fields to it.
pub fn page_meta<T>(list: &Paged<T>, p: &Page) -> serde_json::Value {
    let number = if p.after.is_some() { None } else { Some(p.page) };
    let mut meta = json!({ "page": number, "per_page": p.per_page, "total": list.total, "total_capped": list.total_capped });
    if let Some(next) = &list.next {
        meta["next_cursor"] = json!(next.encode());
    }
    meta
}
