//! The Helm chart (`charts/claw-secrets`) and the examples (`examples/`), with the real `helm`
//! and `kubectl` against a real kube-apiserver (docs/control-plane.md):
//!
//! - without a cluster: the chart's CRDs are the repository's, byte for byte; `helm lint` and
//!   `helm template` pass with the defaults and with every option set
//!   (`charts/claw-secrets/ci/all-options-values.yaml`); the schema refuses misspelt keys at
//!   every level; every value is documented; the rendered pods are hardened, get the flags the
//!   binary takes and one master key name; the admission webhook's configuration sends only
//!   ClawSecret writes carrying data, to a Service and port that match the operator's, with the
//!   certificate flags of its mode (managed, cert-manager, off); the chart's RBAC is
//!   `deploy/rbac/` exactly; the agent's init container prepares a data dir for real.
//! - with the API server: every object of the every-option rendering is accepted by a
//!   server-side dry run, the ServiceMonitor included (the test control plane serves its CRD;
//!   a cluster without it fails the test), cert-manager's objects only where its CRDs are
//!   served; `helm install` of a release, then the operator and an
//!   agent run as local processes with the tokens of the ServiceAccounts the chart created and
//!   the flags and environment its Deployment and DaemonSet give them: a ClawSecret is sealed,
//!   node.invoke creates, reads, rotates and deletes, and what lies outside their roles is
//!   refused; `kubectl apply -f examples/` and each example reaching Ready; `helm upgrade` to an
//!   existing master key Secret and `helm uninstall`, leaving only what is kept by design
//!   (that release without the webhook: its operator is a local process, out of the webhook
//!   Service's reach); then a release with the webhook, whose operator writes its CA into the
//!   configuration's caBundle, which `helm upgrade` keeps, and which, with no replica
//!   reachable, refuses ClawSecrets carrying data and lets every other write through.
//!
//! Not proven here (no container runtime, no kubelet): that the image runs, that pods start,
//! that the probes, hostPath, hostPort, securityContext and NetworkPolicy behave on a node, that
//! the API server reaches the webhook through its Service. `tests/k8s_node.rs` and
//! `hack/kind-e2e.sh` are the path for those.

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

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

use cluster::bind_cluster_role as bind;
use process::{free_port, http_get};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::RoleBinding;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};

use claw_secrets::k8s::crd::{ClawConfig, ClawSecret};
use cluster::BIN;
use random::random_hex;
use tools::{Run, helm, kubectl, must};
use wait::{PATIENCE, eventually};

// ---------------------------------------------------------------------------------------------
// Paths, tools and commands
// ---------------------------------------------------------------------------------------------

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn chart() -> PathBuf {
    repo().join("charts/claw-secrets")
}

fn all_options() -> PathBuf {
    chart().join("ci/all-options-values.yaml")
}

/// `helm template RELEASE charts/claw-secrets -n NAMESPACE --skip-tests EXTRA...`: what an
/// install creates (the `helm test` hooks are created by `helm test` only).
fn template(release: &str, namespace: &str, extra: &[&str]) -> Run {
    let chart = chart();
    let mut args = vec![
        "template",
        release,
        chart.to_str().expect("utf-8 path"),
        "--namespace",
        namespace,
        "--skip-tests",
    ];
    args.extend_from_slice(extra);
    helm(&args)
}

#[track_caller]
fn render(release: &str, namespace: &str, extra: &[&str]) -> Vec<Value> {
    docs(&must(
        template(release, namespace, extra),
        &format!("helm template {extra:?}"),
    ))
}

// ---------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------

/// The documents of a YAML stream, as JSON values (empty documents dropped).
fn docs(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap_or_else(|e| panic!("not YAML: {e}\n{yaml}"))
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

/// (kind, namespace or "", name) of an object.
type Id = (String, String, String);

fn id(v: &Value) -> Id {
    let s = |p: &str| {
        v.pointer(p)
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned()
    };
    (s("/kind"), s("/metadata/namespace"), s("/metadata/name"))
}

fn ids(objects: &[Value]) -> BTreeSet<Id> {
    objects.iter().map(id).collect()
}

#[track_caller]
fn the<'a>(objects: &'a [Value], kind: &str) -> &'a Value {
    let found: Vec<&Value> = objects.iter().filter(|o| o["kind"] == kind).collect();
    assert_eq!(found.len(), 1, "expected one {kind}, found {}", found.len());
    found[0]
}

#[track_caller]
fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} among {:?}", ids(objects)))
}

fn pod_spec(workload: &Value) -> &Value {
    &workload["spec"]["template"]["spec"]
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|s| s.as_str().expect("a string").to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// The value of `--flag=VALUE` in `args`.
#[track_caller]
fn flag(args: &[String], name: &str) -> String {
    let prefix = format!("{name}=");
    args.iter()
        .find_map(|a| a.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name}=... in {args:?}"))
        .to_owned()
}

/// The command line and environment a container of the chart would run with, for a local
/// process: `--flag=` values replaced as given (each must be in the chart's args), `extra`
/// appended, and the downward API's fields filled in from `downward`.
#[track_caller]
fn local_command(
    container: &Value,
    replace: &[(&str, String)],
    extra: &[String],
    downward: &BTreeMap<&str, String>,
) -> (Vec<String>, Vec<(String, String)>) {
    let mut args = strings(&container["args"]);
    for (name, value) in replace {
        let prefix = format!("{name}=");
        let arg = args
            .iter_mut()
            .find(|a| a.starts_with(&prefix))
            .unwrap_or_else(|| panic!("the chart does not pass {name}: {:?}", container["args"]));
        *arg = format!("{name}={value}");
    }
    args.extend(extra.iter().cloned());
    let env = container["env"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            let name = e["name"].as_str().expect("env name").to_owned();
            let value = if let Some(v) = e["value"].as_str() {
                v.to_owned()
            } else {
                let path = e["valueFrom"]["fieldRef"]["fieldPath"]
                    .as_str()
                    .unwrap_or_else(|| panic!("env {name}: neither value nor fieldRef: {e}"));
                downward
                    .get(path)
                    .unwrap_or_else(|| panic!("env {name}: no test value for field {path}"))
                    .clone()
            };
            (name, value)
        })
        .collect();
    (args, env)
}

// ---------------------------------------------------------------------------------------------
// Without a cluster: the chart's files and what it renders
// ---------------------------------------------------------------------------------------------

/// The chart installs and upgrades the CRDs from templates (files/crds.yaml, a copy of
/// crds/crds.yaml), kept on uninstall; crds.install=false leaves them out. No crds/ directory:
/// Helm would install that once and never upgrade it.
#[test]
fn chart_crds_are_the_repository_crds() {
    assert!(
        !chart().join("crds").exists(),
        "charts/claw-secrets/crds/ would be installed once and never upgraded by Helm"
    );
    let ours = std::fs::read(chart().join("files/crds.yaml")).expect("chart CRDs");
    let theirs = std::fs::read(repo().join("crds/crds.yaml")).expect("repository CRDs");
    assert!(
        ours == theirs,
        "charts/claw-secrets/files/crds.yaml differs from crds/crds.yaml: copy it \
         (`cp crds/crds.yaml charts/claw-secrets/files/crds.yaml`) and commit both"
    );
    let rendered: Vec<Value> = render("claw-secrets", "claw-secrets", &[])
        .into_iter()
        .filter(|o| o["kind"] == "CustomResourceDefinition")
        .collect();
    assert_eq!(rendered, docs(&String::from_utf8(theirs).unwrap()));
    for crd in &rendered {
        assert_eq!(
            crd["metadata"]["annotations"]["helm.sh/resource-policy"], "keep",
            "helm uninstall must not delete the CRDs (and every object with them)"
        );
    }
    let off = render(
        "claw-secrets",
        "claw-secrets",
        &["--set", "crds.install=false"],
    );
    assert!(!off.iter().any(|o| o["kind"] == "CustomResourceDefinition"));
}

#[test]
fn chart_app_version_is_the_crate_version() {
    let chart: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart().join("Chart.yaml")).unwrap())
            .expect("Chart.yaml");
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "claw-secrets");
    assert_eq!(
        chart["appVersion"],
        env!("CARGO_PKG_VERSION"),
        "Chart.yaml appVersion must be the crate version (Cargo.toml)"
    );
}

