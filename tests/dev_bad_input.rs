//! Malformed requests get the documented error, never take the server down, and never touch
//! what is stored.

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

#[path = "support/protocol.rs"]
mod protocol;

#[path = "support/dev_server.rs"]
mod dev_server;

use dev_server::{DevEnv, snapshot};
use serde_json::{Value, json};

/// One malformed request: a label, the raw body, the expected error code and HTTP status.
struct Case {
    label: String,
    body: Vec<u8>,
    code: &'static str,
    status: u16,
    /// A word the message must contain, to show it says what is wrong.
    mentions: Option<&'static str>,
}

fn case(label: &str, body: impl Into<Vec<u8>>, code: &'static str, status: u16) -> Case {
    Case {
        label: label.to_owned(),
        body: body.into(),
        code,
        status,
        mentions: None,
    }
}

fn invalid(label: &str, body: impl Into<Vec<u8>>) -> Case {
    case(label, body, "INVALID_ARGUMENT", 400)
}

fn env_body(command: &str, params: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({"nodeId": "local", "command": command, "params": params})).unwrap()
}

fn create(params: Value) -> Vec<u8> {
    env_body("secret.create", params)
}

impl Case {
    fn mentioning(mut self, word: &'static str) -> Self {
        self.mentions = Some(word);
        self
    }
}

