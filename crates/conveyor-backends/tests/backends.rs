//! The conformance suite (`tests/conformance/`) run against every backend this build has.

#[macro_use]
mod conformance;
mod redis_durability;
mod tls;

#[cfg(feature = "sqlite")]
conformance_suite!(sqlite, async {
    use std::sync::Arc;

    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_core::backend::QueueBackend;

    let dir = tempfile::TempDir::new().expect("a temp dir");
    let path = dir.path().join("conveyor.db");
    let backend = SqliteBackend::open(SqliteOptions::new(path.to_str().expect("a UTF-8 temp path"))).expect("open SQLite");
    // The directory (and the database in it) lives as long as the test holds the guard.
    Some((Arc::new(backend) as Arc<dyn QueueBackend>, dir))
});

// Each test gets a database of its own on the machine's PostgreSQL server (dropped afterwards);
// without a server the tests skip outside CI and fail under it.
#[cfg(feature = "postgres")]
conformance_suite!(postgres, async {
    use std::sync::Arc;

    use conveyor_backends::postgres::testing::TestDatabase;
    use conveyor_backends::postgres::{PgBackend, PgOptions};
    use conveyor_core::backend::QueueBackend;

    let db = TestDatabase::create()?;
    let backend = PgBackend::open(PgOptions::new(db.url.clone())).expect("open PostgreSQL");
    Some((Arc::new(backend) as Arc<dyn QueueBackend>, db))
});

// The queue on the machine's Redis under a key prefix of the test's own (deleted afterwards),
// beside a SQLite store in a temp dir; without a server the tests skip outside CI.
#[cfg(all(feature = "redis", feature = "sqlite"))]
conformance_suite!(redis, async {
    use std::sync::Arc;

    use conveyor_backends::redis::testing::TestRedis;
    use conveyor_backends::redis::{RedisBackend, RedisOptions};
    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_core::backend::QueueBackend;

    let redis = TestRedis::create()?;
    let dir = tempfile::TempDir::new().expect("a temp dir");
    let store =
        SqliteBackend::open(SqliteOptions::new(dir.path().join("store.db").to_str().expect("a UTF-8 temp path"))).expect("open SQLite");
    let mut options = RedisOptions::new(redis.url.clone());
    options.prefix = redis.prefix.clone();
    let backend = RedisBackend::open(options, Arc::new(store)).expect("open Redis");
    Some((Arc::new(backend) as Arc<dyn QueueBackend>, (redis, dir)))
});

// The queue on the machine's RabbitMQ under a queue-name prefix of the test's own (its queues
// expire once unused), the ledger in a SQLite store in a temp dir; without a server the tests
// skip outside CI.
#[cfg(all(feature = "amqp", feature = "sqlite"))]
conformance_suite!(amqp, async {
    use std::sync::Arc;

    use conveyor_backends::amqp::testing::TestAmqp;
    use conveyor_backends::amqp::AmqpBackend;
    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_core::backend::QueueBackend;

    let amqp = TestAmqp::create()?;
    let dir = tempfile::TempDir::new().expect("a temp dir");
    let store =
        SqliteBackend::open(SqliteOptions::new(dir.path().join("store.db").to_str().expect("a UTF-8 temp path"))).expect("open SQLite");
    let backend = AmqpBackend::open(amqp.options(), Arc::new(store)).expect("open RabbitMQ");
    Some((Arc::new(backend) as Arc<dyn QueueBackend>, (amqp, dir)))
});

// The same with the ledger on PostgreSQL (a database of the test's own), whose dispatch hook
// runs after each of its own commits.
#[cfg(all(feature = "amqp", feature = "postgres"))]
conformance_suite!(amqp_postgres, async {
    use std::sync::Arc;

    use conveyor_backends::amqp::testing::TestAmqp;
    use conveyor_backends::amqp::AmqpBackend;
    use conveyor_backends::postgres::testing::TestDatabase;
    use conveyor_backends::postgres::{PgBackend, PgOptions};
    use conveyor_core::backend::QueueBackend;

    let amqp = TestAmqp::create()?;
    let db = TestDatabase::create()?;
    let store = PgBackend::open(PgOptions::new(db.url.clone())).expect("open PostgreSQL");
    let backend = AmqpBackend::open(amqp.options(), Arc::new(store)).expect("open RabbitMQ");
    Some((Arc::new(backend) as Arc<dyn QueueBackend>, (amqp, db)))
});

/// The two relational schemas are kept in step: the same tables with the same columns, apart
/// from what PostgreSQL adds for concurrency (sharded counters and metric rows, its version
/// table). The engine's tables come from one SQL text; this catches the queue's tables drifting.
#[cfg(all(feature = "sqlite", feature = "postgres"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_and_postgres_schemas_have_the_same_tables_and_columns() {
    use std::collections::{BTreeMap, BTreeSet};

    use conveyor_backends::postgres::testing::TestDatabase;
    use conveyor_backends::postgres::{PgBackend, PgOptions};
    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_core::backend::{RowExt, Store};

    let Some(db) = TestDatabase::create() else { return };
    let pg = PgBackend::open(PgOptions::new(db.url.clone())).expect("open PostgreSQL");
    let dir = tempfile::TempDir::new().unwrap();
    let lite = SqliteBackend::open(SqliteOptions::new(dir.path().join("s.db").to_str().unwrap())).unwrap();

    type Schema = BTreeMap<String, BTreeSet<String>>;
    let collect = |rows: Vec<Vec<conveyor_core::backend::SqlValue>>| -> Schema {
        let mut s = Schema::new();
        for r in rows {
            s.entry(r.text(0).unwrap().to_string()).or_default().insert(r.text(1).unwrap().to_string());
        }
        s
    };
    let mut on_pg = collect(
        pg.query("SELECT table_name::text, column_name::text FROM information_schema.columns WHERE table_schema = 'public'", vec![])
            .await
            .unwrap(),
    );
    let on_sqlite = collect(
        lite.query("SELECT m.name, p.name FROM sqlite_master m, pragma_table_info(m.name) p WHERE m.type = 'table'", vec![]).await.unwrap(),
    );
    // PostgreSQL's additions, each for concurrency or versioning.
    on_pg.remove("conveyor_schema");
    let counts = on_pg.remove("queue_counts").expect("queue_counts on PostgreSQL");
    assert!(on_pg.get_mut("job_metrics").unwrap().remove("shard"));
    let mut queues = on_pg.remove("queues").unwrap();
    queues.extend(counts.into_iter().filter(|c| c != "queue" && c != "shard"));
    on_pg.insert("queues".into(), queues);
    assert_eq!(on_pg, on_sqlite, "PostgreSQL's schema (left) and SQLite's (right) differ");
}
