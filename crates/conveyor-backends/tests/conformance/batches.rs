//! Batches ([`conveyor_core::batch`]) under the real worker runtime: exact counters, `then` /
//! `catch` / `finally` callbacks enqueued exactly once by the acknowledgement transaction,
//! cancellation (by a failure or by hand) skipping the jobs not yet started, `allow_failures`,
//! adding jobs, and the listing.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::Mutex;

use conveyor_core::backend::Page;
use conveyor_core::batch::{self, Batch, BatchInfo};
use conveyor_core::registry::{JobContext, JobError, Registry};
use conveyor_core::worker::WorkerReport;
use tokio::sync::Semaphore;

use super::runtime::{config, start};
use super::support::*;
use super::*;

const WORK: &str = "conformance.batch.work";
const FAILS: &str = "conformance.batch.fails";
const GATE: &str = "conformance.batch.gate";
const SPAWN: &str = "conformance.batch.spawn";
const THEN: &str = "conformance.batch.then";
const CATCH: &str = "conformance.batch.catch";
const FINALLY: &str = "conformance.batch.finally";

pub(crate) async fn batch_info(b: &Backend, id: &str) -> BatchInfo {
    batch::find(b.as_ref(), id).await.expect("batch::find").unwrap_or_else(|| panic!("batch {id} is not stored"))
}

/// `(total, pending, processed, failed)` of a batch.
fn counters(i: &BatchInfo) -> (u64, u64, u64, u64) {
    (i.total, i.pending, i.processed, i.failed)
}

/// The `then` / `catch` / `finally` callbacks: each logs its kind and remembers the batch as it
/// was when the callback ran (found through the `batch:<id>` tag the engine puts on callbacks).
#[derive(Clone, Default)]
struct Callbacks {
    log: Log,
    seen: Arc<Mutex<Vec<SeenBatch>>>,
}

/// A callback's kind and the batch as it saw it.
type SeenBatch = (String, Option<BatchInfo>);

impl Callbacks {
    fn register(&self, registry: &mut Registry) {
        for kind in [THEN, CATCH, FINALLY] {
            let this = self.clone();
            registry.register(kind, move |_: Value, ctx: JobContext| {
                let this = this.clone();
                async move {
                    let batch_id = ctx.tags.iter().find_map(|t| t.strip_prefix("batch:")).map(str::to_string);
                    let info = match &batch_id {
                        Some(id) => batch::find(ctx.backend().as_ref(), id).await?,
                        None => None,
                    };
                    this.log.push(ctx.kind.clone());
                    this.seen.lock().unwrap().push((ctx.kind.clone(), info));
                    Ok(())
                }
            });
        }
    }

    fn count(&self, kind: &str) -> usize {
        self.log.count(kind)
    }

    /// The batch as the first run of callback `kind` saw it.
    fn batch_seen_by(&self, kind: &str) -> BatchInfo {
        let seen = self.seen.lock().unwrap();
        let (_, info) = seen.iter().find(|(k, _)| k == kind).unwrap_or_else(|| panic!("{kind} did not run"));
        info.clone().unwrap_or_else(|| panic!("{kind} ran without a batch:<id> tag naming a stored batch"))
    }
}

fn with_callbacks(batch: Batch, queue: &str) -> Batch {
    batch.then(job_of(queue, THEN)).catch(job_of(queue, CATCH)).finally(job_of(queue, FINALLY))
}

