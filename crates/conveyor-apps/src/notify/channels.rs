//! Delivery channels. The matching listener knows nothing channel-specific: it looks a channel
//! up by name in the [`Dispatcher`], which knows its job kind and queue (`notify.<channel>`).
//! A channel sends one rendered message; it may also write rows in the transaction that records
//! the delivery (the in-app inbox does all its work there).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::{json, Value};

use conveyor_core::backend::{BackendError, QueueBackend, Tx};
use conveyor_core::clock::now_ms;

use crate::outbound::{self, Client, OutboundError, Trust};

/// One notification to deliver.
#[derive(Clone, Debug)]
pub struct Message {
    /// The notification log id: the idempotency key of the delivery.
    pub id: String,
    pub event: String,
    pub event_id: String,
    pub user_id: Option<i64>,
    pub recipient: String,
    pub subject: Option<String>,
    pub body: String,
    /// The body rendered with HTML escaping (email's HTML part).
    pub html: Option<String>,
    pub payload: Value,
    /// Whose webhook secrets sign it (`rule:<id>`, `user:<id>`); `None`: the legacy secret.
    pub signer: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SendError {
    /// Worth another try (network, 5xx, 429 — after `retry_after` when the provider said).
    Retry { error: String, retry_after: Option<Duration> },
    /// Will never succeed (4xx, a malformed address): fails at once.
    Permanent(String),
}

impl std::fmt::Display for SendError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SendError::Retry { error, .. } | SendError::Permanent(error) => f.write_str(error),
        }
    }
}

#[async_trait]
pub trait Channel: Send + Sync {
    /// `email`, `sms`, `slack`, `webhook`, `database`.
    fn name(&self) -> &'static str;
    /// Sends; returns the provider's message id when it gives one.
    async fn send(&self, msg: &Message) -> Result<Option<String>, SendError>;
    /// Rows written with the delivery's acknowledgement (default: none).
    fn record(&self, _tx: &mut dyn Tx, _msg: &Message) -> Result<(), BackendError> {
        Ok(())
    }
}

/// One way out for a channel (an SMTP server, an SMS gateway). A channel with several tries
/// them in order; each has a circuit breaker of its own.
#[derive(Clone)]
pub struct Provider {
    /// `email#1`, `sms#2`, …: also its breaker's name (`notify:<name>`).
    pub name: String,
    pub channel: Arc<dyn Channel>,
    /// Whether a breaker guards it (remote providers; not the in-app inbox, nor webhook and
    /// Slack URLs, which are per rule).
    pub guarded: bool,
}

/// The channels by name, each with its providers in failover order.
#[derive(Clone, Default)]
pub struct Dispatcher {
    channels: HashMap<&'static str, Vec<Provider>>,
}

impl Dispatcher {
    /// A channel with one unguarded provider.
    pub fn with(mut self, channel: Arc<dyn Channel>) -> Self {
        let name = channel.name();
        self.channels.insert(name, vec![Provider { name: format!("{name}#1"), channel, guarded: false }]);
        self
    }

    /// A channel with providers tried in order, each behind its own breaker.
    pub fn with_providers(mut self, providers: Vec<Arc<dyn Channel>>) -> Self {
        if let Some(first) = providers.first() {
            let name = first.name();
            let list = providers
                .into_iter()
                .enumerate()
                .map(|(i, channel)| Provider { name: format!("{name}#{}", i + 1), channel, guarded: true })
                .collect();
            self.channels.insert(name, list);
        }
        self
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn Channel>> {
        self.channels.get(name).and_then(|p| p.first()).map(|p| &p.channel)
    }

    pub fn providers(&self, name: &str) -> &[Provider] {
        self.channels.get(name).map_or(&[], Vec::as_slice)
    }

    pub fn names(&self) -> Vec<&'static str> {
        let mut n: Vec<_> = self.channels.keys().copied().collect();
        n.sort_unstable();
        n
    }

    /// The job kind (and queue) of a channel's deliveries.
    pub fn kind(channel: &str) -> String {
        format!("notify.{channel}")
    }
}

