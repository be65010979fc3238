//! Fixtures for cluster tests of the agent and operator: CRDs, the master key, Nodes,
//! ServiceAccount tokens, RBAC grants, and `claw-secrets agent` / `claw-secrets operator`
//! child processes that are killed when dropped (a failing test leaves nothing running).
//!
//! Include after the control plane:
//!
//! ```ignore
//! #[path = "support/control_plane.rs"]
//! mod control_plane;
//! #[path = "support/process.rs"]
//! mod process;
//! #[path = "support/relay.rs"]
//! mod relay;
//! #[path = "support/cluster.rs"]
//! mod cluster;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Namespace, Node, Secret, ServiceAccount};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::Client;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use claw_secrets::k8s::crd::{ClawConfig, ClawNode, ClawSecret};

use crate::control_plane::{self, ControlPlane, TestEnv};
use crate::process::free_port;
use crate::protocol::http_status_of;
use crate::relay::BlackHole;
use crate::wait::{PATIENCE, eventually};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_claw-secrets");

/// The log filter of every agent and operator started here: in tests (and a bench's smoke
/// run), everything this crate can log (trace), so that the canary tests read all of it; in a
/// measuring bench run (`--bench`) info, since logging would be part of what it measures.
/// Decided at run time: Cargo builds benches with `cfg(test)` too, even without a harness, so
/// `cfg!(test)` cannot tell them apart (it had every cluster bench run logging at trace).
/// In a measuring run `BENCH_CHILD_LOG` overrides it (to look into a bench run, or to measure
/// what logging costs); tests always log everything, for the canaries.
fn log_filter() -> String {
    if std::env::args().any(|a| a == "--bench") {
        std::env::var("BENCH_CHILD_LOG").unwrap_or_else(|_| "info".to_owned())
    } else {
        "info,claw_secrets=trace".to_owned()
    }
}

/// A ClawSecret named `name` with plaintext `data` (what a user applies).
pub fn secret_with_data(name: &str, data: &[(&str, &str)]) -> ClawSecret {
    ClawSecret::new(
        name,
        claw_secrets::k8s::crd::ClawSecretSpec {
            name: None,
            data: Some(
                data.iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            encrypted_data: None,
            allowed_workloads: vec![],
            node_selector: None,
            sealed: None,
        },
    )
}

/// Name of the master key Secret every agent and operator of this test process uses.
pub const MASTER_KEY_NAME: &str = "claw-secrets-master-key";

// ---------------------------------------------------------------------------------------------
// Test isolation
// ---------------------------------------------------------------------------------------------

static CLUSTER_LOCK: RwLock<()> = RwLock::const_new(());

/// For tests that may share the control plane with other tests running at the same time.
pub async fn shared() -> RwLockReadGuard<'static, ()> {
    CLUSTER_LOCK.read().await
}

/// For tests that must have the control plane to themselves: they stop the API server, run an
/// operator (which reconciles every namespace), or measure latency.
pub async fn exclusive() -> RwLockWriteGuard<'static, ()> {
    CLUSTER_LOCK.write().await
}

// ---------------------------------------------------------------------------------------------
// Polling
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// Cluster objects
// ---------------------------------------------------------------------------------------------

/// A test's namespace plus what every agent test needs: CRDs installed, the master key Secret.
pub struct Cluster {
    pub env: TestEnv,
    /// `NAMESPACE/NAME` of the master key Secret (for `--master-key-secret`).
    pub master_key: String,
    /// Node objects this test created (cluster-scoped: not removed with the namespace).
    nodes: std::sync::Mutex<Vec<String>>,
}

