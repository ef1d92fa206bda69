//! Reads on their own connections (WAL lets them run beside the writer), on blocking threads.

use std::sync::{Arc, Mutex};

use rusqlite::{params, Connection, OptionalExtension};

use conveyor_core::backend::{Cursor, FailedJob, JobFilter, MetricsQuery, Page, Paged, QueueStats, Result, WorkerInfo};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{payload_value, JobId, JobInfo, JobState};
use conveyor_core::metrics::{last_minute_rates, minute_of, MetricsRow, BUCKETS};

use super::{open_connection, storage_err};

/// A small pool of read connections, opened on demand and kept for reuse.
#[derive(Clone)]
pub(crate) struct Readers {
    path: Arc<String>,
    idle: Arc<Mutex<Vec<Connection>>>,
}

impl Readers {
    pub(crate) fn new(path: String) -> Self {
        Readers { path: Arc::new(path), idle: Arc::default() }
    }

    pub(crate) async fn with<R, F>(&self, f: F) -> Result<R>
    where
        R: Send + 'static,
        F: FnOnce(&Connection) -> Result<R> + Send + 'static,
    {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let conn = this.idle.lock().expect("reader pool poisoned").pop();
            let conn = match conn {
                Some(c) => c,
                None => {
                    let c = open_connection(&this.path).map_err(storage_err)?;
                    // Readers share the OS page cache; a small private cache each keeps a full
                    // pool's memory bounded (16 × 2 MB).
                    c.pragma_update(None, "cache_size", -2_000).map_err(storage_err)?;
                    c
                }
            };
            let out = f(&conn);
            let mut idle = this.idle.lock().expect("reader pool poisoned");
            // Enough for the blocking pool's usual concurrency: opening a connection (and its
            // pragmas) costs far more than a query.
            if idle.len() < 16 {
                idle.push(conn);
            }
            out
        })
        .await
        .map_err(|e| conveyor_core::BackendError::Other(format!("reader task failed: {e}")))?
    }
}

pub(crate) fn queues(conn: &Connection) -> Result<Vec<QueueStats>> {
    let now = now_ms();
    let mut st = conn
        .prepare_cached(
            "SELECT queue, minute, sum(completed + retried + failed) FROM job_metrics WHERE minute >= ?1 GROUP BY queue, minute",
        )
        .map_err(storage_err)?;
    let counts = st
        .query_map([minute_of(now) - 60_000], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
        .map_err(storage_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(storage_err)?;
    let rates = last_minute_rates(counts, now);
    let mut out = Vec::new();
    let mut st =
        conn.prepare_cached("SELECT name, paused, pending, delayed, reserved, failed FROM queues ORDER BY name").map_err(storage_err)?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
                r.get::<_, i64>(5)?,
            ))
        })
        .map_err(storage_err)?;
    let mut head = conn
        .prepare_cached("SELECT available_at FROM jobs WHERE queue = ?1 AND state = 0 ORDER BY priority DESC, fair, id LIMIT 1")
        .map_err(storage_err)?;
    for row in rows {
        let (queue, paused, pending, delayed, reserved, failed) = row.map_err(storage_err)?;
        let oldest: Option<i64> = head.query_row([&queue], |r| r.get(0)).optional().map_err(storage_err)?;
        out.push(QueueStats {
            per_minute: rates.get(&queue).copied().unwrap_or(0.0).round() as u64,
            oldest_wait_s: oldest.map_or(0.0, |t| ((now - t).max(0) as f64) / 1000.0),
            queue,
            pending: pending.max(0) as u64,
            delayed: delayed.max(0) as u64,
            reserved: reserved.max(0) as u64,
            failed: failed.max(0) as u64,
            paused: paused != 0,
        });
    }
    Ok(out)
}

const LIVE_COLS: &str = "id, queue, kind, state, payload, attempts, max_attempts, priority, tags, unique_key, batch_id, last_error, \
                         created_at, available_at, reserved_at, NULL, NULL, NULL, worker";
const DONE_COLS: &str = "id, queue, kind, 3, payload, attempts, max_attempts, priority, tags, NULL, batch_id, NULL, \
                         created_at, NULL, reserved_at, finished_at, runtime_ms, wait_ms, worker";
const FAILED_COLS: &str = "id, queue, kind, 4, payload, attempts, max_attempts, priority, tags, unique_key, batch_id, error, \
                           created_at, NULL, NULL, failed_at, runtime_ms, NULL, NULL";

