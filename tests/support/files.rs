//! What the servers leave on disk: the files, and their modes.
//!
//! ```ignore
//! #[path = "support/files.rs"]
//! mod files;
//! ```
#![allow(dead_code)] // each test target uses a different subset

use std::path::{Path, PathBuf};

/// Every file and directory under `dir` whose mode is not 0600 (files) or 0700 (directories).
pub fn not_private(dir: &std::path::Path) -> Vec<String> {
    use std::os::unix::fs::PermissionsExt;
    let mut wrong = Vec::new();
    let mut dirs = vec![dir.to_owned()];
    while let Some(d) = dirs.pop() {
        let mode = std::fs::metadata(&d).unwrap().permissions().mode() & 0o777;
        if mode != 0o700 {
            wrong.push(format!("{}/ {mode:o}", d.display()));
        }
        for entry in std::fs::read_dir(&d).unwrap().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                dirs.push(path);
                continue;
            }
            let mode = entry.metadata().unwrap().permissions().mode() & 0o777;
            if mode != 0o600 {
                wrong.push(format!("{} {mode:o}", path.display()));
            }
        }
    }
    wrong
}

/// Every regular file under `dir`, recursively, sorted.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let Ok(ft) = e.file_type() else {
                continue;
            };
            if ft.is_dir() {
                stack.push(p);
            } else if ft.is_file() {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// Fails the test unless `files` (of a data dir) hold an audit log and at least one stored
/// secret: a scan of them for leaks had something to find.
#[track_caller]
pub fn assert_holds_audit_and_secrets(files: &[PathBuf]) {
    assert!(
        files.iter().any(|f| f.ends_with("audit.log"))
            && files
                .iter()
                .any(|f| f.parent().is_some_and(|p| p.ends_with("secrets"))),
        "no audit log or stored secret among {files:?}"
    );
}
