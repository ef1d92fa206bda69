//! What this process did, as monotonic counters and cumulative histograms (Prometheus's
//! conventions: they only grow, `rate()` and `increase()` work on them, and `sum()` over the
//! instances gives the cluster).
//!
//! Jobs are counted where every connected backend is entered, [`crate::lane::Lanes`]:
//! enqueues once their transaction committed (those of a transaction that rolled back are not
//! counted), attempts once their outcome was recorded. Events, deliveries and partner requests
//! are counted by whoever does them, through the families below. Label values that come from
//! callers (queues, kinds, event names, partners) are capped at [`MAX_LABEL_VALUES`] distinct
//! values per label; the rest count as `other`, so a caller cannot grow the process's memory or
//! the scrape without bound.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{LazyLock, Mutex};

use crate::backend::{BackendError, ManyTxFn, Row, SqlValue, Tx, TxFn};
use crate::job::{Completion, EnqueueOutcome, NewJob, Outcome};
use crate::metrics::{bucket_of, BUCKETS};

/// Distinct values kept per label; further values are counted as `other`.
pub const MAX_LABEL_VALUES: usize = 500;
pub const OTHER: &str = "other";

/// A histogram over [`crate::metrics::BUCKET_BOUNDS_MS`]: per-bucket counts (not cumulative;
/// the exposition adds them up) and the sum.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Histogram {
    pub buckets: [u64; BUCKETS],
    pub sum_ms: u64,
}

impl Histogram {
    pub fn observe(&mut self, ms: u64) {
        self.buckets[bucket_of(ms)] += 1;
        self.sum_ms += ms;
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }

    fn add(&mut self, other: &Histogram) {
        for (a, b) in self.buckets.iter_mut().zip(other.buckets) {
            *a += b;
        }
        self.sum_ms += other.sum_ms;
    }
}

/// The counts of one (queue, kind).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JobCounts {
    pub enqueued: u64,
    pub completed: u64,
    pub retried: u64,
    pub failed: u64,
    pub released: u64,
    /// Run time of attempts that ran (completed, retried or failed).
    pub duration: Histogram,
    /// Available → reserved, of attempts that ran.
    pub wait: Histogram,
}

/// Keeps at most [`MAX_LABEL_VALUES`] values of one label.
#[derive(Default)]
struct Capped(HashSet<String>);

impl Capped {
    /// The value to count under: `value` itself when known or while there is room, else `other`.
    fn admit<'a>(&mut self, value: &'a str) -> &'a str {
        if self.0.contains(value) {
            return value;
        }
        if self.0.len() < MAX_LABEL_VALUES {
            self.0.insert(value.to_string());
            return value;
        }
        OTHER
    }
}

#[derive(Default)]
struct Jobs {
    queues: Capped,
    kinds: Capped,
    /// queue → kind → counts; looked up by `&str`, so counting allocates only for a new pair.
    counts: HashMap<String, HashMap<String, JobCounts>>,
}

impl Jobs {
    fn entry(&mut self, queue: &str, kind: &str) -> &mut JobCounts {
        let queue = self.queues.admit(crate::lane::base(queue));
        let kind = self.kinds.admit(kind);
        if !self.counts.contains_key(queue) {
            self.counts.insert(queue.to_string(), HashMap::new());
        }
        let kinds = self.counts.get_mut(queue).expect("inserted above");
        if !kinds.contains_key(kind) {
            kinds.insert(kind.to_string(), JobCounts::default());
        }
        kinds.get_mut(kind).expect("inserted above")
    }
}

static JOBS: LazyLock<Mutex<Jobs>> = LazyLock::new(Default::default);

/// The (queue, kind) of each job of an enqueue, taken before the jobs go to the store: the
/// distinct pairs (a batch has few) and, per job, which one.
#[derive(Default)]
pub struct EnqueueLabels {
    pairs: Vec<(String, String)>,
    of: Vec<u32>,
}

impl EnqueueLabels {
    pub fn of(jobs: &[NewJob]) -> EnqueueLabels {
        let mut l = EnqueueLabels { pairs: Vec::new(), of: Vec::with_capacity(jobs.len()) };
        for j in jobs {
            l.push(&j.queue, &j.kind);
        }
        l
    }

    pub fn push(&mut self, queue: &str, kind: &str) {
        let i = match self.pairs.iter().rposition(|(q, k)| q == queue && k == kind) {
            Some(i) => i,
            None => {
                self.pairs.push((queue.to_string(), kind.to_string()));
                self.pairs.len() - 1
            }
        };
        self.of.push(i as u32);
    }

