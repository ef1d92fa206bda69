//! Orders: import, the workflow's invariants under concurrency, and bad CSVs.

use std::collections::HashMap;
use std::fmt::Write;
use std::time::Duration;

use conveyor_apps::orders::{self, import, leaderboard, payment::SimulatorConfig};
use conveyor_core::backend::RowExt;
use conveyor_core::cache::SortedSet;
use conveyor_core::clock::now_ms;
use conveyor_core::worker::{self, SupervisorConfig, WorkerConfig};
use conveyor_core::{Conveyor, Registry};
use tokio_util::sync::CancellationToken;

use crate::{wait_for, Store};

fn conveyor(s: &Store, success_rate: f64) -> Conveyor {
    let mut registry = Registry::new();
    orders::register(&mut registry, s.backend.clone(), SimulatorConfig { success_rate, seed: 42, latency: Duration::ZERO });
    Conveyor::new(s.backend.clone(), registry)
}

async fn import_products(c: &Conveyor, csv: String) {
    let report = import::import_products(c, std::io::Cursor::new(csv.into_bytes())).await.unwrap();
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
}

/// `n` orders of 1–3 lines over `products` SKUs, deterministic.
fn orders_csv(n: usize, products: usize) -> (String, HashMap<String, i64>) {
    let mut csv = String::from("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n");
    let mut demand: HashMap<String, i64> = HashMap::new();
    for i in 0..n {
        let customer = 1 + (i * 7) % 200;
        for l in 0..(1 + i % 3) {
            let sku = format!("SKU-{:03}", (i * 13 + l * 5) % products);
            let qty = 1 + ((i + l) % 3) as i64;
            *demand.entry(sku.clone()).or_default() += qty;
            let _ = writeln!(
                csv,
                "ORD-{i:06},{customer},Customer {customer},c{customer}@example.com,{sku},{qty},{}.99,2026-11-{:02}",
                5 + l,
                1 + i % 20
            );
        }
    }
    (csv, demand)
}

