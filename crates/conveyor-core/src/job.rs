//! The job model: what is enqueued, what a worker reserves, and how it ends.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// A job's identity: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        JobId(Uuid::now_v7())
    }

    /// The all-zero id, for templates that get a real id when they are enqueued.
    pub(crate) fn nil() -> Self {
        JobId(Uuid::nil())
    }

    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }

    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Uuid::from_slice(bytes).ok().map(JobId)
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Debug for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "JobId({})", self.0)
    }
}

impl FromStr for JobId {
    type Err = uuid::Error;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s).map(JobId)
    }
}

/// How long to wait before the next attempt after a failed one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Backoff {
    /// The same delay after every failure.
    Fixed { ms: u64 },
    /// `base * 2^(attempt-1)`, capped at `max`, with "full jitter" when `jitter` is set
    /// (a uniformly random delay between half and all of the computed one).
    Exponential { base_ms: u64, max_ms: u64, jitter: bool },
    /// Delay after failed attempt 1, 2, …; the last entry repeats.
    List { ms: Vec<u64> },
}

impl Default for Backoff {
    /// Sidekiq-like default: quick first retries, growing to minutes.
    fn default() -> Self {
        Backoff::Exponential { base_ms: 1_000, max_ms: 3_600_000, jitter: true }
    }
}

impl Backoff {
    pub fn fixed(d: Duration) -> Self {
        Backoff::Fixed { ms: d.as_millis() as u64 }
    }

    pub fn exponential(base: Duration, max: Duration) -> Self {
        Backoff::Exponential { base_ms: base.as_millis() as u64, max_ms: max.as_millis() as u64, jitter: true }
    }

    pub fn list(delays: &[Duration]) -> Self {
        Backoff::List { ms: delays.iter().map(|d| d.as_millis() as u64).collect() }
    }

    /// The delay after failed attempt number `attempt` (1-based).
    pub fn delay(&self, attempt: u32) -> Duration {
        let ms = match self {
            Backoff::Fixed { ms } => *ms,
            Backoff::Exponential { base_ms, max_ms, jitter } => {
                let exp = attempt.saturating_sub(1).min(40);
                let full = base_ms.saturating_mul(1u64 << exp).min(*max_ms);
                if *jitter && full > 1 {
                    full / 2 + rand::random::<u64>() % (full - full / 2 + 1)
                } else {
                    full
                }
            }
            Backoff::List { ms } => match ms.len() {
                0 => 0,
                n => ms[(attempt.max(1) as usize - 1).min(n - 1)],
            },
        };
        Duration::from_millis(ms)
    }
}

/// Queue names are short identifiers; anything else is refused at enqueue.
pub fn validate_queue_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("queue name must be 1 to 64 characters".into());
    }
    if !name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')) {
        return Err("queue name may contain only letters, digits, '-', '_', '.' and ':'".into());
    }
    Ok(())
}

pub const DEFAULT_QUEUE: &str = "default";
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// A job to enqueue. Build it with [`NewJob::new`] and the option methods.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NewJob {
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    /// The payload as JSON text; it is stored and handed to the handler unchanged.
    pub payload: String,
    /// Higher runs first; jobs of equal priority run in enqueue order.
    pub priority: i32,
    pub max_attempts: u32,
    pub backoff: Option<Backoff>,
    pub timeout: Option<Duration>,
    /// Unix milliseconds; `None` means now.
    pub run_at: Option<i64>,
    pub unique: Option<UniqueKey>,
    pub tags: Vec<String>,
    pub batch_id: Option<String>,
    /// Set by the workflow engine on step and compensation jobs.
    pub workflow: Option<String>,
    /// Whether `max_attempts` was chosen for this job (else its kind's default may apply, see
    /// [`crate::Registry::route`]).
    #[serde(skip)]
    attempts_set: bool,
}

/// While a job holding this key is pending, delayed or running (and at most `ttl`), another
/// enqueue with the same key is refused as a duplicate.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct UniqueKey {
    pub key: String,
    pub ttl: Duration,
}

impl NewJob {
    pub fn new(kind: impl Into<String>, payload: &impl Serialize) -> Self {
        NewJob::raw(kind, serde_json::to_string(payload).expect("a Serialize value that is not JSON-representable"))
    }

    /// A job whose payload is already JSON text.
    pub fn raw(kind: impl Into<String>, payload: String) -> Self {
        NewJob {
            id: JobId::new(),
            queue: DEFAULT_QUEUE.to_string(),
            kind: kind.into(),
            payload,
            priority: 0,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff: None,
            timeout: None,
            run_at: None,
            unique: None,
            tags: Vec::new(),
            batch_id: None,
            workflow: None,
            attempts_set: false,
        }
    }

