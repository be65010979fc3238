//! Status conditions, metav1.Condition style: `lastTransitionTime` moves only when a
//! condition's status flips, so writing the same verdict again changes nothing (and so no
//! status write, and no reconcile loop).

use jiff::Timestamp;

use crate::k8s::convert::Invalid;
use crate::k8s::crd::Condition;

pub const READY: &str = "Ready";

/// A condition of `type_`, keeping the transition time of the previous one of the same type
/// when its status did not change.
pub fn condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = find(previous, type_)
        .filter(|c| c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.to_string());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        last_transition_time,
        observed_generation: generation,
    }
}

/// Ready=False for an object that broke `invalid`'s rule: its reason, and its message saying
/// what to fix.
pub fn not_ready(
    previous: &[Condition],
    invalid: &Invalid,
    generation: Option<i64>,
    now: Timestamp,
) -> Condition {
    condition(
        previous,
        READY,
        false,
        invalid.reason,
        invalid.message.clone(),
        generation,
        now,
    )
}

pub fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// `conditions` with `new` in place of the condition of the same type (appended if absent).
pub fn with(mut conditions: Vec<Condition>, new: Condition) -> Vec<Condition> {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(slot) => *slot = new,
        None => conditions.push(new),
    }
    conditions
}

/// Whether the Ready verdict (status, reason, message) differs from the previous one: the
/// moment to publish an Event about it, once rather than on every resync.
pub fn ready_changed(previous: &[Condition], new: &Condition) -> bool {
    find(previous, READY).is_none_or(|p| {
        (p.status.as_str(), p.reason.as_str(), p.message.as_str())
            != (
                new.status.as_str(),
                new.reason.as_str(),
                new.message.as_str(),
            )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_time_moves_only_on_a_flip() {
        let t0: Timestamp = "2025-01-01T00:00:00Z".parse().unwrap();
        let t1: Timestamp = "2025-01-01T00:01:00Z".parse().unwrap();
        let first = condition(&[], READY, false, "InvalidData", "bad".into(), Some(1), t0);
        let prev = vec![first.clone()];
        let same = condition(
            &prev,
            READY,
            false,
            "InvalidName",
            "other".into(),
            Some(2),
            t1,
        );
        assert_eq!(same.last_transition_time, first.last_transition_time);
        assert!(ready_changed(&prev, &same));
        let flipped = condition(&prev, READY, true, "Sealed", "ok".into(), Some(2), t1);
        assert_eq!(flipped.last_transition_time, t1.to_string());
        let conditions = with(prev, flipped.clone());
        assert_eq!(conditions, vec![flipped.clone()]);
        assert!(!ready_changed(&conditions, &flipped));
    }
}
