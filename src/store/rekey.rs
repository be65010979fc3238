//! Moving the store onto the keyring's active master key after a rotation (docs/crypto.md,
//! "Keyring"), so the retired key can later leave the keyring.
//!
//! A master key is used three ways in a store: a secret's envelope is sealed under it, an entry
//! file's MAC is under a key derived from it, and so is each manifest line's. Re-encryption
//! rewrites every entry with anything under a retired key (a secret opened and sealed again:
//! the same version, data and timestamps, a new envelope) through the ordinary write path, each
//! write conditional on the entry's generation as it was read, so a user's write meanwhile is
//! never overwritten (the entry is looked at again). Then the manifest is rewritten under the
//! active key. Every step is an ordinary crash-safe store write: a crash between two leaves
//! entries under either key, which open while the keyring holds both.
//!
//! Pruning a key ([`Store::with_writes_held`]) decides on [`KeyUsage`] with every store write
//! held back, and a write sealed from a keyring snapshot that still had the pruned key is
//! refused at commit (`Store::put`), so nothing is ever stored under a key the keyring lost.

use std::collections::{BTreeMap, BTreeSet};

use super::manifest::Manifest;
use super::{ConfigRecord, Entry, Expect, SecretRecord, Store, StoreError};
use crate::crypto::{self, KeyId, Keyring, SecretIdentity};
use crate::domain::{Kind, ObjectKey};

/// Passes over the store at most, per re-encryption: a write sealed from a snapshot taken just
/// before the rotation can land behind a pass; the next one takes it.
const MAX_PASSES: usize = 4;

/// Which master keys the store uses, and for what.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct KeyUsage {
    /// Secrets whose envelope is sealed under each key.
    pub sealed: BTreeMap<KeyId, usize>,
    /// Entry files (secrets and configs) whose MAC is under each key.
    pub authenticated: BTreeMap<KeyId, usize>,
    /// Keys the manifest's lines are authenticated under.
    pub manifest: BTreeSet<KeyId>,
}

impl KeyUsage {
    /// Whether anything in the store needs `id` to open or to be authenticated.
    pub fn uses(&self, id: &KeyId) -> bool {
        self.sealed.contains_key(id)
            || self.authenticated.contains_key(id)
            || self.manifest.contains(id)
    }

    /// What needs `id`, for a message: "2 secrets sealed, 3 entry files, the manifest".
    pub fn describe(&self, id: &KeyId) -> String {
        let mut parts = Vec::new();
        if let Some(n) = self.sealed.get(id) {
            parts.push(format!("{n} secret(s) sealed under it"));
        }
        if let Some(n) = self.authenticated.get(id) {
            parts.push(format!("{n} entry file(s) authenticated with it"));
        }
        if self.manifest.contains(id) {
            parts.push("the store manifest".to_owned());
        }
        if parts.is_empty() {
            "nothing".to_owned()
        } else {
            parts.join(", ")
        }
    }

    /// The keys in use other than `active`.
    pub fn other_than(&self, active: &KeyId) -> BTreeSet<KeyId> {
        self.sealed
            .keys()
            .chain(self.authenticated.keys())
            .chain(self.manifest.iter())
            .filter(|id| *id != active)
            .cloned()
            .collect()
    }
}

/// What a re-encryption did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Reencrypted {
    /// Secrets sealed again under the active key.
    pub resealed: usize,
    /// Entries rewritten only to be authenticated with the active key (configs, and secrets
    /// already sealed under it).
    pub reauthenticated: usize,
    /// Whether the manifest was rewritten under the active key.
    pub manifest_rewritten: bool,
}

/// What happened to one entry.
enum Step {
    Resealed,
    Reauthenticated,
    /// Already under the active key, or gone.
    Nothing,
    /// Written by someone else on every try; the next pass looks again.
    Busy,
}

/// What re-encryption needs of each kind of entry.
trait Rekey: Entry + Clone {
    /// The entry with its data sealed under the keyring's active key (a copy for configs).
    fn resealed(&self, keyring: &Keyring) -> Result<Self, StoreError>;
}

impl Rekey for ConfigRecord {
    fn resealed(&self, _: &Keyring) -> Result<Self, StoreError> {
        Ok(self.clone())
    }
}