    /// Whether [`NewJob::max_attempts`] was called.
    pub fn attempts_set(&self) -> bool {
        self.attempts_set
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }
    pub fn priority(mut self, priority: i32) -> Self {
        self.priority = priority;
        self
    }
    pub fn max_attempts(mut self, n: u32) -> Self {
        self.max_attempts = n.max(1);
        self.attempts_set = true;
        self
    }
    pub fn backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = Some(backoff);
        self
    }
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
    pub fn delay(mut self, delay: Duration) -> Self {
        self.run_at = Some(crate::clock::now_ms() + delay.as_millis() as i64);
        self
    }
    pub fn run_at(mut self, unix_ms: i64) -> Self {
        self.run_at = Some(unix_ms);
        self
    }
    pub fn unique(mut self, key: impl Into<String>, ttl: Duration) -> Self {
        self.unique = Some(UniqueKey { key: key.into(), ttl });
        self
    }
    pub fn tag(mut self, tag: impl Into<String>) -> Self {
        self.tags.push(tag.into());
        self
    }
    /// At most `c.limit` jobs with `c.key` run at once (see [`crate::flow`]); replaces a key
    /// set before.
    pub fn concurrency(mut self, c: crate::flow::Concurrency) -> Self {
        self.tags.retain(|t| !t.starts_with(crate::flow::TAG));
        self.tags.push(c.tag());
        self
    }
    /// Of a burst of jobs with `d.key`, only the last runs, once the key was quiet for
    /// `d.window` (see [`crate::debounce`]); replaces a debounce set before.
    pub fn debounce(mut self, d: crate::debounce::Debounce) -> Self {
        self.tags.retain(|t| !t.starts_with(crate::debounce::TAG));
        self.tags.push(d.tag());
        self
    }
    /// Reserved round-robin with the other keys' jobs of its queue and priority (see
    /// [`crate::fair`]); replaces a key set before.
    pub fn fairness(mut self, key: impl Into<String>) -> Self {
        self.tags.retain(|t| !t.starts_with(crate::fair::TAG));
        self.tags.push(crate::fair::tag(&key.into()));
        self
    }
    pub fn batch(mut self, batch_id: impl Into<String>) -> Self {
        self.batch_id = Some(batch_id.into());
        self
    }

    /// Checks what a backend cannot fix for the caller.
    pub fn validate(&self) -> Result<(), String> {
        // The queue may name its remote lane (`crate::lane`), which only the engine does.
        validate_queue_name(crate::lane::base(&self.queue))?;
        if self.kind.is_empty() || self.kind.len() > 200 {
            return Err("job kind must be 1 to 200 characters".into());
        }
        if self.max_attempts == 0 {
            return Err("max_attempts must be at least 1".into());
        }
        if let Some(key) = self.tags.iter().find_map(|t| t.strip_prefix(crate::fair::TAG)) {
            crate::fair::check_key(key)?;
        }
        Ok(())
    }

    /// The fairness key this job carries (see [`crate::fair`]).
    pub fn fairness_key(&self) -> Option<&str> {
        crate::fair::key_of(&self.tags)
    }
}

/// What an enqueue did with one job.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum EnqueueOutcome {
    Enqueued {
        id: JobId,
    },
    /// A job holding the same unique key exists; nothing was enqueued.
    Duplicate {
        existing: JobId,
    },
}

impl EnqueueOutcome {
    pub fn id(&self) -> JobId {
        match self {
            EnqueueOutcome::Enqueued { id } => *id,
            EnqueueOutcome::Duplicate { existing } => *existing,
        }
    }
}

/// A job reserved by a worker under a lease.
#[derive(Clone, Debug)]
pub struct Job {
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    pub payload: String,
    /// This attempt's number, from 1.
    pub attempt: u32,
    pub max_attempts: u32,
    pub backoff: Option<Backoff>,
    pub timeout: Option<Duration>,
    pub priority: i32,
    pub tags: Vec<String>,
    pub unique_key: Option<String>,
    pub batch_id: Option<String>,
    pub workflow: Option<String>,
    pub created_at: i64,
    pub available_at: i64,
    pub reserved_at: i64,
    /// Proof of this reservation: acknowledgements that carry another token are ignored,
    /// so a worker whose lease expired cannot complete a job someone else now holds.
    pub lease_token: i64,
}

