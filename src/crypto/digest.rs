//! The keyed digest of the data a secret version was sealed from: how the operator tells a
//! manifest applied again with the same data (nothing to do) from new data (a new version)
//! without keeping the plaintext or opening the envelope.
//!
//! HMAC-SHA256 under a key derived from one master key ([`Purpose::DataDigest`]), over the
//! secret's identity (kind, namespace, name, version) and every key and value. Binding the
//! version means a digest left beside a later version (written by something that does not know
//! digests) never matches: the data counts as changed, never wrongly as unchanged. Without the
//! master key a digest says nothing about the data, not even whether two secrets hold the same
//! value (the name is bound in).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;

use super::{CryptoError, KeyId, Keyring, MacKey, Purpose, SecretIdentity};
use crate::domain::SecretData;

/// The text form: `hmac-sha256:<master key id>:<base64url tag>`.
const SCHEME: &str = "hmac-sha256";

/// A data digest as stored beside a sealed version (`spec.sealed.dataDigest`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDigest {
    key_id: KeyId,
    tag: [u8; super::MAC_TAG_LEN],
}

impl DataDigest {
    /// The digest of `data` sealed as `identity`, under the keyring's active master key.
    pub fn of(keyring: &Keyring, identity: &SecretIdentity<'_>, data: &SecretData) -> DataDigest {
        let key = MacKey::active(keyring, Purpose::DataDigest);
        DataDigest {
            key_id: key.key_id().clone(),
            tag: tagged(&key, identity, data).finish(),
        }
    }

    /// Whether `data` sealed as `identity` is the data this digest was made of. False when the
    /// master key that made it is no longer in the keyring (the data then counts as new).
    pub fn matches(
        &self,
        keyring: &Keyring,
        identity: &SecretIdentity<'_>,
        data: &SecretData,
    ) -> bool {
        match MacKey::for_key(keyring, &self.key_id, Purpose::DataDigest) {
            Ok(key) => tagged(&key, identity, data).verify(&self.tag),
            Err(_) => false,
        }
    }

    /// Reads the text form. Anything else is an error: a digest that cannot be read counts as
    /// no digest.
    pub fn parse(text: &str) -> Result<DataDigest, CryptoError> {
        let malformed = || CryptoError::MalformedEnvelope("data digest");
        let mut parts = text.split(':');
        let (Some(SCHEME), Some(key_id), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(malformed());
        };
        let key_id = KeyId::parse(key_id)?;
        let tag = B64
            .decode(tag)
            .ok()
            .and_then(|t| <[u8; super::MAC_TAG_LEN]>::try_from(t).ok())
            .ok_or_else(malformed)?;
        Ok(DataDigest { key_id, tag })
    }
}

impl std::fmt::Display for DataDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{SCHEME}:{}:{}", self.key_id, B64.encode(self.tag))
    }
}

fn tagged(key: &MacKey, identity: &SecretIdentity<'_>, data: &SecretData) -> super::Tagger {
    let mut t = key.tagger();
    t.part(b"claw-secrets/v1/data-digest")
        .part(identity.kind.as_str().as_bytes())
        .part(identity.namespace.as_str().as_bytes())
        .part(identity.name.as_str().as_bytes())
        .part(&identity.version.get().to_be_bytes())
        .part(&(data.len() as u64).to_be_bytes());
    for (k, v) in data.iter() {
        t.part(k.as_str().as_bytes()).part(v.expose().as_bytes());
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{DataKey, Kind, Name, Namespace, SecretValue, Version};
    use std::collections::BTreeMap;

    fn data(pairs: &[(&str, &str)]) -> SecretData {
        SecretData::parse(
            pairs
                .iter()
                .map(|(k, v)| {
                    (
                        DataKey::parse(k).unwrap(),
                        SecretValue::new((*v).to_owned()),
                    )
                })
                .collect::<BTreeMap<_, _>>(),
        )
        .unwrap()
    }

    #[test]
    fn the_same_data_matches_and_anything_else_does_not() {
        let keyring = Keyring::generate().unwrap();
        let (ns, name, other) = (
            Namespace::parse("prod").unwrap(),
            Name::parse("db").unwrap(),
            Name::parse("db2").unwrap(),
        );
        let id = |name, version| SecretIdentity {
            kind: Kind::Secret,
            namespace: &ns,
            name,
            version: Version::new(version).unwrap(),
        };
        let d = DataDigest::of(&keyring, &id(&name, 1), &data(&[("password", "hunter2")]));
        let text = d.to_string();
        assert!(text.starts_with("hmac-sha256:"), "{text}");
        assert!(!text.contains("hunter2"));
        let d = DataDigest::parse(&text).unwrap();
        assert!(d.matches(&keyring, &id(&name, 1), &data(&[("password", "hunter2")])));
        // Another value, another key, an extra key, another name, another version.
        assert!(!d.matches(&keyring, &id(&name, 1), &data(&[("password", "hunter3")])));
        assert!(!d.matches(&keyring, &id(&name, 1), &data(&[("pass", "hunter2")])));
        assert!(!d.matches(
            &keyring,
            &id(&name, 1),
            &data(&[("password", "hunter2"), ("user", "x")])
        ));
        assert!(!d.matches(&keyring, &id(&other, 1), &data(&[("password", "hunter2")])));
        assert!(!d.matches(&keyring, &id(&name, 2), &data(&[("password", "hunter2")])));
        // Another keyring: no match (the key that made it is unknown there).
        let stranger = Keyring::generate().unwrap();
        assert!(!d.matches(&stranger, &id(&name, 1), &data(&[("password", "hunter2")])));
    }

    #[test]
    fn malformed_text_is_refused() {
        for bad in [
            "",
            "hmac-sha256",
            "hmac-sha256:k-1:",
            "sha256:k-1:AAAA",
            "hmac-sha256:k-1:AAAA:extra",
            "hmac-sha256:k-1:!!!",
        ] {
            assert!(DataDigest::parse(bad).is_err(), "{bad:?}");
        }
    }
}
