//! Circuit breakers by name: closed → open when the failure rate over a sliding window passes
//! a threshold (with a minimum number of calls); open → half-open after the open duration,
//! letting a few probe calls through; half-open → closed when the probes succeed, or open again
//! on a failure. State lives in the store — or in the backend's shared state (Redis, one script
//! per decision; see [`crate::state`]) — so every worker of every process sees the same
//! breaker; each transition is logged as an event (`breaker.open`, `breaker.half_open`,
//! `breaker.closed`), in the transaction that makes it when there is one.

use std::time::Duration;

use serde::Serialize;

use crate::backend::{QueueBackend, QueueBackendExt, Result, RowExt, Tx};
use crate::clock::now_ms;
use crate::event::Event;
use crate::state::{blocking, BreakerRules, SharedState};
use crate::Conveyor;

#[derive(Clone, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Open when failures / calls over the window reach this (0.0–1.0).
    pub failure_rate: f64,
    /// ... and at least this many calls were made in the window.
    pub min_calls: u32,
    pub window: Duration,
    pub open_for: Duration,
    /// Calls let through while half-open; all must succeed to close.
    pub probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig { failure_rate: 0.5, min_calls: 10, window: Duration::from_secs(60), open_for: Duration::from_secs(30), probes: 1 }
    }
}

/// Whether a call may go ahead.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Permit {
    Allowed,
    /// The breaker is open (or half-open with its probes taken): try again after this.
    Rejected {
        retry_after: Duration,
    },
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BreakerInfo {
    pub name: String,
    /// `closed`, `open` or `half_open`.
    pub state: String,
    /// Over the current window.
    pub failure_rate: f64,
    pub calls: u64,
    pub opened_at: Option<i64>,
}

#[derive(Clone)]
pub struct Breaker {
    conveyor: Conveyor,
    name: String,
    config: BreakerConfig,
}

/// What one process saw of its breakers lately, so that a caller making many calls does not
/// ask the store before each: a breaker that let a call succeed in the last `ttl` is assumed
/// closed for that long (an opening elsewhere is noticed within `ttl`); a failure forgets it.
/// Keep one per application instance (not a global: one process may talk to several stores).
pub struct ClosedCache {
    ttl: std::time::Duration,
    seen: std::sync::Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl Default for ClosedCache {
    fn default() -> Self {
        ClosedCache { ttl: Duration::from_millis(250), seen: Default::default() }
    }
}

impl ClosedCache {
    /// [`Breaker::allow`], skipped while the breaker was seen closed within the last `ttl`.
    pub async fn allow(&self, breaker: &Breaker) -> Result<Permit> {
        if self.recently_closed(breaker.name()) {
            return Ok(Permit::Allowed);
        }
        breaker.allow().await
    }

    /// Whether a call through `name` succeeded within the last `ttl`.
    pub fn recently_closed(&self, name: &str) -> bool {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).get(name).is_some_and(|t| t.elapsed() < self.ttl)
    }

    /// A call through `name` succeeded (and was recorded).
    pub fn succeeded(&self, name: &str) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_string(), std::time::Instant::now());
    }

    /// A call through `name` failed: ask the store again next time.
    pub fn failed(&self, name: &str) {
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).remove(name);
    }
}

/// Buckets per window: the window slides in steps of a tenth of its length.
const BUCKETS: i64 = 10;

