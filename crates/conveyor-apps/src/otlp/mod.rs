//! Trace export over OTLP/HTTP with protobuf (SPEC "Telemetry"): the engine's spans
//! ([`conveyor_core::trace`]) go to an OpenTelemetry collector, configured by the standard
//! OpenTelemetry variables.
//!
//! - [`install_from_env`] reads the variables ([`Settings::from_vars`]), starts the exporter
//!   on the current Tokio runtime and installs it ([`conveyor_core::trace::set_exporter`]);
//!   nothing when no endpoint is configured. The [`Flush`] it returns sends what is queued at
//!   graceful shutdown.
//! - [`Exporter::export`](conveyor_core::trace::Exporter::export) never blocks: a span goes into
//!   a bounded queue (`OTEL_BSP_MAX_QUEUE_SIZE`) or, when that is full, is dropped and counted. A
//!   background task sends batches of up to `OTEL_BSP_MAX_EXPORT_BATCH_SIZE` every
//!   `OTEL_BSP_SCHEDULE_DELAY`, and at once when a full batch is waiting.
//! - A batch is one `POST` of an `ExportTraceServiceRequest` (encoded by hand, `proto.rs`), tried
//!   up to three times when the collector answers 429, 502, 503 or 504 or cannot be reached
//!   (exponential backoff, or its `Retry-After`), within `OTEL_BSP_EXPORT_TIMEOUT`; any other
//!   failure drops the batch. Failures and drops are logged at most once a minute each. Header
//!   values (API keys) are never logged, nor the endpoint's user information or query.
//! - Not supported: gRPC and `http/json` (start-up fails naming the variable), gzip (sent
//!   uncompressed, with a warning), `OTEL_EXPORTER_OTLP_CERTIFICATE` and client certificates
//!   (HTTPS trusts the bundled web PKI roots), samplers (the engine samples by the W3C flag).

mod proto;
mod settings;

use settings::{check_url, header, invalid};
pub use settings::{OtlpError, Settings};

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use conveyor_core::trace::{self, Span};
use rand::Rng;
use reqwest::header::{HeaderMap, HeaderValue, CONTENT_TYPE, USER_AGENT};
use tokio::sync::{mpsc, oneshot, Notify};

/// The instrumentation scope of every span, and `telemetry.sdk.name`.
pub const SCOPE: &str = "conveyor";
const VERSION: &str = env!("CARGO_PKG_VERSION");

/// Tries of one batch (the first included).
const MAX_TRIES: u32 = 3;
/// The first retry's backoff; each next one doubles it (with jitter).
const BACKOFF: Duration = Duration::from_millis(500);
/// The shortest schedule: `OTEL_BSP_SCHEDULE_DELAY=0` does not make the task spin.
pub const MIN_SCHEDULE_DELAY: Duration = Duration::from_millis(10);
/// How often a kind of failure is logged at most.
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Reads the OpenTelemetry variables of the process's environment, and when they configure an
/// endpoint starts the exporter on the current Tokio runtime and installs it. Returns the
/// handle that sends what is queued at shutdown, `None` when export is off.
pub fn install_from_env() -> Result<Option<Flush>, OtlpError> {
    let mut vars = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Some(k) = k.to_str().filter(|k| k.starts_with("OTEL_")).map(str::to_string) else { continue };
        let v = v.into_string().map_err(|_| invalid(&k, "is not valid UTF-8"))?;
        vars.push((k, v));
    }
    let Some(settings) = Settings::from_vars(vars)? else { return Ok(None) };
    let endpoint = settings.endpoint_for_logs();
    let (exporter, flush) = Exporter::new(settings)?;
    if !trace::set_exporter(Box::new(exporter)) {
        return Err(OtlpError::AlreadyInstalled);
    }
    tracing::info!(%endpoint, "exporting traces over OTLP/HTTP");
    Ok(Some(flush))
}

/// The OTLP exporter: queues spans for the background task [`Exporter::new`] starts.
pub struct Exporter {
    shared: Arc<Shared>,
}

struct Shared {
    queue: Mutex<VecDeque<Span>>,
    max_queue_size: usize,
    batch_size: usize,
    /// Woken when a full batch is waiting.
    full_batch: Notify,
    exported: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
}

impl Shared {
    fn len(&self) -> usize {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    fn take(&self, n: usize) -> Vec<Span> {
        let mut q = self.queue.lock().unwrap_or_else(PoisonError::into_inner);
        let n = n.min(q.len());
        q.drain(..n).collect()
    }
}

/// Counts since the exporter started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// Spans the collector accepted (less any it said it rejected).
    pub exported: u64,
    /// Spans dropped because the queue was full.
    pub dropped: u64,
    /// Spans of batches that could not be sent, or that the collector rejected.
    pub failed: u64,
}

