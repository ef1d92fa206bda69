//! Outcomes in a PostgreSQL transaction: completions (plain ones in bulk), retries, releases,
//! failures with the bounded completed history, lease extension and reaping.

use super::tx::*;
use conveyor_core::backend::Result;
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, JobId, Outcome};
use conveyor_core::metrics::minute_of;

impl PgTx<'_> {
    /// Applies many completions: plain successes (no batch, no workflow) in one statement, the
    /// rest one by one.
    pub(crate) fn complete(&mut self, completions: Vec<Completion>) -> Result<()> {
        let now = now_ms();
        let (plain, other): (Vec<Completion>, Vec<Completion>) =
            completions.into_iter().partition(|c| matches!(c.outcome, Outcome::Completed) && !conveyor_core::hooks::wants(c));
        if !plain.is_empty() {
            self.complete_plain(plain, now)?;
        }
        // Hook rows (batches, workflows) are locked in one order by every transaction.
        let mut other = other;
        other.sort_by(|a, b| (&a.batch_id, &a.workflow, a.id).cmp(&(&b.batch_id, &b.workflow, b.id)));
        for c in other {
            self.complete_one(c, now)?;
        }
        Ok(())
    }

    pub(super) fn complete_plain(&mut self, plain: Vec<Completion>, now: i64) -> Result<()> {
        let ids: Vec<Vec<u8>> = plain.iter().map(|c| c.id.as_bytes().to_vec()).collect();
        let tokens: Vec<i64> = plain.iter().map(|c| c.lease_token).collect();
        let runtimes: Vec<i64> = plain.iter().map(|c| c.runtime_ms as i64).collect();
        let waits: Vec<i64> = plain.iter().map(|c| c.wait_ms as i64).collect();
        let done = if self.history == 0 {
            self.rows(
                "WITH t AS (SELECT * FROM unnest($1::bytea[], $2::bigint[]) AS t(id, token)),
                 l AS (SELECT j.id FROM jobs j JOIN t ON j.id = t.id AND j.state = 1 AND j.lease_token = t.token ORDER BY j.id FOR UPDATE OF j)
                 DELETE FROM jobs j USING l WHERE j.id = l.id RETURNING j.id",
                &[&ids, &tokens],
            )?
        } else {
            let rows = self.rows(
                "WITH t AS (SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[]) AS t(id, token, runtime_ms, wait_ms)),
                 l AS (SELECT j.id, t.runtime_ms, t.wait_ms FROM jobs j JOIN t ON j.id = t.id AND j.state = 1 AND j.lease_token = t.token
                       ORDER BY j.id FOR UPDATE OF j),
                 d AS (DELETE FROM jobs j USING l WHERE j.id = l.id
                       RETURNING j.id, j.queue, j.kind, j.payload, j.priority, j.attempts, j.max_attempts, j.tags, j.batch_id,
                                 j.created_at, j.reserved_at, j.worker, l.runtime_ms, l.wait_ms)
                 INSERT INTO completed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                                             created_at, reserved_at, finished_at, runtime_ms, wait_ms, worker)
                 SELECT id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                        created_at, coalesce(reserved_at, $5), $5, runtime_ms, wait_ms, worker FROM d
                 RETURNING id",
                &[&ids, &tokens, &runtimes, &waits, &now],
            )?;
            self.history_inserts += rows.len();
            rows
        };
        let mut applied: std::collections::HashSet<Vec<u8>> = done.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
        for c in plain {
            if !applied.remove(&c.id.as_bytes()[..]) {
                continue;
            }
            self.release_unique(c.unique_key.as_deref(), &c.id.as_bytes()[..])?;
            self.count(&c.queue, RESERVED, -1);
            self.metrics.record(minute_of(now), &c);
        }
        Ok(())
    }

    /// Applies one completion; returns false when the reservation it names is gone.
    pub(crate) fn complete_one(&mut self, c: Completion, now: i64) -> Result<bool> {
        let id = c.id.as_bytes().to_vec();
        let applied = match &c.outcome {
            Outcome::Completed => {
                let done = self.delete_completed(&id, c.lease_token, now, &c)?;
                if done {
                    self.release_unique(c.unique_key.as_deref(), &id)?;
                    self.count(&c.queue, RESERVED, -1);
                }
                done
            }
            Outcome::Failed { error } => {
                let runtime = c.runtime_ms as i64;
                let rows = self.rows(
                    "WITH d AS (DELETE FROM jobs WHERE id = $1 AND state = 1 AND lease_token = $2 RETURNING *)
                     INSERT INTO failed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms,
                                              unique_key, tags, batch_id, created_at, failed_at, runtime_ms, error, workflow)
                     SELECT id, queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms,
                            unique_key, tags, batch_id, created_at, $3, $4, $5, workflow FROM d
                     ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, kind = excluded.kind, payload = excluded.payload,
                        priority = excluded.priority, attempts = excluded.attempts, max_attempts = excluded.max_attempts,
                        backoff = excluded.backoff, timeout_ms = excluded.timeout_ms, unique_key = excluded.unique_key,
                        tags = excluded.tags, batch_id = excluded.batch_id, created_at = excluded.created_at,
                        failed_at = excluded.failed_at, runtime_ms = excluded.runtime_ms, error = excluded.error,
                        workflow = excluded.workflow
                     RETURNING queue, unique_key",
                    &[&id, &c.lease_token, &now, &runtime, error],
                )?;
                if let Some(r) = rows.first() {
                    let (queue, key): (String, Option<String>) = (r.get(0), r.get(1));
                    self.release_unique(key.as_deref(), &id)?;
                    self.count(&queue, RESERVED, -1);
                    self.count(&queue, FAILED, 1);
                }
                !rows.is_empty()
            }
            Outcome::Retry { at, error } => self.requeue(&id, c.lease_token, &c.queue, *at, Some(error), 0, now)?,
            Outcome::Release { at } => self.requeue(&id, c.lease_token, &c.queue, *at, None, 1, now)?,
        };
        if applied {
            if conveyor_core::hooks::wants(&c) {
                conveyor_core::hooks::after_outcome(self, &c)?;
            }
            self.metrics.record(minute_of(now), &c);
        }
        Ok(applied)
    }

    pub(super) fn delete_completed(&mut self, id: &Vec<u8>, token: i64, now: i64, c: &Completion) -> Result<bool> {
        if self.history == 0 {
            return Ok(self.run("DELETE FROM jobs WHERE id = $1 AND state = 1 AND lease_token = $2", &[id, &token])? == 1);
        }
        let (runtime, wait) = (c.runtime_ms as i64, c.wait_ms as i64);
        let n = self.run(
            "WITH d AS (DELETE FROM jobs WHERE id = $1 AND state = 1 AND lease_token = $2 RETURNING *)
             INSERT INTO completed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                                         created_at, reserved_at, finished_at, runtime_ms, wait_ms, worker)
             SELECT id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                    created_at, coalesce(reserved_at, $3), $3, $4, $5, worker FROM d",
            &[id, &token, &now, &runtime, &wait],
        )?;
        self.history_inserts += n as usize;
        Ok(n == 1)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn requeue(
        &mut self,
        id: &Vec<u8>,
        token: i64,
        queue: &str,
        at: i64,
        error: Option<&str>,
        give_back: i64,
        now: i64,
    ) -> Result<bool> {
        let state = if at > now { DELAYED } else { PENDING };
        let rows = self.rows(
            "UPDATE jobs SET state = $1, available_at = $2, attempts = attempts - $3, last_error = coalesce($4, last_error),
                             lease_until = NULL, lease_token = NULL, worker = NULL
             WHERE id = $5 AND state = 1 AND lease_token = $6
             RETURNING priority",
            &[&(state as i64), &at, &give_back, &error, id, &token],
        )?;
        let Some(r) = rows.first() else { return Ok(false) };
        let priority = r.get::<_, i64>(0) as i32;
        self.count(queue, RESERVED, -1);
        self.count(queue, state, 1);
        if state == PENDING {
            self.wake = true;
            if let Some(job_id) = JobId::from_slice(id) {
                self.ready(job_id, queue, priority);
            }
        }
        Ok(true)
    }

    pub(super) fn release_unique(&mut self, key: Option<&str>, id: &[u8]) -> Result<()> {
        if let Some(key) = key {
            let id = id.to_vec();
            self.run("DELETE FROM unique_locks WHERE key = $1 AND job_id = $2", &[&key, &id])?;
        }
        Ok(())
    }

    /// Trims the completed-job history to its bound (called after enough inserts).
    pub(crate) fn trim_history(&mut self) -> Result<()> {
        let keep = self.history as i64;
        self.run("DELETE FROM completed_jobs WHERE seq <= (SELECT max(seq) FROM completed_jobs) - $1", &[&keep])?;
        Ok(())
    }

    pub(crate) fn extend_leases(&mut self, leases: &[(JobId, i64)], lease_ms: i64) -> Result<()> {
        let until = now_ms() + lease_ms;
        let ids: Vec<Vec<u8>> = leases.iter().map(|(id, _)| id.as_bytes().to_vec()).collect();
        let tokens: Vec<i64> = leases.iter().map(|(_, t)| *t).collect();
        // Rows locked by someone else are being acknowledged or reaped right now: skipped, so a
        // heartbeat never waits behind an acknowledgement (nor deadlocks with one).
        self.run(
            "UPDATE jobs j SET lease_until = $1 FROM unnest($2::bytea[], $3::bigint[]) AS t(id, token)
             WHERE j.id = t.id AND j.state = 1 AND j.lease_token = t.token
               AND j.id IN (SELECT id FROM jobs WHERE id = ANY($2) ORDER BY id FOR UPDATE SKIP LOCKED)",
            &[&until, &ids, &tokens],
        )?;
        Ok(())
    }

    /// Returns expired reservations to the queue (or the failed store) through the outcome path.
    /// Ends the leases of dead holders: the next reap returns their jobs.
    pub(crate) fn expire_leases_of(&mut self, holders: &[String]) -> Result<u64> {
        let holders: Vec<&str> = holders.iter().map(String::as_str).collect();
        self.run("UPDATE jobs SET lease_until = 0 WHERE state = 1 AND worker = ANY($1)", &[&holders])
    }

    pub(crate) fn reap_expired(&mut self) -> Result<u64> {
        let now = now_ms();
        let rows = self.rows(
            "SELECT id, attempts, max_attempts, queue, lease_token, kind, unique_key, batch_id, workflow, available_at, reserved_at
             FROM jobs WHERE state = 1 AND lease_until < $1 ORDER BY lease_until LIMIT 1000 FOR UPDATE SKIP LOCKED",
            &[&now],
        )?;
        let expired: Vec<Completion> = rows
            .iter()
            .map(|r| {
                let (attempts, max_attempts): (i64, i64) = (r.get(1), r.get(2));
                let error = format!("lease expired: the worker running attempt {attempts} stopped responding");
                let outcome = if attempts >= max_attempts { Outcome::Failed { error } } else { Outcome::Retry { at: now, error } };
                let (available_at, reserved_at): (i64, Option<i64>) = (r.get(9), r.get(10));
                Completion {
                    id: JobId::from_slice(&r.get::<_, Vec<u8>>(0)).unwrap_or_default(),
                    lease_token: r.get(4),
                    queue: r.get(3),
                    kind: r.get(5),
                    unique_key: r.get(6),
                    batch_id: r.get(7),
                    workflow: r.get(8),
                    outcome,
                    wait_ms: reserved_at.map_or(0, |t| (t - available_at).max(0) as u64),
                    runtime_ms: reserved_at.map_or(0, |t| (now - t).max(0) as u64),
                }
            })
            .collect();
        let n = expired.len() as u64;
        let mut expired = expired;
        expired.sort_by(|a, b| (&a.batch_id, &a.workflow, a.id).cmp(&(&b.batch_id, &b.workflow, b.id)));
        for c in expired {
            self.complete_one(c, now)?;
        }
        Ok(n)
    }
}
