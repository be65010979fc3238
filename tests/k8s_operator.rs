//! Cluster tests of `claw-secrets operator` against a real kube-apiserver (see
//! docs/control-plane.md): sealing, rotation, malformed objects, the CRDs' CEL rules, config
//! immutability in the reconcile loop, leader election with failover, deletion, and the
//! metrics and health endpoints.
//!
//! Each test has its own namespace and runs its own operator process(es) (the real binary),
//! restricted to that namespace with `--watch-namespace` so tests running side by side never
//! reconcile each other's objects; the Lease and the master key Secret live there too.
//!
//! Waits poll with a generous timeout; nothing asserts how fast anything happened.

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

#[path = "support/process.rs"]
mod process;

#[path = "support/protocol.rs"]
mod protocol;

#[path = "support/relay.rs"]
mod relay;

#[path = "support/control_plane.rs"]
mod control_plane;

#[path = "support/cluster.rs"]
mod cluster;

#[path = "support/tokens.rs"]
mod tokens;

use process::{free_port, http_get};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event as CoreEvent, Secret};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::api::rbac::v1::PolicyRule;
use kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use claw_secrets::k8s::convert::data_hash;
use claw_secrets::k8s::crd::{ClawConfig, ClawConfigSpec, ClawSecret, ClawSecretSpec};

use cluster::{BIN, secret_with_data};
use control_plane::TestEnv;
use wait::{PATIENCE, eventually};

const MASTER_KEY: &str = cluster::MASTER_KEY_NAME;
const LEASE: &str = "claw-secrets-operator";

// ---------------------------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------------------------

async fn setup(hint: &str) -> TestEnv {
    let env = control_plane::test_env(hint).await;
    cluster::install_crds(&env.client).await;
    env
}

/// A `claw-secrets operator` process confined to the test's namespace; SIGKILLed when dropped.
struct Operator {
    identity: String,
    port: u16,
    log: PathBuf,
    child: Option<Child>,
}

impl Operator {
    fn start(env: &TestEnv, identity: &str, lease_seconds: u32) -> Operator {
        Operator::start_with(env, identity, lease_seconds, &env.kubeconfig)
    }

    /// Like [`Operator::start`], reaching the API server with `kubeconfig` (through a relay).
    fn start_with(
        env: &TestEnv,
        identity: &str,
        lease_seconds: u32,
        kubeconfig: &Path,
    ) -> Operator {
        Operator::spawn(env, identity, lease_seconds, kubeconfig, &[])
    }

    /// Like [`Operator::start`], with further arguments.
    fn start_args(env: &TestEnv, identity: &str, lease_seconds: u32, extra: &[&str]) -> Operator {
        Operator::spawn(env, identity, lease_seconds, &env.kubeconfig, extra)
    }

