//! A "new work may be ready" signal without lost wake-ups: a sequence number bumped on every
//! enqueue, and a [`Notify`] to sleep on. A waiter records the sequence before it looks for work
//! and sleeps only if nothing was enqueued since.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

#[derive(Default)]
pub struct Wakeup {
    seq: AtomicU64,
    notify: Notify,
}

impl Wakeup {
    /// Called by a backend after committing new ready work.
    pub fn wake(&self) {
        self.seq.fetch_add(1, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// The value to pass to [`Wakeup::wait`]; read it *before* looking for work.
    pub fn mark(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }

    /// Sleeps until a wake after `mark`, or `timeout` (the cross-process poll).
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
}
