//! How a workflow moves after its jobs' outcomes, inside the transactions that record them:
//! the next step, compensations in reverse, the on-failure job, declines (business failures).

use super::*;

/// A workflow's state as transitions need it.
struct Instance {
    status: String,
    steps: i64,
    input: Option<String>,
    plan: Arc<Plan>,
}

fn load(tx: &mut dyn Tx, wf: &str) -> Result<Option<Instance>> {
    let rows = tx.query("SELECT status, steps, plan_id, input FROM workflows WHERE id = $1", &[wf.into()])?;
    let Some(r) = rows.first() else { return Ok(None) };
    instance(tx, r.text(0), r.int(1), r.text(2), r.text(3)).map(Some)
}

/// A workflow as read from its row, with its plan (cached by id; read once per process).
fn instance(tx: &mut dyn Tx, status: Option<&str>, steps: i64, plan_id: Option<&str>, input: Option<&str>) -> Result<Instance> {
    let plan_id = plan_id.unwrap_or_default().to_string();
    let cached = plans().lock().unwrap_or_else(|e| e.into_inner()).get(&plan_id).cloned();
    let plan = match cached {
        Some(p) => p,
        None => {
            let rows = tx.query("SELECT plan FROM workflow_plans WHERE id = $1", &[plan_id.clone().into()])?;
            let json = rows.first().and_then(|r| r.text(0)).ok_or_else(|| BackendError::NotFound(format!("workflow plan {plan_id}")))?;
            let (_, plan): (String, Plan) =
                serde_json::from_str(json).map_err(|e| BackendError::Other(format!("stored workflow plan {plan_id}: {e}")))?;
            let plan = Arc::new(plan);
            remember(&plan_id, plan.clone());
            plan
        }
    };
    Ok(Instance { status: status.unwrap_or_default().to_string(), steps, input: input.map(str::to_string), plan })
}

/// Enqueues `job` as timeline row `seq` of workflow `wf` and records the row as queued.
#[allow(clippy::too_many_arguments)]
fn enqueue_row(tx: &mut dyn Tx, wf: &str, input: Option<&str>, seq: i64, name: &str, role: &str, step: i64, job: &NewJob) -> Result<()> {
    let job = step_job(wf, input, seq, job);
    let job_id = job.id.to_string();
    tx.enqueue(vec![job])?;
    tx.defer(
        "INSERT INTO workflow_steps (workflow_id, seq, name, role, step, status, job_id) VALUES ($1, $2, $3, $4, $5, 'queued', $6)",
        &[wf.into(), seq.into(), name.into(), role.into(), step.into(), job_id.into()],
    )?;
    Ok(())
}

fn next_seq(tx: &mut dyn Tx, wf: &str) -> Result<i64> {
    Ok(tx
        .query("SELECT coalesce(max(seq), -1) + 1 FROM workflow_steps WHERE workflow_id = $1", &[wf.into()])?
        .first()
        .map_or(0, |r| r.int(0)))
}

/// Moves a workflow along after one of its jobs' outcomes. Backends call this inside the
/// transaction that records the outcome.
pub fn record_outcome(tx: &mut dyn Tx, c: &Completion) -> Result<()> {
    let Some((wf, seq)) = c.workflow.as_deref().and_then(|w| w.rsplit_once(':')) else { return Ok(()) };
    let Ok(seq) = seq.parse::<i64>() else { return Ok(()) };
    let now = now_ms();
    let (status, error) = match &c.outcome {
        Outcome::Release { .. } => return Ok(()),
        Outcome::Retry { error, .. } => ("queued", Some(error.as_str())),
        Outcome::Completed => ("completed", None),
        Outcome::Failed { error } => ("failed", Some(error.as_str())),
    };
    let started = now - c.runtime_ms as i64;
    let finished = (status != "queued").then_some(now);
    let rows = tx.query(
        "UPDATE workflow_steps SET status = $3, attempts = attempts + 1, error = $4,
                started_at = coalesce(started_at, $5), finished_at = $6
         WHERE workflow_id = $1 AND seq = $2 AND status = 'queued'
         RETURNING role, step, declined",
        &[wf.into(), seq.into(), status.into(), error.into(), started.into(), finished.into()],
    )?;
    let Some(r) = rows.first() else {
        if matches!(c.outcome, Outcome::Retry { .. }) {
            // A retried attempt recorded after the step's next attempt already ended (a queue
            // whose reaper records outcomes after it made the job ready again, under load): it
            // still counts as an attempt, and changes nothing else.
            tx.defer("UPDATE workflow_steps SET attempts = attempts + 1 WHERE workflow_id = $1 AND seq = $2", &[wf.into(), seq.into()])?;
        }
        return Ok(());
    };
    advance(tx, c, wf, seq, r.text(0).unwrap_or_default(), r.int(1), r.text(2))
}

