//! Administration: unique keys, the failed store, pause / resume / clear, metrics, and the worker
//! registry.

use std::collections::HashMap;

use conveyor_core::metrics::{bucket_of, MetricsRow, BUCKETS};

use super::*;

const KIND: &str = "conformance.admin";

pub async fn unique_key_refuses_duplicates_until_job_ends(b: Backend) {
    let q = queue_name();
    let key = unique_name("unique");
    let ttl = Duration::from_secs(600);
    let first = enqueue_one(&b, new_job(&q, KIND, 1).unique(&key, ttl)).await;

    let dup = new_job(&q, KIND, 2).unique(&key, ttl);
    let dup_id = dup.id;
    assert_eq!(b.enqueue(vec![dup]).await.unwrap(), vec![EnqueueOutcome::Duplicate { existing: first }]);
    assert!(b.job(dup_id).await.unwrap().is_none(), "a duplicate is not stored");
    assert_counts(&b, &q, [1, 0, 0, 0], "the duplicate was not enqueued").await;

    // Still held while the job runs and while it waits for a retry.
    let job = reserve_one(&b, &q).await;
    assert_eq!(job.unique_key.as_deref(), Some(key.as_str()));
    let out = b.enqueue(vec![new_job(&q, KIND, 3).unique(&key, ttl)]).await.unwrap();
    assert_eq!(out, vec![EnqueueOutcome::Duplicate { existing: first }], "the key is held while the job runs");
    complete(&b, &job, retry_now("try again")).await;
    let out = b.enqueue(vec![new_job(&q, KIND, 4).unique(&key, ttl)]).await.unwrap();
    assert_eq!(out, vec![EnqueueOutcome::Duplicate { existing: first }], "the key is held while the job waits for a retry");

    // Completed: the key is free.
    let job = reserve_one(&b, &q).await;
    complete(&b, &job, Outcome::Completed).await;
    let second = enqueue_one(&b, new_job(&q, KIND, 5).unique(&key, ttl)).await;
    assert_ne!(second, first);

    // Failed for good: the key is free as well.
    let job = reserve_one(&b, &q).await;
    assert_eq!(job.id, second);
    complete(&b, &job, Outcome::Failed { error: "broken".into() }).await;
    enqueue_one(&b, new_job(&q, KIND, 6).unique(&key, ttl)).await;

    // Keys are independent of each other.
    enqueue_one(&b, new_job(&q, KIND, 7).unique(unique_name("other"), ttl)).await;
}

/// A key freed while its job runs (Faktory's `unique_until: "start"`): a new job may take it,
/// and freeing it again in the first job's name leaves the new holder's key alone.
pub async fn unique_key_freed_by_its_holder_only(b: Backend) {
    let q = queue_name();
    let key = unique_name("start");
    let ttl = Duration::from_secs(600);
    let first = enqueue_one(&b, new_job(&q, KIND, 1).unique(&key, ttl)).await;
    let job = reserve_one(&b, &q).await;
    assert_eq!(job.id, first);
    b.release_unique(&key, first).await.unwrap();
    let second = enqueue_one(&b, new_job(&q, KIND, 2).unique(&key, ttl)).await;
    assert_ne!(second, first, "the freed key is taken by a new job");
    b.release_unique(&key, first).await.unwrap();
    let out = b.enqueue(vec![new_job(&q, KIND, 3).unique(&key, ttl)]).await.unwrap();
    assert_eq!(out, vec![EnqueueOutcome::Duplicate { existing: second }], "the new holder keeps its key");
    // The first job finishing does not free the new holder's key either.
    complete(&b, &job, Outcome::Completed).await;
    let out = b.enqueue(vec![new_job(&q, KIND, 4).unique(&key, ttl)]).await.unwrap();
    assert_eq!(out, vec![EnqueueOutcome::Duplicate { existing: second }]);
}

