//! Keeps the node's store in step with its deliveries ([`crate::k8s::delivery`]): what the
//! operator sealed to this node's key is opened with the node key, sealed again under the
//! store's keyring and stored; what the operator says to drop, or leaves out of a whole set, is
//! removed. The agent needs no watch of ClawSecrets for it, and sees no other node's.
//!
//! The cursor is kept in memory only: after a restart the first answer is the node's whole set,
//! and what the store already holds at the same version is not opened again. An answer that
//! cannot be applied in full (a delivery that does not open, a store write that fails) keeps
//! the last cursor, so that what it brought is asked for again; until then the node keeps the
//! copies it has.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use super::deliveries::{DeliveryClient, FetchError};
use super::metrics::AgentMetrics;
use crate::crypto::{self, DeliveryScope, Keyring, SecretIdentity, SharedKeyring};
use crate::domain::{Kind, ObjectKey, Version};
use crate::k8s::convert;
use crate::k8s::delivery::{Delivery, NodeDeliveries, Removed};
use crate::k8s::names::object_name;
use crate::store::{Expect, Origin, SecretRecord, Store, StoreError};

/// How long one fetch waits for a change before asking again (the operator caps it at a minute;
/// a little less, so the API server's proxy never sees an idle request time out).
const WAIT: Duration = Duration::from_secs(50);

/// The pause after a fetch failed, doubled up to [`MAX_PAUSE`] while it keeps failing.
const FIRST_PAUSE: Duration = Duration::from_millis(500);
const MAX_PAUSE: Duration = Duration::from_secs(30);

/// What applying one answer did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Written to the store.
    pub stored: usize,
    /// Already held at that version: nothing opened, nothing written.
    pub held: usize,
    /// Dropped from the store.
    pub removed: usize,
    /// Could not be opened or stored: the node keeps its copy, and the answer is asked again.
    pub failed: usize,
}

/// The store key `d` is kept under (checked as a ClawSecret's would be).
pub fn key_of(d: &Delivery) -> Result<ObjectKey, String> {
    convert::secret_key_of(Some(&d.name), &d.object, Some(d.namespace.clone()))
        .map_err(|e| format!("delivery of {}/{}: {e}", d.namespace, d.object))
}

/// The record the node's store keeps for `d` under `key` ([`key_of`]): its data opened with
/// the node key and sealed under `store_keys`. Errors name the object, never a value.
pub fn record_of(
    key: ObjectKey,
    d: &Delivery,
    node: &str,
    node_key: &Keyring,
    store_keys: &Keyring,
) -> Result<SecretRecord, String> {
    let what = format!("delivery of {}/{}", d.namespace, d.object);
    let version =
        Version::new(d.version).ok_or_else(|| format!("{what}: version must be at least 1"))?;
    let time = |s: &str, field: &str| {
        s.parse()
            .map_err(|_| format!("{what}: {field} {s:?} is not an RFC 3339 time"))
    };
    let scope = DeliveryScope {
        node,
        namespace: &d.namespace,
        name: &d.object,
        version: d.version,
    };
    let data = crypto::open_delivery(node_key, &scope, &d.data)
        .map_err(|e| format!("{what} does not open with this node's key: {e}"))?;
    let identity = SecretIdentity {
        kind: Kind::Secret,
        namespace: &key.namespace,
        name: &key.name,
        version,
    };
    let envelope = crypto::seal(store_keys, &identity, &data)
        .map_err(|e| format!("{what}: sealing for the store failed: {e}"))?;
    Ok(SecretRecord {
        version,
        created_at: time(&d.created_at, "createdAt")?,
        updated_at: time(&d.updated_at, "updatedAt")?,
        allowed_workloads: convert::workloads(&d.allowed_workloads)
            .map_err(|e| format!("{what}: {e}"))?,
        envelope,
        origin: d
            .uid
            .as_deref()
            .map(|uid| Origin::of(uid, d.resource_version.as_deref())),
        writes: Vec::new(),
        generation: 0,
        key,
    })
}

