//! The queue lifecycle: enqueue, reserve, complete; priorities and queue order; delays; retries,
//! failures and releases; stale lease tokens; wake-ups; listing.

use std::collections::HashMap;

use super::*;

const KIND: &str = "conformance.lifecycle";

pub async fn enqueue_reserve_complete(b: Backend) {
    let q = queue_name();
    let payload = json!({ "n": 1, "text": "hello", "nested": { "list": [1, 2, 3] } });
    let job = NewJob::new(KIND, &payload).queue(&q).priority(3).max_attempts(4).tag("t1").tag("t2").batch("batch-1");
    let id = enqueue_one(&b, job).await;

    assert_counts(&b, &q, [1, 0, 0, 0], "after enqueue").await;
    let info = b.job(id).await.unwrap().expect("an enqueued job is visible");
    assert_eq!(info.state, JobState::Pending);
    assert_eq!(info.attempts, 0);
    assert_eq!(info.payload, payload);
    assert_eq!((info.queue.as_str(), info.kind.as_str()), (q.as_str(), KIND));
    assert_eq!((info.max_attempts, info.priority), (4, 3));
    assert_eq!(info.tags, vec!["t1".to_string(), "t2".to_string()]);

    let jobs = reserve(&b, &q, 10).await;
    assert_eq!(jobs.len(), 1, "the one pending job is reserved");
    let job = &jobs[0];
    assert_eq!(job.id, id);
    assert_eq!(job.attempt, 1, "the first reservation is attempt 1");
    assert_eq!(payload_of(job), payload);
    assert_eq!((job.queue.as_str(), job.kind.as_str()), (q.as_str(), KIND));
    assert_eq!((job.max_attempts, job.priority), (4, 3));
    assert_eq!(job.tags, vec!["t1".to_string(), "t2".to_string()]);
    assert_eq!(job.batch_id.as_deref(), Some("batch-1"));
    assert_counts(&b, &q, [0, 0, 1, 0], "after reserve").await;
    assert_eq!(state_of(&b, id).await, Some(JobState::Reserved));
    assert!(reserve(&b, &q, 10).await.is_empty(), "a reserved job is not handed out twice");

    complete(&b, job, Outcome::Completed).await;
    assert_counts(&b, &q, [0, 0, 0, 0], "after completion").await;
    let info = b.job(id).await.unwrap().expect("a completed job is still visible");
    assert_eq!(info.state, JobState::Completed);
    assert!(reserve(&b, &q, 10).await.is_empty(), "a completed job is not reserved again");
    assert!(b.failed_job(id).await.unwrap().is_none());
    b.ping().await.expect("ping");
}

pub async fn enqueue_many_returns_outcomes_in_order(b: Backend) {
    let q = queue_name();
    let key = unique_name("many");
    let jobs: Vec<NewJob> = (0..6u64)
        .map(|n| {
            let j = new_job(&q, KIND, n);
            if n == 2 || n == 4 {
                j.unique(&key, Duration::from_secs(60))
            } else {
                j
            }
        })
        .collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let out = b.enqueue(jobs).await.unwrap();
    assert_eq!(
        out,
        vec![
            EnqueueOutcome::Enqueued { id: ids[0] },
            EnqueueOutcome::Enqueued { id: ids[1] },
            EnqueueOutcome::Enqueued { id: ids[2] },
            EnqueueOutcome::Enqueued { id: ids[3] },
            EnqueueOutcome::Duplicate { existing: ids[2] },
            EnqueueOutcome::Enqueued { id: ids[5] },
        ],
        "one outcome per job, in order; the second job with a unique key is a duplicate of the first"
    );
    assert_counts(&b, &q, [5, 0, 0, 0], "five jobs enqueued in one call").await;
    assert_eq!(b.job(ids[4]).await.unwrap().map(|j| j.id), None, "a duplicate is not stored");
    let got: Vec<JobId> = reserve(&b, &q, 100).await.iter().map(|j| j.id).collect();
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, vec![ids[0], ids[1], ids[2], ids[3], ids[5]]);
    assert_eq!(b.enqueue(Vec::new()).await.unwrap(), Vec::new(), "enqueueing nothing returns nothing");
}

fn names_of(jobs: &[Job]) -> Vec<String> {
    jobs.iter().map(|j| payload_of(j)["name"].as_str().unwrap().to_string()).collect()
}

