//! The operator as the signer of the agents' serving certificates (issue 18, "TLS to the
//! agent"; docs/operator.md "The agents' serving certificates"), against a real kube-apiserver:
//! CertificateSigningRequests of signer `clawbernetes.io/agent-serving` created with the agent's
//! real identity (deploy/rbac/agent.yaml as shipped, a ServiceAccount token bound to its Node,
//! as the token projected into its pod is), approved and signed only for the node the token is
//! bound to, denied otherwise.
//!
//! CertificateSigningRequests are cluster-wide and every signing operator decides all of its
//! signer's requests, so each test runs alone (`cluster::exclusive`) with one operator signing
//! (`--agent-signer`).

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

#[path = "support/files.rs"]
mod files;

#[path = "support/process.rs"]
mod process;

#[path = "support/protocol.rs"]
mod protocol;

#[path = "support/relay.rs"]
mod relay;

#[path = "support/control_plane.rs"]
mod control_plane;

#[path = "support/cluster.rs"]
mod cluster;

#[path = "support/tokens.rs"]
mod tokens;

#[path = "support/agent_identity.rs"]
mod agent_identity;

#[path = "support/webhook.rs"]
mod webhook;

#[path = "support/canary.rs"]
mod canary;

#[path = "support/host.rs"]
mod host;

use k8s_openapi::ByteString;
use k8s_openapi::api::certificates::v1::{
    CertificateSigningRequest, CertificateSigningRequestCondition, CertificateSigningRequestSpec,
};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use rcgen::{PublicKeyData, SanType};
use std::time::Duration;

use claw_secrets::k8s::agent_certs::{
    CA_BUNDLE_CONFIGMAP, CA_BUNDLE_KEY, SIGNER_NAME, USAGES, common_name,
};
use cluster::{Cluster, Operator};
use wait::eventually;

/// The certificate lifetime the tests' operator is given (`--agent-certificate-lifetime`).
const LIFETIME_SECONDS: i64 = 7200;

/// A test's cluster, the agents' identity (deploy/rbac/agent.yaml applied in the operator's
/// namespace) and one operator that signs.
struct Signing {
    c: Cluster,
    operator: Operator,
    /// The operator's (and the agents') namespace.
    ns: String,
    scratch: tempfile::TempDir,
    /// CSRs this test created (cluster-scoped: deleted at the end).
    created: std::sync::Mutex<Vec<String>>,
}

impl Signing {
    async fn start(hint: &str) -> Signing {
        Signing::start_with_lifetime(hint, LIFETIME_SECONDS).await
    }

    /// With `--agent-certificate-lifetime` of `lifetime_seconds`.
    async fn start_with_lifetime(hint: &str, lifetime_seconds: i64) -> Signing {
        let c = Cluster::new(hint).await;
        let ns = cluster::master_key_namespace().to_owned();
        agent_identity::apply_agent_rbac(&c.client(), &c.env.kubeconfig, &ns).await;
        let lease = format!("claw-secrets-operator-{}", c.suffix());
        let lifetime = format!("{lifetime_seconds}s");
        let account = format!("{ns}/{}", agent_identity::AGENT_ACCOUNT);
        let operator = Operator::start_with(
            &c.env.kubeconfig,
            &c.master_key,
            &lease,
            Some(c.ns()),
            &[
                "--agent-signer".to_owned(),
                "--agent-service-account".to_owned(),
                account,
                "--agent-certificate-lifetime".to_owned(),
                lifetime,
            ],
        )
        .await;
        Signing {
            c,
            operator,
            ns,
            scratch: tempfile::tempdir().expect("temp dir"),
            created: std::sync::Mutex::default(),
        }
    }

    /// The client of `node`'s agent: its ServiceAccount token bound to that Node.
    async fn agent_client(&self, node: &str) -> kube::Client {
        agent_identity::node_client(&self.c, node, self.scratch.path())
            .await
            .0
    }

    /// Creates CSR `name` (made unique to the test) with `client`, for the PEM `request`.
    async fn create(&self, client: &kube::Client, name: &str, request: &str) -> String {
        let name = format!("{name}-{}", self.c.suffix());
        let csr = CertificateSigningRequest {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            spec: CertificateSigningRequestSpec {
                request: ByteString(request.as_bytes().to_vec()),
                signer_name: SIGNER_NAME.to_owned(),
                usages: Some(USAGES.iter().map(|u| (*u).to_owned()).collect()),
                ..CertificateSigningRequestSpec::default()
            },
            status: None,
        };
        Api::<CertificateSigningRequest>::all(client.clone())
            .create(&PostParams::default(), &csr)
            .await
            .unwrap_or_else(|e| panic!("creating CSR {name}: {e}"));
        self.created.lock().unwrap().push(name.clone());
        name
    }

