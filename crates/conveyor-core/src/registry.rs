//! Job kinds and their handlers. A handler is a plain async function of a typed payload and a
//! [`JobContext`]; it returns `Ok(())` or a [`JobError`] that tells the engine what to do next.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;

use crate::backend::{BackendError, QueueBackend, Tx};
use crate::job::{Completion, Job, JobId, NewJob, Outcome};
use crate::Conveyor;

/// Why an attempt did not succeed, and what the engine should do about it. The message is what
/// the job keeps and the API shows; the cause, when there is one, is the error the handler hit,
/// for middleware (`retry_on`) and logs that look past the text.
#[derive(Debug)]
pub struct JobError {
    pub message: String,
    pub action: ErrorAction,
    source: Option<Arc<dyn std::error::Error + Send + Sync>>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ErrorAction {
    /// Retry per the job's backoff while attempts remain (the default).
    Retry,
    /// Retry after this delay while attempts remain.
    RetryAfter(Duration),
    /// Fail for good now, whatever attempts remain (bad payload, a 4xx that will never pass).
    Abort,
    /// Put the job back after this delay without consuming an attempt (rate limited, breaker open).
    Release(Duration),
}

impl JobError {
    pub fn new(message: impl fmt::Display, action: ErrorAction) -> Self {
        JobError { message: message.to_string(), action, source: None }
    }
    pub fn retry(message: impl fmt::Display) -> Self {
        JobError::new(message, ErrorAction::Retry)
    }
    pub fn retry_after(message: impl fmt::Display, after: Duration) -> Self {
        JobError::new(message, ErrorAction::RetryAfter(after))
    }
    pub fn abort(message: impl fmt::Display) -> Self {
        JobError::new(message, ErrorAction::Abort)
    }
    pub fn release(after: Duration) -> Self {
        JobError::new("", ErrorAction::Release(after))
    }

    /// Keeps `source` as the error behind this one (the message stays as it is).
    pub fn with_source(mut self, source: impl std::error::Error + Send + Sync + 'static) -> Self {
        self.source = Some(Arc::new(source));
        self
    }

    /// The error the handler hit, when it gave one. Named `cause` rather than `source`:
    /// `JobError` cannot implement [`std::error::Error`] (the blanket `From<E: Error>` below
    /// would then overlap with `From<JobError> for JobError`).
    pub fn cause(&self) -> Option<&(dyn std::error::Error + Send + Sync + 'static)> {
        self.source.as_deref()
    }
}

impl fmt::Display for JobError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

/// Any error converts into a retryable failure that keeps it as its cause, so handlers can use
/// `?`.
impl<E: std::error::Error + Send + Sync + 'static> From<E> for JobError {
    fn from(e: E) -> Self {
        JobError::retry(&e).with_source(e)
    }
}

pub type JobResult = Result<(), JobError>;

/// What a handler sees of the job it runs and of the engine.
#[derive(Clone)]
pub struct JobContext {
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    /// This attempt's number, from 1.
    pub attempt: u32,
    pub max_attempts: u32,
    pub tags: Vec<String>,
    pub batch_id: Option<String>,
    /// `"<workflow id>:<seq>"` for a workflow's step, compensation or rollback job.
    pub workflow: Option<String>,
    /// Cancelled when the worker must stop before the job finished (shutdown grace over).
    pub cancel: CancellationToken,
    pub conveyor: Conveyor,
    pub(crate) completion: Arc<Mutex<CompletionSlot>>,
}

/// Shared between a running handler and the runtime: whether the handler already recorded its
/// own completion transactionally.
pub(crate) struct CompletionSlot {
    pub(crate) template: Completion,
    pub(crate) reserved_at: i64,
    /// The handler took over the acknowledgement (`complete_with` was called).
    pub(crate) done: bool,
    /// ... and it did not commit because the lease was lost.
    pub(crate) lost: bool,
}

impl JobContext {
    pub fn backend(&self) -> &Arc<dyn QueueBackend> {
        self.conveyor.backend()
    }

    /// Dispatches more work.
    pub async fn dispatch(&self, job: NewJob) -> Result<JobId, BackendError> {
        self.conveyor.dispatch(job).await
    }

