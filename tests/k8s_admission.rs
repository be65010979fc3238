//! Cluster tests of the operator's admission webhook against a real kube-apiserver and etcd:
//! ClawSecret data is sealed before the object is stored, by every way a user writes one
//! (`kubectl apply`, `apply --server-side`, `create`, `replace`, `edit`, `helm install`), so
//! the plaintext is in no file of etcd's data dir and no log; with the webhook down, plaintext
//! is refused and nothing stored; manifests from `claw-secrets seal` apply once, and only as
//! the object they were sealed for.
//!
//! Each test registers a MutatingWebhookConfiguration like the chart's (same rules, match
//! condition and failure policy) that selects only its own namespaces and calls its own
//! operator process at 127.0.0.1 (no pods run on the test control plane; tests/k8s_node.rs
//! runs the chart's webhook in pods).

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

#[path = "support/relay.rs"]
mod relay;

#[path = "support/control_plane.rs"]
mod control_plane;

#[path = "support/cluster.rs"]
mod cluster;

#[path = "support/canary.rs"]
mod canary;

#[path = "support/tokens.rs"]
mod tokens;

#[path = "support/tools.rs"]
mod tools;

#[path = "support/webhook.rs"]
mod webhook;

#[path = "support/host.rs"]
mod host;

use std::path::Path;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::json;

use canary::Canaries;
use claw_secrets::k8s::crd::{ClawSecret, ClawSecretSpec};
use cluster::{Cluster, secret_with_data};
use random::random_hex;
use tools::{Run, kubectl, must};
use wait::eventually;
use webhook::{WEBHOOK, Webhook};

/// A plaintext ClawSecret manifest, as a user writes it.
fn manifest(ns: &str, name: &str, value: &str) -> String {
    json!({
        "apiVersion": "clawbernetes.io/v1beta1",
        "kind": "ClawSecret",
        "metadata": { "name": name, "namespace": ns },
        "spec": { "data": { "token": value }, "allowedWorkloads": ["api"] },
    })
    .to_string()
}

/// Waits until `name` is stored sealed at `version`, without data, and the operator reports it
/// Ready; returns the object as JSON (every field the API server serves).
async fn sealed_at(c: &Cluster, name: &str, version: u64) -> String {
    let api = c.secrets();
    eventually(&format!("{name} sealed at version {version}"), || async {
        let s = api.get(name).await.map_err(|e| e.to_string())?;
        let ready = s.status.as_ref().is_some_and(|st| {
            st.version == Some(version)
                && st
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
        });
        match &s.spec.sealed {
            Some(sealed) if s.spec.data.is_none() && sealed.version == version && ready => {
                Ok(serde_json::to_string(&s).unwrap())
            }
            _ => Err(format!(
                "data: {}, sealed: {:?}, status: {:?}",
                s.spec.data.is_some(),
                s.spec.sealed.as_ref().map(|x| x.version),
                s.status
            )),
        }
    })
    .await
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write a file");
    path.to_str().expect("utf-8").to_owned()
}