#[test]
fn lint_and_template_pass_with_defaults_and_every_option() {
    let chart = chart();
    let chart = chart.to_str().unwrap();
    let options = all_options();
    let options = options.to_str().unwrap();
    must(helm(&["lint", "--strict", chart]), "helm lint (defaults)");
    must(
        helm(&["lint", "--strict", chart, "-f", options]),
        "helm lint (every option)",
    );

    let defaults = render("claw-secrets", "claw-secrets", &[]);
    let kinds: BTreeSet<&str> = defaults
        .iter()
        .map(|o| o["kind"].as_str().unwrap())
        .collect();
    assert_eq!(
        kinds,
        BTreeSet::from([
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Role",
            "RoleBinding",
            "Service",
            "DaemonSet",
            "Deployment",
            "MutatingWebhookConfiguration",
            "ValidatingAdmissionPolicy",
            "ValidatingAdmissionPolicyBinding",
            "CustomResourceDefinition",
        ]),
        "what the defaults create (no ServiceMonitor, no NetworkPolicy, no cert-manager objects)"
    );

    let every = render("r", "ops", &["-f", options]);
    the(&every, "ServiceMonitor");
    let policies: Vec<&Value> = every
        .iter()
        .filter(|o| o["kind"] == "NetworkPolicy")
        .collect();
    assert_eq!(policies.len(), 2, "agent and operator NetworkPolicies");
    let operator_policy = named(&every, "NetworkPolicy", "claw-all-operator");
    assert_eq!(
        operator_policy["spec"]["ingress"][1],
        json!({"ports": [{"port": "webhook", "protocol": "TCP"}]}),
        "the webhook from anywhere (the API server), on its port only"
    );
    let monitor = the(&every, "ServiceMonitor");
    assert_eq!(monitor["metadata"]["labels"]["release"], "prometheus");
    assert_eq!(monitor["spec"]["endpoints"][0]["port"], "metrics");
    let agent = the(&every, "DaemonSet");
    let operator = the(&every, "Deployment");
    for workload in [agent, operator] {
        let spec = pod_spec(workload);
        assert_eq!(
            spec["containers"][0]["image"],
            "registry.example.com/mirror/claw-secrets@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        );
        assert_eq!(spec["imagePullSecrets"], json!([{"name": "regcred"}]));
        assert_eq!(spec["securityContext"]["runAsUser"], 10001);
        assert!(spec["tolerations"].is_array() && spec["nodeSelector"].is_object());
        assert!(spec["affinity"].is_object() && spec["priorityClassName"].is_string());
    }
    assert_eq!(operator["spec"]["replicas"], 3);
    // webhook.*: port 9443, a 5 s timeout, cert-manager with the given ClusterIssuer (so no
    // self-signed Issuer).
    let op_container = &pod_spec(operator)["containers"][0];
    let op_args = strings(&op_container["args"]);
    assert_eq!(flag(&op_args, "--webhook-addr"), "0.0.0.0:9443");
    assert_eq!(
        flag(&op_args, "--webhook-cert-dir"),
        "/var/run/claw-secrets/webhook-tls"
    );
    assert_eq!(op_container["ports"][1]["containerPort"], 9443);
    let mwc = the(&every, "MutatingWebhookConfiguration");
    assert_eq!(mwc["webhooks"][0]["timeoutSeconds"], 5);
    assert_eq!(
        the(&every, "Certificate")["spec"]["issuerRef"],
        json!({"name": "cluster-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})
    );
    assert!(
        !every.iter().any(|o| o["kind"] == "Issuer"),
        "an issuer is given: no self-signed Issuer"
    );
    let agent_container = &pod_spec(agent)["containers"][0];
    assert_eq!(agent_container["ports"][0]["containerPort"], 7444);
    assert_eq!(agent_container["ports"][0]["hostPort"], 17443);
    let agent_args = strings(&agent_container["args"]);
    assert_eq!(flag(&agent_args, "--http-header-timeout"), "5s");
    assert_eq!(flag(&agent_args, "--http-body-timeout"), "20s");
    assert_eq!(flag(&agent_args, "--http-max-connections"), "2000");
    assert_eq!(flag(&agent_args, "--http-max-body-buffer-mib"), "16");
    // agent.gateway.*: also a node of the gateway, as the principal, whose tokens (and no other
    // account's) the agent may request, in the principal's namespace; the token and the CA
    // mounted read-only, the setup code from its Secret.
    assert_eq!(
        flag(&agent_args, "--gateway"),
        "wss://openclaw-gateway.openclaw.svc:18789"
    );
    assert_eq!(
        flag(&agent_args, "--gateway-principal"),
        "default/gateway-caller"
    );
    let by_name = |list: &Value, name: &str| {
        list.as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {list}"))
            .clone()
    };
    for (volume, file, item, source) in [
        (
            "gateway-token",
            flag(&agent_args, "--gateway-token-file"),
            "token",
            json!({"secret": {"secretName": "openclaw-gateway-token",
                              "items": [{"key": "token", "path": "token"}]}}),
        ),
        (
            "gateway-ca",
            flag(&agent_args, "--gateway-ca-file"),
            "ca.crt",
            json!({"configMap": {"name": "openclaw-gateway-ca",
                                 "items": [{"key": "ca.crt", "path": "ca.crt"}]}}),
        ),
    ] {
        let mount = by_name(&agent_container["volumeMounts"], volume);
        assert_eq!(mount["readOnly"], true, "{volume}");
        let dir = mount["mountPath"].as_str().unwrap();
        assert_eq!(file, format!("{dir}/{item}"), "{volume}");
        let mut expected = source;
        expected["name"] = json!(volume);
        assert_eq!(by_name(&pod_spec(agent)["volumes"], volume), expected);
    }
    assert!(
        agent_container["env"].as_array().unwrap().contains(&json!({
            "name": "CLAW_SECRETS_GATEWAY_SETUP_CODE",
            "valueFrom": {"secretKeyRef": {
                "name": "openclaw-node-setup-code", "key": "setupCode", "optional": true}}
        })),
        "the setup code from its Secret"
    );
    assert!(
        pod_spec(agent)["initContainers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .all(|a| !a.as_str().unwrap().starts_with("--gateway")),
        "the init container has nothing to do with the gateway"
    );
    let gateway_role = named(&every, "Role", "claw-all-agent-gateway");
    assert_eq!(gateway_role["metadata"]["namespace"], "default");
    assert_eq!(
        gateway_role["rules"],
        json!([{"apiGroups": [""], "resources": ["serviceaccounts/token"],
                "resourceNames": ["gateway-caller"], "verbs": ["create"]}])
    );
    let gateway_binding = named(&every, "RoleBinding", "claw-all-agent-gateway");
    assert_eq!(gateway_binding["metadata"]["namespace"], "default");
    assert_eq!(gateway_binding["roleRef"]["name"], "claw-all-agent-gateway");
    assert_eq!(
        gateway_binding["subjects"],
        json!([{"kind": "ServiceAccount", "name": "claw-all-agent", "namespace": "ops"}])
    );
    // Without a principal, or without a way to pair, or with a gateway key but no url: refused.
    for (sets, says) in [
        (
            vec!["agent.gateway.url=wss://gw.example:443"],
            "agent.gateway.principal is required with agent.gateway.url",
        ),
        (
            vec![
                "agent.gateway.url=wss://gw.example:443",
                "agent.gateway.principal=a/b",
            ],
            "needs agent.gateway.tokenSecret or agent.gateway.setupCodeSecret",
        ),
        (
            vec!["agent.gateway.tokenSecret=t"],
            "agent.gateway.tokenSecret needs agent.gateway.url",
        ),
        (
            vec![
                "agent.gateway.url=ws://gw.example:80",
                "agent.gateway.principal=a/b",
                "agent.gateway.tokenSecret=t",
                "agent.gateway.caConfigMap=ca",
            ],
            "agent.gateway.caConfigMap needs a wss://",
        ),
    ] {
        let mut extra = Vec::new();
        for set in &sets {
            extra.extend(["--set", set]);
        }
        let r = template("r", "ops", &extra);
        assert!(!r.ok && r.stderr.contains(says), "{sets:?}: {}", r.stderr);
    }
    assert_eq!(
        pod_spec(agent)["volumes"][0]["hostPath"]["path"],
        "/var/lib/claw-all"
    );
    assert!(
        !every
            .iter()
            .any(|o| o["metadata"]["name"] == "claw-all-editor"),
        "rbac.createUserRoles=false creates no user roles"
    );
    // hostPort 0: the port is not published on the node.
    let unpublished = render("r", "ops", &["--set", "agent.hostPort=0"]);
    let port = &pod_spec(the(&unpublished, "DaemonSet"))["containers"][0]["ports"][0];
    assert!(port.get("hostPort").is_none(), "{port}");
}

#[test]
fn schema_rejects_misspelt_values() {
    let typos: &[(&str, &str)] = &[
        ("operator.replicaCont=2", "replicaCont"),
        ("agent.hostpath=/x", "hostpath"),
        ("replicaCount=2", "replicaCount"),
        ("masterKey.existingsecret=mine", "existingsecret"),
        ("serviceMonitor.enable=true", "enable"),
        ("image.tags=1.0", "tags"),
        ("operator.resources.limits.memroy=1Gi", "memroy"),
        ("agent.tolerations[0].operater=Exists", "operater"),
        (
            "networkPolicy.invokeFrom[0].podSelecter.matchLabels.a=b",
            "podSelecter",
        ),
        ("operator.affinity.nodeAfinity.x=y", "nodeAfinity"),
        ("securityContext.fsGroup=1", "fsGroup"),
    ];
    for (set, key) in typos {
        let r = template("claw-secrets", "claw-secrets", &["--set", set]);
        assert!(!r.ok, "helm template --set {set} was accepted");
        assert!(
            r.stderr
                .contains(&format!("additional properties '{key}' not allowed")),
            "--set {set}: the error should name {key:?}: {}",
            r.stderr
        );
    }
    for set in ["operator.replicaCount=two", "agent.hostPort=70000"] {
        let r = template("claw-secrets", "claw-secrets", &["--set", set]);
        assert!(!r.ok, "helm template --set {set} was accepted");
        assert!(r.stderr.contains("schema"), "--set {set}: {}", r.stderr);
    }
    let chart = chart();
    let r = helm(&[
        "lint",
        chart.to_str().unwrap(),
        "--set",
        "operator.replicaCont=2",
    ]);
    assert!(
        !r.ok && r.stdout.contains("'replicaCont' not allowed"),
        "helm lint should refuse the typo: {}{}",
        r.stdout,
        r.stderr
    );
}

/// Every object schema of values.schema.json either closes its keys or is a map of strings
/// (labels, annotations, node selectors) or an explicitly passed-through Kubernetes field.
fn check_closed(schema: &Value, path: &str, problems: &mut Vec<String>) {
    if let Some(obj) = schema.as_object() {
        let is_object = obj.get("type") == Some(&json!("object")) || obj.contains_key("properties");
        if is_object {
            let passthrough = obj
                .get("description")
                .and_then(Value::as_str)
                .is_some_and(|d| d.starts_with("Passed through"));
            match obj.get("additionalProperties") {
                Some(Value::Bool(false)) => {}
                Some(v) if v == &json!({"type": "string"}) => {}
                None if passthrough => {}
                other => problems.push(format!("{path}: additionalProperties is {other:?}")),
            }
        }
        for (k, v) in obj {
            check_closed(v, &format!("{path}/{k}"), problems);
        }
    } else if let Some(items) = schema.as_array() {
        for (i, v) in items.iter().enumerate() {
            check_closed(v, &format!("{path}/{i}"), problems);
        }
    }
}

/// The property paths of the schema, not following `$ref`s.
fn schema_paths(schema: &Value, prefix: &str, out: &mut Vec<String>) {
    if let Some(props) = schema["properties"].as_object() {
        for (k, v) in props {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            out.push(path.clone());
            schema_paths(v, &path, out);
        }
    }
}

#[test]
fn schema_is_closed_and_every_value_is_documented() {
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(chart().join("values.schema.json")).unwrap())
            .expect("values.schema.json is JSON");
    let mut problems = Vec::new();
    check_closed(&schema, "", &mut problems);
    assert!(problems.is_empty(), "open object schemas: {problems:#?}");

    let text = std::fs::read_to_string(chart().join("values.yaml")).unwrap();
    let values: Value = serde_saphyr::from_str(&text).expect("values.yaml");
    let mut paths = Vec::new();
    schema_paths(&schema, "", &mut paths);
    for path in &paths {
        let pointer = format!("/{}", path.replace('.', "/"));
        assert!(
            values.pointer(&pointer).is_some(),
            "{path} is in the schema but has no default in values.yaml"
        );
    }

    // Line by line: every key has a comment right above it.
    let lines: Vec<&str> = text.lines().collect();
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim_start();
        let is_key = trimmed
            .split_once(':')
            .is_some_and(|(k, _)| !k.is_empty() && !k.starts_with(['#', '-']) && !k.contains(' '));
        if is_key {
            let above = if i == 0 {
                ""
            } else {
                lines[i - 1].trim_start()
            };
            assert!(
                above.starts_with('#'),
                "values.yaml line {}: {line:?} has no comment above it",
                i + 1
            );
        }
    }
}

/// The master key Secret name each component of a rendering is given, and the names its RBAC
/// lets it read: all must agree.
#[track_caller]
fn master_key_wiring(objects: &[Value], namespace: &str) -> String {
    let operator = &pod_spec(the(objects, "Deployment"))["containers"][0];
    let agent = &pod_spec(the(objects, "DaemonSet"))["containers"][0];
    let name = flag(&strings(&operator["args"]), "--master-key-secret");
    // With deliveries (the webhook on), the agent holds no master keyring: no flag, no right.
    let agent_args = strings(&agent["args"]);
    let agent_reads_it = agent_args
        .iter()
        .any(|a| a.starts_with("--master-key-secret"));
    assert_eq!(
        agent_reads_it,
        !agent_args
            .iter()
            .any(|a| a.starts_with("--delivery-token-file")),
        "the agent reads the master keyring exactly when it takes no deliveries"
    );
    if agent_reads_it {
        assert_eq!(
            flag(&agent_args, "--master-key-secret"),
            format!("{namespace}/{name}"),
            "the agent reads the operator's master key Secret"
        );
    }
    for role in objects.iter().filter(|o| o["kind"] == "Role") {
        let readable: Vec<&Value> = role["rules"]
            .as_array()
            .unwrap()
            .iter()
            // Rules that read a Secret other than the webhook's own certificate and the
            // agents' CA.
            .filter(|r| {
                r["resources"] == json!(["secrets"])
                    && r["verbs"]
                        .as_array()
                        .is_some_and(|v| v.contains(&json!("get")))
                    && !r["resourceNames"].as_array().is_some_and(|n| {
                        n.iter().any(|n| {
                            n.as_str().is_some_and(|n| {
                                n.ends_with("-webhook-tls") || n == "claw-secrets-agent-ca"
                            })
                        })
                    })
            })
            .collect();
        let is_agent = id(role).2.ends_with("-agent");
        if is_agent && !agent_reads_it {
            assert!(readable.is_empty(), "{}: may read no Secret", id(role).2);
            continue;
        }
        assert_eq!(readable.len(), 1, "{}: one get rule on secrets", id(role).2);
        assert_eq!(readable[0]["resourceNames"], json!([name]));
        // Read, and watched by name (the keyring is followed without a restart); the operator
        // also updates it (the scheduled rotation), nobody else.
        let verbs = if is_agent {
            json!(["get", "list", "watch"])
        } else {
            json!(["get", "list", "watch", "update"])
        };
        assert_eq!(readable[0]["verbs"], verbs, "{}", id(role).2);
    }
    name
}

#[test]
fn rendered_pods_are_hardened_and_get_the_flags_the_binary_takes() {
    let objects = render("claw-secrets", "claw-secrets", &[]);
    let operator = the(&objects, "Deployment");
    let agent = the(&objects, "DaemonSet");
    let image = format!(
        "ghcr.io/clawbernetes/claw-secrets:{}",
        env!("CARGO_PKG_VERSION")
    );

    for workload in [operator, agent] {
        let spec = pod_spec(workload);
        let what = id(workload).1.clone() + "/" + &id(workload).2;
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{what}");
        assert_eq!(spec["securityContext"]["runAsUser"], 65532, "{what}");
        assert_eq!(
            spec["securityContext"]["seccompProfile"]["type"],
            "RuntimeDefault"
        );
        for c in spec["containers"].as_array().unwrap() {
            let sc = &c["securityContext"];
            assert_eq!(c["image"], image.as_str());
            assert_eq!(sc["runAsNonRoot"], true, "{what}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(sc["capabilities"], json!({"drop": ["ALL"]}), "{what}");
            assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault", "{what}");
            for kind in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(
                        c["resources"][kind][resource].is_string(),
                        "{what}: resources.{kind}.{resource}"
                    );
                }
            }
        }
    }

    // The operator: two replicas, probes on the metrics port, the webhook's port, downward API
    // identity.
    assert_eq!(operator["spec"]["replicas"], 2);
    let op = &pod_spec(operator)["containers"][0];
    assert_eq!(op["args"][0], "operator");
    assert_eq!(
        op["ports"],
        json!([
            {"name": "metrics", "containerPort": 8080, "protocol": "TCP"},
            {"name": "webhook", "containerPort": 8443, "protocol": "TCP"},
        ])
    );
    assert_eq!(
        op["livenessProbe"]["httpGet"],
        json!({"path": "/healthz", "port": "metrics"})
    );
    assert_eq!(
        op["readinessProbe"]["httpGet"],
        json!({"path": "/readyz", "port": "metrics"})
    );
    assert_eq!(
        flag(&strings(&op["args"]), "--metrics-addr"),
        "0.0.0.0:8080"
    );
    let env: BTreeMap<&str, &Value> = op["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap(),
                &e["valueFrom"]["fieldRef"]["fieldPath"],
            )
        })
        .collect();
    assert_eq!(env["POD_NAME"], "metadata.name");
    assert_eq!(env["POD_NAMESPACE"], "metadata.namespace");

    // The agent: NODE_NAME from spec.nodeName, the hostPath data dir, port 7443 named "invoke",
    // and the labels `claw-secrets invoke` finds agent pods by.
    let spec = pod_spec(agent);
    let ag = &spec["containers"][0];
    assert_eq!(ag["args"][0], "agent");
    let env = &ag["env"].as_array().unwrap();
    assert!(
        env.iter().any(|e| e["name"] == "NODE_NAME"
            && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName")
    );
    assert_eq!(
        ag["ports"],
        json!([{"name": "invoke", "containerPort": 7443, "hostPort": 7443, "protocol": "TCP"}])
    );
    assert_eq!(flag(&strings(&ag["args"]), "--listen"), "0.0.0.0:7443");
    // Probes over HTTPS, the only thing the agent answers.
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(
            ag[probe]["httpGet"],
            json!({"path": path, "port": "invoke", "scheme": "HTTPS"}),
            "{probe}"
        );
    }
    // Its volumes: the data dir, and the node's token for the operator's deliveries (bound
    // to the pod, for the operator's audience only), which the agent is pointed at, with the
    // webhook Service its Role may proxy to.
    assert_eq!(
        spec["volumes"],
        json!([
            {"name": "data", "hostPath": {"path": "/var/lib/claw-secrets", "type": "DirectoryOrCreate"}},
            {"name": "delivery-token", "projected": {"sources": [{"serviceAccountToken": {
                "audience": "claw-secrets-operator", "expirationSeconds": 3600, "path": "token"}}]}},
        ])
    );
    let data_dir = flag(&strings(&ag["args"]), "--data-dir");
    let token_dir = "/var/run/secrets/claw-secrets/delivery";
    assert_eq!(
        ag["volumeMounts"],
        json!([
            {"name": "data", "mountPath": data_dir},
            {"name": "delivery-token", "mountPath": token_dir, "readOnly": true},
        ])
    );
    assert_eq!(
        flag(&strings(&ag["args"]), "--delivery-token-file"),
        format!("{token_dir}/token")
    );
    let operator_service = flag(&strings(&ag["args"]), "--operator-service");
    let (_, service) = operator_service.split_once('/').unwrap();
    let proxied = format!("https:{}", service);
    let agent_role = objects
        .iter()
        .find(|o| {
            o["kind"] == "Role"
                && o["rules"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .any(|r| r["resources"] == json!(["services/proxy"]))
        })
        .expect("the agent's Role");
    assert!(
        agent_role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resourceNames"] == json!([proxied])),
        "the agent may proxy to {proxied}, the Service it is pointed at"
    );
    let labels = &agent["spec"]["template"]["metadata"]["labels"];
    assert_eq!(labels["app.kubernetes.io/name"], "claw-secrets");
    assert_eq!(labels["app.kubernetes.io/component"], "agent");

    // Its init container: root, but only CAP_CHOWN, on the same directory, for the agent's uid.
    let init = &spec["initContainers"][0];
    let sc = &init["securityContext"];
    assert_eq!(init["image"], image.as_str());
    assert_eq!(sc["runAsUser"], 0);
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(
        sc["capabilities"],
        json!({"drop": ["ALL"], "add": ["CHOWN"]})
    );
    assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
    assert_eq!(
        init["volumeMounts"],
        json!([{"name": "data", "mountPath": data_dir}])
    );
    let init_args = strings(&init["args"]);
    assert_eq!(flag(&init_args, "--data-dir"), data_dir);
    assert_eq!(flag(&init_args, "--prepare-data-dir"), "65532:65532");

    // One master key name everywhere: generated by default...
    assert_eq!(
        master_key_wiring(&objects, "claw-secrets"),
        "claw-secrets-master-key"
    );
    let operator_role = named(&objects, "Role", "claw-secrets-operator");
    assert!(
        operator_role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resources"] == json!(["secrets"]) && r["verbs"] == json!(["create"])),
        "by default the operator may create the master key Secret"
    );
    // ... or the user's Secret. The operator then creates a Secret only for the webhook's own
    // certificate (managed mode) and for the agents' CA (always).
    let may_create_secrets = |objects: &[Value]| {
        named(objects, "Role", "mine-claw-secrets-operator")["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["verbs"] == json!(["create"]) && r["resources"] == json!(["secrets"]))
    };
    let existing = render(
        "mine",
        "ops",
        &["--set", "masterKey.existingSecret=vault-keyring"],
    );
    assert_eq!(master_key_wiring(&existing, "ops"), "vault-keyring");
    assert!(
        may_create_secrets(&existing),
        "with masterKey.existingSecret and the managed webhook, the operator creates the \
         webhook's certificate Secret"
    );
    for without_webhook_secret in ["webhook.enabled=false", "webhook.certManager.enabled=true"] {
        let existing = render(
            "mine",
            "ops",
            &[
                "--set",
                "masterKey.existingSecret=vault-keyring",
                "--set",
                without_webhook_secret,
            ],
        );
        assert_eq!(master_key_wiring(&existing, "ops"), "vault-keyring");
        assert!(
            may_create_secrets(&existing),
            "with masterKey.existingSecret and {without_webhook_secret} the operator still \
             creates the agents' CA Secret"
        );
    }

    // Every flag the chart passes is one the binary takes, and together they parse: the
    // operator gets as far as looking for credentials (exit 1), never to a usage error (2).
    for (what, extra) in [
        ("defaults", vec![]),
        (
            "cert-manager",
            vec!["--set", "webhook.certManager.enabled=true"],
        ),
        ("no webhook", vec!["--set", "webhook.enabled=false"]),
        (
            "gateway",
            vec![
                "--set",
                "agent.gateway.url=wss://gw.example:443",
                "--set",
                "agent.gateway.principal=openclaw/caller",
                "--set",
                "agent.gateway.tokenSecret=gateway-token",
                "--set",
                "agent.gateway.caConfigMap=gateway-ca",
            ],
        ),
    ] {
        let objects = render("claw-secrets", "claw-secrets", &extra);
        for workload in ["Deployment", "DaemonSet"] {
            let args = strings(&pod_spec(the(&objects, workload))["containers"][0]["args"]);
            let help = Command::new(BIN)
                .args([args[0].as_str(), "--help"])
                .output()
                .expect("claw-secrets --help");
            let help = String::from_utf8_lossy(&help.stdout);
            for arg in &args[1..] {
                let name = arg.split_once('=').map_or(arg.as_str(), |(n, _)| n);
                assert!(
                    help.contains(&format!("{name} ")) || help.contains(&format!("{name}\n")),
                    "{what}: `claw-secrets {}` has no flag {name}",
                    args[0]
                );
            }
        }
        let op_args = strings(&pod_spec(the(&objects, "Deployment"))["containers"][0]["args"]);
        let out = Command::new(BIN)
            .args(&op_args)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("KUBERNETES_SERVICE_PORT")
            .env("KUBECONFIG", "/nonexistent/kubeconfig")
            .env("POD_NAMESPACE", "claw-secrets")
            .env("POD_NAME", "operator-0")
            .stdin(Stdio::null())
            .output()
            .expect("running the operator's command line");
        assert_eq!(
            out.status.code(),
            Some(1),
            "{what}: {op_args:?} should parse and stop for want of credentials: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The chart's admission webhook: what reaches it, where it is served, and the certificate it
/// is served with. Only writes carrying data (`spec.data`, `spec.encryptedData`) of
/// ClawSecrets go to it, refused rather than stored when no replica answers; everything else
/// never waits for it.
#[test]
fn the_webhook_is_scoped_to_writes_carrying_data() {
    let objects = render("claw-secrets", "claw-secrets", &[]);
    let mwc = the(&objects, "MutatingWebhookConfiguration");
    assert_eq!(mwc["metadata"]["name"], "claw-secrets");
    assert!(mwc["metadata"].get("namespace").is_none(), "cluster-scoped");
    assert_eq!(
        mwc["metadata"]["labels"]["app.kubernetes.io/instance"],
        "claw-secrets"
    );
    assert!(
        mwc["metadata"].get("annotations").is_none(),
        "no CA injection without cert-manager: {}",
        mwc["metadata"]
    );
    let webhooks = mwc["webhooks"].as_array().expect("webhooks");
    assert_eq!(webhooks.len(), 1);
    let hook = &webhooks[0];
    assert_eq!(hook["name"], "seal.clawsecrets.clawbernetes.io");
    assert_eq!(hook["failurePolicy"], "Fail");
    assert_eq!(hook["sideEffects"], "None");
    assert_eq!(hook["admissionReviewVersions"], json!(["v1"]));
    assert_eq!(hook["timeoutSeconds"], 10);
    assert_eq!(hook["reinvocationPolicy"], "Never");
    assert_eq!(hook["matchPolicy"], "Equivalent");
    assert_eq!(
        hook["matchConditions"],
        json!([{
            "name": "carries-data",
            "expression": "has(object.spec.data) || has(object.spec.encryptedData)",
        }])
    );
    assert_eq!(
        hook["rules"],
        json!([{
            "apiGroups": ["clawbernetes.io"],
            "apiVersions": ["*"],
            "operations": ["CREATE", "UPDATE"],
            "resources": ["clawsecrets"],
            "scope": "Namespaced",
        }]),
        "ClawSecrets only, never their status, never deletions"
    );
    // deploy/webhook/local-operator.yaml (an operator outside the cluster; the README, the
    // admission tests) is the same webhook but for how it is reached.
    let local: Value = serde_saphyr::from_str(
        &std::fs::read_to_string(repo().join("deploy/webhook/local-operator.yaml")).unwrap(),
    )
    .unwrap();
    let mut local_hook = local["webhooks"][0].clone();
    let mut chart_hook = hook.clone();
    for h in [&mut local_hook, &mut chart_hook] {
        h.as_object_mut().unwrap().remove("clientConfig");
    }
    assert_eq!(
        local_hook, chart_hook,
        "deploy/webhook/local-operator.yaml drifted from the chart"
    );
    // No caBundle: the operator writes it (and helm's three-way merge leaves it on upgrade).
    assert!(
        hook["clientConfig"].get("caBundle").is_none(),
        "{}",
        hook["clientConfig"]
    );

    // The Service it calls selects the operator pods and forwards to their port "webhook".
    let service = &hook["clientConfig"]["service"];
    assert_eq!(
        service,
        &json!({"namespace": "claw-secrets", "name": "claw-secrets-webhook", "path": "/seal", "port": 443})
    );
    let svc = named(&objects, "Service", "claw-secrets-webhook");
    assert_eq!(svc["metadata"]["namespace"], "claw-secrets");
    assert_eq!(
        svc["spec"]["ports"],
        json!([{"name": "webhook", "port": 443, "targetPort": "webhook", "protocol": "TCP"}])
    );
    let operator = the(&objects, "Deployment");
    assert_eq!(
        svc["spec"]["selector"],
        operator["spec"]["selector"]["matchLabels"]
    );
    let op = &pod_spec(operator)["containers"][0];
    let port = op["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "webhook")
        .expect("the operator's port named webhook");
    assert_eq!(port["containerPort"], 8443);

    // Managed mode: the operator serves there, with its own certificate for the Service's
    // names, and writes its CA into this configuration; no volume.
    let args = strings(&op["args"]);
    assert_eq!(
        flag(&args, "--webhook-addr"),
        format!("0.0.0.0:{}", port["containerPort"])
    );
    let hosts = flag(&args, "--webhook-host");
    assert_eq!(
        hosts.split(',').collect::<Vec<_>>(),
        [
            "claw-secrets-webhook",
            "claw-secrets-webhook.claw-secrets",
            "claw-secrets-webhook.claw-secrets.svc",
            "claw-secrets-webhook.claw-secrets.svc.cluster.local",
        ]
    );
    assert_eq!(
        flag(&args, "--webhook-cert-secret"),
        "claw-secrets-webhook-tls"
    );
    assert_eq!(
        flag(&args, "--webhook-configuration"),
        mwc["metadata"]["name"].as_str().unwrap()
    );
    assert!(!args.iter().any(|a| a.starts_with("--webhook-cert-dir")));
    // Its only volume: the pod's own data dir for the writes it carries for the nodes.
    assert_eq!(
        pod_spec(operator)["volumes"],
        json!([{"name": "data", "emptyDir": {"sizeLimit": "1Gi"}}])
    );
    assert_eq!(
        op["volumeMounts"],
        json!([{"name": "data", "mountPath": "/var/lib/claw-secrets-operator"}])
    );
    assert_eq!(
        flag(&args, "--data-dir"),
        "/var/lib/claw-secrets-operator/data",
        "a directory of its own in the emptyDir"
    );
    // Its RBAC: that configuration and that Secret, by name.
    let cluster_role = named(&objects, "ClusterRole", "claw-secrets-operator");
    assert!(
        cluster_role["rules"].as_array().unwrap().contains(&json!({
            "apiGroups": ["admissionregistration.k8s.io"],
            "resources": ["mutatingwebhookconfigurations"],
            "resourceNames": ["claw-secrets"],
            "verbs": ["get", "update"],
        })),
        "{}",
        cluster_role["rules"]
    );
    let role = named(&objects, "Role", "claw-secrets-operator");
    assert!(
        role["rules"].as_array().unwrap().contains(&json!({
            "apiGroups": [""],
            "resources": ["secrets"],
            "resourceNames": ["claw-secrets-webhook-tls"],
            "verbs": ["get", "update"],
        })),
        "{}",
        role["rules"]
    );

    // cert-manager mode, no issuer given: a self-signed Issuer, a Certificate for the
    // Service's names, its CA injected into the configuration, its Secret mounted read-only
    // and served from there; the operator neither makes a certificate nor writes a caBundle.
    let cm = render("r", "ops", &["--set", "webhook.certManager.enabled=true"]);
    let issuer = the(&cm, "Issuer");
    assert_eq!(
        issuer["metadata"]["name"],
        "r-claw-secrets-webhook-selfsigned"
    );
    assert_eq!(issuer["metadata"]["namespace"], "ops");
    assert_eq!(issuer["spec"], json!({"selfSigned": {}}));
    let cert = the(&cm, "Certificate");
    assert_eq!(cert["metadata"]["name"], "r-claw-secrets-webhook");
    assert_eq!(cert["metadata"]["namespace"], "ops");
    assert_eq!(cert["spec"]["secretName"], "r-claw-secrets-webhook-cert");
    assert_eq!(
        cert["spec"]["dnsNames"],
        json!([
            "r-claw-secrets-webhook",
            "r-claw-secrets-webhook.ops",
            "r-claw-secrets-webhook.ops.svc",
            "r-claw-secrets-webhook.ops.svc.cluster.local",
        ])
    );
    assert_eq!(
        cert["spec"]["issuerRef"],
        json!({"name": "r-claw-secrets-webhook-selfsigned", "kind": "Issuer", "group": "cert-manager.io"})
    );
    let mwc = the(&cm, "MutatingWebhookConfiguration");
    assert_eq!(
        mwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "ops/r-claw-secrets-webhook"
    );
    assert!(mwc["webhooks"][0]["clientConfig"].get("caBundle").is_none());
    let deployment = the(&cm, "Deployment");
    let op = &pod_spec(deployment)["containers"][0];
    let args = strings(&op["args"]);
    assert_eq!(flag(&args, "--webhook-addr"), "0.0.0.0:8443");
    assert_eq!(
        flag(&args, "--webhook-cert-dir"),
        "/var/run/claw-secrets/webhook-tls"
    );
    for managed_only in [
        "--webhook-host",
        "--webhook-cert-secret",
        "--webhook-configuration",
    ] {
        assert!(
            !args.iter().any(|a| a.starts_with(managed_only)),
            "cert-manager mode passes no {managed_only}: {args:?}"
        );
    }
    assert_eq!(
        op["volumeMounts"],
        json!([
            {"name": "data", "mountPath": "/var/lib/claw-secrets-operator"},
            {"name": "webhook-tls", "mountPath": "/var/run/claw-secrets/webhook-tls", "readOnly": true},
        ])
    );
    assert_eq!(
        pod_spec(deployment)["volumes"],
        json!([
            {"name": "data", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "webhook-tls", "secret": {"secretName": "r-claw-secrets-webhook-cert"}},
        ])
    );
    // The agents' ServiceAccount, NAMESPACE/NAME: the release's, in the release namespace.
    assert_eq!(
        flag(&args, "--agent-service-account"),
        "ops/r-claw-secrets-agent"
    );
    let cluster_role = named(&cm, "ClusterRole", "r-claw-secrets-operator");
    assert!(
        !cluster_role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["apiGroups"] == json!(["admissionregistration.k8s.io"])),
        "with cert-manager the operator may not touch the webhook configuration"
    );
    let role = named(&cm, "Role", "r-claw-secrets-operator");
    assert!(
        !role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["resourceNames"] == json!(["r-claw-secrets-webhook-tls"])),
        "with cert-manager the operator keeps no certificate Secret"
    );

    // Off: no configuration, no Service, no flag, no port, no RBAC for it.
    let off = render(
        "claw-secrets",
        "claw-secrets",
        &["--set", "webhook.enabled=false"],
    );
    for kind in ["MutatingWebhookConfiguration", "Certificate", "Issuer"] {
        assert!(
            !off.iter().any(|o| o["kind"] == kind),
            "webhook off: a {kind}"
        );
    }
    assert!(
        !off.iter()
            .any(|o| o["metadata"]["name"] == "claw-secrets-webhook"),
        "webhook off: the Service"
    );
    let op = &pod_spec(the(&off, "Deployment"))["containers"][0];
    let args = strings(&op["args"]);
    assert!(
        !args.iter().any(|a| a.starts_with("--webhook")),
        "webhook off: {args:?}"
    );
    // The agents still get their serving certificates from the operator.
    assert_eq!(
        flag(&args, "--agent-service-account"),
        "claw-secrets/claw-secrets-agent"
    );
    assert_eq!(op["ports"].as_array().map(Vec::len), Some(1));
    let cluster_role = named(&off, "ClusterRole", "claw-secrets-operator");
    assert!(
        !cluster_role["rules"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["apiGroups"] == json!(["admissionregistration.k8s.io"]))
    );
    // The public sealing key ConfigMap is published either way.
    let role = named(&off, "Role", "claw-secrets-operator");
    assert!(
        role["rules"].as_array().unwrap().contains(&json!({
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["claw-secrets-sealing-key", "claw-secrets-keyring-status"],
            "verbs": ["create", "patch"],
        })),
        "{}",
        role["rules"]
    );

    // The webhook's port may not be the metrics port.
    let clash = template(
        "claw-secrets",
        "claw-secrets",
        &["--set", "webhook.port=8080"],
    );
    assert!(
        !clash.ok
            && clash
                .stderr
                .contains("webhook.port and operator.metricsPort must differ"),
        "{}",
        clash.stderr
    );
}

#[test]
fn init_container_prepares_the_data_dir() {
    let objects = render("claw-secrets", "claw-secrets", &[]);
    let init = &pod_spec(the(&objects, "DaemonSet"))["initContainers"][0];
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("var-lib-claw-secrets");
    // As root (a pod's init container), hand the directory to the chart's uid; otherwise the
    // test can only hand it to itself.
    // SAFETY: getuid/getgid have no preconditions.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let owner = if uid == 0 {
        flag(&strings(&init["args"]), "--prepare-data-dir")
    } else {
        format!("{uid}:{gid}")
    };
    let (args, env) = local_command(
        init,
        &[
            ("--data-dir", data.display().to_string()),
            ("--prepare-data-dir", owner.clone()),
        ],
        &[],
        &BTreeMap::from([("spec.nodeName", "node-x".to_owned())]),
    );
    let out = Command::new(BIN)
        .args(&args)
        .envs(env.clone())
        .output()
        .expect("running the init container's command");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&data).expect("the data dir exists");
    assert!(meta.is_dir());
    assert_eq!(format!("{}:{}", meta.uid(), meta.gid()), owner);
    // Again (a restarted pod): still fine.
    let again = Command::new(BIN)
        .args(&args)
        .envs(env)
        .output()
        .expect("again");
    assert!(again.status.success());
    let bad = Command::new(BIN)
        .args(["agent", "--node-name", "x", "--prepare-data-dir", "nobody"])
        .output()
        .expect("usage error");
    assert_eq!(bad.status.code(), Some(2));
}

/// RBAC objects by identity, reduced to what grants or binds.
fn rbac(objects: &[Value]) -> BTreeMap<Id, Value> {
    objects
        .iter()
        .filter(|o| {
            matches!(
                o["kind"].as_str(),
                Some(
                    "ServiceAccount"
                        | "Role"
                        | "ClusterRole"
                        | "RoleBinding"
                        | "ClusterRoleBinding"
                        | "ValidatingAdmissionPolicy"
                        | "ValidatingAdmissionPolicyBinding"
                )
            )
        })
        .map(|o| {
            if o["kind"]
                .as_str()
                .is_some_and(|k| k.starts_with("ValidatingAdmissionPolicy"))
            {
                // A policy's whole spec grants or refuses.
                return (id(o), o["spec"].clone());
            }
            // Which built-in roles (view, edit, admin) a ClusterRole is part of.
            let aggregated: BTreeMap<String, Value> = o["metadata"]["labels"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| k.starts_with("rbac.authorization.k8s.io/aggregate-to-"))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            let grants = json!({
                "rules": o["rules"],
                "roleRef": o["roleRef"],
                "subjects": o["subjects"],
                "aggregated": aggregated,
            });
            (id(o), grants)
        })
        .collect()
}

#[test]
fn chart_rbac_is_deploy_rbac() {
    let rendered = rbac(&render("claw-secrets", "claw-secrets", &[]));
    let mut deployed = Vec::new();
    for file in ["deploy/rbac/operator.yaml", "deploy/rbac/agent.yaml"] {
        deployed.extend(docs(&std::fs::read_to_string(repo().join(file)).unwrap()));
    }
    let deployed = rbac(&deployed);
    assert_eq!(
        rendered.keys().collect::<Vec<_>>(),
        deployed.keys().collect::<Vec<_>>(),
        "release claw-secrets in namespace claw-secrets creates the RBAC objects of deploy/rbac/"
    );
    for (key, grants) in &deployed {
        assert_eq!(
            &rendered[key], grants,
            "{key:?}: the chart's rules differ from deploy/rbac/"
        );
    }
}

/// `masterKey.kmsPluginSocket`: off by default; set, the operator gets the socket's directory
/// from the node, `--kms-plugin` naming the socket in it, and `update` on the keyring Secret
/// (to wrap a plaintext keyring in place) even without scheduled rotation. The binary takes
/// the flag.
#[test]
fn the_kms_plugin_socket_is_mounted_into_the_operator_and_named_by_its_flag() {
    let operator_of = |objects: &[Value]| pod_spec(the(objects, "Deployment")).clone();
    let keyring_verbs = |objects: &[Value]| {
        objects
            .iter()
            .filter(|o| o["kind"] == "Role")
            .flat_map(|o| o["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["resourceNames"] == json!(["claw-secrets-master-key"]))
            .flat_map(|r| strings(&r["verbs"]))
            .collect::<Vec<String>>()
    };

    let defaults = render(
        "claw-secrets",
        "claw-secrets",
        &["--set-string", "operator.keyRotationPeriod=0"],
    );
    let spec = operator_of(&defaults);
    let args = strings(&spec["containers"][0]["args"]);
    assert!(
        !args.iter().any(|a| a.starts_with("--kms-plugin")),
        "{args:?}"
    );
    assert!(!spec.to_string().contains("hostPath"), "{spec}");
    assert!(keyring_verbs(&defaults).contains(&"get".to_owned()));
    assert!(!keyring_verbs(&defaults).contains(&"update".to_owned()));

    let wrapped = render(
        "claw-secrets",
        "claw-secrets",
        &[
            "--set-string",
            "operator.keyRotationPeriod=0",
            "--set",
            "masterKey.kmsPluginSocket=/var/run/kmsplugin/socket.sock",
        ],
    );
    let spec = operator_of(&wrapped);
    let container = &spec["containers"][0];
    let args = strings(&container["args"]);
    assert_eq!(
        flag(&args, "--kms-plugin"),
        "unix:///var/run/claw-secrets/kms/socket.sock"
    );
    let volume = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["name"] == "kms-plugin")
        .expect("the kms-plugin volume");
    assert_eq!(volume["hostPath"]["path"], "/var/run/kmsplugin");
    let mount = container["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == "kms-plugin")
        .expect("the kms-plugin mount");
    assert_eq!(mount["mountPath"], "/var/run/claw-secrets/kms");
    assert!(keyring_verbs(&wrapped).contains(&"update".to_owned()));
    // The agents (on deliveries) read no keyring: nothing of it for them.
    assert!(
        !pod_spec(the(&wrapped, "DaemonSet"))
            .to_string()
            .contains("kms")
    );

    let help = std::process::Command::new(env!("CARGO_BIN_EXE_claw-secrets"))
        .args(["operator", "--help"])
        .output()
        .expect("claw-secrets operator --help");
    assert!(String::from_utf8_lossy(&help.stdout).contains("--kms-plugin"));

    // Not an absolute socket path: refused by the schema.
    let r = template(
        "claw-secrets",
        "claw-secrets",
        &["--set", "masterKey.kmsPluginSocket=socket.sock"],
    );
    assert!(!r.ok && r.stderr.contains("schema"), "{}", r.stderr);
}

/// `helm test`: a workload of the test's own reads a marker ClawSecret back through the agent
/// on its node, as a workload would (hostIP and hostPort, projected token, named in
/// allowedWorkloads); created before the pod, all deleted once it succeeds. Nothing without a
/// hostPort to reach the agent at.
#[test]
fn helm_test_reads_a_secret_back_through_the_agent() {
    let chart = chart();
    let show = |extra: &[&str]| {
        let mut args = vec![
            "template",
            "claw-secrets",
            chart.to_str().unwrap(),
            "--namespace",
            "claw-secrets",
            "--show-only",
            "templates/tests/read-back.yaml",
        ];
        args.extend_from_slice(extra);
        helm(&args)
    };
    let hooks = docs(&must(show(&[]), "helm template --show-only the test"));
    let kinds: BTreeSet<&str> = hooks.iter().filter_map(|o| o["kind"].as_str()).collect();
    assert_eq!(
        kinds,
        BTreeSet::from(["ServiceAccount", "ClawSecret", "Pod"])
    );
    for hook in &hooks {
        let a = &hook["metadata"]["annotations"];
        assert_eq!(a["helm.sh/hook"], "test", "{hook}");
        assert!(
            a["helm.sh/hook-delete-policy"]
                .as_str()
                .unwrap()
                .contains("hook-succeeded")
        );
    }
    let (secret, pod) = (the(&hooks, "ClawSecret"), the(&hooks, "Pod"));
    assert_eq!(
        secret["spec"]["allowedWorkloads"],
        json!([pod["spec"]["serviceAccountName"]])
    );
    let args = strings(&pod["spec"]["containers"][0]["args"]);
    assert_eq!(&args[..3], ["invoke", "$(NODE_NAME)", "secret.get"]);
    // Over HTTPS, verifying the agent with the bundle the operator publishes in the namespace.
    assert!(
        args.contains(&"https://$(HOST_IP):7443".to_owned())
            && args.contains(&"/var/run/claw-ca/ca.crt".to_owned()),
        "{args:?}"
    );
    assert_eq!(
        pod["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == "agent-ca")
            .map(|v| &v["configMap"]["name"]),
        Some(&json!("claw-secrets-agent-ca"))
    );
    let off = show(&["--set", "agent.hostPort=0"]);
    assert!(
        !off.ok || docs(&off.stdout).is_empty(),
        "no test without a hostPort: {}",
        off.stdout
    );
}

/// docs/rbac.md says what the operator's and the agent's roles grant: for every resource, the
/// verbs its table lists are the verbs of deploy/rbac/ (read from the tables' first two
/// columns: the backquoted resources, and the verbs named in the second).
#[test]
fn docs_rbac_tables_are_the_deployed_roles() {
    const VERBS: [&str; 11] = [
        "approve",
        "sign",
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
        "reveal",
    ];
    let text = std::fs::read_to_string(repo().join("docs/rbac.md")).unwrap();
    for (file, role, heading) in [
        (
            "deploy/rbac/operator.yaml",
            "claw-secrets-operator",
            "## The operator",
        ),
        (
            "deploy/rbac/agent.yaml",
            "claw-secrets-agent",
            "## The node agent",
        ),
    ] {
        let mut deployed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for doc in docs(&std::fs::read_to_string(repo().join(file)).unwrap()) {
            let is_role = matches!(doc["kind"].as_str(), Some("Role" | "ClusterRole"));
            if !is_role || doc["metadata"]["name"] != role {
                continue;
            }
            for rule in doc["rules"].as_array().unwrap() {
                for resource in strings(&rule["resources"]) {
                    deployed
                        .entry(resource)
                        .or_default()
                        .extend(strings(&rule["verbs"]));
                }
            }
        }
        let section = text
            .split(heading)
            .nth(1)
            .unwrap_or_else(|| panic!("docs/rbac.md has no {heading:?}"));
        let section = section.split("\n## ").next().unwrap();
        let mut documented: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        // The section's first table, the one headed "| resource | verbs | why |".
        let table = section
            .lines()
            .skip_while(|l| !l.starts_with("| resource |"))
            .take_while(|l| l.starts_with('|'));
        for line in table.filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let verbs: BTreeSet<String> = cells[2]
                .split(|c: char| !c.is_ascii_alphabetic())
                .filter(|w| VERBS.contains(w))
                .map(str::to_owned)
                .collect();
            for resource in cells[1].split('`').skip(1).step_by(2) {
                // `events.k8s.io/events` names the group; `clawsecrets/status` a subresource.
                let resource = match resource.split_once('/') {
                    Some((group, name)) if group.contains('.') => name,
                    _ => resource,
                };
                documented
                    .entry(resource.to_owned())
                    .or_default()
                    .extend(verbs.iter().cloned());
            }
        }
        assert_eq!(
            documented, deployed,
            "docs/rbac.md {heading:?} against {file}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// With the API server
// ---------------------------------------------------------------------------------------------

/// Fails unless the cluster serves ServiceMonitors (the Prometheus Operator's CRD, which the
/// local control plane installs): the chart's ServiceMonitor is validated by the server too.
fn require_service_monitors(kubeconfig: &Path) {
    let served = kubectl(
        kubeconfig,
        &["get", "crd", "servicemonitors.monitoring.coreos.com"],
    );
    assert!(
        served.ok,
        "the cluster does not serve ServiceMonitors, so the chart's ServiceMonitor cannot be \
         validated: install the CRD (`kubectl apply --server-side -f \
         \"$(hack/control-plane.sh bin-dir)/crds/monitoring.coreos.com_servicemonitors.yaml\"`) \
         or run with the local control plane: {}",
        served.stderr
    );
}

#[tokio::test]
async fn every_option_is_accepted_by_the_api_server() {
    let env = control_plane::test_env("helm-dry-run").await;
    let kc = env.kubeconfig.clone();
    let ns = env.namespace.clone();
    let options = all_options();
    require_service_monitors(&kc);
    // cert-manager's Certificate and Issuer (webhook.certManager) only where its CRDs are
    // served: the local control plane does not install cert-manager, so there they are checked
    // by `helm template` alone (the_webhook_is_scoped_to_writes_carrying_data).
    let cert_manager = kubectl(&kc, &["get", "crd", "certificates.cert-manager.io"]).ok;
    for (what, extra) in [
        ("defaults", vec![]),
        ("every option", vec!["-f", options.to_str().unwrap()]),
    ] {
        let checked: Vec<Value> = render("claw-secrets", &ns, &extra)
            .into_iter()
            .filter(|o| {
                cert_manager
                    || !o["apiVersion"]
                        .as_str()
                        .is_some_and(|v| v.starts_with("cert-manager.io/"))
            })
            .collect();
        let file = tempfile::NamedTempFile::new().expect("temp file");
        let stream: Vec<String> = checked
            .iter()
            .map(|o| serde_json::to_string(o).unwrap())
            .collect();
        std::fs::write(file.path(), stream.join("\n---\n")).unwrap();
        let apply = || {
            kubectl(
                &kc,
                &[
                    "apply",
                    "--dry-run=server",
                    "-f",
                    file.path().to_str().unwrap(),
                ],
            )
        };
        // The release test of this binary installs the chart's CRDs on the same API server,
        // maybe at this moment: kubectl's apply reads an object, then creates it if it was
        // absent, and a create that loses that race is refused as AlreadyExists. Seen once in
        // CI; the next attempt finds the object and checks it as an update.
        let mut applied = apply();
        for _ in 0..3 {
            if applied.ok || !applied.stderr.contains("(AlreadyExists)") {
                break;
            }
            applied = apply();
        }
        let out = must(applied, &format!("kubectl apply --dry-run=server ({what})"));
        assert_eq!(
            out.lines()
                .filter(|l| l.ends_with("(server dry run)"))
                .count(),
            checked.len(),
            "{what}: every object accepted:\n{out}"
        );
    }
    // The CRDs, as helm would install them.
    let crds = chart().join("files/crds.yaml");
    must(
        kubectl(
            &kc,
            &["apply", "--dry-run=server", "-f", crds.to_str().unwrap()],
        ),
        "kubectl apply --dry-run=server charts/claw-secrets/files/crds.yaml",
    );
    // `helm install` refuses a typo before creating anything.
    let release = format!("typo-{}", random_hex(4));
    let chart = chart();
    let r = helm(&[
        "install",
        &release,
        chart.to_str().unwrap(),
        "--namespace",
        &ns,
        "--kubeconfig",
        kc.to_str().unwrap(),
        "--set",
        "agent.hostpath=/srv/claw",
    ]);
    assert!(
        !r.ok && r.stderr.contains("'hostpath' not allowed"),
        "helm install with a typo: {}",
        r.stderr
    );
    let listed = must(
        helm(&[
            "list",
            "--namespace",
            &ns,
            "--kubeconfig",
            kc.to_str().unwrap(),
            "-q",
        ]),
        "helm list",
    );
    assert!(listed.trim().is_empty(), "no release: {listed}");
    env.cleanup().await;
}

async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig loads");
    Client::try_from(config).expect("client")
}

/// SelfSubjectAccessReview: may the client's own identity do this?
async fn may(
    client: &Client,
    verb: &str,
    group: &str,
    resource: &str,
    namespace: Option<&str>,
    name: Option<&str>,
) -> bool {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.to_owned()),
                group: Some(group.to_owned()),
                resource: Some(resource.to_owned()),
                namespace: namespace.map(str::to_owned),
                name: name.map(str::to_owned),
                ..ResourceAttributes::default()
            }),
            ..SelfSubjectAccessReviewSpec::default()
        },
        ..SelfSubjectAccessReview::default()
    };
    Api::<SelfSubjectAccessReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("SelfSubjectAccessReview")
        .status
        .is_some_and(|s| s.allowed)
}

