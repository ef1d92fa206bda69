//! What every Faktory connection of a process shares: jobs reserved ahead and handed out by
//! `FETCH` from memory, the reservations remote workers hold (by `jid`, owned by the worker's
//! `wid`, not by a connection), the remote workers themselves, and the flusher that records
//! acknowledgements and failures in batches.
//!
//! Reservations in the store: a reserve takes up to [`BATCH`] jobs of one queue's remote lane
//! under a lease held by this process ([`STORE_LEASE`], extended every [`EXTEND_EVERY`] while
//! the jobs are buffered or held), so a `FETCH` costs no store transaction of its own. Each
//! job handed out gets its own deadline from `reserve_for`; a job whose deadline passes, or
//! whose worker missed two `BEAT`s, fails its attempt (and retries) without waiting for the
//! store's lease. If this process dies, the store's lease runs out and the reaper returns
//! the jobs. Jobs left in a buffer for [`BUFFER_TTL`] are released (their attempt given
//! back), so they do not wait here while another process has idle workers; a queue paused
//! anywhere releases its buffer at the next `FETCH`. A job with a concurrency key takes its
//! slot when it is handed out, not when buffered ([`slots`]); the background duties are in
//! [`upkeep`].

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use conveyor_core::backend::ReserveRequest;
use conveyor_core::clock::now_ms;
use conveyor_core::job::EnqueueOutcome;
use conveyor_core::job::Outcome;
use conveyor_core::wakeup::Bell;
use conveyor_core::{lane, BackendError, Completion, Conveyor, Job, NewJob};

use super::job;

mod batchers;
mod slots;
mod upkeep;
mod workers;

use workers::RemoteWorker;

/// Jobs reserved from the store at once for one queue (a reserve covers every queue a `FETCH`
/// names whose buffer is empty).
pub(crate) const BATCH: usize = 32;
/// The store's lease on buffered and held jobs (extended while they are).
pub(crate) const STORE_LEASE: Duration = Duration::from_secs(60);
pub(crate) const EXTEND_EVERY: Duration = Duration::from_secs(10);
/// How long a job may wait in a buffer before it is given back to the queue.
pub(crate) const BUFFER_TTL: Duration = Duration::from_secs(5);
/// How long an empty `FETCH` waits for a job.
pub(crate) const FETCH_WAIT: Duration = Duration::from_secs(2);
/// How often a waiting `FETCH` looks again for jobs enqueued by other processes.
const POLL: Duration = Duration::from_millis(200);
/// A worker's beat interval until two beats tell it.
const DEFAULT_BEAT: Duration = Duration::from_secs(15);
/// Added to two beat intervals before a worker counts as gone.
const BEAT_SLACK: Duration = Duration::from_secs(5);

/// What a server asks of a remote worker on its next `BEAT`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signal {
    Quiet,
    Terminate,
}

impl Signal {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Signal::Quiet => "quiet",
            Signal::Terminate => "terminate",
        }
    }
}

struct Buffered {
    job: Job,
    since: Instant,
}

struct Held {
    job: Job,
    wid: Option<String>,
    fetched: Instant,
    deadline: Instant,
    /// The attempt's span, ended by `ACK` or `FAIL` (see [`conveyor_core::trace`]).
    attempt: Option<conveyor_core::trace::Attempt>,
    /// The concurrency key whose slot the job holds.
    slot: Option<String>,
}

#[derive(Default)]
struct State {
    buffers: HashMap<String, VecDeque<Buffered>>,
    held: HashMap<String, Held>,
    workers: HashMap<String, RemoteWorker>,
    /// Per queue: the wake-up mark and time of the last reserve that found nothing.
    empty: HashMap<String, (u64, Instant)>,
    /// Per queue: when a `FETCH` last asked for it (pushes then reserve ahead for it).
    wanted: HashMap<String, Instant>,
}

