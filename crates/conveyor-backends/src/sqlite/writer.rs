//! The one writer: a thread that owns the write connection and applies every write request in
//! group commits. It drains all requests waiting in its channel, runs each inside a savepoint of
//! one transaction (a failing request rolls back alone), adds the queue-counter and metrics
//! deltas they produced, commits once, and only then answers every requester. Under load one
//! fsync serves hundreds of jobs; idle, a lone request commits at once.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

use conveyor_core::backend::{BackendError, DelayedAction, DispatchHook, ReadyJob, Result, Tx};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Backoff, Completion, EnqueueOutcome, Job, JobId, NewJob, Outcome};
use conveyor_core::metrics::{minute_of, MetricsAccumulator, BUCKETS};
use conveyor_core::wakeup::Wakeup;

use super::storage_err;

/// Most requests applied in one transaction; more wait for the next.
const MAX_GROUP: usize = 512;

type Reply = Box<dyn FnOnce(Result<()>) + Send>;
/// A request: given the writer (or the error that prevented opening a transaction), it does its
/// work and returns whether it succeeded and how to answer once the commit is known.
type Work = Box<dyn FnOnce(std::result::Result<&mut WriteCtx, BackendError>) -> (bool, Reply) + Send>;

#[derive(Clone)]
pub(crate) struct Writer {
    tx: mpsc::Sender<Work>,
}

impl Writer {
    pub(crate) fn spawn(conn: Connection, wakeup: Arc<Wakeup>, history: usize, dispatch: Arc<OnceLock<DispatchHook>>) -> Writer {
        let (tx, rx) = mpsc::channel::<Work>();
        std::thread::Builder::new()
            .name("conveyor-sqlite-writer".into())
            .spawn(move || run(WriteCtx::new(conn, history, dispatch), rx, wakeup))
            .expect("spawning the SQLite writer thread");
        Writer { tx }
    }

    /// Runs `f` on the writer inside the next group commit and returns its result once the
    /// commit is durable.
    pub(crate) async fn call<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut WriteCtx) -> Result<R> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel::<Result<R>>();
        let work: Work = Box::new(move |ctx| match ctx {
            Err(e) => (false, Box::new(move |_| drop(tx.send(Err(e))))),
            Ok(ctx) => {
                // A panic in a request (an application's transaction closure) must not take the
                // writer, and with it every other request, down: it fails that request alone
                // and the savepoint rolls back what it did.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(ctx))).unwrap_or_else(|panic| {
                    let msg = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                    let msg = msg.unwrap_or_else(|| "unknown panic payload".into());
                    tracing::error!(error = %msg, "a write request panicked; its work is rolled back");
                    Err(BackendError::Other(format!("the transaction panicked: {msg}")))
                });
                let ok = r.is_ok();
                (ok, Box::new(move |commit: Result<()>| drop(tx.send(commit.and(r)))))
            }
        });
        self.tx.send(work).map_err(|_| BackendError::Unavailable("the SQLite writer has stopped".into()))?;
        rx.await.map_err(|_| BackendError::Unavailable("the SQLite writer has stopped".into()))?
    }
}

