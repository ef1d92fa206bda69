//! Typed jobs and events: a payload type that names its kind ([`JobArgs`]) or its event
//! ([`DomainEvent`]), so that enqueueing, handling and listening cannot disagree on a string.
//!
//! ```
//! use conveyor_core::{JobArgs, JobContext, JobResult, NewJob, Registry};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct SendReceipt {
//!     order_id: i64,
//! }
//!
//! impl JobArgs for SendReceipt {
//!     const KIND: &'static str = "send_receipt";
//!     const QUEUE: &'static str = "mail";
//! }
//!
//! let mut registry = Registry::new();
//! registry.job(|args: SendReceipt, _ctx: JobContext| async move {
//!     assert!(args.order_id > 0);
//!     JobResult::Ok(())
//! });
//! assert!(registry.contains("send_receipt"));
//! let job = NewJob::of(&SendReceipt { order_id: 7 });
//! assert_eq!((job.kind.as_str(), job.queue.as_str()), ("send_receipt", "mail"));
//! ```

use std::future::Future;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::backend::BackendError;
use crate::event::{DomainEvent, Event, EventEnvelope};
use crate::job::{JobId, NewJob, DEFAULT_QUEUE};
use crate::registry::{JobContext, JobResult, Registry};
use crate::Conveyor;

/// A job's arguments, typed: the payload is this value as JSON, the kind is [`JobArgs::KIND`].
pub trait JobArgs: Serialize + DeserializeOwned + Send + 'static {
    /// The job kind (unique in the registry).
    const KIND: &'static str;
    /// The queue a job goes to when it names none.
    const QUEUE: &'static str = DEFAULT_QUEUE;
}

impl NewJob {
    /// A job of `args`' kind on its queue, `args` as the payload; the builder methods set the
    /// rest (`.delay(…)`, `.max_attempts(…)`, `.unique(…)`, `.queue(…)`).
    pub fn of<T: JobArgs>(args: &T) -> NewJob {
        NewJob::new(T::KIND, args).queue(T::QUEUE)
    }
}

impl Registry {
    /// Registers the handler of `T`'s kind; its jobs that name only the default queue go to
    /// `T::QUEUE`.
    pub fn job<T, F, Fut>(&mut self, handler: F) -> &mut Self
    where
        T: JobArgs,
        F: Fn(T, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        self.register(T::KIND, handler);
        if T::QUEUE != DEFAULT_QUEUE {
            self.kind_queue(T::KIND, T::QUEUE);
        }
        self
    }

    /// A queued listener of `E`, run as a job on `queue` for every such event, given the event
    /// typed (a payload that does not fit fails the job at once).
    pub fn on<E, F, Fut>(&mut self, name: &str, queue: &str, handler: F) -> &mut Self
    where
        E: DomainEvent + DeserializeOwned + Send + 'static,
        F: Fn(E, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        let handler = std::sync::Arc::new(handler);
        self.listen_queued(E::NAME, name, queue, move |env: EventEnvelope<E>, ctx| {
            let handler = handler.clone();
            async move { handler(env.payload, ctx).await }
        })
    }
}

impl Conveyor {
    /// Enqueues a typed job (see [`NewJob::of`] for options).
    pub async fn enqueue<T: JobArgs>(&self, args: &T) -> Result<JobId, BackendError> {
        self.dispatch(NewJob::of(args)).await
    }

    /// Emits a typed event: logged, its queued listeners enqueued in the same transaction.
    pub async fn publish<E: DomainEvent>(&self, event: &E) -> Result<String, BackendError> {
        self.emit(Event::of(event)).await
    }
}
