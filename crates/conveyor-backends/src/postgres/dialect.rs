//! PostgreSQL as a dialect of the relational queue core (`crate::relational`): a `PgTx` runs
//! the core's statements, in bulk with arrays (`unnest`, `= ANY`), locking with
//! `FOR UPDATE SKIP LOCKED` where concurrent transactions meet, and queuing those whose answer
//! nobody reads (`PgTx::defer`) so they cost no round trip.

use std::collections::HashSet;

use super::pipe::Owned;
use super::tx::*;
use crate::relational::{Dialect, Expired, JobColumns, Lease, NewRow};
use conveyor_core::backend::{ReadyJob, Result, Tx};
use conveyor_core::job::{Completion, Job, JobId};

/// Writes a job's row (`d`, a `DELETE … RETURNING *` on `$1`) into the failed store with `$2`
/// failed at, `$3` runtime, `$4` error, replacing an earlier failure of the same job: the tail
/// of `fail_reserved`'s and `remove_delayed`'s statements.
pub(super) const INTO_FAILED: &str =
    "INSERT INTO failed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms,
                                              unique_key, tags, batch_id, created_at, failed_at, runtime_ms, error, workflow)
                     SELECT id, queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms,
                            unique_key, tags, batch_id, created_at, $2, $3, $4, workflow FROM d
                     ON CONFLICT (id) DO UPDATE SET queue = excluded.queue, kind = excluded.kind, payload = excluded.payload,
                        priority = excluded.priority, attempts = excluded.attempts, max_attempts = excluded.max_attempts,
                        backoff = excluded.backoff, timeout_ms = excluded.timeout_ms, unique_key = excluded.unique_key,
                        tags = excluded.tags, batch_id = excluded.batch_id, created_at = excluded.created_at,
                        failed_at = excluded.failed_at, runtime_ms = excluded.runtime_ms, error = excluded.error,
                        workflow = excluded.workflow
                     RETURNING queue, unique_key, kind, batch_id, workflow";

/// The row of a reservation `t` (id, token) that still holds, locked: the lateral subquery of
/// the statements that act on held jobs. Each row is found through the primary key and locked
/// in the order of `t` (sorted by id, so two transactions never wait on each other
/// crosswise). A join of `jobs` with the whole list let the planner, misled by a hot table's
/// stale statistics, scan every reserved job through `jobs_leased` for each call.
///
/// `state + 0 = 1`, here and wherever a job is found by its id and state: `jobs` is analyzed
/// (by autovacuum) at moments when a state has few rows, and with such statistics PostgreSQL
/// prefers that state's partial index (`jobs_leased`, `jobs_ready`, `jobs_delayed`) to the
/// primary key and scans all of it for each row. The expression does not imply the partial
/// indexes' predicates, so the primary key is the only path, whatever the statistics.
/// For the same reason the jobs a statement picks with `FOR UPDATE SKIP LOCKED` are then
/// found by `id = ANY(ARRAY(…))`, an index condition on the primary key, and not by
/// `id IN (…)`, which such statistics made a hash join over a scan of the whole table.
macro_rules! held {
    () => {
        "SELECT j.id FROM jobs j WHERE j.id = t.id AND j.state + 0 = 1 AND j.lease_token = t.token FOR UPDATE"
    };
}

