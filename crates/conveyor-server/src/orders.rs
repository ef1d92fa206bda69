//! The orders application's endpoints: products, orders (list, one, create, CSV import).

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;

use conveyor_apps::orders::{self, import, reports, CreateError};

use crate::admin::Paging;
use crate::error::{ok, page, ApiError};
use crate::openapi::ErrorEnvelope;
use crate::AppState;

/// CSV imports through the API may be larger than other bodies (the CLI streams any size).
pub(crate) const MAX_IMPORT: usize = 64 * 1024 * 1024;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/api/products", get(products))
        .route("/api/orders", get(list_orders).post(create_order))
        .route("/api/orders/import", post(import_orders).layer(axum::extract::DefaultBodyLimit::max(MAX_IMPORT)))
        .route("/api/orders/{id}", get(show_order))
        .route("/api/kpis/daily", get(kpis_daily))
        .route("/api/kpis/range", get(kpis_range))
        .route("/api/kpis/realtime", get(kpis_realtime))
        .route("/api/leaderboard/customers", get(top_customers))
        .route("/api/leaderboard/customers/{id}/rank", get(customer_rank))
        .route("/api/leaderboard/products", get(top_products))
        .route("/api/leaderboard/rebuild", post(rebuild_leaderboards))
}

#[utoipa::path(get, path = "/api/products", tag = "orders", responses((status = 200, description = "products with stock and reserved", body = Envelope<Object>)))]
pub(crate) async fn products(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(orders::products(s.conveyor.backend().as_ref()).await?))
}

#[derive(Deserialize)]
pub(crate) struct OrdersQuery {
    status: Option<String>,
    customer_id: Option<String>,
    #[serde(flatten)]
    paging: Paging,
}

#[utoipa::path(get, path = "/api/orders", tag = "orders",
    params(("status" = Option<String>, Query, description = "pending, processing, completed or failed"), ("customer_id" = Option<i64>, Query),
           ("page" = Option<u32>, Query, minimum = 1), ("per_page" = Option<u32>, Query, minimum = 1, maximum = 1000), ("cursor" = Option<String>, Query, description = "meta.next_cursor of the page before; page × per_page is at most 10,000 without it")),
    responses((status = 200, description = "orders, newest first", body = PagedEnvelope<Object>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn list_orders(State(s): State<AppState>, Query(q): Query<OrdersQuery>) -> Result<Response, ApiError> {
    let p = q.paging.parse()?;
    let status = match q.status.as_deref() {
        None | Some("") => None,
        Some(st @ ("pending" | "processing" | "completed" | "failed")) => Some(st),
        Some(_) => return Err(ApiError::field("status", "must be pending, processing, completed or failed")),
    };
    let customer = match q.customer_id.as_deref() {
        None | Some("") => None,
        Some(c) => Some(c.parse::<i64>().map_err(|_| ApiError::field("customer_id", "must be an integer"))?),
    };
    let list = orders::orders(s.conveyor.backend().as_ref(), status, customer, p.clone()).await?;
    Ok(page(list, &p))
}

#[utoipa::path(get, path = "/api/orders/{id}", tag = "orders", params(("id" = String, Path, description = "order id")),
    responses((status = 200, description = "the order with payments and workflow steps", body = Envelope<Object>), (status = 404, description = "not found", body = ErrorEnvelope)))]
pub(crate) async fn show_order(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    match orders::order(s.conveyor.backend().as_ref(), &id).await? {
        Some(o) => Ok(ok(o)),
        None => Err(ApiError::NotFound(format!("no order {id}"))),
    }
}

#[utoipa::path(post, path = "/api/orders", tag = "orders", request_body(content = Object, description = "{order_id, customer_id, customer_name, customer_email, order_date, items: [{sku, quantity, unit_price}]}"),
    responses((status = 201, description = "created; its workflow started", body = Envelope<Object>), (status = 409, description = "the order id exists", body = ErrorEnvelope),
              (status = 422, description = "a field is invalid", body = ErrorEnvelope), (status = 400, description = "not JSON", body = ErrorEnvelope)))]
pub(crate) async fn create_order(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    let json: serde_json::Value = serde_json::from_slice(&body).map_err(|e| ApiError::BadRequest(format!("the body is not JSON: {e}")))?;
    if !json.is_object() {
        return Err(ApiError::BadRequest("the body must be a JSON object".into()));
    }
    match orders::create_order(&s.conveyor, &json).await {
        Ok(o) => Ok((StatusCode::CREATED, ok(o)).into_response()),
        Err(CreateError::Invalid { field, reason }) => Err(ApiError::field(&field, reason)),
        Err(CreateError::Exists(id)) => Err(ApiError::Conflict(format!("order {id} already exists"))),
        Err(CreateError::Store(e)) => Err(e.into()),
    }
}

#[utoipa::path(post, path = "/api/orders/import", tag = "orders", request_body(content = String, content_type = "text/csv"),
    responses((status = 200, description = "{rows, orders, duplicates, rejected: [{line, reason}] (the first 1,000 by line), rejected_total}", body = Envelope<Object>),
              (status = 422, description = "the header lacks required columns", body = ErrorEnvelope)))]
pub(crate) async fn import_orders(State(s): State<AppState>, body: Bytes) -> Result<Response, ApiError> {
    match import::import_orders(&s.conveyor, std::io::Cursor::new(body), |_| {}).await {
        Ok(report) => Ok(ok(report)),
        Err(import::ImportError::MissingColumns(cols)) => Err(ApiError::field("header", format!("missing columns: {}", cols.join(", ")))),
        Err(import::ImportError::Read(e)) => Err(ApiError::BadRequest(format!("cannot read the CSV: {e}"))),
        Err(import::ImportError::Store(e)) => Err(e.into()),
    }
}

