//! `secret.get` through the HTTP adapter with every read audited (DESIGN.md "Targets":
//! at least 20,000 requests/s and p99 at most 2 ms; keep-alive, loopback, 2 cores), or
//! `secret.rotate` (every write audited, then committed to the store).
//!
//!     cargo bench --bench http
//!     BENCH_CONNECTIONS=24 BENCH_SECONDS=30 cargo bench --bench http
//!     BENCH_COMMAND=rotate BENCH_CONNECTIONS=1,16 cargo bench --bench http
//!
//! The real server runs in-process: a temporary data dir, `Store`, the dev-mode seams
//! (`TokenAuthorizer` with an admin token, `StoreRepository`), the `CommandCore` and
//! `Dispatcher` with the real on-disk `AuditLog` (every `secret.get` is
//! fdatasync'ed before it is answered, group-committed), served by `claw_secrets::invoke::serve`
//! on 127.0.0.1:0 in its own tokio runtime. One secret with a 1 KiB value is created, then N
//! keep-alive HTTP/1.1 connections each run a closed request/response loop (no pipelining)
//! of `secret.get` for a warm-up period and then for a fixed, measured duration. Each
//! request's latency is recorded. The load generator is raw tokio `TcpStream`s in a second
//! runtime in the same process: client and server share the machine's cores. Being a closed
//! loop, it sends less while the server stalls, so its tail latencies are a lower bound
//! (coordinated omission), as with wrk.
//!
//! Every run is made twice, in one process against one server and one store: over plain HTTP
//! and over HTTPS (the same server on a second port with a certificate of its own, TLS 1.3,
//! the client verifying it), so the cost of TLS is read off one table (issue 18).
//!
//! Correctness checks printed with the figures: every answer is HTTP 200 with `"ok":true`,
//! the audit log grew by exactly one record per answer, and its hash chain verifies.
//!
//! Environment:
//! - BENCH_COMMAND         `get` (default) or `rotate`: every connection rotates the one bench
//!   secret to the same new 1 KiB value, so writes contend for it as concurrent rotations of
//!   one secret do
//! - BENCH_CONNECTIONS     comma-separated connection counts, one run each (default
//!   1,8,16,24,32,64: the target is a throughput and a latency at one operating point, so the
//!   default shows where the knee is rather than one point)
//! - BENCH_SECONDS         measured seconds per run (default 10)
//! - BENCH_WARMUP_SECONDS  warm-up seconds per run, not measured (default 3; the tokens file
//!   is re-read on every request for 2 s after it changes, and it was just written)
//! - BENCH_SERVER_THREADS  server runtime worker threads (default: available cores)
//! - BENCH_CLIENT_THREADS  load-generator worker threads (default 1)
//! - BENCH_TMPDIR          where the in-process server's data dir is made (default: the system
//!   temp dir, on disk here; /dev/shm shows the figures without the cost of fdatasync)
//! - BENCH_TRANSPORTS      `http,https` (default), `http` or `https`
//! - BENCH_ADDR + BENCH_DATA_DIR  drive an external `claw-secrets dev` (plain HTTP only) (listening on
//!   BENCH_ADDR, with BENCH_DATA_DIR as its data dir: admin.token and audit.log are read from
//!   there) instead of the in-process server.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it makes a few requests on two
//! connections and checks the answers and the audit count, asserting nothing about time.

#[path = "support/loadgen.rs"]
mod loadgen;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use claw_secrets::audit::AuditLog;
use claw_secrets::backends::local::tokens::{TokenEntry, TokenStore, add_token};
use claw_secrets::backends::local::{StoreRepository, TokenAuthorizer};
use claw_secrets::crypto::{Keyring, SharedKeyring};
use claw_secrets::invoke::{CommandCore, Dispatcher};
use claw_secrets::store::Store;
use loadgen::{
    LoadConfig, Target, Tls, answer_ok, audit_counts, clock_ticks_per_second, env_or, load_average,
    ms, parse_stat, percentile, process_snapshot, request_bytes, system_cpu,
};

const SECRET_NAME: &str = "bench.secret";
const VALUE_LEN: usize = 1024;

// ---------------------------------------------------------------------------------------------
// The server under test

struct Server {
    addr: SocketAddr,
    /// The same server over HTTPS (in-process only).
    tls: Option<Tls>,
    token: String,
    audit_path: PathBuf,
    /// Stops the in-process server (None for an external one).
    shutdown: Option<(
        tokio::sync::oneshot::Sender<()>,
        std::thread::JoinHandle<()>,
    )>,
    _data_dir: Option<tempfile::TempDir>,
}

