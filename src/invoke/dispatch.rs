//! One request, start to finish: authenticate, parse, route, audit, answer.

use sha2::{Digest, Sha256};

use super::command::truncate_for_message;
use super::{
    Backend, Caller, Command, IdempotencyKey, InvokeError, InvokeRequest, InvokeResponse,
    RequestDigest, Target, WriteRequest,
};
use crate::audit::{AuditEvent, AuditLog, Decision};
use crate::domain::ErrorCode;

/// Accepted as a node id by every server, besides its own id (the seed's `node.invoke local`).
pub const LOCAL_NODE_ALIAS: &str = "local";

pub struct Dispatcher<B> {
    backend: B,
    audit: AuditLog,
    node_id: String,
}

impl<B: Backend> Dispatcher<B> {
    pub fn new(backend: B, audit: AuditLog, node_id: String) -> Self {
        Dispatcher {
            backend,
            audit,
            node_id,
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Handles one `POST /v1/invoke` body. Never panics on input; every failure is a response.
    pub async fn handle(&self, bearer: Option<&str>, body: &[u8]) -> InvokeResponse {
        let parsed: Result<InvokeRequest, _> = serde_json::from_slice(body);
        let request_id = match &parsed {
            Ok(InvokeRequest { id: Some(id), .. }) if valid_request_id(id) => id.clone(),
            _ => generate_request_id(),
        };

        let caller = match self.backend.authenticate(bearer).await {
            Ok(caller) => caller,
            Err(err) => {
                // An anonymous attempt at a secret is still a secret access: record the denial.
                if let Ok(req) = &parsed
                    && Command::is_secret_command(&req.command)
                {
                    let anonymous = Caller::named("anonymous");
                    let target = Command::parse(&req.command, req.params.as_deref())
                        .ok()
                        .map(|c| Target {
                            name: c.target_name().cloned(),
                            namespace: c.requested_namespace().cloned(),
                            version: None,
                        })
                        .unwrap_or_default();
                    let _ = self
                        .record(
                            &anonymous,
                            &req.command,
                            &target,
                            &Err(err.clone()),
                            &request_id,
                        )
                        .await;
                }
                return InvokeResponse::failure(request_id, err);
            }
        };

        let req = match parsed {
            Ok(req) => req,
            Err(e) => {
                return InvokeResponse::failure(
                    request_id,
                    InvokeError::invalid(format!(
                        "request body is not a valid invoke request: {}",
                        super::command::sanitize_serde_message(&e.to_string())
                    )),
                );
            }
        };
        if let Some(id) = &req.id
            && !valid_request_id(id)
        {
            return InvokeResponse::failure(
                request_id,
                InvokeError::invalid("id must be 1-128 printable ASCII characters without spaces"),
            );
        }
        if let Some(node) = &req.node_id
            && node != &self.node_id
            && node != LOCAL_NODE_ALIAS
        {
            return InvokeResponse::failure(
                request_id,
                InvokeError::new(
                    ErrorCode::NotFound,
                    format!(
                        "node {:?} is not served here: this is node {:?} (\"local\" also works)",
                        truncate_for_message(node),
                        self.node_id
                    ),
                ),
            );
        }

        let audited = Command::is_secret_command(&req.command);
        let prepared = Command::parse(&req.command, req.params.as_deref()).and_then(|command| {
            let write = match &req.idempotency_key {
                Some(key) if command.is_write() => Some(WriteRequest {
                    key: IdempotencyKey::parse(key)?,
                    digest: digest(&req),
                }),
                Some(key) => {
                    IdempotencyKey::parse(key)?;
                    None
                }
                None => None,
            };
            Ok((command, write))
        });
        let (target, result) = match prepared {
            Ok((command, write)) => {
                let name = command.name();
                let (target, result) = self.backend.execute(&caller, command, write).await;
                match &result {
                    Ok(_) => tracing::debug!(command = name, request_id, "invoke ok"),
                    Err(e) => {
                        tracing::debug!(command = name, request_id, code = %e.code, "invoke failed")
                    }
                }
                (target, result)
            }
            Err(e) => (Target::default(), Err(e)),
        };

        let result = if audited {
            match self
                .record(&caller, &req.command, &target, &result, &request_id)
                .await
            {
                Ok(()) => result,
                // Fail closed: an access that could not be recorded is not answered.
                Err(e) => Err(InvokeError::new(ErrorCode::Unavailable, e.to_string())),
            }
        } else {
            result
        };
        match result {
            Ok(payload) => InvokeResponse::success(request_id, payload),
            Err(e) => InvokeResponse::failure(request_id, e),
        }
    }

    async fn record(
        &self,
        caller: &Caller,
        command: &str,
        target: &Target,
        result: &Result<super::Payload, InvokeError>,
        request_id: &str,
    ) -> Result<(), crate::audit::AuditError> {
        let (decision, reason) = match result {
            Ok(_) => (Decision::Allow, "ok".to_owned()),
            Err(e) => {
                let decision = match e.code {
                    ErrorCode::PermissionDenied | ErrorCode::Unauthenticated => Decision::Deny,
                    _ => Decision::Error,
                };
                (decision, format!("{}: {}", e.code, e.message))
            }
        };
        let event = AuditEvent {
            node: self.node_id.clone(),
            subject: caller.subject.clone(),
            workload: caller.workload.as_ref().map(|w| w.to_string()),
            command: truncate_for_message(command),
            namespace: target.namespace.as_ref().map(|n| n.to_string()),
            name: target.name.as_ref().map(|n| n.to_string()),
            version: target.version.map(|v| v.get()),
            decision,
            reason,
            request_id: Some(request_id.to_owned()),
        };
        self.audit.append(event).await.map(|_| ())
    }
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
}

fn generate_request_id() -> String {
    let mut b = [0u8; 8];
    // A request id is not a secret; if the RNG fails, a fixed id still lets the request run.
    let _ = getrandom::getrandom(&mut b);
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("req-{hex}")
}

fn digest(req: &InvokeRequest) -> RequestDigest {
    let mut h = Sha256::new();
    h.update(req.command.as_bytes());
    h.update([0u8]);
    if let Some(p) = &req.params {
        h.update(p.get().as_bytes());
    }
    RequestDigest(h.finalize().into())
}
