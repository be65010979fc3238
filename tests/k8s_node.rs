//! The chart and the image on a node that runs pods (hack/node.sh: kubelet, containerd, runc,
//! kube-proxy, controller-manager and scheduler next to the API server), installed the way a
//! user installs them: `helm install --wait` of charts/claw-secrets with the image
//! `hack/image.sh` built, imported into the node's containerd under the chart's default name.
//!
//! Needs root (the node's bridge, iptables, containerd) and `bash hack/node.sh install`; the
//! image tar is `target/images/claw-secrets.tar` (`bash hack/image.sh
//! target/images/claw-secrets.tar`, which `hack/test.sh` runs), or `CLAW_NODE_IMAGE`. Without
//! them the tests fail with the command to run, never skip. One node per test binary; its
//! watchdog removes it when this process ends, however it ends.
//!
//! The same checks run on a one-node cluster from elsewhere (`hack/kind-e2e.sh` on a machine
//! with Docker): `CLAW_NODE_KUBECONFIG` (its admin kubeconfig, the image already on the node
//! under the chart's default name) and `CLAW_NODE_EXEC` (the command that runs a command on
//! the node, e.g. `docker exec claw-secrets-e2e-control-plane`). Everything the test does on the
//! node goes through that command (`hack/node.sh exec` for a node of its own), everything else
//! through the API server, so both paths run the same code. Such a cluster must not have a
//! claw-secrets release; the test removes what it installed when it passes.

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

#[path = "support/tools.rs"]
mod tools;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::Instant;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};

use claw_secrets::k8s::crd::ClawSecret;
use cluster::{BIN, Reply};
use random::random_hex;
use tools::{helm, kubectl, must};
use wait::eventually;

const RELEASE: &str = "claw-secrets";
const NAMESPACE: &str = "claw-secrets";
const OPERATOR: &str = "deployment/claw-secrets-operator";
const AGENT: &str = "daemonset/claw-secrets-agent";
/// The namespace of the test's secrets (and the editor's ServiceAccount).
const APPS: &str = "node-apps";

// ---------------------------------------------------------------------------------------------
// The node
// ---------------------------------------------------------------------------------------------

/// The one node the chart runs on, and how the test reaches it.
struct Node {
    /// The cluster's admin kubeconfig.
    kubeconfig: PathBuf,
    /// The test's own files (manifests, kubeconfigs).
    scratch: PathBuf,
    /// The Node's name and InternalIP, as the cluster has them.
    name: String,
    ip: String,
    /// The address range of the node's pods (for cutting them off the API server).
    pod_cidr: String,
    /// Runs a command on the node (in its network namespace, seeing its files and processes).
    exec: Vec<String>,
    /// The agent's hostPath on the node.
    host_path: String,
    /// The kubelet's log, when the test started the node itself.
    kubelet_log: Option<PathBuf>,
    /// A cluster from elsewhere: the test cleans up after itself there.
    external: bool,
}

static NODE: OnceLock<Result<Node, String>> = OnceLock::new();

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The node of this test binary, started on first use with the image imported.
fn node() -> &'static Node {
    match NODE.get_or_init(start_node) {
        Ok(n) => n,
        Err(e) => panic!("{e}"),
    }
}

fn start_node() -> Result<Node, String> {
    match std::env::var_os("CLAW_NODE_KUBECONFIG") {
        Some(kubeconfig) => external_node(PathBuf::from(kubeconfig)),
        None => node_of_our_own(),
    }
}

/// A one-node cluster from elsewhere (`hack/kind-e2e.sh`).
fn external_node(kubeconfig: PathBuf) -> Result<Node, String> {
    let exec: Vec<String> = std::env::var("CLAW_NODE_EXEC")
        .map_err(|_| {
            "CLAW_NODE_KUBECONFIG is set but CLAW_NODE_EXEC is not: give the command that runs \
             a command on the node (e.g. `docker exec NODE_CONTAINER`)"
                .to_owned()
        })?
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    let existing = kubectl(
        &kubeconfig,
        &[
            "get",
            "namespace",
            NAMESPACE,
            APPS,
            "--ignore-not-found",
            "-o",
            "name",
        ],
    );
    if !existing.stdout.trim().is_empty() {
        return Err(format!(
            "the cluster of {} already has {}: run the node test on a cluster without a \
             claw-secrets release",
            kubeconfig.display(),
            existing.stdout.trim()
        ));
    }
    let scratch = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "k8s-node-{}-{}",
        std::process::id(),
        random_hex(4)
    ));
    std::fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
    described(Node {
        kubeconfig,
        scratch,
        name: String::new(),
        ip: String::new(),
        pod_cidr: std::env::var("CLAW_NODE_POD_CIDR").unwrap_or_default(),
        exec,
        host_path: format!("/var/lib/claw-secrets-node-test-{}", random_hex(4)),
        kubelet_log: None,
        external: true,
    })
}