pub async fn batch_of_ten_thousand_counts_exactly_and_calls_back_once(b: Backend) {
    const N: usize = 10_000;
    let q = queue_name();
    let runs: Arc<Vec<AtomicU32>> = Arc::new((0..N).map(|_| AtomicU32::new(0)).collect());
    let total = Arc::new(AtomicUsize::new(0));
    let cb = Callbacks::default();
    let mut registry = Registry::new();
    {
        let (runs, total) = (runs.clone(), total.clone());
        registry.register(WORK, move |p: Value, _ctx: JobContext| {
            let n = p["n"].as_u64().unwrap_or(u64::MAX) as usize;
            if let Some(r) = runs.get(n) {
                r.fetch_add(1, SeqCst);
            }
            total.fetch_add(1, SeqCst);
            async { Ok(()) }
        });
    }
    cb.register(&mut registry);
    let cv = conveyor_of(&b, &registry);
    let name = unique_name("batch-big");
    let id = with_callbacks(Batch::new(&name).extend((0..N as u64).map(|n| new_job(&q, WORK, n))), &q)
        .dispatch(&cv)
        .await
        .expect("dispatch the batch");
    let info = batch_info(&b, &id).await;
    assert_eq!(info.name, name);
    assert_eq!(counters(&info), (N as u64, N as u64, 0, 0), "a dispatched batch: {info:?}");
    assert_eq!((info.status.as_str(), info.progress, info.finished_at), ("pending", 0.0, None), "{info:?}");
    assert_counts(&b, &q, [N as u64, 0, 0, 0], "the batch's jobs are enqueued with it").await;

    let w = start(&b, registry, config(&q, 32, Duration::from_secs(5)));
    wait_until("the batch finished and its then and finally callbacks ran", Duration::from_secs(50), || async {
        cb.count(THEN) >= 1 && cb.count(FINALLY) >= 1 && drained(&b, &q).await
    })
    .await;
    let report = w.stop().await;

    let wrong: Vec<(usize, u32)> = runs.iter().enumerate().map(|(n, c)| (n, c.load(SeqCst))).filter(|(_, c)| *c != 1).take(20).collect();
    assert!(wrong.is_empty(), "batch jobs not run exactly once (payload n, runs): {wrong:?}");
    let info = batch_info(&b, &id).await;
    assert_eq!(counters(&info), (N as u64, 0, N as u64, 0), "the finished batch: {info:?}");
    assert_eq!((info.status.as_str(), info.progress), ("finished", 100.0), "{info:?}");
    assert!(info.finished_at.is_some() && info.cancelled_at.is_none(), "{info:?}");
    assert_eq!((cb.count(THEN), cb.count(CATCH), cb.count(FINALLY)), (1, 0, 1), "(then, catch, finally) runs: {:?}", cb.log.all());
    for kind in [THEN, FINALLY] {
        let seen = cb.batch_seen_by(kind);
        assert_eq!(counters(&seen), (N as u64, 0, N as u64, 0), "{kind} ran before every job was accounted for: {seen:?}");
    }
    assert_eq!(report, WorkerReport { completed: N as u64 + 2, retried: 0, failed: 0, released: 0 });
    assert_counts(&b, &q, [0, 0, 0, 0], "after the batch").await;
}

/// Registers the kinds of the failure tests: [`FAILS`] fails for good at once, [`GATE`] waits
/// for a permit of `gate`, [`WORK`] logs and succeeds.
fn failure_kinds(registry: &mut Registry, log: &Log, gate: &Arc<Semaphore>, failed_at: &Arc<Mutex<Option<Instant>>>) {
    {
        let (log, failed_at) = (log.clone(), failed_at.clone());
        registry.register(FAILS, move |_: Value, _ctx: JobContext| {
            log.push(FAILS);
            *failed_at.lock().unwrap() = Some(Instant::now());
            async { Err(JobError::abort("the card was declined")) }
        });
    }
    {
        let (log, gate) = (log.clone(), gate.clone());
        registry.register(GATE, move |_: Value, _ctx: JobContext| {
            log.push(GATE);
            let gate = gate.clone();
            async move {
                let _permit = gate.acquire().await.map_err(|e| JobError::retry(format!("gate closed: {e}")))?;
                Ok(())
            }
        });
    }
    log_ok(registry, WORK, log);
}