/// Whether the store holds `d` already: the same object at the same version, with the same
/// workloads and seal time (so nothing needs opening).
fn held(store: &Store, key: &ObjectKey, d: &Delivery) -> bool {
    let same_object = |s: &SecretRecord| match (&s.origin, d.uid.as_deref()) {
        (Some(origin), Some(uid)) => origin.uid == *uid,
        (origin, uid) => origin.is_none() && uid.is_none(),
    };
    store.secret(key).is_some_and(|s| {
        same_object(&s)
            && s.version.get() == d.version
            && s.updated_at.to_string() == d.updated_at
            && s.allowed_workloads
                .iter()
                .map(|w| w.as_str())
                .eq(d.allowed_workloads.iter().map(String::as_str))
    })
}

/// Stores one delivery under `key`; `Ok(true)` if it was written, `Ok(false)` if it was held
/// already.
fn store_one(
    store: &Store,
    key: &ObjectKey,
    d: &Delivery,
    node: &str,
    node_key: &Keyring,
    store_keys: &Keyring,
) -> Result<bool, String> {
    if held(store, key, d) {
        return Ok(false);
    }
    let record = record_of(key.clone(), d, node, node_key, store_keys)?;
    match store.put_secret(record, Expect::Any) {
        Ok(_) => {
            tracing::info!(%key, version = d.version, "secret stored on this node");
            Ok(true)
        }
        // A later state of the object is stored already (this agent's own write): kept.
        Err(StoreError::Stale { .. }) => Ok(false),
        Err(e) => Err(format!("{key}: the store refused it: {e}")),
    }
}

/// The stored key a removal names: the entry of that namespace whose object name it is, if it
/// mirrors that very object (a re-created object under the same name has another uid).
fn stored_key_of(store: &Store, removed: &Removed) -> Option<ObjectKey> {
    store.secret_keys().into_iter().find(|k| {
        k.namespace.as_str() == removed.namespace
            && object_name(&k.name) == removed.object
            && match (&removed.uid, store.secret(k).and_then(|s| s.origin.clone())) {
                (Some(uid), Some(origin)) => origin.uid == **uid,
                _ => true,
            }
    })
}

/// Applies one answer to the store: a whole set replaces what the store holds, changes add,
/// replace and drop.
pub fn apply(
    store: &Store,
    answer: &NodeDeliveries,
    node_key: &Keyring,
    store_keys: &Keyring,
    metrics: &AgentMetrics,
) -> Applied {
    let mut applied = Applied::default();
    let mut delivered = HashSet::new();
    for d in &answer.secrets {
        let stored = key_of(d).and_then(|key| {
            // Not swept below, even if it fails: the node keeps its copy until it opens.
            delivered.insert(key.clone());
            store_one(store, &key, d, &answer.node, node_key, store_keys)
        });
        match stored {
            Ok(true) => {
                applied.stored += 1;
                if let Ok(changed) = d.updated_at.parse() {
                    metrics.mirrored("ClawSecret", changed);
                }
            }
            Ok(false) => applied.held += 1,
            Err(why) => {
                applied.failed += 1;
                metrics.mirror_failed("ClawSecret");
                tracing::warn!(reason = %why, "a delivery could not be stored; keeping this node's copy, if any");
            }
        }
    }
    let mut drop = |key: ObjectKey| match store.delete_secret(&key, Expect::Any, Vec::new()) {
        Ok(Some(_)) => {
            tracing::info!(%key, "secret removed from this node");
            applied.removed += 1;
        }
        Ok(None) => {}
        Err(e) => {
            tracing::error!(%key, error = %e, "could not remove a secret; asking again");
            applied.failed += 1;
        }
    };
    if answer.full {
        for key in store.secret_keys() {
            if !delivered.contains(&key) {
                drop(key);
            }
        }
    } else {
        for removed in &answer.removed {
            if let Some(key) = stored_key_of(store, removed) {
                drop(key);
            }
        }
    }
    applied
}

