//! The Faktory work protocol (version 2), so that Faktory's client libraries in any language
//! push and work Conveyor jobs unchanged (SPEC "Work from any language").
//!
//! - [`wire`]: lines in, RESP replies out.
//! - [`job`]: a Faktory job ↔ a Conveyor job (remote kinds keep the pushed JSON as payload).
//! - [`hub`]: per process: jobs reserved ahead for `FETCH`, reservations held by a worker's
//!   `wid`, remote workers, batched acknowledgements.
//! - [`conn`]: one connection: the `HI` / `HELLO` handshake with Faktory's password scheme,
//!   then one reply per command; [`admin`]: `INFO`, `QUEUE`, `FLUSH`.
//!
//! Written from the protocol's public specification and the observed behaviour of its
//! clients (`docs/faktory-protocol-notes.md`); no code of the Faktory server was read.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use conveyor_core::Conveyor;

use crate::access::Role;

mod admin;
mod batch;
mod conn;
mod hub;
mod job;
mod mutate;
#[cfg(test)]
mod tests;
mod track;
mod wire;

/// The Faktory version clients are told (they check for 1.x with the commands used here).
pub const FAKTORY_VERSION: &str = "1.9.2";
/// Connections served at once; more wait in the listen backlog.
pub const MAX_CONNECTIONS: usize = 1024;

/// Who may connect: the tokens of the roles that speak Faktory (admin, publish, worker). No
/// token: anyone may do anything (loopback only; the CLI refuses other addresses).
#[derive(Clone, Default)]
pub struct FaktoryConfig {
    pub admin_token: Option<String>,
    pub publish_token: Option<String>,
    pub worker_token: Option<String>,
    /// Iterations of the password hash (Faktory's `i`); 1,024 when unset.
    pub hash_iterations: Option<u32>,
    /// `CONVEYOR_FAKTORY_TLS_CERT` / `_KEY`: the port speaks TLS.
    pub tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl std::fmt::Debug for FaktoryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FaktoryConfig").field("tokens", &self.tokens().len()).field("tls", &self.tls.is_some()).finish()
    }
}

impl FaktoryConfig {
    fn tokens(&self) -> Vec<(Role, String)> {
        [(Role::Admin, &self.admin_token), (Role::Publish, &self.publish_token), (Role::Worker, &self.worker_token)]
            .into_iter()
            .filter_map(|(r, t)| t.clone().filter(|t| !t.is_empty()).map(|t| (r, t)))
            .collect()
    }
}

/// Tells a remote worker (by its `wid`) to go quiet (`quiet`: finish its jobs, fetch no more)
/// or to stop (`stop`: Faktory's `terminate`) on its next `BEAT`, through any process of the
/// cluster (the signal is kept in the cache for a day). Returns the state sent.
pub async fn signal_worker(
    backend: &Arc<dyn conveyor_core::QueueBackend>,
    wid: &str,
    signal: &str,
) -> Result<&'static str, conveyor_core::BackendError> {
    let state = match signal {
        "quiet" => "quiet",
        "stop" | "terminate" => "terminate",
        other => return Err(conveyor_core::BackendError::Invalid(format!("{other:?} is not a signal (quiet, stop)"))),
    };
    if wid.is_empty() || wid.len() > 200 {
        return Err(conveyor_core::BackendError::Invalid("not a worker id".into()));
    }
    let cache = conveyor_core::cache::Cache::new(backend.clone());
    cache.put(&conn::signal_key(wid), &state, Some(Duration::from_secs(86_400))).await?;
    Ok(state)
}

/// The TLS settings of the Faktory port from a PEM certificate chain and its private key.
pub fn tls_config(cert_pem: &[u8], key_pem: &[u8]) -> Result<Arc<tokio_rustls::rustls::ServerConfig>, String> {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_slice_iter(cert_pem).collect::<Result<Vec<_>, _>>().map_err(|e| format!("certificate: {e}"))?;
    if certs.is_empty() {
        return Err("certificate: no certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("key: {e}"))?;
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("certificate and key: {e}"))?;
    Ok(Arc::new(config))
}

/// Serves the Faktory protocol on `listener` until `shutdown`; buffered jobs are given back
/// to their queues on the way out.
pub async fn serve(listener: TcpListener, conveyor: Conveyor, config: FaktoryConfig, shutdown: CancellationToken) -> std::io::Result<()> {
    let hub = hub::Hub::start(conveyor, shutdown.clone());
    let settings = Arc::new(conn::Settings::new(&config));
    let tls = config.tls.clone().map(tokio_rustls::TlsAcceptor::from);
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = slots.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    warn!(error = %e, "Faktory accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let (hub, settings, tls, shutdown) = (hub.clone(), settings.clone(), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let result = match tls {
                Some(acceptor) => match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(s)) => run(s, hub, settings, shutdown).await,
                    Ok(Err(e)) => Err(e),
                    Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out")),
                },
                None => run(stream, hub, settings, shutdown).await,
            };
            if let Err(e) = result {
                debug!(%peer, error = %e, "Faktory connection ended");
            }
        });
    }
    Ok(())
}

async fn run<S: AsyncRead + AsyncWrite + Unpin>(
    stream: S,
    hub: Arc<hub::Hub>,
    settings: Arc<conn::Settings>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    conn::Connection::new(hub, settings).serve(stream, shutdown).await
}
