//! The frames of the gateway's WebSocket protocol (v4) that a node sends and reads. The gateway
//! validates its side against closed schemas (an unknown key fails the whole frame), so what is
//! sent here is exactly what it accepts; what is read is parsed leniently (extra keys ignored),
//! so a newer gateway's additions do not break an older node.

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use zeroize::Zeroizing;

use super::DeviceProof;
use crate::invoke::{ErrorBody, InvokeRequest, InvokeResponse, sanitize_serde_message};

/// The protocol version spoken (`minProtocol` = `maxProtocol`).
pub const PROTOCOL: u32 = 4;

/// The client id the gateway knows headless node hosts by (its ids are a fixed list).
pub const CLIENT_ID: &str = "node-host";
pub const CLIENT_MODE: &str = "node";
pub const ROLE: &str = "node";
pub const PLATFORM: &str = "linux";
pub const DEVICE_FAMILY: &str = "Linux";

/// A frame as it arrives. The payload stays raw until the kind of frame says what it is.
#[derive(Debug)]
pub enum Inbound {
    Event {
        event: String,
        payload: Option<Box<RawValue>>,
    },
    Res {
        id: String,
        ok: bool,
        payload: Option<Box<RawValue>>,
        error: Option<RemoteError>,
    },
    /// Requests to a node are not part of protocol v4 (invokes come as events); read so that
    /// one is ignored rather than taken for a malformed frame.
    Req { method: String },
}

/// Every field of every kind, flat: serde cannot keep a `RawValue` through an internally
/// tagged enum, so the kind is matched after parsing.
#[derive(Deserialize)]
struct Wire {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    event: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    ok: Option<bool>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
    #[serde(default)]
    error: Option<RemoteError>,
}

impl Inbound {
    /// Parses a text frame; the error says what was wrong without quoting any value.
    pub fn parse(text: &str) -> Result<Self, String> {
        let wire: Wire =
            serde_json::from_str(text).map_err(|e| sanitize_serde_message(&e.to_string()))?;
        let missing = |field: &str| format!("a {:?} frame without {field}", wire.kind);
        match wire.kind.as_str() {
            "event" => Ok(Inbound::Event {
                event: wire.event.clone().ok_or_else(|| missing("event"))?,
                payload: wire.payload,
            }),
            "res" => Ok(Inbound::Res {
                id: wire.id.clone().ok_or_else(|| missing("id"))?,
                ok: wire.ok.ok_or_else(|| missing("ok"))?,
                payload: wire.payload,
                error: wire.error,
            }),
            "req" => Ok(Inbound::Req {
                method: wire.method.unwrap_or_default(),
            }),
            _ => Err("the frame's type is not event, res or req".to_owned()),
        }
    }
}

/// An error the gateway answers (`res.error`).
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RemoteError {
    #[serde(default)]
    pub code: String,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub details: Option<serde_json::Value>,
}

impl RemoteError {
    /// The detail code (`details.code`, e.g. `PAIRING_REQUIRED`), which says more than `code`.
    pub fn detail_code(&self) -> Option<&str> {
        self.details.as_ref()?.get("code")?.as_str()
    }

    /// The pairing request to approve, when the gateway answers PAIRING_REQUIRED.
    pub fn request_id(&self) -> Option<&str> {
        self.details.as_ref()?.get("requestId")?.as_str()
    }
}

impl std::fmt::Display for RemoteError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)?;
        if let Some(detail) = self.detail_code() {
            write!(f, " ({detail})")?;
        }
        Ok(())
    }
}

/// `connect.challenge`: what the device proof signs.
#[derive(Debug, Deserialize)]
pub struct Challenge {
    pub nonce: String,
    pub ts: i64,
}

