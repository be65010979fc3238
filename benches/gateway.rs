//! `secret.get` through the real OpenClaw gateway (`node.invoke`) next to direct HTTP to the
//! same `claw-secrets dev` node, in one run (docs/architecture.md, "node.invoke through the
//! OpenClaw gateway"):
//!
//!     cargo bench --bench gateway
//!     BENCH_IN_FLIGHT=1,4,16,32 BENCH_SECONDS=20 cargo bench --bench gateway
//!
//! The gateway is `openclaw@2026.9.6` (Node.js), started once for this process by
//! tests/support/openclaw.rs (`hack/openclaw.sh up`; `hack/openclaw.sh install` must have run,
//! or be able to). The node is the real binary (`CARGO_BIN_EXE_claw-secrets`: the release build
//! under `cargo bench`) as a child process: `claw-secrets dev --gateway URL
//! --gateway-setup-code CODE --gateway-principal admin` on a temporary data dir, serving HTTP on
//! 127.0.0.1:0 beside its gateway connection. Once its `/readyz` says `gateway: connected`, one
//! secret with a 1 KiB value is created over HTTP. Then, for each concurrency N, a warm-up and
//! a measured period of closed-loop `secret.get` of that secret:
//!
//! 1. **gateway:** N tasks share one operator WebSocket ([`openclaw::OperatorClient`], a client
//!    of our own, `TCP_NODELAY`); each sends `node.invoke` (`nodeId`, `command`, `params`,
//!    `timeoutMs`, a fresh `idempotencyKey`), waits for its answer, and sends the next. One call
//!    crosses two WebSocket hops each way: operator → gateway (`req node.invoke`), gateway →
//!    node (event `node.invoke.request`), the node's dispatcher (the same one HTTP uses: the
//!    audit record is fdatasync'ed before the answer), node → gateway (`req
//!    node.invoke.result`, acknowledged with a `res`), gateway → operator (`res`).
//! 2. **http:** N keep-alive HTTP/1.1 connections of benches/support/loadgen.rs, `POST
//!    /v1/invoke` with the admin token, as benches/http.rs sends it.
//!
//! Both load generators run in this process on one tokio runtime; the gateway, the node and
//! this process share the machine's cores. Being closed loops, they send less while a server
//! stalls, so tail latencies are a lower bound (coordinated omission), as with wrk.
//!
//! Correctness checks, printed with the figures (and asserted in the smoke pass): every answer
//! is a success whose `data` is `{"value": <the 1 KiB value>}`; the node's audit log grew by
//! exactly one record per answer, every one an allowed `secret.get`; its hash chain verifies at
//! the end. Each run also reports, over the measured window, the CPU of the node, of the
//! gateway (its event loop, worker threads, V8 helper threads and child processes apart) and of
//! this process, and the node's mean audit-append time (from its `/metrics`): where the time
//! goes.
//!
//! Environment:
//! - BENCH_IN_FLIGHT       comma-separated concurrencies, one gateway and one HTTP run each
//!   (default 1,16)
//! - BENCH_SECONDS         measured seconds per run (default 10)
//! - BENCH_WARMUP_SECONDS  warm-up seconds per run, not measured (default 2)
//! - BENCH_CLIENT_THREADS  worker threads of the load generators' runtime (default 1)
//! - BENCH_TMPDIR          where the node's data dir is made (default: the system temp dir)
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it makes 5 requests per task each
//! way at 1 and 2 in flight and checks the answers and the audit log, asserting nothing about
//! time. No secret value is ever printed.

#[path = "../tests/support/random.rs"]
mod random;

#[path = "../tests/support/wait.rs"]
mod wait;

#[path = "../tests/support/openclaw.rs"]
mod openclaw;

#[path = "support/loadgen.rs"]
mod loadgen;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use loadgen::{
    ConnResult, Load, LoadConfig, Phase, clock_ticks_per_second, env_or, load_average, ms,
    request_bytes, system_cpu,
};
use openclaw::{Gateway, OperatorClient};
use wait::PATIENCE;

/// The binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_claw-secrets");
const SECRET_NAME: &str = "bench.secret";
const VALUE_LEN: usize = 1024;
/// The gateway's deadline for each call (`timeoutMs`).
const CALL_TIMEOUT_MS: u64 = 30_000;

