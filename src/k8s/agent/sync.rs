//! Keeps the node's store in step with the cluster: every ClawSecret and ClawConfig this node
//! should hold is written to the store, everything else is removed from it, including what
//! was deleted while the agent was down (a re-list ends with a sweep of whatever it did not
//! see). A stored secret is never replaced by an older version of the same object.

use futures::StreamExt;
use futures::TryStreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::ResourceExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use tokio::sync::watch;

use super::metrics::AgentMetrics;
use crate::crypto::{Keyring, SharedKeyring};
use crate::domain::{Kind, Name, Namespace, ObjectKey};
use crate::k8s::convert::{self, selects};
use crate::k8s::crd::{ClawConfig, ClawSecret};
use crate::k8s::names::object_name;
use crate::store::{Expect, Origin, Store, StoreError};
use jiff::Timestamp;

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
    /// Writes the object into the store if it is newer than what the store holds (an invalid
    /// or not yet sealed object keeps the node's copy): `Ok(Some(when the object last
    /// changed))` if it wrote it, `Ok(None)` if there was nothing to write, `Err` for a write
    /// that failed and should be tried again. `keyring` opens the writes the object remembers
    /// (`None`: they are not kept, on a node whose writes the operator carries).
    fn store_it(
        &self,
        store: &Store,
        keyring: Option<&Keyring>,
    ) -> Result<Option<Timestamp>, StoreError>;
    /// Removes the key's entry, if `expect` holds (see `removal_expectation`).
    fn remove(key: &ObjectKey, store: &Store, expect: Expect) -> Removal;
    /// Every key the store holds of this kind, with its entry's generation.
    fn stored_generations(store: &Store) -> Vec<(ObjectKey, u64)>;
    /// The master key the object's current version is sealed under, if it is sealed.
    fn sealed_under(&self) -> Option<&str> {
        None
    }
    const KIND: &'static str;
}

/// Whether two entries mirror the same Kubernetes object (dev-mode entries have no origin).
fn same_object(a: Option<&Origin>, b: Option<&Origin>) -> bool {
    a.map(|o| &o.uid) == b.map(|o| &o.uid)
}

/// What a removal did.
#[derive(Debug, PartialEq, Eq)]
pub enum Removal {
    /// Removed, or there was nothing to remove.
    Done,
    /// The store holds a later object under the key (the event was a leftover): kept.
    KeptNewer,
    /// The removal failed (logged); the next re-list sweeps it.
    Failed,
}

/// The condition under which an event about `obj` may remove the stored entry: none is stored,
/// or it mirrors no later state than `obj` (a deleted object's late event must not remove its
/// re-created successor).
fn removal_expectation<K: Mirrored>(obj: &K) -> Expect {
    match convert::origin(obj.meta()) {
        Some(origin) => Expect::NoNewerThan(origin),
        None => Expect::Any,
    }
}

fn removal<R>(key: &ObjectKey, what: &str, result: Result<Option<R>, StoreError>) -> Removal {
    match result {
        Ok(Some(_)) => {
            tracing::info!(%key, "{what} removed from this node");
            Removal::Done
        }
        Ok(None) => Removal::Done,
        Err(e @ StoreError::Stale { .. }) => {
            tracing::debug!(error = %e, "ignoring a removal older than the stored copy");
            Removal::KeptNewer
        }
        Err(e) => {
            tracing::error!(%key, error = %e, "could not remove {what}");
            Removal::Failed
        }
    }
}

impl Mirrored for ClawSecret {
    const KIND: &'static str = "ClawSecret";

    fn key(&self) -> Option<ObjectKey> {
        convert::secret_key(self).ok()
    }

    fn node_selector(&self) -> Option<&BTreeMap<String, String>> {
        self.spec.node_selector.as_ref()
    }

