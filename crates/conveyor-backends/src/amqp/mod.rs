//! The queue transport on RabbitMQ (`CONVEYOR_QUEUE=amqp`).
//!
//! The relational store stays the ledger of every job — its state, attempts, lease, unique key,
//! batch and workflow, the delayed set, the failed store, metrics — exactly as when it holds the
//! queue itself, so the dashboard, `conveyor failed`, transactional enqueue and transactional
//! completion behave the same. RabbitMQ carries the work: one persistent message per ready job,
//! published with publisher confirms to a durable queue per Conveyor queue, delivered to
//! consumers under a prefetch limit, and acknowledged only once the attempt's outcome is
//! committed in the store.
//!
//! The one rule that keeps the two in step: **every commit that makes a job pending publishes
//! a message for it.** The store tells us through its dispatch hook (enqueue, transactional
//! enqueue, follow-up jobs enqueued by batch / workflow hooks, delayed jobs coming due, retries
//! and releases, reaped leases, failed jobs retried), and a publisher task sends those messages
//! in commit order. A delivery is turned into a reservation by *claiming* its job in the store
//! (pending → reserved, by id); a delivery whose job is not pending — a duplicate, a redelivery
//! after a crash, a job cleared meanwhile — is acknowledged and dropped, since the store will
//! publish again whenever that job becomes pending again. So redelivered messages are processed
//! once in effect, and a consumer that dies only delays its jobs until their leases expire.
//!
//! Delays and retries with backoff need no broker plugin: they wait in the store's delayed set
//! and are published when due. Messages RabbitMQ dead-letters (a `reject` without requeue, a TTL
//! or length limit set by a policy) go to `<prefix>.dead-letter`, which this backend drains into
//! the failed store with the broker's reason.

use std::any::Any;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use futures_util::Stream;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Acker, BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch, Notify};

use conveyor_core::backend::{
    BackendError, Cause, DispatchHook, Fronts, ManyTxFn, Queue, QueueBackend, ReadyJob, ReserveRequest, Result, RowExt, SqlValue, TxFn,
};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, EnqueueOutcome, Job, JobId, NewJob, Outcome};
use conveyor_core::wakeup::Wakeup;

use link::{bounded, broker_queue, death_reason, declare, publisher, Body, Drained, Feed, Link, Msg};
use settle::{ack_all, Settle};

mod consume;
mod link;
mod settle;
pub mod testing;

/// How long an enqueue waits for the broker's confirms before answering anyway (the jobs are
/// committed in the store, and the publisher keeps trying).
const CONFIRM_WAIT: Duration = Duration::from_secs(10);
/// Longest pause between two connection attempts while RabbitMQ is away.
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Pending jobs older than this, in a queue whose broker side is empty, lost their message to a
/// crash between the store's commit and the publish; the sweep publishes them again.
const ORPHAN_AGE_MS: i64 = 10_000;

#[derive(Clone, Debug)]
pub struct AmqpOptions {
    /// `amqp://user:password@host:port/vhost`, or `amqps://…` for TLS: the server's
    /// certificate and host name are checked against the webpki roots and, when the URL has
    /// `cacertfile=PATH`, the CA certificates of that PEM file (RabbitMQ's own URI parameter).
    pub url: String,
    /// Names RabbitMQ's queues: `<prefix>.<queue>` and `<prefix>.dead-letter`.
    pub prefix: String,
    /// Deliveries a consumer may hold unacknowledged; 0 sizes it from the worker's concurrency
    /// (twice the first reservation's size, at least 32).
    pub prefetch: u16,
    /// RabbitMQ deletes a queue unused (no consumer, no declare) this long (`x-expires`); for
    /// tests, so their queues do not pile up. `None` in production: queues are permanent.
    pub queue_expires: Option<Duration>,
}

impl AmqpOptions {
    pub fn new(url: impl Into<String>) -> Self {
        AmqpOptions { url: url.into(), prefix: "conveyor".into(), prefetch: 0, queue_expires: None }
    }
}

