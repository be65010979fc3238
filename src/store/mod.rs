//! The node-local store: one file per secret or config, written atomically, served from memory,
//! and authenticated, so what is served is what this node wrote.
//!
//! Layout under the data directory (directory 0700, files 0600):
//!
//! ```text
//! secrets/<sha256(kind/namespace/name)>.json   metadata + base64 envelope (ciphertext only), MAC'd
//! configs/<sha256(kind/namespace/name)>.json   plain config data (configs are not encrypted), MAC'd
//! store.manifest                               every entry's high-water mark, MAC-chained
//! quarantine/                                  files refused at start-up, kept
//! ```
//!
//! File names are hashes because seed names may be `.`/`..` or 253 characters long, which a
//! file name cannot hold; the real name is inside the file.
//!
//! Integrity (docs/crypto.md, "The node store"): every entry file ends in a MAC over all of its
//! content, under a key derived from the keyring, and carries the store generation it was
//! written at; [`manifest`] keeps the generation every entry must have. At start-up an entry
//! that fails its MAC, is older than the manifest says (rolled back), or is missing, is refused:
//! its file goes to `quarantine/` with an ERROR log line, and a read of it answers an error
//! instead of data, until it is written or deleted again.

mod files;
mod manifest;
mod records;
mod rekey;
pub mod writes;

pub use files::{
    create_private_dir, ensure_private_file, fsync_dir, write_atomic, write_private_file_atomic,
};
pub use manifest::AuditAnchor;
pub use records::{ConfigRecord, Origin, SecretRecord};
pub use rekey::{KeyUsage, Reencrypted};
pub use writes::{Fingerprint, RememberedWrite, WriteRecord};

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use crate::crypto::{KeyId, Keyring, MacKey, Purpose, SharedKeyring};
use crate::domain::{Kind, NamePrefix, Namespace, ObjectKey};
use manifest::Manifest;
use records::{Decoded, EntryKeys};

/// Why the store could not do what was asked. Messages name paths and objects, never data.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store I/O failed on {path}: {source}; check the data directory's disk and permissions"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The write would move an entry backwards (an older version, or a leftover event of an
    /// object that was deleted and re-created).
    #[error("refusing to replace {key}: {why}; a stored entry only moves forward")]
    Stale { key: ObjectKey, why: String },
    #[error("{key} changed since it was read ({why}); read it again and retry")]
    Changed { key: ObjectKey, why: &'static str },
    #[error(
        "{path} holds keys or tokens but other users may access it (mode {mode:03o}): run `chmod 600 {path}`, and consider whether it was read"
    )]
    OpenToOthers { path: PathBuf, mode: u32 },
    /// The store's own records contradict each other or fail their MACs, so nothing it holds
    /// can be vouched for: it refuses to open.
    #[error("{0}")]
    Integrity(String),
    /// The store was written under master keys the keyring does not hold: not damage, another
    /// keyring (a lost or replaced master key).
    #[error(
        "this data dir's store was written with master key(s) {found}, which the keyring (holding {held}) does not have: the master key was lost or replaced. Restore the keyring that holds {found} (dev mode: <data-dir>/master.key); nothing was changed"
    )]
    ForeignKeyring { found: String, held: String },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }

    pub(crate) fn foreign_keyring(found: &[KeyId], keyring: &Keyring) -> Self {
        let join = |ids: &mut dyn Iterator<Item = &KeyId>| {
            ids.map(KeyId::as_str).collect::<Vec<_>>().join(", ")
        };
        StoreError::ForeignKeyring {
            found: join(&mut found.iter()),
            held: join(&mut keyring.key_ids()),
        }
    }
}

/// How to open a store.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenOptions {
    /// Set the manifest aside and build a new one from the entries as they are on disk (each
    /// still has to pass its own MAC). For a data dir whose manifest was lost or damaged, after
    /// the operator has decided to trust its entries: rollback protection starts afresh.
    pub rebuild_manifest: bool,
}

/// What start-up found besides valid entries.
#[derive(Debug, Default)]
pub struct OpenReport {
    pub secrets: usize,
    pub configs: usize,
    /// Temporary files of writes a crash interrupted; never acknowledged, so removed.
    pub removed_temp_files: usize,
    /// Files refused (unreadable, failed their MAC, rolled back, unknown to the manifest),
    /// moved to `quarantine/` rather than deleted.
    pub quarantined: Vec<PathBuf>,
    /// Objects whose entry was refused or is missing: reads of them answer an error.
    pub refused: Vec<(Kind, ObjectKey, String)>,
    /// Entries of the unauthenticated format 1, migrated (MAC'd, given a generation).
    pub migrated: usize,
}

/// How many entries the store holds, and how many it refused at start-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub secrets: usize,
    pub configs: usize,
    pub refused_secrets: usize,
    pub refused_configs: usize,
}

/// What the store holds under a key.
#[derive(Debug)]
pub enum Lookup<R> {
    Found(Arc<R>),
    Missing,
    /// The entry was refused at start-up (the reason says why); it is not served.
    Quarantined(Arc<str>),
}

impl<R> Lookup<R> {
    pub fn found(self) -> Option<Arc<R>> {
        match self {
            Lookup::Found(r) => Some(r),
            _ => None,
        }
    }
}

/// The state a write expects to find, checked under the store's write lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expect {
    /// Whatever is there (the agent mirroring the API server, which is the source of truth).
    Any,
    /// Nothing (not even a refused entry).
    Absent,
    /// The entry as it was at this generation.
    Generation(u64),
    /// Nothing, or an entry that mirrors no later state of the Kubernetes object than this:
    /// a leftover event of a deleted object must not remove its re-created successor.
    NoNewerThan(Origin),
}

#[derive(Default)]
struct State {
    secrets: BTreeMap<ObjectKey, Arc<SecretRecord>>,
    configs: BTreeMap<ObjectKey, Arc<ConfigRecord>>,
    quarantined: HashMap<(Kind, ObjectKey), Arc<str>>,
    /// Remembered writes by idempotency key, from live entries and from deleted objects.
    writes: HashMap<String, RememberedWrite>,
}

pub struct Store {
    secrets_dir: PathBuf,
    configs_dir: PathBuf,
    keys: SharedKeyring,
    state: RwLock<State>,
    /// Every change goes through the manifest, one at a time: it hands out generations.
    manifest: Mutex<Manifest>,
    /// Master keys pruned from the keyring while the store was open ([`Store::with_writes_held`]):
    /// a write sealed under one of them is refused (see `put`).
    pruned: Mutex<std::collections::BTreeSet<KeyId>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("secrets_dir", &self.secrets_dir)
            .finish_non_exhaustive()
    }
}

fn file_name(kind: Kind, key: &ObjectKey) -> String {
    let digest = Sha256::digest(format!("{}/{}/{}", kind.as_str(), key.namespace, key.name));
    format!("{}.json", crate::hex::encode(&digest))
}