/// The Node's name, address and pod range, from the cluster, which must have exactly one Ready
/// node (Node objects without a kubelet, as other cluster tests register, do not count).
fn described(mut node: Node) -> Result<Node, String> {
    let out = kubectl(&node.kubeconfig, &["get", "nodes", "-o", "json"]);
    if !out.ok {
        return Err(format!("kubectl get nodes: {}", out.stderr));
    }
    let list: Value = serde_json::from_str(&out.stdout).map_err(|e| e.to_string())?;
    let ready: Vec<Value> = list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| {
            n["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
        .cloned()
        .collect();
    let [one] = ready.as_slice() else {
        return Err(format!(
            "the node test needs a cluster with one Ready node, not {}",
            ready.len()
        ));
    };
    node.name = one["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    node.ip = one["status"]["addresses"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["type"] == "InternalIP")
        .and_then(|a| a["address"].as_str())
        .ok_or_else(|| format!("Node {} has no InternalIP", node.name))?
        .to_owned();
    if let Some(cidr) = one["spec"]["podCIDR"].as_str() {
        node.pod_cidr = cidr.to_owned();
    }
    if node.pod_cidr.is_empty() {
        return Err(format!(
            "Node {} has no spec.podCIDR: set CLAW_NODE_POD_CIDR to its pods' range",
            node.name
        ));
    }
    Ok(node)
}

/// A node started here by `hack/node.sh`, with the image imported.
fn node_of_our_own() -> Result<Node, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "the node tests need root (the node's bridge, iptables, containerd): run them as root"
                .into(),
        );
    }
    let image = std::env::var_os("CLAW_NODE_IMAGE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/images/claw-secrets.tar"));
    if !image.is_file() {
        return Err(format!(
            "no image at {}: build it with `bash hack/image.sh {}` (or set CLAW_NODE_IMAGE)",
            image.display(),
            image.display()
        ));
    }
    let script = repo().join("hack/node.sh");
    let dir = std::env::temp_dir().join(format!(
        "claw-node-{}-{}",
        std::process::id(),
        random_hex(4)
    ));
    let parent = std::process::id().to_string();
    node_sh(&[
        "up".as_ref(),
        dir.as_ref(),
        "--parent-pid".as_ref(),
        parent.as_ref(),
    ])
    .map_err(|e| format!("{e}\n(run `bash hack/node.sh install` first)"))?;
    node_sh(&["import".as_ref(), dir.as_ref(), image.as_ref()])?;
    let pod_cidr = node_sh(&["pod-cidr".as_ref()])?.trim().to_owned();
    described(Node {
        kubeconfig: dir.join("admin.kubeconfig"),
        scratch: dir.clone(),
        name: String::new(),
        ip: String::new(),
        pod_cidr,
        exec: vec![
            "bash".to_owned(),
            script.to_str().expect("utf-8 path").to_owned(),
            "exec".to_owned(),
        ],
        // Inside the node's directory: removed with it.
        host_path: dir.join("hostpath/claw-secrets").display().to_string(),
        kubelet_log: Some(dir.join("proc/kubelet.log")),
        external: false,
    })
}

/// `bash hack/node.sh ARGS`: its stdout, or its stderr when it fails.
fn node_sh(args: &[&std::ffi::OsStr]) -> Result<String, String> {
    let shown = args
        .iter()
        .map(|a| a.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ");
    let out = Command::new("bash")
        .arg(repo().join("hack/node.sh"))
        .args(args)
        .output()
        .map_err(|e| format!("running hack/node.sh {shown}: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`hack/node.sh {shown}` failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Node {
    /// `ARGS` run on the node: its stdout, or a panic with what went wrong.
    #[track_caller]
    fn exec(&self, args: &[&str]) -> String {
        self.try_exec(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// `ARGS` run on the node: its stdout, or what went wrong.
    fn try_exec(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new(&self.exec[0])
            .args(&self.exec[1..])
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("running {:?}: {e}", self.exec))?;
        if !out.status.success() {
            return Err(format!(
                "on the node: {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The files under the agent's hostPath on the node.
    fn host_path_files(&self) -> Vec<PathBuf> {
        self.exec(&["find", &self.host_path, "-type", "f"])
            .lines()
            .map(PathBuf::from)
            .collect()
    }
}

async fn client_of(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    Client::try_from(config).expect("client")
}

// ---------------------------------------------------------------------------------------------
// The release
// ---------------------------------------------------------------------------------------------

/// The chart installed on the node, and what the steps share.
struct Release<'a> {
    node: &'a Node,
    client: Client,
    started: Instant,
}

/// A failed step shows what the node saw: the pods (terminating ones included), the events, the
/// logs of the release's pods and the kubelet's last words about them.
impl Drop for Release<'_> {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let show = |args: &[&str]| {
            let r = kubectl(&self.node.kubeconfig, args);
            eprintln!("--- kubectl {}\n{}{}", args.join(" "), r.stdout, r.stderr);
        };
        show(&["get", "pods", "-A", "-o", "wide"]);
        show(&["get", "events", "-A", "--sort-by=.lastTimestamp"]);
        let names = kubectl(
            &self.node.kubeconfig,
            &["-n", NAMESPACE, "get", "pods", "-o", "name"],
        )
        .stdout;
        for pod in names.lines() {
            show(&[
                "-n",
                NAMESPACE,
                "logs",
                pod,
                "--all-containers",
                "--tail=40",
            ]);
        }
        let Some(kubelet) = &self.node.kubelet_log else {
            return;
        };
        let kubelet = std::fs::read_to_string(kubelet).unwrap_or_default();
        let lines: Vec<&str> = kubelet
            .lines()
            .filter(|l| l.contains(NAMESPACE) && (l.starts_with('E') || l.starts_with('W')))
            .collect();
        eprintln!(
            "--- kubelet warnings and errors about {NAMESPACE} (last 40)\n{}",
            lines[lines.len().saturating_sub(40)..].join("\n")
        );
    }
}

impl Release<'_> {
    fn kubectl(&self, args: &[&str]) -> String {
        must(
            kubectl(&self.node.kubeconfig, args),
            &format!("kubectl {}", args.join(" ")),
        )
    }

    fn step(&self, what: &str) {
        eprintln!("[{:6.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    fn pods(&self, component: &str) -> Vec<Value> {
        let out = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "pods",
            "-l",
            &format!("app.kubernetes.io/component={component}"),
            "-o",
            "json",
        ]);
        let list: Value = serde_json::from_str(&out).expect("pod list JSON");
        list["items"].as_array().cloned().unwrap_or_default()
    }

    /// `helm install --wait`: both rollouts complete, every pod Ready through its probes.
    fn helm_install_waits_for_ready_pods(&self) {
        self.step("helm install --wait");
        let host_path = format!("agent.hostPath={}", self.node.host_path);
        let kc = self.node.kubeconfig.to_str().unwrap();
        let installing = Instant::now();
        must(
            helm(&[
                "install",
                RELEASE,
                repo().join("charts/claw-secrets").to_str().unwrap(),
                "--namespace",
                NAMESPACE,
                "--create-namespace",
                "--kubeconfig",
                kc,
                "--set",
                &host_path,
                "--wait",
                "--timeout",
                "5m",
            ]),
            "helm install --wait",
        );
        println!(
            "NODE: helm install --wait (2 operators, 1 agent, image present) took {:.1}s",
            installing.elapsed().as_secs_f64()
        );
        for what in [OPERATOR, AGENT] {
            self.kubectl(&["-n", NAMESPACE, "rollout", "status", what, "--timeout=120s"]);
        }
        let (operators, agents) = (self.pods("operator"), self.pods("agent"));
        assert_eq!(operators.len(), 2, "two operator replicas");
        assert_eq!(agents.len(), 1, "one agent on the one node");
        for pod in operators.iter().chain(&agents) {
            let name = pod["metadata"]["name"].as_str().unwrap_or_default();
            let containers = pod["spec"]["containers"].as_array().unwrap();
            for c in containers {
                assert!(
                    c["readinessProbe"].is_object() && c["livenessProbe"].is_object(),
                    "{name}/{}: a readiness and a liveness probe",
                    c["name"]
                );
            }
            let ready = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|c| c["type"] == "Ready" && c["status"] == "True");
            assert!(ready, "{name} is Ready: {}", pod["status"]);
            let at = |t: &Value| t.as_str().and_then(|t| t.parse::<jiff::Timestamp>().ok());
            let ready_at = pod["status"]["conditions"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|c| c["type"] == "Ready")
                .and_then(|c| at(&c["lastTransitionTime"]));
            if let (Some(start), Some(ready)) = (at(&pod["status"]["startTime"]), ready_at) {
                println!(
                    "NODE: {name} Ready {}s after the kubelet started it (1 s resolution)",
                    ready.duration_since(start).as_secs()
                );
            }
            for s in pod["status"]["containerStatuses"].as_array().unwrap() {
                assert_eq!(s["ready"], json!(true), "{name}: {s}");
                assert!(s["started"] == json!(true), "{name}: {s}");
            }
        }
    }

    /// Exactly one operator leads (its /metrics, read at the pod's own address on the node's
    /// bridge), and the operators reach the API server with their in-cluster ServiceAccount
    /// credentials: no kubeconfig anywhere in their pods, a projected token mounted.
    fn one_operator_leads_with_in_cluster_credentials(&self) {
        self.step("one leader, in-cluster credentials");
        let operators = self.pods("operator");
        let mut leaders = 0;
        for pod in &operators {
            let name = pod["metadata"]["name"].as_str().expect("pod name");
            let spec = &pod["spec"];
            let text = spec.to_string();
            assert!(
                !text.contains("KUBECONFIG") && !text.contains("kubeconfig"),
                "{text}"
            );
            assert_ne!(spec["automountServiceAccountToken"], json!(false), "{text}");
            let port = spec["containers"][0]["ports"][0]["containerPort"]
                .as_u64()
                .unwrap();
            let metrics = self
                .metrics_of(name, port)
                .unwrap_or_else(|e| panic!("{e}"));
            if metrics
                .lines()
                .any(|l| l == "claw_secrets_operator_leader 1")
            {
                leaders += 1;
            }
        }
        assert_eq!(leaders, 1, "exactly one operator leads");
    }
}

/// An iptables rule on the node dropping what its pods send to the API server: packets from
/// the pod range (not from one of the node's own addresses: the kubelet's) to the port of the
/// `kubernetes` Service's endpoint, where kube-proxy leads them. The kubelet and this test
/// still reach the API server. Removed when dropped (and, on a node of the test's own, with
/// its network namespace if the test dies first).
struct ApiServerCut<'a> {
    node: &'a Node,
    rule: Vec<String>,
}

