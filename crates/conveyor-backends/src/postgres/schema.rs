//! The PostgreSQL schema: the queue's tables (shaped for many concurrent transactions), then the
//! engine's tables from the same SQL text SQLite uses ([`ENGINE_TABLES`]). Versions are recorded
//! in `conveyor_schema`; a migration runs under an advisory lock, so processes starting together
//! apply it once.
//!
//! Differences from SQLite, all for concurrency: queue counters and metric buckets are split into
//! 16 shards (a connection writes its own shard; readers sum them), so concurrent
//! acknowledgements do not queue up behind one hot row; reservations use `FOR UPDATE SKIP LOCKED`.

use postgres::Client;

use conveyor_core::metrics::BUCKETS;

use crate::engine_schema::{ENGINE_MIGRATIONS, ENGINE_TABLES};

/// Every transaction's counter deltas go to one of this many rows per queue.
pub(crate) const SHARDS: i64 = 16;

/// Serializes migrations across processes (an arbitrary constant: "conveyor").
const MIGRATION_LOCK: i64 = 0x636f_6e76_6579_6f72;

fn migrations() -> Vec<String> {
    let hist_cols: String = (0..BUCKETS).map(|i| format!(", r{i} BIGINT NOT NULL DEFAULT 0, w{i} BIGINT NOT NULL DEFAULT 0")).collect();
    vec![format!(
        r#"
CREATE TABLE jobs (
    id            BYTEA PRIMARY KEY,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    state         BIGINT NOT NULL,          -- 0 pending, 1 reserved, 2 delayed
    priority      BIGINT NOT NULL DEFAULT 0,
    attempts      BIGINT NOT NULL DEFAULT 0,
    max_attempts  BIGINT NOT NULL,
    backoff       TEXT,
    timeout_ms    BIGINT,
    available_at  BIGINT NOT NULL,
    created_at    BIGINT NOT NULL,
    reserved_at   BIGINT,
    lease_until   BIGINT,
    lease_token   BIGINT,
    worker        TEXT,
    unique_key    TEXT,
    tags          TEXT,
    batch_id      TEXT,
    workflow      TEXT,
    last_error    TEXT
);
CREATE INDEX jobs_ready   ON jobs(queue, priority DESC, id) WHERE state = 0;
CREATE INDEX jobs_delayed ON jobs(available_at) WHERE state = 2;
CREATE INDEX jobs_leased  ON jobs(lease_until) WHERE state = 1;

CREATE TABLE queues (
    name    TEXT PRIMARY KEY,
    paused  BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE queue_counts (
    queue     TEXT NOT NULL,
    shard     BIGINT NOT NULL,
    pending   BIGINT NOT NULL DEFAULT 0,
    delayed   BIGINT NOT NULL DEFAULT 0,
    reserved  BIGINT NOT NULL DEFAULT 0,
    failed    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (queue, shard)
);

CREATE TABLE unique_locks (
    key         TEXT PRIMARY KEY,
    job_id      BYTEA NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE TABLE failed_jobs (
    id            BYTEA PRIMARY KEY,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    priority      BIGINT NOT NULL,
    attempts      BIGINT NOT NULL,
    max_attempts  BIGINT NOT NULL,
    backoff       TEXT,
    timeout_ms    BIGINT,
    unique_key    TEXT,
    tags          TEXT,
    batch_id      TEXT,
    workflow      TEXT,
    created_at    BIGINT NOT NULL,
    failed_at     BIGINT NOT NULL,
    runtime_ms    BIGINT NOT NULL,
    error         TEXT NOT NULL
);
CREATE INDEX failed_jobs_by_time ON failed_jobs(failed_at);
CREATE INDEX failed_jobs_by_batch ON failed_jobs(batch_id) WHERE batch_id IS NOT NULL;

CREATE TABLE completed_jobs (
    seq           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id            BYTEA NOT NULL,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    payload       TEXT NOT NULL,
    priority      BIGINT NOT NULL,
    attempts      BIGINT NOT NULL,
    max_attempts  BIGINT NOT NULL,
    tags          TEXT,
    batch_id      TEXT,
    created_at    BIGINT NOT NULL,
    reserved_at   BIGINT NOT NULL,
    finished_at   BIGINT NOT NULL,
    runtime_ms    BIGINT NOT NULL,
    wait_ms       BIGINT NOT NULL,
    worker        TEXT
);

CREATE TABLE job_metrics (
    minute        BIGINT NOT NULL,
    queue         TEXT NOT NULL,
    kind          TEXT NOT NULL,
    shard         BIGINT NOT NULL,
    completed     BIGINT NOT NULL DEFAULT 0,
    retried       BIGINT NOT NULL DEFAULT 0,
    failed        BIGINT NOT NULL DEFAULT 0,
    runtime_sum   BIGINT NOT NULL DEFAULT 0,
    runtime_max   BIGINT NOT NULL DEFAULT 0,
    wait_sum      BIGINT NOT NULL DEFAULT 0
    {hist_cols},
    PRIMARY KEY (minute, queue, kind, shard)
);

CREATE TABLE workers (
    id         TEXT PRIMARY KEY,
    last_seen  BIGINT NOT NULL,
    info       TEXT NOT NULL
);
{ENGINE_TABLES}"#
    )]
    .into_iter()
    .chain(ENGINE_MIGRATIONS.iter().map(|m| m.to_string()))
    .collect()
}

/// Brings the schema up to date; returns the versions applied.
pub(crate) fn migrate(client: &mut Client) -> Result<Vec<u32>, postgres::Error> {
    let mut tx = client.transaction()?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
    tx.batch_execute("CREATE TABLE IF NOT EXISTS conveyor_schema (version BIGINT NOT NULL)")?;
    tx.commit()?;
    let mut applied = Vec::new();
    for (i, sql) in migrations().iter().enumerate() {
        let mut tx = client.transaction()?;
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
        let current: i64 = tx.query_one("SELECT coalesce(max(version), 0) FROM conveyor_schema", &[])?.get(0);
        if current as usize > i {
            continue;
        }
        tx.batch_execute(sql)?;
        tx.execute("INSERT INTO conveyor_schema (version) VALUES ($1)", &[&(i as i64 + 1)])?;
        tx.commit()?;
        applied.push(i as u32 + 1);
    }
    Ok(applied)
}

pub(crate) fn latest_version() -> u32 {
    migrations().len() as u32
}

/// Takes the migration lock inside the current transaction (application migrations use it too).
pub(crate) const LOCK_SQL: &str = "SELECT pg_advisory_xact_lock(7165066986957401970)";

#[cfg(test)]
mod tests {
    #[test]
    fn lock_sql_names_the_migration_lock() {
        assert!(super::LOCK_SQL.contains(&super::MIGRATION_LOCK.to_string()));
    }
}
