//! Workflows: ordered steps (a chain) where each step is a job that runs when the previous one
//! succeeded, each with an optional compensation job. When a step fails for good, the
//! compensations of the steps that completed run in reverse order, one after another (a saga).
//!
//! Every transition happens in the acknowledgement transaction of the job that caused it
//! ([`record_outcome`], called by the relational backends): the next step or compensation is
//! enqueued in the same commit as the outcome, so a crash between steps neither loses nor
//! repeats a transition. Step rows record status, attempts and timings for the timeline.
//!
//! A step job carries `workflow = "<workflow id>:<row seq>"`.

use serde::Serialize;

use crate::backend::{BackendError, QueueBackend, QueueBackendExt, Result, Row, RowExt, Tx};
use crate::clock::now_ms;
use crate::job::{Completion, JobId, NewJob, Outcome};
use crate::Conveyor;

#[derive(Clone, Debug)]
pub struct Workflow {
    name: String,
    id: Option<String>,
    steps: Vec<(String, NewJob, Option<NewJob>)>,
    on_failure: Option<(String, NewJob)>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WorkflowInfo {
    pub id: String,
    pub name: String,
    /// `running`, `completed`, `compensating` or `failed` (failed and rolled back).
    pub status: String,
    pub error: Option<String>,
    pub created_at: i64,
    pub finished_at: Option<i64>,
    /// Steps in order, then the compensations in the order they ran.
    pub steps: Vec<StepInfo>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct StepInfo {
    pub name: String,
    /// `step` or `compensation`.
    pub role: String,
    /// `pending`, `queued`, `completed`, `failed`, or `compensated` (a completed step undone).
    pub status: String,
    pub attempts: u32,
    pub job_id: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
}

impl Workflow {
    pub fn new(name: impl Into<String>) -> Self {
        Workflow { name: name.into(), id: None, steps: Vec::new(), on_failure: None }
    }

    /// Uses `id` instead of a generated one (e.g. derived from the entity the workflow works
    /// on, so the caller can store it with that entity in the same statement). It must be
    /// unique among workflows.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Appends a step; `job` runs after the previous step succeeded.
    pub fn step(mut self, name: impl Into<String>, job: NewJob) -> Self {
        self.steps.push((name.into(), job, None));
        self
    }

    /// The compensation of the last step added: it undoes that step if a later one fails.
    pub fn compensate(mut self, job: NewJob) -> Self {
        if let Some(last) = self.steps.last_mut() {
            last.2 = Some(job);
        }
        self
    }

    /// A job that runs once when the workflow has failed, after the compensations (a single
    /// rollback step, for workflows that undo everything in one place). It shows on the
    /// timeline under `name`, with role `rollback`.
    pub fn on_failure(mut self, name: impl Into<String>, job: NewJob) -> Self {
        self.on_failure = Some((name.into(), job));
        self
    }

    /// Stores the workflow and enqueues its first step in one transaction; returns its id.
    pub async fn start(self, conveyor: &Conveyor) -> Result<String> {
        conveyor.backend().transact(move |tx| self.start_in(tx)).await
    }

    /// The same inside the caller's transaction (e.g. with the rows the workflow works on).
    pub fn start_in(self, tx: &mut dyn Tx) -> Result<String> {
        if self.steps.is_empty() {
            return Err(BackendError::Invalid("a workflow needs at least one step".into()));
        }
        if let Some((_, job)) = &self.on_failure {
            job.validate().map_err(BackendError::Invalid)?;
        }
        for (_, job, comp) in &self.steps {
            job.validate().map_err(BackendError::Invalid)?;
            if let Some(c) = comp {
                c.validate().map_err(BackendError::Invalid)?;
            }
        }
        let id = self.id.unwrap_or_else(|| JobId::new().to_string());
        let now = now_ms();
        let on_failure = self.on_failure.map(|(name, job)| serde_json::json!({ "name": name, "job": job }).to_string());
        tx.execute(
            "INSERT INTO workflows (id, name, status, steps, on_failure, created_at) VALUES ($1, $2, 'running', $3, $4, $5)",
            &[id.clone().into(), self.name.into(), (self.steps.len() as i64).into(), on_failure.into(), now.into()],
        )?;
        let mut first = None;
        for (i, (name, job, comp)) in self.steps.into_iter().enumerate() {
            let comp = comp.map(|c| serde_json::to_string(&c).expect("a job serializes"));
            let template = serde_json::to_string(&job).expect("a job serializes");
            // The first step is enqueued right here from memory, its row born `queued`.
            let (status, job_id) = if i == 0 {
                let mut job = job;
                job.id = JobId::new();
                job.workflow = Some(format!("{id}:0"));
                let job_id = job.id.to_string();
                first = Some(job.tag(format!("workflow:{id}")));
                ("queued", Some(job_id))
            } else {
                ("pending", None)
            };
            tx.execute(
                "INSERT INTO workflow_steps (workflow_id, seq, name, role, step, job, compensation, status, job_id)
                 VALUES ($1, $2, $3, 'step', $2, $4, $5, $6, $7)",
                &[id.clone().into(), (i as i64).into(), name.into(), template.into(), comp.into(), status.into(), job_id.into()],
            )?;
        }
        tx.enqueue(first.into_iter().collect())?;
        Ok(id)
    }
}

/// Enqueues the job of step row `seq` and marks it queued.
fn enqueue_row(tx: &mut dyn Tx, workflow_id: &str, seq: i64) -> Result<()> {
    let rows = tx.query("SELECT job FROM workflow_steps WHERE workflow_id = $1 AND seq = $2", &[workflow_id.into(), seq.into()])?;
    let template =
        rows.first().and_then(|r| r.text(0)).ok_or_else(|| BackendError::NotFound(format!("workflow {workflow_id} step {seq}")))?;
    let mut job: NewJob = serde_json::from_str(template).map_err(|e| BackendError::Other(format!("stored workflow step: {e}")))?;
    job.id = JobId::new();
    job.workflow = Some(format!("{workflow_id}:{seq}"));
    let job_id = job.id.to_string();
    tx.enqueue(vec![job.tag(format!("workflow:{workflow_id}"))])?;
    tx.execute(
        "UPDATE workflow_steps SET status = 'queued', job_id = $3 WHERE workflow_id = $1 AND seq = $2",
        &[workflow_id.into(), seq.into(), job_id.into()],
    )?;
    Ok(())
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
         RETURNING role, step",
        &[wf.into(), seq.into(), status.into(), error.into(), started.into(), finished.into()],
    )?;
    let Some(r) = rows.first() else { return Ok(()) };
    let (role, step) = (r.text(0).unwrap_or_default().to_string(), r.int(1));
    match (role.as_str(), status) {
        ("step", "completed") => {
            let total = tx.query("SELECT steps FROM workflows WHERE id = $1 AND status = 'running'", &[wf.into()])?;
            let Some(total) = total.first().map(|r| r.int(0)) else { return Ok(()) };
            if step + 1 < total {
                enqueue_row(tx, wf, step + 1)?;
            } else {
                tx.execute("UPDATE workflows SET status = 'completed', finished_at = $2 WHERE id = $1", &[wf.into(), now.into()])?;
            }
        }
        ("step", "failed") => {
            tx.execute(
                "UPDATE workflows SET status = 'compensating', error = $2 WHERE id = $1 AND status = 'running'",
                &[wf.into(), error.unwrap_or_default().into()],
            )?;
            compensate_next(tx, wf, step, now)?;
        }
        ("compensation", "completed") => {
            tx.execute("UPDATE workflow_steps SET status = 'compensated' WHERE workflow_id = $1 AND seq = $2", &[wf.into(), step.into()])?;
            compensate_next(tx, wf, step, now)?;
        }
        ("rollback", "completed") | ("rollback", "failed") => {
            tx.execute(
                "UPDATE workflows SET status = 'failed', finished_at = $2 WHERE id = $1 AND status = 'compensating'",
                &[wf.into(), now.into()],
            )?;
        }
        ("compensation", "failed") => {
            // A compensation that cannot succeed is recorded; the earlier ones still run.
            tx.execute(
                "UPDATE workflows SET error = coalesce(error, '') || $2 WHERE id = $1",
                &[wf.into(), format!("; compensation of step {step} failed: {}", error.unwrap_or_default()).into()],
            )?;
            compensate_next(tx, wf, step, now)?;
        }
        _ => {}
    }
    Ok(())
}

/// Enqueues the compensation of the latest completed step before `before`, or ends the
/// workflow as failed when there is none left.
fn compensate_next(tx: &mut dyn Tx, wf: &str, before: i64, now: i64) -> Result<()> {
    let rows = tx.query(
        "SELECT step, name, compensation FROM workflow_steps
         WHERE workflow_id = $1 AND role = 'step' AND step < $2 AND status = 'completed' AND compensation IS NOT NULL
         ORDER BY step DESC LIMIT 1",
        &[wf.into(), before.into()],
    )?;
    let Some(r) = rows.first() else { return rollback_or_fail(tx, wf, now) };
    let (step, name, comp) = (r.int(0), r.text(1).unwrap_or_default().to_string(), r.text(2).unwrap_or_default().to_string());
    let seq = tx.query("SELECT count(*) FROM workflow_steps WHERE workflow_id = $1", &[wf.into()])?.first().map_or(0, |r| r.int(0));
    tx.execute(
        "INSERT INTO workflow_steps (workflow_id, seq, name, role, step, job, status)
         VALUES ($1, $2, $3, 'compensation', $4, $5, 'pending')",
        &[wf.into(), seq.into(), format!("compensate {name}").into(), step.into(), comp.into()],
    )?;
    // The step itself is marked so a second failure path cannot compensate it twice.
    tx.execute(
        "UPDATE workflow_steps SET status = 'compensating' WHERE workflow_id = $1 AND role = 'step' AND step = $2",
        &[wf.into(), step.into()],
    )?;
    enqueue_row(tx, wf, seq)
}

/// After the last compensation: the workflow's on-failure job if it has one, else the end.
fn rollback_or_fail(tx: &mut dyn Tx, wf: &str, now: i64) -> Result<()> {
    let rows = tx.query("SELECT on_failure FROM workflows WHERE id = $1", &[wf.into()])?;
    let spec: Option<serde_json::Value> = rows.first().and_then(|r| r.text(0)).and_then(|t| serde_json::from_str(t).ok());
    let Some(spec) = spec else {
        tx.execute("UPDATE workflows SET status = 'failed', finished_at = $2 WHERE id = $1", &[wf.into(), now.into()])?;
        return Ok(());
    };
    let seq = tx.query("SELECT count(*) FROM workflow_steps WHERE workflow_id = $1", &[wf.into()])?.first().map_or(0, |r| r.int(0));
    tx.execute(
        "INSERT INTO workflow_steps (workflow_id, seq, name, role, step, job, status) VALUES ($1, $2, $3, 'rollback', $2, $4, 'pending')",
        &[wf.into(), seq.into(), spec["name"].as_str().unwrap_or("rollback").into(), spec["job"].to_string().into()],
    )?;
    enqueue_row(tx, wf, seq)
}

fn step_info(r: &Row) -> StepInfo {
    StepInfo {
        name: r.text(0).unwrap_or_default().to_string(),
        role: r.text(1).unwrap_or_default().to_string(),
        status: r.text(2).unwrap_or_default().to_string(),
        attempts: r.int(3).max(0) as u32,
        job_id: r.text(4).map(str::to_string),
        started_at: r.opt_int(5),
        finished_at: r.opt_int(6),
        error: r.text(7).map(str::to_string),
    }
}

pub async fn find(backend: &dyn QueueBackend, id: &str) -> Result<Option<WorkflowInfo>> {
    let rows =
        backend.query("SELECT id, name, status, error, created_at, finished_at FROM workflows WHERE id = $1", vec![id.into()]).await?;
    let Some(w) = rows.first() else { return Ok(None) };
    let steps = backend
        .query(
            "SELECT name, role, status, attempts, job_id, started_at, finished_at, error FROM workflow_steps
             WHERE workflow_id = $1 ORDER BY seq",
            vec![id.into()],
        )
        .await?;
    Ok(Some(WorkflowInfo {
        id: w.text(0).unwrap_or_default().to_string(),
        name: w.text(1).unwrap_or_default().to_string(),
        status: w.text(2).unwrap_or_default().to_string(),
        error: w.text(3).map(str::to_string),
        created_at: w.int(4),
        finished_at: w.opt_int(5),
        steps: steps.iter().map(step_info).collect(),
    }))
}
