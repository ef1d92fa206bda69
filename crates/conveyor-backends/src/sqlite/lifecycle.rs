//! The writer's job lifecycle: enqueue, promote, claim and reserve, outcomes (completed,
//! retried, released, failed, with the bounded completed history), transactional completion,
//! leases and reaping. Each runs inside the writer's group transaction (`WriteCtx`).

use super::storage_err;
use super::writer::*;
use conveyor_core::backend::{BackendError, Result, Tx};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Backoff, Completion, EnqueueOutcome, Job, JobId, NewJob, Outcome};
use conveyor_core::metrics::minute_of;
use rusqlite::{params, OptionalExtension};

impl WriteCtx {
    pub(crate) fn enqueue(&mut self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        let now = now_ms();
        let mut out = Vec::with_capacity(jobs.len());
        let turns = conveyor_core::fair::turns(&mut super::tx::SqliteTx { ctx: self }, &jobs)?;
        let mut insert = self
            .conn
            .prepare_cached(
                "INSERT INTO jobs (id, queue, kind, payload, state, priority, max_attempts, backoff, timeout_ms,
                                   available_at, created_at, unique_key, tags, batch_id, workflow, fair)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
            )
            .map_err(storage_err)?;
        let mut counts: Vec<(String, usize)> = Vec::with_capacity(jobs.len());
        // Ready jobs for the dispatch hook, only when a broker transport listens.
        let dispatching = self.dispatch.get().is_some();
        let mut ready: Vec<(JobId, i32)> = Vec::new();
        for (job, turn) in jobs.into_iter().zip(turns) {
            if let Some(u) = &job.unique {
                let held: Option<(Vec<u8>, i64)> = self
                    .conn
                    .prepare_cached("SELECT job_id, expires_at FROM unique_locks WHERE key = ?1")
                    .and_then(|mut s| s.query_row([&u.key], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                    .map_err(storage_err)?;
                if let Some((holder, expires_at)) = held {
                    if expires_at > now {
                        let existing = JobId::from_slice(&holder).unwrap_or(job.id);
                        out.push(EnqueueOutcome::Duplicate { existing });
                        continue;
                    }
                }
                self.conn
                    .prepare_cached("INSERT OR REPLACE INTO unique_locks (key, job_id, expires_at) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![u.key, &job.id.as_bytes()[..], now + u.ttl.as_millis() as i64]))
                    .map_err(storage_err)?;
            }
            let available_at = job.run_at.unwrap_or(now);
            let state = if available_at > now { DELAYED } else { PENDING };
            let backoff = job.backoff.as_ref().map(|b| serde_json::to_string(b).expect("backoff serializes"));
            let tags = (!job.tags.is_empty()).then(|| serde_json::to_string(&job.tags).expect("tags serialize"));
            insert
                .execute(params![
                    &job.id.as_bytes()[..],
                    job.queue,
                    job.kind,
                    job.payload,
                    state as i64,
                    job.priority,
                    job.max_attempts,
                    backoff,
                    job.timeout.map(|t| t.as_millis() as i64),
                    available_at,
                    now,
                    job.unique.as_ref().map(|u| u.key.as_str()),
                    tags,
                    job.batch_id,
                    job.workflow,
                    turn,
                ])
                .map_err(storage_err)?;
            if state == PENDING && dispatching {
                ready.push((job.id, job.priority));
            }
            counts.push((job.queue, state));
            out.push(EnqueueOutcome::Enqueued { id: job.id });
        }
        drop(insert);
        let mut ready = ready.into_iter();
        for (q, state) in counts {
            self.count(&q, state, 1);
            if state == PENDING {
                if let Some((id, priority)) = ready.next() {
                    self.ready(id, &q, priority);
                }
            }
        }
        Ok(out)
    }

    /// Moves due delayed jobs to pending, a bounded number per call so no statement walks the
    /// whole delayed set. Returns how many.
    pub(crate) fn promote_due(&mut self, now: i64) -> Result<u64> {
        let mut st = self
            .conn
            .prepare_cached(
                "UPDATE jobs SET state = 0 WHERE id IN
                   (SELECT id FROM jobs WHERE state = 2 AND available_at <= ?1 ORDER BY available_at LIMIT 1000)
                 RETURNING queue, id, priority",
            )
            .map_err(storage_err)?;
        let promoted: Vec<(String, Vec<u8>, i32)> = st
            .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(storage_err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(storage_err)?;
        drop(st);
        let n = promoted.len() as u64;
        for (q, id, priority) in promoted {
            self.count(&q, DELAYED, -1);
            self.count(&q, PENDING, 1);
            if let Some(id) = JobId::from_slice(&id) {
                self.ready(id, &q, priority);
            }
        }
        Ok(n)
    }

    /// Reserves the given pending jobs (chosen by a broker) under one lease; paused queues and
    /// jobs that are not pending are skipped.
    pub(crate) fn claim(&mut self, ids: &[JobId], lease_ms: i64, worker: &str) -> Result<Vec<Job>> {
        let now = now_ms();
        let token: i64 = rand::random::<i64>() & i64::MAX;
        let sql = format!(
            "UPDATE jobs SET state = 1, attempts = attempts + 1, reserved_at = ?1, lease_until = ?2, lease_token = ?3, worker = ?4
             WHERE id = ?5 AND state = 0 AND queue NOT IN (SELECT name FROM queues WHERE paused = 1)
             RETURNING {JOB_COLS}"
        );
        let mut jobs = Vec::with_capacity(ids.len());
        let mut st = self.conn.prepare_cached(&sql).map_err(storage_err)?;
        for id in ids {
            if let Some(job) = st
                .query_row(params![now, now + lease_ms, token, worker, &id.as_bytes()[..]], job_from_row)
                .optional()
                .map_err(storage_err)?
            {
                jobs.push(job);
            }
        }
        drop(st);
        for job in &jobs {
            self.count(&job.queue, PENDING, -1);
            self.count(&job.queue, RESERVED, 1);
        }
        Ok(jobs)
    }

    pub(crate) fn reserve(&mut self, queues: &[String], max: usize, lease_ms: i64, worker: &str) -> Result<Vec<Job>> {
        let now = now_ms();
        self.promote_due(now)?;
        let paused: Vec<String> = self
            .conn
            .prepare_cached("SELECT name FROM queues WHERE paused = 1")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(storage_err)?;
        let token: i64 = rand::random::<i64>() & i64::MAX;
        let mut jobs = Vec::new();
        let sql = format!(
            "UPDATE jobs SET state = 1, attempts = attempts + 1, reserved_at = ?1, lease_until = ?2, lease_token = ?3, worker = ?4
             WHERE id IN (SELECT id FROM jobs WHERE queue = ?5 AND state = 0 ORDER BY priority DESC, fair, id LIMIT ?6)
             RETURNING {JOB_COLS}, fair"
        );
        for queue in queues {
            if jobs.len() >= max {
                break;
            }
            if paused.iter().any(|p| p == queue) {
                continue;
            }
            let want = (max - jobs.len()) as i64;
            let mut st = self.conn.prepare_cached(&sql).map_err(storage_err)?;
            let mut got: Vec<(Job, i64)> = st
                .query_map(params![now, now + lease_ms, token, worker, queue, want], |r| Ok((job_from_row(r)?, r.get(17)?)))
                .map_err(storage_err)?
                .collect::<rusqlite::Result<_>>()
                .map_err(storage_err)?;
            drop(st);
            let n = got.len() as i64;
            if n > 0 {
                self.count(queue, PENDING, -n);
                self.count(queue, RESERVED, n);
            }
            // RETURNING keeps no order: the queue's, by priority, fair-queueing turn and id.
            got.sort_by(|(a, fa), (b, fb)| b.priority.cmp(&a.priority).then(fa.cmp(fb)).then(a.id.cmp(&b.id)));
            jobs.extend(got.into_iter().map(|(j, _)| j));
        }
        Ok(jobs)
    }

    pub(crate) fn complete(&mut self, completions: Vec<Completion>) -> Result<()> {
        let now = now_ms();
        for c in completions {
            self.complete_one(c, now)?;
        }
        self.trim_history()?;
        Ok(())
    }

    /// Applies one completion; returns false when the reservation it names is gone.
    pub(super) fn complete_one(&mut self, c: Completion, now: i64) -> Result<bool> {
        let id = &c.id.as_bytes()[..];
        let applied = match &c.outcome {
            Outcome::Completed => {
                let done = self.delete_completed(id, c.lease_token, now, &c)?;
                if done {
                    self.release_unique(c.unique_key.as_deref(), id)?;
                    self.count(&c.queue, RESERVED, -1);
                }
                done
            }
            Outcome::Failed { error } => {
                let row = self.take_reserved(id, c.lease_token)?;
                if let Some(row) = &row {
                    self.insert_failed(id, row, error, now, c.runtime_ms)?;
                    self.release_unique(row.unique_key.as_deref(), id)?;
                    self.count(&row.queue, RESERVED, -1);
                    self.count(&row.queue, FAILED, 1);
                }
                row.is_some()
            }
            Outcome::Retry { at, error } => self.requeue(id, c.lease_token, &c.queue, *at, Some(error), 0, now)?,
            Outcome::Release { at } => self.requeue(id, c.lease_token, &c.queue, *at, None, 1, now)?,
        };
        if applied {
            if conveyor_core::hooks::wants(&c) {
                conveyor_core::hooks::after_outcome(&mut super::tx::SqliteTx { ctx: self }, &c)?;
            }
            self.op_metrics.push((minute_of(now), c));
        }
        Ok(applied)
    }

    /// Deletes a completed job if `token` still holds it, copying it into the bounded history
    /// inside SQLite (no row travels through Rust on this hot path).
    pub(super) fn delete_completed(&mut self, id: &[u8], token: i64, now: i64, c: &Completion) -> Result<bool> {
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

    /// Deletes a reserved job if `token` still holds it, returning the row.
    pub(super) fn take_reserved(&mut self, id: &[u8], token: i64) -> Result<Option<JobRow>> {
        self.conn
            .prepare_cached(
                "DELETE FROM jobs WHERE id = ?1 AND state = 1 AND lease_token = ?2
                 RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                           batch_id, created_at, workflow",
            )
            .and_then(|mut s| s.query_row(params![id, token], JobRow::from_row).optional())
            .map_err(storage_err)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn requeue(
        &mut self,
        id: &[u8],
        token: i64,
        queue: &str,
        at: i64,
        error: Option<&str>,
        give_back: i64,
        now: i64,
    ) -> Result<bool> {
        let state = if at > now { DELAYED } else { PENDING };
        let priority: Option<i32> = self
            .conn
            .prepare_cached(
                "UPDATE jobs SET state = ?1, available_at = ?2, attempts = attempts - ?3, last_error = coalesce(?4, last_error),
                                 lease_until = NULL, lease_token = NULL, worker = NULL
                 WHERE id = ?5 AND state = 1 AND lease_token = ?6
                 RETURNING priority",
            )
            .and_then(|mut s| s.query_row(params![state as i64, at, give_back, error, id, token], |r| r.get(0)).optional())
            .map_err(storage_err)?;
        let Some(priority) = priority else { return Ok(false) };
        self.count(queue, RESERVED, -1);
        self.count(queue, state, 1);
        if state == PENDING {
            if let Some(id) = JobId::from_slice(id) {
                self.ready(id, queue, priority);
            }
        }
        Ok(true)
    }

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

    pub(super) fn release_unique(&mut self, key: Option<&str>, id: &[u8]) -> Result<()> {
        if let Some(key) = key {
            self.conn
                .prepare_cached("DELETE FROM unique_locks WHERE key = ?1 AND job_id = ?2")
                .and_then(|mut s| s.execute(params![key, id]))
                .map_err(storage_err)?;
        }
        Ok(())
    }

    pub(super) fn trim_history(&mut self) -> Result<()> {
        if self.history_inserts < 256 {
            return Ok(());
        }
        self.history_inserts = 0;
        self.conn
            .prepare_cached("DELETE FROM completed_jobs WHERE seq <= (SELECT max(seq) FROM completed_jobs) - ?1")
            .and_then(|mut s| s.execute([self.history as i64]))
            .map_err(storage_err)?;
        Ok(())
    }

    /// Runs `work` and records a completion in the same savepoint; fails with `LeaseLost`
    /// (rolling `work` back) when the reservation is gone. `work` runs first, so that it sees
    /// the job's batch still open (a job may add jobs to its own batch) and the outcome's hooks
    /// see what `work` wrote.
    pub(crate) fn complete_with<R>(&mut self, c: Completion, work: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        let id = c.id;
        let out = work(&mut super::tx::SqliteTx { ctx: self })?;
        if !self.complete_one(c, now_ms())? {
            return Err(BackendError::LeaseLost(id));
        }
        self.trim_history()?;
        Ok(out)
    }

    pub(crate) fn extend_leases(&mut self, leases: &[(JobId, i64)], lease_ms: i64) -> Result<()> {
        let until = now_ms() + lease_ms;
        let mut st = self
            .conn
            .prepare_cached("UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND state = 1 AND lease_token = ?3")
            .map_err(storage_err)?;
        for (id, token) in leases {
            st.execute(params![until, &id.as_bytes()[..], token]).map_err(storage_err)?;
        }
        Ok(())
    }

    /// Returns expired reservations to the queue, or to the failed store when no attempt is left,
    /// through the same path as a worker's outcome (so batches and workflows see it too).
    /// Ends the leases of dead holders: the next reap returns their jobs.
    pub(crate) fn expire_leases_of(&mut self, holders: &[String]) -> Result<u64> {
        let mut n = 0;
        let mut st = self.conn.prepare_cached("UPDATE jobs SET lease_until = 0 WHERE state = 1 AND worker = ?1").map_err(storage_err)?;
        for h in holders {
            n += st.execute([h]).map_err(storage_err)? as u64;
        }
        Ok(n)
    }

    pub(crate) fn reap_expired(&mut self) -> Result<u64> {
        let now = now_ms();
        let expired: Vec<Completion> = self
            .conn
            .prepare_cached(
                "SELECT id, attempts, max_attempts, queue, lease_token, kind, unique_key, batch_id, workflow,
                        available_at, reserved_at
                 FROM jobs WHERE state = 1 AND lease_until < ?1 ORDER BY lease_until LIMIT 1000",
            )
            .and_then(|mut s| {
                s.query_map([now], |r| {
                    let id: Vec<u8> = r.get(0)?;
                    let (attempts, max_attempts): (i64, i64) = (r.get(1)?, r.get(2)?);
                    let error = format!("lease expired: the worker running attempt {attempts} stopped responding");
                    let outcome = if attempts >= max_attempts { Outcome::Failed { error } } else { Outcome::Retry { at: now, error } };
                    let (available_at, reserved_at): (i64, Option<i64>) = (r.get(9)?, r.get(10)?);
                    Ok(Completion {
                        id: JobId::from_slice(&id).unwrap_or_default(),
                        lease_token: r.get(4)?,
                        queue: r.get(3)?,
                        kind: r.get(5)?,
                        unique_key: r.get(6)?,
                        batch_id: r.get(7)?,
                        workflow: r.get(8)?,
                        outcome,
                        wait_ms: reserved_at.map_or(0, |t| (t - available_at).max(0) as u64),
                        runtime_ms: reserved_at.map_or(0, |t| (now - t).max(0) as u64),
                    })
                })?
                .collect()
            })
            .map_err(storage_err)?;
        let n = expired.len() as u64;
        for c in expired {
            self.complete_one(c, now)?;
        }
        self.trim_history()?;
        Ok(n)
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

pub(super) fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let id: Vec<u8> = r.get(0)?;
    let backoff: Option<String> = r.get(6)?;
    let tags: Option<String> = r.get(9)?;
    let timeout_ms: Option<i64> = r.get(7)?;
    Ok(Job {
        id: JobId::from_slice(&id).unwrap_or_default(),
        queue: r.get(1)?,
        kind: r.get(2)?,
        payload: r.get(3)?,
        attempt: r.get::<_, i64>(4)? as u32,
        max_attempts: r.get::<_, i64>(5)? as u32,
        backoff: backoff.and_then(|b| serde_json::from_str::<Backoff>(&b).ok()),
        timeout: timeout_ms.map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
        priority: r.get::<_, i64>(8)? as i32,
        tags: tags.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
        unique_key: r.get(10)?,
        batch_id: r.get(11)?,
        created_at: r.get(12)?,
        available_at: r.get(13)?,
        reserved_at: r.get(14)?,
        lease_token: r.get(15)?,
        workflow: r.get(16)?,
    })
}
