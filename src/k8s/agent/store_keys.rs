//! Which master keys the node's store still needs, reported where `claw-secrets keys prune`
//! reads it: the `status.masterKeys` of the node's `ClawNode` (docs/crypto.md, "Keyring").
//!
//! An agent without deliveries keeps its store under the master keyring: each secret's
//! envelope and each entry's MAC are under the key that was active when it was written. After
//! a rotation the watch stores every re-encrypted ClawSecret again, but configs, and secrets
//! the operator has not reached yet, stay under the retired key until this re-encrypts them
//! (the same [`Store::reencrypt`] as dev mode's `keys rotate`). Until then the report names the
//! retired key, so prune keeps it; an agent that was down through a rotation keeps naming it
//! until it is back and has done this. An agent on deliveries reports an empty list: its store
//! is under the node key.
//!
//! The report is conditional on nothing: only this node's agent may write this status (the
//! `claw-secrets-agent-node-keys` admission policy, as for the spec), and it only ever says what
//! the store holds after re-encrypting, so a stale report errs towards keeping a key.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::crypto::SharedKeyring;
use crate::k8s::component::Component;
use crate::k8s::crd::ClawNode;
use crate::store::Store;

/// How often an unchanged report is written again (it refreshes `observedTime`, and puts the
/// status back on a `ClawNode` that was replaced).
const REPORT_EVERY: Duration = Duration::from_secs(300);

/// The master keys `store` needs: none for a store under the node key (`master` is `None`).
pub fn needed(store: &Store, master: Option<&SharedKeyring>) -> BTreeSet<String> {
    if master.is_none() {
        return BTreeSet::new();
    }
    let usage = store.key_usage();
    usage
        .sealed
        .keys()
        .chain(usage.authenticated.keys())
        .chain(usage.manifest.iter())
        .map(|id| id.to_string())
        .collect()
}

/// Re-encrypts `store` under the active master key whenever `keyring_changed` fires (and once at
/// start, for a rotation the agent slept through or a pass a crash cut short), then reports the
/// keys the store needs in the node's `ClawNode` status. Runs until the agent stops.
pub async fn keep_reported(
    client: kube::Client,
    node: String,
    store: Arc<Store>,
    master: Option<SharedKeyring>,
    mut keyring_changed: watch::Receiver<()>,
) {
    let api: Api<ClawNode> = Api::all(client);
    let mut reported: Option<BTreeSet<String>> = None;
    let mut last_write = tokio::time::Instant::now();
    let mut retry = Duration::from_secs(1);
    let mut follows = true;
    loop {
        if let Some(keys) = &master {
            reencrypt(&store, keys).await;
        }
        let store_for_usage = store.clone();
        let master_for_usage = master.clone();
        let needed = match tokio::task::spawn_blocking(move || {
            needed(&store_for_usage, master_for_usage.as_ref())
        })
        .await
        {
            Ok(needed) => needed,
            Err(e) => {
                tracing::error!(error = %e, "could not list the keys the store uses");
                tokio::time::sleep(retry).await;
                continue;
            }
        };
        let due = reported.as_ref() != Some(&needed) || last_write.elapsed() >= REPORT_EVERY;
        let mut wait = REPORT_EVERY;
        if due {
            match report(&api, &node, &needed).await {
                Ok(()) => {
                    tracing::info!(%node, master_keys = ?needed, "reported the master keys this node's store needs");
                    reported = Some(needed);
                    last_write = tokio::time::Instant::now();
                    retry = Duration::from_secs(1);
                }
                Err(e) => {
                    // Before the ClawNode exists (its publication runs beside this), or with the
                    // API server away: try again soon.
                    tracing::debug!(%node, error = %e, "could not report the store's master keys yet; retrying");
                    wait = retry;
                    retry = (retry * 2).min(Duration::from_secs(30));
                }
            }
        }
        tokio::select! {
            changed = keyring_changed.changed(), if follows => {
                // Closed: no keyring is followed (an agent on deliveries).
                follows = changed.is_ok();
            }
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// One re-encryption of the store under the active master key, logged; a failure is logged and
/// left to the next change or report (the report then still names the old key).
async fn reencrypt(store: &Arc<Store>, keys: &SharedKeyring) {
    let active = keys.current().active().id().clone();
    let store = store.clone();
    let done = tokio::task::spawn_blocking(move || {
        if store.key_usage().other_than(&active).is_empty() {
            return Ok(None);
        }
        store.reencrypt().map(Some)
    })
    .await;
    match done {
        Ok(Ok(Some(done))) => tracing::info!(
            resealed = done.resealed,
            reauthenticated = done.reauthenticated,
            manifest_rewritten = done.manifest_rewritten,
            "re-encrypted the node's store under the active master key"
        ),
        Ok(Ok(None)) => {}
        Ok(Err(e)) => {
            tracing::error!(error = %e, "could not re-encrypt the node's store under the active master key")
        }
        Err(e) => tracing::error!(error = %e, "the store's re-encryption stopped"),
    }
}

/// Applies `status.masterKeys` (and `observedTime`) to the node's `ClawNode`.
async fn report(
    api: &Api<ClawNode>,
    node: &str,
    needed: &BTreeSet<String>,
) -> Result<(), kube::Error> {
    let now = Time(jiff::Timestamp::now());
    let patch = serde_json::json!({
        "apiVersion": <ClawNode as kube::Resource>::api_version(&()),
        "kind": <ClawNode as kube::Resource>::kind(&()),
        "metadata": { "name": node },
        "status": {
            "masterKeys": needed,
            "observedTime": now,
        },
    });
    api.patch_status(
        node,
        &Component::Agent.apply().force(),
        &Patch::Apply(&patch),
    )
    .await
    .map(|_| ())
}