/// Environment variables that would make the node find something other than this bench's own
/// gateway and data dir, or change its logging.
const SCRUBBED_ENV: &[&str] = &[
    "CLAW_SECRETS_ADDR",
    "CLAW_SECRETS_TOKEN",
    "CLAW_SECRETS_DATA_DIR",
    "CLAW_SECRETS_LOG",
    "CLAW_SECRETS_TIMEOUT",
    "CLAW_SECRETS_CONNECT_TIMEOUT",
    "CLAW_SECRETS_GATEWAY",
    "CLAW_SECRETS_GATEWAY_TOKEN_FILE",
    "CLAW_SECRETS_GATEWAY_SETUP_CODE",
    "CLAW_SECRETS_GATEWAY_PRINCIPAL",
    "RUST_LOG",
    "KUBECONFIG",
];

/// What every answer's `data` must be.
static EXPECTED_DATA: LazyLock<Value> =
    LazyLock::new(|| json!({ "value": loadgen::bench_value(VALUE_LEN) }));

/// The node's HTTP address and pid, and the gateway's pid, for [`snapshot`] (a plain `fn`).
static NODE_ADDR: OnceLock<SocketAddr> = OnceLock::new();
static NODE_PID: OnceLock<u32> = OnceLock::new();
static GATEWAY_PID: OnceLock<u32> = OnceLock::new();

// ---------------------------------------------------------------------------------------------
// The node under test

/// `claw-secrets dev` as a node of the gateway, a child process; killed when dropped (a
/// panicking bench leaves no node behind), its data dir removed after.
struct Node {
    child: Child,
    addr: SocketAddr,
    /// The id callers name in `node.invoke` (hex SHA-256 of the node's device key).
    id: String,
    token: String,
    audit_path: PathBuf,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Node {
    /// Starts the node with a fresh setup code of `gw`, and waits until it is connected.
    fn start(gw: &Gateway) -> Node {
        let dir = match std::env::var_os("BENCH_TMPDIR") {
            Some(parent) => tempfile::Builder::new()
                .prefix("claw-bench-gateway-")
                .tempdir_in(parent),
            None => tempfile::Builder::new()
                .prefix("claw-bench-gateway-")
                .tempdir(),
        }
        .expect("temp dir");
        let root = dir.path().to_owned();
        let data_dir = root.join("data");
        let stdout = std::fs::File::create(root.join("dev.stdout")).expect("stdout file");
        let stderr = std::fs::File::create(root.join("dev.stderr")).expect("stderr file");
        let mut cmd = Command::new(BIN);
        for k in SCRUBBED_ENV {
            cmd.env_remove(k);
        }
        cmd.env("XDG_CONFIG_HOME", root.join("config"))
            .env("XDG_DATA_HOME", root.join("xdg-data"))
            .env("HOME", &root)
            .args(["dev", "--data-dir"])
            .arg(&data_dir)
            .args(["--listen", "127.0.0.1:0", "--node-id", "bench-node"])
            .args(["--gateway", &gw.url(), "--gateway-principal", "admin"])
            .args(["--gateway-setup-code", &gw.setup_code()])
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        let child = cmd.spawn().expect("spawn claw-secrets dev");
        let mut node = Node {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], 0)),
            id: String::new(),
            token: String::new(),
            audit_path: data_dir.join("audit.log"),
            root,
            _dir: dir,
        };

        // The first line names the address, a later one the node id.
        let (addr, id) = node.wait_for("its start-up lines", |node| {
            let out = std::fs::read_to_string(node.root.join("dev.stdout")).unwrap_or_default();
            let addr = out
                .lines()
                .next()
                .and_then(|l| l.split_once(" listening on http://"))
                .and_then(|(_, a)| a.trim().parse::<SocketAddr>().ok())?;
            let id = out
                .lines()
                .find_map(|l| l.split_once(" as node "))
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .filter(|id| id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()))?;
            Some((addr, id.to_owned()))
        });
        node.addr = addr;
        node.id = id;
        node.token = std::fs::read_to_string(data_dir.join("admin.token"))
            .expect("DATA_DIR/admin.token")
            .trim()
            .to_owned();
        node.wait_for("`gateway: connected` in /readyz", |node| {
            http_get(node.addr, "/readyz")
                .ok()
                .filter(|(_, body)| body.contains("gateway: connected"))
        });
        node
    }

    /// Polls `check` every 20 ms until it gives something; panics (with the node's stderr)
    /// when the node exits or after [`PATIENCE`].
    fn wait_for<T>(&mut self, what: &str, check: impl Fn(&Node) -> Option<T>) -> T {
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(v) = check(self) {
                return v;
            }
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!(
                    "claw-secrets dev exited ({status}) before {what}:\n{}\n{}",
                    self.output("dev.stdout"),
                    self.output("dev.stderr")
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} from claw-secrets dev within {PATIENCE:?}:\n{}\n{}",
                self.output("dev.stdout"),
                self.output("dev.stderr")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn output(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.root.join(name)).unwrap_or_default();
        format!("==> {name} <==\n{text}")
    }

    /// SIGTERM, and SIGKILL if it has not stopped within 10 s.
    fn stop(mut self) {
        let pid = i32::try_from(self.child.id()).expect("pid");
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(pid, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.child.try_wait().expect("try_wait").is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Drop kills it.
    }
}