impl<'a> ApiServerCut<'a> {
    fn new(node: &'a Node, api_server_port: &str) -> ApiServerCut<'a> {
        let rule: Vec<String> = [
            "INPUT",
            "-s",
            &node.pod_cidr,
            "-m",
            "addrtype",
            "!",
            "--src-type",
            "LOCAL",
            "-p",
            "tcp",
            "--dport",
            api_server_port,
            "-m",
            "comment",
            "--comment",
            "claw-node-test-cut",
            "-j",
            "DROP",
        ]
        .map(str::to_owned)
        .to_vec();
        let mut insert = vec!["iptables", "-I"];
        insert.extend(rule.iter().map(String::as_str));
        node.exec(&insert);
        ApiServerCut { node, rule }
    }
}

impl Drop for ApiServerCut<'_> {
    fn drop(&mut self) {
        let mut delete = vec!["iptables", "-D"];
        delete.extend(self.rule.iter().map(String::as_str));
        // Never a panic here (it may run while a failed step unwinds): said, and left to the
        // node's teardown.
        if let Err(e) = self.node.try_exec(&delete) {
            eprintln!("removing the API-server cut: {e}");
        }
    }
}

impl Release<'_> {
    /// node.invoke at `addr` (the agent's hostPort on the node's address), over HTTPS,
    /// verifying the agent as every client does: its certificate, which the operator signed
    /// through a CertificateSigningRequest, chains to the CA bundle the operator publishes
    /// and names this node.
    async fn invoke_on_host_port(
        &self,
        addr: &str,
        token: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Reply, String> {
        let ca = self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "configmap",
            claw_secrets::k8s::agent_certs::CA_BUNDLE_CONFIGMAP,
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ]);
        cluster::post_invoke_verified(addr, &ca, &self.node.name, token, body).await
    }

    /// GET /metrics of a pod through the API server's pod proxy (as the admin).
    fn metrics_of(&self, pod: &str, port: u64) -> Result<String, String> {
        let path = format!("/api/v1/namespaces/{NAMESPACE}/pods/{pod}:{port}/proxy/metrics");
        let r = kubectl(&self.node.kubeconfig, &["get", "--raw", &path]);
        if r.ok {
            Ok(r.stdout)
        } else {
            Err(format!("GET {path}: {}", r.stderr))
        }
    }

    /// The port the `kubernetes` Service leads to (the API server's on the node).
    fn api_server_port(&self) -> String {
        let port = self.kubectl(&[
            "-n",
            "default",
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=kubernetes",
            "-o",
            "jsonpath={.items[0].ports[0].port}",
        ]);
        assert!(
            port.parse::<u16>().is_ok(),
            "the kubernetes Service's port: {port:?}"
        );
        port
    }
}

