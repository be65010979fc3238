//! A client of a Kubernetes KMS v2 plugin: gRPC unary calls over HTTP/2 on the plugin's Unix
//! socket, with hyper's HTTP/2 client (no gRPC framework: three calls, a 5-byte frame each
//! way, a status in the trailers). One connection per call: the keyring is wrapped or opened
//! at start, at a rotation and when the keyring Secret changes, so there is nothing to keep
//! warm, and a restarted plugin needs no reconnect logic.

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use zeroize::Zeroizing;

use super::KmsError;
use super::proto::{self, DecryptRequest, EncryptResponse, StatusResponse};

/// The gRPC service of the KMS v2 API.
const SERVICE: &str = "v2.KeyManagementService";
/// The largest response read (a wrapped keyring is a few KiB).
const MAX_RESPONSE: usize = 4 << 20;
/// The longest `grpc-message` quoted in an error.
const MAX_MESSAGE: usize = 300;

/// A KMS v2 plugin, by its socket. Cheap to clone.
#[derive(Clone)]
pub struct KmsPlugin {
    inner: Arc<Inner>,
}

struct Inner {
    /// As the user gave it, for messages.
    endpoint: String,
    path: PathBuf,
    timeout: Duration,
}

impl std::fmt::Debug for KmsPlugin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KmsPlugin")
            .field("endpoint", &self.inner.endpoint)
            .finish()
    }
}

/// The socket path of `unix:///path/to/socket` (as kube-apiserver's EncryptionConfiguration
/// spells it) or of a bare path.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, KmsError> {
    let invalid = |reason: &str| KmsError::Endpoint {
        endpoint: endpoint.to_owned(),
        reason: reason.to_owned(),
    };
    let path = match endpoint.split_once("://") {
        Some(("unix", path)) => {
            if !path.starts_with('/') {
                return Err(invalid(
                    "a unix:// endpoint needs an absolute path: unix:///path/to/socket",
                ));
            }
            path
        }
        Some((scheme, _)) => {
            return Err(invalid(&format!(
                "{scheme}:// is not supported; a KMS v2 plugin listens on a Unix socket: unix:///path/to/socket or /path/to/socket"
            )));
        }
        None => endpoint,
    };
    if path.is_empty() {
        return Err(invalid(
            "no socket path; give unix:///path/to/socket or /path/to/socket",
        ));
    }
    Ok(PathBuf::from(path))
}

/// A gRPC message frame: a 0 byte (not compressed), the length (u32, big-endian), the message.
pub(crate) fn frame(message: &[u8]) -> Zeroizing<Vec<u8>> {
    let mut framed = Zeroizing::new(Vec::with_capacity(message.len() + 5));
    framed.push(0);
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    framed
}

/// The one message of a unary response body.
pub(crate) fn unframe(body: &[u8]) -> Result<&[u8], &'static str> {
    if body.len() < 5 {
        return Err("the response has no complete gRPC message");
    }
    if body[0] != 0 {
        return Err("the response message is compressed, which was not asked for");
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    match body.len() - 5 {
        n if n < len => Err("the response's gRPC message is truncated"),
        n if n > len => Err("the response holds more than one gRPC message"),
        _ => Ok(&body[5..]),
    }
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    let hex = |b: u8| (b as char).to_digit(16);
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let (Some(hi), Some(lo)) = (hex(bytes[i + 1]), hex(bytes[i + 2]))
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    let mut decoded = String::from_utf8_lossy(&out).into_owned();
    if decoded.chars().count() > MAX_MESSAGE {
        decoded = decoded.chars().take(MAX_MESSAGE).collect::<String>() + "…";
    }
    decoded
}

/// The name of a gRPC status code.
pub(crate) fn code_name(code: u32) -> &'static str {
    match code {
        0 => "OK",
        1 => "CANCELLED",
        2 => "UNKNOWN",
        3 => "INVALID_ARGUMENT",
        4 => "DEADLINE_EXCEEDED",
        5 => "NOT_FOUND",
        6 => "ALREADY_EXISTS",
        7 => "PERMISSION_DENIED",
        8 => "RESOURCE_EXHAUSTED",
        9 => "FAILED_PRECONDITION",
        10 => "ABORTED",
        11 => "OUT_OF_RANGE",
        12 => "UNIMPLEMENTED",
        13 => "INTERNAL",
        14 => "UNAVAILABLE",
        15 => "DATA_LOSS",
        16 => "UNAUTHENTICATED",
        _ => "(unknown code)",
    }
}

