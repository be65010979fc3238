//! From custom resources to the domain and store types, checking every rule on the way:
//! an object the API server accepted is not trusted to be valid (older servers skip CEL, and
//! the schema cannot express every rule).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use kube::ResourceExt;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;

use super::crd::{ClawConfig, ClawSecret};
use super::names::object_name;
use crate::crypto::{self, Envelope, Keyring};
use crate::domain::{
    ConfigData, DataKey, Kind, Name, Namespace, ObjectKey, SecretData, SecretValue, Version,
    Workload, WorkloadSet,
};
use crate::store::{ConfigRecord, Origin, SecretRecord, WriteRecord};

/// Why an object cannot be used; `reason` is the CamelCase condition reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

fn invalid(reason: &'static str, message: impl Into<String>) -> Invalid {
    Invalid {
        reason,
        message: message.into(),
    }
}

/// The seed name and namespace of an object, checked against its object name so that no
/// object can stand in for another name.
fn key_of(
    kind: &str,
    spec_name: Option<&String>,
    object: &str,
    namespace: Option<String>,
) -> Result<ObjectKey, Invalid> {
    let namespace = namespace
        .ok_or_else(|| invalid("InvalidName", format!("{kind} {object} has no namespace")))?;
    let namespace =
        Namespace::parse(&namespace).map_err(|e| invalid("InvalidName", e.to_string()))?;
    let name = Name::parse(spec_name.map_or(object, String::as_str))
        .map_err(|e| invalid("InvalidName", e.to_string()))?;
    let expected = object_name(&name);
    if expected != object {
        return Err(invalid(
            "InvalidName",
            format!(
                "spec.name {:?} belongs in an object named {expected:?}, not {object:?}; rename the object or remove spec.name",
                name.as_str()
            ),
        ));
    }
    Ok(ObjectKey::new(namespace, name))
}

pub fn secret_key(obj: &ClawSecret) -> Result<ObjectKey, Invalid> {
    secret_key_of(obj.spec.name.as_ref(), &obj.name_any(), obj.namespace())
}

/// [`secret_key`] from the parts of an object not (yet) read as a [`ClawSecret`].
pub fn secret_key_of(
    spec_name: Option<&String>,
    object: &str,
    namespace: Option<String>,
) -> Result<ObjectKey, Invalid> {
    key_of("ClawSecret", spec_name, object, namespace)
}

pub fn config_key(obj: &ClawConfig) -> Result<ObjectKey, Invalid> {
    key_of(
        "ClawConfig",
        obj.spec.name.as_ref(),
        &obj.name_any(),
        obj.namespace(),
    )
}

/// Plaintext `spec.data` of a ClawSecret, parsed by the same rules as `secret.create`.
/// Messages name keys, never values.
pub fn secret_data(map: &BTreeMap<String, String>) -> Result<SecretData, Invalid> {
    let mut entries = BTreeMap::new();
    for (k, v) in map {
        let key = DataKey::parse(k).map_err(|e| invalid("InvalidData", e.to_string()))?;
        entries.insert(key, SecretValue::new(v.clone()));
    }
    SecretData::parse(entries).map_err(|e| invalid("InvalidData", e.to_string()))
}

pub fn config_data(map: &BTreeMap<String, String>) -> Result<ConfigData, Invalid> {
    let mut entries = BTreeMap::new();
    for (k, v) in map {
        let key = DataKey::parse(k).map_err(|e| invalid("InvalidData", e.to_string()))?;
        entries.insert(key, v.clone());
    }
    ConfigData::parse(entries).map_err(|e| invalid("InvalidData", e.to_string()))
}

pub fn workloads(list: &[String]) -> Result<WorkloadSet, Invalid> {
    let parsed = list
        .iter()
        .map(|w| Workload::parse(w))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid("InvalidWorkloads", e.to_string()))?;
    WorkloadSet::parse(parsed).map_err(|e| invalid("InvalidWorkloads", e.to_string()))
}