pub(crate) async fn every_order_settles_and_stock_money_and_leaderboards_add_up(s: Store) {
    let c = conveyor(&s, 0.9);
    let products = 50;
    let (csv, demand) = orders_csv(10_000, products);
    // Stock covers about 60 % of demand.
    let mut pcsv = String::from("sku,name,price,stock\n");
    let mut initial = HashMap::new();
    for p in 0..products {
        let sku = format!("SKU-{p:03}");
        let stock = demand.get(&sku).copied().unwrap_or(0) * 6 / 10;
        initial.insert(sku.clone(), stock);
        let _ = writeln!(pcsv, "{sku},Product {p},9.99,{stock}");
    }
    import_products(&c, pcsv).await;

    let since = now_ms();
    let report = import::import_orders(&c, std::io::Cursor::new(csv.clone().into_bytes()), |_| {}).await.unwrap();
    assert_eq!(report.orders, 10_000);
    assert!(report.rejected.is_empty(), "{:?}", &report.rejected[..report.rejected.len().min(5)]);

    let shutdown = CancellationToken::new();
    let mut sup = SupervisorConfig::new("orders", vec![orders::QUEUE.into()], 32);
    sup.lease = Duration::from_secs(10);
    let cfg = WorkerConfig { supervisors: vec![sup], poll_interval: Duration::from_millis(20), ..WorkerConfig::default() };
    let w = tokio::spawn(worker::run(c.clone(), cfg, shutdown.clone()));
    wait_for("every order to settle", Duration::from_secs(240), || async {
        orders::settlement(s.backend.as_ref(), since).await.unwrap().0 == 0
    })
    .await;
    shutdown.cancel();
    w.await.unwrap();

    let (open, completed, failed, revenue) = orders::settlement(s.backend.as_ref(), since).await.unwrap();
    assert_eq!(open, 0);
    assert_eq!(completed + failed, 10_000);
    assert!(completed > 500 && failed > 500, "both outcomes happen: {completed} completed, {failed} failed");

    // Stock: never negative, nothing left reserved, committed + remaining = initial.
    let b = s.backend.as_ref();
    for r in b.query("SELECT sku, stock, reserved FROM products", vec![]).await.unwrap() {
        let sku = r.text(0).unwrap().to_string();
        assert!(r.int(1) >= 0, "{sku} went negative");
        assert_eq!(r.int(2), 0, "{sku} still has stock reserved");
        let committed = b
            .query(
                "SELECT coalesce(sum(quantity), 0) FROM stock_reservations WHERE sku = $1 AND status = 'committed'",
                vec![sku.clone().into()],
            )
            .await
            .unwrap()[0]
            .int(0);
        assert_eq!(committed + r.int(1), initial[&sku], "{sku}: committed + remaining = initial");
    }
    // Money: each completed order charged exactly once and never refunded; a failed one
    // never keeps a charge.
    let bad = b
        .query(
            "SELECT o.id, o.status,
                    (SELECT count(*) FROM payments p WHERE p.order_id = o.id AND p.status = 'charged'),
                    (SELECT count(*) FROM payments p WHERE p.order_id = o.id AND p.status = 'refunded')
             FROM orders o",
            vec![],
        )
        .await
        .unwrap()
        .into_iter()
        .filter(|r| {
            let (status, charged, refunded) = (r.text(1).unwrap().to_string(), r.int(2), r.int(3));
            !((status == "completed" && charged == 1 && refunded == 0) || (status == "failed" && charged == refunded))
        })
        .count();
    assert_eq!(bad, 0, "payments match every order's outcome");
    let gateway_charges =
        b.query("SELECT count(*) FROM payment_gateway_charges WHERE status = 'charged'", vec![]).await.unwrap()[0].int(0) as u64;
    assert_eq!(gateway_charges, completed, "the gateway kept exactly the completed orders' charges");

    // Leaderboards: their totals are the completed orders'.
    let spent = SortedSet::new(s.backend.clone(), leaderboard::CUSTOMERS_SPENT).top(10_000).await.unwrap();
    assert_eq!(spent.iter().map(|r| r.score).sum::<f64>() as i64, revenue);
    let counts = SortedSet::new(s.backend.clone(), leaderboard::CUSTOMERS_ORDERS).top(10_000).await.unwrap();
    assert_eq!(counts.iter().map(|r| r.score).sum::<f64>() as u64, completed);

    // KPIs: daily revenue over the file's days, and the range, add up to the completed orders'.
    let day = |d: i8| jiff::civil::date(2026, 11, d);
    let mut daily_cents = 0i64;
    for d in 1..=20 {
        daily_cents += (orders::reports::daily(s.backend.clone(), day(d)).await.unwrap().total_revenue * 100.0).round() as i64;
    }
    assert_eq!(daily_cents, revenue);
    let range = orders::reports::range(s.backend.clone(), day(1), day(20)).await.unwrap();
    assert_eq!(range.days.len(), 20);
    assert_eq!((range.totals.total_revenue * 100.0).round() as i64, revenue);
    assert_eq!(range.totals.order_count, completed);

    // A rebuild from the store gives the same leaderboards as the incremental updates.
    let before = (
        orders::reports::top_customers(s.backend.clone(), 1000).await.unwrap(),
        orders::reports::top_products(s.backend.clone(), 1000).await.unwrap(),
    );
    orders::reports::rebuild(s.backend.clone()).await.unwrap();
    let after = (
        orders::reports::top_customers(s.backend.clone(), 1000).await.unwrap(),
        orders::reports::top_products(s.backend.clone(), 1000).await.unwrap(),
    );
    assert_eq!(before, after);
    assert!(!after.0.is_empty() && after.0[0].customer_name.starts_with("Customer"));

    // The timeline: a failed order shows where it stopped and the rollback.
    let failed_id = b.query("SELECT id FROM orders WHERE status = 'failed' LIMIT 1", vec![]).await.unwrap()[0].text(0).unwrap().to_string();
    let o = orders::order(b, &failed_id).await.unwrap().unwrap();
    let steps = o.steps.unwrap();
    assert!(steps.iter().any(|st| st.name == "RollbackOrder" && st.status == "completed"), "{steps:?}");
    // Out of stock and declined payments are business outcomes: the step is `declined` with
    // its reason, and no job of the workflow is in the failed store (it keeps faults only).
    assert!(
        steps.iter().any(|st| st.status == "declined"
            && st.error.as_deref().is_some_and(|e| e == "payment declined" || e.starts_with("insufficient stock"))),
        "{steps:?}"
    );
    let faults = b.failed(None, conveyor_core::backend::Page::default()).await.unwrap();
    assert!(faults.items.is_empty(), "no business outcome in the failed store: {:?}", faults.items);

    // Importing the same file again creates nothing.
    let again = import::import_orders(&c, std::io::Cursor::new(csv.into_bytes()), |_| {}).await.unwrap();
    assert_eq!((again.orders, again.duplicates), (0, 10_000));
}

