//! The real OpenClaw gateway (`openclaw@2026.9.6` from npm) for the node.invoke tests.
//!
//! Include it with the helpers it uses:
//!
//! ```ignore
//! #[path = "support/random.rs"]
//! mod random;
//! #[path = "support/wait.rs"]
//! mod wait;
//! #[path = "support/openclaw.rs"]
//! mod openclaw;
//! ```
//!
//! One gateway per test binary, started on first use by `hack/openclaw.sh up` in a directory of
//! its own under the temp dir (installing openclaw first if the cache does not have it). The
//! Rust test harness never runs destructors of statics, so the script's `--parent-pid` watchdog
//! stops the gateway and removes its directory once the test process is gone (normal exit,
//! panic or SIGKILL); `hack/openclaw.sh gc` removes what a killed watchdog left.
//!
//! Two ways to talk to it: the `openclaw` CLI, as a person would (each command is a Node process
//! of 1-2 s), and [`OperatorClient`], a WebSocket client of our own for many concurrent calls.
//!
//! [`Gateway::kill`] and [`Gateway::restart`] act on the gateway every test of the binary shares:
//! a test that uses them must keep the others of its binary out while it does.
#![allow(dead_code)] // every test target uses a different subset

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use claw_secrets::crypto::DeviceKey;
use claw_secrets::invoke::gateway::{ProofFields, prove};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;

use crate::random::random_u64;
use crate::wait::PATIENCE;

/// How long one `openclaw` CLI command may take before it is killed.
pub const CLI_TIMEOUT: Duration = Duration::from_secs(60);

/// The scopes of [`OperatorClient`]: everything an operator can do. The gateway grants all four
/// to a loopback client that presents the gateway token (its hello-ok lists them back).
pub const OPERATOR_SCOPES: [&str; 4] = [
    "operator.read",
    "operator.write",
    "operator.pairing",
    "operator.admin",
];

/// The gateway shared by the tests of this binary.
#[derive(Debug)]
pub struct Gateway {
    dir: PathBuf,
    port: u16,
    token: String,
    envs: Vec<(String, String)>,
    /// Serialises [`Gateway::kill`] and [`Gateway::restart`].
    lifecycle: Mutex<()>,
}

/// What an `openclaw` CLI command answered.
#[derive(Debug)]
pub struct CliInvoke {
    pub status: ExitStatus,
    /// Stdout parsed, when it is JSON (`--json` output; errors too: `{"ok":false,"error":…}`).
    pub json: Option<Value>,
    pub stdout: String,
    pub stderr: String,
}