/// (allowed?, "VERB RESOURCE[.GROUP]", namespace (None: cluster-wide), object name)
type Access<'a> = (bool, &'a str, Option<&'a str>, Option<&'a str>);

/// Asserts that each request is allowed (`true`) or denied, by SelfSubjectAccessReview.
async fn expect_access(who: &str, client: &Client, cases: &[Access<'_>]) {
    for (expected, request, ns, name) in cases {
        let (verb, resource) = request.split_once(' ').expect("VERB RESOURCE");
        let (resource, group) = resource.split_once('.').unwrap_or((resource, ""));
        let got = may(client, verb, group, resource, *ns, *name).await;
        assert_eq!(
            got,
            *expected,
            "{who}: {request} (namespace {ns:?}, name {name:?}) should be {}",
            if *expected { "allowed" } else { "denied" }
        );
    }
}

/// `claw-secrets operator` or `agent`, run as the chart would run it; killed when dropped.
struct Proc {
    what: String,
    child: Option<Child>,
    log: PathBuf,
}

impl Proc {
    fn spawn(
        what: &str,
        args: &[String],
        env: &[(String, String)],
        kubeconfig: &Path,
        log: PathBuf,
    ) -> Proc {
        let file = std::fs::File::create(&log).expect("log file");
        let child = Command::new(BIN)
            .args(args)
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("WATCH_NAMESPACE")
            .env_remove("NODE_NAME")
            .env_remove("CLAW_SECRETS_DATA_DIR")
            .env_remove("CLAW_SECRETS_LOG")
            .env_remove("RUST_LOG")
            .envs(env.iter().cloned())
            .env("KUBECONFIG", kubeconfig)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {BIN} {args:?}: {e}"));
        Proc {
            what: what.to_owned(),
            child: Some(child),
            log,
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    #[track_caller]
    fn assert_running(&mut self) {
        if let Some(status) = self
            .child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
        {
            panic!("{} exited ({status}); log:\n{}", self.what, self.log_tail());
        }
    }

    /// Waits until `GET path` on `port` answers 200 with a body containing `needle`.
    /// Waits until the agent listening on `port` answers `GET /readyz` with 200, over HTTPS
    /// (its certificate from the test CA).
    async fn wait_ready_agent(&mut self, port: u16) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Ok((200, _)) = cluster::get(&format!("https://127.0.0.1:{port}/readyz")).await {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{}: not ready over HTTPS after {PATIENCE:?}; log:\n{}",
                self.what,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn wait_for(&mut self, port: u16, path: &str, needle: &str) {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some((200, body)) = http_get(port, path)
                && body.contains(needle)
            {
                return;
            }
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "{}: no {path} with {needle:?} after {PATIENCE:?}; log:\n{}",
                self.what,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (what a pod gets), and wait for the exit.
    fn terminate(&mut self) {
        if let Some(child) = self.child.take() {
            process::terminate(child);
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::kill(child);
        }
        if std::thread::panicking() {
            eprintln!(
                "--- last lines of {} ({}):\n{}",
                self.what,
                self.log.display(),
                self.log_tail()
            );
        }
    }
}

/// `claw-secrets invoke NODE COMMAND PARAMS --addr ADDR --token TOKEN`: the payload, or
/// `CODE: message`.
fn invoke(
    addr: &str,
    node: &str,
    token: &str,
    command: &str,
    params: Value,
) -> Result<Value, String> {
    let out = Command::new(BIN)
        .args([
            "invoke",
            node,
            command,
            &params.to_string(),
            "--addr",
            addr,
            "--token",
            token,
        ])
        .env_remove("CLAW_SECRETS_ADDR")
        .env_remove("CLAW_SECRETS_TOKEN")
        .env_remove("KUBECONFIG")
        // The agent's certificate comes from the test CA (see `Release::start_agent`).
        .env("CLAW_SECRETS_CA_FILE", &cluster::test_ca().file)
        .stdin(Stdio::null())
        .output()
        .expect("running claw-secrets invoke");
    if out.status.success() {
        Ok(serde_json::from_slice(&out.stdout).expect("the payload is JSON"))
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// The release's objects as the API server lists them, found by the label
/// `app.kubernetes.io/instance`, over every kind the chart creates (ServiceMonitors and
/// cert-manager's kinds aside: the releases installed here create none) plus Secrets and
/// ConfigMaps.
fn labelled(kubeconfig: &Path, release: &str) -> BTreeSet<Id> {
    let kinds = "serviceaccounts,secrets,configmaps,services,deployments.apps,daemonsets.apps,\
                 roles.rbac.authorization.k8s.io,rolebindings.rbac.authorization.k8s.io,\
                 clusterroles.rbac.authorization.k8s.io,\
                 clusterrolebindings.rbac.authorization.k8s.io,\
                 networkpolicies.networking.k8s.io,\
                 mutatingwebhookconfigurations.admissionregistration.k8s.io,\
                 validatingadmissionpolicies.admissionregistration.k8s.io,\
                 validatingadmissionpolicybindings.admissionregistration.k8s.io";
    let selector = format!("app.kubernetes.io/instance={release}");
    let out = must(
        kubectl(
            kubeconfig,
            &["get", kinds, "-A", "-l", &selector, "-o", "json"],
        ),
        "listing the release's objects",
    );
    let list: Value = serde_json::from_str(&out).expect("kubectl JSON");
    list["items"].as_array().unwrap().iter().map(id).collect()
}

/// The release's objects: those labelled with it, and the CRDs it manages (generated, they carry
/// no chart labels; Helm marks what it manages with its release annotation). Kept CRDs keep
/// that annotation after `helm uninstall`, which is why the orphan checks use [`labelled`].
fn release_objects(kubeconfig: &Path, release: &str) -> BTreeSet<Id> {
    let mut ids = labelled(kubeconfig, release);
    let out = must(
        kubectl(
            kubeconfig,
            &["get", "customresourcedefinitions", "-o", "json"],
        ),
        "listing the CRDs",
    );
    let list: Value = serde_json::from_str(&out).expect("kubectl JSON");
    ids.extend(
        list["items"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["metadata"]["annotations"]["meta.helm.sh/release-name"] == release)
            .map(id),
    );
    ids
}

/// The release's manifest, as helm recorded it.
fn manifest(kubeconfig: &Path, release: &str, ns: &str) -> Vec<Value> {
    docs(&must(
        helm(&[
            "get",
            "manifest",
            release,
            "--namespace",
            ns,
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ]),
        "helm get manifest",
    ))
}

fn is_ready(conditions: &[claw_secrets::k8s::crd::Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True")
}

/// Waits until ClawSecret `ns/name` is sealed at `version` (plaintext gone) and Ready; returns
/// its key id.
async fn wait_sealed(client: &Client, ns: &str, name: &str, version: u64) -> String {
    let api: Api<ClawSecret> = Api::namespaced(client.clone(), ns);
    eventually(
        &format!("ClawSecret {ns}/{name} sealed at v{version}"),
        || async {
            let s = api.get(name).await.map_err(|e| e.to_string())?;
            let sealed = s.spec.sealed.as_ref().ok_or("not sealed")?;
            let status = s.status.unwrap_or_default();
            if s.spec.data.is_none()
                && sealed.version == version
                && status.version == Some(version)
                && is_ready(&status.conditions)
            {
                Ok(sealed.key_id.clone())
            } else {
                Err(format!(
                    "sealed v{}, status {:?}",
                    sealed.version, status.conditions
                ))
            }
        },
    )
    .await
}

async fn wait_config_ready(client: &Client, ns: &str, name: &str) {
    let api: Api<ClawConfig> = Api::namespaced(client.clone(), ns);
    eventually(&format!("ClawConfig {ns}/{name} Ready"), || async {
        let c = api.get(name).await.map_err(|e| e.to_string())?;
        let status = c.status.unwrap_or_default();
        is_ready(&status.conditions)
            .then_some(())
            .ok_or_else(|| format!("{:?}", status.conditions))
    })
    .await;
}

/// `kubectl apply` (client-side, as a user would) of one object.
fn kubectl_apply(kubeconfig: &Path, manifest: &Value) {
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), serde_json::to_vec(manifest).unwrap()).unwrap();
    must(
        kubectl(kubeconfig, &["apply", "-f", file.path().to_str().unwrap()]),
        "kubectl apply",
    );
}

// ---------------------------------------------------------------------------------------------
// The life of a release
// ---------------------------------------------------------------------------------------------

/// The whole life of a release, sharing one install: install, the operator and an agent with
/// the chart's ServiceAccounts and flags, access boundaries, upgrade, the examples, uninstall.
/// Each step is a function below saying what it proves; they run in this order.
#[tokio::test]
async fn install_run_upgrade_and_uninstall_a_release() {
    let r = Release::new().await;

    // helm install.
    let installed = helm_install_creates_exactly_the_rendered_objects(&r).await;
    an_upgrade_with_a_typo_is_refused(&r);

    // The operator and an agent, as local processes with the chart's ServiceAccounts.
    let (mut running, generated_key) =
        operator_and_agent_run_with_the_chart_identities(&r, &installed).await;

    // The flow: kubectl, a workload, an editor, a viewer.
    let first = a_claw_secret_applied_with_kubectl_is_sealed(&r).await;
    let reader = the_allowed_workload_reads_it_through_node_invoke(&r, &first).await;
    let users = alice_is_bound_as_editor_and_bob_as_viewer(&r).await;
    the_editor_creates_reads_and_rotates_through_node_invoke(&r, &users).await;
    the_viewer_lists_but_neither_reads_nor_creates(&r, &users);
    the_editor_deletes_through_node_invoke(&r, &users).await;

    // The boundaries of the chart's roles.
    the_operator_role_allows_what_it_needs_and_no_more(&r, &running).await;
    the_agent_role_allows_what_it_needs_and_no_more(&r, &running).await;
    the_api_server_forbids_what_the_roles_do_not_grant(&r, &running).await;

    // helm upgrade to an existing master key Secret.
    let upgraded = upgrade_to_an_existing_master_key(&r, &generated_key).await;
    the_upgraded_workloads_get_the_upgraded_values(&r, &upgraded);
    the_roles_follow_the_master_key_to_the_existing_secret(&r, &running).await;
    restarted_with_the_upgraded_flags_the_same_key_seals(
        &r,
        &mut running,
        &upgraded,
        &first,
        &reader,
    )
    .await;

    // The examples, with the operator watching their namespace.
    examples_apply_and_become_ready(&r, &mut running, &upgraded).await;
    let workload = the_example_workload_reads_its_own_secret_only(&r).await;
    the_example_config_is_readable_when_bound_and_immutable(&r, &workload).await;
    the_examples_are_deleted_while_the_operator_runs(&r).await;

    // helm uninstall.
    uninstall_removes_every_object_of_the_release(&r, &mut running);
    let kept = uninstall_keeps_the_crds_master_keys_and_claw_secrets(&r).await;

    // The chart's webhook while no replica answers (local control plane only: on an external
    // cluster its configuration would refuse every other ClawSecret write meanwhile).
    let webhook = if r.external {
        nothing_is_left_stuck(&r, kept).await;
        None
    } else {
        let w = a_webhook_release_gets_its_ca_bundle_from_the_operator(&r).await;
        helm_upgrade_keeps_the_ca_bundle(&r, &w).await;
        with_no_replica_answering_only_writes_carrying_data_are_refused(&r, &kept).await;
        // Deletions go through while the webhook cannot answer, and no operator runs.
        nothing_is_left_stuck(&r, kept).await;
        Some(w)
    };
    if let Some(w) = webhook {
        the_webhook_release_is_uninstalled(&r, w);
    }
    r.done().await;
}

/// The master key Secret the upgrade points the release to: a copy of the generated one (a
/// restore), made by the test.
const RESTORED_MASTER_KEY: &str = "restored-master-key";

/// A release of the chart, and what the steps of its life share: the test's namespace and the
/// admin client, the names the chart derives from the release's, the kubeconfigs, and a work
/// dir for the processes' logs and the agent's data.
struct Release {
    started: Instant,
    /// The admin's kubeconfig, and its path as a string (helm's `--kubeconfig`).
    kc: PathBuf,
    kcs: String,
    ns: String,
    admin: Client,
    /// Random: part of every name this test creates outside its namespace.
    suffix: String,
    /// The release name.
    name: String,
    /// `<release>-claw-secrets`: the prefix of the names of the chart's objects.
    fullname: String,
    /// The chart's directory, as a string.
    chart: String,
    /// On an external cluster (kind), where pods do run.
    external: bool,
    /// The operator's replicas the upgrade asks for.
    replicas: i32,
    /// The values every install and upgrade of the release passes: the webhook off (see
    /// `Release::new`), and on an external cluster, the release's pods kept from starting.
    values: Vec<String>,
    /// The Node the agent runs as (created by the test).
    node: String,
    /// `<fullname>-master-key`: the master key Secret the operator generates.
    master_key: String,
    /// The chart's ServiceAccounts, also the names of its Deployment and DaemonSet.
    operator_sa: String,
    agent_sa: String,
    /// Kubeconfigs with the tokens of those ServiceAccounts.
    operator_kc: PathBuf,
    agent_kc: PathBuf,
    /// Where the agent listens, whichever agent process runs, and its data dir.
    agent_port: u16,
    agent_addr: String,
    data_dir: PathBuf,
    /// Holds the processes' logs and the agent's data dir (removed after the processes).
    work: tempfile::TempDir,
    env: control_plane::TestEnv,
}

impl Release {
    /// A fresh namespace and the names of a release not installed yet.
    async fn new() -> Release {
        let started = Instant::now();
        let env = control_plane::test_env("helm").await;
        let kc = env.kubeconfig.clone();
        let kcs = kc.to_str().unwrap().to_owned();
        let ns = env.namespace.clone();
        let admin = env.client.clone();
        let suffix = random_hex(4);
        let name = format!("h-{suffix}");
        let fullname = format!("{name}-claw-secrets");
        let chart = chart().to_str().unwrap().to_owned();
        let work = tempfile::tempdir().expect("temp dir");

        // On an external cluster (kind) pods do run: keep this release's operator and agents
        // from starting there (a second operator would reconcile every namespace with another
        // master key). Locally nothing runs anyway, and the defaults are installed as they are.
        let external = control_plane::control_plane().is_external();
        let replicas = if external { 0 } else { 3 };
        // The operator runs here as a local process, not in a pod: the chart's webhook Service
        // would have no endpoints, and with failurePolicy Fail every ClawSecret write carrying
        // data would be refused. So this release goes without the webhook (the operator then
        // seals by reconciling, as it did before the webhook). tests/k8s_node.rs exercises the
        // chart's webhook with real pods, tests/k8s_operator.rs the webhook itself; the end of
        // this test checks what the chart's webhook does while no replica answers.
        let mut values: Vec<String> = vec!["--set".to_owned(), "webhook.enabled=false".to_owned()];
        // The release installs the CRDs (templates, kept on uninstall) unless they exist
        // already: on an external cluster other test binaries applied them without Helm, and
        // Helm refuses to take over objects it did not create.
        let crds = Api::<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>::all(admin.clone());
        if crds
            .get_opt("clawsecrets.clawbernetes.io")
            .await
            .expect("reading the CRDs")
            .is_some()
        {
            values.extend(["--set".to_owned(), "crds.install=false".to_owned()]);
        }
        if external {
            values.extend([
                "--set".to_owned(),
                "operator.replicaCount=0".to_owned(),
                "--set-string".to_owned(),
                r"agent.nodeSelector.claw-secrets\.test/never=true".to_owned(),
            ]);
        }

        let agent_port = free_port();
        Release {
            started,
            kcs,
            ns,
            admin,
            node: format!("helm-node-{suffix}"),
            master_key: format!("{fullname}-master-key"),
            operator_sa: format!("{fullname}-operator"),
            agent_sa: format!("{fullname}-agent"),
            operator_kc: work.path().join("operator.kubeconfig"),
            agent_kc: work.path().join("agent.kubeconfig"),
            agent_port,
            agent_addr: format!("https://127.0.0.1:{agent_port}"),
            data_dir: work.path().join("agent-data"),
            kc,
            suffix,
            name,
            fullname,
            chart,
            external,
            replicas,
            values,
            work,
            env,
        }
    }

    /// Progress, with the time since the start of the test.
    fn step(&self, what: &str) {
        eprintln!("[{:5.1}s] {what}", self.started.elapsed().as_secs_f64());
    }

    /// `helm VERB RELEASE CHART --namespace NS --kubeconfig KC EXTRA...`
    fn helm_chart(&self, verb: &str, extra: &[&str]) -> Run {
        let mut args = vec![
            verb,
            &self.name,
            &self.chart,
            "--namespace",
            &self.ns,
            "--kubeconfig",
            &self.kcs,
        ];
        args.extend_from_slice(extra);
        helm(&args)
    }

    /// The Secrets of the test's namespace, as the admin.
    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.admin.clone(), &self.ns)
    }

    /// `claw-secrets invoke` on the test's node, through the agent.
    fn invoke(&self, token: &str, command: &str, params: Value) -> Result<Value, String> {
        invoke(&self.agent_addr, &self.node, token, command, params)
    }

    /// What the downward API gives a pod `pod` of the release on the test's node.
    fn downward(&self, pod: &str) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("metadata.name", pod.to_owned()),
            ("metadata.namespace", self.ns.clone()),
            ("spec.nodeName", self.node.clone()),
        ])
    }

    /// The operator as the Deployment of `objects` runs it, watching `watch`, as pod `pod`;
    /// and its metrics port.
    fn start_operator(&self, objects: &[Value], watch: &str, pod: &str) -> (Proc, u16) {
        let container = &pod_spec(the(objects, "Deployment"))["containers"][0];
        let port = free_port();
        let mut replace = vec![("--metrics-addr", format!("127.0.0.1:{port}"))];
        // With the webhook, its pod's emptyDir: a directory of this replica's own here.
        if strings(&container["args"])
            .iter()
            .any(|a| a.starts_with("--data-dir="))
        {
            let dir = self.work.path().join(format!("{pod}-data"));
            replace.push(("--data-dir", dir.display().to_string()));
        }
        let (args, env) = local_command(
            container,
            &replace,
            &[format!("--watch-namespace={watch}")],
            &self.downward(pod),
        );
        let log = self.work.path().join(format!("{pod}.log"));
        (
            Proc::spawn(
                &format!("operator {pod}"),
                &args,
                &env,
                &self.operator_kc,
                log,
            ),
            port,
        )
    }

    /// The agent as the DaemonSet of `objects` runs it, as pod `pod`; with a serving
    /// certificate from the test CA (the chart's agents ask the operator for theirs through a
    /// CSR: tests/k8s_agent_certs.rs and the node test, where one operator signs for the
    /// cluster; here several releases' operators run side by side, each with its own
    /// `--watch-namespace`, so none signs).
    fn start_agent(&self, objects: &[Value], pod: &str) -> Proc {
        let container = &pod_spec(the(objects, "DaemonSet"))["containers"][0];
        let (cert, key) = cluster::test_ca().issue(
            &self.node,
            std::net::Ipv4Addr::LOCALHOST.into(),
            self.work.path(),
        );
        let (args, env) = local_command(
            container,
            &[
                ("--data-dir", self.data_dir.display().to_string()),
                ("--listen", format!("127.0.0.1:{}", self.agent_port)),
            ],
            &[
                format!("--tls-cert={}", cert.display()),
                format!("--tls-key={}", key.display()),
            ],
            &self.downward(pod),
        );
        let log = self.work.path().join(format!("{pod}.log"));
        Proc::spawn(&format!("agent {pod}"), &args, &env, &self.agent_kc, log)
    }

    /// The end: the test's namespace deleted.
    async fn done(self) {
        self.step("done");
        self.env.cleanup().await;
    }
}

/// The operator and an agent of the release, running as local processes with the chart's
/// ServiceAccounts (killed when dropped), and clients acting as those ServiceAccounts.
struct Running {
    operator_client: Client,
    agent_client: Client,
    operator: Proc,
    agent: Proc,
    /// The processes a restart replaced: kept until the end for their logs, should it fail.
    retired: Vec<Proc>,
}

impl Running {
    /// Replaces the operator by `started` (from `Release::start_operator`: the process and its
    /// metrics port) and waits until it leads.
    async fn replace_operator(&mut self, (started, metrics): (Proc, u16)) {
        self.retired
            .push(std::mem::replace(&mut self.operator, started));
        self.operator
            .wait_for(metrics, "/metrics", "claw_secrets_operator_leader 1")
            .await;
    }

    /// Replaces the agent by `started` (from `Release::start_agent`) and waits until it is
    /// ready.
    async fn replace_agent(&mut self, r: &Release, started: Proc) {
        self.retired
            .push(std::mem::replace(&mut self.agent, started));
        self.agent.wait_ready_agent(r.agent_port).await;
    }
}

/// `helm install` prints the release notes, the CRDs are served, and the API server holds
/// exactly the objects of the release's manifest. Returns that manifest.
async fn helm_install_creates_exactly_the_rendered_objects(r: &Release) -> Vec<Value> {
    r.step("helm install");
    let values: Vec<&str> = r.values.iter().map(String::as_str).collect();
    let notes = must(r.helm_chart("install", &values), "helm install");
    assert!(
        notes.contains("NOTES:") && notes.contains(&format!("--clusterrole={}-editor", r.fullname)),
        "helm install prints the release notes:\n{notes}"
    );
    // Helm installed the CRDs from the chart's crds/ (or found them installed); once served:
    cluster::crds_served(&r.admin).await;
    let installed = manifest(&r.kc, &r.name, &r.ns);
    assert_eq!(
        release_objects(&r.kc, &r.name),
        ids(&installed),
        "the API server holds exactly the rendered objects"
    );
    installed
}

/// A typo in a value of `helm upgrade` fails the upgrade, naming the misspelt key.
fn an_upgrade_with_a_typo_is_refused(r: &Release) {
    r.step("helm upgrade with a typo: refused");
    let refused = r.helm_chart("upgrade", &["--set", "operator.replicaCont=3"]);
    assert!(
        !refused.ok && refused.stderr.contains("'replicaCont' not allowed"),
        "helm upgrade with a typo: {}",
        refused.stderr
    );
}

/// The operator and an agent run with the tokens of the ServiceAccounts the chart created and
/// the flags and environment its Deployment and DaemonSet give them: the operator gets ready,
/// leads and generates the master key Secret; the agent gets ready. Returns them, and that
/// Secret.
async fn operator_and_agent_run_with_the_chart_identities(
    r: &Release,
    installed: &[Value],
) -> (Running, Secret) {
    r.step("operator and agent with the chart's ServiceAccount tokens");
    tokens::kubeconfig_with_token(
        &r.kc,
        &cluster::service_account_token(&r.admin, &r.ns, &r.operator_sa).await,
        &r.operator_kc,
    );
    tokens::kubeconfig_with_token(
        &r.kc,
        &cluster::service_account_token(&r.admin, &r.ns, &r.agent_sa).await,
        &r.agent_kc,
    );
    let operator_client = client_for(&r.operator_kc).await;
    let agent_client = client_for(&r.agent_kc).await;
    cluster::create_node(&r.admin, &r.node, &[]).await;

    let (mut operator, metrics) = r.start_operator(installed, &r.ns, "operator-0");
    operator.wait_for(metrics, "/readyz", "").await;
    operator
        .wait_for(metrics, "/metrics", "claw_secrets_operator_leader 1")
        .await;
    let generated_key = r.secrets().get(&r.master_key).await.unwrap_or_else(|e| {
        panic!(
            "the operator created no master key Secret {}: {e}\n{}",
            r.master_key,
            operator.log_tail()
        )
    });
    // The public sealing key, published with the chart's RBAC (server-side apply).
    let published = eventually("the sealing key ConfigMap", || async {
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(r.admin.clone(), &r.ns)
            .get(SEALING_KEY)
            .await
            .map_err(|e| format!("{e}\n{}", operator.log_tail()))
    })
    .await;
    assert!(
        published
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("sealing-key")),
        "{published:?}"
    );
    let mut agent = r.start_agent(installed, "agent-0");
    agent.wait_ready_agent(r.agent_port).await;
    let running = Running {
        operator_client,
        agent_client,
        operator,
        agent,
        retired: Vec::new(),
    };
    (running, generated_key)
}

