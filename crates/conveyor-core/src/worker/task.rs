//! One job's run: the batch-cancellation check, middleware, the handler under its timeout and
//! the shutdown token, and the outcome it ends in.

use super::*;

pub(super) struct JobTask {
    pub(super) conveyor: Conveyor,
    pub(super) sup: Arc<Supervisor>,
    pub(super) pool: Arc<Pool>,
    pub(super) done: mpsc::UnboundedSender<Completion>,
    pub(super) shutdown: CancellationToken,
    pub(super) hard_stop: CancellationToken,
    pub(super) counters: Arc<Counters>,
}

impl JobTask {
    pub(super) async fn run(self, job: Job, _slot: OwnedSemaphorePermit) {
        let span = tracing::info_span!("job", job_id = %job.id, queue = %job.queue, kind = %job.kind, attempt = job.attempt);
        async move {
            let template = Completion::of(&job, Outcome::Completed);
            // A job reserved ahead waits for an executor; if shutdown comes first it goes back
            // to the queue unrun, without consuming an attempt.
            let exec = tokio::select! {
                biased;
                _ = self.shutdown.cancelled() => None,
                p = self.pool.exec.clone().acquire_owned() => p.ok(),
            };
            let Some(_exec) = exec else {
                self.finish(Completion { outcome: Outcome::Release { at: now_ms() }, ..template });
                return;
            };
            // A debounced job that a later one of its key superseded completes unrun.
            match crate::debounce::superseded(self.conveyor.backend(), &job).await {
                Ok(false) => {}
                Ok(true) => {
                    debug!(job = %job.id, "superseded by a later job of its debounce key; not run");
                    return self.finish(template);
                }
                Err(e) => {
                    warn!(error = %e, "reading a debounce key failed; released");
                    return self.finish(Completion { outcome: Outcome::Release { at: now_ms() + 1000 }, ..template });
                }
            }
            // A keyed job takes its key's slot now that it starts; at the key's limit it is
            // parked instead (see `crate::flow`).
            // A slot this worker kept from the key's last job comes first (`crate::flow::Bank`).
            let key_slot = match crate::flow::Concurrency::of_job(self.conveyor.registry(), &job) {
                None => None,
                Some(c) => match self.sup.bank.take(&c.key) {
                    Some(name) => Some((c.key, name)),
                    None => {
                        let expires_at = now_ms() + self.sup.config.lease.as_millis() as i64;
                        let name = self.sup.bank.fresh_name(&c.key, &job.id.to_string());
                        match crate::flow::acquire_as(self.conveyor.backend().as_ref(), &c, &name, expires_at).await {
                            Ok(true) => {
                                self.sup.bank.taken(&c.key, &name);
                                Some((c.key, name))
                            }
                            Ok(false) => return self.park(template, c.key).await,
                            Err(e) => {
                                warn!(error = %e, key = %c.key, "concurrency slots unavailable; released");
                                self.finish(Completion { outcome: Outcome::Release { at: now_ms() + 1000 }, ..template });
                                return;
                            }
                        }
                    }
                },
            };
            if let Some(slot) = &key_slot {
                self.sup.slots.lock().expect("slots poisoned").insert(job.id, slot.clone());
            }
            if let Some(entry) = self.sup.leases.lock().expect("leases poisoned").get_mut(&job.id) {
                entry.1 = true;
            }
            let started = Instant::now();
            let slot = Arc::new(Mutex::new(CompletionSlot { template: template.clone(), reserved_at: now_ms(), done: false, lost: false }));
            // The attempt runs in the job's trace: what it enqueues and calls is part of it.
            let attempt = crate::trace::Attempt::begin(&job);
            let outcome = crate::trace::in_context(attempt.as_ref().map(|a| a.ctx), self.execute(&job, slot.clone())).await;
            let runtime_ms = started.elapsed().as_millis() as u64;
            self.sup.processed.fetch_add(1, Ordering::Relaxed);
            if let Some((key, name)) = key_slot {
                self.sup.slots.lock().expect("slots poisoned").remove(&job.id);
                // Kept for the key's next job, unless jobs wait for the key.
                if !self.sup.bank.ended(&key, &name) {
                    if let Err(e) = crate::flow::release_named(self.conveyor.backend().as_ref(), &key, &name).await {
                        warn!(error = %e, %key, "giving back a concurrency slot failed; it expires with the lease");
                    }
                }
            }
            let (done, lost) = {
                let slot = slot.lock().expect("completion slot poisoned");
                (slot.done, slot.lost)
            };
            if done {
                // The handler recorded its completion itself (complete_with); if its lease was
                // lost, the job belongs to another worker now and nothing was committed here.
                self.sup.leases.lock().expect("leases poisoned").remove(&job.id);
                if !lost {
                    self.count(&Outcome::Completed);
                }
                if let Some(a) = attempt {
                    a.end(if lost { "lease_lost" } else { "completed" }, None);
                }
                return;
            }
            if let Some(a) = attempt {
                let (name, error) = match &outcome {
                    Outcome::Completed => ("completed", None),
                    Outcome::Retry { error, .. } => ("retried", Some(error.clone())),
                    Outcome::Failed { error } => ("failed", Some(error.clone())),
                    Outcome::Release { .. } => ("released", None),
                };
                a.end(name, error);
            }
            self.finish(Completion { outcome, runtime_ms, ..template });
        }
        .instrument(span)
        .await
    }

