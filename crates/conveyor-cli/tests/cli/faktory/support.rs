//! What the Faktory tests share: the client libraries (installed on first use), the client
//! processes, `conveyor serve` with its Faktory port, and the HTTP API.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use crate::{wait_for, TestEnv};

pub(super) const ADMIN: &str = "fk-admin-token-1";
pub(super) const PUBLISH: &str = "fk-publish-token-1";
pub(super) const WORKER: &str = "fk-worker-token-1";
pub(super) const READ: &str = "fk-read-token-1";

/// The client scripts.
pub(super) const SCRIPTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/faktory");

pub(super) fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

pub(super) fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_millis() as i64
}

// --- installing the clients -------------------------------------------------------------------

pub(super) fn run(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{what}: {}{}", String::from_utf8_lossy(&out.stdout).trim(), String::from_utf8_lossy(&out.stderr).trim()))
    }
}

/// A Python with pyfaktory 0.2.13, in a virtual environment under the target directory
/// (installed once per test binary; kept for the next runs).
pub(super) fn pyfaktory() -> &'static Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let venv = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("pyfaktory-0.2.13-venv");
        let python = venv.join("bin").join("python");
        let has_it = || {
            Command::new(&python)
                .args(["-c", "import importlib.metadata as m, pyfaktory; assert m.version('pyfaktory') == '0.2.13'"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if has_it() {
            return Ok(python);
        }
        run(Command::new("python3").args(["-m", "venv"]).arg(&venv), "python3 -m venv")?;
        run(
            Command::new(&python).args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "pyfaktory==0.2.13"]),
            "pip install pyfaktory==0.2.13",
        )?;
        if has_it() {
            Ok(python)
        } else {
            Err("pyfaktory does not import after installing it".into())
        }
    })
}

/// The `node_modules` folder (for `NODE_PATH`) of faktory-worker 4.7.1, installed once with npm
/// under the target directory.
pub(super) fn faktory_worker_node() -> &'static Result<PathBuf, String> {
    static NODE: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    NODE.get_or_init(|| {
        let version = run(Command::new("node").arg("--version"), "node --version")?;
        let major: u32 = version.trim().trim_start_matches('v').split('.').next().and_then(|m| m.parse().ok()).unwrap_or(0);
        if major < 16 {
            return Err(format!("faktory-worker 4.7.1 needs node 16 or newer, not {}", version.trim()));
        }
        run(Command::new("npm").arg("--version"), "npm --version")?;
        let prefix = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("faktory-worker-4.7.1-node");
        let modules = prefix.join("node_modules");
        let has_it = || {
            Command::new("node")
                .env("NODE_PATH", &modules)
                .args(["-e", "if (require('faktory-worker/package.json').version !== '4.7.1') process.exit(1)"])
                .output()
                .is_ok_and(|o| o.status.success())
        };
        if has_it() {
            return Ok(modules);
        }
        std::fs::create_dir_all(&prefix).map_err(|e| format!("creating {}: {e}", prefix.display()))?;
        run(
            Command::new("npm")
                .args(["install", "--silent", "--no-audit", "--no-fund", "--prefix"])
                .arg(&prefix)
                .arg("faktory-worker@4.7.1"),
            "npm install faktory-worker@4.7.1",
        )?;
        if has_it() {
            Ok(modules)
        } else {
            Err("faktory-worker does not load after installing it".into())
        }
    })
}

/// The language of the client scripts, with what runs them.
#[derive(Clone)]
pub(super) enum Lang {
    /// The venv's python.
    Python(PathBuf),
    /// faktory-worker's `node_modules`.
    Node(PathBuf),
}

impl Lang {
    /// pyfaktory, or `None` when it can't be had outside CI (the test is skipped).
    pub(super) fn python() -> Option<Lang> {
        match pyfaktory() {
            Ok(python) => Some(Lang::Python(python.clone())),
            Err(e) if ci() => panic!("CI needs python3 with pip (and PyPI) for the Faktory tests: {e}"),
            Err(e) => {
                eprintln!("skipping: no pyfaktory ({e})");
                None
            }
        }
    }

