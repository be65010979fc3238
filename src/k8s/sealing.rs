//! What sealing applied data makes of a ClawSecret: the one decision both the admission webhook
//! (before the object is stored) and the reconcile loop (for objects that were stored with
//! plaintext anyway) take, so they can never disagree about versions or digests.
//!
//! - Data equal to the current version's (its keyed digest matches) is no new version: a
//!   manifest applied again, by a person or a GitOps controller, changes nothing.
//! - Otherwise the data is sealed as one more than the highest version the object has had
//!   (the version its `spec.sealed` carries, or its `status.version` high-water mark).

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;

use crate::crypto::{self, CryptoError, DataDigest, Keyring, SecretIdentity};
use crate::domain::{Kind, ObjectKey, SecretData, Version};
use crate::k8s::crd::SealedData;

/// What the object has before this data is applied.
#[derive(Debug, Clone, Copy)]
pub struct Current<'a> {
    /// `spec.sealed` as stored.
    pub sealed: Option<&'a SealedData>,
    /// `status.version`: the highest version the object has had.
    pub high_water: Option<u64>,
}

/// The outcome of applying data to a secret.
#[derive(Debug)]
pub enum Sealing {
    /// The data is the current version's: keep `spec.sealed` as it is.
    Unchanged,
    /// A new version: `created` when it is the first.
    New { sealed: SealedData, created: bool },
}

/// Seals `data` for `key` unless it is the data of the current version.
pub fn seal_applied(
    keyring: &Keyring,
    key: &ObjectKey,
    current: Current<'_>,
    data: &SecretData,
) -> Result<Sealing, CryptoError> {
    if unchanged(keyring, key, current, data) {
        return Ok(Sealing::Unchanged);
    }
    let version = next_version(current);
    let identity = SecretIdentity {
        kind: Kind::Secret,
        namespace: &key.namespace,
        name: &key.name,
        version,
    };
    let digest = DataDigest::of(keyring, &identity, data);
    let envelope = crypto::seal(keyring, &identity, data)?;
    Ok(Sealing::New {
        sealed: SealedData {
            version: version.get(),
            key_id: envelope.key_id().to_string(),
            envelope: B64.encode(envelope.to_bytes()),
            seal_time: Timestamp::now().to_string(),
            data_digest: Some(digest.to_string()),
        },
        created: version == Version::FIRST,
    })
}

/// The same version of a secret sealed under the keyring's active master key, when it is
/// sealed under another (a retired one): same version number, same data, same seal time (the
/// version's own `updatedAt`), a new envelope and digest. `Ok(None)` when it already is under
/// the active key. The data is opened and sealed again in memory, and wiped.
pub fn reseal(
    keyring: &Keyring,
    key: &ObjectKey,
    sealed: &SealedData,
) -> Result<Option<SealedData>, CryptoError> {
    if sealed.key_id == keyring.active().id().as_str() {
        return Ok(None);
    }
    let version = Version::new(sealed.version)
        .ok_or(CryptoError::MalformedEnvelope("version 0 is not a version"))?;
    let identity = SecretIdentity {
        kind: Kind::Secret,
        namespace: &key.namespace,
        name: &key.name,
        version,
    };
    let bytes = B64
        .decode(&sealed.envelope)
        .map_err(|_| CryptoError::MalformedEnvelope("spec.sealed.envelope is not base64"))?;
    let data = crypto::open(keyring, &identity, &crypto::Envelope::from_bytes(&bytes)?)?;
    let envelope = crypto::seal(keyring, &identity, &data)?;
    Ok(Some(SealedData {
        version: sealed.version,
        key_id: envelope.key_id().to_string(),
        envelope: B64.encode(envelope.to_bytes()),
        seal_time: sealed.seal_time.clone(),
        // Kept only where there was one (node.invoke's versions have none).
        data_digest: sealed
            .data_digest
            .as_ref()
            .map(|_| DataDigest::of(keyring, &identity, &data).to_string()),
    }))
}

/// Opens `spec.encryptedData` (the output of `claw-secrets seal`) of the object named `object`
/// (its metadata.name: what the file was sealed for) in `key`'s namespace. `Err` is the message
/// for the user, the same at admission and in the reconcile loop.
pub fn open_encrypted(
    keyring: &Keyring,
    key: &ObjectKey,
    object: &str,
    text: &str,
) -> Result<SecretData, String> {
    let scope = crypto::SealScope {
        namespace: key.namespace.as_str(),
        name: object,
    };
    crypto::open_offline(keyring, &scope, text).map_err(|e| {
        format!(
            "spec.encryptedData does not open as ClawSecret {}/{object} ({e}): claw-secrets seal binds it to one namespace, name and cluster; seal it again for this one (claw-secrets seal --fetch-key gets this cluster's key)",
            key.namespace
        )
    })
}

/// One more than any version the object has carried.
fn next_version(current: Current<'_>) -> Version {
    let highest = current
        .sealed
        .map(|s| s.version)
        .max(current.high_water)
        .unwrap_or(0);
    Version::new(highest.saturating_add(1)).expect("at least 1")
}

