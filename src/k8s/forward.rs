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
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::crypto::{self, CryptoError, ForwardScope, Keyring, SealingPublicKey};
use crate::domain::SecretData;
use crate::invoke::ErrorBody;

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

/// The params split into what travels in clear and the secret data.
#[derive(Deserialize)]
struct Split {
    #[serde(default)]
    data: Option<SecretData>,
    #[serde(default, rename = "newData")]
    new_data: Option<SecretData>,
    #[serde(flatten)]
    rest: Map<String, Value>,
}

/// Why a write could not be passed on or taken back.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("the params are not a JSON object: {0}")]
    Params(String),
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
    /// The write `command` with `params` (as the caller sent them) from `node`, its data sealed
    /// to `cluster`. Values are read straight into zeroizing buffers, never into a JSON tree.
    pub fn seal(
        node: &str,
        request_id: &str,
        command: &str,
        params: Option<&RawValue>,
        idempotency_key: Option<&str>,
        cluster: &SealingPublicKey,
    ) -> Result<ForwardedWrite, ForwardError> {
        let params = params.map_or("{}", RawValue::get);
        let bad = |e: serde_json::Error| {
            ForwardError::Params(crate::invoke::sanitize_serde_message(&e.to_string()))
        };
        let Some(field) = data_field(command) else {
            // A config command, or a delete: no secret data (a config's is plain by design).
            return Ok(ForwardedWrite {
                id: request_id.to_owned(),
                command: command.to_owned(),
                params: serde_json::from_str(params).map_err(bad)?,
                idempotency_key: idempotency_key.map(str::to_owned),
                sealed: None,
            });
        };
        let split: Split = serde_json::from_str(params).map_err(bad)?;
        let mut rest = split.rest;
        let data = if field == "data" {
            split.data
        } else {
            split.new_data
        };
        let sealed = match data {
            Some(data) => {
                let scope = ForwardScope {
                    node,
                    request_id,
                    command,
                };
                let text =
                    crypto::seal_forwarded(cluster, &scope, &data).map_err(ForwardError::Seal)?;
                Some(SealedField {
                    field: field.to_owned(),
                    data: text,
                })
            }
            None => None,
        };
        // The other field, if any, goes on for the command core to refuse by its rules.
        rest.remove(field);
        Ok(ForwardedWrite {
            id: request_id.to_owned(),
            command: command.to_owned(),
            params: rest,
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

    fn raw(json: &str) -> Box<RawValue> {
        RawValue::from_string(json.to_owned()).unwrap()
    }

    #[test]
    fn secret_data_travels_sealed_and_comes_back_as_the_request_it_was() {
        let master = Keyring::generate().unwrap();
        let cluster = SealingPrivateKey::derive(master.active()).public_key();
        let params = raw(
            r#"{"name":"db","namespace":"team-a","data":{"password":"canary-91c4"},"allowed_workloads":["api"]}"#,
        );
        let w = ForwardedWrite::seal(
            "node-a",
            "req-1",
            "secret.create",
            Some(&params),
            Some("k-1"),
            &cluster,
        )
        .unwrap();
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
        let params: Value = serde_json::from_str(req.params.unwrap().get()).unwrap();
        assert_eq!(
            params,
            serde_json::json!({"name":"db","namespace":"team-a","data":{"password":"canary-91c4"},"allowed_workloads":["api"]})
        );
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
    fn rotate_seals_new_data_and_configs_travel_as_they_came() {
        let master = Keyring::generate().unwrap();
        let cluster = SealingPrivateKey::derive(master.active()).public_key();
        let rotate = raw(r#"{"name":"db","newData":{"k":"canary-2"}}"#);
        let w =
            ForwardedWrite::seal("n", "r", "secret.rotate", Some(&rotate), None, &cluster).unwrap();
        assert_eq!(w.sealed.as_ref().unwrap().field, "newData");
        assert!(!serde_json::to_string(&w).unwrap().contains("canary"));
        // A rotation without new data re-seals what is stored: nothing to seal.
        let reseal = raw(r#"{"name":"db"}"#);
        let w =
            ForwardedWrite::seal("n", "r", "secret.rotate", Some(&reseal), None, &cluster).unwrap();
        assert!(w.sealed.is_none());
        let body = w.open("n", &master).unwrap();
        let req: crate::invoke::InvokeRequest = serde_json::from_slice(&body).unwrap();
        assert_eq!(req.params.unwrap().get(), r#"{"name":"db"}"#);
        // Config data is plain by design, and a delete has none.
        let config = raw(r#"{"name":"c","data":{"k":"v"}}"#);
        let w =
            ForwardedWrite::seal("n", "r", "config.create", Some(&config), None, &cluster).unwrap();
        assert!(w.sealed.is_none());
        assert_eq!(w.params["data"], serde_json::json!({"k": "v"}));
        let delete = raw(r#"{"name":"db"}"#);
        let w =
            ForwardedWrite::seal("n", "r", "secret.delete", Some(&delete), None, &cluster).unwrap();
        assert!(w.sealed.is_none());
    }
}
