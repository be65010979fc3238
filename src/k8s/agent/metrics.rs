//! The agent's own metrics, beside the node.invoke server's (`GET /metrics` on the agent's
//! port): how callers' tokens were settled, how far behind the API server the node's store is,
//! and store writes that failed (and are being retried). Labels are closed sets.

use jiff::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::k8s::identity::ReviewCounter;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

fn lag_histogram() -> Histogram {
    // 1 ms to about 9 minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

pub struct AgentMetrics {
    token_reviews: ReviewCounter,
    mirror_lag: Family<KindLabel, Histogram, fn() -> Histogram>,
    mirror_failures: Family<KindLabel, Counter>,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            token_reviews: ReviewCounter::default(),
            mirror_lag: Family::new_with_constructor(lag_histogram),
            mirror_failures: Family::default(),
        }
    }
}

impl AgentMetrics {
    /// Registers every metric under `agent` in `registry` (so: `claw_secrets_agent_...`).
    pub fn register(&self, registry: &mut Registry) {
        let agent = registry.sub_registry_with_prefix("agent");
        agent.register(
            "token_reviews",
            "Bearer tokens settled, by how: cached, reviewed, rejected, stale (API server unreachable, an earlier review used), unavailable, missing",
            self.token_reviews.clone(),
        );
        agent.register(
            "mirror_lag_seconds",
            "From an object's last change (its sealTime, or a config's acceptedTime) until this node stored it, by kind (includes clock skew between nodes)",
            self.mirror_lag.clone(),
        );
        agent.register(
            "mirror_write_failures",
            "Store writes of mirrored objects that failed (each is retried), by kind",
            self.mirror_failures.clone(),
        );
    }

    /// What the agent's identity checks count into.
    pub fn token_reviews(&self) -> ReviewCounter {
        self.token_reviews.clone()
    }

    /// An object of `kind` changed at `changed` was stored on this node now.
    pub fn mirrored(&self, kind: &'static str, changed: Timestamp) {
        let lag = Timestamp::now()
            .duration_since(changed)
            .as_secs_f64()
            .max(0.0);
        self.mirror_lag
            .get_or_create(&KindLabel { kind })
            .observe(lag);
    }

    pub fn mirror_failed(&self, kind: &'static str) {
        self.mirror_failures
            .get_or_create(&KindLabel { kind })
            .inc();
    }
}
