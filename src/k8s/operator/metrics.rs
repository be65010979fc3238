//! The operator's metrics (`prometheus-client`, OpenMetrics text on `/metrics`).
//!
//! Labels only ever hold kinds, results, error labels and condition reasons: never object
//! names (unbounded) and never values. Every series of a bounded label set is created at
//! start, at zero, so a dashboard sees it before the first event.

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::fmt::Write as _;
use std::time::Duration;

use super::error::Error;

/// Which controller a sample belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ObjectKind {
    Secret,
    Config,
}

impl ObjectKind {
    const ALL: [ObjectKind; 2] = [ObjectKind::Secret, ObjectKind::Config];

    pub fn label(self) -> &'static str {
        match self {
            ObjectKind::Secret => "ClawSecret",
            ObjectKind::Config => "ClawConfig",
        }
    }
}

/// How one reconciliation ended. `Conflict` (someone else wrote the object meanwhile) is
/// routine under concurrent edits and retried at once, so it is not counted as an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Success,
    Conflict,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 3] = [Outcome::Success, Outcome::Conflict, Outcome::Error];

    fn label(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Conflict => "conflict",
            Outcome::Error => "error",
        }
    }
}

impl EncodeLabelValue for ObjectKind {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(self.label())
    }
}

impl EncodeLabelValue for Outcome {
    fn encode(&self, w: &mut LabelValueEncoder) -> std::fmt::Result {
        w.write_str(self.label())
    }
}

/// How the admission webhook answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Sealed,
    Unchanged,
    Refused,
    Failed,
}

impl Admission {
    const ALL: [Admission; 4] = [
        Admission::Sealed,
        Admission::Unchanged,
        Admission::Refused,
        Admission::Failed,
    ];

    fn label(self) -> &'static str {
        match self {
            Admission::Sealed => "sealed",
            Admission::Unchanged => "unchanged",
            Admission::Refused => "refused",
            Admission::Failed => "failed",
        }
    }
}

/// How a node's `GET /v1/deliveries` was answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivered {
    /// The node's whole set.
    Full,
    /// What changed since the node's cursor.
    Changes,
    /// Nothing changed within the wait (304).
    Unchanged,
    /// Refused: no or a wrong token, no key published, still starting.
    Refused,
}

impl Delivered {
    const ALL: [Delivered; 4] = [
        Delivered::Full,
        Delivered::Changes,
        Delivered::Unchanged,
        Delivered::Refused,
    ];

    fn label(self) -> &'static str {
        match self {
            Delivered::Full => "full",
            Delivered::Changes => "changes",
            Delivered::Unchanged => "unchanged",
            Delivered::Refused => "refused",
        }
    }
}