/// SHA-256 (hex) of a config's data in a canonical form (sorted keys, JSON).
pub fn data_hash(map: &BTreeMap<String, String>) -> String {
    let canonical = serde_json::to_vec(map).expect("a string map serializes");
    crate::hex::encode(&Sha256::digest(&canonical))
}

fn parse_time(s: &str, what: &str) -> Result<Timestamp, Invalid> {
    s.parse().map_err(|_| {
        invalid(
            "InvalidSealedData",
            format!("{what} {s:?} is not an RFC 3339 time"),
        )
    })
}

/// Which object, and which state of it, a record made from `meta` mirrors.
pub fn origin(meta: &kube::api::ObjectMeta) -> Option<Origin> {
    let uid = meta.uid.as_deref()?;
    Some(Origin::of(uid, meta.resource_version.as_deref()))
}

fn created_at(meta: &kube::api::ObjectMeta) -> Timestamp {
    meta.creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or_else(Timestamp::now)
}

/// The annotation that carries the writes made through node.invoke that an object remembers
/// (idempotency), sealed: they hold keyed digests of requests, which readers without `reveal`
/// must not see, and the envelope binds them to this object.
pub const WRITES_ANNOTATION: &str = "clawbernetes.io/writes";

/// The writes `meta`'s object remembers; none if it has no (readable) annotation. An annotation
/// that does not open (another keyring, moved from another object) is ignored: it vouches for
/// nothing.
pub fn remembered_writes(
    meta: &kube::api::ObjectMeta,
    kind: Kind,
    key: &ObjectKey,
    keyring: &Keyring,
) -> Vec<WriteRecord> {
    let Some(raw) = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(WRITES_ANNOTATION))
    else {
        return Vec::new();
    };
    let opened = B64
        .decode(raw.as_bytes())
        .map_err(|_| "not base64".to_owned())
        .and_then(|b| Envelope::from_bytes(&b).map_err(|e| e.to_string()))
        .and_then(|env| {
            crypto::open_write_records(keyring, kind, &key.namespace, &key.name, &env)
                .map_err(|e| e.to_string())
        })
        .and_then(|json| {
            serde_json::from_slice::<Vec<WriteRecord>>(&json)
                .map_err(|e| format!("not a list of writes (column {})", e.column()))
        });
    match opened {
        Ok(writes) => writes,
        Err(why) => {
            tracing::warn!(%key, kind = kind.as_str(), why, "the remembered writes of an object cannot be read; ignoring them");
            Vec::new()
        }
    }
}

/// The annotation value for `writes` of the object `key` (None when there are none).
pub fn writes_annotation(
    keyring: &Keyring,
    kind: Kind,
    key: &ObjectKey,
    writes: &[WriteRecord],
) -> Result<Option<String>, crypto::CryptoError> {
    if writes.is_empty() {
        return Ok(None);
    }
    let json = serde_json::to_vec(writes).expect("write records serialize");
    let envelope = crypto::seal_write_records(keyring, kind, &key.namespace, &key.name, &json)?;
    Ok(Some(B64.encode(envelope.to_bytes())))
}

/// The store record a node keeps for a sealed ClawSecret; `None` while it is not sealed yet.
/// `writes` are what the object remembers (see [`remembered_writes`]).
pub fn secret_record(
    obj: &ClawSecret,
    writes: Vec<WriteRecord>,
) -> Result<Option<SecretRecord>, Invalid> {
    let key = secret_key(obj)?;
    let Some(sealed) = &obj.spec.sealed else {
        return Ok(None);
    };
    let version = Version::new(sealed.version)
        .ok_or_else(|| invalid("InvalidSealedData", "sealed.version must be at least 1"))?;
    let bytes = B64
        .decode(sealed.envelope.as_bytes())
        .map_err(|_| invalid("InvalidSealedData", "sealed.envelope is not base64"))?;
    let envelope = Envelope::from_bytes(&bytes)
        .map_err(|e| invalid("InvalidSealedData", format!("sealed.envelope: {e}")))?;
    if envelope.key_id().as_str() != sealed.key_id {
        return Err(invalid(
            "InvalidSealedData",
            "sealed.keyId does not match the key id inside the envelope",
        ));
    }
    // status.version is the highest version the object has had (the operator only moves it
    // forward, the API server refuses it going back): anything sealed below it is a version
    // put back after it was rotated away, never served (also by an agent with no copy yet).
    let high_water = obj.status.as_ref().and_then(|s| s.version).unwrap_or(0);
    if version.get() < high_water {
        return Err(invalid(
            "VersionRegressed",
            format!(
                "spec.sealed is version {} but version {high_water} was already current; versions only move forward: write spec.data to seal a new version",
                version.get()
            ),
        ));
    }
    Ok(Some(SecretRecord {
        key,
        version,
        created_at: created_at(&obj.metadata),
        updated_at: parse_time(&sealed.seal_time, "sealed.sealTime")?,
        allowed_workloads: workloads(&obj.spec.allowed_workloads)?,
        envelope,
        origin: origin(&obj.metadata),
        writes,
        generation: 0,
    }))
}

