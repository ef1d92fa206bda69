//! SQLite as a dialect of the relational queue core (`crate::relational`): the writer's group
//! transaction (`WriteCtx`) runs the core's statements, one cached statement per row where
//! PostgreSQL sends arrays (in-process, a row costs no round trip).

use super::storage_err;
use super::tx::SqliteTx;
use super::writer::*;
use crate::relational::{Dialect, Expired, JobColumns, Lease, NewRow};
use conveyor_core::backend::{Result, Tx};
use conveyor_core::job::{Completion, Job, JobId};
use rusqlite::{params, OptionalExtension};

/// History rows written between two trims.
const TRIM_EVERY: usize = 256;

impl Dialect for WriteCtx {
    fn count(&mut self, queue: &str, state: usize, delta: i64) {
        if let Some(c) = self.op_counts.get_mut(queue) {
            c[state] += delta;
        } else {
            let mut c = [0i64; 4];
            c[state] = delta;
            self.op_counts.insert(queue.to_string(), c);
        }
    }

    fn ready(&mut self, id: JobId, queue: &str, priority: i32) {
        if self.dispatch.get().is_some() {
            self.op_ready.push(conveyor_core::backend::ReadyJob { id, queue: queue.to_string(), priority });
        }
    }

    fn record(&mut self, minute: i64, c: Completion) {
        // Kept with the operation: a savepoint rolled back discards it (`discard_op`).
        self.op_metrics.push((minute, c));
    }

    fn with_tx<R>(&mut self, f: impl FnOnce(&mut dyn Tx) -> R) -> R {
        f(&mut SqliteTx { ctx: self })
    }