pub(crate) async fn bad_csv_lines_are_reported_by_line_and_good_orders_imported(s: Store) {
    let c = conveyor(&s, 1.0);
    import_products(&c, "sku,name,price,stock\nA,Alpha,1.00,100\nB,Béta,2.50,100\n".into()).await;
    // BOM, CRLF, columns in another order, quoting, non-ASCII names.
    let csv = "\u{feff}customer_id,order_id,customer_name,customer_email,sku,quantity,unit_price,order_date\r\n\
        1,O1,\"Zoë, Ltd\",zoe@example.com,A,2,1.00,2026-11-01\r\n\
        1,O1,\"Zoë, Ltd\",zoe@example.com,B,1,2.50,2026-11-01\r\n\
        2,O2,Bob,bob@example.com,A,-1,1.00,2026-11-01\r\n\
        2,O2,Bob,bob@example.com,B,1,2.50,2026-11-01\r\n\
        3,O3,Ann,ann@example.com,Z,1,1.00,2026-11-01\r\n\
        4,O4,Eve,eve@example.com,A,1,abc,2026-11-01\r\n\
        5,O5,Max,not-an-email,A,1,1.00,2026-11-01\r\n\
        6,O6,Kim,kim@example.com,A,1,1.00,yesterday\r\n\
        7,O7,Lee,lee@example.com,A,1,1.00,2026-11-02T10:30:00+02:00\r\n\
        7,O7,Lee,lee@example.com,A,2,1.00,2026-11-02T10:30:00+02:00\r\n\
        7,O7,Lee,lee@example.com,A,1,1.00,2026-11-02T10:30:00+02:00\r\n";
    let report = import::import_orders(&c, std::io::Cursor::new(csv.as_bytes().to_vec()), |_| {}).await.unwrap();
    assert_eq!(report.rows, 11);
    assert_eq!(report.orders, 2, "O1 and O7 imported: {report:?}");
    let reasons: HashMap<u64, &str> = report.rejected.iter().map(|r| (r.line, r.reason.as_str())).collect();
    assert!(reasons[&4].starts_with("quantity:"), "{reasons:?}");
    assert!(
        reasons[&5].starts_with("order_id: order O2 rejected (see line 4)"),
        "the rest of a bad order is rejected with it: {reasons:?}"
    );
    assert!(reasons[&6].contains("unknown SKU"), "{reasons:?}");
    assert!(reasons[&7].starts_with("unit_price:"), "{reasons:?}");
    assert!(reasons[&8].starts_with("customer_email:"), "{reasons:?}");
    assert!(reasons[&9].starts_with("order_date:"), "{reasons:?}");
    assert_eq!(reasons[&12], "order_id: duplicate of line 10, skipped", "{reasons:?}");
    assert_eq!((report.rejected.len(), report.rejected_total), (7, 7));
    let o1 = orders::order(s.backend.as_ref(), "O1").await.unwrap().unwrap();
    assert_eq!(o1.customer_name, "Zoë, Ltd");
    assert_eq!(o1.total, 4.5);
    let o7 = orders::order(s.backend.as_ref(), "O7").await.unwrap().unwrap();
    assert_eq!(o7.items.len(), 2, "two lines of one order with the same SKU are both kept, an exact repeat is not");
    assert_eq!(o7.total, 3.0);
    assert_eq!(o7.order_date, "2026-11-02T08:30:00Z", "dates are normalized to UTC");

    let missing = import::import_orders(&c, std::io::Cursor::new(b"order_id,sku\nX,A\n".to_vec()), |_| {}).await.unwrap_err();
    assert!(missing.to_string().contains("customer_id"), "{missing}");
}

