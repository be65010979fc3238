//! The sealed envelope's byte layout (format 1):
//!
//! ```text
//! offset  size  field
//! 0       4     magic "CLSE"
//! 4       1     format version (1)
//! 5       1     algorithm (1 = HKDF-SHA256 key derivation + ChaCha20-Poly1305)
//! 6       1     key id length n (1..=64)
//! 7       n     key id (ASCII)
//! 7+n     32    HKDF salt
//! 39+n    12    nonce
//! 51+n    ..    ciphertext, then the 16-byte Poly1305 tag
//! ```
//!
//! Everything before the ciphertext (the header) is authenticated as part of the AAD, so the
//! format, algorithm, key id, salt and nonce cannot be changed without the open failing.

use super::{CryptoError, KeyId};

pub const MAGIC: &[u8; 4] = b"CLSE";
pub const FORMAT_V1: u8 = 1;
pub const ALGORITHM_HKDF_SHA256_CHACHA20POLY1305: u8 = 1;
pub const SALT_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// A sealed secret: header fields plus ciphertext. Holds no plaintext, so it is safe to store,
/// log the length of, and send to other nodes.
#[derive(Clone, PartialEq, Eq)]
pub struct Envelope {
    pub(crate) key_id: KeyId,
    pub(crate) salt: [u8; SALT_LEN],
    pub(crate) nonce: [u8; NONCE_LEN],
    /// Ciphertext followed by the tag.
    pub(crate) ciphertext: Vec<u8>,
}

impl Envelope {
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    /// The header bytes (everything before the ciphertext): also the start of the AAD.
    pub(crate) fn header(&self) -> Vec<u8> {
        let id = self.key_id.as_str().as_bytes();
        let mut out = Vec::with_capacity(7 + id.len() + SALT_LEN + NONCE_LEN);
        out.extend_from_slice(MAGIC);
        out.push(FORMAT_V1);
        out.push(ALGORITHM_HKDF_SHA256_CHACHA20POLY1305);
        out.push(id.len() as u8);
        out.extend_from_slice(id);
        out.extend_from_slice(&self.salt);
        out.extend_from_slice(&self.nonce);
        out
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = self.header();
        out.extend_from_slice(&self.ciphertext);
        out
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, CryptoError> {
        let rest = bytes
            .strip_prefix(MAGIC.as_slice())
            .ok_or(CryptoError::MalformedEnvelope("missing magic bytes"))?;
        let (&format, rest) = rest
            .split_first()
            .ok_or(CryptoError::MalformedEnvelope("truncated header"))?;
        if format != FORMAT_V1 {
            return Err(CryptoError::UnsupportedFormat(format));
        }
        let (&alg, rest) = rest
            .split_first()
            .ok_or(CryptoError::MalformedEnvelope("truncated header"))?;
        if alg != ALGORITHM_HKDF_SHA256_CHACHA20POLY1305 {
            return Err(CryptoError::UnsupportedAlgorithm(alg));
        }
        let (&id_len, rest) = rest
            .split_first()
            .ok_or(CryptoError::MalformedEnvelope("truncated header"))?;
        let id_len = id_len as usize;
        if rest.len() < id_len + SALT_LEN + NONCE_LEN + TAG_LEN {
            return Err(CryptoError::MalformedEnvelope(
                "shorter than its header and tag",
            ));
        }
        let (id, rest) = rest.split_at(id_len);
        let id = std::str::from_utf8(id)
            .map_err(|_| CryptoError::MalformedEnvelope("key id is not ASCII"))?;
        let key_id =
            KeyId::parse(id).map_err(|_| CryptoError::MalformedEnvelope("key id is invalid"))?;
        let (salt, rest) = rest.split_at(SALT_LEN);
        let (nonce, ciphertext) = rest.split_at(NONCE_LEN);
        Ok(Envelope {
            key_id,
            salt: salt.try_into().expect("length checked"),
            nonce: nonce.try_into().expect("length checked"),
            ciphertext: ciphertext.to_vec(),
        })
    }
}

impl std::fmt::Debug for Envelope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Envelope")
            .field("key_id", &self.key_id)
            .field("ciphertext_len", &self.ciphertext.len())
            .finish()
    }
}
