//! The Events of node.invoke calls (made by the agent, or by the operator carrying a node's
//! write): writes made through node.invoke (Normal: Created, Rotated, Updated,
//! Deleted) and refusals (Warning: AccessDenied), on the ClawSecret or ClawConfig (its uid
//! included, which `kubectl describe` matches on), with the caller as the related object, so
//! `kubectl describe` shows who did what from which node. Published in the background: the
//! audit log, written first, is the record of truth.
//!
//! A refusal becomes an Event only about an object this node holds, and only for a caller of
//! that object's namespace (or a human user): anyone with a token could otherwise make the
//! agent write Events about made-up names, or into namespaces that are none of their business.
//! Those refusals are in the node's audit log and metrics all the same.

use std::sync::Arc;

use k8s_openapi::api::core::v1::ObjectReference;
use kube::Resource as _;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};

use crate::domain::{Kind, Name, Namespace, ObjectKey};
use crate::invoke::{Access, Caller, Resource, Verb};
use crate::k8s::component::Component;
use crate::k8s::crd::{ClawConfig, ClawSecret};
use crate::k8s::names::object_name;
use crate::store::Store;

#[derive(Clone)]
pub struct InvokeEvents {
    client: kube::Client,
    /// Folds repeated denials (same object, caller and command) into a series, so a caller
    /// hammering a secret cannot flood the API server.
    recorder: Recorder,
    /// `claw-secrets-agent`, instance = the node name.
    reporter: Reporter,
    /// The node's copies: the uid of the object a refusal is about, and whether it exists.
    store: Arc<Store>,
}

/// The ClawSecret or ClawConfig an Event is about.
fn regarding(kind: Kind, ns: &Namespace, name: &Name, uid: Option<String>) -> ObjectReference {
    let api_version = match kind {
        Kind::Secret => ClawSecret::api_version(&()).into_owned(),
        Kind::Config => ClawConfig::api_version(&()).into_owned(),
    };
    ObjectReference {
        api_version: Some(api_version),
        kind: Some(kind.as_str().to_owned()),
        namespace: Some(ns.to_string()),
        name: Some(object_name(name)),
        uid,
        ..ObjectReference::default()
    }
}

/// The caller, as an Event's related object: its ServiceAccount for a workload, else the user.
fn caller_reference(caller: &Caller) -> ObjectReference {
    match (&caller.namespace, &caller.workload) {
        (Some(ns), Some(workload)) => ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("ServiceAccount".to_owned()),
            namespace: Some(ns.to_string()),
            name: Some(workload.to_string()),
            ..ObjectReference::default()
        },
        _ => ObjectReference {
            api_version: Some("rbac.authorization.k8s.io/v1".to_owned()),
            kind: Some("User".to_owned()),
            name: Some(caller.subject.clone()),
            ..ObjectReference::default()
        },
    }
}

/// The command a refused access stood for (the Event's action).
fn command_of(access: &Access<'_>) -> &'static str {
    match (access.resource, access.verb) {
        (Resource::Secrets, Verb::Reveal | Verb::Get) => "secret.get",
        (Resource::Secrets, Verb::List) => "secret.list",
        (Resource::Secrets, Verb::Create) => "secret.create",
        (Resource::Secrets, Verb::Update) => "secret.rotate",
        (Resource::Secrets, Verb::Delete) => "secret.delete",
        (Resource::Configs, Verb::Get | Verb::Reveal) => "config.get",
        (Resource::Configs, Verb::List) => "config.list",
        (Resource::Configs, Verb::Create) => "config.create",
        (Resource::Configs, Verb::Update) => "config.update",
        (Resource::Configs, Verb::Delete) => "config.delete",
    }
}

impl InvokeEvents {
    /// Events reported by `component` (the agent, or the operator carrying nodes' writes), as
    /// `instance` (the node, or the operator's replica).
    pub fn new(
        client: kube::Client,
        component: Component,
        instance: &str,
        store: Arc<Store>,
    ) -> Self {
        let reporter = Reporter {
            controller: component.controller(),
            instance: Some(instance.to_owned()),
        };
        InvokeEvents {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            store,
        }
    }

    /// A write made through node.invoke to the object with `uid` (`reason`: Created, Rotated,
    /// Updated or Deleted; `action`: the command). Each is its own Event (see
    /// [`crate::k8s::events::emit`]).
    #[allow(clippy::too_many_arguments)] // one Event's fields, each named at the call
    pub fn write(
        &self,
        kind: Kind,
        key: &ObjectKey,
        uid: Option<String>,
        reason: &str,
        action: &str,
        note: String,
        caller: &Caller,
    ) {
        // The node the call came through: the caller's, when another server carries it.
        let node = caller
            .via_node
            .as_deref()
            .or(self.reporter.instance.as_deref())
            .unwrap_or_default();
        let event = Event {
            type_: EventType::Normal,
            reason: reason.to_owned(),
            note: Some(format!(
                "{note}, by {} through node.invoke on node {node}",
                caller.subject
            )),
            action: action.to_owned(),
            secondary: Some(caller_reference(caller)),
        };
        let reference = regarding(kind, &key.namespace, &key.name, uid);
        let (client, reporter) = (self.client.clone(), self.reporter.clone());
        tokio::spawn(async move {
            if let Err(e) = crate::k8s::events::emit(&client, &reporter, &reference, &event).await {
                tracing::debug!(error = %e, reason = %event.reason, "node.invoke write Event not published");
            }
        });
    }

    /// A refusal of an access to a named object: an Event on it if this node holds it and the
    /// caller is of its namespace (or a human user); nothing otherwise (see the module docs).
    pub fn access_denied(&self, caller: &Caller, access: &Access<'_>) {
        let Some(name) = access.name else {
            return;
        };
        if caller
            .namespace
            .as_ref()
            .is_some_and(|ns| ns != access.namespace)
        {
            return;
        }
        let kind = match access.resource {
            Resource::Secrets => Kind::Secret,
            Resource::Configs => Kind::Config,
        };
        let key = ObjectKey {
            namespace: access.namespace.clone(),
            name: name.clone(),
        };
        let origin = match kind {
            Kind::Secret => self.store.secret(&key).and_then(|r| r.origin.clone()),
            Kind::Config => self.store.config(&key).and_then(|r| r.origin.clone()),
        };
        let Some(origin) = origin else {
            return;
        };
        let action = command_of(access);
        // The recorder folds Events with the same regarding object, action and related object
        // into one series and keeps the first note, so the command and the caller go into those
        // fields: otherwise every later denial on the object, by anyone, would only raise the
        // count of the first one and be shown under its subject.
        let event = Event {
            type_: EventType::Warning,
            reason: "AccessDenied".to_owned(),
            note: Some(format!("{} was denied {action}", caller.subject)),
            action: action.to_owned(),
            secondary: Some(caller_reference(caller)),
        };
        let reference = regarding(kind, access.namespace, name, Some(origin.uid.to_string()));
        let recorder = self.recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = recorder.publish(&event, &reference).await {
                tracing::debug!(error = %e, "AccessDenied event not published");
            }
        });
    }
}