/// Upper bounds (seconds) of the reconcile duration histogram.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reconciled {
    kind: ObjectKind,
    result: Outcome,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Failed {
    kind: ObjectKind,
    error: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Sealed {
    event: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Admitted {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SealedUnder {
    key_id: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Answered {
    answer: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Rejected {
    kind: ObjectKind,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: ObjectKind,
}

pub struct Metrics {
    registry: Registry,
    leader: Gauge,
    leadership_lost: Counter,
    reconciliations: Family<Reconciled, Counter>,
    errors: Family<Failed, Counter>,
    seals: Family<Sealed, Counter>,
    /// ClawSecrets the reconcile loop found stored with plaintext (the webhook did not seal them).
    plaintext_stored: Counter,
    /// Admission reviews answered by this replica's webhook, by result.
    admissions: Family<Admitted, Counter>,
    /// Objects reported not Ready, by condition reason (a small fixed set of CamelCase words).
    rejections: Family<Rejected, Counter>,
    durations: Family<KindLabel, Histogram>,
    /// Nodes' delivery requests answered by this replica, by answer (no node label: a cluster
    /// may have thousands).
    deliveries: Family<Answered, Counter>,
    /// Secrets sealed for a node in those answers.
    secrets_delivered: Counter,
    /// Secrets meant for a node that could not be delivered (invalid, or sealed with a master
    /// key the keyring lacks).
    undeliverable: Counter,
    /// ClawSecrets by the master key their current version is sealed under, as the last
    /// re-encryption pass counted them (a handful of key ids at most).
    sealed_under: Family<SealedUnder, Gauge>,
    /// Versions sealed again under the active master key by re-encryption.
    reencrypted: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("claw_secrets_operator");
        let leader = Gauge::default();
        let leadership_lost = Counter::default();
        let reconciliations = Family::<Reconciled, Counter>::default();
        let errors = Family::<Failed, Counter>::default();
        let seals = Family::<Sealed, Counter>::default();
        let plaintext_stored = Counter::default();
        let admissions = Family::<Admitted, Counter>::default();
        let rejections = Family::<Rejected, Counter>::default();
        let durations = Family::<KindLabel, Histogram>::new_with_constructor(
            (|| Histogram::new(BUCKETS)) as fn() -> Histogram,
        );
        let deliveries = Family::<Answered, Counter>::default();
        let secrets_delivered = Counter::default();
        let undeliverable = Counter::default();
        let sealed_under = Family::<SealedUnder, Gauge>::default();
        let reencrypted = Counter::default();
        registry.register(
            "sealed_objects",
            "ClawSecrets by the master key their current version is sealed under, as the last \
             re-encryption pass counted them: once a retired key is at 0, no ClawSecret needs it",
            sealed_under.clone(),
        );
        registry.register(
            "reencrypted",
            "ClawSecret versions sealed again under the active master key (same version and data, \
             a new envelope) by background re-encryption",
            reencrypted.clone(),
        );
        registry.register(
            "deliveries",
            "Nodes' GET /v1/deliveries answered by this replica: full (the node's whole set), \
             changes (since its cursor), unchanged (nothing within the wait) or refused",
            deliveries.clone(),
        );
        registry.register(
            "secrets_delivered",
            "Secrets sealed for a node in this replica's delivery answers",
            secrets_delivered.clone(),
        );
        registry.register(
            "undeliverable",
            "Secrets meant for a node that could not be delivered (invalid, or sealed with a \
             master key the keyring lacks; the operator's log names them)",
            undeliverable.clone(),
        );
        for answer in Delivered::ALL {
            let _ = deliveries.get_or_create(&Answered {
                answer: answer.label(),
            });
        }
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease and runs the controllers",
            leader.clone(),
        );
        registry.register(
            "leadership_lost",
            "Times this replica lost the leader Lease (it could not renew it in time, or another \
             replica holds it) and stood by again",
            leadership_lost.clone(),
        );
        registry.register(
            "reconciliations",
            "Reconciliations by kind and result (conflict: the object changed meanwhile; retried)",
            reconciliations.clone(),
        );
        registry.register(
            "errors",
            "Failed reconciliations by kind and error",
            errors.clone(),
        );
        registry.register(
            "seals",
            "Plaintext data the operator took out of ClawSecrets: sealed as the first version (created) or a rotation (rotated), or the current version's data again (unchanged: no new version)",
            seals.clone(),
        );
        registry.register(
            "plaintext_stored",
            "ClawSecrets found stored with plaintext in spec.data (the admission webhook was down, \
             bypassed or not installed) and sealed by the reconcile loop: the plaintext is in \
             etcd's files until they are compacted and defragmented",
            plaintext_stored.clone(),
        );
        registry.register(
            "admissions",
            "ClawSecret writes with data answered by this replica's admission webhook: sealed (a \
             new version), unchanged (the current version's data), refused (invalid data, the \
             rule named in the answer) or failed (this replica could not seal)",
            admissions.clone(),
        );
        registry.register(
            "not_ready",
            "Times an object was reported not Ready, by kind and condition reason",
            rejections.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Time taken by one reconciliation",
            durations.clone(),
        );
        for kind in ObjectKind::ALL {
            for result in Outcome::ALL {
                let _ = reconciliations.get_or_create(&Reconciled { kind, result });
            }
            for error in Error::METRIC_LABELS {
                let _ = errors.get_or_create(&Failed { kind, error });
            }
            let _ = durations.get_or_create(&KindLabel { kind });
        }
        for event in ["created", "rotated", "unchanged"] {
            let _ = seals.get_or_create(&Sealed { event });
        }
        for result in Admission::ALL {
            let _ = admissions.get_or_create(&Admitted {
                result: result.label(),
            });
        }
        Metrics {
            sealed_under,
            reencrypted,
            registry,
            leader,
            leadership_lost,
            reconciliations,
            errors,
            seals,
            plaintext_stored,
            admissions,
            rejections,
            durations,
            deliveries,
            secrets_delivered,
            undeliverable,
        }
    }
}

impl Metrics {
    /// The counts of one re-encryption pass, replacing the last pass's.
    pub fn set_sealed_under(&self, counts: &std::collections::BTreeMap<String, usize>) {
        self.sealed_under.clear();
        for (key_id, n) in counts {
            self.sealed_under
                .get_or_create(&SealedUnder {
                    key_id: key_id.clone(),
                })
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
    }

    pub fn reencrypted(&self) {
        self.reencrypted.inc();
    }
}

impl Metrics {
    pub fn reconciled(&self, kind: ObjectKind, result: Outcome, took: Duration) {
        self.reconciliations
            .get_or_create(&Reconciled { kind, result })
            .inc();
        self.durations
            .get_or_create(&KindLabel { kind })
            .observe(took.as_secs_f64());
    }

    pub fn error(&self, kind: ObjectKind, error: &Error) {
        self.errors
            .get_or_create(&Failed {
                kind,
                error: error.metric_label(),
            })
            .inc();
    }

    /// A secret was sealed: its first version (`created`) or a rotation.
    pub fn sealed(&self, created: bool) {
        let event = if created { "created" } else { "rotated" };
        self.seals.get_or_create(&Sealed { event }).inc();
    }

    /// Data equal to the current version's was applied again: plaintext removed, no new version.
    pub fn unchanged(&self) {
        self.seals
            .get_or_create(&Sealed { event: "unchanged" })
            .inc();
    }

    /// The reconcile loop sealed plaintext that had been stored (the webhook did not).
    pub fn sealed_after_storage(&self) {
        self.plaintext_stored.inc();
    }

    /// The webhook answered an admission review.
    pub fn admitted(&self, result: Admission) {
        self.admissions
            .get_or_create(&Admitted {
                result: result.label(),
            })
            .inc();
    }

    /// An object was newly reported not Ready with `reason`.
    pub fn rejected(&self, kind: ObjectKind, reason: &'static str) {
        self.rejections
            .get_or_create(&Rejected { kind, reason })
            .inc();
    }

    /// A node's delivery request was answered `answer`, with `secrets` sealed for it.
    pub fn delivered(&self, answer: Delivered, secrets: usize) {
        self.deliveries
            .get_or_create(&Answered {
                answer: answer.label(),
            })
            .inc();
        self.secrets_delivered.inc_by(secrets as u64);
    }

    pub fn undeliverable(&self) {
        self.undeliverable.inc();
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    pub fn lost_leadership(&self) {
        self.leadership_lost.inc();
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.set_leader(true);
        m.reconciled(
            ObjectKind::Secret,
            Outcome::Success,
            Duration::from_millis(3),
        );
        m.reconciled(
            ObjectKind::Secret,
            Outcome::Success,
            Duration::from_millis(70),
        );
        m.reconciled(ObjectKind::Config, Outcome::Error, Duration::from_secs(60));
        m.error(
            ObjectKind::Config,
            &Error::Conflict {
                kind: "ClawConfig",
                namespace: "n".into(),
                name: "c".into(),
            },
        );
        m.sealed(true);
        m.rejected(ObjectKind::Secret, "InvalidData");
        m.delivered(Delivered::Full, 3);
        m.delivered(Delivered::Changes, 1);
        let text = m.render();
        for line in [
            "claw_secrets_operator_leader 1",
            "claw_secrets_operator_reconciliations_total{kind=\"ClawSecret\",result=\"success\"} 2",
            "claw_secrets_operator_reconciliations_total{kind=\"ClawConfig\",result=\"error\"} 1",
            "claw_secrets_operator_errors_total{kind=\"ClawConfig\",error=\"conflict\"} 1",
            "claw_secrets_operator_seals_total{event=\"created\"} 1",
            "claw_secrets_operator_deliveries_total{answer=\"full\"} 1",
            "claw_secrets_operator_deliveries_total{answer=\"unchanged\"} 0",
            "claw_secrets_operator_secrets_delivered_total 4",
            "claw_secrets_operator_not_ready_total{kind=\"ClawSecret\",reason=\"InvalidData\"} 1",
            "claw_secrets_operator_reconcile_duration_seconds_bucket{le=\"0.005\",kind=\"ClawSecret\"} 1",
            "claw_secrets_operator_reconcile_duration_seconds_bucket{le=\"0.1\",kind=\"ClawSecret\"} 2",
            "claw_secrets_operator_reconcile_duration_seconds_bucket{le=\"10.0\",kind=\"ClawConfig\"} 0",
            "claw_secrets_operator_reconcile_duration_seconds_bucket{le=\"+Inf\",kind=\"ClawConfig\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