/// The `grpc-status` and `grpc-message` of a header or trailer map, if it has a status.
fn grpc_status(map: &hyper::HeaderMap) -> Option<(u32, String)> {
    let code = map.get("grpc-status")?.to_str().ok()?.trim().parse().ok()?;
    let message = map
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(percent_decode)
        .unwrap_or_default();
    Some((code, message))
}

/// Aborts the connection's task when the call ends, however it ends (a timeout included).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn random_uid() -> String {
    let mut bytes = [0u8; 16];
    // A request id for the plugin's logs; a fixed one will do if the OS has no randomness.
    let _ = getrandom::getrandom(&mut bytes);
    crate::hex::encode(&bytes)
}

impl KmsPlugin {
    /// A plugin at `endpoint` (`unix:///path` or a path), each call bounded by `timeout`.
    /// Nothing is contacted yet: see [`KmsPlugin::check`].
    pub fn new(endpoint: &str, timeout: Duration) -> Result<Self, KmsError> {
        let path = socket_path(endpoint)?;
        Ok(KmsPlugin {
            inner: Arc::new(Inner {
                endpoint: endpoint.to_owned(),
                path,
                timeout,
            }),
        })
    }

    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    /// The plugin's `Status`, as it answered.
    pub async fn status(&self) -> Result<StatusResponse, KmsError> {
        let body = self.call("Status", proto::encode_status_request()).await?;
        proto::decode_status_response(&body).map_err(|e| self.protocol("Status", e.to_string()))
    }

    /// `Status`, refused unless the plugin is healthy (`healthz` "ok"), speaks v2 and names its
    /// key, as kube-apiserver requires of a KMS v2 plugin.
    pub async fn check(&self) -> Result<StatusResponse, KmsError> {
        let status = self.status().await?;
        if status.healthz != "ok" {
            return Err(KmsError::Unhealthy {
                endpoint: self.inner.endpoint.clone(),
                healthz: status.healthz.chars().take(MAX_MESSAGE).collect(),
            });
        }
        if status.version != "v2" && status.version != "v2beta1" {
            return Err(self.protocol(
                "Status",
                format!(
                    "the plugin speaks KMS API version {:?}, not v2",
                    status.version.chars().take(40).collect::<String>()
                ),
            ));
        }
        if status.key_id.is_empty() {
            return Err(self.protocol("Status", "the plugin names no key_id".to_owned()));
        }
        Ok(status)
    }

    /// Encrypts `plaintext` under the plugin's current key.
    pub async fn encrypt(&self, plaintext: &[u8]) -> Result<EncryptResponse, KmsError> {
        let request = proto::encode_encrypt_request(plaintext, &random_uid());
        let body = self.call_zeroizing("Encrypt", request).await?;
        let response = proto::decode_encrypt_response(&body)
            .map_err(|e| self.protocol("Encrypt", e.to_string()))?;
        if response.ciphertext.is_empty() || response.key_id.is_empty() {
            return Err(self.protocol(
                "Encrypt",
                "the response has no ciphertext or no key_id".to_owned(),
            ));
        }
        Ok(response)
    }

    /// Decrypts what [`KmsPlugin::encrypt`] returned, passing back the key id and annotations
    /// of its response.
    pub async fn decrypt(
        &self,
        ciphertext: &[u8],
        key_id: &str,
        annotations: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let uid = random_uid();
        let request = proto::encode_decrypt_request(&DecryptRequest {
            ciphertext,
            uid: &uid,
            key_id,
            annotations,
        });
        let body = self.call("Decrypt", request).await?;
        proto::decode_decrypt_response(&body).map_err(|e| self.protocol("Decrypt", e.to_string()))
    }

    fn protocol(&self, method: &'static str, reason: String) -> KmsError {
        KmsError::Protocol {
            endpoint: self.inner.endpoint.clone(),
            method,
            reason,
        }
    }

    async fn call(
        &self,
        method: &'static str,
        message: Vec<u8>,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        self.call_zeroizing(method, Zeroizing::new(message)).await
    }