    /// The published CA bundle (`ca.crt` of ConfigMap claw-secrets-agent-ca), once there.
    async fn bundle(&self) -> String {
        let api = Api::<ConfigMap>::namespaced(self.c.client(), &self.ns);
        eventually("the agents' CA bundle to be published", || async {
            api.get(CA_BUNDLE_CONFIGMAP)
                .await
                .map_err(|e| e.to_string())?
                .data
                .and_then(|mut d| d.remove(CA_BUNDLE_KEY))
                .ok_or_else(|| "no ca.crt".to_owned())
        })
        .await
    }

    fn csrs(&self) -> Api<CertificateSigningRequest> {
        Api::all(self.c.client())
    }

    /// Waits until CSR `name` is approved or denied; returns it and that condition.
    async fn decided(
        &self,
        name: &str,
    ) -> (
        CertificateSigningRequest,
        CertificateSigningRequestCondition,
    ) {
        let api = self.csrs();
        eventually(&format!("CSR {name} to be approved or denied"), || async {
            let csr = api.get(name).await.map_err(|e| e.to_string())?;
            let condition = csr
                .status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .and_then(|c| {
                    c.iter()
                        .find(|c| c.type_ == "Approved" || c.type_ == "Denied")
                        .cloned()
                });
            match condition {
                Some(condition) => Ok((csr, condition)),
                None => Err(format!("pending: {:?}", csr.status)),
            }
        })
        .await
    }

    /// Asserts that CSR `name` is denied for `reason`, that its message says `says`, and that
    /// no certificate is issued for it (also a moment later).
    async fn assert_denied(&self, name: &str, reason: &str, says: &str) -> String {
        let (_, condition) = self.decided(name).await;
        assert_eq!(condition.type_, "Denied", "CSR {name}: {condition:?}");
        assert_eq!(condition.status, "True");
        assert_eq!(condition.reason.as_deref(), Some(reason), "{condition:?}");
        let message = condition.message.unwrap_or_default();
        assert!(
            message.contains(says),
            "CSR {name}: {message:?} should say {says:?}"
        );
        tokio::time::sleep(Duration::from_secs(2)).await;
        let csr = self.csrs().get(name).await.unwrap();
        let status = csr.status.unwrap_or_default();
        assert!(
            status.certificate.is_none(),
            "a denied CSR got a certificate"
        );
        assert!(
            !status
                .conditions
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Approved"),
            "a denied CSR was approved too"
        );
        message
    }

    async fn finish(self) {
        let api = self.csrs();
        let created: Vec<String> = std::mem::take(&mut *self.created.lock().unwrap());
        for name in created {
            let _ = api.delete(&name, &DeleteParams::default()).await;
        }
        drop(self.operator);
        self.c.cleanup().await;
    }
}

/// A PKCS#10 request as the agent makes one: an ECDSA P-256 key, subject `cn`, `sans`.
fn request(cn: &str, sans: Vec<SanType>) -> (KeyPair, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.subject_alt_names = sans;
    let pem = params.serialize_request(&key).unwrap().pem().unwrap();
    (key, pem)
}

fn dns(name: &str) -> SanType {
    SanType::DnsName(name.to_owned().try_into().unwrap())
}

/// The agent's own request for `node`.
fn agent_request(node: &str) -> (KeyPair, String) {
    request(&common_name(node), vec![dns(node)])
}

