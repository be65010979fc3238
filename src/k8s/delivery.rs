//! Per-node delivery: which ClawSecrets a node is meant to hold, and each one's data sealed for
//! that node alone (docs/architecture.md, "Per-node keys and delivery"; docs/crypto.md,
//! "Per-node keys"). The operator computes deliveries from what it watches
//! ([`crate::k8s::operator`]'s HTTPS server answers `GET /v1/deliveries`); a node opens them with
//! its own key ([`crate::crypto::open_delivery`]).

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

use crate::crypto::{self, DeliveryScope, Keyring, SealingPublicKey, SecretIdentity};
use crate::domain::Kind;
use crate::k8s::convert;
use crate::k8s::crd::ClawSecret;

/// The path of the operator's delivery endpoint.
pub const PATH: &str = "/v1/deliveries";

/// The audience of the token an agent presents to the endpoint: a token for the operator is
/// worth nothing to the API server, and the reverse.
pub const AUDIENCE: &str = "claw-secrets-operator";

/// Where the API server puts the node of a pod-bound ServiceAccount token, in the user's extra.
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// One secret delivered to one node: what the node's store keeps of it, the data sealed to the
/// node's key (bound to node, namespace, object name and version).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Delivery {
    pub namespace: String,
    /// The name node.invoke knows it by (`spec.name`, else the object's name).
    pub name: String,
    /// The ClawSecret's object name (bound into the sealed data).
    pub object: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    pub version: u64,
    pub allowed_workloads: Vec<String>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339: when this version was sealed.
    pub updated_at: String,
    /// The data, sealed for the node ([`crate::crypto::seal_delivery`]).
    pub data: String,
}

/// A node's deliveries, as the endpoint answers them: the whole set (`full`), or what changed
/// since the agent's cursor.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeDeliveries {
    pub node: String,
    /// The node key the data is sealed to (the `ClawNode`'s `spec.keyId`).
    pub node_key_id: String,
    /// The cursor ([`Cursor`]): the agent sends it back as `have` to get what changes next.
    pub etag: String,
    /// `true`: `secrets` is the node's whole set (drop anything else held); `false`: `secrets`
    /// were added or changed and `removed` must be dropped, everything else held stays.
    pub full: bool,
    pub secrets: Vec<Delivery>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub removed: Vec<Removed>,
}

/// A secret the node must drop (deleted, or no longer selecting it), if it holds it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct Removed {
    pub namespace: String,
    /// The ClawSecret's object name.
    pub object: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
}

impl Removed {
    pub fn of(obj: &ClawSecret) -> Removed {
        Removed {
            namespace: obj.metadata.namespace.clone().unwrap_or_default(),
            object: obj.metadata.name.clone().unwrap_or_default(),
            uid: obj.metadata.uid.clone(),
        }
    }
}

/// Where an agent's copy stands: the node key and labels its set was computed for, and the
/// highest ClawSecret `resourceVersion` (the API server's etcd revision) it reflects. Text:
/// `v1.<key id>.<labels digest>.<revision>`. A cursor for another key or other labels, or
/// older than what the operator replica remembers deletions for, gets the whole set again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    pub key_id: String,
    pub labels: String,
    pub revision: u64,
    /// The operator's watch epoch the answer came from (0: none; `v1` cursors have none).
    pub epoch: u64,
}

impl Cursor {
    pub fn parse(text: &str) -> Option<Cursor> {
        let (rest, epoch) = match text.strip_prefix("v2.") {
            Some(rest) => {
                let (rest, epoch) = rest.rsplit_once('.')?;
                (rest, epoch.parse().ok()?)
            }
            None => (text.strip_prefix("v1.")?, 0),
        };
        let (rest, revision) = rest.rsplit_once('.')?;
        let (key_id, labels) = rest.rsplit_once('.')?;
        Some(Cursor {
            key_id: key_id.to_owned(),
            labels: labels.to_owned(),
            revision: revision.parse().ok()?,
            epoch,
        })
    }