/// `GET path` on a fresh connection (`Connection: close`): status and body.
fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no end of headers"))?;
    let status = head
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other("no status line"))?;
    Ok((status, body.to_owned()))
}

fn create_secret(client: &tokio::runtime::Runtime, node: &Node) {
    let (status, answer) =
        loadgen::create_bench_secret(client, node.addr, &node.token, SECRET_NAME, VALUE_LEN);
    assert!(
        loadgen::answer_ok(status, &answer),
        "secret.create failed: HTTP {status}: {}",
        String::from_utf8_lossy(&answer)
    );
}

// ---------------------------------------------------------------------------------------------
// The two paths

/// Which way a run reaches the node.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Route {
    Gateway,
    Http,
}

impl Route {
    fn name(self) -> &'static str {
        match self {
            Route::Gateway => "gateway",
            Route::Http => "http",
        }
    }
}

/// An HTTP answer is right: 200, `"ok":true`, and the value.
fn http_answer_right(status: u16, body: &[u8]) -> bool {
    status == 200
        && serde_json::from_slice::<Value>(body)
            .is_ok_and(|v| v["ok"] == json!(true) && v["payload"]["data"] == *EXPECTED_DATA)
}

/// A fresh idempotency key for every gateway call (the gateway and the node may dedupe by it).
fn next_key() -> String {
    static PREFIX: LazyLock<String> = LazyLock::new(|| random::random_hex(4));
    static N: AtomicU64 = AtomicU64::new(0);
    format!("bench-{}-{}", *PREFIX, N.fetch_add(1, Ordering::Relaxed))
}

/// One task's closed loop through the gateway: `node.invoke` of `secret.get`, wait for the
/// answer, check it, repeat. Answers are counted like loadgen's: an answer the gateway or the
/// node gave (even an error) is an answer; a call the client gave up on (connection lost, no
/// answer in time) is lost.
async fn gateway_drive(
    operator: Arc<OperatorClient>,
    node_id: Arc<str>,
    phase: Arc<Phase>,
) -> ConnResult {
    let mut r = ConnResult::default();
    let mut sent = 0u64;
    loop {
        if Instant::now() >= phase.end || phase.max_requests.is_some_and(|m| sent >= m) {
            break;
        }
        sent += 1;
        let params = json!({
            "nodeId": &*node_id,
            "command": "secret.get",
            "params": { "name": SECRET_NAME },
            "timeoutMs": CALL_TIMEOUT_MS,
            "idempotencyKey": next_key(),
        });
        let start = Instant::now();
        let reply = operator.call("node.invoke", params).await;
        let took = start.elapsed();
        match reply {
            Ok(payload) => {
                r.answers += 1;
                if start >= phase.warm_end {
                    r.latencies.push(took.as_nanos() as u64);
                }
                if payload["payload"]["data"] != *EXPECTED_DATA {
                    r.errors += 1;
                    // Never the payload itself: it may hold the value.
                    r.first_error.get_or_insert_with(|| {
                        "an answer without the expected data (not shown)".to_owned()
                    });
                }
            }
            Err(error) => {
                let code = error["code"].as_str().unwrap_or_default();
                if code.starts_with("CLIENT_") {
                    r.lost += 1;
                } else {
                    r.answers += 1;
                }
                r.errors += 1;
                r.first_error.get_or_insert_with(|| error.to_string());
            }
        }
    }
    r
}

