//! Keeps the node's store in step with the cluster: every ClawSecret and ClawConfig this node
//! should hold is written to the store, everything else is removed from it, including what
//! was deleted while the agent was down (a re-list ends with a sweep of whatever it did not
//! see). A stored secret is never replaced by an older version of the same object.

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use tokio::sync::watch;

use crate::domain::ObjectKey;
use crate::k8s::convert::{self, selects};
use crate::k8s::crd::{ClawConfig, ClawSecret};
use crate::store::Store;

pub type Labels = BTreeMap<String, String>;

/// Follows the node's labels; sends every change (the first value once the node is seen).
pub async fn watch_node_labels(
    client: kube::Client,
    node: String,
    tx: watch::Sender<Option<Labels>>,
) {
    let api: Api<Node> = Api::all(client);
    let config = watcher::Config::default().fields(&format!("metadata.name={node}"));
    let mut stream = watcher::watcher(api, config).default_backoff().boxed();
    let mut seen = false;
    while let Some(event) = stream.next().await {
        match event {
            Ok(Event::Apply(n) | Event::InitApply(n)) => {
                seen = true;
                let labels = n.labels().clone();
                tx.send_if_modified(|cur| {
                    let changed = cur.as_ref() != Some(&labels);
                    *cur = Some(labels);
                    changed
                });
            }
            Ok(Event::InitDone) if !seen => {
                tracing::warn!(%node, "no Node object with this name; only objects without a nodeSelector are delivered");
                tx.send_if_modified(|cur| {
                    let changed = cur.is_none();
                    cur.get_or_insert_with(Labels::new);
                    changed
                });
            }
            Ok(Event::Init) => seen = false,
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "node watch interrupted; retrying"),
        }
    }
}

/// What one kind of object needs to be mirrored into the store.
pub trait Mirrored: kube::Resource + Clone + Send + Sync + 'static {
    fn key(&self) -> Option<ObjectKey>;
    fn node_selector(&self) -> Option<&BTreeMap<String, String>>;
    /// Writes the object into the store if it belongs there and is newer; returns whether the
    /// key should be considered present.
    fn store_it(&self, store: &Store) -> bool;
    fn remove(key: &ObjectKey, store: &Store);
    fn stored_keys(store: &Store) -> Vec<ObjectKey>;
    const KIND: &'static str;
}

impl Mirrored for ClawSecret {
    const KIND: &'static str = "ClawSecret";

    fn key(&self) -> Option<ObjectKey> {
        convert::secret_key(self).ok()
    }

    fn node_selector(&self) -> Option<&BTreeMap<String, String>> {
        self.spec.node_selector.as_ref()
    }

    fn store_it(&self, store: &Store) -> bool {
        let record = match convert::secret_record(self) {
            Ok(Some(r)) => r,
            // Not sealed yet: keep whatever version this node already has.
            Ok(None) => return true,
            Err(e) => {
                tracing::warn!(namespace = ?self.namespace(), object = %self.name_any(), reason = e.reason,
                    error = %e, "ClawSecret is invalid; keeping this node's copy, if any");
                return true;
            }
        };
        if let Some(stored) = store.secret(&record.key)
            && stored.origin == record.origin
        {
            if stored.version > record.version {
                tracing::debug!(key = %record.key, stored = stored.version.get(), offered = record.version.get(),
                    "ignoring an older version");
                return true;
            }
            if stored.version == record.version
                && stored.envelope == record.envelope
                && stored.allowed_workloads == record.allowed_workloads
            {
                return true;
            }
        }
        let key = record.key.clone();
        let version = record.version;
        match store.put_secret(record) {
            Ok(_) => tracing::info!(%key, version = version.get(), "secret stored on this node"),
            Err(e) => tracing::error!(%key, error = %e, "could not store secret"),
        }
        true
    }

    fn remove(key: &ObjectKey, store: &Store) {
        match store.delete_secret(key) {
            Ok(Some(_)) => tracing::info!(%key, "secret removed from this node"),
            Ok(None) => {}
            Err(e) => tracing::error!(%key, error = %e, "could not remove secret"),
        }
    }

    fn stored_keys(store: &Store) -> Vec<ObjectKey> {
        store.secret_keys()
    }
}

impl Mirrored for ClawConfig {
    const KIND: &'static str = "ClawConfig";

    fn key(&self) -> Option<ObjectKey> {
        convert::config_key(self).ok()
    }

