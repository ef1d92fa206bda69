//! The order workflow: ReserveStock → ProcessPayment → FinalizeOrder, and RollbackOrder on any
//! failure. Each step commits its rows together with its job's acknowledgement, so its effect
//! happens once even when delivery repeats. The steps are set-wise
//! ([`conveyor_core::setwise`]): the orders whose step ends while another set's transaction runs
//! are settled together by the next one, a few statements for all of them.
//!
//! - ReserveStock locks the set's products (by SKU) and reads their stock, then takes each
//!   order's items in full or declines the order (out of stock): stock never goes below zero,
//!   whatever the concurrency.
//! - ProcessPayment charges through the gateway with the order id as idempotency key (one call
//!   per order), then records the payments of the set.
//! - FinalizeOrder commits the reservations, completes the orders, moves the leaderboards and
//!   invalidates the KPI cache, in one transaction.
//! - RollbackOrder releases what is still reserved, refunds a charge, and fails the order; it
//!   reads what to undo from the store, so it is right whichever step failed.
//!
//! Shared rows (a product's stock, a leaderboard entry) are taken last and in one order (by
//! SKU, by member), so concurrent sets never deadlock.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use std::collections::{BTreeMap, HashMap, HashSet};

use conveyor_core::backend::{in_list, insert_many, padded, BackendError, Row, RowExt, SqlValue, Tx};
use conveyor_core::cache::{add_many_in, forget_prefix_in};
use conveyor_core::clock::now_ms;
use conveyor_core::setwise::{Entry, SetWise, Settled};
use conveyor_core::workflow::{Starts, Workflow};
use conveyor_core::{JobContext, JobError, JobResult, NewJob, Registry};

use super::payment::PaymentGateway;
use super::totals::Totals;
use super::{leaderboard, KPI_CACHE_PREFIX, QUEUE};

pub const RESERVE: &str = "orders.reserve_stock";
pub const PAY: &str = "orders.process_payment";
pub const FINALIZE: &str = "orders.finalize";
pub const ROLLBACK: &str = "orders.rollback";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OrderRef {
    pub order_id: String,
}

/// The workflow id of an order, stored with the order in the statement that creates it.
pub(crate) fn workflow_id(order_id: &str) -> String {
    format!("order-{order_id}")
}

/// The order workflow's definition, built once: every order's workflow shares its stored plan
/// and gets the order as input.
fn definition() -> &'static Workflow {
    static DEF: std::sync::OnceLock<Workflow> = std::sync::OnceLock::new();
    DEF.get_or_init(|| {
        let job = |kind: &str| NewJob::new(kind, &()).queue(QUEUE).max_attempts(5);
        Workflow::new("order")
            .step("ReserveStock", job(RESERVE))
            .step("ProcessPayment", job(PAY))
            .step("FinalizeOrder", job(FINALIZE))
            .on_failure("RollbackOrder", job(ROLLBACK).max_attempts(10))
    })
}

fn instance(order_id: &str) -> Workflow {
    definition().clone().id(workflow_id(order_id)).input(&OrderRef { order_id: order_id.to_string() })
}

/// Starts an order's workflow inside the transaction that stores the order.
pub(crate) fn start_in(tx: &mut dyn Tx, order_id: &str) -> Result<String, BackendError> {
    instance(order_id).start_in(tx)
}

/// The workflows of many orders (an import batch), built before the transaction that starts
/// them.
pub(crate) fn prepare_many<'a>(order_ids: impl Iterator<Item = &'a str>) -> Result<Starts, BackendError> {
    Workflow::prepare_many(order_ids.map(instance).collect())
}

/// Orders settled by one set-wise transaction at most. Large: with many workers (a settle run
/// at 2,048), sets of 1,024 cost PostgreSQL a fifth less CPU per order than sets of 256, and
/// the products' rows, which every set locks, are taken by fewer transactions.
const SET: usize = 1024;

/// A payment to record: the gateway's answer for an order.
#[derive(Clone)]
struct Paid {
    order_id: String,
    approved: bool,
    amount_cents: i64,
    reference: String,
}

