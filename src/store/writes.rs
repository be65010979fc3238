//! What the store remembers of idempotent writes: who made each one, a keyed fingerprint of
//! what was asked, and what was answered, so a retry gets the original answer and a reused key
//! is refused. Kept inside the entry the write produced (so it is committed with it, in one
//! atomic file write) or, for a delete, in the manifest line that commits the delete.

use jiff::{SignedDuration, Timestamp};
use serde::{Deserialize, Serialize};

use crate::crypto::KeyId;
use crate::domain::{Kind, ObjectKey};

/// How long a write is remembered. A retry after this is a new request.
pub const RETENTION: SignedDuration = SignedDuration::from_hours(24);

/// How many writes one object remembers (the oldest are forgotten first). With
/// [`RETENTION`], this bounds the memory idempotency costs: a client that makes more than this
/// many keyed writes to one object within a day can no longer retry the oldest of them.
pub const MAX_PER_OBJECT: usize = 32;

/// One idempotent write, remembered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WriteRecord {
    /// The client's idempotency key (not a secret).
    pub idempotency_key: String,
    /// Who made the write; only the same caller may have it answered again.
    pub caller: String,
    /// The command, e.g. `secret.rotate`.
    pub command: String,
    pub fingerprint: Fingerprint,
    /// The answer's payload: metadata only, never values.
    pub result: serde_json::Value,
    /// The request that made the write, for the audit log of a retry.
    pub request_id: String,
    pub at: Timestamp,
}

/// HMAC-SHA256 of the command, its target and its parameters, under a key derived from the
/// master key `key_id`: it tells a retry from a different request without keeping anything a
/// reader could learn the parameters from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fingerprint {
    pub key_id: KeyId,
    /// 64 hex digits.
    pub mac: String,
}

impl WriteRecord {
    /// Whether the record is older than [`RETENTION`] at `now`.
    pub fn expired(&self, now: Timestamp) -> bool {
        now.duration_since(self.at) > RETENTION
    }
}

/// `records` without the expired ones, and at most [`MAX_PER_OBJECT`] (the newest).
pub fn retained(mut records: Vec<WriteRecord>, now: Timestamp) -> Vec<WriteRecord> {
    records.retain(|r| !r.expired(now));
    records.sort_by_key(|r| r.at);
    let excess = records.len().saturating_sub(MAX_PER_OBJECT);
    records.drain(..excess);
    records
}

/// A remembered write and the object it was made to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RememberedWrite {
    pub kind: Kind,
    pub key: ObjectKey,
    pub record: WriteRecord,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, at: Timestamp) -> WriteRecord {
        WriteRecord {
            idempotency_key: key.to_owned(),
            caller: "admin".to_owned(),
            command: "secret.rotate".to_owned(),
            fingerprint: Fingerprint {
                key_id: KeyId::parse("k-1").unwrap(),
                mac: "00".repeat(32),
            },
            result: serde_json::json!({"version": 2}),
            request_id: "r".to_owned(),
            at,
        }
    }

    #[test]
    fn retention_drops_the_expired_and_the_oldest_beyond_the_bound() {
        let now = Timestamp::now();
        let mut records = vec![record("old", now - SignedDuration::from_hours(25))];
        for i in 0..MAX_PER_OBJECT + 3 {
            records.push(record(
                &format!("k{i}"),
                now - SignedDuration::from_secs(1000 - i as i64),
            ));
        }
        let kept = retained(records, now);
        assert_eq!(kept.len(), MAX_PER_OBJECT);
        assert_eq!(kept[0].idempotency_key, "k3");
        assert!(kept.iter().all(|r| r.idempotency_key != "old"));
    }
}
