//! The notifications endpoints: events in, user registration, delivery logs, preferences, the
//! in-app inbox, and CRUD for event sources, templates and rules (with template preview).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{json, Value};

use conveyor_apps::notify::model::{self, Kind, LogFilter, ModelError};
use conveyor_apps::notify::{self, IngestError};
use conveyor_apps::outbound;

use crate::admin::Paging;
use crate::error::{ok, page, page_meta, ApiError};
use crate::openapi::ErrorEnvelope;
use crate::AppState;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/events", post(post_event))
        .route("/api/v1/users/register", post(register))
        .route("/api/v1/notifications", get(logs))
        .route("/api/v1/users/{id}/preferences", get(get_preferences).put(put_preferences))
        .route("/api/v1/users/{id}/inbox", get(inbox))
        .route("/api/v1/users/{id}/inbox/{message}/read", post(mark_read))
        .route("/api/event-sources", get(list_sources).post(create_source))
        .route("/api/event-sources/{id}", get(show_source).put(update_source).delete(delete_source))
        .route("/api/templates", get(list_templates).post(create_template))
        .route("/api/templates/{id}", get(show_template).put(update_template).delete(delete_template))
        .route("/api/templates/{id}/preview", post(preview))
        .route("/api/rules", get(list_rules).post(create_rule))
        .route("/api/rules/{id}", get(show_rule).put(update_rule).delete(delete_rule))
}

impl From<ModelError> for ApiError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Invalid { field, reason } => ApiError::field(&field, reason),
            ModelError::NotFound(m) => ApiError::NotFound(m),
            ModelError::Conflict(m) => ApiError::Conflict(m),
            ModelError::Store(e) => e.into(),
        }
    }
}

fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    let v: Value = serde_json::from_slice(body).map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
    if !v.is_object() {
        return Err(ApiError::BadRequest("the body must be a JSON object".into()));
    }
    Ok(v)
}

fn id_of(raw: &str, what: &str) -> Result<i64, ApiError> {
    raw.parse::<i64>().ok().filter(|v| *v > 0).ok_or_else(|| ApiError::NotFound(format!("no {what} {raw}")))
}

#[utoipa::path(post, path = "/api/events", tag = "notifications",
    request_body(content = Object, description = "{event, payload, idempotency_key?}"),
    responses((status = 202, description = "{event_id, duplicate: false}", body = Envelope<Object>),
              (status = 200, description = "a repeated idempotency key: {event_id: the first, duplicate: true}", body = Envelope<Object>),
              (status = 422, description = "a field is invalid", body = ErrorEnvelope), (status = 400, description = "not JSON", body = ErrorEnvelope)))]
pub(crate) async fn post_event(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let v = json_body(&body)?;
    let name = match v.get("event") {
        Some(Value::String(n)) => n.clone(),
        _ => return Err(ApiError::field("event", "is required (a string)")),
    };
    let payload = v.get("payload").cloned().unwrap_or_else(|| json!({}));
    let key = match v.get("idempotency_key") {
        None | Some(Value::Null) => None,
        Some(Value::String(k)) => Some(k.clone()),
        Some(_) => return Err(ApiError::field("idempotency_key", "must be a string")),
    };
    match notify::ingest(&s.conveyor, &name, payload, key).await {
        Ok(r) if r.duplicate => Ok(ok(r)),
        Ok(r) => Ok((StatusCode::ACCEPTED, ok(r)).into_response()),
        Err(IngestError::Invalid { field, reason }) => Err(ApiError::field(&field, reason)),
        Err(IngestError::Store(e)) => Err(e.into()),
    }
}

#[utoipa::path(post, path = "/api/v1/users/register", tag = "notifications",
    request_body(content = Object, description = "{name, email, phone?, slack_webhook?, webhook_url?}"),
    responses((status = 201, description = "{user_id, event_id, webhook_secret?} (the webhook's signing secret, shown once here; later to the admin only)", body = Envelope<Object>), (status = 409, description = "the email is taken", body = ErrorEnvelope),
              (status = 422, description = "a field is invalid", body = ErrorEnvelope)))]
pub(crate) async fn register(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let v = json_body(&body)?;
    let r = notify::register_user(&s.conveyor, &v, &outbound::api_policy()).await?;
    Ok((StatusCode::CREATED, ok(r)).into_response())
}

