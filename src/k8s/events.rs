//! Audit Events on ClawSecrets and ClawConfigs (`kubectl describe` shows them).
//!
//! Reasons used by this project: `Created`, `Rotated`, `Deleted` (operator, Normal),
//! invalid-object reasons such as `InvalidData` and `PlaintextStored` (operator, Warning),
//! `Created`, `Rotated`, `Updated`, `Deleted` for writes made through node.invoke (node agents,
//! Normal, with the caller as the related object) and `AccessDenied` (node agents, Warning).
//! Notes name objects, versions, key ids and callers, never values.

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

/// Who reports: a controller name (`Component::controller`) and the instance (pod name).
pub fn reporter(controller: &str, instance: &str) -> Reporter {
    Reporter {
        controller: controller.to_owned(),
        instance: Some(instance.to_owned()),
    }
}

/// An Event with no related object: what the operator reports about the objects it seals.
pub fn event(type_: EventType, reason: &str, action: &str, note: String) -> Event {
    Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    }
}

/// Publishes one Event about `regarding`.
///
/// Every call creates its own Event object: a seal, a rotation or a deletion is a distinct
/// happening with its own note (version, key id), so it must not be folded into the series of
/// an earlier one, which is what a long-lived [`Recorder`] does with repeats of the same reason
/// within a few minutes. Callers that want repeats folded (e.g. denials) keep a `Recorder`.
pub async fn emit(
    client: &kube::Client,
    reporter: &Reporter,
    regarding: &ObjectReference,
    event: &Event,
) -> Result<(), kube::Error> {
    Recorder::new(client.clone(), reporter.clone())
        .publish(event, regarding)
        .await
}