fn run(mut ctx: WriteCtx, rx: mpsc::Receiver<Work>, wakeup: Arc<Wakeup>) {
    let mut group: Vec<Work> = Vec::with_capacity(MAX_GROUP);
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = rx.recv() {
        group.push(first);
        while group.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(w) => group.push(w),
                Err(_) => break,
            }
        }
        if let Err(e) = ctx.conn.execute_batch("BEGIN IMMEDIATE") {
            let e = storage_err(e);
            for work in group.drain(..) {
                let (_, reply) = work(Err(e.clone()));
                reply(Err(e.clone()));
            }
            continue;
        }
        ctx.wake = false;
        ctx.wake_local = false;
        ctx.wake_remote = false;
        // Set when SQLite has rolled the whole transaction back under us (I/O error, disk
        // full, a script that ended it): from then on nothing in this group can commit.
        let mut lost: Option<BackendError> = None;
        // A request alone in its group needs no savepoint of its own (the transaction is its
        // savepoint): a big request, an import batch, then does not copy every page it touches
        // into a savepoint journal.
        let alone = group.len() == 1;
        // A lone request that failed and was rolled back with the whole transaction.
        let mut rolled_back = false;
        for work in group.drain(..) {
            if let Some(e) = &lost {
                let (_, reply) = work(Err(e.clone()));
                replies.push(reply);
                continue;
            }
            if !alone {
                if let Err(e) = ctx.conn.execute_batch("SAVEPOINT op") {
                    let (_, reply) = work(Err(storage_err(e)));
                    replies.push(reply);
                    continue;
                }
            }
            let (ok, reply) = work(Ok(&mut ctx));
            let end = match (ok, alone) {
                (true, _) => {
                    ctx.keep_op();
                    (!alone).then_some("RELEASE op")
                }
                (false, false) => {
                    ctx.discard_op();
                    Some("ROLLBACK TO op; RELEASE op")
                }
                (false, true) => {
                    // Nothing else is in this transaction: roll all of it back and answer the
                    // request with its own error; no commit follows (the write lock is not
                    // asked for again). If the rollback fails, the check below finds the
                    // connection in autocommit only when SQLite ended the transaction itself.
                    ctx.discard_op();
                    rolled_back = ctx.conn.execute_batch("ROLLBACK").is_ok();
                    None
                }
            };
            if let Some(end) = end {
                if let Err(e) = ctx.conn.execute_batch(end) {
                    tracing::error!(error = %e, "ending a savepoint failed");
                }
            }
            replies.push(reply);
            if rolled_back {
                break;
            }
            if ctx.conn.is_autocommit() {
                lost = Some(BackendError::Storage("the transaction was rolled back by SQLite; nothing in it was committed".into()));
            }
        }
        if rolled_back {
            ctx.wake = false;
            ctx.wake_local = false;
            ctx.wake_remote = false;
            for reply in replies.drain(..) {
                // `reply` answers with the request's own error whatever it is given.
                reply(Ok(()));
            }
            continue;
        }
        if let Some(e) = lost {
            tracing::error!(error = %e, requests = replies.len(), "group commit lost; every request in it is answered with the error");
            ctx.discard_op();
            ctx.group_counts.clear();
            ctx.group_metrics = MetricsAccumulator::default();
            ctx.group_ready.clear();
            for reply in replies.drain(..) {
                reply(Err(e.clone()));
            }
            continue;
        }
        let commit = ctx.flush_deltas().and_then(|_| ctx.conn.execute_batch("COMMIT").map_err(storage_err));
        match commit {
            Ok(()) => {
                // The broker hears of ready jobs before anyone is told the commit happened, so
                // an enqueue that waits for its messages' confirms finds them requested.
                if !ctx.group_ready.is_empty() {
                    if let Some(hook) = ctx.dispatch.get() {
                        hook(std::mem::take(&mut ctx.group_ready));
                    }
                }
                for reply in replies.drain(..) {
                    reply(Ok(()));
                }
                if ctx.wake {
                    // The lanes whose queues got pending jobs; both when none is known.
                    match (ctx.wake_local, ctx.wake_remote) {
                        (false, false) => wakeup.wake(),
                        (local, remote) => wakeup.wake_lanes(local, remote),
                    }
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed; every request in it is answered with the error");
                let _ = ctx.conn.execute_batch("ROLLBACK");
                ctx.group_counts.clear();
                ctx.group_metrics = MetricsAccumulator::default();
                ctx.group_ready.clear();
                for reply in replies.drain(..) {
                    reply(Err(e.clone()));
                }
            }
        }
    }
}

/// What makes an `insert_rows` statement: head, tail, values per row, rows.
pub(crate) type InsertKey = (String, String, usize, usize);

/// Per-queue changes: pending, delayed, reserved, failed.
type Counts = HashMap<String, [i64; 4]>;
const PENDING: usize = 0;
const DELAYED: usize = 2;
const RESERVED: usize = 1;
const FAILED: usize = 3;

/// The writer's connection and the deltas of the transaction being built.
pub(crate) struct WriteCtx {
    pub(crate) conn: Connection,
    /// `$N` → `?N` translations of application SQL, so a statement run per row is rewritten
    /// once, not every time.
    pub(crate) translated: HashMap<String, String>,
    /// Texts of `insert_rows`' statements by a hash of what makes them, so a batch's statement
    /// is looked up, not rebuilt (the key's parts are kept beside it and compared).
    pub(crate) insert_sql: HashMap<u64, Vec<(InsertKey, String)>>,
    history: usize,
    history_inserts: usize,
    wake: bool,
    /// Which lanes got pending jobs in this group (`crate::lane`).
    wake_local: bool,
    wake_remote: bool,
    op_counts: Counts,
    group_counts: Counts,
    op_metrics: Vec<(i64, Completion)>,
    group_metrics: MetricsAccumulator,
    /// Set by a broker transport: hears of the jobs each commit made ready.
    dispatch: Arc<OnceLock<DispatchHook>>,
    op_ready: Vec<ReadyJob>,
    group_ready: Vec<ReadyJob>,
}

/// The columns of `jobs` that make a reserved [`Job`], in the order `job_from_row` reads them.
const JOB_COLS: &str = "id, queue, kind, payload, attempts, max_attempts, backoff, timeout_ms, priority, tags, \
                        unique_key, batch_id, created_at, available_at, reserved_at, lease_token, workflow";

impl WriteCtx {
    fn new(conn: Connection, history: usize, dispatch: Arc<OnceLock<DispatchHook>>) -> Self {
        WriteCtx {
            conn,
            translated: HashMap::new(),
            insert_sql: HashMap::new(),
            history,
            history_inserts: 0,
            wake: false,
            wake_local: false,
            wake_remote: false,
            op_counts: Counts::new(),
            group_counts: Counts::new(),
            op_metrics: Vec::new(),
            group_metrics: MetricsAccumulator::default(),
            dispatch,
            op_ready: Vec::new(),
            group_ready: Vec::new(),
        }
    }