/// The store record a node keeps for a ClawConfig.
pub fn config_record(obj: &ClawConfig, writes: Vec<WriteRecord>) -> Result<ConfigRecord, Invalid> {
    let key = config_key(obj)?;
    let created = created_at(&obj.metadata);
    let updated = obj
        .status
        .as_ref()
        .and_then(|s| s.accepted_time.as_deref())
        .map(|t| parse_time(t, "status.acceptedTime"))
        .transpose()?
        .unwrap_or(created);
    Ok(ConfigRecord {
        key,
        data: config_data(&obj.spec.data)?,
        immutable: obj.spec.immutable,
        created_at: created,
        updated_at: updated,
        origin: origin(&obj.metadata),
        writes,
        generation: 0,
    })
}

/// Whether a node with `labels` should hold an object with this `nodeSelector`.
pub fn selects(
    selector: Option<&BTreeMap<String, String>>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.is_none_or(|sel| sel.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::ClawSecretSpec;

    fn secret(object: &str, spec_name: Option<&str>) -> ClawSecret {
        let mut s = ClawSecret::new(
            object,
            ClawSecretSpec {
                name: spec_name.map(str::to_owned),
                data: None,
                encrypted_data: None,
                allowed_workloads: vec![],
                node_selector: None,
                sealed: None,
            },
        );
        s.metadata.namespace = Some("default".into());
        s
    }

    #[test]
    fn object_names_must_match_their_seed_names() {
        assert_eq!(
            secret_key(&secret("db.password", None))
                .unwrap()
                .name
                .as_str(),
            "db.password"
        );
        let hashed = object_name(&Name::parse("under_score").unwrap());
        assert_eq!(
            secret_key(&secret(&hashed, Some("under_score")))
                .unwrap()
                .name
                .as_str(),
            "under_score"
        );
        // An object may not claim another name than the one its object name stands for.
        let err = secret_key(&secret("db.password", Some("other"))).unwrap_err();
        assert_eq!(err.reason, "InvalidName");
        let err = secret_key(&secret(&hashed, Some("under_scorf"))).unwrap_err();
        assert_eq!(err.reason, "InvalidName");
    }

    #[test]
    fn invalid_data_names_the_key_not_the_value() {
        let map = BTreeMap::from([("bad key".to_owned(), "canary-value".to_owned())]);
        let err = secret_data(&map).unwrap_err();
        assert!(err.message.contains("bad key") && !err.message.contains("canary"));
        assert!(secret_data(&BTreeMap::new()).is_err());
    }

    #[test]
    fn node_selectors_match_all_labels() {
        let labels = BTreeMap::from([("gpu".to_owned(), "true".to_owned())]);
        assert!(selects(None, &labels));
        assert!(selects(
            Some(&BTreeMap::from([("gpu".into(), "true".into())])),
            &labels
        ));
        assert!(!selects(
            Some(&BTreeMap::from([("gpu".into(), "false".into())])),
            &labels
        ));
        assert!(!selects(
            Some(&BTreeMap::from([("zone".into(), "a".into())])),
            &labels
        ));
    }
}
