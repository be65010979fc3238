//! The Kubernetes [`Repository`]: reads from the node's store (what the agent mirrors), writes
//! through the API server **as the caller**, with the caller's own bearer token: the API
//! server's authentication and RBAC decide each write, and the agent's ServiceAccount needs (and
//! has) no right to change any ClawSecret or ClawConfig. Each write is guarded by the
//! resourceVersion the core read, so a concurrent writer on another node makes this one answer
//! CONFLICT instead of overwriting it. A rotation or config update is a replace (`PUT`, verb
//! `update`: the verb the core's SubjectAccessReview asked about), not a patch. A write
//! carries the sealed data and the remembered writes (idempotency) in the same object update,
//! so they commit together. What this agent wrote is mirrored into its store at once (the watch
//! would bring it moments later), and published as an Event naming the caller.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kube::api::{Api, DeleteParams, Preconditions};
use std::collections::BTreeMap;
use std::sync::Arc;

use super::events::InvokeEvents;
use crate::crypto::SharedKeyring;
use crate::domain::{ErrorCode, Kind, ObjectKey, Version};
use crate::invoke::{
    Caller, Current, CurrentConfig, CurrentSecret, InvokeError, Repository, Revision,
};
use crate::k8s::component::Component;
use crate::k8s::convert;
use crate::k8s::crd::{ClawConfig, ClawConfigSpec, ClawSecret, ClawSecretSpec, SealedData};
use crate::k8s::names::object_name;
use crate::store::{ConfigRecord, Expect, SecretRecord, Store, WriteRecord};

/// Where versions before the command core kept the last write's idempotency mark, in clear.
const LEGACY_LAST_WRITE_ANNOTATION: &str = "clawbernetes.io/last-write";

pub struct KubeRepository {
    /// The agent's own client: reads of the object a write starts from.
    client: kube::Client,
    /// The agent's client configuration without its credentials: a write's client is this
    /// with the caller's token.
    caller_config: kube::Config,
    store: Arc<Store>,
    keys: SharedKeyring,
    events: InvokeEvents,
    /// Who makes the writes (their field manager): the agent, or the operator carrying them.
    writer: Component,
    /// Whether a written secret is put into the store at once: the agent's store is the node's
    /// copy; the operator's keeps only the writes of deleted objects.
    mirrors: bool,
}

fn noun(kind: Kind) -> &'static str {
    match kind {
        Kind::Secret => "secret",
        Kind::Config => "config",
    }
}

/// Maps the API server's refusal of a write made as `caller`: its own credentials or rights
/// were refused, which the caller can fix; anything else as [`api_error`].
fn caller_error(e: kube::Error, kind: Kind, key: &ObjectKey, caller: &Caller) -> InvokeError {
    match &e {
        kube::Error::Api(status) if status.code == 401 => InvokeError::new(
            ErrorCode::Unauthenticated,
            format!(
                "the API server did not accept {}'s token for the write ({}); get a fresh token and retry",
                caller.subject, status.message
            ),
        ),
        kube::Error::Api(status) if status.code == 403 => InvokeError::new(
            ErrorCode::PermissionDenied,
            format!(
                "the API server refused the write to {}: {}",
                caller.subject, status.message
            ),
        ),
        _ => api_error(e, kind, key),
    }
}

/// Maps an API error to the protocol's codes. Messages from the API server name objects and
/// fields, never our values (they are ciphertext by the time they reach it).
fn api_error(e: kube::Error, kind: Kind, key: &ObjectKey) -> InvokeError {
    let what = noun(kind);
    let (name, ns) = (key.name.as_str(), key.namespace.as_str());
    match e {
        kube::Error::Api(status) => match status.code {
            404 => InvokeError::new(
                ErrorCode::NotFound,
                format!("{what} {name:?} does not exist in namespace {ns:?}"),
            ),
            409 if status.reason == "AlreadyExists" => InvokeError::new(
                ErrorCode::AlreadyExists,
                format!("{what} {name:?} already exists in namespace {ns:?}"),
            ),
            409 => changed_concurrently(kind, key),
            400 | 422 => {
                InvokeError::invalid(format!("the API server refused it: {}", status.message))
            }
            401 | 403 => InvokeError::internal(format!(
                "the agent's own credentials were refused ({}); check its RBAC",
                status.message
            )),
            _ => InvokeError::new(
                ErrorCode::Unavailable,
                format!(
                    "the API server answered {}: {}",
                    status.code, status.message
                ),
            ),
        },
        other => InvokeError::new(
            ErrorCode::Unavailable,
            format!("the API server could not be reached ({other}); writes need it, reads do not"),
        ),
    }
}

