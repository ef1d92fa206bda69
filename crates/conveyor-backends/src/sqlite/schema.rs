//! The SQLite schema, applied in order and recorded in `PRAGMA user_version`.
//!
//! Hot-path notes: `jobs` holds only live jobs (pending, delayed, reserved) and is keyed by the
//! time-ordered job id; three partial indexes serve the three questions the engine asks —
//! what is ready (`jobs_ready`), what is due (`jobs_delayed`), whose lease expired
//! (`jobs_leased`) — so none of them scans the backlog. Completed jobs leave the table.

use rusqlite::Connection;

use conveyor_core::metrics::BUCKETS;

use crate::engine_schema::{ENGINE_MIGRATIONS, ENGINE_TABLES};

/// Migration `i` brings the schema from version `i` to `i + 1`.
fn migrations() -> Vec<String> {
    let hist_cols: String = (0..BUCKETS).map(|i| format!(", r{i} INTEGER NOT NULL DEFAULT 0, w{i} INTEGER NOT NULL DEFAULT 0")).collect();
    vec![format!(
        r#"
CREATE TABLE jobs (
    id            BLOB PRIMARY KEY,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    state         INTEGER NOT NULL,          -- 0 pending, 1 reserved, 2 delayed
    priority      INTEGER NOT NULL DEFAULT 0,
    attempts      INTEGER NOT NULL DEFAULT 0,
    max_attempts  INTEGER NOT NULL,
    backoff       TEXT,
    timeout_ms    INTEGER,
    available_at  INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    reserved_at   INTEGER,
    lease_until   INTEGER,
    lease_token   INTEGER,
    worker        TEXT,
    unique_key    TEXT,
    tags          TEXT,
    batch_id      TEXT,
    workflow      TEXT,
    last_error    TEXT
) WITHOUT ROWID;
CREATE INDEX jobs_ready   ON jobs(queue, priority DESC, id) WHERE state = 0;
CREATE INDEX jobs_delayed ON jobs(available_at) WHERE state = 2;
CREATE INDEX jobs_leased  ON jobs(lease_until) WHERE state = 1;

-- Counters kept exact by every transaction that moves a job, so listing queues reads a few rows.
CREATE TABLE queues (
    name      TEXT PRIMARY KEY,
    paused    INTEGER NOT NULL DEFAULT 0,
    pending   INTEGER NOT NULL DEFAULT 0,
    delayed   INTEGER NOT NULL DEFAULT 0,
    reserved  INTEGER NOT NULL DEFAULT 0,
    failed    INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE unique_locks (
    key         TEXT PRIMARY KEY,
    job_id      BLOB NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE failed_jobs (
    id            BLOB PRIMARY KEY,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    attempts      INTEGER NOT NULL,
    max_attempts  INTEGER NOT NULL,
    backoff       TEXT,
    timeout_ms    INTEGER,
    unique_key    TEXT,
    tags          TEXT,
    batch_id      TEXT,
    workflow      TEXT,
    created_at    INTEGER NOT NULL,
    failed_at     INTEGER NOT NULL,
    runtime_ms    INTEGER NOT NULL,
    error         TEXT NOT NULL
);
CREATE INDEX failed_jobs_by_time ON failed_jobs(failed_at);

-- A bounded history of completed jobs for the dashboard (trimmed by sequence).
CREATE TABLE completed_jobs (
    seq           INTEGER PRIMARY KEY,
    id            BLOB NOT NULL,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    priority      INTEGER NOT NULL,
    attempts      INTEGER NOT NULL,
    max_attempts  INTEGER NOT NULL,
    tags          TEXT,
    batch_id      TEXT,
    created_at    INTEGER NOT NULL,
    reserved_at   INTEGER NOT NULL,
    finished_at   INTEGER NOT NULL,
    runtime_ms    INTEGER NOT NULL,
    wait_ms       INTEGER NOT NULL,
    worker        TEXT
);

CREATE TABLE job_metrics (
    minute        INTEGER NOT NULL,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    completed     INTEGER NOT NULL DEFAULT 0,
    retried       INTEGER NOT NULL DEFAULT 0,
    failed        INTEGER NOT NULL DEFAULT 0,
    runtime_sum   INTEGER NOT NULL DEFAULT 0,
    runtime_max   INTEGER NOT NULL DEFAULT 0,
    wait_sum      INTEGER NOT NULL DEFAULT 0
    {hist_cols},
    PRIMARY KEY (minute, queue, kind)
) WITHOUT ROWID;

CREATE TABLE workers (
    id         TEXT PRIMARY KEY,
    last_seen  INTEGER NOT NULL,
    info       TEXT NOT NULL
);

CREATE INDEX failed_jobs_by_batch ON failed_jobs(batch_id) WHERE batch_id IS NOT NULL;

{ENGINE_TABLES}"#
    )]
    .into_iter()
    .chain(ENGINE_MIGRATIONS.iter().map(|m| m.to_string()))
    .collect()
}

/// Brings the schema up to date; returns the versions applied.
pub(crate) fn migrate(conn: &mut Connection) -> rusqlite::Result<Vec<u32>> {
    let current: u32 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let mut applied = Vec::new();
    for (i, sql) in migrations().iter().enumerate().skip(current as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while this one waited for the write lock.
        let now: u32 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now as usize > i {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as u32)?;
        tx.commit()?;
        applied.push(i as u32 + 1);
    }
    Ok(applied)
}

pub(crate) fn latest_version() -> u32 {
    migrations().len() as u32
}
