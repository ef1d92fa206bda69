//! Flow control ([`conveyor_core::flow`]): per-key concurrency across workers, parked jobs that
//! block nobody, and slots of crashed workers that come back.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

use conveyor_core::flow::{self, Concurrency, Rule};
use conveyor_core::registry::{JobContext, Registry};

use super::runtime::{config, start};
use super::support::*;
use super::*;

/// Running and most-at-once counts per key, kept by the jobs themselves.
#[derive(Clone, Default)]
struct PerKey(Arc<Mutex<HashMap<String, (usize, usize)>>>);

impl PerKey {
    fn enter(&self, key: &str) {
        let mut m = self.0.lock().unwrap();
        let e = m.entry(key.to_string()).or_default();
        e.0 += 1;
        e.1 = e.1.max(e.0);
    }
    fn leave(&self, key: &str) {
        self.0.lock().unwrap().get_mut(key).unwrap().0 -= 1;
    }
    fn most(&self) -> HashMap<String, usize> {
        self.0.lock().unwrap().iter().map(|(k, v)| (k.clone(), v.1)).collect()
    }
}

pub async fn concurrency_keys_limit_running_jobs_across_workers(b: Backend) {
    const KIND: &str = "conformance.flow.keyed";
    const PER_KEY: usize = 12;
    let q = queue_name();
    let per_key = PerKey::default();
    let done = Arc::new(AtomicUsize::new(0));
    let registry = || {
        let mut r = Registry::new();
        let (per_key, done) = (per_key.clone(), done.clone());
        r.register(KIND, move |p: Value, _ctx: JobContext| {
            let (per_key, done) = (per_key.clone(), done.clone());
            async move {
                let key = p["key"].as_str().unwrap_or_default().to_string();
                per_key.enter(&key);
                tokio::time::sleep(Duration::from_millis(40)).await;
                per_key.leave(&key);
                done.fetch_add(1, SeqCst);
                Ok(())
            }
        });
        r
    };
    let keys: Vec<String> = (0..3).map(|i| unique_name(&format!("key{i}"))).collect();
    let mut ids = Vec::new();
    let mut jobs = Vec::new();
    for n in 0..PER_KEY {
        for key in &keys {
            let job = NewJob::new(KIND, &json!({ "key": key, "n": n })).queue(&q).concurrency(Concurrency::new(key, 2).unwrap());
            ids.push(job.id);
            jobs.push(job);
        }
    }
    b.enqueue(jobs).await.unwrap();
    // Two workers of 8 executors each: 16 could run, the keys allow 6.
    let w1 = start(&b, registry(), config(&q, 8, Duration::from_secs(5)));
    let w2 = start(&b, registry(), config(&q, 8, Duration::from_secs(5)));
    let total = PER_KEY * keys.len();
    wait_until("every keyed job ran", Duration::from_secs(60), || async {
        let s = stats(&b, &q).await;
        done.load(SeqCst) >= total && s.pending + s.delayed + s.reserved == 0
    })
    .await;
    let (r1, r2) = (w1.stop().await, w2.stop().await);
    assert_eq!(done.load(SeqCst), total, "every job ran once");
    assert_eq!(r1.completed + r2.completed, total as u64);
    assert_eq!(r1.failed + r2.failed + r1.retried + r2.retried, 0);
    for key in &keys {
        assert_eq!(per_key.most().get(key), Some(&2), "at most the limit ran at once, and the limit was used: {:?}", per_key.most());
    }
    for id in &ids {
        if let Some(info) = b.job(*id).await.unwrap() {
            assert_eq!(info.state, JobState::Completed, "{info:?}");
            assert_eq!(info.attempts, 1, "waiting for a slot spends no attempt: {info:?}");
        }
    }
    let busy = flow::keys(b.as_ref(), 100).await.unwrap();
    assert!(busy.iter().all(|k| !keys.contains(&k.key)), "idle keys are forgotten: {busy:?}");
}