/// A batch of one job that fails for good (highest priority, so it runs first), a gate job that,
/// if it starts before the failure is acknowledged, holds the only executor until the test
/// opens it, and `rest` ordinary jobs. Returns the
/// batch id and the worker (jobs on `q` one at a time without prefetch, callbacks on `qcb`).
async fn failing_batch(b: &Backend, registry: Registry, q: &str, qcb: &str, rest: usize) -> (String, super::runtime::Running) {
    let cv = conveyor_of(b, &registry);
    let batch = Batch::new(unique_name("batch-fails"))
        .push(job_of(q, FAILS).priority(10).max_attempts(3))
        .push(job_of(q, GATE).priority(5))
        .extend((0..rest as u64).map(|n| new_job(q, WORK, n)));
    let id = with_callbacks(batch, qcb).dispatch(&cv).await.expect("dispatch the batch");
    let mut cfg = multi_config(&[(q, 1), (qcb, 2)]);
    // One job reserved at a time: the failing job runs first, then the gate, then the rest.
    cfg.supervisors[0].prefetch = 0;
    (id, start(b, registry, cfg))
}

async fn assert_failed_batch_outcome(b: &Backend, id: &str, q: &str, qcb: &str, log: &Log, cb: &Callbacks, rest: usize) {
    let total = rest as u64 + 2;
    assert_eq!(log.count(FAILS), 1, "the failing job runs once (it aborts): {:?}", log.all());
    assert!(log.count(GATE) <= 1, "the gate job runs at most once: {:?}", log.all());
    assert_eq!(log.count(WORK), 0, "jobs of a cancelled batch that had not started were run: {:?}", log.all());
    let info = batch_info(b, id).await;
    assert_eq!(counters(&info), (total, 0, total - 1, 1), "skipped jobs count as processed: {info:?}");
    assert_eq!((info.status.as_str(), info.progress), ("cancelled", 100.0), "{info:?}");
    assert!(info.cancelled_at.is_some() && info.finished_at.is_some(), "{info:?}");
    assert_eq!((cb.count(THEN), cb.count(CATCH), cb.count(FINALLY)), (0, 1, 1), "(then, catch, finally) runs: {:?}", cb.log.all());
    let at_catch = cb.batch_seen_by(CATCH);
    assert!(at_catch.failed == 1 && at_catch.cancelled_at.is_some(), "catch runs after the failure cancelled the batch: {at_catch:?}");
    let at_finally = cb.batch_seen_by(FINALLY);
    assert_eq!(counters(&at_finally), (total, 0, total - 1, 1), "finally runs once every job is accounted for: {at_finally:?}");
    let failed = b.failed(Some(q), Page::default()).await.unwrap();
    assert_eq!(failed.items.len(), 1, "{:?}", failed.items);
    assert_eq!((failed.items[0].kind.as_str(), failed.items[0].attempts), (FAILS, 1));
    assert_eq!(failed.items[0].batch_id.as_deref(), Some(id));
    assert_counts(b, q, [0, 0, 0, 1], "after the batch").await;
    assert_counts(b, qcb, [0, 0, 0, 0], "after the callbacks").await;
}

/// Without `allow_failures`, the first failure cancels the batch: `catch` runs once, the jobs
/// not started are skipped, `finally` runs once when the last is skipped, `then` never. The gate
/// job is held until the cancellation has committed and the worker's cancelled-batch cache
/// (documented in worker.rs as up to a second stale) has expired.
pub async fn batch_failure_cancels_it_and_skips_the_rest(b: Backend) {
    const REST: usize = 8;
    let (q, qcb) = (queue_name(), queue_name());
    let (log, cb) = (Log::default(), Callbacks::default());
    let gate = Arc::new(Semaphore::new(0));
    let failed_at = Arc::new(Mutex::new(None));
    let mut registry = Registry::new();
    failure_kinds(&mut registry, &log, &gate, &failed_at);
    cb.register(&mut registry);
    let (id, w) = failing_batch(&b, registry, &q, &qcb, REST).await;

    wait_until("the failure cancelled the batch and catch ran", Duration::from_secs(10), || async {
        batch_info(&b, &id).await.cancelled_at.is_some() && cb.count(CATCH) == 1
    })
    .await;
    // The gate started unless the cancellation committed before it was due (then it is skipped).
    assert_eq!((log.count(FAILS), log.count(WORK)), (1, 0), "only the failing job and the gate may have started: {:?}", log.all());
    // Not synchronization: the worker may use a cancelled-batch answer up to a second old.
    let failed_at = failed_at.lock().unwrap().expect("the failing job ran");
    tokio::time::sleep_until((failed_at + Duration::from_millis(1_300)).into()).await;
    gate.add_permits(1);
    wait_until("every job is accounted for and finally ran", Duration::from_secs(10), || async {
        batch_info(&b, &id).await.finished_at.is_some() && cb.count(FINALLY) >= 1 && drained(&b, &q).await && drained(&b, &qcb).await
    })
    .await;
    let report = w.stop().await;
    assert_failed_batch_outcome(&b, &id, &q, &qcb, &log, &cb, REST).await;
    assert_eq!(report, WorkerReport { completed: REST as u64 + 1 + 2, retried: 0, failed: 1, released: 0 });
}

