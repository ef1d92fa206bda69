//! Consuming: per queue a consumer feeding a buffer that `reserve` takes from, messages settled
//! after their job's outcome commits, dead letters moved to the failed store, and the sweep that
//! publishes again what the broker lost.

use super::*;

impl AmqpBackend {
    /// Makes sure this process consumes `queue` (declaring it first).
    pub(super) async fn consume(&self, link: &Arc<Link>, queue: &str, max: usize) -> Result<(Channel, Arc<Feed>)> {
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
            settle: Arc::default(),
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
    pub(super) async fn drop_unclaimed(&self, msgs: Vec<Msg>) {
        ack_all(msgs).await;
    }

    /// Acknowledges the deliveries of finished attempts (those whose reservation matches).
    pub(super) async fn settle(&self, done: &[(JobId, i64)]) {
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
    pub(super) async fn drain_dead_letters(&self, link: &Arc<Link>) -> Result<u64> {
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
    pub(super) async fn sweep(&self, link: &Arc<Link>) -> Result<()> {
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
                    "SELECT id, priority FROM jobs WHERE queue = $1 AND state = 0 AND available_at <= $2 ORDER BY priority DESC, fair, id LIMIT 1000",
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