impl CliInvoke {
    fn from_output(out: Output) -> Self {
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        CliInvoke {
            status: out.status,
            json: serde_json::from_str(stdout.trim()).ok(),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }
}

static GATEWAY: OnceLock<Result<Gateway, String>> = OnceLock::new();

/// The shared gateway, started on first call (about 10-15 s; blocking). Panics (failing the
/// calling test) with the script's output and the gateway's log when it cannot start.
pub fn gateway() -> &'static Gateway {
    match GATEWAY.get_or_init(start) {
        Ok(gateway) => gateway,
        Err(e) => panic!("{e}"),
    }
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn script() -> Command {
    let mut cmd = Command::new("bash");
    cmd.arg(repo_root().join("hack/openclaw.sh"))
        // The tests' gateway always gets a free port (or keeps its own on a restart), whatever
        // the developer's shell sets for their own gateway.
        .env_remove("OPENCLAW_PORT")
        .stdin(Stdio::null());
    cmd
}

/// `hack/openclaw.sh ARGS`: stdout on success, else a message with its stderr.
fn run_script(args: &[&str]) -> Result<String, String> {
    let out = script()
        .args(args)
        .output()
        .map_err(|e| format!("running hack/openclaw.sh: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "`hack/openclaw.sh {}` failed ({}):\n{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

fn start() -> Result<Gateway, String> {
    run_script(&["install"]).map_err(|e| {
        format!("{e}\nthe gateway tests need Node 24 and openclaw from the npm registry")
    })?;
    let tmp = std::env::temp_dir();
    // Leftovers of earlier runs whose test process and watchdog were both killed.
    let _ = script().arg("gc").arg(&tmp).output();

    let dir = tmp.join(format!(
        "claw-secrets-openclaw-{}-{:08x}",
        std::process::id(),
        random_u64() as u32
    ));
    let dir_arg = dir.to_str().ok_or("the temp dir is not UTF-8")?;
    let started = Instant::now();
    let up = run_script(&[
        "up",
        dir_arg,
        "--parent-pid",
        &std::process::id().to_string(),
    ]);
    if let Err(e) = up {
        return Err(format!("{e}\n{}", log_tail(&dir)));
    }
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map(|s| s.trim().to_owned())
            .map_err(|e| format!("reading {}/{name}: {e}", dir.display()))
    };
    let port = read("port")?
        .parse()
        .map_err(|e| format!("{}/port: {e}", dir.display()))?;
    let token = read("token")?;
    let envs = read_envs(dir_arg)?;
    eprintln!(
        "[openclaw] gateway ready in {:.1}s on ws://127.0.0.1:{port} (state in {})",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(Gateway {
        dir,
        port,
        token,
        envs,
        lifecycle: Mutex::new(()),
    })
}

/// The variables `hack/openclaw.sh env DIR` exports, as bash evaluates them (PATH is ours with
/// the runtime's directories in front).
fn read_envs(dir: &str) -> Result<Vec<(String, String)>, String> {
    let exports = run_script(&["env", dir])?;
    let names: Vec<&str> = exports
        .lines()
        .filter_map(|l| l.strip_prefix("export "))
        .flat_map(str::split_whitespace)
        .filter_map(|word| word.split_once('=').map(|(name, _)| name))
        .filter(|n| !n.is_empty() && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'))
        .collect();
    let out = Command::new("bash")
        .args(["-c", "eval \"$1\" && env -0", "bash", &exports])
        .output()
        .map_err(|e| format!("evaluating the gateway's environment: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "evaluating the gateway's environment failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let evaluated: HashMap<String, String> = out
        .stdout
        .split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = String::from_utf8_lossy(kv);
            let (k, v) = kv.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect();
    names
        .iter()
        .map(|n| {
            evaluated
                .get(*n)
                .map(|v| ((*n).to_owned(), v.clone()))
                .ok_or_else(|| format!("{n} is not set after evaluating `hack/openclaw.sh env`"))
        })
        .collect()
}

/// The gateway's logs in `dir/logs`, without colour codes.
fn read_logs(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir.join("logs"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n != "watchdog.log"))
        .collect();
    files.sort();
    let mut text = String::new();
    for file in files {
        let content = std::fs::read(&file).unwrap_or_default();
        text.push_str(&format!("==> {} <==\n", file.display()));
        text.push_str(&strip_ansi(&String::from_utf8_lossy(&content)));
        text.push('\n');
    }
    text
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC [ parameters final-byte (the gateway only colours its console lines).
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// The last lines of the gateway's console log, for failure messages.
fn log_tail(dir: &Path) -> String {
    let path = dir.join("logs/gateway.log");
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = strip_ansi(&String::from_utf8_lossy(&bytes));
            let lines: Vec<&str> = text.lines().collect();
            format!(
                "last lines of {}:\n{}",
                path.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            )
        }
        Err(e) => format!("(no gateway log: {}: {e})", path.display()),
    }
}

/// Runs `cmd` (its own process group) and collects its output; kills the group after `timeout`
/// and says so at the end of stderr.
fn output_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            bytes
        })
    };
    let stdout = drain(Box::new(child.stdout.take().expect("piped stdout")));
    let stderr = drain(Box::new(child.stderr.take().expect("piped stderr")));
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for a child") {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let pgid = i32::try_from(child.id()).expect("pid");
            // SAFETY: kill(2) on the process group of our own child, which is not reaped yet.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            break child.wait().expect("waiting for a killed child");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let stdout = stdout.join().expect("stdout reader");
    let mut stderr = stderr.join().expect("stderr reader");
    if timed_out {
        stderr.extend_from_slice(
            format!("\n[harness] killed after {timeout:?}: {cmd:?}\n").as_bytes(),
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Pid of the process recorded in `file` ("PID START_TIME", hack/lib/processes.sh) if it is
/// still that process and not a zombie (a killed gateway stays one until init reaps it).
fn recorded_live_pid(file: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(file).ok()?;
    let mut fields = text.split_whitespace();
    let pid: i32 = fields.next()?.parse().ok()?;
    let start = fields.next()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "(comm) ": state is field 3, the start time field 22.
    let rest: Vec<&str> = stat.rsplit_once(") ")?.1.split_whitespace().collect();
    (rest.first() != Some(&"Z") && rest.get(19) == Some(&start)).then_some(pid)
}

/// Does a socket listen on loopback `port` (tcp or tcp6)?
fn listening(port: u16) -> bool {
    let suffix = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().any(|table| {
        std::fs::read_to_string(table)
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                f.len() > 3 && f[1].ends_with(&suffix) && f[3] == "0A"
            })
    })
}

impl Gateway {
    /// `ws://127.0.0.1:PORT`, the same after a restart.
    pub fn url(&self) -> String {
        format!("ws://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The shared gateway token (`gateway.auth.token`).
    pub fn token(&self) -> String {
        self.token.clone()
    }

    /// The gateway's directory: config, state, logs, `port`, `token`, `gateway.pid`.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The environment of `openclaw` commands against this gateway (`hack/openclaw.sh env`).
    pub fn envs(&self) -> Vec<(String, String)> {
        self.envs.clone()
    }

    /// `openclaw ARGS` against this gateway; killed after [`CLI_TIMEOUT`].
    pub fn openclaw(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new("openclaw");
        // The PATH in envs (the runtime's bin dirs first) is the one the program is looked up in.
        cmd.args(args).envs(self.envs.iter().map(|(k, v)| (k, v)));
        output_with_timeout(cmd, CLI_TIMEOUT)
    }

    /// `openclaw nodes invoke --node ID --command C --params JSON --json EXTRA…`.
    pub fn nodes_invoke(
        &self,
        node_id: &str,
        command: &str,
        params: &Value,
        extra_args: &[&str],
    ) -> CliInvoke {
        let params = params.to_string();
        let mut args = vec![
            "nodes",
            "invoke",
            "--node",
            node_id,
            "--command",
            command,
            "--params",
            &params,
            "--json",
        ];
        args.extend_from_slice(extra_args);
        CliInvoke::from_output(self.openclaw(&args))
    }

    /// `openclaw gateway call METHOD --json --params JSON`: one RPC as the CLI's operator.
    pub fn gateway_call(&self, method: &str, params: &Value) -> CliInvoke {
        let params = params.to_string();
        CliInvoke::from_output(
            self.openclaw(&["gateway", "call", method, "--json", "--params", &params]),
        )
    }

    /// A fresh single-use node setup code (`hack/openclaw.sh setup-code`): base64url JSON
    /// `{url, bootstrapToken, expiresAtMs}`.
    pub fn setup_code(&self) -> String {
        run_script(&["setup-code", self.dir_str()])
            .unwrap_or_else(|e| panic!("{e}"))
            .trim()
            .to_owned()
    }

    /// Approves the pending command-surface request(s) of `node_id` (`hack/openclaw.sh
    /// approve`, which waits up to 30 s for one to appear).
    pub fn approve(&self, node_id: &str) {
        if let Err(e) = run_script(&["approve", self.dir_str(), node_id]) {
            panic!("{e}\n{}", self.log_tail());
        }
    }

    /// The node ids with a pending command-surface request (`openclaw nodes pending --json`).
    pub fn pending_node_ids(&self) -> Vec<String> {
        let out = CliInvoke::from_output(self.openclaw(&["nodes", "pending", "--json"]));
        let json = match &out.json {
            Some(json) if out.success() => json,
            _ => panic!("`openclaw nodes pending --json` failed: {out:?}"),
        };
        // An array (the node.pair.list RPC behind it answers {"pending": […], "paired": […]}).
        let list = json.get("pending").unwrap_or(json);
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["nodeId"].as_str().map(str::to_owned))
            .collect()
    }

    /// SIGKILL the gateway (as a crash would) and wait until it is gone and its port is free.
    /// Nothing to do when it is not running.
    pub fn kill(&self) {
        let _lifecycle = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        self.kill_locked();
    }

    fn kill_locked(&self) {
        let pid_file = self.dir.join("gateway.pid");
        let Some(pid) = recorded_live_pid(&pid_file) else {
            return;
        };
        // SAFETY: kill(2) on the gateway this harness started, checked by pid and start time.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + PATIENCE;
        // Its listening sockets close some 50 ms after it is a zombie.
        while recorded_live_pid(&pid_file).is_some() || listening(self.port) {
            assert!(
                Instant::now() < deadline,
                "the gateway (pid {pid}) is still running {PATIENCE:?} after SIGKILL"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Kills the gateway if it runs, then starts it again in the same directory (same port,
    /// token and state: paired devices survive) and waits until it is ready. Returns how long
    /// the start took.
    pub fn restart(&self) -> Duration {
        let _lifecycle = self.lifecycle.lock().unwrap_or_else(|e| e.into_inner());
        self.kill_locked();
        let started = Instant::now();
        // --parent-pid again: the watchdog of the first start is kept, or replaced if it died.
        let pid = std::process::id().to_string();
        if let Err(e) = run_script(&["up", self.dir_str(), "--parent-pid", &pid]) {
            panic!("restarting the gateway: {e}\n{}", self.log_tail());
        }
        let took = started.elapsed();
        let port = std::fs::read_to_string(self.dir.join("port")).unwrap_or_default();
        assert_eq!(
            port.trim(),
            self.port.to_string(),
            "the restarted gateway moved to another port"
        );
        took
    }

    /// The gateway's logs (`DIR/logs`: its console output, appended across restarts, and
    /// openclaw's JSON log file), without colour codes.
    pub fn log_text(&self) -> String {
        read_logs(&self.dir)
    }

    fn log_tail(&self) -> String {
        log_tail(&self.dir)
    }

    fn dir_str(&self) -> &str {
        self.dir.to_str().expect("a UTF-8 gateway dir")
    }
}

type Reply = Result<Value, Value>;

/// Calls in flight, by request id; `closed` once the connection is gone.
#[derive(Default)]
struct Calls {
    waiting: HashMap<String, oneshot::Sender<Reply>>,
    closed: Option<String>,
}

fn client_error(code: &str, message: impl Into<String>) -> Value {
    json!({ "code": code, "message": message.into() })
}

/// An operator connection of our own to the gateway: one WebSocket, any number of concurrent
/// calls from any number of tasks. Bound to the tokio runtime that connected it (every
/// `#[tokio::test]` has its own). Dropping it closes the connection.
pub struct OperatorClient {
    frames: mpsc::UnboundedSender<String>,
    calls: Arc<Mutex<Calls>>,
    next_id: AtomicU64,
    hello: Value,
}

impl OperatorClient {
    /// Connects with a new device identity (paired silently: loopback) and the gateway token,
    /// with [`OPERATOR_SCOPES`]. Panics when the gateway refuses.
    pub async fn connect(gateway: &Gateway) -> Self {
        match Self::try_connect(gateway).await {
            Ok(client) => client,
            Err(e) => panic!("operator connect to {}: {e}", gateway.url()),
        }
    }

    /// [`OperatorClient::connect`], with the refusal as an error (a gateway still starting
    /// answers `UNAVAILABLE`, retryable).
    pub async fn try_connect(gateway: &Gateway) -> Result<Self, String> {
        let handshake = tokio::time::timeout(PATIENCE, Self::handshake(gateway));
        handshake
            .await
            .map_err(|_| format!("no hello-ok within {PATIENCE:?}"))?
    }

    async fn handshake(gateway: &Gateway) -> Result<Self, String> {
        let tcp = TcpStream::connect(("127.0.0.1", gateway.port()))
            .await
            .map_err(|e| format!("tcp: {e}"))?;
        // Small frames both ways: no Nagle delay on a request or its answer.
        tcp.set_nodelay(true).map_err(|e| format!("nodelay: {e}"))?;
        let (mut ws, _) = tokio_tungstenite::client_async(gateway.url(), tcp)
            .await
            .map_err(|e| format!("websocket handshake: {e}"))?;

        let challenge = loop {
            let frame = next_json(&mut ws).await?;
            if frame["type"] == "event" && frame["event"] == "connect.challenge" {
                break frame["payload"].clone();
            }
        };
        let nonce = challenge["nonce"]
            .as_str()
            .ok_or_else(|| format!("connect.challenge without a nonce: {challenge}"))?;
        let ts = challenge["ts"]
            .as_i64()
            .ok_or_else(|| format!("connect.challenge without a ts: {challenge}"))?;

        let key = DeviceKey::generate().map_err(|e| format!("device key: {e}"))?;
        let token = gateway.token();
        let device = prove(
            &key,
            &ProofFields {
                client_id: "cli",
                client_mode: "cli",
                role: "operator",
                scopes: &OPERATOR_SCOPES,
                signed_at_ms: ts,
                token: &token,
                nonce,
                platform: "linux",
                device_family: "",
            },
        );
        let connect = json!({
            "type": "req",
            "id": "connect",
            "method": "connect",
            "params": {
                "minProtocol": 4,
                "maxProtocol": 4,
                "client": {
                    "id": "cli",
                    "version": env!("CARGO_PKG_VERSION"),
                    "platform": "linux",
                    "mode": "cli",
                },
                "role": "operator",
                "scopes": OPERATOR_SCOPES,
                "caps": [],
                "auth": { "token": token },
                "device": device,
            },
        });
        ws.send(Message::text(connect.to_string()))
            .await
            .map_err(|e| format!("sending connect: {e}"))?;
        let hello = loop {
            let frame = next_json(&mut ws).await?;
            if frame["type"] == "res" && frame["id"] == "connect" {
                if frame["ok"] != true {
                    return Err(format!("connect refused: {}", frame["error"]));
                }
                break frame["payload"].clone();
            }
        };

        let (frames, outgoing) = mpsc::unbounded_channel();
        let calls = Arc::new(Mutex::new(Calls::default()));
        tokio::spawn(pump(ws, outgoing, Arc::clone(&calls)));
        Ok(OperatorClient {
            frames,
            calls,
            next_id: AtomicU64::new(1),
            hello,
        })
    }

    /// The payload of the gateway's `hello-ok` (`auth.scopes`, `policy`, `features.methods`…).
    pub fn hello(&self) -> &Value {
        &self.hello
    }

    /// One RPC: `Ok(payload)` or `Err(error)` as the gateway answered (`{code, message,
    /// details?…}`). A lost connection is `Err` with code `CLIENT_DISCONNECTED`, no answer within
    /// [`PATIENCE`] `CLIENT_TIMEOUT`.
    pub async fn call(&self, method: &str, params: Value) -> Result<Value, Value> {
        let id = format!("r{}", self.next_id.fetch_add(1, Ordering::Relaxed));
        let (reply, answer) = oneshot::channel();
        {
            let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(reason) = &calls.closed {
                return Err(client_error("CLIENT_DISCONNECTED", reason.clone()));
            }
            calls.waiting.insert(id.clone(), reply);
        }
        let frame = json!({ "type": "req", "id": id, "method": method, "params": params });
        if self.frames.send(frame.to_string()).is_err() {
            self.forget(&id);
            return Err(client_error(
                "CLIENT_DISCONNECTED",
                "the connection task ended",
            ));
        }
        match tokio::time::timeout(PATIENCE, answer).await {
            Ok(Ok(reply)) => reply,
            Ok(Err(_)) => Err(client_error(
                "CLIENT_DISCONNECTED",
                "the connection task ended",
            )),
            Err(_) => {
                self.forget(&id);
                Err(client_error(
                    "CLIENT_TIMEOUT",
                    format!("no answer to {method} within {PATIENCE:?}"),
                ))
            }
        }
    }

    fn forget(&self, id: &str) {
        let mut calls = self.calls.lock().unwrap_or_else(|e| e.into_inner());
        calls.waiting.remove(id);
    }
}

/// The next text frame, parsed (pings are answered by tungstenite while we read).
async fn next_json(ws: &mut WebSocketStream<TcpStream>) -> Result<Value, String> {
    loop {
        match ws.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str())
                    .map_err(|e| format!("a frame that is not JSON ({e}): {text}"));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(format!("closed by the gateway: {frame:?}"));
            }
            Some(Ok(_)) => {}
            Some(Err(e)) => return Err(format!("reading: {e}")),
            None => return Err("connection closed".to_owned()),
        }
    }
}

/// The connection's only task: writes the frames of `call`, routes each `res` to its caller
/// (events -- tick, health… -- are dropped), and fails every waiting call when the connection
/// ends. Keeps reading, so the gateway's pings get their pongs.
async fn pump(
    mut ws: WebSocketStream<TcpStream>,
    mut outgoing: mpsc::UnboundedReceiver<String>,
    calls: Arc<Mutex<Calls>>,
) {
    let reason = loop {
        tokio::select! {
            frame = outgoing.recv() => match frame {
                Some(text) => {
                    if let Err(e) = ws.send(Message::text(text)).await {
                        break format!("sending: {e}");
                    }
                }
                None => {
                    let _ = ws.close(None).await;
                    break "the client was dropped".to_owned();
                }
            },
            frame = next_json(&mut ws) => match frame {
                Ok(frame) if frame["type"] == "res" => {
                    let Some(id) = frame["id"].as_str() else { continue };
                    let waiting = calls.lock().unwrap_or_else(|e| e.into_inner()).waiting.remove(id);
                    if let Some(reply) = waiting {
                        let answer = if frame["ok"] == true {
                            Ok(frame["payload"].clone())
                        } else {
                            Err(frame["error"].clone())
                        };
                        let _ = reply.send(answer);
                    }
                }
                Ok(_) => {}
                Err(e) => break e,
            },
        }
    };
    let mut calls = calls.lock().unwrap_or_else(|e| e.into_inner());
    calls.closed = Some(reason.clone());
    for (_, reply) in calls.waiting.drain() {
        let _ = reply.send(Err(client_error("CLIENT_DISCONNECTED", reason.clone())));
    }
}
