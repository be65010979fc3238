//! ClawConfig reconciliation: validate the data, and report on `status` what the nodes deliver
//! (`status.acceptedDataHash`) and whether the config is Ready.
//!
//! The status is a function of the spec (and the time it was first observed): deleted, it is
//! rebuilt the same by the next reconcile. Immutability is the API server's, as for core
//! ConfigMaps: the CRD's CEL transition rules refuse new data over an immutable config and
//! `immutable` going back to false (the chart requires Kubernetes 1.30, where they are always
//! enforced), so the operator keeps no memory of what it accepted before.

use jiff::Timestamp;
use kube::api::{Api, Patch};
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Resource, ResourceExt};
use serde_json::json;
use std::sync::Arc;

use super::Context;
use super::conditions::{self, READY};
use super::error::{Error, is_conflict};
use super::metrics::ObjectKind;
use crate::k8s::component::Component;
use crate::k8s::convert::{self, Invalid};
use crate::k8s::crd::{ClawConfig, ClawConfigStatus};

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

/// Whether a config's current data can be delivered: its name and data are valid.
fn validate(obj: &ClawConfig) -> Result<(), Invalid> {
    convert::config_key(obj).and_then(|_| convert::config_data(&obj.spec.data).map(|_| ()))
}

async fn apply(obj: &ClawConfig, ctx: &Context, api: &Api<ClawConfig>) -> Result<Action, Error> {
    let current = obj.status.clone().unwrap_or_default();
    let verdict = validate(obj);
    let desired = desired_status(obj, &verdict, Timestamp::now());
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
        match &verdict {
            Ok(()) => {
                if desired.accepted_data_hash != current.accepted_data_hash {
                    tracing::info!(%namespace, %name, hash = %desired.accepted_data_hash.as_deref().unwrap_or_default(),
                        "ClawConfig data accepted");
                }
            }
            Err(invalid) => {
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
    // Looked at again on its next change, or at the next resync sweep.
    let _ = verdict;
    Ok(Action::await_change())
}

/// The status a config should have: computed from its spec, keeping from the current status
/// only the times of what did not change (`acceptedTime` while the data is the same, each
/// condition's `lastTransitionTime` while its status is the same).
///
/// Valid data is accepted: its hash is what nodes deliver. Invalid data is not: the hash is
/// cleared, and nodes keep the copy they have until the data is fixed or the config deleted.
fn desired_status(
    obj: &ClawConfig,
    verdict: &Result<(), Invalid>,
    now: Timestamp,
) -> ClawConfigStatus {
    let current = obj.status.clone().unwrap_or_default();
    let generation = obj.meta().generation;
    let (accepted_data_hash, accepted_time, ready) = match verdict {
        Ok(()) => {
            let hash = convert::data_hash(&obj.spec.data);
            let accepted_time = match &current.accepted_time {
                Some(t) if current.accepted_data_hash.as_deref() == Some(hash.as_str()) => {
                    t.clone()
                }
                _ => now.to_string(),
            };
            let ready = conditions::condition(
                &current.conditions,
                READY,
                true,
                "Accepted",
                format!(
                    "data accepted (sha256 {}); nodes deliver it",
                    hash.get(..12).unwrap_or(&hash)
                ),
                generation,
                now,
            );
            (Some(hash), Some(accepted_time), ready)
        }
        Err(invalid) => {
            let ready = conditions::not_ready(&current.conditions, invalid, generation, now);
            (None, None, ready)
        }
    };
    ClawConfigStatus {
        accepted_time,
        accepted_data_hash,
        observed_generation: generation,
        // Ready is the one condition; any other (e.g. the `Immutable` latch of releases before
        // v1beta1) is dropped.
        conditions: vec![ready],
    }
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
    use crate::k8s::crd::{ClawConfigSpec, Condition};
    use std::collections::BTreeMap;

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

    fn observe(c: &ClawConfig, now: Timestamp) -> ClawConfigStatus {
        desired_status(c, &validate(c), now)
    }

    /// A condition without its times.
    type Fact = (String, String, String);

    /// The status without its times: what must come out the same however it was lost.
    fn observed_facts(s: &ClawConfigStatus) -> (Option<String>, Option<i64>, Vec<Fact>) {
        (
            s.accepted_data_hash.clone(),
            s.observed_generation,
            s.conditions
                .iter()
                .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
                .collect(),
        )
    }

    #[test]
    fn the_status_is_rebuilt_from_the_spec_alone() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2025-01-02T00:00:00Z".parse().unwrap();
        let accepted_a = observe(&config(&[("mode", "fast")], true), t0);
        let mut latched = accepted_a.clone();
        latched.conditions.push(Condition {
            type_: "Immutable".into(),
            status: "True".into(),
            reason: "AcceptedAsImmutable".into(),
            message: "the latch of earlier releases".into(),
            last_transition_time: t0.to_string(),
            observed_generation: Some(1),
        });
        let refused = observe(&config(&[("bad key", "x")], true), t0);
        for (immutable, data) in [
            (true, ("mode", "slow")),
            (false, ("mode", "slow")),
            (true, ("bad key", "x")),
        ] {
            let fresh = config(&[data], immutable);
            let expected = observe(&fresh, t1);
            for prior in [&accepted_a, &latched, &refused] {
                let mut c = fresh.clone();
                c.status = Some(prior.clone());
                assert_eq!(
                    observed_facts(&observe(&c, t1)),
                    observed_facts(&expected),
                    "status {prior:?} for {data:?} (immutable: {immutable})"
                );
            }
        }
        // Whatever it was before, new valid data is what nodes deliver.
        let mut c = config(&[("mode", "slow")], true);
        c.status = Some(latched);
        let status = observe(&c, t1);
        assert_eq!(
            status.accepted_data_hash,
            Some(convert::data_hash(&c.spec.data))
        );
        assert_eq!(status.accepted_time, Some(t1.to_string()));
        assert_eq!(status.conditions.len(), 1, "the Immutable latch is dropped");
    }

    #[test]
    fn invalid_data_is_not_delivered() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let status = observe(&config(&[("bad key", "x")], false), t0);
        assert_eq!(status.accepted_data_hash, None);
        assert_eq!(status.accepted_time, None);
        let ready = conditions::find(&status.conditions, READY).unwrap();
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("False", "InvalidData")
        );
    }

    #[test]
    fn unchanged_data_is_not_a_new_update() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2025-01-02T00:00:00Z".parse().unwrap();
        let mut c = config(&[("mode", "fast")], false);
        c.status = Some(observe(&c, t0));
        let again = observe(&c, t1);
        assert_eq!(Some(&again), c.status.as_ref());
        // New data is a new update.
        c.spec.data.insert("mode".into(), "slow".into());
        c.metadata.generation = Some(2);
        let changed = observe(&c, t1);
        assert_eq!(changed.accepted_time, Some(t1.to_string()));
        assert_eq!(changed.observed_generation, Some(2));
    }
}