fn info_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobInfo> {
    let id: Vec<u8> = r.get(0)?;
    let state = match r.get::<_, i64>(3)? {
        0 => JobState::Pending,
        1 => JobState::Reserved,
        2 => JobState::Delayed,
        3 => JobState::Completed,
        _ => JobState::Failed,
    };
    let payload: String = r.get(4)?;
    let tags: Option<String> = r.get(8)?;
    Ok(JobInfo {
        id: JobId::from_slice(&id).unwrap_or_default(),
        queue: r.get(1)?,
        kind: r.get(2)?,
        state,
        payload: payload_value(&payload),
        attempts: r.get::<_, i64>(5)? as u32,
        max_attempts: r.get::<_, i64>(6)? as u32,
        priority: r.get::<_, i64>(7)? as i32,
        tags: tags.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
        unique_key: r.get(9)?,
        batch_id: r.get(10)?,
        error: r.get(11)?,
        created_at: r.get(12)?,
        available_at: r.get(13)?,
        reserved_at: r.get(14)?,
        finished_at: r.get(15)?,
        runtime_ms: r.get::<_, Option<i64>>(16)?.map(|v| v as u64),
        wait_ms: r.get::<_, Option<i64>>(17)?.map(|v| v as u64),
        worker: r.get(18)?,
    })
}