impl Release<'_> {
    /// The runtime enforces the pods' securityContext: the agent process (found on the host)
    /// runs as uid/gid 65532 with no capabilities, on a read-only root filesystem.
    fn the_runtime_enforces_the_security_context(&self) {
        self.step("securityContext at run time");
        // The first process whose command line is `/claw-secrets agent`: its status, then its
        // mounts.
        let found = self.node.exec(&[
            "sh",
            "-c",
            "for p in /proc/[0-9]*; do \
               if [ \"$(tr '\\0' ' ' <\"$p/cmdline\" 2>/dev/null | cut -d' ' -f1-2)\" = '/claw-secrets agent' ]; then \
                 cat \"$p/status\" && echo '--- mountinfo' && cat \"$p/mountinfo\" && exit 0; \
               fi; \
             done; echo 'no /claw-secrets agent process' >&2; exit 1",
        ]);
        let (status, mounts) = found
            .split_once("--- mountinfo\n")
            .expect("the agent's status and mounts");
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().collect::<Vec<_>>())
                .unwrap_or_default()
        };
        assert_eq!(field("Uid:"), vec!["65532"; 4], "{status}");
        assert_eq!(field("Gid:"), vec!["65532"; 4], "{status}");
        assert_eq!(field("CapEff:"), vec!["0000000000000000"], "{status}");
        assert_eq!(field("CapPrm:"), vec!["0000000000000000"], "{status}");
        assert_eq!(field("NoNewPrivs:"), vec!["1"], "{status}");
        let root = mounts
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .expect("the container's root mount");
        let options = root.split_whitespace().nth(5).unwrap_or_default();
        assert!(
            options.split(',').any(|o| o == "ro"),
            "root is read-only: {root}"
        );
    }
}

