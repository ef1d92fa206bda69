//! Set-wise completion ([`Queue::complete_many_with`], [`conveyor_core::setwise`]): one
//! transaction acts for the jobs whose reservations still hold and records their completions,
//! and only theirs; workflow steps completed that way move on (or decline and roll back)
//! exactly as when completed one by one.

use std::any::Any;

use conveyor_core::registry::{JobContext, JobError, Registry};
use conveyor_core::setwise::{Entry, SetWise, Settled};
use conveyor_core::workflow::{self, Workflow};

use super::runtime::{config, start};
use super::support::*;
use super::*;

const KIND: &str = "conformance.setwise";

/// Work that writes note `<note>:<i>` for each held completion `i`.
fn notes_of_held(table: &str, note: &'static str) -> conveyor_core::backend::ManyTxFn {
    let sql = insert_note_sql(table);
    Box::new(move |tx: &mut dyn Tx, held: &[bool]| {
        for (i, h) in held.iter().enumerate() {
            if *h {
                tx.execute(&sql, &[SqlValue::from(format!("{note}:{i}"))])?;
            }
        }
        Ok(Box::new(held.iter().filter(|h| **h).count()) as Box<dyn Any + Send>)
    })
}

pub async fn set_wise_completion_acts_for_held_jobs_only(b: Backend) {
    let q = queue_name();
    let table = table_name();
    create_notes_table(&b, &table).await;
    let ids: Vec<JobId> = {
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(enqueue_one(&b, new_job(&q, KIND, i)).await);
        }
        ids
    };
    let jobs = reserve(&b, &q, 3).await;
    assert_eq!(jobs.len(), 3);
    // The second job's lease is gone: completed already under its token.
    b.complete(vec![completion(&jobs[1], Outcome::Completed)]).await.unwrap();
    let cs: Vec<Completion> = jobs.iter().map(|j| completion(j, Outcome::Completed)).collect();
    let (out, held) = b.complete_many_with(cs.clone(), notes_of_held(&table, "set")).await.expect("complete_many_with");
    assert_eq!(held, vec![true, false, true], "which reservations held");
    assert_eq!(*out.downcast::<usize>().unwrap(), 2, "the work's result comes back");
    assert_eq!((count_notes(&b, &table, "set:0").await, count_notes(&b, &table, "set:1").await), (1, 0));
    assert_eq!(count_notes(&b, &table, "set:2").await, 1);
    for id in &ids {
        assert_eq!(state_of(&b, *id).await, Some(JobState::Completed));
    }
    assert_counts(&b, &q, [0, 0, 0, 0], "after the set").await;

    // Again: nothing holds, nothing is written.
    let (_, held) = b.complete_many_with(cs, notes_of_held(&table, "again")).await.unwrap();
    assert_eq!(held, vec![false, false, false]);
    assert_eq!(count_all_notes(&b, &table).await, 2);

    // The work fails: its writes and every completion roll back; the jobs stay reserved.
    for i in 0..2 {
        enqueue_one(&b, new_job(&q, KIND, 10 + i)).await;
    }
    let jobs = reserve(&b, &q, 2).await;
    let sql = insert_note_sql(&table);
    let err = b
        .complete_many_with(
            jobs.iter().map(|j| completion(j, Outcome::Completed)).collect(),
            Box::new(move |tx: &mut dyn Tx, _: &[bool]| {
                tx.execute(&sql, &[SqlValue::from("partial")])?;
                Err(BackendError::Other("the set's effect failed".into()))
            }),
        )
        .await
        .err();
    assert!(matches!(&err, Some(BackendError::Other(m)) if m == "the set's effect failed"), "{err:?}");
    assert_eq!(count_notes(&b, &table, "partial").await, 0, "the failed work's insert committed");
    for j in &jobs {
        assert_eq!(state_of(&b, j.id).await, Some(JobState::Reserved));
    }
    assert_counts(&b, &q, [0, 0, 2, 0], "a failed set completes nothing").await;
}

const STEP_A: &str = "conformance.setwise.a";
const STEP_B: &str = "conformance.setwise.b";
const ROLLBACK: &str = "conformance.setwise.rollback";