#[tokio::test]
async fn an_agents_csr_for_its_own_node_is_approved_and_signed() {
    let _lock = cluster::exclusive().await;
    let s = Signing::start("agent-certs-ok").await;
    let node = s.c.node("a", &[]).await;
    let agent = s.agent_client(&node).await;
    let (key, pem) = agent_request(&node);
    let name = s.create(&agent, "agent-serving", &pem).await;

    let (_, condition) = s.decided(&name).await;
    assert_eq!(condition.type_, "Approved", "{condition:?}");
    assert_eq!(condition.reason.as_deref(), Some("ClawSecretsAgentNode"));
    // The agent reads its certificate back with its own rights (deploy/rbac/agent.yaml).
    let mine: Api<CertificateSigningRequest> = Api::all(agent.clone());
    let certificate = eventually(&format!("CSR {name} to be signed"), || async {
        let csr = mine.get(&name).await.map_err(|e| e.to_string())?;
        csr.status
            .and_then(|s| s.certificate)
            .map(|c| c.0)
            .ok_or_else(|| "no certificate yet".to_owned())
    })
    .await;
    // ... and the CA bundle, which its Role lets it read.
    let bundle = Api::<ConfigMap>::namespaced(agent.clone(), &s.ns)
        .get(CA_BUNDLE_CONFIGMAP)
        .await
        .expect("the agent reads the CA bundle ConfigMap")
        .data
        .and_then(|mut d| d.remove(CA_BUNDLE_KEY))
        .expect("the bundle's ca.crt");

    let (_, leaf_pem) = x509_parser::pem::parse_x509_pem(&certificate).expect("a PEM certificate");
    let leaf = leaf_pem.parse_x509().expect("an X.509 certificate");
    let (_, ca_pem) = x509_parser::pem::parse_x509_pem(bundle.as_bytes()).expect("a PEM CA");
    let ca = ca_pem.parse_x509().expect("the CA certificate");
    // It chains to the published CA, and certifies the agent's own key.
    assert!(ca.is_ca());
    assert_eq!(leaf.issuer(), ca.subject());
    leaf.verify_signature(Some(ca.public_key()))
        .expect("the certificate is signed by the CA in the published bundle");
    assert_eq!(
        leaf.public_key().raw,
        key.subject_public_key_info().as_slice()
    );
    // It names the node, and nothing else; a serving certificate, not a CA.
    let cn: Vec<&str> = leaf
        .subject()
        .iter_common_name()
        .map(|c| c.as_str().unwrap())
        .collect();
    assert_eq!(cn, [common_name(&node)]);
    let san = leaf.subject_alternative_name().unwrap().expect("a SAN");
    assert_eq!(
        san.value.general_names,
        vec![x509_parser::extensions::GeneralName::DNSName(&node)]
    );
    let eku = leaf.extended_key_usage().unwrap().expect("an EKU");
    assert!(eku.value.server_auth && !eku.value.client_auth);
    assert!(!leaf.is_ca());
    // The lifetime asked (--agent-certificate-lifetime), from a minute before it was signed.
    let validity = leaf.validity();
    assert_eq!(
        validity.not_after.timestamp() - validity.not_before.timestamp(),
        LIFETIME_SECONDS + 60
    );
    let now = jiff::Timestamp::now().as_second();
    assert!(
        (validity.not_before.timestamp() - (now - 60)).abs() < 120,
        "notBefore is about a minute before signing"
    );
    s.finish().await;
}

#[tokio::test]
async fn a_csr_from_one_nodes_agent_for_another_node_is_denied() {
    let _lock = cluster::exclusive().await;
    let s = Signing::start("agent-certs-node").await;
    let (node_a, node_b) = (s.c.node("a", &[]).await, s.c.node("b", &[]).await);
    let agent_a = s.agent_client(&node_a).await;

    // Node a's agent asks for node b's certificate, subject and name.
    let (_, pem) = agent_request(&node_b);
    let name = s.create(&agent_a, "other-node", &pem).await;
    let message = s
        .assert_denied(&name, "WrongNode", &format!("names node {node_b}"))
        .await;
    assert!(
        message.contains(&format!("the requester's token is bound to node {node_a}")),
        "{message}"
    );

    // Its own subject, but node b's DNS name.
    let (_, pem) = request(&common_name(&node_a), vec![dns(&node_b)]);
    let name = s.create(&agent_a, "other-name", &pem).await;
    s.assert_denied(
        &name,
        "WrongNode",
        &format!(
            "the request names node {node_b} but the requester's token is bound to node {node_a}"
        ),
    )
    .await;
    s.finish().await;
}

#[tokio::test]
async fn csrs_from_other_users_or_with_other_names_are_denied() {
    let _lock = cluster::exclusive().await;
    let s = Signing::start("agent-certs-rules").await;
    let node = s.c.node("a", &[]).await;

    // A valid-looking request for the node, made by someone other than the agents'
    // ServiceAccount (the test's administrator).
    let (_, pem) = agent_request(&node);
    let name = s.create(&s.c.client(), "not-agent", &pem).await;
    let requester = s
        .csrs()
        .get(&name)
        .await
        .unwrap()
        .spec
        .username
        .expect("the API server records the requester");
    s.assert_denied(
        &name,
        "NotAgentServiceAccount",
        &format!("the request was made by {requester}, not by the agents' ServiceAccount"),
    )
    .await;

    // The agent's own node, plus an IP address.
    let agent = s.agent_client(&node).await;
    let (_, pem) = request(
        &common_name(&node),
        vec![dns(&node), SanType::IpAddress("10.0.0.1".parse().unwrap())],
    );
    let name = s.create(&agent, "with-ip", &pem).await;
    s.assert_denied(&name, "SubjectAltNames", "not DNS names")
        .await;

    // The same request without the IP address is approved: the denials above were for what
    // they say.
    let (_, pem) = agent_request(&node);
    let name = s.create(&agent, "control", &pem).await;
    let (_, condition) = s.decided(&name).await;
    assert_eq!(condition.type_, "Approved", "{condition:?}");
    s.finish().await;
}

