//! Workflows ([`conveyor_core::workflow`]): steps run in order, a step that fails for good runs
//! the compensations of the completed steps in reverse order, exactly once each, and every
//! transition is made by the acknowledgement transaction — so it survives a worker that dies
//! holding a compensation.

use conveyor_core::backend::RowExt;
use conveyor_core::registry::{JobContext, JobError, Registry};
use conveyor_core::worker::WorkerReport;
use conveyor_core::workflow::{self, StepInfo, Workflow, WorkflowInfo};

use super::runtime::{config, start};
use super::support::*;
use super::*;

async fn workflow_info(b: &Backend, id: &str) -> WorkflowInfo {
    workflow::find(b.as_ref(), id).await.expect("workflow::find").unwrap_or_else(|| panic!("workflow {id} is not stored"))
}

/// `(name, role, status, attempts)` of each step row.
fn rows(info: &WorkflowInfo) -> Vec<(&str, &str, &str, u32)> {
    info.steps.iter().map(|s| (s.name.as_str(), s.role.as_str(), s.status.as_str(), s.attempts)).collect()
}

/// Registers `kinds` with handlers that log `<kind>#<attempt>` and succeed.
fn log_attempts(registry: &mut Registry, kinds: &[&str], log: &Log) {
    for kind in kinds {
        let log = log.clone();
        registry.register(kind, move |_: Value, ctx: JobContext| {
            log.push(format!("{}#{}", ctx.kind, ctx.attempt));
            async { Ok(()) }
        });
    }
}

const RESERVE: &str = "conformance.wf.reserve";
const CHARGE: &str = "conformance.wf.charge";
const SHIP: &str = "conformance.wf.ship";
const NOTIFY: &str = "conformance.wf.notify";
const UNDO_RESERVE: &str = "conformance.wf.undo_reserve";
const UNDO_CHARGE: &str = "conformance.wf.undo_charge";
const UNDO_SHIP: &str = "conformance.wf.undo_ship";
const UNDO_NOTIFY: &str = "conformance.wf.undo_notify";

/// Registers `SHIP` to fail every attempt (retryably).
fn ship_always_fails(registry: &mut Registry, log: &Log) {
    let log = log.clone();
    registry.register(SHIP, move |_: Value, ctx: JobContext| {
        log.push(format!("{}#{}", ctx.kind, ctx.attempt));
        async { Err(JobError::retry("the carrier refused the parcel")) }
    });
}

#[track_caller]
fn assert_step(s: &StepInfo, finished: bool) {
    assert!(s.job_id.is_some(), "a step that ran has its job id: {s:?}");
    assert!(s.started_at.is_some(), "{s:?}");
    assert_eq!(s.finished_at.is_some(), finished, "{s:?}");
}