    pub(super) async fn execute(&self, job: &Job, slot: Arc<Mutex<CompletionSlot>>) -> Outcome {
        if let Some(batch) = &job.batch_id {
            if self.sup.cancelled.contains(&self.conveyor, batch).await {
                info!(batch = %batch, "skipped: its batch was cancelled");
                return Outcome::Completed;
            }
        }
        let Some(handler) = self.conveyor.registry().get(&job.kind) else {
            let error = format!("no handler registered for job kind {:?}", job.kind);
            error!(%error, "job failed");
            return Outcome::Failed { error };
        };
        let ctx = JobContext {
            id: job.id,
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            attempt: job.attempt,
            max_attempts: job.max_attempts,
            tags: job.tags.clone(),
            batch_id: job.batch_id.clone(),
            workflow: job.workflow.clone(),
            cancel: self.hard_stop.child_token(),
            conveyor: self.conveyor.clone(),
            completion: slot,
        };
        let chain = self.conveyor.registry().middleware_of(&job.kind);
        let guard = match crate::middleware::before(&self.conveyor, job, chain).await {
            Ok(g) => g,
            Err(outcome) => return outcome,
        };
        let timeout = guard.timeout;
        let fut = std::panic::AssertUnwindSafe(handler(job, ctx)).catch_unwind();
        let timed = async {
            match timeout {
                Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| t),
                None => Ok(fut.await),
            }
        };
        let result: crate::registry::JobResult = tokio::select! {
            r = timed => match r {
                Ok(Ok(r)) => r,
                Ok(Err(panic)) => Err(JobError::retry(format!("panicked: {}", panic_message(&panic)))),
                Err(t) => Err(JobError::retry(format!("timed out after {:.1}s", t.as_secs_f64()))),
            },
            _ = self.hard_stop.cancelled() => {
                debug!("cancelled at shutdown; released");
                crate::middleware::after(&self.conveyor, guard, &Err(JobError::release(Duration::ZERO))).await;
                return Outcome::Release { at: now_ms() };
            }
        };
        crate::middleware::after(&self.conveyor, guard, &result).await;
        let (message, action) = match result {
            Ok(()) => return Outcome::Completed,
            Err(e) => {
                let e = crate::middleware::filter_error(chain, e);
                // The message is stored with the job and shown by the API: no credential of
                // this process may ride along (a driver's error quoting its URL, say).
                (crate::redact::scrub(&e.message), e.action)
            }
        };
        let now = now_ms();
        let out_of_attempts = job.attempt >= job.max_attempts;
        let outcome = match action {
            ErrorAction::Release(after) => return Outcome::Release { at: now + after.as_millis() as i64 },
            ErrorAction::Abort => Outcome::Failed { error: message },
            _ if out_of_attempts => Outcome::Failed { error: message },
            ErrorAction::RetryAfter(after) => Outcome::Retry { at: now + after.as_millis() as i64, error: message },
            ErrorAction::Retry => {
                let delay = job.backoff.clone().unwrap_or_default().delay(job.attempt);
                Outcome::Retry { at: now + delay.as_millis() as i64, error: message }
            }
        };
        match &outcome {
            // An abort is the handler's decision (a declined payment, a bad payload), not an
            // operational problem: it is recorded, but not shouted about.
            Outcome::Failed { error } if action == ErrorAction::Abort => info!(%error, "job failed: aborted by its handler"),
            Outcome::Failed { error } => warn!(%error, "job failed for good"),
            Outcome::Retry { error, .. } => info!(%error, "job attempt failed; will retry"),
            _ => {}
        }
        outcome
    }

    /// Parks a job whose key is at its limit: released at once (no attempt spent) to run again
    /// after [`crate::flow::PARK_RECHECK`], then put in line for the key's next free slot.
    async fn park(&self, template: Completion, key: String) {
        debug!(%key, "concurrency key at its limit; parked");
        let id = template.id;
        // Jobs wait for the key here: this worker keeps none of its slots for a while.
        for name in self.sup.bank.contend(&key, crate::flow::PARK_RECHECK) {
            if let Err(e) = crate::flow::release_named(self.conveyor.backend().as_ref(), &key, &name).await {
                warn!(error = %e, %key, "giving back a kept concurrency slot failed; it expires with the lease");
            }
        }
        match crate::flow::park(self.conveyor.backend().as_ref(), template, &key).await {
            Ok(release) => {
                self.sup.leases.lock().expect("leases poisoned").remove(&id);
                self.count(&release.outcome);
            }
            Err((release, e)) => {
                warn!(error = %e, %key, "parking a job failed; the flusher retries");
                self.finish(release);
            }
        }
    }

    pub(super) fn finish(&self, completion: Completion) {
        self.sup.leases.lock().expect("leases poisoned").remove(&completion.id);
        self.count(&completion.outcome);
        // The flusher outlives every job task (it ends when the last sender is dropped).
        let _ = self.done.send(completion);
    }

    pub(super) fn count(&self, outcome: &Outcome) {
        let c = &self.counters;
        let counter = match outcome {
            Outcome::Completed => &c.completed,
            Outcome::Retry { .. } => &c.retried,
            Outcome::Failed { .. } => &c.failed,
            Outcome::Release { .. } => &c.released,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

pub(super) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "unknown panic payload".to_string()
    }
}
