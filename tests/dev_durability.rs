//! What survives a stop, a restart and a process crash: the store, the audit chain, idempotent
//! writes.
//!
//! A process crash (kill -9) loses what the process held, not what the kernel had accepted:
//! these tests cannot observe whether fsync was called. That half of the promise (a write
//! acknowledged is on disk even if the machine loses power) rests on the order of writes and
//! syncs, and is tested by failing each step of a write in turn (`src/faults.rs`, the store's
//! and the audit writer's unit tests).

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

#[path = "support/files.rs"]
mod files;

#[path = "support/protocol.rs"]
mod protocol;

#[path = "support/dev_server.rs"]
mod dev_server;

use dev_server::{DevEnv, DevServer, http_invoke, next_request_id, snapshot};
use files::files_under;
use serde_json::{Value, json};
use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The "stored: N secrets, M configs" the server prints at start.
fn stored_counts(server: &DevServer) -> (usize, usize) {
    assert!(
        server.wait_for_output(false, "Ctrl-C stops the server."),
        "the start-up banner is incomplete: {}",
        server.stdout_text()
    );
    let out = server.stdout_text();
    let line = out
        .lines()
        .find(|l| l.trim_start().starts_with("stored:"))
        .unwrap_or_else(|| panic!("no 'stored:' line in {out}"));
    let nums: Vec<usize> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(nums.len(), 2, "{line}");
    (nums[0], nums[1])
}

/// No entry was set aside as unreadable. (The log lines are checked once the server has
/// stopped and all its output is collected: see `assert_no_quarantine_logged`.)
#[track_caller]
fn assert_nothing_quarantined(env: &DevEnv) {
    let q = env.data_dir.join("quarantine");
    assert!(
        files_under(&q).is_empty(),
        "quarantined: {:?}",
        files_under(&q)
    );
}

#[track_caller]
fn assert_no_quarantine_logged(exit: &dev_server::ServerExit) {
    assert!(!exit.stderr.contains("quarantine"), "{}", exit.stderr);
}

