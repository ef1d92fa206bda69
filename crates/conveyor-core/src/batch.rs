//! Batches: a set of jobs dispatched together, with exact counters, progress, and `then`
//! (all succeeded), `catch` (first failure) and `finally` (all finished) callback jobs.
//!
//! Counters move inside the backend's acknowledgement transaction ([`record_outcome`], called
//! by every relational backend), so they are exact under any concurrency and across crashes,
//! and a callback is enqueued in the same transaction as the outcome that triggers it — once.
//! Without `allow_failures`, the first failure cancels the batch: its remaining jobs are
//! skipped (not run) and still counted down, so `finally` runs when the last one is skipped.

use serde::Serialize;

use crate::backend::{count_sql, BackendError, Cursor, Page, Paged, QueueBackend, QueueBackendExt, Result, RowExt, Tx};
use crate::clock::now_ms;
use crate::job::{Completion, JobId, NewJob, Outcome};
use crate::Conveyor;

/// A batch to dispatch.
#[derive(Clone, Debug)]
pub struct Batch {
    name: String,
    jobs: Vec<NewJob>,
    then: Option<NewJob>,
    catch: Option<NewJob>,
    finally: Option<NewJob>,
    allow_failures: bool,
    held: bool,
    parent: Option<String>,
}

/// A batch as stored, for the API and the dashboard.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct BatchInfo {
    pub id: String,
    pub name: String,
    pub total: u64,
    pub pending: u64,
    /// Jobs that succeeded (or were skipped because the batch was cancelled).
    pub processed: u64,
    pub failed: u64,
    /// Finished jobs as a percentage of all jobs.
    pub progress: f64,
    pub allow_failures: bool,
    /// `pending`, `running`, `finished`, `failed` (finished with failures) or `cancelled`.
    pub status: String,
    pub created_at: i64,
    pub cancelled_at: Option<i64>,
    pub finished_at: Option<i64>,
    /// Still open: created with [`Batch::held`] and not committed yet.
    pub open: bool,
    /// The batch this one is a member of.
    pub parent_id: Option<String>,
}

impl Batch {
    pub fn new(name: impl Into<String>) -> Self {
        Batch {
            name: name.into(),
            jobs: Vec::new(),
            then: None,
            catch: None,
            finally: None,
            allow_failures: false,
            held: false,
            parent: None,
        }
    }
    pub fn push(mut self, job: NewJob) -> Self {
        self.jobs.push(job);
        self
    }
    pub fn extend(mut self, jobs: impl IntoIterator<Item = NewJob>) -> Self {
        self.jobs.extend(jobs);
        self
    }
    /// Enqueued once when every job succeeded.
    pub fn then(mut self, job: NewJob) -> Self {
        self.then = Some(job);
        self
    }
    /// Enqueued once, at the first job that fails for good.
    pub fn catch(mut self, job: NewJob) -> Self {
        self.catch = Some(job);
        self
    }
    /// Enqueued once when every job has finished, successfully or not.
    pub fn finally(mut self, job: NewJob) -> Self {
        self.finally = Some(job);
        self
    }
    /// Keep running the other jobs after a failure (otherwise the batch is cancelled).
    pub fn allow_failures(mut self) -> Self {
        self.allow_failures = true;
        self
    }
    /// Keep the batch open until [`commit`]: jobs added meanwhile may finish without the
    /// batch finishing (Faktory's `BATCH NEW` … `BATCH COMMIT`).
    pub fn held(mut self) -> Self {
        self.held = true;
        self
    }
    /// Make the batch one member of `parent`, which finishes only after this one has.
    pub fn parent(mut self, parent: impl Into<String>) -> Self {
        self.parent = Some(parent.into());
        self
    }

    /// Stores the batch and enqueues its jobs in one transaction; returns the batch id. An empty
    /// batch stays open until jobs are added (see [`add_jobs`]).
    pub async fn dispatch(self, conveyor: &Conveyor) -> Result<String> {
        for job in self.jobs.iter().chain(&self.then).chain(&self.catch).chain(&self.finally) {
            job.validate().map_err(BackendError::Invalid)?;
        }
        conveyor.backend().transact(move |tx| self.dispatch_in(tx)).await
    }

    /// The same inside the caller's transaction.
    pub fn dispatch_in(self, tx: &mut dyn Tx) -> Result<String> {
        let id = JobId::new().to_string();
        let holds = self.held as i64;
        let n = self.jobs.len() as i64 + holds;
        if let Some(parent) = &self.parent {
            let joined = tx.execute(
                "UPDATE batches SET total = total + 1, pending = pending + 1 WHERE id = $1 AND finished_at IS NULL",
                &[parent.as_str().into()],
            )?;
            if joined == 0 {
                return Err(BackendError::NotFound(format!("no unfinished batch {parent}")));
            }
        }
        let json = |j: &Option<NewJob>| j.as_ref().map(|j| serde_json::to_string(j).expect("a job serializes"));
        tx.execute(
            "INSERT INTO batches (id, name, total, pending, allow_failures, then_job, catch_job, finally_job, created_at, holds, parent_id)
             VALUES ($1, $2, $3, $3, $4, $5, $6, $7, $8, $9, $10)",
            &[
                id.clone().into(),
                self.name.into(),
                n.into(),
                (self.allow_failures as i64).into(),
                json(&self.then).into(),
                json(&self.catch).into(),
                json(&self.finally).into(),
                now_ms().into(),
                holds.into(),
                self.parent.into(),
            ],
        )?;
        let jobs: Vec<NewJob> = self.jobs.into_iter().map(|j| j.batch(id.clone())).collect();
        if !jobs.is_empty() {
            tx.enqueue(jobs)?;
        }
        Ok(id)
    }
}

