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

pub use rows::quiet_until;

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

/// A delivery job's payload: the rendered message, so a first attempt reads nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Delivery {
    log_id: String,
    event: String,
    event_id: String,
    user_id: Option<i64>,
    recipient: String,
    subject: Option<String>,
    body: String,
    /// The email's HTML part (the body rendered with escaping); email only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    html: Option<String>,
    payload: Value,
    /// Whose secrets sign a webhook (`rule:<id>`, `user:<id>`); absent in deliveries enqueued
    /// before per-destination secrets, which are signed with the legacy secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    signer: Option<String>,
}

/// What `POST /api/events` answers.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Ingested {
    pub event_id: String,
    pub duplicate: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error(transparent)]
    Store(#[from] BackendError),
}

fn invalid(field: &str, reason: impl Into<String>) -> IngestError {
    IngestError::Invalid { field: field.into(), reason: reason.into() }
}

/// Validates and stores an event; its processing is enqueued in the same transaction. A known
/// idempotency key answers with the first event (`duplicate: true`). Without a key, events are
/// not deduplicated, except `user_registered`, keyed `user_registered:{user_id}`.
pub async fn ingest(conveyor: &Conveyor, name: &str, payload: Value, key: Option<String>) -> Result<Ingested, IngestError> {
    if name.is_empty() || name.len() > 200 || !name.chars().all(|c| c.is_ascii_alphanumeric() || "_.-:".contains(c)) {
        return Err(invalid("event", "must be 1 to 200 letters, digits or _.-:"));
    }
    if !payload.is_object() {
        return Err(invalid("payload", "must be a JSON object"));
    }
    if let Some(k) = &key {
        if k.is_empty() || k.len() > 255 {
            return Err(invalid("idempotency_key", "must be 1 to 255 characters"));
        }
    }
    let backend = conveyor.backend();
    let schema = backend.query("SELECT schema FROM notify_sources WHERE name = $1", vec![name.into()]).await?;
    if let Some(schema) = schema.first().and_then(|r| r.text(0)).and_then(|s| serde_json::from_str::<Value>(s).ok()) {
        if let Err((path, reason)) = model::validate(&schema, &payload, "payload") {
            return Err(IngestError::Invalid { field: path, reason });
        }
    }
    let key = key.or_else(|| {
        (name == "user_registered")
            .then(|| payload.get("user_id").map(|u| format!("user_registered:{}", u.as_str().map_or(u.to_string(), str::to_string))))?
    });
    // Two requests with one key race at most once: the loser's insert fails on the key, and its
    // second try finds the winner's event.
    for attempt in 0..2 {
        let (cv, name, payload, key) = (conveyor.clone(), name.to_string(), payload.clone(), key.clone());
        let r = backend
            .transact(move |tx| {
                if let Some(k) = &key {
                    let first = tx.query("SELECT event_id FROM notify_event_keys WHERE key = $1", &[k.as_str().into()])?;
                    if let Some(id) = first.first().and_then(|r| r.text(0)) {
                        return Ok(Ingested { event_id: id.to_string(), duplicate: true });
                    }
                }
                let id = cv.emit_in(tx, Event { name, payload })?;
                if let Some(k) = key {
                    tx.execute(
                        "INSERT INTO notify_event_keys (key, event_id, created_at) VALUES ($1, $2, $3)",
                        &[k.into(), id.clone().into(), now_ms().into()],
                    )?;
                }
                Ok(Ingested { event_id: id, duplicate: false })
            })
            .await;
        match r {
            Err(e) if attempt == 0 && e.is_unique() => continue,
            other => return Ok(other?),
        }
    }
    unreachable!("the loop returns on its second pass")
}

impl Notifier {
    /// Matches the event's rules and writes a log row (and, for each that is to be sent, a
    /// delivery job) per notification. Runs in the listener's acknowledgement transaction.
    fn fan_out(&self, tx: &mut dyn Tx, env: &EventEnvelope<Value>, renders: &Prerendered) -> Result<(), BackendError> {
        let rules = tx.query(RULES_SQL, &[env.event.as_str().into()])?;
        let now = now_ms();
        let mut jobs = Vec::new();
        for rule in rules.iter().filter_map(|r| RuleRow::matching(r, &env.payload)) {
            let mut context = event_context(env);
            let mut log = LogRow::new(&env.event, &env.event_id, rule.id, &rule.channel, now);
            let user = self.resolve(tx, &rule, &env.event, &env.payload, &mut context, &mut log, renders)?;
            if log.status == "pending" {
                if let Some(window) = rule.digest_window_ms {
                    // Collected: one message per (rule, recipient, key) when the window closes.
                    match renders.render(rule.digest_key.as_deref().unwrap_or(""), &context, false) {
                        Ok(key) => {
                            self.collect(tx, &rule, &log, key.trim(), window, env, now, &mut jobs)?;
                            continue;
                        }
                        Err(e) => log.fail(format!("digest key: {e}")),
                    }
                }
            }
            self.finish(tx, &rule, user.as_ref(), &context, &env.payload, log, now, &mut jobs, renders)?;
        }
        if !jobs.is_empty() {
            tx.enqueue(jobs)?;
        }
        Ok(())
    }

