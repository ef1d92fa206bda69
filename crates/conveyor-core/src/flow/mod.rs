//! Flow control: per-key concurrency — at most `limit` jobs with the same key run at once, across
//! every worker and machine that shares the store.
//!
//! A job carries its key as the tag `concurrency:<limit>:<key>` (so every backend keeps it
//! without a schema change, the job's page shows it and `?tag=` finds it), or its kind has a rule
//! in the registry ([`Registry::concurrency`](crate::registry::Registry::concurrency), from a
//! `[[kinds]]` entry's `concurrency_key` / `concurrency_limit`), which wins over the job's.
//!
//! **Slots are taken when a job starts**, not when it is reserved: jobs a worker holds in its
//! buffer take none. A worker about to run a keyed job takes a slot ([`acquire`]); the slot
//! lives in the shared state (Redis) or in the store's `concurrency_*` tables (SQLite,
//! PostgreSQL, and the RabbitMQ transport's store), with an expiry that the worker's heartbeat
//! moves on with the job's lease, so a slot held by a crashed worker comes back with its lease.
//!
//! **A job whose key is at its limit is parked**: released (no attempt spent) to run again
//! [`PARK_RECHECK`] later, and put in line for the key ([`wait`]). The line is joined only after
//! the release committed, and only if the key is still full — both checked in one atomic step
//! with the slots' release — so no wake-up is lost. A worker that ends a keyed job gives its
//! slot back ([`release`]) and, when a slot is free, hands it to the first job in line and makes
//! that job ready at once. Jobs of other keys never wait behind a parked job (it left the ready
//! queue), and a parked job does not poll: the recheck is a safety net for a job whose wake-up
//! was lost with a crashed process.

mod bank;

pub use bank::{Bank, KEEP_IDLE};

use std::time::Duration;

use serde::Serialize;

use crate::backend::{DelayedAction, QueueBackend, QueueBackendExt, Result, RowExt, SqlValue, Tx};
use crate::clock::now_ms;
use crate::job::{Completion, Job, JobId, JobState, Outcome};
use crate::state::blocking;

/// The tag that carries a job's key: `concurrency:<limit>:<key>`.
pub const TAG: &str = "concurrency:";
/// A parked job runs again after this long even if no slot was handed to it.
pub const PARK_RECHECK: Duration = Duration::from_secs(10);
/// How long a slot handed to a parked job waits for that job to start.
const HANDOVER: Duration = Duration::from_secs(30);
/// The longest key, in bytes.
pub const MAX_KEY: usize = 200;
/// The highest limit.
pub const MAX_LIMIT: u32 = 100_000;

/// A job's concurrency key and limit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Concurrency {
    pub key: String,
    pub limit: u32,
    /// From the kind's rule: its limit replaces the key's.
    pub authoritative: bool,
}

/// Checks a flow-control key from a caller (`what`: "concurrency", "fairness", "debounce"):
/// 1 to [`MAX_KEY`] bytes, no control characters.
pub fn check_key(what: &str, key: &str) -> std::result::Result<(), String> {
    if key.is_empty() || key.len() > MAX_KEY {
        return Err(format!("the {what} key must be 1 to {MAX_KEY} bytes"));
    }
    if key.chars().any(char::is_control) {
        return Err(format!("the {what} key may not hold control characters"));
    }
    Ok(())
}

impl Concurrency {
    /// Checks a key and limit from a caller; the error names what is wrong.
    pub fn new(key: impl Into<String>, limit: u32) -> std::result::Result<Self, String> {
        let key = key.into();
        check_key("concurrency", &key)?;
        if limit == 0 || limit > MAX_LIMIT {
            return Err(format!("the concurrency limit must be 1 to {MAX_LIMIT}"));
        }
        Ok(Concurrency { key, limit, authoritative: false })
    }

    /// The job's tag.
    pub fn tag(&self) -> String {
        format!("{TAG}{}:{}", self.limit, self.key)
    }

    /// The key a job's tags carry, if any.
    pub fn of_tags(tags: &[String]) -> Option<Self> {
        tags.iter().find_map(|t| {
            let (limit, key) = t.strip_prefix(TAG)?.split_once(':')?;
            Concurrency::new(key, limit.parse().ok()?).ok()
        })
    }

