//! The store image (`store.image`): one authenticated file from which start-up takes what it
//! would otherwise read from every entry file and from every line of the manifest
//! (docs/crypto.md, "The node store").
//!
//! It holds every held entry, decoded, in a compact binary encoding (a secret's envelope as its
//! bytes: ciphertext only, as in its entry file), each with the **identity of its file**
//! (device, inode, size, mtime and ctime in nanoseconds) as the store saw it when it last read
//! or wrote the file (never by looking again when the image is taken), and the
//! manifest's state at a position of its journal (the marks, the deletes that remember writes,
//! the audit anchor, the next generation), with the journal's length there, the SHA-256 of its
//! bytes up to there and its last MAC. One HMAC-SHA256 (its own key, [`Purpose::StoreImage`],
//! under the master key the image names) covers all of it.
//!
//! What start-up does with it (`Store::open`):
//!
//! * an entry file whose identity is the one the image recorded has not been written, replaced
//!   or copied back since (ctime is set by the kernel on every change and cannot be set from
//!   user space): the image's record of it is what reading it would give, so it is not read.
//!   Any other file (new, or with another identity) is read and checked as without an image.
//!   The records then go through exactly the same checks against the manifest;
//! * the manifest is read whole but only hashed up to the image's position; when the hash is
//!   the image's, the lines up to there are those the image's state was derived from, and
//!   only the lines after it are parsed and checked (chained from the image's last MAC);
//!   otherwise (compacted, rebuilt, cut short, edited) the whole journal is checked;
//! * an image that does not authenticate, names a key the keyring does not hold, or cannot be
//!   parsed, is ignored (a WARN line), and everything is read as without one.
//!
//! A stale image is fine: what changed since has another identity, or is in the lines after
//! its position. The image is written by a thread of the store's own, never by a read or a
//! write (see [`Keeper`]).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use jiff::Timestamp;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::manifest::{Base, Manifest};
use super::records::{ConfigRecord, Decoded, Origin, SecretRecord, Uid};
use super::writes::WriteRecord;
use super::{Held, State, StoreError, files};
use crate::crypto::{Envelope, KeyId, Keyring, MacKey, Purpose, SharedKeyring};
use crate::domain::{Kind, Name, Namespace, ObjectKey, Version, Workload, WorkloadSet};

pub(super) const FILE_NAME: &str = "store.image";
const MAGIC: &[u8; 4] = b"CLSI";
const VERSION: u8 = 1;
const TAG_LEN: usize = 32;

/// How long the store must have been without entry changes before an image is taken: a burst
/// of writes is imaged once, after it, not once per write.
const QUIET: Duration = Duration::from_secs(1);
/// Manifest lines since the last image after which one is taken even if the store is never
/// quiet (the audit anchor adds a line every second while reads are served): it bounds what a
/// start-up checks line by line (about 3 us a line) to a few milliseconds, while an image
/// (tens of milliseconds of one core at 10,000 entries) is taken at most once per 1,024
/// changes.
const MAX_LINES_SINCE: u64 = 1024;
/// A file changed this recently is left out of an image (it is read at the next start): the
/// kernel stamps ctime from a coarse clock, so a file replaced within the same tick could
/// otherwise get the identity of the one it replaced (an inode number freed and reused, the
/// same size, the same stamps).
pub(super) const SETTLED: Duration = Duration::from_millis(if cfg!(test) { 30 } else { 200 });

const _: () = assert!(std::mem::size_of::<Option<FileId>>() == 40);

/// A file's identity: what changes whenever its content may have. 40 bytes (the store keeps
/// one per entry; `Option<FileId>` is no larger: an inode number is never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct FileId {
    dev: u64,
    ino: std::num::NonZeroU64,
    size: u64,
    /// Nanoseconds since the epoch.
    mtime: i64,
    ctime: i64,
}

impl FileId {
    /// The identity of `dir`'s entry `name` (not following a symlink); `None` if it cannot be
    /// told (gone, or a file system that does not give every part of it).
    pub fn at(dir: &std::fs::File, name: &str) -> Option<FileId> {
        Self::statx(dir, name, rustix::fs::AtFlags::SYMLINK_NOFOLLOW)
    }

