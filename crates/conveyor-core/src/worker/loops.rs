//! The worker's background tasks: the flusher that acknowledges completions in batches, the
//! registry heartbeat (with lease extension), the reaper, and supervisor balancing.

use super::*;

/// Acknowledges completions in batches: whatever arrived while the previous batch was being
/// written goes in the next one, so under load one round trip serves many jobs.
pub(super) async fn flush_loop(conveyor: Conveyor, mut rx: mpsc::UnboundedReceiver<Completion>, max: usize) {
    let backend = conveyor.backend().clone();
    let mut batch = Vec::with_capacity(max);
    while rx.recv_many(&mut batch, max).await > 0 {
        let mut delay = Duration::from_millis(50);
        let mut tries = 0;
        loop {
            match backend.complete(batch.clone()).await {
                Ok(()) => break,
                Err(e) => {
                    tries += 1;
                    if tries >= 20 {
                        // The jobs stay reserved; their leases expire and the reaper returns
                        // them, so nothing is lost — they run again.
                        error!(error = %e, jobs = batch.len(), "could not acknowledge jobs; they will be retried after their lease expires");
                        break;
                    }
                    warn!(error = %e, "acknowledging jobs failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
        batch.clear();
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn heartbeat_loop(
    conveyor: Conveyor,
    supervisors: Vec<Arc<Supervisor>>,
    worker_id: String,
    started_at: i64,
    every: Duration,
    shutdown: CancellationToken,
    stop: CancellationToken,
) {
    let backend = conveyor.backend().clone();
    let lease_every = supervisors.iter().map(|s| s.config.lease / 3).min().unwrap_or(every).max(Duration::from_millis(100));
    let mut lease_tick = tokio::time::interval(lease_every);
    let mut registry_tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = lease_tick.tick() => {
                for sup in &supervisors {
                    let leases: Vec<(JobId, i64)> =
                        sup.leases.lock().expect("leases poisoned").iter().map(|(id, (token, _))| (*id, *token)).collect();
                    if leases.is_empty() {
                        continue;
                    }
                    if let Err(e) = backend.extend_leases(leases, sup.config.lease).await {
                        warn!(error = %e, "extending leases failed");
                    }
                    let slots: Vec<(String, String)> = sup.slots.lock().expect("slots poisoned").values().cloned().collect();
                    let until = now_ms() + sup.config.lease.as_millis() as i64;
                    if let Err(e) = crate::flow::extend_named(backend.as_ref(), slots, until).await {
                        warn!(error = %e, "extending concurrency slots failed");
                    }
                }
                // Kept slots (shared by the supervisors) live as long as the longest lease.
                if let Some(lease) = supervisors.iter().map(|s| s.config.lease).max() {
                    let kept = supervisors[0].bank.kept();
                    if let Err(e) = crate::flow::extend_named(backend.as_ref(), kept, now_ms() + lease.as_millis() as i64).await {
                        warn!(error = %e, "extending kept concurrency slots failed");
                    }
                }
            }
            _ = registry_tick.tick() => {
                // Once shutdown began the worker reports "stopping" until it is gone, not "running".
                let status = if shutdown.is_cancelled() { "stopping" } else { "running" };
                if let Err(e) = backend.worker_heartbeat(snapshot(&worker_id, started_at, &supervisors, status)).await {
                    warn!(error = %e, "worker heartbeat failed");
                }
            }
        }
    }
}

pub(super) fn snapshot(worker_id: &str, started_at: i64, supervisors: &[Arc<Supervisor>], status: &str) -> WorkerInfo {
    WorkerInfo {
        id: worker_id.to_string(),
        hostname: hostname(),
        pid: std::process::id(),
        started_at,
        last_seen: now_ms(),
        status: status.to_string(),
        supervisors: supervisors
            .iter()
            .map(|s| {
                let leases = s.leases.lock().expect("leases poisoned");
                let current_jobs: Vec<String> =
                    leases.iter().filter(|(_, (_, started))| *started).take(25).map(|(id, _)| id.to_string()).collect();
                SupervisorInfo {
                    name: s.config.name.clone(),
                    queues: s.config.queues.clone(),
                    concurrency: s.config.concurrency,
                    busy: s.pools.iter().map(|p| p.capacity().saturating_sub(p.exec.available_permits())).sum(),
                    balance: s.config.balance,
                    pools: s.pools.iter().map(|p| PoolInfo { queues: p.queues.clone(), workers: p.capacity() }).collect(),
                    processed: s.processed.load(Ordering::Relaxed),
                    current_jobs,
                }
            })
            .collect(),
    }
}

/// Returns expired reservations every `every`, and every second those of processes of this
/// machine that died ([`crate::liveness`]), so their jobs run again within seconds.
pub(super) async fn reap_loop(conveyor: Conveyor, bank: Arc<crate::flow::Bank>, keep: Duration, every: Duration, stop: CancellationToken) {
    let backend = conveyor.backend().clone();
    let mut tick = tokio::time::interval(every);
    let mut dead_tick = tokio::time::interval(DEAD_HOLDERS_EVERY.min(every));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => reap(backend.as_ref(), "reclaimed jobs whose lease expired").await,
            _ = dead_tick.tick() => {
                match crate::flow::sweep(backend.as_ref()).await {
                    Ok(waited) => give_back_kept(backend.as_ref(), &bank, &waited, keep).await,
                    Err(e) => warn!(error = %e, "handing expired concurrency slots on failed"),
                }
                let dead: Vec<String> = match backend.holders().await {
                    Ok(h) => h.into_iter().filter(|h| crate::liveness::is_dead(h)).collect(),
                    Err(e) => {
                        warn!(error = %e, "listing reservation holders failed");
                        continue;
                    }
                };
                if dead.is_empty() {
                    continue;
                }
                match backend.expire_leases_of(dead.clone()).await {
                    Ok(0) => {}
                    Ok(n) => {
                        info!(jobs = n, holders = ?dead, "the processes holding these jobs died; running them again");
                        reap(backend.as_ref(), "reclaimed the jobs of dead processes").await;
                    }
                    Err(e) => warn!(error = %e, "ending dead processes' leases failed"),
                }
            }
        }
    }
}

/// How often the reaper looks for reservations held by dead processes of this machine.
const DEAD_HOLDERS_EVERY: Duration = Duration::from_secs(1);

async fn reap(backend: &dyn crate::QueueBackend, what: &str) {
    match backend.reap_expired().await {
        Ok(0) => {}
        Ok(n) => info!(jobs = n, "{what}"),
        Err(e) => warn!(error = %e, "reaper failed"),
    }
}

/// Re-divides an `auto` supervisor's executors every few seconds by how long each queue's
/// next job has waited (an idle queue keeps its minimum).
pub(super) async fn balance_loop(conveyor: Conveyor, sup: Arc<Supervisor>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(3));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let Ok(stats) = conveyor.backend().queues().await else { continue };
        let weights: Vec<f64> = sup
            .pools
            .iter()
            .map(|p| {
                stats.iter().find(|q| q.queue == p.queues[0]).map_or(0.0, |q| {
                    if q.pending > 0 && !q.paused {
                        q.oldest_wait_s + 0.001
                    } else {
                        0.0
                    }
                })
            })
            .collect();
        let shares = allocate(sup.config.concurrency, sup.config.min_workers, &weights);
        for (pool, n) in sup.pools.iter().zip(shares) {
            if pool.capacity() != n {
                debug!(supervisor = %sup.config.name, queue = %pool.queues[0], workers = n, "rebalanced");
                pool.resize(n);
            }
        }
    }
}

/// Gives back the kept slots of keys that jobs wait for (anywhere), and those unused for `keep`.
async fn give_back_kept(backend: &dyn crate::QueueBackend, bank: &crate::flow::Bank, waited: &[String], keep: Duration) {
    let keeping = bank.keeping();
    let mut back: Vec<(String, String)> = Vec::new();
    for key in waited.iter().filter(|k| keeping.contains(k)) {
        back.extend(bank.contend(key, crate::flow::PARK_RECHECK).into_iter().map(|n| (key.clone(), n)));
    }
    back.extend(bank.idle(keep));
    for (key, name) in back {
        if let Err(e) = crate::flow::release_named(backend, &key, &name).await {
            warn!(error = %e, %key, "giving back a kept concurrency slot failed; it expires with the lease");
        }
    }
}
