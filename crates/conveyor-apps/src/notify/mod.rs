//! Notifications: event sources, rules, templates, channels, preferences, rate limits,
//! idempotency and delivery logs.
//!
//! The flow:
//! 1. [`ingest`] stores an event (the engine's event log) and, in the same transaction, claims
//!    its idempotency key; the engine enqueues its queued listeners in that transaction too.
//! 2. The notifications listener (a queued listener of every event) matches the active rules
//!    of the event's name and their conditions, resolves recipients, applies preferences and
//!    the per-user rate limit, renders the templates, writes one log row per notification and
//!    enqueues **one delivery job per channel** — all in the transaction that acknowledges it,
//!    so a retried listener never notifies twice. It knows nothing channel-specific.
//! 3. A delivery job (`notify.<channel>`, on queue `notify.<channel>`) sends through the
//!    channel with the log id as idempotency key, and marks the log `sent` in the transaction
//!    that acknowledges it (a log already `sent` is never sent again). Failures keep the
//!    provider's error; 4xx that can never succeed fail at once.

pub mod channels;
mod deliver;
mod fanout;
mod ingest;
pub mod model;
pub mod render;
mod rows;
mod schema;
pub mod secrets;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use conveyor_core::backend::{BackendError, Cause, QueueBackend, QueueBackendExt, RowExt, Tx};
use conveyor_core::breaker::{Breaker, BreakerConfig, ClosedCache, Permit};
use conveyor_core::clock::now_ms;
use conveyor_core::event::{Event, EventEnvelope};
use conveyor_core::job::Backoff;
use conveyor_core::ratelimit::{RateLimit, RateLimiter};
use conveyor_core::{Conveyor, JobContext, JobError, JobResult, NewJob, Registry};

use channels::{Channel, Dispatcher, Mailer, Message, SendError};
use render::Prerendered;
use rows::*;

pub use ingest::{ingest, IngestError, Ingested};
pub use rows::quiet_until;

use deliver::Delivery;

/// The listener's queue.
pub const QUEUE: &str = "notify";

/// The listener's queue, then every built-in channel's delivery queue (`notify.<channel>`).
pub fn queues() -> Vec<String> {
    std::iter::once(QUEUE.to_string()).chain(model::CHANNELS.iter().map(|c| Dispatcher::kind(c))).collect()
}

/// Settings (SPEC: `CONVEYOR_MAILER`, `CONVEYOR_SMTP_URL`, `CONVEYOR_NOTIFY_*`, …). Its
/// `Debug` hides the secrets.
#[derive(Clone)]
pub struct NotifyConfig {
    pub mailer: Mailer,
    pub mail_from: String,
    /// Gateways in failover order.
    pub sms_urls: Vec<String>,
    pub sms_token: Option<String>,
    pub sms_from: String,
    pub slack_webhook: Option<String>,
    /// `None`: generated on first use and kept in the store.
    pub webhook_secret: Option<String>,
    /// Delivery tries in all.
    pub max_attempts: u32,
    /// Waits after failed try 1, 2, …
    pub backoff: Vec<Duration>,
    /// Notifications per user.
    pub rate_limit: RateLimit,
    /// The breaker each email and SMS provider has.
    pub breaker: BreakerConfig,
    /// Where callers' webhook and Slack URLs may lead although private
    /// (`CONVEYOR_OUTBOUND_ALLOW`).
    pub outbound: crate::outbound::Policy,
}

impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |o: &Option<String>| o.as_ref().map(|_| "***");
        f.debug_struct("NotifyConfig")
            .field("mailer", &matches!(self.mailer, Mailer::Smtp(_)).then_some("smtp (***)").unwrap_or("log"))
            .field("mail_from", &self.mail_from)
            .field("sms_urls", &self.sms_urls)
            .field("sms_token", &hidden(&self.sms_token))
            .field("slack_webhook", &hidden(&self.slack_webhook))
            .field("webhook_secret", &hidden(&self.webhook_secret))
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("rate_limit", &self.rate_limit)
            .field("breaker", &self.breaker)
            .field("outbound", &self.outbound.to_string())
            .finish()
    }
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            mailer: Mailer::Log,
            mail_from: "Conveyor <notifications@localhost>".into(),
            sms_urls: Vec::new(),
            sms_token: None,
            sms_from: "Conveyor".into(),
            slack_webhook: None,
            webhook_secret: None,
            max_attempts: 3,
            backoff: vec![Duration::from_secs(60), Duration::from_secs(300), Duration::from_secs(900)],
            rate_limit: RateLimit::per(5, Duration::from_secs(60)),
            breaker: BreakerConfig {
                failure_rate: 0.5,
                min_calls: 5,
                window: Duration::from_secs(60),
                open_for: Duration::from_secs(30),
                probes: 1,
            },
            outbound: crate::outbound::Policy::default(),
        }
    }
}

pub async fn migrate(backend: &dyn QueueBackend) -> conveyor_core::backend::Result<Vec<u32>> {
    conveyor_core::migrate::apply(backend, "notify", schema::MIGRATIONS).await
}

/// The shared state of the listener and the delivery jobs.
struct Notifier {
    config: NotifyConfig,
    dispatcher: Dispatcher,
    limiter: RateLimiter,
    /// Breakers seen closed lately: most deliveries skip the breaker's store.
    breakers: ClosedCache,
}

/// Registers the listener and one delivery job kind per channel, with the built-in channels.
pub fn register(registry: &mut Registry, backend: Arc<dyn QueueBackend>, config: NotifyConfig) -> Result<(), String> {
    let clients = channels::Clients::new(config.outbound.clone());
    let legacy = webhook_secret(backend.clone(), config.webhook_secret.clone());
    let emails: Vec<Arc<dyn Channel>> =
        channels::Email::providers(&config.mailer, &config.mail_from)?.into_iter().map(|e| Arc::new(e) as Arc<dyn Channel>).collect();
    let sms_urls: Vec<Option<String>> =
        if config.sms_urls.is_empty() { vec![None] } else { config.sms_urls.iter().cloned().map(Some).collect() };
    let sms: Vec<Arc<dyn Channel>> = sms_urls
        .into_iter()
        .map(|base_url| {
            Arc::new(channels::Sms {
                client: clients.operator.clone(),
                base_url,
                token: config.sms_token.clone(),
                from: config.sms_from.clone(),
            }) as Arc<dyn Channel>
        })
        .collect();
    let mail_dispatch = if matches!(config.mailer, Mailer::Log) {
        Dispatcher::default().with(emails[0].clone())
    } else {
        Dispatcher::default().with_providers(emails)
    };
    let dispatcher = mail_dispatch
        .with(Arc::new(channels::Database))
        .with_providers(sms)
        .with(Arc::new(channels::Slack { clients: clients.clone(), default_url: config.slack_webhook.clone() }))
        .with(Arc::new(channels::Webhook::new(clients.caller, backend.clone(), legacy)));
    register_with(registry, backend, config, dispatcher);
    Ok(())
}

