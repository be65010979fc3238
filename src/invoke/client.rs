//! The client the CLI uses to call a node's `POST /v1/invoke`.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Request, Uri};
use hyper_rustls::{FixedServerNameResolver, HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::path::PathBuf;
use std::time::Duration;

use super::ErrorBody;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("could not reach {addr}: {reason}; is the server running (claw-secrets dev)?")]
    Connect { addr: String, reason: String },
    #[error(
        "could not verify {addr} as {server_name}: {reason}; an agent's certificate names its node and is signed by the CA in ConfigMap claw-secrets/claw-secrets-agent-ca (pass it with --ca-file), or pass --tls-server-name"
    )]
    Verify {
        addr: String,
        server_name: String,
        reason: String,
    },
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

/// How an `https://` server is verified.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTls {
    /// The CA bundle to trust (default: the system's CA certificates).
    pub ca_file: Option<PathBuf>,
    /// The name the server's certificate must carry (default: the address's host name, or,
    /// when the address is an IP address, the node id called: an agent's certificate names
    /// its node).
    pub server_name: Option<String>,
}

pub struct InvokeClient {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: Uri,
    addr: String,
    /// What an `https://` server's certificate is checked against; `None` for `http://`.
    server_name: Option<String>,
    token: String,
    timeouts: ClientTimeouts,
}

impl InvokeClient {
    /// `addr` is `http://host:port`, `https://host:port` (or `host:port`, plain HTTP);
    /// `node_id` is the node the calls are for (an `https://` agent at an IP address is
    /// verified as that node).
    pub fn new(
        addr: &str,
        node_id: &str,
        token: &str,
        timeouts: ClientTimeouts,
        tls: &ClientTls,
    ) -> Result<Self, ClientError> {
        let base = if addr.contains("://") {
            addr.trim_end_matches('/').to_owned()
        } else {
            format!("http://{addr}")
        };
        let endpoint: Uri = format!("{base}/v1/invoke")
            .parse()
            .map_err(|e| ClientError::Usage(format!("invalid address {addr:?}: {e}")))?;
        let https = match endpoint.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => {
                return Err(ClientError::Usage(format!(
                    "address {addr:?} must start with http:// or https://"
                )));
            }
        };
        let mut http = HttpConnector::new();
        http.set_connect_timeout(Some(timeouts.connect));
        http.enforce_http(false);
        let (server_name, connector) = if https {
            let host = endpoint.host().unwrap_or_default();
            let server_name = tls.server_name.clone().unwrap_or_else(|| {
                if host
                    .trim_matches(['[', ']'])
                    .parse::<std::net::IpAddr>()
                    .is_ok()
                {
                    node_id.to_owned()
                } else {
                    host.to_owned()
                }
            });
            let name = crate::tls::server_name(&server_name).map_err(|e| {
                ClientError::Usage(format!("{e}: pass --tls-server-name with the node's name"))
            })?;
            let config = crate::tls::client_config_from(tls.ca_file.as_deref())
                .map_err(|e| ClientError::Usage(e.to_string()))?;
            let connector = HttpsConnectorBuilder::new()
                .with_tls_config((*config).clone())
                .https_only()
                .with_server_name_resolver(FixedServerNameResolver::new(name))
                .enable_http1()
                .wrap_connector(http);
            (Some(server_name), connector)
        } else {
            // Plain HTTP only: the TLS half is never used, so it trusts nothing.
            let connector = HttpsConnectorBuilder::new()
                .with_tls_config((*crate::tls::trusting_nothing()).clone())
                .https_or_http()
                .enable_http1()
                .wrap_connector(http);
            (None, connector)
        };
        Ok(InvokeClient {
            client: Client::builder(TokioExecutor::new()).build(connector),
            endpoint,
            addr: base,
            server_name,
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
            .map_err(|e| self.connect_error(&e))?;
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

    /// Why no connection: a certificate that did not verify is said as such (with what to
    /// do), everything else as unreachable.
    fn connect_error(&self, e: &hyper_util::client::legacy::Error) -> ClientError {
        let certificate = rustls_error(e).is_some_and(|tls| {
            matches!(
                tls,
                tokio_rustls::rustls::Error::InvalidCertificate(_)
                    | tokio_rustls::rustls::Error::NoCertificatesPresented
            )
        });
        // The innermost cause says what went wrong ("invalid peer certificate: UnknownIssuer").
        let mut reason = e.to_string();
        let mut source = std::error::Error::source(e);
        while let Some(s) = source {
            reason = s.to_string();
            source = s.source();
        }
        match (&self.server_name, certificate) {
            (Some(server_name), true) => ClientError::Verify {
                addr: self.addr.clone(),
                server_name: server_name.clone(),
                reason,
            },
            _ => ClientError::Connect {
                addr: self.addr.clone(),
                reason,
            },
        }
    }
}

/// The TLS error under `e`, if any: rustls' errors reach the client wrapped in io::Errors
/// (whose `source` skips what they wrap).
fn rustls_error<'a>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a tokio_rustls::rustls::Error> {
    if let Some(tls) = e.downcast_ref::<tokio_rustls::rustls::Error>() {
        return Some(tls);
    }
    if let Some(inner) = e
        .downcast_ref::<std::io::Error>()
        .and_then(|io| io.get_ref())
    {
        return rustls_error(inner);
    }
    e.source().and_then(rustls_error)
}
