//! Crash-safe file primitives: a write is a temp file, fsync, rename, fsync of the directory,
//! so after a crash a file holds either its old or its new content, never a mix.

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::image::FileId;
use super::{OpenReport, StoreError};
use crate::faults::{Step, check};

const TEMP_PREFIX: &str = ".tmp-";
/// No entry file is larger: 1 MiB of data is at most 1.4 MiB of base64, plus metadata and the
/// remembered writes. A larger file is refused unread (not read into memory whole).
const MAX_ENTRY_BYTES: u64 = 8 << 20;
/// The buffer an entry file is first read into: most entries (a few hundred bytes of metadata
/// and a sealed value of up to a few KiB) fit, and a larger one grows it.
const READ_AHEAD: usize = 8 << 10;

/// Creates `dir` (and parents) with mode 0700, or tightens an existing one to 0700.
pub fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| StoreError::io(dir, e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700)).map_err(|e| StoreError::io(dir, e))
}

pub fn fsync_dir(dir: &Path) -> Result<(), StoreError> {
    check(Step::DirFsync)
        .and_then(|()| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(|e| StoreError::io(dir, e))
}

/// Atomically replaces `dir/name` with `bytes` (mode 0600), durably.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
    write_atomic_tracked(dir, name, bytes)
        .map(|_| ())
        .map_err(|failed| failed.error)
}

/// A write of [`write_atomic_tracked`] that failed, and whether the new content had already
/// replaced the old (the rename happened; only the directory's fsync failed): then the caller
/// must put the old content back, or the write may surface after a restart.
pub(super) struct FailedWrite {
    pub error: StoreError,
    pub replaced: bool,
}

/// [`write_atomic`], telling how far a failed write got; on success, the identity of the file
/// written, taken through its descriptor right after the rename (which changes its ctime).
pub(super) fn write_atomic_tracked(
    dir: &Path,
    name: &str,
    bytes: &[u8],
) -> Result<Option<FileId>, FailedWrite> {
    write_atomic_with(dir, name, |f| f.write_all(bytes))
}

/// [`write_atomic_tracked`] of content that `write` produces into the temp file as it goes
/// (the store image, megabytes at 10,000 entries, is never whole in memory). An error from
/// `write` abandons the write: the temp file is removed and the target is untouched.
pub(super) fn write_atomic_with(
    dir: &Path,
    name: &str,
    write: impl FnOnce(&mut File) -> std::io::Result<()>,
) -> Result<Option<FileId>, FailedWrite> {
    let mut suffix = [0u8; 8];
    let target = dir.join(name);
    let before_rename = |error: StoreError| FailedWrite {
        error,
        replaced: false,
    };
    getrandom::getrandom(&mut suffix)
        .map_err(|e| before_rename(StoreError::io(dir, std::io::Error::other(e.to_string()))))?;
    let suffix = crate::hex::encode(&suffix);
    let tmp = dir.join(format!("{TEMP_PREFIX}{suffix}"));
    let result = (|| {
        check(Step::Open)?;
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        check(Step::Write)?;
        write(&mut f)?;
        check(Step::Fsync)?;
        f.sync_all()?;
        check(Step::Rename)?;
        fs::rename(&tmp, &target)?;
        Ok(FileId::of(&f))
    })();
    let file = match result {
        Ok(file) => file,
        Err(e) => {
            let _ = fs::remove_file(&tmp);
            return Err(before_rename(StoreError::io(&target, e)));
        }
    };
    fsync_dir(dir).map_err(|error| FailedWrite {
        error,
        replaced: true,
    })?;
    Ok(file)
}

/// Refuses a file that holds keys or tokens if its group or other users may read or write it,
/// as ssh refuses such a private key. A file that does not exist passes (it is created 0600).
pub fn ensure_private_file(path: &Path) -> Result<(), StoreError> {
    match fs::metadata(path) {
        Ok(meta) => {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(StoreError::OpenToOthers {
                    path: path.to_owned(),
                    mode,
                });
            }
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(path, e)),
    }
}

/// Writes a private file (a key or a token) atomically; `path`'s parent must exist.
pub fn write_private_file_atomic(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| StoreError::io(path, std::io::Error::other("not a file path")))?;
    write_atomic(dir, name, bytes)
}

/// Removes `dir/name` if present and makes the removal durable.
pub(super) fn remove_durably(dir: &Path, name: &str) -> Result<(), StoreError> {
    let path = dir.join(name);
    match fs::remove_file(&path) {
        Ok(()) => fsync_dir(dir),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(StoreError::io(&path, e)),
    }
}

/// An entry file read at start-up: its name in its directory, and what parsing it gave (or
/// why it failed).
pub(super) type Parsed<T> = (OsString, Result<T, String>);

/// What a store image knows of an entry file, given its name and identity: what reading and
/// parsing it would give, or `None` (then it is read).
pub(super) type KnownFile<'a, T> = &'a (dyn Fn(&str, &FileId) -> Option<T> + Sync);

/// The names of the entry files of `dir`, sorted, for [`read_entries`]. Interrupted temp files
/// are removed (their writes were never acknowledged). Names, not paths: at 10,000 entries a
/// path per entry (built, cloned, taken apart again for its file name) was a tenth of the
/// start-up's CPU; a path is built only for a file that is read or refused.
pub(super) fn list_entries(
    dir: &Path,
    report: &mut OpenReport,
) -> Result<Vec<OsString>, StoreError> {
    let entries = fs::read_dir(dir).map_err(|e| StoreError::io(dir, e))?;
    let mut names: Vec<OsString> = Vec::new();
    for entry in entries {
        let name = entry.map_err(|e| StoreError::io(dir, e))?.file_name();
        if name.as_bytes().starts_with(TEMP_PREFIX.as_bytes()) {
            let path = dir.join(&name);
            fs::remove_file(&path).map_err(|e| StoreError::io(&path, e))?;
            report.removed_temp_files += 1;
        } else {
            names.push(name);
        }
    }
    if report.removed_temp_files > 0 {
        fsync_dir(dir)?;
    }
    names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Ok(names)
}

