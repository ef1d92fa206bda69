//! `MUTATE {"cmd", "target", "filter"}`: Faktory's bulk operations on its job sets, for the
//! admin token. The dead set is the failed store's remote jobs: `requeue` retries them (same
//! job, its remote workers fetch it again), `discard` and `clear` forget them, `kill` leaves
//! them where they are. The filter takes `jobtype` (exact), `jids`, and `regexp`, which (as in
//! Faktory) is a glob (`*`, `?`, `[…]`) over the job's JSON.
//!
//! `scheduled` (delayed jobs that never ran) and `retries` (delayed jobs waiting to run again)
//! are the remote lanes' delayed jobs: `requeue` makes them ready now, `discard` and `clear`
//! delete them, `kill` moves them to the failed store unrun (`Queue::act_on_delayed`,
//! which the Redis queue does not have yet: there these targets are refused with a reason).

use serde_json::Value;

use conveyor_core::backend::{DelayedAction, JobFilter, Page, MAX_DEPTH};
use conveyor_core::job::JobState;
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

    fn matches(&self, id: JobId, kind: &str, payload: &Value) -> bool {
        if self.jobtype.as_ref().is_some_and(|t| t != kind) {
            return false;
        }
        if let Some(jids) = &self.jids {
            let jid = payload.get("jid").and_then(Value::as_str).map_or_else(|| id.to_string(), str::to_string);
            if !jids.contains(&jid) {
                return false;
            }
        }
        match &self.glob {
            Some(g) => glob(g.as_bytes(), payload.to_string().as_bytes()),
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
    let target = o.get("target").and_then(Value::as_str).unwrap_or_default();
    if !matches!(target, "dead" | "scheduled" | "retries") {
        return Reply::err(format!("MUTATE: unknown target {target:?} (retries, scheduled, dead)"));
    }
    if cmd == "kill" && target == "dead" {
        // Dead jobs are dead already.
        return Reply::Ok;
    }
    let backend = hub.conveyor.backend();
    let queues = match backend.queues().await {
        Ok(q) => q,
        Err(e) => return backend_error("MUTATE", e),
    };
    // At most this many jobs in one mutation (each set is read page by page).
    let most = MAX_DEPTH as usize * 10;
    let mut chosen: Vec<JobId> = Vec::new();
    for q in &queues {
        let lane = lane::remote(&q.queue);
        let mut page = Page::new(1, 500);
        loop {
            let next = if target == "dead" {
                if q.failed == 0 {
                    break;
                }
                match backend.failed(Some(&lane), page.clone()).await {
                    Ok(p) => {
                        chosen.extend(p.items.iter().filter(|f| filter.matches(f.id, &f.kind, &f.payload)).map(|f| f.id));
                        p.next
                    }
                    Err(e) => return backend_error("MUTATE", e),
                }
            } else {
                if q.delayed == 0 {
                    break;
                }
                let f = JobFilter { queue: Some(lane.clone()), state: Some(JobState::Delayed), ..JobFilter::default() };
                match backend.jobs(f, page.clone()).await {
                    Ok(p) => {
                        let retried = target == "retries";
                        chosen.extend(
                            p.items
                                .iter()
                                .filter(|j| (j.attempts > 0) == retried && filter.matches(j.id, &j.kind, &j.payload))
                                .map(|j| j.id),
                        );
                        p.next
                    }
                    Err(e) => return backend_error("MUTATE", e),
                }
            };
            match next {
                Some(next) if chosen.len() < most => page = Page::after(next, 500),
                _ => break,
            }
        }
    }
    let result = match (target, cmd) {
        ("dead", "requeue") => backend.retry_failed(chosen).await.map(|_| ()),
        ("dead", _) => {
            let mut r = Ok(());
            for id in chosen {
                if let Err(e) = backend.forget_failed(id).await {
                    r = Err(e);
                    break;
                }
            }
            r
        }
        (_, action) => {
            let action = match action {
                "requeue" => DelayedAction::RunNow,
                "kill" => DelayedAction::Fail("killed by MUTATE before it ran".into()),
                _ => DelayedAction::Delete,
            };
            let mut r = Ok(());
            for ids in chosen.chunks(1000) {
                if let Err(e) = backend.act_on_delayed(ids.to_vec(), action.clone()).await {
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
