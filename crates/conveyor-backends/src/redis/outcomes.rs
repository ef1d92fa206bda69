//! Applying outcomes in Redis (one script per chunk) and recording their metrics.

use super::*;

impl RedisBackend {
    /// Adds the applied completions to the per-minute metrics; `detached`: in a task of its
    /// own, so that acknowledging the next batch need not wait for it (see `metrics_writes`).
    pub(super) async fn record_metrics(&self, applied: Vec<&Completion>, now: i64, detached: bool) {
        if applied.is_empty() {
            return;
        }
        let mut acc = MetricsAccumulator::default();
        for c in applied {
            acc.record(minute_of(now), c);
        }
        let mut args = Vec::new();
        for row in acc.drain() {
            let mut cols: Vec<(String, u64)> = vec![
                ("c".into(), row.completed),
                ("r".into(), row.retried),
                ("f".into(), row.failed),
                ("rs".into(), row.runtime_sum_ms),
                ("ws".into(), row.wait_sum_ms),
            ];
            for i in 0..BUCKETS {
                cols.push((format!("rh{i}"), row.runtime_hist[i]));
                cols.push((format!("wh{i}"), row.wait_hist[i]));
            }
            cols.retain(|(_, n)| *n > 0);
            args.push(row.minute.to_string());
            args.push(row.queue);
            args.push(row.kind);
            args.push(row.runtime_max_ms.to_string());
            args.push(cols.len().to_string());
            for (col, n) in cols {
                args.push(col);
                args.push(n.to_string());
            }
        }
        if !detached {
            if let Err(e) = self.script(|s| &s.metrics, args).await {
                tracing::warn!(error = %e, "recording job metrics in Redis failed");
            }
            return;
        }
        let writing = self.metrics_writes.clone().read_owned().await;
        let (pool, tag) = (self.pool.clone(), self.tag.clone());
        tokio::spawn(async move {
            if let Err(e) = run_script(pool, tag, |s| &s.metrics, args).await {
                tracing::warn!(error = %e, "recording job metrics in Redis failed");
            }
            drop(writing);
        });
    }

    /// The completion script; returns which completions applied.
    pub(super) async fn apply_outcomes(&self, completions: &[Completion], records: bool) -> Result<Vec<bool>> {
        let mut flags = Vec::with_capacity(completions.len());
        for chunk in completions.chunks(PER_CALL) {
            flags.extend(self.apply_chunk(chunk, records).await?);
        }
        Ok(flags)
    }

    pub(super) async fn apply_chunk(&self, completions: &[Completion], records: bool) -> Result<Vec<bool>> {
        let now = now_ms();
        let mut args = Vec::with_capacity(2 + completions.len() * 10);
        args.push(now.to_string());
        args.push(self.history.to_string());
        for c in completions {
            let (kind, at, error) = match &c.outcome {
                Outcome::Completed => ("c", 0, ""),
                Outcome::Retry { at, error } => ("r", *at, error.as_str()),
                Outcome::Failed { error } => ("f", 0, error.as_str()),
                Outcome::Release { at } => ("l", *at, ""),
            };
            args.push(c.id.to_string());
            args.push(c.lease_token.to_string());
            args.push(kind.into());
            args.push(at.to_string());
            args.push(error.into());
            let record = if records && conveyor_core::hooks::wants(c) {
                let data = Data { k: c.kind.clone(), bt: c.batch_id.clone(), wf: c.workflow.clone(), ..Default::default() };
                let data = serde_json::to_string(&data).map_err(|e| BackendError::Other(e.to_string()))?;
                Record::of(c, data).map(|r| serde_json::to_string(&r).expect("a record serializes"))
            } else {
                None
            };
            args.push(record.unwrap_or_default());
            args.push(c.runtime_ms.to_string());
            args.push(c.wait_ms.to_string());
            args.push(c.queue.clone());
            args.push(c.unique_key.clone().unwrap_or_default());
        }
        let mut res = items(self.script(|s| &s.complete, args).await?).into_iter();
        let mut flags = vec![true; completions.len()];
        for at in res.next().map(items).unwrap_or_default() {
            if let Some(f) = usize::try_from(int(&at) - 1).ok().and_then(|i| flags.get_mut(i)) {
                *f = false;
            }
        }
        let members: Vec<String> = res.next().map(items).unwrap_or_default().iter().map(text).collect();
        if completions.iter().zip(&flags).any(|(c, f)| *f && matches!(c.outcome, Outcome::Retry { .. } | Outcome::Release { .. })) {
            self.wakeup.wake();
        }
        if let Err(e) = self.apply_records(members).await {
            tracing::warn!(error = %e, "outcome hooks are left for the reaper pass");
        }
        self.record_metrics(completions.iter().zip(&flags).filter(|(_, f)| **f).map(|(c, _)| c).collect(), now, true).await;
        Ok(flags)
    }
}
