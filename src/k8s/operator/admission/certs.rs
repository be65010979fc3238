//! The webhook's serving certificate.
//!
//! Managed (the default): the operator keeps a CA of its own and a serving certificate signed
//! by it in one Secret of its namespace, and writes the CA into the `caBundle` of its
//! MutatingWebhookConfiguration, so the API server trusts exactly this CA for this webhook
//! (what cert-manager's self-signed issuer plus its CA injector would do, without installing
//! cert-manager). Every replica serves with the same certificate: the first to start creates
//! the Secret, the others read it (a create that loses the race reads the winner's). The
//! serving certificate is re-issued by the same CA when it nears its end or the names it must
//! cover change; the CA (ten years) only when the Secret is gone or unreadable.
//!
//! From files: with cert-manager (or anything else that writes `tls.crt` and `tls.key` into a
//! directory), the operator serves what it finds there and re-reads it when it changes;
//! the CA injector keeps the `caBundle`.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta};

use crate::k8s::component::Component;
use crate::k8s::operator::ca::{self, CA_CERT, CA_KEY, Ca};
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose,
};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

/// Keys of the managed Secret (the `kubernetes.io/tls` layout plus the CA's `ca.crt` and
/// `ca.key`, see `ca.rs`).
const TLS_CERT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
/// What the serving certificate was issued for, and until when (so that it is checked
/// without parsing X.509).
const HOSTS_ANNOTATION: &str = "clawbernetes.io/webhook-hosts";
const NOT_AFTER_ANNOTATION: &str = "clawbernetes.io/webhook-not-after";

/// The CA's subject (its parameters are rebuilt with it to sign renewals).
const CA_NAME: &str = "claw-secrets webhook CA";
const SERVING_VALIDITY: SignedDuration = SignedDuration::from_hours(24 * 365);
/// A serving certificate this close to its end is replaced.
const RENEW_BEFORE: SignedDuration = SignedDuration::from_hours(24 * 30);

/// Where the serving certificate comes from.
#[derive(Debug, Clone)]
pub enum CertSource {
    Managed {
        /// The Secret, in the operator's namespace.
        secret: String,
        /// DNS names and IP addresses the certificate covers (the Service's names, or the
        /// address in the webhook's `url`).
        hosts: Vec<String>,
        /// The MutatingWebhookConfiguration whose `caBundle` the operator keeps.
        configuration: Option<String>,
    },
    Files {
        dir: PathBuf,
    },
}

/// A serving certificate chain and key, PEM.
#[derive(Clone, PartialEq, Eq)]
pub struct Serving {
    pub chain_pem: String,
    pub key_pem: Zeroizing<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("Kubernetes API request for the webhook certificate failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("could not make the webhook certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("could not read the webhook certificate in {dir}: {source}; check --webhook-cert-dir")]
    Files {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The serving certificate to use now (creating or renewing the managed one if needed), and
/// the CA to put in the `caBundle` (managed only).
pub async fn current(
    client: &kube::Client,
    namespace: &str,
    source: &CertSource,
) -> Result<Serving, CertError> {
    match source {
        CertSource::Files { dir } => from_files(dir),
        CertSource::Managed {
            secret,
            hosts,
            configuration,
        } => {
            let (serving, ca_pem) = managed(client, namespace, secret, hosts).await?;
            if let Some(configuration) = configuration {
                inject_ca_bundle(client, configuration, &ca_pem).await?;
            }
            Ok(serving)
        }
    }
}

fn from_files(dir: &Path) -> Result<Serving, CertError> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|source| CertError::Files {
            dir: dir.to_owned(),
            source,
        })
    };
    Ok(Serving {
        chain_pem: read(TLS_CERT)?,
        key_pem: Zeroizing::new(read(TLS_KEY)?),
    })
}