/// A step's set-wise work: note `<step>:<n>` per entry, except that step A declines every
/// fifth workflow (its input `n` divisible by 5) and writes nothing for it; an input of `-1`
/// fails the set (its transaction), so the engine must try its neighbours one by one.
fn step(name: &'static str) -> SetWise<(String, i64)> {
    SetWise::new(64, move |tx: &mut dyn Tx, entries: &mut [Entry<(String, i64)>]| {
        for e in entries.iter_mut() {
            let (table, n) = e.item.clone();
            if n < 0 {
                return Err(BackendError::Invalid("a poisoned item".into()));
            }
            if name == "a" && n % 5 == 0 {
                e.decline(format!("{n} is divisible by 5"));
                continue;
            }
            tx.execute(&insert_note_sql(&table), &[SqlValue::from(format!("{name}:{n}"))])?;
        }
        Ok(())
    })
}

pub async fn set_wise_steps_run_workflows_exactly_once(b: Backend) {
    let q = queue_name();
    let table = table_name();
    create_notes_table(&b, &table).await;
    let log = Log::default();
    let declines = Log::default();
    let mut registry = Registry::new();
    for (kind, set) in [(STEP_A, step("a")), (STEP_B, step("b"))] {
        let declines = declines.clone();
        registry.register(kind, move |input: Value, ctx: JobContext| {
            let (set, declines) = (set.clone(), declines.clone());
            let table = input["table"].as_str().unwrap_or_default().to_string();
            let n = input["n"].as_i64().unwrap_or_default();
            async move {
                match ctx.complete_in(&set, (table, n)).await {
                    Ok(Settled::Completed) | Err(BackendError::LeaseLost(_)) => Ok(()),
                    Ok(Settled::Declined(reason)) => {
                        declines.push(reason);
                        Ok(())
                    }
                    Err(BackendError::Invalid(m)) => Err(JobError::abort(m)),
                    Err(e) => Err(JobError::retry(e)),
                }
            }
        });
    }
    log_ok(&mut registry, ROLLBACK, &log);
    let cv = conveyor_of(&b, &registry);
    let n = 200;
    let mut ids = Vec::new();
    for i in 1..=n {
        let id = Workflow::new(unique_name("setwise"))
            .input(&json!({ "table": table, "n": i }))
            .step("a", job_of(&q, STEP_A))
            .step("b", job_of(&q, STEP_B))
            .on_failure("rollback", job_of(&q, ROLLBACK))
            .start(&cv)
            .await
            .unwrap();
        ids.push((i, id));
    }
    // One poisoned workflow: its step's set fails, and it fails alone.
    let poisoned = Workflow::new(unique_name("setwise-poisoned"))
        .input(&json!({ "table": table, "n": -1 }))
        .step("a", job_of(&q, STEP_A).max_attempts(1))
        .on_failure("rollback", job_of(&q, ROLLBACK))
        .start(&cv)
        .await
        .unwrap();
    let w = start(&b, registry, config(&q, 32, Duration::from_secs(5)));
    wait_until("every workflow ended", Duration::from_secs(60), || async { drained(&b, &q).await }).await;
    w.stop().await;

    let declined = (1..=n).filter(|i| i % 5 == 0).count();
    for (i, id) in &ids {
        let info = workflow::find(b.as_ref(), id).await.unwrap().unwrap();
        let want = if i % 5 == 0 { "failed" } else { "completed" };
        assert_eq!(info.status, want, "workflow {i}: {info:?}");
        let a = count_notes(&b, &table, &format!("a:{i}")).await;
        let bn = count_notes(&b, &table, &format!("b:{i}")).await;
        if i % 5 == 0 {
            assert_eq!((a, bn), (0, 0), "a declined workflow {i} wrote nothing");
            // Each declined workflow carries its own reason (the declines of a set are written
            // together), on its step and on itself, and ended when its rollback ran.
            let reason = format!("{i} is divisible by 5");
            assert!(info.steps.iter().any(|s| s.name == "a" && s.status == "declined" && s.error.as_deref() == Some(&reason)), "{info:?}");
            assert_eq!(info.error.as_deref(), Some(reason.as_str()), "{info:?}");
            assert!(info.finished_at.is_some(), "{info:?}");
        } else {
            assert_eq!((a, bn), (1, 1), "workflow {i}'s steps wrote once each");
        }
    }
    assert_eq!(declines.len(), declined, "each decline reached its handler once");
    let info = workflow::find(b.as_ref(), &poisoned).await.unwrap().unwrap();
    assert_eq!(info.status, "failed", "the poisoned workflow failed: {info:?}");
    assert_eq!(log.count(ROLLBACK), declined + 1, "a rollback per failed workflow, once each");
    assert_eq!(count_all_notes(&b, &table).await, 2 * (n as i64 - declined as i64));
    let failed = b.failed(Some(&q), Page::default()).await.unwrap();
    assert_eq!(failed.items.len(), 1, "only the poisoned step is in the failed store: {:?}", failed.items);
}
