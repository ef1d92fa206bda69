//! Workflows: ordered steps (a chain) where each step is a job that runs when the previous one
//! succeeded, each with an optional compensation job. When a step fails for good, the
//! compensations of the steps that completed run in reverse order, one after another (a saga).
//!
//! Every transition happens in the acknowledgement transaction of the job that caused it
//! ([`record_outcome`], called by the relational backends): the next step or compensation is
//! enqueued in the same commit as the outcome, so a crash between steps neither loses nor
//! repeats a transition.
//!
//! Storage is lean because a workflow is started per entity (an order, a signup) on hot paths:
//! - the *plan* (step names, job templates, compensations, on-failure job) is stored once in
//!   `workflow_plans`, keyed by a hash of its content, and shared by every workflow built from
//!   the same definition; a workflow given an [`Workflow::input`] hands that payload to every
//!   one of its jobs, so its plan holds no per-instance data;
//! - a workflow is one `workflows` row (plan id, input, status);
//! - a `workflow_steps` row is written when a step, compensation or rollback job is enqueued,
//!   and carries its status, attempts and timings for the timeline. Steps not reached yet are
//!   shown as `pending` from the plan.
//!
//! A step job carries `workflow = "<workflow id>:<row seq>"`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::backend::{insert_many, BackendError, QueueBackend, QueueBackendExt, Result, Row, RowExt, SqlValue, Tx};
use crate::clock::now_ms;
use crate::job::{Completion, JobId, NewJob, Outcome};
use crate::Conveyor;

mod outcome;
pub use outcome::{decline_in, record_outcome, record_outcomes};

/// What every workflow built from one definition shares.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Plan {
    steps: Vec<PlanStep>,
    on_failure: Option<PlanStep>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct PlanStep {
    name: String,
    job: NewJob,
    compensation: Option<NewJob>,
}

/// A plan, serialized and hashed once.
#[derive(Debug)]
struct Stored {
    id: String,
    json: String,
}

#[derive(Clone, Debug)]
pub struct Workflow {
    name: String,
    id: Option<String>,
    input: Option<String>,
    plan: Plan,
    /// Filled by the first start; any change to the plan makes a new one.
    stored: Arc<OnceLock<std::result::Result<Arc<Stored>, String>>>,
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
    /// `step`, `compensation` or `rollback`.
    pub role: String,
    /// `pending`, `queued`, `completed`, `failed`, or `compensated` (a completed step undone).
    pub status: String,
    pub attempts: u32,
    pub job_id: Option<String>,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub error: Option<String>,
}

/// A job as a plan keeps it: no id, no workflow link (both are set when it is enqueued).
fn template(mut job: NewJob) -> NewJob {
    job.id = JobId::nil();
    job.workflow = None;
    job
}

impl Workflow {
    pub fn new(name: impl Into<String>) -> Self {
        Workflow { name: name.into(), id: None, input: None, plan: Plan { steps: Vec::new(), on_failure: None }, stored: Arc::default() }
    }

    fn changed(mut self) -> Self {
        self.stored = Arc::default();
        self
    }

    /// Uses `id` instead of a generated one (e.g. derived from the entity the workflow works
    /// on, so the caller can store it with that entity in the same statement). It must be
    /// unique among workflows.
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// The payload every job of this workflow gets (steps, compensations, on-failure job),
    /// in place of their own. Define the workflow once with placeholder payloads, then clone it
    /// and set the input per instance: all instances share one stored plan.
    pub fn input(mut self, payload: &impl Serialize) -> Self {
        self.input = Some(serde_json::to_string(payload).expect("a Serialize value that is not JSON-representable"));
        self
    }

    /// Appends a step; `job` runs after the previous step succeeded.
    pub fn step(mut self, name: impl Into<String>, job: NewJob) -> Self {
        self.plan.steps.push(PlanStep { name: name.into(), job: template(job), compensation: None });
        self.changed()
    }

    /// The compensation of the last step added: it undoes that step if a later one fails.
    pub fn compensate(mut self, job: NewJob) -> Self {
        if let Some(last) = self.plan.steps.last_mut() {
            last.compensation = Some(template(job));
        }
        self.changed()
    }