/// Whether `data` is the data the object's current version was sealed from. A `spec.sealed`
/// below the high-water mark is never current (the API server refuses it; this does not rely
/// on that).
fn unchanged(keyring: &Keyring, key: &ObjectKey, current: Current<'_>, data: &SecretData) -> bool {
    let Some(sealed) = current.sealed else {
        return false;
    };
    let (Some(version), Some(digest)) = (
        Version::new(sealed.version).filter(|v| v.get() >= current.high_water.unwrap_or(0)),
        sealed
            .data_digest
            .as_deref()
            .and_then(|d| DataDigest::parse(d).ok()),
    ) else {
        return false;
    };
    let identity = SecretIdentity {
        kind: Kind::Secret,
        namespace: &key.namespace,
        name: &key.name,
        version,
    };
    digest.matches(keyring, &identity, data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DataKey, Name, Namespace, SecretValue};
    use std::collections::BTreeMap;

    fn key() -> ObjectKey {
        ObjectKey {
            namespace: Namespace::parse("team").unwrap(),
            name: Name::parse("db").unwrap(),
        }
    }

    fn data(value: &str) -> SecretData {
        let mut m = BTreeMap::new();
        m.insert(
            DataKey::parse("password").unwrap(),
            SecretValue::new(value.into()),
        );
        SecretData::parse(m).unwrap()
    }

    fn new(s: Sealing) -> (SealedData, bool) {
        match s {
            Sealing::New { sealed, created } => (sealed, created),
            Sealing::Unchanged => panic!("expected a new version"),
        }
    }

    #[test]
    fn same_data_is_unchanged_and_new_data_moves_past_the_high_water_mark() {
        let keyring = Keyring::generate().unwrap();
        let none = Current {
            sealed: None,
            high_water: None,
        };
        let (v1, created) = new(seal_applied(&keyring, &key(), none, &data("a")).unwrap());
        assert_eq!((v1.version, created), (1, true));
        let at_v1 = Current {
            sealed: Some(&v1),
            high_water: Some(1),
        };
        assert!(matches!(
            seal_applied(&keyring, &key(), at_v1, &data("a")).unwrap(),
            Sealing::Unchanged
        ));
        let (v2, created) = new(seal_applied(&keyring, &key(), at_v1, &data("b")).unwrap());
        assert_eq!((v2.version, created), (2, false));
        // A status that has seen version 5 (a reinstated v1 in spec): data equal to v1's is
        // not current, and the next version is 6.
        let behind = Current {
            sealed: Some(&v1),
            high_water: Some(5),
        };
        let (v6, _) = new(seal_applied(&keyring, &key(), behind, &data("a")).unwrap());
        assert_eq!(v6.version, 6);
        // No digest (a version written through node.invoke): the data counts as new.
        let mut undigested = v1.clone();
        undigested.data_digest = None;
        let at_undigested = Current {
            sealed: Some(&undigested),
            high_water: Some(1),
        };
        let (v2, _) = new(seal_applied(&keyring, &key(), at_undigested, &data("a")).unwrap());
        assert_eq!(v2.version, 2);
    }

    #[test]
    fn a_digest_made_under_another_master_key_counts_as_new_data() {
        let (a, b) = (Keyring::generate().unwrap(), Keyring::generate().unwrap());
        let none = Current {
            sealed: None,
            high_water: None,
        };
        let (v1, _) = new(seal_applied(&a, &key(), none, &data("a")).unwrap());
        let at_v1 = Current {
            sealed: Some(&v1),
            high_water: Some(1),
        };
        let (v2, _) = new(seal_applied(&b, &key(), at_v1, &data("a")).unwrap());
        assert_eq!(v2.version, 2);
    }
}

#[cfg(test)]
mod reseal_tests {
    use super::*;
    use crate::crypto::MasterKey;
    use crate::domain::{DataKey, Name, Namespace, SecretValue};

    #[test]
    fn a_version_sealed_under_a_retired_key_is_resealed_as_the_same_version() {
        let key = ObjectKey {
            namespace: Namespace::parse("team").unwrap(),
            name: Name::parse("db").unwrap(),
        };
        let mut ring = Keyring::generate().unwrap();
        let data = SecretData::parse(
            [(
                DataKey::parse("password").unwrap(),
                SecretValue::new("s3cret".into()),
            )]
            .into(),
        )
        .unwrap();
        let current = Current {
            sealed: None,
            high_water: Some(4),
        };
        let Sealing::New { sealed: old, .. } = seal_applied(&ring, &key, current, &data).unwrap()
        else {
            panic!("new data is a new version")
        };
        assert_eq!(old.version, 5);
        // Under the active key: nothing to do.
        assert!(reseal(&ring, &key, &old).unwrap().is_none());

        ring.rotate_to(MasterKey::generate().unwrap());
        let new = reseal(&ring, &key, &old).unwrap().expect("resealed");
        assert_eq!(new.version, old.version);
        assert_eq!(new.seal_time, old.seal_time);
        assert_eq!(new.key_id, ring.active().id().as_str());
        assert_ne!(new.envelope, old.envelope);
        // The same data, recognised by the new digest as the current version's.
        let after = Current {
            sealed: Some(&new),
            high_water: Some(5),
        };
        assert!(matches!(
            seal_applied(&ring, &key, after, &data).unwrap(),
            Sealing::Unchanged
        ));
        // Bound to its object: another name does not open it.
        let other = ObjectKey {
            name: Name::parse("other").unwrap(),
            ..key.clone()
        };
        let mut moved = new.clone();
        moved.key_id = "k-elsewhere".to_owned();
        assert!(reseal(&ring, &other, &moved).is_err());
    }
}
