//! Seal and open: the only code that turns plaintext into ciphertext and back.

use hkdf::Hkdf;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::aead;
use super::envelope::{NONCE_LEN, SALT_LEN, TAG_LEN};
use super::{CryptoError, Envelope, Keyring, MasterKey, random_public_bytes};
use crate::domain::{DataKey, Kind, Name, Namespace, SecretData, SecretValue, Version, wipe_bytes};

/// Everything a ciphertext is bound to. Opening under any other identity fails.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretIdentity<'a> {
    pub kind: Kind,
    pub namespace: &'a Namespace,
    pub name: &'a Name,
    pub version: Version,
}

impl SecretIdentity<'_> {
    /// Unambiguous encoding: every variable-length field is length-prefixed, so no two
    /// identities share an encoding (`a/bc` vs `ab/c`).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64 + self.name.as_str().len());
        for field in [
            self.kind.as_str().as_bytes(),
            self.namespace.as_str().as_bytes(),
            self.name.as_str().as_bytes(),
        ] {
            out.extend_from_slice(&(field.len() as u32).to_be_bytes());
            out.extend_from_slice(field);
        }
        out.extend_from_slice(&self.version.get().to_be_bytes());
        out
    }
}

/// Domain separation: these labels make keys and AADs of this format useless anywhere else.
/// Each kind of sealed content has its own pair.
struct Labels {
    kdf_info: &'static [u8],
    aad: &'static [u8],
}

const SECRET_DATA: Labels = Labels {
    kdf_info: b"claw-secrets/v1/secret-key\0",
    aad: b"claw-secrets/v1/aad\0",
};

const WRITE_RECORDS: Labels = Labels {
    kdf_info: b"claw-secrets/v1/write-records-key\0",
    aad: b"claw-secrets/v1/write-records-aad\0",
};

fn derive_key(
    master: &MasterKey,
    salt: &[u8; SALT_LEN],
    labels: &Labels,
    identity: &[u8],
) -> Zeroizing<[u8; 32]> {
    let hk = Hkdf::<Sha256>::new(Some(salt), master.bytes());
    let mut info = Vec::with_capacity(labels.kdf_info.len() + identity.len());
    info.extend_from_slice(labels.kdf_info);
    info.extend_from_slice(identity);
    let mut okm = Zeroizing::new([0u8; 32]);
    hk.expand(&info, okm.as_mut())
        .expect("32 bytes is a valid HKDF-SHA256 output length");
    okm
}

fn aad(envelope: &Envelope, labels: &Labels, identity: &[u8]) -> Vec<u8> {
    let header = envelope.header();
    let mut aad = Vec::with_capacity(labels.aad.len() + header.len() + identity.len());
    aad.extend_from_slice(labels.aad);
    aad.extend_from_slice(&header);
    aad.extend_from_slice(identity);
    aad
}

/// Encrypts `buf` in place under the keyring's active key, with a fresh salt and nonce, and
/// moves the ciphertext into the envelope (no copy of the plaintext is left behind).
fn seal_buffer(
    keyring: &Keyring,
    labels: &Labels,
    identity: &[u8],
    mut buf: Zeroizing<Vec<u8>>,
) -> Result<Envelope, CryptoError> {
    let master = keyring.active();
    // Salt and nonce are stored in clear in the envelope: public randomness will do.
    let mut random = [0u8; SALT_LEN + NONCE_LEN];
    random_public_bytes(&mut random)?;
    let (salt, nonce) = random.split_at(SALT_LEN);
    let salt: [u8; SALT_LEN] = salt.try_into().expect("split at SALT_LEN");
    // The key is unique per write (fresh salt), so the nonce could be fixed; a random one costs
    // nothing and keeps us safe even if a salt ever repeated.
    let nonce: [u8; NONCE_LEN] = nonce.try_into().expect("the rest is NONCE_LEN");
    let key = derive_key(master, &salt, labels, identity);
    let mut envelope = Envelope {
        key_id: master.id().clone(),
        salt,
        nonce,
        ciphertext: Vec::new(),
    };
    let aad = aad(&envelope, labels, identity);
    let tag = aead::seal_in_place(&key, &nonce, &aad, &mut buf)
        .map_err(|_| CryptoError::AuthenticationFailed)?;
    // `buf` now holds ciphertext only; moving it out leaves no plaintext behind. It was sized
    // with room for the tag, so appending it does not reallocate.
    let mut ciphertext = std::mem::take(&mut *buf);
    ciphertext.extend_from_slice(&tag);
    envelope.ciphertext = ciphertext;
    Ok(envelope)
}