/// Sends through an outbound client and maps the answer: 2xx is delivered; 408, 429 and 5xx
/// are worth retrying (429 after its `Retry-After`); any other 4xx, a 3xx (redirects are not
/// followed) or a destination the policy refuses never will succeed. The error keeps a short
/// excerpt of the answer, never the URL or a resolved address.
async fn http_outcome(client: &Client, req: Result<reqwest::RequestBuilder, OutboundError>) -> Result<reqwest::Response, SendError> {
    let sent = match req {
        Ok(req) => client.send(req).await,
        Err(e) => Err(e),
    };
    let resp = sent.map_err(|e| {
        if e.is_transient() {
            SendError::Retry { error: e.to_string(), retry_after: None }
        } else {
            SendError::Permanent(e.to_string())
        }
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(resp);
    }
    let retry_after = outbound::retry_after(resp.headers());
    let body = outbound::excerpt(resp, 4096, 300).await;
    let error = format!("HTTP {}: {}", status.as_u16(), body);
    if status.as_u16() == 408 || status.as_u16() == 429 || status.is_server_error() {
        Err(SendError::Retry { error, retry_after })
    } else {
        Err(SendError::Permanent(error))
    }
}

/// The notifications' outbound clients: callers' URLs (rule recipients, users' webhook and
/// Slack URLs) through the policy, the operator's (SMS gateways, the default Slack webhook)
/// trusted. Both follow no redirects and read at most 64 KiB of an answer.
#[derive(Clone)]
pub struct Clients {
    pub caller: Client,
    pub operator: Client,
}

impl Clients {
    pub fn new(policy: outbound::Policy) -> Clients {
        Clients {
            caller: Client::new(Trust::Caller, policy, outbound::Settings::default()),
            operator: Client::new(Trust::Operator, outbound::Policy::default(), outbound::Settings::default()),
        }
    }
}

/// Generic webhooks: `POST` the event and the rendered message as JSON, signed per Standard
/// Webhooks with the destination owner's secrets (and, for one release, the old
/// `X-Conveyor-Signature` with the legacy secret).
pub struct Webhook {
    client: Client,
    backend: Arc<dyn QueueBackend>,
    /// The legacy secret (`CONVEYOR_WEBHOOK_SECRET`, or the one generated and stored).
    legacy: Arc<dyn Fn() -> String + Send + Sync>,
    /// Owners' signing secrets as read lately: a burst of deliveries to one destination reads
    /// the store once a second, not once per delivery. A rotation is seen within that second;
    /// the previous secret stays valid far longer, so a delivery signed from the cache still
    /// verifies.
    keys: std::sync::Mutex<HashMap<String, CachedKeys>>,
}

/// An owner's secrets, when they were read, and the count of this process's rotations then.
type CachedKeys = (std::time::Instant, u64, Arc<Vec<Option<String>>>);

/// How long an owner's secrets are used without reading them again.
const KEYS_FRESH: Duration = Duration::from_secs(1);

impl Webhook {
    pub fn new(client: Client, backend: Arc<dyn QueueBackend>, legacy: Arc<dyn Fn() -> String + Send + Sync>) -> Webhook {
        Webhook { client, backend, legacy, keys: Default::default() }
    }

    async fn keys(&self, owner: Option<&str>) -> Result<Arc<Vec<Option<String>>>, BackendError> {
        let key = owner.unwrap_or_default().to_string();
        let rotations = crate::signing::ROTATIONS.load(std::sync::atomic::Ordering::Relaxed);
        // The std mutex is never held across an await: looked up, dropped, then the store.
        if let Some((at, seen, keys)) = self.keys.lock().expect("keys lock").get(&key) {
            if at.elapsed() < KEYS_FRESH && *seen == rotations {
                return Ok(keys.clone());
            }
        }
        let keys = Arc::new(crate::signing::signing(self.backend.as_ref(), owner).await?);
        let mut cache = self.keys.lock().expect("keys lock");
        if cache.len() >= 10_000 {
            cache.retain(|_, (at, _, _)| at.elapsed() < KEYS_FRESH);
        }
        cache.insert(key, (std::time::Instant::now(), rotations, keys.clone()));
        Ok(keys)
    }
}

pub use crate::signing::{legacy_signature, sign, verify, verify_legacy};

#[async_trait]
impl Channel for Webhook {
    fn name(&self) -> &'static str {
        "webhook"
    }

    async fn send(&self, msg: &Message) -> Result<Option<String>, SendError> {
        let body = serde_json::to_vec(&json!({
            "event": msg.event,
            "event_id": msg.event_id,
            "notification_id": msg.id,
            "message": msg.body,
            "payload": msg.payload,
        }))
        .expect("JSON serializes");
        let keys = self
            .keys(msg.signer.as_deref())
            .await
            .map_err(|e| SendError::Retry { error: format!("cannot read the signing secrets: {e}"), retry_after: None })?;
        let legacy = (self.legacy)();
        let now = now_ms() / 1000;
        let signatures: Vec<String> = keys
            .iter()
            .filter_map(|k| match k {
                Some(s) => crate::signing::key_of(s),
                None => Some(legacy.as_bytes().to_vec()),
            })
            .map(|key| sign(&key, &msg.id, now, &body))
            .collect();
        let req = self.client.post(&msg.recipient).map(|r| {
            r.header("content-type", "application/json")
                .header("webhook-id", &msg.id)
                .header("webhook-timestamp", now.to_string())
                .header("webhook-signature", signatures.join(" "))
                .header("x-conveyor-signature", legacy_signature(&legacy, now, &body))
                .header("idempotency-key", &msg.id)
                .body(body)
        });
        http_outcome(&self.client, req).await?;
        Ok(None)
    }
}

