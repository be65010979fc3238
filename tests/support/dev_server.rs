//! Test support for the dev-mode integration tests: runs the real `claw-secrets dev` binary as
//! a child process on a private data dir and config home, talks to it over a tiny blocking
//! HTTP/1.1 client, and runs the real CLI against it.
//!
//! Include it from a test target with
//! `#[path = "support/dev_server.rs"] mod dev_server;`.
//!
//! A [`DevServer`] kills its process when dropped, so a failing (panicking) test never leaves a
//! server behind.

#![allow(dead_code)]

use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::protocol::http_status_of;
use crate::random::random_hex;
use crate::wait::PATIENCE;

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_claw-secrets");

/// Environment variables that would make a child process find something other than the test's
/// own server, or change its logging behind the test's back.
const SCRUBBED_ENV: &[&str] = &[
    "CLAW_SECRETS_ADDR",
    "CLAW_SECRETS_TOKEN",
    "CLAW_SECRETS_DATA_DIR",
    "CLAW_SECRETS_LOG",
    "CLAW_SECRETS_TIMEOUT",
    "CLAW_SECRETS_CONNECT_TIMEOUT",
    // A developer's gateway must not capture a test's server (`dev` reads these too).
    "CLAW_SECRETS_GATEWAY",
    "CLAW_SECRETS_GATEWAY_TOKEN_FILE",
    "CLAW_SECRETS_GATEWAY_SETUP_CODE",
    "CLAW_SECRETS_GATEWAY_PRINCIPAL",
    "RUST_LOG",
    // A developer's cluster must not capture `claw-secrets invoke` (it prefers a kubeconfig
    // over the dev server when no --addr is given).
    "KUBECONFIG",
];

static REQUEST_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A request id unique within the test process (valid for the protocol's `id` field).
pub fn next_request_id(tag: &str) -> String {
    let n = REQUEST_COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("t-{tag}-{n}-{}", random_hex(3))
}

// ---------------------------------------------------------------------------------------------
// HTTP
// ---------------------------------------------------------------------------------------------

/// A raw HTTP answer.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub body: Vec<u8>,
}

/// The outcome of one call as a user sees it: the payload, or the error code and message.
pub type Outcome = Result<Value, (String, String)>;

impl HttpResponse {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics (naming the body) if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "HTTP {} body is not JSON ({e}): {:?}",
                self.status,
                self.text()
            )
        })
    }

    pub fn is_ok(&self) -> bool {
        self.json().get("ok") == Some(&Value::Bool(true))
    }

    /// The payload of a successful answer; panics with the answer otherwise.
    pub fn payload(&self) -> Value {
        let v = self.json();
        assert!(
            self.status == 200 && v["ok"] == json!(true),
            "expected success, got HTTP {}: {}",
            self.status,
            self.text()
        );
        v.get("payload")
            .cloned()
            .expect("success carries a payload")
    }

    /// The error code of a failed answer; panics on success.
    pub fn code(&self) -> String {
        let v = self.json();
        assert_eq!(
            v["ok"],
            json!(false),
            "expected failure, got HTTP {}: {}",
            self.status,
            self.text()
        );
        v["error"]["code"]
            .as_str()
            .unwrap_or_else(|| panic!("failure without error.code: {}", self.text()))
            .to_owned()
    }

    pub fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    /// Asserts a failure with `code`, the HTTP status that goes with it, a non-empty message,
    /// and no payload. Returns the message.
    #[track_caller]
    pub fn expect_error(&self, code: &str) -> String {
        let got = self.code();
        assert_eq!(got, code, "wrong error code; body: {}", self.text());
        assert_eq!(
            self.status,
            http_status_of(code),
            "HTTP status does not match {code}; body: {}",
            self.text()
        );
        let v = self.json();
        assert!(v.get("payload").is_none(), "failure with a payload: {v}");
        assert!(v.get("id").is_some(), "failure without an id: {v}");
        let msg = self.message();
        assert!(
            !msg.trim().is_empty(),
            "empty error message: {}",
            self.text()
        );
        msg
    }

    pub fn outcome(&self) -> Outcome {
        let v = self.json();
        if v["ok"] == json!(true) {
            assert_eq!(self.status, 200, "success with HTTP {}: {v}", self.status);
            Ok(v["payload"].clone())
        } else {
            let code = v["error"]["code"].as_str().unwrap_or_default().to_owned();
            assert_eq!(
                self.status,
                http_status_of(&code),
                "HTTP status does not match {code}: {v}"
            );
            Err((
                code,
                v["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            ))
        }
    }
}

/// Where a complete response ends, if `raw` already holds one.
fn complete_response_len(raw: &[u8]) -> Option<usize> {
    let head_end = raw.windows(4).position(|w| w == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).to_ascii_lowercase();
    let cl = head.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    })?;
    (raw.len() >= head_end + cl).then_some(head_end + cl)
}

