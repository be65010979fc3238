//! The node-local store: one file per secret or config, written atomically, served from memory.
//!
//! Layout under the data directory (directory 0700, files 0600):
//!
//! ```text
//! secrets/<sha256(namespace/name)>.json   metadata + base64 envelope (ciphertext only)
//! configs/<sha256(namespace/name)>.json   plain config data (configs are not encrypted)
//! quarantine/                             files that could not be read at start-up, kept
//! ```
//!
//! File names are hashes because seed names may be `.`/`..` or 253 characters long, which a
//! file name cannot hold; the real name is inside the file.

mod files;
mod records;

pub use files::{create_private_dir, write_atomic, write_private_file_atomic};
pub use records::{ConfigRecord, SecretRecord, WriteMark};

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use crate::domain::{Kind, NamePrefix, Namespace, ObjectKey};

/// Why the store could not do what was asked. Messages name paths, never data.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "store I/O failed on {path}: {source}; check the data directory's disk and permissions"
    )]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "refusing to replace {key} version {stored} with older version {offered}: versions only move forward"
    )]
    Stale {
        key: ObjectKey,
        stored: u64,
        offered: u64,
    },
}

impl StoreError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        StoreError::Io {
            path: path.to_owned(),
            source,
        }
    }
}

/// What start-up found besides valid entries.
#[derive(Debug, Default)]
pub struct OpenReport {
    pub secrets: usize,
    pub configs: usize,
    /// Temporary files of writes a crash interrupted; never acknowledged, so removed.
    pub removed_temp_files: usize,
    /// Files that could not be parsed, moved to `quarantine/` rather than deleted.
    pub quarantined: Vec<PathBuf>,
}

pub struct Store {
    secrets_dir: PathBuf,
    configs_dir: PathBuf,
    secrets: RwLock<BTreeMap<ObjectKey, Arc<SecretRecord>>>,
    configs: RwLock<BTreeMap<ObjectKey, Arc<ConfigRecord>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("secrets_dir", &self.secrets_dir)
            .finish_non_exhaustive()
    }
}

fn file_name(kind: Kind, key: &ObjectKey) -> String {
    let digest = Sha256::digest(format!("{}/{}/{}", kind.as_str(), key.namespace, key.name));
    format!("{}.json", crate::hex::encode(&digest))
}

impl Store {
    /// Opens (creating if needed) the store under `data_dir` and loads every entry into memory.
    pub fn open(data_dir: &Path) -> Result<(Store, OpenReport), StoreError> {
        create_private_dir(data_dir)?;
        let secrets_dir = data_dir.join("secrets");
        let configs_dir = data_dir.join("configs");
        let quarantine_dir = data_dir.join("quarantine");
        create_private_dir(&secrets_dir)?;
        create_private_dir(&configs_dir)?;
        let mut report = OpenReport::default();

        let secrets = files::load_dir(&secrets_dir, &quarantine_dir, &mut report, |bytes| {
            let rec = SecretRecord::from_file_bytes(bytes)?;
            Ok((rec.key.clone(), Arc::new(rec)))
        })?;
        let configs = files::load_dir(&configs_dir, &quarantine_dir, &mut report, |bytes| {
            let rec = ConfigRecord::from_file_bytes(bytes)?;
            Ok((rec.key.clone(), Arc::new(rec)))
        })?;
        report.secrets = secrets.len();
        report.configs = configs.len();
        Ok((
            Store {
                secrets_dir,
                configs_dir,
                secrets: RwLock::new(secrets),
                configs: RwLock::new(configs),
            },
            report,
        ))
    }

    pub fn secret(&self, key: &ObjectKey) -> Option<Arc<SecretRecord>> {
        self.secrets.read().unwrap().get(key).cloned()
    }

    pub fn config(&self, key: &ObjectKey) -> Option<Arc<ConfigRecord>> {
        self.configs.read().unwrap().get(key).cloned()
    }

    /// The secrets of `namespace` whose names start with `prefix`, sorted by name.
    pub fn list_secrets(
        &self,
        namespace: &Namespace,
        prefix: &NamePrefix,
    ) -> Vec<Arc<SecretRecord>> {
        list(&self.secrets.read().unwrap(), namespace, prefix)
    }

    /// The configs of `namespace` whose names start with `prefix`, sorted by name.
    pub fn list_configs(
        &self,
        namespace: &Namespace,
        prefix: &NamePrefix,
    ) -> Vec<Arc<ConfigRecord>> {
        list(&self.configs.read().unwrap(), namespace, prefix)
    }

    /// Every secret key held, in any namespace (the agent uses it to find what to delete).
    pub fn secret_keys(&self) -> Vec<ObjectKey> {
        self.secrets.read().unwrap().keys().cloned().collect()
    }

    /// Every config key held, in any namespace.
    pub fn config_keys(&self) -> Vec<ObjectKey> {
        self.configs.read().unwrap().keys().cloned().collect()
    }

    /// Durably writes `record`, then makes it visible. Refuses to replace a newer version of
    /// the same object (same origin); a recreated object starts its own history.
    /// Callers serialize writes to the same key; concurrent readers see the old or new record.
    pub fn put_secret(&self, record: SecretRecord) -> Result<Arc<SecretRecord>, StoreError> {
        if let Some(stored) = self.secret(&record.key)
            && stored.origin == record.origin
            && stored.version > record.version
        {
            return Err(StoreError::Stale {
                key: record.key.clone(),
                stored: stored.version.get(),
                offered: record.version.get(),
            });
        }
        let name = file_name(Kind::Secret, &record.key);
        write_atomic(&self.secrets_dir, &name, &record.to_file_bytes())?;
        let record = Arc::new(record);
        self.secrets
            .write()
            .unwrap()
            .insert(record.key.clone(), record.clone());
        Ok(record)
    }

    pub fn put_config(&self, record: ConfigRecord) -> Result<Arc<ConfigRecord>, StoreError> {
        let name = file_name(Kind::Config, &record.key);
        write_atomic(&self.configs_dir, &name, &record.to_file_bytes())?;
        let record = Arc::new(record);
        self.configs
            .write()
            .unwrap()
            .insert(record.key.clone(), record.clone());
        Ok(record)
    }

    /// Removes a secret's file (durably) and its entry. Returns the removed record.
    pub fn delete_secret(&self, key: &ObjectKey) -> Result<Option<Arc<SecretRecord>>, StoreError> {
        files::remove_durably(&self.secrets_dir, &file_name(Kind::Secret, key))?;
        Ok(self.secrets.write().unwrap().remove(key))
    }

    pub fn delete_config(&self, key: &ObjectKey) -> Result<Option<Arc<ConfigRecord>>, StoreError> {
        files::remove_durably(&self.configs_dir, &file_name(Kind::Config, key))?;
        Ok(self.configs.write().unwrap().remove(key))
    }
}

fn list<R>(
    map: &BTreeMap<ObjectKey, Arc<R>>,
    namespace: &Namespace,
    prefix: &NamePrefix,
) -> Vec<Arc<R>> {
    // Keys sort by namespace, then name: one namespace is a contiguous, name-sorted range.
    map.iter()
        .filter(|(k, _)| &k.namespace == namespace && prefix.matches(&k.name))
        .map(|(_, r)| r.clone())
        .collect()
}