/// The ConfigMap the operator publishes the public sealing key in, in its namespace.
const SEALING_KEY: &str = "claw-secrets-sealing-key";
/// The agents' CA Secret and bundle ConfigMap, and their signer.
const AGENT_CA: &str = claw_secrets::k8s::agent_certs::CA_SECRET;
const AGENT_SIGNER: &str = claw_secrets::k8s::agent_certs::SIGNER_NAME;

/// ClawSecret `helm.first`, applied before the upgrade: its value, and the key it was sealed
/// with.
struct FirstSecret {
    canary: String,
    key_id: String,
}

/// A ClawSecret applied with `kubectl apply` is sealed (its plaintext gone) and Ready.
async fn a_claw_secret_applied_with_kubectl_is_sealed(r: &Release) -> FirstSecret {
    r.step("kubectl apply a ClawSecret: sealed and Ready");
    let canary = format!("canary-{}", random_hex(8));
    kubectl_apply(
        &r.kc,
        &json!({
            "apiVersion": "clawbernetes.io/v1beta1",
            "kind": "ClawSecret",
            "metadata": {"name": "helm.first", "namespace": r.ns},
            "spec": {"data": {"password": canary}, "allowedWorkloads": ["reader"]},
        }),
    );
    let key_id = wait_sealed(&r.admin, &r.ns, "helm.first", 1).await;
    FirstSecret { canary, key_id }
}

