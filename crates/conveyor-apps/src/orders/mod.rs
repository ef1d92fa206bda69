//! Order processing: products and customers, CSV import, the order workflow with rollback
//! (see [`workflow`]), and the read side the API and CLI use.

pub mod import;
/// Integer cents (shared with the product sync, so it lives beside the applications).
pub use crate::money;
pub mod payment;
pub mod reports;
mod schema;
mod totals;
pub mod workflow;

use std::sync::Arc;

use serde::Serialize;

use conveyor_core::backend::{count_sql, BackendError, Cursor, Page, Paged, QueueBackend, Result, Row, RowExt, SqlValue, Tx};
use conveyor_core::Registry;

use money::to_major;
use payment::{PaymentGateway, Simulator, SimulatorConfig};

/// The queue the order workflow's jobs run on (it gets its own supervisor).
pub const QUEUE: &str = "orders";
/// Every cached KPI key starts with this; settling an order forgets them all.
pub const KPI_CACHE_PREFIX: &str = "kpis:";

/// Sorted-set names of the leaderboards.
pub mod leaderboard {
    pub const CUSTOMERS_SPENT: &str = "leaderboard:customers:spent";
    pub const CUSTOMERS_ORDERS: &str = "leaderboard:customers:orders";
    pub const PRODUCTS_UNITS: &str = "leaderboard:products:units";
    pub const PRODUCTS_REVENUE: &str = "leaderboard:products:revenue";
}

/// Creates or upgrades the orders tables.
pub async fn migrate(backend: &dyn QueueBackend) -> Result<Vec<u32>> {
    conveyor_core::migrate::apply(backend, "orders", schema::MIGRATIONS).await
}

/// Registers the workflow's job kinds, paying through the built-in simulator.
pub fn register(registry: &mut Registry, backend: Arc<dyn QueueBackend>, payment: SimulatorConfig) {
    register_with_gateway(registry, Arc::new(Simulator::new(backend, payment)));
}

/// The same with any gateway (a real one implements [`PaymentGateway`]).
pub fn register_with_gateway(registry: &mut Registry, gateway: Arc<dyn PaymentGateway>) {
    workflow::register(registry, gateway);
    registry.register(KPIS_JOB, |_: serde_json::Value, ctx: conveyor_core::JobContext| async move {
        reports::generate(ctx.backend().clone(), reports::today()).await?;
        Ok(())
    });
}

/// The job that recomputes the KPIs; scheduled every 5 minutes by default.
pub const KPIS_JOB: &str = "kpis.generate";

/// The application's built-in schedules.
pub fn schedules() -> Vec<conveyor_core::scheduler::Schedule> {
    let every_5_min = conveyor_core::cron::CronSchedule::parse("0 */5 * * * *", "UTC").expect("a valid built-in cron expression");
    vec![conveyor_core::scheduler::Schedule::new("kpis", every_5_min, conveyor_core::NewJob::new(KPIS_JOB, &serde_json::json!({})))]
}

