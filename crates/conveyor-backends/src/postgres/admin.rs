//! Administration in a PostgreSQL transaction: delayed jobs acted on by id, pause / resume /
//! clear, the failed store (retry, forget), the worker registry and pruning.

use super::tx::*;
use conveyor_core::backend::{DelayedAction, Result};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, JobId, Outcome};

impl PgTx<'_> {
    /// Runs, deletes or fails delayed jobs by id (see `QueueBackend::act_on_delayed`).
    pub(crate) fn act_on_delayed(&mut self, ids: &[JobId], action: &DelayedAction) -> Result<Vec<JobId>> {
        let now = now_ms();
        let mut done = Vec::new();
        for id in ids {
            let key = id.as_bytes().to_vec();
            if let DelayedAction::RunNow = action {
                let rows = self.rows(
                    "UPDATE jobs SET state = 0, available_at = $2 WHERE id = $1 AND state = 2 RETURNING queue, priority",
                    &[&key, &now],
                )?;
                if let Some(r) = rows.first() {
                    let (queue, priority): (String, i64) = (r.get(0), r.get(1));
                    self.count(&queue, DELAYED, -1);
                    self.count(&queue, PENDING, 1);
                    self.wake = true;
                    self.ready(*id, &queue, priority as i32);
                    done.push(*id);
                }
                continue;
            }
            let (rows, error) = match action {
                DelayedAction::Fail(error) => (
                    self.rows(
                        "WITH d AS (DELETE FROM jobs WHERE id = $1 AND state = 2 RETURNING *)
                         INSERT INTO failed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms,
                                                  unique_key, tags, batch_id, created_at, failed_at, runtime_ms, error, workflow)
                         SELECT id, queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms,
                                unique_key, tags, batch_id, created_at, $2, 0, $3, workflow FROM d
                         ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, kind = excluded.kind, payload = excluded.payload,
                            attempts = excluded.attempts, max_attempts = excluded.max_attempts, unique_key = excluded.unique_key,
                            batch_id = excluded.batch_id, failed_at = excluded.failed_at, error = excluded.error,
                            workflow = excluded.workflow
                         RETURNING queue, kind, unique_key, batch_id, workflow",
                        &[&key, &now, error],
                    )?,
                    error.clone(),
                ),
                _ => (
                    self.rows(
                        "DELETE FROM jobs WHERE id = $1 AND state = 2 RETURNING queue, kind, unique_key, batch_id, workflow",
                        &[&key],
                    )?,
                    "deleted before it ran".to_string(),
                ),
            };
            let Some(r) = rows.first() else { continue };
            let (queue, kind, unique_key, batch_id, workflow): (String, String, Option<String>, Option<String>, Option<String>) =
                (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4));
            self.count(&queue, DELAYED, -1);
            if matches!(action, DelayedAction::Fail(_)) {
                self.count(&queue, FAILED, 1);
            }
            self.release_unique(unique_key.as_deref(), &key)?;
            let c = Completion {
                id: *id,
                lease_token: 0,
                queue,
                kind,
                unique_key,
                batch_id,
                workflow,
                outcome: Outcome::Failed { error },
                wait_ms: 0,
                runtime_ms: 0,
            };
            if conveyor_core::hooks::wants(&c) {
                conveyor_core::hooks::after_outcome(self, &c)?;
            }
            done.push(*id);
        }
        Ok(done)
    }

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

    pub(crate) fn clear_chunk(&mut self, queue: &str, limit: i64) -> Result<u64> {
        let rows = self.rows(
            "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE queue = $1 AND state IN (0, 2) LIMIT $2 FOR UPDATE SKIP LOCKED)
             RETURNING state, unique_key, id",
            &[&queue, &limit],
        )?;
        for r in &rows {
            let (state, key, id): (i64, Option<String>, Vec<u8>) = (r.get(0), r.get(1), r.get(2));
            self.count(queue, state as usize, -1);
            self.release_unique(key.as_deref(), &id)?;
        }
        Ok(rows.len() as u64)
    }

    pub(crate) fn retry_failed(&mut self, ids: &[Vec<u8>]) -> Result<Vec<JobId>> {
        let now = now_ms();
        let mut retried = Vec::new();
        for id in ids {
            let rows = self.rows(
                "WITH f AS (DELETE FROM failed_jobs WHERE id = $1 RETURNING *)
                 INSERT INTO jobs (id, queue, kind, payload, state, priority, attempts, max_attempts, backoff, timeout_ms,
                                   available_at, created_at, unique_key, tags, batch_id, workflow)
                 SELECT id, queue, kind, payload, 0, priority, 0, max_attempts, backoff, timeout_ms, $2, created_at,
                        unique_key, tags, batch_id, workflow FROM f
                 RETURNING queue, batch_id, priority",
                &[id, &now],
            )?;
            let Some(r) = rows.first() else { continue };
            let (queue, batch, priority): (String, Option<String>, i32) = (r.get(0), r.get(1), r.get::<_, i64>(2) as i32);
            self.count(&queue, FAILED, -1);
            self.count(&queue, PENDING, 1);
            self.wake = true;
            if let Some(job_id) = JobId::from_slice(id) {
                self.ready(job_id, &queue, priority);
            }
            if let Some(batch) = &batch {
                conveyor_core::hooks::after_failed_retry(self, batch)?;
            }
            if let Some(job_id) = JobId::from_slice(id) {
                retried.push(job_id);
            }
        }
        Ok(retried)
    }

    pub(crate) fn failed_ids(&mut self, queue: Option<&str>, limit: i64) -> Result<Vec<Vec<u8>>> {
        Ok(self
            .rows("SELECT id FROM failed_jobs WHERE ($1::text IS NULL OR queue = $1) ORDER BY failed_at LIMIT $2", &[&queue, &limit])?
            .iter()
            .map(|r| r.get(0))
            .collect())
    }

    pub(crate) fn forget_failed(&mut self, ids: &[Vec<u8>]) -> Result<u64> {
        let ids = ids.to_vec();
        let rows = self.rows("DELETE FROM failed_jobs WHERE id = ANY($1) RETURNING queue", &[&ids])?;
        for r in &rows {
            let q: String = r.get(0);
            self.count(&q, FAILED, -1);
        }
        Ok(rows.len() as u64)
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
