//! Anchoring the audit log in the store, so that a log deleted, truncated or rewritten while
//! the server was down is found at start-up rather than silently continued.
//!
//! The chain alone shows an edit in the middle (the hashes stop matching) but not a log cut
//! short at a record boundary, deleted, or rewritten from the first record on: those are valid
//! chains too. So the store's manifest, which is authenticated with a key derived from the
//! master keyring, records the chain's head ([`AuditAnchor`]: sequence number and hash) as the
//! server last saw it durable: at start-up, after every second with new records, and at a clean
//! stop. At start-up the whole log is walked: every link must hold, and the anchored record must
//! be there with the anchored hash. What was appended after the last anchor (at most the last
//! second before a crash) is accepted as it is; after a clean stop the anchor is the last record.
//!
//! A log that fails the check refuses the start, unless the operator chooses a new chain
//! (`--accept-audit-reset`): the old file is kept aside, and the new chain's first record names
//! the old head and what was found.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::chain::{Tail, VerifyFailure, walk};
use super::{AuditError, AuditEvent, AuditLog, Decision, Recovery};
use crate::store::{AuditAnchor, Store};

/// How often the head is anchored while records are being written: what a crash can leave
/// unanchored (and so open to an undetected truncation) is at most this much of the log.
pub const ANCHOR_EVERY: Duration = Duration::from_secs(1);

/// What the walk at start-up found wrong, against the anchor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// No log, or an empty one, where records were anchored.
    Missing,
    /// A link of the chain does not hold: a record was edited, removed or reordered.
    Broken(VerifyFailure),
    /// The chain holds but ends before the anchored record.
    Truncated { records: u64 },
    /// The anchored record is there with another hash: the log was rewritten.
    Rewritten { found: String },
}

impl Finding {
    fn describe(&self, path: &Path, anchor: Option<&AuditAnchor>) -> String {
        let anchored = anchor.map_or_else(String::new, |a| {
            format!(
                "this data dir's store anchored it at record {} (hash {})",
                a.seq,
                short(&a.hash)
            )
        });
        match self {
            Finding::Missing => format!(
                "audit log {} is missing or empty, but {anchored}: it was deleted or replaced",
                path.display()
            ),
            Finding::Broken(failure) => format!(
                "audit log {}, {failure}; `claw-secrets audit verify {}` shows it",
                path.display(),
                path.display()
            ),
            Finding::Truncated { records } => format!(
                "audit log {} ends at record {records}, but {anchored}: records were removed from its end",
                path.display()
            ),
            Finding::Rewritten { found } => format!(
                "audit log {}: its record {} has hash {}, but {anchored}: the log was rewritten",
                path.display(),
                anchor.map_or(0, |a| a.seq),
                short(found)
            ),
        }
    }
}

fn short(hash: &str) -> &str {
    hash.get(..16).unwrap_or(hash)
}

/// Walks the log at `path` and checks it against `anchor`. `Ok(records)` if it holds.
pub fn check(path: &Path, anchor: Option<&AuditAnchor>) -> Result<u64, Finding> {
    let anchored = anchor.filter(|a| a.seq > 0);
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return match anchored {
                Some(_) => Err(Finding::Missing),
                None => Ok(0),
            };
        }
        Err(e) => {
            return Err(Finding::Broken(VerifyFailure {
                line: 0,
                reason: format!("cannot be read: {e}"),
            }));
        }
    };
    let mut at_anchor = None;
    let report = walk(file, Tail::Ignore, |seq, hash| {
        if anchored.is_some_and(|a| a.seq == seq) {
            at_anchor = Some(hash.to_owned());
        }
    })
    .map_err(Finding::Broken)?;
    let Some(anchor) = anchored else {
        return Ok(report.records);
    };
    match at_anchor {
        _ if report.records == 0 => Err(Finding::Missing),
        None => Err(Finding::Truncated {
            records: report.records,
        }),
        Some(found) if found != anchor.hash => Err(Finding::Rewritten { found }),
        Some(_) => Ok(report.records),
    }
}

