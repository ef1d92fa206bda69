//! The notifications tables, in SQL both SQLite and PostgreSQL accept, and the default
//! templates and rules (`user_registered` → a welcome email and an in-app message).

pub(crate) const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE notify_ids (
    name   TEXT PRIMARY KEY,
    value  BIGINT NOT NULL
);
CREATE TABLE users (
    id             BIGINT PRIMARY KEY,
    name           TEXT NOT NULL,
    email          TEXT NOT NULL,
    phone          TEXT,
    slack_webhook  TEXT,
    webhook_url    TEXT,
    created_at     BIGINT NOT NULL
);
CREATE UNIQUE INDEX users_by_email ON users(email);
CREATE TABLE notify_sources (
    id           BIGINT PRIMARY KEY,
    name         TEXT NOT NULL,
    description  TEXT,
    schema       TEXT,
    created_at   BIGINT NOT NULL
);
CREATE UNIQUE INDEX notify_sources_by_name ON notify_sources(name);
CREATE TABLE notify_templates (
    id          BIGINT PRIMARY KEY,
    name        TEXT NOT NULL,
    channel     TEXT NOT NULL,
    subject     TEXT,
    body        TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
CREATE TABLE notify_rules (
    id           BIGINT PRIMARY KEY,
    event        TEXT NOT NULL,
    template_id  BIGINT NOT NULL,
    channel      TEXT NOT NULL,
    recipient    TEXT,
    conditions   TEXT NOT NULL,
    active       BIGINT NOT NULL,
    created_at   BIGINT NOT NULL
);
CREATE INDEX notify_rules_by_event ON notify_rules(event, active);
-- An idempotency key claimed by the first event that carried it.
CREATE TABLE notify_event_keys (
    key         TEXT PRIMARY KEY,
    event_id    TEXT NOT NULL,
    created_at  BIGINT NOT NULL
);
-- Per user: a channel on or off (event = ''), or a channel for one event.
CREATE TABLE notify_preferences (
    user_id  BIGINT NOT NULL,
    event    TEXT NOT NULL,
    channel  TEXT NOT NULL,
    enabled  BIGINT NOT NULL,
    PRIMARY KEY (user_id, event, channel)
);
CREATE TABLE notify_logs (
    id           TEXT PRIMARY KEY,
    event        TEXT NOT NULL,
    event_id     TEXT NOT NULL,
    rule_id      BIGINT,
    user_id      BIGINT,
    channel      TEXT NOT NULL,
    recipient    TEXT NOT NULL,
    status       TEXT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    error        TEXT,
    provider_id  TEXT,
    subject      TEXT,
    body         TEXT,
    created_at   BIGINT NOT NULL,
    sent_at      BIGINT
);
CREATE INDEX notify_logs_by_time ON notify_logs(created_at);
CREATE INDEX notify_logs_by_user ON notify_logs(user_id, created_at);
CREATE INDEX notify_logs_by_event ON notify_logs(event_id);
CREATE TABLE notify_inbox (
    id          TEXT PRIMARY KEY,
    user_id     BIGINT NOT NULL,
    log_id      TEXT NOT NULL,
    title       TEXT NOT NULL,
    body        TEXT NOT NULL,
    read_at     BIGINT,
    created_at  BIGINT NOT NULL
);
CREATE UNIQUE INDEX notify_inbox_by_log ON notify_inbox(log_id);
CREATE INDEX notify_inbox_by_user ON notify_inbox(user_id, created_at);
CREATE TABLE notify_settings (
    key    TEXT PRIMARY KEY,
    value  TEXT NOT NULL
);
"#,
    r#"
INSERT INTO notify_templates (id, name, channel, subject, body, created_at) VALUES
  (1, 'welcome-email', 'email', 'Welcome, {{ name }}!', 'Hi {{ name }},

welcome aboard. Your account ({{ email }}) is ready.', 0),
  (2, 'welcome-inbox', 'database', 'Welcome, {{ name }}!', 'Your account is ready. Have a look around.', 0);
INSERT INTO notify_rules (id, event, template_id, channel, recipient, conditions, active, created_at) VALUES
  (1, 'user_registered', 1, 'email', NULL, '[]', 1, 0),
  (2, 'user_registered', 2, 'database', NULL, '[]', 1, 0);
INSERT INTO notify_sources (id, name, description, schema, created_at) VALUES
  (1, 'user_registered', 'A user signed up (POST /api/v1/users/register)', NULL, 0);
INSERT INTO notify_ids (name, value) VALUES ('templates', 2), ('rules', 2), ('sources', 1);
"#,
    r#"
ALTER TABLE notify_rules ADD COLUMN delay_s BIGINT;
ALTER TABLE notify_rules ADD COLUMN digest_window_s BIGINT;
ALTER TABLE notify_rules ADD COLUMN digest_key TEXT;
ALTER TABLE users ADD COLUMN timezone TEXT;
ALTER TABLE users ADD COLUMN quiet_start TEXT;
ALTER TABLE users ADD COLUMN quiet_end TEXT;
-- One open digest per (rule, recipient, key); events are JSON lines.
CREATE TABLE notify_digests (
    id          TEXT PRIMARY KEY,
    rule_id     BIGINT NOT NULL,
    recipient   TEXT NOT NULL,
    user_id     BIGINT,
    digest_key  TEXT NOT NULL,
    status      TEXT NOT NULL,
    events      TEXT NOT NULL,
    count       BIGINT NOT NULL,
    first_event TEXT NOT NULL,
    opened_at   BIGINT NOT NULL,
    closes_at   BIGINT NOT NULL
);
CREATE UNIQUE INDEX notify_digests_open ON notify_digests(rule_id, recipient, digest_key) WHERE status = 'open';
"#,
    r#"
-- Webhook signing secrets per destination owner ('rule:<id>', 'user:<id>'): the current one
-- (expires_at NULL) and rotated-out ones until they expire. secret NULL stands for the legacy
-- CONVEYOR_WEBHOOK_SECRET, kept valid for a while when an owner that had no secret rotates.
CREATE TABLE IF NOT EXISTS notify_secrets (
    id          TEXT PRIMARY KEY,
    owner       TEXT NOT NULL,
    secret      TEXT,
    created_at  BIGINT NOT NULL,
    expires_at  BIGINT
);
CREATE INDEX IF NOT EXISTS notify_secrets_by_owner ON notify_secrets(owner, created_at);
"#,
];