/// The held reservations of a list (ids and tokens, `$1` and `$2`), locked in id order.
pub(super) const LOCK_HELD: &str = concat!(
    "SELECT h.id FROM (SELECT * FROM unnest($1::bytea[], $2::bigint[]) AS t(id, token) ORDER BY id) t
     CROSS JOIN LATERAL (",
    held!(),
    ") h"
);

/// Deletes the held reservations of a list (ids and tokens), returning the ids deleted.
pub(super) const DELETE_HELD: &str = concat!(
    "WITH l AS (SELECT h.id FROM (SELECT * FROM unnest($1::bytea[], $2::bigint[]) AS t(id, token) ORDER BY id) t
                CROSS JOIN LATERAL (",
    held!(),
    ") h)
     DELETE FROM jobs j USING l WHERE j.id = l.id RETURNING j.id"
);

/// [`DELETE_HELD`] that also keeps them in the history (runtimes `$3`, waits `$4`, now `$5`).
pub(super) const DELETE_HELD_INTO_HISTORY: &str = concat!(
    "WITH l AS (SELECT h.id, t.runtime_ms, t.wait_ms
                FROM (SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[])
                        AS t(id, token, runtime_ms, wait_ms) ORDER BY id) t
                CROSS JOIN LATERAL (",
    held!(),
    ") h),
     d AS (DELETE FROM jobs j USING l WHERE j.id = l.id
           RETURNING j.id, j.queue, j.kind, j.payload, j.priority, j.attempts, j.max_attempts, j.tags, j.batch_id,
                     j.created_at, j.reserved_at, j.worker, l.runtime_ms, l.wait_ms)
     INSERT INTO completed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                                 created_at, reserved_at, finished_at, runtime_ms, wait_ms, worker)
     SELECT id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
            created_at, coalesce(reserved_at, $5), $5, runtime_ms, wait_ms, worker FROM d
     RETURNING id"
);

/// Makes due delayed jobs (`available_at <= $1`) pending, at most 1,000 at a time.
pub(super) const PROMOTE: &str = "UPDATE jobs SET state = 0 WHERE id = ANY(ARRAY(
       SELECT id FROM jobs WHERE state = 2 AND available_at <= $1 ORDER BY available_at LIMIT 1000 FOR UPDATE SKIP LOCKED))
     RETURNING queue, id, priority";

/// Reserves the pending jobs among `$5` (ids) under the lease `$1`…`$4`, unless their queue is
/// paused.
pub(super) fn claim_sql() -> String {
    format!(
        "UPDATE jobs SET state = 1, attempts = attempts + 1, reserved_at = $1, lease_until = $2, lease_token = $3, worker = $4
         WHERE id = ANY($5) AND state + 0 = 0 AND queue NOT IN (SELECT name FROM queues WHERE paused = 1)
         RETURNING {JOB_COLS}"
    )
}

/// Reserves up to `$6` pending jobs of queue `$5`, in priority order, under the lease
/// `$1`…`$4`; jobs another transaction is taking are skipped.
pub(super) fn reserve_sql() -> String {
    format!(
        "UPDATE jobs SET state = 1, attempts = attempts + 1, reserved_at = $1, lease_until = $2, lease_token = $3, worker = $4
         WHERE id = ANY(ARRAY(SELECT id FROM jobs WHERE queue = $5 AND state = 0 ORDER BY priority DESC, fair, id LIMIT $6 FOR UPDATE SKIP LOCKED))
         RETURNING {JOB_COLS}, fair"
    )
}

