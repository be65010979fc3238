//! The store manifest: the authenticated high-water mark of every entry, so an entry file
//! replaced by an older copy of itself (a rollback), or a deleted one brought back, is found at
//! start-up instead of being served.
//!
//! Every change to the store takes a number from one counter, its *generation*, which the entry
//! file carries inside its MAC. The manifest is an append-only journal, one JSON line per change
//! (`put` or `delete`, the kind, namespace, name and generation), each line ending in a MAC
//! (HMAC-SHA256 under a key derived from the keyring) over its bytes, which include the previous
//! line's MAC: a line cannot be edited, removed, reordered or replayed without breaking the
//! chain. At start-up an entry whose generation is not the one its last manifest line names is
//! refused.
//!
//! Order of writes, so a crash never looks like tampering: a put writes the entry file first and
//! its manifest line second (a crash between leaves one entry exactly one generation ahead of
//! the manifest, which start-up adopts); a delete writes its manifest line first and removes the
//! file second (a crash between leaves a file older than its delete, which start-up removes).
//! A line cut short by a crash (no newline) was never acknowledged and is cut off.
//!
//! The manifest also anchors the audit log: an `anchor` line records the audit chain's head
//! (sequence number and hash) as the node last saw it durable, so a deleted, truncated or
//! rewritten audit log is found at start-up ([`crate::audit`] checks it). The store keeps the
//! anchor; it does not interpret it.
//!
//! The journal is compacted, when it has grown to several times the number of entries, into a
//! snapshot: a `snapshot` line carrying the next generation and the last MAC of the journal it
//! replaces, then one line per live entry and per recently deleted object that still remembers
//! writes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use super::StoreError;
use super::image::{Reader, Writer};
use super::writes::{WriteRecord, retained};
use crate::crypto::{KeyId, Keyring, MacKey, Purpose};
use crate::domain::{Kind, Name, Namespace, ObjectKey};
use crate::faults::{Step, check};

pub(super) const FILE_NAME: &str = "store.manifest";
const MAC_FIELD: &str = "mac";
const GENESIS: [u8; 32] = [0; 32];
/// Compaction happens when the journal has this many lines more than twice the live marks
/// (a few in unit tests, so they reach it).
const COMPACT_SLACK: u64 = if cfg!(test) { 8 } else { 1024 };

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum Op {
    Put,
    Delete,
    Snapshot,
    Anchor,
}

/// The audit chain's head as the manifest records it: the last durable record's sequence
/// number and hash (64 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditAnchor {
    pub seq: u64,
    pub hash: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Line {
    seq: u64,
    op: Op,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    kind: Option<Kind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    namespace: Option<Namespace>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    name: Option<Name>,
    /// `put`/`delete`: the change's generation; `snapshot`: the next generation to hand out.
    generation: u64,
    /// `delete`: the writes the deleted object remembers (and the delete's own, if keyed).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    writes: Vec<WriteRecord>,
    /// `anchor`, and `snapshot` once the audit log has been anchored: the audit chain's head.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit: Option<AuditAnchor>,
    key_id: KeyId,
    /// The previous line's MAC (64 hex digits).
    prev: String,
}

/// What the manifest says of one object: the generation of its last change, and whether that
/// change deleted it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Mark {
    pub generation: u64,
    pub deleted: bool,
}

pub(super) struct Manifest {
    path: PathBuf,
    file: File,
    /// Bytes of complete lines.
    len: u64,
    seq: u64,
    prev: [u8; 32],
    next_generation: u64,
    lines: u64,
    marks: Marks,
    /// Writes remembered by deleted objects, until their retention ends.
    tombstones: HashMap<(Kind, ObjectKey), Vec<WriteRecord>>,
    audit_anchor: Option<AuditAnchor>,
    /// The master keys the journal's lines are authenticated under: a key named here cannot
    /// leave the keyring until the journal is rewritten under another ([`Manifest::rewrite`]).
    line_keys: BTreeSet<KeyId>,
    /// SHA-256 of the journal's bytes (`..len`): a store image taken now names it, so a later
    /// start can tell that the journal still begins with exactly these lines (`image`).
    digest: Sha256,
    /// Incremented each time the journal is replaced by a snapshot: an image taken before
    /// names a journal that is gone.
    epoch: u64,
}

