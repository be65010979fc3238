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

use crate::crypto::{Keyring, SharedKeyring};
use crate::domain::{Kind, ObjectKey};
use crate::k8s::convert::{self, selects};
use crate::k8s::crd::{ClawConfig, ClawSecret};
use crate::store::{Expect, Store};

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
    /// key should be considered present. `keyring` opens the writes the object remembers.
    fn store_it(&self, store: &Store, keyring: &Keyring) -> bool;
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

    fn store_it(&self, store: &Store, keyring: &Keyring) -> bool {
        let writes = match convert::secret_key(self) {
            Ok(key) => convert::remembered_writes(&self.metadata, Kind::Secret, &key, keyring),
            Err(_) => Vec::new(),
        };
        let record = match convert::secret_record(self, writes) {
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
                && stored.writes == record.writes
            {
                return true;
            }
        }
        let key = record.key.clone();
        let version = record.version;
        match store.put_secret(record, Expect::Any) {
            Ok(_) => tracing::info!(%key, version = version.get(), "secret stored on this node"),
            Err(e) => tracing::error!(%key, error = %e, "could not store secret"),
        }
        true
    }

    fn remove(key: &ObjectKey, store: &Store) {
        match store.delete_secret(key, Expect::Any, Vec::new()) {
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

    fn store_it(&self, store: &Store, keyring: &Keyring) -> bool {
        // Only data the operator accepted is delivered: an immutable config whose data was
        // changed anyway (a server without CEL) keeps the accepted copy on every node.
        let accepted = self
            .status
            .as_ref()
            .and_then(|s| s.accepted_data_hash.as_deref());
        if accepted != Some(convert::data_hash(&self.spec.data).as_str()) {
            return true;
        }
        let writes = match convert::config_key(self) {
            Ok(key) => convert::remembered_writes(&self.metadata, Kind::Config, &key, keyring),
            Err(_) => Vec::new(),
        };
        let record = match convert::config_record(self, writes) {
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
            && stored.writes == record.writes
        {
            return true;
        }
        let key = record.key.clone();
        match store.put_config(record, Expect::Any) {
            Ok(_) => tracing::info!(%key, "config stored on this node"),
            Err(e) => tracing::error!(%key, error = %e, "could not store config"),
        }
        true
    }

    fn remove(key: &ObjectKey, store: &Store) {
        match store.delete_config(key, Expect::Any, Vec::new()) {
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
fn apply<K: Mirrored>(
    obj: &K,
    labels: &Labels,
    store: &Store,
    keyring: &Keyring,
) -> Option<ObjectKey> {
    let key = obj.key()?;
    let being_deleted = obj.meta().deletion_timestamp.is_some();
    if being_deleted || !selects(obj.node_selector(), labels) {
        K::remove(&key, store);
        return None;
    }
    obj.store_it(store, keyring).then_some(key)
}

/// Mirrors one kind until the process ends; restarts (re-lists) whenever the labels change.
pub async fn mirror<K>(
    client: kube::Client,
    store: Arc<Store>,
    keys: SharedKeyring,
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
                    let keyring = keys.current();
                    match event {
                        Ok(Event::Init) => listed.clear(),
                        Ok(Event::InitApply(obj)) => {
                            if let Some(k) = blocking(move || apply(&obj, &labels, &store, &keyring)).await {
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
                            blocking(move || apply(&obj, &labels, &store, &keyring)).await;
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

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;

    use crate::crypto::{self, SecretIdentity};
    use crate::domain::{Name, Namespace, Version};
    use crate::k8s::crd::{ClawSecretSpec, SealedData};

    fn key() -> ObjectKey {
        ObjectKey::new(
            Namespace::parse("prod").unwrap(),
            Name::parse("db").unwrap(),
        )
    }

    /// A ClawSecret `prod/db` with object uid `uid`, sealed as `version` of `value`.
    fn sealed(keyring: &Keyring, uid: &str, version: u64, value: &str) -> ClawSecret {
        let key = key();
        let data = convert::secret_data(&[("password".into(), value.into())].into()).unwrap();
        let identity = SecretIdentity {
            kind: Kind::Secret,
            namespace: &key.namespace,
            name: &key.name,
            version: Version::new(version).unwrap(),
        };
        let envelope = crypto::seal(keyring, &identity, &data).unwrap();
        let mut obj = ClawSecret::new(
            "db",
            ClawSecretSpec {
                name: None,
                data: None,
                allowed_workloads: vec![],
                node_selector: None,
                sealed: Some(SealedData {
                    version,
                    key_id: envelope.key_id().to_string(),
                    envelope: B64.encode(envelope.to_bytes()),
                    sealed_at: "2025-01-01T00:00:00Z".into(),
                }),
            },
        );
        obj.metadata.namespace = Some("prod".into());
        obj.metadata.uid = Some(uid.into());
        obj
    }

    /// The stored version, origin and decrypted value of `prod/db`.
    fn stored(store: &Store, keyring: &Keyring) -> Option<(u64, String, String)> {
        let r = store.secret(&key())?;
        let data = crypto::open(
            keyring,
            &SecretIdentity {
                kind: Kind::Secret,
                namespace: &r.key.namespace,
                name: &r.key.name,
                version: r.version,
            },
            &r.envelope,
        )
        .unwrap();
        Some((
            r.version.get(),
            r.origin.clone().unwrap_or_default(),
            data.get("password").unwrap().expose().to_owned(),
        ))
    }

    fn open(dir: &std::path::Path, keyring: &Keyring) -> (Store, crate::store::OpenReport) {
        Store::open(dir, SharedKeyring::new(keyring.clone()), Default::default()).unwrap()
    }

    #[test]
    fn an_older_version_never_replaces_the_stored_one_but_a_recreated_object_does() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let labels = Labels::new();
        let (store, _) = open(dir.path(), &keyring);
        let v = |version: u64, uid: &str, value: &str| {
            Some((version, uid.to_owned(), value.to_owned()))
        };

        assert_eq!(
            apply(
                &sealed(&keyring, "uid-1", 2, "two"),
                &labels,
                &store,
                &keyring
            ),
            Some(key())
        );
        assert_eq!(stored(&store, &keyring), v(2, "uid-1", "two"));

        // An older version of the same object (a stale watch event, a re-list from a lagging
        // API server) is ignored, and the key still counts as present (no sweep).
        assert_eq!(
            apply(
                &sealed(&keyring, "uid-1", 1, "one"),
                &labels,
                &store,
                &keyring
            ),
            Some(key())
        );
        assert_eq!(stored(&store, &keyring), v(2, "uid-1", "two"));

        // Also after a restart (the store reopened from disk).
        drop(store);
        let (store, _) = open(dir.path(), &keyring);
        apply(
            &sealed(&keyring, "uid-1", 1, "one"),
            &labels,
            &store,
            &keyring,
        );
        assert_eq!(stored(&store, &keyring), v(2, "uid-1", "two"));

        // Newer versions move it forward.
        apply(
            &sealed(&keyring, "uid-1", 3, "three"),
            &labels,
            &store,
            &keyring,
        );
        assert_eq!(stored(&store, &keyring), v(3, "uid-1", "three"));

        // A recreated object (new uid) starts its own history at version 1.
        apply(
            &sealed(&keyring, "uid-2", 1, "fresh"),
            &labels,
            &store,
            &keyring,
        );
        assert_eq!(stored(&store, &keyring), v(1, "uid-2", "fresh"));
        // ... and the old object's versions no longer count.
        apply(
            &sealed(&keyring, "uid-1", 3, "three"),
            &labels,
            &store,
            &keyring,
        );
        assert_eq!(stored(&store, &keyring), v(3, "uid-1", "three"));
    }

    #[test]
    fn a_deselected_or_deleted_object_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring);
        let gpu = Labels::from([("gpu".to_owned(), "true".to_owned())]);
        let mut obj = sealed(&keyring, "uid-1", 1, "one");
        apply(&obj, &gpu, &store, &keyring);
        assert!(store.secret(&key()).is_some());

        obj.spec.node_selector = Some([("gpu".to_owned(), "false".to_owned())].into());
        assert_eq!(apply(&obj, &gpu, &store, &keyring), None);
        assert!(store.secret(&key()).is_none());

        obj.spec.node_selector = None;
        apply(&obj, &gpu, &store, &keyring);
        assert!(store.secret(&key()).is_some());
        obj.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        assert_eq!(apply(&obj, &gpu, &store, &keyring), None);
        assert!(store.secret(&key()).is_none());
    }
}