/// A producer that also consumes (the Faktory server) enqueues and reserves in one call: every
/// job is enqueued, at most `max` of the queue's ready jobs come back reserved, the rest wait.
pub async fn enqueue_and_reserve_hands_on_what_it_enqueued(b: Backend) {
    let q = queue_name();
    let jobs: Vec<NewJob> = (0..3).map(|i| NewJob::new(KIND, &json!({ "i": i })).queue(&q)).collect();
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let req = ReserveRequest { queues: vec![q.clone()], max: 2, lease: Duration::from_secs(30), worker: "conformance".into() };
    let (out, reserved) = b.enqueue_and_reserve(jobs, req).await.unwrap();
    assert_eq!(out.iter().map(|o| o.id()).collect::<Vec<_>>(), ids);
    assert_eq!(reserved.len(), 2, "two of the three are reserved");
    assert!(reserved.iter().all(|j| ids.contains(&j.id) && j.attempt == 1));
    assert_counts(&b, &q, [1, 0, 2, 0], "after enqueue and reserve").await;
    let rest = reserve(&b, &q, 10).await;
    assert_eq!(rest.len(), 1, "the third waits for the next reserve");
    for j in reserved.iter().chain(&rest) {
        complete(&b, j, Outcome::Completed).await;
    }
    assert_counts(&b, &q, [0, 0, 0, 0], "after completing them").await;
}

/// Delayed jobs acted on by id (Faktory's `MUTATE` on scheduled jobs and retries): run now,
/// deleted, or failed unrun; jobs that are not delayed are left alone.
pub async fn delayed_jobs_run_now_are_deleted_or_failed_by_id(b: Backend) {
    let q = queue_name();
    let later = || NewJob::new(KIND, &json!({})).queue(&q).delay(Duration::from_secs(3600));
    let (run, gone, kill) = (enqueue_one(&b, later()).await, enqueue_one(&b, later()).await, enqueue_one(&b, later()).await);
    let pending = enqueue_one(&b, NewJob::new(KIND, &json!({})).queue(&q)).await;
    use conveyor_core::backend::DelayedAction;
    assert_eq!(b.act_on_delayed(vec![run, pending], DelayedAction::RunNow).await.unwrap(), vec![run], "a pending job is left alone");
    assert_counts(&b, &q, [2, 2, 0, 0], "after run now").await;
    let ready = reserve(&b, &q, 10).await;
    let again = ready.iter().find(|j| j.id == run).expect("the job run now is ready");
    assert_eq!(again.attempt, 1, "running a delayed job now spends no attempt before it runs");
    let ready: Vec<JobId> = ready.iter().map(|j| j.id).collect();
    assert!(ready.contains(&run) && ready.contains(&pending), "{ready:?}");
    assert_eq!(b.act_on_delayed(vec![gone], DelayedAction::Delete).await.unwrap(), vec![gone]);
    assert!(b.job(gone).await.unwrap().is_none(), "a deleted job is gone");
    assert_eq!(b.act_on_delayed(vec![kill], DelayedAction::Fail("killed".into())).await.unwrap(), vec![kill]);
    let dead = b.failed_job(kill).await.unwrap().expect("in the failed store");
    assert_eq!((dead.error.as_str(), dead.attempts), ("killed", 0), "failed unrun: {dead:?}");
    assert_counts(&b, &q, [0, 0, 2, 1], "after delete and fail").await;
    assert!(b.act_on_delayed(vec![kill], DelayedAction::Delete).await.unwrap().is_empty(), "a failed job is not delayed");

    // Jobs of a batch: a killed one and a deleted one count as failed in it (through the
    // store's hooks, as any failure), one run now stays pending in it.
    let cv = conveyor_core::Conveyor::new(b.clone(), conveyor_core::Registry::new());
    let (k, d, r) = (later(), later(), later());
    let (k_id, d_id, r_id) = (k.id, d.id, r.id);
    let batch =
        conveyor_core::batch::Batch::new(unique_name("mutate")).allow_failures().push(k).push(d).push(r).dispatch(&cv).await.unwrap();
    assert_eq!(b.act_on_delayed(vec![k_id], DelayedAction::Fail("killed".into())).await.unwrap(), vec![k_id]);
    assert_eq!(b.act_on_delayed(vec![d_id], DelayedAction::Delete).await.unwrap(), vec![d_id]);
    assert_eq!(b.act_on_delayed(vec![r_id], DelayedAction::RunNow).await.unwrap(), vec![r_id]);
    let info = super::batches::batch_info(&b, &batch).await;
    assert_eq!((info.total, info.pending, info.failed), (3, 1, 2), "{info:?}");
}

