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
        let name = format!("conveyor_test_{:016x}", rand::random::<u64>());
        match with_admin(&admin, |c| c.batch_execute(&format!("CREATE DATABASE {name}"))) {
            Ok(()) => {
                let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b).to_string();
                Some(TestDatabase { url: format!("{base}/{name}"), name, admin })
            }
            Err(e) if std::env::var_os("CI").is_some() => panic!("PostgreSQL at {admin} is required under CI: {e}"),
            Err(e) => {
                eprintln!("skipping: PostgreSQL at {admin} is not reachable ({e})");
                None
            }
        }
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
