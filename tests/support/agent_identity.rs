//! The node agent's real identity in a test cluster: deploy/rbac/agent.yaml applied as shipped
//! (only its namespace moved to this test process's), and ServiceAccount tokens bound to a
//! Node, which carry the node name (`authentication.kubernetes.io/node-name`) exactly as a
//! token projected into the agent's pod on that Node does.
//!
//! ```ignore
//! #[path = "support/agent_identity.rs"]
//! mod agent_identity;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, Resource};
use serde::de::DeserializeOwned;
use serde_json::Value;
use std::path::{Path, PathBuf};

use claw_secrets::k8s::crd::{ClawNode, ClawNodeSpec};

use super::control_plane;
use super::wait::eventually;

/// The ServiceAccount the shipped manifest names.
pub const AGENT_ACCOUNT: &str = "claw-secrets-agent";

/// Applies every object of deploy/rbac/agent.yaml that makes up the agent's identity (its
/// ServiceAccount, roles, bindings and the node-key admission policy), with the manifest's
/// namespace `claw-secrets` replaced by `ns`. Returns the ServiceAccount's user name.
pub async fn apply_agent_rbac(client: &Client, admin_kubeconfig: &Path, ns: &str) -> String {
    let path = control_plane::repo_root().join("deploy/rbac/agent.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/rbac/agent.yaml");
    let user = format!("system:serviceaccount:{ns}:{AGENT_ACCOUNT}");
    let text = text
        .replace("namespace: claw-secrets\n", &format!("namespace: {ns}\n"))
        .replace(
            &format!("system:serviceaccount:claw-secrets:{AGENT_ACCOUNT}"),
            &user,
        );
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text).expect("YAML");
    for doc in docs {
        let name = doc["metadata"]["name"].as_str().unwrap_or_default();
        // The user-facing roles (editor, viewer, invoker) are not the agent's.
        if !name.starts_with(AGENT_ACCOUNT) {
            continue;
        }
        match doc["kind"].as_str().unwrap_or_default() {
            "ServiceAccount" => {
                apply::<ServiceAccount>(Api::namespaced(client.clone(), ns), doc).await
            }
            "Role" => apply::<Role>(Api::namespaced(client.clone(), ns), doc).await,
            "RoleBinding" => apply::<RoleBinding>(Api::namespaced(client.clone(), ns), doc).await,
            "ClusterRole" => apply::<ClusterRole>(Api::all(client.clone()), doc).await,
            "ClusterRoleBinding" => {
                apply::<ClusterRoleBinding>(Api::all(client.clone()), doc).await
            }
            "ValidatingAdmissionPolicy" => {
                apply::<ValidatingAdmissionPolicy>(Api::all(client.clone()), doc).await
            }
            "ValidatingAdmissionPolicyBinding" => {
                apply::<ValidatingAdmissionPolicyBinding>(Api::all(client.clone()), doc).await
            }
            other => panic!("deploy/rbac/agent.yaml: unexpected kind {other}"),
        }
    }
    policy_in_force(client, admin_kubeconfig, ns).await;
    user
}

/// Waits until the API server enforces the node-key policy (a new policy takes a moment to
/// reach the admission chain): until an agent token without a node is refused a ClawNode.
async fn policy_in_force(client: &Client, admin_kubeconfig: &Path, ns: &str) {
    let token = unbound_token(client, ns).await;
    let dir = tempfile::tempdir().expect("temp dir");
    let nobody: Api<ClawNode> =
        Api::all(client_with_token(admin_kubeconfig, &token, &dir.path().join("kubeconfig")).await);
    let probe = ClawNode::new(
        "claw-secrets-policy-probe",
        ClawNodeSpec {
            public_key: "probe".to_owned(),
            key_id: "k-0000000000000000".to_owned(),
        },
    );
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually("the node-key admission policy to be enforced", || async {
        match nobody.create(&dry_run, &probe).await {
            Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("ClawNode") => Ok(()),
            other => Err(format!("not refused yet: {other:?}")),
        }
    })
    .await
}

/// A client of the cluster of `admin_kubeconfig` that authenticates with `token` only (its
/// kubeconfig written to `path`).
pub async fn client_with_token(admin_kubeconfig: &Path, token: &str, path: &Path) -> Client {
    let kubeconfig = super::tokens::kubeconfig_with_token(admin_kubeconfig, token, path);
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).expect("kubeconfig"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("kubeconfig");
    Client::try_from(config).expect("client")
}

async fn apply<K>(api: Api<K>, doc: Value)
where
    K: Resource + Clone + DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let name = doc["metadata"]["name"].as_str().unwrap().to_owned();
    let object: K = serde_json::from_value(doc).expect("a manifest object");
    api.patch(
        &name,
        &PatchParams::apply("claw-secrets-tests").force(),
        &Patch::Apply(&object),
    )
    .await
    .unwrap_or_else(|e| panic!("applying {name} from deploy/rbac/agent.yaml: {e}"));
}

