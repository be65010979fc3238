//! Authenticating what is kept in clear: store entries' metadata, the store manifest, and the
//! fingerprints of idempotent writes.
//!
//! Each use has its own key: HKDF-SHA256 of one master key of the keyring, with a label naming
//! the purpose, so a tag made for one purpose is worthless for another. The id of the master key
//! is kept beside every tag, so a tag stays verifiable after the active key changes, for as long
//! as that key stays in the keyring.

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use super::{CryptoError, KeyId, Keyring, MasterKey};

/// What a derived key authenticates. The label is part of the derivation, so keys of two
/// purposes never coincide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    /// One entry file of the node store.
    StoreEntry,
    /// The store's manifest: the authenticated high-water mark of every entry.
    StoreManifest,
    /// The keyed digest that tells a retried write from a different one.
    WriteFingerprint,
    /// The keyed digest of the data a secret version was sealed from ([`super::DataDigest`]).
    DataDigest,
    /// The store image: one file holding the store's decoded entries and the manifest's state,
    /// read at start-up instead of every entry file (`store::image`).
    StoreImage,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::StoreEntry => b"claw-secrets/v1/mac/store-entry",
            Purpose::StoreManifest => b"claw-secrets/v1/mac/store-manifest",
            Purpose::WriteFingerprint => b"claw-secrets/v1/mac/write-fingerprint",
            Purpose::DataDigest => b"claw-secrets/v1/mac/data-digest",
            Purpose::StoreImage => b"claw-secrets/v1/mac/store-image",
        }
    }
}

/// The length of every tag: HMAC-SHA256.
pub const TAG_LEN: usize = 32;

/// An HMAC-SHA256 key for one purpose, derived from one master key. Zeroized on drop.
pub struct MacKey {
    key_id: KeyId,
    key: Zeroizing<[u8; 32]>,
}

impl MacKey {
    fn derive(master: &MasterKey, purpose: Purpose) -> MacKey {
        let hk = Hkdf::<Sha256>::new(None, master.bytes());
        let mut key = Zeroizing::new([0u8; 32]);
        hk.expand(purpose.label(), key.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        MacKey {
            key_id: master.id().clone(),
            key,
        }
    }

    /// The key for `purpose` under the keyring's active master key: what new tags are made with.
    pub fn active(keyring: &Keyring, purpose: Purpose) -> MacKey {
        MacKey::derive(keyring.active(), purpose)
    }

    /// The key for `purpose` under master key `id`, to check a tag made with it.
    pub fn for_key(keyring: &Keyring, id: &KeyId, purpose: Purpose) -> Result<MacKey, CryptoError> {
        let master = keyring
            .get(id)
            .ok_or_else(|| CryptoError::UnknownKey(id.to_string()))?;
        Ok(MacKey::derive(master, purpose))
    }

    /// The master key this key was derived from.
    pub fn key_id(&self) -> &KeyId {
        &self.key_id
    }

    fn mac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.key.as_ref())
            .expect("HMAC takes a key of any length");
        // Every part is length-prefixed, so no two different lists of parts are fed the same
        // bytes (`ab` + `c` vs `a` + `bc`).
        for part in parts {
            mac.update(&(part.len() as u64).to_be_bytes());
            mac.update(part);
        }
        mac
    }

    /// The tag of `parts`.
    pub fn tag(&self, parts: &[&[u8]]) -> [u8; TAG_LEN] {
        self.mac(parts).finalize().into_bytes().into()
    }

    /// A tag computed part by part, for inputs assembled on the fly (each part is
    /// length-prefixed, as in [`MacKey::tag`]).
    pub fn tagger(&self) -> Tagger {
        Tagger(self.mac(&[]))
    }

    /// Whether `tag` is the tag of `parts`, compared in constant time.
    pub fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.mac(parts).verify_slice(tag).is_ok()
    }
}

/// See [`MacKey::tagger`].
pub struct Tagger(Hmac<Sha256>);

impl Tagger {
    pub fn part(&mut self, bytes: &[u8]) -> &mut Self {
        self.0.update(&(bytes.len() as u64).to_be_bytes());
        self.0.update(bytes);
        self
    }

    pub fn finish(self) -> [u8; TAG_LEN] {
        self.0.finalize().into_bytes().into()
    }

    /// Whether `tag` is the tag of the parts given, compared in constant time.
    pub fn verify(self, tag: &[u8]) -> bool {
        self.0.verify_slice(tag).is_ok()
    }

    /// A part of `len` bytes given piece by piece ([`StreamedPart::update`]), for a part too
    /// large to hold whole: its tag is that of [`Tagger::part`] of the same bytes. The length
    /// is part of the MAC's input before the bytes, so it must be known first.
    pub fn streamed_part(mut self, len: u64) -> StreamedPart {
        self.0.update(&len.to_be_bytes());
        StreamedPart {
            tagger: self,
            left: Some(len),
        }
    }
}

/// See [`Tagger::streamed_part`].
pub struct StreamedPart {
    tagger: Tagger,
    /// Bytes still owed; `None` once more were given than declared.
    left: Option<u64>,
}

impl StreamedPart {
    pub fn update(&mut self, bytes: &[u8]) {
        self.left = self
            .left
            .and_then(|left| left.checked_sub(bytes.len() as u64));
        self.tagger.0.update(bytes);
    }

    /// The tagger with the part done; `None` if the bytes given were not exactly the length
    /// declared (their tag would match no reader's).
    pub fn finish(self) -> Option<Tagger> {
        (self.left == Some(0)).then_some(self.tagger)
    }
}

impl std::fmt::Debug for MacKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MacKey")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_depend_on_purpose_key_and_every_part_boundary() {
        let mut ring = Keyring::generate().unwrap();
        let first = ring.active().id().clone();
        let entry = MacKey::active(&ring, Purpose::StoreEntry);
        let tag = entry.tag(&[b"ab", b"c"]);
        assert!(entry.verify(&[b"ab", b"c"], &tag));
        assert!(!entry.verify(&[b"a", b"bc"], &tag));
        assert!(!MacKey::active(&ring, Purpose::StoreManifest).verify(&[b"ab", b"c"], &tag));
        let mut tagger = entry.tagger();
        tagger.part(b"ab").part(b"c");
        assert_eq!(tagger.finish(), tag);

        // After a rotation the old tag is still checked with the key that made it.
        ring.rotate_to(MasterKey::generate().unwrap());
        assert!(!MacKey::active(&ring, Purpose::StoreEntry).verify(&[b"ab", b"c"], &tag));
        let old = MacKey::for_key(&ring, &first, Purpose::StoreEntry).unwrap();
        assert!(old.verify(&[b"ab", b"c"], &tag));
        assert!(matches!(
            MacKey::for_key(&Keyring::generate().unwrap(), &first, Purpose::StoreEntry),
            Err(CryptoError::UnknownKey(_))
        ));
    }

    #[test]
    fn a_streamed_part_tags_as_the_whole_part_and_only_at_its_declared_length() {
        let key = MacKey::active(&Keyring::generate().unwrap(), Purpose::StoreImage);
        let whole = b"header|entry one|entry two";
        let mut streamed = key.tagger().streamed_part(whole.len() as u64);
        for piece in whole.chunks(5) {
            streamed.update(piece);
        }
        assert_eq!(streamed.finish().unwrap().finish(), key.tag(&[whole]));

        let mut short = key.tagger().streamed_part(whole.len() as u64);
        short.update(&whole[..10]);
        assert!(short.finish().is_none());
        let mut long = key.tagger().streamed_part(3);
        long.update(whole);
        assert!(long.finish().is_none());
    }
}
