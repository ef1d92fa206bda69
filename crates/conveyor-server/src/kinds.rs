//! `GET /api/kinds`: every kind the server knows — local (built in or the application's), listener, HTTP kind (with its
//! settings and breaker, never its secret) and remote (run by workers in other languages, as
//! seen in the last 24 hours) — and the admin's view of an HTTP kind's signing secret.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};
use serde_json::{json, Value};

use conveyor_apps::kinds::{HttpKind, KindInfo};
use conveyor_apps::signing;
use conveyor_core::backend::MetricsQuery;
use conveyor_core::clock::now_ms;

use crate::access::{Principal, Role};
use crate::error::{ok, ApiError};
use crate::openapi::ErrorEnvelope;
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/kinds", get(list))
        .route("/api/kinds/{name}/secret", get(reveal))
        .route("/api/kinds/{name}/secret/rotate", post(rotate))
}

#[utoipa::path(get, path = "/api/kinds", tag = "jobs",
    responses((status = 200, description = "[{name, type: local|listener|http|remote (local: a kind this server runs in Rust, built in or the application's), queue?, http?: {url, queue, timeout_s, concurrency, rate_limit, listen, secret_source, breaker, breaker_state}}], by name; remote kinds are those seen in the last 24 hours", body = Envelope<Vec<Object>>)))]
pub(crate) async fn list(State(s): State<AppState>) -> Result<Response, ApiError> {
    let registry = s.conveyor.registry();
    let mut out: BTreeMap<String, Value> = BTreeMap::new();
    let breakers = conveyor_core::breaker::list(s.conveyor.backend().as_ref(), conveyor_apps::kinds::BREAKER_WINDOW).await?;
    for kind in registry.kinds() {
        let entry = match s.kinds.iter().find(|k| k.name == kind) {
            Some(k) => {
                let info = KindInfo::from(k);
                let state = breakers.iter().find(|b| b.name == info.breaker).map_or("closed", |b| b.state.as_str());
                let mut http = serde_json::to_value(&info).expect("kind info serializes");
                http["breaker_state"] = json!(state);
                json!({ "name": kind, "type": "http", "queue": k.queue, "http": http })
            }
            None if kind.starts_with("listener:") => json!({ "name": kind, "type": "listener" }),
            None => json!({ "name": kind, "type": "local" }),
        };
        out.insert(kind.to_string(), entry);
    }
    let since = now_ms() - Duration::from_secs(24 * 3600).as_millis() as i64;
    for row in s.conveyor.backend().metrics(MetricsQuery { queue: None, kind: None, since }).await? {
        if !registry.contains(&row.kind) {
            out.entry(row.kind.clone()).or_insert_with(|| json!({ "name": row.kind, "type": "remote", "queue": row.queue }));
        }
    }
    Ok(ok(out.into_values().collect::<Vec<_>>()))
}

fn admin_only(who: &Principal) -> Result<(), ApiError> {
    match who.role {
        Some(Role::Admin) => Ok(()),
        Some(_) => Err(ApiError::Forbidden("only the admin token may see or rotate a signing secret".into())),
        None => Err(ApiError::Unauthorized),
    }
}

fn http_kind<'a>(s: &'a AppState, name: &str) -> Result<&'a HttpKind, ApiError> {
    s.kinds.iter().find(|k| k.name == name).ok_or_else(|| ApiError::NotFound(format!("no HTTP kind {name:?}")))
}

#[utoipa::path(get, path = "/api/kinds/{name}/secret", tag = "jobs", params(("name" = String, Path)),
    responses((status = 200, description = "{owner, source: configuration|store, secrets: [{secret, created_at, expires_at}]}: the secrets each call is signed with, current first", body = Envelope<Object>),
              (status = 401, description = "the admin token is required", body = ErrorEnvelope), (status = 404, description = "no such HTTP kind", body = ErrorEnvelope)))]
pub(crate) async fn reveal(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    admin_only(&who)?;
    let k = http_kind(&s, &name)?;
    if !k.secrets.is_empty() {
        let secrets: Vec<Value> = k.secrets.iter().map(|s| json!({ "secret": s, "created_at": null, "expires_at": null })).collect();
        return Ok(ok(json!({ "owner": k.owner(), "source": "configuration", "secrets": secrets })));
    }
    let r = signing::reveal(s.conveyor.backend().as_ref(), &k.owner()).await?;
    let secrets: Vec<Value> = r
        .secrets
        .iter()
        .filter(|x| !x.legacy)
        .map(|x| json!({ "secret": x.secret, "created_at": x.created_at, "expires_at": x.expires_at }))
        .collect();
    Ok(ok(json!({ "owner": r.owner, "source": "store", "secrets": secrets })))
}

#[utoipa::path(post, path = "/api/kinds/{name}/secret/rotate", tag = "jobs", params(("name" = String, Path)),
    request_body(content = Object, description = "{previous_valid_for?: seconds the previous secret stays valid (default 86400)}"),
    responses((status = 200, description = "{owner, secret, previous_valid_until}", body = Envelope<Object>),
              (status = 401, description = "the admin token is required", body = ErrorEnvelope), (status = 404, description = "no such HTTP kind", body = ErrorEnvelope),
              (status = 409, description = "the kind's secret is set in the configuration: change it there (list the new one first to keep the old one valid)", body = ErrorEnvelope),
              (status = 422, description = "a field is invalid", body = ErrorEnvelope)))]
pub(crate) async fn rotate(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    admin_only(&who)?;
    let k = http_kind(&s, &name)?;
    if !k.secrets.is_empty() {
        return Err(ApiError::Conflict(format!(
            "kind {name:?} is signed with the secret in its configuration: change `secret` there (a list, new first, keeps the old one valid)"
        )));
    }
    let overlap = overlap(&body)?;
    Ok(ok(signing::rotate(s.conveyor.backend().as_ref(), &k.owner(), overlap).await?))
}

/// `{previous_valid_for?: seconds}` (an empty body is fine).
pub(crate) fn overlap(body: &Bytes) -> Result<i64, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(signing::DEFAULT_OVERLAP_S);
    }
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
    match v.get("previous_valid_for") {
        None | Some(Value::Null) => Ok(signing::DEFAULT_OVERLAP_S),
        Some(n) => n
            .as_i64()
            .filter(|n| (0..=30 * 86_400).contains(n))
            .ok_or_else(|| ApiError::field("previous_valid_for", "must be a whole number of seconds from 0 to 2592000")),
    }
}
