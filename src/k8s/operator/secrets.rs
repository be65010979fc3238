//! ClawSecret reconciliation: seal plaintext `spec.data` into `spec.sealed` (removing the
//! plaintext in the same write), move the version forward, and report on `status`.

use jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::sync::Arc;

use super::Context;
use super::conditions::{self, READY};
use super::error::{Error, is_conflict};
use super::metrics::ObjectKind;
use crate::crypto::{KeyId, Keyring};
use crate::domain::{ObjectKey, SecretData};
use crate::k8s::component::Component;
use crate::k8s::convert::{self, Invalid};
use crate::k8s::crd::{ClawSecret, ClawSecretStatus, SealedData};
use crate::k8s::last_applied;
use crate::k8s::sealing::{self, Current, Sealing};

pub(super) async fn reconcile(obj: Arc<ClawSecret>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Names and counters only: the object may carry plaintext in spec.data.
    tracing::debug!(namespace = %obj.namespace().unwrap_or_default(), object = %obj.name_any(),
        generation = ?obj.metadata.generation, resource_version = ?obj.metadata.resource_version,
        "reconciling ClawSecret");
    let api: Api<ClawSecret> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let (ctx, api) = (&ctx, &api);
    super::reconciled(
        api,
        obj,
        ctx,
        |obj| apply(obj, ctx, api),
        |obj| async move { deleted(&obj, ctx).await },
    )
    .await
}

async fn apply(
    obj: Arc<ClawSecret>,
    ctx: &Context,
    api: &Api<ClawSecret>,
) -> Result<Action, Error> {
    let key = match convert::secret_key(&obj)
        .and_then(|key| convert::workloads(&obj.spec.allowed_workloads).map(|_| key))
    {
        Ok(key) => key,
        Err(invalid) => return write_status(&obj, ctx, api, Err(invalid)).await,
    };
    if let Some(applied) = Applied::of(&obj) {
        return match seal_stored(&obj, applied, &key, ctx, api).await? {
            // The status follows from the watch event of this very write: writing it now,
            // from here, would race that event's reconciliation (a 409 for one of them).
            Ok(()) => Ok(Action::await_change()),
            Err(invalid) => write_status(&obj, ctx, api, Err(invalid)).await,
        };
    }
    let verdict = verdict(&obj, &ctx.keyring.current(), &ctx.keyring_secret);
    write_status(&obj, ctx, api, verdict).await
}

