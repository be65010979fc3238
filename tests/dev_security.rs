//! Dev mode's security promises, end to end: plaintext stays where DESIGN.md allows it
//! (canary test), the audit log records every secret access and detects tampering, and the
//! access rules for workload tokens hold.

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

#[path = "support/files.rs"]
mod files;

#[path = "support/process.rs"]
mod process;

#[path = "support/protocol.rs"]
mod protocol;

#[path = "support/dev_server.rs"]
mod dev_server;

#[path = "support/canary.rs"]
mod canary;

use canary::{Canaries, contains_bytes};
use dev_server::DevEnv;
use files::files_under;
use random::random_hex;
use serde_json::{Value, json};

/// A secret value must never reach disk in clear, the logs (at trace level), the audit log, or
/// any error message, whatever a caller sends. It must reach the one place it belongs: an
/// authorized secret.get.
#[test]
fn canary_value_never_leaks() {
    let env = DevEnv::new();
    let server = env.start_with(&[("CLAW_SECRETS_LOG", "trace")]);
    let canary = canary::canary("canary");
    // A value that would be sent as a JSON number by mistake: digits only.
    let numeric = format!(
        "9{}",
        random_hex(8)
            .bytes()
            .map(|b| (b'0' + b % 10) as char)
            .collect::<String>()
    );
    let canaries = Canaries::of([canary.clone(), numeric.clone()]);
    let intruder = env.create_token("intruder", "default");

    // ---- The happy path: create, get (where the value must appear), rotate, list. ----
    server
        .call(
            "secret.create",
            json!({"name": "canary.secret", "data": {"token": canary, "pin": numeric}, "allowed_workloads": ["api-server"]}),
        )
        .payload();
    let got = server.call("secret.get", json!({"name": "canary.secret"}));
    assert!(
        contains_bytes(&got.body, canary.as_bytes())
            && contains_bytes(&got.body, numeric.as_bytes()),
        "secret.get must return the value, else this test proves nothing: {}",
        got.text()
    );
    server
        .call(
            "secret.rotate",
            json!({"name": "canary.secret", "newData": {"token": canary, "pin": numeric, "rotated": "yes"}}),
        )
        .payload();
    let got = server.call("secret.get", json!({"name": "canary.secret"}));
    assert_eq!(got.payload()["data"]["token"], json!(canary));
    assert_eq!(got.payload()["version"], json!(2));
    // The CLI prints it too (that is its answer, not a log).
    let out = env.invoke_cli("local", "secret.get", r#"{"name":"canary.secret"}"#);
    assert!(out.stdout.contains(&canary), "{out:?}");

    let mut responses = Vec::new();
    responses.push(server.call("secret.list", json!({})));
    responses.push(server.call("secret.list", json!({"prefix": "canary."})));
    assert_eq!(
        dev_server::names_of(&responses[1].payload(), "secrets"),
        ["canary.secret"]
    );
    responses.push(server.call(
        "secret.rotate",
        json!({"name": "canary.secret", "newData": {"token": canary}}),
    ));
    responses.last().unwrap().payload();

    // ---- Failures carrying the canary in every position a careless message would echo. ----
    let c = &canary;
    let n: u64 = numeric.parse().unwrap();
    let failing: Vec<(&str, Value)> = vec![
        ("secret.create", json!({"name": "canary.bad", "data": c})),
        ("secret.create", json!({"name": "canary.bad", "data": [c]})),
        ("secret.create", json!({"name": "canary.bad", "data": n})),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"k": n}}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"k": [c]}}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"k": {"nested": c}}}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"k": true, "v": c}}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"bad key": c}}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {}, "allowed_workloads": c}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"k": c}, "allowed_workloads": c}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"k": c}, "allowed_workloads": [{"w": c}]}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"k": c}, "allowed_workloads": [n]}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "data": {"k": c}, "extra": c}),
        ),
        ("secret.create", json!({"name": {"n": c}, "data": {"k": c}})),
        ("secret.create", json!({"name": n, "data": {"k": c}})),
        ("secret.create", json!({"data": {"k": c}})),
        (
            "secret.create",
            json!({"name": "canary.secret", "data": {"k": c}}),
        ), // ALREADY_EXISTS
        (
            "secret.create",
            json!({"name": "canary.big", "data": {"k": format!("{c}{}", "x".repeat(1024 * 1024))}}),
        ),
        (
            "secret.create",
            json!({"name": "canary.bad", "namespace": {"ns": c}, "data": {"k": c}}),
        ),
        (
            "secret.rotate",
            json!({"name": "canary.secret", "newData": c}),
        ),
        (
            "secret.rotate",
            json!({"name": "canary.secret", "newData": {"k": n}}),
        ),
        (
            "secret.rotate",
            json!({"name": "canary.secret", "newData": {}, "data": {"k": c}}),
        ),
        (
            "secret.rotate",
            json!({"name": "canary.missing", "newData": {"k": c}}),
        ), // NOT_FOUND
        (
            "secret.rotate",
            json!({"name": "canary.secret", "data": {"k": c}}),
        ),
        ("secret.get", json!({"name": "canary.secret", "data": c})),
        ("secret.list", json!({"prefix": {"p": c}})),
        ("secret.list", json!({"prefix": n})),
        (
            "config.create",
            json!({"name": "canary.cfg", "data": {"k": "v"}, "immutable": c}),
        ),
        (
            "config.create",
            json!({"name": "canary.cfg", "data": {"k": "v"}, "immutable": n}),
        ),
        (
            "config.update",
            json!({"name": "canary.cfg", "data": {"k": n}}),
        ),
        ("no.such.command", json!({"data": {"k": c}})),
    ];
    for (command, params) in &failing {
        let resp = server.call(command, params.clone());
        assert!(
            !resp.is_ok(),
            "{command} {params} should fail: {}",
            resp.text()
        );
        responses.push(resp);
    }
    // Whole bodies that are not valid requests, with the canary inside.
    let raw_bodies: Vec<Vec<u8>> = vec![
        format!(r#"{{"command":"secret.create","params":{{"name":"x","data":{{"k":"{c}"#).into_bytes(),
        format!(r#"{{"command":"secret.create","params":{{"name":"x","data":{{"k":"{c}"}}}}}}}}"#).into_bytes(),
        format!(r#"{{"command":"secret.create","params":{{"name":"x","data":{{"k":"{c}\q"}}}}}}"#).into_bytes(),
        format!(r#"{{"command":"secret.create","params":{{"name":"x","data":{{"k":"{c}"}}}},"bogus":"{c}"}}"#).into_bytes(),
        format!(r#"{{"command":"secret.create","params":"{c}"}}"#).into_bytes(),
        format!(r#"{{"command":"secret.create","params":["{c}"]}}"#).into_bytes(),
        format!(r#"{{"command":["{c}"],"params":{{}}}}"#).into_bytes(),
        format!(r#"{{"command":"secret.create","id":{{"x":"{c}"}},"params":{{}}}}"#).into_bytes(),
        format!(r#"{{"command":"secret.create","idempotencyKey":{{"x":"{c}"}},"params":{{}}}}"#).into_bytes(),
        format!(r#"{{"command":"secret.create","nodeId":["{c}"],"params":{{}}}}"#).into_bytes(),
        format!(r#"{{"command":"secret.get","params":{{"name":"canary.secret"}},"idempotencyKey":"bad key {c}"}}"#).into_bytes(),
        format!(r#"["{c}"]"#).into_bytes(),
        format!(r#""{c}""#).into_bytes(),
        format!(r#"{{"command":"secret.create","params":{{"name":"x","data":{{"k":"{c}"}}}}, }}"#).into_bytes(),
        {
            let mut b = format!(r#"{{"command":"secret.create","params":{{"name":"x","data":{{"k":"{c}"#).into_bytes();
            b.extend_from_slice(b"\xff\xfe\"}}}");
            b
        },
    ];
    for body in &raw_bodies {
        let resp = server.post(Some(server.admin_token.as_str()), body);
        assert_eq!(resp.code(), "INVALID_ARGUMENT", "{}", resp.text());
        responses.push(resp);
    }
    // Denied and unauthenticated attempts carrying the canary.
    let resp = server.call_as(
        Some(intruder.as_str()),
        "secret.get",
        json!({"name": "canary.secret"}),
    );
    assert_eq!(resp.code(), "PERMISSION_DENIED");
    responses.push(resp);
    let resp = server.call_as(
        Some(intruder.as_str()),
        "secret.create",
        json!({"name": "canary.x", "data": {"k": c}}),
    );
    assert_eq!(resp.code(), "PERMISSION_DENIED");
    responses.push(resp);
    let resp = server.call_as(Some(intruder.as_str()), "secret.list", json!({}));
    assert_eq!(
        resp.payload(),
        json!({"secrets": []}),
        "the intruder sees nothing"
    );
    responses.push(resp);
    for token in [None, Some("not-a-token")] {
        let resp = server.call_as(
            token,
            "secret.create",
            json!({"name": "canary.x", "data": {"k": c}}),
        );
        assert_eq!(resp.code(), "UNAUTHENTICATED");
        responses.push(resp);
        let resp = server.call_as(token, "secret.get", json!({"name": "canary.secret"}));
        assert_eq!(resp.code(), "UNAUTHENTICATED");
        responses.push(resp);
    }
    // The CLI's error messages, too.
    let out = env.invoke_cli(
        "local",
        "secret.create",
        &json!({"name": "canary.cli", "data": {"k": n}}).to_string(),
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    canaries.assert_absent("CLI stderr", out.stderr.as_bytes());
    canaries.assert_absent("CLI stdout", out.stdout.as_bytes());
    let out = env.invoke_cli(
        "local",
        "config.create",
        &json!({"name": "canary.cli", "data": {"k": "v"}, "immutable": c}).to_string(),
    );
    assert_eq!(out.code(), Some(1), "{out:?}");
    canaries.assert_absent("CLI stderr", out.stderr.as_bytes());

    for resp in &responses {
        canaries.assert_absent(&format!("response {}", resp.text()), &resp.body);
    }
    // Still intact after all that.
    assert_eq!(
        server
            .call("secret.get", json!({"name": "canary.secret"}))
            .payload()["data"],
        json!({"token": canary})
    );

    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    // The logs were really at trace level, and really captured.
    assert!(
        exit.stderr.contains("invoke failed") && exit.stderr.contains("invoke ok"),
        "trace logs were not captured: {}",
        exit.stderr
    );
    canaries.assert_absent("server stderr", &exit.stderr_bytes);
    canaries.assert_absent("server stdout", &exit.stdout_bytes);

    // Every file the server wrote: data dir (store, audit log, tokens, key) and config home.
    let files = files_under(&env.root);
    files::assert_holds_audit_and_secrets(&files);
    for f in &files {
        let bytes = std::fs::read(f).unwrap();
        canaries.assert_absent(&f.display().to_string(), &bytes);
    }
    // The audit log saw all of it (so it had the chance to leak), and names no values.
    let records = env.audit_records();
    assert!(records.len() > failing.len(), "{} records", records.len());
}

/// Every secret access is recorded once, with the right decision; configs are not; values are
/// never; and `audit verify` detects edits, removals and reorderings, naming the line.
#[test]
fn audit_log_records_every_access_and_detects_tampering() {
    let env = DevEnv::new();
    let server = env.start();
    let api = env.create_token("api-server", "default");
    let intruder = env.create_token("intruder", "default");
    let value = format!("audit-value-{}", random_hex(8));
    let admin = server.admin_token.clone();

    // (token, command, params, expected decision, expected subject, expected version)
    type Step<'a> = (
        Option<&'a str>,
        &'a str,
        Value,
        &'a str,
        &'a str,
        Option<u64>,
    );
    let steps: Vec<Step> = vec![
        (
            Some(admin.as_str()),
            "secret.create",
            json!({"name": "audited", "data": {"v": value}, "allowed_workloads": ["api-server"]}),
            "allow",
            "admin",
            Some(1),
        ),
        (
            Some(admin.as_str()),
            "secret.get",
            json!({"name": "audited"}),
            "allow",
            "admin",
            Some(1),
        ),
        (
            Some(api.as_str()),
            "secret.get",
            json!({"name": "audited"}),
            "allow",
            "workload:default/api-server",
            Some(1),
        ),
        (
            Some(admin.as_str()),
            "secret.rotate",
            json!({"name": "audited", "newData": {"v": format!("{value}-2")}}),
            "allow",
            "admin",
            Some(2),
        ),
        (
            Some(admin.as_str()),
            "secret.list",
            json!({"prefix": "aud"}),
            "allow",
            "admin",
            None,
        ),
        (
            Some(intruder.as_str()),
            "secret.get",
            json!({"name": "audited"}),
            "deny",
            "workload:default/intruder",
            None,
        ),
        (
            Some(api.as_str()),
            "secret.create",
            json!({"name": "sneaky", "data": {"v": value}}),
            "deny",
            "workload:default/api-server",
            None,
        ),
        (
            Some(api.as_str()),
            "secret.delete",
            json!({"name": "audited"}),
            "deny",
            "workload:default/api-server",
            None,
        ),
        (
            None,
            "secret.get",
            json!({"name": "audited"}),
            "deny",
            "anonymous",
            None,
        ),
        (
            Some("cst_wrong"),
            "secret.get",
            json!({"name": "audited"}),
            "deny",
            "anonymous",
            None,
        ),
        (
            Some(admin.as_str()),
            "secret.get",
            json!({"name": "missing"}),
            "error",
            "admin",
            None,
        ),
        (
            Some(admin.as_str()),
            "secret.create",
            json!({"name": "audited", "data": {"v": value}}),
            "error",
            "admin",
            Some(2),
        ),
        (
            Some(admin.as_str()),
            "secret.create",
            json!({"name": "Bad Name", "data": {"v": value}}),
            "error",
            "admin",
            None,
        ),
        (
            Some(admin.as_str()),
            "secret.delete",
            json!({"name": "audited"}),
            "allow",
            "admin",
            Some(2),
        ),
        (
            Some(admin.as_str()),
            "secret.get",
            json!({"name": "audited"}),
            "error",
            "admin",
            None,
        ),
    ];
    let mut secret_ids = Vec::new();
    for (token, command, params, decision, subject, version) in &steps {
        let resp = server.call_as(*token, command, params.clone());
        let id = resp.json()["id"].as_str().unwrap().to_owned();
        assert_eq!(
            resp.is_ok(),
            *decision == "allow",
            "{command}: {}",
            resp.text()
        );
        secret_ids.push((id, *command, params.clone(), *decision, *subject, *version));
    }
    // Config writes are audited (nothing changes unaudited); config reads are not.
    let mut config_ids = Vec::new();
    for (command, params) in [
        (
            "config.create",
            json!({"name": "audited.cfg", "data": {"k": "v"}}),
        ),
        ("config.get", json!({"name": "audited.cfg"})),
        ("config.list", json!({})),
        ("config.delete", json!({"name": "audited.cfg"})),
    ] {
        let resp = server.call(command, params);
        config_ids.push((resp.json()["id"].as_str().unwrap().to_owned(), command));
        resp.payload();
    }

    // A write that is carried out is recorded twice: its intent, durable before anything
    // changes, then its commit. Everything else once.
    let is_write = |c: &str| {
        matches!(
            c,
            "secret.create" | "secret.rotate" | "secret.delete" | "config.create" | "config.delete"
        )
    };
    let expected_for = |command: &str, decision: &str| {
        if decision == "allow" && is_write(command) {
            2
        } else {
            1
        }
    };
    // Stopped first: a write's commit record is queued behind its durable intent, and written
    // at the latest when the server stops.
    let node_id = server.node_id.clone();
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    let records = env.audit_records();
    let expected_records: usize = secret_ids
        .iter()
        .map(|(_, command, _, decision, ..)| expected_for(command, decision))
        .sum::<usize>()
        + config_ids
            .iter()
            .map(|(_, c)| if is_write(c) { 2 } else { 0 })
            .sum::<usize>();
    assert_eq!(
        records.len(),
        expected_records,
        "one record per secret access (two for a write carried out), none for config reads: {records:#?}"
    );
    for (id, command, params, decision, subject, version) in &secret_ids {
        let matching: Vec<&Value> = records
            .iter()
            .filter(|r| r["requestId"].as_str() == Some(id))
            .collect();
        assert_eq!(
            matching.len(),
            expected_for(command, decision),
            "records for {command} {params}: {matching:?}"
        );
        if matching.len() == 2 {
            assert_eq!(matching[0]["phase"], json!("intent"), "{matching:?}");
            assert_eq!(matching[0]["decision"], json!("allow"), "{matching:?}");
            assert_eq!(matching[1]["phase"], json!("commit"), "{matching:?}");
        } else {
            assert!(matching[0].get("phase").is_none(), "{matching:?}");
        }
        let last = matching.last().unwrap();
        assert_eq!(
            last["decision"],
            json!(decision),
            "{command} {params}: {last}"
        );
        for r in matching {
            assert_eq!(r["command"], json!(command), "{r}");
            assert_eq!(r["subject"], json!(subject), "{r}");
            assert_eq!(r["node"], json!(node_id), "{r}");
            assert!(
                r["time"]
                    .as_str()
                    .is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()),
                "{r}"
            );
            assert!(r["reason"].as_str().is_some_and(|s| !s.is_empty()), "{r}");
            if let Some(name) = params.get("name").and_then(Value::as_str)
                && !name.contains(' ')
            {
                assert_eq!(r["name"], json!(name), "{r}");
                if *subject != "anonymous" {
                    assert_eq!(r["namespace"], json!("default"), "{r}");
                }
            }
            if let Some(v) = version {
                assert_eq!(r["version"], json!(v), "{r}");
            }
            if subject.starts_with("workload:") {
                assert_eq!(
                    r["workload"],
                    json!(subject.rsplit('/').next().unwrap()),
                    "{r}"
                );
            }
        }
    }
    for (id, command) in &config_ids {
        let audited = records
            .iter()
            .filter(|r| r["requestId"].as_str() == Some(id))
            .count();
        assert_eq!(
            audited,
            if is_write(command) { 2 } else { 0 },
            "{command} {id}"
        );
    }
    // seq runs 1..=n.
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r["seq"], json!(i as u64 + 1), "{r}");
    }
    let log_bytes = std::fs::read(env.audit_log()).unwrap();
    assert!(
        !contains_bytes(&log_bytes, value.as_bytes()),
        "the audit log holds a secret value"
    );

    // ---- verify: intact ----
    let out = env.audit_verify(&env.audit_log());
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.starts_with("OK") && out.stdout.contains(&format!("{expected_records} records")),
        "{out:?}"
    );

    // ---- verify: tampered copies ----
    let text = String::from_utf8(log_bytes).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    assert!(n >= 6);
    let mid = n / 2; // 0-based index of a middle line; 1-based line number mid + 1
    let tamper_dir = tempfile::tempdir().unwrap();
    let check = |label: &str, new_lines: Vec<String>, expect_line: usize| {
        let path = tamper_dir.path().join(format!("{label}.log"));
        let mut content = new_lines.join("\n");
        content.push('\n');
        std::fs::write(&path, content).unwrap();
        let out = env.audit_verify(&path);
        assert_ne!(
            out.code(),
            Some(0),
            "{label}: verify passed a tampered log: {out:?}"
        );
        assert!(
            out.stderr.contains(&format!("line {expect_line}:")),
            "{label}: verify should name line {expect_line}: {out:?}"
        );
    };
    let owned: Vec<String> = lines.iter().map(|s| s.to_string()).collect();

    // Edit one field of a middle line (an allow turned into a deny, or a subject changed).
    let mut edited = owned.clone();
    let target = &edited[mid];
    let changed = if target.contains("\"decision\":\"allow\"") {
        target.replace("\"decision\":\"allow\"", "\"decision\":\"deny\"")
    } else {
        target.replacen("\"subject\":\"", "\"subject\":\"x", 1)
    };
    assert_ne!(&changed, target);
    edited[mid] = changed;
    check("edited", edited, mid + 1);

    // Delete a middle line: the next one no longer links to its predecessor.
    let mut removed = owned.clone();
    removed.remove(mid);
    check("removed", removed, mid + 1);

    // Swap two adjacent middle lines.
    let mut swapped = owned.clone();
    swapped.swap(mid, mid + 1);
    check("swapped", swapped, mid + 1);

    // Delete the first line: the new first line does not start the chain.
    let mut headless = owned.clone();
    headless.remove(0);
    check("headless", headless, 1);

    // A copy that is merely a copy still verifies (the checks above are not about the copy).
    let copy = tamper_dir.path().join("copy.log");
    std::fs::write(&copy, &text).unwrap();
    assert_eq!(env.audit_verify(&copy).code(), Some(0));
}

/// Workload tokens read only what allowed_workloads grants, in their own namespace, and never
/// write; missing and wrong tokens are UNAUTHENTICATED; denials are audited.
/// `GET /metrics` counts requests by command and result, and the store's entries, with closed
/// labels only: no secret's name, no value.
#[test]
fn metrics_count_without_names_or_values() {
    let env = DevEnv::new();
    let server = env.start();
    let value = format!("metric-canary-{}", random_hex(8));
    server
        .call(
            "secret.create",
            json!({"name": "named.secret", "data": {"v": value}}),
        )
        .payload();
    server
        .call("secret.get", json!({"name": "named.secret"}))
        .payload();
    server
        .call("secret.get", json!({"name": "missing.secret"}))
        .expect_error("NOT_FOUND");
    server
        .call_as(None, "secret.get", json!({"name": "named.secret"}))
        .expect_error("UNAUTHENTICATED");
    let (status, text) = process::http_get(server.port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200, "{text}");
    for line in [
        "claw_secrets_requests_total{command=\"secret.create\",result=\"OK\"} 1",
        "claw_secrets_requests_total{command=\"secret.get\",result=\"OK\"} 1",
        "claw_secrets_requests_total{command=\"secret.get\",result=\"NOT_FOUND\"} 1",
        "claw_secrets_requests_total{command=\"secret.get\",result=\"UNAUTHENTICATED\"} 1",
        "claw_secrets_store_entries{kind=\"ClawSecret\",state=\"held\"} 1",
        "claw_secrets_store_entries{kind=\"ClawSecret\",state=\"refused\"} 0",
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing {line:?} in\n{text}"
        );
    }
    assert!(
        text.contains("claw_secrets_audit_append_seconds_count"),
        "{text}"
    );
    for forbidden in [value.as_str(), "named.secret", "missing.secret"] {
        assert!(!text.contains(forbidden), "{forbidden} in\n{text}");
    }
    let exit = server.stop();
    assert!(exit.status.success());
}

#[test]
fn workload_access_rules() {
    let env = DevEnv::new();
    let server = env.start();
    let db = json!({"username": "admin", "password": "s3cret"});
    server
        .call(
            "secret.create",
            json!({"name": "db.password", "data": db, "allowed_workloads": ["api-server", "worker"]}),
        )
        .payload();
    server
        .call(
            "secret.create",
            json!({"name": "shared.key", "data": {"k": "shared"}}),
        )
        .payload();
    server
        .call(
            "secret.create",
            json!({"name": "other.only", "data": {"k": "o"}, "allowed_workloads": ["worker"]}),
        )
        .payload();
    server
        .call(
            "config.create",
            json!({"name": "app.settings", "data": {"log_level": "info"}}),
        )
        .payload();

    let api = env.create_token("api-server", "default");
    let worker = env.create_token("worker", "default");
    let intruder = env.create_token("intruder", "default");
    let elsewhere = env.create_token("api-server", "other");

    // ---- reads that are granted ----
    let got = server.call_as(
        Some(api.as_str()),
        "secret.get",
        json!({"name": "db.password"}),
    );
    assert_eq!(got.payload()["data"], db);
    assert_eq!(got.payload()["version"], json!(1));
    let got = server.call_as(
        Some(worker.as_str()),
        "secret.get",
        json!({"name": "db.password"}),
    );
    assert_eq!(got.payload()["data"], db);
    // An empty allowed_workloads lets any workload of the namespace read.
    let got = server.call_as(
        Some(intruder.as_str()),
        "secret.get",
        json!({"name": "shared.key"}),
    );
    assert_eq!(got.payload()["data"], json!({"k": "shared"}));
    // Workloads may read configs of their namespace.
    let got = server.call_as(
        Some(api.as_str()),
        "config.get",
        json!({"name": "app.settings"}),
    );
    assert_eq!(got.payload()["data"], json!({"log_level": "info"}));
    // The CLI with --token and with $CLAW_SECRETS_TOKEN.
    let out = env.cli(&[
        "invoke",
        "local",
        "secret.get",
        r#"{"name":"db.password"}"#,
        "--token",
        &api,
    ]);
    assert_eq!(out.outcome().unwrap()["data"], db);
    let out = env.cli_env(
        &["invoke", "local", "secret.get", r#"{"name":"db.password"}"#],
        &[("CLAW_SECRETS_TOKEN", &intruder)],
    );
    assert_eq!(out.outcome().unwrap_err().0, "PERMISSION_DENIED");

    // ---- a workload not in allowed_workloads ----
    let denied = server.call_as(
        Some(intruder.as_str()),
        "secret.get",
        json!({"name": "db.password"}),
    );
    let msg = denied.expect_error("PERMISSION_DENIED");
    assert!(
        !msg.contains("s3cret") && !denied.text().contains("s3cret"),
        "{msg}"
    );
    let denied_id = denied.json()["id"].as_str().unwrap().to_owned();
    let denied = server.call_as(
        Some(api.as_str()),
        "secret.get",
        json!({"name": "other.only"}),
    );
    denied.expect_error("PERMISSION_DENIED");
    // A list shows a workload only what it could read.
    let listed = server
        .call_as(Some(api.as_str()), "secret.list", json!({}))
        .payload();
    assert_eq!(
        dev_server::names_of(&listed, "secrets"),
        ["db.password", "shared.key"]
    );
    let listed = server
        .call_as(Some(intruder.as_str()), "secret.list", json!({}))
        .payload();
    assert_eq!(dev_server::names_of(&listed, "secrets"), ["shared.key"]);

    // ---- the denial is audited with decision deny and the subject ----
    let records = env.audit_records();
    let rec = records
        .iter()
        .find(|r| r["requestId"].as_str() == Some(denied_id.as_str()))
        .unwrap_or_else(|| panic!("no audit record for the denial: {records:#?}"));
    assert_eq!(rec["decision"], json!("deny"), "{rec}");
    assert_eq!(rec["subject"], json!("workload:default/intruder"), "{rec}");
    assert_eq!(rec["workload"], json!("intruder"), "{rec}");
    assert_eq!(rec["name"], json!("db.password"), "{rec}");
    assert_eq!(rec["command"], json!("secret.get"), "{rec}");

    // ---- missing and wrong tokens ----
    let body =
        serde_json::to_vec(&json!({"command": "secret.get", "params": {"name": "db.password"}}))
            .unwrap();
    for (label, headers) in [
        ("no header", vec![]),
        (
            "wrong token",
            vec![("Authorization", "Bearer cst_not-a-real-token")],
        ),
        ("empty bearer", vec![("Authorization", "Bearer ")]),
        (
            "basic auth",
            vec![("Authorization", "Basic YWRtaW46YWRtaW4=")],
        ),
        (
            "token without scheme",
            vec![("Authorization", server.admin_token.as_str())],
        ),
    ] {
        let resp = dev_server::http_post_raw(server.port, "/v1/invoke", &headers, &body).unwrap();
        assert_eq!(resp.status, 401, "{label}: {}", resp.text());
        resp.expect_error("UNAUTHENTICATED");
        assert!(!resp.text().contains("s3cret"), "{label}");
    }
    // Even a config read or a malformed body needs a token.
    let resp = server.call_as(None, "config.get", json!({"name": "app.settings"}));
    resp.expect_error("UNAUTHENTICATED");
    let resp = server.post(None, b"not json");
    resp.expect_error("UNAUTHENTICATED");

    // ---- workload tokens cannot write ----
    for (command, params) in [
        (
            "secret.create",
            json!({"name": "planted", "data": {"k": "v"}}),
        ),
        (
            "secret.rotate",
            json!({"name": "db.password", "newData": {"password": "pwned"}}),
        ),
        ("secret.delete", json!({"name": "db.password"})),
        (
            "config.create",
            json!({"name": "planted", "data": {"k": "v"}}),
        ),
        (
            "config.update",
            json!({"name": "app.settings", "data": {"log_level": "trace"}}),
        ),
        ("config.delete", json!({"name": "app.settings"})),
    ] {
        for token in [&api, &worker] {
            let resp = server.call_as(Some(token.as_str()), command, params.clone());
            resp.expect_error("PERMISSION_DENIED");
        }
    }
    let got = server
        .call("secret.get", json!({"name": "db.password"}))
        .payload();
    assert_eq!(got["data"], db, "refused writes changed nothing");
    assert_eq!(got["version"], json!(1));
    server
        .call("secret.get", json!({"name": "planted"}))
        .expect_error("NOT_FOUND");
    assert_eq!(
        server
            .call("config.get", json!({"name": "app.settings"}))
            .payload()["data"],
        json!({"log_level": "info"})
    );

    // ---- a workload of another namespace ----
    // Without a namespace it looks in its own, where there is no such secret: it is told no
    // more than for a secret it may not read (it cannot probe names).
    server
        .call_as(
            Some(elsewhere.as_str()),
            "secret.get",
            json!({"name": "db.password"}),
        )
        .expect_error("PERMISSION_DENIED");
    // Naming the other namespace is refused.
    let resp = server.call_as(
        Some(elsewhere.as_str()),
        "secret.get",
        json!({"name": "db.password", "namespace": "default"}),
    );
    resp.expect_error("PERMISSION_DENIED");
    assert!(!resp.text().contains("s3cret"));
    server
        .call_as(
            Some(elsewhere.as_str()),
            "secret.list",
            json!({"namespace": "default"}),
        )
        .expect_error("PERMISSION_DENIED");
    assert_eq!(
        server
            .call_as(Some(elsewhere.as_str()), "secret.list", json!({}))
            .payload(),
        json!({"secrets": []})
    );
    server
        .call_as(
            Some(elsewhere.as_str()),
            "config.get",
            json!({"name": "app.settings", "namespace": "default"}),
        )
        .expect_error("PERMISSION_DENIED");

    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    assert_eq!(env.audit_verify(&env.audit_log()).code(), Some(0));
}

/// A token made with `token create` works at once, also right after another one was created
/// and used: the server must notice every change to the tokens file, however close together.
#[test]
fn new_tokens_work_immediately() {
    use claw_secrets::backends::local::tokens::{TokenEntry, add_token};
    use claw_secrets::domain::{Namespace, Workload};

    let env = DevEnv::new();
    let server = env.start();
    server
        .call("secret.create", json!({"name": "open", "data": {"k": "v"}}))
        .payload();
    // Through the CLI, as a user does it.
    for i in 0..5 {
        let token = env.create_token(&format!("cli-w{i}"), "default");
        let resp = server.call_as(Some(token.as_str()), "secret.get", json!({"name": "open"}));
        assert!(
            resp.is_ok(),
            "CLI token {i} was not accepted right after it was created: {}",
            resp.text()
        );
    }
    // Through the function `token create` runs, back to back: two writes of the tokens file
    // can fall within one tick of the file system's clock, so they share an mtime.
    let tokens_file = env.data_dir.join("tokens.json");
    let mut rejected = Vec::new();
    for i in 0..100 {
        let workload = format!("lib-w{i}");
        let token = add_token(
            &tokens_file,
            TokenEntry {
                sha256: String::new(),
                subject: format!("workload:default/{workload}"),
                namespace: Some(Namespace::parse("default").unwrap()),
                workload: Some(Workload::parse(&workload).unwrap()),
                admin: false,
            },
        )
        .unwrap();
        let resp = server.call_as(Some(token.as_str()), "secret.get", json!({"name": "open"}));
        if !resp.is_ok() {
            rejected.push((i, resp.code()));
        }
    }
    assert!(
        rejected.is_empty(),
        "{} of 100 new tokens were refused right after they were written: {rejected:?}",
        rejected.len()
    );
}

/// `token create` run in parallel (a provisioning script with `&`) must not lose tokens: every
/// token printed works.
#[test]
fn parallel_token_creates_keep_every_token() {
    let env = DevEnv::new();
    let server = env.start();
    server
        .call("secret.create", json!({"name": "open", "data": {"k": "v"}}))
        .payload();
    let children: Vec<_> = (0..12)
        .map(|i| {
            env.command()
                .args([
                    "token",
                    "create",
                    "--data-dir",
                    env.data_dir.to_str().unwrap(),
                    "--workload",
                    &format!("par-w{i}"),
                ])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let tokens: Vec<String> = children
        .into_iter()
        .map(|c| {
            let out = c.wait_with_output().unwrap();
            assert!(out.status.success(), "{out:?}");
            String::from_utf8(out.stdout).unwrap().trim().to_owned()
        })
        .collect();
    let refused: Vec<usize> = tokens
        .iter()
        .enumerate()
        .filter(|(_, t)| {
            !server
                .call_as(Some(t.as_str()), "secret.get", json!({"name": "open"}))
                .is_ok()
        })
        .map(|(i, _)| i)
        .collect();
    assert!(
        refused.is_empty(),
        "{} of {} tokens created in parallel do not work: {refused:?}",
        refused.len(),
        tokens.len()
    );
}

/// `token create` finds the dev server's data dir the way `dev` does: from
/// CLAW_SECRETS_DATA_DIR when --data-dir is not given. A token written anywhere else would be
/// printed, look fine, and be refused.
#[test]
fn token_create_reads_the_data_dir_from_the_environment() {
    let env = DevEnv::new();
    let server = env.start();
    server
        .call("secret.create", json!({"name": "open", "data": {"k": "v"}}))
        .payload();
    let out = env.cli_env(
        &["token", "create", "--workload", "env-w"],
        &[("CLAW_SECRETS_DATA_DIR", env.data_dir.to_str().unwrap())],
    );
    assert!(out.status.success(), "{out:?}");
    let token = out.stdout.trim();
    let resp = server.call_as(Some(token), "secret.get", json!({"name": "open"}));
    assert!(
        resp.is_ok(),
        "a token created with CLAW_SECRETS_DATA_DIR was refused: {}",
        resp.text()
    );
}
