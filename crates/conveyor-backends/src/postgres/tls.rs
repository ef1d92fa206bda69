//! TLS to PostgreSQL with libpq's `sslmode` (`disable`, `prefer` (the default), `require`,
//! `verify-ca`, `verify-full`) and `sslrootcert`, over rustls ([`crate::tls`]).
//!
//! The driver knows only `disable`, `prefer` and `require`, and no `sslrootcert`: [`parse`]
//! takes those two parameters out of the URL and hands the driver `require` for both
//! `verify-*` modes, the verification living in the connector instead. On Unix-domain sockets
//! (`host=/var/run/postgresql`) `sslmode` is ignored, as libpq ignores it.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::config::SslMode;
use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use postgres::Socket;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use conveyor_core::backend::{BackendError, Result};

use crate::tls::{client_config, Verify};

/// The driver's settings (without Conveyor's parameters) and the connector for them.
pub(crate) fn parse(url: &str) -> Result<(tokio_postgres::Config, Connector)> {
    let (url, mode) = crate::tls::take_param(url, "sslmode");
    let (url, root) = crate::tls::take_param(&url, "sslrootcert");
    let mut config: tokio_postgres::Config = url.parse().map_err(|e| {
        BackendError::Invalid(format!("CONVEYOR_DATABASE_URL {}: {}", conveyor_core::redact::url(&url), super::value::with_causes(&e)))
    })?;
    // "system" is libpq's name for the platform's roots; ours are the webpki roots.
    let root = root.filter(|r| r != "system");
    let (ssl_mode, verify) = match mode.as_deref().unwrap_or("prefer") {
        "disable" => (SslMode::Disable, Verify::Nothing),
        "prefer" => (SslMode::Prefer, Verify::Nothing),
        // As libpq: `require` with a root certificate file verifies the chain like `verify-ca`.
        "require" if root.is_some() => (SslMode::Require, Verify::Chain),
        "require" => (SslMode::Require, Verify::Nothing),
        "verify-ca" => (SslMode::Require, Verify::Chain),
        "verify-full" => (SslMode::Require, Verify::ChainAndName),
        other => {
            return Err(BackendError::Invalid(format!(
                "CONVEYOR_DATABASE_URL: sslmode={other}: expected disable, prefer, require, verify-ca or verify-full"
            )))
        }
    };
    // As libpq, which ignores `sslmode` on Unix-domain sockets: PostgreSQL serves no TLS there,
    // and the driver would otherwise ask the connector for a server name it cannot have.
    let unix_only = !config.get_hosts().is_empty() && config.get_hosts().iter().all(|h| matches!(h, tokio_postgres::config::Host::Unix(_)));
    config.ssl_mode(if unix_only { SslMode::Disable } else { ssl_mode });
    let tls = client_config(verify, root.as_deref())?;
    Ok((config, Connector { config: Arc::new(tls) }))
}

/// Makes a TLS connection per PostgreSQL connection, as the driver asks.
#[derive(Clone)]
pub(crate) struct Connector {
    config: Arc<rustls::ClientConfig>,
}

impl MakeTlsConnect<Socket> for Connector {
    type Stream = Stream;
    type TlsConnect = Connect;
    type Error = rustls::pki_types::InvalidDnsNameError;

    /// The driver asks for a connector for every host before it knows whether TLS is used
    /// (with an empty name for a Unix socket): a name that is not one fails only when a TLS
    /// handshake is attempted with it.
    fn make_tls_connect(&mut self, host: &str) -> std::result::Result<Connect, Self::Error> {
        // An IP address parses as one, so verify-full checks it against the IP SANs.
        let name = ServerName::try_from(host.to_string());
        Ok(Connect { config: self.config.clone(), name })
    }
}

pub(crate) struct Connect {
    config: Arc<rustls::ClientConfig>,
    name: std::result::Result<ServerName<'static>, rustls::pki_types::InvalidDnsNameError>,
}

impl TlsConnect<Socket> for Connect {
    type Stream = Stream;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(async move {
            let name = self.name.map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
            tokio_rustls::TlsConnector::from(self.config).connect(name, socket).await.map(Stream)
        })
    }
}

pub(crate) struct Stream(tokio_rustls::client::TlsStream<Socket>);

impl TlsStream for Stream {
    fn channel_binding(&self) -> ChannelBinding {
        // No SCRAM channel binding: SCRAM-SHA-256 without `-PLUS` is what the server then uses.
        ChannelBinding::none()
    }
}

impl AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::parse;
    use postgres::config::SslMode;

    #[test]
    fn sslmodes_are_understood_and_conveyors_parameters_taken_out() {
        for mode in ["disable", "prefer", "require", "verify-ca", "verify-full"] {
            assert!(parse(&format!("postgres://u@h/db?sslmode={mode}")).is_ok(), "{mode}");
        }
        let err = parse("postgres://u:pw@h/db?sslmode=verify-everything").err().expect("an unknown sslmode is refused");
        assert!(err.to_string().contains("sslmode=verify-everything"), "{err}");
        let err =
            parse("postgres://u:pw@h/db?sslmode=verify-full&sslrootcert=/no/such/ca.pem").err().expect("a missing CA file is refused");
        assert!(err.to_string().contains("/no/such/ca.pem"), "{err}");
        for url in ["postgresql:///db?host=/var/run/postgresql", "postgresql:///db?host=/run/pg&sslmode=verify-full"] {
            let (config, _) = parse(url).unwrap();
            assert_eq!(config.get_ssl_mode(), SslMode::Disable, "{url}: no TLS on a Unix socket, as libpq");
        }
        let (config, _) = parse("postgres://u@h/db").unwrap();
        assert_eq!(config.get_ssl_mode(), SslMode::Prefer, "prefer is the default over TCP");
        let err = parse("postgres://u:pw@h/db?nonsense=1").err().expect("the driver still refuses what it does not know");
        assert!(!err.to_string().contains("pw"), "the password is not shown: {err}");
    }
}