fn table() -> Vec<Case> {
    let ok_data = json!({"k": "v"});
    let mut big_value = "x".repeat(1024 * 1024); // key "k" (1 byte) + this = 1 MiB + 1 byte
    let mut cases = vec![
        // ---- names ----
        invalid("empty name", create(json!({"name": "", "data": ok_data}))).mentioning("name"),
        invalid(
            "254-char name",
            create(json!({"name": "a".repeat(254), "data": ok_data})),
        )
        .mentioning("253"),
        invalid(
            "uppercase name",
            create(json!({"name": "DB.password", "data": ok_data})),
        ),
        invalid(
            "name with a space",
            create(json!({"name": "db password", "data": ok_data})),
        ),
        invalid(
            "name with a slash",
            create(json!({"name": "db/password", "data": ok_data})),
        ),
        invalid(
            "unicode name",
            create(json!({"name": "db.pässword", "data": ok_data})),
        ),
        invalid(
            "name with NUL",
            create(json!({"name": "db\u{0}x", "data": ok_data})),
        ),
        invalid(
            "empty name on get",
            env_body("secret.get", json!({"name": ""})),
        ),
        invalid(
            "bad name on config.get",
            env_body("config.get", json!({"name": "App.Settings"})),
        ),
        // ---- not a request ----
        invalid("not JSON", "hello there"),
        invalid("empty body", ""),
        invalid(
            "truncated JSON",
            r#"{"command":"secret.get","params":{"name":"db"#,
        ),
        invalid("array at top level", r#"[{"command":"secret.get"}]"#),
        invalid("string at top level", r#""secret.get""#),
        invalid("null at top level", "null"),
        invalid("trailing garbage", r#"{"command":"secret.list"} {}"#),
        invalid(
            "not UTF-8",
            b"{\"command\":\"secret.get\",\"params\":{\"name\":\"\xff\xfe\"}}".to_vec(),
        ),
        // ---- wrong types ----
        invalid("command is a number", r#"{"command":5,"params":{}}"#),
        invalid("command is null", r#"{"command":null}"#),
        invalid(
            "params is a string",
            r#"{"command":"secret.get","params":"db.password"}"#,
        ),
        invalid(
            "params is an array",
            r#"{"command":"secret.get","params":["db.password"]}"#,
        ),
        invalid(
            "params is a number",
            r#"{"command":"secret.list","params":7}"#,
        ),
        invalid(
            "name is a number",
            create(json!({"name": 5, "data": ok_data})),
        ),
        invalid(
            "name is an object",
            env_body("secret.get", json!({"name": {"n": "x"}})),
        ),
        invalid(
            "data is a string",
            create(json!({"name": "x", "data": "k=v"})),
        )
        .mentioning("data"),
        invalid(
            "data is an array",
            create(json!({"name": "x", "data": [["k", "v"]]})),
        ),
        invalid("data is null", create(json!({"name": "x", "data": null}))),
        invalid(
            "allowed_workloads is a string",
            create(json!({"name": "x", "data": ok_data, "allowed_workloads": "api-server"})),
        ),
        invalid(
            "allowed_workloads entry is a number",
            create(json!({"name": "x", "data": ok_data, "allowed_workloads": [1]})),
        ),
        invalid(
            "immutable is a string",
            env_body(
                "config.create",
                json!({"name": "x", "data": ok_data, "immutable": "yes"}),
            ),
        )
        .mentioning("immutable"),
        invalid(
            "immutable is a number",
            env_body(
                "config.update",
                json!({"name": "x", "data": ok_data, "immutable": 1}),
            ),
        ),
        invalid(
            "newData is a string",
            env_body("secret.rotate", json!({"name": "x", "newData": "v"})),
        ),
        invalid(
            "newData is an array",
            env_body("secret.rotate", json!({"name": "x", "newData": ["v"]})),
        ),
        invalid(
            "prefix is a number",
            env_body("secret.list", json!({"prefix": 5})),
        ),
        invalid(
            "prefix is an array",
            env_body("config.list", json!({"prefix": ["db."]})),
        ),
        invalid(
            "prefix is not a name prefix",
            env_body("secret.list", json!({"prefix": "DB."})),
        ),
        invalid(
            "prefix too long",
            env_body("secret.list", json!({"prefix": "a".repeat(254)})),
        ),
        invalid(
            "namespace is invalid",
            env_body("secret.get", json!({"name": "x", "namespace": "Bad_NS"})),
        ),
        invalid("id is a number", r#"{"id":5,"command":"secret.list"}"#),
        invalid(
            "id has a space",
            r#"{"id":"my id","command":"secret.list"}"#,
        ),
        invalid(
            "nodeId is a number",
            r#"{"nodeId":5,"command":"secret.list"}"#,
        ),
        // ---- unknown and missing fields ----
        invalid(
            "unknown top-level field",
            r#"{"command":"secret.list","params":{},"extra":1}"#,
        ),
        invalid(
            "unknown params field",
            create(json!({"name": "x", "data": ok_data, "allowed_workload": ["api-server"]})),
        )
        .mentioning("allowed_workload"),
        invalid(
            "rotate with data instead of newData",
            env_body("secret.rotate", json!({"name": "x", "data": ok_data})),
        )
        .mentioning("newData"),
        invalid("missing name", env_body("secret.get", json!({}))).mentioning("name"),
        invalid("missing params for get", r#"{"command":"secret.get"}"#),
        invalid(
            "null params for create",
            r#"{"command":"secret.create","params":null}"#,
        ),
        invalid("missing data", create(json!({"name": "x"}))).mentioning("data"),
        invalid(
            "expectedVersion 0",
            env_body("secret.rotate", json!({"name": "x", "expectedVersion": 0})),
        )
        .mentioning("expectedVersion"),
        invalid(
            "expectedVersion is a string",
            env_body(
                "secret.rotate",
                json!({"name": "x", "expectedVersion": "1"}),
            ),
        ),
        invalid(
            "missing data on config.create",
            env_body("config.create", json!({"name": "x"})),
        ),
        invalid("missing command", r#"{"params":{"name":"x"}}"#).mentioning("command"),
        invalid(
            "unknown command",
            env_body("secret.steal", json!({"name": "x"})),
        )
        .mentioning("secret.get"),
        invalid("empty command", env_body("", json!({}))),
        invalid(
            "command with different case",
            env_body("Secret.Get", json!({"name": "x"})),
        ),
        // ---- data ----
        invalid("empty data", create(json!({"name": "x", "data": {}}))).mentioning("empty"),
        invalid(
            "empty newData",
            env_body("secret.rotate", json!({"name": "x", "newData": {}})),
        ),
        invalid(
            "data value is a number",
            create(json!({"name": "x", "data": {"port": 5432}})),
        )
        .mentioning("port"),
        invalid(
            "data value is null",
            create(json!({"name": "x", "data": {"k": null}})),
        ),
        invalid(
            "data value is an object",
            create(json!({"name": "x", "data": {"k": {"a": "b"}}})),
        ),
        invalid(
            "data value is a bool",
            env_body("config.create", json!({"name": "x", "data": {"k": true}})),
        ),
        invalid(
            "data key with a space",
            create(json!({"name": "x", "data": {"bad key": "v"}})),
        ),
        invalid(
            "data key empty",
            create(json!({"name": "x", "data": {"": "v"}})),
        ),
        invalid(
            "data key with a slash",
            create(json!({"name": "x", "data": {"a/b": "v"}})),
        ),
        invalid(
            "duplicate data key",
            r#"{"command":"secret.create","params":{"name":"x","data":{"a":"1","a":"2"}}}"#,
        )
        .mentioning("twice"),
        invalid(
            "data over 1 MiB",
            create(json!({"name": "x", "data": {"k": big_value}})),
        )
        .mentioning("1 MiB"),
        // ---- idempotency keys ----
        invalid(
            "empty idempotencyKey",
            r#"{"command":"secret.create","params":{"name":"x","data":{"k":"v"}},"idempotencyKey":""}"#,
        ),
        invalid(
            "idempotencyKey with a space",
            r#"{"command":"secret.create","params":{"name":"x","data":{"k":"v"}},"idempotencyKey":"a b"}"#,
        ),
        invalid(
            "idempotencyKey of 129 chars",
            format!(
                r#"{{"command":"secret.create","params":{{"name":"x","data":{{"k":"v"}}}},"idempotencyKey":"{}"}}"#,
                "k".repeat(129)
            ),
        ),
        invalid(
            "idempotencyKey not ASCII",
            r#"{"command":"secret.create","params":{"name":"x","data":{"k":"v"}},"idempotencyKey":"ключ"}"#,
        ),
        invalid(
            "idempotencyKey is a number",
            r#"{"command":"secret.create","params":{"name":"x","data":{"k":"v"}},"idempotencyKey":7}"#,
        ),
        // ---- allowed_workloads entries ----
        invalid(
            "allowed_workloads entry Bad_Name",
            create(json!({"name": "x", "data": ok_data, "allowed_workloads": ["Bad_Name"]})),
        )
        .mentioning("workload"),
        invalid(
            "allowed_workloads entry empty",
            create(json!({"name": "x", "data": ok_data, "allowed_workloads": [""]})),
        ),
        invalid(
            "allowed_workloads entry starting with a dash",
            create(json!({"name": "x", "data": ok_data, "allowed_workloads": ["-api"]})),
        ),
        invalid(
            "allowed_workloads with 257 entries",
            create(
                json!({"name": "x", "data": ok_data, "allowed_workloads": (0..257).map(|i| format!("w{i}")).collect::<Vec<_>>()}),
            ),
        ),
        // ---- deep nesting must be refused, not overflow the stack ----
        invalid(
            "deeply nested params",
            format!(
                r#"{{"command":"secret.get","params":{}{}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
        ),
        invalid(
            "deeply nested data value",
            format!(
                r#"{{"command":"secret.create","params":{{"name":"x","data":{{"k":{}{}}}}}}}"#,
                "[".repeat(100_000),
                "]".repeat(100_000)
            ),
        ),
        // ---- a node that is not this one ----
        case(
            "another node id",
            r#"{"nodeId":"other-node","command":"secret.list","params":{}}"#,
            "NOT_FOUND",
            404,
        ),
    ];
    // Over 7 MiB: refused as too large before it is read (HTTP 413).
    big_value.push_str(&"y".repeat(6 * 1024 * 1024));
    cases.push(case(
        "body over 7 MiB",
        create(json!({"name": "x", "data": {"k": big_value}})),
        "INVALID_ARGUMENT",
        413,
    ));
    cases
}

#[test]
fn malformed_requests_get_documented_errors_and_change_nothing() {
    let env = DevEnv::new();
    let server = env.start();
    // What is stored before the onslaught.
    server
        .call(
            "secret.create",
            json!({"name": "db.password", "data": {"username": "admin", "password": "s3cret"}, "allowed_workloads": ["api-server"]}),
        )
        .payload();
    server
        .call(
            "secret.rotate",
            json!({"name": "db.password", "newData": {"username": "admin", "password": "n3w"}}),
        )
        .payload();
    server
        .call(
            "secret.create",
            json!({"name": "x", "data": {"k": "original"}}),
        )
        .payload();
    server
        .call(
            "config.create",
            json!({"name": "x", "data": {"k": "v"}, "immutable": false}),
        )
        .payload();
    // Exactly 1 MiB of data is allowed: the limit is inclusive.
    let exactly = "z".repeat(1024 * 1024 - 1);
    server
        .call(
            "secret.create",
            json!({"name": "big.ok", "data": {"k": exactly}}),
        )
        .payload();
    let before = snapshot(&server);
    let audit_before = env.audit_records().len();

    let cases = table();
    assert!(cases.len() >= 30, "{} cases", cases.len());
    let mut failures = Vec::new();
    for c in &cases {
        let resp = match dev_server::http_invoke(server.port, Some(&server.admin_token), &c.body) {
            Ok(r) => r,
            Err(e) => {
                failures.push(format!("{}: no answer ({e})", c.label));
                continue;
            }
        };
        let parsed: Option<Value> = serde_json::from_slice(&resp.body).ok();
        let Some(v) = parsed else {
            failures.push(format!(
                "{}: HTTP {} body not JSON: {:?}",
                c.label,
                resp.status,
                resp.text()
            ));
            continue;
        };
        let code = v["error"]["code"].as_str().unwrap_or("");
        let message = v["error"]["message"].as_str().unwrap_or("");
        let mut problems = Vec::new();
        if v["ok"] != json!(false) {
            problems.push("not ok:false".to_owned());
        }
        if code != c.code {
            problems.push(format!("code {code:?}, expected {}", c.code));
        }
        if resp.status != c.status {
            problems.push(format!("HTTP {}, expected {}", resp.status, c.status));
        }
        if message.trim().is_empty() {
            problems.push("empty message".to_owned());
        }
        if message.len() > 2048 {
            problems.push(format!(
                "message of {} bytes echoes too much",
                message.len()
            ));
        }
        if let Some(word) = c.mentions
            && !message.contains(word)
        {
            problems.push(format!("message does not mention {word:?}"));
        }
        if v.get("payload").is_some() {
            problems.push("has a payload".to_owned());
        }
        if !problems.is_empty() {
            failures.push(format!("{}: {} — {}", c.label, problems.join("; "), v));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    let records = env.audit_records();

    // The server still answers, correctly.
    let got = server
        .call("secret.get", json!({"name": "db.password"}))
        .payload();
    assert_eq!(got["data"], json!({"username": "admin", "password": "n3w"}));
    assert_eq!(got["version"], json!(2));
    // Nothing stored was lost, changed or added.
    assert_eq!(snapshot(&server), before);
    // Bad requests for secret commands were audited (as errors), and the chain is intact.
    assert!(records.len() > audit_before);
    assert!(
        records[audit_before..]
            .iter()
            .all(|r| r["decision"] == json!("error")),
        "{records:#?}"
    );
    let exit = server.stop();
    assert!(exit.status.success(), "{exit:?}");
    assert_eq!(env.audit_verify(&env.audit_log()).code(), Some(0));
}

/// Requests that are not POST /v1/invoke are refused without disturbing the server.
#[test]
fn other_paths_and_methods_are_refused() {
    let env = DevEnv::new();
    let server = env.start();
    let resp = dev_server::http_post_raw(server.port, "/v1/other", &[], b"{}").unwrap();
    assert_eq!(resp.status, 404);
    let resp = dev_server::http_post_raw(server.port, "/healthz", &[], b"").unwrap();
    assert_eq!(resp.status, 405);
    // Garbage instead of HTTP.
    {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(std::time::Duration::from_secs(30)))
            .unwrap();
        let _ = s.write_all(b"\x16\x03\x01\x02\x00 not http at all\r\n\r\n");
        let mut buf = Vec::new();
        let _ = s.read_to_end(&mut buf);
    }
    server
        .call(
            "secret.create",
            json!({"name": "still.alive", "data": {"k": "v"}}),
        )
        .payload();
    assert_eq!(
        server
            .call("secret.get", json!({"name": "still.alive"}))
            .payload()["data"],
        json!({"k": "v"})
    );
}