/// Every way a user writes a ClawSecret with plaintext goes through the webhook: the canary of
/// each is sealed before the object is stored, so it is in no file of etcd's data dir (WAL and
/// db, raw, hex and base64 at every alignment; an etcd range read reads these files), in no
/// log of etcd, the API server or the operator, and in no object. The same manifest applied
/// again changes nothing (not even the resourceVersion).
#[tokio::test]
async fn plaintext_written_every_way_is_sealed_before_it_is_stored() {
    let _lock = cluster::shared().await;
    let test = "plaintext_written_every_way_is_sealed_before_it_is_stored";
    let state = control_plane::local_control_plane(test)
        .state_dir()
        .expect("a local control plane has a state dir")
        .to_owned();
    let c = Cluster::new("admission").await;
    let ns = c.ns().to_owned();
    let webhook = Webhook::register(&c.client(), &[&ns]).await;
    let operator = webhook.operator(&c).await;
    let kc = c.env.kubeconfig.clone();
    let work = tempfile::tempdir().expect("temp dir");
    let forms = [
        "apply",
        "server-side",
        "create",
        "replace",
        "edit",
        "helm",
        "replaced",
        "edited",
    ];
    let canaries: Vec<(String, String)> = forms
        .iter()
        .map(|f| ((*f).to_owned(), canary::canary(&format!("canary-{f}"))))
        .collect();
    let value = |form: &str| {
        canaries
            .iter()
            .find(|(f, _)| f == form)
            .map(|(_, v)| v.clone())
            .expect("a canary per form")
    };

    // kubectl apply (client-side: kubectl copies the manifest into its annotation).
    let applied = write(
        work.path(),
        "apply.json",
        &manifest(&ns, "by-apply", &value("apply")),
    );
    must(kubectl(&kc, &["apply", "-f", &applied]), "kubectl apply");
    // kubectl apply --server-side.
    let ssa = write(
        work.path(),
        "ssa.json",
        &manifest(&ns, "by-ssa", &value("server-side")),
    );
    must(
        kubectl(&kc, &["apply", "--server-side", "-f", &ssa]),
        "kubectl apply --server-side",
    );
    // kubectl create.
    let created = write(
        work.path(),
        "create.json",
        &manifest(&ns, "by-create", &value("create")),
    );
    must(kubectl(&kc, &["create", "-f", &created]), "kubectl create");
    // kubectl replace of an existing secret: a new version.
    let first = write(
        work.path(),
        "replace-1.json",
        &manifest(&ns, "by-replace", &value("replace")),
    );
    must(kubectl(&kc, &["create", "-f", &first]), "kubectl create");
    sealed_at(&c, "by-replace", 1).await;
    let second = write(
        work.path(),
        "replace-2.json",
        &manifest(&ns, "by-replace", &value("replaced")),
    );
    must(kubectl(&kc, &["replace", "-f", &second]), "kubectl replace");
    // kubectl edit (the editor a script adding data under spec): a new version.
    let base = write(
        work.path(),
        "edit-1.json",
        &manifest(&ns, "by-edit", &value("edit")),
    );
    must(kubectl(&kc, &["create", "-f", &base]), "kubectl create");
    sealed_at(&c, "by-edit", 1).await;
    let editor = write(
        work.path(),
        "editor.sh",
        &format!(
            "#!/bin/sh\nset -e\nsed -i 's/^spec:$/spec:\\n  data:\\n    token: {}/' \"$1\"\n",
            value("edited")
        ),
    );
    std::fs::set_permissions(&editor, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let edit = tools::run(
        &tools::tool("kubectl"),
        &[
            "--kubeconfig",
            kc.to_str().unwrap(),
            "edit",
            "clawsecret",
            "by-edit",
            "-n",
            &ns,
            "-o",
            "yaml",
        ],
        &[("KUBE_EDITOR", Path::new(&editor))],
    );
    must(edit, "kubectl edit");
    // helm install of a chart holding a ClawSecret.
    let chart = work.path().join("chart");
    std::fs::create_dir_all(chart.join("templates")).unwrap();
    write(
        &chart,
        "Chart.yaml",
        "apiVersion: v2\nname: holds-a-secret\nversion: 0.1.0\n",
    );
    write(
        &chart.join("templates"),
        "secret.yaml",
        "apiVersion: clawbernetes.io/v1beta1\nkind: ClawSecret\nmetadata:\n  name: by-helm\nspec:\n  data:\n    token: {{ .Values.token }}\n",
    );
    let release = format!("r-{}", random_hex(3));
    must(
        tools::helm(&[
            "install",
            &release,
            chart.to_str().unwrap(),
            "-n",
            &ns,
            "--kubeconfig",
            kc.to_str().unwrap(),
            "--set",
            &format!("token={}", value("helm")),
        ]),
        "helm install",
    );

    // Invalid data is refused at admission, naming the rule, and never stored (it used to
    // stay in spec.data, in plaintext, until someone deleted the object).
    let bad = json!({
        "apiVersion": "clawbernetes.io/v1beta1", "kind": "ClawSecret",
        "metadata": { "name": "bad-key", "namespace": ns },
        "spec": { "data": { "not a key!": value("apply") } },
    });
    let bad = write(work.path(), "bad.json", &bad.to_string());
    let refused = kubectl(&kc, &["apply", "-f", &bad]);
    assert!(!refused.ok, "invalid data was admitted");
    assert!(
        refused.stderr.contains(WEBHOOK) && refused.stderr.contains("spec.data"),
        "{}",
        refused.stderr
    );
    assert!(c.secrets().get_opt("bad-key").await.unwrap().is_none());

    let mut objects = Vec::new();
    for (name, version) in [
        ("by-apply", 1),
        ("by-ssa", 1),
        ("by-create", 1),
        ("by-replace", 2),
        ("by-edit", 2),
        ("by-helm", 1),
    ] {
        objects.push((name, sealed_at(&c, name, version).await));
    }

    // The same manifests again: no new version, not even a new generation (the spec is
    // byte for byte the same). The resourceVersion may move: the API server re-records
    // kubectl's field ownership (managedFields' time and order), which is not ours to avoid.
    let api = c.secrets();
    for (file, name, server_side) in [(&applied, "by-apply", false), (&ssa, "by-ssa", true)] {
        let before = api.get(name).await.unwrap();
        let mut args = vec!["apply", "-f", file.as_str()];
        if server_side {
            args.insert(1, "--server-side");
        }
        must(kubectl(&kc, &args), "kubectl apply again");
        let after = api.get(name).await.unwrap();
        assert_eq!(
            (after.metadata.generation, &after.spec),
            (before.metadata.generation, &before.spec),
            "{name}: applying the same manifest changed the secret"
        );
    }

    // Where the plaintext must not be. Helm keeps its release record (the rendered manifest,
    // gzip) in a Secret: not looked into here; docs/crypto.md says so.
    let all = Canaries::of(canaries.iter().map(|(_, v)| v.clone()));
    for (name, json) in &objects {
        all.assert_absent(&format!("ClawSecret {name} as served"), json.as_bytes());
    }
    all.assert_absent("the operator's log", operator.log_text().as_bytes());
    for log in ["kube-apiserver.log", "etcd.log"] {
        let text = std::fs::read(state.join(log)).unwrap_or_default();
        all.assert_absent(log, &text);
    }
    let files = all.assert_absent_under(&state.join("etcd-data"));
    assert!(
        files
            .iter()
            .any(|f| f.extension().is_some_and(|e| e == "wal")),
        "etcd's write-ahead log is among {files:?}"
    );
    println!(
        "ADMISSION: {} canaries x {} forms (6 ways to write) in none of {} etcd files, 2 server \
         logs, the operator's log, 6 objects",
        canaries.len(),
        all.forms(),
        files.len()
    );
    // The operator's status writes are its own (managedFields name it, not "unknown").
    let replaced = c.secrets().get("by-replace").await.unwrap();
    assert!(
        replaced.metadata.managed_fields.iter().flatten().any(|m| {
            m.manager.as_deref() == Some("claw-secrets-operator")
                && m.subresource.as_deref() == Some("status")
        }),
        "{:?}",
        replaced.metadata.managed_fields
    );
    // The operator reports the versions it sealed at admission; nothing was stored plaintext.
    let events_api = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.client(), &ns);
    let events = eventually("Created and Rotated Events", || async {
        let events = events_api
            .list(&Default::default())
            .await
            .map_err(|e| e.to_string())?
            .items;
        let has = |name: &str, reason: &str| {
            events.iter().any(|e| {
                e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
                    && e.reason.as_deref() == Some(reason)
            })
        };
        if has("by-replace", "Rotated") && has("by-helm", "Created") {
            Ok(events)
        } else {
            Err(format!("{} Events so far", events.len()))
        }
    })
    .await;
    assert!(
        !events
            .iter()
            .any(|e| e.reason.as_deref() == Some("PlaintextStored"))
    );
    all.assert_absent(
        "the namespace's Events",
        serde_json::to_string(&events).unwrap().as_bytes(),
    );
    let metrics = operator_metrics(&operator);
    assert!(
        metrics.contains("claw_secrets_operator_plaintext_stored_total 0"),
        "{metrics}"
    );

    let _ = tools::helm(&[
        "uninstall",
        &release,
        "-n",
        &ns,
        "--kubeconfig",
        kc.to_str().unwrap(),
    ]);
    drop(operator);
    webhook.remove().await;
    c.cleanup().await;
}