pub async fn unique_key_ttl_expires(b: Backend) {
    let q = queue_name();
    let key = unique_name("ttl");
    let ttl = Duration::from_millis(300);
    let start = Instant::now();
    let first = enqueue_one(&b, new_job(&q, KIND, 1).unique(&key, ttl)).await;
    let out = b.enqueue(vec![new_job(&q, KIND, 2).unique(&key, ttl)]).await.unwrap();
    if start.elapsed() < ttl {
        assert_eq!(out, vec![EnqueueOutcome::Duplicate { existing: first }], "the key is held within its TTL");
    }

    // The first job is still pending, but its key's TTL runs out.
    let mut second = None;
    let deadline = Instant::now() + Duration::from_secs(3);
    while second.is_none() {
        let job = new_job(&q, KIND, 3).unique(&key, Duration::from_secs(600));
        let id = job.id;
        match b.enqueue(vec![job]).await.unwrap()[0] {
            EnqueueOutcome::Enqueued { id: got } => {
                assert_eq!(got, id);
                second = Some(id);
            }
            EnqueueOutcome::Duplicate { existing } => {
                assert_eq!(existing, first);
                assert!(Instant::now() < deadline, "the unique key was still held 3 s after its 300 ms TTL");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(start.elapsed() >= ttl, "the unique key was freed before its TTL ran out");
    assert_eq!(state_of(&b, first).await, Some(JobState::Pending), "the first job is still there");
    assert_counts(&b, &q, [2, 0, 0, 0], "both jobs are pending").await;
    // The new holder's (long) TTL now guards the key.
    let out = b.enqueue(vec![new_job(&q, KIND, 4).unique(&key, Duration::from_secs(600))]).await.unwrap();
    assert_eq!(out, vec![EnqueueOutcome::Duplicate { existing: second.unwrap() }]);
}

/// Enqueues `n` single-attempt jobs, runs them and fails them all; returns their ids in order.
async fn make_failed(b: &Backend, q: &str, n: u64) -> Vec<JobId> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(enqueue_one(b, new_job(q, KIND, i).max_attempts(1)).await);
    }
    let jobs = reserve(b, q, n as usize).await;
    assert_eq!(jobs.len(), n as usize);
    let completions = jobs.iter().map(|j| completion(j, Outcome::Failed { error: format!("failure of {}", j.id) })).collect();
    b.complete(completions).await.unwrap();
    ids
}

pub async fn failed_store_retry_forget_flush(b: Backend) {
    let q = queue_name();
    let ids = make_failed(&b, &q, 3).await;
    assert_counts(&b, &q, [0, 0, 0, 3], "three jobs failed").await;
    let listed = b.failed(Some(&q), Page::default()).await.unwrap();
    assert_eq!(listed.total, 3);
    let mut listed_ids: Vec<JobId> = listed.items.iter().map(|f| f.id).collect();
    listed_ids.sort();
    assert_eq!(listed_ids, ids);
    for f in &listed.items {
        assert_eq!(f.error, format!("failure of {}", f.id));
        assert_eq!(f.attempts, 1);
    }
    let paged = b.failed(Some(&q), Page::new(2, 2)).await.unwrap();
    assert_eq!((paged.total, paged.items.len()), (3, 1));

    // Retry one (plus an id that does not exist): same id, fresh attempts.
    let retried = b.retry_failed(vec![ids[0], JobId::new()]).await.unwrap();
    assert_eq!(retried, vec![ids[0]], "only ids found in the failed store are retried");
    assert_counts(&b, &q, [1, 0, 0, 2], "one failed job retried").await;
    assert!(b.failed_job(ids[0]).await.unwrap().is_none());
    let info = b.job(ids[0]).await.unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (JobState::Pending, 0));
    let job = reserve_one(&b, &q).await;
    assert_eq!((job.id, job.attempt), (ids[0], 1), "a retried job keeps its id and starts again at attempt 1");
    complete(&b, &job, Outcome::Completed).await;
    assert_eq!(state_of(&b, ids[0]).await, Some(JobState::Completed));
    assert!(b.retry_failed(vec![ids[0]]).await.unwrap().is_empty(), "a job no longer failed is not retried");

    // Retry all of the queue (another queue's failures are untouched).
    let other = queue_name();
    let other_ids = make_failed(&b, &other, 1).await;
    assert_eq!(b.retry_all_failed(Some(&q)).await.unwrap(), 2);
    assert_counts(&b, &q, [2, 0, 0, 0], "all failed jobs of the queue retried").await;
    assert_counts(&b, &other, [0, 0, 0, 1], "the other queue's failed job is untouched").await;
    let jobs = reserve(&b, &q, 10).await;
    let mut got: Vec<(JobId, u32)> = jobs.iter().map(|j| (j.id, j.attempt)).collect();
    got.sort();
    assert_eq!(got, vec![(ids[1], 1), (ids[2], 1)]);

    // Fail them again, then forget one and flush the rest.
    let completions = jobs.iter().map(|j| completion(j, Outcome::Failed { error: "again".into() })).collect();
    b.complete(completions).await.unwrap();
    assert_counts(&b, &q, [0, 0, 0, 2], "failed again").await;
    assert!(b.forget_failed(ids[1]).await.unwrap());
    assert!(!b.forget_failed(ids[1]).await.unwrap(), "forgetting twice finds nothing");
    assert!(b.failed_job(ids[1]).await.unwrap().is_none());
    assert!(b.job(ids[1]).await.unwrap().is_none(), "a forgotten job is gone");
    assert_counts(&b, &q, [0, 0, 0, 1], "one forgotten").await;
    assert_eq!(b.flush_failed(Some(&q)).await.unwrap(), 1);
    assert_counts(&b, &q, [0, 0, 0, 0], "flushed").await;
    assert_eq!(b.failed(Some(&q), Page::default()).await.unwrap().total, 0);
    assert_counts(&b, &other, [0, 0, 0, 1], "flushing one queue leaves another alone").await;
    assert!(b.failed_job(other_ids[0]).await.unwrap().is_some());
}