/// Counters for `INFO` (since this process started).
#[derive(Default)]
pub(crate) struct Stats {
    pub(crate) connections: AtomicU64,
    pub(crate) commands: AtomicU64,
    pub(crate) enqueued: AtomicU64,
    pub(crate) processed: AtomicU64,
    pub(crate) failures: AtomicU64,
}

/// Outcomes waiting for the flusher; a full queue makes `ACK` and `FAIL` wait (backpressure).
const FLUSH_QUEUE: usize = 20_000;
/// Pushes of one store commit at most.
const PUSH_BATCH: usize = 5_000;

type Pushes = (Vec<NewJob>, oneshot::Sender<Result<Vec<EnqueueOutcome>, BackendError>>);

pub(crate) struct Hub {
    pub(crate) conveyor: Conveyor,
    /// The name this process reserves under.
    owner: String,
    pub(crate) started: Instant,
    state: Mutex<State>,
    refill: tokio::sync::Mutex<()>,
    /// Reserves made, so that a `FETCH` knows whether one happened while it waited.
    refills: AtomicU64,
    /// Rung when jobs are put in a buffer: a push reserved in its own commit wakes no store
    /// waiter (nothing is left pending), so a waiting `FETCH` hears of it here.
    buffered: Bell,
    flush: mpsc::Sender<Completion>,
    pushes: mpsc::Sender<Pushes>,
    paused: tokio::sync::Mutex<(Option<Instant>, HashSet<String>)>,
    pub(crate) stats: Stats,
}

impl Hub {
    /// The hub and its background tasks (flusher, deadlines, lease extension), which stop with
    /// `shutdown` after giving buffered jobs back.
    pub(crate) fn start(conveyor: Conveyor, shutdown: CancellationToken) -> Arc<Hub> {
        let (tx, rx) = mpsc::channel(FLUSH_QUEUE);
        let (push_tx, push_rx) = mpsc::channel(1024);
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let hub = Arc::new(Hub {
            conveyor,
            owner: conveyor_core::liveness::holder(&format!("faktory@{host}"), None),
            started: Instant::now(),
            state: Mutex::new(State::default()),
            refill: tokio::sync::Mutex::new(()),
            refills: AtomicU64::new(0),
            buffered: Bell::default(),
            flush: tx,
            pushes: push_tx,
            paused: tokio::sync::Mutex::new((None, HashSet::new())),
            stats: Stats::default(),
        });
        tokio::spawn(batchers::flusher(hub.conveyor.clone(), rx));
        tokio::spawn(batchers::pusher(hub.clone(), push_rx));
        tokio::spawn(upkeep::maintain(hub.clone(), shutdown));
        hub
    }