pub(crate) fn job(conn: &Connection, id: JobId) -> Result<Option<JobInfo>> {
    let key = &id.as_bytes()[..];
    for sql in [
        format!("SELECT {LIVE_COLS} FROM jobs WHERE id = ?1"),
        format!("SELECT {FAILED_COLS} FROM failed_jobs WHERE id = ?1"),
        format!("SELECT {DONE_COLS} FROM completed_jobs WHERE id = ?1 ORDER BY seq DESC LIMIT 1"),
    ] {
        let found = conn.prepare_cached(&sql).and_then(|mut s| s.query_row([key], info_from_row).optional()).map_err(storage_err)?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

pub(crate) fn jobs(conn: &Connection, filter: &JobFilter, page: Page) -> Result<Paged<JobInfo>> {
    let tag = filter.tag.as_ref().map(|t| format!("%{}%", serde_json::to_string(t).expect("a string serializes")));
    let after = page.after_job()?.map(|id| id.as_bytes().to_vec());
    let cond =
        "(?1 IS NULL OR queue = ?1) AND (?2 IS NULL OR kind = ?2) AND (?3 IS NULL OR tags LIKE ?3) AND (?6 IS NULL OR batch_id = ?6)";
    let (sources, state_cond): (Vec<(&str, &str)>, Option<i64>) = match filter.state {
        Some(JobState::Pending) => (vec![(LIVE_COLS, "jobs")], Some(0)),
        Some(JobState::Reserved) => (vec![(LIVE_COLS, "jobs")], Some(1)),
        Some(JobState::Delayed) => (vec![(LIVE_COLS, "jobs")], Some(2)),
        Some(JobState::Completed) => (vec![(DONE_COLS, "completed_jobs")], None),
        Some(JobState::Failed) => (vec![(FAILED_COLS, "failed_jobs")], None),
        None => (vec![(LIVE_COLS, "jobs"), (DONE_COLS, "completed_jobs"), (FAILED_COLS, "failed_jobs")], None),
    };
    let mut items: Vec<JobInfo> = Vec::new();
    let mut count = 0u64;
    // Each source gives its newest `offset + limit` rows (after the cursor, by id: ids are
    // time-ordered, so one key orders all three sources); the merge keeps the page's share.
    let want = page.offset() + page.limit();
    for (cols, table) in sources {
        let state_sql = if table == "jobs" { " AND (?4 IS NULL OR state = ?4)" } else { " AND ?4 IS NULL" };
        let count_sql = conveyor_core::backend::count_sql(&format!("FROM {table} WHERE {cond}{state_sql} AND ?5 IS NULL AND ?7 IS NULL"));
        let n: i64 = conn
            .prepare_cached(&count_sql)
            .and_then(|mut s| {
                s.query_row(params![filter.queue, filter.kind, tag, state_cond, None::<i64>, filter.batch_id, None::<Vec<u8>>], |r| {
                    r.get(0)
                })
            })
            .map_err(storage_err)?;
        count += n as u64;
        let sql = format!("SELECT {cols} FROM {table} WHERE {cond}{state_sql} AND (?7 IS NULL OR id < ?7) ORDER BY id DESC LIMIT ?5");
        let mut st = conn.prepare_cached(&sql).map_err(storage_err)?;
        let rows = st
            .query_map(params![filter.queue, filter.kind, tag, state_cond, want as i64, filter.batch_id, after], info_from_row)
            .map_err(storage_err)?;
        for r in rows {
            items.push(r.map_err(storage_err)?);
        }
    }
    items.sort_by_key(|j| std::cmp::Reverse(j.id));
    let items = items.into_iter().skip(page.offset() as usize).collect();
    Ok(Paged::from_rows(items, &page, count, |j: &JobInfo| Cursor::new(0, j.id.to_string())))
}

fn failed_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<FailedJob> {
    let id: Vec<u8> = r.get(0)?;
    let payload: String = r.get(3)?;
    let tags: Option<String> = r.get(7)?;
    Ok(FailedJob {
        id: JobId::from_slice(&id).unwrap_or_default(),
        queue: r.get(1)?,
        kind: r.get(2)?,
        payload: payload_value(&payload),
        attempts: r.get::<_, i64>(4)? as u32,
        max_attempts: r.get::<_, i64>(5)? as u32,
        error: r.get(6)?,
        tags: tags.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
        batch_id: r.get(8)?,
        created_at: r.get(9)?,
        failed_at: r.get(10)?,
        runtime_ms: r.get::<_, i64>(11)? as u64,
    })
}

const FAILED_JOB_COLS: &str = "id, queue, kind, payload, attempts, max_attempts, error, tags, batch_id, created_at, failed_at, runtime_ms";

pub(crate) fn failed(conn: &Connection, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
    let count: i64 = conn
        .prepare_cached(&conveyor_core::backend::count_sql("FROM failed_jobs WHERE (?1 IS NULL OR queue = ?1)"))
        .and_then(|mut s| s.query_row([queue], |r| r.get(0)))
        .map_err(storage_err)?;
    let after = page.after_job()?.map(|id| id.as_bytes().to_vec());
    let at = page.after.as_ref().map(|c| c.at);
    let sql = format!(
        "SELECT {FAILED_JOB_COLS} FROM failed_jobs WHERE (?1 IS NULL OR queue = ?1) AND (?4 IS NULL OR (failed_at, id) < (?4, ?5))
         ORDER BY failed_at DESC, id DESC LIMIT ?2 OFFSET ?3"
    );
    let mut st = conn.prepare_cached(&sql).map_err(storage_err)?;
    let items = st
        .query_map(params![queue, page.limit() as i64, page.offset() as i64, at, after], failed_from_row)
        .map_err(storage_err)?
        .collect::<rusqlite::Result<Vec<_>>>()
        .map_err(storage_err)?;
    Ok(Paged::from_rows(items, &page, count as u64, |f: &FailedJob| Cursor::new(f.failed_at, f.id.to_string())))
}

pub(crate) fn failed_job(conn: &Connection, id: JobId) -> Result<Option<FailedJob>> {
    let sql = format!("SELECT {FAILED_JOB_COLS} FROM failed_jobs WHERE id = ?1");
    conn.prepare_cached(&sql).and_then(|mut s| s.query_row([&id.as_bytes()[..]], failed_from_row).optional()).map_err(storage_err)
}

pub(crate) fn metrics(conn: &Connection, q: &MetricsQuery) -> Result<Vec<MetricsRow>> {
    let hist: String = (0..BUCKETS).map(|i| format!(", r{i}, w{i}")).collect();
    let sql = format!(
        "SELECT minute, queue, kind, completed, retried, failed, runtime_sum, runtime_max, wait_sum{hist} FROM job_metrics
         WHERE minute >= ?1 AND (?2 IS NULL OR queue = ?2) AND (?3 IS NULL OR kind = ?3) ORDER BY minute, queue, kind"
    );
    let mut st = conn.prepare_cached(&sql).map_err(storage_err)?;
    let rows = st
        .query_map(params![minute_of(q.since), q.queue, q.kind], |r| {
            let mut row = MetricsRow {
                minute: r.get(0)?,
                queue: r.get(1)?,
                kind: r.get(2)?,
                completed: r.get::<_, i64>(3)? as u64,
                retried: r.get::<_, i64>(4)? as u64,
                failed: r.get::<_, i64>(5)? as u64,
                runtime_sum_ms: r.get::<_, i64>(6)? as u64,
                runtime_max_ms: r.get::<_, i64>(7)? as u64,
                wait_sum_ms: r.get::<_, i64>(8)? as u64,
                ..Default::default()
            };
            for i in 0..BUCKETS {
                row.runtime_hist[i] = r.get::<_, i64>(9 + 2 * i)? as u64;
                row.wait_hist[i] = r.get::<_, i64>(10 + 2 * i)? as u64;
            }
            Ok(row)
        })
        .map_err(storage_err)?;
    rows.collect::<rusqlite::Result<Vec<_>>>().map_err(storage_err)
}

/// The processes holding reservations (from the leased jobs' partial index).
pub(crate) fn holders(conn: &Connection) -> Result<Vec<String>> {
    conn.prepare_cached("SELECT DISTINCT worker FROM jobs WHERE state = 1 AND worker IS NOT NULL")
        .and_then(|mut s| s.query_map([], |r| r.get(0))?.collect())
        .map_err(storage_err)
}

pub(crate) fn workers(conn: &Connection, since: i64) -> Result<Vec<WorkerInfo>> {
    let mut st = conn.prepare_cached("SELECT info FROM workers WHERE last_seen >= ?1 ORDER BY id").map_err(storage_err)?;
    let rows = st.query_map([since], |r| r.get::<_, String>(0)).map_err(storage_err)?;
    let mut out = Vec::new();
    for r in rows {
        if let Ok(info) = serde_json::from_str::<WorkerInfo>(&r.map_err(storage_err)?) {
            out.push(info);
        }
    }
    Ok(out)
}
