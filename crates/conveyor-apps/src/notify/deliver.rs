//! A delivery job: one rendered message through its channel's providers (failover, breakers),
//! its log row marked in the acknowledgement.

use super::*;
use conveyor_core::telemetry::DELIVERIES;

/// A delivery job's payload: the rendered message, so a first attempt reads nothing.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Delivery {
    pub(super) log_id: String,
    pub(super) event: String,
    pub(super) event_id: String,
    pub(super) user_id: Option<i64>,
    pub(super) recipient: String,
    pub(super) subject: Option<String>,
    pub(super) body: String,
    /// The email's HTML part (the body rendered with escaping); email only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) html: Option<String>,
    pub(super) payload: Value,
    /// Whose secrets sign a webhook (`rule:<id>`, `user:<id>`); absent in deliveries enqueued
    /// before per-destination secrets, which are signed with the legacy secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) signer: Option<String>,
}

impl Notifier {
    pub(super) async fn deliver(&self, d: Delivery, ctx: JobContext) -> JobResult {
        let backend = ctx.backend().clone();
        if ctx.attempt > 1 {
            // A retry: the last attempt may have sent and lost its acknowledgement. A log
            // already `sent` is never sent again (and providers get the log id as idempotency
            // key, for the case where the send happened but was not recorded).
            let rows = backend.query("SELECT status FROM notify_logs WHERE id = $1", vec![d.log_id.clone().into()]).await?;
            match rows.first() {
                None => return Err(JobError::abort(format!("no notification {}", d.log_id))),
                Some(r) if r.text(0) == Some("sent") => return Ok(()),
                Some(_) => {}
            }
        }
        let channel_name = ctx.kind.strip_prefix("notify.").unwrap_or_default().to_string();
        let providers = self.dispatcher.providers(&channel_name).to_vec();
        if providers.is_empty() {
            return Err(JobError::abort(format!("no channel {channel_name:?}")));
        }
        let msg = Message {
            id: d.log_id.clone(),
            event: d.event,
            event_id: d.event_id,
            user_id: d.user_id,
            recipient: d.recipient,
            subject: d.subject,
            body: d.body,
            html: d.html,
            payload: d.payload,
            signer: d.signer,
        };
        // Providers in order; one whose breaker is open is skipped, one that fails is recorded
        // against its breaker and the next is tried.
        let (mut last_error, mut wait): (Option<SendError>, Option<Duration>) = (None, None);
        for p in providers {
            let breaker = Breaker::new(ctx.conveyor.clone(), format!("notify:{}", p.name), self.config.breaker.clone());
            if p.guarded {
                match self.breakers.allow(&breaker).await? {
                    Permit::Allowed => {}
                    Permit::Rejected { retry_after } => {
                        wait = Some(wait.map_or(retry_after, |w| w.min(retry_after)));
                        continue;
                    }
                }
            }
            match p.channel.send(&msg).await {
                Ok(provider_id) => {
                    let (channel, msg, guarded) = (p.channel.clone(), msg.clone(), p.guarded);
                    let result = ctx
                        .complete_with(move |tx| {
                            let n = tx.execute(
                                "UPDATE notify_logs SET status = 'sent', attempts = attempts + 1, provider_id = $2, sent_at = $3, error = NULL
                                 WHERE id = $1 AND status <> 'sent'",
                                &[msg.id.clone().into(), provider_id.into(), now_ms().into()],
                            )?;
                            if n == 1 {
                                channel.record(tx, &msg)?;
                            }
                            if guarded {
                                breaker.record_in(tx, true, now_ms())?;
                            }
                            Ok(())
                        })
                        .await;
                    if p.guarded {
                        self.breakers.succeeded(&format!("notify:{}", p.name));
                    }
                    if result.is_ok() {
                        DELIVERIES.inc(&[&channel_name, "sent"]);
                    }
                    return match result {
                        Ok(()) | Err(BackendError::LeaseLost(_)) => Ok(()),
                        Err(e) => Err(JobError::retry(e)),
                    };
                }
                Err(e @ SendError::Permanent(_)) => {
                    // The message's fault (a bad address), not the provider's: no failover.
                    last_error = Some(e);
                    break;
                }
                Err(e) => {
                    if p.guarded {
                        breaker.record(false).await?;
                        self.breakers.failed(breaker.name());
                    }
                    tracing::warn!(provider = %p.name, error = %e, "provider failed; trying the next");
                    last_error = Some(e);
                }
            }
        }
        let Some(e) = last_error else {
            // Every provider's breaker is open: wait for one without spending an attempt.
            let wait = wait.unwrap_or(Duration::from_secs(1));
            let id = d.log_id.clone();
            backend
                .transact(move |tx| {
                    tx.execute(
                        "UPDATE notify_logs SET error = $2 WHERE id = $1 AND status = 'pending'",
                        &[id.into(), "every provider's circuit breaker is open; waiting".into()],
                    )
                })
                .await?;
            return Err(JobError::release(wait));
        };
        let last = matches!(e, SendError::Permanent(_)) || ctx.attempt >= ctx.max_attempts;
        // Stored and shown by the API: a provider's error may quote our credentials.
        let (id, error) = (d.log_id.clone(), conveyor_core::redact::scrub(&e.to_string()));
        backend
            .transact(move |tx| {
                tx.execute(
                    "UPDATE notify_logs SET attempts = attempts + 1, error = $2,
                            status = CASE WHEN $3 = 1 THEN 'failed' ELSE status END
                     WHERE id = $1 AND status <> 'sent'",
                    &[id.into(), error.into(), (last as i64).into()],
                )
            })
            .await?;
        if last {
            DELIVERIES.inc(&[&channel_name, "failed"]);
        }
        Err(match e {
            SendError::Permanent(m) => JobError::abort(m),
            SendError::Retry { error, retry_after: Some(after) } => JobError::retry_after(error, after),
            SendError::Retry { error, retry_after: None } => JobError::retry(error),
        })
    }
}