fn start_in_process(server_threads: usize) -> Server {
    // BENCH_TMPDIR=/dev/shm puts the store and audit log on tmpfs, where fdatasync costs
    // nothing: the difference to a disk run is what durability costs.
    let dir = match std::env::var_os("BENCH_TMPDIR") {
        Some(parent) => tempfile::tempdir_in(parent),
        None => tempfile::tempdir(),
    }
    .expect("temp dir");
    let data_dir = dir.path().to_owned();
    let node_id = "bench-node";
    let tokens_path = data_dir.join("tokens.json");
    let token = add_token(
        &tokens_path,
        TokenEntry {
            sha256: String::new(),
            subject: "admin".to_owned(),
            namespace: None,
            workload: None,
            admin: true,
        },
    )
    .expect("admin token");
    let tokens = TokenStore::open(&tokens_path).expect("tokens");
    let audit_path = data_dir.join("audit.log");
    let (audit, _) = AuditLog::open(&audit_path, node_id).expect("audit log");
    let keys = SharedKeyring::new(Keyring::generate().expect("keyring"));
    let (store, _) = Store::open(&data_dir, keys.clone(), Default::default()).expect("store");
    let core = CommandCore::new(
        TokenAuthorizer::new(Arc::new(tokens)),
        StoreRepository::new(Arc::new(store)),
        audit,
        node_id.to_owned(),
        keys,
    );
    let dispatcher = Arc::new(Dispatcher::new(core));

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(server_threads)
        .thread_name("bench-server")
        .enable_all()
        .build()
        .expect("server runtime");
    let bind = || {
        runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind")
    };
    let (listener, tls_listener) = (bind(), bind());
    let addr = listener.local_addr().expect("local addr");
    let tls_addr = tls_listener.local_addr().expect("local addr");
    let (cert, tls) = bench_certificate(tls_addr);
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("bench-srv-main".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                let limits = claw_secrets::invoke::HttpLimits::default();
                let (stop, stopped) = tokio::sync::watch::channel(false);
                let until_stopped = |mut stopped: tokio::sync::watch::Receiver<bool>| async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                let plain = claw_secrets::invoke::serve(
                    listener,
                    dispatcher.clone(),
                    limits,
                    None,
                    until_stopped(stopped.clone()),
                );
                let https = claw_secrets::invoke::serve(
                    tls_listener,
                    dispatcher,
                    limits,
                    Some(cert),
                    until_stopped(stopped),
                );
                let signal = async move {
                    let _ = stop_rx.await;
                    let _ = stop.send(true);
                };
                let (a, b, ()) = tokio::join!(plain, https, signal);
                a.and(b).expect("server");
            });
        })
        .expect("server thread");
    Server {
        addr,
        tls: Some(tls),
        token: token.as_str().to_owned(),
        audit_path,
        shutdown: Some((stop_tx, thread)),
        _data_dir: Some(dir),
    }
}

/// A self-signed serving certificate for `addr`'s IP, and a client that trusts only it.
fn bench_certificate(addr: SocketAddr) -> (Arc<claw_secrets::tls::ServingCert>, Tls) {
    let key = rcgen::KeyPair::generate().expect("key");
    let params = rcgen::CertificateParams::new(vec![addr.ip().to_string()]).expect("params");
    let cert = params.self_signed(&key).expect("certificate");
    let served = claw_secrets::tls::certified_key(
        cert.pem().as_bytes(),
        key.serialize_pem().as_bytes(),
        "the bench certificate",
    )
    .expect("certified key");
    let client = claw_secrets::tls::client_config(cert.pem().as_bytes(), "the bench certificate")
        .expect("client config");
    let mut client = (*client).clone();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    (
        claw_secrets::tls::ServingCert::new(served),
        Tls {
            addr,
            name: tokio_rustls::rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        },
    )
}

fn external(addr: &str, data_dir: &Path) -> Server {
    let token = std::fs::read_to_string(data_dir.join("admin.token"))
        .expect("BENCH_DATA_DIR/admin.token is readable");
    Server {
        addr: addr.parse().expect("BENCH_ADDR is host:port"),
        tls: None,
        token: token.trim().to_owned(),
        audit_path: data_dir.join("audit.log"),
        shutdown: None,
        _data_dir: None,
    }
}

