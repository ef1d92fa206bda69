//! The sync's unit tests (the end-to-end tests run the command line against the simulator).

use super::*;

#[test]
fn the_target_limit_keeps_a_burst_and_a_second_under_the_configured_rps() {
    for rps in [1u32, 2, 5, 10, 50, 100, 1000, 100_000] {
        let c = SyncConfig { target_rps: rps, ..SyncConfig::default() };
        let l = c.target_limit();
        let per_second = l.limit as f64 / l.period.as_secs_f64();
        // Worst case in one wall-clock second: a full burst, then the rate for a second
        // plus 10% of jitter.
        let worst = l.burst as f64 + per_second * 1.1;
        assert!(worst <= rps.max(2) as f64, "rps {rps}: {l:?} allows {worst}");
        assert!(l.burst >= 1 && per_second >= 0.5 * (rps - l.burst) as f64, "rps {rps}: {l:?} wastes the limit");
    }
}

#[test]
fn nearest_rank_percentiles() {
    let v: Vec<i64> = (1..=100).collect();
    assert_eq!((percentile(&v, 50.0), percentile(&v, 95.0), percentile(&v, 99.0)), (Some(50), Some(95), Some(99)));
    assert_eq!(percentile(&[7], 99.0), Some(7));
    assert_eq!(percentile(&[], 50.0), None);
}

#[test]
fn cursors_order_by_time_then_id() {
    let c = Cursor { since: "t".into(), after_ms: 10, after_id: "P2".into() };
    let p = |ms: i64, id: &str| Product {
        id: id.into(),
        sku: String::new(),
        title: String::new(),
        updated_at: String::new(),
        updated_ms: ms,
        variants: vec![],
    };
    assert!(
        !c.passes(&p(10, "P1")) && !c.passes(&p(10, "P2")) && c.passes(&p(10, "P3")) && c.passes(&p(11, "P0")) && !c.passes(&p(9, "P9"))
    );
}