#[derive(Deserialize)]
pub(crate) struct DailyQuery {
    date: Option<String>,
}

#[utoipa::path(get, path = "/api/kpis/daily", tag = "kpis", params(("date" = Option<String>, Query, description = "YYYY-MM-DD, default today (UTC)")),
    responses((status = 200, description = "{date, total_revenue, order_count, average_order_value, unique_customers, generated_at}", body = Envelope<Object>),
              (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn kpis_daily(State(s): State<AppState>, Query(q): Query<DailyQuery>) -> Result<Response, ApiError> {
    let day = match q.date.as_deref() {
        None | Some("") => reports::today(),
        Some(d) => reports::parse_day("date", d).map_err(|e| ApiError::field("date", e))?,
    };
    Ok(ok(reports::daily(s.conveyor.backend().clone(), day).await?))
}

#[derive(Deserialize)]
pub(crate) struct RangeQuery {
    start_date: Option<String>,
    end_date: Option<String>,
}

#[utoipa::path(get, path = "/api/kpis/range", tag = "kpis",
    params(("start_date" = String, Query, description = "YYYY-MM-DD"), ("end_date" = String, Query, description = "YYYY-MM-DD, at most 366 days after start_date")),
    responses((status = 200, description = "{start_date, end_date, days, totals}", body = Envelope<Object>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn kpis_range(State(s): State<AppState>, Query(q): Query<RangeQuery>) -> Result<Response, ApiError> {
    let day = |name: &str, v: &Option<String>| -> Result<jiff::civil::Date, ApiError> {
        let v = v.as_deref().filter(|v| !v.is_empty()).ok_or_else(|| ApiError::field(name, "is required (YYYY-MM-DD)"))?;
        reports::parse_day(name, v).map_err(|e| ApiError::field(name, e))
    };
    let (start, end) = (day("start_date", &q.start_date)?, day("end_date", &q.end_date)?);
    if end < start {
        return Err(ApiError::field("end_date", "must not be before start_date"));
    }
    if (end - start).get_days() > 366 {
        return Err(ApiError::field("end_date", "the range is at most 366 days"));
    }
    Ok(ok(reports::range(s.conveyor.backend().clone(), start, end).await?))
}

#[utoipa::path(get, path = "/api/kpis/realtime", tag = "kpis",
    responses((status = 200, description = "{pending_orders, processing_orders, completed_today, failed_today, revenue_today}", body = Envelope<Object>)))]
pub(crate) async fn kpis_realtime(State(s): State<AppState>) -> Result<Response, ApiError> {
    Ok(ok(reports::realtime(s.conveyor.backend().clone()).await?))
}

#[derive(Deserialize)]
pub(crate) struct LimitQuery {
    limit: Option<String>,
}

fn limit(q: &LimitQuery) -> Result<usize, ApiError> {
    match q.limit.as_deref() {
        None | Some("") => Ok(10),
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::field("limit", "must be a whole number from 1 to 1000")),
    }
}

#[utoipa::path(get, path = "/api/leaderboard/customers", tag = "leaderboards", params(("limit" = Option<u32>, Query, minimum = 1, maximum = 1000)),
    responses((status = 200, description = "[{rank, customer_id, customer_name, order_count, total_spent}]", body = Envelope<Object>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn top_customers(State(s): State<AppState>, Query(q): Query<LimitQuery>) -> Result<Response, ApiError> {
    Ok(ok(reports::top_customers(s.conveyor.backend().clone(), limit(&q)?).await?))
}

#[utoipa::path(get, path = "/api/leaderboard/customers/{id}/rank", tag = "leaderboards", params(("id" = i64, Path, description = "customer id")),
    responses((status = 200, description = "{customer_id, rank, total_spent, order_count}", body = Envelope<Object>), (status = 404, description = "unranked", body = ErrorEnvelope)))]
pub(crate) async fn customer_rank(State(s): State<AppState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    let id: i64 = id.parse().map_err(|_| ApiError::NotFound(format!("no ranked customer {id}")))?;
    match reports::customer_rank(s.conveyor.backend().clone(), id).await? {
        Some(r) => Ok(ok(
            serde_json::json!({ "customer_id": r.customer_id, "rank": r.rank, "total_spent": r.total_spent, "order_count": r.order_count }),
        )),
        None => Err(ApiError::NotFound(format!("customer {id} has no completed order"))),
    }
}

#[utoipa::path(get, path = "/api/leaderboard/products", tag = "leaderboards", params(("limit" = Option<u32>, Query, minimum = 1, maximum = 1000)),
    responses((status = 200, description = "[{rank, sku, name, units_sold, revenue}]", body = Envelope<Object>), (status = 422, description = "a parameter is invalid", body = ErrorEnvelope)))]
pub(crate) async fn top_products(State(s): State<AppState>, Query(q): Query<LimitQuery>) -> Result<Response, ApiError> {
    Ok(ok(reports::top_products(s.conveyor.backend().clone(), limit(&q)?).await?))
}

#[utoipa::path(post, path = "/api/leaderboard/rebuild", tag = "leaderboards",
    responses((status = 200, description = "rebuilt from the store", body = Envelope<Object>), (status = 401, description = "a token is required", body = ErrorEnvelope)))]
pub(crate) async fn rebuild_leaderboards(State(s): State<AppState>) -> Result<Response, ApiError> {
    reports::rebuild(s.conveyor.backend().clone()).await?;
    Ok(ok(serde_json::json!({ "rebuilt": true })))
}
