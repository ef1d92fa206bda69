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