    /// Counts the jobs that `outcomes` (in the same order) says were enqueued, not duplicates.
    pub fn enqueued(&self, outcomes: &[EnqueueOutcome]) {
        let mut pending = Pending::default();
        pending.enqueued(self, outcomes);
        pending.commit();
    }
}

/// What a transaction did, counted only once it committed.
#[derive(Default)]
pub struct Pending {
    enqueued: Vec<((String, String), u64)>,
    counts: Vec<(&'static Family, Vec<String>)>,
    /// Producer spans of the jobs enqueued, exported once committed.
    spans: Vec<crate::trace::Span>,
    /// The trace context of the task that started the transaction.
    context: Option<crate::trace::TraceContext>,
}

impl Pending {
    /// Notes the jobs of an enqueue in this transaction that were not duplicates.
    pub fn enqueued(&mut self, labels: &EnqueueLabels, outcomes: &[EnqueueOutcome]) {
        let mut per_pair = vec![0u64; labels.pairs.len()];
        for (i, outcome) in labels.of.iter().zip(outcomes) {
            if matches!(outcome, EnqueueOutcome::Enqueued { .. }) {
                per_pair[*i as usize] += 1;
            }
        }
        for (pair, n) in labels.pairs.iter().zip(per_pair) {
            if n == 0 {
                continue;
            }
            match self.enqueued.iter_mut().find(|(p, _)| p == pair) {
                Some((_, m)) => *m += n,
                None => self.enqueued.push((pair.clone(), n)),
            }
        }
    }

    /// Notes an event published in this transaction.
    pub fn event(&mut self, name: &str) {
        self.count(&EVENTS, &[name]);
    }

    /// Notes one more of `family` with these label values.
    pub fn count(&mut self, family: &'static Family, values: &[&str]) {
        self.counts.push((family, values.iter().map(|v| v.to_string()).collect()));
    }

    /// The transaction committed: count what it did.
    pub fn commit(self) {
        if !self.enqueued.is_empty() {
            let mut all = JOBS.lock().expect("telemetry poisoned");
            for ((queue, kind), n) in &self.enqueued {
                all.entry(queue, kind).enqueued += n;
            }
        }
        for (family, values) in &self.counts {
            family.inc(&values.iter().map(String::as_str).collect::<Vec<_>>());
        }
        crate::trace::export_committed(self.spans);
    }
}

/// The transaction handed to work run through [`crate::lane::Lanes`]: forwards everything to
/// the backend's and notes what to count once it commits.
pub struct CountingTx<'a> {
    pub inner: &'a mut dyn Tx,
    pub pending: Pending,
}

impl Tx for CountingTx<'_> {
    fn execute(&mut self, sql: &str, params: &[SqlValue]) -> Result<u64, BackendError> {
        self.inner.execute(sql, params)
    }
    fn query(&mut self, sql: &str, params: &[SqlValue]) -> Result<Vec<Row>, BackendError> {
        self.inner.query(sql, params)
    }
    fn defer(&mut self, sql: &str, params: &[SqlValue]) -> Result<(), BackendError> {
        self.inner.defer(sql, params)
    }
    fn execute_script(&mut self, sql: &str) -> Result<(), BackendError> {
        self.inner.execute_script(sql)
    }
    fn enqueue(&mut self, mut jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>, BackendError> {
        let labels = EnqueueLabels::of(&jobs);
        let spans = crate::trace::producer_in(self.pending.context, &mut jobs);
        let out = self.inner.enqueue(jobs)?;
        self.pending.enqueued(&labels, &out);
        self.pending.spans.extend(spans.enqueued(&out));
        Ok(out)
    }
    fn serialize_migrations(&mut self) -> Result<(), BackendError> {
        self.inner.serialize_migrations()
    }
    fn for_update(&self) -> &'static str {
        self.inner.for_update()
    }
    fn insert_rows(&mut self, head: &str, rows: &[Vec<SqlValue>], tail: &str) -> Result<Vec<Row>, BackendError> {
        self.inner.insert_rows(head, rows, tail)
    }
    fn shared_state(&mut self) -> Option<&mut dyn crate::state::TxShared> {
        self.inner.shared_state()
    }
    fn telemetry(&mut self) -> Option<&mut Pending> {
        Some(&mut self.pending)
    }
}

