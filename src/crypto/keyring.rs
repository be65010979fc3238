//! Master keys and the keyring: one active key that seals, retired keys that can still open.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, RwLock};
use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

use super::{CryptoError, random_bytes};

/// Names a master key inside envelopes, so a retired key can be found again. Not secret.
/// Shared: every envelope sealed under a key holds a copy of its id, and a copy then costs a
/// reference count, not an allocation.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct KeyId(std::sync::Arc<str>);

impl KeyId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(s: &str) -> Result<Self, CryptoError> {
        let ok = !s.is_empty()
            && s.len() <= Self::MAX_LEN
            && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return Err(CryptoError::InvalidKeyring(format!(
                "key id {s:?} must be 1-64 characters of letters, digits and '-'"
            )));
        }
        Ok(KeyId(s.into()))
    }

    /// A fresh id: `k-` and 16 random hex digits.
    pub fn generate() -> Result<Self, CryptoError> {
        let mut b = [0u8; 8];
        random_bytes(&mut b)?;
        let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
        Ok(KeyId(format!("k-{hex}").into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for KeyId {
    type Error = CryptoError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        KeyId::parse(&s)
    }
}

impl From<KeyId> for String {
    fn from(k: KeyId) -> String {
        k.0.as_ref().to_owned()
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// 32 random bytes and their id. Zeroized on drop; `Debug` shows the id only.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct MasterKey {
    #[zeroize(skip)]
    id: KeyId,
    bytes: [u8; 32],
}

impl MasterKey {
    pub fn generate() -> Result<Self, CryptoError> {
        let mut bytes = [0u8; 32];
        random_bytes(&mut bytes)?;
        Ok(MasterKey {
            id: KeyId::generate()?,
            bytes,
        })
    }

    pub fn from_bytes(id: KeyId, bytes: [u8; 32]) -> Self {
        MasterKey { id, bytes }
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.bytes
    }
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id)
            .field("bytes", &"[redacted]")
            .finish()
    }
}

/// The active key seals every new write; every key in the ring can open what it sealed.
#[derive(Clone, Debug)]
pub struct Keyring {
    active: KeyId,
    keys: BTreeMap<KeyId, MasterKey>,
}

/// The keyring as stored (dev mode: a 0600 file; Kubernetes: a Secret's data).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KeyringFile {
    active: KeyId,
    keys: Vec<KeyFileEntry>,
}

#[derive(Serialize, Deserialize, Zeroize, ZeroizeOnDrop)]
#[serde(deny_unknown_fields)]
struct KeyFileEntry {
    #[zeroize(skip)]
    id: KeyId,
    /// Base64 of the 32 key bytes.
    key: String,
}

impl Keyring {
    /// A keyring with one freshly generated key.
    pub fn generate() -> Result<Self, CryptoError> {
        Ok(Keyring::with_active(MasterKey::generate()?))
    }

    pub fn with_active(key: MasterKey) -> Self {
        let active = key.id().clone();
        Keyring {
            active: active.clone(),
            keys: BTreeMap::from([(active, key)]),
        }
    }

    pub fn active(&self) -> &MasterKey {
        &self.keys[&self.active]
    }

    pub fn get(&self, id: &KeyId) -> Option<&MasterKey> {
        self.keys.get(id)
    }

    pub fn key_ids(&self) -> impl Iterator<Item = &KeyId> {
        self.keys.keys()
    }

    /// Makes `key` the active key; the previous one is retired (opens, never seals).
    pub fn rotate_to(&mut self, key: MasterKey) {
        self.active = key.id().clone();
        self.keys.insert(key.id().clone(), key);
    }

    /// Removes the retired key `id` (its bytes are wiped on drop); `false` for the active key
    /// or a key the keyring does not hold.
    pub fn remove_retired(&mut self, id: &KeyId) -> bool {
        *id != self.active && self.keys.remove(id).is_some()
    }

    /// Whether `other` holds exactly the same keys (ids and bytes) and the same active key.
    /// Compares in place: nothing is serialized, so no copy of a key is left behind.
    pub fn same_as(&self, other: &Keyring) -> bool {
        self.active == other.active
            && self.keys.len() == other.keys.len()
            && self
                .keys
                .iter()
                .zip(other.keys.iter())
                .all(|((a_id, a), (b_id, b))| a_id == b_id && a.bytes == b.bytes)
    }

