//! The administrative transitions, once for every relational dialect: delayed jobs acted on by
//! id, a queue cleared, failed jobs retried or forgotten. As in [`super::lifecycle`], the core
//! keeps the counters, readiness and hooks; the dialect runs the statements.

use super::*;
use conveyor_core::backend::{DelayedAction, Result};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, JobId, Outcome};

/// A job taken out of the queue by an administrative action: what its hooks need.
pub(crate) struct Removed {
    pub queue: String,
    pub kind: String,
    pub unique_key: Option<String>,
    pub batch_id: Option<String>,
    pub workflow: Option<String>,
}

/// A job deleted by `clear_rows`: its state, unique key and id.
pub(crate) type Cleared = (usize, Option<String>, Vec<u8>);

/// The statements of the administrative transitions.
pub(crate) trait AdminDialect: Dialect {
    /// Makes delayed job `id` pending now: its queue and priority.
    fn run_delayed_now(&mut self, id: &[u8], now: i64) -> Result<Option<(String, i32)>>;
    /// Deletes delayed job `id`, writing it to the failed store with `fail` as its error when
    /// given.
    fn remove_delayed(&mut self, id: &[u8], fail: Option<&str>, now: i64) -> Result<Option<Removed>>;
    /// Deletes up to `limit` pending or delayed jobs of `queue`: each one's state, unique key
    /// and id.
    fn clear_rows(&mut self, queue: &str, limit: i64) -> Result<Vec<Cleared>>;
    /// Moves failed job `id` back to its queue, pending, with no attempt used: its queue,
    /// batch and priority.
    fn unfail_row(&mut self, id: &[u8], now: i64) -> Result<Option<(String, Option<String>, i32)>>;
    /// Deletes these failed jobs: the queue of each one deleted.
    fn forget_rows(&mut self, ids: &[Vec<u8>]) -> Result<Vec<String>>;
}

/// Runs, deletes or fails delayed jobs by id (see `Queue::act_on_delayed`); a deleted
/// or failed job's batch and workflow hear of it as a failure.
pub(crate) fn act_on_delayed<D: AdminDialect>(d: &mut D, ids: &[JobId], action: &DelayedAction) -> Result<Vec<JobId>> {
    let now = now_ms();
    let mut done = Vec::new();
    for id in ids {
        let key = &id.as_bytes()[..];
        let (fail, error) = match action {
            DelayedAction::RunNow => {
                if let Some((queue, priority)) = d.run_delayed_now(key, now)? {
                    d.count(&queue, DELAYED, -1);
                    d.count(&queue, PENDING, 1);
                    d.ready(*id, &queue, priority);
                    done.push(*id);
                }
                continue;
            }
            DelayedAction::Fail(error) => (Some(error.as_str()), error.clone()),
            DelayedAction::Delete => (None, "deleted before it ran".to_string()),
        };
        let Some(row) = d.remove_delayed(key, fail, now)? else { continue };
        d.count(&row.queue, DELAYED, -1);
        if fail.is_some() {
            d.count(&row.queue, FAILED, 1);
        }
        d.release_unique(row.unique_key.as_deref(), key)?;
        let c = Completion {
            id: *id,
            lease_token: 0,
            queue: row.queue,
            kind: row.kind,
            unique_key: row.unique_key,
            batch_id: row.batch_id,
            workflow: row.workflow,
            outcome: Outcome::Failed { error },
            wait_ms: 0,
            runtime_ms: 0,
        };
        if conveyor_core::hooks::wants(&c) {
            d.with_tx(|tx| conveyor_core::hooks::after_outcome(tx, &c))?;
        }
        done.push(*id);
    }
    Ok(done)
}

/// Deletes up to `limit` pending or delayed jobs of `queue`; how many.
pub(crate) fn clear_chunk<D: AdminDialect>(d: &mut D, queue: &str, limit: i64) -> Result<u64> {
    let deleted = d.clear_rows(queue, limit)?;
    for (state, key, id) in &deleted {
        d.count(queue, *state, -1);
        d.release_unique(key.as_deref(), id)?;
    }
    Ok(deleted.len() as u64)
}

/// Moves failed jobs back to their queues with a fresh attempt count; their batches count
/// them as pending again.
pub(crate) fn retry_failed<D: AdminDialect>(d: &mut D, ids: &[Vec<u8>]) -> Result<Vec<JobId>> {
    let now = now_ms();
    let mut retried = Vec::new();
    for id in ids {
        let Some((queue, batch, priority)) = d.unfail_row(id, now)? else { continue };
        d.count(&queue, FAILED, -1);
        d.count(&queue, PENDING, 1);
        let job_id = JobId::from_slice(id);
        if let Some(job_id) = job_id {
            d.ready(job_id, &queue, priority);
        }
        if let Some(batch) = &batch {
            d.with_tx(|tx| conveyor_core::hooks::after_failed_retry(tx, batch))?;
        }
        retried.extend(job_id);
    }
    Ok(retried)
}

/// Deletes failed jobs; how many were there.
pub(crate) fn forget_failed<D: AdminDialect>(d: &mut D, ids: &[Vec<u8>]) -> Result<u64> {
    let queues = d.forget_rows(ids)?;
    for q in &queues {
        d.count(q, FAILED, -1);
    }
    Ok(queues.len() as u64)
}