/// Commits a batch created with [`Batch::held`]: it finishes once its jobs have (at once when
/// they already have, or when it has none). `false` when there is no such open batch.
pub async fn commit(backend: &dyn QueueBackend, batch_id: &str) -> Result<bool> {
    let id = batch_id.to_string();
    backend.transact(move |tx| commit_in(tx, &id)).await
}

pub fn commit_in(tx: &mut dyn Tx, batch_id: &str) -> Result<bool> {
    let rows = tx.query(
        "UPDATE batches SET holds = 0, total = total - 1, pending = pending - 1
         WHERE id = $1 AND holds = 1 AND pending > 0
         RETURNING pending, failed, allow_failures, cancelled_at, then_job, catch_job, finally_job, parent_id",
        &[batch_id.into()],
    )?;
    let Some(r) = rows.first() else { return Ok(false) };
    settle(tx, batch_id, r, false)?;
    Ok(true)
}

/// Adds jobs to a batch that has not finished (typically from inside one of its own jobs, which
/// keeps the batch open while it runs).
pub async fn add_jobs(conveyor: &Conveyor, batch_id: &str, jobs: Vec<NewJob>) -> Result<()> {
    for job in &jobs {
        job.validate().map_err(BackendError::Invalid)?;
    }
    let id = batch_id.to_string();
    conveyor.backend().transact(move |tx| add_jobs_in(tx, &id, jobs)).await
}

pub fn add_jobs_in(tx: &mut dyn Tx, batch_id: &str, jobs: Vec<NewJob>) -> Result<()> {
    let n = jobs.len() as i64;
    let updated = tx.execute(
        "UPDATE batches SET total = total + $2, pending = pending + $2 WHERE id = $1 AND finished_at IS NULL",
        &[batch_id.into(), n.into()],
    )?;
    if updated == 0 {
        return Err(BackendError::NotFound(format!("no unfinished batch {batch_id}")));
    }
    tx.enqueue(jobs.into_iter().map(|j| j.batch(batch_id)).collect())?;
    Ok(())
}

/// Cancels a batch: jobs not yet run are skipped. Returns false if there is no such unfinished,
/// uncancelled batch.
pub async fn cancel(backend: &dyn QueueBackend, batch_id: &str) -> Result<bool> {
    let id = batch_id.to_string();
    let n = backend
        .transact(move |tx| {
            tx.execute(
                "UPDATE batches SET cancelled_at = $2 WHERE id = $1 AND cancelled_at IS NULL AND finished_at IS NULL",
                &[id.into(), now_ms().into()],
            )
        })
        .await?;
    Ok(n == 1)
}

const COLS: &str = "id, name, total, pending, processed, failed, allow_failures, created_at, cancelled_at, finished_at, holds, parent_id";

fn info(r: &crate::backend::Row) -> BatchInfo {
    let (total, pending, failed) = (r.int(2).max(0) as u64, r.int(3).max(0) as u64, r.int(5).max(0) as u64);
    let cancelled_at = r.opt_int(8);
    let finished_at = r.opt_int(9);
    let status = match (finished_at, cancelled_at) {
        (Some(_), Some(_)) | (None, Some(_)) => "cancelled",
        (Some(_), None) if failed > 0 => "failed",
        (Some(_), None) => "finished",
        (None, None) if pending == total => "pending",
        (None, None) => "running",
    };
    BatchInfo {
        id: r.text(0).unwrap_or_default().to_string(),
        name: r.text(1).unwrap_or_default().to_string(),
        total,
        pending,
        processed: r.int(4).max(0) as u64,
        failed,
        progress: if total == 0 { 0.0 } else { ((total - pending) as f64 * 1000.0 / total as f64).round() / 10.0 },
        allow_failures: r.int(6) != 0,
        status: status.to_string(),
        created_at: r.int(7),
        cancelled_at,
        finished_at,
        open: r.int(10) != 0,
        parent_id: r.text(11).map(str::to_string),
    }
}

impl Conveyor {
    /// A batch's counts and status (`None`: no such batch).
    pub async fn batch(&self, id: &str) -> Result<Option<BatchInfo>> {
        find(self.backend().as_ref(), id).await
    }
}

pub async fn find(backend: &dyn QueueBackend, id: &str) -> Result<Option<BatchInfo>> {
    let rows = backend.query(&format!("SELECT {COLS} FROM batches WHERE id = $1"), vec![id.into()]).await?;
    Ok(rows.first().map(info))
}

