//! Offline sealing: data encrypted on a user's machine to the cluster's public sealing key, so a
//! ClawSecret manifest can be committed to Git (`claw-secrets seal`; docs/crypto.md, "Manifests
//! safe to commit").
//!
//! HPKE (RFC 9180), base mode, DHKEM(X25519, HKDF-SHA256) + HKDF-SHA256 + ChaCha20-Poly1305,
//! from the `hpke` crate. The X25519 key pair is derived from a master key of the keyring
//! (HKDF-SHA256, then the RFC's DeriveKeyPair), so it needs no storage of its own and every
//! master key still in the keyring can open what was sealed to its public key. The ciphertext
//! is bound to the ClawSecret's namespace and object name (the AAD): the same text applied
//! under another name or in another namespace fails to open.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use hkdf::Hkdf;
use hpke::aead::{AeadTag, ChaCha20Poly1305};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::rand_core::{CryptoRng, RngCore};
use hpke::{Deserializable, HpkeError, Kem, OpModeR, OpModeS, Serializable};
use sha2::Sha256;
use std::fmt;
use zeroize::Zeroizing;

use super::seal::{decode_plaintext, encode_plaintext};
use super::{CryptoError, KeyId, Keyring, MasterKey, random_bytes};
use crate::domain::SecretData;

type SealKem = X25519HkdfSha256;
type SealKdf = HkdfSha256;
type SealAead = ChaCha20Poly1305;

/// The prefix of a public sealing key's text form; `v1` names this derivation and this suite.
const PUBLIC_KEY_PREFIX: &str = "claw-secrets-sealing-key-v1:";
/// HKDF-SHA256 info that turns a master key into the IKM of the sealing key pair.
const SEALING_KEY_LABEL: &[u8] = b"claw-secrets/v1/sealing-key\0";
/// What one use of HPKE is: its AAD label and HPKE `info` (each use has its own, so a text
/// sealed for one is useless to every other), and what its framing errors call the text.
pub(super) struct HpkeUse {
    /// First bytes of every AAD.
    pub aad_label: &'static [u8],
    /// HPKE `info`: binds the key schedule to this use.
    pub info: &'static [u8],
    pub not_base64: &'static str,
    pub too_short: &'static str,
    pub bad_key_id: &'static str,
}

/// `claw-secrets seal`: data for one ClawSecret, to the cluster's sealing key.
const OFFLINE: HpkeUse = HpkeUse {
    aad_label: b"claw-secrets/v1/offline-seal\0",
    info: b"claw-secrets/v1/offline-seal-info\0",
    not_base64: "encryptedData is not base64 (standard alphabet, padded)",
    too_short: "encryptedData is too short for its framing",
    bad_key_id: "encryptedData names an invalid master key id",
};
/// The only format this build writes and reads.
const FORMAT_V1: u8 = 1;
/// X25519 public keys and encapsulated keys (Npk = Nenc = 32).
const KEY_LEN: usize = 32;
/// Poly1305.
const TAG_LEN: usize = 16;

/// The cluster's public sealing key (X25519), safe to publish: it can seal, never open.
#[derive(Clone, PartialEq, Eq)]
pub struct SealingPublicKey {
    master_key_id: KeyId,
    key: <SealKem as Kem>::PublicKey,
}

