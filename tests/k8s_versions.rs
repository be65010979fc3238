//! The CRDs' versions against a real kube-apiserver and etcd: objects written when v1alpha1 was
//! the only version (the previous release's CRDs) are served as v1beta1 once `helm upgrade` of
//! this chart has upgraded the CRDs, and `claw-secrets migrate-storage` re-encodes them in etcd as v1beta1 and prunes
//! the CRDs' `status.storedVersions`, read back from etcd itself.
//!
//! This binary has its own control plane: it installs the previous release's CRDs, which no
//! other test may see.

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

use std::path::Path;
use std::process::Command;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use serde_json::{Value, json};

use claw_secrets::k8s::crd::{ClawConfig, ClawSecret};
use wait::eventually;

const OLD: &str = "v1alpha1";
const NEW: &str = "v1beta1";

/// The previous release's CRDs: this release's, with v1alpha1 the only version, as the chart's
/// release `release` in `ns` installed them (Helm's ownership marks: `helm upgrade` takes them
/// over and upgrades them).
fn previous_release_crds(release: &str, ns: &str) -> Vec<CustomResourceDefinition> {
    claw_secrets::k8s::crd::crds()
        .into_iter()
        // The kinds that existed then (ClawNode came with v1beta1).
        .filter(|crd| crd.spec.versions.iter().any(|v| v.name == OLD))
        .map(|crd| {
            let mut crd = serde_json::to_value(crd).unwrap();
            let versions = crd["spec"]["versions"].as_array_mut().unwrap();
            versions.retain(|v| v["name"] == OLD);
            let v = &mut versions[0];
            v["storage"] = true.into();
            let v = v.as_object_mut().unwrap();
            v.remove("deprecated");
            v.remove("deprecationWarning");
            crd["metadata"]["labels"] = json!({ "app.kubernetes.io/managed-by": "Helm" });
            crd["metadata"]["annotations"]["meta.helm.sh/release-name"] = release.into();
            crd["metadata"]["annotations"]["meta.helm.sh/release-namespace"] = ns.into();
            serde_json::from_value(crd).unwrap()
        })
        .collect()
}

