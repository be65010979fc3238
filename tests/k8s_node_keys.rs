//! Per-node keys against a real kube-apiserver (issue 16, docs/crypto.md "Per-node keys"):
//! every agent runs with the agent's real identity (deploy/rbac/agent.yaml as shipped, and a
//! ServiceAccount token bound to its Node, as the token projected into its pod is), generates
//! its own key on first start and publishes its public key in the ClawNode named after its
//! Node; the API server's admission policy keeps each agent to its own node's ClawNode.

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

use claw_secrets::crypto::{Keyring, SealingPublicKey};
use claw_secrets::k8s::agent::node_key::NODE_KEY_FILE;
use claw_secrets::k8s::crd::{ClawNode, ClawNodeSpec};
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, DeleteParams, ObjectMeta, Patch, PatchParams, PostParams};
use std::net::Ipv4Addr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use cluster::{Agent, Cluster};
use wait::eventually;

/// The key the agent keeps in its data dir.
fn node_key_of(agent: &Agent) -> Keyring {
    let path = agent.data_dir().join(NODE_KEY_FILE);
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{} is private to the agent", path.display());
    Keyring::from_json(&std::fs::read(&path).unwrap()).unwrap()
}

/// Waits until ClawNode `node` carries the public key of `ring`.
async fn published(c: &Cluster, node: &str, ring: &Keyring) -> ClawNode {
    let api: Api<ClawNode> = Api::all(c.client());
    let want = claw_secrets::k8s::agent::node_key::public_key(ring).to_text();
    eventually(
        &format!("ClawNode {node} to carry the node's key"),
        || async {
            match api.get_opt(node).await.map_err(|e| e.to_string())? {
                Some(n) if n.spec.public_key == want => Ok(n),
                other => Err(format!("{:?}", other.map(|n| n.spec))),
            }
        },
    )
    .await
}

/// The status code and message of a refused request.
fn refused<T: std::fmt::Debug>(r: Result<T, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("expected the API server to refuse it, got {other:?}"),
    }
}

const POLICY_MESSAGE: &str = "may write only the ClawNode named after its own node";