/// The same, strictly: a job that starts after the cancellation has committed is skipped, however
/// soon after the failure it starts.
pub async fn batch_cancelled_by_a_failure_runs_no_job_started_after_it(b: Backend) {
    const REST: usize = 4;
    let (q, qcb) = (queue_name(), queue_name());
    let (log, cb) = (Log::default(), Callbacks::default());
    let gate = Arc::new(Semaphore::new(0));
    let failed_at = Arc::new(Mutex::new(None));
    let mut registry = Registry::new();
    failure_kinds(&mut registry, &log, &gate, &failed_at);
    cb.register(&mut registry);
    let (id, w) = failing_batch(&b, registry, &q, &qcb, REST).await;

    wait_until("the failure cancelled the batch and catch ran", Duration::from_secs(10), || async {
        batch_info(&b, &id).await.cancelled_at.is_some() && cb.count(CATCH) == 1
    })
    .await;
    // The gate started unless the cancellation committed before it was due (then it is skipped).
    assert_eq!((log.count(FAILS), log.count(WORK)), (1, 0), "only the failing job and the gate may have started: {:?}", log.all());
    // The cancellation is committed (and visible to any reader): open the gate at once.
    gate.add_permits(1);
    wait_until("every job is accounted for and finally ran", Duration::from_secs(10), || async {
        batch_info(&b, &id).await.finished_at.is_some() && cb.count(FINALLY) >= 1 && drained(&b, &q).await && drained(&b, &qcb).await
    })
    .await;
    w.stop().await;
    assert_failed_batch_outcome(&b, &id, &q, &qcb, &log, &cb, REST).await;
}