fn changed_concurrently(kind: Kind, key: &ObjectKey) -> InvokeError {
    InvokeError::new(
        ErrorCode::Conflict,
        format!(
            "{} {:?} was changed concurrently; read it again and retry",
            noun(kind),
            key.name.as_str()
        ),
    )
}

fn invalid_object(e: convert::Invalid) -> InvokeError {
    InvokeError::internal(format!("the object is invalid: {e}"))
}

fn not_deleting(obj_meta: &kube::api::ObjectMeta) -> bool {
    obj_meta.deletion_timestamp.is_none()
}

impl KubeRepository {
    /// `client` is the agent's own, built from `config`; writes use `config`'s connection
    /// settings without its credentials, with the caller's token instead.
    pub fn new(
        client: kube::Client,
        config: &kube::Config,
        store: Arc<Store>,
        keys: SharedKeyring,
        events: InvokeEvents,
    ) -> Self {
        let mut caller_config = config.clone();
        caller_config.auth_info = kube::config::AuthInfo::default();
        KubeRepository {
            client,
            caller_config,
            store,
            keys,
            events,
            writer: Component::Agent,
            mirrors: true,
        }
    }

    /// The operator's: writes carried for nodes' agents, made as the operator's component and
    /// not kept in its store.
    pub fn carrying_for_nodes(mut self) -> Self {
        self.writer = Component::Operator;
        self.mirrors = false;
        self
    }

    /// Reads as the agent.
    fn secrets(&self, key: &ObjectKey) -> Api<ClawSecret> {
        Api::namespaced(self.client.clone(), key.namespace.as_str())
    }

    /// Reads as the agent.
    fn configs(&self, key: &ObjectKey) -> Api<ClawConfig> {
        Api::namespaced(self.client.clone(), key.namespace.as_str())
    }

