//! One connection to the gateway: the WebSocket over TCP (`ws://`) or TLS (`wss://`), the
//! challenge, the signed `connect`, and its answer.

use futures::{SinkExt, StreamExt};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use zeroize::Zeroizing;

use super::frames::{self, Challenge, Credential, HelloOk, Inbound, Policy, RemoteError};
use super::{GatewayError, ProofFields, prove};
use crate::crypto::DeviceKey;

/// The gateway wants `connect` within about 15 s of the socket opening; a node waits as long
/// for the challenge, and as long again for the answer.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(15);
const TCP_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The gateway's own default maxPayload is 25 MiB; frames are refused above this, whatever a
/// gateway announces, so one frame cannot take the node's memory.
pub const MAX_FRAME_BYTES: usize = 32 << 20;
/// Until hello-ok says otherwise (the gateway's limit before it).
const DEFAULT_MAX_PAYLOAD: usize = 64 << 10;

pub trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

pub type Socket = WebSocketStream<Box<dyn Io>>;

/// Where the gateway is: parsed once at start-up, so a bad URL fails then.
#[derive(Debug, Clone)]
pub struct Endpoint {
    url: String,
    host: String,
    port: u16,
    tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
}

impl Endpoint {
    /// `ws://HOST[:PORT][/PATH]` or `wss://…` (verified against `ca_file`, else the system's
    /// roots).
    pub fn parse(url: &str, ca_file: Option<&Path>) -> Result<Self, GatewayError> {
        let bad = |why: &str| GatewayError::Url(format!("{url:?}: {why}"));
        let uri: hyper::Uri = url
            .parse()
            .map_err(|_| bad("not a URL (expected ws://HOST:PORT or wss://HOST:PORT)"))?;
        let tls = match uri.scheme_str() {
            Some("ws") => false,
            Some("wss") => true,
            _ => return Err(bad("the scheme must be ws:// or wss://")),
        };
        let host = uri
            .host()
            .ok_or_else(|| bad("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
        let tls = if tls {
            Some(
                crate::tls::client_config_from(ca_file)
                    .map_err(|e| GatewayError::Tls(e.to_string()))?,
            )
        } else {
            if ca_file.is_some() {
                return Err(bad("--gateway-ca-file needs a wss:// URL"));
            }
            None
        };
        Ok(Endpoint {
            url: url.to_owned(),
            host,
            port,
            tls,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Whether the URL reaches the gateway on this machine only (plain ws:// is refused beyond
    /// it: the device token and every secret read would cross the network in clear).
    pub fn is_loopback(&self) -> bool {
        self.host == "localhost"
            || self
                .host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens the WebSocket.
    pub async fn open(&self) -> Result<Socket, String> {
        let tcp = tokio::time::timeout(
            TCP_CONNECT_TIMEOUT,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| {
            format!(
                "no TCP connection within {} s",
                TCP_CONNECT_TIMEOUT.as_secs()
            )
        })?
        .map_err(|e| e.to_string())?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some(config) => {
                let name = tokio_rustls::rustls::pki_types::ServerName::try_from(self.host.clone())
                    .map_err(|e| format!("{}: {e}", self.host))?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("TLS: {e}"))?;
                Box::new(tls)
            }
        };
        let config = WebSocketConfig::default()
            .max_message_size(Some(MAX_FRAME_BYTES))
            .max_frame_size(Some(MAX_FRAME_BYTES));
        let (socket, _) = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            tokio_tungstenite::client_async_with_config(self.url.as_str(), io, Some(config)),
        )
        .await
        .map_err(|_| "no WebSocket handshake within 15 s".to_owned())?
        .map_err(|e| e.to_string())?;
        Ok(socket)
    }
}

/// Why a connection attempt ended without a session.
#[derive(Debug)]
pub enum Refused {
    /// The network, TLS or WebSocket failed, or the gateway went quiet: try again.
    Transport(String),
    /// The gateway answered `connect` with an error.
    Gateway(RemoteError),
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::Transport(why) => f.write_str(why),
            Refused::Gateway(e) => write!(f, "{e}"),
        }
    }
}

/// A connection that completed the handshake.
pub struct Session {
    pub socket: Socket,
    pub max_payload: usize,
    pub tick: Duration,
    /// How the gateway authenticated this connection (`token`, `device-token`, ...).
    pub auth_method: Option<String>,
    /// A new device token, to save.
    pub device_token: Option<Zeroizing<String>>,
}

/// What a node declares about itself at `connect`.
pub struct Hello<'a> {
    pub display_name: &'a str,
    pub commands: &'a [&'a str],
}

