//! The worker runtime ([`conveyor_core::worker::run`]) end to end on the backend: throughput,
//! retries of panics / timeouts / errors, release and abort, graceful shutdown, transactional
//! completion from a handler, the worker registry and the reaper.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

use conveyor_core::registry::{JobContext, JobError, JobResult, Registry};
use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig, WorkerReport};
use conveyor_core::Conveyor;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::*;

fn config(queue: &str, concurrency: usize, grace: Duration) -> WorkerConfig {
    WorkerConfig {
        supervisors: vec![SupervisorConfig::new("conformance", vec![queue.to_string()], concurrency)],
        shutdown_grace: grace,
        poll_interval: Duration::from_millis(20),
        reap_interval: Duration::from_millis(100),
        heartbeat_interval: Duration::from_millis(100),
        flush_max: 1024,
    }
}

struct Running {
    token: CancellationToken,
    handle: JoinHandle<WorkerReport>,
}

fn start(b: &Backend, registry: Registry, config: WorkerConfig) -> Running {
    let token = CancellationToken::new();
    let conveyor = Conveyor::new(b.clone(), registry);
    let handle = tokio::spawn(worker::run(conveyor, config, token.clone()));
    Running { token, handle }
}

impl Running {
    /// Requests shutdown and waits for the worker's report.
    async fn stop(self) -> WorkerReport {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(20), self.handle)
            .await
            .expect("the worker did not stop within 20 s of shutdown")
            .expect("the worker task panicked")
    }
}

/// The attempt numbers each job was run with, in order.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<HashMap<JobId, Vec<u32>>>>);

impl Seen {
    fn record(&self, ctx: &JobContext) {
        self.0.lock().unwrap().entry(ctx.id).or_default().push(ctx.attempt);
    }
    fn of(&self, id: JobId) -> Vec<u32> {
        self.0.lock().unwrap().get(&id).cloned().unwrap_or_default()
    }
}

/// Registers `kind` with a handler that records its attempt and then runs `body`.
fn register<F, Fut>(registry: &mut Registry, kind: &str, seen: &Seen, body: F)
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

async fn all_in_state(b: &Backend, ids: &[JobId], state: JobState) -> bool {
    for id in ids {
        if state_of(b, *id).await != Some(state) {
            return false;
        }
    }
    true
}

async fn metric_totals(b: &Backend, queue: &str) -> conveyor_core::metrics::MetricsRow {
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

pub async fn runtime_graceful_shutdown_finishes_running_jobs(b: Backend) {
    const JOBS: usize = 8;
    const CONCURRENCY: usize = 4;
    let q = queue_name();
    let started = Arc::new(AtomicUsize::new(0));
    let finished = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let (started, finished) = (started.clone(), finished.clone());
        registry.register("conformance.runtime.slow", move |_: Value, _ctx: JobContext| {
            let (started, finished) = (started.clone(), finished.clone());
            async move {
                started.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_millis(300)).await;
                finished.fetch_add(1, SeqCst);
                Ok(())
            }
        });
    }
    let mut ids = Vec::new();
    for n in 0..JOBS as u64 {
        ids.push(enqueue_one(&b, new_job(&q, "conformance.runtime.slow", n).max_attempts(1)).await);
    }
    let w = start(&b, registry, config(&q, CONCURRENCY, Duration::from_secs(5)));
    wait_until("every executor is busy", Duration::from_secs(5), || async { started.load(SeqCst) >= CONCURRENCY }).await;
    let at_cancel = started.load(SeqCst);
    assert!(finished.load(SeqCst) < at_cancel, "the handlers were meant to be in flight at shutdown");
    let report = w.stop().await;

    assert_eq!(started.load(SeqCst), at_cancel, "a job started after shutdown was requested");
    assert_eq!(finished.load(SeqCst), at_cancel, "a running handler was not allowed to finish within the grace period");
    assert_eq!(report.completed, at_cancel as u64, "report: {report:?}");
    assert_eq!((report.retried, report.failed), (0, 0), "report: {report:?}");
    let s = stats(&b, &q).await;
    assert_counts_eq(&s, [(JOBS - at_cancel) as u64, 0, 0, 0], "the finished jobs are acknowledged, nothing is left reserved");
    // Jobs reserved ahead but never run went back without consuming their only attempt.
    let rest = reserve(&b, &q, JOBS).await;
    assert_eq!(rest.len(), JOBS - at_cancel);
    assert!(rest.iter().all(|j| j.attempt == 1), "attempts after shutdown: {:?}", rest.iter().map(|j| j.attempt).collect::<Vec<_>>());
    assert_eq!(ids.iter().filter(|id| rest.iter().all(|j| j.id != **id)).count(), at_cancel);
}