/// The workload `helm.first` allows reads its value through node.invoke. Returns the
/// workload's token.
async fn the_allowed_workload_reads_it_through_node_invoke(
    r: &Release,
    first: &FirstSecret,
) -> String {
    r.step("node.invoke: the allowed workload reads helm.first");
    let reader = cluster::service_account_token(&r.admin, &r.ns, "reader").await;
    let got = eventually("the workload reads helm.first", || async {
        r.invoke(&reader, "secret.get", json!({"name": "helm.first"}))
    })
    .await;
    assert_eq!(got["data"], json!({"password": first.canary}));
    assert_eq!(got["version"], 1);
    reader
}

/// The tokens of alice, bound to the release's editor role, and of bob, bound to its viewer
/// role, in the test's namespace.
struct Users {
    alice: String,
    bob: String,
}

/// The release's editor and viewer ClusterRoles bind (to alice and bob).
async fn alice_is_bound_as_editor_and_bob_as_viewer(r: &Release) -> Users {
    r.step("node.invoke: alice edits, bob views");
    bind(
        &r.admin,
        &r.ns,
        "alice-edits",
        &format!("{}-editor", r.fullname),
        cluster::user_subject("alice"),
    )
    .await;
    bind(
        &r.admin,
        &r.ns,
        "bob-views",
        &format!("{}-viewer", r.fullname),
        cluster::user_subject("bob"),
    )
    .await;
    let cp = control_plane::control_plane();
    Users {
        alice: cp.user_token("alice").expect("alice"),
        bob: cp.user_token("bob").expect("bob"),
    }
}

