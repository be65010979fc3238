//! What one stored entry holds, and its on-disk encoding.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use jiff::Timestamp;
use serde::{Deserialize, Serialize};

use crate::crypto::Envelope;
use crate::domain::{ConfigData, Name, Namespace, ObjectKey, Version, WorkloadSet};

/// The idempotency key of the write that produced an entry, and a keyed digest of that request,
/// so a retry of the same request is recognised (even after a restart) and a reuse of the key
/// for a different request is refused. The digest is an HMAC, never a plain hash of the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteMark {
    pub idempotency_key: String,
    pub fingerprint: String,
}

/// A stored secret: metadata in clear, data only as a sealed envelope.
#[derive(Debug, Clone)]
pub struct SecretRecord {
    pub key: ObjectKey,
    pub version: Version,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub allowed_workloads: WorkloadSet,
    pub envelope: Envelope,
    pub last_write: Option<WriteMark>,
    /// The uid of the Kubernetes object this entry mirrors (None in dev mode): a new object
    /// under the same name starts a new version history.
    pub origin: Option<String>,
}

/// A stored config: plain data (the seed: configs are not encrypted).
#[derive(Debug, Clone)]
pub struct ConfigRecord {
    pub key: ObjectKey,
    pub data: ConfigData,
    pub immutable: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    pub last_write: Option<WriteMark>,
    /// The uid of the Kubernetes object this entry mirrors (None in dev mode).
    pub origin: Option<String>,
}

const FILE_FORMAT: u32 = 1;

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
    last_write: Option<WriteMark>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    format: u32,
    namespace: Namespace,
    name: Name,
    data: serde_json::Value,
    immutable: bool,
    created_at: Timestamp,
    updated_at: Timestamp,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_write: Option<WriteMark>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    origin: Option<String>,
}

fn check_format(format: u32) -> Result<(), String> {
    if format != FILE_FORMAT {
        return Err(format!(
            "entry file format {format} is not supported by this build (it reads format {FILE_FORMAT})"
        ));
    }
    Ok(())
}

impl SecretRecord {
    pub(crate) fn to_file_bytes(&self) -> Vec<u8> {
        let file = SecretFile {
            format: FILE_FORMAT,
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            version: self.version,
            created_at: self.created_at,
            updated_at: self.updated_at,
            allowed_workloads: self.allowed_workloads.clone(),
            envelope: B64.encode(self.envelope.to_bytes()),
            last_write: self.last_write.clone(),
            origin: self.origin.clone(),
        };
        serde_json::to_vec(&file).expect("secret record serializes")
    }

    pub(crate) fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        let file: SecretFile =
            serde_json::from_slice(bytes).map_err(|e| format!("not a secret entry: {e}"))?;
        check_format(file.format)?;
        let envelope = B64
            .decode(file.envelope.as_bytes())
            .map_err(|_| "envelope is not base64".to_owned())
            .and_then(|b| Envelope::from_bytes(&b).map_err(|e| e.to_string()))?;
        Ok(SecretRecord {
            key: ObjectKey::new(file.namespace, file.name),
            version: file.version,
            created_at: file.created_at,
            updated_at: file.updated_at,
            allowed_workloads: file.allowed_workloads,
            envelope,
            last_write: file.last_write,
            origin: file.origin,
        })
    }
}

impl ConfigRecord {
    pub(crate) fn to_file_bytes(&self) -> Vec<u8> {
        let file = ConfigFile {
            format: FILE_FORMAT,
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            data: serde_json::to_value(&self.data).expect("config data serializes"),
            immutable: self.immutable,
            created_at: self.created_at,
            updated_at: self.updated_at,
            last_write: self.last_write.clone(),
            origin: self.origin.clone(),
        };
        serde_json::to_vec(&file).expect("config record serializes")
    }

    pub(crate) fn from_file_bytes(bytes: &[u8]) -> Result<Self, String> {
        let file: ConfigFile =
            serde_json::from_slice(bytes).map_err(|e| format!("not a config entry: {e}"))?;
        check_format(file.format)?;
        let data: ConfigData =
            serde_json::from_value(file.data).map_err(|e| format!("config data: {e}"))?;
        Ok(ConfigRecord {
            key: ObjectKey::new(file.namespace, file.name),
            data,
            immutable: file.immutable,
            created_at: file.created_at,
            updated_at: file.updated_at,
            last_write: file.last_write,
            origin: file.origin,
        })
    }
}