    /// Notes a job that became pending, for the dispatch hook (when one is set).
    fn ready(&mut self, id: JobId, queue: &str, priority: i32) {
        if self.dispatch.get().is_some() {
            self.op_ready.push(ReadyJob { id, queue: queue.to_string(), priority });
        }
    }

    fn count(&mut self, queue: &str, state: usize, delta: i64) {
        if let Some(c) = self.op_counts.get_mut(queue) {
            c[state] += delta;
        } else {
            let mut c = [0i64; 4];
            c[state] = delta;
            self.op_counts.insert(queue.to_string(), c);
        }
    }

    fn keep_op(&mut self) {
        for (q, d) in self.op_counts.drain() {
            if d[PENDING] > 0 {
                if conveyor_core::lane::split(&q).1 {
                    self.wake_remote = true;
                } else {
                    self.wake_local = true;
                }
            }
            let g = self.group_counts.entry(q).or_default();
            for i in 0..4 {
                g[i] += d[i];
            }
        }
        for (minute, c) in self.op_metrics.drain(..) {
            self.group_metrics.record(minute, &c);
        }
        self.group_ready.append(&mut self.op_ready);
    }

    fn discard_op(&mut self) {
        self.op_counts.clear();
        self.op_metrics.clear();
        self.op_ready.clear();
    }

