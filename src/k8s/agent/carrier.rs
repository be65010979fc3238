//! The agent's [`WriteCarrier`]: a node without the master keyring passes its node.invoke
//! writes on to the operator ([`crate::k8s::forward`]), through the API server's service proxy
//! as for its deliveries (RBAC: `create` on `services/proxy` for the operator's webhook Service
//! only). The secret data is sealed to the cluster's public key (the ConfigMap the operator
//! publishes; read again when the operator no longer knows the key it names). The caller's own
//! token goes along: the operator reviews it again and makes the write with it.
//!
//! Read your writes: once the operator answers, the node waits (at most [`SETTLE`]) for its
//! own store to hold what was written, as delivered to it, so a read on this node right after
//! the write sees it.

use http_body_util::BodyExt;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::crypto::SealingPublicKey;
use crate::domain::{ErrorCode, ObjectKey, Version};
use crate::invoke::{Caller, IdempotencyKey, InvokeError, Request, WriteCarrier};
use crate::k8s::forward::{CALLER_HEADER, ForwardedAnswer, ForwardedWrite, PATH};
use crate::store::Store;

/// How long a secret write waits for its delivery to this node's store before it answers
/// anyway (the store catches up moments later).
const SETTLE: Duration = Duration::from_secs(3);

pub struct OperatorCarrier {
    /// The agent's client for calls on a caller's behalf (bounded).
    client: kube::Client,
    /// `/api/v1/namespaces/<ns>/services/https:<service>:<port>/proxy/v1/writes`.
    path: String,
    /// The operator's namespace: where the public sealing key is published.
    namespace: String,
    /// The node's token for the operator's audience (as for deliveries).
    token_file: PathBuf,
    node: String,
    sealing_key: Mutex<Option<SealingPublicKey>>,
    store: Arc<Store>,
}

fn unavailable(message: String) -> InvokeError {
    InvokeError::new(ErrorCode::Unavailable, message)
}

impl OperatorCarrier {
    pub fn new(
        client: kube::Client,
        source: &super::DeliverySource,
        node: &str,
        store: Arc<Store>,
    ) -> Self {
        OperatorCarrier {
            client,
            path: format!(
                "/api/v1/namespaces/{}/services/https:{}:{}/proxy{PATH}",
                source.namespace, source.service, source.port
            ),
            namespace: source.namespace.clone(),
            token_file: source.token_file.clone(),
            node: node.to_owned(),
            sealing_key: Mutex::new(None),
            store,
        }
    }

    async fn sealing_key(&self, fresh: bool) -> Result<SealingPublicKey, InvokeError> {
        if !fresh
            && let Some(key) = self
                .sealing_key
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
        {
            return Ok(key);
        }
        let key = crate::k8s::sealing_key::fetch(&self.client, &self.namespace)
            .await
            .map_err(|e| {
                unavailable(format!(
                    "the cluster's public sealing key could not be read ({e}); writes need it and the operator, reads do not"
                ))
            })?;
        *self.sealing_key.lock().unwrap_or_else(|p| p.into_inner()) = Some(key.clone());
        Ok(key)
    }

