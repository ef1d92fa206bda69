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
    BackendError, Cause, DispatchHook, FailedJob, JobFilter, MetricsQuery, Page, Paged, QueueBackend, QueueStats, ReadyJob, ReserveRequest,
    Result, Row, RowExt, SqlValue, TxFn, WorkerInfo,
};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{Completion, EnqueueOutcome, Job, JobId, JobInfo, NewJob, Outcome};
use conveyor_core::metrics::MetricsRow;
use conveyor_core::wakeup::Wakeup;

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

/// What a message carries: enough to claim the job, and to read it in RabbitMQ's tools.
#[derive(Serialize, Deserialize)]
struct Body {
    id: String,
    queue: String,
    priority: i32,
}

/// A delivery waiting to be claimed, or held while its job runs.
struct Msg {
    id: JobId,
    priority: i32,
    acker: Acker,
    generation: u64,
}

/// One connection to RabbitMQ with its publishing channel and a consuming channel per queue.
struct Link {
    conn: Connection,
    publisher: Channel,
    consumers: tokio::sync::Mutex<HashMap<String, (Channel, Arc<Feed>)>>,
    declared: Mutex<HashSet<String>>,
    generation: u64,
}

/// A queue's consumer, polled by its forwarder task and, synchronously, by `reserve` (which then
/// kicks the forwarder so it polls again with its own waker).
struct Feed {
    consumer: Mutex<lapin::Consumer>,
    kick: Notify,
    queue: String,
    generation: u64,
    shared: std::sync::Weak<Shared>,
}

/// What one synchronous pass over a consumer found.
struct Drained {
    /// Deliveries moved to the buffer.
    moved: usize,
    /// The consumer ended (`Some(None)`) or failed (`Some(Some(e))`).
    end: Option<Option<lapin::Error>>,
}

impl Feed {
    /// [`drain`](Self::drain) with a no-op waker; kick the forwarder afterwards.
    fn drain_now(&self) -> Drained {
        let waker = futures_util::task::noop_waker();
        self.drain(&mut std::task::Context::from_waker(&waker))
    }

