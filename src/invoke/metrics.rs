//! Metrics of a node.invoke server, dev mode and the agent alike (`prometheus-client`,
//! OpenMetrics text on `GET /metrics`): requests by command and result, how long the audit
//! log takes to make a record durable, and what the node store holds. Labels are closed sets
//! (the ten commands, the protocol's codes, two kinds): never a name, never a value.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::time::Duration;

use super::Command;
use crate::domain::ErrorCode;
use crate::store::Store;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Answered {
    /// One of the ten commands, or `unknown` (a body that named none).
    command: &'static str,
    /// `OK` or the protocol's error code.
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Entries {
    kind: &'static str,
    /// `held` (served) or `refused` (failed the integrity check at start-up).
    state: &'static str,
}

pub struct InvokeMetrics {
    requests: Family<Answered, Counter>,
    audit_append: Histogram,
    store_entries: Family<Entries, Gauge>,
}

impl Default for InvokeMetrics {
    fn default() -> Self {
        InvokeMetrics {
            requests: Family::default(),
            // 50 µs to about 1.6 s: a group commit on a quiet disk up to a disk in trouble.
            audit_append: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            store_entries: Family::default(),
        }
    }
}

impl InvokeMetrics {
    /// Registers every metric in `registry` (prefix `claw_secrets` by the caller's choice).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "node.invoke requests answered, by command and result (OK or the error code)",
            self.requests.clone(),
        );
        registry.register(
            "audit_append_seconds",
            "Time from handing a record to the audit log until it is durable (fdatasync, group commit)",
            self.audit_append.clone(),
        );
        registry.register(
            "store_entries",
            "Entries in this node's store, by kind, held or refused at start-up",
            self.store_entries.clone(),
        );
    }

    /// A request was answered.
    pub(crate) fn answered(&self, command: &str, result: Result<(), ErrorCode>) {
        let command = Command::NAMES
            .iter()
            .copied()
            .find(|c| *c == command)
            .unwrap_or("unknown");
        let result = match result {
            Ok(()) => "OK",
            Err(code) => code.as_str(),
        };
        self.requests
            .get_or_create(&Answered { command, result })
            .inc();
    }

    pub(crate) fn audit_appended(&self, took: Duration) {
        self.audit_append.observe(took.as_secs_f64());
    }

    /// Reads what `store` holds into the gauges (at each scrape).
    pub(crate) fn observe_store(&self, store: &Store) {
        let counts = store.counts();
        for (kind, state, n) in [
            ("ClawSecret", "held", counts.secrets),
            ("ClawConfig", "held", counts.configs),
            ("ClawSecret", "refused", counts.refused_secrets),
            ("ClawConfig", "refused", counts.refused_configs),
        ] {
            self.store_entries
                .get_or_create(&Entries { kind, state })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}
