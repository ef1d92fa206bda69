//! Administration in a PostgreSQL transaction: the statements of the administrative
//! transitions (`crate::relational::admin`), pause / resume, the failed store's ids, the worker
//! registry and pruning.

use super::dialect::INTO_FAILED;
use super::tx::*;
use crate::relational::admin::{AdminDialect, Cleared, Removed};
use conveyor_core::backend::Result;
use conveyor_core::clock::now_ms;

impl AdminDialect for PgTx<'_> {
    fn run_delayed_now(&mut self, id: &[u8], now: i64) -> Result<Option<(String, i32)>> {
        let id = id.to_vec();
        let rows = self
            .rows("UPDATE jobs SET state = 0, available_at = $2 WHERE id = $1 AND state + 0 = 2 RETURNING queue, priority", &[&id, &now])?;
        Ok(rows.first().map(|r| (r.get(0), r.get::<_, i64>(1) as i32)))
    }

    fn remove_delayed(&mut self, id: &[u8], fail: Option<&str>, now: i64) -> Result<Option<Removed>> {
        let id = id.to_vec();
        let rows = match fail {
            Some(error) => {
                let sql = format!("WITH d AS (DELETE FROM jobs WHERE id = $1 AND state + 0 = 2 RETURNING *) {INTO_FAILED}");
                self.rows(&sql, &[&id, &now, &0i64, &error])?
            }
            None => {
                self.rows("DELETE FROM jobs WHERE id = $1 AND state + 0 = 2 RETURNING queue, unique_key, kind, batch_id, workflow", &[&id])?
            }
        };
        Ok(rows.first().map(|r| Removed { queue: r.get(0), unique_key: r.get(1), kind: r.get(2), batch_id: r.get(3), workflow: r.get(4) }))
    }

    fn clear_rows(&mut self, queue: &str, limit: i64) -> Result<Vec<Cleared>> {
        let rows = self.rows(
            "DELETE FROM jobs WHERE id = ANY(ARRAY(SELECT id FROM jobs WHERE queue = $1 AND state IN (0, 2) LIMIT $2 FOR UPDATE SKIP LOCKED))
             RETURNING state, unique_key, id",
            &[&queue, &limit],
        )?;
        Ok(rows.iter().map(|r| (r.get::<_, i64>(0) as usize, r.get(1), r.get(2))).collect())
    }

    fn unfail_row(&mut self, id: &[u8], now: i64) -> Result<Option<(String, Option<String>, i32)>> {
        let id = id.to_vec();
        let rows = self.rows(
            "WITH f AS (DELETE FROM failed_jobs WHERE id = $1 RETURNING *)
             INSERT INTO jobs (id, queue, kind, payload, state, priority, attempts, max_attempts, backoff, timeout_ms,
                               available_at, created_at, unique_key, tags, batch_id, workflow)
             SELECT id, queue, kind, payload, 0, priority, 0, max_attempts, backoff, timeout_ms, $2, created_at,
                    unique_key, tags, batch_id, workflow FROM f
             RETURNING queue, batch_id, priority",
            &[&id, &now],
        )?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as i32)))
    }

    fn forget_rows(&mut self, ids: &[Vec<u8>]) -> Result<Vec<String>> {
        let ids = ids.to_vec();
        Ok(self.rows("DELETE FROM failed_jobs WHERE id = ANY($1) RETURNING queue", &[&ids])?.iter().map(|r| r.get(0)).collect())
    }
}

impl PgTx<'_> {
    pub(crate) fn set_paused(&mut self, queue: &str, paused: bool) -> Result<()> {
        let p = paused as i64;
        self.run(
            "INSERT INTO queues (name, paused) VALUES ($1, $2) ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
            &[&queue, &p],
        )?;
        if !paused {
            self.wake = true;
        }
        Ok(())
    }

    pub(crate) fn failed_ids(&mut self, queue: Option<&str>, limit: i64) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .rows("SELECT id FROM failed_jobs WHERE ($1::text IS NULL OR queue = $1) ORDER BY failed_at LIMIT $2", &[&queue, &limit])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub(crate) fn worker_heartbeat(&mut self, id: &str, last_seen: i64, info: &str) -> Result<()> {
        self.run(
            "INSERT INTO workers (id, last_seen, info) VALUES ($1, $2, $3)
             ON CONFLICT (id) DO UPDATE SET last_seen = excluded.last_seen, info = excluded.info",
            &[&id, &last_seen, &info],
        )?;
        Ok(())
    }

    pub(crate) fn prune(&mut self, before: i64) -> Result<()> {
        let now = now_ms();
        let gone = now - 86_400_000;
        self.run("DELETE FROM job_metrics WHERE minute < $1", &[&before])?;
        self.run("DELETE FROM workers WHERE last_seen < $1", &[&gone])?;
        self.run("DELETE FROM unique_locks WHERE expires_at < $1", &[&now])?;
        Ok(())
    }
}
