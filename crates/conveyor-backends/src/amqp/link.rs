//! The connection to RabbitMQ: the link (connection, channels, generation), what consumers
//! deliver (`Feed`, `Msg`), the publisher task and the broker's names, priorities and errors.

use super::*;

/// What a message carries: enough to claim the job, and to read it in RabbitMQ's tools.
#[derive(Serialize, Deserialize)]
pub(super) struct Body {
    pub(super) id: String,
    pub(super) queue: String,
    pub(super) priority: i32,
}

/// A delivery waiting to be claimed, or held while its job runs.
pub(super) struct Msg {
    pub(super) id: JobId,
    pub(super) priority: i32,
    pub(super) acker: Acker,
    /// The delivery's tag on its channel, and that channel's unsettled tags.
    pub(super) tag: u64,
    pub(super) settle: Arc<Settle>,
    pub(super) generation: u64,
}

/// One connection to RabbitMQ with its publishing channel and a consuming channel per queue.
pub(super) struct Link {
    pub(super) conn: Connection,
    pub(super) publisher: Channel,
    pub(super) consumers: tokio::sync::Mutex<HashMap<String, (Channel, Arc<Feed>)>>,
    pub(super) declared: Mutex<HashSet<String>>,
    pub(super) generation: u64,
}

/// A queue's consumer, polled by its forwarder task and, synchronously, by `reserve` (which then
/// kicks the forwarder so it polls again with its own waker).
pub(super) struct Feed {
    pub(super) consumer: Mutex<lapin::Consumer>,
    pub(super) kick: Notify,
    pub(super) queue: String,
    pub(super) generation: u64,
    pub(super) shared: std::sync::Weak<Shared>,
    /// The consuming channel's unsettled deliveries.
    pub(super) settle: Arc<Settle>,
}

/// What one synchronous pass over a consumer found.
pub(super) struct Drained {
    /// Deliveries moved to the buffer.
    pub(super) moved: usize,
    /// The consumer ended (`Some(None)`) or failed (`Some(Some(e))`).
    pub(super) end: Option<Option<lapin::Error>>,
}

impl Feed {
    /// [`drain`](Self::drain) with a no-op waker; kick the forwarder afterwards.
    pub(super) fn drain_now(&self) -> Drained {
        let waker = futures_util::task::noop_waker();
        self.drain(&mut std::task::Context::from_waker(&waker))
    }

    /// Moves every delivery lapin has already received to the buffer, without waiting. The
    /// move happens under the consumer's lock, so once a drain returns, whatever lapin had
    /// received before it began is in the buffer — whoever drained it.
    pub(super) fn drain(&self, cx: &mut std::task::Context<'_>) -> Drained {
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
            shared.received_all(&self.queue, deliveries, self.generation, &self.settle);
        }
        Drained { moved, end }
    }
}

impl Shared {
    /// The current connection, connecting (with backoff after failures) when there is none.
    pub(super) async fn link(&self) -> Result<Arc<Link>> {
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

    pub(super) async fn connect(&self) -> Result<Link> {
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
    pub(super) async fn lost(&self, generation: u64) {
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

    pub(super) fn received(&self, queue: &str, d: Delivery, generation: u64, settle: &Arc<Settle>) {
        self.received_all(queue, vec![d], generation, settle);
    }

    pub(super) fn received_all(&self, queue: &str, deliveries: Vec<Delivery>, generation: u64, settle: &Arc<Settle>) {
        if deliveries.is_empty() {
            return;
        }
        let mut msgs = Vec::with_capacity(deliveries.len());
        for d in deliveries {
            settle.delivered(d.delivery_tag);
            let parsed = serde_json::from_slice::<Body>(&d.data).ok().and_then(|b| b.id.parse::<JobId>().ok().map(|id| (id, b.priority)));
            match parsed {
                Some((id, priority)) => {
                    msgs.push(Msg { id, priority, acker: d.acker, tag: d.delivery_tag, settle: settle.clone(), generation })
                }
                None => {
                    // Not a Conveyor message: dead-letter it rather than loop on it.
                    tracing::warn!(queue, "a message that is not a Conveyor job was dead-lettered");
                    let (acker, tag, settle) = (d.acker, d.delivery_tag, settle.clone());
                    tokio::spawn(async move {
                        let _ = acker.nack(BasicNackOptions { requeue: false, multiple: false }).await;
                        settle.settled_otherwise(tag);
                    });
                }
            }
        }
        self.buffers.lock().expect("buffers lock").entry(queue.to_string()).or_default().extend(msgs);
        self.wakeup.wake();
    }
}

/// Sends the messages of ready jobs in commit order and confirms them; on a broker failure it
/// reconnects with backoff and sends the batch again (a duplicate is dropped at claim).
pub(super) async fn publisher(shared: std::sync::Weak<Shared>, mut rx: mpsc::UnboundedReceiver<(u64, Vec<ReadyJob>)>) {
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

pub(super) async fn publish(options: &AmqpOptions, link: &Link, ready: &[ReadyJob]) -> Result<()> {
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
pub(super) async fn declare(ch: &Channel, options: &AmqpOptions, queue: &str) -> Result<lapin::Queue> {
    let prefix = options.prefix.as_str();
    let mut args = expiry(options);
    args.insert("x-max-priority".into(), AMQPValue::LongInt(9));
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("".into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(format!("{prefix}.dead-letter").into()));
    bounded(ch.queue_declare(broker_queue(prefix, queue).into(), QueueDeclareOptions::durable(), args)).await
}

pub(super) fn expiry(options: &AmqpOptions) -> FieldTable {
    let mut args = FieldTable::default();
    if let Some(ttl) = options.queue_expires {
        args.insert("x-expires".into(), AMQPValue::LongInt(ttl.as_millis().min(i32::MAX as u128) as i32));
    }
    args
}

pub(super) fn broker_queue(prefix: &str, queue: &str) -> String {
    format!("{prefix}.{queue}")
}

/// Conveyor priorities (any `i32`, higher first) on RabbitMQ's 0–9, 0 at 4. Ties and the exact
/// order are settled in the store's claim and the local buffer, which use the real value.
pub(super) fn broker_priority(p: i32) -> u8 {
    (p.clamp(-4, 5) + 4) as u8
}

pub(super) fn death_reason(d: &Delivery) -> String {
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

pub(super) fn unavailable(e: lapin::Error) -> BackendError {
    BackendError::Unavailable(Cause::new(format!("RabbitMQ: {e}")).with_source(e))
}

/// Longest one broker round trip may take. lapin waits for a reply as long as its connection
/// looks alive, and a node killed or restarted at the wrong moment can leave it waiting forever
/// (seen: a worker whose reserve never returned after a node was SIGKILLed under load); past
/// this the call fails as unavailable and the caller drops the connection.
pub(super) const BROKER_CALL: Duration = Duration::from_secs(10);

/// `call` bounded by [`BROKER_CALL`].
pub(super) async fn bounded<T>(call: impl std::future::Future<Output = lapin::Result<T>>) -> Result<T> {
    match tokio::time::timeout(BROKER_CALL, call).await {
        Ok(r) => r.map_err(unavailable),
        Err(_) => Err(BackendError::Unavailable(format!("RabbitMQ did not answer within {} s", BROKER_CALL.as_secs()).into())),
    }
}