fn operator_metrics(op: &cluster::Operator) -> String {
    let (status, body) = process::http_get(op.metrics_port, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    body
}

/// The webhook does not wait for the leader: a standby replica (another holds the Lease) seals
/// at admission, and the leader reports the status.
#[tokio::test]
async fn a_standby_replica_seals_at_admission() {
    let _lock = cluster::shared().await;
    let c = Cluster::new("standby-seals").await;
    let lease = format!("replicas-{}", random_hex(4));
    let leader =
        cluster::Operator::start(&c.env.kubeconfig, &c.master_key, &lease, Some(c.ns())).await;
    eventually("the first replica to lead", || async {
        operator_metrics(&leader)
            .lines()
            .any(|l| l == "claw_secrets_operator_leader 1")
            .then_some(())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    let webhook = Webhook::register(&c.client(), &[c.ns()]).await;
    let standby = webhook.operator_on_lease(&c, &lease).await;
    let before = sealed_admissions(&operator_metrics(&standby));
    c.secrets()
        .create(
            &PostParams::default(),
            &secret_with_data("by-standby", &[("k", "v")]),
        )
        .await
        .expect("create");
    sealed_at(&c, "by-standby", 1).await;
    let metrics = operator_metrics(&standby);
    assert!(
        metrics
            .lines()
            .any(|l| l == "claw_secrets_operator_leader 0"),
        "{metrics}"
    );
    assert_eq!(sealed_admissions(&metrics), before + 1, "{metrics}");
    assert!(
        operator_metrics(&leader)
            .lines()
            .any(|l| l == "claw_secrets_operator_leader 1")
    );
    drop(standby);
    drop(leader);
    webhook.remove().await;
    c.cleanup().await;
}

/// `claw_secrets_operator_admissions_total{result="sealed"}` (dry runs included: the probe
/// that waits for the webhook is one).
fn sealed_admissions(metrics: &str) -> u64 {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("claw_secrets_operator_admissions_total{result=\"sealed\"} "))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no sealed admissions counter in {metrics}"))
}

/// With no replica answering, a write carrying plaintext is refused, naming the webhook, and
/// nothing is stored; writes without data (a sealed object, status, finalizers) go through.
#[tokio::test]
async fn with_the_webhook_down_plaintext_is_refused_and_nothing_stored() {
    let _lock = cluster::shared().await;
    let c = Cluster::new("webhook-down").await;
    let ns = c.ns().to_owned();
    let webhook = Webhook::register(&c.client(), &[&ns]).await;
    let mut operator = webhook.operator(&c).await;
    let api = c.secrets();
    api.create(
        &PostParams::default(),
        &secret_with_data("before", &[("k", "v")]),
    )
    .await
    .expect("sealed while the webhook runs");
    let sealed = api
        .get("before")
        .await
        .unwrap()
        .spec
        .sealed
        .expect("sealed");
    operator.kill();

    let canary = canary::canary("canary-down");
    let work = tempfile::tempdir().unwrap();
    let file = write(work.path(), "s.json", &manifest(&ns, "while-down", &canary));
    let refused: Run = kubectl(&c.env.kubeconfig, &["apply", "-f", &file]);
    assert!(
        !refused.ok,
        "applied with the webhook down: {}",
        refused.stdout
    );
    assert!(
        refused.stderr.contains(WEBHOOK) && refused.stderr.contains("failed calling webhook"),
        "the refusal should name the webhook: {}",
        refused.stderr
    );
    assert!(!refused.stderr.contains(&canary), "{}", refused.stderr);
    assert!(
        api.get_opt("while-down").await.unwrap().is_none(),
        "nothing is stored"
    );
    // A rotation of an existing secret is refused alike, and the stored version stays.
    let rotate = write(work.path(), "r.json", &manifest(&ns, "before", &canary));
    assert!(!kubectl(&c.env.kubeconfig, &["apply", "-f", &rotate]).ok);
    assert_eq!(
        api.get("before").await.unwrap().spec.sealed,
        Some(sealed.clone())
    );
    // A sealed object (no data) is not the webhook's business.
    let mut copy = ClawSecret::new(
        "sealed-copy",
        ClawSecretSpec {
            data: None,
            sealed: Some(sealed),
            ..secret_with_data("x", &[]).spec
        },
    );
    copy.metadata.namespace = Some(ns.clone());
    api.create(&PostParams::default(), &copy)
        .await
        .expect("a write without data needs no webhook");
    // Nor is a deletion, which does not wait for the operator either (no finalizer).
    for name in ["before", "sealed-copy"] {
        api.delete(name, &DeleteParams::default()).await.unwrap();
        assert!(
            api.get_opt(name).await.unwrap().is_none(),
            "{name} is gone at once, with no operator running"
        );
    }
    webhook.remove().await;
    c.cleanup().await;
}

/// `claw-secrets seal` output applied to the cluster is sealed under the master key with the
/// data it was made from; applied again it changes nothing; under another name or in another
/// namespace it is refused; the file holds no plaintext.
#[tokio::test]
async fn a_manifest_from_claw_secrets_seal_applies_once_and_only_where_it_was_sealed_for() {
    let _lock = cluster::shared().await;
    let c = Cluster::new("offline-seal").await;
    let ns = c.ns().to_owned();
    let other = format!("{ns}-b");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(c.client());
    namespaces
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({ "metadata": { "name": other } })).unwrap(),
        )
        .await
        .expect("a second namespace");
    let webhook = Webhook::register(&c.client(), &[&ns, &other]).await;
    let operator = webhook.operator(&c).await;
    let kc = c.env.kubeconfig.clone();
    let work = tempfile::tempdir().unwrap();

    let alice = c.alice().await;
    let mut agent = c.agent("a", &[]).await;
    let canary = canary::canary("canary-offline");
    let sealed_file = seal_offline(&c, work.path(), "from-git", &canary);
    let sealed_text = std::fs::read_to_string(&sealed_file).unwrap();
    let canaries = Canaries::of([canary.clone()]);
    canaries.assert_absent("the sealed manifest", sealed_text.as_bytes());
    assert!(sealed_text.contains("encryptedData"), "{sealed_text}");

    must(
        kubectl(&kc, &["apply", "-f", sealed_file.to_str().unwrap()]),
        "kubectl apply of the sealed manifest",
    );
    let stored = sealed_at(&c, "from-git", 1).await;
    canaries.assert_absent("the stored object", stored.as_bytes());
    let obj = c.secrets().get("from-git").await.unwrap();
    assert!(
        obj.spec.encrypted_data.is_none(),
        "encryptedData is not stored"
    );
    let data = open_sealed(&c, &obj).await;
    assert_eq!(data.get("token").map(|v| v.expose()), Some(canary.as_str()));
    // An agent delivers it: the data the file was sealed from, as version 1.
    eventually("the agent to serve the sealed manifest's data", || async {
        let reply = agent.get_secret(&alice, &ns, "from-git").await;
        match reply.result() {
            Ok(p) if p["version"] == json!(1) && p["data"]["token"] == json!(canary) => Ok(()),
            Ok(p) => Err(format!("version {}", p["version"])),
            Err(e) => Err(e),
        }
    })
    .await;

    // Applied again: the same version, the same spec.
    must(
        kubectl(&kc, &["apply", "-f", sealed_file.to_str().unwrap()]),
        "kubectl apply again",
    );
    let again = c.secrets().get("from-git").await.unwrap();
    assert_eq!(
        (again.metadata.generation, &again.spec),
        (obj.metadata.generation, &obj.spec)
    );

    // The same ciphertext as another object: refused, nothing stored.
    for (what, text) in [
        (
            "another name",
            sealed_text.replace("name: from-git", "name: stolen"),
        ),
        (
            "another namespace",
            sealed_text.replace(&format!("namespace: {ns}"), &format!("namespace: {other}")),
        ),
    ] {
        assert_ne!(text, sealed_text, "{what}: the manifest was not changed");
        let file = write(work.path(), "moved.yaml", &text);
        let refused = kubectl(&kc, &["apply", "-f", &file]);
        assert!(!refused.ok, "{what}: applied");
        assert!(
            refused.stderr.contains("spec.encryptedData does not open"),
            "{what}: {}",
            refused.stderr
        );
    }
    assert!(c.secrets().get_opt("stolen").await.unwrap().is_none());
    let in_other: Api<ClawSecret> = Api::namespaced(c.client(), &other);
    assert!(in_other.get_opt("from-git").await.unwrap().is_none());
    canaries.assert_absent("the operator's log", operator.log_text().as_bytes());
    agent.terminate();
    canaries.assert_absent(
        "the agent's log",
        std::fs::read(agent.log_path()).unwrap().as_slice(),
    );

    drop(operator);
    webhook.remove().await;
    let _ = namespaces.delete(&other, &DeleteParams::default()).await;
    c.cleanup().await;
}

