//! For tests: a queue-name prefix of its own on the machine's RabbitMQ. Its queues are declared
//! with `x-expires`, so RabbitMQ deletes them once unused; nothing is left behind for long.
//!
//! The server is `CONVEYOR_TEST_AMQP_URL` (default `amqp://guest:guest@127.0.0.1:5672/%2f`).
//! When it cannot be reached, [`TestAmqp::create`] returns `None` and prints why, so a test can
//! skip — except under CI (`CI` set), where a missing server is a failure.

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use super::AmqpOptions;

pub fn server_url() -> String {
    std::env::var("CONVEYOR_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

pub struct TestAmqp {
    pub url: String,
    pub prefix: String,
    /// Conveyor queues whose RabbitMQ queues are deleted on drop (those declared by processes
    /// that do not set `x-expires`), besides the dead-letter queue.
    pub cleanup: Vec<String>,
}

impl TestAmqp {
    pub fn create() -> Option<TestAmqp> {
        let url = server_url();
        let prefix = format!("conveyor-test-{:016x}", rand::random::<u64>());
        match reachable(&url) {
            Ok(()) => Some(TestAmqp { url, prefix, cleanup: Vec::new() }),
            Err(e) if std::env::var_os("CI").is_some() => panic!("RabbitMQ at {url} is required under CI: {e}"),
            Err(e) => {
                eprintln!("skipping: RabbitMQ at {url} is not reachable ({e})");
                None
            }
        }
    }

    /// Options for this prefix, with queues RabbitMQ deletes after five unused minutes.
    pub fn options(&self) -> AmqpOptions {
        let mut o = AmqpOptions::new(self.url.clone());
        o.prefix = self.prefix.clone();
        o.queue_expires = Some(Duration::from_secs(300));
        o
    }
}

/// `host:port` of an `amqp://user:pass@host:port/vhost` URL.
pub fn address(url: &str) -> String {
    let rest = url.split("://").nth(1).unwrap_or(url);
    let rest = rest.rsplit('@').next().unwrap_or(rest);
    let hostport = rest.split('/').next().unwrap_or(rest);
    if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:5672")
    }
}

fn reachable(url: &str) -> Result<(), String> {
    let addr = address(url).to_socket_addrs().map_err(|e| e.to_string())?.next().ok_or("no address")?;
    TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map(|_| ()).map_err(|e| e.to_string())
}

/// Closes every connection of prefix `prefix` from the broker's side (as a restart does) with
/// `rabbitmqctl`; returns how many were closed.
pub fn close_connections(prefix: &str) -> Result<usize, String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "-q", "--no-table-headers", "pid", "client_properties"])
        .output()
        .map_err(|e| format!("rabbitmqctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut n = 0;
    for line in text.lines().filter(|l| l.contains(prefix)) {
        let pid = line.split_whitespace().next().unwrap_or_default();
        let ok = std::process::Command::new("rabbitmqctl")
            .args(["close_connection", pid, "closed by a Conveyor test"])
            .output()
            .map_err(|e| format!("rabbitmqctl: {e}"))?
            .status
            .success();
        n += ok as usize;
    }
    Ok(n)
}

impl Drop for TestAmqp {
    fn drop(&mut self) {
        let mut names: Vec<String> = self.cleanup.iter().map(|q| super::broker_queue(&self.prefix, q)).collect();
        names.push(format!("{}.dead-letter", self.prefix));
        let url = self.url.clone();
        // A runtime of its own on a thread of its own: drop may run inside a test's runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            rt.block_on(async move {
                let Ok(conn) = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await else { return };
                let Ok(ch) = conn.create_channel().await else { return };
                for name in names {
                    let _ = ch.queue_delete(name.as_str().into(), lapin::options::QueueDeleteOptions::default()).await;
                }
                let _ = conn.close(200, "OK".into()).await;
            });
        })
        .join();
    }
}

/// A RabbitMQ node of a test's own on a free port (data in `dir`, owned by the `rabbitmq` user
/// the server drops to), for restart tests: `stop` (graceful), `kill` (SIGKILL), `launch` again.
pub struct TestRabbitServer {
    dir: std::path::PathBuf,
    pub port: u16,
    /// The TLS listener's port, for a node started with [`start_tls`](Self::start_tls).
    pub tls_port: Option<u16>,
    node: String,
}

