//! The notifications model as the API sees it: users, event sources, templates, rules,
//! preferences, the in-app inbox and the delivery logs. Every write validates its input and
//! names the field that is wrong.

use serde::Serialize;
use serde_json::{json, Value};

use conveyor_core::backend::{
    count_sql, BackendError, Cursor, Page, Paged, QueueBackend, QueueBackendExt, Row, RowExt, SqlValue, Tx, MAX_DEPTH,
};
use conveyor_core::clock::now_ms;
use conveyor_core::event::Event;
use conveyor_core::Conveyor;

use super::render::{self, Condition};
use super::secrets::{self, Owner};
use crate::outbound::{self, Policy};

pub const CHANNELS: [&str; 5] = ["email", "sms", "slack", "webhook", "database"];

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] BackendError),
}

fn invalid(field: &str, reason: impl Into<String>) -> ModelError {
    ModelError::Invalid { field: field.into(), reason: reason.into() }
}

/// The next id of a kind of row (a counter row, portable between the databases).
fn next_id(tx: &mut dyn Tx, name: &str) -> Result<i64, BackendError> {
    let rows = tx.query(
        "INSERT INTO notify_ids (name, value) VALUES ($1, 1) ON CONFLICT (name) DO UPDATE SET value = notify_ids.value + 1 RETURNING value",
        &[name.into()],
    )?;
    Ok(rows.first().map_or(1, |r| r.int(0)))
}

fn text(body: &Value, field: &str, max: usize, required: bool) -> Result<Option<String>, ModelError> {
    match body.get(field) {
        None | Some(Value::Null) if !required => Ok(None),
        None | Some(Value::Null) => Err(invalid(field, "is required")),
        Some(Value::String(s)) if s.trim().is_empty() && required => Err(invalid(field, "is empty")),
        Some(Value::String(s)) if s.len() > max => Err(invalid(field, format!("is longer than {max} characters"))),
        Some(Value::String(s)) => Ok(Some(s.trim().to_string())),
        Some(_) => Err(invalid(field, "must be a string")),
    }
}

// --- users ---------------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct User {
    pub id: i64,
    pub name: String,
    pub email: String,
    pub phone: Option<String>,
    pub slack_webhook: Option<String>,
    pub webhook_url: Option<String>,
    pub created_at: i64,
}

/// A caller's webhook or Slack URL: http(s), and not a literal address the policy refuses
/// (names are checked when delivering, since what they resolve to can change).
fn url(body: &Value, field: &str, policy: &Policy) -> Result<Option<String>, ModelError> {
    let u = text(body, field, 2000, false)?;
    if let Some(u) = &u {
        outbound::validate_caller_url(u, policy).map_err(|e| invalid(field, e.to_string()))?;
    }
    Ok(u)
}

/// What registering a user answers.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Registered {
    pub user_id: i64,
    pub event_id: String,
    /// The signing secret of the user's webhook, when they have one: shown here, at creation,
    /// and afterwards only to the admin on request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook_secret: Option<String>,
}

