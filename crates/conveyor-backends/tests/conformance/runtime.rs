//! The worker runtime ([`conveyor_core::worker::run`]) end to end on the backend: throughput,
//! retries of panics / timeouts / errors, release, abort and retry-after. Shutdown, leases and
//! transactional completion from a handler are in `runtime_shutdown.rs`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

use conveyor_core::registry::{JobContext, JobError, JobResult, Registry};
use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig, WorkerReport};
use conveyor_core::Conveyor;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

pub(super) fn config(queue: &str, concurrency: usize, grace: Duration) -> WorkerConfig {
    WorkerConfig {
        supervisors: vec![SupervisorConfig::new("conformance", vec![queue.to_string()], concurrency)],
        shutdown_grace: grace,
        poll_interval: Duration::from_millis(20),
        reap_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(100),
        flush_max: 1024,
        keep_slots: conveyor_core::flow::KEEP_IDLE,
    }
}

pub(super) struct Running {
    token: CancellationToken,
    handle: JoinHandle<WorkerReport>,
}

pub(super) fn start(b: &Backend, registry: Registry, config: WorkerConfig) -> Running {
    let token = CancellationToken::new();
    let conveyor = Conveyor::new(b.clone(), registry);
    let handle = tokio::spawn(worker::run(conveyor, config, token.clone()));
    Running { token, handle }
}

impl Running {
    /// Requests shutdown and waits for the worker's report.
    pub(super) async fn stop(self) -> WorkerReport {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("the worker did not stop within 20 s of shutdown")
            .expect("the worker task panicked")
    }
}

/// The attempt numbers each job was run with, in order.
#[derive(Clone, Default)]
pub(super) struct Seen(Arc<Mutex<HashMap<JobId, Vec<u32>>>>);

impl Seen {
    pub(super) fn record(&self, ctx: &JobContext) {
        self.0.lock().unwrap().entry(ctx.id).or_default().push(ctx.attempt);
    }
    pub(super) fn of(&self, id: JobId) -> Vec<u32> {
        self.0.lock().unwrap().get(&id).cloned().unwrap_or_default()
    }
}

/// Registers `kind` with a handler that records its attempt and then runs `body`.
pub(super) fn register<F, Fut>(registry: &mut Registry, kind: &str, seen: &Seen, body: F)
where
    F: Fn(Value, JobContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = JobResult> + Send + 'static,
{
    let seen = seen.clone();
    registry.register(kind, move |payload: Value, ctx: JobContext| {
        seen.record(&ctx);
        body(payload, ctx)
    });
}

pub(super) async fn all_in_state(b: &Backend, ids: &[JobId], state: JobState) -> bool {
    for id in ids {
        if state_of(b, *id).await != Some(state) {
            return false;
        }
    }
    true
}

pub(super) async fn metric_totals(b: &Backend, queue: &str) -> conveyor_core::metrics::MetricsRow {
    let rows = b.metrics(MetricsQuery { queue: Some(queue.into()), kind: None, since: now_ms() - 60_000 }).await.unwrap();
    conveyor_core::metrics::summarize(rows.iter())
}

pub async fn runtime_runs_every_job_exactly_once(b: Backend) {
    const N: usize = 2_000;
    const KIND: &str = "conformance.runtime.count";
    let q = queue_name();
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
    let total = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let (runs, total) = (runs.clone(), total.clone());
        registry.register(KIND, move |p: Value, _ctx: JobContext| {
            let (runs, total) = (runs.clone(), total.clone());
            async move {
                let n = p["n"].as_u64().ok_or_else(|| JobError::abort("payload without n"))? as usize;
                runs[n].fetch_add(1, SeqCst);
                total.fetch_add(1, SeqCst);
                Ok(())
            }
        });
    }
    let jobs: Vec<NewJob> = (0..N as u64).map(|n| new_job(&q, KIND, n)).collect();
    // Half is waiting when the worker starts, half arrives while it runs.
    b.enqueue(jobs[..N / 2].to_vec()).await.unwrap();
    let started = Instant::now();
    let w = start(&b, registry, config(&q, 16, Duration::from_secs(5)));
    for chunk in jobs[N / 2..].chunks(250) {
        b.enqueue(chunk.to_vec()).await.unwrap();
    }
    wait_until("every job ran and was acknowledged", Duration::from_secs(30), || async {
        if total.load(SeqCst) < N {
            return false;
        }
        let s = stats(&b, &q).await;
        s.pending == 0 && s.reserved == 0 && s.delayed == 0
    })
    .await;
    let elapsed = started.elapsed();
    let report = w.stop().await;

    let wrong: Vec<(usize, u32)> = runs.iter().enumerate().map(|(n, c)| (n, c.load(SeqCst))).filter(|(_, c)| *c != 1).take(20).collect();
    assert!(wrong.is_empty(), "jobs not run exactly once (payload n, runs): {wrong:?}");
    assert_eq!(total.load(SeqCst), N);
    assert_eq!(report, WorkerReport { completed: N as u64, retried: 0, failed: 0, released: 0 });
    assert_counts(&b, &q, [0, 0, 0, 0], "after the worker drained the queue").await;
    let m = metric_totals(&b, &q).await;
    assert_eq!((m.completed, m.retried, m.failed), (N as u64, 0, 0), "metrics of the run");
    assert_eq!(m.runtime_hist.iter().sum::<u64>(), N as u64);
    assert!(elapsed < Duration::from_secs(15), "{N} trivial jobs took {elapsed:?}");
}