    /// Ends this job in a **business failure** (a declined payment, an item out of stock):
    /// `work` and the acknowledgement commit in one transaction as with [`complete_with`], the
    /// job counts as completed (the failed store keeps faults only), and when the job is a
    /// workflow step the workflow fails with `reason` and runs its compensations. Outside a
    /// workflow it is a completion with `work`.
    ///
    /// [`complete_with`]: JobContext::complete_with
    pub async fn decline<F>(&self, reason: impl Into<String>, work: F) -> Result<(), BackendError>
    where
        F: FnOnce(&mut dyn Tx) -> Result<(), BackendError> + Send + 'static,
    {
        let (reason, workflow) = (reason.into(), self.workflow.clone());
        tracing::info!(reason = %reason, "job declined: a business outcome, not a fault");
        self.complete_with(move |tx| {
            work(tx)?;
            match &workflow {
                Some(w) => crate::workflow::decline_in(tx, w, &reason),
                None => Ok(()),
            }
        })
        .await
    }

    /// Commits `work` together with this job's acknowledgement, in one transaction: the effect
    /// happens exactly once even though delivery is at-least-once. If this worker's lease was
    /// lost (the job now belongs to another worker), nothing is committed and
    /// [`BackendError::LeaseLost`] is returned; the handler should then return, and the runtime
    /// will not acknowledge the job again.
    pub async fn complete_with<R, F>(&self, work: F) -> Result<R, BackendError>
    where
        R: Send + 'static,
        F: FnOnce(&mut dyn Tx) -> Result<R, BackendError> + Send + 'static,
    {
        let completion = self.take_completion()?;
        let out = self.backend().complete_with(completion, Box::new(move |tx| work(tx).map(|r| Box::new(r) as Box<dyn Any + Send>))).await;
        match out {
            Ok(v) => Ok(*v.downcast::<R>().expect("complete_with returns what its closure returned")),
            Err(e) => Err(self.not_committed(e)),
        }
    }

    /// Commits this job's completion with the other jobs of `set`'s next transaction, whose
    /// set-wise work acts on `item` ([`crate::setwise`]): as [`complete_with`], but one
    /// transaction and one set of statements for many jobs. Returns whether the work completed
    /// or declined the item (a business failure, as with [`decline`]).
    ///
    /// [`complete_with`]: JobContext::complete_with
    /// [`decline`]: JobContext::decline
    pub async fn complete_in<I: Clone + Send + 'static>(
        &self,
        set: &crate::setwise::SetWise<I>,
        item: I,
    ) -> Result<crate::setwise::Settled, BackendError> {
        let completion = self.take_completion()?;
        set.submit(self.backend().clone(), completion, item).await.map_err(|e| self.not_committed(e))
    }

    /// Takes over this job's acknowledgement for a transactional completion: the completion to
    /// record, or an error when it was taken already.
    fn take_completion(&self) -> Result<Completion, BackendError> {
        let mut slot = self.completion.lock().expect("completion slot poisoned");
        if slot.done {
            return Err(BackendError::Other("job already completed".into()));
        }
        // Marked before the await so a concurrent return cannot ack twice; a failure below
        // is reported to the handler, and the lease expiry recovers the job if needed.
        slot.done = true;
        let mut c = slot.template.clone();
        c.outcome = Outcome::Completed;
        c.runtime_ms = (crate::clock::now_ms() - slot.reserved_at).max(0) as u64;
        Ok(c)
    }

    /// Notes that a transactional completion did not commit, and returns its error.
    fn not_committed(&self, e: BackendError) -> BackendError {
        let mut slot = self.completion.lock().expect("completion slot poisoned");
        if matches!(e, BackendError::LeaseLost(_)) {
            slot.lost = true;
        } else {
            // The commit did not happen: let the runtime record the attempt's outcome.
            slot.done = false;
        }
        e
    }
}

type BoxFuture = Pin<Box<dyn Future<Output = JobResult> + Send>>;
type ErasedHandler = Arc<dyn Fn(&Job, JobContext) -> BoxFuture + Send + Sync>;

/// Maps job kinds to handlers, and event names to listeners.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, ErasedHandler>,
    pub(crate) listeners: HashMap<String, Vec<crate::event::Listener>>,
    middleware: HashMap<String, Vec<crate::middleware::Middleware>>,
    /// Per-kind defaults of the jobs that do not choose for themselves.
    options: HashMap<String, KindOptions>,
    /// Per-kind concurrency keys (see [`crate::flow`]).
    concurrency: HashMap<String, crate::flow::Rule>,
}