/// [`record_outcome`] for many completions in one transaction: the successes of workflow steps
/// are recorded with one statement, and the workflows that simply go on to their next step are
/// read with one and enqueue it together; anything else (a declined step, a compensation, a
/// rollback, a failure) goes on one by one as in [`record_outcome`].
pub fn record_outcomes(tx: &mut dyn Tx, cs: &[&Completion]) -> Result<()> {
    let mut done: Vec<(&Completion, &str, i64)> = Vec::new();
    for c in cs {
        match c.workflow.as_deref().and_then(|w| w.rsplit_once(':')).and_then(|(wf, seq)| Some((wf, seq.parse::<i64>().ok()?))) {
            Some((wf, seq)) if matches!(c.outcome, Outcome::Completed) => done.push((c, wf, seq)),
            _ => record_outcome(tx, c)?,
        }
    }
    if done.is_empty() {
        return Ok(());
    }
    let now = now_ms();
    let mut params: Vec<SqlValue> = vec![now.into()];
    let mut values = Vec::with_capacity(done.len());
    // Padded (see [`crate::backend::padded`]): a repeated row updates nothing twice.
    let last = done.last().expect("not empty");
    for (c, wf, seq) in done.iter().chain(std::iter::repeat(last)).take(crate::backend::padded(done.len())) {
        let n = params.len();
        values.push(format!("(CAST(${} AS TEXT), CAST(${} AS BIGINT), CAST(${} AS BIGINT))", n + 1, n + 2, n + 3));
        params.extend([(*wf).into(), (*seq).into(), (now - c.runtime_ms as i64).into()]);
    }
    let rows = tx.query(
        &format!(
            "WITH v(v_wf, v_seq, v_started) AS (VALUES {})
             UPDATE workflow_steps SET status = 'completed', attempts = attempts + 1, error = NULL,
                    started_at = coalesce(started_at, v.v_started), finished_at = $1
             FROM v WHERE workflow_id = v.v_wf AND seq = v.v_seq AND status = 'queued'
             RETURNING workflow_id, seq, role, step, declined",
            values.join(", ")
        ),
        &params,
    )?;
    let updated: HashMap<(String, i64), &Row> = rows.iter().map(|r| ((r.text(0).unwrap_or_default().to_string(), r.int(1)), r)).collect();
    // Steps that go on to the next one (or finish the workflow) without a decline.
    let mut simple: Vec<(&str, i64, i64)> = Vec::new();
    for (c, wf, seq) in &done {
        let Some(r) = updated.get(&(wf.to_string(), *seq)) else { continue };
        if r.text(2) == Some("step") && r.text(4).is_none() {
            simple.push((wf, *seq, r.int(3)));
        } else {
            advance(tx, c, wf, *seq, r.text(2).unwrap_or_default(), r.int(3), r.text(4))?;
        }
    }
    if simple.is_empty() {
        return Ok(());
    }
    let (marks, ids) = crate::backend::in_list(1, simple.iter().map(|(wf, _, _)| SqlValue::from(*wf)));
    let found = tx.query(&format!("SELECT id, status, steps, plan_id, input FROM workflows WHERE id IN ({marks})"), &ids)?;
    let mut instances = HashMap::new();
    for r in &found {
        instances.insert(r.text(0).unwrap_or_default().to_string(), instance(tx, r.text(1), r.int(2), r.text(3), r.text(4))?);
    }
    let (mut jobs, mut step_rows, mut finished) = (Vec::new(), Vec::new(), Vec::new());
    for (wf, seq, step) in simple {
        let Some(w) = instances.get(wf) else { continue };
        if w.status != "running" {
            continue;
        }
        if step + 1 < w.steps {
            let next = &w.plan.steps[(step + 1) as usize];
            let job = step_job(wf, w.input.as_deref(), seq + 1, &next.job);
            step_rows.push(vec![
                wf.into(),
                (seq + 1).into(),
                next.name.as_str().into(),
                "step".into(),
                (step + 1).into(),
                "queued".into(),
                job.id.to_string().into(),
            ]);
            jobs.push(job);
        } else {
            finished.push(SqlValue::from(wf));
        }
    }
    if !jobs.is_empty() {
        tx.enqueue(jobs)?;
        crate::backend::insert_many(tx, "INSERT INTO workflow_steps (workflow_id, seq, name, role, step, status, job_id)", &step_rows, "")?;
    }
    if !finished.is_empty() {
        let (marks, ids) = crate::backend::in_list(2, finished);
        let sql = format!("UPDATE workflows SET status = 'completed', finished_at = $1 WHERE id IN ({marks})");
        let mut p = vec![SqlValue::from(now)];
        p.extend(ids);
        tx.defer(&sql, &p)?;
    }
    Ok(())
}

