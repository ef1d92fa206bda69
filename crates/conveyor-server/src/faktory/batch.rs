//! `BATCH NEW|OPEN|COMMIT|STATUS` (Faktory Enterprise's batches, free here) onto Conveyor's
//! batches: a batch stays open until `COMMIT` (jobs pushed with `custom.bid` join it meanwhile),
//! `success` is the callback job run when every job succeeded, `complete` the one run when
//! every job has finished (succeeded, or failed for good), and `parent_bid` makes the batch a
//! member of another, which finishes only after it. Failures never cancel the other jobs.

use serde_json::{json, Value};

use conveyor_core::backend::{JobFilter, Page};
use conveyor_core::batch::{self, Batch};
use conveyor_core::job::JobState;
use conveyor_core::BackendError;

use super::conn::{backend_error, Connection};
use super::job::rfc3339;
use super::wire::Reply;

/// `BATCH <sub> …`.
pub(crate) async fn command(c: &Connection, rest: &str) -> Reply {
    let (sub, arg) = rest.split_once(' ').map_or((rest, ""), |(s, a)| (s, a.trim()));
    let backend = c.hub().conveyor.backend().clone();
    match sub.to_ascii_uppercase().as_str() {
        "NEW" => new(c, arg).await,
        "OPEN" | "COMMIT" | "STATUS" if arg.is_empty() || arg.len() > 200 => Reply::err(format!("BATCH {sub} needs a batch id")),
        "OPEN" => match batch::find(backend.as_ref(), arg).await {
            Ok(Some(b)) if b.finished_at.is_none() => Reply::Bulk(b.id),
            Ok(_) => Reply::err(format!("No such batch {arg}")),
            Err(e) => backend_error("BATCH OPEN", e),
        },
        "COMMIT" => match batch::commit(backend.as_ref(), arg).await {
            Ok(true) => Reply::Ok,
            // Committed before: committing again changes nothing.
            Ok(false) => match batch::find(backend.as_ref(), arg).await {
                Ok(Some(_)) => Reply::Ok,
                Ok(None) => Reply::err(format!("No such batch {arg}")),
                Err(e) => backend_error("BATCH COMMIT", e),
            },
            Err(e) => backend_error("BATCH COMMIT", e),
        },
        "STATUS" => match batch::find(backend.as_ref(), arg).await {
            Ok(Some(b)) => {
                let hold = b.open as u64;
                let done = b.finished_at.is_some();
                // "" not enqueued, "1" enqueued, "2" the callback job succeeded.
                let (mut success_st, mut complete_st) = ("", "");
                if done {
                    let (then, finally) = match batch::callback_kinds(backend.as_ref(), &b.id).await {
                        Ok(k) => k,
                        Err(e) => return backend_error("BATCH STATUS", e),
                    };
                    let filter = JobFilter { tag: Some(format!("batch:{}", b.id)), ..JobFilter::default() };
                    let callbacks = match backend.jobs(filter, Page::new(1, 10)).await {
                        Ok(p) => p.items,
                        Err(e) => return backend_error("BATCH STATUS", e),
                    };
                    let st = |kind: &Option<String>| match kind {
                        Some(k) if callbacks.iter().any(|j| &j.kind == k && j.state == JobState::Completed) => "2",
                        Some(k) if callbacks.iter().any(|j| &j.kind == k) => "1",
                        _ => "",
                    };
                    complete_st = st(&finally);
                    if b.failed == 0 {
                        success_st = st(&then);
                    }
                }
                Reply::json(&json!({
                    "bid": b.id,
                    "total": b.total - hold,
                    "pending": b.pending - hold,
                    "failed": b.failed,
                    "created_at": rfc3339(b.created_at),
                    "description": b.name,
                    "parent_bid": b.parent_id,
                    "complete_st": complete_st,
                    "success_st": success_st,
                }))
            }
            Ok(None) => Reply::err(format!("No such batch {arg}")),
            Err(e) => backend_error("BATCH STATUS", e),
        },
        other => Reply::err(format!("unknown BATCH subcommand {other:?} (NEW, OPEN, COMMIT, STATUS)")),
    }
}

async fn new(c: &Connection, arg: &str) -> Reply {
    let o = match serde_json::from_str::<Value>(arg) {
        Ok(Value::Object(o)) => o,
        _ => return Reply::err("BATCH NEW takes a JSON object"),
    };
    let name = match o.get("description") {
        None | Some(Value::Null) => "faktory batch".to_string(),
        Some(Value::String(d)) if d.len() <= 200 => d.clone(),
        Some(_) => return Reply::err("BATCH NEW: description must be a string of at most 200 bytes"),
    };
    let mut b = Batch::new(name).allow_failures().held();
    for (field, is_success) in [("success", true), ("complete", false)] {
        let Some(v) = o.get(field).filter(|v| !v.is_null()) else { continue };
        let mut v = v.clone();
        // Callback jobs may come without a jid or arguments.
        if let Value::Object(job) = &mut v {
            job.entry("jid").or_insert_with(|| json!(format!("cb-{}", conveyor_core::JobId::new().0.simple())));
            job.entry("args").or_insert_with(|| json!([]));
        }
        match c.pushed(v) {
            Ok(p) if is_success => b = b.then(p.job),
            Ok(p) => b = b.finally(p.job),
            Err(e) => return Reply::err(format!("BATCH NEW: {field}: {e}")),
        }
    }
    if let Some(parent) = o.get("parent_bid").filter(|v| !v.is_null()) {
        match parent.as_str() {
            Some(p) if !p.is_empty() && p.len() <= 200 => b = b.parent(p),
            _ => return Reply::err("BATCH NEW: parent_bid must be a batch id"),
        }
    }
    match b.dispatch(&c.hub().conveyor).await {
        Ok(id) => Reply::Bulk(id),
        Err(BackendError::NotFound(_)) => {
            Reply::err(format!("No such batch {}", o.get("parent_bid").and_then(Value::as_str).unwrap_or_default()))
        }
        Err(e) => backend_error("BATCH NEW", e),
    }
}
