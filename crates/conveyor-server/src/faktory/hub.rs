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
//! anywhere releases its buffer at the next `FETCH`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use conveyor_core::backend::{ReserveRequest, SupervisorInfo, WorkerInfo};
use conveyor_core::clock::now_ms;
use conveyor_core::job::Outcome;
use conveyor_core::{lane, BackendError, Completion, Conveyor, Job};

use super::job;

/// Jobs reserved from the store at once for one queue.
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

/// A remote worker process, known by its `wid`.
#[derive(Clone, Debug)]
pub(crate) struct RemoteWorker {
    pub(crate) hostname: String,
    pub(crate) pid: u32,
    pub(crate) labels: Vec<String>,
    pub(crate) started_at: i64,
    last_beat: Option<Instant>,
    interval: Option<Duration>,
    /// The state it reported (`current_state`).
    pub(crate) reported: Option<String>,
    pub(crate) queues: Vec<String>,
    pub(crate) processed: u64,
}

impl RemoteWorker {
    /// Gone: it has beaten, and missed two beats since.
    fn gone(&self, now: Instant) -> bool {
        match self.last_beat {
            Some(last) => now.duration_since(last) > self.interval.unwrap_or(DEFAULT_BEAT) * 2 + BEAT_SLACK,
            None => false,
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
}

#[derive(Default)]
struct State {
    buffers: HashMap<String, VecDeque<Buffered>>,
    held: HashMap<String, Held>,
    workers: HashMap<String, RemoteWorker>,
    /// Per queue: the wake-up mark and time of the last reserve that found nothing.
    empty: HashMap<String, (u64, Instant)>,
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

type Flush = (Completion, oneshot::Sender<Result<(), BackendError>>);

pub(crate) struct Hub {
    pub(crate) conveyor: Conveyor,
    /// The name this process reserves under.
    owner: String,
    pub(crate) started: Instant,
    state: Mutex<State>,
    refill: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    flush: mpsc::UnboundedSender<Flush>,
    paused: tokio::sync::Mutex<(Option<Instant>, HashSet<String>)>,
    pub(crate) stats: Stats,
}

impl Hub {
    /// The hub and its background tasks (flusher, deadlines, lease extension), which stop with
    /// `shutdown` after giving buffered jobs back.
    pub(crate) fn start(conveyor: Conveyor, shutdown: CancellationToken) -> Arc<Hub> {
        let (tx, rx) = mpsc::unbounded_channel();
        let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "localhost".into());
        let hub = Arc::new(Hub {
            conveyor,
            owner: format!("faktory@{host}:{}", std::process::id()),
            started: Instant::now(),
            state: Mutex::new(State::default()),
            refill: Mutex::new(HashMap::new()),
            flush: tx,
            paused: tokio::sync::Mutex::new((None, HashSet::new())),
            stats: Stats::default(),
        });
        tokio::spawn(flusher(hub.conveyor.clone(), rx));
        tokio::spawn(maintain(hub.clone(), shutdown));
        hub
    }

    /// `FETCH`: the first job of the first queue that has one, waiting up to [`FETCH_WAIT`].
    pub(crate) async fn fetch(&self, queues: &[String], wid: Option<&str>) -> Result<Option<Value>, BackendError> {
        let wake = self.conveyor.backend().wakeup();
        let deadline = Instant::now() + FETCH_WAIT;
        if let Some(wid) = wid {
            if let Some(w) = self.state().workers.get_mut(wid) {
                w.queues = queues.to_vec();
            }
        }
        loop {
            let mark = wake.mark();
            for q in queues {
                if self.is_paused(q).await? {
                    continue;
                }
                if let Some(job) = self.take(q).await? {
                    return Ok(Some(self.hand_out(job, wid)));
                }
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            wake.wait(mark, POLL.min(deadline - now)).await;
        }
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

    fn pop(&self, queue: &str) -> Option<Job> {
        self.state().buffers.get_mut(queue)?.pop_front().map(|b| b.job)
    }

    /// A buffered job of `queue`, reserving a batch from the store when the buffer is empty
    /// (one reserve at a time per queue; a reserve that found nothing is not repeated before
    /// the next wake-up or poll).
    async fn take(&self, queue: &str) -> Result<Option<Job>, BackendError> {
        if let Some(job) = self.pop(queue) {
            return Ok(Some(job));
        }
        let lock = self.refill.lock().unwrap_or_else(|p| p.into_inner()).entry(queue.to_string()).or_default().clone();
        let _guard = lock.lock().await;
        if let Some(job) = self.pop(queue) {
            return Ok(Some(job));
        }
        let backend = self.conveyor.backend();
        let mark = backend.wakeup().mark();
        if let Some((m, at)) = self.state().empty.get(queue) {
            if *m == mark && at.elapsed() < POLL {
                return Ok(None);
            }
        }
        let req = ReserveRequest { queues: vec![lane::remote(queue)], max: BATCH, lease: STORE_LEASE, worker: self.owner.clone() };
        let mut jobs = backend.reserve(req).await?.into_iter();
        let first = jobs.next();
        let mut st = self.state();
        match first {
            None => {
                st.empty.insert(queue.to_string(), (mark, Instant::now()));
            }
            Some(_) => {
                st.empty.remove(queue);
                let now = Instant::now();
                st.buffers.entry(queue.to_string()).or_default().extend(jobs.map(|job| Buffered { job, since: now }));
            }
        }
        Ok(first)
    }

    /// Records `job` as held by `wid` until its `reserve_for` and returns what the worker gets.
    fn hand_out(&self, job: Job, wid: Option<&str>) -> Value {
        let (jid, value, reserve_for) = job::fetched(&job);
        let now = Instant::now();
        let held = Held { job, wid: wid.map(str::to_string), fetched: now, deadline: now + Duration::from_secs(reserve_for) };
        if let Some(old) = self.state().held.insert(jid.clone(), held) {
            // Two jobs under one jid: the older reservation is left to its deadline.
            warn!(jid = %jid, job = %old.job.id, "FETCH handed out a second job with the same jid");
        }
        value
    }

    /// `ACK`: records the held job as done and returns it. `None` when no job is held under
    /// `jid` (finished, expired and retried, or held by another process): clients re-send
    /// acknowledgements, so that is not an error.
    pub(crate) async fn ack(&self, jid: &str) -> Result<Option<Job>, BackendError> {
        let Some(held) = self.release_held(jid) else { return Ok(None) };
        let mut c = Completion::of(&held.job, Outcome::Completed);
        c.runtime_ms = held.fetched.elapsed().as_millis() as u64;
        self.stats.processed.fetch_add(1, Ordering::Relaxed);
        self.record(c).await.map(|()| Some(held.job))
    }

    /// `FAIL`: the attempt failed with `error`; retried after Faktory's backoff while attempts
    /// are left, else the job goes to the failed store. Returns the job and whether it is dead.
    pub(crate) async fn fail(&self, jid: &str, error: String) -> Result<Option<(Job, bool)>, BackendError> {
        let Some(held) = self.release_held(jid) else { return Ok(None) };
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        let delay = job::backoff(held.job.attempt.saturating_sub(1));
        let outcome = failure(&held.job, error, delay);
        let dead = matches!(outcome, Outcome::Failed { .. });
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

    async fn record(&self, c: Completion) -> Result<(), BackendError> {
        let (tx, rx) = oneshot::channel();
        self.flush.send((c, tx)).map_err(|_| BackendError::Unavailable("the Faktory server is stopping".into()))?;
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

    /// `HELLO` of a worker process (every connection of it says hello with the same `wid`).
    pub(crate) fn hello(&self, wid: &str, hostname: &str, pid: u32, labels: Vec<String>) {
        let mut st = self.state();
        let w = st.workers.entry(wid.to_string()).or_insert_with(|| RemoteWorker {
            hostname: hostname.to_string(),
            pid,
            labels: labels.clone(),
            started_at: now_ms(),
            last_beat: None,
            interval: None,
            reported: None,
            queues: Vec::new(),
            processed: 0,
        });
        w.hostname = hostname.to_string();
        w.pid = pid;
        w.labels = labels;
    }

    /// `BEAT`: notes the worker alive (re-registering a `wid` it forgot, say after a restart)
    /// and publishes it in the store's worker registry.
    pub(crate) async fn beat(&self, wid: &str, reported: Option<String>, signal: Option<Signal>) -> Result<(), BackendError> {
        let info = {
            let mut st = self.state();
            let now = Instant::now();
            let held: Vec<String> =
                st.held.values().filter(|h| h.wid.as_deref() == Some(wid)).map(|h| h.job.id.to_string()).take(50).collect();
            let w = st.workers.entry(wid.to_string()).or_insert_with(|| RemoteWorker {
                hostname: String::new(),
                pid: 0,
                labels: Vec::new(),
                started_at: now_ms(),
                last_beat: None,
                interval: None,
                reported: None,
                queues: Vec::new(),
                processed: 0,
            });
            if let Some(last) = w.last_beat {
                let gap = now.duration_since(last);
                // A beat sent right after another (a retry) says nothing of the interval.
                if gap > Duration::from_millis(500) {
                    w.interval = Some(w.interval.map_or(gap, |i| i.max(gap.min(Duration::from_secs(60)))));
                }
            }
            w.last_beat = Some(now);
            w.reported = reported;
            let status = match (signal, w.reported.as_deref()) {
                (Some(s), _) => s.as_str().to_string(),
                (None, Some(r)) if !r.is_empty() => r.to_string(),
                _ => "running".to_string(),
            };
            let labels = if w.labels.is_empty() { String::new() } else { format!(" ({})", w.labels.join(", ")) };
            WorkerInfo {
                id: wid.to_string(),
                hostname: w.hostname.clone(),
                pid: w.pid,
                started_at: w.started_at,
                last_seen: now_ms(),
                status,
                supervisors: vec![SupervisorInfo {
                    name: format!("faktory{labels}"),
                    queues: w.queues.clone(),
                    concurrency: 0,
                    busy: held.len(),
                    processed: w.processed,
                    balance: Default::default(),
                    pools: Vec::new(),
                    current_jobs: held,
                }],
            }
        };
        self.conveyor.backend().worker_heartbeat(info).await
    }

    /// Remote workers known here with the number of jobs each holds.
    pub(crate) fn workers(&self) -> usize {
        self.state().workers.len()
    }

    /// One pass of the background duties (see the module docs); `extend` also renews the
    /// store's leases.
    async fn tick(&self, extend: bool) {
        let now = Instant::now();
        let (expired, stale, leases) = {
            let mut st = self.state();
            let gone: HashSet<String> = st.workers.iter().filter(|(_, w)| w.gone(now)).map(|(id, _)| id.clone()).collect();
            let mut expired = Vec::new();
            st.held.retain(|_, h| {
                let dead = h.wid.as_ref().is_some_and(|w| gone.contains(w));
                if dead || now >= h.deadline {
                    expired.push((h.job.clone(), dead, h.wid.clone()));
                    return false;
                }
                true
            });
            // Forget workers silent for 10 minutes that hold nothing (a worker that never beats,
            // counted from its HELLO).
            let holding: HashSet<String> = st.held.values().filter_map(|h| h.wid.clone()).collect();
            let forget = now_ms() - 600_000;
            st.workers.retain(|id, w| {
                let seen = w.last_beat.map_or(w.started_at, |b| now_ms() - now.duration_since(b).as_millis() as i64);
                holding.contains(id) || seen > forget
            });
            let mut stale = Vec::new();
            for buf in st.buffers.values_mut() {
                while buf.front().is_some_and(|b| now.duration_since(b.since) >= BUFFER_TTL) {
                    stale.extend(buf.pop_front().map(|b| b.job));
                }
            }
            let leases: Vec<_> = if extend {
                st.held
                    .values()
                    .map(|h| &h.job)
                    .chain(st.buffers.values().flatten().map(|b| &b.job))
                    .map(|j| (j.id, j.lease_token))
                    .collect()
            } else {
                Vec::new()
            };
            (expired, stale, leases)
        };
        for (job, dead, wid) in expired {
            let (error, delay) = if dead {
                (format!("worker {} stopped sending BEAT while holding this job", wid.unwrap_or_default()), Duration::ZERO)
            } else {
                ("the reservation expired (reserve_for) before ACK or FAIL".to_string(), job::backoff(job.attempt.saturating_sub(1)))
            };
            debug!(job = %job.id, %error, "Faktory reservation taken back");
            let c = Completion::of(&job, failure(&job, error, delay));
            if let Err(e) = self.record(c).await {
                warn!(error = %e, "taking back a Faktory reservation failed; the store's lease will");
            }
        }
        self.give_back(stale).await;
        if !leases.is_empty() {
            if let Err(e) = self.conveyor.backend().extend_leases(leases, STORE_LEASE).await {
                warn!(error = %e, "extending the leases of Faktory jobs failed");
            }
        }
    }

    /// Gives every buffered job back (shutdown).
    async fn drain(&self) {
        let jobs: Vec<Job> = self.state().buffers.drain().flat_map(|(_, b)| b.into_iter().map(|b| b.job)).collect();
        self.give_back(jobs).await;
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

/// Records completions in batches: whatever accumulated while the last batch was written goes
/// in the next one, each waiter answered with its batch's result.
async fn flusher(conveyor: Conveyor, mut rx: mpsc::UnboundedReceiver<Flush>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < 1000 {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        let (completions, waiters): (Vec<Completion>, Vec<_>) = batch.into_iter().unzip();
        let result = conveyor.backend().complete(completions).await;
        for w in waiters {
            let _ = w.send(result.clone());
        }
    }
}

async fn maintain(hub: Arc<Hub>, shutdown: CancellationToken) {
    let mut last_extend = Instant::now();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let extend = last_extend.elapsed() >= EXTEND_EVERY;
        if extend {
            last_extend = Instant::now();
        }
        hub.tick(extend).await;
    }
    hub.drain().await;
}