    /// A job that runs once when the workflow has failed, after the compensations (a single
    /// rollback step, for workflows that undo everything in one place). It shows on the
    /// timeline under `name`, with role `rollback`.
    pub fn on_failure(mut self, name: impl Into<String>, job: NewJob) -> Self {
        self.plan.on_failure = Some(PlanStep { name: name.into(), job: template(job), compensation: None });
        self.changed()
    }

    /// Validates, serializes and hashes the plan, once per definition.
    fn stored(&self) -> Result<Arc<Stored>> {
        let r = self.stored.get_or_init(|| {
            if self.plan.steps.is_empty() {
                return Err("a workflow needs at least one step".into());
            }
            for s in self.plan.steps.iter().chain(&self.plan.on_failure) {
                s.job.validate()?;
                if let Some(c) = &s.compensation {
                    c.validate()?;
                }
            }
            let json = serde_json::to_string(&(&self.name, &self.plan)).expect("a plan serializes");
            let digest = Sha256::digest(json.as_bytes());
            let id: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
            remember(&id, Arc::new(self.plan.clone()));
            Ok(Arc::new(Stored { id, json }))
        });
        r.clone().map_err(BackendError::Invalid)
    }

    /// Stores the workflow and enqueues its first step in one transaction; returns its id.
    pub async fn start(self, conveyor: &Conveyor) -> Result<String> {
        conveyor.backend().transact(move |tx| self.start_in(tx)).await
    }

    /// The same inside the caller's transaction (e.g. with the rows the workflow works on).
    pub fn start_in(self, tx: &mut dyn Tx) -> Result<String> {
        Ok(Workflow::start_many_in(tx, vec![self])?.remove(0))
    }

    /// Starts many workflows inside the caller's transaction with one statement per table (an
    /// import starting one per order); returns their ids in order.
    pub fn start_many_in(tx: &mut dyn Tx, workflows: Vec<Workflow>) -> Result<Vec<String>> {
        Workflow::prepare_many(workflows)?.start_in(tx)
    }

    /// Builds the rows and first jobs of many workflows outside any transaction, so that
    /// [`Starts::start_in`] only writes (an import prepares a batch while the last commits).
    pub fn prepare_many(workflows: Vec<Workflow>) -> Result<Starts> {
        let now = now_ms();
        let mut starts = Starts { now, ..Starts::default() };
        for w in workflows {
            let stored = w.stored()?;
            if !starts.plans.iter().any(|p| p.id == stored.id) {
                starts.plans.push(stored.clone());
            }
            let id = w.id.unwrap_or_else(|| JobId::new().to_string());
            let first = &w.plan.steps[0];
            let job = step_job(&id, w.input.as_deref(), 0, &first.job);
            starts.steps.push(vec![
                id.clone().into(),
                0.into(),
                first.name.clone().into(),
                "step".into(),
                0.into(),
                "queued".into(),
                job.id.to_string().into(),
            ]);
            starts.jobs.push(job);
            starts.rows.push(vec![
                id.clone().into(),
                w.name.into(),
                "running".into(),
                (w.plan.steps.len() as i64).into(),
                stored.id.clone().into(),
                w.input.into(),
                now.into(),
            ]);
            starts.ids.push(id);
        }
        Ok(starts)
    }
}

/// Workflows prepared by [`Workflow::prepare_many`], not started yet.
#[derive(Default)]
pub struct Starts {
    now: i64,
    plans: Vec<Arc<Stored>>,
    ids: Vec<String>,
    rows: Vec<Vec<SqlValue>>,
    steps: Vec<Vec<SqlValue>>,
    jobs: Vec<NewJob>,
}

impl Starts {
    /// Their ids, in order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Keeps only the workflows whose id `keep` accepts.
    pub fn retain(&mut self, mut keep: impl FnMut(&str) -> bool) {
        let keep: Vec<bool> = self.ids.iter().map(|id| keep(id)).collect();
        let mut k = keep.iter();
        self.rows.retain(|_| *k.next().unwrap_or(&false));
        let mut k = keep.iter();
        self.steps.retain(|_| *k.next().unwrap_or(&false));
        let mut k = keep.iter();
        self.jobs.retain(|_| *k.next().unwrap_or(&false));
        let mut k = keep.iter();
        self.ids.retain(|_| *k.next().unwrap_or(&false));
    }

