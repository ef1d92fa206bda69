//! Webhook signing secrets, admin only: reveal the secrets a webhook rule's or a user's
//! deliveries are signed with, and rotate them (the previous secret stays valid for an overlap,
//! 24 h unless the request says otherwise). Secrets are never part of list or get answers.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Extension, Router};

use conveyor_apps::notify::secrets::{self, Owner};

use crate::kinds::overlap;

use crate::access::{Principal, Role};
use crate::error::{ok, ApiError};
use crate::openapi::ErrorEnvelope;
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/rules/{id}/secret", get(reveal_rule))
        .route("/api/rules/{id}/secret/rotate", post(rotate_rule))
        .route("/api/v1/users/{id}/secret", get(reveal_user))
        .route("/api/v1/users/{id}/secret/rotate", post(rotate_user))
}

/// The access guard already refuses these paths to every role but the admin; this check in the
/// handler keeps a secret from ever being answered to anyone else even if the path rule changes.
fn admin_only(who: &Principal) -> Result<(), ApiError> {
    match who.role {
        Some(Role::Admin) => Ok(()),
        Some(_) => Err(ApiError::Forbidden("only the admin token may see or rotate a signing secret".into())),
        None => Err(ApiError::Unauthorized),
    }
}

/// What every reveal does, whoever the owner (a rule or a user).
async fn reveal(s: &AppState, who: &Principal, owner: Owner) -> Result<Response, ApiError> {
    admin_only(who)?;
    Ok(ok(secrets::reveal(s.conveyor.backend().as_ref(), owner).await?))
}

/// What every rotation does, whoever the owner.
async fn rotate(s: &AppState, who: &Principal, owner: Owner, body: &Bytes) -> Result<Response, ApiError> {
    admin_only(who)?;
    Ok(ok(secrets::rotate(s.conveyor.backend().as_ref(), owner, overlap(body)?).await?))
}

fn id_of(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| ApiError::NotFound(format!("no {what} {raw}")))
}

#[utoipa::path(get, path = "/api/rules/{id}/secret", tag = "notifications", params(("id" = i64, Path)),
    responses((status = 200, description = "{owner, secrets: [{secret, legacy, created_at, expires_at}]}: the current secret first, then rotated-out ones still valid; `secret` is null for the legacy CONVEYOR_WEBHOOK_SECRET", body = Envelope<Object>),
              (status = 401, description = "the admin token is required", body = ErrorEnvelope), (status = 404, description = "no such webhook rule", body = ErrorEnvelope)))]
pub(crate) async fn reveal_rule(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    reveal(&s, &who, Owner::Rule(id_of(&id, "rule")?)).await
}

#[utoipa::path(post, path = "/api/rules/{id}/secret/rotate", tag = "notifications", params(("id" = i64, Path)),
    request_body(content = Object, description = "{previous_valid_for?: seconds the previous secret stays valid (default 86400)}"),
    responses((status = 200, description = "{owner, secret, previous_valid_until}", body = Envelope<Object>),
              (status = 401, description = "the admin token is required", body = ErrorEnvelope), (status = 404, description = "no such webhook rule", body = ErrorEnvelope),
              (status = 422, description = "a field is invalid", body = ErrorEnvelope)))]
pub(crate) async fn rotate_rule(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    rotate(&s, &who, Owner::Rule(id_of(&id, "rule")?), &body).await
}

#[utoipa::path(get, path = "/api/v1/users/{id}/secret", tag = "notifications", params(("id" = i64, Path)),
    responses((status = 200, description = "{owner, secrets: [{secret, legacy, created_at, expires_at}]}: the current secret first, then rotated-out ones still valid; `secret` is null for the legacy CONVEYOR_WEBHOOK_SECRET", body = Envelope<Object>),
              (status = 401, description = "the admin token is required", body = ErrorEnvelope), (status = 404, description = "no such user with a webhook_url", body = ErrorEnvelope)))]
pub(crate) async fn reveal_user(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    reveal(&s, &who, Owner::User(id_of(&id, "user")?)).await
}

#[utoipa::path(post, path = "/api/v1/users/{id}/secret/rotate", tag = "notifications", params(("id" = i64, Path)),
    request_body(content = Object, description = "{previous_valid_for?: seconds the previous secret stays valid (default 86400)}"),
    responses((status = 200, description = "{owner, secret, previous_valid_until}", body = Envelope<Object>),
              (status = 401, description = "the admin token is required", body = ErrorEnvelope), (status = 404, description = "no such user with a webhook_url", body = ErrorEnvelope),
              (status = 422, description = "a field is invalid", body = ErrorEnvelope)))]
pub(crate) async fn rotate_user(
    State(s): State<AppState>,
    Extension(who): Extension<Principal>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    rotate(&s, &who, Owner::User(id_of(&id, "user")?), &body).await
}
