//! ClawConfig reconciliation: accept the data (record its hash in `status.acceptedDataHash`)
//! or refuse it (ImmutableViolation), and report on `status`.
//!
//! Node agents deliver a config's data only while its hash equals `status.acceptedDataHash`.
//! That is how immutability holds even on API servers without CEL validation: data written
//! over an immutable config is never accepted, so no node ever serves it.

use jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;

use super::conditions::{self, READY};
use super::error::{Error, is_conflict};
use super::metrics::ObjectKind;
use super::{Context, RESYNC};
use crate::k8s::component::Component;
use crate::k8s::convert::{self, Invalid};
use crate::k8s::crd::{ClawConfig, ClawConfigStatus};

/// Condition recording that the operator accepted the config as immutable: from then on no
/// other data is accepted and `immutable` cannot go back to false, whatever the server allowed.
pub const IMMUTABLE: &str = "Immutable";

pub(super) async fn reconcile(obj: Arc<ClawConfig>, ctx: Arc<Context>) -> Result<Action, Error> {
    // Names and counters only: the object may carry plaintext in spec.data.
    tracing::debug!(namespace = %obj.namespace().unwrap_or_default(), object = %obj.name_any(),
        generation = ?obj.metadata.generation, resource_version = ?obj.metadata.resource_version,
        "reconciling ClawConfig");
    let api: Api<ClawConfig> =
        Api::namespaced(ctx.client.clone(), &obj.namespace().unwrap_or_default());
    let (ctx, api) = (&ctx, &api);
    super::reconciled(
        api,
        obj,
        ctx,
        |obj| async move { apply(&obj, ctx, api).await },
        |obj| async move { deleted(&obj, ctx).await },
    )
    .await
}

/// What to do with a config's current data.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Accept it; `changed` when it differs from the data accepted before (if any).
    Accept { changed: bool },
    /// Refuse it: nodes keep the data accepted before.
    Refuse(Invalid),
}

/// The immutability rule, decided from the data's hash, the hash accepted before, whether the
/// accepted config was immutable, and whether the config says it is immutable now.
///
/// Immutability belongs to what was accepted: a config accepted as immutable accepts no other
/// data and cannot become mutable again. A mutable config that is made immutable and given
/// new data in the same write is accepted with that data (the API server's CEL rule, which
/// compares with the previous object, allows exactly that too).
pub(crate) fn decide(
    hash: &str,
    accepted: Option<&str>,
    accepted_as_immutable: bool,
    immutable_now: bool,
) -> Decision {
    let short = |h: &str| h.get(..12).unwrap_or(h).to_owned();
    if accepted_as_immutable && !immutable_now {
        return Decision::Refuse(Invalid {
            reason: "ImmutableViolation",
            message: "spec.immutable cannot be set back to false once the config was accepted as immutable; set it to true again (nodes keep the accepted data), or delete the ClawConfig and create it again".to_owned(),
        });
    }
    match accepted {
        None => Decision::Accept { changed: true },
        Some(a) if a == hash => Decision::Accept { changed: false },
        Some(a) if accepted_as_immutable => Decision::Refuse(Invalid {
            reason: "ImmutableViolation",
            message: format!(
                "the data of an immutable ClawConfig cannot change: nodes keep delivering the accepted data (sha256 {}); restore it, or delete the ClawConfig and create it again",
                short(a)
            ),
        }),
        Some(_) => Decision::Accept { changed: true },
    }
}

async fn apply(obj: &ClawConfig, ctx: &Context, api: &Api<ClawConfig>) -> Result<Action, Error> {
    let current = obj.status.clone().unwrap_or_default();
    let decision = match convert::config_key(obj).and_then(|_| convert::config_data(&obj.spec.data))
    {
        Err(invalid) => Decision::Refuse(invalid),
        Ok(_) => decide(
            &convert::data_hash(&obj.spec.data),
            current.accepted_data_hash.as_deref(),
            accepted_as_immutable(&current),
            obj.spec.immutable,
        ),
    };
    let desired = desired_status(obj, &decision, Timestamp::now());
    if desired != current {
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
                    kind: "ClawConfig",
                    namespace: obj.namespace().unwrap_or_default(),
                    name,
                });
            }
            Err(e) => return Err(Error::Kube(e)),
        }
        let namespace = obj.namespace().unwrap_or_default();
        match &decision {
            Decision::Accept { changed: true } => {
                tracing::info!(%namespace, %name, hash = %desired.accepted_data_hash.as_deref().unwrap_or_default(),
                    "ClawConfig data accepted");
            }
            Decision::Accept { changed: false } => {}
            Decision::Refuse(invalid) => {
                let ready = conditions::find(&desired.conditions, READY).expect("just set");
                if conditions::ready_changed(&current.conditions, ready) {
                    ctx.metrics.rejected(ObjectKind::Config, invalid.reason);
                    tracing::warn!(%namespace, %name, reason = invalid.reason,
                        message = %invalid.message, "ClawConfig is not ready");
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
        }
    }
    Ok(match decision {
        Decision::Accept { .. } => Action::requeue(RESYNC),
        Decision::Refuse(_) => Action::await_change(),
    })
}

fn accepted_as_immutable(status: &ClawConfigStatus) -> bool {
    conditions::find(&status.conditions, IMMUTABLE).is_some_and(|c| c.status == "True")
}

