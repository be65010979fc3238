//! Every example of the seed (secrets-config-manager.md), through the real `claw-secrets dev`
//! server, once over HTTP and once through the real CLI, with the payloads it promises.

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

#[path = "support/protocol.rs"]
mod protocol;

#[path = "support/dev_server.rs"]
mod dev_server;

use dev_server::{DevEnv, DevServer, Outcome};
use serde_json::{Value, json};
use std::collections::BTreeSet;

/// One way of reaching a node: HTTP or the CLI.
trait Api {
    fn call(&self, node: &str, command: &str, params: &Value) -> Outcome;
}

struct Http<'a>(&'a DevServer);

impl Api for Http<'_> {
    fn call(&self, node: &str, command: &str, params: &Value) -> Outcome {
        let body = json!({
            "id": dev_server::next_request_id("seed"),
            "nodeId": node,
            "command": command,
            "params": params,
        });
        let resp = self.0.request(&body);
        // Whatever the outcome, the answer carries the request's id.
        assert_eq!(resp.json()["id"], body["id"], "{}", resp.text());
        resp.outcome()
    }
}

struct Cli<'a>(&'a DevEnv);

impl Api for Cli<'_> {
    fn call(&self, node: &str, command: &str, params: &Value) -> Outcome {
        self.0
            .invoke_cli(node, command, &params.to_string())
            .outcome()
    }
}

#[track_caller]
fn ok(api: &dyn Api, node: &str, command: &str, params: Value) -> Value {
    match api.call(node, command, &params) {
        Ok(v) => v,
        Err((code, msg)) => panic!("{command} {params} failed: {code}: {msg}"),
    }
}

#[track_caller]
fn err(api: &dyn Api, node: &str, command: &str, params: Value, code: &str) -> String {
    match api.call(node, command, &params) {
        Ok(v) => panic!("{command} {params} succeeded ({v}); expected {code}"),
        Err((got, msg)) => {
            assert_eq!(got, code, "{command} {params}: {msg}");
            assert!(!msg.trim().is_empty(), "{command}: empty message");
            msg
        }
    }
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn ts(v: &Value, field: &str) -> jiff::Timestamp {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("{field} is not a string: {v}"))
        .parse()
        .unwrap_or_else(|e| panic!("{field} is not an RFC 3339 timestamp ({e}): {v}"))
}

const SECRET_META_KEYS: &[&str] = &[
    "name",
    "namespace",
    "version",
    "createdAt",
    "updatedAt",
    "allowed_workloads",
];
const CONFIG_META_KEYS: &[&str] = &["name", "namespace", "immutable", "createdAt", "updatedAt"];

/// Checks a secret's metadata (a create/rotate answer, or a list entry): exactly the metadata
/// fields, never data.
#[track_caller]
fn assert_secret_meta(v: &Value, name: &str, version: u64, allowed: &[&str]) {
    assert_eq!(keys(v), set(SECRET_META_KEYS), "{v}");
    assert_eq!(v["name"], json!(name), "{v}");
    assert_eq!(v["namespace"], json!("default"), "{v}");
    assert_eq!(v["version"], json!(version), "{v}");
    assert_eq!(v["allowed_workloads"], json!(allowed), "{v}");
    assert!(ts(v, "updatedAt") >= ts(v, "createdAt"), "{v}");
}

#[track_caller]
fn assert_config_meta(v: &Value, name: &str, immutable: bool) {
    assert_eq!(keys(v), set(CONFIG_META_KEYS), "{v}");
    assert_eq!(v["name"], json!(name), "{v}");
    assert_eq!(v["namespace"], json!("default"), "{v}");
    assert_eq!(v["immutable"], json!(immutable), "{v}");
    assert!(ts(v, "updatedAt") >= ts(v, "createdAt"), "{v}");
}

fn list_names(v: &Value, field: &str) -> Vec<String> {
    assert_eq!(keys(v), set(&[field]), "{v}");
    dev_server::names_of(v, field)
}