impl Release<'_> {
    /// A ServiceAccount with the chart's editor role in `ns` and the invoker role where the
    /// agents run; its token.
    async fn editor(&self, ns: &str, name: &str) -> String {
        self.kubectl(&["create", "namespace", ns]);
        let token = cluster::service_account_token(&self.client, ns, name).await;
        let subject = cluster::service_account_subject(ns, name);
        cluster::bind_cluster_role(
            &self.client,
            ns,
            name,
            &format!("{RELEASE}-editor"),
            subject.clone(),
        )
        .await;
        cluster::bind_cluster_role(
            &self.client,
            NAMESPACE,
            name,
            &format!("{RELEASE}-invoker"),
            subject,
        )
        .await;
        token
    }

    /// node.invoke on the agent's hostPort (the node's address): a secret created, read back.
    async fn node_invoke_answers_on_the_host_port(&self, token: &str, ns: &str, value: &str) {
        self.step("node.invoke on the hostPort");
        let addr = format!("https://{}:7443", self.node.ip);
        let call = |command: &str, params: Value| {
            let body = json!({ "nodeId": self.node.name, "command": command, "params": params });
            let addr = addr.clone();
            async move {
                self.invoke_on_host_port(&addr, Some(token), serde_json::to_vec(&body).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("{addr}: {e}"))
            }
        };
        let created: Reply = call(
            "secret.create",
            json!({ "name": "node.db", "namespace": ns, "data": { "password": value } }),
        )
        .await;
        assert_eq!(
            created.payload("secret.create on the hostPort")["version"],
            json!(1)
        );
        let got = eventually("the agent to serve node.db", || async {
            call("secret.get", json!({ "name": "node.db", "namespace": ns }))
                .await
                .result()
        })
        .await;
        assert_eq!(got["data"]["password"], json!(value));
    }

    /// The agent pod published its node's public key: its projected token carries the node
    /// name, which the chart's admission policy requires of the agent's ServiceAccount.
    async fn the_agent_published_its_node_key(&self) {
        self.step("the agent's node key, published with its pod-bound token");
        let nodes: Api<claw_secrets::k8s::crd::ClawNode> = Api::all(self.client.clone());
        let published = eventually("ClawNode of the node", || async {
            nodes
                .get_opt(&self.node.name)
                .await
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "not published yet".to_owned())
        })
        .await;
        claw_secrets::crypto::SealingPublicKey::parse(&published.spec.public_key)
            .expect("a public key");
        let owner = &published.metadata.owner_references.expect("owned")[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str()),
            ("Node", self.node.name.as_str())
        );
        // Its secrets come from the operator's deliveries (the chart's projected token for the
        // operator's audience, through the API server's proxy to the operator's pods), not
        // from a watch of every ClawSecret.
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        eventually("the agent pod in sync with its deliveries", || async {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
                .await
                .map_err(|e| e.to_string())?;
            let mut logs = String::new();
            for pod in &list.items {
                let name = pod.metadata.name.as_deref().unwrap_or_default();
                let params = kube::api::LogParams {
                    container: Some("agent".to_owned()),
                    ..kube::api::LogParams::default()
                };
                logs += &pods.logs(name, &params).await.map_err(|e| e.to_string())?;
            }
            let watched = logs.lines().any(|l| {
                l.contains("in sync with the API server") && l.contains("kind=\"ClawSecret\"")
            });
            assert!(!watched, "an agent pod watches ClawSecrets:\n{logs}");
            logs.contains("secrets in sync with this node's deliveries")
                .then_some(())
                .ok_or_else(|| "not yet".to_owned())
        })
        .await;
    }

    /// The chart's user roles are part of the built-in ones (the cluster's role aggregation
    /// controller, in kube-controller-manager, merges them): a ServiceAccount bound only to
    /// `edit` creates and reveals a secret whose allowedWorkloads do not name it; one bound only
    /// to `view` lists it but may not reveal it.
    async fn the_built_in_roles_include_the_chart_roles(&self, ns: &str) {
        self.step("built-in edit and view roles");
        let addr = format!("https://{}:7443", self.node.ip);
        let mut tokens = Vec::new();
        for (sa, role) in [("dev-edit", "edit"), ("dev-view", "view")] {
            tokens.push(cluster::service_account_token(&self.client, ns, sa).await);
            cluster::bind_cluster_role(
                &self.client,
                ns,
                sa,
                role,
                cluster::service_account_subject(ns, sa),
            )
            .await;
        }
        let (editor, viewer) = (&tokens[0], &tokens[1]);
        let call = |token: &str, command: &str, params: Value| {
            let body = json!({ "nodeId": self.node.name, "command": command, "params": params });
            let (addr, token) = (addr.clone(), token.to_owned());
            async move {
                self.invoke_on_host_port(&addr, Some(&token), serde_json::to_vec(&body).unwrap())
                    .await
                    .unwrap_or_else(|e| panic!("{addr}: {e}"))
            }
        };
        let value = format!("edit-{}", random_hex(6));
        let params = json!({ "name": "edit.made", "namespace": ns, "data": { "k": value },
            "allowed_workloads": ["someone-else"] });
        // Aggregation is asynchronous: the first calls may come before it.
        eventually(
            "a ServiceAccount bound to edit to create a secret",
            || async { call(editor, "secret.create", params.clone()).await.result() },
        )
        .await;
        let got = eventually("the edit-bound ServiceAccount to reveal it", || async {
            call(
                editor,
                "secret.get",
                json!({ "name": "edit.made", "namespace": ns }),
            )
            .await
            .result()
        })
        .await;
        assert_eq!(got["data"]["k"], json!(value));
        let listed = eventually("a ServiceAccount bound to view to list it", || async {
            call(viewer, "secret.list", json!({ "namespace": ns }))
                .await
                .result()
        })
        .await;
        assert!(listed.to_string().contains("edit.made"), "{listed}");
        let refused = call(
            viewer,
            "secret.get",
            json!({ "name": "edit.made", "namespace": ns }),
        )
        .await;
        refused.expect_error("PERMISSION_DENIED", "view may not reveal");
    }

    /// `claw-secrets invoke claw-node ...` with a kubeconfig: through the API server's pod proxy
    /// to the agent pod.
    fn the_cli_reaches_the_agent_through_the_api_server(&self, token: &str, ns: &str, value: &str) {
        self.step("claw-secrets invoke through the API server");
        let kubeconfig = tokens::kubeconfig_with_token(
            &self.node.kubeconfig,
            token,
            &self.node.scratch.join("editor.kubeconfig"),
        );
        let out = Command::new(BIN)
            .args(["invoke", &self.node.name, "secret.get"])
            .arg(json!({ "name": "node.db", "namespace": ns }).to_string())
            .args(["--agent-namespace", NAMESPACE])
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("CLAW_SECRETS_ADDR")
            .env_remove("CLAW_SECRETS_TOKEN")
            .env("HOME", &self.node.scratch)
            .output()
            .expect("claw-secrets invoke");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got: Value = serde_json::from_slice(&out.stdout).expect("JSON payload");
        assert_eq!(got["data"]["password"], json!(value));
    }

    /// The agent's store is on the node: a new agent pod (the old one deleted) serves the same
    /// secret, and the hostPath holds the store and the audit log.
    async fn the_store_on_the_host_path_outlives_the_agent_pod(
        &self,
        token: &str,
        ns: &str,
        value: &str,
    ) {
        self.step("agent pod deleted, pods cut off from the API server; the store serves");
        let before = self.pods("agent");
        let old = before[0]["metadata"]["name"].as_str().unwrap().to_owned();
        // From here the pods cannot reach the API server (the kubelet, a host process, still
        // can, so the new pod is made): whatever the new agent serves comes from its hostPath
        // (the store, the cached keyring, the token review of the old pod).
        let _cut = ApiServerCut::new(self.node, &self.api_server_port());
        self.kubectl(&["-n", NAMESPACE, "delete", "pod", &old, "--wait=true"]);
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            AGENT,
            "--timeout=120s",
        ]);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), NAMESPACE);
        eventually("a new agent pod, Ready", || async {
            let list = pods
                .list(&ListParams::default().labels("app.kubernetes.io/component=agent"))
                .await
                .map_err(|e| e.to_string())?;
            let ready = list.items.iter().any(|p| {
                p.metadata.name.as_deref() != Some(old.as_str())
                    && p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            });
            ready.then_some(()).ok_or_else(|| "not yet".to_owned())
        })
        .await;
        let files = self.node.host_path_files();
        files::assert_holds_audit_and_secrets(&files);
        self.node_invoke_answers_after_restart(token, ns, value)
            .await;
    }

    async fn node_invoke_answers_after_restart(&self, token: &str, ns: &str, value: &str) {
        let addr = format!("https://{}:7443", self.node.ip);
        let body = json!({ "nodeId": self.node.name, "command": "secret.get",
                           "params": { "name": "node.db", "namespace": ns } });
        let got = eventually("the new agent pod to serve node.db", || async {
            self.invoke_on_host_port(&addr, Some(token), serde_json::to_vec(&body).unwrap())
                .await?
                .result()
        })
        .await;
        assert_eq!(got["data"]["password"], json!(value));
        assert_eq!(got["version"], json!(1));
        // Served from the store: the new agent never got in sync with the API server.
        let pod = self.pods("agent")[0]["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let log = self.kubectl(&["-n", NAMESPACE, "logs", &pod]);
        assert!(!log.contains("in sync with the API server"), "{log}");
    }
}

