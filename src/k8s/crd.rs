//! The `ClawSecret`, `ClawConfig` and `ClawNode` custom resources (group `clawbernetes.io`).
//!
//! The YAML under `crds/` is generated from these types by `claw-secrets crd` and checked
//! against them by a test. Field descriptions come from the doc comments below, so they are
//! what `kubectl explain` shows: write them for the user.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// API group of both resources.
pub const GROUP: &str = "clawbernetes.io";

/// An encrypted secret delivered to Clawbernetes nodes.
///
/// Write plaintext into `data`; the operator seals it (ChaCha20-Poly1305, per-write key from
/// HKDF-SHA256) into `sealed`, removes `data`, and moves `status.version` forward. Writing
/// `data` again rotates the secret.
// clippy reads the printer columns' repeated `type_ = "string"` as one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, PartialEq)]
#[kube(
    group = "clawbernetes.io",
    version = "v1beta1",
    kind = "ClawSecret",
    plural = "clawsecrets",
    shortname = "csec",
    category = "claw",
    namespaced,
    status = "ClawSecretStatus",
    doc = "An encrypted secret delivered to Clawbernetes nodes: write plaintext into spec.data, and the operator seals it into spec.sealed and removes the plaintext.",
    selectable = ".spec.name",
    printcolumn(
        name = "Version",
        type_ = "integer",
        json_path = ".status.version",
        description = "Current version of the secret"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Sealed and deliverable"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why it is (not) Ready",
        priority = "1"
    ),
    printcolumn(
        name = "Key",
        type_ = "string",
        json_path = ".spec.sealed.keyId",
        description = "The master key that sealed the current version",
        priority = "1"
    ),
    printcolumn(
        name = "Seed-Name",
        type_ = "string",
        json_path = ".spec.name",
        description = "The name node.invoke knows it by, when the object name is a hash of it",
        priority = "1"
    )
)]
#[kube(validation = Rule::new("!has(self.spec.sealed) || !has(self.status) || !has(self.status.version) || self.spec.sealed.version >= self.status.version").message("spec.sealed.version must not be below status.version, the highest version this secret has had: a rotated-away version cannot be put back; write spec.data to seal a new version").field_path(".spec.sealed.version").reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("has(self.data) || has(self.encryptedData) || has(self.sealed)").message("spec must give data (plaintext to seal), encryptedData (the output of claw-secrets seal) or sealed").reason(Reason::FieldValueRequired))]
#[x_kube(validation = Rule::new("!(has(self.data) && has(self.encryptedData))").message("spec must give data or encryptedData, not both").field_path(".encryptedData").reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("!has(oldSelf.sealed) || !has(self.sealed) || self.sealed.version >= oldSelf.sealed.version").message("sealed.version must only move forward").field_path(".sealed.version").reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)").message("spec.name must not change after creation; create an object for the other name").field_path(".name").reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct ClawSecretSpec {
    /// The secret's name as node.invoke knows it, when that name cannot be an object name
    /// (underscores, a leading or trailing '.' or '-'); such objects are named "cs--" and a
    /// hash of it. Defaults to the object's name. 1-253 characters of a-z, 0-9, '-', '_', '.'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9._-]+$"))]
    pub name: Option<String>,

    /// Plaintext key/value data to seal. The operator encrypts it into `sealed` and removes
    /// it from the object within seconds; set it again to rotate the secret. Keys are 1-253
    /// characters of letters, digits, '-', '_' and '.'; keys plus values are at most 1 MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<BTreeMap<String, String>>,

    /// Data encrypted to the cluster's public sealing key by `claw-secrets seal` (HPKE, bound to
    /// this namespace and name): safe to commit to Git. The operator opens it at admission and
    /// stores it as `sealed`, like `data`; applying the same file again changes nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 2_000_000))]
    pub encrypted_data: Option<String>,

    /// Workloads (ServiceAccount names in this namespace) that may read the secret. Empty
    /// means every workload of the namespace may.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(regex(pattern = r"^[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub allowed_workloads: Vec<String>,

    /// Deliver the secret only to nodes whose labels match all of these. Absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    /// The sealed data, written by the operator (or a node agent on rotation). Ciphertext only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedData>,
}