pub async fn higher_priority_first_then_fifo(b: Backend) {
    let spec = [("a", 0), ("b", 0), ("c", 10), ("d", 5), ("e", 10), ("f", -3), ("g", 5), ("h", 0)];
    let expected = ["c", "e", "d", "g", "a", "b", "h", "f"];

    // One at a time: each reservation takes the best job left.
    let q = queue_name();
    for (name, prio) in spec {
        enqueue_one(&b, NewJob::new(KIND, &json!({ "name": name })).queue(&q).priority(prio)).await;
    }
    let mut order = Vec::new();
    for _ in 0..spec.len() {
        order.extend(names_of(&reserve(&b, &q, 1).await));
    }
    assert_eq!(order, expected, "higher priority first; equal priority in enqueue order");
    assert!(reserve(&b, &q, 1).await.is_empty());

    // In batches: a batch holds the best jobs, and the next batch the next best.
    let q = queue_name();
    let batch: Vec<NewJob> =
        spec.iter().map(|(name, prio)| NewJob::new(KIND, &json!({ "name": name })).queue(&q).priority(*prio)).collect();
    b.enqueue(batch).await.unwrap();
    let mut first = names_of(&reserve(&b, &q, 3).await);
    first.sort();
    assert_eq!(first, vec!["c", "d", "e"], "a batch of 3 holds the three highest-priority jobs");
    let mut second = names_of(&reserve(&b, &q, 2).await);
    second.sort();
    assert_eq!(second, vec!["a", "g"], "then priority 5, then the oldest priority-0 job");
    let rest = names_of(&reserve(&b, &q, 10).await);
    let mut rest_sorted = rest.clone();
    rest_sorted.sort();
    assert_eq!(rest_sorted, vec!["b", "f", "h"]);
}

pub async fn queues_are_served_in_strict_order(b: Backend) {
    let high = queue_name();
    let low = queue_name();
    // The low queue's jobs are older and of higher priority: queue order still wins.
    let l1 = enqueue_one(&b, new_job(&low, KIND, 1).priority(100)).await;
    let l2 = enqueue_one(&b, new_job(&low, KIND, 2).priority(100)).await;
    let h1 = enqueue_one(&b, new_job(&high, KIND, 3)).await;
    let h2 = enqueue_one(&b, new_job(&high, KIND, 4)).await;
    let mut order = Vec::new();
    for _ in 0..4 {
        let got = b.reserve(request(&[&high, &low], 1, Duration::from_secs(30))).await.unwrap();
        assert_eq!(got.len(), 1);
        order.push(got[0].id);
    }
    assert_eq!(order, vec![h1, h2, l1, l2], "the first queue is drained before the second");
    assert!(b.reserve(request(&[&high, &low], 1, Duration::from_secs(30))).await.unwrap().is_empty());

    // A batch fills from the first queue, then tops up from the next one.
    let l3 = enqueue_one(&b, new_job(&low, KIND, 5).priority(100)).await;
    let _l4 = enqueue_one(&b, new_job(&low, KIND, 6).priority(50)).await;
    let h3 = enqueue_one(&b, new_job(&high, KIND, 7)).await;
    let h4 = enqueue_one(&b, new_job(&high, KIND, 8)).await;
    let got = b.reserve(request(&[&high, &low], 3, Duration::from_secs(30))).await.unwrap();
    let mut ids: Vec<JobId> = got.iter().map(|j| j.id).collect();
    ids.sort();
    let mut want = vec![h3, h4, l3];
    want.sort();
    assert_eq!(ids, want, "both jobs of the first queue plus the best of the second");
    // A queue not named in the request is never touched.
    let other = queue_name();
    enqueue_one(&b, new_job(&other, KIND, 9)).await;
    let got = b.reserve(request(&[&high], 10, Duration::from_secs(30))).await.unwrap();
    assert!(got.is_empty(), "only the named queues are served: {got:?}");
}

