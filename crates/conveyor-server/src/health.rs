//! `GET /api/health` and `GET /health`: is every configured dependency answering, are workers
//! alive. 503 only when a configured dependency fails; no workers is "degraded", not down.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde::Serialize;
use serde_json::json;

use crate::access::Principal;
use crate::openapi::{Envelope, Health};
use crate::AppState;

#[derive(Serialize)]
struct Check {
    status: &'static str,
    detail: String,
}

#[utoipa::path(get, path = "/api/health", tag = "system", responses((status = 200, description = "healthy or degraded", body = Envelope<Health>), (status = 503, description = "a configured dependency failed", body = Envelope<Health>)))]
pub(crate) async fn health(State(s): State<AppState>, Extension(who): Extension<Principal>, uri: axum::http::Uri) -> Response {
    let backend = s.conveyor.backend();
    let mut failed = false;
    let database = match tokio::time::timeout(Duration::from_secs(2), backend.ping()).await {
        Ok(Ok(())) => Check { status: "ok", detail: "answering".into() },
        Ok(Err(e)) => {
            failed = true;
            tracing::warn!(error = %e, "health: database check failed");
            Check { status: "failed", detail: "database not answering".into() }
        }
        Err(_) => {
            failed = true;
            Check { status: "failed", detail: "database did not answer within 2 s".into() }
        }
    };
    let queue = match backend.queues().await {
        Ok(q) => {
            let pending: u64 = q.iter().map(|q| q.pending).sum();
            Check { status: "ok", detail: format!("{} queues, {pending} pending jobs", q.len()) }
        }
        Err(e) => {
            failed = true;
            tracing::warn!(error = %e, "health: queue check failed");
            Check { status: "failed", detail: "queue not answering".into() }
        }
    };
    let workers = match backend.workers(Duration::from_secs(30)).await {
        Ok(w) if w.is_empty() => Check { status: "degraded", detail: "no worker has reported in the last 30 s".into() },
        Ok(w) => {
            let executors: usize = w.iter().flat_map(|w| &w.supervisors).map(|s| s.concurrency).sum();
            let plural = if w.len() == 1 { "" } else { "es" };
            Check { status: "ok", detail: format!("{} worker process{plural}, {executors} executors", w.len()) }
        }
        Err(_) => Check { status: "failed", detail: "worker registry not answering".into() },
    };
    let scheduler = match &s.schedules {
        Some(list) => Check { status: "ok", detail: format!("running here with {} schedules", list.len()) },
        None => Check { status: "disabled", detail: "not running in this process (`conveyor schedule` runs it alone)".into() },
    };
    // The broker holding the queue (Redis, RabbitMQ), when it is not the database.
    let broker = match backend.broker() {
        None => None,
        Some(name) => Some((
            name,
            match tokio::time::timeout(Duration::from_secs(2), backend.ping_broker()).await {
                Ok(Ok(())) => Check { status: "ok", detail: "answering".into() },
                Ok(Err(e)) => {
                    failed = true;
                    tracing::warn!(error = %e, "health: {name} check failed");
                    Check { status: "failed", detail: format!("{name} not answering") }
                }
                Err(_) => {
                    failed = true;
                    Check { status: "failed", detail: format!("{name} did not answer within 2 s") }
                }
            },
        )),
    };
    // How the backend is set up (a Redis that persists nothing, say) is said in the detail of
    // the broker's check, or the database's without a broker. The status stays: the dependency
    // answers, and running without durability may be the operator's choice.
    let warnings = backend.warnings();
    let (mut database, mut broker) = (database, broker);
    if !warnings.is_empty() {
        let detail = match broker.as_mut() {
            Some((_, check)) => &mut check.detail,
            None => &mut database.detail,
        };
        detail.push_str("; warning: ");
        detail.push_str(&warnings.join("; warning: "));
    }
    let degraded = failed || workers.status == "degraded";
    let mut checks = json!({ "database": database, "queue": queue, "workers": workers, "scheduler": scheduler });
    if let Some((name, check)) = broker {
        checks[name] = json!(check);
    }
    let mut body = json!({
        "success": !failed,
        "data": {
            "status": if degraded { "degraded" } else { "ok" },
            "checks": checks,
        }
    });
    #[cfg(not(feature = "sync"))]
    let _ = &uri;
    // `GET /health` adds the product sync's state when the sync is configured.
    #[cfg(feature = "sync")]
    if uri.path() == "/health" {
        if let Some(config) = s.sync.as_deref().filter(|c| c.is_configured()) {
            match conveyor_apps::sync::health(backend.as_ref(), config).await {
                Ok(h) => {
                    body["data"]["sync"] = json!({
                        "last_run": h.last_run, "failures_24h": h.failures_24h, "breakers": h.breakers, "p95_ms": h.p95_ms,
                    });
                }
                Err(e) => tracing::warn!(error = %e, "health: sync state unavailable"),
            }
        }
    }
    let status = if failed { StatusCode::SERVICE_UNAVAILABLE } else { StatusCode::OK };
    // With tokens configured, a caller without one learns whether the service is up (what a
    // load balancer needs) and nothing about what it runs on.
    if !who.authenticated() {
        body = json!({ "success": body["success"], "data": { "status": body["data"]["status"] } });
    }
    (status, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use axum::body::Body;
    use axum::http::Request;
    use conveyor_backends::redis::testing::TestRedisServer;
    use conveyor_backends::redis::{RedisBackend, RedisOptions};
    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_backends::tls::testing::required;
    use conveyor_core::{Conveyor, Registry};
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    use crate::AppState;

    /// `/api/health` over a queue on a Redis of the test's own started with `settings`.
    async fn health_with_redis(settings: &[&str]) -> Option<serde_json::Value> {
        let dir = tempfile::TempDir::new().expect("a temp dir");
        let server = required("a redis-server of the test's own", TestRedisServer::start_with(dir.path().to_path_buf(), settings))?;
        let store = SqliteBackend::open(SqliteOptions::new(dir.path().join("s.db").to_str().expect("a UTF-8 temp path"))).expect("SQLite");
        let backend = Arc::new(RedisBackend::open(RedisOptions::new(server.url()), Arc::new(store)).expect("open Redis"));
        let app = crate::router(AppState::new(Conveyor::new(backend, Registry::new()), crate::AccessConfig::default()));
        let response = app.oneshot(Request::get("/api/health").body(Body::empty()).expect("a request")).await.expect("a response");
        let body = response.into_body().collect().await.expect("the body").to_bytes();
        Some(serde_json::from_slice(&body).expect("JSON"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_redis_that_persists_nothing_is_named_in_the_broker_check() {
        let Some(h) = health_with_redis(&["--save", "", "--appendonly", "no"]).await else { return };
        let redis = &h["data"]["checks"]["redis"];
        assert_eq!(redis["status"], "ok", "{h}");
        let detail = redis["detail"].as_str().unwrap_or_default();
        assert!(detail.starts_with("answering; warning: ") && detail.contains("persists nothing"), "{h}");

        let Some(h) = health_with_redis(&["--appendonly", "yes"]).await else { return };
        assert_eq!(h["data"]["checks"]["redis"]["detail"], "answering", "{h}");
    }
}