/// An order to roll back, with the charge the gateway refunded (amount, reference), if any.
#[derive(Clone)]
struct Undo {
    order_id: String,
    refunded: Option<(i64, String)>,
}

pub(crate) fn register(registry: &mut Registry, gateway: Arc<dyn PaymentGateway>) {
    let reserve = SetWise::new(SET, reserve_set);
    registry.register(RESERVE, move |o: OrderRef, ctx: JobContext| {
        let set = reserve.clone();
        async move { settle(ctx.complete_in(&set, o.order_id).await) }
    });
    let totals = Totals::new();
    let (g, t, record) = (gateway.clone(), totals.clone(), SetWise::new(SET, record_payments));
    registry.register(PAY, move |o: OrderRef, ctx: JobContext| {
        let (g, t, set) = (g.clone(), t.clone(), record.clone());
        async move { pay(g, t, o, ctx, set).await }
    });
    let finalize = SetWise::new(SET, finalize_set);
    registry.register(FINALIZE, move |o: OrderRef, ctx: JobContext| {
        let set = finalize.clone();
        async move { settle(ctx.complete_in(&set, o.order_id).await) }
    });
    let undo = SetWise::new(SET, rollback_set);
    registry.register(ROLLBACK, move |o: OrderRef, ctx: JobContext| {
        let (g, t, set) = (gateway.clone(), totals.clone(), undo.clone());
        async move { rollback(g, t, o, ctx, set).await }
    });
}

/// Maps a transactional step's result to the job's: a declined order (no stock, payment
/// declined) completes its job, its workflow fails; a rule the data breaks fails the job
/// without retrying; a lost lease means another worker owns the job now.
fn settle(r: Result<Settled, BackendError>) -> JobResult {
    match r {
        Ok(Settled::Completed) | Err(BackendError::LeaseLost(_)) => Ok(()),
        Ok(Settled::Declined(reason)) => {
            tracing::info!(%reason, "order declined: a business outcome, not a fault");
            Ok(())
        }
        Err(BackendError::Invalid(m)) => Err(JobError::abort(m)),
        Err(e) => Err(JobError::retry(e)),
    }
}

/// The distinct order ids of a set, in its order.
fn order_ids<I>(entries: &[Entry<I>], id: impl Fn(&I) -> &str) -> Vec<String> {
    let mut seen = HashSet::new();
    entries.iter().map(|e| id(&e.item)).filter(|i| seen.insert(*i)).map(str::to_string).collect()
}

/// `sql` with `{ids}` replaced by an `IN` list of `ids` ([`in_list`]), after the parameters
/// `before`.
fn in_ids(sql: &str, before: Vec<SqlValue>, ids: &[String]) -> (String, Vec<SqlValue>) {
    let (marks, values) = in_list(before.len() + 1, ids.iter().map(|i| SqlValue::from(i.as_str())));
    let mut params = before;
    params.extend(values);
    (sql.replace("{ids}", &marks), params)
}

/// Reads with [`in_ids`].
fn with_ids(tx: &mut dyn Tx, sql: &str, before: Vec<SqlValue>, ids: &[String]) -> Result<Vec<Row>, BackendError> {
    let (sql, params) = in_ids(sql, before, ids);
    tx.query(&sql, &params)
}

/// Writes with [`in_ids`], without waiting for the answer ([`Tx::defer`]).
fn defer_ids(tx: &mut dyn Tx, sql: &str, before: Vec<SqlValue>, ids: &[String]) -> Result<(), BackendError> {
    let (sql, params) = in_ids(sql, before, ids);
    tx.defer(&sql, &params)
}

