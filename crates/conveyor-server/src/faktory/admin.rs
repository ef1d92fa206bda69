//! `INFO`, `QUEUE PAUSE|RESUME|REMOVE|LATENCY` and `FLUSH`: the server as Faktory clients read
//! it, and the administration they may ask for (the admin token's).

use std::sync::atomic::Ordering;

use serde_json::{json, Map, Value};

use conveyor_core::backend::QueueStats;
use conveyor_core::lane;

use super::conn::backend_error;
use super::hub::Hub;
use super::job::rfc3339;
use super::wire::Reply;
use super::FAKTORY_VERSION;

/// `INFO`: the shape Faktory clients parse (the strictest wants `faktory.tasks`, whole numbers
/// and a full `X.Y.Z` version), and Conveyor's own section. Totals count since this process
/// started; queue sizes are the store's (local and remote jobs of each queue).
pub(crate) async fn info(hub: &Hub) -> Reply {
    let stats = match hub.conveyor.backend().queues().await {
        Ok(s) => s,
        Err(e) => return backend_error("INFO", e),
    };
    let queues: Map<String, Value> = stats.iter().map(|s| (s.queue.clone(), json!(s.pending))).collect();
    let now = conveyor_core::clock::now_ms();
    let s = &hub.stats;
    let time = jiff::Timestamp::from_millisecond(now).map(|t| t.strftime("%H:%M:%S UTC").to_string()).unwrap_or_default();
    Reply::json(&json!({
        "now": rfc3339(now),
        "server_utc_time": time,
        "faktory": {
            "total_failures": s.failures.load(Ordering::Relaxed),
            "total_processed": s.processed.load(Ordering::Relaxed),
            "total_enqueued": s.enqueued.load(Ordering::Relaxed),
            "total_queues": queues.len(),
            "queues": queues,
            "tasks": {},
        },
        "server": {
            "description": "Conveyor",
            "faktory_version": FAKTORY_VERSION,
            "uptime": hub.started.elapsed().as_secs(),
            "connections": s.connections.load(Ordering::Relaxed),
            "command_count": s.commands.load(Ordering::Relaxed),
            "used_memory_mb": 0,
        },
        "conveyor": {
            "version": env!("CARGO_PKG_VERSION"),
            "backend": hub.conveyor.backend().name(),
            "remote_workers": hub.workers(),
            "reserves": hub.reserves(),
            "queues": stats.iter().map(|q| json!({
                "queue": q.queue, "pending": q.pending, "delayed": q.delayed, "reserved": q.reserved,
                "failed": q.failed, "paused": q.paused,
            })).collect::<Vec<_>>(),
        },
    }))
}

/// `QUEUE PAUSE|RESUME|REMOVE|LATENCY q…` (`*` for every queue with pause, resume and remove).
/// Pausing acts on the whole queue, its local jobs too; `REMOVE` deletes its remote jobs only
/// (the applications' jobs are never removed through this port).
pub(crate) async fn queue(hub: &Hub, rest: &str) -> Reply {
    let (sub, names) = match rest.split_once(' ') {
        Some((s, n)) => (s.to_ascii_uppercase(), n.split_whitespace().map(str::to_string).collect::<Vec<_>>()),
        None => (rest.to_ascii_uppercase(), Vec::new()),
    };
    if names.is_empty() {
        return Reply::err(format!("QUEUE {sub} needs queue names"));
    }
    let backend = hub.conveyor.backend();
    let stats = match backend.queues().await {
        Ok(s) => s,
        Err(e) => return backend_error("QUEUE", e),
    };
    let all = names.iter().any(|n| n == "*");
    if all && sub == "LATENCY" {
        return Reply::err("QUEUE LATENCY takes queue names, not *");
    }
    let targets: Vec<String> = if all { stats.iter().map(|s| s.queue.clone()).collect() } else { names };
    for q in &targets {
        if let Err(e) = conveyor_core::job::validate_queue_name(q) {
            return Reply::err(format!("QUEUE: {q}: {e}"));
        }
    }
    let result = match sub.as_str() {
        "PAUSE" => {
            for q in &targets {
                if let Err(e) = backend.pause(q).await {
                    return backend_error("QUEUE PAUSE", e);
                }
            }
            Ok(Reply::Ok)
        }
        "RESUME" => {
            for q in &targets {
                if let Err(e) = backend.resume(q).await {
                    return backend_error("QUEUE RESUME", e);
                }
            }
            Ok(Reply::Ok)
        }
        "REMOVE" => {
            for q in &targets {
                if let Err(e) = backend.clear(&lane::remote(q)).await {
                    return backend_error("QUEUE REMOVE", e);
                }
            }
            Ok(Reply::Ok)
        }
        "LATENCY" => {
            let latency: Map<String, Value> = targets.iter().map(|q| (q.clone(), json!(latency_of(&stats, q)))).collect();
            Ok(Reply::json(&Value::Object(latency)))
        }
        other => Err(format!("unknown QUEUE subcommand {other:?} (PAUSE, RESUME, REMOVE, LATENCY)")),
    };
    hub.pauses_changed().await;
    result.unwrap_or_else(Reply::err)
}

/// How long the next job of `queue` has waited, in seconds (0 for an empty or unknown queue).
fn latency_of(stats: &[QueueStats], queue: &str) -> f64 {
    stats.iter().find(|s| s.queue == queue).map_or(0.0, |s| s.oldest_wait_s)
}

/// `FLUSH`: removes every remote job waiting in a queue and every remote job in the failed
/// store. Local jobs and the applications' data stay (a Faktory client cannot know them).
pub(crate) async fn flush(hub: &Hub) -> Reply {
    let backend = hub.conveyor.backend();
    let stats = match backend.queues().await {
        Ok(s) => s,
        Err(e) => return backend_error("FLUSH", e),
    };
    for q in stats {
        let lane = lane::remote(&q.queue);
        if let Err(e) = backend.clear(&lane).await {
            return backend_error("FLUSH", e);
        }
        if let Err(e) = backend.flush_failed(Some(&lane)).await {
            return backend_error("FLUSH", e);
        }
    }
    Reply::Ok
}
