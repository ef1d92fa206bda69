//! Distributed tracing across the boundary a job crosses, by W3C Trace Context and OpenTelemetry's
//! conventions for messaging.
//!
//! - A job created in a trace carries it as its tag `traceparent:<traceparent>` (stored on every
//!   backend like any tag, shown on the job's page, found with `?tag=`): the context of the span
//!   that enqueued it.
//! - The context of the code running now is a task-local ([`current`], [`in_context`]): the
//!   HTTP API sets it from a request's `traceparent` header, the worker to each attempt's span.
//!   Jobs enqueued under it ([`crate::lane::Lanes`]) join its trace; outbound calls pass it on.
//! - Spans go to the [`Exporter`] installed at start-up (OTLP/HTTP when
//!   `OTEL_EXPORTER_OTLP_ENDPOINT` is set). Without one, no span is made: tracing then costs a
//!   task-local read per enqueue and attempt, and a job keeps the context it came with.

use std::fmt::Write;
use std::sync::OnceLock;

use crate::job::{Job, JobId, NewJob};

/// The tag that carries a job's trace context.
pub const TAG_PREFIX: &str = "traceparent:";

/// A W3C trace context: the trace, the span that is the parent of what follows, and whether
/// the trace is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

impl TraceContext {
    /// A `traceparent` header value (version `00`); `None` for anything malformed, an all-zero
    /// trace or span id, or version `ff`, as the W3C specification requires.
    pub fn parse(value: &str) -> Option<TraceContext> {
        let v = value.trim();
        let parts: Vec<&str> = v.split('-').collect();
        if parts.len() < 4 || parts[0].len() != 2 || parts[1].len() != 32 || parts[2].len() != 16 || parts[3].len() != 2 {
            return None;
        }
        if parts[0] == "ff" || (parts[0] == "00" && parts.len() != 4) {
            return None;
        }
        hex::<1>(parts[0])?;
        let trace_id = hex::<16>(parts[1])?;
        let span_id = hex::<8>(parts[2])?;
        let flags = hex::<1>(parts[3])?[0];
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(TraceContext { trace_id, span_id, sampled: flags & 1 == 1 })
    }

    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        for b in self.trace_id {
            let _ = write!(s, "{b:02x}");
        }
        s.push('-');
        for b in self.span_id {
            let _ = write!(s, "{b:02x}");
        }
        s.push_str(if self.sampled { "-01" } else { "-00" });
        s
    }

    /// A new trace, sampled.
    pub fn root() -> TraceContext {
        TraceContext { trace_id: new_trace_id(), span_id: new_span_id(), sampled: true }
    }

    /// The same trace under another span.
    pub fn child(&self, span_id: [u8; 8]) -> TraceContext {
        TraceContext { span_id, ..*self }
    }
}

fn hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    // Lower-case only, as the specification says.
    if s.len() != 2 * N || !s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

pub fn new_trace_id() -> [u8; 16] {
    loop {
        let id: [u8; 16] = rand::random();
        if id != [0; 16] {
            return id;
        }
    }
}

pub fn new_span_id() -> [u8; 8] {
    loop {
        let id: [u8; 8] = rand::random();
        if id != [0; 8] {
            return id;
        }
    }
}

/// The span id of a job's attempt, derived from the job and the attempt so that the next
/// attempt can link to the one before without storing it.
pub fn attempt_span_id(job: JobId, attempt: u32) -> [u8; 8] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(job.to_string().as_bytes());
    h.update(attempt.to_be_bytes());
    let d = h.finalize();
    let mut id = [0u8; 8];
    id.copy_from_slice(&d[..8]);
    if id == [0; 8] {
        id[7] = 1;
    }
    id
}

/// The trace of a job that came in none: derived from its id, sampled.
fn job_root(job: JobId) -> TraceContext {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(job.to_string().as_bytes());
    let mut trace_id = [0u8; 16];
    trace_id.copy_from_slice(&d[..16]);
    if trace_id == [0; 16] {
        trace_id[15] = 1;
    }
    TraceContext { trace_id, span_id: attempt_span_id(job, 0), sampled: true }
}

/// The trace context a job was created in, from its tags.
pub fn of_tags(tags: &[String]) -> Option<TraceContext> {
    tags.iter().find_map(|t| t.strip_prefix(TAG_PREFIX)).and_then(TraceContext::parse)
}

pub fn of_job(job: &Job) -> Option<TraceContext> {
    of_tags(&job.tags)
}

impl NewJob {
    /// Puts this job in the trace of `traceparent` (a W3C header value); a malformed value is
    /// ignored, as a tracer ignores a malformed header.
    pub fn traceparent(self, traceparent: &str) -> Self {
        match TraceContext::parse(traceparent) {
            Some(ctx) => self.in_trace(ctx),
            None => self,
        }
    }

    /// Puts this job in `ctx`'s trace, replacing the context it had.
    pub fn in_trace(mut self, ctx: TraceContext) -> Self {
        self.set_trace(ctx);
        self
    }