pub async fn batch_allowing_failures_runs_every_job_and_counts_failures(b: Backend) {
    const N: u64 = 10;
    const FAILING: [u64; 3] = [2, 5, 7];
    let q = queue_name();
    let (log, cb) = (Log::default(), Callbacks::default());
    let mut registry = Registry::new();
    {
        let log = log.clone();
        registry.register(WORK, move |p: Value, _ctx: JobContext| {
            let n = p["n"].as_u64().unwrap_or(u64::MAX);
            log.push(format!("work:{n}"));
            async move {
                if FAILING.contains(&n) {
                    return Err(JobError::abort(format!("job {n} cannot be done")));
                }
                Ok(())
            }
        });
    }
    cb.register(&mut registry);
    let cv = conveyor_of(&b, &registry);
    let id = with_callbacks(Batch::new(unique_name("batch-allow")).extend((0..N).map(|n| new_job(&q, WORK, n))), &q)
        .allow_failures()
        .dispatch(&cv)
        .await
        .unwrap();
    assert!(batch_info(&b, &id).await.allow_failures);
    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("the batch finished and finally ran", Duration::from_secs(10), || async {
        batch_info(&b, &id).await.finished_at.is_some() && cb.count(FINALLY) >= 1 && drained(&b, &q).await
    })
    .await;
    let report = w.stop().await;

    let mut ran: Vec<String> = log.all();
    ran.sort();
    let mut want: Vec<String> = (0..N).map(|n| format!("work:{n}")).collect();
    want.sort();
    assert_eq!(ran, want, "every job runs exactly once despite the failures");
    let info = batch_info(&b, &id).await;
    assert_eq!(counters(&info), (N, 0, N - 3, 3), "{info:?}");
    assert_eq!((info.status.as_str(), info.progress), ("failed", 100.0), "finished with failures: {info:?}");
    assert!(info.cancelled_at.is_none() && info.finished_at.is_some(), "allow_failures does not cancel: {info:?}");
    assert_eq!((cb.count(THEN), cb.count(CATCH), cb.count(FINALLY)), (0, 1, 1), "(then, catch, finally) runs: {:?}", cb.log.all());
    assert_eq!(counters(&cb.batch_seen_by(FINALLY)), (N, 0, N - 3, 3));
    let failed = b.failed(Some(&q), Page::default()).await.unwrap();
    let mut failed_n: Vec<u64> = failed.items.iter().map(|f| f.payload["n"].as_u64().unwrap()).collect();
    failed_n.sort();
    assert_eq!(failed_n, FAILING, "the failed store holds exactly the failed jobs");
    assert!(failed.items.iter().all(|f| f.batch_id.as_deref() == Some(id.as_str())));
    assert_eq!(report, WorkerReport { completed: N - 3 + 2, retried: 0, failed: 3, released: 0 });
}

pub async fn batch_cancelled_before_it_runs_skips_its_jobs(b: Backend) {
    const N: u64 = 5;
    let q = queue_name();
    let (log, cb) = (Log::default(), Callbacks::default());
    let mut registry = Registry::new();
    log_ok(&mut registry, WORK, &log);
    cb.register(&mut registry);
    let cv = conveyor_of(&b, &registry);
    let id = with_callbacks(Batch::new(unique_name("batch-cancel")).extend((0..N).map(|n| new_job(&q, WORK, n))), &q)
        .dispatch(&cv)
        .await
        .unwrap();
    assert!(batch::cancel(b.as_ref(), &id).await.unwrap(), "cancelling an unfinished batch");
    assert!(!batch::cancel(b.as_ref(), &id).await.unwrap(), "a batch is cancelled once");
    assert!(!batch::cancel(b.as_ref(), &unique_name("no-such-batch")).await.unwrap(), "an unknown batch cannot be cancelled");
    assert!(batch::is_cancelled(b.as_ref(), &id).await.unwrap());
    let info = batch_info(&b, &id).await;
    assert_eq!((info.status.as_str(), counters(&info)), ("cancelled", (N, N, 0, 0)), "{info:?}");
    assert!(info.cancelled_at.is_some() && info.finished_at.is_none());

    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("every job is skipped and finally ran", Duration::from_secs(10), || async {
        batch_info(&b, &id).await.finished_at.is_some() && cb.count(FINALLY) >= 1 && drained(&b, &q).await
    })
    .await;
    let report = w.stop().await;
    assert_eq!(log.count(WORK), 0, "jobs of a cancelled batch ran: {:?}", log.all());
    let info = batch_info(&b, &id).await;
    assert_eq!(counters(&info), (N, 0, N, 0), "{info:?}");
    assert_eq!((info.status.as_str(), info.progress), ("cancelled", 100.0));
    assert_eq!((cb.count(THEN), cb.count(CATCH), cb.count(FINALLY)), (0, 0, 1), "(then, catch, finally) runs: {:?}", cb.log.all());
    assert!(!batch::cancel(b.as_ref(), &id).await.unwrap(), "a finished batch cannot be cancelled");
    assert_eq!(report, WorkerReport { completed: N + 1, retried: 0, failed: 0, released: 0 });
}