#[derive(Deserialize)]
pub(crate) struct LogsQuery {
    user_id: Option<String>,
    event: Option<String>,
    status: Option<String>,
    channel: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

#[utoipa::path(get, path = "/api/v1/notifications", tag = "notifications",
    params(("user_id" = Option<i64>, Query), ("event" = Option<String>, Query), ("status" = Option<String>, Query, description = "pending, sent, failed, rate_limited or skipped"),
           ("channel" = Option<String>, Query), ("page" = Option<u32>, Query, minimum = 1), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")),
    responses((status = 200, description = "delivery logs, newest first", body = PagedEnvelope<Object>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn logs(State(s): State<AppState>, Query(q): Query<LogsQuery>) -> Result<Response, ApiError> {
    let p = q.paging.parse()?;
    let blank = |v: Option<String>| v.filter(|v| !v.is_empty());
    let user_id = match blank(q.user_id) {
        None => None,
        Some(u) => Some(u.parse::<i64>().map_err(|_| ApiError::field("user_id", "must be an integer"))?),
    };
    let status = blank(q.status);
    if let Some(st) = &status {
        if !["pending", "sent", "failed", "rate_limited", "skipped"].contains(&st.as_str()) {
            return Err(ApiError::field("status", "must be pending, sent, failed, rate_limited or skipped"));
        }
    }
    let channel = blank(q.channel);
    if let Some(c) = &channel {
        if !model::CHANNELS.contains(&c.as_str()) {
            return Err(ApiError::field("channel", format!("must be one of {}", model::CHANNELS.join(", "))));
        }
    }
    let f = LogFilter { user_id, event: blank(q.event), status, channel };
    let list = model::logs(s.conveyor.backend().as_ref(), f, p.clone()).await?;
    Ok(page(list, &p))
}

#[utoipa::path(get, path = "/api/v1/users/{id}/preferences", tag = "notifications", params(("id" = i64, Path)),
    responses((status = 200, description = "{channels: {email: true, …}, events: {name: {channel: bool}}}", body = Envelope<Object>), (status = 404, description = "no such user", body = ErrorEnvelope)))]
pub(crate) async fn get_preferences(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(ok(model::preferences(s.conveyor.backend().as_ref(), id_of(&id, "user")?).await?))
}

#[utoipa::path(put, path = "/api/v1/users/{id}/preferences", tag = "notifications", params(("id" = i64, Path)),
    request_body(content = Object, description = "{channels?: {channel: bool}, events?: {event: {channel: bool}}}; replaces what it names"),
    responses((status = 200, description = "the preferences now", body = Envelope<Object>), (status = 404, description = "no such user", body = ErrorEnvelope),
              (status = 422, description = "a field is invalid", body = ErrorEnvelope)))]
pub(crate) async fn put_preferences(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let v = json_body(&body)?;
    Ok(ok(model::set_preferences(s.conveyor.backend().as_ref(), id_of(&id, "user")?, &v).await?))
}

#[utoipa::path(get, path = "/api/v1/users/{id}/inbox", tag = "notifications",
    params(("id" = i64, Path), ("page" = Option<u32>, Query, minimum = 1), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")),
    responses((status = 200, description = "[{id, title, body, read_at, created_at}] with meta.unread", body = PagedEnvelope<Object>), (status = 404, description = "no such user", body = ErrorEnvelope)))]
pub(crate) async fn inbox(State(s): State<AppState>, Path(id): Path<String>, Query(paging): Query<Paging>) -> Result<Response, ApiError> {
    let p = paging.parse()?;
    let (list, unread) = model::inbox(s.conveyor.backend().as_ref(), id_of(&id, "user")?, p.clone()).await?;
    let mut meta = page_meta(&list, &p);
    meta["unread"] = json!(unread);
    Ok(Json(json!({ "success": true, "data": list.items, "meta": meta })).into_response())
}

#[utoipa::path(post, path = "/api/v1/users/{id}/inbox/{message}/read", tag = "notifications", params(("id" = i64, Path), ("message" = String, Path)),
    responses((status = 200, description = "marked read", body = Envelope<Object>), (status = 404, description = "no such message", body = ErrorEnvelope)))]
pub(crate) async fn mark_read(State(s): State<AppState>, Path((id, message)): Path<(String, String)>) -> Result<Response, ApiError> {
    model::mark_read(s.conveyor.backend().as_ref(), id_of(&id, "user")?, &message).await?;
    Ok(ok(json!({ "id": message, "read": true })))
}

