//! The node agent: one per node. It mirrors the ClawSecrets and ClawConfigs its node should
//! hold into the node-local store (the same crash-safe store as dev mode), and serves
//! `node.invoke` on the node: reads from the store, writes through the API server.
//!
//! Start-up order matters for the "serve reads within 100 ms, API server down" target: the
//! store, the cached keyring, the saved token reviews and the audit log are local, so the
//! server listens before the agent has talked to the API server at all; syncing and key
//! refresh run in the background.

mod backend;
mod sync;

pub use backend::{KeyringSlot, KubeBackend, LAST_WRITE_ANNOTATION};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;
use tokio::sync::watch;

use crate::audit::{AuditLog, Recovery};
use crate::crypto::Keyring;
use crate::invoke::Dispatcher;
use crate::k8s::crd::{ClawConfig, ClawSecret};
use crate::store::{Store, create_private_dir, write_private_file_atomic};

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The Node this agent serves (its node id for node.invoke).
    pub node_name: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Namespace and name of the master key Secret the operator created.
    pub master_key_namespace: String,
    pub master_key_secret: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Setup(String),
    #[error("the node.invoke server failed: {0}")]
    Serve(std::io::Error),
}

fn cached_keyring(path: &Path) -> Option<Keyring> {
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).ok()?);
    match Keyring::from_json(&bytes) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cached keyring is unreadable; waiting for the API server");
            None
        }
    }
}

/// Fetches the keyring from its Secret until it succeeds, then every few minutes (to pick up
/// new master keys), caching it on disk for restarts without the API server.
async fn refresh_keyring(client: kube::Client, config: AgentConfig, slot: KeyringSlot) {
    let cache = config.data_dir.join("master.key");
    let mut delay = Duration::from_millis(500);
    loop {
        match crate::k8s::keyring::load(
            &client,
            &config.master_key_namespace,
            &config.master_key_secret,
        )
        .await
        {
            Ok(Some(ring)) => {
                let fresh = ring.to_json();
                let unchanged =
                    slot.read().unwrap().as_ref().map(|k| k.to_json()) == Some(fresh.clone());
                if !unchanged {
                    if let Err(e) = write_private_file_atomic(&cache, &fresh) {
                        tracing::error!(error = %e, "could not cache the keyring");
                    }
                    *slot.write().unwrap() = Some(ring);
                    tracing::info!("master keyring loaded from the API server");
                }
                delay = Duration::from_secs(300);
            }
            Ok(None) => {
                tracing::warn!(namespace = %config.master_key_namespace, name = %config.master_key_secret,
                    "master key Secret not found yet; is the operator running?");
                delay = Duration::from_secs(2);
            }
            Err(e) => {
                tracing::debug!(error = %e, "keyring refresh failed; retrying");
                delay = (delay * 2).min(Duration::from_secs(10));
            }
        }
        tokio::time::sleep(delay).await;
    }
}

/// Runs the agent until `shutdown` completes.
pub async fn run(
    client: kube::Client,
    config: AgentConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let setup = |e: String| AgentError::Setup(e);
    create_private_dir(&config.data_dir).map_err(|e| setup(e.to_string()))?;
    let (store, report) = Store::open(&config.data_dir).map_err(|e| setup(e.to_string()))?;
    let store = Arc::new(store);
    let (audit, recovery) = AuditLog::open(&config.data_dir.join("audit.log"), &config.node_name)
        .map_err(|e| setup(e.to_string()))?;
    if let Recovery::Repaired {
        discarded_bytes,
        at_offset,
    } = recovery
    {
        tracing::warn!(
            discarded_bytes,
            at_offset,
            "audit log ended in a record cut short by a crash; repaired and recorded"
        );
    }
    let keyring: KeyringSlot = Arc::new(RwLock::new(cached_keyring(
        &config.data_dir.join("master.key"),
    )));

    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| setup(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| setup(e.to_string()))?;
    tracing::info!(node = %config.node_name, %addr, secrets = report.secrets, configs = report.configs,
        "agent serving node.invoke from its local store");

    let (labels_tx, labels_rx) = watch::channel(None);
    let background = vec![
        tokio::spawn(refresh_keyring(
            client.clone(),
            config.clone(),
            keyring.clone(),
        )),
        tokio::spawn(sync::watch_node_labels(
            client.clone(),
            config.node_name.clone(),
            labels_tx,
        )),
        tokio::spawn(sync::mirror::<ClawSecret>(
            client.clone(),
            store.clone(),
            labels_rx.clone(),
        )),
        tokio::spawn(sync::mirror::<ClawConfig>(
            client.clone(),
            store.clone(),
            labels_rx,
        )),
    ];

    let backend = KubeBackend::new(client, store, keyring, &config.node_name)
        .with_review_file(config.data_dir.join("token-reviews.json"));
    let dispatcher = Arc::new(Dispatcher::new(backend, audit, config.node_name.clone()));
    let served = crate::invoke::serve(listener, dispatcher, shutdown).await;
    for task in background {
        task.abort();
    }
    served.map_err(AgentError::Serve)
}
