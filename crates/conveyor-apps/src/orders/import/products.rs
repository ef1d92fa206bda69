//! The product catalogue import.

use super::*;

/// Creates or updates products from CSV `sku,name,price,stock` (stock sets what can be sold).
pub async fn import_products<R: Read + Send + 'static>(conveyor: &Conveyor, input: R) -> Result<ImportReport, ImportError> {
    let parsed = tokio::task::spawn_blocking(move || -> Result<(Vec<NewProduct>, ImportReport), ImportError> {
        let mut rdr = reader(input);
        let headers = rdr.headers().map_err(|e| ImportError::Read(e.to_string()))?.clone();
        let cols = columns(&headers, &PRODUCT_COLUMNS)?;
        let mut report = ImportReport::default();
        let mut rejected = Rejections::default();
        let mut products = Vec::new();
        for rec in rdr.records() {
            report.rows += 1;
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    rejected.push(Rejected { line: e.position().map_or(0, |p| p.line()), reason: format!("line: {e}") });
                    continue;
                }
            };
            let line = rec.position().map_or(report.rows + 1, |p| p.line());
            let f = |n: &str| rec.get(cols[n]).unwrap_or("").trim().to_string();
            let sku = f("sku");
            let name = f("name");
            let check = || -> Result<(i64, i64), String> {
                if sku.is_empty() || sku.len() > 100 {
                    return Err("sku: must be 1 to 100 characters".into());
                }
                if name.is_empty() {
                    return Err("name: is empty".into());
                }
                let price = parse_cents(&f("price")).map_err(|e| format!("price: {e}"))?;
                let stock = f("stock")
                    .parse::<i64>()
                    .ok()
                    .filter(|s| *s >= 0)
                    .ok_or(format!("stock: {:?} is not a whole number from 0", f("stock")))?;
                Ok((price, stock))
            };
            match check() {
                Ok((price, stock)) => products.push((sku, name, price, stock)),
                Err(reason) => rejected.push(Rejected { line, reason }),
            }
        }
        rejected.report(&mut report);
        Ok((products, report))
    })
    .await
    .map_err(|e| ImportError::Read(e.to_string()))??;
    let (products, mut report) = parsed;
    for chunk in products.chunks(1_000) {
        let chunk = chunk.to_vec();
        report.orders += conveyor
            .backend()
            .transact(move |tx| {
                let now = now_ms();
                for (sku, name, price, stock) in chunk.iter() {
                    tx.execute(
                        "INSERT INTO products (sku, name, price_cents, stock, reserved, updated_at) VALUES ($1, $2, $3, $4, 0, $5)
                         ON CONFLICT (sku) DO UPDATE SET name = excluded.name, price_cents = excluded.price_cents,
                                                         stock = excluded.stock, updated_at = excluded.updated_at",
                        &[sku.as_str().into(), name.as_str().into(), (*price).into(), (*stock).into(), now.into()],
                    )?;
                }
                Ok(chunk.len() as u64)
            })
            .await?;
    }
    Ok(report)
}