    fn flush_deltas(&mut self) -> Result<()> {
        if !self.group_counts.is_empty() {
            let mut st = self
                .conn
                .prepare_cached(
                    "INSERT INTO queues (name, pending, reserved, delayed, failed) VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(name) DO UPDATE SET pending = pending + ?2, reserved = reserved + ?3,
                                                     delayed = delayed + ?4, failed = failed + ?5",
                )
                .map_err(storage_err)?;
            for (q, d) in self.group_counts.drain() {
                st.execute(params![q, d[PENDING], d[RESERVED], d[DELAYED], d[FAILED]]).map_err(storage_err)?;
            }
        }
        if !self.group_metrics.is_empty() {
            let hist_names: String = (0..BUCKETS).map(|i| format!(", r{i}, w{i}")).collect();
            let hist_params: String = (0..BUCKETS).map(|i| format!(", ?{}, ?{}", 10 + 2 * i, 11 + 2 * i)).collect();
            let hist_update: String = (0..BUCKETS).map(|i| format!(", r{i} = r{i} + excluded.r{i}, w{i} = w{i} + excluded.w{i}")).collect();
            let sql = format!(
                "INSERT INTO job_metrics (minute, queue, kind, completed, retried, failed, runtime_sum, runtime_max, wait_sum{hist_names})
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9{hist_params})
                 ON CONFLICT(minute, queue, kind) DO UPDATE SET completed = completed + excluded.completed,
                    retried = retried + excluded.retried, failed = failed + excluded.failed,
                    runtime_sum = runtime_sum + excluded.runtime_sum, runtime_max = max(runtime_max, excluded.runtime_max),
                    wait_sum = wait_sum + excluded.wait_sum{hist_update}"
            );
            let mut st = self.conn.prepare_cached(&sql).map_err(storage_err)?;
            for row in self.group_metrics.drain() {
                let mut values: Vec<i64> = vec![
                    row.completed as i64,
                    row.retried as i64,
                    row.failed as i64,
                    row.runtime_sum_ms as i64,
                    row.runtime_max_ms as i64,
                    row.wait_sum_ms as i64,
                ];
                for i in 0..BUCKETS {
                    values.push(row.runtime_hist[i] as i64);
                    values.push(row.wait_hist[i] as i64);
                }
                let mut p: Vec<&dyn rusqlite::ToSql> = vec![&row.minute, &row.queue, &row.kind];
                p.extend(values.iter().map(|v| v as &dyn rusqlite::ToSql));
                st.execute(p.as_slice()).map_err(storage_err)?;
            }
        }
        Ok(())
    }

    // --- operations ---------------------------------------------------------------------------

    pub(crate) fn enqueue(&mut self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        let now = now_ms();
        let mut out = Vec::with_capacity(jobs.len());
        let mut insert = self
            .conn
            .prepare_cached(
                "INSERT INTO jobs (id, queue, kind, payload, state, priority, max_attempts, backoff, timeout_ms,
                                   available_at, created_at, unique_key, tags, batch_id, workflow)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)",
            )
            .map_err(storage_err)?;
        let mut counts: Vec<(String, usize)> = Vec::with_capacity(jobs.len());
        // Ready jobs for the dispatch hook, only when a broker transport listens.
        let dispatching = self.dispatch.get().is_some();
        let mut ready: Vec<(JobId, i32)> = Vec::new();
        for job in jobs {
            if let Some(u) = &job.unique {
                let held: Option<(Vec<u8>, i64)> = self
                    .conn
                    .prepare_cached("SELECT job_id, expires_at FROM unique_locks WHERE key = ?1")
                    .and_then(|mut s| s.query_row([&u.key], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                    .map_err(storage_err)?;
                if let Some((holder, expires_at)) = held {
                    if expires_at > now {
                        let existing = JobId::from_slice(&holder).unwrap_or(job.id);
                        out.push(EnqueueOutcome::Duplicate { existing });
                        continue;
                    }
                }
                self.conn
                    .prepare_cached("INSERT OR REPLACE INTO unique_locks (key, job_id, expires_at) VALUES (?1, ?2, ?3)")
                    .and_then(|mut s| s.execute(params![u.key, &job.id.as_bytes()[..], now + u.ttl.as_millis() as i64]))
                    .map_err(storage_err)?;
            }
            let available_at = job.run_at.unwrap_or(now);
            let state = if available_at > now { DELAYED } else { PENDING };
            let backoff = job.backoff.as_ref().map(|b| serde_json::to_string(b).expect("backoff serializes"));
            let tags = (!job.tags.is_empty()).then(|| serde_json::to_string(&job.tags).expect("tags serialize"));
            insert
                .execute(params![
                    &job.id.as_bytes()[..],
                    job.queue,
                    job.kind,
                    job.payload,
                    state as i64,
                    job.priority,
                    job.max_attempts,
                    backoff,
                    job.timeout.map(|t| t.as_millis() as i64),
                    available_at,
                    now,
                    job.unique.as_ref().map(|u| u.key.as_str()),
                    tags,
                    job.batch_id,
                    job.workflow,
                ])
                .map_err(storage_err)?;
            if state == PENDING && dispatching {
                ready.push((job.id, job.priority));
            }
            counts.push((job.queue, state));
            out.push(EnqueueOutcome::Enqueued { id: job.id });
        }
        drop(insert);
        let mut ready = ready.into_iter();
        for (q, state) in counts {
            self.count(&q, state, 1);
            if state == PENDING {
                self.wake = true;
                if let Some((id, priority)) = ready.next() {
                    self.ready(id, &q, priority);
                }
            }
        }
        Ok(out)
    }

    /// Moves due delayed jobs to pending, a bounded number per call so no statement walks the
    /// whole delayed set. Returns how many.
    pub(crate) fn promote_due(&mut self, now: i64) -> Result<u64> {
        let mut st = self
            .conn
            .prepare_cached(
                "UPDATE jobs SET state = 0 WHERE id IN
                   (SELECT id FROM jobs WHERE state = 2 AND available_at <= ?1 ORDER BY available_at LIMIT 1000)
                 RETURNING queue, id, priority",
            )
            .map_err(storage_err)?;
        let promoted: Vec<(String, Vec<u8>, i32)> = st
            .query_map([now], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .map_err(storage_err)?
            .collect::<rusqlite::Result<_>>()
            .map_err(storage_err)?;
        drop(st);
        let n = promoted.len() as u64;
        for (q, id, priority) in promoted {
            self.count(&q, DELAYED, -1);
            self.count(&q, PENDING, 1);
            if let Some(id) = JobId::from_slice(&id) {
                self.ready(id, &q, priority);
            }
        }
        if n > 0 {
            self.wake = true;
        }
        Ok(n)
    }

    /// Reserves the given pending jobs (chosen by a broker) under one lease; paused queues and
    /// jobs that are not pending are skipped.
    pub(crate) fn claim(&mut self, ids: &[JobId], lease_ms: i64, worker: &str) -> Result<Vec<Job>> {
        let now = now_ms();
        let token: i64 = rand::random::<i64>() & i64::MAX;
        let sql = format!(
            "UPDATE jobs SET state = 1, attempts = attempts + 1, reserved_at = ?1, lease_until = ?2, lease_token = ?3, worker = ?4
             WHERE id = ?5 AND state = 0 AND queue NOT IN (SELECT name FROM queues WHERE paused = 1)
             RETURNING {JOB_COLS}"
        );
        let mut jobs = Vec::with_capacity(ids.len());
        let mut st = self.conn.prepare_cached(&sql).map_err(storage_err)?;
        for id in ids {
            if let Some(job) = st
                .query_row(params![now, now + lease_ms, token, worker, &id.as_bytes()[..]], job_from_row)
                .optional()
                .map_err(storage_err)?
            {
                jobs.push(job);
            }
        }
        drop(st);
        for job in &jobs {
            self.count(&job.queue, PENDING, -1);
            self.count(&job.queue, RESERVED, 1);
        }
        Ok(jobs)
    }

    pub(crate) fn reserve(&mut self, queues: &[String], max: usize, lease_ms: i64, worker: &str) -> Result<Vec<Job>> {
        let now = now_ms();
        self.promote_due(now)?;
        let paused: Vec<String> = self
            .conn
            .prepare_cached("SELECT name FROM queues WHERE paused = 1")
            .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
            .map_err(storage_err)?;
        let token: i64 = rand::random::<i64>() & i64::MAX;
        let mut jobs = Vec::new();
        let sql = format!(
            "UPDATE jobs SET state = 1, attempts = attempts + 1, reserved_at = ?1, lease_until = ?2, lease_token = ?3, worker = ?4
             WHERE id IN (SELECT id FROM jobs WHERE queue = ?5 AND state = 0 ORDER BY priority DESC, id LIMIT ?6)
             RETURNING {JOB_COLS}"
        );
        for queue in queues {
            if jobs.len() >= max {
                break;
            }
            if paused.iter().any(|p| p == queue) {
                continue;
            }
            let want = (max - jobs.len()) as i64;
            let mut st = self.conn.prepare_cached(&sql).map_err(storage_err)?;
            let got: Vec<Job> = st
                .query_map(params![now, now + lease_ms, token, worker, queue, want], job_from_row)
                .map_err(storage_err)?
                .collect::<rusqlite::Result<_>>()
                .map_err(storage_err)?;
            drop(st);
            let n = got.len() as i64;
            if n > 0 {
                self.count(queue, PENDING, -n);
                self.count(queue, RESERVED, n);
            }
            let start = jobs.len();
            jobs.extend(got);
            jobs[start..].sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
        }
        Ok(jobs)
    }

    pub(crate) fn complete(&mut self, completions: Vec<Completion>) -> Result<()> {
        let now = now_ms();
        for c in completions {
            self.complete_one(c, now)?;
        }
        self.trim_history()?;
        Ok(())
    }

    /// Applies one completion; returns false when the reservation it names is gone.
    fn complete_one(&mut self, c: Completion, now: i64) -> Result<bool> {
        let id = &c.id.as_bytes()[..];
        let applied = match &c.outcome {
            Outcome::Completed => {
                let done = self.delete_completed(id, c.lease_token, now, &c)?;
                if done {
                    self.release_unique(c.unique_key.as_deref(), id)?;
                    self.count(&c.queue, RESERVED, -1);
                }
                done
            }
            Outcome::Failed { error } => {
                let row = self.take_reserved(id, c.lease_token)?;
                if let Some(row) = &row {
                    self.insert_failed(id, row, error, now, c.runtime_ms)?;
                    self.release_unique(row.unique_key.as_deref(), id)?;
                    self.count(&row.queue, RESERVED, -1);
                    self.count(&row.queue, FAILED, 1);
                }
                row.is_some()
            }
            Outcome::Retry { at, error } => self.requeue(id, c.lease_token, &c.queue, *at, Some(error), 0, now)?,
            Outcome::Release { at } => self.requeue(id, c.lease_token, &c.queue, *at, None, 1, now)?,
        };
        if applied {
            if conveyor_core::hooks::wants(&c) {
                conveyor_core::hooks::after_outcome(&mut super::tx::SqliteTx { ctx: self }, &c)?;
            }
            self.op_metrics.push((minute_of(now), c));
        }
        Ok(applied)
    }

    /// Deletes a completed job if `token` still holds it, copying it into the bounded history
    /// inside SQLite (no row travels through Rust on this hot path).
    fn delete_completed(&mut self, id: &[u8], token: i64, now: i64, c: &Completion) -> Result<bool> {
        if self.history == 0 {
            let n = self
                .conn
                .prepare_cached("DELETE FROM jobs WHERE id = ?1 AND state = 1 AND lease_token = ?2")
                .and_then(|mut s| s.execute(params![id, token]))
                .map_err(storage_err)?;
            return Ok(n == 1);
        }
        let copied = self
            .conn
            .prepare_cached(
                "INSERT INTO completed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                                             created_at, reserved_at, finished_at, runtime_ms, wait_ms, worker)
                 SELECT id, queue, kind, payload, priority, attempts, max_attempts, tags, batch_id,
                        created_at, reserved_at, ?3, ?4, ?5, worker
                 FROM jobs WHERE id = ?1 AND state = 1 AND lease_token = ?2",
            )
            .and_then(|mut s| s.execute(params![id, token, now, c.runtime_ms as i64, c.wait_ms as i64]))
            .map_err(storage_err)?;
        if copied == 0 {
            return Ok(false);
        }
        self.history_inserts += 1;
        self.conn.prepare_cached("DELETE FROM jobs WHERE id = ?1").and_then(|mut s| s.execute([id])).map_err(storage_err)?;
        Ok(true)
    }

    /// Runs, deletes or fails delayed jobs by id (see `QueueBackend::act_on_delayed`).
    pub(crate) fn act_on_delayed(&mut self, ids: &[JobId], action: &DelayedAction) -> Result<Vec<JobId>> {
        let now = now_ms();
        let mut done = Vec::new();
        for id in ids {
            let key = &id.as_bytes()[..];
            let row = match action {
                DelayedAction::RunNow => {
                    let hit: Option<(String, i32)> = self
                        .conn
                        .prepare_cached(
                            "UPDATE jobs SET state = 0, available_at = ?2 WHERE id = ?1 AND state = 2 RETURNING queue, priority",
                        )
                        .and_then(|mut s| s.query_row(params![key, now], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                        .map_err(storage_err)?;
                    if let Some((queue, priority)) = hit {
                        self.count(&queue, DELAYED, -1);
                        self.count(&queue, PENDING, 1);
                        self.wake = true;
                        self.ready(*id, &queue, priority);
                        done.push(*id);
                    }
                    continue;
                }
                DelayedAction::Delete | DelayedAction::Fail(_) => self
                    .conn
                    .prepare_cached(
                        "DELETE FROM jobs WHERE id = ?1 AND state = 2
                         RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                                   batch_id, created_at, workflow",
                    )
                    .and_then(|mut s| s.query_row([key], JobRow::from_row).optional())
                    .map_err(storage_err)?,
            };
            let Some(row) = row else { continue };
            let error = match action {
                DelayedAction::Fail(error) => {
                    self.insert_failed(key, &row, error, now, 0)?;
                    self.count(&row.queue, FAILED, 1);
                    error.clone()
                }
                _ => "deleted before it ran".to_string(),
            };
            self.count(&row.queue, DELAYED, -1);
            self.release_unique(row.unique_key.as_deref(), key)?;
            let c = Completion {
                id: *id,
                lease_token: 0,
                queue: row.queue.clone(),
                kind: row.kind.clone(),
                unique_key: row.unique_key.clone(),
                batch_id: row.batch_id.clone(),
                workflow: row.workflow.clone(),
                outcome: Outcome::Failed { error },
                wait_ms: 0,
                runtime_ms: 0,
            };
            if conveyor_core::hooks::wants(&c) {
                conveyor_core::hooks::after_outcome(&mut super::tx::SqliteTx { ctx: self }, &c)?;
            }
            done.push(*id);
        }
        Ok(done)
    }

    /// Deletes a reserved job if `token` still holds it, returning the row.
    fn take_reserved(&mut self, id: &[u8], token: i64) -> Result<Option<JobRow>> {
        self.conn
            .prepare_cached(
                "DELETE FROM jobs WHERE id = ?1 AND state = 1 AND lease_token = ?2
                 RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                           batch_id, created_at, workflow",
            )
            .and_then(|mut s| s.query_row(params![id, token], JobRow::from_row).optional())
            .map_err(storage_err)
    }

    #[allow(clippy::too_many_arguments)]
    fn requeue(&mut self, id: &[u8], token: i64, queue: &str, at: i64, error: Option<&str>, give_back: i64, now: i64) -> Result<bool> {
        let state = if at > now { DELAYED } else { PENDING };
        let priority: Option<i32> = self
            .conn
            .prepare_cached(
                "UPDATE jobs SET state = ?1, available_at = ?2, attempts = attempts - ?3, last_error = coalesce(?4, last_error),
                                 lease_until = NULL, lease_token = NULL, worker = NULL
                 WHERE id = ?5 AND state = 1 AND lease_token = ?6
                 RETURNING priority",
            )
            .and_then(|mut s| s.query_row(params![state as i64, at, give_back, error, id, token], |r| r.get(0)).optional())
            .map_err(storage_err)?;
        let Some(priority) = priority else { return Ok(false) };
        self.count(queue, RESERVED, -1);
        self.count(queue, state, 1);
        if state == PENDING {
            self.wake = true;
            if let Some(id) = JobId::from_slice(id) {
                self.ready(id, queue, priority);
            }
        }
        Ok(true)
    }

    fn insert_failed(&mut self, id: &[u8], row: &JobRow, error: &str, now: i64, runtime_ms: u64) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT OR REPLACE INTO failed_jobs (id, queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms,
                                                     unique_key, tags, batch_id, created_at, failed_at, runtime_ms, error, workflow)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17)",
            )
            .and_then(|mut s| {
                s.execute(params![
                    id,
                    row.queue,
                    row.kind,
                    row.payload,
                    row.priority,
                    row.attempts,
                    row.max_attempts,
                    row.backoff,
                    row.timeout_ms,
                    row.unique_key,
                    row.tags,
                    row.batch_id,
                    row.created_at,
                    now,
                    runtime_ms as i64,
                    error,
                    row.workflow
                ])
            })
            .map_err(storage_err)?;
        Ok(())
    }

    fn release_unique(&mut self, key: Option<&str>, id: &[u8]) -> Result<()> {
        if let Some(key) = key {
            self.conn
                .prepare_cached("DELETE FROM unique_locks WHERE key = ?1 AND job_id = ?2")
                .and_then(|mut s| s.execute(params![key, id]))
                .map_err(storage_err)?;
        }
        Ok(())
    }

    fn trim_history(&mut self) -> Result<()> {
        if self.history_inserts < 256 {
            return Ok(());
        }
        self.history_inserts = 0;
        self.conn
            .prepare_cached("DELETE FROM completed_jobs WHERE seq <= (SELECT max(seq) FROM completed_jobs) - ?1")
            .and_then(|mut s| s.execute([self.history as i64]))
            .map_err(storage_err)?;
        Ok(())
    }

    /// Runs `work` and records a completion in the same savepoint; fails with `LeaseLost`
    /// (rolling `work` back) when the reservation is gone. `work` runs first, so that it sees
    /// the job's batch still open (a job may add jobs to its own batch) and the outcome's hooks
    /// see what `work` wrote.
    pub(crate) fn complete_with<R>(&mut self, c: Completion, work: impl FnOnce(&mut dyn Tx) -> Result<R>) -> Result<R> {
        let id = c.id;
        let out = work(&mut super::tx::SqliteTx { ctx: self })?;
        if !self.complete_one(c, now_ms())? {
            return Err(BackendError::LeaseLost(id));
        }
        self.trim_history()?;
        Ok(out)
    }

    pub(crate) fn extend_leases(&mut self, leases: &[(JobId, i64)], lease_ms: i64) -> Result<()> {
        let until = now_ms() + lease_ms;
        let mut st = self
            .conn
            .prepare_cached("UPDATE jobs SET lease_until = ?1 WHERE id = ?2 AND state = 1 AND lease_token = ?3")
            .map_err(storage_err)?;
        for (id, token) in leases {
            st.execute(params![until, &id.as_bytes()[..], token]).map_err(storage_err)?;
        }
        Ok(())
    }

    /// Returns expired reservations to the queue, or to the failed store when no attempt is left,
    /// through the same path as a worker's outcome (so batches and workflows see it too).
    pub(crate) fn reap_expired(&mut self) -> Result<u64> {
        let now = now_ms();
        let expired: Vec<Completion> = self
            .conn
            .prepare_cached(
                "SELECT id, attempts, max_attempts, queue, lease_token, kind, unique_key, batch_id, workflow,
                        available_at, reserved_at
                 FROM jobs WHERE state = 1 AND lease_until < ?1 ORDER BY lease_until LIMIT 1000",
            )
            .and_then(|mut s| {
                s.query_map([now], |r| {
                    let id: Vec<u8> = r.get(0)?;
                    let (attempts, max_attempts): (i64, i64) = (r.get(1)?, r.get(2)?);
                    let error = format!("lease expired: the worker running attempt {attempts} stopped responding");
                    let outcome = if attempts >= max_attempts { Outcome::Failed { error } } else { Outcome::Retry { at: now, error } };
                    let (available_at, reserved_at): (i64, Option<i64>) = (r.get(9)?, r.get(10)?);
                    Ok(Completion {
                        id: JobId::from_slice(&id).unwrap_or_default(),
                        lease_token: r.get(4)?,
                        queue: r.get(3)?,
                        kind: r.get(5)?,
                        unique_key: r.get(6)?,
                        batch_id: r.get(7)?,
                        workflow: r.get(8)?,
                        outcome,
                        wait_ms: reserved_at.map_or(0, |t| (t - available_at).max(0) as u64),
                        runtime_ms: reserved_at.map_or(0, |t| (now - t).max(0) as u64),
                    })
                })?
                .collect()
            })
            .map_err(storage_err)?;
        let n = expired.len() as u64;
        for c in expired {
            self.complete_one(c, now)?;
        }
        self.trim_history()?;
        Ok(n)
    }

    pub(crate) fn set_paused(&mut self, queue: &str, paused: bool) -> Result<()> {
        self.conn
            .execute(
                "INSERT INTO queues (name, paused) VALUES (?1, ?2) ON CONFLICT(name) DO UPDATE SET paused = ?2",
                params![queue, paused as i64],
            )
            .map_err(storage_err)?;
        if !paused {
            self.wake = true;
        }
        Ok(())
    }

    /// Deletes up to `limit` pending or delayed jobs of `queue`.
    pub(crate) fn clear_chunk(&mut self, queue: &str, limit: i64) -> Result<u64> {
        let deleted: Vec<(i64, Option<String>, Vec<u8>)> = self
            .conn
            .prepare_cached(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE queue = ?1 AND state IN (0, 2) LIMIT ?2)
                 RETURNING state, unique_key, id",
            )
            .and_then(|mut s| s.query_map(params![queue, limit], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?.collect())
            .map_err(storage_err)?;
        for (state, key, id) in &deleted {
            self.count(queue, *state as usize, -1);
            self.release_unique(key.as_deref(), id)?;
        }
        Ok(deleted.len() as u64)
    }

    /// Moves failed jobs back to their queues with a fresh attempt count.
    pub(crate) fn retry_failed(&mut self, ids: &[Vec<u8>]) -> Result<Vec<JobId>> {
        let now = now_ms();
        let mut retried = Vec::new();
        for id in ids {
            let row: Option<JobRow> = self
                .conn
                .prepare_cached(
                    "DELETE FROM failed_jobs WHERE id = ?1
                     RETURNING queue, kind, payload, priority, attempts, max_attempts, backoff, timeout_ms, unique_key, tags,
                               batch_id, created_at, workflow",
                )
                .and_then(|mut s| s.query_row([id], JobRow::from_row).optional())
                .map_err(storage_err)?;
            let Some(row) = row else { continue };
            self.conn
                .prepare_cached(
                    "INSERT INTO jobs (id, queue, kind, payload, state, priority, attempts, max_attempts, backoff, timeout_ms,
                                       available_at, created_at, unique_key, tags, batch_id, workflow)
                     VALUES (?1, ?2, ?3, ?4, 0, ?5, 0, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)",
                )
                .and_then(|mut s| {
                    s.execute(params![
                        id,
                        row.queue,
                        row.kind,
                        row.payload,
                        row.priority,
                        row.max_attempts,
                        row.backoff,
                        row.timeout_ms,
                        now,
                        row.created_at,
                        row.unique_key,
                        row.tags,
                        row.batch_id,
                        row.workflow
                    ])
                })
                .map_err(storage_err)?;
            self.count(&row.queue, FAILED, -1);
            self.count(&row.queue, PENDING, 1);
            self.wake = true;
            if let Some(job_id) = JobId::from_slice(id) {
                self.ready(job_id, &row.queue, row.priority as i32);
            }
            if let Some(batch) = &row.batch_id {
                conveyor_core::hooks::after_failed_retry(&mut super::tx::SqliteTx { ctx: self }, batch)?;
            }
            if let Some(job_id) = JobId::from_slice(id) {
                retried.push(job_id);
            }
        }
        Ok(retried)
    }

    /// Failed job ids, oldest first, up to `limit`, optionally of one queue.
    pub(crate) fn failed_ids(&mut self, queue: Option<&str>, limit: i64) -> Result<Vec<Vec<u8>>> {
        self.conn
            .prepare_cached("SELECT id FROM failed_jobs WHERE (?1 IS NULL OR queue = ?1) ORDER BY failed_at LIMIT ?2")
            .and_then(|mut s| s.query_map(params![queue, limit], |r| r.get(0))?.collect())
            .map_err(storage_err)
    }

    pub(crate) fn forget_failed(&mut self, ids: &[Vec<u8>]) -> Result<u64> {
        let mut n = 0;
        for id in ids {
            let queue: Option<String> = self
                .conn
                .prepare_cached("DELETE FROM failed_jobs WHERE id = ?1 RETURNING queue")
                .and_then(|mut s| s.query_row([id], |r| r.get(0)).optional())
                .map_err(storage_err)?;
            if let Some(q) = queue {
                self.count(&q, FAILED, -1);
                n += 1;
            }
        }
        Ok(n)
    }

    pub(crate) fn worker_heartbeat(&mut self, id: &str, last_seen: i64, info: &str) -> Result<()> {
        self.conn
            .prepare_cached(
                "INSERT INTO workers (id, last_seen, info) VALUES (?1, ?2, ?3)
                 ON CONFLICT(id) DO UPDATE SET last_seen = ?2, info = ?3",
            )
            .and_then(|mut s| s.execute(params![id, last_seen, info]))
            .map_err(storage_err)?;
        Ok(())
    }

    pub(crate) fn prune(&mut self, before: i64) -> Result<()> {
        self.conn.execute("DELETE FROM job_metrics WHERE minute < ?1", [before]).map_err(storage_err)?;
        self.conn.execute("DELETE FROM workers WHERE last_seen < ?1", [now_ms() - 86_400_000]).map_err(storage_err)?;
        self.conn.execute("DELETE FROM unique_locks WHERE expires_at < ?1", [now_ms()]).map_err(storage_err)?;
        Ok(())
    }
}