    /// Moves every delivery lapin has already received to the buffer, without waiting. The
    /// move happens under the consumer's lock, so once a drain returns, whatever lapin had
    /// received before it began is in the buffer — whoever drained it.
    fn drain(&self, cx: &mut std::task::Context<'_>) -> Drained {
        let mut deliveries = Vec::new();
        let mut end = None;
        let consumer = &mut *self.consumer.lock().expect("consumer lock");
        loop {
            match std::pin::Pin::new(&mut *consumer).poll_next(cx) {
                std::task::Poll::Ready(Some(Ok(d))) => deliveries.push(d),
                std::task::Poll::Ready(Some(Err(e))) => {
                    end = Some(Some(e));
                    break;
                }
                std::task::Poll::Ready(None) => {
                    end = Some(None);
                    break;
                }
                std::task::Poll::Pending => break,
            }
        }
        let moved = deliveries.len();
        if let Some(shared) = self.shared.upgrade() {
            shared.received_all(&self.queue, deliveries, self.generation);
        }
        Drained { moved, end }
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

    /// Makes sure this process consumes `queue` (declaring it first).
    async fn consume(&self, link: &Arc<Link>, queue: &str, max: usize) -> Result<(Channel, Arc<Feed>)> {
        let mut consumers = link.consumers.lock().await;
        if let Some((ch, feed)) = consumers.get(queue) {
            return Ok((ch.clone(), feed.clone()));
        }
        let ch = bounded(link.conn.create_channel()).await?;
        let prefetch = match self.shared.prefetch.load(Ordering::Relaxed) {
            0 => {
                let p = (max * 2).clamp(32, 1000) as u64;
                self.shared.prefetch.store(p, Ordering::Relaxed);
                p
            }
            p => p,
        };
        bounded(ch.basic_qos(prefetch as u16, BasicQosOptions::default())).await?;
        declare(&ch, &self.shared.options, queue).await?;
        let consumer = bounded(ch.basic_consume(
            broker_queue(&self.shared.options.prefix, queue).into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        let feed = Arc::new(Feed {
            consumer: Mutex::new(consumer),
            kick: Notify::new(),
            queue: queue.to_string(),
            generation: link.generation,
            shared: Arc::downgrade(&self.shared),
        });
        let shared = Arc::downgrade(&self.shared);
        let (queue_name, generation, f) = (queue.to_string(), link.generation, feed.clone());
        tokio::spawn(async move {
            loop {
                // Wait until lapin has something (registering this task's waker), or until a
                // reserve drained the consumer with its own (no-op) waker and kicked us.
                let ready = std::future::poll_fn(|cx| match f.drain(cx) {
                    Drained { moved: 0, end: None } => std::task::Poll::Pending,
                    drained => std::task::Poll::Ready(Some(drained)),
                });
                let drained = tokio::select! {
                    d = ready => d,
                    _ = f.kick.notified() => None,
                };
                let Some(s) = shared.upgrade() else { return };
                let Some(Drained { end, .. }) = drained else { continue };
                if let Some(e) = end {
                    match e {
                        Some(e) => tracing::warn!(queue = %queue_name, error = %e, "RabbitMQ consumer stopped; reconnecting"),
                        None => tracing::warn!(queue = %queue_name, "RabbitMQ cancelled the consumer; reconnecting"),
                    }
                    s.lost(generation).await;
                    return;
                }
            }
        });
        consumers.insert(queue.to_string(), (ch.clone(), feed.clone()));
        Ok((ch, feed))
    }

    /// Settles deliveries whose job could not be claimed: the job is not pending (done,
    /// reserved, delayed, cleared), and the store publishes again whenever it becomes pending.
    async fn drop_unclaimed(&self, msgs: Vec<Msg>) {
        ack_all(msgs).await;
    }

    /// Acknowledges the deliveries of finished attempts (those whose reservation matches).
    async fn settle(&self, done: &[(JobId, i64)]) {
        let msgs: Vec<Msg> = {
            let mut held = self.shared.held.lock().expect("held lock");
            done.iter()
                .filter_map(|(id, token)| match held.get(id) {
                    Some((t, _, _)) if t == token => held.remove(id).map(|(_, _, m)| m),
                    _ => None,
                })
                .collect()
        };
        ack_all(msgs).await;
    }

    /// Moves what RabbitMQ dead-lettered into the failed store.
    async fn drain_dead_letters(&self, link: &Arc<Link>) -> Result<u64> {
        let queue = format!("{}.dead-letter", self.shared.options.prefix);
        let mut n = 0;
        for _ in 0..100 {
            let Some(got) = bounded(link.publisher.basic_get(queue.as_str().into(), BasicGetOptions::default())).await? else {
                break;
            };
            let d = got.delivery;
            if let Ok(body) = serde_json::from_slice::<Body>(&d.data) {
                if let Ok(id) = body.id.parse::<JobId>() {
                    let reason = death_reason(&d);
                    let claimed = self.store.claim(vec![id], Duration::from_secs(60), "amqp-dead-letter").await?;
                    for job in claimed {
                        let error = format!("dead-lettered by RabbitMQ ({reason}) before it ran");
                        self.store.complete(vec![Completion::of(&job, Outcome::Failed { error })]).await?;
                        n += 1;
                    }
                }
            }
            let _ = d.acker.ack(BasicAckOptions::default()).await;
        }
        Ok(n)
    }

    /// Publishes again the pending jobs of idle queues that have waited too long: a crash between
    /// the store's commit and the publish left them without a message. Runs every few seconds.
    async fn sweep(&self, link: &Arc<Link>) -> Result<()> {
        {
            let mut last = self.shared.last_sweep.lock().expect("sweep lock");
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(5)) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let paused = self.paused().await?;
        for stats in self.store.queues().await? {
            if stats.pending == 0 || paused.contains(&stats.queue) {
                continue;
            }
            let buffered = self.shared.buffers.lock().expect("buffers lock").get(&stats.queue).is_some_and(|b| !b.is_empty());
            if buffered {
                continue;
            }
            // Declaring (with the usual arguments) answers the ready count, and creates a queue
            // that never existed or expired — whose pending jobs certainly have no message.
            let q = match declare(&link.publisher, &self.shared.options, &stats.queue).await {
                Ok(q) => q,
                Err(e) => {
                    self.shared.lost(link.generation).await;
                    return Err(e);
                }
            };
            if q.message_count() > 0 {
                continue;
            }
            let rows = self
                .store
                .query(
                    "SELECT id, priority FROM jobs WHERE queue = $1 AND state = 0 AND available_at <= $2 ORDER BY priority DESC, id LIMIT 1000",
                    vec![SqlValue::from(stats.queue.clone()), SqlValue::from(now_ms() - ORPHAN_AGE_MS)],
                )
                .await?;
            let ready: Vec<ReadyJob> = rows
                .iter()
                .filter_map(|r| match r.first() {
                    Some(SqlValue::Blob(b)) => {
                        JobId::from_slice(b).map(|id| ReadyJob { id, queue: stats.queue.clone(), priority: r.int(1) as i32 })
                    }
                    _ => None,
                })
                .collect();
            if !ready.is_empty() {
                tracing::info!(queue = %stats.queue, jobs = ready.len(), "publishing pending jobs that have no message in RabbitMQ");
                let seq = self.shared.requested.fetch_add(1, Ordering::SeqCst) + 1;
                let _ = self.shared.to_publish.send((seq, ready));
            }
        }
        Ok(())
    }
}

impl Shared {
    /// The current connection, connecting (with backoff after failures) when there is none.
    async fn link(&self) -> Result<Arc<Link>> {
        let mut guard = self.link.lock().await;
        if let Some(link) = &*guard {
            if link.conn.status().connected() {
                return Ok(link.clone());
            }
        }
        *guard = None;
        {
            let retry = self.retry.lock().expect("retry lock");
            if Instant::now() < retry.0 {
                return Err(BackendError::Unavailable("RabbitMQ is unreachable; reconnecting".into()));
            }
        }
        match self.connect().await {
            Ok(link) => {
                *self.retry.lock().expect("retry lock") = (Instant::now(), Duration::from_millis(100));
                let link = Arc::new(link);
                *guard = Some(link.clone());
                tracing::info!(generation = link.generation, "connected to RabbitMQ");
                Ok(link)
            }
            Err(e) => {
                let mut retry = self.retry.lock().expect("retry lock");
                let backoff = retry.1;
                *retry = (Instant::now() + backoff, (backoff * 2).min(MAX_BACKOFF));
                Err(e)
            }
        }
    }

    async fn connect(&self) -> Result<Link> {
        let props = ConnectionProperties::default().with_connection_name(format!("conveyor {}", self.options.prefix).into());
        let runtime = lapin::runtime::default_runtime().map_err(unavailable)?;
        let connect = Connection::connect_with_config(&self.connect_url, props, self.tls.clone(), runtime);
        let conn = tokio::time::timeout(Duration::from_secs(5), connect)
            .await
            .map_err(|_| BackendError::Unavailable("connecting to RabbitMQ timed out".into()))?
            .map_err(unavailable)?;
        let publisher = bounded(conn.create_channel()).await?;
        bounded(publisher.confirm_select(ConfirmSelectOptions::default())).await?;
        let dead = format!("{}.dead-letter", self.options.prefix);
        bounded(publisher.queue_declare(dead.as_str().into(), QueueDeclareOptions::durable(), expiry(&self.options))).await?;
        let generation = self.generation.fetch_add(1, Ordering::SeqCst) + 1;
        Ok(Link { conn, publisher, consumers: tokio::sync::Mutex::default(), declared: Mutex::default(), generation })
    }

    /// Forgets connection `generation` after an error, so the next operation reconnects; the
    /// broker requeues what it had delivered on it (those deliveries are dropped at claim).
    async fn lost(&self, generation: u64) {
        let mut guard = self.link.lock().await;
        if guard.as_ref().is_some_and(|l| l.generation == generation) {
            if let Some(link) = guard.take() {
                // Closed in the background, bounded: closing a connection that died can wait
                // forever for the broker's answer, and nobody may wait on it with the lock held.
                tokio::spawn(async move {
                    let _ = bounded(link.conn.close(320, "conveyor reconnects".into())).await;
                });
            }
            self.buffers.lock().expect("buffers lock").clear();
        }
        drop(guard);
        self.wakeup.wake();
    }

    fn received(&self, queue: &str, d: Delivery, generation: u64) {
        self.received_all(queue, vec![d], generation);
    }

    fn received_all(&self, queue: &str, deliveries: Vec<Delivery>, generation: u64) {
        if deliveries.is_empty() {
            return;
        }
        let mut msgs = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            let parsed = serde_json::from_slice::<Body>(&d.data).ok().and_then(|b| b.id.parse::<JobId>().ok().map(|id| (id, b.priority)));
            match parsed {
                Some((id, priority)) => msgs.push(Msg { id, priority, acker: d.acker, generation }),
                None => {
                    // Not a Conveyor message: dead-letter it rather than loop on it.
                    tracing::warn!(queue, "a message that is not a Conveyor job was dead-lettered");
                    let acker = d.acker;
                    tokio::spawn(async move { acker.nack(BasicNackOptions { requeue: false, multiple: false }).await });
                }
            }
        }
        self.buffers.lock().expect("buffers lock").entry(queue.to_string()).or_default().extend(msgs);
        self.wakeup.wake();
    }
}

/// Sends the messages of ready jobs in commit order and confirms them; on a broker failure it
/// reconnects with backoff and sends the batch again (a duplicate is dropped at claim).
async fn publisher(shared: std::sync::Weak<Shared>, mut rx: mpsc::UnboundedReceiver<(u64, Vec<ReadyJob>)>) {
    while let Some((mut seq, mut ready)) = rx.recv().await {
        while let Ok((s, more)) = rx.try_recv() {
            seq = s;
            ready.extend(more);
            if ready.len() >= 10_000 {
                break;
            }
        }
        loop {
            let Some(s) = shared.upgrade() else { return };
            let sent = match s.link().await {
                Ok(link) => match publish(&s.options, &link, &ready).await {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, jobs = ready.len(), "publishing to RabbitMQ failed; retrying");
                        s.lost(link.generation).await;
                        false
                    }
                },
                Err(_) => false,
            };
            if sent {
                s.confirmed.send_modify(|c| *c = (*c).max(seq));
                break;
            }
            let wait = s.retry.lock().expect("retry lock").0.saturating_duration_since(Instant::now()).max(Duration::from_millis(50));
            drop(s);
            tokio::time::sleep(wait).await;
        }
    }
}