/// `{name, email, phone?, slack_webhook?, webhook_url?}` → the new user's id and the id of the
/// `user_registered` event emitted with it (one transaction); a user with a `webhook_url` gets
/// its signing secret in the same transaction.
pub async fn register_user(conveyor: &Conveyor, body: &Value, policy: &Policy) -> Result<Registered, ModelError> {
    if !body.is_object() {
        return Err(invalid("body", "must be a JSON object"));
    }
    let name = text(body, "name", 200, true)?.expect("required");
    let email = text(body, "email", 254, true)?.expect("required").to_lowercase();
    if !crate::email::valid_email(&email) {
        return Err(invalid("email", "is not an email address"));
    }
    let phone = text(body, "phone", 32, false)?;
    if let Some(p) = &phone {
        let digits = p.strip_prefix('+').unwrap_or(p);
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_digit()) {
            return Err(invalid("phone", "must be digits, optionally after a +"));
        }
    }
    let (slack, webhook) = (url(body, "slack_webhook", policy)?, url(body, "webhook_url", policy)?);
    let cv = conveyor.clone();
    let r = conveyor
        .backend()
        .transact(move |tx| {
            if !tx.query("SELECT 1 FROM users WHERE email = $1", &[email.as_str().into()])?.is_empty() {
                return Ok(None);
            }
            let id = next_id(tx, "users")?;
            let webhook_secret = webhook.is_some().then(|| secrets::create_in(tx, Owner::User(id))).transpose()?;
            tx.execute(
                "INSERT INTO users (id, name, email, phone, slack_webhook, webhook_url, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[id.into(), name.clone().into(), email.clone().into(), phone.into(), slack.into(), webhook.into(), now_ms().into()],
            )?;
            tx.execute(
                "INSERT INTO notify_event_keys (key, event_id, created_at) VALUES ($1, '', $2)",
                &[format!("user_registered:{id}").into(), now_ms().into()],
            )?;
            let event =
                cv.emit_in(tx, Event { name: "user_registered".into(), payload: json!({ "user_id": id, "name": name, "email": email }) })?;
            tx.execute(
                "UPDATE notify_event_keys SET event_id = $2 WHERE key = $1",
                &[format!("user_registered:{id}").into(), event.clone().into()],
            )?;
            Ok(Some(Registered { user_id: id, event_id: event, webhook_secret }))
        })
        .await;
    match r {
        Ok(Some(done)) => Ok(done),
        Ok(None) => Err(ModelError::Conflict("a user with this email exists".into())),
        Err(BackendError::Unique(_)) => Err(ModelError::Conflict("a user with this email exists".into())),
        Err(e) => Err(e.into()),
    }
}

pub async fn user(backend: &dyn QueueBackend, id: i64) -> Result<Option<User>, BackendError> {
    let rows = backend
        .query("SELECT id, name, email, phone, slack_webhook, webhook_url, created_at FROM users WHERE id = $1", vec![id.into()])
        .await?;
    Ok(rows.first().map(|r| User {
        id: r.int(0),
        name: r.text(1).unwrap_or_default().into(),
        email: r.text(2).unwrap_or_default().into(),
        phone: r.text(3).map(str::to_string),
        slack_webhook: r.text(4).map(str::to_string),
        webhook_url: r.text(5).map(str::to_string),
        created_at: r.int(6),
    }))
}

// --- preferences ---------------------------------------------------------------------------

/// `{channels: {email: true, …}, events: {"order_created": {email: false}}}`.
pub async fn preferences(backend: &dyn QueueBackend, user_id: i64) -> Result<Value, ModelError> {
    if user(backend, user_id).await?.is_none() {
        return Err(ModelError::NotFound(format!("no user {user_id}")));
    }
    let rows = backend.query("SELECT event, channel, enabled FROM notify_preferences WHERE user_id = $1", vec![user_id.into()]).await?;
    let user = backend.query("SELECT timezone, quiet_start, quiet_end FROM users WHERE id = $1", vec![user_id.into()]).await?;
    let (tz, quiet) = user.first().map_or((None, Value::Null), |u| {
        (u.text(0).map(str::to_string), u.text(1).zip(u.text(2)).map_or(Value::Null, |(s, e)| json!({ "start": s, "end": e })))
    });
    let mut channels = serde_json::Map::new();
    for c in CHANNELS {
        channels.insert(c.into(), json!(true));
    }
    let mut events = serde_json::Map::new();
    for r in &rows {
        let (event, channel, on) = (r.text(0).unwrap_or_default(), r.text(1).unwrap_or_default(), r.int(2) != 0);
        if event.is_empty() {
            channels.insert(channel.into(), json!(on));
        } else {
            events.entry(event.to_string()).or_insert_with(|| json!({}))[channel] = json!(on);
        }
    }
    Ok(json!({ "channels": channels, "events": events, "timezone": tz.unwrap_or_else(|| "UTC".into()), "quiet_hours": quiet }))
}

