//! node.invoke through the OpenClaw gateway: this server as a gateway node, beside its HTTP
//! server (docs/architecture.md, "node.invoke through the OpenClaw gateway").
//!
//! - `proof`: the device proof a `connect` carries (Ed25519 over the gateway's challenge);
//! - `frames`: the protocol's frames, as sent and read;
//! - `identity`: the device key and device token kept in the data dir;
//! - `connection`: one connection (TCP or TLS, WebSocket, handshake);
//! - `principal`: who a call through the gateway acts as;
//! - `node`: reconnection, and each invoke through the [`crate::invoke::Dispatcher`].

mod connection;
mod frames;
mod identity;
mod node;
mod principal;
mod proof;

pub use connection::Endpoint;
pub use identity::DeviceIdentity;
pub use node::{COMMANDS, GatewayConfig, GatewayNode, GatewaySetup, GatewayStatus, SetupCode};
pub use principal::{Principal, PrincipalIdentity};
pub use proof::{DeviceProof, ProofFields, prove, signature_payload};

/// Why the gateway node cannot start. (A gateway that cannot be reached or refuses a
/// credential is not an error: the node logs it and tries again.)
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("gateway URL {0}")]
    Url(String),
    #[error("gateway TLS: {0}")]
    Tls(String),
    #[error("the setup code cannot be used: {0}")]
    SetupCode(String),
    #[error("the node's gateway identity: {0}")]
    Identity(String),
    #[error(
        "no credential for the gateway: pass --gateway-token-file (the gateway's auth token) or --gateway-setup-code (minted with `openclaw gateway call device.pair.setupCode`); after the first pairing the saved device token is enough"
    )]
    NoCredential,
}