    /// The job's key: its kind's rule (a dotted path into the payload) wins over its tag. A
    /// payload without the rule's path has no key.
    pub fn of_job(registry: &crate::registry::Registry, job: &Job) -> Option<Self> {
        Concurrency::of(registry, &job.kind, || serde_json::from_str(&job.payload).ok(), &job.tags)
    }

    /// The same from a job's parts (`payload` is read only when the kind has a rule).
    pub fn of(
        registry: &crate::registry::Registry,
        kind: &str,
        payload: impl FnOnce() -> Option<serde_json::Value>,
        tags: &[String],
    ) -> Option<Self> {
        if let Some(rule) = registry.concurrency_of(kind) {
            let key = rule.key_of(&payload()?)?;
            let mut c = Concurrency::new(key, rule.limit).ok()?;
            c.authoritative = true;
            return Some(c);
        }
        Concurrency::of_tags(tags)
    }
}

/// A kind's rule: the key is the payload's value at `path` (dotted: `customer.id`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub path: String,
    pub limit: u32,
}

impl Rule {
    pub fn new(path: impl Into<String>, limit: u32) -> std::result::Result<Self, String> {
        let path = path.into();
        if path.is_empty() || path.split('.').any(str::is_empty) {
            return Err(format!("concurrency_key must be a dotted path into the payload such as customer_id, got {path:?}"));
        }
        Concurrency::new("x", limit)?;
        Ok(Rule { path, limit })
    }

    /// The key in `payload`: a string as it is, a number or boolean as written; `None` when the
    /// path is missing, null, or an object or array.
    pub fn key_of(&self, payload: &serde_json::Value) -> Option<String> {
        value_at(&self.path, payload)
    }
}