pub async fn runtime_shutdown_grace_over_releases_running_jobs(b: Backend) {
    const JOBS: usize = 2;
    let q = queue_name();
    let started = Arc::new(AtomicUsize::new(0));
    let mut registry = Registry::new();
    {
        let started = started.clone();
        registry.register("conformance.runtime.stuck", move |_: Value, _ctx: JobContext| {
            let started = started.clone();
            async move {
                started.fetch_add(1, SeqCst);
                tokio::time::sleep(Duration::from_secs(10)).await;
                Ok(())
            }
        });
    }
    let mut ids = Vec::new();
    for n in 0..JOBS as u64 {
        ids.push(enqueue_one(&b, new_job(&q, "conformance.runtime.stuck", n).max_attempts(1)).await);
    }
    let w = start(&b, registry, config(&q, JOBS, Duration::from_millis(100)));
    wait_until("both handlers are running", Duration::from_secs(5), || async { started.load(SeqCst) >= JOBS }).await;
    let stopping = Instant::now();
    let report = w.stop().await;
    assert!(stopping.elapsed() < Duration::from_secs(3), "shutdown with a 100 ms grace took {:?}", stopping.elapsed());

    assert_eq!(report, WorkerReport { completed: 0, retried: 0, failed: 0, released: JOBS as u64 });
    assert_counts(&b, &q, [JOBS as u64, 0, 0, 0], "cancelled jobs are back in the queue").await;
    for id in &ids {
        let info = b.job(*id).await.unwrap().unwrap();
        assert_eq!((info.state, info.attempts), (JobState::Pending, 0), "a job cancelled at shutdown keeps its attempt");
    }
    let again = reserve(&b, &q, JOBS).await;
    assert_eq!(again.len(), JOBS);
    assert!(again.iter().all(|j| j.attempt == 1), "attempts after release: {:?}", again.iter().map(|j| j.attempt).collect::<Vec<_>>());
}

pub async fn runtime_complete_with_commits_once(b: Backend) {
    let q = queue_name();
    let table = table_name();
    create_notes_table(&b, &table).await;
    let missing = table_name();
    let seen = Seen::default();
    let mut registry = Registry::new();
    {
        let sql = insert_note_sql(&table);
        register(&mut registry, "conformance.runtime.tx", &seen, move |_, ctx| {
            let sql = sql.clone();
            async move {
                let note = format!("{}:{}", ctx.id, ctx.attempt);
                let n = ctx.complete_with(move |tx| tx.execute(&sql, &[SqlValue::from(note)])).await?;
                if n != 1 {
                    return Err(JobError::abort(format!("inserted {n} rows")));
                }
                Ok(())
            }
        });
        // Attempt 1's work fails after its insert: nothing may commit, and the job is retried.
        let sql = insert_note_sql(&table);
        let bad_sql = insert_note_sql(&missing);
        register(&mut registry, "conformance.runtime.tx_flaky", &seen, move |_, ctx| {
            let (sql, bad_sql) = (sql.clone(), bad_sql.clone());
            async move {
                let note = format!("{}:{}", ctx.id, ctx.attempt);
                let fail = ctx.attempt == 1;
                ctx.complete_with(move |tx| {
                    tx.execute(&sql, &[SqlValue::from(note)])?;
                    if fail {
                        tx.execute(&bad_sql, &[SqlValue::from("x")])?;
                    }
                    Ok(())
                })
                .await?;
                Ok(())
            }
        });
    }
    let once = enqueue_one(&b, new_job(&q, "conformance.runtime.tx", 0)).await;
    let flaky =
        enqueue_one(&b, new_job(&q, "conformance.runtime.tx_flaky", 0).max_attempts(3).backoff(Backoff::fixed(Duration::ZERO))).await;
    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("both jobs completed", Duration::from_secs(10), || async { all_in_state(&b, &[once, flaky], JobState::Completed).await })
        .await;
    let report = w.stop().await;

    assert_eq!(seen.of(once), vec![1]);
    assert_eq!(seen.of(flaky), vec![1, 2]);
    assert_eq!(count_notes(&b, &table, &format!("{once}:1")).await, 1, "the handler's row committed with its completion");
    assert_eq!(count_notes(&b, &table, &format!("{flaky}:1")).await, 0, "the failed attempt's row was rolled back");
    assert_eq!(count_notes(&b, &table, &format!("{flaky}:2")).await, 1);
    assert_eq!(count_all_notes(&b, &table).await, 2);
    assert_eq!(report, WorkerReport { completed: 2, retried: 1, failed: 0, released: 0 }, "each job acknowledged once");
    assert_counts(&b, &q, [0, 0, 0, 0], "after the run").await;
    let m = metric_totals(&b, &q).await;
    assert_eq!((m.completed, m.retried, m.failed), (2, 1, 0), "metrics of the run");
}

