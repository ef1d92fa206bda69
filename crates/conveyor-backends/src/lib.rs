//! Conveyor's backends, each behind a cargo feature, and [`connect`], which picks one from
//! the configured URLs.
//!
//! Every backend passes the shared conformance suite in `tests/conformance/`.

#[cfg(feature = "amqp")]
pub mod amqp;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod engine_schema;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "redis")]
pub mod redis;
#[cfg(any(feature = "sqlite", feature = "postgres"))]
mod relational;
#[cfg(feature = "sqlite")]
pub mod sqlite;
#[cfg(feature = "tls")]
pub mod tls;

use std::sync::Arc;

use conveyor_core::backend::{BackendError, QueueBackend};

/// Where the queue and the relational store live.
#[derive(Clone, Debug)]
pub struct BackendConfig {
    /// `sqlite://conveyor.db`, `sqlite:///abs/path.db`, or `postgres://…`.
    pub database_url: String,
    /// `database`, `redis` or `amqp`.
    pub queue: String,
    /// Completed jobs kept for the dashboard.
    pub completed_history: usize,
    pub redis_url: Option<String>,
    pub redis_prefix: String,
    pub amqp_url: Option<String>,
    /// Names RabbitMQ's queues `<prefix>.<queue>`.
    pub amqp_prefix: String,
}

/// Opens the backend the configuration names.
pub fn connect(config: &BackendConfig) -> Result<Arc<dyn QueueBackend>, BackendError> {
    Ok(conveyor_core::lane::Lanes::wrap(connect_raw(config)?))
}

/// The backend without the lanes folded (see `conveyor_core::lane`).
fn connect_raw(config: &BackendConfig) -> Result<Arc<dyn QueueBackend>, BackendError> {
    match config.queue.as_str() {
        "database" => open_store(config),
        "redis" => {
            let Some(url) = &config.redis_url else {
                return Err(BackendError::Invalid("CONVEYOR_QUEUE=redis needs CONVEYOR_REDIS_URL".into()));
            };
            #[cfg(feature = "redis")]
            {
                let store = open_store(config)?;
                let mut options = redis::RedisOptions::new(url.clone());
                options.prefix = config.redis_prefix.clone();
                options.completed_history = config.completed_history;
                Ok(Arc::new(redis::RedisBackend::open(options, store)?))
            }
            #[cfg(not(feature = "redis"))]
            {
                let _ = url;
                Err(BackendError::Invalid("this build has no Redis support (feature `redis`)".into()))
            }
        }
        "amqp" => {
            let Some(url) = &config.amqp_url else {
                return Err(BackendError::Invalid("CONVEYOR_QUEUE=amqp needs CONVEYOR_AMQP_URL".into()));
            };
            #[cfg(feature = "amqp")]
            {
                let store = open_store(config)?;
                let mut options = amqp::AmqpOptions::new(url.clone());
                options.prefix = config.amqp_prefix.clone();
                Ok(Arc::new(amqp::AmqpBackend::open(options, store)?))
            }
            #[cfg(not(feature = "amqp"))]
            {
                let _ = url;
                Err(BackendError::Invalid("this build has no RabbitMQ support (feature `amqp`)".into()))
            }
        }
        other => {
            Err(BackendError::Invalid(format!("CONVEYOR_QUEUE={other}: expected `database` (the relational store), `redis` or `amqp`")))
        }
    }
}

/// Opens the relational store (which also holds the queue when `CONVEYOR_QUEUE=database`).
fn open_store(config: &BackendConfig) -> Result<Arc<dyn QueueBackend>, BackendError> {
    let url = config.database_url.as_str();
    if let Some(path) = sqlite_path(url) {
        #[cfg(feature = "sqlite")]
        {
            let mut options = sqlite::SqliteOptions::new(path);
            options.completed_history = config.completed_history;
            return Ok(Arc::new(sqlite::SqliteBackend::open(options)?));
        }
        #[cfg(not(feature = "sqlite"))]
        {
            let _ = path;
            return Err(BackendError::Invalid("this build has no SQLite support (feature `sqlite`)".into()));
        }
    }
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        #[cfg(feature = "postgres")]
        {
            let mut options = postgres::PgOptions::new(url);
            options.completed_history = config.completed_history;
            return Ok(Arc::new(postgres::PgBackend::open(options)?));
        }
        #[cfg(not(feature = "postgres"))]
        return Err(BackendError::Invalid("this build has no PostgreSQL support (feature `postgres`)".into()));
    }
    Err(BackendError::Invalid(format!(
        "CONVEYOR_DATABASE_URL: unsupported URL {:?} (expected sqlite://PATH or postgres://…)",
        conveyor_core::redact::url(url)
    )))
}

/// `sqlite://conveyor.db` → `conveyor.db`; `sqlite:///tmp/x.db` → `/tmp/x.db`.
pub fn sqlite_path(url: &str) -> Option<String> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let rest = rest.split('?').next().unwrap_or_default();
    Some(rest.to_string())
}

#[cfg(test)]
mod tests {
    use super::sqlite_path;

    #[test]
    fn sqlite_urls_name_relative_and_absolute_paths() {
        assert_eq!(sqlite_path("sqlite://conveyor.db").as_deref(), Some("conveyor.db"));
        assert_eq!(sqlite_path("sqlite:///tmp/c.db").as_deref(), Some("/tmp/c.db"));
        assert_eq!(sqlite_path("sqlite:data/c.db?mode=rwc").as_deref(), Some("data/c.db"));
        assert_eq!(sqlite_path("postgres://x"), None);
    }
}
