//! The writer's administration: delayed jobs acted on by id, pause / resume / clear, the failed
//! store (retry, forget), the worker registry and pruning.

use super::lifecycle::JobRow;
use super::storage_err;
use super::writer::*;
use conveyor_core::backend::{DelayedAction, Result};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, JobId, Outcome};
use rusqlite::{params, OptionalExtension};

impl WriteCtx {
    /// Runs, deletes or fails delayed jobs by id (see `QueueBackend::act_on_delayed`).
    pub(crate) fn act_on_delayed(&mut self, ids: &[JobId], action: &DelayedAction) -> Result<Vec<JobId>> {
        let now = now_ms();
        let mut done = Vec::new();
        for id in ids {
            let key = &id.as_bytes()[..];
            let row = match action {
                DelayedAction::RunNow => {
                    let hit: Option<(String, i32)> = self
                        .conn
                        .prepare_cached(
                            "UPDATE jobs SET state = 0, available_at = ?2 WHERE id = ?1 AND state = 2 RETURNING queue, priority",
                        )
                        .and_then(|mut s| s.query_row(params![key, now], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                        .map_err(storage_err)?;
                    if let Some((queue, priority)) = hit {
                        self.count(&queue, DELAYED, -1);
                        self.count(&queue, PENDING, 1);
                        self.ready(*id, &queue, priority);
                        done.push(*id);
                    }
                    continue;
                }
                DelayedAction::Delete | DelayedAction::Fail(_) => self
                    .conn
                    .prepare_cached(
                        "DELETE FROM jobs WHERE id = ?1 AND state = 2
                         RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                                   batch_id, created_at, workflow",
                    )
                    .and_then(|mut s| s.query_row([key], JobRow::from_row).optional())
                    .map_err(storage_err)?,
            };
            let Some(row) = row else { continue };
            let error = match action {
                DelayedAction::Fail(error) => {
                    self.insert_failed(key, &row, error, now, 0)?;
                    self.count(&row.queue, FAILED, 1);
                    error.clone()
                }
                _ => "deleted before it ran".to_string(),
            };
            self.count(&row.queue, DELAYED, -1);
            self.release_unique(row.unique_key.as_deref(), key)?;
            let c = Completion {
                id: *id,
                lease_token: 0,
                queue: row.queue.clone(),
                kind: row.kind.clone(),
                unique_key: row.unique_key.clone(),
                batch_id: row.batch_id.clone(),
                workflow: row.workflow.clone(),
                outcome: Outcome::Failed { error },
                wait_ms: 0,
                runtime_ms: 0,
            };
            if conveyor_core::hooks::wants(&c) {
                conveyor_core::hooks::after_outcome(&mut super::tx::SqliteTx { ctx: self }, &c)?;
            }
            done.push(*id);
        }
        Ok(done)
    }

    pub(crate) fn set_paused(&mut self, queue: &str, paused: bool) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO queues (name, paused) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET paused = ?2",
                params![queue, paused as i64],
            )
            .map_err(storage_err)?;
        if !paused {
            self.wake = true;
        }
        Ok(())
    }

    /// Deletes up to `limit` pending or delayed jobs of `queue`.
    pub(crate) fn clear_chunk(&mut self, queue: &str, limit: i64) -> Result<u64> {
        let deleted: Vec<(i64, Option<String>, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE queue = ?1 AND state IN (0, 2) LIMIT ?2)
                 RETURNING state, unique_key, id",
            )
            .and_then(|mut s| s.query_map(params![queue, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
            .map_err(storage_err)?;
        for (state, key, id) in &deleted {
            self.count(queue, *state as usize, -1);
            self.release_unique(key.as_deref(), id)?;
        }
        Ok(deleted.len() as u64)
    }

    /// Moves failed jobs back to their queues with a fresh attempt count.
    pub(crate) fn retry_failed(&mut self, ids: &[Vec<u8>]) -> Result<Vec<JobId>> {
        let now = now_ms();
        let mut retried = Vec::new();
        for id in ids {
            let row: Option<JobRow> = self
                .conn
                .prepare_cached(
                    "DELETE FROM failed_jobs WHERE id = ?1
                     RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                               batch_id, created_at, workflow",
                )
                .and_then(|mut s| s.query_row([id], JobRow::from_row).optional())
                .map_err(storage_err)?;
            let Some(row) = row else { continue };
            self.conn
                .prepare_cached(
                    "INSERT INTO jobs (id, queue, kind, payload, state, priority, attempts, max_attempts, backoff, timeout_ms,
                                       available_at, created_at, unique_key, tags, batch_id, workflow)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        id,
                        row.queue,
                        row.kind,
                        row.payload,
                        row.priority,
                        row.max_attempts,
                        row.backoff,
                        row.timeout_ms,
                        now,
                        row.created_at,
                        row.unique_key,
                        row.tags,
                        row.batch_id,
                        row.workflow
                    ])
                })
                .map_err(storage_err)?;
            self.count(&row.queue, FAILED, -1);
            self.count(&row.queue, PENDING, 1);
            if let Some(job_id) = JobId::from_slice(id) {
                self.ready(job_id, &row.queue, row.priority as i32);
            }
            if let Some(batch) = &row.batch_id {
                conveyor_core::hooks::after_failed_retry(&mut super::tx::SqliteTx { ctx: self }, batch)?;
            }
            if let Some(job_id) = JobId::from_slice(id) {
                retried.push(job_id);
            }
        }
        Ok(retried)
    }

    /// Failed job ids, oldest first, up to `limit`, optionally of one queue.
    pub(crate) fn failed_ids(&mut self, queue: Option<&str>, limit: i64) -> Result<Vec<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT id FROM failed_jobs WHERE (?1 IS NULL OR queue = ?1) ORDER BY failed_at LIMIT ?2")
            .and_then(|mut s| s.query_map(params![queue, limit], |r| r.get(0))?.collect())
            .map_err(storage_err)
    }

    pub(crate) fn forget_failed(&mut self, ids: &[Vec<u8>]) -> Result<u64> {
        let mut n = 0;
        for id in ids {
            let queue: Option<String> = self
                .conn
                .prepare_cached("DELETE FROM failed_jobs WHERE id = ?1 RETURNING queue")
                .and_then(|mut s| s.query_row([id], |r| r.get(0)).optional())
                .map_err(storage_err)?;
            if let Some(q) = queue {
                self.count(&q, FAILED, -1);
                n += 1;
            }
        }
        Ok(n)
    }

    pub(crate) fn worker_heartbeat(&mut self, id: &str, last_seen: i64, info: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO workers (id, last_seen, info) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET last_seen = ?2, info = ?3",
            )
            .and_then(|mut s| s.execute(params![id, last_seen, info]))
            .map_err(storage_err)?;
        Ok(())
    }

    pub(crate) fn prune(&mut self, before: i64) -> Result<()> {
        self.conn.execute("DELETE FROM job_metrics WHERE minute < ?1", [before]).map_err(storage_err)?;
        self.conn.execute("DELETE FROM workers WHERE last_seen < ?1", [now_ms() - 86_400_000]).map_err(storage_err)?;
        self.conn.execute("DELETE FROM unique_locks WHERE expires_at < ?1", [now_ms()]).map_err(storage_err)?;
        Ok(())
    }
}
