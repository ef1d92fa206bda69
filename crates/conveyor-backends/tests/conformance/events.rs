//! Events ([`conveyor_core::event`]): the event log and the queued listener jobs are written in
//! one transaction (a transactional outbox); inline listeners run after the commit.

use std::sync::Mutex;

use conveyor_core::backend::Page;
use conveyor_core::event::{self, Event, EventEnvelope, EventRecord, ListenerRun};
use conveyor_core::registry::{JobContext, Registry};
use conveyor_core::worker::WorkerReport;

use super::runtime::{config, start};
use super::support::*;
use super::*;

/// What a queued listener received: (its job id, event id, event name, payload).
type Deliveries = Arc<Mutex<Vec<(JobId, String, String, Value)>>>;

fn listen_queued(registry: &mut Registry, event: &str, listener: &str, queue: &str, deliveries: &Deliveries) {
    let d = deliveries.clone();
    registry.listen_queued(event, listener, queue, move |env: EventEnvelope<Value>, ctx: JobContext| {
        d.lock().unwrap().push((ctx.id, env.event_id, env.event, env.payload));
        async { Ok(()) }
    });
}

async fn logged(b: &Backend, name: &str) -> conveyor_core::backend::Paged<EventRecord> {
    event::recent(b.as_ref(), Some(name), Page::new(1, 50)).await.expect("event::recent")
}

pub async fn event_listeners_get_each_emit_once_inline_after_commit(b: Backend) {
    let q = queue_name();
    let name = unique_name("conformance.order_placed");
    let deliveries: Deliveries = Arc::default();
    // (event id, payload, whether the event was committed when the inline listener ran)
    let inline: Arc<Mutex<Vec<(String, Value, bool)>>> = Arc::default();
    let mut registry = Registry::new();
    listen_queued(&mut registry, &name, "audit", &q, &deliveries);
    {
        let (seen, b2) = (inline.clone(), b.clone());
        registry.listen_inline(&name, "notify", move |rec: EventRecord| {
            let (seen, b2) = (seen.clone(), b2.clone());
            async move {
                let committed = event::find(b2.as_ref(), &rec.id).await.map_err(|e| e.to_string())?.is_some();
                seen.lock().unwrap().push((rec.id, rec.payload, committed));
                Ok(())
            }
        });
    }
    // A failing inline listener is logged; it does not fail the emit.
    registry.listen_inline(&name, "flaky", |_rec: EventRecord| async { Err("the mail server is down".to_string()) });
    let cv = conveyor_of(&b, &registry);

    let e1 = cv.emit(Event::new(&name, &json!({ "order": 1 }))).await.expect("emit");
    assert_eq!(inline.lock().unwrap().clone(), [(e1.clone(), json!({ "order": 1 }), true)], "the inline listener ran after the commit");
    let e2 = cv.emit(Event::new(&name, &json!({ "order": 2 }))).await.expect("emit");
    assert_ne!(e1, e2);
    assert_eq!(inline.lock().unwrap().len(), 2);
    assert_counts(&b, &q, [2, 0, 0, 0], "one queued listener job per emit").await;

    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("both deliveries ran", Duration::from_secs(10), || async { deliveries.lock().unwrap().len() >= 2 && drained(&b, &q).await })
        .await;
    let report = w.stop().await;
    assert_eq!(report, WorkerReport { completed: 2, retried: 0, failed: 0, released: 0 });
    let mut got = deliveries.lock().unwrap().clone();
    got.sort_by(|a, b| a.1.cmp(&b.1));
    assert_eq!(got.len(), 2, "{got:?}");
    for ((_, event_id, event, payload), (want_id, n)) in got.iter().zip([(&e1, 1), (&e2, 2)]) {
        assert_eq!((event_id, event.as_str(), payload), (want_id, name.as_str(), &json!({ "order": n })));
    }

    let log = logged(&b, &name).await;
    assert_eq!(log.total, 2);
    assert_eq!(log.items.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), [e2.as_str(), e1.as_str()], "newest first");
    for (record, (job, ..)) in log.items.iter().rev().zip(&got) {
        assert_eq!(record.name, name);
        assert_eq!(
            record.listeners,
            [
                ListenerRun { listener: "audit".into(), mode: "queued".into(), job_id: Some(job.to_string()) },
                ListenerRun { listener: "notify".into(), mode: "inline".into(), job_id: None },
                ListenerRun { listener: "flaky".into(), mode: "inline".into(), job_id: None },
            ],
            "the log names each listener and the job of the queued one"
        );
        let info = b.job(*job).await.unwrap().expect("the listener job");
        assert_eq!((info.kind, info.state), (format!("listener:{name}:audit"), JobState::Completed));
        assert!(info.tags.contains(&format!("event:{}", record.id)), "{:?}", info.tags);
    }
    assert_eq!(log.items[1].payload, json!({ "order": 1 }));
    assert_eq!(event::find(b.as_ref(), &e1).await.unwrap().as_ref(), Some(&log.items[1]));
    assert!(event::find(b.as_ref(), &unique_name("no-such-event")).await.unwrap().is_none());
    let err = cv.emit(Event::new("", &json!({}))).await.expect_err("an event without a name");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
}