    fn spawn(
        env: &TestEnv,
        identity: &str,
        lease_seconds: u32,
        kubeconfig: &Path,
        extra: &[&str],
    ) -> Operator {
        let port = free_port();
        let log = std::env::temp_dir().join(format!("{}-{identity}.log", env.namespace));
        let file = std::fs::File::create(&log).expect("operator log file");
        let child = Command::new(BIN)
            .arg("operator")
            .args(["--namespace", &env.namespace])
            .args(["--watch-namespace", &env.namespace])
            .args(["--metrics-addr", &format!("127.0.0.1:{port}")])
            .args(["--identity", identity])
            .args(["--lease-duration-seconds", &lease_seconds.to_string()])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            // Everything the operator logs, at every level of its own code, is checked for
            // plaintext by the tests that use canaries.
            .env("CLAW_SECRETS_LOG", "info,claw_secrets=trace")
            .env_remove("RUST_LOG")
            .env_remove("POD_NAME")
            .env_remove("POD_NAMESPACE")
            .env_remove("WATCH_NAMESPACE")
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {BIN} operator: {e}"));
        Operator {
            identity: identity.to_owned(),
            port,
            log,
            child: Some(child),
        }
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn log_tail(&self) -> String {
        let text = self.log_text();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// `GET path` on the metrics port: `(status, body)`, or `None` if nothing answers.
    fn get(&self, path: &str) -> Option<(u16, String)> {
        http_get(self.port, path)
    }

    fn is_leader(&self) -> bool {
        self.get("/metrics")
            .is_some_and(|(_, body)| body.lines().any(|l| l == "claw_secrets_operator_leader 1"))
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::kill(child);
        }
    }

    fn signal(&self, signal: i32) {
        if let Some(child) = &self.child {
            // SAFETY: kill(2) on our own child, not reaped yet.
            unsafe {
                libc::kill(i32::try_from(child.id()).expect("pid"), signal);
            }
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "--- operator {} ({}):\n{}",
                self.identity,
                self.log.display(),
                self.log_tail()
            );
        } else {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

fn config(name: &str, data: &[(&str, &str)], immutable: bool) -> ClawConfig {
    ClawConfig::new(
        name,
        ClawConfigSpec {
            name: None,
            data: data
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            immutable,
            node_selector: None,
        },
    )
}

/// The Ready condition as `(status, reason, message)`.
fn ready_of(
    conditions: Option<&Vec<claw_secrets::k8s::crd::Condition>>,
) -> Option<(String, String, String)> {
    conditions?
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn secret_ready(s: &ClawSecret) -> Option<(String, String, String)> {
    ready_of(s.status.as_ref().map(|s| &s.conditions))
}

fn config_ready(c: &ClawConfig) -> Option<(String, String, String)> {
    ready_of(c.status.as_ref().map(|s| &s.conditions))
}

/// Waits until ClawSecret `name` is sealed at `version` and Ready; returns it.
async fn sealed_at(api: &Api<ClawSecret>, name: &str, version: u64) -> ClawSecret {
    eventually(&format!("ClawSecret {name} sealed at version {version}"), || async {
        let s = api.get(name).await.map_err(|e| e.to_string())?;
        let sealed = s.spec.sealed.as_ref().map(|x| x.version);
        let status = s.status.as_ref().and_then(|x| x.version);
        let ready = secret_ready(&s);
        let done = s.spec.data.is_none()
            && sealed == Some(version)
            && status == Some(version)
            && ready.as_ref().is_some_and(|r| r.0 == "True" && r.1 == "Sealed");
        if done {
            Ok(s)
        } else {
            Err(format!(
                "data present: {}, sealed: {sealed:?}, status.version: {status:?}, ready: {ready:?}",
                s.spec.data.is_some()
            ))
        }
    })
    .await
}

/// What `kubectl get configmap claw-secrets-keyring-status -o yaml` shows in `data`.
async fn keyring_status(
    client: &Client,
    ns: &str,
) -> Result<std::collections::BTreeMap<String, String>, String> {
    Ok(
        Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(client.clone(), ns)
            .get("claw-secrets-keyring-status")
            .await
            .map_err(|e| e.to_string())?
            .data
            .unwrap_or_default(),
    )
}

/// The object exactly as the API server stores it (all fields, annotations included), as JSON.
async fn raw_json(client: &Client, ns: &str, name: &str) -> String {
    let api: Api<DynamicObject> =
        Api::namespaced_with(client.clone(), ns, &ApiResource::erase::<ClawSecret>(&()));
    serde_json::to_string(&api.get(name).await.expect("get raw object")).expect("json")
}

/// Every Event of the namespace, from both Event APIs, as JSON.
async fn all_events_json(client: &Client, ns: &str) -> String {
    let v1: Api<Event> = Api::namespaced(client.clone(), ns);
    let core: Api<CoreEvent> = Api::namespaced(client.clone(), ns);
    let a = v1.list(&ListParams::default()).await.expect("list events");
    let b = core
        .list(&ListParams::default())
        .await
        .expect("list core events");
    format!(
        "{}\n{}",
        serde_json::to_string(&a.items).unwrap(),
        serde_json::to_string(&b.items).unwrap()
    )
}

/// Events about `object` with `reason`, as `(type, note)`.
async fn events_for(
    client: &Client,
    ns: &str,
    object: &str,
    reason: &str,
) -> Vec<(String, String)> {
    Api::<Event>::namespaced(client.clone(), ns)
        .list(&ListParams::default())
        .await
        .expect("list events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object)
        })
        .map(|e| (e.type_.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

async fn wait_event(
    client: &Client,
    ns: &str,
    object: &str,
    reason: &str,
) -> Vec<(String, String)> {
    eventually(&format!("a {reason} Event on {object}"), || async {
        let found = events_for(client, ns, object, reason).await;
        if found.is_empty() {
            Err("none yet".to_owned())
        } else {
            Ok(found)
        }
    })
    .await
}

fn kubectl() -> Option<PathBuf> {
    let local = control_plane::bin_dir().join("kubectl");
    if local.is_file() {
        return Some(local);
    }
    Command::new("kubectl")
        .arg("version")
        .arg("--client")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| PathBuf::from("kubectl"))
}

/// `kubectl apply -f -` (client-side apply, which copies the manifest, plaintext included,
/// into the last-applied annotation: the operator must scrub it).
fn kubectl_apply(kubectl: &Path, kubeconfig: &Path, ns: &str, manifest: &Value) {
    let mut child = Command::new(kubectl)
        .args(["apply", "-n", ns, "-f", "-"])
        .env("KUBECONFIG", kubeconfig)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run kubectl");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "kubectl apply failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn api_code(r: Result<impl std::fmt::Debug, kube::Error>) -> (u16, String) {
    match r {
        Err(kube::Error::Api(s)) => (s.code, s.message),
        other => panic!("expected the API server to refuse, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// Plaintext in, ciphertext out: sealed at version 1, rotated to 2, deleted with an Event; the
/// canaries appear nowhere (object, kubectl's annotation, status, Events, operator log); the
/// master key Secret was created; /metrics, /healthz and /readyz answer.
#[tokio::test]
async fn seals_rotates_and_deletes_a_secret_without_leaking_plaintext() {
    let env = setup("op-seal").await;
    let ns = env.namespace.as_str();
    let client = env.client.clone();
    let api: Api<ClawSecret> = env.api();
    let op = Operator::start(&env, "op-seal", 15);
    let canary = format!("canary-{}", control_plane::unique_namespace("v1"));
    let canary2 = format!("canary2-{}", control_plane::unique_namespace("v2"));

    // Version 1, applied the way users do (kubectl apply, last-applied annotation and all).
    let manifest = json!({
        "apiVersion": "clawbernetes.io/v1beta1",
        "kind": "ClawSecret",
        "metadata": { "name": "db.password" },
        "spec": { "data": { "password": canary, "user": "admin" }, "allowedWorkloads": ["api"] },
    });
    match kubectl() {
        Some(k) => kubectl_apply(&k, &env.kubeconfig, ns, &manifest),
        None => {
            eprintln!(
                "no kubectl: creating through the API (the last-applied path is not covered)"
            );
            api.create(
                &PostParams::default(),
                &serde_json::from_value(manifest).unwrap(),
            )
            .await
            .expect("create ClawSecret");
        }
    }
    let v1 = sealed_at(&api, "db.password", 1).await;
    let sealed = v1.spec.sealed.as_ref().unwrap();
    let ready = secret_ready(&v1).unwrap();
    assert_eq!(
        ready.2,
        format!("version 1 sealed with key {}", sealed.key_id)
    );
    // No finalizer: a deletion never waits for the operator.
    assert!(v1.finalizers().is_empty(), "{:?}", v1.finalizers());
    let created = wait_event(&client, ns, "db.password", "Created").await;
    assert_eq!(created[0].0, "Normal");
    assert!(created[0].1.contains("version 1") && created[0].1.contains(&sealed.key_id));
    // No webhook in this test: the plaintext was stored first, and that is said as a Warning.
    let stored = wait_event(&client, ns, "db.password", "PlaintextStored").await;
    assert_eq!(stored[0].0, "Warning");
    assert!(stored[0].1.contains("webhook"), "{stored:?}");

    // The master key Secret exists where the operator lives, holding the key that sealed it.
    let key_secret = Api::<Secret>::namespaced(client.clone(), ns)
        .get(MASTER_KEY)
        .await
        .expect("the operator created the master key Secret");
    let ring = String::from_utf8(key_secret.data.unwrap()["keyring.json"].0.clone()).unwrap();
    assert!(ring.contains(&sealed.key_id));

    // Rotation: new plaintext, version 2, Rotated.
    api.patch(
        "db.password",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "data": { "password": canary2 } } })),
    )
    .await
    .expect("set new data");
    let v2 = sealed_at(&api, "db.password", 2).await;
    assert_ne!(v2.spec.sealed.as_ref().unwrap().envelope, sealed.envelope);
    let rotated = wait_event(&client, ns, "db.password", "Rotated").await;
    assert!(rotated[0].1.contains("version 2"), "{rotated:?}");

    // Nowhere in clear: the stored object (annotations, managed fields, status), any Event,
    // the operator's log.
    let object = raw_json(&client, ns, "db.password").await;
    let events = all_events_json(&client, ns).await;
    for c in [&canary, &canary2] {
        assert!(
            !object.contains(c.as_str()),
            "plaintext left in the object: {object}"
        );
        assert!(
            !events.contains(c.as_str()),
            "plaintext in an Event: {events}"
        );
        assert!(
            !op.log_text().contains(c.as_str()),
            "plaintext in the operator log"
        );
    }
    assert!(
        object.contains("last-applied-configuration") || kubectl().is_none(),
        "kubectl's annotation is scrubbed, not removed: {object}"
    );

    // Versions never go down: the server refuses an older sealed version.
    let (code, _) = api_code(
        api.patch(
            "db.password",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "sealed": { "version": 1 } } })),
        )
        .await,
    );
    assert_eq!(code, 422);

    // Deletion: the object goes at once, and the operator reports it from the watch.
    api.delete("db.password", &DeleteParams::default())
        .await
        .expect("delete");
    eventually("db.password to disappear", || async {
        match api
            .get_opt("db.password")
            .await
            .map_err(|e| e.to_string())?
        {
            None => Ok(()),
            Some(s) => Err(format!("still there, finalizers {:?}", s.finalizers())),
        }
    })
    .await;
    let deleted = wait_event(&client, ns, "db.password", "Deleted").await;
    assert!(deleted[0].1.contains("version 2"), "{deleted:?}");

    // Endpoints.
    assert_eq!(op.get("/healthz").map(|r| r.0), Some(200));
    assert_eq!(op.get("/readyz").map(|r| r.0), Some(200));
    let (status, metrics) = op.get("/metrics").expect("/metrics answers");
    assert_eq!(status, 200);
    let sample = |line: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(line)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no sample {line} in\n{metrics}"))
    };
    assert!(
        sample(
            "claw_secrets_operator_reconciliations_total{kind=\"ClawSecret\",result=\"success\"}"
        ) >= 3
    );
    assert_eq!(
        sample("claw_secrets_operator_seals_total{event=\"created\"}"),
        1
    );
    assert_eq!(
        sample("claw_secrets_operator_seals_total{event=\"rotated\"}"),
        1
    );
    assert_eq!(sample("claw_secrets_operator_leader"), 1);
    for c in [&canary, &canary2] {
        assert!(!metrics.contains(c.as_str()));
    }
    env.cleanup().await;
}

/// A malformed object is reported on its own status (with a reason that says what is wrong)
/// and never holds up the others.
#[tokio::test]
async fn malformed_objects_are_reported_and_do_not_stall_others() {
    let env = setup("op-malformed").await;
    let ns = env.namespace.as_str();
    let client = env.client.clone();
    let secrets: Api<ClawSecret> = env.api();
    let configs: Api<ClawConfig> = env.api();
    let op = Operator::start(&env, "op-malformed", 15);
    let canary = format!("canary-{}", control_plane::unique_namespace("bad"));

    // A data key the seed does not allow (the schema does not constrain map keys).
    secrets
        .create(
            &PostParams::default(),
            &secret_with_data("bad-key", &[("bad key", &canary)]),
        )
        .await
        .expect("create bad-key");
    // spec.name that does not belong to this object name.
    let mut mismatch = secret_with_data("mismatch", &[("password", "x")]);
    mismatch.spec.name = Some("someone.else".to_owned());
    secrets
        .create(&PostParams::default(), &mismatch)
        .await
        .expect("create mismatch");
    // A sealed secret whose envelope is garbage.
    let forged = ClawSecret::new(
        "forged",
        ClawSecretSpec {
            name: None,
            data: None,
            encrypted_data: None,
            allowed_workloads: vec![],
            node_selector: None,
            sealed: Some(claw_secrets::k8s::crd::SealedData {
                version: 1,
                key_id: "k-0000000000000000".to_owned(),
                envelope: "bm90IGFuIGVudmVsb3Bl".to_owned(),
                seal_time: "2025-01-01T00:00:00Z".to_owned(),
                data_digest: None,
            }),
        },
    );
    secrets
        .create(&PostParams::default(), &forged)
        .await
        .expect("create forged");
    // A config with a bad key.
    configs
        .create(
            &PostParams::default(),
            &config("bad-config", &[("no/slash", "v")], false),
        )
        .await
        .expect("create bad-config");
    // ... and valid objects created after them.
    secrets
        .create(
            &PostParams::default(),
            &secret_with_data("good", &[("password", "fine")]),
        )
        .await
        .expect("create good");
    configs
        .create(
            &PostParams::default(),
            &config("good-config", &[("mode", "fast")], false),
        )
        .await
        .expect("create good-config");

    sealed_at(&secrets, "good", 1).await;
    eventually("good-config accepted", || async {
        let c = configs
            .get("good-config")
            .await
            .map_err(|e| e.to_string())?;
        match config_ready(&c) {
            Some(r) if r.0 == "True" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;

    for (name, reason, mentions) in [
        ("bad-key", "InvalidData", "bad key"),
        ("mismatch", "InvalidName", "someone.else"),
        ("forged", "InvalidSealedData", "envelope"),
    ] {
        let (status, why, message) = eventually(&format!("{name} reported"), || async {
            let s = secrets.get(name).await.map_err(|e| e.to_string())?;
            secret_ready(&s).ok_or_else(|| "no Ready condition yet".to_owned())
        })
        .await;
        assert_eq!(
            (status.as_str(), why.as_str()),
            ("False", reason),
            "{name}: {message}"
        );
        assert!(message.contains(mentions), "{name}: {message}");
        let warned = wait_event(&client, ns, name, reason).await;
        assert_eq!(warned[0].0, "Warning");
    }
    let c = eventually("bad-config reported", || async {
        let c = configs.get("bad-config").await.map_err(|e| e.to_string())?;
        match config_ready(&c) {
            Some(_) => Ok(c),
            None => Err("no Ready condition yet".to_owned()),
        }
    })
    .await;
    let (status, why, _) = config_ready(&c).expect("reported");
    assert_eq!((status.as_str(), why.as_str()), ("False", "InvalidData"));
    assert!(c.status.unwrap().accepted_data_hash.is_none());

    // The unsealable plaintext stays where the user put it, but goes nowhere else.
    let bad = secrets.get("bad-key").await.unwrap();
    let status_json = serde_json::to_string(&bad.status).unwrap();
    assert!(!status_json.contains(&canary));
    assert!(!all_events_json(&client, ns).await.contains(&canary));
    assert!(!op.log_text().contains(&canary));

    // Fixing the object is all it takes.
    secrets
        .patch(
            "bad-key",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "data": { "bad key": null, "good_key": "v" } } })),
        )
        .await
        .expect("fix bad-key");
    sealed_at(&secrets, "bad-key", 1).await;
    env.cleanup().await;
}

