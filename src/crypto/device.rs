//! A node's device identity on the OpenClaw gateway: an Ed25519 key pair. The gateway knows a
//! device by its public key; the device id (the node id callers name in `node.invoke`) is the
//! lowercase hex SHA-256 of the 32 raw public-key bytes, and every connection proves the key by
//! signing the gateway's challenge (docs/architecture.md, "node.invoke through the OpenClaw
//! gateway").

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use ed25519_dalek::{Signer, SigningKey};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::{CryptoError, random_bytes};

/// The private half is wiped when dropped (ed25519-dalek's `zeroize` feature), and never
/// printed: `Debug` shows only the device id.
pub struct DeviceKey {
    signing: SigningKey,
}

impl DeviceKey {
    /// A new key pair from the OS CSPRNG.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut seed = Zeroizing::new([0u8; 32]);
        random_bytes(seed.as_mut())?;
        Ok(Self::from_seed(&seed))
    }

    /// The key pair of a saved 32-byte seed (RFC 8032's private key).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        DeviceKey {
            signing: SigningKey::from_bytes(seed),
        }
    }

    /// The seed, to save (0600) and load again with [`DeviceKey::from_seed`].
    pub fn seed(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.signing.to_bytes())
    }

    /// The 32 raw bytes of the public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.signing.verifying_key().to_bytes()
    }

    /// The public key as the gateway reads it: unpadded base64url of the raw bytes.
    pub fn public_key_base64url(&self) -> String {
        B64URL.encode(self.public_key())
    }

    /// The device id: lowercase hex SHA-256 of the raw public key (64 characters).
    pub fn device_id(&self) -> String {
        crate::hex::encode(&Sha256::digest(self.public_key()))
    }

    /// An Ed25519 signature of `message`, unpadded base64url.
    pub fn sign_base64url(&self, message: &[u8]) -> String {
        B64URL.encode(self.signing.sign(message).to_bytes())
    }
}

impl std::fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceKey")
            .field("device_id", &self.device_id())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::{Signature, Verifier, VerifyingKey};

    #[test]
    fn rfc8032_test_vector_1_gives_its_public_key_and_signature() {
        // RFC 8032, section 7.1, TEST 1 (the empty message).
        let seed: [u8; 32] = crate::hex::decode_32(
            "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        )
        .unwrap();
        let key = DeviceKey::from_seed(&seed);
        assert_eq!(
            crate::hex::encode(&key.public_key()),
            "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let sig = B64URL.decode(key.sign_base64url(b"")).unwrap();
        assert_eq!(
            crate::hex::encode(&sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
    }

    #[test]
    fn the_device_id_is_the_sha256_of_the_raw_public_key_and_survives_a_reload() {
        let key = DeviceKey::generate().unwrap();
        let id = key.device_id();
        assert_eq!(id.len(), 64);
        assert_eq!(id, crate::hex::encode(&Sha256::digest(key.public_key())));
        let again = DeviceKey::from_seed(&key.seed());
        assert_eq!(again.device_id(), id);
        assert_eq!(
            B64URL.decode(key.public_key_base64url()).unwrap(),
            key.public_key()
        );
        assert_ne!(DeviceKey::generate().unwrap().device_id(), id);
    }

    #[test]
    fn signatures_verify_under_the_public_key_only_for_their_message() {
        let key = DeviceKey::generate().unwrap();
        let public = VerifyingKey::from_bytes(&key.public_key()).unwrap();
        let sig: [u8; 64] = B64URL
            .decode(key.sign_base64url(b"v3|a|b"))
            .unwrap()
            .try_into()
            .unwrap();
        let sig = Signature::from_bytes(&sig);
        assert!(public.verify(b"v3|a|b", &sig).is_ok());
        assert!(public.verify(b"v3|a|c", &sig).is_err());
    }

    #[test]
    fn debug_shows_the_device_id_and_no_key_bytes() {
        let key = DeviceKey::from_seed(&[7u8; 32]);
        let shown = format!("{key:?}");
        assert!(shown.contains(&key.device_id()));
        assert!(!shown.contains(&crate::hex::encode(&[7u8; 32])));
    }
}
