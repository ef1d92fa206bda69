//! The rows the notification flow reads and writes: rules with their templates, users with
//! their addresses and preferences, digests, and the log row of one notification as it is built.

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use conveyor_core::backend::{BackendError, Row, RowExt, Tx};
use conveyor_core::event::EventEnvelope;

use super::render::Condition;

/// A notification log row being built.
pub(super) struct LogRow {
    pub(super) id: String,
    pub(super) event: String,
    pub(super) event_id: String,
    pub(super) rule_id: i64,
    pub(super) user_id: Option<i64>,
    pub(super) channel: String,
    pub(super) recipient: String,
    pub(super) status: &'static str,
    pub(super) error: Option<String>,
    pub(super) subject: Option<String>,
    pub(super) body: Option<String>,
    pub(super) created_at: i64,
}

/// A rule as matching needs it.
pub(super) struct RuleRow {
    pub(super) id: i64,
    pub(super) channel: String,
    pub(super) recipient: Option<String>,
    pub(super) subject: Option<String>,
    pub(super) body: String,
    pub(super) delay_ms: i64,
    pub(super) digest_window_ms: Option<i64>,
    pub(super) digest_key: Option<String>,
}

/// The active rules of an event, with their templates.
pub(super) const RULES_SQL: &str =
    "SELECT r.id, r.channel, r.recipient, r.conditions, t.subject, t.body, r.delay_s, r.digest_window_s, r.digest_key
     FROM notify_rules r JOIN notify_templates t ON t.id = r.template_id WHERE r.event = $1 AND r.active = 1 ORDER BY r.id";

impl RuleRow {
    /// A row of [`RULES_SQL`], if its conditions hold for `payload`.
    pub(super) fn matching(r: &Row, payload: &Value) -> Option<RuleRow> {
        let conditions: Vec<Condition> = r.text(3).and_then(|c| serde_json::from_str(c).ok()).unwrap_or_default();
        if !conditions.iter().all(|c| c.holds(payload)) {
            return None;
        }
        Some(RuleRow {
            id: r.int(0),
            channel: r.text(1).unwrap_or_default().to_string(),
            recipient: r.text(2).filter(|s| !s.trim().is_empty()).map(str::to_string),
            subject: r.text(4).map(str::to_string),
            body: r.text(5).unwrap_or_default().to_string(),
            delay_ms: r.opt_int(6).unwrap_or(0).max(0) * 1000,
            digest_window_ms: r.opt_int(7).map(|w| w * 1000),
            digest_key: r.text(8).map(str::to_string),
        })
    }
}

/// A digest's rule, with its template.
pub(super) const DIGEST_RULE_SQL: &str = "SELECT r.id, r.channel, r.recipient, t.subject, t.body, r.event
     FROM notify_rules r JOIN notify_templates t ON t.id = r.template_id WHERE r.id = $1";

/// A closing digest as its message needs it.
pub(super) struct DigestParts {
    pub(super) rule: RuleRow,
    pub(super) event: String,
    pub(super) first_event: String,
    /// The latest event's payload (it names the user).
    pub(super) last: Value,
    /// `events`, `count`, `digest_key`, `event`, `event_id`.
    pub(super) context: Value,
}

impl DigestParts {
    /// From a digest row (`rule_id, user_id, digest_key, events, count, first_event`) and its
    /// rule's ([`DIGEST_RULE_SQL`]).
    pub(super) fn of(d: &Row, r: &Row) -> DigestParts {
        let mut events: Vec<Value> = d.text(3).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
        // In the order the events happened (their ids are time-ordered), whatever order the
        // listener handled them in.
        events.sort_by(|a, b| a["event_id"].as_str().cmp(&b["event_id"].as_str()));
        let payloads: Vec<Value> = events.iter().map(|e| e["payload"].clone()).collect();
        let rule = RuleRow {
            id: r.int(0),
            channel: r.text(1).unwrap_or_default().to_string(),
            recipient: r.text(2).filter(|s| !s.trim().is_empty()).map(str::to_string),
            subject: r.text(3).map(str::to_string),
            body: r.text(4).unwrap_or_default().to_string(),
            delay_ms: 0,
            digest_window_ms: None,
            digest_key: None,
        };
        let event = r.text(5).unwrap_or_default().to_string();
        let first_event = d.text(5).unwrap_or_default().to_string();
        let last = payloads.last().cloned().unwrap_or_else(|| json!({}));
        let context = json!({ "events": payloads, "count": d.int(4), "digest_key": d.text(2), "event": event, "event_id": first_event });
        DigestParts { rule, event, first_event, last, context }
    }
}

/// The job that sends a digest when its window closes.
pub(super) const DIGEST_KIND: &str = "notify.digest";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct DigestRef {
    pub(super) digest_id: String,
}

impl LogRow {
    pub(super) fn new(event: &str, event_id: &str, rule_id: i64, channel: &str, now: i64) -> Self {
        LogRow {
            id: uuid::Uuid::now_v7().to_string(),
            event: event.to_string(),
            event_id: event_id.to_string(),
            rule_id,
            user_id: None,
            channel: channel.to_string(),
            recipient: String::new(),
            status: "pending",
            error: None,
            subject: None,
            body: None,
            created_at: now,
        }
    }

    pub(super) fn fail(&mut self, e: String) {
        self.status = "failed";
        self.error = Some(e);
    }

    pub(super) fn skip(&mut self, why: impl Into<String>) {
        self.status = "skipped";
        self.error = Some(why.into());
    }