impl Release<'_> {
    /// The name of the pod holding the leader Lease.
    fn leader_pod(&self) -> String {
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "lease",
            &format!("{RELEASE}-operator"),
            "-o",
            "jsonpath={.spec.holderIdentity}",
        ])
    }

    /// A ClawSecret applied with plaintext, as with `kubectl apply`; waits until the operator
    /// has sealed it (plaintext gone, Ready).
    async fn sealed_by_the_operator(&self, ns: &str, name: &str) {
        let manifest = json!({
            "apiVersion": "clawbernetes.io/v1beta1",
            "kind": "ClawSecret",
            "metadata": { "name": name, "namespace": ns },
            "spec": { "data": { "token": format!("t-{}", random_hex(6)) } },
        });
        let file = self.node.scratch.join(format!("{name}.json"));
        std::fs::write(&file, manifest.to_string()).unwrap();
        // Right after pods are replaced, the webhook's Service may still route to a pod that is
        // gone (kube-proxy's rules follow the endpoints a moment later): the API server then
        // refuses the write (failurePolicy Fail), which loses nothing, and a client retries.
        let apply = ["apply", "-f", file.to_str().unwrap()];
        let mut attempt = 0;
        loop {
            let run = kubectl(&self.node.kubeconfig, &apply);
            if run.ok || !run.stderr.contains("failed calling webhook") || attempt == 5 {
                must(run, &format!("kubectl {}", apply.join(" ")));
                break;
            }
            attempt += 1;
            eprintln!("NODE: the webhook did not answer yet ({attempt}); applying again");
            tokio::time::sleep(std::time::Duration::from_secs(3)).await;
        }
        std::fs::remove_file(&file).unwrap();
        let secrets: Api<ClawSecret> = Api::namespaced(self.client.clone(), ns);
        eventually(&format!("{ns}/{name} sealed by the operator"), || async {
            let obj = secrets.get(name).await.map_err(|e| e.to_string())?;
            let ready = obj.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            if obj.spec.data.is_none() && obj.spec.sealed.is_some() && ready {
                Ok(())
            } else {
                Err(format!("{:?}", obj.status))
            }
        })
        .await;
    }

    /// `helm test`: the chart's own check, a pod reading a ClawSecret back through the agent on
    /// its node.
    fn helm_test_passes(&self) {
        self.step("helm test");
        let kc = self.node.kubeconfig.to_str().unwrap();
        let testing = Instant::now();
        let out = must(
            helm(&[
                "test",
                RELEASE,
                "--namespace",
                NAMESPACE,
                "--kubeconfig",
                kc,
                "--timeout",
                "3m",
            ]),
            "helm test",
        );
        assert!(out.contains("Phase:          Succeeded"), "{out}");
        println!(
            "NODE: helm test (a pod reads a ClawSecret back through its agent) passed in {:.1}s",
            testing.elapsed().as_secs_f64()
        );
    }

    /// A namespace holding ClawSecrets is deleted while no operator runs, and its deletion
    /// completes: nothing the operator puts on an object waits for it (no finalizer).
    async fn a_namespace_deletes_while_the_operator_is_stopped(&self) {
        self.step("namespace deleted while the operator is stopped");
        let ns = "claw-orphans";
        self.kubectl(&["create", "namespace", ns]);
        let manifest = self.node.scratch.join("orphan.json");
        std::fs::write(
            &manifest,
            json!({
                "apiVersion": "clawbernetes.io/v1beta1", "kind": "ClawSecret",
                "metadata": { "name": "orphan", "namespace": ns },
                "spec": { "data": { "k": random_hex(8) } },
            })
            .to_string(),
        )
        .unwrap();
        self.kubectl(&["apply", "-f", manifest.to_str().unwrap()]);
        let secrets: Api<ClawSecret> = Api::namespaced(self.client.clone(), ns);
        eventually("the orphan to be sealed and Ready", || async {
            let s = secrets.get("orphan").await.map_err(|e| e.to_string())?;
            (s.status.and_then(|st| st.version) == Some(1))
                .then_some(())
                .ok_or_else(|| "not yet".to_owned())
        })
        .await;
        self.kubectl(&["-n", NAMESPACE, "scale", OPERATOR, "--replicas=0"]);
        eventually("no operator pod", || async {
            let left = self.pods("operator").len();
            (left == 0)
                .then_some(())
                .ok_or_else(|| format!("{left} left"))
        })
        .await;
        let deleting = Instant::now();
        self.kubectl(&["delete", "namespace", ns, "--wait=true", "--timeout=120s"]);
        println!(
            "NODE: namespace with a ClawSecret deleted with no operator running in {:.1}s",
            deleting.elapsed().as_secs_f64()
        );
        self.kubectl(&["-n", NAMESPACE, "scale", OPERATOR, "--replicas=2"]);
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            OPERATOR,
            "--timeout=180s",
        ]);
    }

    /// The leader's pod deleted: the other replica takes over (the old one released the
    /// Lease) and seals a new ClawSecret.
    async fn the_other_operator_takes_over_from_a_deleted_leader(&self, ns: &str) {
        self.step("leader pod deleted; the other replica takes over");
        let old = self.leader_pod();
        assert!(old.starts_with(&format!("{RELEASE}-operator-")), "{old:?}");
        self.kubectl(&["-n", NAMESPACE, "delete", "pod", &old, "--wait=false"]);
        let new = eventually("another operator pod to hold the Lease", || async {
            let holder = self.leader_pod();
            if !holder.is_empty() && holder != old {
                Ok(holder)
            } else {
                Err(holder)
            }
        })
        .await;
        eventually("the new leader to report leader 1", || async {
            let m = self.metrics_of(&new, 8080)?;
            m.lines()
                .any(|l| l == "claw_secrets_operator_leader 1")
                .then_some(())
                .ok_or(m)
        })
        .await;
        self.sealed_by_the_operator(ns, "after.failover").await;
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "rollout",
            "status",
            OPERATOR,
            "--timeout=120s",
        ]);
    }

    /// `helm upgrade` with a changed value rolls every pod (new names, Ready), and the
    /// upgraded operators still seal.
    async fn helm_upgrade_rolls_the_pods(&self, ns: &str) {
        self.step("helm upgrade");
        let names = |component: &str| -> Vec<String> {
            self.pods(component)
                .iter()
                .map(|p| p["metadata"]["name"].as_str().unwrap().to_owned())
                .collect()
        };
        let before: Vec<String> = [names("operator"), names("agent")].concat();
        must(
            helm(&[
                "upgrade",
                RELEASE,
                repo().join("charts/claw-secrets").to_str().unwrap(),
                "--namespace",
                NAMESPACE,
                "--kubeconfig",
                self.node.kubeconfig.to_str().unwrap(),
                "--reuse-values",
                "--set",
                "operator.logLevel=debug",
                "--set",
                "agent.logLevel=debug",
                "--wait",
                "--timeout",
                "5m",
            ]),
            "helm upgrade --wait",
        );
        for what in [OPERATOR, AGENT] {
            self.kubectl(&["-n", NAMESPACE, "rollout", "status", what, "--timeout=120s"]);
        }
        // The rollouts are complete once the new pods are available; the old ones may still be
        // stopping (each within its grace period, the operator's drain included).
        let after = eventually("the old pods to be gone", || async {
            let after: Vec<String> = [names("operator"), names("agent")].concat();
            if after.len() == 3 {
                Ok(after)
            } else {
                Err(format!("{after:?}"))
            }
        })
        .await;
        for pod in &after {
            assert!(
                !before.contains(pod),
                "{pod} was not replaced: {before:?} -> {after:?}"
            );
        }
        self.sealed_by_the_operator(ns, "after.upgrade").await;
    }

    /// `helm uninstall --wait` of the release.
    fn helm_uninstall(&self) {
        must(
            helm(&[
                "uninstall",
                RELEASE,
                "--namespace",
                NAMESPACE,
                "--kubeconfig",
                self.node.kubeconfig.to_str().unwrap(),
                "--wait",
                "--timeout",
                "5m",
            ]),
            "helm uninstall --wait",
        );
    }

    /// `helm uninstall` removes the release's pods and keeps what docs/helm.md says it keeps:
    /// the CRDs, the master key Secret, the ClawSecrets, the hostPath store.
    fn helm_uninstall_keeps_what_the_docs_say(&self, ns: &str) {
        self.step("helm uninstall");
        self.helm_uninstall();
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "wait",
            "--for=delete",
            "pod",
            "-l",
            &format!("app.kubernetes.io/instance={RELEASE}"),
            "--timeout=120s",
        ]);
        for crd in ["clawsecrets.clawbernetes.io", "clawconfigs.clawbernetes.io"] {
            self.kubectl(&["get", "crd", crd]);
        }
        self.kubectl(&[
            "-n",
            NAMESPACE,
            "get",
            "secret",
            &format!("{RELEASE}-master-key"),
        ]);
        self.kubectl(&["-n", ns, "get", "clawsecret", "after.upgrade"]);
        files::assert_holds_audit_and_secrets(&self.node.host_path_files());
    }

    /// A Lease left behind by a leader that could not release it (as when `helm uninstall`
    /// deletes its Role first): a new install does not wait it out for a pod that no longer
    /// exists. Made certain here by writing such a Lease, an hour long, before installing.
    async fn a_new_install_takes_over_a_lease_whose_pod_is_gone(&self, ns: &str) {
        self.step("reinstall over a Lease held by a pod that is gone");
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": { "name": format!("{RELEASE}-operator"), "namespace": NAMESPACE },
            "spec": {
                "holderIdentity": format!("{RELEASE}-operator-5d9c8f7b6-gone1"),
                "leaseDurationSeconds": 3600,
                "renewTime": jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string(),
            },
        });
        let file = self.node.scratch.join("stale-lease.json");
        std::fs::write(&file, lease.to_string()).unwrap();
        self.kubectl(&[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            file.to_str().unwrap(),
        ]);
        self.helm_install_waits_for_ready_pods();
        self.sealed_by_the_operator(ns, "after.reinstall").await;
        let leader = self.leader_pod();
        let log = self.kubectl(&["-n", NAMESPACE, "logs", &leader]);
        assert!(
            log.contains("names a pod that no longer exists"),
            "the new leader says why it did not wait:\n{log}"
        );
    }
}

