//! Where objects are kept: the [`Repository`] seam. Reads are served from the node's store in
//! both shapes; writes go where the backend keeps its source of truth: the store itself in dev
//! mode, the API server (with resourceVersion preconditions) on a node agent.

use std::future::Future;
use std::sync::Arc;

use super::{Caller, InvokeError};
use crate::domain::{ObjectKey, Version};
use crate::store::{ConfigRecord, SecretRecord, Store, WriteRecord};

/// A precondition token: the object as it was read. Dev mode: the store generation; the agent:
/// the object's resourceVersion. A commit against a stale revision answers CONFLICT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revision(pub String);

/// What the source of truth holds under a key, read for a write.
#[derive(Debug, Clone)]
pub enum Current<T> {
    Found(T),
    Missing,
    /// The node holds an entry it refused at start-up (dev mode only: the agent's source of
    /// truth is the API server). It can be deleted, nothing else.
    Refused(String),
}

impl<T> Current<T> {
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Current<U> {
        match self {
            Current::Found(t) => Current::Found(f(t)),
            Current::Missing => Current::Missing,
            Current::Refused(why) => Current::Refused(why),
        }
    }
}

impl<T: Remembers> Current<T> {
    /// The writes the object remembers, as its source of truth has them (none if it is gone).
    pub fn writes(&self) -> &[WriteRecord] {
        match self {
            Current::Found(t) => t.writes(),
            Current::Missing | Current::Refused(_) => &[],
        }
    }
}

/// What an object as a write finds it remembers of earlier keyed writes.
pub trait Remembers {
    fn writes(&self) -> &[WriteRecord];
}

impl Remembers for CurrentSecret {
    fn writes(&self) -> &[WriteRecord] {
        &self.record.writes
    }
}

impl Remembers for CurrentConfig {
    fn writes(&self) -> &[WriteRecord] {
        &self.record.writes
    }
}

/// A secret as a write finds it.
#[derive(Debug, Clone)]
pub struct CurrentSecret {
    pub record: Arc<SecretRecord>,
    pub revision: Revision,
    /// The highest version the object has ever had, if its source of truth keeps more than the
    /// current envelope's (the agent: `status.version`). Versions only move forward from it.
    pub high_water: Version,
}

/// A config as a write finds it.
#[derive(Debug, Clone)]
pub struct CurrentConfig {
    pub record: Arc<ConfigRecord>,
    pub revision: Revision,
}

/// The seam between the command core and where objects live. Write methods commit exactly the
/// record the core built (sealed data, version, remembered writes); `caller` is who asked, for
/// the backend's own records of the change (the agent's Events), never for authorization (the
/// core has authorized by then).
pub trait Repository: Send + Sync + 'static {
    /// The node's store: every read is served from it.
    fn store(&self) -> &Store;

    fn current_secret(
        &self,
        key: &ObjectKey,
    ) -> impl Future<Output = Result<Current<CurrentSecret>, InvokeError>> + Send;

    fn current_config(
        &self,
        key: &ObjectKey,
    ) -> impl Future<Output = Result<Current<CurrentConfig>, InvokeError>> + Send;

    /// Creates the secret; ALREADY_EXISTS if it exists by now.
    fn create_secret(
        &self,
        record: SecretRecord,
        caller: &Caller,
    ) -> impl Future<Output = Result<Arc<SecretRecord>, InvokeError>> + Send;

    /// Replaces the secret if it is still as `current` found it, else CONFLICT.
    fn replace_secret(
        &self,
        record: SecretRecord,
        current: &CurrentSecret,
        caller: &Caller,
    ) -> impl Future<Output = Result<Arc<SecretRecord>, InvokeError>> + Send;

    /// Deletes the secret if it is still at `base` (any state when `None`), remembering
    /// `writes` (the delete's own, if keyed) beside the writes the object remembers.
    fn delete_secret(
        &self,
        key: &ObjectKey,
        base: Option<&Revision>,
        writes: Vec<WriteRecord>,
        caller: &Caller,
    ) -> impl Future<Output = Result<(), InvokeError>> + Send;

    fn create_config(
        &self,
        record: ConfigRecord,
        caller: &Caller,
    ) -> impl Future<Output = Result<Arc<ConfigRecord>, InvokeError>> + Send;

    /// Replaces the config if it is still as `current` found it, else CONFLICT.
    fn replace_config(
        &self,
        record: ConfigRecord,
        current: &CurrentConfig,
        caller: &Caller,
    ) -> impl Future<Output = Result<Arc<ConfigRecord>, InvokeError>> + Send;

    fn delete_config(
        &self,
        key: &ObjectKey,
        base: Option<&Revision>,
        writes: Vec<WriteRecord>,
        caller: &Caller,
    ) -> impl Future<Output = Result<(), InvokeError>> + Send;

    /// Whether every command can be answered now; `GET /readyz` reports it. `Err` says what is
    /// missing.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}
