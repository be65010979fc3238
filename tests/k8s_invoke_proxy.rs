//! `claw-secrets invoke <node> ...` against a real kube-apiserver: the node id is a Node name,
//! the CLI finds that Node's agent pod and calls it through the API server's pod proxy with the
//! caller's own kubeconfig, forwarding the caller's bearer token in
//! `X-Claw-Secrets-Authorization` for the agent to check (TokenReview, then the caller's own
//! RBAC). docs/architecture.md, "Invoking through the API server".
//!
//! There is no kubelet in the test control plane, so each test runs a `claw-secrets agent`
//! process and creates the Pod object a DaemonSet would have made for it: scheduled on the
//! agent's Node (`spec.nodeName`), its status patched to Running with the agent's address as
//! pod IP. The API server refuses to proxy to loopback and link-local addresses, so the agent
//! listens on the first other IPv4 address of this host (`CLAW_TEST_AGENT_IP` overrides it,
//! e.g. with the Docker bridge address for kind).
//!
//! Latency figures are printed, never asserted: `cargo test --test k8s_invoke_proxy latency --
//! --nocapture`, lines starting with `LATENCY:`.

#[path = "support/random.rs"]
mod random;

#[path = "support/host.rs"]
mod host;

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

#[path = "support/canary.rs"]
mod canary;

#[path = "support/tokens.rs"]
mod tokens;

#[path = "support/agent_identity.rs"]
mod agent_identity;

#[path = "support/webhook.rs"]
mod webhook;

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, ContainerPort, Pod, PodSpec};
use k8s_openapi::api::rbac::v1::{ClusterRole, PolicyRule, Subject};
use kube::api::{Api, ObjectMeta, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use canary::Canaries;
use cluster::{Agent, BIN, Cluster};
use control_plane::TestEnv;
use random::random_hex;
use wait::eventually;

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

/// The address the agents listen on (see [`host::proxyable_ip`]).
fn agent_ip() -> IpAddr {
    host::proxyable_ip()
}

const AGENT_LABELS: [(&str, &str); 2] = [
    ("app.kubernetes.io/name", "claw-secrets"),
    ("app.kubernetes.io/component", "agent"),
];

/// The ClusterRole `name` as deploy/rbac/agent.yaml defines it, applied to the cluster (so the
/// tests check the shipped manifest, not a copy).
async fn apply_cluster_role(client: &kube::Client, name: &str) {
    let path = control_plane::repo_root().join("deploy/rbac/agent.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/rbac/agent.yaml");
    let role: ClusterRole = serde_saphyr::from_multiple::<Value>(&text)
        .expect("YAML")
        .into_iter()
        .filter(|v| v["kind"] == "ClusterRole" && v["metadata"]["name"] == name)
        .map(|v| serde_json::from_value(v).expect("a ClusterRole"))
        .next()
        .unwrap_or_else(|| panic!("{} defines no ClusterRole {name}", path.display()));
    Api::<ClusterRole>::all(client.clone())
        .patch(
            name,
            &PatchParams::apply("claw-secrets-tests").force(),
            &Patch::Apply(&role),
        )
        .await
        .unwrap_or_else(|e| panic!("applying ClusterRole {name}: {e}"));
}

/// Binds the ClusterRole `role` to `subject` in namespace `ns`.
async fn bind(client: &kube::Client, ns: &str, role: &str, subject: Subject) {
    let name = format!("{role}-{}", subject.name);
    cluster::bind_cluster_role(client, ns, &name, role, subject).await;
}

/// A Role in `ns` that lets `subject` list pods, and nothing else (so finding the agent works
/// and only the proxy is refused).
async fn grant_pod_list(client: &kube::Client, ns: &str, subject: Subject) {
    let name = format!("pod-lister-{}", subject.name);
    let list_pods = PolicyRule {
        api_groups: Some(vec![String::new()]),
        resources: Some(vec!["pods".to_owned()]),
        verbs: vec!["list".to_owned()],
        ..PolicyRule::default()
    };
    cluster::grant_rules(client, ns, subject, &name, vec![list_pods]).await;
}

/// Creates the Pod a DaemonSet would have made for `agent` in `ns`: on its Node, with its
/// node.invoke port named `invoke`, and (no kubelet here) its status set to Running at the
/// agent's address. `running: false` leaves it Pending with no IP.
async fn agent_pod(client: &kube::Client, ns: &str, agent: &Agent, running: bool) -> String {
    let name = format!("claw-secrets-agent-{}", random_hex(3));
    let pod = Pod {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(
                AGENT_LABELS
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect(),
            ),
            ..ObjectMeta::default()
        },
        spec: Some(PodSpec {
            node_name: Some(agent.node.clone()),
            containers: vec![Container {
                name: "agent".to_owned(),
                image: Some("claw-secrets:test".to_owned()),
                ports: Some(vec![ContainerPort {
                    name: Some("invoke".to_owned()),
                    container_port: i32::from(agent.port),
                    ..ContainerPort::default()
                }]),
                ..Container::default()
            }],
            ..PodSpec::default()
        }),
        ..Pod::default()
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    pods.create(&PostParams::default(), &pod)
        .await
        .unwrap_or_else(|e| panic!("creating Pod {ns}/{name}: {e}"));
    if running {
        let ip = agent.ip.to_string();
        pods.patch_status(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": {
                "phase": "Running",
                "podIP": ip,
                "podIPs": [{ "ip": ip }],
                "conditions": [{ "type": "Ready", "status": "True" }],
            }})),
        )
        .await
        .unwrap_or_else(|e| panic!("setting the status of Pod {ns}/{name}: {e}"));
    }
    name
}

