//! The write path's promises at its edges, against the real `claw-secrets dev`: nothing changes
//! that was not audited; a retry is answered once and only for the caller who made the write;
//! what is on disk is served only if it is what this node wrote; rotate's re-seal and
//! check-and-set.

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

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use dev_server::{DevEnv, DevServer, HttpResponse, next_request_id};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::Command;

/// `command` with `params` and an idempotency key, as `token` (the admin when None).
fn keyed(
    server: &DevServer,
    token: Option<&str>,
    command: &str,
    params: Value,
    key: &str,
) -> HttpResponse {
    let body = json!({
        "id": next_request_id("w"),
        "nodeId": server.node_id,
        "command": command,
        "params": params,
        "idempotencyKey": key,
    });
    server.post(
        Some(token.unwrap_or(&server.admin_token)),
        &serde_json::to_vec(&body).unwrap(),
    )
}

/// An admin token with its own subject, so the audit log (and idempotency) tells it apart.
fn admin_token(env: &DevEnv, subject: &str) -> String {
    let out = env.cli(&[
        "token",
        "create",
        "--admin",
        "--subject",
        subject,
        "--data-dir",
        env.data_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    out.stdout.trim().to_owned()
}

/// The entry file of secret `name` in the default namespace.
fn secret_file(env: &DevEnv, name: &str) -> PathBuf {
    let digest = Sha256::digest(format!("ClawSecret/default/{name}"));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    env.data_dir.join("secrets").join(format!("{hex}.json"))
}

/// Makes a file immutable (`chattr +i`) for as long as it lives: even root cannot write it, as
/// with a read-only or failing disk. Undone on drop, also when the test fails.
struct Immutable(PathBuf);

impl Immutable {
    fn set(path: &Path) -> Immutable {
        let out = Command::new("chattr").arg("+i").arg(path).output().expect(
            "chattr (e2fsprogs) is needed to make the audit log unwritable; the data dir must be on a file system that supports it (ext4 here)",
        );
        assert!(
            out.status.success(),
            "chattr +i {}: {out:?}",
            path.display()
        );
        Immutable(path.to_owned())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

fn audit_names(env: &DevEnv, command: &str, version: Option<u64>) -> Vec<Value> {
    env.audit_records()
        .into_iter()
        .filter(|r| r["command"] == json!(command))
        .filter(|r| version.is_none_or(|v| r["version"] == json!(v)))
        .collect()
}

/// Defect: with the audit log unwritable, writes answered UNAVAILABLE but were applied.
#[test]
fn a_write_that_cannot_be_audited_is_not_applied() {
    let env = DevEnv::new();
    let server = env.start();
    let first = json!({"password": "one"});
    server
        .call("secret.create", json!({"name": "a", "data": first}))
        .payload();
    server
        .call("secret.create", json!({"name": "gone", "data": {"k": "v"}}))
        .payload();
    server
        .call(
            "config.create",
            json!({"name": "c", "data": {"level": "info"}}),
        )
        .payload();
    // A read is answered only once its record is durable, and records are written in order:
    // after it, the setup writes' commit records (queued behind their intents) are on disk too.
    server.call("secret.list", json!({})).payload();
    let records_before = env.audit_records().len();

    let guard = Immutable::set(&env.audit_log());
    for (command, params) in [
        (
            "secret.rotate",
            json!({"name": "a", "newData": {"password": "two"}}),
        ),
        ("secret.rotate", json!({"name": "a"})),
        ("secret.create", json!({"name": "b", "data": {"k": "v"}})),
        ("secret.delete", json!({"name": "gone"})),
        ("config.create", json!({"name": "d", "data": {"k": "v"}})),
        (
            "config.update",
            json!({"name": "c", "data": {"level": "debug"}}),
        ),
        ("config.delete", json!({"name": "c"})),
        ("secret.get", json!({"name": "a"})),
    ] {
        let msg = server
            .call(command, params.clone())
            .expect_error("UNAVAILABLE");
        assert!(msg.contains("audit"), "{command}: {msg}");
        assert!(
            !msg.contains(env.data_dir.to_str().unwrap()),
            "a client is not told the server's paths: {msg}"
        );
        // A client that retries without an idempotency key must not apply it twice.
        server.call(command, params).expect_error("UNAVAILABLE");
    }
    drop(guard);

    let check = |server: &DevServer| {
        let a = server.call("secret.get", json!({"name": "a"})).payload();
        assert_eq!(
            (a["version"].clone(), a["data"].clone()),
            (json!(1), first.clone())
        );
        server.call("secret.get", json!({"name": "gone"})).payload();
        server
            .call("secret.get", json!({"name": "b"}))
            .expect_error("NOT_FOUND");
        assert_eq!(
            server.call("config.get", json!({"name": "c"})).payload()["data"],
            json!({"level": "info"})
        );
        server
            .call("config.get", json!({"name": "d"}))
            .expect_error("NOT_FOUND");
    };
    check(&server);
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    let server = env.start();
    check(&server);
    drop(server);

    // Nothing about the refused writes was recorded (the log could not be written), and what is
    // recorded still verifies.
    assert_eq!(env.audit_verify(&env.audit_log()).code(), Some(0));
    let records = env.audit_records();
    assert!(
        records[records_before..]
            .iter()
            .all(|r| r["command"] == json!("secret.get") || r["command"] == json!("config.get")),
        "{:#?}",
        &records[records_before..]
    );
}

/// Defects: an idempotency key was remembered only for the latest write of a secret and not
/// bound to the command, target or caller, and replaying someone else's key told a right guess
/// of their data from a wrong one.
#[test]
fn a_retry_gets_its_own_first_answer_and_nobody_else_can_use_the_key() {
    let env = DevEnv::new();
    let server = env.start();
    server
        .call("secret.create", json!({"name": "s", "data": {"p": "v1"}}))
        .payload();
    server
        .call(
            "secret.create",
            json!({"name": "other", "data": {"p": "x"}}),
        )
        .payload();
    let rotate_a = json!({"name": "s", "newData": {"p": "from-a"}});
    let a = keyed(&server, None, "secret.rotate", rotate_a.clone(), "key-a").payload();
    assert_eq!(a["version"], json!(2));
    let b = keyed(
        &server,
        None,
        "secret.rotate",
        json!({"name": "s", "newData": {"p": "from-b"}}),
        "key-b",
    )
    .payload();
    assert_eq!(b["version"], json!(3));

    // A stale retry of A gets A's answer, and B's rotation stands.
    let retried = keyed(&server, None, "secret.rotate", rotate_a.clone(), "key-a").payload();
    assert_eq!(retried, a);
    let now = server.call("secret.get", json!({"name": "s"})).payload();
    assert_eq!(
        (now["version"].clone(), now["data"].clone()),
        (json!(3), json!({"p": "from-b"}))
    );

    // The same key for another object, another command or other params is a mistake.
    for (command, params) in [
        (
            "secret.rotate",
            json!({"name": "other", "newData": {"p": "from-a"}}),
        ),
        ("secret.delete", json!({"name": "s"})),
        (
            "secret.rotate",
            json!({"name": "s", "newData": {"p": "changed"}}),
        ),
    ] {
        let msg = keyed(&server, None, command, params, "key-a").expect_error("INVALID_ARGUMENT");
        assert!(msg.contains("idempotencyKey"), "{msg}");
    }

    // Another caller replaying the key, with the right data and with a wrong guess: one and
    // the same answer, and nothing written.
    let bob = admin_token(&env, "bob");
    let right = keyed(
        &server,
        Some(&bob),
        "secret.rotate",
        rotate_a.clone(),
        "key-a",
    );
    let wrong = keyed(
        &server,
        Some(&bob),
        "secret.rotate",
        json!({"name": "s", "newData": {"p": "guess"}}),
        "key-a",
    );
    assert_eq!(right.status, wrong.status);
    assert_eq!(right.json()["error"], wrong.json()["error"]);
    right.expect_error("INVALID_ARGUMENT");
    assert_eq!(
        server.call("secret.get", json!({"name": "s"})).payload()["version"],
        json!(3)
    );

    // A retried delete gets its first answer, not NOT_FOUND; also after a restart.
    let deleted = keyed(
        &server,
        None,
        "secret.delete",
        json!({"name": "other"}),
        "key-d",
    )
    .payload();
    assert_eq!(
        keyed(
            &server,
            None,
            "secret.delete",
            json!({"name": "other"}),
            "key-d"
        )
        .payload(),
        deleted
    );
    drop(server);
    let server = env.start();
    assert_eq!(
        keyed(&server, None, "secret.rotate", rotate_a, "key-a").payload(),
        a
    );
    assert_eq!(
        keyed(
            &server,
            None,
            "secret.delete",
            json!({"name": "other"}),
            "key-d"
        )
        .payload(),
        deleted
    );
    assert_eq!(
        server.call("secret.get", json!({"name": "s"})).payload()["version"],
        json!(3)
    );
    // The retries are on the record as answered, changing nothing.
    let retries = env
        .audit_records()
        .into_iter()
        .filter(|r| {
            r["reason"]
                .as_str()
                .is_some_and(|s| s.starts_with("retry of request"))
        })
        .count();
    assert_eq!(retries, 4);
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
}

/// Defect: the fingerprint key was derived from the active master key, so a retry that spans a
/// master-key rotation was refused.
#[test]
fn a_retry_across_a_master_key_change_is_answered() {
    let env = DevEnv::new();
    let server = env.start();
    let create = json!({"name": "k", "data": {"p": "one"}});
    let first = keyed(&server, None, "secret.create", create.clone(), "create-k").payload();
    let exit = server.stop();
    assert!(exit.status.success());

    // A new active master key; the old one retired in the ring.
    let path = env.data_dir.join("master.key");
    let mut ring: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).unwrap();
    ring["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": "k-rotated", "key": B64.encode(bytes)}));
    ring["active"] = json!("k-rotated");
    std::fs::write(&path, serde_json::to_vec(&ring).unwrap()).unwrap();

    let server = env.start();
    assert_eq!(
        keyed(&server, None, "secret.create", create, "create-k").payload(),
        first
    );
    let msg = keyed(
        &server,
        None,
        "secret.create",
        json!({"name": "k", "data": {"p": "two"}}),
        "create-k",
    )
    .expect_error("INVALID_ARGUMENT");
    assert!(msg.contains("different request"), "{msg}");
    // The secret still opens, and rotating re-seals it under the new key.
    assert_eq!(
        server.call("secret.get", json!({"name": "k"})).payload()["data"],
        json!({"p": "one"})
    );
    server.call("secret.rotate", json!({"name": "k"})).payload();
    let stored: Value =
        serde_json::from_slice(&std::fs::read(secret_file(&env, "k")).unwrap()).unwrap();
    let envelope = B64.decode(stored["envelope"].as_str().unwrap()).unwrap();
    assert!(
        envelope.windows(9).any(|w| w == b"k-rotated"),
        "the re-sealed version names the new key"
    );
    let exit = server.stop();
    assert!(exit.status.success());
}

/// Defect: an entry file rolled back to an older copy of itself was served as current, and
/// widening `allowedWorkloads` on disk let another workload read the secret.
#[test]
fn a_rolled_back_or_edited_entry_is_refused_not_served() {
    let env = DevEnv::new();
    let server = env.start();
    server
        .call("secret.create", json!({"name": "rb", "data": {"p": "v1"}}))
        .payload();
    let v1_file = std::fs::read(secret_file(&env, "rb")).unwrap();
    server
        .call(
            "secret.rotate",
            json!({"name": "rb", "newData": {"p": "v2"}}),
        )
        .payload();
    server
        .call(
            "secret.create",
            json!({"name": "narrow", "data": {"p": "secret"}, "allowed_workloads": ["api"]}),
        )
        .payload();
    server
        .call(
            "secret.create",
            json!({"name": "fine", "data": {"p": "ok"}}),
        )
        .payload();
    let intruder = env.create_token("intruder", "default");
    server
        .call_as(Some(&intruder), "secret.get", json!({"name": "narrow"}))
        .expect_error("PERMISSION_DENIED");
    let exit = server.stop();
    assert!(exit.status.success());

    // Roll `rb` back to version 1; widen `narrow`'s allowed workloads.
    std::fs::write(secret_file(&env, "rb"), &v1_file).unwrap();
    let narrow = secret_file(&env, "narrow");
    let text = std::fs::read_to_string(&narrow).unwrap();
    let widened = text.replace(
        r#""allowedWorkloads":["api"]"#,
        r#""allowedWorkloads":["api","intruder"]"#,
    );
    assert_ne!(
        text, widened,
        "the entry names its allowed workloads: {text}"
    );
    std::fs::write(&narrow, widened).unwrap();

    let server = env.start();
    let records_before = env.audit_records().len();
    for name in ["rb", "narrow"] {
        let msg = server
            .call("secret.get", json!({"name": name}))
            .expect_error("INTERNAL");
        assert!(msg.contains("integrity"), "{name}: {msg}");
        assert!(!msg.contains("v1") && !msg.contains("secret\"}"), "{msg}");
    }
    server
        .call_as(Some(&intruder), "secret.get", json!({"name": "narrow"}))
        .expect_error("PERMISSION_DENIED");
    assert_eq!(
        server.call("secret.get", json!({"name": "fine"})).payload()["data"],
        json!({"p": "ok"})
    );
    assert!(
        server.wait_for_output(true, "rolled back"),
        "{}",
        server.stderr_text()
    );
    assert!(
        server.wait_for_output(true, "MAC"),
        "{}",
        server.stderr_text()
    );
    // The refused reads are on the record as failures.
    let failed: Vec<Value> = env.audit_records()[records_before..]
        .iter()
        .filter(|r| {
            r["decision"] == json!("error") && r["reason"].as_str().unwrap().starts_with("INTERNAL")
        })
        .cloned()
        .collect();
    assert_eq!(failed.len(), 2, "{failed:#?}");
    // Both files are kept aside, and an admin can clear the refused entries.
    assert_eq!(
        files::files_under(&env.data_dir.join("quarantine")).len(),
        2
    );
    for name in ["rb", "narrow"] {
        server
            .call("secret.delete", json!({"name": name}))
            .payload();
        server
            .call(
                "secret.create",
                json!({"name": name, "data": {"p": "fresh"}}),
            )
            .payload();
    }
    let exit = server.stop();
    assert!(exit.status.success());

    // A missing manifest with authenticated entries: refused at start, saying what to do.
    std::fs::remove_file(env.data_dir.join("store.manifest")).unwrap();
    let refused = env.start_refused(&[]);
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        refused.stderr.contains("--rebuild-store-manifest"),
        "{refused:?}"
    );
    // Rebuilt on request: the entries, each checked against its own MAC, are served again.
    let server = env.start_args(&["--rebuild-store-manifest"], &[]);
    assert_eq!(
        server.call("secret.get", json!({"name": "fine"})).payload()["data"],
        json!({"p": "ok"})
    );
    drop(server);
    let server = env.start();
    assert_eq!(
        server.call("secret.get", json!({"name": "rb"})).payload()["version"],
        json!(1)
    );
    let exit = server.stop();
    assert!(exit.status.success());
}