/// Slack incoming webhooks: `{"text": message}`. The default webhook is the operator's
/// (`CONVEYOR_SLACK_WEBHOOK`); any other URL came from a caller.
pub struct Slack {
    pub clients: Clients,
    pub default_url: Option<String>,
}

#[async_trait]
impl Channel for Slack {
    fn name(&self) -> &'static str {
        "slack"
    }

    async fn send(&self, msg: &Message) -> Result<Option<String>, SendError> {
        let client =
            if self.default_url.as_deref() == Some(msg.recipient.as_str()) { &self.clients.operator } else { &self.clients.caller };
        let req = client.post(&msg.recipient).map(|r| r.json(&json!({ "text": msg.body })));
        http_outcome(client, req).await?;
        Ok(None)
    }
}

/// SMS through a Twilio-shaped gateway: `POST {base}/Messages` as a form `To, From, Body`.
pub struct Sms {
    /// The operator's client: the gateway is configuration.
    pub client: Client,
    pub base_url: Option<String>,
    pub token: Option<String>,
    pub from: String,
}

#[async_trait]
impl Channel for Sms {
    fn name(&self) -> &'static str {
        "sms"
    }

    async fn send(&self, msg: &Message) -> Result<Option<String>, SendError> {
        let base = self.base_url.as_deref().ok_or_else(|| SendError::Permanent("CONVEYOR_SMS_URL is not set".into()))?;
        let req = self.client.post(&format!("{}/Messages", base.trim_end_matches('/'))).map(|r| {
            let r = r.header("idempotency-key", &msg.id).form(&[
                ("To", msg.recipient.as_str()),
                ("From", self.from.as_str()),
                ("Body", msg.body.as_str()),
            ]);
            match &self.token {
                Some(t) => r.bearer_auth(t),
                None => r,
            }
        });
        let resp = http_outcome(&self.client, req).await?;
        // The id is a convenience: an answer too large or not JSON still means delivered.
        let body: Value = self.client.body(resp).await.ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or(Value::Null);
        Ok(body.get("sid").and_then(Value::as_str).map(str::to_string))
    }
}

/// The in-app inbox: the message becomes an inbox row in the delivery's own transaction.
pub struct Database;

#[async_trait]
impl Channel for Database {
    fn name(&self) -> &'static str {
        "database"
    }

    async fn send(&self, msg: &Message) -> Result<Option<String>, SendError> {
        Ok(Some(format!("inbox:{}", msg.id)))
    }

    fn record(&self, tx: &mut dyn Tx, msg: &Message) -> Result<(), BackendError> {
        let user = msg.user_id.ok_or_else(|| BackendError::Invalid("an in-app message needs a user".into()))?;
        tx.execute(
            "INSERT INTO notify_inbox (id, user_id, log_id, title, body, created_at) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (log_id) DO NOTHING",
            &[
                uuid::Uuid::now_v7().to_string().into(),
                user.into(),
                msg.id.clone().into(),
                msg.subject.clone().unwrap_or_else(|| msg.event.clone()).into(),
                msg.body.clone().into(),
                now_ms().into(),
            ],
        )?;
        Ok(())
    }
}

/// How email leaves: SMTP, or the log (for local use: the message is logged and counted sent).
#[derive(Clone, PartialEq)]
pub enum Mailer {
    Log,
    /// Servers in failover order: `smtp://user:pass@host:port` (plain; `?tls=required` for
    /// STARTTLS) or `smtps://…` (TLS).
    Smtp(Vec<String>),
}

pub struct Email {
    pub from: String,
    transport: Option<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>,
}

impl Email {
    /// One email provider per SMTP server (the log mailer: one).
    pub fn providers(mailer: &Mailer, from: &str) -> Result<Vec<Email>, String> {
        from.parse::<lettre::message::Mailbox>().map_err(|e| format!("CONVEYOR_MAIL_FROM: {e}"))?;
        match mailer {
            Mailer::Log => Ok(vec![Email { from: from.to_string(), transport: None }]),
            Mailer::Smtp(urls) => urls
                .iter()
                .map(|url| {
                    let t = lettre::AsyncSmtpTransport::<lettre::Tokio1Executor>::from_url(url)
                        .map_err(|e| format!("CONVEYOR_SMTP_URL: {e}"))?
                        .timeout(Some(Duration::from_secs(10)))
                        .build();
                    Ok(Email { from: from.to_string(), transport: Some(t) })
                })
                .collect(),
        }
    }
}