impl Dialect for PgTx<'_> {
    fn count(&mut self, queue: &str, state: usize, delta: i64) {
        match self.counts.get_mut(queue) {
            Some(c) => c[state] += delta,
            None => {
                let mut c = [0i64; 4];
                c[state] = delta;
                self.counts.insert(queue.to_string(), c);
            }
        }
    }

    fn ready(&mut self, id: JobId, queue: &str, priority: i32) {
        self.wake = true;
        if self.collect_ready {
            self.ready.push(ReadyJob { id, queue: queue.to_string(), priority });
        }
    }

    fn record(&mut self, minute: i64, c: Completion) {
        self.metrics.record(minute, &c);
    }

    fn with_tx<R>(&mut self, f: impl FnOnce(&mut dyn Tx) -> R) -> R {
        f(self)
    }

    /// The insert is the check: it takes a free or expired key, or returns nothing while another
    /// job holds it (concurrent enqueues wait on the row, then see it).
    fn take_unique(&mut self, key: &str, id: JobId, until: i64, now: i64) -> Result<Option<JobId>> {
        let bytes = id.as_bytes().to_vec();
        let taken = self.rows(
            "INSERT INTO unique_locks (key, job_id, expires_at) VALUES ($1, $2, $3)
             ON CONFLICT (key) DO UPDATE SET job_id = excluded.job_id, expires_at = excluded.expires_at
             WHERE unique_locks.expires_at <= $4
             RETURNING job_id",
            &[&key, &bytes, &until, &now],
        )?;
        if !taken.is_empty() {
            return Ok(None);
        }
        let holder = self.rows("SELECT job_id FROM unique_locks WHERE key = $1", &[&key])?;
        Ok(Some(holder.first().and_then(|r| JobId::from_slice(&r.get::<_, Vec<u8>>(0))).unwrap_or(id)))
    }

    /// One statement whatever the number of rows, queued: nothing reads its answer.
    fn insert_jobs(&mut self, rows: Vec<NewRow>, now: i64) -> Result<()> {
        let n = rows.len();
        let mut ids = Vec::with_capacity(n);
        let (mut queues, mut kinds, mut payloads) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut states, mut priorities, mut max_attempts) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut backoffs, mut timeouts, mut available) = (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        let (mut uniques, mut tags, mut batches, mut workflows, mut fairs) =
            (Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n), Vec::with_capacity(n));
        for r in rows {
            ids.push(r.id.as_bytes().to_vec());
            queues.push(r.queue);
            kinds.push(r.kind);
            payloads.push(r.payload);
            states.push(r.state as i64);
            priorities.push(r.priority as i64);
            max_attempts.push(r.max_attempts as i64);
            backoffs.push(r.backoff);
            timeouts.push(r.timeout_ms);
            available.push(r.available_at);
            uniques.push(r.unique_key);
            tags.push(r.tags);
            batches.push(r.batch_id);
            workflows.push(r.workflow);
            fairs.push(r.fair);
        }
        self.defer(
            "INSERT INTO jobs (id, queue, kind, payload, state, priority, max_attempts, backoff, timeout_ms,
                               available_at, created_at, unique_key, tags, batch_id, workflow, fair)
             SELECT id, queue, kind, payload, state, priority, max_attempts, backoff, timeout_ms, available_at, $15,
                    unique_key, tags, batch_id, workflow, fair
             FROM unnest($1::bytea[], $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::bigint[],
                         $8::text[], $9::bigint[], $10::bigint[], $11::text[], $12::text[], $13::text[], $14::text[],
                         $16::bigint[])
                  AS t(id, queue, kind, payload, state, priority, max_attempts, backoff, timeout_ms, available_at,
                       unique_key, tags, batch_id, workflow, fair)",
            vec![
                Box::new(ids) as Owned,
                Box::new(queues),
                Box::new(kinds),
                Box::new(payloads),
                Box::new(states),
                Box::new(priorities),
                Box::new(max_attempts),
                Box::new(backoffs),
                Box::new(timeouts),
                Box::new(available),
                Box::new(uniques),
                Box::new(tags),
                Box::new(batches),
                Box::new(workflows),
                Box::new(now),
                Box::new(fairs),
            ],
        )
    }

    fn promote(&mut self, now: i64) -> Result<Vec<(String, Vec<u8>, i32)>> {
        let rows = self.rows(PROMOTE, &[&now])?;
        Ok(rows.iter().map(|r| (r.get(0), r.get(1), r.get::<_, i64>(2) as i32)).collect())
    }

    fn paused(&mut self) -> Result<Vec<String>> {
        Ok(self.rows("SELECT name FROM queues WHERE paused = 1", &[])?.iter().map(|r| r.get(0)).collect())
    }

    fn claim_rows(&mut self, ids: &[JobId], lease: &Lease<'_>) -> Result<Vec<Job>> {
        let ids: Vec<Vec<u8>> = ids.iter().map(|id| id.as_bytes().to_vec()).collect();
        Ok(self.rows(&claim_sql(), &[&lease.now, &lease.until, &lease.token, &lease.worker, &ids])?.iter().map(job_from_row).collect())
    }

    fn reserve_rows(&mut self, queue: &str, want: i64, lease: &Lease<'_>) -> Result<Vec<(Job, i64)>> {
        let rows = self.rows(&reserve_sql(), &[&lease.now, &lease.until, &lease.token, &lease.worker, &queue, &want])?;
        Ok(rows.iter().map(|r| (job_from_row(r), r.get(17))).collect())
    }

    fn delete_completed(&mut self, c: &Completion, now: i64) -> Result<bool> {
        let (id, token) = (c.id.as_bytes().to_vec(), c.lease_token);
        if self.history == 0 {
            return Ok(self.run("DELETE FROM jobs WHERE id = $1 AND state + 0 = 1 AND lease_token = $2", &[&id, &token])? == 1);
        }
        let (runtime, wait) = (c.runtime_ms as i64, c.wait_ms as i64);
        let n = self.run(
            "WITH d AS (DELETE FROM jobs WHERE id = $1 AND state + 0 = 1 AND lease_token = $2 RETURNING *)
             INSERT INTO completed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                                         created_at, reserved_at, finished_at, runtime_ms, wait_ms, worker)
             SELECT id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                    created_at, coalesce(reserved_at, $3), $3, $4, $5, worker FROM d",
            &[&id, &token, &now, &runtime, &wait],
        )?;
        self.history_inserts += n as usize;
        Ok(n == 1)
    }

    /// One statement for them all, locking the rows in id order.
    fn delete_completed_many(&mut self, cs: &[Completion], now: i64) -> Result<Vec<bool>> {
        let ids: Vec<Vec<u8>> = cs.iter().map(|c| c.id.as_bytes().to_vec()).collect();
        let tokens: Vec<i64> = cs.iter().map(|c| c.lease_token).collect();
        let done = if self.history == 0 {
            self.rows(DELETE_HELD, &[&ids, &tokens])?
        } else {
            let runtimes: Vec<i64> = cs.iter().map(|c| c.runtime_ms as i64).collect();
            let waits: Vec<i64> = cs.iter().map(|c| c.wait_ms as i64).collect();
            let rows = self.rows(DELETE_HELD_INTO_HISTORY, &[&ids, &tokens, &runtimes, &waits, &now])?;
            self.history_inserts += rows.len();
            rows
        };
        let mut applied: HashSet<Vec<u8>> = done.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
        Ok(ids.iter().map(|id| applied.remove(id)).collect())
    }

    fn fail_reserved(&mut self, c: &Completion, error: &str, now: i64) -> Result<Option<(String, Option<String>)>> {
        let (id, runtime) = (c.id.as_bytes().to_vec(), c.runtime_ms as i64);
        let sql = format!("WITH d AS (DELETE FROM jobs WHERE id = $1 AND state + 0 = 1 AND lease_token = $5 RETURNING *) {INTO_FAILED}");
        let rows = self.rows(&sql, &[&id, &now, &runtime, &error, &c.lease_token])?;
        Ok(rows.first().map(|r| (r.get(0), r.get(1))))
    }

    fn requeue_row(&mut self, id: &[u8], token: i64, state: usize, at: i64, give_back: i64, error: Option<&str>) -> Result<Option<i32>> {
        let id = id.to_vec();
        let rows = self.rows(
            "UPDATE jobs SET state = $1, available_at = $2, attempts = attempts - $3, last_error = coalesce($4, last_error),
                             lease_until = NULL, lease_token = NULL, worker = NULL
             WHERE id = $5 AND state + 0 = 1 AND lease_token = $6
             RETURNING priority",
            &[&(state as i64), &at, &give_back, &error, &id, &token],
        )?;
        Ok(rows.first().map(|r| r.get::<_, i64>(0) as i32))
    }

    fn release_unique(&mut self, key: Option<&str>, id: &[u8]) -> Result<()> {
        if let Some(key) = key {
            let id = id.to_vec();
            self.run("DELETE FROM unique_locks WHERE key = $1 AND job_id = $2", &[&key, &id])?;
        }
        Ok(())
    }

    /// Nothing here: the history rows are counted across the pool's connections, and
    /// `PgBackend::tx` trims before the commit that crosses the bound.
    fn outcomes_done(&mut self) -> Result<()> {
        Ok(())
    }

    /// Rows locked by someone else are being acknowledged or reaped right now: skipped, so a
    /// heartbeat never waits behind an acknowledgement (nor deadlocks with one).
    fn lock_held(&mut self, leases: &[(JobId, i64)]) -> Result<Vec<bool>> {
        let ids: Vec<Vec<u8>> = leases.iter().map(|(id, _)| id.as_bytes().to_vec()).collect();
        let tokens: Vec<i64> = leases.iter().map(|(_, t)| *t).collect();
        let rows = self.rows(LOCK_HELD, &[&ids, &tokens])?;
        let held: HashSet<Vec<u8>> = rows.iter().map(|r| r.get::<_, Vec<u8>>(0)).collect();
        Ok(ids.iter().map(|id| held.contains(id)).collect())
    }

    fn extend_rows(&mut self, leases: &[(JobId, i64)], until: i64) -> Result<()> {
        let ids: Vec<Vec<u8>> = leases.iter().map(|(id, _)| id.as_bytes().to_vec()).collect();
        let tokens: Vec<i64> = leases.iter().map(|(_, t)| *t).collect();
        self.run(
            "UPDATE jobs j SET lease_until = $1 FROM unnest($2::bytea[], $3::bigint[]) AS t(id, token)
             WHERE j.id = t.id AND j.state + 0 = 1 AND j.lease_token = t.token
               AND j.id = ANY(ARRAY(SELECT id FROM jobs WHERE id = ANY($2) ORDER BY id FOR UPDATE SKIP LOCKED))",
            &[&until, &ids, &tokens],
        )?;
        Ok(())
    }

    fn expire_rows_of(&mut self, holders: &[String]) -> Result<u64> {
        let holders: Vec<&str> = holders.iter().map(String::as_str).collect();
        self.run("UPDATE jobs SET lease_until = 0 WHERE state = 1 AND worker = ANY($1)", &[&holders])
    }

    fn expired(&mut self, now: i64) -> Result<Vec<Expired>> {
        let rows = self.rows(
            "SELECT id, attempts, max_attempts, queue, lease_token, kind, unique_key, batch_id, workflow, available_at, reserved_at
             FROM jobs WHERE state = 1 AND lease_until < $1 ORDER BY lease_until LIMIT 1000 FOR UPDATE SKIP LOCKED",
            &[&now],
        )?;
        Ok(rows
            .iter()
            .map(|r| Expired {
                id: r.get(0),
                attempts: r.get(1),
                max_attempts: r.get(2),
                queue: r.get(3),
                lease_token: r.get(4),
                kind: r.get(5),
                unique_key: r.get(6),
                batch_id: r.get(7),
                workflow: r.get(8),
                available_at: r.get(9),
                reserved_at: r.get(10),
            })
            .collect())
    }
}

