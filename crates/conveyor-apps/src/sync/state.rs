//! What a run writes in its jobs' transactions: the cursor, items, failures, audits, the last
//! pushed state per product and variant field, and the run's end.

use super::*;

/// The source position: products after `(after_ms, after_id)` are new; `since` is what the
/// source is asked for (its own text for the cursor's time).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub(super) struct Cursor {
    pub(super) since: String,
    pub(super) after_ms: i64,
    pub(super) after_id: String,
}

impl Cursor {
    pub(super) fn passes(&self, p: &Product) -> bool {
        p.key() > (self.after_ms, self.after_id.as_str())
    }
}

pub(super) fn hex_hash(text: &str) -> String {
    let d = Sha256::digest(text.as_bytes());
    d.iter().take(16).map(|b| format!("{b:02x}")).collect()
}

/// What the target should hold for a product, as one hash.
pub(super) fn product_hash(p: &Product) -> String {
    let mut v: Vec<String> = p.variants.iter().map(|v| format!("{}\t{}\t{}", v.sku, v.price_cents, v.stock)).collect();
    v.sort();
    hex_hash(&v.join("\n"))
}

pub(super) fn audit_rows(tx: &mut dyn Tx, run_id: Option<&str>, audits: &[Audit]) -> Result<(), BackendError> {
    let rows: Vec<Vec<SqlValue>> = audits
        .iter()
        .map(|a| {
            vec![
                run_id.map(str::to_string).into(),
                a.partner.into(),
                a.method.into(),
                a.url.clone().into(),
                a.status.map(|s| s as i64).into(),
                a.duration_ms.into(),
                a.error.clone().into(),
                a.at.into(),
            ]
        })
        .collect();
    insert_many(tx, "INSERT INTO sync_requests (run_id, partner, method, url, status, duration_ms, error, at)", &rows, "")?;
    Ok(())
}

/// A failure kept for replay; the same (run, stage, product) is one row whose retries count up.
pub(super) fn record_failure(
    tx: &mut dyn Tx,
    run_id: &str,
    stage: &str,
    product_id: Option<&str>,
    error: &str,
    payload: &str,
) -> Result<(), BackendError> {
    let id =
        hex_hash(&format!("{run_id}\n{stage}\n{}\n{}", product_id.unwrap_or_default(), if product_id.is_none() { payload } else { "" }));
    tx.execute(
        "INSERT INTO sync_failures (id, run_id, stage, product_id, error, payload, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (id) DO UPDATE SET error = excluded.error, payload = excluded.payload, retries = sync_failures.retries + 1, resolved_at = NULL",
        &[id.into(), run_id.into(), stage.into(), product_id.map(str::to_string).into(), error.into(), payload.into(), now_ms().into()],
    )?;
    Ok(())
}

pub(super) fn set_item(tx: &mut dyn Tx, run_id: &str, product: &Product, outcome: &str, changed: bool) -> Result<(), BackendError> {
    tx.execute(
        "INSERT INTO sync_items (run_id, product_id, outcome, changed, since, updated_ms, at) VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (run_id, product_id) DO UPDATE SET outcome = excluded.outcome, changed = CASE WHEN excluded.changed = 1 THEN 1 ELSE sync_items.changed END, at = excluded.at",
        &[
            run_id.into(),
            product.id.clone().into(),
            outcome.into(),
            (changed as i64).into(),
            product.updated_at.clone().into(),
            product.updated_ms.into(),
            now_ms().into(),
        ],
    )?;
    Ok(())
}

/// One change to send: a field of a variant, and the key that makes sending it twice harmless.
#[derive(Clone, Debug)]
pub(super) struct Change {
    pub(super) sku: String,
    pub(super) field: Field,
    pub(super) value: i64,
    pub(super) key: String,
}

pub(super) fn read_cursor(tx: &mut dyn Tx) -> Result<Option<Cursor>, BackendError> {
    let rows = tx.query("SELECT since, after_ms, after_id FROM sync_cursor WHERE name = 'products'", &[])?;
    Ok(rows.first().map(|r| Cursor {
        since: r.text(0).unwrap_or_default().into(),
        after_ms: r.int(1),
        after_id: r.text(2).unwrap_or_default().into(),
    }))
}

pub(super) fn write_cursor(tx: &mut dyn Tx, c: &Cursor) -> Result<(), BackendError> {
    tx.execute(
        "INSERT INTO sync_cursor (name, since, after_ms, after_id, updated_at) VALUES ('products', $1, $2, $3, $4)
         ON CONFLICT (name) DO UPDATE SET since = excluded.since, after_ms = excluded.after_ms, after_id = excluded.after_id, updated_at = excluded.updated_at",
        &[c.since.clone().into(), c.after_ms.into(), c.after_id.clone().into(), now_ms().into()],
    )?;
    Ok(())
}

