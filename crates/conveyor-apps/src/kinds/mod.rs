//! HTTP kinds: job kinds declared in `conveyor.toml` (`[[kinds]]` with a `url`) that Conveyor
//! runs by a signed `POST` to the application that owns them, with retries, rate limits, a
//! breaker, batches and the dashboard — for teams whose code serves HTTP and runs no worker.
//!
//! - A kind's jobs go to its own queue (`queue`, by default the kind's name, for jobs that name
//!   no queue but `default`), worked by a supervisor of its own (see [`supervisors`]) whose
//!   executors wait on the network, never on the executors of CPU-bound kinds. Within a
//!   process at most `concurrency` calls of a kind are in flight, whatever queue its jobs are on.
//! - Each call is signed per Standard Webhooks ([`crate::signing`]): `webhook-id` is the job id
//!   (the same on every attempt, so the receiver can deduplicate), with the kind's secrets —
//!   those in the configuration, or one kept in the store (owner `kind:<name>`) that the admin
//!   reveals and rotates.
//! - [`call`] maps the answer onto the job: see [`call::classify`].
//! - `listen = ["order.placed", …]` turns each such event into one job of the kind in the
//!   transaction that stores the event (a queued listener whose payload is the event's).

pub mod call;

use std::sync::Arc;
use std::time::Duration;

use conveyor_core::backend::{BackendError, QueueBackend, QueueBackendExt, RowExt};
use conveyor_core::breaker::BreakerConfig;
use conveyor_core::middleware::Middleware;
use conveyor_core::ratelimit::{RateLimit, RateLimiter};
use conveyor_core::worker::SupervisorConfig;
use conveyor_core::{KindOptions, Registry};
use serde::Serialize;

use crate::outbound;

/// Calls in flight per kind and process unless the kind says.
pub const DEFAULT_CONCURRENCY: usize = 64;
/// How long a call may take unless the kind says.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Consecutive failures (no success in between, within [`BREAKER_WINDOW`]) that open a kind's
/// breaker unless the kind says.
pub const DEFAULT_BREAKER_FAILURES: u32 = 5;
/// The window the breaker counts failures in.
pub const BREAKER_WINDOW: Duration = Duration::from_secs(10);

/// One `[[kinds]]` entry with a `url`.
#[derive(Clone, Debug)]
pub struct HttpKind {
    pub name: String,
    /// Set by the operator, so trusted (any address; no redirects followed).
    pub url: String,
    pub queue: String,
    pub timeout: Duration,
    /// Secrets from the configuration (`whsec_…`), current first; every one signs each call,
    /// so listing the new one before the old rotates without a gap. Empty: one kept in the
    /// store, revealed and rotated through the API.
    pub secrets: Vec<String>,
    /// Events each of which becomes one job of this kind.
    pub listen: Vec<String>,
    /// Calls in flight at once per process.
    pub concurrency: usize,
    pub rate_limit: Option<RateLimit>,
    /// Consecutive failures that open the breaker.
    pub breaker_failures: u32,
    /// How long the breaker stays open before a probe.
    pub breaker_open_for: Duration,
    /// Attempts of its jobs that do not set their own (default: the engine's).
    pub max_attempts: Option<u32>,
    /// At most `limit` calls with the same key (a payload path) at once, across workers.
    pub concurrency_key: Option<conveyor_core::flow::Rule>,
    /// The fairness key of its jobs: a payload path (see `conveyor_core::fair`).
    pub fairness_key: Option<String>,
}

impl HttpKind {
    /// A kind with the defaults: its own queue, [`DEFAULT_TIMEOUT`], [`DEFAULT_CONCURRENCY`].
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> HttpKind {
        let name = name.into();
        HttpKind {
            queue: name.clone(),
            name,
            url: url.into(),
            timeout: DEFAULT_TIMEOUT,
            secrets: Vec::new(),
            listen: Vec::new(),
            concurrency: DEFAULT_CONCURRENCY,
            rate_limit: None,
            breaker_failures: DEFAULT_BREAKER_FAILURES,
            breaker_open_for: Duration::from_secs(30),
            max_attempts: None,
            concurrency_key: None,
            fairness_key: None,
        }
    }

    /// The owner of its secrets in the store, and the name of its breaker and rate limiter.
    pub fn owner(&self) -> String {
        format!("kind:{}", self.name)
    }

    pub fn breaker_config(&self) -> BreakerConfig {
        BreakerConfig {
            // Every call in the window failed, and at least this many: consecutive failures
            // (successes are recorded when they follow a failure, see `call`).
            failure_rate: 1.0,
            min_calls: self.breaker_failures,
            window: BREAKER_WINDOW,
            open_for: self.breaker_open_for,
            probes: 1,
        }
    }

    /// Why this kind cannot be used, naming the field.
    pub fn validate(&self) -> Result<(), String> {
        let name_ok =
            !self.name.is_empty() && self.name.len() <= 200 && self.name.chars().all(|c| c.is_ascii_alphanumeric() || "._-:".contains(c));
        if !name_ok {
            return Err(format!("name: {:?} must be 1 to 200 letters, digits, '.', '_', '-' or ':'", self.name));
        }
        if ["conveyor.", "listener:", "orders.", "notify.", "sync."].iter().any(|p| self.name.starts_with(p)) {
            return Err(format!("name: {:?} is in a namespace of the built-in kinds", self.name));
        }
        outbound::check_operator_url(&self.url).map_err(|e| format!("url: {e}"))?;
        conveyor_core::job::validate_queue_name(&self.queue).map_err(|e| format!("queue: {e}"))?;
        if self.timeout.is_zero() || self.timeout > Duration::from_secs(3600) {
            return Err("timeout: must be more than 0 and at most an hour".into());
        }
        if !(1..=10_000).contains(&self.concurrency) {
            return Err("concurrency: must be a whole number from 1 to 10000".into());
        }
        if self.max_attempts.is_some_and(|n| !(1..=1000).contains(&n)) {
            return Err("max_attempts: must be a whole number from 1 to 1000".into());
        }
        if self.breaker_failures == 0 {
            return Err("breaker_failures: must be at least 1".into());
        }
        for (i, s) in self.secrets.iter().enumerate() {
            if !s.starts_with("whsec_") || crate::signing::key_of(s).is_none() {
                return Err(format!("secret[{i}]: expected whsec_ followed by base64 (generate one with `conveyor secret`)"));
            }
        }
        for (i, e) in self.listen.iter().enumerate() {
            if e.is_empty() || e.len() > 200 || e == "*" {
                return Err(format!("listen[{i}]: an event name of 1 to 200 characters"));
            }
        }
        Ok(())
    }
}