    /// Everything `fan_out` will render for this event, rendered now on a blocking thread: the
    /// same rules and contexts, read before the transaction (`fan_out` renders anything that
    /// changed in between itself).
    async fn prerender(&self, backend: &dyn QueueBackend, env: &EventEnvelope<Value>) -> Result<Prerendered, BackendError> {
        let rules = backend.query(RULES_SQL, vec![env.event.as_str().into()]).await?;
        let mut work = Vec::new();
        for rule in rules.iter().filter_map(|r| RuleRow::matching(r, &env.payload)) {
            let mut context = event_context(env);
            if rule.recipient.is_none() {
                if let Some(id) = user_id_of(&env.payload) {
                    if let Some(user) = backend.query(USER_SQL, vec![id.into()]).await?.first().map(user_row) {
                        add_user(&mut context, &user);
                    }
                }
            }
            work.push((rule, context));
        }
        render_all(work).await
    }

    /// What `close_digest` will render, rendered now (as `prerender` does for `fan_out`): the
    /// digest as it stands, which is what it closes with unless an event joins it meanwhile.
    async fn prerender_digest(&self, backend: &dyn QueueBackend, digest_id: &str) -> Result<Prerendered, BackendError> {
        let rows = backend
            .query(
                "SELECT rule_id, user_id, digest_key, events, count, first_event FROM notify_digests WHERE id = $1 AND status = 'open'",
                vec![digest_id.into()],
            )
            .await?;
        let Some(d) = rows.first() else { return Ok(Prerendered::default()) };
        let r = backend.query(DIGEST_RULE_SQL, vec![d.int(0).into()]).await?;
        let Some(r) = r.first() else { return Ok(Prerendered::default()) };
        let DigestParts { rule, last, mut context, .. } = DigestParts::of(d, r);
        if rule.recipient.is_none() {
            if let Some(id) = user_id_of(&last) {
                if let Some(user) = backend.query(USER_SQL, vec![id.into()]).await?.first().map(user_row) {
                    add_user(&mut context, &user);
                }
            }
        }
        render_all(vec![(rule, context)]).await
    }

    /// Who a rule's notification goes to: an expression or URL, or the payload's user (then
    /// their address and preferences apply). Sets the log's recipient or why it is held back.
    #[allow(clippy::too_many_arguments)]
    fn resolve(
        &self,
        tx: &mut dyn Tx,
        rule: &RuleRow,
        event: &str,
        payload: &Value,
        context: &mut Value,
        log: &mut LogRow,
        renders: &Prerendered,
    ) -> Result<Option<UserRow>, BackendError> {
        if let Some(expr) = &rule.recipient {
            match renders.render(expr, context, false) {
                Ok(to) => log.recipient = to.trim().to_string(),
                Err(e) => log.fail(format!("recipient: {e}")),
            }
            return Ok(None);
        }
        let Some(user) = user_of(tx, payload)? else {
            // A team alert: Slack without a recipient goes to the configured default webhook
            // (SPEC: `CONVEYOR_SLACK_WEBHOOK` needs no user).
            match (rule.channel.as_str(), self.config.slack_webhook.as_deref()) {
                ("slack", Some(default)) => log.recipient = default.to_string(),
                _ => log.skip("the payload names no known user (user_id)"),
            }
            return Ok(None);
        };
        log.user_id = Some(user.id);
        add_user(context, &user);
        match user.address(&rule.channel, self.config.slack_webhook.as_deref()) {
            None => log.skip(format!("the user has no {} address", rule.channel)),
            Some(a) => log.recipient = a,
        }
        if log.status == "pending" && !allowed(tx, user.id, event, &rule.channel)? {
            log.skip(format!("the user turned {} off for {event}", rule.channel));
        }
        Ok(Some(user))
    }