/// A page's effects, in its job's acknowledgement: failures, unchanged items, push jobs, the
/// next page, the cursor and the audit row.
pub(super) fn apply_page(
    cv: &Conveyor,
    tx: &mut dyn Tx,
    job: PageJob,
    page: connector::SourcePage,
    audit: Audit,
    max: u32,
) -> Result<(), BackendError> {
    let run = tx.query("SELECT status FROM sync_runs WHERE id = $1", &[job.run_id.clone().into()])?;
    if run.first().and_then(|r| r.text(0)) != Some("running") {
        return Ok(());
    }
    audit_rows(tx, Some(&job.run_id), &[audit])?;
    let run_id = job.run_id.as_str();
    for b in &page.bad {
        let pid = b.id.clone().unwrap_or_else(|| format!("#{}", hex_hash(&b.raw.to_string())));
        let error = format!("record {}: {}", b.id.as_deref().unwrap_or("without id"), b.reason);
        record_failure(tx, run_id, "record", Some(&pid), &error, &b.raw.to_string())?;
        let placeholder =
            Product { id: pid, sku: String::new(), title: String::new(), updated_at: String::new(), updated_ms: 0, variants: vec![] };
        set_item(tx, run_id, &placeholder, "failed", false)?;
    }
    let fresh: Vec<Product> = page.products.into_iter().filter(|p| job.cursor.as_ref().is_none_or(|c| c.passes(p))).collect();
    let mut stored: HashMap<String, String> = HashMap::new();
    if !fresh.is_empty() {
        let ids: Vec<SqlValue> = fresh.iter().map(|p| p.id.clone().into()).collect();
        let sql = format!("SELECT id, hash FROM sync_products WHERE id IN ({})", placeholders(1, ids.len()));
        stored = tx
            .query(&sql, &ids)?
            .iter()
            .map(|r| (r.text(0).unwrap_or_default().to_string(), r.text(1).unwrap_or_default().to_string()))
            .collect();
    }
    let mut jobs = Vec::new();
    let mut items = Vec::new();
    let now = now_ms();
    let new_cursor = fresh.iter().max_by(|a, b| a.key().cmp(&b.key())).map(|p| Cursor {
        since: p.updated_at.clone(),
        after_ms: p.updated_ms,
        after_id: p.id.clone(),
    });
    for p in fresh {
        let changed = stored.get(&p.id) != Some(&product_hash(&p));
        items.push(vec![
            run_id.into(),
            p.id.clone().into(),
            (if changed { "pending" } else { "unchanged" }).into(),
            (changed as i64).into(),
            p.updated_at.clone().into(),
            p.updated_ms.into(),
            now.into(),
        ]);
        if changed {
            cv.emit_in(tx, Event::new(PRODUCT_CHANGED, &json!({ "run_id": run_id, "product_id": p.id, "sku": p.sku })))?;
            jobs.push(push_job(run_id, p, max));
        }
    }
    insert_many(
        tx,
        "INSERT INTO sync_items (run_id, product_id, outcome, changed, since, updated_ms, at)",
        &items,
        "ON CONFLICT (run_id, product_id) DO UPDATE SET outcome = excluded.outcome, changed = excluded.changed, since = excluded.since, updated_ms = excluded.updated_ms, at = excluded.at",
    )?;
    if page.has_more {
        // Keyset paging: from the newest product read, page 1 again; within a run of equal
        // times that fills whole pages, the next page number.
        let next = match &new_cursor {
            Some(c) => PageJob { run_id: run_id.into(), batch_id: job.batch_id.clone(), page: 1, cursor: Some(c.clone()) },
            None => PageJob { run_id: run_id.into(), batch_id: job.batch_id.clone(), page: job.page + 1, cursor: job.cursor.clone() },
        };
        jobs.push(page_job(&next, max));
    }
    if let Some(c) = &new_cursor {
        let ahead = match read_cursor(tx)? {
            Some(old) => (c.after_ms, c.after_id.as_str()) > (old.after_ms, old.after_id.as_str()),
            None => true,
        };
        if ahead {
            write_cursor(tx, c)?;
        }
    }
    tx.execute(
        "UPDATE sync_runs SET pages = pages + 1, cursor = $2 WHERE id = $1",
        &[run_id.into(), new_cursor.as_ref().or(job.cursor.as_ref()).map(|c| serde_json::to_string(c).unwrap_or_default()).into()],
    )?;
    if !jobs.is_empty() {
        batch::add_jobs_in(tx, &job.batch_id, jobs)?;
    }
    Ok(())
}

