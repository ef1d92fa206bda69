//! The one writer: a thread that owns the write connection and applies every write request in
//! group commits. It drains all requests waiting in its channel, runs each inside a savepoint of
//! one transaction (a failing request rolls back alone), adds the queue-counter and metrics
//! deltas they produced, commits once, and only then answers every requester. Under load one
//! fsync serves hundreds of jobs; idle, a lone request commits at once.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, OnceLock};

use rusqlite::{params, Connection};
use tokio::sync::oneshot;

use conveyor_core::backend::{BackendError, DispatchHook, ReadyJob, Result};
use conveyor_core::job::Completion;
use conveyor_core::metrics::{MetricsAccumulator, BUCKETS};
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
                // The lanes whose queues have more pending jobs than before (an enqueue whose
                // jobs were reserved in the same request wakes nobody); both when a queue
                // resumed.
                if ctx.wake {
                    wakeup.wake();
                } else {
                    wakeup.wake_lanes(ctx.wake_local, ctx.wake_remote);
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
pub(crate) use crate::relational::{DELAYED, FAILED, JOB_COLS, PENDING, RESERVED};

/// The writer's connection and the deltas of the transaction being built.
pub(crate) struct WriteCtx {
    pub(crate) conn: Connection,
    /// `$N` → `?N` translations of application SQL, so a statement run per row is rewritten
    /// once, not every time.
    pub(crate) translated: HashMap<String, String>,
    /// Texts of `insert_rows`' statements by a hash of what makes them, so a batch's statement
    /// is looked up, not rebuilt (the key's parts are kept beside it and compared).
    pub(crate) insert_sql: HashMap<u64, Vec<(InsertKey, String)>>,
    pub(super) history: usize,
    pub(super) history_inserts: usize,
    /// A queue resumed: wake both lanes.
    pub(super) wake: bool,
    /// Which lanes have queues whose pending count grew in this group (`crate::lane`), from the
    /// requests' counts.
    pub(super) wake_local: bool,
    pub(super) wake_remote: bool,
    pub(super) op_counts: Counts,
    pub(super) group_counts: Counts,
    pub(super) op_metrics: Vec<(i64, Completion)>,
    pub(super) group_metrics: MetricsAccumulator,
    /// Set by a broker transport: hears of the jobs each commit made ready.
    pub(super) dispatch: Arc<OnceLock<DispatchHook>>,
    pub(super) op_ready: Vec<ReadyJob>,
    pub(super) group_ready: Vec<ReadyJob>,
}

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

    pub(super) fn keep_op(&mut self) {
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

    pub(super) fn discard_op(&mut self) {
        self.op_counts.clear();
        self.op_metrics.clear();
        self.op_ready.clear();
    }

    pub(super) fn flush_deltas(&mut self) -> Result<()> {
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
}
