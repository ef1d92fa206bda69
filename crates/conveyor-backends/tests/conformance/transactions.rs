//! Transactional enqueue ([`Queue::transaction`]) and transactional completion
//! ([`Queue::complete_with`]): the SQL and the queue operation commit together or not at all.

use std::any::Any;

use super::*;

const KIND: &str = "conformance.tx";

pub async fn transactional_enqueue_commits_or_rolls_back_with_the_sql(b: Backend) {
    let q = queue_name();
    let table = table_name();

    // Commit: the table, the row and the job all exist afterwards.
    let job = new_job(&q, KIND, 1);
    let id = job.id;
    let t = table.clone();
    let (rows, out) = b
        .transact(move |tx| {
            tx.execute(&format!("CREATE TABLE IF NOT EXISTS {t} (note TEXT NOT NULL)"), &[])?;
            let rows = tx.execute(&insert_note_sql(&t), &[SqlValue::from("committed")])?;
            let out = tx.enqueue(vec![job])?;
            Ok((rows, out))
        })
        .await
        .expect("a transaction that returns Ok commits");
    assert_eq!(rows, 1, "execute returns the rows it changed");
    assert_eq!(out, vec![EnqueueOutcome::Enqueued { id }]);
    assert_eq!(count_notes(&b, &table, "committed").await, 1, "the row committed with the job");
    assert_eq!(state_of(&b, id).await, Some(JobState::Pending), "the job committed with the row");
    assert_counts(&b, &q, [1, 0, 0, 0], "after the committed transaction").await;
    let read = b
        .transact({
            let t = table.clone();
            move |tx| tx.query(&format!("SELECT note FROM {t} WHERE note = $1"), &[SqlValue::from("committed")])
        })
        .await
        .unwrap();
    assert_eq!(read, vec![vec![SqlValue::Text("committed".into())]], "query returns rows of SqlValues");
    assert_eq!(reserve_one(&b, &q).await.id, id);

    // Roll back: an Err from the closure undoes the row and the job.
    let job = new_job(&q, KIND, 2).unique(unique_name("tx-key"), Duration::from_secs(600));
    let (id2, key2) = (job.id, job.unique.clone().unwrap().key);
    let t = table.clone();
    let seen = Arc::new(std::sync::Mutex::new(None));
    let seen2 = seen.clone();
    let err = b
        .transact(move |tx| -> Result<(), BackendError> {
            tx.execute(&insert_note_sql(&t), &[SqlValue::from("rolled back")])?;
            *seen2.lock().unwrap() = Some(tx.enqueue(vec![job])?);
            Err(BackendError::Other("the application changed its mind".into()))
        })
        .await
        .expect_err("the closure's error is returned");
    assert_eq!(seen.lock().unwrap().take(), Some(vec![EnqueueOutcome::Enqueued { id: id2 }]), "tx.enqueue inside the transaction");
    assert!(err.to_string().contains("the application changed its mind"), "the closure's error is passed through: {err}");
    assert_eq!(count_notes(&b, &table, "rolled back").await, 0, "the row was rolled back");
    assert!(b.job(id2).await.unwrap().is_none(), "the job enqueued in a rolled-back transaction exists");
    assert_counts(&b, &q, [0, 0, 1, 0], "a rolled-back enqueue changes no counts").await;
    assert!(reserve(&b, &q, 10).await.is_empty(), "a rolled-back job is reservable");
    // Its unique key was not taken either.
    enqueue_one(&b, new_job(&q, KIND, 3).unique(key2, Duration::from_secs(600))).await;

    // A failing statement rolls back the enqueue made before it.
    let job = new_job(&q, KIND, 4);
    let id4 = job.id;
    let missing = table_name();
    let res = b
        .transact(move |tx| {
            tx.enqueue(vec![job])?;
            tx.execute(&insert_note_sql(&missing), &[SqlValue::from("nowhere")])?;
            Ok(())
        })
        .await;
    assert!(res.is_err(), "an insert into a missing table fails the transaction");
    assert!(b.job(id4).await.unwrap().is_none(), "the job enqueued before the failing statement exists");
    assert_eq!(count_all_notes(&b, &table).await, 1, "only the committed row is in the table");

    // Transactions see their own writes.
    let t = table.clone();
    let seen = b
        .transact(move |tx| {
            tx.execute(&insert_note_sql(&t), &[SqlValue::from("own write")])?;
            let rows = tx.query(&format!("SELECT count(*) FROM {t} WHERE note = $1"), &[SqlValue::from("own write")])?;
            Ok(rows[0][0].as_i64())
        })
        .await
        .unwrap();
    assert_eq!(seen, Some(1));
}

