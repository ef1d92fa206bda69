//! Signed webhooks and the outbound policy through the real API: a receiver written against
//! the *reference* Standard Webhooks library (the `standardwebhooks` Python package) verifies
//! every delivery of `conveyor serve` — with a rule's secret, a user's, after a rotation with
//! both, and for a destination from before per-destination secrets with the legacy secret.
//! Without python3 and pip the test is skipped outside CI and fails under `CI=true`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{json, Value};

use conveyor_core::backend::QueueBackendExt;

use crate::http::serve;
use crate::{sigterm, wait_exit, wait_for, Proc, TestEnv};

/// Verifies each delivery with every secret in `secrets.json` (label → secret, re-read per
/// request) and appends `{path, id, results: {label: "OK" | "FAIL: why"}}` to `results.jsonl`.
const RECEIVER: &str = r#"
import http.server, json, os, sys
from standardwebhooks import Webhook

secrets_path, results_path = sys.argv[1], sys.argv[2]

class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        try:
            with open(secrets_path) as f:
                secrets = json.load(f)
        except FileNotFoundError:
            secrets = {}
        results = {}
        for label, secret in secrets.items():
            try:
                Webhook(secret).verify(body, dict(self.headers))
                results[label] = "OK"
            except Exception as e:
                results[label] = "FAIL: " + str(e)
        record = {"path": self.path, "id": self.headers.get("webhook-id"), "results": results}
        with open(results_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.send_response(200)
        self.send_header("content-length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass

server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
print(server.server_address[1], flush=True)
server.serve_forever()
"#;

/// A Python with the PyPI package `package` (imported as `module`), in a virtual environment of
/// its own kept under the target directory (installed with pip on first use, as
/// `scripts/fuzz-api.sh` installs its tools).
pub(crate) fn reference_python(package: &str, module: &str) -> Result<PathBuf, String> {
    // Tests run in parallel: one creates a venv while the others wait for it.
    static INSTALLING: Mutex<()> = Mutex::new(());
    let _one = INSTALLING.lock().unwrap_or_else(PoisonError::into_inner);
    let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{package}-venv"));
    let python = venv.join("bin").join("python");
    let has_it = |py: &Path| Command::new(py).args(["-c", &format!("import {module}")]).output().is_ok_and(|o| o.status.success());
    if has_it(&python) {
        return Ok(python);
    }
    let run = |cmd: &mut Command, what: &str| -> Result<(), String> {
        let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!("{what}: {}", String::from_utf8_lossy(&out.stderr).trim()))
        }
    };
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv")?;
    run(Command::new(&python).args(["-m", "pip", "install", "--quiet", package]), &format!("pip install {package}"))?;
    if has_it(&python) {
        Ok(python)
    } else {
        Err(format!("{module} does not import after installing {package}"))
    }
}

/// [`reference_python`], or `None` (the test is skipped) when there is no Python with pip —
/// except under `CI=true`, where that fails the test.
pub(crate) fn python_or_skip(package: &str, module: &str) -> Option<PathBuf> {
    match reference_python(package, module) {
        Ok(p) => Some(p),
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => panic!("CI needs python3 with pip for this test: {e}"),
        Err(e) => {
            eprintln!("skipping: no Python with {package} ({e})");
            None
        }
    }
}

/// A Python receiver on loopback: `script` gets the secrets file and the results file as its
/// arguments and prints its port (the HTTP kinds' test runs one of its own with this).
pub(crate) struct Receiver {
    _proc: Proc,
    pub(crate) url: String,
    secrets: PathBuf,
    results: PathBuf,
}

impl Receiver {
    fn start(python: &Path, dir: &Path) -> Receiver {
        Receiver::with_script(python, dir, RECEIVER)
    }

    pub(crate) fn with_script(python: &Path, dir: &Path, source: &str) -> Receiver {
        let script = dir.join("receiver.py");
        std::fs::write(&script, source).unwrap();
        let (secrets, results) = (dir.join("secrets.json"), dir.join("results.jsonl"));
        let mut child = Command::new(python)
            .arg(&script)
            .arg(&secrets)
            .arg(&results)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting the Python receiver");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| panic!("the receiver printed its port, not {line:?}"));
        Receiver { _proc: Proc(child), url: format!("http://127.0.0.1:{port}"), secrets, results }
    }

