//! Conveyor as a library: durable, retryable, observable jobs for a Rust application — its own
//! job kinds, listeners, batches and workflows beside Conveyor's built-in applications, with
//! the whole command line (`serve`, `work`, `schedule`, `migrate`, `queue`, `failed`, `bench`,
//! …) and the dashboard in a `main` of a few lines.
//!
//! ```no_run
//! use conveyor::{App, JobArgs, JobContext, JobResult};
//!
//! #[derive(serde::Serialize, serde::Deserialize)]
//! struct SendReceipt {
//!     order_id: i64,
//! }
//!
//! impl JobArgs for SendReceipt {
//!     const KIND: &'static str = "send_receipt";
//! }
//!
//! async fn send_receipt(args: SendReceipt, _ctx: JobContext) -> JobResult {
//!     println!("receipt for order {}", args.order_id);
//!     Ok(())
//! }
//!
//! fn main() -> std::process::ExitCode {
//!     // `my-app serve`: the API, the dashboard and workers that run `send_receipt` too.
//!     App::new().job(send_receipt).run()
//! }
//! ```
//!
//! # What is stable
//!
//! The job and event types ([`JobArgs`], [`NewJob`], [`DomainEvent`], [`Event`]), handlers
//! ([`JobContext`], [`JobError`], [`Registry`]), [`Conveyor`] (dispatching, emitting),
//! [`Batch`], [`Workflow`], [`Middleware`], [`Schedule`], the worker runtime ([`worker`]) and
//! [`App`]. The backend traits (`Queue`, `Store`, `QueueBackend`, `Tx`) are in [`unstable`]:
//! they are young (the store and the queue were split apart only now), and depending on them
//! may break on any release.
//!
//! # Configuration
//!
//! [`App::run`] and [`App::connect`] read the same configuration as the `conveyor` binary:
//! `conveyor.toml` (or `CONVEYOR_CONFIG`), then the environment (`CONVEYOR_DATABASE_URL`, …).

mod cli;

use std::future::Future;
use std::process::ExitCode;
use std::sync::Arc;

pub use conveyor_core::backend::{BackendError, Cause, ErrorKind};
pub use conveyor_core::batch::{Batch, BatchInfo};
pub use conveyor_core::event::{DomainEvent, Event, EventEnvelope};
pub use conveyor_core::job::{Backoff, EnqueueOutcome, JobId, NewJob};
pub use conveyor_core::middleware::Middleware;
pub use conveyor_core::ratelimit::{RateLimit, RateLimiter};
pub use conveyor_core::registry::{ErrorAction, JobContext, JobError, JobResult, KindOptions, Registry};
pub use conveyor_core::scheduler::{Missed, Schedule};
pub use conveyor_core::workflow::{StepInfo, Workflow, WorkflowInfo};
pub use conveyor_core::{breaker, cron, debounce, fair, flow, setwise, worker, Conveyor, JobArgs};

/// The parts of the engine whose shape will change (the store / queue split): the backend
/// traits, transactions and the backends themselves. **Unstable**: not covered by semver.
pub mod unstable {
    pub use conveyor_backends::{connect, BackendConfig};
    pub use conveyor_core::backend;
    pub use conveyor_core::lane;
}

/// Conveyor's built-in applications, each a cargo feature of this crate (`orders`, `notify`,
/// `sync`; all on by default): an [`App`] runs those it was built with beside its own kinds —
/// their kinds, tables, schedules, routes, dashboard pages and commands.
pub mod apps {
    pub use conveyor_apps::kinds;
    #[cfg(feature = "notify")]
    pub use conveyor_apps::notify;
    #[cfg(feature = "orders")]
    pub use conveyor_apps::orders;
    #[cfg(feature = "sync")]
    pub use conveyor_apps::sync;
}

/// A registration an application adds to every registry the command line builds.
type Registration = Arc<dyn Fn(&mut Registry) + Send + Sync>;

/// What an [`App`] adds to the built-in kinds, carried into the command line's configuration.
#[derive(Clone, Default)]
pub(crate) struct Parts {
    pub(crate) registrations: Vec<Registration>,
    pub(crate) schedules: Vec<Schedule>,
    pub(crate) config_file: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for Parts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parts").field("registrations", &self.registrations.len()).field("schedules", &self.schedules.len()).finish()
    }
}

/// Conveyor with your own kinds: build it, then [`run`](App::run) the command line or
/// [`connect`](App::connect) to dispatch from your own code.
#[derive(Clone, Default)]
pub struct App {
    parts: Parts,
}

impl App {
    /// The built-in applications and kinds, nothing else yet.
    pub fn new() -> App {
        App::default()
    }

    /// Registers the handler of a typed job (see [`JobArgs`]).
    pub fn job<T, F, Fut>(self, handler: F) -> App
    where
        T: JobArgs,
        F: Fn(T, JobContext) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = JobResult> + Send + 'static,
    {
        self.register(move |r| {
            r.job(handler.clone());
        })
    }

