//! End-to-end tests of the `conveyor` binary: real processes on a real SQLite file (or a
//! PostgreSQL database of the test's own), each test in its own temporary directory.

mod access;
mod amqp;
mod browser;
mod commands;
mod faktory;
mod flow;
mod http;
mod http_kinds;
mod jobs;
mod orders;
mod otel;
mod partners;
mod postgres;
mod process;
mod prometheus;
mod redis;
mod scheduler;
mod secrets;
mod sync;
mod webhooks;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use conveyor_backends::postgres::testing::TestDatabase;
use conveyor_backends::postgres::{PgBackend, PgOptions};
use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
use conveyor_core::backend::{JobFilter, Page, QueueStats};
use conveyor_core::job::JobState;
use conveyor_core::NewJob;
use conveyor_core::QueueBackend;
use serde_json::json;

/// A temporary directory with a database, a config file, and a backend opened on it.
pub(crate) struct TestEnv {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) backend: Arc<dyn QueueBackend>,
    url: String,
    /// Extra environment for the spawned processes (the queue backend).
    env: Vec<(String, String)>,
    _db: Option<TestDatabase>,
    _redis: Option<conveyor_backends::redis::testing::TestRedis>,
    _amqp: Option<conveyor_backends::amqp::testing::TestAmqp>,
}

