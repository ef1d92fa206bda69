//! Conveyor's engine: the job model, the backend contract, and the worker runtime.
//!
//! - [`job`]: what is enqueued ([`NewJob`]), reserved ([`Job`]) and recorded ([`Completion`]).
//! - [`backend`]: the [`QueueBackend`] trait every backend implements, and [`Tx`], SQL work that
//!   shares a transaction with queue operations (transactional enqueue and completion).
//! - [`registry`]: job kinds, handlers, [`JobContext`], and [`JobError`] that steers retries.
//! - [`worker`]: supervisors, batched fetch and acknowledge, leases, reaper, graceful shutdown.
//! - [`metrics`]: per-minute counts and histograms per queue and kind.
//! - [`wakeup`]: the "work is ready" signal idle workers sleep on.
//!
//! The engine depends on no database driver, HTTP stack or broker client.

pub mod args;
pub mod backend;
pub mod balance;
pub mod batch;
pub mod breaker;
pub mod cache;
pub mod clock;
pub mod cron;
pub mod debounce;
pub mod event;
pub mod fair;
pub mod flow;
pub mod hooks;
pub mod job;
pub mod lane;
pub mod liveness;
pub mod lock;
pub mod metrics;
pub mod middleware;
pub mod migrate;
pub mod ratelimit;
pub mod redact;
pub mod registry;
pub mod scheduler;
pub mod setwise;
pub mod state;
pub mod telemetry;
pub mod trace;
pub mod wakeup;
pub mod worker;
pub mod workflow;

use std::sync::Arc;

pub use args::JobArgs;
pub use backend::{BackendError, QueueBackend, QueueBackendExt, Tx, TxFn};
pub use event::{DomainEvent, Event};
pub use job::{Backoff, Completion, EnqueueOutcome, Job, JobId, NewJob, Outcome};
pub use registry::{JobContext, JobError, JobResult, KindOptions, Registry};

/// The handle applications hold: dispatch jobs, reach the backend. Cheap to clone.
#[derive(Clone)]
pub struct Conveyor {
    inner: Arc<Inner>,
}

struct Inner {
    backend: Arc<dyn QueueBackend>,
    registry: Registry,
}

impl Conveyor {
    pub fn new(backend: Arc<dyn QueueBackend>, registry: Registry) -> Self {
        Conveyor { inner: Arc::new(Inner { backend, registry }) }
    }

    pub fn backend(&self) -> &Arc<dyn QueueBackend> {
        &self.inner.backend
    }

    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// Enqueues one job; a duplicate of a unique job returns the existing job's id.
    pub async fn dispatch(&self, job: NewJob) -> Result<JobId, BackendError> {
        let out = self.dispatch_many(vec![job]).await?;
        Ok(out[0].id())
    }

    /// Enqueues many jobs in one backend call (one transaction / one round trip).
    pub async fn dispatch_many(&self, mut jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>, BackendError> {
        let mut debounced = Vec::new();
        for job in &mut jobs {
            self.inner.registry.route(job);
            job.validate().map_err(BackendError::Invalid)?;
            if let Some(d) = debounce::Debounce::of_tags(&job.tags) {
                debounce::delay(job);
                debounced.push((d.key, job.id));
            }
        }
        let out = self.inner.backend.enqueue(jobs).await?;
        if !debounced.is_empty() {
            let enqueued: Vec<(String, JobId)> = debounced
                .into_iter()
                .filter(|(_, id)| out.iter().any(|o| matches!(o, EnqueueOutcome::Enqueued { id: e } if e == id)))
                .collect();
            debounce::record(&self.inner.backend, &enqueued).await?;
        }
        Ok(out)
    }
}
