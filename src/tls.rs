//! TLS for the servers (node.invoke over HTTPS, the operator's webhook) and for the clients that
//! verify them: rustls with the ring provider that kube already brings, TLS 1.2 and 1.3,
//! HTTP/1.1.
//!
//! A server's certificate is held in a [`ServingCert`], which the rustls configuration asks for
//! at every handshake: renewing it (a new file from cert-manager, a certificate the agent got
//! through a CSR) replaces it in place, and connections already open keep theirs, so no request
//! is dropped.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{what} is not a PEM certificate chain: {reason}")]
    Chain { what: String, reason: String },
    #[error("{what} is not a PEM private key (PKCS#8, SEC1 or PKCS#1): {reason}")]
    Key { what: String, reason: String },
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} holds no CA certificate to verify servers with")]
    NoRoots { what: String },
    #[error("{0:?} is not a name a certificate can be checked against")]
    ServerName(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate chain and its private key, PEM, checked to go together.
pub fn certified_key(
    chain_pem: &[u8],
    key_pem: &[u8],
    what: &str,
) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Chain {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::Chain {
            what: what.to_owned(),
            reason: "no CERTIFICATE block".into(),
        });
    }
    let key_error = |reason: String| TlsError::Key {
        what: what.to_owned(),
        reason,
    };
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| key_error(e.to_string()))?;
    let key = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| key_error(e.to_string()))?;
    let certified = CertifiedKey::new(chain, key);
    certified
        .keys_match()
        .map_err(|e| key_error(format!("it does not belong to the certificate: {e}")))?;
    Ok(Arc::new(certified))
}

/// The certificate a server presents; replaced in place when renewed.
#[derive(Debug)]
pub struct ServingCert(RwLock<Arc<CertifiedKey>>);

impl ServingCert {
    pub fn new(key: Arc<CertifiedKey>) -> Arc<ServingCert> {
        Arc::new(ServingCert(RwLock::new(key)))
    }

    /// From here on, handshakes present `key`.
    pub fn replace(&self, key: Arc<CertifiedKey>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = key;
    }
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// TLS 1.2 and 1.3, HTTP/1.1, the current certificate; no client certificates (callers
/// authenticate with bearer tokens).
pub fn server_config(cert: Arc<ServingCert>) -> Arc<ServerConfig> {
    let mut tls = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports TLS 1.2 and 1.3")
        .with_no_client_auth()
        .with_cert_resolver(cert);
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(tls)
}

/// A client configuration that trusts exactly the CA certificates in `ca_pem` (a bundle).
pub fn client_config(ca_pem: &[u8], what: &str) -> Result<Arc<ClientConfig>, TlsError> {
    let chain_error = |e: &dyn std::fmt::Display| TlsError::Chain {
        what: what.to_owned(),
        reason: e.to_string(),
    };
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        roots
            .add(cert.map_err(|e| chain_error(&e))?)
            .map_err(|e| chain_error(&e))?;
    }
    if roots.is_empty() {
        return Err(TlsError::NoRoots {
            what: what.to_owned(),
        });
    }
    Ok(with_roots(roots))
}

/// Trusts the CA bundle in `ca_file`, else the system's CA certificates.
pub fn client_config_from(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, TlsError> {
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })?;
            client_config(&pem, &path.display().to_string())
        }
        None => {
            let mut roots = RootCertStore::empty();
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            if roots.is_empty() {
                return Err(TlsError::NoRoots {
                    what: "the system's certificate store".to_owned(),
                });
            }
            Ok(with_roots(roots))
        }
    }
}

/// A client configuration that verifies no server (for a connector that only speaks HTTP).
pub fn trusting_nothing() -> Arc<ClientConfig> {
    with_roots(RootCertStore::empty())
}

/// No ALPN protocols: the HTTP client sets its own (hyper-rustls refuses a preset list).
fn with_roots(roots: RootCertStore) -> Arc<ClientConfig> {
    Arc::new(
        ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("the ring provider supports TLS 1.2 and 1.3")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// The name a server's certificate is checked against.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}

/// How often [`CertFiles::follow`] looks at the files for a renewed certificate.
pub const FOLLOW_EVERY: Duration = Duration::from_secs(10);

/// A certificate and key kept in two files (`--tls-cert`, `--tls-key`), e.g. by cert-manager,
/// which replaces them before they expire.
#[derive(Debug, Clone)]
pub struct CertFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertFiles {
    pub fn load(&self) -> Result<Arc<CertifiedKey>, TlsError> {
        let read = |path: &Path| {
            std::fs::read(path).map_err(|source| TlsError::Read {
                path: path.to_owned(),
                source,
            })
        };
        let chain = read(&self.cert)?;
        let key = Zeroizing::new(read(&self.key)?);
        certified_key(&chain, &key, &self.cert.display().to_string())
    }

    fn modified(&self) -> Option<(SystemTime, SystemTime)> {
        let at = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
        Some((at(&self.cert)?, at(&self.key)?))
    }

    /// Serves what the files hold now, and whatever they are replaced with: they are looked at
    /// every `every`, and a new pair that loads replaces the certificate (one that does not is
    /// reported, and the previous one kept).
    pub async fn follow(self, cert: Arc<ServingCert>, every: Duration) {
        let mut seen = self.modified();
        loop {
            tokio::time::sleep(every).await;
            let now = self.modified();
            if now == seen {
                continue;
            }
            match self.load() {
                Ok(key) => {
                    cert.replace(key);
                    seen = now;
                    tracing::info!(cert = %self.cert.display(), "serving the renewed certificate");
                }
                Err(e) => tracing::warn!(error = %e, "kept the current certificate"),
            }
        }
    }
}
