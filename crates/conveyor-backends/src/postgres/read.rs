//! Reads, on a pooled connection outside any transaction (each sees what is committed).

use postgres::types::ToSql;

use conveyor_core::backend::{Cursor, FailedJob, JobFilter, MetricsQuery, Page, Paged, QueueStats, Result, WorkerInfo};
use conveyor_core::clock::now_ms;
use conveyor_core::job::{payload_value, JobId, JobInfo, JobState};
use conveyor_core::metrics::{last_minute_rates, minute_of, MetricsRow, BUCKETS};

use super::pool::Conn;

pub(crate) fn queues(c: &mut Conn) -> Result<Vec<QueueStats>> {
    let now = now_ms();
    let since = minute_of(now) - 60_000;
    let counts = c.rows(
        "SELECT queue, minute, sum(completed + retried + failed)::bigint FROM job_metrics WHERE minute >= $1 GROUP BY queue, minute",
        &[&since],
    )?;
    let rates = last_minute_rates(counts.iter().map(|r| (r.get(0), r.get(1), r.get(2))), now);
    let rows = c.rows(
        "SELECT n.name, coalesce(max(p.paused), 0), coalesce(sum(k.pending), 0)::bigint, coalesce(sum(k.delayed), 0)::bigint,
                coalesce(sum(k.reserved), 0)::bigint, coalesce(sum(k.failed), 0)::bigint
         FROM (SELECT queue AS name FROM queue_counts UNION SELECT name FROM queues) n
         LEFT JOIN queues p ON p.name = n.name
         LEFT JOIN queue_counts k ON k.queue = n.name
         GROUP BY n.name ORDER BY n.name",
        &[],
    )?;
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let queue: String = r.get(0);
        let (paused, pending, delayed, reserved, failed): (i64, i64, i64, i64, i64) = (r.get(1), r.get(2), r.get(3), r.get(4), r.get(5));
        let head =
            c.rows("SELECT available_at FROM jobs WHERE queue = $1 AND state = 0 ORDER BY priority DESC, fair, id LIMIT 1", &[&queue])?;
        let oldest: Option<i64> = head.first().map(|r| r.get(0));
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
                         created_at, available_at, reserved_at, NULL::bigint, NULL::bigint, NULL::bigint, worker";
const DONE_COLS: &str = "id, queue, kind, 3::bigint, payload, attempts, max_attempts, priority, tags, NULL::text, batch_id, NULL::text, \
                         created_at, NULL::bigint, reserved_at, finished_at, runtime_ms, wait_ms, worker";
const FAILED_COLS: &str = "id, queue, kind, 4::bigint, payload, attempts, max_attempts, priority, tags, unique_key, batch_id, error, \
                           created_at, NULL::bigint, NULL::bigint, failed_at, runtime_ms, NULL::bigint, NULL::text";

fn info_from_row(r: &postgres::Row) -> JobInfo {
    let state = match r.get::<_, i64>(3) {
        0 => JobState::Pending,
        1 => JobState::Reserved,
        2 => JobState::Delayed,
        3 => JobState::Completed,
        _ => JobState::Failed,
    };
    let payload: String = r.get(4);
    let tags: Option<String> = r.get(8);
    JobInfo {
        id: JobId::from_slice(&r.get::<_, Vec<u8>>(0)).unwrap_or_default(),
        queue: r.get(1),
        kind: r.get(2),
        state,
        payload: payload_value(&payload),
        attempts: r.get::<_, i64>(5) as u32,
        max_attempts: r.get::<_, i64>(6) as u32,
        priority: r.get::<_, i64>(7) as i32,
        tags: tags.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
        unique_key: r.get(9),
        batch_id: r.get(10),
        error: r.get(11),
        created_at: r.get(12),
        available_at: r.get(13),
        reserved_at: r.get(14),
        finished_at: r.get(15),
        runtime_ms: r.get::<_, Option<i64>>(16).map(|v| v as u64),
        wait_ms: r.get::<_, Option<i64>>(17).map(|v| v as u64),
        worker: r.get(18),
    }
}

pub(crate) fn job(c: &mut Conn, id: JobId) -> Result<Option<JobInfo>> {
    let key = id.as_bytes().to_vec();
    for sql in [
        format!("SELECT {LIVE_COLS} FROM jobs WHERE id = $1"),
        format!("SELECT {FAILED_COLS} FROM failed_jobs WHERE id = $1"),
        format!("SELECT {DONE_COLS} FROM completed_jobs WHERE id = $1 ORDER BY seq DESC LIMIT 1"),
    ] {
        if let Some(r) = c.rows(&sql, &[&key])?.first() {
            return Ok(Some(info_from_row(r)));
        }
    }
    Ok(None)
}

pub(crate) fn jobs(c: &mut Conn, filter: &JobFilter, page: Page) -> Result<Paged<JobInfo>> {
    let tag = filter.tag.as_ref().map(|t| format!("%{}%", serde_json::to_string(t).expect("a string serializes")));
    let after = page.after_job()?.map(|id| id.as_bytes().to_vec());
    let cond = "($1::text IS NULL OR queue = $1) AND ($2::text IS NULL OR kind = $2) AND ($3::text IS NULL OR tags LIKE $3) \
                AND ($6::text IS NULL OR batch_id = $6)";
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
    // As SQLite's: each source's newest rows after the cursor, by id, merged.
    let want = (page.offset() + page.limit()) as i64;
    for (cols, table) in sources {
        let state_sql = if table == "jobs" { " AND ($4::bigint IS NULL OR state = $4)" } else { " AND $4::bigint IS NULL" };
        let p: [&(dyn ToSql + Sync); 7] = [&filter.queue, &filter.kind, &tag, &state_cond, &want, &filter.batch_id, &after];
        // Every statement names all seven parameters, so one parameter list serves both.
        let count_sql = conveyor_core::backend::count_sql(&format!(
            "FROM {table} WHERE {cond}{state_sql} AND $5::bigint IS NOT NULL AND ($7::bytea IS NULL OR $7::bytea IS NOT NULL)"
        ));
        let n: i64 = c.rows(&count_sql, &p)?.first().map_or(0, |r| r.get(0));
        count += n as u64;
        let sql =
            format!("SELECT {cols} FROM {table} WHERE {cond}{state_sql} AND ($7::bytea IS NULL OR id < $7) ORDER BY id DESC LIMIT $5");
        items.extend(c.rows(&sql, &p)?.iter().map(info_from_row));
    }
    items.sort_by_key(|j| std::cmp::Reverse(j.id));
    let items = items.into_iter().skip(page.offset() as usize).collect();
    Ok(Paged::from_rows(items, &page, count, |j: &JobInfo| Cursor::new(0, j.id.to_string())))
}

const FAILED_JOB_COLS: &str = "id, queue, kind, payload, attempts, max_attempts, error, tags, batch_id, created_at, failed_at, runtime_ms";

fn failed_from_row(r: &postgres::Row) -> FailedJob {
    let payload: String = r.get(3);
    let tags: Option<String> = r.get(7);
    FailedJob {
        id: JobId::from_slice(&r.get::<_, Vec<u8>>(0)).unwrap_or_default(),
        queue: r.get(1),
        kind: r.get(2),
        payload: payload_value(&payload),
        attempts: r.get::<_, i64>(4) as u32,
        max_attempts: r.get::<_, i64>(5) as u32,
        error: r.get(6),
        tags: tags.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default(),
        batch_id: r.get(8),
        created_at: r.get(9),
        failed_at: r.get(10),
        runtime_ms: r.get::<_, i64>(11) as u64,
    }
}

pub(crate) fn failed(c: &mut Conn, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
    let count_sql = conveyor_core::backend::count_sql("FROM failed_jobs WHERE ($1::text IS NULL OR queue = $1)");
    let count: i64 = c.rows(&count_sql, &[&queue])?[0].get(0);
    let after = page.after_job()?.map(|id| id.as_bytes().to_vec());
    let at = page.after.as_ref().map(|c| c.at);
    let sql = format!(
        "SELECT {FAILED_JOB_COLS} FROM failed_jobs WHERE ($1::text IS NULL OR queue = $1)
         AND ($4::bigint IS NULL OR (failed_at, id) < ($4, $5::bytea)) ORDER BY failed_at DESC, id DESC LIMIT $2 OFFSET $3"
    );
    let (limit, offset) = (page.limit() as i64, page.offset() as i64);
    let items = c.rows(&sql, &[&queue, &limit, &offset, &at, &after])?.iter().map(failed_from_row).collect();
    Ok(Paged::from_rows(items, &page, count as u64, |f: &FailedJob| Cursor::new(f.failed_at, f.id.to_string())))
}

pub(crate) fn failed_job(c: &mut Conn, id: JobId) -> Result<Option<FailedJob>> {
    let sql = format!("SELECT {FAILED_JOB_COLS} FROM failed_jobs WHERE id = $1");
    Ok(c.rows(&sql, &[&id.as_bytes().to_vec()])?.first().map(failed_from_row))
}

/// The processes holding reservations.
pub(crate) fn holders(c: &mut Conn) -> Result<Vec<String>> {
    let rows = c.rows("SELECT DISTINCT worker FROM jobs WHERE state = 1 AND worker IS NOT NULL", &[])?;
    Ok(rows.iter().map(|r| r.get(0)).collect())
}

pub(crate) fn metrics(c: &mut Conn, q: &MetricsQuery) -> Result<Vec<MetricsRow>> {
    let hist: String = (0..BUCKETS).map(|i| format!(", sum(r{i})::bigint, sum(w{i})::bigint")).collect();
    let sql = format!(
        "SELECT minute, queue, kind, sum(completed)::bigint, sum(retried)::bigint, sum(failed)::bigint, sum(runtime_sum)::bigint,
                max(runtime_max), sum(wait_sum)::bigint{hist}
         FROM job_metrics WHERE minute >= $1 AND ($2::text IS NULL OR queue = $2) AND ($3::text IS NULL OR kind = $3)
         GROUP BY minute, queue, kind ORDER BY minute, queue, kind"
    );
    let since = minute_of(q.since);
    let rows = c.rows(&sql, &[&since, &q.queue, &q.kind])?;
    Ok(rows
        .iter()
        .map(|r| {
            let mut row = MetricsRow {
                minute: r.get(0),
                queue: r.get(1),
                kind: r.get(2),
                completed: r.get::<_, i64>(3) as u64,
                retried: r.get::<_, i64>(4) as u64,
                failed: r.get::<_, i64>(5) as u64,
                runtime_sum_ms: r.get::<_, i64>(6) as u64,
                runtime_max_ms: r.get::<_, i64>(7) as u64,
                wait_sum_ms: r.get::<_, i64>(8) as u64,
                ..Default::default()
            };
            for i in 0..BUCKETS {
                row.runtime_hist[i] = r.get::<_, i64>(9 + 2 * i) as u64;
                row.wait_hist[i] = r.get::<_, i64>(10 + 2 * i) as u64;
            }
            row
        })
        .collect())
}

pub(crate) fn workers(c: &mut Conn, since: i64) -> Result<Vec<WorkerInfo>> {
    Ok(c.rows("SELECT info FROM workers WHERE last_seen >= $1 ORDER BY id", &[&since])?
        .iter()
        .filter_map(|r| serde_json::from_str::<WorkerInfo>(&r.get::<_, String>(0)).ok())
        .collect())
}
