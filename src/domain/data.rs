//! The key/value data of secrets and configs, with the limits that apply to both.

use serde::de::{self, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::collections::BTreeMap;
use std::fmt;
use zeroize::Zeroize;

use super::DomainError;

/// The most data one secret or config may hold, counting the bytes of every key and value:
/// 1 MiB, the same ceiling as a Kubernetes Secret or ConfigMap, so anything stored here can also
/// be projected into one.
pub const MAX_DATA_BYTES: usize = 1024 * 1024;

const KEY_RULE: &str = "data keys are 1-253 characters of letters, digits, '-', '_' and '.' (as in a Kubernetes Secret)";

/// A key in a data map. Keys are not secret: they appear in errors and in the audit log's
/// reasons, values never do.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct DataKey(String);

impl DataKey {
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        let ok = !s.is_empty()
            && s.len() <= 253
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if !ok {
            return Err(DomainError::new(format!(
                "data key {s:?} is invalid: {KEY_RULE}"
            )));
        }
        Ok(DataKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// One secret value: wiped from memory when dropped, and never printed by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretValue(String);

impl SecretValue {
    pub fn new(s: String) -> Self {
        SecretValue(s)
    }

    /// The plaintext. Call only to seal it or to answer an authorized read.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl Drop for SecretValue {
    fn drop(&mut self) {
        wipe_bytes(&mut std::mem::take(&mut self.0).into_bytes());
    }
}

/// Zeroes a buffer's whole allocation, length and spare capacity, in one bulk fill behind an
/// optimisation barrier, and leaves it empty. `zeroize`'s own `Vec` impl writes the initialised
/// part byte by byte with volatile stores, which was a sixth of opening a 1 KiB secret
/// (BENCHMARKS.md, "Seal and open"); the spare-capacity path it also has is the bulk one.
pub fn wipe_bytes(buf: &mut Vec<u8>) {
    buf.clear();
    buf.spare_capacity_mut().zeroize();
}

impl fmt::Debug for SecretValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

impl Serialize for SecretValue {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// The data of a secret: a non-empty map of keys to secret values, at most [`MAX_DATA_BYTES`].
#[derive(Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct SecretData(BTreeMap<DataKey, SecretValue>);

impl SecretData {
    pub fn parse(entries: BTreeMap<DataKey, SecretValue>) -> Result<Self, DomainError> {
        if entries.is_empty() {
            return Err(DomainError::new(
                "data is empty: give at least one key with a value",
            ));
        }
        check_limits(entries.iter().map(|(k, v)| (k, v.expose().len())))?;
        Ok(SecretData(entries))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DataKey, &SecretValue)> {
        self.0.iter()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&SecretValue> {
        self.0.get(&DataKey(key.to_owned()))
    }
}

impl fmt::Debug for SecretData {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map()
            .entries(self.0.keys().map(|k| (k, "[redacted]")))
            .finish()
    }
}

/// The data of a config: plain, non-sensitive settings with the same shape and limits. Unlike a
/// secret's, it may be empty, as a ConfigMap's may.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct ConfigData(BTreeMap<DataKey, String>);

impl ConfigData {
    pub fn parse(entries: BTreeMap<DataKey, String>) -> Result<Self, DomainError> {
        check_limits(entries.iter().map(|(k, v)| (k, v.len())))?;
        Ok(ConfigData(entries))
    }

    pub fn iter(&self) -> impl Iterator<Item = (&DataKey, &String)> {
        self.0.iter()
    }

    pub fn get(&self, key: &str) -> Option<&String> {
        self.0.get(&DataKey(key.to_owned()))
    }
}

fn check_limits<'a>(
    entries: impl Iterator<Item = (&'a DataKey, usize)>,
) -> Result<(), DomainError> {
    let total: usize = entries
        .map(|(key, value_len)| key.0.len() + value_len)
        .sum();
    if total > MAX_DATA_BYTES {
        return Err(DomainError::new(format!(
            "data is {total} bytes (keys plus values); the limit is {MAX_DATA_BYTES} bytes (1 MiB)"
        )));
    }
    Ok(())
}

/// Reads a JSON object of string values without ever quoting a value in an error: serde's own
/// messages echo the offending value ("invalid type: string \"s3cret\""), which for a secret
/// would leak it into logs and responses.
struct DataMapVisitor;

enum StringOrKind {
    String(String),
    Other(&'static str),
}

struct StringOrKindVisitor;

impl<'de> Visitor<'de> for StringOrKindVisitor {
    type Value = StringOrKind;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<StringOrKind, E> {
        Ok(StringOrKind::String(v.to_owned()))
    }
    fn visit_string<E: de::Error>(self, v: String) -> Result<StringOrKind, E> {
        Ok(StringOrKind::String(v))
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<StringOrKind, E> {
        Ok(StringOrKind::Other("a boolean"))
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<StringOrKind, E> {
        Ok(StringOrKind::Other("a number"))
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<StringOrKind, E> {
        Ok(StringOrKind::Other("a number"))
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<StringOrKind, E> {
        Ok(StringOrKind::Other("a number"))
    }
    fn visit_unit<E: de::Error>(self) -> Result<StringOrKind, E> {
        Ok(StringOrKind::Other("null"))
    }
    fn visit_none<E: de::Error>(self) -> Result<StringOrKind, E> {
        Ok(StringOrKind::Other("null"))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<StringOrKind, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(StringOrKind::Other("an object"))
    }
    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<StringOrKind, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(StringOrKind::Other("an array"))
    }
}

impl<'de> Deserialize<'de> for StringOrKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(StringOrKindVisitor)
    }
}

impl<'de> Visitor<'de> for DataMapVisitor {
    type Value = BTreeMap<DataKey, SecretValue>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of string values")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut out = BTreeMap::new();
        while let Some(key) = map.next_key::<String>()? {
            let key = DataKey::parse(&key).map_err(de::Error::custom)?;
            match map.next_value::<StringOrKind>()? {
                StringOrKind::String(v) => {
                    let value = SecretValue::new(v);
                    if out.insert(key.clone(), value).is_some() {
                        return Err(de::Error::custom(format!(
                            "data has the key {:?} twice",
                            key.as_str()
                        )));
                    }
                }
                StringOrKind::Other(kind) => {
                    return Err(de::Error::custom(format!(
                        "data value of key {:?} must be a string, not {kind}",
                        key.as_str()
                    )));
                }
            }
        }
        Ok(out)
    }
}

fn data_map_from<'de, D: Deserializer<'de>>(
    d: D,
) -> Result<BTreeMap<DataKey, SecretValue>, D::Error> {
    struct Outer;
    impl<'de> Visitor<'de> for Outer {
        type Value = BTreeMap<DataKey, SecretValue>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("data as an object of string values")
        }
        fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
            DataMapVisitor.visit_map(map)
        }
        // Every other JSON type is rejected without echoing it.
        fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
            Err(E::custom(
                "data must be an object of string values, not a string",
            ))
        }
        fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
            Err(E::custom(
                "data must be an object of string values, not a boolean",
            ))
        }
        fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
            Err(E::custom(
                "data must be an object of string values, not a number",
            ))
        }
        fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
            Err(E::custom(
                "data must be an object of string values, not a number",
            ))
        }
        fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
            Err(E::custom(
                "data must be an object of string values, not a number",
            ))
        }
        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Err(E::custom(
                "data must be an object of string values, not null",
            ))
        }
        fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            Err(de::Error::custom(
                "data must be an object of string values, not an array",
            ))
        }
    }
    d.deserialize_any(Outer)
}