/// Runs `work` on a [`CountingTx`]; what it did is counted when `commit` is called with the
/// pending counts after the store committed.
pub fn counting(work: TxFn) -> (TxFn, std::sync::Arc<Mutex<Option<Pending>>>) {
    let (counted, slot) = counter();
    (Box::new(move |tx| counted(tx, Box::new(move |tx| work(tx)))), slot)
}

/// [`counting`] for set-wise work ([`crate::backend::Queue::complete_many_with`]).
pub fn counting_many(work: ManyTxFn) -> (ManyTxFn, std::sync::Arc<Mutex<Option<Pending>>>) {
    let (counted, slot) = counter();
    (Box::new(move |tx, held| counted(tx, Box::new(move |tx| work(tx, held)))), slot)
}

type Counted<'a> = Box<dyn FnOnce(&mut dyn Tx) -> Result<Box<dyn std::any::Any + Send>, BackendError> + 'a>;

/// Runs work on a [`CountingTx`] in this task's trace context, keeping what it counted in the
/// slot when it succeeds.
#[allow(clippy::type_complexity)]
fn counter() -> (
    impl FnOnce(&mut dyn Tx, Counted<'_>) -> Result<Box<dyn std::any::Any + Send>, BackendError> + Send,
    std::sync::Arc<Mutex<Option<Pending>>>,
) {
    let slot = std::sync::Arc::new(Mutex::new(None));
    let out = slot.clone();
    let context = crate::trace::current();
    let run = move |tx: &mut dyn Tx, work: Counted<'_>| {
        let mut counting = CountingTx { inner: tx, pending: Pending { context, ..Default::default() } };
        let result = work(&mut counting);
        if result.is_ok() {
            *out.lock().expect("telemetry poisoned") = Some(counting.pending);
        }
        result
    };
    (run, slot)
}

/// The outcomes of a batch of completions per (queue, kind), taken before they go to the store
/// and counted with [`Outcomes::record`] once recorded.
#[derive(Default)]
pub struct Outcomes(Vec<((String, String), JobCounts)>);

impl Outcomes {
    pub fn of(completions: &[Completion]) -> Outcomes {
        let mut out = Outcomes(Vec::new());
        for c in completions {
            let i = match out.0.iter().rposition(|((q, k), _)| *q == c.queue && *k == c.kind) {
                Some(i) => i,
                None => {
                    out.0.push(((c.queue.clone(), c.kind.clone()), JobCounts::default()));
                    out.0.len() - 1
                }
            };
            let e = &mut out.0[i].1;
            match c.outcome {
                Outcome::Completed => e.completed += 1,
                Outcome::Retry { .. } => e.retried += 1,
                Outcome::Failed { .. } => e.failed += 1,
                Outcome::Release { .. } => {
                    e.released += 1;
                    continue;
                }
            }
            e.duration.observe(c.runtime_ms);
            e.wait.observe(c.wait_ms);
        }
        out
    }

    pub fn record(self) {
        let mut all = JOBS.lock().expect("telemetry poisoned");
        for ((queue, kind), delta) in self.0 {
            all.entry(&queue, &kind).add(&delta);
        }
    }
}

impl JobCounts {
    fn add(&mut self, d: &JobCounts) {
        self.enqueued += d.enqueued;
        self.completed += d.completed;
        self.retried += d.retried;
        self.failed += d.failed;
        self.released += d.released;
        self.duration.add(&d.duration);
        self.wait.add(&d.wait);
    }
}

/// Counts what a transaction run through [`counting`] did, now that it committed.
pub fn committed(slot: &Mutex<Option<Pending>>) {
    if let Some(p) = slot.lock().expect("telemetry poisoned").take() {
        p.commit();
    }
}

/// Every (queue, kind) counted so far, in label order.
pub fn jobs() -> Vec<(String, String, JobCounts)> {
    let all = JOBS.lock().expect("telemetry poisoned");
    let mut out: Vec<_> =
        all.counts.iter().flat_map(|(q, kinds)| kinds.iter().map(move |(k, c)| (q.clone(), k.clone(), c.clone()))).collect();
    out.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
    out
}

/// A counter with labels, for what is not a job: `inc(&["order.placed"])`.
pub struct Family {
    pub name: &'static str,
    pub help: &'static str,
    pub labels: &'static [&'static str],
    values: LazyLock<Mutex<FamilyValues>>,
}