pub async fn pause_resume_and_clear(b: Backend) {
    let q = queue_name();
    let other = queue_name();
    enqueue_one(&b, new_job(&q, KIND, 1)).await;
    enqueue_one(&b, new_job(&q, KIND, 2)).await;
    let other_id = enqueue_one(&b, new_job(&other, KIND, 3)).await;

    b.pause(&q).await.unwrap();
    assert!(stats(&b, &q).await.paused, "a paused queue says so");
    assert!(reserve(&b, &q, 10).await.is_empty(), "a paused queue is not reserved from");
    let got = b.reserve(request(&[&q, &other], 10, Duration::from_secs(30))).await.unwrap();
    assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), vec![other_id], "other queues in the request are still served");
    assert_counts(&b, &q, [2, 0, 0, 0], "pausing keeps the jobs").await;

    b.resume(&q).await.unwrap();
    assert!(!stats(&b, &q).await.paused);
    let running = reserve_one(&b, &q).await;

    // Clear: pending and delayed jobs go, the running one stays.
    let pending = enqueue_one(&b, new_job(&q, KIND, 4)).await;
    let delayed = enqueue_one(&b, new_job(&q, KIND, 5).delay(Duration::from_secs(60))).await;
    assert_counts(&b, &q, [2, 1, 1, 0], "before clear").await;
    assert_eq!(b.clear(&q).await.unwrap(), 3, "clear returns how many jobs it deleted");
    assert_counts(&b, &q, [0, 0, 1, 0], "after clear").await;
    assert!(b.job(pending).await.unwrap().is_none(), "a cleared pending job is gone");
    assert!(b.job(delayed).await.unwrap().is_none(), "a cleared delayed job is gone");
    assert_eq!(state_of(&b, running.id).await, Some(JobState::Reserved));
    assert!(reserve(&b, &q, 10).await.is_empty());
    assert_eq!(state_of(&b, other_id).await, Some(JobState::Reserved), "clear touches only its queue");
    complete(&b, &running, Outcome::Completed).await;
    assert_eq!(state_of(&b, running.id).await, Some(JobState::Completed), "a running job finishes after a clear");
    assert_counts(&b, &q, [0, 0, 0, 0], "all done").await;
    assert_eq!(b.clear(&q).await.unwrap(), 0);

    // Pausing an unknown queue and resuming it is fine; a pause survives enqueues.
    let fresh = queue_name();
    b.pause(&fresh).await.unwrap();
    enqueue_one(&b, new_job(&fresh, KIND, 6)).await;
    assert!(stats(&b, &fresh).await.paused);
    assert!(reserve(&b, &fresh, 10).await.is_empty(), "a queue paused before its first job is not served");
    b.resume(&fresh).await.unwrap();
    assert_eq!(reserve(&b, &fresh, 10).await.len(), 1);
}