    fn store_it(
        &self,
        store: &Store,
        keyring: Option<&Keyring>,
    ) -> Result<Option<Timestamp>, StoreError> {
        let writes = match (convert::secret_key(self), keyring) {
            (Ok(key), Some(keyring)) => {
                convert::remembered_writes(&self.metadata, Kind::Secret, &key, keyring)
            }
            _ => Vec::new(),
        };
        let record = match convert::secret_record(self, writes) {
            Ok(Some(r)) => r,
            // Not sealed yet: keep whatever version this node already has.
            Ok(None) => return Ok(None),
            Err(e) => {
                tracing::warn!(namespace = ?self.namespace(), object = %self.name_any(), reason = e.reason,
                    error = %e, "ClawSecret is invalid; keeping this node's copy, if any");
                return Ok(None);
            }
        };
        // Nothing to write if only the object's resourceVersion moved (a status update).
        if let Some(stored) = store.secret(&record.key)
            && same_object(stored.origin.as_ref(), record.origin.as_ref())
            && stored.version == record.version
            && stored.envelope == record.envelope
            && stored.allowed_workloads == record.allowed_workloads
            && stored.writes == record.writes
        {
            return Ok(None);
        }
        let key = record.key.clone();
        let version = record.version;
        let changed = record.updated_at;
        match store.put_secret(record, Expect::Any) {
            Ok(_) => {
                tracing::info!(%key, version = version.get(), "secret stored on this node");
                Ok(Some(changed))
            }
            // An older version, or a leftover of a deleted object whose successor is stored
            // (the store decides, under its lock, by uid, resourceVersion and version), or a
            // newer version arrived meanwhile (this agent's own write): nothing to do.
            Err(e @ StoreError::Stale { .. }) => {
                tracing::debug!(error = %e, "ignoring an event older than the stored copy");
                Ok(None)
            }
            Err(e) => {
                tracing::error!(%key, error = %e, "could not store secret; retrying");
                Err(e)
            }
        }
    }

    fn remove(key: &ObjectKey, store: &Store, expect: Expect) -> Removal {
        removal(key, "secret", store.delete_secret(key, expect, Vec::new()))
    }

    fn stored_generations(store: &Store) -> Vec<(ObjectKey, u64)> {
        store.secret_generations()
    }

    fn sealed_under(&self) -> Option<&str> {
        self.spec.sealed.as_ref().map(|s| s.key_id.as_str())
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

    fn store_it(
        &self,
        store: &Store,
        keyring: Option<&Keyring>,
    ) -> Result<Option<Timestamp>, StoreError> {
        // Only data the operator accepted (validated, and timestamped in status.acceptedTime,
        // the config's updatedAt) is delivered; until then a node keeps the copy it has.
        let accepted = self
            .status
            .as_ref()
            .and_then(|s| s.accepted_data_hash.as_deref());
        if accepted != Some(convert::data_hash(&self.spec.data).as_str()) {
            return Ok(None);
        }
        let writes = match (convert::config_key(self), keyring) {
            (Ok(key), Some(keyring)) => {
                convert::remembered_writes(&self.metadata, Kind::Config, &key, keyring)
            }
            _ => Vec::new(),
        };
        let record = match convert::config_record(self, writes) {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(object = %self.name_any(), error = %e, "ClawConfig is invalid; keeping this node's copy, if any");
                return Ok(None);
            }
        };
        if let Some(stored) = store.config(&record.key)
            && same_object(stored.origin.as_ref(), record.origin.as_ref())
            && stored.data == record.data
            && stored.immutable == record.immutable
            && stored.updated_at == record.updated_at
            && stored.writes == record.writes
        {
            return Ok(None);
        }
        let key = record.key.clone();
        let changed = record.updated_at;
        match store.put_config(record, Expect::Any) {
            Ok(_) => {
                tracing::info!(%key, "config stored on this node");
                Ok(Some(changed))
            }
            Err(e @ StoreError::Stale { .. }) => {
                tracing::debug!(error = %e, "ignoring an event older than the stored copy");
                Ok(None)
            }
            Err(e) => {
                tracing::error!(%key, error = %e, "could not store config; retrying");
                Err(e)
            }
        }
    }

    fn remove(key: &ObjectKey, store: &Store, expect: Expect) -> Removal {
        removal(key, "config", store.delete_config(key, expect, Vec::new()))
    }

    fn stored_generations(store: &Store) -> Vec<(ObjectKey, u64)> {
        store.config_generations()
    }
}