/// Decrypts an envelope sealed with `labels` for exactly `identity`, with whichever keyring key
/// sealed it, into a zeroizing buffer.
fn open_buffer(
    keyring: &Keyring,
    labels: &Labels,
    identity: &[u8],
    envelope: &Envelope,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    let master = keyring
        .get(&envelope.key_id)
        .ok_or_else(|| CryptoError::UnknownKey(envelope.key_id.to_string()))?;
    let key = derive_key(master, &envelope.salt, labels, identity);
    let aad = aad(envelope, labels, identity);
    let split = envelope
        .ciphertext
        .len()
        .checked_sub(TAG_LEN)
        .ok_or(CryptoError::MalformedEnvelope("shorter than its tag"))?;
    let (ct, tag) = envelope.ciphertext.split_at(split);
    let tag: &[u8; TAG_LEN] = tag.try_into().expect("split TAG_LEN from the end");
    let mut buf = Zeroizing::new(Vec::with_capacity(ct.len()));
    buf.extend_from_slice(ct);
    aead::open_in_place(&key, &envelope.nonce, &aad, &mut buf, tag)
        .map_err(|_| CryptoError::AuthenticationFailed)?;
    Ok(buf)
}

/// Plaintext encoding: entry count, then each key and value, all u32-length-prefixed. The exact
/// size is computed first so the buffer never reallocates (a reallocation would leave an
/// unzeroized copy of the plaintext behind).
pub(crate) fn encode_plaintext(data: &SecretData) -> Zeroizing<Vec<u8>> {
    let size = 4 + data
        .iter()
        .map(|(k, v)| 8 + k.as_str().len() + v.expose().len())
        .sum::<usize>();
    let mut buf = Zeroizing::new(Vec::with_capacity(size + TAG_LEN));
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    for (k, v) in data.iter() {
        for field in [k.as_str().as_bytes(), v.expose().as_bytes()] {
            buf.extend_from_slice(&(field.len() as u32).to_be_bytes());
            buf.extend_from_slice(field);
        }
    }
    buf
}

pub(crate) fn decode_plaintext(buf: &[u8]) -> Result<SecretData, CryptoError> {
    const BAD: CryptoError = CryptoError::MalformedEnvelope("decrypted data is not well formed");
    fn take<'b>(buf: &mut &'b [u8], n: usize) -> Option<&'b [u8]> {
        if buf.len() < n {
            return None;
        }
        let (head, tail) = buf.split_at(n);
        *buf = tail;
        Some(head)
    }
    fn take_len(buf: &mut &[u8]) -> Option<usize> {
        take(buf, 4).map(|b| u32::from_be_bytes(b.try_into().unwrap()) as usize)
    }
    let mut rest = buf;
    let count = take_len(&mut rest).ok_or(BAD)?;
    let mut map = std::collections::BTreeMap::new();
    for _ in 0..count {
        let klen = take_len(&mut rest).ok_or(BAD)?;
        let key = take(&mut rest, klen).ok_or(BAD)?;
        let vlen = take_len(&mut rest).ok_or(BAD)?;
        let value = take(&mut rest, vlen).ok_or(BAD)?;
        let key = std::str::from_utf8(key).map_err(|_| BAD)?;
        let key = DataKey::parse(key).map_err(|_| BAD)?;
        let value = SecretValue::new(std::str::from_utf8(value).map_err(|_| BAD)?.to_owned());
        map.insert(key, value);
    }
    if !rest.is_empty() {
        return Err(BAD);
    }
    SecretData::parse(map).map_err(|_| BAD)
}

