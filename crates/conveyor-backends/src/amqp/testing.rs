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
