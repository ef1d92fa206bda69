//! The hub's background duties, once a second: reservations whose `reserve_for` passed or
//! whose worker stopped beating fail their attempt; buffered jobs left for [`BUFFER_TTL`] go
//! back to their queue; every [`EXTEND_EVERY`] the store's leases (and the concurrency slots of
//! held jobs) are renewed. On shutdown the buffers are given back.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use conveyor_core::clock::now_ms;
use conveyor_core::{Completion, Job, JobId};

use super::{failure, job, Hub, BUFFER_TTL, EXTEND_EVERY, STORE_LEASE};

impl Hub {
    /// One pass of the background duties (see the module docs); `extend` also renews the
    /// store's leases.
    async fn tick(&self, extend: bool) {
        let now = Instant::now();
        let (expired, stale, leases, slots) = {
            let mut st = self.state();
            let gone: HashSet<String> = st.workers.iter().filter(|(_, w)| w.gone(now)).map(|(id, _)| id.clone()).collect();
            let mut expired = Vec::new();
            st.held.retain(|_, h| {
                let dead = h.wid.as_ref().is_some_and(|w| gone.contains(w));
                if dead || now >= h.deadline {
                    expired.push((h.job.clone(), dead, h.wid.clone(), h.slot.clone()));
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
            let slots: Vec<(String, JobId)> =
                if extend { st.held.values().filter_map(|h| Some((h.slot.clone()?, h.job.id))).collect() } else { Vec::new() };
            (expired, stale, leases, slots)
        };
        for (job, dead, wid, slot) in expired {
            self.give_slot(slot.as_deref(), &job).await;
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
        if !slots.is_empty() {
            let until = now_ms() + STORE_LEASE.as_millis() as i64;
            if let Err(e) = conveyor_core::flow::extend(self.conveyor.backend().as_ref(), slots, until).await {
                warn!(error = %e, "extending the concurrency slots of Faktory jobs failed");
            }
        }
    }

    /// Gives every buffered job back (shutdown).
    async fn drain(&self) {
        let jobs: Vec<Job> = self.state().buffers.drain().flat_map(|(_, b)| b.into_iter().map(|b| b.job)).collect();
        self.give_back(jobs).await;
    }
}

pub(super) async fn maintain(hub: Arc<Hub>, shutdown: CancellationToken) {
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