impl PgTx<'_> {
    /// Trims the completed-job history to its bound (called after enough inserts).
    pub(crate) fn trim_history(&mut self) -> Result<()> {
        let keep = self.history as i64;
        self.run("DELETE FROM completed_jobs WHERE seq <= (SELECT max(seq) FROM completed_jobs) - $1", &[&keep])?;
        Ok(())
    }
}

/// A reserved job from the columns `JOB_COLS` names.
pub(super) fn job_from_row(r: &postgres::Row) -> Job {
    JobColumns {
        id: r.get(0),
        queue: r.get(1),
        kind: r.get(2),
        payload: r.get(3),
        attempts: r.get(4),
        max_attempts: r.get(5),
        backoff: r.get(6),
        timeout_ms: r.get(7),
        priority: r.get(8),
        tags: r.get(9),
        unique_key: r.get(10),
        batch_id: r.get(11),
        created_at: r.get(12),
        available_at: r.get(13),
        reserved_at: r.get(14),
        lease_token: r.get(15),
        workflow: r.get(16),
    }
    .into_job()
}

#[cfg(test)]
mod tests {
    use postgres::{Client, NoTls};

    use super::*;
    use crate::postgres::testing::TestDatabase;
    use crate::postgres::{PgBackend, PgOptions};

    /// The plan PostgreSQL would use for `sql` with these parameters.
    fn plan(c: &mut Client, sql: &str, params: &[&(dyn postgres::types::ToSql + Sync)]) -> String {
        let rows = c.query(&format!("EXPLAIN {sql}"), params).expect("EXPLAIN");
        rows.iter().map(|r| r.get::<_, String>(0)).collect::<Vec<_>>().join("\n")
    }

