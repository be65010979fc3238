//! A server that holds under hostile clients and a data dir that refuses to be silently reset
//! (dev mode; the agent runs the same server): each test is a defect of the previous main.

#[path = "support/dev_server.rs"]
mod dev_server;

use dev_server::{DevEnv, DevServer, HttpResponse};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Calls `command` as `token` until `done` holds for the answer, for at most 10 s.
fn until(
    server: &DevServer,
    token: &str,
    command: &str,
    params: Value,
    done: impl Fn(&HttpResponse) -> bool,
) -> HttpResponse {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let resp = server.call_as(Some(token), command, params.clone());
        if done(&resp) || Instant::now() > deadline {
            return resp;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Defect: a tokens file with a syntax error kept the old token set, so a token "revoked" by an
/// edit that left a trailing comma behind went on working.
#[test]
fn a_tokens_file_that_does_not_parse_refuses_every_token() {
    let env = DevEnv::new();
    let server = env.start();
    let revoked = env.create_token("revoked", "default");
    server
        .call_as(Some(&revoked), "config.list", json!({}))
        .payload();

    // Revoke it by hand, leaving a trailing comma behind.
    let path = env.data_dir.join("tokens.json");
    let mut file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let tokens = file["tokens"].as_array_mut().unwrap();
    tokens.retain(|t| t["subject"] != json!("workload:default/revoked"));
    let kept = serde_json::to_string_pretty(&file).unwrap();
    let broken = kept.replacen("\n  ]", ",\n  ]", 1);
    assert_ne!(kept, broken);
    std::fs::write(&path, &broken).unwrap();

    let refused = until(&server, &revoked, "config.list", json!({}), |r| !r.is_ok());
    let msg = refused.expect_error("UNAVAILABLE");
    assert!(msg.contains("tokens file"), "{msg}");
    assert!(
        !msg.contains(env.data_dir.to_str().unwrap()),
        "a client is not told the server's paths: {msg}"
    );
    // Every token, the admin's included, until it is fixed.
    server
        .call("config.list", json!({}))
        .expect_error("UNAVAILABLE");
    assert!(
        server.wait_for_output(true, "tokens file"),
        "{}",
        server.stderr_text()
    );

    std::fs::write(&path, &kept).unwrap();
    let admin = server.admin_token.clone();
    until(&server, &admin, "config.list", json!({}), |r| r.is_ok()).payload();
    server
        .call_as(Some(&revoked), "config.list", json!({}))
        .expect_error("UNAUTHENTICATED");
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
}

/// Defects: core dumps were allowed (a core of the dev server held a secret's plaintext and the
/// admin token), and `master.key` and `tokens.json` were used with mode 0666.
#[test]
fn no_core_dumps_and_keys_only_readable_by_their_owner() {
    use std::os::unix::fs::PermissionsExt;
    let env = DevEnv::new();
    let server = env.start();
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", server.pid)).unwrap();
    let core = limits
        .lines()
        .find(|l| l.starts_with("Max core file size"))
        .unwrap_or_else(|| panic!("{limits}"));
    let fields: Vec<&str> = core.split_whitespace().collect();
    assert_eq!(&fields[4..6], ["0", "0"], "{core}");
    let exit = server.stop();
    assert!(exit.status.success());

    for (file, mode) in [
        ("master.key", 0o644),
        ("tokens.json", 0o666),
        ("admin.token", 0o640),
    ] {
        let path = env.data_dir.join(file);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        let refused = env.start_refused(&[]);
        assert!(!refused.status.success(), "{file}: {refused:?}");
        assert!(
            refused
                .stderr
                .contains(&format!("chmod 600 {}", path.display())),
            "{file}: {}",
            refused.stderr
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let server = env.start();
    server.call("secret.list", json!({})).payload();
    let exit = server.stop();
    assert!(exit.status.success());
}

/// Makes a file or directory immutable (`chattr +i`) while it lives, undone on drop.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(path: &std::path::Path) -> Immutable {
        let out = std::process::Command::new("chattr")
            .arg("+i")
            .arg(path)
            .output()
            .expect("chattr (e2fsprogs) makes the store unwritable for this test");
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
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// Defect: error messages to clients held the server's absolute data-dir path. A store that
/// cannot be written answers UNAVAILABLE, says what failed and not where, and changes nothing.
#[test]
fn a_failing_store_answers_without_the_servers_paths() {
    let env = DevEnv::new();
    let server = env.start();
    server
        .call(
            "secret.create",
            json!({"name": "before", "data": {"k": "v"}}),
        )
        .payload();
    let guard = Immutable::set(&env.data_dir.join("secrets"));
    let msg = server
        .call(
            "secret.create",
            json!({"name": "during", "data": {"k": "v"}}),
        )
        .expect_error("UNAVAILABLE");
    assert!(msg.contains("store"), "{msg}");
    assert!(!msg.contains(env.data_dir.to_str().unwrap()), "{msg}");
    assert!(!msg.contains("/secrets"), "{msg}");
    drop(guard);
    server
        .call("secret.get", json!({"name": "during"}))
        .expect_error("NOT_FOUND");
    server
        .call(
            "secret.create",
            json!({"name": "during", "data": {"k": "v"}}),
        )
        .payload();
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    // The log names the file, for whoever runs the server.
    assert!(
        exit.stderr.contains(env.data_dir.to_str().unwrap()),
        "{}",
        exit.stderr
    );
}
