//! The queue's state machine, once for every relational dialect: each function runs inside
//! the caller's transaction (SQLite's group transaction, a PostgreSQL transaction) and leaves
//! the commit to it.

use super::*;
use conveyor_core::backend::{BackendError, Result, Tx};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, EnqueueOutcome, Job, JobId, NewJob, Outcome};
use conveyor_core::metrics::minute_of;

/// Inserts the jobs: those whose unique key another job holds come back as duplicates; the
/// rest go in with one `insert_jobs`, pending or delayed by their run time.
pub(crate) fn enqueue<D: Dialect>(d: &mut D, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
    let now = now_ms();
    let mut out = Vec::with_capacity(jobs.len());
    let mut kept: Vec<NewJob> = Vec::with_capacity(jobs.len());
    for job in jobs {
        if let Some(u) = &job.unique {
            if let Some(existing) = d.take_unique(&u.key, job.id, now + u.ttl.as_millis() as i64, now)? {
                out.push(EnqueueOutcome::Duplicate { existing });
                continue;
            }
        }
        out.push(EnqueueOutcome::Enqueued { id: job.id });
        kept.push(job);
    }
    if kept.is_empty() {
        return Ok(out);
    }
    // Turns are handed out to the jobs that go in, not to duplicates.
    let turns = d.with_tx(|tx| conveyor_core::fair::turns(tx, &kept))?;
    let mut rows = Vec::with_capacity(kept.len());
    for (job, fair) in kept.into_iter().zip(turns) {
        let available_at = job.run_at.unwrap_or(now);
        let state = if available_at > now { DELAYED } else { PENDING };
        d.count(&job.queue, state, 1);
        if state == PENDING {
            d.ready(job.id, &job.queue, job.priority);
        }
        rows.push(NewRow {
            id: job.id,
            backoff: job.backoff.as_ref().map(|b| serde_json::to_string(b).expect("backoff serializes")),
            tags: (!job.tags.is_empty()).then(|| serde_json::to_string(&job.tags).expect("tags serialize")),
            timeout_ms: job.timeout.map(|t| t.as_millis() as i64),
            unique_key: job.unique.map(|u| u.key),
            queue: job.queue,
            kind: job.kind,
            payload: job.payload,
            state,
            priority: job.priority,
            max_attempts: job.max_attempts,
            available_at,
            batch_id: job.batch_id,
            workflow: job.workflow,
            fair,
        });
    }
    d.insert_jobs(rows, now)?;
    Ok(out)
}

/// Moves due delayed jobs to pending, a bounded number per call so no statement walks the whole
/// delayed set. Returns how many.
pub(crate) fn promote_due<D: Dialect>(d: &mut D, now: i64) -> Result<u64> {
    let promoted = d.promote(now)?;
    let n = promoted.len() as u64;
    for (queue, id, priority) in promoted {
        d.count(&queue, DELAYED, -1);
        d.count(&queue, PENDING, 1);
        if let Some(id) = JobId::from_slice(&id) {
            d.ready(id, &queue, priority);
        }
    }
    Ok(n)
}

fn new_token() -> i64 {
    rand::random::<i64>() & i64::MAX
}

/// Reserves the given pending jobs (chosen by a broker) under one lease; paused queues and jobs
/// that are not pending are skipped.
pub(crate) fn claim<D: Dialect>(d: &mut D, ids: &[JobId], lease_ms: i64, worker: &str) -> Result<Vec<Job>> {
    let now = now_ms();
    let lease = Lease { now, until: now + lease_ms, token: new_token(), worker };
    let jobs = d.claim_rows(ids, &lease)?;
    for job in &jobs {
        d.count(&job.queue, PENDING, -1);
        d.count(&job.queue, RESERVED, 1);
    }
    Ok(jobs)
}

/// Reserves up to `max` jobs from `queues`, in the queues' order (paused ones skipped), each
/// queue's by priority, fair-queueing turn and id; due delayed jobs are promoted first.
pub(crate) fn reserve<D: Dialect>(d: &mut D, queues: &[String], max: usize, lease_ms: i64, worker: &str) -> Result<Vec<Job>> {
    let now = now_ms();
    promote_due(d, now)?;
    let paused = d.paused()?;
    let lease = Lease { now, until: now + lease_ms, token: new_token(), worker };
    let mut jobs = Vec::new();
    for queue in queues {
        if jobs.len() >= max {
            break;
        }
        if paused.iter().any(|p| p == queue) {
            continue;
        }
        let mut got = d.reserve_rows(queue, (max - jobs.len()) as i64, &lease)?;
        let n = got.len() as i64;
        if n > 0 {
            d.count(queue, PENDING, -n);
            d.count(queue, RESERVED, n);
        }
        // RETURNING keeps no order: the queue's, by priority, fair-queueing turn and id.
        got.sort_by(|(a, fa), (b, fb)| b.priority.cmp(&a.priority).then(fa.cmp(fb)).then(a.id.cmp(&b.id)));
        jobs.extend(got.into_iter().map(|(j, _)| j));
    }
    Ok(jobs)
}

