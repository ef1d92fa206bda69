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
mod schema;

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use conveyor_core::backend::{BackendError, QueueBackend, QueueBackendExt, RowExt, Tx};
use conveyor_core::clock::now_ms;
use conveyor_core::event::{Event, EventEnvelope};
use conveyor_core::job::Backoff;
use conveyor_core::ratelimit::{RateLimit, RateLimiter};
use conveyor_core::{Conveyor, JobContext, JobError, JobResult, NewJob, Registry};

use channels::{Channel, Dispatcher, Mailer, Message, SendError};
use render::Condition;

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
    pub sms_url: Option<String>,
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
}

impl std::fmt::Debug for NotifyConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let hidden = |o: &Option<String>| o.as_ref().map(|_| "***");
        f.debug_struct("NotifyConfig")
            .field("mailer", &matches!(self.mailer, Mailer::Smtp(_)).then_some("smtp (***)").unwrap_or("log"))
            .field("mail_from", &self.mail_from)
            .field("sms_url", &self.sms_url)
            .field("sms_token", &hidden(&self.sms_token))
            .field("slack_webhook", &hidden(&self.slack_webhook))
            .field("webhook_secret", &hidden(&self.webhook_secret))
            .field("max_attempts", &self.max_attempts)
            .field("backoff", &self.backoff)
            .field("rate_limit", &self.rate_limit)
            .finish()
    }
}

