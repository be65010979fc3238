//! node.invoke writes carried for nodes' agents ([`crate::k8s::forward`]): every replica with a
//! data dir answers `POST /v1/writes` on its HTTPS server (the webhook's), with the same command
//! core an agent runs, holding what an agent no longer holds: the master keyring, to seal the
//! new version and to check an idempotency key against what the object remembers.
//!
//! Two tokens come with each write. The node's (`X-Claw-Secrets-Authorization`, as for
//! deliveries: the agents' ServiceAccount, bound to a pod on that node, for the operator's
//! audience) says which node passes it on, and only agents pass writes on; the caller's
//! (`X-Claw-Secrets-Caller-Authorization`) is reviewed again here (TokenReview,
//! SubjectAccessReview), and the write is made with it, so the API server authorizes it once
//! more and its audit log names the caller. The secret data arrives sealed to the cluster's
//! key, bound to that node and request; it is opened into a wiped buffer.
//!
//! Each carried write is audited here too, before it is committed (the replica's audit log in
//! its data dir); the agent audited it before passing it on.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Response, StatusCode};
use std::path::Path;
use std::sync::Arc;

use super::deliveries::{Deliveries, reply};
use crate::crypto::SharedKeyring;
use crate::invoke::{CommandCore, Dispatcher, InvokeError};
use crate::k8s::backend::{InvokeEvents, KubeAuthorizer, KubeRepository};
use crate::k8s::component::Component;
use crate::k8s::forward::{CALLER_HEADER, ForwardedWrite};
use crate::k8s::identity::KubeIdentity;
use crate::store::{OpenOptions, Store, create_private_dir};

/// A forwarded write is a node.invoke body: the same bound.
const MAX_BODY: usize = 8 * 1024 * 1024;

/// The commands carried: writes only (reads are the nodes' own).
const WRITES: &[&str] = &[
    "secret.create",
    "secret.rotate",
    "secret.delete",
    "config.create",
    "config.update",
    "config.delete",
];

pub struct Writes {
    dispatcher: Dispatcher<KubeAuthorizer, KubeRepository>,
    deliveries: Arc<Deliveries>,
    keyring: SharedKeyring,
}

impl Writes {
    /// The command core of replica `identity`, its audit log and store in `data_dir`.
    pub async fn open(
        client: kube::Client,
        config: &kube::Config,
        keyring: SharedKeyring,
        deliveries: Arc<Deliveries>,
        data_dir: &Path,
        identity: &str,
    ) -> Result<Writes, String> {
        create_private_dir(data_dir).map_err(|e| e.to_string())?;
        // The same keyring the operator follows: a new active key seals carried writes too.
        let keys = keyring.clone();
        let (store, _) = Store::open(data_dir, keys.clone(), OpenOptions::default())
            .map_err(|e| format!("the operator's store in {}: {e}", data_dir.display()))?;
        let store = Arc::new(store);
        let node_id = format!("operator/{identity}");
        // A fresh data dir (an emptyDir of a new pod) starts a new chain; an audit log that
        // does not match what the data dir recorded of it stops the replica, as on a node.
        let (audit, _) =
            crate::audit::open_anchored(&data_dir.join("audit.log"), &node_id, &store, false)
                .map_err(|e| e.to_string())?;
        tokio::spawn(crate::audit::keep_anchored(audit.clone(), store.clone()));
        let events =
            InvokeEvents::new(client.clone(), Component::Operator, identity, store.clone());
        let identity_checks = KubeIdentity::new(client.clone());
        let repository = KubeRepository::new(client, config, store, keys.clone(), events.clone())
            .carrying_for_nodes();
        let core = CommandCore::new(
            KubeAuthorizer::new(identity_checks, events),
            repository,
            audit,
            node_id,
            keys,
        );
        Ok(Writes {
            dispatcher: Dispatcher::new(core),
            deliveries,
            keyring,
        })
    }

    /// Answers one `POST /v1/writes`: the node.invoke response, as JSON, with its HTTP status.
    pub async fn answer(&self, req: hyper::Request<Incoming>) -> Response<Full<Bytes>> {
        let refuse = |status: StatusCode, message: String| {
            reply(status, format!("{message}\n").into_bytes(), false)
        };
        let node = match self.deliveries.node_of_request(req.headers()).await {
            Ok(node) => node,
            Err((status, message)) => return refuse(status, message),
        };
        let caller_token = req
            .headers()
            .get(CALLER_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(|t| zeroize::Zeroizing::new(t.trim().to_owned()));
        let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
            Ok(collected) => zeroize::Zeroizing::new(collected.to_bytes().to_vec()),
            Err(_) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "the write could not be read (over 8 MiB?)".to_owned(),
                );
            }
        };
        let write: ForwardedWrite = match serde_json::from_slice(&body) {
            Ok(w) => w,
            Err(e) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "not a forwarded write: {}",
                        crate::invoke::sanitize_serde_message(&e.to_string())
                    ),
                );
            }
        };
        if !WRITES.contains(&write.command.as_str()) {
            return refuse(
                StatusCode::BAD_REQUEST,
                format!(
                    "only writes are carried ({}); nodes answer reads from their own store",
                    WRITES.join(", ")
                ),
            );
        }
        let invoke_body = match write.open(&node, &self.keyring.current()) {
            Ok(b) => b,
            Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
        };
        let caller = self
            .dispatcher
            .authenticate(caller_token.as_deref().map(String::as_str))
            .await
            .map(|mut caller| {
                caller.via_node = Some(node.clone());
                caller
            });
        tracing::debug!(%node, command = %write.command, request_id = %write.id, "carrying a node's write");
        let response = self.dispatcher.handle_as(caller, &invoke_body).await;
        let status = StatusCode::from_u16(response.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        match serde_json::to_vec(&response) {
            Ok(json) => reply(status, json, true),
            Err(e) => refuse(
                StatusCode::INTERNAL_SERVER_ERROR,
                InvokeError::internal(format!("the answer could not be written: {e}")).message,
            ),
        }
    }
}
