//! Pushing jobs into Redis: plain jobs in one MULTI per chunk; unique, relayed and keyed
//! (fair-queueing) ones through the enqueue script.

use super::*;

impl RedisBackend {
    /// Enqueues jobs that need no check (no unique key, not from the outbox) in one MULTI: a
    /// variadic HSET of their data, a ZADD per queue and set, the queue names and a wake-up.
    /// A job available from its creation on gets no state field (see `State::of`); one with
    /// a `run_at` gets its own available time.
    /// Returns whether any job is ready now.
    pub(super) async fn push_plain(&self, chunk: &[NewJob], now: i64) -> Result<bool> {
        let mut data = Vec::with_capacity(chunk.len() * 2);
        let mut states = Vec::new();
        let mut sets: Vec<(String, Vec<(i64, String)>)> = Vec::new();
        let mut queues: Vec<String> = Vec::new();
        let mut ready_any = false;
        for job in chunk {
            job.validate().map_err(BackendError::Invalid)?;
            let id = job.id.to_string();
            let av = job.run_at.unwrap_or(now);
            let ready = av <= now;
            ready_any |= ready;
            let set = format!("{}:q:{}:{}", self.tag, job.queue, if ready { "r" } else { "d" });
            let member = (if ready { -(job.priority as i64) } else { av }, id.clone());
            match sets.iter_mut().find(|(k, _)| *k == set) {
                Some((_, m)) => m.push(member),
                None => sets.push((set, vec![member])),
            }
            if !queues.contains(&job.queue) {
                queues.push(job.queue.clone());
            }
            if av != now {
                states.push(id.clone());
                states.push(format!("0\x1f{av}\x1f\x1f\x1f"));
            }
            data.push(id);
            data.push(Stored::pack(job, now)?);
        }
        self.redis(move |c, tag| {
            let mut p = redis::pipe();
            p.atomic();
            p.cmd("HSET").arg(format!("{tag}:d")).arg(&data).ignore();
            if !states.is_empty() {
                p.cmd("HSET").arg(format!("{tag}:s")).arg(&states).ignore();
            }
            for (set, members) in &sets {
                p.cmd("ZADD").arg(set).arg(members).ignore();
            }
            p.cmd("SADD").arg(format!("{tag}:queues")).arg(&queues).ignore();
            if ready_any {
                p.cmd("PUBLISH").arg(format!("{tag}:wake")).arg("1").ignore();
            }
            p.query::<()>(c)
        })
        .await?;
        Ok(ready_any)
    }

    /// The enqueue script over `jobs`.
    pub(super) async fn push(&self, jobs: Vec<NewJob>, relayed: bool) -> Result<Vec<EnqueueOutcome>> {
        let now = now_ms();
        let mut out = Vec::with_capacity(jobs.len());
        let mut ready_any = false;
        for chunk in jobs.chunks(PER_CALL) {
            if !relayed && chunk.iter().all(|j| j.unique.is_none() && j.fairness_key().is_none()) {
                ready_any |= self.push_plain(chunk, now).await?;
                out.extend(chunk.iter().map(|j| EnqueueOutcome::Enqueued { id: j.id }));
                continue;
            }
            let mut args = Vec::with_capacity(1 + chunk.len() * 11);
            args.push(now.to_string());
            for job in chunk {
                job.validate().map_err(BackendError::Invalid)?;
                let av = job.run_at.unwrap_or(now);
                args.push(job.id.to_string());
                args.push(job.queue.clone());
                args.push((-(job.priority as i64)).to_string());
                args.push(Stored::pack(job, now)?);
                args.push(if av == now { String::new() } else { format!("0\x1f{av}\x1f\x1f\x1f") });
                args.push(if av <= now { "1" } else { "" }.into());
                args.push(av.to_string());
                match &job.unique {
                    Some(u) => {
                        args.push(u.key.clone());
                        args.push(u.ttl.as_millis().max(1).to_string());
                    }
                    None => {
                        args.push(String::new());
                        args.push("0".into());
                    }
                }
                args.push(if relayed { "1" } else { "" }.into());
                args.push(job.fairness_key().unwrap_or_default().to_string());
            }
            let res = items(self.script(|s| &s.enqueue, args).await?);
            for (job, r) in chunk.iter().zip(res) {
                let holder = text(&r);
                if holder.is_empty() {
                    ready_any |= job.run_at.is_none_or(|t| t <= now);
                    out.push(EnqueueOutcome::Enqueued { id: job.id });
                } else {
                    out.push(EnqueueOutcome::Duplicate { existing: holder.parse().unwrap_or(job.id) });
                }
            }
        }
        if ready_any {
            self.wakeup.wake();
        }
        Ok(out)
    }
}
