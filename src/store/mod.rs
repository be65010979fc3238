//! The node-local store: one file per secret or config, written atomically, served from memory,
//! and authenticated, so what is served is what this node wrote.
//!
//! Layout under the data directory (directory 0700, files 0600):
//!
//! ```text
//! secrets/<sha256(kind/namespace/name)>.json   metadata + base64 envelope (ciphertext only), MAC'd
//! configs/<sha256(kind/namespace/name)>.json   plain config data (configs are not encrypted), MAC'd
//! store.manifest                               every entry's high-water mark, MAC-chained
//! store.image                                  every held entry decoded, with its file's identity, and
//!                                              the manifest's state: read at start-up instead of
//!                                              every file ([`image`]), MAC'd
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
mod image;
mod manifest;
mod records;
mod rekey;
pub mod writes;

pub use files::{
    create_private_dir, ensure_private_file, fsync_dir, write_atomic, write_private_file_atomic,
};
pub use manifest::AuditAnchor;
pub use records::{ConfigRecord, Origin, SecretRecord, Uid};
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
    /// Entry files not read because the store image knew them (same identity as when it was
    /// taken); every other file was read and checked.
    pub from_image: usize,
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

/// An entry held, and the master key its file's MAC is under (what key usage counts, and what
/// an image records), shared between the entries that have the same.
struct Held<R> {
    record: Arc<R>,
    mac_key: Arc<KeyId>,
    /// The identity of its file as the store saw it when it read or wrote it (before reading
    /// it; right after renaming it into place): what a store image records, so that an image
    /// only ever vouches for a file the store has checked or written itself. `None` when it
    /// could not be told.
    file: Option<image::FileId>,
}

impl<R> Clone for Held<R> {
    fn clone(&self) -> Self {
        Held {
            record: self.record.clone(),
            mac_key: self.mac_key.clone(),
            file: self.file,
        }
    }
}

/// What the store knows of an entry's file besides its content: the master key its MAC is
/// under (`None` for a format-1 file) and its identity.
#[derive(Clone, Default)]
struct Facts {
    mac_key: Option<KeyId>,
    file: Option<image::FileId>,
}

#[derive(Default)]
struct State {
    secrets: BTreeMap<ObjectKey, Held<SecretRecord>>,
    configs: BTreeMap<ObjectKey, Held<ConfigRecord>>,
    /// The master keys entry files are authenticated under, one copy each.
    mac_keys: Vec<Arc<KeyId>>,
    quarantined: HashMap<(Kind, ObjectKey), Arc<str>>,
    /// Remembered writes by idempotency key, from live entries and from deleted objects.
    writes: HashMap<String, RememberedWrite>,
}

impl State {
    fn mac_key(&mut self, id: &KeyId) -> Arc<KeyId> {
        if let Some(k) = self.mac_keys.iter().find(|k| ***k == *id) {
            return k.clone();
        }
        let k = Arc::new(id.clone());
        self.mac_keys.push(k.clone());
        k
    }
}