    /// faktory-worker, or `None` when it can't be had outside CI (the test is skipped).
    pub(super) fn node() -> Option<Lang> {
        match faktory_worker_node() {
            Ok(modules) => Some(Lang::Node(modules.clone())),
            Err(e) if ci() => panic!("CI needs node and npm (and the npm registry) for the Faktory tests: {e}"),
            Err(e) => {
                eprintln!("skipping: no faktory-worker for node ({e})");
                None
            }
        }
    }

    /// The prefix of this language's jobtypes (`py.ok`, `node.ok`).
    pub(super) fn prefix(&self) -> &'static str {
        match self {
            Lang::Python(_) => "py",
            Lang::Node(_) => "node",
        }
    }

    /// Runs `tests/faktory/<script>.py|.js` against the Faktory server at `url`.
    pub(super) fn command(&self, script: &str, url: &str) -> Command {
        let mut c = match self {
            Lang::Python(python) => {
                let mut c = Command::new(python);
                c.arg(Path::new(SCRIPTS).join(format!("{script}.py"))).env("PYTHONUNBUFFERED", "1");
                c
            }
            Lang::Node(modules) => {
                let mut c = Command::new("node");
                c.arg(Path::new(SCRIPTS).join(format!("{script}.js"))).env("NODE_PATH", modules);
                c
            }
        };
        c.env("FAKTORY_URL", url).env_remove("FAKTORY_PROVIDER");
        c
    }

    /// Starts a worker for `jobtypes` on queue `default`, recording into `out`.
    pub(super) fn worker(&self, url: &str, concurrency: usize, jobtypes: &[&str], out: &Path, dir: &Path, name: &str) -> ClientProc {
        let mut c = self.command("worker", url);
        c.arg("--concurrency").arg(concurrency.to_string()).args(jobtypes).env("OUT", out);
        ClientProc::spawn(c, dir, name)
    }

    /// Runs the producer to its end and returns what it printed, or its exit status and log when
    /// it failed.
    pub(super) async fn produce(&self, url: &str, args: &[&str], dir: &Path, name: &str) -> Result<Value, (ExitStatus, String)> {
        let mut c = self.command("producer", url);
        c.args(args);
        let mut p = ClientProc::spawn(c, dir, name);
        let status = crate::wait_exit(&mut p.child, Duration::from_secs(60)).await;
        if !status.success() {
            return Err((status, p.log()));
        }
        let stdout = p.stdout();
        Ok(serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{name} printed no JSON ({e}): {stdout:?}\n{}", p.log())))
    }
}

// --- processes ---------------------------------------------------------------------------------

/// A client process, leader of a process group of its own: the group is killed (SIGKILL) when
/// the value goes, and the output is printed if that happens in a failing test.
pub(super) struct ClientProc {
    pub(super) child: Child,
    pub(super) name: String,
    pub(super) stdout: PathBuf,
    pub(super) log: PathBuf,
}

impl ClientProc {
    pub(super) fn spawn(mut cmd: Command, dir: &Path, name: &str) -> ClientProc {
        let stdout = dir.join(format!("{name}.stdout"));
        let log = dir.join(format!("{name}.log"));
        let file = |p: &Path| std::fs::File::create(p).unwrap_or_else(|e| panic!("creating {}: {e}", p.display()));
        cmd.stdin(Stdio::null()).stdout(file(&stdout)).stderr(file(&log)).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawning {name}: {e}"));
        ClientProc { child, name: name.to_string(), stdout, log }
    }