/// `cfg.connections` closed loops through the gateway on `client`, sharing `operator`; as
/// [`loadgen::load`], with `snapshot()` taken at both edges of the measured window.
fn gateway_load<S: Send + 'static>(
    client: &tokio::runtime::Runtime,
    operator: &Arc<OperatorClient>,
    node_id: &str,
    cfg: &LoadConfig,
    snapshot: fn() -> S,
) -> Load<S> {
    let node_id: Arc<str> = node_id.into();
    loadgen::run_loops(client, cfg, snapshot, |phase| {
        gateway_drive(operator.clone(), node_id.clone(), phase)
    })
}

// ---------------------------------------------------------------------------------------------
// Where the time goes: CPU per process, the node's audit appends, the audit log

/// CPU ticks of every process (with its parent, to find the gateway's children) and of each
/// thread of the gateway, the machine's busy time, and the node's audit-append histogram (sum
/// in seconds, count).
struct Snapshot {
    procs: BTreeMap<u32, (String, u32, u64)>,
    gateway_threads: BTreeMap<u32, (String, u64)>,
    system: (u64, u64),
    audit_append: Option<(f64, u64)>,
}

fn snapshot() -> Snapshot {
    let mut procs = BTreeMap::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(p.path().join("stat")) else {
            continue;
        };
        let Some((comm, ticks)) = loadgen::parse_stat(&stat) else {
            continue;
        };
        // After "(comm) ": state, then the parent's pid.
        let ppid = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        procs.insert(pid, (comm, ppid, ticks));
    }
    let gateway_threads = GATEWAY_PID.get().map_or_else(BTreeMap::new, |pid| {
        std::fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|t| {
                let tid = t.file_name().to_str()?.parse::<u32>().ok()?;
                let stat = std::fs::read_to_string(t.path().join("stat")).ok()?;
                Some((tid, loadgen::parse_stat(&stat)?))
            })
            .collect()
    });
    Snapshot {
        procs,
        gateway_threads,
        system: system_cpu(),
        audit_append: NODE_ADDR.get().and_then(|addr| audit_append(*addr)),
    }
}

/// `claw_secrets_audit_append_seconds` (sum, count) from the node's `/metrics`.
fn audit_append(addr: SocketAddr) -> Option<(f64, u64)> {
    let (_, text) = http_get(addr, "/metrics").ok()?;
    let value = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some((
        value("claw_secrets_audit_append_seconds_sum")?,
        value("claw_secrets_audit_append_seconds_count")? as u64,
    ))
}

/// The audit log read as it grows: records so far, and how many are allowed `secret.get`s.
struct AuditTail {
    path: PathBuf,
    offset: u64,
    records: u64,
    gets: u64,
}

impl AuditTail {
    fn new(path: &Path) -> AuditTail {
        let mut tail = AuditTail {
            path: path.to_owned(),
            offset: 0,
            records: 0,
            gets: 0,
        };
        tail.update();
        tail
    }

