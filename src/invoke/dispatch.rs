//! One request body, start to finish: parse the envelope, authenticate, check the node id, parse
//! the command, and hand it to the [`CommandCore`], which authorizes, audits and answers.

use super::params::{sanitize_serde_message, truncate_for_message};
use super::{
    Authorizer, Caller, Command, CommandCore, IdempotencyKey, InvokeError, InvokeRequest,
    InvokeResponse, Repository, Request, WriteCarrier,
};
use crate::domain::ErrorCode;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

/// Accepted as a node id by every server, besides its own id (the seed's `node.invoke local`).
pub const LOCAL_NODE_ALIAS: &str = "local";

pub struct Dispatcher<A, R> {
    core: CommandCore<A, R>,
    /// Where writes go when this server cannot make them itself (a node agent without the
    /// master keyring); `None`: the core makes them.
    carrier: Option<std::sync::Arc<dyn WriteCarrier>>,
    /// What `GET /metrics` shows: the core's metrics, and whatever the backend adds.
    registry: Registry,
    /// Lines `GET /readyz` adds after its verdict (the gateway connection's state).
    readiness_notes: Vec<ReadinessNote>,
}

/// A line of `GET /readyz` detail, as of the moment it is asked for.
pub type ReadinessNote = std::sync::Arc<dyn Fn() -> String + Send + Sync>;

impl<A: Authorizer, R: Repository> Dispatcher<A, R> {
    pub fn new(core: CommandCore<A, R>) -> Self {
        let mut registry = Registry::with_prefix("claw_secrets");
        core.metrics().register(&mut registry);
        Dispatcher {
            core,
            carrier: None,
            registry,
            readiness_notes: Vec::new(),
        }
    }

    /// Writes are passed on to `carrier` (after this server's own authorization and audit).
    pub fn with_carrier(mut self, carrier: std::sync::Arc<dyn WriteCarrier>) -> Self {
        self.carrier = Some(carrier);
        self
    }

    /// Adds a line to what `GET /readyz` says.
    pub fn with_readiness_note(mut self, note: ReadinessNote) -> Self {
        self.readiness_notes.push(note);
        self
    }

