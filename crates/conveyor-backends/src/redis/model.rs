//! The forms a job takes in Redis: its stored data (`Stored`, `Data`, `Raw`), its state field
//! (`State`), and the outcome record a job with hooks leaves for the store (`Record`).

use super::*;

/// A job's immutable part as stored in `T:d` (see [`scripts`] for the packing).
pub(super) struct Stored {
    pub(super) queue: String,
    pub(super) priority: i32,
    pub(super) max_attempts: u32,
    pub(super) created_at: i64,
    pub(super) unique: Option<String>,
    pub(super) data: Data,
}

impl Stored {
    pub(super) fn pack(job: &NewJob, now: i64) -> Result<String> {
        let data = Data {
            k: job.kind.clone(),
            p: job.payload.clone(),
            b: job.backoff.clone(),
            to: job.timeout.map(|t| t.as_millis() as u64),
            tg: job.tags.clone(),
            bt: job.batch_id.clone(),
            wf: job.workflow.clone(),
        };
        let json = serde_json::to_string(&data).map_err(|e| BackendError::Other(e.to_string()))?;
        let unique = job.unique.as_ref().map_or("", |u| u.key.as_str());
        if unique.contains('\x1f') {
            return Err(BackendError::Invalid("a unique key may not contain U+001F".into()));
        }
        let hooks = if job.batch_id.is_some() || job.workflow.is_some() { "1" } else { "" };
        Ok(format!("{}\x1f{}\x1f{}\x1f{now}\x1f{unique}\x1f{hooks}\x1f{json}", job.queue, -(job.priority as i64), job.max_attempts))
    }

    pub(super) fn parse(d: &str) -> Option<Stored> {
        let f: Vec<&str> = d.splitn(7, '\x1f').collect();
        if f.len() != 7 {
            return None;
        }
        Some(Stored {
            queue: f[0].to_string(),
            // −priority, plus a fair-queueing turn below 1 for a job with a fairness key.
            priority: -f[1].parse::<f64>().map_or(0.0, f64::floor) as i32,
            max_attempts: f[2].parse().unwrap_or(0),
            created_at: f[3].parse().unwrap_or(0),
            unique: Some(f[4].to_string()).filter(|u| !u.is_empty()),
            data: Data::parse(f[6]),
        })
    }
}

/// A job's mutable part as stored in `T:s`: attempts, available at, lease token (empty unless
/// reserved), reserved at, worker, and for a completed job in the history: finished at,
/// runtime, wait.
#[derive(Default)]
pub(super) struct State {
    pub(super) attempts: u32,
    pub(super) available_at: i64,
    pub(super) token: String,
    pub(super) reserved_at: i64,
    pub(super) worker: String,
    /// Finished at, runtime and wait of a completed job.
    pub(super) completed: Option<(i64, u64, u64)>,
}

impl State {
    /// The state of a job from its `T:s` field; a job without one was never reserved and
    /// became available when it was created.
    pub(super) fn of(s: Option<&str>, stored: &Stored) -> State {
        match s {
            Some(s) => {
                let mut st = State::parse(s);
                // A job reserved for the first time keeps an empty available time.
                if s.split('\x1f').nth(1).is_none_or(str::is_empty) {
                    st.available_at = stored.created_at;
                }
                st
            }
            None => State { available_at: stored.created_at, ..State::default() },
        }
    }

    pub(super) fn parse(s: &str) -> State {
        let f: Vec<&str> = s.split('\x1f').collect();
        let n = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).map_or(0, |v| v as i64);
        State {
            attempts: n(0) as u32,
            available_at: n(1),
            token: f.get(2).unwrap_or(&"").to_string(),
            reserved_at: n(3),
            worker: f.get(4).unwrap_or(&"").to_string(),
            completed: (f.len() >= 8).then(|| (n(5), n(6).max(0) as u64, n(7).max(0) as u64)),
        }
    }
}

/// Everything Redis holds about one job.
pub(super) struct Raw {
    pub(super) d: Option<String>,
    pub(super) s: Option<String>,
    pub(super) error: Option<String>,
    /// `failed at` and runtime, for failed jobs.
    pub(super) x: Option<String>,
}

/// The part of a job that never changes, stored as compact JSON in its hash's `d` field.
#[derive(Serialize, Deserialize, Default)]
pub(super) struct Data {
    pub(super) k: String,
    pub(super) p: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) b: Option<Backoff>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) to: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(super) tg: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) bt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(super) wf: Option<String>,
}

impl Data {
    pub(super) fn parse(d: &str) -> Data {
        serde_json::from_str(d).unwrap_or_default()
    }
}

/// An applied outcome waiting for the store's hooks (the JSON the scripts store in `T:h`).
#[derive(Serialize, Deserialize, Clone, Debug)]
pub(super) struct Record {
    pub(super) id: String,
    pub(super) queue: String,
    pub(super) data: String,
    /// `completed`, `retry`, `failed` or `failed_retry` (a failed job put back on its queue).
    pub(super) outcome: String,
    pub(super) at: i64,
    pub(super) error: String,
    pub(super) wait_ms: u64,
    pub(super) runtime_ms: u64,
}

impl Record {
    pub(super) fn of(c: &Completion, data: String) -> Option<Record> {
        let (outcome, at, error) = match &c.outcome {
            Outcome::Completed => ("completed", 0, String::new()),
            Outcome::Retry { at, error } => ("retry", *at, error.clone()),
            Outcome::Failed { error } => ("failed", 0, error.clone()),
            Outcome::Release { .. } => return None,
        };
        Some(Record {
            id: c.id.to_string(),
            queue: c.queue.clone(),
            data,
            outcome: outcome.into(),
            at,
            error,
            wait_ms: c.wait_ms,
            runtime_ms: c.runtime_ms,
        })
    }

    /// Runs the store's side of this outcome.
    pub(super) fn apply(&self, tx: &mut dyn Tx) -> Result<()> {
        let d = Data::parse(&self.data);
        if self.outcome == "failed_retry" {
            return match &d.bt {
                Some(batch) => conveyor_core::hooks::after_failed_retry(tx, batch),
                None => Ok(()),
            };
        }
        let outcome = match self.outcome.as_str() {
            "completed" => Outcome::Completed,
            "retry" => Outcome::Retry { at: self.at, error: self.error.clone() },
            _ => Outcome::Failed { error: self.error.clone() },
        };
        let c = Completion {
            id: self.id.parse().map_err(|e| BackendError::Other(format!("outcome record with a bad id: {e}")))?,
            lease_token: 0,
            queue: self.queue.clone(),
            kind: d.k,
            unique_key: None,
            batch_id: d.bt,
            workflow: d.wf,
            outcome,
            wait_ms: self.wait_ms,
            runtime_ms: self.runtime_ms,
        };
        conveyor_core::hooks::after_outcome(tx, &c)
    }
}
