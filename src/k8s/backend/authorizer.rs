//! The Kubernetes [`Authorizer`] (agent and operator alike): Kubernetes decides. Callers are who TokenReview says their token
//! belongs to; every access is a SubjectAccessReview on the caller's own identity against
//! `clawsecrets` / `clawconfigs` in group `clawbernetes.io` (`reveal` to read a secret's values).
//! The server's own permissions never stand in for the caller's: its writes are made with the
//! caller's own token (see [`super::KubeRepository`]). Refusals of named objects become
//! AccessDenied Events.

use super::events::InvokeEvents;
use crate::invoke::{Access, Authorizer, Caller, Credential, Decision, InvokeError};
use crate::k8s::identity::KubeIdentity;

pub struct KubeAuthorizer {
    identity: KubeIdentity,
    events: InvokeEvents,
}

impl KubeAuthorizer {
    pub fn new(identity: KubeIdentity, events: InvokeEvents) -> Self {
        KubeAuthorizer { identity, events }
    }
}

impl Authorizer for KubeAuthorizer {
    async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, InvokeError> {
        let mut caller = self.identity.authenticate(bearer).await?;
        // Writes go to the API server as the caller (KubeRepository), with the token the
        // review just accepted; the review caches never hold it.
        caller.credential = bearer.map(Credential::bearer);
        Ok(caller)
    }

    async fn check(&self, caller: &Caller, access: Access<'_>) -> Result<Decision, InvokeError> {
        if self.identity.allowed(caller, access).await? {
            return Ok(Decision::Allow);
        }
        Ok(Decision::Deny(format!(
            "grant it with RBAC (verb {:?} on {} in group clawbernetes.io)",
            access.verb.as_str(),
            access.resource.as_str()
        )))
    }

    fn refused(&self, caller: &Caller, access: Access<'_>) {
        self.events.access_denied(caller, &access);
    }
}
