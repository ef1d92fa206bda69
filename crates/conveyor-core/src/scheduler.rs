//! The scheduler: recurring jobs on cron expressions (with seconds and a time zone).
//!
//! Every process may run a scheduler; each tick still fires exactly once, because firing is
//! one transaction that inserts the `(schedule, tick)` row — a primary key — and enqueues the
//! job: the process whose insert wins enqueues, the others change nothing. A scheduled
//! "command" is a job kind the binary registers, so it gets retries and the failed store too.
//!
//! Missed ticks (the scheduler was down): [`Missed::Skip`] (the default) fires nothing for
//! them; [`Missed::RunOnce`] fires the most recent missed tick once on start. A tick counts as
//! missed when it is more than [`ON_TIME`] old by the time it is seen.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::backend::{QueueBackendExt, Result, RowExt};
use crate::clock::now_ms;
use crate::cron::CronSchedule;
use crate::job::{JobId, NewJob};
use crate::Conveyor;

/// How late a tick may be seen and still fire under [`Missed::Skip`].
pub const ON_TIME: Duration = Duration::from_secs(60);

/// Ticks looked at per schedule per check.
const CATCH_UP_CHUNK: usize = 1_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Missed {
    Skip,
    RunOnce,
}

#[derive(Clone, Debug)]
pub struct Schedule {
    pub name: String,
    pub cron: CronSchedule,
    /// A template: each tick enqueues a copy with a fresh id.
    pub job: NewJob,
    pub missed: Missed,
}

impl Schedule {
    pub fn new(name: impl Into<String>, cron: CronSchedule, job: NewJob) -> Self {
        Schedule { name: name.into(), cron, job, missed: Missed::Skip }
    }

    pub fn missed(mut self, policy: Missed) -> Self {
        self.missed = policy;
        self
    }
}

/// A schedule as reported to operators.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ScheduleInfo {
    pub name: String,
    pub cron: String,
    pub timezone: String,
    pub kind: String,
    pub queue: String,
    pub missed: Missed,
    pub next_at: Option<i64>,
}

#[derive(Clone)]
pub struct Scheduler {
    conveyor: Conveyor,
    schedules: Arc<Vec<Schedule>>,
}

impl Scheduler {
    pub fn new(conveyor: Conveyor, schedules: Vec<Schedule>) -> Self {
        Scheduler { conveyor, schedules: Arc::new(schedules) }
    }

    pub fn info(&self) -> Vec<ScheduleInfo> {
        let now = now_ms();
        self.schedules
            .iter()
            .map(|s| ScheduleInfo {
                name: s.name.clone(),
                cron: s.cron.expression().to_string(),
                timezone: s.cron.timezone().to_string(),
                kind: s.job.kind.clone(),
                queue: s.job.queue.clone(),
                missed: s.missed,
                next_at: s.cron.next_after(now),
            })
            .collect()
    }

    /// Fires due ticks until `shutdown`; checks four times a second.
    pub async fn run(self, shutdown: CancellationToken) {
        if self.schedules.is_empty() {
            tracing::info!("scheduler: nothing scheduled");
            shutdown.cancelled().await;
            return;
        }
        let mut seen = self.start_points().await;
        tracing::info!(schedules = self.schedules.len(), "scheduler started");
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut since_prune = 0u32;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {}
            }
            let now = now_ms();
            for (i, s) in self.schedules.iter().enumerate() {
                let due = s.cron.fires_between(seen[i], now, CATCH_UP_CHUNK);
                let Some(&latest) = due.last() else { continue };
                if due.len() == CATCH_UP_CHUNK {
                    // Long downtime on a frequent schedule: walk forward a chunk per check and
                    // fire only from the chunk that reaches now (so "latest" is really latest).
                    seen[i] = latest;
                    continue;
                }
                let fire: Vec<i64> = match s.missed {
                    Missed::Skip => due.into_iter().filter(|t| now - t <= ON_TIME.as_millis() as i64).collect(),
                    Missed::RunOnce => vec![latest],
                };
                let mut fired_all = true;
                for t in fire {
                    match self.fire(s, t).await {
                        Ok(Some(id)) => tracing::info!(schedule = %s.name, tick = t, job_id = %id, "scheduled job enqueued"),
                        Ok(None) => {}
                        Err(e) => {
                            // Not marked seen: the next check tries the same ticks again (the
                            // tick's primary key keeps a retry from firing one twice).
                            tracing::warn!(schedule = %s.name, error = %e, "firing a schedule failed; will retry");
                            fired_all = false;
                            break;
                        }
                    }
                }
                if fired_all {
                    seen[i] = latest;
                }
            }
            since_prune += 1;
            if since_prune >= 4 * 3600 {
                since_prune = 0;
                let before = now - 86_400_000;
                let _ = self
                    .conveyor
                    .backend()
                    .transact(move |tx| tx.execute("DELETE FROM schedule_ticks WHERE tick < $1", &[before.into()]))
                    .await;
            }
        }
        tracing::info!("scheduler stopped");
    }

    /// Where each schedule resumes: its last fired tick (so `RunOnce` can catch up), or now.
    async fn start_points(&self) -> Vec<i64> {
        let now = now_ms();
        let mut out = Vec::with_capacity(self.schedules.len());
        for s in self.schedules.iter() {
            let last = self
                .conveyor
                .backend()
                .query("SELECT max(tick) FROM schedule_ticks WHERE name = $1", vec![s.name.clone().into()])
                .await
                .ok()
                .and_then(|rows| rows.first().and_then(|r| r.opt_int(0)));
            out.push(match (s.missed, last) {
                (Missed::RunOnce, Some(last)) => last,
                _ => now,
            });
        }
        out
    }

    /// Fires `tick` of `schedule` unless some process already did. Returns the job id if this
    /// call enqueued it.
    pub async fn fire(&self, schedule: &Schedule, tick: i64) -> Result<Option<JobId>> {
        let mut job = schedule.job.clone();
        job.id = JobId::new();
        let job = job.tag(format!("schedule:{}", schedule.name));
        let name = schedule.name.clone();
        let id = job.id;
        self.conveyor
            .backend()
            .transact(move |tx| {
                let won = tx.execute(
                    "INSERT INTO schedule_ticks (name, tick, fired_at, job_id) VALUES ($1, $2, $3, $4) ON CONFLICT (name, tick) DO NOTHING",
                    &[name.into(), tick.into(), now_ms().into(), id.to_string().into()],
                )?;
                if won == 0 {
                    return Ok(None);
                }
                tx.enqueue(vec![job])?;
                Ok(Some(id))
            })
            .await
    }
}
