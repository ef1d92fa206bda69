//! The RabbitMQ transport's own tests (the conformance suite covers the `QueueBackend` contract).

use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicGetOptions, BasicRejectOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};

use conveyor_core::backend::{Queue, QueueBackendExt, ReserveRequest, Store};
use conveyor_core::job::{JobState, NewJob};

use super::testing::TestAmqp;
use super::{broker_queue, AmqpBackend};
use crate::sqlite::{SqliteBackend, SqliteOptions};

fn open(amqp: &TestAmqp, dir: &tempfile::TempDir) -> AmqpBackend {
    let store = SqliteBackend::open(SqliteOptions::new(dir.path().join("s.db").to_str().unwrap())).unwrap();
    AmqpBackend::open(amqp.options(), Arc::new(store)).unwrap()
}

fn request(queue: &str) -> ReserveRequest {
    ReserveRequest { queues: vec![queue.into()], max: 10, lease: Duration::from_secs(30), worker: "t".into() }
}

/// A job is delivered by RabbitMQ, not read from the store: with its message purged behind
/// the backend's back it cannot be reserved, although the store holds it as pending — until
/// the sweep finds it orphaned and publishes it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_travel_through_rabbitmq_and_orphans_are_published_again() {
    let Some(amqp) = TestAmqp::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = open(&amqp, &dir);
    let q = "through";
    let id = NewJob::new("k", &1).queue(q).id;
    let mut job = NewJob::new("k", &1).queue(q);
    job.id = id;
    b.enqueue(vec![job]).await.unwrap();

    let conn = Connection::connect(&amqp.url, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let name = broker_queue(&amqp.prefix, q);
    let declared =
        ch.queue_declare(name.as_str().into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default()).await;
    assert_eq!(declared.unwrap().message_count(), 1, "the enqueue returned once RabbitMQ held the message");
    let got = ch.basic_get(name.as_str().into(), BasicGetOptions { no_ack: true }).await.unwrap();
    assert!(got.is_some(), "the message was taken behind the backend's back");

    assert!(b.reserve(request(q)).await.unwrap().is_empty(), "without its message the job is not delivered");
    assert_eq!(b.job(id).await.unwrap().unwrap().state, JobState::Pending, "the ledger still holds it");

    // Once it has waited past the orphan age in a queue RabbitMQ has nothing for, the sweep
    // (part of the reaper's pass) publishes it again.
    b.store.transact(move |tx| tx.execute("UPDATE jobs SET available_at = available_at - 60000", &[])).await.unwrap();
    *b.shared.last_sweep.lock().unwrap() = None;
    b.reap_expired().await.unwrap();
    let jobs = b.reserve(request(q)).await.unwrap();
    assert_eq!(jobs.iter().map(|j| j.id).collect::<Vec<_>>(), vec![id], "the orphan is delivered again");
    let _ = ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
}

/// The health check's round trip: answers on a live broker, fails (quickly, naming
/// RabbitMQ) when none listens; a URL that is not `amqp://` is refused at open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_broker_answers_and_fails_without_a_broker() {
    let Some(amqp) = TestAmqp::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = open(&amqp, &dir);
    assert_eq!(b.broker(), Some("amqp"));
    b.ping_broker().await.expect("the local broker answers");

    let dir2 = tempfile::tempdir().unwrap();
    let store = SqliteBackend::open(SqliteOptions::new(dir2.path().join("s.db").to_str().unwrap())).unwrap();
    let mut options = amqp.options();
    options.url = "amqp://guest:secret@127.0.0.1:1/%2f".into();
    let away = AmqpBackend::open(options, Arc::new(store)).unwrap();
    let err = away.ping_broker().await.expect_err("nothing listens on port 1").to_string();
    assert!(err.contains("RabbitMQ") && !err.contains("secret"), "{err}");

    let dir3 = tempfile::tempdir().unwrap();
    let store = SqliteBackend::open(SqliteOptions::new(dir3.path().join("s.db").to_str().unwrap())).unwrap();
    let mut options = amqp.options();
    options.url = "http://guest:secret@127.0.0.1/".into();
    let err = AmqpBackend::open(options, Arc::new(store)).err().expect("not an AMQP URL").to_string();
    assert!(err.contains("CONVEYOR_AMQP_URL") && !err.contains("secret"), "{err}");
}