impl SealingPublicKey {
    /// Reads the text form ([`SealingPublicKey::to_text`]); surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, CryptoError> {
        let text = text.trim();
        let rest = text.strip_prefix(PUBLIC_KEY_PREFIX).ok_or_else(|| {
            CryptoError::InvalidSealingKey(format!(
                "it does not start with {PUBLIC_KEY_PREFIX:?} (expected \
                 {PUBLIC_KEY_PREFIX}<key id>:<base64url of 32 bytes>)"
            ))
        })?;
        let (id, key) = rest.split_once(':').ok_or_else(|| {
            CryptoError::InvalidSealingKey(
                "no ':' between the key id and the key (expected \
                 claw-secrets-sealing-key-v1:<key id>:<base64url of 32 bytes>)"
                    .to_owned(),
            )
        })?;
        let master_key_id = KeyId::parse(id)
            .map_err(|_| CryptoError::InvalidSealingKey(format!("key id {id:?} is invalid")))?;
        let mut bytes = [0u8; KEY_LEN + 3];
        let len = B64URL.decode_slice(key, &mut bytes).map_err(|_| {
            CryptoError::InvalidSealingKey(
                "the key is not unpadded base64url of 32 bytes".to_owned(),
            )
        })?;
        if len != KEY_LEN {
            return Err(CryptoError::InvalidSealingKey(format!(
                "the key is {len} bytes; an X25519 public key is 32"
            )));
        }
        let key = <SealKem as Kem>::PublicKey::from_bytes(&bytes[..KEY_LEN])
            .map_err(|_| CryptoError::InvalidSealingKey("not an X25519 public key".to_owned()))?;
        Ok(SealingPublicKey { master_key_id, key })
    }

    /// `claw-secrets-sealing-key-v1:<master key id>:<base64url, no padding, of 32 bytes>`.
    pub fn to_text(&self) -> String {
        format!(
            "{PUBLIC_KEY_PREFIX}{}:{}",
            self.master_key_id,
            B64URL.encode(self.key.to_bytes())
        )
    }

    /// The master key this public key was derived from: opening needs that key in the keyring.
    pub fn master_key_id(&self) -> &KeyId {
        &self.master_key_id
    }
}

impl fmt::Debug for SealingPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("SealingPublicKey")
            .field(&self.to_text())
            .finish()
    }
}

impl fmt::Display for SealingPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_text())
    }
}

/// The private half, derived from one master key. Never serialized; its X25519 scalar is
/// wiped when dropped (x25519-dalek's `zeroize`, turned on in Cargo.toml). `Debug` shows the
/// master key id only.
pub struct SealingPrivateKey {
    master_key_id: KeyId,
    secret: <SealKem as Kem>::PrivateKey,
    public: <SealKem as Kem>::PublicKey,
}

impl SealingPrivateKey {
    /// Deterministic: IKM = HKDF-SHA256(ikm = the master key's bytes, no salt, info =
    /// "claw-secrets/v1/sealing-key\0"), 32 bytes; then RFC 9180 DeriveKeyPair(IKM) of
    /// DHKEM(X25519, HKDF-SHA256). The same master key always gives the same key pair, so
    /// every holder of the keyring (every operator replica) has it without storing it.
    pub fn derive(master: &MasterKey) -> SealingPrivateKey {
        let hk = Hkdf::<Sha256>::new(None, master.bytes());
        let mut ikm = Zeroizing::new([0u8; 32]);
        hk.expand(SEALING_KEY_LABEL, ikm.as_mut())
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        let (secret, public) = SealKem::derive_keypair(ikm.as_ref());
        SealingPrivateKey {
            master_key_id: master.id().clone(),
            secret,
            public,
        }
    }

    pub fn public_key(&self) -> SealingPublicKey {
        SealingPublicKey {
            master_key_id: self.master_key_id.clone(),
            key: self.public.clone(),
        }
    }
}

impl fmt::Debug for SealingPrivateKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SealingPrivateKey")
            .field("master_key_id", &self.master_key_id)
            .field("secret", &"[redacted]")
            .finish()
    }
}

/// What a ciphertext is bound to (strict scope): the ClawSecret's namespace and object name
/// (`metadata.namespace`, `metadata.name`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SealScope<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
}

/// `format || len(key id) || key id`: the part of the framing that precedes `enc`.
fn header(master_key_id: &KeyId) -> Vec<u8> {
    let id = master_key_id.as_str().as_bytes();
    debug_assert!(id.len() <= KeyId::MAX_LEN);
    let mut out = Vec::with_capacity(2 + id.len());
    out.push(FORMAT_V1);
    out.push(id.len() as u8);
    out.extend_from_slice(id);
    out
}

/// The purpose's label, then each field u32-length-prefixed (so `("ab","c")` and `("a","bc")`
/// differ), then the header.
fn aad(purpose: &HpkeUse, fields: &[&[u8]], header: &[u8]) -> Vec<u8> {
    let len = purpose.aad_label.len() + fields.iter().map(|f| 4 + f.len()).sum::<usize>();
    let mut out = Vec::with_capacity(len + header.len());
    out.extend_from_slice(purpose.aad_label);
    for field in fields {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field);
    }
    out.extend_from_slice(header);
    out
}