/// The same with any set of channels.
pub fn register_with(registry: &mut Registry, backend: Arc<dyn QueueBackend>, config: NotifyConfig, dispatcher: Dispatcher) {
    let limiter = RateLimiter::new(backend, "notify:user", config.rate_limit);
    let n = Arc::new(Notifier { config, dispatcher, limiter, breakers: ClosedCache::default() });
    let listener = n.clone();
    // Only events some active rule names cost a fan-out job (a sync run emits one event per
    // changed product; without rules for it, those stay in the event log only).
    let wanted = |tx: &mut dyn Tx, event: &str| -> Result<bool, BackendError> {
        Ok(!tx.query("SELECT 1 FROM notify_rules WHERE event = $1 AND active = 1 LIMIT 1", &[event.into()])?.is_empty())
    };
    registry.listen_queued_when("*", "notifications", QUEUE, wanted, move |env: EventEnvelope<Value>, ctx: JobContext| {
        let n = listener.clone();
        async move {
            // Rendering happens here, not in the acknowledgement: a template's work must not
            // hold the store's writer (on SQLite, one thread for every job's acknowledgement).
            let renders = n.prerender(ctx.backend().as_ref(), &env).await.map_err(JobError::retry)?;
            match ctx.complete_with(move |tx| n.fan_out(tx, &env, &renders)).await {
                Ok(()) | Err(BackendError::LeaseLost(_)) => Ok(()),
                Err(e) => Err(JobError::retry(e)),
            }
        }
    });
    let digests = n.clone();
    registry.register(DIGEST_KIND, move |d: DigestRef, ctx: JobContext| {
        let n = digests.clone();
        async move {
            // Rendered before the acknowledgement, as the fan-out's.
            let renders = n.prerender_digest(ctx.backend().as_ref(), &d.digest_id).await.map_err(JobError::retry)?;
            match ctx.complete_with(move |tx| n.close_digest(tx, &d.digest_id, &renders)).await {
                Ok(()) | Err(BackendError::LeaseLost(_)) => Ok(()),
                Err(e) => Err(JobError::retry(e)),
            }
        }
    });
    for name in n.dispatcher.names() {
        let n = n.clone();
        registry.register(&Dispatcher::kind(name), move |d: Delivery, ctx: JobContext| {
            let n = n.clone();
            async move { n.deliver(d, ctx).await }
        });
    }
}

/// The legacy secret (destinations created before per-destination secrets, and the old
/// `X-Conveyor-Signature` header): the configured one, else one generated once and kept
/// in the store (read on first use; every process then signs with the same key).
fn webhook_secret(backend: Arc<dyn QueueBackend>, configured: Option<String>) -> Arc<dyn Fn() -> String + Send + Sync> {
    let cell: Arc<std::sync::OnceLock<String>> = Arc::default();
    if let Some(s) = configured {
        let _ = cell.set(s);
    }
    Arc::new(move || {
        cell.get_or_init(|| {
            let backend = backend.clone();
            // Called from a delivery job (async context): the store is asked on a thread of its own.
            std::thread::scope(|s| {
                s.spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
                    rt.block_on(stored_secret(backend.as_ref()))
                })
                .join()
                .unwrap_or_else(|_| Err(BackendError::Other("secret thread panicked".into())))
            })
            .unwrap_or_else(|e| {
                tracing::error!(error = %e, "cannot read the webhook secret; signing with a random one");
                hex::encode(rand::random::<[u8; 32]>())
            })
        })
        .clone()
    })
}

/// Reads the stored webhook secret, creating it first if there is none.
pub async fn stored_secret(backend: &dyn QueueBackend) -> Result<String, BackendError> {
    let fresh = hex::encode(rand::random::<[u8; 32]>());
    backend
        .transact(move |tx| {
            tx.execute(
                "INSERT INTO notify_settings (key, value) VALUES ('webhook_secret', $1) ON CONFLICT (key) DO NOTHING",
                &[fresh.into()],
            )?;
            let rows = tx.query("SELECT value FROM notify_settings WHERE key = 'webhook_secret'", &[])?;
            rows.first().and_then(|r| r.text(0)).map(str::to_string).ok_or_else(|| BackendError::Other("no webhook secret".into()))
        })
        .await
}

impl Notifier {}

/// Registers a user and emits `user_registered` in the same transaction; their URLs are
/// checked against `policy`.
pub async fn register_user(
    conveyor: &Conveyor,
    body: &Value,
    policy: &crate::outbound::Policy,
) -> Result<model::Registered, model::ModelError> {
    model::register_user(conveyor, body, policy).await
}

#[cfg(test)]
mod tests;
