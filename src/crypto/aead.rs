//! ChaCha20-Poly1305 (RFC 8439) for the per-secret envelopes, through ring's assembly.
//!
//! Why ring here and not the `chacha20poly1305` crate the HPKE code uses: at the 1 KiB that
//! secrets usually are, the fixed cost dominates, and the RustCrypto AVX2 backends pay it badly
//! on a build without `target-cpu` (the profile in BENCHMARKS.md, "Seal and open", shows their
//! intrinsics called as functions, and Poly1305's four-block set-up on every message). ring is
//! already in the tree through rustls, and its code is BoringSSL's, picked at run time for the
//! CPU. The ciphertext is the same RFC 8439 construction, so envelopes from either open with
//! the other (a test below checks it both ways).
//!
//! ring does not wipe its keys on drop, so the key schedule is built in a slot that this module
//! overwrites after use: the derived per-secret key never outlives the call in memory we own.

use std::mem::{MaybeUninit, size_of};

use ring::aead::{Aad, CHACHA20_POLY1305, LessSafeKey, Nonce, Tag, UnboundKey};

use super::envelope::{NONCE_LEN, TAG_LEN};

/// The AEAD refused: the tag did not verify (open), or ring refused the input (seal; only a
/// message beyond 256 GiB would).
#[derive(Debug)]
pub(super) struct Refused;

/// Encrypts `buf` in place and returns the tag.
pub(super) fn seal_in_place(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
) -> Result<[u8; TAG_LEN], Refused> {
    with_key(key, |key| {
        key.seal_in_place_separate_tag(Nonce::assume_unique_for_key(*nonce), Aad::from(aad), buf)
            .map(|tag| tag_bytes(&tag))
            .map_err(|_| Refused)
    })
}

/// Decrypts `buf` in place if `tag` authenticates it with `aad`; on failure `buf` holds no
/// plaintext that may be used (ring leaves it unspecified; callers drop it zeroized).
pub(super) fn open_in_place(
    key: &[u8; 32],
    nonce: &[u8; NONCE_LEN],
    aad: &[u8],
    buf: &mut [u8],
    tag: &[u8; TAG_LEN],
) -> Result<(), Refused> {
    with_key(key, |key| {
        key.open_in_place_separate_tag(
            Nonce::assume_unique_for_key(*nonce),
            Aad::from(aad),
            Tag::from(*tag),
            buf,
            0..,
        )
        .map(|_| ())
        .map_err(|_| Refused)
    })
}

fn tag_bytes(tag: &Tag) -> [u8; TAG_LEN] {
    let mut out = [0u8; TAG_LEN];
    out.copy_from_slice(tag.as_ref());
    out
}

/// Runs `f` with a ring key built from `key` in a local slot, then drops the key and overwrites
/// the slot. `LessSafeKey` holds its key schedule inline (no heap), so the slot is all of it.
fn with_key<R>(key: &[u8; 32], f: impl FnOnce(&LessSafeKey) -> R) -> R {
    struct Wiped(MaybeUninit<LessSafeKey>);
    impl Drop for Wiped {
        #[allow(unsafe_code)]
        fn drop(&mut self) {
            // SAFETY: the slot was initialised before this guard exists and is dropped once,
            // here; afterwards its bytes are plain memory we own, overwritten with volatile
            // writes so the compiler cannot drop them as dead stores.
            unsafe {
                std::ptr::drop_in_place(self.0.as_mut_ptr());
                let bytes = self.0.as_mut_ptr().cast::<u8>();
                for i in 0..size_of::<LessSafeKey>() {
                    std::ptr::write_volatile(bytes.add(i), 0);
                }
            }
            std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
        }
    }
    let unbound = UnboundKey::new(&CHACHA20_POLY1305, key)
        .expect("a 32-byte key is what ChaCha20-Poly1305 takes");
    let mut slot = Wiped(MaybeUninit::uninit());
    let key = slot.0.write(LessSafeKey::new(unbound));
    f(key)
}

#[cfg(test)]
mod tests {
    use chacha20poly1305::ChaCha20Poly1305;
    use chacha20poly1305::aead::{AeadInPlace, KeyInit};

    use super::*;

    fn unhex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// RFC 8439, section 2.8.2.
    #[test]
    fn matches_the_rfc_8439_test_vector() {
        let key: [u8; 32] =
            unhex("808182838485868788898a8b8c8d8e8f909192939495969798999a9b9c9d9e9f")
                .try_into()
                .unwrap();
        let nonce: [u8; 12] = unhex("070000004041424344454647").try_into().unwrap();
        let aad = unhex("50515253c0c1c2c3c4c5c6c7");
        let plaintext = b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future, sunscreen would be it.";
        let ciphertext = unhex(
            "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d6
             3dbea45e8ca9671282fafb69da92728b1a71de0a9e060b2905d6a5b67ecd3b36
             92ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc
             3ff4def08e4b7a9de576d26586cec64b6116",
        );
        let tag = unhex("1ae10b594f09e26a7e902ecbd0600691");

        let mut buf = plaintext.to_vec();
        let got_tag = seal_in_place(&key, &nonce, &aad, &mut buf).unwrap();
        assert_eq!(buf, ciphertext);
        assert_eq!(got_tag.to_vec(), tag);

        open_in_place(&key, &nonce, &aad, &mut buf, &got_tag).unwrap();
        assert_eq!(buf, plaintext);

        let mut bad_tag = got_tag;
        bad_tag[0] ^= 1;
        let mut buf = ciphertext.clone();
        assert!(open_in_place(&key, &nonce, &aad, &mut buf, &bad_tag).is_err());
    }

    /// Envelopes sealed before this module (by the `chacha20poly1305` crate) open here, and the
    /// other way round, at every length around the block and vector boundaries.
    #[test]
    fn agrees_with_the_rustcrypto_implementation_both_ways() {
        let key = [0x42u8; 32];
        let nonce = [7u8; 12];
        let aad = b"claw-secrets/v1/aad\0header";
        let other = ChaCha20Poly1305::new(chacha20poly1305::Key::from_slice(&key));
        for len in [0usize, 1, 15, 16, 17, 63, 64, 65, 255, 256, 257, 1024, 4099] {
            let plaintext: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();

            let mut ours = plaintext.clone();
            let tag = seal_in_place(&key, &nonce, aad, &mut ours).unwrap();
            let mut theirs = plaintext.clone();
            let their_tag = other
                .encrypt_in_place_detached(
                    chacha20poly1305::Nonce::from_slice(&nonce),
                    aad,
                    &mut theirs,
                )
                .unwrap();
            assert_eq!(ours, theirs, "ciphertext differs at {len} bytes");
            assert_eq!(
                tag.as_slice(),
                their_tag.as_slice(),
                "tag differs at {len} bytes"
            );

            let mut opened = theirs.clone();
            let their_tag: [u8; TAG_LEN] = their_tag.as_slice().try_into().unwrap();
            open_in_place(&key, &nonce, aad, &mut opened, &their_tag).unwrap();
            assert_eq!(opened, plaintext);
            other
                .decrypt_in_place_detached(
                    chacha20poly1305::Nonce::from_slice(&nonce),
                    aad,
                    &mut ours,
                    chacha20poly1305::Tag::from_slice(&tag),
                )
                .unwrap();
            assert_eq!(ours, plaintext);
        }
    }
}