    pub(super) fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    pub(super) fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL to the whole group (a pyfaktory worker and its handler processes), then reaps the
    /// leader.
    pub(super) fn kill_group(&mut self) {
        // SAFETY: kill(2) on the process group this value's child leads. The group id stays ours
        // while any member lives (a pid is not reused as long as a group with that id exists).
        unsafe { libc::kill(-(self.child.id() as libc::pid_t), libc::SIGKILL) };
        let _ = self.child.wait();
    }

    pub(super) fn running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for ClientProc {
    fn drop(&mut self) {
        self.kill_group();
        if std::thread::panicking() {
            eprintln!("--- {} stdout ---\n{}", self.name, tail(&self.stdout(), 20));
            eprintln!("--- {} log ---\n{}", self.name, tail(&self.log(), 60));
        }
    }
}

pub(super) fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// `conveyor serve` with the Faktory listener on a free port; its log (CONVEYOR_LOG=warn, or
/// `CONVEYOR_TEST_SERVE_LOG` when set) goes to `serve.log` and is printed if the test fails.
pub(super) struct Server {
    pub(super) _proc: crate::Proc,
    pub(super) http: String,
    pub(super) port: u16,
    pub(super) log: PathBuf,
}

impl Server {
    pub(super) async fn start(env: &TestEnv, extra_env: &[(&str, &str)]) -> Server {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("a free port").port();
        let mut cmd = env.conveyor(&["serve"]);
        cmd.env("CONVEYOR_HTTP_ADDR", "127.0.0.1:0").env("CONVEYOR_FAKTORY_ADDR", format!("127.0.0.1:{port}"));
        if let Ok(filter) = std::env::var("CONVEYOR_TEST_SERVE_LOG") {
            cmd.env("CONVEYOR_LOG", filter);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let mut child = cmd.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().expect("spawning conveyor serve");
        let log = env.dir.path().join("serve.log");
        let mut sink = std::fs::File::create(&log).expect("creating serve.log");
        let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
        let http = loop {
            use std::io::Write as _;
            let Some(Ok(line)) = lines.next() else {
                let _ = child.wait();
                panic!("serve exited before it listened: {}", std::fs::read_to_string(&log).unwrap_or_default());
            };
            let _ = writeln!(sink, "{line}");
            if let Some(rest) = line.split("listening on http://").nth(1) {
                break format!("http://{}", rest.split_whitespace().next().unwrap());
            }
        };
        // Keep copying its log so the child never blocks on a full pipe.
        std::thread::spawn(move || {
            use std::io::Write as _;
            for line in lines.map_while(Result::ok) {
                let _ = writeln!(sink, "{line}");
            }
        });
        let server = Server { _proc: crate::Proc(child), http, port, log };
        wait_for("the Faktory listener to greet with HI", Duration::from_secs(20), || async { server.greets() }).await;
        server
    }

    /// A connection to the Faktory port gets `+HI {…}`.
    pub(super) fn greets(&self) -> bool {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else { return false };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let mut buf = [0u8; 256];
        let mut got = Vec::new();
        while !got.ends_with(b"\r\n") {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
            }
        }
        got.starts_with(b"+HI {")
    }

    /// FAKTORY_URL with `token` as the password.
    pub(super) fn url(&self, token: &str) -> String {
        format!("tcp://:{token}@127.0.0.1:{}", self.port)
    }

    pub(super) fn api(&self) -> Api {
        Api { http: reqwest::Client::new(), url: self.http.clone(), token: ADMIN.to_string() }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- conveyor serve log ---\n{}", tail(&std::fs::read_to_string(&self.log).unwrap_or_default(), 60));
        }
    }
}

/// Every role's token: the Faktory password is one of them.
pub(super) fn tokens() -> [(&'static str, &'static str); 4] {
    [("CONVEYOR_API_TOKEN", ADMIN), ("CONVEYOR_PUBLISH_TOKEN", PUBLISH), ("CONVEYOR_WORKER_TOKEN", WORKER), ("CONVEYOR_READ_TOKEN", READ)]
}