/// Replaces the settings the body names; others stay.
pub async fn set_preferences(backend: &dyn QueueBackend, user_id: i64, body: &Value) -> Result<Value, ModelError> {
    if user(backend, user_id).await?.is_none() {
        return Err(ModelError::NotFound(format!("no user {user_id}")));
    }
    let mut settings: Vec<(String, String, bool)> = Vec::new();
    let channel_map = |v: &Value, path: &str, event: &str, out: &mut Vec<(String, String, bool)>| -> Result<(), ModelError> {
        let m = v.as_object().ok_or_else(|| invalid(path, "must be an object of channel: true|false"))?;
        for (c, on) in m {
            if !CHANNELS.contains(&c.as_str()) {
                return Err(invalid(&format!("{path}.{c}"), format!("unknown channel (one of {})", CHANNELS.join(", "))));
            }
            let on = on.as_bool().ok_or_else(|| invalid(&format!("{path}.{c}"), "must be true or false"))?;
            out.push((event.to_string(), c.clone(), on));
        }
        Ok(())
    };
    if !body.is_object() {
        return Err(invalid("body", "must be a JSON object"));
    }
    if let Some(c) = body.get("channels").filter(|c| !c.is_null()) {
        channel_map(c, "channels", "", &mut settings)?;
    }
    if let Some(e) = body.get("events") {
        let m = e.as_object().ok_or_else(|| invalid("events", "must be an object of event: {channel: true|false}"))?;
        for (event, v) in m {
            if event.is_empty() || event.len() > 200 {
                return Err(invalid("events", "event names are 1 to 200 characters"));
            }
            channel_map(v, &format!("events.{event}"), event, &mut settings)?;
        }
    }
    // Quiet hours (`{start: "22:00", end: "07:00"}` or null) in the user's time zone.
    let hhmm = |v: &Value, field: &str| -> Result<String, ModelError> {
        let t = v.as_str().ok_or_else(|| invalid(field, "must be HH:MM"))?;
        let ok = t.split_once(':').is_some_and(|(h, m)| {
            h.len() == 2 && m.len() == 2 && h.parse::<u8>().is_ok_and(|h| h < 24) && m.parse::<u8>().is_ok_and(|m| m < 60)
        });
        if ok {
            Ok(t.to_string())
        } else {
            Err(invalid(field, "must be HH:MM (00:00 to 23:59)"))
        }
    };
    let quiet: Option<Option<(String, String)>> = match body.get("quiet_hours") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(q @ Value::Object(_)) => Some(Some((hhmm(&q["start"], "quiet_hours.start")?, hhmm(&q["end"], "quiet_hours.end")?))),
        Some(_) => return Err(invalid("quiet_hours", "must be {start, end} or null")),
    };
    let tz = match body.get("timezone") {
        None | Some(Value::Null) => None,
        Some(Value::String(t)) if jiff::tz::TimeZone::get(t).is_ok() => Some(t.clone()),
        Some(_) => return Err(invalid("timezone", "must be an IANA time zone like Europe/Paris")),
    };
    backend
        .transact(move |tx| {
            if let Some(t) = tz {
                tx.execute("UPDATE users SET timezone = $2 WHERE id = $1", &[user_id.into(), t.into()])?;
            }
            if let Some(q) = quiet {
                let (s, e) = q.map_or((None, None), |(s, e)| (Some(s), Some(e)));
                tx.execute("UPDATE users SET quiet_start = $2, quiet_end = $3 WHERE id = $1", &[user_id.into(), s.into(), e.into()])?;
            }
            for (event, channel, on) in settings {
                tx.execute(
                    "INSERT INTO notify_preferences (user_id, event, channel, enabled) VALUES ($1, $2, $3, $4)
                     ON CONFLICT (user_id, event, channel) DO UPDATE SET enabled = excluded.enabled",
                    &[user_id.into(), event.into(), channel.into(), (on as i64).into()],
                )?;
            }
            Ok(())
        })
        .await?;
    preferences(backend, user_id).await
}

// --- inbox and logs ------------------------------------------------------------------------

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InboxItem {
    pub id: String,
    pub title: String,
    pub body: String,
    pub read_at: Option<i64>,
    pub created_at: i64,
}

