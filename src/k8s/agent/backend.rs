//! The node agent's [`Backend`]: reads from the node's local store, writes through the API
//! server, and lets Kubernetes decide who may do what (TokenReview, SubjectAccessReview).
//!
//! Access rules (DESIGN.md, "Identity and access"):
//! - a ServiceAccount caller is the workload named by its ServiceAccount, in its namespace; it
//!   may `secret.get` a secret of its own namespace whose `allowed_workloads` is empty or lists it;
//! - everything else is a SubjectAccessReview on the caller's own identity against
//!   `clawsecrets` / `clawconfigs` in group `clawbernetes.io`: `reveal` to read a secret's
//!   values, `list`, `create`, `update` (rotate), `delete`; `get`/`list`/`create`/`update`/
//!   `delete` for configs. The agent's own permissions are used only after that check passes,
//!   to carry out exactly the checked action.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use hmac::{Hmac, Mac};
use jiff::{Timestamp, Unit};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use sha2::Sha256;
use std::sync::{Arc, RwLock};
use zeroize::Zeroizing;

use crate::crypto::{self, Keyring, SecretIdentity};
use crate::domain::{ErrorCode, Kind, Name, Namespace, ObjectKey, SecretData, Version};
use crate::invoke::{
    Backend, Caller, Command, ConfigCreate, ConfigMeta, ConfigUpdate, ConfigView, Deleted,
    InvokeError, ListParams, NameParams, Payload, SecretCreate, SecretMeta, SecretRotate,
    SecretView, Target, WriteRequest,
};
use crate::k8s::convert;
use crate::k8s::crd::{ClawConfig, ClawConfigSpec, ClawSecret, ClawSecretSpec, SealedData};
use crate::k8s::identity::KubeIdentity;
use crate::k8s::names::object_name;
use crate::store::{Store, WriteMark};
use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// Annotation that carries the idempotency mark of the last write made through node.invoke.
pub const LAST_WRITE_ANNOTATION: &str = "clawbernetes.io/last-write";

/// The keyring an agent has loaded (None until the first successful load).
pub type KeyringSlot = Arc<RwLock<Option<Keyring>>>;

pub struct KubeBackend {
    client: kube::Client,
    /// Publishes AccessDenied Events; repeats (same object, caller and command) are folded
    /// into a series by the recorder, so a caller hammering a secret cannot flood the API
    /// server.
    recorder: Recorder,
    /// Who reports this agent's Events: `claw-secrets-agent`, instance = the node name.
    reporter: Reporter,
    identity: KubeIdentity,
    store: Arc<Store>,
    keyring: KeyringSlot,
}

fn denied(caller: &Caller, verb: &str, what: &str, ns: &Namespace) -> InvokeError {
    InvokeError::new(
        ErrorCode::PermissionDenied,
        format!(
            "{} may not {verb} {what} in namespace {:?}: grant it with RBAC (verb {verb:?} on {what} in group clawbernetes.io)",
            caller.subject,
            ns.as_str()
        ),
    )
}

fn not_found(kind: &str, key: &ObjectKey) -> InvokeError {
    InvokeError::new(
        ErrorCode::NotFound,
        format!(
            "{kind} {:?} does not exist in namespace {:?}",
            key.name.as_str(),
            key.namespace.as_str()
        ),
    )
}