fn insert_returning(table: &str, note: &str, value: u32) -> TxWork {
    let (sql, note) = (insert_note_sql(table), note.to_string());
    Box::new(move |tx: &mut dyn Tx| {
        tx.execute(&sql, &[SqlValue::from(note)])?;
        Ok(Box::new(value) as Box<dyn Any + Send>)
    })
}

type TxWork = conveyor_core::backend::TxFn;

pub async fn transactional_completion_is_atomic(b: Backend) {
    let q = queue_name();
    let table = table_name();
    create_notes_table(&b, &table).await;

    // Success: the row is written and the job acknowledged, together.
    let id = enqueue_one(&b, new_job(&q, KIND, 1)).await;
    let job = reserve_one(&b, &q).await;
    let done = completion(&job, Outcome::Completed);
    let out = b.complete_with(done.clone(), insert_returning(&table, "done", 7)).await.expect("complete_with");
    assert_eq!(*out.downcast::<u32>().expect("complete_with returns the closure's value"), 7);
    assert_eq!(count_notes(&b, &table, "done").await, 1);
    assert_eq!(state_of(&b, id).await, Some(JobState::Completed));
    assert_counts(&b, &q, [0, 0, 0, 0], "after complete_with").await;

    // Again with the now stale token: LeaseLost, and the closure's insert is rolled back.
    let err = b.complete_with(done.clone(), insert_returning(&table, "again", 8)).await.err();
    assert!(matches!(err, Some(BackendError::LeaseLost(x)) if x == id), "a second complete_with: {err:?}");
    assert_eq!(count_notes(&b, &table, "again").await, 0, "the insert of a complete_with whose lease is gone committed");
    assert_eq!(count_all_notes(&b, &table).await, 1);
    assert_eq!(state_of(&b, id).await, Some(JobState::Completed));

    // The closure fails: the completion is rolled back with it, and the job stays reserved.
    let id2 = enqueue_one(&b, new_job(&q, KIND, 2)).await;
    let job2 = reserve_one(&b, &q).await;
    let sql = insert_note_sql(&table);
    let err = b
        .complete_with(
            completion(&job2, Outcome::Completed),
            Box::new(move |tx: &mut dyn Tx| {
                tx.execute(&sql, &[SqlValue::from("partial")])?;
                Err(BackendError::Other("the effect failed".into()))
            }),
        )
        .await
        .err();
    assert!(matches!(&err, Some(BackendError::Other(m)) if m == "the effect failed"), "the closure's error: {err:?}");
    assert_eq!(count_notes(&b, &table, "partial").await, 0, "the failed closure's insert committed");
    assert_eq!(state_of(&b, id2).await, Some(JobState::Reserved), "the completion committed without its work");
    assert_counts(&b, &q, [0, 0, 1, 0], "the job is still reserved").await;
    let out = b.complete_with(completion(&job2, Outcome::Completed), insert_returning(&table, "second try", 9)).await.unwrap();
    assert_eq!(*out.downcast::<u32>().unwrap(), 9);
    assert_eq!(state_of(&b, id2).await, Some(JobState::Completed));
    assert_eq!(count_notes(&b, &table, "second try").await, 1);

    // The token of an earlier reservation cannot complete a job someone else holds now.
    let id3 = enqueue_one(&b, new_job(&q, KIND, 3)).await;
    let first = reserve_one(&b, &q).await;
    complete(&b, &first, Outcome::Release { at: now_ms() }).await;
    let second = reserve_one(&b, &q).await;
    assert_eq!(second.id, id3);
    let err = b.complete_with(completion(&first, Outcome::Completed), insert_returning(&table, "late", 1)).await.err();
    assert!(matches!(err, Some(BackendError::LeaseLost(x)) if x == id3), "complete_with with an earlier reservation's token: {err:?}");
    assert_eq!(count_notes(&b, &table, "late").await, 0);
    assert_eq!(state_of(&b, id3).await, Some(JobState::Reserved));
    assert_counts(&b, &q, [0, 0, 1, 0], "the current holder still has it").await;

    // complete_with records metrics like complete does.
    let rows = b.metrics(MetricsQuery { queue: Some(q.clone()), kind: None, since: now_ms() - 60_000 }).await.unwrap();
    let total = conveyor_core::metrics::summarize(rows.iter());
    assert_eq!(total.completed, 2, "two transactional completions committed: {rows:?}");
}