/// One run of the CLI.
#[derive(Debug)]
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Run {
    #[track_caller]
    fn payload(&self, what: &str) -> Value {
        assert_eq!(self.code, Some(0), "{what}: {self:#?}");
        serde_json::from_str(&self.stdout).unwrap_or_else(|e| panic!("{what}: {e}: {self:#?}"))
    }

    /// Asserts exit 1 with `CODE: ...` on stderr; returns stderr.
    #[track_caller]
    fn failure(&self, code: &str, what: &str) -> &str {
        assert_eq!(self.code, Some(1), "{what}: {self:#?}");
        assert!(
            self.stderr.starts_with(&format!("{code}: ")),
            "{what}: expected {code}: {self:#?}"
        );
        &self.stderr
    }
}

/// Everything a test needs: the secrets namespace (in `c`), a separate agents namespace, one
/// agent on its Node with its Pod, and a home directory for the CLI (no dev.json, no
/// ~/.kube/config).
struct Setup {
    c: Cluster,
    agents: TestEnv,
    agent: Agent,
    pod: String,
    home: tempfile::TempDir,
}

/// What [`Setup::delivered`] adds: the operator, serving the webhook, the nodes' deliveries and
/// their carried writes.
struct Carrier {
    hook: webhook::Webhook,
    operator: cluster::Operator,
    scratch: tempfile::TempDir,
}

impl Setup {
    async fn new(hint: &str) -> Setup {
        let c = Cluster::new(hint).await;
        let agent = c.agent_on("x", &[], agent_ip()).await;
        Setup::around(c, agent, hint).await
    }

    /// As the chart runs it with the webhook: the agent on deliveries with its own identity, no
    /// master keyring, its writes carried by the operator. Run it alone (`cluster::exclusive`):
    /// the operator's Service for agents lives in the shared agent namespace.
    async fn delivered(hint: &str) -> (Setup, Carrier) {
        let c = Cluster::new(hint).await;
        let node = c.node("x", &[]).await;
        let (_, hook, operator) = agent_identity::operator_for_agents(&c, &node).await;
        let scratch = tempfile::tempdir().unwrap();
        let agent = agent_identity::delivered_agent(&c, &node, scratch.path(), agent_ip()).await;
        let setup = Setup::around(c, agent, hint).await;
        (
            setup,
            Carrier {
                hook,
                operator,
                scratch,
            },
        )
    }

    async fn around(c: Cluster, agent: Agent, hint: &str) -> Setup {
        let agents = control_plane::test_env(&format!("{hint}-agents")).await;
        let pod = agent_pod(&c.client(), &agents.namespace, &agent, true).await;
        // A leftover of a rolling update on the same Node, Pending: never chosen.
        agent_pod(&c.client(), &agents.namespace, &agent, false).await;
        for role in ["claw-secrets-invoker", "claw-secrets-editor"] {
            apply_cluster_role(&c.client(), role).await;
        }
        let home = tempfile::Builder::new()
            .prefix("claw-invoke-home-")
            .tempdir()
            .expect("temp dir");
        Setup {
            c,
            agents,
            agent,
            pod,
            home,
        }
    }

