//! The `local` backend of `claw-secrets dev`: the command core's two seams on one machine.
//!
//! - [`TokenAuthorizer`]: callers are bearer tokens of the tokens file. An admin token may do
//!   everything in every namespace; a workload token may read configs of its own namespace
//!   (`get`, `list`). The core adds the product's own rule on top: a workload reads the secrets
//!   of its namespace that list it (or list no one), and lists just those. Anything else is
//!   refused.
//! - [`StoreRepository`]: the node store is the source of truth; writes are checked against the
//!   entry's store generation, under the store's write lock.

mod principal;
pub mod tokens;

pub use principal::TokensPrincipal;

use std::sync::Arc;

use crate::domain::{ErrorCode, ObjectKey};
use crate::invoke::{
    Access, Authorizer, Caller, Current, CurrentConfig, CurrentSecret, Decision, InvokeError,
    Repository, Resource, Revision, Verb,
};
use crate::store::{ConfigRecord, Expect, Lookup, SecretRecord, Store, StoreError, WriteRecord};
use tokens::TokenStore;

/// Dev mode's authorizer: the tokens file.
pub struct TokenAuthorizer {
    tokens: Arc<TokenStore>,
}

/// How often the tokens file is checked for edits: a revoked token stops working within it.
pub const TOKENS_REFRESH: std::time::Duration = std::time::Duration::from_millis(250);

impl TokenAuthorizer {
    /// Authenticates against `tokens`, which a background task keeps current (start
    /// [`TokenStore::refresh_every`] with [`TOKENS_REFRESH`] beside the server).
    pub fn new(tokens: Arc<TokenStore>) -> Self {
        TokenAuthorizer { tokens }
    }
}

/// The tokens file cannot be read: no caller is accepted until an admin fixes it.
fn tokens_unreadable(why: String) -> InvokeError {
    InvokeError::new(
        ErrorCode::Unavailable,
        format!(
            "the server's tokens file cannot be read, so no token is accepted until an admin fixes it ({why})"
        ),
    )
}

impl Authorizer for TokenAuthorizer {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, InvokeError> {
        let token = bearer.filter(|t| !t.is_empty()).ok_or_else(|| {
            InvokeError::new(
                ErrorCode::Unauthenticated,
                "missing bearer token: send 'Authorization: Bearer <token>' (dev mode writes the admin token to <data-dir>/admin.token)",
            )
        })?;
        let broken = tokens_unreadable;
        if let Some(caller) = self.tokens.lookup(token).map_err(broken)? {
            return Ok(caller);
        }
        // A token created since the last refresh works at once: look at the file again, off
        // the async workers.
        let tokens = self.tokens.clone();
        let _ = tokio::task::spawn_blocking(move || tokens.refresh()).await;
        self.tokens.lookup(token).map_err(broken)?.ok_or_else(|| {
            InvokeError::new(
                ErrorCode::Unauthenticated,
                "the bearer token is not valid for this server",
            )
        })
    }

    async fn check(&self, caller: &Caller, access: Access<'_>) -> Result<Decision, InvokeError> {
        if caller.admin {
            return Ok(Decision::Allow);
        }
        if caller.namespace.as_ref() != Some(access.namespace) {
            return Ok(Decision::Deny(
                "callers are confined to their own namespace (in dev mode only an admin token acts in every namespace)"
                    .to_owned(),
            ));
        }
        Ok(match (access.resource, access.verb) {
            (Resource::Configs, Verb::Get | Verb::List) => Decision::Allow,
            _ => Decision::Deny(
                "in dev mode only an admin token may create, change or delete, or read secrets beyond that; workload tokens may only read"
                    .to_owned(),
            ),
        })
    }
}

/// Dev mode's repository: the node store itself.
pub struct StoreRepository {
    store: Arc<Store>,
}

impl StoreRepository {
    pub fn new(store: Arc<Store>) -> Self {
        StoreRepository { store }
    }

    /// Runs blocking store I/O off the async workers.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, InvokeError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|_| InvokeError::internal("store task failed"))?
            .map_err(store_error)
    }
}

fn revision(generation: u64) -> Revision {
    Revision(generation.to_string())
}

/// The store generation a revision names; anything else matches no entry.
fn expect(base: Option<&Revision>) -> Expect {
    match base {
        None => Expect::Any,
        Some(r) => Expect::Generation(r.0.parse().unwrap_or(u64::MAX)),
    }
}

