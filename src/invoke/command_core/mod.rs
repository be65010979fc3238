//! The command core: the semantics of the ten commands, written once for dev mode and the node
//! agent alike. It resolves namespaces, asks the [`Authorizer`], applies the product's own
//! access rule (a workload reads the secrets that list it), keeps idempotency, does the version
//! arithmetic, seals and opens, enforces immutability, builds the payloads, and owns the audit
//! record. It reaches the world through two seams, [`Authorizer`] and [`Repository`].
//!
//! Every write goes, in this order: authorize → the audit log's `intent` record, durable → the
//! commit → the `commit` (or `abort`) record → the answer. An intent that cannot be recorded
//! stops the write with UNAVAILABLE before anything changes; a crash after the intent leaves an
//! audited attempt, never an unaudited change. Reads of secrets are recorded before they are
//! answered, and refused if the record cannot be written.

mod carried;
mod configs;
mod deletes;
mod idempotency;
mod secrets;
#[cfg(test)]
mod tests;

pub use carried::WriteCarrier;
pub use idempotency::IdempotencyKey;

use idempotency::KeyedWrite;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use tokio::sync::{Mutex, MutexGuard};
use tokio_util::sync::CancellationToken;

use super::{
    Access, Authorizer, Caller, Command, Decision, InvokeError, InvokeMetrics, Payload, Repository,
    Resource, Verb,
};
use crate::audit::{self, AuditEvent, AuditLog, Phase};
use crate::crypto::SharedKeyring;
use crate::domain::{ErrorCode, Kind, Name, Namespace, ObjectKey, Version};
use crate::store::WriteRecord;

/// How often a write that lost a race to a concurrent writer is tried again before CONFLICT
/// is answered (only writes whose meaning does not depend on the state they replace: a rotate
/// without `expectedVersion`, a config update, a delete).
const WRITE_ATTEMPTS: usize = 4;

/// One command to run, and what came with it.
#[derive(Debug)]
pub struct Request {
    pub command: Command,
    pub idempotency_key: Option<IdempotencyKey>,
    /// The protocol's request id, for the audit log.
    pub request_id: String,
    /// Cancelled when whoever asked gives up on the answer (the gateway's `timeoutMs` passed,
    /// or its `node.invoke.cancel`). Checked before the call starts and again between a write's
    /// durable intent and its commit, never during the commit: a call given up on changes
    /// nothing (its abort is on the record) or completes in full.
    pub cancel: Option<CancellationToken>,
}

pub struct CommandCore<A, R> {
    authorizer: A,
    repository: R,
    audit: AuditLog,
    node_id: String,
    keys: SharedKeyring,
    locks: ObjectLocks,
    metrics: Arc<InvokeMetrics>,
}

/// The facts of one call that each of its audit records repeats.
struct Call<'a> {
    caller: &'a Caller,
    command: &'a Command,
    request_id: &'a str,
    idempotency_key: Option<&'a IdempotencyKey>,
    cancel: Option<&'a CancellationToken>,
}

impl<'a> Call<'a> {
    fn of(caller: &'a Caller, request: &'a Request) -> Self {
        Call {
            caller,
            command: &request.command,
            request_id: &request.request_id,
            idempotency_key: request.idempotency_key.as_ref(),
            cancel: request.cancel.as_ref(),
        }
    }

    /// UNAVAILABLE if the caller has given up on this call, so that nothing more is done.
    fn still_wanted(&self) -> Result<(), InvokeError> {
        match self.cancel {
            Some(token) if token.is_cancelled() => Err(InvokeError::new(
                ErrorCode::Unavailable,
                "the call was given up (its deadline passed, or the gateway cancelled it) before anything changed; retrying it with the same idempotency key is safe",
            )),
            _ => Ok(()),
        }
    }

    /// The call as a keyed write in `namespace`, if it carries an idempotency key.
    fn keyed(&self, namespace: &'a Namespace) -> Option<KeyedWrite<'a>> {
        self.idempotency_key.map(|key| KeyedWrite {
            key,
            caller: self.caller,
            command: self.command,
            namespace,
            request_id: self.request_id,
        })
    }
}

/// What an audit record is about, filled in as the command learns it.
#[derive(Debug, Default)]
struct Target {
    namespace: Option<Namespace>,
    name: Option<Name>,
    version: Option<Version>,
    /// The reason recorded for a success, when "ok" does not say enough (a replayed retry).
    note: Option<String>,
    /// Set once the call's outcome is on the record (a write's commit or abort): nothing more
    /// is recorded when it is answered.
    recorded: bool,
}

impl Target {
    fn object(key: &ObjectKey) -> Self {
        Target {
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            ..Target::default()
        }
    }