fn parse_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |what: &str| std::io::Error::other(format!("bad HTTP response ({what})"));
    let head_end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?
        + 4;
    let head = String::from_utf8_lossy(&raw[..head_end]).into_owned();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("status line"))?;
    let lower = head.to_ascii_lowercase();
    let rest = &raw[head_end..];
    let body = if let Some(cl) = lower.lines().find_map(|l| {
        l.strip_prefix("content-length:")
            .and_then(|v| v.trim().parse::<usize>().ok())
    }) {
        rest.get(..cl).ok_or_else(|| bad("short body"))?.to_vec()
    } else if lower.contains("transfer-encoding: chunked") {
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = rest[at..]
                .windows(2)
                .position(|w| w == b"\r\n")
                .ok_or_else(|| bad("chunk size"))?;
            let size_str = String::from_utf8_lossy(&rest[at..at + line_end]).into_owned();
            let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16)
                .map_err(|_| bad("chunk size"))?;
            at += line_end + 2;
            if size == 0 {
                break;
            }
            body.extend_from_slice(rest.get(at..at + size).ok_or_else(|| bad("short chunk"))?);
            at += size + 2;
        }
        body
    } else {
        rest.to_vec()
    };
    Ok(HttpResponse { status, body })
}

/// One `POST path` on a fresh connection (`Connection: close`), with extra header lines.
/// Large bodies are written from a second thread so an early answer (413) is still read.
pub fn http_post_raw(
    port: u16,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(PATIENCE))?;
    stream.set_write_timeout(Some(PATIENCE))?;
    stream.set_nodelay(true)?;
    let mut req = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);

    let writer = if bytes.len() > 256 * 1024 {
        let mut w = stream.try_clone()?;
        Some(std::thread::spawn(move || {
            // The server may answer and close before reading everything; that is its right.
            let _ = w.write_all(&bytes);
        }))
    } else {
        stream.write_all(&bytes)?;
        None
    };

    let mut raw = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    let result = loop {
        match stream.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                raw.extend_from_slice(&buf[..n]);
                if complete_response_len(&raw).is_some() {
                    break Ok(());
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => break Err(e),
        }
    };
    let _ = stream.shutdown(std::net::Shutdown::Both);
    if let Some(w) = writer {
        let _ = w.join();
    }
    match result {
        Ok(()) => parse_response(&raw),
        // A reset after the whole answer arrived (the server closed on an unread body).
        Err(_) if complete_response_len(&raw).is_some() => parse_response(&raw),
        Err(e) => Err(e),
    }
}

/// `POST /v1/invoke` with an optional bearer token.
pub fn http_invoke(port: u16, token: Option<&str>, body: &[u8]) -> std::io::Result<HttpResponse> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| vec![("Authorization", a)])
        .unwrap_or_default();
    http_post_raw(port, "/v1/invoke", &headers, body)
}

// ---------------------------------------------------------------------------------------------
// CLI
// ---------------------------------------------------------------------------------------------