/// The manifest's state at a position of its journal, as a store image carries it: what
/// [`Manifest::open_from`] derives from the lines up to `len`, so that only the lines after it need
/// reading and checking.
pub(super) struct Base {
    len: u64,
    digest: [u8; 32],
    seq: u64,
    prev: [u8; 32],
    next_generation: u64,
    lines: u64,
    marks: Marks,
    tombstones: HashMap<(Kind, ObjectKey), Vec<WriteRecord>>,
    audit_anchor: Option<AuditAnchor>,
    line_keys: BTreeSet<KeyId>,
}

/// The marks, one map per kind (so a look-up borrows the key instead of copying it).
#[derive(Default)]
struct Marks {
    secrets: HashMap<ObjectKey, Mark>,
    configs: HashMap<ObjectKey, Mark>,
}

impl Marks {
    fn of(&self, kind: Kind) -> &HashMap<ObjectKey, Mark> {
        match kind {
            Kind::Secret => &self.secrets,
            Kind::Config => &self.configs,
        }
    }

    fn insert(&mut self, (kind, key): (Kind, ObjectKey), mark: Mark) {
        match kind {
            Kind::Secret => self.secrets.insert(key, mark),
            Kind::Config => self.configs.insert(key, mark),
        };
    }

    fn len(&self) -> usize {
        self.secrets.len() + self.configs.len()
    }

    fn iter(&self) -> impl Iterator<Item = ((Kind, &ObjectKey), &Mark)> {
        let tag = |kind: Kind| move |(key, mark)| ((kind, key), mark);
        self.secrets
            .iter()
            .map(tag(Kind::Secret))
            .chain(self.configs.iter().map(tag(Kind::Config)))
    }

    fn retain(&mut self, mut keep: impl FnMut(Kind, &ObjectKey, &Mark) -> bool) {
        self.secrets.retain(|k, m| keep(Kind::Secret, k, m));
        self.configs.retain(|k, m| keep(Kind::Config, k, m));
    }
}

/// How a manifest was opened: from a store image's [`Base`] and the lines after it, or whole.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Opened {
    /// No base was offered, or it did not match the journal (the reason was logged).
    Whole,
    /// From the base, then this many lines after it.
    FromBase { lines_after: u64 },
}

fn open_file(path: &Path) -> Result<File, StoreError> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(path)
        .map_err(|e| StoreError::io(path, e))
}

/// Feeds the first `len` bytes of `file` (read from its start) to `digest`, 64 KiB at a time.
fn hash_prefix(file: &mut File, len: u64, digest: &mut Sha256) -> std::io::Result<()> {
    file.seek(SeekFrom::Start(0))?;
    let mut chunk = vec![0u8; 64 * 1024];
    let mut left = len;
    while left > 0 {
        let want = chunk.len().min(usize::try_from(left).unwrap_or(usize::MAX));
        file.read_exact(&mut chunk[..want])?;
        digest.update(&chunk[..want]);
        left -= want as u64;
    }
    Ok(())
}

