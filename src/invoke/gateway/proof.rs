//! The device proof of a gateway `connect`: an Ed25519 signature over the gateway's challenge,
//! bound to who is connecting and with which credential (protocol v4, signature form "v3").

use serde::Serialize;

use crate::crypto::DeviceKey;

/// What the signature covers besides the device: every field the gateway checks it against.
#[derive(Debug, Clone, Copy)]
pub struct ProofFields<'a> {
    /// `client.id` of the connect frame (a node host: `node-host`).
    pub client_id: &'a str,
    /// `client.mode` (`node`, `cli`, ...).
    pub client_mode: &'a str,
    pub role: &'a str,
    pub scopes: &'a [&'a str],
    /// The challenge's `ts` (the gateway refuses a proof more than 120 s from its clock).
    pub signed_at_ms: i64,
    /// The credential sent in `auth`: the gateway token, the device token or the bootstrap
    /// token, whichever the frame carries ("" for none).
    pub token: &'a str,
    /// The challenge's nonce.
    pub nonce: &'a str,
    pub platform: &'a str,
    pub device_family: &'a str,
}

/// The `device` object of a connect frame.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceProof {
    pub id: String,
    pub public_key: String,
    pub signature: String,
    pub signed_at: i64,
    pub nonce: String,
}

/// The string the gateway verifies:
/// `v3|device|client id|mode|role|scopes,…|signedAt|token|nonce|platform|family`, with the
/// platform and device family trimmed and ASCII-lowercased.
pub fn signature_payload(device_id: &str, f: &ProofFields<'_>) -> String {
    [
        "v3",
        device_id,
        f.client_id,
        f.client_mode,
        f.role,
        &f.scopes.join(","),
        &f.signed_at_ms.to_string(),
        f.token,
        f.nonce,
        &f.platform.trim().to_ascii_lowercase(),
        &f.device_family.trim().to_ascii_lowercase(),
    ]
    .join("|")
}

/// Signs `fields` with `key`: the connect frame's `device`.
pub fn prove(key: &DeviceKey, fields: &ProofFields<'_>) -> DeviceProof {
    let id = key.device_id();
    let signature = key.sign_base64url(signature_payload(&id, fields).as_bytes());
    DeviceProof {
        id,
        public_key: key.public_key_base64url(),
        signature,
        signed_at: fields.signed_at_ms,
        nonce: fields.nonce.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_has_the_gateways_field_order_and_lowercases_only_platform_and_family() {
        let fields = ProofFields {
            client_id: "node-host",
            client_mode: "node",
            role: "node",
            scopes: &[],
            signed_at_ms: 1_795_979_991_854,
            token: "Tok",
            nonce: "6f859c72",
            platform: " Linux ",
            device_family: "Linux",
        };
        assert_eq!(
            signature_payload("2f17a2", &fields),
            "v3|2f17a2|node-host|node|node||1795979991854|Tok|6f859c72|linux|linux"
        );
        let op = ProofFields {
            client_id: "cli",
            client_mode: "cli",
            role: "operator",
            scopes: &["operator.read", "operator.write"],
            device_family: "",
            ..fields
        };
        assert_eq!(
            signature_payload("ab", &op),
            "v3|ab|cli|cli|operator|operator.read,operator.write|1795979991854|Tok|6f859c72|linux|"
        );
    }

    #[test]
    fn the_proof_names_the_key_and_echoes_the_challenge() {
        let key = DeviceKey::from_seed(&[1u8; 32]);
        let fields = ProofFields {
            client_id: "node-host",
            client_mode: "node",
            role: "node",
            scopes: &[],
            signed_at_ms: 5,
            token: "",
            nonce: "n",
            platform: "linux",
            device_family: "Linux",
        };
        let proof = prove(&key, &fields);
        assert_eq!(proof.id, key.device_id());
        assert_eq!(proof.public_key, key.public_key_base64url());
        assert_eq!(proof.signed_at, 5);
        assert_eq!(proof.nonce, "n");
        assert_eq!(
            proof.signature,
            key.sign_base64url(signature_payload(&proof.id, &fields).as_bytes())
        );
    }
}
