//! node.invoke writes carried by the operator (docs/architecture.md, "Per-node keys and
//! delivery"): an agent holds no master keyring, so it cannot seal a new version, nor check an
//! idempotency key against what an object remembers. It authorizes and audits the call, then
//! passes it on to the operator's `POST /v1/writes` through the API server's service proxy (the
//! path of its deliveries), where the same command core runs with the master keyring and makes
//! the write as the caller. This module is what the two sides share: the path and headers, and
//! the forwarded request, whose secret data (`data`, `newData`) travels sealed to the
//! cluster's public key ([`crate::crypto::seal_forwarded`]), bound to the node, the request
//! id and the command.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::crypto::{self, CryptoError, ForwardScope, Keyring, SealingPublicKey};
use crate::domain::{ConfigData, Name, Namespace, SecretData};
use crate::invoke::{Command, ErrorBody};

/// A config's data as JSON (plain by design).
fn config_data(data: &ConfigData) -> Value {
    Value::Object(
        data.iter()
            .map(|(k, v)| (k.as_str().to_owned(), Value::from(v.as_str())))
            .collect(),
    )
}

/// The operator's path for carried writes.
pub const PATH: &str = "/v1/writes";

/// The header with the caller's own token (the node's token for the operator goes in
/// `X-Claw-Secrets-Authorization`, as for deliveries).
pub const CALLER_HEADER: &str = "x-claw-secrets-caller-authorization";

/// The params fields that hold secret data, by command.
fn data_field(command: &str) -> Option<&'static str> {
    match command {
        "secret.create" => Some("data"),
        "secret.rotate" => Some("newData"),
        _ => None,
    }
}

/// A write as an agent passes it on.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ForwardedWrite {
    /// The request id the agent answers with and audited under.
    pub id: String,
    pub command: String,
    /// The params as the caller sent them, without the secret data field.
    pub params: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
    /// The secret data field, sealed to the cluster's public key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sealed: Option<SealedField>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SealedField {
    /// `data` or `newData`.
    pub field: String,
    pub data: String,
}

/// Why a write could not be passed on or taken back.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0} is not a write: only writes are passed on")]
    NotAWrite(String),
    #[error("sealing the data for the operator failed: {0}")]
    Seal(CryptoError),
    #[error(
        "the forwarded data does not open ({0}); was it sealed for this cluster, node and request?"
    )]
    Open(CryptoError),
    #[error("a sealed {0:?} field does not belong to {1}")]
    Field(String, String),
}

impl ForwardedWrite {
    /// The write `command` (as this node parsed and checked it) from `node`, its secret data
    /// sealed to `cluster`; the other params in clear, as typed values (no secret value is
    /// ever put into a JSON tree).
    pub fn seal(
        node: &str,
        request_id: &str,
        command: &Command,
        idempotency_key: Option<&str>,
        cluster: &SealingPublicKey,
    ) -> Result<ForwardedWrite, ForwardError> {
        let mut params = Map::new();
        let mut target = |name: &Name, namespace: Option<&Namespace>| {
            params.insert("name".to_owned(), Value::from(name.as_str()));
            if let Some(ns) = namespace {
                params.insert("namespace".to_owned(), Value::from(ns.as_str()));
            }
        };
        let secret: Option<(&str, &SecretData)> = match command {
            Command::SecretCreate(p) => {
                target(&p.name, p.namespace.as_ref());
                let workloads: Vec<Value> = p
                    .allowed_workloads
                    .iter()
                    .map(|w| Value::from(w.as_str()))
                    .collect();
                params.insert("allowed_workloads".to_owned(), Value::Array(workloads));
                Some(("data", &p.data))
            }
            Command::SecretRotate(p) => {
                target(&p.name, p.namespace.as_ref());
                if let Some(v) = p.expected_version {
                    params.insert("expectedVersion".to_owned(), Value::from(v.get()));
                }
                p.new_data.as_ref().map(|d| ("newData", d))
            }
            Command::SecretDelete(p) | Command::ConfigDelete(p) => {
                target(&p.name, p.namespace.as_ref());
                None
            }
            // A config's data is plain by design: it travels as it is.
            Command::ConfigCreate(p) => {
                target(&p.name, p.namespace.as_ref());
                params.insert("data".to_owned(), config_data(&p.data));
                params.insert("immutable".to_owned(), Value::from(p.immutable));
                None
            }
            Command::ConfigUpdate(p) => {
                target(&p.name, p.namespace.as_ref());
                params.insert("data".to_owned(), config_data(&p.data));
                if let Some(immutable) = p.immutable {
                    params.insert("immutable".to_owned(), Value::from(immutable));
                }
                None
            }
            other => return Err(ForwardError::NotAWrite(other.name().to_owned())),
        };
        let sealed = match secret {
            Some((field, data)) => {
                let scope = ForwardScope {
                    node,
                    request_id,
                    command: command.name(),
                };
                let text =
                    crypto::seal_forwarded(cluster, &scope, data).map_err(ForwardError::Seal)?;
                Some(SealedField {
                    field: field.to_owned(),
                    data: text,
                })
            }
            None => None,
        };
        Ok(ForwardedWrite {
            id: request_id.to_owned(),
            command: command.name().to_owned(),
            params,
            idempotency_key: idempotency_key.map(str::to_owned),
            sealed,
        })
    }