impl Manifest {
    /// Reads and checks the manifest at `path` (`Ok(None)` if there is none), starting from `base` (a store image's record of the journal at a
    /// position) when the journal still begins with exactly the bytes `base` was taken from
    /// (their SHA-256) and every key its lines were authenticated with is in the keyring: then
    /// only the lines after it are read and checked, chained from its last MAC. Otherwise the
    /// whole journal is, as without a base.
    pub fn open_from(
        path: &Path,
        keyring: &Keyring,
        base: Option<Base>,
    ) -> Result<Option<(Manifest, Opened)>, StoreError> {
        let mut file = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(path, e)),
        };
        let io = |e| StoreError::io(path, e);
        let file_len = file.metadata().map_err(io)?.len();
        // The prefix a base vouches for is only hashed, as it streams by: it is most of the
        // journal (megabytes at 10,000 entries), and nothing in it needs reading again.
        let mut digest = Sha256::new();
        let base = match base {
            Some(base) => {
                let why_not = if base.len > file_len {
                    Some("it is shorter than when the image was taken (cut short, or replaced)")
                } else if base.line_keys.iter().any(|id| keyring.get(id).is_none()) {
                    Some("its lines were authenticated with a key the keyring does not hold")
                } else {
                    hash_prefix(&mut file, base.len, &mut digest).map_err(io)?;
                    let prefix: [u8; 32] = digest.clone().finalize().into();
                    (prefix != base.digest).then_some(
                        "it does not begin with the lines the image was taken from (compacted, rebuilt, or changed)",
                    )
                };
                match why_not {
                    Some(why) => {
                        tracing::warn!(path = %path.display(), why,
                            "store image does not match the store manifest; reading the whole manifest");
                        digest = Sha256::new();
                        None
                    }
                    None => Some(base),
                }
            }
            None => None,
        };
        // What is left to read and check: everything after the base, or the whole journal.
        let start = base.as_ref().map_or(0, |b| b.len);
        file.seek(SeekFrom::Start(start)).map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < bytes.len() {
            // A line cut short by a crash: its change was never acknowledged.
            tracing::warn!(path = %path.display(), discarded_bytes = bytes.len() - complete,
                "store manifest ended in a line cut short by a crash; cut off");
            file.set_len(start + complete as u64)
                .and_then(|()| file.sync_data())
                .map_err(io)?;
        }
        bytes.truncate(complete);
        let mut manifest = Manifest {
            path: path.to_owned(),
            file,
            len: start + complete as u64,
            seq: 0,
            prev: GENESIS,
            next_generation: 1,
            lines: 0,
            marks: Marks::default(),
            tombstones: HashMap::new(),
            audit_anchor: None,
            line_keys: BTreeSet::new(),
            digest,
            epoch: 0,
        };
        let mut opened = Opened::Whole;
        if let Some(base) = base {
            manifest.seq = base.seq;
            manifest.prev = base.prev;
            manifest.next_generation = base.next_generation;
            manifest.lines = base.lines;
            manifest.marks = base.marks;
            manifest.tombstones = base.tombstones;
            manifest.audit_anchor = base.audit_anchor;
            manifest.line_keys = base.line_keys;
            opened = Opened::FromBase { lines_after: 0 };
        }
        manifest.digest.update(&bytes);
        let lines_before = manifest.lines;
        let mut keys: HashMap<KeyId, MacKey> = HashMap::new();
        for (i, raw) in bytes.split_inclusive(|b| *b == b'\n').enumerate() {
            let raw = &raw[..raw.len() - 1];
            let corrupt = |reason: String| {
                StoreError::Integrity(format!(
                    "store manifest {}, line {}: {reason}. The manifest vouches for every entry's version, so the store cannot be trusted: restore the data directory from a backup, or start with --rebuild-store-manifest to accept the entries as they are",
                    path.display(),
                    lines_before + i as u64 + 1
                ))
            };
            let line = manifest
                .check_line(raw, keyring, &mut keys)
                .map_err(|e| match e {
                    LineError::ForeignKey(id) => StoreError::foreign_keyring(&[id], keyring),
                    LineError::Corrupt(reason) => corrupt(reason),
                })?;
            manifest.apply(line);
        }
        if let Opened::FromBase { lines_after } = &mut opened {
            *lines_after = manifest.lines - lines_before;
        }
        Ok(Some((manifest, opened)))
    }

    /// Where the journal ends now, as an image names it: its length and its last line's
    /// sequence number and the epoch (a compaction since changes it).
    pub fn position(&self) -> (u64, u64, u64) {
        (self.len, self.seq, self.epoch)
    }

    /// Writes the manifest's state at its current end, for a store image (read back by
    /// [`Base::decode`]).
    pub fn encode_base(&self, w: &mut Writer) {
        w.u64(self.len);
        w.bytes32(&self.digest.clone().finalize().into());
        w.u64(self.seq);
        w.bytes32(&self.prev);
        w.u64(self.next_generation);
        w.u64(self.lines);
        w.u32(self.line_keys.len() as u32);
        for id in &self.line_keys {
            w.str8(id.as_str());
        }
        match &self.audit_anchor {
            Some(a) => {
                w.u8(1);
                w.u64(a.seq);
                w.str16(&a.hash);
            }
            None => w.u8(0),
        }
        w.u32(self.marks.len() as u32);
        for ((kind, key), mark) in self.marks.iter() {
            w.kind(kind);
            w.key(key);
            w.u64(mark.generation);
            w.u8(mark.deleted as u8);
        }
        w.u32(self.tombstones.len() as u32);
        for ((kind, key), writes) in &self.tombstones {
            w.kind(*kind);
            w.key(key);
            w.json(writes);
        }
    }

    /// Checks one line's MAC and its place in the chain.
    fn check_line(
        &self,
        raw: &[u8],
        keyring: &Keyring,
        keys: &mut HashMap<KeyId, MacKey>,
    ) -> Result<Line, LineError> {
        let (body, tag) = crate::trailer::split(raw, MAC_FIELD)
            .ok_or_else(|| LineError::from("it does not end in a MAC: not a manifest line"))?;
        let line: Line = serde_json::from_slice(&body).map_err(|e| {
            LineError::from(format!("it is not a manifest line (column {})", e.column()))
        })?;
        if !keys.contains_key(&line.key_id) {
            let key = MacKey::for_key(keyring, &line.key_id, Purpose::StoreManifest)
                .map_err(|_| LineError::ForeignKey(line.key_id.clone()))?;
            keys.insert(line.key_id.clone(), key);
        }
        if !keys[&line.key_id].verify(&[&body], &tag) {
            return Err(
                "its MAC does not match its content: the manifest was edited, or written with another keyring"
                    .into(),
            );
        }
        let prev = crate::hex::decode_32(&line.prev)
            .ok_or_else(|| LineError::from("its prev field is not a MAC"))?;
        let first = self.lines == 0;
        if !(first && line.op == Op::Snapshot) {
            if prev != self.prev {
                return Err("it does not follow the line before it: lines were removed, reordered or replayed".into());
            }
            if line.seq != self.seq + 1 {
                return Err(format!(
                    "sequence number {} follows {}: lines were removed or reordered",
                    line.seq, self.seq
                )
                .into());
            }
        }
        let object_fields = line.kind.is_some() && line.namespace.is_some() && line.name.is_some();
        let fields_match = match line.op {
            Op::Put | Op::Delete => object_fields && line.audit.is_none(),
            Op::Snapshot => !object_fields,
            Op::Anchor => !object_fields && line.audit.is_some(),
        };
        let anchor_hash_ok = line
            .audit
            .as_ref()
            .is_none_or(|a| crate::hex::decode_32(&a.hash).is_some());
        if !fields_match || !anchor_hash_ok {
            return Err("its fields do not match its op".into());
        }
        Ok(Line {
            prev: hex_of(&tag),
            ..line
        })
    }

    /// Applies a checked line to the in-memory marks (`line.prev` holds the line's own MAC).
    fn apply(&mut self, line: Line) {
        self.seq = line.seq;
        self.prev = crate::hex::decode_32(&line.prev).expect("checked");
        self.lines += 1;
        self.line_keys.insert(line.key_id.clone());
        if line.audit.is_some() {
            self.audit_anchor = line.audit;
        }
        match (line.op, line.kind, line.namespace, line.name) {
            (Op::Snapshot, ..) => {
                self.next_generation = self.next_generation.max(line.generation);
            }
            (Op::Anchor, ..) => {}
            (op, Some(kind), Some(namespace), Some(name)) => {
                let key = (kind, ObjectKey::new(namespace, name));
                let deleted = op == Op::Delete;
                if deleted && !line.writes.is_empty() {
                    self.tombstones
                        .entry(key.clone())
                        .or_default()
                        .extend(line.writes);
                }
                self.marks.insert(
                    key,
                    Mark {
                        generation: line.generation,
                        deleted,
                    },
                );
                self.next_generation = self.next_generation.max(line.generation + 1);
            }
            _ => unreachable!("check_line refuses lines whose fields do not match their op"),
        }
    }

    /// A new, empty manifest at `path` that hands out generations from `next_generation`.
    pub fn create(
        path: &Path,
        keyring: &Keyring,
        next_generation: u64,
    ) -> Result<Manifest, StoreError> {
        let mut manifest = Manifest {
            path: path.to_owned(),
            file: open_file(path)?,
            len: 0,
            seq: 0,
            prev: GENESIS,
            next_generation,
            lines: 0,
            marks: Marks::default(),
            tombstones: HashMap::new(),
            audit_anchor: None,
            line_keys: BTreeSet::new(),
            digest: Sha256::new(),
            epoch: 0,
        };
        manifest
            .file
            .set_len(0)
            .map_err(|e| StoreError::io(path, e))?;
        let header = manifest.snapshot_line(keyring, 1, GENESIS);
        let (bytes, mac) = seal_line(&header, keyring);
        manifest.append_bytes(&bytes)?;
        manifest.after_append(&header, mac);
        super::files::fsync_dir(path.parent().unwrap_or(Path::new(".")))?;
        Ok(manifest)
    }

    fn snapshot_line(&self, keyring: &Keyring, seq: u64, prev: [u8; 32]) -> Line {
        Line {
            seq,
            op: Op::Snapshot,
            kind: None,
            namespace: None,
            name: None,
            generation: self.next_generation,
            writes: Vec::new(),
            audit: self.audit_anchor.clone(),
            key_id: keyring.active().id().clone(),
            prev: hex_of(&prev),
        }
    }

    /// The audit chain's head as last recorded.
    pub fn audit_anchor(&self) -> Option<&AuditAnchor> {
        self.audit_anchor.as_ref()
    }

    /// Records the audit chain's head (durably, before returning).
    pub fn record_audit_anchor(
        &mut self,
        keyring: &Keyring,
        anchor: AuditAnchor,
    ) -> Result<(), StoreError> {
        let line = Line {
            seq: self.seq + 1,
            op: Op::Anchor,
            kind: None,
            namespace: None,
            name: None,
            generation: self.next_generation,
            writes: Vec::new(),
            audit: Some(anchor.clone()),
            key_id: keyring.active().id().clone(),
            prev: hex_of(&self.prev),
        };
        let (bytes, mac) = seal_line(&line, keyring);
        self.append_bytes(&bytes)?;
        self.after_append(&line, mac);
        self.audit_anchor = Some(anchor);
        self.compact_if_large(keyring);
        Ok(())
    }

    pub fn mark(&self, kind: Kind, key: &ObjectKey) -> Option<Mark> {
        self.marks.of(kind).get(key).copied()
    }

    /// Every object the manifest says exists, with its generation.
    pub fn live(&self) -> impl Iterator<Item = (Kind, &ObjectKey, u64)> {
        self.marks
            .iter()
            .filter(|(_, m)| !m.deleted)
            .map(|((kind, key), m)| (kind, key, m.generation))
    }

    /// Writes remembered by deleted objects.
    pub fn tombstones(&self) -> impl Iterator<Item = (Kind, &ObjectKey, &WriteRecord)> {
        self.tombstones
            .iter()
            .flat_map(|((kind, key), writes)| writes.iter().map(move |w| (*kind, key, w)))
    }

    /// The generation the next change gets.
    pub fn next_generation(&self) -> u64 {
        self.next_generation
    }

    /// Records that the entry of `kind`/`key` now has `generation` (written before this call).
    pub fn record_put(
        &mut self,
        keyring: &Keyring,
        kind: Kind,
        key: &ObjectKey,
        generation: u64,
    ) -> Result<(), StoreError> {
        self.append(keyring, Op::Put, kind, key, generation, Vec::new())?;
        self.marks.insert(
            (kind, key.clone()),
            Mark {
                generation,
                deleted: false,
            },
        );
        self.next_generation = self.next_generation.max(generation + 1);
        self.compact_if_large(keyring);
        Ok(())
    }

    /// Records the deletion of `kind`/`key` (before its file is removed), with the writes the
    /// object remembers; returns the delete's generation.
    pub fn record_delete(
        &mut self,
        keyring: &Keyring,
        kind: Kind,
        key: &ObjectKey,
        writes: Vec<WriteRecord>,
    ) -> Result<u64, StoreError> {
        let generation = self.next_generation;
        let writes = retained(writes, jiff::Timestamp::now());
        self.append(keyring, Op::Delete, kind, key, generation, writes.clone())?;
        self.marks.insert(
            (kind, key.clone()),
            Mark {
                generation,
                deleted: true,
            },
        );
        if !writes.is_empty() {
            self.tombstones
                .entry((kind, key.clone()))
                .or_default()
                .extend(writes);
        }
        self.next_generation = generation + 1;
        self.compact_if_large(keyring);
        Ok(generation)
    }

    fn append(
        &mut self,
        keyring: &Keyring,
        op: Op,
        kind: Kind,
        key: &ObjectKey,
        generation: u64,
        writes: Vec<WriteRecord>,
    ) -> Result<(), StoreError> {
        let line = Line {
            seq: self.seq + 1,
            op,
            kind: Some(kind),
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            generation,
            writes,
            audit: None,
            key_id: keyring.active().id().clone(),
            prev: hex_of(&self.prev),
        };
        let (bytes, mac) = seal_line(&line, keyring);
        self.append_bytes(&bytes)?;
        self.after_append(&line, mac);
        Ok(())
    }

    /// Appends and syncs; on failure cuts the file back so the chain stays whole.
    fn append_bytes(&mut self, bytes: &[u8]) -> Result<(), StoreError> {
        let result = self
            .file
            .seek(SeekFrom::Start(self.len))
            .and_then(|_| check(Step::Write))
            .and_then(|()| self.file.write_all(bytes))
            .and_then(|()| check(Step::Fsync))
            .and_then(|()| self.file.sync_data());
        if let Err(e) = result {
            let _ = self.file.set_len(self.len);
            return Err(StoreError::io(&self.path, e));
        }
        self.len += bytes.len() as u64;
        self.digest.update(bytes);
        Ok(())
    }

    fn after_append(&mut self, line: &Line, mac: [u8; 32]) {
        self.seq = line.seq;
        self.prev = mac;
        self.lines += 1;
        self.line_keys.insert(line.key_id.clone());
    }

    /// The master keys the journal's lines are authenticated under.
    pub fn line_keys(&self) -> &BTreeSet<KeyId> {
        &self.line_keys
    }

    /// Rewrites the journal as a snapshot, every line under the keyring's active key (after a
    /// rotation: so the retired key can leave the keyring). Atomic: a crash leaves the old
    /// journal or the new one.
    pub fn rewrite(&mut self, keyring: &Keyring) -> Result<(), StoreError> {
        self.compact(keyring)
    }

    /// Rewrites the journal as a snapshot once it has grown well past the number of entries.
    /// A failure is logged, not returned: the change that triggered it is already recorded, and
    /// the journal stays as it was (the next change tries again).
    fn compact_if_large(&mut self, keyring: &Keyring) {
        if self.lines <= 2 * self.marks.len() as u64 + COMPACT_SLACK {
            return;
        }
        if let Err(e) = self.compact(keyring) {
            tracing::warn!(error = %e, "store manifest could not be compacted; it keeps growing until it can");
        }
    }

    fn compact(&mut self, keyring: &Keyring) -> Result<(), StoreError> {
        let now = jiff::Timestamp::now();
        for writes in self.tombstones.values_mut() {
            *writes = retained(std::mem::take(writes), now);
        }
        self.tombstones.retain(|_, w| !w.is_empty());
        // A deleted object's mark is kept only while it remembers writes: an older copy of its
        // entry is refused anyway, as every entry the manifest does not name is.
        let tombstones = &self.tombstones;
        self.marks.retain(|kind, key, mark| {
            !mark.deleted || tombstones.contains_key(&(kind, key.clone()))
        });

        let mut seq = self.seq + 1;
        let header = self.snapshot_line(keyring, seq, self.prev);
        let (mut out, mut prev) = seal_line(&header, keyring);
        let mut lines = 1;
        let mut marks: Vec<_> = self.marks.iter().collect();
        // Deletes first: an object deleted and created again is live after replay.
        marks.sort_by_key(|((kind, key), mark)| {
            (!mark.deleted, mark.generation, *kind, (*key).clone())
        });
        for ((kind, key), mark) in marks {
            seq += 1;
            let line = Line {
                seq,
                op: if mark.deleted { Op::Delete } else { Op::Put },
                kind: Some(kind),
                namespace: Some(key.namespace.clone()),
                name: Some(key.name.clone()),
                generation: mark.generation,
                writes: if mark.deleted {
                    self.tombstones
                        .get(&(kind, key.clone()))
                        .cloned()
                        .unwrap_or_default()
                } else {
                    Vec::new()
                },
                audit: None,
                key_id: keyring.active().id().clone(),
                prev: hex_of(&prev),
            };
            let (bytes, mac) = seal_line(&line, keyring);
            out.extend_from_slice(&bytes);
            prev = mac;
            lines += 1;
        }
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let name = self
            .path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or(FILE_NAME);
        // The new journal is written and synced under a temporary name, then renamed over the
        // old one; the handle written through is the one kept for appends, so no append can go
        // to a file that was replaced.
        let tmp = dir.join(format!(".{name}.compacting"));
        let file = (|| {
            check(Step::Open)?;
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?;
            check(Step::Write)?;
            f.write_all(&out)?;
            check(Step::Fsync)?;
            f.sync_all()?;
            check(Step::Rename)?;
            std::fs::rename(&tmp, &self.path)?;
            Ok(f)
        })()
        .map_err(|e| StoreError::io(&tmp, e))?;
        super::files::fsync_dir(dir)?;
        self.file = file;
        self.len = out.len() as u64;
        self.digest = Sha256::new();
        self.digest.update(&out);
        self.epoch += 1;
        self.seq = seq;
        self.prev = prev;
        self.lines = lines;
        self.line_keys = BTreeSet::from([keyring.active().id().clone()]);
        tracing::debug!(lines, "store manifest compacted");
        Ok(())
    }
}