/// What follows the recorded outcome of a timeline row (its role, step and declined reason).
fn advance(tx: &mut dyn Tx, c: &Completion, wf: &str, seq: i64, role: &str, step: i64, declined: Option<&str>) -> Result<()> {
    let now = now_ms();
    let status = match &c.outcome {
        Outcome::Completed => "completed",
        Outcome::Failed { .. } => "failed",
        Outcome::Retry { .. } | Outcome::Release { .. } => return Ok(()),
    };
    let error = match &c.outcome {
        Outcome::Failed { error } => Some(error.as_str()),
        _ => None,
    };
    let role = role.to_string();
    // A business failure (see [`decline_in`]): the job completed — nothing for the failed
    // store — but the workflow fails with the reason and compensates.
    let declined = declined.filter(|_| role == "step" && status == "completed").map(str::to_string);
    let (status, error) = match &declined {
        Some(reason) => {
            tx.defer(
                "UPDATE workflow_steps SET status = 'declined', error = $3 WHERE workflow_id = $1 AND seq = $2",
                &[wf.into(), seq.into(), reason.as_str().into()],
            )?;
            ("failed", Some(reason.as_str()))
        }
        None => (status, error),
    };
    if status == "queued" {
        return Ok(());
    }
    let Some(w) = load(tx, wf)? else { return Ok(()) };
    match (role.as_str(), status) {
        ("step", "completed") => {
            if w.status != "running" {
                return Ok(());
            }
            if step + 1 < w.steps {
                let next = &w.plan.steps[(step + 1) as usize];
                enqueue_row(tx, wf, w.input.as_deref(), seq + 1, &next.name, "step", step + 1, &next.job)?;
            } else {
                tx.defer("UPDATE workflows SET status = 'completed', finished_at = $2 WHERE id = $1", &[wf.into(), now.into()])?;
            }
        }
        ("step", "failed") => {
            tx.defer(
                "UPDATE workflows SET status = 'compensating', error = $2 WHERE id = $1 AND status = 'running'",
                &[wf.into(), error.unwrap_or_default().into()],
            )?;
            compensate_next(tx, wf, &w, step, now)?;
        }
        ("compensation", "completed") => {
            tx.defer(
                "UPDATE workflow_steps SET status = 'compensated' WHERE workflow_id = $1 AND role = 'step' AND step = $2",
                &[wf.into(), step.into()],
            )?;
            compensate_next(tx, wf, &w, step, now)?;
        }
        ("rollback", _) => {
            tx.defer(
                "UPDATE workflows SET status = 'failed', finished_at = $2 WHERE id = $1 AND status = 'compensating'",
                &[wf.into(), now.into()],
            )?;
        }
        ("compensation", "failed") => {
            // A compensation that cannot succeed is recorded; the earlier ones still run.
            tx.defer(
                "UPDATE workflows SET error = coalesce(error, '') || $2 WHERE id = $1",
                &[wf.into(), format!("; compensation of step {step} failed: {}", error.unwrap_or_default()).into()],
            )?;
            compensate_next(tx, wf, &w, step, now)?;
        }
        _ => {}
    }
    Ok(())
}

/// Enqueues the compensation of the latest completed step before `before`, or ends the
/// workflow (through its on-failure job, if it has one) when there is none left.
fn compensate_next(tx: &mut dyn Tx, wf: &str, w: &Instance, before: i64, now: i64) -> Result<()> {
    let done = tx.query(
        "SELECT step FROM workflow_steps WHERE workflow_id = $1 AND role = 'step' AND step < $2 AND status = 'completed' ORDER BY step DESC",
        &[wf.into(), before.into()],
    )?;
    let next = done.iter().map(|r| r.int(0)).find(|s| w.plan.steps.get(*s as usize).is_some_and(|p| p.compensation.is_some()));
    let seq = next_seq(tx, wf)?;
    if let Some(step) = next {
        let s = &w.plan.steps[step as usize];
        // The step itself is marked so a second failure path cannot compensate it twice.
        tx.defer(
            "UPDATE workflow_steps SET status = 'compensating' WHERE workflow_id = $1 AND role = 'step' AND step = $2",
            &[wf.into(), step.into()],
        )?;
        let comp = s.compensation.as_ref().expect("filtered on compensation");
        return enqueue_row(tx, wf, w.input.as_deref(), seq, &format!("compensate {}", s.name), "compensation", step, comp);
    }
    match &w.plan.on_failure {
        Some(r) => enqueue_row(tx, wf, w.input.as_deref(), seq, &r.name, "rollback", seq, &r.job),
        None => {
            tx.defer("UPDATE workflows SET status = 'failed', finished_at = $2 WHERE id = $1", &[wf.into(), now.into()])?;
            Ok(())
        }
    }
}

/// Marks the step that `workflow` (a job's `"<workflow id>:<seq>"`) names as ended in a
/// business failure: when its job's acknowledgement commits in the same transaction, the step
/// shows `declined` with `reason` and the workflow fails with it, running its compensations —
/// without a job in the failed store, which keeps faults only. See `JobContext::decline`.
pub fn decline_in(tx: &mut dyn Tx, workflow: &str, reason: &str) -> Result<()> {
    let Some((wf, seq)) = workflow.rsplit_once(':') else { return Err(BackendError::Invalid(format!("not a workflow step: {workflow}"))) };
    let seq: i64 = seq.parse().map_err(|_| BackendError::Invalid(format!("not a workflow step: {workflow}")))?;
    tx.defer(
        "UPDATE workflow_steps SET declined = $3 WHERE workflow_id = $1 AND seq = $2 AND status = 'queued'",
        &[wf.into(), seq.into(), reason.into()],
    )?;
    Ok(())
}
