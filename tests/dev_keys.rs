//! Master-key rotation of a dev data dir (`claw-secrets keys rotate|prune --data-dir`), offline
//! (no server on the dir: the command does it) and online (the running `claw-secrets dev` does
//! it, asked over its control socket), as docs/crypto.md ("Keyring") describes: every entry ends
//! up under the new key with the same versions and data, a retired key is pruned only once
//! nothing uses it, the audit log records it all, and no key material is printed or logged.

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
use dev_server::{CliOutput, DevEnv, DevServer, snapshot};
use serde_json::{Value, json};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// master.key as JSON.
fn keyring(env: &DevEnv) -> Value {
    let path = env.data_dir.join("master.key");
    serde_json::from_slice(&std::fs::read(&path).expect("read master.key")).expect("keyring JSON")
}

fn active_key(env: &DevEnv) -> String {
    keyring(env)["active"].as_str().expect("active").to_owned()
}

fn key_ids(env: &DevEnv) -> Vec<String> {
    let mut ids: Vec<String> = keyring(env)["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// The base64 key bytes of every key master.key holds (what must never be printed).
fn key_material(env: &DevEnv) -> Vec<String> {
    keyring(env)["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap().to_owned())
        .collect()
}

fn keys(env: &DevEnv, action: &str) -> CliOutput {
    env.cli(&["keys", action, "--data-dir", env.data_dir.to_str().unwrap()])
}

#[track_caller]
fn succeeded(out: &CliOutput) -> &str {
    assert_eq!(out.code(), Some(0), "{out:?}");
    &out.stdout
}

/// Which master key each entry file's MAC names, and each secret's envelope is sealed under.
/// The envelope carries its key id in clear (docs/crypto.md, "Envelope format").
fn keys_on_disk(env: &DevEnv) -> Vec<(String, String)> {
    let mut found = Vec::new();
    for dir in ["secrets", "configs"] {
        for entry in std::fs::read_dir(env.data_dir.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            let file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            let name = format!("{dir}/{}", file["name"].as_str().unwrap());
            found.push((
                format!("{name} mac"),
                file["keyId"].as_str().unwrap().to_owned(),
            ));
            if let Some(envelope) = file["envelope"].as_str() {
                found.push((format!("{name} envelope"), envelope_key_id(envelope)));
            }
        }
    }
    for (i, line) in std::fs::read_to_string(env.data_dir.join("store.manifest"))
        .unwrap()
        .lines()
        .enumerate()
    {
        let line: Value = serde_json::from_str(line).unwrap();
        found.push((
            format!("store.manifest line {}", i + 1),
            line["keyId"].as_str().unwrap().to_owned(),
        ));
    }
    found.sort();
    found
}

/// The key id inside an envelope: "CLSE", format byte, algorithm byte, id length, id.
fn envelope_key_id(b64: &str) -> String {
    let bytes = B64.decode(b64).expect("envelope base64");
    assert_eq!(&bytes[..4], b"CLSE", "not an envelope");
    let len = bytes[6] as usize;
    String::from_utf8(bytes[7..7 + len].to_vec()).expect("key id")
}

#[track_caller]
fn assert_all_under(env: &DevEnv, key: &str) {
    let found = keys_on_disk(env);
    let other: Vec<_> = found.iter().filter(|(_, k)| k != key).collect();
    assert!(other.is_empty(), "not under {key}: {other:?}");
    assert!(found.len() > 3, "{found:?}");
}

/// Records of the audit log with this command.
fn audited(env: &DevEnv, command: &str) -> Vec<Value> {
    env.audit_records()
        .into_iter()
        .filter(|r| r["command"] == json!(command))
        .collect()
}

#[track_caller]
fn assert_no_key_material(env: &DevEnv, material: &[String], texts: &[&str]) {
    let audit = std::fs::read_to_string(env.audit_log()).unwrap();
    for key in material {
        assert!(!audit.contains(key.as_str()), "key bytes in the audit log");
        for text in texts {
            assert!(!text.contains(key.as_str()), "key bytes printed: {text}");
        }
    }
}

/// Some secrets (several versions) and configs, as users would leave them.
fn populate(server: &DevServer, secrets: usize) {
    for i in 0..secrets {
        server
            .call(
                "secret.create",
                json!({"name": format!("svc{i}.password"), "data": {"password": format!("pw-{i}"), "user": "u"}}),
            )
            .payload();
        for r in 0..i % 3 {
            server
                .call(
                    "secret.rotate",
                    json!({"name": format!("svc{i}.password"), "newData": {"password": format!("pw-{i}-r{r}")}}),
                )
                .payload();
        }
    }
    server
        .call(
            "config.create",
            json!({"name": "app.settings", "data": {"log_level": "info"}}),
        )
        .payload();
}

#[test]
fn offline_rotation_reencrypts_every_entry_and_prune_then_removes_the_old_key() {
    let env = DevEnv::new();
    let server = env.start();
    populate(&server, 5);
    let before = snapshot(&server);
    assert!(server.stop().status.success());
    let old = active_key(&env);
    assert_all_under(&env, &old);

    let out = keys(&env, "rotate");
    let said = succeeded(&out).to_owned();
    let new = active_key(&env);
    assert_ne!(new, old);
    assert_eq!(key_ids(&env), {
        let mut ids = vec![old.clone(), new.clone()];
        ids.sort();
        ids
    });
    let mode = std::fs::metadata(env.data_dir.join("master.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert!(
        said.contains(&format!("master key {new} is active")),
        "{said}"
    );
    assert!(said.contains("5 secrets sealed again"), "{said}");
    assert!(
        said.contains("nothing is left under a retired key"),
        "{said}"
    );
    assert_all_under(&env, &new);
    let material = key_material(&env);

    // The audit log: the rotation's intent and commit, and the re-encryption's, in that order.
    let rotate = audited(&env, "keys.rotate");
    let phases: Vec<&str> = rotate
        .iter()
        .map(|r| r["phase"].as_str().unwrap())
        .collect();
    assert_eq!(phases, ["intent", "commit"], "{rotate:?}");
    for r in &rotate {
        let reason = r["reason"].as_str().unwrap();
        assert!(reason.contains(&new) && reason.contains(&old), "{r}");
        assert!(
            r["subject"]
                .as_str()
                .unwrap()
                .starts_with("local-user:uid="),
            "{r}"
        );
    }
    let reencrypt = audited(&env, "keys.reencrypt");
    assert_eq!(reencrypt.len(), 2, "{reencrypt:?}");
    assert_eq!(reencrypt[1]["phase"], json!("commit"));
    assert!(
        reencrypt[1]["reason"]
            .as_str()
            .unwrap()
            .contains("5 secrets sealed again")
    );
    assert!(rotate[0]["seq"].as_u64() < reencrypt[0]["seq"].as_u64());
    assert_eq!(env.audit_verify(&env.audit_log()).code(), Some(0));

    let out = keys(&env, "prune");
    let pruned = succeeded(&out).to_owned();
    assert!(
        pruned.contains(&format!("removed retired master keys {old}")),
        "{pruned}"
    );
    assert_eq!(key_ids(&env), vec![new.clone()]);
    let prune = audited(&env, "keys.prune");
    let phases: Vec<&str> = prune.iter().map(|r| r["phase"].as_str().unwrap()).collect();
    assert_eq!(phases, ["intent", "commit"], "{prune:?}");
    assert_no_key_material(&env, &material, &[&said, &pruned, &out.stderr]);

    // Only the new key left: the store opens and says the same as before, value for value,
    // version for version (timestamps too), over HTTP and through `claw-secrets invoke`.
    let server = env.start();
    assert_eq!(snapshot(&server), before);
    let got = env.invoke_cli(&env.node_id, "secret.get", r#"{"name":"svc4.password"}"#);
    let got = got.outcome().expect("secret.get through the CLI");
    assert_eq!(got["data"]["password"], json!("pw-4-r0"));
    assert_eq!(got["version"], json!(2));
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    assert_no_key_material(&env, &material, &[&exit.stdout, &exit.stderr]);
}

/// A rotation a crash interrupted after master.key was written and before re-encryption (the
/// keyring has the new key active; every entry is still under the old one): prune refuses and
/// removes nothing; `claw-secrets dev` finishes the re-encryption when it starts; then prune,
/// through the running server, succeeds.
#[test]
fn prune_refuses_while_entries_use_a_retired_key_and_succeeds_once_reencrypted() {
    let env = DevEnv::new();
    let server = env.start();
    populate(&server, 3);
    let before = snapshot(&server);
    assert!(server.stop().status.success());
    let old = active_key(&env);

    // The keyring as the interrupted rotation left it.
    let new = format!("k-{}", random::random_hex(8));
    let mut ring = keyring(&env);
    let mut bytes = [0u8; 32];
    for (i, b) in bytes.iter_mut().enumerate() {
        *b = (random::random_u64() >> (i % 8)) as u8;
    }
    ring["keys"]
        .as_array_mut()
        .unwrap()
        .push(json!({"id": new, "key": B64.encode(bytes)}));
    ring["active"] = json!(new);
    let path = env.data_dir.join("master.key");
    std::fs::write(&path, serde_json::to_vec_pretty(&ring).unwrap()).unwrap();
    let interrupted = std::fs::read(&path).unwrap();

    let out = keys(&env, "prune");
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    for says in [
        "retired keys are still needed",
        old.as_str(),
        "3 secret(s) sealed under it",
        "removed only once nothing in the store uses it",
        "Nothing was removed",
    ] {
        assert!(out.stderr.contains(says), "{says:?} not in {}", out.stderr);
    }
    assert_eq!(
        std::fs::read(&path).unwrap(),
        interrupted,
        "master.key is untouched"
    );
    let refused = audited(&env, "keys.prune");
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0]["decision"], json!("error"));

    // The store opens with both keys; the server finishes the re-encryption it finds.
    let server = env.start();
    assert_eq!(snapshot(&server), before);
    let deadline = Instant::now() + wait::PATIENCE;
    while !audited(&env, "keys.reencrypt")
        .iter()
        .any(|r| r["phase"] == json!("commit"))
    {
        assert!(Instant::now() < deadline, "no re-encryption was audited");
        std::thread::sleep(Duration::from_millis(50));
    }
    let done = audited(&env, "keys.reencrypt");
    assert_eq!(done[0]["subject"], json!("system:claw-secrets"), "{done:?}");
    assert_all_under(&env, &new);

    let out = keys(&env, "prune");
    let said = succeeded(&out);
    assert!(
        said.contains(&format!("removed retired master keys {old}")),
        "{said}"
    );
    assert_eq!(key_ids(&env), vec![new.clone()]);
    assert_eq!(
        snapshot(&server),
        before,
        "the running server still opens everything"
    );
    assert!(server.stop().status.success());
    let server = env.start();
    assert_eq!(snapshot(&server), before);
    assert!(server.stop().status.success());
}

/// With `claw-secrets dev` running, `keys rotate --data-dir` is done by the server: reads (and
/// writes) go on being answered throughout, every one correct, and afterwards the store is all
/// under the new key, prune works through the server too, and a restart opens it all.
#[test]
fn online_rotation_keeps_answering_reads_and_writes_while_it_reencrypts() {
    const SECRETS: usize = 60;
    let env = DevEnv::new();
    let server = Arc::new(env.start());
    for i in 0..SECRETS {
        server
            .call(
                "secret.create",
                json!({"name": format!("s{i}"), "data": {"v": format!("value-{i}")}}),
            )
            .payload();
    }
    let old = active_key(&env);

    let stop = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let (server, stop, reads) = (server.clone(), stop.clone(), reads.clone());
            std::thread::spawn(move || {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    // s0 is rewritten by the writer below; every other value is fixed.
                    let n = 1 + i % (SECRETS - 1);
                    let got = server.call("secret.get", json!({"name": format!("s{n}")}));
                    let payload = got.payload();
                    assert_eq!(
                        payload["data"]["v"],
                        json!(format!("value-{n}")),
                        "{payload}"
                    );
                    reads.fetch_add(1, Ordering::Relaxed);
                    i += 7;
                }
            })
        })
        .collect();
    let writer = {
        let (server, stop) = (server.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut last = 1;
            while !stop.load(Ordering::Relaxed) {
                let got = server.call(
                    "secret.rotate",
                    json!({"name": "s0", "newData": {"v": format!("w-{last}")}}),
                );
                // A write racing re-encryption's conditional write of the same entry is tried
                // again by the server: the user sees it succeed.
                last = got.payload()["version"].as_u64().unwrap();
            }
            last
        })
    };
    while reads.load(Ordering::Relaxed) < 20 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let at_start = reads.load(Ordering::Relaxed);
    let out = keys(&env, "rotate");
    let during = reads.load(Ordering::Relaxed) - at_start;
    let said = succeeded(&out).to_owned();
    std::thread::sleep(Duration::from_millis(100));
    stop.store(true, Ordering::Relaxed);
    for r in readers {
        r.join().expect("a read failed during the rotation");
    }
    let last = writer.join().expect("a write failed during the rotation");
    assert!(during > 0, "no read was answered while the rotation ran");

    let new = active_key(&env);
    assert_ne!(new, old);
    assert!(
        said.contains(&format!("master key {new} is active")),
        "{said}"
    );
    assert!(
        said.contains("nothing is left under a retired key"),
        "{said}"
    );
    assert_all_under(&env, &new);
    let rotate = audited(&env, "keys.rotate");
    assert_eq!(rotate.len(), 2, "{rotate:?}");

    let out = keys(&env, "prune");
    let pruned = succeeded(&out).to_owned();
    assert!(pruned.contains(&old), "{pruned}");
    assert_eq!(key_ids(&env), vec![new.clone()]);
    // The server follows: new writes and reads work, under the only key left.
    let s0 = server.call("secret.get", json!({"name": "s0"})).payload();
    assert_eq!(s0["version"], json!(last));
    server
        .call(
            "secret.rotate",
            json!({"name": "s1", "newData": {"v": "after"}}),
        )
        .payload();
    let material = key_material(&env);
    let before = snapshot(&server);
    let server = Arc::into_inner(server).expect("the threads are done");
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    assert!(
        !env.data_dir.join("control.sock").exists(),
        "the control socket is removed at a clean stop"
    );
    assert_no_key_material(
        &env,
        &material,
        &[&said, &pruned, &exit.stdout, &exit.stderr],
    );
    let server = env.start();
    assert_eq!(snapshot(&server), before);
    assert!(server.stop().status.success());
    assert_eq!(env.audit_verify(&env.audit_log()).code(), Some(0));
}

#[test]
fn keys_with_a_data_dir_that_is_not_one_refuse_and_create_nothing() {
    let env = DevEnv::new();
    let out = keys(&env, "rotate");
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.contains("holds no master.key"), "{}", out.stderr);
    assert!(!Path::new(&env.data_dir).exists(), "nothing was created");
}