impl Release<'_> {
    /// On a cluster from elsewhere, what the test made is removed (a node of the test's own
    /// goes whole): the apps' namespace while the operator still runs (it removes its
    /// finalizers), then the release, its namespace and the hostPath. The CRDs stay, as
    /// `helm uninstall` leaves them.
    fn removes_what_it_installed(&self) {
        if !self.node.external {
            return;
        }
        self.step("removing what the test installed");
        self.kubectl(&["delete", "namespace", APPS, "--wait=true", "--timeout=180s"]);
        self.helm_uninstall();
        self.kubectl(&[
            "delete",
            "namespace",
            NAMESPACE,
            "--wait=true",
            "--timeout=180s",
        ]);
        self.node.exec(&["rm", "-rf", &self.node.host_path]);
    }
}

impl Release<'_> {
    /// `kubectl apply -f examples/`: the workload pod's init container reads its secret and its
    /// config from the agent on its node (hostIP:hostPort) with its projected token, and the
    /// app sees the value; a pod of another ServiceAccount is refused; `kubectl delete -f
    /// examples/` (the operator running) completes, the namespace included. Prints how long
    /// the workload's first read took from the pod's creation.
    async fn the_examples_run_and_refuse_other_workloads(&self) {
        self.step("kubectl apply -f examples/");
        let examples = repo().join("examples");
        self.kubectl(&["apply", "-f", examples.to_str().unwrap()]);
        self.kubectl(&[
            "-n",
            "claw-demo",
            "rollout",
            "status",
            "deployment/api-server",
            "--timeout=180s",
        ]);
        let pod: Value = serde_json::from_str(&self.kubectl(&[
            "-n",
            "claw-demo",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=api-server",
            "-o",
            "json",
        ]))
        .unwrap();
        let pod = &pod["items"][0];
        let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
        let fetched = self.kubectl(&["-n", "claw-demo", "logs", &name, "-c", "fetch-credentials"]);
        assert!(
            fetched.contains("fetched db.credentials and app.production"),
            "{fetched}"
        );
        let app = eventually("the app to print the version it read", || async {
            let log = self.kubectl(&["-n", "claw-demo", "logs", &name, "-c", "app"]);
            log.contains("db.credentials version: 1")
                .then_some(log.clone())
                .ok_or(log)
        })
        .await;
        assert!(
            !app.contains("secret\""),
            "no value in the app's log: {app}"
        );
        let created = pod["metadata"]["creationTimestamp"]
            .as_str()
            .unwrap()
            .parse::<jiff::Timestamp>()
            .unwrap();
        let finished =
            pod["status"]["initContainerStatuses"][0]["state"]["terminated"]["finishedAt"]
                .as_str()
                .map(|t| t.parse::<jiff::Timestamp>().unwrap());
        if let Some(finished) = finished {
            println!(
                "NODE: the example workload's first read done {}s after its pod was created (1 s resolution)",
                finished.duration_since(created).as_secs()
            );
        }

        // Another workload of the namespace, with its own projected token: refused.
        let intruder = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": { "name": "intruder", "namespace": "claw-demo" },
            "spec": {
                "serviceAccountName": "intruder",
                "automountServiceAccountToken": false,
                "restartPolicy": "Never",
                "securityContext": { "runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": { "type": "RuntimeDefault" } },
                "containers": [{
                    "name": "c", "image": "curlimages/curl:8.11.1",
                    "env": [
                        { "name": "HOST_IP", "valueFrom": { "fieldRef": { "fieldPath": "status.hostIP" } } },
                        { "name": "NODE_NAME", "valueFrom": { "fieldRef": { "fieldPath": "spec.nodeName" } } },
                    ],
                    "command": ["/bin/sh", "-c"],
                    "args": ["curl -s -H \"Authorization: Bearer $(cat /t/claw)\" --data \"{\\\"nodeId\\\": \\\"$NODE_NAME\\\", \\\"command\\\": \\\"secret.get\\\", \\\"params\\\": {\\\"name\\\": \\\"db.credentials\\\"}}\" --cacert /ca/ca.crt --resolve \"$NODE_NAME:7443:$HOST_IP\" https://$NODE_NAME:7443/v1/invoke"],
                    "securityContext": { "allowPrivilegeEscalation": false, "capabilities": { "drop": ["ALL"] } },
                    "volumeMounts": [
                        { "name": "t", "mountPath": "/t", "readOnly": true },
                        { "name": "ca", "mountPath": "/ca", "readOnly": true },
                    ],
                }],
                "volumes": [
                    { "name": "t", "projected": { "sources": [{ "serviceAccountToken": { "path": "claw", "expirationSeconds": 3600 } }] } },
                    // The bundle the operator publishes in every namespace.
                    { "name": "ca", "configMap": { "name": "claw-secrets-agent-ca" } },
                ],
            },
        });
        self.kubectl(&["-n", "claw-demo", "create", "serviceaccount", "intruder"]);
        let file = self.node.scratch.join("intruder.json");
        std::fs::write(&file, intruder.to_string()).unwrap();
        self.kubectl(&["apply", "-f", file.to_str().unwrap()]);
        self.kubectl(&[
            "-n",
            "claw-demo",
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            "pod/intruder",
            "--timeout=120s",
        ]);
        let answer = self.kubectl(&["-n", "claw-demo", "logs", "intruder"]);
        let answer: Value =
            serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{e}: {answer}"));
        assert_eq!(
            answer["error"]["code"],
            json!("PERMISSION_DENIED"),
            "{answer}"
        );
        assert!(
            answer["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("system:serviceaccount:claw-demo:intruder may not read secret \"db.credentials\"")),
            "{answer}"
        );
        self.kubectl(&[
            "-n",
            "claw-demo",
            "delete",
            "pod",
            "intruder",
            "--wait=true",
        ]);

        // Applied again, unchanged (as a GitOps controller does on every sync): no secret
        // moves to a new version.
        self.step("kubectl apply -f examples/ again");
        self.kubectl(&["apply", "-f", examples.to_str().unwrap()]);
        let secrets: Api<ClawSecret> = Api::namespaced(self.client.clone(), "claw-demo");
        for name in ["db.credentials", "external.openai"] {
            let s = eventually(&format!("{name} without plaintext again"), || async {
                let s = secrets.get(name).await.map_err(|e| e.to_string())?;
                s.spec
                    .data
                    .is_none()
                    .then_some(s)
                    .ok_or_else(|| "not yet".to_owned())
            })
            .await;
            assert_eq!(s.spec.sealed.map(|s| s.version), Some(1), "{name}");
            assert_eq!(s.status.and_then(|s| s.version), Some(1), "{name}");
        }
        // The chart's webhook sealed them before they were stored: the reconcile loop found no
        // plaintext to seal (it would have said so with a PlaintextStored Warning).
        let events = self.kubectl(&["-n", "claw-demo", "get", "events", "-o", "json"]);
        assert!(
            !events.contains("PlaintextStored"),
            "plaintext was stored before the seal: {events}"
        );

        self.step("kubectl delete -f examples/");
        let deleting = Instant::now();
        self.kubectl(&[
            "delete",
            "-f",
            examples.to_str().unwrap(),
            "--wait=true",
            "--timeout=180s",
        ]);
        println!(
            "NODE: kubectl delete -f examples/ (the namespace and its ClawSecrets included) took {:.1}s",
            deleting.elapsed().as_secs_f64()
        );
    }
}