/// `since` counts the minute that holds it: a metric recorded after `since` is in a minute that
/// starts at or before it, and must be returned. (The Redis queue read only minutes starting
/// after `since`, which lost the first minute of any window and made a test that crossed a
/// minute boundary fail.)
pub async fn metrics_since_counts_the_minute_that_holds_it(b: Backend) {
    let q = queue_name();
    let kind = "conformance.metrics.since";
    let since = now_ms() + 1;
    enqueue_one(&b, new_job(&q, kind, 1)).await;
    let jobs = reserve(&b, &q, 10).await;
    assert_eq!(jobs.len(), 1);
    b.complete(vec![completion(&jobs[0], Outcome::Completed)]).await.unwrap();
    let rows = b.metrics(MetricsQuery { queue: Some(q.clone()), kind: None, since }).await.unwrap();
    let m = conveyor_core::metrics::summarize(rows.iter());
    assert_eq!(m.completed, 1, "the completion, recorded after `since`, in the minute that holds it: {rows:?}");
}

pub async fn metrics_count_every_processed_attempt(b: Backend) {
    let q = queue_name();
    let (kind_a, kind_b) = ("conformance.metrics.a", "conformance.metrics.b");
    let since = now_ms() - 60_000;
    for n in 0..6 {
        enqueue_one(&b, new_job(&q, kind_a, n).max_attempts(5)).await;
    }
    enqueue_one(&b, new_job(&q, kind_b, 99)).await;
    let jobs = reserve(&b, &q, 10).await;
    assert_eq!(jobs.len(), 7);
    let (a, bee): (Vec<&Job>, Vec<&Job>) = jobs.iter().partition(|j| j.kind == kind_a);

    // (outcome, runtime ms, wait ms) per attempt.
    let mut expected_runtime = HashMap::<&str, Vec<u64>>::new();
    let mut expected_wait = HashMap::<&str, Vec<u64>>::new();
    let mut done = Vec::new();
    let plan: Vec<(&Job, Outcome, u64, u64)> = vec![
        (a[0], Outcome::Completed, 3, 1),
        (a[1], Outcome::Completed, 40, 20),
        (a[2], Outcome::Completed, 700, 2),
        (a[3], retry_now("r1"), 12, 0),
        (a[4], retry_now("r2"), 0, 3_000),
        (a[5], Outcome::Failed { error: "f".into() }, 70_000, 5),
        (bee[0], Outcome::Completed, 8, 8),
    ];
    for (job, outcome, runtime_ms, wait_ms) in plan {
        expected_runtime.entry(if job.kind == kind_a { kind_a } else { kind_b }).or_default().push(runtime_ms);
        expected_wait.entry(if job.kind == kind_a { kind_a } else { kind_b }).or_default().push(wait_ms);
        done.push(Completion { runtime_ms, wait_ms, ..completion(job, outcome) });
    }
    b.complete(done).await.unwrap();
    // The two retried jobs run again: one is released (not an attempt), one completes.
    let again = reserve(&b, &q, 10).await;
    assert_eq!(again.len(), 2);
    b.complete(vec![
        Completion { runtime_ms: 0, wait_ms: 0, ..completion(&again[0], Outcome::Release { at: now_ms() + 60_000 }) },
        Completion { runtime_ms: 15, wait_ms: 4, ..completion(&again[1], Outcome::Completed) },
    ])
    .await
    .unwrap();
    expected_runtime.get_mut(kind_a).unwrap().push(15);
    expected_wait.get_mut(kind_a).unwrap().push(4);
    // Stale acknowledgements are not attempts either.
    b.complete(vec![completion(a[0], Outcome::Completed), completion(a[5], Outcome::Failed { error: "stale".into() })]).await.unwrap();

    let rows = b.metrics(MetricsQuery { queue: Some(q.clone()), kind: None, since }).await.unwrap();
    assert!(!rows.is_empty(), "no metric rows for the queue");
    for r in &rows {
        assert_eq!(r.queue, q);
        assert!(r.minute >= conveyor_core::metrics::minute_of(since), "a row older than `since`: {r:?}");
        assert_eq!(r.runtime_hist.iter().sum::<u64>(), r.processed(), "runtime histogram of {r:?}");
        assert_eq!(r.wait_hist.iter().sum::<u64>(), r.processed(), "wait histogram of {r:?}");
    }
    let total = |kind: &str| -> MetricsRow { conveyor_core::metrics::summarize(rows.iter().filter(|r| r.kind == kind)) };
    let ta = total(kind_a);
    assert_eq!((ta.completed, ta.retried, ta.failed), (4, 2, 1), "kind a: completed, retried, failed");
    let tb = total(kind_b);
    assert_eq!((tb.completed, tb.retried, tb.failed), (1, 0, 0), "kind b: completed, retried, failed");
    for (kind, t) in [(kind_a, &ta), (kind_b, &tb)] {
        let runtimes = &expected_runtime[kind];
        let waits = &expected_wait[kind];
        assert_eq!(t.runtime_sum_ms, runtimes.iter().sum::<u64>(), "runtime sum of {kind}");
        assert_eq!(t.wait_sum_ms, waits.iter().sum::<u64>(), "wait sum of {kind}");
        assert_eq!(t.runtime_max_ms, *runtimes.iter().max().unwrap(), "runtime max of {kind}");
        let mut rh = [0u64; BUCKETS];
        let mut wh = [0u64; BUCKETS];
        runtimes.iter().for_each(|ms| rh[bucket_of(*ms)] += 1);
        waits.iter().for_each(|ms| wh[bucket_of(*ms)] += 1);
        assert_eq!(t.runtime_hist, rh, "runtime histogram of {kind}");
        assert_eq!(t.wait_hist, wh, "wait histogram of {kind}");
    }

    let only_b = b.metrics(MetricsQuery { queue: Some(q.clone()), kind: Some(kind_b.into()), since }).await.unwrap();
    assert!(!only_b.is_empty() && only_b.iter().all(|r| r.kind == kind_b), "the kind filter: {only_b:?}");
    let other = b.metrics(MetricsQuery { queue: Some(queue_name()), kind: None, since }).await.unwrap();
    assert!(other.is_empty(), "a queue with no jobs has no rows: {other:?}");
    let future = b.metrics(MetricsQuery { queue: Some(q.clone()), kind: None, since: now_ms() + 120_000 }).await.unwrap();
    assert!(future.is_empty(), "rows before `since` are not returned: {future:?}");
}

