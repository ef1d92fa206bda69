//! One PostgreSQL transaction: the queue's operations (the same state machine as SQLite's
//! writer, in PostgreSQL's SQL) and [`Tx`] for the engine's and the applications' SQL. The
//! queue-counter and metric deltas an operation produces are added up in memory and written once,
//! into this connection's shard, just before the commit.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicI64, Ordering};

use postgres::types::ToSql;
use postgres::Statement;

use conveyor_core::backend::{BackendError, ReadyJob, Result, Row, SqlValue, Tx};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{EnqueueOutcome, NewJob};
use conveyor_core::metrics::{MetricsAccumulator, BUCKETS};

use super::pipe::{Owned, PgClient, Queued};
use super::value::{params, pg_err, refs, row, OwnedParam};

pub(crate) use crate::relational::{DELAYED, FAILED, JOB_COLS, PENDING, RESERVED};

/// The shortest interval between two `NOTIFY`s of one process.
pub(crate) const NOTIFY_EVERY_MS: i64 = 20;

/// Statements queued at most before they are sent anyway (their answers read).
const QUEUED_MAX: usize = 256;

/// SQL longer than this is not kept in the statement cache: generated statements that rarely
/// repeat. A set-wise step's `IN` list of 1,024 parameters (about 6,000 characters) stays
/// under it, prepared once per connection.
pub(crate) const ONE_OFF: usize = 16384;

/// Prepared statements of one connection, by SQL text.
pub(crate) type Statements = HashMap<String, Statement>;

/// One transaction on a pipelining connection. `BEGIN` and the statements whose answers nobody
/// waits for ([`PgTx::defer`]) are queued and go out with the next statement that is waited for,
/// so they cost no round trip of their own; the commit sends whatever is still queued with the
/// `COMMIT`. A transaction dropped without a commit is rolled back.
pub(crate) struct PgTx<'c> {
    client: &'c mut PgClient,
    stmts: &'c mut Statements,
    queued: Vec<Queued>,
    /// `BEGIN` has gone out and no `COMMIT` or `ROLLBACK` yet.
    open: bool,
    shard: i64,
    /// Pending / reserved / delayed / failed deltas per queue.
    pub(super) counts: BTreeMap<String, [i64; 4]>,
    pub(super) metrics: MetricsAccumulator,
    /// Ready work was committed: wake the workers (here and, by NOTIFY, elsewhere).
    pub(crate) wake: bool,
    /// The first statement that failed: the transaction cannot commit.
    failed: Option<BackendError>,
    /// Completed-job history rows kept (0 = none).
    pub(super) history: usize,
    pub(crate) history_inserts: usize,
    /// Jobs made ready, for the dispatch hook (gathered only when one is set).
    pub(crate) ready: Vec<ReadyJob>,
    pub(crate) collect_ready: bool,
}

impl Drop for PgTx<'_> {
    fn drop(&mut self) {
        if self.open {
            // A failed rollback leaves a connection the pool drops (it checks `is_closed`), or
            // one whose server ends the transaction when the session ends.
            if let Err(e) = self.client.batch_execute("ROLLBACK") {
                tracing::debug!(error = %e, "rolling back a PostgreSQL transaction failed");
            }
        }
    }
}

impl<'c> PgTx<'c> {
    pub(crate) fn new(client: &'c mut PgClient, stmts: &'c mut Statements, shard: i64, history: usize) -> Self {
        PgTx {
            client,
            stmts,
            queued: vec![Queued::Simple("BEGIN")],
            open: false,
            shard,
            counts: BTreeMap::new(),
            metrics: MetricsAccumulator::default(),
            wake: false,
            failed: None,
            history,
            history_inserts: 0,
            ready: Vec::new(),
            collect_ready: false,
        }
    }

