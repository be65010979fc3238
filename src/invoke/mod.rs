//! The `node.invoke` API: the wire protocol, the ten commands' parameters, the command core
//! that gives them their meaning (written once, behind two seams: [`Authorizer`] and
//! [`Repository`]), the dispatcher that turns a request body into a call of the core, the HTTP
//! server, and the client the CLI uses.

mod access;
mod client;
mod command_core;
mod dispatch;
pub mod gateway;
mod metrics;
mod params;
mod protocol;
mod repository;
mod server;

pub use access::{Access, Authorizer, Caller, Credential, Decision, Resource, Verb};
pub use client::{ClientError, ClientTimeouts, ClientTls, InvokeClient};
pub use command_core::{CommandCore, IdempotencyKey, Request, WriteCarrier};
pub use dispatch::{Dispatcher, LOCAL_NODE_ALIAS, ReadinessNote};
pub use metrics::InvokeMetrics;
pub use params::{
    Command, ConfigCreate, ConfigUpdate, ListParams, NameParams, SecretCreate, SecretRotate,
};
pub(crate) use params::{sanitize_serde_message, withhold_quoted};
pub use protocol::{
    ConfigMeta, ConfigView, Deleted, ErrorBody, InvokeError, InvokeRequest, InvokeResponse,
    MAX_BODY_BYTES, Payload, SecretMeta, SecretView,
};
pub use repository::{Current, CurrentConfig, CurrentSecret, Repository, Revision};
pub use server::{FORWARDED_AUTHORIZATION, HttpLimits, UNAUTHENTICATED_BODY_BYTES, router, serve};
