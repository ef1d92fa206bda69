//! Supervisor balancing, as Horizon does it: how a supervisor's executors are shared among its
//! queues. `Off` serves the queues in strict priority order from one pool; `Simple` gives each
//! queue a fixed equal share; `Auto` re-divides every few seconds, giving more executors to the
//! queues whose next job has waited longest, never fewer than `min_workers` per queue.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Balance {
    #[default]
    Off,
    Simple,
    Auto,
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "off" | "false" => Ok(Balance::Off),
            "simple" => Ok(Balance::Simple),
            "auto" => Ok(Balance::Auto),
            other => Err(format!("expected off, simple or auto, got {other:?}")),
        }
    }
}

/// A set of queues served by one fetcher with its own executors. `exec` bounds jobs running;
/// `slots` bounds jobs held (running + prefetched). Both move together when the pool resizes.
pub(crate) struct Pool {
    pub(crate) queues: Vec<String>,
    pub(crate) exec: Arc<Semaphore>,
    pub(crate) slots: Arc<Semaphore>,
    pub(crate) prefetch: usize,
    capacity: AtomicUsize,
}

impl Pool {
    pub(crate) fn new(queues: Vec<String>, capacity: usize, prefetch: usize) -> Self {
        Pool {
            queues,
            exec: Arc::new(Semaphore::new(capacity)),
            slots: Arc::new(Semaphore::new(capacity + prefetch)),
            prefetch,
            capacity: AtomicUsize::new(capacity),
        }
    }

    pub(crate) fn capacity(&self) -> usize {
        self.capacity.load(Ordering::Relaxed)
    }

    /// Changes the number of executors. Growing is immediate; shrinking takes permits back as
    /// running jobs finish (a running job is never interrupted to rebalance).
    pub(crate) fn resize(&self, to: usize) {
        let from = self.capacity.swap(to, Ordering::Relaxed);
        if to > from {
            self.exec.add_permits(to - from);
            self.slots.add_permits(to - from);
        } else if from > to {
            let n = (from - to) as u32;
            let (exec, slots) = (self.exec.clone(), self.slots.clone());
            tokio::spawn(async move {
                if let Ok(p) = exec.acquire_many_owned(n).await {
                    p.forget();
                }
                if let Ok(p) = slots.acquire_many_owned(n).await {
                    p.forget();
                }
            });
        }
    }
}

/// Divides `total` executors among queues by `weights`, at least `min` each (when `total`
/// allows), by largest remainder so the shares always add up to `total`. All-zero weights give
/// an even split.
pub fn allocate(total: usize, min: usize, weights: &[f64]) -> Vec<usize> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let min = min.min(total / n);
    let spare = total - min * n;
    let sum: f64 = weights.iter().map(|w| w.max(0.0)).sum();
    let shares: Vec<f64> =
        if sum <= 0.0 { vec![spare as f64 / n as f64; n] } else { weights.iter().map(|w| spare as f64 * w.max(0.0) / sum).collect() };
    let mut out: Vec<usize> = shares.iter().map(|s| min + s.floor() as usize).collect();
    let mut left = total - out.iter().sum::<usize>();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| (shares[b] - shares[b].floor()).total_cmp(&(shares[a] - shares[a].floor())).then(a.cmp(&b)));
    for i in order.into_iter().cycle() {
        if left == 0 {
            break;
        }
        out[i] += 1;
        left -= 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::allocate;

    #[test]
    fn shares_add_up_and_respect_the_minimum() {
        assert_eq!(allocate(10, 1, &[0.0, 0.0]), vec![5, 5]);
        assert_eq!(allocate(10, 1, &[9.0, 0.0]), vec![9, 1]);
        assert_eq!(allocate(10, 2, &[1.0, 1.0, 2.0]), vec![3, 3, 4]);
        let a = allocate(7, 1, &[0.3, 0.3, 0.3]);
        assert_eq!(a.iter().sum::<usize>(), 7);
        assert!(a.iter().all(|&x| x >= 2));
        assert_eq!(allocate(2, 5, &[1.0, 1.0, 1.0]).iter().sum::<usize>(), 2, "a minimum larger than the total is capped");
        assert!(allocate(3, 0, &[]).is_empty());
    }
}