#[test]
fn restart_keeps_every_secret_and_config_exactly() {
    let env = DevEnv::new();
    let server = env.start();
    let (n_secrets, n_configs) = stored_counts(&server);
    assert_eq!((n_secrets, n_configs), (0, 0));
    assert!(
        server.stdout_text().contains("(created)"),
        "a new master key"
    );

    for i in 0..6 {
        let allowed: Vec<String> = (0..i % 3).map(|w| format!("wl-{w}")).collect();
        server
            .call(
                "secret.create",
                json!({"name": format!("svc{i}.password"), "data": {"password": format!("pw-{i}"), "user": "u"}, "allowed_workloads": allowed}),
            )
            .payload();
        for r in 0..i % 4 {
            server
                .call(
                    "secret.rotate",
                    json!({"name": format!("svc{i}.password"), "newData": {"password": format!("pw-{i}-r{r}")}}),
                )
                .payload();
        }
    }
    server
        .call("secret.delete", json!({"name": "svc5.password"}))
        .payload();
    server
        .call(
            "config.create",
            json!({"name": "app.settings", "data": {"log_level": "info", "port": "8080"}}),
        )
        .payload();
    server
        .call(
            "config.update",
            json!({"name": "app.settings", "data": {"log_level": "debug", "port": "8080"}}),
        )
        .payload();
    server
        .call(
            "config.create",
            json!({"name": "app.production", "data": {"replicas": "3"}, "immutable": true}),
        )
        .payload();
    server
        .call(
            "config.create",
            json!({"name": "gone.soon", "data": {"k": "v"}}),
        )
        .payload();
    server
        .call("config.delete", json!({"name": "gone.soon"}))
        .payload();

    let before = snapshot(&server);
    assert_eq!(before.0.len(), 5);
    assert_eq!(before.1.len(), 2);
    assert_eq!(before.0[3]["version"], json!(4), "{}", before.0[3]);

    // SIGTERM: a clean stop, exit 0.
    let exit = server.stop();
    assert!(exit.status.success(), "SIGTERM: {exit:?}");
    assert!(exit.stderr.contains("stopped cleanly"), "{}", exit.stderr);

    let server = env.start();
    assert_eq!(stored_counts(&server), (5, 2));
    assert!(
        !server.stdout_text().contains("(created)"),
        "the master key is reused"
    );
    assert_nothing_quarantined(&env);
    let after = snapshot(&server);
    assert_eq!(before, after, "the store changed across a restart");
    server
        .call("secret.get", json!({"name": "svc5.password"}))
        .expect_error("NOT_FOUND");
    server
        .call("config.get", json!({"name": "gone.soon"}))
        .expect_error("NOT_FOUND");
    // The immutable flag survived too.
    server
        .call(
            "config.update",
            json!({"name": "app.production", "data": {"replicas": "9"}}),
        )
        .expect_error("FAILED_PRECONDITION");
    // The CLI finds the restarted server (new port) through the rewritten dev.json.
    let out = env.invoke_cli(&server.node_id, "secret.get", r#"{"name":"svc3.password"}"#);
    assert_eq!(out.outcome().unwrap(), before.0[3]);
    // It keeps working after the restart: versions continue from where they were.
    let rotated = server
        .call(
            "secret.rotate",
            json!({"name": "svc3.password", "newData": {"password": "next"}}),
        )
        .payload();
    assert_eq!(rotated["version"], json!(5));
    assert_eq!(rotated["createdAt"], before.0[3]["createdAt"]);

    // SIGINT (Ctrl-C): also clean.
    let exit = server.stop_with(libc::SIGINT);
    assert!(exit.status.success(), "SIGINT: {exit:?}");
    assert_no_quarantine_logged(&exit);
    let server = env.start();
    let again = snapshot(&server);
    assert_eq!(again.0[3]["version"], json!(5));
    assert_eq!(again.0[3]["data"], json!({"password": "next"}));
    assert_eq!(again.1, before.1);
    for i in [0, 1, 2, 4] {
        assert_eq!(again.0[i], before.0[i]);
    }
    // Two servers never share one data dir.
    let second = env
        .command()
        .args([
            "dev",
            "--data-dir",
            env.data_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--node-id",
            "test-node",
        ])
        .output()
        .unwrap();
    assert!(
        !second.status.success(),
        "a second server started on a locked data dir"
    );
    assert!(String::from_utf8_lossy(&second.stderr).contains("another claw-secrets server"));
    let exit = server.stop();
    assert!(exit.status.success());
    assert_eq!(env.audit_verify(&env.audit_log()).code(), Some(0));
}

const THREADS: usize = 4;
const SECRETS_PER_THREAD: usize = 4;

/// What one client thread saw.
#[derive(Default, Debug)]
struct ThreadLog {
    /// Highest acknowledged version per secret (0: never acknowledged).
    acked: Vec<u64>,
    /// Highest acknowledged config generation.
    config_acked: u64,
    /// The write that was sent when the connection broke: (secret index or None for the
    /// config, the version or generation it would have made).
    in_flight: Option<(Option<usize>, u64)>,
    /// Request ids of acknowledged secret writes: each must be in the audit log.
    acked_ids: Vec<String>,
}

fn secret_name(t: usize, i: usize) -> String {
    format!("crash.t{t}.s{i}")
}

fn value_for(version: u64) -> Value {
    json!({"v": version.to_string(), "pad": "p".repeat(64 + (version as usize % 7) * 100)})
}

/// One client: rounds over its own secrets (create, then rotations), data encoding the version
/// it should produce, plus one config updated every round. Stops at the first broken connection.
fn client(port: u16, token: String, node: String, t: usize, acks: Arc<AtomicUsize>) -> ThreadLog {
    let mut log = ThreadLog {
        acked: vec![0; SECRETS_PER_THREAD],
        ..Default::default()
    };
    for round in 0u64.. {
        for i in 0..SECRETS_PER_THREAD {
            let version = round + 1;
            let (command, params) = if round == 0 {
                (
                    "secret.create",
                    json!({"name": secret_name(t, i), "data": value_for(version)}),
                )
            } else {
                (
                    "secret.rotate",
                    json!({"name": secret_name(t, i), "newData": value_for(version)}),
                )
            };
            let id = next_request_id("crash");
            let body = json!({"id": id, "nodeId": node, "command": command, "params": params});
            log.in_flight = Some((Some(i), version));
            match http_invoke(port, Some(&token), &serde_json::to_vec(&body).unwrap()) {
                Err(_) => return log,
                Ok(resp) => {
                    let payload = resp.payload();
                    assert_eq!(
                        payload["version"],
                        json!(version),
                        "{command} {}",
                        secret_name(t, i)
                    );
                    log.acked[i] = version;
                    log.acked_ids.push(id);
                    log.in_flight = None;
                    acks.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        let generation = round + 1;
        let name = format!("crash.t{t}.cfg");
        let (command, params) = if round == 0 {
            (
                "config.create",
                json!({"name": name, "data": {"v": generation.to_string()}}),
            )
        } else {
            (
                "config.update",
                json!({"name": name, "data": {"v": generation.to_string()}}),
            )
        };
        let body = json!({"nodeId": node, "command": command, "params": params});
        log.in_flight = Some((None, generation));
        match http_invoke(port, Some(&token), &serde_json::to_vec(&body).unwrap()) {
            Err(_) => return log,
            Ok(resp) => {
                resp.payload();
                log.config_acked = generation;
                log.in_flight = None;
                acks.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    unreachable!()
}

/// A process crash (kill -9) in the middle of a write burst loses nothing that was
/// acknowledged, leaves nothing unreadable, and the audit chain holds (a record cut short is
/// repaired, and says so). It does not prove the fsyncs (see the module's note).
#[test]
fn crash_mid_burst_loses_no_acknowledged_write() {
    let env = DevEnv::new();
    let mut server = env.start();
    let acks = Arc::new(AtomicUsize::new(0));
    let logs = Arc::new(Mutex::new(Vec::new()));
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let (port, token, node) = (
            server.port,
            server.admin_token.clone(),
            server.node_id.clone(),
        );
        let acks = acks.clone();
        let logs = logs.clone();
        handles.push(std::thread::spawn(move || {
            let log = client(port, token, node, t, acks);
            logs.lock().unwrap().push((t, log));
        }));
    }
    // Let the burst run a while (a count of acknowledged writes, with a time cap), then crash.
    let started = Instant::now();
    while acks.load(Ordering::Relaxed) < 1500 && started.elapsed() < Duration::from_secs(3) {
        if handles.iter().any(|h| h.is_finished()) {
            break; // a client failed: its panic is reported below
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let crashed = server.kill9();
    assert!(!crashed.status.success(), "{crashed:?}");
    for h in handles {
        h.join().expect("client thread panicked");
    }
    let logs = std::mem::take(&mut *logs.lock().unwrap());
    assert_eq!(logs.len(), THREADS);
    let total_acked: u64 = logs.iter().flat_map(|(_, l)| l.acked.iter()).sum();
    assert!(
        total_acked >= THREADS as u64,
        "the burst barely started: {logs:?}"
    );
    let in_flight = logs.iter().filter(|(_, l)| l.in_flight.is_some()).count();
    eprintln!(
        "crash: {} writes acknowledged, {in_flight} of {THREADS} clients cut off mid-write",
        acks.load(Ordering::Relaxed)
    );
    drop(server);

    // ---- restart on the same data dir ----
    let server = env.start();
    assert_nothing_quarantined(&env);
    let mut present = 0;
    let mut unacknowledged_but_stored = 0;
    for (t, log) in &logs {
        for i in 0..SECRETS_PER_THREAD {
            let name = secret_name(*t, i);
            let acked = log.acked[i];
            let maybe_one_more = log.in_flight == Some((Some(i), acked + 1));
            let resp = server.call("secret.get", json!({"name": name}));
            if !resp.is_ok() {
                resp.expect_error("NOT_FOUND");
                assert_eq!(
                    acked, 0,
                    "{name}: acknowledged at version {acked}, lost in the crash"
                );
                continue;
            }
            present += 1;
            let got = resp.payload();
            let v = got["version"].as_u64().unwrap();
            let max = acked + u64::from(maybe_one_more);
            assert!(
                acked <= v && v <= max,
                "{name}: stored version {v}, acknowledged {acked}, in flight {:?}",
                log.in_flight
            );
            assert_eq!(
                got["data"],
                value_for(v),
                "{name}: data does not match version {v}"
            );
            if v > acked {
                unacknowledged_but_stored += 1;
            }
        }
        let cfg = server.call("config.get", json!({"name": format!("crash.t{t}.cfg")}));
        let maybe_one_more = log.in_flight == Some((None, log.config_acked + 1));
        if cfg.is_ok() {
            let g: u64 = cfg.payload()["data"]["v"]
                .as_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!(
                log.config_acked <= g && g <= log.config_acked + u64::from(maybe_one_more),
                "config of thread {t}: generation {g}, acknowledged {}",
                log.config_acked
            );
        } else {
            cfg.expect_error("NOT_FOUND");
            assert_eq!(log.config_acked, 0);
        }
    }
    eprintln!("crash: {unacknowledged_but_stored} writes in flight at the crash were kept");
    let (stored_secrets, _) = stored_counts(&server);
    assert_eq!(stored_secrets, present);
    // Every file in the store parses (none was quarantined) and no temp file survived start-up.
    for dir in ["secrets", "configs"] {
        for f in files_under(&env.data_dir.join(dir)) {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                name.ends_with(".json") && !name.starts_with('.'),
                "{}",
                f.display()
            );
            let v: Value = serde_json::from_slice(&std::fs::read(&f).unwrap())
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", f.display()));
            assert!(v.is_object());
        }
    }
    assert_eq!(
        files_under(&env.data_dir.join("secrets")).len(),
        present,
        "one file per stored secret"
    );

    // The audit chain holds, and every acknowledged secret write was recorded before its answer.
    let out = env.audit_verify(&env.audit_log());
    assert_eq!(out.code(), Some(0), "{out:?}");
    let recorded: HashSet<String> = env
        .audit_records()
        .iter()
        .filter_map(|r| r["requestId"].as_str().map(str::to_owned))
        .collect();
    for (_, log) in &logs {
        for id in &log.acked_ids {
            assert!(
                recorded.contains(id),
                "acknowledged write {id} is not in the audit log"
            );
        }
    }
    // Every version the store holds, or built on, was on the record before it was committed:
    // also the write the crash cut off, acknowledged or not.
    let audited_versions: HashSet<(String, u64)> = env
        .audit_records()
        .iter()
        .filter(|r| {
            r["decision"] == json!("allow")
                && (r["command"] == json!("secret.create")
                    || r["command"] == json!("secret.rotate"))
        })
        .filter_map(|r| Some((r["name"].as_str()?.to_owned(), r["version"].as_u64()?)))
        .collect();
    for (t, _) in &logs {
        for i in 0..SECRETS_PER_THREAD {
            let name = secret_name(*t, i);
            let resp = server.call("secret.get", json!({"name": name}));
            let Some(stored) = resp
                .is_ok()
                .then(|| resp.payload()["version"].as_u64().unwrap())
            else {
                continue;
            };
            for v in 1..=stored {
                assert!(
                    audited_versions.contains(&(name.clone(), v)),
                    "{name} version {v} is in the store (it holds version {stored}) but not in the audit log"
                );
            }
        }
    }
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    assert_no_quarantine_logged(&exit);

    // ---- a record cut short by a crash ----
    let log_path = env.audit_log();
    let records_before = env.audit_records().len();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&log_path)
            .unwrap();
        f.write_all(br#"{"seq":99999,"ti"#).unwrap();
    }
    let out = env.audit_verify(&log_path);
    assert_ne!(
        out.code(),
        Some(0),
        "verify accepted a cut-short record: {out:?}"
    );
    assert!(
        out.stderr
            .contains(&format!("line {}:", records_before + 1)),
        "{out:?}"
    );

    let server = env.start();
    assert!(
        server.wait_for_output(true, "repaired"),
        "{}",
        server.stderr_text()
    );
    let out = env.audit_verify(&log_path);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let records = env.audit_records();
    assert_eq!(records.len(), records_before + 1);
    let repair = records.last().unwrap();
    assert_eq!(repair["decision"], json!("repair"), "{repair}");
    assert_eq!(repair["command"], json!("audit.repair"), "{repair}");
    assert!(
        repair["reason"].as_str().unwrap().contains("16 bytes"),
        "{repair}"
    );
    // And the chain continues after the repair record.
    server.call("secret.list", json!({})).payload();
    let out = env.audit_verify(&log_path);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(env.audit_records().len(), records_before + 2);
    let exit = server.stop();
    assert!(exit.status.success());
}

/// What a crash can leave in the store besides complete entries: an interrupted temp file is
/// removed, an unreadable entry is moved aside (never deleted, never fatal).
#[test]
fn interrupted_and_unreadable_entries_do_not_stop_the_server() {
    let env = DevEnv::new();
    let server = env.start();
    server
        .call("secret.create", json!({"name": "good", "data": {"k": "v"}}))
        .payload();
    assert!(server.stop().status.success());

    let secrets = env.data_dir.join("secrets");
    std::fs::write(
        secrets.join(".tmp-0123456789abcdef"),
        b"{\"format\":1,\"namesp",
    )
    .unwrap();
    std::fs::write(secrets.join("ffff.json"), b"{ not an entry").unwrap();

    let server = env.start();
    assert_eq!(stored_counts(&server), (1, 0));
    assert_eq!(
        server.call("secret.get", json!({"name": "good"})).payload()["data"],
        json!({"k": "v"})
    );
    assert!(
        !secrets.join(".tmp-0123456789abcdef").exists(),
        "temp file kept"
    );
    let quarantined = files_under(&env.data_dir.join("quarantine"));
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert!(quarantined[0].ends_with("ffff.json"));
    assert_eq!(std::fs::read(&quarantined[0]).unwrap(), b"{ not an entry");
    assert!(
        server.wait_for_output(true, "quarantine"),
        "{}",
        server.stderr_text()
    );
    assert!(server.stop().status.success());
}

/// A retried write with the same idempotency key is applied once, even across a restart; the
/// same key with different params is refused.
#[test]
fn idempotent_writes_apply_once() {
    let env = DevEnv::new();
    let server = env.start();
    let node = server.node_id.clone();
    let send = |server: &DevServer, command: &str, params: Value, key: &str| {
        server.request(&json!({
            "id": next_request_id("idem"),
            "nodeId": node,
            "command": command,
            "params": params,
            "idempotencyKey": key,
        }))
    };
    let create = json!({"name": "idem.secret", "data": {"password": "one"}, "allowed_workloads": ["api-server"]});

    // ---- create, retried ----
    let first = send(&server, "secret.create", create.clone(), "create-key-1").payload();
    let retry = send(&server, "secret.create", create.clone(), "create-key-1").payload();
    assert_eq!(first["version"], json!(1));
    assert_eq!(retry, first, "a retry answers what the first call answered");
    let listed = server
        .call("secret.list", json!({"prefix": "idem."}))
        .payload();
    assert_eq!(dev_server::names_of(&listed, "secrets"), ["idem.secret"]);
    // Without the key, the same create is a duplicate.
    server
        .call("secret.create", create.clone())
        .expect_error("ALREADY_EXISTS");
    // The same key with different params is a mistake, not a retry.
    let other = json!({"name": "idem.secret", "data": {"password": "two"}});
    let msg =
        send(&server, "secret.create", other, "create-key-1").expect_error("INVALID_ARGUMENT");
    assert!(msg.contains("idempotencyKey"), "{msg}");

    // ---- rotate, retried ----
    let rotate = json!({"name": "idem.secret", "newData": {"password": "rotated"}});
    let r1 = send(&server, "secret.rotate", rotate.clone(), "rotate-key-1").payload();
    let r2 = send(&server, "secret.rotate", rotate.clone(), "rotate-key-1").payload();
    assert_eq!(r1["version"], json!(2));
    assert_eq!(r2, r1);
    let got = server
        .call("secret.get", json!({"name": "idem.secret"}))
        .payload();
    assert_eq!(got["version"], json!(2), "the retry did not rotate again");
    assert_eq!(got["data"], json!({"password": "rotated"}));
    let different = json!({"name": "idem.secret", "newData": {"password": "other"}});
    send(&server, "secret.rotate", different, "rotate-key-1").expect_error("INVALID_ARGUMENT");
    assert_eq!(
        server
            .call("secret.get", json!({"name": "idem.secret"}))
            .payload()["version"],
        json!(2)
    );
    // A new key is a new rotation.
    let r3 = send(&server, "secret.rotate", rotate.clone(), "rotate-key-2").payload();
    assert_eq!(r3["version"], json!(3));

    // ---- a second secret whose create is retried only after a restart ----
    let create2 = json!({"name": "idem.later", "data": {"k": "v"}});
    let c2 = send(&server, "secret.create", create2.clone(), "create-key-2").payload();
    // ---- configs too ----
    let cfg = json!({"name": "idem.cfg", "data": {"k": "v"}});
    let cc1 = send(&server, "config.create", cfg.clone(), "cfg-key-1").payload();
    assert_eq!(
        send(&server, "config.create", cfg.clone(), "cfg-key-1").payload(),
        cc1
    );
    let upd = json!({"name": "idem.cfg", "data": {"k": "v2"}});
    let u1 = send(&server, "config.update", upd.clone(), "cfg-key-2").payload();
    assert_eq!(
        send(&server, "config.update", upd.clone(), "cfg-key-2").payload(),
        u1
    );
    // Through the CLI's --idempotency-key.
    let cli_params = r#"{"name":"idem.cli","data":{"k":"v"}}"#;
    let a = env.cli(&[
        "invoke",
        "local",
        "secret.create",
        cli_params,
        "--idempotency-key",
        "cli-key",
    ]);
    let b = env.cli(&[
        "invoke",
        "local",
        "secret.create",
        cli_params,
        "--idempotency-key",
        "cli-key",
    ]);
    assert_eq!(a.outcome().unwrap(), b.outcome().unwrap());
    // A key on a read is checked but changes nothing.
    let got = send(
        &server,
        "secret.get",
        json!({"name": "idem.secret"}),
        "read-key",
    )
    .payload();
    assert_eq!(got["version"], json!(3));
    send(
        &server,
        "secret.get",
        json!({"name": "idem.secret"}),
        "bad key",
    )
    .expect_error("INVALID_ARGUMENT");

    assert!(server.stop().status.success());
    let server = env.start();

    // ---- replays after the restart ----
    assert_eq!(
        send(&server, "secret.rotate", rotate.clone(), "rotate-key-2").payload(),
        r3
    );
    assert_eq!(
        send(&server, "secret.create", create2.clone(), "create-key-2").payload(),
        c2
    );
    assert_eq!(
        send(&server, "config.update", upd.clone(), "cfg-key-2").payload(),
        u1
    );
    send(
        &server,
        "secret.rotate",
        json!({"name": "idem.secret", "newData": {"password": "x"}}),
        "rotate-key-2",
    )
    .expect_error("INVALID_ARGUMENT");
    let got = server
        .call("secret.get", json!({"name": "idem.secret"}))
        .payload();
    assert_eq!(got["version"], json!(3));
    assert_eq!(got["data"], json!({"password": "rotated"}));
    assert_eq!(
        server
            .call("secret.get", json!({"name": "idem.later"}))
            .payload()["version"],
        json!(1)
    );
    assert_eq!(
        server
            .call("config.get", json!({"name": "idem.cfg"}))
            .payload()["data"],
        json!({"k": "v2"})
    );
    // The stored fingerprint is keyed: the idempotency record never holds the data.
    for f in files_under(&env.data_dir.join("secrets")) {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(!text.contains("rotated"), "{}", f.display());
    }
    assert!(server.stop().status.success());
}
