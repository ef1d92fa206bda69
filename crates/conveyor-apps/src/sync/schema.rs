//! The product sync's tables, in SQL both SQLite and PostgreSQL accept.

pub(crate) const MIGRATIONS: &[&str] = &[r#"
-- One row per run. Counts are written when the run finishes; while it runs they are computed
-- from sync_items.
CREATE TABLE sync_runs (
    id           TEXT PRIMARY KEY,
    scope        TEXT NOT NULL,
    status       TEXT NOT NULL,
    batch_id     TEXT NOT NULL,
    started_at   BIGINT NOT NULL,
    finished_at  BIGINT,
    pages        BIGINT NOT NULL DEFAULT 0,
    cursor       TEXT,
    error        TEXT,
    seen         BIGINT NOT NULL DEFAULT 0,
    changed      BIGINT NOT NULL DEFAULT 0,
    pushed       BIGINT NOT NULL DEFAULT 0,
    unchanged    BIGINT NOT NULL DEFAULT 0,
    failed       BIGINT NOT NULL DEFAULT 0
);
-- At most one running run: a second start joins it.
CREATE UNIQUE INDEX sync_runs_one_running ON sync_runs(status) WHERE status = 'running';
CREATE INDEX sync_runs_by_start ON sync_runs(started_at);
-- The source position every incremental run starts from: (updated_at, id) of the last product
-- read, advanced in the transaction that dispatches its page.
CREATE TABLE sync_cursor (
    name        TEXT PRIMARY KEY,
    since       TEXT NOT NULL,
    after_ms    BIGINT NOT NULL,
    after_id    TEXT NOT NULL,
    updated_at  BIGINT NOT NULL
);
-- What was last pushed, per product (a hash of its variants) and per variant and field.
CREATE TABLE sync_products (
    id          TEXT PRIMARY KEY,
    hash        TEXT NOT NULL,
    pushed_at   BIGINT NOT NULL
);
CREATE TABLE sync_variants (
    sku          TEXT PRIMARY KEY,
    product_id   TEXT NOT NULL,
    price_cents  BIGINT,
    stock        BIGINT,
    pushed_at    BIGINT NOT NULL
);
-- Every product a run saw, and what became of it: pending, unchanged, pushed or failed.
CREATE TABLE sync_items (
    run_id      TEXT NOT NULL,
    product_id  TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    changed     BIGINT NOT NULL,
    since       TEXT NOT NULL,
    updated_ms  BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    PRIMARY KEY (run_id, product_id)
);
-- Failures with their context and payload, until replayed successfully.
CREATE TABLE sync_failures (
    id           TEXT PRIMARY KEY,
    run_id       TEXT NOT NULL,
    stage        TEXT NOT NULL,
    product_id   TEXT,
    error        TEXT NOT NULL,
    payload      TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    retries      BIGINT NOT NULL DEFAULT 0,
    resolved_at  BIGINT
);
CREATE INDEX sync_failures_open ON sync_failures(resolved_at, created_at);
CREATE INDEX sync_failures_by_product ON sync_failures(product_id);
-- Every external request.
CREATE TABLE sync_requests (
    run_id       TEXT,
    partner      TEXT NOT NULL,
    method       TEXT NOT NULL,
    url          TEXT NOT NULL,
    status       BIGINT,
    duration_ms  BIGINT NOT NULL,
    error        TEXT,
    at           BIGINT NOT NULL
);
CREATE INDEX sync_requests_by_partner ON sync_requests(partner, at);
"#];