    /// Reads the complete lines added since the last call.
    fn update(&mut self) {
        use std::io::Seek;
        let Ok(mut file) = std::fs::File::open(&self.path) else {
            return;
        };
        file.seek(std::io::SeekFrom::Start(self.offset))
            .expect("seek in the audit log");
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).expect("audit log readable");
        let complete = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        for line in bytes[..complete]
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
        {
            self.records += 1;
            if loadgen::find(line, br#""command":"secret.get""#).is_some()
                && loadgen::find(line, br#""decision":"allow""#).is_some()
            {
                self.gets += 1;
            }
        }
        self.offset += complete as u64;
    }

    /// (records, gets) once the log has stopped growing: `expected` more records than `since`
    /// held for 300 ms, or no change for 2 s (at most 10 s).
    fn settle(&mut self, since: (u64, u64), expected: u64) -> (u64, u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = (self.records, self.gets);
        let mut stable_since = Instant::now();
        loop {
            std::thread::sleep(Duration::from_millis(100));
            self.update();
            let now = (self.records, self.gets);
            if now != last {
                last = now;
                stable_since = Instant::now();
            }
            let stable = stable_since.elapsed();
            if (now.0 - since.0 == expected && stable >= Duration::from_millis(300))
                || stable >= Duration::from_secs(2)
                || Instant::now() >= deadline
            {
                return (now.0 - since.0, now.1 - since.1);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One run

struct RunConfig {
    in_flight: usize,
    warmup: Duration,
    measured: Duration,
    max_requests: Option<u64>,
    verbose: bool,
}

struct RunResult {
    route: Route,
    in_flight: usize,
    /// Measured requests (after the warm-up).
    requests: u64,
    /// Answers, warm-up included.
    answers: u64,
    rps: f64,
    p50: u64,
    p99: u64,
    errors: u64,
    lost: u64,
    first_error: Option<String>,
    audit_match: bool,
}

fn run(
    client: &tokio::runtime::Runtime,
    node: &Node,
    operator: &Arc<OperatorClient>,
    audit: &mut AuditTail,
    route: Route,
    cfg: &RunConfig,
) -> RunResult {
    let before = (audit.records, audit.gets);
    let load_cfg = LoadConfig {
        connections: cfg.in_flight,
        warmup: cfg.warmup,
        measured: cfg.measured,
        max_requests: cfg.max_requests,
    };
    let load = match route {
        Route::Gateway => gateway_load(client, operator, &node.id, &load_cfg, snapshot),
        Route::Http => {
            let req = request_bytes(
                node.addr,
                &node.token,
                &loadgen::secret_get_body(SECRET_NAME),
            );
            loadgen::load(
                client,
                &node.addr,
                req,
                http_answer_right,
                &load_cfg,
                snapshot,
            )
        }
    };
    let (lat, answers, errors, lost, first_error) = loadgen::totals(&load);

    // Every answer went out after its record was durable; a call the gateway gave up on may
    // still be recorded after it: wait for the log to stop growing.
    let (records, gets) = audit.settle(before, answers);
    let audit_match = lost == 0 && records == answers && gets + errors == answers;

    if cfg.verbose {
        println!(
            "\n== {}, {} in flight: {:.1} s warm-up, {:.1} s measured ==",
            route.name(),
            cfg.in_flight,
            cfg.warmup.as_secs_f64(),
            load.measured_wall.as_secs_f64()
        );
        println!(
            "requests/s      {:.0}  ({} measured requests)",
            lat.rps, lat.n
        );
        println!(
            "latency         mean {}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(lat.mean),
            ms(lat.p50),
            ms(lat.p90),
            ms(lat.p99),
            ms(lat.p999),
            ms(lat.max)
        );
        println!(
            "errors          {errors} ({lost} lost){}",
            first_error
                .as_deref()
                .map(|e| format!(" (first: {})", &e[..e.len().min(300)]))
                .unwrap_or_default()
        );
        println!(
            "audit           {records} records ({gets} allowed secret.get) for {answers} answers \
             incl. warm-up: {}",
            if audit_match {
                "exactly one per answer"
            } else {
                "MISMATCH"
            }
        );
        report_window(&load.window, lat.n);
    }
    RunResult {
        route,
        in_flight: cfg.in_flight,
        requests: lat.n,
        answers,
        rps: lat.rps,
        p50: lat.p50,
        p99: lat.p99,
        errors,
        lost,
        first_error,
        audit_match,
    }
}

/// CPU per process over the measured window, per second and per request, and the node's mean
/// audit append.
fn report_window(window: &((Instant, Snapshot), (Instant, Snapshot)), requests: u64) {
    let ((w0, s0), (w1, s1)) = window;
    let secs = (*w1 - *w0).as_secs_f64();
    let hz = clock_ticks_per_second();
    let n = requests.max(1) as f64;
    let me = std::process::id();
    let node = NODE_PID.get().copied();
    let gateway = GATEWAY_PID.get().copied();
    // The gateway's children (its workers) count as the gateway.
    let of_gateway = |mut pid: u32| {
        for _ in 0..16 {
            if Some(pid) == gateway {
                return true;
            }
            match s1.procs.get(&pid) {
                Some((_, ppid, _)) if *ppid > 1 => pid = *ppid,
                _ => return false,
            }
        }
        false
    };
    let (mut node_cpu, mut gateway_cpu, mut gateway_children, mut bench_cpu) = (0.0, 0.0, 0.0, 0.0);
    let mut others: Vec<(f64, String)> = Vec::new();
    for (pid, (comm, _, t1)) in &s1.procs {
        let t0 = s0.procs.get(pid).map_or(0, |(_, _, t)| *t);
        let cpu = t1.saturating_sub(t0) as f64 / hz;
        if Some(*pid) == node {
            node_cpu += cpu;
        } else if *pid == me {
            bench_cpu += cpu;
        } else if of_gateway(*pid) {
            gateway_cpu += cpu;
            if Some(*pid) != gateway {
                gateway_children += cpu;
            }
        } else if cpu > 0.0 {
            others.push((cpu / secs, comm.clone()));
        }
    }
    // The gateway's threads: Node.js runs JavaScript on its main thread (the event loop);
    // `WorkerThread`s are worker_threads, `V8…` threads the garbage collector and compiler.
    let mut threads: BTreeMap<&str, f64> = BTreeMap::new();
    for (tid, (comm, t1)) in &s1.gateway_threads {
        let t0 = s0.gateway_threads.get(tid).map_or(0, |(_, t)| *t);
        let group = if Some(*tid) == gateway {
            "event loop (main thread)"
        } else if comm == "WorkerThread" {
            "worker threads"
        } else if comm.starts_with("V8") {
            "V8 helpers (GC, compiler)"
        } else {
            "other threads"
        };
        *threads.entry(group).or_default() += t1.saturating_sub(t0) as f64 / hz;
    }
    others.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
    let others_total: f64 = others.iter().map(|o| o.0).sum();
    let part = |name: &str, cpu: f64| {
        format!(
            "{name} {:.2} cores ({:.0} us/req)",
            cpu / secs,
            cpu * 1e6 / n
        )
    };
    println!(
        "CPU             {}, {}, {}",
        part("node", node_cpu),
        part("gateway", gateway_cpu),
        part("this process", bench_cpu)
    );
    let mut gateway_parts: Vec<String> = threads
        .iter()
        .map(|(group, cpu)| part(group, *cpu))
        .collect();
    gateway_parts.push(part("child processes", gateway_children));
    println!("gateway CPU     {}", gateway_parts.join(", "));
    let busiest: Vec<String> = others
        .iter()
        .take(3)
        .map(|(c, name)| format!("{name} {c:.2}"))
        .collect();
    let (busy, total) = (s1.system.0 - s0.system.0, s1.system.1 - s0.system.1);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "machine         {:.0}% busy of {cores} cores; other processes {others_total:.2} cores \
         (busiest: {}); load average now {}",
        if total > 0 {
            100.0 * busy as f64 / total as f64
        } else {
            0.0
        },
        busiest.join(", "),
        load_average()
    );
    if let (Some((sum0, count0)), Some((sum1, count1))) = (s0.audit_append, s1.audit_append) {
        let appends = count1.saturating_sub(count0);
        if appends > 0 {
            println!(
                "audit append    mean {} in the node (record handed over until fdatasync'ed, \
                 {appends} in the window)",
                ms(((sum1 - sum0) / appends as f64 * 1e9) as u64)
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------

fn in_flight_counts(default: &str) -> Vec<usize> {
    std::env::var("BENCH_IN_FLIGHT")
        .unwrap_or_else(|_| default.to_owned())
        .split(',')
        .map(|s| {
            s.trim()
                .parse::<usize>()
                .expect("BENCH_IN_FLIGHT is a comma-separated list of numbers")
                .max(1)
        })
        .collect()
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let client_threads = env_or("BENCH_CLIENT_THREADS", 1usize).max(1);

    let gw = openclaw::gateway();
    if let Some(pid) = std::fs::read_to_string(gw.dir().join("gateway.pid"))
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
    {
        let _ = GATEWAY_PID.set(pid);
    }
    let node = Node::start(gw);
    let _ = NODE_ADDR.set(node.addr);
    let _ = NODE_PID.set(node.child.id());

    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");
    create_secret(&client, &node);
    let operator = Arc::new(client.block_on(OperatorClient::connect(gw)));
    let mut audit = AuditTail::new(&node.audit_path);

    if !bench {
        // Smoke run: a few requests each way at 1 and 2 in flight; correctness only, never time.
        for in_flight in [1, 2] {
            for route in [Route::Gateway, Route::Http] {
                let cfg = RunConfig {
                    in_flight,
                    warmup: Duration::ZERO,
                    measured: PATIENCE,
                    max_requests: Some(5),
                    verbose: false,
                };
                let r = run(&client, &node, &operator, &mut audit, route, &cfg);
                assert_eq!(
                    (r.errors, r.lost),
                    (0, 0),
                    "{} at {in_flight} in flight: errors (first: {:?})",
                    route.name(),
                    r.first_error
                );
                assert_eq!(r.answers, 5 * in_flight as u64, "{}", route.name());
                assert!(
                    r.audit_match,
                    "{} at {in_flight} in flight: the audit log does not hold one allowed \
                     secret.get per answer",
                    route.name()
                );
            }
        }
        let verified = claw_secrets::audit::verify(&node.audit_path).expect("audit chain");
        println!(
            "gateway bench: smoke run ok ({} audit records; run `cargo bench --bench gateway` to \
             measure)",
            verified.records
        );
        drop(operator);
        node.stop();
        return;
    }

    let in_flight = in_flight_counts("1,16");
    let measured = Duration::from_secs_f64(env_or("BENCH_SECONDS", 10.0));
    let warmup = Duration::from_secs_f64(env_or("BENCH_WARMUP_SECONDS", 2.0));
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "gateway bench: secret.get of a {VALUE_LEN}-byte secret, every read audited (fdatasync, \
         group commit) to {}",
        node.audit_path.display()
    );
    println!(
        "node: {BIN} dev, HTTP on {}, gateway node {}",
        node.addr, node.id
    );
    println!(
        "gateway: openclaw on {} (pid {}); load generators: {client_threads} tokio worker \
         thread(s) in this process; {cores} cores shared by all three",
        gw.url(),
        GATEWAY_PID
            .get()
            .map_or_else(|| "?".to_owned(), u32::to_string)
    );
    println!("load average    {} (before the runs)", load_average());

    let mut summary = Vec::new();
    for &n in &in_flight {
        for route in [Route::Gateway, Route::Http] {
            let cfg = RunConfig {
                in_flight: n,
                warmup,
                measured,
                max_requests: None,
                verbose: true,
            };
            summary.push(run(&client, &node, &operator, &mut audit, route, &cfg));
        }
    }
    match claw_secrets::audit::verify(&node.audit_path) {
        Ok(r) => println!("\naudit chain     verifies: {} records", r.records),
        Err(e) => println!("\naudit chain     BROKEN: {e}"),
    }

    println!("\nsummary");
    println!(
        "path      in flight  requests  req/s     p50        p99        errors  audit==answers"
    );
    for r in &summary {
        println!(
            "{:<9} {:<10} {:<9} {:<9.0} {:<10} {:<10} {:<7} {}",
            r.route.name(),
            r.in_flight,
            r.requests,
            r.rps,
            ms(r.p50),
            ms(r.p99),
            r.errors,
            if r.audit_match { "yes" } else { "NO" }
        );
    }
    println!("\ngateway/HTTP  in flight  req/s    p50      p99");
    for &n in &in_flight {
        let find = |p| summary.iter().find(|r| r.route == p && r.in_flight == n);
        if let (Some(g), Some(h)) = (find(Route::Gateway), find(Route::Http)) {
            let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
            println!(
                "              {:<10} {:<8.3} {:<8.1} {:.1}",
                n,
                g.rps / h.rps.max(f64::MIN_POSITIVE),
                ratio(g.p50, h.p50),
                ratio(g.p99, h.p99)
            );
        }
    }
    drop(operator);
    node.stop();
}