/// The end of one attempt, as sent to the backend.
#[derive(Clone, Debug)]
pub struct Completion {
    pub id: JobId,
    pub lease_token: i64,
    pub queue: String,
    pub kind: String,
    pub unique_key: Option<String>,
    pub batch_id: Option<String>,
    pub workflow: Option<String>,
    pub outcome: Outcome,
    /// Available → reserved, for metrics.
    pub wait_ms: u64,
    /// Reserved → finished (0 for jobs released unrun).
    pub runtime_ms: u64,
}

impl Completion {
    /// The completion of an attempt at `job` with `outcome`; runtime is left at 0.
    pub fn of(job: &Job, outcome: Outcome) -> Completion {
        Completion {
            id: job.id,
            lease_token: job.lease_token,
            queue: job.queue.clone(),
            kind: job.kind.clone(),
            unique_key: job.unique_key.clone(),
            batch_id: job.batch_id.clone(),
            workflow: job.workflow.clone(),
            outcome,
            wait_ms: (job.reserved_at - job.available_at).max(0) as u64,
            runtime_ms: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Completed,
    /// The attempt failed; run again at `at` (unix ms).
    Retry {
        at: i64,
        error: String,
    },
    /// The job failed for good and moves to the failed store.
    Failed {
        error: String,
    },
    /// Back to the queue at `at` without consuming an attempt (rate limit, breaker, shutdown).
    Release {
        at: i64,
    },
}

/// Where a job is in its lifecycle, as shown by the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum JobState {
    Pending,
    Delayed,
    Reserved,
    Completed,
    Failed,
}

impl JobState {
    pub fn as_str(&self) -> &'static str {
        match self {
            JobState::Pending => "pending",
            JobState::Delayed => "delayed",
            JobState::Reserved => "reserved",
            JobState::Completed => "completed",
            JobState::Failed => "failed",
        }
    }
}

impl FromStr for JobState {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "pending" => JobState::Pending,
            "delayed" => JobState::Delayed,
            "reserved" => JobState::Reserved,
            "completed" => JobState::Completed,
            "failed" => JobState::Failed,
            other => return Err(format!("unknown job status {other:?}")),
        })
    }
}

/// A job as the admin API and the dashboard see it, whatever its state.
#[derive(Clone, Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct JobInfo {
    #[cfg_attr(feature = "openapi", schema(value_type = String, format = "uuid"))]
    pub id: JobId,
    pub queue: String,
    pub kind: String,
    pub state: JobState,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub payload: serde_json::Value,
    pub attempts: u32,
    pub max_attempts: u32,
    pub priority: i32,
    pub tags: Vec<String>,
    pub unique_key: Option<String>,
    pub batch_id: Option<String>,
    pub error: Option<String>,
    pub created_at: i64,
    pub available_at: Option<i64>,
    pub reserved_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub runtime_ms: Option<u64>,
    pub wait_ms: Option<u64>,
    pub worker: Option<String>,
}

/// Parses stored payload text for display; text that is not JSON is shown as a string.
pub fn payload_value(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn list_backoff_repeats_its_last_entry() {
        let b = Backoff::list(&[Duration::from_secs(60), Duration::from_secs(300)]);
        assert_eq!(b.delay(1), Duration::from_secs(60));
        assert_eq!(b.delay(2), Duration::from_secs(300));
        assert_eq!(b.delay(7), Duration::from_secs(300));
    }

    #[test]
    fn exponential_backoff_doubles_within_jitter_and_caps() {
        let b = Backoff::Exponential { base_ms: 100, max_ms: 1_000, jitter: true };
        for _ in 0..100 {
            let d3 = b.delay(3).as_millis() as u64;
            assert!((200..=400).contains(&d3), "{d3}");
            assert!(b.delay(30).as_millis() as u64 <= 1_000);
        }
        let plain = Backoff::Exponential { base_ms: 100, max_ms: 1_000, jitter: false };
        assert_eq!(plain.delay(1).as_millis(), 100);
        assert_eq!(plain.delay(4).as_millis(), 800);
        assert_eq!(plain.delay(5).as_millis(), 1_000);
    }

    #[test]
    fn queue_names_are_checked() {
        assert!(validate_queue_name("emails-high").is_ok());
        assert!(validate_queue_name("").is_err());
        assert!(validate_queue_name("a b").is_err());
    }

    #[test]
    fn job_ids_round_trip_and_sort_by_time() {
        let a = JobId::new();
        let b = JobId::new();
        assert!(a < b);
        assert_eq!(a.to_string().parse::<JobId>().unwrap(), a);
        assert_eq!(JobId::from_slice(a.as_bytes()), Some(a));
    }
}