/// The whole seed, in the order a reader meets it.
fn seed_scenario(api: &dyn Api, node: &str) {
    // ---- secret.create (the seed's example) ----
    let db_password = json!({"username": "admin", "password": "s3cret"});
    let created = ok(
        api,
        node,
        "secret.create",
        json!({
            "name": "db.password",
            "data": db_password,
            "allowed_workloads": ["api-server", "worker"]
        }),
    );
    assert_secret_meta(&created, "db.password", 1, &["api-server", "worker"]);
    assert_eq!(created["createdAt"], created["updatedAt"], "{created}");
    assert!(!created.to_string().contains("s3cret"), "{created}");

    // ---- secret.get: decrypted data, version, timestamps ----
    let got = ok(api, node, "secret.get", json!({"name": "db.password"}));
    assert_eq!(
        keys(&got),
        &set(SECRET_META_KEYS) | &set(&["data"]),
        "{got}"
    );
    assert_eq!(got["data"], db_password);
    assert_eq!(got["version"], json!(1));
    assert_eq!(got["createdAt"], created["createdAt"]);
    assert_eq!(got["updatedAt"], created["updatedAt"]);
    assert_eq!(got["allowed_workloads"], json!(["api-server", "worker"]));

    // ---- duplicate create ----
    err(
        api,
        node,
        "secret.create",
        json!({"name": "db.password", "data": {"password": "other"}}),
        "ALREADY_EXISTS",
    );
    assert_eq!(
        ok(api, node, "secret.get", json!({"name": "db.password"}))["data"],
        db_password,
        "a refused duplicate must not change the secret"
    );

    // ---- Common Patterns: database credentials and API keys ----
    let creds =
        json!({"host": "db.internal", "port": "5432", "username": "app", "password": "secret"});
    let c = ok(
        api,
        node,
        "secret.create",
        json!({"name": "db.credentials", "data": creds, "allowed_workloads": ["api-server"]}),
    );
    assert_secret_meta(&c, "db.credentials", 1, &["api-server"]);
    let openai = json!({"api_key": "sk-..."});
    let o = ok(
        api,
        node,
        "secret.create",
        json!({"name": "external.openai", "data": openai, "allowed_workloads": ["inference-server"]}),
    );
    assert_secret_meta(&o, "external.openai", 1, &["inference-server"]);
    assert_eq!(
        ok(api, node, "secret.get", json!({"name": "db.credentials"}))["data"],
        creds
    );
    assert_eq!(
        ok(api, node, "secret.get", json!({"name": "external.openai"}))["data"],
        openai
    );
    // allowed_workloads is optional: an unrestricted secret.
    let plain = ok(
        api,
        node,
        "secret.create",
        json!({"name": "dbx.unrestricted", "data": {"token": "t0ken"}}),
    );
    assert_secret_meta(&plain, "dbx.unrestricted", 1, &[]);

    // ---- secret.list: names, versions, timestamps, never values; sorted; prefix ----
    let listed = ok(api, node, "secret.list", json!({"prefix": "db."}));
    assert_eq!(
        list_names(&listed, "secrets"),
        ["db.credentials", "db.password"],
        "prefix db. lists exactly the db. secrets, sorted (dbx.* does not match): {listed}"
    );
    for e in listed["secrets"].as_array().unwrap() {
        let allowed: Vec<&str> = e["allowed_workloads"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_str().unwrap())
            .collect();
        assert_secret_meta(e, e["name"].as_str().unwrap(), 1, &allowed);
    }
    assert_eq!(listed["secrets"][1]["createdAt"], created["createdAt"]);
    let text = listed.to_string();
    for value in ["s3cret", "db.internal", "5432", "\"app\""] {
        assert!(
            !text.contains(value),
            "list shows the value {value}: {text}"
        );
    }
    let all = ok(api, node, "secret.list", json!({}));
    assert_eq!(
        list_names(&all, "secrets"),
        [
            "db.credentials",
            "db.password",
            "dbx.unrestricted",
            "external.openai"
        ],
        "no prefix lists everything, sorted"
    );
    for value in ["sk-...", "t0ken", "s3cret"] {
        assert!(!all.to_string().contains(value), "{all}");
    }
    let ext = ok(api, node, "secret.list", json!({"prefix": "external."}));
    assert_eq!(list_names(&ext, "secrets"), ["external.openai"]);
    let none = ok(api, node, "secret.list", json!({"prefix": "nothing."}));
    assert_eq!(none, json!({"secrets": []}));

    // ---- secret.rotate ----
    let new_data = json!({"username": "admin", "password": "n3w-s3cret"});
    let rotated = ok(
        api,
        node,
        "secret.rotate",
        json!({"name": "db.password", "newData": new_data}),
    );
    assert_secret_meta(&rotated, "db.password", 2, &["api-server", "worker"]);
    assert_eq!(rotated["createdAt"], created["createdAt"]);
    assert!(ts(&rotated, "updatedAt") >= ts(&created, "updatedAt"));
    let got = ok(api, node, "secret.get", json!({"name": "db.password"}));
    assert_eq!(got["version"], json!(2));
    assert_eq!(got["data"], new_data, "the old value is gone");
    assert_eq!(got["createdAt"], created["createdAt"]);
    assert_eq!(got["updatedAt"], rotated["updatedAt"]);
    let listed = ok(api, node, "secret.list", json!({"prefix": "db.p"}));
    assert_eq!(list_names(&listed, "secrets"), ["db.password"]);
    assert_eq!(listed["secrets"][0]["version"], json!(2));
    err(
        api,
        node,
        "secret.rotate",
        json!({"name": "no.such", "newData": {"a": "b"}}),
        "NOT_FOUND",
    );

    // ---- secret.delete ----
    let deleted = ok(api, node, "secret.delete", json!({"name": "db.password"}));
    assert_eq!(
        deleted,
        json!({"name": "db.password", "namespace": "default", "deleted": true})
    );
    err(
        api,
        node,
        "secret.get",
        json!({"name": "db.password"}),
        "NOT_FOUND",
    );
    err(
        api,
        node,
        "secret.delete",
        json!({"name": "db.password"}),
        "NOT_FOUND",
    );
    err(
        api,
        node,
        "secret.rotate",
        json!({"name": "db.password", "newData": new_data}),
        "NOT_FOUND",
    );
    let listed = ok(api, node, "secret.list", json!({"prefix": "db."}));
    assert_eq!(list_names(&listed, "secrets"), ["db.credentials"]);
    // A deleted name can be created again, from version 1.
    let again = ok(
        api,
        node,
        "secret.create",
        json!({"name": "db.password", "data": {"password": "fresh"}}),
    );
    assert_secret_meta(&again, "db.password", 1, &[]);

    // ---- config.create / get ----
    let settings = json!({"log_level": "info", "port": "8080", "workers": "4"});
    let cfg = ok(
        api,
        node,
        "config.create",
        json!({"name": "app.settings", "data": settings, "immutable": false}),
    );
    assert_config_meta(&cfg, "app.settings", false);
    assert_eq!(cfg["createdAt"], cfg["updatedAt"]);
    let got = ok(api, node, "config.get", json!({"name": "app.settings"}));
    assert_eq!(
        keys(&got),
        &set(CONFIG_META_KEYS) | &set(&["data"]),
        "{got}"
    );
    assert_eq!(got["data"], settings);
    assert_eq!(got["immutable"], json!(false));
    assert_eq!(got["createdAt"], cfg["createdAt"]);
    err(
        api,
        node,
        "config.create",
        json!({"name": "app.settings", "data": {"x": "y"}}),
        "ALREADY_EXISTS",
    );

    // ---- config.update ----
    let updated_data = json!({"log_level": "debug", "port": "8080", "workers": "8"});
    let upd = ok(
        api,
        node,
        "config.update",
        json!({"name": "app.settings", "data": updated_data}),
    );
    assert_config_meta(&upd, "app.settings", false);
    assert_eq!(upd["createdAt"], cfg["createdAt"]);
    let got = ok(api, node, "config.get", json!({"name": "app.settings"}));
    assert_eq!(got["data"], updated_data);
    assert_eq!(got["updatedAt"], upd["updatedAt"]);
    err(
        api,
        node,
        "config.update",
        json!({"name": "no.such", "data": {"a": "b"}}),
        "NOT_FOUND",
    );

    // ---- Common Patterns: application config, immutable ----
    let production =
        json!({"replicas": "3", "log_level": "warn", "feature_flags": "new-ui,fast-inference"});
    let prod = ok(
        api,
        node,
        "config.create",
        json!({"name": "app.production", "data": production, "immutable": true}),
    );
    assert_config_meta(&prod, "app.production", true);
    let msg = err(
        api,
        node,
        "config.update",
        json!({"name": "app.production", "data": {"replicas": "5"}}),
        "FAILED_PRECONDITION",
    );
    assert!(msg.contains("immutable"), "{msg}");
    let got = ok(api, node, "config.get", json!({"name": "app.production"}));
    assert_eq!(got["data"], production, "a refused update changes nothing");
    assert_eq!(got["immutable"], json!(true));
    assert_eq!(got["updatedAt"], prod["updatedAt"]);

    // ---- config.list ----
    ok(
        api,
        node,
        "config.create",
        json!({"name": "web.settings", "data": {"theme": "dark"}}),
    );
    let listed = ok(api, node, "config.list", json!({"prefix": "app."}));
    assert_eq!(
        list_names(&listed, "configs"),
        ["app.production", "app.settings"]
    );
    assert_config_meta(&listed["configs"][0], "app.production", true);
    assert_config_meta(&listed["configs"][1], "app.settings", false);
    assert!(!listed.to_string().contains("new-ui"), "{listed}");
    let all = ok(api, node, "config.list", json!({}));
    assert_eq!(
        list_names(&all, "configs"),
        ["app.production", "app.settings", "web.settings"]
    );

    // ---- config.delete ----
    let deleted = ok(api, node, "config.delete", json!({"name": "app.settings"}));
    assert_eq!(
        deleted,
        json!({"name": "app.settings", "namespace": "default", "deleted": true})
    );
    err(
        api,
        node,
        "config.get",
        json!({"name": "app.settings"}),
        "NOT_FOUND",
    );
    err(
        api,
        node,
        "config.delete",
        json!({"name": "app.settings"}),
        "NOT_FOUND",
    );
    // An immutable config can still be deleted (and so replaced).
    ok(
        api,
        node,
        "config.delete",
        json!({"name": "app.production"}),
    );
    let all = ok(api, node, "config.list", json!({}));
    assert_eq!(list_names(&all, "configs"), ["web.settings"]);

    // ---- secrets and configs are separate kinds ----
    err(
        api,
        node,
        "config.get",
        json!({"name": "db.credentials"}),
        "NOT_FOUND",
    );
    err(
        api,
        node,
        "secret.get",
        json!({"name": "web.settings"}),
        "NOT_FOUND",
    );
}