/// Checks every kind and that no two share a name or clash with a kind already registered.
pub fn validate(kinds: &[HttpKind], registry: &Registry) -> Result<(), String> {
    for (i, k) in kinds.iter().enumerate() {
        k.validate().map_err(|e| format!("kinds[{i}].{e}"))?;
        if kinds[..i].iter().any(|o| o.name == k.name) {
            return Err(format!("kinds[{i}].name: {:?} is declared twice", k.name));
        }
        if registry.contains(&k.name) {
            return Err(format!("kinds[{i}].name: {:?} is already a kind of this build", k.name));
        }
    }
    Ok(())
}

/// Registers each kind's handler (one HTTP client and connection pool for all of them), its
/// queue, its rate limit and its event routes.
pub fn register(registry: &mut Registry, backend: Arc<dyn QueueBackend>, kinds: &[HttpKind]) -> Result<(), String> {
    validate(kinds, registry)?;
    if kinds.is_empty() {
        return Ok(());
    }
    let longest = kinds.iter().map(|k| k.timeout).max().unwrap_or(DEFAULT_TIMEOUT);
    let settings = outbound::Settings { timeout: longest, connect_timeout: Duration::from_secs(5), body_limit: 64 * 1024 };
    let client = outbound::Client::new(outbound::Trust::Operator, outbound::Policy::default(), settings);
    for k in kinds {
        let runner = Arc::new(call::Runner::new(k.clone(), client.clone()));
        registry.register_raw(&k.name, move |payload, ctx| runner.clone().run(payload, ctx));
        registry.kind_options(
            &k.name,
            KindOptions {
                queue: Some(k.queue.clone()),
                max_attempts: k.max_attempts,
                timeout: None,
                concurrency: k.concurrency_key.clone(),
                fairness: k.fairness_key.clone(),
            },
        );
        if let Some(limit) = k.rate_limit {
            let limiter = RateLimiter::new(backend.clone(), k.owner(), limit);
            registry.middleware(&k.name, Middleware::rate_limit(limiter, |_| String::new()));
        }
        for event in &k.listen {
            registry.route_event(event, &k.name, &k.queue);
        }
    }
    Ok(())
}

/// Supervisors for the kinds' queues that no configured supervisor names: one per queue, its
/// executors the sum of its kinds' concurrency.
pub fn supervisors(kinds: &[HttpKind], configured: &[SupervisorConfig]) -> Vec<SupervisorConfig> {
    let mut out: Vec<SupervisorConfig> = Vec::new();
    for k in kinds {
        if configured.iter().any(|s| s.queues.contains(&k.queue)) {
            continue;
        }
        match out.iter_mut().find(|s| s.queues[0] == k.queue) {
            Some(s) => {
                s.concurrency += k.concurrency;
                s.prefetch = s.concurrency;
            }
            None => out.push(SupervisorConfig::new(format!("http:{}", k.queue), vec![k.queue.clone()], k.concurrency)),
        }
    }
    out
}

/// Gives each kind without configured secrets a secret in the store if it has none yet (at
/// start-up, before any call is signed).
pub async fn prepare(backend: &dyn QueueBackend, kinds: &[HttpKind]) -> Result<(), BackendError> {
    for k in kinds.iter().filter(|k| k.secrets.is_empty()) {
        let owner = k.owner();
        backend
            .transact(move |tx| {
                let had = tx.query("SELECT count(*) FROM notify_secrets WHERE owner = $1", &[owner.as_str().into()])?;
                if had.first().map_or(0, |r| r.int(0)) == 0 {
                    crate::signing::create_in(tx, &owner)?;
                }
                Ok(())
            })
            .await?;
    }
    Ok(())
}

/// What `GET /api/kinds` shows of an HTTP kind (no secret; the URL without credentials).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct KindInfo {
    pub name: String,
    pub url: String,
    pub queue: String,
    pub timeout_s: f64,
    pub concurrency: usize,
    /// `LIMIT/SECONDS`, as configured (`100/1`: a hundred a second).
    pub rate_limit: Option<String>,
    pub listen: Vec<String>,
    /// `configuration` or `store` (revealed and rotated through the API).
    pub secret_source: &'static str,
    pub breaker: String,
}

impl From<&HttpKind> for KindInfo {
    fn from(k: &HttpKind) -> KindInfo {
        KindInfo {
            name: k.name.clone(),
            url: conveyor_core::redact::url(&k.url),
            queue: k.queue.clone(),
            timeout_s: k.timeout.as_secs_f64(),
            concurrency: k.concurrency,
            rate_limit: k.rate_limit.map(|r| format!("{}/{}", r.limit, r.period.as_secs_f64())),
            listen: k.listen.clone(),
            secret_source: if k.secrets.is_empty() { "store" } else { "configuration" },
            breaker: k.owner(),
        }
    }
}
