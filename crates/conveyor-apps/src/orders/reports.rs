//! KPIs and leaderboards: what operators read.
//!
//! KPIs count completed orders by the UTC day of `order_date`, and are cached (daily 24 h,
//! range 1 h, realtime 5 min) under `kpis:`; settling an order forgets them in its own
//! transaction, so a read after a settle always recomputes. Leaderboards are sorted sets moved
//! by FinalizeOrder; `rebuild` recomputes them from the store in one transaction each.

use std::sync::Arc;
use std::time::Duration;

use jiff::civil::Date;
use jiff::tz::TimeZone;
use jiff::{Span, Timestamp};
use serde::{Deserialize, Serialize};

use conveyor_core::backend::{BackendError, QueueBackend, Result, RowExt};
use conveyor_core::cache::{Cache, SortedSet};

use super::money::to_major;
use super::{leaderboard, KPI_CACHE_PREFIX};

pub const DAILY_TTL: Duration = Duration::from_secs(24 * 3600);
pub const RANGE_TTL: Duration = Duration::from_secs(3600);
pub const REALTIME_TTL: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DailyKpis {
    pub date: String,
    pub total_revenue: f64,
    pub order_count: u64,
    pub average_order_value: f64,
    pub unique_customers: u64,
    pub generated_at: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Totals {
    pub total_revenue: f64,
    pub order_count: u64,
    pub average_order_value: f64,
    pub unique_customers: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RangeKpis {
    pub start_date: String,
    pub end_date: String,
    pub days: Vec<DailyKpis>,
    pub totals: Totals,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RealtimeKpis {
    pub pending_orders: u64,
    pub processing_orders: u64,
    pub completed_today: u64,
    pub failed_today: u64,
    pub revenue_today: f64,
}

fn now_text() -> String {
    format!("{:.0}", Timestamp::now())
}

/// Today in UTC, the calendar KPIs count by.
pub fn today() -> Date {
    TimeZone::UTC.to_datetime(Timestamp::now()).date()
}

fn avg(revenue: i64, n: i64) -> f64 {
    if n == 0 {
        0.0
    } else {
        (revenue as f64 / n as f64).round() / 100.0
    }
}

/// `YYYY-MM-DD` (a month or day may have one digit), or an error naming the parameter.
pub fn parse_day(field: &str, text: &str) -> std::result::Result<Date, String> {
    Date::strptime("%Y-%m-%d", text.trim()).map_err(|_| format!("{field}: expected a date like 2026-11-23, got {text:?}"))
}

async fn compute_daily(backend: &dyn QueueBackend, day: &str) -> Result<DailyKpis> {
    let r = backend
        .query(
            "SELECT count(*), coalesce(sum(total_cents), 0), count(DISTINCT customer_id) FROM orders WHERE order_day = $1 AND status = 'completed'",
            vec![day.into()],
        )
        .await?;
    let r = r.first().ok_or_else(|| BackendError::Other("no KPI row".into()))?;
    Ok(DailyKpis {
        date: day.to_string(),
        total_revenue: to_major(r.int(1)),
        order_count: r.int(0) as u64,
        average_order_value: avg(r.int(1), r.int(0)),
        unique_customers: r.int(2) as u64,
        generated_at: now_text(),
    })
}

pub async fn daily(backend: Arc<dyn QueueBackend>, day: Date) -> Result<DailyKpis> {
    let key = day.to_string();
    let b = backend.clone();
    Cache::new(backend)
        .remember(&format!("{KPI_CACHE_PREFIX}daily:{key}"), Some(DAILY_TTL), || async move { compute_daily(b.as_ref(), &key).await })
        .await
}

pub async fn range(backend: Arc<dyn QueueBackend>, start: Date, end: Date) -> Result<RangeKpis> {
    let key = format!("{KPI_CACHE_PREFIX}range:{start}:{end}");
    let b = backend.clone();
    Cache::new(backend)
        .remember(&key, Some(RANGE_TTL), || async move {
            let mut days = Vec::new();
            for d in start.series(Span::new().days(1)).take_while(|d| *d <= end) {
                days.push(compute_daily(b.as_ref(), &d.to_string()).await?);
            }
            let r = b
                .query(
                    "SELECT count(*), coalesce(sum(total_cents), 0), count(DISTINCT customer_id) FROM orders
                     WHERE order_day >= $1 AND order_day <= $2 AND status = 'completed'",
                    vec![start.to_string().into(), end.to_string().into()],
                )
                .await?;
            let r = r.first().ok_or_else(|| BackendError::Other("no KPI row".into()))?;
            let totals = Totals {
                total_revenue: to_major(r.int(1)),
                order_count: r.int(0) as u64,
                average_order_value: avg(r.int(1), r.int(0)),
                unique_customers: r.int(2) as u64,
            };
            Ok(RangeKpis { start_date: start.to_string(), end_date: end.to_string(), days, totals })
        })
        .await
}

pub async fn realtime(backend: Arc<dyn QueueBackend>) -> Result<RealtimeKpis> {
    let b = backend.clone();
    Cache::new(backend)
        .remember(&format!("{KPI_CACHE_PREFIX}realtime"), Some(REALTIME_TTL), || async move {
            let today = today().to_string();
            let rows = b
                .query(
                    "SELECT status, count(*), coalesce(sum(total_cents), 0) FROM orders
                     WHERE status IN ('pending', 'processing') OR order_day = $1 GROUP BY status",
                    vec![today.into()],
                )
                .await?;
            let mut k = RealtimeKpis { pending_orders: 0, processing_orders: 0, completed_today: 0, failed_today: 0, revenue_today: 0.0 };
            for r in &rows {
                match r.text(0) {
                    Some("pending") => k.pending_orders = r.int(1) as u64,
                    Some("processing") => k.processing_orders = r.int(1) as u64,
                    Some("completed") => {
                        k.completed_today = r.int(1) as u64;
                        k.revenue_today = to_major(r.int(2));
                    }
                    Some("failed") => k.failed_today = r.int(1) as u64,
                    _ => {}
                }
            }
            Ok(k)
        })
        .await
}

/// Recomputes today's KPIs now (the scheduler's `kpis.generate`), replacing cached ones.
pub async fn generate(backend: Arc<dyn QueueBackend>, day: Date) -> Result<DailyKpis> {
    Cache::new(backend.clone()).forget_prefix(KPI_CACHE_PREFIX).await?;
    let _ = realtime(backend.clone()).await?;
    daily(backend, day).await
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CustomerRank {
    pub rank: u64,
    pub customer_id: i64,
    pub customer_name: String,
    pub order_count: u64,
    pub total_spent: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ProductRank {
    pub rank: u64,
    pub sku: String,
    pub name: String,
    pub units_sold: u64,
    pub revenue: f64,
}

async fn customer_row(backend: &Arc<dyn QueueBackend>, rank: u64, member: &str, spent: f64) -> Result<CustomerRank> {
    let id: i64 = member.parse().unwrap_or(0);
    let name = backend
        .query("SELECT name FROM customers WHERE id = $1", vec![id.into()])
        .await?
        .first()
        .and_then(|r| r.text(0).map(str::to_string));
    let orders = SortedSet::new(backend.clone(), leaderboard::CUSTOMERS_ORDERS).score(member).await?.unwrap_or(0.0);
    Ok(CustomerRank {
        rank,
        customer_id: id,
        customer_name: name.unwrap_or_default(),
        order_count: orders as u64,
        total_spent: to_major(spent as i64),
    })
}

pub async fn top_customers(backend: Arc<dyn QueueBackend>, limit: usize) -> Result<Vec<CustomerRank>> {
    let top = SortedSet::new(backend.clone(), leaderboard::CUSTOMERS_SPENT).top(limit).await?;
    let mut out = Vec::with_capacity(top.len());
    for r in top {
        out.push(customer_row(&backend, r.rank, &r.member, r.score).await?);
    }
    Ok(out)
}

pub async fn customer_rank(backend: Arc<dyn QueueBackend>, customer_id: i64) -> Result<Option<CustomerRank>> {
    let Some(r) = SortedSet::new(backend.clone(), leaderboard::CUSTOMERS_SPENT).rank(&customer_id.to_string()).await? else {
        return Ok(None);
    };
    Ok(Some(customer_row(&backend, r.rank, &r.member, r.score).await?))
}

pub async fn top_products(backend: Arc<dyn QueueBackend>, limit: usize) -> Result<Vec<ProductRank>> {
    let top = SortedSet::new(backend.clone(), leaderboard::PRODUCTS_UNITS).top(limit).await?;
    let revenue = SortedSet::new(backend.clone(), leaderboard::PRODUCTS_REVENUE);
    let mut out = Vec::with_capacity(top.len());
    for r in top {
        let name = backend
            .query("SELECT name FROM products WHERE sku = $1", vec![r.member.clone().into()])
            .await?
            .first()
            .and_then(|x| x.text(0).map(str::to_string));
        let rev = revenue.score(&r.member).await?.unwrap_or(0.0);
        out.push(ProductRank {
            rank: r.rank,
            sku: r.member,
            name: name.unwrap_or_default(),
            units_sold: r.score as u64,
            revenue: to_major(rev as i64),
        });
    }
    Ok(out)
}

/// Rebuilds every leaderboard from the completed orders in the store.
pub async fn rebuild(backend: Arc<dyn QueueBackend>) -> Result<()> {
    let set = |name: &str| SortedSet::new(backend.clone(), name);
    let cust = backend
        .query("SELECT customer_id, sum(total_cents), count(*) FROM orders WHERE status = 'completed' GROUP BY customer_id", vec![])
        .await?;
    set(leaderboard::CUSTOMERS_SPENT).rebuild(cust.iter().map(|r| (r.int(0).to_string(), r.int(1) as f64)).collect()).await?;
    set(leaderboard::CUSTOMERS_ORDERS).rebuild(cust.iter().map(|r| (r.int(0).to_string(), r.int(2) as f64)).collect()).await?;
    let prod = backend
        .query(
            "SELECT i.sku, sum(i.quantity), sum(i.quantity * i.unit_price_cents) FROM order_items i JOIN orders o ON o.id = i.order_id
             WHERE o.status = 'completed' GROUP BY i.sku",
            vec![],
        )
        .await?;
    set(leaderboard::PRODUCTS_UNITS)
        .rebuild(prod.iter().map(|r| (r.text(0).unwrap_or_default().to_string(), r.int(1) as f64)).collect())
        .await?;
    set(leaderboard::PRODUCTS_REVENUE)
        .rebuild(prod.iter().map(|r| (r.text(0).unwrap_or_default().to_string(), r.int(2) as f64)).collect())
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn days_read_as_year_month_day() {
        for (text, day) in [
            ("2026-11-23", "2026-11-23"),
            (" 2026-11-23 ", "2026-11-23"),
            ("2026-1-5", "2026-01-05"),
            ("2026- 1- 5", "2026-01-05"),
            ("26-11-23", "0026-11-23"),
            ("+2026-11-23", "2026-11-23"),
            ("2024-02-29", "2024-02-29"),
            ("0000-01-01", "0000-01-01"),
            ("9999-12-31", "9999-12-31"),
        ] {
            assert_eq!(parse_day("date", text).map(|d| d.to_string()), Ok(day.to_string()), "{text:?}");
        }
        for text in ["", "2026-02-29", "2026-13-01", "2026/11/23", "20261123", "23-11-2026", "2026-11-23T00:00:00", "2026-11-23 x"] {
            assert!(parse_day("date", text).is_err(), "{text:?}");
        }
        assert_eq!(parse_day("start_date", "soon"), Err("start_date: expected a date like 2026-11-23, got \"soon\"".into()));
    }

    #[test]
    fn generated_at_is_utc_to_the_second_and_today_is_its_day() {
        let before = today();
        let t = now_text();
        let after = today();
        assert_eq!((t.len(), &t[10..11], &t[19..]), (20, "T", "Z"), "{t}");
        assert!(conveyor_core::clock::parse_rfc3339_ms(&t).is_some(), "{t}");
        assert!([before.to_string(), after.to_string()].contains(&t[..10].to_string()), "{t}");
    }
}