pub async fn runtime_retries_panics_timeouts_and_errors_then_fails(b: Backend) {
    let q = queue_name();
    let succeed = Arc::new(AtomicBool::new(false));
    let seen = Seen::default();
    let mut registry = Registry::new();
    {
        let s = succeed.clone();
        register(&mut registry, "conformance.runtime.panics", &seen, move |_, _| {
            let s = s.clone();
            async move {
                if !s.load(SeqCst) {
                    panic!("handler exploded");
                }
                Ok(())
            }
        });
        let s = succeed.clone();
        register(&mut registry, "conformance.runtime.times_out", &seen, move |_, _| {
            let s = s.clone();
            async move {
                if !s.load(SeqCst) {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                }
                Ok(())
            }
        });
        let s = succeed.clone();
        register(&mut registry, "conformance.runtime.errors", &seen, move |_, _| {
            let s = s.clone();
            async move {
                if !s.load(SeqCst) {
                    return Err(JobError::retry("upstream said no"));
                }
                Ok(())
            }
        });
    }
    let job = |kind: &str| new_job(&q, kind, 0).max_attempts(3).backoff(Backoff::fixed(Duration::ZERO));
    let panics = enqueue_one(&b, job("conformance.runtime.panics")).await;
    let times_out = enqueue_one(&b, job("conformance.runtime.times_out").timeout(Duration::from_millis(100))).await;
    let errors = enqueue_one(&b, job("conformance.runtime.errors")).await;
    let ids = [panics, times_out, errors];

    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("the three jobs failed for good", Duration::from_secs(10), || async { all_in_state(&b, &ids, JobState::Failed).await })
        .await;
    for (id, expected) in [(panics, "panicked"), (panics, "handler exploded"), (times_out, "timed out"), (errors, "upstream said no")] {
        let failed = b.failed_job(id).await.unwrap().expect("in the failed store");
        assert!(failed.error.contains(expected), "the error of {id} should contain {expected:?}: {:?}", failed.error);
        assert_eq!((failed.attempts, failed.max_attempts), (3, 3), "{id} ran all its attempts");
        assert_eq!(seen.of(id), vec![1, 2, 3], "attempts seen by the handler of {id}");
    }
    assert_counts(&b, &q, [0, 0, 0, 3], "three failed jobs").await;

    // Fixed now: retried from the failed store, each runs once more from attempt 1 and completes.
    succeed.store(true, SeqCst);
    let mut retried = b.retry_failed(ids.to_vec()).await.unwrap();
    retried.sort();
    let mut want = ids.to_vec();
    want.sort();
    assert_eq!(retried, want);
    wait_until("the retried jobs completed", Duration::from_secs(10), || async { all_in_state(&b, &ids, JobState::Completed).await }).await;
    for id in ids {
        assert_eq!(seen.of(id), vec![1, 2, 3, 1], "attempts seen by the handler of {id}");
    }
    let report = w.stop().await;
    assert_eq!(report, WorkerReport { completed: 3, retried: 6, failed: 3, released: 0 });
    assert_counts(&b, &q, [0, 0, 0, 0], "all done").await;
    let m = metric_totals(&b, &q).await;
    assert_eq!((m.completed, m.retried, m.failed), (3, 6, 3), "metrics of the run");
}

