//! `claw-secrets keys`: the master keyring's lifecycle in a cluster (docs/crypto.md, "Keyring"):
//! rotate the active key, prune retired keys nothing needs.

use clap::Subcommand;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use std::collections::{BTreeMap, BTreeSet};
use std::process::ExitCode;

use crate::k8s::crd::ClawSecret;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new master key active; the current one is kept, retired, to open what it sealed
    ///
    /// Writes a new key into the keyring Secret and makes it active (a write conditional on the
    /// Secret's resourceVersion: a rotation made meanwhile is never overwritten). The operator
    /// and the agents follow at once: from then on everything is sealed under the new key, and
    /// the operator re-encrypts every ClawSecret still under the old one in the background
    /// (progress: the claw_secrets_operator_sealed_objects metric, and a Reencrypted Event on
    /// the Secret when done). Credentials: KUBECONFIG, else the in-cluster account; it needs
    /// get and update on that Secret.
    #[command(after_help = "Example:
  claw-secrets keys rotate --namespace claw-secrets")]
    Rotate {
        /// The operator's namespace, where the keyring Secret is.
        #[arg(long, default_value = "claw-secrets")]
        namespace: String,
        /// The keyring Secret.
        #[arg(long, default_value = "claw-secrets-master-key")]
        secret: String,
    },
    /// Remove retired master keys that no ClawSecret needs any more; refuse while one does
    ///
    /// Lists every ClawSecret in the cluster: a retired key that any current version is sealed
    /// under stays, and nothing is removed while any ClawSecret waits with spec.encryptedData
    /// (it may be sealed to a retired key). Run it once re-encryption is done (the
    /// claw_secrets_operator_sealed_objects metric at 0 for the old key, or the Reencrypted
    /// Event). Manifests made with `claw-secrets seal` before the rotation can no longer be
    /// applied once their key is removed: seal them again. Needs list on clawsecrets in every
    /// namespace, and get and update on the keyring Secret.
    #[command(after_help = "Example:
  claw-secrets keys prune --namespace claw-secrets")]
    Prune {
        /// The operator's namespace, where the keyring Secret is.
        #[arg(long, default_value = "claw-secrets")]
        namespace: String,
        /// The keyring Secret.
        #[arg(long, default_value = "claw-secrets-master-key")]
        secret: String,
    },
}

pub fn run(cmd: KeysCommand) -> ExitCode {
    super::with_cluster(|client| async move {
        match cmd {
            KeysCommand::Rotate { namespace, secret } => rotate(&client, &namespace, &secret).await,
            KeysCommand::Prune { namespace, secret } => prune(&client, &namespace, &secret).await,
        }
    })
}

async fn rotate(client: &kube::Client, namespace: &str, secret: &str) -> Result<(), String> {
    let (retired, active) = crate::k8s::keyring::rotate(client, namespace, secret)
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "master key {active} is active in {namespace}/{secret}; {retired} is retired (kept to open what it sealed)"
    );
    println!(
        "the operator re-encrypts every ClawSecret under {retired} in the background: watch claw_secrets_operator_sealed_objects{{key_id=\"{retired}\"}} fall to 0, or the Reencrypted Event on the Secret; then `claw-secrets keys prune`"
    );
    Ok(())
}

async fn prune(client: &kube::Client, namespace: &str, secret: &str) -> Result<(), String> {
    let objects = Api::<ClawSecret>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing ClawSecrets: {e}"))?;
    let mut in_use: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut waiting = Vec::new();
    for obj in &objects.items {
        let name = format!("{}/{}", obj.namespace().unwrap_or_default(), obj.name_any());
        if obj.spec.encrypted_data.is_some() {
            waiting.push(name.clone());
        }
        if let Some(sealed) = &obj.spec.sealed {
            in_use.entry(sealed.key_id.clone()).or_default().push(name);
        }
    }
    if !waiting.is_empty() {
        return Err(format!(
            "{} ClawSecrets wait with spec.encryptedData, which may be sealed to a retired key ({}); run again once the operator has sealed them",
            waiting.len(),
            waiting
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let ring = crate::k8s::keyring::load(client, namespace, secret)
        .await
        .map_err(|e| e.to_string())?
        .ok_or_else(|| format!("the keyring Secret {namespace}/{secret} does not exist"))?;
    let active = ring.active().id().to_string();
    let needed: Vec<String> = ring
        .key_ids()
        .map(|id| id.to_string())
        .filter(|id| *id != active && in_use.contains_key(id))
        .collect();
    if !needed.is_empty() {
        let what: Vec<String> = needed
            .iter()
            .map(|id| format!("{id} by {} (e.g. {})", in_use[id].len(), in_use[id][0]))
            .collect();
        return Err(format!(
            "retired keys are still needed: {}; wait for re-encryption (claw_secrets_operator_sealed_objects) and run again. Nothing was removed",
            what.join("; ")
        ));
    }
    let keys: BTreeSet<String> = in_use.into_keys().collect();
    let removed = crate::k8s::keyring::prune(client, namespace, secret, &keys)
        .await
        .map_err(|e| e.to_string())?;
    if removed.is_empty() {
        println!("no retired key to remove; {active} is the only key in {namespace}/{secret}");
    } else {
        println!(
            "removed retired master keys {} from {namespace}/{secret}; {active} stays active",
            removed.join(", ")
        );
    }
    Ok(())
}
