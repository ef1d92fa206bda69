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
