//! The dev server's control socket, `<data-dir>/control.sock`: how `claw-secrets keys
//! --data-dir` asks a running `claw-secrets dev` to rotate or prune its master keys, so the one
//! process that holds the store does it (see [`super::dev_keys`]).
//!
//! A Unix socket, not an HTTP endpoint: it is reached through the data dir (0700) and the
//! socket file (0600), the same file permissions that guard `master.key` itself, and the
//! server also checks the caller's uid (its own, or root). Whoever may read the keyring may
//! rotate it; nobody else can even connect. One request per connection: a JSON line
//! `{"command":"rotate"|"prune"}`, answered by `{"ok":true,"message":...}` or
//! `{"ok":false,"error":...}` (ids and counts, never key material).

use serde::{Deserialize, Serialize};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use super::dev_keys::{DataDirKeys, local_subject};

pub const SOCKET: &str = "control.sock";
/// A request is one short line; anything longer is not one.
const MAX_REQUEST: u64 = 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Rotate,
    Prune,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Request {
    command: Action,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Answer {
    ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

/// The listening socket; its file is removed when this is dropped (the server stopping).
pub struct ControlSocket {
    path: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Listens on `<data_dir>/control.sock` (the caller holds the data dir's lock, so a socket file
/// found there is a dead server's) and, first, finishes a re-encryption a crash interrupted.
/// `None`, with a warning, if the socket cannot be made: the server runs without it, and
/// `keys --data-dir` then says to stop it.
pub fn serve(data_dir: &Path, keys: DataDirKeys) -> Option<ControlSocket> {
    let keys = Arc::new(keys);
    let catch_up = keys.clone();
    tokio::spawn(async move {
        match catch_up.finish_reencryption().await {
            Ok(Some(summary)) => tracing::info!(%summary, "finished an interrupted re-encryption"),
            Ok(None) => {}
            Err(e) => {
                tracing::error!(error = %e, "an interrupted re-encryption could not be finished")
            }
        }
    });
    let path = data_dir.join(SOCKET);
    let _ = std::fs::remove_file(&path);
    let listener = match UnixListener::bind(&path).and_then(|l| {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).map(|()| l)
    }) {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "no control socket: `claw-secrets keys --data-dir` cannot reach this server");
            return None;
        }
    };
    let task = tokio::spawn(async move {
        loop {
            match listener.accept().await {
                // Each request in a task of its own: a rotation goes on to the end even if
                // the client that asked goes away.
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream, keys.clone()));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            }
        }
    });
    Some(ControlSocket { path, task })
}

async fn answer(stream: UnixStream, keys: Arc<DataDirKeys>) {
    let uid = match stream.peer_cred() {
        Ok(cred) => cred.uid(),
        Err(e) => {
            tracing::warn!(error = %e, "control socket: the caller's credentials are unknown");
            return;
        }
    };
    let own = rustix::process::geteuid().as_raw();
    let (read, mut write) = stream.into_split();
    let answer = if uid != own && uid != 0 {
        Answer::failed(format!(
            "uid {uid} may not manage this server's keys: only its own user (uid {own}) may"
        ))
    } else {
        let mut line = String::new();
        let read = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST))
            .read_line(&mut line)
            .await;
        match read
            .ok()
            .and_then(|_| serde_json::from_str::<Request>(&line).ok())
        {
            None => Answer::failed(
                "not a control request: send {\"command\":\"rotate\"} or {\"command\":\"prune\"}"
                    .to_owned(),
            ),
            Some(request) => {
                let subject = local_subject(uid);
                let result = match request.command {
                    Action::Rotate => keys.rotate(&subject).await,
                    Action::Prune => keys.prune(&subject).await,
                };
                match result {
                    Ok(message) => Answer {
                        ok: true,
                        message: Some(message),
                        error: None,
                    },
                    Err(e) => Answer::failed(e),
                }
            }
        }
    };
    let mut bytes = serde_json::to_vec(&answer).expect("an answer serializes");
    bytes.push(b'\n');
    let _ = write.write_all(&bytes).await;
    let _ = write.shutdown().await;
}

impl Answer {
    fn failed(error: String) -> Self {
        Answer {
            ok: false,
            message: None,
            error: Some(error),
        }
    }
}

/// Asks the server holding `data_dir` to run `action`; its message, or its error.
pub async fn request(data_dir: &Path, action: Action) -> Result<String, String> {
    let path = data_dir.join(SOCKET);
    let mut stream = UnixStream::connect(&path).await.map_err(|e| {
        format!(
            "a claw-secrets server is using {} but does not answer on {} ({e}): stop it, then run this again (it then works on the data dir directly)",
            data_dir.display(),
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(&Request { command: action }).expect("a request serializes");
    line.push(b'\n');
    stream
        .write_all(&line)
        .await
        .map_err(|e| format!("cannot send to {}: {e}", path.display()))?;
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .await
        .map_err(|e| format!("no answer from {}: {e}", path.display()))?;
    let answer: Answer = serde_json::from_str(&answer).map_err(|_| {
        format!(
            "the server on {} ended the request without an answer; its log says why",
            path.display()
        )
    })?;
    match answer {
        Answer {
            ok: true, message, ..
        } => Ok(message.unwrap_or_default()),
        Answer { error, .. } => Err(error.unwrap_or_else(|| "the server refused".to_owned())),
    }
}