    /// Adds the event to the open digest of its (rule, recipient, key), or opens one whose
    /// message is sent when its window closes.
    #[allow(clippy::too_many_arguments)]
    fn collect(
        &self,
        tx: &mut dyn Tx,
        rule: &RuleRow,
        log: &LogRow,
        key: &str,
        window: i64,
        env: &EventEnvelope<Value>,
        now: i64,
        jobs: &mut Vec<NewJob>,
    ) -> Result<(), BackendError> {
        let line = format!("{}\n", json!({ "event_id": env.event_id, "payload": env.payload }));
        // Open a digest, or (when one is open: the unique index says so, and concurrent openers
        // wait for each other) add to it.
        let id = uuid::Uuid::now_v7().to_string();
        let opened = tx.query(
            "INSERT INTO notify_digests (id, rule_id, recipient, user_id, digest_key, status, events, count, first_event, opened_at, closes_at)
             VALUES ($1, $2, $3, $4, $5, 'open', $6, 1, $7, $8, $9)
             ON CONFLICT (rule_id, recipient, digest_key) WHERE status = 'open' DO NOTHING
             RETURNING id",
            &[
                id.clone().into(),
                rule.id.into(),
                log.recipient.clone().into(),
                log.user_id.into(),
                key.into(),
                line.clone().into(),
                env.event_id.clone().into(),
                now.into(),
                (now + window).into(),
            ],
        )?;
        if opened.is_empty() {
            tx.execute(
                "UPDATE notify_digests SET events = events || $4, count = count + 1
                 WHERE rule_id = $1 AND recipient = $2 AND digest_key = $3 AND status = 'open'",
                &[rule.id.into(), log.recipient.clone().into(), key.into(), line.into()],
            )?;
            return Ok(());
        }
        jobs.push(NewJob::new(DIGEST_KIND, &DigestRef { digest_id: id }).queue(QUEUE).run_at(now + window).max_attempts(10));
        Ok(())
    }

    /// Sends a closed digest: one message over its events (`events`, `count`, `digest_key` in
    /// the template), through the same path as any notification.
    fn close_digest(&self, tx: &mut dyn Tx, digest_id: &str, renders: &Prerendered) -> Result<(), BackendError> {
        let rows = tx.query(
            "UPDATE notify_digests SET status = 'sent' WHERE id = $1 AND status = 'open'
             RETURNING rule_id, user_id, digest_key, events, count, first_event",
            &[digest_id.into()],
        )?;
        let Some(d) = rows.first() else { return Ok(()) };
        let r = tx.query(DIGEST_RULE_SQL, &[d.int(0).into()])?;
        let Some(r) = r.first() else { return Ok(()) };
        let DigestParts { rule, event, first_event, last, mut context } = DigestParts::of(d, r);
        let rule_id = rule.id;
        let now = now_ms();
        let mut log = LogRow::new(&event, &first_event, rule_id, &rule.channel, now);
        let user = self.resolve(tx, &rule, &event, &last, &mut context, &mut log, renders)?;
        let mut jobs = Vec::new();
        let payload = json!({ "events": context["events"].clone() });
        self.finish(tx, &rule, user.as_ref(), &context, &payload, log, now, &mut jobs, renders)?;
        if !jobs.is_empty() {
            tx.enqueue(jobs)?;
        }
        Ok(())
    }