impl<'de> Deserialize<'de> for SecretData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let map = data_map_from(d)?;
        SecretData::parse(map).map_err(de::Error::custom)
    }
}

impl<'de> Deserialize<'de> for ConfigData {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        // Config values are not secret, but sharing the reader keeps the two kinds' rules and
        // messages identical.
        let map = data_map_from(d)?;
        let plain = map
            .into_iter()
            .map(|(k, v)| (k, v.expose().to_owned()))
            .collect();
        ConfigData::parse(plain).map_err(de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)] // reads the buffer's allocation after the wipe, to see it is zero
    fn wipe_bytes_zeroes_the_whole_allocation_and_keeps_it() {
        let mut buf = Vec::with_capacity(100);
        buf.extend_from_slice(b"correct horse battery staple");
        let (ptr, capacity) = (buf.as_ptr(), buf.capacity());
        wipe_bytes(&mut buf);
        assert!(buf.is_empty());
        assert_eq!((buf.as_ptr(), buf.capacity()), (ptr, capacity));
        // SAFETY: the allocation is `capacity` bytes, all written (with zeros) by the wipe.
        let all = unsafe { std::slice::from_raw_parts(buf.as_ptr(), capacity) };
        assert!(all.iter().all(|&b| b == 0), "a byte survived: {all:?}");
    }

    #[test]
    fn wrong_value_types_are_named_but_never_quoted() {
        let err = serde_json::from_str::<SecretData>(r#"{"pin": 918273}"#).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("\"pin\" must be a string, not a number"),
            "{msg}"
        );
        assert!(!msg.contains("918273"), "{msg}");
        let err = serde_json::from_str::<SecretData>(r#""hunter2-canary""#).unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn empty_oversize_and_duplicate_data_are_rejected() {
        assert!(serde_json::from_str::<SecretData>("{}").is_err());
        // A config may be empty, as a ConfigMap may.
        assert!(serde_json::from_str::<ConfigData>("{}").is_ok());
        let big = format!(r#"{{"k": "{}"}}"#, "x".repeat(MAX_DATA_BYTES));
        let err = serde_json::from_str::<SecretData>(&big).unwrap_err();
        assert!(err.to_string().contains("1 MiB"), "{err}");
        let err = serde_json::from_str::<SecretData>(r#"{"a":"1","a":"2"}"#).unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let err = serde_json::from_str::<ConfigData>(r#"{"bad key":"1"}"#).unwrap_err();
        assert!(err.to_string().contains("data key"), "{err}");
    }

    #[test]
    fn debug_never_prints_values() {
        let d: SecretData = serde_json::from_str(r#"{"password":"s3cret"}"#).unwrap();
        let dbg = format!("{d:?}");
        assert!(dbg.contains("password") && !dbg.contains("s3cret"), "{dbg}");
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"password":"s3cret"}"#
        );
    }
}
