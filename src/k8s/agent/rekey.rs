//! The node's store under the node's own key. An agent that takes its secrets from deliveries
//! holds no master keyring, so its store is sealed and authenticated under its node key
//! (`node.key`). A store an earlier version wrote under the master keyring (beside its cached
//! copy, `master.key`) is replaced once: moved aside, a new store begun that carries the old
//! one's audit anchor (so the audit chain goes on unbroken), then the old store and the cached
//! master keyring are deleted. Nothing in it is lost that the node cannot get back: its secrets
//! come back with its deliveries, its configs with its watch, and the operator remembers the
//! writes it carries. Resumable: a crash midway finds the store set aside and finishes.

use std::path::Path;

use crate::crypto::{Keyring, SharedKeyring};
use crate::store::{OpenOptions, OpenReport, Store, StoreError};

/// Where a master-keyed store is moved while it is replaced.
const ASIDE: &str = "store.master-keyed";
/// What a store is made of, in its data dir (see [`crate::store`]).
const STORE_PARTS: &[&str] = &["secrets", "configs", "store.manifest", "quarantine"];
const CACHED_KEYRING: &str = "master.key";

/// Opens `data_dir`'s store under `node_key`, replacing a master-keyed one (see the module).
pub fn open_node_store(
    data_dir: &Path,
    node_key: &Keyring,
    options: OpenOptions,
) -> Result<(Store, OpenReport), String> {
    let aside = data_dir.join(ASIDE);
    if !aside.exists() {
        match Store::open(data_dir, SharedKeyring::new(node_key.clone()), options) {
            Ok(opened) => {
                forget_master_keyring(data_dir);
                return Ok(opened);
            }
            Err(StoreError::ForeignKeyring { .. }) if data_dir.join(CACHED_KEYRING).exists() => {
                crate::store::create_private_dir(&aside).map_err(|e| e.to_string())?;
                for part in STORE_PARTS {
                    let from = data_dir.join(part);
                    if from.exists() {
                        std::fs::rename(&from, aside.join(part))
                            .map_err(|e| format!("cannot move {} aside: {e}", from.display()))?;
                    }
                }
                crate::store::fsync_dir(data_dir).map_err(|e| e.to_string())?;
            }
            Err(e) => return Err(e.to_string()),
        }
    }
    // The old store, opened with the cached master keyring for its audit anchor only.
    let master = std::fs::read(data_dir.join(CACHED_KEYRING))
        .map_err(|e| {
            format!(
                "the store set aside in {} needs {CACHED_KEYRING}: {e}",
                aside.display()
            )
        })
        .and_then(|b| Keyring::from_json(&zeroize::Zeroizing::new(b)).map_err(|e| e.to_string()))?;
    let (old, _) = Store::open(&aside, SharedKeyring::new(master), OpenOptions::default())
        .map_err(|e| format!("the store set aside in {}: {e}", aside.display()))?;
    let anchor = old.audit_anchor();
    drop(old);
    let (store, report) = Store::open(data_dir, SharedKeyring::new(node_key.clone()), options)
        .map_err(|e| e.to_string())?;
    if let Some(anchor) = anchor {
        store
            .record_audit_anchor(anchor)
            .map_err(|e| e.to_string())?;
    }
    std::fs::remove_dir_all(&aside)
        .map_err(|e| format!("cannot remove {}: {e}", aside.display()))?;
    forget_master_keyring(data_dir);
    tracing::info!(
        "the node's store is now sealed under this node's key; the store written under the master keyring and the cached keyring were removed (secrets come back with this node's deliveries)"
    );
    Ok((store, report))
}

/// Deletes the cached master keyring, overwritten first: this node no longer holds it.
fn forget_master_keyring(data_dir: &Path) {
    let path = data_dir.join(CACHED_KEYRING);
    let Ok(meta) = std::fs::metadata(&path) else {
        return;
    };
    let zeros = vec![0u8; meta.len() as usize];
    if let Err(e) = std::fs::write(&path, &zeros).and_then(|()| std::fs::remove_file(&path)) {
        tracing::error!(path = %path.display(), error = %e, "could not delete the cached master keyring; delete it by hand");
    } else {
        tracing::info!(path = %path.display(), "deleted the cached master keyring: this node holds only its own key");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditAnchor;

    #[test]
    fn a_master_keyed_store_is_replaced_keeping_its_audit_anchor() {
        let dir = tempfile::tempdir().unwrap();
        let master = Keyring::generate().unwrap();
        let node = Keyring::generate().unwrap();
        std::fs::write(dir.path().join(CACHED_KEYRING), master.to_json()).unwrap();
        let (old, _) = Store::open(
            dir.path(),
            SharedKeyring::new(master.clone()),
            OpenOptions::default(),
        )
        .unwrap();
        let anchor = AuditAnchor {
            seq: 41,
            hash: "ab".repeat(32),
        };
        old.record_audit_anchor(anchor.clone()).unwrap();
        drop(old);

        let (store, _) = open_node_store(dir.path(), &node, OpenOptions::default()).unwrap();
        assert_eq!(store.audit_anchor(), Some(anchor.clone()));
        assert!(
            !dir.path().join(CACHED_KEYRING).exists(),
            "the master keyring is gone"
        );
        assert!(!dir.path().join(ASIDE).exists());
        drop(store);
        // Opened again: under the node key, as it is.
        let (again, _) = open_node_store(dir.path(), &node, OpenOptions::default()).unwrap();
        assert_eq!(again.audit_anchor(), Some(anchor));
        // Another key (a node key lost) is refused, not replaced: there is no master keyring.
        drop(again);
        let other = Keyring::generate().unwrap();
        assert!(open_node_store(dir.path(), &other, OpenOptions::default()).is_err());
    }
}