#[async_trait]
impl Channel for Email {
    fn name(&self) -> &'static str {
        "email"
    }

    async fn send(&self, msg: &Message) -> Result<Option<String>, SendError> {
        use lettre::message::{header::ContentType, MultiPart, SinglePart};
        use lettre::AsyncTransport;
        let to: lettre::message::Mailbox =
            msg.recipient.parse().map_err(|e| SendError::Permanent(format!("bad address {:?}: {e}", msg.recipient)))?;
        let message_id = format!("<{}@conveyor>", msg.id);
        let html = msg.html.clone().unwrap_or_else(|| msg.body.clone()).replace('\n', "<br>\n");
        let mut builder =
            lettre::Message::builder().from(self.from.parse().map_err(|e| SendError::Permanent(format!("bad sender: {e}")))?).to(to);
        if let Some(ctx) = conveyor_core::trace::current() {
            builder = builder.header(Traceparent(ctx.traceparent()));
        }
        let email = builder
            .subject(msg.subject.clone().unwrap_or_default())
            .message_id(Some(message_id.clone()))
            .multipart(
                MultiPart::alternative()
                    .singlepart(SinglePart::builder().header(ContentType::TEXT_PLAIN).body(msg.body.clone()))
                    .singlepart(SinglePart::builder().header(ContentType::TEXT_HTML).body(html)),
            )
            .map_err(|e| SendError::Permanent(format!("cannot build the message: {e}")))?;
        let Some(transport) = &self.transport else {
            tracing::info!(to = %msg.recipient, subject = ?msg.subject, notification = %msg.id, "mail (log mailer)");
            return Ok(Some(message_id));
        };
        match transport.send(email).await {
            Ok(_) => Ok(Some(message_id)),
            Err(e) if e.is_permanent() => Err(SendError::Permanent(format!("SMTP: {e}"))),
            Err(e) => Err(SendError::Retry { error: format!("SMTP: {e}"), retry_after: None }),
        }
    }
}

/// The trace a mail was sent in, as the W3C `traceparent` header (mail servers keep unknown
/// headers, so a receiving system can join the trace).
#[derive(Clone)]
struct Traceparent(String);

impl lettre::message::header::Header for Traceparent {
    fn name() -> lettre::message::header::HeaderName {
        lettre::message::header::HeaderName::new_from_ascii_str("traceparent")
    }

    fn parse(s: &str) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        Ok(Traceparent(s.to_string()))
    }

    fn display(&self) -> lettre::message::header::HeaderValue {
        lettre::message::header::HeaderValue::new(Self::name(), self.0.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_signatures_verify_and_reject_tampering() {
        let sig = legacy_signature("s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("t=1700000000,v1="));
        assert!(verify_legacy("s3cret", &sig, b"{\"a\":1}", 1_700_000_010, 300));
        assert!(!verify_legacy("s3cret", &sig, b"{\"a\":2}", 1_700_000_010, 300), "another body");
        assert!(!verify_legacy("other", &sig, b"{\"a\":1}", 1_700_000_010, 300), "another secret");
        assert!(!verify_legacy("s3cret", &sig, b"{\"a\":1}", 1_700_001_000, 300), "too old");
        assert!(!verify_legacy("s3cret", "garbage", b"", 0, 300));
    }

    #[test]
    fn standard_webhooks_signatures_verify_with_any_listed_secret() {
        use reqwest::header::{HeaderMap, HeaderValue};
        // The Standard Webhooks specification's example: this secret, id, timestamp and body
        // sign to this signature.
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            sign(&crate::signing::key_of(secret).unwrap(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        let other = crate::signing::generate();
        let mut h = HeaderMap::new();
        h.insert("webhook-id", HeaderValue::from_static("msg_p5jXN8AQM9LWM0D4loKWxJek"));
        h.insert("webhook-timestamp", HeaderValue::from_static("1614265330"));
        let both = format!(
            "{} {}",
            sign(&crate::signing::key_of(&other).unwrap(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body),
            sign(&crate::signing::key_of(secret).unwrap(), "msg_p5jXN8AQM9LWM0D4loKWxJek", 1_614_265_330, body)
        );
        h.insert("webhook-signature", HeaderValue::from_str(&both).unwrap());
        assert!(verify(secret, &h, body, 1_614_265_330 + 10, 300), "the second signature matches");
        assert!(verify(&other, &h, body, 1_614_265_330, 300), "the first too");
        assert!(!verify(&crate::signing::generate(), &h, body, 1_614_265_330, 300), "a third secret");
        assert!(!verify(secret, &h, b"{}", 1_614_265_330, 300), "another body");
        assert!(!verify(secret, &h, body, 1_614_265_330 + 301, 300), "too old");
        assert!(!verify(secret, &h, body, 1_614_265_330 - 301, 300), "too new");
        h.insert("webhook-id", HeaderValue::from_static("msg_other"));
        assert!(!verify(secret, &h, body, 1_614_265_330, 300), "another id");
    }
}
