//! The `node.invoke` adapter: the wire protocol, the dispatcher that authenticates, audits
//! and routes each call to a [`Backend`], the HTTP server and the client the CLI uses.

mod backend;
mod client;
mod command;
mod dispatch;
mod protocol;
mod server;

pub use backend::{Backend, Caller, IdempotencyKey, RequestDigest, Target, WriteRequest};
pub use client::{ClientError, InvokeClient};
pub use command::{
    Command, ConfigCreate, ConfigUpdate, ListParams, NameParams, SecretCreate, SecretRotate,
};
pub use dispatch::{Dispatcher, LOCAL_NODE_ALIAS};
pub use protocol::{
    ConfigMeta, ConfigView, Deleted, ErrorBody, InvokeError, InvokeRequest, InvokeResponse,
    MAX_BODY_BYTES, Payload, SecretMeta, SecretView,
};
pub use server::{FORWARDED_AUTHORIZATION, router, serve};
