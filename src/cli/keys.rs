//! `claw-secrets keys`: the master keyring's lifecycle in a cluster (docs/crypto.md, "Keyring"):
//! rotate the active key, prune retired keys nothing needs. With `--data-dir`, the same for a
//! dev data dir ([`super::dev_keys`]): done here when no server uses the dir, else by the
//! running `claw-secrets dev`, asked over its control socket.

use clap::Subcommand;
use kube::ResourceExt;
use kube::api::{Api, ListParams};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use super::dev_control::Action;
use super::dev_keys::{DataDirKeys, KEYRING_FILE, local_subject};
use crate::audit;
use crate::crypto::SharedKeyring;
use crate::k8s::crd::{ClawNode, ClawSecret};
use crate::kms::KmsPlugin;
use crate::store::{OpenOptions, Store};

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
    ///
    /// With --data-dir, the dev data dir's master.key instead: the new key is written beside the
    /// old one (atomically, 0600), then every entry of the store under the old key is
    /// re-encrypted under the new one, and the audit log records both. If `claw-secrets dev` is
    /// running on that dir, it does this itself (asked over <data-dir>/control.sock) and keeps
    /// serving meanwhile; otherwise this command does it.
    #[command(after_help = "Example:
  claw-secrets keys rotate --namespace claw-secrets
  claw-secrets keys rotate --data-dir ~/.local/share/claw-secrets/dev")]
    Rotate {
        /// The operator's namespace, where the keyring Secret is.
        #[arg(long, default_value = "claw-secrets")]
        namespace: String,
        /// The keyring Secret.
        #[arg(long, default_value = "claw-secrets-master-key")]
        secret: String,
        /// A dev data dir (`claw-secrets dev --data-dir`) to act on instead of a cluster.
        #[arg(long, conflicts_with_all = ["namespace", "secret"])]
        data_dir: Option<PathBuf>,
        // Cluster only.
        #[command(flatten)]
        kms: super::kms::KmsArgs,
    },
    /// Remove retired master keys that no ClawSecret needs any more; refuse while one does
    ///
    /// Lists every ClawSecret in the cluster: a retired key that any current version is sealed
    /// under stays, and nothing is removed while any ClawSecret waits with spec.encryptedData
    /// (it may be sealed to a retired key). Lists every ClawNode too: a key a node's agent
    /// reports its store still needs (status.masterKeys) stays, and nothing is removed while a
    /// ClawNode has no report. Run it once re-encryption is done (the
    /// claw_secrets_operator_sealed_objects metric at 0 for the old key, or the Reencrypted
    /// Event). Manifests made with `claw-secrets seal` before the rotation can no longer be
    /// applied once their key is removed: seal them again. Needs list on clawsecrets in every
    /// namespace and on clawnodes, and get and update on the keyring Secret.
    ///
    /// With --data-dir, a dev data dir's master.key: a retired key is removed only when no
    /// secret, entry file or store manifest line of that dir uses it (after the re-encryption
    /// `keys rotate` runs); otherwise nothing is removed. Through the running `claw-secrets dev`
    /// if there is one, as for rotate.
    #[command(after_help = "Example:
  claw-secrets keys prune --namespace claw-secrets
  claw-secrets keys prune --data-dir ~/.local/share/claw-secrets/dev")]
    Prune {
        /// The operator's namespace, where the keyring Secret is.
        #[arg(long, default_value = "claw-secrets")]
        namespace: String,
        /// The keyring Secret.
        #[arg(long, default_value = "claw-secrets-master-key")]
        secret: String,
        /// A dev data dir (`claw-secrets dev --data-dir`) to act on instead of a cluster.
        #[arg(long, conflicts_with_all = ["namespace", "secret"])]
        data_dir: Option<PathBuf>,
        // Cluster only.
        #[command(flatten)]
        kms: super::kms::KmsArgs,
    },
}

pub fn run(cmd: KeysCommand) -> ExitCode {
    match cmd {
        KeysCommand::Rotate {
            data_dir: Some(dir),
            ..
        } => run_dev(&dir, Action::Rotate),
        KeysCommand::Prune {
            data_dir: Some(dir),
            ..
        } => run_dev(&dir, Action::Prune),
        cmd => super::with_cluster(|client| async move {
            let (KeysCommand::Rotate { kms, .. } | KeysCommand::Prune { kms, .. }) = &cmd;
            let kms = kms.plugin()?;
            if let Some(kms) = &kms {
                super::kms::check(kms).await?;
            }
            let kms = kms.as_ref();
            match cmd {
                KeysCommand::Rotate {
                    namespace, secret, ..
                } => rotate(&client, &namespace, &secret, kms).await,
                KeysCommand::Prune {
                    namespace, secret, ..
                } => prune(&client, &namespace, &secret, kms).await,
            }
        }),
    }
}

