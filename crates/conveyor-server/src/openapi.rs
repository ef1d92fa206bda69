//! The OpenAPI 3.1 document at `/api/openapi.json`, generated from the handlers' `#[utoipa::path]`
//! attributes and the types they return, so it cannot drift from the code.

use axum::response::IntoResponse;
use axum::Json;
use utoipa::{OpenApi, ToSchema};

use conveyor_core::backend::{FailedJob, PoolInfo, QueueStats, SupervisorInfo, WorkerInfo};
use conveyor_core::balance::Balance;
use conveyor_core::batch::BatchInfo;
use conveyor_core::breaker::BreakerInfo;
use conveyor_core::event::{EventRecord, ListenerRun};
use conveyor_core::job::{JobInfo, JobState};
use conveyor_core::scheduler::{Missed, ScheduleInfo};
use conveyor_core::workflow::{StepInfo, WorkflowInfo};

// The types below only describe responses; handlers build the same shapes with `ok`/`page`.

/// `{"success": true, "data": …}`
#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct Envelope<T> {
    success: bool,
    data: T,
}

/// A page of a list.
#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct PagedEnvelope<T> {
    success: bool,
    data: Vec<T>,
    meta: PageMeta,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct PageMeta {
    /// From 1; null for a page read after a `cursor`.
    page: Option<u32>,
    per_page: u32,
    /// Rows in the list, counted up to 10,000.
    total: u64,
    /// True when the list holds more than 10,000 rows (`total` then says 10,000).
    total_capped: bool,
    /// Present when more rows follow: pass it as `cursor` for the next page, at the same cost
    /// whatever the depth.
    next_cursor: Option<String>,
}

/// `{"success": false, "error": {code, message, details?}}`
#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct ErrorEnvelope {
    success: bool,
    error: ErrorBody,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct ErrorBody {
    /// bad_request, unauthorized, forbidden, not_found, conflict, payload_too_large,
    /// validation_failed, rate_limited, unavailable or internal.
    code: String,
    message: String,
    /// `{"fields": {"<json path>": "<reason>"}}` for validation errors.
    #[schema(value_type = Object)]
    details: Option<serde_json::Value>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct QueueState {
    queue: String,
    paused: bool,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct Cleared {
    queue: String,
    cleared: u64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct Retried {
    retried: Vec<String>,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct RetriedCount {
    retried: u64,
}

#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct Forgotten {
    forgotten: String,
}

/// `{status: ok|degraded, checks: {database, queue, workers, scheduler}}`, each `{status, detail}`.
#[allow(dead_code)]
#[derive(ToSchema)]
pub(crate) struct Health {
    status: String,
    #[schema(value_type = Object)]
    checks: serde_json::Value,
}

#[derive(OpenApi)]
#[openapi(
    info(title = "Conveyor API", description = "Queues, jobs, batches, workflows and system health. Envelopes and errors follow SPEC.md."),
    paths(
        crate::health::health,
        crate::stats::stats,
        crate::admin::list_queues,
        crate::admin::pause,
        crate::admin::resume,
        crate::admin::clear,
        crate::admin::list_jobs,
        crate::admin::show_job,
        crate::admin::list_failed,
        crate::admin::show_failed,
        crate::admin::retry_failed,
        crate::admin::retry_all,
        crate::admin::forget_failed,
        crate::admin::workers,
        crate::admin::signal_worker,
        crate::admin::metrics_queues,
        crate::admin::metrics_jobs,
        crate::jobs::create_job,
        crate::jobs::create_bulk,
        crate::jobs::create_batch,
        crate::orchestration::list_batches,
        crate::orchestration::show_batch,
        crate::orchestration::cancel_batch,
        crate::orchestration::show_workflow,
        crate::orchestration::breakers,
        crate::orchestration::concurrency_keys,
        crate::orchestration::event_log,
        crate::orchestration::schedules,
        crate::kinds::list,
        crate::kinds::reveal,
        crate::kinds::rotate,
    ),
    components(schemas(
        QueueStats,
        FailedJob,
        WorkerInfo,
        SupervisorInfo,
        PoolInfo,
        Balance,
        JobInfo,
        JobState,
        BatchInfo,
        BreakerInfo,
        EventRecord,
        ListenerRun,
        ScheduleInfo,
        Missed,
        WorkflowInfo,
        StepInfo,
        ErrorEnvelope,
        ErrorBody,
        PageMeta,
        crate::admin::Series,
        crate::admin::Point,
        crate::orchestration::BatchDetail,
        conveyor_core::flow::KeyStats
    ))
)]
pub(crate) struct ApiDoc;

/// The order processing's operations (feature `orders`).
#[cfg(feature = "orders")]
#[derive(OpenApi)]
#[openapi(paths(
    crate::orders::products,
    crate::orders::list_orders,
    crate::orders::show_order,
    crate::orders::create_order,
    crate::orders::import_orders,
    crate::orders::kpis_daily,
    crate::orders::kpis_range,
    crate::orders::kpis_realtime,
    crate::orders::top_customers,
    crate::orders::customer_rank,
    crate::orders::top_products,
    crate::orders::rebuild_leaderboards,
))]
struct OrdersDoc;

/// The notifications' operations (feature `notify`).
#[cfg(feature = "notify")]
#[derive(OpenApi)]
#[openapi(paths(
    crate::notify::post_event,
    crate::notify::register,
    crate::notify::logs,
    crate::notify::get_preferences,
    crate::notify::put_preferences,
    crate::notify::inbox,
    crate::notify::mark_read,
    crate::notify::list_sources,
    crate::notify::create_source,
    crate::notify::show_source,
    crate::notify::update_source,
    crate::notify::delete_source,
    crate::notify::list_templates,
    crate::notify::create_template,
    crate::notify::show_template,
    crate::notify::update_template,
    crate::notify::delete_template,
    crate::notify::preview,
    crate::notify::list_rules,
    crate::notify::create_rule,
    crate::notify::show_rule,
    crate::notify::update_rule,
    crate::notify::delete_rule,
    crate::secrets::reveal_rule,
    crate::secrets::rotate_rule,
    crate::secrets::reveal_user,
    crate::secrets::rotate_user,
))]
struct NotifyDoc;

/// The product sync's operations (feature `sync`).
#[cfg(feature = "sync")]
#[derive(OpenApi)]
#[openapi(paths(
    crate::sync::start,
    crate::sync::trigger,
    crate::sync::runs,
    crate::sync::run,
    crate::sync::health,
    crate::sync::retry_failures,
))]
struct SyncDoc;

/// The document: the engine's operations and those of the applications this build has.
pub(crate) fn openapi() -> utoipa::openapi::OpenApi {
    #[allow(unused_mut)]
    let mut doc = ApiDoc::openapi();
    #[cfg(feature = "orders")]
    doc.merge(OrdersDoc::openapi());
    #[cfg(feature = "notify")]
    doc.merge(NotifyDoc::openapi());
    #[cfg(feature = "sync")]
    doc.merge(SyncDoc::openapi());
    doc
}

pub(crate) async fn document() -> axum::response::Response {
    Json(openapi()).into_response()
}
