//! The administration side of the Redis queue: queue numbers, job and failed pages, metrics,
//! pruning and the worker registry (the `Store` methods in `store.rs` delegate here).

use super::*;

/// Per queue its counts, paused flag and oldest wait; the last minutes' metric hashes.
type QueueReads = (Vec<(Vec<i64>, bool, Option<i64>)>, Vec<Vec<(String, Value)>>);

/// Most leased jobs per queue the holder scripts look at (in flight, not the backlog).
const HOLDERS_PER_QUEUE: usize = 50_000;

impl RedisBackend {
    /// The processes holding reservations, from the lease sets.
    pub(super) async fn lease_holders(&self) -> Result<Vec<String>> {
        let v = self.script(|s| &s.holders, vec![HOLDERS_PER_QUEUE.to_string()]).await?;
        Ok(items(v).iter().map(text).collect())
    }

    /// Ends the leases of dead holders: the next reap returns their jobs.
    pub(super) async fn expire_holders(&self, holders: Vec<String>) -> Result<u64> {
        if holders.is_empty() {
            return Ok(0);
        }
        let mut args = vec![HOLDERS_PER_QUEUE.to_string()];
        args.extend(holders);
        Ok(int(&self.script(|s| &s.expire_holders, args).await?).max(0) as u64)
    }

    pub(super) async fn queue_stats(&self) -> Result<Vec<QueueStats>> {
        let names = self.queue_names().await?;
        let now = now_ms();
        let minute = minute_of(now);
        let stats_names = names.clone();
        let (stats, minutes): QueueReads = self
            .redis(move |c, tag| {
                let mut p = redis::pipe();
                for q in &stats_names {
                    let qk = format!("{tag}:q:{q}");
                    p.cmd("ZCARD").arg(format!("{qk}:r"));
                    p.cmd("ZCARD").arg(format!("{qk}:d"));
                    p.cmd("ZCARD").arg(format!("{qk}:l"));
                    p.cmd("ZCARD").arg(format!("{qk}:f"));
                    p.cmd("SISMEMBER").arg(format!("{tag}:paused")).arg(q);
                    p.cmd("ZRANGE").arg(format!("{qk}:r")).arg(0).arg(0);
                }
                let replies: Vec<Value> = if stats_names.is_empty() { Vec::new() } else { p.query(c)? };
                let mut heads = Vec::new();
                let mut out = Vec::new();
                for chunk in replies.chunks(6) {
                    let counts: Vec<i64> = chunk[..4].iter().map(int).collect();
                    let head = items(chunk[5].clone()).first().map(text);
                    heads.push(head);
                    out.push((counts, int(&chunk[4]) == 1, None));
                }
                // When the next job of each queue became available.
                let mut p = redis::pipe();
                for h in &heads {
                    p.cmd("HGET").arg(format!("{tag}:s")).arg(h.clone().unwrap_or_default());
                    p.cmd("HGET").arg(format!("{tag}:d")).arg(h.clone().unwrap_or_default());
                }
                let states: Vec<Option<String>> = if heads.is_empty() { Vec::new() } else { p.query(c)? };
                let avs: Vec<Option<i64>> = states
                    .chunks(2)
                    .map(|sd| {
                        let stored = Stored::parse(sd[1].as_deref()?)?;
                        Some(State::of(sd[0].as_deref(), &stored).available_at)
                    })
                    .collect();
                for ((o, h), av) in out.iter_mut().zip(&heads).zip(avs) {
                    o.2 = h.as_ref().and(av);
                }
                let mut p = redis::pipe();
                p.cmd("HGETALL").arg(format!("{tag}:m:{}", minute - 60_000));
                p.cmd("HGETALL").arg(format!("{tag}:m:{minute}"));
                let ms: Vec<Value> = p.query(c)?;
                Ok((out, ms.into_iter().map(pairs).collect()))
            })
            .await?;
        let mut counts = Vec::new();
        for (m, fields) in [minute - 60_000, minute].into_iter().zip(minutes) {
            for (f, v) in fields {
                let mut parts = f.split('\x1f');
                let (Some(q), Some(_), Some(col)) = (parts.next(), parts.next(), parts.next()) else { continue };
                if matches!(col, "c" | "r" | "f") {
                    counts.push((q.to_string(), m, int(&v)));
                }
            }
        }
        let rates = last_minute_rates(counts, now);
        Ok(names
            .into_iter()
            .zip(stats)
            .map(|(queue, (n, paused, head))| QueueStats {
                per_minute: rates.get(&queue).copied().unwrap_or(0.0).round() as u64,
                oldest_wait_s: head.map_or(0.0, |t| ((now - t).max(0) as f64) / 1000.0),
                queue,
                pending: n[0].max(0) as u64,
                delayed: n[1].max(0) as u64,
                reserved: n[2].max(0) as u64,
                failed: n[3].max(0) as u64,
                paused,
            })
            .collect())
    }