impl Rekey for SecretRecord {
    fn resealed(&self, keyring: &Keyring) -> Result<Self, StoreError> {
        let identity = SecretIdentity {
            kind: Kind::Secret,
            namespace: &self.key.namespace,
            name: &self.key.name,
            version: self.version,
        };
        let cannot = |e: crypto::CryptoError| {
            StoreError::Integrity(format!(
                "secret {} version {} cannot be re-encrypted: {e}",
                self.key,
                self.version.get()
            ))
        };
        // The plaintext lives only in this zeroizing SecretData, dropped on return.
        let data = crypto::open(keyring, &identity, &self.envelope).map_err(cannot)?;
        let envelope = crypto::seal(keyring, &identity, &data).map_err(cannot)?;
        Ok(SecretRecord {
            envelope,
            ..self.clone()
        })
    }
}

impl Store {
    /// Which master keys the store uses now (entries as held, MACs as their files name them).
    pub fn key_usage(&self) -> KeyUsage {
        let manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        self.usage_locked(&manifest)
    }

    /// Runs `f` on the store's key usage while no store write can happen (each takes the
    /// manifest lock, and reads the keyring under it): what a prune decides on stays true until
    /// `f` has replaced the keyring. Keys `f` removes are remembered, and a later write sealed
    /// under one of them is refused.
    pub fn with_writes_held<T>(&self, f: impl FnOnce(&KeyUsage) -> T) -> T {
        let manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        let usage = self.usage_locked(&manifest);
        let before = self.keys.current();
        let result = f(&usage);
        // Keys `f` removed from the keyring: a later write sealed under one is refused.
        let after = self.keys.current();
        let mut pruned = self.pruned.lock().unwrap_or_else(|e| e.into_inner());
        pruned.extend(
            before
                .key_ids()
                .filter(|id| after.get(id).is_none())
                .cloned(),
        );
        drop(manifest);
        result
    }

    fn usage_locked(&self, manifest: &Manifest) -> KeyUsage {
        let mut usage = KeyUsage {
            manifest: manifest.line_keys().clone(),
            ..KeyUsage::default()
        };
        // From memory: which key each envelope is sealed under is in its header, and which
        // key each entry file's MAC is under was kept when the file was read or written (a
        // file changed behind the store's back is refused at the next start anyway).
        let state = self.read();
        let mut sealed: BTreeMap<&KeyId, usize> = BTreeMap::new();
        let mut authenticated: BTreeMap<&KeyId, usize> = BTreeMap::new();
        for held in state.secrets.values() {
            *sealed.entry(held.record.envelope.key_id()).or_default() += 1;
            *authenticated.entry(&held.mac_key).or_default() += 1;
        }
        for held in state.configs.values() {
            *authenticated.entry(&held.mac_key).or_default() += 1;
        }
        let owned =
            |m: BTreeMap<&KeyId, usize>| m.into_iter().map(|(k, n)| (k.clone(), n)).collect();
        usage.sealed = owned(sealed);
        usage.authenticated = owned(authenticated);
        usage
    }

    /// The master key the entry file of `key` is authenticated with, as the store last read or
    /// wrote it.
    fn mac_key_of<R: Entry>(&self, key: &ObjectKey) -> Option<KeyId> {
        R::map(&self.read()).get(key).map(|h| (*h.mac_key).clone())
    }

    /// Rewrites everything in the store that is under a key other than the keyring's active
    /// one (see the module), while the store serves and takes writes. Safe to run again; a
    /// crash part-way leaves a store that opens with the same keyring.
    pub fn reencrypt(&self) -> Result<Reencrypted, StoreError> {
        let mut done = Reencrypted::default();
        for _ in 0..MAX_PASSES {
            let active = self.keys.current().active().id().clone();
            let mut busy = false;
            let secrets: Vec<ObjectKey> = self.read().secrets.keys().cloned().collect();
            let configs: Vec<ObjectKey> = self.read().configs.keys().cloned().collect();
            let steps = secrets
                .iter()
                .map(|k| self.reencrypt_one::<SecretRecord>(k, &active))
                .chain(
                    configs
                        .iter()
                        .map(|k| self.reencrypt_one::<ConfigRecord>(k, &active)),
                );
            for step in steps {
                match step? {
                    Step::Resealed => done.resealed += 1,
                    Step::Reauthenticated => done.reauthenticated += 1,
                    Step::Busy => busy = true,
                    Step::Nothing => {}
                }
            }
            {
                let mut manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
                if manifest.line_keys().iter().any(|id| *id != active) {
                    manifest.rewrite(&self.keys.current())?;
                    done.manifest_rewritten = true;
                }
            }
            let left = self
                .key_usage()
                .other_than(&self.keys.current().active().id().clone());
            if left.is_empty() && !busy {
                break;
            }
        }
        Ok(done)
    }