    /// Adds anything to the registry: untyped kinds, listeners ([`Registry::on`],
    /// [`Registry::listen_queued`], [`Registry::listen_inline`]) and middleware. Called for
    /// every registry the command line builds, so it must be repeatable.
    pub fn register(mut self, f: impl Fn(&mut Registry) + Send + Sync + 'static) -> App {
        self.parts.registrations.push(Arc::new(f));
        self
    }

    /// A schedule fired by `serve` and `schedule` (once per tick across every process).
    pub fn schedule(mut self, schedule: Schedule) -> App {
        self.parts.schedules.push(schedule);
        self
    }

    /// Reads the configuration from this TOML file (the same keys as `conveyor.toml`) instead of
    /// `CONVEYOR_CONFIG` or `./conveyor.toml`; `CONVEYOR_*` variables still win over it.
    pub fn config_file(mut self, path: impl Into<std::path::PathBuf>) -> App {
        self.parts.config_file = Some(path.into());
        self
    }

    /// Runs the command line on the process's arguments (`my-app serve`, `my-app work`, …) and
    /// returns its exit code: 0, 1 with a one-line reason on stderr, 2 for a usage error. It
    /// starts its own async runtime: call it from `main`, not from inside one.
    pub fn run(self) -> ExitCode {
        self.run_with(std::env::args_os())
    }

    /// [`App::run`] on the given arguments (the program name first).
    pub fn run_with<I, A>(self, args: I) -> ExitCode
    where
        I: IntoIterator<Item = A>,
        A: Into<std::ffi::OsString>,
    {
        cli::main(self, args.into_iter().map(Into::into).collect())
    }

    /// Opens the configured store (migrating it) and returns the handle to dispatch jobs and
    /// emit events from your own code, with every kind registered; [`Workers`] run them.
    ///
    /// ```
    /// use conveyor::{App, JobArgs, JobContext, JobResult, Workers};
    ///
    /// #[derive(serde::Serialize, serde::Deserialize)]
    /// struct Ping {
    ///     n: u32,
    /// }
    ///
    /// impl JobArgs for Ping {
    ///     const KIND: &'static str = "ping";
    /// }
    ///
    /// # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = tempfile::tempdir()?;
    /// # let file = dir.path().join("app.toml");
    /// # std::fs::write(&file, format!("[database]\nurl = \"sqlite://{}/app.db\"\n", dir.path().display()))?;
    /// let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    /// let app = App::new().config_file(file).job(move |p: Ping, _ctx: JobContext| {
    ///     let tx = tx.clone();
    ///     async move {
    ///         tx.send(p.n).ok();
    ///         JobResult::Ok(())
    ///     }
    /// });
    /// let conveyor = app.connect().await?;
    /// conveyor.enqueue(&Ping { n: 7 }).await?;
    /// let workers = Workers::on(&conveyor, &["default"], 2);
    /// assert_eq!(rx.recv().await, Some(7));
    /// let report = workers.stop().await;
    /// assert_eq!(report.completed, 1);
    /// # Ok(()) }
    /// ```
    pub async fn connect(&self) -> Result<Conveyor, SetupError> {
        let config = cli::config::Config::load(self.parts.config_file.as_deref()).map_err(SetupError)?.with_app(self.parts());
        cli::run::connect(&config).await.map_err(SetupError)
    }

    pub(crate) fn parts(&self) -> Parts {
        self.parts.clone()
    }
}

/// Workers running in this process (inside your own server, a test, an example): started on
/// a handle, stopped gracefully (running jobs finish within the shutdown grace, waiting ones go
/// back to their queues).
pub struct Workers {
    shutdown: tokio_util::sync::CancellationToken,
    handle: tokio::task::JoinHandle<worker::WorkerReport>,
}

impl Workers {
    /// Starts the workers `config` describes (one supervisor per entry).
    pub fn start(conveyor: &Conveyor, config: worker::WorkerConfig) -> Workers {
        let shutdown = tokio_util::sync::CancellationToken::new();
        let handle = tokio::spawn(worker::run(conveyor.clone(), config, shutdown.clone()));
        Workers { shutdown, handle }
    }

    /// One supervisor over `queues` (in priority order) running `concurrency` jobs at once.
    pub fn on(conveyor: &Conveyor, queues: &[&str], concurrency: usize) -> Workers {
        let sup = worker::SupervisorConfig::new("app", queues.iter().map(|q| q.to_string()).collect(), concurrency);
        Workers::start(conveyor, worker::WorkerConfig { supervisors: vec![sup], ..worker::WorkerConfig::default() })
    }

    /// Stops them and returns what they did.
    pub async fn stop(self) -> worker::WorkerReport {
        self.shutdown.cancel();
        self.handle.await.unwrap_or_default()
    }
}

/// Why [`App::connect`] could not start: the configuration, the store or a registration, with
/// its causes as the error's sources.
#[derive(Debug)]
pub struct SetupError(anyhow::Error);

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&cli::one_line(&self.0))
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}
