//! node.invoke through the real OpenClaw gateway (`openclaw@2026.9.6`, protocol v4), against
//! `claw-secrets dev --gateway`: the ten commands through the `openclaw` CLI and the raw
//! `node.invoke` RPC answer what HTTP answers; pairing by setup code and by approval, and a
//! second start that pairs no more; the node's return after the gateway restarts; a call given
//! up by the gateway changes nothing; 32 calls in flight; and no secret value in the node's
//! logs. One gateway for the whole binary (tests/support/openclaw.rs).

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

#[path = "support/protocol.rs"]
mod protocol;

#[path = "support/dev_server.rs"]
mod dev_server;

#[path = "support/process.rs"]
mod process;

#[path = "support/files.rs"]
mod files;

#[path = "support/canary.rs"]
mod canary;

#[path = "support/openclaw.rs"]
mod openclaw;

use dev_server::{DevEnv, DevServer, Outcome};
use openclaw::{CliInvoke, Gateway, OperatorClient, gateway};
use serde_json::{Value, json};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

/// Restarting the gateway disturbs every node of the binary: that test takes this for writing,
/// the others for reading.
static GATEWAY_LIFECYCLE: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    GATEWAY_LIFECYCLE.read().unwrap_or_else(|e| e.into_inner())
}

/// How a node pairs with the gateway on this start.
enum Pairing {
    /// A fresh single-use setup code: device and commands approved, nobody involved.
    SetupCode,
    /// The gateway token: the device is approved on loopback, the commands wait for approval.
    GatewayToken,
    /// Nothing but what the data dir kept from an earlier pairing (the device token).
    Saved,
}

/// `claw-secrets dev` as a gateway node, connected, and the node id callers name.
struct Node {
    server: DevServer,
    id: String,
}

fn start_node(env: &DevEnv, gw: &Gateway, pairing: Pairing, principal: &str) -> Node {
    start_node_with(env, gw, pairing, principal, &[])
}

fn start_node_with(
    env: &DevEnv,
    gw: &Gateway,
    pairing: Pairing,
    principal: &str,
    envs: &[(&str, &str)],
) -> Node {
    let url = gw.url();
    let mut args = vec!["--gateway", &url, "--gateway-principal", principal];
    let code;
    let token_file = env.root.join("gateway.token");
    match pairing {
        Pairing::SetupCode => {
            code = gw.setup_code();
            args.extend(["--gateway-setup-code", &code]);
        }
        Pairing::GatewayToken => {
            std::fs::write(&token_file, gw.token()).unwrap();
            args.extend(["--gateway-token-file", token_file.to_str().unwrap()]);
        }
        Pairing::Saved => {}
    }
    let server = env.start_args(&args, envs);
    let id = device_id(env);
    assert!(
        server.wait_for_output(false, &format!("as node {id}")),
        "the node id is not printed at start: {}",
        server.stdout_text()
    );
    let node = Node { server, id };
    node.wait_connected();
    node
}

/// The node id kept in the data dir.
fn device_id(env: &DevEnv) -> String {
    let path = env.data_dir.join("gateway/device.json");
    let file: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let id = file["deviceId"].as_str().unwrap().to_owned();
    assert_eq!(id.len(), 64);
    id
}

impl Node {
    fn readyz(&self) -> String {
        process::http_get(self.server.port, "/readyz")
            .map(|(_, body)| body)
            .unwrap_or_default()
    }