/// Randomness for one encapsulation, drawn from the OS before HPKE starts, so that a failing
/// RNG is an error ([`CryptoError::Random`]) rather than a panic inside `hpke`. DHKEM(X25519)
/// draws exactly Nsk = 32 bytes (the ephemeral key's IKM); asking for more is a bug.
struct PrefetchedRandom {
    bytes: Zeroizing<[u8; 32]>,
    used: usize,
}

impl PrefetchedRandom {
    fn new() -> Result<Self, CryptoError> {
        let mut bytes = Zeroizing::new([0u8; 32]);
        random_bytes(bytes.as_mut())?;
        Ok(PrefetchedRandom { bytes, used: 0 })
    }
}

impl RngCore for PrefetchedRandom {
    fn next_u32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        self.fill_bytes(&mut b);
        u32::from_le_bytes(b)
    }

    fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill_bytes(&mut b);
        u64::from_le_bytes(b)
    }

    fn fill_bytes(&mut self, dst: &mut [u8]) {
        let end = self.used + dst.len();
        assert!(
            end <= self.bytes.len(),
            "HPKE drew more randomness than DHKEM(X25519) needs (32 bytes)"
        );
        dst.copy_from_slice(&self.bytes[self.used..end]);
        self.used = end;
    }
}

impl CryptoRng for PrefetchedRandom {}

/// Encrypts `data` to `public`, bound to `scope`. Returns the text kept in
/// `spec.encryptedData`: standard, padded base64 of
/// `format (1) || len(key id) || key id || enc (32) || ciphertext || tag (16)`.
pub fn seal_offline(
    public: &SealingPublicKey,
    scope: &SealScope<'_>,
    data: &SecretData,
) -> Result<String, CryptoError> {
    let fields = [scope.namespace.as_bytes(), scope.name.as_bytes()];
    Ok(B64.encode(seal_to(public, &OFFLINE, &fields, data)?))
}

/// Opens what [`seal_offline`] sealed for exactly `scope`, with the private key derived from
/// the keyring's master key that the text names ([`CryptoError::UnknownKey`] if the keyring
/// lacks it). Another namespace or name, or any changed byte, is
/// [`CryptoError::AuthenticationFailed`]; bad framing is [`CryptoError::MalformedEnvelope`].
pub fn open_offline(
    keyring: &Keyring,
    scope: &SealScope<'_>,
    text: &str,
) -> Result<SecretData, CryptoError> {
    let fields = [scope.namespace.as_bytes(), scope.name.as_bytes()];
    open_with(keyring, &OFFLINE, &fields, text)
}

/// Encrypts `data` to `public` for `purpose`, bound to `fields`:
/// `format (1) || len(key id) || key id || enc (32) || ciphertext || tag (16)`.
pub(super) fn seal_to(
    public: &SealingPublicKey,
    purpose: &HpkeUse,
    fields: &[&[u8]],
    data: &SecretData,
) -> Result<Vec<u8>, CryptoError> {
    let header = header(&public.master_key_id);
    let aad = aad(purpose, fields, &header);
    // Encrypted in place: the only plaintext buffer is this zeroizing one, and it holds
    // ciphertext when it is moved out below.
    let mut buf = encode_plaintext(data);
    let mut rng = PrefetchedRandom::new()?;
    let (enc, tag) = hpke::single_shot_seal_in_place_detached::<SealAead, SealKdf, SealKem, _>(
        &OpModeS::Base,
        &public.key,
        purpose.info,
        &mut buf,
        &aad,
        &mut rng,
    )
    .map_err(|e| match e {
        // The public key is a low-order point: no shared secret can come of it.
        HpkeError::EncapError => CryptoError::InvalidSealingKey(
            "the key is not a usable X25519 public key (a low-order point)".to_owned(),
        ),
        _ => CryptoError::AuthenticationFailed,
    })?;
    let ciphertext = std::mem::take(&mut *buf);
    let mut out = Vec::with_capacity(header.len() + KEY_LEN + ciphertext.len() + TAG_LEN);
    out.extend_from_slice(&header);
    out.extend_from_slice(&enc.to_bytes());
    out.extend_from_slice(&ciphertext);
    out.extend_from_slice(&tag.to_bytes());
    Ok(out)
}