pub async fn worker_registry_heartbeat_and_gone(b: Backend) {
    let now = now_ms();
    let info = WorkerInfo {
        id: unique_name("worker"),
        hostname: "conformance-host".into(),
        pid: 4242,
        started_at: now - 1_000,
        last_seen: now,
        status: "running".into(),
        supervisors: vec![SupervisorInfo {
            name: "default".into(),
            queues: vec!["a".into(), "b".into()],
            concurrency: 8,
            busy: 2,
            processed: 17,
            current_jobs: vec![JobId::new().to_string()],
            balance: conveyor_core::balance::Balance::Auto,
            pools: vec![
                conveyor_core::backend::PoolInfo { queues: vec!["a".into()], workers: 5 },
                conveyor_core::backend::PoolInfo { queues: vec!["b".into()], workers: 3 },
            ],
        }],
    };
    let stale = WorkerInfo { id: unique_name("worker"), last_seen: now - 120_000, ..info.clone() };
    b.worker_heartbeat(info.clone()).await.unwrap();
    b.worker_heartbeat(stale.clone()).await.unwrap();

    let listed = |within: Duration| {
        let b = b.clone();
        async move { b.workers(within).await.unwrap() }
    };
    let now_listed = listed(Duration::from_secs(60)).await;
    assert_eq!(now_listed.iter().filter(|w| w.id == info.id).collect::<Vec<_>>(), vec![&info], "the worker is listed as sent");
    assert!(!now_listed.iter().any(|w| w.id == stale.id), "a worker not seen within the window is not listed");
    assert!(listed(Duration::from_secs(600)).await.iter().any(|w| w.id == stale.id), "a wider window lists it");

    // A heartbeat updates the entry in place.
    let stopping = WorkerInfo { status: "stopping".into(), last_seen: now_ms(), ..info.clone() };
    b.worker_heartbeat(stopping.clone()).await.unwrap();
    let mine: Vec<WorkerInfo> = listed(Duration::from_secs(60)).await.into_iter().filter(|w| w.id == info.id).collect();
    assert_eq!(mine, vec![stopping], "one entry per worker, with the latest heartbeat");

    b.worker_gone(&info.id).await.unwrap();
    assert!(!listed(Duration::from_secs(600)).await.iter().any(|w| w.id == info.id), "worker_gone removes the worker");
    b.worker_gone(&stale.id).await.unwrap();
    assert!(!listed(Duration::from_secs(600)).await.iter().any(|w| w.id == stale.id));
    b.worker_gone("never-registered").await.expect("forgetting an unknown worker is not an error");
}