impl Default for NotifyConfig {
    fn default() -> Self {
        NotifyConfig {
            mailer: Mailer::Log,
            mail_from: "Conveyor <notifications@localhost>".into(),
            sms_url: None,
            sms_token: None,
            sms_from: "Conveyor".into(),
            slack_webhook: None,
            webhook_secret: None,
            max_attempts: 3,
            backoff: vec![Duration::from_secs(60), Duration::from_secs(300), Duration::from_secs(900)],
            rate_limit: RateLimit::per(5, Duration::from_secs(60)),
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
}

/// Registers the listener and one delivery job kind per channel, with the built-in channels.
pub fn register(registry: &mut Registry, backend: Arc<dyn QueueBackend>, config: NotifyConfig) -> Result<(), String> {
    let client = channels::http_client();
    let secret = webhook_secret(backend.clone(), config.webhook_secret.clone());
    let dispatcher = Dispatcher::default()
        .with(Arc::new(channels::Email::new(&config.mailer, &config.mail_from)?))
        .with(Arc::new(channels::Database))
        .with(Arc::new(channels::Sms {
            client: client.clone(),
            base_url: config.sms_url.clone(),
            token: config.sms_token.clone(),
            from: config.sms_from.clone(),
        }))
        .with(Arc::new(channels::Slack { client: client.clone() }))
        .with(Arc::new(channels::Webhook { client, secret }));
    register_with(registry, backend, config, dispatcher);
    Ok(())
}

/// The same with any set of channels.
pub fn register_with(registry: &mut Registry, backend: Arc<dyn QueueBackend>, config: NotifyConfig, dispatcher: Dispatcher) {
    let limiter = RateLimiter::new(backend, "notify:user", config.rate_limit);
    let n = Arc::new(Notifier { config, dispatcher, limiter });
    let listener = n.clone();
    registry.listen_queued("*", "notifications", QUEUE, move |env: EventEnvelope<Value>, ctx: JobContext| {
        let n = listener.clone();
        async move {
            match ctx.complete_with(move |tx| n.fan_out(tx, &env)).await {
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

/// The secret webhooks are signed with: the configured one, else one generated once and kept
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
            Err(BackendError::Storage(m)) if attempt == 0 && is_unique_violation(&m) => continue,
            other => return Ok(other?),
        }
    }
    unreachable!("the loop returns on its second pass")
}

pub(crate) fn is_unique_violation(message: &str) -> bool {
    message.contains("UNIQUE constraint failed") || message.starts_with("23505")
}

impl Notifier {
    /// Matches the event's rules and writes a log row (and, for each that is to be sent, a
    /// delivery job) per notification. Runs in the listener's acknowledgement transaction.
    fn fan_out(&self, tx: &mut dyn Tx, env: &EventEnvelope<Value>) -> Result<(), BackendError> {
        let rules = tx.query(
            "SELECT r.id, r.channel, r.recipient, r.conditions, t.subject, t.body FROM notify_rules r
             JOIN notify_templates t ON t.id = r.template_id WHERE r.event = $1 AND r.active = 1 ORDER BY r.id",
            &[env.event.as_str().into()],
        )?;
        let now = now_ms();
        let mut jobs = Vec::new();
        for r in &rules {
            let (rule_id, channel) = (r.int(0), r.text(1).unwrap_or_default().to_string());
            let conditions: Vec<Condition> = r.text(3).and_then(|c| serde_json::from_str(c).ok()).unwrap_or_default();
            if !conditions.iter().all(|c| c.holds(&env.payload)) {
                continue;
            }
            let (subject, body) = (r.text(4).map(str::to_string), r.text(5).unwrap_or_default().to_string());
            let mut log = LogRow {
                id: uuid::Uuid::now_v7().to_string(),
                event: env.event.clone(),
                event_id: env.event_id.clone(),
                rule_id,
                user_id: None,
                channel: channel.clone(),
                recipient: String::new(),
                status: "pending",
                error: None,
                subject: None,
                body: None,
                created_at: now,
            };
            let mut context = env.payload.clone();
            if let Value::Object(m) = &mut context {
                m.entry("event").or_insert_with(|| json!(env.event));
                m.entry("event_id").or_insert_with(|| json!(env.event_id));
            }
            // Who: an expression or URL, or the payload's user (then their address,
            // preferences and rate limit apply).
            match r.text(2).filter(|s| !s.trim().is_empty()) {
                Some(expr) => match render::render(expr, &context, false) {
                    Ok(to) => log.recipient = to.trim().to_string(),
                    Err(e) => log.fail(format!("recipient: {e}")),
                },
                None => match user_of(tx, &env.payload)? {
                    None => log.skip("the payload names no known user (user_id)"),
                    Some(user) => {
                        log.user_id = Some(user.id);
                        if let Value::Object(m) = &mut context {
                            m.entry("user").or_insert_with(|| json!({ "id": user.id, "name": user.name, "email": user.email }));
                        }
                        match user.address(&channel, self.config.slack_webhook.as_deref()) {
                            None => log.skip(format!("the user has no {channel} address")),
                            Some(a) => log.recipient = a,
                        }
                        if log.status == "pending" && !allowed(tx, user.id, &env.event, &channel)? {
                            log.skip(format!("the user turned {channel} off for {}", env.event));
                        }
                        if log.status == "pending" && !self.limiter.check_in(tx, &user.id.to_string())?.is_allowed() {
                            log.status = "rate_limited";
                            log.error = Some(format!(
                                "over {} notifications per {:?}",
                                self.config.rate_limit.limit, self.config.rate_limit.period
                            ));
                        }
                    }
                },
            }
            if log.status == "pending" {
                let rendered = subject
                    .as_deref()
                    .map(|s| render::render(s, &context, false))
                    .transpose()
                    .and_then(|s| Ok((s, render::render(&body, &context, false)?)));
                match rendered {
                    Ok((s, b)) => {
                        log.subject = s;
                        log.body = Some(b);
                    }
                    Err(e) => log.fail(format!("template: {e}")),
                }
            }
            if log.status == "pending" {
                if self.dispatcher.get(&channel).is_none() {
                    log.fail(format!("no channel {channel:?} is configured"));
                } else {
                    let html = if channel == "email" { Some(render::render(&body, &context, true).unwrap_or_default()) } else { None };
                    let d = Delivery {
                        log_id: log.id.clone(),
                        event: env.event.clone(),
                        event_id: env.event_id.clone(),
                        user_id: log.user_id,
                        recipient: log.recipient.clone(),
                        subject: log.subject.clone(),
                        body: log.body.clone().unwrap_or_default(),
                        html,
                        payload: env.payload.clone(),
                    };
                    let kind = Dispatcher::kind(&channel);
                    jobs.push(
                        NewJob::new(&kind, &d)
                            .queue(&kind)
                            .max_attempts(self.config.max_attempts)
                            .backoff(Backoff::list(&self.config.backoff))
                            .tag(format!("event:{}", env.event_id)),
                    );
                }
            }
            log.insert(tx)?;
        }
        if !jobs.is_empty() {
            tx.enqueue(jobs)?;
        }
        Ok(())
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
        let channel: Arc<dyn Channel> =
            self.dispatcher.get(&channel_name).cloned().ok_or_else(|| JobError::abort(format!("no channel {channel_name:?}")))?;
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
        };
        match channel.send(&msg).await {
            Ok(provider_id) => {
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
                        Ok(())
                    })
                    .await;
                match result {
                    Ok(()) | Err(BackendError::LeaseLost(_)) => Ok(()),
                    Err(e) => Err(JobError::retry(e)),
                }
            }
            Err(e) => {
                let last = matches!(e, SendError::Permanent(_)) || ctx.attempt >= ctx.max_attempts;
                let (id, error) = (d.log_id.clone(), e.to_string());
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
    }
}

/// A notification log row being built.
struct LogRow {
    id: String,
    event: String,
    event_id: String,
    rule_id: i64,
    user_id: Option<i64>,
    channel: String,
    recipient: String,
    status: &'static str,
    error: Option<String>,
    subject: Option<String>,
    body: Option<String>,
    created_at: i64,
}

impl LogRow {
    fn fail(&mut self, e: String) {
        self.status = "failed";
        self.error = Some(e);
    }

    fn skip(&mut self, why: impl Into<String>) {
        self.status = "skipped";
        self.error = Some(why.into());
    }

    fn insert(self, tx: &mut dyn Tx) -> Result<(), BackendError> {
        tx.execute(
            "INSERT INTO notify_logs (id, event, event_id, rule_id, user_id, channel, recipient, status, error, subject, body, created_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
            &[
                self.id.into(),
                self.event.into(),
                self.event_id.into(),
                self.rule_id.into(),
                self.user_id.into(),
                self.channel.into(),
                self.recipient.into(),
                self.status.into(),
                self.error.into(),
                self.subject.into(),
                self.body.into(),
                self.created_at.into(),
            ],
        )?;
        Ok(())
    }
}

struct UserRow {
    id: i64,
    name: String,
    email: String,
    phone: Option<String>,
    slack: Option<String>,
    webhook: Option<String>,
}

impl UserRow {
    fn address(&self, channel: &str, default_slack: Option<&str>) -> Option<String> {
        match channel {
            "email" => Some(self.email.clone()),
            "sms" => self.phone.clone(),
            "slack" => self.slack.clone().or_else(|| default_slack.map(str::to_string)),
            "webhook" => self.webhook.clone(),
            _ => Some(self.id.to_string()),
        }
    }
}

fn user_of(tx: &mut dyn Tx, payload: &Value) -> Result<Option<UserRow>, BackendError> {
    let id = match payload.get("user_id") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    };
    let Some(id) = id else { return Ok(None) };
    let rows = tx.query("SELECT id, name, email, phone, slack_webhook, webhook_url FROM users WHERE id = $1", &[id.into()])?;
    Ok(rows.first().map(|r| UserRow {
        id: r.int(0),
        name: r.text(1).unwrap_or_default().to_string(),
        email: r.text(2).unwrap_or_default().to_string(),
        phone: r.text(3).map(str::to_string),
        slack: r.text(4).map(str::to_string),
        webhook: r.text(5).map(str::to_string),
    }))
}

/// A user's preference for `channel` on `event`: the event's own setting, else the channel's,
/// else on.
fn allowed(tx: &mut dyn Tx, user: i64, event: &str, channel: &str) -> Result<bool, BackendError> {
    let rows = tx.query(
        "SELECT event, enabled FROM notify_preferences WHERE user_id = $1 AND channel = $2 AND (event = $3 OR event = '')",
        &[user.into(), channel.into(), event.into()],
    )?;
    let of = |e: &str| rows.iter().find(|r| r.text(0) == Some(e)).map(|r| r.int(1) != 0);
    Ok(of(event).or_else(|| of("")).unwrap_or(true))
}

/// Registers a user and emits `user_registered` in the same transaction.
pub async fn register_user(conveyor: &Conveyor, body: &Value) -> Result<(i64, String), model::ModelError> {
    model::register_user(conveyor, body).await
}