impl TestEnv {
    pub(crate) fn new(config_toml: &str) -> TestEnv {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("conveyor.toml"), config_toml).expect("writing conveyor.toml");
        let mut opts = SqliteOptions::new(dir.path().join("conveyor.db").to_string_lossy().to_string());
        opts.completed_history = 100_000;
        let backend: Arc<dyn QueueBackend> = Arc::new(SqliteBackend::open(opts).expect("opening the test database"));
        let url = format!("sqlite://{}", dir.path().join("conveyor.db").display());
        TestEnv { dir, backend, url, env: Vec::new(), _db: None, _redis: None, _amqp: None }
    }

    /// The same on a fresh PostgreSQL database at `url` (`None`: no server, outside CI).
    pub(crate) fn postgres(config_toml: &str, db: Option<TestDatabase>) -> Option<TestEnv> {
        let db = match db {
            Some(db) => db,
            None => TestDatabase::create()?,
        };
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("conveyor.toml"), config_toml).expect("writing conveyor.toml");
        let mut opts = PgOptions::new(db.url.clone());
        opts.completed_history = 100_000;
        let backend: Arc<dyn QueueBackend> = Arc::new(PgBackend::open(opts).expect("opening the test database"));
        Some(TestEnv { dir, backend, url: db.url.clone(), env: Vec::new(), _db: Some(db), _redis: None, _amqp: None })
    }

    /// The queue on Redis at `url` under `prefix` (`TestRedis` gives both and deletes its keys
    /// when the environment goes), beside a SQLite store in the temp dir.
    pub(crate) fn redis(
        config_toml: &str,
        url: &str,
        prefix: &str,
        guard: Option<conveyor_backends::redis::testing::TestRedis>,
    ) -> TestEnv {
        use conveyor_backends::redis::{RedisBackend, RedisOptions};
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("conveyor.toml"), config_toml).expect("writing conveyor.toml");
        let store = SqliteBackend::open(SqliteOptions::new(dir.path().join("conveyor.db").to_string_lossy().to_string()))
            .expect("opening the store");
        let mut opts = RedisOptions::new(url);
        opts.prefix = prefix.to_string();
        opts.completed_history = 100_000;
        let backend: Arc<dyn QueueBackend> = Arc::new(RedisBackend::open(opts, Arc::new(store)).expect("opening the Redis queue"));
        let db = format!("sqlite://{}", dir.path().join("conveyor.db").display());
        let env = vec![
            ("CONVEYOR_QUEUE".to_string(), "redis".to_string()),
            ("CONVEYOR_REDIS_URL".to_string(), url.to_string()),
            ("CONVEYOR_REDIS_PREFIX".to_string(), prefix.to_string()),
        ];
        TestEnv { dir, backend, url: db, env, _db: None, _redis: guard, _amqp: None }
    }

    /// The queue on RabbitMQ under the prefix of `amqp`, the ledger in a SQLite store in the
    /// temp dir; the test process enqueues through its own connection.
    pub(crate) fn amqp(config_toml: &str, amqp: conveyor_backends::amqp::testing::TestAmqp) -> TestEnv {
        use conveyor_backends::amqp::AmqpBackend;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("conveyor.toml"), config_toml).expect("writing conveyor.toml");
        let mut store_opts = SqliteOptions::new(dir.path().join("conveyor.db").to_string_lossy().to_string());
        store_opts.completed_history = 100_000;
        let store = SqliteBackend::open(store_opts).expect("opening the store");
        // The queues are declared as `conveyor work` declares them (without `x-expires`: RabbitMQ
        // refuses a second declaration with other arguments); the guard deletes them.
        let mut opts = amqp.options();
        opts.queue_expires = None;
        let backend: Arc<dyn QueueBackend> = Arc::new(AmqpBackend::open(opts, Arc::new(store)).expect("opening the RabbitMQ queue"));
        let db = format!("sqlite://{}", dir.path().join("conveyor.db").display());
        let env = vec![
            ("CONVEYOR_QUEUE".to_string(), "amqp".to_string()),
            ("CONVEYOR_AMQP_URL".to_string(), amqp.url.clone()),
            ("CONVEYOR_AMQP_PREFIX".to_string(), amqp.prefix.clone()),
        ];
        TestEnv { dir, backend, url: db, env, _db: None, _redis: None, _amqp: Some(amqp) }
    }

    pub(crate) fn db_url(&self) -> String {
        self.url.clone()
    }

    /// `conveyor ARGS` in this environment (its own database, config and working directory).
    pub(crate) fn conveyor(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_conveyor"));
        c.args(args)
            .current_dir(self.dir.path())
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("CONVEYOR_DATABASE_URL", self.db_url())
            .env("CONVEYOR_CONFIG", self.config_path())
            .env("CONVEYOR_LOG", "warn")
            // The Faktory listener's default port is fixed, so parallel tests would collide on
            // it: off unless a test asks for it (a later `.env` on the command wins).
            .env("CONVEYOR_FAKTORY_ADDR", "off")
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        c
    }

    pub(crate) fn config_path(&self) -> PathBuf {
        self.dir.path().join("conveyor.toml")
    }

    /// Spawns `conveyor args…`; its log (warnings and errors) goes to `CONVEYOR_TEST_LOG_DIR`
    /// when that is set (to see what a worker did in a failing test), or nowhere.
    pub(crate) fn spawn(&self, args: &[&str]) -> Proc {
        let stderr = match std::env::var_os("CONVEYOR_TEST_LOG_DIR") {
            Some(dir) => {
                let path = PathBuf::from(dir).join(format!("{}-{}.log", args.join("-"), std::process::id()));
                std::fs::OpenOptions::new().create(true).append(true).open(path).map_or(Stdio::null(), Stdio::from)
            }
            None => Stdio::null(),
        };
        Proc(self.conveyor(args).stdout(Stdio::null()).stderr(stderr).spawn().expect("spawning conveyor"))
    }

    pub(crate) async fn queue(&self, name: &str) -> QueueStats {
        let all = self.backend.queues().await.expect("listing queues");
        all.into_iter().find(|q| q.queue == name).unwrap_or(QueueStats {
            queue: name.into(),
            pending: 0,
            delayed: 0,
            reserved: 0,
            failed: 0,
            paused: false,
            per_minute: 0,
            oldest_wait_s: 0.0,
        })
    }
}

/// A child process that is killed if the test ends (or panics) while it still runs, so a
/// failing test never leaves a worker behind.
pub(crate) struct Proc(pub(crate) Child);