/// Through node.invoke, the editor creates `helm.api`, reads it, rotates it, and the node
/// serves the rotated value.
async fn the_editor_creates_reads_and_rotates_through_node_invoke(r: &Release, users: &Users) {
    let ns = &r.ns;
    let alice = &users.alice;
    let created = eventually("alice creates helm.api", || async {
        r.invoke(
            alice,
            "secret.create",
            json!({
                "name": "helm.api",
                "namespace": ns,
                "data": {"key": "v1"},
                "allowed_workloads": ["reader"],
            }),
        )
    })
    .await;
    assert_eq!(created["version"], 1);
    let got = eventually("alice reads helm.api", || async {
        r.invoke(
            alice,
            "secret.get",
            json!({"name": "helm.api", "namespace": ns}),
        )
    })
    .await;
    assert_eq!(got["data"], json!({"key": "v1"}));
    let rotated = r
        .invoke(
            alice,
            "secret.rotate",
            json!({"name": "helm.api", "namespace": ns, "newData": {"key": "v2"}}),
        )
        .expect("alice rotates helm.api");
    assert_eq!(rotated["version"], 2);
    eventually("helm.api v2 on the node", || async {
        let got = r.invoke(
            alice,
            "secret.get",
            json!({"name": "helm.api", "namespace": ns}),
        )?;
        (got["version"] == 2 && got["data"] == json!({"key": "v2"}))
            .then_some(())
            .ok_or(format!("{got}"))
    })
    .await;
}

/// Through node.invoke, the viewer lists the namespace's two ClawSecrets but is refused their
/// values and creating one.
fn the_viewer_lists_but_neither_reads_nor_creates(r: &Release, users: &Users) {
    let ns = &r.ns;
    let bob = &users.bob;
    let listed = r
        .invoke(bob, "secret.list", json!({"namespace": ns}))
        .expect("bob lists");
    assert_eq!(
        listed["secrets"].as_array().map(Vec::len),
        Some(2),
        "{listed}"
    );
    let denied = r
        .invoke(
            bob,
            "secret.get",
            json!({"name": "helm.api", "namespace": ns}),
        )
        .expect_err("the viewer role reveals no values");
    assert!(denied.starts_with("PERMISSION_DENIED"), "{denied}");
    let denied = r
        .invoke(
            bob,
            "secret.create",
            json!({"name": "bob.secret", "namespace": ns, "data": {"k": "v"}}),
        )
        .expect_err("the viewer role creates nothing");
    assert!(denied.starts_with("PERMISSION_DENIED"), "{denied}");
}

