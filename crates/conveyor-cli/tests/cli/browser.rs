//! The dashboard in a real browser: Debian's headless Chromium driven over WebDriver by
//! chromedriver. Screenshots of the main pages land in `target/screenshots/`.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use conveyor_core::backend::ReserveRequest;
use conveyor_core::job::{Completion, Outcome};
use conveyor_core::NewJob;
use serde_json::{json, Value};

use crate::{sigterm, wait_exit, TestEnv};

/// A WebDriver session: just the commands these tests use.
struct Browser {
    http: reqwest::Client,
    base: String,
    session: String,
    driver: Child,
}

impl Browser {
    async fn start() -> Option<Browser> {
        let chromedriver =
            ["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"].into_iter().find(|p| std::path::Path::new(p).exists());
        let Some(chromedriver) = chromedriver else {
            assert!(std::env::var("CI").is_err(), "chromedriver is missing (apt-get install chromium chromium-driver)");
            eprintln!("skipping browser test: chromedriver not installed (apt-get install chromium chromium-driver)");
            return None;
        };
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        // Its own process group, so dropping the browser ends chromedriver *and* the Chromium it
        // started, even when a test panics.
        let driver = Command::new(chromedriver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .unwrap();
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let profile = tempfile::tempdir().unwrap().keep();
        let caps = json!({ "capabilities": { "alwaysMatch": { "browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1280,900", format!("--user-data-dir={}", profile.display())]
        }}}});
        let deadline = Instant::now() + Duration::from_secs(20);
        let session = loop {
            if let Ok(r) = http.post(format!("{base}/session")).json(&caps).send().await {
                let v: Value = r.json().await.unwrap();
                break v["value"]["sessionId"].as_str().unwrap_or_else(|| panic!("no WebDriver session: {v}")).to_string();
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        Some(Browser { http, base, session, driver })
    }

    async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let url = format!("{}/session/{}{path}", self.base, self.session);
        let req = self.http.request(method.clone(), url);
        let req = if method == reqwest::Method::GET || method == reqwest::Method::DELETE { req } else { req.json(&body) };
        let r = req.send().await.unwrap_or_else(|e| panic!("WebDriver {path}: {e:?}"));
        let text = r.text().await.unwrap_or_else(|e| panic!("WebDriver {path} body: {e:?}"));
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|_| panic!("WebDriver {path} answered {text:?}"));
        v["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({ "url": url })).await;
    }

    async fn js(&self, script: &str) -> Value {
        self.cmd(reqwest::Method::POST, "/execute/sync", json!({ "script": script, "args": [] })).await
    }

    /// Clicks the element `css` with a real WebDriver click.
    async fn click(&self, css: &str) {
        let el = self.cmd(reqwest::Method::POST, "/element", json!({ "using": "css selector", "value": css })).await;
        let id = el["element-6066-11e4-a52e-4f735466cecf"].as_str().unwrap_or_else(|| panic!("no element {css}: {el}")).to_string();
        self.cmd(reqwest::Method::POST, &format!("/element/{id}/click"), json!({})).await;
    }

    async fn text(&self, css: &str) -> String {
        let v = self.js(&format!("const e = document.querySelector({css:?}); return e ? e.innerText : null;")).await;
        v.as_str().unwrap_or_default().to_string()
    }

