//! The client the CLI uses to call a node's `POST /v1/invoke`.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::Duration;

use super::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("could not reach {addr}: {reason}; is the server running (claw-secrets dev)?")]
    Connect { addr: String, reason: String },
    #[error("{addr} answered HTTP {status} with a body that is not an invoke response")]
    BadResponse { addr: String, status: u16 },
    #[error("{}: {}", .0.code, .0.message)]
    Remote(ErrorBody),
    #[error(
        "{addr} did not answer within {} s; the server may be overloaded or unreachable (a longer --timeout waits longer)",
        .after.as_secs_f64()
    )]
    Timeout { addr: String, after: Duration },
}

/// How long the client waits: for a connection, and for the whole request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientTimeouts {
    pub connect: Duration,
    pub request: Duration,
}

impl Default for ClientTimeouts {
    /// A server on loopback or the node network connects in milliseconds; a request is
    /// answered in milliseconds unless a write waits for the API server (bounded at 5 s there).
    fn default() -> Self {
        ClientTimeouts {
            connect: Duration::from_secs(5),
            request: Duration::from_secs(30),
        }
    }
}

pub struct InvokeClient {
    client: Client<HttpConnector, Full<Bytes>>,
    endpoint: Uri,
    addr: String,
    token: String,
    timeouts: ClientTimeouts,
}

impl InvokeClient {
    /// `addr` is `http://host:port` (or `host:port`).
    pub fn new(addr: &str, token: &str, timeouts: ClientTimeouts) -> Result<Self, ClientError> {
        let base = if addr.contains("://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{addr}")
        };
        if base.starts_with("https://") {
            return Err(ClientError::Usage(
                "https endpoints are not supported by this client yet; use http:// on loopback or go through the API server".into(),
            ));
        }
        let endpoint: Uri = format!("{base}/v1/invoke")
            .parse()
            .map_err(|e| ClientError::Usage(format!("invalid address {addr:?}: {e}")))?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeouts.connect));
        Ok(InvokeClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            addr: base,
            token: token.to_owned(),
            timeouts,
        })
    }

    /// Sends one request and returns the payload of a successful answer.
    pub async fn invoke(
        &self,
        node_id: &str,
        command: &str,
        params: Value,
        idempotency_key: Option<&str>,
    ) -> Result<Value, ClientError> {
        let mut body = serde_json::json!({
            "nodeId": node_id,
            "command": command,
            "params": params,
        });
        if let Some(k) = idempotency_key {
            body["idempotencyKey"] = Value::String(k.to_owned());
        }
        tracing::debug!(addr = %self.addr, %command, "POST /v1/invoke");
        let (status, bytes) = self.post(serde_json::to_vec(&body).expect("json")).await?;
        tracing::debug!(%status, bytes = bytes.len(), "answered");
        let resp: Value = serde_json::from_slice(&bytes).map_err(|_| ClientError::BadResponse {
            addr: self.addr.clone(),
            status,
        })?;
        if resp.get("ok") == Some(&Value::Bool(true)) {
            return Ok(resp.get("payload").cloned().unwrap_or(Value::Null));
        }
        let err: ErrorBody = resp
            .get("error")
            .cloned()
            .and_then(|e| serde_json::from_value(e).ok())
            .ok_or(ClientError::BadResponse {
                addr: self.addr.clone(),
                status,
            })?;
        Err(ClientError::Remote(err))
    }

    /// Posts a raw body; returns the status and body. Gives up after the request timeout.
    pub async fn post(&self, body: Vec<u8>) -> Result<(u16, Bytes), ClientError> {
        tokio::time::timeout(self.timeouts.request, self.post_unbounded(body))
            .await
            .unwrap_or_else(|_| {
                Err(ClientError::Timeout {
                    addr: self.addr.clone(),
                    after: self.timeouts.request,
                })
            })
    }

    async fn post_unbounded(&self, body: Vec<u8>) -> Result<(u16, Bytes), ClientError> {
        let req = Request::post(self.endpoint.clone())
            .header("content-type", "application/json")
            .header("authorization", format!("Bearer {}", self.token))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Usage(e.to_string()))?;
        let resp = self
            .client
            .request(req)
            .await
            .map_err(|e| ClientError::Connect {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?;
        let status = resp.status().as_u16();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Connect {
                addr: self.addr.clone(),
                reason: e.to_string(),
            })?
            .to_bytes();
        Ok((status, bytes))
    }
}
