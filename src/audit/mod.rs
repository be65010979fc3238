//! The append-only, hash-chained audit log: one JSON line per secret access, never a value.
//!
//! Each line is a JSON object whose `prev` field is the hash of the line before (64 zeros for
//! the first) and whose last field, `hash`, is SHA-256 over the line's own bytes up to that
//! field. Editing, removing or reordering any line breaks the chain, and
//! [`verify`] names the first broken line. Records are made durable (fdatasync) before
//! [`AuditLog::append`] returns, in groups: concurrent appends share one sync. The store
//! anchors the chain's head ([`open_anchored`]), so a log deleted, cut short or rewritten is
//! found at start-up.

mod anchor;
pub(crate) mod chain;
mod writer;

pub use anchor::{ANCHOR_EVERY, Finding, anchor_head, check, keep_anchored, open_anchored};
pub use chain::{VerifyFailure, VerifyReport, verify};
pub use writer::{AuditLog, Recovery};

use serde::Serialize;

/// The outcome recorded for an access.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Decision {
    /// Authorized and answered.
    Allow,
    /// Refused by access control.
    Deny,
    /// Authorized but failed (not found, already exists, invalid, internal).
    Error,
    /// The log itself was repaired after a crash.
    Repair,
}

/// Where a write stands. A write is recorded twice: its `intent` (authorized, about to be
/// committed, naming the version it will make) is durable before anything changes, then its
/// `commit` or `abort`. A crash between the two leaves an intent without an outcome: the store
/// tells which (the version exists or not). Reads and refusals are single records without a
/// phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Intent,
    Commit,
    Abort,
}

/// What a caller records; the writer adds `seq`, `time`, `prev` and `hash`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct AuditEvent {
    pub node: String,
    pub subject: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub workload: Option<String>,
    pub command: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u64>,
    pub decision: Decision,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// An error code or short explanation; built from codes and names, never from values.
    pub reason: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// The client's idempotency key, for a write that carried one (not a secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The OpenClaw gateway node id, for a call that came through the gateway (its
    /// `requestId` is then the gateway's invoke id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway_node: Option<String>,
}

/// The audit log could not record an event, so the access it describes must not be answered.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AuditError {
    #[error(
        "audit log {path} could not be written ({reason}); secret access is refused until it can be"
    )]
    Write { path: String, reason: String },
    #[error("audit log {path} could not be opened: {reason}")]
    Open { path: String, reason: String },
    #[error("audit log writer has stopped; restart the server")]
    Stopped,
    /// The log does not match what the store anchored (start-up); the message says what was
    /// found and what to do.
    #[error("{0}")]
    Integrity(String),
    #[error("the audit log's head could not be anchored in the store: {0}")]
    Anchor(String),
}
