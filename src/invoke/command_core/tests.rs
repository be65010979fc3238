//! The access rules as a table: every command × admin / allowed workload / other workload /
//! other namespace / unauthenticated, through the real dispatcher and command core, with a fake
//! authorizer standing in for RBAC and the dev-mode repository on a temporary store. Plus what
//! happens when the audit log cannot be written. No API server; milliseconds.

use serde_json::{Value, json};
use std::sync::{Arc, Mutex};

use super::super::{
    Access, Authorizer, Caller, CommandCore, Decision, Dispatcher, InvokeError, Repository,
    Resource, Verb,
};
use crate::audit::AuditLog;
use crate::backends::local::StoreRepository;
use crate::crypto::{Keyring, SharedKeyring};
use crate::domain::{ErrorCode, Name, Namespace, ObjectKey, Workload};
use crate::store::Store;

/// RBAC as a list of grants: (subject, verbs, resource, namespace).
struct FakeAuthorizer {
    callers: Vec<(&'static str, Caller)>,
    grants: Vec<(&'static str, &'static [Verb], Resource, &'static str)>,
    refused: Mutex<Vec<String>>,
    /// Cancelled by the next authorization check: a caller giving up while its write is
    /// under way (after the call started, before its intent is recorded).
    give_up_at_check: Mutex<Option<tokio_util::sync::CancellationToken>>,
}

impl Authorizer for FakeAuthorizer {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, InvokeError> {
        self.callers
            .iter()
            .find(|(token, _)| Some(*token) == bearer)
            .map(|(_, c)| c.clone())
            .ok_or_else(|| InvokeError::new(ErrorCode::Unauthenticated, "no such token"))
    }

    async fn check(&self, caller: &Caller, access: Access<'_>) -> Result<Decision, InvokeError> {
        if let Some(token) = self.give_up_at_check.lock().unwrap().take() {
            token.cancel();
        }
        let granted = self.grants.iter().any(|(subject, verbs, resource, ns)| {
            *subject == caller.subject
                && verbs.contains(&access.verb)
                && *resource == access.resource
                && (*ns == "*" || *ns == access.namespace.as_str())
        });
        Ok(if granted {
            Decision::Allow
        } else {
            Decision::Deny("not granted".to_owned())
        })
    }

    fn refused(&self, caller: &Caller, access: Access<'_>) {
        self.refused
            .lock()
            .unwrap()
            .push(format!("{} {access}", caller.subject));
    }
}

fn workload(ns: &str, name: &str) -> Caller {
    Caller {
        namespace: Some(Namespace::parse(ns).unwrap()),
        workload: Some(Workload::parse(name).unwrap()),
        ..Caller::named(format!("system:serviceaccount:{ns}:{name}"))
    }
}

const ALL: &[Verb] = &[
    Verb::Get,
    Verb::List,
    Verb::Create,
    Verb::Update,
    Verb::Delete,
    Verb::Reveal,
];

fn authorizer() -> FakeAuthorizer {
    FakeAuthorizer {
        callers: vec![
            ("t-admin", Caller::named("alice")),
            ("t-api", workload("prod", "api")),
            ("t-intruder", workload("prod", "intruder")),
            ("t-elsewhere", workload("dev", "api")),
        ],
        grants: vec![
            ("alice", ALL, Resource::Secrets, "*"),
            ("alice", ALL, Resource::Configs, "*"),
            // The allowed workload may read the configs of its namespace, by RBAC.
            (
                "system:serviceaccount:prod:api",
                &[Verb::Get, Verb::List],
                Resource::Configs,
                "prod",
            ),
        ],
        refused: Mutex::new(Vec::new()),
        give_up_at_check: Mutex::default(),
    }
}

struct Fixture {
    _dir: tempfile::TempDir,
    audit_path: std::path::PathBuf,
    audit_log: AuditLog,
    dispatcher: Dispatcher<FakeAuthorizer, StoreRepository>,
}

fn core(dir: &std::path::Path, audit: AuditLog) -> CommandCore<FakeAuthorizer, StoreRepository> {
    let ring = Keyring::generate().unwrap();
    std::fs::write(dir.join("keyring.json"), ring.to_json()).unwrap();
    let keys = SharedKeyring::new(ring);
    let (store, _) = Store::open(dir, keys.clone(), Default::default()).unwrap();
    CommandCore::new(
        authorizer(),
        StoreRepository::new(Arc::new(store)),
        audit,
        "node-a".to_owned(),
        keys,
    )
}

/// A fresh node holding secret `prod/db` (allowed_workloads: api), secret `prod/shared` (no
/// allowed_workloads) and config `prod/app`.
async fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let audit_path = dir.path().join("audit.log");
    let (audit, _) = AuditLog::open(&audit_path, "node-a").unwrap();
    let dispatcher = Dispatcher::new(core(dir.path(), audit.clone()));
    let f = Fixture {
        _dir: dir,
        audit_path,
        audit_log: audit,
        dispatcher,
    };
    for (command, params) in [
        (
            "secret.create",
            json!({"name": "db", "namespace": "prod", "data": {"password": "s3cret"}, "allowed_workloads": ["api"]}),
        ),
        (
            "secret.create",
            json!({"name": "shared", "namespace": "prod", "data": {"k": "v"}}),
        ),
        (
            "config.create",
            json!({"name": "app", "namespace": "prod", "data": {"level": "info"}}),
        ),
    ] {
        let answer = f.call(Some("t-admin"), command, params).await;
        assert_eq!(answer["ok"], json!(true), "{answer}");
    }
    f
}

impl Fixture {
    async fn call(&self, token: Option<&str>, command: &str, params: Value) -> Value {
        let body = serde_json::to_vec(&json!({"command": command, "params": params})).unwrap();
        let answer = self.dispatcher.handle(token, &body).await;
        serde_json::to_value(&answer).unwrap()
    }

