//! Hashing and verifying the chain. Shared by the writer and `claw-secrets audit verify`.

use sha2::{Digest, Sha256};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use crate::hex::encode as hex;

pub(crate) const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";
const HASH_FIELD: &str = "hash";
/// The longest line a record can be (with its newline): names are at most 253 bytes, reasons are
/// built from codes and names. Longer lines are refused unread.
pub(crate) const MAX_RECORD_BYTES: usize = 64 * 1024;

/// Appends the `hash` field to a serialized record `body` (a JSON object without it) and
/// returns the finished line (without newline) and its hash.
pub(crate) fn seal_line(body: &[u8]) -> (Vec<u8>, String) {
    let hash: [u8; 32] = Sha256::digest(body).into();
    (crate::trailer::append(body, HASH_FIELD, &hash), hex(&hash))
}

/// What a line claims about itself, once its own hash has been checked.
#[derive(Debug)]
pub(crate) struct CheckedLine {
    pub seq: u64,
    pub prev: String,
    pub hash: String,
}

/// Checks a line's own hash and extracts its chain fields.
pub(crate) fn check_line(line: &[u8]) -> Result<CheckedLine, String> {
    let value: serde_json::Value = serde_json::from_slice(line)
        // serde's message could quote the line; its position says enough.
        .map_err(|e| format!("not a JSON record (error at column {})", e.column()))?;
    let field = |k: &str| value.get(k).ok_or_else(|| format!("missing field {k:?}"));
    let seq = field("seq")?.as_u64().ok_or("seq is not a number")?;
    let prev = field("prev")?
        .as_str()
        .ok_or("prev is not a string")?
        .to_owned();
    field(HASH_FIELD)?.as_str().ok_or("hash is not a string")?;
    let (body, claimed) = crate::trailer::split(line, HASH_FIELD)
        .ok_or("the hash field is not the record's last field, or not 64 hex digits")?;
    let actual: [u8; 32] = Sha256::digest(&body).into();
    if actual != claimed {
        return Err("its content does not match its hash (the record was edited)".to_owned());
    }
    Ok(CheckedLine {
        seq,
        prev,
        hash: hex(&claimed),
    })
}

/// A log whose chain holds from the first record to the last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyReport {
    pub records: u64,
    /// The last record's hash: anchor it elsewhere to detect a truncated tail later.
    pub head: String,
}

/// The first record at which the chain breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct VerifyFailure {
    /// 1-based line number.
    pub line: u64,
    pub reason: String,
}

/// Walks the whole log and checks every link.
pub fn verify(path: &Path) -> Result<VerifyReport, VerifyFailure> {
    let file = std::fs::File::open(path).map_err(|e| VerifyFailure {
        line: 0,
        reason: format!("cannot open {}: {e}", path.display()),
    })?;
    walk(file, Tail::Refuse, |_, _| {})
}

/// What a walk makes of a last line without a newline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Tail {
    /// A failure (`audit verify`: the log as it is).
    Refuse,
    /// Not part of the log (start-up: a record a crash cut short, which opening repairs).
    Ignore,
}

/// Checks every link of the log read from `file`, calling `each(seq, hash)` for every record
/// that holds. Reads one line at a time: memory does not grow with the log.
pub(crate) fn walk(
    file: impl Read,
    tail: Tail,
    mut each: impl FnMut(u64, &str),
) -> Result<VerifyReport, VerifyFailure> {
    let mut reader = BufReader::new(file);
    let mut prev_hash = GENESIS.to_owned();
    let mut prev_seq = 0u64;
    let mut line_no = 0u64;
    let mut buf = Vec::new();
    loop {
        buf.clear();
        // A line is read up to one byte past the longest record, so a file without newlines
        // costs no more memory than one record.
        let n = (&mut reader)
            .take(MAX_RECORD_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .map_err(|e| VerifyFailure {
                line: line_no + 1,
                reason: format!("read error: {e}"),
            })?;
        if n == 0 {
            break;
        }
        line_no += 1;
        let fail = |reason: String| VerifyFailure {
            line: line_no,
            reason,
        };
        if buf.len() > MAX_RECORD_BYTES {
            return Err(fail(format!(
                "the line is longer than {} KiB: not an audit record",
                MAX_RECORD_BYTES / 1024
            )));
        }
        if buf.last() != Some(&b'\n') {
            if tail == Tail::Ignore {
                break;
            }
            return Err(fail(
                "the record is cut short (no newline): a crash during a write; starting the server repairs it"
                    .to_owned(),
            ));
        }
        buf.pop();
        let checked = check_line(&buf).map_err(fail)?;
        if checked.prev != prev_hash {
            return Err(fail(format!(
                "its prev hash does not match line {}'s hash: a record before it was edited, removed or reordered",
                line_no - 1
            )));
        }
        if checked.seq != prev_seq + 1 {
            return Err(fail(format!(
                "sequence number {} follows {}: records were removed or reordered",
                checked.seq, prev_seq
            )));
        }
        each(checked.seq, &checked.hash);
        prev_hash = checked.hash;
        prev_seq = checked.seq;
    }
    Ok(VerifyReport {
        records: prev_seq,
        head: prev_hash,
    })
}