    /// Stores the workflows and enqueues their first steps in the caller's transaction; returns
    /// their ids. The rows stay with `self` (for the caller to drop outside the transaction).
    pub fn start_in(&mut self, tx: &mut dyn Tx) -> Result<Vec<String>> {
        for p in &self.plans {
            tx.defer(
                "INSERT INTO workflow_plans (id, plan, created_at) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING",
                &[p.id.clone().into(), p.json.clone().into(), self.now.into()],
            )?;
        }
        insert_many(tx, "INSERT INTO workflows (id, name, status, steps, plan_id, input, created_at)", &self.rows, "")?;
        insert_many(tx, "INSERT INTO workflow_steps (workflow_id, seq, name, role, step, status, job_id)", &self.steps, "")?;
        tx.enqueue(std::mem::take(&mut self.jobs))?;
        Ok(self.ids.clone())
    }
}

/// The job of timeline row `seq` of workflow `wf`, from its template.
fn step_job(wf: &str, input: Option<&str>, seq: i64, template: &NewJob) -> NewJob {
    let mut job = template.clone();
    job.id = JobId::new();
    job.workflow = Some(format!("{wf}:{seq}"));
    if let Some(input) = input {
        job.payload = input.to_string();
    }
    job.tag(format!("workflow:{wf}"))
}

/// Plans by id, parsed once per process (a plan never changes under its id).
fn plans() -> &'static Mutex<HashMap<String, Arc<Plan>>> {
    static PLANS: OnceLock<Mutex<HashMap<String, Arc<Plan>>>> = OnceLock::new();
    PLANS.get_or_init(Mutex::default)
}

fn remember(id: &str, plan: Arc<Plan>) {
    let mut map = plans().lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= 4096 {
        // One-off plans (per-instance payloads) must not grow this without bound.
        map.clear();
    }
    map.insert(id.to_string(), plan);
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

impl Conveyor {
    /// A workflow's status and timeline (`None`: no such workflow).
    pub async fn workflow(&self, id: &str) -> Result<Option<WorkflowInfo>> {
        find(self.backend().as_ref(), id).await
    }
}

pub async fn find(backend: &dyn QueueBackend, id: &str) -> Result<Option<WorkflowInfo>> {
    let rows = backend
        .query(
            "SELECT w.id, w.name, w.status, w.error, w.created_at, w.finished_at, p.plan
             FROM workflows w LEFT JOIN workflow_plans p ON p.id = w.plan_id WHERE w.id = $1",
            vec![id.into()],
        )
        .await?;
    let Some(w) = rows.first() else { return Ok(None) };
    let plan: Option<Plan> = w.text(6).and_then(|j| serde_json::from_str::<(String, Plan)>(j).ok()).map(|(_, p)| p);
    let rows = backend
        .query(
            "SELECT name, role, status, attempts, job_id, started_at, finished_at, error, step FROM workflow_steps
             WHERE workflow_id = $1 ORDER BY seq",
            vec![id.into()],
        )
        .await?;
    // The plan's steps in order (those not reached yet as pending), then the compensations and
    // the rollback in the order they ran.
    let mut steps: Vec<StepInfo> = Vec::new();
    let total = plan.as_ref().map_or(0, |p| p.steps.len());
    for i in 0..total.max(rows.iter().filter(|r| r.text(1) == Some("step")).count()) {
        match rows.iter().find(|r| r.text(1) == Some("step") && r.int(8) == i as i64) {
            Some(r) => steps.push(step_info(r)),
            None => steps.push(StepInfo {
                name: plan.as_ref().and_then(|p| p.steps.get(i)).map(|s| s.name.clone()).unwrap_or_default(),
                role: "step".into(),
                status: "pending".into(),
                attempts: 0,
                job_id: None,
                started_at: None,
                finished_at: None,
                error: None,
            }),
        }
    }
    steps.extend(rows.iter().filter(|r| r.text(1) != Some("step")).map(step_info));
    Ok(Some(WorkflowInfo {
        id: w.text(0).unwrap_or_default().to_string(),
        name: w.text(1).unwrap_or_default().to_string(),
        status: w.text(2).unwrap_or_default().to_string(),
        error: w.text(3).map(str::to_string),
        created_at: w.int(4),
        finished_at: w.opt_int(5),
        steps,
    }))
}