fn desired_status(obj: &ClawConfig, decision: &Decision, now: Timestamp) -> ClawConfigStatus {
    let current = obj.status.clone().unwrap_or_default();
    let generation = obj.meta().generation;
    let mut status = ClawConfigStatus {
        observed_generation: generation,
        ..current.clone()
    };
    let ready = match decision {
        Decision::Accept { changed } => {
            let hash = convert::data_hash(&obj.spec.data);
            if *changed || status.accepted_time.is_none() {
                status.accepted_time = Some(now.to_string());
            }
            let message = format!(
                "data accepted (sha256 {}); nodes deliver it",
                hash.get(..12).unwrap_or(&hash)
            );
            status.accepted_data_hash = Some(hash);
            if obj.spec.immutable {
                let immutable = conditions::condition(
                    &current.conditions,
                    IMMUTABLE,
                    true,
                    "AcceptedAsImmutable",
                    "accepted as immutable: its data can no longer change".to_owned(),
                    generation,
                    now,
                );
                status.conditions = conditions::with(status.conditions, immutable);
            }
            conditions::condition(
                &current.conditions,
                READY,
                true,
                "Accepted",
                message,
                generation,
                now,
            )
        }
        Decision::Refuse(invalid) => conditions::condition(
            &current.conditions,
            READY,
            false,
            invalid.reason,
            invalid.message.clone(),
            generation,
            now,
        ),
    };
    status.conditions = conditions::with(status.conditions, ready);
    status
}

/// The Deleted Event of a config the watch saw deleted.
pub(super) async fn deleted(obj: &ClawConfig, ctx: &Context) {
    tracing::info!(namespace = %obj.namespace().unwrap_or_default(), name = %obj.name_any(),
        "ClawConfig deleted");
    ctx.event(
        obj,
        EventType::Normal,
        "Deleted",
        "Delete",
        "deleted; nodes remove their copies".to_owned(),
    )
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::ClawConfigSpec;
    use std::collections::BTreeMap;

    const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

    fn reason(d: Decision) -> &'static str {
        match d {
            Decision::Refuse(i) => i.reason,
            Decision::Accept { .. } => "Accepted",
        }
    }

    #[test]
    fn immutability_is_enforced_by_the_accepted_state() {
        // First sight: whatever the data, it is accepted.
        assert_eq!(
            decide(A, None, false, false),
            Decision::Accept { changed: true }
        );
        assert_eq!(
            decide(A, None, false, true),
            Decision::Accept { changed: true }
        );
        // Unchanged data.
        assert_eq!(
            decide(A, Some(A), true, true),
            Decision::Accept { changed: false }
        );
        // A mutable config takes new data, also when it becomes immutable in the same write.
        assert_eq!(
            decide(B, Some(A), false, false),
            Decision::Accept { changed: true }
        );
        assert_eq!(
            decide(B, Some(A), false, true),
            Decision::Accept { changed: true }
        );
        // An immutable one does not (a server without CEL let the write through).
        assert_eq!(reason(decide(B, Some(A), true, true)), "ImmutableViolation");
        // Nor can it be made mutable again, with or without new data.
        assert_eq!(
            reason(decide(A, Some(A), true, false)),
            "ImmutableViolation"
        );
        assert_eq!(
            reason(decide(B, Some(A), true, false)),
            "ImmutableViolation"
        );
    }

    fn config(data: &[(&str, &str)], immutable: bool) -> ClawConfig {
        let mut c = ClawConfig::new(
            "app.settings",
            ClawConfigSpec {
                name: None,
                data: data
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                    .collect::<BTreeMap<_, _>>(),
                immutable,
                node_selector: None,
            },
        );
        c.metadata.namespace = Some("team-a".into());
        c.metadata.generation = Some(1);
        c
    }

    #[test]
    fn refused_data_keeps_the_accepted_hash_for_the_agents() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2025-01-02T00:00:00Z".parse().unwrap();
        let mut c = config(&[("mode", "fast")], true);
        let first = desired_status(&c, &Decision::Accept { changed: true }, t0);
        let accepted = convert::data_hash(&c.spec.data);
        assert_eq!(first.accepted_data_hash.as_deref(), Some(accepted.as_str()));
        assert_eq!(first.accepted_time, Some(t0.to_string()));
        assert!(accepted_as_immutable(&first));
        c.status = Some(first);

        // The data changes behind CEL's back.
        c.spec.data.insert("mode".into(), "slow".into());
        c.metadata.generation = Some(2);
        let status = c.status.as_ref().unwrap();
        let d = decide(
            &convert::data_hash(&c.spec.data),
            status.accepted_data_hash.as_deref(),
            accepted_as_immutable(status),
            c.spec.immutable,
        );
        let refused = desired_status(&c, &d, t1);
        assert_eq!(
            refused.accepted_data_hash.as_deref(),
            Some(accepted.as_str())
        );
        assert_eq!(refused.accepted_time, Some(t0.to_string()));
        let ready = conditions::find(&refused.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "ImmutableViolation")
        );
        assert!(
            accepted_as_immutable(&refused),
            "the memory of immutability stays"
        );
    }

    #[test]
    fn unchanged_data_is_not_a_new_update() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2025-01-02T00:00:00Z".parse().unwrap();
        let mut c = config(&[("mode", "fast")], false);
        c.status = Some(desired_status(&c, &Decision::Accept { changed: true }, t0));
        let again = desired_status(&c, &Decision::Accept { changed: false }, t1);
        assert_eq!(Some(&again), c.status.as_ref());
        assert!(!accepted_as_immutable(&again));
    }
}