/// Orders outcomes by the hook rows they lock (batch, workflow), then id: every transaction
/// locks them in one order, so two never wait on each other crosswise.
fn sort_for_hooks(cs: &mut [Completion]) {
    cs.sort_by(|a, b| (&a.batch_id, &a.workflow, a.id).cmp(&(&b.batch_id, &b.workflow, b.id)));
}

/// Applies many outcomes: plain successes (no hooks) with one `delete_completed_many`, the rest
/// one by one, in hook order.
pub(crate) fn complete<D: Dialect>(d: &mut D, completions: Vec<Completion>) -> Result<()> {
    let now = now_ms();
    let (plain, mut other): (Vec<Completion>, Vec<Completion>) =
        completions.into_iter().partition(|c| matches!(c.outcome, Outcome::Completed) && !conveyor_core::hooks::wants(c));
    if !plain.is_empty() {
        let applied = d.delete_completed_many(&plain, now)?;
        for (c, applied) in plain.into_iter().zip(applied) {
            if applied {
                d.release_unique(c.unique_key.as_deref(), &c.id.as_bytes()[..])?;
                d.count(&c.queue, RESERVED, -1);
                d.record(minute_of(now), c);
            }
        }
    }
    sort_for_hooks(&mut other);
    for c in other {
        complete_one(d, c, now)?;
    }
    d.outcomes_done()
}

/// Applies one outcome; returns false when the reservation it names is gone (its lease
/// expired and the job was reaped, or the job was removed).
pub(crate) fn complete_one<D: Dialect>(d: &mut D, c: Completion, now: i64) -> Result<bool> {
    let id = &c.id.as_bytes()[..];
    let applied = match &c.outcome {
        Outcome::Completed => {
            let done = d.delete_completed(&c, now)?;
            if done {
                d.release_unique(c.unique_key.as_deref(), id)?;
                d.count(&c.queue, RESERVED, -1);
            }
            done
        }
        Outcome::Failed { error } => match d.fail_reserved(&c, error, now)? {
            Some((queue, key)) => {
                d.release_unique(key.as_deref(), id)?;
                d.count(&queue, RESERVED, -1);
                d.count(&queue, FAILED, 1);
                true
            }
            None => false,
        },
        Outcome::Retry { at, error } => requeue(d, id, c.lease_token, &c.queue, *at, Some(error), 0, now)?,
        Outcome::Release { at } => requeue(d, id, c.lease_token, &c.queue, *at, None, 1, now)?,
    };
    if applied {
        if conveyor_core::hooks::wants(&c) {
            d.with_tx(|tx| conveyor_core::hooks::after_outcome(tx, &c))?;
        }
        d.record(minute_of(now), c);
    }
    Ok(applied)
}

/// Puts a reserved job back: pending when `at` is due, delayed otherwise.
#[allow(clippy::too_many_arguments)]
fn requeue<D: Dialect>(
    d: &mut D,
    id: &[u8],
    token: i64,
    queue: &str,
    at: i64,
    error: Option<&str>,
    give_back: i64,
    now: i64,
) -> Result<bool> {
    let state = if at > now { DELAYED } else { PENDING };
    let Some(priority) = d.requeue_row(id, token, state, at, give_back, error)? else { return Ok(false) };
    d.count(queue, RESERVED, -1);
    d.count(queue, state, 1);
    if state == PENDING {
        if let Some(id) = JobId::from_slice(id) {
            d.ready(id, queue, priority);
        }
    }
    Ok(true)
}

/// Runs `work` and records the outcome in the same transaction; fails with `LeaseLost`
/// (rolling `work` back) when the reservation is gone. `work` runs first, so that it sees the
/// job's batch still open (a job may add jobs to its own batch) and the outcome's hooks see
/// what `work` wrote.
pub(crate) fn complete_with<D: Dialect, R>(d: &mut D, c: Completion, work: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
    let id = c.id;
    let out = d.with_tx(work)?;
    if !complete_one(d, c, now_ms())? {
        return Err(BackendError::LeaseLost(id));
    }
    d.outcomes_done()?;
    Ok(out)
}

