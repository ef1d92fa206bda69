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

/// What the transitions of one transaction enqueue and end, sent together once they are all
/// decided: the jobs with one `enqueue`, their timeline rows with one insert.
#[derive(Default)]
struct Effects {
    jobs: Vec<NewJob>,
    rows: Vec<Vec<SqlValue>>,
    /// Workflows whose last step completed.
    completed: Vec<SqlValue>,
}

impl Effects {
    /// Enqueues `job` as timeline row `seq` of workflow `wf`, its row recorded as queued.
    #[allow(clippy::too_many_arguments)]
    fn enqueue_row(&mut self, wf: &str, input: Option<&str>, seq: i64, name: &str, role: &str, step: i64, job: &NewJob) {
        let job = step_job(wf, input, seq, job);
        self.rows.push(vec![wf.into(), seq.into(), name.into(), role.into(), step.into(), "queued".into(), job.id.to_string().into()]);
        self.jobs.push(job);
    }

    fn send(self, tx: &mut dyn Tx, now: i64) -> Result<()> {
        if !self.jobs.is_empty() {
            tx.enqueue(self.jobs)?;
            insert_many(tx, "INSERT INTO workflow_steps (workflow_id, seq, name, role, step, status, job_id)", &self.rows, "")?;
        }
        if !self.completed.is_empty() {
            let (marks, ids) = crate::backend::in_list(2, self.completed);
            let mut p = vec![SqlValue::from(now)];
            p.extend(ids);
            tx.defer(&format!("UPDATE workflows SET status = 'completed', finished_at = $1 WHERE id IN ({marks})"), &p)?;
        }
        Ok(())
    }
}

/// What a compensation needs of a workflow's timeline: its completed steps, and the next free
/// row number.
#[derive(Default)]
struct Timeline {
    completed: Vec<i64>,
    next_seq: i64,
}

/// The timelines of `wfs`, read with one statement.
fn timelines(tx: &mut dyn Tx, wfs: Vec<SqlValue>) -> Result<HashMap<String, Timeline>> {
    let mut out: HashMap<String, Timeline> = HashMap::new();
    if wfs.is_empty() {
        return Ok(out);
    }
    let (marks, ids) = crate::backend::in_list(1, wfs);
    for r in tx.query(&format!("SELECT workflow_id, role, step, status, seq FROM workflow_steps WHERE workflow_id IN ({marks})"), &ids)? {
        let t = out.entry(r.text(0).unwrap_or_default().to_string()).or_default();
        if r.text(1) == Some("step") && r.text(3) == Some("completed") {
            t.completed.push(r.int(2));
        }
        t.next_seq = t.next_seq.max(r.int(4) + 1);
    }
    Ok(out)
}

/// The workflows of `wfs` as transitions need them, read with one statement.
fn instances(tx: &mut dyn Tx, wfs: Vec<SqlValue>) -> Result<HashMap<String, Instance>> {
    let mut out = HashMap::new();
    if wfs.is_empty() {
        return Ok(out);
    }
    let (marks, ids) = crate::backend::in_list(1, wfs);
    for r in tx.query(&format!("SELECT id, status, steps, plan_id, input FROM workflows WHERE id IN ({marks})"), &ids)? {
        out.insert(r.text(0).unwrap_or_default().to_string(), instance(tx, r.text(1), r.int(2), r.text(3), r.text(4))?);
    }
    Ok(out)
}

/// A timeline row whose outcome was recorded: what moves its workflow on.
struct Recorded<'a> {
    c: &'a Completion,
    wf: String,
    seq: i64,
    role: String,
    step: i64,
    declined: Option<String>,
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
    let recorded = Recorded {
        c,
        wf: wf.to_string(),
        seq,
        role: r.text(0).unwrap_or_default().to_string(),
        step: r.int(1),
        declined: r.text(2).map(str::to_string),
    };
    advance(tx, vec![recorded], now)
}

/// [`record_outcome`] for many completions in one transaction: the successes of workflow steps
/// are recorded with one statement, the workflows and timelines they need are read with one
/// each, and what they enqueue goes in together. Other outcomes go one by one.
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
    let recorded = done
        .iter()
        .filter_map(|(c, wf, seq)| {
            let r = updated.get(&(wf.to_string(), *seq))?;
            Some(Recorded {
                c,
                wf: wf.to_string(),
                seq: *seq,
                role: r.text(2).unwrap_or_default().to_string(),
                step: r.int(3),
                declined: r.text(4).map(str::to_string),
            })
        })
        .collect();
    advance(tx, recorded, now)
}