impl Cluster {
    pub async fn new(hint: &str) -> Cluster {
        let env = control_plane::test_env(hint).await;
        install_crds(&env.client).await;
        let master_key = ensure_master_key(&env.client).await;
        Cluster {
            env,
            master_key,
            nodes: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Deletes the test's Nodes and namespace (optional on the local control plane, which
    /// disappears with the test process; on an external cluster the namespace of a test that
    /// panicked is deleted when its `TestEnv` drops, but its Nodes are left behind).
    pub async fn cleanup(self) {
        let nodes: Vec<String> = std::mem::take(&mut *self.nodes.lock().unwrap());
        let api = Api::<Node>::all(self.client());
        // Each agent's ClawNode is owned by its Node: in a cluster the garbage collector
        // deletes it with the Node; the test control plane has none, so this does (a leftover
        // ClawNode names the master keys a deleted store needed, and `keys prune` keeps them).
        let claw_nodes = Api::<ClawNode>::all(self.client());
        for node in nodes {
            let _ = api.delete(&node, &kube::api::DeleteParams::default()).await;
            let _ = claw_nodes
                .delete(&node, &kube::api::DeleteParams::default())
                .await;
        }
        self.env.cleanup().await;
    }

    pub fn cp(&self) -> &'static ControlPlane {
        control_plane::control_plane()
    }

    pub fn client(&self) -> Client {
        self.env.client.clone()
    }

    pub fn ns(&self) -> &str {
        &self.env.namespace
    }

    /// A short suffix unique to this test, for cluster-scoped names (Nodes).
    pub fn suffix(&self) -> String {
        let ns = self.ns();
        ns[ns.len().saturating_sub(8)..].to_owned()
    }

    pub fn secrets(&self) -> Api<ClawSecret> {
        self.env.api()
    }

    pub fn configs(&self) -> Api<ClawConfig> {
        self.env.api()
    }

    /// The token of the human test user `user` (see [`ControlPlane::user_token`]).
    pub fn user_token(&self, user: &str) -> String {
        self.cp().user_token(user).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Grants `alice` every verb the agent checks, on secrets and configs of this namespace,
    /// and returns her token.
    pub async fn alice(&self) -> String {
        grant(
            &self.client(),
            self.ns(),
            user_subject("alice"),
            "alice",
            &["reveal", "get", "list", "create", "update", "delete"],
            &["get", "list", "create", "update", "delete"],
        )
        .await;
        self.user_token("alice")
    }

    /// Starts an agent for a new Node named `node-<letter>-<suffix>` with `labels`.
    pub async fn agent(&self, letter: &str, labels: &[(&str, &str)]) -> Agent {
        self.agent_on(letter, labels, Ipv4Addr::LOCALHOST.into())
            .await
    }

    /// Like [`Cluster::agent`], listening on `ip` (the API server's pod proxy refuses loopback).
    pub async fn agent_on(&self, letter: &str, labels: &[(&str, &str)], ip: IpAddr) -> Agent {
        self.agent_with(letter, labels, ip, &self.env.kubeconfig.clone())
            .await
    }

    /// Like [`Cluster::agent`], reaching the API server through `hole` (a relay the test can
    /// black-hole).
    pub async fn agent_behind(&self, letter: &str, hole: &BlackHole) -> Agent {
        let kubeconfig = hole.kubeconfig(&self.env.kubeconfig);
        self.agent_with(letter, &[], Ipv4Addr::LOCALHOST.into(), &kubeconfig)
            .await
    }

    async fn agent_with(
        &self,
        letter: &str,
        labels: &[(&str, &str)],
        ip: IpAddr,
        kubeconfig: &Path,
    ) -> Agent {
        let node = self.node(letter, labels).await;
        self.start_agent(&node, kubeconfig, ip).await
    }

    /// Creates Node `node-<letter>-<suffix>` with `labels` (deleted by [`Cluster::cleanup`]).
    pub async fn node(&self, letter: &str, labels: &[(&str, &str)]) -> String {
        let node = format!("node-{letter}-{}", self.suffix());
        create_node(&self.client(), &node, labels).await;
        self.nodes.lock().unwrap().push(node.clone());
        node
    }

    /// Starts an agent for the existing Node `node`, with the credentials of `kubeconfig`.
    pub async fn start_agent(&self, node: &str, kubeconfig: &Path, ip: IpAddr) -> Agent {
        self.start_agent_with(node, kubeconfig, ip, Vec::new())
            .await
    }

    /// Like [`Cluster::start_agent`], with further arguments.
    pub async fn start_agent_with(
        &self,
        node: &str,
        kubeconfig: &Path,
        ip: IpAddr,
        args: Vec<String>,
    ) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix(&format!("claw-agent-{node}-"))
            .tempdir()
            .expect("temp dir");
        Agent::start_with_args(kubeconfig, node, dir, &self.master_key, ip, args).await
    }

    /// node-a (zone a, gpu), node-b (zone b, gpu), node-c (zone c, no gpu).
    pub async fn three_agents(&self) -> [Agent; 3] {
        let (a, b, c) = tokio::join!(
            self.agent("a", &[(ZONE, "a"), (GPU, "true")]),
            self.agent("b", &[(ZONE, "b"), (GPU, "true")]),
            self.agent("c", &[(ZONE, "c")]),
        );
        [a, b, c]
    }
}

pub const ZONE: &str = "claw-secrets.test/zone";

pub const GPU: &str = "claw-secrets.test/gpu";

/// Applies both CRDs (server-side apply; idempotent) and waits until they are served.
pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in claw_secrets::k8s::crd::crds() {
        let name = crd.metadata.name.clone().expect("CRD name");
        api.patch(
            &name,
            &PatchParams::apply("claw-secrets-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
        eventually(&format!("CRD {name} to be established"), || async {
            let crd = api.get(&name).await.map_err(|e| e.to_string())?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            established
                .then_some(())
                .ok_or_else(|| "not established".to_owned())
        })
        .await;
    }
    crds_served(client).await;
}

/// Waits until ClawSecrets and ClawConfigs can be listed (Established is reported a moment
/// before a resource is served everywhere).
pub async fn crds_served(client: &Client) {
    let secrets: Api<ClawSecret> = Api::all(client.clone());
    let configs: Api<ClawConfig> = Api::all(client.clone());
    eventually("the CRDs to be served", || async {
        secrets
            .list(&ListParams::default().limit(1))
            .await
            .map_err(|e| e.to_string())?;
        configs
            .list(&ListParams::default().limit(1))
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    })
    .await;
}

static MASTER_KEY_NAMESPACE: OnceLock<String> = OnceLock::new();

/// The namespace holding this process's master key Secret.
pub fn master_key_namespace() -> &'static str {
    MASTER_KEY_NAMESPACE.get_or_init(|| control_plane::unique_namespace("keys"))
}

/// Creates (once per process) the master key Secret all agents and operators of this test
/// process share, as the operator would; returns `NAMESPACE/NAME`.
pub async fn ensure_master_key(client: &Client) -> String {
    let ns = master_key_namespace();
    let namespace = Namespace {
        metadata: ObjectMeta {
            name: Some(ns.to_owned()),
            labels: Some(
                [(
                    control_plane::TEST_NAMESPACE_LABEL.to_owned(),
                    "true".to_owned(),
                )]
                .into(),
            ),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    ignore_exists(
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &namespace)
            .await,
        "master key namespace",
    );
    let ring = claw_secrets::crypto::Keyring::generate().expect("keyring");
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(MASTER_KEY_NAME.to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            claw_secrets::k8s::keyring::KEYRING_KEY.to_owned(),
            ByteString(ring.to_json().to_vec()),
        )])),
        ..Secret::default()
    };
    ignore_exists(
        Api::<Secret>::namespaced(client.clone(), ns)
            .create(&PostParams::default(), &secret)
            .await,
        "master key Secret",
    );
    format!("{ns}/{MASTER_KEY_NAME}")
}

