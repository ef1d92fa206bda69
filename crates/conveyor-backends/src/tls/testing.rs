//! For tests: a certificate authority of a test's own, made with the `openssl` command, and a
//! server certificate it signed for `localhost` and 127.0.0.1; its files are deleted on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// A CA and a server certificate signed by it, as PEM files in a directory of their own.
pub struct TestCa {
    pub dir: PathBuf,
    /// The CA's certificate: what a client is told to trust.
    pub ca: PathBuf,
    /// The server's certificate (names `localhost` and 127.0.0.1) and its private key.
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TestCa {
    /// `None` (with the reason printed) when the `openssl` command is missing, outside CI; a
    /// failure under CI.
    pub fn create() -> Option<TestCa> {
        required("a test CA (the `openssl` command)", TestCa::try_create())
    }

    fn try_create() -> Result<TestCa, String> {
        let dir = std::env::temp_dir().join(format!("conveyor-ca-{:016x}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let ca = TestCa { ca: dir.join("ca.pem"), cert: dir.join("server.pem"), key: dir.join("server.key"), dir };
        let ca_key = ca.dir.join("ca.key");
        let csr = ca.dir.join("server.csr");
        let ext = ca.dir.join("server.ext");
        std::fs::write(
            &ext,
            "subjectAltName = DNS:localhost, IP:127.0.0.1\nbasicConstraints = critical, CA:FALSE\n\
             keyUsage = critical, digitalSignature, keyEncipherment\nextendedKeyUsage = serverAuth\n",
        )
        .map_err(|e| e.to_string())?;
        let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
        // A name of its own, so a client trusting another test CA finds no issuer at all.
        let subject = format!("/CN=Conveyor test CA {:08x}", rand::random::<u32>());
        openssl(Command::new("openssl").args(["req", "-x509"]).args(ec).args(["-days", "2", "-subj", &subject]).args([
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout",
            path(&ca_key),
            "-out",
            path(&ca.ca),
        ]))?;
        openssl(Command::new("openssl").args(["req"]).args(ec).args([
            "-subj",
            "/CN=localhost",
            "-keyout",
            path(&ca.key),
            "-out",
            path(&csr),
        ]))?;
        openssl(Command::new("openssl").args(["x509", "-req", "-days", "2", "-set_serial", &rand::random::<u32>().to_string()]).args([
            "-in",
            path(&csr),
            "-CA",
            path(&ca.ca),
            "-CAkey",
            path(&ca_key),
            "-extfile",
            path(&ext),
            "-out",
            path(&ca.cert),
        ]))?;
        Ok(ca)
    }
}

impl Drop for TestCa {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `Some` of a test fixture, or `None` with the reason printed so the test skips — except
/// under CI (`CI` set), where a missing fixture is a failure.
pub fn required<T>(what: &str, made: Result<T, String>) -> Option<T> {
    match made {
        Ok(t) => Some(t),
        Err(e) if std::env::var_os("CI").is_some() => panic!("{what} is required under CI: {e}"),
        Err(e) => {
            eprintln!("skipping: no {what} ({e})");
            None
        }
    }
}

fn path(p: &Path) -> &str {
    // Paths under the temp directory; a non-UTF-8 temp directory would only fail the test.
    p.to_str().unwrap_or_default()
}

fn openssl(cmd: &mut Command) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("openssl: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!("openssl failed: {}", String::from_utf8_lossy(&out.stderr)))
    }
}