    pub(super) async fn job_page(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>> {
        let queues = match &filter.queue {
            Some(q) => vec![q.clone()],
            None => self.queue_names().await?,
        };
        let sets: Vec<(&str, JobState)> = match filter.state {
            Some(JobState::Pending) => vec![("r", JobState::Pending)],
            Some(JobState::Delayed) => vec![("d", JobState::Delayed)],
            Some(JobState::Reserved) => vec![("l", JobState::Reserved)],
            Some(JobState::Failed) => vec![("f", JobState::Failed)],
            Some(JobState::Completed) => vec![],
            None => vec![("r", JobState::Pending), ("d", JobState::Delayed), ("l", JobState::Reserved), ("f", JobState::Failed)],
        };
        let exact = filter.kind.is_none() && filter.tag.is_none() && filter.batch_id.is_none();
        let mut keys = Vec::new();
        for q in &queues {
            for (s, state) in &sets {
                keys.push((format!("{}:q:{q}:{s}", self.tag), *state));
            }
        }
        let scan_keys: Vec<String> = keys.iter().map(|(k, _)| k.clone()).collect();
        let scanned: Vec<(i64, Vec<String>)> = self
            .redis(move |c, _| {
                let mut p = redis::pipe();
                for k in &scan_keys {
                    p.cmd("ZCARD").arg(k);
                    p.cmd("ZRANGE").arg(k).arg(0).arg(SCAN_CAP - 1);
                }
                let replies: Vec<Value> = if scan_keys.is_empty() { Vec::new() } else { p.query(c)? };
                Ok(replies.chunks(2).map(|r| (int(&r[0]), items(r[1].clone()).iter().map(text).collect())).collect())
            })
            .await?;
        let mut items_out = Vec::new();
        let mut total = 0u64;
        for ((_, state), (card, ids)) in keys.iter().zip(scanned) {
            let found = self.raw(ids).await?;
            let infos: Vec<JobInfo> = found
                .iter()
                .filter_map(|(id, raw)| raw_info(id, raw, *state == JobState::Delayed))
                .filter(|j| matches(j, &filter))
                .collect();
            total += if exact { card.max(0) as u64 } else { infos.len() as u64 };
            items_out.extend(infos);
        }
        if matches!(filter.state, None | Some(JobState::Completed)) {
            let done: Vec<JobInfo> = self.history().await?.into_iter().filter(|j| matches(j, &filter)).collect();
            total += done.len() as u64;
            items_out.extend(done);
        }
        // Each set is read up to SCAN_CAP ids, so a page costs the same whatever its depth; a
        // cursor past what was read finds nothing more.
        let after = page.after_job()?;
        items_out.retain(|j| after.is_none_or(|a| j.id < a));
        items_out.sort_by_key(|j| std::cmp::Reverse(j.id));
        let items = items_out.into_iter().skip(page.offset() as usize).take(page.limit() as usize).collect();
        Ok(Paged::from_rows(items, &page, total, |j: &JobInfo| Cursor::new(0, j.id.to_string())))
    }

    pub(super) async fn failed_page(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
        let key = self.failed_key(queue);
        let after = page.after_job()?.map(|id| id.to_string());
        let at = page.after.as_ref().map_or(0, |c| c.at);
        let (offset, limit) = (page.offset() as isize, page.limit() as isize);
        let (total, ids): (i64, Vec<String>) = self
            .redis(move |c, _| {
                let total: i64 = redis::cmd("ZCARD").arg(&key).query(c)?;
                // After a cursor: from the rank of its job (the set is ordered by failure time,
                // ties by id, as the relational stores order it), found in O(log n).
                let start = match &after {
                    None => offset,
                    Some(id) => match redis::cmd("ZREVRANK").arg(&key).arg(id).query::<Option<i64>>(c)? {
                        Some(rank) => rank as isize + 1,
                        // The job left the store (retried or forgotten) since: resume from its time
                        // (jobs that failed in the same millisecond are passed over).
                        None => {
                            let ids: Vec<String> = redis::cmd("ZREVRANGEBYSCORE")
                                .arg(&key)
                                .arg(format!("({at}"))
                                .arg("-inf")
                                .arg("LIMIT")
                                .arg(0)
                                .arg(limit)
                                .query(c)?;
                            return Ok((total, ids));
                        }
                    },
                };
                let ids: Vec<String> = redis::cmd("ZREVRANGE").arg(&key).arg(start).arg(start + limit - 1).query(c)?;
                Ok((total, ids))
            })
            .await?;
        let items = self.raw(ids).await?.iter().filter_map(|(id, raw)| failed_info(id, raw)).collect();
        Ok(Paged::from_rows(items, &page, total.max(0) as u64, |f: &FailedJob| Cursor::new(f.failed_at, f.id.to_string())))
    }

    pub(super) async fn metric_rows(&self, query: MetricsQuery) -> Result<Vec<MetricsRow>> {
        drop(self.metrics_writes.write().await);
        // The minute that holds `since` counts, as on the relational stores: its rows are keyed
        // by the minute's start, which is before `since`.
        let since = conveyor_core::metrics::minute_of(query.since);
        let minutes: Vec<(i64, Vec<(String, Value)>)> = self
            .redis(move |c, tag| {
                let ms: Vec<i64> = redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:mi")).arg(since).arg("+inf").query(c)?;
                let mut p = redis::pipe();
                for m in &ms {
                    p.cmd("HGETALL").arg(format!("{tag}:m:{m}"));
                }
                let replies: Vec<Value> = if ms.is_empty() { Vec::new() } else { p.query(c)? };
                Ok(ms.into_iter().zip(replies.into_iter().map(pairs)).collect())
            })
            .await?;
        let mut out = Vec::new();
        for (minute, fields) in minutes {
            let mut rows: HashMap<(String, String), MetricsRow> = HashMap::new();
            for (f, v) in fields {
                let mut parts = f.splitn(3, '\x1f');
                let (Some(q), Some(kind), Some(col)) = (parts.next(), parts.next(), parts.next()) else { continue };
                if query.queue.as_deref().is_some_and(|x| x != q) || query.kind.as_deref().is_some_and(|x| x != kind) {
                    continue;
                }
                let row = rows.entry((q.to_string(), kind.to_string())).or_insert_with(|| MetricsRow {
                    minute,
                    queue: q.to_string(),
                    kind: kind.to_string(),
                    ..Default::default()
                });
                let n = int(&v).max(0) as u64;
                match col {
                    "c" => row.completed = n,
                    "r" => row.retried = n,
                    "f" => row.failed = n,
                    "rs" => row.runtime_sum_ms = n,
                    "rm" => row.runtime_max_ms = n,
                    "ws" => row.wait_sum_ms = n,
                    other => {
                        if let Some(i) = other.strip_prefix("rh").and_then(|i| i.parse::<usize>().ok()).filter(|i| *i < BUCKETS) {
                            row.runtime_hist[i] = n;
                        } else if let Some(i) = other.strip_prefix("wh").and_then(|i| i.parse::<usize>().ok()).filter(|i| *i < BUCKETS) {
                            row.wait_hist[i] = n;
                        }
                    }
                }
            }
            let mut rows: Vec<MetricsRow> = rows.into_values().collect();
            rows.sort_by(|a, b| (&a.queue, &a.kind).cmp(&(&b.queue, &b.kind)));
            out.extend(rows);
        }
        Ok(out)
    }

    pub(super) async fn prune_all(&self, metrics_before: i64) -> Result<()> {
        let now = now_ms();
        self.redis(move |c, tag| {
            let old: Vec<i64> =
                redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:mi")).arg("-inf").arg(format!("({metrics_before}")).query(c)?;
            if !old.is_empty() {
                let keys: Vec<String> = old.iter().map(|m| format!("{tag}:m:{m}")).collect();
                redis::cmd("DEL").arg(&keys).query::<i64>(c)?;
                redis::cmd("ZREM").arg(format!("{tag}:mi")).arg(&old).query::<i64>(c)?;
            }
            let gone: Vec<String> = redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:ws")).arg("-inf").arg(now - 86_400_000).query(c)?;
            if !gone.is_empty() {
                redis::cmd("HDEL").arg(format!("{tag}:w")).arg(&gone).query::<i64>(c)?;
                redis::cmd("ZREM").arg(format!("{tag}:ws")).arg(&gone).query::<i64>(c)?;
            }
            Ok(())
        })
        .await?;
        self.ensure_tables().await?;
        self.store
            .transaction(Box::new(move |tx| {
                tx.execute("DELETE FROM queue_marks WHERE at < $1", &[SqlValue::Int(now - MARKS_KEEP_MS)])
                    .map(|n| Box::new(n) as Box<dyn Any + Send>)
            }))
            .await?;
        self.store.prune(metrics_before).await
    }

    pub(super) async fn heartbeat(&self, info: WorkerInfo) -> Result<()> {
        let json = serde_json::to_string(&info).map_err(|e| BackendError::Other(e.to_string()))?;
        self.redis(move |c, tag| {
            redis::pipe()
                .cmd("HSET")
                .arg(format!("{tag}:w"))
                .arg(&info.id)
                .arg(&json)
                .ignore()
                .cmd("ZADD")
                .arg(format!("{tag}:ws"))
                .arg(info.last_seen)
                .arg(&info.id)
                .ignore()
                .query::<()>(c)
        })
        .await
    }

    pub(super) async fn worker_list(&self, within: Duration) -> Result<Vec<WorkerInfo>> {
        let since = now_ms() - within.as_millis() as i64;
        let infos: Vec<Option<String>> = self
            .redis(move |c, tag| {
                let ids: Vec<String> = redis::cmd("ZRANGEBYSCORE").arg(format!("{tag}:ws")).arg(since).arg("+inf").query(c)?;
                if ids.is_empty() {
                    return Ok(Vec::new());
                }
                redis::cmd("HMGET").arg(format!("{tag}:w")).arg(&ids).query(c)
            })
            .await?;
        let mut out: Vec<WorkerInfo> = infos.into_iter().flatten().filter_map(|j| serde_json::from_str(&j).ok()).collect();
        out.sort_by(|a, b| a.id.cmp(&b.id));
        Ok(out)
    }

    /// `act_on_delayed`: each delayed job is leased by id (one script per chunk), then given
    /// the action's outcome through the completion script, so the failed store, the history,
    /// unique keys and the store's hooks (a batch counts a killed or deleted job as failed, a
    /// workflow compensates) behave as for any outcome. Run now is a release (its attempt given
    /// back); fail keeps the attempts the job had; delete fails it, then forgets it.
    pub(super) async fn delayed_by_id(&self, ids: Vec<JobId>, action: DelayedAction) -> Result<Vec<JobId>> {
        let mut done = Vec::new();
        for chunk in ids.chunks(PER_CALL) {
            let now = now_ms();
            let token: i64 = rand::random::<i64>() & i64::MAX;
            let bump = if matches!(action, DelayedAction::RunNow) { "1" } else { "" };
            let mut args = vec![now.to_string(), (now + 60_000).to_string(), token.to_string(), "mutate".to_string(), bump.to_string()];
            args.extend(chunk.iter().map(JobId::to_string));
            let jobs = leased_jobs(items(self.script(|s| &s.lease_delayed, args).await?), now, token);
            let outcome = match &action {
                DelayedAction::RunNow => Outcome::Release { at: now },
                DelayedAction::Fail(error) => Outcome::Failed { error: error.clone() },
                DelayedAction::Delete => Outcome::Failed { error: "deleted".into() },
            };
            let completions: Vec<Completion> =
                jobs.iter().map(|j| Completion { wait_ms: 0, ..Completion::of(j, outcome.clone()) }).collect();
            let applied = self.apply_outcomes(&completions, true).await?;
            for (c, ok) in completions.iter().zip(applied) {
                if !ok {
                    continue;
                }
                if action == DelayedAction::Delete {
                    self.forget_failed(c.id).await?;
                }
                done.push(c.id);
            }
        }
        Ok(done)
    }
}