pub async fn event_emitted_in_a_rolled_back_transaction_is_neither_logged_nor_delivered(b: Backend) {
    let q = queue_name();
    let name = unique_name("conformance.invoice_paid");
    let table = table_name();
    create_notes_table(&b, &table).await;
    let deliveries: Deliveries = Arc::default();
    let mut registry = Registry::new();
    listen_queued(&mut registry, &name, "ledger", &q, &deliveries);
    let cv = conveyor_of(&b, &registry);

    let (cv2, n2, sql) = (cv.clone(), name.clone(), insert_note_sql(&table));
    let err = b
        .transact(move |tx| -> Result<(), BackendError> {
            tx.execute(&sql, &[SqlValue::from("paid")])?;
            let id = cv2.emit_in(tx, Event::new(n2, &json!({ "invoice": 7 })))?;
            Err(BackendError::Other(format!("the application rolled back after emitting {id}")))
        })
        .await
        .expect_err("the closure's error");
    assert!(err.to_string().contains("rolled back after emitting"), "{err}");
    let log = logged(&b, &name).await;
    assert_eq!((log.total, log.items.len()), (0, 0), "a rolled-back event is logged: {:?}", log.items);
    assert_counts(&b, &q, [0, 0, 0, 0], "a rolled-back event enqueues no listener job").await;
    assert_eq!(count_all_notes(&b, &table).await, 0);

    // Committed with the application's write: logged and delivered once.
    let (cv3, n3, sql) = (cv.clone(), name.clone(), insert_note_sql(&table));
    let id = b
        .transact(move |tx| {
            tx.execute(&sql, &[SqlValue::from("paid")])?;
            cv3.emit_in(tx, Event::new(n3, &json!({ "invoice": 8 })))
        })
        .await
        .expect("a committed emit_in");
    assert_eq!(count_all_notes(&b, &table).await, 1);
    let log = logged(&b, &name).await;
    assert_eq!(log.items.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(), [id.as_str()]);
    assert_counts(&b, &q, [1, 0, 0, 0], "the listener job committed with the event").await;
    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("the delivery ran", Duration::from_secs(10), || async { !deliveries.lock().unwrap().is_empty() && drained(&b, &q).await })
        .await;
    w.stop().await;
    let got = deliveries.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!((got[0].1.as_str(), &got[0].3), (id.as_str(), &json!({ "invoice": 8 })));
    assert_eq!(log.items[0].listeners[0].job_id, Some(got[0].0.to_string()));
}

pub async fn event_guarded_wildcard_listener_gets_only_what_its_guard_accepts(b: Backend) {
    let q = queue_name();
    let table = table_name();
    create_notes_table(&b, &table).await;
    let (wanted, ignored) = (unique_name("conformance.wanted"), unique_name("conformance.ignored"));
    // The guard reads the store inside the emitting transaction: an event is wanted when a note
    // names it (as a notification service asks whether a rule names the event).
    let (sql, name) = (insert_note_sql(&table), wanted.clone());
    b.transact(move |tx| tx.execute(&sql, &[SqlValue::from(name.as_str())])).await.expect("insert note");
    let deliveries: Deliveries = Arc::default();
    let mut registry = Registry::new();
    {
        let (d, guard_sql) = (deliveries.clone(), format!("SELECT 1 FROM {table} WHERE note = $1"));
        registry.listen_queued_when(
            "*",
            "rules",
            &q,
            move |tx: &mut dyn conveyor_core::backend::Tx, event: &str| Ok(!tx.query(&guard_sql, &[event.into()])?.is_empty()),
            move |env: EventEnvelope<Value>, ctx: JobContext| {
                d.lock().unwrap().push((ctx.id, env.event_id, env.event, env.payload));
                async { Ok(()) }
            },
        );
    }
    let cv = conveyor_of(&b, &registry);
    let e1 = cv.emit(Event::new(&wanted, &json!({ "n": 1 }))).await.expect("emit wanted");
    let e2 = cv.emit(Event::new(&ignored, &json!({ "n": 2 }))).await.expect("emit ignored");
    assert_counts(&b, &q, [1, 0, 0, 0], "a job for the wanted event only").await;
    assert_eq!(logged(&b, &ignored).await.items[0].listeners, [], "the refused event is logged without listeners");
    assert_eq!(logged(&b, &wanted).await.items[0].listeners.len(), 1);

    // The guard's answer follows the store: once a note names the other event, it is wanted too.
    let (sql, name) = (insert_note_sql(&table), ignored.clone());
    b.transact(move |tx| tx.execute(&sql, &[SqlValue::from(name.as_str())])).await.expect("insert note");
    let e3 = cv.emit(Event::new(&ignored, &json!({ "n": 3 }))).await.expect("emit");
    let w = start(&b, registry, config(&q, 2, Duration::from_secs(5)));
    wait_until("both deliveries ran", Duration::from_secs(10), || async { deliveries.lock().unwrap().len() >= 2 && drained(&b, &q).await })
        .await;
    w.stop().await;
    let mut got: Vec<String> = deliveries.lock().unwrap().iter().map(|d| d.1.clone()).collect();
    got.sort();
    let mut want = vec![e1, e3];
    want.sort();
    assert_eq!(got, want, "never the event emitted while refused ({e2})");
}
