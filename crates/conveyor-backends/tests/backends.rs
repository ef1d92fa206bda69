//! The conformance suite (`tests/conformance/`) run against every backend this build has.

#[macro_use]
mod conformance;

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
