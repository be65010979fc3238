//! Wrapping with an external KMS through the Kubernetes KMS v2 plugin protocol (the gRPC API
//! kube-apiserver uses for encryption at rest): [`proto`] hand-encodes its messages,
//! [`client`] calls a plugin on its Unix socket, and [`Wrapped`] is what is stored of an
//! `EncryptResponse` (docs/crypto.md, "Keyring": the keyring Secret's `keyring.kms.json`).

pub mod client;
pub mod proto;

pub use client::KmsPlugin;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long one call to the plugin may take (kube-apiserver's default for KMS v2 is 3 s).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// The flag every command that reads or writes the keyring takes, for messages.
pub const FLAG: &str = "--kms-plugin";
/// Its environment variable.
pub const ENV: &str = "CLAW_SECRETS_KMS_PLUGIN";

#[derive(Debug, thiserror::Error)]
pub enum KmsError {
    #[error("--kms-plugin {endpoint:?}: {reason}")]
    Endpoint { endpoint: String, reason: String },
    #[error(
        "cannot reach the KMS plugin at {endpoint}: {source}; start the plugin, or make its socket reachable at that path (--kms-plugin, {ENV})"
    )]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the KMS plugin at {endpoint} did not answer {method} within {after:?}; check the plugin and the KMS behind it"
    )]
    Timeout {
        endpoint: String,
        method: &'static str,
        after: Duration,
    },
    #[error("calling {method} on the KMS plugin at {endpoint} failed: {reason}")]
    Transport {
        endpoint: String,
        method: &'static str,
        reason: String,
    },
    #[error(
        "the KMS plugin at {endpoint} refused {method}: {name} ({code}): {message}; see the plugin's log"
    )]
    Status {
        endpoint: String,
        method: &'static str,
        code: u32,
        name: &'static str,
        message: String,
    },
    #[error(
        "the KMS plugin at {endpoint} answered {method} with something this client cannot use: {reason}; is it a Kubernetes KMS v2 plugin?"
    )]
    Protocol {
        endpoint: String,
        method: &'static str,
        reason: String,
    },
    #[error(
        "the KMS plugin at {endpoint} reports itself unhealthy (healthz {healthz:?}); see the plugin's log"
    )]
    Unhealthy { endpoint: String, healthz: String },
    #[error("the wrapped keyring is invalid: {0}")]
    Document(String),
}

/// What is stored of an `EncryptResponse`: everything `Decrypt` needs back. JSON, with the
/// bytes in base64: `{"format": "kms-v2", "keyId": ..., "ciphertext": ..., "annotations":
/// {name: base64}}`. None of it is secret (the KMS holds the key that opens it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    pub key_id: String,
    pub ciphertext: Vec<u8>,
    pub annotations: BTreeMap<String, Vec<u8>>,
}

/// The `format` of [`Wrapped`]'s JSON.
pub const FORMAT: &str = "kms-v2";

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WrappedJson {
    format: String,
    key_id: String,
    ciphertext: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

impl Wrapped {
    pub fn to_json(&self) -> Vec<u8> {
        let doc = WrappedJson {
            format: FORMAT.to_owned(),
            key_id: self.key_id.clone(),
            ciphertext: STANDARD.encode(&self.ciphertext),
            annotations: self
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), STANDARD.encode(v)))
                .collect(),
        };
        serde_json::to_vec(&doc).expect("a map of strings serializes")
    }

    pub fn from_json(json: &[u8]) -> Result<Self, KmsError> {
        let bad = |what: &str| KmsError::Document(what.to_owned());
        let doc: WrappedJson =
            serde_json::from_slice(json).map_err(|e| KmsError::Document(e.to_string()))?;
        if doc.format != FORMAT {
            return Err(KmsError::Document(format!(
                "format {:?}, expected {FORMAT:?}",
                doc.format
            )));
        }
        let decode = |s: &str| STANDARD.decode(s);
        Ok(Wrapped {
            key_id: doc.key_id,
            ciphertext: decode(&doc.ciphertext).map_err(|_| bad("ciphertext is not base64"))?,
            annotations: doc
                .annotations
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        decode(v).map_err(|_| bad("annotation is not base64"))?,
                    ))
                })
                .collect::<Result<_, KmsError>>()?,
        })
    }
}

impl KmsPlugin {
    /// Encrypts `plaintext` with the plugin: what to store.
    pub async fn wrap(&self, plaintext: &[u8]) -> Result<Wrapped, KmsError> {
        let response = self.encrypt(plaintext).await?;
        Ok(Wrapped {
            key_id: response.key_id,
            ciphertext: response.ciphertext,
            annotations: response.annotations,
        })
    }

    /// Decrypts what [`KmsPlugin::wrap`] returned.
    pub async fn unwrap_key(
        &self,
        wrapped: &Wrapped,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, KmsError> {
        self.decrypt(&wrapped.ciphertext, &wrapped.key_id, &wrapped.annotations)
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrapped_documents_round_trip_and_are_checked() {
        let wrapped = Wrapped {
            key_id: "kek-1".into(),
            ciphertext: vec![1, 2, 3, 255],
            annotations: BTreeMap::from([("nonce.example.com".into(), vec![9; 12])]),
        };
        let json = wrapped.to_json();
        let text = String::from_utf8(json.clone()).unwrap();
        assert!(text.contains(r#""format":"kms-v2""#), "{text}");
        assert!(text.contains(r#""keyId":"kek-1""#), "{text}");
        assert_eq!(Wrapped::from_json(&json).unwrap(), wrapped);
        for bad in [
            r#"{"format":"other","keyId":"k","ciphertext":"AQ=="}"#,
            r#"{"format":"kms-v2","keyId":"k","ciphertext":"!!"}"#,
            r#"{"format":"kms-v2","keyId":"k","ciphertext":"AQ==","extra":1}"#,
            r#"{"keys":[]}"#,
        ] {
            assert!(Wrapped::from_json(bad.as_bytes()).is_err(), "{bad}");
        }
    }
}