    fn reencrypt_one<R: Rekey>(&self, key: &ObjectKey, active: &KeyId) -> Result<Step, StoreError> {
        for _ in 0..3 {
            let Some(record) = self.lookup::<R>(key).found() else {
                return Ok(Step::Nothing);
            };
            let reseal = record.sealed_with().is_some_and(|id| id != active);
            if !reseal && self.mac_key_of::<R>(key).as_ref() == Some(active) {
                return Ok(Step::Nothing);
            }
            let ring = self.keys.current();
            let fresh = if reseal {
                record.resealed(&ring)?
            } else {
                R::clone(&record)
            };
            match self.put(fresh, Expect::Generation(record.generation())) {
                Ok(_) if reseal => return Ok(Step::Resealed),
                Ok(_) => return Ok(Step::Reauthenticated),
                // Written or deleted since it was read: look at it again.
                Err(StoreError::Changed { .. }) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(Step::Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{MasterKey, SharedKeyring};
    use crate::domain::{ConfigData, Name, Namespace, Version, WorkloadSet};
    use crate::store::OpenOptions;
    use jiff::Timestamp;
    use std::path::Path;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Namespace::default_namespace(), Name::parse(name).unwrap())
    }

    fn identity(key: &ObjectKey, version: Version) -> SecretIdentity<'_> {
        SecretIdentity {
            kind: Kind::Secret,
            namespace: &key.namespace,
            name: &key.name,
            version,
        }
    }

    fn secret(keyring: &Keyring, name: &str, version: u64) -> SecretRecord {
        let key = key(name);
        let version = Version::new(version).unwrap();
        let data =
            serde_json::from_value(serde_json::json!({"v": format!("{name}-{version}")})).unwrap();
        SecretRecord {
            envelope: crypto::seal(keyring, &identity(&key, version), &data).unwrap(),
            key,
            version,
            created_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::UNIX_EPOCH,
            allowed_workloads: WorkloadSet::default(),
            origin: None,
            writes: Vec::new(),
            generation: 0,
        }
    }

    fn config(name: &str) -> ConfigRecord {
        ConfigRecord {
            key: key(name),
            data: serde_json::from_value::<ConfigData>(serde_json::json!({"k": name})).unwrap(),
            immutable: false,
            created_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::UNIX_EPOCH,
            origin: None,
            writes: Vec::new(),
            generation: 0,
        }
    }

    fn open(dir: &Path, keyring: &Keyring) -> Result<Store, StoreError> {
        Store::open(
            dir,
            SharedKeyring::new(keyring.clone()),
            OpenOptions::default(),
        )
        .map(|(store, _)| store)
    }

    /// Every secret opens, under `keyring`, to the data it was written with, at its version.
    fn assert_secrets_open(store: &Store, keyring: &Keyring, names: &[&str]) {
        for name in names {
            let record = store.secret(&key(name)).unwrap_or_else(|| panic!("{name}"));
            let data = crypto::open(
                keyring,
                &identity(&record.key, record.version),
                &record.envelope,
            )
            .unwrap_or_else(|e| panic!("{name}: {e}"));
            let value = data.get("v").unwrap().expose().to_owned();
            assert_eq!(value, format!("{name}-{}", record.version), "{name}");
        }
    }

    /// A store under key A, and the keyring with B made active (A retired).
    fn store_under_a(dir: &Path, names: &[&str]) -> (Keyring, Keyring, KeyId, KeyId) {
        let a = Keyring::generate().unwrap();
        let store = open(dir, &a).unwrap();
        for (i, name) in names.iter().enumerate() {
            store
                .put_secret(secret(&a, name, 1 + i as u64 % 3), Expect::Absent)
                .unwrap();
        }
        store
            .put_config(config("app.settings"), Expect::Absent)
            .unwrap();
        let mut ab = a.clone();
        ab.rotate_to(MasterKey::generate().unwrap());
        let (old, new) = (a.active().id().clone(), ab.active().id().clone());
        (a, ab, old, new)
    }

    #[test]
    fn reencryption_moves_every_entry_and_the_manifest_to_the_active_key() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["db.password", "api.key", "tls.cert"];
        let (_, ab, old, new) = store_under_a(dir.path(), &names);
        let store = open(dir.path(), &ab).unwrap();
        let usage = store.key_usage();
        assert_eq!(usage.sealed.get(&old), Some(&3), "{usage:?}");
        assert_eq!(usage.authenticated.get(&old), Some(&4), "{usage:?}");
        assert!(usage.uses(&old) && !usage.uses(&new), "{usage:?}");

        let done = store.reencrypt().unwrap();
        assert_eq!(
            done,
            Reencrypted {
                resealed: 3,
                reauthenticated: 1,
                manifest_rewritten: true
            }
        );
        let usage = store.key_usage();
        assert!(!usage.uses(&old), "{usage:?}");
        assert!(usage.other_than(&new).is_empty(), "{usage:?}");
        assert_eq!(
            store.reencrypt().unwrap(),
            Reencrypted::default(),
            "nothing left to do"
        );
        let versions: Vec<u64> = names
            .iter()
            .map(|n| store.secret(&key(n)).unwrap().version.get())
            .collect();
        drop(store);

        // Without the old key at all: everything opens, at the same versions.
        let mut only_b = ab.clone();
        assert!(only_b.remove_retired(&old));
        let store = open(dir.path(), &only_b).unwrap();
        assert_secrets_open(&store, &only_b, &names);
        let after: Vec<u64> = names
            .iter()
            .map(|n| store.secret(&key(n)).unwrap().version.get())
            .collect();
        assert_eq!(versions, after);
        assert!(store.config(&key("app.settings")).is_some());
    }

