//! The Kubernetes layer: CRD types and the mapping of seed names to object names. The
//! operator, node agent and Kubernetes identity checks build on these.

pub mod agent;
pub mod agent_certs;
pub mod backend;
pub mod component;
pub mod convert;
pub mod crd;
pub mod delivery;
pub mod events;
pub mod forward;
pub mod identity;
pub mod keyring;
pub mod last_applied;
pub mod migrate;
pub mod names;
pub mod operator;
pub mod proxy;
pub mod sealing;
pub mod sealing_key;
