//! Fetching this node's deliveries from the operator ([`crate::k8s::delivery`]), through the
//! API server's service proxy: the agent needs no route to the operator's pods, no cluster DNS
//! and no certificate of the operator's, only the API server it already talks to (RBAC: `get`
//! on `services/proxy`, for the operator's webhook Service only). The API server authenticates
//! the agent for the proxying; the operator authenticates the node by the second token, made
//! for the audience `claw-secrets-operator` and sent in `X-Claw-Secrets-Authorization`, which
//! the proxy passes on. What travels is sealed to the node's key, so the proxy's leg to the
//! operator (TLS the API server does not verify) carries no secret in clear.

use http_body_util::BodyExt;
use std::path::PathBuf;
use std::time::Duration;

use crate::k8s::delivery::{NodeDeliveries, PATH};

/// Where the operator's delivery endpoint is, and the node's token for it.
#[derive(Clone)]
pub struct DeliveryClient {
    /// The agent's own client, without a read timeout: a fetch may wait up to a minute.
    client: kube::Client,
    /// `/api/v1/namespaces/<ns>/services/https:<service>:<port>/proxy/v1/deliveries`.
    path: String,
    /// The token for the audience `claw-secrets-operator` (a projected ServiceAccount token the
    /// kubelet renews): read again for every fetch.
    token_file: PathBuf,
}

/// Why a fetch failed; the message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot read the node's delivery token from {path}: {source}")]
    Token {
        path: String,
        source: std::io::Error,
    },
    #[error("the API server could not be reached for deliveries: {0}")]
    Unreachable(String),
    #[error("deliveries refused ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("the deliveries could not be read: {0}")]
    Malformed(String),
}

impl DeliveryClient {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        service: &str,
        port: u16,
        token_file: PathBuf,
    ) -> Self {
        DeliveryClient {
            client,
            path: format!(
                "/api/v1/namespaces/{namespace}/services/https:{service}:{port}/proxy{PATH}"
            ),
            token_file,
        }
    }

    /// The node's deliveries, or `None` if they are still those of `have` after waiting up to
    /// `wait` (at most a minute) for them to change.
    pub async fn fetch(
        &self,
        have: Option<&str>,
        wait: Duration,
    ) -> Result<Option<NodeDeliveries>, FetchError> {
        let token = zeroize::Zeroizing::new(std::fs::read_to_string(&self.token_file).map_err(
            |source| FetchError::Token {
                path: self.token_file.display().to_string(),
                source,
            },
        )?);
        let mut uri = format!("{}?wait={}", self.path, wait.as_secs());
        if let Some(etag) = have {
            uri.push_str("&have=");
            uri.push_str(etag);
        }
        let request = hyper::Request::get(uri)
            .header(
                "x-claw-secrets-authorization",
                format!("Bearer {}", token.trim()),
            )
            .body(kube::client::Body::from(Vec::new()))
            .map_err(|e| FetchError::Malformed(e.to_string()))?;
        let response = self
            .client
            .send(request)
            .await
            .map_err(|e| FetchError::Unreachable(e.to_string()))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| FetchError::Unreachable(e.to_string()))?
            .to_bytes();
        match status.as_u16() {
            200 => serde_json::from_slice(&body).map(Some).map_err(|e| {
                FetchError::Malformed(format!("not deliveries (column {})", e.column()))
            }),
            304 => Ok(None),
            code => Err(FetchError::Refused {
                status: code,
                // The operator's and the API server's messages name no value.
                message: String::from_utf8_lossy(&body)
                    .trim()
                    .chars()
                    .take(512)
                    .collect(),
            }),
        }
    }
}