    /// A client that acts as `caller`: the agent's connection settings, the caller's token and
    /// no other credential.
    fn as_caller<K>(&self, caller: &Caller, key: &ObjectKey) -> Result<Api<K>, InvokeError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        let credential = caller.credential.as_ref().ok_or_else(|| {
            InvokeError::internal("the caller's token was not kept for the write; this is a bug")
        })?;
        let mut config = self.caller_config.clone();
        config.auth_info = kube::config::AuthInfo {
            token: Some(secrecy::SecretString::from(credential.expose())),
            ..kube::config::AuthInfo::default()
        };
        let client = kube::Client::try_from(config).map_err(|e| {
            InvokeError::internal(format!("cannot build a client for the caller: {e}"))
        })?;
        Ok(Api::namespaced(client, key.namespace.as_str()))
    }

    /// Sets on `meta` the annotations a replace carries: the sealed remembered writes (or
    /// none), and no clear-text idempotency mark of earlier versions (`last-write`: the key and
    /// a fingerprint of the params, readable by anyone with `get`).
    fn set_writes(
        &self,
        meta: &mut kube::api::ObjectMeta,
        kind: Kind,
        key: &ObjectKey,
        writes: &[WriteRecord],
    ) -> Result<(), InvokeError> {
        let sealed = convert::writes_annotation(&self.keys.current(), kind, key, writes)
            .map_err(|e| InvokeError::internal(format!("sealing the write records failed: {e}")))?;
        let annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
        annotations.remove(LEGACY_LAST_WRITE_ANNOTATION);
        match sealed {
            Some(s) => annotations.insert(convert::WRITES_ANNOTATION.to_owned(), s),
            None => annotations.remove(convert::WRITES_ANNOTATION),
        };
        Ok(())
    }

    /// The object a replace starts from: read as the agent, and still the state the core
    /// decided on (`base`), else CONFLICT.
    async fn unchanged_since<K>(
        &self,
        api: Api<K>,
        kind: Kind,
        key: &ObjectKey,
        base: &Revision,
    ) -> Result<K, InvokeError>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let obj = api
            .get(&object_name(&key.name))
            .await
            .map_err(|e| api_error(e, kind, key))?;
        if obj.meta().resource_version.as_deref() != Some(base.0.as_str())
            || obj.meta().deletion_timestamp.is_some()
        {
            return Err(changed_concurrently(kind, key));
        }
        Ok(obj)
    }

    fn annotations(
        &self,
        kind: Kind,
        key: &ObjectKey,
        writes: &[WriteRecord],
    ) -> Result<Option<BTreeMap<String, String>>, InvokeError> {
        let sealed = convert::writes_annotation(&self.keys.current(), kind, key, writes)
            .map_err(|e| InvokeError::internal(format!("sealing the write records failed: {e}")))?;
        Ok(sealed.map(|s| [(convert::WRITES_ANNOTATION.to_owned(), s)].into()))
    }

    /// The record of a ClawSecret this agent just wrote, mirrored into the store (unless the
    /// object is meant for other nodes only: the watch decides that).
    async fn mirror_secret(
        &self,
        obj: &ClawSecret,
        key: &ObjectKey,
    ) -> Result<Arc<SecretRecord>, InvokeError> {
        let writes =
            convert::remembered_writes(&obj.metadata, Kind::Secret, key, &self.keys.current());
        let record = convert::secret_record(obj, writes)
            .map_err(invalid_object)?
            .ok_or_else(|| InvokeError::internal("the written object is not sealed"))?;
        if self.mirrors && obj.spec.node_selector.is_none() {
            let store = self.store.clone();
            let copy = record.clone();
            let mirrored =
                tokio::task::spawn_blocking(move || store.put_secret(copy, Expect::Any)).await;
            if let Ok(Err(e)) = mirrored {
                // The watch brings it too; a newer version already stored is fine.
                tracing::debug!(%key, error = %e, "local mirror of a write skipped");
            }
        }
        Ok(Arc::new(record))
    }

    async fn mirror_config(
        &self,
        obj: &ClawConfig,
        key: &ObjectKey,
    ) -> Result<Arc<ConfigRecord>, InvokeError> {
        let writes =
            convert::remembered_writes(&obj.metadata, Kind::Config, key, &self.keys.current());
        let record = convert::config_record(obj, writes).map_err(invalid_object)?;
        // Configs reach nodes once the operator has accepted their data (see sync.rs), so the
        // write is not mirrored ahead of it.
        Ok(Arc::new(record))
    }

    /// Removes a deleted object from the store, remembering `writes` there: the object that
    /// held them is gone, and a retried delete should still get its first answer.
    async fn forget(&self, kind: Kind, key: &ObjectKey, writes: Vec<WriteRecord>) {
        let store = self.store.clone();
        let k = key.clone();
        let removed = tokio::task::spawn_blocking(move || match kind {
            Kind::Secret => store.delete_secret(&k, Expect::Any, writes).map(|_| ()),
            Kind::Config => store.delete_config(&k, Expect::Any, writes).map(|_| ()),
        })
        .await;
        if let Ok(Err(e)) = removed {
            tracing::error!(%key, error = %e, "a deleted object could not be removed from this node's store; the next re-list removes it");
        }
    }

    /// Deletes as `caller`.
    async fn delete_object<K>(
        &self,
        kind: Kind,
        key: &ObjectKey,
        base: Option<&Revision>,
        caller: &Caller,
    ) -> Result<Option<String>, InvokeError>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug,
        <K as kube::Resource>::DynamicType: Default,
    {
        let api: Api<K> = self.as_caller(caller, key)?;
        let params = DeleteParams {
            preconditions: base.map(|r| Preconditions {
                resource_version: Some(r.0.clone()),
                uid: None,
            }),
            ..DeleteParams::default()
        };
        // The deleted object's uid, for the Event: from the object itself while finalizers
        // hold it, else from the server's status.
        api.delete(&object_name(&key.name), &params)
            .await
            .map(|deleted| {
                deleted.either(
                    |obj| obj.meta().uid.clone(),
                    |status| status.details.map(|d| d.uid).filter(|u| !u.is_empty()),
                )
            })
            .map_err(|e| caller_error(e, kind, key, caller))
    }
}

