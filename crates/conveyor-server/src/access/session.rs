//! Dashboard sessions: a random id in an HTTP-only cookie, its SHA-256 and role in the store's
//! `dashboard_sessions` (so any `serve` of a cluster accepts it, and a read of the table opens no
//! session).

use axum::http::{header, HeaderMap};

use conveyor_core::backend::{QueueBackend, RowExt};
use conveyor_core::clock::now_ms;

use super::Role;
use crate::error::ApiError;
use crate::AppState;

pub(crate) const SESSION_COOKIE: &str = "conveyor_session";

/// The server's own tables (an application migration named `server`).
pub(crate) const MIGRATIONS: &[&str] = &[r#"
CREATE TABLE dashboard_sessions (
    id_hash     TEXT PRIMARY KEY,
    role        TEXT NOT NULL,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT NOT NULL
);
CREATE INDEX dashboard_sessions_by_expiry ON dashboard_sessions(expires_at);
"#];

pub(super) fn session_cookie(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == SESSION_COOKIE)
        .map(|(_, v)| v.to_string())
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The store keeps a hash of the session id, so a read of the table opens no session.
fn session_hash(id: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(id.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

pub(super) async fn session_role(backend: &dyn QueueBackend, id: &str) -> Option<Role> {
    let rows = backend
        .query("SELECT role FROM dashboard_sessions WHERE id_hash = $1 AND expires_at > $2", vec![session_hash(id).into(), now_ms().into()])
        .await
        .map_err(|e| tracing::warn!(error = %e, "dashboard session lookup failed"))
        .ok()?;
    rows.first().and_then(|r| r.text(0)).and_then(Role::parse)
}

/// Opens a session for `role` and returns the cookie that carries it.
pub(crate) async fn open_session(s: &AppState, role: Role) -> Result<String, ApiError> {
    use rand::RngCore;
    let mut raw = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut raw);
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let (hash, now, ttl) = (session_hash(&id), now_ms(), s.access.session_ttl);
    let expires = now + ttl.as_millis() as i64;
    conveyor_core::QueueBackendExt::transact(s.conveyor.backend().as_ref(), move |tx| {
        tx.execute("DELETE FROM dashboard_sessions WHERE expires_at <= $1", &[now.into()])?;
        tx.execute(
            "INSERT INTO dashboard_sessions (id_hash, role, created_at, expires_at) VALUES ($1, $2, $3, $4)",
            &[hash.into(), role.as_str().into(), now.into(), expires.into()],
        )?;
        Ok(())
    })
    .await?;
    Ok(format!("{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}", ttl.as_secs()))
}

/// Ends the request's session (if any) and returns the cookie that clears it.
pub(crate) async fn close_session(s: &AppState, headers: &HeaderMap) -> String {
    if let Some(id) = session_cookie(headers) {
        let hash = session_hash(&id);
        let r = conveyor_core::QueueBackendExt::transact(s.conveyor.backend().as_ref(), move |tx| {
            tx.execute("DELETE FROM dashboard_sessions WHERE id_hash = $1", &[hash.into()])
        })
        .await;
        if let Err(e) = r {
            tracing::warn!(error = %e, "could not end a dashboard session");
        }
    }
    format!("{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0")
}
