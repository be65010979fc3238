//! Wire types of `POST /v1/invoke` (DESIGN.md, "node.invoke over HTTP").

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use crate::domain::{
    ConfigData, DomainError, ErrorCode, Name, Namespace, SecretData, Version, WorkloadSet,
};

/// The largest request body accepted. Data is limited to 1 MiB, but JSON may spell each byte of
/// it in up to 6 (`\u0001`), so a body has room for a fully escaped 1 MiB plus the request's
/// other fields. Larger bodies are refused before they are read into memory.
pub const MAX_BODY_BYTES: usize = 7 * 1024 * 1024;

/// A request as it arrives. `params` stays raw until the command is known, so each command
/// parses exactly its own parameters (and secret values never pass through a generic `Value`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InvokeRequest {
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub node_id: Option<String>,
    pub command: String,
    #[serde(default)]
    pub params: Option<Box<RawValue>>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

/// A failed call: a protocol code and a message that says what to do. Never holds a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct InvokeError {
    pub code: ErrorCode,
    pub message: String,
}

impl InvokeError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        InvokeError {
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::InvalidArgument, message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::Internal, message)
    }
}

impl From<DomainError> for InvokeError {
    fn from(e: DomainError) -> Self {
        InvokeError::new(e.code(), e.message())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
}

/// The response envelope: `ok` with a `payload`, or not `ok` with an `error`.
#[derive(Debug, Serialize)]
pub struct InvokeResponse {
    pub id: String,
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub payload: Option<Payload>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

impl InvokeResponse {
    pub fn success(id: String, payload: Payload) -> Self {
        InvokeResponse {
            id,
            ok: true,
            payload: Some(payload),
            error: None,
        }
    }

    pub fn failure(id: String, err: InvokeError) -> Self {
        InvokeResponse {
            id,
            ok: false,
            payload: None,
            error: Some(ErrorBody {
                code: err.code,
                message: err.message,
            }),
        }
    }

    pub fn http_status(&self) -> u16 {
        self.error.as_ref().map_or(200, |e| e.code.http_status())
    }
}

/// What a successful command answers.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Payload {
    Secret(SecretView),
    SecretMeta(SecretMeta),
    SecretList {
        secrets: Vec<SecretMeta>,
    },
    Config(ConfigView),
    ConfigMeta(ConfigMeta),
    ConfigList {
        configs: Vec<ConfigMeta>,
    },
    Deleted(Deleted),
    /// The answer of an earlier write, as it was remembered (a retry with the same
    /// idempotency key): metadata only.
    Recorded(serde_json::Value),
}

/// A secret's metadata: everything but its values.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct SecretMeta {
    pub name: Name,
    pub namespace: Namespace,
    pub version: Version,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
    #[serde(rename = "allowed_workloads")]
    pub allowed_workloads: WorkloadSet,
}

impl SecretMeta {
    pub fn of(r: &crate::store::SecretRecord) -> Self {
        SecretMeta {
            name: r.key.name.clone(),
            namespace: r.key.namespace.clone(),
            version: r.version,
            created_at: r.created_at,
            updated_at: r.updated_at,
            allowed_workloads: r.allowed_workloads.clone(),
        }
    }
}

/// `secret.get`: the metadata and the decrypted data.
#[derive(Debug, Serialize)]
pub struct SecretView {
    #[serde(flatten)]
    pub meta: SecretMeta,
    pub data: SecretData,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMeta {
    pub name: Name,
    pub namespace: Namespace,
    pub immutable: bool,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

impl ConfigMeta {
    pub fn of(r: &crate::store::ConfigRecord) -> Self {
        ConfigMeta {
            name: r.key.name.clone(),
            namespace: r.key.namespace.clone(),
            immutable: r.immutable,
            created_at: r.created_at,
            updated_at: r.updated_at,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct ConfigView {
    #[serde(flatten)]
    pub meta: ConfigMeta,
    pub data: ConfigData,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Deleted {
    pub name: Name,
    pub namespace: Namespace,
    pub deleted: bool,
}