/// Seals `data` for `identity` under the keyring's active key, with a fresh salt and nonce.
pub fn seal(
    keyring: &Keyring,
    identity: &SecretIdentity<'_>,
    data: &SecretData,
) -> Result<Envelope, CryptoError> {
    seal_buffer(
        keyring,
        &SECRET_DATA,
        &identity.encode(),
        encode_plaintext(data),
    )
}

/// Opens an envelope sealed for exactly `identity`, with whichever keyring key sealed it.
pub fn open(
    keyring: &Keyring,
    identity: &SecretIdentity<'_>,
    envelope: &Envelope,
) -> Result<SecretData, CryptoError> {
    let mut buf = open_buffer(keyring, &SECRET_DATA, &identity.encode(), envelope)?;
    let data = decode_plaintext(&buf);
    // In bulk now, so that `Zeroizing`'s byte-by-byte pass finds nothing left to do.
    wipe_bytes(&mut buf);
    data
}

/// The object a set of write records belongs to: kind, namespace and name, length-prefixed.
fn object_identity(kind: Kind, namespace: &Namespace, name: &Name) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + name.as_str().len());
    for field in [
        kind.as_str().as_bytes(),
        namespace.as_str().as_bytes(),
        name.as_str().as_bytes(),
    ] {
        out.extend_from_slice(&(field.len() as u32).to_be_bytes());
        out.extend_from_slice(field);
    }
    out
}

/// Seals the write records (idempotency memory) kept on an object where readers without the
/// right to see values can read the object: they hold keyed digests of requests, which must not
/// be readable, or movable to another object.
pub fn seal_write_records(
    keyring: &Keyring,
    kind: Kind,
    namespace: &Namespace,
    name: &Name,
    records: &[u8],
) -> Result<Envelope, CryptoError> {
    let mut buf = Zeroizing::new(Vec::with_capacity(records.len() + TAG_LEN));
    buf.extend_from_slice(records);
    seal_buffer(
        keyring,
        &WRITE_RECORDS,
        &object_identity(kind, namespace, name),
        buf,
    )
}