/// Data stored in the object, not sealed yet: the admission webhook did not see it (not
/// installed, down with a policy that let it through, bypassed).
#[derive(Clone, Copy)]
enum Applied<'a> {
    /// `spec.data`: plaintext, now in etcd's files.
    Plaintext(&'a BTreeMap<String, String>),
    /// `spec.encryptedData`: the output of `claw-secrets seal`, ciphertext.
    Encrypted(&'a str),
}

impl<'a> Applied<'a> {
    fn of(obj: &'a ClawSecret) -> Option<Applied<'a>> {
        match (&obj.spec.data, &obj.spec.encrypted_data) {
            (Some(plain), _) => Some(Applied::Plaintext(plain)),
            (None, Some(text)) => Some(Applied::Encrypted(text)),
            (None, None) => None,
        }
    }

    /// The data, parsed (plaintext) or opened (encrypted) by the same rules as at admission.
    fn data(
        self,
        obj: &ClawSecret,
        key: &ObjectKey,
        keyring: &Keyring,
    ) -> Result<SecretData, Invalid> {
        match self {
            Applied::Plaintext(plain) => convert::secret_data(plain),
            Applied::Encrypted(text) => {
                sealing::open_encrypted(keyring, key, &obj.name_any(), text).map_err(|message| {
                    Invalid {
                        reason: "InvalidEncryptedData",
                        message,
                    }
                })
            }
        }
    }
}

/// Seals data that was stored (`spec.data` or `spec.encryptedData`) and writes the result in
/// one patch that also removes it; data equal to the current version's is only removed (no new
/// version). `Ok(Err(_))`: the data (or the write) is invalid; it is reported on the status.
async fn seal_stored(
    obj: &ClawSecret,
    applied: Applied<'_>,
    key: &ObjectKey,
    ctx: &Context,
    api: &Api<ClawSecret>,
) -> Result<Result<(), Invalid>, Error> {
    // One keyring for the whole seal: it may change under a running operator.
    let keyring = ctx.keyring.current();
    let data = match applied.data(obj, key, &keyring) {
        Ok(d) => d,
        Err(invalid) => return Ok(Err(invalid)),
    };
    let plaintext = matches!(applied, Applied::Plaintext(_));
    let current = Current {
        sealed: obj.spec.sealed.as_ref(),
        high_water: obj.status.as_ref().and_then(|s| s.version),
    };
    let sealing =
        sealing::seal_applied(&keyring, key, current, &data).map_err(|source| Error::Seal {
            namespace: key.namespace.to_string(),
            name: key.name.to_string(),
            source,
        })?;
    drop(data);
    let (sealed, created) = match sealing {
        Sealing::Unchanged => {
            if let Err(invalid) =
                patch_spec(obj, key, api, &plaintext_removal_patch(obj, None)).await?
            {
                return Ok(Err(invalid));
            }
            ctx.metrics.unchanged();
            tracing::info!(namespace = %key.namespace, name = %key.name,
                version = obj.spec.sealed.as_ref().map(|s| s.version),
                "data unchanged since the current version; removed from the object, no new version");
            if plaintext {
                stored_with_plaintext(obj, ctx).await;
            }
            return Ok(Ok(()));
        }
        Sealing::New { sealed, created } => (sealed, created),
    };
    let updated =
        match patch_spec(obj, key, api, &plaintext_removal_patch(obj, Some(&sealed))).await? {
            Ok(updated) => updated,
            Err(invalid) => return Ok(Err(invalid)),
        };
    ctx.metrics.sealed(created);
    tracing::info!(namespace = %key.namespace, name = %key.name, version = sealed.version,
        key_id = %sealed.key_id, "sealed; the applied data removed from the object");
    if plaintext {
        stored_with_plaintext(&updated, ctx).await;
    }
    Ok(Ok(()))
}

/// The reconcile loop found plaintext stored: said as a Warning, since the plaintext stays in
/// etcd's files (and backups) until they are compacted and defragmented.
async fn stored_with_plaintext(obj: &ClawSecret, ctx: &Context) {
    ctx.metrics.sealed_after_storage();
    ctx.event(
        obj,
        EventType::Warning,
        "PlaintextStored",
        "Seal",
        "spec.data was stored before it was sealed (the admission webhook is not installed, was down or was bypassed): sealed and removed now, but etcd's files keep the plaintext until they are compacted and defragmented; check the webhook (docs/operator.md)".to_owned(),
    )
    .await;
}

/// Writes a patch of the object's spec. `Ok(Err(_))`: the server refused the object itself
/// (too large once sealed, say), said on the status rather than retried forever; the patch
/// holds no plaintext, so neither can the server's message about it.
async fn patch_spec(
    obj: &ClawSecret,
    key: &ObjectKey,
    api: &Api<ClawSecret>,
    patch: &Value,
) -> Result<Result<ClawSecret, Invalid>, Error> {
    let name = obj.name_any();
    match api
        .patch(&name, &Component::Operator.patch(), &Patch::Merge(patch))
        .await
    {
        Ok(updated) => Ok(Ok(updated)),
        Err(e) if is_conflict(&e) => Err(Error::Conflict {
            kind: "ClawSecret",
            namespace: key.namespace.to_string(),
            name,
        }),
        Err(kube::Error::Api(s)) if matches!(s.code, 400 | 413 | 422) => Ok(Err(Invalid {
            reason: "SealRejected",
            message: format!(
                "the API server refused the sealed data ({} {}): {}",
                s.code, s.reason, s.message
            ),
        })),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// The merge patch that removes the plaintext (from `spec.data` and kubectl's last-applied
/// annotation) and stores `sealed` if given, guarded by the object's resourceVersion so that an
/// edit made since it was read is never overwritten (409 instead).
fn plaintext_removal_patch(obj: &ClawSecret, sealed: Option<&SealedData>) -> Value {
    let mut patch = json!({
        "metadata": { "resourceVersion": obj.resource_version() },
        "spec": { "data": null, "encryptedData": null },
    });
    if let Some(sealed) = sealed {
        patch["spec"]["sealed"] = json!(sealed);
    }
    if let Some(applied) = obj.annotations().get(last_applied::ANNOTATION) {
        patch["metadata"]["annotations"] =
            json!({ last_applied::ANNOTATION: last_applied::without_plaintext(applied) });
    }
    patch
}

/// What a secret without plaintext is: sealed and deliverable, or why not.
struct Ready {
    version: u64,
    key_id: String,
}

fn verdict(obj: &ClawSecret, keyring: &Keyring, keyring_secret: &str) -> Result<Ready, Invalid> {
    let invalid = |reason, message: String| Invalid { reason, message };
    let Some(record) = convert::secret_record(obj, Vec::new())? else {
        return Err(invalid(
            "NotSealed",
            "the secret has neither data nor sealed: set spec.data to the plaintext to seal".into(),
        ));
    };
    let sealed = obj
        .spec
        .sealed
        .as_ref()
        .expect("a record comes from sealed");
    let known = KeyId::parse(&sealed.key_id)
        .ok()
        .is_some_and(|id| keyring.get(&id).is_some());
    if !known {
        return Err(invalid(
            "UnknownKey",
            format!(
                "sealed with master key {:?}, which is not in the keyring ({keyring_secret}); restore the keyring that sealed it, or write spec.data to seal the secret again",
                sealed.key_id
            ),
        ));
    }
    Ok(Ready {
        version: record.version.get(),
        key_id: sealed.key_id.clone(),
    })
}

fn desired_status(
    obj: &ClawSecret,
    verdict: &Result<Ready, Invalid>,
    now: Timestamp,
) -> ClawSecretStatus {
    let current = obj.status.clone().unwrap_or_default();
    let generation = obj.meta().generation;
    let (version, ready) = match verdict {
        Ok(r) => (
            Some(r.version.max(current.version.unwrap_or(0))),
            conditions::condition(
                &current.conditions,
                READY,
                true,
                "Sealed",
                format!("version {} sealed with key {}", r.version, r.key_id),
                generation,
                now,
            ),
        ),
        Err(invalid) => (
            current.version,
            conditions::not_ready(&current.conditions, invalid, generation, now),
        ),
    };
    ClawSecretStatus {
        version,
        observed_generation: generation,
        conditions: conditions::with(current.conditions, ready),
    }
}

/// Writes the status when it changed (guarded by resourceVersion), and publishes a Warning
/// Event when the object newly became not Ready.
async fn write_status(
    obj: &ClawSecret,
    ctx: &Context,
    api: &Api<ClawSecret>,
    verdict: Result<Ready, Invalid>,
) -> Result<Action, Error> {
    let current = obj.status.clone().unwrap_or_default();
    let desired = desired_status(obj, &verdict, Timestamp::now());
    if desired == current {
        return Ok(Action::await_change());
    }
    let name = obj.name_any();
    let patch = json!({
        "metadata": { "resourceVersion": obj.resource_version() },
        "status": desired,
    });
    match api
        .patch_status(&name, &Component::Operator.patch(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => {}
        Err(e) if is_conflict(&e) => {
            return Err(Error::Conflict {
                kind: "ClawSecret",
                namespace: obj.namespace().unwrap_or_default(),
                name,
            });
        }
        Err(e) => return Err(Error::Kube(e)),
    }
    if let Ok(ready) = &verdict {
        let sealed_by_operator = obj
            .spec
            .sealed
            .as_ref()
            .is_some_and(|s| s.data_digest.is_some());
        if desired.version > current.version && sealed_by_operator {
            // Versions written through node.invoke have no digest; their agent reports them.
            let (reason, note) = if ready.version == 1 {
                (
                    "Created",
                    format!("version 1 sealed with master key {}", ready.key_id),
                )
            } else {
                (
                    "Rotated",
                    format!(
                        "rotated to version {} sealed with master key {}",
                        ready.version, ready.key_id
                    ),
                )
            };
            ctx.event(obj, EventType::Normal, reason, "Seal", note)
                .await;
        }
    }
    if let Err(invalid) = &verdict {
        let ready = conditions::find(&desired.conditions, READY).expect("just set");
        if conditions::ready_changed(&current.conditions, ready) {
            ctx.metrics.rejected(ObjectKind::Secret, invalid.reason);
            tracing::warn!(namespace = %obj.namespace().unwrap_or_default(), %name,
                reason = invalid.reason, message = %invalid.message, "ClawSecret is not ready");
            ctx.event(
                obj,
                EventType::Warning,
                invalid.reason,
                "Validate",
                invalid.message.clone(),
            )
            .await;
        }
    }
    // Looked at again on its next change, or at the next resync sweep (a broken object is not
    // retried in a loop).
    Ok(Action::await_change())
}

/// The Deleted Event of a secret the watch saw deleted.
pub(super) async fn deleted(obj: &ClawSecret, ctx: &Context) {
    let version = obj
        .spec
        .sealed
        .as_ref()
        .map(|s| s.version)
        .max(obj.status.as_ref().and_then(|s| s.version));
    let note = match version {
        Some(v) => format!("deleted at version {v}; nodes remove their copies"),
        None => "deleted before it was sealed".to_owned(),
    };
    tracing::info!(namespace = %obj.namespace().unwrap_or_default(), name = %obj.name_any(),
        "ClawSecret deleted");
    ctx.event(obj, EventType::Normal, "Deleted", "Delete", note)
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{self, DataDigest, SecretIdentity};
    use crate::domain::{Kind, Version};
    use crate::k8s::crd::ClawSecretSpec;
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD as B64;

    fn secret(data: Option<&str>) -> ClawSecret {
        let mut s = ClawSecret::new(
            "db.password",
            ClawSecretSpec {
                name: None,
                data: data.map(|v| BTreeMap::from([("password".to_owned(), v.to_owned())])),
                encrypted_data: None,
                allowed_workloads: vec![],
                node_selector: None,
                sealed: None,
            },
        );
        s.metadata.namespace = Some("team-a".into());
        s.metadata.generation = Some(3);
        s.metadata.resource_version = Some("42".into());
        s
    }

    fn sealed_with(keyring: &Keyring, obj: &mut ClawSecret, version: u64) {
        let key = convert::secret_key(obj).unwrap();
        let data = convert::secret_data(&BTreeMap::from([("k".into(), "v".into())])).unwrap();
        let version = Version::new(version).unwrap();
        let env = crypto::seal(
            keyring,
            &SecretIdentity {
                kind: Kind::Secret,
                namespace: &key.namespace,
                name: &key.name,
                version,
            },
            &data,
        )
        .unwrap();
        let identity = SecretIdentity {
            kind: Kind::Secret,
            namespace: &key.namespace,
            name: &key.name,
            version,
        };
        obj.spec.sealed = Some(SealedData {
            version: version.get(),
            key_id: env.key_id().to_string(),
            envelope: B64.encode(env.to_bytes()),
            seal_time: "2025-01-01T00:00:00Z".into(),
            data_digest: Some(DataDigest::of(keyring, &identity, &data).to_string()),
        });
    }

    #[test]
    fn the_seal_patch_removes_plaintext_everywhere_and_is_guarded() {
        let mut s = secret(Some("canary-7f3a"));
        s.metadata.annotations = Some(BTreeMap::from([(
            last_applied::ANNOTATION.to_owned(),
            serde_json::to_string(&json!({
                "apiVersion": "clawbernetes.io/v1beta1", "kind": "ClawSecret",
                "metadata": {"name": "db.password"},
                "spec": {"data": {"password": "canary-7f3a"}, "allowedWorkloads": ["api"]},
            }))
            .unwrap(),
        )]));
        let sealed = SealedData {
            version: 1,
            key_id: "k-1".into(),
            envelope: "AAAA".into(),
            seal_time: "2025-01-01T00:00:00Z".into(),
            data_digest: None,
        };
        let patch = plaintext_removal_patch(&s, Some(&sealed));
        let text = patch.to_string();
        assert!(!text.contains("canary"), "{text}");
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        assert!(patch["spec"]["data"].is_null());
        assert_eq!(patch["spec"]["sealed"]["keyId"], "k-1");
        // No finalizer: deleting never waits for the operator.
        assert!(patch["metadata"].get("finalizers").is_none());
        assert!(patch["spec"]["encryptedData"].is_null());
        let applied: Value = serde_json::from_str(
            patch["metadata"]["annotations"][last_applied::ANNOTATION]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(applied["spec"], json!({"allowedWorkloads": ["api"]}));
        // Objects created without kubectl apply get no annotation in the patch.
        let plain = plaintext_removal_patch(&secret(Some("x")), Some(&sealed));
        assert!(plain["metadata"].get("annotations").is_none());
    }

    #[test]
    fn status_reports_sealed_versions_and_why_not() {
        let ring = Keyring::generate().unwrap();
        let now: Timestamp = "2025-01-02T00:00:00Z".parse().unwrap();
        let mut s = secret(None);
        let v = verdict(&s, &ring, "ns/key");
        assert_eq!(v.as_ref().err().unwrap().reason, "NotSealed");

        sealed_with(&ring, &mut s, 2);
        let v = verdict(&s, &ring, "ns/key");
        let status = desired_status(&s, &v, now);
        assert_eq!(status.version, Some(2));
        assert_eq!(status.observed_generation, Some(3));
        let ready = &status.conditions[0];
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", "Sealed")
        );
        assert!(ready.message.starts_with("version 2 sealed with key k-"));
        // The same verdict again is the same status: nothing to write.
        s.status = Some(status.clone());
        let later: Timestamp = "2025-01-03T00:00:00Z".parse().unwrap();
        assert_eq!(desired_status(&s, &v, later), status);

        // A key the keyring does not have.
        let other = Keyring::generate().unwrap();
        let err = verdict(&s, &other, "ns/key").err().unwrap();
        assert_eq!(err.reason, "UnknownKey");
        let broken = desired_status(&s, &Err(err), later);
        assert_eq!(broken.version, Some(2), "the version is kept");
        assert_eq!(broken.conditions[0].status, "False");
        assert_eq!(broken.conditions[0].last_transition_time, later.to_string());

        // Going back to an older version is refused.
        s.status.as_mut().unwrap().version = Some(5);
        assert_eq!(
            verdict(&s, &ring, "ns/key").err().unwrap().reason,
            "VersionRegressed"
        );

        // A tampered envelope.
        s.spec.sealed.as_mut().unwrap().envelope = "not base64!".into();
        assert_eq!(
            verdict(&s, &ring, "ns/key").err().unwrap().reason,
            "InvalidSealedData"
        );
    }
}
