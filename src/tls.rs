//! TLS configuration: rustls with the ring provider, public web roots plus
//! any extra roots the operator names.

use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid PEM: {0}")]
    Pem(String),
    #[error("a certificate was refused: {0}")]
    Certificate(#[from] rustls::Error),
    #[error("the client CA cannot be used: {0}")]
    ClientRoots(String),
}

/// The one crypto provider the proxy uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every certificate in a PEM bundle.
pub fn certificates_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem(e.to_string()))
}

/// A client configuration trusting the public web roots and `extra_roots_pem`.
/// ALPN is left to the connector, which offers the HTTP versions it enables.
pub fn client_config(extra_roots_pem: Option<&[u8]>) -> Result<rustls::ClientConfig, TlsError> {
    let mut roots = rustls::RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(pem) = extra_roots_pem {
        for certificate in certificates_from_pem(pem)? {
            roots.add(certificate)?;
        }
    }
    Ok(rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// What a server offers by ALPN: HTTP/2 first, and HTTP/1.1 for clients
/// that want it (WebSocket clients do).
pub const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// A server configuration from a PEM certificate chain and key, offering
/// HTTP/2 and HTTP/1.1 by ALPN (the stand-in's TLS mode).
pub fn server_config(chain_pem: &[u8], key_pem: &[u8]) -> Result<rustls::ServerConfig, TlsError> {
    listener_config(chain_pem, key_pem, None)
}

/// The main listener's configuration: a PEM chain and key, HTTP/2 and
/// HTTP/1.1 by ALPN, and with `client_ca_pem` only clients presenting a
/// certificate it issued.
pub fn listener_config(
    chain_pem: &[u8],
    key_pem: &[u8],
    client_ca_pem: Option<&[u8]>,
) -> Result<rustls::ServerConfig, TlsError> {
    let chain = certificates_from_pem(chain_pem)?;
    if chain.is_empty() {
        return Err(TlsError::Pem("no certificate in the chain file".into()));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| TlsError::Pem(e.to_string()))?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca_pem {
        None => builder.with_no_client_auth(),
        Some(pem) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in certificates_from_pem(pem)? {
                roots.add(certificate)?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .map_err(|e| TlsError::ClientRoots(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_single_cert(chain, key)?;
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}