#[track_caller]
fn ignore_exists<T>(r: Result<T, kube::Error>, what: &str) {
    match r {
        Ok(_) => {}
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(e) => panic!("creating {what}: {e}"),
    }
}

/// How many of the ClawSecrets `api` lists have their current version sealed under the master
/// key `key_id`.
pub async fn sealed_under(api: &Api<ClawSecret>, key_id: &str) -> usize {
    api.list(&ListParams::default())
        .await
        .expect("listing ClawSecrets")
        .items
        .iter()
        .filter(|s| s.spec.sealed.as_ref().is_some_and(|x| x.key_id == key_id))
        .count()
}

/// Creates a Node object (nothing runs it: there is no kubelet) with `labels`.
pub async fn create_node(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let node = Node {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        ..Node::default()
    };
    Api::<Node>::all(client.clone())
        .create(&PostParams::default(), &node)
        .await
        .unwrap_or_else(|e| panic!("creating Node {name}: {e}"));
}

/// Sets (merges) labels on a Node.
pub async fn label_node(client: &Client, name: &str, labels: &[(&str, &str)]) {
    let labels: serde_json::Map<String, Value> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned())))
        .collect();
    Api::<Node>::all(client.clone())
        .patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": labels } })),
        )
        .await
        .unwrap_or_else(|e| panic!("labelling Node {name}: {e}"));
}