    /// The identity of an open file.
    pub fn of(file: &std::fs::File) -> Option<FileId> {
        Self::statx(file, "", rustix::fs::AtFlags::EMPTY_PATH)
    }

    fn statx(fd: &std::fs::File, name: &str, flags: rustix::fs::AtFlags) -> Option<FileId> {
        use rustix::fs::StatxFlags;
        let want = StatxFlags::INO | StatxFlags::SIZE | StatxFlags::MTIME | StatxFlags::CTIME;
        let st = rustix::fs::statx(fd, name, flags, want).ok()?;
        if !StatxFlags::from_bits_retain(st.stx_mask).contains(want) {
            return None;
        }
        let ns = |t: rustix::fs::StatxTimestamp| {
            t.tv_sec
                .checked_mul(1_000_000_000)?
                .checked_add(i64::from(t.tv_nsec))
        };
        Some(FileId {
            dev: (u64::from(st.stx_dev_major) << 32) | u64::from(st.stx_dev_minor),
            ino: std::num::NonZeroU64::new(st.stx_ino)?,
            size: st.stx_size,
            mtime: ns(st.stx_mtime)?,
            ctime: ns(st.stx_ctime)?,
        })
    }

    /// The later of its mtime and ctime (nanoseconds since the epoch): when it last changed.
    fn changed(&self) -> i64 {
        self.mtime.max(self.ctime)
    }

    fn write(&self, w: &mut Writer) {
        for v in [self.dev, self.ino.get(), self.size] {
            w.u64(v);
        }
        for v in [self.mtime, self.ctime] {
            w.u64(v as u64);
        }
    }

    fn read(r: &mut Reader) -> Result<FileId, String> {
        Ok(FileId {
            dev: r.u64()?,
            ino: std::num::NonZeroU64::new(r.u64()?).ok_or("inode 0")?,
            size: r.u64()?,
            mtime: r.u64()? as i64,
            ctime: r.u64()? as i64,
        })
    }
}

/// Appends the image's encoding: integers little-endian, strings and blobs length-prefixed.
#[derive(Default)]
pub(super) struct Writer(Vec<u8>);

impl Writer {
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    pub fn u16(&mut self, v: u16) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    pub fn bytes32(&mut self, v: &[u8; 32]) {
        self.0.extend_from_slice(v);
    }
    pub fn str8(&mut self, s: &str) {
        let s = &s.as_bytes()[..s.len().min(255)];
        self.u8(s.len() as u8);
        self.0.extend_from_slice(s);
    }
    pub fn str16(&mut self, s: &str) {
        let s = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        self.u16(s.len() as u16);
        self.0.extend_from_slice(s);
    }
    pub fn blob(&mut self, b: &[u8]) {
        self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
    }
    pub fn kind(&mut self, kind: Kind) {
        self.u8(match kind {
            Kind::Secret => 1,
            Kind::Config => 2,
        });
    }
    pub fn key(&mut self, key: &ObjectKey) {
        self.str16(key.namespace.as_str());
        self.str16(key.name.as_str());
    }
    /// A value of the rare, nested kinds (remembered writes, a config's data) as JSON; an empty
    /// list of writes, the usual case, as nothing.
    pub fn json<T: Serialize>(&mut self, v: &T) {
        let bytes = serde_json::to_vec(v).expect("a store value serializes");
        self.blob(&bytes);
    }
    fn writes(&mut self, writes: &[WriteRecord]) {
        if writes.is_empty() {
            self.u32(0);
        } else {
            self.json(&writes);
        }
    }
    fn time(&mut self, t: Timestamp) {
        self.u64(t.as_second() as u64);
        self.u32(t.subsec_nanosecond() as u32);
    }
    fn origin(&mut self, origin: Option<&Origin>) {
        match origin {
            None => self.u8(0),
            Some(o) => {
                self.u8(1);
                o.uid.with_text(|uid| self.str16(uid));
                match o.revision {
                    None => self.u8(0),
                    Some(r) => {
                        self.u8(1);
                        self.u64(r);
                    }
                }
            }
        }
    }
}

