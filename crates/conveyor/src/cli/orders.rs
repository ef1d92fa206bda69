//! `orders import` and `products import`: stream a CSV into the store, report rejected lines on
//! stderr (`line N: FIELD: reason`) and the result on stdout; `--wait` settles the orders.

use std::io::{BufReader, IsTerminal, Write};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Subcommand;

use conveyor_apps::orders::{self, import, money::to_major};
use conveyor_core::clock::now_ms;
use conveyor_core::worker::SupervisorConfig;
use conveyor_core::Conveyor;

use crate::cli::config::Config;
use crate::cli::run::{open_store, registry};

#[derive(Subcommand)]
pub(crate) enum OrdersCommand {
    /// Import orders from a CSV file and start their workflows
    Import {
        file: String,
        /// Wait until every imported order has settled (runs workers here if none are running)
        #[arg(long)]
        wait: bool,
        /// Print one JSON document
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub(crate) enum ProductsCommand {
    /// Create or update products from a CSV file (sku,name,price,stock)
    Import { file: String },
}

fn open(file: &str) -> anyhow::Result<(std::fs::File, u64)> {
    let f = std::fs::File::open(file).with_context(|| format!("cannot read {file}"))?;
    let size = f.metadata().map(|m| m.len()).unwrap_or(0);
    Ok((f, size))
}

/// A progress line on a terminal's stderr: rows, rows/s, and the ETA from bytes read.
fn progress(size: u64) -> impl Fn(import::Progress) + Send + 'static {
    let started = Instant::now();
    let tty = std::io::stderr().is_terminal();
    move |p: import::Progress| {
        if !tty {
            return;
        }
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let eta = if p.bytes > 0 && size > p.bytes { (size - p.bytes) as f64 * secs / p.bytes as f64 } else { 0.0 };
        let pct = if size > 0 { p.bytes as f64 * 100.0 / size as f64 } else { 0.0 };
        eprint!("\r{} rows · {:.0} rows/s · {pct:.0}% · ETA {eta:.0}s   ", p.rows, p.rows as f64 / secs);
        let _ = std::io::stderr().flush();
    }
}

pub(crate) async fn orders(config: &Config, cmd: OrdersCommand) -> anyhow::Result<()> {
    let OrdersCommand::Import { file, wait, json } = cmd;
    let (f, size) = open(&file)?;
    let backend = open_store(config).await?;
    let conveyor = Conveyor::new(backend.clone(), registry(config, &backend)?);
    let since = now_ms();
    let started = Instant::now();
    let report = import::import_orders(&conveyor, BufReader::with_capacity(256 * 1024, f), progress(size)).await?;
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    print_rejected(&report);
    eprintln!(
        "read {} rows in {:.2}s ({:.0} rows/s)",
        report.rows,
        started.elapsed().as_secs_f64(),
        report.rows as f64 / started.elapsed().as_secs_f64().max(0.001)
    );
    let mut out = serde_json::to_value(&report)?;
    if wait {
        let (completed, failed, revenue) = settle(&conveyor, since).await?;
        out["completed"] = completed.into();
        out["failed"] = failed.into();
        out["revenue"] = to_major(revenue).into();
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!(
            "imported {} orders from {} rows ({} duplicates, {} rejected lines)",
            report.orders, report.rows, report.duplicates, report.rejected_total
        );
        if wait {
            println!("settled: {} completed, {} failed, revenue {:.2}", out["completed"], out["failed"], to_major(revenue_cents(&out)));
        }
    }
    Ok(())
}

fn revenue_cents(out: &serde_json::Value) -> i64 {
    (out["revenue"].as_f64().unwrap_or(0.0) * 100.0).round() as i64
}

/// Waits until the orders created since `since` have settled, running workers in this process
/// when no live worker serves the orders queue. Returns (completed, failed, revenue in cents).
async fn settle(conveyor: &Conveyor, since: i64) -> anyhow::Result<(u64, u64, i64)> {
    let backend = conveyor.backend().clone();
    let mut sup = SupervisorConfig::new("orders", vec![orders::QUEUE.into()], 64);
    sup.prefetch = 64;
    crate::cli::run::with_local_workers(conveyor, sup, || async {
        let started = Instant::now();
        let mut last = Instant::now();
        let result = loop {
            let (open, completed, failed, revenue) = orders::settlement(backend.as_ref(), since).await?;
            if open == 0 {
                break (completed, failed, revenue);
            }
            if last.elapsed() > Duration::from_secs(2) {
                eprintln!(
                    "settling: {open} orders in flight, {completed} completed, {failed} failed after {:.0}s",
                    started.elapsed().as_secs_f64()
                );
                last = Instant::now();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        eprintln!("settled in {:.2}s", started.elapsed().as_secs_f64());
        Ok(result)
    })
    .await
}

pub(crate) async fn products(config: &Config, cmd: ProductsCommand) -> anyhow::Result<()> {
    let ProductsCommand::Import { file } = cmd;
    let (f, _) = open(&file)?;
    let backend = open_store(config).await?;
    let conveyor = Conveyor::new(backend.clone(), registry(config, &backend)?);
    let report = import::import_products(&conveyor, BufReader::new(f)).await?;
    print_rejected(&report);
    println!("{} products created or updated from {} rows ({} rejected lines)", report.orders, report.rows, report.rejected_total);
    Ok(())
}

/// The rejected lines the report lists (the first `import::MAX_REJECTED`), and how many more.
fn print_rejected(report: &import::ImportReport) {
    for r in &report.rejected {
        eprintln!("line {}: {}", r.line, r.reason);
    }
    let more = report.rejected_total.saturating_sub(report.rejected.len() as u64);
    if more > 0 {
        eprintln!("… and {more} more rejected lines");
    }
}

#[derive(Subcommand)]
pub(crate) enum KpisCommand {
    /// Compute and cache the KPIs now
    Generate {
        /// The day (YYYY-MM-DD, UTC); default today
        #[arg(long)]
        date: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum LeaderboardCommand {
    /// Rebuild the leaderboards from the completed orders in the store
    Rebuild,
}

pub(crate) async fn kpis(config: &Config, cmd: KpisCommand) -> anyhow::Result<()> {
    let KpisCommand::Generate { date } = cmd;
    let day = match date {
        None => orders::reports::today(),
        Some(d) => orders::reports::parse_day("--date", &d).map_err(|e| anyhow::anyhow!(e))?,
    };
    let backend = open_store(config).await?;
    let k = orders::reports::generate(backend, day).await?;
    println!("{}", serde_json::to_string_pretty(&k)?);
    Ok(())
}

pub(crate) async fn leaderboard(config: &Config, cmd: LeaderboardCommand) -> anyhow::Result<()> {
    let LeaderboardCommand::Rebuild = cmd;
    let backend = open_store(config).await?;
    orders::reports::rebuild(backend.clone()).await?;
    let top = orders::reports::top_customers(backend, 3).await?;
    println!("leaderboards rebuilt; top customers: {}", serde_json::to_string(&top)?);
    Ok(())
}

/// Loads sample products and orders and starts their workflows.
#[cfg(all(feature = "notify", feature = "sync"))]
pub(crate) async fn demo(config: &Config) -> anyhow::Result<()> {
    let backend = open_store(config).await?;
    let conveyor = Conveyor::new(backend.clone(), registry(config, &backend)?);
    let mut products = String::from("sku,name,price,stock\n");
    let names = [
        "Espresso beans",
        "Pour-over kettle",
        "Ceramic dripper",
        "Paper filters",
        "Burr grinder",
        "Milk jug",
        "Travel mug",
        "Scale",
        "Tamper",
        "Cleaning tabs",
    ];
    for (i, n) in names.iter().enumerate() {
        products.push_str(&format!("DEMO-{i:02},{n},{}.{:02},{}\n", 5 + i * 7, (i * 13) % 100, 40 + i * 15));
    }
    let p = import::import_products(&conveyor, std::io::Cursor::new(products.into_bytes())).await?;
    let mut orders_csv = String::from("order_id,customer_id,customer_name,customer_email,sku,quantity,unit_price,order_date\n");
    let today = orders::reports::today();
    let stamp = now_ms();
    for i in 0..500u64 {
        let c = 1 + (i * 7919) % 60;
        for l in 0..(1 + i % 3) {
            let sku = (i * 31 + l * 7) % names.len() as u64;
            let day = today - jiff::Span::new().days((i % 7) as i64);
            orders_csv.push_str(&format!(
                "DEMO-{stamp}-{i:04},{c},Demo customer {c},customer{c}@example.com,DEMO-{sku:02},{},{}.{:02},{day}\n",
                1 + (i + l) % 3,
                5 + sku * 7,
                (sku * 13) % 100
            ));
        }
    }
    let o = import::import_orders(&conveyor, std::io::Cursor::new(orders_csv.into_bytes()), |_| {}).await?;
    println!("demo: {} products, {} orders imported; their workflows are queued on `{}`.", p.orders, o.orders, orders::QUEUE);
    let user = demo_notifications(&conveyor).await?;
    println!(
        "next:\n  conveyor serve                      # workers settle the orders; dashboard at http://{}/dashboard",
        config.http_addr
    );
    println!("  curl -s localhost:{}/api/kpis/realtime", config.http_addr.port());
    println!("  curl -s localhost:{}/api/leaderboard/customers?limit=5", config.http_addr.port());
    let port = config.http_addr.port();
    println!(
        "  curl -s --json '{{\"event\":\"order_shipped\",\"payload\":{{\"user_id\":{user},\"order\":{{\"id\":\"A1\",\"total\":42}}}}}}' localhost:{port}/api/events"
    );
    println!("  curl -s localhost:{port}/api/v1/users/{user}/inbox     # the welcome message and the shipping note");
    println!("  curl -s 'localhost:{port}/api/v1/notifications?user_id={user}'");
    println!("  conveyor bench --jobs 20000          # in another terminal, and watch the dashboard move");
    demo_sync(config)?;
    Ok(())
}

#[cfg(all(feature = "notify", feature = "sync"))]
/// Wires the product sync to the partner simulator: writes `.env` (which every command reads)
/// when the sync is not configured and there is no `.env` yet, and says how to run it.
fn demo_sync(config: &Config) -> anyhow::Result<()> {
    let sim = "http://127.0.0.1:8001";
    let lines = format!(
        "CONVEYOR_SYNC_SOURCE_URL={sim}/source\nCONVEYOR_SYNC_SOURCE_TOKEN=src\nCONVEYOR_SYNC_TARGET_URL={sim}/target\nCONVEYOR_SYNC_TARGET_KEY=tgt\n"
    );
    println!("product sync, against the built-in partner simulator:");
    if config.apps.sync.is_configured() {
        println!("  (already configured: {})", config.apps.sync.source.as_ref().map(|s| s.url.as_str()).unwrap_or_default());
    } else if std::path::Path::new(".env").exists() {
        println!("  add to your environment (or .env):\n{}", lines.lines().map(|l| format!("    {l}")).collect::<Vec<_>>().join("\n"));
    } else {
        std::fs::write(".env", &lines).context("writing .env")?;
        println!("  wrote .env: the sync's source and target are the simulator at {sim}");
    }
    println!("  conveyor dev partners --port 8001 --products 2000 &");
    println!("  conveyor sync products               # or GET /trigger-sync on a running `conveyor serve`");
    println!("  conveyor sync health");
    Ok(())
}

#[cfg(all(feature = "notify", feature = "sync"))]
/// A demo user (welcomed by the default rules), and an `order_shipped` source with a schema, an
/// in-app template and its rule. Running the demo again reuses what exists.
async fn demo_notifications(conveyor: &Conveyor) -> anyhow::Result<i64> {
    use conveyor_apps::notify::{self, model};
    use serde_json::json;
    let backend = conveyor.backend().as_ref();
    // The demo's rows name no URL: no outbound policy applies.
    let policy = conveyor_apps::outbound::Policy::default();
    let user = match notify::register_user(conveyor, &json!({ "name": "Demo User", "email": "demo@example.com" }), &policy).await {
        Ok(r) => r.user_id,
        Err(model::ModelError::Conflict(_)) => {
            let rows = backend.query("SELECT id FROM users WHERE email = 'demo@example.com'", vec![]).await?;
            conveyor_core::backend::RowExt::int(&rows[0], 0)
        }
        Err(e) => return Err(e.into()),
    };
    let exists = !backend.query("SELECT 1 FROM notify_sources WHERE name = 'order_shipped'", vec![]).await?.is_empty();
    if !exists {
        let schema = json!({ "type": "object", "required": ["user_id", "order"],
                             "properties": { "order": { "type": "object", "required": ["id"] } } });
        model::save(
            backend,
            model::Kind::Sources,
            None,
            &json!({ "name": "order_shipped", "description": "An order left the warehouse", "schema": schema }),
            &policy,
        )
        .await?;
        let t = model::save(
            backend,
            model::Kind::Templates,
            None,
            &json!({ "name": "order-shipped-inbox", "channel": "database", "subject": "Order {{ order.id }} shipped", "body": "Hi {{ user.name }}, your order {{ order.id }} is on its way." }),
            &policy,
        )
        .await?;
        model::save(
            backend,
            model::Kind::Rules,
            None,
            &json!({ "event": "order_shipped", "template_id": t["id"], "channel": "database" }),
            &policy,
        )
        .await?;
    }
    println!("demo: user {user} (demo@example.com) registered; rule `order_shipped` → in-app message.");
    Ok(user)
}