    async fn wait_text(&self, what: &str, css: &str, cond: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let t = self.text(css).await;
            if cond(&t) {
                return t;
            }
            if Instant::now() > deadline {
                self.screenshot("failure").await;
                panic!("timed out waiting for {what}; {css} shows {t:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn screenshot(&self, name: &str) {
        let b64 = self.cmd(reqwest::Method::GET, "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD.decode(b64.as_str().unwrap_or_default()).unwrap_or_default();
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/screenshots");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
    }
}

impl Browser {
    /// Ends the session cleanly (Chromium exits), then the driver.
    async fn quit(self) {
        self.cmd(reqwest::Method::DELETE, "", Value::Null).await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the process group we created for chromedriver and its browser.
        unsafe { libc::kill(-(self.driver.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_live_numbers_retries_a_failed_job_and_pauses_a_queue() {
    let Some(browser) = Browser::start().await else { return };
    let env = TestEnv::new(
        "[[supervisors]]\nqueues = [\"default\", \"mail\"]\nmax_workers = 8\nbalance = \"simple\"\n\n\
         [[supervisors]]\nname = \"notify\"\nqueues = [\"notify\", \"notify.email\", \"notify.database\"]\nconcurrency = 2\n",
    );
    // A failed job whose payload is fine: retrying it from the dashboard makes it succeed.
    let failed = env.backend.enqueue(vec![NewJob::new("conveyor.sleep", &json!({ "ms": 5 }))]).await.unwrap()[0].id();
    let req = ReserveRequest { queues: vec!["default".into()], max: 1, lease: Duration::from_secs(30), worker: "test".into() };
    let job = env.backend.reserve(req).await.unwrap().remove(0);
    env.backend.complete(vec![Completion::of(&job, Outcome::Failed { error: "smtp: connection refused".into() })]).await.unwrap();
    env.backend.enqueue(vec![NewJob::new("conveyor.noop", &json!({})).queue("mail")]).await.unwrap();

    let (mut server, url) = crate::http::serve(&env, &[]);
    browser.goto(&format!("{url}/dashboard")).await;
    browser.wait_text("the workload table", "#data table", |t| t.contains("mail")).await;
    let before = browser.text("[data-stat='Jobs past hour']").await;
    let jobs: Vec<NewJob> = (0..300).map(|i| NewJob::new("conveyor.sleep", &json!({ "ms": 20, "n": i }))).collect();
    env.backend.enqueue(jobs).await.unwrap();
    let after = browser
        .wait_text("the numbers to move without a reload", "[data-stat='Jobs past hour']", |t| {
            let n = |s: &str| s.replace(',', "").parse::<u64>().unwrap_or(0);
            n(t) >= n(&before) + 100
        })
        .await;
    browser.screenshot("overview").await;
    eprintln!("jobs past hour went from {before} to {after} live");

    browser.goto(&format!("{url}/dashboard#/failed")).await;
    browser.wait_text("the failed job", "#data", |t| t.contains("smtp: connection refused")).await;
    browser.screenshot("failed").await;
    browser.goto(&format!("{url}/dashboard#/jobs/{failed}")).await;
    browser.wait_text("the job page", "#data", |t| t.contains("Retry")).await;
    browser.screenshot("job").await;
    browser.click("#data button.primary").await;
    browser.wait_text("the retried job to complete", "#data .pill", |t| t == "completed").await;

    browser.goto(&format!("{url}/dashboard#/queues")).await;
    browser.wait_text("the queues page", "#data", |t| t.contains("mail")).await;
    browser.click("#data tr:nth-child(2) button[data-action='pause']").await;
    browser.wait_text("the queue to show paused", "#data tr:nth-child(2)", |t| t.contains("paused")).await;
    assert!(env.queue("mail").await.paused, "the pause reached the backend");
    browser.screenshot("queues").await;
    browser.click("#data tr:nth-child(2) button[data-action='resume']").await;
    browser.wait_text("the queue to run again", "#data tr:nth-child(2)", |t| t.contains("running")).await;
    assert!(!env.queue("mail").await.paused);

    browser.goto(&format!("{url}/dashboard#/metrics")).await;
    browser.wait_text("the metrics charts", "#data", |t| t.contains("Jobs processed")).await;
    browser.screenshot("metrics").await;

    // A registration's welcome messages show in the notification log.
    let r = reqwest::Client::new()
        .post(format!("{url}/api/v1/users/register"))
        .json(&json!({ "name": "Ada", "email": "ada@example.com" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    browser.goto(&format!("{url}/dashboard#/notifications")).await;
    browser.wait_text("both welcome messages sent", "#data", |t| t.contains("user_registered") && t.matches("sent").count() >= 2).await;
    browser.screenshot("notifications").await;

    browser.quit().await;
    sigterm(&server);
    assert!(wait_exit(&mut server, Duration::from_secs(30)).await.success());
}
