//! One admission review of a ClawSecret write: read the request without letting plaintext
//! become a generic value, decide, and answer with a JSON patch (or a refusal naming the rule).
//!
//! The request is read into types of this module: `spec.data` values and annotations (kubectl's
//! last-applied copy of the manifest holds the plaintext a second time) land in zeroizing
//! strings; everything not needed is skipped by the parser, never kept. The answer's patch
//! holds ciphertext, digests and names only.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::{Deserialize, Deserializer};
use serde_json::{Value, json};
use std::collections::BTreeMap;
use zeroize::Zeroizing;

use crate::crypto::Keyring;
use crate::domain::{DataKey, SecretData, SecretValue};
use crate::k8s::convert;
use crate::k8s::crd::SealedData;
use crate::k8s::last_applied;
use crate::k8s::sealing::{self, Current, Sealing};

use super::super::metrics::Admission;

/// A string that may hold plaintext: wiped when dropped.
struct Sensitive(Zeroizing<String>);

impl<'de> Deserialize<'de> for Sensitive {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(|s| Sensitive(Zeroizing::new(s)))
    }
}

#[derive(Deserialize)]
struct ReviewIn {
    request: Option<RequestIn>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RequestIn {
    uid: String,
    operation: String,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    object: Option<Incoming>,
    #[serde(default)]
    old_object: Option<Stored>,
}

/// The object as written: what the webhook reads of it.
#[derive(Deserialize)]
struct Incoming {
    #[serde(default)]
    metadata: IncomingMeta,
    #[serde(default)]
    spec: IncomingSpec,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct IncomingMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, Sensitive>>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct IncomingSpec {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    data: Option<BTreeMap<String, Sensitive>>,
    #[serde(default)]
    encrypted_data: Option<String>,
    #[serde(default)]
    allowed_workloads: Vec<String>,
}

/// The object as stored before this write (UPDATE): its current version and high-water mark.
/// Anything else in it (plaintext included, if it was stored without the webhook) is skipped.
#[derive(Deserialize, Default)]
struct Stored {
    #[serde(default)]
    spec: StoredSpec,
    #[serde(default)]
    status: StoredStatus,
}

#[derive(Deserialize, Default)]
struct StoredSpec {
    #[serde(default)]
    sealed: Option<SealedData>,
}

#[derive(Deserialize, Default)]
struct StoredStatus {
    #[serde(default)]
    version: Option<u64>,
}

/// What the webhook answers, and how it counts.
pub struct Answer {
    /// The AdmissionReview response, JSON.
    pub body: Vec<u8>,
    /// `None`: a request with nothing to seal (allowed as it is; not counted).
    pub result: Option<Admission>,
    /// The new version sealed, for the log.
    pub sealed: Option<SealedSummary>,
}

/// Names and numbers of a seal, for the log (no value).
pub struct SealedSummary {
    pub namespace: String,
    pub name: String,
    pub version: u64,
    pub key_id: String,
}

/// A refusal: the rule broken, with the HTTP code the API server reports to the client.
struct Refusal {
    code: u16,
    message: String,
    result: Admission,
}

fn refused(message: impl Into<String>) -> Refusal {
    Refusal {
        code: 422,
        message: message.into(),
        result: Admission::Refused,
    }
}

/// Reviews one request body (an `admission.k8s.io/v1` AdmissionReview). A body that is not one
/// gets `Err` with a message for a 400 answer.
pub fn review(body: &[u8], keyring: &Keyring) -> Result<Answer, String> {
    let review: ReviewIn = serde_json::from_slice(body).map_err(|e| {
        format!(
            "not an admission.k8s.io/v1 AdmissionReview: {}",
            e.classify_name()
        )
    })?;
    let request = review
        .request
        .ok_or("not an admission.k8s.io/v1 AdmissionReview: no request")?;
    let uid = request.uid.clone();
    let mut sealed = None;
    let (response, result) = match decide(request, keyring) {
        Ok(None) => (json!({ "uid": uid, "allowed": true }), None),
        Ok(Some(Decision {
            patch,
            result,
            seal,
        })) => {
            sealed = seal;
            let patch = serde_json::to_vec(&patch).expect("a patch serializes");
            (
                json!({
                    "uid": uid,
                    "allowed": true,
                    "patchType": "JSONPatch",
                    "patch": B64.encode(patch),
                }),
                Some(result),
            )
        }
        Err(refusal) => (
            json!({
                "uid": uid,
                "allowed": false,
                "status": {
                    "code": refusal.code,
                    "reason": if refusal.code == 422 { "Invalid" } else { "InternalError" },
                    "message": refusal.message,
                },
            }),
            Some(refusal.result),
        ),
    };
    let body = serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
    .expect("a response serializes");
    Ok(Answer {
        body,
        result,
        sealed,
    })
}

/// A successful review: the patch, how it counts, and the seal for the log.
struct Decision {
    patch: Vec<Value>,
    result: Admission,
    seal: Option<SealedSummary>,
}

trait ClassifyName {
    fn classify_name(&self) -> &'static str;
}

impl ClassifyName for serde_json::Error {
    /// The error's category, never its text: serde's messages can quote the input.
    fn classify_name(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Io => "unreadable",
            serde_json::error::Category::Syntax => "malformed JSON",
            serde_json::error::Category::Data => "unexpected field types",
            serde_json::error::Category::Eof => "truncated JSON",
        }
    }
}

fn decide(request: RequestIn, keyring: &Keyring) -> Result<Option<Decision>, Refusal> {
    if !matches!(request.operation.as_str(), "CREATE" | "UPDATE") {
        return Ok(None);
    }
    let Some(mut object) = request.object else {
        return Ok(None);
    };
    let plaintext = object.spec.data.take();
    let encrypted = object.spec.encrypted_data.take();
    let from = match (plaintext, encrypted) {
        (None, None) => return Ok(None),
        (Some(_), Some(_)) => {
            return Err(refused(
                "spec: give data (plaintext) or encryptedData (the output of claw-secrets seal), not both",
            ));
        }
        (Some(plain), None) => Source::Plaintext(plain),
        (None, Some(text)) => Source::Encrypted(text),
    };
    let name = object
        .metadata
        .name
        .clone()
        .or(request.name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            refused(
                "metadata.name: a ClawSecret with data needs a name of its own (generateName is not supported: the data is sealed to the object's name before the API server would choose one)",
            )
        })?;
    let key = convert::secret_key_of(object.spec.name.as_ref(), &name, request.namespace.clone())
        .map_err(|i| refused(i.message))?;
    convert::workloads(&object.spec.allowed_workloads)
        .map_err(|i| refused(format!("spec.allowedWorkloads: {}", i.message)))?;
    let field = match from {
        Source::Plaintext(_) => "/spec/data",
        Source::Encrypted(_) => "/spec/encryptedData",
    };
    let data = match from {
        Source::Plaintext(plain) => parse_data(plain)?,
        Source::Encrypted(text) => {
            sealing::open_encrypted(keyring, &key, &name, &text).map_err(refused)?
        }
    };
    let stored = request.old_object.unwrap_or_default();
    let current = Current {
        sealed: stored.spec.sealed.as_ref(),
        high_water: stored.status.version,
    };
    let sealing = sealing::seal_applied(keyring, &key, current, &data).map_err(|e| Refusal {
        code: 500,
        message: format!("the operator could not seal the data ({e}); nothing was stored, retry"),
        result: Admission::Failed,
    })?;
    drop(data);

