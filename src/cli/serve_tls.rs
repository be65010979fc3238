//! `--tls-cert` and `--tls-key`, which `dev` and `agent` share: a certificate and key kept in
//! files (e.g. by cert-manager), served over HTTPS and read again when they are replaced.

use clap::Args;
use std::path::PathBuf;
use std::sync::Arc;

use crate::tls::{CertFiles, FOLLOW_EVERY, ServingCert};

#[derive(Debug, Clone, Args)]
pub struct ServeTlsArgs {
    /// Serve node.invoke over HTTPS with this certificate chain (PEM), and --tls-key. Both are
    /// read again within 10 s of being replaced (cert-manager renews them in place);
    /// connections already open keep the certificate they began with.
    #[arg(long, value_name = "PATH", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM: PKCS#8, SEC1 or PKCS#1).
    #[arg(long, value_name = "PATH", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ServeTlsArgs {
    pub fn files(&self) -> Option<CertFiles> {
        Some(CertFiles {
            cert: self.tls_cert.clone()?,
            key: self.tls_key.clone()?,
        })
    }
}

/// Loads the files (a failure stops the start: a server that cannot present its certificate
/// must not fall back to plain HTTP) and follows them from then on.
pub fn serve_files(files: CertFiles) -> Result<Arc<ServingCert>, String> {
    let cert = ServingCert::new(files.load().map_err(|e| e.to_string())?);
    tokio::spawn(files.follow(cert.clone(), FOLLOW_EVERY));
    Ok(cert)
}
