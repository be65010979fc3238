//! The `local` backend: the embedded encrypted store behind `claw-secrets dev`.
//!
//! Access rules in dev mode (the Kubernetes backend replaces them with TokenReview and
//! SubjectAccessReview):
//! - an admin token may run every command in every namespace;
//! - a workload token may read (`secret.get`, `secret.list`, `config.get`, `config.list`) in
//!   its own namespace, and `secret.get` only where the secret's `allowed_workloads` is empty
//!   or names it; `secret.list` shows it only the secrets it could read;
//! - any other token may do nothing.

pub mod tokens;

use hmac::{Hmac, Mac};
use jiff::{Timestamp, Unit};
use sha2::Sha256;
use std::sync::Arc;
use zeroize::Zeroizing;

use crate::crypto::{self, Keyring, SecretIdentity};
use crate::domain::{ErrorCode, Kind, Namespace, ObjectKey, Version};
use crate::invoke::{
    Backend, Caller, Command, ConfigCreate, ConfigMeta, ConfigUpdate, ConfigView, Deleted,
    InvokeError, ListParams, NameParams, Payload, SecretCreate, SecretMeta, SecretRotate,
    SecretView, Target, WriteRequest,
};
use crate::store::{ConfigRecord, SecretRecord, Store, StoreError, WriteMark};
use tokens::TokenStore;

pub struct LocalBackend {
    store: Arc<Store>,
    keyring: Keyring,
    tokens: TokenStore,
    /// Writes are serialized: each one checks its precondition and persists under this lock,
    /// so two writers never race on a version.
    write_lock: tokio::sync::Mutex<()>,
    /// Keys the fingerprints of idempotent writes (derived from the master key).
    fingerprint_key: Zeroizing<[u8; 32]>,
}

impl LocalBackend {
    pub fn new(store: Arc<Store>, keyring: Keyring, tokens: TokenStore) -> Self {
        let hk = hkdf::Hkdf::<Sha256>::new(None, &keyring_fingerprint_seed(&keyring));
        let mut fingerprint_key = Zeroizing::new([0u8; 32]);
        hk.expand(
            b"claw-secrets/v1/idempotency-fingerprint",
            fingerprint_key.as_mut(),
        )
        .expect("32 bytes is a valid HKDF output length");
        LocalBackend {
            store,
            keyring,
            tokens,
            write_lock: tokio::sync::Mutex::new(()),
            fingerprint_key,
        }
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    fn fingerprint(&self, write: &WriteRequest) -> String {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(self.fingerprint_key.as_ref())
            .expect("HMAC takes any key length");
        mac.update(&write.digest.0);
        crate::hex::encode(&mac.finalize().into_bytes())
    }

    fn mark(&self, write: &Option<WriteRequest>) -> Option<WriteMark> {
        write.as_ref().map(|w| WriteMark {
            idempotency_key: w.key.as_str().to_owned(),
            fingerprint: self.fingerprint(w),
        })
    }

    /// Whether `write` repeats the write that produced an entry marked `mark`.
    fn is_replay(
        &self,
        mark: &Option<WriteMark>,
        write: &Option<WriteRequest>,
    ) -> Result<bool, InvokeError> {
        let (Some(mark), Some(write)) = (mark, write) else {
            return Ok(false);
        };
        if mark.idempotency_key != write.key.as_str() {
            return Ok(false);
        }
        if mark.fingerprint != self.fingerprint(write) {
            return Err(InvokeError::invalid(format!(
                "idempotencyKey {:?} was already used for a different request; use a new key for a new request",
                write.key.as_str()
            )));
        }
        Ok(true)
    }
}

/// The master key of the active keyring entry seeds the fingerprint key, so fingerprints on
/// disk mean nothing without the keyring.
fn keyring_fingerprint_seed(keyring: &Keyring) -> Zeroizing<Vec<u8>> {
    Zeroizing::new(keyring.active().bytes().to_vec())
}

fn now() -> Timestamp {
    Timestamp::now()
        .round(Unit::Millisecond)
        .unwrap_or_else(|_| Timestamp::now())
}

fn denied(what: impl std::fmt::Display) -> InvokeError {
    InvokeError::new(ErrorCode::PermissionDenied, what.to_string())
}

fn not_found(kind: Kind, key: &ObjectKey) -> InvokeError {
    let what = if kind == Kind::Secret {
        "secret"
    } else {
        "config"
    };
    InvokeError::new(
        ErrorCode::NotFound,
        format!(
            "{what} {:?} does not exist in namespace {:?}",
            key.name.as_str(),
            key.namespace.as_str()
        ),
    )
}

fn store_error(e: StoreError) -> InvokeError {
    match e {
        StoreError::Stale { .. } => InvokeError::new(ErrorCode::Conflict, e.to_string()),
        StoreError::Io { .. } => InvokeError::new(ErrorCode::Unavailable, e.to_string()),
    }
}

/// Runs blocking store I/O off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, InvokeError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| InvokeError::internal("store task failed"))?
        .map_err(store_error)
}

