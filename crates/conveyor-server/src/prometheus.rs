//! `GET /metrics` in the Prometheus text format. Counters and histograms are this process's
//! ([`conveyor_core::telemetry`]: they only grow, and `sum()` over instances gives the cluster);
//! gauges read the store, so every instance shows the same (`max()`).

use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use conveyor_core::metrics::{BUCKETS, BUCKET_BOUNDS_MS};
use conveyor_core::telemetry::{self, Histogram};

use crate::error::ApiError;
use crate::AppState;

pub(crate) async fn metrics(State(s): State<AppState>) -> Result<Response, ApiError> {
    let backend = s.conveyor.backend();
    let queues = backend.queues().await?;
    let workers = backend.workers(Duration::from_secs(30)).await?;
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

    let _ = write!(
        out,
        "# HELP conveyor_build_info The running build.\n# TYPE conveyor_build_info gauge\nconveyor_build_info{{version=\"{}\"}} 1\n",
        env!("CARGO_PKG_VERSION")
    );
    counters(&mut out);
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], out).into_response())
}

/// This process's counters and histograms.
fn counters(out: &mut String) {
    let jobs = telemetry::jobs();
    out.push_str(
        "# HELP conveyor_jobs_total Attempts whose outcome this process recorded, by queue, kind and outcome.\n# TYPE conveyor_jobs_total counter\n",
    );
    for (q, k, c) in &jobs {
        for (outcome, n) in [("completed", c.completed), ("retried", c.retried), ("failed", c.failed), ("released", c.released)] {
            let _ = writeln!(out, "conveyor_jobs_total{{queue=\"{}\",kind=\"{}\",outcome=\"{outcome}\"}} {n}", esc(q), esc(k));
        }
    }
    out.push_str("# HELP conveyor_jobs_enqueued_total Jobs this process enqueued (duplicates of unique jobs not counted).\n# TYPE conveyor_jobs_enqueued_total counter\n");
    for (q, k, c) in &jobs {
        let _ = writeln!(out, "conveyor_jobs_enqueued_total{{queue=\"{}\",kind=\"{}\"}} {}", esc(q), esc(k), c.enqueued);
    }
    for (name, help, pick) in [
        ("conveyor_job_duration_seconds", "Run time of attempts (completed, retried or failed).", 0),
        ("conveyor_job_wait_seconds", "Time from available to reserved, of attempts that ran.", 1),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (q, k, c) in &jobs {
            let h: &Histogram = if pick == 0 { &c.duration } else { &c.wait };
            let labels = format!("queue=\"{}\",kind=\"{}\"", esc(q), esc(k));
            let mut cumulative = 0u64;
            for (i, n) in h.buckets.iter().enumerate().take(BUCKETS) {
                cumulative += n;
                let le = BUCKET_BOUNDS_MS.get(i).map_or("+Inf".to_string(), |b| format!("{}", *b as f64 / 1000.0));
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(out, "{name}_sum{{{labels}}} {}\n{name}_count{{{labels}}} {cumulative}", h.sum_ms as f64 / 1000.0);
        }
    }
    for family in telemetry::families() {
        let _ = writeln!(out, "# HELP {0} {1}\n# TYPE {0} counter", family.name, family.help);
        for (values, n) in family.values() {
            let labels: Vec<String> = family.labels.iter().zip(&values).map(|(l, v)| format!("{l}=\"{}\"", esc(v))).collect();
            let _ = writeln!(out, "{}{{{}}} {n}", family.name, labels.join(","));
        }
    }
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}