/// A message RabbitMQ dead-letters (here: rejected without requeue by another consumer) puts
/// its job in the failed store with the broker's reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_lettered_messages_move_their_jobs_to_the_failed_store() {
    let Some(amqp) = TestAmqp::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = open(&amqp, &dir);
    let q = "dead";
    let job = NewJob::new("k", &1).queue(q);
    let id = job.id;
    b.enqueue(vec![job]).await.unwrap();

    let conn = Connection::connect(&amqp.url, ConnectionProperties::default()).await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let name = broker_queue(&amqp.prefix, q);
    let got = ch.basic_get(name.as_str().into(), BasicGetOptions::default()).await.unwrap().expect("the job's message");
    got.delivery.acker.reject(BasicRejectOptions { requeue: false }).await.unwrap();

    let mut failed = None;
    for _ in 0..100 {
        b.reap_expired().await.unwrap();
        failed = b.failed_job(id).await.unwrap();
        if failed.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let failed = failed.expect("the dead-lettered job is in the failed store");
    assert!(failed.error.contains("dead-lettered by RabbitMQ (rejected)"), "{}", failed.error);
    assert_eq!(b.job(id).await.unwrap().unwrap().state, JobState::Failed);
    let _ = ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await;
}

/// Acknowledgements go out as one `multiple` per run of settled deliveries (`settle`), and an
/// ack naming a tag the broker no longer holds closes the channel. Four workers reserve in
/// small takes (so barrier gets run all the time, often while others acknowledge) and finish
/// their jobs out of order, some retried (requeued through the store): every job completes
/// once, and the connection is never lost (a closed channel would reconnect: a new generation).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_order_acknowledgements_never_close_the_channel() {
    use conveyor_core::job::{Completion, Outcome};
    use rand::seq::SliceRandom;
    use std::sync::atomic::Ordering;

    let Some(amqp) = TestAmqp::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(open(&amqp, &dir));
    let q = "acks";
    let total = 1_500;
    for chunk in 0..(total / 500) {
        let jobs: Vec<NewJob> = (0..500).map(|i| NewJob::new("k", &(chunk * 500 + i)).queue(q)).collect();
        b.enqueue(jobs).await.unwrap();
    }
    let generation = b.shared.generation.load(Ordering::SeqCst);
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut workers = Vec::new();
    for w in 0..4 {
        let (b, done) = (b.clone(), done.clone());
        workers.push(tokio::spawn(async move {
            let mut held = Vec::new();
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while done.load(Ordering::SeqCst) < total {
                assert!(std::time::Instant::now() < deadline, "worker {w}: {} of {total} done", done.load(Ordering::SeqCst));
                let req = ReserveRequest { queues: vec![q.into()], max: 7, lease: Duration::from_secs(30), worker: format!("w{w}") };
                let got = b.reserve(req).await.unwrap();
                let more = !got.is_empty();
                held.extend(got);
                // Hold up to 20 while jobs come, then finish two thirds of them, in random order.
                if held.is_empty() || (more && held.len() < 20) {
                    continue;
                }
                held.shuffle(&mut rand::thread_rng());
                let keep = held.split_off((held.len() * 2).div_ceil(3));
                let batch = std::mem::replace(&mut held, keep);
                let completions: Vec<Completion> = batch
                    .iter()
                    .map(|j| match rand::random::<u8>() {
                        0..=24 if j.attempt < 2 => Completion::of(j, Outcome::Retry { at: 0, error: "again".into() }),
                        _ => Completion::of(j, Outcome::Completed),
                    })
                    .collect();
                let finished = completions.iter().filter(|c| matches!(c.outcome, Outcome::Completed)).count();
                b.complete(completions).await.unwrap();
                done.fetch_add(finished, Ordering::SeqCst);
            }
        }));
    }
    for w in workers {
        w.await.unwrap();
    }
    assert_eq!(b.shared.generation.load(Ordering::SeqCst), generation, "the connection was never lost");
    let counts = b.queues().await.unwrap().into_iter().find(|s| s.queue == q).unwrap();
    assert_eq!((counts.pending, counts.reserved), (0, 0), "every job completed");
    assert_eq!(done.load(Ordering::SeqCst), total, "each job completed once");
}