impl LocalBackend {
    /// The namespace a command acts in: the one it names, else the caller's, else `default`.
    /// Non-admin callers are confined to their own namespace.
    fn namespace_for(
        &self,
        caller: &Caller,
        requested: Option<&Namespace>,
    ) -> Result<Namespace, InvokeError> {
        let own = caller.namespace.clone();
        let ns = requested
            .cloned()
            .or(own.clone())
            .unwrap_or_else(Namespace::default_namespace);
        if !caller.admin && own.as_ref() != Some(&ns) {
            return Err(denied(format!(
                "{} may not act in namespace {:?}: callers are confined to their own namespace",
                caller.subject,
                ns.as_str()
            )));
        }
        Ok(ns)
    }

    fn require_admin(&self, caller: &Caller, command: &str) -> Result<(), InvokeError> {
        if caller.admin {
            return Ok(());
        }
        Err(denied(format!(
            "{} may not run {command}: in dev mode only an admin token may create, change or delete; workload tokens may only read",
            caller.subject
        )))
    }

    async fn secret_create(
        &self,
        caller: &Caller,
        c: SecretCreate,
        write: Option<WriteRequest>,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        let key = ObjectKey::new(ns, c.name);
        target.namespace = Some(key.namespace.clone());
        target.name = Some(key.name.clone());
        self.require_admin(caller, "secret.create")?;
        let _guard = self.write_lock.lock().await;
        if let Some(existing) = self.store.secret(&key) {
            target.version = Some(existing.version);
            if self.is_replay(&existing.last_write, &write)? && existing.version == Version::FIRST {
                return Ok(Payload::SecretMeta(SecretMeta::of(&existing)));
            }
            return Err(InvokeError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "secret {:?} already exists in namespace {:?} (version {}); use secret.rotate to change its data",
                    key.name.as_str(),
                    key.namespace.as_str(),
                    existing.version
                ),
            ));
        }
        let version = Version::FIRST;
        target.version = Some(version);
        let envelope = crypto::seal(
            &self.keyring,
            &SecretIdentity {
                kind: Kind::Secret,
                namespace: &key.namespace,
                name: &key.name,
                version,
            },
            &c.data,
        )
        .map_err(|e| InvokeError::internal(format!("sealing failed: {e}")))?;
        drop(c.data);
        let at = now();
        let record = SecretRecord {
            key,
            version,
            created_at: at,
            updated_at: at,
            allowed_workloads: c.allowed_workloads,
            envelope,
            last_write: self.mark(&write),
            origin: None,
        };
        let store = self.store.clone();
        let stored = blocking(move || store.put_secret(record)).await?;
        Ok(Payload::SecretMeta(SecretMeta::of(&stored)))
    }

    fn secret_get(
        &self,
        caller: &Caller,
        c: NameParams,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        let key = ObjectKey::new(ns, c.name);
        target.namespace = Some(key.namespace.clone());
        target.name = Some(key.name.clone());
        let record = self
            .store
            .secret(&key)
            .ok_or_else(|| not_found(Kind::Secret, &key))?;
        target.version = Some(record.version);
        if !caller.admin {
            let permitted = caller
                .workload
                .as_ref()
                .is_some_and(|w| record.allowed_workloads.permits(w));
            if !permitted {
                return Err(denied(format!(
                    "{} may not read secret {:?}: its allowed_workloads do not include this workload",
                    caller.subject,
                    key.name.as_str()
                )));
            }
        }
        let data = crypto::open(
            &self.keyring,
            &SecretIdentity {
                kind: Kind::Secret,
                namespace: &key.namespace,
                name: &key.name,
                version: record.version,
            },
            &record.envelope,
        )
        .map_err(|e| {
            InvokeError::internal(format!(
                "secret {:?} could not be decrypted: {e}",
                key.name.as_str()
            ))
        })?;
        Ok(Payload::Secret(SecretView {
            meta: SecretMeta::of(&record),
            data,
        }))
    }

    async fn secret_rotate(
        &self,
        caller: &Caller,
        c: SecretRotate,
        write: Option<WriteRequest>,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        let key = ObjectKey::new(ns, c.name);
        target.namespace = Some(key.namespace.clone());
        target.name = Some(key.name.clone());
        self.require_admin(caller, "secret.rotate")?;
        let _guard = self.write_lock.lock().await;
        let existing = self
            .store
            .secret(&key)
            .ok_or_else(|| not_found(Kind::Secret, &key))?;
        target.version = Some(existing.version);
        if self.is_replay(&existing.last_write, &write)? {
            return Ok(Payload::SecretMeta(SecretMeta::of(&existing)));
        }
        let version = existing.version.next();
        target.version = Some(version);
        let envelope = crypto::seal(
            &self.keyring,
            &SecretIdentity {
                kind: Kind::Secret,
                namespace: &key.namespace,
                name: &key.name,
                version,
            },
            &c.new_data,
        )
        .map_err(|e| InvokeError::internal(format!("sealing failed: {e}")))?;
        drop(c.new_data);
        let record = SecretRecord {
            key,
            version,
            created_at: existing.created_at,
            updated_at: now(),
            allowed_workloads: existing.allowed_workloads.clone(),
            envelope,
            last_write: self.mark(&write),
            origin: None,
        };
        let store = self.store.clone();
        let stored = blocking(move || store.put_secret(record)).await?;
        tracing::info!(namespace = %stored.key.namespace, name = %stored.key.name,
            version = stored.version.get(), "secret rotated");
        Ok(Payload::SecretMeta(SecretMeta::of(&stored)))
    }

    async fn secret_delete(
        &self,
        caller: &Caller,
        c: NameParams,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        let key = ObjectKey::new(ns, c.name);
        target.namespace = Some(key.namespace.clone());
        target.name = Some(key.name.clone());
        self.require_admin(caller, "secret.delete")?;
        let _guard = self.write_lock.lock().await;
        let existing = self
            .store
            .secret(&key)
            .ok_or_else(|| not_found(Kind::Secret, &key))?;
        target.version = Some(existing.version);
        let store = self.store.clone();
        let k = key.clone();
        blocking(move || store.delete_secret(&k)).await?;
        Ok(Payload::Deleted(Deleted {
            name: key.name,
            namespace: key.namespace,
            deleted: true,
        }))
    }

    fn secret_list(
        &self,
        caller: &Caller,
        c: ListParams,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        target.namespace = Some(ns.clone());
        let secrets = self
            .store
            .list_secrets(&ns, &c.prefix)
            .iter()
            .filter(|r| {
                caller.admin
                    || caller
                        .workload
                        .as_ref()
                        .is_some_and(|w| r.allowed_workloads.permits(w))
            })
            .map(|r| SecretMeta::of(r))
            .collect();
        Ok(Payload::SecretList { secrets })
    }

    async fn config_create(
        &self,
        caller: &Caller,
        c: ConfigCreate,
        write: Option<WriteRequest>,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        let key = ObjectKey::new(ns, c.name);
        target.namespace = Some(key.namespace.clone());
        target.name = Some(key.name.clone());
        self.require_admin(caller, "config.create")?;
        let _guard = self.write_lock.lock().await;
        if let Some(existing) = self.store.config(&key) {
            if self.is_replay(&existing.last_write, &write)? {
                return Ok(Payload::ConfigMeta(ConfigMeta::of(&existing)));
            }
            return Err(InvokeError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "config {:?} already exists in namespace {:?}; use config.update to change it",
                    key.name.as_str(),
                    key.namespace.as_str()
                ),
            ));
        }
        let at = now();
        let record = ConfigRecord {
            key,
            data: c.data,
            immutable: c.immutable,
            created_at: at,
            updated_at: at,
            last_write: self.mark(&write),
            origin: None,
        };
        let store = self.store.clone();
        let stored = blocking(move || store.put_config(record)).await?;
        Ok(Payload::ConfigMeta(ConfigMeta::of(&stored)))
    }

    fn config_get(
        &self,
        caller: &Caller,
        c: NameParams,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        let key = ObjectKey::new(ns, c.name);
        target.namespace = Some(key.namespace.clone());
        target.name = Some(key.name.clone());
        let record = self
            .store
            .config(&key)
            .ok_or_else(|| not_found(Kind::Config, &key))?;
        Ok(Payload::Config(ConfigView {
            meta: ConfigMeta::of(&record),
            data: record.data.clone(),
        }))
    }

    async fn config_update(
        &self,
        caller: &Caller,
        c: ConfigUpdate,
        write: Option<WriteRequest>,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        let key = ObjectKey::new(ns, c.name);
        target.namespace = Some(key.namespace.clone());
        target.name = Some(key.name.clone());
        self.require_admin(caller, "config.update")?;
        let _guard = self.write_lock.lock().await;
        let existing = self
            .store
            .config(&key)
            .ok_or_else(|| not_found(Kind::Config, &key))?;
        if self.is_replay(&existing.last_write, &write)? {
            return Ok(Payload::ConfigMeta(ConfigMeta::of(&existing)));
        }
        if existing.immutable {
            return Err(InvokeError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "config {:?} is immutable: it cannot be modified after creation; delete it and create it again to change it",
                    key.name.as_str()
                ),
            ));
        }
        let record = ConfigRecord {
            key,
            data: c.data,
            immutable: c.immutable.unwrap_or(false),
            created_at: existing.created_at,
            updated_at: now(),
            last_write: self.mark(&write),
            origin: None,
        };
        let store = self.store.clone();
        let stored = blocking(move || store.put_config(record)).await?;
        Ok(Payload::ConfigMeta(ConfigMeta::of(&stored)))
    }

    async fn config_delete(
        &self,
        caller: &Caller,
        c: NameParams,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        let key = ObjectKey::new(ns, c.name);
        target.namespace = Some(key.namespace.clone());
        target.name = Some(key.name.clone());
        self.require_admin(caller, "config.delete")?;
        let _guard = self.write_lock.lock().await;
        if self.store.config(&key).is_none() {
            return Err(not_found(Kind::Config, &key));
        }
        let store = self.store.clone();
        let k = key.clone();
        blocking(move || store.delete_config(&k)).await?;
        Ok(Payload::Deleted(Deleted {
            name: key.name,
            namespace: key.namespace,
            deleted: true,
        }))
    }

    fn config_list(
        &self,
        caller: &Caller,
        c: ListParams,
        target: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = self.namespace_for(caller, c.namespace.as_ref())?;
        target.namespace = Some(ns.clone());
        let configs = self
            .store
            .list_configs(&ns, &c.prefix)
            .iter()
            .map(|r| ConfigMeta::of(r))
            .collect();
        Ok(Payload::ConfigList { configs })
    }
}