async fn publish(options: &AmqpOptions, link: &Link, ready: &[ReadyJob]) -> Result<()> {
    let prefix = options.prefix.as_str();
    let mut confirms = Vec::with_capacity(ready.len());
    for job in ready {
        let fresh = link.declared.lock().expect("declared lock").insert(job.queue.clone());
        if fresh {
            declare(&link.publisher, options, &job.queue).await?;
        }
        let body = serde_json::to_vec(&Body { id: job.id.to_string(), queue: job.queue.clone(), priority: job.priority })
            .expect("a body serializes");
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_priority(broker_priority(job.priority))
            .with_message_id(job.id.to_string().into())
            .with_content_type("application/json".into());
        let confirm = bounded(link.publisher.basic_publish(
            "".into(),
            broker_queue(prefix, &job.queue).into(),
            BasicPublishOptions::default(),
            &body,
            props,
        ))
        .await?;
        confirms.push(confirm);
    }
    for c in confirms {
        match bounded(c).await? {
            Confirmation::Nack(_) => return Err(BackendError::Unavailable("RabbitMQ refused a message (nack)".into())),
            Confirmation::Ack(_) | Confirmation::NotRequested => {}
        }
    }
    Ok(())
}

/// Declares the durable queue behind Conveyor queue `queue`: priorities 0–9, dead letters to
/// `<prefix>.dead-letter`. Every process declares it with the same arguments.
async fn declare(ch: &Channel, options: &AmqpOptions, queue: &str) -> Result<lapin::Queue> {
    let prefix = options.prefix.as_str();
    let mut args = expiry(options);
    args.insert("x-max-priority".into(), AMQPValue::LongInt(9));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(format!("{prefix}.dead-letter").into()));
    bounded(ch.queue_declare(broker_queue(prefix, queue).into(), QueueDeclareOptions::durable(), args)).await
}

