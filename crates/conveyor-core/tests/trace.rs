//! Spans as the engine makes them, with an exporter installed (a process of its own: the
//! exporter is process-wide, and the unit tests run without one).

use std::sync::{Arc, Mutex};

use conveyor_core::job::{EnqueueOutcome, Job, JobId, NewJob};
use conveyor_core::trace::{self, Attempt, Exporter, Span, SpanKind, TraceContext};

struct Collect(Arc<Mutex<Vec<Span>>>);

impl Exporter for Collect {
    fn export(&self, span: Span) {
        self.0.lock().unwrap().push(span);
    }
}

fn job_of(new: &NewJob, attempt: u32) -> Job {
    Job {
        id: new.id,
        queue: new.queue.clone(),
        kind: new.kind.clone(),
        payload: new.payload.clone(),
        attempt,
        max_attempts: 3,
        backoff: None,
        timeout: None,
        priority: 0,
        tags: new.tags.clone(),
        unique_key: None,
        batch_id: None,
        workflow: None,
        created_at: 0,
        available_at: 0,
        reserved_at: 0,
        lease_token: 1,
    }
}

/// One test, in order: the exporter is installed once for the process.
#[tokio::test]
async fn spans_follow_the_job_from_enqueue_through_its_attempts() {
    let spans = Arc::new(Mutex::new(Vec::new()));
    assert!(trace::set_exporter(Box::new(Collect(spans.clone()))));
    let take = || std::mem::take(&mut *spans.lock().unwrap());

    // Enqueued in a request's trace: a producer span, child of the request's span; the job's
    // context is the producer span's.
    let request = TraceContext::parse("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").unwrap();
    let mut jobs = vec![NewJob::raw("k", "{}".into()).queue("q"), NewJob::raw("k", "{}".into()).queue("q")];
    let produced = trace::in_context(Some(request), async { trace::producer(&mut jobs) }).await;
    // The second was a duplicate of a unique job: no span for a job that does not exist.
    produced.done(&[EnqueueOutcome::Enqueued { id: jobs[0].id }, EnqueueOutcome::Duplicate { existing: JobId::new() }]);
    let exported = take();
    assert_eq!(exported.len(), 1);
    let producer = &exported[0];
    assert_eq!((producer.kind, producer.name.as_str()), (SpanKind::Producer, "publish q"));
    assert_eq!((producer.trace_id, producer.parent_span_id), (request.trace_id, Some(request.span_id)));
    let ctx = trace::of_tags(&jobs[0].tags).unwrap();
    assert_eq!((ctx.trace_id, ctx.span_id), (request.trace_id, producer.span_id));

    // Attempt 1 fails, attempt 2 is released (given back unspent) and runs again as attempt 2,
    // which completes and links to attempt 1.
    let a1 = Attempt::begin(&job_of(&jobs[0], 1)).unwrap();
    let a1_id = a1.ctx.span_id;
    a1.end("retried", Some("boom".into()));
    Attempt::begin(&job_of(&jobs[0], 2)).unwrap().end("released", None);
    let a2 = Attempt::begin(&job_of(&jobs[0], 2)).unwrap();
    a2.end("completed", None);
    let exported = take();
    assert_eq!(exported.len(), 3);
    assert!(exported.iter().all(|s| s.kind == SpanKind::Consumer && s.parent_span_id == Some(producer.span_id)));
    assert_eq!(exported[0].error.as_deref(), Some("boom"));
    let ids: std::collections::HashSet<_> = exported.iter().map(|s| s.span_id).collect();
    assert_eq!(ids.len(), 3, "a released run has a span id of its own");
    assert_eq!(exported[2].links.iter().map(|l| l.span_id).collect::<Vec<_>>(), vec![a1_id], "the retry links to attempt 1");
    assert!(exported[1].links.iter().all(|l| l.span_id == a1_id));

    // A trace that is not sampled: the context goes on as it came, and nothing is exported.
    let unsampled = TraceContext::parse("00-5bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00").unwrap();
    let mut jobs = vec![NewJob::raw("k", "{}".into())];
    let produced = trace::in_context(Some(unsampled), async { trace::producer(&mut jobs) }).await;
    produced.done(&[EnqueueOutcome::Enqueued { id: jobs[0].id }]);
    assert_eq!(trace::of_tags(&jobs[0].tags), Some(unsampled));
    let a = Attempt::begin(&job_of(&jobs[0], 1)).unwrap();
    assert_eq!(a.ctx.trace_id, unsampled.trace_id);
    a.end("completed", None);
    assert!(take().is_empty(), "nothing of an unsampled trace is exported");

    // A job that came in no trace: every attempt in the same trace, derived from the job.
    let plain = NewJob::raw("k", "{}".into());
    let (b1, b2) = (Attempt::begin(&job_of(&plain, 1)).unwrap(), Attempt::begin(&job_of(&plain, 2)).unwrap());
    assert_eq!(b1.ctx.trace_id, b2.ctx.trace_id);
    let b1_id = b1.ctx.span_id;
    b1.end("retried", Some("x".into()));
    b2.end("completed", None);
    let exported = take();
    assert_eq!(exported[1].links.iter().map(|l| (l.trace_id, l.span_id)).collect::<Vec<_>>(), vec![(exported[0].trace_id, b1_id)]);
}
