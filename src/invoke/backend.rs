//! The seam between the protocol and where objects live: `local` (dev mode) or `kube`.

use std::future::Future;

use super::{Command, InvokeError, Payload};
use crate::domain::{Name, Namespace, Version, Workload};

/// Who is calling, as established by the backend's authentication.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// A stable name for the audit log: `admin`, `system:serviceaccount:ns:sa`, a user name.
    pub subject: String,
    /// The namespace the caller belongs to (a workload's own namespace).
    pub namespace: Option<Namespace>,
    /// Set when the caller is a workload; `allowed_workloads` is checked against it.
    pub workload: Option<Workload>,
    /// Dev mode's admin token: every command, every namespace.
    pub admin: bool,
    /// Groups, uid and extra attributes from the authenticator (Kubernetes: TokenReview), passed
    /// unchanged to authorization checks made on the caller's own identity.
    pub groups: Vec<String>,
    pub uid: Option<String>,
    pub extra: std::collections::BTreeMap<String, Vec<String>>,
}

impl Caller {
    /// A caller with a subject and nothing else (no namespace, workload, groups or admin).
    pub fn named(subject: impl Into<String>) -> Self {
        Caller {
            subject: subject.into(),
            namespace: None,
            workload: None,
            admin: false,
            groups: Vec::new(),
            uid: None,
            extra: Default::default(),
        }
    }
}

/// A client-chosen key that makes retrying a write safe: 1-128 printable ASCII characters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Result<Self, InvokeError> {
        if s.is_empty() || s.len() > 128 || !s.chars().all(|c| c.is_ascii_graphic()) {
            return Err(InvokeError::invalid(
                "idempotencyKey must be 1-128 printable ASCII characters without spaces",
            ));
        }
        Ok(IdempotencyKey(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// SHA-256 of a write's command and raw params: tells a retry from a different request that
/// reuses the same idempotency key. Backends store only a keyed MAC of it, never the digest.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestDigest(pub [u8; 32]);

impl std::fmt::Debug for RequestDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestDigest([redacted])")
    }
}

/// Idempotency information accompanying a write.
#[derive(Debug, Clone)]
pub struct WriteRequest {
    pub key: IdempotencyKey,
    pub digest: RequestDigest,
}

/// The object a command acted on, for the audit record; filled in as far as it is known.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Target {
    pub namespace: Option<Namespace>,
    pub name: Option<Name>,
    pub version: Option<Version>,
}

/// Where secrets and configs live. Implementations authenticate callers their own way and
/// authorize every command; the dispatcher audits and answers.
pub trait Backend: Send + Sync + 'static {
    /// Turns a bearer token into a caller, or UNAUTHENTICATED.
    fn authenticate(
        &self,
        bearer: Option<&str>,
    ) -> impl Future<Output = Result<Caller, InvokeError>> + Send;

    /// Authorizes and runs one command. The returned target says what was touched, also when
    /// the command failed or was denied, so the audit record can name it.
    fn execute(
        &self,
        caller: &Caller,
        command: Command,
        write: Option<WriteRequest>,
    ) -> impl Future<Output = (Target, Result<Payload, InvokeError>)> + Send;

    /// Whether every command can be answered now; `GET /readyz` reports it, so a load balancer
    /// or a test does not send work the backend would turn away as UNAVAILABLE. `Err` says
    /// what is missing. A backend that is ready as soon as it serves keeps the default.
    fn readiness(&self) -> Result<(), String> {
        Ok(())
    }
}