    let mut patch = vec![json!({ "op": "remove", "path": field })];
    let (sealed, result, seal) = match sealing {
        // The stored version stays (whatever else the request put into spec.sealed).
        Sealing::Unchanged => (
            current
                .sealed
                .cloned()
                .expect("unchanged data has a current version"),
            Admission::Unchanged,
            None,
        ),
        Sealing::New { sealed, .. } => {
            let summary = SealedSummary {
                namespace: key.namespace.to_string(),
                name: name.clone(),
                version: sealed.version,
                key_id: sealed.key_id.clone(),
            };
            (sealed, Admission::Sealed, Some(summary))
        }
    };
    patch.push(json!({ "op": "add", "path": "/spec/sealed", "value": sealed }));
    if let Some(applied) = object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(last_applied::ANNOTATION))
    {
        // JSON pointer: '/' in the annotation's name is written "~1".
        let path = format!(
            "/metadata/annotations/{}",
            last_applied::ANNOTATION
                .replace('~', "~0")
                .replace('/', "~1")
        );
        patch.push(match last_applied::without_plaintext(&applied.0) {
            Some(text) => json!({ "op": "replace", "path": path, "value": text }),
            None => json!({ "op": "remove", "path": path }),
        });
    }
    Ok(Some(Decision {
        patch,
        result,
        seal,
    }))
}

