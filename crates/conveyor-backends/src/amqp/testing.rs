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
}

impl TestAmqp {
    pub fn create() -> Option<TestAmqp> {
        let url = server_url();
        let prefix = format!("conveyor-test-{:016x}", rand::random::<u64>());
        match reachable(&url) {
            Ok(()) => Some(TestAmqp { url, prefix }),
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
