//! The agent's serving certificate from the Kubernetes CertificateSigningRequest API
//! ([`crate::k8s::agent_certs`]): a key of its own, a CSR naming its node, created with its own
//! (pod- or Node-bound) token, approved and signed by the operator; kept in the data dir so a
//! restart serves at once, and renewed at two thirds of its lifetime, in place, so no request
//! is dropped.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestSpec,
};
use kube::api::{Api, ObjectMeta, PostParams};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

use crate::k8s::agent_certs::{SIGNER_NAME, USAGES, common_name};
use crate::store::{create_private_dir, write_private_file_atomic};
use crate::tls::ServingCert;

/// How often the CSR is looked at while the operator has not answered: often at first (it
/// signs within a second when it runs), then, past [`SIGN_PATIENCE`], seldom.
const POLL: Duration = Duration::from_millis(500);
const POLL_SLOW: Duration = Duration::from_secs(5);
/// How long a request may stay pending before a warning (repeated as long as it does); the
/// same request is kept, and looked at every [`POLL_SLOW`] from then on.
const SIGN_PATIENCE: Duration = Duration::from_secs(120);
/// Waits between failed attempts, doubling up to the cap.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_CAP: Duration = Duration::from_secs(30);

/// A certificate and its key, as served and as kept on disk.
struct Issued {
    chain_pem: String,
    key_pem: Zeroizing<String>,
    not_before: Timestamp,
    not_after: Timestamp,
    /// When this process got it (issued, or read from disk).
    received: Timestamp,
}

impl Issued {
    /// When to ask for the next one: two thirds into the time it was valid for when received
    /// (a signer backdates notBefore for clients whose clocks lag, which is no reason to renew
    /// earlier).
    fn renew_at(&self) -> Timestamp {
        let start = self.not_before.max(self.received);
        start + self.not_after.duration_since(start) * 2 / 3
    }

    fn certified(&self) -> Result<Arc<tokio_rustls::rustls::sign::CertifiedKey>, String> {
        crate::tls::certified_key(
            self.chain_pem.as_bytes(),
            self.key_pem.as_bytes(),
            "the agent's issued certificate",
        )
        .map_err(|e| e.to_string())
    }
}

/// Reads the validity of the first certificate in `chain_pem` and checks that it names `node`.
fn read_certificate(chain_pem: &str, node: &str) -> Result<(Timestamp, Timestamp), String> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let der = tokio_rustls::rustls::pki_types::pem::PemObject::pem_slice_iter(chain_pem.as_bytes())
        .next()
        .ok_or("no CERTIFICATE block")?
        .map(|c: tokio_rustls::rustls::pki_types::CertificateDer<'static>| c.to_vec())
        .map_err(|e| format!("not PEM: {e}"))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&der)
        .map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let names_node = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value
                .general_names
                .iter()
                .any(|n| matches!(n, GeneralName::DNSName(d) if *d == node))
        });
    if !names_node {
        return Err(format!("it does not name node {node}"));
    }
    let at = |t: x509_parser::time::ASN1Time| {
        Timestamp::from_second(t.timestamp()).map_err(|e| e.to_string())
    };
    Ok((
        at(cert.validity().not_before)?,
        at(cert.validity().not_after)?,
    ))
}

/// Where the certificate is kept: `DATA_DIR/tls/` (0700), `agent.key` (0600) and `agent.crt`.
struct Files {
    key: PathBuf,
    cert: PathBuf,
}

impl Files {
    fn in_dir(data_dir: &Path) -> Result<Files, String> {
        let dir = data_dir.join("tls");
        create_private_dir(&dir).map_err(|e| e.to_string())?;
        Ok(Files {
            key: dir.join("agent.key"),
            cert: dir.join("agent.crt"),
        })
    }

    /// The kept certificate, if it is whole, names `node` and has not expired.
    fn load(&self, node: &str) -> Option<Issued> {
        crate::store::ensure_private_file(&self.key).ok()?;
        let key_pem = Zeroizing::new(std::fs::read_to_string(&self.key).ok()?);
        let chain_pem = std::fs::read_to_string(&self.cert).ok()?;
        let (not_before, not_after) = match read_certificate(&chain_pem, node) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(cert = %self.cert.display(), error = %e, "not using the kept certificate");
                return None;
            }
        };
        let issued = Issued {
            chain_pem,
            key_pem,
            not_before,
            not_after,
            received: Timestamp::now(),
        };
        if let Err(e) = issued.certified() {
            tracing::warn!(error = %e, "not using the kept certificate");
            return None;
        }
        (not_after > Timestamp::now() + SignedDuration::from_secs(60)).then_some(issued)
    }

    /// The key first: a crash between the two leaves a pair that does not match, which
    /// [`Files::load`] refuses, so the agent asks again.
    fn save(&self, issued: &Issued) -> Result<(), String> {
        write_private_file_atomic(&self.key, issued.key_pem.as_bytes())
            .and_then(|()| write_private_file_atomic(&self.cert, issued.chain_pem.as_bytes()))
            .map_err(|e| format!("cannot keep the certificate: {e}"))
    }
}

