//! The command-line tools the cluster tests drive (`helm`, `kubectl`), from the control plane's
//! binary cache, with nothing of the user's (no KUBECONFIG, no helm home) leaking in.
//!
//! ```ignore
//! #[path = "support/tools.rs"]
//! mod tools;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::control_plane;

/// `helm` or `kubectl`: from the control plane's binary cache (`hack/control-plane.sh
/// install` builds both), else from PATH. Missing is a failure with instructions.
pub fn tool(name: &str) -> PathBuf {
    let cached = control_plane::bin_dir().join(name);
    if cached.is_file() {
        return cached;
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(name))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!(
                "{name} is needed: neither {} nor PATH has it. Build it with \
                 `bash hack/control-plane.sh install` (needs Go), or install it",
                cached.display()
            )
        })
}

pub struct Run {
    pub ok: bool,
    pub stdout: String,
    pub stderr: String,
}

pub fn run(program: &Path, args: &[&str], envs: &[(&str, &Path)]) -> Run {
    let mut command = Command::new(program);
    command
        .args(args)
        .stdin(Stdio::null())
        .env_remove("KUBECONFIG");
    for (k, v) in envs {
        command.env(k, v);
    }
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", program.display()));
    Run {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// `helm ARGS`, with its config, cache and data under target/tmp (never the user's).
pub fn helm(args: &[&str]) -> Run {
    let home = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("k8s-helm-home");
    let (config, cache, data) = (home.join("config"), home.join("cache"), home.join("data"));
    run(
        &tool("helm"),
        args,
        &[
            ("HELM_CONFIG_HOME", &config),
            ("HELM_CACHE_HOME", &cache),
            ("HELM_DATA_HOME", &data),
        ],
    )
}

pub fn kubectl(kubeconfig: &Path, args: &[&str]) -> Run {
    let mut all = vec!["--kubeconfig", kubeconfig.to_str().expect("utf-8 path")];
    all.extend_from_slice(args);
    run(&tool("kubectl"), &all, &[])
}

/// The stdout of a command that must succeed.
#[track_caller]
pub fn must(r: Run, what: &str) -> String {
    assert!(
        r.ok,
        "{what} failed:\n--- stderr\n{}\n--- stdout\n{}",
        r.stderr, r.stdout
    );
    r.stdout
}