/// `UPDATE products` of many SKUs in one statement: `set` is the assignments with `{q}` for
/// each SKU's quantity (a `CASE` on the SKU). The rows are locked first, in SKU order.
fn update_products(tx: &mut dyn Tx, set: &str, quantities: &BTreeMap<String, i64>, now: i64) -> Result<(), BackendError> {
    if quantities.is_empty() {
        return Ok(());
    }
    let skus: Vec<String> = quantities.keys().cloned().collect();
    lock_products(tx, &skus)?;
    let mut params: Vec<SqlValue> = vec![now.into()];
    let mut case = String::from("CASE sku");
    // Padded like the `IN` list (a repeated arm changes nothing).
    let last = quantities.iter().next_back().expect("not empty");
    for (sku, q) in quantities.iter().chain(std::iter::repeat(last)).take(padded(quantities.len())) {
        case.push_str(&format!(" WHEN ${} THEN CAST(${} AS BIGINT)", params.len() + 1, params.len() + 2));
        params.push(sku.as_str().into());
        params.push((*q).into());
    }
    case.push_str(" END");
    let (marks, values) = in_list(params.len() + 1, skus.iter().map(|s| SqlValue::from(s.as_str())));
    let sql = format!("UPDATE products SET {}, updated_at = $1 WHERE sku IN ({marks})", set.replace("{q}", &case));
    params.extend(values);
    tx.defer(&sql, &params)
}

/// The orders' rows (id, status, then `cols`), locked (in id order) where transactions run side
/// by side: the statuses read hold until the commit. Only the primary key selects them, so the
/// plan never depends on how many orders have which status.
fn lock_orders(tx: &mut dyn Tx, ids: &[String], cols: &str) -> Result<Vec<Row>, BackendError> {
    let sql = format!("SELECT id, status{cols} FROM orders WHERE id IN ({{ids}}) ORDER BY id{}", tx.for_update());
    with_ids(tx, &sql, vec![], ids)
}

/// Ends what the orders still hold reserved (`to`: `committed` or `released`); returns the
/// quantities by SKU.
fn end_reservations(tx: &mut dyn Tx, ids: &[String], to: &str, now: i64) -> Result<BTreeMap<String, i64>, BackendError> {
    let rows = with_ids(tx, "SELECT sku, quantity, status FROM stock_reservations WHERE order_id IN ({ids})", vec![], ids)?;
    let mut by_sku = BTreeMap::new();
    for r in rows.iter().filter(|r| r.text(2) == Some("reserved")) {
        *by_sku.entry(r.text(0).unwrap_or_default().to_string()).or_insert(0) += r.int(1);
    }
    defer_ids(
        tx,
        "UPDATE stock_reservations SET status = $1, updated_at = $2 WHERE status = 'reserved' AND order_id IN ({ids})",
        vec![to.into(), now.into()],
        ids,
    )?;
    Ok(by_sku)
}

/// Locks the products' rows in SKU order (where transactions run side by side) and returns
/// their stock.
fn lock_products(tx: &mut dyn Tx, skus: &[String]) -> Result<HashMap<String, i64>, BackendError> {
    let sql = format!("SELECT sku, stock FROM products WHERE sku IN ({{ids}}) ORDER BY sku{}", tx.for_update());
    Ok(with_ids(tx, &sql, vec![], skus)?.iter().map(|r| (r.text(0).unwrap_or_default().to_string(), r.int(1))).collect())
}