    fn wait_connected(&self) -> Duration {
        let started = Instant::now();
        while !self.readyz().contains("gateway: connected") {
            assert!(
                started.elapsed() < wait::PATIENCE,
                "the node did not connect: {}\n{}",
                self.readyz(),
                self.server.stderr_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        started.elapsed()
    }
}

/// Polls `check` every 100 ms until it is `Ok` (blocking), failing after [`wait::PATIENCE`].
fn poll_until<T>(what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let started = Instant::now();
    loop {
        match check() {
            Ok(v) => return v,
            Err(last) if started.elapsed() > wait::PATIENCE => {
                panic!("timed out waiting for {what}; last state: {last}")
            }
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Outcomes, as each way of calling shows them
// ---------------------------------------------------------------------------------------------

/// `openclaw nodes invoke --json`: the payload, or `{"error": {"message": "CODE: message"}}`.
fn cli_outcome(out: &CliInvoke) -> Outcome {
    let json = out
        .json
        .as_ref()
        .unwrap_or_else(|| panic!("the CLI printed no JSON: {out:?}"));
    if out.success() {
        assert_eq!(json["ok"], json!(true), "{json}");
        return Ok(json["payload"].clone());
    }
    let message = json["error"]["message"]
        .as_str()
        .unwrap_or_else(|| panic!("a failure without a message: {json}"));
    let (code, message) = message
        .split_once(": ")
        .unwrap_or_else(|| panic!("not CODE: message: {message:?}"));
    Err((code.to_owned(), message.to_owned()))
}

/// `openclaw gateway call node.invoke --json`: the payload, or the node's error as the
/// gateway passes it on (`details.nodeError`, with only `code` and `message`).
fn rpc_outcome(out: &CliInvoke) -> Outcome {
    let json = out
        .json
        .as_ref()
        .unwrap_or_else(|| panic!("the CLI printed no JSON: {out:?}"));
    if json["ok"] == json!(true) {
        return Ok(json["payload"].clone());
    }
    let error = &json["error"]["details"]["nodeError"];
    let keys: Vec<&String> = error
        .as_object()
        .unwrap_or_else(|| panic!("no nodeError: {json}"))
        .keys()
        .collect();
    assert_eq!(keys, ["code", "message"], "{json}");
    Err((
        error["code"].as_str().unwrap().to_owned(),
        error["message"].as_str().unwrap().to_owned(),
    ))
}

fn rpc(gw: &Gateway, node: &str, command: &str, params: &Value, key: &str) -> CliInvoke {
    rpc_timed(gw, node, command, params, 30_000, key)
}

/// [`rpc`] with the caller's `timeoutMs`.
fn rpc_timed(
    gw: &Gateway,
    node: &str,
    command: &str,
    params: &Value,
    timeout_ms: u64,
    key: &str,
) -> CliInvoke {
    gw.gateway_call(
        "node.invoke",
        &json!({"nodeId": node, "command": command, "params": params, "timeoutMs": timeout_ms, "idempotencyKey": key}),
    )
}

/// An outcome with its lane's namespace written as `NS` and the times left out, so that lanes
/// can be compared.
fn normalized(outcome: &Outcome, namespace: &str) -> Outcome {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("createdAt");
                map.remove("updatedAt");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let replace = |s: &str| s.replace(namespace, "NS");
    match outcome {
        Ok(payload) => {
            let mut payload: Value = serde_json::from_str(&replace(&payload.to_string())).unwrap();
            strip(&mut payload);
            Ok(payload)
        }
        Err((code, message)) => Err((code.clone(), replace(message))),
    }
}

/// Every command of the seed, and the errors a caller meets: `{ns}` is each lane's namespace.
fn script() -> Vec<(&'static str, Value)> {
    let ns = "{ns}";
    vec![
        (
            "secret.create",
            json!({"name": "db.password", "namespace": ns, "data": {"password": "pw-1"}, "allowed_workloads": ["api"]}),
        ),
        (
            "secret.get",
            json!({"name": "db.password", "namespace": ns}),
        ),
        (
            "secret.create",
            json!({"name": "db.password", "namespace": ns, "data": {"password": "again"}}),
        ),
        (
            "secret.rotate",
            json!({"name": "db.password", "namespace": ns, "newData": {"password": "pw-2"}}),
        ),
        (
            "secret.rotate",
            json!({"name": "db.password", "namespace": ns, "newData": {"password": "pw-3"}, "expectedVersion": 1}),
        ),
        (
            "secret.get",
            json!({"name": "db.password", "namespace": ns}),
        ),
        ("secret.list", json!({"namespace": ns})),
        (
            "config.create",
            json!({"name": "app.settings", "namespace": ns, "data": {"level": "info"}}),
        ),
        (
            "config.update",
            json!({"name": "app.settings", "namespace": ns, "data": {"level": "debug"}}),
        ),
        (
            "config.get",
            json!({"name": "app.settings", "namespace": ns}),
        ),
        (
            "config.create",
            json!({"name": "frozen", "namespace": ns, "data": {"a": "1"}, "immutable": true}),
        ),
        (
            "config.update",
            json!({"name": "frozen", "namespace": ns, "data": {"a": "2"}}),
        ),
        ("config.list", json!({"namespace": ns})),
        ("secret.get", json!({"name": "missing", "namespace": ns})),
        ("secret.get", json!({"name": "Not A Name", "namespace": ns})),
        (
            "secret.delete",
            json!({"name": "db.password", "namespace": ns}),
        ),
        (
            "config.delete",
            json!({"name": "app.settings", "namespace": ns}),
        ),
        ("secret.list", json!({"namespace": ns})),
    ]
}

fn in_lane(params: &Value, namespace: &str) -> Value {
    serde_json::from_str(&params.to_string().replace("{ns}", namespace)).unwrap()
}

fn lane_namespace(lane: &str) -> String {
    format!("lane-{lane}-{}", random::random_hex(3))
}

#[test]
fn the_ten_commands_answer_through_the_cli_and_the_raw_rpc_as_over_http() {
    let _shared = shared();
    let gw = gateway();
    let env = DevEnv::new();
    let node = start_node(&env, gw, Pairing::SetupCode, "admin");
    // Paired by the setup code alone: no request waits for anyone's approval.
    assert!(
        !gw.pending_node_ids().contains(&node.id),
        "a node paired by setup code waits for approval"
    );

    let (http_ns, cli_ns, rpc_ns) = (
        lane_namespace("http"),
        lane_namespace("cli"),
        lane_namespace("rpc"),
    );
    let steps = script();
    let http: Vec<Outcome> = steps
        .iter()
        .map(|(command, params)| {
            node.server
                .call(command, in_lane(params, &http_ns))
                .outcome()
        })
        .collect();
    // The two CLI lanes in parallel (each call is a Node process of 1-2 s).
    let (cli, rpc_lane) = std::thread::scope(|s| {
        let cli = s.spawn(|| {
            steps
                .iter()
                .map(|(command, params)| {
                    cli_outcome(&gw.nodes_invoke(&node.id, command, &in_lane(params, &cli_ns), &[]))
                })
                .collect::<Vec<_>>()
        });
        let rpc_lane = s.spawn(|| {
            steps
                .iter()
                .enumerate()
                .map(|(i, (command, params))| {
                    rpc_outcome(&rpc(
                        gw,
                        &node.id,
                        command,
                        &in_lane(params, &rpc_ns),
                        &format!("{rpc_ns}-{i}"),
                    ))
                })
                .collect::<Vec<_>>()
        });
        (cli.join().unwrap(), rpc_lane.join().unwrap())
    });
    let mut codes = std::collections::BTreeSet::new();
    for (i, (command, _)) in steps.iter().enumerate() {
        let expected = normalized(&http[i], &http_ns);
        assert_eq!(
            normalized(&cli[i], &cli_ns),
            expected,
            "step {i} ({command}) through the CLI"
        );
        assert_eq!(
            normalized(&rpc_lane[i], &rpc_ns),
            expected,
            "step {i} ({command}) through the RPC"
        );
        if let Err((code, _)) = &http[i] {
            codes.insert(code.clone());
        }
    }
    // The script meets these errors (each passed on as the gateway's nodeError).
    for code in [
        "ALREADY_EXISTS",
        "CONFLICT",
        "FAILED_PRECONDITION",
        "NOT_FOUND",
        "INVALID_ARGUMENT",
    ] {
        assert!(codes.contains(code), "{code} not met: {codes:?}");
    }
    // The values went through: the rotated secret read back through both CLIs.
    assert_eq!(cli[5].as_ref().unwrap()["data"]["password"], json!("pw-2"));
    assert_eq!(
        rpc_lane[5].as_ref().unwrap()["data"]["password"],
        json!("pw-2")
    );

    // The audit record of a write through the gateway names the principal, the gateway's
    // invoke id, the node and the caller's idempotency key.
    let records = env.audit_records();
    let keyed: Vec<&Value> = records
        .iter()
        .filter(|r| r["idempotencyKey"] == json!(format!("{rpc_ns}-0")))
        .collect();
    assert_eq!(keyed.len(), 2, "intent and commit: {keyed:?}");
    for record in keyed {
        assert_eq!(record["subject"], json!("admin"));
        assert_eq!(record["gatewayNode"], json!(node.id));
        assert_eq!(record["node"], json!(env.node_id));
        assert_eq!(record["command"], json!("secret.create"));
        let invoke_id = record["requestId"].as_str().unwrap();
        assert_eq!(
            invoke_id.len(),
            36,
            "the gateway's invoke id (a UUID): {invoke_id}"
        );
    }
    assert!(env.audit_verify(&env.audit_log()).status.success());
}

#[test]
fn a_principals_rights_are_checked_and_a_revoked_principal_is_refused() {
    let _shared = shared();
    let gw = gateway();
    let env = DevEnv::new();
    let workload_token = env.create_token("api", "team");
    let node = start_node(&env, gw, Pairing::SetupCode, "workload:team/api");
    let admin = |command: &str, params: Value| node.server.call(command, params);
    admin("secret.create", json!({"name": "mine", "namespace": "team", "data": {"k": "v"}, "allowed_workloads": ["api"]}))
        .payload();

    let as_workload = |command: &str, params: Value| {
        node.server
            .call_as(Some(&workload_token), command, params)
            .outcome()
    };
    let through_gateway = |command: &str, params: Value| {
        rpc_outcome(&rpc(gw, &node.id, command, &params, &random::random_hex(8)))
    };
    // What the workload may do, it does through the gateway; what it may not, it may not.
    for (command, params) in [
        ("secret.get", json!({"name": "mine", "namespace": "team"})),
        (
            "secret.create",
            json!({"name": "other", "namespace": "team", "data": {"k": "v"}}),
        ),
        ("config.list", json!({"namespace": "elsewhere"})),
    ] {
        assert_eq!(
            through_gateway(command, params.clone()),
            as_workload(command, params.clone()),
            "{command} {params}"
        );
    }
    let denied = through_gateway(
        "secret.create",
        json!({"name": "other", "namespace": "team", "data": {"k": "v"}}),
    );
    assert_eq!(denied.unwrap_err().0, "PERMISSION_DENIED");

    // A tokens file that cannot be read refuses everyone, through the gateway as over HTTP.
    let tokens_path = env.data_dir.join("tokens.json");
    let good = std::fs::read(&tokens_path).unwrap();
    std::fs::write(&tokens_path, b"{ not json").unwrap();
    let read_mine = json!({"name": "mine", "namespace": "team"});
    let broken =
        poll_until(
            "the broken tokens file to refuse gateway calls",
            || match through_gateway("secret.get", read_mine.clone()) {
                Err((code, message)) if code == "UNAVAILABLE" => Ok((code, message)),
                other => Err(format!("{other:?}")),
            },
        );
    assert_eq!(Err(broken), as_workload("secret.get", read_mine.clone()));
    std::fs::write(&tokens_path, &good).unwrap();
    poll_until("the repaired tokens file", || {
        through_gateway("secret.get", read_mine.clone()).map_err(|e| format!("{e:?}"))
    });

    // The principal's tokens removed from the tokens file: the gateway's calls are refused.
    let mut tokens: Value = serde_json::from_slice(&std::fs::read(&tokens_path).unwrap()).unwrap();
    tokens["tokens"]
        .as_array_mut()
        .unwrap()
        .retain(|t| t["subject"] != json!("workload:team/api"));
    std::fs::write(&tokens_path, tokens.to_string()).unwrap();
    let refused = poll_until(
        "the revoked principal to be refused",
        || match through_gateway("secret.get", json!({"name": "mine", "namespace": "team"})) {
            Err((code, message)) if code == "UNAUTHENTICATED" => Ok(message),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(refused.contains("workload:team/api"), "{refused}");
}

#[test]
fn pairing_by_approval_then_a_second_start_reuses_the_identity_and_device_token() {
    let _shared = shared();
    let gw = gateway();
    let env = DevEnv::new();
    let node = start_node(&env, gw, Pairing::GatewayToken, "admin");
    let get = |node: &Node| gw.nodes_invoke(&node.id, "secret.list", &json!({}), &[]);

    // Connected, but its commands wait for an operator.
    assert!(gw.pending_node_ids().contains(&node.id));
    let before = get(&node);
    assert!(
        !before.success(),
        "a node answered before its commands were approved: {before:?}"
    );
    gw.approve(&node.id);
    assert_eq!(cli_outcome(&get(&node)).unwrap(), json!({"secrets": []}));

    // Restarted with no credential at all: the saved device token is enough, and nothing
    // waits for approval again.
    let first_id = node.id.clone();
    node.server.stop();
    let again = start_node(&env, gw, Pairing::Saved, "admin");
    assert_eq!(again.id, first_id, "a second start is another node");
    assert!(
        again.server.wait_for_output(true, "auth=device-token"),
        "{}",
        again.server.stderr_text()
    );
    assert!(!gw.pending_node_ids().contains(&again.id));
    assert_eq!(cli_outcome(&get(&again)).unwrap(), json!({"secrets": []}));
    // The identity is private.
    use std::os::unix::fs::PermissionsExt;
    for file in ["gateway/device.json", "gateway/device-token"] {
        let mode = std::fs::metadata(env.data_dir.join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}");
    }
}

#[test]
fn the_node_is_back_within_seconds_of_a_gateway_restart() {
    let _exclusive = GATEWAY_LIFECYCLE.write().unwrap_or_else(|e| e.into_inner());
    let gw = gateway();
    let env = DevEnv::new();
    let node = start_node(&env, gw, Pairing::SetupCode, "admin");
    node.server
        .call("secret.create", json!({"name": "kept", "data": {"k": "v"}}))
        .payload();

    gw.kill();
    let lost = Instant::now();
    while node.readyz().contains("gateway: connected") {
        assert!(lost.elapsed() < wait::PATIENCE, "the node did not notice");
        std::thread::sleep(Duration::from_millis(20));
    }
    // HTTP callers are served meanwhile.
    node.server
        .call("secret.get", json!({"name": "kept"}))
        .payload();

    let start_took = gw.restart();
    let back_in = node.wait_connected();
    eprintln!(
        "gateway down for {:.1} s (restart took {:.1} s); the node was connected again {:.2} s after the gateway was ready",
        lost.elapsed().as_secs_f64(),
        start_took.as_secs_f64(),
        back_in.as_secs_f64()
    );
    assert!(
        back_in <= Duration::from_secs(5),
        "the node took {back_in:?} to come back (the reconnect backoff is capped at 4 s)"
    );
    let got = cli_outcome(&gw.nodes_invoke(&node.id, "secret.get", &json!({"name": "kept"}), &[]));
    assert_eq!(got.unwrap()["data"], json!({"k": "v"}));
}

#[test]
fn a_call_the_gateway_gives_up_on_changes_nothing() {
    let _shared = shared();
    let gw = gateway();
    let env = DevEnv::new();
    let node = start_node(&env, gw, Pairing::SetupCode, "admin");

    // The node is stopped (as a stalled process would be) while a write reaches it, until the
    // gateway has given up on the call: it then reads the request and its cancel together.
    // SAFETY: signals to the child process this test started.
    unsafe { libc::kill(node.server.pid as i32, libc::SIGSTOP) };
    let timed_out = rpc_timed(
        gw,
        &node.id,
        "secret.create",
        &json!({"name": "late", "data": {"k": "v"}}),
        2000,
        "late-1",
    );
    unsafe { libc::kill(node.server.pid as i32, libc::SIGCONT) };
    let (code, _) = rpc_outcome(&timed_out).unwrap_err();
    assert_eq!(code, "TIMEOUT");

    // Given up, recorded, and nothing written: neither a secret nor a half-done write.
    let record = poll_until("the given-up call on the audit record", || {
        let records = env.audit_records();
        let about: Vec<Value> = records
            .into_iter()
            .filter(|r| {
                r["idempotencyKey"] == json!("late-1")
                    || (r["name"] == json!("late") && r["command"] == json!("secret.create"))
            })
            .collect();
        match about.as_slice() {
            [one] => Ok(one.clone()),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(
        record["reason"].as_str().unwrap().contains("given up"),
        "{record}"
    );
    assert_ne!(record["phase"], json!("commit"), "{record}");
    node.server
        .call("secret.get", json!({"name": "late"}))
        .expect_error("NOT_FOUND");
    // And the node still serves the gateway.
    let ok = rpc_timed(
        gw,
        &node.id,
        "secret.create",
        &json!({"name": "late", "data": {"k": "v"}}),
        15000,
        "late-2",
    );
    assert_eq!(rpc_outcome(&ok).unwrap()["version"], json!(1));
}

#[test]
fn thirty_two_calls_in_flight_all_answer() {
    let _shared = shared();
    let gw = gateway();
    let env = DevEnv::new();
    let node = start_node_with(
        &env,
        gw,
        Pairing::SetupCode,
        "admin",
        &[("CLAW_SECRETS_LOG", "debug,tungstenite=info")],
    );
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        runtime.block_on(thirty_two_calls(gw, &node))
    }));
    if let Err(panic) = outcome {
        let log = node.server.stderr_text();
        let tail: Vec<&str> = log.lines().rev().take(80).collect();
        eprintln!("--- the node's log, last lines:");
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        let gw_log = gw.log_text();
        let gw_tail: Vec<&str> = gw_log.lines().rev().take(40).collect();
        eprintln!("--- the gateway's log, last lines:");
        for line in gw_tail.iter().rev() {
            eprintln!("{line}");
        }
        std::panic::resume_unwind(panic);
    }
}

/// `node.invoke` as a careful caller makes it: an UNAVAILABLE from the gateway itself (no
/// `nodeError`: the call never reached the node; under pairing activity openclaw answers
/// "Device pairing authority requires a current worker publication") is tried again, with the
/// same idempotency key. What the node answers is returned as it is.
async fn invoke_retrying(operator: &OperatorClient, params: Value) -> Result<Value, Value> {
    let mut attempt = 0;
    loop {
        match operator.call("node.invoke", params.clone()).await {
            Err(e)
                if e["code"] == json!("UNAVAILABLE")
                    && e["details"]["nodeError"].is_null()
                    && attempt < 5 =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
            }
            other => return other,
        }
    }
}

/// 32 writes and 32 reads over one operator connection, all in flight at once.
async fn thirty_two_calls(gw: &Gateway, node: &Node) {
    let operator = std::sync::Arc::new(OperatorClient::connect(gw).await);
    let calls = (0..32).map(|i| {
        let operator = operator.clone();
        let node_id = node.id.clone();
        tokio::spawn(async move {
            let name = format!("s{i}");
            let create = json!({"nodeId": node_id, "command": "secret.create", "params": {"name": name, "data": {"n": i.to_string()}}, "timeoutMs": 60000, "idempotencyKey": format!("c{i}")});
            let created = invoke_retrying(&operator, create).await;
            let get = json!({"nodeId": node_id, "command": "secret.get", "params": {"name": name}, "timeoutMs": 60000, "idempotencyKey": format!("g{i}")});
            let read = invoke_retrying(&operator, get).await;
            (i, created, read)
        })
    });
    for call in futures::future::join_all(calls).await {
        let (i, created, read) = call.unwrap();
        let created = created.unwrap_or_else(|e| panic!("create {i}: {e}"));
        assert_eq!(created["payload"]["version"], json!(1), "{created}");
        let read = read.unwrap_or_else(|e| panic!("get {i}: {e}"));
        assert_eq!(
            read["payload"]["data"],
            json!({"n": i.to_string()}),
            "{read}"
        );
    }
    let listed = node.server.call("secret.list", json!({})).payload();
    assert_eq!(listed["secrets"].as_array().unwrap().len(), 32);
}

#[test]
fn malformed_params_are_invalid_argument_and_no_value_reaches_the_nodes_logs() {
    let _shared = shared();
    let gw = gateway();
    let env = DevEnv::new();
    let node = start_node_with(
        &env,
        gw,
        Pairing::SetupCode,
        "admin",
        &[("CLAW_SECRETS_LOG", "trace")],
    );

    // Params that are not an object, and an unknown field: refused, naming the rule.
    for params in [
        json!(5),
        json!(["a"]),
        json!({"name": "x", "surprise": true}),
    ] {
        let (code, message) =
            rpc_outcome(&rpc(gw, &node.id, "secret.get", &params, "m")).unwrap_err();
        assert_eq!(code, "INVALID_ARGUMENT", "{params}: {message}");
    }

    let value = canary::canary("gwcanary");
    let canaries = canary::Canaries::of([value.clone(), format!("{value}-2")]);
    let created = cli_outcome(&gw.nodes_invoke(
        &node.id,
        "secret.create",
        &json!({"name": "canary", "data": {"v": value}}),
        &[],
    ));
    created.unwrap();
    let read = rpc_outcome(&rpc(
        gw,
        &node.id,
        "secret.get",
        &json!({"name": "canary"}),
        "c",
    ));
    assert_eq!(read.unwrap()["data"]["v"], json!(value));
    let rotated = cli_outcome(&gw.nodes_invoke(
        &node.id,
        "secret.rotate",
        &json!({"name": "canary", "newData": {"v": format!("{value}-2")}}),
        &[],
    ));
    rotated.unwrap();
    // A rejected write with the value in it, too.
    let _ = rpc(
        gw,
        &node.id,
        "secret.create",
        &json!({"name": "Bad Name", "data": {"v": value}}),
        "b",
    );

    let exit = node.server.stop();
    assert!(
        exit.stderr.contains("invoke from the gateway"),
        "trace logging was on"
    );
    canaries.assert_absent("the node's stdout", &exit.stdout_bytes);
    canaries.assert_absent("the node's stderr", &exit.stderr_bytes);
    canaries.assert_absent(
        "the node's audit log",
        &std::fs::read(env.audit_log()).unwrap(),
    );
}
