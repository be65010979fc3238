//! The writer thread: owns the file, chains records, and group-commits them.

use jiff::Timestamp;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use tokio::sync::oneshot;

use super::chain::{GENESIS, MAX_RECORD_BYTES, check_line, seal_line};
use super::{AuditError, AuditEvent, Decision};
use crate::faults::{Step, check};
use crate::store::AuditAnchor;

/// Most records made durable by one sync; bounds the latency a burst adds to its last member.
const MAX_BATCH: usize = 1024;
/// The tail read at start-up looks this far back for the last complete record: one record's
/// longest.
const TAIL_WINDOW: u64 = MAX_RECORD_BYTES as u64;

#[derive(Serialize)]
struct Line<'a> {
    seq: u64,
    time: Timestamp,
    #[serde(flatten)]
    event: &'a AuditEvent,
    prev: &'a str,
}

struct Pending {
    /// The record; `None` for a flush marker (see [`AuditLog::flush`]).
    event: Option<AuditEvent>,
    /// Who waits for the record (and every record before it) to be durable; `None` for a
    /// record nobody waits for.
    done: Option<oneshot::Sender<Result<u64, AuditError>>>,
}

/// What start-up found at the end of the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recovery {
    /// The log was empty or ended on a complete record.
    Clean { records: u64 },
    /// A record cut short by a crash was removed, and a `repair` record says so.
    Repaired {
        discarded_bytes: u64,
        at_offset: u64,
    },
}