/// Ciphertext of one version of a secret, as the operator wrote it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SealedData {
    /// The version these bytes were sealed for; bound into the ciphertext, so the bytes cannot
    /// be replayed as another version. Only moves forward.
    // An int64 on the wire, as the API conventions ask (no unsigned integers).
    #[schemars(with = "i64", range(min = 1))]
    pub version: u64,
    /// Id of the master key that sealed them (an entry of the operator's keyring).
    #[schemars(length(min = 1, max = 64))]
    pub key_id: String,
    /// Base64 of the versioned envelope (format, algorithm, key id, salt, nonce, ciphertext).
    pub envelope: String,
    /// When this version was sealed (RFC 3339): the secret's updatedAt in node.invoke.
    #[schemars(extend("format" = "date-time"))]
    pub seal_time: String,
    /// Keyed digest (HMAC-SHA256 under a key derived from the master key it names) of the data
    /// this version was sealed from, bound to the secret's namespace, name and version: the
    /// same data applied again is recognised and makes no new version. Reveals nothing about
    /// the data without the master key. Absent on versions written through node.invoke (the
    /// next applied data then counts as new).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 128))]
    pub data_digest: Option<String>,
}

/// `Debug` shows the data's keys, never its values (plaintext until the operator seals it).
impl std::fmt::Debug for ClawSecretSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let data = self.data.as_ref().map(|d| {
            d.keys()
                .map(|k| (k, "[redacted]"))
                .collect::<BTreeMap<_, _>>()
        });
        f.debug_struct("ClawSecretSpec")
            .field("name", &self.name)
            .field("data", &data)
            .field(
                "encrypted_data",
                &self.encrypted_data.as_ref().map(|_| "[ciphertext]"),
            )
            .field("allowed_workloads", &self.allowed_workloads)
            .field("node_selector", &self.node_selector)
            .field("sealed", &self.sealed)
            .finish()
    }
}

/// What the operator observed.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, KubeSchema)]
#[x_kube(validation = Rule::new("!has(oldSelf.version) || (has(self.version) && self.version >= oldSelf.version)").message("status.version must only move forward").field_path(".version").reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct ClawSecretStatus {
    /// The current version: 1 after the first seal, one more after each rotation; the highest
    /// version the secret has had, so a lower `spec.sealed.version` is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<i64>", range(min = 1))]
    pub version: Option<u64>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready is True once the secret is sealed and deliverable; otherwise its reason and
    /// message say what is wrong and how to fix it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Plain (unencrypted) configuration delivered to Clawbernetes nodes.
// clippy reads the printer columns' repeated `type_ = "string"` as one attribute given twice.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "clawbernetes.io",
    version = "v1beta1",
    kind = "ClawConfig",
    plural = "clawconfigs",
    shortname = "ccfg",
    category = "claw",
    namespaced,
    status = "ClawConfigStatus",
    doc = "Plain (unencrypted) configuration delivered to Clawbernetes nodes; immutable configs cannot be changed after creation.",
    selectable = ".spec.name",
    printcolumn(
        name = "Immutable",
        type_ = "boolean",
        json_path = ".spec.immutable",
        description = "Whether the data can still change"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status",
        description = "Accepted and deliverable"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Reason",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].reason",
        description = "Why it is (not) Ready",
        priority = "1"
    ),
    printcolumn(
        name = "Seed-Name",
        type_ = "string",
        json_path = ".spec.name",
        description = "The name node.invoke knows it by, when the object name is a hash of it",
        priority = "1"
    )
)]
#[x_kube(validation = Rule::new("!has(oldSelf.immutable) || !oldSelf.immutable || (has(self.immutable) && self.immutable)").message("immutable must not be set back to false").field_path(".immutable").reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("!has(oldSelf.immutable) || !oldSelf.immutable || self.data == oldSelf.data").message("the data of an immutable ClawConfig must not change; delete it and create it again").field_path(".data").reason(Reason::FieldValueForbidden))]
#[x_kube(validation = Rule::new("has(self.name) == has(oldSelf.name) && (!has(self.name) || self.name == oldSelf.name)").message("spec.name must not change after creation; create an object for the other name").field_path(".name").reason(Reason::FieldValueForbidden))]
#[serde(rename_all = "camelCase")]
pub struct ClawConfigSpec {
    /// The config's name as node.invoke knows it, when that name cannot be an object name;
    /// defaults to the object's name. 1-253 characters of a-z, 0-9, '-', '_', '.'.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), regex(pattern = r"^[a-z0-9._-]+$"))]
    pub name: Option<String>,