/// What the store needs of each kind of entry.
trait Entry: Sized + Send + Sync + 'static {
    const KIND: Kind;
    fn key(&self) -> &ObjectKey;
    fn generation(&self) -> u64;
    fn set_generation(&mut self, generation: u64);
    fn writes(&self) -> &[WriteRecord];
    fn to_file_bytes(&self, mac: &MacKey) -> Vec<u8>;
    fn map(state: &State) -> &BTreeMap<ObjectKey, Arc<Self>>;
    fn map_mut(state: &mut State) -> &mut BTreeMap<ObjectKey, Arc<Self>>;
    fn origin(&self) -> Option<&Origin>;
    /// The master key the entry's data is sealed under (secrets; configs are not encrypted).
    fn sealed_with(&self) -> Option<&KeyId> {
        None
    }
    /// Refuses a write that would move the entry backwards: a state of the Kubernetes object
    /// older than the stored one, including any state of an object that was deleted before the
    /// stored one was created (see `Origin::newer_than`).
    fn check_forward(stored: &Self, offered: &Self) -> Result<(), StoreError> {
        match (stored.origin(), offered.origin()) {
            (Some(s), Some(o)) if s.newer_than(o) => Err(StoreError::Stale {
                key: offered.key().clone(),
                why: newer_state(s, o),
            }),
            _ => Ok(()),
        }
    }
}

/// Why a stored origin wins over an offered one, for the error.
fn newer_state(stored: &Origin, offered: &Origin) -> String {
    let (s, o) = (
        stored.revision.unwrap_or_default(),
        offered.revision.unwrap_or_default(),
    );
    if stored.uid == offered.uid {
        format!(
            "it holds a later state of the object (resourceVersion {s}) than the one offered ({o})"
        )
    } else {
        format!(
            "it holds an object created after the one offered was (resourceVersion {s} against {o}): a deleted object's leftover"
        )
    }
}

impl Entry for SecretRecord {
    const KIND: Kind = Kind::Secret;
    fn key(&self) -> &ObjectKey {
        &self.key
    }
    fn generation(&self) -> u64 {
        self.generation
    }
    fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }
    fn writes(&self) -> &[WriteRecord] {
        &self.writes
    }
    fn to_file_bytes(&self, mac: &MacKey) -> Vec<u8> {
        SecretRecord::to_file_bytes(self, mac)
    }
    fn map(state: &State) -> &BTreeMap<ObjectKey, Arc<Self>> {
        &state.secrets
    }
    fn map_mut(state: &mut State) -> &mut BTreeMap<ObjectKey, Arc<Self>> {
        &mut state.secrets
    }
    fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
    }
    fn sealed_with(&self) -> Option<&KeyId> {
        Some(self.envelope.key_id())
    }
    /// As for any entry, and versions only move forward within one object's history (which is
    /// what decides when a revision is unknown); a re-created object (another uid) starts its
    /// own.
    fn check_forward(stored: &Self, offered: &Self) -> Result<(), StoreError> {
        let same_object =
            stored.origin.as_ref().map(|o| &o.uid) == offered.origin.as_ref().map(|o| &o.uid);
        match (stored.origin(), offered.origin()) {
            (Some(s), Some(o)) if s.newer_than(o) => Err(StoreError::Stale {
                key: offered.key.clone(),
                why: newer_state(s, o),
            }),
            _ if same_object && stored.version > offered.version => Err(StoreError::Stale {
                key: offered.key.clone(),
                why: format!(
                    "version {} is stored and version {} was offered",
                    stored.version.get(),
                    offered.version.get()
                ),
            }),
            _ => Ok(()),
        }
    }
}

