//! One batch's transaction: its orders, items, customers and workflow starts written.

use super::*;

/// A batch of orders as the rows that store them and the workflows that settle them.
pub(super) struct OrderRows {
    pub(super) orders: Vec<ParsedOrder>,
    pub(super) rows: Vec<Vec<SqlValue>>,
    pub(super) items: Vec<Vec<SqlValue>>,
    pub(super) customers: Vec<Vec<SqlValue>>,
    pub(super) workflows: Starts,
}

impl OrderRows {
    pub(super) fn new(orders: Vec<ParsedOrder>, run: i64) -> Result<Self, BackendError> {
        let rows = orders
            .iter()
            .map(|o| {
                vec![
                    o.id.clone().into(),
                    o.customer_id.into(),
                    "pending".into(),
                    order_total(o).into(),
                    o.order_date.clone().into(),
                    o.order_day.clone().into(),
                    workflow::workflow_id(&o.id).into(),
                    run.into(),
                ]
            })
            .collect();
        let workflows = workflow::prepare_many(orders.iter().map(|o| o.id.as_str()))?;
        let mut this = OrderRows { orders, rows, items: Vec::new(), customers: Vec::new(), workflows };
        this.dependent_rows();
        Ok(this)
    }

    /// Items and customers of the orders kept (again after some were refused).
    pub(super) fn dependent_rows(&mut self) {
        self.items = self
            .orders
            .iter()
            .flat_map(|o| {
                o.lines.iter().enumerate().map(|(i, l)| {
                    vec![o.id.clone().into(), (i as i64 + 1).into(), l.sku.clone().into(), l.quantity.into(), l.unit_price.into()]
                })
            })
            .collect();
        // A customer once per statement (the last line's name and email win).
        let mut customers: HashMap<i64, (&str, &str)> = HashMap::new();
        for o in &self.orders {
            customers.insert(o.customer_id, (&o.customer_name, &o.customer_email));
        }
        let mut customers: Vec<(i64, (&str, &str))> = customers.into_iter().collect();
        customers.sort_by_key(|c| c.0);
        self.customers = customers.into_iter().map(|(id, (name, email))| vec![id.into(), name.into(), email.into()]).collect();
    }
}

/// Stores a batch of orders and starts their workflows; returns (stored, duplicates, the
/// lines of orders whose id this same run stored before — lines that were not contiguous —
/// and the rows, for the caller to drop outside the transaction).
pub(super) fn store_orders(tx: &mut dyn Tx, mut b: OrderRows, run: i64) -> Result<(u64, u64, Vec<Rejected>, OrderRows), BackendError> {
    let (mut duplicates, mut split) = (0, Vec::new());
    // One multi-row statement per table: an import batch is a handful of round trips.
    let mut inserted: HashSet<String> = insert_many(
        tx,
        "INSERT INTO orders (id, customer_id, status, total_cents, order_date, order_day, workflow_id, created_at)",
        &b.rows,
        "ON CONFLICT (id) DO NOTHING RETURNING id",
    )?
    .iter()
    .filter_map(|r| r.text(0).map(str::to_string))
    .collect();
    if inserted.len() < b.orders.len() {
        // An id twice in one batch (a split order) was inserted for its first lines only.
        let (stored, refused): (Vec<ParsedOrder>, Vec<ParsedOrder>) =
            std::mem::take(&mut b.orders).into_iter().partition(|o| inserted.remove(&o.id));
        for o in refused {
            // Already stored: by an earlier import (a duplicate) or earlier in this file (split).
            let same_run = tx.query("SELECT 1 FROM orders WHERE id = $1 AND created_at = $2", &[o.id.clone().into(), run.into()])?;
            if same_run.is_empty() {
                duplicates += 1;
            } else {
                for l in &o.line_numbers {
                    split.push(Rejected {
                        line: *l,
                        reason: format!("order_id: lines of order {} are not contiguous (it was stored from earlier lines)", o.id),
                    });
                }
            }
        }
        b.orders = stored;
        // The first of two same ids is the one stored: its workflow alone starts.
        let mut seen = HashSet::new();
        let first: Vec<bool> = b.workflows.ids().iter().map(|id| seen.insert(id.clone())).collect();
        let kept: HashSet<String> = b.orders.iter().map(|o| workflow::workflow_id(&o.id)).collect();
        let mut i = 0;
        b.workflows.retain(|id| {
            i += 1;
            first[i - 1] && kept.contains(id)
        });
        b.dependent_rows();
    }
    insert_many(tx, "INSERT INTO order_items (order_id, line, sku, quantity, unit_price_cents)", &b.items, "")?;
    b.workflows.start_in(tx)?;
    // The customers last (sorted by id): batches in flight together share customers, and the
    // upsert locks their rows until the commit, so the next batch writes everything else
    // before it waits for them.
    insert_many(
        tx,
        "INSERT INTO customers (id, name, email)",
        &b.customers,
        "ON CONFLICT (id) DO UPDATE SET name = excluded.name, email = excluded.email",
    )?;
    Ok((b.orders.len() as u64, duplicates, split, b))
}