/// Reads what [`Writer`] wrote; every read is bounds-checked (the bytes are authenticated
/// before any is read, but a parse never trusts a length).
pub(super) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

thread_local! {
    /// The namespace this thread decoded last: an image's entries and marks are in a few
    /// namespaces, usually in runs, and sharing one saves an allocation and a check at start-up
    /// and a copy in memory per entry (two with the manifest's marks).
    static LAST_NAMESPACE: std::cell::RefCell<Option<Namespace>> =
        const { std::cell::RefCell::new(None) };
    /// The same for the allowed workloads: a namespace's secrets mostly allow the same ones.
    static LAST_WORKLOADS: std::cell::RefCell<WorkloadSet> =
        std::cell::RefCell::new(WorkloadSet::default());
}

fn shared_namespace(s: &str) -> Result<Namespace, String> {
    LAST_NAMESPACE.with_borrow_mut(|last| match last {
        Some(namespace) if namespace.as_str() == s => Ok(namespace.clone()),
        _ => {
            let namespace = Namespace::parse(s).map_err(|e| e.to_string())?;
            *last = Some(namespace.clone());
            Ok(namespace)
        }
    })
}

fn shared_workloads(mut set: WorkloadSet) -> WorkloadSet {
    LAST_WORKLOADS.with_borrow_mut(|last| {
        set.share(last);
        last.clone_from(&set);
    });
    set
}

fn short() -> String {
    "it ends early".to_owned()
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self.pos.checked_add(n).ok_or_else(short)?;
        let b = self.buf.get(self.pos..end).ok_or_else(short)?;
        self.pos = end;
        Ok(b)
    }
    pub fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    pub fn u16(&mut self) -> Result<u16, String> {
        Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2")))
    }
    pub fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    pub fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
    pub fn bytes32(&mut self) -> Result<[u8; 32], String> {
        Ok(self.take(32)?.try_into().expect("32"))
    }
    fn utf8(b: &[u8]) -> Result<&str, String> {
        std::str::from_utf8(b).map_err(|_| "a string is not UTF-8".to_owned())
    }
    pub fn str8(&mut self) -> Result<&'a str, String> {
        let n = self.u8()? as usize;
        Self::utf8(self.take(n)?)
    }
    pub fn str16(&mut self) -> Result<&'a str, String> {
        let n = self.u16()? as usize;
        Self::utf8(self.take(n)?)
    }
    pub fn blob(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    pub fn kind(&mut self) -> Result<Kind, String> {
        match self.u8()? {
            1 => Ok(Kind::Secret),
            2 => Ok(Kind::Config),
            k => Err(format!("unknown kind {k}")),
        }
    }
    pub fn key(&mut self) -> Result<ObjectKey, String> {
        let namespace = shared_namespace(self.str16()?)?;
        let name = Name::parse(self.str16()?).map_err(|e| e.to_string())?;
        Ok(ObjectKey::new(namespace, name))
    }
    pub fn key_id(&mut self) -> Result<KeyId, String> {
        KeyId::parse(self.str8()?).map_err(|e| e.to_string())
    }
    pub fn json<T: DeserializeOwned>(&mut self) -> Result<T, String> {
        serde_json::from_slice(self.blob()?).map_err(|e| format!("a JSON value: {e}"))
    }
    fn writes(&mut self) -> Result<Vec<WriteRecord>, String> {
        let b = self.blob()?;
        if b.is_empty() {
            return Ok(Vec::new());
        }
        serde_json::from_slice(b).map_err(|e| format!("remembered writes: {e}"))
    }
    fn time(&mut self) -> Result<Timestamp, String> {
        let s = self.u64()? as i64;
        let ns = self.u32()? as i32;
        Timestamp::new(s, ns).map_err(|e| e.to_string())
    }
    fn origin(&mut self) -> Result<Option<Origin>, String> {
        if self.u8()? == 0 {
            return Ok(None);
        }
        let uid = Uid::new(self.str16()?);
        let revision = match self.u8()? {
            0 => None,
            _ => Some(self.u64()?),
        };
        Ok(Some(Origin { uid, revision }))
    }
}

