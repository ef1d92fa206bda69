//! Domain events and their listeners, with an event log.
//!
//! A listener is either *inline* (run in the emitting process right after the event commits;
//! errors are logged) or *queued* (a job of kind `listener:<event>:<name>` on its own queue).
//! Emitting writes the event-log row and enqueues the queued listeners in one transaction —
//! inside the caller's own transaction with [`Conveyor::emit_in`] — so a rolled-back write
//! emits nothing and a committed one is never lost (a transactional outbox).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::{count_sql, BackendError, Cursor, Page, Paged, QueueBackend, QueueBackendExt, Result, RowExt, Tx};
use crate::clock::now_ms;
use crate::job::{JobId, NewJob};
use crate::registry::{JobContext, JobResult, Registry};
use crate::Conveyor;

/// An event type with a fixed name.
pub trait DomainEvent: Serialize {
    const NAME: &'static str;
}

/// An event to emit: a name and a JSON payload.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub name: String,
    pub payload: serde_json::Value,
}

impl Event {
    pub fn new(name: impl Into<String>, payload: &impl Serialize) -> Self {
        Event { name: name.into(), payload: serde_json::to_value(payload).unwrap_or(serde_json::Value::Null) }
    }

    pub fn of<E: DomainEvent>(event: &E) -> Self {
        Event::new(E::NAME, event)
    }
}

/// What a queued listener receives.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventEnvelope<T> {
    pub event_id: String,
    pub event: String,
    pub payload: T,
}

/// An event as logged.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct EventRecord {
    pub id: String,
    pub name: String,
    #[cfg_attr(feature = "openapi", schema(value_type = Object))]
    pub payload: serde_json::Value,
    pub listeners: Vec<ListenerRun>,
    pub created_at: i64,
}

/// A listener the event went to; `job_id` for queued ones (its status is the job's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ListenerRun {
    pub listener: String,
    pub mode: String,
    pub job_id: Option<String>,
}

type InlineFn = Arc<dyn Fn(EventRecord) -> Pin<Box<dyn Future<Output = Result<(), String>> + Send>> + Send + Sync>;

/// Decides, inside the emitting transaction, whether a queued listener wants an event.
pub type ListenerGuard = Arc<dyn Fn(&mut dyn Tx, &str) -> Result<bool> + Send + Sync>;

#[derive(Clone)]
pub(crate) enum Listener {
    Inline {
        name: String,
        run: InlineFn,
    },
    /// `bare`: the job's payload is the event's payload itself rather than an
    /// [`EventEnvelope`] (a kind routed to an event, see [`Registry::route_event`]).
    Queued {
        name: String,
        queue: String,
        kind: String,
        guard: Option<ListenerGuard>,
        bare: bool,
    },
}

impl Registry {
    /// A listener that runs as a job on `queue` for every `event` (`"*"`: every event of any
    /// name, e.g. a notification service matching rules against whatever arrives).
    pub fn listen_queued<T, F, Fut>(&mut self, event: &str, name: &str, queue: &str, handler: F) -> &mut Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(EventEnvelope<T>, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        self.add_queued(event, name, queue, None, handler)
    }

    /// A queued listener that gets only the events `guard` accepts. The guard runs inside the
    /// emitting transaction, so it may read the store (a notification service asks whether any
    /// rule names the event) and its answer is consistent with what commits; events it refuses
    /// cost no job.
    pub fn listen_queued_when<T, G, F, Fut>(&mut self, event: &str, name: &str, queue: &str, guard: G, handler: F) -> &mut Self
    where
        T: DeserializeOwned + Send + 'static,
        G: Fn(&mut dyn Tx, &str) -> Result<bool> + Send + Sync + 'static,
        F: Fn(EventEnvelope<T>, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        self.add_queued(event, name, queue, Some(Arc::new(guard)), handler)
    }

    fn add_queued<T, F, Fut>(&mut self, event: &str, name: &str, queue: &str, guard: Option<ListenerGuard>, handler: F) -> &mut Self
    where
        T: DeserializeOwned + Send + 'static,
        F: Fn(EventEnvelope<T>, JobContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        let kind = format!("listener:{}:{name}", if event == "*" { "any" } else { event });
        self.register(&kind, handler);
        self.listeners.entry(event.to_string()).or_default().push(Listener::Queued {
            name: name.to_string(),
            queue: queue.to_string(),
            kind,
            guard,
            bare: false,
        });
        self
    }

    /// Makes each `event` one job of the already registered `kind` on `queue`, whose payload
    /// is the event's payload, enqueued in the emitting transaction (a queued listener that is
    /// an existing kind: an HTTP kind's `listen`).
    pub fn route_event(&mut self, event: &str, kind: &str, queue: &str) -> &mut Self {
        self.listeners.entry(event.to_string()).or_default().push(Listener::Queued {
            name: kind.to_string(),
            queue: queue.to_string(),
            kind: kind.to_string(),
            guard: None,
            bare: true,
        });
        self
    }

