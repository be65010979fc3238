//! Canaries: unique values a test plants as secret data, then looks for everywhere a leak
//! could land (logs at trace level, answers, files, objects, etcd's data directory), in every
//! encoding under which a leaked value would still be recognisable.
//!
//! ```ignore
//! #[path = "support/random.rs"]
//! mod random;
//! #[path = "support/files.rs"]
//! mod files;
//! #[path = "support/canary.rs"]
//! mod canary;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE_NO_PAD};
use std::path::{Path, PathBuf};

use crate::files::files_under;

/// Values a test must never find outside the places they belong.
pub struct Canaries(Vec<(String, Vec<Vec<u8>>)>);

impl Canaries {
    pub fn of<S: Into<String>>(values: impl IntoIterator<Item = S>) -> Canaries {
        Canaries(
            values
                .into_iter()
                .map(|v| {
                    let v = v.into();
                    let forms = forms(&v);
                    (v, forms)
                })
                .collect(),
        )
    }

    /// How many forms of each canary are looked for.
    pub fn forms(&self) -> usize {
        self.0.first().map_or(0, |(_, f)| f.len())
    }

    /// Fails the test if `haystack` holds any canary in any form; `what` names where.
    #[track_caller]
    pub fn assert_absent(&self, what: &str, haystack: &[u8]) {
        for (canary, forms) in &self.0 {
            for form in forms {
                assert!(
                    !contains_bytes(haystack, form),
                    "{what} contains the canary {canary} (as {:?})",
                    String::from_utf8_lossy(form)
                );
            }
        }
    }

    /// Fails the test if any file under `dir` holds a canary; returns the files read.
    #[track_caller]
    pub fn assert_absent_under(&self, dir: &Path) -> Vec<PathBuf> {
        let files = files_under(dir);
        for f in &files {
            // A file may vanish while it is scanned (a log rotated, a temp file renamed).
            if let Ok(bytes) = std::fs::read(f) {
                self.assert_absent(&f.display().to_string(), &bytes);
            }
        }
        files
    }
}

/// A fresh canary: `prefix-` and 32 random hex digits.
pub fn canary(prefix: &str) -> String {
    format!("{prefix}-{}", crate::random::random_hex(16))
}

/// Encodings under which a leaked canary would still be recognisable: itself, hex, and base64
/// at each of the three alignments it could sit at inside a longer encoded string.
fn forms(canary: &str) -> Vec<Vec<u8>> {
    let mut forms = vec![canary.as_bytes().to_vec()];
    forms.push(
        canary
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .into_bytes(),
    );
    let b = canary.as_bytes();
    for offset in 0..3 {
        let len = (b.len() - offset) / 3 * 3;
        let chunk = &b[offset..offset + len];
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            forms.push(engine.encode(chunk).into_bytes());
        }
    }
    forms.push(STANDARD.encode(b).into_bytes());
    forms
}

/// Whether `needle` occurs in `haystack`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && memchr::memmem::find(haystack, needle).is_some()
}
