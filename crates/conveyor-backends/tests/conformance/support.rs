//! Helpers shared by the tests of the engine's mechanisms (batches, workflows, events, cache,
//! limits, middleware): a log of what handlers ran, handlers that only log, and worker configs
//! with more than one supervisor.

use std::sync::Mutex;

use conveyor_core::registry::{JobContext, Registry};
use conveyor_core::worker::{SupervisorConfig, WorkerConfig};
use conveyor_core::Conveyor;

use super::runtime::config;
use super::*;

/// What handlers ran, in the order they ran (one label per invocation).
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn push(&self, label: impl Into<String>) {
        self.0.lock().unwrap().push(label.into());
    }
    pub fn all(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
    pub fn count(&self, label: &str) -> usize {
        self.0.lock().unwrap().iter().filter(|l| *l == label).count()
    }
    pub fn len(&self) -> usize {
        self.0.lock().unwrap().len()
    }
}

/// Registers `kind` with a handler that logs `kind` and succeeds.
pub fn log_ok(registry: &mut Registry, kind: &str, log: &Log) {
    let (log, label) = (log.clone(), kind.to_string());
    registry.register(kind, move |_: Value, _ctx: JobContext| {
        log.push(label.clone());
        async { Ok(()) }
    });
}

/// A job of `kind` on `queue` with an empty payload.
pub fn job_of(queue: &str, kind: &str) -> NewJob {
    NewJob::new(kind, &json!({})).queue(queue)
}

/// The handle the engine's APIs take, over the test's backend.
pub fn conveyor_of(b: &Backend, registry: &Registry) -> Conveyor {
    Conveyor::new(b.clone(), registry.clone())
}

/// `config` with one supervisor per `(queue, concurrency)`.
pub fn multi_config(queues: &[(&str, usize)]) -> WorkerConfig {
    let mut cfg = config(queues[0].0, queues[0].1, Duration::from_secs(5));
    for (i, (q, n)) in queues.iter().enumerate().skip(1) {
        cfg.supervisors.push(SupervisorConfig::new(format!("conformance-{i}"), vec![q.to_string()], *n));
    }
    cfg
}

/// Whether `queue` has nothing pending, delayed or reserved.
pub async fn drained(b: &Backend, queue: &str) -> bool {
    let s = stats(b, queue).await;
    s.pending == 0 && s.delayed == 0 && s.reserved == 0
}