struct Shared {
    options: AmqpOptions,
    /// `options.url` without Conveyor's `cacertfile`, and the CA certificates it named (read
    /// at open, so a wrong path fails there and not at the first reconnect).
    connect_url: String,
    tls: lapin::tcp::OwnedTLSConfig,
    link: tokio::sync::Mutex<Option<Arc<Link>>>,
    generation: AtomicU64,
    /// When the next connection attempt may be made, and the current backoff.
    retry: Mutex<(Instant, Duration)>,
    /// Deliveries received, per queue, not yet claimed.
    buffers: Mutex<HashMap<String, VecDeque<Msg>>>,
    /// Deliveries of jobs reserved in this process, acknowledged once their outcome commits.
    held: Mutex<HashMap<JobId, (i64, Instant, Msg)>>,
    wakeup: Arc<Wakeup>,
    /// Batches of ready jobs from the store's dispatch hook, numbered in commit order.
    to_publish: mpsc::UnboundedSender<(u64, Vec<ReadyJob>)>,
    requested: AtomicU64,
    confirmed: watch::Sender<u64>,
    paused: Mutex<(Option<Instant>, HashSet<String>)>,
    /// When delayed jobs were last promoted / orphans last swept (`None`: due now).
    last_promote: Mutex<Option<Instant>>,
    last_sweep: Mutex<Option<Instant>>,
    prefetch: AtomicU64,
}

pub struct AmqpBackend {
    store: Arc<dyn QueueBackend>,
    shared: Arc<Shared>,
}