/// Creates ServiceAccount `sa` in `ns` (if needed) and mints a one-hour token for it with the
/// TokenRequest API (default audience: the API server's, which TokenReview checks).
pub async fn service_account_token(client: &Client, ns: &str, sa: &str) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let account = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(sa.to_owned()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    ignore_exists(
        api.create(&PostParams::default(), &account).await,
        "ServiceAccount",
    );
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![],
            expiration_seconds: Some(3600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let minted = api
        .create_token_request(sa, &PostParams::default(), &request)
        .await
        .unwrap_or_else(|e| panic!("TokenRequest for {ns}/{sa}: {e}"));
    minted.status.expect("TokenRequest status").token
}

pub fn user_subject(name: &str) -> Subject {
    Subject {
        kind: "User".to_owned(),
        api_group: Some("rbac.authorization.k8s.io".to_owned()),
        name: name.to_owned(),
        namespace: None,
    }
}

pub fn service_account_subject(ns: &str, name: &str) -> Subject {
    Subject {
        kind: "ServiceAccount".to_owned(),
        api_group: None,
        name: name.to_owned(),
        namespace: Some(ns.to_owned()),
    }
}

/// A Role in `ns` granting `secret_verbs` on clawsecrets and `config_verbs` on clawconfigs
/// (group clawbernetes.io), bound to `subject`.
pub async fn grant(
    client: &Client,
    ns: &str,
    subject: Subject,
    role: &str,
    secret_verbs: &[&str],
    config_verbs: &[&str],
) {
    let rule = |resource: &str, verbs: &[&str]| PolicyRule {
        api_groups: Some(vec!["clawbernetes.io".to_owned()]),
        resources: Some(vec![resource.to_owned()]),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    };
    let mut rules = Vec::new();
    if !secret_verbs.is_empty() {
        rules.push(rule("clawsecrets", secret_verbs));
    }
    if !config_verbs.is_empty() {
        rules.push(rule("clawconfigs", config_verbs));
    }
    grant_rules(client, ns, subject, &format!("claw-test-{role}"), rules).await;
}

/// A Role `name` in `ns` with `rules`, bound to `subject` (both kept if they exist).
pub async fn grant_rules(
    client: &Client,
    ns: &str,
    subject: Subject,
    name: &str,
    rules: Vec<PolicyRule>,
) {
    let name = name.to_owned();
    let meta = ObjectMeta {
        name: Some(name.clone()),
        ..ObjectMeta::default()
    };
    ignore_exists(
        Api::<Role>::namespaced(client.clone(), ns)
            .create(
                &PostParams::default(),
                &Role {
                    metadata: meta.clone(),
                    rules: Some(rules),
                },
            )
            .await,
        "Role",
    );
    ignore_exists(
        Api::<RoleBinding>::namespaced(client.clone(), ns)
            .create(
                &PostParams::default(),
                &RoleBinding {
                    metadata: meta,
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".to_owned(),
                        kind: "Role".to_owned(),
                        name,
                    },
                    subjects: Some(vec![subject]),
                },
            )
            .await,
        "RoleBinding",
    );
}

/// A RoleBinding `name` in `ns` of the ClusterRole `role` to `subject`.
pub async fn bind_cluster_role(
    client: &Client,
    ns: &str,
    name: &str,
    role: &str,
    subject: Subject,
) {
    Api::<RoleBinding>::namespaced(client.clone(), ns)
        .create(
            &PostParams::default(),
            &RoleBinding {
                metadata: ObjectMeta {
                    name: Some(name.to_owned()),
                    ..ObjectMeta::default()
                },
                role_ref: RoleRef {
                    api_group: "rbac.authorization.k8s.io".to_owned(),
                    kind: "ClusterRole".to_owned(),
                    name: role.to_owned(),
                },
                subjects: Some(vec![subject]),
            },
        )
        .await
        .unwrap_or_else(|e| panic!("RoleBinding {ns}/{name} of ClusterRole {role}: {e}"));
}

/// The Events about the object `object` in `ns`, oldest first.
pub async fn events_on(client: &Client, ns: &str, object: &str) -> Vec<Event> {
    let mut events: Vec<Event> = Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("listing Events")
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
        .collect();
    events.sort_by_key(|e| e.event_time.as_ref().map(|t| t.0));
    events
}

/// The `AccessDenied` Events recorded on the object `object` in `ns`.
pub async fn access_denied_events(client: &Client, ns: &str, object: &str) -> Vec<Event> {
    let mut events = events_on(client, ns, object).await;
    events.retain(|e| e.reason.as_deref() == Some("AccessDenied"));
    events
}

/// The Events node agents recorded (reporting controller `claw-secrets-agent`) on the object
/// `object` in `ns`, oldest first.
pub async fn agent_events(client: &Client, ns: &str, object: &str) -> Vec<Event> {
    let mut events = events_on(client, ns, object).await;
    events.retain(|e| {
        e.reporting_controller.as_deref() == Some("clawbernetes.io/claw-secrets-agent")
    });
    events
}

// ---------------------------------------------------------------------------------------------
// node.invoke over HTTP
// ---------------------------------------------------------------------------------------------