fn expiry(options: &AmqpOptions) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(ttl) = options.queue_expires {
        args.insert("x-expires".into(), AMQPValue::LongInt(ttl.as_millis().min(i32::MAX as u128) as i32));
    }
    args
}

fn broker_queue(prefix: &str, queue: &str) -> String {
    format!("{prefix}.{queue}")
}

/// Conveyor priorities (any `i32`, higher first) on RabbitMQ's 0–9, 0 at 4. Ties and the exact
/// order are settled in the store's claim and the local buffer, which use the real value.
fn broker_priority(p: i32) -> u8 {
    (p.clamp(-4, 5) + 4) as u8
}

fn death_reason(d: &Delivery) -> String {
    let death = d.properties.headers().as_ref().and_then(|h| h.inner().get("x-death").cloned());
    if let Some(AMQPValue::FieldArray(entries)) = death {
        if let Some(AMQPValue::FieldTable(t)) = entries.as_slice().first() {
            if let Some(reason) = t.inner().get("reason") {
                return match reason {
                    AMQPValue::LongString(s) => s.to_string(),
                    AMQPValue::ShortString(s) => s.to_string(),
                    other => format!("{other:?}"),
                };
            }
        }
    }
    "dead-lettered".into()
}

/// Acknowledges deliveries, all frames in flight at once (an ack on a lost channel is moot: the
/// broker requeued the message, and its claim will find the job settled).
async fn ack_all(msgs: Vec<Msg>) {
    let acks = futures_util::future::join_all(msgs.iter().map(|m| m.acker.ack(BasicAckOptions::default())));
    // Bounded like every broker call: an ack that cannot be written is as moot as a failed one.
    let _ = tokio::time::timeout(BROKER_CALL, acks).await;
}

