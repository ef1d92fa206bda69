//! Users (with their addresses and webhook secret), their preferences and their in-app inbox.

use super::*;

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
pub(super) fn url(body: &Value, field: &str, policy: &Policy) -> Result<Option<String>, ModelError> {
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
