//! The command line ([`crate::App::run`]): parses arguments and hands off to a command module.
//!
//! - `serve`, `work`: [`run`] — the HTTP API, workers, signal handling.
//! - `queue …`, `failed …`, `migrate`: [`admin`].
//! - `bench`: [`bench`].
//!
//! Errors print one line on stderr and exit 1; usage errors exit 2 (clap).

mod admin;
mod bench;
mod bench_fair;
mod bench_http;
#[cfg(feature = "notify")]
mod bench_notify;
pub(crate) mod config;
#[cfg(feature = "sync")]
mod dev;
mod kinds;
#[cfg(feature = "orders")]
mod orders;
pub(crate) mod run;
#[cfg(feature = "sync")]
mod sync;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::App;

#[derive(Parser)]
#[command(name = "conveyor", version, about = "Event-driven background processing: queues, workers, and a dashboard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// HTTP API + workers in one process
    Serve(run::ServeArgs),
    /// Workers only (scale out by running more of these)
    Work(run::WorkArgs),
    /// The scheduler only (each tick fires once across all processes)
    Schedule,
    /// Create or upgrade the schema
    Migrate,
    /// Inspect and steer queues
    #[command(subcommand)]
    Queue(admin::QueueCommand),
    /// The failed-job store
    #[command(subcommand)]
    Failed(admin::FailedCommand),
    /// Measure throughput and latency on the configured backend
    Bench(bench::BenchArgs),
    #[cfg(feature = "orders")]
    /// Orders: import a CSV and run the order workflow
    #[command(subcommand)]
    Orders(orders::OrdersCommand),
    #[cfg(feature = "orders")]
    /// Products: import a CSV
    #[command(subcommand)]
    Products(orders::ProductsCommand),
    #[cfg(feature = "orders")]
    /// KPIs: compute them now
    #[command(subcommand)]
    Kpis(orders::KpisCommand),
    #[cfg(feature = "orders")]
    /// Leaderboards: rebuild them from the store
    #[command(subcommand)]
    Leaderboard(orders::LeaderboardCommand),
    #[cfg(feature = "sync")]
    /// Product sync: run it, replay failures, show its health
    #[command(subcommand)]
    Sync(sync::SyncCommand),
    /// Load sample products and orders, and print what to try next (needs every application)
    #[cfg(all(feature = "orders", feature = "notify", feature = "sync"))]
    Demo,
    #[cfg(feature = "sync")]
    /// Development tools: the partner simulator
    #[command(subcommand)]
    Dev(dev::DevCommand),
}

/// Parses `args` (the program name first) and runs the command.
pub(crate) fn main(app: App, args: Vec<std::ffi::OsString>) -> ExitCode {
    let cli = match Cli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    let config = match config::Config::load(app.parts.config_file.as_deref()) {
        Ok(c) => c.with_app(app.parts()),
        Err(e) => return fail(&e),
    };
    config.register_secrets();
    init_logging(&config, matches!(cli.command, Command::Serve(_) | Command::Work(_) | Command::Schedule));
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("building the tokio runtime");
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Serve(args) => run::serve(config, args).await,
            Command::Work(args) => run::work(config, args).await,
            Command::Schedule => run::schedule(config).await,
            Command::Migrate => admin::migrate(&config).await,
            Command::Queue(cmd) => admin::queue(&config, cmd).await,
            Command::Failed(cmd) => admin::failed(&config, cmd).await,
            Command::Bench(args) => bench::run(config, args).await,
            #[cfg(feature = "orders")]
            Command::Orders(cmd) => orders::orders(&config, cmd).await,
            #[cfg(feature = "orders")]
            Command::Products(cmd) => orders::products(&config, cmd).await,
            #[cfg(feature = "orders")]
            Command::Kpis(cmd) => orders::kpis(&config, cmd).await,
            #[cfg(feature = "orders")]
            Command::Leaderboard(cmd) => orders::leaderboard(&config, cmd).await,
            #[cfg(feature = "sync")]
            Command::Sync(cmd) => sync::run(&config, cmd).await,
            #[cfg(all(feature = "orders", feature = "notify", feature = "sync"))]
            Command::Demo => orders::demo(&config).await,
            #[cfg(feature = "sync")]
            Command::Dev(cmd) => dev::run(cmd).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

fn fail(e: &anyhow::Error) -> ExitCode {
    eprintln!("error: {}", conveyor_core::redact::scrub(&one_line(e)));
    ExitCode::FAILURE
}

/// The chain of causes joined, outermost first, each said once: an error whose text is already
/// part of what came before (a `BackendError`'s cause repeats its message) adds nothing.
pub(crate) fn one_line(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Buffers one log record and writes it to stderr with every configured secret masked
/// (`conveyor_core::redact::scrub`): whatever a library puts in a message, the log never
/// carries a credential.
struct ScrubbingWriter(Vec<u8>);

impl std::io::Write for ScrubbingWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for ScrubbingWriter {
    fn drop(&mut self) {
        let text = conveyor_core::redact::scrub(&String::from_utf8_lossy(&self.0));
        let _ = std::io::Write::write_all(&mut std::io::stderr().lock(), text.as_bytes());
    }
}

/// Long-running commands log at info; one-shot commands only warn, so stdout stays the result.
fn init_logging(config: &config::Config, long_running: bool) {
    use tracing_subscriber::EnvFilter;
    let default = if long_running { "info" } else { "warn" };
    let filter = EnvFilter::try_from_env("CONVEYOR_LOG").unwrap_or_else(|_| EnvFilter::new(default));
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| ScrubbingWriter(Vec::new()))
        .with_ansi(std::io::stderr().is_terminal());
    if config.log_format == "json" {
        let _ = builder.json().try_init();
    } else {
        let _ = builder.try_init();
    }
}
