//! The delivery log, filtered and paged.

use super::*;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LogEntry {
    pub id: String,
    pub event: String,
    pub event_id: String,
    pub user_id: Option<i64>,
    pub channel: String,
    pub recipient: String,
    pub status: String,
    pub attempts: u32,
    pub error: Option<String>,
    pub provider_id: Option<String>,
    pub created_at: i64,
    pub sent_at: Option<i64>,
}

#[derive(Debug, Clone, Default)]
pub struct LogFilter {
    pub user_id: Option<i64>,
    pub event: Option<String>,
    pub status: Option<String>,
    pub channel: Option<String>,
}

pub async fn logs(backend: &dyn QueueBackend, f: LogFilter, page: Page) -> Result<Paged<LogEntry>, BackendError> {
    let cond = "(CAST($1 AS BIGINT) IS NULL OR user_id = $1) AND (CAST($2 AS TEXT) IS NULL OR event = $2)
                AND (CAST($3 AS TEXT) IS NULL OR status = $3) AND (CAST($4 AS TEXT) IS NULL OR channel = $4)";
    let params: Vec<SqlValue> = vec![f.user_id.into(), f.event.into(), f.status.into(), f.channel.into()];
    let count = backend.query(&count_sql(&format!("FROM notify_logs WHERE {cond}")), params.clone()).await?;
    let (after, limit, extra) = page.sql("created_at", Some("id"), 5);
    let mut p = params;
    p.extend(extra);
    let rows = backend
        .query(
            &format!(
                "SELECT id, event, event_id, user_id, channel, recipient, status, attempts, error, provider_id, created_at, sent_at
                 FROM notify_logs WHERE {cond}{after} ORDER BY created_at DESC, id DESC{limit}"
            ),
            p,
        )
        .await?;
    let count = count.first().map_or(0, |r| r.int(0)) as u64;
    Ok(Paged::from_rows(rows.iter().map(log_entry).collect(), &page, count, |l: &LogEntry| Cursor::new(l.created_at, l.id.clone())))
}

pub(super) fn log_entry(r: &Row) -> LogEntry {
    LogEntry {
        id: r.text(0).unwrap_or_default().into(),
        event: r.text(1).unwrap_or_default().into(),
        event_id: r.text(2).unwrap_or_default().into(),
        user_id: r.opt_int(3),
        channel: r.text(4).unwrap_or_default().into(),
        recipient: r.text(5).unwrap_or_default().into(),
        status: r.text(6).unwrap_or_default().into(),
        attempts: r.int(7).max(0) as u32,
        error: r.text(8).map(str::to_string),
        provider_id: r.text(9).map(str::to_string),
        created_at: r.int(10),
        sent_at: r.opt_int(11),
    }
}