/// Runs one set-wise `work` for many completions and records the outcomes of those whose
/// leases still hold, in the same transaction. The held ones are found (and on PostgreSQL
/// locked) first, so `work` is told which jobs are still this worker's and acts on those only;
/// then it runs, then the outcomes with their hooks, as in [`complete_with`]. Returns `work`'s
/// result and which completions were held, in their order.
pub(crate) fn complete_many_with<D: Dialect, R>(
    d: &mut D,
    cs: Vec<Completion>,
    work: impl FnOnce(&mut dyn Tx, &[bool]) -> Result<R>,
) -> Result<(R, Vec<bool>)> {
    let leases: Vec<(JobId, i64)> = cs.iter().map(|c| (c.id, c.lease_token)).collect();
    let held = d.lock_held(&leases)?;
    let out = d.with_tx(|tx| work(tx, &held))?;
    let now = now_ms();
    let mut mine: Vec<Completion> = cs.into_iter().zip(&held).filter(|(_, h)| **h).map(|(c, _)| c).collect();
    sort_for_hooks(&mut mine);
    let changed = |id: JobId| BackendError::Other(format!("job {id}: its reservation changed inside the transaction that held it"));
    // Successes set-wise: one delete, then the hooks over all of them.
    let (done, other): (Vec<Completion>, Vec<Completion>) = mine.into_iter().partition(|c| matches!(c.outcome, Outcome::Completed));
    let applied = if done.is_empty() { Vec::new() } else { d.delete_completed_many(&done, now)? };
    if let Some(i) = applied.iter().position(|applied| !applied) {
        return Err(changed(done[i].id));
    }
    for c in &done {
        d.release_unique(c.unique_key.as_deref(), &c.id.as_bytes()[..])?;
        d.count(&c.queue, RESERVED, -1);
    }
    let hooked: Vec<&Completion> = done.iter().filter(|c| conveyor_core::hooks::wants(c)).collect();
    if !hooked.is_empty() {
        d.with_tx(|tx| conveyor_core::hooks::after_outcomes(tx, &hooked))?;
    }
    for c in done {
        d.record(minute_of(now), c);
    }
    for c in other {
        let id = c.id;
        if !complete_one(d, c, now)? {
            return Err(changed(id));
        }
    }
    d.outcomes_done()?;
    Ok((out, held))
}

/// Extends the leases still held by their tokens by `lease_ms` from now.
pub(crate) fn extend_leases<D: Dialect>(d: &mut D, leases: &[(JobId, i64)], lease_ms: i64) -> Result<()> {
    d.extend_rows(leases, now_ms() + lease_ms)
}

/// Ends the leases of dead holders: the next reap returns their jobs.
pub(crate) fn expire_leases_of<D: Dialect>(d: &mut D, holders: &[String]) -> Result<u64> {
    if holders.is_empty() {
        return Ok(0);
    }
    d.expire_rows_of(holders)
}

/// Returns expired reservations to the queue, or to the failed store when no attempt is left,
/// through the same path as a worker's outcome (so batches and workflows see it too).
pub(crate) fn reap_expired<D: Dialect>(d: &mut D) -> Result<u64> {
    let now = now_ms();
    let mut expired: Vec<Completion> = d
        .expired(now)?
        .into_iter()
        .map(|r| {
            let error = format!("lease expired: the worker running attempt {} stopped responding", r.attempts);
            let outcome = if r.attempts >= r.max_attempts { Outcome::Failed { error } } else { Outcome::Retry { at: now, error } };
            Completion {
                id: JobId::from_slice(&r.id).unwrap_or_default(),
                lease_token: r.lease_token,
                queue: r.queue,
                kind: r.kind,
                unique_key: r.unique_key,
                batch_id: r.batch_id,
                workflow: r.workflow,
                outcome,
                wait_ms: r.reserved_at.map_or(0, |t| (t - r.available_at).max(0) as u64),
                runtime_ms: r.reserved_at.map_or(0, |t| (now - t).max(0) as u64),
            }
        })
        .collect();
    let n = expired.len() as u64;
    sort_for_hooks(&mut expired);
    for c in expired {
        complete_one(d, c, now)?;
    }
    d.outcomes_done()?;
    Ok(n)
}
