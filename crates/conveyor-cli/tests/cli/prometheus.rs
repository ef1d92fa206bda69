//! `/metrics` scraped by a real Prometheus: `conveyor serve` with tokens, a `prometheus` process
//! of the test's own scraping it every second with the read token and loading the repository's
//! `deploy/prometheus/alerts.yml`. The counters Prometheus stores are exact, `increase()` works on
//! them, the duration histogram puts jobs in the right bucket, every alert rule and every query of
//! `deploy/grafana/conveyor-dashboard.json` runs, and a scrape without the token is refused.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::http::serve;
use crate::{sigterm, wait_exit, Proc, TestEnv};

const ADMIN: &str = "admin-token-for-prometheus";
const READ: &str = "read-token-for-prometheus";
/// `conveyor.noop` jobs counted exactly.
const N: usize = 300;
/// `conveyor.sleep` jobs of `SLEEP_MS` timed by the duration histogram.
const SLEEPS: usize = 40;
const SLEEP_MS: u64 = 300;

const CONFIG: &str = "[[supervisors]]\nname = \"default\"\nqueues = [\"default\", \"promq\"]\nconcurrency = 16\n\n\
                      [[supervisors]]\nname = \"sleepers\"\nqueues = [\"promsleep\"]\nconcurrency = 8\n";

const NOOPS: &str = r#"conveyor_jobs_total{queue="promq",kind="conveyor.noop",outcome="completed"}"#;
const SLEEP_COUNT: &str = r#"conveyor_job_duration_seconds_count{queue="promsleep",kind="conveyor.sleep"}"#;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy").join(path).canonicalize().expect("a file of deploy/")
}