    /// A listener that runs in the emitting process once the event is committed.
    pub fn listen_inline<F, Fut>(&mut self, event: &str, name: &str, handler: F) -> &mut Self
    where
        F: Fn(EventRecord) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let run: InlineFn = Arc::new(move |e| Box::pin(handler(e)));
        self.listeners.entry(event.to_string()).or_default().push(Listener::Inline { name: name.to_string(), run });
        self
    }
}

impl Conveyor {
    /// Logs `event`, enqueues its queued listeners in the same transaction, then runs its inline
    /// listeners. Returns the event id.
    pub async fn emit(&self, event: Event) -> Result<String> {
        let this = self.clone();
        let ev = event.clone();
        let id = self.backend().transact(move |tx| this.emit_in(tx, ev)).await?;
        self.run_inline(&id, event).await;
        Ok(id)
    }

    /// Logs `event` and enqueues its queued listeners inside the caller's transaction. Inline
    /// listeners do not run here (nothing may wait inside a transaction); use queued listeners
    /// for events emitted this way.
    pub fn emit_in(&self, tx: &mut dyn Tx, event: Event) -> Result<String> {
        if event.name.is_empty() || event.name.len() > 200 {
            return Err(BackendError::Invalid("event name must be 1 to 200 characters".into()));
        }
        let id = JobId::new().to_string();
        let mut runs = Vec::new();
        let mut jobs = Vec::new();
        for l in self.registry().listeners_of(&event.name) {
            match l {
                Listener::Inline { name, .. } => runs.push(ListenerRun { listener: name.clone(), mode: "inline".into(), job_id: None }),
                Listener::Queued { name, queue, kind, guard, bare } => {
                    if let Some(guard) = guard {
                        if !guard(tx, &event.name)? {
                            continue;
                        }
                    }
                    let job = if *bare {
                        NewJob::new(kind.clone(), &event.payload)
                    } else {
                        NewJob::new(
                            kind.clone(),
                            &EventEnvelope { event_id: id.clone(), event: event.name.clone(), payload: &event.payload },
                        )
                    };
                    let job = job.queue(queue.clone()).tag(format!("event:{id}"));
                    runs.push(ListenerRun { listener: name.clone(), mode: "queued".into(), job_id: Some(job.id.to_string()) });
                    jobs.push(job);
                }
            }
        }
        tx.execute(
            "INSERT INTO events (id, name, payload, listeners, created_at) VALUES ($1, $2, $3, $4, $5)",
            &[
                id.clone().into(),
                event.name.clone().into(),
                event.payload.to_string().into(),
                serde_json::to_string(&runs).expect("listener runs serialize").into(),
                now_ms().into(),
            ],
        )?;
        if !jobs.is_empty() {
            tx.enqueue(jobs)?;
        }
        if let Some(t) = tx.telemetry() {
            t.event(&event.name);
        }
        Ok(id)
    }

    async fn run_inline(&self, id: &str, event: Event) {
        for l in self.registry().listeners_of(&event.name) {
            if let Listener::Inline { name, run } = l {
                let record = EventRecord {
                    id: id.to_string(),
                    name: event.name.clone(),
                    payload: event.payload.clone(),
                    listeners: vec![],
                    created_at: now_ms(),
                };
                if let Err(e) = run(record).await {
                    tracing::warn!(event = %event.name, listener = %name, error = %e, "inline listener failed");
                }
            }
        }
    }
}

fn record(r: &crate::backend::Row) -> EventRecord {
    EventRecord {
        id: r.text(0).unwrap_or_default().to_string(),
        name: r.text(1).unwrap_or_default().to_string(),
        payload: r.text(2).map(crate::job::payload_value).unwrap_or_default(),
        listeners: r.text(3).and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default(),
        created_at: r.int(4),
    }
}

/// The event log, newest first, optionally of one event name.
pub async fn recent(backend: &dyn QueueBackend, name: Option<&str>, page: Page) -> Result<Paged<EventRecord>> {
    let name = name.map(str::to_string);
    let from = "FROM events WHERE (CAST($1 AS TEXT) IS NULL OR name = $1)";
    let count = backend.query(&count_sql(from), vec![name.clone().into()]).await?.first().map_or(0, |r| r.int(0)) as u64;
    let (after, limit, mut params) = page.sql("created_at", Some("id"), 2);
    params.insert(0, name.into());
    let rows = backend
        .query(&format!("SELECT id, name, payload, listeners, created_at {from}{after} ORDER BY created_at DESC, id DESC{limit}"), params)
        .await?;
    Ok(Paged::from_rows(rows.iter().map(record).collect(), &page, count, |e: &EventRecord| Cursor::new(e.created_at, e.id.clone())))
}

pub async fn find(backend: &dyn QueueBackend, id: &str) -> Result<Option<EventRecord>> {
    let rows = backend.query("SELECT id, name, payload, listeners, created_at FROM events WHERE id = $1", vec![id.into()]).await?;
    Ok(rows.first().map(record))
}
