//! Master-key rotation and pruning of a dev data dir (docs/crypto.md, "Keyring"): one set of
//! steps, run by `claw-secrets keys --data-dir` itself when no server uses the dir (offline), or
//! by the running `claw-secrets dev` when the command asks it over its control socket
//! ([`super::dev_control`]; online). Either way one process holds the store, the audit log and
//! `master.key`, so no two writers ever meet.
//!
//! Order, so a crash at any point leaves a data dir that opens: the audit intent is durable
//! before `master.key` changes; the new keyring (old key kept, retired) is written atomically
//! before anything is sealed under the new key; re-encryption is ordinary store writes
//! ([`Store::reencrypt`]); a prune removes a key only while every store write is held back and
//! nothing uses it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::audit::{AuditEvent, AuditLog, Decision, Phase};
use crate::crypto::{KeyId, Keyring, MasterKey, SharedKeyring};
use crate::store::{Reencrypted, Store, write_private_file_atomic};

/// The keyring file of a dev data dir.
pub const KEYRING_FILE: &str = "master.key";

/// The audit subject of work the server starts itself (finishing an interrupted re-encryption).
pub const SYSTEM_SUBJECT: &str = "system:claw-secrets";

/// A dev data dir's keyring lifecycle, over the store and audit log of the one process that
/// holds the dir.
pub struct DataDirKeys {
    data_dir: PathBuf,
    node: String,
    keys: SharedKeyring,
    store: Arc<Store>,
    audit: AuditLog,
    /// One rotation or prune at a time: each writes `master.key` from the keyring it read.
    busy: tokio::sync::Mutex<()>,
}

/// The audit subject of a local user acting through the CLI (the data dir's file permissions
/// are what let them).
pub fn local_subject(uid: u32) -> String {
    format!("local-user:uid={uid}")
}

impl DataDirKeys {
    pub fn new(
        data_dir: PathBuf,
        node: String,
        keys: SharedKeyring,
        store: Arc<Store>,
        audit: AuditLog,
    ) -> Self {
        DataDirKeys {
            data_dir,
            node,
            keys,
            store,
            audit,
            busy: tokio::sync::Mutex::new(()),
        }
    }

    fn event(
        &self,
        subject: &str,
        command: &str,
        decision: Decision,
        phase: Option<Phase>,
        reason: String,
    ) -> AuditEvent {
        AuditEvent {
            node: self.node.clone(),
            subject: subject.to_owned(),
            workload: None,
            command: command.to_owned(),
            namespace: None,
            name: None,
            version: None,
            decision,
            phase,
            reason,
            request_id: None,
            idempotency_key: None,
            gateway_node: None,
        }
    }

    async fn record(&self, event: AuditEvent) -> Result<(), String> {
        self.audit
            .append(event)
            .await
            .map(|_| ())
            .map_err(|e| format!("{e}; nothing was changed"))
    }

    /// Writes `ring` to `master.key` (atomically, 0600, synced) and makes it the keyring every
    /// seal and open of this process uses.
    fn install(data_dir: &Path, keys: &SharedKeyring, ring: Keyring) -> Result<(), String> {
        let path = data_dir.join(KEYRING_FILE);
        write_private_file_atomic(&path, &ring.to_json()).map_err(|e| e.to_string())?;
        keys.replace(ring);
        Ok(())
    }

