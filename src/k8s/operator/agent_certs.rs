//! The signer of the agents' serving certificates (docs/architecture.md, "TLS to the agent";
//! the contract is `crate::k8s::agent_certs`). The leader watches the CertificateSigningRequests
//! of signer `clawbernetes.io/agent-serving` and:
//!
//! - decides each pending one: Approved only if it comes from the agents' ServiceAccount with a
//!   token bound to node N and asks for a serving certificate naming N and nothing else
//!   ([`check_request`]); Denied otherwise, with the rule it broke;
//! - signs each approved one without a certificate, with the CA it keeps in Secret
//!   `claw-secrets-agent-ca` (the same check again first: an approval by someone else does not
//!   make the operator sign what it would deny; such a request is marked Failed);
//! - deletes those issued, denied or failed over an hour ago, as kube-controller-manager's
//!   csrcleaner does (a cluster without one would keep them forever).
//!
//! It also publishes the CA's certificate in ConfigMap `claw-secrets-agent-ca`, which clients
//! of the agents trust: in the operator's namespace and, as Kubernetes publishes
//! `kube-root-ca.crt`, in every namespace (only the watched one with `--watch-namespace`), so a
//! workload mounts it from its own namespace to verify its node's agent. Key material (the CA key) stays in memory and in its Secret: nothing
//! here logs, reports or writes it anywhere else.

use futures::StreamExt;
use jiff::{SignedDuration, Timestamp};
use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition,
};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::EventType;
use kube::runtime::watcher;
use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber,
};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::Context;
use super::ca::{self, Ca};
use crate::k8s::agent_certs::{
    CA_BUNDLE_CONFIGMAP, CA_BUNDLE_KEY, CA_SECRET, Denial, Request, SIGNER_NAME, check_request,
    common_name,
};
use crate::k8s::component::Component;

/// The subject of the agents' CA.
const CA_NAME: &str = "claw-secrets agent CA";

/// The Approved condition's reason.
const APPROVED_REASON: &str = "ClawSecretsAgentNode";

/// Requests issued, denied or failed this long ago are deleted (kube-controller-manager's
/// csrcleaner keeps them an hour too).
const KEEP_FINISHED: SignedDuration = SignedDuration::from_hours(1);

/// A certificate's notBefore is this far in the past, so a client whose clock is a little
/// behind the operator's accepts it at once.
const BACKDATE: SignedDuration = SignedDuration::from_mins(1);

/// The shortest lifetime a request's `spec.expirationSeconds` may ask for (the API server's
/// own minimum).
const MIN_LIFETIME: Duration = Duration::from_secs(600);

/// What the signer is told by the operator's flags.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The operator's namespace: where the CA Secret and the bundle ConfigMap live.
    pub namespace: String,
    /// The agents' ServiceAccount as a username (`system:serviceaccount:NS:NAME`).
    pub agent_user: String,
    /// How long a certificate is valid (`--agent-certificate-lifetime`).
    pub lifetime: Duration,
    /// The namespace the operator watches (`--watch-namespace`), if only one: the bundle is
    /// published there, else in every namespace.
    pub scope: Option<String>,
}

struct Signer {
    ctx: Arc<Context>,
    settings: Settings,
    ca: Ca,
    api: Api<CertificateSigningRequest>,
}

#[derive(Debug, thiserror::Error)]
enum SignError {
    #[error("Kubernetes API request on CertificateSigningRequest {name} failed: {source}")]
    Kube {
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error("could not sign CertificateSigningRequest {name}: {source}")]
    Sign {
        name: String,
        #[source]
        source: rcgen::Error,
    },
}

impl SignError {
    fn is_conflict(&self) -> bool {
        matches!(self, SignError::Kube { source, .. } if super::error::is_conflict(source))
    }
}