/// A user's inbox, newest first, and how many are unread.
pub async fn inbox(backend: &dyn QueueBackend, user_id: i64, page: Page) -> Result<(Paged<InboxItem>, u64), ModelError> {
    if user(backend, user_id).await?.is_none() {
        return Err(ModelError::NotFound(format!("no user {user_id}")));
    }
    // Both counts stop past MAX_DEPTH, as every list's does.
    let capped = format!("(SELECT read_at FROM notify_inbox WHERE user_id = $1 LIMIT {})", MAX_DEPTH + 1);
    let counts = backend
        .query(
            &format!("SELECT count(*), coalesce(sum(CASE WHEN read_at IS NULL THEN 1 ELSE 0 END), 0) FROM {capped} counted"),
            vec![user_id.into()],
        )
        .await?;
    let (after, limit, mut params) = page.sql("created_at", Some("id"), 2);
    params.insert(0, user_id.into());
    let rows = backend
        .query(&format!("SELECT id, title, body, read_at, created_at FROM notify_inbox WHERE user_id = $1{after} ORDER BY created_at DESC, id DESC{limit}"), params)
        .await?;
    let items = rows
        .iter()
        .map(|r| InboxItem {
            id: r.text(0).unwrap_or_default().into(),
            title: r.text(1).unwrap_or_default().into(),
            body: r.text(2).unwrap_or_default().into(),
            read_at: r.opt_int(3),
            created_at: r.int(4),
        })
        .collect();
    let (count, unread) = counts.first().map_or((0, 0), |r| (r.int(0) as u64, r.int(1) as u64));
    Ok((Paged::from_rows(items, &page, count, |i: &InboxItem| Cursor::new(i.created_at, i.id.clone())), unread))
}

pub async fn mark_read(backend: &dyn QueueBackend, user_id: i64, id: &str) -> Result<(), ModelError> {
    let id = id.to_string();
    let n = backend
        .transact(move |tx| {
            tx.execute(
                "UPDATE notify_inbox SET read_at = coalesce(read_at, $3) WHERE id = $1 AND user_id = $2",
                &[id.into(), user_id.into(), now_ms().into()],
            )
        })
        .await?;
    if n == 0 {
        return Err(ModelError::NotFound("no such message in this inbox".into()));
    }
    Ok(())
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogEntry {
    pub id: String,
    pub event: String,
    pub event_id: String,
    pub user_id: Option<i64>,
    pub channel: String,
    pub recipient: String,
    pub status: String,
    pub attempts: u32,
    pub error: Option<String>,
    pub provider_id: Option<String>,
    pub created_at: i64,
    pub sent_at: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub user_id: Option<i64>,
    pub event: Option<String>,
    pub status: Option<String>,
    pub channel: Option<String>,
}

pub async fn logs(backend: &dyn QueueBackend, f: LogFilter, page: Page) -> Result<Paged<LogEntry>, BackendError> {
    let cond = "(CAST($1 AS BIGINT) IS NULL OR user_id = $1) AND (CAST($2 AS TEXT) IS NULL OR event = $2)
                AND (CAST($3 AS TEXT) IS NULL OR status = $3) AND (CAST($4 AS TEXT) IS NULL OR channel = $4)";
    let params: Vec<SqlValue> = vec![f.user_id.into(), f.event.into(), f.status.into(), f.channel.into()];
    let count = backend.query(&count_sql(&format!("FROM notify_logs WHERE {cond}")), params.clone()).await?;
    let (after, limit, extra) = page.sql("created_at", Some("id"), 5);
    let mut p = params;
    p.extend(extra);
    let rows = backend
        .query(
            &format!(
                "SELECT id, event, event_id, user_id, channel, recipient, status, attempts, error, provider_id, created_at, sent_at
                 FROM notify_logs WHERE {cond}{after} ORDER BY created_at DESC, id DESC{limit}"
            ),
            p,
        )
        .await?;
    let count = count.first().map_or(0, |r| r.int(0)) as u64;
    Ok(Paged::from_rows(rows.iter().map(log_entry).collect(), &page, count, |l: &LogEntry| Cursor::new(l.created_at, l.id.clone())))
}

fn log_entry(r: &Row) -> LogEntry {
    LogEntry {
        id: r.text(0).unwrap_or_default().into(),
        event: r.text(1).unwrap_or_default().into(),
        event_id: r.text(2).unwrap_or_default().into(),
        user_id: r.opt_int(3),
        channel: r.text(4).unwrap_or_default().into(),
        recipient: r.text(5).unwrap_or_default().into(),
        status: r.text(6).unwrap_or_default().into(),
        attempts: r.int(7).max(0) as u32,
        error: r.text(8).map(str::to_string),
        provider_id: r.text(9).map(str::to_string),
        created_at: r.int(10),
        sent_at: r.opt_int(11),
    }
}

// --- event sources, templates, rules -------------------------------------------------------

/// The three configurable kinds of rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Sources,
    Templates,
    Rules,
}