    /// The node.invoke request body this stands for (node id `local`), its data opened with
    /// the master keyring: in a buffer wiped when dropped.
    pub fn open(
        &self,
        node: &str,
        keyring: &Keyring,
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, ForwardError> {
        let data = match &self.sealed {
            None => None,
            Some(sealed) => {
                if data_field(&self.command) != Some(sealed.field.as_str()) {
                    return Err(ForwardError::Field(
                        sealed.field.clone(),
                        self.command.clone(),
                    ));
                }
                let scope = ForwardScope {
                    node,
                    request_id: &self.id,
                    command: &self.command,
                };
                let data = crypto::open_forwarded(keyring, &scope, &sealed.data)
                    .map_err(ForwardError::Open)?;
                Some((sealed.field.as_str(), data))
            }
        };
        // `{"id":..,"nodeId":"local","command":..,"idempotencyKey":..,"params":{..[,"<field>":<data>]}}`,
        // the data written straight into the wiped buffer.
        let mut body = zeroize::Zeroizing::new(Vec::with_capacity(512));
        let json = |v: &dyn erased::Json, out: &mut Vec<u8>| v.write(out);
        body.extend_from_slice(b"{\"id\":");
        json(&self.id, &mut body);
        body.extend_from_slice(b",\"nodeId\":\"local\",\"command\":");
        json(&self.command, &mut body);
        if let Some(key) = &self.idempotency_key {
            body.extend_from_slice(b",\"idempotencyKey\":");
            json(key, &mut body);
        }
        body.extend_from_slice(b",\"params\":{");
        let mut first = true;
        for (k, v) in &self.params {
            if !first {
                body.push(b',');
            }
            first = false;
            json(k, &mut body);
            body.push(b':');
            json(v, &mut body);
        }
        if let Some((field, data)) = &data {
            if !first {
                body.push(b',');
            }
            json(field, &mut body);
            body.push(b':');
            json(data, &mut body);
        }
        body.extend_from_slice(b"}}");
        Ok(body)
    }
}

/// Writing any serializable value as JSON into a buffer (serializing these cannot fail).
mod erased {
    pub trait Json {
        fn write(&self, out: &mut Vec<u8>);
    }

    impl<T: serde::Serialize + ?Sized> Json for T {
        fn write(&self, out: &mut Vec<u8>) {
            serde_json::to_writer(out, self).expect("a string, a JSON value or secret data");
        }
    }
}

/// The operator's answer to a carried write: the node.invoke response as the operator's
/// command core gave it (a write's payload holds metadata only).
#[derive(Deserialize, Debug)]
pub struct ForwardedAnswer {
    pub ok: bool,
    #[serde(default)]
    pub payload: Option<Value>,
    #[serde(default)]
    pub error: Option<ErrorBody>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::SealingPrivateKey;