    /// Key/value settings, stored and delivered in clear (use a ClawSecret for anything
    /// sensitive). Keys are 1-253 characters of letters, digits, '-', '_' and '.'.
    pub data: BTreeMap<String, String>,

    /// If true, the data cannot be changed after creation, and immutable cannot be set back
    /// to false. The config can still be deleted.
    #[serde(default)]
    pub immutable: bool,

    /// Deliver the config only to nodes whose labels match all of these. Absent: every node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
}

/// What the operator observed: the data it accepted (by hash), when, and whether the config is
/// Ready.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClawConfigStatus {
    /// When the operator accepted the current data (RFC 3339): the config's updatedAt in
    /// node.invoke.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub accepted_time: Option<String>,
    /// SHA-256 (hex) of the data the operator accepted, the data nodes deliver; absent while
    /// the data is invalid (nodes keep the copy they have).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accepted_data_hash: Option<String>,
    /// The metadata.generation this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Ready is True once the config is accepted; otherwise the reason says what is wrong.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// A status condition, shaped like metav1.Condition.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// The condition's type, e.g. Ready.
    #[serde(rename = "type")]
    #[schemars(
        length(max = 316),
        regex(
            pattern = r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
        )
    )]
    pub type_: String,
    /// True, False or Unknown.
    #[schemars(extend("enum" = ["True", "False", "Unknown"]))]
    pub status: String,
    /// A CamelCase reason, e.g. Sealed, Accepted, InvalidName.
    #[schemars(
        length(min = 1, max = 1024),
        regex(pattern = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$")
    )]
    pub reason: String,
    /// What happened and, when something is wrong, what to do. Never contains secret values.
    #[schemars(length(max = 32768))]
    pub message: String,
    /// When the status last changed (RFC 3339).
    #[schemars(extend("format" = "date-time"))]
    pub last_transition_time: String,
    /// The metadata.generation the condition was set for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0))]
    pub observed_generation: Option<i64>,
}

/// A node's public key, published by the node's agent: what the operator seals the node's
/// deliveries to (docs/crypto.md, "Per-node keys").
///
/// Cluster-scoped and named after the Node. Only the agent on that node can write it: a
/// ValidatingAdmissionPolicy compares the object's name with the node name the API server put
/// in the agent's pod-bound token (`authentication.kubernetes.io/node-name`). Owned by its Node,
/// so it goes when the Node goes.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "clawbernetes.io",
    version = "v1beta1",
    kind = "ClawNode",
    plural = "clawnodes",
    status = "ClawNodeStatus",
    shortname = "cnode",
    category = "claw",
    doc = "A Clawbernetes node's public key, published by the node's claw-secrets agent; secrets are sealed to it for that node alone.",
    printcolumn(
        name = "Key-ID",
        type_ = "string",
        json_path = ".spec.keyId",
        description = "The node key's id"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClawNodeSpec {
    /// The node's public key (HPKE: X25519), as `claw-secrets-sealing-key-v1:<key id>:<base64url
    /// of 32 bytes>`. Its private half never leaves the node.
    #[schemars(length(min = 1, max = 256))]
    pub public_key: String,
    /// The id of the node key the public key was derived from (`k-` and 16 hex digits); a new
    /// id means a new key (a replaced node, or a wiped data dir).
    #[schemars(regex(pattern = r"^k-[0-9a-f]{16}$"))]
    pub key_id: String,
}

/// What the node's agent reports about its store.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClawNodeStatus {
    /// The master keys (ids) the node's store still needs to open or authenticate what it holds.
    /// Empty for an agent on deliveries (its store is under the node key); an agent without
    /// deliveries re-encrypts its store under each new active master key and reports again.
    /// `claw-secrets keys prune` keeps every key listed by any ClawNode (docs/crypto.md,
    /// "Keyring").
    #[serde(default)]
    #[schemars(
        length(max = 64),
        inner(regex(pattern = r"^k-[0-9a-f]{16}$")),
        extend("x-kubernetes-list-type" = "set")
    )]
    pub master_keys: Vec<String>,
    /// When the agent last looked at its store (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(extend("format" = "date-time"))]
    pub observed_time: Option<String>,
}

