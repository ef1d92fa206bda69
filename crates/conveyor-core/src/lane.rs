//! Local and remote jobs in one queue.
//!
//! A job is **local** when its kind is known to this build (a built-in, Rust or HTTP kind) and
//! **remote** otherwise: workers in other languages fetch it over the Faktory protocol. Both
//! kinds share a queue's name, but a local worker must never reserve a remote job (it could
//! not run it) and `FETCH` must never hand out a local one. So each queue has two *lanes* in the
//! backend: the queue itself (local jobs) and a twin named `<queue>@remote` (remote jobs); `@`
//! cannot appear in a queue name a user gives, so the twin never collides with a real queue.
//! Every backend keeps lanes apart without knowing about them.
//!
//! [`Lanes`] wraps the backend the application sees and folds the twin back into its queue:
//! `queues()` shows one line per queue, lists by queue show both lanes, job and failed rows name
//! the queue without the suffix, and pausing, resuming or clearing a queue acts on both lanes.
//! Reservations are not folded: the worker names the local lane, the Faktory server the remote
//! one.
//!
//! Being where every connected backend is entered, [`Lanes`] also counts what this process did
//! for [`crate::telemetry`]: enqueues and events once their transaction committed, outcomes of
//! attempts once recorded; and it puts the jobs enqueued into the current trace
//! ([`crate::trace`]), with a producer span each when spans are exported.

use std::any::Any;
use std::cmp::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;

use crate::backend::{
    Cursor, DispatchHook, FailedJob, JobFilter, ManyTxFn, MetricsQuery, Page, Paged, Queue, QueueBackend, QueueStats, ReserveRequest,
    Result, Row, SqlValue, Store, TxFn, WorkerInfo, MAX_DEPTH,
};
use crate::job::{Completion, EnqueueOutcome, Job, JobId, JobInfo, NewJob};
use crate::metrics::MetricsRow;
use crate::wakeup::Wakeup;
use crate::{telemetry, trace};

/// What follows a queue's name in the backend for its remote lane.
pub const REMOTE_SUFFIX: &str = "@remote";

/// The backend name of `queue`'s remote lane.
pub fn remote(queue: &str) -> String {
    format!("{queue}{REMOTE_SUFFIX}")
}

/// The queue a backend queue name belongs to, and whether it is the remote lane.
pub fn split(backend_queue: &str) -> (&str, bool) {
    match backend_queue.strip_suffix(REMOTE_SUFFIX) {
        Some(base) => (base, true),
        None => (backend_queue, false),
    }
}

/// The queue a backend queue name belongs to.
pub fn base(backend_queue: &str) -> &str {
    split(backend_queue).0
}

/// The application's view of a backend: lanes folded into their queues (see the module docs).
pub struct Lanes {
    inner: Arc<dyn QueueBackend>,
}

impl Lanes {
    pub fn wrap(inner: Arc<dyn QueueBackend>) -> Arc<dyn QueueBackend> {
        Arc::new(Lanes { inner })
    }
}

fn strip_info(mut j: JobInfo) -> JobInfo {
    if let (base, true) = split(&j.queue) {
        j.queue = base.to_string();
    }
    j
}

fn strip_failed(mut f: FailedJob) -> FailedJob {
    if let (base, true) = split(&f.queue) {
        f.queue = base.to_string();
    }
    f
}

/// Folds the remote lanes' numbers into their queues.
pub fn fold_stats(stats: Vec<QueueStats>) -> Vec<QueueStats> {
    let mut out: Vec<QueueStats> = Vec::with_capacity(stats.len());
    for s in stats {
        let (base, remote) = split(&s.queue);
        let base = base.to_string();
        match out.iter_mut().find(|o| o.queue == base) {
            Some(o) => {
                o.pending += s.pending;
                o.delayed += s.delayed;
                o.reserved += s.reserved;
                o.failed += s.failed;
                o.per_minute += s.per_minute;
                o.oldest_wait_s = o.oldest_wait_s.max(s.oldest_wait_s);
                // A queue is paused when its lanes are (they are paused together); the local
                // lane says so when it has a row.
                if !remote {
                    o.paused = s.paused;
                }
            }
            None => out.push(QueueStats { queue: base, ..s }),
        }
    }
    out.sort_by(|a, b| a.queue.cmp(&b.queue));
    out
}

/// The page to ask each lane for, so that merging both answers gives `page`: after a cursor
/// the same page, by number every row up to its end (at most [`MAX_DEPTH`] rows).
fn lane_page(page: &Page) -> Page {
    match &page.after {
        Some(_) => page.clone(),
        None => Page::new(1, ((page.offset() + page.per_page as u64) as u32).min(MAX_DEPTH as u32).max(1)),
    }
}

