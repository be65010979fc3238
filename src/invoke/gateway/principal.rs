//! Who calls through the gateway. A `node.invoke` arrives with no end user's credential: the
//! gateway authenticated its caller (an operator, the `openclaw` CLI, an agent) by its own
//! means, and does not pass that identity on. So each node is configured with the one
//! principal that gateway calls act as (`--gateway-principal`), and that principal's rights are
//! checked like any caller's: never the node's own.

use std::future::Future;
use zeroize::Zeroizing;

use crate::invoke::{Caller, InvokeError};

/// What a principal resolves to for one call.
pub enum PrincipalIdentity {
    /// A caller the backend knows directly (dev mode: an entry of the tokens file).
    Caller(Caller),
    /// A bearer token of the principal's, authenticated like any caller's (Kubernetes: a
    /// short-lived ServiceAccount token, checked by TokenReview).
    Bearer(Zeroizing<String>),
}

pub trait Principal: Send + Sync + 'static {
    /// The principal's identity now (resolved per call, so revoking it takes effect at once).
    fn resolve(&self) -> impl Future<Output = Result<PrincipalIdentity, InvokeError>> + Send;

    /// How the principal is named in logs and at start-up.
    fn describe(&self) -> String;
}