fn write_secret(w: &mut Writer, r: &SecretRecord) {
    w.kind(Kind::Secret);
    w.key(&r.key);
    w.u64(r.version.get());
    w.time(r.created_at);
    w.time(r.updated_at);
    let workloads: Vec<&Workload> = r.allowed_workloads.iter().collect();
    w.u16(workloads.len() as u16);
    for wl in workloads {
        w.str16(wl.as_str());
    }
    w.blob(&r.envelope.to_bytes());
    w.origin(r.origin.as_ref());
    w.writes(&r.writes);
    w.u64(r.generation);
}

fn read_secret(r: &mut Reader) -> Result<SecretRecord, String> {
    if r.kind()? != Kind::Secret {
        return Err("not a secret".to_owned());
    }
    let key = r.key()?;
    let version = Version::new(r.u64()?).ok_or("version 0")?;
    let created_at = r.time()?;
    let updated_at = r.time()?;
    let n = r.u16()? as usize;
    let mut workloads = Vec::with_capacity(n);
    for _ in 0..n {
        workloads.push(Workload::parse(r.str16()?).map_err(|e| e.to_string())?);
    }
    let allowed_workloads =
        shared_workloads(WorkloadSet::parse(workloads).map_err(|e| e.to_string())?);
    let envelope = Envelope::from_bytes(r.blob()?).map_err(|e| e.to_string())?;
    Ok(SecretRecord {
        key,
        version,
        created_at,
        updated_at,
        allowed_workloads,
        envelope,
        origin: r.origin()?,
        writes: r.writes()?,
        generation: r.u64()?,
    })
}

fn write_config(w: &mut Writer, r: &ConfigRecord) {
    w.kind(Kind::Config);
    w.key(&r.key);
    w.json(&r.data);
    w.u8(r.immutable as u8);
    w.time(r.created_at);
    w.time(r.updated_at);
    w.origin(r.origin.as_ref());
    w.writes(&r.writes);
    w.u64(r.generation);
}

fn read_config(r: &mut Reader) -> Result<ConfigRecord, String> {
    if r.kind()? != Kind::Config {
        return Err("not a config".to_owned());
    }
    Ok(ConfigRecord {
        key: r.key()?,
        data: r.json()?,
        immutable: r.u8()? != 0,
        created_at: r.time()?,
        updated_at: r.time()?,
        origin: r.origin()?,
        writes: r.writes()?,
        generation: r.u64()?,
    })
}

/// What an entry's record decodes to, and the master key its file's MAC is under: what reading
/// the file would have given.
pub(super) struct Known<R> {
    pub decoded: Decoded<R>,
    pub mac_key: KeyId,
}

struct Indexed {
    /// The name's first 8 bytes: what the search compares (the rest only when they are equal).
    prefix: u64,
    name: [u8; 32],
    id: FileId,
    mac_key: u8,
    record: std::ops::Range<usize>,
}

/// An image read at start-up and authenticated. Dropped once the store is open.
pub(super) struct Image {
    bytes: Vec<u8>,
    /// The master keys the entry files' MACs are under.
    mac_keys: Vec<KeyId>,
    /// Where the manifest's state is (decoded on the manifest's own thread).
    base: std::ops::Range<usize>,
    /// Sorted by file name.
    entries: Vec<Indexed>,
}