pub async fn delayed_jobs_wait_until_due(b: Backend) {
    let q = queue_name();
    let delayed = new_job(&q, KIND, 1).delay(Duration::from_millis(300));
    let run_at = delayed.run_at.unwrap();
    let delayed_id = enqueue_one(&b, delayed).await;
    assert_eq!(state_of(&b, delayed_id).await, Some(JobState::Delayed));
    assert_counts(&b, &q, [0, 1, 0, 0], "a job with run_at in the future is delayed").await;

    // A ready job next to it is served; the delayed one is not.
    let ready = enqueue_one(&b, new_job(&q, KIND, 2)).await;
    let got = reserve(&b, &q, 1).await;
    assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), vec![ready], "the ready job is served first");
    complete(&b, &got[0], Outcome::Completed).await;
    let got = reserve(&b, &q, 10).await;
    if now_ms() < run_at {
        assert!(got.is_empty(), "a delayed job was reserved before its run_at: {got:?}");
    } else {
        panic!("the machine was too slow to check the delay: reserving took until after run_at");
    }

    // Once due it is served.
    let got = reserve_within(&b, request(&[&q], 10, Duration::from_secs(30)), Duration::from_secs(3)).await;
    assert!(now_ms() >= run_at, "a delayed job was reserved before its run_at");
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].id, got[0].attempt), (delayed_id, 1));
    assert_counts(&b, &q, [0, 0, 1, 0], "the due job is reserved").await;

    // A run_at in the past means ready now.
    let past = enqueue_one(&b, new_job(&q, KIND, 3).run_at(now_ms() - 10_000)).await;
    assert_eq!(state_of(&b, past).await, Some(JobState::Pending));
    let s = stats(&b, &q).await;
    assert!(
        (9.5..60.0).contains(&s.oldest_wait_s),
        "the next job has waited since its run_at 10 s ago: oldest_wait_s = {}",
        s.oldest_wait_s
    );
    assert_eq!(reserve_one(&b, &q).await.id, past);
}

pub async fn retry_keeps_attempts_and_failed_moves_to_failed_store(b: Backend) {
    let q = queue_name();
    let payload = json!({ "order": 42, "items": ["x", "y"] });
    let id = enqueue_one(&b, NewJob::new(KIND, &payload).queue(&q).max_attempts(3).tag("retry-tag")).await;

    let job = reserve_one(&b, &q).await;
    assert_eq!(job.attempt, 1);
    complete(&b, &job, retry_now("first failure")).await;
    assert_counts(&b, &q, [1, 0, 0, 0], "retried now: pending again").await;
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (JobState::Pending, 1), "the attempt count is kept");
    assert!(info.error.as_deref().unwrap_or_default().contains("first failure"), "last error is recorded: {:?}", info.error);

    let job = reserve_one(&b, &q).await;
    assert_eq!((job.id, job.attempt), (id, 2), "the next reservation is attempt 2");

    // Retry in the future: delayed until then.
    let at = now_ms() + 300;
    complete(&b, &job, Outcome::Retry { at, error: "second failure".into() }).await;
    assert_eq!(state_of(&b, id).await, Some(JobState::Delayed));
    assert_counts(&b, &q, [0, 1, 0, 0], "retried later: delayed").await;
    let early = reserve(&b, &q, 10).await;
    assert!(early.is_empty() || now_ms() >= at, "a job retried for later was reserved before then: {early:?}");
    let job = match early.into_iter().next() {
        Some(job) => job,
        None => reserve_within(&b, request(&[&q], 1, Duration::from_secs(30)), Duration::from_secs(3)).await.remove(0),
    };
    assert!(now_ms() >= at, "reserved before its retry time");
    assert_eq!((job.id, job.attempt), (id, 3));

    complete(&b, &job, Outcome::Failed { error: "gave up for good".into() }).await;
    assert_counts(&b, &q, [0, 0, 0, 1], "failed for good").await;
    assert_eq!(state_of(&b, id).await, Some(JobState::Failed));
    let failed = b.failed_job(id).await.unwrap().expect("the job is in the failed store");
    assert_eq!(failed.id, id);
    assert_eq!(failed.error, "gave up for good");
    assert_eq!((failed.attempts, failed.max_attempts), (3, 3));
    assert_eq!(failed.payload, payload);
    assert_eq!((failed.queue.as_str(), failed.kind.as_str()), (q.as_str(), KIND));
    assert_eq!(failed.tags, vec!["retry-tag".to_string()]);
    let listed = b.failed(Some(&q), Page::default()).await.unwrap();
    assert_eq!(listed.total, 1);
    assert_eq!(listed.items.iter().map(|f| f.id).collect::<Vec<_>>(), vec![id]);
    assert!(reserve(&b, &q, 10).await.is_empty(), "a failed job is not reserved");
}