pub struct Store {
    secrets_dir: PathBuf,
    configs_dir: PathBuf,
    keys: SharedKeyring,
    state: Arc<RwLock<State>>,
    /// Every change goes through the manifest, one at a time: it hands out generations.
    manifest: Arc<Mutex<Manifest>>,
    /// Takes store images in the background (dropped first: it holds the state too).
    image: image::Keeper,
    image_source: Arc<image::Source>,
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
    /// Takes `beside`'s copies of what both hold (the namespace's name; a secret's allowed
    /// workloads), so that entries share them instead of each holding its own.
    fn share_with(&mut self, beside: &Self);
    fn generation(&self) -> u64;
    fn set_generation(&mut self, generation: u64);
    fn writes(&self) -> &[WriteRecord];
    fn to_file_bytes(&self, mac: &MacKey) -> Vec<u8>;
    fn map(state: &State) -> &BTreeMap<ObjectKey, Held<Self>>;
    fn map_mut(state: &mut State) -> &mut BTreeMap<ObjectKey, Held<Self>>;
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
    fn share_with(&mut self, beside: &Self) {
        self.key.share_namespace(&beside.key);
        self.allowed_workloads.share(&beside.allowed_workloads);
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
    fn map(state: &State) -> &BTreeMap<ObjectKey, Held<Self>> {
        &state.secrets
    }
    fn map_mut(state: &mut State) -> &mut BTreeMap<ObjectKey, Held<Self>> {
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
    fn share_with(&mut self, beside: &Self) {
        self.key.share_namespace(&beside.key);
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
    fn map(state: &State) -> &BTreeMap<ObjectKey, Held<Self>> {
        &state.configs
    }
    fn map_mut(state: &mut State) -> &mut BTreeMap<ObjectKey, Held<Self>> {
        &mut state.configs
    }
}

/// An entry file the image vouches for (its identity unchanged): the image's record, counted in
/// `from_image`.
fn vouched<R>(
    known: Option<image::Known<R>>,
    id: &image::FileId,
    from_image: &std::sync::atomic::AtomicUsize,
) -> Option<(Decoded<R>, bool, Facts)> {
    let known = known?;
    from_image.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let facts = Facts {
        mac_key: Some(known.mac_key),
        file: Some(*id),
    };
    Some((known.decoded, true, facts))
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
        let image_path = data_dir.join(image::FILE_NAME);
        if options.rebuild_manifest {
            // What it says of the manifest set aside is void; nothing of it is used.
            image::remove(data_dir)?;
        }
        let mut report = OpenReport::default();
        // The image is read and authenticated while the entry directories are listed.
        let (image, secret_paths, config_paths) = std::thread::scope(|scope| {
            let image = scope.spawn(|| {
                (!options.rebuild_manifest)
                    .then(|| image::Image::read(&image_path, &ring))
                    .flatten()
            });
            let secrets = files::list_entries(&secrets_dir, &mut report);
            let configs = files::list_entries(&configs_dir, &mut report);
            let image = image
                .join()
                .expect("the store image's loading thread panicked");
            (image, secrets, configs)
        });
        let (secret_paths, config_paths) = (secret_paths?, config_paths?);
        let image = image.as_ref();
        let entry_keys = EntryKeys::of(&ring);
        let from_image = std::sync::atomic::AtomicUsize::new(0);
        let known_secret = |name: &str, id: &image::FileId| {
            vouched(image?.secret(name, id, &ring), id, &from_image)
        };
        let known_config = |name: &str, id: &image::FileId| {
            vouched(image?.config(name, id, &ring), id, &from_image)
        };
        // The manifest is read and checked on a thread of its own while the entry files are
        // read (on every core): neither needs the other until both are sorted below. An entry
        // file the image knows (the same identity as when it was taken) is not read: the
        // image's record of it is what reading it would give.
        let (existing, secrets, configs) = std::thread::scope(|scope| {
            let manifest = scope.spawn(|| {
                let base = image.and_then(|i| i.base());
                Manifest::open_from(&manifest_path, &ring, base)
            });
            let secrets = files::read_entries(
                &secrets_dir,
                secret_paths,
                image.map(|_| &known_secret as files::KnownFile<'_, _>),
                |name, b, file| {
                    SecretRecord::from_file_bytes_keyed(b, &entry_keys)
                        .map(|(d, mac_key)| in_its_file(d, name, Facts { mac_key, file }))
                },
            );
            let configs = files::read_entries(
                &configs_dir,
                config_paths,
                image.map(|_| &known_config as files::KnownFile<'_, _>),
                |name, b, file| {
                    ConfigRecord::from_file_bytes_keyed(b, &entry_keys)
                        .map(|(d, mac_key)| in_its_file(d, name, Facts { mac_key, file }))
                },
            );
            let existing = manifest
                .join()
                .expect("the store manifest's loading thread panicked");
            Ok::<_, StoreError>((existing?, secrets?, configs?))
        })?;
        report.from_image = from_image.into_inner();
        let image_was_taken_from = match &existing {
            Some((_, manifest::Opened::FromBase { lines_after })) => Some(*lines_after),
            _ => None,
        };
        let existing = existing.map(|(m, _)| m);

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
            accepted: Default::default(),
        };
        opening.sort(secrets)?;
        opening.sort(configs)?;
        let (state, manifest, report) = opening.finish(manifest_path)?;
        // The image read is the store's state when its manifest lines all came from it and
        // every entry from it, nothing was refused or removed, and nothing was written since
        // (an adopted put appends a line); otherwise a new one is taken once the store is quiet.
        let current = image_was_taken_from == Some(0)
            && report.from_image == report.secrets + report.configs
            && report.quarantined.is_empty()
            && report.refused.is_empty()
            && report.removed_temp_files == 0
            && report.migrated == 0;
        let state = Arc::new(RwLock::new(state));
        let manifest = Arc::new(Mutex::new(manifest));
        let image_source = Arc::new(image::Source {
            image_path,
            keys: keys.clone(),
            state: state.clone(),
            manifest: manifest.clone(),
        });
        Ok((
            Store {
                secrets_dir,
                configs_dir,
                keys,
                state,
                manifest,
                image: image::Keeper::start(image_source.clone(), !current),
                image_source,
                pruned: Mutex::default(),
            },
            report,
        ))
    }

    /// Takes a store image now (the store's own thread takes them in the background; this is
    /// for tests and benchmarks): the number of entries in it. `Ok(None)`: none was written
    /// (entry files under more master keys than an image can name).
    pub fn write_image(&self) -> Result<Option<usize>, StoreError> {
        let never = std::sync::atomic::AtomicBool::new(false);
        Ok(self.image_source.write(&never)?.ok())
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
        let epoch = manifest.position().2;
        manifest.record_audit_anchor(&self.keys.current(), anchor)?;
        self.noted(&manifest, epoch, image::Change::Line);
        Ok(())
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
        if let Some(h) = R::map(&state).get(key) {
            return Lookup::Found(h.record.clone());
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
                .map(|(k, h)| (k.clone(), h.record.generation))
                .collect(),
            Kind::Config => state
                .configs
                .iter()
                .map(|(k, h)| (k.clone(), h.record.generation))
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
        self.share_with_neighbours(&mut record);
        let previous = self.lookup::<R>(record.key()).found();
        if let Some(stored) = &previous {
            R::check_forward(stored, &record)?;
        }
        let generation = manifest.next_generation();
        let epoch = manifest.position().2;
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
        let file = match files::write_atomic_tracked(dir, &name, &record.to_file_bytes(&mac)) {
            Ok(file) => file,
            Err(failed) => {
                if failed.replaced {
                    undo();
                }
                return Err(failed.error);
            }
        };
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
        let mac_key = state.mac_key(mac.key_id());
        R::map_mut(&mut state).insert(
            record.key().clone(),
            Held {
                record: record.clone(),
                mac_key,
                file,
            },
        );
        drop(state);
        self.noted(&manifest, epoch, image::Change::Entry);
        Ok(record)
    }

    /// Lets `record` share what it has in common with the entries beside it in the store
    /// (see [`Entry::share_with`]): a namespace's entries then hold one copy of its name (in
    /// the map, the records and the manifest's marks) and of the workloads they allow.
    fn share_with_neighbours<R: Entry>(&self, record: &mut R) {
        let key = record.key().clone();
        let state = self.read();
        let map = R::map(&state);
        let before = map.range(..&key).next_back().map(|(_, h)| h.record.clone());
        // From `key` on: the entry's own previous version first.
        let after = map.range(&key..).next().map(|(_, h)| h.record.clone());
        drop(state);
        for beside in [before, after].into_iter().flatten() {
            record.share_with(&beside);
        }
    }

    /// Tells the image writer of a change (after it is made; never waiting for it).
    fn noted(&self, manifest: &Manifest, epoch_before: u64, change: image::Change) {
        let compacted = manifest.position().2 != epoch_before;
        self.image.note(if compacted {
            image::Change::Compacted
        } else {
            change
        });
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
        let epoch = manifest.position().2;
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
        drop(state);
        self.noted(&manifest, epoch, image::Change::Entry);
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
    map: &BTreeMap<ObjectKey, Held<R>>,
    namespace: &Namespace,
    prefix: &NamePrefix,
) -> Vec<Arc<R>> {
    // Keys sort by namespace, then name: one namespace is a contiguous, name-sorted range.
    map.iter()
        .filter(|(k, _)| &k.namespace == namespace && prefix.matches(&k.name))
        .map(|(_, h)| h.record.clone())
        .collect()
}

/// An entry file as decoded, and whether it is the file its entry belongs in (always true of
/// what is not an authenticated entry: nothing to tell). Checked while the files are read, on
/// every core: the file name is a hash of the entry's key.
fn in_its_file<R: Entry>(decoded: Decoded<R>, file: &str, facts: Facts) -> Loaded<R> {
    let in_place = match &decoded {
        Decoded::Authentic(record) => file_name(R::KIND, record.key()) == file,
        Decoded::Legacy(_) | Decoded::ForeignKey(_) => true,
    };
    (decoded, in_place, facts)
}

/// An entry file as loaded: decoded, whether it is in its own file, and what else is known of
/// the file.
type Loaded<R> = (Decoded<R>, bool, Facts);

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
    /// Entries accepted, until the maps are built.
    accepted: AcceptedEntries,
}

/// Where accepted entries wait until the maps are built ([`Opening::build_maps`]).
type AcceptedEntries = (
    Vec<(ObjectKey, Held<SecretRecord>)>,
    Vec<(ObjectKey, Held<ConfigRecord>)>,
);

trait Accepted: Sized {
    fn accepted(all: &mut AcceptedEntries) -> &mut Vec<(ObjectKey, Held<Self>)>;
}

impl Accepted for SecretRecord {
    fn accepted(all: &mut AcceptedEntries) -> &mut Vec<(ObjectKey, Held<Self>)> {
        &mut all.0
    }
}

impl Accepted for ConfigRecord {
    fn accepted(all: &mut AcceptedEntries) -> &mut Vec<(ObjectKey, Held<Self>)> {
        &mut all.1
    }
}

/// An entry not yet accepted.
enum Pending {
    Secret(PathBuf, SecretRecord, Facts),
    Config(PathBuf, ConfigRecord, Facts),
}

trait IntoPending: Entry + Accepted {
    fn pending(path: PathBuf, record: Self, facts: Facts) -> Pending;
}

impl IntoPending for SecretRecord {
    fn pending(path: PathBuf, record: Self, facts: Facts) -> Pending {
        Pending::Secret(path, record, facts)
    }
}

impl IntoPending for ConfigRecord {
    fn pending(path: PathBuf, record: Self, facts: Facts) -> Pending {
        Pending::Config(path, record, facts)
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

    fn accept<R: Entry + Accepted>(&mut self, record: R, facts: Facts) {
        index_writes(&mut self.state, R::KIND, record.key(), record.writes());
        let mac_key = facts.mac_key.expect("an accepted entry is authenticated");
        let mac_key = self.state.mac_key(&mac_key);
        let held = Held {
            record: Arc::new(record),
            mac_key,
            file: facts.file,
        };
        R::accepted(&mut self.accepted).push((held.record.key().clone(), held));
    }

    /// Puts the accepted entries in the store's maps: at once, sorted (building a B-tree from
    /// sorted entries is a fraction of inserting them one by one in file-name order).
    fn build_maps(&mut self) {
        fn build<R: Entry>(
            map: &mut BTreeMap<ObjectKey, Held<R>>,
            mut v: Vec<(ObjectKey, Held<R>)>,
        ) {
            v.sort_unstable_by(|a, b| a.0.cmp(&b.0));
            let built: BTreeMap<_, _> = v.into_iter().collect();
            if map.is_empty() {
                *map = built;
            } else {
                map.extend(built);
            }
        }
        let (secrets, configs) = std::mem::take(&mut self.accepted);
        build(&mut self.state.secrets, secrets);
        build(&mut self.state.configs, configs);
    }

    /// Sorts the entries of one kind.
    fn sort<R: IntoPending>(
        &mut self,
        loaded: Vec<files::Parsed<Loaded<R>>>,
    ) -> Result<(), StoreError> {
        // Most entries are accepted, and need no path: one is built for the others.
        let dir = self.dir(R::KIND).to_owned();
        for (name, parsed) in loaded {
            let path = || dir.join(&name);
            let (parsed, in_place, facts) = match parsed {
                Ok((decoded, in_place, facts)) => (Ok(decoded), in_place, facts),
                Err(why) => (Err(why), true, Facts::default()),
            };
            let record = match parsed {
                Err(why) => {
                    self.refuse_file(&path(), &format!("unreadable: {why}"))?;
                    continue;
                }
                Ok(Decoded::Legacy(record)) => {
                    self.legacy.push(R::pending(path(), record, facts));
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
                    &path(),
                    &format!("it holds {}, which belongs in another file", record.key()),
                )?;
                continue;
            }
            let Some(manifest) = &self.manifest else {
                self.unmanifested.push(R::pending(path(), record, facts));
                continue;
            };
            let generation = record.generation();
            match manifest.mark(R::KIND, record.key()) {
                Some(m) if !m.deleted && m.generation == generation => self.accept(record, facts),
                Some(m) if m.deleted && generation < m.generation => {
                    // A delete that a crash interrupted after its manifest line.
                    files::remove_durably(self.dir(R::KIND), &file_name(R::KIND, record.key()))?;
                }
                _ if generation == manifest.next_generation() => {
                    self.candidates.push(R::pending(path(), record, facts));
                }
                Some(m) if generation < m.generation => {
                    let why = format!(
                        "rolled back: its entry is from store generation {generation}, but generation {} was written since",
                        m.generation
                    );
                    let key = record.key().clone();
                    self.refuse_file(&path(), &why)?;
                    self.refuse_object(R::KIND, &key, why);
                }
                _ => {
                    let why = "the store manifest has no record of this entry (restored from elsewhere, or forged)".to_owned();
                    self.refuse_file(&path(), &why)?;
                }
            }
        }
        Ok(())
    }

    fn adopt(&mut self, pending: Pending, generation: Option<u64>) -> Result<(), StoreError> {
        match pending {
            Pending::Secret(path, record, facts) => self.adopt_one(path, record, facts, generation),
            Pending::Config(path, record, facts) => self.adopt_one(path, record, facts, generation),
        }
    }

    /// Records an entry in the manifest: as it is (`generation` None), or rewritten at a new
    /// generation (a migrated format-1 entry).
    fn adopt_one<R: Entry + Accepted>(
        &mut self,
        path: PathBuf,
        mut record: R,
        mut facts: Facts,
        generation: Option<u64>,
    ) -> Result<(), StoreError> {
        let manifest = self.manifest.as_mut().expect("created before adopting");
        if let Some(g) = generation {
            record.set_generation(g);
            let mac = MacKey::active(self.ring, Purpose::StoreEntry);
            let dir = path.parent().unwrap_or(Path::new("."));
            let file = files::write_atomic_tracked(
                dir,
                &file_name(R::KIND, record.key()),
                &record.to_file_bytes(&mac),
            )
            .map_err(|failed| failed.error)?;
            facts = Facts {
                mac_key: Some(mac.key_id().clone()),
                file,
            };
        }
        manifest.record_put(self.ring, R::KIND, record.key(), record.generation())?;
        self.accept(record, facts);
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
                    Pending::Secret(_, r, _) => r.generation,
                    Pending::Config(_, r, _) => r.generation,
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
                    Pending::Secret(p, ..) | Pending::Config(p, ..) => p.clone(),
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
                    Pending::Secret(p, ..) | Pending::Config(p, ..) => p.clone(),
                };
                self.refuse_file(
                    &path,
                    "it claims a store generation another entry already has",
                )?;
            }
        }
        self.build_maps();
        let manifest = self.manifest.take().expect("opened or created");
        // Objects the manifest says exist but whose entry was not accepted. Every entry held
        // and every object refused has a live mark (that is how it was held or refused), so
        // when they are as many as the live marks, none is missing (the usual case: not
        // looked up one by one).
        let accounted =
            self.state.secrets.len() + self.state.configs.len() + self.state.quarantined.len();
        let none_missing = manifest.live().count() == accounted;
        let missing: Vec<(Kind, ObjectKey)> = manifest
            .live()
            .filter(|_| !none_missing)
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

    /// Opens the store with `--rebuild-store-manifest`.
    fn open_rebuilding(dir: &Path, keyring: &Keyring) -> (Store, OpenReport) {
        Store::open(
            dir,
            SharedKeyring::new(keyring.clone()),
            OpenOptions {
                rebuild_manifest: true,
            },
        )
        .unwrap()
    }

    fn key(name: &str) -> ObjectKey {
        ObjectKey::new(Namespace::default_namespace(), Name::parse(name).unwrap())
    }

    fn secret(keyring: &Keyring, name: &str, version: u64) -> SecretRecord {
        secret_at(keyring, key(name), version)
    }

    fn secret_at(keyring: &Keyring, key: ObjectKey, version: u64) -> SecretRecord {
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

    /// Entries of one namespace share one copy of its name, and secrets that allow the same
    /// workloads one copy of the set, however each write spelled them; an entry of another
    /// namespace, or with other workloads, keeps its own.
    #[test]
    fn entries_share_their_namespace_and_workloads_with_the_entries_beside_them() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        let at = |namespace: &str, name: &str| {
            ObjectKey::new(
                Namespace::parse(namespace).unwrap(),
                Name::parse(name).unwrap(),
            )
        };
        let workloads = |names: &[&str]| {
            WorkloadSet::parse(
                names
                    .iter()
                    .map(|n| crate::domain::Workload::parse(n).unwrap())
                    .collect(),
            )
            .unwrap()
        };
        for (namespace, name, allowed) in [
            ("team-a", "db", ["app"]),
            ("team-b", "db", ["app"]),
            ("team-a", "api", ["app"]),
            ("team-a", "cache", ["web"]),
        ] {
            let mut record = secret_at(&keyring, at(namespace, name), 1);
            record.allowed_workloads = workloads(&allowed);
            store.put_secret(record, Expect::Absent).unwrap();
        }
        let held = |namespace: &str, name: &str| store.secret(&at(namespace, name)).unwrap();
        let copy = |r: &SecretRecord| r.key.namespace.as_str().as_ptr();
        let (db, api, cache) = (
            held("team-a", "db"),
            held("team-a", "api"),
            held("team-a", "cache"),
        );
        assert_eq!(copy(&db), copy(&api));
        assert_eq!(copy(&db), copy(&cache));
        assert_ne!(copy(&db), copy(&held("team-b", "db")));
        assert_eq!(api.key, at("team-a", "api"));
        assert!(api.allowed_workloads.is_shared_with(&db.allowed_workloads));
        assert!(
            !cache
                .allowed_workloads
                .is_shared_with(&api.allowed_workloads)
        );
        assert_eq!(cache.allowed_workloads, workloads(&["web"]));
        // A new version shares with the one it replaces.
        let mut v2 = secret_at(&keyring, at("team-a", "db"), 2);
        v2.allowed_workloads = workloads(&["app"]);
        store.put_secret(v2, Expect::Any).unwrap();
        let db2 = held("team-a", "db");
        assert!(db2.allowed_workloads.is_shared_with(&api.allowed_workloads));
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
        let (store, _) = open_rebuilding(dir.path(), &keyring);
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

    // The store image (`image`): with one, start-up gives exactly what it gives without.

    fn config(name: &str, value: &str) -> ConfigRecord {
        ConfigRecord {
            key: key(name),
            data: serde_json::from_value(serde_json::json!({"v": value})).unwrap(),
            immutable: false,
            created_at: Timestamp::UNIX_EPOCH,
            updated_at: Timestamp::UNIX_EPOCH,
            origin: Some(Origin::of("uid-c", Some("7"))),
            writes: vec![write_record(&format!("put-{name}"))],
            generation: 0,
        }
    }

    fn secret_file(dir: &Path, name: &str) -> PathBuf {
        dir.join("secrets")
            .join(file_name(Kind::Secret, &key(name)))
    }

    /// Takes an image of `store` (after its files are old enough to be put in one).
    fn take_image(store: &Store) -> usize {
        std::thread::sleep(image::SETTLED + std::time::Duration::from_millis(20));
        store.write_image().unwrap().expect("an image is written")
    }

    /// What an open gave, in a form to compare (not the paths, which name temp dirs).
    #[derive(Debug, PartialEq, Eq)]
    struct Outcome {
        refused: Vec<(Kind, String, String)>,
        quarantined: usize,
        removed_temp_files: usize,
        secrets: Vec<(String, u64)>,
        configs: Vec<(String, String)>,
        writes: Vec<Option<String>>,
        anchor: Option<AuditAnchor>,
        next_generation: u64,
        usage: KeyUsage,
    }

    fn outcome(dir: &Path, keyring: &Keyring) -> (Result<Outcome, String>, usize) {
        match open(dir, keyring) {
            Err(e) => (
                Err(e.to_string().replace(&dir.display().to_string(), "<dir>")),
                0,
            ),
            Ok((store, report)) => {
                let mut refused: Vec<_> = report
                    .refused
                    .iter()
                    .map(|(kind, k, why)| (*kind, k.name.to_string(), why.clone()))
                    .collect();
                refused.sort();
                let configs = store
                    .config_keys()
                    .into_iter()
                    .map(|k| {
                        let v = store
                            .config(&k)
                            .map(|c| format!("{:?}", c.data))
                            .unwrap_or_default();
                        (k.name.to_string(), v)
                    })
                    .collect();
                let writes = ["del-1", "put-app.settings"]
                    .iter()
                    .map(|k| store.remembered_write(k).map(|w| w.key.to_string()))
                    .collect();
                let outcome = Outcome {
                    refused,
                    quarantined: report.quarantined.len(),
                    removed_temp_files: report.removed_temp_files,
                    secrets: store
                        .secret_keys()
                        .into_iter()
                        .map(|k| {
                            let v = store.secret(&k).map_or(0, |r| r.version.get());
                            (k.name.to_string(), v)
                        })
                        .collect(),
                    configs,
                    writes,
                    anchor: store.audit_anchor(),
                    next_generation: store.next_generation(),
                    usage: store.key_usage(),
                };
                (Ok(outcome), report.from_image)
            }
        }
    }

    /// A store with a little of everything; with `image`, an image is taken at the end, and
    /// an older one (after the first writes) kept as `old.image`.
    fn build(dir: &Path, keyring: &Keyring, image: bool) {
        let (store, _) = open(dir, keyring).unwrap();
        store
            .put_secret(secret(keyring, "rb", 1), Expect::Absent)
            .unwrap();
        store
            .put_secret(secret(keyring, "edited", 1), Expect::Absent)
            .unwrap();
        std::fs::copy(secret_file(dir, "rb"), dir.join("rb.v1")).unwrap();
        if image {
            take_image(&store);
            std::fs::copy(dir.join(image::FILE_NAME), dir.join("old.image")).unwrap();
        }
        store
            .put_secret(secret(keyring, "rb", 2), Expect::Any)
            .unwrap();
        for name in ["gone", "fine", "del"] {
            store
                .put_secret(secret(keyring, name, 1), Expect::Absent)
                .unwrap();
        }
        store
            .put_config(config("app.settings", "x"), Expect::Absent)
            .unwrap();
        store
            .delete_secret(&key("del"), Expect::Any, vec![write_record("del-1")])
            .unwrap();
        store.record_audit_anchor(anchor(3)).unwrap();
        if image {
            assert_eq!(take_image(&store), 5);
        }
        drop(store);
        if !image {
            // The store's own writer may have taken one meanwhile.
            let _ = std::fs::remove_file(dir.join(image::FILE_NAME));
        }
    }

    fn edit_line(path: &Path, line: usize, edit: impl Fn(&str) -> String) {
        let text = std::fs::read_to_string(path).unwrap();
        let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
        lines[line] = edit(&lines[line]);
        std::fs::write(path, lines.join("\n") + "\n").unwrap();
    }

    /// Every way of tampering with a store the tests above use, and with its image: the same
    /// refusals (and the same store) with an image as without, and an image never makes a
    /// tampered entry acceptable.
    #[test]
    fn with_an_image_every_tampering_is_refused_as_without() {
        type Tamper = (&'static str, fn(&Path));
        let tampers: &[Tamper] = &[
            ("nothing", |_| {}),
            ("an entry rolled back", |d| {
                std::fs::copy(d.join("rb.v1"), secret_file(d, "rb")).unwrap();
            }),
            ("an entry edited", |d| {
                let f = secret_file(d, "edited");
                let text = std::fs::read_to_string(&f).unwrap();
                std::fs::write(&f, text.replace("\"version\":1", "\"version\":9")).unwrap();
            }),
            ("an entry removed", |d| {
                std::fs::remove_file(secret_file(d, "gone")).unwrap();
            }),
            ("an entry copied into another's file", |d| {
                std::fs::copy(secret_file(d, "fine"), secret_file(d, "elsewhere")).unwrap();
            }),
            ("a deleted entry brought back", |d| {
                std::fs::copy(secret_file(d, "fine"), secret_file(d, "del")).unwrap();
            }),
            ("a temp file left", |d| {
                std::fs::write(d.join("secrets").join(".tmp-0123"), b"x").unwrap();
            }),
            ("the manifest's last line lost", |d| {
                let p = d.join(manifest::FILE_NAME);
                let text = std::fs::read_to_string(&p).unwrap();
                let lines: Vec<&str> = text.lines().collect();
                std::fs::write(&p, lines[..lines.len() - 1].join("\n") + "\n").unwrap();
            }),
            ("the manifest cut to its first lines", |d| {
                let p = d.join(manifest::FILE_NAME);
                let text = std::fs::read_to_string(&p).unwrap();
                let lines: Vec<&str> = text.lines().collect();
                std::fs::write(&p, lines[..3].join("\n") + "\n").unwrap();
            }),
            ("a manifest line edited", |d| {
                edit_line(&d.join(manifest::FILE_NAME), 1, |l| {
                    l.replacen("\"generation\":", "\"generation\":1", 1)
                });
            }),
            ("the manifest removed", |d| {
                std::fs::remove_file(d.join(manifest::FILE_NAME)).unwrap();
            }),
            ("the manifest replaced by an older copy", |d| {
                let p = d.join(manifest::FILE_NAME);
                let text = std::fs::read_to_string(&p).unwrap();
                let lines: Vec<&str> = text.lines().collect();
                std::fs::write(&p, lines[..4].join("\n") + "\n").unwrap();
            }),
            ("the image edited", |d| {
                let p = d.join(image::FILE_NAME);
                if let Ok(mut b) = std::fs::read(&p) {
                    let at = b.len() / 2;
                    b[at] ^= 1;
                    std::fs::write(&p, b).unwrap();
                }
            }),
            ("the image replaced by garbage", |d| {
                std::fs::write(
                    d.join(image::FILE_NAME),
                    b"CLSI\x01 not an image at all, 32 bytes or more",
                )
                .unwrap();
            }),
            ("the image cut short", |d| {
                let p = d.join(image::FILE_NAME);
                if let Ok(b) = std::fs::read(&p) {
                    std::fs::write(&p, &b[..b.len() - 40]).unwrap();
                }
            }),
            ("an older image copied back", |d| {
                if d.join("old.image").exists() {
                    std::fs::copy(d.join("old.image"), d.join(image::FILE_NAME)).unwrap();
                }
            }),
            ("an older image copied back and an entry rolled back", |d| {
                if d.join("old.image").exists() {
                    std::fs::copy(d.join("old.image"), d.join(image::FILE_NAME)).unwrap();
                }
                std::fs::copy(d.join("rb.v1"), secret_file(d, "rb")).unwrap();
            }),
        ];
        for (what, tamper) in tampers {
            let keyring = Keyring::generate().unwrap();
            let plain = tempfile::tempdir().unwrap();
            let imaged = tempfile::tempdir().unwrap();
            build(plain.path(), &keyring, false);
            build(imaged.path(), &keyring, true);
            tamper(plain.path());
            tamper(imaged.path());
            let (without, read_from_image) = outcome(plain.path(), &keyring);
            assert_eq!(read_from_image, 0, "{what}");
            let (with, from_image) = outcome(imaged.path(), &keyring);
            assert_eq!(with, without, "{what}");
            match *what {
                "nothing" => {
                    assert_eq!(from_image, 5, "every entry from the image");
                    let o = with.unwrap();
                    assert!(o.refused.is_empty(), "{o:?}");
                }
                "an entry rolled back" | "an entry edited" | "an entry removed" => {
                    assert_eq!(from_image, 4, "{what}: all but the one changed");
                    assert_eq!(with.unwrap().refused.len(), 1, "{what}");
                }
                _ => {}
            }
            // And again: whatever the first open did (quarantined, adopted, an image taken or
            // not), the second gives the same with or without the image.
            let _ = std::fs::remove_file(plain.path().join(image::FILE_NAME));
            let (without, _) = outcome(plain.path(), &keyring);
            let (with, _) = outcome(imaged.path(), &keyring);
            assert_eq!(with, without, "{what}, opened again");
        }
    }

    /// A file written in place and given back its size and mtime is still a changed file:
    /// its ctime is the kernel's, so the image does not vouch for it, and it is read.
    #[test]
    fn an_entry_edited_in_place_with_its_mtime_put_back_is_still_read() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        for name in ["a", "b"] {
            store
                .put_secret(secret(&keyring, name, 1), Expect::Absent)
                .unwrap();
        }
        take_image(&store);
        drop(store);
        let f = secret_file(dir.path(), "a");
        let mtime = std::fs::metadata(&f).unwrap().modified().unwrap();
        let text = std::fs::read_to_string(&f).unwrap();
        let edited = text.replace("\"version\":1", "\"version\":7");
        assert_eq!(edited.len(), text.len());
        let file = std::fs::OpenOptions::new().write(true).open(&f).unwrap();
        std::io::Write::write_all(&mut &file, edited.as_bytes()).unwrap();
        file.set_modified(mtime).unwrap();
        drop(file);
        assert_eq!(std::fs::metadata(&f).unwrap().modified().unwrap(), mtime);

        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.from_image, 1, "only b's file is vouched for");
        assert_eq!(report.refused.len(), 1, "{report:?}");
        assert!(matches!(
            store.secret_entry(&key("a")),
            Lookup::Quarantined(_)
        ));
        assert_eq!(store.secret(&key("b")).unwrap().version.get(), 1);
    }

    /// A store of `n` secrets closed after an image was taken and `s0` written again (the image
    /// knows all but that one): its directory, keyring and what it holds.
    fn closed_with_an_image(n: usize) -> (tempfile::TempDir, Keyring, Vec<(String, u64)>) {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        for i in 0..n {
            store
                .put_secret(secret(&keyring, &format!("s{i}"), 1), Expect::Absent)
                .unwrap();
        }
        take_image(&store);
        store
            .put_secret(secret(&keyring, "s0", 2), Expect::Any)
            .unwrap();
        let before = holding(&store);
        drop(store);
        (dir, keyring, before)
    }

    /// The image goes on being used across writes, compactions and restarts; what changed
    /// since it was taken is read, the rest is not.
    #[test]
    fn an_image_stays_useful_across_writes_and_compaction() {
        let (dir, keyring, before) = closed_with_an_image(6);
        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.from_image, 5, "all but the one written since");
        assert_eq!(holding(&store), before);
        // Enough writes to compact the journal: the image's journal is gone, so the whole
        // manifest is read, but the entries it knows are still not.
        for v in 3..40 {
            store
                .put_secret(secret(&keyring, "s0", v), Expect::Any)
                .unwrap();
        }
        let before = holding(&store);
        drop(store);
        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.from_image, 5, "{report:?}");
        assert!(report.refused.is_empty(), "{report:?}");
        assert_eq!(holding(&store), before);
        assert_eq!(take_image(&store), 6);
        drop(store);
        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.from_image, 6);
        assert_eq!(holding(&store), before);
        drop(store);
        // Rebuilding the manifest removes the image.
        let (store, report) = open_rebuilding(dir.path(), &keyring);
        assert_eq!(report.from_image, 0);
        assert_eq!(holding(&store), before);
        assert!(!dir.path().join(image::FILE_NAME).exists());
    }

