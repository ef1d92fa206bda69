//! Connections to Redis: a small pool of synchronous connections used on blocking threads (as
//! the PostgreSQL backend does), a subscriber thread for wake-ups, and value decoding.
//!
//! A connection that fails with an I/O error is dropped, and so are the idle ones (after a
//! restart they are all dead); the next call opens a new one. Callers retry with their own
//! backoff (the worker's fetcher and flusher do), so workers reconnect by themselves when Redis
//! comes back.

use std::sync::{Mutex, Weak};
use std::time::Duration;

use redis::{Connection, RedisError, RedisResult, Value};

use conveyor_core::backend::{BackendError, Cause, Result};
use conveyor_core::wakeup::Wakeup;

/// Idle connections kept for reuse.
const MAX_IDLE: usize = 16;

pub(crate) struct Pool {
    client: redis::Client,
    idle: Mutex<Vec<Connection>>,
    /// The URL without its password, for messages.
    pub(crate) shown: String,
}

impl Pool {
    pub(crate) fn new(url: &str) -> Result<Pool> {
        Ok(Pool { client: client(url)?, idle: Mutex::new(Vec::new()), shown: conveyor_core::redact::url(url) })
    }

    pub(crate) fn client(&self) -> redis::Client {
        self.client.clone()
    }

    /// A pooled connection (and whether it was idle in the pool) or a new one.
    fn connection(&self) -> Result<(Connection, bool)> {
        if let Some(c) = self.idle.lock().expect("redis pool poisoned").pop() {
            return Ok((c, true));
        }
        let c = self.client.get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| self.error(e))?;
        // A script never runs this long; a hung server must not hang a worker forever.
        c.set_read_timeout(Some(Duration::from_secs(30))).map_err(|e| self.error(e))?;
        c.set_write_timeout(Some(Duration::from_secs(30))).map_err(|e| self.error(e))?;
        Ok((c, false))
    }

    /// Runs `f` on a pooled connection (on the calling thread, which must be allowed to block).
    ///
    /// An idle connection that turns out to be dead (the server restarted since it was last
    /// used) is replaced and `f` runs once more on a new one: the old server never saw the
    /// command. Every script tolerates running twice anyway (acknowledgements check the lease
    /// token, enqueues the job id; a reservation repeated leaves the first one's jobs to
    /// the reaper).
    pub(crate) fn with<R>(&self, mut f: impl FnMut(&mut Connection) -> RedisResult<R>) -> Result<R> {
        loop {
            let (mut c, was_idle) = self.connection()?;
            match f(&mut c) {
                Ok(r) => {
                    self.put_back(c);
                    return Ok(r);
                }
                Err(e) => {
                    let dead = broken(&e) || !redis::ConnectionLike::is_open(&c);
                    if !dead {
                        self.put_back(c);
                        return Err(self.error(e));
                    }
                    // After a restart every idle connection is dead too.
                    self.idle.lock().expect("redis pool poisoned").clear();
                    if !(was_idle && (e.is_connection_dropped() || e.is_io_error())) {
                        return Err(self.error(e));
                    }
                }
            }
        }
    }

    fn put_back(&self, c: Connection) {
        let mut idle = self.idle.lock().expect("redis pool poisoned");
        if idle.len() < MAX_IDLE {
            idle.push(c);
        }
    }

    pub(crate) fn error(&self, e: RedisError) -> BackendError {
        if broken(&e) || matches!(e.kind(), redis::ErrorKind::Server(redis::ServerErrorKind::BusyLoading)) {
            BackendError::Unavailable(Cause::new(format!("Redis at {}: {e}", self.shown)).with_source(e))
        } else {
            BackendError::Storage(Cause::new(format!("Redis: {e}")).with_source(e))
        }
    }
}