impl Kind {
    fn table(self) -> &'static str {
        match self {
            Kind::Sources => "notify_sources",
            Kind::Templates => "notify_templates",
            Kind::Rules => "notify_rules",
        }
    }

    fn columns(self) -> &'static str {
        match self {
            Kind::Sources => "id, name, description, schema, created_at",
            Kind::Templates => "id, name, channel, subject, body, created_at",
            Kind::Rules => {
                "id, event, template_id, channel, recipient, conditions, active, delay_s, digest_window_s, digest_key, created_at"
            }
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Kind::Sources => "event source",
            Kind::Templates => "template",
            Kind::Rules => "rule",
        }
    }

    fn to_json(self, r: &Row) -> Value {
        match self {
            Kind::Sources => json!({
                "id": r.int(0), "name": r.text(1), "description": r.text(2),
                "schema": r.text(3).and_then(|s| serde_json::from_str::<Value>(s).ok()), "created_at": r.int(4),
            }),
            Kind::Templates => json!({
                "id": r.int(0), "name": r.text(1), "channel": r.text(2), "subject": r.text(3), "body": r.text(4), "created_at": r.int(5),
            }),
            Kind::Rules => json!({
                "id": r.int(0), "event": r.text(1), "template_id": r.int(2), "channel": r.text(3), "recipient": r.text(4),
                "conditions": r.text(5).and_then(|s| serde_json::from_str::<Value>(s).ok()).unwrap_or(json!([])),
                "active": r.int(6) != 0, "delay": r.opt_int(7),
                "digest": r.opt_int(8).map(|w| json!({ "window": w, "key": r.text(9) })),
                "created_at": r.int(10),
            }),
        }
    }
}

pub async fn list(backend: &dyn QueueBackend, kind: Kind, page: Page) -> Result<Paged<Value>, BackendError> {
    let count = backend.query(&count_sql(&format!("FROM {}", kind.table())), vec![]).await?;
    // In id order: the cursor is the last id.
    let after = match &page.after {
        Some(c) => format!(" WHERE id > {}", c.at),
        None => String::new(),
    };
    let rows = backend
        .query(
            &format!("SELECT {} FROM {}{after} ORDER BY id LIMIT $1 OFFSET $2", kind.columns(), kind.table()),
            vec![(page.limit() as i64).into(), (page.offset() as i64).into()],
        )
        .await?;
    let count = count.first().map_or(0, |r| r.int(0)) as u64;
    Ok(Paged::from_rows(rows.iter().map(|r| kind.to_json(r)).collect(), &page, count, |v: &Value| {
        Cursor::new(v["id"].as_i64().unwrap_or(0), "")
    }))
}

pub async fn get(backend: &dyn QueueBackend, kind: Kind, id: i64) -> Result<Value, ModelError> {
    let rows = backend.query(&format!("SELECT {} FROM {} WHERE id = $1", kind.columns(), kind.table()), vec![id.into()]).await?;
    rows.first().map(|r| kind.to_json(r)).ok_or_else(|| ModelError::NotFound(format!("no {} {id}", kind.noun())))
}

