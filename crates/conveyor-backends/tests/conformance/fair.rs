//! Fair queueing ([`conveyor_core::fair`]): within a queue and priority, keyed jobs are reserved
//! round-robin across their keys, however long one key's backlog. With the queue on RabbitMQ
//! the broker's queue is first in, first out (the README says so): these tests skip there.

use super::*;

const KIND: &str = "conformance.fair";

fn keyed(q: &str, key: &str, n: usize) -> NewJob {
    NewJob::new(KIND, &json!({ "k": key, "n": n })).queue(q).fairness(key)
}

fn label(job: &Job) -> String {
    let v: Value = serde_json::from_str(&job.payload).unwrap();
    match v["k"].as_str() {
        Some(k) => format!("{k}{}", v["n"]),
        None => v["name"].as_str().unwrap_or("?").to_string(),
    }
}

async fn take(b: &Backend, q: &str, n: usize) -> Vec<String> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.extend(reserve(b, q, 1).await.iter().map(label));
    }
    out
}

pub async fn fairness_keys_take_turns_within_a_queue_and_priority(b: Backend) {
    if b.name() == "amqp" {
        return;
    }
    let q = queue_name();
    // Tenant a's backlog of 50, in five enqueues; five of them are already reserved
    // (prefetched) when b and c arrive.
    for chunk in 0..5 {
        b.enqueue((1..=10).map(|i| keyed(&q, "a", chunk * 10 + i)).collect()).await.unwrap();
    }
    assert_eq!(take(&b, &q, 5).await, ["a1", "a2", "a3", "a4", "a5"]);
    b.enqueue((1..=5).map(|i| keyed(&q, "b", i)).collect()).await.unwrap();
    b.enqueue((1..=3).map(|i| keyed(&q, "c", i)).collect()).await.unwrap();
    assert_eq!(
        take(&b, &q, 14).await,
        ["a6", "b1", "c1", "a7", "b2", "c2", "a8", "b3", "c3", "a9", "b4", "a10", "b5", "a11"],
        "the keys that arrived behind a's backlog take turns with it"
    );

    // A key that was idle gets no credit for it: it starts at the current turn.
    enqueue_one(&b, keyed(&q, "c", 4)).await;
    assert_eq!(take(&b, &q, 3).await, ["a12", "c4", "a13"]);

    // Priority first; a job without a key is not scheduled by key and goes ahead of keyed ones.
    enqueue_one(&b, keyed(&q, "b", 6).priority(5)).await;
    enqueue_one(&b, NewJob::new(KIND, &json!({ "name": "plain" })).queue(&q)).await;
    assert_eq!(take(&b, &q, 3).await, ["b6", "plain", "a14"]);

    // The turn is the job's: a job put back keeps its place among the keys.
    let job = reserve_one(&b, &q).await;
    assert_eq!(label(&job), "a15");
    let release = Completion::of(&job, Outcome::Release { at: now_ms() });
    b.complete(vec![release]).await.unwrap();
    enqueue_one(&b, keyed(&q, "d", 1)).await;
    assert_eq!(take(&b, &q, 3).await, ["a15", "d1", "a16"]);
}

pub async fn fairness_holds_for_keys_enqueued_concurrently(b: Backend) {
    if b.name() == "amqp" {
        return;
    }
    let q = queue_name();
    // Two producers, each tenant's 400 jobs in 8 enqueues of 50, at the same time.
    let mut producers = Vec::new();
    for key in ["a", "b"] {
        let (b, q) = (b.clone(), q.clone());
        producers.push(tokio::spawn(async move {
            for chunk in 0..8 {
                b.enqueue((1..=50).map(|i| keyed(&q, key, chunk * 50 + i)).collect()).await.unwrap();
            }
        }));
    }
    for p in producers {
        p.await.unwrap();
    }
    // A third tenant arrives after both backlogs.
    b.enqueue((1..=5).map(|i| keyed(&q, "c", i)).collect()).await.unwrap();

    let mut order = Vec::new();
    while order.len() < 805 {
        let got = reserve(&b, &q, 25).await;
        assert!(!got.is_empty(), "{} of 805 jobs reserved, then none", order.len());
        order.extend(got.iter().map(label));
    }
    let (mut a, mut bb) = (0i64, 0i64);
    for (i, l) in order.iter().enumerate() {
        match &l[..1] {
            "a" => a += 1,
            "b" => bb += 1,
            _ => {}
        }
        assert!((a - bb).abs() <= 2, "after {} reservations a had {a} and b {bb}: {:?}", i + 1, &order[..=i]);
    }
    let last_c = order.iter().rposition(|l| l.starts_with('c')).unwrap();
    assert!(last_c < 15, "tenant c's 5 jobs come within the first rounds, not after 800 others: {order:?}");
    // Each tenant's own jobs stay in order.
    for key in ["a", "b", "c"] {
        let mine: Vec<u64> = order.iter().filter(|l| l.starts_with(key)).map(|l| l[1..].parse().unwrap()).collect();
        assert!(mine.windows(2).all(|w| w[0] < w[1]), "tenant {key}'s jobs out of order: {mine:?}");
    }
}

/// A job refused as a duplicate (its unique key is held) takes no turn: its key's next job is
/// not pushed back a round.
pub async fn a_duplicate_takes_no_turn(b: Backend) {
    if b.name() == "amqp" {
        return;
    }
    let q = queue_name();
    let key = unique_name("fair-unique");
    let ttl = Duration::from_secs(60);
    enqueue_one(&b, keyed(&q, "a", 1).unique(&key, ttl)).await;
    let dup = b.enqueue(vec![keyed(&q, "a", 99).unique(&key, ttl)]).await.unwrap();
    assert!(matches!(dup[..], [EnqueueOutcome::Duplicate { .. }]), "{dup:?}");
    enqueue_one(&b, keyed(&q, "a", 2)).await;
    b.enqueue((1..=3).map(|i| keyed(&q, "b", i)).collect()).await.unwrap();
    // Had the duplicate taken a turn, a2 would come after b2.
    assert_eq!(take(&b, &q, 5).await, ["a1", "b1", "a2", "b2", "b3"]);
}