#[tokio::test]
async fn each_agent_publishes_its_own_key_and_can_write_no_other() {
    let _lock = cluster::shared().await;
    let c = Cluster::new("node-keys").await;
    let ns = cluster::master_key_namespace();
    agent_identity::apply_agent_rbac(&c.client(), &c.env.kubeconfig, ns).await;
    let scratch = tempfile::tempdir().unwrap();

    let (node_a, node_b) = (c.node("a", &[]).await, c.node("b", &[]).await);
    let (client_a, kubeconfig_a) = agent_identity::node_client(&c, &node_a, scratch.path()).await;
    let (_, kubeconfig_b) = agent_identity::node_client(&c, &node_b, scratch.path()).await;
    let local = Ipv4Addr::LOCALHOST.into();
    let (args_a, args_b) = (
        agent_identity::delivery_args(&c, &node_a, scratch.path()).await,
        agent_identity::delivery_args(&c, &node_b, scratch.path()).await,
    );
    let (mut a, b) = tokio::join!(
        c.start_agent_with(&node_a, &kubeconfig_a, local, args_a),
        c.start_agent_with(&node_b, &kubeconfig_b, local, args_b),
    );

    // Each publishes the key it generated, owned by its Node; the two keys differ.
    let (ring_a, ring_b) = (node_key_of(&a), node_key_of(&b));
    let published_a = published(&c, &node_a, &ring_a).await;
    let published_b = published(&c, &node_b, &ring_b).await;
    assert_ne!(published_a.spec.public_key, published_b.spec.public_key);
    assert_eq!(published_a.spec.key_id, ring_a.active().id().to_string());
    SealingPublicKey::parse(&published_a.spec.public_key).expect("a public key");
    let node_uid = Api::<Node>::all(c.client())
        .get(&node_a)
        .await
        .unwrap()
        .metadata
        .uid;
    let owner = &published_a.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), Some(&owner.uid)),
        ("Node", node_uid.as_ref())
    );
    // Only the agent ever wrote it: its key (the object) and, once it has reported key usage,
    // its status, which the API server records as a second entry for the `status` subresource.
    let managers: Vec<_> = published_a
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .map(|m| (m.manager.as_deref(), m.subresource.as_deref().unwrap_or("")))
        .collect();
    assert!(
        managers.contains(&(Some("claw-secrets-agent"), "")),
        "the agent manages the ClawNode's key: {managers:?}"
    );
    assert!(
        managers
            .iter()
            .all(|(manager, _)| *manager == Some("claw-secrets-agent")),
        "no one but the agent wrote the ClawNode: {managers:?}"
    );

    // Node-a's own credentials: RBAC lets the agent's ServiceAccount write ClawNodes, the
    // admission policy only its own node's. Its own passes (dry run, nothing changes) ...
    let as_a: Api<ClawNode> = Api::all(client_a.clone());
    let dry_run = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    as_a.patch(
        &node_a,
        &dry_run,
        &Patch::Merge(serde_json::json!({ "metadata": { "labels": { "probe": "own" } } })),
    )
    .await
    .expect("an agent may write its own node's ClawNode");
    // ... another node's is refused: overwriting its key, creating one, deleting one.
    let forged = ClawNode {
        metadata: ObjectMeta {
            name: Some(node_b.clone()),
            ..ObjectMeta::default()
        },
        spec: ClawNodeSpec {
            public_key: published_a.spec.public_key.clone(),
            key_id: published_a.spec.key_id.clone(),
        },
        status: None,
    };
    let (code, message) = refused(
        as_a.patch(
            &node_b,
            &PatchParams::apply("claw-secrets-agent").force(),
            &Patch::Apply(&forged),
        )
        .await,
    );
    assert_eq!(code, 403, "{message}");
    assert!(message.contains(POLICY_MESSAGE), "{message}");
    let mut invented = forged.clone();
    invented.metadata.name = Some(format!("{node_b}-twin"));
    let (code, message) = refused(as_a.create(&PostParams::default(), &invented).await);
    assert_eq!(code, 403, "{message}");
    assert!(message.contains(POLICY_MESSAGE), "{message}");
    let (code, message) = refused(as_a.delete(&node_b, &DeleteParams::default()).await);
    assert_eq!(code, 403, "{message}");
    // Each agent reports, with its own identity, the master keys its store needs: none, on
    // deliveries (what `keys prune` reads). Another node's report is not its to write: it
    // could otherwise let prune remove a key that node's store still needs.
    eventually(
        "node-a's agent to report its store's master keys",
        || async {
            let admin: Api<ClawNode> = Api::all(c.client());
            match admin.get(&node_a).await.map_err(|e| e.to_string())?.status {
                Some(status) if status.master_keys.is_empty() => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    // (A dry run, until refused: the policy was applied a moment ago, and the API server takes
    // a moment to enforce a policy it was given.)
    eventually(
        "node-a's report on node-b's ClawNode to be refused",
        || async {
            let forged_report = as_a
                .patch_status(
                    &node_b,
                    &dry_run,
                    &Patch::Merge(serde_json::json!({ "status": { "masterKeys": [] } })),
                )
                .await;
            match forged_report {
                Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains(POLICY_MESSAGE) => {
                    Ok(())
                }
                other => Err(format!("not refused by the policy: {other:?}")),
            }
        },
    )
    .await;
    let untouched: Api<ClawNode> = Api::all(c.client());
    assert_eq!(
        untouched.get(&node_b).await.unwrap().spec,
        published_b.spec,
        "node-b's key is still node-b's"
    );

    // The same ServiceAccount's token without a node (not bound to a pod on a node) writes no
    // ClawNode at all.
    let unbound = agent_identity::unbound_token(&c.client(), ns).await;
    let as_nobody: Api<ClawNode> = Api::all(
        agent_identity::client_with_token(
            &c.env.kubeconfig,
            &unbound,
            &scratch.path().join("unbound"),
        )
        .await,
    );
    let (code, message) = refused(
        as_nobody
            .patch(
                &node_a,
                &dry_run,
                &Patch::Merge(serde_json::json!({ "metadata": { "labels": { "probe": "x" } } })),
            )
            .await,
    );
    assert_eq!(code, 403, "{message}");

    // A restart keeps the key; a replaced node (its data dir gone) has a new one, published.
    a.kill();
    a.restart().await;
    assert!(
        node_key_of(&a).same_as(&ring_a),
        "a restart keeps the node key"
    );
    a.kill();
    std::fs::remove_dir_all(a.data_dir()).unwrap();
    a.restart().await;
    let replaced = node_key_of(&a);
    assert_ne!(replaced.active().id(), ring_a.active().id());
    let republished = published(&c, &node_a, &replaced).await;
    assert_ne!(republished.spec.public_key, published_a.spec.public_key);

    drop((a, b));
    c.cleanup().await;
}

/// Whether `user` may `verb` ClawSecrets in `ns`, as the API server's authorizer answers.
async fn may(c: &Cluster, user: &str, verb: &str, ns: &str) -> bool {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
    };
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            resource_attributes: Some(ResourceAttributes {
                group: Some("clawbernetes.io".to_owned()),
                resource: Some("clawsecrets".to_owned()),
                verb: Some(verb.to_owned()),
                namespace: Some(ns.to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    Api::<SubjectAccessReview>::all(c.client())
        .create(&PostParams::default(), &review)
        .await
        .expect("SubjectAccessReview")
        .status
        .expect("status")
        .allowed
}

/// node.invoke writes are carried by the operator and made with the caller's token: the
/// agent's own token can read no ClawSecret and create, change or delete none
/// (SubjectAccessReviews and real 403s), and an authorized caller's create, rotate and delete
/// through an agent with that token alone still work, and reach the API server as her.
#[tokio::test]
async fn the_agent_token_changes_no_secret_and_writes_are_made_as_the_caller() {
    // Alone: the operator's Service for the agents lives in the shared agent namespace.
    let _lock = cluster::exclusive().await;
    let c = Cluster::new("agent-writes").await;
    let node = c.node("a", &[]).await;
    let (agent_user, hook, operator) = agent_identity::operator_for_agents(&c, &node).await;
    let scratch = tempfile::tempdir().unwrap();
    let (agent_client, kubeconfig) = agent_identity::node_client(&c, &node, scratch.path()).await;
    let args = agent_identity::delivery_args(&c, &node, scratch.path()).await;
    let agent = c
        .start_agent_with(&node, &kubeconfig, Ipv4Addr::LOCALHOST.into(), args)
        .await;
    let alice = c.alice().await;
    let secrets: Api<claw_secrets::k8s::crd::ClawSecret> = Api::namespaced(c.client(), c.ns());

    // What the agent's ServiceAccount may do, as the API server's authorizer says: nothing.
    for verb in [
        "get",
        "list",
        "watch",
        "create",
        "update",
        "patch",
        "delete",
        "deletecollection",
    ] {
        assert!(
            !may(&c, &agent_user, verb, c.ns()).await,
            "the agent may {verb}"
        );
    }

    // The API server itself says who makes a write: a policy refuses a secret named
    // `as-alice` to alice alone, which the agent's write as her must meet.
    let probe = "as-alice";
    refuse_to_alice(&c, probe, scratch.path()).await;

    // An authorized caller's writes through the agent, carried by the operator: made as her.
    agent
        .invoke(
            Some(&alice),
            "secret.create",
            serde_json::json!({ "name": "db-password", "namespace": c.ns(), "data": { "password": "first" } }),
        )
        .await
        .payload("secret.create as alice");
    agent
        .invoke(
            Some(&alice),
            "secret.rotate",
            serde_json::json!({ "name": "db-password", "namespace": c.ns(), "newData": { "password": "second" } }),
        )
        .await
        .payload("secret.rotate as alice");
    let refused_as_alice = agent
        .invoke(
            Some(&alice),
            "secret.create",
            serde_json::json!({ "name": probe, "namespace": c.ns(), "data": { "password": "x" } }),
        )
        .await
        .expect_error(
            "INVALID_ARGUMENT",
            "a create the API server refuses to alice",
        );
    assert!(
        refused_as_alice.contains("made as alice"),
        "{refused_as_alice}"
    );
    let obj = secrets.get("db-password").await.unwrap();
    assert_eq!(obj.spec.sealed.as_ref().map(|s| s.version), Some(2));
    // Read back on the node right after the write: its delivery is in the node's store.
    let got = agent
        .get_secret(&alice, c.ns(), "db-password")
        .await
        .payload("secret.get right after the rotation");
    assert_eq!(got["version"], serde_json::json!(2));
    assert_eq!(got["data"]["password"], "second");
    let managers: Vec<_> = obj
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.as_deref())
        .collect();
    assert!(
        managers.iter().all(|m| *m == "claw-secrets-operator"),
        "{managers:?}"
    );

    // The agent's own token: every write refused by the API server.
    let as_agent: Api<claw_secrets::k8s::crd::ClawSecret> = Api::namespaced(agent_client, c.ns());
    let mut copy = obj.clone();
    copy.metadata = ObjectMeta {
        name: Some("planted".to_owned()),
        ..ObjectMeta::default()
    };
    let (code, message) = refused(as_agent.create(&PostParams::default(), &copy).await);
    assert_eq!(code, 403, "{message}");
    let (code, message) = refused(
        as_agent
            .patch(
                "db-password",
                &PatchParams::default(),
                &Patch::Merge(serde_json::json!({ "spec": { "allowedWorkloads": ["thief"] } })),
            )
            .await,
    );
    assert_eq!(code, 403, "{message}");
    let (code, message) = refused(
        as_agent
            .replace("db-password", &PostParams::default(), &obj)
            .await,
    );
    assert_eq!(code, 403, "{message}");
    let (code, message) = refused(
        as_agent
            .delete("db-password", &DeleteParams::default())
            .await,
    );
    assert_eq!(code, 403, "{message}");
    assert!(secrets.get_opt("db-password").await.unwrap().is_some());

    agent
        .invoke(
            Some(&alice),
            "secret.delete",
            serde_json::json!({ "name": "db-password", "namespace": c.ns() }),
        )
        .await
        .payload("secret.delete as alice");
    assert!(secrets.get_opt("db-password").await.unwrap().is_none());
    agent
        .get_secret(&alice, c.ns(), "db-password")
        .await
        .expect_error("NOT_FOUND", "secret.get right after the delete");

    // Audited on the node before it was passed on, and by the operator before it was made.
    let node_records: Vec<_> = agent
        .audit()
        .into_iter()
        .filter(|r| r["command"] == "secret.rotate" && r["subject"] == "alice")
        .map(|r| (r["phase"].clone(), r["reason"].clone()))
        .collect();
    assert_eq!(
        node_records.first().map(|(p, r)| (p.as_str(), r.as_str())),
        Some((
            Some("intent"),
            Some("authorized; passed on to the operator")
        ))
    );
    let carried = std::fs::read_to_string(operator.data_dir().join("audit.log")).unwrap();
    assert!(
        carried
            .lines()
            .any(|l| l.contains("\"command\":\"secret.rotate\"")
                && l.contains("\"subject\":\"alice\"")
                && l.contains("\"phase\":\"intent\"")),
        "{carried}"
    );
    assert!(
        !carried.contains("second"),
        "no value in the operator's audit log"
    );

    drop((agent, operator));
    {
        use k8s_openapi::api::admissionregistration::v1::{
            ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
        };
        let name = format!("claw-secrets-test-as-alice-{}", c.suffix());
        let _ = Api::<ValidatingAdmissionPolicyBinding>::all(c.client())
            .delete(&name, &DeleteParams::default())
            .await;
        let _ = Api::<ValidatingAdmissionPolicy>::all(c.client())
            .delete(&name, &DeleteParams::default())
            .await;
    }
    hook.remove().await;
    c.cleanup().await;
}

/// A ValidatingAdmissionPolicy that refuses to the user `alice` (and only to her) a ClawSecret
/// named `name` in the test's namespace, with the message "made as alice"; waits until it is
/// in force (a new policy takes a moment to reach the API server's admission).
async fn refuse_to_alice(c: &Cluster, name: &str, dir: &Path) {
    use k8s_openapi::api::admissionregistration::v1::{
        ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
    };
    let policy_name = format!("claw-secrets-test-as-alice-{}", c.suffix());
    let policy: ValidatingAdmissionPolicy = serde_json::from_value(serde_json::json!({
        "metadata": { "name": policy_name },
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": { "resourceRules": [{
                "apiGroups": ["clawbernetes.io"], "apiVersions": ["*"],
                "operations": ["CREATE"], "resources": ["clawsecrets"] }] },
            "validations": [{
                "expression": format!(
                    "request.userInfo.username != 'alice' || object.metadata.name != '{name}' || object.metadata.namespace != '{}'",
                    c.ns()
                ),
                "message": "made as alice",
            }],
        },
    }))
    .unwrap();
    let binding: ValidatingAdmissionPolicyBinding = serde_json::from_value(serde_json::json!({
        "metadata": { "name": policy_name },
        "spec": { "policyName": policy_name, "validationActions": ["Deny"] },
    }))
    .unwrap();
    let apply = PatchParams::apply("claw-secrets-tests").force();
    Api::<ValidatingAdmissionPolicy>::all(c.client())
        .patch(&policy_name, &apply, &Patch::Apply(&policy))
        .await
        .unwrap();
    Api::<ValidatingAdmissionPolicyBinding>::all(c.client())
        .patch(&policy_name, &apply, &Patch::Apply(&binding))
        .await
        .unwrap();
    let as_alice: Api<claw_secrets::k8s::crd::ClawSecret> = Api::namespaced(
        agent_identity::client_with_token(
            &c.env.kubeconfig,
            &c.user_token("alice"),
            &dir.join("alice.kubeconfig"),
        )
        .await,
        c.ns(),
    );
    let dry_run = PostParams {
        dry_run: true,
        ..PostParams::default()
    };
    eventually("the policy refusing alice in force", || async {
        let probe = cluster::secret_with_data(name, &[("k", "v")]);
        match as_alice.create(&dry_run, &probe).await {
            Err(kube::Error::Api(s)) if s.message.contains("made as alice") => Ok(()),
            other => Err(format!("{:?}", other.map(|_| "accepted"))),
        }
    })
    .await;
}