/// The managed Secret's serving certificate and CA, made or renewed as needed.
async fn managed(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    hosts: &[String],
) -> Result<(Serving, String), CertError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let wanted_hosts = hosts.join(",");
    loop {
        let existing = api.get_opt(name).await?;
        let stored = existing.as_ref().and_then(Stored::read);
        if let Some(stored) = &stored
            && stored.hosts == wanted_hosts
            && stored.not_after > Timestamp::now() + RENEW_BEFORE
        {
            return Ok((stored.serving.clone(), stored.ca_cert.clone()));
        }
        // Renew with the same CA if there is one, so the caBundle stays valid for replicas
        // still serving the previous certificate.
        let (ca_cert, ca_key) = match &stored {
            Some(s) => (s.ca_cert.clone(), s.ca_key.clone()),
            None => {
                let ca = Ca::generate(CA_NAME)?;
                (ca.cert_pem, ca.key_pem)
            }
        };
        let (serving, not_after) = issue(&ca_key, hosts)?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                resource_version: existing
                    .as_ref()
                    .and_then(|e| e.metadata.resource_version.clone()),
                annotations: Some(BTreeMap::from([
                    (HOSTS_ANNOTATION.to_owned(), wanted_hosts.clone()),
                    (NOT_AFTER_ANNOTATION.to_owned(), not_after.to_string()),
                ])),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "claw-secrets-operator".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("kubernetes.io/tls".to_owned()),
            data: Some(BTreeMap::from([
                (CA_CERT.to_owned(), ByteString(ca_cert.clone().into_bytes())),
                (CA_KEY.to_owned(), ByteString(ca_key.as_bytes().to_vec())),
                (
                    TLS_CERT.to_owned(),
                    ByteString(serving.chain_pem.clone().into_bytes()),
                ),
                (
                    TLS_KEY.to_owned(),
                    ByteString(serving.key_pem.as_bytes().to_vec()),
                ),
            ])),
            ..Secret::default()
        };
        let written = if existing.is_some() {
            api.replace(name, &Component::Operator.post(), &secret)
                .await
        } else {
            api.create(&Component::Operator.post(), &secret).await
        };
        match written {
            Ok(_) => {
                tracing::info!(secret = %format!("{namespace}/{name}"), hosts = %wanted_hosts,
                    %not_after, new_ca = stored.is_none(),
                    "issued the webhook's serving certificate");
                return Ok((serving, ca_cert));
            }
            // Another replica wrote it first: use theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The managed Secret's contents, when complete and readable.
struct Stored {
    ca_cert: String,
    ca_key: Zeroizing<String>,
    serving: Serving,
    hosts: String,
    not_after: Timestamp,
}

impl Stored {
    fn read(secret: &Secret) -> Option<Stored> {
        let data = secret.data.as_ref()?;
        let text = |k: &str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let annotations = secret.metadata.annotations.as_ref()?;
        // A CA key that does not parse cannot sign a renewal: start again.
        let ca = Ca::read(secret)?;
        let stored = Stored {
            ca_cert: ca.cert_pem,
            ca_key: ca.key_pem,
            serving: Serving {
                chain_pem: text(TLS_CERT)?,
                key_pem: Zeroizing::new(text(TLS_KEY)?),
            },
            hosts: annotations.get(HOSTS_ANNOTATION)?.clone(),
            not_after: annotations.get(NOT_AFTER_ANNOTATION)?.parse().ok()?,
        };
        Some(stored)
    }
}

fn issue(ca_key_pem: &str, hosts: &[String]) -> Result<(Serving, Timestamp), CertError> {
    let ca_key = KeyPair::from_pem(ca_key_pem)?;
    let issuer = Issuer::new(ca::ca_params(CA_NAME)?, ca_key);
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        hosts.first().map_or("claw-secrets-webhook", String::as_str),
    );
    params.distinguished_name = dn;
    params.subject_alt_names = hosts.iter().map(|h| ca::san(h)).collect::<Result<_, _>>()?;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let now = Timestamp::now();
    let not_after = now + SERVING_VALIDITY;
    ca::set_validity_days(&mut params, now, not_after);
    let cert = params.signed_by(&key, &issuer)?;
    Ok((
        Serving {
            chain_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        },
        not_after,
    ))
}

/// Writes `ca_pem` into every webhook of the configuration whose `caBundle` differs.
async fn inject_ca_bundle(
    client: &kube::Client,
    configuration: &str,
    ca_pem: &str,
) -> Result<(), CertError> {
    let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
    let bundle = ByteString(ca_pem.as_bytes().to_vec());
    loop {
        let Some(mut config) = api.get_opt(configuration).await? else {
            tracing::warn!(%configuration,
                "the MutatingWebhookConfiguration does not exist; ClawSecrets are sealed by the reconcile loop only (plaintext reaches etcd)");
            return Ok(());
        };
        let mut changed = false;
        for webhook in config.webhooks.iter_mut().flatten() {
            if webhook.client_config.ca_bundle.as_ref() != Some(&bundle) {
                webhook.client_config.ca_bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if !changed {
            return Ok(());
        }
        // A replace guarded by the resourceVersion: an edit made meanwhile is read again.
        match api
            .replace(configuration, &Component::Operator.post(), &config)
            .await
        {
            Ok(_) => {
                tracing::info!(%configuration, "wrote the webhook CA into the caBundle");
                return Ok(());
            }
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// A CA as the operator makes one (PEM certificate, PEM key).
    pub fn new_ca_for_tests() -> (String, Zeroizing<String>) {
        let ca = Ca::generate(CA_NAME).unwrap();
        (ca.cert_pem, ca.key_pem)
    }

    /// A serving certificate as the operator issues one.
    pub fn issue_for_tests(ca_key: &str, hosts: &[String]) -> Serving {
        issue(ca_key, hosts).unwrap().0
    }
}