/// Follows the node's deliveries until the process ends.
pub async fn follow(
    client: DeliveryClient,
    store: Arc<Store>,
    node_key: Keyring,
    store_keys: SharedKeyring,
    metrics: Arc<AgentMetrics>,
) {
    let node_key = Arc::new(node_key);
    let our_key = node_key.active().id().to_string();
    let mut cursor: Option<String> = None;
    let mut pause = FIRST_PAUSE;
    let mut in_sync = false;
    loop {
        let answer = match client.fetch(cursor.as_deref(), WAIT).await {
            Ok(Some(answer)) => answer,
            Ok(None) => continue,
            Err(e) => {
                // The operator starting, or the node's key not published yet, is routine for a
                // while; only a lasting failure is worth a warning.
                if pause >= MAX_PAUSE || matches!(e, FetchError::Token { .. }) {
                    tracing::warn!(error = %e, "deliveries could not be fetched; the node keeps serving the copies it has");
                } else {
                    tracing::debug!(error = %e, "deliveries could not be fetched; retrying");
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(MAX_PAUSE);
                continue;
            }
        };
        if answer.node_key_id != our_key {
            // Sealed to a key this node had before (the operator has not seen the new ClawNode
            // yet): nothing in it opens. Asked again once it has.
            tracing::info!(sealed_to = %answer.node_key_id, ours = %our_key,
                "deliveries are sealed to another key of this node's; waiting for the operator to see the new one");
            cursor = None;
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
            continue;
        }
        let (store_c, node_key_c, keys, metrics_c) = (
            store.clone(),
            node_key.clone(),
            store_keys.current(),
            metrics.clone(),
        );
        let full = answer.full;
        let (applied, answer) = tokio::task::spawn_blocking(move || {
            let applied = apply(&store_c, &answer, &node_key_c, &keys, &metrics_c);
            (applied, answer)
        })
        .await
        .expect("applying deliveries does not panic");
        if applied.failed == 0 {
            cursor = Some(answer.etag);
            pause = FIRST_PAUSE;
            if full && !in_sync {
                in_sync = true;
                tracing::info!(
                    secrets = answer.secrets.len(),
                    "secrets in sync with this node's deliveries"
                );
            }
        } else {
            tracing::warn!(
                failed = applied.failed,
                "some deliveries could not be applied; asking again"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(MAX_PAUSE);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SealingPrivateKey;
    use crate::k8s::delivery::deliver;
    use crate::k8s::delivery::tests::sealed_secret;
    use crate::store::OpenOptions;

    struct Node {
        _dir: tempfile::TempDir,
        store: Store,
        key: Keyring,
        store_keys: Keyring,
    }

    fn node() -> Node {
        let dir = tempfile::tempdir().unwrap();
        let store_keys = Keyring::generate().unwrap();
        let (store, _) = Store::open(
            dir.path(),
            SharedKeyring::new(store_keys.clone()),
            OpenOptions::default(),
        )
        .unwrap();
        Node {
            _dir: dir,
            store,
            key: Keyring::generate().unwrap(),
            store_keys,
        }
    }

    fn answer(
        node: &Node,
        full: bool,
        secrets: Vec<Delivery>,
        removed: Vec<Removed>,
    ) -> NodeDeliveries {
        NodeDeliveries {
            node: "node-a".to_owned(),
            node_key_id: node.key.active().id().to_string(),
            etag: "v1.x.y.1".to_owned(),
            full,
            secrets,
            removed,
        }
    }

    fn password(node: &Node, name: &str) -> String {
        let key = ObjectKey::new(
            crate::domain::Namespace::parse("team-a").unwrap(),
            crate::domain::Name::parse(name).unwrap(),
        );
        let record = node.store.secret(&key).unwrap();
        let identity = SecretIdentity {
            kind: Kind::Secret,
            namespace: &key.namespace,
            name: &key.name,
            version: record.version,
        };
        let data = crypto::open(&node.store_keys, &identity, &record.envelope).unwrap();
        data.iter().next().unwrap().1.expose().to_owned()
    }

    #[test]
    fn deliveries_are_stored_under_the_stores_keys_and_dropped_when_told() {
        let master = Keyring::generate().unwrap();
        let a = node();
        let public = SealingPrivateKey::derive(a.key.active()).public_key();
        let metrics = AgentMetrics::default();
        let one = sealed_secret(&master, "one", "canary-1", None);
        let two = sealed_secret(&master, "two", "canary-2", None);
        let d1 = deliver("node-a", &public, &one, &master).unwrap();
        let d2 = deliver("node-a", &public, &two, &master).unwrap();

        let whole = answer(&a, true, vec![d1.clone(), d2.clone()], Vec::new());
        let applied = apply(&a.store, &whole, &a.key, &a.store_keys, &metrics);
        assert_eq!((applied.stored, applied.failed), (2, 0));
        assert_eq!(password(&a, "one"), "canary-1");
        // The same set again: held, nothing opened or written.
        let applied = apply(&a.store, &whole, &a.key, &a.store_keys, &metrics);
        assert_eq!((applied.stored, applied.held), (0, 2));

        // A change drops what it names, keeps the rest.
        let changes = answer(&a, false, Vec::new(), vec![Removed::of(&two)]);
        assert_eq!(
            apply(&a.store, &changes, &a.key, &a.store_keys, &metrics).removed,
            1
        );
        assert_eq!(a.store.secret_keys().len(), 1);
        // A removal of another object under the same name (another uid) keeps the copy.
        let mut other = Removed::of(&one);
        other.uid = Some("uid-of-a-recreated-one".to_owned());
        let changes = answer(&a, false, Vec::new(), vec![other]);
        assert_eq!(
            apply(&a.store, &changes, &a.key, &a.store_keys, &metrics).removed,
            0
        );
        // A whole set without `one`: swept.
        let whole = answer(&a, true, vec![d2], Vec::new());
        let applied = apply(&a.store, &whole, &a.key, &a.store_keys, &metrics);
        assert_eq!((applied.stored, applied.removed), (1, 1));
        assert_eq!(password(&a, "two"), "canary-2");
    }

    #[test]
    fn a_delivery_for_another_node_is_refused_and_the_copy_kept() {
        let master = Keyring::generate().unwrap();
        let (a, b) = (node(), node());
        let public_b = SealingPrivateKey::derive(b.key.active()).public_key();
        let metrics = AgentMetrics::default();
        let one = sealed_secret(&master, "one", "canary-1", None);
        let public_a = SealingPrivateKey::derive(a.key.active()).public_key();
        let mine = deliver("node-a", &public_a, &one, &master).unwrap();
        apply(
            &a.store,
            &answer(&a, true, vec![mine], Vec::new()),
            &a.key,
            &a.store_keys,
            &metrics,
        );
        // node-b's delivery of a newer version, replayed to node-a: it does not open (wrong key),
        // and a whole set that failed sweeps nothing.
        let mut newer = one.clone();
        newer.metadata.resource_version = Some("9".to_owned());
        newer.spec.sealed.as_mut().unwrap().seal_time = "2026-02-01T00:00:00Z".to_owned();
        let theirs = deliver("node-b", &public_b, &newer, &master).unwrap();
        let applied = apply(
            &a.store,
            &answer(&a, true, vec![theirs.clone()], Vec::new()),
            &a.key,
            &a.store_keys,
            &metrics,
        );
        assert_eq!((applied.stored, applied.failed, applied.removed), (0, 1, 0));
        assert_eq!(password(&a, "one"), "canary-1");
        // Relabelled as node-a's: the AAD binds the node, so it still does not open.
        let err = record_of(
            key_of(&theirs).unwrap(),
            &theirs,
            "node-a",
            &b.key,
            &a.store_keys,
        )
        .unwrap_err();
        assert!(err.contains("does not open"), "{err}");
        assert!(!err.contains("canary"), "{err}");
    }
}
