//! The engine's own tables (events, batches, workflows, cache, sorted sets, rate limits,
//! breakers, locks, application migrations, schedule ticks): one SQL text that SQLite and
//! PostgreSQL both accept, so the relational backends cannot drift apart. `conveyor-core`
//! reads and writes them through `Tx` in SQL both accept too.

pub(crate) const ENGINE_TABLES: &str = r#"
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
"#;

/// Later versions of the engine's tables, after [`ENGINE_TABLES`] (version 1 of each relational
/// backend's schema): each entry is one version, the same SQL text on SQLite and PostgreSQL.
pub(crate) const ENGINE_MIGRATIONS: &[&str] = &[
    // 2: batches that stay open until committed (`holds`: 1 while open, counted in `total` and
    // `pending` so that the batch cannot finish), and child batches (`parent_id`: a child is
    // one member of its parent, finished when the child finishes).
    "ALTER TABLE batches ADD COLUMN holds BIGINT NOT NULL DEFAULT 0;
     ALTER TABLE batches ADD COLUMN parent_id TEXT;",
    // 3: a workflow step that ended in a business failure (a declined payment): its job
    // completed, the workflow takes the failure path with this reason.
    "ALTER TABLE workflow_steps ADD COLUMN declined TEXT;",
    // 4: the latest clock reading a rate limit's key has seen, so that its clock never runs
    // back (callers read their clocks before they reach the key, in any order).
    "ALTER TABLE rate_limits ADD COLUMN seen BIGINT NOT NULL DEFAULT 0;",
    // 5: per-key concurrency (`conveyor_core::flow`): a row per busy key (its limit; the row
    // every step of the key locks first), the slots held by running jobs, the parked jobs in
    // line for a slot.
    "CREATE TABLE concurrency_keys (
         key  TEXT PRIMARY KEY,
         lim  BIGINT NOT NULL
     );
     CREATE TABLE concurrency_slots (
         key         TEXT NOT NULL,
         job_id      TEXT NOT NULL,
         expires_at  BIGINT NOT NULL,
         PRIMARY KEY (key, job_id)
     );
     CREATE TABLE concurrency_waiters (
         key     TEXT NOT NULL,
         job_id  TEXT NOT NULL,
         since   BIGINT NOT NULL,
         PRIMARY KEY (key, job_id)
     );
     CREATE INDEX concurrency_waiters_in_line ON concurrency_waiters(key, since, job_id);",
    // 6: fair queueing (`conveyor_core::fair`): each ready job's turn (0 without a fairness
    // key), served by (priority, turn, id) — the queue table's change, the same on both
    // backends — and each key's last turn per queue and priority.
    "ALTER TABLE jobs ADD COLUMN fair BIGINT NOT NULL DEFAULT 0;
     DROP INDEX jobs_ready;
     CREATE INDEX jobs_ready ON jobs(queue, priority DESC, fair, id) WHERE state = 0;
     CREATE TABLE fair_keys (
         queue     TEXT NOT NULL,
         priority  BIGINT NOT NULL,
         key       TEXT NOT NULL,
         last      BIGINT NOT NULL,
         PRIMARY KEY (queue, priority, key)
     );
     CREATE INDEX fair_keys_by_turn ON fair_keys(queue, priority, last);",
];