/// Creates (`id: None`) or replaces a row from its JSON; returns the stored row. A webhook
/// rule created here gets its signing secret, returned once as `secret`. A rule's literal
/// webhook or Slack URL is checked against `policy` (expressions when they are rendered).
pub async fn save(backend: &dyn QueueBackend, kind: Kind, id: Option<i64>, body: &Value, policy: &Policy) -> Result<Value, ModelError> {
    if !body.is_object() {
        return Err(invalid("body", "must be a JSON object"));
    }
    let values: Vec<SqlValue> = match kind {
        Kind::Sources => {
            let name = text(body, "name", 200, true)?.expect("required");
            let schema = match body.get("schema") {
                None | Some(Value::Null) => None,
                Some(s @ Value::Object(_)) => Some(s.to_string()),
                Some(_) => return Err(invalid("schema", "must be a JSON Schema object")),
            };
            vec![name.into(), text(body, "description", 2000, false)?.into(), schema.into()]
        }
        Kind::Templates => {
            let name = text(body, "name", 200, true)?.expect("required");
            let channel = text(body, "channel", 20, true)?.expect("required");
            if !CHANNELS.contains(&channel.as_str()) {
                return Err(invalid("channel", format!("must be one of {}", CHANNELS.join(", "))));
            }
            let subject = text(body, "subject", 1000, false)?;
            let tbody = text(body, "body", 100_000, true)?.expect("required");
            if let Some(s) = &subject {
                render::check(s).map_err(|e| invalid("subject", e))?;
            }
            render::check(&tbody).map_err(|e| invalid("body", e))?;
            vec![name.into(), channel.into(), subject.into(), tbody.into()]
        }
        Kind::Rules => {
            let event = text(body, "event", 200, true)?.expect("required");
            let template_id =
                body.get("template_id").and_then(Value::as_i64).ok_or_else(|| invalid("template_id", "must be an integer"))?;
            let channel = text(body, "channel", 20, true)?.expect("required");
            if !CHANNELS.contains(&channel.as_str()) {
                return Err(invalid("channel", format!("must be one of {}", CHANNELS.join(", "))));
            }
            let t = backend.query("SELECT channel FROM notify_templates WHERE id = $1", vec![template_id.into()]).await?;
            let Some(t) = t.first() else { return Err(invalid("template_id", format!("no template {template_id}"))) };
            if t.text(0) != Some(channel.as_str()) {
                return Err(invalid("channel", format!("the template is for {}, the rule for {channel}", t.text(0).unwrap_or_default())));
            }
            let recipient = text(body, "recipient", 2000, false)?;
            if let Some(r) = &recipient {
                render::check(r).map_err(|e| invalid("recipient", e))?;
                if matches!(channel.as_str(), "webhook" | "slack") && !r.contains("{{") {
                    outbound::validate_caller_url(r, policy).map_err(|e| invalid("recipient", e.to_string()))?;
                }
            }
            let conditions: Vec<Condition> = match body.get("conditions") {
                None | Some(Value::Null) => Vec::new(),
                Some(c) => {
                    serde_json::from_value(c.clone()).map_err(|e| invalid("conditions", format!("must be [{{path, op, value?}}]: {e}")))?
                }
            };
            for (i, c) in conditions.iter().enumerate() {
                if let Some(p) = c.problem() {
                    return Err(invalid(
                        &format!("conditions[{i}].{}", p.split(':').next().unwrap_or("")),
                        p.split_once(": ").map_or(p.clone(), |x| x.1.to_string()),
                    ));
                }
            }
            let active = match body.get("active") {
                None | Some(Value::Null) => true,
                Some(Value::Bool(b)) => *b,
                Some(_) => return Err(invalid("active", "must be true or false")),
            };
            let seconds = |v: Option<&Value>, field: &str, max: i64| -> Result<Option<i64>, ModelError> {
                match v {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => v
                        .as_i64()
                        .filter(|s| (0..=max).contains(s))
                        .map(Some)
                        .ok_or_else(|| invalid(field, format!("must be a whole number of seconds from 0 to {max}"))),
                }
            };
            let delay = seconds(body.get("delay"), "delay", 30 * 86_400)?;
            let (window, key) = match body.get("digest") {
                None | Some(Value::Null) => (None, None),
                Some(Value::Object(d)) => {
                    let w = seconds(d.get("window"), "digest.window", 7 * 86_400)?
                        .filter(|w| *w > 0)
                        .ok_or_else(|| invalid("digest.window", "is required: seconds from 1"))?;
                    let key = match d.get("key") {
                        None | Some(Value::Null) => None,
                        Some(Value::String(k)) => {
                            render::check(k).map_err(|e| invalid("digest.key", e))?;
                            Some(k.clone())
                        }
                        Some(_) => return Err(invalid("digest.key", "must be a template string")),
                    };
                    (Some(w), key)
                }
                Some(_) => return Err(invalid("digest", "must be {window, key?}")),
            };
            vec![
                event.into(),
                template_id.into(),
                channel.into(),
                recipient.into(),
                serde_json::to_string(&conditions).expect("conditions serialize").into(),
                (active as i64).into(),
                delay.into(),
                window.into(),
                key.into(),
            ]
        }
    };
    let table = kind.table();
    let names: Vec<&str> = kind.columns().split(", ").skip(1).filter(|c| *c != "created_at").collect();
    let webhook_rule = kind == Kind::Rules && body.get("channel").and_then(Value::as_str) == Some("webhook");
    let r = backend
        .transact(move |tx| {
            let mut secret = None;
            let id = match id {
                Some(id) => {
                    let set: Vec<String> = names.iter().enumerate().map(|(i, c)| format!("{c} = ${}", i + 2)).collect();
                    let mut p = vec![SqlValue::from(id)];
                    p.extend(values);
                    if tx.execute(&format!("UPDATE {table} SET {} WHERE id = $1", set.join(", ")), &p)? == 0 {
                        return Ok(None);
                    }
                    id
                }
                None => {
                    let id = next_id(tx, table.trim_start_matches("notify_"))?;
                    let marks: Vec<String> = (0..names.len()).map(|i| format!("${}", i + 2)).collect();
                    let mut p = vec![SqlValue::from(id)];
                    p.extend(values);
                    p.push(now_ms().into());
                    tx.execute(
                        &format!(
                            "INSERT INTO {table} (id, {}, created_at) VALUES ($1, {}, ${})",
                            names.join(", "),
                            marks.join(", "),
                            names.len() + 2
                        ),
                        &p,
                    )?;
                    if webhook_rule {
                        secret = Some(secrets::create_in(tx, Owner::Rule(id))?);
                    }
                    id
                }
            };
            Ok(Some((id, secret)))
        })
        .await;
    match r {
        Ok(Some((id, secret))) => {
            let mut row = get(backend, kind, id).await?;
            if let Some(s) = secret {
                row["secret"] = json!(s);
            }
            Ok(row)
        }
        Ok(None) => Err(ModelError::NotFound(format!("no {} {}", kind.noun(), id.unwrap_or_default()))),
        Err(BackendError::Unique(_)) => Err(ModelError::Conflict(format!("an {} with this name exists", kind.noun()))),
        Err(e) => Err(e.into()),
    }
}