/// What applying one object did.
#[derive(Debug, PartialEq, Eq)]
enum Applied {
    /// It belongs on this node, and was written to the store now; it had last changed then.
    Stored(ObjectKey, Timestamp),
    /// It belongs on this node, and the store holds it already (or keeps its copy).
    Held(ObjectKey),
    /// It belongs on this node, but writing it failed: try again.
    Failed(ObjectKey),
    /// It does not belong here (or cannot be named); removed if it was held.
    Removed,
}

impl Applied {
    /// The key, if the object belongs on this node (a failed write still does: no sweep).
    fn key(self) -> Option<ObjectKey> {
        match self {
            Applied::Stored(k, _) | Applied::Held(k) | Applied::Failed(k) => Some(k),
            Applied::Removed => None,
        }
    }
}

/// Applies one object: stored if it belongs on this node, removed otherwise.
fn apply<K: Mirrored>(
    obj: &K,
    labels: &Labels,
    store: &Store,
    keyring: Option<&Keyring>,
) -> Applied {
    let Some(key) = obj.key() else {
        return Applied::Removed;
    };
    let being_deleted = obj.meta().deletion_timestamp.is_some();
    if being_deleted || !selects(obj.node_selector(), labels) {
        return match K::remove(&key, store, removal_expectation(obj)) {
            Removal::KeptNewer => Applied::Held(key),
            Removal::Done | Removal::Failed => Applied::Removed,
        };
    }
    // Sealed under a master key this node does not hold yet (a new active key, re-encryption,
    // seen before the keyring itself: both come by watches): keep serving the copy, which
    // the retired key still opens, and try again once the keyring has followed.
    if let (Some(keyring), Some(id)) = (keyring, obj.sealed_under())
        && !keyring.key_ids().any(|held| held.as_str() == id)
    {
        tracing::debug!(%key, key_id = id, "sealed under a master key this node does not hold yet; keeping its copy until the keyring follows");
        return Applied::Failed(key);
    }
    match obj.store_it(store, keyring) {
        Ok(Some(changed)) => Applied::Stored(key, changed),
        Ok(None) => Applied::Held(key),
        Err(_) => Applied::Failed(key),
    }
}

/// At the end of a (re-)list: whatever the store holds that the list did not show was deleted
/// (or deselected) while the agent was not watching, and is removed; but only an entry written
/// before the list began (generation below `began`), and only as it was then. An entry written
/// since (this agent's own write through node.invoke, an object created after the list's
/// snapshot) is newer than the list: removing it would make a secret the agent just held
/// answer NOT_FOUND until its watch event came back.
fn sweep<K: Mirrored>(store: &Store, seen: &HashSet<ObjectKey>, began: u64) {
    for (key, generation) in K::stored_generations(store) {
        if generation < began && !seen.contains(&key) {
            K::remove(&key, store, Expect::Generation(generation));
        }
    }
}

/// An object the watch delivered that this version cannot read: logged (types only, never a
/// value), and its key, when its object name gives it, so the node keeps its copy (a hashed
/// object name needs `spec.name`, which could not be read: that copy is swept).
fn unreadable<K: Mirrored>(
    invalid: &kube::core::error_boundary::InvalidObject,
) -> Option<ObjectKey> {
    let meta = &invalid.metadata;
    tracing::warn!(kind = K::KIND, namespace = ?meta.namespace, object = ?meta.name,
        error = %crate::invoke::withhold_quoted(&invalid.error),
        "object cannot be read by this agent; keeping this node's copy, if any");
    let name = Name::parse(meta.name.as_deref()?).ok()?;
    let namespace = Namespace::parse(meta.namespace.as_deref()?).ok()?;
    (object_name(&name) == name.as_str()).then(|| ObjectKey::new(namespace, name))
}

/// The object, or (unreadable) the key whose copy the node keeps.
fn readable<K: Mirrored>(guard: DeserializeGuard<K>) -> Result<K, Option<ObjectKey>> {
    guard.0.map_err(|invalid| unreadable::<K>(&invalid))
}