/// What was sent is what the target now has: per variant and field.
pub(super) fn remember(tx: &mut dyn Tx, product: &Product, done: &[Change]) -> Result<(), BackendError> {
    if done.is_empty() {
        return Ok(());
    }
    let mut by_sku: Vec<(String, Option<i64>, Option<i64>)> = Vec::new();
    for c in done {
        let i = match by_sku.iter().position(|(s, ..)| *s == c.sku) {
            Some(i) => i,
            None => {
                by_sku.push((c.sku.clone(), None, None));
                by_sku.len() - 1
            }
        };
        match c.field {
            Field::Price => by_sku[i].1 = Some(c.value),
            Field::Stock => by_sku[i].2 = Some(c.value),
        }
    }
    let now = now_ms();
    let rows: Vec<Vec<SqlValue>> = by_sku
        .into_iter()
        .map(|(sku, price, stock)| vec![sku.into(), product.id.clone().into(), price.into(), stock.into(), now.into()])
        .collect();
    insert_many(
        tx,
        "INSERT INTO sync_variants (sku, product_id, price_cents, stock, pushed_at)",
        &rows,
        "ON CONFLICT (sku) DO UPDATE SET price_cents = COALESCE(excluded.price_cents, sync_variants.price_cents),
                                         stock = COALESCE(excluded.stock, sync_variants.stock), pushed_at = excluded.pushed_at",
    )?;
    Ok(())
}

/// A product fully in step with the target: its hash, its item, its audit rows, and any
/// failure it had is resolved.
pub(super) fn settle(
    tx: &mut dyn Tx,
    run_id: &str,
    product: &Product,
    done: &[Change],
    audits: &[Audit],
    outcome: &str,
) -> Result<(), BackendError> {
    remember(tx, product, done)?;
    tx.execute(
        "INSERT INTO sync_products (id, hash, pushed_at) VALUES ($1, $2, $3)
         ON CONFLICT (id) DO UPDATE SET hash = excluded.hash, pushed_at = excluded.pushed_at",
        &[product.id.clone().into(), product_hash(product).into(), now_ms().into()],
    )?;
    set_item(tx, run_id, product, outcome, false)?;
    if !audits.is_empty() {
        audit_rows(tx, Some(run_id), audits)?;
    }
    tx.execute(
        "UPDATE sync_failures SET resolved_at = $2 WHERE product_id = $1 AND resolved_at IS NULL",
        &[product.id.clone().into(), now_ms().into()],
    )?;
    Ok(())
}

/// The batch's `finally`: the run's status and counts, the `sync.run_finished` event, and for
/// a cancelled run the cursor moved back to its first product not pushed.
pub(super) fn finish(cv: &Conveyor, tx: &mut dyn Tx, run_id: &str) -> Result<(), BackendError> {
    let rows = tx.query("SELECT status, batch_id FROM sync_runs WHERE id = $1", &[run_id.into()])?;
    let Some(r) = rows.first() else { return Ok(()) };
    let (status, batch_id) = (r.text(0).unwrap_or_default().to_string(), r.text(1).unwrap_or_default().to_string());
    let counts = live_counts(&tx.query(COUNT_SQL, &[run_id.into()])?);
    let cancelled =
        tx.query("SELECT cancelled_at FROM batches WHERE id = $1", &[batch_id.into()])?.first().and_then(|r| r.opt_int(0)).is_some();
    let page_failed =
        tx.query("SELECT error FROM sync_failures WHERE run_id = $1 AND stage = 'page' AND resolved_at IS NULL", &[run_id.into()])?;
    let (new_status, error) = if status != "running" {
        (status.clone(), None)
    } else if cancelled {
        ("cancelled".to_string(), None)
    } else if let Some(e) = page_failed.first() {
        ("failed".to_string(), e.text(0).map(str::to_string))
    } else if counts.failed > 0 {
        ("completed_with_failures".to_string(), None)
    } else {
        ("completed".to_string(), None)
    };
    tx.execute(
        "UPDATE sync_runs SET status = $2, finished_at = COALESCE(finished_at, $3), error = COALESCE(error, $4),
                seen = $5, changed = $6, pushed = $7, unchanged = $8, failed = $9 WHERE id = $1",
        &[
            run_id.into(),
            new_status.clone().into(),
            now_ms().into(),
            error.into(),
            (counts.seen as i64).into(),
            (counts.changed as i64).into(),
            (counts.pushed as i64).into(),
            (counts.unchanged as i64).into(),
            (counts.failed as i64).into(),
        ],
    )?;
    if new_status == "cancelled" {
        // Products read but not pushed (their jobs were skipped) must be read again: the next
        // run starts just before the first of them.
        let first = tx.query(
            "SELECT since, updated_ms FROM sync_items WHERE run_id = $1 AND outcome = 'pending' ORDER BY updated_ms, product_id LIMIT 1",
            &[run_id.into()],
        )?;
        if let Some(f) = first.first() {
            write_cursor(tx, &Cursor { since: f.text(0).unwrap_or_default().into(), after_ms: f.int(1), after_id: String::new() })?;
        }
    }
    if new_status.starts_with("completed") {
        tx.execute("UPDATE sync_failures SET resolved_at = $1 WHERE stage = 'page' AND resolved_at IS NULL", &[now_ms().into()])?;
    }
    cv.emit_in(tx, Event::new(RUN_FINISHED, &json!({ "run_id": run_id, "status": new_status, "counts": counts })))?;
    Ok(())
}
