//! `TRACK GET|SET` (Faktory Enterprise's job tracking, free here): a job pushed with
//! `custom.track = 1` has its state (`enqueued`, `working`, `success`, `failed`, `dead`), and
//! what its worker reports (`percent`, `desc`), kept for 30 minutes after its last change in
//! the cache (the store, or Redis when configured: every process sees it). `reserve_until`
//! extends the job's reservation.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use conveyor_core::cache::Cache;
use conveyor_core::clock::now_ms;

use super::conn::backend_error;
use super::hub::Hub;
use super::job::{rfc3339, rfc3339_ms};
use super::wire::Reply;

const KEEP: Duration = Duration::from_secs(30 * 60);

#[derive(Serialize, Deserialize, Default)]
struct Track {
    state: String,
    updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    percent: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    desc: Option<String>,
}

fn key(jid: &str) -> String {
    format!("faktory:track:{jid}")
}

/// Whether a job (its Faktory JSON) asked to be tracked.
pub(crate) fn tracked(job: &Value) -> bool {
    job.get("custom").and_then(|c| c.get("track")).is_some_and(|t| t.as_i64() == Some(1) || t.as_bool() == Some(true))
}

/// Whether the stored payload of a job asked to be tracked (cheap for the others).
pub(crate) fn payload_tracked(payload: &str) -> bool {
    payload.contains("\"track\"") && serde_json::from_str::<Value>(payload).is_ok_and(|v| tracked(&v))
}

/// Records a tracked job's new state, keeping what its worker reported.
pub(crate) async fn set_state(hub: &Hub, jid: &str, state: &str) {
    let cache = Cache::new(hub.conveyor.backend().clone());
    let mut t: Track = cache.get(&key(jid)).await.ok().flatten().unwrap_or_default();
    t.state = state.to_string();
    t.updated_at = rfc3339(now_ms());
    if let Err(e) = cache.put(&key(jid), &t, Some(KEEP)).await {
        tracing::warn!(error = %e, jid, "recording a tracked job's state failed");
    }
}

/// `TRACK GET <jid>` and `TRACK SET {…}`.
pub(crate) async fn command(hub: &Hub, rest: &str) -> Reply {
    let (sub, arg) = rest.split_once(' ').map_or((rest, ""), |(s, a)| (s, a.trim()));
    let cache = Cache::new(hub.conveyor.backend().clone());
    match sub.to_ascii_uppercase().as_str() {
        "GET" => {
            if arg.is_empty() || arg.len() > 200 {
                return Reply::err("TRACK GET needs a jid");
            }
            match cache.get::<Track>(&key(arg)).await {
                Ok(Some(t)) => {
                    let mut v = serde_json::to_value(t).unwrap_or_default();
                    v["jid"] = json!(arg);
                    Reply::json(&v)
                }
                Ok(None) => Reply::json(&json!({ "jid": arg, "state": "unknown", "updated_at": "" })),
                Err(e) => backend_error("TRACK GET", e),
            }
        }
        "SET" => {
            let o: Map<String, Value> = match serde_json::from_str(arg) {
                Ok(Value::Object(o)) => o,
                _ => return Reply::err("TRACK SET takes a JSON object with the job's jid"),
            };
            let Some(jid) = o.get("jid").and_then(Value::as_str).filter(|j| !j.is_empty() && j.len() <= 200) else {
                return Reply::err("TRACK SET needs the job's jid");
            };
            let percent = match o.get("percent") {
                None | Some(Value::Null) => None,
                Some(p) => match p.as_u64().filter(|p| *p <= 100) {
                    Some(p) => Some(p),
                    None => return Reply::err("TRACK SET: percent must be a whole number from 0 to 100"),
                },
            };
            let desc = match o.get("desc") {
                None | Some(Value::Null) => None,
                Some(Value::String(d)) if d.len() <= 1000 => Some(d.clone()),
                Some(_) => return Reply::err("TRACK SET: desc must be a string of at most 1,000 bytes"),
            };
            if let Some(until) = o.get("reserve_until").filter(|v| !v.is_null()) {
                let Some(ms) = until.as_str().and_then(rfc3339_ms) else {
                    return Reply::err("TRACK SET: reserve_until must be an RFC 3339 time");
                };
                hub.extend(jid, ms);
            }
            let mut t: Track = match cache.get(&key(jid)).await {
                Ok(t) => {
                    t.unwrap_or_else(|| Track { state: if hub.holds(jid) { "working" } else { "unknown" }.into(), ..Track::default() })
                }
                Err(e) => return backend_error("TRACK SET", e),
            };
            if percent.is_some() {
                t.percent = percent;
            }
            if desc.is_some() {
                t.desc = desc;
            }
            t.updated_at = rfc3339(now_ms());
            match cache.put(&key(jid), &t, Some(KEEP)).await {
                Ok(()) => Reply::Ok,
                Err(e) => backend_error("TRACK SET", e),
            }
        }
        other => Reply::err(format!("unknown TRACK subcommand {other:?} (GET, SET)")),
    }
}
