//! A "new work may be ready" signal without lost wake-ups: a sequence number bumped on every
//! enqueue, and a [`Notify`] to sleep on. A waiter records the sequence before it looks for work
//! and sleeps only if nothing was enqueued since.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

/// One signal per lane (see [`crate::lane`]): local workers sleep on the local one, the
/// Faktory server's `FETCH` on the remote one, so a burst of jobs for one kind of worker does
/// not make the other look for work it cannot find.
#[derive(Default)]
pub struct Wakeup {
    local: Bell,
    remote: Bell,
}

/// One signal: a sequence number and a [`Notify`]. Each lane of [`Wakeup`] is one; a component
/// with a wake-up of its own (the Faktory server's buffers) uses one too.
#[derive(Default)]
pub struct Bell {
    seq: AtomicU64,
    notify: Notify,
}

impl Bell {
    /// Bumps the sequence and wakes every waiter.
    pub fn wake(&self) {
        self.seq.fetch_add(1, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// The sequence, to pass to [`Bell::wait`].
    pub fn mark(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Returns once the sequence differs from `mark` (at once if it already does), or after
    /// `timeout`.
    pub async fn wait(&self, mark: u64, timeout: Duration) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        // Registering before re-checking the sequence closes the window in which a wake
        // between `mark` and this call would be missed.
        notified.as_mut().enable();
        if self.seq.load(Ordering::Acquire) != mark {
            return;
        }
        let _ = tokio::time::timeout(timeout, notified).await;
    }
}

impl Wakeup {
    /// Called by a backend after committing new ready work it cannot tell the lane of (or
    /// when it heard of work from another process): wakes both lanes.
    pub fn wake(&self) {
        self.local.wake();
        self.remote.wake();
    }

    /// Called by a backend that knows which lanes got ready work.
    pub fn wake_lanes(&self, local: bool, remote: bool) {
        if local {
            self.local.wake();
        }
        if remote {
            self.remote.wake();
        }
    }

    /// The value to pass to [`Wakeup::wait`]; read it *before* looking for work.
    pub fn mark(&self) -> u64 {
        self.local.seq.load(Ordering::Acquire)
    }

    /// Sleeps until a wake of the local lane after `mark`, or `timeout` (the cross-process poll).
    pub async fn wait(&self, mark: u64, timeout: Duration) {
        self.local.wait(mark, timeout).await
    }

    /// [`Wakeup::mark`] for the remote lane.
    pub fn mark_remote(&self) -> u64 {
        self.remote.seq.load(Ordering::Acquire)
    }

    /// [`Wakeup::wait`] for the remote lane.
    pub async fn wait_remote(&self, mark: u64, timeout: Duration) {
        self.remote.wait(mark, timeout).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Instant;

    #[tokio::test]
    async fn a_wake_between_mark_and_wait_is_not_lost() {
        let w = Wakeup::default();
        let mark = w.mark();
        w.wake();
        let t = Instant::now();
        w.wait(mark, Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn wait_returns_on_wake() {
        let w = Arc::new(Wakeup::default());
        let w2 = w.clone();
        let mark = w.mark();
        let h = tokio::spawn(async move { w2.wait(mark, Duration::from_secs(5)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        w.wake();
        tokio::time::timeout(Duration::from_secs(1), h).await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_lane_sleeps_through_the_other_lanes_wakes() {
        let w = Wakeup::default();
        let (local, remote) = (w.mark(), w.mark_remote());
        w.wake_lanes(false, true);
        let t = Instant::now();
        w.wait_remote(remote, Duration::from_secs(5)).await;
        assert!(t.elapsed() < Duration::from_secs(1));
        w.wait(local, Duration::from_millis(200)).await;
        assert!(t.elapsed() >= Duration::from_millis(200), "the local lane was not woken");
    }
}