/// The printed node id and `local` both reach the node; another id is NOT_FOUND.
fn node_ids(api: &dyn Api, node: &str) {
    ok(
        api,
        node,
        "secret.create",
        json!({"name": "node.check", "data": {"k": "v"}}),
    );
    assert_eq!(
        ok(api, node, "secret.get", json!({"name": "node.check"}))["data"],
        json!({"k": "v"})
    );
    assert_eq!(
        ok(api, "local", "secret.get", json!({"name": "node.check"}))["data"],
        json!({"k": "v"})
    );
    let msg = err(
        api,
        "other-node",
        "secret.get",
        json!({"name": "node.check"}),
        "NOT_FOUND",
    );
    assert!(msg.contains(node), "the message names this node: {msg}");
    // A write to another node must not land here.
    err(
        api,
        "other-node",
        "secret.create",
        json!({"name": "node.elsewhere", "data": {"k": "v"}}),
        "NOT_FOUND",
    );
    err(
        api,
        node,
        "secret.get",
        json!({"name": "node.elsewhere"}),
        "NOT_FOUND",
    );
}

#[test]
fn seed_examples_over_http() {
    let env = DevEnv::new();
    let server = env.start();
    seed_scenario(&Http(&server), &server.node_id);
    node_ids(&Http(&server), &server.node_id);

    // nodeId is optional on the wire.
    let resp = server.request(&json!({"command": "secret.get", "params": {"name": "node.check"}}));
    assert_eq!(resp.payload()["data"], json!({"k": "v"}));
    // Without an id, the server makes one up and still answers with it.
    assert!(resp.json()["id"].as_str().is_some_and(|s| !s.is_empty()));

    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
}

