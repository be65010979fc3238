//! A real Kubernetes control plane for cluster tests.
//!
//! Include from a cluster test target with
//!
//! ```ignore
//! #[path = "support/control_plane.rs"]
//! mod control_plane;
//! ```
//!
//! One control plane (etcd + kube-apiserver, started by `hack/control-plane.sh up`) is shared by
//! all tests of a test binary and is started on first use. Each test gets its own namespace and
//! its own [`kube::Client`] (a client is bound to the tokio runtime that created it, and every
//! `#[tokio::test]` has its own runtime).
//!
//! Teardown: the Rust test harness never runs destructors of statics, so the script's
//! `--parent-pid` watchdog stops the servers and removes the state directory as soon as the
//! test process is gone -- after a normal exit, a failed or panicking test, or a SIGKILL.
//!
//! Environment:
//! - `KUBECONFIG_E2E=/path/to/kubeconfig`: use that cluster (e.g. kind) and start nothing.
//! - `CLAW_K8S_BIN=/dir`: where `etcd` and `kube-apiserver` are (default: the cache that
//!   `hack/control-plane.sh install` builds into).
//! - `CLAW_TEST_TOKEN_ALICE` / `CLAW_TEST_TOKEN_BOB`: bearer tokens of two human users of an
//!   external cluster (a local control plane makes its own, see [`ControlPlane::user_token`]).
//!
//! Missing binaries are a test failure with instructions, never a silent skip.
#![allow(dead_code)] // every test target uses a different subset

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams, ObjectMeta, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::random::random_u64;

/// Environment variable naming the kubeconfig of an existing cluster to test against.
pub const KUBECONFIG_E2E: &str = "KUBECONFIG_E2E";
/// Environment variable overriding the directory holding `etcd` and `kube-apiserver`.
pub const CLAW_K8S_BIN: &str = "CLAW_K8S_BIN";

/// Label put on every test namespace.
pub const TEST_NAMESPACE_LABEL: &str = "claw-secrets.test/namespace";

/// The control plane shared by the tests of this binary.
#[derive(Debug)]
pub struct ControlPlane {
    kubeconfig: PathBuf,
    /// State directory of the local control plane; `None` for an external cluster.
    state_dir: Option<PathBuf>,
    startup: Duration,
}

impl ControlPlane {
    /// Path of an admin kubeconfig for this cluster.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// `true` when the tests run against `KUBECONFIG_E2E` rather than a control plane started
    /// by this process.
    pub fn is_external(&self) -> bool {
        self.state_dir.is_none()
    }

    /// State directory (logs, certificates, etcd data) of a local control plane.
    pub fn state_dir(&self) -> Option<&Path> {
        self.state_dir.as_deref()
    }

    /// How long starting the control plane took (zero for an external cluster).
    pub fn startup_time(&self) -> Duration {
        self.startup
    }

    /// The bearer token of a human test user (`alice` or `bob`), authenticated by the API
    /// server's static token file (`hack/control-plane.sh up` writes `DIR/tokens.csv`; both
    /// users are in group `claw-secrets-test:humans` and are granted nothing). For an external
    /// cluster, `CLAW_TEST_TOKEN_<USER>` must hold a token of such a user.
    pub fn user_token(&self, user: &str) -> Result<String, String> {
        let Some(dir) = &self.state_dir else {
            let var = format!("CLAW_TEST_TOKEN_{}", user.to_ascii_uppercase());
            return std::env::var(&var)
                .ok()
                .filter(|t| !t.is_empty())
                .ok_or_else(|| {
                    format!(
                        "the external cluster in {KUBECONFIG_E2E} has no known token for the human \
                         test user {user:?}: set {var} to the bearer token of a user named {user} \
                         who has no RBAC grants (e.g. from a static token file)"
                    )
                });
        };
        let path = dir.join("tokens.csv");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        text.lines()
            .filter_map(|l| {
                let mut fields = l.splitn(3, ',');
                Some((fields.next()?, fields.next()?))
            })
            .find(|(_, u)| *u == user)
            .map(|(token, _)| token.to_owned())
            .ok_or_else(|| format!("{} has no user {user:?}", path.display()))
    }

    /// Stops kube-apiserver only (etcd and its data stay), with `hack/control-plane.sh
    /// stop-apiserver`. An external cluster cannot be stopped: `Err` says so.
    pub fn stop_apiserver(&self) -> Result<(), String> {
        self.apiserver_script("stop-apiserver")
    }