/// How often writes that failed are tried again.
const RETRY_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Mirrors one kind until the process ends; restarts (re-lists) whenever the labels change.
pub async fn mirror<K>(
    client: kube::Client,
    store: Arc<Store>,
    keys: Option<SharedKeyring>,
    metrics: Arc<AgentMetrics>,
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
        // Guarded: one object this version cannot read is skipped (its copy kept), and the
        // watch and every other object go on.
        let api: Api<DeserializeGuard<K>> = Api::all(client.clone());
        let mut stream = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .map_ok(|event| match event {
                Event::Apply(g) => Event::Apply(readable::<K>(g)),
                Event::InitApply(g) => Event::InitApply(readable::<K>(g)),
                Event::Delete(g) => Event::Delete(readable::<K>(g)),
                Event::Init => Event::Init,
                Event::InitDone => Event::InitDone,
            })
            .boxed();
        let mut listed: HashSet<ObjectKey> = HashSet::new();
        // The store's next generation when the current list began (see `sweep`).
        let mut list_began: Option<u64> = None;
        // Objects whose store write failed, by key: written again every RETRY_EVERY, until it
        // succeeds or a newer event for the key supersedes them.
        let mut failed: HashMap<ObjectKey, K> = HashMap::new();
        let mut retry = tokio::time::interval(RETRY_EVERY);
        loop {
            tokio::select! {
                changed = labels_rx.changed() => {
                    if changed.is_err() { return; }
                    tracing::info!(kind = K::KIND, "node labels changed; re-listing");
                    break;
                }
                _ = retry.tick(), if !failed.is_empty() => {
                    let (store, labels, keyring) = (store.clone(), labels.clone(), keys.as_ref().map(SharedKeyring::current));
                    let pending = std::mem::take(&mut failed);
                    failed = blocking(move || {
                        pending
                            .into_iter()
                            .filter(|(_, obj)| matches!(apply(obj, &labels, &store, keyring.as_deref()), Applied::Failed(_)))
                            .collect()
                    })
                    .await;
                }
                event = stream.next() => {
                    let Some(event) = event else { return };
                    let store = store.clone();
                    let labels = labels.clone();
                    let keyring = keys.as_ref().map(SharedKeyring::current);
                    match event {
                        Ok(Event::Init) => {
                            listed.clear();
                            list_began = Some(store.next_generation());
                        }
                        Ok(Event::InitApply(Err(kept))) => {
                            listed.extend(kept);
                        }
                        Ok(Event::InitApply(Ok(obj))) => {
                            let (applied, obj) = blocking(move || (apply(&obj, &labels, &store, keyring.as_deref()), obj)).await;
                            note(&mut failed, &applied, obj, &metrics);
                            if let Some(k) = applied.key() {
                                listed.insert(k);
                            }
                        }
                        Ok(Event::InitDone) => {
                            let seen = std::mem::take(&mut listed);
                            let began = list_began.take().unwrap_or(u64::MAX);
                            blocking(move || sweep::<K>(&store, &seen, began)).await;
                            tracing::info!(kind = K::KIND, "in sync with the API server");
                        }
                        Ok(Event::Apply(Err(_))) => {}
                        Ok(Event::Apply(Ok(obj))) => {
                            let (applied, obj) = blocking(move || (apply(&obj, &labels, &store, keyring.as_deref()), obj)).await;
                            note(&mut failed, &applied, obj, &metrics);
                        }
                        Ok(Event::Delete(guarded)) => {
                            let (key, expect) = match guarded {
                                Ok(obj) => (obj.key(), removal_expectation(&obj)),
                                Err(kept) => (kept, Expect::Any),
                            };
                            if let Some(key) = key {
                                failed.remove(&key);
                                blocking(move || K::remove(&key, &store, expect)).await;
                            }
                        }
                        Err(e) => tracing::debug!(kind = K::KIND, error = %e, "watch interrupted; retrying"),
                    }
                }
            }
        }
    }
}

