//! What one stored entry holds, and its on-disk encoding.
//!
//! An entry file (format 2) is one JSON object whose last field, `mac`, is HMAC-SHA256 over the
//! entry's kind and every byte before that field, under a key derived from the master key the
//! file names (`keyId`). So nothing in it (names, version, allowed workloads, the object's uid,
//! the remembered writes, the store generation) can be changed on disk without the change being
//! found at start-up. Format 1 (before entries were authenticated) is read only to migrate it.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

use super::writes::WriteRecord;
use crate::crypto::{Envelope, KeyId, Keyring, MacKey, Purpose};
use crate::domain::{ConfigData, Kind, Name, Namespace, ObjectKey, Version, WorkloadSet};

/// A stored secret: metadata in clear (authenticated), data only as a sealed envelope.
#[derive(Debug, Clone)]
pub struct SecretRecord {
    pub key: ObjectKey,
    pub version: Version,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub allowed_workloads: WorkloadSet,
    pub envelope: Envelope,
    /// The Kubernetes object (and the state of it) this entry mirrors; None in dev mode.
    pub origin: Option<Origin>,
    /// The idempotent writes that led here, within their retention.
    pub writes: Vec<WriteRecord>,
    /// The store's write counter when this entry was written; set by the store on every put
    /// (what a caller passes in is ignored). It is the entry's high-water mark in the manifest.
    pub generation: u64,
}

/// A stored config: plain data (the seed: configs are not encrypted), authenticated like a
/// secret's metadata.
#[derive(Debug, Clone)]
pub struct ConfigRecord {
    pub key: ObjectKey,
    pub data: ConfigData,
    pub immutable: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    /// The Kubernetes object (and the state of it) this entry mirrors; None in dev mode.
    pub origin: Option<Origin>,
    pub writes: Vec<WriteRecord>,
    pub generation: u64,
}

/// A Kubernetes object's uid. The API server makes them as UUIDs in their canonical form
/// (`8-4-4-4-12` lowercase hex digits), which this holds as their 16 bytes, not as 36 bytes of
/// text on the heap: a node's store keeps one per entry. Any other text is kept as it is, so a
/// uid always reads back exactly as it was given, and two uids are equal when their texts are.
#[derive(Clone, PartialEq, Eq)]
pub struct Uid(UidForm);

#[derive(Clone, PartialEq, Eq)]
enum UidForm {
    Uuid([u8; 16]),
    Text(Box<str>),
}

/// Where a canonical UUID has its dashes.
const UUID_DASHES: [usize; 4] = [8, 13, 18, 23];

impl Uid {
    pub fn new(text: &str) -> Uid {
        Uid(match Self::canonical_uuid(text) {
            Some(bytes) => UidForm::Uuid(bytes),
            None => UidForm::Text(text.into()),
        })
    }

    /// The 16 bytes of `text` if it is a UUID written exactly as [`Uid::with_text`] writes one
    /// back (lowercase, dashed), else `None`.
    fn canonical_uuid(text: &str) -> Option<[u8; 16]> {
        let t = text.as_bytes();
        if t.len() != 36 || UUID_DASHES.iter().any(|&i| t[i] != b'-') {
            return None;
        }
        let mut digits = t
            .iter()
            .enumerate()
            .filter(|(i, _)| !UUID_DASHES.contains(i))
            .map(|(_, &c)| crate::hex::value(c));
        let mut bytes = [0u8; 16];
        for byte in &mut bytes {
            *byte = (digits.next()?? << 4) | digits.next()??;
        }
        Some(bytes)
    }

    /// Calls `f` with the uid's text (written on the stack for a UUID: no allocation).
    pub fn with_text<T>(&self, f: impl FnOnce(&str) -> T) -> T {
        match &self.0 {
            UidForm::Text(text) => f(text),
            UidForm::Uuid(bytes) => {
                let mut digits = bytes.iter().flat_map(|b| [b >> 4, *b]);
                let mut text = [b'-'; 36];
                for (i, slot) in text.iter_mut().enumerate() {
                    if !UUID_DASHES.contains(&i) {
                        *slot = crate::hex::digit(digits.next().unwrap_or(0));
                    }
                }
                f(std::str::from_utf8(&text).expect("hex digits and dashes are ASCII"))
            }
        }
    }
}

impl std::fmt::Display for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.with_text(|text| f.write_str(text))
    }
}

impl std::fmt::Debug for Uid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.with_text(|text| write!(f, "{text:?}"))
    }
}

impl PartialEq<str> for Uid {
    fn eq(&self, other: &str) -> bool {
        match &self.0 {
            UidForm::Text(text) => **text == *other,
            UidForm::Uuid(bytes) => Self::canonical_uuid(other).is_some_and(|b| b == *bytes),
        }
    }
}

