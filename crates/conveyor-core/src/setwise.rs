//! Set-wise completion: many jobs of one step completed by one transaction whose statements act
//! on them as a set.
//!
//! A handler that ends with [`JobContext::complete_in`](crate::JobContext::complete_in) hands
//! its job's item (an order id, say) to a [`SetWise`]. Items wait while the set's transaction
//! is running; the next one takes them all (up to its `max`), as a group commit does. The
//! transaction ([`crate::backend::Queue::complete_many_with`]):
//!
//! 1. finds which of the jobs' reservations still hold (on PostgreSQL it locks them);
//! 2. runs the set's work once over the held items — one `UPDATE … WHERE id IN (…)` for all of
//!    them instead of one per job — which may decline items (a business failure, as
//!    [`JobContext::decline`](crate::JobContext::decline));
//! 3. records every held job's completion with its hooks (batches, workflows).
//!
//! So the step's effect still commits exactly once with each job's acknowledgement, but a set
//! of jobs costs a few statements and one commit. A job whose lease was lost gets
//! [`BackendError::LeaseLost`] and nothing is done for it. When the set's transaction fails,
//! its items are tried again one by one, each in a transaction of its own, so one bad item
//! fails alone instead of failing its neighbours.

use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

use crate::backend::{BackendError, QueueBackend, Result, Tx};
use crate::job::Completion;

/// What the work made of an item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    Completed,
    /// A business failure with its reason: the job completed, and its workflow (if any)
    /// fails and compensates.
    Declined(String),
}

/// An item as the work sees it.
pub struct Entry<I> {
    pub item: I,
    declined: Option<String>,
}

impl<I> Entry<I> {
    /// Declines this item: its job completes, and its workflow (if any) fails with `reason` and
    /// compensates. What the work writes for it commits too (a declined payment's record); a
    /// work that declines for want of something writes nothing for it.
    pub fn decline(&mut self, reason: impl Into<String>) {
        self.declined = Some(reason.into());
    }

    pub fn declined(&self) -> bool {
        self.declined.is_some()
    }
}

/// The set-wise work: acts on every entry (all of them held by this worker), in one
/// transaction. An `Err` rolls the whole set back.
pub type Work<I> = Arc<dyn Fn(&mut dyn Tx, &mut [Entry<I>]) -> Result<()> + Send + Sync>;

/// One step's set-wise completion (see the module documentation). Build one per handler and
/// share it between the handler's calls; sets never mix jobs of different backends.
pub struct SetWise<I> {
    inner: Arc<Inner<I>>,
}

impl<I> Clone for SetWise<I> {
    fn clone(&self) -> Self {
        SetWise { inner: self.inner.clone() }
    }
}

struct Inner<I> {
    work: Work<I>,
    gather: Gather<Waiter<I>>,
}

/// Calls gathered for the next transaction of their kind while one runs (a group commit): the
/// waiting list and its runners, shared by [`SetWise`] and by anything that writes many
/// callers' rows in one transaction (the payment simulator's ledger, say).
pub struct Gather<T> {
    max: usize,
    state: Mutex<(Vec<T>, usize)>,
}

/// Transactions of one `Gather` that may run side by side. A second one starts only when a
/// full set waits: otherwise the calls wait for the running one, and the next set takes them
/// all.
const PARALLEL: usize = 4;

impl<T> Gather<T> {
    /// Sets of at most `max` calls.
    pub fn new(max: usize) -> Self {
        Gather { max: max.max(1), state: Mutex::new((Vec::new(), 0)) }
    }

    /// Adds a call. True when the caller must start a runner (a task that calls [`Gather::next`]
    /// until it answers `None`): none runs, or a full set waits.
    pub fn push(&self, call: T) -> bool {
        let mut st = self.state.lock().expect("gather state poisoned");
        st.0.push(call);
        let start = st.1 == 0 || (st.1 < PARALLEL && st.0.len() >= self.max);
        if start {
            st.1 += 1;
        }
        start
    }

    /// A runner's next set: the waiting calls that go `with` the first one, up to `max`, in
    /// their order; `None` when none wait, and the runner must end.
    pub fn next(&self, with: impl Fn(&T, &T) -> bool) -> Option<Vec<T>> {
        let mut st = self.state.lock().expect("gather state poisoned");
        if st.0.is_empty() {
            st.1 -= 1;
            return None;
        }
        let waiting = std::mem::take(&mut st.0);
        let (mut set, mut rest) = (Vec::new(), Vec::new());
        for call in waiting {
            if set.is_empty() || (set.len() < self.max && with(&set[0], &call)) {
                set.push(call);
            } else {
                rest.push(call);
            }
        }
        st.0 = rest;
        Some(set)
    }

    /// Held by a runner while it runs: if the runner panics, it no longer counts as running,
    /// so the next call starts another instead of waiting for it forever.
    pub fn runner(&self) -> impl Drop + '_ {
        struct Runner<'a, T>(&'a Gather<T>);
        impl<T> Drop for Runner<'_, T> {
            fn drop(&mut self) {
                if std::thread::panicking() {
                    let mut st = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
                    st.1 = st.1.saturating_sub(1);
                }
            }
        }
        Runner(self)
    }
}

struct Waiter<I> {
    backend: Arc<dyn QueueBackend>,
    completion: Completion,
    item: I,
    reply: oneshot::Sender<Result<Settled>>,
}