/// What a CLI run printed, and how it exited.
#[derive(Debug)]
pub struct CliOutput {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Exit 0 with JSON on stdout is a payload; exit 1 with `CODE: message` on stderr is an
    /// error. Anything else fails the test.
    #[track_caller]
    pub fn outcome(&self) -> Outcome {
        match self.code() {
            Some(0) => Ok(serde_json::from_str(&self.stdout).unwrap_or_else(|e| {
                panic!("CLI exit 0 but stdout is not JSON ({e}): {:?}", self.stdout)
            })),
            Some(1) => {
                assert!(
                    self.stdout.trim().is_empty(),
                    "CLI failed but printed on stdout: {:?}",
                    self.stdout
                );
                let line = self.stderr.trim_end();
                assert_eq!(
                    line.lines().count(),
                    1,
                    "CLI error is not one line: {line:?}"
                );
                let (code, message) = line
                    .split_once(": ")
                    .unwrap_or_else(|| panic!("CLI error is not 'CODE: message': {line:?}"));
                Err((code.to_owned(), message.to_owned()))
            }
            other => panic!(
                "CLI exited {other:?}: stdout {:?} stderr {:?}",
                self.stdout, self.stderr
            ),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The environment and the server
// ---------------------------------------------------------------------------------------------

/// A private home for one dev server: its data dir, and the config dir where `dev` writes the
/// client config. Outlives server restarts; removed when dropped.
pub struct DevEnv {
    tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub data_dir: PathBuf,
    pub config_home: PathBuf,
    pub node_id: String,
}

impl Default for DevEnv {
    fn default() -> Self {
        Self::new()
    }
}

impl DevEnv {
    pub fn new() -> Self {
        Self::with_node_id("test-node")
    }

    pub fn with_node_id(node_id: &str) -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("claw-dev-test-")
            .tempdir()
            .expect("temp dir");
        let root = tmp.path().to_owned();
        let data_dir = root.join("data");
        let config_home = root.join("config");
        DevEnv {
            tmp,
            root,
            data_dir,
            config_home,
            node_id: node_id.to_owned(),
        }
    }

    /// A `claw-secrets` command with this environment's config home and no stray settings.
    pub fn command(&self) -> Command {
        let mut cmd = Command::new(BIN);
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        cmd.env("XDG_CONFIG_HOME", &self.config_home)
            .env("XDG_DATA_HOME", self.root.join("xdg-data"))
            .env("HOME", &self.root)
            .stdin(Stdio::null());
        cmd
    }

    /// Runs the CLI with `args` (and extra environment) to completion.
    pub fn cli_env(&self, args: &[&str], envs: &[(&str, &str)]) -> CliOutput {
        let mut cmd = self.command();
        cmd.args(args);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let out = cmd.output().expect("run claw-secrets");
        CliOutput {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    pub fn cli(&self, args: &[&str]) -> CliOutput {
        self.cli_env(args, &[])
    }

    /// `claw-secrets invoke <node> <command> '<params>'`, finding the server through dev.json.
    pub fn invoke_cli(&self, node: &str, command: &str, params: &str) -> CliOutput {
        self.cli(&["invoke", node, command, params])
    }

    /// `claw-secrets token create --data-dir D --workload W --namespace NS`; returns the token.
    pub fn create_token(&self, workload: &str, namespace: &str) -> String {
        let out = self.cli(&[
            "token",
            "create",
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--workload",
            workload,
            "--namespace",
            namespace,
        ]);
        assert_eq!(out.code(), Some(0), "token create failed: {out:?}");
        let token = out.stdout.trim().to_owned();
        assert!(
            !token.is_empty() && !token.contains(char::is_whitespace),
            "{out:?}"
        );
        token
    }

    pub fn audit_log(&self) -> PathBuf {
        self.data_dir.join("audit.log")
    }

    /// `claw-secrets audit verify <path>`.
    pub fn audit_verify(&self, path: &Path) -> CliOutput {
        self.cli(&["audit", "verify", path.to_str().unwrap()])
    }

    /// The audit log's records, parsed.
    pub fn audit_records(&self) -> Vec<Value> {
        let text = std::fs::read_to_string(self.audit_log()).expect("read audit log");
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("audit line {l:?}: {e}")))
            .collect()
    }

    pub fn start(&self) -> DevServer {
        self.start_with(&[])
    }

    /// `claw-secrets dev` for this environment, on a free loopback port, with `extra` args.
    fn dev_command(&self, extra: &[&str]) -> Command {
        let mut cmd = self.command();
        cmd.args([
            "dev",
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            &self.node_id,
        ]);
        cmd.args(extra);
        cmd
    }

    /// Runs `claw-secrets dev` (with `extra` args) expecting it to refuse to start; returns how
    /// it ended. Panics if it is still running after a generous wait.
    pub fn start_refused(&self, extra: &[&str]) -> ServerExit {
        let mut child = self
            .dev_command(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn claw-secrets dev");
        let deadline = Instant::now() + PATIENCE;
        while child.try_wait().expect("try_wait").is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = child.wait_with_output().expect("wait");
                panic!(
                    "claw-secrets dev started although it should have refused:\nstdout: {}\nstderr: {}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let out = child.wait_with_output().expect("wait");
        ServerExit {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            stdout_bytes: out.stdout,
            stderr_bytes: out.stderr,
        }
    }

    /// Starts `claw-secrets dev` on a free loopback port, with extra environment variables, and
    /// waits for its "listening" line.
    pub fn start_with(&self, envs: &[(&str, &str)]) -> DevServer {
        self.start_args(&[], envs)
    }

    /// Like [`DevEnv::start_with`], with extra command-line args.
    pub fn start_args(&self, extra: &[&str], envs: &[(&str, &str)]) -> DevServer {
        let mut cmd = self.dev_command(extra);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        self.start_command(cmd)
    }

    /// Like [`DevEnv::start_args`], the server's open-files limit (soft and hard) set to
    /// `limit` first, as `ulimit -n LIMIT` would.
    #[allow(dead_code)]
    pub fn start_with_open_files_limit(&self, extra: &[&str], limit: u64) -> DevServer {
        use std::os::unix::process::CommandExt;
        let mut cmd = self.dev_command(extra);
        let rlimit = libc::rlimit {
            rlim_cur: limit as libc::rlim_t,
            rlim_max: limit as libc::rlim_t,
        };
        // SAFETY: setrlimit is async-signal-safe, and the closure touches no other state.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setrlimit(libc::RLIMIT_NOFILE, &rlimit) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        self.start_command(cmd)
    }

    /// Like [`DevEnv::start_args`], with the server's umask set to `mask` first.
    #[allow(dead_code)]
    pub fn start_with_umask(&self, extra: &[&str], mask: u32) -> DevServer {
        use std::os::unix::process::CommandExt;
        let mut cmd = self.dev_command(extra);
        // SAFETY: umask is async-signal-safe and cannot fail.
        unsafe {
            cmd.pre_exec(move || {
                libc::umask(mask as libc::mode_t);
                Ok(())
            });
        }
        self.start_command(cmd)
    }

    fn start_command(&self, mut cmd: Command) -> DevServer {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn claw-secrets dev");
        let pid = child.id();
        let stdout_buf = Arc::new(Mutex::new(Vec::new()));
        let stderr_buf = Arc::new(Mutex::new(Vec::new()));
        let (first_line_tx, first_line_rx) = mpsc::channel::<String>();

        let out = child.stdout.take().unwrap();
        let buf = stdout_buf.clone();
        let out_reader = std::thread::spawn(move || {
            let mut reader = BufReader::new(out);
            let mut first = Some(first_line_tx);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        buf.lock().unwrap().extend_from_slice(&line);
                        if let Some(tx) = first.take() {
                            let _ = tx.send(String::from_utf8_lossy(&line).trim_end().to_owned());
                        }
                    }
                }
            }
        });
        let err = child.stderr.take().unwrap();
        let buf = stderr_buf.clone();
        let err_reader = std::thread::spawn(move || {
            let mut err = err;
            let mut chunk = [0u8; 8192];
            loop {
                match err.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.lock().unwrap().extend_from_slice(&chunk[..n]),
                }
            }
        });

        let mut server = DevServer {
            child: Some(child),
            pid,
            port: 0,
            node_id: self.node_id.clone(),
            admin_token: String::new(),
            stdout: stdout_buf,
            stderr: stderr_buf,
            readers: vec![out_reader, err_reader],
        };
        let first = match first_line_rx.recv_timeout(PATIENCE) {
            Ok(line) => line,
            Err(_) => {
                let exit = server.kill9();
                panic!(
                    "claw-secrets dev did not start: {:?}\nstdout: {}\nstderr: {}",
                    exit.status, exit.stdout, exit.stderr
                );
            }
        };
        // claw-secrets dev: node NODE listening on http://127.0.0.1:PORT (https with --tls-cert)
        let expected_prefix = format!("claw-secrets dev: node {} listening on ", self.node_id);
        let port = first
            .strip_prefix(&expected_prefix)
            .and_then(|p| {
                p.strip_prefix("http://127.0.0.1:")
                    .or_else(|| p.strip_prefix("https://127.0.0.1:"))
            })
            .and_then(|p| p.parse::<u16>().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        server.port = port;
        server.admin_token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .expect("admin.token exists once the server listens")
            .trim()
            .to_owned();
        assert!(!server.admin_token.is_empty());
        server
    }
}

/// How a server ended, and everything it printed.
#[derive(Debug)]
pub struct ServerExit {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub stdout_bytes: Vec<u8>,
    pub stderr_bytes: Vec<u8>,
}

/// A running `claw-secrets dev`. Killed (SIGKILL) on drop unless stopped first.
pub struct DevServer {
    child: Option<Child>,
    pub pid: u32,
    pub port: u16,
    pub node_id: String,
    pub admin_token: String,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<JoinHandle<()>>,
}

impl DevServer {
    /// `POST /v1/invoke` with any token (or none); panics if the connection fails.
    pub fn post(&self, token: Option<&str>, body: &[u8]) -> HttpResponse {
        http_invoke(self.port, token, body)
            .unwrap_or_else(|e| panic!("POST /v1/invoke to {}: {e}", self.port))
    }