pub async fn delete(backend: &dyn QueueBackend, kind: Kind, id: i64) -> Result<(), ModelError> {
    if kind == Kind::Templates {
        let used = backend.query("SELECT count(*) FROM notify_rules WHERE template_id = $1", vec![id.into()]).await?;
        if used.first().map_or(0, |r| r.int(0)) > 0 {
            return Err(ModelError::Conflict(format!("template {id} is used by a rule")));
        }
    }
    let table = kind.table();
    let n = backend
        .transact(move |tx| {
            if kind == Kind::Rules {
                secrets::delete_in(tx, Owner::Rule(id))?;
            }
            tx.execute(&format!("DELETE FROM {table} WHERE id = $1"), &[id.into()])
        })
        .await?;
    if n == 0 {
        return Err(ModelError::NotFound(format!("no {} {id}", kind.noun())));
    }
    Ok(())
}

/// Renders template `id` against `payload`: `{subject, body}` or the missing variable.
pub async fn preview(backend: &dyn QueueBackend, id: i64, payload: &Value) -> Result<Value, ModelError> {
    let t = get(backend, Kind::Templates, id).await?;
    if !payload.is_object() {
        return Err(invalid("payload", "must be a JSON object"));
    }
    let subject = match t["subject"].as_str() {
        Some(s) => Some(render::render(s, payload, false).map_err(|e| invalid("payload", e))?),
        None => None,
    };
    let body = render::render(t["body"].as_str().unwrap_or_default(), payload, false).map_err(|e| invalid("payload", e))?;
    Ok(json!({ "subject": subject, "body": body }))
}

// --- payload schemas -----------------------------------------------------------------------

