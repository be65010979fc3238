//! claw-secrets: the secrets and configuration manager for Clawbernetes nodes.
//!
//! Layers, inside out; no inner layer imports an outer one:
//!
//! - [`domain`]: validated names, data maps, versions, identities and error codes.
//! - [`crypto`]: key derivation, the sealed envelope and the keyring.
//! - [`store`]: the node-local, crash-safe blob store.
//! - [`audit`]: the append-only, hash-chained audit log.
//! - [`invoke`]: the `node.invoke` API: the ten commands and the command core that gives them
//!   their meaning (behind two seams, [`invoke::Authorizer`] and [`invoke::Repository`]), the
//!   dispatcher, the HTTP server and the client.
//! - [`backends`]: the dev-mode seams (`local`: the tokens file and the node store).
//! - [`k8s`]: CRDs, the operator, the node agent and its seams (TokenReview and
//!   SubjectAccessReview; the API server for writes).
//! - [`kms`]: a client of Kubernetes KMS v2 plugins, to wrap the master keyring (used by
//!   [`k8s`]).
//! - [`cli`]: the `claw-secrets` command line.
//!
//! [`hex`] and [`trailer`] are leaves every layer may use, and so is `faults` (the steps of a
//! durable write, failed on purpose in tests).

// No unsafe code, with one audited exception: `crypto::aead` overwrites the slot that held
// ring's key schedule after use (ring does not wipe its keys), which only a raw write can do.
#![deny(unsafe_code)]

pub mod audit;
pub mod backends;
pub mod cli;
pub mod crypto;
pub mod domain;
mod faults;
pub mod hex;
pub mod invoke;
pub mod k8s;
pub mod kms;
pub mod store;
pub mod tls;
pub mod trailer;

#[cfg(test)]
mod properties;
