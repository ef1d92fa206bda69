//! The queue half of a backend ([`Queue`]): how jobs move — enqueue, reserve, outcomes, leases,
//! reaping, pause / resume / clear, the transitions of delayed and failed jobs — and the
//! transaction whose `tx.enqueue` the queue must hear of.

use std::any::Any;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use super::*;

/// See the module documentation.
///
/// Implementations must keep these invariants, which the conformance suite checks:
/// - an accepted job is pending, delayed, reserved, in the failed store, or completed —
///   never lost, whatever crashes;
/// - a reserved job is held by exactly one lease; completions whose `lease_token` does not
///   match the current reservation change nothing;
/// - `Release` never consumes an attempt; a job whose lease expired goes back to the queue
///   (or to the failed store once its attempts are spent) with its attempt count kept.
#[async_trait]
pub trait Queue: Send + Sync + 'static {
    /// `sqlite`, `postgres`, `redis` or `amqp`.
    fn name(&self) -> &'static str;

    /// Enqueues jobs durably; returns only once they are committed.
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>>;

    /// Reserves up to `max` ready jobs under a lease, moving due delayed jobs first.
    async fn reserve(&self, req: ReserveRequest) -> Result<Vec<Job>>;

    /// Enqueues `jobs`, then reserves up to `reserve.max` ready jobs, in one transaction where
    /// the backend can: a process that both receives jobs and hands them to workers (the
    /// Faktory server) then passes a pushed job on without a commit of its own. SQLite and
    /// PostgreSQL do both in one transaction (both happen or neither); the default makes the
    /// two calls and keeps the enqueue when the reservation fails (its jobs then wait).
    async fn enqueue_and_reserve(&self, jobs: Vec<NewJob>, reserve: ReserveRequest) -> Result<(Vec<EnqueueOutcome>, Vec<Job>)> {
        let out = self.enqueue(jobs).await?;
        match self.reserve(reserve).await {
            Ok(reserved) => Ok((out, reserved)),
            Err(e) => {
                tracing::warn!(error = %e, "reserving after an enqueue failed; the jobs wait for the next reserve");
                Ok((out, Vec::new()))
            }
        }
    }

    /// Records the outcome of many attempts at once.
    async fn complete(&self, completions: Vec<Completion>) -> Result<()>;

    /// Runs `work` and records `completion` in one transaction: either both happen or neither.
    /// Fails with [`BackendError::LeaseLost`] (and rolls `work` back) when the reservation is
    /// gone. Backends whose queue lives outside the relational store implement this with a
    /// completion marker written in the store's transaction.
    async fn complete_with(&self, completion: Completion, work: TxFn) -> Result<Box<dyn Any + Send>>;

    /// Runs one set-wise `work` for many jobs and records their completions, in one
    /// transaction ([`crate::setwise`]). `work` is told which completions' reservations still
    /// hold (in their order) and must act for those only; their completions commit with it,
    /// the others change nothing (their jobs belong to another worker now). Returns `work`'s
    /// result and the same flags. An `Err` rolls everything back.
    async fn complete_many_with(&self, completions: Vec<Completion>, work: ManyTxFn) -> Result<(Box<dyn Any + Send>, Vec<bool>)>;

    /// Extends the leases of jobs still running; jobs whose token no longer matches are skipped.
    async fn extend_leases(&self, leases: Vec<(JobId, i64)>, lease: Duration) -> Result<()>;

    /// Returns jobs whose lease expired to the queue (or to the failed store when their attempts
    /// are spent). Returns how many were reclaimed.
    async fn reap_expired(&self) -> Result<u64>;

    /// The signal workers sleep on when the queue is empty. A backend wakes it after committing
    /// ready work in this process (or on a LISTEN / pub-sub message from another); workers also
    /// poll, so work enqueued elsewhere is noticed within the poll interval.
    fn wakeup(&self) -> Arc<Wakeup>;

    async fn pause(&self, queue: &str) -> Result<()>;

    async fn resume(&self, queue: &str) -> Result<()>;

    /// Deletes pending and delayed jobs of a queue; running jobs finish. Returns how many.
    async fn clear(&self, queue: &str) -> Result<u64>;

    /// Moves failed jobs back to their queue with a fresh attempt count; keeps their ids.
    /// Returns the ids that were found and retried.
    async fn retry_failed(&self, ids: Vec<JobId>) -> Result<Vec<JobId>>;

    async fn retry_all_failed(&self, queue: Option<&str>) -> Result<u64>;

    /// Acts on delayed jobs (scheduled, or waiting to retry) by id; jobs that are not delayed
    /// are left alone. Returns the ids acted on. The default refuses: a backend that cannot.
    async fn act_on_delayed(&self, _ids: Vec<JobId>, _action: DelayedAction) -> Result<Vec<JobId>> {
        Err(BackendError::Invalid(format!("the {} queue cannot act on delayed jobs one by one yet", self.name())))
    }

    /// The broker holding the queue outside the relational store (`redis`, `amqp`), if any.
    fn broker(&self) -> Option<&'static str> {
        None
    }

    /// A cheap round trip to [`broker`](Self::broker), for health checks.
    async fn ping_broker(&self) -> Result<()> {
        Ok(())
    }

    /// Runs `work` in one write transaction of the relational store. `tx.enqueue` inside it is
    /// transactional: a rolled-back transaction enqueues nothing.
    async fn transaction(&self, work: TxFn) -> Result<Box<dyn Any + Send>>;
}