    /// `FETCH`: the first job of the first queue that has one, waiting up to [`FETCH_WAIT`].
    pub(crate) async fn fetch(self: &Arc<Self>, queues: &[String], wid: Option<&str>) -> Result<Option<Value>, BackendError> {
        let wake = self.conveyor.backend().wakeup();
        let deadline = Instant::now() + FETCH_WAIT;
        {
            let mut st = self.state();
            let now = Instant::now();
            for q in queues {
                st.wanted.insert(q.clone(), now);
            }
            if let Some(w) = wid.and_then(|w| st.workers.get_mut(w)) {
                w.queues = queues.to_vec();
            }
        }
        loop {
            let mark = wake.mark_remote();
            let rung = self.buffered.mark();
            let mut open = Vec::with_capacity(queues.len());
            for q in queues {
                if !self.is_paused(q).await? {
                    open.push(q.as_str());
                }
            }
            if let Some((job, behind)) = self.take_buffered(&open, mark) {
                if !behind.is_empty() && self.refill.try_lock().is_ok() {
                    // Queues before this job's may hold jobs the store has not handed over yet:
                    // fetch them into their buffers (unless a reserve is under way), so the
                    // next FETCH sees them first.
                    let hub = self.clone();
                    tokio::spawn(async move {
                        let Ok(_guard) = hub.refill.try_lock() else { return };
                        let mark = hub.conveyor.backend().wakeup().mark_remote();
                        let req = ReserveRequest {
                            max: BATCH * behind.len(),
                            queues: behind.iter().map(|q| lane::remote(q)).collect(),
                            lease: STORE_LEASE,
                            worker: hub.owner.clone(),
                        };
                        let max = req.max;
                        let jobs = hub.conveyor.backend().reserve(req).await;
                        hub.refills.fetch_add(1, Ordering::AcqRel);
                        match jobs {
                            Ok(jobs) => hub.buffer(jobs, max, &behind.iter().map(String::as_str).collect::<Vec<_>>(), mark),
                            Err(e) => debug!(error = %e, "reserving ahead for FETCH failed"),
                        }
                    });
                }
                match self.hand_out(job, wid).await {
                    Some(v) => return Ok(Some(v)),
                    None => continue,
                }
            }
            if let Some(job) = self.refill(&open).await? {
                match self.hand_out(job, wid).await {
                    Some(v) => return Ok(Some(v)),
                    None => continue,
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            let wait = POLL.min(deadline - now);
            tokio::select! {
                _ = wake.wait_remote(mark, wait) => {}
                _ = self.buffered.wait(rung, wait) => {}
            }
        }
    }

    /// The first buffered job in queue order, and the queues before it that are not known to
    /// be empty (a reserve found nothing in them and nothing was enqueued since): the store may
    /// hold jobs of those that come first, which the caller fetches into their buffers. A job
    /// in a buffer is not held back for them: the order holds among what was reserved.
    fn take_buffered(&self, queues: &[&str], mark: u64) -> Option<(Job, Vec<String>)> {
        let mut st = self.state();
        let mut behind = Vec::new();
        for q in queues {
            if let Some(job) = st.buffers.get_mut(*q).and_then(|b| b.pop_front()) {
                return Some((job.job, behind));
            }
            if !st.empty.get(*q).is_some_and(|(m, at)| *m == mark && at.elapsed() < POLL) {
                behind.push(q.to_string());
            }
        }
        None
    }

    fn pop_first(&self, queues: &[&str]) -> Option<Job> {
        let mut st = self.state();
        queues.iter().find_map(|q| st.buffers.get_mut(*q).and_then(|b| b.pop_front()).map(|b| b.job))
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `queue` is paused (read from the store at most every 500 ms). A paused queue's
    /// buffer is given back.
    async fn is_paused(&self, queue: &str) -> Result<bool, BackendError> {
        let mut cache = self.paused.lock().await;
        if cache.0.is_none_or(|at| at.elapsed() > Duration::from_millis(500)) {
            let stats = self.conveyor.backend().queues().await?;
            cache.1 = stats.into_iter().filter(|s| s.paused).map(|s| s.queue).collect();
            cache.0 = Some(Instant::now());
        }
        let paused = cache.1.contains(queue);
        drop(cache);
        if paused {
            let jobs: Vec<Job> = self.state().buffers.remove(queue).map(|b| b.into_iter().map(|b| b.job).collect()).unwrap_or_default();
            self.give_back(jobs).await;
        }
        Ok(paused)
    }

    /// Forgets the cached paused queues (after this process paused or resumed one).
    pub(crate) async fn pauses_changed(&self) {
        self.paused.lock().await.0 = None;
    }

    /// Reserves jobs of `queues` (in order, up to [`BATCH`] a queue) into their buffers and
    /// hands out the first in queue order. One reserve at a time per process: a `FETCH` that
    /// waited for another's reserve takes from what it brought.
    async fn refill(&self, queues: &[&str]) -> Result<Option<Job>, BackendError> {
        if queues.is_empty() {
            return Ok(None);
        }
        let before = self.refills.load(Ordering::Acquire);
        let _guard = self.refill.lock().await;
        if self.refills.load(Ordering::Acquire) != before {
            // Another FETCH reserved while this one waited: take from what it brought.
            return Ok(self.pop_first(queues));
        }
        let backend = self.conveyor.backend();
        let mark = backend.wakeup().mark_remote();
        let needed: Vec<&str> = {
            let st = self.state();
            queues
                .iter()
                .copied()
                .filter(|q| st.buffers.get(*q).is_none_or(VecDeque::is_empty))
                .filter(|q| !st.empty.get(*q).is_some_and(|(m, at)| *m == mark && at.elapsed() < POLL))
                .collect()
        };
        if !needed.is_empty() {
            let req = ReserveRequest {
                queues: needed.iter().map(|q| lane::remote(q)).collect(),
                max: BATCH * needed.len(),
                lease: STORE_LEASE,
                worker: self.owner.clone(),
            };
            let max = req.max;
            let jobs = backend.reserve(req).await;
            self.refills.fetch_add(1, Ordering::AcqRel);
            self.buffer(jobs?, max, &needed, mark);
        }
        Ok(self.pop_first(queues))
    }

    /// Records `job` as held by `wid` until its `reserve_for` and returns what the worker gets;
    /// `None` when the job expired (`custom.expires_at`): it goes to the failed store unrun,
    /// saying so, when a later job of its debounce key superseded it (it completes unrun), or
    /// when its concurrency key is at its limit (it is parked, see [`slots`]); the caller looks
    /// for another.
    async fn hand_out(&self, job: Job, wid: Option<&str>) -> Option<Value> {
        let (jid, value, reserve_for) = job::fetched(&job);
        if let Some(at) = job::expired_at(&value, now_ms()) {
            let error = format!("expired at {} before a worker fetched it (custom.expires_at); not run", job::rfc3339(at));
            let mut job = job;
            job.max_attempts = job.attempt;
            let c = Completion::of(&job, Outcome::Failed { error });
            if let Err(e) = self.record(c).await {
                warn!(error = %e, "recording an expired Faktory job failed; its lease will return it");
            }
            return None;
        }
        // A debounced job that a later one of its key superseded completes unrun.
        if conveyor_core::debounce::superseded(self.conveyor.backend(), &job).await.unwrap_or(false) {
            debug!(jid = %jid, "superseded by a later job of its debounce key; not handed out");
            if let Err(e) = self.record(Completion::of(&job, Outcome::Completed)).await {
                warn!(error = %e, "recording a superseded Faktory job failed; its lease will return it");
            }
            return None;
        }
        let slot = match self.take_slot(&job).await {
            slots::Slot::Free => None,
            slots::Slot::Held(key) => Some(key),
            slots::Slot::Parked => return None,
        };
        // `unique_until: "start"`: the key is free once a worker has the job.
        if let Some(key) = job.unique_key.as_deref().filter(|_| job::unique_until_start(&value)) {
            if let Err(e) = self.conveyor.backend().release_unique(key, job.id).await {
                warn!(jid = %jid, error = %e, "freeing the unique key of a started job failed; it expires with its TTL");
            }
        }
        // The remote attempt is a consumer span like a local one; the worker gets its context
        // as `custom.traceparent`, so what it does joins the trace.
        let attempt = conveyor_core::trace::Attempt::begin(&job);
        let mut value = value;
        if let (Some(a), Some(o)) = (&attempt, value.as_object_mut()) {
            let custom = o.entry("custom").or_insert_with(|| Value::Object(Default::default()));
            if let Some(c) = custom.as_object_mut() {
                c.insert("traceparent".into(), Value::String(a.ctx.traceparent()));
            }
        }
        let now = Instant::now();
        let held =
            Held { job, wid: wid.map(str::to_string), fetched: now, deadline: now + Duration::from_secs(reserve_for), attempt, slot };
        if let Some(old) = self.state().held.insert(jid.clone(), held) {
            // Two jobs under one jid: the older reservation is left to its deadline.
            warn!(jid = %jid, job = %old.job.id, "FETCH handed out a second job with the same jid");
        }
        Some(value)
    }

    /// `ACK`: records the held job as done and returns it. `None` when no job is held under
    /// `jid` (finished, expired and retried, or held by another process): clients re-send
    /// acknowledgements, so that is not an error.
    pub(crate) async fn ack(&self, jid: &str) -> Result<Option<Job>, BackendError> {
        let Some(mut held) = self.release_held(jid) else { return Ok(None) };
        self.give_slot(held.slot.as_deref(), &held.job).await;
        if let Some(a) = held.attempt.take() {
            a.end("completed", None);
        }
        let mut c = Completion::of(&held.job, Outcome::Completed);
        c.runtime_ms = held.fetched.elapsed().as_millis() as u64;
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
        self.record(c).await.map(|()| Some(held.job))
    }

    /// `FAIL`: the attempt failed with `error`; retried after Faktory's backoff while attempts
    /// are left, else the job goes to the failed store. Returns the job and whether it is dead.
    pub(crate) async fn fail(&self, jid: &str, error: String) -> Result<Option<(Job, bool)>, BackendError> {
        let Some(mut held) = self.release_held(jid) else { return Ok(None) };
        self.give_slot(held.slot.as_deref(), &held.job).await;
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let delay = job::backoff(held.job.attempt.saturating_sub(1));
        let outcome = failure(&held.job, error, delay);
        let dead = matches!(outcome, Outcome::Failed { .. });
        if let Some(a) = held.attempt.take() {
            a.end(if dead { "failed" } else { "retried" }, Some(error_of(&outcome)));
        }
        let mut c = Completion::of(&held.job, outcome);
        c.runtime_ms = held.fetched.elapsed().as_millis() as u64;
        self.record(c).await.map(|()| Some((held.job, dead)))
    }

    fn release_held(&self, jid: &str) -> Option<Held> {
        let mut st = self.state();
        let held = st.held.remove(jid)?;
        if let Some(w) = held.wid.as_ref().and_then(|w| st.workers.get_mut(w)) {
            w.processed += 1;
        }
        Some(held)
    }

    /// Extends the deadline of a held job (`TRACK SET reserve_until`); never shortens it.
    pub(crate) fn extend(&self, jid: &str, until_ms: i64) -> bool {
        let mut st = self.state();
        let Some(held) = st.held.get_mut(jid) else { return false };
        let from_now = Duration::from_millis((until_ms - now_ms()).max(0) as u64).min(Duration::from_secs(job::MAX_RESERVE_S));
        held.deadline = held.deadline.max(Instant::now() + from_now);
        true
    }

    /// Whether a job is held under `jid` here.
    pub(crate) fn holds(&self, jid: &str) -> bool {
        self.state().held.contains_key(jid)
    }

    /// Hands an outcome to the flusher, which records it with the others of its batch. `ACK`
    /// and `FAIL` are answered once it is queued: a crash before the batch commits runs the
    /// job again (delivery is at least once; a `PUSH` waits for its commit).
    async fn record(&self, c: Completion) -> Result<(), BackendError> {
        self.flush.send(c).await.map_err(|_| BackendError::Unavailable("the Faktory server is stopping".into()))
    }

    /// Enqueues `jobs` together with the pushes of other connections that arrive meanwhile, in
    /// one store commit (answered once it is durable).
    pub(crate) async fn push(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>, BackendError> {
        let (tx, rx) = oneshot::channel();
        self.pushes.send((jobs, tx)).await.map_err(|_| BackendError::Unavailable("the Faktory server is stopping".into()))?;
        rx.await.map_err(|_| BackendError::Unavailable("the Faktory server is stopping".into()))?
    }

    /// Gives buffered jobs back to their queue without spending their attempt.
    async fn give_back(&self, jobs: Vec<Job>) {
        if jobs.is_empty() {
            return;
        }
        let now = now_ms();
        let releases: Vec<Completion> = jobs.iter().map(|j| Completion::of(j, Outcome::Release { at: now })).collect();
        if let Err(e) = self.conveyor.backend().complete(releases).await {
            warn!(error = %e, "giving buffered Faktory jobs back failed; their lease will return them");
        }
    }

    /// The remote lanes among `jobs`' queues whose buffers are short and that a `FETCH` asked
    /// for in the last seconds.
    fn lanes_wanted(&self, jobs: &[NewJob]) -> Vec<String> {
        {
            let st = self.state();
            let mut lanes: Vec<String> = Vec::new();
            for j in jobs {
                let (q, remote) = lane::split(&j.queue);
                if remote
                    && j.run_at.is_none()
                    && !lanes.iter().any(|l| l == &j.queue)
                    && st.wanted.get(q).is_some_and(|at| at.elapsed() < Duration::from_secs(5))
                    && st.buffers.get(q).is_none_or(|b| b.len() < BATCH)
                {
                    lanes.push(j.queue.clone());
                }
            }
            lanes
        }
    }

    /// Enqueues pushed jobs, and when a `FETCH` wants their queues (see
    /// [`Hub::lanes_wanted`]), reserves for it in the same commit (one push batch at a time, so
    /// this cannot storm the store as FETCHes could).
    async fn enqueue(&self, mut jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>, BackendError> {
        for job in &mut jobs {
            self.conveyor.registry().route(job);
        }
        let lanes = self.lanes_wanted(&jobs);
        // Debounced jobs are delayed and recorded by `dispatch_many` (`conveyor_core::debounce`).
        if lanes.is_empty() || jobs.iter().any(|j| conveyor_core::debounce::Debounce::of_tags(&j.tags).is_some()) {
            return self.conveyor.dispatch_many(jobs).await;
        }
        for job in &jobs {
            job.validate().map_err(BackendError::Invalid)?;
        }
        let req_max = BATCH * lanes.len();
        let req = ReserveRequest { max: req_max, queues: lanes.clone(), lease: STORE_LEASE, worker: self.owner.clone() };
        let mark = self.conveyor.backend().wakeup().mark_remote();
        let result = self.conveyor.backend().enqueue_and_reserve(jobs, req).await;
        self.refills.fetch_add(1, Ordering::AcqRel);
        let (out, reserved) = result?;
        // When the commit left nothing pending in these lanes it did not move the mark, so
        // what `buffer` notes empty stays known empty.
        let asked: Vec<&str> = lanes.iter().map(|l| lane::base(l)).collect();
        self.buffer(reserved, req_max, &asked, mark);
        Ok(out)
    }

    /// Puts the jobs a reserve of up to `max` jobs over the `asked` queues brought into their
    /// buffers. When it brought fewer than `max`, the store has no pending job of the asked
    /// queues left (as of `mark`): they are noted empty, so a `FETCH` does not reserve again
    /// for them until the mark moves. When it brought `max`, those that got none are noted
    /// empty, as before, and those that got some may have more.
    fn buffer(&self, jobs: Vec<Job>, max: usize, asked: &[&str], mark: u64) {
        let now = Instant::now();
        let got = !jobs.is_empty();
        let drained = jobs.len() < max;
        let mut st = self.state();
        for job in jobs {
            let q = lane::base(&job.queue).to_string();
            st.empty.remove(&q);
            st.buffers.entry(q).or_default().push_back(Buffered { job, since: now });
        }
        for q in asked {
            if drained || st.buffers.get(*q).is_none_or(VecDeque::is_empty) {
                st.empty.insert(q.to_string(), (mark, now));
            }
        }
        drop(st);
        if got {
            self.buffered.wake();
        }
    }

    /// Reserves made for `FETCH` since start (each one store transaction).
    pub(crate) fn reserves(&self) -> u64 {
        self.refills.load(Ordering::Relaxed)
    }
}

/// The outcome of a failed attempt: a retry after `delay` while attempts are left.
fn failure(job: &Job, error: String, delay: Duration) -> Outcome {
    if job.attempt < job.max_attempts {
        Outcome::Retry { at: now_ms() + delay.as_millis() as i64, error }
    } else {
        Outcome::Failed { error }
    }
}

fn error_of(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Retry { error, .. } | Outcome::Failed { error } => error.clone(),
        _ => String::new(),
    }
}