    /// The secrets the receiver checks each delivery with, by label.
    pub(crate) fn expect(&self, secrets: Value) {
        let tmp = self.secrets.with_extension("tmp");
        std::fs::write(&tmp, secrets.to_string()).unwrap();
        std::fs::rename(tmp, &self.secrets).unwrap();
    }

    pub(crate) fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.results).unwrap_or_default().lines().filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    async fn next(&self, seen: usize) -> Value {
        wait_for("a delivery at the Python receiver", Duration::from_secs(30), || async { self.records().len() > seen }).await;
        self.records()[seen].clone()
    }
}

const ADMIN: &str = "admin-token-for-webhooks";
const LEGACY: &str = "legacy-secret-from-config";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deliveries_verify_with_the_reference_standard_webhooks_library() {
    let Some(python) = python_or_skip("standardwebhooks", "standardwebhooks") else { return };
    let env = TestEnv::new("[outbound]\nallow = \"127.0.0.1/32\"\n");
    let receiver = Receiver::start(&python, env.dir.path());
    let (mut child, url) =
        serve(&env, &[("CONVEYOR_API_TOKEN", ADMIN), ("CONVEYOR_WEBHOOK_SECRET", LEGACY), ("CONVEYOR_NOTIFY_BACKOFF", "0")]);
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: &str| http.request(method, format!("{url}{path}")).bearer_auth(ADMIN);
    let post = |path: &str, body: Value| call(reqwest::Method::POST, path).json(&body).send();
    let data = |r: reqwest::Response| async move {
        let status = r.status();
        let v: Value = r.json().await.unwrap();
        assert!(status.is_success(), "{status}: {v}");
        v["data"].clone()
    };

    // Refused when stored: a literal private address (the allow list names only 127.0.0.1) or
    // another scheme, naming the field.
    for (path, body, field) in [
        ("/api/v1/users/register", json!({ "name": "X", "email": "x@example.com", "webhook_url": "http://10.1.2.3/in" }), "webhook_url"),
        (
            "/api/v1/users/register",
            json!({ "name": "X", "email": "x@example.com", "slack_webhook": "http://[::ffff:a00:1]/" }),
            "slack_webhook",
        ),
        ("/api/v1/users/register", json!({ "name": "X", "email": "x@example.com", "webhook_url": "http://0x7f000002/" }), "webhook_url"),
    ] {
        let r = post(path, body.clone()).await.unwrap();
        assert_eq!(r.status(), 422, "{body}");
        assert!(r.json::<Value>().await.unwrap()["error"]["details"]["fields"][field].is_string(), "{body}");
    }

    // A webhook rule: its secret comes with its creation, and never again in a read.
    let t = data(post("/api/templates", json!({ "name": "hook", "channel": "webhook", "body": "n={{ n }}" })).await.unwrap()).await;
    let bad = post("/api/rules", json!({ "event": "e", "template_id": t["id"], "channel": "webhook", "recipient": "ftp://example.com/" }))
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    let rule = post(
        "/api/rules",
        json!({ "event": "ping", "template_id": t["id"], "channel": "webhook", "recipient": format!("{}/rule", receiver.url) }),
    )
    .await
    .unwrap();
    assert_eq!(rule.status(), 201);
    let rule = data(rule).await;
    let (rule_id, first) = (rule["id"].as_i64().unwrap(), rule["secret"].as_str().unwrap().to_string());
    assert!(first.starts_with("whsec_"), "{rule}");
    let read = call(reqwest::Method::GET, &format!("/api/rules/{rule_id}")).send().await.unwrap().text().await.unwrap();
    let list = call(reqwest::Method::GET, "/api/rules").send().await.unwrap().text().await.unwrap();
    assert!(!read.contains("whsec_") && !list.contains("whsec_"), "no secret in reads: {read} {list}");
    let hidden = http.get(format!("{url}/api/rules/{rule_id}/secret")).send().await.unwrap();
    assert_eq!(hidden.status(), 401, "the secret needs the admin token");
    let shown = data(call(reqwest::Method::GET, &format!("/api/rules/{rule_id}/secret")).send().await.unwrap()).await;
    assert_eq!(shown["secrets"][0]["secret"], first.as_str());

    receiver.expect(json!({ "rule": first, "legacy": legacy_whsec() }));
    post("/api/events", json!({ "event": "ping", "payload": { "n": 1 } })).await.unwrap();
    let d = receiver.next(0).await;
    assert_eq!(d["results"]["rule"], "OK", "{d}");
    assert_ne!(d["results"]["legacy"], "OK", "a new destination has its own secret: {d}");

    // Rotation: the new secret is current, the previous one still verifies.
    let rotated = data(post(&format!("/api/rules/{rule_id}/secret/rotate"), json!({})).await.unwrap()).await;
    let second = rotated["secret"].as_str().unwrap().to_string();
    assert_ne!(second, first);
    receiver.expect(json!({ "old": first, "new": second }));
    post("/api/events", json!({ "event": "ping", "payload": { "n": 2 } })).await.unwrap();
    let d = receiver.next(1).await;
    assert_eq!((d["results"]["old"].as_str(), d["results"]["new"].as_str()), (Some("OK"), Some("OK")), "{d}");
    let shown = data(call(reqwest::Method::GET, &format!("/api/rules/{rule_id}/secret")).send().await.unwrap()).await;
    assert_eq!(
        (shown["secrets"][0]["secret"].as_str(), shown["secrets"][1]["secret"].as_str()),
        (Some(second.as_str()), Some(first.as_str()))
    );

    // A user with a webhook_url: a secret of their own.
    let user = post(
        "/api/v1/users/register",
        json!({ "name": "Una", "email": "una@example.com", "webhook_url": format!("{}/user", receiver.url) }),
    )
    .await
    .unwrap();
    let user = data(user).await;
    let user_secret = user["webhook_secret"].as_str().unwrap().to_string();
    let ut = data(post("/api/templates", json!({ "name": "user-hook", "channel": "webhook", "body": "hi" })).await.unwrap()).await;
    data(post("/api/rules", json!({ "event": "user_ping", "template_id": ut["id"], "channel": "webhook" })).await.unwrap()).await;
    receiver.expect(json!({ "user": user_secret, "rule": second }));
    post("/api/events", json!({ "event": "user_ping", "payload": { "user_id": user["user_id"] } })).await.unwrap();
    let d = receiver.next(2).await;
    assert_eq!(d["path"], "/user");
    assert_eq!(d["results"]["user"], "OK", "{d}");
    assert_ne!(d["results"]["rule"], "OK", "another owner's secret does not verify: {d}");

    // A destination from before per-destination secrets (no secret of its own: a rule whose
    // secret row is removed before its first delivery) is signed with the legacy secret, and
    // keeps it valid for the overlap when rotated.
    let old = post(
        "/api/rules",
        json!({ "event": "old_ping", "template_id": t["id"], "channel": "webhook", "recipient": format!("{}/old", receiver.url) }),
    )
    .await
    .unwrap();
    let old_id = data(old).await["id"].as_i64().unwrap();
    let owner = format!("rule:{old_id}");
    env.backend.transact(move |tx| tx.execute("DELETE FROM notify_secrets WHERE owner = $1", &[owner.into()])).await.unwrap();
    let shown = data(call(reqwest::Method::GET, &format!("/api/rules/{old_id}/secret")).send().await.unwrap()).await;
    assert_eq!(shown["secrets"][0]["legacy"], true, "{shown}");
    receiver.expect(json!({ "legacy": legacy_whsec() }));
    post("/api/events", json!({ "event": "old_ping", "payload": { "n": 3 } })).await.unwrap();
    assert_eq!(receiver.next(3).await["results"]["legacy"], "OK");
    let rotated = data(post(&format!("/api/rules/{old_id}/secret/rotate"), json!({ "previous_valid_for": 3600 })).await.unwrap()).await;
    let third = rotated["secret"].as_str().unwrap().to_string();
    receiver.expect(json!({ "legacy": legacy_whsec(), "new": third }));
    post("/api/events", json!({ "event": "old_ping", "payload": { "n": 4 } })).await.unwrap();
    let d = receiver.next(4).await;
    assert_eq!((d["results"]["legacy"].as_str(), d["results"]["new"].as_str()), (Some("OK"), Some("OK")), "{d}");

    sigterm(&child);
    assert!(wait_exit(&mut child, Duration::from_secs(30)).await.success());
}

/// `CONVEYOR_WEBHOOK_SECRET` as a Standard Webhooks secret: its bytes are the key.
fn legacy_whsec() -> String {
    format!("whsec_{}", base64::engine::general_purpose::STANDARD.encode(LEGACY))
}