pub async fn panicking_transaction_closure_leaves_backend_usable(b: Backend) {
    let q = queue_name();
    let table = table_name();
    create_notes_table(&b, &table).await;
    let job = new_job(&q, KIND, 1);
    let id = job.id;
    let sql = insert_note_sql(&table);

    // Application code panics inside the transaction (an unwrap on a missing row, say). The caller
    // may see an error or the panic itself, but nothing may commit and the backend must go on.
    let bb = b.clone();
    let outcome = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::spawn(async move {
            bb.transact(move |tx| -> Result<(), BackendError> {
                tx.execute(&sql, &[SqlValue::from("before the panic")])?;
                tx.enqueue(vec![job])?;
                let rows = tx.query("SELECT 1 WHERE 1 = 0", &[])?;
                let _first = &rows[0]; // panics: index out of bounds
                Ok(())
            })
            .await
        }),
    )
    .await
    .expect("a transaction whose closure panicked never returned");
    assert!(!matches!(outcome, Ok(Ok(()))), "a transaction whose closure panicked reported success");

    // The backend still works, and the panicking transaction committed nothing.
    let after = tokio::time::timeout(Duration::from_secs(5), b.enqueue(vec![new_job(&q, KIND, 2)])).await.expect("enqueue hung");
    let after_id = match after {
        Ok(out) => out[0].id(),
        Err(e) => panic!("the backend is unusable after a transaction closure panicked: {e}"),
    };
    assert!(b.job(id).await.unwrap().is_none(), "the panicking transaction's job was committed");
    assert_eq!(count_notes(&b, &table, "before the panic").await, 0, "the panicking transaction's row was committed");

    // A closure that fails gets its own error back (not a storage error), and commits nothing.
    let (sql, failed_job) = (insert_note_sql(&table), new_job(&q, KIND, 3));
    let failed_id = failed_job.id;
    let err = b
        .transact(move |tx| -> Result<(), BackendError> {
            tx.execute(&sql, &[SqlValue::from("before the error")])?;
            tx.enqueue(vec![failed_job])?;
            Err(BackendError::Invalid("the closure's own error".into()))
        })
        .await
        .expect_err("a failing closure");
    assert!(matches!(&err, BackendError::Invalid(m) if m == "the closure's own error"), "{err:?}");
    assert!(b.job(failed_id).await.unwrap().is_none(), "the failed transaction's job was committed");
    assert_eq!(count_notes(&b, &table, "before the error").await, 0, "the failed transaction's row was committed");
    let job = reserve_one(&b, &q).await;
    assert_eq!(job.id, after_id);
    complete(&b, &job, Outcome::Completed).await;
    assert_eq!(state_of(&b, after_id).await, Some(JobState::Completed));
}