/// ReserveStock for a set: each pending order takes all its items or, when one is short,
/// nothing (declined with the first short SKU).
fn reserve_set(tx: &mut dyn Tx, entries: &mut [Entry<String>]) -> Result<(), BackendError> {
    let now = now_ms();
    // Only a pending order reserves: a step re-run later (say, retried from the failed store
    // after the order was rolled back) must not take stock that nothing would release.
    let ids = order_ids(entries, |i| i);
    let pending: Vec<String> =
        lock_orders(tx, &ids, "")?.iter().filter(|r| r.text(1) == Some("pending")).filter_map(|r| r.text(0).map(str::to_string)).collect();
    if pending.is_empty() {
        return Ok(());
    }
    let mut lines: HashMap<String, Vec<(String, i64)>> = HashMap::new();
    let mut skus = std::collections::BTreeSet::new();
    for r in with_ids(
        tx,
        "SELECT order_id, sku, sum(quantity) FROM order_items WHERE order_id IN ({ids}) GROUP BY order_id, sku ORDER BY order_id, sku",
        vec![],
        &pending,
    )? {
        let sku = r.text(1).unwrap_or_default().to_string();
        skus.insert(sku.clone());
        lines.entry(r.text(0).unwrap_or_default().to_string()).or_default().push((sku, r.int(2)));
    }
    let mut stock = lock_products(tx, &skus.into_iter().collect::<Vec<_>>())?;
    let pending: HashSet<String> = pending.into_iter().collect();
    let (mut taken, mut reserved, mut rows) = (HashSet::new(), BTreeMap::new(), Vec::new());
    for e in entries.iter_mut() {
        if !pending.contains(&e.item) || taken.contains(&e.item) {
            continue;
        }
        let wanted = lines.get(&e.item).map(Vec::as_slice).unwrap_or_default();
        if let Some((sku, qty)) = wanted.iter().find(|(sku, qty)| stock.get(sku).copied().unwrap_or(0) < *qty) {
            e.decline(format!("insufficient stock for {sku} (wanted {qty})"));
            continue;
        }
        for (sku, qty) in wanted {
            *stock.get_mut(sku).expect("a SKU with stock") -= qty;
            *reserved.entry(sku.clone()).or_insert(0) += qty;
            rows.push(vec![e.item.as_str().into(), sku.as_str().into(), (*qty).into(), "reserved".into(), now.into()]);
        }
        taken.insert(e.item.clone());
    }
    if taken.is_empty() {
        return Ok(());
    }
    let taken: Vec<String> = taken.into_iter().collect();
    defer_ids(tx, "UPDATE orders SET status = 'processing' WHERE id IN ({ids})", vec![], &taken)?;
    insert_many(tx, "INSERT INTO stock_reservations (order_id, sku, quantity, status, updated_at)", &rows, "")?;
    update_products(tx, "stock = stock - {q}, reserved = reserved + {q}", &reserved, now)
}

async fn pay(gateway: Arc<dyn PaymentGateway>, totals: Arc<Totals>, o: OrderRef, ctx: JobContext, set: SetWise<Paid>) -> JobResult {
    let order = totals.get(ctx.backend(), &o.order_id).await?.ok_or_else(|| JobError::abort(format!("no order {}", o.order_id)))?;
    let total = order.total_cents;
    if order.status != "processing" {
        // Settled already (a re-run): charging now would take money for nothing.
        return settle(ctx.complete_with(|_| Ok(())).await.map(|()| Settled::Completed));
    }
    let charge = gateway.charge(&o.order_id, total).await.map_err(JobError::retry)?;
    let paid = Paid { order_id: o.order_id, approved: charge.approved, amount_cents: total, reference: charge.reference };
    settle(ctx.complete_in(&set, paid).await)
}

/// ProcessPayment for a set: one payment event per order, once per (order, status) — the order
/// id is its idempotency key; a declined payment declines its order.
fn record_payments(tx: &mut dyn Tx, entries: &mut [Entry<Paid>]) -> Result<(), BackendError> {
    let mut rows = Vec::new();
    for e in entries.iter_mut() {
        let p = &e.item;
        let status = if p.approved { "charged" } else { "declined" };
        rows.push(payment_row(&p.order_id, status, p.amount_cents, &p.reference));
        if !p.approved {
            e.decline("payment declined");
        }
    }
    record_payment_rows(tx, rows)
}

fn payment_row(order_id: &str, status: &str, amount_cents: i64, reference: &str) -> Vec<SqlValue> {
    vec![order_id.into(), status.into(), amount_cents.into(), reference.into(), order_id.into(), now_ms().into()]
}

/// Records payment events; an event already recorded for its (order, status) stays as it is.
fn record_payment_rows(tx: &mut dyn Tx, mut rows: Vec<Vec<SqlValue>>) -> Result<(), BackendError> {
    // One row per (order, status) in a statement.
    let mut seen = HashSet::new();
    rows.retain(|r| seen.insert((r[0].as_str().map(str::to_string), r[1].as_str().map(str::to_string))));
    insert_many(
        tx,
        "INSERT INTO payments (order_id, status, amount_cents, reference, idempotency_key, created_at)",
        &rows,
        "ON CONFLICT (order_id, status) DO NOTHING",
    )
    .map(|_| ())
}

