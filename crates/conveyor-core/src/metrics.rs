//! Per-minute job metrics: counts and runtime / wait histograms per queue and kind.
//!
//! Backends store one row per (minute, queue, kind). Histograms use fixed bucket bounds so that
//! rows merge by adding counts — in SQL (`col = col + excluded.col`), in Lua, or here — and the
//! same buckets feed Prometheus histograms and the dashboard's p95.

use std::collections::HashMap;

use serde::Serialize;

use crate::job::{Completion, Outcome};

/// Upper bounds, in milliseconds, of the histogram buckets; a last bucket holds the rest.
pub const BUCKET_BOUNDS_MS: [u64; 15] = [1, 2, 5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000];
pub const BUCKETS: usize = BUCKET_BOUNDS_MS.len() + 1;

pub fn bucket_of(ms: u64) -> usize {
    BUCKET_BOUNDS_MS.iter().position(|b| ms <= *b).unwrap_or(BUCKET_BOUNDS_MS.len())
}

/// One minute of one (queue, kind).
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct MetricsRow {
    /// Unix ms of the minute's start.
    pub minute: i64,
    pub queue: String,
    pub kind: String,
    pub completed: u64,
    /// Attempts that failed and were scheduled again.
    pub retried: u64,
    /// Jobs that failed for good.
    pub failed: u64,
    pub runtime_sum_ms: u64,
    pub runtime_max_ms: u64,
    pub wait_sum_ms: u64,
    pub runtime_hist: [u64; BUCKETS],
    pub wait_hist: [u64; BUCKETS],
}

impl MetricsRow {
    /// Attempts finished in this bucket, successful or not.
    pub fn processed(&self) -> u64 {
        self.completed + self.retried + self.failed
    }

    pub fn merge(&mut self, other: &MetricsRow) {
        self.completed += other.completed;
        self.retried += other.retried;
        self.failed += other.failed;
        self.runtime_sum_ms += other.runtime_sum_ms;
        self.runtime_max_ms = self.runtime_max_ms.max(other.runtime_max_ms);
        self.wait_sum_ms += other.wait_sum_ms;
        for i in 0..BUCKETS {
            self.runtime_hist[i] += other.runtime_hist[i];
            self.wait_hist[i] += other.wait_hist[i];
        }
    }

    pub fn avg_runtime_ms(&self) -> f64 {
        ratio(self.runtime_sum_ms, self.processed())
    }

    pub fn avg_wait_ms(&self) -> f64 {
        ratio(self.wait_sum_ms, self.processed())
    }

    pub fn p95_runtime_ms(&self) -> f64 {
        percentile(&self.runtime_hist, 0.95)
    }

    pub fn p95_wait_ms(&self) -> f64 {
        percentile(&self.wait_hist, 0.95)
    }
}

fn ratio(sum: u64, n: u64) -> f64 {
    if n == 0 {
        0.0
    } else {
        sum as f64 / n as f64
    }
}

/// The `q` quantile of a bucketed histogram, interpolated linearly inside its bucket.
pub fn percentile(hist: &[u64; BUCKETS], q: f64) -> f64 {
    let total: u64 = hist.iter().sum();
    if total == 0 {
        return 0.0;
    }
    let rank = q * total as f64;
    let mut seen = 0u64;
    for (i, &n) in hist.iter().enumerate() {
        if n > 0 && (seen + n) as f64 >= rank {
            let lo = if i == 0 { 0 } else { BUCKET_BOUNDS_MS[i - 1] } as f64;
            let hi = BUCKET_BOUNDS_MS.get(i).map_or(lo * 2.0, |b| *b as f64);
            return lo + (hi - lo) * ((rank - seen as f64) / n as f64).clamp(0.0, 1.0);
        }
        seen += n;
    }
    BUCKET_BOUNDS_MS[BUCKET_BOUNDS_MS.len() - 1] as f64
}

/// Sums the completions of one flush into rows, so a backend writes one row per
/// (minute, queue, kind) per transaction instead of one per job.
#[derive(Default)]
pub struct MetricsAccumulator {
    rows: HashMap<(i64, String, String), MetricsRow>,
}

impl MetricsAccumulator {
    pub fn record(&mut self, minute: i64, c: &Completion) {
        let row = self.rows.entry((minute, c.queue.clone(), c.kind.clone())).or_insert_with(|| MetricsRow {
            minute,
            queue: c.queue.clone(),
            kind: c.kind.clone(),
            ..Default::default()
        });
        match c.outcome {
            Outcome::Completed => row.completed += 1,
            Outcome::Retry { .. } => row.retried += 1,
            Outcome::Failed { .. } => row.failed += 1,
            // A released job did not run: it is not a processed attempt.
            Outcome::Release { .. } => return,
        }
        row.runtime_sum_ms += c.runtime_ms;
        row.runtime_max_ms = row.runtime_max_ms.max(c.runtime_ms);
        row.wait_sum_ms += c.wait_ms;
        row.runtime_hist[bucket_of(c.runtime_ms)] += 1;
        row.wait_hist[bucket_of(c.wait_ms)] += 1;
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn drain(&mut self) -> impl Iterator<Item = MetricsRow> + '_ {
        self.rows.drain().map(|(_, row)| row)
    }
}

pub fn minute_of(unix_ms: i64) -> i64 {
    unix_ms - unix_ms.rem_euclid(60_000)
}

/// Adds rows of several minutes or kinds into one summary row.
pub fn summarize<'a>(rows: impl IntoIterator<Item = &'a MetricsRow>) -> MetricsRow {
    let mut total = MetricsRow::default();
    for r in rows {
        total.merge(r);
    }
    total
}

/// Attempts per queue over the last 60 s, from per-minute counts `(queue, minute, n)` of the
/// current and previous minute: this minute so far plus the matching share of the previous one.
pub fn last_minute_rates(rows: impl IntoIterator<Item = (String, i64, i64)>, now: i64) -> std::collections::HashMap<String, f64> {
    let minute = minute_of(now);
    let frac = (now - minute) as f64 / 60_000.0;
    let mut rates = std::collections::HashMap::new();
    for (q, m, n) in rows {
        let share = if m == minute { n as f64 } else { n as f64 * (1.0 - frac) };
        *rates.entry(q).or_default() += share;
    }
    rates
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_range() {
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(1), 0);
        assert_eq!(bucket_of(3), 2);
        assert_eq!(bucket_of(1_000_000), BUCKETS - 1);
    }

    #[test]
    fn percentile_interpolates_within_a_bucket() {
        let mut h = [0u64; BUCKETS];
        h[bucket_of(7)] = 100; // all in (5, 10]
        let p = percentile(&h, 0.95);
        assert!(p > 5.0 && p <= 10.0, "{p}");
        let mut h2 = [0u64; BUCKETS];
        h2[0] = 95;
        h2[bucket_of(400)] = 5;
        assert!(percentile(&h2, 0.95) <= 1.0);
        assert!(percentile(&h2, 0.99) > 250.0);
    }

    #[test]
    fn minutes_truncate() {
        assert_eq!(minute_of(125_000), 120_000);
    }

    #[test]
    fn last_minute_rates_weigh_the_previous_minute_by_what_is_left_of_it() {
        let now = 1_800_000_000_000 + 15_000; // 15 s into a minute
        let minute = super::minute_of(now);
        let r = super::last_minute_rates(
            [("q".to_string(), minute, 10), ("q".to_string(), minute - 60_000, 40), ("p".to_string(), minute, 3)],
            now,
        );
        assert_eq!(r["q"], 10.0 + 40.0 * 0.75);
        assert_eq!(r["p"], 3.0);
    }
}