/// Maps an API error to the protocol's codes. Messages from the API server name objects and
/// fields, never our values (they are ciphertext by the time they reach it).
fn api_error(e: kube::Error, key: &ObjectKey, kind: &str) -> InvokeError {
    match e {
        kube::Error::Api(status) => match status.code {
            404 => not_found(kind, key),
            409 if status.reason == "AlreadyExists" => InvokeError::new(
                ErrorCode::AlreadyExists,
                format!(
                    "{kind} {:?} already exists in namespace {:?}",
                    key.name.as_str(),
                    key.namespace.as_str()
                ),
            ),
            409 => InvokeError::new(
                ErrorCode::Conflict,
                format!(
                    "{kind} {:?} was changed concurrently; read it again and retry",
                    key.name.as_str()
                ),
            ),
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

fn now() -> Timestamp {
    Timestamp::now()
        .round(Unit::Millisecond)
        .unwrap_or_else(|_| Timestamp::now())
}

impl KubeBackend {
    pub fn new(
        client: kube::Client,
        store: Arc<Store>,
        keyring: KeyringSlot,
        node_name: &str,
    ) -> Self {
        let reporter = Reporter {
            controller: "claw-secrets-agent".to_owned(),
            instance: Some(node_name.to_owned()),
        };
        KubeBackend {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            identity: KubeIdentity::new(client.clone()),
            client,
            store,
            keyring,
        }
    }

    /// Keeps token reviews in `path` across restarts, so callers verified before can still read
    /// after a restart while the API server is down (see [`KubeIdentity::with_review_file`]).
    pub fn with_review_file(mut self, path: std::path::PathBuf) -> Self {
        self.identity = self.identity.with_review_file(path);
        self
    }

    fn keyring(&self) -> Result<Keyring, InvokeError> {
        self.keyring.read().unwrap().clone().ok_or_else(|| {
            InvokeError::new(
                ErrorCode::Unavailable,
                "this agent has not loaded the master key yet (the API server has not been reachable since it started); retry shortly",
            )
        })
    }

    fn namespace_for(caller: &Caller, requested: Option<&Namespace>) -> Namespace {
        requested
            .cloned()
            .or_else(|| caller.namespace.clone())
            .unwrap_or_else(Namespace::default_namespace)
    }

    async fn require(
        &self,
        caller: &Caller,
        verb: &str,
        resource: &str,
        key_ns: &Namespace,
        name: Option<&str>,
    ) -> Result<(), InvokeError> {
        if self
            .identity
            .allowed(caller, verb, resource, key_ns, name)
            .await?
        {
            Ok(())
        } else {
            Err(denied(caller, verb, resource, key_ns))
        }
    }

    fn fingerprint(keyring: &Keyring, write: &WriteRequest) -> String {
        let hk =
            hkdf::Hkdf::<Sha256>::new(None, &Zeroizing::new(keyring.active().bytes().to_vec()));
        let mut key = Zeroizing::new([0u8; 32]);
        hk.expand(b"claw-secrets/v1/idempotency-fingerprint", key.as_mut())
            .expect("32 bytes is a valid HKDF output length");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key.as_ref()).expect("any key length");
        mac.update(&write.digest.0);
        crate::hex::encode(&mac.finalize().into_bytes())
    }

    fn mark(keyring: &Keyring, write: &Option<WriteRequest>) -> Option<String> {
        write.as_ref().map(|w| {
            serde_json::to_string(&WriteMark {
                idempotency_key: w.key.as_str().to_owned(),
                fingerprint: Self::fingerprint(keyring, w),
            })
            .expect("json")
        })
    }

    /// Whether `write` repeats the write recorded on `meta`'s annotation.
    fn is_replay(
        keyring: &Keyring,
        meta: &kube::api::ObjectMeta,
        write: &Option<WriteRequest>,
    ) -> Result<bool, InvokeError> {
        let (Some(write), Some(raw)) = (
            write,
            meta.annotations
                .as_ref()
                .and_then(|a| a.get(LAST_WRITE_ANNOTATION)),
        ) else {
            return Ok(false);
        };
        let Ok(mark) = serde_json::from_str::<WriteMark>(raw) else {
            return Ok(false);
        };
        if mark.idempotency_key != write.key.as_str() {
            return Ok(false);
        }
        if mark.fingerprint != Self::fingerprint(keyring, write) {
            return Err(InvokeError::invalid(format!(
                "idempotencyKey {:?} was already used for a different request; use a new key for a new request",
                write.key.as_str()
            )));
        }
        Ok(true)
    }

    fn seal(
        keyring: &Keyring,
        key: &ObjectKey,
        version: Version,
        data: &SecretData,
    ) -> Result<SealedData, InvokeError> {
        let envelope = crypto::seal(
            keyring,
            &SecretIdentity {
                kind: Kind::Secret,
                namespace: &key.namespace,
                name: &key.name,
                version,
            },
            data,
        )
        .map_err(|e| InvokeError::internal(format!("sealing failed: {e}")))?;
        Ok(SealedData {
            version: version.get(),
            key_id: envelope.key_id().to_string(),
            envelope: B64.encode(envelope.to_bytes()),
            sealed_at: now().to_string(),
        })
    }

    /// Mirrors an object this agent just wrote into its own store, so a read on this node right
    /// after the write sees it (the watch would bring it moments later anyway).
    async fn mirror(&self, obj: &ClawSecret) -> Result<SecretMeta, InvokeError> {
        let record = convert::secret_record(obj)
            .map_err(|e| InvokeError::internal(format!("the written object is invalid: {e}")))?
            .ok_or_else(|| InvokeError::internal("the written object is not sealed"))?;
        let meta = SecretMeta::of(&record);
        if obj.spec.node_selector.is_none() {
            let store = self.store.clone();
            let result = tokio::task::spawn_blocking(move || store.put_secret(record)).await;
            if let Ok(Err(e)) = result {
                tracing::debug!(error = %e, "local mirror of a write skipped");
            }
        }
        Ok(meta)
    }

    fn secrets(&self, ns: &Namespace) -> Api<ClawSecret> {
        Api::namespaced(self.client.clone(), ns.as_str())
    }

    fn configs(&self, ns: &Namespace) -> Api<ClawConfig> {
        Api::namespaced(self.client.clone(), ns.as_str())
    }

    async fn secret_get(
        &self,
        caller: &Caller,
        c: NameParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(Self::namespace_for(caller, c.namespace.as_ref()), c.name);
        t.namespace = Some(key.namespace.clone());
        t.name = Some(key.name.clone());
        let record = self.store.secret(&key);
        let workload_may_read = match (&record, &caller.workload, &caller.namespace) {
            (Some(r), Some(w), Some(own)) => {
                own == &key.namespace && r.allowed_workloads.permits(w)
            }
            _ => false,
        };
        if !workload_may_read {
            // Not a permitted workload: reading values needs the custom verb `reveal`. Checked
            // before the existence of the secret is revealed.
            let object = object_name(&key.name);
            let allowed = self
                .identity
                .allowed(
                    caller,
                    "reveal",
                    "clawsecrets",
                    &key.namespace,
                    Some(&object),
                )
                .await?;
            if !allowed {
                let own_namespace = caller.namespace.as_ref() == Some(&key.namespace);
                let why = match (&caller.workload, &record) {
                    (Some(w), Some(_)) if own_namespace => format!(
                        "workload {:?} is not in the secret's allowed_workloads",
                        w.as_str()
                    ),
                    (Some(_), _) if !own_namespace => {
                        "workloads may only read secrets of their own namespace".to_owned()
                    }
                    _ => "reading values needs RBAC verb \"reveal\" on clawsecrets in group clawbernetes.io"
                        .to_owned(),
                };
                return Err(InvokeError::new(
                    ErrorCode::PermissionDenied,
                    format!(
                        "{} may not read secret {:?} in namespace {:?}: {why}",
                        caller.subject,
                        key.name.as_str(),
                        key.namespace.as_str()
                    ),
                ));
            }
        }
        let record = record.ok_or_else(|| not_found("secret", &key))?;
        t.version = Some(record.version);
        let keyring = self.keyring()?;
        let data = crypto::open(
            &keyring,
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

    async fn secret_list(
        &self,
        caller: &Caller,
        c: ListParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = Self::namespace_for(caller, c.namespace.as_ref());
        t.namespace = Some(ns.clone());
        self.require(caller, "list", "clawsecrets", &ns, None)
            .await?;
        let secrets = self
            .store
            .list_secrets(&ns, &c.prefix)
            .iter()
            .map(|r| SecretMeta::of(r))
            .collect();
        Ok(Payload::SecretList { secrets })
    }

    async fn secret_create(
        &self,
        caller: &Caller,
        c: SecretCreate,
        write: Option<WriteRequest>,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(Self::namespace_for(caller, c.namespace.as_ref()), c.name);
        t.namespace = Some(key.namespace.clone());
        t.name = Some(key.name.clone());
        let object = object_name(&key.name);
        self.require(
            caller,
            "create",
            "clawsecrets",
            &key.namespace,
            Some(&object),
        )
        .await?;
        let keyring = self.keyring()?;
        let version = Version::FIRST;
        t.version = Some(version);
        let sealed = Self::seal(&keyring, &key, version, &c.data)?;
        drop(c.data);
        let mut obj = ClawSecret::new(
            &object,
            ClawSecretSpec {
                name: (object != key.name.as_str()).then(|| key.name.to_string()),
                data: None,
                allowed_workloads: c.allowed_workloads.iter().map(|w| w.to_string()).collect(),
                node_selector: None,
                sealed: Some(sealed),
            },
        );
        if let Some(mark) = Self::mark(&keyring, &write) {
            obj.metadata.annotations = Some([(LAST_WRITE_ANNOTATION.to_owned(), mark)].into());
        }
        let api = self.secrets(&key.namespace);
        let created = match api.create(&PostParams::default(), &obj).await {
            Ok(created) => {
                self.mutation_event(
                    "ClawSecret",
                    &key,
                    "Created",
                    "secret.create",
                    format!("version 1 sealed with master key {}", keyring.active().id()),
                    caller,
                );
                created
            }
            Err(e) => {
                let err = api_error(e, &key, "secret");
                if err.code == ErrorCode::AlreadyExists
                    && let Ok(existing) = api.get(&object).await
                    && Self::is_replay(&keyring, &existing.metadata, &write)?
                {
                    existing
                } else {
                    return Err(err);
                }
            }
        };
        Ok(Payload::SecretMeta(self.mirror(&created).await?))
    }

    async fn secret_rotate(
        &self,
        caller: &Caller,
        c: SecretRotate,
        write: Option<WriteRequest>,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(Self::namespace_for(caller, c.namespace.as_ref()), c.name);
        t.namespace = Some(key.namespace.clone());
        t.name = Some(key.name.clone());
        let object = object_name(&key.name);
        self.require(
            caller,
            "update",
            "clawsecrets",
            &key.namespace,
            Some(&object),
        )
        .await?;
        let keyring = self.keyring()?;
        let api = self.secrets(&key.namespace);
        let current = api
            .get(&object)
            .await
            .map_err(|e| api_error(e, &key, "secret"))?;
        if Self::is_replay(&keyring, &current.metadata, &write)? {
            return Ok(Payload::SecretMeta(self.mirror(&current).await?));
        }
        if current.spec.data.is_some() {
            return Err(InvokeError::new(
                ErrorCode::Conflict,
                format!(
                    "secret {:?} has plaintext waiting for the operator to seal it; retry once it is sealed",
                    key.name.as_str()
                ),
            ));
        }
        let current_version = current
            .spec
            .sealed
            .as_ref()
            .map(|s| s.version)
            .max(current.status.as_ref().and_then(|s| s.version))
            .unwrap_or(0);
        let version = Version::new(current_version + 1).expect("at least 1");
        t.version = Some(version);
        let sealed = Self::seal(&keyring, &key, version, &c.new_data)?;
        drop(c.new_data);
        let mut patch = json!({
            "metadata": { "resourceVersion": current.metadata.resource_version },
            "spec": { "sealed": sealed },
        });
        if let Some(mark) = Self::mark(&keyring, &write) {
            patch["metadata"]["annotations"] = json!({ LAST_WRITE_ANNOTATION: mark });
        }
        let key_id = sealed.key_id.clone();
        let updated = api
            .patch(&object, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| api_error(e, &key, "secret"))?;
        self.mutation_event(
            "ClawSecret",
            &key,
            "Rotated",
            "secret.rotate",
            format!("rotated to version {version} sealed with master key {key_id}"),
            caller,
        );
        Ok(Payload::SecretMeta(self.mirror(&updated).await?))
    }

    async fn secret_delete(
        &self,
        caller: &Caller,
        c: NameParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(Self::namespace_for(caller, c.namespace.as_ref()), c.name);
        t.namespace = Some(key.namespace.clone());
        t.name = Some(key.name.clone());
        let object = object_name(&key.name);
        self.require(
            caller,
            "delete",
            "clawsecrets",
            &key.namespace,
            Some(&object),
        )
        .await?;
        t.version = self.store.secret(&key).map(|r| r.version);
        self.secrets(&key.namespace)
            .delete(&object, &DeleteParams::default())
            .await
            .map_err(|e| api_error(e, &key, "secret"))?;
        self.mutation_event(
            "ClawSecret",
            &key,
            "Deleted",
            "secret.delete",
            "deleted; nodes remove their copies".to_owned(),
            caller,
        );
        let store = self.store.clone();
        let k = key.clone();
        let _ = tokio::task::spawn_blocking(move || store.delete_secret(&k)).await;
        Ok(Payload::Deleted(Deleted {
            name: key.name,
            namespace: key.namespace,
            deleted: true,
        }))
    }

    async fn config_get(
        &self,
        caller: &Caller,
        c: NameParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(Self::namespace_for(caller, c.namespace.as_ref()), c.name);
        t.namespace = Some(key.namespace.clone());
        t.name = Some(key.name.clone());
        self.require(
            caller,
            "get",
            "clawconfigs",
            &key.namespace,
            Some(&object_name(&key.name)),
        )
        .await?;
        let record = self
            .store
            .config(&key)
            .ok_or_else(|| not_found("config", &key))?;
        Ok(Payload::Config(ConfigView {
            meta: ConfigMeta::of(&record),
            data: record.data.clone(),
        }))
    }

    async fn config_list(
        &self,
        caller: &Caller,
        c: ListParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = Self::namespace_for(caller, c.namespace.as_ref());
        t.namespace = Some(ns.clone());
        self.require(caller, "list", "clawconfigs", &ns, None)
            .await?;
        let configs = self
            .store
            .list_configs(&ns, &c.prefix)
            .iter()
            .map(|r| ConfigMeta::of(r))
            .collect();
        Ok(Payload::ConfigList { configs })
    }

    fn config_meta_of(obj: &ClawConfig) -> Result<ConfigMeta, InvokeError> {
        let key = convert::config_key(obj)
            .map_err(|e| InvokeError::internal(format!("the written object is invalid: {e}")))?;
        let created = obj
            .metadata
            .creation_timestamp
            .as_ref()
            .map_or_else(now, |t| t.0);
        Ok(ConfigMeta {
            name: key.name,
            namespace: key.namespace,
            immutable: obj.spec.immutable,
            created_at: created,
            updated_at: now().max(created),
        })
    }

    async fn config_create(
        &self,
        caller: &Caller,
        c: ConfigCreate,
        write: Option<WriteRequest>,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(Self::namespace_for(caller, c.namespace.as_ref()), c.name);
        t.namespace = Some(key.namespace.clone());
        t.name = Some(key.name.clone());
        let object = object_name(&key.name);
        self.require(
            caller,
            "create",
            "clawconfigs",
            &key.namespace,
            Some(&object),
        )
        .await?;
        let keyring = self.keyring()?;
        let mut obj = ClawConfig::new(
            &object,
            ClawConfigSpec {
                name: (object != key.name.as_str()).then(|| key.name.to_string()),
                data: c
                    .data
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                    .collect(),
                immutable: c.immutable,
                node_selector: None,
            },
        );
        if let Some(mark) = Self::mark(&keyring, &write) {
            obj.metadata.annotations = Some([(LAST_WRITE_ANNOTATION.to_owned(), mark)].into());
        }
        let api = self.configs(&key.namespace);
        let created = match api.create(&PostParams::default(), &obj).await {
            Ok(created) => {
                let note = if created.spec.immutable {
                    "created, immutable"
                } else {
                    "created"
                };
                self.mutation_event(
                    "ClawConfig",
                    &key,
                    "Created",
                    "config.create",
                    note.to_owned(),
                    caller,
                );
                created
            }
            Err(e) => {
                let err = api_error(e, &key, "config");
                if err.code == ErrorCode::AlreadyExists
                    && let Ok(existing) = api.get(&object).await
                    && Self::is_replay(&keyring, &existing.metadata, &write)?
                {
                    existing
                } else {
                    return Err(err);
                }
            }
        };
        Ok(Payload::ConfigMeta(Self::config_meta_of(&created)?))
    }

    async fn config_update(
        &self,
        caller: &Caller,
        c: ConfigUpdate,
        write: Option<WriteRequest>,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(Self::namespace_for(caller, c.namespace.as_ref()), c.name);
        t.namespace = Some(key.namespace.clone());
        t.name = Some(key.name.clone());
        let object = object_name(&key.name);
        self.require(
            caller,
            "update",
            "clawconfigs",
            &key.namespace,
            Some(&object),
        )
        .await?;
        let keyring = self.keyring()?;
        let api = self.configs(&key.namespace);
        let current = api
            .get(&object)
            .await
            .map_err(|e| api_error(e, &key, "config"))?;
        if Self::is_replay(&keyring, &current.metadata, &write)? {
            return Ok(Payload::ConfigMeta(Self::config_meta_of(&current)?));
        }
        if current.spec.immutable {
            return Err(InvokeError::new(
                ErrorCode::FailedPrecondition,
                format!(
                    "config {:?} is immutable: it cannot be modified after creation; delete it and create it again to change it",
                    key.name.as_str()
                ),
            ));
        }
        let data: std::collections::BTreeMap<String, String> = c
            .data
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
            .collect();
        // A merge patch merges maps key by key; the data must be replaced whole, so removed
        // keys are sent as null.
        let mut data_patch = serde_json::Map::new();
        for k in current.spec.data.keys() {
            data_patch.insert(k.clone(), serde_json::Value::Null);
        }
        for (k, v) in &data {
            data_patch.insert(k.clone(), serde_json::Value::String(v.clone()));
        }
        let mut patch = json!({
            "metadata": { "resourceVersion": current.metadata.resource_version },
            "spec": { "data": data_patch },
        });
        if c.immutable == Some(true) {
            patch["spec"]["immutable"] = json!(true);
        }
        if let Some(mark) = Self::mark(&keyring, &write) {
            patch["metadata"]["annotations"] = json!({ LAST_WRITE_ANNOTATION: mark });
        }
        let updated = api
            .patch(&object, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| api_error(e, &key, "config"))?;
        let note = if updated.spec.immutable {
            "data replaced; now immutable"
        } else {
            "data replaced"
        };
        self.mutation_event(
            "ClawConfig",
            &key,
            "Updated",
            "config.update",
            note.to_owned(),
            caller,
        );
        Ok(Payload::ConfigMeta(Self::config_meta_of(&updated)?))
    }

    async fn config_delete(
        &self,
        caller: &Caller,
        c: NameParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(Self::namespace_for(caller, c.namespace.as_ref()), c.name);
        t.namespace = Some(key.namespace.clone());
        t.name = Some(key.name.clone());
        let object = object_name(&key.name);
        self.require(
            caller,
            "delete",
            "clawconfigs",
            &key.namespace,
            Some(&object),
        )
        .await?;
        self.configs(&key.namespace)
            .delete(&object, &DeleteParams::default())
            .await
            .map_err(|e| api_error(e, &key, "config"))?;
        self.mutation_event(
            "ClawConfig",
            &key,
            "Deleted",
            "config.delete",
            "deleted; nodes remove their copies".to_owned(),
            caller,
        );
        let store = self.store.clone();
        let k = key.clone();
        let _ = tokio::task::spawn_blocking(move || store.delete_config(&k)).await;
        Ok(Payload::Deleted(Deleted {
            name: key.name,
            namespace: key.namespace,
            deleted: true,
        }))
    }
}

/// The ClawSecret or ClawConfig an Event is about.
fn regarding(kind: &str, ns: &Namespace, name: &Name) -> ObjectReference {
    ObjectReference {
        api_version: Some(format!("{}/v1alpha1", crate::k8s::crd::GROUP)),
        kind: Some(kind.to_owned()),
        namespace: Some(ns.to_string()),
        name: Some(object_name(name)),
        ..ObjectReference::default()
    }
}

/// The caller, as an Event's related object: its ServiceAccount for a workload, else the user.
fn caller_reference(caller: &Caller) -> ObjectReference {
    match (&caller.namespace, &caller.workload) {
        (Some(ns), Some(workload)) => ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("ServiceAccount".to_owned()),
            namespace: Some(ns.to_string()),
            name: Some(workload.to_string()),
            ..ObjectReference::default()
        },
        _ => ObjectReference {
            api_version: Some("rbac.authorization.k8s.io/v1".to_owned()),
            kind: Some("User".to_owned()),
            name: Some(caller.subject.clone()),
            ..ObjectReference::default()
        },
    }
}

impl KubeBackend {
    /// Records a write made through node.invoke as a Normal Event on the object (`reason`:
    /// Created, Rotated, Updated or Deleted; `action`: the command; related object: the
    /// caller), so `kubectl describe` shows who changed it from which node. Published in the
    /// background, each as its own Event (see [`crate::k8s::events::emit`]); the audit log is
    /// the record of truth. A retried write that changed nothing records nothing.
    fn mutation_event(
        &self,
        kind: &str,
        key: &ObjectKey,
        reason: &str,
        action: &str,
        note: String,
        caller: &Caller,
    ) {
        let node = self.reporter.instance.as_deref().unwrap_or_default();
        let event = Event {
            type_: EventType::Normal,
            reason: reason.to_owned(),
            note: Some(format!(
                "{note}, by {} through node.invoke on node {node}",
                caller.subject
            )),
            action: action.to_owned(),
            secondary: Some(caller_reference(caller)),
        };
        let reference = regarding(kind, &key.namespace, &key.name);
        let (client, reporter) = (self.client.clone(), self.reporter.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::k8s::events::emit(&client, &reporter, &reference, &event).await {
                tracing::debug!(error = %e, reason = %event.reason, "node.invoke write Event not published");
            }
        });
    }

    /// Records a denial as an Event on the object, in the background: the answer to the caller
    /// does not wait for it, and the audit log (written first) is the record of truth.
    fn access_denied_event(
        &self,
        kind: &str,
        ns: &Namespace,
        name: &Name,
        action: &str,
        caller: &Caller,
    ) {
        // The recorder folds Events with the same regarding object, action and related object
        // into one series and keeps the first note, so the command and the caller go into those
        // fields: otherwise every later denial on the object, by anyone, would only raise the
        // count of the first one and be shown under its subject.
        let event = Event {
            type_: EventType::Warning,
            reason: "AccessDenied".to_owned(),
            note: Some(format!("{} was denied {action}", caller.subject)),
            action: action.to_owned(),
            secondary: Some(caller_reference(caller)),
        };
        let reference = regarding(kind, ns, name);
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!(error = %e, "AccessDenied event not published");
            }
        });
    }
}