/// Opens the audit log at `path` after checking it against the anchor in `store`, and anchors
/// its head. A log that fails the check refuses the start ([`AuditError::Integrity`], saying
/// what was found and what to do) unless `accept_reset`: then the file is kept aside and a new
/// chain begins with an `audit.reset` record naming the old head and the finding.
pub fn open_anchored(
    path: &Path,
    node: &str,
    store: &Store,
    accept_reset: bool,
) -> Result<(AuditLog, Recovery), AuditError> {
    let anchor = store.audit_anchor();
    let opened = match check(path, anchor.as_ref()) {
        Ok(_) => AuditLog::open(path, node)?,
        Err(finding) => {
            let found = finding.describe(path, anchor.as_ref());
            if !accept_reset {
                return Err(AuditError::Integrity(format!(
                    "{found}. Restore the log from a backup; or, to keep this store and begin a new audit chain, start with --accept-audit-reset (the old file is kept aside, and the new chain's first record names the old head)"
                )));
            }
            let kept = set_aside(path)?;
            tracing::warn!(%found, kept = ?kept, "--accept-audit-reset: beginning a new audit chain");
            let old_head = anchor.as_ref().map_or_else(
                || "none".to_owned(),
                |a| format!("record {} hash {}", a.seq, a.hash),
            );
            let kept = kept.map_or_else(
                || "no file was left to keep".to_owned(),
                |p| format!("the old file is kept as {}", file_name(&p)),
            );
            let reset = AuditEvent {
                node: node.to_owned(),
                subject: "system:claw-secrets".to_owned(),
                workload: None,
                command: "audit.reset".to_owned(),
                namespace: None,
                name: None,
                version: None,
                decision: Decision::Repair,
                phase: None,
                reason: format!(
                    "a new chain begun with --accept-audit-reset; the anchored head of the old chain was {old_head}; {kept}; found: {}",
                    finding.summary()
                ),
                request_id: None,
                idempotency_key: None,
                gateway_node: None,
            };
            AuditLog::open_with_first(path, node, Some(reset))?
        }
    };
    if let Recovery::Repaired {
        discarded_bytes,
        at_offset,
    } = opened.1
    {
        tracing::warn!(
            discarded_bytes,
            at_offset,
            "audit log ended in a record cut short by a crash; repaired and recorded"
        );
    }
    anchor_head(&opened.0, store)?;
    Ok(opened)
}

impl Finding {
    /// One line for the reset record: no paths (the record may be shipped elsewhere).
    fn summary(&self) -> String {
        match self {
            Finding::Missing => "the log was missing or empty".to_owned(),
            Finding::Broken(f) => format!("line {}: {}", f.line, f.reason),
            Finding::Truncated { records } => format!("the log ended at record {records}"),
            Finding::Rewritten { found } => format!("the anchored record had hash {found}"),
        }
    }
}

fn file_name(path: &Path) -> String {
    path.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
}

/// Renames the log to `<name>.reset-<unix seconds>` beside it; `None` if there was none.
fn set_aside(path: &Path) -> Result<Option<PathBuf>, AuditError> {
    if !path.exists() {
        return Ok(None);
    }
    let aside = path.with_file_name(format!(
        "{}.reset-{}",
        file_name(path),
        jiff::Timestamp::now().as_second()
    ));
    std::fs::rename(path, &aside).map_err(|e| AuditError::Open {
        path: path.display().to_string(),
        reason: format!("could not keep the old log aside: {e}"),
    })?;
    Ok(Some(aside))
}

/// Records the log's current head in the store (nothing when it is the head already there).
pub fn anchor_head(log: &AuditLog, store: &Store) -> Result<(), AuditError> {
    store
        .record_audit_anchor(log.head())
        .map_err(|e| AuditError::Anchor(e.to_string()))
}

/// Anchors the head every [`ANCHOR_EVERY`] while records are being written; runs until the
/// process ends. A failure is logged and retried: the store's own writes fail on the same disk.
pub async fn keep_anchored(log: AuditLog, store: Arc<Store>) {
    let mut tick = tokio::time::interval(ANCHOR_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (log, store) = (log.clone(), store.clone());
        match tokio::task::spawn_blocking(move || anchor_head(&log, &store)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "the audit log's head could not be anchored; retrying")
            }
            Err(e) => tracing::error!(error = %e, "anchoring the audit log panicked"),
        }
    }
}