pub(crate) async fn split_rejected_and_oversized_orders_never_store_a_part(s: Store) {
    let c = conveyor(&s, 1.0);
    import_products(&c, "sku,name,price,stock\nA,Alpha,1.00,100\n".into()).await;
    let h = "order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n";
    let csv = format!(
        "{h}\
         S1,1,A,a@example.com,A,1,1.00,2026-11-01\n\
         R1,2,B,b@example.com,A,x,1.00,2026-11-01\n\
         S2,3,C,c@example.com,A,1,1.00,2026-11-01\n\
         S1,1,A,a@example.com,A,2,1.00,2026-11-01\n\
         R1,2,B,b@example.com,A,1,1.00,2026-11-01\n\
         BIG,4,D,d@example.com,A,1000000,1000000000.00,2026-11-01\n"
    );
    let report = import::import_orders(&c, std::io::Cursor::new(csv.into_bytes()), |_| {}).await.unwrap();
    let reasons: HashMap<u64, &str> = report.rejected.iter().map(|r| (r.line, r.reason.as_str())).collect();
    assert_eq!(report.orders, 2, "S1 (its first part) and S2: {report:?}");
    assert_eq!(report.duplicates, 0, "a split order is not a duplicate: {report:?}");
    assert!(reasons[&5].contains("not contiguous"), "{reasons:?}");
    assert!(reasons[&6].contains("was rejected at line 3"), "a rejected order's later lines are rejected too: {reasons:?}");
    assert!(reasons[&7].contains("total would exceed"), "{reasons:?}");
    assert!(orders::order(s.backend.as_ref(), "R1").await.unwrap().is_none());
    assert!(orders::order(s.backend.as_ref(), "BIG").await.unwrap().is_none());
    assert_eq!(orders::order(s.backend.as_ref(), "S1").await.unwrap().unwrap().items.len(), 1);
}

/// Batches are written two at a time: orders whose lines come back in the next batch (split
/// within the file, here two of them in crossed order) still keep their first lines and reject
/// the later ones, and every other order of both batches is stored once.
pub(crate) async fn an_order_split_across_batches_keeps_its_first_lines(s: Store) {
    let c = conveyor(&s, 1.0);
    import_products(&c, "sku,name,price,stock\nA,Alpha,1.00,100000\n".into()).await;
    let mut csv = String::from("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n");
    let line = |id: &str, customer: usize, qty: u32| format!("{id},{customer},C,c{customer}@example.com,A,{qty},1.00,2026-11-01\n");
    let others = |csv: &mut String, range: std::ops::Range<usize>| {
        for n in range {
            csv.push_str(&line(&format!("O{n}"), n % 50 + 3, 1));
        }
    };
    // The first batch (500 orders): SPLIT_A first, SPLIT_B near its end; the next batch has
    // SPLIT_B's second part first and SPLIT_A's last.
    csv.push_str(&line("SPLIT_A", 1, 1));
    others(&mut csv, 0..298);
    csv.push_str(&line("SPLIT_B", 2, 1));
    others(&mut csv, 298..498);
    csv.push_str(&line("SPLIT_B", 2, 7));
    others(&mut csv, 498..598);
    csv.push_str(&line("SPLIT_A", 1, 5));
    let report = import::import_orders(&c, std::io::Cursor::new(csv.into_bytes()), |_| {}).await.unwrap();
    assert_eq!(report.orders, 600, "{report:?}");
    let lines: Vec<u64> = report.rejected.iter().map(|r| r.line).collect();
    assert_eq!(lines, [502, 603], "the later lines are the ones rejected: {report:?}");
    assert!(report.rejected.iter().all(|r| r.reason.contains("not contiguous")), "{report:?}");
    for id in ["SPLIT_A", "SPLIT_B"] {
        let split = orders::order(s.backend.as_ref(), id).await.unwrap().unwrap();
        assert_eq!((split.items.len(), split.items[0].quantity), (1, 1), "{id}: the first line was stored");
    }
    let stored = s.backend.query("SELECT count(*) FROM orders", vec![]).await.unwrap();
    assert_eq!(stored[0][0].as_i64(), Some(600));
}

