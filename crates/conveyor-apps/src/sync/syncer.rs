//! The sync's jobs: starting a run, reading a page of the source, pushing a product's changes
//! to the target, finishing the run — each a `Syncer` method.

use super::*;

#[derive(Serialize, Deserialize)]
pub(super) struct PageJob {
    pub(super) run_id: String,
    pub(super) batch_id: String,
    pub(super) page: u32,
    pub(super) cursor: Option<Cursor>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct PushJob {
    pub(super) run_id: String,
    pub(super) product: Product,
}

#[derive(Serialize, Deserialize)]
pub(super) struct RunRef {
    pub(super) run_id: String,
}

#[derive(Serialize, Deserialize, Default)]
pub(super) struct StartJob {
    #[serde(default)]
    pub(super) full: bool,
}

pub(super) struct Syncer {
    pub(super) config: SyncConfig,
    pub(super) source: Option<Source>,
    pub(super) target: Option<Target>,
    pub(super) limiter: RateLimiter,
    pub(super) breakers: ClosedCache,
}

pub(super) fn page_job(p: &PageJob, max_attempts: u32) -> NewJob {
    NewJob::new(PAGE_KIND, p)
        .queue(QUEUE)
        .max_attempts(max_attempts.max(3))
        .backoff(Backoff::exponential(Duration::from_secs(1), Duration::from_secs(30)))
        .tag(format!("sync:{}", p.run_id))
}

pub(super) fn push_job(run_id: &str, product: Product, max_attempts: u32) -> NewJob {
    NewJob::new(PUSH_KIND, &PushJob { run_id: run_id.into(), product })
        .queue(QUEUE)
        .max_attempts(max_attempts)
        .backoff(Backoff::exponential(Duration::from_secs(1), Duration::from_secs(60)))
        .tag(format!("sync:{run_id}"))
}

/// A transactional completion's result as a job result: a lost lease means another worker
/// owns the job now.
pub(super) fn ack<T>(r: Result<T, BackendError>) -> JobResult {
    match r {
        Ok(_) | Err(BackendError::LeaseLost(_)) => Ok(()),
        Err(e) => Err(JobError::retry(e)),
    }
}

impl Syncer {
    pub(super) fn source(&self) -> Result<&Source, JobError> {
        self.source.as_ref().ok_or_else(|| JobError::abort(SyncError::NotConfigured("CONVEYOR_SYNC_SOURCE_URL")))
    }

    pub(super) fn target(&self) -> Result<&Target, JobError> {
        self.target.as_ref().ok_or_else(|| JobError::abort(SyncError::NotConfigured("CONVEYOR_SYNC_TARGET_URL")))
    }

    /// The run's listener: the first page job joins the batch (from the cursor, unless full).
    pub(super) async fn first_page(&self, ev: RunEvent, ctx: JobContext) -> JobResult {
        let max = self.config.max_attempts;
        ack(ctx
            .complete_with(move |tx| {
                let rows = tx.query("SELECT status FROM sync_runs WHERE id = $1", &[ev.run_id.clone().into()])?;
                if rows.first().and_then(|r| r.text(0)) != Some("running") {
                    return Ok(());
                }
                let cursor = if ev.scope == "full" { None } else { read_cursor(tx)? };
                let job = page_job(&PageJob { run_id: ev.run_id, batch_id: ev.batch_id.clone(), page: 1, cursor }, max);
                batch::add_jobs_in(tx, &ev.batch_id, vec![job])
            })
            .await)
    }

    pub(super) async fn page(&self, job: PageJob, ctx: JobContext) -> JobResult {
        let backend = ctx.backend().clone();
        let rows = backend.query("SELECT status, scope FROM sync_runs WHERE id = $1", vec![job.run_id.clone().into()]).await?;
        match rows.first().and_then(|r| r.text(0)) {
            Some("running") => {}
            // Cancelled, failed or gone: the chain stops here.
            _ => return Ok(()),
        }
        let source = self.source()?;
        let (result, audit) = source.page(job.page, job.cursor.as_ref().map(|c| c.since.as_str())).await;
        let page = match result {
            Ok(p) => p,
            Err(e) => {
                let last = ctx.attempt >= ctx.max_attempts || matches!(e, CallError::Permanent(_));
                let (run, error, at_page) = (job.run_id.clone(), e.to_string(), job.page);
                let cursor = serde_json::to_string(&job.cursor).unwrap_or_default();
                backend
                    .transact(move |tx| {
                        audit_rows(tx, Some(&run), &[audit])?;
                        if last {
                            let payload = json!({ "page": at_page, "cursor": cursor }).to_string();
                            record_failure(tx, &run, "page", None, &format!("source page {at_page}: {error}"), &payload)?;
                        }
                        Ok(())
                    })
                    .await?;
                return Err(match e {
                    CallError::Permanent(m) => JobError::abort(m),
                    CallError::RateLimited { retry_after } => JobError::release(retry_after.unwrap_or(Duration::from_secs(1))),
                    CallError::Transient { error, retry_after: Some(a) } => JobError::retry_after(error, a),
                    CallError::Transient { error, retry_after: None } => JobError::retry(error),
                });
            }
        };
        let cv = ctx.conveyor.clone();
        let max = self.config.max_attempts;
        ack(ctx.complete_with(move |tx| apply_page(&cv, tx, job, page, audit, max)).await)
    }