pub async fn batch_add_jobs_grows_an_open_batch_only(b: Backend) {
    let q = queue_name();
    let (log, cb) = (Log::default(), Callbacks::default());
    let mut registry = Registry::new();
    log_ok(&mut registry, WORK, &log);
    {
        // A job of the batch adds three more to it while it runs.
        let (log, q) = (log.clone(), q.clone());
        registry.register(SPAWN, move |_: Value, ctx: JobContext| {
            log.push(SPAWN);
            let q = q.clone();
            async move {
                let batch_id = ctx.batch_id.clone().ok_or_else(|| JobError::abort("a batch job without its batch id"))?;
                let more = (100..103).map(|n| new_job(&q, WORK, n)).collect();
                batch::add_jobs(&ctx.conveyor, &batch_id, more).await?;
                Ok(())
            }
        });
    }
    cb.register(&mut registry);
    let cv = conveyor_of(&b, &registry);
    let id = with_callbacks(Batch::new(unique_name("batch-grow")).push(job_of(&q, SPAWN)).extend((0..2).map(|n| new_job(&q, WORK, n))), &q)
        .dispatch(&cv)
        .await
        .unwrap();
    batch::add_jobs(&cv, &id, (10..12).map(|n| new_job(&q, WORK, n)).collect()).await.expect("add jobs to a pending batch");
    let info = batch_info(&b, &id).await;
    assert_eq!((counters(&info), info.status.as_str()), ((5, 5, 0, 0), "pending"), "{info:?}");
    assert_counts(&b, &q, [5, 0, 0, 0], "the added jobs are enqueued").await;
    let err = batch::add_jobs(&cv, &unique_name("no-such-batch"), vec![new_job(&q, WORK, 99)]).await.expect_err("an unknown batch");
    assert!(matches!(err, BackendError::NotFound(_)), "{err:?}");

    // An empty batch stays open until jobs are added.
    let empty = Batch::new(unique_name("batch-empty")).dispatch(&cv).await.unwrap();
    let info = batch_info(&b, &empty).await;
    assert_eq!((counters(&info), info.finished_at), ((0, 0, 0, 0), None), "{info:?}");
    batch::add_jobs(&cv, &empty, vec![new_job(&q, WORK, 50)]).await.expect("add to an empty batch");
    assert_eq!(counters(&batch_info(&b, &empty).await), (1, 1, 0, 0));

    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("both batches finished and finally ran", Duration::from_secs(10), || async {
        batch_info(&b, &id).await.finished_at.is_some()
            && batch_info(&b, &empty).await.finished_at.is_some()
            && cb.count(FINALLY) >= 1
            && cb.count(THEN) >= 1
            && drained(&b, &q).await
    })
    .await;
    let report = w.stop().await;
    let info = batch_info(&b, &id).await;
    assert_eq!((counters(&info), info.status.as_str()), ((8, 0, 8, 0), "finished"), "the three added from inside count too: {info:?}");
    assert_eq!(counters(&batch_info(&b, &empty).await), (1, 0, 1, 0));
    assert_eq!((log.count(SPAWN), log.count(WORK)), (1, 2 + 2 + 3 + 1), "{:?}", log.all());
    assert_eq!((cb.count(THEN), cb.count(CATCH), cb.count(FINALLY)), (1, 0, 1), "(then, catch, finally) runs: {:?}", cb.log.all());
    assert_eq!(counters(&cb.batch_seen_by(FINALLY)), (8, 0, 8, 0), "finally waited for the jobs added while the batch ran");
    assert_eq!(report.completed, 8 + 1 + 2, "{report:?}");

    let err = batch::add_jobs(&cv, &id, vec![new_job(&q, WORK, 200)]).await.expect_err("adding to a finished batch");
    assert!(matches!(err, BackendError::NotFound(_)), "{err:?}");
    assert_eq!(counters(&batch_info(&b, &id).await), (8, 0, 8, 0), "a refused add changes nothing");
    assert_counts(&b, &q, [0, 0, 0, 0], "a refused add enqueues nothing").await;
}