pub(crate) async fn the_simulated_gateway_charges_and_refunds_once_per_key(s: Store) {
    use conveyor_apps::orders::payment::{PaymentGateway, Simulator};
    let g = Simulator::new(s.backend.clone(), SimulatorConfig { success_rate: 1.0, seed: 1, latency: Duration::ZERO });
    assert_eq!(g.refund("never-charged").await.unwrap(), None, "nothing to refund");
    let first = g.charge("K1", 500).await.unwrap();
    assert!(first.approved);
    assert_eq!(g.charge("K1", 500).await.unwrap(), first, "a repeated charge returns the first");
    let refunded = g.refund("K1").await.unwrap().expect("the charge is refunded");
    assert_eq!(refunded.reference, first.reference);
    assert_eq!(g.refund("K1").await.unwrap().map(|c| c.reference), Some(first.reference), "refunding again reports the same refund");

    // Calls at once share the ledger's transactions: each key is charged once, every caller
    // of a key gets that charge, and refunds at once refund it once.
    let g = std::sync::Arc::new(g);
    let calls: Vec<_> = (0..200)
        .map(|i| {
            let g = g.clone();
            tokio::spawn(async move { (i % 20, g.charge(&format!("P{}", i % 20), 100 + i % 20).await.unwrap()) })
        })
        .collect();
    let mut by_key: HashMap<i64, Vec<conveyor_apps::orders::payment::Charge>> = HashMap::new();
    for c in calls {
        let (k, charge) = c.await.unwrap();
        by_key.entry(k).or_default().push(charge);
    }
    assert_eq!(by_key.len(), 20);
    for charges in by_key.values() {
        assert!(charges.iter().all(|c| c == &charges[0] && c.approved), "every caller of a key gets its one charge: {charges:?}");
    }
    let ledger = s
        .backend
        .query("SELECT count(*), count(DISTINCT reference) FROM payment_gateway_charges WHERE idempotency_key LIKE 'P%'", vec![])
        .await
        .unwrap();
    assert_eq!((ledger[0].int(0), ledger[0].int(1)), (20, 20), "one ledger row per key");
    let refunds: Vec<_> = (0..40)
        .map(|i| {
            let g = g.clone();
            tokio::spawn(async move { g.refund(&format!("P{}", i % 20)).await.unwrap() })
        })
        .collect();
    for r in refunds {
        assert!(r.await.unwrap().is_some(), "each refund call reports the refund");
    }
    let refunded = s
        .backend
        .query("SELECT count(*) FROM payment_gateway_charges WHERE idempotency_key LIKE 'P%' AND status = 'refunded'", vec![])
        .await
        .unwrap();
    assert_eq!(refunded[0].int(0), 20);
}

/// A file of bad lines: the report lists the first `MAX_REJECTED` by line and counts the rest,
/// and the good orders among them are imported.
pub(crate) async fn rejected_lines_are_listed_up_to_the_cap_and_counted_beyond(s: Store) {
    let c = conveyor(&s, 1.0);
    import_products(&c, "sku,name,price,stock\nA,Alpha,1.00,100000\n".into()).await;
    let mut csv = String::from("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n");
    let bad = import::MAX_REJECTED + 500;
    for i in 0..bad {
        let _ = writeln!(csv, "BAD-{i},1,Ann,ann@example.com,NOPE,1,1.00,2026-11-01");
    }
    let _ = writeln!(csv, "GOOD-1,1,Ann,ann@example.com,A,1,1.00,2026-11-01");
    let report = import::import_orders(&c, std::io::Cursor::new(csv.into_bytes()), |_| {}).await.unwrap();
    assert_eq!((report.rows, report.orders), (bad as u64 + 1, 1));
    assert_eq!(report.rejected.len(), import::MAX_REJECTED);
    assert_eq!(report.rejected_total, bad as u64);
    let lines: Vec<u64> = report.rejected.iter().map(|r| r.line).collect();
    assert_eq!(lines, (2..2 + import::MAX_REJECTED as u64).collect::<Vec<_>>(), "the first lines, in order");
}