impl Image {
    /// The image at `path`, if there is one that authenticates under `keyring` and parses;
    /// otherwise `None`, and a WARN line says why (nothing of it is used).
    pub fn read(path: &Path, keyring: &Keyring) -> Option<Image> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "store image unreadable; reading every entry");
                return None;
            }
        };
        match Self::parse(bytes, keyring) {
            Ok(image) => Some(image),
            Err(why) => {
                tracing::warn!(path = %path.display(), why, "store image ignored; reading every entry");
                None
            }
        }
    }

    fn parse(bytes: Vec<u8>, keyring: &Keyring) -> Result<Image, String> {
        if bytes.len() < MAGIC.len() + 1 + TAG_LEN || &bytes[..4] != MAGIC {
            return Err("not a store image".to_owned());
        }
        if bytes[4] != VERSION {
            return Err(format!("image version {} is not this build's", bytes[4]));
        }
        let (body, tag) = bytes.split_at(bytes.len() - TAG_LEN);
        let mut r = Reader::new(body);
        r.take(5)?;
        let key_id = r.key_id()?;
        let key = MacKey::for_key(keyring, &key_id, Purpose::StoreImage).map_err(|_| {
            format!("it is authenticated with master key {key_id}, which the keyring does not hold")
        })?;
        if !key.verify(&[body], tag) {
            return Err(
                "its MAC does not match its content (edited, or written with another keyring)"
                    .to_owned(),
            );
        }
        // Authenticated: parsed from here on, still checking every length.
        let mut mac_keys = Vec::new();
        for _ in 0..r.u8()? {
            mac_keys.push(r.key_id()?);
        }
        let base_len = r.u32()? as usize;
        let base_start = r.pos;
        r.take(base_len)?;
        let base = base_start..base_start + base_len;
        let n = r.u32()? as usize;
        let mut entries = Vec::with_capacity(n.min(1 << 20));
        for _ in 0..n {
            let name = r.bytes32()?;
            let id = FileId::read(&mut r)?;
            let mac_key = r.u8()?;
            if mac_key as usize >= mac_keys.len() {
                return Err("an entry names no key".to_owned());
            }
            let len = r.u32()? as usize;
            let start = r.pos;
            r.take(len)?;
            entries.push(Indexed {
                prefix: prefix_of(&name),
                name,
                id,
                mac_key,
                record: start..start + len,
            });
        }
        if r.pos != body.len() {
            return Err("bytes after its last entry".to_owned());
        }
        if !entries.is_sorted_by(|a, b| a.name < b.name) {
            return Err("its entries are not in order".to_owned());
        }
        Ok(Image {
            bytes,
            mac_keys,
            base,
            entries,
        })
    }

    /// The manifest's state the image carries; `None` (and a WARN line) if it cannot be
    /// decoded: then the whole manifest is read, and the entries are still taken from the
    /// image.
    pub fn base(&self) -> Option<Base> {
        let mut r = Reader::new(&self.bytes[self.base.clone()]);
        match Base::decode(&mut r) {
            Ok(base) if r.pos == self.base.len() => Some(base),
            Ok(_) => None,
            Err(why) => {
                tracing::warn!(
                    why,
                    "store image's manifest state ignored; reading the whole manifest"
                );
                None
            }
        }
    }

    fn find(&self, file_name: &str, id: &FileId) -> Option<&Indexed> {
        let hex = file_name.strip_suffix(".json")?;
        let name = decode_name(hex.as_bytes())?;
        let prefix = prefix_of(&name);
        let i = self
            .entries
            .binary_search_by(|e| e.prefix.cmp(&prefix).then_with(|| e.name.cmp(&name)))
            .ok()?;
        let e = &self.entries[i];
        (e.id == *id).then_some(e)
    }

    fn known<R>(
        &self,
        file_name: &str,
        id: &FileId,
        keyring: &Keyring,
        read: impl Fn(&mut Reader) -> Result<R, String>,
    ) -> Option<Known<R>> {
        let e = self.find(file_name, id)?;
        let mac_key = self.mac_keys[e.mac_key as usize].clone();
        if keyring.get(&mac_key).is_none() {
            // What reading the file gives too: it names a key the keyring does not hold.
            return Some(Known {
                decoded: Decoded::ForeignKey(mac_key.clone()),
                mac_key,
            });
        }
        let mut r = Reader::new(&self.bytes[e.record.clone()]);
        // A record this build cannot decode (it never should) is read from its file instead.
        let record = read(&mut r).ok()?;
        Some(Known {
            decoded: Decoded::Authentic(record),
            mac_key,
        })
    }

    /// The secret the file `file_name` of identity `id` holds, if the image knows that file.
    pub fn secret(
        &self,
        file_name: &str,
        id: &FileId,
        keyring: &Keyring,
    ) -> Option<Known<SecretRecord>> {
        self.known(file_name, id, keyring, read_secret)
    }

    /// The config the file `file_name` of identity `id` holds, if the image knows that file.
    pub fn config(
        &self,
        file_name: &str,
        id: &FileId,
        keyring: &Keyring,
    ) -> Option<Known<ConfigRecord>> {
        self.known(file_name, id, keyring, read_config)
    }
}