    /// Applies the rate limit, renders, writes the log row and (when it is to be sent) its
    /// delivery job — deferred by the rule's delay and the user's quiet hours.
    #[allow(clippy::too_many_arguments)]
    fn finish(
        &self,
        tx: &mut dyn Tx,
        rule: &RuleRow,
        user: Option<&UserRow>,
        context: &Value,
        payload: &Value,
        mut log: LogRow,
        now: i64,
        jobs: &mut Vec<NewJob>,
        renders: &Prerendered,
    ) -> Result<(), BackendError> {
        if log.status == "pending" {
            if let Some(u) = user {
                if !self.limiter.check_in(tx, &u.id.to_string())?.is_allowed() {
                    log.status = "rate_limited";
                    log.error =
                        Some(format!("over {} notifications per {:?}", self.config.rate_limit.limit, self.config.rate_limit.period));
                }
            }
        }
        if log.status == "pending" {
            let rendered = rule
                .subject
                .as_deref()
                .map(|s| renders.render(s, context, false))
                .transpose()
                .and_then(|s| Ok((s, renders.render(&rule.body, context, false)?)));
            match rendered {
                Ok((s, b)) => {
                    log.subject = s;
                    log.body = Some(b);
                }
                Err(e) => log.fail(format!("template: {e}")),
            }
        }
        if log.status == "pending" && self.dispatcher.providers(&rule.channel).is_empty() {
            log.fail(format!("no channel {:?} is configured", rule.channel));
        }
        if log.status == "pending" {
            let html = (rule.channel == "email").then(|| renders.render(&rule.body, context, true).unwrap_or_default());
            let d = Delivery {
                log_id: log.id.clone(),
                event: log.event.clone(),
                event_id: log.event_id.clone(),
                user_id: log.user_id,
                recipient: log.recipient.clone(),
                subject: log.subject.clone(),
                body: log.body.clone().unwrap_or_default(),
                html,
                payload: payload.clone(),
                signer: (rule.channel == "webhook").then(|| {
                    let owner = match (&rule.recipient, log.user_id) {
                        (None, Some(user)) => secrets::Owner::User(user),
                        _ => secrets::Owner::Rule(rule.id),
                    };
                    owner.key()
                }),
            };
            // Deferred, never dropped: after the rule's delay, and out of the user's quiet hours.
            let mut at = now + rule.delay_ms;
            if let Some(quiet_end) = user.and_then(|u| u.quiet_until(at)) {
                at = quiet_end;
            }
            let kind = Dispatcher::kind(&rule.channel);
            let mut job = NewJob::new(&kind, &d)
                .queue(&kind)
                .max_attempts(self.config.max_attempts)
                .backoff(Backoff::list(&self.config.backoff))
                .tag(format!("event:{}", log.event_id));
            if at > now {
                job = job.run_at(at);
            }
            jobs.push(job);
        }
        log.insert(tx)
    }

    async fn deliver(&self, d: Delivery, ctx: JobContext) -> JobResult {
        let backend = ctx.backend().clone();
        if ctx.attempt > 1 {
            // A retry: the last attempt may have sent and lost its acknowledgement. A log
            // already `sent` is never sent again (and providers get the log id as idempotency
            // key, for the case where the send happened but was not recorded).
            let rows = backend.query("SELECT status FROM notify_logs WHERE id = $1", vec![d.log_id.clone().into()]).await?;
            match rows.first() {
                None => return Err(JobError::abort(format!("no notification {}", d.log_id))),
                Some(r) if r.text(0) == Some("sent") => return Ok(()),
                Some(_) => {}
            }
        }
        let channel_name = ctx.kind.strip_prefix("notify.").unwrap_or_default().to_string();
        let providers = self.dispatcher.providers(&channel_name).to_vec();
        if providers.is_empty() {
            return Err(JobError::abort(format!("no channel {channel_name:?}")));
        }
        let msg = Message {
            id: d.log_id.clone(),
            event: d.event,
            event_id: d.event_id,
            user_id: d.user_id,
            recipient: d.recipient,
            subject: d.subject,
            body: d.body,
            html: d.html,
            payload: d.payload,
            signer: d.signer,
        };
        // Providers in order; one whose breaker is open is skipped, one that fails is recorded
        // against its breaker and the next is tried.
        let (mut last_error, mut wait): (Option<SendError>, Option<Duration>) = (None, None);
        for p in providers {
            let breaker = Breaker::new(ctx.conveyor.clone(), format!("notify:{}", p.name), self.config.breaker.clone());
            if p.guarded {
                match self.breakers.allow(&breaker).await? {
                    Permit::Allowed => {}
                    Permit::Rejected { retry_after } => {
                        wait = Some(wait.map_or(retry_after, |w| w.min(retry_after)));
                        continue;
                    }
                }
            }
            match p.channel.send(&msg).await {
                Ok(provider_id) => {
                    let (channel, msg, guarded) = (p.channel.clone(), msg.clone(), p.guarded);
                    let result = ctx
                        .complete_with(move |tx| {
                            let n = tx.execute(
                                "UPDATE notify_logs SET status = 'sent', attempts = attempts + 1, provider_id = $2, sent_at = $3, error = NULL
                                 WHERE id = $1 AND status <> 'sent'",
                                &[msg.id.clone().into(), provider_id.into(), now_ms().into()],
                            )?;
                            if n == 1 {
                                channel.record(tx, &msg)?;
                            }
                            if guarded {
                                breaker.record_in(tx, true, now_ms())?;
                            }
                            Ok(())
                        })
                        .await;
                    if p.guarded {
                        self.breakers.succeeded(&format!("notify:{}", p.name));
                    }
                    return match result {
                        Ok(()) | Err(BackendError::LeaseLost(_)) => Ok(()),
                        Err(e) => Err(JobError::retry(e)),
                    };
                }
                Err(e @ SendError::Permanent(_)) => {
                    // The message's fault (a bad address), not the provider's: no failover.
                    last_error = Some(e);
                    break;
                }
                Err(e) => {
                    if p.guarded {
                        breaker.record(false).await?;
                        self.breakers.failed(breaker.name());
                    }
                    tracing::warn!(provider = %p.name, error = %e, "provider failed; trying the next");
                    last_error = Some(e);
                }
            }
        }
        let Some(e) = last_error else {
            // Every provider's breaker is open: wait for one without spending an attempt.
            let wait = wait.unwrap_or(Duration::from_secs(1));
            let id = d.log_id.clone();
            backend
                .transact(move |tx| {
                    tx.execute(
                        "UPDATE notify_logs SET error = $2 WHERE id = $1 AND status = 'pending'",
                        &[id.into(), "every provider's circuit breaker is open; waiting".into()],
                    )
                })
                .await?;
            return Err(JobError::release(wait));
        };
        let last = matches!(e, SendError::Permanent(_)) || ctx.attempt >= ctx.max_attempts;
        // Stored and shown by the API: a provider's error may quote our credentials.
        let (id, error) = (d.log_id.clone(), conveyor_core::redact::scrub(&e.to_string()));
        backend
            .transact(move |tx| {
                tx.execute(
                    "UPDATE notify_logs SET attempts = attempts + 1, error = $2,
                            status = CASE WHEN $3 = 1 THEN 'failed' ELSE status END
                     WHERE id = $1 AND status <> 'sent'",
                    &[id.into(), error.into(), (last as i64).into()],
                )
            })
            .await?;
        Err(match e {
            SendError::Permanent(m) => JobError::abort(m),
            SendError::Retry { error, retry_after: Some(after) } => JobError::retry_after(error, after),
            SendError::Retry { error, retry_after: None } => JobError::retry(error),
        })
    }
}