/// Through node.invoke, the editor deletes `helm.api`, and it leaves the node.
async fn the_editor_deletes_through_node_invoke(r: &Release, users: &Users) {
    let ns = &r.ns;
    let alice = &users.alice;
    let deleted = r
        .invoke(
            alice,
            "secret.delete",
            json!({"name": "helm.api", "namespace": ns}),
        )
        .expect("alice deletes helm.api");
    assert_eq!(deleted["deleted"], true);
    eventually("helm.api gone from the node", || async {
        match r.invoke(
            alice,
            "secret.get",
            json!({"name": "helm.api", "namespace": ns}),
        ) {
            Err(e) if e.starts_with("NOT_FOUND") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
}

/// The `sh.helm.release.v1.<release>.v1` Secret: helm's record of the release, a Secret
/// neither the operator nor the agent may read.
fn helm_record(r: &Release) -> String {
    format!("sh.helm.release.v1.{}.v1", r.name)
}

/// The operator's ServiceAccount may read its master key Secret, create Secrets and its Lease
/// in its namespace, write the sealing key ConfigMap there, write ClawSecrets, ClawConfig
/// statuses and Events everywhere; and nothing else asked here: no Secret listing, no other
/// Secret, no other ConfigMap, no Lease elsewhere, no Node deletion, no ClawSecret creation or
/// deletion, no pods, no Deployments, and (this release has no webhook) no webhook
/// configuration and no webhook certificate Secret.
async fn the_operator_role_allows_what_it_needs_and_no_more(r: &Release, running: &Running) {
    r.step("the chart's roles: what they allow and what they refuse");
    let ns = r.ns.as_str();
    let helm_secret = helm_record(r);
    expect_access(
        "operator",
        &running.operator_client,
        &[
            (true, "get secrets", Some(ns), Some(&r.master_key)),
            (true, "create secrets", Some(ns), None),
            (true, "create leases.coordination.k8s.io", Some(ns), None),
            (true, "get pods", Some(ns), None),
            (
                true,
                "patch clawsecrets.clawbernetes.io",
                Some("default"),
                None,
            ),
            (
                true,
                "patch clawconfigs/status.clawbernetes.io",
                Some("default"),
                None,
            ),
            (true, "create events.events.k8s.io", Some("default"), None),
            (true, "create configmaps", Some(ns), Some(SEALING_KEY)),
            (true, "patch configmaps", Some(ns), Some(SEALING_KEY)),
            // The agents' serving certificates: their CA and bundle by name, the requests, and
            // this signer only.
            (true, "get secrets", Some(ns), Some(AGENT_CA)),
            (true, "patch configmaps", Some(ns), Some(AGENT_CA)),
            (
                true,
                "watch certificatesigningrequests.certificates.k8s.io",
                None,
                None,
            ),
            (
                true,
                "update certificatesigningrequests/approval.certificates.k8s.io",
                None,
                None,
            ),
            (
                true,
                "update certificatesigningrequests/status.certificates.k8s.io",
                None,
                None,
            ),
            (
                true,
                "sign signers.certificates.k8s.io",
                None,
                Some(AGENT_SIGNER),
            ),
            (
                false,
                "approve signers.certificates.k8s.io",
                None,
                Some("kubernetes.io/kubelet-serving"),
            ),
            (
                false,
                "create certificatesigningrequests.certificates.k8s.io",
                None,
                None,
            ),
            // Nothing the operator does not use: it never reads the ConfigMap back, never
            // updates (PUT) the objects or their status, never patches an Event.
            (false, "get configmaps", Some(ns), Some(SEALING_KEY)),
            (
                false,
                "update clawsecrets.clawbernetes.io",
                Some("default"),
                None,
            ),
            (
                false,
                "update clawsecrets/status.clawbernetes.io",
                Some("default"),
                None,
            ),
            (false, "patch events.events.k8s.io", Some("default"), None),
            (false, "create configmaps", Some(ns), Some("other")),
            // A plain POST names no object: refused (the operator creates by apply).
            (false, "create configmaps", Some(ns), None),
            (false, "patch configmaps", Some(ns), Some("other")),
            (false, "list configmaps", Some(ns), None),
            (
                false,
                "create configmaps",
                Some("default"),
                Some(SEALING_KEY),
            ),
            (
                false,
                "update mutatingwebhookconfigurations.admissionregistration.k8s.io",
                None,
                Some(&r.fullname),
            ),
            (
                false,
                "update secrets",
                Some(ns),
                Some(&format!("{}-webhook-tls", r.fullname)),
            ),
            (false, "list secrets", None, None),
            (false, "list secrets", Some(ns), None),
            (false, "get secrets", Some(ns), Some(&helm_secret)),
            (false, "get secrets", Some("kube-system"), None),
            (
                false,
                "create leases.coordination.k8s.io",
                Some("default"),
                None,
            ),
            (false, "delete nodes", None, Some(&r.node)),
            (
                false,
                "create clawsecrets.clawbernetes.io",
                Some("default"),
                None,
            ),
            (
                false,
                "delete clawsecrets.clawbernetes.io",
                Some("default"),
                None,
            ),
            (false, "create pods", Some(ns), None),
            (false, "list pods", Some(ns), None),
            (false, "get pods", Some("default"), None),
            (false, "update deployments.apps", Some(ns), None),
        ],
    )
    .await;
}

/// The agent's ServiceAccount may read its master key Secret, review tokens and access, watch
/// ClawSecrets and Nodes and publish ClawNodes; and nothing else asked here: no ClawSecret or
/// ClawConfig write (made with the caller's token), no other Secret,
/// no Secret listing or creation, no ClawSecret status, no `reveal`, no Node change, no Lease,
/// no pods.
async fn the_agent_role_allows_what_it_needs_and_no_more(r: &Release, running: &Running) {
    let ns = r.ns.as_str();
    let helm_secret = helm_record(r);
    expect_access(
        "agent",
        &running.agent_client,
        &[
            (true, "get secrets", Some(ns), Some(&r.master_key)),
            (
                true,
                "create tokenreviews.authentication.k8s.io",
                None,
                None,
            ),
            (
                true,
                "create subjectaccessreviews.authorization.k8s.io",
                None,
                None,
            ),
            (true, "watch clawsecrets.clawbernetes.io", None, None),
            // Writes are made with the caller's token: the agent's own makes none.
            (
                false,
                "create clawsecrets.clawbernetes.io",
                Some("default"),
                None,
            ),
            (
                false,
                "update clawsecrets.clawbernetes.io",
                Some("default"),
                None,
            ),
            (
                false,
                "delete clawconfigs.clawbernetes.io",
                Some("default"),
                None,
            ),
            (true, "create clawnodes.clawbernetes.io", None, None),
            (true, "watch nodes", None, None),
            // Its serving certificate: a request, read back; the bundle; never a decision.
            (
                true,
                "create certificatesigningrequests.certificates.k8s.io",
                None,
                None,
            ),
            (
                true,
                "get certificatesigningrequests.certificates.k8s.io",
                None,
                None,
            ),
            (true, "get configmaps", Some(ns), Some(AGENT_CA)),
            (
                false,
                "update certificatesigningrequests/approval.certificates.k8s.io",
                None,
                None,
            ),
            (
                false,
                "approve signers.certificates.k8s.io",
                None,
                Some(AGENT_SIGNER),
            ),
            (false, "get secrets", Some(ns), Some(&helm_secret)),
            (false, "list secrets", None, None),
            (false, "create secrets", Some(ns), None),
            (
                false,
                "update clawsecrets/status.clawbernetes.io",
                Some("default"),
                None,
            ),
            (
                false,
                "reveal clawsecrets.clawbernetes.io",
                Some("default"),
                None,
            ),
            (false, "patch nodes", None, Some(&r.node)),
            (false, "delete nodes", None, Some(&r.node)),
            (false, "create leases.coordination.k8s.io", Some(ns), None),
            (false, "create pods", Some(ns), None),
        ],
    )
    .await;
}

/// And for real: the API server answers 403 to the operator listing Secrets cluster-wide, to
/// the agent reading helm's record of the release, and to the operator deleting a Node.
async fn the_api_server_forbids_what_the_roles_do_not_grant(r: &Release, running: &Running) {
    let forbidden =
        |res: Result<_, kube::Error>| matches!(res, Err(kube::Error::Api(s)) if s.code == 403);
    assert!(
        forbidden(
            Api::<Secret>::all(running.operator_client.clone())
                .list(&ListParams::default())
                .await
                .map(|_| ())
        ),
        "the operator lists Secrets cluster-wide"
    );
    assert!(
        forbidden(
            Api::<Secret>::namespaced(running.agent_client.clone(), &r.ns)
                .get(&helm_record(r))
                .await
                .map(|_| ())
        ),
        "the agent reads an arbitrary Secret"
    );
    assert!(
        forbidden(
            Api::<k8s_openapi::api::core::v1::Node>::all(running.operator_client.clone())
                .delete(&r.node, &Default::default())
                .await
                .map(|_| ())
        ),
        "the operator deletes a Node"
    );
}

/// `helm upgrade` to an existing master key Secret (the operator's, copied: a restore),
/// NetworkPolicies on, `replicas` operator replicas, no hostPort, another lease duration: the
/// API server then holds exactly the objects of the new manifest, both NetworkPolicies among
/// them. Returns that manifest.
async fn upgrade_to_an_existing_master_key(r: &Release, generated_key: &Secret) -> Vec<Value> {
    r.step("helm upgrade to masterKey.existingSecret");
    r.secrets()
        .create(
            &PostParams::default(),
            &Secret {
                metadata: ObjectMeta {
                    name: Some(RESTORED_MASTER_KEY.to_owned()),
                    ..ObjectMeta::default()
                },
                data: generated_key.data.clone(),
                type_: generated_key.type_.clone(),
                ..Secret::default()
            },
        )
        .await
        .expect("copying the master key Secret");
    let existing = format!("masterKey.existingSecret={RESTORED_MASTER_KEY}");
    let replica_count = format!("operator.replicaCount={}", r.replicas);
    let mut values = vec![
        "--set",
        &existing,
        "--set",
        "networkPolicy.enabled=true",
        "--set",
        &replica_count,
        "--set",
        "agent.hostPort=0",
        "--set",
        "operator.leaseDurationSeconds=20",
    ];
    values.extend(r.values.iter().map(String::as_str));
    must(r.helm_chart("upgrade", &values), "helm upgrade");
    let upgraded = manifest(&r.kc, &r.name, &r.ns);
    assert_eq!(
        release_objects(&r.kc, &r.name),
        ids(&upgraded),
        "after the upgrade, exactly its objects"
    );
    assert_eq!(
        upgraded
            .iter()
            .filter(|o| o["kind"] == "NetworkPolicy")
            .count(),
        2,
        "after the upgrade, two NetworkPolicies"
    );
    upgraded
}

/// After the upgrade, the Deployment and DaemonSet the API server holds have the upgraded
/// values: the replicas, the lease duration flag, the agent's port without a hostPort; and the
/// upgraded manifest wires the existing master key Secret.
fn the_upgraded_workloads_get_the_upgraded_values(r: &Release, upgraded: &[Value]) {
    let deployment: Value = serde_json::from_str(&must(
        kubectl(
            &r.kc,
            &[
                "get",
                "deployment",
                &r.operator_sa,
                "-n",
                &r.ns,
                "-o",
                "json",
            ],
        ),
        "kubectl get deployment",
    ))
    .unwrap();
    assert_eq!(deployment["spec"]["replicas"], r.replicas);
    let operator_args = strings(&deployment["spec"]["template"]["spec"]["containers"][0]["args"]);
    assert_eq!(flag(&operator_args, "--lease-duration-seconds"), "20");
    let agent_ports: Value = serde_json::from_str(&must(
        kubectl(
            &r.kc,
            &[
                "get",
                "daemonset",
                &r.agent_sa,
                "-n",
                &r.ns,
                "-o",
                "jsonpath={.spec.template.spec.containers[0].ports}",
            ],
        ),
        "kubectl get daemonset",
    ))
    .unwrap();
    assert_eq!(agent_ports[0]["containerPort"], 7443);
    assert!(
        agent_ports[0].get("hostPort").is_none(),
        "hostPort 0: {agent_ports}"
    );
    assert_eq!(master_key_wiring(upgraded, &r.ns), RESTORED_MASTER_KEY);
}

/// After the upgrade, the operator and the agent may read the existing master key Secret and
/// no longer the generated one; the operator still creates Secrets (the agents' CA).
async fn the_roles_follow_the_master_key_to_the_existing_secret(r: &Release, running: &Running) {
    let ns = r.ns.as_str();
    expect_access(
        "operator after the upgrade",
        &running.operator_client,
        &[
            (true, "get secrets", Some(ns), Some(RESTORED_MASTER_KEY)),
            (false, "get secrets", Some(ns), Some(&r.master_key)),
            (true, "create secrets", Some(ns), None),
        ],
    )
    .await;
    expect_access(
        "agent after the upgrade",
        &running.agent_client,
        &[
            (true, "get secrets", Some(ns), Some(RESTORED_MASTER_KEY)),
            (false, "get secrets", Some(ns), Some(&r.master_key)),
        ],
    )
    .await;
}

/// The operator and the agent, restarted with the upgraded flags: a new ClawSecret is sealed
/// with the same key (read from the existing Secret), and the workload reads both it and the
/// ClawSecret sealed before the upgrade.
async fn restarted_with_the_upgraded_flags_the_same_key_seals(
    r: &Release,
    running: &mut Running,
    upgraded: &[Value],
    first: &FirstSecret,
    reader: &str,
) {
    r.step("operator and agent restarted with the upgraded flags");
    running.operator.terminate();
    running.agent.terminate();
    running
        .replace_operator(r.start_operator(upgraded, &r.ns, "operator-1"))
        .await;
    running
        .replace_agent(r, r.start_agent(upgraded, "agent-1"))
        .await;
    kubectl_apply(
        &r.kc,
        &json!({
            "apiVersion": "clawbernetes.io/v1beta1",
            "kind": "ClawSecret",
            "metadata": {"name": "helm.after-upgrade", "namespace": r.ns},
            "spec": {"data": {"token": "t-2"}, "allowedWorkloads": ["reader"]},
        }),
    );
    assert_eq!(
        wait_sealed(&r.admin, &r.ns, "helm.after-upgrade", 1).await,
        first.key_id,
        "sealed with the same key, read from the existing Secret"
    );
    for (name, data) in [
        ("helm.first", json!({"password": first.canary})),
        ("helm.after-upgrade", json!({"token": "t-2"})),
    ] {
        let got = eventually(&format!("the workload reads {name}"), || async {
            r.invoke(reader, "secret.get", json!({"name": name}))
        })
        .await;
        assert_eq!(got["data"], data);
    }
}

/// The namespace of the examples.
const DEMO: &str = "claw-demo";

/// `kubectl apply -f examples/`, with the operator now watching their namespace, applies
/// every example; their ClawSecrets are sealed and their ClawConfig is Ready.
async fn examples_apply_and_become_ready(r: &Release, running: &mut Running, upgraded: &[Value]) {
    r.step("kubectl apply -f examples/");
    running.operator.terminate();
    running
        .replace_operator(r.start_operator(upgraded, DEMO, "operator-2"))
        .await;
    let examples = repo().join("examples");
    if r.external {
        // A namespace claw-demo left by an earlier run may still be terminating.
        let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(r.admin.clone());
        eventually("namespace claw-demo not terminating", || async {
            match namespaces.get_opt(DEMO).await.map_err(|e| e.to_string())? {
                Some(n) if n.metadata.deletion_timestamp.is_some() => Err("terminating".into()),
                _ => Ok(()),
            }
        })
        .await;
    }
    let applied = must(
        kubectl(&r.kc, &["apply", "-f", examples.to_str().unwrap()]),
        "kubectl apply -f examples/",
    );
    eprintln!("{applied}");
    for expected in [
        "namespace/claw-demo",
        "clawsecret.clawbernetes.io/db.credentials",
        "clawsecret.clawbernetes.io/external.openai",
        "clawconfig.clawbernetes.io/app.production",
        "serviceaccount/api-server",
        "rolebinding.rbac.authorization.k8s.io/api-server-reads-configs",
        "deployment.apps/api-server",
    ] {
        assert!(
            applied.contains(expected),
            "{expected} not applied:\n{applied}"
        );
    }
    wait_sealed(&r.admin, DEMO, "db.credentials", 1).await;
    wait_sealed(&r.admin, DEMO, "external.openai", 1).await;
    wait_config_ready(&r.admin, DEMO, "app.production").await;
}

/// With its own token, the example workload reads its ClawSecret through node.invoke, and is
/// refused the other example's. Returns that token.
async fn the_example_workload_reads_its_own_secret_only(r: &Release) -> String {
    r.step("the example workload: its secret, not the other one");
    let workload = cluster::service_account_token(&r.admin, DEMO, "api-server").await;
    let got = eventually("api-server reads db.credentials", || async {
        r.invoke(&workload, "secret.get", json!({"name": "db.credentials"}))
    })
    .await;
    assert_eq!(
        got["data"],
        json!({"host": "db.internal", "port": "5432", "username": "app", "password": "secret"})
    );
    let denied = r
        .invoke(&workload, "secret.get", json!({"name": "external.openai"}))
        .expect_err("api-server may not read the inference server's key");
    assert!(denied.starts_with("PERMISSION_DENIED"), "{denied}");
    workload
}

/// The example RoleBinding names the viewer role of a release called "claw-secrets"; bound the
/// same way to this release's viewer role, the example workload reads the example ClawConfig
/// through node.invoke. That ClawConfig is immutable: the API server refuses a change. The
/// example Deployment exists.
async fn the_example_config_is_readable_when_bound_and_immutable(r: &Release, workload: &str) {
    r.step("the example config: readable with the viewer role, immutable");
    let example_binding = Api::<RoleBinding>::namespaced(r.admin.clone(), DEMO)
        .get("api-server-reads-configs")
        .await
        .expect("the example RoleBinding");
    assert_eq!(example_binding.role_ref.name, "claw-secrets-viewer");
    bind(
        &r.admin,
        DEMO,
        &format!("api-server-reads-configs-{}", r.suffix),
        &format!("{}-viewer", r.fullname),
        cluster::service_account_subject(DEMO, "api-server"),
    )
    .await;
    let config = eventually("api-server reads app.production", || async {
        r.invoke(workload, "config.get", json!({"name": "app.production"}))
    })
    .await;
    assert_eq!(config["immutable"], true);
    assert_eq!(config["data"]["log_level"], "warn");
    let refused = kubectl(
        &r.kc,
        &[
            "patch",
            "clawconfig",
            "app.production",
            "-n",
            DEMO,
            "--type",
            "merge",
            "-p",
            r#"{"spec":{"data":{"log_level":"debug"}}}"#,
        ],
    );
    assert!(
        !refused.ok && refused.stderr.contains("immutable"),
        "patching the immutable ClawConfig: {}",
        refused.stderr
    );
    must(
        kubectl(&r.kc, &["get", "deployment", "api-server", "-n", DEMO]),
        "the example Deployment exists",
    );
}

/// `kubectl delete` removes each example (nothing waits for the operator), waiting for
/// the ClawSecrets and the ClawConfig to go; then the test's RoleBinding and the namespace.
async fn the_examples_are_deleted_while_the_operator_runs(r: &Release) {
    r.step("kubectl delete -f examples/");
    let examples = repo().join("examples");
    for file in [
        "10-db-credentials.yaml",
        "20-api-key.yaml",
        "30-app-config.yaml",
    ] {
        must(
            kubectl(
                &r.kc,
                &[
                    "delete",
                    "-f",
                    examples.join(file).to_str().unwrap(),
                    "--wait=true",
                    "--timeout=60s",
                ],
            ),
            &format!("kubectl delete -f examples/{file}"),
        );
    }
    must(
        kubectl(
            &r.kc,
            &[
                "delete",
                "-f",
                examples.join("40-workload.yaml").to_str().unwrap(),
            ],
        ),
        "kubectl delete -f examples/40-workload.yaml",
    );
    Api::<RoleBinding>::namespaced(r.admin.clone(), DEMO)
        .delete(
            &format!("api-server-reads-configs-{}", r.suffix),
            &Default::default(),
        )
        .await
        .expect("removing the test's RoleBinding");
    must(
        kubectl(
            &r.kc,
            &[
                "delete",
                "-f",
                examples.join("00-namespace.yaml").to_str().unwrap(),
                "--wait=false",
            ],
        ),
        "kubectl delete -f examples/00-namespace.yaml",
    );
}

/// With the operator and the agent stopped, `helm uninstall` leaves no object labelled with
/// the release and none of helm's records of it.
fn uninstall_removes_every_object_of_the_release(r: &Release, running: &mut Running) {
    r.step("helm uninstall");
    running.operator.terminate();
    running.agent.terminate();
    must(
        helm(&[
            "uninstall",
            &r.name,
            "--namespace",
            &r.ns,
            "--kubeconfig",
            &r.kcs,
        ]),
        "helm uninstall",
    );
    let left = labelled(&r.kc, &r.name);
    assert!(left.is_empty(), "orphans of the release: {left:?}");
    let history = must(
        kubectl(
            &r.kc,
            &[
                "get",
                "secrets",
                "-n",
                &r.ns,
                "-l",
                &format!("owner=helm,name={}", r.name),
                "-o",
                "name",
            ],
        ),
        "helm's release records",
    );
    assert!(
        history.trim().is_empty(),
        "helm's release records remain: {history}"
    );
}

/// Kept by design after `helm uninstall`: the CRDs, the master key Secrets (generated and
/// existing), the ClawSecrets (and the operator's Lease and Events, runtime state like the
/// master key, not checked). Returns the names of the kept ClawSecrets.
async fn uninstall_keeps_the_crds_master_keys_and_claw_secrets(r: &Release) -> Vec<String> {
    for crd in ["clawsecrets.clawbernetes.io", "clawconfigs.clawbernetes.io"] {
        must(
            kubectl(&r.kc, &["get", "crd", crd]),
            &format!("CRD {crd} is kept"),
        );
    }
    r.secrets()
        .get(&r.master_key)
        .await
        .expect("the generated master key Secret is kept");
    r.secrets()
        .get(RESTORED_MASTER_KEY)
        .await
        .expect("the user's master key Secret is kept");
    let kept: Vec<String> = Api::<ClawSecret>::namespaced(r.admin.clone(), &r.ns)
        .list(&ListParams::default())
        .await
        .expect("listing ClawSecrets")
        .items
        .into_iter()
        .filter_map(|s| s.metadata.name)
        .collect();
    assert_eq!(
        kept,
        ["helm.after-upgrade", "helm.first"],
        "ClawSecrets are kept"
    );
    kept
}

/// A second release, with the chart's defaults (the webhook on, managed by the operator), and
/// its operator, a local process with its ServiceAccount's token and its Deployment's flags.
struct WebhookRelease {
    name: String,
    /// The MutatingWebhookConfiguration, `<release>-claw-secrets`.
    configuration: String,
    operator: Proc,
}

/// The MutatingWebhookConfiguration `name`, as the admin reads it.
async fn webhook_configuration(
    r: &Release,
    name: &str,
) -> k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration {
    Api::all(r.admin.clone())
        .get(name)
        .await
        .unwrap_or_else(|e| panic!("MutatingWebhookConfiguration {name}: {e}"))
}

/// A release with the webhook on: its configuration comes without a caBundle; its operator,
/// with the chart's RBAC, creates its certificate Secret and writes that Secret's CA into the
/// configuration's caBundle.
async fn a_webhook_release_gets_its_ca_bundle_from_the_operator(r: &Release) -> WebhookRelease {
    r.step("a release with the webhook: the operator writes the caBundle");
    let name = format!("w-{}", r.suffix);
    let fullname = format!("{name}-claw-secrets");
    let helm_release = |verb: &str, extra: &[&str]| {
        let mut args = vec![
            verb,
            name.as_str(),
            r.chart.as_str(),
            "--namespace",
            r.ns.as_str(),
            "--kubeconfig",
            r.kcs.as_str(),
        ];
        args.extend_from_slice(extra);
        helm(&args)
    };
    must(
        helm_release("install", &["--set", "crds.install=false"]),
        "helm install (webhook on)",
    );
    let installed = manifest(&r.kc, &name, &r.ns);
    assert_eq!(release_objects(&r.kc, &name), ids(&installed));
    let configuration = fullname.clone();
    let before = webhook_configuration(r, &configuration).await;
    let hooks = before.webhooks.unwrap_or_default();
    assert_eq!(hooks.len(), 1);
    assert!(
        hooks[0].client_config.ca_bundle.is_none(),
        "helm installs no caBundle"
    );

    // Its operator: serves the webhook on a free local port (not reached: the Service has no
    // endpoints here), reconciles a namespace that holds nothing.
    let sa = format!("{fullname}-operator");
    let kc = r.work.path().join("webhook-operator.kubeconfig");
    tokens::kubeconfig_with_token(
        &r.kc,
        &cluster::service_account_token(&r.admin, &r.ns, &sa).await,
        &kc,
    );
    let container = &pod_spec(the(&installed, "Deployment"))["containers"][0];
    let metrics = free_port();
    let (args, env) = local_command(
        container,
        &[
            ("--metrics-addr", format!("127.0.0.1:{metrics}")),
            ("--webhook-addr", format!("127.0.0.1:{}", free_port())),
            // Its pod's emptyDir: a directory of its own here.
            (
                "--data-dir",
                r.work
                    .path()
                    .join("webhook-operator-0-data")
                    .display()
                    .to_string(),
            ),
        ],
        &[format!("--watch-namespace=nothing-{}", r.suffix)],
        &r.downward("webhook-operator-0"),
    );
    let mut operator = Proc::spawn(
        "operator of the webhook release",
        &args,
        &env,
        &kc,
        r.work.path().join("webhook-operator-0.log"),
    );
    operator.wait_for(metrics, "/readyz", "").await;
    let tls_secret = format!("{fullname}-webhook-tls");
    let ca = eventually("the webhook's certificate Secret", || async {
        let secret = r
            .secrets()
            .get(&tls_secret)
            .await
            .map_err(|e| e.to_string())?;
        assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
        let data = secret.data.unwrap_or_default();
        for key in ["tls.crt", "tls.key"] {
            assert!(data.contains_key(key), "{tls_secret} has no {key}");
        }
        data.get("ca.crt")
            .cloned()
            .ok_or_else(|| format!("{tls_secret} has no ca.crt"))
    })
    .await;
    eventually("the operator's CA in the caBundle", || async {
        let hooks = webhook_configuration(r, &configuration)
            .await
            .webhooks
            .unwrap_or_default();
        (hooks[0].client_config.ca_bundle.as_ref() == Some(&ca))
            .then_some(())
            .ok_or_else(|| format!("caBundle {:?}", hooks[0].client_config.ca_bundle.is_some()))
    })
    .await;
    operator.assert_running();
    WebhookRelease {
        name,
        configuration,
        operator,
    }
}

/// `helm upgrade` with a changed webhook value: the change is applied, and the caBundle the
/// operator wrote stays (helm's three-way merge leaves a field absent from both manifests).
async fn helm_upgrade_keeps_the_ca_bundle(r: &Release, w: &WebhookRelease) {
    r.step("helm upgrade keeps the caBundle");
    let before = webhook_configuration(r, &w.configuration)
        .await
        .webhooks
        .unwrap();
    assert!(before[0].client_config.ca_bundle.is_some());
    must(
        helm(&[
            "upgrade",
            &w.name,
            &r.chart,
            "--namespace",
            &r.ns,
            "--kubeconfig",
            &r.kcs,
            "--set",
            "webhook.timeoutSeconds=7",
            "--set",
            "crds.install=false",
        ]),
        "helm upgrade (webhook on)",
    );
    let after = webhook_configuration(r, &w.configuration)
        .await
        .webhooks
        .unwrap();
    assert_eq!(after[0].timeout_seconds, Some(7), "the upgrade is applied");
    assert_eq!(
        after[0].client_config.ca_bundle, before[0].client_config.ca_bundle,
        "helm upgrade kept the operator's caBundle"
    );
}

/// With the webhook configured and no replica answering (its Service has no endpoints here):
/// a ClawSecret carrying `data` or `encryptedData` is refused, naming the webhook, rather than
/// stored; a change to a sealed ClawSecret (a label) never waits for the webhook.
async fn with_no_replica_answering_only_writes_carrying_data_are_refused(
    r: &Release,
    kept: &[String],
) {
    r.step("no replica answers: plaintext refused, other writes pass");
    let api: Api<ClawSecret> = Api::namespaced(r.admin.clone(), &r.ns);
    for (name, spec) in [
        (
            "helm.refused",
            json!({"data": {"password": "never-stored"}}),
        ),
        (
            "helm.refused-encrypted",
            json!({"encryptedData": "not-even-opened"}),
        ),
    ] {
        let object: ClawSecret = serde_json::from_value(json!({
            "apiVersion": "clawbernetes.io/v1beta1",
            "kind": "ClawSecret",
            "metadata": {"name": name},
            "spec": spec,
        }))
        .expect("a ClawSecret");
        match api.create(&PostParams::default(), &object).await {
            Err(kube::Error::Api(s)) => assert!(
                s.message.contains("seal.clawsecrets.clawbernetes.io"),
                "{name}: refused, but not by the webhook: {s:?}"
            ),
            other => panic!("{name} with no webhook replica answering: {other:?}"),
        }
        assert!(
            api.get_opt(name).await.expect("get").is_none(),
            "{name} stored"
        );
    }
    for name in kept {
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"claw-secrets.test/touched": "yes"}}})),
        )
        .await
        .unwrap_or_else(|e| panic!("labelling the sealed ClawSecret {name}: {e}"));
    }
}