/// A `prometheus` process on a free loopback port with its own storage, killed when dropped.
struct Prometheus {
    proc: Proc,
    url: String,
    http: reqwest::Client,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `target` (`host:port`) every second as job `conveyor` with the read token, and as
    /// job `conveyor-no-token` without it; evaluates `alerts.yml` every second.
    async fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("read-token");
        std::fs::write(&token, format!("{READ}\n")).unwrap();
        // JSON is YAML: serde_json quotes the paths.
        let config = json!({
            "global": { "scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s" },
            "rule_files": [deploy("prometheus/alerts.yml")],
            "scrape_configs": [
                {
                    "job_name": "conveyor",
                    "authorization": { "type": "Bearer", "credentials_file": token },
                    "static_configs": [{ "targets": [target] }],
                },
                { "job_name": "conveyor-no-token", "static_configs": [{ "targets": [target] }] },
            ],
        });
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, serde_json::to_string_pretty(&config).unwrap()).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_path.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawning prometheus");
        let mut p = Prometheus { proc: Proc(child), url: format!("http://127.0.0.1:{port}"), http: reqwest::Client::new(), dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(r) = p.http.get(format!("{}/-/ready", p.url)).send().await {
                if r.status().is_success() {
                    break;
                }
            }
            if let Some(status) = p.proc.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", p.log());
            }
            assert!(Instant::now() < deadline, "prometheus not ready within 30 s:\n{}", p.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        p
    }

    fn log(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    async fn get(&self, path: &str, params: &[(&str, &str)]) -> Value {
        let r = self.http.get(format!("{}{path}", self.url)).query(params).send().await.unwrap();
        r.json().await.unwrap()
    }

    /// The answer of `/api/v1/query` for `q` (at `time`, unix seconds, or now), whatever its status.
    async fn query_at(&self, q: &str, time: Option<f64>) -> Value {
        let time = time.map(|t| format!("{t:.3}"));
        let mut params = vec![("query", q)];
        if let Some(t) = &time {
            params.push(("time", t));
        }
        self.get("/api/v1/query", &params).await
    }

    /// The result of `q`, which must succeed.
    async fn query(&self, q: &str) -> Value {
        let r = self.query_at(q, None).await;
        assert_eq!(r["status"], "success", "{q}: {r}");
        r["data"].clone()
    }

    /// The one value of `q` (a scalar, or a vector of at most one sample), `None` when empty.
    async fn value_at(&self, q: &str, time: Option<f64>) -> Option<f64> {
        let r = self.query_at(q, time).await;
        assert_eq!(r["status"], "success", "{q}: {r}");
        let data = &r["data"];
        let sample = match data["resultType"].as_str() {
            Some("scalar") => data["result"].clone(),
            Some("vector") => {
                let result = data["result"].as_array().unwrap();
                assert!(result.len() <= 1, "{q} has more than one series: {data}");
                result.first()?["value"].clone()
            }
            other => panic!("{q}: unexpected result type {other:?}: {data}"),
        };
        Some(sample[1].as_str().unwrap().parse().unwrap())
    }

    async fn value(&self, q: &str) -> Option<f64> {
        self.value_at(q, None).await
    }

    /// Waits until `q` has the value `want`.
    async fn wait_value(&self, q: &str, want: f64, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let got = self.value(q).await;
            if got == Some(want) {
                return;
            }
            assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {q} == {want} (last: {got:?})\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Samples Prometheus has stored of `up{job="conveyor"}`: one per scrape.
    async fn scrapes(&self) -> f64 {
        self.value(r#"count_over_time(up{job="conveyor"}[1h])"#).await.unwrap_or(0.0)
    }

    /// Waits for `n` more scrapes of the conveyor job.
    async fn wait_scrapes(&self, n: f64) {
        let start = self.scrapes().await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while self.scrapes().await < start + n {
            assert!(Instant::now() < deadline, "prometheus stopped scraping:\n{}", self.log());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every `expr` of the dashboard with its variables set: all queues and kinds, a 1 m rate window.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(v: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match v {
            Value::Object(m) => {
                let title = m.get("title").and_then(Value::as_str).unwrap_or(title);
                if let Some(Value::String(expr)) = m.get("expr") {
                    let expr = expr
                        .replace("$__rate_interval", "1m")
                        .replace("${queue}", ".*")
                        .replace("$queue", ".*")
                        .replace("${kind}", ".*")
                        .replace("$kind", ".*");
                    out.push((title.to_string(), expr));
                }
                for v in m.values() {
                    walk(v, title, out);
                }
            }
            Value::Array(a) => a.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    let text = std::fs::read_to_string(deploy("grafana/conveyor-dashboard.json")).expect("reading the dashboard");
    let dashboard: Value = serde_json::from_str(&text).expect("the dashboard is JSON");
    let mut out = Vec::new();
    walk(&dashboard["panels"], "", &mut out);
    out
}

/// The scrape `/metrics` answers passes `promtool check metrics` (names, types, help, units).
fn lint(metrics: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawning promtool (installed with prometheus)");
    std::io::Write::write_all(&mut child.stdin.take().unwrap(), metrics.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n--- /metrics:\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_exact_counters_and_histograms_and_runs_the_alerts_and_dashboard() {
    if let Err(e) = Command::new("prometheus").arg("--version").output() {
        assert!(std::env::var_os("CI").is_none(), "CI needs prometheus and promtool (apt-get install prometheus): {e}");
        eprintln!("skipping: no prometheus on PATH ({e}; apt-get install prometheus)");
        return;
    }
    let env = TestEnv::new(CONFIG);
    let (mut server, url) = serve(&env, &[("CONVEYOR_API_TOKEN", ADMIN), ("CONVEYOR_READ_TOKEN", READ)]);
    let http = reqwest::Client::new();
    let bulk = |jobs: Vec<Value>| {
        let r = http.post(format!("{url}/api/jobs/bulk")).bearer_auth(ADMIN).json(&json!({ "jobs": jobs })).send();
        async move {
            let r = r.await.unwrap();
            assert_eq!(r.status(), reqwest::StatusCode::CREATED, "{}", r.text().await.unwrap());
        }
    };
    let noops =
        |n: usize| -> Vec<Value> { (0..n).map(|i| json!({ "kind": "conveyor.noop", "queue": "promq", "payload": { "i": i } })).collect() };
    let sleeps = |n: usize| -> Vec<Value> {
        (0..n).map(|i| json!({ "kind": "conveyor.sleep", "queue": "promsleep", "payload": { "ms": SLEEP_MS, "i": i } })).collect()
    };
    let drained = |queue: &'static str| {
        let env = &env;
        async move {
            let q = env.queue(queue).await;
            assert_eq!(q.failed, 0, "no job of {queue} fails");
            q.pending + q.reserved + q.delayed == 0
        }
    };

    // /metrics takes the read token, and what it answers passes promtool's lint.
    let r = http.get(format!("{url}/metrics")).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::UNAUTHORIZED);
    let r = http.get(format!("{url}/metrics")).bearer_auth(READ).send().await.unwrap();
    assert_eq!(r.status(), reqwest::StatusCode::OK);
    let metrics = r.text().await.unwrap();
    assert!(metrics.contains("conveyor_build_info{"), "{metrics}");
    lint(&metrics);

    let target = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    let prom = Prometheus::start(&target).await;

    // Warm-up: the series of both queues exist in Prometheus before the measured jobs run (a
    // series' first sample is its start: an increase before it is invisible to `increase()`).
    bulk(noops(1)).await;
    bulk(sleeps(1)).await;
    prom.wait_value(&format!("sum({NOOPS})"), 1.0, Duration::from_secs(30)).await;
    prom.wait_value(&format!("sum({SLEEP_COUNT})"), 1.0, Duration::from_secs(30)).await;
    prom.wait_value(r#"sum(conveyor_jobs_enqueued_total{queue="promq"})"#, 1.0, Duration::from_secs(10)).await;

    // N jobs in one request: the counters Prometheus stores grow by exactly N (from the 1 above).
    bulk(noops(N)).await;
    crate::wait_for("the noop jobs to finish", Duration::from_secs(30), || drained("promq")).await;
    let total = (N + 1) as f64;
    prom.wait_value(&format!("sum({NOOPS})"), total, Duration::from_secs(15)).await;
    prom.wait_scrapes(3.0).await;
    assert_eq!(prom.value(&format!("sum({NOOPS})")).await, Some(total), "a counter does not move once the jobs are done");
    assert_eq!(prom.value(r#"sum(conveyor_jobs_enqueued_total{queue="promq"})"#).await, Some(total));
    for outcome in ["retried", "failed"] {
        let v = prom.value(&format!(r#"sum(conveyor_jobs_total{{queue="promq",outcome="{outcome}"}})"#)).await;
        assert!(v.is_none() || v == Some(0.0), "no job was {outcome}: {v:?}");
    }
    // `increase()` extrapolates; at the last scrape's time and over the series' whole life it is N
    // give or take a little.
    let last = prom.value(&format!("timestamp({NOOPS})")).await.unwrap();
    let increase = prom.value_at(&format!("sum(increase({NOOPS}[10m]))"), Some(last)).await.unwrap();
    eprintln!("increase() of {N} completed jobs: {increase}");
    assert!((increase - N as f64).abs() <= N as f64 * 0.1, "increase over the window is {increase}, want {N} ± 10%");

    // SLEEPS jobs of 300 ms: the count grows by exactly SLEEPS (from the 1 above), and each job
    // lands in the (0.25 s, 0.5 s] bucket.
    bulk(sleeps(SLEEPS)).await;
    crate::wait_for("the sleep jobs to finish", Duration::from_secs(30), || drained("promsleep")).await;
    let total = (SLEEPS + 1) as f64;
    prom.wait_value(&format!("sum({SLEEP_COUNT})"), total, Duration::from_secs(15)).await;
    prom.wait_scrapes(2.0).await;
    let bucket = |le: &str| format!(r#"sum(conveyor_job_duration_seconds_bucket{{queue="promsleep",le="{le}"}})"#);
    assert_eq!(prom.value(&bucket("0.25")).await, Some(0.0), "no 300 ms job ran in 250 ms or less");
    assert_eq!(prom.value(&bucket("0.5")).await, Some(total), "every 300 ms job ran in 500 ms or less");
    assert_eq!(prom.value(&bucket("+Inf")).await, Some(total));
    let p50 = prom
        .value(r#"histogram_quantile(0.5, sum by (le) (rate(conveyor_job_duration_seconds_bucket{queue="promsleep"}[1m])))"#)
        .await
        .unwrap();
    assert!((0.25..=0.5).contains(&p50), "p50 of 300 ms jobs is {p50} s");
    let mean = prom
        .value(r#"sum(conveyor_job_duration_seconds_sum{queue="promsleep"}) / sum(conveyor_job_duration_seconds_count{queue="promsleep"})"#)
        .await
        .unwrap();
    eprintln!("{SLEEP_MS} ms jobs: p50 {p50} s, mean {mean} s");
    assert!((0.3..0.5).contains(&mean), "mean run time of 300 ms jobs is {mean} s");
    assert_eq!(
        prom.value(r#"sum(conveyor_job_wait_seconds_count{queue="promsleep"})"#).await,
        Some(total),
        "every attempt's wait is timed"
    );

    // The rules of alerts.yml loaded and evaluate without error; their queries run; none is
    // active on this healthy server.
    let deadline = Instant::now() + Duration::from_secs(20);
    let rules = loop {
        let r = prom.get("/api/v1/rules", &[]).await;
        assert_eq!(r["status"], "success", "{r}");
        let groups = r["data"]["groups"].as_array().unwrap().clone();
        let rules: Vec<Value> = groups.iter().flat_map(|g| g["rules"].as_array().unwrap().clone()).collect();
        let mut names: Vec<&str> = groups.iter().map(|g| g["name"].as_str().unwrap()).collect();
        names.sort_unstable();
        assert_eq!(names, ["conveyor-availability", "conveyor-integrations", "conveyor-jobs"], "{r}");
        if rules.iter().all(|rule| rule["health"] == "ok") {
            break rules;
        }
        let bad: Vec<_> = rules.iter().filter(|rule| rule["health"] == "err").collect();
        assert!(bad.is_empty(), "rules failing to evaluate: {bad:?}");
        assert!(Instant::now() < deadline, "rules not all evaluated: {r}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(rules.len() >= 6, "{rules:?}");
    for rule in &rules {
        assert_eq!(rule["type"], "alerting", "{rule}");
        assert_eq!(rule["lastError"].as_str().unwrap_or(""), "", "{rule}");
        let severity = rule["labels"]["severity"].as_str().unwrap_or("");
        assert!(["critical", "warning"].contains(&severity), "{rule}");
        assert!(rule["annotations"]["summary"].is_string() && rule["annotations"]["description"].is_string(), "{rule}");
        prom.query(rule["query"].as_str().unwrap()).await;
    }
    let alerts = prom.get("/api/v1/alerts", &[]).await;
    assert_eq!(alerts["data"]["alerts"], json!([]), "no alert on a healthy server: {alerts}");

    // Every query of the dashboard runs; those about what happened here have data.
    let queries = dashboard_queries();
    assert!(queries.len() >= 15, "{queries:?}");
    for (title, q) in &queries {
        let data = prom.query(q).await;
        let with_data =
            ["Completed / s", "Throughput by outcome", "Enqueued by queue", "Job duration", "Job wait", "Backlog", "Workers", "Version"];
        if with_data.contains(&title.as_str()) {
            assert!(!data["result"].as_array().unwrap().is_empty(), "panel {title:?}: {q} has no data");
        }
    }

    // Scrapes: with the read token the target is up; without it /metrics answers 401.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = prom.get("/api/v1/targets", &[]).await;
        let targets = t["data"]["activeTargets"].as_array().unwrap().clone();
        let job = |name: &str| targets.iter().find(|t| t["labels"]["job"] == name).cloned().unwrap_or(Value::Null);
        let (with, without) = (job("conveyor"), job("conveyor-no-token"));
        if without["health"] == "down" {
            assert_eq!(with["health"], "up", "{with}");
            assert!(without["lastError"].as_str().unwrap().contains("401"), "{without}");
            break;
        }
        assert!(Instant::now() < deadline, "the scrape without a token never failed: {t}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(prom.value(r#"up{job="conveyor-no-token"}"#).await, Some(0.0));

    drop(prom);
    sigterm(&server);
    assert!(wait_exit(&mut server, Duration::from_secs(30)).await.success());
}