/// The store's error as the caller is told it: what failed, never the server's paths (the
/// log, written here, says which file).
fn store_error(e: StoreError) -> InvokeError {
    match &e {
        StoreError::Changed { .. } | StoreError::Stale { .. } => {
            InvokeError::new(ErrorCode::Conflict, e.to_string())
        }
        StoreError::Io { source, .. } => {
            tracing::error!(error = %e, "store write failed");
            InvokeError::new(
                ErrorCode::Unavailable,
                format!(
                    "the node's store could not be written ({source}); nothing was changed, retry once the server's disk is fixed"
                ),
            )
        }
        StoreError::Integrity(_)
        | StoreError::OpenToOthers { .. }
        | StoreError::ForeignKeyring { .. } => {
            tracing::error!(error = %e, "store refused a write");
            InvokeError::internal("the node's store refused the write; the server's log says why")
        }
    }
}

/// A create that found something there by the time it committed.
fn exists(e: InvokeError, key: &ObjectKey, what: &str) -> InvokeError {
    if e.code != ErrorCode::Conflict {
        return e;
    }
    InvokeError::new(
        ErrorCode::AlreadyExists,
        format!(
            "{what} {:?} already exists in namespace {:?}",
            key.name.as_str(),
            key.namespace.as_str()
        ),
    )
}

impl Repository for StoreRepository {
    fn store(&self) -> &Store {
        &self.store
    }

    async fn current_secret(&self, key: &ObjectKey) -> Result<Current<CurrentSecret>, InvokeError> {
        Ok(match self.store.secret_entry(key) {
            Lookup::Found(record) => Current::Found(CurrentSecret {
                revision: revision(record.generation),
                high_water: record.version,
                record,
            }),
            Lookup::Missing => Current::Missing,
            Lookup::Quarantined(why) => Current::Refused(why.to_string()),
        })
    }

    async fn current_config(&self, key: &ObjectKey) -> Result<Current<CurrentConfig>, InvokeError> {
        Ok(match self.store.config_entry(key) {
            Lookup::Found(record) => Current::Found(CurrentConfig {
                revision: revision(record.generation),
                record,
            }),
            Lookup::Missing => Current::Missing,
            Lookup::Quarantined(why) => Current::Refused(why.to_string()),
        })
    }

    async fn create_secret(
        &self,
        record: SecretRecord,
        _caller: &Caller,
    ) -> Result<Arc<SecretRecord>, InvokeError> {
        let key = record.key.clone();
        self.blocking(move |s| s.put_secret(record, Expect::Absent))
            .await
            .map_err(|e| exists(e, &key, "secret"))
    }

    async fn replace_secret(
        &self,
        record: SecretRecord,
        current: &CurrentSecret,
        _caller: &Caller,
    ) -> Result<Arc<SecretRecord>, InvokeError> {
        let expect = expect(Some(&current.revision));
        self.blocking(move |s| s.put_secret(record, expect)).await
    }

    async fn delete_secret(
        &self,
        key: &ObjectKey,
        base: Option<&Revision>,
        writes: Vec<WriteRecord>,
        _caller: &Caller,
    ) -> Result<(), InvokeError> {
        let (key, expect) = (key.clone(), expect(base));
        self.blocking(move |s| s.delete_secret(&key, expect, writes).map(|_| ()))
            .await
    }

    async fn create_config(
        &self,
        record: ConfigRecord,
        _caller: &Caller,
    ) -> Result<Arc<ConfigRecord>, InvokeError> {
        let key = record.key.clone();
        self.blocking(move |s| s.put_config(record, Expect::Absent))
            .await
            .map_err(|e| exists(e, &key, "config"))
    }

    async fn replace_config(
        &self,
        record: ConfigRecord,
        current: &CurrentConfig,
        _caller: &Caller,
    ) -> Result<Arc<ConfigRecord>, InvokeError> {
        let expect = expect(Some(&current.revision));
        self.blocking(move |s| s.put_config(record, expect)).await
    }

    async fn delete_config(
        &self,
        key: &ObjectKey,
        base: Option<&Revision>,
        writes: Vec<WriteRecord>,
        _caller: &Caller,
    ) -> Result<(), InvokeError> {
        let (key, expect) = (key.clone(), expect(base));
        self.blocking(move |s| s.delete_config(&key, expect, writes).map(|_| ()))
            .await
    }
}
