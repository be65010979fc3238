//! The operator's one error type. Every failure has a short `metric_label()`, so errors are
//! counted by kind (`claw_secrets_operator_errors_total{error=...}`).
//!
//! Objects that are merely invalid are not errors: they are reported on their own status and
//! the controller moves on (see `secrets.rs` and `configs.rs`).

use crate::crypto::CryptoError;
use crate::k8s::keyring::KeyringError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[source] kube::Error),

    /// Another writer changed the object since it was read; retried shortly with fresh data.
    #[error("{kind} {namespace}/{name} changed while it was being reconciled; retrying")]
    Conflict {
        kind: &'static str,
        namespace: String,
        name: String,
    },

    #[error(transparent)]
    Keyring(#[from] KeyringError),

    #[error("sealing {namespace}/{name} failed: {source}")]
    Seal {
        namespace: String,
        name: String,
        #[source]
        source: CryptoError,
    },

    #[error(
        "lost the leader Lease {namespace}/{name}: {reason}; its controllers are stopped so that no two replicas act at once"
    )]
    LeaseLost {
        namespace: String,
        name: String,
        reason: String,
    },

    #[error("cannot serve metrics and health checks on {addr}: {source}")]
    Serve {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },

    #[error("cannot serve the admission webhook: {reason}")]
    Webhook { reason: String },

    /// A part of the operator that runs for its whole life stopped: the process exits so the
    /// Deployment restarts it, rather than going on half-working behind a green probe.
    #[error("the operator's {task} stopped unexpectedly; exiting so it is restarted")]
    TaskEnded { task: &'static str },
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::Conflict { .. } => "conflict",
            Error::Keyring(_) => "keyring",
            Error::Seal { .. } => "seal",
            Error::LeaseLost { .. } => "lease_lost",
            Error::Serve { .. } => "serve",
            Error::Webhook { .. } => "webhook",
            Error::TaskEnded { .. } => "task_ended",
        }
    }

    /// Every label `metric_label` can return, so metrics can be pre-declared.
    pub const METRIC_LABELS: [&'static str; 8] = [
        "kube",
        "conflict",
        "keyring",
        "seal",
        "lease_lost",
        "serve",
        "webhook",
        "task_ended",
    ];

    pub fn is_conflict(&self) -> bool {
        matches!(self, Error::Conflict { .. })
    }
}

/// HTTP 409 from the API server: a `resourceVersion` precondition failed or the object exists.
pub(crate) fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_label_is_declared() {
        let conflict = Error::Conflict {
            kind: "ClawSecret",
            namespace: "ns".into(),
            name: "a".into(),
        };
        assert_eq!(conflict.metric_label(), "conflict");
        assert!(conflict.is_conflict());
        for e in [
            conflict,
            Error::TaskEnded { task: "x" },
            Error::Webhook { reason: "r".into() },
        ] {
            assert!(Error::METRIC_LABELS.contains(&e.metric_label()));
        }
    }
}