    /// Makes a new master key active (the current one stays, retired), then re-encrypts the
    /// store under it. Returns what to tell the user.
    pub async fn rotate(&self, subject: &str) -> Result<String, String> {
        let _one_at_a_time = self.busy.lock().await;
        let current = self.keys.current();
        let retired = current.active().id().clone();
        let key = MasterKey::generate().map_err(|e| e.to_string())?;
        let active = key.id().clone();
        let mut ring = Keyring::clone(&current);
        ring.rotate_to(key);
        let what = format!(
            "master key {active} made active; {retired} retired (kept to open what it sealed)"
        );
        self.record(self.event(
            subject,
            "keys.rotate",
            Decision::Allow,
            Some(Phase::Intent),
            what.clone(),
        ))
        .await?;
        let (data_dir, keys) = (self.data_dir.clone(), self.keys.clone());
        let installed = tokio::task::spawn_blocking(move || Self::install(&data_dir, &keys, ring))
            .await
            .unwrap_or_else(|e| Err(format!("writing the keyring failed: {e}")));
        if let Err(e) = installed {
            self.audit.append_later(self.event(
                subject,
                "keys.rotate",
                Decision::Error,
                Some(Phase::Abort),
                "the keyring file could not be written; the active key is unchanged".to_owned(),
            ));
            return Err(format!("{e}; the active key is still {retired}"));
        }
        self.audit.append_later(self.event(
            subject,
            "keys.rotate",
            Decision::Allow,
            Some(Phase::Commit),
            what,
        ));
        let done = self.reencrypt(subject).await;
        let first = format!(
            "master key {active} is active in {}; {retired} is retired (kept to open what it sealed)",
            self.data_dir.join(KEYRING_FILE).display()
        );
        match done {
            Ok(summary) => Ok(format!("{first}\n{summary}")),
            Err(e) => Err(format!(
                "{first}, but re-encryption failed: {e}. Every entry still opens (the keyring holds both keys); run `claw-secrets keys rotate` again once the cause is fixed"
            )),
        }
    }

    /// Re-encrypts what the store still holds under a retired key, if anything (the server
    /// runs it at start: a re-encryption a crash interrupted is finished). `Ok(None)` when
    /// there was nothing to do.
    pub async fn finish_reencryption(&self) -> Result<Option<String>, String> {
        let _one_at_a_time = self.busy.lock().await;
        let store = self.store.clone();
        let active = self.keys.current().active().id().clone();
        let left = tokio::task::spawn_blocking(move || store.key_usage().other_than(&active))
            .await
            .map_err(|e| e.to_string())?;
        if left.is_empty() {
            return Ok(None);
        }
        self.reencrypt(SYSTEM_SUBJECT).await.map(Some)
    }