/// The CRDs' validation in the real API server (no operator involved).
#[tokio::test]
async fn the_api_server_enforces_the_crd_rules() {
    let env = setup("op-cel").await;
    let secrets: Api<ClawSecret> = env.api();
    let configs: Api<ClawConfig> = env.api();
    let pp = PatchParams::default();

    configs
        .create(
            &PostParams::default(),
            &config("frozen", &[("mode", "fast")], true),
        )
        .await
        .expect("create an immutable config");
    let (code, message) = api_code(
        configs
            .patch(
                "frozen",
                &pp,
                &Patch::Merge(json!({ "spec": { "data": { "mode": "slow" } } })),
            )
            .await,
    );
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("immutable"), "{message}");
    let (code, message) = api_code(
        configs
            .patch(
                "frozen",
                &pp,
                &Patch::Merge(json!({ "spec": { "immutable": false } })),
            )
            .await,
    );
    assert_eq!(code, 422, "{message}");
    // Deleting it is still allowed.
    configs
        .delete("frozen", &DeleteParams::default())
        .await
        .expect("delete an immutable config");

    let mut upper = secret_with_data("upper", &[("k", "v")]);
    upper.spec.name = Some("Upper".to_owned());
    let (code, message) = api_code(secrets.create(&PostParams::default(), &upper).await);
    assert_eq!(code, 422, "{message}");

    let mut empty = secret_with_data("empty", &[]);
    empty.spec.data = None;
    let (code, message) = api_code(secrets.create(&PostParams::default(), &empty).await);
    assert_eq!(code, 422, "{message}");

    let mut sealed = secret_with_data("sealed", &[]);
    sealed.spec.data = None;
    sealed.spec.sealed = Some(claw_secrets::k8s::crd::SealedData {
        version: 3,
        key_id: "k-0000000000000000".to_owned(),
        envelope: "AAAA".to_owned(),
        seal_time: "2025-01-01T00:00:00Z".to_owned(),
        data_digest: None,
    });
    secrets
        .create(&PostParams::default(), &sealed)
        .await
        .expect("create a sealed secret");
    let (code, message) = api_code(
        secrets
            .patch(
                "sealed",
                &pp,
                &Patch::Merge(json!({ "spec": { "sealed": { "version": 2 } } })),
            )
            .await,
    );
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("must only move forward"), "{message}");
    secrets
        .patch(
            "sealed",
            &pp,
            &Patch::Merge(json!({ "spec": { "sealed": { "version": 4 } } })),
        )
        .await
        .expect("a higher version is fine");
    // The refusals name the field and the rule: spec.sealed.version, "must".
    assert!(message.contains("spec.sealed.version"), "{message}");

    // spec.name is fixed at creation: set, changed or removed later is refused.
    let (code, message) = api_code(
        secrets
            .patch(
                "sealed",
                &pp,
                &Patch::Merge(json!({ "spec": { "name": "sealed" } })),
            )
            .await,
    );
    assert_eq!(code, 422, "{message}");
    assert!(
        message.contains("spec.name") && message.contains("must not change after creation"),
        "{message}"
    );
    env.cleanup().await;
}

/// Config data is accepted into status.acceptedDataHash (what node agents deliver); a mutable
/// config's new data is accepted again; the status is rebuilt by observation when lost.
#[tokio::test]
async fn configs_are_accepted_and_their_status_rebuilt_by_observation() {
    let env = setup("op-config").await;
    let ns = env.namespace.as_str();
    let client = env.client.clone();
    let configs: Api<ClawConfig> = env.api();
    let _op = Operator::start(&env, "op-config", 15);

    let accepted = |name: &'static str, hash: String| {
        let configs = configs.clone();
        async move {
            eventually(&format!("{name} accepted with hash {hash}"), || async {
                let c = configs.get(name).await.map_err(|e| e.to_string())?;
                let status = c.status.clone().unwrap_or_default();
                let ready = config_ready(&c);
                if status.accepted_data_hash.as_deref() == Some(hash.as_str())
                    && ready
                        .as_ref()
                        .is_some_and(|r| r.0 == "True" && r.1 == "Accepted")
                {
                    Ok(c)
                } else {
                    Err(format!("{status:?}"))
                }
            })
            .await
        }
    };

    // Mutable: each new data is accepted, updatedAt moves.
    let first = BTreeMap::from([("mode".to_owned(), "fast".to_owned())]);
    configs
        .create(
            &PostParams::default(),
            &config("app.settings", &[("mode", "fast")], false),
        )
        .await
        .expect("create");
    let c1 = accepted("app.settings", data_hash(&first)).await;
    let second = BTreeMap::from([("mode".to_owned(), "slow".to_owned())]);
    configs
        .patch(
            "app.settings",
            &PatchParams::default(),
            &Patch::Merge(json!({ "spec": { "data": { "mode": "slow" } } })),
        )
        .await
        .expect("update");
    let c2 = accepted("app.settings", data_hash(&second)).await;
    let (t1, t2) = (
        c1.status.unwrap().accepted_time.unwrap(),
        c2.status.unwrap().accepted_time.unwrap(),
    );
    assert!(t2 > t1, "updatedAt moves with the data: {t1} -> {t2}");

    // Immutable: accepted like any other (the API server keeps it immutable: see the CEL test).
    configs
        .create(
            &PostParams::default(),
            &config("frozen", &[("mode", "fast")], true),
        )
        .await
        .expect("create immutable");
    let frozen = accepted("frozen", data_hash(&first)).await;
    let before = frozen.status.clone().unwrap();
    assert_eq!(
        before
            .conditions
            .iter()
            .map(|c| c.type_.as_str())
            .collect::<Vec<_>>(),
        ["Ready"],
        "no condition remembers anything the spec does not say"
    );

    // The status is rebuilt by observation: wiped, it comes back the same (the time of
    // acceptance becomes the time it was observed again).
    configs
        .patch_status(
            "frozen",
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": null })),
        )
        .await
        .expect("wipe the status");
    let wiped = configs.get("frozen").await.unwrap();
    assert!(
        wiped
            .status
            .as_ref()
            .is_none_or(|s| s.accepted_data_hash.is_none()),
        "status wiped: {:?}",
        wiped.status
    );
    let rebuilt = accepted("frozen", data_hash(&first)).await;
    let after = rebuilt.status.unwrap();
    assert_eq!(
        (after.accepted_data_hash, after.observed_generation),
        (before.accepted_data_hash, before.observed_generation)
    );
    assert!(after.accepted_time.unwrap() >= before.accepted_time.unwrap());

    // Deleting a config: Deleted Event, object gone.
    configs
        .delete("app.settings", &DeleteParams::default())
        .await
        .expect("delete");
    wait_event(&client, ns, "app.settings", "Deleted").await;
    eventually("app.settings to disappear", || async {
        match configs
            .get_opt("app.settings")
            .await
            .map_err(|e| e.to_string())?
        {
            None => Ok(()),
            Some(_) => Err("still there".to_owned()),
        }
    })
    .await;
    env.cleanup().await;
}

