//! The order workflow: ReserveStock → ProcessPayment → FinalizeOrder, and RollbackOrder on any
//! failure. Each step commits its rows together with its job's acknowledgement
//! (`JobContext::complete_with`), so its effect happens once even when delivery repeats.
//!
//! - ReserveStock takes every item's quantity with one conditional update per SKU
//!   (`stock >= quantity`): stock never goes below zero, whatever the concurrency.
//! - ProcessPayment charges through the gateway with the order id as idempotency key.
//! - FinalizeOrder commits the reservations, completes the order, moves the leaderboards and
//!   invalidates the KPI cache, in one transaction.
//! - RollbackOrder releases what is still reserved, refunds a charge, and fails the order; it
//!   reads what to undo from the store, so it is right whichever step failed.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use conveyor_core::backend::{insert_many, BackendError, RowExt, SqlValue, Tx};
use conveyor_core::cache::{add_in, forget_prefix_in};
use conveyor_core::clock::now_ms;
use conveyor_core::workflow::{Starts, Workflow};
use conveyor_core::{JobContext, JobError, JobResult, NewJob, Registry};

use super::payment::PaymentGateway;
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

pub(crate) fn register(registry: &mut Registry, gateway: Arc<dyn PaymentGateway>) {
    registry.register(RESERVE, |o: OrderRef, ctx: JobContext| async move {
        let id = o.order_id.clone();
        match ctx.complete_with(move |tx| reserve(tx, &id)).await {
            // Out of stock: nothing was reserved (the step rolled back); the order fails as a
            // business outcome, not as a fault of the job.
            Err(BackendError::Invalid(reason)) => settle(ctx.decline(reason, |_| Ok(())).await),
            r => settle(r),
        }
    });
    let g = gateway.clone();
    registry.register(PAY, move |o: OrderRef, ctx: JobContext| {
        let g = g.clone();
        async move { pay(g, o, ctx).await }
    });
    registry.register(FINALIZE, |o: OrderRef, ctx: JobContext| async move {
        settle(ctx.complete_with(move |tx| finalize(tx, &o.order_id)).await)
    });
    registry.register(ROLLBACK, move |o: OrderRef, ctx: JobContext| {
        let g = gateway.clone();
        async move { rollback(g, o, ctx).await }
    });
}

/// Maps a transactional step's result to the job's: a rule the data breaks (no stock) fails the
/// order without retrying; a lost lease means another worker owns the job now.
fn settle(r: Result<(), BackendError>) -> JobResult {
    match r {
        Ok(()) | Err(BackendError::LeaseLost(_)) => Ok(()),
        Err(BackendError::Invalid(m)) => Err(JobError::abort(m)),
        Err(e) => Err(JobError::retry(e)),
    }
}

fn reserve(tx: &mut dyn Tx, order_id: &str) -> Result<(), BackendError> {
    let now = now_ms();
    // Only a pending order reserves: a step re-run later (say, retried from the failed store
    // after the order was rolled back) must not take stock that nothing would release.
    if !in_status(tx, order_id, "pending")? {
        return Ok(());
    }
    let items = tx.query("SELECT sku, sum(quantity) FROM order_items WHERE order_id = $1 GROUP BY sku ORDER BY sku", &[order_id.into()])?;
    tx.defer("UPDATE orders SET status = 'processing' WHERE id = $1 AND status = 'pending'", &[order_id.into()])?;
    let rows: Vec<Vec<SqlValue>> =
        items.iter().map(|it| vec![order_id.into(), it[0].clone(), it.int(1).into(), "reserved".into(), now.into()]).collect();
    insert_many(tx, "INSERT INTO stock_reservations (order_id, sku, quantity, status, updated_at)", &rows, "")?;
    // The products last, by SKU: concurrent orders hold these shared rows briefly and in one
    // order (no deadlocks).
    for it in &items {
        let (sku, qty) = (it.text(0).unwrap_or_default().to_string(), it.int(1));
        let taken = tx.execute(
            "UPDATE products SET stock = stock - $2, reserved = reserved + $2, updated_at = $3 WHERE sku = $1 AND stock >= $2",
            &[sku.clone().into(), qty.into(), now.into()],
        )?;
        if taken == 0 {
            // The whole step rolls back: nothing stays reserved for this order.
            return Err(BackendError::Invalid(format!("insufficient stock for {sku} (wanted {qty})")));
        }
    }
    Ok(())
}

async fn pay(gateway: Arc<dyn PaymentGateway>, o: OrderRef, ctx: JobContext) -> JobResult {
    let rows = ctx.backend().query("SELECT total_cents, status FROM orders WHERE id = $1", vec![o.order_id.clone().into()]).await?;
    let row = rows.first().ok_or_else(|| JobError::abort(format!("no order {}", o.order_id)))?;
    let total = row.int(0);
    if row.text(1) != Some("processing") {
        // Settled already (a re-run): charging now would take money for nothing.
        return settle(ctx.complete_with(|_| Ok(())).await);
    }
    let charge = gateway.charge(&o.order_id, total).await.map_err(JobError::retry)?;
    let (id, reference) = (o.order_id.clone(), charge.reference.clone());
    if charge.approved {
        return settle(ctx.complete_with(move |tx| record_payment(tx, &id, "charged", total, &reference)).await);
    }
    settle(ctx.decline("payment declined", move |tx| record_payment(tx, &id, "declined", total, &reference)).await)
}

