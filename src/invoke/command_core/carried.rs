//! Writes a server cannot make itself, carried by another: a node agent without the master
//! keyring can neither seal a new version nor check an idempotency key against what an object
//! remembers, so it passes its writes on to the operator ([`WriteCarrier`]), which runs this
//! same core with the keyring. Here, on the node, a carried write is still authorized (so a
//! refusal is the node's, recorded and counted where it was asked) and audited: its intent is
//! durable before it is passed on, and its outcome is recorded with the carrier's answer.

use std::future::Future;
use std::pin::Pin;

use super::super::{Command, InvokeError, Payload, Resource, Verb};
use super::{Call, CommandCore, Request, Target};
use crate::domain::{ObjectKey, Version};
use crate::invoke::{Authorizer, Caller, Repository};

/// Where writes are passed on: `request` as this server parsed and checked it, `target` the
/// object it acts on (namespace resolved). The answer is the carrier's payload (a write's:
/// metadata only).
pub trait WriteCarrier: Send + Sync + 'static {
    fn carry<'a>(
        &'a self,
        caller: &'a Caller,
        request: &'a Request,
        target: &'a ObjectKey,
    ) -> Pin<Box<dyn Future<Output = Result<serde_json::Value, InvokeError>> + Send + 'a>>;
}

/// What a write asks to do, for the node's own authorization.
fn access_of(command: &Command) -> Option<(Verb, Resource)> {
    Some(match command {
        Command::SecretCreate(_) => (Verb::Create, Resource::Secrets),
        Command::SecretRotate(_) => (Verb::Update, Resource::Secrets),
        Command::SecretDelete(_) => (Verb::Delete, Resource::Secrets),
        Command::ConfigCreate(_) => (Verb::Create, Resource::Configs),
        Command::ConfigUpdate(_) => (Verb::Update, Resource::Configs),
        Command::ConfigDelete(_) => (Verb::Delete, Resource::Configs),
        _ => return None,
    })
}

impl<A: Authorizer, R: Repository> CommandCore<A, R> {
    /// Runs the write `request` through `carrier`: authorized here, its intent recorded,
    /// passed on, its outcome recorded.
    pub async fn execute_carried(
        &self,
        caller: &Caller,
        request: &Request,
        carrier: &dyn WriteCarrier,
    ) -> Result<Payload, InvokeError> {
        let call = Call::of(caller, request);
        let mut target = Target::default();
        let result = self.carried(&call, &mut target, request, carrier).await;
        if !target.recorded {
            // Refused before its intent (not authorized, the log unwritable): recorded as such.
            let (decision, reason) = match &result {
                Ok(_) => (crate::audit::Decision::Allow, "ok".to_owned()),
                Err(e) => (super::decision_of(e), format!("{}: {}", e.code, e.message)),
            };
            self.record(&call, &target, decision, None, reason).await?;
        }
        result
    }

    async fn carried(
        &self,
        call: &Call<'_>,
        t: &mut Target,
        request: &Request,
        carrier: &dyn WriteCarrier,
    ) -> Result<Payload, InvokeError> {
        let (Some((verb, resource)), Some(name)) =
            (access_of(call.command), call.command.target_name())
        else {
            return Err(InvokeError::internal(format!(
                "{} is not a write; only writes are carried",
                call.command.name()
            )));
        };
        let (key, _turn) = self
            .begin_write(
                call,
                t,
                verb,
                resource,
                name,
                call.command.requested_namespace(),
            )
            .await?;
        let answer = self
            .commit_as(
                call,
                t,
                "authorized; passed on to the operator",
                carrier.carry(call.caller, request, &key),
                |payload: &serde_json::Value| {
                    payload
                        .get("version")
                        .and_then(serde_json::Value::as_u64)
                        .and_then(Version::new)
                },
            )
            .await?;
        Ok(Payload::Recorded(answer))
    }
}