    /// A full request envelope as the admin.
    pub fn request(&self, envelope: &Value) -> HttpResponse {
        self.post(
            Some(&self.admin_token),
            &serde_json::to_vec(envelope).unwrap(),
        )
    }

    /// `command` with `params` to this node, as `token`, with a fresh request id.
    pub fn call_as(&self, token: Option<&str>, command: &str, params: Value) -> HttpResponse {
        let body = json!({
            "id": next_request_id("c"),
            "nodeId": self.node_id,
            "command": command,
            "params": params,
        });
        self.post(token, &serde_json::to_vec(&body).unwrap())
    }

    /// `command` with `params` to this node as the admin.
    pub fn call(&self, command: &str, params: Value) -> HttpResponse {
        self.call_as(Some(self.admin_token.as_str()), command, params)
    }

    /// What the server printed so far.
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().unwrap()).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap()).into_owned()
    }

    /// Waits until the server has printed `needle` on stdout (or `stderr`); false if it never
    /// does. Output arrives through pipes read by other threads, so a line printed before the
    /// "listening" line may not have been collected yet when the server is first used.
    pub fn wait_for_output(&self, stderr: bool, needle: &str) -> bool {
        let deadline = Instant::now() + PATIENCE;
        loop {
            let text = if stderr {
                self.stderr_text()
            } else {
                self.stdout_text()
            };
            if text.contains(needle) {
                return true;
            }
            if Instant::now() > deadline || self.readers.iter().all(|r| r.is_finished()) {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Sends `signal` and waits for the process to exit.
    pub fn stop_with(mut self, signal: i32) -> ServerExit {
        let pid = self.pid as libc::pid_t;
        // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
        let deadline = Instant::now() + PATIENCE;
        loop {
            let child = self.child.as_mut().unwrap();
            if child.try_wait().expect("try_wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let exit = self.kill9();
                panic!(
                    "server did not stop within {PATIENCE:?} of signal {signal}\nstdout: {}\nstderr: {}",
                    exit.stdout, exit.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.finish()
    }

    /// SIGTERM, as a service manager would.
    pub fn stop(self) -> ServerExit {
        self.stop_with(libc::SIGTERM)
    }

    /// SIGKILL: a crash. Requests in flight are cut off.
    pub fn kill9(&mut self) -> ServerExit {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        self.finish()
    }

    fn finish(&mut self) -> ServerExit {
        let mut child = self.child.take().expect("server still owned");
        let status = child.wait().expect("wait for server");
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
        let stdout_bytes = self.stdout.lock().unwrap().clone();
        let stderr_bytes = self.stderr.lock().unwrap().clone();
        ServerExit {
            status,
            stdout: String::from_utf8_lossy(&stdout_bytes).into_owned(),
            stderr: String::from_utf8_lossy(&stderr_bytes).into_owned(),
            stdout_bytes,
            stderr_bytes,
        }
    }
}

impl Drop for DevServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// `{"secrets":[...]}` or `{"configs":[...]}` → the names, in order.
pub fn names_of(list: &Value, field: &str) -> Vec<String> {
    list[field]
        .as_array()
        .unwrap_or_else(|| panic!("{field} is not an array: {list}"))
        .iter()
        .map(|e| e["name"].as_str().expect("entry name").to_owned())
        .collect()
}

/// Every stored secret (full `secret.get` payload) and config (full `config.get` payload) in
/// the default namespace, keyed by name, read over HTTP as the admin.
pub fn snapshot(server: &DevServer) -> (Vec<Value>, Vec<Value>) {
    let secrets = names_of(&server.call("secret.list", json!({})).payload(), "secrets")
        .into_iter()
        .map(|n| server.call("secret.get", json!({ "name": n })).payload())
        .collect();
    let configs = names_of(&server.call("config.list", json!({})).payload(), "configs")
        .into_iter()
        .map(|n| server.call("config.get", json!({ "name": n })).payload())
        .collect();
    (secrets, configs)
}