    pub fn set_trace(&mut self, ctx: TraceContext) {
        self.tags.retain(|t| !t.starts_with(TAG_PREFIX));
        self.tags.push(format!("{TAG_PREFIX}{}", ctx.traceparent()));
    }
}

tokio::task_local! {
    static CURRENT: TraceContext;
}

/// The trace context of the code running now, if any.
pub fn current() -> Option<TraceContext> {
    CURRENT.try_with(|c| *c).ok()
}

/// Runs `f` with `ctx` as the current trace context.
pub async fn in_context<F: std::future::Future>(ctx: Option<TraceContext>, f: F) -> F::Output {
    match ctx {
        Some(ctx) => CURRENT.scope(ctx, f).await,
        None => f.await,
    }
}

/// What a span is to the operation it measures (OpenTelemetry's span kinds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpanKind {
    Internal,
    Server,
    Client,
    Producer,
    Consumer,
}

/// An attribute value.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    Str(String),
    Int(i64),
    Bool(bool),
}

/// A finished span, as exported.
#[derive(Clone, Debug)]
pub struct Span {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    /// Unix nanoseconds.
    pub start_ns: u64,
    pub end_ns: u64,
    pub attributes: Vec<(&'static str, Value)>,
    /// Other spans this one follows from (a retry links to the attempt before).
    pub links: Vec<TraceContext>,
    /// `Some(message)` when the operation failed.
    pub error: Option<String>,
}

/// Where finished spans go.
pub trait Exporter: Send + Sync {
    /// Takes a finished span; must not block (queue it and send it later).
    fn export(&self, span: Span);
}

static EXPORTER: OnceLock<Box<dyn Exporter>> = OnceLock::new();

/// Installs the process's exporter; the first call wins. Returns whether this one was installed.
pub fn set_exporter(exporter: Box<dyn Exporter>) -> bool {
    EXPORTER.set(exporter).is_ok()
}

/// Whether spans are exported (an exporter is installed).
pub fn enabled() -> bool {
    EXPORTER.get().is_some()
}

/// Hands a finished span to the exporter, if there is one and its trace is sampled.
pub fn export(span: Span, sampled: bool) {
    if let (Some(e), true) = (EXPORTER.get(), sampled) {
        e.export(span);
    }
}

pub fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// The producer spans of one enqueue, each with the index of its job, exported once the jobs
/// are committed ([`Produced::done`]).
#[derive(Default)]
pub struct Produced(Vec<(usize, Span)>);

impl Produced {
    /// Exports the spans of the jobs that were enqueued (not duplicates of a unique job), ended
    /// now.
    pub fn done(self, outcomes: &[crate::job::EnqueueOutcome]) {
        if self.0.is_empty() {
            return;
        }
        let end = now_ns();
        for (i, mut s) in self.0 {
            if matches!(outcomes.get(i), Some(crate::job::EnqueueOutcome::Enqueued { .. })) {
                s.end_ns = end.max(s.start_ns);
                export(s, true);
            }
        }
    }