/// A client for `redis://…` or `rediss://…` (TLS). Over TLS the server's certificate is checked
/// against the webpki roots, or against the CA of the PEM file that the URL's `cacertfile`
/// parameter names; the fragment `#insecure` turns the check off (the link is still encrypted).
pub(crate) fn client(url: &str) -> Result<redis::Client> {
    crate::tls::install_default_provider();
    let invalid = |e: &dyn std::fmt::Display| BackendError::Invalid(format!("CONVEYOR_REDIS_URL {}: {e}", conveyor_core::redact::url(url)));
    let (plain, ca) = crate::tls::take_param(url, "cacertfile");
    match ca {
        None => redis::Client::open(plain.as_str()).map_err(|e| invalid(&e)),
        Some(_) if !plain.starts_with("rediss://") => Err(invalid(&"cacertfile needs a rediss:// URL")),
        Some(path) => {
            let pem = crate::tls::read_pem(&path)?;
            redis::Client::build_with_tls(plain.as_str(), redis::TlsCertificates { client_tls: None, root_cert: Some(pem) })
                .map_err(|e| invalid(&e))
        }
    }
}

fn broken(e: &RedisError) -> bool {
    e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() || e.is_timeout() || e.is_unrecoverable_error()
}

/// Wakes this process's idle workers when another process publishes on `channel`. The thread
/// reconnects with backoff and ends once the backend (and its `Wakeup`) is gone.
pub(crate) fn spawn_subscriber(client: redis::Client, channel: String, wakeup: Weak<Wakeup>) {
    let spawned = std::thread::Builder::new().name("conveyor-redis-wake".into()).spawn(move || {
        let mut backoff = Duration::from_millis(100);
        while wakeup.strong_count() > 0 {
            let conn = client.get_connection_with_timeout(Duration::from_secs(2));
            let Ok(mut conn) = conn else {
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            };
            let mut pubsub = conn.as_pubsub();
            if pubsub.subscribe(&channel).is_err() || pubsub.set_read_timeout(Some(Duration::from_secs(1))).is_err() {
                std::thread::sleep(backoff);
                continue;
            }
            backoff = Duration::from_millis(100);
            loop {
                match pubsub.get_message() {
                    Ok(_) => match wakeup.upgrade() {
                        Some(w) => w.wake(),
                        None => return,
                    },
                    Err(e) if e.is_timeout() => {
                        if wakeup.strong_count() == 0 {
                            return;
                        }
                    }
                    Err(_) => break,
                }
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "could not start the Redis wake-up subscriber; workers rely on polling");
    }
}

// --- decoding ---------------------------------------------------------------------------------

/// A reply as text ('' for nil).
pub(crate) fn text(v: &Value) -> String {
    match v {
        Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        Value::SimpleString(s) => s.clone(),
        Value::Int(i) => i.to_string(),
        Value::Double(d) => d.to_string(),
        Value::Okay => "OK".into(),
        _ => String::new(),
    }
}

pub(crate) fn int(v: &Value) -> i64 {
    match v {
        Value::Int(i) => *i,
        Value::Double(d) => *d as i64,
        other => text(other).parse::<f64>().map_or(0, |f| f as i64),
    }
}

pub(crate) fn items(v: Value) -> Vec<Value> {
    match v {
        Value::Array(a) | Value::Set(a) => a,
        Value::Nil => Vec::new(),
        other => vec![other],
    }
}

/// A flat `HGETALL` reply as pairs.
pub(crate) fn pairs(v: Value) -> Vec<(String, Value)> {
    match v {
        Value::Map(m) => m.into_iter().map(|(k, v)| (text(&k), v)).collect(),
        other => {
            let a = items(other);
            let mut out = Vec::with_capacity(a.len() / 2);
            let mut it = a.into_iter();
            while let (Some(k), Some(v)) = (it.next(), it.next()) {
                out.push((text(&k), v));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn passwords_are_not_shown() {
        let pool = super::Pool::new("redis://:secret@10.0.0.1:6379/0").expect("a client needs no connection");
        assert_eq!(pool.shown, "redis://:***@10.0.0.1:6379/0");
        let err = super::client("redis://:secret@h/?cacertfile=/ca.pem").expect_err("cacertfile needs rediss://").to_string();
        assert!(err.contains("rediss://") && !err.contains("secret"), "{err}");
    }
}
