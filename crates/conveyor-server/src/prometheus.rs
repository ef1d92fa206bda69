//! `GET /metrics` in the Prometheus text format, from the same numbers as the dashboard.

use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use conveyor_core::backend::MetricsQuery;
use conveyor_core::clock::now_ms;
use conveyor_core::metrics::{MetricsRow, BUCKETS, BUCKET_BOUNDS_MS};

use crate::error::ApiError;
use crate::AppState;

pub(crate) async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let backend = s.conveyor.backend();
    let queues = backend.queues().await?;
    let workers = backend.workers(Duration::from_secs(30)).await?;
    let rows = backend.metrics(MetricsQuery { since: now_ms() - 3_600_000, ..Default::default() }).await?;
    let mut out = String::with_capacity(4096);
    out.push_str("# HELP conveyor_queue_jobs Jobs in a queue by state.\n# TYPE conveyor_queue_jobs gauge\n");
    for q in &queues {
        for (state, n) in [("pending", q.pending), ("delayed", q.delayed), ("reserved", q.reserved), ("failed", q.failed)] {
            let _ = writeln!(out, "conveyor_queue_jobs{{queue=\"{}\",state=\"{state}\"}} {n}", esc(&q.queue));
        }
    }
    out.push_str("# HELP conveyor_queue_paused 1 when the queue is paused.\n# TYPE conveyor_queue_paused gauge\n");
    for q in &queues {
        let _ = writeln!(out, "conveyor_queue_paused{{queue=\"{}\"}} {}", esc(&q.queue), q.paused as u8);
    }
    out.push_str(
        "# HELP conveyor_queue_oldest_wait_seconds Wait of the next job to run.\n# TYPE conveyor_queue_oldest_wait_seconds gauge\n",
    );
    for q in &queues {
        let _ = writeln!(out, "conveyor_queue_oldest_wait_seconds{{queue=\"{}\"}} {}", esc(&q.queue), q.oldest_wait_s);
    }
    let executors: usize = workers.iter().flat_map(|w| &w.supervisors).map(|s| s.concurrency).sum();
    let busy: usize = workers.iter().flat_map(|w| &w.supervisors).map(|s| s.busy).sum();
    let _ = write!(
        out,
        "# HELP conveyor_worker_processes Worker processes seen in the last 30 s.\n# TYPE conveyor_worker_processes gauge\nconveyor_worker_processes {}\n\
         # HELP conveyor_worker_executors Executors (concurrency slots) across workers.\n# TYPE conveyor_worker_executors gauge\nconveyor_worker_executors {executors}\n\
         # HELP conveyor_worker_busy Executors running a job now.\n# TYPE conveyor_worker_busy gauge\nconveyor_worker_busy {busy}\n",
        workers.len()
    );

    let breakers = conveyor_core::breaker::list(backend.as_ref(), Duration::from_secs(60)).await?;
    out.push_str(
        "# HELP conveyor_breaker_state Circuit breaker state: 0 closed, 1 half-open, 2 open.\n# TYPE conveyor_breaker_state gauge\n",
    );
    for b in &breakers {
        let v = match b.state.as_str() {
            "open" => 2,
            "half_open" => 1,
            _ => 0,
        };
        let _ = writeln!(out, "conveyor_breaker_state{{breaker=\"{}\"}} {v}", esc(&b.name));
    }
    out.push_str(
        "# HELP conveyor_breaker_failure_rate Failure rate over the breaker's window.\n# TYPE conveyor_breaker_failure_rate gauge\n",
    );
    for b in &breakers {
        let _ = writeln!(out, "conveyor_breaker_failure_rate{{breaker=\"{}\"}} {}", esc(&b.name), b.failure_rate);
    }

    // Per queue and kind over the last hour: attempts by outcome and runtime / wait histograms.
    let mut by_key: std::collections::BTreeMap<(String, String), MetricsRow> = Default::default();
    for r in &rows {
        by_key.entry((r.queue.clone(), r.kind.clone())).or_default().merge(r);
    }
    out.push_str("# HELP conveyor_jobs_last_hour Attempts finished in the last hour by outcome.\n# TYPE conveyor_jobs_last_hour gauge\n");
    for ((q, k), r) in &by_key {
        for (outcome, n) in [("completed", r.completed), ("retried", r.retried), ("failed", r.failed)] {
            let _ = writeln!(out, "conveyor_jobs_last_hour{{queue=\"{}\",kind=\"{}\",outcome=\"{outcome}\"}} {n}", esc(q), esc(k));
        }
    }
    for (name, help, pick) in [
        ("conveyor_job_runtime_seconds", "Job run time over the last hour.", 0),
        ("conveyor_job_wait_seconds", "Time from available to reserved over the last hour.", 1),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for ((q, k), r) in &by_key {
            let (hist, sum) = if pick == 0 { (&r.runtime_hist, r.runtime_sum_ms) } else { (&r.wait_hist, r.wait_sum_ms) };
            let labels = format!("queue=\"{}\",kind=\"{}\"", esc(q), esc(k));
            let mut cumulative = 0u64;
            for (i, n) in hist.iter().enumerate().take(BUCKETS) {
                cumulative += n;
                let le = BUCKET_BOUNDS_MS.get(i).map_or("+Inf".to_string(), |b| format!("{}", *b as f64 / 1000.0));
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {cumulative}", sum as f64 / 1000.0);
        }
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