    /// One unary call: the request message in, the response message out (both wiped when
    /// dropped; the copies inside hyper's and h2's buffers are not ours to wipe).
    async fn call_zeroizing(
        &self,
        method: &'static str,
        message: Zeroizing<Vec<u8>>,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let body = Bytes::from_owner(frame(&message));
        drop(message);
        match tokio::time::timeout(self.inner.timeout, self.exchange(method, body)).await {
            Ok(result) => result,
            Err(_) => Err(KmsError::Timeout {
                endpoint: self.inner.endpoint.clone(),
                method,
                after: self.inner.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: &'static str,
        body: Bytes,
    ) -> Result<Zeroizing<Vec<u8>>, KmsError> {
        let endpoint = &self.inner.endpoint;
        let transport = |e: &dyn std::fmt::Display| KmsError::Transport {
            endpoint: endpoint.clone(),
            method,
            reason: e.to_string(),
        };
        let stream = tokio::net::UnixStream::connect(&self.inner.path)
            .await
            .map_err(|source| KmsError::Connect {
                endpoint: endpoint.clone(),
                source,
            })?;
        let (mut sender, connection) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(stream),
        )
        .await
        .map_err(|e| transport(&e))?;
        let _connection = AbortOnDrop(tokio::spawn(async move {
            let _ = connection.await;
        }));
        let request = hyper::Request::post(format!("http://localhost/{SERVICE}/{method}"))
            .header(hyper::header::CONTENT_TYPE, "application/grpc")
            .header(hyper::header::TE, "trailers")
            .body(Full::new(body))
            .map_err(|e| transport(&e))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| transport(&e))?;
        if response.status() != hyper::StatusCode::OK {
            return Err(self.protocol(
                method,
                format!("HTTP status {} (is this a gRPC server?)", response.status()),
            ));
        }
        // A trailers-only response (an error before any message) has its status in the headers.
        if let Some((code, message)) = grpc_status(response.headers())
            && code != 0
        {
            return Err(KmsError::Status {
                endpoint: endpoint.clone(),
                method,
                code,
                name: code_name(code),
                message,
            });
        }
        let headers_status = grpc_status(response.headers());
        let collected = Limited::new(response.into_body(), MAX_RESPONSE)
            .collect()
            .await
            .map_err(|e| transport(&*e))?;
        let status = collected
            .trailers()
            .and_then(grpc_status)
            .or(headers_status);
        let body = Zeroizing::new(collected.to_bytes().to_vec());
        match status {
            None => Err(self.protocol(method, "the response has no grpc-status".to_owned())),
            Some((0, _)) => unframe(&body)
                .map(|m| Zeroizing::new(m.to_vec()))
                .map_err(|e| self.protocol(method, e.to_owned())),
            Some((code, message)) => Err(KmsError::Status {
                endpoint: endpoint.clone(),
                method,
                code,
                name: code_name(code),
                message,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        assert_eq!(
            socket_path("unix:///run/kms/plugin.sock").unwrap(),
            PathBuf::from("/run/kms/plugin.sock")
        );
        assert_eq!(
            socket_path("/run/kms/plugin.sock").unwrap(),
            PathBuf::from("/run/kms/plugin.sock")
        );
        assert_eq!(socket_path("kms.sock").unwrap(), PathBuf::from("kms.sock"));
        for bad in [
            "",
            "unix://",
            "unix://relative.sock",
            "tcp://127.0.0.1:1234",
            "http://x/y",
        ] {
            let e = socket_path(bad).unwrap_err().to_string();
            assert!(e.contains("unix:///path/to/socket"), "{bad:?}: {e}");
        }
    }

    #[test]
    fn grpc_frames() {
        assert_eq!(frame(b"").as_slice(), [0, 0, 0, 0, 0]);
        assert_eq!(frame(b"abc").as_slice(), [0, 0, 0, 0, 3, b'a', b'b', b'c']);
        let big = frame(&[1u8; 70_000]);
        assert_eq!(&big[..5], [0, 0, 1, 0x11, 0x70]);
        assert_eq!(unframe(&big).unwrap().len(), 70_000);
        assert_eq!(unframe(&[0, 0, 0, 0, 0]).unwrap(), b"");
        assert_eq!(unframe(&[0, 0, 0, 0, 2, 7, 8]).unwrap(), [7, 8]);
        assert!(unframe(&[0, 0, 0]).is_err());
        assert!(
            unframe(&[1, 0, 0, 0, 1, 7])
                .unwrap_err()
                .contains("compressed")
        );
        assert!(
            unframe(&[0, 0, 0, 0, 3, 7])
                .unwrap_err()
                .contains("truncated")
        );
        assert!(unframe(&[0, 0, 0, 0, 1, 7, 0, 0, 0, 0, 0]).is_err());
    }

    #[test]
    fn grpc_status_from_headers() {
        let mut map = hyper::HeaderMap::new();
        assert_eq!(grpc_status(&map), None);
        map.insert("grpc-status", "14".parse().unwrap());
        map.insert("grpc-message", "no%20key%3A x%".parse().unwrap());
        assert_eq!(grpc_status(&map), Some((14, "no key: x%".to_owned())));
        assert_eq!(code_name(14), "UNAVAILABLE");
        map.insert("grpc-message", "a".repeat(1000).parse().unwrap());
        assert!(grpc_status(&map).unwrap().1.chars().count() <= MAX_MESSAGE + 1);
    }
}