/// A one-hour token of the agent's ServiceAccount in `ns`, bound to Node `node`: the API
/// server writes the node's name into the user's extra, as for the agent pod's own token.
pub async fn node_bound_token(client: &Client, ns: &str, node: &str) -> String {
    node_bound_token_for(client, ns, node, &[]).await
}

/// [`node_bound_token`] for `audiences` (none: the API server's).
pub async fn node_bound_token_for(
    client: &Client,
    ns: &str,
    node: &str,
    audiences: &[&str],
) -> String {
    let uid = Api::<Node>::all(client.clone())
        .get(node)
        .await
        .unwrap_or_else(|e| panic!("Node {node}: {e}"))
        .metadata
        .uid;
    token(
        client,
        ns,
        audiences,
        Some(BoundObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Node".to_owned()),
            name: Some(node.to_owned()),
            uid,
        }),
    )
    .await
}

/// A one-hour token of the agent's ServiceAccount in `ns` bound to nothing: no node name.
pub async fn unbound_token(client: &Client, ns: &str) -> String {
    token(client, ns, &[], None).await
}

/// [`unbound_token`] for `audiences`.
pub async fn unbound_token_for(client: &Client, ns: &str, audiences: &[&str]) -> String {
    token(client, ns, audiences, None).await
}

async fn token(
    client: &Client,
    ns: &str,
    audiences: &[&str],
    bound: Option<BoundObjectReference>,
) -> String {
    let api: Api<ServiceAccount> = Api::namespaced(client.clone(), ns);
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| (*a).to_owned()).collect(),
            expiration_seconds: Some(3600),
            bound_object_ref: bound,
        },
        ..TokenRequest::default()
    };
    // The ServiceAccount was just applied; the token endpoint may need a moment.
    eventually("a token for the agent's ServiceAccount", || async {
        api.create_token_request(AGENT_ACCOUNT, &PostParams::default(), &request)
            .await
            .map_err(|e| e.to_string())
            .and_then(|t| {
                t.status
                    .map(|s| s.token)
                    .ok_or_else(|| "no status".to_owned())
            })
    })
    .await
}

/// The agent's Kubernetes client for `node`: the agent ServiceAccount's token bound to that
/// Node, in a kubeconfig at `dir`.
pub async fn node_client(
    c: &crate::cluster::Cluster,
    node: &str,
    dir: &Path,
) -> (kube::Client, PathBuf) {
    let ns = crate::cluster::master_key_namespace();
    let token = node_bound_token(&c.client(), ns, node).await;
    let kubeconfig = dir.join(format!("{node}.kubeconfig"));
    let client = client_with_token(&c.env.kubeconfig, &token, &kubeconfig).await;
    (client, kubeconfig)
}

/// The flags that make an agent take its secrets from the operator's deliveries and pass its
/// writes on to the operator (the chart's, with the webhook): a token of the agent's
/// ServiceAccount bound to `node` for the operator's audience, in a file under `dir`.
pub async fn delivery_args(c: &crate::cluster::Cluster, node: &str, dir: &Path) -> Vec<String> {
    let ns = crate::cluster::master_key_namespace();
    let token = node_bound_token_for(
        &c.client(),
        ns,
        node,
        &[claw_secrets::k8s::delivery::AUDIENCE],
    )
    .await;
    let file = dir.join(format!("{node}.delivery-token"));
    std::fs::write(&file, token).unwrap();
    vec![
        "--delivery-token-file".to_owned(),
        file.display().to_string(),
        "--operator-service".to_owned(),
        format!("{ns}/claw-secrets-webhook:443"),
    ]
}

/// Starts an agent for `node` as the chart runs it with the webhook: its own identity (a token
/// bound to the node), its secrets from the operator's deliveries, its writes carried by the
/// operator (which must be reachable: [`crate::webhook::Webhook::reachable_by_agents`]).
pub async fn delivered_agent(
    c: &crate::cluster::Cluster,
    node: &str,
    dir: &Path,
    ip: std::net::IpAddr,
) -> crate::cluster::Agent {
    let (_, kubeconfig) = node_client(c, node, dir).await;
    let args = delivery_args(c, node, dir).await;
    c.start_agent_with(node, &kubeconfig, ip, args).await
}

/// The operator as the chart runs it for agents on deliveries: deploy/rbac/agent.yaml applied
/// (in the master key's namespace), its webhook for `c`'s namespace served on every address
/// (it also answers deliveries and carries writes), and reachable through the API server's
/// service proxy as an operator pod on `node`. Returns the agents' user name, the webhook and
/// the operator. The Service is in the shared agent namespace: run such tests alone
/// (`cluster::exclusive`).
pub async fn operator_for_agents(
    c: &crate::cluster::Cluster,
    node: &str,
) -> (String, crate::webhook::Webhook, crate::cluster::Operator) {
    let ns = crate::cluster::master_key_namespace();
    let user = apply_agent_rbac(&c.client(), &c.env.kubeconfig, ns).await;
    let hook = crate::webhook::Webhook::register(&c.client(), &[c.ns()])
        .await
        .on_every_address();
    let operator = hook.operator(c).await;
    hook.reachable_by_agents(c, ns, node).await;
    (user, hook, operator)
}