pub async fn workflow_failure_compensates_completed_steps_in_reverse(b: Backend) {
    let q = queue_name();
    let log = Log::default();
    let mut registry = Registry::new();
    log_attempts(&mut registry, &[RESERVE, CHARGE, NOTIFY, UNDO_RESERVE, UNDO_CHARGE, UNDO_SHIP, UNDO_NOTIFY], &log);
    ship_always_fails(&mut registry, &log);
    let cv = conveyor_of(&b, &registry);
    let name = unique_name("order");
    let id = Workflow::new(&name)
        .step("reserve", job_of(&q, RESERVE))
        .compensate(job_of(&q, UNDO_RESERVE))
        .step("charge", job_of(&q, CHARGE))
        .compensate(job_of(&q, UNDO_CHARGE))
        .step("ship", job_of(&q, SHIP).max_attempts(2).backoff(Backoff::fixed(Duration::ZERO)))
        .compensate(job_of(&q, UNDO_SHIP))
        .step("notify", job_of(&q, NOTIFY))
        .compensate(job_of(&q, UNDO_NOTIFY))
        .start(&cv)
        .await
        .expect("start the workflow");
    let info = workflow_info(&b, &id).await;
    assert_eq!((info.name.as_str(), info.status.as_str(), info.finished_at), (name.as_str(), "running", None));
    assert_eq!(
        rows(&info),
        [
            ("reserve", "step", "queued", 0),
            ("charge", "step", "pending", 0),
            ("ship", "step", "pending", 0),
            ("notify", "step", "pending", 0)
        ],
        "only the first step is enqueued at start"
    );
    assert_counts(&b, &q, [1, 0, 0, 0], "the first step's job").await;

    let w = start(&b, registry, config(&q, 4, Duration::from_secs(5)));
    wait_until("the workflow failed and its compensations ran", Duration::from_secs(10), || async {
        workflow_info(&b, &id).await.status == "failed" && drained(&b, &q).await
    })
    .await;
    let report = w.stop().await;

    assert_eq!(
        log.all(),
        [
            format!("{RESERVE}#1"),
            format!("{CHARGE}#1"),
            format!("{SHIP}#1"),
            format!("{SHIP}#2"),
            format!("{UNDO_CHARGE}#1"),
            format!("{UNDO_RESERVE}#1")
        ],
        "steps in order, then the completed steps' compensations in reverse, once each"
    );
    let info = workflow_info(&b, &id).await;
    assert_eq!(info.status, "failed");
    assert!(info.error.as_deref().unwrap_or_default().contains("the carrier refused the parcel"), "{:?}", info.error);
    assert!(info.finished_at.is_some());
    assert_eq!(
        rows(&info),
        [
            ("reserve", "step", "compensated", 1),
            ("charge", "step", "compensated", 1),
            ("ship", "step", "failed", 2),
            ("notify", "step", "pending", 0),
            ("compensate charge", "compensation", "completed", 1),
            ("compensate reserve", "compensation", "completed", 1),
        ],
        "{:#?}",
        info.steps
    );
    for i in [0, 1, 2, 4, 5] {
        assert_step(&info.steps[i], true);
    }
    assert!(info.steps[2].error.as_deref().unwrap_or_default().contains("the carrier refused the parcel"), "{:?}", info.steps[2]);
    assert_eq!((info.steps[3].job_id.as_deref(), info.steps[3].started_at), (None, None), "the step after the failure never ran");
    let ship: JobId = info.steps[2].job_id.as_deref().unwrap().parse().expect("a job id");
    let failed = b.failed_job(ship).await.unwrap().expect("the failed step is in the failed store");
    assert_eq!((failed.attempts, failed.max_attempts), (2, 2));
    assert_eq!(report, WorkerReport { completed: 4, retried: 1, failed: 1, released: 0 });
    assert_counts(&b, &q, [0, 0, 0, 1], "after the workflow").await;
}

pub async fn workflow_runs_steps_in_order_and_completes(b: Backend) {
    let q = queue_name();
    let log = Log::default();
    let tags: Arc<std::sync::Mutex<Vec<Vec<String>>>> = Arc::default();
    let mut registry = Registry::new();
    for kind in [RESERVE, CHARGE, NOTIFY] {
        let (log, tags) = (log.clone(), tags.clone());
        registry.register(kind, move |_: Value, ctx: JobContext| {
            log.push(format!("{}#{}", ctx.kind, ctx.attempt));
            tags.lock().unwrap().push(ctx.tags.clone());
            async { Ok(()) }
        });
    }
    log_attempts(&mut registry, &[UNDO_RESERVE, UNDO_CHARGE, UNDO_NOTIFY], &log);
    let cv = conveyor_of(&b, &registry);
    let id = Workflow::new(unique_name("signup"))
        .step("reserve", job_of(&q, RESERVE))
        .compensate(job_of(&q, UNDO_RESERVE))
        .step("charge", job_of(&q, CHARGE))
        .compensate(job_of(&q, UNDO_CHARGE))
        .step("notify", job_of(&q, NOTIFY))
        .compensate(job_of(&q, UNDO_NOTIFY))
        .start(&cv)
        .await
        .unwrap();
    // Many executors: only the engine's chaining keeps the steps in order.
    let w = start(&b, registry, config(&q, 8, Duration::from_secs(5)));
    wait_until("the workflow completed", Duration::from_secs(10), || async {
        workflow_info(&b, &id).await.status == "completed" && drained(&b, &q).await
    })
    .await;
    let report = w.stop().await;
    assert_eq!(log.all(), [format!("{RESERVE}#1"), format!("{CHARGE}#1"), format!("{NOTIFY}#1")]);
    let info = workflow_info(&b, &id).await;
    assert_eq!((info.status.as_str(), info.error.as_deref()), ("completed", None));
    assert!(info.finished_at.is_some());
    assert_eq!(rows(&info), [("reserve", "step", "completed", 1), ("charge", "step", "completed", 1), ("notify", "step", "completed", 1)]);
    for s in &info.steps {
        assert_step(s, true);
    }
    let tag = format!("workflow:{id}");
    assert!(tags.lock().unwrap().iter().all(|t| t.contains(&tag)), "step jobs carry {tag}: {:?}", tags.lock().unwrap());
    assert_eq!(report, WorkerReport { completed: 3, retried: 0, failed: 0, released: 0 });

    // A workflow needs a step.
    let err = Workflow::new(unique_name("empty")).start(&cv).await.expect_err("an empty workflow");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(workflow::find(b.as_ref(), &unique_name("no-such-workflow")).await.unwrap().is_none());
}