/// One answer of `POST /v1/invoke`.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn is_ok(&self) -> bool {
        self.status == 200 && self.body["ok"] == json!(true)
    }

    /// The error code, or `None` on success.
    pub fn code(&self) -> Option<&str> {
        (!self.is_ok()).then(|| self.body["error"]["code"].as_str().unwrap_or("?"))
    }

    /// The payload; fails the test (with `what` and the answer) otherwise.
    #[track_caller]
    pub fn payload(&self, what: &str) -> Value {
        assert!(
            self.is_ok(),
            "{what}: expected success, got HTTP {}: {}",
            self.status,
            self.body
        );
        self.body["payload"].clone()
    }

    /// Asserts a failure with `code` and the HTTP status paired with it; returns the message.
    #[track_caller]
    pub fn expect_error(&self, code: &str, what: &str) -> String {
        assert_eq!(
            self.code(),
            Some(code),
            "{what}: expected {code}, got HTTP {}: {}",
            self.status,
            self.body
        );
        assert_eq!(
            self.status,
            http_status_of(code),
            "{what}: HTTP status does not match {code}: {}",
            self.body
        );
        let message = self.body["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(!message.is_empty(), "{what}: empty error message");
        message
    }

    /// `Ok(payload)` or `Err("CODE: message")`, for polling.
    pub fn result(&self) -> Result<Value, String> {
        if self.is_ok() {
            Ok(self.body["payload"].clone())
        } else {
            Err(format!(
                "HTTP {} {}: {}",
                self.status,
                self.body["error"]["code"].as_str().unwrap_or("?"),
                self.body["error"]["message"].as_str().unwrap_or_default()
            ))
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The agents' certificates
// ---------------------------------------------------------------------------------------------

/// The CA this test process signs its agent processes' serving certificates with (agents
/// answer over HTTPS only; their certificates from the operator are tested on their own), and
/// the file clients are given to verify them with (`--ca-file`).
pub struct TestCa {
    pub pem: String,
    pub file: PathBuf,
    issuer: rcgen::Issuer<'static, rcgen::KeyPair>,
    _dir: tempfile::TempDir,
}

impl TestCa {
    /// A serving certificate for `node` at `ip` (both named, so a client checks either),
    /// written to `dir/tls.crt` and `dir/tls.key`; their paths.
    pub fn issue(&self, node: &str, ip: IpAddr, dir: &Path) -> (PathBuf, PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.subject_alt_names = vec![
            rcgen::SanType::DnsName(node.try_into().expect("a node name is a DNS name")),
            rcgen::SanType::IpAddress(ip),
        ];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).expect("certificate");
        let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
        std::fs::write(&key_path, key.serialize_pem()).expect("write tls.key");
        std::fs::write(&cert_path, cert.pem()).expect("write tls.crt");
        (cert_path, key_path)
    }

    /// A TLS client configuration that trusts only this CA.
    pub fn client_config(&self) -> std::sync::Arc<tokio_rustls::rustls::ClientConfig> {
        claw_secrets::tls::client_config(self.pem.as_bytes(), "the test CA").expect("test CA")
    }
}

pub fn test_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let key = rcgen::KeyPair::generate().expect("key");
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "claw-secrets test agents' CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let pem = params.self_signed(&key).expect("CA certificate").pem();
        let dir = tempfile::Builder::new()
            .prefix("claw-test-ca-")
            .tempdir()
            .expect("temp dir");
        let file = dir.path().join("ca.crt");
        std::fs::write(&file, &pem).expect("write ca.crt");
        TestCa {
            pem,
            file,
            issuer: rcgen::Issuer::new(params, key),
            _dir: dir,
        }
    })
}

type Https = HttpClient<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// No pooled connections: agents are stopped and restarted on the same port. https:// is
/// verified against `tls` (default: the test CA, the agents'), for `server_name` (default:
/// the URL's host); http:// (the operator's metrics) is plain.
fn http_client(
    tls: Option<&tokio_rustls::rustls::ClientConfig>,
    server_name: Option<&str>,
) -> Https {
    let config = tls
        .cloned()
        .unwrap_or_else(|| (*test_ca().client_config()).clone());
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_or_http();
    let builder = match server_name {
        Some(name) => {
            builder.with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                claw_secrets::tls::server_name(name).expect("a server name"),
            ))
        }
        None => builder,
    };
    HttpClient::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build(builder.enable_http1().build())
}

/// `POST ADDR/v1/invoke` to an agent whose certificate the operator issued: verified against
/// `ca_pem` (the published CA bundle) as node `node` (what the certificate names).
pub async fn post_invoke_verified(
    addr: &str,
    ca_pem: &str,
    node: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<Reply, String> {
    let tls = claw_secrets::tls::client_config(ca_pem.as_bytes(), "the agents' CA bundle")
        .map_err(|e| e.to_string())?;
    let client = http_client(Some(&tls), Some(node));
    let (status, bytes) =
        http_with(&client, "POST", &format!("{addr}/v1/invoke"), token, body).await?;
    reply(status, &bytes)
}

fn reply(status: u16, bytes: &[u8]) -> Result<Reply, String> {
    let body = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "HTTP {status} with a non-JSON body ({e}): {:?}",
            String::from_utf8_lossy(bytes)
        )
    })?;
    Ok(Reply { status, body })
}