    fn take_unique(&mut self, key: &str, id: JobId, until: i64, now: i64) -> Result<Option<JobId>> {
        let held: Option<(Vec<u8>, i64)> = self
            .conn
            .prepare_cached("SELECT job_id, expires_at FROM unique_locks WHERE key = ?1")
            .and_then(|mut s| s.query_row([key], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(storage_err)?;
        if let Some((holder, expires_at)) = held {
            if expires_at > now {
                return Ok(Some(JobId::from_slice(&holder).unwrap_or(id)));
            }
        }
        self.conn
            .prepare_cached("INSERT OR REPLACE INTO unique_locks (key, job_id, expires_at) VALUES (?1, ?2, ?3)")
            .and_then(|mut s| s.execute(params![key, &id.as_bytes()[..], until]))
            .map_err(storage_err)?;
        Ok(None)
    }

    fn insert_jobs(&mut self, rows: Vec<NewRow>, now: i64) -> Result<()> {
        let mut insert = self
            .conn
            .prepare_cached(
                "INSERT INTO jobs (id, queue, kind, payload, state, priority, max_attempts, backoff, timeout_ms,
                                   available_at, created_at, unique_key, tags, batch_id, workflow, fair)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )
            .map_err(storage_err)?;
        for r in rows {
            insert
                .execute(params![
                    &r.id.as_bytes()[..],
                    r.queue,
                    r.kind,
                    r.payload,
                    r.state as i64,
                    r.priority,
                    r.max_attempts,
                    r.backoff,
                    r.timeout_ms,
                    r.available_at,
                    now,
                    r.unique_key,
                    r.tags,
                    r.batch_id,
                    r.workflow,
                    r.fair,
                ])
                .map_err(storage_err)?;
        }
        Ok(())
    }

    fn promote(&mut self, now: i64) -> Result<Vec<(String, Vec<u8>, i32)>> {
        self.conn
            .prepare_cached(
                "UPDATE jobs SET state = 0 WHERE id IN
                   (SELECT id FROM jobs WHERE state = 2 AND available_at <= ?1 ORDER BY available_at LIMIT 1000)
                 RETURNING queue, id, priority",
            )
            .and_then(|mut s| s.query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
            .map_err(storage_err)
    }

    fn paused(&mut self) -> Result<Vec<String>> {
        self.conn
            .prepare_cached("SELECT name FROM queues WHERE paused = 1")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(storage_err)
    }

    fn claim_rows(&mut self, ids: &[JobId], lease: &Lease<'_>) -> Result<Vec<Job>> {
        let sql = format!(
            "UPDATE jobs SET state = 1, attempts = attempts + 1, reserved_at = ?1, lease_until = ?2, lease_token = ?3, worker = ?4
             WHERE id = ?5 AND state = 0 AND queue NOT IN (SELECT name FROM queues WHERE paused = 1)
             RETURNING {JOB_COLS}"
        );
        let mut st = self.conn.prepare_cached(&sql).map_err(storage_err)?;
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            let hit = st
                .query_row(params![lease.now, lease.until, lease.token, lease.worker, &id.as_bytes()[..]], job_from_row)
                .optional()
                .map_err(storage_err)?;
            jobs.extend(hit);
        }
        Ok(jobs)
    }

    fn reserve_rows(&mut self, queue: &str, want: i64, lease: &Lease<'_>) -> Result<Vec<(Job, i64)>> {
        let sql = format!(
            "UPDATE jobs SET state = 1, attempts = attempts + 1, reserved_at = ?1, lease_until = ?2, lease_token = ?3, worker = ?4
             WHERE id IN (SELECT id FROM jobs WHERE queue = ?5 AND state = 0 ORDER BY priority DESC, fair, id LIMIT ?6)
             RETURNING {JOB_COLS}, fair"
        );
        self.conn
            .prepare_cached(&sql)
            .and_then(|mut s| {
                s.query_map(params![lease.now, lease.until, lease.token, lease.worker, queue, want], |r| {
                    Ok((job_from_row(r)?, r.get(17)?))
                })?
                .collect()
            })
            .map_err(storage_err)
    }

    /// Copies the job into the bounded history inside SQLite (no row travels through Rust on
    /// this hot path), then deletes it.
    fn delete_completed(&mut self, c: &Completion, now: i64) -> Result<bool> {
        let (id, token) = (&c.id.as_bytes()[..], c.lease_token);
        if self.history == 0 {
            let n = self
                .conn
                .prepare_cached("DELETE FROM jobs WHERE id = ?1 AND state = 1 AND lease_token = ?2")
                .and_then(|mut s| s.execute(params![id, token]))
                .map_err(storage_err)?;
            return Ok(n == 1);
        }
        let copied = self
            .conn
            .prepare_cached(
                "INSERT INTO completed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                                             created_at, reserved_at, finished_at, runtime_ms, wait_ms, worker)
                 SELECT id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                        created_at, reserved_at, ?3, ?4, ?5, worker
                 FROM jobs WHERE id = ?1 AND state = 1 AND lease_token = ?2",
            )
            .and_then(|mut s| s.execute(params![id, token, now, c.runtime_ms as i64, c.wait_ms as i64]))
            .map_err(storage_err)?;
        if copied == 0 {
            return Ok(false);
        }
        self.history_inserts += 1;
        self.conn.prepare_cached("DELETE FROM jobs WHERE id = ?1").and_then(|mut s| s.execute([id])).map_err(storage_err)?;
        Ok(true)
    }

    fn fail_reserved(&mut self, c: &Completion, error: &str, now: i64) -> Result<Option<(String, Option<String>)>> {
        let id = &c.id.as_bytes()[..];
        let Some(row) = self.take_reserved(id, c.lease_token)? else { return Ok(None) };
        self.insert_failed(id, &row, error, now, c.runtime_ms)?;
        Ok(Some((row.queue, row.unique_key)))
    }

    fn requeue_row(&mut self, id: &[u8], token: i64, state: usize, at: i64, give_back: i64, error: Option<&str>) -> Result<Option<i32>> {
        self.conn
            .prepare_cached(
                "UPDATE jobs SET state = ?1, available_at = ?2, attempts = attempts - ?3, last_error = coalesce(?4, last_error),
                                 lease_until = NULL, lease_token = NULL, worker = NULL
                 WHERE id = ?5 AND state = 1 AND lease_token = ?6
                 RETURNING priority",
            )
            .and_then(|mut s| s.query_row(params![state as i64, at, give_back, error, id, token], |r| r.get(0)).optional())
            .map_err(storage_err)
    }

    fn release_unique(&mut self, key: Option<&str>, id: &[u8]) -> Result<()> {
        if let Some(key) = key {
            self.conn
                .prepare_cached("DELETE FROM unique_locks WHERE key = ?1 AND job_id = ?2")
                .and_then(|mut s| s.execute(params![key, id]))
                .map_err(storage_err)?;
        }
        Ok(())
    }

    /// Trims the completed history to its bound every `TRIM_EVERY` rows written.
    fn outcomes_done(&mut self) -> Result<()> {
        if self.history_inserts < TRIM_EVERY {
            return Ok(());
        }
        self.history_inserts = 0;
        self.conn
            .prepare_cached("DELETE FROM completed_jobs WHERE seq <= (SELECT max(seq) FROM completed_jobs) - ?1")
            .and_then(|mut s| s.execute([self.history as i64]))
            .map_err(storage_err)?;
        Ok(())
    }

    fn lock_held(&mut self, leases: &[(JobId, i64)]) -> Result<Vec<bool>> {
        // One writer: nothing else changes the rows before this transaction commits.
        let mut st =
            self.conn.prepare_cached("SELECT 1 FROM jobs WHERE id = ?1 AND state = 1 AND lease_token = ?2").map_err(storage_err)?;
        leases.iter().map(|(id, token)| st.exists(params![&id.as_bytes()[..], token]).map_err(storage_err)).collect()
    }

    fn extend_rows(&mut self, leases: &[(JobId, i64)], until: i64) -> Result<()> {
        let mut st = self
            .conn
            .prepare_cached("UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND state = 1 AND lease_token = ?3")
            .map_err(storage_err)?;
        for (id, token) in leases {
            st.execute(params![until, &id.as_bytes()[..], token]).map_err(storage_err)?;
        }
        Ok(())
    }

    fn expire_rows_of(&mut self, holders: &[String]) -> Result<u64> {
        let mut st = self.conn.prepare_cached("UPDATE jobs SET lease_until = 0 WHERE state = 1 AND worker = ?1").map_err(storage_err)?;
        let mut n = 0;
        for h in holders {
            n += st.execute([h]).map_err(storage_err)? as u64;
        }
        Ok(n)
    }

    fn expired(&mut self, now: i64) -> Result<Vec<Expired>> {
        self.conn
            .prepare_cached(
                "SELECT id, attempts, max_attempts, queue, lease_token, kind, unique_key, batch_id, workflow,
                        available_at, reserved_at
                 FROM jobs WHERE state = 1 AND lease_until < ?1 ORDER BY lease_until LIMIT 1000",
            )
            .and_then(|mut s| {
                s.query_map([now], |r| {
                    Ok(Expired {
                        id: r.get(0)?,
                        attempts: r.get(1)?,
                        max_attempts: r.get(2)?,
                        queue: r.get(3)?,
                        lease_token: r.get(4)?,
                        kind: r.get(5)?,
                        unique_key: r.get(6)?,
                        batch_id: r.get(7)?,
                        workflow: r.get(8)?,
                        available_at: r.get(9)?,
                        reserved_at: r.get(10)?,
                    })
                })?
                .collect()
            })
            .map_err(storage_err)
    }
}

impl WriteCtx {
    /// Deletes a reserved job if `token` still holds it, returning the row.
    fn take_reserved(&mut self, id: &[u8], token: i64) -> Result<Option<JobRow>> {
        self.conn
            .prepare_cached(
                "DELETE FROM jobs WHERE id = ?1 AND state = 1 AND lease_token = ?2
                 RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                           batch_id, created_at, workflow",
            )
            .and_then(|mut s| s.query_row(params![id, token], JobRow::from_row).optional())
            .map_err(storage_err)
    }

