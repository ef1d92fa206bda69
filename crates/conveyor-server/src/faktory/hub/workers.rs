//! Remote worker processes, known by their `wid`: registered by `HELLO` and `BEAT`, published in
//! the store's worker registry at each beat, and judged gone after two missed beats.

use std::time::{Duration, Instant};

use conveyor_core::backend::{SupervisorInfo, WorkerInfo};
use conveyor_core::clock::now_ms;
use conveyor_core::BackendError;

use super::{Hub, Signal, BEAT_SLACK, DEFAULT_BEAT};

/// A remote worker process, known by its `wid`.
#[derive(Clone, Debug)]
pub(crate) struct RemoteWorker {
    pub(crate) hostname: String,
    pub(crate) pid: u32,
    pub(crate) labels: Vec<String>,
    pub(crate) started_at: i64,
    pub(super) last_beat: Option<Instant>,
    pub(super) interval: Option<Duration>,
    /// The state it reported (`current_state`).
    pub(crate) reported: Option<String>,
    pub(crate) queues: Vec<String>,
    pub(crate) processed: u64,
}

impl RemoteWorker {
    /// Known from now on; `HELLO` fills in who it is.
    fn new() -> Self {
        RemoteWorker {
            hostname: String::new(),
            pid: 0,
            labels: Vec::new(),
            started_at: now_ms(),
            last_beat: None,
            interval: None,
            reported: None,
            queues: Vec::new(),
            processed: 0,
        }
    }

    /// Gone: it has beaten, and missed two beats since.
    pub(super) fn gone(&self, now: Instant) -> bool {
        match self.last_beat {
            Some(last) => now.duration_since(last) > self.interval.unwrap_or(DEFAULT_BEAT) * 2 + BEAT_SLACK,
            None => false,
        }
    }
}

impl Hub {
    /// `HELLO` of a worker process (every connection of it says hello with the same `wid`).
    pub(crate) fn hello(&self, wid: &str, hostname: &str, pid: u32, labels: Vec<String>) {
        let mut st = self.state();
        let w = st.workers.entry(wid.to_string()).or_insert_with(RemoteWorker::new);
        w.hostname = hostname.to_string();
        w.pid = pid;
        w.labels = labels;
    }

    /// `BEAT`: notes the worker alive (re-registering a `wid` it forgot, say after a restart)
    /// and publishes it in the store's worker registry.
    pub(crate) async fn beat(&self, wid: &str, reported: Option<String>, signal: Option<Signal>) -> Result<(), BackendError> {
        let info = {
            let mut st = self.state();
            let now = Instant::now();
            let held: Vec<String> =
                st.held.values().filter(|h| h.wid.as_deref() == Some(wid)).map(|h| h.job.id.to_string()).take(50).collect();
            let w = st.workers.entry(wid.to_string()).or_insert_with(RemoteWorker::new);
            if let Some(last) = w.last_beat {
                let gap = now.duration_since(last);
                // A beat sent right after another (a retry) says nothing of the interval.
                if gap > Duration::from_millis(500) {
                    w.interval = Some(w.interval.map_or(gap, |i| i.max(gap.min(Duration::from_secs(60)))));
                }
            }
            w.last_beat = Some(now);
            w.reported = reported;
            let status = match (signal, w.reported.as_deref()) {
                (Some(s), _) => s.as_str().to_string(),
                (None, Some(r)) if !r.is_empty() => r.to_string(),
                _ => "running".to_string(),
            };
            let labels = if w.labels.is_empty() { String::new() } else { format!(" ({})", w.labels.join(", ")) };
            WorkerInfo {
                id: wid.to_string(),
                hostname: w.hostname.clone(),
                pid: w.pid,
                started_at: w.started_at,
                last_seen: now_ms(),
                status,
                supervisors: vec![SupervisorInfo {
                    name: format!("faktory{labels}"),
                    queues: w.queues.clone(),
                    concurrency: 0,
                    busy: held.len(),
                    processed: w.processed,
                    balance: Default::default(),
                    pools: Vec::new(),
                    current_jobs: held,
                }],
            }
        };
        self.conveyor.backend().worker_heartbeat(info).await
    }

    /// Remote workers known here with the number of jobs each holds.
    pub(crate) fn workers(&self) -> usize {
        self.state().workers.len()
    }
}