    pub(super) async fn push(&self, job: PushJob, ctx: JobContext) -> JobResult {
        let backend = ctx.backend().clone();
        let target = self.target()?.clone();
        let product = job.product.clone();
        let skus: Vec<SqlValue> = product.variants.iter().map(|v| v.sku.clone().into()).collect();
        let sql = format!("SELECT sku, price_cents, stock FROM sync_variants WHERE sku IN ({})", placeholders(1, skus.len()));
        let stored: HashMap<String, (Option<i64>, Option<i64>)> = backend
            .query(&sql, skus)
            .await?
            .iter()
            .map(|r| (r.text(0).unwrap_or_default().to_string(), (r.opt_int(1), r.opt_int(2))))
            .collect();
        let mut changes = Vec::new();
        for v in &product.variants {
            let (price, stock) = stored.get(&v.sku).copied().unwrap_or((None, None));
            for (field, value, last) in [(Field::Price, v.price_cents, price), (Field::Stock, v.stock, stock)] {
                if last != Some(value) {
                    let key = hex_hash(&format!("{}\n{}\n{value}\n{}", v.sku, field.as_str(), product.updated_at));
                    changes.push(Change { sku: v.sku.clone(), field, value, key });
                }
            }
        }
        let run_id = job.run_id.clone();
        if changes.is_empty() {
            return ack(ctx.complete_with(move |tx| settle(tx, &run_id, &product, &[], &[], "unchanged")).await);
        }

        let breaker = Breaker::new(ctx.conveyor.clone(), TARGET_BREAKER, self.config.breaker.clone());
        if let Permit::Rejected { retry_after } = self.breakers.allow(&breaker).await? {
            return Err(JobError::release(retry_after));
        }
        let burst = self.limiter.limit().burst.max(1) as usize;
        let (mut done, mut audits): (Vec<Change>, Vec<Audit>) = (Vec::new(), Vec::new());
        let mut failure: Option<CallError> = None;
        'send: for chunk in changes.chunks(burst) {
            // Units for the whole chunk at once; a short wait is taken here, a long one releases
            // the job (progress kept).
            loop {
                match self.limiter.check_n("target", chunk.len() as u32).await? {
                    Decision::Allowed { .. } => break,
                    Decision::Limited { retry_after } if retry_after <= Duration::from_secs(5) => {
                        let jitter = Duration::from_millis(rand::random::<u64>() % (retry_after.as_millis() as u64 / 2 + 5));
                        tokio::time::sleep(retry_after + jitter).await;
                    }
                    Decision::Limited { retry_after } => {
                        failure = Some(CallError::RateLimited { retry_after: Some(retry_after) });
                        break 'send;
                    }
                }
            }
            for c in chunk {
                let (result, audit) = target.update(&c.sku, c.field, c.value, &c.key).await;
                audits.push(audit);
                match result {
                    Ok(()) => done.push(c.clone()),
                    Err(e) => {
                        failure = Some(e);
                        break 'send;
                    }
                }
            }
        }
        let Some(e) = failure else {
            let name = breaker.name().to_string();
            let out = ctx
                .complete_with(move |tx| {
                    breaker.record_in(tx, true, now_ms())?;
                    settle(tx, &run_id, &product, &done, &audits, "pushed")
                })
                .await;
            self.breakers.succeeded(&name);
            return ack(out);
        };

        // Not all sent: keep what was, and decide what the job does next.
        let mut open = false;
        if matches!(e, CallError::Transient { .. }) {
            self.breakers.failed(breaker.name());
            breaker.record(false).await?;
            open = matches!(breaker.info().await?.state.as_str(), "open");
        }
        let last = matches!(e, CallError::Permanent(_))
            || (!open && ctx.attempt >= ctx.max_attempts && !matches!(e, CallError::RateLimited { .. }));
        let cv = ctx.conveyor.clone();
        let error = e.to_string();
        backend
            .transact(move |tx| {
                audit_rows(tx, Some(&run_id), &audits)?;
                remember(tx, &product, &done)?;
                if last {
                    let payload = serde_json::to_string(&product).unwrap_or_default();
                    record_failure(tx, &run_id, "push", Some(&product.id), &error, &payload)?;
                    set_item(tx, &run_id, &product, "failed", true)?;
                    cv.emit_in(tx, Event::new(PUSH_FAILED, &json!({ "run_id": run_id, "product_id": product.id, "error": error })))?;
                }
                Ok(())
            })
            .await?;
        Err(match e {
            CallError::Permanent(m) => JobError::abort(m),
            CallError::RateLimited { retry_after } => JobError::release(retry_after.unwrap_or(Duration::from_secs(1))),
            // The breaker opened on this failure: wait for it without spending the attempt.
            CallError::Transient { .. } if open => JobError::release(self.config.breaker.open_for),
            CallError::Transient { error, retry_after: Some(a) } => JobError::retry_after(error, a),
            CallError::Transient { error, retry_after: None } => JobError::retry(error),
        })
    }
}