    fn node_selector(&self) -> Option<&BTreeMap<String, String>> {
        self.spec.node_selector.as_ref()
    }

    fn store_it(&self, store: &Store) -> bool {
        // Only data the operator accepted is delivered: an immutable config whose data was
        // changed anyway (a server without CEL) keeps the accepted copy on every node.
        let accepted = self
            .status
            .as_ref()
            .and_then(|s| s.accepted_data_hash.as_deref());
        if accepted != Some(convert::data_hash(&self.spec.data).as_str()) {
            return true;
        }
        let record = match convert::config_record(self) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(object = %self.name_any(), error = %e, "ClawConfig is invalid; keeping this node's copy, if any");
                return true;
            }
        };
        if let Some(stored) = store.config(&record.key)
            && stored.origin == record.origin
            && stored.data == record.data
            && stored.immutable == record.immutable
            && stored.updated_at == record.updated_at
        {
            return true;
        }
        let key = record.key.clone();
        match store.put_config(record) {
            Ok(_) => tracing::info!(%key, "config stored on this node"),
            Err(e) => tracing::error!(%key, error = %e, "could not store config"),
        }
        true
    }

    fn remove(key: &ObjectKey, store: &Store) {
        match store.delete_config(key) {
            Ok(Some(_)) => tracing::info!(%key, "config removed from this node"),
            Ok(None) => {}
            Err(e) => tracing::error!(%key, error = %e, "could not remove config"),
        }
    }

    fn stored_keys(store: &Store) -> Vec<ObjectKey> {
        store.config_keys()
    }
}

/// Applies one object: stored if it belongs on this node, removed otherwise. Returns the key
/// if the object belongs here.
fn apply<K: Mirrored>(obj: &K, labels: &Labels, store: &Store) -> Option<ObjectKey> {
    let key = obj.key()?;
    let being_deleted = obj.meta().deletion_timestamp.is_some();
    if being_deleted || !selects(obj.node_selector(), labels) {
        K::remove(&key, store);
        return None;
    }
    obj.store_it(store).then_some(key)
}

/// Mirrors one kind until the process ends; restarts (re-lists) whenever the labels change.
pub async fn mirror<K>(
    client: kube::Client,
    store: Arc<Store>,
    mut labels_rx: watch::Receiver<Option<Labels>>,
) where
    K: Mirrored + serde::de::DeserializeOwned + std::fmt::Debug,
    K: kube::Resource<DynamicType = ()>,
{
    loop {
        // Wait until the node's labels are known: selectors cannot be judged before.
        let labels = loop {
            if let Some(l) = labels_rx.borrow_and_update().clone() {
                break l;
            }
            if labels_rx.changed().await.is_err() {
                return;
            }
        };
        let api: Api<K> = Api::all(client.clone());
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        let mut listed: HashSet<ObjectKey> = HashSet::new();
        loop {
            tokio::select! {
                changed = labels_rx.changed() => {
                    if changed.is_err() { return; }
                    tracing::info!(kind = K::KIND, "node labels changed; re-listing");
                    break;
                }
                event = stream.next() => {
                    let Some(event) = event else { return };
                    let store = store.clone();
                    let labels = labels.clone();
                    match event {
                        Ok(Event::Init) => listed.clear(),
                        Ok(Event::InitApply(obj)) => {
                            if let Some(k) = blocking(move || apply(&obj, &labels, &store)).await {
                                listed.insert(k);
                            }
                        }
                        Ok(Event::InitDone) => {
                            // Whatever the store holds that the list did not show was deleted
                            // (or deselected) while we were not watching.
                            let seen = std::mem::take(&mut listed);
                            blocking(move || {
                                for key in K::stored_keys(&store) {
                                    if !seen.contains(&key) {
                                        K::remove(&key, &store);
                                    }
                                }
                            }).await;
                            tracing::info!(kind = K::KIND, "in sync with the API server");
                        }
                        Ok(Event::Apply(obj)) => {
                            blocking(move || apply(&obj, &labels, &store)).await;
                        }
                        Ok(Event::Delete(obj)) => {
                            if let Some(key) = obj.key() {
                                blocking(move || K::remove(&key, &store)).await;
                            }
                        }
                        Err(e) => tracing::debug!(kind = K::KIND, error = %e, "watch interrupted; retrying"),
                    }
                }
            }
        }
    }
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f)
        .await
        .expect("store task does not panic")
}
