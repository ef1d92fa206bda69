//! The two batchers between the connections and the store: pushes of every connection go in one
//! enqueue (two in flight), outcomes (`ACK`, `FAIL`, taken-back reservations) in one `complete`.

use std::sync::Arc;

use tokio::sync::mpsc;
use tracing::warn;

use conveyor_core::{Completion, Conveyor};

use super::{Hub, Pushes, PUSH_BATCH};

/// How long the flusher gathers outcomes before it records them.
const FLUSH_DELAY: std::time::Duration = std::time::Duration::from_millis(5);
/// Outcomes of one commit at most.
const FLUSH_MAX: usize = 1000;

/// Records completions in batches: whatever accumulated while the last batch was written goes
/// in the next one. A batch that cannot be written leaves its jobs reserved: their leases
/// return them.
pub(super) async fn flusher(conveyor: Conveyor, mut rx: mpsc::Receiver<Completion>) {
    let mut batch = Vec::with_capacity(FLUSH_MAX);
    while rx.recv_many(&mut batch, FLUSH_MAX).await > 0 {
        // Outcomes are answered when queued, so nobody waits for this commit: gather for
        // FLUSH_DELAY (or up to FLUSH_MAX) and spend one commit on all of them, instead of a
        // commit per few that would hold up the pushes waiting for theirs.
        let until = tokio::time::Instant::now() + FLUSH_DELAY;
        while batch.len() < FLUSH_MAX {
            let room = FLUSH_MAX - batch.len();
            match tokio::time::timeout_at(until, rx.recv_many(&mut batch, room)).await {
                Ok(n) if n > 0 => continue,
                _ => break,
            }
        }
        if let Err(e) = conveyor.backend().complete(std::mem::take(&mut batch)).await {
            warn!(error = %e, "recording Faktory acknowledgements failed; the jobs run again when their leases expire");
        }
    }
}

/// Enqueues pushes in batches: those that arrived while the last commit was under way go in
/// the next one, each caller answered with its own jobs' outcomes.
pub(super) async fn pusher(hub: Arc<Hub>, mut rx: mpsc::Receiver<Pushes>) {
    // Two batches in flight: the store's writer finds the next one waiting when it finishes a
    // commit, instead of idling while this task collects it.
    let in_flight = Arc::new(tokio::sync::Semaphore::new(2));
    let mut waiting: Vec<Pushes> = Vec::new();
    loop {
        if waiting.is_empty() && rx.recv_many(&mut waiting, 256).await == 0 {
            return;
        }
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        while waiting.len() < 256 {
            match rx.try_recv() {
                Ok(p) => waiting.push(p),
                Err(_) => break,
            }
        }
        // Whole pushes, up to PUSH_BATCH jobs (at least one push).
        let (mut take, mut n) = (0, 0);
        while take < waiting.len() && (take == 0 || n + waiting[take].0.len() <= PUSH_BATCH) {
            n += waiting[take].0.len();
            take += 1;
        }
        let mut jobs = Vec::with_capacity(n);
        let mut replies = Vec::with_capacity(take);
        for (j, reply) in waiting.drain(..take) {
            replies.push((j.len(), reply));
            jobs.extend(j);
        }
        let hub = hub.clone();
        tokio::spawn(async move {
            let _permit = permit;
            match hub.enqueue(jobs).await {
                Ok(outcomes) => {
                    let mut outcomes = outcomes.into_iter();
                    for (n, reply) in replies {
                        let _ = reply.send(Ok(outcomes.by_ref().take(n).collect()));
                    }
                }
                Err(e) => {
                    for (_, reply) in replies {
                        let _ = reply.send(Err(e.clone()));
                    }
                }
            }
        });
    }
}