impl Exporter {
    /// Starts the background task on the current Tokio runtime; returns the exporter (to
    /// install, or to call directly) and the handle that flushes it.
    pub fn new(settings: Settings) -> Result<(Exporter, Flush), OtlpError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| OtlpError::NoRuntime)?;
        check_url("endpoint", &settings.endpoint)?;
        let mut headers = HeaderMap::new();
        for (k, v) in &settings.headers {
            let (name, mut value) = header("headers", k, v)?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/x-protobuf"));
        headers.insert(USER_AGENT, HeaderValue::from_static(concat!("conveyor/", env!("CARGO_PKG_VERSION"))));
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(settings.timeout)
            .connect_timeout(settings.timeout.min(Duration::from_secs(5)))
            .build()
            .map_err(|e| OtlpError::Client(e.to_string()))?;
        let shared = Arc::new(Shared {
            queue: Mutex::new(VecDeque::new()),
            max_queue_size: settings.max_queue_size.max(1),
            batch_size: settings.max_export_batch_size.clamp(1, settings.max_queue_size.max(1)),
            full_batch: Notify::new(),
            exported: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            failed: AtomicU64::new(0),
        });
        let sender = Sender {
            client,
            endpoint: settings.endpoint.clone(),
            endpoint_for_logs: settings.endpoint_for_logs(),
            headers,
            timeout: settings.timeout,
            export_timeout: settings.export_timeout,
            backoff: BACKOFF,
            resource: settings.resource,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        runtime.spawn(run(shared.clone(), sender, settings.schedule_delay.max(MIN_SCHEDULE_DELAY), rx));
        Ok((Exporter { shared: shared.clone() }, Flush { shared, requests: tx }))
    }
}

impl trace::Exporter for Exporter {
    fn export(&self, span: Span) {
        let s = &self.shared;
        let mut q = s.queue.lock().unwrap_or_else(PoisonError::into_inner);
        if q.len() >= s.max_queue_size {
            drop(q);
            s.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        q.push_back(span);
        let full = q.len() >= s.batch_size;
        drop(q);
        if full {
            s.full_batch.notify_one();
        }
    }
}

/// Sends what the exporter has queued; for graceful shutdown. Cloning gives another handle to
/// the same exporter.
#[derive(Clone)]
pub struct Flush {
    shared: Arc<Shared>,
    requests: mpsc::UnboundedSender<FlushRequest>,
}

struct FlushRequest {
    deadline: Instant,
    done: oneshot::Sender<bool>,
}

impl Flush {
    /// Sends every span queued now (after the batch being sent, if any), giving up after
    /// `deadline`. Returns whether all of them reached the collector.
    pub async fn flush(&self, deadline: Duration) -> bool {
        let (done, answer) = oneshot::channel();
        let at = Instant::now() + deadline;
        if self.requests.send(FlushRequest { deadline: at, done }).is_err() {
            return false;
        }
        matches!(tokio::time::timeout_at(at.into(), answer).await, Ok(Ok(true)))
    }

    pub fn stats(&self) -> Stats {
        let s = &self.shared;
        Stats {
            exported: s.exported.load(Ordering::Relaxed),
            dropped: s.dropped.load(Ordering::Relaxed),
            failed: s.failed.load(Ordering::Relaxed),
        }
    }