impl AmqpBackend {
    /// Puts the queue on RabbitMQ in front of `store` (which must keep a dispatch ledger: the
    /// SQLite and PostgreSQL backends do). Connects lazily, so this never blocks; the first
    /// operation that needs the broker connects (and reconnects with backoff after a loss).
    pub fn open(options: AmqpOptions, store: Arc<dyn QueueBackend>) -> Result<Self> {
        if !options.url.starts_with("amqp://") && !options.url.starts_with("amqps://") {
            return Err(BackendError::Other(format!(
                "CONVEYOR_AMQP_URL: expected amqp://…, got {:?}",
                conveyor_core::redact::url(&options.url)
            )));
        }
        crate::tls::install_default_provider();
        let (connect_url, ca) = crate::tls::take_param(&options.url, "cacertfile");
        let cert_chain = match ca {
            Some(path) => Some(String::from_utf8_lossy(&crate::tls::read_pem(&path)?).into_owned()),
            None => None,
        };
        let tls = lapin::tcp::OwnedTLSConfig { identity: None, cert_chain };
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            link: tokio::sync::Mutex::new(None),
            generation: AtomicU64::new(0),
            retry: Mutex::new((Instant::now(), Duration::from_millis(100))),
            buffers: Mutex::default(),
            held: Mutex::default(),
            wakeup: store.wakeup(),
            to_publish: tx,
            requested: AtomicU64::new(0),
            confirmed: watch::channel(0).0,
            paused: Mutex::new((None, HashSet::new())),
            last_promote: Mutex::new(None),
            last_sweep: Mutex::new(Some(Instant::now())),
            prefetch: AtomicU64::new(options.prefetch as u64),
            options,
            connect_url,
            tls,
        });
        let weak = Arc::downgrade(&shared);
        let hook: DispatchHook = Arc::new(move |ready: Vec<ReadyJob>| {
            if let Some(s) = weak.upgrade() {
                let seq = s.requested.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = s.to_publish.send((seq, ready));
            }
        });
        if !store.set_dispatch(hook) {
            return Err(BackendError::Other(format!(
                "the {} store cannot feed RabbitMQ (it keeps no dispatch ledger, or another transport already uses it)",
                store.name()
            )));
        }
        tokio::spawn(publisher(Arc::downgrade(&shared), rx));
        Ok(AmqpBackend { store, shared })
    }

    /// Waits until every message requested so far is confirmed by the broker (or `CONFIRM_WAIT`
    /// passed: the jobs are committed in the store and the publisher keeps trying).
    async fn confirmed(&self) {
        let target = self.shared.requested.load(Ordering::SeqCst);
        let mut rx = self.shared.confirmed.subscribe();
        if *rx.borrow() >= target {
            return;
        }
        let waited = tokio::time::timeout(CONFIRM_WAIT, rx.wait_for(|c| *c >= target)).await;
        if waited.is_err() {
            tracing::warn!(
                "RabbitMQ has not confirmed the jobs just committed; they stay pending in the store and are published when it answers"
            );
        }
    }

    async fn paused(&self) -> Result<HashSet<String>> {
        {
            let p = self.shared.paused.lock().expect("paused lock");
            if p.0.is_some_and(|at| at.elapsed() < Duration::from_secs(1)) {
                return Ok(p.1.clone());
            }
        }
        let rows = self.store.query("SELECT name FROM queues WHERE paused = 1", vec![]).await?;
        let set: HashSet<String> = rows.iter().filter_map(|r| r.text(0).map(str::to_string)).collect();
        *self.shared.paused.lock().expect("paused lock") = (Some(Instant::now()), set.clone());
        Ok(set)
    }

    fn forget_paused(&self) {
        self.shared.paused.lock().expect("paused lock").0 = None;
    }

    /// Periodic work shared by `reserve` and `reap_expired`: delayed jobs that came due are
    /// promoted (the hook publishes them), at most every 100 ms.
    async fn promote(&self) -> Result<()> {
        {
            let mut last = self.shared.last_promote.lock().expect("promote lock");
            if last.is_some_and(|t| t.elapsed() < Duration::from_millis(100)) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        while self.store.promote_due().await? >= 1000 {}
        Ok(())
    }

    /// The queues (as indexes into `queues`) whose buffers a take of `max` would empty before
    /// it is filled: a delivery of theirs may still be on its way, and taking past them (into a
    /// later queue, or returning short) without a barrier would break the queues' order.
    fn short_queues(&self, queues: &[String], max: usize) -> Vec<usize> {
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let buffers = self.shared.buffers.lock().expect("buffers lock");
        let mut remaining = max;
        let mut short = Vec::new();
        for (i, q) in queues.iter().enumerate() {
            let n = buffers.get(q).map_or(0, |b| b.iter().filter(|m| m.generation == generation).count());
            if n >= remaining {
                break;
            }
            remaining -= n;
            short.push(i);
        }
        short
    }

    /// Takes up to `max` buffered deliveries, from the first queue before the second, highest
    /// priority first within a queue.
    fn take(&self, queues: &[String], max: usize) -> Vec<Msg> {
        let generation = self.shared.generation.load(Ordering::SeqCst);
        let mut buffers = self.shared.buffers.lock().expect("buffers lock");
        let mut out = Vec::new();
        for q in queues {
            let Some(buf) = buffers.get_mut(q) else { continue };
            buf.retain(|m| m.generation == generation);
            if buf.len() > 1 {
                buf.make_contiguous().sort_by(|a, b| b.priority.cmp(&a.priority).then(a.id.cmp(&b.id)));
            }
            while out.len() < max {
                match buf.pop_front() {
                    Some(m) => out.push(m),
                    None => break,
                }
            }
            if out.len() >= max {
                break;
            }
        }
        out
    }
}

/// Everything but how jobs move is the ledger's (`Store` through `Fronts`).
impl Fronts for AmqpBackend {
    fn ledger(&self) -> &Arc<dyn QueueBackend> {
        &self.store
    }
}

