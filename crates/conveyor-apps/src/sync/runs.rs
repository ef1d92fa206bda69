//! Runs as recorded: their rows, live counts while they run, and the reads the API and the
//! command line make.

use super::*;

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
pub struct Counts {
    pub seen: u64,
    pub changed: u64,
    pub pushed: u64,
    pub unchanged: u64,
    pub failed: u64,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct RunInfo {
    pub id: String,
    /// `running`, `completed`, `completed_with_failures`, `failed` or `cancelled`.
    pub status: String,
    /// `incremental` or `full`.
    pub scope: String,
    pub batch_id: String,
    /// Unix ms.
    pub started_at: i64,
    pub finished_at: Option<i64>,
    /// Source pages read so far.
    pub pages: u64,
    pub error: Option<String>,
    pub counts: Counts,
}

pub(super) async fn running(backend: &dyn QueueBackend) -> conveyor_core::backend::Result<Option<RunInfo>> {
    let rows = backend.query(&format!("SELECT {RUN_COLS} FROM sync_runs WHERE status = 'running'"), vec![]).await?;
    Ok(rows.first().map(run_info))
}

/// Whether a batch still has a job that can run.
pub(super) async fn alive(backend: &dyn QueueBackend, batch_id: &str) -> conveyor_core::backend::Result<bool> {
    for state in [JobState::Pending, JobState::Reserved, JobState::Delayed] {
        let filter = conveyor_core::backend::JobFilter { batch_id: Some(batch_id.into()), state: Some(state), ..Default::default() };
        if backend.jobs(filter, Page::new(1, 1)).await?.total > 0 {
            return Ok(true);
        }
    }
    // Between the run's creation and its first page the listener job holds it (it is not in
    // the batch); a run younger than a minute counts as alive.
    let rows = backend.query("SELECT started_at FROM sync_runs WHERE batch_id = $1", vec![batch_id.into()]).await?;
    Ok(rows.first().is_some_and(|r| now_ms() - r.int(0) < 60_000))
}

pub(super) const RUN_COLS: &str =
    "id, status, scope, batch_id, started_at, finished_at, pages, error, seen, changed, pushed, unchanged, failed";

pub(super) fn run_info(r: &conveyor_core::backend::Row) -> RunInfo {
    let n = |i: usize| r.int(i).max(0) as u64;
    RunInfo {
        id: r.text(0).unwrap_or_default().into(),
        status: r.text(1).unwrap_or_default().into(),
        scope: r.text(2).unwrap_or_default().into(),
        batch_id: r.text(3).unwrap_or_default().into(),
        started_at: r.int(4),
        finished_at: r.opt_int(5),
        pages: n(6),
        error: r.text(7).map(str::to_string),
        counts: Counts { seen: n(8), changed: n(9), pushed: n(10), unchanged: n(11), failed: n(12) },
    }
}

/// Counts of a run so far, from its items.
pub(super) fn live_counts(rows: &[conveyor_core::backend::Row]) -> Counts {
    let mut c = Counts::default();
    for r in rows {
        let (outcome, n, changed) = (r.text(0).unwrap_or_default(), r.int(1).max(0) as u64, r.int(2).max(0) as u64);
        c.seen += n;
        c.changed += changed;
        match outcome {
            "pushed" => c.pushed += n,
            "unchanged" => c.unchanged += n,
            "failed" => c.failed += n,
            _ => {}
        }
    }
    c
}

pub(super) const COUNT_SQL: &str = "SELECT outcome, count(*), sum(changed) FROM sync_items WHERE run_id = $1 GROUP BY outcome";

pub async fn run(backend: &dyn QueueBackend, id: &str) -> conveyor_core::backend::Result<Option<RunInfo>> {
    let rows = backend.query(&format!("SELECT {RUN_COLS} FROM sync_runs WHERE id = $1"), vec![id.into()]).await?;
    let Some(mut info) = rows.first().map(run_info) else { return Ok(None) };
    if info.status == "running" {
        info.counts = live_counts(&backend.query(COUNT_SQL, vec![id.into()]).await?);
    }
    Ok(Some(info))
}

/// Runs, newest first.
pub async fn runs(backend: &dyn QueueBackend, page: Page) -> conveyor_core::backend::Result<Paged<RunInfo>> {
    let count = backend.query(&count_sql("FROM sync_runs"), vec![]).await?.first().map_or(0, |r| r.int(0)) as u64;
    let (after, limit, params) = page.sql("started_at", Some("id"), 1);
    let rows = backend
        .query(&format!("SELECT {RUN_COLS} FROM sync_runs WHERE 1 = 1{after} ORDER BY started_at DESC, id DESC{limit}"), params)
        .await?;
    let mut list = Paged::from_rows(rows.iter().map(run_info).collect(), &page, count, |r: &RunInfo| {
        conveyor_core::backend::Cursor::new(r.started_at, r.id.clone())
    });
    for r in list.items.iter_mut().filter(|r| r.status == "running") {
        r.counts = live_counts(&backend.query(COUNT_SQL, vec![r.id.clone().into()]).await?);
    }
    Ok(list)
}

/// Whether every run's batch has finished (nothing of any run is still queued or running).
pub async fn settled(backend: &dyn QueueBackend) -> conveyor_core::backend::Result<bool> {
    let rows = backend
        .query(
            "SELECT count(*) FROM sync_runs r JOIN batches b ON b.id = r.batch_id
             WHERE b.finished_at IS NULL AND (r.status = 'running' OR b.pending > 0)",
            vec![],
        )
        .await?;
    Ok(rows.first().map_or(0, |r| r.int(0)) == 0)
}