impl Breaker {
    pub fn new(conveyor: Conveyor, name: impl Into<String>, config: BreakerConfig) -> Self {
        Breaker { conveyor, name: name.into(), config }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn rules(&self) -> BreakerRules {
        BreakerRules {
            bucket_ms: (self.config.window.as_millis() as i64 / BUCKETS).max(1),
            buckets: BUCKETS,
            open_ms: self.config.open_for.as_millis() as i64,
            probes: self.config.probes,
            failure_rate: self.config.failure_rate,
            min_calls: self.config.min_calls,
        }
    }

    /// Asks to make a call. A half-open breaker lets `probes` calls through.
    pub async fn allow(&self) -> Result<Permit> {
        let now = now_ms();
        if let Some(st) = self.conveyor.backend().shared_state() {
            let (name, rules) = (self.name.clone(), self.rules());
            let d = blocking(st, move |s| s.breaker_allow(&name, now, &rules)).await?;
            if let Some(to) = d.transition {
                self.announce_alone(to, now).await?;
            }
            return Ok(match d.retry_after_ms {
                None => Permit::Allowed,
                Some(ms) => Permit::Rejected { retry_after: Duration::from_millis(ms.max(1) as u64) },
            });
        }
        let this = self.clone();
        self.conveyor.backend().transact(move |tx| this.allow_in(tx, now)).await
    }

    /// Logs a transition made on the shared state, with its event in a transaction of its own.
    async fn announce_alone(&self, to: String, now: i64) -> Result<()> {
        let this = self.clone();
        self.conveyor.backend().transact(move |tx| this.announce(tx, &to, now)).await
    }

    fn allow_in(&self, tx: &mut dyn Tx, now: i64) -> Result<Permit> {
        self.lock(tx, now)?;
        let rows = tx.query("SELECT state, opened_at, probes, changed_at FROM breakers WHERE name = $1", &[self.name.as_str().into()])?;
        let Some(r) = rows.first() else { return Ok(Permit::Allowed) };
        let (state, opened_at, probes, changed_at) = (r.text(0).unwrap_or("closed").to_string(), r.int(1), r.int(2), r.int(3));
        let open_ms = self.config.open_for.as_millis() as i64;
        match state.as_str() {
            "open" if now < opened_at + open_ms => {
                Ok(Permit::Rejected { retry_after: Duration::from_millis((opened_at + open_ms - now) as u64) })
            }
            "open" => {
                self.transition(tx, "half_open", now, None)?;
                tx.execute("UPDATE breakers SET probes = 1, probe_successes = 0 WHERE name = $1", &[self.name.as_str().into()])?;
                Ok(Permit::Allowed)
            }
            "half_open" if probes < self.config.probes as i64 => {
                tx.execute("UPDATE breakers SET probes = probes + 1 WHERE name = $1", &[self.name.as_str().into()])?;
                Ok(Permit::Allowed)
            }
            // The probes never reported (their worker died, or they were released): after another
            // open period, let a fresh round of probes through rather than stay stuck.
            "half_open" if now >= changed_at + open_ms => {
                tx.execute(
                    "UPDATE breakers SET probes = 1, probe_successes = 0, changed_at = $2 WHERE name = $1",
                    &[self.name.as_str().into(), now.into()],
                )?;
                Ok(Permit::Allowed)
            }
            // Probes are out: wait a fraction of the open time for their verdict.
            "half_open" => Ok(Permit::Rejected { retry_after: (self.config.open_for / 4).max(Duration::from_millis(100)) }),
            _ => Ok(Permit::Allowed),
        }
    }

    /// Records the outcome of a call that was allowed.
    pub async fn record(&self, success: bool) -> Result<()> {
        let now = now_ms();
        if let Some(st) = self.conveyor.backend().shared_state() {
            let (name, rules) = (self.name.clone(), self.rules());
            if let Some(to) = blocking(st, move |s| s.breaker_record(&name, success, now, &rules)).await? {
                self.announce_alone(to, now).await?;
            }
            return Ok(());
        }
        let this = self.clone();
        self.conveyor.backend().transact(move |tx| this.record_in(tx, success, now)).await
    }

    /// The same inside the caller's transaction (e.g. the one that records the call's result).
    /// On a shared state the outcome counts at once (the call happened either way); the event
    /// of a transition it causes is part of the transaction.
    pub fn record_in(&self, tx: &mut dyn Tx, success: bool, now: i64) -> Result<()> {
        if let Some(sh) = tx.shared_state() {
            if let Some(to) = sh.state().breaker_record(&self.name, success, now, &self.rules())? {
                self.announce(tx, &to, now)?;
            }
            return Ok(());
        }
        let name = self.name.as_str();
        let bucket_ms = (self.config.window.as_millis() as i64 / BUCKETS).max(1);
        let bucket = now / bucket_ms;
        tx.execute(
            "INSERT INTO breaker_calls (name, bucket, successes, failures) VALUES ($1, $2, $3, $4)
             ON CONFLICT (name, bucket) DO UPDATE SET successes = breaker_calls.successes + excluded.successes,
                                                      failures = breaker_calls.failures + excluded.failures",
            &[name.into(), bucket.into(), (success as i64).into(), (!success as i64).into()],
        )?;
        tx.execute("DELETE FROM breaker_calls WHERE name = $1 AND bucket < $2", &[name.into(), (bucket - 2 * BUCKETS).into()])?;
        self.lock(tx, now)?;
        let state = tx.query("SELECT state, probe_successes FROM breakers WHERE name = $1", &[name.into()])?;
        let (state, probe_successes) =
            state.first().map_or(("closed".to_string(), 0), |r| (r.text(0).unwrap_or("closed").to_string(), r.int(1)));
        match state.as_str() {
            "half_open" if !success => self.transition(tx, "open", now, Some(now))?,
            "half_open" => {
                if probe_successes + 1 >= self.config.probes as i64 {
                    self.transition(tx, "closed", now, None)?;
                    // A fresh start: failures from before the outage do not count against it.
                    tx.execute("DELETE FROM breaker_calls WHERE name = $1", &[name.into()])?;
                } else {
                    tx.execute("UPDATE breakers SET probe_successes = probe_successes + 1 WHERE name = $1", &[name.into()])?;
                }
            }
            "closed" if !success => {
                let (calls, failures) = window_counts(tx, name, bucket - BUCKETS + 1)?;
                if calls >= self.config.min_calls as i64 && failures as f64 >= self.config.failure_rate * calls as f64 {
                    self.transition(tx, "open", now, Some(now))?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// Takes the breaker's row lock (creating the row, closed, if needed) before its state is
    /// read: concurrent callers then decide one after another on the latest state — one probe,
    /// one transition — on PostgreSQL as on SQLite. A portable `SELECT … FOR UPDATE`.
    fn lock(&self, tx: &mut dyn Tx, now: i64) -> Result<()> {
        tx.execute(
            "INSERT INTO breakers (name, state, opened_at, probes, probe_successes, changed_at) VALUES ($1, 'closed', NULL, 0, 0, $2)
             ON CONFLICT (name) DO NOTHING",
            &[self.name.as_str().into(), now.into()],
        )?;
        tx.execute("UPDATE breakers SET name = name WHERE name = $1", &[self.name.as_str().into()])?;
        Ok(())
    }

    fn transition(&self, tx: &mut dyn Tx, to: &str, now: i64, opened_at: Option<i64>) -> Result<()> {
        tx.execute(
            "INSERT INTO breakers (name, state, opened_at, probes, probe_successes, changed_at) VALUES ($1, $2, $3, 0, 0, $4)
             ON CONFLICT (name) DO UPDATE SET state = excluded.state, opened_at = coalesce(excluded.opened_at, breakers.opened_at),
                                              probes = 0, probe_successes = 0, changed_at = excluded.changed_at",
            &[self.name.as_str().into(), to.into(), opened_at.into(), now.into()],
        )?;
        self.announce(tx, to, now)
    }

    /// Logs a transition and emits its event in `tx`.
    fn announce(&self, tx: &mut dyn Tx, to: &str, now: i64) -> Result<()> {
        tracing::warn!(breaker = %self.name, state = to, "circuit breaker changed state");
        let event = Event::new(format!("breaker.{to}"), &serde_json::json!({ "breaker": self.name, "state": to, "at": now }));
        self.conveyor.emit_in(tx, event)?;
        Ok(())
    }

    pub async fn info(&self) -> Result<BreakerInfo> {
        Ok(info_of(self.conveyor.backend().as_ref(), &self.name, self.config.window).await?.unwrap_or(BreakerInfo {
            name: self.name.clone(),
            state: "closed".into(),
            failure_rate: 0.0,
            calls: 0,
            opened_at: None,
        }))
    }
}

fn window_counts(tx: &mut dyn Tx, name: &str, from_bucket: i64) -> Result<(i64, i64)> {
    let rows = tx.query(
        "SELECT coalesce(sum(successes), 0), coalesce(sum(failures), 0) FROM breaker_calls WHERE name = $1 AND bucket >= $2",
        &[name.into(), from_bucket.into()],
    )?;
    let (s, f) = rows.first().map_or((0, 0), |r| (r.int(0), r.int(1)));
    Ok((s + f, f))
}

async fn info_of(backend: &dyn QueueBackend, name: &str, window: Duration) -> Result<Option<BreakerInfo>> {
    let bucket_ms = (window.as_millis() as i64 / BUCKETS).max(1);
    let from = now_ms() / bucket_ms - BUCKETS + 1;
    if let Some(st) = backend.shared_state() {
        let n = name.to_string();
        let Some(b) = blocking(st, move |s| s.breaker_state(&n, from)).await? else { return Ok(None) };
        let calls = b.successes + b.failures;
        return Ok(Some(BreakerInfo {
            name: name.into(),
            opened_at: if b.state == "closed" { None } else { b.opened_at },
            state: b.state,
            failure_rate: ratio(b.failures, calls),
            calls: calls as u64,
        }));
    }
    let rows = backend.query("SELECT state, opened_at FROM breakers WHERE name = $1", vec![name.into()]).await?;
    let counts = backend
        .query(
            "SELECT coalesce(sum(successes), 0), coalesce(sum(failures), 0) FROM breaker_calls WHERE name = $1 AND bucket >= $2",
            vec![name.into(), from.into()],
        )
        .await?;
    let (s, f) = counts.first().map_or((0, 0), |r| (r.int(0), r.int(1)));
    let Some(r) = rows.first() else {
        return Ok((s + f > 0).then(|| BreakerInfo {
            name: name.into(),
            state: "closed".into(),
            failure_rate: ratio(f, s + f),
            calls: (s + f) as u64,
            opened_at: None,
        }));
    };
    let state = r.text(0).unwrap_or("closed").to_string();
    Ok(Some(BreakerInfo {
        name: name.into(),
        opened_at: if state == "closed" { None } else { r.opt_int(1) },
        state,
        failure_rate: ratio(f, s + f),
        calls: (s + f) as u64,
    }))
}

fn ratio(f: i64, n: i64) -> f64 {
    if n == 0 {
        0.0
    } else {
        (f as f64 / n as f64 * 1000.0).round() / 1000.0
    }
}

/// Every breaker that has state or recent calls (for `/api/breakers`), with the window used
/// for the failure rate.
pub async fn list(backend: &dyn QueueBackend, window: Duration) -> Result<Vec<BreakerInfo>> {
    let names: Vec<String> = match backend.shared_state() {
        Some(st) => {
            let mut names = blocking(st, |s: &dyn SharedState| s.breaker_names()).await?;
            names.sort();
            names
        }
        None => backend
            .query("SELECT name FROM breakers UNION SELECT DISTINCT name FROM breaker_calls ORDER BY 1", vec![])
            .await?
            .iter()
            .filter_map(|r| r.text(0).map(str::to_string))
            .collect(),
    };
    let mut out = Vec::new();
    for n in &names {
        if let Some(i) = info_of(backend, n, window).await? {
            out.push(i);
        }
    }
    Ok(out)
}