/// Many enqueues of one unique key at once: exactly one gets in, the others name it.
pub async fn unique_key_holds_under_concurrent_enqueues(b: Backend) {
    let q = queue_name();
    let key = unique_name("unique-race");
    let tasks: Vec<_> = (0..20)
        .map(|i| {
            let (b, q, key) = (b.clone(), q.clone(), key.clone());
            tokio::spawn(async move {
                let job = new_job(&q, "conformance.unique", i).unique(key, Duration::from_secs(60));
                b.enqueue(vec![job]).await.unwrap().remove(0)
            })
        })
        .collect();
    let mut outcomes = Vec::new();
    for t in tasks {
        outcomes.push(t.await.unwrap());
    }
    let winners: Vec<JobId> =
        outcomes.iter().filter_map(|o| if let EnqueueOutcome::Enqueued { id } = o { Some(*id) } else { None }).collect();
    assert_eq!(winners.len(), 1, "one enqueue wins: {outcomes:?}");
    for o in &outcomes {
        if let EnqueueOutcome::Duplicate { existing } = o {
            assert_eq!(*existing, winners[0], "duplicates name the job that holds the key");
        }
    }
    assert_counts(&b, &q, [1, 0, 0, 0], "one job queued").await;
}

/// Cursor pages of the failed store: every failed job once, in the order of the offset pages.
pub async fn failed_cursor_pages_list_every_job_once(b: Backend) {
    let q = queue_name();
    let mut ids = make_failed(&b, &q, 7).await;
    let whole = b.failed(Some(&q), Page::new(1, 100)).await.unwrap();
    assert!(whole.next.is_none(), "no page follows the last");
    let mut page = Page::new(1, 3);
    let mut seen = Vec::new();
    for _ in 0..10 {
        let list = b.failed(Some(&q), page.clone()).await.unwrap();
        assert_eq!((list.total, list.total_capped), (7, false));
        seen.extend(list.items.iter().map(|f| f.id));
        match list.next {
            Some(next) => page = Page::after(next, 3),
            None => break,
        }
    }
    assert_eq!(seen, whole.items.iter().map(|f| f.id).collect::<Vec<_>>());
    seen.sort();
    ids.sort();
    assert_eq!(seen, ids);
}