fn unavailable(e: lapin::Error) -> BackendError {
    BackendError::Unavailable(Cause::new(format!("RabbitMQ: {e}")).with_source(e))
}

/// Longest one broker round trip may take. lapin waits for a reply as long as its connection
/// looks alive, and a node killed or restarted at the wrong moment can leave it waiting forever
/// (seen: a worker whose reserve never returned after a node was SIGKILLed under load); past
/// this the call fails as unavailable and the caller drops the connection.
const BROKER_CALL: Duration = Duration::from_secs(10);

/// `call` bounded by [`BROKER_CALL`].
async fn bounded<T>(call: impl std::future::Future<Output = lapin::Result<T>>) -> Result<T> {
    match tokio::time::timeout(BROKER_CALL, call).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(BackendError::Unavailable(format!("RabbitMQ did not answer within {} s", BROKER_CALL.as_secs()).into())),
    }
}

#[async_trait]
impl QueueBackend for AmqpBackend {
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
        let mut taken = self.take(&queues, req.max);
        if taken.len() < req.max {
            // Fewer buffered than asked for. A get on each consumer's own channel is a barrier:
            // RabbitMQ answers it after any delivery it already sent on that channel, so once
            // it returns, what was published before this call is either in its answer or
            // already received by lapin — and draining the consumers here brings it in.
            for (q, (ch, feed)) in queues.iter().zip(&channels) {
                match bounded(ch.basic_get(broker_queue(&self.shared.options.prefix, q).into(), BasicGetOptions::default())).await {
                    Ok(Some(got)) => self.shared.received(q, got.delivery, link.generation),
                    Ok(None) => {}
                    Err(e) => {
                        self.shared.lost(link.generation).await;
                        return Err(e);
                    }
                }
                let drained = feed.drain_now();
                feed.kick.notify_one();
                if drained.end.is_some() {
                    self.shared.lost(link.generation).await;
                    break;
                }
            }
            let more = self.take(&queues, req.max - taken.len());
            taken.extend(more);
        }
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

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        self.store.queues().await
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

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>> {
        self.store.job(id).await
    }