/// Reads and parses the entry files `names` of `dir` (from [`list_entries`]); `parse` is given
/// the file's name, bytes and identity. What could not be parsed comes back as `Err(reason)`.
/// With `known` (a store image), each file's identity is looked up first, and a file it knows
/// is not read.
pub(super) fn read_entries<T: Send>(
    dir: &Path,
    names: Vec<OsString>,
    known: Option<KnownFile<'_, T>>,
    parse: impl Fn(&str, &[u8], Option<FileId>) -> Result<T, String> + Sync,
) -> Result<Vec<Parsed<T>>, StoreError> {
    // Reading and parsing (and checking each entry's MAC) is what a start-up with thousands of
    // entries spends its time on (the agent serves nothing until it is done), so it runs on
    // every core.
    // With a store image, each file's identity is looked up relative to the directory.
    let dir_file = match known {
        Some(_) => Some(File::open(dir).map_err(|e| StoreError::io(dir, e))?),
        None => None,
    };
    let dir_file = dir_file.as_ref();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk = names.len().div_ceil(threads).max(256);
    // Each thread owns its part of the names (they go into what it returns, not copied).
    let mut parts = Vec::with_capacity(threads);
    let mut rest = names;
    while rest.len() > chunk {
        let tail = rest.split_off(chunk);
        parts.push(std::mem::replace(&mut rest, tail));
    }
    if !rest.is_empty() {
        parts.push(rest);
    }
    let parse = &parse;
    let read_one = move |name: OsString| -> Result<Parsed<T>, StoreError> {
        // A name that is not UTF-8 is no entry's: it is read, and refused by `parse`.
        let utf8 = name.to_str().unwrap_or("");
        if let (Some(known), Some(dir)) = (known, dir_file)
            && let Some(id) = FileId::at(dir, utf8)
            && let Some(t) = known(utf8, &id)
        {
            return Ok((name, Ok(t)));
        }
        let path = dir.join(&name);
        let file = File::open(&path).map_err(|e| StoreError::io(&path, e))?;
        // Its identity before its content: a change after this is seen at the next start
        // (another identity), never recorded as this.
        let id = FileId::of(&file);
        // Read one byte past the limit, to tell a file over it. Room for a typical entry up
        // front: one read fills it and one more finds the end (an empty buffer costs a
        // probing read and a regrowth).
        let mut bytes = Vec::with_capacity(READ_AHEAD);
        std::io::Read::read_to_end(
            &mut std::io::Read::take(file, MAX_ENTRY_BYTES + 1),
            &mut bytes,
        )
        .map_err(|e| StoreError::io(&path, e))?;
        if bytes.len() as u64 > MAX_ENTRY_BYTES {
            let why = format!(
                "the file is larger than {} MiB, which no entry is",
                MAX_ENTRY_BYTES >> 20
            );
            return Ok((name, Err(why)));
        }
        let parsed = parse(utf8, &bytes, id);
        Ok((name, parsed))
    };
    let read_one = &read_one;
    let parsed: Vec<Vec<Parsed<T>>> = std::thread::scope(|scope| {
        let workers: Vec<_> = parts
            .into_iter()
            .map(|part| {
                scope.spawn(move || {
                    part.into_iter()
                        .map(read_one)
                        .collect::<Result<Vec<_>, StoreError>>()
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("a store loading thread panicked"))
            .collect::<Result<_, _>>()
    })?;
    Ok(parsed.into_iter().flatten().collect())
}

/// Moves an entry file that cannot be served into `quarantine`, never deleting it: it may be
/// the only copy of something an operator wants back.
pub(super) fn quarantine(
    path: &Path,
    quarantine: &Path,
    reason: &str,
) -> Result<PathBuf, StoreError> {
    let file_name = path.file_name().and_then(|n| n.to_str()).unwrap_or("entry");
    create_private_dir(quarantine)?;
    let mut to = quarantine.join(file_name);
    if to.exists() {
        // An earlier quarantine of the same entry: keep both.
        let mut suffix = [0u8; 4];
        let _ = getrandom::getrandom(&mut suffix);
        to = quarantine.join(format!("{file_name}.{}", crate::hex::encode(&suffix)));
    }
    tracing::error!(file = %path.display(), reason, moved_to = %to.display(),
        "store entry refused; moved to quarantine");
    fs::rename(path, &to).map_err(|e| StoreError::io(path, e))?;
    Ok(to)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Content produced as it is written (the store image's way) that fails partway leaves
    /// the old content in place and no temp file behind.
    #[test]
    fn a_write_that_fails_partway_leaves_the_old_content_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        write_atomic(dir.path(), "image", b"old").unwrap();
        let failed = write_atomic_with(dir.path(), "image", |f| {
            f.write_all(b"half of the new")?;
            Err(std::io::Error::other("stopped"))
        });
        assert!(failed.is_err_and(|failed| !failed.replaced));
        assert_eq!(fs::read(dir.path().join("image")).unwrap(), b"old");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["image"]);

        write_atomic_with(dir.path(), "image", |f| {
            f.write_all(b"new, ")?;
            f.write_all(b"in two pieces")
        })
        .map_err(|failed| failed.error)
        .unwrap();
        assert_eq!(
            fs::read(dir.path().join("image")).unwrap(),
            b"new, in two pieces"
        );
    }
}