/// The value at a dotted `path` in `payload` as a key: a string as it is, a number or boolean
/// as written; `None` when the path is missing, null, or an object or array.
pub fn value_at(path: &str, payload: &serde_json::Value) -> Option<String> {
    let mut v = payload;
    for part in path.split('.') {
        v = match v {
            serde_json::Value::Object(o) => o.get(part)?,
            serde_json::Value::Array(a) => a.get(part.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    match v {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// One key's figures, for the dashboard.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct KeyStats {
    pub key: String,
    pub limit: i64,
    /// Slots held: by running jobs, and kept by workers for the key's next job ([`Bank`]).
    pub running: i64,
    /// Jobs parked in line for a slot.
    pub waiting: i64,
}

/// Takes a slot of `c.key` for `job` until `expires_at` (unix ms); `false`: the key is at its
/// limit.
pub async fn acquire(backend: &dyn QueueBackend, c: &Concurrency, job: JobId, expires_at: i64) -> Result<bool> {
    acquire_as(backend, c, &job.to_string(), expires_at).await
}

/// [`acquire`] under a slot name of the caller's choosing (a job's id, or one a [`Bank`] chose);
/// a slot already held under that name is extended and counts as taken.
pub async fn acquire_as(backend: &dyn QueueBackend, c: &Concurrency, name: &str, expires_at: i64) -> Result<bool> {
    let (key, id, limit, auth, now) = (c.key.clone(), name.to_string(), c.limit as i64, c.authoritative, now_ms());
    if let Some(st) = backend.shared_state() {
        return Ok(blocking(st, move |s| s.slot_acquire(&key, &id, limit, auth, now, expires_at)).await?.0);
    }
    backend.transact(move |tx| sql::acquire(tx, &key, &id, limit, auth, now, expires_at)).await
}

/// Parks a job whose key is at its limit: commits its release (no attempt spent; it runs again
/// after [`PARK_RECHECK`] at the latest), then puts it in line for `key` ([`wait`]). The release
/// is committed here, not batched with other outcomes, because the job may join the line only
/// once it is released. A failed commit gives the release back for the caller to record.
pub async fn park(
    backend: &dyn QueueBackend,
    template: Completion,
    key: &str,
) -> std::result::Result<Completion, (Completion, crate::backend::BackendError)> {
    let at = now_ms() + PARK_RECHECK.as_millis() as i64;
    let release = Completion { outcome: Outcome::Release { at }, ..template };
    if let Err(e) = backend.complete(vec![release.clone()]).await {
        return Err((release, e));
    }
    if let Err(e) = wait(backend, key, release.id).await {
        tracing::warn!(error = %e, %key, "joining a concurrency key's line failed; the job runs again at its recheck");
    }
    Ok(release)
}

/// Puts the parked `job` in line for `key`; if a slot is free by now, makes the job ready at once
/// instead. Call only once the job's release committed.
pub async fn wait(backend: &dyn QueueBackend, key: &str, job: JobId) -> Result<()> {
    let (k, id, now) = (key.to_string(), job.to_string(), now_ms());
    let in_line = match backend.shared_state() {
        Some(st) => blocking(st, move |s| s.slot_wait(&k, &id, now)).await?,
        None => backend.transact(move |tx| sql::wait(tx, &k, &id, now)).await?,
    };
    if !in_line {
        backend.act_on_delayed(vec![job], DelayedAction::RunNow).await?;
    }
    Ok(())
}

/// Gives back `job`'s slot of `key` and hands free slots to the jobs in line, making each ready
/// at once. A job in line that is gone gives its slot back in turn.
pub async fn release(backend: &dyn QueueBackend, key: &str, job: JobId) -> Result<()> {
    hand_over(backend, key, job.to_string()).await
}

/// [`release`] of the slot held under `name`.
pub async fn release_named(backend: &dyn QueueBackend, key: &str, name: &str) -> Result<()> {
    hand_over(backend, key, name.to_string()).await
}

/// Hands the slots that expired (their holder crashed) to the jobs in line: for every key with
/// jobs in line and a free slot. The workers' reapers call it every second. Returns the keys
/// that have jobs in line, whose kept slots ([`Bank`]) should go back. Costs a read of the
/// keys with jobs in line, not of every busy key.
pub async fn sweep(backend: &dyn QueueBackend) -> Result<Vec<String>> {
    let waited = match backend.shared_state() {
        Some(st) => blocking(st, |s| s.slot_waited()).await?,
        None => backend.transact(sql::waited).await?,
    };
    for key in &waited {
        // Hands nothing on while the key is full.
        hand_over(backend, key, String::new()).await?;
    }
    Ok(waited)
}

/// Gives back `job`'s slot (none when empty) and hands free slots on.
async fn hand_over(backend: &dyn QueueBackend, key: &str, job: String) -> Result<()> {
    let mut giving = Some(job);
    while let Some(id) = giving.take() {
        let (k, now) = (key.to_string(), now_ms());
        let handed = match backend.shared_state() {
            Some(st) => blocking(st, move |s| s.slot_release(&k, &id, now)).await?,
            None => backend.transact(move |tx| sql::release(tx, &k, &id, now)).await?,
        };
        let Some(next) = handed else { break };
        let Ok(next_id) = next.parse::<JobId>() else {
            giving = Some(next);
            continue;
        };
        if backend.act_on_delayed(vec![next_id], DelayedAction::RunNow).await?.is_empty() {
            // Not parked any more: ready or running already (its recheck came first), it keeps
            // the slot; gone, the slot goes to the next in line.
            let alive = backend.job(next_id).await?.is_some_and(|j| matches!(j.state, JobState::Pending | JobState::Reserved));
            if !alive {
                giving = Some(next);
                continue;
            }
        }
        // Another slot may be free too (expired ones): hand on until the key is full or its
        // line is empty.
        giving = Some(String::new());
    }
    Ok(())
}

/// Moves the expiry of running jobs' slots on to `expires_at`.
pub async fn extend(backend: &dyn QueueBackend, slots: Vec<(String, JobId)>, expires_at: i64) -> Result<()> {
    extend_named(backend, slots.into_iter().map(|(k, id)| (k, id.to_string())).collect(), expires_at).await
}

/// [`extend`] of slots by (key, name).
pub async fn extend_named(backend: &dyn QueueBackend, slots: Vec<(String, String)>, expires_at: i64) -> Result<()> {
    if slots.is_empty() {
        return Ok(());
    }
    match backend.shared_state() {
        Some(st) => blocking(st, move |s| s.slot_extend(&slots, expires_at)).await,
        None => backend.transact(move |tx| sql::extend(tx, &slots, expires_at)).await,
    }
}

/// The busiest keys (most running plus waiting), at most `max`.
pub async fn keys(backend: &dyn QueueBackend, max: usize) -> Result<Vec<KeyStats>> {
    let now = now_ms();
    let rows = match backend.shared_state() {
        Some(st) => blocking(st, move |s| s.slot_keys(max, now)).await?,
        None => backend.transact(move |tx| sql::keys(tx, max, now)).await?,
    };
    Ok(rows.into_iter().map(|(key, limit, running, waiting)| KeyStats { key, limit, running, waiting }).collect())
}

/// If `job` is in line for `key`: the key's (limit, running).
pub async fn waiting(backend: &dyn QueueBackend, key: &str, job: JobId) -> Result<Option<(i64, i64)>> {
    let (k, id, now) = (key.to_string(), job.to_string(), now_ms());
    match backend.shared_state() {
        Some(st) => blocking(st, move |s| s.slot_waiting(&k, &id, now)).await,
        None => backend.transact(move |tx| sql::waiting(tx, &k, &id, now)).await,
    }
}

/// When a slot handed to a parked job expires if that job does not start.
#[doc(hidden)]
pub fn handover_expiry(now: i64) -> i64 {
    now + HANDOVER.as_millis() as i64
}

/// The relational form: one SQL text for SQLite and PostgreSQL. Every step first upserts or
/// updates the key's row in `concurrency_keys`, which serialises the steps of one key on
/// PostgreSQL (the row lock) as SQLite's single writer does.
mod sql {
    use super::*;

    fn text(s: &str) -> SqlValue {
        SqlValue::Text(s.to_string())
    }

    /// Locks the key's row; its limit, or `None` when the key is idle (no row).
    fn lock(tx: &mut dyn Tx, key: &str) -> Result<Option<i64>> {
        Ok(tx.query("UPDATE concurrency_keys SET lim = lim WHERE key = $1 RETURNING lim", &[text(key)])?.first().map(|r| r.int(0)))
    }

    fn running(tx: &mut dyn Tx, key: &str, now: i64) -> Result<i64> {
        tx.execute("DELETE FROM concurrency_slots WHERE key = $1 AND expires_at <= $2", &[text(key), now.into()])?;
        Ok(tx.query("SELECT count(*) FROM concurrency_slots WHERE key = $1", &[text(key)])?.first().map_or(0, |r| r.int(0)))
    }

    pub(super) fn acquire(tx: &mut dyn Tx, key: &str, job: &str, limit: i64, auth: bool, now: i64, expires_at: i64) -> Result<bool> {
        let lim = tx.query(
            "INSERT INTO concurrency_keys (key, lim) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET lim = CASE WHEN CAST($3 AS BIGINT) = 1 THEN $2 ELSE concurrency_keys.lim END
             RETURNING lim",
            &[text(key), limit.into(), (auth as i64).into()],
        )?;
        let lim = lim.first().map_or(limit, |r| r.int(0));
        let running = running(tx, key, now)?;
        let held = tx.execute(
            "UPDATE concurrency_slots SET expires_at = $3 WHERE key = $1 AND job_id = $2",
            &[text(key), text(job), expires_at.into()],
        )?;
        if held > 0 {
            return Ok(true);
        }
        if running >= lim {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO concurrency_slots (key, job_id, expires_at) VALUES ($1, $2, $3)",
            &[text(key), text(job), expires_at.into()],
        )?;
        // A parked job that got its slot at its recheck leaves the line.
        tx.execute("DELETE FROM concurrency_waiters WHERE key = $1 AND job_id = $2", &[text(key), text(job)])?;
        Ok(true)
    }

    pub(super) fn wait(tx: &mut dyn Tx, key: &str, job: &str, now: i64) -> Result<bool> {
        let Some(lim) = lock(tx, key)? else { return Ok(false) };
        if running(tx, key, now)? < lim {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO concurrency_waiters (key, job_id, since) VALUES ($1, $2, $3) ON CONFLICT (key, job_id) DO NOTHING",
            &[text(key), text(job), now.into()],
        )?;
        Ok(true)
    }

    pub(super) fn release(tx: &mut dyn Tx, key: &str, job: &str, now: i64) -> Result<Option<String>> {
        let Some(lim) = lock(tx, key)? else { return Ok(None) };
        tx.execute("DELETE FROM concurrency_slots WHERE key = $1 AND job_id = $2", &[text(key), text(job)])?;
        let running = running(tx, key, now)?;
        if running < lim {
            let next = tx.query("SELECT job_id FROM concurrency_waiters WHERE key = $1 ORDER BY since, job_id LIMIT 1", &[text(key)])?;
            if let Some(next) = next.first().and_then(|r| r.text(0)).map(str::to_string) {
                tx.execute("DELETE FROM concurrency_waiters WHERE key = $1 AND job_id = $2", &[text(key), text(&next)])?;
                tx.execute(
                    "INSERT INTO concurrency_slots (key, job_id, expires_at) VALUES ($1, $2, $3)",
                    &[text(key), text(&next), handover_expiry(now).into()],
                )?;
                return Ok(Some(next));
            }
            if running == 0 {
                // Idle: the next job to start sets the key's limit afresh.
                tx.execute("DELETE FROM concurrency_keys WHERE key = $1", &[text(key)])?;
            }
        }
        Ok(None)
    }

    pub(super) fn waited(tx: &mut dyn Tx) -> Result<Vec<String>> {
        let rows = tx.query("SELECT DISTINCT key FROM concurrency_waiters", &[])?;
        Ok(rows.iter().filter_map(|r| r.text(0).map(str::to_string)).collect())
    }

    pub(super) fn extend(tx: &mut dyn Tx, slots: &[(String, String)], expires_at: i64) -> Result<()> {
        for (key, job) in slots {
            tx.execute(
                "UPDATE concurrency_slots SET expires_at = $3 WHERE key = $1 AND job_id = $2",
                &[text(key), text(job), expires_at.into()],
            )?;
        }
        Ok(())
    }

    pub(super) fn keys(tx: &mut dyn Tx, max: usize, now: i64) -> Result<Vec<(String, i64, i64, i64)>> {
        let rows = tx.query(
            "SELECT key, lim, running, waiting FROM (
               SELECT k.key AS key, k.lim AS lim,
                      (SELECT count(*) FROM concurrency_slots s WHERE s.key = k.key AND s.expires_at > $1) AS running,
                      (SELECT count(*) FROM concurrency_waiters w WHERE w.key = k.key) AS waiting
               FROM concurrency_keys k
             ) t
             ORDER BY running + waiting DESC, key
             LIMIT $2",
            &[now.into(), (max as i64).into()],
        )?;
        Ok(rows.iter().map(|r| (r.text(0).unwrap_or_default().to_string(), r.int(1), r.int(2), r.int(3))).collect())
    }

    pub(super) fn waiting(tx: &mut dyn Tx, key: &str, job: &str, now: i64) -> Result<Option<(i64, i64)>> {
        let in_line = tx.query("SELECT 1 FROM concurrency_waiters WHERE key = $1 AND job_id = $2", &[text(key), text(job)])?;
        if in_line.is_empty() {
            return Ok(None);
        }
        let lim = tx.query("SELECT lim FROM concurrency_keys WHERE key = $1", &[text(key)])?.first().map_or(0, |r| r.int(0));
        let running = tx
            .query("SELECT count(*) FROM concurrency_slots WHERE key = $1 AND expires_at > $2", &[text(key), now.into()])?
            .first()
            .map_or(0, |r| r.int(0));
        Ok(Some((lim, running)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tags_carry_key_and_limit() {
        let c = Concurrency::new("shop:7", 3).unwrap();
        assert_eq!(c.tag(), "concurrency:3:shop:7");
        assert_eq!(Concurrency::of_tags(&["x".into(), c.tag()]), Some(c));
        assert_eq!(Concurrency::of_tags(&["concurrency:zero:k".into()]), None);
        assert_eq!(Concurrency::of_tags(&["concurrency:0:k".into()]), None);
        assert!(Concurrency::new("", 1).is_err());
        assert!(Concurrency::new("k", 0).is_err());
        assert!(Concurrency::new("k".repeat(201), 1).is_err());
        assert!(Concurrency::new("a\nb", 1).is_err());
    }

    #[test]
    fn rules_read_a_dotted_path() {
        let r = Rule::new("customer.id", 2).unwrap();
        assert_eq!(r.key_of(&json!({"customer": {"id": "c1"}})), Some("c1".into()));
        assert_eq!(r.key_of(&json!({"customer": {"id": 42}})), Some("42".into()));
        assert_eq!(r.key_of(&json!({"customer": {}})), None);
        assert_eq!(r.key_of(&json!({"customer": {"id": null}})), None);
        assert_eq!(r.key_of(&json!({"customer": {"id": {"x": 1}}})), None);
        assert_eq!(Rule::new("items.0", 1).unwrap().key_of(&json!({"items": ["a"]})), Some("a".into()));
        assert!(Rule::new("a..b", 1).is_err());
        assert!(Rule::new("", 1).is_err());
        assert!(Rule::new("a", 0).is_err());
    }
}