/// Which Kubernetes object, and which state of it, a stored entry mirrors: what decides
/// whether an event the agent receives is news or a leftover (see `Origin::newer_than`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    /// The object's uid: a deleted and re-created object under the same name has another, and
    /// starts its own version history.
    pub uid: Uid,
    /// The object's `resourceVersion` when this copy was taken, when it is a number (it is
    /// etcd's revision of the write: it grows with every write to any object of the kind, so a
    /// re-created object's is above everything its predecessor ever had). `None` from an API
    /// server whose versions are not numbers, and in entries written before it was kept.
    pub revision: Option<u64>,
}

impl Origin {
    /// The origin of an object with this uid and `resourceVersion`.
    pub fn of(uid: &str, resource_version: Option<&str>) -> Origin {
        Origin {
            uid: Uid::new(uid),
            revision: resource_version.and_then(|rv| rv.parse().ok()),
        }
    }

    /// Whether this state of an object is known to come after `other`'s (false when either
    /// revision is unknown: then only the uid and the secret's version can decide).
    pub fn newer_than(&self, other: &Origin) -> bool {
        matches!((self.revision, other.revision), (Some(a), Some(b)) if a > b)
    }

    fn to_file(origin: Option<&Origin>) -> (Option<String>, Option<u64>) {
        match origin {
            Some(o) => (Some(o.uid.to_string()), o.revision),
            None => (None, None),
        }
    }

    fn from_file(uid: Option<String>, revision: Option<u64>) -> Option<Origin> {
        uid.map(|uid| Origin {
            uid: Uid::new(&uid),
            revision,
        })
    }
}

const FORMAT: u32 = 2;
const LEGACY_FORMAT: u32 = 1;
const MAC_FIELD: &str = "mac";

/// The entry-authentication keys of every master key in a keyring, derived once per start-up.
pub(crate) struct EntryKeys(HashMap<KeyId, MacKey>);

impl EntryKeys {
    pub(crate) fn of(keyring: &Keyring) -> Self {
        EntryKeys(
            keyring
                .key_ids()
                .filter_map(|id| {
                    MacKey::for_key(keyring, id, Purpose::StoreEntry)
                        .ok()
                        .map(|k| (id.clone(), k))
                })
                .collect(),
        )
    }
}

/// What decoding an entry file gave.
pub(crate) enum Decoded<R> {
    /// A format-2 entry whose MAC checked out.
    Authentic(R),
    /// A format-1 entry: nothing vouches for it; only a migration may accept it.
    Legacy(R),
    /// An entry authenticated with a master key the keyring does not hold: the keyring is not
    /// the one that wrote the store (a lost or replaced master key), not a sign of tampering.
    ForeignKey(KeyId),
}

/// What the MAC of an entry file says.
enum Body {
    /// The body, and the master key its MAC is under.
    Authentic(Vec<u8>, KeyId),
    /// No MAC at all (format 1).
    Unauthenticated,
    ForeignKey(KeyId),
}

fn seal(kind: Kind, body: Vec<u8>, mac: &MacKey) -> Vec<u8> {
    let tag = mac.tag(&[kind.as_str().as_bytes(), &body]);
    crate::trailer::append(&body, MAC_FIELD, &tag)
}

/// Checks the MAC of an entry file and returns the body it covers, or `None` if the file has
/// no MAC (format 1).
fn authenticated_body(kind: Kind, bytes: &[u8], keys: &EntryKeys) -> Result<Body, String> {
    let Some((body, tag)) = crate::trailer::split(bytes, MAC_FIELD) else {
        return Ok(Body::Unauthenticated);
    };
    let key_id = key_id_of(&body)?;
    let Some(key) = keys.0.get(&key_id) else {
        return Ok(Body::ForeignKey(key_id));
    };
    if !key.verify(&[kind.as_str().as_bytes(), &body], &tag) {
        return Err(
            "its MAC does not match its content (edited, or written with another keyring)"
                .to_owned(),
        );
    }
    Ok(Body::Authentic(body, key_id))
}

/// The `keyId` of an entry body, read before the body is trusted (it only picks the key).
fn key_id_of(body: &[u8]) -> Result<KeyId, String> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct KeyIdOnly {
        key_id: KeyId,
    }
    serde_json::from_slice::<KeyIdOnly>(body)
        .map(|k| k.key_id)
        .map_err(|e| format!("its keyId cannot be read (column {})", e.column()))
}