    /// Spans waiting to be sent.
    pub fn queued(&self) -> usize {
        self.shared.len()
    }
}

/// A warning logged at most once per [`WARN_EVERY`], with the count of what happened since.
#[derive(Default)]
struct Limited {
    last: Option<Instant>,
}

impl Limited {
    fn due(&mut self) -> bool {
        let now = Instant::now();
        if self.last.is_some_and(|t| now.duration_since(t) < WARN_EVERY) {
            return false;
        }
        self.last = Some(now);
        true
    }
}

/// The background task: waits for the schedule, a full batch or a flush, then sends what is
/// queued in batches.
async fn run(shared: Arc<Shared>, sender: Sender, delay: Duration, mut flushes: mpsc::UnboundedReceiver<FlushRequest>) {
    let (mut drop_warn, mut fail_warn) = (Limited::default(), Limited::default());
    let (mut dropped_seen, mut failed_unreported, mut failures_unreported) = (0u64, 0u64, 0u64);
    let mut handles_alive = true;
    loop {
        // Nobody can export or flush any more (an exporter that was never installed is gone).
        if Arc::strong_count(&shared) == 1 && !handles_alive && shared.len() == 0 {
            return;
        }
        let flush = tokio::select! {
            _ = tokio::time::sleep(delay) => None,
            _ = shared.full_batch.notified() => None,
            r = flushes.recv(), if handles_alive => match r {
                Some(r) => Some(r),
                None => {
                    handles_alive = false;
                    None
                }
            },
        };
        let deadline = flush.as_ref().map(|f| f.deadline);
        // What is queued now, so that a steady flow cannot keep this loop from a flush.
        let mut left = shared.len();
        let mut all_sent = true;
        while left > 0 {
            let batch = shared.take(left.min(shared.batch_size));
            if batch.is_empty() {
                left = 0;
                break;
            }
            left -= batch.len();
            let n = batch.len() as u64;
            match sender.send(&batch, deadline).await {
                Ok(rejected) => {
                    shared.exported.fetch_add(n - rejected.as_ref().map_or(0, |r| r.0.clamp(0, n as i64) as u64), Ordering::Relaxed);
                    if let Some((count, message)) = rejected {
                        shared.failed.fetch_add(count.clamp(0, n as i64) as u64, Ordering::Relaxed);
                        if fail_warn.due() {
                            tracing::warn!(
                                endpoint = %sender.endpoint_for_logs,
                                rejected = count,
                                message = %conveyor_core::redact::scrub(&message),
                                "the OTLP collector rejected spans"
                            );
                        }
                    }
                }
                Err(e) => {
                    all_sent = false;
                    shared.failed.fetch_add(n, Ordering::Relaxed);
                    failed_unreported += n;
                    failures_unreported += 1;
                    if fail_warn.due() {
                        tracing::warn!(
                            endpoint = %sender.endpoint_for_logs,
                            error = %e,
                            batches = failures_unreported,
                            spans = failed_unreported,
                            "trace export failed; the spans are dropped"
                        );
                        (failed_unreported, failures_unreported) = (0, 0);
                    }
                }
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                all_sent = false;
                break;
            }
        }
        let dropped = shared.dropped.load(Ordering::Relaxed);
        if dropped > dropped_seen && drop_warn.due() {
            tracing::warn!(
                spans = dropped - dropped_seen,
                max_queue_size = shared.max_queue_size,
                "the trace export queue is full (OTEL_BSP_MAX_QUEUE_SIZE): spans dropped"
            );
            dropped_seen = dropped;
        }
        if let Some(f) = flush {
            let _ = f.done.send(all_sent && left == 0);
        }
    }
}

struct Sender {
    client: reqwest::Client,
    endpoint: String,
    endpoint_for_logs: String,
    headers: HeaderMap,
    timeout: Duration,
    export_timeout: Duration,
    backoff: Duration,
    resource: Vec<(String, String)>,
}

impl Sender {
    /// Sends one batch, retrying what may succeed later. `Ok` with what the collector said it
    /// rejected, if anything.
    /// The error says why (no URL, no header value).
    async fn send(&self, spans: &[Span], flush_deadline: Option<Instant>) -> Result<Option<(i64, String)>, String> {
        let body = proto::export_request(&self.resource, (SCOPE, VERSION), spans);
        let mut deadline = Instant::now() + self.export_timeout;
        if let Some(d) = flush_deadline {
            deadline = deadline.min(d);
        }
        let mut tries = 0;
        loop {
            tries += 1;
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!("no time left after {} tries", tries - 1));
            }
            let res = self
                .client
                .post(&self.endpoint)
                .headers(self.headers.clone())
                .timeout(self.timeout.min(left))
                .body(body.clone())
                .send()
                .await;
            let (error, wait) = match res {
                Ok(resp) if resp.status().is_success() => {
                    let body = crate::outbound::read_capped(resp, 64 * 1024).await.unwrap_or_default();
                    return Ok(proto::rejected_spans(&body));
                }
                Ok(resp) => {
                    let code = resp.status().as_u16();
                    let after = crate::outbound::retry_after(resp.headers());
                    let excerpt = conveyor_core::redact::scrub(&crate::outbound::excerpt(resp, 4096, 200).await);
                    let error = if excerpt.is_empty() { format!("HTTP {code}") } else { format!("HTTP {code}: {excerpt}") };
                    if !matches!(code, 429 | 502 | 503 | 504) {
                        return Err(error);
                    }
                    (error, after.unwrap_or_else(|| self.backoff(tries)))
                }
                Err(e) if e.is_connect() || e.is_timeout() => (describe(&e), self.backoff(tries)),
                Err(e) => return Err(describe(&e)),
            };
            if tries >= MAX_TRIES {
                return Err(format!("{error} ({tries} tries)"));
            }
            if Instant::now() + wait >= deadline {
                return Err(format!("{error} (no time left to try again)"));
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Exponential backoff after try `n`, with jitter: [½, 1] × base × 2ⁿ⁻¹.
    fn backoff(&self, n: u32) -> Duration {
        let full = self.backoff * 2u32.saturating_pow(n.saturating_sub(1));
        full.mul_f64(rand::thread_rng().gen_range(0.5..=1.0))
    }
}

/// A transport error with its causes, without the URL.
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() { "timed out".to_string() } else { "request failed".to_string() };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

#[cfg(test)]
mod tests;