/// Versions still served beside the types' own (the storage version), with the same schema, so
/// the API server converts between them by changing `apiVersion` alone (no conversion webhook).
/// Deprecated: kubectl warns on every use. `claw-secrets migrate-storage` rewrites stored
/// objects in the storage version and drops these from `status.storedVersions`, after which a
/// later release may stop serving them (docs/operator.md, "Versions").
pub const DEPRECATED_VERSIONS: &[&str] = &["v1alpha1"];

/// Every CRD as installed: the types' version (served, the storage version) and, for the kinds
/// that had one, every [`DEPRECATED_VERSIONS`] entry; descriptions unwrapped for `kubectl
/// explain`; kept by `helm uninstall`.
pub fn crds() -> Vec<CustomResourceDefinition> {
    use kube::CustomResourceExt;
    // ClawNode came with v1beta1: it never had an older version to serve.
    [
        (ClawSecret::crd(), DEPRECATED_VERSIONS),
        (ClawConfig::crd(), DEPRECATED_VERSIONS),
        (ClawNode::crd(), &[][..]),
    ]
    .into_iter()
    .map(|(crd, deprecated)| {
        let kind = crd.spec.names.kind.clone();
        let mut crd = serde_json::to_value(&crd).expect("a CRD serializes");
        unwrap_descriptions(&mut crd);
        // With the chart (templates/crds.yaml), `helm uninstall` keeps them: deleting a CRD
        // deletes every object of its kind. Harmless with kubectl.
        crd["metadata"]["annotations"] = serde_json::json!({ "helm.sh/resource-policy": "keep" });
        let versions = crd["spec"]["versions"]
            .as_array_mut()
            .expect("a CRD has versions");
        let current = versions[0].clone();
        let storage = current["name"].as_str().expect("a version name").to_owned();

        for old in deprecated {
            let mut served = current.clone();
            served["name"] = (*old).into();
            served["storage"] = false.into();
            served["deprecated"] = true.into();
            served["deprecationWarning"] = format!(
                "{GROUP}/{old} {kind} is deprecated: use {GROUP}/{storage} (the same fields)"
            )
            .into();
            versions.push(served);
        }
        serde_json::from_value(crd).expect("still a CRD")
    })
    .collect()
}

/// Every CRD as one multi-document YAML stream: what `claw-secrets crd` prints.
pub fn crds_yaml() -> String {
    let mut out = String::from("# Generated by `claw-secrets crd`; do not edit by hand.\n");
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_saphyr::to_string(&crd).expect("CRDs serialize to YAML"));
    }
    out
}

