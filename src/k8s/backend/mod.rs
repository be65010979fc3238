//! The command core's Kubernetes backend, shared by the node agent and the operator: who a
//! caller is and what they may do is Kubernetes' answer ([`KubeAuthorizer`]: TokenReview and
//! SubjectAccessReview), writes go to the API server with the caller's own token
//! ([`KubeRepository`]), and both leave Events naming the caller ([`InvokeEvents`]).

mod authorizer;
mod events;
mod principal;
mod repository;

pub use authorizer::KubeAuthorizer;
pub use events::InvokeEvents;
pub use principal::ServiceAccountPrincipal;
pub use repository::KubeRepository;