/// Handle to the audit log. Cloning shares the one writer.
#[derive(Clone)]
pub struct AuditLog {
    tx: mpsc::Sender<Pending>,
    path: PathBuf,
    /// The last durable record: what the store anchors ([`super::anchor`]).
    head: Arc<Mutex<AuditAnchor>>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

struct ChainState {
    file: File,
    len: u64,
    seq: u64,
    prev: String,
    path: PathBuf,
}

impl ChainState {
    fn open(path: &Path, node: &str) -> Result<(Self, Recovery), AuditError> {
        let open_err = |reason: String| AuditError::Open {
            path: path.display().to_string(),
            reason,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(path)
            .map_err(|e| open_err(e.to_string()))?;
        let len = file.metadata().map_err(|e| open_err(e.to_string()))?.len();
        let start = len.saturating_sub(TAIL_WINDOW);
        let mut tail = Vec::new();
        file.seek(SeekFrom::Start(start))
            .and_then(|_| file.read_to_end(&mut tail))
            .map_err(|e| open_err(e.to_string()))?;

        // Everything after the last newline is a record the crash cut short.
        let complete_end = match tail.iter().rposition(|b| *b == b'\n') {
            Some(i) => start + i as u64 + 1,
            None if start == 0 => 0,
            None => return Err(open_err("no complete record in the last 64 KiB".to_owned())),
        };
        let cut_short = len - complete_end;

        let (seq, prev) = if complete_end == 0 {
            (0, GENESIS.to_owned())
        } else {
            let body_end = (complete_end - 1 - start) as usize;
            let line_start = tail[..body_end]
                .iter()
                .rposition(|b| *b == b'\n')
                .map_or(0, |i| i + 1);
            let checked = check_line(&tail[line_start..body_end]).map_err(|why| {
                open_err(format!(
                    "its last complete record is corrupt ({why}); run `claw-secrets audit verify` and move the file aside to start a new log"
                ))
            })?;
            (checked.seq, checked.hash)
        };

        let mut state = ChainState {
            file,
            len: complete_end,
            seq,
            prev,
            path: path.to_owned(),
        };
        if cut_short == 0 {
            return Ok((state, Recovery::Clean { records: seq }));
        }
        state
            .file
            .set_len(complete_end)
            .map_err(|e| open_err(format!("could not cut off the partial record: {e}")))?;
        let repair = AuditEvent {
            node: node.to_owned(),
            subject: "system:claw-secrets".to_owned(),
            workload: None,
            command: "audit.repair".to_owned(),
            namespace: None,
            name: None,
            version: None,
            decision: Decision::Repair,
            phase: None,
            reason: format!(
                "discarded {cut_short} bytes of a record cut short by a crash at offset {complete_end}; it was never acknowledged"
            ),
            request_id: None,
            idempotency_key: None,
            gateway_node: None,
        };
        state
            .write_batch(std::slice::from_ref(&repair))
            .map_err(|e| open_err(e.to_string()))?;
        Ok((
            state,
            Recovery::Repaired {
                discarded_bytes: cut_short,
                at_offset: complete_end,
            },
        ))
    }

    /// Writes `bytes` at the end of the log and makes them durable with one system call per
    /// group commit where the kernel can (`pwritev2` with `RWF_DSYNC`: the write, then an
    /// `fdatasync` of what it wrote), else a write and an `fdatasync`.
    fn append_durably(&self, bytes: &[u8]) -> std::io::Result<()> {
        use rustix::io::{Errno, ReadWriteFlags, pwritev2};
        use std::os::unix::fs::FileExt;
        let mut done = 0;
        while done < bytes.len() {
            let at = self.len + done as u64;
            let slice = [std::io::IoSlice::new(&bytes[done..])];
            match pwritev2(&self.file, &slice, at, ReadWriteFlags::DSYNC) {
                Ok(0) => return Err(std::io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(Errno::INTR) => {}
                Err(Errno::NOSYS | Errno::OPNOTSUPP | Errno::INVAL) => {
                    self.file.write_all_at(&bytes[done..], at)?;
                    return self.file.sync_data();
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Appends and syncs `events`; on any failure the file is cut back so the chain stays whole.
    fn write_batch(&mut self, events: &[AuditEvent]) -> Result<u64, AuditError> {
        let mut bytes = Vec::with_capacity(events.len() * 384);
        let mut seq = self.seq;
        let mut prev = self.prev.clone();
        for event in events {
            seq += 1;
            let body = serde_json::to_vec(&Line {
                seq,
                time: Timestamp::now(),
                event,
                prev: &prev,
            })
            .expect("audit record serializes");
            let (line, hash) = seal_line(&body);
            bytes.extend_from_slice(&line);
            bytes.push(b'\n');
            prev = hash;
        }
        let result = check(Step::Write)
            .and_then(|()| check(Step::Fsync))
            .and_then(|()| self.append_durably(&bytes));
        if let Err(e) = result {
            // Leave no partial batch behind: the next batch must chain onto a complete record.
            let _ = self.file.set_len(self.len);
            return Err(AuditError::Write {
                path: self.path.display().to_string(),
                reason: e.to_string(),
            });
        }
        self.len += bytes.len() as u64;
        self.seq = seq;
        self.prev = prev;
        Ok(seq)
    }
}

impl AuditLog {
    /// Opens (creating if needed, mode 0600) the log at `path`, repairs a record a crash cut
    /// short, and starts the writer thread.
    pub fn open(path: &Path, node: &str) -> Result<(AuditLog, Recovery), AuditError> {
        Self::open_with_first(path, node, None)
    }

    /// [`AuditLog::open`], appending `first` (durably) before anything else.
    pub(super) fn open_with_first(
        path: &Path,
        node: &str,
        first: Option<AuditEvent>,
    ) -> Result<(AuditLog, Recovery), AuditError> {
        let (mut state, recovery) = ChainState::open(path, node)?;
        if let Some(event) = first {
            state
                .write_batch(std::slice::from_ref(&event))
                .map_err(|e| AuditError::Open {
                    path: path.display().to_string(),
                    reason: e.to_string(),
                })?;
        }
        let head = Arc::new(Mutex::new(AuditAnchor {
            seq: state.seq,
            hash: state.prev.clone(),
        }));
        let written_head = head.clone();
        let (tx, rx) = mpsc::channel::<Pending>();
        std::thread::Builder::new()
            .name("audit-writer".to_owned())
            .spawn(move || {
                // Ends when every AuditLog handle is dropped.
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < MAX_BATCH {
                        match rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    // Each waiter learns the sequence number of the last record up to its own.
                    let mut events = Vec::with_capacity(batch.len());
                    let mut waiters = Vec::with_capacity(batch.len());
                    for p in batch {
                        if let Some(event) = p.event {
                            events.push(event);
                        }
                        waiters.push((events.len() as u64, p.done));
                    }
                    let written = if events.is_empty() {
                        Ok(state.seq)
                    } else {
                        state.write_batch(&events)
                    };
                    match written {
                        Ok(last_seq) => {
                            *written_head.lock().unwrap_or_else(|e| e.into_inner()) = AuditAnchor {
                                seq: state.seq,
                                hash: state.prev.clone(),
                            };
                            let before = last_seq - events.len() as u64;
                            for (upto, w) in waiters {
                                if let Some(w) = w {
                                    let _ = w.send(Ok(before + upto));
                                }
                            }
                        }
                        Err(e) => {
                            tracing::error!(error = %e, "audit write failed; refusing the accesses it would have recorded");
                            for w in waiters.into_iter().filter_map(|(_, w)| w) {
                                let _ = w.send(Err(e.clone()));
                            }
                        }
                    }
                }
            })
            .map_err(|e| AuditError::Open {
                path: path.display().to_string(),
                reason: format!("could not start the writer thread: {e}"),
            })?;
        Ok((
            AuditLog {
                tx,
                path: path.to_owned(),
                head,
            },
            recovery,
        ))
    }

    /// The last record made durable: its sequence number and hash (64 zeros and 0 for an empty
    /// log).
    pub fn head(&self) -> AuditAnchor {
        self.head.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A log whose every append fails, as a log on a full or read-only disk does: for tests of
    /// what the callers do then.
    #[cfg(test)]
    pub(crate) fn failing() -> AuditLog {
        let (tx, rx) = mpsc::channel::<Pending>();
        std::thread::spawn(move || {
            while let Ok(p) = rx.recv() {
                let Some(done) = p.done else { continue };
                let _ = done.send(Err(AuditError::Write {
                    path: "/failing/audit.log".to_owned(),
                    reason: "No space left on device (os error 28)".to_owned(),
                }));
            }
        });
        AuditLog {
            tx,
            path: PathBuf::from("/failing/audit.log"),
            head: Arc::new(Mutex::new(AuditAnchor {
                seq: 0,
                hash: GENESIS.to_owned(),
            })),
        }
    }

    /// Queues `event` behind every record queued before it, without waiting for it to be
    /// durable: for a record no answer depends on (a write's outcome, after its durable intent).
    /// It shares the next group commit; a failure to write it is logged by the writer.
    pub fn append_later(&self, event: AuditEvent) {
        let pending = Pending {
            event: Some(event),
            done: None,
        };
        if self.tx.send(pending).is_err() {
            tracing::error!("audit log writer has stopped; a record was not written");
        }
    }

    /// Waits until every record queued before this call is durable (records queued with
    /// [`AuditLog::append_later`] included): before a clean exit.
    pub async fn flush(&self) -> Result<(), AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                event: None,
                done: Some(done),
            })
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?.map(|_| ())
    }

    /// Records `event` durably; returns its sequence number. Only then may the access be answered.
    pub async fn append(&self, event: AuditEvent) -> Result<u64, AuditError> {
        let (done, wait) = oneshot::channel();
        self.tx
            .send(Pending {
                event: Some(event),
                done: Some(done),
            })
            .map_err(|_| AuditError::Stopped)?;
        wait.await.map_err(|_| AuditError::Stopped)?
    }
}

#[cfg(test)]
mod tests {
    use super::super::verify;
    use super::*;
    use std::io::Write;

    fn event(name: &str) -> AuditEvent {
        AuditEvent {
            node: "n".into(),
            subject: "admin".into(),
            workload: None,
            command: "secret.get".into(),
            namespace: Some("default".into()),
            name: Some(name.into()),
            version: Some(1),
            decision: Decision::Allow,
            phase: None,
            reason: "ok".into(),
            request_id: None,
            idempotency_key: None,
            gateway_node: None,
        }
    }

    /// A batch whose write or sync fails is cut back off the file: the records acknowledged
    /// before and after it are all there, in one unbroken chain, after a reopen.
    #[test]
    fn a_batch_failing_at_write_or_sync_leaves_every_acknowledged_record() {
        use crate::faults::{Step, fail_at, take_fired};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (mut state, _) = ChainState::open(&path, "n").unwrap();
        let mut acknowledged = Vec::new();
        for (i, fault) in [None, Some(Step::Write), None, Some(Step::Fsync), None]
            .into_iter()
            .enumerate()
        {
            let batch = [event(&format!("a{i}")), event(&format!("b{i}"))];
            if let Some(step) = fault {
                fail_at(step, 0);
            }
            let result = state.write_batch(&batch);
            if fault.is_some() {
                assert!(take_fired(), "the fault did not happen");
            }
            match result {
                Ok(seq) => acknowledged.push(seq),
                Err(e) => assert!(fault.is_some(), "{e}"),
            }
        }
        assert_eq!(
            acknowledged,
            vec![2, 4, 6],
            "sequence numbers stay contiguous"
        );
        drop(state);
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 6);
        let text = std::fs::read_to_string(&path).unwrap();
        for i in [0, 2, 4] {
            assert!(text.contains(&format!("\"name\":\"b{i}\"")), "{text}");
        }
        assert!(!text.contains("\"name\":\"a1\""), "{text}");
        let (_, recovery) = ChainState::open(&path, "n").unwrap();
        assert_eq!(recovery, Recovery::Clean { records: 6 });
    }

    #[tokio::test]
    async fn chain_verifies_and_survives_reopen_and_partial_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let (log, rec) = AuditLog::open(&path, "n").unwrap();
        assert_eq!(rec, Recovery::Clean { records: 0 });
        for i in 0..10 {
            assert_eq!(log.append(event(&format!("s{i}"))).await.unwrap(), i + 1);
        }
        drop(log);
        assert_eq!(verify(&path).unwrap().records, 10);

        // A crash mid-write leaves half a record.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(br#"{"seq":11,"time":"2026-"#).unwrap();
        drop(f);
        assert!(verify(&path).is_err());
        let (log, rec) = AuditLog::open(&path, "n").unwrap();
        assert!(
            matches!(
                rec,
                Recovery::Repaired {
                    discarded_bytes: 23,
                    ..
                }
            ),
            "{rec:?}"
        );
        assert_eq!(log.append(event("after")).await.unwrap(), 12);
        // Records nobody waits for are written in order, durable once a flush returns.
        log.append_later(event("later-1"));
        log.append_later(event("later-2"));
        log.flush().await.unwrap();
        assert_eq!(verify(&path).unwrap().records, 14);
        assert_eq!(log.append(event("last")).await.unwrap(), 15);
        log.flush().await.unwrap();
        drop(log);
        let report = verify(&path).unwrap();
        assert_eq!(report.records, 15);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(
            text.lines()
                .nth(10)
                .unwrap()
                .contains("\"decision\":\"repair\"")
        );
    }
}