/// `secret.rotate` without `newData` re-seals the current data as the next version;
/// `expectedVersion` makes it a check-and-set. `config.create` takes empty data.
#[test]
fn reseal_check_and_set_and_empty_configs() {
    let env = DevEnv::new();
    let server = env.start();
    server
        .call("secret.create", json!({"name": "r", "data": {"p": "same"}}))
        .payload();
    let resealed = server.call("secret.rotate", json!({"name": "r"})).payload();
    assert_eq!(resealed["version"], json!(2));
    let got = server.call("secret.get", json!({"name": "r"})).payload();
    assert_eq!(
        (got["version"].clone(), got["data"].clone()),
        (json!(2), json!({"p": "same"}))
    );

    let msg = server
        .call(
            "secret.rotate",
            json!({"name": "r", "newData": {"p": "new"}, "expectedVersion": 1}),
        )
        .expect_error("CONFLICT");
    assert!(
        msg.contains("version 2") && msg.contains("expectedVersion 1"),
        "{msg}"
    );
    assert_eq!(
        server.call("secret.get", json!({"name": "r"})).payload()["version"],
        json!(2)
    );
    let cas = server
        .call(
            "secret.rotate",
            json!({"name": "r", "newData": {"p": "new"}, "expectedVersion": 2}),
        )
        .payload();
    assert_eq!(cas["version"], json!(3));

    server
        .call("config.create", json!({"name": "empty", "data": {}}))
        .payload();
    assert_eq!(
        server
            .call("config.get", json!({"name": "empty"}))
            .payload()["data"],
        json!({})
    );
    let exit = server.stop();
    assert!(exit.status.success());
    // The commit records follow their intents at the latest when the server stops.
    let phases: Vec<Value> = audit_names(&env, "secret.rotate", Some(3))
        .iter()
        .map(|r| r["phase"].clone())
        .collect();
    assert_eq!(phases, [json!("intent"), json!("commit")]);
}