/// Batches, newest first.
pub async fn list(backend: &dyn QueueBackend, page: Page) -> Result<Paged<BatchInfo>> {
    let count = backend.query(&count_sql("FROM batches"), vec![]).await?.first().map_or(0, |r| r.int(0)) as u64;
    let (after, limit, params) = page.sql("created_at", Some("id"), 1);
    let rows =
        backend.query(&format!("SELECT {COLS} FROM batches WHERE 1 = 1{after} ORDER BY created_at DESC, id DESC{limit}"), params).await?;
    Ok(Paged::from_rows(rows.iter().map(info).collect(), &page, count, |b: &BatchInfo| Cursor::new(b.created_at, b.id.clone())))
}

/// The kinds of a batch's `then` and `finally` callback jobs, when it has them.
pub async fn callback_kinds(backend: &dyn QueueBackend, id: &str) -> Result<(Option<String>, Option<String>)> {
    let rows = backend.query("SELECT then_job, finally_job FROM batches WHERE id = $1", vec![id.into()]).await?;
    let kind = |text: Option<&str>| text.and_then(|t| serde_json::from_str::<NewJob>(t).ok()).map(|j| j.kind);
    Ok(rows.first().map_or((None, None), |r| (kind(r.text(0)), kind(r.text(1)))))
}

/// Whether a batch was cancelled (its remaining jobs are skipped).
pub async fn is_cancelled(backend: &dyn QueueBackend, id: &str) -> Result<bool> {
    let rows = backend.query("SELECT cancelled_at FROM batches WHERE id = $1", vec![id.into()]).await?;
    Ok(rows.first().and_then(|r| r.opt_int(0)).is_some())
}

/// A failed job of the batch went back to its queue: pending again, no longer failed. A batch
/// that has already finished keeps its final counts (the job still runs, uncounted).
pub fn record_retry(tx: &mut dyn Tx, batch_id: &str) -> Result<()> {
    tx.execute(
        "UPDATE batches SET pending = pending + 1, failed = failed - 1 WHERE id = $1 AND finished_at IS NULL AND failed > 0",
        &[batch_id.into()],
    )?;
    Ok(())
}

/// Accounts for a batch job's final outcome. Backends call this inside the transaction that
/// records the outcome; retries and releases are not final and change nothing.
pub fn record_outcome(tx: &mut dyn Tx, c: &Completion) -> Result<()> {
    let Some(batch_id) = &c.batch_id else { return Ok(()) };
    let failed = match c.outcome {
        Outcome::Completed => false,
        Outcome::Failed { .. } => true,
        Outcome::Retry { .. } | Outcome::Release { .. } => return Ok(()),
    };
    count_member(tx, batch_id, failed)
}

/// One member of a batch (a job, or a child batch) finished: `failed` or not.
fn count_member(tx: &mut dyn Tx, batch_id: &str, failed: bool) -> Result<()> {
    let rows = tx.query(
        "UPDATE batches SET pending = pending - 1, processed = processed + $2, failed = failed + $3
         WHERE id = $1 AND pending > 0
         RETURNING pending, failed, allow_failures, cancelled_at, then_job, catch_job, finally_job, parent_id",
        &[batch_id.into(), (!failed as i64).into(), (failed as i64).into()],
    )?;
    let Some(r) = rows.first() else { return Ok(()) };
    settle(tx, batch_id, r, failed)
}

/// After a batch's counters moved (the row as `count_member` and `commit_in` return it):
/// its catch callback at the first failure, and when nothing is pending any more its then and
/// finally callbacks, its end, and its count in its parent.
fn settle(tx: &mut dyn Tx, batch_id: &str, r: &crate::backend::Row, failed: bool) -> Result<()> {
    let now = now_ms();
    let (pending, failures, allow_failures, cancelled) = (r.int(0), r.int(1), r.int(2) != 0, r.opt_int(3).is_some());
    let parent = r.text(7).map(str::to_string);
    let mut callbacks = Vec::new();
    if failed && failures == 1 {
        callbacks.push(r.text(5));
        if !allow_failures && !cancelled {
            tx.execute("UPDATE batches SET cancelled_at = $2 WHERE id = $1", &[batch_id.into(), now.into()])?;
        }
    }
    if pending == 0 {
        if failures == 0 && !cancelled {
            callbacks.push(r.text(4));
        }
        callbacks.push(r.text(6));
        tx.execute("UPDATE batches SET finished_at = $2 WHERE id = $1", &[batch_id.into(), now.into()])?;
    }
    let jobs: Vec<NewJob> = callbacks
        .into_iter()
        .flatten()
        .filter_map(|json| serde_json::from_str::<NewJob>(json).ok())
        .map(|mut j| {
            // A fresh id each time: the stored template is only a template.
            j.id = JobId::new();
            j.tag(format!("batch:{batch_id}"))
        })
        .collect();
    if !jobs.is_empty() {
        tx.enqueue(jobs)?;
    }
    if let (0, Some(parent)) = (pending, parent) {
        count_member(tx, &parent, failures > 0)?;
    }
    Ok(())
}