    /// Serializes the keyring, key bytes included, into a zeroizing buffer.
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let file = KeyringFile {
            active: self.active.clone(),
            keys: self
                .keys
                .values()
                .map(|k| KeyFileEntry {
                    id: k.id.clone(),
                    key: B64.encode(k.bytes),
                })
                .collect(),
        };
        // Written into a buffer sized for the whole document up front, so it never grows: a
        // grown buffer leaves its old, unwiped copy (with the keys) in freed memory.
        let size = 128 + file.keys.len() * (136 + KeyId::MAX_LEN);
        let mut out = Zeroizing::new(Vec::with_capacity(size));
        serde_json::to_writer_pretty(&mut *out, &file).expect("keyring serializes");
        debug_assert!(out.len() <= size, "the keyring outgrew its buffer");
        out
    }

    pub fn from_json(json: &[u8]) -> Result<Self, CryptoError> {
        // Error texts from serde could quote a value; keep only the position.
        let file: KeyringFile = serde_json::from_slice(json).map_err(|e| {
            CryptoError::InvalidKeyring(format!(
                "not a keyring document (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let mut keys = BTreeMap::new();
        for entry in &file.keys {
            // Decoded into a fixed buffer on the stack, wiped after: no heap copy of a key,
            // and none left behind by a decode that fails half-way.
            let mut decoded = Zeroizing::new([0u8; 48]);
            let len = B64
                .decode_slice(entry.key.as_bytes(), decoded.as_mut())
                .map_err(|_| {
                    CryptoError::InvalidKeyring(format!(
                        "key {} is not base64 of 32 bytes",
                        entry.id
                    ))
                })?;
            let bytes: [u8; 32] = decoded[..len].try_into().map_err(|_| {
                CryptoError::InvalidKeyring(format!("key {} is not 32 bytes", entry.id))
            })?;
            let key = MasterKey::from_bytes(entry.id.clone(), bytes);
            if keys.insert(entry.id.clone(), key).is_some() {
                return Err(CryptoError::InvalidKeyring(format!(
                    "key {} appears twice",
                    entry.id
                )));
            }
        }
        if !keys.contains_key(&file.active) {
            return Err(CryptoError::InvalidKeyring(format!(
                "active key {} is not among the keys",
                file.active
            )));
        }
        Ok(Keyring {
            active: file.active.clone(),
            keys,
        })
    }
}

/// The keyring a process currently holds, shared by everything that seals, opens or
/// authenticates. Readers take a cheap snapshot ([`SharedKeyring::current`]); a refresh (the
/// agent reading a new keyring Secret) replaces it for every later reader at once.
#[derive(Clone)]
pub struct SharedKeyring(Arc<RwLock<Arc<Keyring>>>);

impl SharedKeyring {
    pub fn new(keyring: Keyring) -> Self {
        SharedKeyring(Arc::new(RwLock::new(Arc::new(keyring))))
    }

    /// The keyring as it is now. Holding the snapshot keeps it alive; it is never modified.
    pub fn current(&self) -> Arc<Keyring> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the keyring; returns whether it differed from the one held.
    pub fn replace(&self, keyring: Keyring) -> bool {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        if slot.same_as(&keyring) {
            return false;
        }
        *slot = Arc::new(keyring);
        true
    }
}

impl fmt::Debug for SharedKeyring {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SharedKeyring")
            .field(&self.current())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_keyring_document_fits_the_buffer_it_is_written_into() {
        let long_id = |c: char| KeyId::parse(&c.to_string().repeat(KeyId::MAX_LEN)).unwrap();
        let mut ring = Keyring::with_active(MasterKey::from_bytes(long_id('a'), [1; 32]));
        for c in ['b', 'c', 'd'] {
            ring.rotate_to(MasterKey::from_bytes(long_id(c), [2; 32]));
        }
        let json = ring.to_json();
        let expected = 128 + 4 * (136 + KeyId::MAX_LEN);
        assert!(json.len() <= expected, "{} > {expected}", json.len());
        assert_eq!(json.capacity(), expected, "the buffer never grew");
        assert!(Keyring::from_json(&json).unwrap().same_as(&ring));
        // A key that is not 32 bytes, or not base64, is refused (and never panics).
        for bad in ["QUJD", "!!!!", &"QUFB".repeat(20)] {
            let doc = format!(r#"{{"active":"k-1","keys":[{{"id":"k-1","key":"{bad}"}}]}}"#);
            assert!(Keyring::from_json(doc.as_bytes()).is_err(), "{bad}");
        }
    }

    #[test]
    fn keyrings_compare_by_ids_and_bytes() {
        let ring = Keyring::generate().unwrap();
        let copy = Keyring::from_json(&ring.to_json()).unwrap();
        assert!(ring.same_as(&copy));
        let foreign =
            Keyring::with_active(MasterKey::from_bytes(ring.active().id().clone(), [7; 32]));
        assert!(!ring.same_as(&foreign));
        let mut rotated = copy.clone();
        rotated.rotate_to(MasterKey::generate().unwrap());
        assert!(!ring.same_as(&rotated));
        let shared = SharedKeyring::new(ring);
        assert!(!shared.replace(copy));
        assert!(shared.replace(rotated));
    }

    #[test]
    fn keyring_round_trips_and_keeps_retired_keys() {
        let mut ring = Keyring::generate().unwrap();
        let first = ring.active().id().clone();
        ring.rotate_to(MasterKey::generate().unwrap());
        let json = ring.to_json();
        let back = Keyring::from_json(&json).unwrap();
        assert_eq!(back.active().id(), ring.active().id());
        assert_eq!(
            back.get(&first).unwrap().bytes(),
            ring.get(&first).unwrap().bytes()
        );
        assert!(!format!("{back:?}").contains(&B64.encode(back.active().bytes())));
    }
}