/// `hello-ok`, the answer to a good `connect`: only what a node keeps.
#[derive(Debug, Deserialize)]
pub struct HelloOk {
    #[serde(default)]
    pub auth: Option<HelloAuth>,
    #[serde(default)]
    pub policy: Option<Policy>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HelloAuth {
    /// How the gateway authenticated this connection (`token`, `device-token`, `bootstrap-token`).
    #[serde(default)]
    pub method: Option<String>,
    /// The credential to connect with from now on, instead of the gateway token or setup code.
    #[serde(default)]
    pub device_token: Option<Zeroizing<String>>,
}

impl std::fmt::Debug for HelloAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HelloAuth")
            .field("method", &self.method)
            .field(
                "device_token",
                &self.device_token.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Policy {
    /// The largest frame the gateway accepts.
    #[serde(default)]
    pub max_payload: Option<u64>,
    /// How often it sends `tick`; silence for two of them is a dead link.
    #[serde(default)]
    pub tick_interval_ms: Option<u64>,
}

/// `node.invoke.request`: a call for this node.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InvokeEvent {
    pub id: String,
    pub command: String,
    /// The params as JSON text (may hold secret values: wiped when dropped).
    #[serde(default, rename = "paramsJSON")]
    pub params_json: Option<Zeroizing<String>>,
    /// What is left of the caller's deadline.
    #[serde(default)]
    pub timeout_ms: Option<i64>,
    #[serde(default)]
    pub idempotency_key: Option<String>,
}

impl std::fmt::Debug for InvokeEvent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InvokeEvent")
            .field("id", &self.id)
            .field("command", &self.command)
            .field("timeout_ms", &self.timeout_ms)
            .finish_non_exhaustive()
    }
}

impl InvokeEvent {
    /// The call as the dispatcher reads an HTTP body: the gateway's invoke id as the request
    /// id (so the audit record names it), the gateway's idempotency key as the product's.
    pub fn to_request(&self) -> Result<InvokeRequest, serde_json::Error> {
        let params = match self.params_json.as_deref() {
            None => None,
            Some(text) if text.trim().is_empty() => None,
            // RawValue keeps the text for the command's own parser (no generic tree of values).
            Some(text) => Some(RawValue::from_string(text.to_owned())?),
        };
        Ok(InvokeRequest {
            id: Some(self.id.clone()),
            node_id: None,
            command: self.command.clone(),
            params,
            idempotency_key: self.idempotency_key.clone(),
        })
    }
}

/// `node.invoke.cancel`: the caller's deadline passed at the gateway.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CancelEvent {
    pub invoke_id: String,
}

/// `shutdown`: the gateway is going away; it may say when it expects to be back.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShutdownEvent {
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default)]
    pub restart_expected_ms: Option<u64>,
}

/// A request this node sends.
#[derive(Serialize)]
struct Req<'a, P> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: &'a str,
    method: &'a str,
    params: P,
}