macro_rules! crud {
    ($kind:expr, $noun:literal, $path:literal, $list:ident, $create:ident, $show:ident, $update:ident, $delete:ident, $shape:literal) => {
        #[utoipa::path(get, path = $path, tag = "notifications", params(("page" = Option<u32>, Query, minimum = 1), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")),
            responses((status = 200, description = $shape, body = PagedEnvelope<Object>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
        pub(crate) async fn $list(State(s): State<AppState>, Query(paging): Query<Paging>) -> Result<Response, ApiError> {
            let p = paging.parse()?;
            let list = model::list(s.conveyor.backend().as_ref(), $kind, p.clone()).await?;
            Ok(page(list, &p))
        }

        #[utoipa::path(post, path = $path, tag = "notifications", request_body(content = Object, description = $shape),
            responses((status = 201, description = "created (a webhook rule with its signing `secret`, shown once here)", body = Envelope<Object>), (status = 422, description = "a field is invalid", body = ErrorEnvelope),
                      (status = 409, description = "the name is taken", body = ErrorEnvelope), (status = 400, description = "not JSON", body = ErrorEnvelope)))]
        pub(crate) async fn $create(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
            let v = json_body(&body)?;
            let row = model::save(s.conveyor.backend().as_ref(), $kind, None, &v, &outbound::api_policy()).await?;
            Ok((StatusCode::CREATED, ok(row)).into_response())
        }

        #[utoipa::path(get, path = concat!($path, "/{id}"), tag = "notifications", params(("id" = i64, Path)),
            responses((status = 200, description = $shape, body = Envelope<Object>), (status = 404, description = "not found", body = ErrorEnvelope)))]
        pub(crate) async fn $show(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
            Ok(ok(model::get(s.conveyor.backend().as_ref(), $kind, id_of(&id, $noun)?).await?))
        }

        #[utoipa::path(put, path = concat!($path, "/{id}"), tag = "notifications", params(("id" = i64, Path)), request_body(content = Object, description = $shape),
            responses((status = 200, description = "replaced", body = Envelope<Object>), (status = 404, description = "not found", body = ErrorEnvelope),
                      (status = 422, description = "a field is invalid", body = ErrorEnvelope), (status = 400, description = "not JSON", body = ErrorEnvelope)))]
        pub(crate) async fn $update(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
            let id = id_of(&id, $noun)?;
            let v = json_body(&body)?;
            Ok(ok(model::save(s.conveyor.backend().as_ref(), $kind, Some(id), &v, &outbound::api_policy()).await?))
        }

        #[utoipa::path(delete, path = concat!($path, "/{id}"), tag = "notifications", params(("id" = i64, Path)),
            responses((status = 200, description = "deleted", body = Envelope<Object>), (status = 404, description = "not found", body = ErrorEnvelope),
                      (status = 409, description = "still in use", body = ErrorEnvelope)))]
        pub(crate) async fn $delete(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
            let id = id_of(&id, $noun)?;
            model::delete(s.conveyor.backend().as_ref(), $kind, id).await?;
            Ok(ok(json!({ "id": id, "deleted": true })))
        }
    };
}

crud!(
    Kind::Sources,
    "event source",
    "/api/event-sources",
    list_sources,
    create_source,
    show_source,
    update_source,
    delete_source,
    "{name, description?, schema?}"
);
crud!(
    Kind::Templates,
    "template",
    "/api/templates",
    list_templates,
    create_template,
    show_template,
    update_template,
    delete_template,
    "{name, channel: email|sms|slack|webhook|database, subject?, body}"
);
crud!(
    Kind::Rules,
    "rule",
    "/api/rules",
    list_rules,
    create_rule,
    show_rule,
    update_rule,
    delete_rule,
    "{event, template_id, channel, recipient?, conditions: [{path, op, value?}], active}"
);

#[utoipa::path(post, path = "/api/templates/{id}/preview", tag = "notifications", params(("id" = i64, Path)),
    request_body(content = Object, description = "{payload}"),
    responses((status = 200, description = "{subject, body}", body = Envelope<Object>), (status = 404, description = "no such template", body = ErrorEnvelope),
              (status = 422, description = "the payload lacks a variable the template uses", body = ErrorEnvelope)))]
pub(crate) async fn preview(State(s): State<AppState>, Path(id): Path<String>, body: Bytes) -> Result<Response, ApiError> {
    let v = json_body(&body)?;
    let payload = v.get("payload").cloned().unwrap_or_else(|| json!({}));
    Ok(ok(model::preview(s.conveyor.backend().as_ref(), id_of(&id, "template")?, &payload).await?))
}