impl Base {
    /// Reads what [`Manifest::encode_base`] wrote.
    pub fn decode(r: &mut Reader) -> Result<Base, String> {
        let len = r.u64()?;
        let digest = r.bytes32()?;
        let seq = r.u64()?;
        let prev = r.bytes32()?;
        let next_generation = r.u64()?;
        let lines = r.u64()?;
        let mut line_keys = BTreeSet::new();
        for _ in 0..r.u32()? {
            line_keys.insert(r.key_id()?);
        }
        let audit_anchor = match r.u8()? {
            0 => None,
            _ => Some(AuditAnchor {
                seq: r.u64()?,
                hash: r.str16()?.to_owned(),
            }),
        };
        let n = r.u32()? as usize;
        // Gathered first and each map built at its size (growing a map of 10,000 rehashes it
        // a dozen times, on the start-up's path).
        let (mut secrets, mut configs) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let kind = r.kind()?;
            let key = r.key()?;
            let mark = Mark {
                generation: r.u64()?,
                deleted: r.u8()? != 0,
            };
            match kind {
                Kind::Secret => secrets.push((key, mark)),
                Kind::Config => configs.push((key, mark)),
            }
        }
        let marks = Marks {
            secrets: secrets.into_iter().collect(),
            configs: configs.into_iter().collect(),
        };
        let mut tombstones = HashMap::new();
        for _ in 0..r.u32()? {
            let kind = r.kind()?;
            let key = r.key()?;
            tombstones.insert((kind, key), r.json()?);
        }
        Ok(Base {
            len,
            digest,
            seq,
            prev,
            next_generation,
            lines,
            marks,
            tombstones,
            audit_anchor,
            line_keys,
        })
    }
}