/// `insert_many` splits rows over as many statements as the parameter limits need, keeps every
/// row, returns what `RETURNING` gives, and refuses rows of different widths.
pub async fn insert_many_inserts_every_row_in_chunks_and_returns_them(b: Backend) {
    use conveyor_core::backend::{insert_many, RowExt, SqlValue};
    let table = table_name();
    let t = table.clone();
    let (returned, conflicts) = b
        .transact(move |tx| {
            tx.execute(&format!("CREATE TABLE {t} (n BIGINT PRIMARY KEY, label TEXT NOT NULL)"), &[])?;
            // 25,000 rows of two values: more than one statement's worth of parameters.
            let rows: Vec<Vec<SqlValue>> = (0..25_000i64).map(|n| vec![n.into(), format!("row {n}").into()]).collect();
            let returned = insert_many(tx, &format!("INSERT INTO {t} (n, label)"), &rows, "RETURNING n")?;
            // Conflicting rows are skipped and not returned.
            let again: Vec<Vec<SqlValue>> = (24_990..25_010i64).map(|n| vec![n.into(), "again".into()]).collect();
            let conflicts = insert_many(tx, &format!("INSERT INTO {t} (n, label)"), &again, "ON CONFLICT (n) DO NOTHING RETURNING n")?;
            Ok((returned, conflicts))
        })
        .await
        .unwrap();
    assert_eq!(returned.len(), 25_000);
    let mut ns: Vec<i64> = returned.iter().map(|r| r.int(0)).collect();
    ns.sort_unstable();
    assert_eq!(ns, (0..25_000).collect::<Vec<_>>());
    assert_eq!(conflicts.iter().map(|r| r.int(0)).collect::<std::collections::BTreeSet<_>>(), (25_000..25_010).collect());
    let stored = b.query(&format!("SELECT count(*), sum(n) FROM {table}"), vec![]).await.unwrap();
    assert_eq!((stored[0].int(0), stored[0].int(1)), (25_010, (0..25_010i64).sum::<i64>()));

    // Columns of other types, NULLs among the values, no RETURNING: stored as given.
    let typed = table_name();
    let t = typed.clone();
    b.transact(move |tx| {
        tx.execute(&format!("CREATE TABLE {t} (n BIGINT PRIMARY KEY, small INTEGER, score DOUBLE PRECISION, note TEXT)"), &[])?;
        let rows: Vec<Vec<SqlValue>> = (0..3i64)
            .map(|n| {
                let note = if n == 1 { SqlValue::Null } else { format!("note {n}").into() };
                let small = if n == 2 { SqlValue::Null } else { (n * 10).into() };
                vec![n.into(), small, SqlValue::Real(n as f64 + 0.5), note]
            })
            .collect();
        insert_many(tx, &format!("INSERT INTO {t} (n, small, score, note)"), &rows, "")
    })
    .await
    .expect("insert rows of several types");
    let stored = b.query(&format!("SELECT n, small, score, note FROM {typed} ORDER BY n"), vec![]).await.unwrap();
    let read: Vec<(i64, Option<i64>, f64, Option<String>)> =
        stored.iter().map(|r| (r.int(0), r.opt_int(1), r.real(2), r.text(3).map(str::to_string))).collect();
    assert_eq!(read, [(0, Some(0), 0.5, Some("note 0".to_string())), (1, Some(10), 1.5, None), (2, None, 2.5, Some("note 2".to_string()))]);

    let t = table.clone();
    let err = b
        .transact(move |tx| insert_many(tx, &format!("INSERT INTO {t} (n, label)"), &[vec![1.into()], vec![2.into(), "x".into()]], ""))
        .await
        .expect_err("rows of different widths");
    assert!(matches!(err, BackendError::Invalid(_)), "{err:?}");
    assert!(b.transact(move |tx| insert_many(tx, "INSERT INTO nowhere (n)", &[], "")).await.unwrap().is_empty(), "no rows, no SQL");
}