    fn command(name: &str, params: serde_json::Value) -> Command {
        let raw = serde_json::value::RawValue::from_string(params.to_string()).unwrap();
        Command::parse(name, Some(&raw)).unwrap()
    }

    #[test]
    fn secret_data_travels_sealed_and_comes_back_as_the_request_it_was() {
        let master = Keyring::generate().unwrap();
        let cluster = SealingPrivateKey::derive(master.active()).public_key();
        let params = serde_json::json!({"name":"db","namespace":"team-a","data":{"password":"canary-91c4"},"allowed_workloads":["api"]});
        let create = command("secret.create", params.clone());
        let w = ForwardedWrite::seal("node-a", "req-1", &create, Some("k-1"), &cluster).unwrap();
        let wire = serde_json::to_string(&w).unwrap();
        assert!(!wire.contains("canary"), "{wire}");
        let back: ForwardedWrite = serde_json::from_str(&wire).unwrap();
        let body = back.open("node-a", &master).unwrap();
        let req: crate::invoke::InvokeRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(
            (
                req.id.as_deref(),
                req.node_id.as_deref(),
                req.command.as_str()
            ),
            (Some("req-1"), Some("local"), "secret.create")
        );
        assert_eq!(req.idempotency_key.as_deref(), Some("k-1"));
        let got: serde_json::Value = serde_json::from_str(req.params.unwrap().get()).unwrap();
        assert_eq!(got, params);
        // Presented as another node's: it does not open.
        assert!(matches!(
            back.open("node-b", &master),
            Err(ForwardError::Open(_))
        ));
        // The sealed field moved to another command: refused.
        let mut moved = back.clone();
        moved.command = "secret.rotate".to_owned();
        assert!(matches!(
            moved.open("node-a", &master),
            Err(ForwardError::Field(..))
        ));
    }

    #[test]
    fn every_write_travels_as_it_was_checked_and_reads_do_not() {
        let master = Keyring::generate().unwrap();
        let cluster = SealingPrivateKey::derive(master.active()).public_key();
        let round_trip = |name: &str, params: serde_json::Value| {
            let w = ForwardedWrite::seal("n", "r", &command(name, params), None, &cluster).unwrap();
            let wire = serde_json::to_string(&w).unwrap();
            assert!(!wire.contains("canary"), "{wire}");
            let body = w.open("n", &master).unwrap();
            let req: crate::invoke::InvokeRequest = serde_json::from_slice(&body).unwrap();
            (
                w.sealed.map(|s| s.field),
                serde_json::from_str::<serde_json::Value>(req.params.unwrap().get()).unwrap(),
            )
        };
        for (name, params, sealed) in [
            (
                "secret.rotate",
                serde_json::json!({"name":"db","newData":{"k":"canary-2"},"expectedVersion":3}),
                Some("newData"),
            ),
            // A rotation without new data re-seals what is stored: nothing to seal.
            ("secret.rotate", serde_json::json!({"name":"db"}), None),
            (
                "secret.delete",
                serde_json::json!({"name":"db","namespace":"team-a"}),
                None,
            ),
            // A config's data is plain by design.
            (
                "config.create",
                serde_json::json!({"name":"c","data":{"k":"v"},"immutable":true}),
                None,
            ),
            (
                "config.update",
                serde_json::json!({"name":"c","data":{"k":"w"}}),
                None,
            ),
            ("config.delete", serde_json::json!({"name":"c"}), None),
        ] {
            let (field, back) = round_trip(name, params.clone());
            assert_eq!(field.as_deref(), sealed, "{name}");
            assert_eq!(back, params, "{name}");
        }
        let read = command("secret.get", serde_json::json!({"name":"db"}));
        assert!(matches!(
            ForwardedWrite::seal("n", "r", &read, None, &cluster),
            Err(ForwardError::NotAWrite(_))
        ));
    }
}