fn prefix_of(name: &[u8; 32]) -> u64 {
    u64::from_be_bytes(name[..8].try_into().expect("8 bytes"))
}

/// An entry file's name (64 lowercase hex digits) as its 32 bytes; the same as
/// `crate::hex::decode_32`, by table, as it runs once per entry file at start-up.
fn decode_name(hex: &[u8]) -> Option<[u8; 32]> {
    const NIBBLE: [u8; 256] = {
        let mut t = [0xff; 256];
        let mut i = 0;
        while i < 10 {
            t[b'0' as usize + i] = i as u8;
            i += 1;
        }
        let mut i = 0;
        while i < 6 {
            t[b'a' as usize + i] = 10 + i as u8;
            i += 1;
        }
        t
    };
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    let mut bad = 0u8;
    for (byte, pair) in out.iter_mut().zip(hex.chunks_exact(2)) {
        let (hi, lo) = (NIBBLE[pair[0] as usize], NIBBLE[pair[1] as usize]);
        bad |= hi | lo;
        *byte = (hi << 4) | (lo & 0x0f);
    }
    (bad & 0xf0 == 0).then_some(out)
}

/// What the image writer needs of the store (shared with it).
pub(super) struct Source {
    pub image_path: PathBuf,
    pub keys: SharedKeyring,
    pub state: Arc<RwLock<State>>,
    pub manifest: Arc<Mutex<Manifest>>,
}

/// Why an image was not written (not an error: the store is as good without it).
#[derive(Debug, PartialEq, Eq)]
pub(super) enum NotWritten {
    /// Entry files are under more master keys than an image names (never, in practice).
    TooManyKeys,
    /// The store is closing.
    Stopped,
}

