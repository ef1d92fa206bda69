//! Sources, templates and rules: listed, read, saved (validated field by field, a rule's or a
//! webhook's secret created with it) and deleted; a template previewed.

use super::*;

/// The three configurable kinds of rows.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Kind {
    Sources,
    Templates,
    Rules,
}

impl Kind {
    pub(super) fn table(self) -> &'static str {
        match self {
            Kind::Sources => "notify_sources",
            Kind::Templates => "notify_templates",
            Kind::Rules => "notify_rules",
        }
    }

    pub(super) fn columns(self) -> &'static str {
        match self {
            Kind::Sources => "id, name, description, schema, created_at",
            Kind::Templates => "id, name, channel, subject, body, created_at",
            Kind::Rules => {
                "id, event, template_id, channel, recipient, conditions, active, delay_s, digest_window_s, digest_key, created_at"
            }
        }
    }

    pub(super) fn noun(self) -> &'static str {
        match self {
            Kind::Sources => "event source",
            Kind::Templates => "template",
            Kind::Rules => "rule",
        }
    }

    pub(super) fn to_json(self, r: &Row) -> Value {
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