    /// Keeps the spans of the jobs enqueued, for a transaction to export once it commits.
    pub fn enqueued(self, outcomes: &[crate::job::EnqueueOutcome]) -> Vec<Span> {
        self.0
            .into_iter()
            .filter(|(i, _)| matches!(outcomes.get(*i), Some(crate::job::EnqueueOutcome::Enqueued { .. })))
            .map(|(_, s)| s)
            .collect()
    }
}

/// Exports the producer spans of a transaction that committed, ended now.
pub fn export_committed(spans: Vec<Span>) {
    let end = now_ns();
    for mut s in spans {
        s.end_ns = end.max(s.start_ns);
        export(s, true);
    }
}

/// Gives each job of an enqueue its trace context and, when spans are exported, records a
/// producer span per job: the job's context is then that span's (the attempts become its
/// children), and the span's parent is the context the job came with or the current one. Jobs
/// with neither keep no context and get no span, unless spans are exported, in which case they
/// start a trace of their own. A context that is not sampled is passed on as it is, with no
/// span.
pub fn producer(jobs: &mut [NewJob]) -> Produced {
    producer_in(current(), jobs)
}

/// [`producer`] under `current`, for work that runs away from the task that started it (a
/// transaction's closure on the store's thread).
pub fn producer_in(current: Option<TraceContext>, jobs: &mut [NewJob]) -> Produced {
    let exporting = enabled();
    let mut spans = Vec::new();
    if !exporting && current.is_none() {
        return Produced(spans);
    }
    let now = now_ns();
    for (i, job) in jobs.iter_mut().enumerate() {
        let own = of_tags(&job.tags);
        let parent = own.or(current);
        if !exporting || parent.is_some_and(|p| !p.sampled) {
            if let (None, Some(c)) = (own, parent) {
                job.set_trace(c);
            }
            continue;
        }
        let ctx = match parent {
            Some(p) => p.child(new_span_id()),
            None => TraceContext::root(),
        };
        let queue = crate::lane::base(&job.queue).to_string();
        spans.push((
            i,
            Span {
                trace_id: ctx.trace_id,
                span_id: ctx.span_id,
                parent_span_id: parent.map(|p| p.span_id),
                name: format!("publish {queue}"),
                kind: SpanKind::Producer,
                start_ns: now,
                end_ns: now,
                attributes: vec![
                    ("messaging.system", Value::Str("conveyor".into())),
                    ("messaging.operation.type", Value::Str("send".into())),
                    ("messaging.destination.name", Value::Str(queue)),
                    ("messaging.message.id", Value::Str(job.id.to_string())),
                    ("conveyor.job.kind", Value::Str(job.kind.clone())),
                ],
                links: Vec::new(),
                error: None,
            },
        ));
        job.set_trace(ctx);
    }
    Produced(spans)
}

/// The span of one attempt of a job, begun when it starts running.
pub struct Attempt {
    pub ctx: TraceContext,
    parent: Option<TraceContext>,
    start_ns: u64,
    name: String,
    attributes: Vec<(&'static str, Value)>,
    links: Vec<TraceContext>,
}

impl Attempt {
    /// The attempt's span when spans are exported, or the job's context when it has one; its
    /// `ctx` is what the attempt runs under.
    pub fn begin(job: &Job) -> Option<Attempt> {
        let parent = of_job(job);
        if !enabled() {
            // Nothing is exported: the attempt runs in the job's context as it came, so what
            // it calls is the child of a span that exists.
            return parent.map(|ctx| Attempt { ctx, parent, start_ns: 0, name: String::new(), attributes: Vec::new(), links: Vec::new() });
        }
        // A job that came in no trace (enqueued before export was on, or not through `Lanes`)
        // gets one derived from its id, the same for every attempt, so retries link within it.
        let base = parent.unwrap_or_else(|| job_root(job.id));
        let ctx = base.child(attempt_span_id(job.id, job.attempt));
        let links = if job.attempt > 1 { vec![base.child(attempt_span_id(job.id, job.attempt - 1))] } else { Vec::new() };
        let queue = crate::lane::base(&job.queue).to_string();
        Some(Attempt {
            ctx,
            parent,
            start_ns: now_ns(),
            name: format!("process {queue}"),
            attributes: vec![
                ("messaging.system", Value::Str("conveyor".into())),
                ("messaging.operation.type", Value::Str("process".into())),
                ("messaging.destination.name", Value::Str(queue)),
                ("messaging.message.id", Value::Str(job.id.to_string())),
                ("conveyor.job.kind", Value::Str(job.kind.clone())),
                ("conveyor.job.attempt", Value::Int(job.attempt as i64)),
            ],
            links,
        })
    }

    /// Ends the span with the attempt's outcome (`completed`, `retried`, `failed`, `released`)
    /// and its error, if it failed.
    pub fn end(mut self, outcome: &str, error: Option<String>) {
        if !enabled() {
            return;
        }
        if outcome == "released" {
            // The attempt was given back and runs again under the same number, whose span
            // takes the derived id (the one the next attempt links to): this run gets its own.
            self.ctx.span_id = new_span_id();
        }
        self.attributes.push(("conveyor.job.outcome", Value::Str(outcome.to_string())));
        export(
            Span {
                trace_id: self.ctx.trace_id,
                span_id: self.ctx.span_id,
                parent_span_id: self.parent.map(|p| p.span_id),
                name: self.name,
                kind: SpanKind::Consumer,
                start_ns: self.start_ns,
                end_ns: now_ns().max(self.start_ns),
                attributes: self.attributes,
                links: self.links,
                error,
            },
            self.ctx.sampled,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips_and_malformed_values_are_refused() {
        let v = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let c = TraceContext::parse(v).unwrap();
        assert!(c.sampled);
        assert_eq!(c.traceparent(), v);
        assert!(!TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap().sampled);
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "0x-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert_eq!(TraceContext::parse(bad), None, "{bad:?}");
        }
        // A later version may add fields after the flags.
        assert!(TraceContext::parse("01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-abc").is_some());
    }

    #[test]
    fn a_job_carries_one_context_as_a_tag() {
        let a = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let b = "00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let job = NewJob::raw("k", "{}".into()).tag("x").traceparent(a).traceparent(b).traceparent("junk");
        assert_eq!(job.tags.len(), 2);
        assert_eq!(of_tags(&job.tags).unwrap().traceparent(), b);
    }

    #[tokio::test]
    async fn jobs_enqueued_under_a_context_join_its_trace() {
        let ctx = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
        let mut jobs = vec![NewJob::raw("k", "{}".into())];
        // No exporter in this test binary: no span, the job joins the current context as is.
        let spans = in_context(Some(ctx), async { producer(&mut jobs) }).await;
        assert!(spans.0.is_empty());
        assert_eq!(of_tags(&jobs[0].tags), Some(ctx));
        let mut outside = vec![NewJob::raw("k", "{}".into())];
        assert!(producer(&mut outside).0.is_empty());
        assert!(of_tags(&outside[0].tags).is_none());
    }

    #[test]
    fn attempt_span_ids_are_stable_per_attempt() {
        let id = JobId::new();
        assert_eq!(attempt_span_id(id, 2), attempt_span_id(id, 2));
        assert_ne!(attempt_span_id(id, 1), attempt_span_id(id, 2));
    }
}