/// The credential of a `connect`: exactly one of them.
#[derive(Clone, Copy)]
#[allow(clippy::enum_variant_names)] // the gateway's own names for them
pub enum Credential<'a> {
    GatewayToken(&'a str),
    DeviceToken(&'a str),
    BootstrapToken(&'a str),
}

impl Credential<'_> {
    /// What the device proof signs as its token.
    pub fn secret(&self) -> &str {
        match self {
            Credential::GatewayToken(t)
            | Credential::DeviceToken(t)
            | Credential::BootstrapToken(t) => t,
        }
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Credential::GatewayToken(_) => "the gateway token",
            Credential::DeviceToken(_) => "the device token",
            Credential::BootstrapToken(_) => "the setup code",
        }
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Auth<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_token: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bootstrap_token: Option<&'a str>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Client<'a> {
    id: &'static str,
    display_name: &'a str,
    version: &'static str,
    platform: &'static str,
    device_family: &'static str,
    mode: &'static str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ConnectParams<'a> {
    min_protocol: u32,
    max_protocol: u32,
    client: Client<'a>,
    role: &'static str,
    scopes: [&'static str; 0],
    caps: [&'static str; 0],
    commands: &'a [&'a str],
    permissions: serde_json::Map<String, serde_json::Value>,
    auth: Auth<'a>,
    locale: &'static str,
    user_agent: String,
    device: &'a DeviceProof,
}

/// The `connect` request (as JSON text, wiped when dropped: it holds the credential).
pub fn connect(
    id: &str,
    display_name: &str,
    commands: &[&str],
    credential: Credential<'_>,
    device: &DeviceProof,
) -> Zeroizing<String> {
    let auth = match credential {
        Credential::GatewayToken(t) => Auth {
            token: Some(t),
            device_token: None,
            bootstrap_token: None,
        },
        Credential::DeviceToken(t) => Auth {
            token: None,
            device_token: Some(t),
            bootstrap_token: None,
        },
        Credential::BootstrapToken(t) => Auth {
            token: None,
            device_token: None,
            bootstrap_token: Some(t),
        },
    };
    let params = ConnectParams {
        min_protocol: PROTOCOL,
        max_protocol: PROTOCOL,
        client: Client {
            id: CLIENT_ID,
            display_name,
            version: env!("CARGO_PKG_VERSION"),
            platform: PLATFORM,
            device_family: DEVICE_FAMILY,
            mode: CLIENT_MODE,
        },
        role: ROLE,
        scopes: [],
        caps: [],
        commands,
        permissions: serde_json::Map::new(),
        auth,
        locale: "en-US",
        user_agent: format!("claw-secrets/{}", env!("CARGO_PKG_VERSION")),
        device,
    };
    Zeroizing::new(
        serde_json::to_string(&Req {
            kind: "req",
            id,
            method: "connect",
            params,
        })
        .expect("connect params serialize"),
    )
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct ResultParams<'a> {
    id: &'a str,
    node_id: &'a str,
    ok: bool,
    #[serde(rename = "payloadJSON", skip_serializing_if = "Option::is_none")]
    payload_json: Option<&'a str>,
    /// Closed at the gateway: `code` and `message` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ErrorBody>,
}

/// The `node.invoke.result` request answering invoke `invoke_id` with `response`, as JSON text
/// (wiped when dropped: a read's answer holds the secret's values). An answer that would make
/// a frame larger than `max_payload` becomes an error result saying so: the gateway closes
/// the connection on an oversized frame, which would fail every other call in flight.
pub fn invoke_result(
    request_id: &str,
    invoke_id: &str,
    node_id: &str,
    response: &InvokeResponse,
    max_payload: usize,
) -> Zeroizing<String> {
    let frame = |ok: bool, payload_json: Option<&str>, error: Option<&ErrorBody>| {
        Zeroizing::new(
            serde_json::to_string(&Req {
                kind: "req",
                id: request_id,
                method: "node.invoke.result",
                params: ResultParams {
                    id: invoke_id,
                    node_id,
                    ok,
                    payload_json,
                    error,
                },
            })
            .expect("result params serialize"),
        )
    };
    let encoded = match (&response.payload, &response.error) {
        (_, Some(error)) => return frame(false, None, Some(error)),
        (Some(payload), None) => serde_json::to_string(payload).map(Zeroizing::new),
        (None, None) => Ok(Zeroizing::new("null".to_owned())),
    };
    let too_large = |size: usize| ErrorBody {
        code: crate::domain::ErrorCode::FailedPrecondition,
        message: format!(
            "the answer is {size} bytes as a gateway frame, over the gateway's maxPayload of {max_payload}: ask for less (secret.list and config.list take a namespace), or call the node over HTTP"
        ),
    };
    match encoded {
        Ok(payload_json) => {
            let framed = frame(true, Some(&payload_json), None);
            if framed.len() > max_payload {
                frame(false, None, Some(&too_large(framed.len())))
            } else {
                framed
            }
        }
        Err(e) => frame(
            false,
            None,
            Some(&ErrorBody {
                code: crate::domain::ErrorCode::Internal,
                message: format!(
                    "the answer could not be encoded: {}",
                    sanitize_serde_message(&e.to_string())
                ),
            }),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ErrorCode;
    use crate::invoke::InvokeError;
    use serde_json::{Value, json};

    fn proof() -> DeviceProof {
        DeviceProof {
            id: "d".to_owned(),
            public_key: "p".to_owned(),
            signature: "s".to_owned(),
            signed_at: 7,
            nonce: "n".to_owned(),
        }
    }

    #[test]
    fn connect_sends_exactly_the_fields_of_the_gateways_closed_schema() {
        let text = connect(
            "c1",
            "claw-secrets node-a",
            &["secret.get", "config.get"],
            Credential::BootstrapToken("boot"),
            &proof(),
        );
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["type"], "req");
        assert_eq!(v["method"], "connect");
        let p = &v["params"];
        let mut keys: Vec<&str> = p.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(
            keys,
            [
                "auth",
                "caps",
                "client",
                "commands",
                "device",
                "locale",
                "maxProtocol",
                "minProtocol",
                "permissions",
                "role",
                "scopes",
                "userAgent"
            ]
        );
        assert_eq!(p["auth"], json!({"bootstrapToken": "boot"}));
        assert_eq!(p["client"]["id"], "node-host");
        assert_eq!(p["client"]["mode"], "node");
        assert_eq!(p["role"], "node");
        assert_eq!(p["commands"], json!(["secret.get", "config.get"]));
        assert_eq!(p["device"]["signedAt"], 7);
        assert_eq!(p["device"]["publicKey"], "p");
    }

    #[test]
    fn an_invoke_event_becomes_the_dispatchers_request() {
        let Inbound::Event { event, payload } = Inbound::parse(
            r#"{"type":"event","event":"node.invoke.request","payload":{"id":"inv-1","nodeId":"n","command":"secret.get","paramsJSON":"{\"name\":\"x\"}","timeoutMs":14994,"idempotencyKey":"k1","sessionKey":"s"}}"#,
        )
        .unwrap() else {
            panic!("not an event")
        };
        assert_eq!(event, "node.invoke.request");
        let invoke: InvokeEvent = serde_json::from_str(payload.unwrap().get()).unwrap();
        assert_eq!(invoke.timeout_ms, Some(14994));
        let request = invoke.to_request().unwrap();
        assert_eq!(request.id.as_deref(), Some("inv-1"));
        assert_eq!(request.command, "secret.get");
        assert_eq!(request.params.unwrap().get(), r#"{"name":"x"}"#);
        assert_eq!(request.idempotency_key.as_deref(), Some("k1"));
    }

    #[test]
    fn params_that_are_not_json_fail_to_become_a_request() {
        let invoke: InvokeEvent = serde_json::from_value(
            json!({"id": "i", "command": "secret.get", "paramsJSON": "{\"name\": \"s3cret"}),
        )
        .unwrap();
        assert!(invoke.to_request().is_err());
        let shown = format!("{invoke:?}");
        assert!(!shown.contains("s3cret"), "{shown}");
    }

    #[test]
    fn results_carry_the_payload_as_text_or_an_error_with_only_code_and_message() {
        let ok = InvokeResponse::success(
            "r".to_owned(),
            crate::invoke::Payload::Recorded(json!({"name": "x", "version": 1})),
        );
        let v: Value =
            serde_json::from_str(&invoke_result("n2", "inv", "node", &ok, 1 << 20)).unwrap();
        assert_eq!(v["method"], "node.invoke.result");
        assert_eq!(v["params"]["id"], "inv");
        assert_eq!(v["params"]["nodeId"], "node");
        assert_eq!(v["params"]["ok"], true);
        let payload: Value =
            serde_json::from_str(v["params"]["payloadJSON"].as_str().unwrap()).unwrap();
        assert_eq!(payload, json!({"name": "x", "version": 1}));

        let failed = InvokeResponse::failure(
            "r".to_owned(),
            InvokeError::new(ErrorCode::NotFound, "secret \"x\" not found"),
        );
        let v: Value =
            serde_json::from_str(&invoke_result("n3", "inv", "node", &failed, 1 << 20)).unwrap();
        assert_eq!(
            v["params"],
            json!({"id": "inv", "nodeId": "node", "ok": false, "error": {"code": "NOT_FOUND", "message": "secret \"x\" not found"}})
        );
    }

    #[test]
    fn an_answer_over_max_payload_becomes_an_error_result() {
        let big = InvokeResponse::success(
            "r".to_owned(),
            crate::invoke::Payload::Recorded(json!({"data": "v".repeat(4096)})),
        );
        let text = invoke_result("n4", "inv", "node", &big, 1024);
        assert!(text.len() <= 1024, "{}", text.len());
        let v: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["params"]["ok"], false);
        assert_eq!(v["params"]["error"]["code"], "FAILED_PRECONDITION");
        assert!(
            v["params"]["error"]["message"]
                .as_str()
                .unwrap()
                .contains("maxPayload of 1024")
        );
        assert!(!text.contains("vvvv"));
    }

    #[test]
    fn frames_of_every_kind_parse_and_garbage_is_refused_without_quoting_it() {
        assert!(matches!(
            Inbound::parse(r#"{"type":"res","id":"n1","ok":true,"payload":{"ok":true}}"#),
            Ok(Inbound::Res { ok: true, .. })
        ));
        assert!(matches!(
            Inbound::parse(r#"{"type":"event","event":"tick","payload":{"ts":1},"seq":3}"#),
            Ok(Inbound::Event { .. })
        ));
        let err = Inbound::parse(r#"{"type":"mystery","secret":"s3cret"}"#).unwrap_err();
        assert!(!err.contains("s3cret"), "{err}");
        assert!(Inbound::parse("not json s3cret").is_err());
    }
}