impl Entry for ConfigRecord {
    const KIND: Kind = Kind::Config;
    fn key(&self) -> &ObjectKey {
        &self.key
    }
    fn generation(&self) -> u64 {
        self.generation
    }
    fn set_generation(&mut self, generation: u64) {
        self.generation = generation;
    }
    fn writes(&self) -> &[WriteRecord] {
        &self.writes
    }
    fn to_file_bytes(&self, mac: &MacKey) -> Vec<u8> {
        ConfigRecord::to_file_bytes(self, mac)
    }
    fn origin(&self) -> Option<&Origin> {
        self.origin.as_ref()
    }
    fn map(state: &State) -> &BTreeMap<ObjectKey, Arc<Self>> {
        &state.configs
    }
    fn map_mut(state: &mut State) -> &mut BTreeMap<ObjectKey, Arc<Self>> {
        &mut state.configs
    }
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir`, checks every entry against its MAC
    /// and the manifest, and loads what passes into memory.
    pub fn open(
        data_dir: &Path,
        keys: SharedKeyring,
        options: OpenOptions,
    ) -> Result<(Store, OpenReport), StoreError> {
        create_private_dir(data_dir)?;
        let secrets_dir = data_dir.join("secrets");
        let configs_dir = data_dir.join("configs");
        let quarantine_dir = data_dir.join("quarantine");
        create_private_dir(&secrets_dir)?;
        create_private_dir(&configs_dir)?;
        let ring = keys.current();
        let manifest_path = data_dir.join(manifest::FILE_NAME);
        if options.rebuild_manifest && manifest_path.exists() {
            let aside = data_dir.join(format!(
                "{}.replaced-{}",
                manifest::FILE_NAME,
                jiff::Timestamp::now().as_second()
            ));
            std::fs::rename(&manifest_path, &aside)
                .map_err(|e| StoreError::io(&manifest_path, e))?;
            tracing::warn!(old = %aside.display(), "store manifest set aside; rebuilding it from the entries on disk");
        }
        let entry_keys = EntryKeys::of(&ring);
        let mut report = OpenReport::default();
        // The manifest is read and checked on a thread of its own while the entry files are
        // read (on every core): neither needs the other until both are sorted below.
        let (existing, secrets, configs) = std::thread::scope(|scope| {
            let manifest = scope.spawn(|| Manifest::open(&manifest_path, &ring));
            let secrets = files::read_entries(&secrets_dir, &mut report, |name, b| {
                SecretRecord::from_file_bytes(b, &entry_keys).map(|d| in_its_file(d, name))
            });
            let configs = files::read_entries(&configs_dir, &mut report, |name, b| {
                ConfigRecord::from_file_bytes(b, &entry_keys).map(|d| in_its_file(d, name))
            });
            let existing = manifest
                .join()
                .expect("the store manifest's loading thread panicked");
            Ok::<_, StoreError>((existing?, secrets?, configs?))
        })?;

        let mut opening = Opening {
            dirs: [(Kind::Secret, &secrets_dir), (Kind::Config, &configs_dir)],
            quarantine_dir: &quarantine_dir,
            ring: &ring,
            manifest: existing,
            rebuild: options.rebuild_manifest,
            state: State::default(),
            report,
            refused_files: HashMap::new(),
            unmanifested: Vec::new(),
            candidates: Vec::new(),
            legacy: Vec::new(),
            foreign_keys: Default::default(),
        };
        opening.sort(secrets)?;
        opening.sort(configs)?;
        let (state, manifest, report) = opening.finish(manifest_path)?;
        Ok((
            Store {
                secrets_dir,
                configs_dir,
                keys,
                state: RwLock::new(state),
                manifest: Mutex::new(manifest),
                pruned: Mutex::default(),
            },
            report,
        ))
    }

    /// The audit chain's head as the manifest last recorded it (`None` before the audit log
    /// was first anchored, or after the manifest was rebuilt).
    pub fn audit_anchor(&self) -> Option<AuditAnchor> {
        let manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        manifest.audit_anchor().cloned()
    }

    /// Records the audit chain's head in the manifest, durably; nothing is written when it is
    /// the head already recorded.
    pub fn record_audit_anchor(&self, anchor: AuditAnchor) -> Result<(), StoreError> {
        let mut manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        if manifest.audit_anchor() == Some(&anchor) {
            return Ok(());
        }
        manifest.record_audit_anchor(&self.keys.current(), anchor)
    }

    /// Whether `data_dir` holds a store (a manifest or an entry), without opening it: a data
    /// dir with one must not be given a new master key.
    pub fn exists_in(data_dir: &Path) -> bool {
        let has_entries = |dir: &str| {
            std::fs::read_dir(data_dir.join(dir)).is_ok_and(|mut entries| {
                entries.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json")))
            })
        };
        data_dir.join(manifest::FILE_NAME).exists()
            || has_entries("secrets")
            || has_entries("configs")
    }

    /// The master key ids the manifest in `data_dir` names (unauthenticated: for messages).
    pub fn key_ids_in(data_dir: &Path) -> Vec<KeyId> {
        manifest::key_ids_named(&data_dir.join(manifest::FILE_NAME))
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn dir(&self, kind: Kind) -> &Path {
        match kind {
            Kind::Secret => &self.secrets_dir,
            Kind::Config => &self.configs_dir,
        }
    }

    fn lookup<R: Entry>(&self, key: &ObjectKey) -> Lookup<R> {
        let state = self.read();
        if let Some(r) = R::map(&state).get(key) {
            return Lookup::Found(r.clone());
        }
        match state.quarantined.get(&(R::KIND, key.clone())) {
            Some(why) => Lookup::Quarantined(why.clone()),
            None => Lookup::Missing,
        }
    }

    pub fn secret_entry(&self, key: &ObjectKey) -> Lookup<SecretRecord> {
        self.lookup(key)
    }

    pub fn config_entry(&self, key: &ObjectKey) -> Lookup<ConfigRecord> {
        self.lookup(key)
    }

    /// The secret held under `key`, if it is held and was not refused.
    pub fn secret(&self, key: &ObjectKey) -> Option<Arc<SecretRecord>> {
        self.secret_entry(key).found()
    }

    pub fn config(&self, key: &ObjectKey) -> Option<Arc<ConfigRecord>> {
        self.config_entry(key).found()
    }

    /// The secrets of `namespace` whose names start with `prefix`, sorted by name.
    pub fn list_secrets(
        &self,
        namespace: &Namespace,
        prefix: &NamePrefix,
    ) -> Vec<Arc<SecretRecord>> {
        list(&self.read().secrets, namespace, prefix)
    }

    /// The configs of `namespace` whose names start with `prefix`, sorted by name.
    pub fn list_configs(
        &self,
        namespace: &Namespace,
        prefix: &NamePrefix,
    ) -> Vec<Arc<ConfigRecord>> {
        list(&self.read().configs, namespace, prefix)
    }

    /// Every secret key held or refused, in any namespace (the agent uses it to find what to
    /// delete).
    pub fn secret_keys(&self) -> Vec<ObjectKey> {
        self.keys_of(Kind::Secret)
    }

    /// Every config key held or refused, in any namespace.
    pub fn config_keys(&self) -> Vec<ObjectKey> {
        self.keys_of(Kind::Config)
    }

    /// The generation the next write will get: every entry written from now on has this
    /// generation or a later one.
    pub fn next_generation(&self) -> u64 {
        self.manifest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .next_generation()
    }

    /// Every secret key held, with its entry's generation (0 for a refused one).
    pub fn secret_generations(&self) -> Vec<(ObjectKey, u64)> {
        self.generations_of(Kind::Secret)
    }

    /// Every config key held, with its entry's generation (0 for a refused one).
    pub fn config_generations(&self) -> Vec<(ObjectKey, u64)> {
        self.generations_of(Kind::Config)
    }

    fn generations_of(&self, kind: Kind) -> Vec<(ObjectKey, u64)> {
        let state = self.read();
        let held: Vec<(ObjectKey, u64)> = match kind {
            Kind::Secret => state
                .secrets
                .iter()
                .map(|(k, r)| (k.clone(), r.generation))
                .collect(),
            Kind::Config => state
                .configs
                .iter()
                .map(|(k, r)| (k.clone(), r.generation))
                .collect(),
        };
        let refused = state
            .quarantined
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| (key.clone(), 0));
        held.into_iter().chain(refused).collect()
    }

    fn keys_of(&self, kind: Kind) -> Vec<ObjectKey> {
        let state = self.read();
        let held: Vec<ObjectKey> = match kind {
            Kind::Secret => state.secrets.keys().cloned().collect(),
            Kind::Config => state.configs.keys().cloned().collect(),
        };
        let refused = state
            .quarantined
            .keys()
            .filter(|(k, _)| *k == kind)
            .map(|(_, key)| key.clone());
        held.into_iter().chain(refused).collect()
    }

    pub fn counts(&self) -> Counts {
        let state = self.read();
        let refused = |kind: Kind| state.quarantined.keys().filter(|(k, _)| *k == kind).count();
        Counts {
            secrets: state.secrets.len(),
            configs: state.configs.len(),
            refused_secrets: refused(Kind::Secret),
            refused_configs: refused(Kind::Config),
        }
    }

    /// The write remembered under `idempotency_key`, if it is still within its retention.
    pub fn remembered_write(&self, idempotency_key: &str) -> Option<RememberedWrite> {
        let state = self.read();
        let found = state.writes.get(idempotency_key)?;
        (!found.record.expired(jiff::Timestamp::now())).then(|| found.clone())
    }

    /// Durably writes `record` (if the entry is as `expect`ed), then makes it visible. Refuses
    /// to replace a newer version of the same secret. Concurrent readers see the old or the new
    /// record.
    pub fn put_secret(
        &self,
        record: SecretRecord,
        expect: Expect,
    ) -> Result<Arc<SecretRecord>, StoreError> {
        self.put(record, expect)
    }

    pub fn put_config(
        &self,
        record: ConfigRecord,
        expect: Expect,
    ) -> Result<Arc<ConfigRecord>, StoreError> {
        self.put(record, expect)
    }

    /// Removes a secret (durably; the manifest records the delete first), keeping the writes it
    /// remembers plus `writes` (a delete's own) for their retention. Returns the removed record.
    pub fn delete_secret(
        &self,
        key: &ObjectKey,
        expect: Expect,
        writes: Vec<WriteRecord>,
    ) -> Result<Option<Arc<SecretRecord>>, StoreError> {
        self.delete::<SecretRecord>(key, expect, writes)
    }

    pub fn delete_config(
        &self,
        key: &ObjectKey,
        expect: Expect,
        writes: Vec<WriteRecord>,
    ) -> Result<Option<Arc<ConfigRecord>>, StoreError> {
        self.delete::<ConfigRecord>(key, expect, writes)
    }

    fn check_expect<R: Entry>(&self, key: &ObjectKey, expect: &Expect) -> Result<(), StoreError> {
        let lookup = self.lookup::<R>(key);
        if let (Expect::NoNewerThan(offered), Lookup::Found(r)) = (expect, &lookup)
            && let Some(stored) = r.origin()
            && stored.newer_than(offered)
        {
            return Err(StoreError::Stale {
                key: key.clone(),
                why: newer_state(stored, offered),
            });
        }
        let found = match lookup {
            Lookup::Found(r) => Some(r.generation()),
            Lookup::Quarantined(_) => Some(0),
            Lookup::Missing => None,
        };
        let why = match (expect, found) {
            (Expect::Any | Expect::NoNewerThan(_), _) | (Expect::Absent, None) => return Ok(()),
            (Expect::Generation(g), Some(f)) if *g == f => return Ok(()),
            (Expect::Absent, Some(_)) => "it exists",
            (Expect::Generation(_), Some(_)) => "it was written since",
            (Expect::Generation(_), None) => "it was deleted since",
        };
        Err(StoreError::Changed {
            key: key.clone(),
            why,
        })
    }

    fn put<R: Entry>(&self, mut record: R, expect: Expect) -> Result<Arc<R>, StoreError> {
        let mut manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        let ring = self.keys.current();
        self.check_expect::<R>(record.key(), &expect)?;
        // Sealed from a keyring snapshot taken before a retired key was pruned (under this
        // lock, see `rekey`): stored, it could never be opened again. (Only pruned keys: an
        // agent may store an envelope under a key its keyring is about to receive.)
        let pruned = self.pruned.lock().unwrap_or_else(|e| e.into_inner());
        if record.sealed_with().is_some_and(|id| pruned.contains(id)) {
            return Err(StoreError::Changed {
                key: record.key().clone(),
                why: "the master key it was sealed under was removed from the keyring meanwhile",
            });
        }
        drop(pruned);
        let previous = self.lookup::<R>(record.key()).found();
        if let Some(stored) = &previous {
            R::check_forward(stored, &record)?;
        }
        let generation = manifest.next_generation();
        record.set_generation(generation);
        let mac = MacKey::active(&ring, Purpose::StoreEntry);
        let dir = self.dir(R::KIND);
        let name = file_name(R::KIND, record.key());
        // The entry must not outlive a change the manifest never recorded: if the write fails
        // after its file replaced the old one (only the directory's fsync failed), or the
        // manifest line cannot be written, what was there is put back. If even that fails, a
        // restart adopts the entry (it is exactly one generation ahead): the one case where a
        // failed write can surface later, and it is logged.
        let undo = || {
            let undone = match &previous {
                Some(p) => write_atomic(dir, &name, &p.to_file_bytes(&mac)),
                None => files::remove_durably(dir, &name),
            };
            if let Err(undo) = undone {
                tracing::error!(key = %record.key(), error = %undo,
                    "a failed store write could not be undone; it will reappear after a restart");
            }
        };
        if let Err(failed) = files::write_atomic_tracked(dir, &name, &record.to_file_bytes(&mac)) {
            if failed.replaced {
                undo();
            }
            return Err(failed.error);
        }
        if let Err(e) = manifest.record_put(&ring, R::KIND, record.key(), generation) {
            undo();
            return Err(e);
        }
        let record = Arc::new(record);
        let mut state = self.write();
        if let Some(p) = &previous {
            for w in p.writes() {
                state.writes.remove(&w.idempotency_key);
            }
        }
        index_writes(&mut state, R::KIND, record.key(), record.writes());
        state.quarantined.remove(&(R::KIND, record.key().clone()));
        R::map_mut(&mut state).insert(record.key().clone(), record.clone());
        Ok(record)
    }

    fn delete<R: Entry>(
        &self,
        key: &ObjectKey,
        expect: Expect,
        extra_writes: Vec<WriteRecord>,
    ) -> Result<Option<Arc<R>>, StoreError> {
        let mut manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
        let ring = self.keys.current();
        self.check_expect::<R>(key, &expect)?;
        let lookup = self.lookup::<R>(key);
        if matches!(lookup, Lookup::Missing) && extra_writes.is_empty() {
            return Ok(None);
        }
        let current = lookup.found();
        let mut writes: Vec<WriteRecord> =
            current.iter().flat_map(|r| r.writes().to_vec()).collect();
        writes.extend(extra_writes);
        let writes = writes::retained(writes, jiff::Timestamp::now());
        manifest.record_delete(&ring, R::KIND, key, writes.clone())?;
        let dir = self.dir(R::KIND);
        if let Err(e) = files::remove_durably(dir, &file_name(R::KIND, key)) {
            // The delete is committed (the manifest says so); start-up removes the file.
            tracing::error!(%key, error = %e, "a deleted entry's file could not be removed; it is removed at the next start");
        }
        let mut state = self.write();
        if let Some(r) = &current {
            for w in r.writes() {
                state.writes.remove(&w.idempotency_key);
            }
        }
        index_writes(&mut state, R::KIND, key, &writes);
        state.quarantined.remove(&(R::KIND, key.clone()));
        R::map_mut(&mut state).remove(key);
        Ok(current)
    }
}

fn index_writes(state: &mut State, kind: Kind, key: &ObjectKey, writes: &[WriteRecord]) {
    for w in writes {
        state.writes.insert(
            w.idempotency_key.clone(),
            RememberedWrite {
                kind,
                key: key.clone(),
                record: w.clone(),
            },
        );
    }
}

fn list<R>(
    map: &BTreeMap<ObjectKey, Arc<R>>,
    namespace: &Namespace,
    prefix: &NamePrefix,
) -> Vec<Arc<R>> {
    // Keys sort by namespace, then name: one namespace is a contiguous, name-sorted range.
    map.iter()
        .filter(|(k, _)| &k.namespace == namespace && prefix.matches(&k.name))
        .map(|(_, r)| r.clone())
        .collect()
}

/// An entry file as decoded, and whether it is the file its entry belongs in (always true of
/// what is not an authenticated entry: nothing to tell). Checked while the files are read, on
/// every core: the file name is a hash of the entry's key.
fn in_its_file<R: Entry>(decoded: Decoded<R>, file: &str) -> (Decoded<R>, bool) {
    let in_place = match &decoded {
        Decoded::Authentic(record) => file_name(R::KIND, record.key()) == file,
        Decoded::Legacy(_) | Decoded::ForeignKey(_) => true,
    };
    (decoded, in_place)
}

/// Start-up: entries read from disk, sorted into accepted, refused and pending, then checked
/// against the manifest.
struct Opening<'a> {
    dirs: [(Kind, &'a PathBuf); 2],
    quarantine_dir: &'a Path,
    ring: &'a Keyring,
    manifest: Option<Manifest>,
    rebuild: bool,
    state: State,
    report: OpenReport,
    /// File names of refused files (to name the object a manifest line expected there).
    refused_files: HashMap<String, String>,
    /// Authenticated entries found while there is no manifest.
    unmanifested: Vec<Pending>,
    /// Entries exactly one generation ahead of the manifest: a put a crash interrupted between
    /// its entry and its manifest line.
    candidates: Vec<Pending>,
    /// Format-1 entries.
    legacy: Vec<Pending>,
    /// Master keys that authenticated entries but are not in the keyring.
    foreign_keys: std::collections::BTreeSet<crate::crypto::KeyId>,
}

/// An entry not yet accepted.
enum Pending {
    Secret(PathBuf, SecretRecord),
    Config(PathBuf, ConfigRecord),
}

trait IntoPending: Entry {
    fn pending(path: PathBuf, record: Self) -> Pending;
}

impl IntoPending for SecretRecord {
    fn pending(path: PathBuf, record: Self) -> Pending {
        Pending::Secret(path, record)
    }
}

impl IntoPending for ConfigRecord {
    fn pending(path: PathBuf, record: Self) -> Pending {
        Pending::Config(path, record)
    }
}

impl Opening<'_> {
    fn dir(&self, kind: Kind) -> &Path {
        self.dirs
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, d)| d.as_path())
            .expect("both kinds have a directory")
    }

    fn refuse_file(&mut self, path: &Path, reason: &str) -> Result<(), StoreError> {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("")
            .to_owned();
        let to = files::quarantine(path, self.quarantine_dir, reason)?;
        self.refused_files.insert(name, reason.to_owned());
        self.report.quarantined.push(to);
        Ok(())
    }

    fn refuse_object(&mut self, kind: Kind, key: &ObjectKey, reason: String) {
        tracing::error!(kind = kind.as_str(), %key, reason, "store entry refused: it is not served until it is written or deleted again");
        self.state
            .quarantined
            .insert((kind, key.clone()), Arc::from(reason.as_str()));
        self.report.refused.push((kind, key.clone(), reason));
    }

    fn accept<R: Entry>(&mut self, record: R) {
        index_writes(&mut self.state, R::KIND, record.key(), record.writes());
        R::map_mut(&mut self.state).insert(record.key().clone(), Arc::new(record));
    }

    /// Sorts the entries of one kind.
    fn sort<R: IntoPending>(
        &mut self,
        loaded: Vec<files::Parsed<(Decoded<R>, bool)>>,
    ) -> Result<(), StoreError> {
        for (path, parsed) in loaded {
            let (parsed, in_place) = match parsed {
                Ok((decoded, in_place)) => (Ok(decoded), in_place),
                Err(why) => (Err(why), true),
            };
            let record = match parsed {
                Err(why) => {
                    self.refuse_file(&path, &format!("unreadable: {why}"))?;
                    continue;
                }
                Ok(Decoded::Legacy(record)) => {
                    self.legacy.push(R::pending(path, record));
                    continue;
                }
                Ok(Decoded::ForeignKey(id)) => {
                    self.foreign_keys.insert(id);
                    continue;
                }
                Ok(Decoded::Authentic(record)) => record,
            };
            if !in_place {
                self.refuse_file(
                    &path,
                    &format!("it holds {}, which belongs in another file", record.key()),
                )?;
                continue;
            }
            let Some(manifest) = &self.manifest else {
                self.unmanifested.push(R::pending(path, record));
                continue;
            };
            let generation = record.generation();
            match manifest.mark(R::KIND, record.key()) {
                Some(m) if !m.deleted && m.generation == generation => self.accept(record),
                Some(m) if m.deleted && generation < m.generation => {
                    // A delete that a crash interrupted after its manifest line.
                    files::remove_durably(self.dir(R::KIND), &file_name(R::KIND, record.key()))?;
                }
                _ if generation == manifest.next_generation() => {
                    self.candidates.push(R::pending(path, record));
                }
                Some(m) if generation < m.generation => {
                    let why = format!(
                        "rolled back: its entry is from store generation {generation}, but generation {} was written since",
                        m.generation
                    );
                    let key = record.key().clone();
                    self.refuse_file(&path, &why)?;
                    self.refuse_object(R::KIND, &key, why);
                }
                _ => {
                    let why = "the store manifest has no record of this entry (restored from elsewhere, or forged)".to_owned();
                    self.refuse_file(&path, &why)?;
                }
            }
        }
        Ok(())
    }

    fn adopt(&mut self, pending: Pending, generation: Option<u64>) -> Result<(), StoreError> {
        match pending {
            Pending::Secret(path, record) => self.adopt_one(path, record, generation),
            Pending::Config(path, record) => self.adopt_one(path, record, generation),
        }
    }

    /// Records an entry in the manifest: as it is (`generation` None), or rewritten at a new
    /// generation (a migrated format-1 entry).
    fn adopt_one<R: Entry>(
        &mut self,
        path: PathBuf,
        mut record: R,
        generation: Option<u64>,
    ) -> Result<(), StoreError> {
        let manifest = self.manifest.as_mut().expect("created before adopting");
        if let Some(g) = generation {
            record.set_generation(g);
            let mac = MacKey::active(self.ring, Purpose::StoreEntry);
            let dir = path.parent().unwrap_or(Path::new("."));
            write_atomic(
                dir,
                &file_name(R::KIND, record.key()),
                &record.to_file_bytes(&mac),
            )?;
        }
        manifest.record_put(self.ring, R::KIND, record.key(), record.generation())?;
        self.accept(record);
        Ok(())
    }

    fn finish(
        mut self,
        manifest_path: PathBuf,
    ) -> Result<(State, Manifest, OpenReport), StoreError> {
        if !self.foreign_keys.is_empty() {
            let ids: Vec<KeyId> = self.foreign_keys.iter().cloned().collect();
            return Err(StoreError::foreign_keyring(&ids, self.ring));
        }
        if self.manifest.is_none() {
            if !self.unmanifested.is_empty() && !self.rebuild {
                return Err(StoreError::Integrity(format!(
                    "the store manifest {} is missing, but {} authenticated entries exist: the manifest was deleted or lost, so a rolled-back entry could not be told from a current one. Restore the data directory from a backup, or start with --rebuild-store-manifest to accept the entries as they are",
                    manifest_path.display(),
                    self.unmanifested.len()
                )));
            }
            let next = self
                .unmanifested
                .iter()
                .map(|p| match p {
                    Pending::Secret(_, r) => r.generation,
                    Pending::Config(_, r) => r.generation,
                })
                .max()
                .unwrap_or(0)
                + 1;
            self.manifest = Some(Manifest::create(&manifest_path, self.ring, next)?);
            for pending in std::mem::take(&mut self.unmanifested) {
                self.adopt(pending, None)?;
            }
            let legacy = std::mem::take(&mut self.legacy);
            self.report.migrated = legacy.len();
            for pending in legacy {
                let next = self.manifest.as_ref().expect("created").next_generation();
                self.adopt(pending, Some(next))?;
            }
            if self.report.migrated > 0 {
                tracing::info!(
                    entries = self.report.migrated,
                    "store entries migrated to the authenticated format"
                );
            }
        } else {
            for pending in std::mem::take(&mut self.legacy) {
                let path = match &pending {
                    Pending::Secret(p, _) | Pending::Config(p, _) => p.clone(),
                };
                self.refuse_file(&path, "an entry in the old, unauthenticated format appeared beside an authenticated store (a downgrade)")?;
            }
            let mut candidates = std::mem::take(&mut self.candidates).into_iter();
            if let Some(first) = candidates.next() {
                tracing::warn!(
                    "a store write interrupted by a crash before its manifest line is adopted"
                );
                self.adopt(first, None)?;
            }
            for other in candidates {
                let path = match &other {
                    Pending::Secret(p, _) | Pending::Config(p, _) => p.clone(),
                };
                self.refuse_file(
                    &path,
                    "it claims a store generation another entry already has",
                )?;
            }
        }
        let manifest = self.manifest.take().expect("opened or created");
        // Objects the manifest says exist but whose entry was not accepted.
        let missing: Vec<(Kind, ObjectKey)> = manifest
            .live()
            .filter(|(kind, key, _)| {
                let held = match kind {
                    Kind::Secret => self.state.secrets.contains_key(*key),
                    Kind::Config => self.state.configs.contains_key(*key),
                };
                !held
                    && !self
                        .state
                        .quarantined
                        .contains_key(&(*kind, (*key).clone()))
            })
            .map(|(kind, key, _)| (kind, key.clone()))
            .collect();
        for (kind, key) in missing {
            let why = match self.refused_files.get(&file_name(kind, &key)) {
                Some(reason) => format!("its entry was refused: {reason}"),
                None => "its entry file is missing".to_owned(),
            };
            self.refuse_object(kind, &key, why);
        }
        let now = jiff::Timestamp::now();
        let tombstones: Vec<(Kind, ObjectKey, WriteRecord)> = manifest
            .tombstones()
            .filter(|(_, _, w)| !w.expired(now))
            .map(|(kind, key, w)| (kind, key.clone(), w.clone()))
            .collect();
        for (kind, key, w) in tombstones {
            // A live entry's own record of the same key is newer; keep it.
            self.state
                .writes
                .entry(w.idempotency_key.clone())
                .or_insert(RememberedWrite {
                    kind,
                    key,
                    record: w,
                });
        }
        self.report.secrets = self.state.secrets.len();
        self.report.configs = self.state.configs.len();
        Ok((self.state, manifest, self.report))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{self, SecretIdentity};
    use crate::domain::{Name, Version, WorkloadSet};
    use jiff::Timestamp;

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Namespace::default_namespace(), Name::parse(name).unwrap())
    }

    fn secret(keyring: &Keyring, name: &str, version: u64) -> SecretRecord {
        let key = key(name);
        let version = Version::new(version).unwrap();
        let data = serde_json::from_value(serde_json::json!({"v": version.to_string()})).unwrap();
        let identity = SecretIdentity {
            kind: Kind::Secret,
            namespace: &key.namespace,
            name: &key.name,
            version,
        };
        SecretRecord {
            envelope: crypto::seal(keyring, &identity, &data).unwrap(),
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

    fn open(dir: &Path, keyring: &Keyring) -> Result<(Store, OpenReport), StoreError> {
        Store::open(
            dir,
            SharedKeyring::new(keyring.clone()),
            OpenOptions::default(),
        )
    }

    fn write_record(idempotency_key: &str) -> WriteRecord {
        WriteRecord {
            idempotency_key: idempotency_key.to_owned(),
            caller: "admin".to_owned(),
            command: "secret.delete".to_owned(),
            fingerprint: Fingerprint {
                key_id: crate::crypto::KeyId::parse("k-1").unwrap(),
                mac: "00".repeat(32),
            },
            result: serde_json::json!({"deleted": true}),
            request_id: "r-1".to_owned(),
            at: Timestamp::now(),
        }
    }

    fn anchor(seq: u64) -> AuditAnchor {
        AuditAnchor {
            seq,
            hash: format!("{seq:064x}"),
        }
    }

    /// What the store holds, as (name, version) pairs, for comparing states.
    fn holding(store: &Store) -> Vec<(String, u64)> {
        store
            .secret_keys()
            .into_iter()
            .map(|k| {
                let v = store.secret(&k).unwrap().version.get();
                (k.name.to_string(), v)
            })
            .collect()
    }

    /// A config (which has no version of its own) is not moved back either: not by an older
    /// state of its object, nor by a deleted object's leftover; a newer state replaces it.
    #[test]
    fn a_config_never_goes_back_to_an_older_state_of_its_object() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        let config = |uid: &str, rv: &str, value: &str| ConfigRecord {
            key: key("app"),
            data: serde_json::from_value(serde_json::json!({"v": value})).unwrap(),
            immutable: false,
            created_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::UNIX_EPOCH,
            origin: Some(Origin::of(uid, Some(rv))),
            writes: Vec::new(),
            generation: 0,
        };
        let value = |store: &Store| store.config(&key("app")).unwrap().data.clone();
        store
            .put_config(config("uid-2", "30", "new"), Expect::Any)
            .unwrap();
        for stale in [
            config("uid-2", "29", "older"),
            config("uid-1", "20", "deleted"),
        ] {
            let e = store.put_config(stale, Expect::Any).unwrap_err();
            assert!(matches!(e, StoreError::Stale { .. }), "{e}");
            assert!(e.to_string().contains("only moves forward"), "{e}");
        }
        assert_eq!(value(&store), config("", "0", "new").data);
        let e = store
            .delete_config(
                &key("app"),
                Expect::NoNewerThan(Origin::of("uid-1", Some("25"))),
                Vec::new(),
            )
            .unwrap_err();
        assert!(matches!(e, StoreError::Stale { .. }), "{e}");
        store
            .put_config(config("uid-2", "31", "newer"), Expect::Any)
            .unwrap();
        assert_eq!(value(&store), config("", "0", "newer").data);
        store
            .delete_config(
                &key("app"),
                Expect::NoNewerThan(Origin::of("uid-2", Some("32"))),
                Vec::new(),
            )
            .unwrap();
        assert!(store.config(&key("app")).is_none());
    }

    /// Every write (create, update, delete, a compaction) failing at every step of its durable
    /// writes (the entry file's open, write, fsync, rename and directory fsync; the manifest
    /// line's write and fsync), one fault at a time: the store reopens with nothing refused, and
    /// holds exactly what it held before the write, or after it if the write was acknowledged.
    #[test]
    fn a_write_failing_at_any_step_reopens_cleanly_with_nothing_acknowledged_lost() {
        use crate::faults::{Step, fail_at, take_fired};
        let keyring = Keyring::generate().unwrap();
        type Write = fn(&Store, &Keyring) -> Result<(), StoreError>;
        let writes: [(&str, Write); 4] = [
            ("create", |s, k| {
                s.put_secret(secret(k, "new", 1), Expect::Absent).map(drop)
            }),
            ("update", |s, k| {
                s.put_secret(secret(k, "kept", 2), Expect::Any).map(drop)
            }),
            ("delete", |s, _| {
                s.delete_secret(&key("gone"), Expect::Any, Vec::new())
                    .map(drop)
            }),
            ("compaction", |s, k| {
                // Enough updates of one entry to compact the manifest (COMPACT_SLACK in tests).
                for v in 2..=12 {
                    s.put_secret(secret(k, "churn", v), Expect::Any)?;
                }
                Ok(())
            }),
        ];
        let mut faults_fired = 0;
        for (what, write) in writes {
            for step in Step::ALL {
                for skip in 0..3 {
                    let dir = tempfile::tempdir().unwrap();
                    let (store, _) = open(dir.path(), &keyring).unwrap();
                    for name in ["kept", "gone", "churn"] {
                        store
                            .put_secret(secret(&keyring, name, 1), Expect::Absent)
                            .unwrap();
                    }
                    let before = holding(&store);
                    fail_at(step, skip);
                    let result = write(&store, &keyring);
                    let fired = take_fired();
                    faults_fired += usize::from(fired);
                    let after_in_memory = holding(&store);
                    drop(store);

                    let case = format!("{what}, fault at {step:?} #{skip}: {result:?}");
                    let (store, report) = open(dir.path(), &keyring)
                        .unwrap_or_else(|e| panic!("{case}: reopening failed: {e}"));
                    assert!(
                        report.refused.is_empty() && report.quarantined.is_empty(),
                        "{case}: {report:?}"
                    );
                    let reopened = holding(&store);
                    if result.is_ok() {
                        assert_eq!(reopened, after_in_memory, "{case}: acknowledged, then lost");
                    } else if what != "compaction" {
                        assert_eq!(
                            reopened, before,
                            "{case}: failed, yet applied after a restart"
                        );
                    } else {
                        // The updates before the failing one were acknowledged.
                        assert_eq!(reopened, after_in_memory, "{case}");
                    }
                    // And the store goes on taking writes.
                    store
                        .put_secret(secret(&keyring, "after", 1), Expect::Absent)
                        .unwrap_or_else(|e| panic!("{case}: then {e}"));
                }
            }
        }
        assert!(faults_fired > 20, "only {faults_fired} faults happened");
    }

    // Property tests of the store's parsers of its own files (on-disk input: a disk, a backup
    // or an attacker may have changed them). PROPTEST_CASES runs them longer.
    proptest::proptest! {
        /// Arbitrary bytes as an entry file: decoded or refused, never a panic.
        #[test]
        fn any_bytes_are_an_entry_or_an_error(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let keyring = Keyring::generate().unwrap();
            let keys = records::EntryKeys::of(&keyring);
            let _ = SecretRecord::from_file_bytes(&bytes, &keys);
            let _ = ConfigRecord::from_file_bytes(&bytes, &keys);
        }

        /// An entry written reads back as itself; any byte of it changed and it is never
        /// accepted as authentic.
        #[test]
        fn an_entry_reads_back_until_a_byte_of_it_changes(
            name in "[a-z0-9][a-z0-9._-]{0,40}",
            version in 1u64..1000,
            generation in 0u64..1_000_000,
            at in proptest::prelude::any::<proptest::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let keyring = Keyring::generate().unwrap();
            let keys = records::EntryKeys::of(&keyring);
            let mut record = secret(&keyring, &name, version);
            record.generation = generation;
            let bytes = record.to_file_bytes(&MacKey::active(&keyring, Purpose::StoreEntry));
            match SecretRecord::from_file_bytes(&bytes, &keys) {
                Ok(Decoded::Authentic(back)) => {
                    proptest::prop_assert_eq!(&back.key, &record.key);
                    proptest::prop_assert_eq!(back.version, record.version);
                    proptest::prop_assert_eq!(back.generation, generation);
                    proptest::prop_assert!(back.envelope == record.envelope);
                }
                _ => proptest::prop_assert!(false, "a fresh entry did not read back"),
            }
            let mut tampered = bytes.clone();
            tampered[at.index(bytes.len())] ^= flip;
            let authentic = matches!(
                SecretRecord::from_file_bytes(&tampered, &keys),
                Ok(Decoded::Authentic(_))
            );
            proptest::prop_assert!(!authentic, "a changed entry passed its MAC");
        }

        /// Arbitrary bytes as the store manifest: the store opens or refuses, never panics.
        #[test]
        fn any_bytes_as_the_manifest_open_or_refuse(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..1024)) {
            let dir = tempfile::tempdir().unwrap();
            std::fs::write(dir.path().join(manifest::FILE_NAME), &bytes).unwrap();
            let _ = open(dir.path(), &Keyring::generate().unwrap());
        }
    }

    #[test]
    fn an_entry_file_larger_than_any_entry_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        drop(open(dir.path(), &keyring).unwrap());
        let huge = dir
            .path()
            .join("secrets")
            .join(format!("{}.json", "a".repeat(64)));
        std::fs::write(&huge, vec![b' '; 9 << 20]).unwrap();
        let (_, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.quarantined.len(), 1, "{report:?}");
    }

    #[test]
    fn the_audit_anchor_survives_reopening_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        assert_eq!(store.audit_anchor(), None);
        store
            .put_secret(secret(&keyring, "kept", 1), Expect::Absent)
            .unwrap();
        store.record_audit_anchor(anchor(1)).unwrap();
        drop(store);
        let (store, _) = open(dir.path(), &keyring).unwrap();
        assert_eq!(store.audit_anchor(), Some(anchor(1)));

        // Anchors alone grow the journal until it is compacted; the last one is kept.
        for seq in 2..=60 {
            store.record_audit_anchor(anchor(seq)).unwrap();
        }
        // The same head again writes nothing.
        let path = dir.path().join(manifest::FILE_NAME);
        let before = std::fs::metadata(&path).unwrap().len();
        store.record_audit_anchor(anchor(60)).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().len(), before);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().count() < 30, "compacted: {text}");
        assert!(
            text.lines().next().unwrap().contains("\"audit\":{\"seq\":"),
            "{text}"
        );
        drop(store);
        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert!(report.refused.is_empty(), "{report:?}");
        assert_eq!(store.audit_anchor(), Some(anchor(60)));
        assert_eq!(store.secret(&key("kept")).unwrap().version.get(), 1);

        // An anchor line edited to point elsewhere fails its MAC.
        drop(store);
        let edited = text.replace(&format!("{:064x}", 60), &format!("{:064x}", 7));
        assert_ne!(edited, text);
        std::fs::write(&path, edited).unwrap();
        assert!(matches!(
            open(dir.path(), &keyring),
            Err(StoreError::Integrity(_))
        ));
    }

    #[test]
    fn changes_survive_reopening_and_compaction() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        store
            .put_secret(secret(&keyring, "kept", 1), Expect::Absent)
            .unwrap();
        // Enough changes to compact the manifest several times over.
        for v in 1..=40 {
            let r = store
                .put_secret(secret(&keyring, "churn", v), Expect::Any)
                .unwrap();
            assert!(r.generation > 1);
        }
        store
            .delete_secret(&key("churn"), Expect::Any, vec![write_record("del-1")])
            .unwrap();
        assert!(matches!(
            store.put_secret(secret(&keyring, "kept", 2), Expect::Generation(0)),
            Err(StoreError::Changed { .. })
        ));
        let manifest = std::fs::read_to_string(dir.path().join(manifest::FILE_NAME)).unwrap();
        assert!(manifest.lines().count() < 30, "compacted: {manifest}");
        drop(store);

        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert!(
            report.refused.is_empty() && report.quarantined.is_empty(),
            "{report:?}"
        );
        assert_eq!(store.secret(&key("kept")).unwrap().version.get(), 1);
        assert!(store.secret(&key("churn")).is_none());
        // The deleted object's remembered writes are still there.
        assert_eq!(store.remembered_write("del-1").unwrap().key, key("churn"));
    }

    #[test]
    fn rolled_back_edited_and_missing_entries_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        store
            .put_secret(secret(&keyring, "rb", 1), Expect::Absent)
            .unwrap();
        let file = dir
            .path()
            .join("secrets")
            .join(file_name(Kind::Secret, &key("rb")));
        let v1 = std::fs::read(&file).unwrap();
        store
            .put_secret(secret(&keyring, "rb", 2), Expect::Any)
            .unwrap();
        store
            .put_secret(secret(&keyring, "edited", 1), Expect::Absent)
            .unwrap();
        store
            .put_secret(secret(&keyring, "gone", 1), Expect::Absent)
            .unwrap();
        store
            .put_secret(secret(&keyring, "fine", 1), Expect::Absent)
            .unwrap();
        drop(store);

        std::fs::write(&file, &v1).unwrap();
        let edited = dir
            .path()
            .join("secrets")
            .join(file_name(Kind::Secret, &key("edited")));
        let text = std::fs::read_to_string(&edited).unwrap();
        std::fs::write(&edited, text.replace("\"version\":1", "\"version\":9")).unwrap();
        std::fs::remove_file(
            dir.path()
                .join("secrets")
                .join(file_name(Kind::Secret, &key("gone"))),
        )
        .unwrap();

        let (store, report) = open(dir.path(), &keyring).unwrap();
        let refused: Vec<String> = report
            .refused
            .iter()
            .map(|(_, k, _)| k.name.to_string())
            .collect();
        assert_eq!(refused.len(), 3, "{report:?}");
        for name in ["rb", "edited", "gone"] {
            assert!(
                matches!(store.secret_entry(&key(name)), Lookup::Quarantined(_)),
                "{name}"
            );
        }
        assert_eq!(store.secret(&key("fine")).unwrap().version.get(), 1);
        assert_eq!(
            report.quarantined.len(),
            2,
            "the rolled-back and the edited file"
        );
        // A refused entry is cleared by a delete, then the name is free.
        store
            .delete_secret(&key("rb"), Expect::Any, Vec::new())
            .unwrap();
        store
            .put_secret(secret(&keyring, "rb", 1), Expect::Absent)
            .unwrap();
        drop(store);
        let (_, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.refused.len(), 2, "{report:?}");
    }

    #[test]
    fn a_crash_between_entry_and_manifest_line_is_adopted_and_a_broken_manifest_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        store
            .put_secret(secret(&keyring, "a", 1), Expect::Absent)
            .unwrap();
        store
            .put_secret(secret(&keyring, "a", 2), Expect::Any)
            .unwrap();
        drop(store);
        // The manifest line of the last put was lost (the crash came after the entry file).
        let path = dir.path().join(manifest::FILE_NAME);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let shorter = lines[..lines.len() - 1].join("\n") + "\n";
        std::fs::write(&path, &shorter).unwrap();
        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert!(report.refused.is_empty(), "{report:?}");
        assert_eq!(store.secret(&key("a")).unwrap().version.get(), 2);
        drop(store);

        // A line cut short (a crash mid-append) is cut off; an edited line refuses the store.
        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(b"{\"seq\":99,\"op");
        std::fs::write(&path, &torn).unwrap();
        assert!(open(dir.path(), &keyring).is_ok());
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(
            &path,
            text.replacen("\"generation\":", "\"generation\":1", 1),
        )
        .unwrap();
        let err = open(dir.path(), &keyring).unwrap_err().to_string();
        assert!(err.contains("--rebuild-store-manifest"), "{err}");
        // Rebuilt on request, from the entries as they are.
        let (store, _) = Store::open(
            dir.path(),
            SharedKeyring::new(keyring.clone()),
            OpenOptions {
                rebuild_manifest: true,
            },
        )
        .unwrap();
        assert_eq!(store.secret(&key("a")).unwrap().version.get(), 2);
        drop(store);
        // And a missing manifest with entries present refuses too.
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            open(dir.path(), &keyring),
            Err(StoreError::Integrity(_))
        ));
        // A keyring that did not write the store cannot vouch for it.
        let foreign = open(dir.path(), &Keyring::generate().unwrap());
        assert!(foreign.is_err(), "{:?}", foreign.map(|(_, r)| r));
    }

    #[test]
    fn an_authentic_entry_in_another_entrys_file_is_refused() {
        // The file name is checked on the threads that load the entries: a copy of one entry
        // under another's name is still found, and the entry in its own file still served.
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        store
            .put_secret(secret(&keyring, "here", 1), Expect::Absent)
            .unwrap();
        drop(store);
        let secrets = dir.path().join("secrets");
        let elsewhere = secrets.join(file_name(Kind::Secret, &key("elsewhere")));
        std::fs::copy(
            secrets.join(file_name(Kind::Secret, &key("here"))),
            &elsewhere,
        )
        .unwrap();
        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.quarantined.len(), 1, "{report:?}");
        assert!(!elsewhere.exists());
        assert_eq!(store.secret(&key("here")).unwrap().version.get(), 1);
        assert!(matches!(
            store.secret_entry(&key("elsewhere")),
            Lookup::Missing
        ));
        assert_eq!(store.counts().secrets, 1);
    }

    #[test]
    fn entries_of_the_old_format_are_migrated_once() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let record = secret(&keyring, "old", 3);
        let legacy = serde_json::json!({
            "format": 1,
            "namespace": "default",
            "name": "old",
            "version": 3,
            "createdAt": "1970-01-01T00:00:00Z",
            "updatedAt": "1970-01-01T00:00:00Z",
            "allowedWorkloads": [],
            "envelope": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, record.envelope.to_bytes()),
            "lastWrite": {"idempotencyKey": "k", "fingerprint": "f"},
        });
        let secrets = dir.path().join("secrets");
        create_private_dir(&secrets).unwrap();
        std::fs::write(
            secrets.join(file_name(Kind::Secret, &key("old"))),
            serde_json::to_vec(&legacy).unwrap(),
        )
        .unwrap();
        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.migrated, 1);
        assert_eq!(store.secret(&key("old")).unwrap().version.get(), 3);
        drop(store);
        let (_, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!((report.migrated, report.refused.len()), (0, 0));
    }
}