/// `keys rotate|prune --data-dir DIR`: by the server using DIR if there is one (online), else
/// here, holding DIR's lock so no server starts meanwhile (offline).
fn run_dev(data_dir: &Path, action: Action) -> ExitCode {
    let Some(runtime) = super::runtime(false) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(dev_action(data_dir, action)) {
        Ok(message) => {
            println!("{message}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn dev_action(data_dir: &Path, action: Action) -> Result<String, String> {
    if !data_dir.join(KEYRING_FILE).is_file() {
        return Err(format!(
            "{} holds no {KEYRING_FILE}: not a claw-secrets dev data dir (`claw-secrets dev --data-dir DIR` creates one), so there is no key to {}",
            data_dir.display(),
            match action {
                Action::Rotate => "rotate",
                Action::Prune => "prune",
            }
        ));
    }
    let Some(_lock) = super::dev::try_lock_data_dir(data_dir)? else {
        return super::dev_control::request(data_dir, action).await;
    };
    let (ring, _) = super::dev::load_or_create_keyring(data_dir)?;
    let keys = SharedKeyring::new(ring);
    let (store, _) =
        Store::open(data_dir, keys.clone(), OpenOptions::default()).map_err(|e| e.to_string())?;
    let store = Arc::new(store);
    let node = std::fs::read_to_string(data_dir.join("node-id"))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "dev".to_owned());
    let (audit, _) = audit::open_anchored(&data_dir.join("audit.log"), &node, &store, false)
        .map_err(|e| e.to_string())?;
    let admin = DataDirKeys::new(
        data_dir.to_owned(),
        node,
        keys,
        store.clone(),
        audit.clone(),
    );
    let subject = local_subject(rustix::process::geteuid().as_raw());
    let result = match action {
        Action::Rotate => admin.rotate(&subject).await,
        Action::Prune => admin.prune(&subject).await,
    };
    // The outcome records are queued: durable, and anchored in the store, before exiting.
    audit
        .flush()
        .await
        .map_err(|e| format!("the audit log could not be flushed: {e}"))?;
    audit::anchor_head(&audit, &store).map_err(|e| e.to_string())?;
    result
}

async fn rotate(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
    kms: Option<&KmsPlugin>,
) -> Result<(), String> {
    let (retired, active) = crate::k8s::keyring::rotate(client, namespace, secret, kms)
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

async fn prune(
    client: &kube::Client,
    namespace: &str,
    secret: &str,
    kms: Option<&KmsPlugin>,
) -> Result<(), String> {
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
    // What each node's store still needs (an agent without deliveries keeps its store under
    // the master keyring; one that was down through a rotation still needs the old key).
    let nodes = Api::<ClawNode>::all(client.clone())
        .list(&ListParams::default())
        .await
        .map_err(|e| format!("listing ClawNodes: {e}"))?;
    let mut unreported = Vec::new();
    for node in &nodes.items {
        let name = format!("node {}'s store", node.name_any());
        match &node.status {
            Some(status) => {
                for key in &status.master_keys {
                    in_use.entry(key.clone()).or_default().push(name.clone());
                }
            }
            None => unreported.push(node.name_any()),
        }
    }
    if !unreported.is_empty() {
        return Err(format!(
            "the agents of {} nodes have not reported which master keys their stores need (status.masterKeys of their ClawNode: {}); run again once they have (an agent reports within seconds of starting), or, for a node gone for good, `kubectl delete clawnode NAME`. Nothing was removed",
            unreported.len(),
            unreported
                .iter()
                .take(5)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    let ring = crate::k8s::keyring::load(client, namespace, secret, kms)
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
            "retired keys are still needed: {}; wait for re-encryption (claw_secrets_operator_sealed_objects, and each node's agent: status.masterKeys of its ClawNode) and run again. Nothing was removed",
            what.join("; ")
        ));
    }
    let keys: BTreeSet<String> = in_use.into_keys().collect();
    let removed = crate::k8s::keyring::prune(client, namespace, secret, &keys, kms)
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
