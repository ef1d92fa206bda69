//! A synchronous connection that pipelines. The engine's transactions are synchronous closures
//! on blocking threads, so each statement used to cost a round trip: send, wait for PostgreSQL,
//! read. Most statements of a transaction are writes whose result nobody reads (a counter's
//! delta, a history row, a workflow's next step), so [`PgClient::pipeline`] sends such queued
//! statements in one write together with the next statement whose result is awaited (a read, a
//! write whose row count matters, or the `COMMIT`), and reads all their answers in order.
//!
//! This is the driver's own pipelining (`tokio-postgres` sends every request whose future has
//! been polled before reading any answer); each connection drives its socket on a
//! single-threaded runtime of its own inside `block_on`, as the driver's synchronous wrapper
//! does, so a statement costs no thread hand-off either.

use std::future::{poll_fn, Future};
use std::pin::{pin, Pin};
use std::task::Poll;

use postgres::types::ToSql;
use postgres::{Row, SimpleQueryMessage, Statement};
use tokio::runtime::Runtime;

use conveyor_core::backend::{BackendError, Cause};

use super::tls::Connector;
use super::value::pg_err;

/// A parameter a queued statement owns until it is sent.
pub(crate) type Owned = Box<dyn ToSql + Sync + Send>;

/// A statement queued to go out with the next one whose answer is awaited.
pub(crate) enum Queued {
    /// A parameterless statement over the simple protocol (`BEGIN`, `NOTIFY …`).
    Simple(&'static str),
    /// A prepared statement and its parameters.
    Prepared { sql: String, st: Statement, params: Vec<Owned> },
}

impl Queued {
    /// The SQL, for the statement cache and error reports.
    pub(crate) fn sql(&self) -> &str {
        match self {
            Queued::Simple(s) => s,
            Queued::Prepared { sql, .. } => sql,
        }
    }
}

type Driver = Pin<Box<dyn Future<Output = Result<(), postgres::Error>> + Send>>;

pub(crate) struct PgClient {
    runtime: Runtime,
    client: tokio_postgres::Client,
    /// The connection's I/O, polled while a call waits.
    driver: Driver,
    /// The connection ended (the server closed it or an I/O error ended the driver).
    ended: bool,
}

/// Polls `driver` (the socket) and `fut` on `runtime` until `fut` is done.
/// When the connection ends (the server went away), the driver is dropped: that answers every
/// request still waiting, and every later one, with the driver's "connection closed" error.
fn block_on<T>(runtime: &Runtime, driver: &mut Driver, ended: &mut bool, fut: impl Future<Output = T>) -> T {
    let mut fut = pin!(fut);
    runtime.block_on(poll_fn(|cx| {
        if !*ended {
            if let Poll::Ready(r) = driver.as_mut().poll(cx) {
                *ended = true;
                if let Err(e) = r {
                    tracing::debug!(error = %e, "PostgreSQL connection ended");
                }
                *driver = Box::pin(std::future::pending());
            }
        }
        fut.as_mut().poll(cx)
    }))
}

impl PgClient {
    /// Connects (blocking).
    pub(crate) fn connect(config: &tokio_postgres::Config, tls: Connector) -> Result<PgClient, BackendError> {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build().map_err(|e| {
            BackendError::Unavailable(Cause::new(format!("cannot start a runtime for a PostgreSQL connection: {e}")).with_source(e))
        })?;
        let (client, connection) = runtime.block_on(config.connect(tls)).map_err(|e| match pg_err(e) {
            BackendError::Storage(m) => BackendError::Unavailable(m),
            other => other,
        })?;
        Ok(PgClient { runtime, client, driver: Box::pin(connection), ended: false })
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.ended || self.client.is_closed()
    }

    pub(crate) fn prepare(&mut self, sql: &str) -> Result<Statement, postgres::Error> {
        let client = &self.client;
        block_on(&self.runtime, &mut self.driver, &mut self.ended, client.prepare(sql))
    }

    pub(crate) fn query(&mut self, st: &Statement, p: &[&(dyn ToSql + Sync)]) -> Result<Vec<Row>, postgres::Error> {
        let client = &self.client;
        block_on(&self.runtime, &mut self.driver, &mut self.ended, client.query(st, p))
    }

    pub(crate) fn execute(&mut self, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<u64, postgres::Error> {
        let client = &self.client;
        block_on(&self.runtime, &mut self.driver, &mut self.ended, client.execute(sql, p))
    }

    pub(crate) fn simple_query(&mut self, sql: &str) -> Result<Vec<SimpleQueryMessage>, postgres::Error> {
        let client = &self.client;
        block_on(&self.runtime, &mut self.driver, &mut self.ended, client.simple_query(sql))
    }

    pub(crate) fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        let client = &self.client;
        block_on(&self.runtime, &mut self.driver, &mut self.ended, client.batch_execute(sql))
    }

    /// Sends `queued` and then the request `last` makes, in one write, and reads every answer:
    /// one round trip. Returns each queued statement's outcome (rows affected) in order, and
    /// `last`'s. PostgreSQL runs them in order; after an error inside a transaction the later
    /// ones fail too (the transaction is aborted), so the first error is the one to report.
    pub(crate) fn pipeline<'c: 'q, 'q, T, F>(
        &'c mut self,
        queued: &'q [Queued],
        last: impl FnOnce(&'c tokio_postgres::Client) -> F,
    ) -> (Vec<Result<u64, postgres::Error>>, T)
    where
        F: Future<Output = T> + 'c,
    {
        let client = &self.client;
        let sent = queued.iter().map(|q| -> Pin<Box<dyn Future<Output = Result<u64, postgres::Error>> + 'q>> {
            match q {
                Queued::Simple(sql) => Box::pin(async move { client.batch_execute(sql).await.map(|_| 0) }),
                Queued::Prepared { st, params, .. } => Box::pin(async move {
                    let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| &**p as &(dyn ToSql + Sync)).collect();
                    client.execute(st, &refs).await
                }),
            }
        });
        let mut sent: Vec<_> = sent.collect();
        let mut outcomes: Vec<Option<Result<u64, postgres::Error>>> = sent.iter().map(|_| None).collect();
        let mut last = pin!(last(client));
        let mut last_out = None;
        // Every poll goes over the queued requests in order before `last`: a request is handed
        // to the connection on its first poll, so they go out in this order, in one write.
        let all = poll_fn(move |cx| {
            for (fut, out) in sent.iter_mut().zip(outcomes.iter_mut()) {
                if out.is_none() {
                    if let Poll::Ready(r) = fut.as_mut().poll(cx) {
                        *out = Some(r);
                    }
                }
            }
            if last_out.is_none() {
                if let Poll::Ready(t) = last.as_mut().poll(cx) {
                    last_out = Some(t);
                }
            }
            if last_out.is_none() || outcomes.iter().any(Option::is_none) {
                return Poll::Pending;
            }
            let done = outcomes.iter_mut().map(|o| o.take().expect("checked above")).collect();
            Poll::Ready((done, last_out.take().expect("checked above")))
        });
        block_on(&self.runtime, &mut self.driver, &mut self.ended, all)
    }
}