/// Opens what [`seal_write_records`] sealed for the same object.
pub fn open_write_records(
    keyring: &Keyring,
    kind: Kind,
    namespace: &Namespace,
    name: &Name,
    envelope: &Envelope,
) -> Result<Zeroizing<Vec<u8>>, CryptoError> {
    open_buffer(
        keyring,
        &WRITE_RECORDS,
        &object_identity(kind, namespace, name),
        envelope,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(json: &str) -> SecretData {
        serde_json::from_str(json).unwrap()
    }

    fn ident<'a>(ns: &'a Namespace, name: &'a Name, v: u64) -> SecretIdentity<'a> {
        SecretIdentity {
            kind: Kind::Secret,
            namespace: ns,
            name,
            version: Version::new(v).unwrap(),
        }
    }

    #[test]
    fn round_trip() {
        let ring = Keyring::generate().unwrap();
        let ns = Namespace::default_namespace();
        let name = Name::parse("db.password").unwrap();
        let d = data(r#"{"username":"admin","password":"s3cret","empty":""}"#);
        let env = seal(&ring, &ident(&ns, &name, 1), &d).unwrap();
        let bytes = env.to_bytes();
        let back = Envelope::from_bytes(&bytes).unwrap();
        assert_eq!(open(&ring, &ident(&ns, &name, 1), &back).unwrap(), d);
    }

    #[test]
    fn same_data_twice_gives_different_ciphertexts() {
        let ring = Keyring::generate().unwrap();
        let ns = Namespace::default_namespace();
        let name = Name::parse("x").unwrap();
        let d = data(r#"{"k":"v"}"#);
        let a = seal(&ring, &ident(&ns, &name, 1), &d).unwrap().to_bytes();
        let b = seal(&ring, &ident(&ns, &name, 1), &d).unwrap().to_bytes();
        assert_ne!(a, b);
    }

    #[test]
    fn tampering_wrong_key_and_swapped_identity_all_fail() {
        let ring = Keyring::generate().unwrap();
        let ns = Namespace::default_namespace();
        let other_ns = Namespace::parse("prod").unwrap();
        let name = Name::parse("db.password").unwrap();
        let other = Name::parse("db.passwore").unwrap();
        let d = data(r#"{"password":"s3cret"}"#);
        let env = seal(&ring, &ident(&ns, &name, 3), &d).unwrap();

        // Every single-byte flip anywhere in the envelope is detected.
        let bytes = env.to_bytes();
        for i in 0..bytes.len() {
            let mut t = bytes.clone();
            t[i] ^= 0x01;
            let opened =
                Envelope::from_bytes(&t).and_then(|e| open(&ring, &ident(&ns, &name, 3), &e));
            assert!(opened.is_err(), "flip at byte {i} went unnoticed");
        }
        // Wrong key with the same id (a keyring from another installation).
        let foreign =
            Keyring::with_active(MasterKey::from_bytes(ring.active().id().clone(), [7u8; 32]));
        assert!(matches!(
            open(&foreign, &ident(&ns, &name, 3), &env),
            Err(CryptoError::AuthenticationFailed)
        ));
        // Unknown key id.
        assert!(matches!(
            open(&Keyring::generate().unwrap(), &ident(&ns, &name, 3), &env),
            Err(CryptoError::UnknownKey(_))
        ));
        // Another name, namespace, version or kind.
        assert!(open(&ring, &ident(&ns, &other, 3), &env).is_err());
        assert!(open(&ring, &ident(&other_ns, &name, 3), &env).is_err());
        assert!(open(&ring, &ident(&ns, &name, 2), &env).is_err());
        let as_config = SecretIdentity {
            kind: Kind::Config,
            ..ident(&ns, &name, 3)
        };
        assert!(open(&ring, &as_config, &env).is_err());
    }

    #[test]
    fn write_records_open_only_for_their_object_and_never_as_secret_data() {
        let ring = Keyring::generate().unwrap();
        let ns = Namespace::default_namespace();
        let name = Name::parse("db").unwrap();
        let other = Name::parse("dc").unwrap();
        let env = seal_write_records(&ring, Kind::Secret, &ns, &name, b"[]").unwrap();
        assert_eq!(
            &open_write_records(&ring, Kind::Secret, &ns, &name, &env)
                .unwrap()
                .as_slice(),
            b"[]"
        );
        assert!(open_write_records(&ring, Kind::Secret, &ns, &other, &env).is_err());
        assert!(open_write_records(&ring, Kind::Config, &ns, &name, &env).is_err());
        assert!(open(&ring, &ident(&ns, &name, 1), &env).is_err());
    }

    #[test]
    fn retired_keys_still_open() {
        let mut ring = Keyring::generate().unwrap();
        let ns = Namespace::default_namespace();
        let name = Name::parse("x").unwrap();
        let d = data(r#"{"k":"v"}"#);
        let env = seal(&ring, &ident(&ns, &name, 1), &d).unwrap();
        ring.rotate_to(MasterKey::generate().unwrap());
        assert_eq!(open(&ring, &ident(&ns, &name, 1), &env).unwrap(), d);
        let newer = seal(&ring, &ident(&ns, &name, 2), &d).unwrap();
        assert_eq!(newer.key_id(), ring.active().id());
    }
}