/// Merges two pages of one list (each in list order, `cmp` giving it, each read with
/// [`lane_page`]) into `page`.
fn merge<T>(a: Paged<T>, b: Paged<T>, page: &Page, cmp: impl Fn(&T, &T) -> Ordering, key: impl Fn(&T) -> Cursor) -> Paged<T> {
    // A capped lane counted MAX_DEPTH + 1 rows or more: keep the sum past the cap.
    let count = a.total + b.total + u64::from(a.total_capped || b.total_capped);
    // A lane's page holds at most `per_page` rows (its extra row is dropped, `next` says there
    // was one): rows beyond both answers exist when either lane had more.
    let lanes_have_more = a.next.is_some() || b.next.is_some();
    let mut rows = Vec::with_capacity(a.items.len() + b.items.len());
    let (mut a, mut b) = (a.items.into_iter().peekable(), b.items.into_iter().peekable());
    loop {
        let take_a = match (a.peek(), b.peek()) {
            (Some(x), Some(y)) => cmp(x, y) != Ordering::Greater,
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        rows.extend(if take_a { a.next() } else { b.next() });
    }
    let rows: Vec<T> = rows.into_iter().skip(page.offset() as usize).collect();
    let mut paged = Paged::from_rows(rows, page, count, &key);
    // Every row of either lane that sorts before this page's last row is in its answer (each
    // lane gave its first rows up to the page's end), so the next page starts after it.
    if paged.next.is_none() && lanes_have_more {
        paged.next = paged.items.last().map(&key);
    }
    paged
}

#[async_trait]
impl Queue for Lanes {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    async fn enqueue(&self, mut jobs: Vec<NewJob>) -> Result<Vec<EnqueueOutcome>> {
        let labels = telemetry::EnqueueLabels::of(&jobs);
        let spans = trace::producer(&mut jobs);
        let out = self.inner.enqueue(jobs).await?;
        labels.enqueued(&out);
        spans.done(&out);
        Ok(out)
    }

    async fn reserve(&self, req: ReserveRequest) -> Result<Vec<Job>> {
        self.inner.reserve(req).await
    }

    async fn enqueue_and_reserve(&self, mut jobs: Vec<NewJob>, reserve: ReserveRequest) -> Result<(Vec<EnqueueOutcome>, Vec<Job>)> {
        let labels = telemetry::EnqueueLabels::of(&jobs);
        let spans = trace::producer(&mut jobs);
        let out = self.inner.enqueue_and_reserve(jobs, reserve).await?;
        labels.enqueued(&out.0);
        spans.done(&out.0);
        Ok(out)
    }

    async fn complete(&self, completions: Vec<Completion>) -> Result<()> {
        // Counted once recorded: an acknowledgement that fails is retried or the lease returns
        // the job, and neither is an outcome yet.
        let counts = telemetry::Outcomes::of(&completions);
        self.inner.complete(completions).await?;
        counts.record();
        Ok(())
    }

    async fn complete_with(&self, completion: Completion, work: TxFn) -> Result<Box<dyn Any + Send>> {
        let counts = telemetry::Outcomes::of(std::slice::from_ref(&completion));
        let (work, pending) = telemetry::counting(work);
        let out = self.inner.complete_with(completion, work).await?;
        counts.record();
        telemetry::committed(&pending);
        Ok(out)
    }

    async fn complete_many_with(&self, completions: Vec<Completion>, work: ManyTxFn) -> Result<(Box<dyn Any + Send>, Vec<bool>)> {
        let (work, pending) = telemetry::counting_many(work);
        let (out, held) = self.inner.complete_many_with(completions.clone(), work).await?;
        let applied: Vec<Completion> = completions.into_iter().zip(&held).filter(|(_, h)| **h).map(|(c, _)| c).collect();
        telemetry::Outcomes::of(&applied).record();
        telemetry::committed(&pending);
        Ok((out, held))
    }

    async fn extend_leases(&self, leases: Vec<(JobId, i64)>, lease: Duration) -> Result<()> {
        self.inner.extend_leases(leases, lease).await
    }

    async fn reap_expired(&self) -> Result<u64> {
        self.inner.reap_expired().await
    }

    fn wakeup(&self) -> Arc<Wakeup> {
        self.inner.wakeup()
    }

    async fn pause(&self, queue: &str) -> Result<()> {
        let base = base(queue);
        self.inner.pause(base).await?;
        self.inner.pause(&remote(base)).await
    }

    async fn resume(&self, queue: &str) -> Result<()> {
        let base = base(queue);
        self.inner.resume(base).await?;
        self.inner.resume(&remote(base)).await
    }

    /// A queue name clears both lanes; a lane's own name (`q@remote`) only that lane.
    async fn clear(&self, queue: &str) -> Result<u64> {
        if split(queue).1 {
            return self.inner.clear(queue).await;
        }
        Ok(self.inner.clear(queue).await? + self.inner.clear(&remote(queue)).await?)
    }

    async fn retry_failed(&self, ids: Vec<JobId>) -> Result<Vec<JobId>> {
        self.inner.retry_failed(ids).await
    }

    async fn retry_all_failed(&self, queue: Option<&str>) -> Result<u64> {
        match queue.filter(|q| !split(q).1) {
            Some(q) => Ok(self.inner.retry_all_failed(Some(q)).await? + self.inner.retry_all_failed(Some(&remote(q))).await?),
            None => self.inner.retry_all_failed(queue).await,
        }
    }

    async fn act_on_delayed(&self, ids: Vec<JobId>, action: crate::backend::DelayedAction) -> Result<Vec<JobId>> {
        self.inner.act_on_delayed(ids, action).await
    }

    fn broker(&self) -> Option<&'static str> {
        self.inner.broker()
    }

    async fn ping_broker(&self) -> Result<()> {
        self.inner.ping_broker().await
    }

    async fn transaction(&self, work: TxFn) -> Result<Box<dyn Any + Send>> {
        let (work, pending) = telemetry::counting(work);
        let out = self.inner.transaction(work).await?;
        telemetry::committed(&pending);
        Ok(out)
    }
}