    /// One attempt: the write sealed to `key`, posted; the operator's answer.
    async fn post(
        &self,
        caller: &Caller,
        request: &Request,
        key: &SealingPublicKey,
    ) -> Result<(u16, Vec<u8>), InvokeError> {
        let write = ForwardedWrite::seal(
            &self.node,
            &request.request_id,
            &request.command,
            request.idempotency_key.as_ref().map(IdempotencyKey::as_str),
            key,
        )
        .map_err(|e| InvokeError::internal(e.to_string()))?;
        let credential = caller.credential.as_ref().ok_or_else(|| {
            InvokeError::internal("the caller's token was not kept for the write; this is a bug")
        })?;
        let node_token =
            zeroize::Zeroizing::new(std::fs::read_to_string(&self.token_file).map_err(|e| {
                InvokeError::internal(format!(
                    "cannot read the node's token for the operator from {}: {e}",
                    self.token_file.display()
                ))
            })?);
        let body = serde_json::to_vec(&write)
            .map_err(|e| InvokeError::internal(format!("the write could not be written: {e}")))?;
        let http = hyper::Request::post(&self.path)
            .header("content-type", "application/json")
            .header(
                "x-claw-secrets-authorization",
                format!("Bearer {}", node_token.trim()),
            )
            .header(CALLER_HEADER, format!("Bearer {}", credential.expose()))
            .body(kube::client::Body::from(body))
            .map_err(|e| InvokeError::internal(e.to_string()))?;
        let response = self.client.send(http).await.map_err(|e| {
            unavailable(format!(
                "the operator could not be reached through the API server ({e}); writes need it, reads do not"
            ))
        })?;
        let status = response.status().as_u16();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| unavailable(format!("the operator's answer was cut off: {e}")))?
            .to_bytes();
        Ok((status, bytes.to_vec()))
    }

    async fn carry_write(
        &self,
        caller: &Caller,
        request: &Request,
        target: &ObjectKey,
    ) -> Result<serde_json::Value, InvokeError> {
        let secret = request.command.name().starts_with("secret.");
        let before = secret.then(|| self.store.secret(target).map(|s| s.version));
        let mut fresh = false;
        loop {
            let key = self.sealing_key(fresh).await?;
            let (status, body) = self.post(caller, request, &key).await?;
            let answer = match serde_json::from_slice::<ForwardedAnswer>(&body) {
                Ok(answer) => answer,
                // Sealed to a master key the operator does not hold (rotated since it was
                // read): read the key again, once.
                Err(_)
                    if status == 400
                        && !fresh
                        && String::from_utf8_lossy(&body).contains("does not open") =>
                {
                    fresh = true;
                    continue;
                }
                Err(_) => {
                    let text: String = String::from_utf8_lossy(&body)
                        .trim()
                        .chars()
                        .take(512)
                        .collect();
                    return Err(unavailable(format!(
                        "the operator did not carry the write (HTTP {status}: {text}); writes need it, reads do not"
                    )));
                }
            };
            return match (answer.ok, answer.payload, answer.error) {
                (true, Some(payload), _) => {
                    self.settle(request, target, &payload, before).await;
                    Ok(payload)
                }
                (_, _, Some(error)) => Err(InvokeError::new(error.code, error.message)),
                _ => Err(InvokeError::internal(
                    "the operator's answer has neither payload nor error",
                )),
            };
        }
    }

    /// Waits for this node's store to show the write to `target` (`before`: the version it
    /// held when the write began, for a secret command): a created secret (meant for every
    /// node), a rotated one it held at the new version, a deleted one it held gone.
    async fn settle(
        &self,
        request: &Request,
        target: &ObjectKey,
        payload: &serde_json::Value,
        before: Option<Option<Version>>,
    ) {
        let Some(before) = before else { return };
        let version = payload.get("version").and_then(|v| v.as_u64());
        let shown = |store: &Store| match request.command.name() {
            "secret.create" => store
                .secret(target)
                .is_some_and(|s| Some(s.version.get()) >= version),
            "secret.rotate" if before.is_some() => store
                .secret(target)
                .is_none_or(|s| Some(s.version.get()) >= version),
            "secret.delete" if before.is_some() => store.secret(target).is_none(),
            _ => true,
        };
        let deadline = tokio::time::Instant::now() + SETTLE;
        while !shown(&self.store) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl WriteCarrier for OperatorCarrier {
    fn carry<'a>(
        &'a self,
        caller: &'a Caller,
        request: &'a Request,
        target: &'a ObjectKey,
    ) -> Pin<Box<dyn Future<Output = Result<serde_json::Value, InvokeError>> + Send + 'a>> {
        Box::pin(self.carry_write(caller, request, target))
    }
}