impl Repository for KubeRepository {
    fn store(&self) -> &Store {
        &self.store
    }

    async fn current_secret(&self, key: &ObjectKey) -> Result<Current<CurrentSecret>, InvokeError> {
        let obj = match self.secrets(key).get_opt(&object_name(&key.name)).await {
            Ok(Some(obj)) if not_deleting(&obj.metadata) => obj,
            Ok(_) => return Ok(Current::Missing),
            Err(e) => return Err(api_error(e, Kind::Secret, key)),
        };
        if obj.spec.data.is_some() || obj.spec.encrypted_data.is_some() {
            return Err(InvokeError::new(
                ErrorCode::Conflict,
                format!(
                    "secret {:?} has data waiting for the operator to seal it; retry once it is sealed",
                    key.name.as_str()
                ),
            ));
        }
        let writes =
            convert::remembered_writes(&obj.metadata, Kind::Secret, key, &self.keys.current());
        let record = convert::secret_record(&obj, writes)
            .map_err(invalid_object)?
            .ok_or_else(|| {
                InvokeError::internal("the object is neither sealed nor waiting to be")
            })?;
        let high_water = obj
            .status
            .as_ref()
            .and_then(|s| s.version)
            .and_then(Version::new)
            .map_or(record.version, |v| v.max(record.version));
        Ok(Current::Found(CurrentSecret {
            revision: Revision(obj.metadata.resource_version.clone().unwrap_or_default()),
            high_water,
            record: Arc::new(record),
        }))
    }

    async fn current_config(&self, key: &ObjectKey) -> Result<Current<CurrentConfig>, InvokeError> {
        let obj = match self.configs(key).get_opt(&object_name(&key.name)).await {
            Ok(Some(obj)) if not_deleting(&obj.metadata) => obj,
            Ok(_) => return Ok(Current::Missing),
            Err(e) => return Err(api_error(e, Kind::Config, key)),
        };
        Ok(Current::Found(CurrentConfig {
            revision: Revision(obj.metadata.resource_version.clone().unwrap_or_default()),
            record: self.mirror_config(&obj, key).await?,
        }))
    }

    async fn create_secret(
        &self,
        record: SecretRecord,
        caller: &Caller,
    ) -> Result<Arc<SecretRecord>, InvokeError> {
        let key = &record.key;
        let object = object_name(&key.name);
        let mut obj = ClawSecret::new(
            &object,
            ClawSecretSpec {
                name: (object != key.name.as_str()).then(|| key.name.to_string()),
                data: None,
                encrypted_data: None,
                allowed_workloads: record
                    .allowed_workloads
                    .iter()
                    .map(|w| w.to_string())
                    .collect(),
                node_selector: None,
                sealed: Some(sealed_data(&record)),
            },
        );
        obj.metadata.annotations = self.annotations(Kind::Secret, key, &record.writes)?;
        let created = self
            .as_caller::<ClawSecret>(caller, key)?
            .create(&self.writer.post(), &obj)
            .await
            .map_err(|e| caller_error(e, Kind::Secret, key, caller))?;
        self.events.write(
            Kind::Secret,
            key,
            created.metadata.uid.clone(),
            "Created",
            "secret.create",
            format!(
                "version 1 sealed with master key {}",
                record.envelope.key_id()
            ),
            caller,
        );
        self.mirror_secret(&created, key).await
    }

    async fn replace_secret(
        &self,
        record: SecretRecord,
        current: &CurrentSecret,
        caller: &Caller,
    ) -> Result<Arc<SecretRecord>, InvokeError> {
        let key = &record.key;
        let mut obj = self
            .unchanged_since(self.secrets(key), Kind::Secret, key, &current.revision)
            .await?;
        // The replaced version's data digest goes with it (sealed_data sets none).
        obj.spec.sealed = Some(sealed_data(&record));
        self.set_writes(&mut obj.metadata, Kind::Secret, key, &record.writes)?;
        let updated = self
            .as_caller::<ClawSecret>(caller, key)?
            .replace(&object_name(&key.name), &self.writer.post(), &obj)
            .await
            .map_err(|e| caller_error(e, Kind::Secret, key, caller))?;
        self.events.write(
            Kind::Secret,
            key,
            updated.metadata.uid.clone(),
            "Rotated",
            "secret.rotate",
            format!(
                "rotated to version {} sealed with master key {}",
                record.version,
                record.envelope.key_id()
            ),
            caller,
        );
        self.mirror_secret(&updated, key).await
    }