#[async_trait]
impl Store for Lanes {
    async fn holders(&self) -> Result<Vec<String>> {
        self.inner.holders().await
    }

    async fn expire_leases_of(&self, holders: Vec<String>) -> Result<u64> {
        self.inner.expire_leases_of(holders).await
    }

    async fn queues(&self) -> Result<Vec<QueueStats>> {
        Ok(fold_stats(self.inner.queues().await?))
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>> {
        Ok(self.inner.job(id).await?.map(strip_info))
    }

    async fn jobs(&self, filter: JobFilter, page: Page) -> Result<Paged<JobInfo>> {
        let Some(queue) = filter.queue.clone().filter(|q| !split(q).1) else {
            let mut p = self.inner.jobs(filter, page).await?;
            p.items = p.items.into_iter().map(strip_info).collect();
            return Ok(p);
        };
        let lp = lane_page(&page);
        let a = self.inner.jobs(filter.clone(), lp.clone()).await?;
        let b = self.inner.jobs(JobFilter { queue: Some(remote(&queue)), ..filter }, lp).await?;
        let mut p = merge(a, b, &page, |x: &JobInfo, y: &JobInfo| y.id.cmp(&x.id), |j: &JobInfo| Cursor::new(0, j.id.to_string()));
        p.items = p.items.into_iter().map(strip_info).collect();
        Ok(p)
    }

    async fn failed(&self, queue: Option<&str>, page: Page) -> Result<Paged<FailedJob>> {
        let Some(queue) = queue.filter(|q| !split(q).1) else {
            let mut p = self.inner.failed(queue, page).await?;
            p.items = p.items.into_iter().map(strip_failed).collect();
            return Ok(p);
        };
        let lp = lane_page(&page);
        let a = self.inner.failed(Some(queue), lp.clone()).await?;
        let b = self.inner.failed(Some(&remote(queue)), lp).await?;
        let order = |x: &FailedJob, y: &FailedJob| (y.failed_at, y.id).cmp(&(x.failed_at, x.id));
        let mut p = merge(a, b, &page, order, |f: &FailedJob| Cursor::new(f.failed_at, f.id.to_string()));
        p.items = p.items.into_iter().map(strip_failed).collect();
        Ok(p)
    }

    async fn failed_job(&self, id: JobId) -> Result<Option<FailedJob>> {
        Ok(self.inner.failed_job(id).await?.map(strip_failed))
    }

    async fn failed_since(&self, since: i64) -> Result<u64> {
        self.inner.failed_since(since).await
    }

    async fn release_unique(&self, key: &str, holder: JobId) -> Result<()> {
        self.inner.release_unique(key, holder).await
    }

    async fn forget_failed(&self, id: JobId) -> Result<bool> {
        self.inner.forget_failed(id).await
    }

    async fn flush_failed(&self, queue: Option<&str>) -> Result<u64> {
        match queue.filter(|q| !split(q).1) {
            Some(q) => Ok(self.inner.flush_failed(Some(q)).await? + self.inner.flush_failed(Some(&remote(q))).await?),
            None => self.inner.flush_failed(queue).await,
        }
    }

    async fn metrics(&self, query: MetricsQuery) -> Result<Vec<MetricsRow>> {
        let mut rows = match query.queue.clone().filter(|q| !split(q).1) {
            Some(q) => {
                let mut rows = self.inner.metrics(query.clone()).await?;
                rows.extend(self.inner.metrics(MetricsQuery { queue: Some(remote(&q)), ..query }).await?);
                rows.sort_by_key(|r| r.minute);
                rows
            }
            None => self.inner.metrics(query).await?,
        };
        for r in &mut rows {
            if let (base, true) = split(&r.queue) {
                r.queue = base.to_string();
            }
        }
        Ok(rows)
    }

    async fn prune(&self, metrics_before: i64) -> Result<()> {
        self.inner.prune(metrics_before).await
    }

    async fn worker_heartbeat(&self, info: WorkerInfo) -> Result<()> {
        self.inner.worker_heartbeat(info).await
    }

    async fn worker_gone(&self, id: &str) -> Result<()> {
        self.inner.worker_gone(id).await
    }

    async fn workers(&self, within: Duration) -> Result<Vec<WorkerInfo>> {
        self.inner.workers(within).await
    }

    async fn ping(&self) -> Result<()> {
        self.inner.ping().await
    }

    fn warnings(&self) -> Vec<String> {
        self.inner.warnings()
    }

    fn shared_state(&self) -> Option<Arc<dyn crate::state::SharedState>> {
        self.inner.shared_state()
    }

    async fn lock_acquire(&self, key: &str, owner: &str, ttl: Duration) -> Result<bool> {
        self.inner.lock_acquire(key, owner, ttl).await
    }

    async fn lock_release(&self, key: &str, owner: &str) -> Result<bool> {
        self.inner.lock_release(key, owner).await
    }

    fn set_dispatch(&self, hook: DispatchHook) -> bool {
        self.inner.set_dispatch(hook)
    }

    async fn claim(&self, ids: Vec<JobId>, lease: Duration, worker: &str) -> Result<Vec<Job>> {
        self.inner.claim(ids, lease, worker).await
    }

    async fn promote_due(&self) -> Result<u64> {
        self.inner.promote_due().await
    }

    async fn query(&self, sql: &str, params: Vec<SqlValue>) -> Result<Vec<Row>> {
        self.inner.query(sql, params).await
    }
}
#[cfg(test)]
mod tests {
    use super::*;