impl<I: Clone + Send + 'static> SetWise<I> {
    /// A set of at most `max` jobs per transaction, acted on by `work`.
    pub fn new(max: usize, work: impl Fn(&mut dyn Tx, &mut [Entry<I>]) -> Result<()> + Send + Sync + 'static) -> Self {
        SetWise { inner: Arc::new(Inner { work: Arc::new(work), gather: Gather::new(max) }) }
    }

    /// Adds a job to the next transaction and waits for its outcome.
    pub(crate) async fn submit(&self, backend: Arc<dyn QueueBackend>, completion: Completion, item: I) -> Result<Settled> {
        let (reply, answer) = oneshot::channel();
        if self.inner.gather.push(Waiter { backend, completion, item, reply }) {
            tokio::spawn(self.inner.clone().run());
        }
        answer.await.map_err(|_| BackendError::Other("the set-wise transaction ended without an answer".into()))?
    }
}

impl<I: Clone + Send + 'static> Inner<I> {
    /// Runs transactions while jobs wait: each takes the waiting jobs of the first one's
    /// backend, up to `max`.
    async fn run(self: Arc<Self>) {
        let _runner = self.gather.runner();
        loop {
            let Some(set) = self.gather.next(|a, b| Arc::ptr_eq(&a.backend, &b.backend)) else { return };
            let many = set.len() > 1;
            let set = match self.commit(set).await {
                Ok(()) => continue,
                Err((set, e)) if many => {
                    tracing::info!(error = %e, jobs = set.len(), "a set-wise transaction failed; its jobs are tried one by one");
                    set
                }
                Err((mut set, e)) => {
                    let _ = set.pop().map(|w| w.reply.send(Err(e)));
                    continue;
                }
            };
            for w in set {
                if let Err((mut one, e)) = self.commit(vec![w]).await {
                    let _ = one.pop().map(|w| w.reply.send(Err(e)));
                }
            }
        }
    }

    /// One transaction for `set`: answers every waiter, or gives the set back with the error.
    async fn commit(&self, set: Vec<Waiter<I>>) -> std::result::Result<(), (Vec<Waiter<I>>, BackendError)> {
        let backend = set[0].backend.clone();
        let completions: Vec<Completion> = set.iter().map(|w| w.completion.clone()).collect();
        let items: Vec<(I, Option<String>)> = set.iter().map(|w| (w.item.clone(), w.completion.workflow.clone())).collect();
        let work = self.work.clone();
        let out = backend
            .complete_many_with(
                completions,
                Box::new(move |tx, held| {
                    let (mut entries, mut workflows) = (Vec::new(), Vec::new());
                    for ((item, workflow), _) in items.into_iter().zip(held).filter(|(_, h)| **h) {
                        entries.push(Entry { item, declined: None });
                        workflows.push(workflow);
                    }
                    if !entries.is_empty() {
                        work(tx, &mut entries)?;
                    }
                    for (e, wf) in entries.iter().zip(&workflows) {
                        if let (Some(reason), Some(wf)) = (&e.declined, wf) {
                            crate::workflow::decline_in(tx, wf, reason)?;
                        }
                    }
                    Ok(Box::new(entries.into_iter().map(|e| e.declined).collect::<Vec<_>>()) as Box<dyn std::any::Any + Send>)
                }),
            )
            .await;
        let (out, held) = match out {
            Ok(v) => v,
            Err(e) => return Err((set, e)),
        };
        let mut declined = out.downcast::<Vec<Option<String>>>().expect("the set's work returns its declines").into_iter();
        for (w, held) in set.into_iter().zip(held) {
            let answer = if held {
                Ok(match declined.next().flatten() {
                    None => Settled::Completed,
                    Some(reason) => Settled::Declined(reason),
                })
            } else {
                Err(BackendError::LeaseLost(w.completion.id))
            };
            let _ = w.reply.send(answer);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_wait_for_the_running_set_and_go_together_into_the_next() {
        let g = Gather::new(3);
        assert!(g.push(1), "the first call starts a runner");
        assert!(!g.push(2), "a call while one runs waits for it");
        let odd = |a: &i32, b: &i32| a % 2 == b % 2;
        assert_eq!(g.next(odd), Some(vec![1]), "a set keeps only the calls that go with its first");
        assert_eq!(g.next(odd), Some(vec![2]));
        assert!(!g.push(3) && !g.push(5));
        assert!(g.push(7), "a full set waiting starts a second runner");
        assert_eq!(g.next(odd), Some(vec![3, 5, 7]), "up to max, in order");
        assert_eq!(g.next(odd), None, "one runner ends");
        assert_eq!(g.next(odd), None, "the other too");
        assert!(g.push(1), "with no runner left, a call starts one");
    }

    #[test]
    fn a_runner_that_panics_no_longer_counts_as_running() {
        let g = std::sync::Arc::new(Gather::new(10));
        assert!(g.push(1));
        let g2 = g.clone();
        let died = std::thread::spawn(move || {
            let _runner = g2.runner();
            let _ = g2.next(|_, _| true);
            panic!("a runner's bug");
        })
        .join();
        assert!(died.is_err());
        assert!(g.push(2), "the next call starts a runner instead of waiting for the dead one");
    }
}
