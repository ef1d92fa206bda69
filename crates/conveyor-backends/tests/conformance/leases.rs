//! Leases: expiry, recovery by the reaper, and extension by heartbeats.

use super::*;

const KIND: &str = "conformance.leases";

/// Reaps until `done` holds for the job (a lease must expire first, so this polls).
async fn reap_until<F, Fut>(b: &Backend, what: &str, mut done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        b.reap_expired().await.expect("reap_expired");
        if done().await {
            return;
        }
        if Instant::now() >= deadline {
            panic!("reap_expired never {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn expired_lease_returns_job_to_queue(b: Backend) {
    let q = queue_name();
    let id = enqueue_one(&b, new_job(&q, KIND, 1).max_attempts(3)).await;
    let lease = Duration::from_millis(200);
    let reserved_at = Instant::now();
    let first = b.reserve(request(&[&q], 1, lease)).await.unwrap().remove(0);
    assert_eq!(first.attempt, 1);

    b.reap_expired().await.unwrap();
    if reserved_at.elapsed() < lease {
        assert_eq!(state_of(&b, id).await, Some(JobState::Reserved), "reaped before its lease expired");
    }
    reap_until(&b, "returned the job whose lease expired", || async { state_of(&b, id).await == Some(JobState::Pending) }).await;
    assert!(reserved_at.elapsed() >= lease, "the job was reaped before its lease expired");
    let info = b.job(id).await.unwrap().unwrap();
    assert_eq!(info.attempts, 1, "the expired attempt still counts");
    let error = info.error.unwrap_or_default();
    assert!(error.contains("lease"), "the last error should mention the lease: {error:?}");
    assert_counts(&b, &q, [1, 0, 0, 0], "after reaping").await;

    let second = reserve_one(&b, &q).await;
    assert_eq!((second.id, second.attempt), (id, 2));
    assert_ne!(second.lease_token, first.lease_token, "a new reservation has a new token");

    // The worker that lost the lease wakes up and acknowledges: nothing happens.
    b.complete(vec![completion(&first, Outcome::Completed)]).await.unwrap();
    b.complete(vec![completion(&first, Outcome::Failed { error: "late".into() })]).await.unwrap();
    assert_eq!(state_of(&b, id).await, Some(JobState::Reserved), "the late worker's acknowledgement was applied");
    b.extend_leases(vec![(id, first.lease_token)], Duration::from_secs(60)).await.unwrap();
    complete(&b, &second, Outcome::Completed).await;
    assert_eq!(state_of(&b, id).await, Some(JobState::Completed));
    assert_counts(&b, &q, [0, 0, 0, 0], "after completing the second attempt").await;
}

pub async fn expired_lease_without_attempts_left_fails_job(b: Backend) {
    let q = queue_name();
    let payload = json!({ "last": "chance" });
    let id = enqueue_one(&b, NewJob::new(KIND, &payload).queue(&q).max_attempts(1)).await;
    let job = b.reserve(request(&[&q], 1, Duration::from_millis(200))).await.unwrap().remove(0);
    assert_eq!(job.attempt, 1);

    reap_until(&b, "moved the job with no attempts left to the failed store", || async { b.failed_job(id).await.unwrap().is_some() }).await;
    let failed = b.failed_job(id).await.unwrap().unwrap();
    assert!(failed.error.contains("lease"), "the error should mention the lease: {:?}", failed.error);
    assert_eq!((failed.attempts, failed.max_attempts), (1, 1));
    assert_eq!(failed.payload, payload);
    assert_eq!(state_of(&b, id).await, Some(JobState::Failed));
    assert_counts(&b, &q, [0, 0, 0, 1], "after reaping a spent job").await;
    assert!(reserve(&b, &q, 10).await.is_empty());

    // The worker that held it acknowledges late: the job stays failed.
    complete(&b, &job, Outcome::Completed).await;
    assert_eq!(state_of(&b, id).await, Some(JobState::Failed));
    assert_counts(&b, &q, [0, 0, 0, 1], "after a late acknowledgement").await;
}

pub async fn extended_lease_is_not_reaped(b: Backend) {
    let q = queue_name();
    let keep = enqueue_one(&b, new_job(&q, KIND, 1)).await;
    let lapse = enqueue_one(&b, new_job(&q, KIND, 2)).await;
    let forged = enqueue_one(&b, new_job(&q, KIND, 3)).await;
    let lease = Duration::from_millis(500);
    let start = Instant::now();
    let jobs = b.reserve(request(&[&q], 3, lease)).await.unwrap();
    assert_eq!(jobs.len(), 3);
    let token = |id: JobId| jobs.iter().find(|j| j.id == id).unwrap().lease_token;

    // Heartbeat `keep` (and `forged` with a wrong token) for three lease lengths.
    while start.elapsed() < lease * 3 {
        b.extend_leases(vec![(keep, token(keep)), (forged, token(forged).wrapping_add(1))], lease).await.unwrap();
        b.reap_expired().await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    b.reap_expired().await.unwrap();
    assert_eq!(state_of(&b, keep).await, Some(JobState::Reserved), "a job whose lease was extended was reaped");
    assert_eq!(state_of(&b, lapse).await, Some(JobState::Pending), "a job whose lease lapsed was not reaped");
    assert_eq!(state_of(&b, forged).await, Some(JobState::Pending), "extend_leases with a wrong token extended the lease");
    assert_counts(&b, &q, [2, 0, 1, 0], "after reaping the two lapsed jobs").await;

    let keep_job = jobs.iter().find(|j| j.id == keep).unwrap();
    complete(&b, keep_job, Outcome::Completed).await;
    assert_eq!(state_of(&b, keep).await, Some(JobState::Completed), "the holder of an extended lease can still complete");
}

/// The reservations of a process that died are found by their holder and end at once; a
/// living holder's stay. With the queue on RabbitMQ too: the broker returns a dead consumer's
/// messages, but the ledger's reservation is what must end before the job runs again.
pub async fn a_dead_holders_leases_end_at_once(b: Backend) {
    let q = queue_name();
    let dead_id = enqueue_one(&b, new_job(&q, KIND, 1).max_attempts(3)).await;
    let live_id = enqueue_one(&b, new_job(&q, KIND, 2).max_attempts(3)).await;
    // A process of this machine that ran and was waited for: its pid is free.
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    let dead = format!("host:{pid}:{}.abc", conveyor_core::liveness::machine());
    let living = conveyor_core::liveness::holder("host", Some("def"));
    let reserve_as =
        |worker: &str| ReserveRequest { queues: vec![q.clone()], max: 1, lease: Duration::from_secs(60), worker: worker.into() };
    let first = b.reserve(reserve_as(&dead)).await.unwrap();
    let second = b.reserve(reserve_as(&living)).await.unwrap();
    assert_eq!((first[0].id, second[0].id), (dead_id, live_id));

    let holders = b.holders().await.unwrap();
    assert!(holders.contains(&dead) && holders.contains(&living), "{holders:?}");
    assert_eq!(b.expire_leases_of(vec![dead.clone()]).await.unwrap(), 1);
    reap_until(&b, "returned the dead holder's job", || async { state_of(&b, dead_id).await == Some(JobState::Pending) }).await;
    assert_eq!(state_of(&b, live_id).await, Some(JobState::Reserved), "a living holder keeps its job");
    assert!(!b.holders().await.unwrap().contains(&dead));
    let again = reserve_one(&b, &q).await;
    assert_eq!((again.id, again.attempt), (dead_id, 2), "the dead holder's attempt counts");
    // The dead process's late acknowledgement changes nothing: its token is stale.
    b.complete(vec![completion(&first[0], Outcome::Completed)]).await.unwrap();
    assert_eq!(state_of(&b, dead_id).await, Some(JobState::Reserved));
}