pub async fn batch_list_pages_newest_first(b: Backend) {
    let q = queue_name();
    let cv = conveyor_of(&b, &Registry::new());
    let mut ids = Vec::new();
    for n in 0..3 {
        let id = Batch::new(unique_name(&format!("batch-list-{n}"))).push(new_job(&q, WORK, n)).dispatch(&cv).await.unwrap();
        ids.push(id);
    }
    let listed = batch::list(b.as_ref(), Page::new(1, 50)).await.unwrap();
    assert!(listed.total >= 3, "total {}", listed.total);
    let mine: Vec<&str> = listed.items.iter().filter(|i| ids.contains(&i.id)).map(|i| i.id.as_str()).collect();
    assert_eq!(mine, [ids[2].as_str(), ids[1].as_str(), ids[0].as_str()], "newest first");
    assert!(listed.items.windows(2).all(|w| w[0].created_at >= w[1].created_at), "ordered by creation, newest first");
    let newest = listed.items.iter().find(|i| i.id == ids[2]).unwrap();
    assert_eq!((counters(newest), newest.status.as_str()), ((1, 1, 0, 0), "pending"), "{newest:?}");

    // Pages split one ordering (retried while other tests on a shared server add batches).
    wait_until("pages 1 and 2 of two are the first page of four", Duration::from_secs(5), || async {
        let page = |page, per_page| batch::list(b.as_ref(), Page::new(page, per_page));
        let (p1, p2, p) = (page(1, 2).await.unwrap(), page(2, 2).await.unwrap(), page(1, 4).await.unwrap());
        let ids_of = |items: &[BatchInfo]| items.iter().map(|i| i.id.clone()).collect::<Vec<_>>();
        p1.items.len() == 2 && [ids_of(&p1.items), ids_of(&p2.items)].concat() == ids_of(&p.items)
    })
    .await;
    let past = batch::list(b.as_ref(), Page::new((listed.total + 1_000) as u32, 1)).await.unwrap();
    assert!(past.items.is_empty(), "a page past the end is empty");
}

pub async fn batch_job_extends_its_own_batch_in_its_acknowledgement(b: Backend) {
    // A chain (a sync run's pages): each job adds the next to its own batch in the transaction
    // that acknowledges it, so the batch stays open exactly until the last link is done.
    const LINK: &str = "conformance.batch.link";
    let q = queue_name();
    let cb = Callbacks::default();
    let mut registry = Registry::new();
    {
        let q = q.clone();
        registry.register(LINK, move |p: Value, ctx: JobContext| {
            let q = q.clone();
            async move {
                let n = p["n"].as_u64().unwrap_or(0);
                let batch_id = ctx.batch_id.clone().ok_or_else(|| JobError::abort("a batch job without its batch id"))?;
                let next = (n < 3).then(|| new_job(&q, LINK, n + 1));
                ctx.complete_with(move |tx| match next {
                    Some(job) => batch::add_jobs_in(tx, &batch_id, vec![job]),
                    None => Ok(()),
                })
                .await?;
                Ok(())
            }
        });
    }
    cb.register(&mut registry);
    let cv = conveyor_of(&b, &registry);
    let id = with_callbacks(Batch::new(unique_name("batch-chain")).push(new_job(&q, LINK, 0)), &q).dispatch(&cv).await.unwrap();
    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("the chain finished and finally ran", Duration::from_secs(10), || async {
        batch_info(&b, &id).await.finished_at.is_some() && cb.count(FINALLY) >= 1 && drained(&b, &q).await
    })
    .await;
    let report = w.stop().await;
    let info = batch_info(&b, &id).await;
    assert_eq!((counters(&info), info.status.as_str()), ((4, 0, 4, 0), "finished"), "every link counted: {info:?}");
    assert_eq!(counters(&cb.batch_seen_by(FINALLY)), (4, 0, 4, 0), "finally ran after the last link only");
    assert_eq!((cb.count(THEN), cb.count(FINALLY)), (1, 1));
    assert_eq!(report.failed, 0, "{report:?}");
}