async fn apply_crds(client: &kube::Client, crds: Vec<CustomResourceDefinition>) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds {
        let name = crd.metadata.name.clone().unwrap();
        api.patch(
            &name,
            &PatchParams::apply("claw-secrets-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("applying CRD {name}: {e}"));
    }
}

/// `status.storedVersions` of a CRD.
async fn stored_versions(client: &kube::Client, name: &str) -> Vec<String> {
    Api::<CustomResourceDefinition>::all(client.clone())
        .get(name)
        .await
        .unwrap()
        .status
        .and_then(|s| s.stored_versions)
        .unwrap_or_default()
}

/// The `apiVersion` an object is encoded in, in etcd: a range read through etcd's own HTTP
/// gateway, on the port the control plane gave etcd.
fn stored_api_version(state: &Path, plural: &str, ns: &str, name: &str) -> String {
    let args = std::fs::read(state.join("kube-apiserver.args")).expect("kube-apiserver.args");
    let etcd = args
        .split(|b| *b == 0)
        .filter_map(|a| std::str::from_utf8(a).ok())
        .find_map(|a| a.strip_prefix("--etcd-servers="))
        .expect("--etcd-servers")
        .to_owned();
    let key = format!("/registry/clawbernetes.io/{plural}/{ns}/{name}");
    let out = Command::new("curl")
        .args(["-sf", "--max-time", "10", "-X", "POST"])
        .arg(format!("{etcd}/v3/kv/range"))
        .arg("-d")
        .arg(json!({ "key": B64.encode(&key) }).to_string())
        .output()
        .expect("curl");
    assert!(out.status.success(), "etcd range read of {key}");
    let reply: Value = serde_json::from_slice(&out.stdout).expect("etcd's JSON");
    let value = reply["kvs"][0]["value"]
        .as_str()
        .unwrap_or_else(|| panic!("{key} not in etcd: {reply}"));
    let object: Value = serde_json::from_slice(&B64.decode(value).unwrap()).expect("a JSON object");
    object["apiVersion"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn objects_of_the_previous_version_are_migrated_and_stored_versions_pruned() {
    let test = "objects_of_the_previous_version_are_migrated_and_stored_versions_pruned";
    let cp = control_plane::local_control_plane(test);
    let state = cp.state_dir().unwrap().to_owned();
    let env = control_plane::test_env("versions").await;
    let (client, ns) = (env.client.clone(), env.namespace.clone());

    // The previous release: v1alpha1 only; a secret and a config written then.
    let release = "claw-secrets";
    apply_crds(&client, previous_release_crds(release, &ns)).await;
    let resource =
        |kind: &str| ApiResource::from_gvk(&GroupVersionKind::gvk("clawbernetes.io", OLD, kind));
    let old_secrets: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &resource("ClawSecret"));
    let old_configs: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), &ns, &resource("ClawConfig"));
    let sealed = json!({
        "version": 1, "keyId": "k-0000000000000000", "envelope": "AAAA",
        "sealTime": "2026-01-01T00:00:00Z",
    });
    eventually("the previous release's CRDs to serve", || async {
        old_secrets
            .create(
                &PostParams::default(),
                &DynamicObject::new("db", &resource("ClawSecret"))
                    .data(json!({ "spec": { "sealed": sealed, "allowedWorkloads": ["api"] } })),
            )
            .await
            .map(|_| ())
            .map_err(|e| e.to_string())
    })
    .await;
    old_configs
        .create(
            &PostParams::default(),
            &DynamicObject::new("app", &resource("ClawConfig"))
                .data(json!({ "spec": { "data": { "mode": "fast" } } })),
        )
        .await
        .unwrap();
    assert_eq!(
        stored_api_version(&state, "clawsecrets", &ns, "db"),
        format!("clawbernetes.io/{OLD}")
    );

    // This release's chart, upgrading its CRDs: v1beta1 the storage version, v1alpha1 still
    // served. (No pods run here; the webhook is left out, as nothing it would call runs.)
    let chart = control_plane::repo_root().join("charts/claw-secrets");
    tools::must(
        tools::helm(&[
            "upgrade",
            "--install",
            release,
            chart.to_str().unwrap(),
            "--namespace",
            &ns,
            "--kubeconfig",
            env.kubeconfig.to_str().unwrap(),
            "--set",
            "webhook.enabled=false",
        ]),
        "helm upgrade --install",
    );
    cluster::crds_served(&client).await;
    let secret_crd = "clawsecrets.clawbernetes.io";
    assert_eq!(stored_versions(&client, secret_crd).await, vec![OLD, NEW]);
    let secrets: Api<ClawSecret> = Api::namespaced(client.clone(), &ns);
    let db = secrets.get("db").await.expect("served as v1beta1");
    assert_eq!(db.spec.allowed_workloads, vec!["api".to_owned()]);
    // Still encoded as it was written: nothing rewrote it yet.
    assert_eq!(
        stored_api_version(&state, "clawsecrets", &ns, "db"),
        format!("clawbernetes.io/{OLD}")
    );

    let out = Command::new(cluster::BIN)
        .arg("migrate-storage")
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .expect("claw-secrets migrate-storage");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("ClawSecret: 1 objects rewritten"),
        "{stdout}"
    );

    for (plural, name, crd) in [
        ("clawsecrets", "db", secret_crd),
        ("clawconfigs", "app", "clawconfigs.clawbernetes.io"),
    ] {
        assert_eq!(
            stored_api_version(&state, plural, &ns, name),
            format!("clawbernetes.io/{NEW}"),
            "{plural}/{name} in etcd"
        );
        assert_eq!(stored_versions(&client, crd).await, vec![NEW], "{crd}");
    }
    let after = secrets.get("db").await.unwrap();
    assert_eq!(
        after.spec, db.spec,
        "the migration changes nothing the object says"
    );
    assert_eq!(after.metadata.generation, db.metadata.generation);
    let configs: Api<ClawConfig> = Api::namespaced(client.clone(), &ns);
    assert_eq!(configs.get("app").await.unwrap().spec.data["mode"], "fast");
    // The deprecated version is still served, with kubectl's warning.
    old_secrets
        .get("db")
        .await
        .expect("v1alpha1 is still served");
    tools::must(
        tools::helm(&[
            "uninstall",
            release,
            "--namespace",
            &ns,
            "--kubeconfig",
            env.kubeconfig.to_str().unwrap(),
        ]),
        "helm uninstall",
    );
    // Kept by the uninstall, and the objects with them.
    assert_eq!(stored_versions(&client, secret_crd).await, vec![NEW]);
    secrets.get("db").await.expect("kept");
    env.cleanup().await;
}