/// Opens base64 `text` that [`seal_to`] sealed for `purpose` and exactly `fields`, with the
/// private key derived from the keyring's key that the text names.
pub(super) fn open_with(
    keyring: &Keyring,
    purpose: &HpkeUse,
    fields: &[&[u8]],
    text: &str,
) -> Result<SecretData, CryptoError> {
    let not_base64 = CryptoError::MalformedEnvelope(purpose.not_base64);
    let too_short = || CryptoError::MalformedEnvelope(purpose.too_short);
    let bytes = B64.decode(text.trim()).map_err(|_| not_base64)?;
    let (&format, rest) = bytes.split_first().ok_or_else(too_short)?;
    if format != FORMAT_V1 {
        return Err(CryptoError::UnsupportedFormat(format));
    }
    let (&id_len, rest) = rest.split_first().ok_or_else(too_short)?;
    let id_len = usize::from(id_len);
    if id_len == 0 || id_len > KeyId::MAX_LEN || rest.len() < id_len + KEY_LEN + TAG_LEN {
        return Err(too_short());
    }
    let (id, rest) = rest.split_at(id_len);
    let id = std::str::from_utf8(id)
        .ok()
        .and_then(|s| KeyId::parse(s).ok())
        .ok_or(CryptoError::MalformedEnvelope(purpose.bad_key_id))?;
    let (enc, rest) = rest.split_at(KEY_LEN);
    let (ciphertext, tag) = rest.split_at(rest.len() - TAG_LEN);

    let master = keyring
        .get(&id)
        .ok_or_else(|| CryptoError::UnknownKey(id.to_string()))?;
    let private = SealingPrivateKey::derive(master);
    let header = &bytes[..2 + id_len];
    let aad = aad(purpose, fields, header);
    // X25519 accepts any 32 bytes and a tag is any 16, so neither fails here.
    let enc = <SealKem as Kem>::EncappedKey::from_bytes(enc)
        .map_err(|_| CryptoError::MalformedEnvelope("the encapsulated key"))?;
    let tag = AeadTag::<SealAead>::from_bytes(tag)
        .map_err(|_| CryptoError::MalformedEnvelope("the tag"))?;
    let mut buf = Zeroizing::new(ciphertext.to_vec());
    hpke::single_shot_open_in_place_detached::<SealAead, SealKdf, SealKem>(
        &OpModeR::Base,
        &private.secret,
        &enc,
        purpose.info,
        &mut buf,
        &aad,
        &tag,
    )
    .map_err(|_| CryptoError::AuthenticationFailed)?;
    decode_plaintext(&buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(json: &str) -> SecretData {
        serde_json::from_str(json).unwrap()
    }

    const SCOPE: SealScope<'static> = SealScope {
        namespace: "team-a",
        name: "db-credentials",
    };

    fn fixed_master() -> MasterKey {
        MasterKey::from_bytes(KeyId::parse("k-0123456789abcdef").unwrap(), [7u8; 32])
    }

    #[test]
    fn round_trip_through_the_public_key_text() {
        let ring = Keyring::generate().unwrap();
        let public = SealingPrivateKey::derive(ring.active()).public_key();
        let public = SealingPublicKey::parse(&format!("  {}\n", public.to_text())).unwrap();
        assert_eq!(public.master_key_id(), ring.active().id());
        let d = data(r#"{"username":"admin","password":"s3cret","empty":""}"#);
        let text = seal_offline(&public, &SCOPE, &d).unwrap();
        assert_eq!(open_offline(&ring, &SCOPE, &text).unwrap(), d);
        // Whitespace around the text (a YAML block scalar's newline) is ignored.
        assert_eq!(
            open_offline(&ring, &SCOPE, &format!("{text}\n")).unwrap(),
            d
        );
        // Every seal draws a fresh ephemeral key: the same data twice is two texts.
        assert_ne!(text, seal_offline(&public, &SCOPE, &d).unwrap());
    }

    #[test]
    fn the_framing_is_as_documented() {
        let master = fixed_master();
        let public = SealingPrivateKey::derive(&master).public_key();
        let d = data(r#"{"k":"v"}"#);
        let bytes = B64
            .decode(seal_offline(&public, &SCOPE, &d).unwrap())
            .unwrap();
        let id = b"k-0123456789abcdef";
        assert_eq!(bytes[0], 1);
        assert_eq!(usize::from(bytes[1]), id.len());
        assert_eq!(&bytes[2..2 + id.len()], id);
        // enc, then the encoded plaintext (4 + 4+1 + 4+1 bytes) and the tag.
        assert_eq!(bytes.len(), 2 + id.len() + 32 + 14 + 16);
    }

    #[test]
    fn another_scope_a_changed_byte_or_a_cut_never_opens() {
        let ring = Keyring::generate().unwrap();
        let public = SealingPrivateKey::derive(ring.active()).public_key();
        let d = data(r#"{"password":"s3cret"}"#);
        let text = seal_offline(&public, &SCOPE, &d).unwrap();
        for scope in [
            SealScope {
                namespace: "team-b",
                ..SCOPE
            },
            SealScope {
                name: "db-credentialz",
                ..SCOPE
            },
            // Length prefixes: moving a character across the boundary is another scope.
            SealScope {
                namespace: "team-ad",
                name: "b-credentials",
            },
            SealScope {
                namespace: "db-credentials",
                name: "team-a",
            },
        ] {
            assert!(
                matches!(
                    open_offline(&ring, &scope, &text),
                    Err(CryptoError::AuthenticationFailed)
                ),
                "{scope:?}"
            );
        }
        let bytes = B64.decode(&text).unwrap();
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            assert!(
                open_offline(&ring, &SCOPE, &B64.encode(&t)).is_err(),
                "flip at byte {i} went unnoticed"
            );
        }
        for cut in 0..bytes.len() {
            assert!(
                open_offline(&ring, &SCOPE, &B64.encode(&bytes[..cut])).is_err(),
                "cut at {cut} opened"
            );
        }
        // A flip in the ciphertext or tag is an authentication failure; a cut too short for
        // the framing is malformed; an unknown format byte is named.
        let mut t = bytes.clone();
        *t.last_mut().unwrap() ^= 0x80;
        assert!(matches!(
            open_offline(&ring, &SCOPE, &B64.encode(&t)),
            Err(CryptoError::AuthenticationFailed)
        ));
        assert!(matches!(
            open_offline(&ring, &SCOPE, &B64.encode(&bytes[..40])),
            Err(CryptoError::MalformedEnvelope(_))
        ));
        let mut t = bytes.clone();
        t[0] = 2;
        assert!(matches!(
            open_offline(&ring, &SCOPE, &B64.encode(&t)),
            Err(CryptoError::UnsupportedFormat(2))
        ));
        assert!(matches!(
            open_offline(&ring, &SCOPE, "not base64!"),
            Err(CryptoError::MalformedEnvelope(_))
        ));
        assert!(matches!(
            open_offline(&ring, &SCOPE, ""),
            Err(CryptoError::MalformedEnvelope(_))
        ));
    }

    #[test]
    fn a_key_missing_from_the_keyring_is_named_and_a_foreign_key_fails() {
        let ring = Keyring::generate().unwrap();
        let public = SealingPrivateKey::derive(ring.active()).public_key();
        let text = seal_offline(&public, &SCOPE, &data(r#"{"k":"v"}"#)).unwrap();
        match open_offline(&Keyring::generate().unwrap(), &SCOPE, &text) {
            Err(CryptoError::UnknownKey(id)) => assert_eq!(id, ring.active().id().as_str()),
            other => panic!("{other:?}"),
        }
        // Same id, other bytes (another installation's keyring).
        let foreign =
            Keyring::with_active(MasterKey::from_bytes(ring.active().id().clone(), [9u8; 32]));
        assert!(matches!(
            open_offline(&foreign, &SCOPE, &text),
            Err(CryptoError::AuthenticationFailed)
        ));
        // After a rotation the old key, now retired, still opens.
        let mut rotated = ring.clone();
        rotated.rotate_to(MasterKey::generate().unwrap());
        assert!(open_offline(&rotated, &SCOPE, &text).is_ok());
    }

    #[test]
    fn derivation_is_deterministic_and_pinned() {
        let a = SealingPrivateKey::derive(&fixed_master()).public_key();
        let b = SealingPrivateKey::derive(&fixed_master()).public_key();
        assert_eq!(a, b);
        // Pinned: a change to the derivation would orphan every manifest sealed so far.
        assert_eq!(a.to_text(), PINNED_PUBLIC_KEY);
        let other = MasterKey::from_bytes(KeyId::parse("k-0123456789abcdef").unwrap(), [8u8; 32]);
        assert_ne!(SealingPrivateKey::derive(&other).public_key(), a);
        let r1 = Keyring::generate().unwrap();
        let r2 = Keyring::generate().unwrap();
        assert_ne!(
            SealingPrivateKey::derive(r1.active())
                .public_key()
                .to_text(),
            SealingPrivateKey::derive(r2.active())
                .public_key()
                .to_text()
        );
        let dbg = format!("{:?}", SealingPrivateKey::derive(&fixed_master()));
        assert!(
            dbg.contains("redacted") && dbg.contains("k-0123456789abcdef"),
            "{dbg}"
        );
    }

    /// Known answer: sealed once to [`PINNED_PUBLIC_KEY`] for [`SCOPE`] (team-a/db-credentials),
    /// and opened independently (RFC 9180 base mode written out by hand in Python, on the
    /// `cryptography` package's X25519, HKDF and ChaCha20-Poly1305; it derived the same public
    /// key). A build that cannot open it could not open the manifests already committed.
    const PINNED_SEALED: &str = "ARJrLTAxMjM0NTY3ODlhYmNkZWZIugY7eet2irdgB9NnnKHy8S0FARg4HAo0Ta7+/fPkbx/5Yx/iAi423ohElWTGH/DnGzlW9qqIhOQ7xPoHMYdOaedSKjeokJejhw3yTyvn33If8k88HuYLqvYrMLHGvA0Kxp6i";

    #[test]
    fn a_text_sealed_by_an_earlier_build_still_opens() {
        let ring = Keyring::with_active(fixed_master());
        assert_eq!(
            open_offline(&ring, &SCOPE, PINNED_SEALED).unwrap(),
            data(r#"{"password":"hunter2-hunter2","user":"admin"}"#)
        );
        let elsewhere = SealScope {
            namespace: "team-b",
            ..SCOPE
        };
        assert!(open_offline(&ring, &elsewhere, PINNED_SEALED).is_err());
    }

    const PINNED_PUBLIC_KEY: &str = "claw-secrets-sealing-key-v1:k-0123456789abcdef:6Yu6Npjr5hMEz-kpNpOxDsl6XVb3kafU4hnltscehnc";

    #[test]
    fn public_key_text_round_trips_and_bad_texts_are_refused() {
        let public = SealingPrivateKey::derive(&fixed_master()).public_key();
        let text = public.to_text();
        assert!(text.starts_with("claw-secrets-sealing-key-v1:k-0123456789abcdef:"));
        assert_eq!(SealingPublicKey::parse(&text).unwrap(), public);
        assert_eq!(SealingPublicKey::parse(&text).unwrap().to_text(), text);
        let key = text.rsplit(':').next().unwrap();
        for bad in [
            "".to_owned(),
            key.to_owned(),
            format!("claw-secrets-sealing-key-v2:k-1:{key}"),
            format!("claw-secrets-sealing-key-v1:{key}"),
            format!("claw-secrets-sealing-key-v1:k_1:{key}"),
            format!("claw-secrets-sealing-key-v1:k-1:{key}="),
            format!("claw-secrets-sealing-key-v1:k-1:{}", &key[..40]),
            format!("claw-secrets-sealing-key-v1:k-1:{key}AAAA"),
            format!("claw-secrets-sealing-key-v1:k-1:{}", B64.encode([1u8; 32])),
        ] {
            assert!(
                matches!(
                    SealingPublicKey::parse(&bad),
                    Err(CryptoError::InvalidSealingKey(_))
                ),
                "{bad:?}"
            );
        }
        // The all-zero point is refused when sealing, not silently used.
        let zero = format!(
            "claw-secrets-sealing-key-v1:k-1:{}",
            B64URL.encode([0u8; 32])
        );
        let zero = SealingPublicKey::parse(&zero).unwrap();
        assert!(matches!(
            seal_offline(&zero, &SCOPE, &data(r#"{"k":"v"}"#)),
            Err(CryptoError::InvalidSealingKey(_))
        ));
    }

    #[test]
    fn errors_never_contain_the_plaintext() {
        let canary = "canary-Zq8xW3pL";
        let ring = Keyring::generate().unwrap();
        let public = SealingPrivateKey::derive(ring.active()).public_key();
        let d = data(&format!(r#"{{"token":"{canary}"}}"#));
        let text = seal_offline(&public, &SCOPE, &d).unwrap();
        assert!(!text.contains(canary));
        let bytes = B64.decode(&text).unwrap();
        let mut errors = Vec::new();
        for scope in [
            SealScope {
                namespace: "x",
                ..SCOPE
            },
            SCOPE,
        ] {
            for i in [0, 1, 5, bytes.len() / 2, bytes.len() - 1] {
                let mut t = bytes.clone();
                t[i] ^= 0x04;
                if let Err(e) = open_offline(&ring, &scope, &B64.encode(&t)) {
                    errors.push(format!("{e} {e:?}"));
                }
            }
        }
        errors.push(format!(
            "{:?}",
            open_offline(&Keyring::generate().unwrap(), &SCOPE, &text)
        ));
        assert!(errors.len() > 5);
        for e in errors {
            assert!(!e.contains(canary), "{e}");
        }
        assert!(!format!("{d:?}").contains(canary));
    }

    mod properties {
        //! Parsers of outside input (a committed manifest's text, a fetched key): any input is
        //! an answer or an error, never a panic (PROPTEST_CASES runs them longer; README).

        use super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        fn ring() -> Keyring {
            Keyring::with_active(fixed_master())
        }

        proptest! {
            /// Arbitrary bytes, as base64 or as text: refused, never a panic.
            #[test]
            fn any_text_is_refused_without_a_panic(
                bytes in prop::collection::vec(any::<u8>(), 0..160),
                text in ".{0,80}",
            ) {
                prop_assert!(open_offline(&ring(), &SCOPE, &B64.encode(&bytes)).is_err());
                prop_assert!(open_offline(&ring(), &SCOPE, &text).is_err());
            }

            /// A well-formed header for a key the keyring holds, then arbitrary bytes: refused
            /// as malformed or unauthentic, never a panic.
            #[test]
            fn any_payload_after_a_valid_header_is_refused(
                payload in prop::collection::vec(any::<u8>(), 0..160),
            ) {
                let mut bytes = header(fixed_master().id());
                bytes.extend_from_slice(&payload);
                let result = open_offline(&ring(), &SCOPE, &B64.encode(&bytes));
                prop_assert!(
                    matches!(
                        result,
                        Err(CryptoError::MalformedEnvelope(_) | CryptoError::AuthenticationFailed)
                    ),
                    "{:?}",
                    result
                );
            }

            /// Any text as a public key: a key or InvalidSealingKey; what parses prints back.
            #[test]
            fn any_text_is_a_public_key_or_refused(
                text in "(claw-secrets-sealing-key-v1:)?[A-Za-z0-9_:=-]{0,70}",
            ) {
                match SealingPublicKey::parse(&text) {
                    Ok(key) => prop_assert_eq!(key.to_text(), text),
                    Err(e) => prop_assert!(matches!(e, CryptoError::InvalidSealingKey(_))),
                }
            }

            /// Sealed data opens to itself in its scope, and nowhere else.
            #[test]
            fn sealed_data_opens_only_in_its_scope(
                data in prop::collection::btree_map("[A-Za-z0-9._-]{1,16}", ".{0,64}", 1..6),
                namespace in "[a-z0-9]{1,12}",
                name in "[a-z0-9.-]{1,20}",
                other in "[a-z0-9]{1,12}",
            ) {
                let data: SecretData = SecretData::parse(
                    data.into_iter()
                        .map(|(k, v)| (crate::domain::DataKey::parse(&k).unwrap(), crate::domain::SecretValue::new(v)))
                        .collect::<BTreeMap<_, _>>(),
                ).unwrap();
                let public = SealingPrivateKey::derive(&fixed_master()).public_key();
                let scope = SealScope { namespace: &namespace, name: &name };
                let text = seal_offline(&public, &scope, &data).unwrap();
                prop_assert!(open_offline(&ring(), &scope, &text).unwrap() == data);
                if other != namespace {
                    let moved = SealScope { namespace: &other, name: &name };
                    prop_assert!(open_offline(&ring(), &moved, &text).is_err());
                }
                if other != name {
                    let renamed = SealScope { namespace: &namespace, name: &other };
                    prop_assert!(open_offline(&ring(), &renamed, &text).is_err());
                }
            }
        }
    }
}
