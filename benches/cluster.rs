//! The cluster targets of DESIGN.md ("Targets"), against a real kube-apiserver + etcd (the test
//! control plane of tests/support/control_plane.rs) and real `claw-secrets` child processes:
//!
//! 1. `get`: `secret.get` of `claw-secrets dev` (a child process, every read audited with
//!    fdatasync) side by side with kube-apiserver serving a native Secret GET
//!    (`GET /api/v1/namespaces/NS/secrets/NAME` with a ServiceAccount bearer token, HTTPS),
//!    both read a 1 KiB value, driven in turn by the same closed-loop keep-alive load
//!    generator as benches/http.rs at the same connection counts.
//! 2. `startup`: an agent restarted with the API server down: time from spawn to its first
//!    successful `secret.get` answered from its local store (target <= 50 ms), several times.
//! 3. `burst`: N ClawSecrets with plaintext `spec.data` created through the API (as `kubectl
//!    apply` does, 32 in flight) with the operator and 3 agents running: time until all are
//!    sealed by the operator and until all are in every agent's store (target <= 60 s for
//!    10,000), and the peak RSS of the operator (<= 64 MiB) and of each agent (<= 48 MiB).
//!
//! 4. `deliveries`: N sealed ClawSecrets split across 3 nodes by `nodeSelector`: the bytes and
//!    objects every agent lists today (all of them) against each node's `GET /v1/deliveries`
//!    (its share, sealed to its key), and the operator's time to answer.
//! 5. `reencrypt`: N sealed ClawSecrets, the operator (webhook and deliveries, as the chart runs
//!    it) and one agent at a time (on deliveries, then watching with the master keyring) serving
//!    a closed-loop `secret.get` load: a baseline, then `claw-secrets keys rotate` and the time
//!    until every object names the new key (objects/s), with the agent's read latency and
//!    errors meanwhile, at each `--reencrypt-per-second` of BENCH_REENCRYPT_RATES. Not in the
//!    default parts (at 10,000 and 50/s it takes over 7 minutes): `BENCH_PARTS=reencrypt`.
//!
//! Run with:
//!
//!     cargo bench --bench cluster
//!     BENCH_PARTS=burst BENCH_SECRETS=10000 cargo bench --bench cluster
//!
//! Environment:
//! - BENCH_PARTS           which parts, in this order (default get,startup,burst,deliveries;
//!   the smoke run does get,burst,deliveries,reencrypt,startup)
//! - BENCH_SECRETS         ClawSecrets in the burst, `deliveries` and `reencrypt` (default 10000)
//! - BENCH_REENCRYPT_RATES `--reencrypt-per-second` of each rotation (default 50,10000: the
//!   default, and one high enough that the API server is the limit)
//! - BENCH_REENCRYPT_AGENTS which agents read during each rotation (default deliveries,watch)
//! - BENCH_REENCRYPT_CONNECTIONS  reader connections at the agent (default 4)
//! - BENCH_REENCRYPT_PATIENCE  seconds beyond N / rate a re-encryption may take (default 600)
//! - BENCH_BURST_INFLIGHT  creates in flight during the burst (default 32)
//! - BENCH_BURST_PATIENCE  seconds the burst may take before it is reported as not done (600)
//! - BENCH_BURST_WEBHOOK   1 (default): as the chart installs it, the operator seals at
//!   admission and delivers to the agents (their own identities, no master keyring); 0: no
//!   webhook, the reconcile loop seals what was stored and the agents watch every ClawSecret
//! - BENCH_STARTUP_RUNS    agent restarts with the API server down (default 10)
//! - BENCH_BURST_RESTARTS  after the burst, restarts of node-c (10,001 secrets in its store)
//!   with the API server down (default 5, on an external cluster 0: set there, it fails)
//! - BENCH_CHILD_LOG       the log filter of the agents and operator it starts when measuring
//!   (default `info`; the smoke run always logs this crate at trace, as the tests do)
//! - BENCH_CONNECTIONS     connection counts for `get` (default as benches/http.rs)
//! - BENCH_SECONDS / BENCH_WARMUP_SECONDS  measured / warm-up seconds per `get` run, and the
//!   baseline / warm-up before each rotation of `reencrypt` (10 / 3)
//! - BENCH_CLIENT_THREADS  load-generator (and kube client) worker threads (default 1)
//!
//! Under `cargo bench` the binary the children run is target/release/claw-secrets (printed at
//! the start). Without `--bench` (as `cargo test --all-targets` runs it) every part runs once,
//! small (20 secrets, one restart, 100 requests on each of 2 connections per server; for
//! `reencrypt` 20 secrets, one rotation per agent at 10000/s, 2 reader connections, no read may
//! fail), checking correctness only, never time. No secret value is ever printed.

#[path = "../tests/support/random.rs"]
mod random;

#[path = "../tests/support/wait.rs"]
mod wait;

#[path = "../tests/support/process.rs"]
mod process;

#[path = "../tests/support/protocol.rs"]
mod protocol;

#[path = "../tests/support/relay.rs"]
mod relay;

#[path = "../tests/support/control_plane.rs"]
mod control_plane;

#[path = "../tests/support/cluster.rs"]
mod cluster;

#[path = "../tests/support/dev_server.rs"]
mod dev_server;

#[path = "../tests/support/webhook.rs"]
mod webhook;

#[path = "../tests/support/host.rs"]
mod host;

#[path = "../tests/support/tokens.rs"]
mod tokens;

#[path = "../tests/support/agent_identity.rs"]
mod agent_identity;

#[path = "support/loadgen.rs"]
mod loadgen;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef};
use kube::api::{Api, ApiResource, DynamicObject, ObjectMeta, PostParams};
use kube::client::ConfigExt as _;
use kube::config::{AuthInfo, KubeConfigOptions, Kubeconfig};
use kube::runtime::watcher;
use serde_json::json;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;

use claw_secrets::k8s::crd::ClawSecret;
use cluster::{Agent, Cluster};
use loadgen::{LoadConfig, Tls, env_or, ms};
use wait::PATIENCE;

const SECRET_NAME: &str = "bench.secret";
const VALUE_LEN: usize = 1024;
const MIB: f64 = 1024.0 * 1024.0;

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    // The smoke run does `startup` last, so it need not wait for kube-apiserver to come back.
    let default_parts = if bench {
        "get,startup,burst,deliveries"
    } else {
        "get,burst,deliveries,reencrypt,startup"
    };
    let parts = std::env::var("BENCH_PARTS").unwrap_or_else(|_| default_parts.to_owned());
    let client = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_or("BENCH_CLIENT_THREADS", 1usize).max(1))
        .thread_name("bench-client")
        .enable_all()
        .build()
        .expect("client runtime");

    let build = if cluster::BIN.contains("/release/") {
        "release"
    } else {
        "debug"
    };
    println!(
        "cluster bench: children run {} ({build} build); {} cores; load average {}",
        cluster::BIN,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        loadgen::load_average()
    );
    let cp = control_plane::control_plane();
    println!(
        "control plane: {} (started in {:.1} s)",
        cp.kubeconfig().display(),
        cp.startup_time().as_secs_f64()
    );

    let parts: Vec<&str> = parts.split(',').map(str::trim).collect();
    for (i, part) in parts.iter().enumerate() {
        match *part {
            "get" => side_by_side(&client, bench),
            "startup" => startup(&client, bench, i + 1 == parts.len()),
            "burst" => burst(&client, bench, i + 1 == parts.len()),
            "deliveries" => deliveries(&client, bench),
            "reencrypt" => reencrypt(&client, bench),
            other => panic!(
                "BENCH_PARTS: unknown part {other:?} (get, startup, burst, deliveries, reencrypt)"
            ),
        }
    }
    if !bench {
        println!("cluster bench: smoke run ok (run `cargo bench --bench cluster` to measure)");
    }
}

// ---------------------------------------------------------------------------------------------
// /proc readings of child processes
// ---------------------------------------------------------------------------------------------

/// `VmHWM` (peak resident set) and `VmRSS` (current) of a process, in bytes.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    };
    Some((field("VmHWM:")?, field("VmRSS:")?))
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

/// The pid a `hack/control-plane.sh` server recorded in its state dir (`NAME.pid`: pid, start).
fn recorded_pid(name: &str) -> Option<u32> {
    let dir = control_plane::control_plane().state_dir()?;
    let text = std::fs::read_to_string(dir.join(format!("{name}.pid"))).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

/// CPU ticks of every process (this one included), and system-wide busy/total jiffies.
type CpuSnapshot = (BTreeMap<u32, (String, u64)>, (u64, u64));

fn cpu_snapshot() -> CpuSnapshot {
    let mut procs = loadgen::process_snapshot();
    let me = std::process::id();
    if let Some(own) = std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| loadgen::parse_stat(&s))
    {
        procs.insert(me, own);
    }
    (procs, loadgen::system_cpu())
}