/// A kind's defaults for its jobs (`[[kinds]]` in the configuration, an HTTP kind, a typed
/// kind's queue).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KindOptions {
    /// For jobs that name no queue but the default one.
    pub queue: Option<String>,
    /// For jobs that did not set their attempts.
    pub max_attempts: Option<u32>,
    /// For jobs without a timeout of their own.
    pub timeout: Option<Duration>,
    /// At most `limit` jobs of the kind with the same key run at once (see [`crate::flow`]).
    pub concurrency: Option<crate::flow::Rule>,
    /// A dotted path into the payload whose value is the fairness key of jobs that carry none
    /// (see [`crate::fair`]).
    pub fairness: Option<String>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `handler` for `kind`. The payload is deserialized into `T`; a payload that
    /// does not fit fails the job at once (retrying cannot fix it).
    pub fn register<T, F, Fut>(&mut self, kind: &str, handler: F) -> &mut Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(T, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let kind_name = kind.to_string();
        let erased: ErasedHandler = Arc::new(move |job: &Job, ctx: JobContext| match serde_json::from_str::<T>(&job.payload) {
            Ok(payload) => Box::pin(handler(payload, ctx)) as BoxFuture,
            Err(e) => {
                let msg = format!("payload does not fit job kind {kind_name}: {e}");
                Box::pin(async move { Err(JobError::abort(msg)) })
            }
        });
        self.handlers.insert(kind.to_string(), erased);
        self
    }

    /// Registers `handler` for `kind` with the payload as the JSON text it was stored as, for a
    /// handler that passes it on untouched (an HTTP kind posts it without parsing it).
    pub fn register_raw<F, Fut>(&mut self, kind: &str, handler: F) -> &mut Self
    where
        F: Fn(String, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        let handler = Arc::new(handler);
        let erased: ErasedHandler = Arc::new(move |job: &Job, ctx: JobContext| Box::pin(handler(job.payload.clone(), ctx)) as BoxFuture);
        self.handlers.insert(kind.to_string(), erased);
        self
    }

    /// Whether this registry runs `kind` (a local kind; see [`crate::lane`]).
    pub fn contains(&self, kind: &str) -> bool {
        self.handlers.contains_key(kind)
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.handlers.keys().map(String::as_str)
    }

    pub(crate) fn get(&self, kind: &str) -> Option<&ErasedHandler> {
        self.handlers.get(kind)
    }

    /// Makes `queue` the queue of `kind`'s jobs that name no queue but the default one (an HTTP
    /// kind's own queue, so its jobs wait on the network apart from the CPU-bound kinds).
    pub fn kind_queue(&mut self, kind: &str, queue: &str) -> &mut Self {
        self.options.entry(kind.to_string()).or_default().queue = Some(queue.to_string());
        self
    }

    /// Sets `kind`'s defaults (the fields given replace those set before).
    pub fn kind_options(&mut self, kind: &str, options: KindOptions) -> &mut Self {
        let o = self.options.entry(kind.to_string()).or_default();
        o.queue = options.queue.or(o.queue.take());
        o.max_attempts = options.max_attempts.or(o.max_attempts);
        o.timeout = options.timeout.or(o.timeout);
        o.concurrency = options.concurrency.or(o.concurrency.take());
        o.fairness = options.fairness.or(o.fairness.take());
        self
    }

    /// `kind`'s defaults, if it has any.
    pub fn options_of(&self, kind: &str) -> Option<&KindOptions> {
        self.options.get(kind)
    }

    /// Applies the kind's defaults to a job about to be enqueued: its queue when the job names
    /// only the default queue, its attempts when the job did not set them, its timeout when
    /// the job has none, its fairness key (from the payload) when the job has none.
    pub fn route(&self, job: &mut NewJob) {
        let Some(o) = self.options.get(&job.kind) else { return };
        if job.queue == crate::job::DEFAULT_QUEUE {
            if let Some(q) = &o.queue {
                job.queue.clone_from(q);
            }
        }
        if let (Some(n), false) = (o.max_attempts, job.attempts_set()) {
            job.max_attempts = n.max(1);
        }
        if job.timeout.is_none() {
            job.timeout = o.timeout;
        }
        if let (Some(path), None) = (&o.fairness, job.fairness_key()) {
            let key = serde_json::from_str(&job.payload).ok().and_then(|p| crate::flow::value_at(path, &p));
            if let Some(key) = key.filter(|k| crate::fair::check_key(k).is_ok()) {
                job.tags.push(crate::fair::tag(&key));
            }
        }
    }

    /// Adds middleware to a job kind; they apply in the order added.
    pub fn middleware(&mut self, kind: &str, mw: crate::middleware::Middleware) -> &mut Self {
        self.middleware.entry(kind.to_string()).or_default().push(mw);
        self
    }

    /// At most `rule.limit` jobs of `kind` with the same key (the payload's value at
    /// `rule.path`) run at once, across every worker sharing the store; this limit wins over
    /// the one a job carries (see [`crate::flow`]).
    pub fn concurrency(&mut self, kind: &str, rule: crate::flow::Rule) -> &mut Self {
        self.concurrency.insert(kind.to_string(), rule);
        self
    }

    pub(crate) fn concurrency_of(&self, kind: &str) -> Option<&crate::flow::Rule> {
        self.concurrency.get(kind).or_else(|| self.options.get(kind).and_then(|o| o.concurrency.as_ref()))
    }

    pub(crate) fn middleware_of(&self, kind: &str) -> &[crate::middleware::Middleware] {
        self.middleware.get(kind).map_or(&[], Vec::as_slice)
    }

    /// The listeners of `event`, then those of every event (`"*"`).
    pub(crate) fn listeners_of(&self, event: &str) -> impl Iterator<Item = &crate::event::Listener> {
        let named = self.listeners.get(event).map_or(&[][..], Vec::as_slice);
        let any = if event == "*" { &[][..] } else { self.listeners.get("*").map_or(&[][..], Vec::as_slice) };
        named.iter().chain(any)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &str) -> JobResult {
        std::fs::read(path)?;
        Ok(())
    }

    #[test]
    fn question_mark_keeps_the_error_as_its_cause() {
        let e = read("/no/such/conveyor/file").unwrap_err();
        assert_eq!(e.action, ErrorAction::Retry);
        let io = e.cause().and_then(|c| c.downcast_ref::<std::io::Error>()).expect("the io::Error is the cause");
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        assert_eq!(e.message, io.to_string(), "the message is the error's text, as before");
    }

    #[test]
    fn constructors_have_no_cause_until_given_one() {
        assert!(JobError::abort("bad payload").cause().is_none());
        let e = JobError::abort("bad payload").with_source(std::io::Error::other("disk full"));
        assert_eq!(e.message, "bad payload");
        assert_eq!(e.action, ErrorAction::Abort);
        assert_eq!(e.cause().map(|c| c.to_string()).as_deref(), Some("disk full"));
    }

    #[test]
    fn a_kinds_fairness_path_keys_its_jobs_that_carry_none() {
        let mut r = Registry::new();
        r.kind_options("sync", KindOptions { fairness: Some("shop.id".into()), ..KindOptions::default() });
        let routed = |job: NewJob| {
            let mut job = job;
            r.route(&mut job);
            job.fairness_key().map(str::to_string)
        };
        assert_eq!(routed(NewJob::raw("sync", r#"{"shop":{"id":7}}"#.into())), Some("7".into()));
        assert_eq!(routed(NewJob::raw("sync", r#"{"shop":{"id":7}}"#.into()).fairness("mine")), Some("mine".into()), "the job's own wins");
        assert_eq!(routed(NewJob::raw("sync", r#"{"shop":{}}"#.into())), None, "no value at the path: no key");
        assert_eq!(routed(NewJob::raw("other", r#"{"shop":{"id":7}}"#.into())), None);
    }

    #[test]
    fn kind_options_keep_every_option_given() {
        let mut r = Registry::new();
        let rule = crate::flow::Rule::new("customer_id", 2).unwrap();
        r.kind_options("k", KindOptions { concurrency: Some(rule.clone()), ..KindOptions::default() });
        r.kind_options("k", KindOptions { queue: Some("q".into()), fairness: Some("shop".into()), ..KindOptions::default() });
        assert_eq!(r.concurrency_of("k"), Some(&rule));
        let o = r.options_of("k").unwrap();
        assert_eq!((o.queue.as_deref(), o.fairness.as_deref()), (Some("q"), Some("shop")));
    }
}
