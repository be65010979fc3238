//! claw-secrets: the secrets and configuration manager for Clawbernetes nodes.
//!
//! Layers, inside out; no inner layer imports an outer one:
//!
//! - [`domain`]: validated names, data maps, versions, identities and error codes.
//! - [`crypto`]: key derivation, the sealed envelope and the keyring.
//! - [`store`]: the node-local, crash-safe blob store.
//! - [`audit`]: the append-only, hash-chained audit log.
//! - [`invoke`]: the `node.invoke` protocol, its dispatcher, HTTP server and client.
//! - [`backends`]: implementations of [`invoke::Backend`] (`local` for `claw-secrets dev`).
//! - [`cli`]: the `claw-secrets` command line.
//!
//! [`hex`] and [`trailer`] are leaves every layer may use.

pub mod audit;
pub mod backends;
pub mod cli;
pub mod crypto;
pub mod domain;
pub mod hex;
pub mod invoke;
pub mod k8s;
pub mod store;
pub mod trailer;