/// Checks `value` against the parts of JSON Schema an event source uses: `type` (one or a
/// list), `required`, `properties`, `items`, `enum`, `minimum`/`maximum`, `minLength`/`maxLength`.
/// Returns the path and reason of the first violation.
pub fn validate(schema: &Value, value: &Value, path: &str) -> Result<(), (String, String)> {
    let fail = |reason: String| Err((path.to_string(), reason));
    if let Some(t) = schema.get("type") {
        let types: Vec<&str> = match t {
            Value::String(s) => vec![s.as_str()],
            Value::Array(a) => a.iter().filter_map(Value::as_str).collect(),
            _ => vec![],
        };
        let is = |t: &str| match t {
            "object" => value.is_object(),
            "array" => value.is_array(),
            "string" => value.is_string(),
            "integer" => value.as_i64().is_some() || value.as_u64().is_some(),
            "number" => value.is_number(),
            "boolean" => value.is_boolean(),
            "null" => value.is_null(),
            _ => true,
        };
        if !types.is_empty() && !types.iter().any(|t| is(t)) {
            return fail(format!("must be {}", types.join(" or ")));
        }
    }
    if let Some(Value::Array(options)) = schema.get("enum") {
        if !options.contains(value) {
            return fail(format!("must be one of {}", Value::Array(options.clone())));
        }
    }
    if let (Some(n), Some(min)) = (value.as_f64(), schema.get("minimum").and_then(Value::as_f64)) {
        if n < min {
            return fail(format!("must be at least {min}"));
        }
    }
    if let (Some(n), Some(max)) = (value.as_f64(), schema.get("maximum").and_then(Value::as_f64)) {
        if n > max {
            return fail(format!("must be at most {max}"));
        }
    }
    if let Some(s) = value.as_str() {
        let len = s.chars().count() as u64;
        if schema.get("minLength").and_then(Value::as_u64).is_some_and(|m| len < m) {
            return fail("is too short".into());
        }
        if schema.get("maxLength").and_then(Value::as_u64).is_some_and(|m| len > m) {
            return fail("is too long".into());
        }
    }
    if let Value::Object(obj) = value {
        if let Some(Value::Array(req)) = schema.get("required") {
            for k in req.iter().filter_map(Value::as_str) {
                if !obj.contains_key(k) {
                    return Err((format!("{path}.{k}"), "is required".into()));
                }
            }
        }
        if let Some(Value::Object(props)) = schema.get("properties") {
            for (k, s) in props {
                if let Some(v) = obj.get(k) {
                    validate(s, v, &format!("{path}.{k}"))?;
                }
            }
        }
    }
    if let (Value::Array(items), Some(s)) = (value, schema.get("items")) {
        for (i, v) in items.iter().enumerate() {
            validate(s, v, &format!("{path}[{i}]"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::validate;
    use serde_json::json;

    #[test]
    fn payload_schemas_name_the_failing_field() {
        let schema = json!({
            "type": "object", "required": ["order_id", "total"],
            "properties": {
                "order_id": {"type": "string", "minLength": 1},
                "total": {"type": "number", "minimum": 0},
                "items": {"type": "array", "items": {"type": "object", "required": ["sku"]}},
                "tier": {"enum": ["gold", "silver"]}
            }
        });
        assert!(validate(&schema, &json!({"order_id": "A1", "total": 3.5}), "payload").is_ok());
        assert_eq!(validate(&schema, &json!({"order_id": "A1"}), "payload").unwrap_err().0, "payload.total");
        assert_eq!(
            validate(&schema, &json!({"order_id": 5, "total": 1}), "payload").unwrap_err(),
            ("payload.order_id".into(), "must be string".into())
        );
        assert_eq!(validate(&schema, &json!({"order_id": "A", "total": -1}), "payload").unwrap_err().1, "must be at least 0");
        assert_eq!(
            validate(&schema, &json!({"order_id": "A", "total": 1, "items": [{}]}), "payload").unwrap_err().0,
            "payload.items[0].sku"
        );
        assert!(validate(&schema, &json!({"order_id": "A", "total": 1, "tier": "bronze"}), "payload").is_err());
    }
}
