//! The notifications model as the API sees it: users, event sources, templates, rules,
//! preferences, the in-app inbox and the delivery logs. Every write validates its input and
//! names the field that is wrong.

mod definitions;
mod logs;
mod payload_schema;
mod users;

pub use definitions::*;
pub use logs::*;
pub use payload_schema::*;
pub use users::*;

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

// --- preferences ---------------------------------------------------------------------------

// --- inbox and logs ------------------------------------------------------------------------

// --- event sources, templates, rules -------------------------------------------------------

// --- payload schemas -----------------------------------------------------------------------

#[cfg(test)]
mod tests;