impl Backend for LocalBackend {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, InvokeError> {
        let token = bearer.filter(|t| !t.is_empty()).ok_or_else(|| {
            InvokeError::new(
                ErrorCode::Unauthenticated,
                "missing bearer token: send 'Authorization: Bearer <token>' (dev mode writes the admin token to <data-dir>/admin.token)",
            )
        })?;
        self.tokens.authenticate(token).ok_or_else(|| {
            InvokeError::new(
                ErrorCode::Unauthenticated,
                "the bearer token is not valid for this server",
            )
        })
    }

    async fn execute(
        &self,
        caller: &Caller,
        command: Command,
        write: Option<WriteRequest>,
    ) -> (Target, Result<Payload, InvokeError>) {
        let mut target = Target::default();
        let t = &mut target;
        let result = match command {
            Command::SecretCreate(c) => self.secret_create(caller, c, write, t).await,
            Command::SecretGet(c) => self.secret_get(caller, c, t),
            Command::SecretDelete(c) => self.secret_delete(caller, c, t).await,
            Command::SecretList(c) => self.secret_list(caller, c, t),
            Command::SecretRotate(c) => self.secret_rotate(caller, c, write, t).await,
            Command::ConfigCreate(c) => self.config_create(caller, c, write, t).await,
            Command::ConfigGet(c) => self.config_get(caller, c, t),
            Command::ConfigUpdate(c) => self.config_update(caller, c, write, t).await,
            Command::ConfigDelete(c) => self.config_delete(caller, c, t).await,
            Command::ConfigList(c) => self.config_list(caller, c, t),
        };
        (target, result)
    }
}