/// Renders every template text of these rules over their contexts, on a blocking thread.
async fn render_all(work: Vec<(RuleRow, Value)>) -> Result<Prerendered, BackendError> {
    if work.is_empty() {
        return Ok(Prerendered::default());
    }
    let renders = tokio::task::spawn_blocking(move || {
        let mut renders = Prerendered::default();
        for (rule, context) in &work {
            let texts = [rule.recipient.as_deref(), rule.digest_key.as_deref(), rule.subject.as_deref(), Some(rule.body.as_str())];
            for text in texts.into_iter().flatten() {
                renders.add(text, context, false);
            }
            if rule.channel == "email" {
                renders.add(&rule.body, context, true);
            }
        }
        renders
    })
    .await
    .map_err(|e| BackendError::Storage(Cause::new(format!("rendering stopped: {e}")).with_source(e)))?;
    Ok(renders)
}

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
mod tests {
    use super::quiet_until;

    fn ms(s: &str) -> i64 {
        s.parse::<jiff::Timestamp>().unwrap().as_millisecond()
    }

    #[test]
    fn quiet_hours_defer_to_their_end_in_the_users_time_zone() {
        // 23:30 in Paris (UTC+1 in November) is inside 22:00–07:00: deferred to 07:00 next day.
        assert_eq!(quiet_until(ms("2026-11-23T22:30:00Z"), "Europe/Paris", "22:00", "07:00"), Some(ms("2026-11-24T06:00:00Z")));
        // 06:59 Paris: still quiet, ends the same morning.
        assert_eq!(quiet_until(ms("2026-11-24T05:59:00Z"), "Europe/Paris", "22:00", "07:00"), Some(ms("2026-11-24T06:00:00Z")));
        assert_eq!(quiet_until(ms("2026-11-24T11:00:00Z"), "Europe/Paris", "22:00", "07:00"), None, "noon is not quiet");
        // A daytime window.
        assert_eq!(quiet_until(ms("2026-11-24T10:00:00Z"), "UTC", "09:00", "17:00"), Some(ms("2026-11-24T17:00:00Z")));
        assert_eq!(quiet_until(ms("2026-11-24T17:00:00Z"), "UTC", "09:00", "17:00"), None, "the end is not quiet");
        assert_eq!(quiet_until(ms("2026-11-24T10:00:00Z"), "Not/AZone", "09:00", "17:00"), None);
        assert_eq!(quiet_until(ms("2026-11-24T10:00:00Z"), "UTC", "25:00", "17:00"), None);
    }
}
