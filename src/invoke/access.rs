//! Who is calling, and may they: the [`Authorizer`] seam. Dev mode backs it with the tokens
//! file; the node agent with TokenReview and SubjectAccessReview. The command core asks it; the
//! rules that are the product's own (a workload reads what lists it) live in the core.

use std::collections::BTreeMap;
use std::future::Future;

use super::InvokeError;
use crate::domain::{Name, Namespace, Workload};

/// Who is calling, as established by the authorizer's authentication.
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
    pub extra: BTreeMap<String, Vec<String>>,
    /// The credential the caller presented, for a backend that carries out a write as the
    /// caller (the node agent, to the API server); `None` where the backend acts itself (dev
    /// mode). Kept for the one request only, never in a cache.
    pub credential: Option<Credential>,
    /// The node whose agent passed the call on, when the server answering is not that node
    /// (the operator carrying a node's write): for the records of the change.
    pub via_node: Option<String>,
    /// The OpenClaw gateway node id this call arrived on, when it came through the gateway
    /// (the caller is then the node's configured gateway principal): for the audit record.
    pub gateway_node: Option<String>,
}

/// A caller's own bearer token: wiped when dropped, never printed (`Debug` shows that one is
/// there, not what it is).
#[derive(Clone, PartialEq, Eq)]
pub struct Credential(zeroize::Zeroizing<String>);

impl Credential {
    pub fn bearer(token: &str) -> Self {
        Credential(zeroize::Zeroizing::new(token.to_owned()))
    }

    /// The token, to hand to the client that acts as the caller.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credential([redacted])")
    }
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
            credential: None,
            via_node: None,
            gateway_node: None,
        }
    }

    /// The identity a remembered write is bound to: the subject, and the uid when the
    /// authenticator gives one (a ServiceAccount deleted and created again is someone else).
    pub fn identity(&self) -> String {
        match &self.uid {
            Some(uid) => format!("{}#{uid}", self.subject),
            None => self.subject.clone(),
        }
    }

    /// The workload this caller is in `namespace`, if it is one there.
    pub fn workload_in(&self, namespace: &Namespace) -> Option<&Workload> {
        self.workload
            .as_ref()
            .filter(|_| self.namespace.as_ref() == Some(namespace))
    }
}

/// What may be done: the RBAC verbs of the `clawsecrets` and `clawconfigs` resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Verb {
    Get,
    List,
    Create,
    Update,
    Delete,
    /// Read a secret's values (a custom verb: `get` shows only metadata and ciphertext).
    Reveal,
}

impl Verb {
    pub fn as_str(self) -> &'static str {
        match self {
            Verb::Get => "get",
            Verb::List => "list",
            Verb::Create => "create",
            Verb::Update => "update",
            Verb::Delete => "delete",
            Verb::Reveal => "reveal",
        }
    }
}

/// What it may be done to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resource {
    Secrets,
    Configs,
}

impl Resource {
    /// The Kubernetes resource name (group `clawbernetes.io`).
    pub fn as_str(self) -> &'static str {
        match self {
            Resource::Secrets => "clawsecrets",
            Resource::Configs => "clawconfigs",
        }
    }

    fn noun(self) -> &'static str {
        match self {
            Resource::Secrets => "secret",
            Resource::Configs => "config",
        }
    }
}

/// One question for the authorizer: may the caller `verb` the `resource` (named `name`, or all
/// of them) in `namespace`?
#[derive(Debug, Clone, Copy)]
pub struct Access<'a> {
    pub verb: Verb,
    pub resource: Resource,
    pub namespace: &'a Namespace,
    pub name: Option<&'a Name>,
}

impl std::fmt::Display for Access<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = match self.verb {
            Verb::Reveal => "read",
            Verb::Update if self.resource == Resource::Secrets => "rotate",
            other => other.as_str(),
        };
        match self.name {
            Some(name) => write!(
                f,
                "{verb} {} {:?} in namespace {:?}",
                self.resource.noun(),
                name.as_str(),
                self.namespace.as_str()
            ),
            None => write!(
                f,
                "{verb} {}s in namespace {:?}",
                self.resource.noun(),
                self.namespace.as_str()
            ),
        }
    }
}

/// The authorizer's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Refused; the text says how the right is granted (it ends the caller's error message).
    Deny(String),
}

/// Authentication and authorization, as one seam. Errors are for when the question cannot be
/// answered (UNAVAILABLE: the API server is unreachable), never for a refusal.
pub trait Authorizer: Send + Sync + 'static {
    /// Turns a bearer token into a caller, or UNAUTHENTICATED.
    fn authenticate(
        &self,
        bearer: Option<&str>,
    ) -> impl Future<Output = Result<Caller, InvokeError>> + Send;

    /// Whether `caller` may do `access`, decided on the caller's own identity.
    fn check(
        &self,
        caller: &Caller,
        access: Access<'_>,
    ) -> impl Future<Output = Result<Decision, InvokeError>> + Send;

    /// Told of every refusal the core answers (after it is audited), so the backend can make it
    /// visible where its users look (the agent: an AccessDenied Event).
    fn refused(&self, _caller: &Caller, _access: Access<'_>) {}
}