/// Records a payment event once per (order, status); the order id is its idempotency key.
fn record_payment(tx: &mut dyn Tx, order_id: &str, status: &str, amount_cents: i64, reference: &str) -> Result<(), BackendError> {
    tx.defer(
        "INSERT INTO payments (order_id, status, amount_cents, reference, idempotency_key, created_at)
         VALUES ($1, $2, $3, $4, $1, $5) ON CONFLICT (order_id, status) DO NOTHING",
        &[order_id.into(), status.into(), amount_cents.into(), reference.into(), now_ms().into()],
    )?;
    Ok(())
}

fn in_status(tx: &mut dyn Tx, order_id: &str, status: &str) -> Result<bool, BackendError> {
    Ok(!tx.query("SELECT 1 FROM orders WHERE id = $1 AND status = $2", &[order_id.into(), status.into()])?.is_empty())
}

fn finalize(tx: &mut dyn Tx, order_id: &str) -> Result<(), BackendError> {
    let now = now_ms();
    let order = tx.query("SELECT customer_id, total_cents FROM orders WHERE id = $1 AND status = 'processing'", &[order_id.into()])?;
    let Some(order) = order.first() else { return Ok(()) };
    let (customer, total) = (order.int(0).to_string(), order.int(1));
    let held = tx.query(
        "SELECT sku, quantity FROM stock_reservations WHERE order_id = $1 AND status = 'reserved' ORDER BY sku",
        &[order_id.into()],
    )?;
    tx.defer(
        "UPDATE stock_reservations SET status = 'committed', updated_at = $2 WHERE order_id = $1 AND status = 'reserved'",
        &[order_id.into(), now.into()],
    )?;
    tx.defer("UPDATE orders SET status = 'completed', settled_at = $2 WHERE id = $1", &[order_id.into(), now.into()])?;
    let items = tx.query(
        "SELECT sku, sum(quantity), sum(quantity * unit_price_cents) FROM order_items WHERE order_id = $1 GROUP BY sku ORDER BY sku",
        &[order_id.into()],
    )?;
    // Rows many orders share (a product's stock, its leaderboard entries) come last and in one
    // order (by SKU), so concurrent orders hold them briefly and never deadlock.
    for r in &held {
        let (sku, qty) = (r.text(0).unwrap_or_default().to_string(), r.int(1));
        tx.defer("UPDATE products SET reserved = reserved - $2, updated_at = $3 WHERE sku = $1", &[sku.into(), qty.into(), now.into()])?;
    }
    add_in(tx, leaderboard::CUSTOMERS_SPENT, &customer, total as f64)?;
    add_in(tx, leaderboard::CUSTOMERS_ORDERS, &customer, 1.0)?;
    for it in &items {
        let sku = it.text(0).unwrap_or_default().to_string();
        add_in(tx, leaderboard::PRODUCTS_UNITS, &sku, it.int(1) as f64)?;
        add_in(tx, leaderboard::PRODUCTS_REVENUE, &sku, it.int(2) as f64)?;
    }
    forget_prefix_in(tx, KPI_CACHE_PREFIX)?;
    Ok(())
}

async fn rollback(gateway: Arc<dyn PaymentGateway>, o: OrderRef, ctx: JobContext) -> JobResult {
    // Always ask the gateway: a worker may have died after a charge was approved and before
    // its payment row was written, so the store alone cannot say whether money was taken.
    let refunded = gateway.refund(&o.order_id).await.map_err(JobError::retry)?;
    let total = ctx.backend().query("SELECT total_cents FROM orders WHERE id = $1", vec![o.order_id.clone().into()]).await?;
    // What was charged is the order's total (ProcessPayment charges exactly that).
    let charge = refunded.map(|c| (total.first().map_or(0, |r| r.int(0)), c.reference));
    let id = o.order_id.clone();
    settle(
        ctx.complete_with(move |tx| {
            let now = now_ms();
            let held = tx.query(
                "SELECT sku, quantity FROM stock_reservations WHERE order_id = $1 AND status = 'reserved' ORDER BY sku",
                &[id.as_str().into()],
            )?;
            tx.defer(
                "UPDATE stock_reservations SET status = 'released', updated_at = $2 WHERE order_id = $1 AND status = 'reserved'",
                &[id.as_str().into(), now.into()],
            )?;
            if let Some((amount, reference)) = &charge {
                // Both events: the charge (its row may be missing, see above) and the refund.
                record_payment(tx, &id, "charged", *amount, reference)?;
                record_payment(tx, &id, "refunded", *amount, reference)?;
            }
            tx.defer(
                "UPDATE orders SET status = 'failed', settled_at = $2 WHERE id = $1 AND status IN ('pending', 'processing')",
                &[id.as_str().into(), now.into()],
            )?;
            // The shared rows last, by SKU (see `reserve`).
            for r in &held {
                let (sku, qty) = (r.text(0).unwrap_or_default().to_string(), r.int(1));
                tx.defer(
                    "UPDATE products SET stock = stock + $2, reserved = reserved - $2, updated_at = $3 WHERE sku = $1",
                    &[sku.into(), qty.into(), now.into()],
                )?;
            }
            forget_prefix_in(tx, KPI_CACHE_PREFIX)?;
            Ok(())
        })
        .await,
    )
}