    async fn delete_secret(
        &self,
        key: &ObjectKey,
        base: Option<&Revision>,
        writes: Vec<WriteRecord>,
        caller: &Caller,
    ) -> Result<(), InvokeError> {
        let uid = self
            .delete_object::<ClawSecret>(Kind::Secret, key, base, caller)
            .await?;
        self.events.write(
            Kind::Secret,
            key,
            uid,
            "Deleted",
            "secret.delete",
            "deleted; nodes remove their copies".to_owned(),
            caller,
        );
        self.forget(Kind::Secret, key, writes).await;
        Ok(())
    }

    async fn create_config(
        &self,
        record: ConfigRecord,
        caller: &Caller,
    ) -> Result<Arc<ConfigRecord>, InvokeError> {
        let key = &record.key;
        let object = object_name(&key.name);
        let mut obj = ClawConfig::new(
            &object,
            ClawConfigSpec {
                name: (object != key.name.as_str()).then(|| key.name.to_string()),
                data: config_map(&record),
                immutable: record.immutable,
                node_selector: None,
            },
        );
        obj.metadata.annotations = self.annotations(Kind::Config, key, &record.writes)?;
        let created = self
            .as_caller::<ClawConfig>(caller, key)?
            .create(&self.writer.post(), &obj)
            .await
            .map_err(|e| caller_error(e, Kind::Config, key, caller))?;
        let note = if record.immutable {
            "created, immutable"
        } else {
            "created"
        };
        self.events.write(
            Kind::Config,
            key,
            created.metadata.uid.clone(),
            "Created",
            "config.create",
            note.to_owned(),
            caller,
        );
        self.mirror_config(&created, key).await
    }

    async fn replace_config(
        &self,
        record: ConfigRecord,
        current: &CurrentConfig,
        caller: &Caller,
    ) -> Result<Arc<ConfigRecord>, InvokeError> {
        let key = &record.key;
        let mut obj = self
            .unchanged_since(self.configs(key), Kind::Config, key, &current.revision)
            .await?;
        obj.spec.data = config_map(&record);
        // One-way: an update may make a config immutable, never mutable again.
        obj.spec.immutable |= record.immutable;
        self.set_writes(&mut obj.metadata, Kind::Config, key, &record.writes)?;
        let updated = self
            .as_caller::<ClawConfig>(caller, key)?
            .replace(&object_name(&key.name), &self.writer.post(), &obj)
            .await
            .map_err(|e| caller_error(e, Kind::Config, key, caller))?;
        let note = if updated.spec.immutable {
            "data replaced; now immutable"
        } else {
            "data replaced"
        };
        self.events.write(
            Kind::Config,
            key,
            updated.metadata.uid.clone(),
            "Updated",
            "config.update",
            note.to_owned(),
            caller,
        );
        self.mirror_config(&updated, key).await
    }

    async fn delete_config(
        &self,
        key: &ObjectKey,
        base: Option<&Revision>,
        writes: Vec<WriteRecord>,
        caller: &Caller,
    ) -> Result<(), InvokeError> {
        let uid = self
            .delete_object::<ClawConfig>(Kind::Config, key, base, caller)
            .await?;
        self.events.write(
            Kind::Config,
            key,
            uid,
            "Deleted",
            "config.delete",
            "deleted; nodes remove their copies".to_owned(),
            caller,
        );
        self.forget(Kind::Config, key, writes).await;
        Ok(())
    }
}

/// `spec.sealed` for a record the core sealed. No data digest: the next applied data counts as
/// new (a digest bound to an earlier version, were one left behind, would not match either).
fn sealed_data(record: &SecretRecord) -> SealedData {
    SealedData {
        version: record.version.get(),
        key_id: record.envelope.key_id().to_string(),
        envelope: B64.encode(record.envelope.to_bytes()),
        seal_time: record.updated_at.to_string(),
        data_digest: None,
    }
}

fn config_map(record: &ConfigRecord) -> BTreeMap<String, String> {
    record
        .data
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
        .collect()
}
