//! `GET /api/stats`: the overview numbers in one call — queue totals, the busiest wait,
//! workers, and job counts for the past hour and today (UTC). The applications add their own
//! sections (orders) as they land.

use std::time::Duration;

use axum::extract::State;
use axum::response::Response;
use serde::Serialize;

use conveyor_core::backend::MetricsQuery;
use conveyor_core::clock::now_ms;
use conveyor_core::metrics::summarize;

use crate::error::{ok, ApiError};
use crate::AppState;

#[derive(Serialize)]
struct Counts {
    processed: u64,
    completed: u64,
    retried: u64,
    failed: u64,
    avg_runtime_ms: f64,
    p95_runtime_ms: f64,
}

#[utoipa::path(get, path = "/api/stats", tag = "system", responses((status = 200, description = "overview numbers", body = Envelope<Object>)))]
pub(crate) async fn stats(State(s): State<AppState>) -> Result<Response, ApiError> {
    let backend = s.conveyor.backend();
    let now = now_ms();
    let queues = backend.queues().await?;
    let workers = backend.workers(Duration::from_secs(30)).await?;
    let failed_7d = backend.failed_since(now - 7 * 86_400_000).await?;
    let today_start = now - now.rem_euclid(86_400_000);
    let rows = backend.metrics(MetricsQuery { since: today_start.min(now - 3_600_000), ..Default::default() }).await?;
    let counts = |since: i64| {
        let r = summarize(rows.iter().filter(|r| r.minute >= since));
        Counts {
            processed: r.processed(),
            completed: r.completed,
            retried: r.retried,
            failed: r.failed,
            avg_runtime_ms: (r.avg_runtime_ms() * 10.0).round() / 10.0,
            p95_runtime_ms: (r.p95_runtime_ms() * 10.0).round() / 10.0,
        }
    };
    let busiest = queues.iter().filter(|q| q.pending > 0).max_by(|a, b| a.oldest_wait_s.total_cmp(&b.oldest_wait_s));
    let sups = workers.iter().flat_map(|w| &w.supervisors);
    Ok(ok(serde_json::json!({
        "queues": {
            "count": queues.len(),
            "pending": queues.iter().map(|q| q.pending).sum::<u64>(),
            "delayed": queues.iter().map(|q| q.delayed).sum::<u64>(),
            "reserved": queues.iter().map(|q| q.reserved).sum::<u64>(),
            "failed": queues.iter().map(|q| q.failed).sum::<u64>(),
            "failed_7d": failed_7d,
            "per_minute": queues.iter().map(|q| q.per_minute).sum::<u64>(),
            "max_wait": busiest.map(|q| serde_json::json!({ "queue": q.queue, "seconds": q.oldest_wait_s })),
        },
        "workers": {
            "processes": workers.len(),
            "supervisors": sups.clone().count(),
            "executors": sups.clone().map(|s| s.concurrency).sum::<usize>(),
            "busy": sups.map(|s| s.busy).sum::<usize>(),
        },
        "past_hour": counts(now - 3_600_000),
        "today": counts(today_start),
    })))
}