// --- the HTTP API ------------------------------------------------------------------------------

pub(super) struct Api {
    pub(super) http: reqwest::Client,
    pub(super) url: String,
    pub(super) token: String,
}

impl Api {
    pub(super) async fn data(&self, path: &str) -> Value {
        let r = self.http.get(format!("{}{path}", self.url)).bearer_auth(&self.token).send().await.unwrap();
        let status = r.status();
        let body: Value = r.json().await.unwrap();
        assert!(status.is_success(), "GET {path}: {status} {body}");
        body["data"].clone()
    }

    /// The jobs of `kind` in `state` (up to 1,000).
    pub(super) async fn jobs(&self, kind: &str, state: &str) -> Vec<Value> {
        let rows = self.data(&format!("/api/jobs?kind={kind}&status={state}&per_page=1000")).await;
        let rows = rows.as_array().cloned().unwrap_or_default();
        for r in &rows {
            assert_eq!((r["kind"].as_str(), r["state"].as_str()), (Some(kind), Some(state)), "the API filters by kind and state: {r}");
        }
        rows
    }

    /// The failed store's rows of `kind`.
    pub(super) async fn failed(&self, kind: &str) -> Vec<Value> {
        let rows = self.data("/api/jobs/failed?per_page=1000").await;
        rows.as_array().cloned().unwrap_or_default().into_iter().filter(|r| r["kind"] == kind).collect()
    }

    pub(super) async fn queue(&self, name: &str) -> Value {
        let queues = self.data("/api/queues").await;
        queues.as_array().and_then(|qs| qs.iter().find(|q| q["queue"] == name).cloned()).unwrap_or(Value::Null)
    }
}

/// The tag of a job the scripts pushed (`args` = [i, tag, sleep]).
pub(super) fn tag_of(job: &Value) -> Option<&str> {
    job["payload"]["args"][1].as_str()
}

/// The lines of a worker's OUT file that start with `tag:`.
pub(super) fn recorded(out: &Path, tag: &str) -> Vec<String> {
    let prefix = format!("{tag}:");
    std::fs::read_to_string(out).unwrap_or_default().lines().filter(|l| l.starts_with(&prefix)).map(str::to_string).collect()
}

pub(super) fn distinct(lines: &[String]) -> BTreeSet<String> {
    lines.iter().cloned().collect()
}

/// A job that failed once with the default retry (25) waits with Faktory's first backoff: 15 s
/// plus up to 30 s of jitter after its FAIL, which happened between `since` and `until`
/// (ms since the epoch). A second of slack either way for rounding.
pub(super) fn assert_first_backoff(job: &Value, since: i64, until: i64) {
    let at = job["available_at"].as_i64().unwrap_or_else(|| panic!("a delayed job has available_at: {job}"));
    assert!(
        at >= since + 15_000 - 1_000 && at <= until + 45_000 + 1_000,
        "the first retry waits 15-45 s after the FAIL (between {since} and {until}), not until {at}: {job}"
    );
    assert_eq!((job["attempts"].as_u64(), job["max_attempts"].as_u64()), (Some(1), Some(26)), "retry 25 is 26 attempts, one spent: {job}");
}

/// Waits (30 s) for the one job of `kind` and `tag` to be delayed after its FAIL; returns it with
/// the window in which the FAIL happened (from the start of the last poll that did not see it).
pub(super) async fn delayed_after_fail(api: &Api, kind: &str, tag: &str, pushed_at: i64) -> (Value, i64, i64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut since = pushed_at;
    loop {
        let start = now_ms();
        let rows = api.jobs(kind, "delayed").await;
        let end = now_ms();
        if let Some(job) = rows.into_iter().find(|j| tag_of(j) == Some(tag)) {
            return (job, since, end);
        }
        assert!(Instant::now() < deadline, "timed out waiting for the {kind} job tagged {tag} to be delayed after its FAIL");
        since = start;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