    /// The audit log's records, once every record queued so far is written (a write's
    /// outcome record is queued behind its durable intent).
    async fn audit(&self) -> Vec<Value> {
        self.audit_log.flush().await.unwrap();
        std::fs::read_to_string(&self.audit_path)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }
}

fn outcome(answer: &Value) -> String {
    if answer["ok"] == json!(true) {
        "OK".to_owned()
    } else {
        answer["error"]["code"].as_str().unwrap().to_owned()
    }
}

const OK: &str = "OK";
const DENIED: &str = "PERMISSION_DENIED";
const UNAUTH: &str = "UNAUTHENTICATED";
const NOT_FOUND: &str = "NOT_FOUND";

/// Callers, in the order of each row's expectations.
const CALLERS: [Option<&str>; 5] = [
    Some("t-admin"),
    Some("t-api"),
    Some("t-intruder"),
    Some("t-elsewhere"),
    None,
];

fn table() -> Vec<(&'static str, Value, [&'static str; 5])> {
    vec![
        // A workload reads what lists it; nobody else without `reveal`.
        (
            "secret.get",
            json!({"name": "db", "namespace": "prod"}),
            [OK, OK, DENIED, DENIED, UNAUTH],
        ),
        (
            "secret.get",
            json!({"name": "shared", "namespace": "prod"}),
            [OK, OK, OK, DENIED, UNAUTH],
        ),
        // A missing secret: NOT_FOUND only to who may read it; the same refusal for the others.
        (
            "secret.get",
            json!({"name": "missing", "namespace": "prod"}),
            [NOT_FOUND, DENIED, DENIED, DENIED, UNAUTH],
        ),
        (
            "secret.list",
            json!({"namespace": "prod"}),
            [OK, OK, OK, DENIED, UNAUTH],
        ),
        (
            "secret.create",
            json!({"name": "new", "namespace": "prod", "data": {"k": "v"}}),
            [OK, DENIED, DENIED, DENIED, UNAUTH],
        ),
        (
            "secret.rotate",
            json!({"name": "db", "namespace": "prod", "newData": {"password": "n3w"}}),
            [OK, DENIED, DENIED, DENIED, UNAUTH],
        ),
        (
            "secret.delete",
            json!({"name": "db", "namespace": "prod"}),
            [OK, DENIED, DENIED, DENIED, UNAUTH],
        ),
        (
            "config.get",
            json!({"name": "app", "namespace": "prod"}),
            [OK, OK, DENIED, DENIED, UNAUTH],
        ),
        (
            "config.list",
            json!({"namespace": "prod"}),
            [OK, OK, DENIED, DENIED, UNAUTH],
        ),
        (
            "config.create",
            json!({"name": "new", "namespace": "prod", "data": {}}),
            [OK, DENIED, DENIED, DENIED, UNAUTH],
        ),
        (
            "config.update",
            json!({"name": "app", "namespace": "prod", "data": {"level": "debug"}}),
            [OK, DENIED, DENIED, DENIED, UNAUTH],
        ),
        (
            "config.delete",
            json!({"name": "app", "namespace": "prod"}),
            [OK, DENIED, DENIED, DENIED, UNAUTH],
        ),
    ]
}