impl Server {
    fn stop(self) {
        if let Some((tx, thread)) = self.shutdown {
            let _ = tx.send(());
            thread.join().expect("server thread");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring the machine: CPU time per thread group, system-wide busy time, audit syncs

/// CPU ticks (user + system) per thread name, and the audit writer's write syscalls.
#[derive(Default, Clone)]
struct ThreadSnapshot {
    ticks: BTreeMap<String, u64>,
    audit_writes: u64,
}

fn thread_snapshot() -> ThreadSnapshot {
    let mut snap = ThreadSnapshot::default();
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return snap;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let Some((comm, ticks)) = std::fs::read_to_string(dir.join("stat"))
            .ok()
            .and_then(|s| parse_stat(&s))
        else {
            continue;
        };
        if comm == "audit-writer" {
            // One write(2) per group commit: the batch is written with one write_all, then
            // fdatasync'ed.
            if let Ok(io) = std::fs::read_to_string(dir.join("io")) {
                snap.audit_writes += io
                    .lines()
                    .find_map(|l| l.strip_prefix("syscw: "))
                    .and_then(|v| v.trim().parse::<u64>().ok())
                    .unwrap_or(0);
            }
        }
        let group = if comm.starts_with("bench-server") {
            "server runtime"
        } else if comm.starts_with("bench-client") {
            "load generator"
        } else if comm == "audit-writer" {
            "audit writer"
        } else {
            "other threads"
        };
        *snap.ticks.entry(group.to_owned()).or_default() += ticks;
    }
    snap
}

/// What the disk under the audit log gives: 400-byte appends, each followed by fdatasync, for
/// one second (nothing else of the server is running). One group commit costs about this.
fn fdatasync_probe(dir: &Path) {
    use std::io::Write;
    let probe = tempfile::tempdir_in(dir).expect("probe dir");
    let mut file = std::fs::File::create(probe.path().join("probe")).expect("probe file");
    let record = [b'x'; 400];
    let mut lat = Vec::new();
    let until = Instant::now() + Duration::from_secs(1);
    while Instant::now() < until {
        let t = Instant::now();
        file.write_all(&record).expect("probe write");
        file.sync_data().expect("probe fdatasync");
        lat.push(t.elapsed().as_nanos() as u64);
    }
    lat.sort_unstable();
    let mean = lat.iter().sum::<u64>() / lat.len() as u64;
    println!(
        "disk            400-byte append + fdatasync, alone: {:.0}/s, mean {}, p50 {}, p99 {}",
        lat.len() as f64,
        ms(mean),
        ms(percentile(&lat, 0.5)),
        ms(percentile(&lat, 0.99)),
    );
}

// ---------------------------------------------------------------------------------------------

struct RunConfig {
    connections: usize,
    warmup: Duration,
    measured: Duration,
    max_requests: Option<u64>,
    verbose: bool,
}

struct RunResult {
    transport: &'static str,
    connections: usize,
    rps: f64,
    p50: u64,
    p99: u64,
    errors: u64,
    audit_match: bool,
    /// CPU other processes used during the measured window: a disturbed run shows here.
    other_cores: f64,
}

/// What the bench sends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Get,
    Rotate,
}

impl Workload {
    fn from_env() -> Workload {
        match std::env::var("BENCH_COMMAND").as_deref() {
            Err(_) | Ok("get") => Workload::Get,
            Ok("rotate") => Workload::Rotate,
            Ok(other) => panic!("BENCH_COMMAND must be get or rotate, not {other:?}"),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::Get => "secret.get",
            Workload::Rotate => "secret.rotate",
        }
    }