/// A worker dies holding a compensation: its lease lapses, the reaper hands it out again, and
/// the saga goes on — the compensation runs, then the earlier one, each exactly once.
pub async fn workflow_compensation_survives_a_dead_worker(b: Backend) {
    let (q, qc) = (queue_name(), queue_name());
    let log = Log::default();
    let mut registry = Registry::new();
    log_attempts(&mut registry, &[RESERVE, CHARGE, UNDO_RESERVE, UNDO_CHARGE], &log);
    {
        let log = log.clone();
        registry.register(SHIP, move |_: Value, ctx: JobContext| {
            log.push(format!("{}#{}", ctx.kind, ctx.attempt));
            async { Err(JobError::abort("the address does not exist")) }
        });
    }
    let cv = conveyor_of(&b, &registry);
    let id = Workflow::new(unique_name("order"))
        .step("reserve", job_of(&q, RESERVE))
        .compensate(job_of(&qc, UNDO_RESERVE))
        .step("charge", job_of(&q, CHARGE))
        .compensate(job_of(&qc, UNDO_CHARGE))
        .step("ship", job_of(&q, SHIP))
        .start(&cv)
        .await
        .unwrap();

    // The steps run; the compensations' queue is not served yet.
    let steps = start(&b, registry.clone(), config(&q, 2, Duration::from_secs(5)));
    wait_until("the failed step enqueued the first compensation", Duration::from_secs(10), || async {
        workflow_info(&b, &id).await.steps.iter().any(|s| s.role == "compensation")
    })
    .await;
    steps.stop().await;
    let info = workflow_info(&b, &id).await;
    assert_eq!(info.status, "compensating");
    assert_eq!(rows(&info)[3..], [("compensate charge", "compensation", "queued", 0)]);

    // A worker reserves the compensation and dies: nobody acknowledges it.
    let lost = b.reserve(request(&[&qc], 10, Duration::from_millis(300))).await.unwrap();
    assert_eq!(lost.len(), 1, "exactly one compensation is enqueued at a time");
    assert_eq!((lost[0].kind.as_str(), lost[0].attempt), (UNDO_CHARGE, 1));

    let w = start(&b, registry, config(&qc, 2, Duration::from_secs(5)));
    wait_until("the reaped compensation and the earlier one ran", Duration::from_secs(10), || async {
        workflow_info(&b, &id).await.status == "failed" && drained(&b, &qc).await
    })
    .await;
    let report = w.stop().await;
    assert_eq!(
        log.all(),
        [format!("{RESERVE}#1"), format!("{CHARGE}#1"), format!("{SHIP}#1"), format!("{UNDO_CHARGE}#2"), format!("{UNDO_RESERVE}#1")],
        "the abandoned compensation ran again (attempt 2), then the earlier one, once each"
    );
    let info = workflow_info(&b, &id).await;
    assert_eq!(
        rows(&info),
        [
            ("reserve", "step", "compensated", 1),
            ("charge", "step", "compensated", 1),
            ("ship", "step", "failed", 1),
            ("compensate charge", "compensation", "completed", 2),
            ("compensate reserve", "compensation", "completed", 1),
        ],
        "{:#?}",
        info.steps
    );
    assert_eq!((report.completed, report.failed), (2, 0), "{report:?}");
    assert_counts(&b, &qc, [0, 0, 0, 0], "after the compensations").await;
}