impl Backend for KubeBackend {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, InvokeError> {
        self.identity.authenticate(bearer).await
    }

    async fn execute(
        &self,
        caller: &Caller,
        command: Command,
        write: Option<WriteRequest>,
    ) -> (Target, Result<Payload, InvokeError>) {
        let mut target = Target::default();
        let t = &mut target;
        let kind = if Command::is_secret_command(command.name()) {
            "ClawSecret"
        } else {
            "ClawConfig"
        };
        let action = command.name();
        let result = match command {
            Command::SecretCreate(c) => self.secret_create(caller, c, write, t).await,
            Command::SecretGet(c) => self.secret_get(caller, c, t).await,
            Command::SecretDelete(c) => self.secret_delete(caller, c, t).await,
            Command::SecretList(c) => self.secret_list(caller, c, t).await,
            Command::SecretRotate(c) => self.secret_rotate(caller, c, write, t).await,
            Command::ConfigCreate(c) => self.config_create(caller, c, write, t).await,
            Command::ConfigGet(c) => self.config_get(caller, c, t).await,
            Command::ConfigUpdate(c) => self.config_update(caller, c, write, t).await,
            Command::ConfigDelete(c) => self.config_delete(caller, c, t).await,
            Command::ConfigList(c) => self.config_list(caller, c, t).await,
        };
        if let Err(e) = &result
            && e.code == ErrorCode::PermissionDenied
            && let (Some(ns), Some(name)) = (&target.namespace, &target.name)
        {
            self.access_denied_event(kind, ns, name, action, caller);
        }
        (target, result)
    }

    /// Ready once a keyring is loaded (from the API server, or the cache of an earlier run):
    /// every secret command needs it, and without it they answer UNAVAILABLE.
    fn readiness(&self) -> Result<(), String> {
        if self.keyring.read().unwrap().is_some() {
            Ok(())
        } else {
            Err("the master keyring has not been loaded yet (no cache from an earlier run, and the API server has not answered with it)".to_owned())
        }
    }
}
