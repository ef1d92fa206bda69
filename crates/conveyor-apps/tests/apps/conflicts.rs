//! The races the applications settle on a unique index — a taken email, an event's idempotency
//! key, a source's name, the one running product sync — fail as `ErrorKind::Unique` on every
//! store: that kind, not the driver's message, is what the applications match on.

use serde_json::json;

use conveyor_apps::notify::model::{self, Kind};
use conveyor_apps::outbound::Policy;
use conveyor_core::backend::{ErrorKind, QueueBackendExt, SqlValue};

use crate::Store;

pub(crate) async fn taken_keys_fail_as_unique_violations(s: Store) {
    let b = s.backend.clone();
    let cases: [(&str, &str, [Vec<SqlValue>; 2]); 4] = [
        (
            "a taken email",
            "INSERT INTO users (id, name, email, created_at) VALUES ($1, $2, $3, 0)",
            [vec![1.into(), "Ada".into(), "ada@example.com".into()], vec![2.into(), "Ada 2".into(), "ada@example.com".into()]],
        ),
        (
            "an event's idempotency key",
            "INSERT INTO notify_event_keys (key, event_id, created_at) VALUES ($1, $2, 0)",
            [vec!["order:1".into(), "e1".into()], vec!["order:1".into(), "e2".into()]],
        ),
        (
            "a source's name",
            "INSERT INTO notify_sources (id, name, created_at) VALUES ($1, $2, 0)",
            [vec![100.into(), "paid".into()], vec![101.into(), "paid".into()]],
        ),
        (
            "a second running sync",
            "INSERT INTO sync_runs (id, scope, status, batch_id, started_at) VALUES ($1, 'full', 'running', $2, 0)",
            [vec!["run-1".into(), "batch-1".into()], vec!["run-2".into(), "batch-2".into()]],
        ),
    ];
    for (what, sql, [first, second]) in cases {
        b.transact(move |tx| tx.execute(sql, &first)).await.unwrap_or_else(|e| panic!("{what}, the first insert: {e}"));
        let err = b.transact(move |tx| tx.execute(sql, &second)).await.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Unique, "{what}: {err:?}");
    }

    // What a caller of the model sees of it.
    let policy = Policy::default();
    let source = json!({ "name": "refunded" });
    model::save(b.as_ref(), Kind::Sources, None, &source, &policy).await.unwrap();
    let again = model::save(b.as_ref(), Kind::Sources, None, &source, &policy).await;
    assert!(matches!(again, Err(model::ModelError::Conflict(_))), "a taken source name: {again:?}");
}