impl TestRabbitServer {
    /// Starts the node and waits until it accepts connections. Err when the machine has no
    /// `rabbitmq-server` or it cannot start (the caller skips outside CI).
    pub fn start(dir: std::path::PathBuf) -> Result<TestRabbitServer, String> {
        TestRabbitServer::start_with(dir, None)
    }

    /// The same with a TLS listener too, serving the server certificate of `ca` and asking
    /// clients for none; [`tls_url`](Self::tls_url) reaches it.
    pub fn start_tls(dir: std::path::PathBuf, ca: &crate::tls::testing::TestCa) -> Result<TestRabbitServer, String> {
        TestRabbitServer::start_with(dir, Some(ca))
    }

    fn start_with(dir: std::path::PathBuf, ca: Option<&crate::tls::testing::TestCa>) -> Result<TestRabbitServer, String> {
        // A port whose distribution port (+10,000) is free too.
        let port = (0..50)
            .find_map(|_| {
                let p = std::net::TcpListener::bind("127.0.0.1:0").ok()?.local_addr().ok()?.port();
                (p < 55_000 && std::net::TcpListener::bind(("127.0.0.1", p + 10_000)).is_ok()).then_some(p)
            })
            .ok_or("no free port pair")?;
        let tls_port = match ca {
            Some(_) => Some(std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port()),
            None => None,
        };
        let server = TestRabbitServer { dir, port, tls_port, node: format!("conveyor-test-{port}@localhost") };
        std::fs::create_dir_all(server.dir.join("mnesia")).map_err(|e| e.to_string())?;
        std::fs::create_dir_all(server.dir.join("log")).map_err(|e| e.to_string())?;
        std::fs::write(server.dir.join("plugins"), "[].").map_err(|e| e.to_string())?;
        let mut conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\n");
        if let (Some(ca), Some(tls_port)) = (ca, tls_port) {
            // Copies in the node's directory, which the `rabbitmq` user can read.
            let d = &server.dir;
            for (from, to) in [(&ca.ca, "ca.pem"), (&ca.cert, "server.pem"), (&ca.key, "server.key")] {
                std::fs::copy(from, d.join(to)).map_err(|e| format!("copy of {}: {e}", from.display()))?;
            }
            conf.push_str(&format!(
                "listeners.ssl.1 = 127.0.0.1:{tls_port}\nssl_options.cacertfile = {}\nssl_options.certfile = {}\n\
                 ssl_options.keyfile = {}\nssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n",
                d.join("ca.pem").display(),
                d.join("server.pem").display(),
                d.join("server.key").display()
            ));
        }
        std::fs::write(server.dir.join("rabbitmq.conf"), conf).map_err(|e| e.to_string())?;
        // The server runs as `rabbitmq` when started by root.
        let _ = std::process::Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(&server.dir).status();
        let _ = std::process::Command::new("chmod").args(["755"]).arg(&server.dir).status();
        server.launch()?;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `amqps://…` to the TLS listener, trusting the CA certificate at `ca` (`cacertfile`).
    pub fn tls_url(&self, ca: &std::path::Path) -> String {
        format!("amqps://guest:guest@127.0.0.1:{}/%2f?cacertfile={}", self.tls_port.unwrap_or(self.port), ca.display())
    }

    /// Starts the node (again) and waits up to 60 s for its port.
    pub fn launch(&self) -> Result<(), String> {
        let d = &self.dir;
        std::process::Command::new("rabbitmq-server")
            .arg("-detached")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", (self.port + 10_000).to_string())
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .map_err(|e| format!("rabbitmq-server: {e}"))?;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        for port in std::iter::once(self.port).chain(self.tls_port) {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
            while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
                if std::time::Instant::now() >= deadline {
                    return Err(format!("RabbitMQ node {} did not open port {port} within 60 s", self.node));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        Ok(())
    }

    /// A graceful stop: the node persists its queues and closes its connections.
    pub fn stop(&self) {
        let _ = std::process::Command::new("rabbitmqctl").args(["-n", &self.node, "stop"]).output();
    }

    /// SIGKILL of the node's Erlang VM.
    pub fn kill(&self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("pid")) {
            let _ = std::process::Command::new("kill").args(["-9", pid.trim()]).status();
        }
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], self.port));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::time::Instant::now() < deadline && TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TestRabbitServer {
    fn drop(&mut self) {
        self.kill();
    }
}