    /// The detail lines of `GET /readyz`.
    pub fn readiness_notes(&self) -> impl Iterator<Item = String> + '_ {
        self.readiness_notes.iter().map(|note| note())
    }

    /// The registry `GET /metrics` encodes, for the backend's own metrics (prefix
    /// `claw_secrets`).
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// The OpenMetrics text of every registered metric, as of now.
    pub fn metrics_text(&self) -> String {
        self.core
            .metrics()
            .observe_store(self.core.repository().store());
        let mut out = String::with_capacity(4096);
        prometheus_client::encoding::text::encode(&mut out, &self.registry)
            .expect("writing to a String does not fail");
        out
    }

    pub fn core(&self) -> &CommandCore<A, R> {
        &self.core
    }

    pub fn node_id(&self) -> &str {
        self.core.node_id()
    }

    /// Handles one `POST /v1/invoke` body. Never panics on input; every failure is a response.
    pub async fn handle(&self, bearer: Option<&str>, body: &[u8]) -> InvokeResponse {
        let caller = self.authenticate(bearer).await;
        self.handle_as(caller, body).await
    }

    /// Who the bearer token stands for: the first step of every request, taken from the
    /// headers before any body byte is read.
    pub async fn authenticate(&self, bearer: Option<&str>) -> Result<Caller, InvokeError> {
        self.core.authorizer().authenticate(bearer).await
    }

    /// Handles one body for a caller [`Dispatcher::authenticate`] has settled (or refused).
    pub async fn handle_as(
        &self,
        caller: Result<Caller, InvokeError>,
        body: &[u8],
    ) -> InvokeResponse {
        self.handle_request(caller, serde_json::from_slice(body), None)
            .await
    }

    /// Handles one request another transport has read (the gateway's `node.invoke.request`),
    /// for a caller it has settled. `cancel`: cancelled when the asker gives up on the answer
    /// (see [`Request::cancel`]).
    pub async fn handle_request(
        &self,
        caller: Result<Caller, InvokeError>,
        parsed: Result<InvokeRequest, serde_json::Error>,
        cancel: Option<CancellationToken>,
    ) -> InvokeResponse {
        let command = parsed.as_ref().map_or("", |r| r.command.as_str());
        let response = self.answer(caller, &parsed, cancel).await;
        self.count(command, &response);
        response
    }

    /// Answers a caller refused without reading its body (too large to read for someone not
    /// authenticated): not audited (its command is unknown), counted.
    pub fn refuse_unread(&self, err: InvokeError) -> InvokeResponse {
        let response = InvokeResponse::failure(generate_request_id(), err);
        self.count("", &response);
        response
    }

    fn count(&self, command: &str, response: &InvokeResponse) {
        let result = response.error.as_ref().map_or(Ok(()), |e| Err(e.code));
        self.core.metrics().answered(command, result);
    }

    async fn answer(
        &self,
        caller: Result<Caller, InvokeError>,
        parsed: &Result<InvokeRequest, serde_json::Error>,
        cancel: Option<CancellationToken>,
    ) -> InvokeResponse {
        let request_id = match &parsed {
            Ok(InvokeRequest { id: Some(id), .. }) if valid_request_id(id) => id.clone(),
            _ => generate_request_id(),
        };
        let caller = match caller {
            Ok(caller) => caller,
            Err(err) => {
                // An anonymous attempt at an audited command is still an attempt: record the denial.
                let err = match parsed {
                    Ok(req) if Command::is_audited(&req.command) => {
                        let anonymous = Caller::named("anonymous");
                        self.refusal(&anonymous, req, err, &request_id).await
                    }
                    _ => err,
                };
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
                        sanitize_serde_message(&e.to_string())
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
            && node != self.node_id()
            && node != LOCAL_NODE_ALIAS
        {
            return InvokeResponse::failure(
                request_id,
                InvokeError::new(
                    ErrorCode::NotFound,
                    format!(
                        "node {:?} is not served here: this is node {:?} (\"local\" also works)",
                        truncate_for_message(node),
                        self.node_id()
                    ),
                ),
            );
        }
        let request = match self.request(req, &request_id, cancel) {
            Ok(request) => request,
            Err(err) => {
                let err = if Command::is_audited(&req.command) {
                    self.refusal(&caller, req, err, &request_id).await
                } else {
                    err
                };
                return InvokeResponse::failure(request_id, err);
            }
        };
        if let Some(carrier) = &self.carrier
            && request.command.is_write()
        {
            return match self
                .core
                .execute_carried(&caller, &request, carrier.as_ref())
                .await
            {
                Ok(payload) => InvokeResponse::success(request_id, payload),
                Err(e) => InvokeResponse::failure(request_id, e),
            };
        }
        match self.core.execute(&caller, request).await {
            Ok(payload) => InvokeResponse::success(request_id, payload),
            Err(e) => InvokeResponse::failure(request_id, e),
        }
    }

    /// The envelope's command, params and idempotency key as a request for the core.
    fn request(
        &self,
        req: &InvokeRequest,
        request_id: &str,
        cancel: Option<CancellationToken>,
    ) -> Result<Request, InvokeError> {
        let command = Command::parse(&req.command, req.params.as_deref())?;
        let idempotency_key = req
            .idempotency_key
            .as_deref()
            .map(IdempotencyKey::parse)
            .transpose()?
            // A key on a read is checked for form, then has nothing to do.
            .filter(|_| command.is_write());
        Ok(Request {
            command,
            idempotency_key,
            request_id: request_id.to_owned(),
            cancel,
        })
    }

    /// Records an audited command refused before it reached the core; returns the error to
    /// answer (UNAVAILABLE if even the refusal cannot be recorded).
    async fn refusal(
        &self,
        caller: &Caller,
        req: &InvokeRequest,
        err: InvokeError,
        request_id: &str,
    ) -> InvokeError {
        let parsed = Command::parse(&req.command, req.params.as_deref()).ok();
        let name = parsed.as_ref().and_then(Command::target_name);
        let namespace = parsed.as_ref().and_then(Command::requested_namespace);
        match self
            .core
            .record_refusal(caller, &req.command, namespace, name, &err, request_id)
            .await
        {
            Ok(()) => err,
            Err(unrecorded) => unrecorded,
        }
    }
}

fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
}

fn generate_request_id() -> String {
    let mut b = [0u8; 8];
    // A request id is not a secret (it is answered and logged): the pooled public randomness
    // saves a system call per request. If the RNG fails, a fixed id still lets the request run.
    let _ = crate::crypto::random_public_bytes(&mut b);
    format!("req-{}", crate::hex::encode(&b))
}
