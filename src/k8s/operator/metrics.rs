//! The operator's Prometheus metrics, kept in atomics and written out in the text exposition
//! format by hand (a handful of counters do not need a metrics library).
//!
//! Labels only ever hold kinds, results, error labels and condition reasons: never object
//! names (unbounded) and never values.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
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
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Upper bounds (seconds) of the reconcile duration histogram.
const BUCKETS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

#[derive(Default)]
struct Histogram {
    buckets: [AtomicU64; BUCKETS.len()],
    count: AtomicU64,
    sum_micros: AtomicU64,
}

#[derive(Default)]
pub struct Metrics {
    reconciliations: [[AtomicU64; Outcome::ALL.len()]; ObjectKind::ALL.len()],
    errors: [[AtomicU64; Error::METRIC_LABELS.len()]; ObjectKind::ALL.len()],
    durations: [Histogram; ObjectKind::ALL.len()],
    seals_created: AtomicU64,
    seals_rotated: AtomicU64,
    /// Objects reported not Ready, by condition reason (a small fixed set of CamelCase words).
    rejections: Mutex<BTreeMap<(ObjectKind, &'static str), u64>>,
    leader: AtomicBool,
}

impl Metrics {
    pub fn reconciled(&self, kind: ObjectKind, outcome: Outcome, took: Duration) {
        let k = kind as usize;
        self.reconciliations[k][outcome as usize].fetch_add(1, Relaxed);
        let h = &self.durations[k];
        let secs = took.as_secs_f64();
        if let Some(i) = BUCKETS.iter().position(|b| secs <= *b) {
            h.buckets[i].fetch_add(1, Relaxed);
        }
        h.count.fetch_add(1, Relaxed);
        h.sum_micros
            .fetch_add(u64::try_from(took.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub fn error(&self, kind: ObjectKind, error: &Error) {
        let label = error.metric_label();
        if let Some(i) = Error::METRIC_LABELS.iter().position(|l| *l == label) {
            self.errors[kind as usize][i].fetch_add(1, Relaxed);
        }
    }

    /// A secret was sealed: its first version (`created`) or a rotation.
    pub fn sealed(&self, created: bool) {
        if created {
            self.seals_created.fetch_add(1, Relaxed);
        } else {
            self.seals_rotated.fetch_add(1, Relaxed);
        }
    }

    /// An object was newly reported not Ready with `reason`.
    pub fn rejected(&self, kind: ObjectKind, reason: &'static str) {
        *self
            .rejections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((kind, reason))
            .or_default() += 1;
    }

    pub fn set_leader(&self, leader: bool) {
        self.leader.store(leader, Relaxed);
    }

    pub fn is_leader(&self) -> bool {
        self.leader.load(Relaxed)
    }

    /// The Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let w = &mut out;
        header(
            w,
            "claw_secrets_operator_leader",
            "gauge",
            "1 while this replica holds the leader Lease and runs the controllers.",
        );
        let _ = writeln!(
            w,
            "claw_secrets_operator_leader {}",
            u8::from(self.is_leader())
        );

        header(
            w,
            "claw_secrets_operator_reconciliations_total",
            "counter",
            "Reconciliations by kind and result (conflict: the object changed meanwhile; retried).",
        );
        for kind in ObjectKind::ALL {
            for outcome in Outcome::ALL {
                let _ = writeln!(
                    w,
                    "claw_secrets_operator_reconciliations_total{{kind=\"{}\",result=\"{}\"}} {}",
                    kind.label(),
                    outcome.label(),
                    self.reconciliations[kind as usize][outcome as usize].load(Relaxed)
                );
            }
        }

        header(
            w,
            "claw_secrets_operator_errors_total",
            "counter",
            "Failed reconciliations by kind and error.",
        );
        for kind in ObjectKind::ALL {
            for (i, label) in Error::METRIC_LABELS.iter().enumerate() {
                let _ = writeln!(
                    w,
                    "claw_secrets_operator_errors_total{{kind=\"{}\",error=\"{label}\"}} {}",
                    kind.label(),
                    self.errors[kind as usize][i].load(Relaxed)
                );
            }
        }

        header(
            w,
            "claw_secrets_operator_seals_total",
            "counter",
            "Secret versions sealed: the first version (created) or a rotation (rotated).",
        );
        for (event, counter) in [
            ("created", &self.seals_created),
            ("rotated", &self.seals_rotated),
        ] {
            let _ = writeln!(
                w,
                "claw_secrets_operator_seals_total{{event=\"{event}\"}} {}",
                counter.load(Relaxed)
            );
        }

        header(
            w,
            "claw_secrets_operator_not_ready_total",
            "counter",
            "Times an object was reported not Ready, by kind and condition reason.",
        );
        for ((kind, reason), n) in self
            .rejections
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(
                w,
                "claw_secrets_operator_not_ready_total{{kind=\"{}\",reason=\"{reason}\"}} {n}",
                kind.label()
            );
        }

        header(
            w,
            "claw_secrets_operator_reconcile_duration_seconds",
            "histogram",
            "Time taken by one reconciliation.",
        );
        for kind in ObjectKind::ALL {
            let h = &self.durations[kind as usize];
            let mut cumulative = 0;
            for (i, bound) in BUCKETS.iter().enumerate() {
                cumulative += h.buckets[i].load(Relaxed);
                let _ = writeln!(
                    w,
                    "claw_secrets_operator_reconcile_duration_seconds_bucket{{kind=\"{}\",le=\"{bound}\"}} {cumulative}",
                    kind.label()
                );
            }
            let count = h.count.load(Relaxed);
            let _ = writeln!(
                w,
                "claw_secrets_operator_reconcile_duration_seconds_bucket{{kind=\"{}\",le=\"+Inf\"}} {count}",
                kind.label()
            );
            let _ = writeln!(
                w,
                "claw_secrets_operator_reconcile_duration_seconds_sum{{kind=\"{}\"}} {}",
                kind.label(),
                h.sum_micros.load(Relaxed) as f64 / 1e6
            );
            let _ = writeln!(
                w,
                "claw_secrets_operator_reconcile_duration_seconds_count{{kind=\"{}\"}} {count}",
                kind.label()
            );
        }
        out
    }
}

fn header(w: &mut String, name: &str, type_: &str, help: &str) {
    let _ = writeln!(w, "# HELP {name} {help}");
    let _ = writeln!(w, "# TYPE {name} {type_}");
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
        let text = m.render();
        for line in [
            "claw_secrets_operator_leader 1",
            "claw_secrets_operator_reconciliations_total{kind=\"ClawSecret\",result=\"success\"} 2",
            "claw_secrets_operator_reconciliations_total{kind=\"ClawConfig\",result=\"error\"} 1",
            "claw_secrets_operator_errors_total{kind=\"ClawConfig\",error=\"conflict\"} 1",
            "claw_secrets_operator_seals_total{event=\"created\"} 1",
            "claw_secrets_operator_not_ready_total{kind=\"ClawSecret\",reason=\"InvalidData\"} 1",
            "claw_secrets_operator_reconcile_duration_seconds_bucket{kind=\"ClawSecret\",le=\"0.005\"} 1",
            "claw_secrets_operator_reconcile_duration_seconds_bucket{kind=\"ClawSecret\",le=\"0.1\"} 2",
            "claw_secrets_operator_reconcile_duration_seconds_bucket{kind=\"ClawConfig\",le=\"10\"} 0",
            "claw_secrets_operator_reconcile_duration_seconds_bucket{kind=\"ClawConfig\",le=\"+Inf\"} 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
    }
}