#[derive(Default)]
struct FamilyValues {
    capped: Vec<Capped>,
    counts: BTreeMap<Vec<String>, u64>,
}

impl Family {
    pub const fn new(name: &'static str, help: &'static str, labels: &'static [&'static str]) -> Family {
        Family { name, help, labels, values: LazyLock::new(Default::default) }
    }

    /// Adds `n` to the series with these label values (one per label, in order).
    pub fn add(&self, values: &[&str], n: u64) {
        debug_assert_eq!(values.len(), self.labels.len(), "{}: one value per label", self.name);
        let mut v = self.values.lock().expect("telemetry poisoned");
        if v.capped.is_empty() {
            v.capped = self.labels.iter().map(|_| Capped::default()).collect();
        }
        let key: Vec<String> = values.iter().zip(v.capped.iter_mut()).map(|(value, cap)| cap.admit(value).to_string()).collect();
        *v.counts.entry(key).or_default() += n;
    }

    pub fn inc(&self, values: &[&str]) {
        self.add(values, 1);
    }

    /// Every series: its label values and its count.
    pub fn values(&self) -> Vec<(Vec<String>, u64)> {
        self.values.lock().expect("telemetry poisoned").counts.iter().map(|(k, n)| (k.clone(), *n)).collect()
    }
}

/// Events published, counted when their transaction committed.
pub static EVENTS: Family = Family::new("conveyor_events_total", "Events published, by name.", &["event"]);
/// Notification deliveries by channel and status (`sent`, `failed`, `skipped`).
pub static DELIVERIES: Family =
    Family::new("conveyor_deliveries_total", "Notification deliveries by channel and status.", &["channel", "status"]);
/// Requests to sync partners by partner and status (the HTTP status, or `error`).
pub static SYNC_REQUESTS: Family =
    Family::new("conveyor_sync_requests_total", "Requests to sync partners by partner and HTTP status.", &["partner", "status"]);

/// Every family of labelled counters, for the exposition.
pub fn families() -> [&'static Family; 3] {
    [&EVENTS, &DELIVERIES, &SYNC_REQUESTS]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobId;

    #[test]
    fn a_family_caps_each_label_and_counts_the_rest_as_other() {
        static F: Family = Family::new("t_total", "t", &["a", "b"]);
        for i in 0..MAX_LABEL_VALUES + 20 {
            F.inc(&[&format!("v{i}"), "x"]);
        }
        let values = F.values();
        assert_eq!(values.len(), MAX_LABEL_VALUES + 1);
        let other: u64 = values.iter().filter(|(k, _)| k[0] == OTHER).map(|(_, n)| n).sum();
        assert_eq!(other, 20);
        F.add(&["v3", "x"], 4);
        assert_eq!(values.iter().map(|(_, n)| n).sum::<u64>() + 4, F.values().iter().map(|(_, n)| n).sum::<u64>());
        assert_eq!(F.values().iter().find(|(k, _)| k[0] == "v3").unwrap().1, 5);
    }

    #[test]
    fn outcomes_and_histograms_count_per_queue_and_kind() {
        let q = "telemetry-test-q";
        let job = |outcome, runtime_ms| Completion {
            id: JobId::new(),
            lease_token: 1,
            queue: q.into(),
            kind: "k".into(),
            unique_key: None,
            batch_id: None,
            workflow: None,
            outcome,
            wait_ms: 3,
            runtime_ms,
        };
        Outcomes::of(&[
            job(Outcome::Completed, 300),
            job(Outcome::Retry { at: 0, error: "e".into() }, 20),
            job(Outcome::Failed { error: "e".into() }, 7),
            job(Outcome::Release { at: 0 }, 0),
        ])
        .record();
        let mut labels = EnqueueLabels::default();
        labels.push(q, "k");
        labels.push(q, "k");
        labels.enqueued(&[EnqueueOutcome::Enqueued { id: JobId::new() }, EnqueueOutcome::Duplicate { existing: JobId::new() }]);
        let (_, _, c) = jobs().into_iter().find(|(qq, k, _)| qq == q && k == "k").unwrap();
        assert_eq!((c.enqueued, c.completed, c.retried, c.failed, c.released), (1, 1, 1, 1, 1));
        assert_eq!(c.duration.count(), 3, "a release ran nothing and is not timed");
        assert_eq!(c.duration.sum_ms, 327);
        assert_eq!(c.duration.buckets[bucket_of(300)], 1);
        assert_eq!(c.wait.sum_ms, 9);
    }
}