/// A `jobs` row as needed to move it elsewhere.
struct JobRow {
    queue: String,
    kind: String,
    payload: String,
    priority: i64,
    attempts: i64,
    max_attempts: i64,
    backoff: Option<String>,
    timeout_ms: Option<i64>,
    unique_key: Option<String>,
    tags: Option<String>,
    batch_id: Option<String>,
    created_at: i64,
    workflow: Option<String>,
}

impl JobRow {
    fn from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Self> {
        Ok(JobRow {
            queue: r.get(0)?,
            kind: r.get(1)?,
            payload: r.get(2)?,
            priority: r.get(3)?,
            attempts: r.get(4)?,
            max_attempts: r.get(5)?,
            backoff: r.get(6)?,
            timeout_ms: r.get(7)?,
            unique_key: r.get(8)?,
            tags: r.get(9)?,
            batch_id: r.get(10)?,
            created_at: r.get(11)?,
            workflow: r.get(12)?,
        })
    }
}

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Job> {
    let id: Vec<u8> = r.get(0)?;
    let backoff: Option<String> = r.get(6)?;
    let tags: Option<String> = r.get(9)?;
    let timeout_ms: Option<i64> = r.get(7)?;
    Ok(Job {
        id: JobId::from_slice(&id).unwrap_or_default(),
        queue: r.get(1)?,
        kind: r.get(2)?,
        payload: r.get(3)?,
        attempt: r.get::<_, i64>(4)? as u32,
        max_attempts: r.get::<_, i64>(5)? as u32,
        backoff: backoff.and_then(|b| serde_json::from_str::<Backoff>(&b).ok()),
        timeout: timeout_ms.map(|ms| std::time::Duration::from_millis(ms.max(0) as u64)),
        priority: r.get::<_, i64>(8)? as i32,
        tags: tags.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
        unique_key: r.get(10)?,
        batch_id: r.get(11)?,
        created_at: r.get(12)?,
        available_at: r.get(13)?,
        reserved_at: r.get(14)?,
        lease_token: r.get(15)?,
        workflow: r.get(16)?,
    })
}