/// Runs the signer until `stop` (or until the leader's work is dropped with its leadership).
pub async fn run(ctx: Arc<Context>, settings: Settings, stop: watch::Receiver<bool>) {
    let client = ctx.client.clone();
    let secret = format!("{}/{CA_SECRET}", settings.namespace);
    // The CA, then its bundle: retried until they succeed, since without them nothing can be
    // signed or verified (a missing permission shows in the log and is fixed by the RBAC).
    let mut delay = Duration::from_secs(1);
    let ca = loop {
        match ca::load_or_create(&client, &settings.namespace, CA_SECRET, CA_NAME).await {
            Ok((ca, created)) => {
                tracing::info!(%secret, created, "loaded the CA of the agents' certificates");
                break ca;
            }
            Err(e) => {
                tracing::warn!(error = %e, retry_in_s = delay.as_secs(),
                    "cannot load or create the CA of the agents' certificates; check the operator's Role (secrets, resourceNames [claw-secrets-agent-ca])");
            }
        }
        if sleep_or_stop(&mut delay, &stop).await {
            return;
        }
    };
    let mut delay = Duration::from_secs(1);
    loop {
        match publish_bundle(&client, &settings.namespace, &ca.cert_pem).await {
            Ok(()) => {
                tracing::info!(configmap = %format!("{}/{CA_BUNDLE_CONFIGMAP}", settings.namespace),
                    "published the CA bundle of the agents' certificates");
                break;
            }
            Err(e) => tracing::warn!(error = %e, retry_in_s = delay.as_secs(),
                "cannot publish the CA bundle of the agents' certificates; check the operator's Role (configmaps, resourceNames [claw-secrets-agent-ca])"),
        }
        if sleep_or_stop(&mut delay, &stop).await {
            return;
        }
    }

    let distribution = distribute(client.clone(), ca.cert_pem.clone(), settings.scope.clone());
    let api: Api<CertificateSigningRequest> = Api::all(client);
    let signer = Arc::new(Signer {
        ctx,
        settings,
        ca,
        api: api.clone(),
    });
    let selector = format!("spec.signerName={SIGNER_NAME}");
    tracing::info!(
        signer = SIGNER_NAME,
        "signing the agents' serving certificates"
    );
    let signing = Controller::new(api, watcher::Config::default().fields(&selector))
        .graceful_shutdown_on(super::stopped(stop.clone()))
        .run(reconcile, error_policy, signer)
        .for_each(|r| async move {
            match r {
                Ok(_) | Err(kube::runtime::controller::Error::ReconcilerFailed(..)) => {}
                Err(kube::runtime::controller::Error::ObjectNotFound(obj)) => {
                    tracing::debug!(object = %obj, "CertificateSigningRequest gone before its reconciliation");
                }
                Err(e) => tracing::warn!(kind = "CertificateSigningRequest", error = %e,
                    "watching failed; retrying"),
            }
        });
    let mut stopped = stop.clone();
    tokio::select! {
        () = signing => {}
        () = distribution => {}
        _ = stopped.wait_for(|s| *s) => {}
    }
}