pub async fn release_does_not_consume_an_attempt(b: Backend) {
    let q = queue_name();
    let id = enqueue_one(&b, new_job(&q, KIND, 1).max_attempts(2)).await;

    let job = reserve_one(&b, &q).await;
    assert_eq!(job.attempt, 1);
    complete(&b, &job, Outcome::Release { at: now_ms() }).await;
    assert_counts(&b, &q, [1, 0, 0, 0], "released now: pending").await;
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!((info.state, info.attempts), (JobState::Pending, 0), "a release gives the attempt back");
    let job = reserve_one(&b, &q).await;
    assert_eq!(job.attempt, 1, "released job comes back with the same attempt number");

    complete(&b, &job, retry_now("real failure")).await;
    let job = reserve_one(&b, &q).await;
    assert_eq!(job.attempt, 2);
    complete(&b, &job, Outcome::Release { at: now_ms() }).await;
    let job = reserve_one(&b, &q).await;
    assert_eq!(job.attempt, 2, "a release after a retry keeps the retry's count");

    // Released for later: delayed, and still the same attempt.
    complete(&b, &job, Outcome::Release { at: now_ms() + 300 }).await;
    assert_eq!(state_of(&b, id).await, Some(JobState::Delayed));
    assert_counts(&b, &q, [0, 1, 0, 0], "released for later: delayed").await;
    let job = reserve_within(&b, request(&[&q], 1, Duration::from_secs(30)), Duration::from_secs(3)).await.remove(0);
    assert_eq!(job.attempt, 2);
    complete(&b, &job, Outcome::Completed).await;
    assert_eq!(state_of(&b, id).await, Some(JobState::Completed));
    assert!(b.failed_job(id).await.unwrap().is_none(), "attempt 2 of 2 completed: never failed");
}

pub async fn stale_lease_tokens_change_nothing(b: Backend) {
    let q = queue_name();
    let id = enqueue_one(&b, new_job(&q, KIND, 1).max_attempts(5)).await;
    let job = reserve_one(&b, &q).await;
    let mut stale = job.clone();
    stale.lease_token = job.lease_token.wrapping_add(1);

    for outcome in [
        Outcome::Completed,
        retry_now("stale retry"),
        Outcome::Failed { error: "stale failure".into() },
        Outcome::Release { at: now_ms() },
        Outcome::Retry { at: now_ms() + 60_000, error: "stale later".into() },
    ] {
        b.complete(vec![completion(&stale, outcome.clone())]).await.expect("a stale completion is ignored, not an error");
        assert_eq!(state_of(&b, id).await, Some(JobState::Reserved), "stale {outcome:?} changed the job");
        assert_counts(&b, &q, [0, 0, 1, 0], &format!("after a stale {outcome:?}")).await;
        assert!(b.failed_job(id).await.unwrap().is_none());
    }
    let err = b.complete_with(completion(&stale, Outcome::Completed), Box::new(|_| Ok(Box::new(())))).await.err();
    assert!(matches!(err, Some(BackendError::LeaseLost(x)) if x == id), "complete_with with a stale token: {err:?}");
    assert_eq!(state_of(&b, id).await, Some(JobState::Reserved));

    // A stale completion in a batch does not stop the valid ones.
    let other_id = enqueue_one(&b, new_job(&q, KIND, 2)).await;
    let other = reserve_one(&b, &q).await;
    assert_eq!(other.id, other_id);
    b.complete(vec![completion(&stale, Outcome::Completed), completion(&other, Outcome::Completed)]).await.unwrap();
    assert_eq!(state_of(&b, other_id).await, Some(JobState::Completed), "the valid completion in the batch applied");
    assert_eq!(state_of(&b, id).await, Some(JobState::Reserved), "the stale one did not");

    // The token of an earlier reservation of the same job is stale too.
    complete(&b, &job, Outcome::Release { at: now_ms() }).await;
    let again = reserve_one(&b, &q).await;
    assert_eq!(again.id, id);
    b.complete(vec![completion(&job, Outcome::Completed)]).await.unwrap();
    b.complete(vec![completion(&job, Outcome::Failed { error: "old token".into() })]).await.unwrap();
    assert_eq!(state_of(&b, id).await, Some(JobState::Reserved), "the previous reservation's token is stale");
    assert_counts(&b, &q, [0, 0, 1, 0], "after completions with the previous token").await;

    // After the real completion, the spent token changes nothing either.
    complete(&b, &again, Outcome::Completed).await;
    complete(&b, &again, Outcome::Failed { error: "acknowledged twice".into() }).await;
    complete(&b, &again, retry_now("acknowledged twice")).await;
    assert_eq!(state_of(&b, id).await, Some(JobState::Completed));
    assert!(b.failed_job(id).await.unwrap().is_none(), "a second acknowledgement moved a completed job to the failed store");
    assert_counts(&b, &q, [0, 0, 0, 0], "after acknowledging twice").await;
    assert!(reserve(&b, &q, 10).await.is_empty());
}