    async fn jobs(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>> {
        self.store.jobs(filter, page).await
    }

    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
        self.store.failed(queue, page).await
    }

    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>> {
        self.store.failed_job(id).await
    }

    async fn failed_since(&self, since: i64) -> Result<u64> {
        self.store.failed_since(since).await
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

    async fn forget_failed(&self, id: JobId) -> Result<bool> {
        self.store.forget_failed(id).await
    }

    async fn flush_failed(&self, queue: Option<&str>) -> Result<u64> {
        self.store.flush_failed(queue).await
    }

    async fn metrics(&self, query: MetricsQuery) -> Result<Vec<MetricsRow>> {
        self.store.metrics(query).await
    }

    async fn prune(&self, metrics_before: i64) -> Result<()> {
        self.store.prune(metrics_before).await
    }

    async fn worker_heartbeat(&self, info: WorkerInfo) -> Result<()> {
        self.store.worker_heartbeat(info).await
    }

    async fn worker_gone(&self, id: &str) -> Result<()> {
        self.store.worker_gone(id).await
    }

    async fn workers(&self, within: Duration) -> Result<Vec<WorkerInfo>> {
        self.store.workers(within).await
    }

    async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    fn broker(&self) -> Option<&'static str> {
        Some("amqp")
    }

    fn warnings(&self) -> Vec<String> {
        self.store.warnings()
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

    async fn query(&self, sql: &str, params: Vec<SqlValue>) -> Result<Vec<Row>> {
        self.store.query(sql, params).await
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
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use lapin::options::{BasicGetOptions, BasicRejectOptions, QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;
    use lapin::{Connection, ConnectionProperties};

    use conveyor_core::backend::{QueueBackend, QueueBackendExt, ReserveRequest};
    use conveyor_core::job::{JobState, NewJob};

    use super::testing::TestAmqp;
    use super::{broker_queue, AmqpBackend};
    use crate::sqlite::{SqliteBackend, SqliteOptions};

    fn open(amqp: &TestAmqp, dir: &tempfile::TempDir) -> AmqpBackend {
        let store = SqliteBackend::open(SqliteOptions::new(dir.path().join("s.db").to_str().unwrap())).unwrap();
        AmqpBackend::open(amqp.options(), Arc::new(store)).unwrap()
    }

    fn request(queue: &str) -> ReserveRequest {
        ReserveRequest { queues: vec![queue.into()], max: 10, lease: Duration::from_secs(30), worker: "t".into() }
    }

    /// A job is delivered by RabbitMQ, not read from the store: with its message purged behind
    /// the backend's back it cannot be reserved, although the store holds it as pending — until
    /// the sweep finds it orphaned and publishes it again.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn jobs_travel_through_rabbitmq_and_orphans_are_published_again() {
        let Some(amqp) = TestAmqp::create() else { return };
        let dir = tempfile::tempdir().unwrap();
        let b = open(&amqp, &dir);
        let q = "through";
        let id = NewJob::new("k", &1).queue(q).id;
        let mut job = NewJob::new("k", &1).queue(q);
        job.id = id;
        b.enqueue(vec![job]).await.unwrap();

        let conn = Connection::connect(&amqp.url, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let name = broker_queue(&amqp.prefix, q);
        let declared = ch
            .queue_declare(name.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
            .await;
        assert_eq!(declared.unwrap().message_count(), 1, "the enqueue returned once RabbitMQ held the message");
        let got = ch.basic_get(name.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap();
        assert!(got.is_some(), "the message was taken behind the backend's back");

        assert!(b.reserve(request(q)).await.unwrap().is_empty(), "without its message the job is not delivered");
        assert_eq!(b.job(id).await.unwrap().unwrap().state, JobState::Pending, "the ledger still holds it");

        // Once it has waited past the orphan age in a queue RabbitMQ has nothing for, the sweep
        // (part of the reaper's pass) publishes it again.
        b.store.transact(move |tx| tx.execute("UPDATE jobs SET available_at = available_at - 60000", &[])).await.unwrap();
        *b.shared.last_sweep.lock().unwrap() = None;
        b.reap_expired().await.unwrap();
        let jobs = b.reserve(request(q)).await.unwrap();
        assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id], "the orphan is delivered again");
        let _ = ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
    }

    /// The health check's round trip: answers on a live broker, fails (quickly, naming
    /// RabbitMQ) when none listens; a URL that is not `amqp://` is refused at open.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ping_broker_answers_and_fails_without_a_broker() {
        let Some(amqp) = TestAmqp::create() else { return };
        let dir = tempfile::tempdir().unwrap();
        let b = open(&amqp, &dir);
        assert_eq!(b.broker(), Some("amqp"));
        b.ping_broker().await.expect("the local broker answers");

        let dir2 = tempfile::tempdir().unwrap();
        let store = SqliteBackend::open(SqliteOptions::new(dir2.path().join("s.db").to_str().unwrap())).unwrap();
        let mut options = amqp.options();
        options.url = "amqp://guest:secret@127.0.0.1:1/%2f".into();
        let away = AmqpBackend::open(options, Arc::new(store)).unwrap();
        let err = away.ping_broker().await.expect_err("nothing listens on port 1").to_string();
        assert!(err.contains("RabbitMQ") && !err.contains("secret"), "{err}");

        let dir3 = tempfile::tempdir().unwrap();
        let store = SqliteBackend::open(SqliteOptions::new(dir3.path().join("s.db").to_str().unwrap())).unwrap();
        let mut options = amqp.options();
        options.url = "http://guest:secret@127.0.0.1/".into();
        let err = AmqpBackend::open(options, Arc::new(store)).err().expect("not an AMQP URL").to_string();
        assert!(err.contains("CONVEYOR_AMQP_URL") && !err.contains("secret"), "{err}");
    }

    /// A message RabbitMQ dead-letters (here: rejected without requeue by another consumer) puts
    /// its job in the failed store with the broker's reason.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn dead_lettered_messages_move_their_jobs_to_the_failed_store() {
        let Some(amqp) = TestAmqp::create() else { return };
        let dir = tempfile::tempdir().unwrap();
        let b = open(&amqp, &dir);
        let q = "dead";
        let job = NewJob::new("k", &1).queue(q);
        let id = job.id;
        b.enqueue(vec![job]).await.unwrap();

        let conn = Connection::connect(&amqp.url, ConnectionProperties::default()).await.unwrap();
        let ch = conn.create_channel().await.unwrap();
        let name = broker_queue(&amqp.prefix, q);
        let got = ch.basic_get(name.as_str().into(), BasicGetOptions::default()).await.unwrap().expect("the job's message");
        got.delivery.acker.reject(BasicRejectOptions { requeue: false }).await.unwrap();

        let mut failed = None;
        for _ in 0..100 {
            b.reap_expired().await.unwrap();
            failed = b.failed_job(id).await.unwrap();
            if failed.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let failed = failed.expect("the dead-lettered job is in the failed store");
        assert!(failed.error.contains("dead-lettered by RabbitMQ (rejected)"), "{}", failed.error);
        assert_eq!(b.job(id).await.unwrap().unwrap().state, JobState::Failed);
        let _ = ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
    }
}