#[tokio::test]
async fn the_chart_runs_on_a_node() {
    let node = node();
    let r = Release {
        node,
        client: client_of(&node.kubeconfig).await,
        started: Instant::now(),
    };
    r.helm_install_waits_for_ready_pods();
    r.one_operator_leads_with_in_cluster_credentials();
    r.the_runtime_enforces_the_security_context();
    let ns = APPS;
    let token = r.editor(ns, "deployer").await;
    let value = format!("pw-{}", random_hex(8));
    r.node_invoke_answers_on_the_host_port(&token, ns, &value)
        .await;
    r.the_agent_published_its_node_key().await;
    r.the_cli_reaches_the_agent_through_the_api_server(&token, ns, &value);
    r.the_built_in_roles_include_the_chart_roles(ns).await;
    r.the_store_on_the_host_path_outlives_the_agent_pod(&token, ns, &value)
        .await;
    r.the_examples_run_and_refuse_other_workloads().await;
    r.helm_test_passes();
    r.a_namespace_deletes_while_the_operator_is_stopped().await;
    r.the_other_operator_takes_over_from_a_deleted_leader(ns)
        .await;
    r.helm_upgrade_rolls_the_pods(ns).await;
    r.helm_uninstall_keeps_what_the_docs_say(ns);
    r.a_new_install_takes_over_a_lease_whose_pod_is_gone(ns)
        .await;
    r.removes_what_it_installed();
    r.step("done");
}