/// `POST ADDR/v1/invoke` with a raw body (ADDR: `https://HOST:PORT` for an agent, verified
/// against [`test_ca`]): the answer, or why there was none.
pub async fn post_invoke(addr: &str, token: Option<&str>, body: Vec<u8>) -> Result<Reply, String> {
    let (status, bytes) = http("POST", &format!("{addr}/v1/invoke"), token, body).await?;
    reply(status, &bytes)
}

/// `GET URL` (an agent's https://, verified against [`test_ca`]): the status and the body as
/// text.
pub async fn get(url: &str) -> Result<(u16, String), String> {
    let (status, bytes) = http("GET", url, None, Vec::new()).await?;
    Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
}

async fn http(
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, Bytes), String> {
    http_with(&http_client(None, None), method, url, token, body).await
}

async fn http_with(
    client: &Https,
    method: &str,
    url: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<(u16, Bytes), String> {
    let mut req = hyper::Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(Bytes::from(body))).expect("request");
    let resp = tokio::time::timeout(PATIENCE, client.request(req))
        .await
        .map_err(|_| format!("{method} {url}: no answer in {PATIENCE:?}"))?
        .map_err(|e| format!("{method} {url}: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("{method} {url}: reading the body: {e}"))?
        .to_bytes();
    Ok((status, bytes))
}

// ---------------------------------------------------------------------------------------------
// The agent process
// ---------------------------------------------------------------------------------------------

/// An [`Agent::start_with_args`] argument of the harness's own, not passed on: the agent gets
/// no `--tls-cert` from the test CA and asks the operator for its certificate (a CSR).
pub const TLS_FROM_OPERATOR: &str = "<tls from the operator>";

/// A `claw-secrets agent` child process; killed when dropped. Its data dir (a temp dir) outlives
/// restarts and is removed with the `Agent`.
pub struct Agent {
    pub node: String,
    /// The address it listens on (loopback unless started with [`Agent::start_on`]).
    pub ip: IpAddr,
    pub port: u16,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
    master_key: String,
    /// Further arguments of every spawn.
    args: Vec<String>,
    /// With [`TLS_FROM_OPERATOR`]: the CA bundle its certificate chains to (the operator's),
    /// which clients check it against, for its node's name.
    trust: Option<String>,
    child: Option<Child>,
    /// When the current process was spawned.
    pub spawned_at: Instant,
}

impl Agent {
    /// Spawns the agent and waits until it answers `GET /readyz` (keyring loaded).
    pub async fn start(
        kubeconfig: &Path,
        node: &str,
        dir: tempfile::TempDir,
        master_key: &str,
    ) -> Agent {
        Agent::start_on(
            kubeconfig,
            node,
            dir,
            master_key,
            Ipv4Addr::LOCALHOST.into(),
        )
        .await
    }

    /// Like [`Agent::start`], listening on `ip`.
    pub async fn start_on(
        kubeconfig: &Path,
        node: &str,
        dir: tempfile::TempDir,
        master_key: &str,
        ip: IpAddr,
    ) -> Agent {
        Agent::start_with_args(kubeconfig, node, dir, master_key, ip, Vec::new()).await
    }

    /// Like [`Agent::start_on`], with further arguments (kept for restarts).
    pub async fn start_with_args(
        kubeconfig: &Path,
        node: &str,
        dir: tempfile::TempDir,
        master_key: &str,
        ip: IpAddr,
        args: Vec<String>,
    ) -> Agent {
        Agent::start_trusting(kubeconfig, node, dir, master_key, ip, args, None).await
    }

    /// Like [`Agent::start_with_args`]; with `trust`, the agent asks the operator for its
    /// certificate ([`TLS_FROM_OPERATOR`]) and is verified against `trust` (a CA bundle), for
    /// its node's name, as every client of an agent does.
    pub async fn start_trusting(
        kubeconfig: &Path,
        node: &str,
        dir: tempfile::TempDir,
        master_key: &str,
        ip: IpAddr,
        mut args: Vec<String>,
        trust: Option<String>,
    ) -> Agent {
        if trust.is_some() {
            args.push(TLS_FROM_OPERATOR.to_owned());
        }
        let mut agent = Agent {
            node: node.to_owned(),
            ip,
            port: free_port(),
            dir,
            kubeconfig: kubeconfig.to_owned(),
            master_key: master_key.to_owned(),
            args,
            trust,
            child: None,
            spawned_at: Instant::now(),
        };
        agent.spawn();
        agent.wait_ready().await;
        agent
    }

    /// The process id of the running agent process, if there is one.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The data dir (`--data-dir`): store, cached keyring, audit log.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.log")
    }

    /// `https://IP:PORT`: agents answer over HTTPS only, with a certificate from [`test_ca`]
    /// naming both their node and their IP.
    pub fn addr(&self) -> String {
        format!("https://{}", SocketAddr::new(self.ip, self.port))
    }

    /// `--tls-cert`/`--tls-key` from [`test_ca`], made on first use; none when the test
    /// passes its own (or none at all: `--tls-from-operator` asks the operator through a CSR).
    fn tls_args(&self) -> Vec<String> {
        if self
            .args
            .iter()
            .any(|a| a == "--tls-cert" || a == TLS_FROM_OPERATOR)
        {
            return Vec::new();
        }
        let (cert, key) = (
            self.dir.path().join("tls.crt"),
            self.dir.path().join("tls.key"),
        );
        if !cert.exists() {
            test_ca().issue(&self.node, self.ip, self.dir.path());
        }
        vec![
            "--tls-cert".to_owned(),
            cert.display().to_string(),
            "--tls-key".to_owned(),
            key.display().to_string(),
        ]
    }

    /// Spawns the process (same node, port and data dir as before).
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent {} is running", self.node);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("agent log");
        let child = Command::new(BIN)
            .arg("agent")
            .arg("--node-name")
            .arg(&self.node)
            .arg("--data-dir")
            .arg(self.data_dir())
            .arg("--listen")
            .arg(SocketAddr::new(self.ip, self.port).to_string())
            .arg("--master-key-secret")
            .arg(&self.master_key)
            .args(self.tls_args())
            .args(self.args.iter().filter(|a| *a != TLS_FROM_OPERATOR))
            .env("KUBECONFIG", &self.kubeconfig)
            .env("CLAW_SECRETS_LOG", log_filter())
            .env_remove("RUST_LOG")
            .env_remove("NODE_NAME")
            .env_remove("CLAW_SECRETS_DATA_DIR")
            .env_remove("CLAW_SECRETS_DELIVERY_TOKEN_FILE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {BIN} agent: {e}"));
        self.spawned_at = Instant::now();
        self.child = Some(child);
    }

    /// Waits until `GET /readyz` answers 200: the agent serves and has its keyring, so a
    /// secret command sent next is not turned away as UNAVAILABLE. Fails the test if the
    /// process exits first.
    pub async fn wait_ready(&mut self) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok((200, _)) = self.get("/readyz").await {
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!(
                    "agent {} exited ({status}) before serving; log:\n{}",
                    self.node,
                    self.log_tail(40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent {} not serving after {PATIENCE:?}; log:\n{}",
                self.node,
                self.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::kill(child);
        }
    }

    /// SIGTERM (what a pod gets), and wait for the process to exit (SIGKILL after 30 s).
    pub fn terminate(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::terminate(child);
        }
    }

    /// Spawns the process again and waits until it serves.
    pub async fn restart(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// `GET PATH` (`/metrics`, `/readyz`): the status and the body as text.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let url = format!("{}{path}", self.addr());
        let (status, bytes) = http_with(&self.client(), "GET", &url, None, Vec::new()).await?;
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    }

    /// A client that verifies this agent: against the test CA, or against what it was told to
    /// trust, for its node's name.
    fn client(&self) -> Https {
        match &self.trust {
            None => http_client(None, None),
            Some(ca) => {
                let tls = claw_secrets::tls::client_config(ca.as_bytes(), "the agents' CA bundle")
                    .expect("a CA bundle");
                http_client(Some(&tls), Some(&self.node))
            }
        }
    }

    /// `POST /v1/invoke` with `nodeId` set to this agent's node.
    pub async fn invoke(&self, token: Option<&str>, command: &str, params: Value) -> Reply {
        let body = json!({
            "nodeId": self.node,
            "command": command,
            "params": params,
        });
        self.post(token, serde_json::to_vec(&body).expect("json"))
            .await
    }

    /// `POST /v1/invoke` with a raw body.
    pub async fn post(&self, token: Option<&str>, body: Vec<u8>) -> Reply {
        let url = format!("{}/v1/invoke", self.addr());
        http_with(&self.client(), "POST", &url, token, body)
            .await
            .and_then(|(status, bytes)| reply(status, &bytes))
            .unwrap_or_else(|e| panic!("agent {}: {e}; log:\n{}", self.node, self.log_tail(20)))
    }

    /// `secret.get` of `ns/name`.
    pub async fn get_secret(&self, token: &str, ns: &str, name: &str) -> Reply {
        self.invoke(
            Some(token),
            "secret.get",
            json!({ "name": name, "namespace": ns }),
        )
        .await
    }

    /// The audit log's records, parsed.
    pub fn audit(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.data_dir().join("audit.log")).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).expect("an audit record is JSON"))
            .collect()
    }

    /// The store file holding secret `ns/name`, parsed, if there is one.
    pub fn stored_secret(&self, ns: &str, name: &str) -> Option<(PathBuf, Value)> {
        stored_entry(&self.data_dir().join("secrets"), ns, name)
    }

    /// The store file holding config `ns/name`, parsed, if there is one.
    pub fn stored_config(&self, ns: &str, name: &str) -> Option<(PathBuf, Value)> {
        stored_entry(&self.data_dir().join("configs"), ns, name)
    }

    /// How many secret files of namespace `ns` the store holds.
    pub fn stored_secret_count(&self, ns: &str) -> usize {
        entries(&self.data_dir().join("secrets"))
            .filter(|(_, v)| v["namespace"] == json!(ns))
            .count()
    }
}