pub async fn runtime_release_keeps_attempts_and_abort_fails_at_once(b: Backend) {
    let q = queue_name();
    let seen = Seen::default();
    let calls = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let calls = calls.clone();
        register(&mut registry, "conformance.runtime.releases", &seen, move |_, _| {
            let n = calls.fetch_add(1, SeqCst);
            async move {
                if n < 2 {
                    Err(JobError::release(Duration::ZERO))
                } else {
                    Ok(())
                }
            }
        });
        register(&mut registry, "conformance.runtime.aborts", &seen, |_, _| async { Err(JobError::abort("bad input, never retry")) });
    }
    // One attempt only: a release that consumed it would show attempt 2 (or fail the job).
    let releases = enqueue_one(&b, new_job(&q, "conformance.runtime.releases", 0).max_attempts(1)).await;
    let aborts = enqueue_one(&b, new_job(&q, "conformance.runtime.aborts", 0).max_attempts(5)).await;
    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("the released job completed and the aborted one failed", Duration::from_secs(10), || async {
        state_of(&b, releases).await == Some(JobState::Completed) && state_of(&b, aborts).await == Some(JobState::Failed)
    })
    .await;
    let report = w.stop().await;

    assert_eq!(seen.of(releases), vec![1, 1, 1], "a release does not consume an attempt");
    assert!(b.failed_job(releases).await.unwrap().is_none());
    assert_eq!(seen.of(aborts), vec![1], "an aborted job is not retried");
    let failed = b.failed_job(aborts).await.unwrap().unwrap();
    assert!(failed.error.contains("bad input"), "{:?}", failed.error);
    assert_eq!((failed.attempts, failed.max_attempts), (1, 5));
    assert_eq!(report, WorkerReport { completed: 1, retried: 0, failed: 1, released: 2 });
    assert_counts(&b, &q, [0, 0, 0, 1], "after the run").await;
}

pub async fn runtime_retry_after_waits_before_the_next_attempt(b: Backend) {
    let q = queue_name();
    let calls: Arc<Mutex<Vec<(u32, Instant)>>> = Arc::default();
    let mut registry = Registry::new();
    {
        let calls = calls.clone();
        registry.register("conformance.runtime.retry_after", move |_: Value, ctx: JobContext| {
            calls.lock().unwrap().push((ctx.attempt, Instant::now()));
            async move {
                if ctx.attempt == 1 {
                    Err(JobError::retry_after("rate limited", Duration::from_millis(300)))
                } else {
                    Ok(())
                }
            }
        });
    }
    // The job's own backoff would retry at once; retry_after overrides it.
    let id = enqueue_one(&b, new_job(&q, "conformance.runtime.retry_after", 0).backoff(Backoff::fixed(Duration::ZERO))).await;
    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("the job completed", Duration::from_secs(10), || async { state_of(&b, id).await == Some(JobState::Completed) }).await;
    let report = w.stop().await;
    let calls = calls.lock().unwrap().clone();
    assert_eq!(calls.iter().map(|c| c.0).collect::<Vec<_>>(), vec![1, 2]);
    let gap = calls[1].1 - calls[0].1;
    assert!(gap >= Duration::from_millis(280), "retry_after(300 ms) ran the next attempt after {gap:?}");
    assert_eq!(report, WorkerReport { completed: 1, retried: 1, failed: 0, released: 0 });
}