/// FinalizeOrder for a set: the processing orders' reservations committed, the orders
/// completed, the leaderboards moved and the KPI cache invalidated.
fn finalize_set(tx: &mut dyn Tx, entries: &mut [Entry<String>]) -> Result<(), BackendError> {
    let now = now_ms();
    let ids = order_ids(entries, |i| i);
    let orders: Vec<Row> =
        lock_orders(tx, &ids, ", customer_id, total_cents")?.into_iter().filter(|r| r.text(1) == Some("processing")).collect();
    if orders.is_empty() {
        return Ok(());
    }
    let active: Vec<String> = orders.iter().map(|r| r.text(0).unwrap_or_default().to_string()).collect();
    let reserved = end_reservations(tx, &active, "committed", now)?;
    defer_ids(tx, "UPDATE orders SET status = 'completed', settled_at = $1 WHERE id IN ({ids})", vec![now.into()], &active)?;
    let items = with_ids(
        tx,
        "SELECT sku, sum(quantity), sum(quantity * unit_price_cents) FROM order_items WHERE order_id IN ({ids}) GROUP BY sku",
        vec![],
        &active,
    )?;
    update_products(tx, "reserved = reserved - {q}", &reserved, now)?;
    let customers: Vec<(String, f64)> = orders.iter().map(|r| (r.int(2).to_string(), r.int(3) as f64)).collect();
    let skus: Vec<(String, f64, f64)> =
        items.iter().map(|r| (r.text(0).unwrap_or_default().to_string(), r.int(1) as f64, r.int(2) as f64)).collect();
    let mut increments: Vec<(&str, &str, f64)> = Vec::new();
    for (customer, total) in &customers {
        increments.push((leaderboard::CUSTOMERS_SPENT, customer, *total));
        increments.push((leaderboard::CUSTOMERS_ORDERS, customer, 1.0));
    }
    for (sku, units, revenue) in &skus {
        increments.push((leaderboard::PRODUCTS_UNITS, sku, *units));
        increments.push((leaderboard::PRODUCTS_REVENUE, sku, *revenue));
    }
    add_many_in(tx, &increments)?;
    forget_prefix_in(tx, KPI_CACHE_PREFIX)
}

async fn rollback(gateway: Arc<dyn PaymentGateway>, totals: Arc<Totals>, o: OrderRef, ctx: JobContext, set: SetWise<Undo>) -> JobResult {
    // Always ask the gateway: a worker may have died after a charge was approved and before
    // its payment row was written, so the store alone cannot say whether money was taken.
    let refunded = gateway.refund(&o.order_id).await.map_err(JobError::retry)?;
    // What was charged is the order's total (ProcessPayment charges exactly that); read only
    // when something was refunded.
    let refunded = match refunded {
        Some(c) => Some((totals.get(ctx.backend(), &o.order_id).await?.map_or(0, |t| t.total_cents), c.reference)),
        None => None,
    };
    settle(ctx.complete_in(&set, Undo { order_id: o.order_id, refunded }).await)
}

/// RollbackOrder for a set: what is still reserved released, refunds recorded, the orders
/// failed and the KPI cache invalidated.
fn rollback_set(tx: &mut dyn Tx, entries: &mut [Entry<Undo>]) -> Result<(), BackendError> {
    let now = now_ms();
    let ids = order_ids(entries, |u| &u.order_id);
    let open: Vec<String> = lock_orders(tx, &ids, "")?
        .iter()
        .filter(|r| matches!(r.text(1), Some("pending" | "processing")))
        .filter_map(|r| r.text(0).map(str::to_string))
        .collect();
    let released = end_reservations(tx, &ids, "released", now)?;
    let mut payments = Vec::new();
    for e in entries.iter() {
        if let Some((amount, reference)) = &e.item.refunded {
            // Both events: the charge (its row may be missing, see `rollback`) and the refund.
            payments.push(payment_row(&e.item.order_id, "charged", *amount, reference));
            payments.push(payment_row(&e.item.order_id, "refunded", *amount, reference));
        }
    }
    record_payment_rows(tx, payments)?;
    if !open.is_empty() {
        defer_ids(tx, "UPDATE orders SET status = 'failed', settled_at = $1 WHERE id IN ({ids})", vec![now.into()], &open)?;
    }
    update_products(tx, "stock = stock + {q}, reserved = reserved - {q}", &released, now)?;
    forget_prefix_in(tx, KPI_CACHE_PREFIX)
}