/// Cores used between two snapshots: by each of `pids`, by every other process, and the busy
/// share of the machine.
fn cores_between(
    (t0, (p0, s0)): &(Instant, CpuSnapshot),
    (t1, (p1, s1)): &(Instant, CpuSnapshot),
    pids: &[u32],
) -> (Vec<f64>, f64, f64) {
    let secs = (*t1 - *t0).as_secs_f64().max(1e-9);
    let hz = loadgen::clock_ticks_per_second();
    let used = |pid: &u32| {
        let before = p0.get(pid).map_or(0, |(_, t)| *t);
        p1.get(pid)
            .map_or(0.0, |(_, t)| t.saturating_sub(before) as f64 / hz / secs)
    };
    let mine: Vec<f64> = pids.iter().map(used).collect();
    let others: f64 = p1.keys().filter(|pid| !pids.contains(pid)).map(used).sum();
    let (busy, total) = (s1.0.saturating_sub(s0.0), s1.1.saturating_sub(s0.1));
    let share = if total > 0 {
        busy as f64 / total as f64
    } else {
        0.0
    };
    (mine, others, share)
}

// ---------------------------------------------------------------------------------------------
// 1. secret.get next to kube-apiserver's native Secret GET
// ---------------------------------------------------------------------------------------------

/// HTTPS to kube-apiserver, trusting the control plane's CA, presenting no client certificate
/// (the request authenticates with its bearer token).
async fn apiserver_tls(kubeconfig: &Path) -> Tls {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kube config");
    config.auth_info = AuthInfo::default();
    let mut tls = config.rustls_client_config().expect("TLS client config");
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let uri = &config.cluster_url;
    let addr = format!(
        "{}:{}",
        uri.host().expect("API server host"),
        uri.port_u16().unwrap_or(443)
    )
    .parse()
    .expect("the API server listens on an IP address");
    Tls {
        addr,
        name: ServerName::IpAddress(addr.ip().into()),
        connector: TlsConnector::from(Arc::new(tls)),
    }
}

/// A native Secret `bench-secret` with a 1 KiB value in a new namespace, a ServiceAccount
/// `reader` allowed to `get` it (a Role naming it), and that ServiceAccount's token.
async fn native_secret() -> (String, String) {
    let env = control_plane::test_env("bench-get").await;
    let ns = env.namespace.clone();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("bench-secret".to_owned()),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(BTreeMap::from([(
            "value".to_owned(),
            ByteString(loadgen::bench_value(VALUE_LEN).into_bytes()),
        )])),
        ..Secret::default()
    };
    env.api::<Secret>()
        .create(&PostParams::default(), &secret)
        .await
        .expect("creating the native Secret");
    let meta = ObjectMeta {
        name: Some("bench-reader".to_owned()),
        ..ObjectMeta::default()
    };
    let role = Role {
        metadata: meta.clone(),
        rules: Some(vec![PolicyRule {
            api_groups: Some(vec![String::new()]),
            resources: Some(vec!["secrets".to_owned()]),
            resource_names: Some(vec!["bench-secret".to_owned()]),
            verbs: vec!["get".to_owned()],
            ..PolicyRule::default()
        }]),
    };
    env.api::<Role>()
        .create(&PostParams::default(), &role)
        .await
        .expect("Role");
    let binding = RoleBinding {
        metadata: meta,
        role_ref: RoleRef {
            api_group: "rbac.authorization.k8s.io".to_owned(),
            kind: "Role".to_owned(),
            name: "bench-reader".to_owned(),
        },
        subjects: Some(vec![cluster::service_account_subject(&ns, "reader")]),
    };
    env.api::<RoleBinding>()
        .create(&PostParams::default(), &binding)
        .await
        .expect("RoleBinding");
    let token = cluster::service_account_token(&env.client, &ns, "reader").await;
    (ns, token)
}