/// What follows the recorded outcomes: each workflow's next step, compensation, rollback job
/// or end. The workflows and the timelines that compensations need are read with one
/// statement each, and what they enqueue goes in together.
fn advance(tx: &mut dyn Tx, recorded: Vec<Recorded<'_>>, now: i64) -> Result<()> {
    // (role, status after the decline) of each, and whether it leads to a compensation.
    let mut moves = Vec::with_capacity(recorded.len());
    for r in &recorded {
        let (status, error) = match &r.c.outcome {
            Outcome::Completed => ("completed", None),
            Outcome::Failed { error } => ("failed", Some(error.clone())),
            Outcome::Retry { .. } | Outcome::Release { .. } => continue,
        };
        // A business failure (see [`decline_in`]): the job completed — nothing for the failed
        // store — but the workflow fails with the reason and compensates.
        let (status, error) = match r.declined.as_ref().filter(|_| r.role == "step" && status == "completed") {
            Some(reason) => {
                tx.defer(
                    "UPDATE workflow_steps SET status = 'declined', error = $3 WHERE workflow_id = $1 AND seq = $2",
                    &[r.wf.as_str().into(), r.seq.into(), reason.as_str().into()],
                )?;
                ("failed", Some(reason.clone()))
            }
            None => (status, error),
        };
        moves.push((r, status, error));
    }
    let compensates = |role: &str, status: &str| matches!((role, status), ("step", "failed") | ("compensation", _));
    let wfs: Vec<SqlValue> = moves.iter().map(|(r, _, _)| SqlValue::from(r.wf.as_str())).collect();
    let wfs_compensating: Vec<SqlValue> =
        moves.iter().filter(|(r, s, _)| compensates(&r.role, s)).map(|(r, _, _)| SqlValue::from(r.wf.as_str())).collect();
    let workflows = instances(tx, wfs)?;
    let mut timelines = timelines(tx, wfs_compensating)?;
    let mut fx = Effects::default();
    for (r, status, error) in moves {
        let Some(w) = workflows.get(&r.wf) else { continue };
        let (wf, step) = (r.wf.as_str(), r.step);
        let error = error.unwrap_or_default();
        match (r.role.as_str(), status) {
            ("step", "completed") => {
                if w.status != "running" {
                    continue;
                }
                if step + 1 < w.steps {
                    let next = &w.plan.steps[(step + 1) as usize];
                    fx.enqueue_row(wf, w.input.as_deref(), r.seq + 1, &next.name, "step", step + 1, &next.job);
                } else {
                    fx.completed.push(wf.into());
                }
            }
            ("step", "failed") => {
                tx.defer(
                    "UPDATE workflows SET status = 'compensating', error = $2 WHERE id = $1 AND status = 'running'",
                    &[wf.into(), error.into()],
                )?;
                compensate_next(tx, wf, w, timelines.entry(r.wf.clone()).or_default(), step, now, &mut fx)?;
            }
            ("compensation", "completed") => {
                tx.defer(
                    "UPDATE workflow_steps SET status = 'compensated' WHERE workflow_id = $1 AND role = 'step' AND step = $2",
                    &[wf.into(), step.into()],
                )?;
                compensate_next(tx, wf, w, timelines.entry(r.wf.clone()).or_default(), step, now, &mut fx)?;
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
                    &[wf.into(), format!("; compensation of step {step} failed: {error}").into()],
                )?;
                compensate_next(tx, wf, w, timelines.entry(r.wf.clone()).or_default(), step, now, &mut fx)?;
            }
            _ => {}
        }
    }
    fx.send(tx, now)
}

/// Enqueues the compensation of the latest completed step before `before`, or ends the
/// workflow (through its on-failure job, if it has one) when there is none left.
fn compensate_next(tx: &mut dyn Tx, wf: &str, w: &Instance, tl: &mut Timeline, before: i64, now: i64, fx: &mut Effects) -> Result<()> {
    let mut done: Vec<i64> = tl.completed.iter().copied().filter(|s| *s < before).collect();
    done.sort_unstable_by(|a, b| b.cmp(a));
    let next = done.into_iter().find(|s| w.plan.steps.get(*s as usize).is_some_and(|p| p.compensation.is_some()));
    let seq = tl.next_seq;
    tl.next_seq += 1;
    if let Some(step) = next {
        let s = &w.plan.steps[step as usize];
        // The step itself is marked so a second failure path cannot compensate it twice.
        tx.defer(
            "UPDATE workflow_steps SET status = 'compensating' WHERE workflow_id = $1 AND role = 'step' AND step = $2",
            &[wf.into(), step.into()],
        )?;
        tl.completed.retain(|s| *s != step);
        let comp = s.compensation.as_ref().expect("filtered on compensation");
        fx.enqueue_row(wf, w.input.as_deref(), seq, &format!("compensate {}", s.name), "compensation", step, comp);
        return Ok(());
    }
    match &w.plan.on_failure {
        Some(r) => fx.enqueue_row(wf, w.input.as_deref(), seq, &r.name, "rollback", seq, &r.job),
        None => {
            tx.defer("UPDATE workflows SET status = 'failed', finished_at = $2 WHERE id = $1", &[wf.into(), now.into()])?;
        }
    }
    Ok(())
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
