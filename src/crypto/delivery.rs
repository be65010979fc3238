//! Deliveries: a secret's data sealed by the operator for one node, with HPKE to the node's
//! public key (docs/crypto.md, "Per-node keys"). The suite and framing are those of offline
//! sealing ([`super::seal_offline`]); the AAD and HPKE `info` are a delivery's own, and the AAD
//! binds the node, the ClawSecret's namespace and object name, and the version, besides the
//! node key id in the header. So a delivery opens only on the node it was sealed for, as the
//! secret and version it was sealed as: moved to another node, renamed, or replayed as another
//! version, it fails to open.

use super::offline_seal::{HpkeUse, open_with, seal_to};
use super::{CryptoError, Keyring, SealingPublicKey};
use crate::domain::SecretData;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

const DELIVERY: HpkeUse = HpkeUse {
    aad_label: b"claw-secrets/v1/delivery\0",
    info: b"claw-secrets/v1/delivery-info\0",
    not_base64: "the delivery is not base64 (standard alphabet, padded)",
    too_short: "the delivery is too short for its framing",
    bad_key_id: "the delivery names an invalid node key id",
};

/// What a delivery is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeliveryScope<'a> {
    /// The Node's name.
    pub node: &'a str,
    pub namespace: &'a str,
    /// The ClawSecret's object name.
    pub name: &'a str,
    pub version: u64,
}

impl DeliveryScope<'_> {
    fn sealed<R>(&self, f: impl FnOnce(&[&[u8]]) -> R) -> R {
        let version = self.version.to_be_bytes();
        f(&[
            self.node.as_bytes(),
            self.namespace.as_bytes(),
            self.name.as_bytes(),
            &version,
        ])
    }
}

/// Seals `data` for the node whose public key is `node_key`, bound to `scope`; standard, padded
/// base64 of `format || len(key id) || node key id || enc || ciphertext || tag`.
pub fn seal_delivery(
    node_key: &SealingPublicKey,
    scope: &DeliveryScope<'_>,
    data: &SecretData,
) -> Result<String, CryptoError> {
    scope
        .sealed(|fields| seal_to(node_key, &DELIVERY, fields, data))
        .map(|bytes| B64.encode(bytes))
}

/// Opens a delivery with the node's own key (`node_key`, the keyring in its data dir).
/// [`CryptoError::UnknownKey`] if it was sealed to another key of the node (a replaced node),
/// [`CryptoError::AuthenticationFailed`] for another scope or any changed byte.
pub fn open_delivery(
    node_key: &Keyring,
    scope: &DeliveryScope<'_>,
    text: &str,
) -> Result<SecretData, CryptoError> {
    scope.sealed(|fields| open_with(node_key, &DELIVERY, fields, text))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{SealScope, SealingPrivateKey, open_offline, seal_offline};

    fn data() -> SecretData {
        serde_json::from_str(r#"{"password":"canary-7f3a9c"}"#).unwrap()
    }

    const SCOPE: DeliveryScope<'static> = DeliveryScope {
        node: "node-a",
        namespace: "team-a",
        name: "db",
        version: 3,
    };

    fn node() -> (Keyring, SealingPublicKey) {
        let ring = Keyring::generate().unwrap();
        let public = SealingPrivateKey::derive(ring.active()).public_key();
        (ring, public)
    }

    #[test]
    fn a_delivery_opens_on_its_node_as_what_it_was_sealed_for_and_nowhere_else() {
        let (ring_a, public_a) = node();
        let (ring_b, _) = node();
        let text = seal_delivery(&public_a, &SCOPE, &data()).unwrap();
        assert!(!text.contains("canary"));
        assert_eq!(open_delivery(&ring_a, &SCOPE, &text).unwrap(), data());

        // Another node's key: not even the key id is known there.
        assert!(matches!(
            open_delivery(&ring_b, &SCOPE, &text),
            Err(CryptoError::UnknownKey(_))
        ));
        // Presented as another node, secret, namespace or version.
        for other in [
            DeliveryScope {
                node: "node-b",
                ..SCOPE
            },
            DeliveryScope {
                namespace: "team-b",
                ..SCOPE
            },
            DeliveryScope {
                name: "db2",
                ..SCOPE
            },
            DeliveryScope {
                version: 2,
                ..SCOPE
            },
        ] {
            assert!(
                matches!(
                    open_delivery(&ring_a, &other, &text),
                    Err(CryptoError::AuthenticationFailed)
                ),
                "{other:?}"
            );
        }
        // Any changed byte.
        let mut bytes = B64.decode(&text).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        assert!(matches!(
            open_delivery(&ring_a, &SCOPE, &B64.encode(bytes)),
            Err(CryptoError::AuthenticationFailed)
        ));
    }

    #[test]
    fn deliveries_and_offline_seals_are_not_interchangeable() {
        let (ring, public) = node();
        let offline = seal_offline(
            &public,
            &SealScope {
                namespace: "team-a",
                name: "db",
            },
            &data(),
        )
        .unwrap();
        assert!(open_delivery(&ring, &SCOPE, &offline).is_err());
        let delivery = seal_delivery(&public, &SCOPE, &data()).unwrap();
        let scope = SealScope {
            namespace: "team-a",
            name: "db",
        };
        assert!(open_offline(&ring, &scope, &delivery).is_err());
    }
}