    /// With an image, the journal up to its position is only hashed and the lines after it
    /// read: a line cut short there by a crash is cut off as without an image, and the image
    /// is still used.
    #[test]
    fn a_line_cut_short_after_the_images_position_is_cut_off_and_the_image_kept() {
        let (dir, keyring, before) = closed_with_an_image(4);
        let path = dir.path().join(manifest::FILE_NAME);
        let complete = std::fs::metadata(&path).unwrap().len();
        let mut torn = std::fs::read(&path).unwrap();
        torn.extend_from_slice(b"{\"seq\":99,\"op");
        std::fs::write(&path, &torn).unwrap();
        for _ in 0..2 {
            let (store, report) = open(dir.path(), &keyring).unwrap();
            assert_eq!(report.from_image, 3, "all but the one written since");
            assert!(report.refused.is_empty(), "{report:?}");
            assert_eq!(holding(&store), before);
            assert_eq!(std::fs::metadata(&path).unwrap().len(), complete);
        }
    }

    /// An image written under a key that has since left the keyring is not used; one whose
    /// entries are under a key the keyring lacks refuses as reading the files does.
    #[test]
    fn an_image_under_another_keyring_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        store
            .put_secret(secret(&keyring, "a", 1), Expect::Absent)
            .unwrap();
        take_image(&store);
        drop(store);
        let other = Keyring::generate().unwrap();
        let (without, _) = {
            let copy = std::fs::read(dir.path().join(image::FILE_NAME)).unwrap();
            std::fs::remove_file(dir.path().join(image::FILE_NAME)).unwrap();
            let o = outcome(dir.path(), &other);
            std::fs::write(dir.path().join(image::FILE_NAME), copy).unwrap();
            o
        };
        let (with, from_image) = outcome(dir.path(), &other);
        assert_eq!(with, without);
        assert!(with.is_err());
        assert_eq!(from_image, 0);
    }

    /// An image never vouches for a file changed behind the store's back while it runs: it
    /// records the identity the store saw when it read or wrote each file, so a file rolled
    /// back or edited before the image was taken is still read, and refused, at the next start.
    #[test]
    fn an_entry_tampered_with_while_the_store_runs_is_refused_after_an_image() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring).unwrap();
        store
            .put_secret(secret(&keyring, "rb", 1), Expect::Absent)
            .unwrap();
        let v1 = std::fs::read(secret_file(dir.path(), "rb")).unwrap();
        store
            .put_secret(secret(&keyring, "rb", 2), Expect::Any)
            .unwrap();
        store
            .put_secret(secret(&keyring, "edited", 1), Expect::Absent)
            .unwrap();
        store
            .put_secret(secret(&keyring, "fine", 1), Expect::Absent)
            .unwrap();
        std::fs::write(secret_file(dir.path(), "rb"), &v1).unwrap();
        let f = secret_file(dir.path(), "edited");
        let text = std::fs::read_to_string(&f).unwrap();
        std::fs::write(&f, text.replace("\"version\":1", "\"version\":9")).unwrap();
        assert_eq!(take_image(&store), 3);
        drop(store);
        let (store, report) = open(dir.path(), &keyring).unwrap();
        assert_eq!(report.from_image, 1, "only fine's file is vouched for");
        let mut refused: Vec<String> = report
            .refused
            .iter()
            .map(|(_, k, _)| k.name.to_string())
            .collect();
        refused.sort();
        assert_eq!(refused, ["edited", "rb"], "{report:?}");
        assert_eq!(store.secret(&key("fine")).unwrap().version.get(), 1);
    }
}
