//! The Redis queue's own tests (the conformance suite covers the `QueueBackend` contract).

use super::*;
use crate::sqlite::{SqliteBackend, SqliteOptions};
use conveyor_core::backend::{QueueBackendExt, ReserveRequest};
use conveyor_core::batch::{self, Batch};
use testing::TestRedis;

fn open(redis: &TestRedis, dir: &tempfile::TempDir) -> RedisBackend {
    let store = SqliteBackend::open(SqliteOptions::new(dir.path().join("s.db").to_str().unwrap())).unwrap();
    let mut options = RedisOptions::new(redis.url.clone());
    options.prefix = redis.prefix.clone();
    RedisBackend::open(options, Arc::new(store)).unwrap()
}

async fn pending(b: &RedisBackend, queue: &str) -> u64 {
    b.queues().await.unwrap().into_iter().find(|q| q.queue == queue).map_or(0, |q| q.pending)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_locks_live_in_redis_with_its_expiry() {
    let Some(redis) = TestRedis::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = open(&redis, &dir);
    b.ensure_tables().await.unwrap();
    let key_of = |k: &str| format!("{}:lock:{k}", tag_of(&redis.prefix));
    let ttl = |k: String| {
        let url = redis.url.clone();
        move || -> i64 {
            redis::cmd("PTTL").arg(&k).query(&mut redis::Client::open(url.as_str()).unwrap().get_connection().unwrap()).unwrap()
        }
    };
    assert!(conveyor_core::lock::acquire(&b, "nightly", "a", Duration::from_secs(30)).await.unwrap());
    assert!(!conveyor_core::lock::acquire(&b, "nightly", "b", Duration::from_secs(30)).await.unwrap());
    let left = ttl(key_of("nightly"))();
    assert!(left > 25_000 && left <= 30_000, "the key carries the lock's TTL: {left} ms");
    let rows = b.query("SELECT count(*) FROM locks", vec![]).await.unwrap();
    assert_eq!(rows[0][0], SqlValue::Int(0), "the store holds no lock row");
    assert!(conveyor_core::lock::release(&b, "nightly", "a").await.unwrap());
    assert_eq!(ttl(key_of("nightly"))(), -2, "released: the key is gone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_sorted_sets_rate_limits_and_breakers_live_in_redis() {
    use conveyor_core::breaker::{Breaker, BreakerConfig, Permit};
    use conveyor_core::cache::{forget_prefix_in, incr_in, Cache, SortedSet};
    use conveyor_core::ratelimit::{RateLimit, RateLimiter};
    let Some(redis) = TestRedis::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = Arc::new(open(&redis, &dir));
    b.ensure_tables().await.unwrap();
    let tag = tag_of(&redis.prefix);
    let url = redis.url.clone();
    let conn = move || redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let backend: Arc<dyn QueueBackend> = b.clone();
    let store_rows = |table: &'static str| {
        let b = b.clone();
        async move { b.query(&format!("SELECT count(*) FROM {table}"), vec![]).await.map(|r| r[0][0].clone()).unwrap_or(SqlValue::Int(0)) }
    };

    // The cache: a Redis key with Redis' own expiry, indexed for prefix invalidation.
    let cache = Cache::new(backend.clone());
    cache.put("kpi:day:1", &42, Some(Duration::from_secs(60))).await.unwrap();
    cache.put("kpi:day:2", &43, None).await.unwrap();
    cache.put("other", &1, None).await.unwrap();
    let ttl: i64 = redis::cmd("PTTL").arg(format!("{tag}:c:kpi:day:1")).query(&mut conn()).unwrap();
    assert!(ttl > 55_000 && ttl <= 60_000, "the entry carries its TTL: {ttl}");
    assert_eq!(store_rows("cache").await, SqlValue::Int(0), "the store holds no cache row");
    assert_eq!(cache.get::<i64>("kpi:day:2").await.unwrap(), Some(43));
    // Invalidated in a transaction: not before it commits, and only then.
    let err = b
        .transact(|tx| {
            forget_prefix_in(tx, "kpi:")?;
            Err::<(), _>(BackendError::Other("rolled back".into()))
        })
        .await;
    assert!(err.is_err());
    assert_eq!(cache.get::<i64>("kpi:day:1").await.unwrap(), Some(42), "a rolled-back invalidation forgets nothing");
    b.transact(|tx| forget_prefix_in(tx, "kpi:")).await.unwrap();
    assert_eq!(cache.get::<i64>("kpi:day:1").await.unwrap(), None);
    assert_eq!(cache.get::<i64>("kpi:day:2").await.unwrap(), None);
    assert_eq!(cache.get::<i64>("other").await.unwrap(), Some(1));
    assert_eq!(store_rows("queue_state_outbox").await, SqlValue::Int(0), "applied operations leave the outbox");

    // A sorted set: a Redis zset (negated scores), incremented with the transaction.
    let z = SortedSet::new(backend.clone(), "board");
    z.set("ann", 5.0).await.unwrap();
    let score = b
        .transact(|tx| {
            incr_in(tx, "board", "bob", 2.0)?;
            incr_in(tx, "board", "bob", 5.0)
        })
        .await
        .unwrap();
    assert_eq!(score, 7.0, "increments earlier in the transaction count");
    let raw: Vec<(String, f64)> =
        redis::cmd("ZRANGE").arg(format!("{tag}:z:board")).arg(0).arg(-1).arg("WITHSCORES").query(&mut conn()).unwrap();
    assert_eq!(raw, vec![("bob".to_string(), -7.0), ("ann".to_string(), -5.0)]);
    assert_eq!(store_rows("zsets").await, SqlValue::Int(0), "the store holds no sorted set row");

    // A deferred operation left in the outbox by a crash is applied once, even twice relayed.
    let op = Deferred::ZIncr { set: "board".into(), member: "ann".into(), delta: 10.0 };
    let body = serde_json::to_string(&op).unwrap();
    b.transact(move |tx| {
        tx.execute(
            "INSERT INTO queue_state_outbox (id, op, created_at) VALUES ('s:crashed', $1, $2)",
            &[body.into(), (now_ms() - 60_000).into()],
        )
    })
    .await
    .unwrap();
    assert_eq!(z.score("ann").await.unwrap(), Some(5.0), "not applied before the relay");
    b.recover().await.unwrap();
    assert_eq!(b.shared.apply_once(&[("s:crashed".into(), op)], now_ms()).unwrap(), 0, "a second relay applies nothing");
    assert_eq!(z.score("ann").await.unwrap(), Some(15.0));
    assert_eq!(store_rows("queue_state_outbox").await, SqlValue::Int(0));

    // A rate limiter: one key in Redis; a unit taken in a rolled-back transaction comes back.
    let limiter = RateLimiter::new(backend.clone(), "mail", RateLimit::per(2, Duration::from_secs(3600)));
    assert!(limiter.check("u1").await.unwrap().is_allowed());
    let l = limiter.clone();
    let err = b
        .transact(move |tx| {
            assert!(l.check_in(tx, "u1")?.is_allowed());
            Err::<(), _>(BackendError::Other("rolled back".into()))
        })
        .await;
    assert!(err.is_err());
    assert!(limiter.check("u1").await.unwrap().is_allowed(), "the rolled-back unit was given back");
    assert!(!limiter.check("u1").await.unwrap().is_allowed(), "two an hour");
    let exists: i64 = redis::cmd("EXISTS").arg(format!("{tag}:rl:mail:u1")).query(&mut conn()).unwrap();
    assert_eq!(exists, 1);
    assert_eq!(store_rows("rate_limits").await, SqlValue::Int(0), "the store holds no rate-limit row");

    // A breaker: its state is a Redis hash; the transition's event is in the store.
    let conveyor = conveyor_core::Conveyor::new(backend.clone(), conveyor_core::registry::Registry::new());
    let config = BreakerConfig { min_calls: 2, failure_rate: 0.5, open_for: Duration::from_secs(60), ..Default::default() };
    let br = Breaker::new(conveyor, "partner", config);
    assert_eq!(br.allow().await.unwrap(), Permit::Allowed);
    br.record(false).await.unwrap();
    br.record(false).await.unwrap();
    assert!(matches!(br.allow().await.unwrap(), Permit::Rejected { .. }), "two failures of two calls open it");
    let state: String = redis::cmd("HGET").arg(format!("{tag}:b:partner")).arg("state").query(&mut conn()).unwrap();
    assert_eq!(state, "open");
    assert_eq!(br.info().await.unwrap().calls, 2);
    assert_eq!(store_rows("breakers").await, SqlValue::Int(0), "the store holds no breaker row");
    let events = b.query("SELECT count(*) FROM events WHERE name = 'breaker.open'", vec![]).await.unwrap();
    assert_eq!(events[0][0], SqlValue::Int(1), "the transition's event is in the store");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_jobs_leave_redis_once_out_of_the_history() {
    let Some(redis) = TestRedis::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteBackend::open(SqliteOptions::new(dir.path().join("s.db").to_str().unwrap())).unwrap();
    let mut options = RedisOptions::new(redis.url.clone());
    options.prefix = redis.prefix.clone();
    options.completed_history = 3;
    let b = RedisBackend::open(options, Arc::new(store)).unwrap();
    let tag = tag_of(&redis.prefix);
    let count = |cmd: &'static str, key: String| {
        let url = redis.url.clone();
        move || -> i64 {
            redis::cmd(cmd).arg(&key).query(&mut redis::Client::open(url.as_str()).unwrap().get_connection().unwrap()).unwrap()
        }
    };
    let jobs: Vec<NewJob> = (0..10).map(|n| NewJob::new("t.history", &serde_json::json!({ "n": n })).queue("history")).collect();
    b.enqueue(jobs).await.unwrap();
    assert_eq!(count("HLEN", format!("{tag}:s"))(), 0, "a job has no state field before its first reservation");
    let req = ReserveRequest { queues: vec!["history".into()], max: 10, lease: Duration::from_secs(30), worker: "w".into() };
    let reserved = b.reserve(req).await.unwrap();
    assert_eq!(reserved.len(), 10);
    assert!(reserved.iter().all(|j| j.attempt == 1 && j.available_at == j.created_at));
    // One at a time, so the history's order is the completion order.
    for j in &reserved {
        b.complete(vec![Completion::of(j, Outcome::Completed)]).await.unwrap();
    }
    assert_eq!(count("LLEN", format!("{tag}:done"))(), 3, "the history holds the last three");
    assert_eq!(count("HLEN", format!("{tag}:d"))(), 3, "older completed jobs left the data hash");
    assert_eq!(count("HLEN", format!("{tag}:s"))(), 3, "and the state hash");
    let last = b.job(reserved[9].id).await.unwrap().expect("the newest completed job is in the history");
    assert_eq!(last.state, JobState::Completed);
    assert_eq!((last.attempts, last.worker.as_deref()), (1, Some("w")));
    assert!(last.finished_at.is_some() && last.runtime_ms.is_some() && last.reserved_at.is_some());
    assert!(b.job(reserved[0].id).await.unwrap().is_none(), "the oldest is gone");
    let listed = b.jobs(JobFilter { state: Some(JobState::Completed), ..Default::default() }, Page::new(1, 50)).await.unwrap();
    assert_eq!(listed.total, 3);
    // A stale acknowledgement of a completed job changes nothing.
    b.complete(vec![Completion::of(&reserved[9], Outcome::Completed)]).await.unwrap();
    assert_eq!(count("LLEN", format!("{tag}:done"))(), 3);
    assert_eq!(b.job(reserved[8].id).await.unwrap().map(|j| j.state), Some(JobState::Completed));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_left_by_a_crash_is_relayed_once_even_when_relayed_twice() {
    let Some(redis) = TestRedis::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = open(&redis, &dir);
    b.ensure_tables().await.unwrap();
    let job = NewJob::new("t.outbox", &serde_json::json!({ "n": 1 })).queue("outbox");
    // A transaction that committed its row, then the process died before relaying it.
    let crashed = |job: NewJob| {
        let body = serde_json::to_string(&job).unwrap();
        let id = job.id.to_string();
        b.transact(move |tx| {
            tx.execute(
                "INSERT INTO queue_outbox (id, job, created_at) VALUES ($1, $2, $3)",
                &[id.into(), body.into(), (now_ms() - 60_000).into()],
            )
        })
    };
    crashed(job.clone()).await.unwrap();
    assert_eq!(pending(&b, "outbox").await, 0, "nothing reaches Redis before the relay");
    b.reap_expired().await.unwrap();
    assert_eq!(pending(&b, "outbox").await, 1, "the reaper pass relays the row");
    let left = b.query("SELECT count(*) FROM queue_outbox", vec![]).await.unwrap();
    assert_eq!(left[0][0], SqlValue::Int(0), "a relayed row is deleted");
    // The same row relayed again (a relay that died between Redis and the delete).
    crashed(job.clone()).await.unwrap();
    b.reap_expired().await.unwrap();
    assert_eq!(pending(&b, "outbox").await, 1, "a row relayed twice enqueues once");
    let req = ReserveRequest { queues: vec!["outbox".into()], max: 10, lease: Duration::from_secs(30), worker: "w".into() };
    let got = b.reserve(req).await.unwrap();
    assert_eq!(got.iter().map(|j| j.id).collect::<Vec<_>>(), vec![job.id]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outcome_record_applied_twice_counts_once_and_is_removed() {
    let Some(redis) = TestRedis::create() else { return };
    let dir = tempfile::tempdir().unwrap();
    let b = open(&redis, &dir);
    let jobs: Vec<NewJob> = (0..2).map(|n| NewJob::new("t.batch", &serde_json::json!({ "n": n })).queue("records")).collect();
    let id = b.transact(move |tx| Batch::new("records").extend(jobs).dispatch_in(tx)).await.unwrap();
    let req = ReserveRequest { queues: vec!["records".into()], max: 10, lease: Duration::from_secs(30), worker: "w".into() };
    let reserved = b.reserve(req).await.unwrap();
    assert_eq!(reserved.len(), 2);
    // The acknowledgement script ran (records stored), then the process died.
    let c = Completion::of(&reserved[0], Outcome::Completed);
    let data = serde_json::to_string(&Data { k: c.kind.clone(), bt: c.batch_id.clone(), ..Default::default() }).unwrap();
    let record = serde_json::to_string(&Record::of(&c, data).unwrap()).unwrap();
    let args = vec![
        now_ms().to_string(),
        "10".into(),
        c.id.to_string(),
        c.lease_token.to_string(),
        "c".into(),
        "0".into(),
        String::new(),
        record,
        "1".into(),
        "0".into(),
        c.queue.clone(),
        String::new(),
    ];
    let res = items(b.script(|s| &s.complete, args).await.unwrap());
    let members: Vec<String> = items(res[1].clone()).iter().map(text).collect();
    assert_eq!(members.len(), 1);
    assert_eq!(batch::find(&b, &id).await.unwrap().unwrap().processed, 0, "the store has not seen the outcome yet");
    b.apply_records(members.clone()).await.unwrap();
    b.apply_records(members).await.unwrap();
    let info = batch::find(&b, &id).await.unwrap().unwrap();
    assert_eq!((info.processed, info.pending), (1, 1), "applied twice, counted once");
    let left: i64 = b.redis(|c, tag| redis::cmd("ZCARD").arg(format!("{tag}:h")).query(c)).await.unwrap();
    assert_eq!(left, 0, "applied records leave Redis");
}