    fn namespace(ns: &Namespace) -> Self {
        Target {
            namespace: Some(ns.clone()),
            ..Target::default()
        }
    }
}

impl<A: Authorizer, R: Repository> CommandCore<A, R> {
    pub fn new(
        authorizer: A,
        repository: R,
        audit: AuditLog,
        node_id: String,
        keys: SharedKeyring,
    ) -> Self {
        CommandCore {
            authorizer,
            repository,
            audit,
            node_id,
            keys,
            locks: ObjectLocks::new(),
            metrics: Arc::default(),
        }
    }

    pub fn metrics(&self) -> &Arc<InvokeMetrics> {
        &self.metrics
    }

    pub fn authorizer(&self) -> &A {
        &self.authorizer
    }

    pub fn repository(&self) -> &R {
        &self.repository
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Authorizes and runs one command; the answer is on the audit record (where the command is
    /// audited) before it is returned.
    pub async fn execute(&self, caller: &Caller, request: Request) -> Result<Payload, InvokeError> {
        let call = Call::of(caller, &request);
        let audit = Command::is_audited(request.command.name());
        let mut target = Target::default();
        let t = &mut target;
        let result = match call.still_wanted() {
            Err(given_up) => {
                // On the record with what it would have acted on.
                t.name = call.command.target_name().cloned();
                t.namespace = call.command.requested_namespace().cloned();
                Err(given_up)
            }
            Ok(()) => self.run(&call, t).await,
        };
        match &result {
            Ok(_) => tracing::debug!(
                command = call.command.name(),
                request_id = call.request_id,
                "invoke ok"
            ),
            Err(e) => {
                tracing::debug!(command = call.command.name(), request_id = call.request_id, code = %e.code, "invoke failed")
            }
        }
        if !audit || target.recorded {
            return result;
        }
        let (decision, reason) = match &result {
            Ok(_) => (
                audit::Decision::Allow,
                target.note.take().unwrap_or_else(|| "ok".to_owned()),
            ),
            Err(e) => (decision_of(e), format!("{}: {}", e.code, e.message)),
        };
        self.record(&call, &target, decision, None, reason).await?;
        result
    }

    /// The command's own work.
    async fn run(&self, call: &Call<'_>, t: &mut Target) -> Result<Payload, InvokeError> {
        match call.command {
            Command::SecretGet(p) => self.secret_get(call, p, t).await,
            Command::SecretList(p) => self.secret_list(call, p, t).await,
            Command::SecretCreate(p) => self.secret_create(call, p, t).await,
            Command::SecretRotate(p) => self.secret_rotate(call, p, t).await,
            Command::SecretDelete(p) => self.delete(call, p, Resource::Secrets, t).await,
            Command::ConfigGet(p) => self.config_get(call, p, t).await,
            Command::ConfigList(p) => self.config_list(call, p, t).await,
            Command::ConfigCreate(p) => self.config_create(call, p, t).await,
            Command::ConfigUpdate(p) => self.config_update(call, p, t).await,
            Command::ConfigDelete(p) => self.delete(call, p, Resource::Configs, t).await,
        }
    }

    /// Records a call that was refused before it became a command (no valid token, params that
    /// do not parse), for the commands that are audited.
    pub async fn record_refusal(
        &self,
        caller: &Caller,
        command: &str,
        target_namespace: Option<&Namespace>,
        target_name: Option<&Name>,
        error: &InvokeError,
        request_id: &str,
    ) -> Result<(), InvokeError> {
        let event = AuditEvent {
            node: self.node_id.clone(),
            subject: caller.subject.clone(),
            workload: caller.workload.as_ref().map(|w| w.to_string()),
            command: super::params::truncate_for_message(command),
            namespace: target_namespace.map(|n| n.to_string()),
            name: target_name.map(|n| n.to_string()),
            version: None,
            decision: decision_of(error),
            phase: None,
            reason: format!("{}: {}", error.code, error.message),
            request_id: Some(request_id.to_owned()),
            idempotency_key: None,
            gateway_node: caller.gateway_node.clone(),
        };
        self.audit
            .append(event)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    /// Records `decision` about `call` durably: only then may it be answered.
    async fn record(
        &self,
        call: &Call<'_>,
        target: &Target,
        decision: audit::Decision,
        phase: Option<Phase>,
        reason: String,
    ) -> Result<(), InvokeError> {
        let event = self.event(call, target, decision, phase, reason);
        let started = std::time::Instant::now();
        let appended = self.audit.append(event).await;
        self.metrics.audit_appended(started.elapsed());
        appended.map(|_| ()).map_err(unavailable)
    }

    fn event(
        &self,
        call: &Call<'_>,
        target: &Target,
        decision: audit::Decision,
        phase: Option<Phase>,
        reason: String,
    ) -> AuditEvent {
        AuditEvent {
            node: self.node_id.clone(),
            subject: call.caller.subject.clone(),
            workload: call.caller.workload.as_ref().map(|w| w.to_string()),
            command: call.command.name().to_owned(),
            namespace: target.namespace.as_ref().map(|n| n.to_string()),
            name: target.name.as_ref().map(|n| n.to_string()),
            version: target.version.map(Version::get),
            decision,
            phase,
            reason,
            request_id: Some(call.request_id.to_owned()),
            idempotency_key: call.idempotency_key.map(|k| k.as_str().to_owned()),
            gateway_node: call.caller.gateway_node.clone(),
        }
    }

    /// Runs `commit` between its `intent` and its `commit`/`abort` records. If the intent
    /// cannot be recorded, `commit` never runs.
    async fn commit<T>(
        &self,
        call: &Call<'_>,
        target: &mut Target,
        commit: impl Future<Output = Result<T, InvokeError>>,
    ) -> Result<T, InvokeError> {
        self.commit_as(call, target, "authorized; committing", commit, |_| None)
            .await
    }

    /// [`CommandCore::commit`], with the intent's reason, and the version the outcome record
    /// names taken from the outcome when it is only known then (`version_of`).
    async fn commit_as<T>(
        &self,
        call: &Call<'_>,
        target: &mut Target,
        intent: &str,
        commit: impl Future<Output = Result<T, InvokeError>>,
        version_of: impl FnOnce(&T) -> Option<Version>,
    ) -> Result<T, InvokeError> {
        self.record(
            call,
            target,
            audit::Decision::Allow,
            Some(Phase::Intent),
            intent.to_owned(),
        )
        .await?;
        target.recorded = true;
        // The last point at which a call given up on can stop: after this, the commit runs to
        // its end (a future not polled does nothing, so dropping `commit` here is clean).
        let result = match call.still_wanted() {
            Ok(()) => commit.await,
            Err(given_up) => Err(given_up),
        };
        if let Ok(done) = &result
            && let Some(version) = version_of(done)
        {
            target.version = Some(version);
        }
        let (decision, phase, reason) = match &result {
            Ok(_) => (
                audit::Decision::Allow,
                Phase::Commit,
                "committed".to_owned(),
            ),
            Err(e) => (
                audit::Decision::Error,
                Phase::Abort,
                format!("{}: {}", e.code, e.message),
            ),
        };
        // Queued before the answer (so it precedes every later record), not waited for: the
        // intent is durable, and the store (or the API server) says whether the change
        // happened, so no promise rests on the outcome record's own sync. It shares the next
        // group commit, and is flushed at shutdown at the latest.
        self.audit
            .append_later(self.event(call, target, decision, Some(phase), reason));
        result
    }

    /// Asks the authorizer; a refusal becomes PERMISSION_DENIED naming the caller, what was
    /// refused and how the right is granted.
    async fn authorize(&self, caller: &Caller, access: Access<'_>) -> Result<(), InvokeError> {
        match self.authorizer.check(caller, access).await? {
            Decision::Allow => Ok(()),
            Decision::Deny(hint) => Err(self.refuse(caller, access, &hint)),
        }
    }

    fn refuse(&self, caller: &Caller, access: Access<'_>, hint: &str) -> InvokeError {
        self.authorizer.refused(caller, access);
        InvokeError::new(
            ErrorCode::PermissionDenied,
            format!("{} may not {access}: {hint}", caller.subject),
        )
    }

    /// The earlier write a keyed call repeats, if any, looked up among the writes the object
    /// remembers (as its source of truth has them) and in the node store's memory (writes to
    /// other objects, and to deleted ones).
    fn prior(
        &self,
        keyed: Option<&KeyedWrite<'_>>,
        object_writes: &[WriteRecord],
    ) -> Result<Option<WriteRecord>, InvokeError> {
        let Some(k) = keyed else {
            return Ok(None);
        };
        let remembered = object_writes
            .iter()
            .find(|w| w.idempotency_key == k.key.as_str())
            .cloned()
            .or_else(|| {
                self.repository
                    .store()
                    .remembered_write(k.key.as_str())
                    .map(|r| r.record)
            });
        k.prior(&self.keys.current(), remembered, now())
    }

    /// The start of every write: the object's key (named by the command, in the namespace it
    /// names or the caller's), on the record as the target; `verb` authorized on it; and the
    /// object's turn, held until the returned guard is dropped.
    async fn begin_write(
        &self,
        call: &Call<'_>,
        t: &mut Target,
        verb: Verb,
        resource: Resource,
        name: &Name,
        namespace: Option<&Namespace>,
    ) -> Result<(ObjectKey, MutexGuard<'_, ()>), InvokeError> {
        let key = ObjectKey::new(
            Self::namespace(call.caller, namespace.cloned()),
            name.clone(),
        );
        *t = Target::object(&key);
        self.authorize(call.caller, on(verb, resource, &key))
            .await?;
        let kind = match resource {
            Resource::Secrets => Kind::Secret,
            Resource::Configs => Kind::Config,
        };
        let turn = self.locks.lock(kind, &key).await;
        Ok((key, turn))
    }

    /// The namespace a command acts in: the one it names, else the caller's, else `default`.
    fn namespace(caller: &Caller, requested: Option<Namespace>) -> Namespace {
        requested
            .or_else(|| caller.namespace.clone())
            .unwrap_or_else(Namespace::default_namespace)
    }
}

fn decision_of(e: &InvokeError) -> audit::Decision {
    match e.code {
        ErrorCode::PermissionDenied | ErrorCode::Unauthenticated => audit::Decision::Deny,
        _ => audit::Decision::Error,
    }
}

/// The audit log failed: the caller is told so, without the server's paths (the log says
/// which file).
fn unavailable(e: audit::AuditError) -> InvokeError {
    let message = match &e {
        audit::AuditError::Write { reason, .. } => format!(
            "the audit log could not be written ({reason}); secret access is refused until it can be"
        ),
        audit::AuditError::Open { reason, .. } => {
            format!("the audit log could not be opened ({reason})")
        }
        audit::AuditError::Stopped => e.to_string(),
        // Start-up errors; not expected here, and their messages name files.
        audit::AuditError::Integrity(_) | audit::AuditError::Anchor(_) => {
            "the audit log failed its integrity check".to_owned()
        }
    };
    InvokeError::new(ErrorCode::Unavailable, message)
}

fn not_found(resource: Resource, key: &ObjectKey) -> InvokeError {
    let what = match resource {
        Resource::Secrets => "secret",
        Resource::Configs => "config",
    };
    InvokeError::new(
        ErrorCode::NotFound,
        format!(
            "{what} {:?} does not exist in namespace {:?}",
            key.name.as_str(),
            key.namespace.as_str()
        ),
    )
}

/// An entry the node refused at start-up (failed its integrity check): never served.
fn refused_entry(resource: Resource, key: &ObjectKey, why: &str) -> InvokeError {
    let what = match resource {
        Resource::Secrets => "secret",
        Resource::Configs => "config",
    };
    InvokeError::internal(format!(
        "{what} {:?} in namespace {:?} is not served: its stored entry failed the integrity check at start-up ({why}); an admin can delete it and create it again, or restore the data directory",
        key.name.as_str(),
        key.namespace.as_str()
    ))
}

/// Now, to the millisecond (what the store and the answers carry).
fn now() -> jiff::Timestamp {
    let now = jiff::Timestamp::now();
    now.round(jiff::Unit::Millisecond).unwrap_or(now)
}

/// The answer to a retried write: the original one.
fn replay(t: &mut Target, prior: WriteRecord) -> Payload {
    t.note = Some(format!(
        "retry of request {} (same idempotencyKey): answered with its result, nothing changed",
        prior.request_id
    ));
    Payload::Recorded(prior.result)
}

/// A lost race: tried again, up to [`WRITE_ATTEMPTS`].
fn lost_race(e: &InvokeError) -> bool {
    e.code == ErrorCode::Conflict
}

/// One async lock per object (striped): a node's writes to one object take turns, so each
/// reads the state the previous one left. Writers on other nodes are caught by the
/// repository's preconditions instead.
struct ObjectLocks(Vec<Mutex<()>>);

impl ObjectLocks {
    const STRIPES: usize = 64;

    fn new() -> Self {
        ObjectLocks((0..Self::STRIPES).map(|_| Mutex::new(())).collect())
    }

    async fn lock(&self, kind: Kind, key: &ObjectKey) -> MutexGuard<'_, ()> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (kind, key).hash(&mut h);
        self.0[(h.finish() as usize) % Self::STRIPES].lock().await
    }
}

/// Access to one named object.
fn on<'a>(verb: Verb, resource: Resource, key: &'a ObjectKey) -> Access<'a> {
    Access {
        verb,
        resource,
        namespace: &key.namespace,
        name: Some(&key.name),
    }
}

/// Access to every object of a namespace.
fn across(verb: Verb, resource: Resource, namespace: &Namespace) -> Access<'_> {
    Access {
        verb,
        resource,
        namespace,
        name: None,
    }
}
