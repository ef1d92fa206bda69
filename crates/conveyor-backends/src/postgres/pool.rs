//! Connections: a bounded pool of synchronous clients used on blocking threads (the engine's
//! [`Tx`](conveyor_core::backend::Tx) closures are synchronous), each with its prepared-statement
//! cache and its counter shard.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use postgres::types::ToSql;
use postgres::Client;
use tokio::sync::Semaphore;

use super::pipe::PgClient;

use conveyor_core::backend::{BackendError, Result};

use super::schema::SHARDS;
use super::tls::Connector;
use super::tx::Statements;
use super::value::pg_err;

pub(crate) struct Conn {
    pub(crate) client: PgClient,
    pub(crate) stmts: Statements,
    pub(crate) shard: i64,
}

impl Conn {
    /// A read outside any transaction, through the statement cache.
    pub(crate) fn rows(&mut self, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<Vec<postgres::Row>> {
        let st = match self.stmts.get(sql) {
            Some(st) => st.clone(),
            None => {
                let st = self.client.prepare(sql).map_err(pg_err)?;
                if sql.len() > super::tx::ONE_OFF {
                    return self.client.query(&st, p).map_err(pg_err);
                }
                if self.stmts.len() >= 512 {
                    self.stmts.clear();
                }
                self.stmts.insert(sql.to_string(), st.clone());
                st
            }
        };
        let r = self.client.query(&st, p).map_err(pg_err);
        if r.is_err() {
            self.stmts.remove(sql);
        }
        r
    }
}

pub(crate) struct Pool {
    config: tokio_postgres::Config,
    /// TLS as the URL's `sslmode` asks (plain TCP for `disable`, and for `prefer` when the
    /// server has no TLS).
    tls: Connector,
    idle: Mutex<Vec<Conn>>,
    permits: Semaphore,
    next_shard: AtomicI64,
}

impl Pool {
    pub(crate) fn new(config: tokio_postgres::Config, tls: Connector, size: usize) -> Arc<Pool> {
        // Processes start at different shards, so their first connections do not share one.
        let first = rand::random::<u16>() as i64 % SHARDS;
        Arc::new(Pool { config, tls, idle: Mutex::default(), permits: Semaphore::new(size.max(1)), next_shard: AtomicI64::new(first) })
    }

    /// Opens a plain synchronous connection (blocking), for the LISTEN thread and migrations.
    pub(crate) fn connect(&self) -> Result<Client> {
        postgres::Config::from(self.config.clone()).connect(self.tls.clone()).map_err(|e| match pg_err(e) {
            BackendError::Storage(m) => BackendError::Unavailable(m),
            other => other,
        })
    }

    fn checkout(&self) -> Result<Conn> {
        loop {
            let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match conn {
                Some(c) if c.client.is_closed() => continue,
                Some(c) => return Ok(c),
                None => break,
            }
        }
        let client = PgClient::connect(&self.config, self.tls.clone())?;
        let shard = self.next_shard.fetch_add(1, Ordering::Relaxed) % SHARDS;
        Ok(Conn { client, stmts: Statements::new(), shard })
    }

    fn checkin(&self, c: Conn) {
        if !c.client.is_closed() {
            self.idle.lock().unwrap_or_else(|e| e.into_inner()).push(c);
        }
    }

    /// Drops idle connections (after the server restarted, say, they are all dead).
    pub(crate) fn clear(&self) {
        self.idle.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }

    /// Runs `f` with a connection on a blocking thread. A panic in `f` fails this call alone.
    pub(crate) async fn with<R, F>(self: &Arc<Self>, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&mut Conn) -> Result<R> + Send + 'static,
    {
        let _permit = self.permits.acquire().await.map_err(|_| BackendError::Unavailable("the PostgreSQL pool is closed".into()))?;
        let pool = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut conn = pool.checkout()?;
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut conn))).unwrap_or_else(|panic| {
                let msg = panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned());
                let msg = msg.unwrap_or_else(|| "unknown panic payload".into());
                tracing::error!(error = %msg, "a transaction panicked; its work is rolled back");
                Err(BackendError::Other(format!("the transaction panicked: {msg}")))
            });
            if matches!(out, Err(BackendError::Unavailable(_))) {
                // The server went away: the other idle connections are most likely dead too.
                pool.clear();
            } else {
                pool.checkin(conn);
            }
            out
        })
        .await
        .map_err(|e| BackendError::Other(format!("PostgreSQL task failed: {e}")))?
    }
}

/// Connection settings from a `postgres://` URL, with a connect timeout, and its TLS.
pub(crate) fn config(url: &str) -> Result<(tokio_postgres::Config, Connector)> {
    let (mut config, tls) = super::tls::parse(url)?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(Duration::from_secs(5));
    }
    if config.get_application_name().is_none() {
        config.application_name("conveyor");
    }
    // A server that vanishes without closing the connection is noticed within about a minute,
    // not after the kernel's two hours.
    config.keepalives(true).keepalives_idle(Duration::from_secs(30));
    Ok((config, tls))
}