/// Opens a connection and completes the handshake with `credential`.
pub async fn handshake(
    endpoint: &Endpoint,
    key: &DeviceKey,
    hello: &Hello<'_>,
    credential: Credential<'_>,
) -> Result<Session, Refused> {
    let mut socket = endpoint.open().await.map_err(Refused::Transport)?;
    let challenge: Challenge = loop {
        match next_text(&mut socket).await? {
            Inbound::Event { event, payload } if event == "connect.challenge" => {
                break payload
                    .and_then(|p| serde_json::from_str(p.get()).ok())
                    .ok_or_else(|| {
                        Refused::Transport("a connect.challenge without a nonce and ts".to_owned())
                    })?;
            }
            _ => continue,
        }
    };
    let proof = prove(
        key,
        &ProofFields {
            client_id: frames::CLIENT_ID,
            client_mode: frames::CLIENT_MODE,
            role: frames::ROLE,
            scopes: &[],
            signed_at_ms: challenge.ts,
            token: credential.secret(),
            nonce: &challenge.nonce,
            platform: frames::PLATFORM,
            device_family: frames::DEVICE_FAMILY,
        },
    );
    let mut connect = frames::connect(
        "connect",
        hello.display_name,
        hello.commands,
        credential,
        &proof,
    );
    socket
        .send(Message::text(std::mem::take(&mut *connect)))
        .await
        .map_err(|e| Refused::Transport(e.to_string()))?;
    loop {
        match next_text(&mut socket).await? {
            Inbound::Res {
                id,
                ok,
                payload,
                error,
            } if id == "connect" => {
                if !ok {
                    let _ = socket.close(None).await;
                    return Err(Refused::Gateway(error.unwrap_or(RemoteError {
                        code: "UNKNOWN".to_owned(),
                        message: "connect refused without an error".to_owned(),
                        details: None,
                    })));
                }
                let hello: HelloOk = payload
                    .and_then(|p| serde_json::from_str(p.get()).ok())
                    .ok_or_else(|| Refused::Transport("hello-ok could not be read".to_owned()))?;
                let policy = hello.policy.unwrap_or(Policy {
                    max_payload: None,
                    tick_interval_ms: None,
                });
                let (auth_method, device_token) = match hello.auth {
                    Some(auth) => (auth.method, auth.device_token),
                    None => (None, None),
                };
                return Ok(Session {
                    socket,
                    max_payload: policy
                        .max_payload
                        .map_or(DEFAULT_MAX_PAYLOAD, |m| {
                            usize::try_from(m).unwrap_or(usize::MAX)
                        })
                        .min(MAX_FRAME_BYTES),
                    tick: Duration::from_millis(
                        policy.tick_interval_ms.unwrap_or(30_000).max(1_000),
                    ),
                    auth_method,
                    device_token,
                });
            }
            _ => continue,
        }
    }
}

/// The next text frame of the handshake, parsed.
async fn next_text(socket: &mut Socket) -> Result<Inbound, Refused> {
    loop {
        let message = tokio::time::timeout(HANDSHAKE_TIMEOUT, socket.next())
            .await
            .map_err(|_| Refused::Transport("the gateway did not answer within 15 s".to_owned()))?;
        match message {
            None => {
                return Err(Refused::Transport(
                    "the gateway closed the connection".to_owned(),
                ));
            }
            Some(Err(e)) => return Err(Refused::Transport(e.to_string())),
            Some(Ok(Message::Text(text))) => {
                return Inbound::parse(&text).map_err(|why| {
                    Refused::Transport(format!(
                        "the gateway sent a frame that is not protocol v4: {why}"
                    ))
                });
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(Refused::Transport(match frame {
                    Some(f) => format!(
                        "the gateway closed the connection ({} {})",
                        u16::from(f.code),
                        f.reason
                    ),
                    None => "the gateway closed the connection".to_owned(),
                }));
            }
            Some(Ok(_)) => continue,
        }
    }
}