pub async fn runtime_registers_itself_and_reaps_abandoned_jobs(b: Backend) {
    let q = queue_name();
    let seen = Seen::default();
    let mut registry = Registry::new();
    register(&mut registry, "conformance.runtime.reaped", &seen, |_, _| async { Ok(()) });
    // A worker that died holding the job: its 200 ms lease lapses and the reaper returns it.
    let id = enqueue_one(&b, new_job(&q, "conformance.runtime.reaped", 0)).await;
    let abandoned = b.reserve(request(&[&q], 1, Duration::from_millis(200))).await.unwrap();
    assert_eq!(abandoned.len(), 1);

    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    let mine = |workers: Vec<WorkerInfo>| {
        workers.into_iter().filter(|w| w.supervisors.iter().any(|s| s.queues == vec![q.clone()])).collect::<Vec<_>>()
    };
    wait_until("the worker registers itself", Duration::from_secs(5), || async {
        mine(b.workers(Duration::from_secs(10)).await.unwrap()).iter().any(|w| w.status == "running")
    })
    .await;
    let registered = mine(b.workers(Duration::from_secs(10)).await.unwrap());
    assert_eq!(registered.len(), 1, "one entry for the worker: {registered:?}");
    assert_eq!(registered[0].supervisors[0].concurrency, 2);

    wait_until("the abandoned job is reaped and run", Duration::from_secs(5), || async {
        state_of(&b, id).await == Some(JobState::Completed)
    })
    .await;
    assert_eq!(seen.of(id), vec![2], "the reaped job runs again as attempt 2");
    let report = w.stop().await;
    assert_eq!(report.completed, 1);
    assert!(mine(b.workers(Duration::from_secs(600)).await.unwrap()).is_empty(), "a stopped worker unregisters itself");
}

pub async fn runtime_heartbeat_keeps_long_jobs_leased(b: Backend) {
    let q = queue_name();
    let seen = Seen::default();
    let mut registry = Registry::new();
    register(&mut registry, "conformance.runtime.long", &seen, |_, _| async {
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        Ok(())
    });
    let id = enqueue_one(&b, new_job(&q, "conformance.runtime.long", 0).max_attempts(3)).await;
    // A 300 ms lease, four times shorter than the job: only lease heartbeats keep the reaper
    // (running every 100 ms in this very worker) from handing it out again.
    let mut cfg = config(&q, 2, Duration::from_secs(5));
    cfg.supervisors[0].lease = Duration::from_millis(300);
    let w = start(&b, registry, cfg);
    wait_until("the long job completed", Duration::from_secs(10), || async { state_of(&b, id).await == Some(JobState::Completed) }).await;
    let report = w.stop().await;
    assert_eq!(seen.of(id), vec![1], "a running job whose lease is extended is not reaped and run again");
    assert_eq!(report, WorkerReport { completed: 1, retried: 0, failed: 0, released: 0 });
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