    fn ns(&self) -> &str {
        self.c.ns()
    }

    fn node(&self) -> &str {
        &self.agent.node
    }

    /// A ServiceAccount of the secrets namespace: its token and a kubeconfig using it.
    async fn service_account(&self, name: &str) -> (String, PathBuf) {
        let token = cluster::service_account_token(&self.c.client(), self.ns(), name).await;
        let kubeconfig = kubeconfig_for(self.home.path(), name, &token);
        (token, kubeconfig)
    }

    /// The deployer ServiceAccount, with the invoker role where the agents run and the editor
    /// role where its secrets live: its token and a kubeconfig using it.
    async fn deployer(&self) -> (String, PathBuf) {
        let client = self.c.client();
        let (token, kubeconfig) = self.service_account("deployer").await;
        let subject = || self.sa_subject("deployer");
        bind(
            &client,
            &self.agents.namespace,
            "claw-secrets-invoker",
            subject(),
        )
        .await;
        bind(&client, self.ns(), "claw-secrets-editor", subject()).await;
        (token, kubeconfig)
    }

    fn sa_subject(&self, name: &str) -> Subject {
        cluster::service_account_subject(self.ns(), name)
    }

    /// `claw-secrets ARGS` with `KUBECONFIG=kubeconfig` (if any), the agents' namespace in
    /// `CLAW_SECRETS_AGENT_NAMESPACE`, the test CA in `CLAW_SECRETS_CA_FILE`, and `env`; nothing else from this process's environment
    /// that the CLI reads.
    fn cli(&self, kubeconfig: Option<&Path>, env: &[(&str, &str)], args: &[&str]) -> Run {
        let mut cmd = Command::new(BIN);
        cmd.arg("invoke")
            .args(args)
            .env("HOME", self.home.path())
            .env("XDG_CONFIG_HOME", self.home.path().join("config"))
            .env("CLAW_SECRETS_AGENT_NAMESPACE", &self.agents.namespace)
            // Agents answer over HTTPS, with certificates from the test CA.
            .env("CLAW_SECRETS_CA_FILE", &cluster::test_ca().file)
            .env_remove("KUBECONFIG")
            .env_remove("CLAW_SECRETS_ADDR")
            .env_remove("CLAW_SECRETS_TOKEN")
            .stdin(Stdio::null());
        if let Some(kc) = kubeconfig {
            cmd.env("KUBECONFIG", kc);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("running claw-secrets invoke");
        Run {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// `invoke <this node> COMMAND PARAMS` through the API server as the user of `kubeconfig`.
    fn via_proxy(&self, kubeconfig: &Path, command: &str, params: &Value) -> Run {
        self.cli(
            Some(kubeconfig),
            &[],
            &[self.node(), command, &params.to_string()],
        )
    }

    async fn cleanup(self) {
        let Setup {
            c, agents, agent, ..
        } = self;
        drop(agent);
        agents.cleanup().await;
        c.cleanup().await;
    }
}

/// `dir/<name>.kubeconfig`, authenticating with `token` to the test cluster.
fn kubeconfig_for(dir: &Path, name: &str, token: &str) -> PathBuf {
    let admin = control_plane::control_plane().kubeconfig();
    tokens::kubeconfig_with_token(admin, token, &dir.join(format!("{name}.kubeconfig")))
}

/// Whether a log was written at debug level or finer (so a canary check of it means something).
fn logged_finely(log: &str) -> bool {
    log.lines()
        .any(|l| l.contains(" DEBUG ") || l.contains(" TRACE "))
}

fn audited(agent: &Agent, subject: &str, command: &str, decision: &str, name: &str) -> bool {
    agent.audit().iter().any(|r| {
        r["subject"] == json!(subject)
            && r["command"] == json!(command)
            && r["decision"] == json!(decision)
            && r["name"] == json!(name)
    })
}

// ---------------------------------------------------------------------------------------------
// Through the API server
// ---------------------------------------------------------------------------------------------

/// "node.invoke plaintext never reaches the API server or a log", at trace level everywhere:
/// the CLI, the agent that seals the writes, an agent that mirrors them and the operator that
/// reconciles the objects they make all log everything this crate can log. Two canaries are
/// written through the API server's pod proxy (create, rotate, and refused writes that carry
/// them), read back where they belong (the authorized `secret.get`), and then looked for in
/// every encoding in: the CLI's output of every other call, the three processes' logs, both
/// agents' data dirs (store, audit log), the objects as the API server serves them (annotations,
/// managedFields, status), the namespace's Events, and every file of etcd's data directory.
#[tokio::test]
async fn node_invoke_plaintext_reaches_no_log_object_or_etcd() {
    // Alone: as the chart runs them, the agents reach the operator through a Service in the
    // shared agent namespace.
    let _lock = cluster::exclusive().await;
    let test = "node_invoke_plaintext_reaches_no_log_object_or_etcd";
    let etcd_data = control_plane::local_control_plane(test)
        .state_dir()
        .expect("a local control plane has a state dir")
        .join("etcd-data");
    // The writing agent and the mirror on deliveries, the operator carrying their writes: the
    // plaintext crosses the agent, the API server's proxy (sealed to the cluster's key) and the
    // operator.
    let (mut s, carrier) = Setup::delivered("canary").await;
    let ns = s.ns().to_owned();
    let client = s.c.client();
    let (token, kubeconfig) = s.deployer().await;
    let mirror_node = s.c.node("m", &[]).await;
    let mut mirror = agent_identity::delivered_agent(
        &s.c,
        &mirror_node,
        carrier.scratch.path(),
        std::net::Ipv4Addr::LOCALHOST.into(),
    )
    .await;
    let operator = &carrier.operator;
    let (first, second) = (canary::canary("canary-a"), canary::canary("canary-b"));
    let canaries = Canaries::of([first.clone(), second.clone()]);
    // Each call with an idempotency key, so that the object carries remembered writes too.
    let invoke = |command: &str, params: Value| {
        let key = format!("canary-{}", random_hex(4));
        s.cli(
            Some(&kubeconfig),
            &[("CLAW_SECRETS_LOG", "trace")],
            &[
                s.node(),
                command,
                &params.to_string(),
                "--idempotency-key",
                &key,
            ],
        )
    };
    let name = "canary.token";
    let mut outputs: Vec<(String, String)> = Vec::new();
    let created = invoke(
        "secret.create",
        json!({ "name": name, "namespace": ns, "data": { "token": first } }),
    );
    created.payload("secret.create through the API server");
    outputs.push((
        "create".into(),
        format!("{}{}", created.stdout, created.stderr),
    ));
    let rotated = invoke(
        "secret.rotate",
        json!({ "name": name, "namespace": ns, "newData": { "token": second } }),
    );
    assert_eq!(rotated.payload("secret.rotate")["version"], json!(2));
    outputs.push((
        "rotate".into(),
        format!("{}{}", rotated.stdout, rotated.stderr),
    ));
    for (what, command, params) in [
        (
            "create again",
            "secret.create",
            json!({ "name": name, "namespace": ns, "data": { "token": first } }),
        ),
        (
            "rotate a missing secret",
            "secret.rotate",
            json!({ "name": "canary.missing", "namespace": ns, "newData": { "token": second } }),
        ),
        (
            "data that is not an object",
            "secret.create",
            json!({ "name": "canary.bad", "namespace": ns, "data": first }),
        ),
        (
            "a value that is not a string",
            "secret.create",
            json!({ "name": "canary.bad", "namespace": ns, "data": { "token": [second] } }),
        ),
    ] {
        let run = invoke(command, params);
        assert_eq!(run.code, Some(1), "{what}: {run:#?}");
        outputs.push((what.into(), format!("{}{}", run.stdout, run.stderr)));
    }

    // Where the value belongs: the authorized read, through the proxy and on the mirror.
    let got = invoke("secret.get", json!({ "name": name, "namespace": ns }));
    assert_eq!(got.payload("secret.get")["data"]["token"], json!(second));
    outputs.push(("get (stderr)".into(), got.stderr.clone()));
    eventually("the mirror to serve version 2", || async {
        let reply = mirror.get_secret(&token, &ns, name).await;
        match reply.result() {
            Ok(p) if p["version"] == json!(2) && p["data"]["token"] == json!(second) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // The operator has reconciled the object the agent wrote.
    let secrets = s.c.secrets();
    eventually("the operator to report the secret Ready", || async {
        let obj = secrets.get(name).await.map_err(|e| e.to_string())?;
        let ready = obj
            .status
            .as_ref()
            .and_then(|st| st.conditions.iter().find(|c| c.type_ == "Ready"))
            .is_some_and(|c| c.status == "True");
        if ready {
            Ok(())
        } else {
            Err(format!("{:?}", obj.status))
        }
    })
    .await;

    // Everything flushed: the agents stop (their queued audit records are written).
    s.agent.terminate();
    mirror.terminate();
    for (what, output) in &outputs {
        canaries.assert_absent(&format!("CLI output ({what})"), output.as_bytes());
    }
    assert!(
        logged_finely(&got.stderr),
        "the CLI did not log at trace: {}",
        got.stderr
    );
    let logs = [
        (
            "the sealing agent's log",
            std::fs::read_to_string(s.agent.log_path()).unwrap(),
        ),
        (
            "the mirror's log",
            std::fs::read_to_string(mirror.log_path()).unwrap(),
        ),
        ("the operator's log", operator.log_text()),
    ];
    for (what, log) in &logs {
        assert!(logged_finely(log), "{what} is not at trace level:\n{log}");
        canaries.assert_absent(what, log.as_bytes());
    }
    for agent in [&s.agent, &mirror] {
        let files = canaries.assert_absent_under(&agent.data_dir());
        files::assert_holds_audit_and_secrets(&files);
    }
    // The operator's data dir: the audit log of the writes it carried.
    let carried = canaries.assert_absent_under(&operator.data_dir());
    assert!(
        carried.iter().any(|f| f.ends_with("audit.log")),
        "{carried:?}"
    );
    let stored = secrets.get(name).await.unwrap();
    // Writes are attributed: the operator made them (carried for the agent, with the caller's
    // token), and wrote the status.
    let managers: Vec<(String, Option<String>)> = stored
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| (m.manager.clone().unwrap_or_default(), m.subresource.clone()))
        .collect();
    for expected in [
        ("claw-secrets-operator".to_owned(), None),
        (
            "claw-secrets-operator".to_owned(),
            Some("status".to_owned()),
        ),
    ] {
        assert!(
            managers.contains(&expected),
            "{expected:?} not in {managers:?}"
        );
    }
    let object = serde_json::to_string(&stored).unwrap();
    assert!(
        object.contains("managedFields") && object.contains("clawbernetes.io/writes"),
        "{object}"
    );
    canaries.assert_absent("the ClawSecret as served", object.as_bytes());
    let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), &ns);
    let events = serde_json::to_string(&events.list(&Default::default()).await.unwrap()).unwrap();
    canaries.assert_absent("the namespace's Events", events.as_bytes());
    let files = canaries.assert_absent_under(&etcd_data);
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "wal")),
        "etcd's write-ahead log is under {}: {files:?}",
        etcd_data.display()
    );
    println!(
        "CANARY: 2 canaries x {} forms not found in {} CLI outputs, 3 trace logs, 3 data dirs, \
         the object, its Events, and {} files of etcd's data dir",
        canaries.forms(),
        outputs.len(),
        files.len()
    );
    drop(mirror);
    let Carrier { hook, operator, .. } = carrier;
    drop(operator);
    hook.remove().await;
    s.cleanup().await;
}