#[async_trait]
impl Queue for AmqpBackend {
    fn name(&self) -> &'static str {
        "amqp"
    }

    /// Commits the jobs in the store (unique keys, delays), then returns once RabbitMQ has
    /// confirmed the messages of those that are ready.
    async fn enqueue(&self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        let out = self.store.enqueue(jobs).await?;
        self.confirmed().await;
        Ok(out)
    }

    async fn reserve(&self, req: ReserveRequest) -> Result<Vec<Job>> {
        if req.max == 0 || req.queues.is_empty() {
            return Ok(Vec::new());
        }
        self.promote().await?;
        let paused = self.paused().await?;
        let queues: Vec<String> = req.queues.iter().filter(|q| !paused.contains(*q)).cloned().collect();
        if queues.is_empty() {
            return Ok(Vec::new());
        }
        let link = self.shared.link().await?;
        let mut channels = Vec::with_capacity(queues.len());
        for q in &queues {
            match self.consume(&link, q, req.max).await {
                Ok(ch) => channels.push(ch),
                Err(e) => {
                    self.shared.lost(link.generation).await;
                    return Err(e);
                }
            }
        }
        let short = self.short_queues(&queues, req.max);
        if !short.is_empty() {
            // A queue has fewer buffered than this take would use. A get on its consumer's own
            // channel is a barrier: RabbitMQ answers it after any delivery it already sent on
            // that channel, so once it returns, what was published before this call is either
            // in its answer or already received by lapin — and draining the consumer here
            // brings it in. Only then may the take go on to a later queue or return short.
            for i in short {
                let (q, (ch, feed)) = (&queues[i], &channels[i]);
                let getting = feed.settle.get_begins();
                let got = bounded(ch.basic_get(broker_queue(&self.shared.options.prefix, q).into(), BasicGetOptions::default())).await;
                // What the consumer received before the answer goes in first: the answer's tag
                // is recorded only once every lower tag is (see `settle`).
                let drained = feed.drain_now();
                feed.kick.notify_one();
                let got = match got {
                    Ok(got) => got,
                    Err(e) => {
                        getting.recorded();
                        self.shared.lost(link.generation).await;
                        return Err(e);
                    }
                };
                if let Some(got) = got {
                    self.shared.received(q, got.delivery, link.generation, &feed.settle);
                }
                getting.recorded();
                if drained.end.is_some() {
                    self.shared.lost(link.generation).await;
                    break;
                }
            }
        }
        let taken = self.take(&queues, req.max);
        if taken.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<JobId> = taken.iter().map(|m| m.id).collect();
        let mut jobs = match self.store.claim(ids, req.lease, &req.worker).await {
            Ok(jobs) => jobs,
            Err(e) => {
                // Back to the broker: nothing was reserved.
                for m in taken {
                    let _ = m.acker.nack(BasicNackOptions { requeue: true, multiple: false }).await;
                    m.settle.settled_otherwise(m.tag);
                }
                return Err(e);
            }
        };
        let claimed: HashMap<JobId, i64> = jobs.iter().map(|j| (j.id, j.lease_token)).collect();
        let deadline = Instant::now() + req.lease;
        let mut unclaimed = Vec::new();
        {
            let mut held = self.shared.held.lock().expect("held lock");
            for m in taken {
                match claimed.get(&m.id) {
                    Some(token) => {
                        if let Some((_, _, old)) = held.insert(m.id, (*token, deadline, m)) {
                            unclaimed.push(old);
                        }
                    }
                    None => unclaimed.push(m),
                }
            }
        }
        self.drop_unclaimed(unclaimed).await;
        let order: HashMap<&String, usize> = req.queues.iter().enumerate().map(|(i, q)| (q, i)).collect();
        jobs.sort_by(|a, b| order.get(&a.queue).cmp(&order.get(&b.queue)).then(b.priority.cmp(&a.priority)).then(a.id.cmp(&b.id)));
        Ok(jobs)
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<()> {
        let done: Vec<(JobId, i64)> = completions.iter().map(|c| (c.id, c.lease_token)).collect();
        self.store.complete(completions).await?;
        self.settle(&done).await;
        self.confirmed().await;
        Ok(())
    }

    async fn complete_with(&self, completion: Completion, work: TxFn) -> Result<Box<dyn Any + Send>> {
        let done = [(completion.id, completion.lease_token)];
        let out = self.store.complete_with(completion, work).await;
        if matches!(out, Ok(_) | Err(BackendError::LeaseLost(_))) {
            self.settle(&done).await;
            self.confirmed().await;
        }
        out
    }

    async fn complete_many_with(&self, completions: Vec<Completion>, work: ManyTxFn) -> Result<(Box<dyn Any + Send>, Vec<bool>)> {
        let done: Vec<(JobId, i64)> = completions.iter().map(|c| (c.id, c.lease_token)).collect();
        let (out, held) = self.store.complete_many_with(completions, work).await?;
        // Lost ones too: their deliveries are no longer this process's to hold.
        self.settle(&done).await;
        self.confirmed().await;
        Ok((out, held))
    }

    async fn extend_leases(&self, leases: Vec<(JobId, i64)>, lease: Duration) -> Result<()> {
        {
            let mut held = self.shared.held.lock().expect("held lock");
            let deadline = Instant::now() + lease;
            for (id, token) in &leases {
                if let Some((t, d, _)) = held.get_mut(id) {
                    if t == token {
                        *d = deadline;
                    }
                }
            }
        }
        self.store.extend_leases(leases, lease).await
    }

    async fn reap_expired(&self) -> Result<u64> {
        let n = self.store.reap_expired().await?;
        // Deliveries of this process's reservations that lapsed: the store has put their jobs
        // back (and published them again), so these messages have done their work.
        let lapsed: Vec<Msg> = {
            let mut held = self.shared.held.lock().expect("held lock");
            let now = Instant::now();
            let ids: Vec<JobId> = held.iter().filter(|(_, (_, d, _))| *d < now).map(|(id, _)| *id).collect();
            ids.iter().filter_map(|id| held.remove(id).map(|(_, _, m)| m)).collect()
        };
        self.drop_unclaimed(lapsed).await;
        *self.shared.last_promote.lock().expect("promote lock") = None;
        self.promote().await?;
        if let Ok(link) = self.shared.link().await {
            self.drain_dead_letters(&link).await?;
            self.sweep(&link).await?;
        }
        self.confirmed().await;
        Ok(n)
    }

    fn wakeup(&self) -> Arc<Wakeup> {
        self.shared.wakeup.clone()
    }

    async fn pause(&self, queue: &str) -> Result<()> {
        self.store.pause(queue).await?;
        self.forget_paused();
        Ok(())
    }

    async fn resume(&self, queue: &str) -> Result<()> {
        self.store.resume(queue).await?;
        self.forget_paused();
        self.shared.wakeup.wake();
        Ok(())
    }

    /// Deletes the queue's pending and delayed jobs from the store and purges its messages.
    async fn clear(&self, queue: &str) -> Result<u64> {
        let n = self.store.clear(queue).await?;
        let buffered: Vec<Msg> = self.shared.buffers.lock().expect("buffers lock").remove(queue).map(Vec::from).unwrap_or_default();
        self.drop_unclaimed(buffered).await;
        if let Ok(link) = self.shared.link().await {
            let name = broker_queue(&self.shared.options.prefix, queue);
            // Purging a queue that was never declared closes the channel: declare it first.
            if declare(&link.publisher, &self.shared.options, queue).await.is_ok() {
                let _ = bounded(link.publisher.queue_purge(name.into(), QueuePurgeOptions::default())).await;
            }
        }
        Ok(n)
    }

    /// In the store; jobs made ready now are published like every ready job.
    async fn act_on_delayed(&self, ids: Vec<JobId>, action: conveyor_core::backend::DelayedAction) -> Result<Vec<JobId>> {
        let out = self.store.act_on_delayed(ids, action).await?;
        self.confirmed().await;
        Ok(out)
    }

    async fn retry_failed(&self, ids: Vec<JobId>) -> Result<Vec<JobId>> {
        let out = self.store.retry_failed(ids).await?;
        self.confirmed().await;
        Ok(out)
    }

    async fn retry_all_failed(&self, queue: Option<&str>) -> Result<u64> {
        let n = self.store.retry_all_failed(queue).await?;
        self.confirmed().await;
        Ok(n)
    }

    fn broker(&self) -> Option<&'static str> {
        Some("amqp")
    }

    async fn ping_broker(&self) -> Result<()> {
        let link = self.shared.link().await?;
        let dead = format!("{}.dead-letter", self.shared.options.prefix);
        let declared = bounded(link.publisher.queue_declare(
            dead.into(),
            QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() },
            FieldTable::default(),
        ))
        .await;
        if let Err(e) = declared {
            self.shared.lost(link.generation).await;
            return Err(e);
        }
        Ok(())
    }

    /// The store's transaction; jobs it enqueues are published after the commit (the store's
    /// job rows are the outbox), and this returns once RabbitMQ confirmed them.
    async fn transaction(&self, work: TxFn) -> Result<Box<dyn Any + Send>> {
        let out = self.store.transaction(work).await?;
        self.confirmed().await;
        Ok(out)
    }
}
#[cfg(test)]
mod tests;