pub(crate) fn upsert_customer(tx: &mut dyn Tx, id: i64, name: &str, email: &str) -> Result<()> {
    tx.execute(
        "INSERT INTO customers (id, name, email) VALUES ($1, $2, $3) ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email",
        &[id.into(), name.into(), email.into()],
    )?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Product {
    pub sku: String,
    pub name: String,
    /// Major units, two decimals.
    pub price: f64,
    /// What can still be sold.
    pub stock: i64,
    /// Held by orders in flight.
    pub reserved: i64,
}

pub async fn products(backend: &dyn QueueBackend) -> Result<Vec<Product>> {
    let rows = backend.query("SELECT sku, name, price_cents, stock, reserved FROM products ORDER BY sku", vec![]).await?;
    Ok(rows
        .iter()
        .map(|r| Product {
            sku: r.text(0).unwrap_or_default().into(),
            name: r.text(1).unwrap_or_default().into(),
            price: to_major(r.int(2)),
            stock: r.int(3),
            reserved: r.int(4),
        })
        .collect())
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Item {
    pub sku: String,
    pub quantity: i64,
    pub unit_price: f64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Payment {
    /// `charged`, `declined` or `refunded`.
    pub status: String,
    pub amount: f64,
    pub reference: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Step {
    pub name: String,
    pub status: String,
    pub attempts: u32,
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Order {
    pub order_id: String,
    pub customer_id: i64,
    pub customer_name: String,
    pub customer_email: String,
    /// `pending`, `processing`, `completed` or `failed`.
    pub status: String,
    pub total: f64,
    pub order_date: String,
    pub items: Vec<Item>,
    pub payments: Vec<Payment>,
    /// Only on a single order.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub steps: Option<Vec<Step>>,
    #[serde(skip)]
    pub workflow_id: Option<String>,
}

const ORDER_COLS: &str = "o.id, o.customer_id, c.name, c.email, o.status, o.total_cents, o.order_date, o.workflow_id";

async fn hydrate(backend: &dyn QueueBackend, rows: &[Row]) -> Result<Vec<Order>> {
    let mut out = Vec::with_capacity(rows.len());
    for r in rows {
        let id = r.text(0).unwrap_or_default().to_string();
        let items = backend
            .query("SELECT sku, quantity, unit_price_cents FROM order_items WHERE order_id = $1 ORDER BY line", vec![id.clone().into()])
            .await?
            .iter()
            .map(|i| Item { sku: i.text(0).unwrap_or_default().into(), quantity: i.int(1), unit_price: to_major(i.int(2)) })
            .collect();
        let payments = backend
            .query(
                "SELECT status, amount_cents, reference FROM payments WHERE order_id = $1 ORDER BY created_at, status",
                vec![id.clone().into()],
            )
            .await?
            .iter()
            .map(|p| Payment {
                status: p.text(0).unwrap_or_default().into(),
                amount: to_major(p.int(1)),
                reference: p.text(2).map(str::to_string),
            })
            .collect();
        out.push(Order {
            order_id: id,
            customer_id: r.int(1),
            customer_name: r.text(2).unwrap_or_default().into(),
            customer_email: r.text(3).unwrap_or_default().into(),
            status: r.text(4).unwrap_or_default().into(),
            total: to_major(r.int(5)),
            order_date: r.text(6).unwrap_or_default().into(),
            items,
            payments,
            steps: None,
            workflow_id: r.text(7).map(str::to_string),
        });
    }
    Ok(out)
}

/// One order with its payments and workflow steps.
pub async fn order(backend: &dyn QueueBackend, id: &str) -> Result<Option<Order>> {
    let rows = backend
        .query(&format!("SELECT {ORDER_COLS} FROM orders o JOIN customers c ON c.id = o.customer_id WHERE o.id = $1"), vec![id.into()])
        .await?;
    let Some(mut order) = hydrate(backend, &rows).await?.pop() else { return Ok(None) };
    let mut steps = Vec::new();
    if let Some(wf) = &order.workflow_id {
        if let Some(info) = conveyor_core::workflow::find(backend, wf).await? {
            let ts = |ms: Option<i64>| ms.and_then(conveyor_core::clock::format_rfc3339_ms);
            steps = info
                .steps
                .into_iter()
                .map(|s| Step {
                    name: s.name,
                    status: s.status,
                    attempts: s.attempts,
                    started_at: ts(s.started_at),
                    finished_at: ts(s.finished_at),
                    error: s.error,
                })
                .collect();
        }
    }
    order.steps = Some(steps);
    Ok(Some(order))
}

/// Orders, newest first, optionally by status and customer.
pub async fn orders(backend: &dyn QueueBackend, status: Option<&str>, customer_id: Option<i64>, page: Page) -> Result<Paged<Order>> {
    let filter = "(CAST($1 AS TEXT) IS NULL OR o.status = $1) AND (CAST($2 AS BIGINT) IS NULL OR o.customer_id = $2)";
    let params = |extra: Vec<SqlValue>| {
        let mut p: Vec<SqlValue> = vec![status.map(str::to_string).into(), customer_id.into()];
        p.extend(extra);
        p
    };
    let count = backend.query(&count_sql(&format!("FROM orders o WHERE {filter}")), params(vec![])).await?.first().map_or(0, |r| r.int(0));
    let (after, limit, extra) = page.sql("o.created_at", Some("o.id"), 3);
    let rows = backend
        .query(
            &format!(
                "SELECT {ORDER_COLS}, o.created_at FROM orders o JOIN customers c ON c.id = o.customer_id WHERE {filter}{after}
                 ORDER BY o.created_at DESC, o.id DESC{limit}"
            ),
            params(extra),
        )
        .await?;
    // The page's rows first (the extra row read to see whether more follow is not hydrated).
    let rows = Paged::from_rows(rows, &page, count as u64, |r| Cursor::new(r.int(8), r.text(0).unwrap_or_default()));
    Ok(Paged { items: hydrate(backend, &rows.items).await?, total: rows.total, total_capped: rows.total_capped, next: rows.next })
}

/// How the orders created since `since` (unix ms) stand: (unsettled, completed, failed,
/// revenue of the completed in cents).
pub async fn settlement(backend: &dyn QueueBackend, since: i64) -> Result<(u64, u64, u64, i64)> {
    let rows = backend
        .query(
            "SELECT status, count(*), coalesce(sum(total_cents), 0) FROM orders WHERE created_at >= $1 GROUP BY status",
            vec![since.into()],
        )
        .await?;
    let (mut open, mut completed, mut failed, mut revenue) = (0, 0, 0, 0);
    for r in &rows {
        match r.text(0) {
            Some("completed") => {
                completed = r.int(1) as u64;
                revenue = r.int(2);
            }
            Some("failed") => failed = r.int(1) as u64,
            _ => open += r.int(1) as u64,
        }
    }
    Ok((open, completed, failed, revenue))
}

/// Why a posted order was refused.
#[derive(Debug, thiserror::Error)]
pub enum CreateError {
    #[error("{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("order {0} already exists")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] BackendError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> CreateError {
    CreateError::Invalid { field: field.into(), reason: reason.into() }
}

/// Stores one order posted as JSON (`{order_id, customer_id, customer_name, customer_email,
/// order_date, items: [{sku, quantity, unit_price}]}`) and starts its workflow, in one
/// transaction.
pub async fn create_order(conveyor: &conveyor_core::Conveyor, body: &serde_json::Value) -> std::result::Result<Order, CreateError> {
    use conveyor_core::backend::QueueBackendExt;
    let text = |field: &str, max: usize| -> std::result::Result<String, CreateError> {
        match body.get(field).and_then(|v| v.as_str()).map(str::trim) {
            Some(s) if !s.is_empty() && s.len() <= max => Ok(s.to_string()),
            Some(_) => Err(invalid(field, format!("must be 1 to {max} characters"))),
            None => Err(invalid(field, "is required and must be a string")),
        }
    };
    let order_id = text("order_id", 100)?;
    let customer_id = body
        .get("customer_id")
        .and_then(|v| v.as_i64())
        .filter(|v| *v > 0)
        .ok_or_else(|| invalid("customer_id", "must be a positive integer"))?;
    let name = text("customer_name", 200)?;
    let email = text("customer_email", 254)?;
    if !crate::email::valid_email(&email) {
        return Err(invalid("customer_email", "is not an email address"));
    }
    let (order_date, order_day) =
        import::parse_date(&text("order_date", 40)?).ok_or_else(|| invalid("order_date", "must be an ISO 8601 date or date-time"))?;
    let items = body
        .get("items")
        .and_then(|v| v.as_array())
        .filter(|a| !a.is_empty())
        .ok_or_else(|| invalid("items", "must be a non-empty array"))?;
    if items.len() > 1_000 {
        return Err(invalid("items", "at most 1000 items"));
    }
    let known: std::collections::HashSet<String> =
        conveyor.backend().query("SELECT sku FROM products", vec![]).await?.iter().filter_map(|r| r.text(0).map(str::to_string)).collect();
    let mut lines = Vec::new();
    for (i, it) in items.iter().enumerate() {
        let sku = it.get("sku").and_then(|v| v.as_str()).ok_or_else(|| invalid(format!("items[{i}].sku"), "is required"))?;
        if !known.contains(sku) {
            return Err(invalid(format!("items[{i}].sku"), format!("unknown SKU {sku:?}")));
        }
        let quantity = it
            .get("quantity")
            .and_then(|v| v.as_i64())
            .filter(|q| (1..=1_000_000).contains(q))
            .ok_or_else(|| invalid(format!("items[{i}].quantity"), "must be an integer from 1"))?;
        let price = match it.get("unit_price") {
            Some(serde_json::Value::Number(n)) => {
                money::parse_cents(&n.to_string()).map_err(|e| invalid(format!("items[{i}].unit_price"), e))?
            }
            Some(serde_json::Value::String(s)) => money::parse_cents(s).map_err(|e| invalid(format!("items[{i}].unit_price"), e))?,
            _ => return Err(invalid(format!("items[{i}].unit_price"), "must be a decimal number like 19.99")),
        };
        lines.push((sku.to_string(), quantity, price));
    }
    let mut total = 0i64;
    for (i, (_, q, p)) in lines.iter().enumerate() {
        total = money::add_line(total, *q, *p).ok_or_else(|| {
            invalid(format!("items[{i}]"), format!("the order's total would exceed {}", to_major(money::MAX_ORDER_CENTS)))
        })?;
    }
    let id = order_id.clone();
    let created = conveyor
        .backend()
        .transact(move |tx| {
            let n = tx.execute(
                "INSERT INTO orders (id, customer_id, status, total_cents, order_date, order_day, workflow_id, created_at)
                 VALUES ($1, $2, 'pending', $3, $4, $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                &[
                    id.clone().into(),
                    customer_id.into(),
                    total.into(),
                    order_date.into(),
                    order_day.into(),
                    workflow::workflow_id(&id).into(),
                    conveyor_core::clock::now_ms().into(),
                ],
            )?;
            if n == 0 {
                return Ok(false);
            }
            upsert_customer(tx, customer_id, &name, &email)?;
            for (i, (sku, q, p)) in lines.iter().enumerate() {
                tx.execute(
                    "INSERT INTO order_items (order_id, line, sku, quantity, unit_price_cents) VALUES ($1, $2, $3, $4, $5)",
                    &[id.clone().into(), (i as i64 + 1).into(), sku.as_str().into(), (*q).into(), (*p).into()],
                )?;
            }
            workflow::start_in(tx, &id)?;
            Ok(true)
        })
        .await?;
    if !created {
        return Err(CreateError::Exists(order_id));
    }
    let found = order(conveyor.backend().as_ref(), &order_id).await?;
    found.ok_or(CreateError::Store(BackendError::NotFound(order_id)))
}