/// The operator's delivery endpoint: each node gets the secrets that select it, sealed to its
/// own key (node-b cannot open node-a's); only the agent's tokens bound to a node and for the
/// operator's audience are answered; a wait ends when the node's set changes.
#[tokio::test]
async fn each_node_is_delivered_its_own_secrets_sealed_to_its_own_key() {
    // Alone: a node's set holds every namespace's secrets that select it, so another test's
    // secrets would change it while a wait is expected to end unchanged.
    let _lock = cluster::exclusive().await;
    use claw_secrets::crypto::{DeliveryScope, open_delivery};
    use claw_secrets::k8s::delivery::{AUDIENCE, NodeDeliveries};

    let c = Cluster::new("deliveries").await;
    let ns = cluster::master_key_namespace();
    let gpu = [(cluster::GPU, "true")];
    let (node_a, node_b) = (c.node("a", &gpu).await, c.node("b", &[]).await);
    let (_, hook, operator) = agent_identity::operator_for_agents(&c, &node_a).await;
    let ca = hook.ca_pem().await;
    let scratch = tempfile::tempdir().unwrap();
    let (client_a, kubeconfig_a) = agent_identity::node_client(&c, &node_a, scratch.path()).await;
    let (_, kubeconfig_b) = agent_identity::node_client(&c, &node_b, scratch.path()).await;
    let local = Ipv4Addr::LOCALHOST.into();
    let (args_a, args_b) = (
        agent_identity::delivery_args(&c, &node_a, scratch.path()).await,
        agent_identity::delivery_args(&c, &node_b, scratch.path()).await,
    );
    let (a, b) = tokio::join!(
        c.start_agent_with(&node_a, &kubeconfig_a, local, args_a),
        c.start_agent_with(&node_b, &kubeconfig_b, local, args_b),
    );
    let (ring_a, ring_b) = (node_key_of(&a), node_key_of(&b));
    published(&c, &node_a, &ring_a).await;
    published(&c, &node_b, &ring_b).await;

    // Two secrets applied with plaintext (sealed at admission): one for every node, one for
    // GPU nodes only.
    let canary_all = format!("canary-{}", random::random_hex(8));
    let canary_gpu = format!("canary-{}", random::random_hex(8));
    let secrets = c.secrets();
    secrets
        .create(
            &PostParams::default(),
            &cluster::secret_with_data("everywhere", &[("k", &canary_all)]),
        )
        .await
        .unwrap();
    let mut gpu_only = cluster::secret_with_data("gpu-only", &[("k", &canary_gpu)]);
    gpu_only.spec.node_selector = Some([(cluster::GPU.to_owned(), "true".to_owned())].into());
    secrets
        .create(&PostParams::default(), &gpu_only)
        .await
        .unwrap();
    // Both Ready (the operator's status written), so that nothing more changes unasked.
    for name in ["everywhere", "gpu-only"] {
        eventually(&format!("{name} Ready"), || async {
            let s = secrets.get(name).await.map_err(|e| e.to_string())?;
            let ready = s.status.as_ref().is_some_and(|st| {
                st.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            });
            ready
                .then_some(())
                .ok_or_else(|| "not Ready yet".to_owned())
        })
        .await;
    }

    let token_a = agent_identity::node_bound_token_for(&c.client(), ns, &node_a, &[AUDIENCE]).await;
    let token_b = agent_identity::node_bound_token_for(&c.client(), ns, &node_b, &[AUDIENCE]).await;
    let port = hook.port();
    let fetch = |token: String| {
        let ca = ca.clone();
        async move {
            let (status, body) = webhook::get_deliveries(port, &ca, Some(&token), "").await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            serde_json::from_slice::<NodeDeliveries>(&body).unwrap()
        }
    };
    let names = |d: &NodeDeliveries| {
        d.secrets
            .iter()
            .filter(|s| s.namespace == c.ns())
            .map(|s| s.name.clone())
            .collect::<Vec<_>>()
    };
    let for_a = eventually("node-a's deliveries", || async {
        let d = fetch(token_a.clone()).await;
        (names(&d) == ["everywhere", "gpu-only"])
            .then_some(d.clone())
            .ok_or(format!("{:?}", names(&d)))
    })
    .await;
    let for_b = fetch(token_b.clone()).await;
    assert_eq!(
        names(&for_b),
        ["everywhere"],
        "node-b is not selected by gpu-only"
    );
    assert_eq!(for_a.node, node_a);
    assert_eq!(for_a.node_key_id, ring_a.active().id().to_string());
    let body = serde_json::to_string(&for_a).unwrap();
    assert!(
        !body.contains(&canary_all) && !body.contains(&canary_gpu),
        "no value in clear"
    );

    // Each opens with its node's key, as what it was sealed for, and only there.
    let open = |ring: &Keyring, node: &str, d: &claw_secrets::k8s::delivery::Delivery| {
        let scope = DeliveryScope {
            node,
            namespace: &d.namespace,
            name: &d.object,
            version: d.version,
        };
        open_delivery(ring, &scope, &d.data).map(|data| {
            serde_json::to_value(&data).unwrap()["k"]
                .as_str()
                .unwrap()
                .to_owned()
        })
    };
    let mine: Vec<_> = for_a
        .secrets
        .iter()
        .filter(|d| d.namespace == c.ns())
        .map(|d| open(&ring_a, &node_a, d).unwrap())
        .collect();
    assert_eq!(mine, [canary_all.clone(), canary_gpu.clone()]);
    for d in for_a.secrets.iter().filter(|d| d.namespace == c.ns()) {
        assert!(
            open(&ring_b, &node_b, d).is_err(),
            "node-b's key opens none of node-a's"
        );
        assert!(open(&ring_b, &node_a, d).is_err());
    }

    // The agent's way: through the API server's service proxy to the operator's webhook
    // Service (here with an endpoint at this host's address), with the agent's own
    // credentials for the API server (its Role allows exactly that proxy) and the node's
    // token for the operator in the header the proxy passes on.
    let token_file = scratch.path().join("delivery-token-a");
    std::fs::write(&token_file, &token_a).unwrap();
    let proxied = claw_secrets::k8s::agent::deliveries::DeliveryClient::new(
        client_a,
        ns,
        "claw-secrets-webhook",
        443,
        token_file,
    );
    let through_proxy = eventually("deliveries through the API server's proxy", || async {
        proxied
            .fetch(None, Duration::ZERO)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "no answer".to_owned())
    })
    .await;
    assert_eq!(names(&through_proxy), ["everywhere", "gpu-only"]);
    assert!(
        through_proxy.full && for_a.full,
        "no cursor given: the whole set"
    );
    // A wait through the proxy: nothing changed, so it ends with "no change" after its time.
    let started = std::time::Instant::now();
    let unchanged = proxied
        .fetch(Some(&through_proxy.etag), Duration::from_secs(2))
        .await
        .unwrap();
    assert!(
        unchanged.is_none(),
        "{} after {:?}, had {}",
        unchanged.as_ref().unwrap().etag,
        started.elapsed(),
        through_proxy.etag
    );
    assert!(started.elapsed() >= Duration::from_secs(2));

    // Who is refused: no token; the agent's token for the API server's audience; the agent's
    // token bound to no node; a person's token.
    let (status, _) = webhook::get_deliveries(port, &ca, None, "").await;
    assert_eq!(status, 401);
    let api_audience = agent_identity::node_bound_token(&c.client(), ns, &node_a).await;
    let (status, body) = webhook::get_deliveries(port, &ca, Some(&api_audience), "").await;
    assert_eq!(status, 401, "{}", String::from_utf8_lossy(&body));
    let unbound = agent_identity::unbound_token_for(&c.client(), ns, &[AUDIENCE]).await;
    let (status, body) = webhook::get_deliveries(port, &ca, Some(&unbound), "").await;
    assert_eq!(status, 403, "{}", String::from_utf8_lossy(&body));
    let alice = c.alice().await;
    let (status, _) = webhook::get_deliveries(port, &ca, Some(&alice), "").await;
    assert_eq!(status, 401);

    // Unchanged, a wait ends empty-handed; labelled a GPU node meanwhile, node-b's wait ends
    // with gpu-only.
    let (status, _) = webhook::get_deliveries(
        port,
        &ca,
        Some(&token_b),
        &format!("have={}&wait=1", for_b.etag),
    )
    .await;
    assert_eq!(status, 304);
    let waiting = {
        let (ca, token_b, etag) = (ca.clone(), token_b.clone(), for_b.etag.clone());
        tokio::spawn(async move {
            webhook::get_deliveries(port, &ca, Some(&token_b), &format!("have={etag}&wait=30"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster::label_node(&c.client(), &node_b, &gpu).await;
    let (status, body) = waiting.await.unwrap();
    assert_eq!(status, 200);
    let changed: NodeDeliveries = serde_json::from_slice(&body).unwrap();
    assert_eq!(names(&changed), ["everywhere", "gpu-only"]);
    assert!(changed.full, "new labels: the whole set again");

    // From then on only changes: gpu-only deleted is one name to drop and no secret; a new
    // secret is that secret alone.
    let next = |cursor: String| {
        let (ca, token_b) = (ca.clone(), token_b.clone());
        async move {
            let (status, body) = webhook::get_deliveries(
                port,
                &ca,
                Some(&token_b),
                &format!("have={cursor}&wait=30"),
            )
            .await;
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
            serde_json::from_slice::<NodeDeliveries>(&body).unwrap()
        }
    };
    secrets
        .delete("gpu-only", &kube::api::DeleteParams::default())
        .await
        .unwrap();
    let dropped = next(changed.etag.clone()).await;
    assert!(!dropped.full);
    assert!(dropped.secrets.is_empty(), "{:?}", names(&dropped));
    assert_eq!(
        dropped
            .removed
            .iter()
            .map(|r| r.object.as_str())
            .collect::<Vec<_>>(),
        ["gpu-only"]
    );
    secrets
        .create(
            &PostParams::default(),
            &cluster::secret_with_data("later", &[("k", "v")]),
        )
        .await
        .unwrap();
    let added = next(dropped.etag.clone()).await;
    assert!(!added.full);
    assert_eq!(names(&added), ["later"]);
    assert!(added.removed.is_empty());

    // The operator counts its answers (no node label), and nothing undeliverable.
    let (status, metrics) =
        process::http_get(operator.metrics_port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    let count = |name: &str| {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse::<u64>().ok())
            .unwrap_or_else(|| panic!("no {name} in\n{metrics}"))
    };
    assert!(count("claw_secrets_operator_deliveries_total{answer=\"full\"}") >= 4);
    assert!(count("claw_secrets_operator_deliveries_total{answer=\"changes\"}") >= 2);
    assert!(count("claw_secrets_operator_deliveries_total{answer=\"unchanged\"}") >= 2);
    assert!(count("claw_secrets_operator_deliveries_total{answer=\"refused\"}") >= 4);
    assert_eq!(count("claw_secrets_operator_undeliverable_total"), 0);

    drop((a, b));
    hook.remove().await;
    c.cleanup().await;
}

/// Waits until `agent` answers `secret.get` of `ns/name` at `version` with `{"k": value}`.
async fn holds(agent: &Agent, token: &str, ns: &str, name: &str, version: u64, value: &str) {
    let want = serde_json::json!({ "k": value });
    eventually(&format!("{name} v{version} on {}", agent.node), || async {
        let got = agent.get_secret(token, ns, name).await.result()?;
        (got["version"] == serde_json::json!(version) && got["data"] == want)
            .then_some(())
            .ok_or(format!("version {}", got["version"]))
    })
    .await
}

/// Waits until `agent` answers `secret.get` of `ns/name` with NOT_FOUND.
async fn lacks(agent: &Agent, token: &str, ns: &str, name: &str) {
    eventually(&format!("{name} gone from {}", agent.node), || async {
        let reply = agent.get_secret(token, ns, name).await;
        (reply.code() == Some("NOT_FOUND"))
            .then_some(())
            .ok_or(format!("{}: {}", reply.status, reply.body))
    })
    .await
}

/// Agents that take their secrets from the operator's deliveries (`--delivery-token-file`, the
/// chart's setting): each node's store holds what selects it and nothing else, follows label
/// changes, rotations and deletions, and keeps serving reads from its store across an API
/// server outage and a restart.
#[tokio::test]
async fn agents_hold_what_is_delivered_to_them_and_nothing_else() {
    use serde_json::json;
    // Alone: the operator's Service for the agents lives in the shared agent namespace.
    let _lock = cluster::exclusive().await;
    let c = Cluster::new("delivered").await;
    let ns = cluster::master_key_namespace();
    let gpu = [(cluster::GPU, "true")];
    let (node_a, node_b) = (c.node("a", &gpu).await, c.node("b", &[]).await);
    let (_, hook, operator) = agent_identity::operator_for_agents(&c, &node_a).await;
    let scratch = tempfile::tempdir().unwrap();
    // Node-a reaches the API server through a relay the test can black-hole.
    let (hole, relayed) = relay::BlackHole::in_front_of(&c.env.kubeconfig).await;
    let kubeconfig_a = tokens::kubeconfig_with_token(
        &relayed,
        &agent_identity::node_bound_token(&c.client(), ns, &node_a).await,
        &scratch.path().join(format!("{node_a}.kubeconfig")),
    );
    let (_, kubeconfig_b) = agent_identity::node_client(&c, &node_b, scratch.path()).await;
    let local = Ipv4Addr::LOCALHOST.into();
    let (args_a, args_b) = (
        agent_identity::delivery_args(&c, &node_a, scratch.path()).await,
        agent_identity::delivery_args(&c, &node_b, scratch.path()).await,
    );
    let (mut a, mut b) = tokio::join!(
        c.start_agent_with(&node_a, &kubeconfig_a, local, args_a),
        c.start_agent_with(&node_b, &kubeconfig_b, local, args_b),
    );

    let canary_all = format!("canary-{}", random::random_hex(8));
    let canary_gpu = format!("canary-{}", random::random_hex(8));
    let secrets = c.secrets();
    // `everywhere` is also for the workload `app` (read by its token with no API server).
    let mut everywhere = cluster::secret_with_data("everywhere", &[("k", &canary_all)]);
    everywhere.spec.allowed_workloads = vec!["app".to_owned()];
    secrets
        .create(&PostParams::default(), &everywhere)
        .await
        .unwrap();
    let mut gpu_only = cluster::secret_with_data("gpu-only", &[("k", &canary_gpu)]);
    gpu_only.spec.node_selector = Some([(cluster::GPU.to_owned(), "true".to_owned())].into());
    secrets
        .create(&PostParams::default(), &gpu_only)
        .await
        .unwrap();

    let alice = c.alice().await;
    let app = cluster::service_account_token(&c.client(), c.ns(), "app").await;
    holds(&a, &alice, c.ns(), "everywhere", 1, &canary_all).await;
    holds(&a, &alice, c.ns(), "gpu-only", 1, &canary_gpu).await;
    holds(&b, &alice, c.ns(), "everywhere", 1, &canary_all).await;
    // Node-b is not selected: its agent never received it, so it cannot answer it. Settled
    // first: node-b holds everything else by now.
    lacks(&b, &alice, c.ns(), "gpu-only").await;
    let synced = |log: &str, kind: &str| {
        log.lines().any(|l| {
            l.contains("in sync with the API server") && l.contains(&format!("kind=\"{kind}\""))
        })
    };
    for agent in [&a, &b] {
        // ClawConfigs are still watched; the same line for ClawSecrets would be the watch's.
        eventually(
            &format!("{}'s ClawConfig watch in sync", agent.node),
            || async {
                let log = std::fs::read_to_string(agent.log_path()).unwrap();
                synced(&log, "ClawConfig")
                    .then_some(())
                    .ok_or_else(|| "not yet".to_owned())
            },
        )
        .await;
        let log = std::fs::read_to_string(agent.log_path()).unwrap();
        assert!(
            log.contains("secrets in sync with this node's deliveries")
                && !synced(&log, "ClawSecret"),
            "{} takes its secrets from deliveries and watches no ClawSecret:\n{}",
            agent.node,
            agent.log_tail(30)
        );
    }

    // Node-b labelled a GPU node: it receives gpu-only; node-a unlabelled: it loses it.
    cluster::label_node(&c.client(), &node_b, &gpu).await;
    holds(&b, &alice, c.ns(), "gpu-only", 1, &canary_gpu).await;
    let nodes: Api<Node> = Api::all(c.client());
    nodes
        .patch(
            &node_a,
            &PatchParams::default(),
            &Patch::Merge(json!({ "metadata": { "labels": { cluster::GPU: null } } })),
        )
        .await
        .unwrap();
    lacks(&a, &alice, c.ns(), "gpu-only").await;

    // A rotation (new data applied) reaches every node it selects; a deletion leaves them all.
    let rotated = format!("canary-{}", random::random_hex(8));
    secrets
        .patch(
            "everywhere",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "data": { "k": rotated } } })),
        )
        .await
        .unwrap();
    holds(&a, &alice, c.ns(), "everywhere", 2, &rotated).await;
    holds(&b, &alice, c.ns(), "everywhere", 2, &rotated).await;
    secrets
        .delete("gpu-only", &DeleteParams::default())
        .await
        .unwrap();
    lacks(&b, &alice, c.ns(), "gpu-only").await;

    // A replaced node (its data dir gone, so a new node key): its new key is published and its
    // deliveries are sealed to it.
    let old_key = node_key_of(&b);
    b.kill();
    std::fs::remove_dir_all(b.data_dir()).unwrap();
    b.restart().await;
    let new_key = node_key_of(&b);
    assert_ne!(new_key.active().id(), old_key.active().id());
    holds(&b, &alice, c.ns(), "everywhere", 2, &rotated).await;

    // Nothing in clear on either node's disk.
    let canaries = canary::Canaries::of([canary_all.clone(), canary_gpu.clone(), rotated.clone()]);
    for agent in [&a, &b] {
        canaries.assert_absent_under(&agent.data_dir());
    }

    // The API server unreachable for node-a, its agent restarted: it serves `app` from its
    // store (the review of app's token it saved vouches for it).
    holds(&a, &app, c.ns(), "everywhere", 2, &rotated).await;
    hole.black_hole();
    a.kill();
    a.restart().await;
    holds(&a, &app, c.ns(), "everywhere", 2, &rotated).await;

    drop((a, b, operator));
    hook.remove().await;
    c.cleanup().await;
}