/// Keeps `obj` for another try if its write failed; forgets an earlier failure of its key
/// otherwise (this event supersedes it). Counts what happened.
fn note<K: Mirrored>(
    failed: &mut HashMap<ObjectKey, K>,
    applied: &Applied,
    obj: K,
    metrics: &AgentMetrics,
) {
    match applied {
        Applied::Failed(key) => {
            metrics.mirror_failed(K::KIND);
            failed.insert(key.clone(), obj);
        }
        Applied::Stored(key, changed) => {
            metrics.mirrored(K::KIND, *changed);
            failed.remove(key);
        }
        Applied::Held(key) => {
            failed.remove(key);
        }
        Applied::Removed => {}
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

    /// A ClawSecret `prod/db` with object uid `uid` at resourceVersion `rv`, sealed as `version`
    /// of `value`.
    fn sealed(keyring: &Keyring, uid: &str, rv: u64, version: u64, value: &str) -> ClawSecret {
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
                encrypted_data: None,
                allowed_workloads: vec![],
                node_selector: None,
                sealed: Some(SealedData {
                    version,
                    key_id: envelope.key_id().to_string(),
                    envelope: B64.encode(envelope.to_bytes()),
                    seal_time: "2025-01-01T00:00:00Z".into(),
                    data_digest: None,
                }),
            },
        );
        obj.metadata.namespace = Some("prod".into());
        obj.metadata.uid = Some(uid.into());
        obj.metadata.resource_version = Some(rv.to_string());
        obj
    }

    /// `obj` with its deletion in progress.
    fn deleting(mut obj: ClawSecret) -> ClawSecret {
        obj.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(Timestamp::now()),
        );
        obj
    }

    /// What `stored` returns for `version` of object `uid` holding `value`.
    fn v(version: u64, uid: &str, value: &str) -> Option<(u64, String, String)> {
        Some((version, uid.to_owned(), value.to_owned()))
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
            r.origin
                .as_ref()
                .map(|o| o.uid.to_string())
                .unwrap_or_default(),
            data.get("password").unwrap().expose().to_owned(),
        ))
    }

    fn open(dir: &std::path::Path, keyring: &Keyring) -> (Store, crate::store::OpenReport) {
        Store::open(dir, SharedKeyring::new(keyring.clone()), Default::default()).unwrap()
    }

    /// Issue 18: an agent may see a ClawSecret re-encrypted under a new master key before it
    /// has the new keyring (both arrive by watches). It keeps serving its copy (the same data,
    /// under the retired key it still holds) and takes the new envelope once it has the key,
    /// rather than store what it cannot open.
    #[test]
    fn a_version_under_a_key_not_held_yet_keeps_the_copy_until_the_key_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let old = Keyring::generate().unwrap();
        let labels = Labels::new();
        let (store, _) = open(dir.path(), &old);
        let first = apply(
            &sealed(&old, "uid-1", 10, 1, "one"),
            &labels,
            &store,
            Some(&old),
        );
        assert!(matches!(first, Applied::Stored(..)), "{first:?}");

        let mut new = old.clone();
        new.rotate_to(crate::crypto::MasterKey::generate().unwrap());
        let resealed = sealed(&new, "uid-1", 11, 1, "one");
        // The keyring held is still the old one: the copy stays, and the object is retried.
        assert_eq!(
            apply(&resealed, &labels, &store, Some(&old)),
            Applied::Failed(key())
        );
        assert_eq!(stored(&store, &old), v(1, "uid-1", "one"));
        // Once the new keyring is held, the new envelope is stored.
        assert!(matches!(
            apply(&resealed, &labels, &store, Some(&new)),
            Applied::Stored(..)
        ));
        assert_eq!(
            store.secret(&key()).unwrap().envelope.key_id(),
            new.active().id()
        );
        assert_eq!(stored(&store, &new), v(1, "uid-1", "one"));
    }

    #[test]
    fn an_older_version_never_replaces_the_stored_one() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let labels = Labels::new();
        let (store, _) = open(dir.path(), &keyring);
        let db = |uid: &str, rv: u64, version: u64, value: &str| {
            sealed(&keyring, uid, rv, version, value)
        };

        // Written now: stored, with when it last changed (its sealTime).
        let first = apply(&db("uid-1", 10, 2, "two"), &labels, &store, Some(&keyring));
        assert!(
            matches!(first, Applied::Stored(ref k, _) if *k == key()),
            "{first:?}"
        );
        assert_eq!(stored(&store, &keyring), v(2, "uid-1", "two"));

        // An older version of the same object (a stale watch event, a re-list from a lagging
        // API server) is ignored, and the key still counts as present (no sweep).
        let older = db("uid-1", 5, 1, "one");
        assert_eq!(
            apply(&older, &labels, &store, Some(&keyring)),
            Applied::Held(key())
        );
        assert_eq!(stored(&store, &keyring), v(2, "uid-1", "two"));
        // Also when its resourceVersion cannot be compared: the version decides.
        let mut unnumbered = db("uid-1", 0, 1, "one");
        unnumbered.metadata.resource_version = Some("opaque".into());
        assert_eq!(
            apply(&unnumbered, &labels, &store, Some(&keyring)),
            Applied::Held(key())
        );
        assert_eq!(stored(&store, &keyring), v(2, "uid-1", "two"));

        // Also after a restart (the store reopened from disk).
        drop(store);
        let (store, _) = open(dir.path(), &keyring);
        apply(&older, &labels, &store, Some(&keyring));
        assert_eq!(stored(&store, &keyring), v(2, "uid-1", "two"));

        // Newer versions move it forward.
        apply(
            &db("uid-1", 20, 3, "three"),
            &labels,
            &store,
            Some(&keyring),
        );
        assert_eq!(stored(&store, &keyring), v(3, "uid-1", "three"));
    }

    /// The end of a re-list removes what the list did not show, but not what was stored after
    /// the list began: an object created since (or this agent's own write) answered NOT_FOUND
    /// until its watch event came back (seen in a cluster test: reads of secrets the agent had
    /// just written failed during a long re-list).
    #[test]
    fn a_relist_sweeps_only_what_was_stored_before_it_began() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let labels = Labels::new();
        let (store, _) = open(dir.path(), &keyring);
        // Held before the list began, and not in the list: deleted while not watched.
        apply(
            &sealed(&keyring, "uid-1", 10, 1, "one"),
            &labels,
            &store,
            Some(&keyring),
        );
        let began = store.next_generation();
        // Stored after the list began, and not in its snapshot.
        let mut fresh = sealed(&keyring, "uid-2", 20, 1, "two");
        fresh.metadata.name = Some("cache".into());
        let fresh_key = fresh.key().unwrap();
        assert!(matches!(
            apply(&fresh, &labels, &store, Some(&keyring)),
            Applied::Stored(..)
        ));

        sweep::<ClawSecret>(&store, &HashSet::new(), began);
        assert!(
            store.secret(&key()).is_none(),
            "not listed, held before: swept"
        );
        assert!(
            store.secret(&fresh_key).is_some(),
            "stored after the list began: kept"
        );
        // The next list shows it, or the one after removes it.
        sweep::<ClawSecret>(&store, &HashSet::new(), store.next_generation());
        assert!(store.secret(&fresh_key).is_none());
    }

    #[test]
    fn a_deleted_object_never_overwrites_or_removes_its_recreated_successor() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let labels = Labels::new();
        let (store, _) = open(dir.path(), &keyring);
        let db = |uid: &str, rv: u64, version: u64, value: &str| {
            sealed(&keyring, uid, rv, version, value)
        };
        apply(
            &db("uid-1", 20, 3, "three"),
            &labels,
            &store,
            Some(&keyring),
        );

        // Deleted at resourceVersion 25 and re-created (uid-2, 30), its history starting at 1:
        // stored, although its version is lower (the deletion may never have been seen).
        apply(
            &db("uid-2", 30, 1, "fresh"),
            &labels,
            &store,
            Some(&keyring),
        );
        assert_eq!(stored(&store, &keyring), v(1, "uid-2", "fresh"));

        // The predecessor's leftovers (a lagging API server's re-list, an event delivered
        // late) change nothing, and the key still counts as present: an update...
        let leftover = db("uid-1", 20, 3, "three");
        assert_eq!(
            apply(&leftover, &labels, &store, Some(&keyring)),
            Applied::Held(key())
        );
        assert_eq!(stored(&store, &keyring), v(1, "uid-2", "fresh"));
        // ... its deletion in progress, or a selector that no longer picks this node ...
        let being_deleted = deleting(db("uid-1", 25, 3, "three"));
        assert_eq!(
            apply(&being_deleted, &labels, &store, Some(&keyring)),
            Applied::Held(key())
        );
        let mut deselected = db("uid-1", 22, 3, "three");
        deselected.spec.node_selector = Some([("gpu".to_owned(), "true".to_owned())].into());
        assert_eq!(
            apply(&deselected, &labels, &store, Some(&keyring)),
            Applied::Held(key())
        );
        // ... and its Delete event.
        assert_eq!(
            ClawSecret::remove(&key(), &store, removal_expectation(&being_deleted)),
            Removal::KeptNewer
        );
        assert_eq!(stored(&store, &keyring), v(1, "uid-2", "fresh"));

        // What decides is kept on disk: the same after a restart.
        drop(store);
        let (store, _) = open(dir.path(), &keyring);
        assert_eq!(
            apply(&leftover, &labels, &store, Some(&keyring)),
            Applied::Held(key())
        );
        assert_eq!(stored(&store, &keyring), v(1, "uid-2", "fresh"));

        // The successor's own deletion removes it.
        let deleted = deleting(db("uid-2", 31, 1, "fresh"));
        assert_eq!(
            apply(&deleted, &labels, &store, Some(&keyring)),
            Applied::Removed
        );
        assert_eq!(stored(&store, &keyring), None);
    }

    #[test]
    fn a_recreated_object_replaces_an_entry_written_before_revisions_were_kept() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let labels = Labels::new();
        let (store, _) = open(dir.path(), &keyring);
        // An entry from an agent that kept only the uid: nothing says which object came
        // later, so a new uid is taken as the re-created object (as before).
        let mut old = sealed(&keyring, "uid-1", 20, 3, "three");
        old.metadata.resource_version = None;
        apply(&old, &labels, &store, Some(&keyring));
        apply(
            &sealed(&keyring, "uid-2", 30, 1, "fresh"),
            &labels,
            &store,
            Some(&keyring),
        );
        assert_eq!(stored(&store, &keyring), v(1, "uid-2", "fresh"));
    }

    #[test]
    fn an_unreadable_object_keeps_its_copy_and_its_value_out_of_messages() {
        let object = |name: &str| {
            serde_json::json!({
                "apiVersion": "clawbernetes.io/v1beta1",
                "kind": "ClawSecret",
                "metadata": {"name": name, "namespace": "prod"},
                "spec": {"sealed": {"version": "canary-4711", "keyId": "k", "envelope": "", "sealTime": ""}},
            })
        };
        let guard: DeserializeGuard<ClawSecret> = serde_json::from_value(object("db")).unwrap();
        let invalid = guard.0.as_ref().unwrap_err().clone();
        assert!(invalid.error.contains("canary"), "{}", invalid.error);
        assert!(!crate::invoke::withhold_quoted(&invalid.error).contains("canary"));
        assert_eq!(readable::<ClawSecret>(guard).err(), Some(Some(key())));
        // A hashed object name cannot be mapped back without spec.name.
        let hashed = object_name(&Name::parse("under_score").unwrap());
        let guard: DeserializeGuard<ClawSecret> = serde_json::from_value(object(&hashed)).unwrap();
        assert_eq!(readable::<ClawSecret>(guard).err(), Some(None));
    }

    #[test]
    fn a_deselected_or_deleted_object_is_removed() {
        let dir = tempfile::tempdir().unwrap();
        let keyring = Keyring::generate().unwrap();
        let (store, _) = open(dir.path(), &keyring);
        let gpu = Labels::from([("gpu".to_owned(), "true".to_owned())]);
        let mut obj = sealed(&keyring, "uid-1", 1, 1, "one");
        apply(&obj, &gpu, &store, Some(&keyring));
        assert!(store.secret(&key()).is_some());

        obj.spec.node_selector = Some([("gpu".to_owned(), "false".to_owned())].into());
        assert_eq!(apply(&obj, &gpu, &store, Some(&keyring)), Applied::Removed);
        assert!(store.secret(&key()).is_none());

        obj.spec.node_selector = None;
        apply(&obj, &gpu, &store, Some(&keyring));
        assert!(store.secret(&key()).is_some());
        obj.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
        );
        assert_eq!(apply(&obj, &gpu, &store, Some(&keyring)), Applied::Removed);
        assert!(store.secret(&key()).is_none());
    }
}