/// Publishes the bundle in `scope`, or in every namespace as namespaces come (a watch of their
/// metadata); a namespace that refuses it (terminating) is skipped, and looked at again when
/// the watch lists it again.
async fn distribute(client: kube::Client, ca_pem: String, scope: Option<String>) {
    if let Some(namespace) = scope {
        let mut delay = Duration::from_secs(1);
        while let Err(e) = publish_bundle(&client, &namespace, &ca_pem).await {
            tracing::warn!(%namespace, error = %e, "cannot publish the agents' CA bundle; retrying");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(Duration::from_secs(30));
        }
        return std::future::pending().await;
    }
    use kube::runtime::WatchStreamExt;
    let namespaces: Api<kube::core::PartialObjectMeta<k8s_openapi::api::core::v1::Namespace>> =
        Api::all(client.clone());
    let mut published = std::collections::HashSet::new();
    let events = watcher::watcher(namespaces, watcher::Config::default())
        .default_backoff()
        .applied_objects();
    futures::pin_mut!(events);
    while let Some(event) = events.next().await {
        let namespace = match event {
            Ok(ns) if ns.metadata.deletion_timestamp.is_none() => ns.name_any(),
            Ok(_) => continue,
            Err(e) => {
                tracing::warn!(error = %e, "watching namespaces failed; retrying");
                continue;
            }
        };
        if published.contains(&namespace) {
            continue;
        }
        match publish_bundle(&client, &namespace, &ca_pem).await {
            Ok(()) => {
                tracing::debug!(%namespace, "published the agents' CA bundle");
                published.insert(namespace);
            }
            Err(e) => tracing::warn!(%namespace, error = %e,
                "cannot publish the agents' CA bundle in this namespace; check the operator's ClusterRole (configmaps, resourceNames [claw-secrets-agent-ca])"),
        }
    }
}

/// Sleeps `delay` (doubling it up to 30 s for the next time); `true` if `stop` came first.
async fn sleep_or_stop(delay: &mut Duration, stop: &watch::Receiver<bool>) -> bool {
    let mut stop = stop.clone();
    let stopped = tokio::select! {
        () = tokio::time::sleep(*delay) => false,
        _ = stop.wait_for(|s| *s) => true,
    };
    *delay = (*delay * 2).min(Duration::from_secs(30));
    stopped
}

/// Server-side apply of the bundle ConfigMap (every replica that leads writes the same).
async fn publish_bundle(
    client: &kube::Client,
    namespace: &str,
    ca_pem: &str,
) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CA_BUNDLE_CONFIGMAP,
            "labels": { "app.kubernetes.io/managed-by": "claw-secrets-operator" },
            "annotations": {
                "clawbernetes.io/usage": "the CA of the node agents' serving certificates (signer clawbernetes.io/agent-serving): clients of an agent verify it with this bundle and check that it names the node they ask",
            },
        },
        "data": { CA_BUNDLE_KEY: ca_pem },
    });
    crate::k8s::sealing_key::apply(&api, CA_BUNDLE_CONFIGMAP, &manifest).await
}

/// Where a request stands, from its conditions and certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    Pending,
    /// Approved, not yet signed.
    ToSign,
    /// Issued, denied or failed: since when (its last condition's update).
    Finished(Option<Timestamp>),
}

fn stage(csr: &CertificateSigningRequest) -> Stage {
    let status = csr.status.as_ref();
    let conditions = status
        .and_then(|s| s.conditions.as_deref())
        .unwrap_or_default();
    let has = |type_: &str| {
        conditions
            .iter()
            .any(|c| c.type_ == type_ && c.status == "True")
    };
    let issued = status
        .and_then(|s| s.certificate.as_ref())
        .is_some_and(|c| !c.0.is_empty());
    if !has("Approved") && !has("Denied") && !has("Failed") {
        return Stage::Pending;
    }
    if has("Approved") && !has("Denied") && !has("Failed") && !issued {
        return Stage::ToSign;
    }
    let since = conditions
        .iter()
        .filter_map(|c| c.last_update_time.as_ref().map(|t| t.0))
        .max()
        .or_else(|| csr.metadata.creation_timestamp.as_ref().map(|t| t.0));
    Stage::Finished(since)
}

fn condition(type_: &str, reason: &str, message: String) -> CertificateSigningRequestCondition {
    let now = Time(Timestamp::now());
    CertificateSigningRequestCondition {
        type_: type_.to_owned(),
        status: "True".to_owned(),
        reason: Some(reason.to_owned()),
        message: Some(message),
        last_update_time: Some(now.clone()),
        last_transition_time: Some(now),
    }
}