fn native_get_ok(status: u16, body: &[u8]) -> bool {
    status == 200 && loadgen::find(body, br#""kind":"Secret""#).is_some()
}

struct GetRow {
    server: &'static str,
    connections: usize,
    rps: f64,
    p50: u64,
    p99: u64,
    p999: u64,
    errors: u64,
    /// Cores of each server process (kube-apiserver, etcd).
    server_cores: Vec<f64>,
    client_cores: f64,
    other_cores: f64,
}

fn side_by_side(client: &tokio::runtime::Runtime, bench: bool) {
    let cp = control_plane::control_plane();
    let (ns, sa_token) = client.block_on(native_secret());
    let kube = client.block_on(apiserver_tls(cp.kubeconfig()));
    let kube_req: Arc<[u8]> = format!(
        "GET /api/v1/namespaces/{ns}/secrets/bench-secret HTTP/1.1\r\nHost: {}\r\n\
         Accept: application/json\r\nAuthorization: Bearer {sa_token}\r\n\r\n",
        kube.addr
    )
    .into_bytes()
    .into();
    let kube_pids: Vec<u32> = ["kube-apiserver", "etcd"]
        .into_iter()
        .filter_map(recorded_pid)
        .collect();

    let dev_env = dev_server::DevEnv::with_node_id("bench-node");
    let dev = dev_env.start();
    let created = dev.call(
        "secret.create",
        json!({ "name": SECRET_NAME, "data": { "value": loadgen::bench_value(VALUE_LEN) } }),
    );
    assert!(created.is_ok(), "secret.create: HTTP {}", created.status);
    // A write's outcome record is written after its answer (its intent was durable before the
    // commit): counted before the reads, so that every record counted during them is a read's.
    let deadline = Instant::now() + PATIENCE;
    while !std::fs::read(dev_env.audit_log())
        .is_ok_and(|log| loadgen::find(&log, br#""phase":"commit""#).is_some())
    {
        assert!(
            Instant::now() < deadline,
            "secret.create's commit record never written"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let dev_addr: SocketAddr = ([127, 0, 0, 1], dev.port).into();
    let dev_req = loadgen::request_bytes(
        dev_addr,
        &dev.admin_token,
        &loadgen::secret_get_body(SECRET_NAME),
    );

    let (connections, warmup, measured, max_requests) = if bench {
        (
            loadgen::connection_counts(loadgen::DEFAULT_CONNECTIONS),
            Duration::from_secs_f64(env_or("BENCH_WARMUP_SECONDS", 3.0)),
            Duration::from_secs_f64(env_or("BENCH_SECONDS", 10.0)),
            None,
        )
    } else {
        (vec![2], Duration::ZERO, Duration::from_secs(30), Some(100))
    };
    if bench {
        println!(
            "\n== get: secret.get of `claw-secrets dev` (pid {}, HTTP, every read fdatasync'ed to its \
             audit log) vs kube-apiserver GET of a native Secret (pids {kube_pids:?} = \
             kube-apiserver, etcd; HTTPS, ServiceAccount token, RBAC), 1 KiB value, keep-alive, \
             {:.0} s warm-up + {:.0} s per run ==",
            dev.pid,
            warmup.as_secs_f64(),
            measured.as_secs_f64()
        );
    }
    let mut rows = Vec::new();
    for &c in &connections {
        let cfg = LoadConfig {
            connections: c,
            warmup,
            measured,
            max_requests,
        };
        // claw-secrets first, then kube-apiserver, at each connection count.
        let (audit_before, _) = loadgen::audit_counts(&dev_env.audit_log());
        let run = loadgen::load(
            client,
            &dev_addr,
            dev_req.clone(),
            loadgen::answer_ok,
            &cfg,
            cpu_snapshot,
        );
        let (audit_after, _) = loadgen::audit_counts(&dev_env.audit_log());
        let row = get_row("claw-secrets", &run, &[dev.pid], c);
        let answers: u64 = run.results.iter().map(|r| r.answers).sum();
        assert_eq!(
            audit_after - audit_before,
            answers,
            "claw-secrets: one audit record per answer"
        );
        rows.push(row);

        let run = loadgen::load(
            client,
            &kube,
            kube_req.clone(),
            native_get_ok,
            &cfg,
            cpu_snapshot,
        );
        rows.push(get_row("kube-apiserver", &run, &kube_pids, c));
        if !bench {
            for r in &rows {
                assert_eq!(r.errors, 0, "{}: errors in the smoke run", r.server);
            }
        }
    }
    drop(dev);
    if !bench {
        println!("get: claw-secrets and kube-apiserver answered 2 x 100 reads each, audit matches");
        return;
    }
    println!(
        "{:<15} {:>5} {:>9} {:>10} {:>10} {:>10} {:>6} {:>13} {:>11} {:>11}",
        "server",
        "conns",
        "req/s",
        "p50",
        "p99",
        "p99.9",
        "errors",
        "server cores",
        "client",
        "others"
    );
    for r in &rows {
        println!(
            "{:<15} {:>5} {:>9.0} {:>10} {:>10} {:>10} {:>6} {:>13} {:>11.2} {:>11.2}",
            r.server,
            r.connections,
            r.rps,
            ms(r.p50),
            ms(r.p99),
            ms(r.p999),
            r.errors,
            r.server_cores
                .iter()
                .map(|c| format!("{c:.2}"))
                .collect::<Vec<_>>()
                .join("+"),
            r.client_cores,
            r.other_cores
        );
    }
    println!(
        "(server cores: claw-secrets dev; kube-apiserver+etcd. client: this process, the load \
         generator. others: every other process)"
    );
}

fn get_row(
    server: &'static str,
    run: &loadgen::Load<CpuSnapshot>,
    server_pids: &[u32],
    connections: usize,
) -> GetRow {
    let (lat, _answers, errors, _lost, first_error) = loadgen::totals(run);
    let mut pids = server_pids.to_vec();
    pids.push(std::process::id());
    let (cores, others, _) = cores_between(&run.window.0, &run.window.1, &pids);
    if let Some(e) = first_error {
        println!("{server} at {connections} connections: {errors} errors, first: {e}");
    }
    GetRow {
        server,
        connections,
        rps: lat.rps,
        p50: lat.p50,
        p99: lat.p99,
        p999: lat.p999,
        errors,
        server_cores: cores[..server_pids.len()].to_vec(),
        client_cores: cores[server_pids.len()],
        other_cores: others,
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Agent start-up with the API server down
// ---------------------------------------------------------------------------------------------

/// Time from spawning `agent` until a `secret.get` (as sent in `req`) answers from its store,
/// over HTTPS (the TLS handshake counts), trying every millisecond.
async fn first_read(agent: &Agent, req: &Arc<[u8]>) -> Duration {
    let addr = https_target(agent);
    loop {
        assert!(
            agent.spawned_at.elapsed() < PATIENCE,
            "agent {} never answered; log:\n{}",
            agent.node,
            agent.log_tail(20)
        );
        if let Ok(mut conn) = loadgen::Conn::connect(&addr).await {
            while let Ok((status, body)) = conn.round_trip(req).await {
                if loadgen::answer_ok(status, &body) {
                    return agent.spawned_at.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// `last`: nothing runs after this part, so kube-apiserver is left stopped (the control plane
/// goes away with this process).
fn startup(client: &tokio::runtime::Runtime, bench: bool, last: bool) {
    let cp = control_plane::control_plane();
    assert!(
        !cp.is_external(),
        "startup stops kube-apiserver, which only the local control plane allows: leave it out \
         of BENCH_PARTS against an external cluster"
    );
    let runs = if bench {
        env_or("BENCH_STARTUP_RUNS", 10usize).max(1)
    } else {
        1
    };
    client.block_on(async {
        let c = Cluster::new("bench-startup").await;
        let mut agent = c.agent("s", &[]).await;
        let samples = restarts_with_apiserver_down(&c, &mut agent, runs, last).await;
        if bench {
            print_restarts("an agent with 1 secret in its store", &samples);
        } else {
            println!("startup: a restarted agent answered from its store with the API server down");
        }
        drop(agent);
        if !last {
            c.cleanup().await;
        }
    });
}

/// Puts a secret `db` that workload `app` may read on `agent` (and reads it once, with the API
/// server up: the agent keeps the token review for outages), stops kube-apiserver, and
/// restarts `agent` `runs` times: the time from each spawn to the first successful read. The
/// agent is left stopped, and kube-apiserver too if `last`.
async fn restarts_with_apiserver_down(
    c: &Cluster,
    agent: &mut Agent,
    runs: usize,
    last: bool,
) -> Vec<Duration> {
    let ns = c.ns().to_owned();
    let alice = c.alice().await;
    let app = cluster::service_account_token(&c.client(), &ns, "app").await;
    agent
        .invoke(
            Some(&alice),
            "secret.create",
            json!({
                "name": "db", "namespace": ns, "allowed_workloads": ["app"],
                "data": { "password": random::random_hex(16) },
            }),
        )
        .await
        .payload("secret.create");
    wait::eventually("the workload's first read", || async {
        agent.get_secret(&app, &ns, "db").await.result().map(|_| ())
    })
    .await;
    let body = json!({
        "nodeId": agent.node, "command": "secret.get",
        "params": { "name": "db", "namespace": ns },
    })
    .to_string();
    let req = loadgen::request_bytes(SocketAddr::new(agent.ip, agent.port), &app, &body);

    let cp = c.cp();
    cp.stop_apiserver().expect("stop-apiserver");
    let mut samples = Vec::new();
    for run in 1..=runs {
        agent.kill();
        agent.spawn();
        let took = first_read(agent, &req).await;
        if runs > 1 {
            println!(
                "startup: restart {run}: first read {:.1} ms after spawn; the agent's own account: {}",
                took.as_secs_f64() * 1000.0,
                own_account(agent)
            );
        }
        samples.push(took);
    }
    agent.kill();
    if !last {
        cp.start_apiserver().expect("start-apiserver");
        // Without a namespace controller the namespace never goes away: delete the
        // ClawSecret itself, or the agents of a later part would mirror it.
        c.secrets()
            .delete("db", &Default::default())
            .await
            .expect("deleting the ClawSecret");
    }
    samples
}

/// The timings the agent logged when it began serving (`store_open_ms=…` and the like, from
/// its last start), and how many entries its store image vouched for, to tell where a
/// restart's time went.
fn own_account(agent: &Agent) -> String {
    let log = agent.log_tail(200);
    let Some(line) = log
        .lines()
        .rev()
        .find(|l| l.contains("agent serving node.invoke"))
    else {
        return "(not logged)".to_owned();
    };
    line.split_whitespace()
        .filter(|field| {
            field
                .split_once('=')
                .is_some_and(|(k, _)| k.ends_with("_ms") || k == "from_image")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn print_restarts(what: &str, samples: &[Duration]) {
    let mut samples = samples.to_vec();
    samples.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    println!(
        "\n== startup: {what}, restarted {} times with kube-apiserver down, spawn -> first \
         successful secret.get from its store (target <= 50 ms, every restart) ==\n\
         median {:.1} ms, min {:.1} ms, max {:.1} ms; all: {:?}",
        samples.len(),
        ms(&samples[samples.len() / 2]),
        ms(&samples[0]),
        ms(&samples[samples.len() - 1]),
        samples
            .iter()
            .map(|d| (ms(d) * 10.0).round() / 10.0)
            .collect::<Vec<_>>()
    );
}

// ---------------------------------------------------------------------------------------------
// 3. A burst of ClawSecrets with the operator and three agents
// ---------------------------------------------------------------------------------------------

/// Secret files in an agent's store (written as a temp file, then renamed to `*.json`).
fn stored_files(agent_data_dir: &Path) -> usize {
    std::fs::read_dir(agent_data_dir.join("secrets"))
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.ends_with(".json") && !name.starts_with('.')
        })
        .count()
}

/// What the sampler thread saw: when each agent's store reached N files, and the largest
/// `VmRSS` of each process (operator first) it sampled.
#[derive(Default)]
struct Sampled {
    stored_at: Vec<Option<Duration>>,
    stored: Vec<usize>,
    peak_rss: Vec<u64>,
}

/// `last`: nothing runs after this part (kube-apiserver may be left stopped).
/// What a watch saw of the burst's objects: every revision (a watch delivers each write), those
/// still holding plaintext, and the objects that reached Ready.
#[derive(Default)]
struct Revisions {
    seen: usize,
    with_plaintext: usize,
    ready: BTreeSet<String>,
}

impl Revisions {
    fn saw(&mut self, obj: &ClawSecret) {
        self.seen += 1;
        if obj.spec.data.is_some() {
            self.with_plaintext += 1;
        }
        let ready = obj.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        if ready {
            self.ready
                .insert(obj.metadata.name.clone().unwrap_or_default());
        }
    }
}

fn burst(client: &tokio::runtime::Runtime, bench: bool, last: bool) {
    let n: usize = if bench {
        env_or("BENCH_SECRETS", 10_000)
    } else {
        20
    };
    let inflight: usize = env_or("BENCH_BURST_INFLIGHT", 32usize).max(1);
    let patience = Duration::from_secs_f64(env_or("BENCH_BURST_PATIENCE", 600.0));
    cluster::operator_available().unwrap_or_else(|e| panic!("the burst needs the operator: {e}"));
    client.block_on(async {
        let c = Cluster::new("bench-burst").await;
        let ns = c.ns().to_owned();
        let alice = c.alice().await;
        let with_webhook = env_or("BENCH_BURST_WEBHOOK", 1u8) != 0;
        let scratch = tempfile::tempdir().unwrap();
        let (mut agents, mut operator, webhook) = if with_webhook {
            // As the chart runs them with the webhook: each agent with its own identity, its
            // secrets delivered by the operator (through the API server's proxy), no master key.
            let nodes = [
                c.node("a", &[(cluster::ZONE, "a"), (cluster::GPU, "true")])
                    .await,
                c.node("b", &[(cluster::ZONE, "b"), (cluster::GPU, "true")])
                    .await,
                c.node("c", &[(cluster::ZONE, "c")]).await,
            ];
            let (_, hook, operator) = agent_identity::operator_for_agents(&c, &nodes[0]).await;
            let ip: std::net::IpAddr = std::net::Ipv4Addr::LOCALHOST.into();
            let (a, b, cc) = tokio::join!(
                agent_identity::delivered_agent(&c, &nodes[0], scratch.path(), ip),
                agent_identity::delivered_agent(&c, &nodes[1], scratch.path(), ip),
                agent_identity::delivered_agent(&c, &nodes[2], scratch.path(), ip),
            );
            ([a, b, cc], operator, Some(hook))
        } else {
            // Without the webhook, agents watch every ClawSecret with the master keyring.
            let agents = c.three_agents().await;
            let operator = cluster::Operator::start(
                &c.env.kubeconfig,
                &c.master_key,
                &format!("claw-bench-{}", c.suffix()),
                Some(&ns),
            )
            .await;
            (agents, operator, None)
        };
        let mut pids = vec![operator.pid().expect("operator pid")];
        pids.extend(agents.iter().map(|a| a.pid().expect("agent pid")));
        let names: Vec<String> = std::iter::once("operator".to_owned())
            .chain(agents.iter().map(|a| a.node.clone()))
            .collect();
        let idle: Vec<(u64, u64)> = pids
            .iter()
            .map(|p| memory(*p).expect("/proc/PID/status"))
            .collect();
        let api = c.secrets();

        // The operator's progress, from a watch: when the last of the N was seen sealed, and
        // how many revisions the N went through (each write is one; the create included), how
        // many of them with plaintext, and how many objects reached Ready.
        let (sealed_tx, mut sealed_rx) = tokio::sync::watch::channel((0usize, None));
        let revisions = Arc::new(Mutex::new(Revisions::default()));
        let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
        while let Some(event) = stream.next().await {
            if matches!(event, Ok(watcher::Event::InitDone)) {
                break;
            }
        }
        let start = Instant::now();
        let watch_task = {
            let revisions = revisions.clone();
            tokio::spawn(async move {
                let mut sealed = BTreeSet::new();
                while let Some(event) = stream.next().await {
                    let obj = match event {
                        Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) => o,
                        _ => continue,
                    };
                    revisions.lock().unwrap().saw(&obj);
                    if obj.spec.sealed.is_some()
                        && obj.spec.data.is_none()
                        && sealed.len() < n
                        && sealed.insert(obj.metadata.name.clone().unwrap_or_default())
                    {
                        let at = (sealed.len() >= n).then(|| start.elapsed());
                        sealed_tx.send_replace((sealed.len(), at));
                    }
                }
            })
        };

        // The agents' stores and everyone's RSS, every 50 ms, from a plain thread. A store is
        // complete when it holds N files more than before the burst (secrets of other
        // namespaces the agents mirror, normally none).
        let baseline: Vec<usize> = agents.iter().map(|a| stored_files(&a.data_dir())).collect();
        let stop = Arc::new(AtomicBool::new(false));
        let sampled = Arc::new(Mutex::new(Sampled {
            stored_at: vec![None; agents.len()],
            stored: vec![0; agents.len()],
            peak_rss: vec![0; pids.len()],
        }));
        let sampler = {
            let (stop, sampled, pids) = (stop.clone(), sampled.clone(), pids.clone());
            let baseline = baseline.clone();
            let dirs: Vec<_> = agents.iter().map(Agent::data_dir).collect();
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let rss: Vec<u64> =
                        pids.iter().map(|p| memory(*p).map_or(0, |m| m.1)).collect();
                    let mut s = sampled.lock().unwrap();
                    for (peak, now) in s.peak_rss.iter_mut().zip(rss) {
                        *peak = (*peak).max(now);
                    }
                    for (i, dir) in dirs.iter().enumerate() {
                        if s.stored_at[i].is_none() {
                            s.stored[i] = stored_files(dir).saturating_sub(baseline[i]);
                            if s.stored[i] >= n {
                                s.stored_at[i] = Some(start.elapsed());
                            }
                        }
                    }
                    drop(s);
                    std::thread::sleep(Duration::from_millis(50));
                }
            })
        };
        let cpu0 = (Instant::now(), cpu_snapshot());

        // Untyped manifests, as `kubectl apply -f` sends them.
        let resource = ApiResource::erase::<ClawSecret>(&());
        let manifests: Api<DynamicObject> = Api::namespaced_with(c.client(), &ns, &resource);
        let results: Vec<Result<(), String>> = futures::stream::iter(0..n)
            .map(|i| {
                let manifests = manifests.clone();
                let name = format!("burst-{i:05}");
                let value = format!("burst-value-{i}-{}", random::random_hex(8));
                let obj = DynamicObject::new(&name, &resource)
                    .data(json!({ "spec": { "data": { "token": value } } }));
                async move {
                    let created = manifests.create(&PostParams::default(), &obj).await;
                    created.map(|_| ()).map_err(|e| format!("{name}: {e}"))
                }
            })
            .buffer_unordered(inflight)
            .collect()
            .await;
        let applied = start.elapsed();
        let sealed_when_applied = sealed_rx.borrow().0;
        let stored_when_applied = sampled.lock().unwrap().stored.clone();
        let errors: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        assert!(errors.is_empty(), "creating the burst: {errors:?}");

        let mut done = false;
        while start.elapsed() < patience {
            operator.assert_running();
            let sealed = sealed_rx.borrow_and_update().1.is_some();
            let stored = sampled
                .lock()
                .unwrap()
                .stored_at
                .iter()
                .all(Option::is_some);
            if sealed && stored {
                done = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let cpu1 = (Instant::now(), cpu_snapshot());
        stop.store(true, Ordering::Relaxed);
        sampler.join().expect("sampler");
        // The status writes follow the seals: counted once every object is Ready.
        while done && revisions.lock().unwrap().ready.len() < n && start.elapsed() < patience {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        watch_task.abort();
        let revisions = std::mem::take(&mut *revisions.lock().unwrap());
        let (sealed_count, sealed_at) = *sealed_rx.borrow();
        let s = std::mem::take(&mut *sampled.lock().unwrap());
        let peaks: Vec<(u64, u64)> = pids
            .iter()
            .map(|p| memory(*p).expect("/proc/PID/status"))
            .collect();

        let secs = |d: Option<Duration>| {
            d.map_or("NOT DONE".to_owned(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            })
        };
        let mut cpu_pids = pids.clone();
        cpu_pids.extend(
            ["kube-apiserver", "etcd"]
                .into_iter()
                .filter_map(recorded_pid),
        );
        cpu_pids.push(std::process::id());
        let (cores, others, busy) = cores_between(&cpu0, &cpu1, &cpu_pids);
        if bench || !done {
            println!(
                "\n== burst: {n} ClawSecrets with plaintext spec.data created through the API, \
                 {inflight} in flight, operator + 3 agents running, sealed {} (target: all sealed \
                 and on every agent <= 60 s; RSS operator <= 32 MiB, agent <= 24 MiB) ==",
                if with_webhook {
                    "at admission by the webhook, delivered to each agent by the operator"
                } else {
                    "by the reconcile loop (no webhook), watched by every agent"
                }
            );
            if baseline.iter().any(|b| *b > 0) {
                println!("stores held     {baseline:?} other secrets before the burst");
            }
            println!(
                "created         all {n} in {:.1} s; by then {sealed_when_applied} sealed, stores \
                 held {stored_when_applied:?}",
                applied.as_secs_f64()
            );
            println!(
                "sealed          {sealed_count} of {n} by the operator: {}",
                secs(sealed_at)
            );
            for (i, a) in agents.iter().enumerate() {
                println!(
                    "stored          {} of {n} in {}'s store: {}",
                    s.stored[i],
                    a.node,
                    secs(s.stored_at[i])
                );
            }
            println!(
                "writes          {:.2} revisions per secret seen by a watch (the create \
                 included), {:.2} of them with plaintext; {} of {n} Ready",
                revisions.seen as f64 / n as f64,
                revisions.with_plaintext as f64 / n as f64,
                revisions.ready.len()
            );
            let last = s.stored_at.iter().copied().max().flatten().zip(sealed_at);
            println!("all done        {}", secs(last.map(|(a, b)| a.max(b))));
            for (i, name) in names.iter().enumerate() {
                println!(
                    "memory          {name:<16} VmHWM (peak) {:>9}  VmRSS now {:>9}  largest VmRSS \
                     sampled {:>9}  (idle before the burst: VmRSS {})",
                    mib(peaks[i].0),
                    mib(peaks[i].1),
                    mib(s.peak_rss[i]),
                    mib(idle[i].1)
                );
            }
            let labels: Vec<String> = names
                .iter()
                .cloned()
                .chain(["kube-apiserver".to_owned(), "etcd".to_owned()])
                .chain(["bench (client)".to_owned()])
                .collect();
            let used: Vec<String> = labels
                .iter()
                .zip(&cores)
                .map(|(l, c)| format!("{l} {c:.2}"))
                .collect();
            println!(
                "cpu (cores)     {}, others {others:.2}; machine {:.0}% busy",
                used.join(", "),
                busy * 100.0
            );
        }
        assert!(done, "the burst was not done in {patience:?}");

        // Correctness: every agent lists all N through node.invoke; a sealed value opens.
        for a in &agents {
            let listed = a
                .invoke(Some(&alice), "secret.list", json!({ "namespace": ns }))
                .await
                .payload("secret.list");
            assert_eq!(
                listed["secrets"].as_array().map_or(0, Vec::len),
                n,
                "secret.list on {}",
                a.node
            );
        }
        let probe = format!("burst-{:05}", n / 2);
        let got = agents[2]
            .get_secret(&alice, &ns, &probe)
            .await
            .payload("a sealed burst secret");
        assert!(
            got["data"]["token"]
                .as_str()
                .is_some_and(|v| v.starts_with(&format!("burst-value-{}-", n / 2))),
            "{probe} opens to the value it was created with"
        );
        println!("burst: {n} sealed, listed by all 3 agents, a sealed value opens");

        // A node's first start on deliveries (its data dir gone: a new node key, an empty
        // store): until it serves, then until its whole set is delivered and stored.
        if with_webhook {
            let [_, _, node_c] = &mut agents;
            node_c.kill();
            std::fs::remove_dir_all(node_c.data_dir()).unwrap();
            let t = Instant::now();
            node_c.spawn();
            node_c.wait_ready().await;
            let ready = t.elapsed();
            while stored_files(&node_c.data_dir()) < n {
                assert!(
                    t.elapsed() < patience,
                    "{} holds {} of {n} after {patience:?}",
                    node_c.node,
                    stored_files(&node_c.data_dir())
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let stored = t.elapsed();
            println!(
                "first start     {} with a new node key: serving in {} ms; all {n} delivered, \
                 opened and stored in {:.1} s",
                node_c.node,
                ready.as_millis(),
                stored.as_secs_f64()
            );
        }

        // Start-up with the API server down again, with a full store this time.
        let external = c.cp().is_external();
        let restarts = env_or(
            "BENCH_BURST_RESTARTS",
            if bench && !external { 5usize } else { 0 },
        );
        assert!(
            restarts == 0 || !external,
            "BENCH_BURST_RESTARTS stops kube-apiserver, which only the local control plane allows"
        );
        if restarts > 0 {
            let [_, _, node_c] = &mut agents;
            let samples = restarts_with_apiserver_down(&c, node_c, restarts, last).await;
            let held = stored_files(&node_c.data_dir());
            print_restarts(
                &format!("{} with {held} secrets in its store", node_c.node),
                &samples,
            );
            if last {
                return;
            }
        }
        drop(operator);
        drop(agents);
        if let Some(w) = webhook {
            w.remove().await;
        }
        c.cleanup().await;
    });
}

/// The cluster's master keyring, read from its Secret as the operator reads it.
async fn master_keyring(c: &Cluster) -> claw_secrets::crypto::Keyring {
    let (key_ns, key_name) = c.master_key.split_once('/').unwrap();
    let secret = Api::<Secret>::namespaced(c.client(), key_ns)
        .get(key_name)
        .await
        .unwrap();
    claw_secrets::crypto::Keyring::from_json(
        &secret.data.unwrap()[claw_secrets::k8s::keyring::KEYRING_KEY].0,
    )
    .unwrap()
}

/// Creates `n` ClawSecrets `name(i)` in `c`'s namespace, each holding `{"token": value(i)}`
/// already sealed at version 1 under the master keyring's active key (sealed here, as the
/// operator seals: no admission or reconcile work), shaped by `shape` (a nodeSelector, allowed
/// workloads), 32 creates in flight.
async fn create_sealed(
    c: &Cluster,
    n: usize,
    name: impl Fn(usize) -> String,
    value: impl Fn(usize) -> String,
    shape: impl Fn(usize, &mut ClawSecret),
) {
    use claw_secrets::crypto::SecretIdentity;
    use claw_secrets::domain::{Kind, Name, Namespace, SecretData, Version};

    let master = master_keyring(c).await;
    let namespace = Namespace::parse(c.ns()).unwrap();
    let api = c.secrets();
    futures::stream::iter(0..n)
        .map(|i| {
            let (api, master, namespace) = (api.clone(), &master, &namespace);
            let (name, value) = (name(i), value(i));
            let data: SecretData = serde_json::from_value(json!({ "token": value })).unwrap();
            let key = Name::parse(&name).unwrap();
            let identity = SecretIdentity {
                kind: Kind::Secret,
                namespace,
                name: &key,
                version: Version::new(1).unwrap(),
            };
            let envelope = claw_secrets::crypto::seal(master, &identity, &data).unwrap();
            let mut obj = cluster::secret_with_data(&name, &[]);
            obj.spec.data = None;
            shape(i, &mut obj);
            obj.spec.sealed = Some(claw_secrets::k8s::crd::SealedData {
                version: 1,
                key_id: envelope.key_id().to_string(),
                envelope: base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    envelope.to_bytes(),
                ),
                seal_time: "2026-01-01T00:00:00Z".to_owned(),
                data_digest: None,
            });
            async move {
                api.create(&PostParams::default(), &obj)
                    .await
                    .unwrap_or_else(|e| panic!("creating {name}: {e}"));
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}

// ---------------------------------------------------------------------------------------------
// Part `deliveries`: what each node receives, before (every ClawSecret) and after (its share)
// ---------------------------------------------------------------------------------------------

/// N sealed ClawSecrets split across 3 nodes by `nodeSelector` (a third each), the operator
/// serving deliveries. Prints, per node: the bytes and objects of what an agent lists today
/// (every ClawSecret, as its watch's initial list), and of its `GET /v1/deliveries` (its share,
/// sealed to its key), with the time the operator took to answer; then a re-check with its
/// cursor (`304`), and the answer after one of its secrets changed (that one alone).
fn deliveries(client: &tokio::runtime::Runtime, bench: bool) {
    use claw_secrets::crypto::Keyring;
    use claw_secrets::k8s::crd::ClawNode;
    use claw_secrets::k8s::delivery::{AUDIENCE, NodeDeliveries};

    let n: usize = if bench {
        env_or("BENCH_SECRETS", 10_000)
    } else {
        30
    };
    client.block_on(async {
        let c = Cluster::new("bench-deliveries").await;
        let keys_ns = cluster::master_key_namespace();
        agent_identity::apply_agent_rbac(&c.client(), &c.env.kubeconfig, keys_ns).await;
        let hook = webhook::Webhook::register(&c.client(), &[c.ns()]).await;
        let _operator = hook.operator(&c).await;
        let ca = hook.ca_pem().await;

        // Three nodes, each with a key the bench publishes for it (as its agent would).
        let letters = ["a", "b", "c"];
        let mut nodes = Vec::new();
        for letter in letters {
            let node = c.node(letter, &[("bench.claw-secrets/node", letter)]).await;
            let uid = Api::<k8s_openapi::api::core::v1::Node>::all(c.client())
                .get(&node)
                .await
                .unwrap()
                .metadata
                .uid
                .unwrap();
            let ring = Keyring::generate().unwrap();
            let published: ClawNode = claw_secrets::k8s::agent::node_key::claw_node(&node, &uid, &ring);
            Api::<ClawNode>::all(c.client())
                .create(&PostParams::default(), &published)
                .await
                .unwrap();
            nodes.push(node);
        }

        // N sealed ClawSecrets (sealed here with the master keyring: no webhook work), a third
        // selecting each node.
        let api = c.secrets();
        let started = Instant::now();
        create_sealed(
            &c,
            n,
            |i| format!("s-{i:05}"),
            |_| format!("canary-{}", random::random_hex(12)),
            |i, obj| {
                obj.spec.node_selector = Some(
                    [(
                        "bench.claw-secrets/node".to_owned(),
                        letters[i % 3].to_owned(),
                    )]
                    .into(),
                );
            },
        )
        .await;
        println!(
            "deliveries: {n} sealed ClawSecrets created in {:.1} s, a third selecting each of 3 nodes",
            started.elapsed().as_secs_f64()
        );
        // Settled: the operator has written every status (a status write is a change too).
        statuses_written(&api, n).await;

        // Before: what every agent lists (its watch's initial list), all namespaces.
        let list = c
            .client()
            .request_text(
                hyper::Request::get("/apis/clawbernetes.io/v1beta1/clawsecrets")
                    .body(Vec::new())
                    .unwrap(),
            )
            .await
            .unwrap();
        let listed: serde_json::Value = serde_json::from_str(&list).unwrap();
        let all = listed["items"].as_array().map_or(0, Vec::len);
        println!(
            "deliveries: before, each agent lists {all} ClawSecrets, {:.2} MiB",
            list.len() as f64 / MIB
        );

        // After: each node's share, from the operator.
        for node in &nodes {
            let token =
                agent_identity::node_bound_token_for(&c.client(), keys_ns, node, &[AUDIENCE])
                    .await;
            let got = wait::eventually(&format!("{node}'s deliveries"), || async {
                let t = Instant::now();
                let (status, body) =
                    webhook::get_deliveries(hook.port(), &ca, Some(&token), "").await;
                let d: NodeDeliveries = serde_json::from_slice(&body)
                    .map_err(|_| format!("HTTP {status}: {}", String::from_utf8_lossy(&body)))?;
                let mine = d.secrets.iter().filter(|s| s.namespace == c.ns()).count();
                // The operator's cache may still be filling.
                (mine == n / 3 + usize::from(letters_index(node) < n % 3))
                    .then_some((t.elapsed(), body.len(), d))
                    .ok_or(format!("{mine} so far"))
            })
            .await;
            let (took, bytes, d) = got;
            let t = Instant::now();
            let (status, _) = webhook::get_deliveries(
                hook.port(),
                &ca,
                Some(&token),
                &format!("have={}&wait=0", d.etag),
            )
            .await;
            // 304 also for the nodes after the first: the earlier nodes' changed secrets (and
            // the operator's status writes on them) moved no selection, so they are nothing to
            // these nodes.
            assert_eq!(status, 304);
            let unchanged = t.elapsed();
            // One of the node's secrets changes: the next answer is that one alone.
            let one = &d.secrets.iter().find(|s| s.namespace == c.ns()).unwrap().object;
            api.patch(
                one,
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(json!({ "spec": { "allowedWorkloads": ["bench"] } })),
            )
            .await
            .unwrap();
            let t = Instant::now();
            let (status, body) = webhook::get_deliveries(
                hook.port(),
                &ca,
                Some(&token),
                &format!("have={}&wait=30", d.etag),
            )
            .await;
            let changed_after = t.elapsed();
            assert_eq!(status, 200);
            let delta: NodeDeliveries = serde_json::from_slice(&body).unwrap();
            assert!(!delta.full);
            println!(
                "deliveries: after, {node} receives {} secrets, {:.2} MiB, answered in {} ms; unchanged re-check (304) {} ms; one secret changed: {} secret(s), {} bytes, {} ms",
                d.secrets.len(),
                bytes as f64 / MIB,
                took.as_millis(),
                unchanged.as_millis(),
                delta.secrets.len(),
                body.len(),
                changed_after.as_millis()
            );
            // Every delivery is sealed: no value of the bench's in clear.
            assert!(!String::from_utf8_lossy(&serde_json::to_vec(&d).unwrap()).contains("canary-"));
        }
        hook.remove().await;
        c.cleanup().await;
    });
}

/// `node-<letter>-...`'s position among a, b, c.
fn letters_index(node: &str) -> usize {
    match node.as_bytes().get(5) {
        Some(b'a') => 0,
        Some(b'b') => 1,
        _ => 2,
    }
}

// ---------------------------------------------------------------------------------------------
// Part `reencrypt`: a master-key rotation, re-encryption in the background, reads at an agent
// ---------------------------------------------------------------------------------------------

/// How the agent of a `reencrypt` phase gets its secrets.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AgentMode {
    /// As the chart runs it with the webhook: its own identity, no master keyring, its secrets
    /// delivered by the operator sealed to its node key.
    Deliveries,
    /// Watching every ClawSecret with the master keyring (no deliveries).
    Watch,
}

impl AgentMode {
    fn name(self) -> &'static str {
        match self {
            AgentMode::Deliveries => "deliveries",
            AgentMode::Watch => "watch",
        }
    }
}

/// The reader loops' windows: a request belongs to the window it started in.
const WARMUP: u8 = 0;
const BASELINE: u8 = 1;
const DURING: u8 = 2;
const STOPPED: u8 = 3;

/// What one reader loop saw, per window (warm-up, baseline, during).
#[derive(Default)]
struct Reads {
    latencies: [Vec<u64>; 3],
    errors: [u64; 3],
    first_error: [Option<String>; 3],
}

/// One closed-loop reader: `secret.get` of every name in turn (from `start`) through `agent`
/// as the workload `token`, over one keep-alive HTTPS connection, until the window is
/// [`STOPPED`]. A read fails unless it answers `ok` with the value the name was created with.
fn reader(
    agent: &Agent,
    token: &str,
    ns: &str,
    names: &Arc<Vec<(String, String)>>,
    start: usize,
    window: &Arc<std::sync::atomic::AtomicU8>,
) -> impl std::future::Future<Output = Reads> + Send + 'static {
    let target = https_target(agent);
    let (node, token, ns) = (agent.node.clone(), token.to_owned(), ns.to_owned());
    let (names, window) = (names.clone(), window.clone());
    async move {
        let mut r = Reads::default();
        let mut conn = None;
        let mut i = start;
        loop {
            let w = window.load(Ordering::Relaxed);
            if w >= STOPPED {
                break;
            }
            let w = usize::from(w);
            let c = match &mut conn {
                Some(c) => c,
                None => match loadgen::Conn::connect(&target).await {
                    Ok(c) => conn.insert(c),
                    Err(e) => {
                        r.errors[w] += 1;
                        r.first_error[w].get_or_insert(format!("connect: {e}"));
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let (name, value) = &names[i % names.len()];
            i += 1;
            let body = json!({
                "nodeId": node, "command": "secret.get",
                "params": { "name": name, "namespace": ns },
            })
            .to_string();
            let req = loadgen::request_bytes(target.addr, &token, &body);
            let expected = format!(r#""token":"{value}""#);
            let t = Instant::now();
            match c.round_trip(&req).await {
                Ok((status, body)) => {
                    r.latencies[w].push(t.elapsed().as_nanos() as u64);
                    if !loadgen::answer_ok(status, &body)
                        || loadgen::find(&body, expected.as_bytes()).is_none()
                    {
                        r.errors[w] += 1;
                        r.first_error[w].get_or_insert_with(|| {
                            format!("{name}: {}", loadgen::describe(status, &body))
                        });
                    }
                }
                Err(e) => {
                    r.errors[w] += 1;
                    r.first_error[w].get_or_insert(format!("{name}: i/o: {e}"));
                    conn = None;
                }
            }
        }
        r
    }
}

/// The agent's store files of namespace `ns`: each one's modification time, and how many of
/// them name `key` (a master key id: a watching agent stores the object's envelope as it is).
fn store_scan(
    data_dir: &Path,
    ns: &str,
    key: Option<&str>,
) -> (BTreeMap<std::path::PathBuf, std::time::SystemTime>, usize) {
    let mut files = BTreeMap::new();
    let mut with_key = 0;
    let ns_field = format!(r#""namespace":"{ns}""#);
    for entry in std::fs::read_dir(data_dir.join("secrets"))
        .into_iter()
        .flatten()
        .flatten()
    {
        let path = entry.path();
        if path.extension().is_none_or(|x| x != "json") {
            continue;
        }
        let (Ok(bytes), Ok(meta)) = (std::fs::read(&path), entry.metadata()) else {
            continue;
        };
        let compact = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map(|v| v.to_string())
            .unwrap_or_default();
        if !compact.contains(&ns_field) {
            continue;
        }
        if key.is_some_and(|k| compact.contains(k)) {
            with_key += 1;
        }
        files.insert(path, meta.modified().expect("mtime"));
    }
    (files, with_key)
}

/// Latency figures of the readers' `w` window over `secs` seconds.
fn window_row(reads: &[Reads], w: usize, secs: f64) -> String {
    let mut lat: Vec<u64> = reads
        .iter()
        .flat_map(|r| r.latencies[w].iter().copied())
        .collect();
    lat.sort_unstable();
    let errors: u64 = reads.iter().map(|r| r.errors[w]).sum();
    let first = reads.iter().find_map(|r| r.first_error[w].clone());
    format!(
        "secs={secs:.1} reads={} req/s={:.0} p50={} p99={} max={} errors={errors}{}",
        lat.len(),
        lat.len() as f64 / secs.max(1e-9),
        ms(loadgen::percentile(&lat, 0.50)),
        ms(loadgen::percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or(0)),
        first.map_or(String::new(), |e| format!(" (first: {e})"))
    )
}

/// Everything about the N objects a watch saw: the master key each one is sealed under now,
/// and when each changed key.
#[derive(Default)]
struct KeyTracker {
    key_of: std::collections::HashMap<String, String>,
    changes: Vec<(Instant, String)>,
}

/// N sealed ClawSecrets that the workload `app` may read, an operator (with its webhook and
/// deliveries, as the chart runs it) per re-encryption rate, and per rate and agent kind a new
/// agent serving them under a closed-loop `secret.get` load: a baseline without re-encryption,
/// then `claw-secrets keys rotate` and the reads until every object names the new key (and a
/// watching agent holds every new envelope).
fn reencrypt(client: &tokio::runtime::Runtime, bench: bool) {
    let n: usize = if bench {
        env_or("BENCH_SECRETS", 10_000)
    } else {
        20
    };
    let list = |var: &str, default: &str| -> Vec<String> {
        std::env::var(var)
            .unwrap_or_else(|_| default.to_owned())
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let rates: Vec<u32> = if bench {
        list("BENCH_REENCRYPT_RATES", "50,10000")
            .iter()
            .map(|r| r.parse().expect("BENCH_REENCRYPT_RATES: numbers"))
            .collect()
    } else {
        vec![10_000]
    };
    let modes: Vec<AgentMode> = list("BENCH_REENCRYPT_AGENTS", "deliveries,watch")
        .iter()
        .map(|m| match m.as_str() {
            "deliveries" => AgentMode::Deliveries,
            "watch" => AgentMode::Watch,
            other => panic!("BENCH_REENCRYPT_AGENTS: {other:?} (deliveries, watch)"),
        })
        .collect();
    let connections: usize = if bench {
        env_or("BENCH_REENCRYPT_CONNECTIONS", 4usize).max(1)
    } else {
        2
    };
    let (warmup, baseline) = if bench {
        (
            Duration::from_secs_f64(env_or("BENCH_WARMUP_SECONDS", 3.0)),
            Duration::from_secs_f64(env_or("BENCH_SECONDS", 10.0)),
        )
    } else {
        (Duration::from_millis(200), Duration::from_secs(1))
    };
    // Beyond N / rate, for the rotation to take effect and the slower of a rate and the API
    // server's.
    let patience_extra = Duration::from_secs_f64(env_or("BENCH_REENCRYPT_PATIENCE", 600.0));
    cluster::operator_available()
        .unwrap_or_else(|e| panic!("re-encryption needs the operator: {e}"));
    // The readers on their own runtime: the watch and the polls below do not delay them.
    let readers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(env_or("BENCH_CLIENT_THREADS", 1usize).max(1))
        .thread_name("bench-reader")
        .enable_all()
        .build()
        .expect("reader runtime");

    client.block_on(async {
        let c = Cluster::new("bench-reencrypt").await;
        let ns = c.ns().to_owned();
        let keys_ns = cluster::master_key_namespace();
        agent_identity::apply_agent_rbac(&c.client(), &c.env.kubeconfig, keys_ns).await;
        let hook = webhook::Webhook::register(&c.client(), &[c.ns()])
            .await
            .on_every_address();
        let operator_node = c.node("op", &[]).await;
        hook.reachable_by_agents(&c, keys_ns, &operator_node).await;
        let operator_for = |rate: u32| {
            let lease = format!("bench-reencrypt-{}", random::random_hex(4));
            let args = ["--reencrypt-per-second".to_owned(), rate.to_string()];
            let (c, hook) = (&c, &hook);
            async move { hook.operator_with(c, &lease, &args).await }
        };
        let mut operator = operator_for(rates[0]).await;
        let app = cluster::service_account_token(&c.client(), &ns, "app").await;

        let run = random::random_hex(6);
        let names: Arc<Vec<(String, String)>> = Arc::new(
            (0..n)
                .map(|i| (format!("r-{i:05}"), format!("reencrypt-{i}-{run}")))
                .collect(),
        );
        let started = Instant::now();
        create_sealed(
            &c,
            n,
            |i| names[i].0.clone(),
            |i| names[i].1.clone(),
            |_, obj| obj.spec.allowed_workloads = vec!["app".to_owned()],
        )
        .await;
        let api = c.secrets();
        statuses_written(&api, n).await;
        println!(
            "\n== reencrypt: {n} sealed ClawSecrets (created and settled in {:.1} s), readable by \
             workload `app`; operator with its webhook and deliveries (--watch-namespace, leader \
             at once); rates {rates:?}/s; agents: {}; {connections} reader connections \
             (closed loop, keep-alive HTTPS, secret.get of each name in turn as `app`), \
             {:.0} s warm-up + {:.0} s baseline, then `claw-secrets keys rotate` ==",
            started.elapsed().as_secs_f64(),
            modes.iter().map(|m| m.name()).collect::<Vec<_>>().join(", "),
            warmup.as_secs_f64(),
            baseline.as_secs_f64()
        );

        let scratch = tempfile::tempdir().unwrap();
        let mut summary = Vec::new();
        let mut phase = 0;
        for (r, &rate) in rates.iter().enumerate() {
            if r > 0 {
                operator.kill();
                operator = operator_for(rate).await;
            }
            for &mode in &modes {
                phase += 1;
                let agent = match mode {
                    AgentMode::Deliveries => {
                        let node = c.node(&format!("d{phase}"), &[]).await;
                        agent_identity::delivered_agent(
                            &c,
                            &node,
                            scratch.path(),
                            std::net::Ipv4Addr::LOCALHOST.into(),
                        )
                        .await
                    }
                    AgentMode::Watch => c.agent(&format!("w{phase}"), &[]).await,
                };
                let line = reencrypt_phase(
                    &c,
                    &mut operator,
                    &agent,
                    mode,
                    rate,
                    &names,
                    &app,
                    (&readers, connections, warmup, baseline),
                    patience_extra + Duration::from_secs_f64(n as f64 / f64::from(rate.max(1))),
                    bench,
                )
                .await;
                summary.push(line);
                drop(agent);
            }
        }
        if bench {
            println!("\nreencrypt summary (objects/s: N / time from `keys rotate` until every object names the new key)");
            for line in &summary {
                println!("{line}");
            }
        }
        // Leave no N objects for the agents of later parts to mirror (with the operator still
        // up: its webhook is on the namespace).
        api.delete_collection(
            &kube::api::DeleteParams::default(),
            &kube::api::ListParams::default(),
        )
        .await
        .expect("deleting the ClawSecrets");
        drop(operator);
        hook.remove().await;
        c.cleanup().await;
    });
}

/// One rate and one agent: baseline, rotation, re-encryption. Returns the summary line.
#[allow(clippy::too_many_arguments)]
async fn reencrypt_phase(
    c: &Cluster,
    operator: &mut cluster::Operator,
    agent: &Agent,
    mode: AgentMode,
    rate: u32,
    names: &Arc<Vec<(String, String)>>,
    app: &str,
    (readers, connections, warmup, baseline): (&tokio::runtime::Runtime, usize, Duration, Duration),
    patience: Duration,
    bench: bool,
) -> String {
    let n = names.len();
    let ns = c.ns().to_owned();
    let api = c.secrets();
    let data_dir = agent.data_dir();
    let label = format!("rate={rate}/s agent={}", mode.name());
    // The agent holds every object (a new agent's first list or first deliveries).
    let t = Instant::now();
    wait::eventually(&format!("{} to hold all {n}", agent.node), || async {
        match store_scan(&data_dir, &ns, None).0.len() {
            held if held >= n => Ok(()),
            held => Err(format!("{held} of {n}")),
        }
    })
    .await;
    let held_after = t.elapsed();
    let (before, _) = store_scan(&data_dir, &ns, None);
    // A new operator works through every object when it starts, and a new agent through its
    // first set: the baseline begins once both are idle (under 0.05 cores for 2 s in a row).
    let quiet_pids = [
        agent.pid().expect("agent pid"),
        operator.pid().expect("operator pid"),
    ];
    let t = Instant::now();
    let mut quiet_for = 0;
    // (Not in the smoke run, which checks correctness only.)
    while bench && quiet_for < 2 && t.elapsed() < Duration::from_secs(600) {
        let a = (Instant::now(), cpu_snapshot());
        tokio::time::sleep(Duration::from_secs(1)).await;
        let (cores, _, _) = cores_between(&a, &(Instant::now(), cpu_snapshot()), &quiet_pids);
        quiet_for = if cores.iter().all(|c| *c < 0.05) {
            quiet_for + 1
        } else {
            0
        };
    }
    let settled = (quiet_for >= 2).then(|| t.elapsed());

    // Each object's key, from a watch of the namespace.
    let tracker = Arc::new(Mutex::new(KeyTracker::default()));
    let mut stream = watcher(api.clone(), watcher::Config::default()).boxed();
    loop {
        match stream.next().await {
            Some(Ok(watcher::Event::InitApply(o))) => {
                if let Some(s) = &o.spec.sealed {
                    tracker.lock().unwrap().key_of.insert(
                        o.metadata.name.clone().unwrap_or_default(),
                        s.key_id.clone(),
                    );
                }
            }
            Some(Ok(watcher::Event::InitDone)) => break,
            Some(_) => {}
            None => panic!("the watch of ClawSecrets ended"),
        }
    }
    let watch_task = {
        let tracker = tracker.clone();
        tokio::spawn(async move {
            while let Some(event) = stream.next().await {
                let Ok(watcher::Event::Apply(o) | watcher::Event::InitApply(o)) = event else {
                    continue;
                };
                let Some(s) = &o.spec.sealed else { continue };
                let mut t = tracker.lock().unwrap();
                let name = o.metadata.name.clone().unwrap_or_default();
                if t.key_of.get(&name) != Some(&s.key_id) {
                    t.changes.push((Instant::now(), s.key_id.clone()));
                    t.key_of.insert(name, s.key_id.clone());
                }
            }
        })
    };

    // The readers: warm-up, baseline.
    let window = Arc::new(std::sync::atomic::AtomicU8::new(WARMUP));
    let tasks: Vec<_> = (0..connections)
        .map(|i| readers.spawn(reader(agent, app, &ns, names, i * n / connections, &window)))
        .collect();
    let mut pids = vec![
        agent.pid().expect("agent pid"),
        operator.pid().expect("operator pid"),
    ];
    pids.extend(
        ["kube-apiserver", "etcd"]
            .into_iter()
            .filter_map(recorded_pid),
    );
    pids.push(std::process::id());
    tokio::time::sleep(warmup).await;
    window.store(BASELINE, Ordering::Relaxed);
    let cpu0 = (Instant::now(), cpu_snapshot());
    tokio::time::sleep(baseline).await;

    // The rotation, with the real CLI.
    window.store(DURING, Ordering::Relaxed);
    let cpu1 = (Instant::now(), cpu_snapshot());
    let rotated_at = cpu1.0;
    let (key_ns, key_name) = c.master_key.split_once('/').unwrap();
    let kubeconfig = c.env.kubeconfig.clone();
    let (key_ns, key_name) = (key_ns.to_owned(), key_name.to_owned());
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(cluster::BIN)
            .args([
                "keys",
                "rotate",
                "--namespace",
                &key_ns,
                "--secret",
                &key_name,
            ])
            .env("KUBECONFIG", &kubeconfig)
            .output()
            .expect("claw-secrets keys rotate")
    })
    .await
    .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "keys rotate: {said}");
    let rotate_took = rotated_at.elapsed();
    let new_key = said
        .split_whitespace()
        .nth(2)
        .expect("master key <id> is active")
        .to_owned();

    // Until every object names the new key, and a watching agent stores every new envelope.
    let status_api: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(c.client(), cluster::master_key_namespace());
    let status_complete = || async {
        status_api
            .get_opt(claw_secrets::k8s::sealing_key::STATUS_CONFIGMAP)
            .await
            .ok()
            .flatten()
            .and_then(|cm| cm.data)
            .is_some_and(|d| {
                d.get("activeKey") == Some(&new_key)
                    && d.get("reencryption")
                        .is_some_and(|r| r.starts_with("complete"))
            })
    };
    let mut api_done: Option<Duration> = None;
    let mut agent_done: Option<Duration> = None;
    let mut status_done: Option<Duration> = None;
    let mut last_report = Instant::now();
    let mut polls = 0u64;
    loop {
        operator.assert_running();
        let elapsed = rotated_at.elapsed();
        assert!(
            elapsed < patience,
            "{label}: not done after {patience:?}: {} of {n} under the new key; operator log:\n{}",
            tracker
                .lock()
                .unwrap()
                .key_of
                .values()
                .filter(|k| **k == new_key)
                .count(),
            operator.log_tail(20)
        );
        let under_new = tracker
            .lock()
            .unwrap()
            .key_of
            .values()
            .filter(|k| **k == new_key)
            .count();
        if api_done.is_none() && under_new >= n {
            api_done = Some(elapsed);
        }
        if polls.is_multiple_of(10) && status_done.is_none() && status_complete().await {
            status_done = Some(rotated_at.elapsed());
        }
        polls += 1;
        if api_done.is_some() && agent_done.is_none() {
            agent_done = match mode {
                // Its store holds its own envelopes (node-local keys), no master key id.
                AgentMode::Deliveries => api_done,
                AgentMode::Watch => {
                    let (_, new) = store_scan(&data_dir, &ns, Some(&new_key));
                    (new >= n).then(|| rotated_at.elapsed())
                }
            };
        }
        if agent_done.is_some() {
            break;
        }
        if bench && last_report.elapsed() >= Duration::from_secs(15) {
            last_report = Instant::now();
            println!(
                "reencrypt: {label}: {under_new} of {n} under the new key at {:.0} s",
                elapsed.as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(if api_done.is_some() {
            250
        } else {
            100
        }))
        .await;
    }
    window.store(STOPPED, Ordering::Relaxed);
    let cpu2 = (Instant::now(), cpu_snapshot());
    let mut reads = Vec::new();
    for t in tasks {
        reads.push(t.await.expect("reader"));
    }
    // The operator's own report (the status ConfigMap, written after its pass).
    let status_deadline = Instant::now() + Duration::from_secs(30);
    while status_done.is_none() && Instant::now() < status_deadline {
        if status_complete().await {
            status_done = Some(rotated_at.elapsed());
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    watch_task.abort();
    let (after, _) = store_scan(&data_dir, &ns, None);
    let rewritten = after
        .iter()
        .filter(|(p, t)| before.get(*p) != Some(*t))
        .count();
    let (first_change, last_change) = {
        let t = tracker.lock().unwrap();
        let mut new = t
            .changes
            .iter()
            .filter(|(_, k)| *k == new_key)
            .map(|(t, _)| *t);
        let first = new.next();
        (first, new.next_back().or(first))
    };
    let api_done = api_done.expect("done");
    let agent_done = agent_done.expect("done");
    let rate_overall = n as f64 / api_done.as_secs_f64();
    let steady = match (first_change, last_change) {
        (Some(a), Some(b)) if b > a => format!(
            "{:.1}/s from the first to the last ({:.1} s, first at +{:.2} s)",
            (n - 1) as f64 / (b - a).as_secs_f64(),
            (b - a).as_secs_f64(),
            (a - rotated_at).as_secs_f64()
        ),
        _ => "n/a".to_owned(),
    };
    let secs = |d: Option<Duration>| {
        d.map_or("NOT SEEN".to_owned(), |d| {
            format!("{:.1} s", d.as_secs_f64())
        })
    };

    if bench {
        println!(
            "\n-- {label}: {} ({n} in its store after {:.1} s; agent and operator idle {})",
            agent.node,
            held_after.as_secs_f64(),
            settled.map_or(
                "NOT within 600 s: the baseline is not idle".to_owned(),
                |d| { format!("{:.0} s later", d.as_secs_f64()) }
            )
        );
        println!(
            "rotate          `keys rotate` took {:.2} s; new key {new_key}",
            rotate_took.as_secs_f64()
        );
        println!(
            "reencrypted     all {n} under the new key {:.1} s after the rotation began: \
             {rate_overall:.1} objects/s; {steady}",
            api_done.as_secs_f64()
        );
        println!(
            "status          ConfigMap {} says complete at {} (polled every ~1 s)",
            claw_secrets::k8s::sealing_key::STATUS_CONFIGMAP,
            secs(status_done)
        );
        println!(
            "agent store     {rewritten} of {n} files rewritten during the re-encryption{}",
            match mode {
                AgentMode::Watch => format!(
                    "; every copy names the new key at {:.1} s",
                    agent_done.as_secs_f64()
                ),
                AgentMode::Deliveries => String::new(),
            }
        );
        if mode == AgentMode::Deliveries && rewritten == 0 {
            println!(
                "                (re-encryption changes nothing a delivery agent stores or serves: \
                 its copies are sealed under its own store keys, not the master key; it is sent \
                 each re-encrypted object again, finds it held at that version and writes nothing)"
            );
        }
        let base_secs = (cpu1.0 - cpu0.0).as_secs_f64();
        let during_secs = (cpu2.0 - cpu1.0).as_secs_f64();
        println!(
            "reads baseline  {}",
            window_row(&reads, usize::from(BASELINE), base_secs)
        );
        println!(
            "reads during    {}",
            window_row(&reads, usize::from(DURING), during_secs)
        );
        let labels = ["agent", "operator", "kube-apiserver", "etcd", "bench"];
        for (what, a, b) in [("baseline", &cpu0, &cpu1), ("during", &cpu1, &cpu2)] {
            let (cores, others, busy) = cores_between(a, b, &pids);
            let used: Vec<String> = labels
                .iter()
                .zip(&cores)
                .map(|(l, c)| format!("{l} {c:.2}"))
                .collect();
            println!(
                "cpu {what:<11} {}, others {others:.2}; machine {:.0}% busy",
                used.join(", "),
                busy * 100.0
            );
        }
    } else {
        let errors: u64 = reads.iter().map(|r| r.errors[1] + r.errors[2]).sum();
        let during: usize = reads.iter().map(|r| r.latencies[2].len()).sum();
        assert_eq!(
            errors,
            0,
            "{label}: reads failed: {:?}",
            reads
                .iter()
                .find_map(|r| r.first_error[2].clone().or(r.first_error[1].clone()))
        );
        assert!(
            status_done.is_some(),
            "{label}: the status ConfigMap never said complete"
        );
        println!(
            "reencrypt: {label}: {n} re-encrypted, {during} reads during it, none failed; \
             {rewritten} store files rewritten"
        );
    }
    let during_reads = window_row(&reads, usize::from(DURING), (cpu2.0 - cpu1.0).as_secs_f64());
    format!(
        "reencrypt rate={rate} agent={} n={n} objects_per_s={rate_overall:.1} all_new_key_s={:.1} agent_done_s={:.1} rewritten={rewritten} | during: {during_reads}",
        mode.name(),
        api_done.as_secs_f64(),
        agent_done.as_secs_f64()
    )
}

/// Waits until the operator has written the status of all `n` ClawSecrets of `api` (each at
/// version 1): the objects are settled, a status write being a change too.
async fn statuses_written(api: &kube::Api<ClawSecret>, n: usize) {
    wait::eventually("every ClawSecret's status written", || async {
        let listed = api
            .list(&kube::api::ListParams::default())
            .await
            .map_err(|e| e.to_string())?;
        let done = listed
            .items
            .iter()
            .filter(|s| s.status.as_ref().and_then(|st| st.version) == Some(1))
            .count();
        (done == n).then_some(()).ok_or(format!("{done} of {n}"))
    })
    .await;
}

/// The load generator's HTTPS target for `agent`: its address, verified against the test CA
/// by its IP, HTTP/1.1.
fn https_target(agent: &Agent) -> Tls {
    let mut tls = (*cluster::test_ca().client_config()).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    Tls {
        addr: SocketAddr::new(agent.ip, agent.port),
        name: ServerName::IpAddress(agent.ip.into()),
        connector: TlsConnector::from(Arc::new(tls)),
    }
}