/// Asks for a certificate for `node` and waits until the operator has signed it.
async fn request(client: &kube::Client, node: &str) -> Result<Issued, String> {
    let key = rcgen::KeyPair::generate().map_err(|e| format!("cannot make a key: {e}"))?;
    let mut params = rcgen::CertificateParams::new(vec![node.to_owned()])
        .map_err(|e| format!("node name {node:?} cannot be a certificate's DNS name: {e}"))?;
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, common_name(node));
    let csr = params
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| format!("cannot make the certificate request: {e}"))?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let created = api
        .create(
            &PostParams::default(),
            &CertificateSigningRequest {
                metadata: ObjectMeta {
                    generate_name: Some("claw-secrets-agent-".to_owned()),
                    labels: Some(
                        [(
                            "app.kubernetes.io/component".to_owned(),
                            "agent-serving-certificate".to_owned(),
                        )]
                        .into(),
                    ),
                    ..ObjectMeta::default()
                },
                spec: CertificateSigningRequestSpec {
                    request: ByteString(csr.into_bytes()),
                    signer_name: SIGNER_NAME.to_owned(),
                    usages: Some(USAGES.iter().map(|u| (*u).to_owned()).collect()),
                    ..CertificateSigningRequestSpec::default()
                },
                status: None,
            },
        )
        .await
        .map_err(|e| format!("cannot create a CertificateSigningRequest: {e}"))?;
    let name = created.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, signer = SIGNER_NAME, "asked for a serving certificate");
    let mut deadline = tokio::time::Instant::now() + SIGN_PATIENCE;
    let mut poll = POLL;
    loop {
        let csr = api
            .get(&name)
            .await
            .map_err(|e| format!("cannot read CertificateSigningRequest {name}: {e}"))?;
        let status = csr.status.unwrap_or_default();
        if let Some(refused) = status
            .conditions
            .iter()
            .flatten()
            .find(|c| (c.type_ == "Denied" || c.type_ == "Failed") && c.status == "True")
        {
            return Err(format!(
                "CertificateSigningRequest {name} was {}: {}",
                refused.type_.to_lowercase(),
                refused.message.as_deref().unwrap_or("no reason given")
            ));
        }
        if let Some(ByteString(cert)) = status.certificate.filter(|c| !c.0.is_empty()) {
            let chain_pem = String::from_utf8(cert).map_err(|_| {
                format!("CertificateSigningRequest {name}: the certificate is not PEM")
            })?;
            let (not_before, not_after) = read_certificate(&chain_pem, node)
                .map_err(|e| format!("CertificateSigningRequest {name}: {e}"))?;
            let issued = Issued {
                chain_pem,
                key_pem: Zeroizing::new(key.serialize_pem()),
                not_before,
                not_after,
                received: Timestamp::now(),
            };
            issued.certified()?;
            tracing::info!(csr = %name, %not_after, "serving certificate issued");
            return Ok(issued);
        }
        if tokio::time::Instant::now() > deadline {
            // Still pending: the same request is waited for (a new one would only pile up
            // pending requests while the operator is away). Gone (deleted, or cleaned up by the
            // controller manager) or refused, the caller asks again.
            tracing::warn!(csr = %name, waited_s = SIGN_PATIENCE.as_secs(),
                "the serving certificate request is not signed yet: is the operator running (it signs {SIGNER_NAME})? still waiting for it");
            deadline = tokio::time::Instant::now() + SIGN_PATIENCE;
            poll = POLL_SLOW;
        }
        tokio::time::sleep(poll).await;
    }
}

/// Asks until a certificate is issued, waiting longer after each failure.
async fn request_until_issued(client: &kube::Client, node: &str) -> Issued {
    let mut wait = RETRY_FIRST;
    loop {
        match request(client, node).await {
            Ok(issued) => return issued,
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = wait.as_secs(), "no serving certificate yet")
            }
        }
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(RETRY_CAP);
    }
}

/// The agent's serving certificate: the kept one if it is still good (served at once, with the
/// API server down too), else a new one (waiting for the operator to sign it); and the task
/// that renews it from then on.
pub async fn obtain(
    client: kube::Client,
    node: String,
    data_dir: &Path,
) -> Result<(Arc<ServingCert>, impl Future<Output = ()> + Send + 'static), String> {
    let files = Files::in_dir(data_dir)?;
    let mut issued = match files.load(&node) {
        Some(kept) => kept,
        None => {
            let issued = request_until_issued(&client, &node).await;
            files.save(&issued)?;
            issued
        }
    };
    let cert = ServingCert::new(issued.certified()?);
    let serving = cert.clone();
    let renew = async move {
        loop {
            let wait = issued
                .renew_at()
                .duration_since(Timestamp::now())
                .try_into()
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            let next = request_until_issued(&client, &node).await;
            match next.certified() {
                Ok(key) => {
                    if let Err(e) = files.save(&next) {
                        tracing::error!(error = %e, "serving the renewed certificate, but it is not kept");
                    }
                    serving.replace(key);
                    tracing::info!(not_after = %next.not_after, "serving the renewed certificate");
                    issued = next;
                }
                Err(e) => {
                    tracing::error!(error = %e, "the renewed certificate is not usable; asking again")
                }
            }
        }
    };
    Ok((cert, renew))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issued(not_before: i64, not_after: i64, received: i64) -> Issued {
        let at = |s| Timestamp::from_second(s).unwrap();
        Issued {
            chain_pem: String::new(),
            key_pem: Zeroizing::new(String::new()),
            not_before: at(not_before),
            not_after: at(not_after),
            received: at(received),
        }
    }

    #[test]
    fn renewal_comes_two_thirds_into_the_time_left_when_received() {
        // Valid 30 s from receipt, backdated a minute: renewed 20 s after receipt, not at once.
        let backdated = issued(1_000, 1_090, 1_060);
        assert_eq!(backdated.renew_at().as_second(), 1_080);
        // Not backdated: two thirds of the lifetime.
        assert_eq!(issued(0, 300, 0).renew_at().as_second(), 200);
        // Read from disk part-way: two thirds of what is left.
        assert_eq!(issued(0, 300, 150).renew_at().as_second(), 250);
    }
}
