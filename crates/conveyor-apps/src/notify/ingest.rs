//! Taking an event in over the API: validated against its source's schema, logged once per
//! idempotency key, and handed to the listener in the same transaction.

use super::*;

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

pub(super) fn invalid(field: &str, reason: impl Into<String>) -> IngestError {
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