fn entries(dir: &Path) -> impl Iterator<Item = (PathBuf, Value)> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .filter_map(|p| {
            let v = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
            Some((p, v))
        })
}

fn stored_entry(dir: &Path, ns: &str, name: &str) -> Option<(PathBuf, Value)> {
    entries(dir).find(|(_, v)| v["namespace"] == json!(ns) && v["name"] == json!(name))
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of agent {} ({}):\n{}",
                self.node,
                self.log_path().display(),
                self.log_tail(30)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The operator process
// ---------------------------------------------------------------------------------------------

/// Whether this build has `claw-secrets operator` (it is being written alongside these tests).
pub fn operator_available() -> Result<(), String> {
    let out = Command::new(BIN)
        .args(["operator", "--help"])
        .output()
        .map_err(|e| format!("running {BIN}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`claw-secrets operator --help` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// A `claw-secrets operator` child process; killed when dropped.
pub struct Operator {
    child: Option<Child>,
    log: PathBuf,
    pub metrics_port: u16,
    _dir: tempfile::TempDir,
}

impl Operator {
    /// Its `--data-dir` (when it serves a webhook): the audit log of the writes it carries.
    pub fn data_dir(&self) -> PathBuf {
        self._dir.path().join("data")
    }

    /// Starts an operator using the master key Secret `master_key` (`NAMESPACE/NAME`) and the
    /// Lease `lease`, reconciling only `watch_namespace` if given, and waits for `/readyz`.
    pub async fn start(
        kubeconfig: &Path,
        master_key: &str,
        lease: &str,
        watch_namespace: Option<&str>,
    ) -> Operator {
        Operator::start_with(kubeconfig, master_key, lease, watch_namespace, &[]).await
    }

    /// [`Operator::start`] with more arguments (the webhook's, say).
    pub async fn start_with(
        kubeconfig: &Path,
        master_key: &str,
        lease: &str,
        watch_namespace: Option<&str>,
        extra: &[String],
    ) -> Operator {
        let (ns, name) = master_key.split_once('/').expect("NAMESPACE/NAME");
        let dir = tempfile::Builder::new()
            .prefix("claw-operator-")
            .tempdir()
            .expect("temp dir");
        let log_path = dir.path().join("operator.log");
        let log = std::fs::File::create(&log_path).expect("operator log");
        let metrics_port = free_port();
        let mut command = Command::new(BIN);
        command
            .arg("operator")
            .arg("--namespace")
            .arg(ns)
            .arg("--master-key-secret")
            .arg(name)
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--lease-name")
            .arg(lease);
        if let Some(watch) = watch_namespace {
            command.arg("--watch-namespace").arg(watch);
        }
        command.args(extra);
        // With its webhook's HTTPS server, it also carries nodes' writes, as the chart runs it.
        if extra.iter().any(|a| a == "--webhook-addr") {
            command.arg("--data-dir").arg(dir.path().join("data"));
        }
        let child = command
            .env("KUBECONFIG", kubeconfig)
            .env("CLAW_SECRETS_LOG", log_filter())
            .env_remove("RUST_LOG")
            .env_remove("POD_NAMESPACE")
            .env_remove("POD_NAME")
            .env_remove("WATCH_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {BIN} operator: {e}"));
        let mut operator = Operator {
            child: Some(child),
            log: log_path,
            metrics_port,
            _dir: dir,
        };
        let url = format!("http://127.0.0.1:{metrics_port}/readyz");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok((200, _)) = http("GET", &url, None, Vec::new()).await {
                break;
            }
            operator.assert_running();
            assert!(
                Instant::now() < deadline,
                "the operator is not ready after {PATIENCE:?}; log:\n{}",
                operator.log_tail(40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        operator
    }

    /// The process id of the operator process, if it is running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the operator logged so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Stops the operator with SIGKILL (it may still be running as far as anyone else knows).
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::kill(child);
        }
    }

    /// Fails the test if the operator has exited.
    #[track_caller]
    pub fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!(
                "the operator exited ({status}); log:\n{}",
                self.log_tail(40)
            );
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::kill(child);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of the operator ({}):\n{}",
                self.log.display(),
                self.log_tail(30)
            );
        }
    }
}