/// Defect: a crash between the store commit and the audit append left committed versions (on
/// which later versions were built) without an audit record. Several rounds of a rotate storm
/// cut by kill -9: after each, every version the store holds or built on is in the audit log,
/// and the log verifies.
#[test]
fn kill_9_in_a_rotate_storm_leaves_no_version_unaudited() {
    const THREADS: usize = 8;
    const ROUNDS: usize = 10;
    let env = DevEnv::new();
    let names: Vec<String> = (0..THREADS).map(|t| format!("storm.{t}")).collect();
    {
        let server = env.start();
        for name in &names {
            server
                .call("secret.create", json!({"name": name, "data": {"v": "0"}}))
                .payload();
        }
        let exit = server.stop();
        assert!(exit.status.success());
    }
    for round in 0..ROUNDS {
        let mut server = env.start();
        let acks = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let threads: Vec<_> = names
            .iter()
            .map(|name| {
                let (port, token, name, acks) = (
                    server.port,
                    server.admin_token.clone(),
                    name.clone(),
                    acks.clone(),
                );
                std::thread::spawn(move || {
                    for i in 0u64.. {
                        let body = json!({"command": "secret.rotate",
                            "params": {"name": name, "newData": {"v": i.to_string()}}});
                        match dev_server::http_invoke(
                            port,
                            Some(&token),
                            &serde_json::to_vec(&body).unwrap(),
                        ) {
                            Ok(resp) if resp.is_ok() => {
                                acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(resp) => panic!("{name}: {}", resp.text()),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        let started = std::time::Instant::now();
        while acks.load(std::sync::atomic::Ordering::Relaxed) < 150 + 37 * round
            && started.elapsed() < std::time::Duration::from_secs(5)
        {
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        server.kill9();
        for t in threads {
            t.join().expect("a client failed");
        }

        let server = env.start();
        assert_eq!(
            env.audit_verify(&env.audit_log()).code(),
            Some(0),
            "round {round}"
        );
        let audited: std::collections::HashSet<(String, u64)> = env
            .audit_records()
            .iter()
            .filter(|r| r["decision"] == json!("allow") && r["command"] != json!("secret.get"))
            .filter_map(|r| Some((r["name"].as_str()?.to_owned(), r["version"].as_u64()?)))
            .collect();
        for name in &names {
            let stored = server.call("secret.get", json!({"name": name})).payload()["version"]
                .as_u64()
                .unwrap();
            for v in 1..=stored {
                assert!(
                    audited.contains(&(name.clone(), v)),
                    "round {round}: {name} version {v} is in the store (which holds version {stored}) but not in the audit log"
                );
            }
        }
        let exit = server.stop();
        assert!(exit.status.success());
    }
}