impl Source {
    /// Takes an image of the store as it is and writes it (atomically, durably). The manifest
    /// lock (which every write takes) is held once, briefly: to copy the manifest's state and
    /// the list of held records with their files' identities (well under a millisecond at
    /// 10,000 entries), so the three agree; the rest runs with nothing held.
    pub fn write(&self, stop: &AtomicBool) -> Result<Result<usize, NotWritten>, StoreError> {
        let started = std::time::SystemTime::now();
        let (base, secrets, configs) = {
            let manifest = self.manifest.lock().unwrap_or_else(|e| e.into_inner());
            let mut base = Writer::default();
            manifest.encode_base(&mut base);
            let state = self.state.read().unwrap_or_else(|e| e.into_inner());
            let secrets: Vec<Held<SecretRecord>> = state.secrets.values().cloned().collect();
            let configs: Vec<Held<ConfigRecord>> = state.configs.values().cloned().collect();
            (base, secrets, configs)
        };
        let settled_before = started
            .checked_sub(SETTLED)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos() as i64);
        // What goes in: entries whose file's identity the store knows and that settled, in
        // file-name order.
        let mut mac_keys: Vec<&KeyId> = Vec::new();
        let mut order: Vec<([u8; 32], Kind, usize)> = Vec::new();
        let included = |file: &Option<FileId>| file.is_some_and(|id| id.changed() < settled_before);
        let name_of = |kind: Kind, key: &ObjectKey| {
            let file = super::file_name(kind, key);
            crate::hex::decode_32(file.trim_end_matches(".json")).expect("a hash")
        };
        for (i, held) in secrets.iter().enumerate() {
            if included(&held.file) {
                order.push((name_of(Kind::Secret, &held.record.key), Kind::Secret, i));
                if !mac_keys.contains(&&*held.mac_key) {
                    mac_keys.push(&held.mac_key);
                }
            }
        }
        for (i, held) in configs.iter().enumerate() {
            if included(&held.file) {
                order.push((name_of(Kind::Config, &held.record.key), Kind::Config, i));
                if !mac_keys.contains(&&*held.mac_key) {
                    mac_keys.push(&held.mac_key);
                }
            }
        }
        if mac_keys.len() > u8::MAX as usize {
            return Ok(Err(NotWritten::TooManyKeys));
        }
        order.sort_unstable_by_key(|e| e.0);
        let ring = self.keys.current();
        let key = MacKey::active(&ring, Purpose::StoreImage);
        let mut head = Writer(Vec::with_capacity(base.0.len() + 1024));
        head.0.extend_from_slice(MAGIC);
        head.u8(VERSION);
        head.str8(key.key_id().as_str());
        head.u8(mac_keys.len() as u8);
        for k in &mac_keys {
            head.str8(k.as_str());
        }
        head.blob(&base.0);
        drop(base);
        head.u32(order.len() as u32);
        let count = order.len();
        // One entry's bytes, encoded into `out` (cleared first); `record` is scratch.
        let mut record = Writer::default();
        let mut encode = |(name, kind, i): &([u8; 32], Kind, usize), out: &mut Writer| {
            out.0.clear();
            record.0.clear();
            let (mac_key, file) = match kind {
                Kind::Secret => {
                    let held = &secrets[*i];
                    write_secret(&mut record, &held.record);
                    (&held.mac_key, held.file)
                }
                Kind::Config => {
                    let held = &configs[*i];
                    write_config(&mut record, &held.record);
                    (&held.mac_key, held.file)
                }
            };
            let ix = mac_keys
                .iter()
                .position(|k| *k == &**mac_key)
                .expect("listed");
            out.bytes32(name);
            file.expect("included").write(out);
            out.u8(ix as u8);
            out.blob(&record.0);
        };
        // The image is tagged as one part, whose length goes into the MAC before its bytes;
        // it is streamed to the file rather than assembled (at 10,000 entries it is megabytes:
        // the agent's largest allocation, for a moment every few minutes, was this buffer). So
        // entries are encoded twice: once to add up their lengths, once to write and tag them.
        // Encoding is cheap next to the write and its fsync.
        let mut entry = Writer(Vec::with_capacity(1024));
        let mut len = head.0.len() as u64;
        for (n, e) in order.iter().enumerate() {
            if n % 256 == 255 && stop.load(Ordering::Relaxed) {
                return Ok(Err(NotWritten::Stopped));
            }
            encode(e, &mut entry);
            len += entry.0.len() as u64;
        }
        let stopped = || std::io::Error::other("the store is closing");
        let dir = self.image_path.parent().unwrap_or(Path::new("."));
        let written = files::write_atomic_with(dir, FILE_NAME, |file| {
            let mut out = std::io::BufWriter::with_capacity(64 << 10, file);
            let mut tagged = key.tagger().streamed_part(len);
            out.write_all(&head.0)?;
            tagged.update(&head.0);
            for (n, e) in order.iter().enumerate() {
                if n % 256 == 255 && stop.load(Ordering::Relaxed) {
                    return Err(stopped());
                }
                encode(e, &mut entry);
                out.write_all(&entry.0)?;
                tagged.update(&entry.0);
            }
            let tagger = tagged.finish().ok_or_else(|| {
                std::io::Error::other("the store image's length was miscounted (a bug)")
            })?;
            out.write_all(&tagger.finish())?;
            out.into_inner().map_err(|e| e.into_error())?;
            Ok(())
        });
        match written {
            Ok(_) => {}
            Err(_) if stop.load(Ordering::Relaxed) => return Ok(Err(NotWritten::Stopped)),
            Err(failed) => return Err(failed.error),
        }
        Ok(Ok(count))
    }
}

/// Removes the image (when the manifest is rebuilt: what it says of the old one is void).
pub(super) fn remove(data_dir: &Path) -> Result<(), StoreError> {
    files::remove_durably(data_dir, FILE_NAME)
}

