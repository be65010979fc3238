//! Credentials for cluster tests: a kubeconfig that authenticates with a bearer token, and a
//! forged token (a claim changed, the signature kept).
//!
//! ```ignore
//! #[path = "support/tokens.rs"]
//! mod tokens;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Writes to `path` a kubeconfig for the cluster of `admin` (a kubeconfig) that authenticates
/// with `token` (a ServiceAccount's or a static user's) and nothing else; returns `path`.
pub fn kubeconfig_with_token(admin: &Path, token: &str, path: &Path) -> PathBuf {
    let kc: Value = serde_saphyr::from_str(&std::fs::read_to_string(admin).expect("kubeconfig"))
        .expect("kubeconfig YAML");
    let current = kc["current-context"].as_str().expect("current-context");
    let find = |list: &str, name: &str| -> Value {
        kc[list]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("kubeconfig has no {list} entry {name}"))
            .clone()
    };
    let context = find("contexts", current);
    let cluster = find("clusters", context["context"]["cluster"].as_str().unwrap());
    let out = json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster["cluster"]}],
        "users": [{"name": "u", "user": {"token": token}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "default"}}],
        "current-context": "x",
    });
    std::fs::write(path, serde_json::to_vec_pretty(&out).unwrap()).expect("write kubeconfig");
    path.to_owned()
}

/// `token` (a JWS) with `from` replaced by `to` in its `sub` claim and the signature kept: a
/// forged token that the API server must refuse.
pub fn forge_subject(token: &str, from: &str, to: &str) -> String {
    let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
    assert_eq!(
        parts.len(),
        3,
        "a ServiceAccount token is a JWS with three parts"
    );
    let payload = URL_SAFE_NO_PAD
        .decode(&parts[1])
        .expect("JWT payload is base64url");
    let mut claims: Value = serde_json::from_slice(&payload).expect("JWT payload is JSON");
    let sub = claims["sub"].as_str().expect("sub claim").to_owned();
    assert!(sub.contains(from), "{sub:?} does not contain {from:?}");
    claims["sub"] = Value::String(sub.replace(from, to));
    parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
    parts.join(".")
}