    /// Sends what is queued and the request `last` makes, in one round trip, and returns
    /// `last`'s answer — or the first queued statement's error, since PostgreSQL then aborted
    /// the transaction and `last` failed only because of it.
    fn send<'a, T, F>(&'a mut self, last: impl FnOnce(&'a tokio_postgres::Client) -> F) -> Result<T>
    where
        F: std::future::Future<Output = std::result::Result<T, postgres::Error>> + 'a,
    {
        let queued = std::mem::take(&mut self.queued);
        self.open = true;
        let (outcomes, out) = self.client.pipeline(&queued, last);
        let mut first = None;
        for (q, o) in queued.iter().zip(outcomes) {
            if let Err(e) = o {
                self.stmts.remove(q.sql());
                first.get_or_insert_with(|| pg_err(e));
            }
        }
        if let Some(e) = first {
            if self.failed.is_none() {
                self.failed = Some(e.clone());
            }
            return Err(e);
        }
        out.map_err(pg_err)
    }

    pub(super) fn prepare(&mut self, sql: &str) -> Result<Statement> {
        if let Some(st) = self.stmts.get(sql) {
            return Ok(st.clone());
        }
        let st = self.send(|c| c.prepare(sql));
        let st = self.note(sql, st)?;
        if sql.len() > ONE_OFF {
            // Generated multi-row statements rarely repeat: prepared for this use only.
            return Ok(st);
        }
        if self.stmts.len() >= 512 {
            self.stmts.clear();
        }
        self.stmts.insert(sql.to_string(), st.clone());
        Ok(st)
    }

    pub(super) fn run(&mut self, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<u64> {
        let st = self.prepare(sql)?;
        let r = self.send(|c| c.execute(&st, p));
        self.note(sql, r)
    }

    pub(super) fn rows(&mut self, sql: &str, p: &[&(dyn ToSql + Sync)]) -> Result<Vec<postgres::Row>> {
        let st = self.prepare(sql)?;
        let r = self.send(|c| c.query(&st, p));
        self.note(sql, r)
    }

    /// Queues a statement whose answer nobody waits for: it goes out with the next statement
    /// that is waited for, or with the commit. If it fails, that statement or the commit fails
    /// with its error, and nothing of the transaction is committed.
    pub(super) fn defer(&mut self, sql: &str, params: Vec<Owned>) -> Result<()> {
        let st = self.prepare(sql)?;
        self.queued.push(Queued::Prepared { sql: sql.to_string(), st, params });
        if self.queued.len() >= QUEUED_MAX {
            self.send(|_| std::future::ready(Ok(())))?;
        }
        Ok(())
    }

    /// Runs a parameterless script (several statements) after what is queued.
    fn script(&mut self, sql: &str) -> Result<()> {
        let r = self.send(|c| c.batch_execute(sql));
        self.note(sql, r)
    }

    /// Remembers the first failure: PostgreSQL has aborted the transaction then, so it must not
    /// be reported as committed even if the caller went on. A failed statement also leaves the
    /// statement cache (its plan may be stale after a schema change).
    fn note<T>(&mut self, sql: &str, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.stmts.remove(sql);
            if self.failed.is_none() {
                self.failed = Some(e.clone());
            }
        }
        r
    }

    /// Writes the deltas, notifies other processes if ready work was added (at most once per
    /// `NOTIFY_EVERY_MS` per process: PostgreSQL serializes the commits of notifying
    /// transactions, and the workers of other processes poll anyway), and commits.
    /// Returns whether ready work was committed, and whether this transaction notified.
    pub(crate) fn commit(mut self, last_notify: &AtomicI64) -> Result<(bool, bool)> {
        if let Some(e) = self.failed.take() {
            // Dropping the transaction rolls it back.
            return Err(e);
        }
        self.flush()?;
        let mut notified = false;
        if self.wake {
            let now = now_ms();
            let last = last_notify.load(Ordering::Relaxed);
            if now - last >= NOTIFY_EVERY_MS && last_notify.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
                self.queued.push(Queued::Simple("NOTIFY conveyor_jobs"));
                notified = true;
            }
        }
        let wake = self.wake;
        if !self.open && self.queued.len() == 1 {
            // Nothing but the queued `BEGIN`: nothing to commit, no round trip.
            self.queued.clear();
            return Ok((wake, notified));
        }
        let r = self.send(|c| c.batch_execute("COMMIT"));
        // Whatever the answer, the transaction is over: committed, or (after an error, which
        // PostgreSQL answers `COMMIT` with a rollback for) rolled back.
        self.open = false;
        r?;
        Ok((wake, notified))
    }

    /// Writes the counter and metric deltas gathered so far, last in the transaction and in one
    /// order (queues and metric rows sorted), so transactions never lock them crosswise.
    pub(super) fn flush(&mut self) -> Result<()> {
        let counts = std::mem::take(&mut self.counts);
        for (q, d) in counts {
            if d.iter().all(|v| *v == 0) {
                continue;
            }
            let shard = self.shard;
            self.defer(
                "INSERT INTO queue_counts (queue, shard, pending, reserved, delayed, failed) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (queue, shard) DO UPDATE SET pending = queue_counts.pending + excluded.pending,
                    reserved = queue_counts.reserved + excluded.reserved, delayed = queue_counts.delayed + excluded.delayed,
                    failed = queue_counts.failed + excluded.failed",
                vec![Box::new(q), Box::new(shard), Box::new(d[PENDING]), Box::new(d[RESERVED]), Box::new(d[DELAYED]), Box::new(d[FAILED])],
            )?;
        }
        if !self.metrics.is_empty() {
            let hist_names: String = (0..BUCKETS).map(|i| format!(", r{i}, w{i}")).collect();
            let hist_params: String = (0..BUCKETS).map(|i| format!(", ${}, ${}", 11 + 2 * i, 12 + 2 * i)).collect();
            let hist_update: String = (0..BUCKETS)
                .map(|i| format!(", r{i} = job_metrics.r{i} + excluded.r{i}, w{i} = job_metrics.w{i} + excluded.w{i}"))
                .collect();
            let sql = format!(
                "INSERT INTO job_metrics (minute, queue, kind, shard, completed, retried, failed, runtime_sum, runtime_max, wait_sum{hist_names})
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10{hist_params})
                 ON CONFLICT (minute, queue, kind, shard) DO UPDATE SET completed = job_metrics.completed + excluded.completed,
                    retried = job_metrics.retried + excluded.retried, failed = job_metrics.failed + excluded.failed,
                    runtime_sum = job_metrics.runtime_sum + excluded.runtime_sum,
                    runtime_max = greatest(job_metrics.runtime_max, excluded.runtime_max),
                    wait_sum = job_metrics.wait_sum + excluded.wait_sum{hist_update}"
            );
            let mut rows: Vec<_> = self.metrics.drain().collect();
            rows.sort_by(|a, b| (a.minute, &a.queue, &a.kind).cmp(&(b.minute, &b.queue, &b.kind)));
            for r in rows {
                let mut values: Vec<i64> = vec![
                    r.minute,
                    self.shard,
                    r.completed as i64,
                    r.retried as i64,
                    r.failed as i64,
                    r.runtime_sum_ms as i64,
                    r.runtime_max_ms as i64,
                    r.wait_sum_ms as i64,
                ];
                for i in 0..BUCKETS {
                    values.push(r.runtime_hist[i] as i64);
                    values.push(r.wait_hist[i] as i64);
                }
                let mut p: Vec<Owned> = vec![Box::new(values[0]), Box::new(r.queue), Box::new(r.kind)];
                p.extend(values[1..].iter().map(|v| Box::new(*v) as Owned));
                self.defer(&sql, p)?;
            }
        }
        Ok(())
    }
}