    /// A lane's answer as a backend gives it: up to `per_page` rows after the cursor (ids
    /// descending), `next` when more follow.
    fn lane(ids: &[u64], page: &Page) -> Paged<u64> {
        let after = page.after.as_ref().map(|c| c.id.parse::<u64>().unwrap());
        let rows: Vec<u64> =
            ids.iter().copied().filter(|i| after.is_none_or(|a| *i < a)).skip(page.offset() as usize).take(page.limit() as usize).collect();
        Paged::from_rows(rows, page, ids.len() as u64, |i| Cursor::new(0, i.to_string()))
    }

    #[test]
    fn merged_lanes_page_through_every_row_once_by_cursor_and_by_number() {
        let a: Vec<u64> = (0..250).rev().filter(|i| i % 3 != 0).collect();
        let b: Vec<u64> = (0..250).rev().filter(|i| i % 3 == 0).collect();
        let key = |i: &u64| Cursor::new(0, i.to_string());
        let cmp = |x: &u64, y: &u64| y.cmp(x);
        // By cursor.
        let (mut seen, mut page) = (Vec::new(), Page::new(1, 40));
        loop {
            let lp = lane_page(&page);
            let p = merge(lane(&a, &lp), lane(&b, &lp), &page, cmp, key);
            assert_eq!(p.total, 250);
            seen.extend(p.items.iter().copied());
            match p.next {
                Some(c) => page = Page::after(c, 40),
                None => break,
            }
        }
        assert_eq!(seen, (0..250).rev().collect::<Vec<_>>());
        // By number.
        let page = Page::new(3, 40);
        let lp = lane_page(&page);
        let p = merge(lane(&a, &lp), lane(&b, &lp), &page, cmp, key);
        assert_eq!(p.items, (0..250).rev().skip(80).take(40).collect::<Vec<_>>());
        assert!(p.next.is_some());
    }

    #[test]
    fn queue_numbers_fold_the_remote_lane_into_its_queue() {
        let q = |name: &str, pending, paused| QueueStats {
            queue: name.into(),
            pending,
            delayed: 1,
            reserved: 0,
            failed: 0,
            paused,
            per_minute: 2,
            oldest_wait_s: pending as f64,
        };
        let folded = fold_stats(vec![q("default@remote", 5, false), q("default", 3, true), q("low", 1, false)]);
        assert_eq!(folded.len(), 2);
        let d = &folded[0];
        assert_eq!((d.queue.as_str(), d.pending, d.delayed, d.per_minute, d.paused, d.oldest_wait_s), ("default", 8, 2, 4, true, 5.0));
        assert_eq!((split("a@remote"), split("a"), remote("a")), (("a", true), ("a", false), "a@remote".to_string()));
    }
}