/// `claw-secrets seal` as a user runs it: the cluster's public key fetched once (`--fetch-key`),
/// then a plaintext manifest for `name` in the test's namespace sealed offline with it; returns
/// the sealed manifest's path.
fn seal_offline(c: &Cluster, dir: &Path, name: &str, value: &str) -> std::path::PathBuf {
    let (operator_ns, _) = c.master_key.split_once('/').unwrap();
    let kc = c.env.kubeconfig.clone();
    let cli = |args: &[&str]| {
        tools::run(
            Path::new(cluster::BIN),
            args,
            &[("KUBECONFIG", kc.as_path())],
        )
    };
    let key = dir.join("sealing-key.txt");
    must(
        cli(&[
            "seal",
            "--fetch-key",
            "--operator-namespace",
            operator_ns,
            "-o",
            key.to_str().unwrap(),
        ]),
        "claw-secrets seal --fetch-key",
    );
    let plain = write(
        dir,
        &format!("{name}.plain.json"),
        &manifest(c.ns(), name, value),
    );
    let sealed = dir.join(format!("{name}.sealed.yaml"));
    must(
        cli(&[
            "seal",
            "--key",
            key.to_str().unwrap(),
            "-f",
            &plain,
            "-o",
            sealed.to_str().unwrap(),
        ]),
        "claw-secrets seal",
    );
    sealed
}

