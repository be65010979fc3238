//! The caller's own bearer token, from their kubeconfig, for calls through the API server's
//! pod proxy: the CLI forwards it to the agent (which checks it with TokenReview), so it must
//! read it the way client-go would, exec credential plugins included. CLI-only: no server runs
//! any of this.

use serde_json::Value;

/// The bearer token the kubeconfig's user authenticates with: its `token`, else its
/// `tokenFile`, else what its exec plugin (e.g. `aws eks get-token`, `kubelogin`) prints; `None`
/// when the user authenticates otherwise (a client certificate) or not at all. A user name and
/// password, or an `auth-provider`, cannot be forwarded: the error says to pass --token.
pub fn kubeconfig_bearer_token(auth: &kube::config::AuthInfo) -> Result<Option<String>, String> {
    if auth.token.is_some() {
        // kube keeps the token in a `SecretString`; its kubeconfig serialization is the one
        // public way to read it (this crate does not depend on `secrecy` directly).
        let user = serde_json::to_value(auth).map_err(|e| e.to_string())?;
        if let Some(token) = user["token"].as_str().map(str::trim)
            && !token.is_empty()
        {
            return Ok(Some(token.to_owned()));
        }
    }
    if let Some(file) = &auth.token_file {
        let token = std::fs::read_to_string(file)
            .map_err(|e| format!("cannot read the kubeconfig's tokenFile {file}: {e}"))?;
        return match token.trim() {
            "" => Err(format!("the kubeconfig's tokenFile {file} is empty")),
            t => Ok(Some(t.to_owned())),
        };
    }
    if let Some(exec) = &auth.exec {
        return exec_token(exec).map(Some);
    }
    let cannot = |what: &str| {
        Err(format!(
            "the kubeconfig's user authenticates with {what}, which cannot be forwarded to the \
             agent; pass a bearer token with --token or --token-file"
        ))
    };
    if auth.auth_provider.is_some() {
        return cannot("an auth-provider");
    }
    if auth.username.is_some() || auth.password.is_some() {
        return cannot("a user name and password");
    }
    Ok(None)
}

/// Runs a kubeconfig exec credential plugin the way client-go does, and returns its token.
fn exec_token(exec: &kube::config::ExecConfig) -> Result<String, String> {
    let command = exec
        .command
        .as_deref()
        .ok_or("the kubeconfig's exec plugin names no command")?;
    let mut cmd = std::process::Command::new(command);
    cmd.args(exec.args.iter().flatten());
    for pair in exec.env.iter().flatten() {
        if let (Some(name), Some(value)) = (pair.get("name"), pair.get("value")) {
            cmd.env(name, value);
        }
    }
    let interactive = exec.interactive_mode != Some(kube::config::ExecInteractiveMode::Never);
    let mut spec = serde_json::json!({ "interactive": interactive });
    if exec.provide_cluster_info
        && let Some(cluster) = &exec.cluster
    {
        spec["cluster"] = serde_json::to_value(cluster).unwrap_or_default();
    }
    let info = serde_json::json!({
        "apiVersion": exec.api_version,
        "kind": "ExecCredential",
        "spec": spec,
    });
    cmd.env("KUBERNETES_EXEC_INFO", info.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit());
    if !interactive {
        cmd.stdin(std::process::Stdio::null());
    }
    let out = cmd.output().map_err(|e| {
        let hint = exec
            .install_hint
            .as_deref()
            .map(|h| format!(" ({})", h.trim()))
            .unwrap_or_default();
        format!("cannot run the kubeconfig's exec plugin {command:?}: {e}{hint}")
    })?;
    if !out.status.success() {
        return Err(format!(
            "the kubeconfig's exec plugin {command:?} failed ({})",
            out.status
        ));
    }
    let credential: Value = serde_json::from_slice(&out.stdout).map_err(|_| {
        format!("the kubeconfig's exec plugin {command:?} did not print an ExecCredential")
    })?;
    match credential["status"]["token"].as_str().map(str::trim) {
        Some(t) if !t.is_empty() => Ok(t.to_owned()),
        _ => Err(format!(
            "the kubeconfig's exec plugin {command:?} gave a client certificate, not a token, \
             which cannot be forwarded to the agent; pass a bearer token with --token or --token-file"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kubeconfig_token_is_found_and_certificates_give_none() {
        let mut auth = kube::config::AuthInfo::default();
        assert_eq!(kubeconfig_bearer_token(&auth).unwrap(), None);
        auth.client_certificate_data = Some("cert".into());
        assert_eq!(kubeconfig_bearer_token(&auth).unwrap(), None);

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "from-file\n").unwrap();
        auth.token_file = Some(file.to_string_lossy().into_owned());
        assert_eq!(
            kubeconfig_bearer_token(&auth).unwrap().as_deref(),
            Some("from-file")
        );
        // An inline token wins over the file, as in client-go.
        auth.token = Some("tok-123".to_owned().into());
        assert_eq!(
            kubeconfig_bearer_token(&auth).unwrap().as_deref(),
            Some("tok-123")
        );

        let exec = kube::config::AuthInfo {
            exec: Some(kube::config::ExecConfig {
                api_version: Some("client.authentication.k8s.io/v1".into()),
                command: Some("sh".into()),
                args: Some(vec![
                    "-c".into(),
                    r#"printf '{"kind":"ExecCredential","status":{"token":"%s"}}' "$PLUGIN_TOKEN""#
                        .into(),
                ]),
                env: Some(vec![
                    [
                        ("name".to_owned(), "PLUGIN_TOKEN".to_owned()),
                        ("value".to_owned(), "from-exec".to_owned()),
                    ]
                    .into(),
                ]),
                interactive_mode: Some(kube::config::ExecInteractiveMode::Never),
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(
            kubeconfig_bearer_token(&exec).unwrap().as_deref(),
            Some("from-exec")
        );

        let basic = kube::config::AuthInfo {
            username: Some("u".into()),
            password: Some("p".to_owned().into()),
            ..Default::default()
        };
        let err = kubeconfig_bearer_token(&basic).unwrap_err();
        assert!(err.contains("--token"), "{err}");
    }
}
