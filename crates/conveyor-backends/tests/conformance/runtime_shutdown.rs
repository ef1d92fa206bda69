//! The worker runtime, continued: graceful shutdown, lease heartbeats and the reaper, the worker
//! registry, and transactional completion from inside a handler.

use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

use conveyor_core::registry::{JobContext, JobError, Registry};
use conveyor_core::worker::WorkerReport;

use super::runtime::{all_in_state, config, metric_totals, register, start, Seen};
use super::*;

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