#[tokio::test]
async fn access_rules_for_every_command_and_caller() {
    let mut failures = Vec::new();
    for (command, params, expected) in table() {
        for (token, expected) in CALLERS.iter().zip(expected) {
            let f = fixture().await;
            let before = f.audit().await.len();
            let answer = f.call(*token, command, params.clone()).await;
            let got = outcome(&answer);
            if got != expected {
                failures.push(format!(
                    "{command} {params} as {token:?}: expected {expected}, got {answer}"
                ));
                continue;
            }
            // Nobody learns a value they may not read, in any answer.
            if got != OK || command != "secret.get" {
                assert!(!answer.to_string().contains("s3cret"), "{answer}");
            }
            // Every secret access and every config write is on the record.
            let records = f.audit().await;
            let audited = command.starts_with("secret.")
                || !command.ends_with(".get") && !command.ends_with(".list");
            if audited {
                let mine: Vec<&Value> = records[before..]
                    .iter()
                    .filter(|r| r["requestId"] == answer["id"])
                    .collect();
                assert!(!mine.is_empty(), "{command} as {token:?} is not audited");
                let decision = &mine.last().unwrap()["decision"];
                let want = match got.as_str() {
                    OK => "allow",
                    DENIED | UNAUTH => "deny",
                    _ => "error",
                };
                assert_eq!(decision, want, "{command} as {token:?}: {mine:?}");
            } else {
                assert_eq!(records.len(), before, "config reads are not audited");
            }
            // Refusals of named objects are reported to the authorizer (the agent's Events).
            if got == DENIED && params.get("name").is_some() {
                let refused = f
                    .dispatcher
                    .core()
                    .authorizer()
                    .refused
                    .lock()
                    .unwrap()
                    .clone();
                assert_eq!(refused.len(), 1, "{command} as {token:?}: {refused:?}");
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[tokio::test]
async fn a_workload_cannot_tell_a_forbidden_secret_from_a_missing_one() {
    let f = fixture().await;
    let forbidden = f
        .call(
            Some("t-intruder"),
            "secret.get",
            json!({"name": "db", "namespace": "prod"}),
        )
        .await;
    let missing = f
        .call(
            Some("t-intruder"),
            "secret.get",
            json!({"name": "dc", "namespace": "prod"}),
        )
        .await;
    let message = |v: &Value| {
        v["error"]["message"]
            .as_str()
            .unwrap()
            .replace("\"dc\"", "\"db\"")
    };
    assert_eq!(forbidden["error"]["code"], missing["error"]["code"]);
    assert_eq!(message(&forbidden), message(&missing));
}

#[tokio::test]
async fn lists_show_a_workload_only_what_it_may_read() {
    let f = fixture().await;
    let names = |v: &Value| -> Vec<String> {
        v["payload"]["secrets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_owned())
            .collect()
    };
    let list = json!({"namespace": "prod"});
    assert_eq!(
        names(&f.call(Some("t-admin"), "secret.list", list.clone()).await),
        ["db", "shared"]
    );
    assert_eq!(
        names(&f.call(Some("t-api"), "secret.list", list.clone()).await),
        ["db", "shared"]
    );
    assert_eq!(
        names(&f.call(Some("t-intruder"), "secret.list", list).await),
        ["shared"]
    );
}

/// A write whose audit record cannot be written is not applied: every write command answers
/// UNAVAILABLE and the store is exactly as before.
#[tokio::test]
async fn a_write_that_cannot_be_audited_changes_nothing() {
    let f = fixture().await;
    let store_dir = f._dir.path().to_owned();
    // A second core on the same store, whose audit log fails every append.
    drop(f.dispatcher);
    let failing = Dispatcher::new(core_on(&store_dir, AuditLog::failing()));
    let key = |name: &str| {
        ObjectKey::new(
            Namespace::parse("prod").unwrap(),
            Name::parse(name).unwrap(),
        )
    };
    let snapshot = |d: &Dispatcher<FakeAuthorizer, StoreRepository>| {
        let store = d.core().repository().store();
        (
            store.secret(&key("db")).map(|r| (r.version, r.generation)),
            store.secret(&key("new")).is_some(),
            store
                .config(&key("app"))
                .map(|r| (r.data.clone(), r.generation)),
            store.config(&key("new")).is_some(),
        )
    };
    let before = snapshot(&failing);
    for (command, params) in [
        (
            "secret.create",
            json!({"name": "new", "namespace": "prod", "data": {"k": "v"}}),
        ),
        (
            "secret.rotate",
            json!({"name": "db", "namespace": "prod", "newData": {"password": "n3w"}}),
        ),
        ("secret.rotate", json!({"name": "db", "namespace": "prod"})),
        ("secret.delete", json!({"name": "db", "namespace": "prod"})),
        (
            "config.create",
            json!({"name": "new", "namespace": "prod", "data": {"k": "v"}}),
        ),
        (
            "config.update",
            json!({"name": "app", "namespace": "prod", "data": {"level": "x"}}),
        ),
        ("config.delete", json!({"name": "app", "namespace": "prod"})),
        // Reads of secrets fail closed too.
        ("secret.get", json!({"name": "db", "namespace": "prod"})),
    ] {
        let body = serde_json::to_vec(&json!({"command": command, "params": params})).unwrap();
        let answer = serde_json::to_value(failing.handle(Some("t-admin"), &body).await).unwrap();
        assert_eq!(
            answer["error"]["code"],
            json!("UNAVAILABLE"),
            "{command}: {answer}"
        );
        assert!(!answer.to_string().contains("s3cret"));
        assert_eq!(snapshot(&failing), before, "{command} changed the store");
    }
    // Also after reopening the store from disk.
    let reopened = Dispatcher::new(core_on(&store_dir, AuditLog::failing()));
    assert_eq!(snapshot(&reopened), before);
}

/// Like [`core`], on an existing store whose keyring is kept in `dir/keyring.json`.
fn core_on(dir: &std::path::Path, audit: AuditLog) -> CommandCore<FakeAuthorizer, StoreRepository> {
    let ring = Keyring::from_json(&std::fs::read(dir.join("keyring.json")).unwrap()).unwrap();
    let keys = SharedKeyring::new(ring);
    let (store, report) = Store::open(dir, keys.clone(), Default::default()).unwrap();
    assert!(report.refused.is_empty(), "{report:?}");
    CommandCore::new(
        authorizer(),
        StoreRepository::new(Arc::new(store)),
        audit,
        "node-a".to_owned(),
        keys,
    )
}

/// A carrier that answers every write with version 7, or fails, and remembers what it got.
struct FakeCarrier {
    fail: bool,
    carried: Mutex<Vec<(String, String, String)>>,
}

impl super::WriteCarrier for FakeCarrier {
    fn carry<'a>(
        &'a self,
        caller: &'a Caller,
        request: &'a super::Request,
        target: &'a ObjectKey,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<Value, InvokeError>> + Send + 'a>>
    {
        Box::pin(async move {
            self.carried.lock().unwrap().push((
                caller.subject.clone(),
                format!("{} {target}", request.command.name()),
                request.request_id.clone(),
            ));
            if self.fail {
                Err(InvokeError::new(
                    ErrorCode::Unavailable,
                    "the operator did not answer",
                ))
            } else {
                Ok(json!({"name": "db", "namespace": "prod", "version": 7}))
            }
        })
    }
}

/// A server that cannot write passes writes on: after its own authorization (a refusal never
/// reaches the carrier), with a durable intent before and the outcome after, naming the version
/// the carrier answered; reads stay its own.
#[tokio::test]
async fn carried_writes_are_authorized_and_audited_here_and_made_elsewhere() {
    for fail in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let audit_path = dir.path().join("audit.log");
        let (audit, _) = AuditLog::open(&audit_path, "node-a").unwrap();
        let carrier = Arc::new(FakeCarrier {
            fail,
            carried: Mutex::new(Vec::new()),
        });
        let f = Fixture {
            dispatcher: Dispatcher::new(core(dir.path(), audit.clone()))
                .with_carrier(carrier.clone()),
            _dir: dir,
            audit_path,
            audit_log: audit,
        };
        let rotate = json!({"name": "db", "namespace": "prod", "newData": {"k": "canary-c4"}});
        let refused = f
            .call(Some("t-intruder"), "secret.rotate", rotate.clone())
            .await;
        assert_eq!(outcome(&refused), DENIED);
        assert!(
            carrier.carried.lock().unwrap().is_empty(),
            "a refusal is not passed on"
        );

        let body = serde_json::to_vec(
            &json!({"id": "req-9", "command": "secret.rotate", "params": rotate}),
        )
        .unwrap();
        let answer =
            serde_json::to_value(f.dispatcher.handle(Some("t-admin"), &body).await).unwrap();
        if fail {
            assert_eq!(outcome(&answer), "UNAVAILABLE");
        } else {
            assert_eq!(answer["payload"]["version"], json!(7), "{answer}");
        }
        assert_eq!(
            *carrier.carried.lock().unwrap(),
            [(
                "alice".to_owned(),
                "secret.rotate prod/db".to_owned(),
                "req-9".to_owned()
            )]
        );
        // Reads are not carried: the node's store answers (here it holds nothing).
        let read = f
            .call(
                Some("t-admin"),
                "secret.get",
                json!({"name": "db", "namespace": "prod"}),
            )
            .await;
        assert_eq!(outcome(&read), NOT_FOUND);
        assert_eq!(carrier.carried.lock().unwrap().len(), 1);

        let records = f.audit().await;
        let of = |id: &str| -> Vec<(Value, Value, Value)> {
            records
                .iter()
                .filter(|r| r["requestId"] == json!(id))
                .map(|r| {
                    (
                        r["decision"].clone(),
                        r["phase"].clone(),
                        r["version"].clone(),
                    )
                })
                .collect()
        };
        let expected = if fail {
            vec![
                (json!("allow"), json!("intent"), Value::Null),
                (json!("error"), json!("abort"), Value::Null),
            ]
        } else {
            vec![
                (json!("allow"), json!("intent"), Value::Null),
                (json!("allow"), json!("commit"), json!(7)),
            ]
        };
        assert_eq!(of("req-9"), expected);
        assert!(
            records
                .iter()
                .any(|r| r["decision"] == json!("deny") && r["command"] == json!("secret.rotate"))
        );
        let text = std::fs::read_to_string(&f.audit_path).unwrap();
        assert!(!text.contains("canary"));
    }
}

/// A call the gateway gave up on is stopped at the two points where stopping is clean: before
/// it starts, and between its durable intent and its commit. Either way nothing changes, and
/// the record says why.
#[tokio::test]
async fn a_call_given_up_on_changes_nothing_and_is_on_the_record() {
    use tokio_util::sync::CancellationToken;
    let f = fixture().await;
    let admin = f.dispatcher.authenticate(Some("t-admin")).await;
    let request = |command: &str, params: Value, id: &str| {
        serde_json::from_value::<crate::invoke::InvokeRequest>(
            json!({"id": id, "command": command, "params": params}),
        )
    };
    let key = ObjectKey::new(
        Namespace::parse("prod").unwrap(),
        Name::parse("late").unwrap(),
    );
    let store = || f.dispatcher.core().repository().store();

    let create = |id: &'static str, cancel: CancellationToken| {
        f.dispatcher.handle_request(
            admin.clone(),
            request(
                "secret.create",
                json!({"name": "late", "namespace": "prod", "data": {"k": "v"}}),
                id,
            ),
            Some(cancel),
        )
    };

    // Given up before it reached the node's core: not started.
    let gone = CancellationToken::new();
    gone.cancel();
    let answer = serde_json::to_value(create("r-before", gone).await).unwrap();
    assert_eq!(answer["error"]["code"], json!("UNAVAILABLE"), "{answer}");
    let message = answer["error"]["message"].as_str().unwrap();
    assert!(message.contains("given up"), "{message}");
    assert!(store().secret(&key).is_none());

    // Given up while the write was under way: its intent is durable, then it stops.
    let midway = CancellationToken::new();
    *f.dispatcher
        .core()
        .authorizer()
        .give_up_at_check
        .lock()
        .unwrap() = Some(midway.clone());
    let answer = serde_json::to_value(create("r-midway", midway).await).unwrap();
    assert_eq!(answer["error"]["code"], json!("UNAVAILABLE"), "{answer}");
    assert!(
        store().secret(&key).is_none(),
        "a write given up on was made"
    );

    let records = f.audit().await;
    let of = |id: &str| -> Vec<Value> {
        records
            .iter()
            .filter(|r| r["requestId"] == json!(id))
            .cloned()
            .collect()
    };
    let before = of("r-before");
    assert_eq!(before.len(), 1, "{before:?}");
    assert_eq!(before[0]["decision"], json!("error"));
    assert_eq!(before[0]["name"], json!("late"));
    assert!(before[0]["reason"].as_str().unwrap().contains("given up"));
    let midway = of("r-midway");
    let phases: Vec<&Value> = midway.iter().map(|r| &r["phase"]).collect();
    assert_eq!(phases, [&json!("intent"), &json!("abort")], "{midway:?}");
    assert!(midway[1]["reason"].as_str().unwrap().contains("given up"));

    // A call not given up on is untouched by the token it carries.
    let answer = create("r-kept", CancellationToken::new()).await;
    assert!(answer.ok);
    assert!(store().secret(&key).is_some());
}
