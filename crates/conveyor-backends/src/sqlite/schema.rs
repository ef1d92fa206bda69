//! The SQLite schema, applied in order and recorded in `PRAGMA user_version`.
//!
//! Hot-path notes: `jobs` holds only live jobs (pending, delayed, reserved) and is keyed by the
//! time-ordered job id; three partial indexes serve the three questions the engine asks —
//! what is ready (`jobs_ready`), what is due (`jobs_delayed`), whose lease expired
//! (`jobs_leased`) — so none of them scans the backlog. Completed jobs leave the table.

use rusqlite::Connection;

use conveyor_core::metrics::BUCKETS;

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

-- The engine's own tables (conveyor-core reads and writes them through `Tx` in SQL that
-- PostgreSQL accepts too).
CREATE TABLE events (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    payload     TEXT NOT NULL,
    listeners   TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE INDEX events_by_time ON events(created_at);
CREATE INDEX events_by_name ON events(name, created_at);

CREATE TABLE batches (
    id              TEXT PRIMARY KEY,
    name            TEXT NOT NULL,
    total           BIGINT NOT NULL,
    pending         BIGINT NOT NULL,
    processed       BIGINT NOT NULL DEFAULT 0,
    failed          BIGINT NOT NULL DEFAULT 0,
    allow_failures  BIGINT NOT NULL DEFAULT 0,
    then_job        TEXT,
    catch_job       TEXT,
    finally_job     TEXT,
    created_at      BIGINT NOT NULL,
    cancelled_at    BIGINT,
    finished_at     BIGINT
);
CREATE INDEX batches_by_time ON batches(created_at);

CREATE TABLE workflows (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    status       TEXT NOT NULL,
    steps        BIGINT NOT NULL,
    plan_id      TEXT NOT NULL,
    input        TEXT,
    error        TEXT,
    created_at   BIGINT NOT NULL,
    finished_at  BIGINT
);
CREATE INDEX workflows_by_time ON workflows(created_at);

-- One row per workflow definition (content-addressed), shared by its workflows.
CREATE TABLE workflow_plans (
    id          TEXT PRIMARY KEY,
    plan        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);

-- Written as each step, compensation or rollback job is enqueued.
CREATE TABLE workflow_steps (
    workflow_id   TEXT NOT NULL,
    seq           BIGINT NOT NULL,
    name          TEXT NOT NULL,
    role          TEXT NOT NULL,
    step          BIGINT NOT NULL,
    status        TEXT NOT NULL,
    job_id        TEXT,
    attempts      BIGINT NOT NULL DEFAULT 0,
    started_at    BIGINT,
    finished_at   BIGINT,
    error         TEXT,
    PRIMARY KEY (workflow_id, seq)
);

CREATE TABLE cache (
    key         TEXT PRIMARY KEY,
    value       TEXT NOT NULL,
    expires_at  BIGINT
);

CREATE TABLE zsets (
    zset    TEXT NOT NULL,
    member  TEXT NOT NULL,
    score   DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (zset, member)
);
CREATE INDEX zsets_by_score ON zsets(zset, score DESC, member);

CREATE TABLE rate_limits (
    key  TEXT PRIMARY KEY,
    tat      BIGINT NOT NULL,
    allowed  BIGINT NOT NULL DEFAULT 1
);

CREATE TABLE breakers (
    name             TEXT PRIMARY KEY,
    state            TEXT NOT NULL,
    opened_at        BIGINT,
    probes           BIGINT NOT NULL DEFAULT 0,
    probe_successes  BIGINT NOT NULL DEFAULT 0,
    changed_at       BIGINT NOT NULL
);

CREATE TABLE breaker_calls (
    name       TEXT NOT NULL,
    bucket     BIGINT NOT NULL,
    successes  BIGINT NOT NULL DEFAULT 0,
    failures   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (name, bucket)
);

CREATE TABLE locks (
    key         TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    expires_at  BIGINT NOT NULL
);

CREATE TABLE app_migrations (
    app         TEXT NOT NULL,
    version     BIGINT NOT NULL,
    applied_at  BIGINT NOT NULL,
    PRIMARY KEY (app, version)
);

CREATE TABLE schedule_ticks (
    name      TEXT NOT NULL,
    tick      BIGINT NOT NULL,
    fired_at  BIGINT NOT NULL,
    job_id    TEXT,
    PRIMARY KEY (name, tick)
);
"#
    )]
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