impl Tx for PgTx<'_> {
    fn execute(&mut self, sql: &str, values: &[SqlValue]) -> Result<u64> {
        let p = params(values);
        self.run(sql, &refs(&p))
    }

    fn query(&mut self, sql: &str, values: &[SqlValue]) -> Result<Vec<Row>> {
        let p = params(values);
        self.rows(sql, &refs(&p))?.iter().map(row).collect()
    }

    fn execute_script(&mut self, sql: &str) -> Result<()> {
        let r = self.script(sql);
        // A schema change may invalidate cached plans.
        self.stmts.clear();
        r
    }

    /// One statement whatever the number of rows: the values go as one array per column
    /// (`INSERT … SELECT … FROM unnest($1::int8[], $2::text[], …)`), so its text depends only on
    /// the table and is prepared once per connection — a multi-row `VALUES` list is a new
    /// statement for each row count, parsed and planned with thousands of parameters.
    fn insert_rows(&mut self, head: &str, rows: &[Vec<SqlValue>], tail: &str) -> Result<Vec<Row>> {
        let Some(width) = rows.first().map(Vec::len) else { return Ok(Vec::new()) };
        if rows.len() == 1 {
            return conveyor_core::backend::multi_row_insert(self, head, rows, tail);
        }
        // The columns' types, as PostgreSQL infers them for a one-row insert (prepared once).
        let one: Vec<String> = (1..=width).map(|i| format!("${i}")).collect();
        let types = self.prepare(&format!("{head} VALUES ({})", one.join(", ")))?.params().to_vec();
        if types.iter().any(|t| t.schema() != "pg_catalog") {
            // A type of the application's own (an enum, say): the plain multi-row form.
            return conveyor_core::backend::multi_row_insert(self, head, rows, tail);
        }
        let arrays: Vec<String> = types.iter().enumerate().map(|(i, t)| format!("${}::{}[]", i + 1, t.name())).collect();
        let cols: Vec<String> = (1..=width).map(|i| format!("c{i}")).collect();
        let sql =
            format!("{head} SELECT {cols} FROM unnest({arrays}) AS t({cols}) {tail}", cols = cols.join(", "), arrays = arrays.join(", "));
        let columns: Vec<Vec<OwnedParam>> =
            (0..width).map(|c| rows.iter().map(|r| OwnedParam(r.get(c).cloned().unwrap_or(SqlValue::Null))).collect()).collect();
        if tail.to_ascii_uppercase().contains("RETURNING") {
            let p: Vec<&(dyn ToSql + Sync)> = columns.iter().map(|c| c as &(dyn ToSql + Sync)).collect();
            return self.rows(&sql, &p)?.iter().map(row).collect();
        }
        PgTx::defer(self, &sql, columns.into_iter().map(|c| Box::new(c) as Owned).collect()).map(|_| Vec::new())
    }

    fn defer(&mut self, sql: &str, values: &[SqlValue]) -> Result<()> {
        PgTx::defer(self, sql, values.iter().map(|v| Box::new(OwnedParam(v.clone())) as Owned).collect())
    }

    fn enqueue(&mut self, jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        for job in &jobs {
            job.validate().map_err(BackendError::Invalid)?;
        }
        crate::relational::lifecycle::enqueue(self, jobs)
    }

    fn serialize_migrations(&mut self) -> Result<()> {
        self.script(super::schema::LOCK_SQL)
    }

    fn for_update(&self) -> &'static str {
        " FOR UPDATE"
    }
}