impl std::ops::Deref for Proc {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Proc {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// Polls `cond` until it holds or `limit` passes.
pub(crate) async fn wait_for<F, Fut>(what: &str, limit: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub(crate) fn sigterm(child: &Child) {
    // SAFETY: kill(2) with a pid we spawned and still own (not yet reaped).
    let rc = unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0, "sending SIGTERM");
}

/// Waits for a child to exit, failing the test if it takes longer than `limit`.
pub(crate) async fn wait_exit(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("waiting for child") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("process did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// --- shared by the broker tests (Redis, RabbitMQ): `conveyor.sleep` jobs on queue `default` ---

/// Completions per job id in queue `default`, from the completed history (one entry per applied
/// completion, so a job that finished twice has two), with the worker of the last one.
pub(crate) async fn completions(env: &TestEnv) -> HashMap<String, (usize, Option<String>)> {
    let filter = JobFilter { queue: Some("default".into()), state: Some(JobState::Completed), ..Default::default() };
    let page = loop {
        // Right after a restart the server may still be loading its AOF.
        match env.backend.jobs(filter.clone(), Page::new(1, 1_000_000)).await {
            Ok(page) => break page,
            Err(e) => {
                eprintln!("reading the history: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    let mut out: HashMap<String, (usize, Option<String>)> = HashMap::new();
    for j in page.items {
        let e = out.entry(j.id.to_string()).or_default();
        e.0 += 1;
        e.1 = j.worker;
    }
    out
}

/// `total` `conveyor.sleep` jobs of `ms` each, in batches of 1,000.
pub(crate) async fn enqueue_sleeps(env: &TestEnv, total: usize, ms: u64) {
    for chunk in 0..total / 1_000 {
        let jobs: Vec<NewJob> = (0..1_000).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": ms, "n": chunk * 1_000 + i }))).collect();
        env.backend.enqueue(jobs).await.expect("enqueue");
    }
}

/// No job of queue `default` left pending, reserved or delayed.
pub(crate) async fn drained(env: &TestEnv) -> bool {
    match env.backend.queues().await {
        Ok(qs) => qs.iter().filter(|q| q.queue == "default").all(|q| q.pending + q.reserved + q.delayed == 0),
        Err(_) => false,
    }
}

/// Two `conveyor work` processes drain `total` jobs: every job completes exactly once, and each
/// process did a fair share.
pub(crate) async fn two_workers_share(env: &TestEnv, total: usize) {
    enqueue_sleeps(env, total, 1).await;
    let mut workers: Vec<_> = (0..2).map(|_| env.spawn(&["work"])).collect();
    wait_for("every job to finish", Duration::from_secs(180), || drained(env)).await;
    for w in &mut workers {
        sigterm(w);
        assert!(wait_exit(w, Duration::from_secs(30)).await.success(), "work exits 0 on SIGTERM");
    }
    let done = completions(env).await;
    assert_eq!(done.len(), total, "every job completed");
    let twice: Vec<_> = done.iter().filter(|(_, (n, _))| *n != 1).collect();
    assert!(twice.is_empty(), "jobs completed more than once: {:?}", &twice[..twice.len().min(5)]);
    let mut per_worker: HashMap<String, usize> = HashMap::new();
    for (_, w) in done.values() {
        *per_worker.entry(w.clone().unwrap_or_default()).or_default() += 1;
    }
    assert_eq!(per_worker.len(), 2, "both processes took jobs: {per_worker:?}");
    assert!(per_worker.values().all(|n| *n > total / 10), "the work is shared: {per_worker:?}");
    assert_eq!(env.queue("default").await.failed, 0);
}

/// `total` jobs of 5 ms through one `conveyor work` while the broker is restarted twice —
/// `graceful`, then `crash` (each stops it and starts it again) — each after a fifth more of the
/// jobs finished: the worker carries on by itself, every job completes exactly once, none fails.
pub(crate) async fn survive_two_restarts(
    env: &TestEnv,
    total: usize,
    graceful: impl FnOnce() -> Result<(), String>,
    crash: impl FnOnce() -> Result<(), String>,
) {
    enqueue_sleeps(env, total, 5).await;
    let mut worker = env.spawn(&["work"]);
    let done_count = || async { completions(env).await.len() };
    wait_for("a fifth of the jobs to finish", Duration::from_secs(120), || async { done_count().await >= total / 5 }).await;
    tokio::task::block_in_place(graceful).expect("the graceful restart");
    let after_first = done_count().await;
    assert!(after_first < total, "the first restart happened while jobs were flowing");
    wait_for("more jobs to finish after the graceful restart", Duration::from_secs(120), || async {
        done_count().await >= after_first + total / 5
    })
    .await;
    tokio::task::block_in_place(crash).expect("the restart after a crash");
    let after_second = done_count().await;
    assert!(after_second < total, "the second restart happened while jobs were flowing");
    assert!(worker.try_wait().unwrap().is_none(), "the worker survives both outages");

    wait_for("every job to finish after the restarts", Duration::from_secs(300), || drained(env)).await;
    sigterm(&worker);
    assert!(wait_exit(&mut worker, Duration::from_secs(30)).await.success(), "work exits 0 on SIGTERM");
    let done = completions(env).await;
    assert_eq!(done.len(), total, "every job completed");
    let twice: Vec<_> = done.iter().filter(|(_, (n, _))| *n != 1).collect();
    assert!(twice.is_empty(), "jobs completed more than once although no lease expired: {:?}", &twice[..twice.len().min(5)]);
    assert_eq!(env.queue("default").await.failed, 0);
}
