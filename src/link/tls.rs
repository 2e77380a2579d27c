//! Mutual TLS for the replication link: TLS 1.3 only, ring provider, both
//! sides present certificates from the cluster CA, and the peer's node name is
//! checked against the name in its certificate.

use std::path::Path;
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// ALPN protocol id of the replication link.
pub const ALPN: &[u8] = b"blkrep/1";

/// TLS setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file cannot be read or parsed.
    #[error("TLS file {path}: {message}")]
    File {
        /// File.
        path: String,
        /// Problem.
        message: String,
    },
    /// rustls refused the material.
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client verifier could not be built.
    #[error("TLS client verifier: {0}")]
    Verifier(String),
    /// QUIC refused the TLS config.
    #[error("QUIC TLS configuration: {0}")]
    Quic(String),
}

/// The peer's certificate does not name the expected node.
#[derive(Debug, thiserror::Error)]
#[error("peer certificate is not valid for node {expected:?}: {reason}")]
pub struct PeerNameMismatch {
    /// Expected node name.
    pub expected: String,
    /// Why.
    pub reason: String,
}

/// Loaded TLS material of this node.
#[derive(Clone)]
pub struct TlsMaterial {
    roots: Arc<RootCertStore>,
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

fn file_err(path: &Path, message: impl ToString) -> TlsError {
    TlsError::File {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

impl TlsMaterial {
    /// Loads the CA, certificate and key PEM files.
    pub fn load(ca: &Path, cert: &Path, key: &Path) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        let ca_certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(ca)
            .map_err(|e| file_err(ca, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(ca, e))?;
        if ca_certs.is_empty() {
            return Err(file_err(ca, "no certificate found"));
        }
        for c in ca_certs {
            roots.add(c).map_err(|e| file_err(ca, e))?;
        }
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
            .map_err(|e| file_err(cert, e))?
            .collect::<Result<_, _>>()
            .map_err(|e| file_err(cert, e))?;
        if chain.is_empty() {
            return Err(file_err(cert, "no certificate found"));
        }
        let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| file_err(key, e))?;
        Ok(TlsMaterial {
            roots: Arc::new(roots),
            chain,
            key: Arc::new(key_der),
        })
    }

    fn provider() -> Arc<rustls::crypto::CryptoProvider> {
        Arc::new(rustls::crypto::ring::default_provider())
    }

    /// QUIC server crypto: requires a client certificate from the CA;
    /// speaks `alpn` (the link's `ALPN` or the witness protocol's).
    pub fn quic_server(
        &self,
        alpn: &[u8],
    ) -> Result<quinn::crypto::rustls::QuicServerConfig, TlsError> {
        let verifier =
            WebPkiClientVerifier::builder_with_provider(self.roots.clone(), Self::provider())
                .build()
                .map_err(|e| TlsError::Verifier(e.to_string()))?;
        let mut cfg = rustls::ServerConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        quinn::crypto::rustls::QuicServerConfig::try_from(cfg)
            .map_err(|e| TlsError::Quic(e.to_string()))
    }

    /// QUIC client crypto: presents our certificate, verifies the server's.
    pub fn quic_client(
        &self,
        alpn: &[u8],
    ) -> Result<quinn::crypto::rustls::QuicClientConfig, TlsError> {
        let mut cfg = rustls::ClientConfig::builder_with_provider(Self::provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(self.roots.clone())
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())?;
        cfg.alpn_protocols = vec![alpn.to_vec()];
        quinn::crypto::rustls::QuicClientConfig::try_from(cfg)
            .map_err(|e| TlsError::Quic(e.to_string()))
    }
}

/// Checks that the end-entity certificate a peer presented (already verified
/// against the CA by rustls) names node `expected`.
pub fn check_peer_name(conn: &quinn::Connection, expected: &str) -> Result<(), PeerNameMismatch> {
    let fail = |reason: &str| PeerNameMismatch {
        expected: expected.into(),
        reason: reason.into(),
    };
    let identity = conn
        .peer_identity()
        .ok_or_else(|| fail("no certificate presented"))?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| fail("unexpected identity type"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| fail("empty certificate chain"))?;
    let ee = webpki::EndEntityCert::try_from(leaf).map_err(|e| fail(&e.to_string()))?;
    let name = ServerName::try_from(expected.to_string()).map_err(|e| fail(&e.to_string()))?;
    ee.verify_is_valid_for_subject_name(&name)
        .map_err(|e| fail(&e.to_string()))
}

/// When the end-entity certificate a peer presented expires (`None` when
/// it presented none the parser can read: rustls verified it already).
pub fn peer_validity(conn: &quinn::Connection) -> Option<crate::cert::validity::Validity> {
    let certs = conn
        .peer_identity()?
        .downcast::<Vec<CertificateDer<'static>>>()
        .ok()?;
    crate::cert::validity::Validity::of_der(certs.first()?).ok()
}

/// Finds which of `candidates` the peer's certificate names.
pub fn identify_peer<'a>(conn: &quinn::Connection, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .copied()
        .find(|c| check_peer_name(conn, c).is_ok())
}
