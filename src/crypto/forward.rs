//! Forwarded writes: the data of a node.invoke write that a node's agent passes on to the
//! operator (which alone holds the master keyring), sealed by the agent with HPKE to the
//! cluster's public sealing key (docs/crypto.md, "Per-node keys"). The suite and framing are
//! those of offline sealing ([`super::seal_offline`]); the AAD and HPKE `info` are a forwarded
//! write's own, and the AAD binds the node that forwarded it, the request id and the command.
//! So the data crosses the API server's service proxy (whose leg to the operator is TLS the API
//! server does not verify) without being readable there, and cannot be replayed into another
//! request or presented as another node's.

use super::offline_seal::{HpkeUse, open_with, seal_to};
use super::{CryptoError, Keyring, SealingPublicKey};
use crate::domain::SecretData;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

const FORWARDED: HpkeUse = HpkeUse {
    aad_label: b"claw-secrets/v1/forwarded-write\0",
    info: b"claw-secrets/v1/forwarded-write-info\0",
    not_base64: "the forwarded data is not base64 (standard alphabet, padded)",
    too_short: "the forwarded data is too short for its framing",
    bad_key_id: "the forwarded data names an invalid master key id",
};

/// What forwarded data is bound to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForwardScope<'a> {
    /// The Node whose agent forwarded the write.
    pub node: &'a str,
    /// The request id of the node.invoke call.
    pub request_id: &'a str,
    /// The command, e.g. `secret.create`.
    pub command: &'a str,
}

impl ForwardScope<'_> {
    fn fields(&self) -> [&[u8]; 3] {
        [
            self.node.as_bytes(),
            self.request_id.as_bytes(),
            self.command.as_bytes(),
        ]
    }
}

/// Seals a write's `data` for the operator (the cluster's public sealing key `cluster`), bound
/// to `scope`; standard, padded base64.
pub fn seal_forwarded(
    cluster: &SealingPublicKey,
    scope: &ForwardScope<'_>,
    data: &SecretData,
) -> Result<String, CryptoError> {
    seal_to(cluster, &FORWARDED, &scope.fields(), data).map(|bytes| B64.encode(bytes))
}

/// Opens forwarded data with the master keyring. [`CryptoError::UnknownKey`] if it was sealed
/// to a master key the keyring does not hold, [`CryptoError::AuthenticationFailed`] for
/// another scope or any changed byte.
pub fn open_forwarded(
    keyring: &Keyring,
    scope: &ForwardScope<'_>,
    text: &str,
) -> Result<SecretData, CryptoError> {
    open_with(keyring, &FORWARDED, &scope.fields(), text)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{
        DeliveryScope, SealScope, SealingPrivateKey, open_delivery, open_offline, seal_offline,
    };

    fn data() -> SecretData {
        serde_json::from_str(r#"{"password":"canary-5be1d2"}"#).unwrap()
    }

    const SCOPE: ForwardScope<'static> = ForwardScope {
        node: "node-a",
        request_id: "req-1",
        command: "secret.create",
    };

    #[test]
    fn forwarded_data_opens_with_the_master_keyring_as_what_it_was_sealed_for() {
        let master = Keyring::generate().unwrap();
        let public = SealingPrivateKey::derive(master.active()).public_key();
        let text = seal_forwarded(&public, &SCOPE, &data()).unwrap();
        assert!(!text.contains("canary"));
        assert_eq!(open_forwarded(&master, &SCOPE, &text).unwrap(), data());
        for other in [
            ForwardScope {
                node: "node-b",
                ..SCOPE
            },
            ForwardScope {
                request_id: "req-2",
                ..SCOPE
            },
            ForwardScope {
                command: "secret.rotate",
                ..SCOPE
            },
        ] {
            assert!(
                matches!(
                    open_forwarded(&master, &other, &text),
                    Err(CryptoError::AuthenticationFailed)
                ),
                "{other:?}"
            );
        }
        // Another cluster's keyring does not know the key.
        assert!(matches!(
            open_forwarded(&Keyring::generate().unwrap(), &SCOPE, &text),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn forwarded_data_is_not_an_offline_seal_or_a_delivery() {
        let master = Keyring::generate().unwrap();
        let public = SealingPrivateKey::derive(master.active()).public_key();
        let text = seal_forwarded(&public, &SCOPE, &data()).unwrap();
        let offline = SealScope {
            namespace: "node-a",
            name: "req-1",
        };
        assert!(open_offline(&master, &offline, &text).is_err());
        let delivery = DeliveryScope {
            node: "node-a",
            namespace: "req-1",
            name: "secret.create",
            version: 1,
        };
        assert!(open_delivery(&master, &delivery, &text).is_err());
        let sealed = seal_offline(&public, &offline, &data()).unwrap();
        assert!(open_forwarded(&master, &SCOPE, &sealed).is_err());
    }
}
