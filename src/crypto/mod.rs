//! Sealing secret data at rest. The design is written down in `docs/crypto.md`:
//!
//! - every write derives a fresh key: HKDF-SHA256(master key, random salt, identity);
//! - ChaCha20-Poly1305 encrypts, with the envelope header and the secret's identity as AAD,
//!   so a blob opened under another name, namespace, kind, version or key fails;
//! - the envelope is versioned, and a keyring keeps retired master keys able to decrypt;
//! - what is kept in clear (store metadata, the store manifest, write fingerprints) is
//!   authenticated with HMAC-SHA256 under keys derived from the keyring ([`MacKey`]);
//! - offline sealing (`claw-secrets seal`): HPKE to an X25519 key derived from a master key,
//!   bound to the ClawSecret's namespace and name ([`seal_offline`], [`open_offline`]);
//! - deliveries: the same HPKE suite to a node's own key, bound to the node, the secret and its
//!   version ([`seal_delivery`], [`open_delivery`]);
//! - forwarded writes: the same HPKE suite to the cluster's key, bound to the forwarding node,
//!   the request id and the command ([`seal_forwarded`], [`open_forwarded`]);
//! - a node's device identity on the OpenClaw gateway: an Ed25519 key ([`DeviceKey`]).

mod aead;
mod delivery;
mod device;
mod digest;
mod envelope;
mod forward;
mod integrity;
mod keyring;
mod offline_seal;
mod seal;

pub use delivery::{DeliveryScope, open_delivery, seal_delivery};
pub use device::DeviceKey;
pub use digest::DataDigest;
pub use envelope::{ALGORITHM_HKDF_SHA256_CHACHA20POLY1305, Envelope, FORMAT_V1};
pub use forward::{ForwardScope, open_forwarded, seal_forwarded};
pub use integrity::{MacKey, Purpose, StreamedPart, TAG_LEN as MAC_TAG_LEN, Tagger};
pub use keyring::{KeyId, Keyring, MasterKey, SharedKeyring};
pub use offline_seal::{
    SealScope, SealingPrivateKey, SealingPublicKey, open_offline, seal_offline,
};
pub use seal::{SecretIdentity, open, open_write_records, seal, seal_write_records};

/// Why sealing or opening failed. Messages never contain plaintext or key bytes.
#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("envelope is malformed: {0}")]
    MalformedEnvelope(&'static str),
    #[error("envelope format {0} is not supported by this build (it reads format 1)")]
    UnsupportedFormat(u8),
    #[error("envelope algorithm {0} is not supported by this build")]
    UnsupportedAlgorithm(u8),
    #[error("master key {0:?} is not in the keyring; restore the keyring that sealed this secret")]
    UnknownKey(String),
    #[error(
        "authentication failed: the blob was tampered with, sealed under another key, or belongs to another secret or version"
    )]
    AuthenticationFailed,
    #[error("keyring is invalid: {0}")]
    InvalidKeyring(String),
    #[error("sealing key is invalid: {0}")]
    InvalidSealingKey(String),
    #[error("the operating system's random number generator failed: {0}")]
    Random(String),
}

/// Fills `buf` from the OS CSPRNG. For keys and anything else that stays secret.
pub(crate) fn random_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    getrandom::getrandom(buf).map_err(|e| CryptoError::Random(e.to_string()))
}

/// Fills `buf` with OS CSPRNG bytes that will be public: an envelope's salt and nonce, stored
/// in clear beside the ciphertext, or a request id. They come from a per-thread pool refilled
/// from the OS 4 KiB at a time, because a `getrandom` system call per seal was a fifth of
/// sealing a 1 KiB secret (BENCHMARKS.md, "Seal and open"). Each byte is handed out once. What
/// they need is to be unpredictable and never repeat, which the pool keeps as long as no process
/// forks without exec (this one never does: it spawns nothing but whole programs). Never use it
/// for key material: the pool is not wiped.
pub(crate) fn random_public_bytes(buf: &mut [u8]) -> Result<(), CryptoError> {
    const POOL: usize = 4096;
    struct Pool {
        bytes: [u8; POOL],
        next: usize,
    }
    thread_local! {
        static PUBLIC_RANDOM: std::cell::RefCell<Pool> =
            const { std::cell::RefCell::new(Pool { bytes: [0; POOL], next: POOL }) };
    }
    if buf.len() > POOL / 4 {
        return random_bytes(buf);
    }
    PUBLIC_RANDOM.with_borrow_mut(|pool| {
        if POOL - pool.next < buf.len() {
            random_bytes(&mut pool.bytes)?;
            pool.next = 0;
        }
        let end = pool.next + buf.len();
        buf.copy_from_slice(&pool.bytes[pool.next..end]);
        // Zeroed once handed out, so no byte can be handed out twice even by a bug here.
        pool.bytes[pool.next..end].fill(0);
        pool.next = end;
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_random_bytes_never_repeat_across_refills() {
        let mut seen = std::collections::HashSet::new();
        // 28 bytes per seal: about 150 per pool, so this crosses many refills.
        for _ in 0..2000 {
            let mut b = [0u8; 28];
            random_public_bytes(&mut b).unwrap();
            assert!(seen.insert(b), "salt and nonce repeated");
        }
        let mut big = [0u8; 2048];
        random_public_bytes(&mut big).unwrap();
        assert!(big.iter().any(|&b| b != 0));
    }
}