/// The webhook release's operator stops and `helm uninstall` removes its objects, its
/// MutatingWebhookConfiguration included.
fn the_webhook_release_is_uninstalled(r: &Release, mut w: WebhookRelease) {
    r.step("helm uninstall (webhook on)");
    w.operator.terminate();
    must(
        helm(&[
            "uninstall",
            &w.name,
            "--namespace",
            &r.ns,
            "--kubeconfig",
            &r.kcs,
        ]),
        "helm uninstall (webhook on)",
    );
    let left = labelled(&r.kc, &w.name);
    assert!(left.is_empty(), "orphans of the webhook release: {left:?}");
}

/// Leaves nothing stuck: the kept ClawSecrets carry no finalizer, so they are deleted at once
/// with no operator running; and the test's Node is deleted.
async fn nothing_is_left_stuck(r: &Release, kept: Vec<String>) {
    let api = Api::<ClawSecret>::namespaced(r.admin.clone(), &r.ns);
    for name in kept {
        api.delete(&name, &Default::default())
            .await
            .expect("deleting a kept ClawSecret");
        assert!(
            api.get_opt(&name).await.unwrap().is_none(),
            "{name} waits for an operator that is gone"
        );
    }
    let _ = Api::<k8s_openapi::api::core::v1::Node>::all(r.admin.clone())
        .delete(&r.node, &Default::default())
        .await;
}