/// The request as the checks see it.
fn request_of(csr: &CertificateSigningRequest) -> Request<'_> {
    Request {
        username: csr.spec.username.as_deref().unwrap_or_default(),
        extra: csr.spec.extra.as_ref(),
        usages: csr.spec.usages.as_deref().unwrap_or_default(),
        pem: &csr.spec.request.0,
    }
}

async fn reconcile(
    csr: Arc<CertificateSigningRequest>,
    signer: Arc<Signer>,
) -> Result<Action, SignError> {
    // The watch selects this signer's requests only; checked again all the same.
    if csr.spec.signer_name != SIGNER_NAME {
        return Ok(Action::await_change());
    }
    match stage(&csr) {
        Stage::Pending => {
            decide(&csr, &signer).await?;
            // The write brings the request back through the watch, to be signed.
            Ok(Action::await_change())
        }
        Stage::ToSign => {
            sign(&csr, &signer).await?;
            Ok(Action::requeue(KEEP_FINISHED.unsigned_abs()))
        }
        Stage::Finished(since) => {
            let age = since.map_or(SignedDuration::MAX, |t| Timestamp::now().duration_since(t));
            if age < KEEP_FINISHED {
                return Ok(Action::requeue((KEEP_FINISHED - age).unsigned_abs()));
            }
            let name = csr.name_any();
            match signer.api.delete(&name, &DeleteParams::default()).await {
                Ok(_) => {
                    tracing::info!(csr = %name, "deleted a finished agent CertificateSigningRequest (over an hour old)");
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(source) => return Err(SignError::Kube { name, source }),
            }
            Ok(Action::await_change())
        }
    }
}

/// Approves or denies a pending request (a replace of its approval subresource, guarded by
/// its resourceVersion: a decision made meanwhile by anyone else wins).
async fn decide(csr: &CertificateSigningRequest, signer: &Signer) -> Result<(), SignError> {
    let name = csr.name_any();
    let decision = check_request(&signer.settings.agent_user, request_of(csr));
    let (type_, reason, message) = match &decision {
        Ok(parsed) => (
            "Approved",
            APPROVED_REASON,
            format!(
                "approved by the claw-secrets operator: the agents' ServiceAccount, with a token bound to node {node}, asks for a serving certificate naming {node} only",
                node = parsed.node
            ),
        ),
        Err(Denial { reason, message }) => ("Denied", *reason, message.clone()),
    };
    let mut decided = csr.clone();
    decided
        .status
        .get_or_insert_with(Default::default)
        .conditions
        .get_or_insert_with(Vec::new)
        .push(condition(type_, reason, message.clone()));
    signer
        .api
        .replace_subresource("approval", &name, &Component::Operator.post(), &decided)
        .await
        .map_err(|source| SignError::Kube {
            name: name.clone(),
            source,
        })?;
    let username = request_of(csr).username;
    match &decision {
        Ok(parsed) => {
            tracing::info!(csr = %name, node = %parsed.node, %username,
                "approved an agent's CertificateSigningRequest");
            signer
                .ctx
                .event(csr, EventType::Normal, "Approved", "Approve", message)
                .await;
        }
        Err(denial) => {
            tracing::info!(csr = %name, %username, reason = denial.reason,
                message = %denial.message, "denied a CertificateSigningRequest");
            signer
                .ctx
                .event(csr, EventType::Warning, "Denied", "Deny", message)
                .await;
        }
    }
    Ok(())
}

/// Signs an approved request: the node's serving certificate for the request's key, issued by
/// the CA, written to `status.certificate`. The certificate's contents are the operator's
/// (from the node name the checks established), not copied from the request.
async fn sign(csr: &CertificateSigningRequest, signer: &Signer) -> Result<(), SignError> {
    let name = csr.name_any();
    let mut signed = csr.clone();
    let status = signed.status.get_or_insert_with(Default::default);
    let (outcome, note) = match check_request(&signer.settings.agent_user, request_of(csr)) {
        Ok(parsed) => {
            let lifetime = lifetime(signer.settings.lifetime, csr.spec.expiration_seconds);
            let pem = issue(&signer.ca, &parsed.node, &parsed.public_key_der, lifetime).map_err(
                |source| SignError::Sign {
                    name: name.clone(),
                    source,
                },
            )?;
            status.certificate = Some(ByteString(pem.into_bytes()));
            let note = format!(
                "signed by the claw-secrets operator: a serving certificate for node {}, valid {} s",
                parsed.node,
                lifetime.as_secs()
            );
            (Ok(parsed.node), note)
        }
        // Approved by someone else, but not what this signer signs: marked Failed, as the
        // certificates API asks of a signer that will not issue.
        Err(Denial { reason, message }) => {
            let message = format!("not signed: {message}");
            status
                .conditions
                .get_or_insert_with(Vec::new)
                .push(condition("Failed", reason, message.clone()));
            (Err(reason), message)
        }
    };
    signer
        .api
        .replace_status(&name, &Component::Operator.post(), &signed)
        .await
        .map_err(|source| SignError::Kube {
            name: name.clone(),
            source,
        })?;
    match outcome {
        Ok(node) => {
            tracing::info!(csr = %name, %node, "issued an agent's serving certificate");
            signer
                .ctx
                .event(csr, EventType::Normal, "Issued", "Sign", note)
                .await;
        }
        Err(reason) => {
            tracing::warn!(csr = %name, reason, message = %note,
                "an approved CertificateSigningRequest was not signed");
            signer
                .ctx
                .event(csr, EventType::Warning, "Failed", "Sign", note)
                .await;
        }
    }
    Ok(())
}

/// The certificate's lifetime: `--agent-certificate-lifetime`, or less if the request asks
/// for less (`spec.expirationSeconds`, at least ten minutes, as the API server requires).
fn lifetime(configured: Duration, requested_seconds: Option<i32>) -> Duration {
    match requested_seconds.and_then(|s| u64::try_from(s).ok()) {
        Some(s) => configured.min(Duration::from_secs(s).max(MIN_LIFETIME)),
        None => configured,
    }
}

/// The serving certificate of `node` for the public key `public_key_der` (a DER
/// SubjectPublicKeyInfo), issued by `ca`, valid from a minute ago for `lifetime`; PEM.
fn issue(
    ca: &Ca,
    node: &str,
    public_key_der: &[u8],
    lifetime: Duration,
) -> Result<String, rcgen::Error> {
    let issuer = Issuer::from_ca_cert_pem(&ca.cert_pem, KeyPair::from_pem(&ca.key_pem)?)?;
    let public_key = rcgen::SubjectPublicKeyInfo::from_der(public_key_der)?;
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name(node));
    params.distinguished_name = dn;
    params.subject_alt_names = vec![ca::san(node)?];
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    // A random serial (positive: the top bit clear), unique per certificate.
    let mut serial = [0u8; 16];
    getrandom::getrandom(&mut serial).map_err(|_| rcgen::Error::RingUnspecified)?;
    serial[0] &= 0x7f;
    params.serial_number = Some(SerialNumber::from_slice(&serial));
    let now = Timestamp::now();
    let lifetime = SignedDuration::try_from(lifetime).unwrap_or(SignedDuration::MAX);
    let not_after = now.checked_add(lifetime).unwrap_or(Timestamp::MAX);
    ca::set_validity_seconds(&mut params, now - BACKDATE, not_after);
    Ok(params.signed_by(&public_key, &issuer)?.pem())
}