/// Joins the lines of every schema description into paragraphs: doc comments break lines at
/// 100 columns, and `kubectl explain` wraps the text again to the terminal, so kept breaks
/// would show as ragged half-lines. Blank lines (paragraphs) stay.
fn unwrap_descriptions(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                match v {
                    serde_json::Value::String(text) if key == "description" => {
                        *text = text
                            .split("\n\n")
                            .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
                            .collect::<Vec<_>>()
                            .join("\n\n");
                    }
                    other => unwrap_descriptions(other),
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(unwrap_descriptions),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    /// The API conventions the schemas follow, checked on the generated CRDs: conditions are a
    /// map keyed on type with metav1.Condition's constraints, no unsigned integers, time fields
    /// are named ...Time and typed date-time, workload lists are sets.
    #[test]
    fn the_schemas_follow_the_api_conventions() {
        let crds: Vec<serde_json::Value> =
            serde_saphyr::from_multiple(&super::crds_yaml()).unwrap();
        let mut checked = 0;
        fn walk(v: &serde_json::Value, path: &str, f: &mut dyn FnMut(&str, &serde_json::Value)) {
            if let Some(props) = v.get("properties").and_then(|p| p.as_object()) {
                for (k, child) in props {
                    let p = format!("{path}.{k}");
                    f(&p, child);
                    walk(child, &p, f);
                }
            }
            if let Some(items) = v.get("items") {
                walk(items, &format!("{path}[]"), f);
            }
        }
        for crd in &crds {
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            walk(schema, "", &mut |path, field| {
                let format = field.get("format").and_then(|f| f.as_str());
                assert!(
                    !format.is_some_and(|f| f.starts_with("uint")),
                    "{path}: unsigned integer"
                );
                if path.ends_with("Time") {
                    assert_eq!(format, Some("date-time"), "{path}");
                }
                assert!(
                    !path.ends_with("At"),
                    "{path}: time fields are named ...Time"
                );
                if path.ends_with(".conditions") {
                    assert_eq!(field["x-kubernetes-list-type"], "map", "{path}");
                    assert_eq!(
                        field["x-kubernetes-list-map-keys"],
                        serde_json::json!(["type"])
                    );
                    let item = &field["items"]["properties"];
                    assert_eq!(
                        item["status"]["enum"],
                        serde_json::json!(["True", "False", "Unknown"])
                    );
                    assert!(item["reason"]["pattern"].is_string());
                    assert_eq!(item["message"]["maxLength"], 32768);
                    checked += 1;
                }
                if path.ends_with(".allowedWorkloads") {
                    assert_eq!(field["x-kubernetes-list-type"], "set", "{path}");
                }
            });
        }
        assert_eq!(checked, 2, "both kinds have conditions");
    }

    #[test]
    fn descriptions_are_paragraphs_not_wrapped_lines() {
        let yaml = super::crds_yaml();
        let crds: Vec<serde_json::Value> = serde_saphyr::from_multiple(&yaml).unwrap();
        let mut descriptions = Vec::new();
        fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
            match v {
                serde_json::Value::Object(m) => {
                    for (k, v) in m {
                        match v {
                            serde_json::Value::String(s) if k == "description" => {
                                out.push(s.clone())
                            }
                            other => collect(other, out),
                        }
                    }
                }
                serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
                _ => {}
            }
        }
        crds.iter().for_each(|c| collect(c, &mut descriptions));
        assert!(descriptions.len() > 20);
        for d in descriptions {
            assert!(
                !d.replace("\n\n", "").contains('\n'),
                "a description with a hard line break: {d:?}"
            );
        }
    }

    #[test]
    fn debug_never_prints_plaintext() {
        let spec = super::ClawSecretSpec {
            name: None,
            data: Some([("password".to_owned(), "canary-7731".to_owned())].into()),
            encrypted_data: None,
            allowed_workloads: vec![],
            node_selector: None,
            sealed: None,
        };
        let obj = super::ClawSecret::new("db", spec);
        let printed = format!("{obj:?} {obj:#?}");
        assert!(
            printed.contains("password") && !printed.contains("canary"),
            "{printed}"
        );
    }

    #[test]
    fn committed_crds_match_the_generator() {
        let committed = include_str!("../../crds/crds.yaml");
        assert!(
            committed == super::crds_yaml(),
            "crds/crds.yaml is out of date: regenerate it with `cargo run -- crd > crds/crds.yaml` and commit it"
        );
    }
}
