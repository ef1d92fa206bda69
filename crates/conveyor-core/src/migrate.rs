//! Schema migrations of the applications built on the engine. Each application names its
//! migrations in order; each one runs in its own transaction together with the row that records
//! it, so a migration is applied exactly once even when several processes start together.

use crate::backend::{QueueBackend, QueueBackendExt, Result, RowExt};
use crate::clock::now_ms;

/// Applies `app`'s migrations not yet applied (version = position from 1); returns those run.
/// The SQL must be portable between SQLite and PostgreSQL (BIGINT, TEXT, DOUBLE PRECISION…).
pub async fn apply(backend: &dyn QueueBackend, app: &str, migrations: &[&'static str]) -> Result<Vec<u32>> {
    let mut applied = Vec::new();
    for (i, sql) in migrations.iter().enumerate() {
        let version = i as i64 + 1;
        let (app_name, sql) = (app.to_string(), *sql);
        let ran = backend
            .transact(move |tx| {
                tx.serialize_migrations()?;
                let done =
                    tx.query("SELECT 1 FROM app_migrations WHERE app = $1 AND version = $2", &[app_name.clone().into(), version.into()])?;
                if !done.is_empty() {
                    return Ok(false);
                }
                tx.execute_script(sql)?;
                tx.execute(
                    "INSERT INTO app_migrations (app, version, applied_at) VALUES ($1, $2, $3)",
                    &[app_name.into(), version.into(), now_ms().into()],
                )?;
                Ok(true)
            })
            .await?;
        if ran {
            tracing::info!(app, version, "migration applied");
            applied.push(version as u32);
        }
    }
    Ok(applied)
}

/// The highest applied version of `app`'s migrations (0 when none).
pub async fn version(backend: &dyn QueueBackend, app: &str) -> Result<u32> {
    let rows = backend.query("SELECT max(version) FROM app_migrations WHERE app = $1", vec![app.into()]).await?;
    Ok(rows.first().and_then(|r| r.opt_int(0)).unwrap_or(0) as u32)
}
