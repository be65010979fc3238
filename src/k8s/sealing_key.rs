//! Where the cluster's public sealing key is published (`claw-secrets seal` encrypts to it),
//! and the operator's publication of it: a ConfigMap in the operator's namespace, readable by
//! whoever may read ConfigMaps there. It is public by design; the private half is derived from
//! the master key (docs/crypto.md) and never leaves the operator's memory.

use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch};
use serde_json::json;

use crate::crypto::{Keyring, SealingPrivateKey};
use crate::k8s::component::Component;

/// The ConfigMap holding the public sealing key, in the operator's namespace.
pub const CONFIGMAP: &str = "claw-secrets-sealing-key";
/// Its data key: the key's one-line text form.
pub const CONFIGMAP_KEY: &str = "sealing-key";

/// Writes the public key of the keyring's active master key (server-side apply: every replica
/// writes the same content, and a later master key replaces it).
pub async fn publish(
    client: &kube::Client,
    namespace: &str,
    keyring: &Keyring,
) -> Result<String, kube::Error> {
    let public = SealingPrivateKey::derive(keyring.active()).public_key();
    let text = public.to_text();
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIGMAP,
            "labels": { "app.kubernetes.io/managed-by": "claw-secrets-operator" },
            "annotations": {
                "clawbernetes.io/usage": "claw-secrets seal --fetch-key saves this key; claw-secrets seal --key FILE encrypts ClawSecret data to it (safe to commit)",
            },
        },
        "data": { CONFIGMAP_KEY: text },
    });
    apply(&api, CONFIGMAP, &manifest).await?;
    Ok(public.master_key_id().to_string())
}

/// Reads the published public sealing key from `namespace` (what an agent seals the data of the
/// writes it passes on to). `Err` names the ConfigMap and what is wrong.
pub async fn fetch(
    client: &kube::Client,
    namespace: &str,
) -> Result<crate::crypto::SealingPublicKey, String> {
    let where_ = format!("ConfigMap {namespace}/{CONFIGMAP}");
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let cm = api
        .get(CONFIGMAP)
        .await
        .map_err(|e| format!("cannot read {where_}: {e}"))?;
    let text = cm
        .data
        .and_then(|mut d| d.remove(CONFIGMAP_KEY))
        .ok_or_else(|| format!("{where_} has no key {CONFIGMAP_KEY:?}"))?;
    crate::crypto::SealingPublicKey::parse(&text).map_err(|e| format!("{where_}: {e}"))
}

/// The ConfigMap holding the keyring's status, in the operator's namespace:
/// `kubectl get configmap claw-secrets-keyring-status -o yaml`.
pub const STATUS_CONFIGMAP: &str = "claw-secrets-keyring-status";

/// What the leader's last re-encryption pass found: the active key, ClawSecrets per key id,
/// and whether re-encryption is done (no ClawSecret under a retired key). No secret in it.
pub async fn publish_status(
    client: &kube::Client,
    namespace: &str,
    active: &str,
    sealed_objects: &std::collections::BTreeMap<String, usize>,
) -> Result<(), kube::Error> {
    let retired: usize = sealed_objects
        .iter()
        .filter(|(id, _)| id.as_str() != active)
        .map(|(_, n)| n)
        .sum();
    let reencryption = if retired == 0 {
        "complete: every ClawSecret is sealed under the active key".to_owned()
    } else {
        format!("in progress: {retired} ClawSecrets are still sealed under retired keys")
    };
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), namespace);
    let manifest = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": STATUS_CONFIGMAP,
            "labels": { "app.kubernetes.io/managed-by": "claw-secrets-operator" },
            "annotations": {
                "clawbernetes.io/usage": "written by the operator's leader after each re-encryption pass; `claw-secrets keys prune` removes retired keys once no ClawSecret and no node's store (status.masterKeys of its ClawNode) needs them",
            },
        },
        "data": {
            "activeKey": active,
            "sealedObjects": serde_json::to_string(sealed_objects).expect("a map of counts"),
            "reencryption": reencryption,
            "observedAt": jiff::Timestamp::now().to_string(),
        },
    });
    apply(&api, STATUS_CONFIGMAP, &manifest).await
}

/// Server-side apply of one of the operator's ConfigMaps (these and the agents' CA bundle):
/// every replica writes the same content, and the operator's field manager owns it.
pub(crate) async fn apply(
    api: &Api<ConfigMap>,
    name: &str,
    manifest: &serde_json::Value,
) -> Result<(), kube::Error> {
    api.patch(
        name,
        &Component::Operator.apply().force(),
        &Patch::Apply(manifest),
    )
    .await
    .map(|_| ())
}