    /// Starts kube-apiserver again after [`ControlPlane::stop_apiserver`]: same port, same etcd
    /// data, same arguments; returns once it is ready.
    pub fn start_apiserver(&self) -> Result<(), String> {
        self.apiserver_script("start-apiserver")
    }

    fn apiserver_script(&self, command: &str) -> Result<(), String> {
        let Some(dir) = &self.state_dir else {
            return Err(format!(
                "`{command}` needs the local control plane: the cluster in {KUBECONFIG_E2E} is \
                 not ours to stop and start"
            ));
        };
        let script = repo_root().join("hack/control-plane.sh");
        let out = Command::new("bash")
            .arg(&script)
            .arg(command)
            .arg(dir)
            .env(CLAW_K8S_BIN, bin_dir())
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`{} {command} {}` failed ({}):\n{}",
                script.display(),
                dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// A new client for this cluster, bound to the current tokio runtime.
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig)
            .unwrap_or_else(|e| panic!("reading {}: {e}", self.kubeconfig.display()));
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .unwrap_or_else(|e| panic!("loading {}: {e}", self.kubeconfig.display()));
        Client::try_from(config).expect("building a kube client")
    }
}

static CONTROL_PLANE: OnceLock<Result<ControlPlane, String>> = OnceLock::new();

/// The shared control plane, started on first call. Panics (failing the calling test) with an
/// explanation when it cannot be started.
pub fn control_plane() -> &'static ControlPlane {
    match CONTROL_PLANE.get_or_init(start) {
        Ok(cp) => cp,
        Err(e) => panic!("{e}"),
    }
}

/// The local control plane, for a test that stops and starts kube-apiserver. Against an
/// external cluster the test fails (it is not skipped with an "ok"): such a run leaves it out
/// by name, as `hack/kind-e2e.sh` does with `--skip`.
#[allow(dead_code)] // not every test binary stops the API server
pub fn local_control_plane(test: &str) -> &'static ControlPlane {
    let cp = control_plane();
    assert!(
        !cp.is_external(),
        "{test} stops and starts kube-apiserver, which only the local control plane allows: \
         against {KUBECONFIG_E2E} leave it out (`cargo test -- --skip {test}`)"
    );
    cp
}

/// Root of the repository (where `hack/` is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The pinned Kubernetes version, from `hack/k8s-bin/versions.env`.
pub fn pinned_version(key: &str) -> Option<String> {
    let path = repo_root().join("hack/k8s-bin/versions.env");
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().trim_matches('"').to_owned())
}

/// Where the control plane binaries are expected: `CLAW_K8S_BIN`, else the same default as
/// `hack/control-plane.sh bin-dir`.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os(CLAW_K8S_BIN).filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from(".cache"));
    let version = pinned_version("K8S_VERSION").unwrap_or_else(|| "unknown".to_owned());
    cache.join("claw-secrets/k8s").join(version).join("bin")
}