fn parse_error(what: &str, e: serde_json::Error) -> String {
    // serde's message may quote the offending text; the position says enough.
    format!(
        "not a {what} entry (column {}: {:?})",
        e.column(),
        e.classify()
    )
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SecretFile {
    format: u32,
    namespace: Namespace,
    name: Name,
    version: Version,
    created_at: Timestamp,
    updated_at: Timestamp,
    allowed_workloads: WorkloadSet,
    /// Base64 of the envelope bytes (see `crypto::envelope`).
    envelope: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin_revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    writes: Vec<WriteRecord>,
    generation: u64,
    key_id: KeyId,
}

/// Format 1, read for migration only. Its `lastWrite` (the old idempotency mark, keyed with
/// the active master key) is dropped: it cannot be trusted, and it was bound to nothing.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LegacySecretFile {
    format: u32,
    namespace: Namespace,
    name: Name,
    version: Version,
    created_at: Timestamp,
    updated_at: Timestamp,
    allowed_workloads: WorkloadSet,
    envelope: String,
    #[serde(default, rename = "lastWrite")]
    _last_write: Option<serde_json::Value>,
    #[serde(default)]
    origin: Option<String>,
}

fn decode_envelope(b64: &str) -> Result<Envelope, String> {
    B64.decode(b64.as_bytes())
        .map_err(|_| "envelope is not base64".to_owned())
        .and_then(|b| Envelope::from_bytes(&b).map_err(|e| e.to_string()))
}

impl SecretRecord {
    pub(crate) fn to_file_bytes(&self, mac: &MacKey) -> Vec<u8> {
        let origin = Origin::to_file(self.origin.as_ref());
        let file = SecretFile {
            format: FORMAT,
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            allowed_workloads: self.allowed_workloads.clone(),
            envelope: B64.encode(self.envelope.to_bytes()),
            origin: origin.0,
            origin_revision: origin.1,
            writes: self.writes.clone(),
            generation: self.generation,
            key_id: mac.key_id().clone(),
        };
        let body = serde_json::to_vec(&file).expect("a secret record serializes");
        seal(Kind::Secret, body, mac)
    }

    #[cfg(test)]
    pub(crate) fn from_file_bytes(bytes: &[u8], keys: &EntryKeys) -> Result<Decoded<Self>, String> {
        Self::from_file_bytes_keyed(bytes, keys).map(|(decoded, _)| decoded)
    }

    /// [`Self::from_file_bytes`], and the master key the file's MAC is under (`None` for an
    /// unauthenticated, format-1 file).
    pub(crate) fn from_file_bytes_keyed(
        bytes: &[u8],
        keys: &EntryKeys,
    ) -> Result<(Decoded<Self>, Option<KeyId>), String> {
        let (body, key_id) = match authenticated_body(Kind::Secret, bytes, keys)? {
            Body::ForeignKey(id) => return Ok((Decoded::ForeignKey(id.clone()), Some(id))),
            Body::Unauthenticated => (None, None),
            Body::Authentic(body, key_id) => (Some(body), Some(key_id)),
        };
        if let Some(body) = body {
            let file: SecretFile =
                serde_json::from_slice(&body).map_err(|e| parse_error("secret", e))?;
            check_format(file.format, FORMAT)?;
            return Ok((
                Decoded::Authentic(SecretRecord {
                    key: ObjectKey::new(file.namespace, file.name),
                    version: file.version,
                    created_at: file.created_at,
                    updated_at: file.updated_at,
                    allowed_workloads: file.allowed_workloads,
                    envelope: decode_envelope(&file.envelope)?,
                    origin: Origin::from_file(file.origin, file.origin_revision),
                    writes: file.writes,
                    generation: file.generation,
                }),
                key_id,
            ));
        }
        let file: LegacySecretFile =
            serde_json::from_slice(bytes).map_err(|e| parse_error("secret", e))?;
        check_format(file.format, LEGACY_FORMAT)?;
        Ok((
            Decoded::Legacy(SecretRecord {
                key: ObjectKey::new(file.namespace, file.name),
                version: file.version,
                created_at: file.created_at,
                updated_at: file.updated_at,
                allowed_workloads: file.allowed_workloads,
                envelope: decode_envelope(&file.envelope)?,
                origin: Origin::from_file(file.origin, None),
                writes: Vec::new(),
                generation: 0,
            }),
            None,
        ))
    }
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    format: u32,
    namespace: Namespace,
    name: Name,
    data: ConfigData,
    immutable: bool,
    created_at: Timestamp,
    updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin_revision: Option<u64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    writes: Vec<WriteRecord>,
    generation: u64,
    key_id: KeyId,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct LegacyConfigFile {
    format: u32,
    namespace: Namespace,
    name: Name,
    data: ConfigData,
    immutable: bool,
    created_at: Timestamp,
    updated_at: Timestamp,
    #[serde(default, rename = "lastWrite")]
    _last_write: Option<serde_json::Value>,
    #[serde(default)]
    origin: Option<String>,
}

fn check_format(format: u32, expected: u32) -> Result<(), String> {
    if format != expected {
        return Err(format!(
            "entry file format {format} is not supported by this build (it reads format {FORMAT}, and migrates format {LEGACY_FORMAT})"
        ));
    }
    Ok(())
}

impl ConfigRecord {
    pub(crate) fn to_file_bytes(&self, mac: &MacKey) -> Vec<u8> {
        let origin = Origin::to_file(self.origin.as_ref());
        let file = ConfigFile {
            format: FORMAT,
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            data: self.data.clone(),
            immutable: self.immutable,
            created_at: self.created_at,
            updated_at: self.updated_at,
            origin: origin.0,
            origin_revision: origin.1,
            writes: self.writes.clone(),
            generation: self.generation,
            key_id: mac.key_id().clone(),
        };
        let body = serde_json::to_vec(&file).expect("a config record serializes");
        seal(Kind::Config, body, mac)
    }

