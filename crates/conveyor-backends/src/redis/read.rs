//! Reading jobs back out of Redis: raw rows, their `JobInfo` / `FailedJob` forms, filters,
//! queue names and the completed history.

use super::*;

/// A job as the admin API shows it; `delayed` tells a waiting job that is not due yet.
pub(super) fn raw_info(id: &str, raw: &Raw, delayed: bool) -> Option<JobInfo> {
    let stored = Stored::parse(raw.d.as_deref()?)?;
    let st = State::of(raw.s.as_deref(), &stored);
    let failed = raw.x.as_deref().map(failed_at);
    let state = match (&failed, st.completed, st.token.is_empty()) {
        (Some(_), _, _) => JobState::Failed,
        (None, Some(_), _) => JobState::Completed,
        (None, None, false) => JobState::Reserved,
        _ if delayed => JobState::Delayed,
        _ => JobState::Pending,
    };
    let ran = matches!(state, JobState::Reserved | JobState::Completed);
    let (finished_at, runtime_ms, wait_ms) = match (failed, st.completed) {
        (Some((at, rt)), _) => (Some(at), Some(rt), None),
        (None, Some((at, rt, wt))) => (Some(at), Some(rt), Some(wt)),
        _ => (None, None, None),
    };
    Some(JobInfo {
        id: id.parse().ok()?,
        queue: stored.queue,
        kind: stored.data.k,
        state,
        payload: payload_value(&stored.data.p),
        attempts: st.attempts,
        max_attempts: stored.max_attempts,
        priority: stored.priority,
        tags: stored.data.tg,
        unique_key: stored.unique.filter(|_| state != JobState::Completed),
        batch_id: stored.data.bt,
        error: raw.error.clone().filter(|_| state != JobState::Completed),
        created_at: stored.created_at,
        available_at: (state != JobState::Completed).then_some(st.available_at),
        reserved_at: ran.then_some(st.reserved_at),
        finished_at,
        runtime_ms,
        wait_ms,
        worker: ran.then_some(st.worker).filter(|w| !w.is_empty()),
    })
}

/// `failed at` and runtime of a failed job (`T:x`).
pub(super) fn failed_at(x: &str) -> (i64, u64) {
    let (at, rt) = x.split_once('\x1f').unwrap_or((x, "0"));
    (at.parse().unwrap_or(0), rt.parse::<f64>().map_or(0, |v| v.max(0.0) as u64))
}

pub(super) fn failed_info(id: &str, raw: &Raw) -> Option<FailedJob> {
    let (failed_at, runtime_ms) = failed_at(raw.x.as_deref()?);
    let stored = Stored::parse(raw.d.as_deref()?)?;
    let st = State::of(raw.s.as_deref(), &stored);
    Some(FailedJob {
        id: id.parse().ok()?,
        queue: stored.queue,
        kind: stored.data.k,
        payload: payload_value(&stored.data.p),
        attempts: st.attempts,
        max_attempts: stored.max_attempts,
        error: raw.error.clone().unwrap_or_default(),
        tags: stored.data.tg,
        batch_id: stored.data.bt,
        created_at: stored.created_at,
        failed_at,
        runtime_ms,
    })
}

pub(super) fn matches(j: &JobInfo, f: &JobFilter) -> bool {
    f.kind.as_ref().is_none_or(|k| &j.kind == k)
        && f.tag.as_ref().is_none_or(|t| j.tags.contains(t))
        && f.batch_id.as_ref().is_none_or(|b| j.batch_id.as_ref() == Some(b))
        && f.queue.as_ref().is_none_or(|q| &j.queue == q)
}

impl RedisBackend {
    /// The failed store's index: of one queue, or of all.
    pub(super) fn failed_key(&self, queue: Option<&str>) -> String {
        match queue {
            Some(q) => format!("{}:q:{q}:f", self.tag),
            None => format!("{}:failed", self.tag),
        }
    }

    /// The oldest `n` ids of a failed-store index.
    pub(super) async fn oldest_failed(&self, key: String, n: isize) -> Result<Vec<String>> {
        self.redis(move |c, _| redis::cmd("ZRANGE").arg(&key).arg(0).arg(n - 1).query(c)).await
    }

    pub(super) async fn queue_names(&self) -> Result<Vec<String>> {
        let mut names: Vec<String> = self
            .redis(|c, tag| {
                let mut all: Vec<String> = redis::cmd("SMEMBERS").arg(format!("{tag}:queues")).query(c)?;
                let paused: Vec<String> = redis::cmd("SMEMBERS").arg(format!("{tag}:paused")).query(c)?;
                all.extend(paused);
                Ok(all)
            })
            .await?;
        names.sort();
        names.dedup();
        Ok(names)
    }

    /// What Redis holds about each job (pipelined, 500 at a time); ids that are gone are dropped.
    pub(super) async fn raw(&self, ids: Vec<String>) -> Result<Vec<(String, Raw)>> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.redis(move |c, tag| {
            let mut out = Vec::with_capacity(ids.len());
            for chunk in ids.chunks(500) {
                let mut p = redis::pipe();
                for h in ["d", "s", "e", "x"] {
                    p.cmd("HMGET").arg(format!("{tag}:{h}")).arg(chunk);
                }
                let replies: Vec<Vec<Option<String>>> = p.query(c)?;
                for (i, id) in chunk.iter().enumerate() {
                    let at = |h: usize| replies.get(h).and_then(|r| r.get(i)).cloned().flatten();
                    if at(0).is_some() {
                        out.push((id.clone(), Raw { d: at(0), s: at(1), error: at(2), x: at(3) }));
                    }
                }
            }
            Ok(out)
        })
        .await
    }

    /// The completed history (newest first).
    pub(super) async fn history(&self) -> Result<Vec<JobInfo>> {
        let ids: Vec<String> = self.redis(|c, tag| redis::cmd("LRANGE").arg(format!("{tag}:done")).arg(0).arg(-1).query(c)).await?;
        let found = self.raw(ids).await?;
        Ok(found.iter().filter_map(|(id, raw)| raw_info(id, raw, false)).filter(|j| j.state == JobState::Completed).collect())
    }
}
