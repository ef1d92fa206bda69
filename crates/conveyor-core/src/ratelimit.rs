//! Rate limiting by key with GCRA (the generic cell rate algorithm): `limit` per `period`,
//! allowing bursts of up to `burst`. State is one timestamp per key (the theoretical arrival
//! time, in unix microseconds), updated by one conditional upsert — or one Redis script when
//! the backend has a shared state (see [`crate::state`]) — so concurrent checks from any
//! process are exact.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

use crate::backend::{BackendError, QueueBackend, QueueBackendExt, Result, RowExt, Tx};
use crate::clock::now_us;
use crate::state::{blocking, Deferred};

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    pub limit: u32,
    pub period: Duration,
    /// Requests allowed at once after a quiet spell (default: `limit`).
    pub burst: u32,
}

impl RateLimit {
    pub fn per(limit: u32, period: Duration) -> Self {
        RateLimit { limit: limit.max(1), period, burst: limit.max(1) }
    }

    /// At most `burst` units at once after a quiet spell (at least 1).
    pub fn with_burst(mut self, burst: u32) -> Self {
        self.burst = burst.max(1);
        self
    }

    /// `"5/60"`: 5 per 60 seconds.
    pub fn parse(text: &str) -> std::result::Result<Self, String> {
        let (n, secs) = text.split_once('/').ok_or_else(|| format!("expected LIMIT/SECONDS like 5/60, got {text:?}"))?;
        let n: u32 = n.trim().parse().map_err(|_| format!("limit must be a whole number, got {n:?}"))?;
        let secs: f64 = secs.trim().parse().map_err(|_| format!("window must be a number of seconds, got {secs:?}"))?;
        if n == 0 || !secs.is_finite() || secs <= 0.0 {
            return Err("limit and window must be positive".into());
        }
        Ok(RateLimit::per(n, Duration::from_secs_f64(secs)))
    }

    /// Microseconds between units, so that limits of thousands a second stay exact.
    fn interval_us(&self) -> i64 {
        (self.period.as_micros() as i64 / self.limit as i64).max(1)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub enum Decision {
    Allowed { remaining: u32 },
    Limited { retry_after: Duration },
}

impl Decision {
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allowed { .. })
    }
}

#[derive(Clone)]
pub struct RateLimiter {
    backend: Arc<dyn QueueBackend>,
    name: String,
    limit: RateLimit,
}

impl RateLimiter {
    pub fn new(backend: Arc<dyn QueueBackend>, name: impl Into<String>, limit: RateLimit) -> Self {
        RateLimiter { backend, name: name.into(), limit }
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Takes one unit for `key` if the limit allows it.
    pub async fn check(&self, key: &str) -> Result<Decision> {
        self.check_n(key, 1).await
    }

    /// Takes `n` units at once (a job about to make `n` calls), all or none. `n` above the
    /// burst can never pass and is an error.
    pub async fn check_n(&self, key: &str, n: u32) -> Result<Decision> {
        self.check_n_at(key, n, now_us()).await
    }

    /// [`check_n`](Self::check_n) by a caller whose clock read `now_us` before it reached the
    /// key: for tests of callers whose readings arrive out of order.
    #[doc(hidden)]
    pub async fn check_n_at(&self, key: &str, n: u32, now: i64) -> Result<Decision> {
        if let Some(st) = self.backend.shared_state() {
            let (k, t, tolerance) = self.cost(key, n)?;
            let (allowed, tat, now) = blocking(st, move |s| s.rate_take(&k, now, t, tolerance)).await?;
            return Ok(self.decision(allowed, tat, now, t, tolerance));
        }
        let (this, key) = (self.clone(), key.to_string());
        self.backend.transact(move |tx| this.take_in(tx, &key, n, now)).await
    }

    /// The stored key, the cost of `n` units and the tolerance, in µs.
    fn cost(&self, key: &str, n: u32) -> Result<(String, i64, i64)> {
        if n == 0 || n > self.limit.burst.max(1) {
            return Err(BackendError::Invalid(format!(
                "rate limit {}: {n} units at once exceed the burst of {}",
                self.name, self.limit.burst
            )));
        }
        let t = self.limit.interval_us() * n as i64;
        Ok((format!("{}:{key}", self.name), t, self.limit.interval_us() * self.limit.burst.max(1) as i64))
    }

    /// The same inside the caller's transaction: the unit is taken only if it commits (a
    /// notification counts against its user's limit together with its log row).
    pub fn check_in(&self, tx: &mut dyn Tx, key: &str) -> Result<Decision> {
        self.check_n_in(tx, key, 1)
    }

    /// `n` units inside the caller's transaction.
    pub fn check_n_in(&self, tx: &mut dyn Tx, key: &str, n: u32) -> Result<Decision> {
        self.take_in(tx, key, n, now_us())
    }

    fn take_in(&self, tx: &mut dyn Tx, key: &str, n: u32, now: i64) -> Result<Decision> {
        let (k, t, tolerance) = self.cost(key, n)?;
        if let Some(sh) = tx.shared_state() {
            // Taken at once on the shared state, given back if the transaction rolls back.
            let (allowed, tat, now) = sh.state().rate_take(&k, now, t, tolerance)?;
            if allowed {
                sh.on_rollback(Deferred::RateRefund { key: k, t });
            }
            return Ok(self.decision(allowed, tat, now, t, tolerance));
        }
        // Allowed when max(tat, now) + n*T - now <= burst * T; then tat moves on by n*T. The
        // key's clock never runs back: `now` is at least the `seen` of the call before (see
        // `SharedState::rate_take`). In the SET list every column reads the row's old values.
        let now_sql = "(CASE WHEN rate_limits.seen > $2 THEN rate_limits.seen ELSE $2 END)";
        let base_sql = format!("(CASE WHEN rate_limits.tat > {now_sql} THEN rate_limits.tat ELSE {now_sql} END)");
        let ok_sql = format!("{base_sql} + $3 - {now_sql} <= $4");
        let rows = tx.query(
            &format!(
                "INSERT INTO rate_limits (key, tat, allowed, seen) VALUES ($1, $5, 1, $2)
                 ON CONFLICT (key) DO UPDATE SET
                   allowed = CASE WHEN {ok_sql} THEN 1 ELSE 0 END,
                   tat = CASE WHEN {ok_sql} THEN {base_sql} + $3 ELSE rate_limits.tat END,
                   seen = {now_sql}
                 RETURNING allowed, tat, seen"
            ),
            &[k.into(), now.into(), t.into(), tolerance.into(), (now + t).into()],
        )?;
        let r = rows.first().ok_or_else(|| BackendError::Other("rate limit upsert returned no row".into()))?;
        Ok(self.decision(r.int(0) == 1, r.int(1), r.int(2), t, tolerance))
    }

    fn decision(&self, allowed: bool, tat: i64, now: i64, t: i64, tolerance: i64) -> Decision {
        if allowed {
            Decision::Allowed { remaining: ((tolerance - (tat - now)) / self.limit.interval_us()).max(0) as u32 }
        } else {
            Decision::Limited { retry_after: Duration::from_micros((tat - now - (tolerance - t)).max(1) as u64) }
        }
    }
}