/// Workflows cloned from one definition share one stored plan; each hands its own input to
/// every one of its jobs, compensations and on-failure job included.
pub async fn workflow_definition_is_shared_and_input_reaches_every_job(b: Backend) {
    let q = queue_name();
    let seen: Arc<std::sync::Mutex<Vec<(String, Value)>>> = Arc::default();
    let mut registry = Registry::new();
    for kind in [RESERVE, CHARGE, UNDO_RESERVE, NOTIFY] {
        let seen = seen.clone();
        registry.register(kind, move |v: Value, ctx: JobContext| {
            seen.lock().unwrap().push((ctx.kind.clone(), v.clone()));
            let fail = ctx.kind == CHARGE && v["n"] == 2;
            async move {
                if fail {
                    Err(JobError::abort("declined"))
                } else {
                    Ok(())
                }
            }
        });
    }
    let cv = conveyor_of(&b, &registry);
    let def = Workflow::new(unique_name("shared"))
        .step("reserve", job_of(&q, RESERVE))
        .compensate(job_of(&q, UNDO_RESERVE))
        .step("charge", job_of(&q, CHARGE))
        .on_failure("notify", job_of(&q, NOTIFY));
    let one = def.clone().input(&serde_json::json!({ "n": 1 })).start(&cv).await.unwrap();
    let two = def.clone().input(&serde_json::json!({ "n": 2 })).start(&cv).await.unwrap();
    let plans = b
        .query("SELECT count(DISTINCT plan_id) FROM workflows WHERE id = $1 OR id = $2", vec![one.clone().into(), two.clone().into()])
        .await
        .unwrap();
    assert_eq!(plans[0].int(0), 1, "both workflows use one stored plan");

    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("both workflows settled", Duration::from_secs(10), || async {
        workflow_info(&b, &one).await.status == "completed" && workflow_info(&b, &two).await.status == "failed" && drained(&b, &q).await
    })
    .await;
    w.stop().await;
    let mut seen = seen.lock().unwrap().clone();
    seen.sort_by(|a, b| (a.1["n"].as_i64(), &a.0).cmp(&(b.1["n"].as_i64(), &b.0)));
    let n = |v: i64| serde_json::json!({ "n": v });
    let mut want = vec![
        (RESERVE.to_string(), n(1)),
        (CHARGE.to_string(), n(1)),
        (RESERVE.to_string(), n(2)),
        (CHARGE.to_string(), n(2)),
        (UNDO_RESERVE.to_string(), n(2)),
        (NOTIFY.to_string(), n(2)),
    ];
    want.sort_by(|a, b| (a.1["n"].as_i64(), &a.0).cmp(&(b.1["n"].as_i64(), &b.0)));
    assert_eq!(seen, want, "each job ran once with its workflow's input");
    assert_eq!(
        rows(&workflow_info(&b, &two).await),
        [
            ("reserve", "step", "compensated", 1),
            ("charge", "step", "failed", 1),
            ("compensate reserve", "compensation", "completed", 1),
            ("notify", "rollback", "completed", 1)
        ]
    );
}

/// A step that ends in a business failure (`JobContext::decline`): its job completes (the
/// failed store keeps faults only), the workflow fails with the reason and compensates, and its
/// on-failure job runs.
pub async fn a_declined_step_fails_its_workflow_without_a_fault(b: Backend) {
    let q = queue_name();
    let mut registry = Registry::new();
    for kind in [RESERVE, UNDO_RESERVE, NOTIFY] {
        registry.register(kind, |_: Value, _ctx: JobContext| async { Ok(()) });
    }
    registry.register(CHARGE, |_: Value, ctx: JobContext| async move {
        ctx.decline("card declined", |_| Ok(())).await.map_err(JobError::retry)
    });
    let cv = conveyor_of(&b, &registry);
    let id = Workflow::new(unique_name("declines"))
        .step("reserve", job_of(&q, RESERVE))
        .compensate(job_of(&q, UNDO_RESERVE))
        .step("charge", job_of(&q, CHARGE))
        .on_failure("notify", job_of(&q, NOTIFY))
        .start(&cv)
        .await
        .unwrap();
    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("the workflow settled", Duration::from_secs(10), || async {
        workflow_info(&b, &id).await.status == "failed" && drained(&b, &q).await
    })
    .await;
    let report = w.stop().await;
    let info = workflow_info(&b, &id).await;
    assert_eq!(info.error.as_deref(), Some("card declined"), "{info:?}");
    assert_eq!(
        rows(&info),
        [
            ("reserve", "step", "compensated", 1),
            ("charge", "step", "declined", 1),
            ("compensate reserve", "compensation", "completed", 1),
            ("notify", "rollback", "completed", 1)
        ]
    );
    assert_eq!(report.failed, 0, "a decline is not a failure: {report:?}");
    assert!(b.failed(Some(&q), Page::default()).await.unwrap().items.is_empty(), "nothing in the failed store");
    assert_counts(&b, &q, [0, 0, 0, 0], "after the workflow").await;
}