/// Waits until the Lease names one of `replicas`, that one reports leader 1, the other not,
/// and both are ready (the standby once it has seen the holder); returns the holder.
async fn one_leads_one_stands_by(leases: &Api<Lease>, replicas: [&Operator; 2]) -> String {
    eventually("one replica to lead, the other to stand by", || async {
        let h = lease_state(leases).await.map(|s| s.0).unwrap_or_default();
        let ready = |op: &Operator| op.get("/readyz").is_some_and(|r| r.0 == 200);
        let leaders = replicas.iter().filter(|op| op.is_leader()).count();
        let named = replicas.iter().any(|op| op.identity == h);
        if named && replicas.iter().all(|op| ready(op)) && leaders == 1 {
            Ok(h)
        } else {
            Err(format!("holder {h:?}, leaders {leaders}"))
        }
    })
    .await
}

/// The Lease's holder and when it was last renewed (as the holder wrote it), if there is one.
async fn lease_state(leases: &Api<Lease>) -> Option<(String, jiff::Timestamp, jiff::Timestamp)> {
    let spec = leases.get_opt(LEASE).await.ok()??.spec?;
    Some((
        spec.holder_identity?,
        spec.acquire_time?.0,
        spec.renew_time?.0,
    ))
}

/// A partition, not a death: the leader's renewals are black-holed (its relay to the API
/// server accepts and never answers), while the standby reaches the API server. The leader
/// must step down (report leader 0, count the loss, keep running as a standby: no crash loop)
/// by its renew deadline, counted from its last renewal, which is before the Lease can expire
/// for anyone else; the standby takes over only once the lease has expired since that renewal;
/// and sampling both `/metrics` continuously never shows two leaders.
#[tokio::test]
async fn a_leader_that_cannot_renew_steps_down_before_another_takes_over() {
    let env = setup("op-partition").await;
    let leases: Api<Lease> = env.api();
    let lease_seconds = 6;
    let lease = Duration::from_secs(lease_seconds.into());
    let (hole_a, via_a) = relay::BlackHole::in_front_of(&env.kubeconfig).await;
    let (hole_b, via_b) = relay::BlackHole::in_front_of(&env.kubeconfig).await;
    let mut a = Operator::start_with(&env, "replica-a", lease_seconds, &via_a);
    let mut b = Operator::start_with(&env, "replica-b", lease_seconds, &via_b);
    let first = one_leads_one_stands_by(&leases, [&a, &b]).await;

    // Both /metrics, sampled back to back from another thread until the test ends.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, ports) = (stop.clone(), [a.port, b.port]);
        std::thread::spawn(move || {
            let leads = |port| {
                http_get(port, "/metrics").is_some_and(|(_, body)| {
                    body.lines().any(|l| l == "claw_secrets_operator_leader 1")
                })
            };
            let (mut samples, mut both) = (0u64, 0u64);
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                if leads(ports[0]) && leads(ports[1]) {
                    both += 1;
                }
                samples += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            (samples, both)
        })
    };

    let (leader, standby, hole) = if first == "replica-a" {
        (&mut a, &mut b, &hole_a)
    } else {
        (&mut b, &mut a, &hole_b)
    };
    hole.black_hole();
    let partitioned = Instant::now();
    // It steps down (reports leader 0, its own /metrics needs no API server) and stays up.
    loop {
        if !leader.is_leader() {
            break;
        }
        assert!(
            partitioned.elapsed() < PATIENCE,
            "the partitioned leader did not step down"
        );
        assert!(leader.exited().is_none(), "the partitioned leader exited");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let exited_after = partitioned.elapsed();
    let exited_at = jiff::Timestamp::now();
    assert!(
        leader.log_text().contains("could not renew")
            && leader
                .log_text()
                .contains("stopped acting as the leader; standing by"),
        "the leader says why it stopped, and that it stands by:\n{}",
        leader.log_tail()
    );
    // Its last renewal is what the Lease still says; the standby may not act before that
    // renewal is a lease duration old, and the partitioned leader has stopped before.
    let (holder, _, last_renewal) = lease_state(&leases).await.expect("the Lease");
    assert_eq!(
        holder, leader.identity,
        "nobody took over while the leader still acted"
    );
    // Its renew deadline is two thirds of the lease after that renewal; what must hold is that
    // it is gone before the lease could expire for anyone else.
    let stopped = exited_at.duration_since(last_renewal);
    assert!(
        stopped < jiff::SignedDuration::try_from(lease).unwrap(),
        "the partitioned leader still led {stopped:?} after its last renewal, past the lease \
         ({lease:?}) a standby waits out"
    );
    let standby_identity = standby.identity.clone();
    let (new_holder, taken_at, _) = eventually("the standby to take over", || async {
        match lease_state(&leases).await {
            Some(s) if s.0 == standby_identity && standby.is_leader() => Ok(s),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(new_holder, standby.identity);
    let waited = taken_at.duration_since(last_renewal);
    assert!(
        waited >= jiff::SignedDuration::try_from(lease).unwrap(),
        "the standby took over {waited:?} after the leader's last renewal, before the lease \
         ({lease:?}) expired"
    );
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let (samples, both) = sampler.join().expect("the sampler");
    assert_eq!(both, 0, "{both} of {samples} samples saw two leaders");
    // The old leader is still running, a standby that counted the loss.
    assert!(
        leader.exited().is_none(),
        "the old leader exited:\n{}",
        leader.log_tail()
    );
    let metrics = leader.get("/metrics").expect("the old leader's /metrics").1;
    assert!(
        metrics
            .lines()
            .any(|l| l == "claw_secrets_operator_leadership_lost_total 1"),
        "{metrics}"
    );
    println!(
        "PARTITION: lease {lease_seconds}s (renew deadline {:.1}s): the partitioned leader \
         stepped down {:.2}s after the partition, {:.2}s after its last renewal, and stood by; \
         the standby took over \
         {:.2}s after that renewal; {samples} samples, never two leaders",
        lease.as_secs_f64() * 2.0 / 3.0,
        exited_after.as_secs_f64(),
        stopped.as_secs_f64(),
        waited.as_secs_f64()
    );
    drop((hole_a, hole_b));
    env.cleanup().await;
}

/// Two replicas: exactly one leads (holds the Lease, reports leader 1), both are ready; the
/// leader is SIGKILLed and the standby takes over and seals new secrets; a SIGTERMed leader
/// releases the Lease and exits 0.
#[tokio::test]
async fn one_leader_at_a_time_and_failover() {
    let env = setup("op-leader").await;
    let secrets: Api<ClawSecret> = env.api();
    let leases: Api<Lease> = env.api();
    let lease_seconds = 4;
    let mut a = Operator::start(&env, "replica-a", lease_seconds);
    let mut b = Operator::start(&env, "replica-b", lease_seconds);

    let holder = || async {
        leases
            .get_opt(LEASE)
            .await
            .ok()
            .flatten()
            .and_then(|l| l.spec)
            .and_then(|s| s.holder_identity)
            .unwrap_or_default()
    };
    let first = one_leads_one_stands_by(&leases, [&a, &b]).await;
    let (leader, standby) = if first == "replica-a" {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    assert!(leader.is_leader() && !standby.is_leader());
    secrets
        .create(
            &PostParams::default(),
            &secret_with_data("before", &[("k", "v")]),
        )
        .await
        .unwrap();
    let before = sealed_at(&secrets, "before", 1).await;

    // The leader dies without a word: the standby waits out the lease, then takes over.
    leader.kill();
    let second = eventually("the standby to take over", || async {
        let h = holder().await;
        if h == standby.identity && standby.is_leader() {
            Ok(h)
        } else {
            Err(format!("holder {h:?}"))
        }
    })
    .await;
    assert_ne!(second, first);
    secrets
        .create(
            &PostParams::default(),
            &secret_with_data("after", &[("k", "v")]),
        )
        .await
        .unwrap();
    let after = sealed_at(&secrets, "after", 1).await;
    assert_eq!(
        after.spec.sealed.unwrap().key_id,
        before.spec.sealed.unwrap().key_id,
        "the new leader uses the same master key"
    );
    let lease = leases.get(LEASE).await.unwrap().spec.unwrap();
    assert!(lease.lease_transitions.unwrap_or(0) >= 1, "{lease:?}");

    // A clean shutdown releases the Lease at once and exits 0.
    standby.signal(libc::SIGTERM);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = standby.exited() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the leader did not exit after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        standby.log_tail()
    );
    assert_eq!(holder().await, "", "the Lease was released");
    env.cleanup().await;
}

/// The pod's `terminationGracePeriodSeconds` (charts/claw-secrets, the Kubernetes default): after
/// it the kubelet SIGKILLs, and a leader killed holding the Lease leaves the standby waiting out
/// the whole lease.
const TERMINATION_GRACE: Duration = Duration::from_secs(30);

/// A leader whose controllers never got their first list (here: no right to list ClawConfigs,
/// as after an RBAC mistake; the same happens with an API server that fails lists) still stops
/// on SIGTERM before the kubelet's SIGKILL, exits 0 and releases the Lease. (kube-runtime's
/// graceful shutdown waits for a cache that will never fill: seen as an operator pod stuck in
/// Terminating for its full grace period on the node test.)
#[tokio::test]
async fn a_leader_with_caches_that_never_fill_still_stops_on_sigterm() {
    let env = setup("op-stuck-list").await;
    let leases: Api<Lease> = env.api();
    let account = "operator-without-configs";
    let rule = |groups: &[&str], resources: &[&str], verbs: &[&str]| PolicyRule {
        api_groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
        resources: Some(resources.iter().map(|r| (*r).to_owned()).collect()),
        verbs: verbs.iter().map(|v| (*v).to_owned()).collect(),
        ..PolicyRule::default()
    };
    // The operator's rights (deploy/rbac/operator.yaml) without ClawConfigs.
    cluster::grant_rules(
        &env.client,
        &env.namespace,
        cluster::service_account_subject(&env.namespace, account),
        "operator-without-configs",
        vec![
            rule(
                &["clawbernetes.io"],
                &["clawsecrets"],
                &["get", "list", "watch", "patch", "update"],
            ),
            rule(
                &["clawbernetes.io"],
                &["clawsecrets/status"],
                &["get", "patch", "update"],
            ),
            rule(&["events.k8s.io"], &["events"], &["create", "patch"]),
            rule(
                &["coordination.k8s.io"],
                &["leases"],
                &["get", "create", "update"],
            ),
            rule(&[""], &["secrets"], &["get", "create"]),
        ],
    )
    .await;
    let token = cluster::service_account_token(&env.client, &env.namespace, account).await;
    let kubeconfig = tokens::kubeconfig_with_token(
        &env.kubeconfig,
        &token,
        &std::env::temp_dir().join(format!("{}-{account}.kubeconfig", env.namespace)),
    );
    let mut op = Operator::start_with(&env, "replica-a", 15, &kubeconfig);
    eventually(
        "the operator to lead, its ClawConfig list refused",
        || async {
            let refused = op.log_text().contains("clawconfigs") && op.log_text().contains("403");
            if op.is_leader() && refused {
                Ok(())
            } else {
                Err(op.log_tail())
            }
        },
    )
    .await;

    op.signal(libc::SIGTERM);
    let signalled = Instant::now();
    let status = loop {
        if let Some(status) = op.exited() {
            break status;
        }
        assert!(
            signalled.elapsed() < TERMINATION_GRACE,
            "still running {TERMINATION_GRACE:?} after SIGTERM (the kubelet would SIGKILL it \
             now, the Lease still held); log:\n{}",
            op.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!(
        "OPERATOR: a leader with a cache that never filled exited {:.1}s after SIGTERM",
        signalled.elapsed().as_secs_f64()
    );
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        op.log_tail()
    );
    let holder = lease_state(&leases).await.map(|s| s.0);
    assert_eq!(holder, None, "the Lease was released");
    std::fs::remove_file(&kubeconfig).ok();
    env.cleanup().await;
}

/// `kubectl apply` of the same manifest again (as a GitOps controller does on every sync)
/// leaves the version alone: the operator recognises the current version's data by its keyed
/// digest and only removes the plaintext. Changed data makes a new version, once.
#[tokio::test]
async fn reapplying_the_same_manifest_does_not_rotate() {
    let env = setup("op-reapply").await;
    let Some(kubectl) = kubectl() else {
        panic!("kubectl is needed: `bash hack/control-plane.sh install` builds it");
    };
    let secrets: Api<ClawSecret> = env.api();
    let op = Operator::start(&env, "replica-a", 15);
    let manifest = |value: &str| {
        json!({
            "apiVersion": "clawbernetes.io/v1beta1",
            "kind": "ClawSecret",
            "metadata": { "name": "gitops" },
            "spec": { "data": { "password": value, "user": "app" } },
        })
    };
    let unchanged_count = || {
        op.get("/metrics")
            .map(|(_, body)| {
                body.lines()
                    .find_map(|l| {
                        l.strip_prefix("claw_secrets_operator_seals_total{event=\"unchanged\"} ")
                    })
                    .unwrap_or("")
                    .to_owned()
            })
            .unwrap_or_default()
    };

    // kubectl apply has returned, so the object holds the plaintext until the operator has
    // handled it: its absence means the operator is done with this apply.
    let handled = || async {
        eventually("the operator to take the plaintext out", || async {
            let s = secrets.get("gitops").await.map_err(|e| e.to_string())?;
            s.spec
                .data
                .is_none()
                .then_some(s)
                .ok_or_else(|| "data present".to_owned())
        })
        .await
    };
    let counted = |n: &'static str| {
        eventually("the unchanged data counted", move || async move {
            (unchanged_count() == n)
                .then_some(())
                .ok_or_else(unchanged_count)
        })
    };

    kubectl_apply(&kubectl, &env.kubeconfig, &env.namespace, &manifest("one"));
    let first = sealed_at(&secrets, "gitops", 1).await;
    for n in ["1", "2"] {
        kubectl_apply(&kubectl, &env.kubeconfig, &env.namespace, &manifest("one"));
        let again = handled().await;
        assert_eq!(
            again.spec.sealed, first.spec.sealed,
            "the same data applied again: the same version, untouched"
        );
        counted(n).await;
    }

    kubectl_apply(&kubectl, &env.kubeconfig, &env.namespace, &manifest("two"));
    let second = sealed_at(&secrets, "gitops", 2).await;
    kubectl_apply(&kubectl, &env.kubeconfig, &env.namespace, &manifest("two"));
    let after = handled().await;
    assert_eq!(after.spec.sealed, second.spec.sealed);
    counted("3").await;
    let digest = after.spec.sealed.unwrap().data_digest.unwrap();
    assert!(digest.starts_with("hmac-sha256:"), "{digest}");
    assert!(
        !raw_json(&env.client, &env.namespace, "gitops")
            .await
            .contains("\"two\"")
    );
    env.cleanup().await;
}

/// A version rotated away cannot be put back, by any route the API allows: with `spec.sealed`
/// replaced by (invalid) `spec.data` in between, the saved version-1 `sealed` is refused by the
/// API server against `status.version`, the highest version the secret has had; and
/// `status.version` itself never goes back.
#[tokio::test]
async fn a_rotated_away_version_cannot_be_reinstated() {
    let env = setup("op-reinstate").await;
    let secrets: Api<ClawSecret> = env.api();
    let _op = Operator::start(&env, "replica-a", 15);
    secrets
        .create(
            &PostParams::default(),
            &secret_with_data("db", &[("password", "v1")]),
        )
        .await
        .unwrap();
    let saved = sealed_at(&secrets, "db", 1).await.spec.sealed.unwrap();
    let merge = |patch: Value| {
        let secrets = secrets.clone();
        async move {
            secrets
                .patch("db", &PatchParams::default(), &Patch::Merge(&patch))
                .await
        }
    };
    merge(json!({ "spec": { "data": { "password": "v2" } } }))
        .await
        .unwrap();
    sealed_at(&secrets, "db", 2).await;
    // Allowed by the rules on the spec alone: sealed gone, data present (invalid: a bad key).
    merge(json!({ "spec": { "sealed": null, "data": { "bad key!": "x" } } }))
        .await
        .unwrap();
    eventually("the operator to report the invalid data", || async {
        let s = secrets.get("db").await.map_err(|e| e.to_string())?;
        secret_ready(&s)
            .filter(|r| r.0 == "False" && r.1 == "InvalidData")
            .ok_or_else(|| format!("{:?}", secret_ready(&s)))
    })
    .await;
    let (code, message) =
        api_code(merge(json!({ "spec": { "data": null, "sealed": saved } })).await);
    assert_eq!(code, 422, "{message}");
    assert!(message.contains("cannot be put back"), "{message}");
    let status = json!({ "status": { "version": 1 } });
    let (code, message) = api_code(
        secrets
            .patch_status("db", &PatchParams::default(), &Patch::Merge(&status))
            .await,
    );
    assert_eq!(code, 422, "{message}");
    assert!(
        message.contains("status.version must only move forward"),
        "{message}"
    );
    let stored = secrets.get("db").await.unwrap();
    assert_eq!(stored.status.and_then(|s| s.version), Some(2));
    assert!(stored.spec.sealed.is_none());
    env.cleanup().await;
}

/// Without the webhook, a new ClawSecret's plaintext is in one revision only, the one its
/// creator wrote: the operator's first write seals it (a separate finalizer write once put the
/// plaintext into a second revision, kept by etcd like the first; no finalizer is added now).
/// Watched from the create.
#[tokio::test]
async fn the_first_seal_is_the_operators_first_write() {
    use futures::{StreamExt, TryStreamExt};
    use kube::api::{WatchEvent, WatchParams};
    let env = setup("op-one-write").await;
    let secrets: Api<ClawSecret> = env.api();
    let _op = Operator::start(&env, "replica-a", 15);
    let created = secrets
        .create(
            &PostParams::default(),
            &secret_with_data("fresh", &[("password", "once")]),
        )
        .await
        .unwrap();
    let from = created.resource_version().unwrap();
    let params = WatchParams::default()
        .fields("metadata.name=fresh")
        .timeout(60);
    let mut stream = secrets.watch(&params, &from).await.unwrap().boxed();
    let mut revisions = Vec::new();
    while let Some(event) = stream.try_next().await.unwrap() {
        let WatchEvent::Modified(obj) = event else {
            continue;
        };
        let ready = secret_ready(&obj).is_some_and(|r| r.0 == "True");
        revisions.push((
            obj.spec.data.is_some(),
            obj.spec.sealed.as_ref().map(|s| s.version),
            obj.finalizers().to_vec(),
        ));
        if ready {
            break;
        }
    }
    assert!(
        revisions.iter().all(|(data, _, _)| !data),
        "a revision after the create still holds the plaintext: {revisions:?}"
    );
    assert!(
        !revisions.is_empty(),
        "no update seen within the watch's 60 s"
    );
    let (_, sealed, finalizers) = &revisions[0];
    assert_eq!(*sealed, Some(1), "{revisions:?}");
    assert!(finalizers.is_empty(), "{revisions:?}");
    env.cleanup().await;
}

/// Objects from earlier versions carry the finalizer `clawbernetes.io/cleanup`: the operator
/// removes it from a live object (it stays), and lets one being deleted go, with its Deleted
/// Event.
#[tokio::test]
async fn the_legacy_finalizer_is_removed_and_held_deletions_complete() {
    let env = setup("op-legacy").await;
    let secrets: Api<ClawSecret> = env.api();
    for name in ["kept", "going"] {
        let mut s = secret_with_data(name, &[("k", "v")]);
        s.metadata.finalizers = Some(vec!["clawbernetes.io/cleanup".to_owned()]);
        secrets.create(&PostParams::default(), &s).await.unwrap();
    }
    // Deleted while no operator runs: held by the finalizer, as before this version.
    secrets
        .delete("going", &DeleteParams::default())
        .await
        .unwrap();
    let held = secrets.get("going").await.unwrap();
    assert!(held.metadata.deletion_timestamp.is_some());

    let _op = Operator::start(&env, "replica-a", 15);
    let kept = sealed_at(&secrets, "kept", 1).await;
    eventually("the legacy finalizer to go from a live object", || async {
        let s = secrets.get("kept").await.map_err(|e| e.to_string())?;
        s.finalizers()
            .is_empty()
            .then_some(())
            .ok_or_else(|| format!("{:?}", s.finalizers()))
    })
    .await;
    assert_eq!(kept.spec.sealed.map(|s| s.version), Some(1));
    eventually("the held deletion to complete", || async {
        match secrets.get_opt("going").await.map_err(|e| e.to_string())? {
            None => Ok(()),
            Some(s) => Err(format!("still there, finalizers {:?}", s.finalizers())),
        }
    })
    .await;
    let deleted = wait_event(&env.client, &env.namespace, "going", "Deleted").await;
    assert_eq!(deleted[0].0, "Normal");
    env.cleanup().await;
}

/// Issue 18: a new active master key written into the keyring Secret is followed by the
/// running operator, without a restart: what it seals from then on is sealed under the new key,
/// the public sealing key it publishes is the new key's, and a secret sealed under the new key
/// elsewhere is Ready (not "a key that is not in the keyring").
#[tokio::test]
async fn a_new_active_master_key_is_followed_without_a_restart() {
    let env = setup("op-rekey").await;
    let ns = env.namespace.as_str();
    let api: Api<ClawSecret> = env.api();
    let _op = Operator::start(&env, "op-rekey", 15);
    api.create(
        &PostParams::default(),
        &secret_with_data("before", &[("k", "v1")]),
    )
    .await
    .unwrap();
    let before = sealed_at(&api, "before", 1).await;
    let old_key = before.spec.sealed.as_ref().unwrap().key_id.clone();

    // A new active key, written as `claw-secrets keys rotate` (or a person) would write it.
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    let mut stored = secrets.get(MASTER_KEY).await.unwrap();
    let mut ring = claw_secrets::crypto::Keyring::from_json(
        &stored.data.as_ref().unwrap()[claw_secrets::k8s::keyring::KEYRING_KEY].0,
    )
    .unwrap();
    let new_key = claw_secrets::crypto::MasterKey::generate().unwrap();
    let new_id = new_key.id().to_string();
    ring.rotate_to(new_key);
    stored.data.as_mut().unwrap().insert(
        claw_secrets::k8s::keyring::KEYRING_KEY.to_owned(),
        k8s_openapi::ByteString(ring.to_json().to_vec()),
    );
    secrets
        .replace(MASTER_KEY, &PostParams::default(), &stored)
        .await
        .unwrap();
    assert_ne!(old_key, new_id);

    // What is sealed from now on is sealed under the new key.
    let sealed_under = |name: &'static str| {
        let api = api.clone();
        async move {
            api.get(name)
                .await
                .ok()
                .and_then(|s| s.spec.sealed.map(|x| x.key_id))
        }
    };
    api.create(
        &PostParams::default(),
        &secret_with_data("after", &[("k", "v2")]),
    )
    .await
    .unwrap();
    sealed_at(&api, "after", 1).await;
    assert_eq!(
        sealed_under("after").await.as_deref(),
        Some(new_id.as_str())
    );
    // The published public key follows, so `claw-secrets seal` encrypts to the new key.
    eventually("the sealing key ConfigMap names the new key", || async {
        let maps: Api<k8s_openapi::api::core::v1::ConfigMap> =
            Api::namespaced(env.client.clone(), ns);
        let text = maps
            .get("claw-secrets-sealing-key")
            .await
            .map_err(|e| e.to_string())?
            .data
            .unwrap_or_default()
            .into_values()
            .collect::<String>();
        if text.contains(&new_id) {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    // A rotation through the spec seals the new version under the new key too; the old
    // version's key stays in the keyring (it may still be needed to open older envelopes).
    api.patch(
        "before",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "data": { "k": "v3" } } })),
    )
    .await
    .unwrap();
    sealed_at(&api, "before", 2).await;
    assert_eq!(
        sealed_under("before").await.as_deref(),
        Some(new_id.as_str())
    );
    env.cleanup().await;
}

/// Issue 18: after the active master key changes, every ClawSecret sealed under the retired
/// key is sealed again under the new one in the background: the same version and data, an
/// envelope only the new key opens. A user's rotation meanwhile is not lost, and an operator
/// killed half-way is resumed by the next.
#[tokio::test]
async fn a_new_active_key_reencrypts_every_secret_and_survives_a_restart() {
    use claw_secrets::crypto::Keyring;
    let env = setup("op-reencrypt").await;
    let ns = env.namespace.as_str();
    let api: Api<ClawSecret> = env.api();
    // Slow on purpose (40 objects take 4 s), so that a write and a restart land mid-way.
    let rate = ["--reencrypt-per-second", "10"];
    let mut op = Operator::start_args(&env, "op-reenc-1", 15, &rate);
    let names: Vec<String> = (0..40).map(|i| format!("s{i:02}")).collect();
    for name in &names {
        api.create(
            &PostParams::default(),
            &secret_with_data(name, &[("k", &format!("value-of-{name}"))]),
        )
        .await
        .unwrap();
    }
    for name in &names {
        sealed_at(&api, name, 1).await;
    }

    // `claw-secrets keys rotate`: a new active key, the old one retired.
    let keyring_of = || async {
        let stored = Api::<Secret>::namespaced(env.client.clone(), ns)
            .get(MASTER_KEY)
            .await
            .unwrap();
        Keyring::from_json(
            &stored.data.as_ref().unwrap()[claw_secrets::k8s::keyring::KEYRING_KEY].0,
        )
        .unwrap()
    };
    let old_id = keyring_of().await.active().id().to_string();
    let rotated = Command::new(BIN)
        .args(["keys", "rotate", "--namespace", ns])
        .env("KUBECONFIG", &env.kubeconfig)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&rotated.stdout).into_owned();
    assert!(
        rotated.status.success(),
        "{said}{}",
        String::from_utf8_lossy(&rotated.stderr)
    );
    let ring = keyring_of().await;
    let new_id = ring.active().id().to_string();
    assert_ne!(new_id, old_id);
    assert!(
        ring.key_ids().any(|id| id.as_str() == old_id),
        "the old key is kept"
    );
    assert!(
        said.contains(&format!("master key {new_id} is active")),
        "{said}"
    );
    let only_new = Keyring::with_active(ring.active().clone());
    let keys = |verb: &str| {
        let out = Command::new(BIN)
            .args(["keys", verb, "--namespace", ns])
            .env("KUBECONFIG", &env.kubeconfig)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    // The old key is still needed: prune refuses, and removes nothing.
    let (pruned, said) = keys("prune");
    assert!(!pruned, "{said}");
    assert!(
        said.contains(&old_id) && said.contains("Nothing was removed"),
        "{said}"
    );
    assert!(keyring_of().await.key_ids().any(|id| id.as_str() == old_id));

    // Mid-way: a user rotates one secret, and the operator is killed.
    eventually("re-encryption to begin", || async {
        match cluster::sealed_under(&api, &new_id).await {
            0 => Err("none yet".to_owned()),
            n => Ok(n),
        }
    })
    .await;
    // The status ConfigMap names the new active key as soon as re-encryption has begun (it
    // once kept the last pass's "complete" under the old key until the next pass ended).
    let begun = keyring_status(&env.client, ns).await.unwrap();
    assert_eq!(begun["activeKey"], new_id, "{begun:?}");
    assert!(
        begun["reencryption"].starts_with("in progress"),
        "{begun:?}"
    );
    api.patch(
        "s39",
        &PatchParams::default(),
        &Patch::Merge(json!({ "spec": { "data": { "k": "rotated-by-a-user" } } })),
    )
    .await
    .unwrap();
    op.kill();
    let left = cluster::sealed_under(&api, &old_id).await;
    eprintln!("killed the operator with {left} of 40 still under the old key");
    let _next = Operator::start_args(&env, "op-reenc-2", 15, &rate);

    eventually("every ClawSecret under the new key", || async {
        match cluster::sealed_under(&api, &old_id).await {
            0 => Ok(()),
            n => Err(format!("{n} still under {old_id}")),
        }
    })
    .await;
    let rotated = sealed_at(&api, "s39", 2).await;
    assert_eq!(rotated.spec.sealed.as_ref().unwrap().key_id, new_id);
    for name in &names {
        let obj = api.get(name).await.unwrap();
        let sealed = obj.spec.sealed.as_ref().unwrap();
        assert_eq!(sealed.key_id, new_id, "{name}");
        let version = if name == "s39" { 2 } else { 1 };
        assert_eq!(
            sealed.version, version,
            "{name}: re-encryption keeps the version"
        );
        // The new key alone opens it, to the data it was given.
        let key = claw_secrets::k8s::convert::secret_key(&obj).unwrap();
        let identity = claw_secrets::crypto::SecretIdentity {
            kind: claw_secrets::domain::Kind::Secret,
            namespace: &key.namespace,
            name: &key.name,
            version: claw_secrets::domain::Version::new(version).unwrap(),
        };
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(&sealed.envelope)
            .unwrap();
        let envelope = claw_secrets::crypto::Envelope::from_bytes(&bytes).unwrap();
        let data = claw_secrets::crypto::open(&only_new, &identity, &envelope).unwrap();
        let want = if name == "s39" {
            "rotated-by-a-user".to_owned()
        } else {
            format!("value-of-{name}")
        };
        let got: Vec<(String, String)> = data
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.expose().to_owned()))
            .collect();
        assert_eq!(got, [("k".to_owned(), want)], "{name}");
    }
    // What `kubectl get configmap claw-secrets-keyring-status -o yaml` shows.
    let status = eventually(
        "the keyring status to say re-encryption is complete",
        || async {
            let data = keyring_status(&env.client, ns).await?;
            match data.get("reencryption") {
                Some(r) if r.starts_with("complete") => Ok(data),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    assert_eq!(status["activeKey"], new_id);
    assert_eq!(
        serde_json::from_str::<Value>(&status["sealedObjects"]).unwrap(),
        json!({ new_id.clone(): 40 })
    );

    // Nothing needs the old key any more: prune removes it, and only the new key is left.
    let (pruned, said) = keys("prune");
    assert!(pruned, "{said}");
    assert!(said.contains(&old_id), "{said}");
    let left: Vec<String> = keyring_of()
        .await
        .key_ids()
        .map(|id| id.to_string())
        .collect();
    assert_eq!(left, std::slice::from_ref(&new_id));
    env.cleanup().await;
}

/// Issue 18: with `--key-rotation-period`, the leader makes a new master key active once the
/// current one is that old (the time is an annotation on the keyring Secret), says so with a
/// KeyRotated Event, and what was sealed before moves to the new key.
#[tokio::test]
async fn the_master_key_is_rotated_on_schedule() {
    use claw_secrets::crypto::Keyring;
    let env = setup("op-schedule").await;
    let ns = env.namespace.as_str();
    let api: Api<ClawSecret> = env.api();
    let mut op = Operator::start_args(&env, "op-schedule", 15, &["--key-rotation-period", "4s"]);
    api.create(
        &PostParams::default(),
        &secret_with_data("early", &[("k", "v")]),
    )
    .await
    .unwrap();
    let first = sealed_at(&api, "early", 1).await;
    let first_key = first.spec.sealed.unwrap().key_id;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    let (ring, rotated_at) = eventually("a rotation on schedule", || async {
        let stored = secrets.get(MASTER_KEY).await.map_err(|e| e.to_string())?;
        let ring = Keyring::from_json(
            &stored.data.as_ref().unwrap()[claw_secrets::k8s::keyring::KEYRING_KEY].0,
        )
        .map_err(|e| e.to_string())?;
        let at = stored
            .metadata
            .annotations
            .unwrap_or_default()
            .get(claw_secrets::k8s::keyring::ROTATED_AT)
            .cloned();
        match at {
            Some(at) if ring.active().id().as_str() != first_key => Ok((ring, at)),
            _ => Err(format!("active {}", ring.active().id().as_str())),
        }
    })
    .await;
    assert!(
        ring.key_ids().any(|id| id.as_str() == first_key),
        "the old key is kept"
    );
    assert!(
        rotated_at.parse::<jiff::Timestamp>().is_ok(),
        "{rotated_at}"
    );
    eventually("early re-encrypted under a newer key", || async {
        let key = api
            .get("early")
            .await
            .map_err(|e| e.to_string())?
            .spec
            .sealed
            .map(|s| s.key_id)
            .unwrap_or_default();
        if key != first_key { Ok(()) } else { Err(key) }
    })
    .await;
    let rotated = eventually("a KeyRotated Event", || async {
        let events = events_for(&env.client, ns, MASTER_KEY, "KeyRotated").await;
        events
            .into_iter()
            .find(|e| e.1.contains(&first_key))
            .ok_or_else(|| "none yet".to_owned())
    })
    .await;
    assert!(rotated.1.contains(&first_key), "{rotated:?}");
    op.kill();
    env.cleanup().await;
}

// ---------------------------------------------------------------------------------------------
// The keyring wrapped by a KMS v2 plugin (issue 18)
// ---------------------------------------------------------------------------------------------

/// The test KMS v2 plugin (`hack/k8s-bin/kms-plugin`: Kubernetes' own k8s.io/kms gRPC server
/// around AES-GCM, built by `hack/control-plane.sh install`) on a Unix socket in a temp dir.
/// Its Decrypt refuses a request without the key id and the annotations its Encrypt returned.
struct KmsPluginProcess {
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl KmsPluginProcess {
    fn start() -> KmsPluginProcess {
        let bin = control_plane::bin_dir().join("kms-plugin");
        assert!(
            bin.is_file(),
            "{} is missing: build it with `bash hack/control-plane.sh install`",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("claw-kms-")
            .tempdir()
            .expect("temp dir");
        let log = std::fs::File::create(dir.path().join("plugin.log")).expect("plugin log");
        let child = Command::new(&bin)
            .arg("--listen")
            .arg(dir.path().join("kms.sock"))
            .arg("--key-file")
            .arg(dir.path().join("kek"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {}: {e}", bin.display()));
        let mut plugin = KmsPluginProcess {
            dir,
            child: Some(child),
        };
        let deadline = Instant::now() + PATIENCE;
        while !plugin.dir.path().join("kms.sock").exists() {
            if let Some(status) = plugin
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                panic!("the KMS plugin exited ({status}): {}", plugin.log());
            }
            assert!(
                Instant::now() < deadline,
                "the KMS plugin made no socket: {}",
                plugin.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        plugin
    }

    /// `unix:///…/kms.sock`, as kube-apiserver's EncryptionConfiguration names a plugin.
    fn endpoint(&self) -> String {
        format!("unix://{}", self.dir.path().join("kms.sock").display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("plugin.log")).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            crate::process::kill(child);
        }
    }
}

impl Drop for KmsPluginProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `claw-secrets keys ARGS --namespace NS` against the test's keyring Secret.
fn keys_command(env: &TestEnv, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("keys")
        .args(args)
        .args(["--namespace", &env.namespace, "--secret", MASTER_KEY])
        .env("KUBECONFIG", &env.kubeconfig)
        .env_remove("CLAW_SECRETS_KMS_PLUGIN")
        .stdin(Stdio::null())
        .output()
        .expect("running claw-secrets keys")
}

/// The base64 key texts of a keyring document.
fn key_texts(keyring_json: &[u8]) -> Vec<String> {
    let doc: Value = serde_json::from_slice(keyring_json).expect("keyring JSON");
    doc["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["key"].as_str().expect("key").to_owned())
        .collect()
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// The keyring Secret holds the keyring only wrapped: one data key, `keyring.kms.json`, a
/// wrapped document of the test plugin's key (with the annotation its Decrypt needs), neither
/// it nor any other value a keyring or any of `keys`. Returns the wrapped document.
async fn assert_only_wrapped(secrets: &Api<Secret>, keys: &[String]) -> claw_secrets::kms::Wrapped {
    use claw_secrets::k8s::keyring::{KEYRING_KEY, KMS_KEYRING_KEY};
    let stored = secrets.get(MASTER_KEY).await.unwrap();
    let data = stored.data.clone().unwrap_or_default();
    assert_eq!(
        data.keys().collect::<Vec<_>>(),
        [KMS_KEYRING_KEY],
        "the keyring Secret's data keys (no {KEYRING_KEY})"
    );
    let raw = serde_json::to_vec(&stored).unwrap();
    for (name, value) in &data {
        assert!(
            claw_secrets::crypto::Keyring::from_json(&value.0).is_err(),
            "{name} is a plaintext keyring"
        );
        for key in keys {
            assert!(!holds(&value.0, key), "{name} holds a master key");
        }
    }
    for key in keys {
        assert!(!holds(&raw, key), "the Secret holds a master key");
    }
    let wrapped = claw_secrets::kms::Wrapped::from_json(&data[KMS_KEYRING_KEY].0)
        .expect("a wrapped keyring document");
    assert!(
        wrapped.key_id.starts_with("test-kek-"),
        "{}",
        wrapped.key_id
    );
    assert!(
        wrapped
            .annotations
            .contains_key("nonce.kms.claw-secrets.test"),
        "{:?}",
        wrapped.annotations.keys()
    );
    wrapped
}

/// Issue 18: with `--kms-plugin`, the keyring Secret holds no plaintext key, only the KMS v2
/// plugin's encryption of the keyring. An operator given the flag wraps a plaintext keyring in
/// place; it, an agent without deliveries and `keys rotate` open and write it through the plugin
/// (the real k8s.io/kms server, whose Decrypt needs the key id and annotations passed back);
/// readers without the flag, and every reader once the plugin is gone, fail with an error that
/// says what to do, and no key in it.
#[tokio::test]
async fn the_keyring_can_be_wrapped_by_a_kms_v2_plugin() {
    use claw_secrets::k8s::keyring::{KEYRING_KEY, KMS_KEYRING_KEY};
    let env = setup("op-kms").await;
    let ns = env.namespace.as_str();
    let api: Api<ClawSecret> = env.api();
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), ns);
    let mut plugin = KmsPluginProcess::start();
    let endpoint = plugin.endpoint();
    let with_kms = ["--kms-plugin", endpoint.as_str()];

    // Before: a keyring made without the plugin, in plaintext, and a secret sealed under it.
    // (A short Lease: the next operator leads soon after this one is killed.)
    let mut plain_op = Operator::start(&env, "op-plain", 5);
    api.create(
        &PostParams::default(),
        &secret_with_data("before", &[("k", "v1")]),
    )
    .await
    .unwrap();
    let old_key = sealed_at(&api, "before", 1)
        .await
        .spec
        .sealed
        .unwrap()
        .key_id;
    let plain = secrets.get(MASTER_KEY).await.unwrap();
    let old_keys = key_texts(&plain.data.as_ref().unwrap()[KEYRING_KEY].0);
    assert_eq!(old_keys.len(), 1);
    plain_op.kill();

    // An operator with the plugin checks it, wraps the keyring in place and says so.
    let mut op = Operator::start_args(&env, "op-kms", 15, &with_kms);
    eventually(
        "the operator wraps the plaintext keyring in place",
        || async {
            let log = op.log_text();
            if log.contains("wrapped it in place") {
                Ok(())
            } else {
                Err(op.log_tail())
            }
        },
    )
    .await;
    let log = op.log_text();
    assert!(log.contains("KMS plugin healthy"), "{log}");
    assert!(
        log.contains("test-kek-"),
        "the plugin's key id is logged: {log}"
    );
    assert_only_wrapped(&secrets, &old_keys).await;
    // Same keyring: what it seals now is under the same master key.
    api.create(
        &PostParams::default(),
        &secret_with_data("wrapped", &[("k", "w1")]),
    )
    .await
    .unwrap();
    assert_eq!(
        sealed_at(&api, "wrapped", 1)
            .await
            .spec
            .sealed
            .unwrap()
            .key_id,
        old_key
    );

    // An agent without deliveries opens it through the plugin, and serves both secrets.
    let node = format!("node-kms-{}", &ns[ns.len() - 6..]);
    cluster::create_node(&env.client, &node, &[]).await;
    let agent_dir = tempfile::Builder::new()
        .prefix("claw-agent-kms-")
        .tempdir()
        .expect("temp dir");
    let agent = cluster::Agent::start_with_args(
        &env.kubeconfig,
        &node,
        agent_dir,
        &format!("{ns}/{MASTER_KEY}"),
        std::net::Ipv4Addr::LOCALHOST.into(),
        with_kms.iter().map(|a| (*a).to_owned()).collect(),
    )
    .await;
    let token = cluster::service_account_token(&env.client, ns, "app").await;
    let served = |name: &'static str, want: &'static str| {
        let (agent, token) = (&agent, &token);
        async move {
            let got = agent.get_secret(token, ns, name).await.result()?;
            if got["data"]["k"] == json!(want) {
                Ok(())
            } else {
                Err(got.to_string())
            }
        }
    };
    eventually("the agent serves the secret sealed before wrapping", || {
        served("before", "v1")
    })
    .await;
    eventually("the agent serves the secret sealed after", || {
        served("wrapped", "w1")
    })
    .await;

    // A reader without the flag is told which flag it needs: `keys`, and an operator.
    let out = keys_command(&env, &["rotate"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "keys rotate without --kms-plugin");
    assert!(
        stderr.contains("--kms-plugin") && stderr.contains(KMS_KEYRING_KEY),
        "{stderr}"
    );
    let mut blind = Operator::start_args(&env, "op-no-kms", 15, &[]);
    let deadline = Instant::now() + PATIENCE;
    let status = loop {
        if let Some(status) = blind.exited() {
            break status;
        }
        assert!(Instant::now() < deadline, "{}", blind.log_tail());
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    assert!(
        blind.log_text().contains("--kms-plugin"),
        "{}",
        blind.log_tail()
    );

    // `keys rotate` through the plugin: a new active key, still wrapped, followed by the
    // operator (it seals under it) and the agent (it opens what is sealed under it).
    let out = keys_command(&env, &["rotate", "--kms-plugin", &endpoint]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "keys rotate: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_key = stdout
        .split_whitespace()
        .nth(2)
        .expect("master key ID is active")
        .to_owned();
    assert_ne!(new_key, old_key);
    assert_only_wrapped(&secrets, &old_keys).await;
    api.create(
        &PostParams::default(),
        &secret_with_data("after", &[("k", "v2")]),
    )
    .await
    .unwrap();
    eventually("the operator seals under the rotated key", || async {
        let s = sealed_at(&api, "after", 1).await;
        let key = s.spec.sealed.map(|s| s.key_id).unwrap_or_default();
        if key == new_key { Ok(()) } else { Err(key) }
    })
    .await;
    eventually(
        "the agent serves what is sealed under the rotated key",
        || served("after", "v2"),
    )
    .await;
    // `keys prune` through the plugin, once re-encryption has moved every secret off the old
    // key: the old key leaves the keyring, which stays wrapped, and what it sealed still opens.
    eventually("keys prune removes the retired key", || async {
        let out = keys_command(&env, &["prune", "--kms-plugin", &endpoint]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() && text.contains(&format!("removed retired master keys {old_key}"))
        {
            Ok(())
        } else {
            Err(text)
        }
    })
    .await;
    assert_only_wrapped(&secrets, &old_keys).await;
    eventually("the agent serves the re-encrypted secret", || {
        served("before", "v1")
    })
    .await;

    // The plugin gone: the operator goes on with the keyring it holds; a reader that needs the
    // plugin fails with an error saying so, without a panic or a key in it.
    plugin.stop();
    let out = keys_command(&env, &["rotate", "--kms-plugin", &endpoint]);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cannot reach the KMS plugin"), "{stderr}");
    assert!(stderr.contains(&endpoint), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    for key in &old_keys {
        assert!(!stderr.contains(key.as_str()), "a key in: {stderr}");
    }
    api.create(
        &PostParams::default(),
        &secret_with_data("outage", &[("k", "v3")]),
    )
    .await
    .unwrap();
    assert_eq!(
        sealed_at(&api, "outage", 1)
            .await
            .spec
            .sealed
            .unwrap()
            .key_id,
        new_key
    );
    assert!(op.exited().is_none(), "{}", op.log_tail());
    assert!(!op.log_text().contains("panicked"), "{}", op.log_tail());

    drop(agent);
    let _ = Api::<k8s_openapi::api::core::v1::Node>::all(env.client.clone())
        .delete(&node, &DeleteParams::default())
        .await;
    env.cleanup().await;
}
