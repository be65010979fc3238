//! Dev mode's identities: bearer tokens listed (as SHA-256 hashes) in `tokens.json`.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use zeroize::Zeroizing;

use crate::domain::{Namespace, Workload};
use crate::invoke::Caller;
use crate::store::{StoreError, write_private_file_atomic};

/// One entry of the tokens file. Only the token's hash is stored, so the file grants nothing
/// by itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TokenEntry {
    pub sha256: String,
    pub subject: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<Namespace>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workload: Option<Workload>,
    #[serde(default)]
    pub admin: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("tokens file {path} is invalid: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn hash_token(token: &str) -> String {
    crate::hex::encode(&Sha256::digest(token.as_bytes()))
}

/// A new random bearer token: `cst_` and 32 random bytes, base64url.
fn generate_token() -> Zeroizing<String> {
    let mut bytes = Zeroizing::new([0u8; 32]);
    getrandom::getrandom(bytes.as_mut()).expect("the OS random number generator is available");
    Zeroizing::new(format!("cst_{}", URL_SAFE_NO_PAD.encode(bytes.as_ref())))
}

fn read_file(path: &Path) -> Result<TokensFile, TokenError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| TokenError::Invalid {
            path: path.to_owned(),
            reason: e.to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokensFile::default()),
        Err(e) => Err(StoreError::io(path, e).into()),
    }
}

/// Adds a token for `entry` (its `sha256` is filled in) and returns the token itself.
pub fn add_token(path: &Path, mut entry: TokenEntry) -> Result<Zeroizing<String>, TokenError> {
    // Read, add, write back: two `token create` runs at once would each drop the other's
    // token, so the whole update holds an exclusive lock on a file beside the tokens file.
    let _lock = lock_beside(path)?;
    let mut file = read_file(path)?;
    let token = generate_token();
    entry.sha256 = hash_token(&token);
    file.tokens.push(entry);
    write_private_file_atomic(path, &serde_json::to_vec_pretty(&file).expect("json"))?;
    Ok(token)
}

/// Takes an exclusive lock on `<path>.lock` (created 0600 if needed), held until the returned
/// file is dropped. The tokens file itself cannot carry the lock: every write replaces it.
fn lock_beside(path: &Path) -> Result<std::fs::File, TokenError> {
    let mut lock_path = path.as_os_str().to_owned();
    lock_path.push(".lock");
    let lock_path = PathBuf::from(lock_path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&lock_path)
        .map_err(|e| StoreError::io(&lock_path, e))?;
    // The kernel releases the lock when the file closes.
    file.lock().map_err(|e| StoreError::io(&lock_path, e))?;
    Ok(file)
}

/// Resolves bearer tokens to callers; picks up edits to the tokens file without a restart.
pub struct TokenStore {
    path: PathBuf,
    state: RwLock<Loaded>,
}

/// The tokens file as last read.
#[derive(Default)]
struct Loaded {
    stamp: Option<FileStamp>,
    tokens: HashMap<String, TokenEntry>,
    /// Why the file could not be read (a syntax error, say): then no token is valid. A stale
    /// set is never kept, or removing a token from a file with a typo would leave it working.
    broken: Option<String>,
}

/// What tells one version of the tokens file from another. The mtime alone does not: file
/// systems stamp new files from a coarse clock, so two writes within one tick (a few ms) share
/// an mtime. The length is compared too, and a file changed within the last few seconds is
/// re-read on every check until its mtime is safely in the past.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileStamp {
    mtime: SystemTime,
    len: u64,
}

impl FileStamp {
    const SETTLE: Duration = Duration::from_secs(2);

    fn of(path: &Path) -> Option<FileStamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(FileStamp {
            mtime: meta.modified().ok()?,
            len: meta.len(),
        })
    }

    /// Whether a later write could no longer share this stamp's mtime.
    fn settled(&self) -> bool {
        SystemTime::now()
            .duration_since(self.mtime)
            .is_ok_and(|age| age > Self::SETTLE)
    }
}

impl TokenStore {
    pub fn open(path: &Path) -> Result<Self, TokenError> {
        let store = TokenStore {
            path: path.to_owned(),
            state: RwLock::new(Loaded::default()),
        };
        // At start a broken file is an error (the server does not start); later, it locks
        // every token out until it is fixed.
        store.reload_if_changed()?;
        Ok(store)
    }