enum Source {
    Plaintext(BTreeMap<String, Sensitive>),
    Encrypted(String),
}

/// `spec.data` parsed by the rules of `secret.create`; messages name keys, never values.
fn parse_data(plain: BTreeMap<String, Sensitive>) -> Result<SecretData, Refusal> {
    let mut entries = BTreeMap::new();
    for (k, mut v) in plain {
        let key = DataKey::parse(&k).map_err(|e| refused(format!("spec.data: {e}")))?;
        entries.insert(key, SecretValue::new(std::mem::take(&mut *v.0)));
    }
    SecretData::parse(entries).map_err(|e| refused(format!("spec.data: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::{self, Envelope, SecretIdentity};
    use crate::domain::{Kind, Name, Namespace, Version};

    const CANARY: &str = "canary-4e1d9c";

    fn request(operation: &str, object: Value, old: Option<Value>) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "u-1", "operation": operation, "namespace": "team", "name": "db",
                "object": object, "oldObject": old,
            },
        }))
        .unwrap()
    }

    fn with_data(data: Value) -> Value {
        let applied = json!({"kind": "ClawSecret", "spec": {"data": data}}).to_string();
        json!({
            "metadata": {"name": "db", "namespace": "team",
                "annotations": {(last_applied::ANNOTATION): applied, "team": "x"}},
            "spec": {"data": data, "allowedWorkloads": ["api"]},
        })
    }

    fn response(answer: &Answer) -> Value {
        let text = String::from_utf8(answer.body.clone()).unwrap();
        assert!(!text.contains(CANARY), "{text}");
        serde_json::from_str::<Value>(&text).unwrap()["response"].clone()
    }

    fn patch(response: &Value) -> Vec<Value> {
        assert_eq!(response["allowed"], true, "{response}");
        let bytes = B64.decode(response["patch"].as_str().unwrap()).unwrap();
        let text = String::from_utf8(bytes).unwrap();
        assert!(!text.contains(CANARY), "{text}");
        serde_json::from_str(&text).unwrap()
    }

    fn op<'a>(ops: &'a [Value], path: &str) -> &'a Value {
        ops.iter()
            .find(|o| o["path"] == path)
            .unwrap_or_else(|| panic!("no {path} in {ops:?}"))
    }

    #[test]
    fn a_create_is_sealed_finalized_and_its_last_applied_copy_scrubbed() {
        let keyring = Keyring::generate().unwrap();
        let body = request("CREATE", with_data(json!({"password": CANARY})), None);
        let answer = review(&body, &keyring).unwrap();
        assert_eq!(answer.result, Some(Admission::Sealed));
        let ops = patch(&response(&answer));
        assert_eq!(op(&ops, "/spec/data")["op"], "remove");
        let sealed: SealedData =
            serde_json::from_value(op(&ops, "/spec/sealed")["value"].clone()).unwrap();
        assert_eq!(sealed.version, 1);
        assert!(sealed.data_digest.is_some());
        let envelope = Envelope::from_bytes(&B64.decode(&sealed.envelope).unwrap()).unwrap();
        let (ns, name) = (
            Namespace::parse("team").unwrap(),
            Name::parse("db").unwrap(),
        );
        let identity = SecretIdentity {
            kind: Kind::Secret,
            namespace: &ns,
            name: &name,
            version: Version::FIRST,
        };
        let data = crypto::open(&keyring, &identity, &envelope).unwrap();
        assert_eq!(data.get("password").unwrap().expose(), CANARY);
        // No finalizer: deletion never waits for the operator.
        assert!(
            !ops.iter()
                .any(|o| o["path"].as_str().unwrap().contains("finalizers"))
        );
        let applied = op(
            &ops,
            "/metadata/annotations/kubectl.kubernetes.io~1last-applied-configuration",
        );
        assert_eq!(applied["op"], "replace");
        assert_eq!(
            applied["value"],
            json!({"kind": "ClawSecret", "spec": {}}).to_string()
        );

        // The same data applied again: the stored version stays, nothing new is sealed.
        let old = json!({"spec": {"sealed": sealed}, "status": {"version": 1}});
        let again = with_data(json!({"password": CANARY}));
        let answer = review(&request("UPDATE", again, Some(old.clone())), &keyring).unwrap();
        assert_eq!(answer.result, Some(Admission::Unchanged));
        let ops = patch(&response(&answer));
        assert_eq!(op(&ops, "/spec/sealed")["value"], old["spec"]["sealed"]);

        // Other data: version 2.
        let changed = with_data(json!({"password": "other"}));
        let answer = review(&request("UPDATE", changed, Some(old)), &keyring).unwrap();
        assert_eq!(answer.result, Some(Admission::Sealed));
        let ops = patch(&response(&answer));
        assert_eq!(op(&ops, "/spec/sealed")["value"]["version"], 2);
    }

    #[test]
    fn invalid_writes_are_refused_with_the_rule_and_without_the_value() {
        let keyring = Keyring::generate().unwrap();
        let cases = [
            (with_data(json!({"bad key!": CANARY})), "spec.data"),
            (
                json!({"metadata": {"name": "db"}, "spec": {"data": {"k": CANARY}, "encryptedData": "AA"}}),
                "not both",
            ),
            (
                json!({"metadata": {"name": "db"}, "spec": {"encryptedData": "AAAA"}}),
                "spec.encryptedData does not open",
            ),
            (
                json!({"metadata": {"name": "db"}, "spec": {"data": {"k": CANARY}, "allowedWorkloads": ["Not_Valid"]}}),
                "spec.allowedWorkloads",
            ),
        ];
        for (object, rule) in cases {
            let answer = review(&request("CREATE", object, None), &keyring).unwrap();
            let response = response(&answer);
            assert_eq!(response["allowed"], false, "{response}");
            assert_eq!(response["status"]["code"], 422);
            let message = response["status"]["message"].as_str().unwrap();
            assert!(message.contains(rule), "{rule}: {message}");
            assert_eq!(answer.result, Some(Admission::Refused));
        }
        // generateName: no name to seal to yet.
        let body = serde_json::to_vec(&json!({"request": {"uid": "u", "operation": "CREATE",
            "namespace": "team", "object": {"metadata": {"generateName": "db-"},
            "spec": {"data": {"k": CANARY}}}}}))
        .unwrap();
        let response = response(&review(&body, &keyring).unwrap());
        assert!(
            response["status"]["message"]
                .as_str()
                .unwrap()
                .contains("generateName")
        );
    }

    #[test]
    fn writes_without_data_pass_untouched_and_garbage_is_a_bad_request() {
        let keyring = Keyring::generate().unwrap();
        let object = json!({"metadata": {"name": "db"}, "spec": {"sealed": null}});
        let answer = review(&request("UPDATE", object, None), &keyring).unwrap();
        assert_eq!(answer.result, None);
        let response = response(&answer);
        assert_eq!(response, json!({"uid": "u-1", "allowed": true}));
        let err = review(format!("{{\"request\": \"{CANARY}").as_bytes(), &keyring)
            .err()
            .unwrap();
        assert!(!err.contains(CANARY), "{err}");
    }
}