pub async fn a_key_at_its_limit_holds_up_no_other_job(b: Backend) {
    const KEYED: &str = "conformance.flow.gated";
    const FREE: &str = "conformance.flow.free";
    let q = queue_name();
    let tenant = unique_name("tenant");
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let per_key = PerKey::default();
    let log = Log::default();
    let mut registry = Registry::new();
    {
        let (gate, per_key, log) = (gate.clone(), per_key.clone(), log.clone());
        registry.register(KEYED, move |p: Value, _ctx: JobContext| {
            let (gate, per_key, log) = (gate.clone(), per_key.clone(), log.clone());
            async move {
                let key = p["tenant"].as_str().unwrap_or_default().to_string();
                per_key.enter(&key);
                // Each keyed job holds its slot until the test lets one through.
                gate.acquire().await.unwrap().forget();
                per_key.leave(&key);
                log.push("keyed");
                Ok(())
            }
        });
    }
    log_ok(&mut registry, FREE, &log);
    // The kind's rule (1 per tenant) wins over the 3 the jobs carry.
    registry.concurrency(KEYED, Rule::new("tenant", 1).unwrap());
    let mut keyed = Vec::new();
    for n in 0..6 {
        let job = NewJob::new(KEYED, &json!({ "tenant": tenant, "n": n })).queue(&q).concurrency(Concurrency::new(&tenant, 3).unwrap());
        keyed.push(enqueue_one(&b, job).await);
    }
    for n in 0..10 {
        enqueue_one(&b, new_job(&q, FREE, n)).await;
    }
    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("the other jobs ran while the tenant's first job holds its only slot", Duration::from_secs(30), || async {
        log.count(FREE) == 10
    })
    .await;
    wait_until("the tenant's other jobs are parked in line", Duration::from_secs(30), || async {
        let mut parked = 0;
        for id in &keyed {
            if flow::waiting(b.as_ref(), &tenant, *id).await.unwrap().is_some() {
                parked += 1;
            }
        }
        parked == 5
    })
    .await;
    assert_eq!(log.count("keyed"), 0);
    let busy = flow::keys(b.as_ref(), 100).await.unwrap();
    let mine = busy.iter().find(|k| k.key == tenant).expect("the tenant's key is listed");
    assert_eq!((mine.limit, mine.running, mine.waiting), (1, 1, 5), "{busy:?}");
    for id in &keyed {
        let info = b.job(*id).await.unwrap().unwrap();
        assert!(info.attempts <= 1, "a parked job spent no attempt: {info:?}");
    }
    // One at a time, in the order they joined the line.
    for n in 1..=6 {
        gate.add_permits(1);
        wait_until("the next keyed job ran", Duration::from_secs(30), || async { log.count("keyed") == n }).await;
    }
    wait_until("the queue is drained", Duration::from_secs(30), || drained(&b, &q)).await;
    let report = w.stop().await;
    assert_eq!(per_key.most().get(&tenant), Some(&1), "the kind's limit of 1 held");
    assert_eq!(report.completed, 16);
    assert_eq!(report.failed + report.retried, 0);
}

pub async fn a_crashed_workers_slot_comes_back_with_its_lease(b: Backend) {
    const KIND: &str = "conformance.flow.after_crash";
    let q = queue_name();
    let key = unique_name("key");
    let log = Log::default();
    let mut registry = Registry::new();
    log_ok(&mut registry, KIND, &log);
    // A worker that crashed while running a job of `key` left its slot, leased for 1.5 s more.
    let c = Concurrency::new(&key, 1).unwrap();
    let lease_end = now_ms() + 1_500;
    assert!(flow::acquire(b.as_ref(), &c, JobId::new(), lease_end).await.unwrap());
    let id = enqueue_one(&b, new_job(&q, KIND, 1).concurrency(c.clone())).await;
    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("the job parked behind the crashed worker's slot", Duration::from_secs(30), || async {
        flow::waiting(b.as_ref(), &key, id).await.unwrap() == Some((1, 1)) || log.len() > 0
    })
    .await;
    wait_until("the job ran once the slot's lease ended", Duration::from_secs(30), || async { log.len() == 1 }).await;
    let ran_at = now_ms();
    assert!(ran_at >= lease_end, "not before the dead worker's lease ended ({} ms early)", lease_end - ran_at);
    assert!(ran_at < lease_end + flow::PARK_RECHECK.as_millis() as i64, "handed on by the sweep, not by the recheck");
    wait_until("the queue is drained", Duration::from_secs(30), || drained(&b, &q)).await;
    let report = w.stop().await;
    assert_eq!((report.completed, report.released), (1, 1), "parked once, then ran: {report:?}");
}