fn start() -> Result<ControlPlane, String> {
    if let Some(path) = std::env::var_os(KUBECONFIG_E2E).filter(|p| !p.is_empty()) {
        let kubeconfig = PathBuf::from(path);
        if !kubeconfig.is_file() {
            return Err(format!(
                "{KUBECONFIG_E2E}={} is not a file; point it at the kubeconfig of an existing \
                 cluster (e.g. `kind get kubeconfig > /tmp/kind.kubeconfig`) or unset it to \
                 start a local control plane",
                kubeconfig.display()
            ));
        }
        eprintln!(
            "[control-plane] using the existing cluster in {KUBECONFIG_E2E}={}",
            kubeconfig.display()
        );
        return Ok(ControlPlane {
            kubeconfig,
            state_dir: None,
            startup: Duration::ZERO,
        });
    }

    let bin = bin_dir();
    let missing: Vec<&str> = ["etcd", "kube-apiserver"]
        .into_iter()
        .filter(|b| !bin.join(b).is_file())
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "the cluster tests need a real etcd and kube-apiserver, but {} {} not in {}.\n\
             Build them once from the Go module proxy (needs Go; ~10 min on a cold cache, \
             seconds afterwards):\n\n    bash hack/control-plane.sh install\n\n\
             or set {CLAW_K8S_BIN} to a directory holding them, or set {KUBECONFIG_E2E} to the \
             kubeconfig of an existing cluster (e.g. kind).",
            missing.join(" and "),
            if missing.len() == 1 { "is" } else { "are" },
            bin.display()
        ));
    }

    let script = repo_root().join("hack/control-plane.sh");
    let tmp = std::env::temp_dir();
    // Remove leftovers of earlier runs whose test process and watchdog were both killed.
    let _ = Command::new("bash")
        .arg(&script)
        .arg("gc")
        .arg(&tmp)
        .env(CLAW_K8S_BIN, &bin)
        .output();

    let state_dir = tmp.join(format!(
        "claw-secrets-cp-{}-{:08x}",
        std::process::id(),
        random_u64() as u32
    ));
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .arg("up")
        .arg(&state_dir)
        .arg("--parent-pid")
        .arg(std::process::id().to_string())
        .env(CLAW_K8S_BIN, &bin)
        .output()
        .map_err(|e| format!("running {}: {e}", script.display()))?;
    let startup = started.elapsed();
    if !out.status.success() {
        return Err(format!(
            "`{} up {}` failed ({}):\n{}",
            script.display(),
            state_dir.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let kubeconfig = state_dir.join("kubeconfig");
    if !kubeconfig.is_file() {
        return Err(format!(
            "{} was not written by `control-plane.sh up`",
            kubeconfig.display()
        ));
    }
    eprintln!(
        "[control-plane] kube-apiserver ready in {:.1}s; KUBECONFIG={}",
        startup.as_secs_f64(),
        kubeconfig.display()
    );
    Ok(ControlPlane {
        kubeconfig,
        state_dir: Some(state_dir),
        startup,
    })
}

/// What a cluster test gets: a client, its own namespace, and the kubeconfig path (for
/// `kubectl`/`helm` or a spawned operator).
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
    pub kubeconfig: PathBuf,
    external: bool,
    cleaned: bool,
}

/// Start (or reuse) the control plane and create a fresh namespace for the calling test.
/// `hint` becomes part of the namespace name (lowercased, trimmed to a valid DNS label).
pub async fn test_env(hint: &str) -> TestEnv {
    let cp = control_plane();
    let client = cp.client().await;
    let namespace = unique_namespace(hint);
    let ns = Namespace {
        metadata: ObjectMeta {
            name: Some(namespace.clone()),
            labels: Some([(TEST_NAMESPACE_LABEL.to_owned(), "true".to_owned())].into()),
            ..ObjectMeta::default()
        },
        ..Namespace::default()
    };
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap_or_else(|e| panic!("creating test namespace {namespace}: {e}"));
    TestEnv {
        client,
        namespace,
        kubeconfig: cp.kubeconfig().to_owned(),
        external: cp.is_external(),
        cleaned: false,
    }
}

/// `claw-<hint>-<random>`, a valid namespace name.
pub fn unique_namespace(hint: &str) -> String {
    let mut base: String = hint
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    base.truncate(40);
    let base = base.trim_matches('-');
    let suffix = format!("{:08x}", random_u64() as u32);
    if base.is_empty() {
        format!("claw-{suffix}")
    } else {
        format!("claw-{base}-{suffix}")
    }
}

impl TestEnv {
    /// A typed API in this test's namespace.
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Delete the namespace now. Optional: on a local control plane everything disappears
    /// with the test process; on an external cluster a `TestEnv` dropped without `cleanup`
    /// (e.g. by a panicking test) deletes its namespace in its destructor.
    pub async fn cleanup(mut self) {
        self.cleaned = true;
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.namespace, &DeleteParams::background())
            .await;
    }
}

impl Drop for TestEnv {
    fn drop(&mut self) {
        if self.cleaned || !self.external {
            return;
        }
        // The test's runtime may be shutting down (or this is a panic unwinding): delete the
        // namespace from a separate thread with its own runtime and client.
        let namespace = self.namespace.clone();
        let kubeconfig = self.kubeconfig.clone();
        let handle = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                let Ok(kc) = Kubeconfig::read_from(&kubeconfig) else {
                    return;
                };
                let Ok(config) =
                    Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await
                else {
                    return;
                };
                let Ok(client) = Client::try_from(config) else {
                    return;
                };
                let _ = tokio::time::timeout(
                    Duration::from_secs(10),
                    Api::<Namespace>::all(client).delete(&namespace, &DeleteParams::background()),
                )
                .await;
            });
        });
        let _ = handle.join();
    }
}
