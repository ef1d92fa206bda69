//! The writer's administration: the statements of the administrative transitions
//! (`crate::relational::admin`), pause / resume, the failed store's ids, the worker registry
//! and pruning.

use super::dialect::JobRow;
use super::storage_err;
use super::writer::*;
use crate::relational::admin::{AdminDialect, Cleared, Removed};
use conveyor_core::backend::Result;
use conveyor_core::clock::now_ms;
use rusqlite::{params, OptionalExtension};

impl AdminDialect for WriteCtx {
    fn run_delayed_now(&mut self, id: &[u8], now: i64) -> Result<Option<(String, i32)>> {
        self.conn
            .prepare_cached("UPDATE jobs SET state = 0, available_at = ?2 WHERE id = ?1 AND state = 2 RETURNING queue, priority")
            .and_then(|mut s| s.query_row(params![id, now], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(storage_err)
    }

    fn remove_delayed(&mut self, id: &[u8], fail: Option<&str>, now: i64) -> Result<Option<Removed>> {
        let row = self
            .conn
            .prepare_cached(
                "DELETE FROM jobs WHERE id = ?1 AND state = 2
                 RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                           batch_id, created_at, workflow",
            )
            .and_then(|mut s| s.query_row([id], JobRow::from_row).optional())
            .map_err(storage_err)?;
        let Some(row) = row else { return Ok(None) };
        if let Some(error) = fail {
            self.insert_failed(id, &row, error, now, 0)?;
        }
        Ok(Some(Removed { queue: row.queue, kind: row.kind, unique_key: row.unique_key, batch_id: row.batch_id, workflow: row.workflow }))
    }

    fn clear_rows(&mut self, queue: &str, limit: i64) -> Result<Vec<Cleared>> {
        self.conn
            .prepare_cached(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE queue = ?1 AND state IN (0, 2) LIMIT ?2)
                 RETURNING state, unique_key, id",
            )
            .and_then(|mut s| s.query_map(params![queue, limit], |r| Ok((r.get::<_, i64>(0)? as usize, r.get(1)?, r.get(2)?)))?.collect())
            .map_err(storage_err)
    }

    fn unfail_row(&mut self, id: &[u8], now: i64) -> Result<Option<(String, Option<String>, i32)>> {
        let row: Option<JobRow> = self
            .conn
            .prepare_cached(
                "DELETE FROM failed_jobs WHERE id = ?1
                 RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                           batch_id, created_at, workflow",
            )
            .and_then(|mut s| s.query_row([id], JobRow::from_row).optional())
            .map_err(storage_err)?;
        let Some(row) = row else { return Ok(None) };
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
        Ok(Some((row.queue, row.batch_id, row.priority as i32)))
    }

    fn forget_rows(&mut self, ids: &[Vec<u8>]) -> Result<Vec<String>> {
        let mut st = self.conn.prepare_cached("DELETE FROM failed_jobs WHERE id = ?1 RETURNING queue").map_err(storage_err)?;
        let mut queues = Vec::new();
        for id in ids {
            queues.extend(st.query_row([id], |r| r.get(0)).optional().map_err(storage_err)?);
        }
        Ok(queues)
    }
}

impl WriteCtx {
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

    /// Failed job ids, oldest first, up to `limit`, optionally of one queue.
    pub(crate) fn failed_ids(&mut self, queue: Option<&str>, limit: i64) -> Result<Vec<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT id FROM failed_jobs WHERE (?1 IS NULL OR queue = ?1) ORDER BY failed_at LIMIT ?2")
            .and_then(|mut s| s.query_map(params![queue, limit], |r| r.get(0))?.collect())
            .map_err(storage_err)
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