/// The compromise test (issue 16): with everything node-a can reach (its data dir, its node
/// key, its agent's ServiceAccount tokens, and whatever they read through the API server and
/// the operator), an attacker routine recovers the secrets meant for node-a (the routine is
/// real: it finds those), and none of the secrets selected only for node-b or node-c, and none
/// of the master keyring.
#[tokio::test]
async fn a_compromised_node_reveals_only_its_own_secrets() {
    use base64::Engine;
    use claw_secrets::crypto::{DeliveryScope, open_delivery};
    use claw_secrets::k8s::delivery::NodeDeliveries;
    use k8s_openapi::api::core::v1::Secret;
    let _lock = cluster::exclusive().await;
    let c = Cluster::new("compromise").await;
    let ns = cluster::master_key_namespace();
    let zone = |z: &'static str| [(cluster::ZONE, z)];
    let (node_a, node_b, node_c) = (
        c.node("a", &zone("a")).await,
        c.node("b", &zone("b")).await,
        c.node("c", &zone("c")).await,
    );
    let (_, hook, operator) = agent_identity::operator_for_agents(&c, &node_a).await;
    let scratch = tempfile::tempdir().unwrap();
    let local: std::net::IpAddr = Ipv4Addr::LOCALHOST.into();
    let mut agents = Vec::new();
    for node in [&node_a, &node_b, &node_c] {
        agents.push(agent_identity::delivered_agent(&c, node, scratch.path(), local).await);
    }

    // One secret for every node, one for each node alone.
    let canary = |what: &str| format!("canary-{what}-{}", random::random_hex(8));
    let (for_all, for_a, for_b, for_c) = (canary("all"), canary("a"), canary("b"), canary("c"));
    let secrets = c.secrets();
    for (name, value, only) in [
        ("for-all", &for_all, None),
        ("for-a", &for_a, Some("a")),
        ("for-b", &for_b, Some("b")),
        ("for-c", &for_c, Some("c")),
    ] {
        let mut s = cluster::secret_with_data(name, &[("k", value)]);
        s.spec.node_selector = only.map(|z| [(cluster::ZONE.to_owned(), z.to_owned())].into());
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    let alice = c.alice().await;
    for (agent, name, value) in [
        (&agents[0], "for-a", &for_a),
        (&agents[0], "for-all", &for_all),
        (&agents[1], "for-b", &for_b),
        (&agents[2], "for-c", &for_c),
    ] {
        holds(agent, &alice, c.ns(), name, 1, value).await;
    }

    // ---- The attacker, with node-a's root. ----
    let mut seen: Vec<(String, Vec<u8>)> = Vec::new();
    let mut recovered: Vec<String> = Vec::new();
    let a = &agents[0];
    // 1. Its data dir, every file (the node key among them).
    for file in files::files_under(&a.data_dir()) {
        seen.push((file.display().to_string(), std::fs::read(&file).unwrap()));
    }
    let node_key = node_key_of(a);
    // 2. Its store, opened with its node key (a copy: the agent still runs), every secret in it.
    let copy = scratch.path().join("stolen");
    std::fs::create_dir(&copy).unwrap();
    for part in ["secrets", "configs", "store.manifest"] {
        let from = a.data_dir().join(part);
        let status = std::process::Command::new("cp")
            .args([
                "-a",
                &from.display().to_string(),
                &copy.display().to_string(),
            ])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let (store, _) = claw_secrets::store::Store::open(
        &copy,
        claw_secrets::crypto::SharedKeyring::new(node_key.clone()),
        claw_secrets::store::OpenOptions::default(),
    )
    .expect("the stolen store opens with the stolen node key");
    for key in store.secret_keys() {
        let record = store.secret(&key).unwrap();
        let identity = claw_secrets::crypto::SecretIdentity {
            kind: claw_secrets::domain::Kind::Secret,
            namespace: &key.namespace,
            name: &key.name,
            version: record.version,
        };
        let data = claw_secrets::crypto::open(&node_key, &identity, &record.envelope).unwrap();
        recovered.push(serde_json::to_string(&data).unwrap());
    }
    // 3. Its agent's tokens: the API server's (as its kubeconfig holds it) and the operator's.
    let (as_a, _) = agent_identity::node_client(&c, &node_a, scratch.path()).await;
    let delivery_token =
        std::fs::read_to_string(scratch.path().join(format!("{node_a}.delivery-token"))).unwrap();
    let api_token = agent_identity::node_bound_token(&c.client(), ns, &node_a).await;
    // Whatever the API token reads: ClawSecrets (any namespace), Secrets (the keyring), the
    // public sealing key, ClawNodes, a token of its own ServiceAccount for another node.
    let get = |path: String| {
        let client = as_a.clone();
        async move {
            let req = hyper::Request::get(&path).body(Vec::new()).unwrap();
            match client.request_text(req).await {
                Ok(body) => (200u16, body),
                Err(kube::Error::Api(s)) => (s.code, s.message),
                Err(e) => (0, e.to_string()),
            }
        }
    };
    let mut refused = Vec::new();
    for path in [
        "/apis/clawbernetes.io/v1beta1/clawsecrets".to_owned(),
        format!(
            "/apis/clawbernetes.io/v1beta1/namespaces/{}/clawsecrets",
            c.ns()
        ),
        format!(
            "/apis/clawbernetes.io/v1beta1/namespaces/{}/clawsecrets/for-b",
            c.ns()
        ),
        format!(
            "/api/v1/namespaces/{ns}/secrets/{}",
            cluster::MASTER_KEY_NAME
        ),
        format!("/api/v1/namespaces/{ns}/secrets"),
        "/api/v1/secrets".to_owned(),
        format!("/api/v1/namespaces/{ns}/configmaps"),
        "/apis/clawbernetes.io/v1beta1/clawnodes".to_owned(),
    ] {
        let (status, body) = get(path.clone()).await;
        if status == 403 {
            refused.push(path.clone());
        }
        seen.push((format!("GET {path} ({status})"), body.into_bytes()));
    }
    assert_eq!(
        refused.len(),
        8,
        "the agent's token reads none of them: {refused:?}"
    );
    let (status, body) = get(format!(
        "/api/v1/namespaces/{ns}/configmaps/{}",
        claw_secrets::k8s::sealing_key::CONFIGMAP
    ))
    .await;
    assert_eq!(status, 200, "the public sealing key is public: {body}");
    seen.push(("the sealing key".to_owned(), body.into_bytes()));
    let sa_token = Api::<k8s_openapi::api::core::v1::ServiceAccount>::namespaced(as_a.clone(), ns)
        .create_token_request(
            "claw-secrets-agent",
            &PostParams::default(),
            &Default::default(),
        )
        .await;
    assert!(
        matches!(&sa_token, Err(kube::Error::Api(s)) if s.code == 403),
        "the agent's token mints no token for another node: {sa_token:?}"
    );
    // Its deliveries, through the API server's proxy, with each token it holds; each opened
    // with the node key.
    for (what, token) in [
        ("delivery", delivery_token.trim()),
        ("api", api_token.trim()),
    ] {
        let req = hyper::Request::get(format!(
            "/api/v1/namespaces/{ns}/services/https:claw-secrets-webhook:443/proxy/v1/deliveries"
        ))
        .header("x-claw-secrets-authorization", format!("Bearer {token}"))
        .body(Vec::new())
        .unwrap();
        let answer = as_a.request_text(req).await;
        let Ok(body) = answer else {
            assert_eq!(
                what, "api",
                "the delivery token gets node-a's deliveries: {answer:?}"
            );
            continue;
        };
        assert_eq!(what, "delivery", "the API token gets no deliveries: {body}");
        let d: NodeDeliveries = serde_json::from_str(&body).unwrap();
        for delivery in &d.secrets {
            // Under every node name: the AAD binds the one it was sealed for.
            for node in [&node_a, &node_b, &node_c] {
                let scope = DeliveryScope {
                    node,
                    namespace: &delivery.namespace,
                    name: &delivery.object,
                    version: delivery.version,
                };
                if let Ok(data) = open_delivery(&node_key, &scope, &delivery.data) {
                    recovered.push(serde_json::to_string(&data).unwrap());
                }
            }
        }
        seen.push(("node-a's deliveries".to_owned(), body.into_bytes()));
    }

    // ---- What it got. ----
    let all: String = recovered.join("\n");
    assert!(
        all.contains(&for_a) && all.contains(&for_all),
        "the routine recovers what node-a holds"
    );
    let others = canary::Canaries::of([for_b.clone(), for_c.clone()]);
    others.assert_absent("what the routine opened", all.as_bytes());
    for (what, bytes) in &seen {
        others.assert_absent(what, bytes);
    }
    // No master key, in any form, anywhere it looked.
    let keyring = Api::<Secret>::namespaced(c.client(), ns)
        .get(cluster::MASTER_KEY_NAME)
        .await
        .unwrap();
    let json: serde_json::Value =
        serde_json::from_slice(&keyring.data.unwrap()["keyring.json"].0).unwrap();
    let keys: Vec<String> = json["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap().to_owned())
        .collect();
    assert!(!keys.is_empty());
    let master = canary::Canaries::of(keys.clone());
    for (what, bytes) in &seen {
        master.assert_absent(what, bytes);
        for key in &keys {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(key)
                .unwrap();
            assert!(
                !canary::contains_bytes(bytes, &raw),
                "{what} holds a master key"
            );
        }
    }
    assert!(!a.data_dir().join("master.key").exists());

    drop((agents, operator));
    hook.remove().await;
    c.cleanup().await;
}