    #[test]
    fn a_store_part_way_through_reencryption_opens_with_both_keys_and_not_without_the_old() {
        let dir = tempfile::tempdir().unwrap();
        let names = ["a.one", "b.two", "c.three", "d.four"];
        let (_, ab, old, new) = store_under_a(dir.path(), &names);
        let store = open(dir.path(), &ab).unwrap();
        // As a crash would leave it: two entries moved, the rest and the manifest not.
        for name in &names[..2] {
            assert!(matches!(
                store
                    .reencrypt_one::<SecretRecord>(&key(name), &new)
                    .unwrap(),
                Step::Resealed
            ));
        }
        drop(store);
        let store = open(dir.path(), &ab).unwrap();
        assert_secrets_open(&store, &ab, &names);
        let usage = store.key_usage();
        assert_eq!(usage.sealed.get(&old), Some(&2), "{usage:?}");
        assert_eq!(usage.sealed.get(&new), Some(&2), "{usage:?}");
        drop(store);

        let mut only_b = ab.clone();
        only_b.remove_retired(&old);
        assert!(
            matches!(
                open(dir.path(), &only_b),
                Err(StoreError::ForeignKeyring { .. })
            ),
            "the old key is still needed"
        );
    }

    #[test]
    fn a_write_sealed_under_a_key_pruned_meanwhile_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ab, old, _) = store_under_a(dir.path(), &["db.password"]);
        let keys = SharedKeyring::new(ab.clone());
        let (store, _) = Store::open(dir.path(), keys.clone(), OpenOptions::default()).unwrap();
        store.reencrypt().unwrap();
        // Sealed from a snapshot that still had the old key active...
        let late = secret(&a, "db.password", 9);
        store.with_writes_held(|usage| {
            assert!(!usage.uses(&old));
            let mut pruned = ab.clone();
            pruned.remove_retired(&old);
            keys.replace(pruned);
        });
        // ...is refused at commit, and nothing under the pruned key is stored.
        let err = store.put_secret(late, Expect::Any).unwrap_err();
        assert!(matches!(err, StoreError::Changed { .. }), "{err}");
        assert!(
            err.to_string().contains("removed from the keyring"),
            "{err}"
        );
        assert!(!store.key_usage().uses(&old));
    }
}
