//! For tests (this crate's, the applications' and the CLI's): a fresh database per test on the
//! machine's PostgreSQL server, dropped when the guard goes.
//!
//! The server is `CONVEYOR_TEST_POSTGRES_URL` (default `postgres://postgres@127.0.0.1:5432/postgres`).
//! When it cannot be reached, [`TestDatabase::create`] returns `None` and prints why, so a test
//! can skip — except under CI (`CI` set), where a missing server is a failure.

use postgres::{Client, NoTls};

/// The server tests create their databases on.
pub fn server_url() -> String {
    std::env::var("CONVEYOR_TEST_POSTGRES_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// A database of its own; dropped (with any connections left) when this is dropped.
pub struct TestDatabase {
    pub name: String,
    /// `postgres://…/<name>`.
    pub url: String,
    admin: String,
}

fn with_admin<R>(admin: &str, f: impl FnOnce(&mut Client) -> Result<R, postgres::Error> + Send) -> Result<R, String>
where
    R: Send,
{
    // The synchronous client must not run on an async runtime's thread: use one of its own.
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut config: postgres::Config = admin.parse().map_err(|e| format!("{e}"))?;
            config.connect_timeout(std::time::Duration::from_secs(3));
            let mut c = config.connect(NoTls).map_err(|e| e.to_string())?;
            f(&mut c).map_err(|e| e.to_string())
        })
        .join()
        .unwrap_or_else(|_| Err("the PostgreSQL admin thread panicked".into()))
    })
}

impl TestDatabase {
    /// Creates `conveyor_test_<random>`; `None` when no server answers outside CI.
    pub fn create() -> Option<TestDatabase> {
        let admin = server_url();
        match TestDatabase::create_on(&admin) {
            Ok(db) => Some(db),
            Err(e) if std::env::var_os("CI").is_some() => panic!("PostgreSQL at {admin} is required under CI: {e}"),
            Err(e) => {
                eprintln!("skipping: PostgreSQL at {admin} is not reachable ({e})");
                None
            }
        }
    }

    /// Creates a database on the server `admin` names (an existing database to connect to).
    pub fn create_on(admin: &str) -> Result<TestDatabase, String> {
        let name = format!("conveyor_test_{:016x}", rand::random::<u64>());
        with_admin(admin, |c| c.batch_execute(&format!("CREATE DATABASE {name}")))?;
        let base = admin.rsplit_once('/').map_or(admin, |(b, _)| b).to_string();
        Ok(TestDatabase { url: format!("{base}/{name}"), name, admin: admin.to_string() })
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        if let Err(e) = with_admin(&self.admin, move |c| c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))) {
            eprintln!("could not drop test database {}: {e}", self.name);
        }
    }
}

/// A PostgreSQL server of a test's own (for fault tests that stop it): a fresh cluster in a
/// temporary directory on a free port, run as the `postgres` user (PostgreSQL refuses root).
pub struct TestServer {
    pub port: u16,
    dir: std::path::PathBuf,
    bin: std::path::PathBuf,
    child: Option<std::process::Child>,
    /// Serves TLS too (`ssl=on`) with the certificate and key copied into `dir`.
    tls: bool,
}

impl TestServer {
    /// `None` (with the reason printed) when PostgreSQL's binaries or the `postgres` user are
    /// missing, outside CI; a failure under CI.
    pub fn start() -> Option<TestServer> {
        TestServer::start_with(None)
    }

    /// The same, serving TLS (as well as plain TCP) with the server certificate of `ca`.
    pub fn start_tls(ca: &crate::tls::testing::TestCa) -> Option<TestServer> {
        TestServer::start_with(Some(ca))
    }

    fn start_with(ca: Option<&crate::tls::testing::TestCa>) -> Option<TestServer> {
        match TestServer::try_start(ca) {
            Ok(s) => Some(s),
            Err(e) if std::env::var_os("CI").is_some() => panic!("cannot start a PostgreSQL server of the test's own: {e}"),
            Err(e) => {
                eprintln!("skipping: cannot start a PostgreSQL server of the test's own ({e})");
                None
            }
        }
    }