    pub fn to_text(&self) -> String {
        format!(
            "v2.{}.{}.{}.{}",
            self.key_id, self.labels, self.revision, self.epoch
        )
    }
}

/// A short digest of a node's labels: what its selection depends on.
pub fn labels_digest(labels: &BTreeMap<String, String>) -> String {
    let mut h = Sha256::new();
    for (k, v) in labels {
        for part in [k, v] {
            h.update((part.len() as u32).to_be_bytes());
            h.update(part.as_bytes());
        }
    }
    crate::hex::encode(&h.finalize()[..8])
}

/// An object's `resourceVersion` as a revision; `None` when it is not a number (an API server
/// not backed by etcd), in which case only whole sets are answered.
pub fn revision(obj: &ClawSecret) -> Option<u64> {
    obj.metadata.resource_version.as_deref()?.parse().ok()
}

/// What decides which nodes an object is meant for ([`meant_for`]): its `nodeSelector`, whether
/// it is sealed, whether it is being deleted. A change of anything else (data, status) leaves
/// the object on the nodes it was on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    node_selector: Option<BTreeMap<String, String>>,
    sealed: bool,
    deleting: bool,
}

impl Selection {
    pub fn of(obj: &ClawSecret) -> Selection {
        Selection {
            node_selector: obj.spec.node_selector.clone(),
            sealed: obj.spec.sealed.is_some(),
            deleting: obj.metadata.deletion_timestamp.is_some(),
        }
    }
}

/// What changed for a node with `labels` after revision `since`: the objects it is meant to
/// hold that changed (to deliver), and those it is not meant to hold whose selection changed
/// since (`reselected`): to drop, as the node may hold them. An object that was never meant
/// for the node, whatever else changed in it, is not named: a status write does not reach
/// every node. `None` if a revision is not a number.
pub fn changed_since<'a>(
    secrets: impl IntoIterator<Item = &'a ClawSecret>,
    labels: &BTreeMap<String, String>,
    since: u64,
    reselected: impl Fn(&ClawSecret) -> bool,
) -> Option<(Vec<&'a ClawSecret>, Vec<Removed>)> {
    let mut changed = Vec::new();
    let mut removed = Vec::new();
    for obj in secrets {
        if revision(obj)? <= since {
            continue;
        }
        if meant_for(obj, labels) {
            changed.push(obj);
        } else if reselected(obj) {
            removed.push(Removed::of(obj));
        }
    }
    sort_by_name(&mut changed);
    Some((changed, removed))
}

/// Whether a node with `labels` is meant to hold `obj`: sealed, not being deleted, selected by
/// its `nodeSelector`.
pub fn meant_for(obj: &ClawSecret, labels: &BTreeMap<String, String>) -> bool {
    obj.metadata.deletion_timestamp.is_none()
        && obj.spec.sealed.is_some()
        && convert::selects(obj.spec.node_selector.as_ref(), labels)
}

/// The ClawSecrets meant for a node with `labels` ([`meant_for`]), sorted by namespace and
/// name.
pub fn selected<'a>(
    secrets: impl IntoIterator<Item = &'a ClawSecret>,
    labels: &BTreeMap<String, String>,
) -> Vec<&'a ClawSecret> {
    let mut chosen: Vec<&ClawSecret> = secrets
        .into_iter()
        .filter(|s| meant_for(s, labels))
        .collect();
    sort_by_name(&mut chosen);
    chosen
}

fn sort_by_name(secrets: &mut [&ClawSecret]) {
    secrets.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
}

