//! TLS for the network backends: rustls with the *ring* provider and the webpki roots, the
//! stack reqwest and lettre already use, so the process holds one rustls. PostgreSQL gets its
//! client configuration from here ([`client_config`]); the Redis and RabbitMQ clients build
//! their own from the same rustls and take a CA file as PEM ([`read_pem`]).
//!
//! URL parameters that only Conveyor understands (`sslrootcert`, `cacertfile`) are taken out of
//! a URL with [`take_param`] before the URL reaches a driver, since some drivers refuse
//! parameters they do not know.

// The verifiers serve PostgreSQL alone: the Redis and RabbitMQ clients bring their own.
#![cfg_attr(not(feature = "postgres"), allow(dead_code))]

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use conveyor_core::backend::BackendError;

pub mod testing;

/// What a client checks of the server's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Verify {
    /// Encrypts without checking who answers (libpq's `prefer` / `require`): protects against
    /// eavesdropping, not against a man in the middle.
    Nothing,
    /// The chain must lead to a trusted root; any host name is accepted (`verify-ca`).
    Chain,
    /// The chain and the host name (`verify-full`).
    ChainAndName,
}

/// The crypto provider every TLS client of this crate uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes *ring* the process's default provider when none is set yet. The Redis and RabbitMQ
/// clients build their configurations with `ClientConfig::builder()`, which panics when the
/// build enables two providers and none was chosen; a provider set earlier is kept.
#[cfg(any(feature = "redis", feature = "amqp"))]
pub(crate) fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// The client configuration for `verify`, trusting the certificates of the PEM file `ca` (or
/// the webpki roots when there is none).
pub(crate) fn client_config(verify: Verify, ca: Option<&str>) -> Result<ClientConfig, BackendError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| BackendError::Invalid(format!("TLS: {e}")))?;
    let verifier: Arc<dyn ServerCertVerifier> = match verify {
        Verify::Nothing => Arc::new(NoVerification(provider)),
        Verify::Chain | Verify::ChainAndName => {
            let roots = match ca {
                Some(path) => roots_from(path)?,
                None => RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() },
            };
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| BackendError::Invalid(format!("TLS: {e}")))?;
            if verify == Verify::Chain {
                Arc::new(AnyName(webpki))
            } else {
                webpki
            }
        }
    };
    Ok(builder.dangerous().with_custom_certificate_verifier(verifier).with_no_client_auth())
}

/// The PEM file at `path`, checked to hold at least one certificate.
pub(crate) fn read_pem(path: &str) -> Result<Vec<u8>, BackendError> {
    let pem = std::fs::read(path).map_err(|e| BackendError::Invalid(format!("CA file {path}: {e}")))?;
    match CertificateDer::pem_slice_iter(&pem).next() {
        Some(Ok(_)) => Ok(pem),
        Some(Err(e)) => Err(BackendError::Invalid(format!("CA file {path}: {e}"))),
        None => Err(BackendError::Invalid(format!("CA file {path}: no PEM certificate in it"))),
    }
}

fn roots_from(path: &str) -> Result<RootCertStore, BackendError> {
    let pem = read_pem(path)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| BackendError::Invalid(format!("CA file {path}: {e}")))?;
        roots.add(cert).map_err(|e| BackendError::Invalid(format!("CA file {path}: {e}")))?;
    }
    Ok(roots)
}

/// Removes the query parameter `name` from `url` and returns its (percent-decoded) value.
/// The rest of the URL is kept as it was.
pub(crate) fn take_param(url: &str, name: &str) -> (String, Option<String>) {
    let (head, fragment) = match url.find('#') {
        Some(i) => (&url[..i], &url[i..]),
        None => (url, ""),
    };
    let Some((base, query)) = head.split_once('?') else { return (url.to_string(), None) };
    let mut value = None;
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((k, v)) if k == name => {
                value = Some(percent_decode(v));
                false
            }
            _ => true,
        })
        .collect();
    let query = kept.join("&");
    let url = if query.is_empty() { format!("{base}{fragment}") } else { format!("{base}?{query}{fragment}") };
    (url, value)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(h), Some(l)) => {
                out.push((h * 16 + l) as u8);
                i += 3;
            }
            (b'+', _, _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Accepts any certificate, yet still checks that the server holds the key of the one it sent
/// (the handshake signature), as libpq does for `sslmode=require`.
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The webpki verifier without its host-name check. webpki checks the chain before the name,
/// so a name error means the chain was good.
#[derive(Debug)]
struct AnyName(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for AnyName {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp, now) {
            Err(rustls::Error::InvalidCertificate(CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. })) => {
                Ok(ServerCertVerified::assertion())
            }
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::take_param;

    #[test]
    fn own_parameters_are_taken_out_of_a_url() {
        let (url, v) = take_param("postgres://u@h/db?sslmode=require&sslrootcert=%2Ftmp%2Fca.pem&application_name=x", "sslrootcert");
        assert_eq!(url, "postgres://u@h/db?sslmode=require&application_name=x");
        assert_eq!(v.as_deref(), Some("/tmp/ca.pem"));
        let (url, v) = take_param("rediss://h:1/0?cacertfile=/ca.pem#insecure", "cacertfile");
        assert_eq!((url.as_str(), v.as_deref()), ("rediss://h:1/0#insecure", Some("/ca.pem")));
        let (url, v) = take_param("amqps://h/%2f", "cacertfile");
        assert_eq!((url.as_str(), v), ("amqps://h/%2f", None));
    }
}
