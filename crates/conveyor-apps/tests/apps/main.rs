//! The applications end to end on a real store with the real worker runtime.

mod orders;

use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
use conveyor_core::QueueBackend;

pub(crate) struct Store {
    pub(crate) backend: Arc<dyn QueueBackend>,
    _dir: tempfile::TempDir,
}

pub(crate) async fn store() -> Store {
    let dir = tempfile::tempdir().unwrap();
    let backend: Arc<dyn QueueBackend> =
        Arc::new(SqliteBackend::open(SqliteOptions::new(dir.path().join("apps.db").to_string_lossy().to_string())).unwrap());
    conveyor_apps::migrate(backend.as_ref()).await.unwrap();
    Store { backend, _dir: dir }
}

pub(crate) async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
