//! Idempotent writes: a write that carries an idempotency key is remembered (who made it, a
//! keyed fingerprint of what was asked, what was answered) for `store::writes::RETENTION`, so
//!
//! - a retry by the same caller of the same request gets the original answer, whatever was
//!   written since;
//! - the same caller reusing the key for anything else (another command, object or params) gets
//!   INVALID_ARGUMENT;
//! - any other caller presenting the key gets one generic refusal, decided before anything is
//!   compared, so replaying someone else's key teaches nothing about what they wrote.
//!
//! The fingerprint is HMAC-SHA256 under a key derived from a master key whose id is kept with
//! it, so it is still checked after the active master key changes.

use jiff::Timestamp;

use super::super::{Caller, Command, InvokeError, Payload};
use crate::crypto::{Keyring, MacKey, Purpose, Tagger};
use crate::domain::{Kind, Namespace};
use crate::store::{Fingerprint, WriteRecord};

/// A client-chosen key that makes retrying a write safe: 1-128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<Self, InvokeError> {
        if s.is_empty() || s.len() > 128 || !s.chars().all(|c| c.is_ascii_graphic()) {
            return Err(InvokeError::invalid(
                "idempotencyKey must be 1-128 printable ASCII characters without spaces",
            ));
        }
        Ok(IdempotencyKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The keyed fingerprint of `command` acting in `namespace`: the command, the kind, the
/// namespace, the name and every parameter, each length-prefixed, values included (they never
/// leave the HMAC).
fn fingerprint(key: &MacKey, command: &Command, namespace: &Namespace) -> Tagger {
    let mut t = key.tagger();
    t.part(b"claw-secrets/v1/write")
        .part(command.name().as_bytes())
        .part(namespace.as_str().as_bytes());
    let count = |n: usize| (n as u64).to_be_bytes();
    match command {
        Command::SecretCreate(p) => {
            t.part(Kind::Secret.as_str().as_bytes())
                .part(p.name.as_str().as_bytes())
                .part(&count(p.data.len()));
            for (k, v) in p.data.iter() {
                t.part(k.as_str().as_bytes()).part(v.expose().as_bytes());
            }
            let workloads: Vec<_> = p.allowed_workloads.iter().collect();
            t.part(&count(workloads.len()));
            for w in workloads {
                t.part(w.as_str().as_bytes());
            }
        }
        Command::SecretRotate(p) => {
            t.part(Kind::Secret.as_str().as_bytes())
                .part(p.name.as_str().as_bytes());
            match &p.new_data {
                Some(data) => {
                    t.part(b"newData").part(&count(data.len()));
                    for (k, v) in data.iter() {
                        t.part(k.as_str().as_bytes()).part(v.expose().as_bytes());
                    }
                }
                None => {
                    t.part(b"reseal");
                }
            }
            t.part(&p.expected_version.map_or(0, |v| v.get()).to_be_bytes());
        }
        Command::SecretDelete(p) => {
            t.part(Kind::Secret.as_str().as_bytes())
                .part(p.name.as_str().as_bytes());
        }
        Command::ConfigCreate(p) => {
            t.part(Kind::Config.as_str().as_bytes())
                .part(p.name.as_str().as_bytes())
                .part(&[u8::from(p.immutable)])
                .part(&count(p.data.iter().count()));
            for (k, v) in p.data.iter() {
                t.part(k.as_str().as_bytes()).part(v.as_bytes());
            }
        }
        Command::ConfigUpdate(p) => {
            let immutable = match p.immutable {
                None => 0u8,
                Some(false) => 1,
                Some(true) => 2,
            };
            t.part(Kind::Config.as_str().as_bytes())
                .part(p.name.as_str().as_bytes())
                .part(&[immutable])
                .part(&count(p.data.iter().count()));
            for (k, v) in p.data.iter() {
                t.part(k.as_str().as_bytes()).part(v.as_bytes());
            }
        }
        Command::ConfigDelete(p) => {
            t.part(Kind::Config.as_str().as_bytes())
                .part(p.name.as_str().as_bytes());
        }
        // Reads are never fingerprinted (they are not writes); named for completeness.
        Command::SecretGet(_)
        | Command::SecretList(_)
        | Command::ConfigGet(_)
        | Command::ConfigList(_) => {}
    }
    t
}

/// A keyed write being made: everything needed to check it against remembered writes, and to
/// remember it.
pub(super) struct KeyedWrite<'a> {
    pub key: &'a IdempotencyKey,
    pub caller: &'a Caller,
    pub command: &'a Command,
    pub namespace: &'a Namespace,
    pub request_id: &'a str,
}

impl KeyedWrite<'_> {
    /// What earlier write this one repeats: `Ok(Some(record))` to answer with the record's
    /// result, `Ok(None)` if the key is new (or its record expired).
    pub fn prior(
        &self,
        keyring: &Keyring,
        remembered: Option<WriteRecord>,
        now: Timestamp,
    ) -> Result<Option<WriteRecord>, InvokeError> {
        let Some(record) = remembered.filter(|r| !r.expired(now)) else {
            return Ok(None);
        };
        if record.caller != self.caller.identity() {
            // Decided before any comparison: the same answer whatever the params are.
            return Err(InvokeError::invalid(format!(
                "idempotencyKey {:?} is already in use; choose a new, unique key for every new request",
                self.key.as_str()
            )));
        }
        let reused = || {
            InvokeError::invalid(format!(
                "idempotencyKey {:?} was already used for a different request (another command, object or parameters); use a new key for a new request",
                self.key.as_str()
            ))
        };
        let Ok(mac_key) = MacKey::for_key(
            keyring,
            &record.fingerprint.key_id,
            Purpose::WriteFingerprint,
        ) else {
            return Err(InvokeError::invalid(format!(
                "idempotencyKey {:?} belongs to a write whose master key has since been removed, so a retry cannot be recognised; use a new key",
                self.key.as_str()
            )));
        };
        let Some(mac) = crate::hex::decode_32(&record.fingerprint.mac) else {
            return Err(reused());
        };
        if !fingerprint(&mac_key, self.command, self.namespace).verify(&mac) {
            return Err(reused());
        }
        Ok(Some(record))
    }

    /// The record of this write, answered with `result`.
    pub fn remember(&self, keyring: &Keyring, result: &Payload, now: Timestamp) -> WriteRecord {
        let mac_key = MacKey::active(keyring, Purpose::WriteFingerprint);
        WriteRecord {
            idempotency_key: self.key.as_str().to_owned(),
            caller: self.caller.identity(),
            command: self.command.name().to_owned(),
            fingerprint: Fingerprint {
                key_id: mac_key.key_id().clone(),
                mac: crate::hex::encode(
                    &fingerprint(&mac_key, self.command, self.namespace).finish(),
                ),
            },
            result: serde_json::to_value(result).expect("a write's payload serializes"),
            request_id: self.request_id.to_owned(),
            at: now,
        }
    }
}