    fn try_start(ca: Option<&crate::tls::testing::TestCa>) -> Result<TestServer, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|e| format!("/usr/lib/postgresql: {e}"))?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .find(|b| b.join("initdb").exists())
            .ok_or("no initdb under /usr/lib/postgresql/*/bin")?;
        let dir = std::env::temp_dir().join(format!("conveyor-pg-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        if let Some(ca) = ca {
            // PostgreSQL refuses a key that others may read: the server's user owns it, 0600.
            std::fs::copy(&ca.cert, dir.join("server.pem")).map_err(|e| format!("copy of the certificate: {e}"))?;
            std::fs::copy(&ca.key, dir.join("server.key")).map_err(|e| format!("copy of the key: {e}"))?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dir.join("server.key"), std::fs::Permissions::from_mode(0o600)).map_err(|e| e.to_string())?;
        }
        let status = std::process::Command::new("chown")
            .args(["-R", "postgres:postgres", &dir.to_string_lossy()])
            .status()
            .map_err(|e| format!("chown: {e}"))?;
        if !status.success() {
            return Err("chown of the data directory to postgres failed".into());
        }
        let out = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(dir.join("data"))
            .output()
            .map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!("initdb failed: {}", String::from_utf8_lossy(&out.stderr)));
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map_err(|e| e.to_string())?.port();
        let mut server = TestServer { port, dir, bin, child: None, tls: ca.is_some() };
        server.run()?;
        Ok(server)
    }

    /// The directory holding the server's Unix-domain socket (`.s.PGSQL.<port>`).
    pub fn socket_dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// `postgres://postgres@127.0.0.1:PORT/postgres`.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&mut self) -> Result<(), String> {
        let mut command = std::process::Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("postgres"))
            .arg("-D")
            .arg(self.dir.join("data"))
            .args(["-p", &self.port.to_string(), "-h", "127.0.0.1", "-k"])
            .arg(&self.dir)
            .args(["-c", "fsync=on", "-c", "max_connections=200"]);
        if self.tls {
            let (cert, key) = (self.dir.join("server.pem"), self.dir.join("server.key"));
            command.args([
                "-c",
                "ssl=on",
                "-c",
                &format!("ssl_cert_file={}", cert.display()),
                "-c",
                &format!("ssl_key_file={}", key.display()),
            ]);
        }
        let child = command
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .map_err(|e| format!("postgres: {e}"))?;
        self.child = Some(child);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while with_admin(&self.admin_url(), |c| c.batch_execute("SELECT 1")).is_err() {
            if std::time::Instant::now() > deadline {
                return Err("the server did not accept connections within 30 s".into());
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        Ok(())
    }

    /// Stops the server (a fast shutdown: clients are disconnected, committed work is kept).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // runuser passes SIGINT on to postgres: a fast shutdown.
            // SAFETY: kill(2) on a child we spawned and have not reaped.
            let pids = std::process::Command::new("pgrep").args(["-P", &child.id().to_string()]).output().ok();
            let mut targets = vec![child.id()];
            if let Some(out) = pids {
                targets.extend(String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
            }
            for pid in targets {
                let _ = std::process::Command::new("kill").args(["-INT", &pid.to_string()]).status();
            }
            let _ = child.wait();
            // Wait for the postmaster to be gone (its pid file removed).
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
            while self.dir.join("data/postmaster.pid").exists() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }

    /// Starts it again on the same port and data.
    pub fn restart(&mut self) -> Result<(), String> {
        self.stop();
        if with_admin(&self.admin_url(), |c| c.batch_execute("SELECT 1")).is_ok() {
            return Err("the server still answers after being stopped".into());
        }
        self.run()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