    /// The re-encryption pass, audited: its intent (which keys it moves away from), then what
    /// it did.
    async fn reencrypt(&self, subject: &str) -> Result<String, String> {
        let active = self.keys.current().active().id().clone();
        let store = self.store.clone();
        let usage = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.key_usage())
                .await
                .map_err(|e| e.to_string())?
        };
        let from = join(usage.other_than(&active).iter());
        if from.is_empty() {
            return Ok(format!(
                "nothing in the store was under another key than {active}"
            ));
        }
        self.record(self.event(
            subject,
            "keys.reencrypt",
            Decision::Allow,
            Some(Phase::Intent),
            format!("re-encrypting what is under {from} under {active}"),
        ))
        .await?;
        let passed = tokio::task::spawn_blocking(move || {
            let done = store.reencrypt()?;
            Ok::<_, crate::store::StoreError>((done, store.key_usage()))
        })
        .await
        .map_err(|e| e.to_string())?;
        let (done, usage) = match passed {
            Ok(v) => v,
            Err(e) => {
                self.audit.append_later(self.event(
                    subject,
                    "keys.reencrypt",
                    Decision::Error,
                    Some(Phase::Abort),
                    "re-encryption stopped part-way; what it rewrote stays rewritten".to_owned(),
                ));
                return Err(e.to_string());
            }
        };
        let active = self.keys.current().active().id().clone();
        let left = usage.other_than(&active);
        let summary = describe(&done, &active, &left, &usage);
        self.audit.append_later(self.event(
            subject,
            "keys.reencrypt",
            Decision::Allow,
            Some(Phase::Commit),
            summary.clone(),
        ));
        Ok(summary)
    }

    /// Removes the retired keys nothing in the store uses; refuses, removing nothing, while
    /// anything does.
    pub async fn prune(&self, subject: &str) -> Result<String, String> {
        let _one_at_a_time = self.busy.lock().await;
        let current = self.keys.current();
        let active = current.active().id().clone();
        let retired: Vec<KeyId> = current
            .key_ids()
            .filter(|id| **id != active)
            .cloned()
            .collect();
        if retired.is_empty() {
            return Ok(format!(
                "no retired key to remove; {active} is the only key in {}",
                self.data_dir.join(KEYRING_FILE).display()
            ));
        }
        let store = self.store.clone();
        let usage = tokio::task::spawn_blocking(move || store.key_usage())
            .await
            .map_err(|e| e.to_string())?;
        let needed: Vec<String> = retired
            .iter()
            .filter(|id| usage.uses(id))
            .map(|id| format!("{id} by {}", usage.describe(id)))
            .collect();
        if !needed.is_empty() {
            let why = format!(
                "retired keys are still needed: {}. A retired master key is removed only once nothing in the store uses it: let the re-encryption `claw-secrets keys rotate` started finish (a `claw-secrets dev` started on this data dir finishes one that was interrupted) and run again. Nothing was removed",
                needed.join("; ")
            );
            self.record(self.event(subject, "keys.prune", Decision::Error, None, why.clone()))
                .await?;
            return Err(why);
        }
        let ids = join(retired.iter());
        self.record(self.event(
            subject,
            "keys.prune",
            Decision::Allow,
            Some(Phase::Intent),
            format!("removing retired master keys {ids}; {active} stays active"),
        ))
        .await?;
        let (store, keys, data_dir) =
            (self.store.clone(), self.keys.clone(), self.data_dir.clone());
        let pruned = tokio::task::spawn_blocking(move || {
            store.with_writes_held(|usage| {
                // Looked at again with every write held back: one may have landed meanwhile.
                let ring = keys.current();
                let mut pruned = Keyring::clone(&ring);
                for id in ring.key_ids().filter(|id| *id != ring.active().id()) {
                    if usage.uses(id) {
                        return Err(format!(
                            "retired key {id} came into use meanwhile ({}); run again. Nothing was removed",
                            usage.describe(id)
                        ));
                    }
                    pruned.remove_retired(id);
                }
                Self::install(&data_dir, &keys, pruned)
            })
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        match pruned {
            Ok(()) => {
                self.audit.append_later(self.event(
                    subject,
                    "keys.prune",
                    Decision::Allow,
                    Some(Phase::Commit),
                    format!("removed retired master keys {ids}; {active} stays active"),
                ));
                Ok(format!(
                    "removed retired master keys {ids} from {}; {active} stays active",
                    self.data_dir.join(KEYRING_FILE).display()
                ))
            }
            Err(e) => {
                self.audit.append_later(self.event(
                    subject,
                    "keys.prune",
                    Decision::Error,
                    Some(Phase::Abort),
                    "nothing was removed".to_owned(),
                ));
                Err(e)
            }
        }
    }
}

fn join<'a>(ids: impl Iterator<Item = &'a KeyId>) -> String {
    ids.map(KeyId::as_str).collect::<Vec<_>>().join(", ")
}

/// One line on a re-encryption, for the user and the audit log (ids and counts only).
fn describe(
    done: &Reencrypted,
    active: &KeyId,
    left: &std::collections::BTreeSet<KeyId>,
    usage: &crate::store::KeyUsage,
) -> String {
    let mut line = format!(
        "re-encrypted under {active}: {} secrets sealed again, {} entries re-authenticated{}",
        done.resealed,
        done.reauthenticated,
        if done.manifest_rewritten {
            ", store manifest rewritten"
        } else {
            ""
        }
    );
    if left.is_empty() {
        line.push_str(
            "; nothing is left under a retired key (`claw-secrets keys prune` can remove them)",
        );
    } else {
        let what: Vec<String> = left
            .iter()
            .map(|id| format!("{id}: {}", usage.describe(id)))
            .collect();
        line.push_str(&format!(
            "; still under retired keys (written meanwhile; run again): {}",
            what.join("; ")
        ));
    }
    line
}