/// `Tx::defer`: deferred writes run in order before the transaction's next statement (which
/// sees them) and commit with it; a deferred statement that fails fails the transaction with its
/// own error — from the next statement that is awaited, or from the commit when the closure
/// returns `Ok` — and nothing of that transaction is committed. On PostgreSQL they are pipelined
/// (sent with the next statement), elsewhere they run at once: the outcome is the same.
pub async fn deferred_statements_run_in_order_and_their_failure_fails_the_transaction(b: Backend) {
    use conveyor_core::backend::{ErrorKind, RowExt};
    let table = table_name();
    let t = table.clone();
    b.transact(move |tx| tx.execute(&format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, label TEXT NOT NULL)"), &[]))
        .await
        .expect("create the table");
    let (insert, update, select) = (
        format!("INSERT INTO {table} (id, label) VALUES ($1, $2)"),
        format!("UPDATE {table} SET label = $2 WHERE id = $1"),
        format!("SELECT label FROM {table} WHERE id = $1"),
    );

    let (i, u, s) = (insert.clone(), update.clone(), select.clone());
    let seen = b
        .transact(move |tx| {
            tx.defer(&i, &[1.into(), "one".into()])?;
            tx.defer(&u, &[1.into(), "first".into()])?;
            let rows = tx.query(&s, &[1.into()])?;
            // Left queued when the closure returns: it goes out with the commit.
            tx.defer(&i, &[2.into(), "two".into()])?;
            Ok(rows.first().and_then(|r| r.text(0)).map(str::to_string))
        })
        .await
        .expect("a transaction of deferred writes");
    assert_eq!(seen.as_deref(), Some("first"), "the read saw both earlier deferred writes, in order");
    let read_all = format!("SELECT id, label FROM {table} ORDER BY id");
    let labels = |b: Backend| {
        let sql = read_all.clone();
        async move {
            b.query(&sql, vec![])
                .await
                .expect("read the table")
                .iter()
                .map(|r| (r.int(0), r.text(1).unwrap_or_default().to_string()))
                .collect::<Vec<_>>()
        }
    };
    assert_eq!(labels(b.clone()).await, [(1, "first".to_string()), (2, "two".to_string())], "the last deferred write was committed");

    // A duplicate key, deferred, and the closure returns Ok: the commit fails with it.
    let i = insert.clone();
    let err = b
        .transact(move |tx| {
            tx.execute(&i, &[3.into(), "three".into()])?;
            tx.defer(&i, &[1.into(), "again".into()])?;
            tx.defer(&i, &[4.into(), "four".into()])?;
            Ok(())
        })
        .await
        .expect_err("a deferred duplicate fails the transaction");
    assert_eq!(err.kind(), ErrorKind::Unique, "the deferred statement's own error: {err:?}");

    // The same followed by a read: the read fails with the deferred statement's error, not
    // with "the transaction is aborted".
    let (i, s) = (insert.clone(), select.clone());
    let err = b
        .transact(move |tx| {
            tx.defer(&i, &[5.into(), "five".into()])?;
            tx.defer(&i, &[2.into(), "again".into()])?;
            tx.query(&s, &[5.into()])?;
            Ok(())
        })
        .await
        .expect_err("a deferred duplicate fails the next read");
    assert_eq!(err.kind(), ErrorKind::Unique, "the deferred statement's own error: {err:?}");
    assert_eq!(labels(b.clone()).await, [(1, "first".to_string()), (2, "two".to_string())], "the failed transactions committed nothing");

    // The backend is still usable (the connection's transaction was ended).
    let i = insert.clone();
    b.transact(move |tx| tx.defer(&i, &[6.into(), "six".into()])).await.expect("a later transaction");
    assert_eq!(labels(b.clone()).await.len(), 3);
}

/// A primary key or a unique index refusing a row fails as [`ErrorKind::Unique`], told by the
/// driver's code rather than its message, with the driver's own error as the source of its
/// cause; the failed transaction commits nothing, and other constraints are not `Unique`.
pub async fn unique_violations_are_a_kind_with_the_driver_error_as_source(b: Backend) {
    use conveyor_core::backend::ErrorKind;
    use std::error::Error;

    let table = table_name();
    let t = table.clone();
    b.transact(move |tx| {
        tx.execute(&format!("CREATE TABLE {t} (id BIGINT PRIMARY KEY, email TEXT NOT NULL)"), &[])?;
        tx.execute(&format!("CREATE UNIQUE INDEX {t}_by_email ON {t}(email)"), &[])?;
        tx.execute(&format!("INSERT INTO {t} (id, email) VALUES (1, 'a@example.com')"), &[])
    })
    .await
    .expect("create and fill the table");

    let insert = format!("INSERT INTO {table} (id, email) VALUES ($1, $2)");
    for (id, email, what) in [(1i64, "b@example.com", "a duplicate primary key"), (2, "a@example.com", "a duplicate unique index")] {
        let sql = insert.clone();
        let err = b.transact(move |tx| tx.execute(&sql, &[id.into(), email.into()])).await.expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Unique, "{what}: {err:?}");
        assert!(err.is_unique(), "{what}");
        let cause = err.source().expect("the cause is the error's source");
        let driver = cause.source().expect("the driver's error is the cause's source");
        assert!(is_driver_error(driver), "{what}: the source is the driver's own error: {driver:?}");
        // PostgreSQL's driver says "db error" and keeps the server's message as its own source.
        let text = std::iter::successors(Some(driver), |&e| e.source()).map(|e| e.to_string()).collect::<Vec<_>>().join(": ");
        assert!(
            text.contains("UNIQUE constraint failed") || text.contains("duplicate key value violates unique constraint"),
            "{what}: the driver's message: {text}"
        );
    }
    let rows = b.query(&format!("SELECT count(*) FROM {table}"), vec![]).await.expect("count rows");
    assert_eq!(rows[0][0].as_i64(), Some(1), "the refused rows were not committed");

    let sql = format!("INSERT INTO {table} (id) VALUES (3)");
    let err = b.transact(move |tx| tx.execute(&sql, &[])).await.expect_err("a NOT NULL column left out");
    assert_eq!(err.kind(), ErrorKind::Storage, "a NOT NULL violation is not a unique one: {err:?}");
}

/// Whether `e` is an error of one of the relational drivers (every backend keeps its SQL in one).
fn is_driver_error(e: &(dyn std::error::Error + 'static)) -> bool {
    #[cfg(feature = "sqlite")]
    if e.is::<rusqlite::Error>() {
        return true;
    }
    #[cfg(feature = "postgres")]
    if e.is::<postgres::Error>() {
        return true;
    }
    false
}
