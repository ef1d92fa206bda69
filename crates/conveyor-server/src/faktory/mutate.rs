//! `MUTATE {"cmd", "target", "filter"}`: Faktory's bulk operations on its job sets, for the
//! admin token. The dead set is the failed store's remote jobs: `requeue` retries them (same
//! job, its remote workers fetch it again), `discard` and `clear` forget them, `kill` leaves
//! them where they are. The filter takes `jobtype` (exact), `jids`, and `regexp`, which (as in
//! Faktory) is a glob (`*`, `?`, `[…]`) over the job's JSON.
//!
//! The `scheduled` and `retries` sets (jobs waiting for their time) have no per-job operation
//! in every backend yet: those targets are refused with a reason.

use serde_json::Value;

use conveyor_core::backend::{FailedJob, Page, MAX_DEPTH};
use conveyor_core::{lane, JobId};

use super::conn::backend_error;
use super::hub::Hub;
use super::wire::Reply;

/// The filter of a mutation; a missing one matches every job.
#[derive(Default)]
struct Filter {
    jobtype: Option<String>,
    jids: Option<Vec<String>>,
    glob: Option<String>,
}

impl Filter {
    fn parse(v: Option<&Value>) -> Result<Filter, String> {
        let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(Filter::default()) };
        let o = v.as_object().ok_or("MUTATE: filter must be an object")?;
        let text = |k: &str| -> Result<Option<String>, String> {
            match o.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) if s.len() <= 1000 => Ok(Some(s.clone())),
                Some(_) => Err(format!("MUTATE: filter.{k} must be a string")),
            }
        };
        let jids = match o.get("jids") {
            None | Some(Value::Null) => None,
            Some(Value::Array(a)) if a.len() <= 10_000 => Some(
                a.iter()
                    .map(|j| j.as_str().map(str::to_string))
                    .collect::<Option<Vec<_>>>()
                    .ok_or("MUTATE: filter.jids must be strings")?,
            ),
            Some(_) => return Err("MUTATE: filter.jids must be an array of at most 10,000 jids".into()),
        };
        Ok(Filter { jobtype: text("jobtype")?, jids: jids.filter(|j| !j.is_empty()), glob: text("regexp")? })
    }

    fn matches(&self, f: &FailedJob) -> bool {
        if self.jobtype.as_ref().is_some_and(|t| *t != f.kind) {
            return false;
        }
        if let Some(jids) = &self.jids {
            let jid = f.payload.get("jid").and_then(Value::as_str).map_or_else(|| f.id.to_string(), str::to_string);
            if !jids.contains(&jid) {
                return false;
            }
        }
        match &self.glob {
            Some(g) => glob(g.as_bytes(), f.payload.to_string().as_bytes()),
            None => true,
        }
    }
}

/// Redis-style glob matching: `*` any run, `?` one byte, `[abc]` / `[a-z]` / `[^a]` a class,
/// `\` escapes.
fn glob(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while si < s.len() {
        if pi < p.len() {
            match p[pi] {
                b'*' => {
                    star = Some(pi);
                    mark = si;
                    pi += 1;
                    continue;
                }
                b'?' => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                b'[' => {
                    if let Some((true, next)) = class(&p[pi..], s[si]) {
                        pi += next;
                        si += 1;
                        continue;
                    }
                }
                b'\\' if pi + 1 < p.len() && p[pi + 1] == s[si] => {
                    pi += 2;
                    si += 1;
                    continue;
                }
                c if c == s[si] => {
                    pi += 1;
                    si += 1;
                    continue;
                }
                _ => {}
            }
        }
        match star {
            Some(st) => {
                pi = st + 1;
                mark += 1;
                si = mark;
            }
            None => return false,
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Whether `c` is in the class at the start of `p` (`[…]`), and the class's length.
fn class(p: &[u8], c: u8) -> Option<(bool, usize)> {
    let end = p.iter().skip(1).position(|&b| b == b']')? + 1;
    let body = &p[1..end];
    let (negate, body) = match body.first() {
        Some(b'^') => (true, &body[1..]),
        _ => (false, body),
    };
    let mut i = 0;
    let mut found = false;
    while i < body.len() {
        if i + 2 < body.len() && body[i + 1] == b'-' {
            found |= (body[i]..=body[i + 2]).contains(&c);
            i += 3;
        } else {
            found |= body[i] == c;
            i += 1;
        }
    }
    Some((found != negate, end + 1))
}

pub(crate) async fn command(hub: &Hub, rest: &str) -> Reply {
    let o = match serde_json::from_str::<Value>(rest) {
        Ok(Value::Object(o)) => o,
        _ => return Reply::err("MUTATE takes a JSON object {cmd, target, filter}"),
    };
    let cmd = o.get("cmd").and_then(Value::as_str).unwrap_or_default();
    if !matches!(cmd, "kill" | "discard" | "requeue" | "clear") {
        return Reply::err(format!("MUTATE: unknown cmd {cmd:?} (kill, discard, requeue, clear)"));
    }
    let filter = match Filter::parse(o.get("filter")) {
        Ok(f) => f,
        Err(e) => return Reply::err(e),
    };
    match o.get("target").and_then(Value::as_str).unwrap_or_default() {
        "dead" => {}
        "scheduled" | "retries" => {
            return Reply::err("MUTATE: the scheduled and retries sets cannot be mutated in this version of Conveyor yet (dead can)")
        }
        other => return Reply::err(format!("MUTATE: unknown target {other:?} (retries, scheduled, dead)")),
    }
    if cmd == "kill" {
        // Dead jobs are dead already.
        return Reply::Ok;
    }
    let backend = hub.conveyor.backend();
    let queues = match backend.queues().await {
        Ok(q) => q,
        Err(e) => return backend_error("MUTATE", e),
    };
    let mut chosen: Vec<JobId> = Vec::new();
    for q in queues.iter().filter(|q| q.failed > 0) {
        let lane = lane::remote(&q.queue);
        let mut page = Page::new(1, 500);
        loop {
            let p = match backend.failed(Some(&lane), page.clone()).await {
                Ok(p) => p,
                Err(e) => return backend_error("MUTATE", e),
            };
            chosen.extend(p.items.iter().filter(|f| f.queue == q.queue && filter.matches(f)).map(|f| f.id));
            match p.next {
                Some(next) if chosen.len() < MAX_DEPTH as usize * 10 => page = Page::after(next, 500),
                _ => break,
            }
        }
    }
    let result = match cmd {
        "requeue" => backend.retry_failed(chosen).await.map(|_| ()),
        _ => {
            let mut r = Ok(());
            for id in chosen {
                if let Err(e) = backend.forget_failed(id).await {
                    r = Err(e);
                    break;
                }
            }
            r
        }
    };
    match result {
        Ok(()) => Reply::Ok,
        Err(e) => backend_error("MUTATE", e),
    }
}

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs_match_like_redis_scan_patterns() {
        let m = |p: &str, s: &str| glob(p.as_bytes(), s.as_bytes());
        assert!(m("*", "anything") && m("*uid:12345*", r#"{"args":["uid:12345"]}"#));
        assert!(m("h?llo", "hello") && !m("h?llo", "hllo"));
        assert!(m("h[ae]llo", "hallo") && !m("h[^e]llo", "hello") && m("v[0-9]", "v7"));
        assert!(!m("*uid:9*", r#"{"args":["uid:12345"]}"#) && m(r"a\*b", "a*b") && !m(r"a\*b", "axb"));
    }
}