    #[cfg(test)]
    pub(crate) fn from_file_bytes(bytes: &[u8], keys: &EntryKeys) -> Result<Decoded<Self>, String> {
        Self::from_file_bytes_keyed(bytes, keys).map(|(decoded, _)| decoded)
    }

    /// [`Self::from_file_bytes`], and the master key the file's MAC is under (`None` for an
    /// unauthenticated, format-1 file).
    pub(crate) fn from_file_bytes_keyed(
        bytes: &[u8],
        keys: &EntryKeys,
    ) -> Result<(Decoded<Self>, Option<KeyId>), String> {
        let (body, key_id) = match authenticated_body(Kind::Config, bytes, keys)? {
            Body::ForeignKey(id) => return Ok((Decoded::ForeignKey(id.clone()), Some(id))),
            Body::Unauthenticated => (None, None),
            Body::Authentic(body, key_id) => (Some(body), Some(key_id)),
        };
        if let Some(body) = body {
            let file: ConfigFile =
                serde_json::from_slice(&body).map_err(|e| parse_error("config", e))?;
            check_format(file.format, FORMAT)?;
            return Ok((
                Decoded::Authentic(ConfigRecord {
                    key: ObjectKey::new(file.namespace, file.name),
                    data: file.data,
                    immutable: file.immutable,
                    created_at: file.created_at,
                    updated_at: file.updated_at,
                    origin: Origin::from_file(file.origin, file.origin_revision),
                    writes: file.writes,
                    generation: file.generation,
                }),
                key_id,
            ));
        }
        let file: LegacyConfigFile =
            serde_json::from_slice(bytes).map_err(|e| parse_error("config", e))?;
        check_format(file.format, LEGACY_FORMAT)?;
        Ok((
            Decoded::Legacy(ConfigRecord {
                key: ObjectKey::new(file.namespace, file.name),
                data: file.data,
                immutable: file.immutable,
                created_at: file.created_at,
                updated_at: file.updated_at,
                origin: Origin::from_file(file.origin, None),
                writes: Vec::new(),
                generation: 0,
            }),
            None,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_uid_reads_back_exactly_as_it_was_given() {
        let given = [
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "00000000-0000-0000-0000-000000000000",
            "ffffffff-ffff-ffff-ffff-ffffffffffff",
            // Not in the canonical form: kept as text, never rewritten.
            "0F8FAD5B-D9CB-469F-A165-70867728950E",
            "0f8fad5bd9cb469fa16570867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950",
            "0f8fad5b-d9cb-469f-a165-70867728950g",
            "0f8fad5b_d9cb-469f-a165-70867728950e",
            "",
            "u-1",
        ];
        for text in given {
            let uid = Uid::new(text);
            assert_eq!(uid.to_string(), text);
            assert!(uid == *text, "{text}");
            assert_eq!(format!("{uid:?}"), format!("{text:?}"));
        }
        assert!(matches!(Uid::new(given[0]).0, UidForm::Uuid(_)));
        assert!(matches!(Uid::new(given[3]).0, UidForm::Text(_)));
    }

    #[test]
    fn uids_are_equal_exactly_when_their_texts_are() {
        let a = Uid::new("0f8fad5b-d9cb-469f-a165-70867728950e");
        assert_eq!(a, Uid::new("0f8fad5b-d9cb-469f-a165-70867728950e"));
        assert_ne!(a, Uid::new("0f8fad5b-d9cb-469f-a165-70867728950f"));
        assert_ne!(a, Uid::new("0F8FAD5B-D9CB-469F-A165-70867728950E"));
        assert!(a != *"0F8FAD5B-D9CB-469F-A165-70867728950E");
        assert!(a != *"u-1");
        assert!(Uid::new("u-1") == *"u-1");
        assert!(Uid::new("u-1") != *"u-2");
    }

    #[test]
    fn a_uuid_uid_is_held_without_text_on_the_heap() {
        assert!(std::mem::size_of::<Uid>() <= 24);
        assert_eq!(std::mem::size_of::<Origin>(), 40);
    }
}