pub async fn enqueue_and_resume_wake_idle_workers(b: Backend) {
    let q = queue_name();
    let wakeup = b.wakeup();
    let wait = |what: &'static str, mark: u64| {
        let wakeup = wakeup.clone();
        async move {
            tokio::time::timeout(Duration::from_secs(2), wakeup.wait(mark, Duration::from_secs(30)))
                .await
                .unwrap_or_else(|_| panic!("{what} did not wake idle workers"));
        }
    };

    let mark = wakeup.mark();
    enqueue_one(&b, new_job(&q, KIND, 1)).await;
    wait("an enqueue", mark).await;

    let job = reserve_one(&b, &q).await;
    let mark = wakeup.mark();
    complete(&b, &job, retry_now("again")).await;
    wait("a retry due now", mark).await;

    b.pause(&q).await.unwrap();
    let mark = wakeup.mark();
    b.resume(&q).await.unwrap();
    wait("resuming a queue", mark).await;
}

pub async fn jobs_listing_filters_by_state(b: Backend) {
    let q = queue_name();
    let mut ids = HashMap::new();
    for n in 0..3 {
        ids.insert(enqueue_one(&b, new_job(&q, KIND, n).tag("listed")).await, "pending");
    }
    ids.insert(enqueue_one(&b, new_job(&q, KIND, 9).delay(Duration::from_secs(60))).await, "delayed");
    let job = reserve_one(&b, &q).await;
    ids.insert(job.id, "reserved");

    let list = |state: Option<JobState>, tag: Option<&str>| {
        let filter = JobFilter { queue: Some(q.clone()), kind: None, state, tag: tag.map(str::to_string), batch_id: None };
        let b = b.clone();
        async move { b.jobs(filter, Page::new(1, 50)).await.expect("jobs") }
    };
    let pending = list(Some(JobState::Pending), None).await;
    assert_eq!(pending.total, 2);
    assert!(pending.items.iter().all(|j| j.state == JobState::Pending && j.queue == q));
    assert_eq!(list(Some(JobState::Delayed), None).await.total, 1);
    let reserved = list(Some(JobState::Reserved), None).await;
    assert_eq!(reserved.items.iter().map(|j| j.id).collect::<Vec<_>>(), vec![job.id]);
    assert_eq!(list(None, None).await.total, 4);
    assert_eq!(list(None, Some("listed")).await.total, 3);
    let page = b.jobs(JobFilter { queue: Some(q.clone()), ..Default::default() }, Page::new(2, 3)).await.unwrap();
    assert_eq!((page.total, page.items.len()), (4, 1), "page 2 of 3 per page holds the fourth job");
}

/// Cursor pages (`Paged::next`) walk a list whatever its depth: every job once, newest first,
/// across live, delayed and completed jobs.
pub async fn jobs_cursor_pages_list_every_job_once(b: Backend) {
    let q = queue_name();
    let mut ids = Vec::new();
    for n in 0..23 {
        ids.push(enqueue_one(&b, new_job(&q, KIND, n)).await);
    }
    ids.push(enqueue_one(&b, new_job(&q, KIND, 99).delay(Duration::from_secs(60))).await);
    let done = reserve_one(&b, &q).await;
    complete(&b, &done, Outcome::Completed).await;
    let filter = JobFilter { queue: Some(q.clone()), ..Default::default() };
    let mut page = Page::new(1, 5);
    let mut seen = Vec::new();
    for _ in 0..10 {
        let list = b.jobs(filter.clone(), page.clone()).await.unwrap();
        assert_eq!((list.total, list.total_capped), (24, false));
        assert!(list.items.len() <= 5);
        seen.extend(list.items.iter().map(|j| j.id));
        match list.next {
            Some(next) => page = Page::after(next, 5),
            None => break,
        }
    }
    let mut expected = ids.clone();
    expected.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, expected, "every job once, newest first");
}
