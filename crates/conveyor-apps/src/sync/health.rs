//! Replaying recorded failures, and the sync's health (last run, failures, breakers, latency).

use super::*;

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Replayed {
    /// Failures sent again as push jobs.
    pub replayed: u64,
    /// Bad records that still do not validate (kept, their retries counted).
    pub still_invalid: u64,
    /// The batch of the replayed jobs (none when nothing was replayed).
    pub batch_id: Option<String>,
}

/// Replays stored failures: failed pushes and bad records that now validate go out again as
/// push jobs in one batch; a success resolves them. (A failed page is not replayed: the next
/// run resumes from the cursor, and completing resolves it.)
pub async fn retry_failures(conveyor: &Conveyor, config: &SyncConfig) -> Result<Replayed, SyncError> {
    if let Some(missing) = config.missing() {
        return Err(SyncError::NotConfigured(missing));
    }
    let fields = config.source.as_ref().map(|s| s.fields.clone()).unwrap_or_default();
    let max = config.max_attempts;
    let out = conveyor
        .backend()
        .transact(move |tx| {
            let rows = tx.query(
                "SELECT id, run_id, stage, payload FROM sync_failures WHERE resolved_at IS NULL AND stage IN ('push', 'record') ORDER BY created_at, id",
                &[],
            )?;
            let (mut jobs, mut invalid) = (Vec::new(), Vec::new());
            for r in &rows {
                let (id, run_id, stage, payload) =
                    (r.text(0).unwrap_or_default(), r.text(1).unwrap_or_default(), r.text(2).unwrap_or_default(), r.text(3).unwrap_or_default());
                let product = match stage {
                    "push" => serde_json::from_str::<Product>(payload).ok(),
                    _ => serde_json::from_str::<Value>(payload).ok().and_then(|raw| connector::product(&fields, &raw).ok()),
                };
                match product {
                    Some(p) => jobs.push(push_job(run_id, p, max)),
                    None => invalid.push(id.to_string()),
                }
            }
            for id in &invalid {
                tx.execute("UPDATE sync_failures SET retries = retries + 1 WHERE id = $1", &[id.clone().into()])?;
            }
            let replayed = jobs.len() as u64;
            let batch_id = if jobs.is_empty() { None } else { Some(Batch::new("sync retry-failures").allow_failures().extend(jobs).dispatch_in(tx)?) };
            Ok(Replayed { replayed, still_invalid: invalid.len() as u64, batch_id })
        })
        .await?;
    Ok(out)
}

#[derive(Clone, Debug, Serialize, PartialEq, Default)]
pub struct PartnerStats {
    pub requests_24h: u64,
    /// Answers other than 2xx, and requests that got no answer.
    pub errors_24h: u64,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
    pub p99_ms: Option<i64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Health {
    pub configured: bool,
    pub last_run: Option<RunInfo>,
    /// Failures recorded in the last 24 hours, and those not resolved yet (any age).
    pub failures_24h: u64,
    pub unresolved_failures: u64,
    pub breakers: Vec<BreakerInfo>,
    /// Per partner (`source`, `target`), over the last 24 hours.
    pub partners: std::collections::BTreeMap<String, PartnerStats>,
    /// The p95 request duration per partner (ms), as `GET /health` shows it.
    pub p95_ms: std::collections::BTreeMap<String, Option<i64>>,
}

/// The nearest-rank percentile of sorted values.
pub(super) fn percentile(sorted: &[i64], p: f64) -> Option<i64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p / 100.0) * sorted.len() as f64).ceil().max(1.0) as usize;
    sorted.get(rank.min(sorted.len()) - 1).copied()
}

pub async fn health(backend: &dyn QueueBackend, config: &SyncConfig) -> conveyor_core::backend::Result<Health> {
    let since = now_ms() - 24 * 3600 * 1000;
    let last = backend.query(&format!("SELECT {RUN_COLS} FROM sync_runs ORDER BY started_at DESC, id DESC LIMIT 1"), vec![]).await?;
    let last_run = match last.first().map(run_info) {
        Some(r) if r.status == "running" => run(backend, &r.id).await?,
        other => other,
    };
    let count = |rows: Vec<conveyor_core::backend::Row>| rows.first().map_or(0, |r| r.int(0)).max(0) as u64;
    let failures_24h = count(backend.query("SELECT count(*) FROM sync_failures WHERE created_at >= $1", vec![since.into()]).await?);
    let unresolved_failures = count(backend.query("SELECT count(*) FROM sync_failures WHERE resolved_at IS NULL", vec![]).await?);
    let mut breakers: Vec<BreakerInfo> =
        breaker::list(backend, config.breaker.window).await?.into_iter().filter(|b| b.name.starts_with("sync:")).collect();
    if !breakers.iter().any(|b| b.name == TARGET_BREAKER) {
        breakers.push(BreakerInfo { name: TARGET_BREAKER.into(), state: "closed".into(), failure_rate: 0.0, calls: 0, opened_at: None });
    }
    let mut partners = std::collections::BTreeMap::new();
    let mut p95 = std::collections::BTreeMap::new();
    for partner in ["source", "target"] {
        let rows = backend
            .query("SELECT duration_ms, status FROM sync_requests WHERE partner = $1 AND at >= $2", vec![partner.into(), since.into()])
            .await?;
        let errors = rows.iter().filter(|r| r.opt_int(1).is_none_or(|s| !(200..300).contains(&s))).count() as u64;
        let mut d: Vec<i64> = rows.iter().map(|r| r.int(0)).collect();
        d.sort_unstable();
        let stats = PartnerStats {
            requests_24h: d.len() as u64,
            errors_24h: errors,
            p50_ms: percentile(&d, 50.0),
            p95_ms: percentile(&d, 95.0),
            p99_ms: percentile(&d, 99.0),
        };
        p95.insert(partner.to_string(), stats.p95_ms);
        partners.insert(partner.to_string(), stats);
    }
    Ok(Health { configured: config.is_configured(), last_run, failures_24h, unresolved_failures, breakers, partners, p95_ms: p95 })
}