    pub(super) fn insert(self, tx: &mut dyn Tx) -> Result<(), BackendError> {
        // Ends here unsent (skipped, or failed before any send): counted as such. The others
        // are counted by their delivery job.
        if self.status != "pending" {
            if let Some(t) = tx.telemetry() {
                t.count(&conveyor_core::telemetry::DELIVERIES, &[&self.channel, self.status]);
            }
        }
        // The log is read through the API: a URL recipient is kept without its credentials
        // (user info, secret query parameters). The delivery job has the URL as given.
        let recipient =
            if matches!(self.channel.as_str(), "webhook" | "slack") { conveyor_core::redact::url(&self.recipient) } else { self.recipient };
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
                recipient.into(),
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

pub(super) struct UserRow {
    pub(super) id: i64,
    pub(super) name: String,
    pub(super) email: String,
    pub(super) phone: Option<String>,
    pub(super) slack: Option<String>,
    pub(super) webhook: Option<String>,
    pub(super) timezone: Option<String>,
    pub(super) quiet: Option<(String, String)>,
}

impl UserRow {
    /// When `at` (unix ms) falls in the user's quiet hours (in their time zone), the end of
    /// those hours.
    pub(super) fn quiet_until(&self, at: i64) -> Option<i64> {
        let (start, end) = self.quiet.as_ref()?;
        quiet_until(at, self.timezone.as_deref().unwrap_or("UTC"), start, end)
    }

    pub(super) fn address(&self, channel: &str, default_slack: Option<&str>) -> Option<String> {
        match channel {
            "email" => Some(self.email.clone()),
            "sms" => self.phone.clone(),
            "slack" => self.slack.clone().or_else(|| default_slack.map(str::to_string)),
            "webhook" => self.webhook.clone(),
            _ => Some(self.id.to_string()),
        }
    }
}

pub(super) const USER_SQL: &str =
    "SELECT id, name, email, phone, slack_webhook, webhook_url, timezone, quiet_start, quiet_end FROM users WHERE id = $1";

pub(super) fn user_id_of(payload: &Value) -> Option<i64> {
    match payload.get("user_id") {
        Some(Value::Number(n)) => n.as_i64(),
        Some(Value::String(s)) => s.parse().ok(),
        _ => None,
    }
}

pub(super) fn user_of(tx: &mut dyn Tx, payload: &Value) -> Result<Option<UserRow>, BackendError> {
    let Some(id) = user_id_of(payload) else { return Ok(None) };
    Ok(tx.query(USER_SQL, &[id.into()])?.first().map(user_row))
}

pub(super) fn user_row(r: &Row) -> UserRow {
    UserRow {
        id: r.int(0),
        name: r.text(1).unwrap_or_default().to_string(),
        email: r.text(2).unwrap_or_default().to_string(),
        phone: r.text(3).map(str::to_string),
        slack: r.text(4).map(str::to_string),
        webhook: r.text(5).map(str::to_string),
        timezone: r.text(6).map(str::to_string),
        quiet: r.text(7).zip(r.text(8)).map(|(a, b)| (a.to_string(), b.to_string())),
    }
}

/// What a rule's templates see of the user they notify.
pub(super) fn add_user(context: &mut Value, user: &UserRow) {
    if let Value::Object(m) = context {
        m.entry("user").or_insert_with(|| json!({ "id": user.id, "name": user.name, "email": user.email }));
    }
}

/// The payload with `event` and `event_id`, unless it has its own.
pub(super) fn event_context(env: &EventEnvelope<Value>) -> Value {
    let mut context = env.payload.clone();
    if let Value::Object(m) = &mut context {
        m.entry("event").or_insert_with(|| json!(env.event));
        m.entry("event_id").or_insert_with(|| json!(env.event_id));
    }
    context
}

/// The end of the quiet window `start`–`end` (`HH:MM`, local to `tz`; it may span midnight)
/// if `at` falls inside it.
pub fn quiet_until(at: i64, tz: &str, start: &str, end: &str) -> Option<i64> {
    let tz = jiff::tz::TimeZone::get(tz).ok()?;
    let hm = |t: &str| -> Option<(i8, i8)> {
        let (h, m) = t.split_once(':')?;
        Some((h.parse().ok().filter(|h| (0..24).contains(h))?, m.parse().ok().filter(|m| (0..60).contains(m))?))
    };
    let ((sh, sm), (eh, em)) = (hm(start)?, hm(end)?);
    let local = jiff::Timestamp::from_millisecond(at).ok()?.to_zoned(tz.clone());
    let minute = |h: i8, m: i8| h as i32 * 60 + m as i32;
    let now = minute(local.hour(), local.minute());
    let (s, e) = (minute(sh, sm), minute(eh, em));
    let quiet = if s <= e { now >= s && now < e } else { now >= s || now < e };
    if !quiet || s == e {
        return None;
    }
    let mut end_at = local.date().at(eh, em, 0, 0).to_zoned(tz).ok()?;
    if end_at.timestamp().as_millisecond() <= at {
        end_at = end_at.checked_add(jiff::Span::new().days(1)).ok()?;
    }
    Some(end_at.timestamp().as_millisecond())
}

/// A user's preference for `channel` on `event`: the event's own setting, else the channel's,
/// else on.
pub(super) fn allowed(tx: &mut dyn Tx, user: i64, event: &str, channel: &str) -> Result<bool, BackendError> {
    let rows = tx.query(
        "SELECT event, enabled FROM notify_preferences WHERE user_id = $1 AND channel = $2 AND (event = $3 OR event = '')",
        &[user.into(), channel.into(), event.into()],
    )?;
    let of = |e: &str| rows.iter().find(|r| r.text(0) == Some(e)).map(|r| r.int(1) != 0);
    Ok(of(event).or_else(|| of("")).unwrap_or(true))
}