    /// `jobs` is analyzed by autovacuum at any moment: once when no job is reserved, once when
    /// every job is. Whatever the statistics say, the statements that find jobs by id go
    /// through the primary key, and none scans the table or a state's whole partial index.
    #[test]
    fn jobs_found_by_id_use_the_primary_key_whatever_the_statistics() {
        let Some(db) = TestDatabase::create() else { return };
        drop(PgBackend::open(PgOptions::new(db.url.clone())).expect("open PostgreSQL: the schema"));
        let mut c = Client::connect(&db.url, NoTls).expect("connect");
        c.batch_execute(
            "INSERT INTO jobs (id, queue, kind, payload, state, max_attempts, available_at, created_at)
             SELECT decode(lpad(to_hex(n), 32, '0'), 'hex'), 'q', 'k', '{}', 0, 3, 0, 0 FROM generate_series(1, 20000) n;
             ANALYZE jobs",
        )
        .expect("20,000 pending jobs, analyzed");
        // The ids the insert made: n as 16 bytes, big-endian.
        let ids: Vec<Vec<u8>> = (1..=64u128).map(|n| n.to_be_bytes().to_vec()).collect();
        let tokens: Vec<i64> = vec![7; ids.len()];
        let (runtimes, now) = (vec![1i64; ids.len()], 1i64);
        let (until, token, worker, want) = (60_000i64, 7i64, "w", 256i64);
        let with_no_reserved = [
            ("LOCK_HELD", plan(&mut c, LOCK_HELD, &[&ids, &tokens])),
            ("DELETE_HELD", plan(&mut c, DELETE_HELD, &[&ids, &tokens])),
            ("DELETE_HELD_INTO_HISTORY", plan(&mut c, DELETE_HELD_INTO_HISTORY, &[&ids, &tokens, &runtimes, &runtimes, &now])),
            ("reserve", plan(&mut c, &reserve_sql(), &[&now, &until, &token, &worker, &"q", &want])),
            ("PROMOTE", plan(&mut c, PROMOTE, &[&now])),
        ];
        c.batch_execute("UPDATE jobs SET state = 1, lease_until = 0, lease_token = 7; ANALYZE jobs").expect("all reserved, analyzed");
        let with_no_pending = [("claim", plan(&mut c, &claim_sql(), &[&now, &until, &token, &worker, &ids]))];
        for (name, plan) in with_no_reserved.iter().chain(&with_no_pending) {
            assert!(!plan.contains("Seq Scan on jobs"), "{name} scans jobs:\n{plan}");
            for partial in ["jobs_leased", "jobs_ready"] {
                // The reserve and the promotion pick their jobs through their state's index.
                if (*name == "reserve" && partial == "jobs_ready") || *name == "PROMOTE" {
                    continue;
                }
                assert!(!plan.contains(partial), "{name} goes through {partial}:\n{plan}");
            }
            if *name != "PROMOTE" {
                assert!(plan.contains("jobs_pkey"), "{name} does not use the primary key:\n{plan}");
            }
        }
    }
}
