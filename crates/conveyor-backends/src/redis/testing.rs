//! For tests: a key prefix of its own on the machine's Redis (its keys deleted when the guard
//! goes), and a Redis server of a test's own on a free port for fault tests.
//!
//! The shared server is `CONVEYOR_TEST_REDIS_URL` (default `redis://127.0.0.1:6379`). When it
//! cannot be reached, [`TestRedis::create`] returns `None` and prints why, so a test can skip —
//! except under CI (`CI` set), where a missing server is a failure.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The server tests use.
pub fn server_url() -> String {
    std::env::var("CONVEYOR_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A prefix no other test uses; every key under it is deleted on drop. Never `FLUSHALL`.
pub struct TestRedis {
    pub url: String,
    pub prefix: String,
}

impl TestRedis {
    pub fn create() -> Option<TestRedis> {
        let url = server_url();
        let prefix = format!("conveyor-test-{:016x}", rand::random::<u64>());
        match ping(&url) {
            Ok(()) => Some(TestRedis { url, prefix }),
            Err(e) if std::env::var_os("CI").is_some() => panic!("Redis at {url} is required under CI: {e}"),
            Err(e) => {
                eprintln!("skipping: Redis at {url} is not reachable ({e})");
                None
            }
        }
    }

    /// How many keys live under this prefix.
    pub fn key_count(&self) -> usize {
        keys(&self.url, &super::tag_of(&self.prefix)).map_or(0, |k| k.len())
    }
}

impl Drop for TestRedis {
    fn drop(&mut self) {
        let tag = super::tag_of(&self.prefix);
        if let Ok(keys) = keys(&self.url, &tag) {
            if let Ok(client) = super::conn::client(&self.url) {
                if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(2)) {
                    for chunk in keys.chunks(1_000) {
                        let _ = redis::cmd("UNLINK").arg(chunk).query::<i64>(&mut c);
                    }
                }
            }
        }
    }
}

fn ping(url: &str) -> Result<(), String> {
    let client = super::conn::client(url).map_err(|e| e.to_string())?;
    let mut c = client.get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
    redis::cmd("PING").query::<String>(&mut c).map(|_| ()).map_err(|e| e.to_string())
}

fn keys(url: &str, tag: &str) -> Result<Vec<String>, String> {
    let client = super::conn::client(url).map_err(|e| e.to_string())?;
    let mut c = client.get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
    // The tag has braces, which are glob characters only inside `[...]`; escape them anyway.
    let pattern = format!("{}:*", tag.replace('{', "\\{").replace('}', "\\}"));
    let mut cursor = 0u64;
    let mut out = Vec::new();
    loop {
        let (next, batch): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1_000).query(&mut c).map_err(|e| e.to_string())?;
        out.extend(batch);
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}

/// A `redis-server` of a test's own, on a free port, with its data in a temp directory; killed
/// when dropped. [`start`](Self::start) makes one with an AOF (`appendfsync` `always` or
/// `everysec`), [`start_with`](Self::start_with) one with the given settings,
/// [`start_tls`](Self::start_tls) one that speaks TLS only.
pub struct TestRedisServer {
    pub port: u16,
    pub dir: PathBuf,
    /// The settings after `--port`/`--tls-port`, `--bind` and `--dir`.
    args: Vec<String>,
    url: String,
    child: Option<Child>,
}

impl TestRedisServer {
    pub fn start(dir: PathBuf, appendfsync: &str) -> Result<TestRedisServer, String> {
        TestRedisServer::start_with(dir, &["--save", "", "--appendonly", "yes", "--appendfsync", appendfsync])
    }

    /// A server with `settings` (`["--maxmemory-policy", "allkeys-lru"]`, say).
    pub fn start_with(dir: PathBuf, settings: &[&str]) -> Result<TestRedisServer, String> {
        let port = free_port()?;
        let mut args: Vec<String> = vec!["--port".into(), port.to_string()];
        args.extend(settings.iter().map(|s| s.to_string()));
        TestRedisServer::launched(TestRedisServer { port, dir, args, url: format!("redis://127.0.0.1:{port}"), child: None })
    }

    /// A server that accepts TLS connections only (`rediss://`), with the server certificate of
    /// `ca`, an AOF, and no client certificates asked for. Its [`url`](Self::url) names `ca`'s
    /// certificate as `cacertfile`.
    pub fn start_tls(dir: PathBuf, ca: &crate::tls::testing::TestCa) -> Result<TestRedisServer, String> {
        let port = free_port()?;
        let path = |p: &std::path::Path| p.to_str().unwrap_or_default().to_string();
        let mut args: Vec<String> = ["--port", "0", "--tls-port", &port.to_string(), "--tls-auth-clients", "no"].map(String::from).to_vec();
        args.extend([
            "--tls-cert-file".into(),
            path(&ca.cert),
            "--tls-key-file".into(),
            path(&ca.key),
            "--tls-ca-cert-file".into(),
            path(&ca.ca),
        ]);
        args.extend(["--save", "", "--appendonly", "yes"].map(String::from));
        let url = format!("rediss://127.0.0.1:{port}/?cacertfile={}", path(&ca.ca));
        TestRedisServer::launched(TestRedisServer { port, dir, args, url, child: None })
    }

    fn launched(mut s: TestRedisServer) -> Result<TestRedisServer, String> {
        s.launch()?;
        Ok(s)
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// Runs one command (`["CLIENT", "LIST", "TYPE", "pubsub"]`) on a connection of its own.
    pub fn command(&self, args: &[&str]) -> Result<redis::Value, String> {
        let client = super::conn::client(&self.url).map_err(|e| e.to_string())?;
        let mut c = client.get_connection_with_timeout(Duration::from_secs(2)).map_err(|e| e.to_string())?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c).map_err(|e| e.to_string())
    }

    /// Starts the server (again, after [`shutdown`](Self::shutdown) or [`kill`](Self::kill)),
    /// waiting until it answers.
    pub fn launch(&mut self) -> Result<(), String> {
        let child = Command::new("redis-server")
            .args(&self.args)
            .args(["--bind", "127.0.0.1", "--dir", self.dir.to_str().unwrap_or(".")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start redis-server: {e}"))?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut last = String::new();
        while Instant::now() < deadline {
            match ping(&self.url) {
                Ok(()) => return Ok(()),
                Err(e) => last = e,
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                return Err(format!("redis-server on port {} exited with {status}", self.port));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("redis-server on port {} did not answer within 20 s: {last}", self.port))
    }

    /// `SHUTDOWN` (the AOF is flushed), then waits for the process to end.
    pub fn shutdown(&mut self) {
        if let Ok(client) = super::conn::client(&self.url) {
            if let Ok(mut c) = client.get_connection_with_timeout(Duration::from_secs(2)) {
                let _ = redis::cmd("SHUTDOWN").query::<()>(&mut c);
            }
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// SIGKILL: nothing is flushed beyond what `appendfsync` already wrote.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestRedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).map_err(|e| e.to_string())
}