    fn body(self) -> String {
        match self {
            Workload::Get => loadgen::secret_get_body(SECRET_NAME),
            Workload::Rotate => format!(
                r#"{{"nodeId":"local","command":"secret.rotate","params":{{"name":"{SECRET_NAME}","newData":{{"value":"{}"}}}}}}"#,
                loadgen::bench_value(VALUE_LEN)
            ),
        }
    }
}

fn run<T: Target>(
    client: &tokio::runtime::Runtime,
    server: &Server,
    (transport, target): (&'static str, &T),
    workload: Workload,
    cfg: &RunConfig,
) -> RunResult {
    let req = request_bytes(server.addr, &server.token, &workload.body());
    let (audit_before, gets_before) = audit_counts(&server.audit_path);

    let result = loadgen::load(
        client,
        target,
        req,
        answer_ok,
        &LoadConfig {
            connections: cfg.connections,
            warmup: cfg.warmup,
            measured: cfg.measured,
            max_requests: cfg.max_requests,
        },
        // Snapshots at the edges of the measured window.
        || (thread_snapshot(), system_cpu(), process_snapshot()),
    );
    let measured_wall = result.measured_wall;
    let (lat, answers, errors, lost, first_error) = loadgen::totals(&result);
    let ((w0, (th0, sys0, pr0)), (w1, (th1, sys1, pr1))) = result.window;
    let loadgen::Latencies {
        n,
        rps,
        mean,
        p50,
        p90,
        p99,
        p999,
        max,
    } = lat;

    // Every answer was sent only after its audit record was fdatasync'ed, so by now the log
    // holds all of them. A write is recorded once or twice (intent, then commit, since the
    // command core: the count is checked as at least one).
    let (audit_after, gets_after) = audit_counts(&server.audit_path);
    let audit_delta = audit_after - audit_before;
    let gets_delta = gets_after - gets_before;
    let audit_match = lost == 0
        && match workload {
            Workload::Get => audit_delta == answers && gets_delta == answers - errors,
            Workload::Rotate => audit_delta >= answers,
        };

    let mut other_cores = 0.0;
    if cfg.verbose {
        let secs = (w1 - w0).as_secs_f64();
        let hz = clock_ticks_per_second();
        println!(
            "\n== {transport}, {} keep-alive connections: {:.1} s warm-up, {:.1} s measured ==",
            cfg.connections,
            cfg.warmup.as_secs_f64(),
            measured_wall.as_secs_f64()
        );
        println!("requests/s      {rps:.0}  ({n} measured requests)");
        println!(
            "latency         mean {}  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(mean),
            ms(p50),
            ms(p90),
            ms(p99),
            ms(p999),
            ms(max)
        );
        println!(
            "errors          {errors}{}",
            first_error
                .as_deref()
                .map(|e| format!(" (first: {})", &e[..e.len().min(300)]))
                .unwrap_or_default()
        );
        println!(
            "audit           {audit_delta} records written for {answers} answers \
             ({gets_delta} allowed secret.get) incl. warm-up: {}",
            match (audit_match, workload) {
                (true, Workload::Get) => "exactly one per answer",
                (true, Workload::Rotate) => "at least one per answer",
                (false, _) => "MISMATCH",
            }
        );
        let syncs = th1.audit_writes.saturating_sub(th0.audit_writes);
        if syncs > 0 {
            println!(
                "group commits   {syncs} in the window ({:.0}/s), {:.1} records per fdatasync on average",
                syncs as f64 / secs,
                n as f64 / syncs as f64
            );
        }
        let (busy, total) = (sys1.0 - sys0.0, sys1.1 - sys0.1);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        if total > 0 {
            println!(
                "machine CPU     {:.0}% busy of {cores} cores (all processes)",
                100.0 * busy as f64 / total as f64
            );
        }
        let mut parts = Vec::new();
        let mut ours = 0.0;
        for (group, t1) in &th1.ticks {
            let t0 = th0.ticks.get(group).copied().unwrap_or(0);
            let cpu = (t1 - t0) as f64 / hz;
            ours += cpu;
            parts.push(format!(
                "{group} {:.2} cores ({:.1} us/req)",
                cpu / secs,
                cpu * 1e6 / n.max(1) as f64
            ));
        }
        println!("this process    {}", parts.join(", "));
        // Other processes (a process started in the window counts from zero), busiest first.
        let mut others: Vec<(f64, String)> = pr1
            .iter()
            .map(|(pid, (comm, t1))| {
                let t0 = pr0.get(pid).map_or(0, |(_, t)| *t);
                (t1.saturating_sub(t0) as f64 / hz / secs, comm.clone())
            })
            .filter(|(cores, _)| *cores > 0.0)
            .collect();
        others.sort_by(|a, b| b.0.partial_cmp(&a.0).unwrap());
        let others_total: f64 = others.iter().map(|o| o.0).sum();
        let busiest: Vec<String> = others
            .iter()
            .take(3)
            .map(|(c, name)| format!("{name} {c:.2}"))
            .collect();
        println!(
            "other processes {others_total:.2} cores (busiest: {}); load average now {}",
            busiest.join(", "),
            load_average()
        );
        if total > 0 {
            // /proc/stat counts jiffies per CPU: busy/total is the busy fraction of all cores.
            let all = busy as f64 / total as f64 * cores as f64;
            println!(
                "kernel, not attributed to a thread (softirq: loopback TCP, block I/O completions): {:.2} cores",
                (all - ours / secs - others_total).max(0.0)
            );
        }
        other_cores = others_total;
    }
    RunResult {
        transport,
        connections: cfg.connections,
        rps,
        p50,
        p99,
        errors,
        audit_match,
        other_cores,
    }
}

/// One run per transport in BENCH_TRANSPORTS (`http,https` by default; HTTPS needs the
/// in-process server), one after the other on the same server.
fn run_each(
    client: &tokio::runtime::Runtime,
    server: &Server,
    workload: Workload,
    cfg: &RunConfig,
) -> Vec<RunResult> {
    let wanted = std::env::var("BENCH_TRANSPORTS").unwrap_or_else(|_| "http,https".to_owned());
    let mut results = Vec::new();
    for transport in wanted.split(',').map(str::trim) {
        match (transport, &server.tls) {
            ("http", _) => results.push(run(client, server, ("http", &server.addr), workload, cfg)),
            ("https", Some(tls)) => {
                results.push(run(client, server, ("https", tls), workload, cfg))
            }
            ("https", None) => println!("https: skipped (an external server is driven over HTTP)"),
            (other, _) => panic!("BENCH_TRANSPORTS lists http and https, not {other:?}"),
        }
    }
    results
}

fn create_secret(client: &tokio::runtime::Runtime, server: &Server) {
    let (status, answer) =
        loadgen::create_bench_secret(client, server.addr, &server.token, SECRET_NAME, VALUE_LEN);
    let text = String::from_utf8_lossy(&answer);
    // An external server may hold the secret from an earlier run.
    assert!(
        answer_ok(status, &answer) || text.contains("ALREADY_EXISTS"),
        "secret.create failed: HTTP {status}: {text}"
    );
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    let server_threads = env_or("BENCH_SERVER_THREADS", cores).max(1);
    let client_threads = env_or("BENCH_CLIENT_THREADS", 1usize).max(1);

    let server = match (std::env::var("BENCH_ADDR"), std::env::var("BENCH_DATA_DIR")) {
        (Ok(addr), Ok(dir)) if bench => external(&addr, Path::new(&dir)),
        _ => start_in_process(server_threads),
    };
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(client_threads)
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");
    create_secret(&client, &server);
    let workload = Workload::from_env();

    if !bench {
        // Smoke run: a few requests on two connections, over each transport; correctness
        // only, never time.
        for r in run_each(
            &client,
            &server,
            workload,
            &RunConfig {
                connections: 2,
                warmup: Duration::ZERO,
                measured: Duration::from_secs(30),
                max_requests: Some(10),
                verbose: false,
            },
        ) {
            assert_eq!(r.errors, 0, "smoke run over {} had errors", r.transport);
            assert!(
                r.audit_match,
                "audit log does not hold one record per answer ({})",
                r.transport
            );
        }
        server.stop();
        println!("http bench: smoke run ok (run `cargo bench --bench http` to measure)");
        return;
    }

    let connections = loadgen::connection_counts(loadgen::DEFAULT_CONNECTIONS);
    let measured = Duration::from_secs_f64(env_or("BENCH_SECONDS", 10.0));
    let warmup = Duration::from_secs_f64(env_or("BENCH_WARMUP_SECONDS", 3.0));
    println!(
        "http bench: {} of a {VALUE_LEN}-byte secret, POST /v1/invoke, HTTP/1.1 keep-alive on {}, \
         every call audited (fdatasync, group commit) to {}",
        workload.name(),
        server.addr,
        server.audit_path.display()
    );
    if server.shutdown.is_some() {
        println!(
            "server: in-process, {server_threads} tokio worker threads; load generator: {client_threads} tokio \
             worker thread(s) in the same process; {cores} cores shared by both"
        );
    } else {
        println!(
            "server: external (BENCH_ADDR); load generator: {client_threads} tokio worker thread(s); {cores} cores"
        );
    }

    println!("load average    {} (before the runs)", load_average());
    fdatasync_probe(
        server
            .audit_path
            .parent()
            .expect("audit log has a directory"),
    );

    let mut summary = Vec::new();
    for &c in &connections {
        summary.extend(run_each(
            &client,
            &server,
            workload,
            &RunConfig {
                connections: c.max(1),
                warmup,
                measured,
                max_requests: None,
                verbose: true,
            },
        ));
    }
    if server.shutdown.is_some() {
        match claw_secrets::audit::verify(&server.audit_path) {
            Ok(r) => println!("\naudit chain     verifies: {} records", r.records),
            Err(e) => println!("\naudit chain     BROKEN: {e}"),
        }
    }
    match workload {
        Workload::Get => println!("\nsummary (target: >= 20000 req/s and p99 <= 2 ms)"),
        Workload::Rotate => println!("\nsummary ({}, no target)", workload.name()),
    }
    println!(
        "transport  connections   req/s     p50        p99        errors  audit==answers  other processes"
    );
    for r in &summary {
        println!(
            "{:<10} {:<13} {:<9.0} {:<10} {:<10} {:<7} {:<15} {:.2} cores",
            r.transport,
            r.connections,
            r.rps,
            ms(r.p50),
            ms(r.p99),
            r.errors,
            if r.audit_match { "yes" } else { "NO" },
            r.other_cores
        );
    }
    server.stop();
}