    /// Writes (or overwrites) a job's row in the failed store.
    pub(super) fn insert_failed(&mut self, id: &[u8], row: &JobRow, error: &str, now: i64, runtime_ms: u64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO failed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms,
                                                     unique_key, tags, batch_id, created_at, failed_at, runtime_ms, error, workflow)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    row.queue,
                    row.kind,
                    row.payload,
                    row.priority,
                    row.attempts,
                    row.max_attempts,
                    row.backoff,
                    row.timeout_ms,
                    row.unique_key,
                    row.tags,
                    row.batch_id,
                    row.created_at,
                    now,
                    runtime_ms as i64,
                    error,
                    row.workflow
                ])
            })
            .map_err(storage_err)?;
        Ok(())
    }
}

/// A `jobs` row as needed to move it elsewhere.
pub(super) struct JobRow {
    pub(super) queue: String,
    pub(super) kind: String,
    pub(super) payload: String,
    pub(super) priority: i64,
    pub(super) attempts: i64,
    pub(super) max_attempts: i64,
    pub(super) backoff: Option<String>,
    pub(super) timeout_ms: Option<i64>,
    pub(super) unique_key: Option<String>,
    pub(super) tags: Option<String>,
    pub(super) batch_id: Option<String>,
    pub(super) created_at: i64,
    pub(super) workflow: Option<String>,
}

impl JobRow {
    pub(super) fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(JobRow {
            queue: r.get(0)?,
            kind: r.get(1)?,
            payload: r.get(2)?,
            priority: r.get(3)?,
            attempts: r.get(4)?,
            max_attempts: r.get(5)?,
            backoff: r.get(6)?,
            timeout_ms: r.get(7)?,
            unique_key: r.get(8)?,
            tags: r.get(9)?,
            batch_id: r.get(10)?,
            created_at: r.get(11)?,
            workflow: r.get(12)?,
        })
    }
}

/// A reserved job from the columns `JOB_COLS` names.
pub(super) fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    Ok(JobColumns {
        id: r.get(0)?,
        queue: r.get(1)?,
        kind: r.get(2)?,
        payload: r.get(3)?,
        attempts: r.get(4)?,
        max_attempts: r.get(5)?,
        backoff: r.get(6)?,
        timeout_ms: r.get(7)?,
        priority: r.get(8)?,
        tags: r.get(9)?,
        unique_key: r.get(10)?,
        batch_id: r.get(11)?,
        created_at: r.get(12)?,
        available_at: r.get(13)?,
        reserved_at: r.get(14)?,
        lease_token: r.get(15)?,
        workflow: r.get(16)?,
    }
    .into_job())
}