pub async fn a_kept_slot_serves_its_workers_next_job_and_goes_back_when_another_waits(b: Backend) {
    const KIND: &str = "conformance.flow.kept";
    let (qa, qb) = (queue_name(), queue_name());
    let key = unique_name("key");
    let c = Concurrency::new(&key, 1).unwrap();
    let log = Log::default();
    let registry = || {
        let mut r = Registry::new();
        log_ok(&mut r, KIND, &log);
        r
    };
    let held =
        || async { flow::keys(b.as_ref(), 10_000).await.unwrap().into_iter().find(|k| k.key == key).map(|k| (k.running, k.waiting)) };
    // Worker A runs a job of the key on its queue and keeps the slot for the key's next job
    // (for a minute here, so that the test does not race the second it is kept by default).
    let a = start(
        &b,
        registry(),
        conveyor_core::worker::WorkerConfig { keep_slots: Duration::from_secs(60), ..config(&qa, 2, Duration::from_secs(5)) },
    );
    enqueue_one(&b, new_job(&qa, KIND, 1).concurrency(c.clone())).await;
    wait_until("A's first job ran", Duration::from_secs(30), || async { log.len() == 1 }).await;
    wait_until("A's job is done", Duration::from_secs(30), || drained(&b, &qa)).await;
    assert_eq!(held().await, Some((1, 0)), "A keeps the slot (the store counts it)");
    // A's next job of the key reuses it.
    enqueue_one(&b, new_job(&qa, KIND, 2).concurrency(c.clone())).await;
    wait_until("A's second job ran", Duration::from_secs(30), || async { log.len() == 2 }).await;
    // A job of the key on worker B's queue finds the key full (A's kept slot), parks, and gets
    // the slot from A's next sweep (about a second), not from its own 10 s recheck.
    let b_worker = start(&b, registry(), config(&qb, 2, Duration::from_secs(5)));
    let parked_at = std::time::Instant::now();
    let id = enqueue_one(&b, new_job(&qb, KIND, 3).concurrency(c.clone())).await;
    wait_until("B's job ran with the slot A gave back", Duration::from_secs(30), || async { log.len() == 3 }).await;
    assert!(parked_at.elapsed() < flow::PARK_RECHECK, "given back by the sweep, after {:?}", parked_at.elapsed());
    let info = b.job(id).await.unwrap().unwrap();
    assert!(info.attempts <= 1, "waiting spent no attempt: {info:?}");
    wait_until("B's job is done", Duration::from_secs(30), || drained(&b, &qb)).await;
    let rb = b_worker.stop().await;
    assert_eq!((rb.completed, rb.released), (1, 1), "B's job parked behind A's kept slot once, then ran: {rb:?}");
    // A worker that stops gives its kept slots back: the key is idle and forgotten.
    let ra = a.stop().await;
    assert_eq!(ra.completed, 2, "{ra:?}");
    assert_eq!(held().await, None, "the key is idle and forgotten");
}

pub async fn only_the_last_job_of_a_debounced_burst_runs(b: Backend) {
    use conveyor_core::debounce::Debounce;
    const KIND: &str = "conformance.flow.debounced";
    let q = queue_name();
    let key = unique_name("product");
    let ran: Arc<Mutex<Vec<u64>>> = Arc::default();
    let mut registry = Registry::new();
    {
        let ran = ran.clone();
        registry.register(KIND, move |p: Value, _ctx: JobContext| {
            let ran = ran.clone();
            async move {
                ran.lock().unwrap().push(p["n"].as_u64().unwrap());
                Ok(())
            }
        });
    }
    let conveyor = conveyor_core::Conveyor::new(b.clone(), Registry::new());
    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    // A window well above what five enqueues take on a loaded machine.
    let window = Duration::from_millis(1000);
    // A burst of five, one enqueue at a time, then one more of another key.
    let started = std::time::Instant::now();
    let mut ids = Vec::new();
    let mut last_sent = 0;
    for n in 1..=5 {
        let job = NewJob::new(KIND, &json!({ "n": n })).queue(&q).debounce(Debounce::new(&key, window).unwrap());
        last_sent = now_ms();
        ids.push(conveyor.dispatch(job).await.unwrap());
    }
    let other = unique_name("product");
    conveyor.dispatch(NewJob::new(KIND, &json!({ "n": 9 })).queue(&q).debounce(Debounce::new(&other, window).unwrap())).await.unwrap();
    // Each waits for its window from its enqueue.
    let info = b.job(ids[4]).await.unwrap().unwrap();
    assert!(info.available_at.unwrap() >= last_sent + 1000, "the job waits for its window from {last_sent}: {info:?}");
    wait_until("the burst is done", Duration::from_secs(30), || drained(&b, &q)).await;
    assert!(started.elapsed() >= window);
    let mut got = ran.lock().unwrap().clone();
    got.sort();
    assert_eq!(got, [5, 9], "only the last job of each key's burst ran");
    for id in ids {
        let info = b.job(id).await.unwrap().unwrap();
        assert_eq!(info.state, JobState::Completed, "superseded jobs complete unrun: {info:?}");
    }
    let report = w.stop().await;
    assert_eq!(report.completed, 6);
}