    fn reload_if_changed(&self) -> Result<(), TokenError> {
        let stamp = FileStamp::of(&self.path);
        if let Some(s) = stamp
            && self.state.read().unwrap_or_else(|e| e.into_inner()).stamp == stamp
            && s.settled()
        {
            return Ok(());
        }
        let read = read_file(&self.path);
        let mut state = self.state.write().unwrap_or_else(|e| e.into_inner());
        match read {
            Ok(file) => {
                *state = Loaded {
                    stamp,
                    tokens: file
                        .tokens
                        .into_iter()
                        .map(|e| (e.sha256.clone(), e))
                        .collect(),
                    broken: None,
                };
                Ok(())
            }
            Err(e) => {
                if state.broken.is_none() || state.stamp != stamp {
                    tracing::error!(error = %e, "the tokens file cannot be read: every token is refused until it is fixed");
                }
                // What callers are told names the problem, not the server's paths (the log does).
                let why = match &e {
                    TokenError::Invalid { reason, .. } => format!("it is not valid: {reason}"),
                    TokenError::Store(StoreError::Io { source, .. }) => {
                        format!("it cannot be read: {}", source.kind())
                    }
                    TokenError::Store(_) => "it cannot be read".to_owned(),
                };
                *state = Loaded {
                    stamp,
                    tokens: HashMap::new(),
                    broken: Some(why),
                };
                Err(e)
            }
        }
    }

    pub fn has_admin(&self) -> bool {
        self.state
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .tokens
            .values()
            .any(|e| e.admin)
    }

    /// Re-reads the tokens file if it changed (blocking file I/O: call it off the async
    /// workers). A file that cannot be read refuses every token until it is fixed (logged).
    pub fn refresh(&self) {
        let _ = self.reload_if_changed();
    }

    /// Keeps the tokens current: re-reads the file every `period`, off the async workers.
    /// Runs until the process ends.
    pub async fn refresh_every(self: Arc<Self>, period: Duration) {
        loop {
            tokio::time::sleep(period).await;
            let tokens = self.clone();
            if tokio::task::spawn_blocking(move || tokens.refresh())
                .await
                .is_err()
            {
                tracing::error!("tokens file refresh task failed");
            }
        }
    }

    /// The caller a token stands for, `Ok(None)` for a token not loaded, `Err(why)` while the
    /// tokens file cannot be read (no file I/O: see [`TokenStore::refresh`]).
    pub fn lookup(&self, token: &str) -> Result<Option<Caller>, String> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &state.broken {
            return Err(why.clone());
        }
        // Looking up by hash: the comparison is on a digest the caller cannot steer, so it
        // leaks nothing about stored tokens through timing.
        let Some(entry) = state.tokens.get(&hash_token(token)) else {
            return Ok(None);
        };
        Ok(Some(caller_of(entry)))
    }

    /// The caller whose entries are named `subject` (the gateway principal of dev mode):
    /// `Ok(Err(why))` when there is none (no entry, or entries of that subject that grant
    /// different things), `Err(why)` while the tokens file cannot be read.
    pub fn lookup_subject(&self, subject: &str) -> Result<Result<Caller, String>, String> {
        let state = self.state.read().unwrap_or_else(|e| e.into_inner());
        if let Some(why) = &state.broken {
            return Err(why.clone());
        }
        let mut callers = state
            .tokens
            .values()
            .filter(|e| e.subject == subject)
            .map(caller_of);
        let Some(first) = callers.next() else {
            return Ok(Err(format!(
                "no token of the tokens file has the subject {subject:?} (create one with `claw-secrets token create`, or name an existing subject)"
            )));
        };
        if callers.any(|other| other != first) {
            return Ok(Err(format!(
                "the tokens of subject {subject:?} grant different things (namespace, workload or admin): give the gateway principal a subject of its own"
            )));
        }
        Ok(Ok(first))
    }
}

fn caller_of(entry: &TokenEntry) -> Caller {
    Caller {
        namespace: entry.namespace.clone(),
        workload: entry.workload.clone(),
        admin: entry.admin,
        ..Caller::named(entry.subject.clone())
    }
}
