//! kubectl's client-side apply keeps the whole applied manifest in an annotation, so a
//! ClawSecret applied with plaintext `spec.data` carries that plaintext a second time there.
//! This module rewrites the annotation without `spec.data`, and without the plaintext ever
//! becoming a value of its own: the parser skips `spec.data` token by token (serde's
//! `IgnoredAny`) and keeps every other field as the raw JSON text it was, so no map, string or
//! generic JSON value holding a secret is built (the annotation itself, and the request it came
//! in, are the caller's to wipe).
//!
//! Dropping `data` from the annotation is what kubectl itself would do with a field it never
//! applied: the next `kubectl apply` of the same manifest sends `data` again (it is "new" to
//! kubectl), and the operator recognises it as the current version's data by its digest.

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use std::fmt;

/// The annotation kubectl's client-side apply writes.
pub const ANNOTATION: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// The annotation's manifest with `spec.data` left out; `None` when it is not a JSON object
/// (the annotation should then be removed: it may hold plaintext, and kubectl recreates it on
/// the next apply).
pub fn without_plaintext(applied: &str) -> Option<String> {
    let manifest: Manifest = serde_json::from_str(applied).ok()?;
    serde_json::to_string(&manifest.0).ok()
}

/// Fields of a JSON object in their order, values as raw JSON.
type Fields = Vec<(String, Box<RawValue>)>;

/// The manifest: every field raw, except `spec`, read as a [`Spec`].
struct Manifest(serde_json::Map<String, serde_json::Value>);

/// A `spec` with `data` skipped: its other fields, raw.
struct Spec(Fields);

impl<'de> serde::Deserialize<'de> for Manifest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Manifest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a manifest (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Manifest, A::Error> {
                let mut out = serde_json::Map::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value = if key == "spec" {
                        let spec: Spec = map.next_value()?;
                        raw_object(spec.0).map_err(de::Error::custom)?
                    } else {
                        // Not secret: metadata, kind, apiVersion, status.
                        map.next_value::<serde_json::Value>()?
                    };
                    out.insert(key, value);
                }
                Ok(Manifest(out))
            }
        }
        d.deserialize_map(V)
    }
}

impl<'de> serde::Deserialize<'de> for Spec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Spec;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a spec (a JSON object)")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Spec, A::Error> {
                let mut fields = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    if key == "data" {
                        map.next_value::<IgnoredAny>()?;
                    } else {
                        fields.push((key, map.next_value::<Box<RawValue>>()?));
                    }
                }
                Ok(Spec(fields))
            }
        }
        d.deserialize_map(V)
    }
}

/// A JSON object of raw fields, as a value (it holds no plaintext: `data` is not among them).
fn raw_object(fields: Fields) -> Result<serde_json::Value, serde_json::Error> {
    let mut out = serde_json::Map::new();
    for (key, raw) in fields {
        out.insert(key, serde_json::from_str(raw.get())?);
    }
    Ok(serde_json::Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[test]
    fn spec_data_is_dropped_and_everything_else_kept() {
        let applied = json!({
            "apiVersion": "clawbernetes.io/v1beta1",
            "kind": "ClawSecret",
            "metadata": {"name": "db", "namespace": "team", "annotations": {"a": "b"}},
            "spec": {
                "data": {"password": "canary-\u{e9}-\"quoted\""},
                "allowedWorkloads": ["api"],
                "encryptedData": "AQID",
            },
        })
        .to_string();
        let out = without_plaintext(&applied).unwrap();
        assert!(!out.contains("canary"), "{out}");
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            v,
            json!({
                "apiVersion": "clawbernetes.io/v1beta1",
                "kind": "ClawSecret",
                "metadata": {"name": "db", "namespace": "team", "annotations": {"a": "b"}},
                "spec": {"allowedWorkloads": ["api"], "encryptedData": "AQID"},
            })
        );
    }

    #[test]
    fn an_annotation_that_is_not_a_manifest_is_to_be_removed() {
        for bad in [
            "",
            "[1]",
            "{\"spec\": 3}",
            "{\"spec\": {\"data\": {\"k\": \"v\"}}",
        ] {
            assert_eq!(without_plaintext(bad), None, "{bad:?}");
        }
        assert_eq!(
            without_plaintext("{\"spec\":{\"data\":{\"k\":\"v\"}}}").as_deref(),
            Some("{\"spec\":{}}")
        );
    }
}
