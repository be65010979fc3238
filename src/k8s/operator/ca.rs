//! The operator's certificate authorities, kept in Secrets of its namespace: the webhook's
//! (`admission/certs.rs`, in the same Secret as its serving certificate) and the one that signs
//! the agents' serving certificates (`agent_certs.rs`). Both are made here the same way; every
//! replica uses the same CA, whoever made it first (a create that loses the race reads the
//! winner's).
//!
//! The CA keys are PEM text held in `Zeroizing` and never logged: what is logged or reported
//! names the Secret, never its contents.

use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta};
use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
use rcgen::{KeyUsagePurpose, SanType};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

use crate::k8s::component::Component;

/// Keys of the CA in its Secret.
pub(crate) const CA_CERT: &str = "ca.crt";
pub(crate) const CA_KEY: &str = "ca.key";

/// Ten years: a CA is replaced only when its Secret is gone or unreadable.
pub(crate) const CA_VALIDITY: SignedDuration = SignedDuration::from_hours(24 * 3650);

/// A CA: its certificate and private key, PEM.
#[derive(Clone)]
pub(crate) struct Ca {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").finish_non_exhaustive()
    }
}

impl Ca {
    /// A new CA named `common_name`, valid for [`CA_VALIDITY`] from the day before now.
    pub fn generate(common_name: &str) -> Result<Ca, rcgen::Error> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(common_name)?;
        let now = Timestamp::now();
        set_validity_days(&mut params, now, now + CA_VALIDITY);
        let cert = params.self_signed(&key)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
        })
    }

    /// The CA kept in `secret` (keys [`CA_CERT`], [`CA_KEY`]), if both are there and the key
    /// parses (one that does not cannot sign anything: the caller starts again).
    pub fn read(secret: &Secret) -> Option<Ca> {
        let data = secret.data.as_ref()?;
        let text = |k: &str| {
            data.get(k)
                .and_then(|b| String::from_utf8(b.0.clone()).ok())
        };
        let ca = Ca {
            cert_pem: text(CA_CERT)?,
            key_pem: Zeroizing::new(text(CA_KEY)?),
        };
        KeyPair::from_pem(&ca.key_pem).ok()?;
        Some(ca)
    }

    /// The Secret data holding this CA.
    pub fn secret_data(&self) -> BTreeMap<String, ByteString> {
        BTreeMap::from([
            (
                CA_CERT.to_owned(),
                ByteString(self.cert_pem.clone().into_bytes()),
            ),
            (
                CA_KEY.to_owned(),
                ByteString(self.key_pem.as_bytes().to_vec()),
            ),
        ])
    }
}

/// A CA's parameters. The webhook's are rebuilt identically to sign renewals: its subject is
/// what the serving certificates name as their issuer.
pub(crate) fn ca_params(common_name: &str) -> Result<CertificateParams, rcgen::Error> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "claw-secrets");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Sets the validity at day granularity: from the day before `now`, so a clock a little behind
/// still accepts it, to `until`'s day.
pub(crate) fn set_validity_days(params: &mut CertificateParams, now: Timestamp, until: Timestamp) {
    let day = |t: Timestamp| {
        let d = t.to_zoned(jiff::tz::TimeZone::UTC).date();
        rcgen::date_time_ymd(
            i32::from(d.year()),
            u8::try_from(d.month()).expect("1-12"),
            u8::try_from(d.day()).expect("1-31"),
        )
    };
    params.not_before = day(now - SignedDuration::from_hours(24));
    params.not_after = day(until);
}

/// Sets the validity to the second (rcgen's dates, without a time crate of our own: the epoch
/// plus whole seconds). Instants before the epoch are clamped to it.
pub(crate) fn set_validity_seconds(
    params: &mut CertificateParams,
    not_before: Timestamp,
    not_after: Timestamp,
) {
    let at = |t: Timestamp| {
        let secs = u64::try_from(t.as_second()).unwrap_or(0);
        rcgen::date_time_ymd(1970, 1, 1) + std::time::Duration::from_secs(secs)
    };
    params.not_before = at(not_before);
    params.not_after = at(not_after);
}

/// A DNS name or IP address as a subject alternative name.
pub(crate) fn san(host: &str) -> Result<SanType, rcgen::Error> {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => host.to_owned().try_into().map(SanType::DnsName),
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum CaError {
    #[error("Kubernetes API request for the CA Secret {secret} failed: {source}")]
    Kube {
        secret: String,
        #[source]
        source: kube::Error,
    },
    #[error("could not make the CA kept in Secret {secret}: {source}")]
    Generate {
        secret: String,
        #[source]
        source: rcgen::Error,
    },
}

/// The CA kept in Secret `namespace/name` (keys `ca.crt`, `ca.key`, nothing else), created as
/// `common_name` if the Secret is missing, and made again if it is unreadable. Safe between
/// replicas: the create and the replace are guarded (by name, by resourceVersion), and the one
/// that loses reads the winner's CA. Returns the CA and whether it is new.
pub(crate) async fn load_or_create(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    common_name: &str,
) -> Result<(Ca, bool), CaError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret_name = format!("{namespace}/{name}");
    let kube_error = |source| CaError::Kube {
        secret: secret_name.clone(),
        source,
    };
    loop {
        let existing = api.get_opt(name).await.map_err(kube_error)?;
        if let Some(ca) = existing.as_ref().and_then(Ca::read) {
            return Ok((ca, false));
        }
        let ca = Ca::generate(common_name).map_err(|source| CaError::Generate {
            secret: secret_name.clone(),
            source,
        })?;
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                resource_version: existing
                    .as_ref()
                    .and_then(|e| e.metadata.resource_version.clone()),
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/managed-by".to_owned(),
                    "claw-secrets-operator".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".to_owned()),
            data: Some(ca.secret_data()),
            ..Secret::default()
        };
        let written = if existing.is_some() {
            tracing::warn!(secret = %secret_name,
                "the CA Secret is incomplete or unreadable; replacing it with a new CA (certificates signed by the old one are no longer trusted)");
            api.replace(name, &Component::Operator.post(), &secret)
                .await
        } else {
            api.create(&Component::Operator.post(), &secret).await
        };
        match written {
            Ok(_) => return Ok((ca, true)),
            // Another replica wrote it first: use theirs.
            Err(kube::Error::Api(s)) if s.code == 409 => continue,
            Err(e) => return Err(kube_error(e)),
        }
    }
}