/// Without the webhook, a `claw-secrets seal` manifest is stored as it is (ciphertext) and the
/// reconcile loop seals it under the master key, with no PlaintextStored warning (nothing in it
/// was plaintext).
#[tokio::test]
async fn without_the_webhook_a_sealed_manifest_is_sealed_by_the_reconcile_loop() {
    let _lock = cluster::shared().await;
    let c = Cluster::new("offline-loop").await;
    let operator = cluster::Operator::start(
        &c.env.kubeconfig,
        &c.master_key,
        &format!("loop-{}", random_hex(4)),
        Some(c.ns()),
    )
    .await;
    let work = tempfile::tempdir().unwrap();
    let canary = canary::canary("canary-loop");
    let sealed = seal_offline(&c, work.path(), "from-git", &canary);
    must(
        kubectl(
            &c.env.kubeconfig,
            &["apply", "-f", sealed.to_str().unwrap()],
        ),
        "kubectl apply",
    );
    let stored = sealed_at(&c, "from-git", 1).await;
    Canaries::of([canary.clone()]).assert_absent("the stored object", stored.as_bytes());
    let obj = c.secrets().get("from-git").await.unwrap();
    assert!(obj.spec.encrypted_data.is_none());
    let data = open_sealed(&c, &obj).await;
    assert_eq!(data.get("token").map(|v| v.expose()), Some(canary.as_str()));
    let events = Api::<k8s_openapi::api::events::v1::Event>::namespaced(c.client(), c.ns())
        .list(&Default::default())
        .await
        .unwrap()
        .items;
    assert!(
        !events
            .iter()
            .any(|e| e.reason.as_deref() == Some("PlaintextStored"))
    );
    drop(operator);
    c.cleanup().await;
}

/// Opens a stored secret's current version with the master keyring, as an agent does.
async fn open_sealed(c: &Cluster, obj: &ClawSecret) -> claw_secrets::domain::SecretData {
    let (ns, name) = c.master_key.split_once('/').unwrap();
    let secret = Api::<Secret>::namespaced(c.client(), ns)
        .get(name)
        .await
        .unwrap();
    let bytes = &secret.data.unwrap()[claw_secrets::k8s::keyring::KEYRING_KEY].0;
    let keyring = claw_secrets::crypto::Keyring::from_json(bytes).unwrap();
    let record = claw_secrets::k8s::convert::secret_record(obj, Vec::new())
        .expect("a readable record")
        .expect("sealed");
    let identity = claw_secrets::crypto::SecretIdentity {
        kind: claw_secrets::domain::Kind::Secret,
        namespace: &record.key.namespace,
        name: &record.key.name,
        version: record.version,
    };
    claw_secrets::crypto::open(&keyring, &identity, &record.envelope).expect("the envelope opens")
}