/// Opens `obj`'s data with the master keyring and seals it for `node` (whose public key is
/// `node_key`). `Err` says why this object cannot be delivered (invalid, or sealed with a
/// master key the keyring no longer has); never a value.
pub fn deliver(
    node: &str,
    node_key: &SealingPublicKey,
    obj: &ClawSecret,
    keyring: &Keyring,
) -> Result<Delivery, String> {
    let record = convert::secret_record(obj, Vec::new())
        .map_err(|e| e.to_string())?
        .ok_or_else(|| "not sealed yet".to_owned())?;
    let identity = SecretIdentity {
        kind: Kind::Secret,
        namespace: &record.key.namespace,
        name: &record.key.name,
        version: record.version,
    };
    let data = crypto::open(keyring, &identity, &record.envelope).map_err(|e| e.to_string())?;
    let object = obj.metadata.name.clone().unwrap_or_default();
    let scope = DeliveryScope {
        node,
        namespace: record.key.namespace.as_str(),
        name: &object,
        version: record.version.get(),
    };
    let sealed = crypto::seal_delivery(node_key, &scope, &data).map_err(|e| e.to_string())?;
    Ok(Delivery {
        namespace: record.key.namespace.to_string(),
        name: record.key.name.to_string(),
        object,
        uid: obj.metadata.uid.clone(),
        resource_version: obj.metadata.resource_version.clone(),
        version: record.version.get(),
        allowed_workloads: record
            .allowed_workloads
            .iter()
            .map(|w| w.to_string())
            .collect(),
        created_at: record.created_at.to_string(),
        updated_at: record.updated_at.to_string(),
        data: sealed,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::crypto::{SealingPrivateKey, open_delivery};
    use crate::domain::{Name, Namespace, SecretData, Version};
    use crate::k8s::crd::{ClawSecretSpec, SealedData};
    use base64::Engine;

    /// A ClawSecret `team-a/<name>` sealed under `keyring` at version 2 with `password: value`.
    pub(crate) fn sealed_secret(
        keyring: &Keyring,
        name: &str,
        value: &str,
        selector: Option<&[(&str, &str)]>,
    ) -> ClawSecret {
        let data: SecretData =
            serde_json::from_value(serde_json::json!({ "password": value })).unwrap();
        let (namespace, key) = (
            Namespace::parse("team-a").unwrap(),
            Name::parse(name).unwrap(),
        );
        let identity = SecretIdentity {
            kind: Kind::Secret,
            namespace: &namespace,
            name: &key,
            version: Version::new(2).unwrap(),
        };
        let envelope = crypto::seal(keyring, &identity, &data).unwrap();
        let mut obj = ClawSecret::new(
            name,
            ClawSecretSpec {
                name: None,
                data: None,
                encrypted_data: None,
                allowed_workloads: vec!["api".to_owned()],
                node_selector: selector.map(|s| {
                    s.iter()
                        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                        .collect()
                }),
                sealed: Some(SealedData {
                    version: 2,
                    key_id: envelope.key_id().to_string(),
                    envelope: base64::engine::general_purpose::STANDARD.encode(envelope.to_bytes()),
                    seal_time: "2026-01-01T00:00:00Z".to_owned(),
                    data_digest: None,
                }),
            },
        );
        obj.metadata.namespace = Some("team-a".to_owned());
        obj.metadata.uid = Some(format!("uid-{name}"));
        obj.metadata.resource_version = Some("7".to_owned());
        obj
    }

    #[test]
    fn a_cursor_reads_back_what_it_wrote() {
        let c = Cursor {
            key_id: "k-0123456789abcdef".to_owned(),
            labels: labels_digest(&[("gpu".to_owned(), "true".to_owned())].into()),
            revision: 4711,
            epoch: 17,
        };
        assert_eq!(Cursor::parse(&c.to_text()), Some(c.clone()));
        // An operator of the previous release's cursor: no epoch.
        let v1 = Cursor::parse("v1.k-1.ab.3").unwrap();
        assert_eq!((v1.revision, v1.epoch), (3, 0));
        for bad in [
            "",
            "v2.k-1.ab.3",
            "v3.k-1.ab.3.1",
            "v1.k-1.ab",
            "v1.k-1.ab.x",
            "v2.k-1.ab.3.x",
        ] {
            assert_eq!(Cursor::parse(bad), None, "{bad}");
        }
        assert_ne!(labels_digest(&BTreeMap::new()), c.labels);
    }

    #[test]
    fn a_node_gets_what_selects_it_sealed_to_its_key_alone() {
        let master = Keyring::generate().unwrap();
        let node_a = Keyring::generate().unwrap();
        let node_b = Keyring::generate().unwrap();
        let public_a = SealingPrivateKey::derive(node_a.active()).public_key();
        let gpu = [("gpu", "true")];
        let secrets = [
            sealed_secret(&master, "everywhere", "canary-1", None),
            sealed_secret(&master, "gpu-only", "canary-2", Some(&gpu)),
        ];
        let labels_a: BTreeMap<String, String> = [("gpu".to_owned(), "true".to_owned())].into();
        let labels_b = BTreeMap::new();
        let for_a = selected(&secrets, &labels_a);
        let for_b = selected(&secrets, &labels_b);
        assert_eq!(for_a.len(), 2);
        assert_eq!(
            for_b
                .iter()
                .map(|s| s.metadata.name.clone().unwrap())
                .collect::<Vec<_>>(),
            ["everywhere"]
        );
        // Changes since a revision: what the node holds that changed, what it must drop.
        let mut later = secrets.clone();
        later[1].metadata.resource_version = Some("9".to_owned());
        let never = |_: &ClawSecret| false;
        let (changed, removed) = changed_since(&later, &labels_a, 7, never).unwrap();
        assert_eq!(changed.len(), 1);
        assert_eq!(changed[0].metadata.name.as_deref(), Some("gpu-only"));
        assert!(removed.is_empty());
        // gpu-only's selector edited away from GPU nodes: node-a drops it.
        let before = Selection::of(&later[1]);
        later[1].spec.node_selector = Some([("gpu".to_owned(), "false".to_owned())].into());
        assert_ne!(Selection::of(&later[1]), before);
        let gpu_only = |s: &ClawSecret| s.metadata.name.as_deref() == Some("gpu-only");
        let (changed, removed) = changed_since(&later, &labels_a, 7, gpu_only).unwrap();
        assert!(changed.is_empty());
        assert_eq!(removed, [Removed::of(&later[1])]);
        // Changed elsewhere, its selection never moved (a status write): nothing for node-b.
        let (changed, removed) = changed_since(&later[1..], &labels_b, 6, never).unwrap();
        assert!(changed.is_empty() && removed.is_empty());
        // Not an etcd revision: no continuation.
        later[0].metadata.resource_version = Some("opaque".to_owned());
        assert!(changed_since(&later, &labels_a, 7, never).is_none());

        let d = deliver("node-a", &public_a, for_a[1], &master).unwrap();
        assert_eq!((d.name.as_str(), d.version), ("gpu-only", 2));
        assert_eq!(d.allowed_workloads, ["api"]);
        let json = serde_json::to_string(&d).unwrap();
        assert!(!json.contains("canary"), "{json}");
        let scope = DeliveryScope {
            node: "node-a",
            namespace: "team-a",
            name: "gpu-only",
            version: 2,
        };
        let opened = open_delivery(&node_a, &scope, &d.data).unwrap();
        assert_eq!(
            serde_json::to_value(&opened).unwrap()["password"],
            "canary-2"
        );
        // Not on node-b, nor as node-b.
        assert!(open_delivery(&node_b, &scope, &d.data).is_err());
        let as_b = DeliveryScope {
            node: "node-b",
            ..scope
        };
        assert!(open_delivery(&node_a, &as_b, &d.data).is_err());

        // An object sealed with a master key the keyring lacks cannot be delivered: said so,
        // no value in the reason.
        let other = Keyring::generate().unwrap();
        let why = deliver("node-a", &public_a, for_a[0], &other).unwrap_err();
        assert!(!why.contains("canary"), "{why}");
    }
}