/// Retry after a failure: soon after a conflict (the fresh request is on its way), otherwise
/// after 5 s.
fn error_policy(
    csr: Arc<CertificateSigningRequest>,
    error: &SignError,
    _signer: Arc<Signer>,
) -> Action {
    if error.is_conflict() {
        return Action::requeue(Duration::from_millis(500));
    }
    tracing::warn!(csr = %csr.name_any(), error = %error, "CertificateSigningRequest not handled; retrying");
    Action::requeue(Duration::from_secs(5))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::PKCS_ECDSA_P256_SHA256;
    use x509_parser::prelude::*;

    #[test]
    fn the_certificate_names_the_node_and_chains_to_the_ca() {
        let ca = Ca::generate(CA_NAME).unwrap();
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let spki = rcgen::PublicKeyData::subject_public_key_info(&key);
        let pem = issue(&ca, "node-a", &spki, Duration::from_secs(3600)).unwrap();
        let (_, leaf) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).unwrap();
        let leaf = leaf.parse_x509().unwrap();
        let (_, ca_pem) = x509_parser::pem::parse_x509_pem(ca.cert_pem.as_bytes()).unwrap();
        let ca_cert = ca_pem.parse_x509().unwrap();
        leaf.verify_signature(Some(ca_cert.public_key())).unwrap();
        assert_eq!(leaf.issuer(), ca_cert.subject());
        assert_eq!(leaf.public_key().raw, spki.as_slice());
        let cn: Vec<_> = leaf.subject().iter_common_name().collect();
        assert_eq!(cn.len(), 1);
        assert_eq!(cn[0].as_str().unwrap(), common_name("node-a"));
        let san = leaf.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::DNSName("node-a")]
        );
        let eku = leaf.extended_key_usage().unwrap().unwrap();
        assert!(eku.value.server_auth && !eku.value.client_auth);
        assert!(!leaf.is_ca());
        let validity = leaf.validity();
        let seconds = validity.not_after.timestamp() - validity.not_before.timestamp();
        assert_eq!(seconds, 3600 + 60, "an hour, from a minute ago");
        let now = Timestamp::now().as_second();
        assert!((validity.not_before.timestamp() - (now - 60)).abs() <= 5);
        // Two certificates never share a serial.
        let other = issue(&ca, "node-a", &spki, Duration::from_secs(3600)).unwrap();
        let (_, other) = x509_parser::pem::parse_x509_pem(other.as_bytes()).unwrap();
        assert_ne!(other.parse_x509().unwrap().serial, leaf.serial);
    }

    #[test]
    fn a_request_may_ask_for_a_shorter_lifetime_only() {
        let month = Duration::from_secs(30 * 86_400);
        assert_eq!(lifetime(month, None), month);
        assert_eq!(lifetime(month, Some(3600)), Duration::from_secs(3600));
        assert_eq!(lifetime(month, Some(60)), MIN_LIFETIME);
        assert_eq!(lifetime(month, Some(i32::MAX)), month);
        assert_eq!(lifetime(month, Some(-1)), month);
    }

    fn csr_with(conditions: &[(&str, &str)], certificate: bool) -> CertificateSigningRequest {
        let mut csr = CertificateSigningRequest::default();
        let status = csr.status.get_or_insert_with(Default::default);
        status.conditions = Some(
            conditions
                .iter()
                .map(|(t, s)| CertificateSigningRequestCondition {
                    type_: (*t).to_owned(),
                    status: (*s).to_owned(),
                    ..Default::default()
                })
                .collect(),
        );
        if certificate {
            status.certificate = Some(ByteString(b"PEM".to_vec()));
        }
        csr
    }

    #[test]
    fn stages() {
        assert_eq!(stage(&CertificateSigningRequest::default()), Stage::Pending);
        assert_eq!(
            stage(&csr_with(&[("Approved", "False")], false)),
            Stage::Pending
        );
        assert_eq!(
            stage(&csr_with(&[("Approved", "True")], false)),
            Stage::ToSign
        );
        for finished in [
            csr_with(&[("Approved", "True")], true),
            csr_with(&[("Denied", "True")], false),
            csr_with(&[("Approved", "True"), ("Failed", "True")], false),
        ] {
            assert!(matches!(stage(&finished), Stage::Finished(_)));
        }
    }
}
