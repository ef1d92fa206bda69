//! TLS to each network backend, against servers of the tests' own that serve a certificate of
//! a CA the test made: the queue's round trip over the encrypted link, and the failures that
//! verification must produce (another CA, another host name).

#[cfg(feature = "postgres")]
mod postgres {
    use std::sync::Arc;

    use conveyor_backends::postgres::testing::TestServer;
    use conveyor_backends::postgres::{PgBackend, PgOptions};
    use conveyor_backends::tls::testing::TestCa;
    use conveyor_core::backend::RowExt;

    use crate::conformance::{enqueue_reserve_complete, Backend};

    /// `postgres://` on the server, with `params` as its query.
    fn url(server: &TestServer, host: &str, params: &str) -> String {
        format!("postgres://postgres@{host}:{}/postgres?{params}", server.port)
    }

    fn open(url: String) -> Result<PgBackend, String> {
        PgBackend::open(PgOptions::new(url)).map_err(|e| e.to_string())
    }

    /// Whether the backend's connections are encrypted, as the server sees them.
    async fn encrypted(b: &Backend) -> bool {
        let rows = b.query("SELECT ssl::int FROM pg_stat_ssl WHERE pid = pg_backend_pid()", vec![]).await.expect("pg_stat_ssl");
        rows.first().is_some_and(|r| r.int(0) == 1)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_runs_over_tls_with_require_and_verify_full() {
        let Some(ca) = TestCa::create() else { return };
        let Some(server) = TestServer::start_tls(&ca) else { return };
        let root = ca.ca.display();

        for params in [
            "sslmode=require".to_string(),
            format!("sslmode=verify-full&sslrootcert={root}"),
            format!("sslmode=verify-ca&sslrootcert={root}"),
        ] {
            let b: Backend = Arc::new(open(url(&server, "127.0.0.1", &params)).unwrap_or_else(|e| panic!("open with {params}: {e}")));
            assert!(encrypted(&b).await, "{params}: the connection is encrypted");
            enqueue_reserve_complete(b).await;
        }
        // `localhost` is the certificate's other name.
        let b: Backend = Arc::new(
            open(url(&server, "localhost", &format!("sslmode=verify-full&sslrootcert={root}"))).expect("verify-full via localhost"),
        );
        assert!(encrypted(&b).await);

        let plain: Backend = Arc::new(open(url(&server, "127.0.0.1", "sslmode=disable")).expect("sslmode=disable"));
        assert!(!encrypted(&plain).await, "sslmode=disable does not encrypt");
    }

    /// On a Unix-domain socket PostgreSQL serves no TLS, and libpq ignores `sslmode` there: so
    /// does Conveyor, whatever the mode (the default `prefer` used to fail asking for a server
    /// name).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_unix_socket_connects_without_tls_whatever_the_sslmode() {
        let Some(ca) = TestCa::create() else { return };
        let Some(server) = TestServer::start_tls(&ca) else { return };
        let dir = server.socket_dir().display().to_string();
        for mode in ["", "&sslmode=require", "&sslmode=verify-full"] {
            let url = format!("postgresql:///postgres?host={dir}&port={}&user=postgres{mode}", server.port);
            let b: Backend = Arc::new(open(url.clone()).unwrap_or_else(|e| panic!("open {url}: {e}")));
            assert!(!encrypted(&b).await, "{url}: a Unix socket is not encrypted");
            enqueue_reserve_complete(b).await;
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verification_refuses_another_ca_and_another_host_name() {
        let Some(ca) = TestCa::create() else { return };
        let Some(other) = TestCa::create() else { return };
        let Some(server) = TestServer::start_tls(&ca) else { return };

        // The server's certificate names localhost and 127.0.0.1; `hostaddr` reaches the server
        // under a name the certificate does not carry.
        let wrong_name = url(&server, "db.example.com", &format!("hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}", ca.ca.display()));
        let err = open(wrong_name.clone()).err().expect("verify-full refuses a host name the certificate does not name");
        assert!(err.contains("certificate") && err.contains("db.example.com"), "a clear error: {err}");
        // verify-ca checks the chain only.
        let chain_only = wrong_name.replace("verify-full", "verify-ca");
        open(chain_only).expect("verify-ca accepts any host name with a trusted chain");

        let wrong_ca = url(&server, "127.0.0.1", &format!("sslmode=verify-full&sslrootcert={}", other.ca.display()));
        let err = open(wrong_ca).err().expect("verify-full refuses a certificate of another CA");
        assert!(err.contains("certificate") && err.contains("UnknownIssuer"), "a clear error: {err}");
        // As libpq: `require` with a root certificate verifies the chain.
        let err = open(url(&server, "127.0.0.1", &format!("sslmode=require&sslrootcert={}", other.ca.display())))
            .err()
            .expect("require with sslrootcert verifies the chain");
        assert!(err.contains("UnknownIssuer"), "{err}");
    }
}

#[cfg(all(feature = "redis", feature = "sqlite"))]
mod redis {
    use std::sync::Arc;
    use std::time::Duration;

    use conveyor_backends::redis::testing::TestRedisServer;
    use conveyor_backends::redis::{RedisBackend, RedisOptions};
    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_backends::tls::testing::{required, TestCa};

    use crate::conformance::{enqueue_reserve_complete, wait_until, Backend};

    fn open(url: String, dir: &tempfile::TempDir) -> Result<RedisBackend, String> {
        let path = dir.path().join(format!("store-{:08x}.db", rand::random::<u32>()));
        let store = SqliteBackend::open(SqliteOptions::new(path.to_str().expect("a UTF-8 temp path"))).expect("open SQLite");
        let mut options = RedisOptions::new(url);
        options.prefix = format!("conveyor-tls-{:016x}", rand::random::<u64>());
        RedisBackend::open(options, Arc::new(store)).map_err(|e| e.to_string())
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_and_its_wake_ups_run_over_rediss() {
        let Some(ca) = TestCa::create() else { return };
        let dir = tempfile::TempDir::new().expect("a temp dir");
        let started = TestRedisServer::start_tls(dir.path().to_path_buf(), &ca);
        let Some(server) = required("a redis-server of the test's own with TLS", started) else { return };

        // The server has no plain port: whatever connects, connects over TLS.
        let b: Backend = Arc::new(open(server.url(), &dir).expect("open over rediss://"));
        enqueue_reserve_complete(b.clone()).await;
        // The wake-up subscriber (a thread of its own, with a connection of its own) is connected too.
        wait_until("the wake-up subscriber is connected", Duration::from_secs(10), || async {
            match server.command(&["CLIENT", "LIST", "TYPE", "pubsub"]) {
                Ok(redis::Value::BulkString(list)) => !list.is_empty(),
                Ok(redis::Value::VerbatimString { text, .. }) => !text.is_empty(),
                _ => false,
            }
        })
        .await;
        assert!(b.warnings().is_empty(), "a server with an AOF warns of nothing: {:?}", b.warnings());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn rediss_refuses_a_certificate_of_another_ca_unless_insecure() {
        let Some(ca) = TestCa::create() else { return };
        let Some(other) = TestCa::create() else { return };
        let dir = tempfile::TempDir::new().expect("a temp dir");
        let started = TestRedisServer::start_tls(dir.path().to_path_buf(), &ca);
        let Some(server) = required("a redis-server of the test's own with TLS", started) else { return };

        let wrong_ca = format!("rediss://:secret@127.0.0.1:{}/?cacertfile={}", server.port, other.ca.display());
        let err = open(wrong_ca.clone(), &dir).err().expect("a certificate of another CA is refused");
        assert!(err.contains("UnknownIssuer") || err.contains("certificate"), "a clear error: {err}");
        assert!(!err.contains("secret"), "the password is not shown: {err}");
        // Without a CA file the webpki roots do not know the test CA either.
        let err = open(format!("rediss://127.0.0.1:{}", server.port), &dir).err().expect("an unknown CA is refused");
        assert!(err.contains("certificate") || err.contains("UnknownIssuer"), "{err}");
        // `#insecure` encrypts without checking.
        open(format!("rediss://127.0.0.1:{}/#insecure", server.port), &dir).expect("#insecure accepts any certificate");
        // Plain redis:// to a TLS port does not get through.
        open(format!("redis://127.0.0.1:{}", server.port), &dir).err().expect("plain TCP to a TLS port fails");
    }
}

#[cfg(all(feature = "amqp", feature = "sqlite"))]
mod amqp {
    use std::sync::Arc;

    use conveyor_backends::amqp::testing::TestRabbitServer;
    use conveyor_backends::amqp::{AmqpBackend, AmqpOptions};
    use conveyor_backends::sqlite::{SqliteBackend, SqliteOptions};
    use conveyor_backends::tls::testing::{required, TestCa};

    use crate::conformance::{enqueue_reserve_complete, Backend};

    fn open(url: String, dir: &tempfile::TempDir) -> Backend {
        let path = dir.path().join(format!("store-{:08x}.db", rand::random::<u32>()));
        let store = SqliteBackend::open(SqliteOptions::new(path.to_str().expect("a UTF-8 temp path"))).expect("open SQLite");
        let mut options = AmqpOptions::new(url);
        options.prefix = format!("conveyor-tls-{:016x}", rand::random::<u64>());
        Arc::new(AmqpBackend::open(options, Arc::new(store)).expect("open RabbitMQ (it connects lazily)"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_queue_runs_over_amqps_and_refuses_another_ca() {
        let Some(ca) = TestCa::create() else { return };
        let Some(other) = TestCa::create() else { return };
        let dir = tempfile::TempDir::new().expect("a temp dir");
        let started = tokio::task::block_in_place(|| TestRabbitServer::start_tls(dir.path().join("node"), &ca));
        let Some(server) = required("a RabbitMQ node of the test's own with TLS", started) else { return };

        enqueue_reserve_complete(open(server.tls_url(&ca.ca), &dir)).await;

        let b = open(server.tls_url(&other.ca), &dir);
        let err = b.ping_broker().await.expect_err("a certificate of another CA is refused").to_string();
        assert!(err.contains("UnknownIssuer"), "a clear error: {err}");
        assert!(!err.contains("guest:guest"), "the password is not shown: {err}");
    }
}