/// The whole path, as the chart runs it: the agent, with its node-bound token and no
/// certificate of its own, asks the operator through a CSR and answers over HTTPS only. A
/// client with the published CA bundle connects, checking the node's name; one without it,
/// or expecting another node, fails verification; plain HTTP gets nothing. With a 30 s
/// lifetime the agent renews at 20 s: a reader loop across two renewals sees no failed
/// request, and new connections are shown the new certificate.
#[tokio::test]
async fn an_agent_answers_over_tls_with_its_issued_certificate_and_renews_it() {
    let _lock = cluster::exclusive().await;
    let s = Signing::start_with_lifetime("agent-certs-serve", 30).await;
    let ca = s.bundle().await;
    let node = s.c.node("a", &[]).await;
    let (_, kubeconfig) = agent_identity::node_client(&s.c, &node, s.scratch.path()).await;
    // Deliveries (as the chart runs it): the shipped RBAC gives the agent no master keyring.
    let args = agent_identity::delivery_args(&s.c, &node, s.scratch.path()).await;
    let dir = tempfile::Builder::new()
        .prefix("claw-agent-certs-")
        .tempdir()
        .unwrap();
    let agent = cluster::Agent::start_trusting(
        &kubeconfig,
        &node,
        dir,
        &s.c.master_key,
        std::net::Ipv4Addr::LOCALHOST.into(),
        args,
        Some(ca.clone()),
    )
    .await;
    // Its certificate came through a CSR the operator approved for its node, and is kept.
    let issued = agent.data_dir().join("tls/agent.crt");
    assert!(
        issued.exists(),
        "no kept certificate at {}",
        issued.display()
    );
    let csrs: Vec<_> = s
        .csrs()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|c| c.spec.signer_name == SIGNER_NAME)
        .collect();
    assert!(
        csrs.iter().any(|c| c
            .spec
            .extra
            .as_ref()
            .and_then(|e| e.get(claw_secrets::k8s::delivery::NODE_NAME_EXTRA))
            .is_some_and(|n| n == &vec![node.clone()])),
        "no CSR from the agent's node-bound token"
    );

    let port = agent.port;
    let presented = || async {
        let tls = claw_secrets::tls::client_config(ca.as_bytes(), "bundle").unwrap();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let stream = tokio_rustls::TlsConnector::from(tls)
            .connect(claw_secrets::tls::server_name(&node).unwrap(), tcp)
            .await
            .map_err(|e| e.to_string())?;
        let der = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
        Ok::<_, String>(der)
    };
    let first = presented()
        .await
        .expect("a verified handshake with the bundle");

    // Clients: the CLI with the bundle reaches it (an answer from the agent: the token is
    // refused, which is an answer); without it, or for another node's name, it refuses.
    let bundle_file = s.scratch.path().join("agent-ca.crt");
    std::fs::write(&bundle_file, &ca).unwrap();
    let cli = |extra: &[&str]| {
        let out = std::process::Command::new(cluster::BIN)
            .args([
                "invoke",
                &node,
                "secret.get",
                r#"{"name":"x","namespace":"default"}"#,
                "--addr",
                &agent.addr(),
                "--token",
                "not-a-token",
            ])
            .args(extra)
            .env_remove("CLAW_SECRETS_CA_FILE")
            .env_remove("KUBECONFIG")
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let with_bundle = cli(&["--ca-file", bundle_file.to_str().unwrap()]);
    assert!(with_bundle.starts_with("UNAUTHENTICATED"), "{with_bundle}");
    let without = cli(&[]);
    assert!(without.contains("could not verify"), "{without}");
    let other_node = cli(&[
        "--ca-file",
        bundle_file.to_str().unwrap(),
        "--tls-server-name",
        "another-node",
    ]);
    assert!(other_node.contains("could not verify"), "{other_node}");
    // Plain HTTP: no answer.
    let plain = process::http_get(port, "/healthz");
    assert!(plain.is_none(), "plain HTTP was answered: {plain:?}");

    // Renewal: a reader over one kept connection pool and fresh connections, across two
    // renewals (at 20 s and 40 s of 30 s lifetimes).
    let started = std::time::Instant::now();
    let (mut answered, mut failed) = (0u32, Vec::new());
    let mut seen = vec![first.clone()];
    while started.elapsed() < Duration::from_secs(50) {
        match agent.get("/healthz").await {
            Ok((200, _)) => answered += 1,
            other => failed.push(format!("{other:?}")),
        }
        if let Ok(der) = presented().await
            && !seen.contains(&der)
        {
            seen.push(der);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(
        seen.len() >= 2,
        "the certificate was not renewed within 50 s of a 30 s lifetime; agent log:\n{}",
        agent.log_tail(30)
    );
    eprintln!(
        "{answered} requests across {} certificates, none failed",
        seen.len()
    );
    drop(agent);
    s.finish().await;
}