/// What happened to the store, for the image writer.
#[derive(Debug, Clone, Copy)]
pub(super) enum Change {
    /// An entry was written or deleted (a manifest line too).
    Entry,
    /// Only a manifest line (an audit anchor).
    Line,
    /// The journal was replaced by a snapshot: the image names a journal that is gone.
    Compacted,
}

#[derive(Default)]
struct Pending {
    entries: u64,
    lines: u64,
    /// Write without waiting for the store to be quiet.
    now: bool,
    last_change: Option<Instant>,
    stop: bool,
}

struct Control {
    pending: Mutex<Pending>,
    wake: Condvar,
    stop: AtomicBool,
}

/// The store's image writer: a thread that takes an image when the store has been quiet for
/// [`QUIET`] after entry changes, after [`MAX_LINES_SINCE`] manifest lines, or after the
/// journal was compacted. A read never involves it; a write only records that it happened (a
/// counter under an uncontended lock). Dropping it stops the thread (an image being taken is
/// abandoned) and waits for it.
pub(super) struct Keeper {
    control: Arc<Control>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Keeper {
    /// Starts the writer; `stale`: the image read at start-up (if any) is not the store's
    /// state, so one is taken once the store is quiet.
    pub fn start(source: Arc<Source>, stale: bool) -> Keeper {
        let control = Arc::new(Control {
            pending: Mutex::new(Pending {
                entries: stale as u64,
                last_change: Some(Instant::now()),
                ..Pending::default()
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let c = control.clone();
        let thread = std::thread::Builder::new()
            .name("store-image".to_owned())
            .spawn(move || run(&source, &c))
            .map_err(|e| tracing::warn!(error = %e, "the store image writer could not start; start-ups read every entry"))
            .ok();
        Keeper { control, thread }
    }

    pub fn note(&self, change: Change) {
        let mut p = self
            .control
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        p.lines += 1;
        match change {
            Change::Entry => p.entries += 1,
            Change::Line => {}
            Change::Compacted => p.now = true,
        }
        p.last_change = Some(Instant::now());
        self.control.wake.notify_one();
    }
}

impl Drop for Keeper {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::Relaxed);
        self.control
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .stop = true;
        self.control.wake.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(source: &Source, control: &Control) {
    loop {
        {
            let mut p = control.pending.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                if p.stop {
                    return;
                }
                let since = p.last_change.map_or(Duration::ZERO, |t| t.elapsed());
                if p.now || p.lines >= MAX_LINES_SINCE || (p.entries > 0 && since >= QUIET) {
                    break;
                }
                p = if p.entries > 0 {
                    control
                        .wake
                        .wait_timeout(p, QUIET - since)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                } else {
                    control.wake.wait(p).unwrap_or_else(|e| e.into_inner())
                };
            }
            *p = Pending {
                last_change: p.last_change,
                ..Pending::default()
            };
        }
        let retry = match source.write(&control.stop) {
            Ok(Ok(entries)) => {
                tracing::debug!(entries, "store image written");
                false
            }
            Ok(Err(NotWritten::Stopped)) => return,
            Ok(Err(NotWritten::TooManyKeys)) => false,
            Err(e) => {
                tracing::warn!(error = %e, "store image could not be written; the next start reads every entry it cannot vouch for");
                true
            }
        };
        if retry {
            let mut p = control.pending.lock().unwrap_or_else(|e| e.into_inner());
            p.entries += 1;
            p.last_change = Some(Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_file_names_decode_as_the_hex_module_reads_them() {
        let bytes: [u8; 32] = std::array::from_fn(|i| (i as u8).wrapping_mul(37));
        let hex = crate::hex::encode(&bytes);
        assert_eq!(decode_name(hex.as_bytes()), Some(bytes));
        assert_eq!(decode_name(hex.to_uppercase().as_bytes()), None);
        let bad = [
            hex[..62].to_owned(),
            "g".repeat(64),
            format!("{}x", &hex[..63]),
        ];
        for bad in &bad {
            assert_eq!(decode_name(bad.as_bytes()), None, "{bad}");
            assert_eq!(crate::hex::decode_32(bad), None);
        }
    }
}