#[test]
fn seed_examples_over_cli() {
    let env = DevEnv::with_node_id("cli-node");
    let server = env.start();
    // The CLI finds the server and the admin token through $XDG_CONFIG_HOME/claw-secrets/dev.json.
    let dev_json = env.config_home.join("claw-secrets/dev.json");
    let cfg: Value = serde_json::from_slice(&std::fs::read(&dev_json).unwrap()).unwrap();
    assert_eq!(
        cfg["addr"],
        json!(format!("http://127.0.0.1:{}", server.port))
    );
    assert_eq!(cfg["nodeId"], json!("cli-node"));
    assert!(
        !std::fs::read_to_string(&dev_json)
            .unwrap()
            .contains(&server.admin_token),
        "dev.json holds the token's path, not the token"
    );

    seed_scenario(&Cli(&env), &server.node_id);
    node_ids(&Cli(&env), &server.node_id);
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
}

#[test]
fn cli_usage_errors_exit_2_and_server_errors_exit_1() {
    let env = DevEnv::new();
    // No server has ever run for this user: nothing to connect to.
    let out = env.invoke_cli("local", "secret.get", r#"{"name":"x"}"#);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(!out.stderr.trim().is_empty());

    let server = env.start();
    // Params that are not JSON are a usage error, caught before any request.
    let out = env.invoke_cli("local", "secret.get", "{name: x}");
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    // Missing arguments are a usage error.
    let out = env.cli(&["invoke", "local"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    // A server-side error is exit 1 with CODE: message.
    let out = env.invoke_cli("local", "secret.get", r#"{"name":"x"}"#);
    assert_eq!(out.outcome().unwrap_err().0, "NOT_FOUND", "{out:?}");
    let out = env.invoke_cli("local", "no.such.command", "{}");
    assert_eq!(out.outcome().unwrap_err().0, "INVALID_ARGUMENT");
    // Params from stdin keep values out of the shell history.
    let mut child = env
        .command()
        .args(["invoke", "local", "secret.create", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(br#"{"name":"from.stdin","data":{"password":"piped"}}"#)
            .unwrap();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        server
            .call("secret.get", json!({"name": "from.stdin"}))
            .payload()["data"],
        json!({"password": "piped"})
    );
    // A server that is gone is reported, not hung on.
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    let out = env.invoke_cli("local", "secret.get", r#"{"name":"x"}"#);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.stderr.starts_with("UNAVAILABLE: "), "{out:?}");
}