#[tokio::test]
async fn invoke_goes_through_the_api_server_as_the_caller() {
    let _lock = cluster::shared().await;
    let s = Setup::new("proxy").await;
    let ns = s.ns().to_owned();

    // The deployer ServiceAccount: the invoker role where the agents run, the editor role where
    // its secrets live.
    let (token, kubeconfig) = s.deployer().await;
    let subject = format!("system:serviceaccount:{ns}:deployer");

    let data = json!({ "password": format!("pw-{}", random_hex(8)) });
    let created = s
        .via_proxy(
            &kubeconfig,
            "secret.create",
            &json!({ "name": "db.password", "namespace": ns, "data": data,
                     "allowed_workloads": ["deployer"] }),
        )
        .payload("secret.create through the API server");
    assert_eq!(created["version"], json!(1), "{created}");
    assert!(
        s.c.secrets()
            .get_opt("db.password")
            .await
            .unwrap()
            .is_some(),
        "the agent created the ClawSecret"
    );
    let got = eventually("secret.get through the API server", || async {
        let run = s.via_proxy(
            &kubeconfig,
            "secret.get",
            &json!({ "name": "db.password", "namespace": ns }),
        );
        if run.code == Some(0) {
            Ok(run.payload("secret.get"))
        } else {
            Err(format!("{run:?}"))
        }
    })
    .await;
    assert_eq!(got["data"], data, "{got}");
    assert_eq!(got["version"], json!(1), "{got}");

    // The agent saw the caller, not the API server and not itself.
    assert!(
        audited(&s.agent, &subject, "secret.create", "allow", "db.password"),
        "audit log: {:#?}",
        s.agent.audit()
    );
    assert!(audited(
        &s.agent,
        &subject,
        "secret.get",
        "allow",
        "db.password"
    ));

    // --addr still goes straight to the agent, kubeconfig or not.
    let direct = s.cli(
        Some(&kubeconfig),
        &[],
        &[
            s.node(),
            "secret.get",
            &json!({ "name": "db.password", "namespace": ns }).to_string(),
            "--addr",
            &s.agent.addr(),
            "--token",
            &token,
        ],
    );
    assert_eq!(direct.payload("secret.get with --addr")["data"], data);
    // So does $CLAW_SECRETS_ADDR.
    let direct = s.cli(
        Some(&kubeconfig),
        &[
            ("CLAW_SECRETS_ADDR", &s.agent.addr()),
            ("CLAW_SECRETS_TOKEN", &token),
        ],
        &[
            s.node(),
            "secret.list",
            &json!({ "namespace": ns }).to_string(),
        ],
    );
    assert_eq!(
        direct.payload("secret.list with CLAW_SECRETS_ADDR")["secrets"][0]["name"],
        json!("db.password")
    );

    // --kubeconfig and --agent-namespace as flags instead of the environment.
    let run = s.cli(
        None,
        &[("CLAW_SECRETS_AGENT_NAMESPACE", "")],
        &[
            s.node(),
            "secret.list",
            &json!({ "namespace": ns }).to_string(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--agent-namespace",
            &s.agents.namespace,
        ],
    );
    assert_eq!(
        run.payload("secret.list with --kubeconfig")["secrets"][0]["name"],
        json!("db.password")
    );

    // A Node without an agent.
    let missing = format!("node-nowhere-{}", s.c.suffix());
    let run = s.cli(
        Some(&kubeconfig),
        &[],
        &[&missing, "secret.get", r#"{"name":"db.password"}"#],
    );
    let err = run.failure("NOT_FOUND", "a Node without an agent");
    assert!(
        err.contains(&format!("no claw-secrets agent on node \"{missing}\"")),
        "{err}"
    );
    // Not a Node name at all: a usage error.
    let run = s.cli(Some(&kubeconfig), &[], &["Node_X", "secret.list"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(run.stderr.contains("not a Node name"), "{run:?}");

    // The agent's port, wrong: the API server cannot reach it.
    let run = s.cli(
        Some(&kubeconfig),
        &[],
        &[s.node(), "secret.list", "{}", "--agent-port", "1"],
    );
    let err = run.failure("UNAVAILABLE", "a wrong --agent-port");
    assert!(
        err.contains(&s.pod) && err.contains("could not reach"),
        "{err}"
    );

    // An admin kubeconfig with a client certificate has no token to forward: say what to do.
    let admin = control_plane::control_plane().kubeconfig();
    let run = s.cli(Some(admin), &[], &[s.node(), "secret.list"]);
    assert_eq!(run.code, Some(2), "{run:?}");
    assert!(
        run.stderr.contains("client certificate") && run.stderr.contains("--token"),
        "{run:?}"
    );
    // With a token for the agent it works: the API server lets the admin through, the agent
    // authorizes the token's owner.
    let run = s.cli(
        Some(admin),
        &[("CLAW_SECRETS_TOKEN", &token)],
        &[
            s.node(),
            "secret.get",
            &json!({ "name": "db.password", "namespace": ns }).to_string(),
        ],
    );
    assert_eq!(
        run.payload("admin kubeconfig + CLAW_SECRETS_TOKEN")["data"],
        data
    );

    s.cleanup().await;
}

#[tokio::test]
async fn the_api_server_and_the_agent_each_refuse_callers_without_rights() {
    let _lock = cluster::shared().await;
    let s = Setup::new("proxy-deny").await;
    let ns = s.ns().to_owned();
    let client = s.c.client();
    let agents_ns = s.agents.namespace.clone();

    // A secret only `deployer` may read, created directly on the agent.
    let (deployer, _) = s.service_account("deployer").await;
    bind(
        &client,
        &ns,
        "claw-secrets-editor",
        s.sa_subject("deployer"),
    )
    .await;
    let data = json!({ "token": format!("t-{}", random_hex(8)) });
    s.agent
        .invoke(
            Some(&deployer),
            "secret.create",
            json!({ "name": "api.token", "namespace": ns, "data": data,
                    "allowed_workloads": ["deployer"] }),
        )
        .await
        .payload("secret.create directly");
    let get = json!({ "name": "api.token", "namespace": ns });

    // No rights in the agents' namespace at all: finding the agent is refused.
    let (stranger_token, stranger) = s.service_account("stranger").await;
    bind(
        &client,
        &ns,
        "claw-secrets-editor",
        s.sa_subject("stranger"),
    )
    .await;
    let run = s.via_proxy(&stranger, "secret.get", &get);
    let err = run.failure("PERMISSION_DENIED", "no pods list");
    assert!(
        err.contains("`list` on `pods`") && err.contains("claw-secrets-invoker"),
        "{err}"
    );
    assert!(
        !run.stderr.contains(&stranger_token),
        "the token is never printed"
    );

    // May list pods but not use the proxy: the API server refuses the call itself, and the
    // agent never hears of it.
    let (_, lister) = s.service_account("lister").await;
    grant_pod_list(&client, &agents_ns, s.sa_subject("lister")).await;
    bind(&client, &ns, "claw-secrets-editor", s.sa_subject("lister")).await;
    let run = s.via_proxy(&lister, "secret.get", &get);
    let err = run.failure("PERMISSION_DENIED", "no pods/proxy");
    assert!(
        err.contains("pods/proxy") && err.contains("the API server refused"),
        "{err}"
    );
    let lister_subject = format!("system:serviceaccount:{ns}:lister");
    assert!(
        !s.agent
            .audit()
            .iter()
            .any(|r| r["subject"] == json!(lister_subject)),
        "the agent was never called"
    );

    // May reach the agent, but has no rights on clawsecrets: the agent refuses, on the caller's
    // identity (the agent itself could read and write all of it).
    let (intruder_token, intruder) = s.service_account("intruder").await;
    bind(
        &client,
        &agents_ns,
        "claw-secrets-invoker",
        s.sa_subject("intruder"),
    )
    .await;
    let intruder_subject = format!("system:serviceaccount:{ns}:intruder");
    let run = s.via_proxy(&intruder, "secret.get", &get);
    let err = run.failure("PERMISSION_DENIED", "intruder reads");
    assert!(err.contains(&intruder_subject), "{err}");
    assert!(!run.stdout.contains(data["token"].as_str().unwrap()));
    assert!(
        !run.stderr.contains(&intruder_token),
        "the token is never printed"
    );
    let run = s.via_proxy(
        &intruder,
        "secret.create",
        &json!({ "name": "planted", "namespace": ns, "data": { "k": "v" } }),
    );
    run.failure("PERMISSION_DENIED", "intruder writes");
    assert!(s.c.secrets().get_opt("planted").await.unwrap().is_none());
    assert!(
        audited(
            &s.agent,
            &intruder_subject,
            "secret.get",
            "deny",
            "api.token"
        ),
        "audit log: {:#?}",
        s.agent.audit()
    );
    assert!(audited(
        &s.agent,
        &intruder_subject,
        "secret.create",
        "deny",
        "planted"
    ));

    // A human (static token user) with the invoker role and nothing else: the same.
    let alice_token = s.c.user_token("alice");
    let alice = kubeconfig_for(s.home.path(), "alice", &alice_token);
    bind(
        &client,
        &agents_ns,
        "claw-secrets-invoker",
        cluster::user_subject("alice"),
    )
    .await;
    let run = s.via_proxy(&alice, "secret.get", &get);
    let err = run.failure("PERMISSION_DENIED", "alice reads");
    assert!(
        err.contains("alice may not read secret \"api.token\""),
        "{err}"
    );
    assert!(audited(
        &s.agent,
        "alice",
        "secret.get",
        "deny",
        "api.token"
    ));

    // The owner reads it through the proxy once it has the invoker role too.
    bind(
        &client,
        &agents_ns,
        "claw-secrets-invoker",
        s.sa_subject("deployer"),
    )
    .await;
    let deployer_kc = kubeconfig_for(s.home.path(), "deployer", &deployer);
    let got = eventually("deployer's secret.get through the API server", || async {
        let run = s.via_proxy(&deployer_kc, "secret.get", &get);
        if run.code == Some(0) {
            Ok(run.payload("secret.get"))
        } else {
            Err(format!("{run:?}"))
        }
    })
    .await;
    assert_eq!(got["data"], data);

    s.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// Latency (printed, never asserted)
// ---------------------------------------------------------------------------------------------

fn median_ms(samples: &mut [Duration]) -> String {
    samples.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    format!(
        "median {:.1} ms, min {:.1} ms, max {:.1} ms (n={})",
        ms(samples[samples.len() / 2]),
        ms(samples[0]),
        ms(samples[samples.len() - 1]),
        samples.len()
    )
}

#[tokio::test]
async fn latency_of_invoke_through_the_api_server_and_directly() {
    let _lock = cluster::exclusive().await;
    let s = Setup::new("proxy-latency").await;
    let ns = s.ns().to_owned();
    let (token, kubeconfig) = s.deployer().await;
    s.agent
        .invoke(
            Some(&token),
            "secret.create",
            json!({ "name": "bench", "namespace": ns, "data": { "k": "v" } }),
        )
        .await
        .payload("secret.create");
    let params = json!({ "name": "bench", "namespace": ns });
    eventually("the secret on the agent", || async {
        s.agent
            .get_secret(&token, &ns, "bench")
            .await
            .result()
            .map(|_| ())
    })
    .await;

    // In process: one request, the Pod already found, connections kept alive.
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).unwrap(),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .unwrap();
    let user_client = kube::Client::try_from(config).unwrap();
    let locator = claw_secrets::k8s::proxy::AgentLocator {
        namespace: s.agents.namespace.clone(),
        ..Default::default()
    };
    let started = Instant::now();
    let pod = claw_secrets::k8s::proxy::find_agent(&user_client, s.node(), &locator)
        .await
        .expect("the agent pod");
    let find = started.elapsed();
    assert_eq!(pod.name, s.pod);
    let body = serde_json::to_vec(&json!({
        "nodeId": s.node(), "command": "secret.get", "params": params,
    }))
    .unwrap();
    let direct = claw_secrets::invoke::InvokeClient::new(
        &s.agent.addr(),
        s.node(),
        &token,
        claw_secrets::invoke::ClientTimeouts::default(),
        &claw_secrets::invoke::ClientTls {
            ca_file: Some(cluster::test_ca().file.clone()),
            server_name: None,
        },
    )
    .unwrap();
    let (mut proxied, mut straight) = (Vec::new(), Vec::new());
    for i in 0..60 {
        let t = Instant::now();
        let resp = claw_secrets::k8s::proxy::post_invoke(&user_client, &pod, &token, body.clone())
            .await
            .expect("through the proxy");
        let d = t.elapsed();
        assert_eq!(resp["ok"], json!(true), "{resp}");
        let t = Instant::now();
        let (status, _) = direct.post(body.clone()).await.expect("direct");
        let e = t.elapsed();
        assert_eq!(status, 200);
        if i >= 10 {
            proxied.push(d);
            straight.push(e);
        }
    }
    println!(
        "LATENCY: in process, secret.get through the API server's pod proxy: {}",
        median_ms(&mut proxied)
    );
    println!(
        "LATENCY: in process, secret.get straight to the agent: {}",
        median_ms(&mut straight)
    );
    println!(
        "LATENCY: in process, finding the agent pod (one pods list): {:.1} ms",
        find.as_secs_f64() * 1000.0
    );

    // The CLI, end to end (a process, the kubeconfig, the pods list, the proxied call).
    let (mut cli_proxy, mut cli_direct) = (Vec::new(), Vec::new());
    for _ in 0..11 {
        let t = Instant::now();
        s.via_proxy(&kubeconfig, "secret.get", &params)
            .payload("secret.get through the API server");
        cli_proxy.push(t.elapsed());
        let t = Instant::now();
        s.cli(
            None,
            &[],
            &[
                s.node(),
                "secret.get",
                &params.to_string(),
                "--addr",
                &s.agent.addr(),
                "--token",
                &token,
            ],
        )
        .payload("secret.get with --addr");
        cli_direct.push(t.elapsed());
    }
    println!(
        "LATENCY: claw-secrets invoke (whole CLI run) through the API server: {}",
        median_ms(&mut cli_proxy)
    );
    println!(
        "LATENCY: claw-secrets invoke (whole CLI run) with --addr: {}",
        median_ms(&mut cli_direct)
    );

    s.cleanup().await;
}