/// The master key ids the manifest at `path` names, read without checking any MAC: only to
/// name, in an error, the key a data dir needs. At most the first 64 KiB are read.
pub(super) fn key_ids_named(path: &Path) -> Vec<KeyId> {
    #[derive(Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Named {
        key_id: KeyId,
    }
    let Ok(file) = File::open(path) else {
        return Vec::new();
    };
    let mut head = Vec::new();
    if file.take(64 * 1024).read_to_end(&mut head).is_err() {
        return Vec::new();
    }
    let mut ids: Vec<KeyId> = Vec::new();
    for line in head.split(|b| *b == b'\n') {
        let Some((body, _)) = crate::trailer::split(line, MAC_FIELD) else {
            continue;
        };
        if let Ok(named) = serde_json::from_slice::<Named>(&body)
            && !ids.contains(&named.key_id)
        {
            ids.push(named.key_id);
        }
    }
    ids
}

/// Why a manifest line was refused.
enum LineError {
    /// Authenticated with a master key the keyring does not hold: not damage, another keyring.
    ForeignKey(KeyId),
    Corrupt(String),
}

impl From<String> for LineError {
    fn from(reason: String) -> Self {
        LineError::Corrupt(reason)
    }
}

impl From<&str> for LineError {
    fn from(reason: &str) -> Self {
        LineError::Corrupt(reason.to_owned())
    }
}

fn hex_of(mac: &[u8; 32]) -> String {
    crate::hex::encode(mac)
}

/// The line's bytes (MAC appended, newline included) and its MAC. Lines are always made with
/// the keyring's active key, which their `keyId` names.
fn seal_line(line: &Line, keyring: &Keyring) -> (Vec<u8>, [u8; 32]) {
    let key = MacKey::active(keyring, Purpose::StoreManifest);
    debug_assert_eq!(&line.key_id, key.key_id());
    let body = serde_json::to_vec(line).expect("a manifest line serializes");
    let mac = key.tag(&[&body]);
    let mut bytes = crate::trailer::append(&body, MAC_FIELD, &mac);
    bytes.push(b'\n');
    (bytes, mac)
}
