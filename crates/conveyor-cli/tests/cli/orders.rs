//! `conveyor products import` and `conveyor orders import`: exit codes, stderr reports, JSON.

use serde_json::Value;

use crate::TestEnv;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_import_reports_bad_lines_and_waits_for_the_workflows() {
    let env = TestEnv::new("");
    let dir = env.dir.path();
    std::fs::write(dir.join("products.csv"), "sku,name,price,stock\nA,Alpha,1.00,1000\nB,Beta,2.50,1000\n").unwrap();
    let out = env.conveyor(&["products", "import", "products.csv"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    let mut csv = String::from("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n");
    for i in 0..200 {
        csv.push_str(&format!(
            "O{i},{},Cust {i},c{i}@example.com,{},{},1.00,2026-11-20\n",
            1 + i % 10,
            if i % 2 == 0 { "A" } else { "B" },
            1 + i % 3
        ));
    }
    csv.push_str("O-bad,1,Cust,c@example.com,NOPE,1,1.00,2026-11-20\n");
    std::fs::write(dir.join("orders.csv"), &csv).unwrap();
    let out =
        env.conveyor(&["orders", "import", "orders.csv", "--wait", "--json"]).env("CONVEYOR_PAYMENT_SUCCESS_RATE", "1").output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "a read file exits 0 even with rejected lines: {stderr}");
    assert!(stderr.lines().any(|l| l == "line 202: sku: unknown SKU \"NOPE\""), "{stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("--json prints one JSON document on stdout");
    assert_eq!(report["rows"], 201);
    assert_eq!(report["orders"], 200);
    assert_eq!(report["duplicates"], 0);
    assert_eq!(report["rejected"][0]["line"], 202);
    assert_eq!(report["completed"], 200, "with a 100 % success rate every order completes: {report}");
    assert_eq!(report["failed"], 0);
    assert!(report["revenue"].as_f64().unwrap() > 0.0);

    std::fs::write(dir.join("nocols.csv"), "order_id,sku\nX,A\n").unwrap();
    let out = env.conveyor(&["orders", "import", "nocols.csv"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "a header without the required columns exits 1");
    assert!(String::from_utf8_lossy(&out.stderr).contains("customer_id"));
    let out = env.conveyor(&["orders", "import", "missing.csv"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(String::from_utf8_lossy(&out.stderr).lines().count(), 1, "one-line reason");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_order_api_creates_validates_and_reports() {
    let env = TestEnv::new("");
    std::fs::write(env.dir.path().join("products.csv"), "sku,name,price,stock\nA,Alpha,1.00,1000\n").unwrap();
    assert!(env.conveyor(&["products", "import", "products.csv"]).output().unwrap().status.success());
    let (mut server, url) = crate::http::serve(&env, &[("CONVEYOR_PAYMENT_SUCCESS_RATE", "1")]);
    let http = reqwest::Client::new();

    let order = serde_json::json!({ "order_id": "W-1", "customer_id": 7, "customer_name": "Ada", "customer_email": "ada@example.com",
        "order_date": "2026-11-20", "items": [{ "sku": "A", "quantity": 3, "unit_price": 19.99 }] });
    let r = http.post(format!("{url}/api/orders")).json(&order).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["data"]["total"], 59.97);
    let r = http.post(format!("{url}/api/orders")).json(&order).send().await.unwrap();
    assert_eq!(r.status(), 409);
    let mut bad = order.clone();
    bad["order_id"] = "W-2".into();
    bad["items"][0]["quantity"] = (-1).into();
    let r = http.post(format!("{url}/api/orders")).json(&bad).send().await.unwrap();
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert!(body["error"]["details"]["fields"]["items[0].quantity"].is_string(), "{body}");

    crate::wait_for("the order to complete", std::time::Duration::from_secs(30), || async {
        let o: Value = http.get(format!("{url}/api/orders/W-1")).send().await.unwrap().json().await.unwrap();
        o["data"]["status"] == "completed"
    })
    .await;
    let o: Value = http.get(format!("{url}/api/orders/W-1")).send().await.unwrap().json().await.unwrap();
    let names: Vec<&str> = o["data"]["steps"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["ReserveStock", "ProcessPayment", "FinalizeOrder"]);
    assert_eq!(o["data"]["payments"][0]["status"], "charged");
    let products: Value = http.get(format!("{url}/api/products")).send().await.unwrap().json().await.unwrap();
    assert_eq!(products["data"][0]["stock"], 997);
    let k: Value = http.get(format!("{url}/api/kpis/daily?date=2026-11-20")).send().await.unwrap().json().await.unwrap();
    assert_eq!(k["data"]["total_revenue"], 59.97);
    assert_eq!(http.get(format!("{url}/api/kpis/daily?date=soon")).send().await.unwrap().status(), 422);
    let rank: Value = http.get(format!("{url}/api/leaderboard/customers/7/rank")).send().await.unwrap().json().await.unwrap();
    assert_eq!(rank["data"]["rank"], 1);
    assert_eq!(http.get(format!("{url}/api/leaderboard/customers/8/rank")).send().await.unwrap().status(), 404);
    assert_eq!(http.get(format!("{url}/api/leaderboard/customers?limit=5000")).send().await.unwrap().status(), 422);
    let r = http
        .post(format!("{url}/api/orders/import"))
        .header("content-type", "text/csv")
        .body("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\nW-3,8,Bo,bo@example.com,A,1,1.00,2026-11-21\nW-1,7,Ada,ada@example.com,A,1,1.00,2026-11-21\n")
        .send()
        .await
        .unwrap();
    let report: Value = r.json().await.unwrap();
    assert_eq!((report["data"]["orders"].clone(), report["data"]["duplicates"].clone()), (1.into(), 1.into()), "{report}");

    // More than the stock: a business outcome. The order fails with its reason on the declined
    // step, and nothing lands in the failed store (it keeps faults only).
    let mut big = order.clone();
    big["order_id"] = "W-4".into();
    big["items"][0]["quantity"] = 5000.into();
    assert_eq!(http.post(format!("{url}/api/orders")).json(&big).send().await.unwrap().status(), 201);
    crate::wait_for("the order to fail", std::time::Duration::from_secs(30), || async {
        let o: Value = http.get(format!("{url}/api/orders/W-4")).send().await.unwrap().json().await.unwrap();
        o["data"]["status"] == "failed"
    })
    .await;
    let o: Value = http.get(format!("{url}/api/orders/W-4")).send().await.unwrap().json().await.unwrap();
    let reserve = &o["data"]["steps"][0];
    assert_eq!((reserve["name"].as_str(), reserve["status"].as_str()), (Some("ReserveStock"), Some("declined")), "{o}");
    assert!(reserve["error"].as_str().unwrap_or_default().contains("insufficient stock for A"), "{o}");
    let failed: Value = http.get(format!("{url}/api/jobs/failed")).send().await.unwrap().json().await.unwrap();
    assert_eq!(failed["data"], serde_json::json!([]), "{failed}");
    crate::sigterm(&server);
    assert!(crate::wait_exit(&mut server, std::time::Duration::from_secs(30)).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_keep_their_invariants_when_the_worker_is_killed_twice() {
    use conveyor_core::backend::RowExt;
    let env = TestEnv::new("[[supervisors]]\nname = \"orders\"\nqueues = [\"orders\"]\nconcurrency = 32\nlease = \"2s\"\n\n[payment]\nsuccess_rate = 0.9\nseed = 7\nlatency_ms = 2\n");
    let dir = env.dir.path();
    // 10,000 orders of 1–3 lines over 50 products whose stock covers about 60 % of demand.
    const ORDERS: i64 = 10_000;
    let mut csv = String::from("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n");
    let mut demand: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for i in 0..ORDERS {
        for l in 0..(1 + i % 3) {
            let (sku, qty) = (format!("P{}", (i * 7 + l * 3) % 50), 1 + (i + l) % 3);
            *demand.entry(sku.clone()).or_default() += qty;
            csv.push_str(&format!("K{i},{},C,c@example.com,{sku},{qty},3.00,2026-11-20\n", 1 + i % 40));
        }
    }
    let initial: std::collections::HashMap<String, i64> = demand.iter().map(|(sku, d)| (sku.clone(), d * 6 / 10)).collect();
    let mut products = String::from("sku,name,price,stock\n");
    for (sku, stock) in &initial {
        products.push_str(&format!("{sku},Product {sku},3.00,{stock}\n"));
    }
    std::fs::write(dir.join("products.csv"), products).unwrap();
    assert!(env.conveyor(&["products", "import", "products.csv"]).output().unwrap().status.success());
    std::fs::write(dir.join("orders.csv"), csv).unwrap();
    assert!(env.conveyor(&["orders", "import", "orders.csv"]).output().unwrap().status.success());

    let b = env.backend.clone();
    let settled =
        || async { b.query("SELECT count(*) FROM orders WHERE status IN ('completed', 'failed')", vec![]).await.unwrap()[0].int(0) };
    for kill_after in [2_000, 5_000] {
        let mut worker = env.spawn(&["work"]);
        crate::wait_for("orders to settle before the kill", std::time::Duration::from_secs(300), || async {
            settled().await >= kill_after
        })
        .await;
        worker.kill().unwrap();
        worker.wait().unwrap();
        assert!(env.queue("orders").await.reserved > 0, "the worker was killed holding order jobs");
    }
    let mut worker = env.spawn(&["work"]);
    crate::wait_for("every order to settle", std::time::Duration::from_secs(400), || async { settled().await == ORDERS }).await;
    crate::sigterm(&worker);
    assert!(crate::wait_exit(&mut worker, std::time::Duration::from_secs(30)).await.success());

    for r in b.query("SELECT sku, stock, reserved FROM products", vec![]).await.unwrap() {
        let sku = r.text(0).unwrap().to_string();
        assert!(r.int(1) >= 0 && r.int(2) == 0, "{sku}: stock {} reserved {}", r.int(1), r.int(2));
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
    let wrong = b
        .query(
            "SELECT count(*) FROM orders o WHERE NOT (
               (o.status = 'completed' AND (SELECT count(*) FROM payments p WHERE p.order_id = o.id AND p.status = 'charged') = 1
                                       AND (SELECT count(*) FROM payments p WHERE p.order_id = o.id AND p.status = 'refunded') = 0)
            OR (o.status = 'failed' AND (SELECT count(*) FROM payments p WHERE p.order_id = o.id AND p.status = 'charged')
                                      = (SELECT count(*) FROM payments p WHERE p.order_id = o.id AND p.status = 'refunded')))",
            vec![],
        )
        .await
        .unwrap()[0]
        .int(0);
    assert_eq!(wrong, 0, "every completed order has one charge, every failed one none or a refund");
    let charges = b.query("SELECT count(*) FROM payment_gateway_charges WHERE status = 'charged'", vec![]).await.unwrap()[0].int(0);
    let completed = b.query("SELECT count(*), coalesce(sum(total_cents), 0) FROM orders WHERE status = 'completed'", vec![]).await.unwrap();
    assert_eq!(charges, completed[0].int(0), "no order was charged twice or left charged");
    let spent: f64 =
        b.query("SELECT coalesce(sum(score), 0) FROM zsets WHERE zset = 'leaderboard:customers:spent'", vec![]).await.unwrap()[0].real(0);
    assert_eq!(spent as i64, completed[0].int(1), "the leaderboard counted each completed order once");
}
