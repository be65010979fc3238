//! The operator. Every replica serves the admission webhook, which seals ClawSecret data
//! before it is stored; one leader-elected replica runs the controllers: it keeps the status of
//! ClawSecrets (sealing what was stored with plaintext anyway), accepts (or refuses) ClawConfig
//! data, and emits their audit Events. See docs/operator.md.
//!
//! - `admission/`: the webhook (every replica).
//! - `leader.rs`: the Lease; the controllers run only while this replica holds it.
//! - `secrets.rs`, `configs.rs`: the two reconcilers.
//! - `agent_certs.rs`: the signer of the agents' serving certificates (leader only), with its
//!   CA; `ca.rs`: the CAs the operator keeps (the webhook's and the agents').
//! - `conditions.rs`: status conditions; `metrics.rs` and `http.rs`: `/metrics`, `/healthz`,
//!   `/readyz`; `error.rs`: the error type.

mod admission;
mod agent_certs;
mod ca;
mod conditions;
mod configs;
mod deliveries;
mod error;
mod http;
mod key_rotation;
mod leader;
mod listed;
mod metrics;
mod reencrypt;
mod resync;
mod secret_cache;
mod secrets;
mod writes;

pub use admission::{CertSource, WebhookConfig};
pub use error::Error;
pub use leader::LeaseConfig;

use futures::StreamExt;
use kube::api::Api;
use kube::core::DeserializeGuard;
use kube::runtime::controller::{self, Action, Controller};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

use crate::crypto::{Keyring, SharedKeyring};
use crate::k8s::component::Component;
use crate::k8s::crd::{ClawConfig, ClawSecret};
use crate::k8s::events;
use http::Health;
use leader::LeaderElector;
use metrics::{Metrics, ObjectKind, Outcome};

/// The finalizer earlier versions put on both kinds, so that a deletion was seen (and got its
/// Deleted Event) before the object was gone. It also blocked the deletion of the objects, and
/// of their namespaces, whenever no operator ran; so it is no longer added, and the operator
/// removes it wherever it finds it. Deletions are reported from the watch instead.
pub const LEGACY_FINALIZER: &str = "clawbernetes.io/cleanup";

/// How often every object is looked at again without any change (a safety net against missed
/// watch events; it writes nothing when nothing changed): one paced sweep ([`resync`]).
const RESYNC: Duration = Duration::from_secs(3600);

/// Reconciliations in flight at once, per kind.
const CONCURRENCY: u16 = 32;

/// How long a stopping leader lets the reconciles in flight finish before it drops them (they
/// are idempotent; the next leader redoes whatever was cut short). kube-runtime's graceful
/// shutdown alone can wait forever: a controller whose cache never got its first list (no right
/// to list, an API server failing lists) holds its queue until that list arrives, and the
/// trigger that would bring it is what the shutdown stopped. Well inside the pod's 30 s
/// termination grace, with room for releasing the Lease (at most 5 s) after it.
const DRAIN: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// Where the master key Secret lives (and the Lease, see `lease`).
    pub namespace: String,
    pub master_key_secret: String,
    pub lease: LeaseConfig,
    pub metrics_addr: SocketAddr,
    /// Reconcile only this namespace's objects; `None`: every namespace.
    pub watch_namespace: Option<String>,
    /// The admission webhook that seals data before it is stored; `None`: not served (the
    /// reconcile loop seals what was stored with plaintext). Its HTTPS server also answers
    /// nodes' deliveries.
    pub webhook: Option<WebhookConfig>,
    /// The agents' ServiceAccount as a username (`system:serviceaccount:NAMESPACE:NAME`): only
    /// its node-bound tokens get deliveries, and certificates from the agents' signer.
    pub agent_user: String,
    /// Whether the leader approves and signs the agents' serving certificates (signer
    /// `clawbernetes.io/agent-serving`). CertificateSigningRequests are cluster-wide: one
    /// operator per cluster does it.
    pub agent_signer: bool,
    /// How long an agent's serving certificate is valid.
    pub agent_certificate_lifetime: Duration,
    /// Where this replica keeps the audit log (and store) of the node.invoke writes it carries
    /// for nodes' agents; `None`: it carries none (`POST /v1/writes` answers 503).
    pub data_dir: Option<std::path::PathBuf>,
    /// ClawSecrets re-encrypted per second at most after the active master key changes.
    pub reencrypt_per_second: u32,
    /// How long a master key stays active before the leader makes a new one active; `None`:
    /// only by hand (`claw-secrets keys rotate`).
    pub key_rotation_period: Option<Duration>,
    /// The KMS v2 plugin that wraps the keyring in its Secret (`--kms-plugin`); `None`: the
    /// Secret holds it in plaintext.
    pub kms: Option<crate::kms::KmsPlugin>,
}

/// What both reconcilers share.
pub(crate) struct Context {
    client: kube::Client,
    /// Followed while the operator runs (a new active key, a key added or retired).
    keyring: SharedKeyring,
    /// `namespace/name` of the master key Secret, for messages.
    keyring_secret: String,
    /// Where the operator keeps what it publishes (the keyring's status).
    operator_namespace: String,
    reporter: Reporter,
    metrics: Arc<Metrics>,
    /// Consecutive failures per object, for the error back-off; cleared on success.
    failures: Mutex<HashMap<(ObjectKind, String, String), u32>>,
}

impl Context {
    /// Publishes an Event; a failure is logged and otherwise ignored (the status and the
    /// object are the record of truth, and a terminating namespace refuses new Events).
    async fn event<K: Resource<DynamicType = ()>>(
        &self,
        obj: &K,
        type_: EventType,
        reason: &str,
        action: &str,
        note: String,
    ) {
        let regarding = obj.object_ref(&());
        let event = events::event(type_, reason, action, note);
        if let Err(e) = events::emit(&self.client, &self.reporter, &regarding, &event).await {
            tracing::warn!(
                kind = %K::kind(&()),
                namespace = regarding.namespace.as_deref().unwrap_or_default(),
                name = regarding.name.as_deref().unwrap_or_default(),
                reason, error = %e, "could not publish an Event"
            );
        }
    }

    /// A Normal Event on the keyring Secret (a rotation, a re-encryption done), built from its
    /// name alone: the Secret itself is not read for it.
    async fn keyring_event(&self, reason: &str, action: &str, note: String) {
        let (namespace, name) = self
            .keyring_secret
            .split_once('/')
            .unwrap_or(("", self.keyring_secret.as_str()));
        let regarding = k8s_openapi::api::core::v1::ObjectReference {
            api_version: Some("v1".to_owned()),
            kind: Some("Secret".to_owned()),
            namespace: Some(namespace.to_owned()),
            name: Some(name.to_owned()),
            ..Default::default()
        };
        let event = events::event(EventType::Normal, reason, action, note);
        if let Err(e) = events::emit(&self.client, &self.reporter, &regarding, &event).await {
            tracing::warn!(reason, error = %e, "could not publish an Event on the keyring Secret");
        }
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<(ObjectKind, String, String), u32>> {
        self.failures.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Which controller an object type belongs to.
trait Kinded {
    const KIND: ObjectKind;
}

impl Kinded for ClawSecret {
    const KIND: ObjectKind = ObjectKind::Secret;
}

impl Kinded for ClawConfig {
    const KIND: ObjectKind = ObjectKind::Config;
}

impl<K: Kinded> Kinded for DeserializeGuard<K> {
    const KIND: ObjectKind = K::KIND;
}

/// Reconciles an object as the API server gave it; one this version of the operator cannot
/// read (it does not match the types: another version's schema, an edit the schema let
/// through) is reported with a Warning Event and left alone until it changes, and the watch
/// and every other object go on.
async fn guarded<K, F, Fut>(
    obj: Arc<DeserializeGuard<K>>,
    ctx: Arc<Context>,
    reconcile: F,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Kinded + Clone,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action, Error>>,
{
    let invalid = match &obj.0 {
        Ok(k) => return reconcile(Arc::new(k.clone()), ctx).await,
        Err(invalid) => invalid,
    };
    // serde's message may quote the offending value, which may be plaintext: reduced to types.
    let why = crate::invoke::withhold_quoted(&invalid.error);
    let (_, namespace, name) = failure_key(obj.as_ref());
    tracing::warn!(kind = K::KIND.label(), %namespace, %name, error = %why,
        "object cannot be read by this operator; skipped until it changes");
    ctx.event(
        obj.as_ref(),
        EventType::Warning,
        "Unreadable",
        "Reconcile",
        format!(
            "this operator cannot read the object ({why}); correct it, or run an operator that matches the CRD"
        ),
    )
    .await;
    Ok(Action::await_change())
}

fn failure_key<K: Resource + Kinded>(obj: &K) -> (ObjectKind, String, String) {
    (
        K::KIND,
        obj.meta().namespace.clone().unwrap_or_default(),
        obj.meta().name.clone().unwrap_or_default(),
    )
}

/// Runs `apply` on a live object, counting the outcome. An object that still carries the
/// legacy finalizer only has it removed (with its Deleted Event if it is being deleted: the
/// watch will not report that deletion, the object being already gone from it when it ends);
/// an object being deleted is left to the API server.
async fn reconciled<K, A, AFut, D, DFut>(
    api: &Api<K>,
    obj: Arc<K>,
    ctx: &Context,
    apply: A,
    deleted: D,
) -> Result<Action, Error>
where
    K: Resource<DynamicType = ()> + Kinded + Clone + DeserializeOwned + Serialize + Debug,
    A: FnOnce(Arc<K>) -> AFut,
    AFut: Future<Output = Result<Action, Error>>,
    D: FnOnce(Arc<K>) -> DFut,
    DFut: Future<Output = ()>,
{
    let key = failure_key(obj.as_ref());
    let deleting = obj.meta().deletion_timestamp.is_some();
    if has_legacy_finalizer(obj.as_ref()) {
        return counted::<K>(ctx, key, async {
            remove_legacy_finalizer(api, obj.as_ref()).await?;
            if deleting {
                deleted(obj).await;
            }
            Ok(Action::await_change())
        })
        .await;
    }
    if deleting {
        return Ok(Action::await_change());
    }
    counted::<K>(ctx, key, apply(obj)).await
}

/// Whether the object carries the finalizer of earlier versions.
fn has_legacy_finalizer<K: Resource>(obj: &K) -> bool {
    obj.meta()
        .finalizers
        .as_ref()
        .is_some_and(|f| f.iter().any(|f| f == LEGACY_FINALIZER))
}

/// Removes the legacy finalizer, keeping any other, guarded by the resourceVersion (the list is
/// replaced whole by a merge patch).
async fn remove_legacy_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), Error>
where
    K: Resource<DynamicType = ()> + Kinded + Clone + DeserializeOwned + Debug,
{
    let kept: Vec<&String> = obj
        .meta()
        .finalizers
        .iter()
        .flatten()
        .filter(|f| *f != LEGACY_FINALIZER)
        .collect();
    let patch = serde_json::json!({
        "metadata": { "resourceVersion": obj.meta().resource_version, "finalizers": kept },
    });
    let name = obj.meta().name.clone().unwrap_or_default();
    match api
        .patch(
            &name,
            &Component::Operator.patch(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(()),
        Err(e) if error::is_conflict(&e) => Err(Error::Conflict {
            kind: K::KIND.label(),
            namespace: obj.meta().namespace.clone().unwrap_or_default(),
            name,
        }),
        Err(e) => Err(Error::Kube(e)),
    }
}

/// Runs one reconciliation of the object `key`, counting its outcome.
async fn counted<K: Kinded>(
    ctx: &Context,
    key: (ObjectKind, String, String),
    run: impl Future<Output = Result<Action, Error>>,
) -> Result<Action, Error> {
    let started = Instant::now();
    let result = run.await;
    let outcome = match &result {
        Ok(_) => {
            ctx.failures().remove(&key);
            Outcome::Success
        }
        Err(e) if e.is_conflict() => Outcome::Conflict,
        Err(e) => {
            ctx.metrics.error(K::KIND, e);
            Outcome::Error
        }
    };
    ctx.metrics.reconciled(K::KIND, outcome, started.elapsed());
    result
}

/// Retry after a failure: soon after a conflict (the fresh object is already on its way),
/// otherwise 5 s doubling per consecutive failure of the same object, up to 5 minutes.
fn error_policy<K: Resource + Kinded>(obj: Arc<K>, error: &Error, ctx: Arc<Context>) -> Action {
    let key = failure_key(obj.as_ref());
    if error.is_conflict() {
        tracing::debug!(kind = K::KIND.label(), namespace = %key.1, name = %key.2, "conflict; retrying");
        return Action::requeue(Duration::from_millis(500));
    }
    let failures = {
        let mut map = ctx.failures();
        let n = map.entry(key.clone()).or_default();
        *n = n.saturating_add(1);
        *n
    };
    let delay = backoff(failures);
    tracing::warn!(kind = K::KIND.label(), namespace = %key.1, name = %key.2,
        error = %error, retry_in_s = delay.as_secs(), "reconcile failed");
    Action::requeue(delay)
}

fn backoff(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(6);
    (Duration::from_secs(5) * 2u32.pow(exp)).min(Duration::from_secs(300))
}

/// A future that completes once `stop` turns true.
async fn stopped(mut stop: watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

/// Runs the operator until `shutdown` completes (then releases the Lease and returns `Ok`),
/// or until something fatal happens (`Err`: exit non-zero). Losing leadership is not fatal:
/// the replica stands by again.
pub async fn run(
    client: kube::Client,
    config: OperatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(metrics.clone()));
    let serve_error = |source| Error::Serve {
        addr: config.metrics_addr,
        source,
    };
    let listener = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .map_err(serve_error)?;
    let addr = listener.local_addr().map_err(serve_error)?;
    tracing::info!(metrics_addr = %addr, "serving /metrics, /healthz and /readyz");
    let server = tokio::spawn(http::serve(
        listener,
        health.clone(),
        stopped(stop_rx.clone()),
    ));

    // Every replica needs the keyring, leader or not: each serves the webhook.
    let keyring = tokio::select! {
        r = load_keyring(&client, &config) => SharedKeyring::new(r?),
        () = stopped(stop_rx.clone()) => return Ok(()),
    };
    publish_sealing_key(&client, &config.namespace, &keyring.current()).await;
    // Every replica follows the keyring Secret: a new active key seals from then on, without a
    // restart; each change is published and makes the leader look at every ClawSecret again
    // (one sealed under a key it lacked may now be Ready).
    let (keyring_changed, keyring_changes) = watch::channel(0u64);
    let _follow_keyring = AbortOnDrop(tokio::spawn(crate::k8s::keyring::follow(
        client.clone(),
        config.namespace.clone(),
        config.master_key_secret.clone(),
        config.kms.clone(),
        keyring.clone(),
        {
            let (client, namespace) = (client.clone(), config.namespace.clone());
            move |ring: Arc<Keyring>| {
                let (client, namespace) = (client.clone(), namespace.clone());
                let keyring_changed = keyring_changed.clone();
                async move {
                    publish_sealing_key(&client, &namespace, &ring).await;
                    keyring_changed.send_modify(|n| *n += 1);
                }
            }
        },
    )));
    // With the delivery endpoint, its ClawSecret cache is the controller's too.
    let mut shared_secrets = None;
    let webhook = match &config.webhook {
        Some(webhook) => {
            let bound = admission::Webhook::bind(&client, &config.namespace, webhook.clone())
                .await
                .map_err(|reason| Error::Webhook { reason })?;
            tracing::info!(addr = %webhook.addr, path = admission::PATH,
                "serving the admission webhook");
            let agent_user = config.agent_user.clone();
            let (deliveries, watching) = deliveries::Deliveries::new(
                client.clone(),
                keyring.clone(),
                metrics.clone(),
                agent_user,
            );
            shared_secrets = Some(deliveries.shared_secrets());
            let writes = match &config.data_dir {
                Some(dir) => {
                    let kube_config = Component::Operator
                        .config()
                        .await
                        .map_err(|reason| Error::Webhook { reason })?;
                    let writes = writes::Writes::open(
                        client.clone(),
                        &kube_config,
                        keyring.clone(),
                        deliveries.clone(),
                        dir,
                        &config.lease.identity,
                    )
                    .await
                    .map_err(|reason| Error::Webhook { reason })?;
                    tracing::info!(data_dir = %dir.display(), "carrying nodes' node.invoke writes");
                    Some(Arc::new(writes))
                }
                None => None,
            };
            let stop = stopped(stop_rx.clone());
            let serving = bound.serve(
                client.clone(),
                config.namespace.clone(),
                keyring.clone(),
                metrics.clone(),
                admission::NodeEndpoints { deliveries, writes },
                stop,
            );
            // The caches' watches retry forever; they end with the server.
            Some(tokio::spawn(async move {
                tokio::select! {
                    () = serving => {}
                    () = watching => {}
                }
            }))
        }
        None => None,
    };
    let webhook_ended = async move {
        match webhook {
            Some(task) => {
                let _ = task.await;
            }
            None => futures::future::pending().await,
        }
    };

    let replica = Replica {
        keyring,
        keyring_changes,
        secrets: shared_secrets,
        metrics,
        health,
    };
    let mut operate = std::pin::pin!(elect_and_lead(client, &config, replica, stop_rx.clone()));
    // The metrics and health server runs for the operator's whole life (it stops at shutdown):
    // if it stops before, so does the operator (its probes would fail anyway).
    tokio::select! {
        result = &mut operate => result,
        _ = server => {
            if *stop_rx.borrow() {
                operate.await
            } else {
                Err(Error::TaskEnded { task: "metrics and health server" })
            }
        }
        () = webhook_ended => {
            if *stop_rx.borrow() {
                operate.await
            } else {
                Err(Error::TaskEnded { task: "admission webhook" })
            }
        }
    }
}

/// What a replica keeps for whenever it leads.
struct Replica {
    keyring: SharedKeyring,
    /// One item per change of the keyring.
    keyring_changes: watch::Receiver<u64>,
    /// The delivery endpoint's ClawSecret cache, when it is served.
    secrets: Option<secret_cache::SharedSecrets>,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
}

/// Stands by for the Lease, then leads until shutdown; a leader that loses the Lease stops
/// acting at once (its controllers are dropped, mid-reconcile included) and stands by again,
/// rather than exit: an API server that blips now and then must not put the operator into
/// CrashLoopBackOff.
async fn elect_and_lead(
    client: kube::Client,
    config: &OperatorConfig,
    replica: Replica,
    stop_rx: watch::Receiver<bool>,
) -> Result<(), Error> {
    let Replica {
        metrics, health, ..
    } = &replica;
    let mut elector = LeaderElector::new(client.clone(), config.lease.clone());
    loop {
        let leading = tokio::select! {
            () = elector.acquire(|| health.set_ready(true)) => true,
            () = stopped(stop_rx.clone()) => false,
        };
        if !leading {
            return Ok(());
        }
        health.set_ready(false);
        metrics.set_leader(true);
        let result = tokio::select! {
            r = lead(client.clone(), config, &replica, stop_rx.clone()) => r,
            lost = elector.hold() => Err(lost),
        };
        metrics.set_leader(false);
        health.set_ready(false);
        match result {
            Err(lost @ Error::LeaseLost { .. }) => {
                metrics.lost_leadership();
                tracing::warn!(error = %lost, "stopped acting as the leader; standing by");
            }
            other => {
                elector.release().await;
                return other;
            }
        }
    }
}

/// The leader's work: both controllers until shutdown.
async fn lead(
    client: kube::Client,
    config: &OperatorConfig,
    replica: &Replica,
    stop: watch::Receiver<bool>,
) -> Result<(), Error> {
    let (keyring, keyring_changes) = (replica.keyring.clone(), replica.keyring_changes.clone());
    let (metrics, health) = (replica.metrics.clone(), &replica.health);
    let ctx = Arc::new(Context {
        client: client.clone(),
        keyring,
        keyring_secret: format!("{}/{}", config.namespace, config.master_key_secret),
        operator_namespace: config.namespace.clone(),
        reporter: events::reporter(&Component::Operator.controller(), &config.lease.identity),
        metrics,
        failures: Mutex::default(),
    });

    let (deleted_secrets, secret_deletions) = mpsc::unbounded_channel();
    let (deleted_configs, config_deletions) = mpsc::unbounded_channel();
    let deletions = {
        let (a, b) = (ctx.clone(), ctx.clone());
        futures::future::join(
            report_deletions(secret_deletions, move |obj: ClawSecret| {
                let ctx = a.clone();
                async move { secrets::deleted(&obj, &ctx).await }
            }),
            report_deletions(config_deletions, move |obj: ClawConfig| {
                let ctx = b.clone();
                async move { configs::deleted(&obj, &ctx).await }
            }),
        )
    };
    // Stops with the leadership: a replica that no longer leads reports nothing.
    let _deletions = AbortOnDrop(tokio::spawn(async move {
        deletions.await;
    }));
    // Scheduled rotation of the master key, and re-encryption under a new active key: the
    // leader's, stopped with the leadership.
    let _rotation = config.key_rotation_period.map(|period| {
        AbortOnDrop(tokio::spawn(key_rotation::run(
            ctx.clone(),
            config.namespace.clone(),
            config.master_key_secret.clone(),
            config.kms.clone(),
            period,
            stop.clone(),
        )))
    });
    // The agents' serving certificates: the leader's, stopped with the leadership.
    let _agent_signer = config.agent_signer.then(|| {
        AbortOnDrop(tokio::spawn(agent_certs::run(
            ctx.clone(),
            agent_certs::Settings {
                namespace: config.namespace.clone(),
                agent_user: config.agent_user.clone(),
                lifetime: config.agent_certificate_lifetime,
                scope: config.watch_namespace.clone(),
            },
            stop.clone(),
        )))
    });
    let _reencryption = AbortOnDrop(tokio::spawn(reencrypt::run(
        ctx.clone(),
        scoped_api::<ClawSecret>(&client, config),
        keyring_changes.clone(),
        config.reencrypt_per_second,
        stop.clone(),
    )));
    // One cache of ClawSecrets per process: the deliveries' when they are served (it holds
    // every namespace's: objects outside --watch-namespace are left alone), else its own.
    let scope = config.watch_namespace.clone();
    let (secrets_ctx, secrets_stop, secrets_client) = (ctx.clone(), stop.clone(), client.clone());
    let secrets = async move {
        let controller = match &replica.secrets {
            // Made once the shared cache holds the first list (see `SharedSecrets::controller`).
            Some(shared) => tokio::select! {
                controller = shared.controller(scope.clone(), deleted_secrets) => controller,
                () = stopped(secrets_stop.clone()) => return,
            },
            None => lean_controller(
                scoped_api::<secret_cache::Cached>(&secrets_client, config),
                deleted_secrets,
                secret_cache::lean,
            ),
        };
        let resync = resync::sweep(controller.store(), RESYNC);
        controller
            .with_config(controller::Config::default().concurrency(CONCURRENCY))
            .reconcile_all_on(changes_of(keyring_changes))
            .reconcile_on(resync)
            .graceful_shutdown_on(stopped(secrets_stop))
            .run(
                move |obj, ctx| {
                    let in_scope = secret_cache::in_scope(scope.as_deref(), &obj);
                    async move {
                        if !in_scope {
                            return Ok(Action::await_change());
                        }
                        guarded(obj, ctx, secrets::reconcile).await
                    }
                },
                error_policy,
                secrets_ctx,
            )
            .for_each(|r| async move { log_result("ClawSecret", r) })
            .await
    };
    let configs = lean_controller(
        scoped_api::<DeserializeGuard<ClawConfig>>(&client, config),
        deleted_configs,
        |obj| obj.managed_fields_mut().clear(),
    );
    let configs_resync = resync::sweep(configs.store(), RESYNC);
    let configs = configs
        .with_config(controller::Config::default().concurrency(CONCURRENCY))
        .reconcile_on(configs_resync)
        .graceful_shutdown_on(stopped(stop.clone()))
        .run(
            |obj, ctx| guarded(obj, ctx, configs::reconcile),
            error_policy,
            ctx,
        )
        .for_each(|r| async move { log_result("ClawConfig", r) });

    health.set_ready(true);
    tracing::info!(
        namespaces = config.watch_namespace.as_deref().unwrap_or("all"),
        "controllers running"
    );
    // Both controllers run until shutdown; one that stops before it has stopped the operator.
    let secrets: futures::future::BoxFuture<'_, ()> = Box::pin(secrets);
    let configs: futures::future::BoxFuture<'_, ()> = Box::pin(configs);
    let controllers = async {
        let (first, other) = match futures::future::select(secrets, configs).await {
            futures::future::Either::Left(((), other)) => ("ClawSecret controller", other),
            futures::future::Either::Right(((), other)) => ("ClawConfig controller", other),
        };
        if !*stop.borrow() {
            return Err(Error::TaskEnded { task: first });
        }
        other.await;
        tracing::info!("controllers stopped");
        Ok(())
    };
    let drained = async {
        stopped(stop.clone()).await;
        tokio::time::sleep(DRAIN).await;
    };
    tokio::select! {
        result = controllers => result,
        () = drained => {
            // Dropping the controllers aborts their reconciles (spawned tasks, cancelled on drop).
            tracing::warn!(drain_seconds = DRAIN.as_secs(),
                "controllers did not stop in time; abandoning what is in flight");
            Ok(())
        }
    }
}

/// A task aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A controller over every object of `api`, whose cache keeps objects as `trim` leaves them:
/// without what the reconcilers never read (`metadata.managedFields` at least: at 10,000
/// ClawSecrets they were most of the operator's memory, BENCHMARKS.md).
///
/// Every object the watch sees deleted is sent to `deleted` (the Deleted Event: there is no
/// finalizer to hold the object back for a reconcile).
fn lean_controller<K>(
    api: Api<K>,
    deleted: mpsc::UnboundedSender<K>,
    trim: fn(&mut K),
) -> Controller<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug + Send + Sync + 'static,
{
    let (reader, writer) = reflector::store();
    let trigger = reflector(
        writer,
        watcher(api, watcher::Config::default().any_semantic())
            .modify(trim)
            .inspect(move |event| {
                if let Ok(watcher::Event::Delete(obj)) = event {
                    let _ = deleted.send(obj.clone());
                }
            }),
    )
    .applied_objects();
    Controller::for_stream(trigger, reader)
}

/// Publishes the Deleted Event of every object `deleted` receives, one after another, until
/// the controllers stop (the sender goes with them).
async fn report_deletions<K, F, Fut>(
    mut deleted: mpsc::UnboundedReceiver<DeserializeGuard<K>>,
    report: F,
) where
    K: Resource,
    F: Fn(K) -> Fut,
    Fut: Future<Output = ()>,
{
    while let Some(guard) = deleted.recv().await {
        // An object this version cannot read gets no Deleted Event (nothing to name it by
        // beyond what the watch's Unreadable Warning already said).
        if let Ok(obj) = guard.0 {
            report(obj).await;
        }
    }
}

fn scoped_api<K>(client: &kube::Client, config: &OperatorConfig) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
{
    match &config.watch_namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Publishes the public key of `keyring`'s active master key. Public by design; a failure
/// only delays `claw-secrets seal --fetch-key` (retried at the next change or start), so it
/// does not stop the operator.
async fn publish_sealing_key(client: &kube::Client, namespace: &str, keyring: &Keyring) {
    match crate::k8s::sealing_key::publish(client, namespace, keyring).await {
        Ok(key_id) => tracing::info!(configmap = %format!("{namespace}/{}",
            crate::k8s::sealing_key::CONFIGMAP), %key_id, "published the public sealing key"),
        Err(e) => tracing::warn!(error = %e, "could not publish the public sealing key"),
    }
}

/// One item per change of the watched value (not for its first value).
fn changes_of(mut changes: watch::Receiver<u64>) -> impl futures::Stream<Item = ()> + Send + Sync {
    changes.mark_unchanged();
    futures::stream::unfold(changes, |mut changes| async move {
        changes.changed().await.ok()?;
        Some(((), changes))
    })
}

/// The master keyring, created on first start (wrapped in place with `--kms-plugin` if found
/// in plaintext). Retries while the API server or the KMS plugin is unreachable; an unreadable
/// keyring is fatal (it needs a human).
async fn load_keyring(client: &kube::Client, config: &OperatorConfig) -> Result<Keyring, Error> {
    use crate::k8s::keyring::Origin;
    let mut delay = Duration::from_millis(500);
    loop {
        match crate::k8s::keyring::load_or_create(
            client,
            &config.namespace,
            &config.master_key_secret,
            config.kms.as_ref(),
        )
        .await
        {
            Ok((keyring, origin)) => {
                let active = keyring.active().id().to_string();
                let (namespace, secret) = (&config.namespace, &config.master_key_secret);
                let wrapped = config.kms.is_some();
                match origin {
                    Origin::Created => tracing::info!(%namespace, %secret, key_id = %active,
                        kms_wrapped = wrapped, "created the master key Secret (first start)"),
                    Origin::Loaded => tracing::info!(%namespace, %secret, key_id = %active,
                        keys = keyring.key_ids().count(), kms_wrapped = wrapped, "loaded the master keyring"),
                    Origin::Wrapped => tracing::warn!(%namespace, %secret, key_id = %active,
                        data_key = crate::k8s::keyring::KMS_KEYRING_KEY,
                        "the master keyring was stored in plaintext: wrapped it in place with the KMS plugin and removed the plaintext from the Secret (readers of it now need --kms-plugin; copies made before, such as etcd backups, still hold it in plaintext)"),
                }
                return Ok(keyring);
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "cannot read the master keyring yet; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(10));
            }
            Err(e) => return Err(e.into()),
        }
    }
}

fn log_result<K: Resource>(
    kind: &str,
    result: Result<
        (kube::runtime::reflector::ObjectRef<K>, Action),
        controller::Error<Error, watcher::Error>,
    >,
) {
    match result {
        // Failed reconciliations are logged by `error_policy`.
        Ok(_) | Err(controller::Error::ReconcilerFailed(..)) => {}
        Err(controller::Error::ObjectNotFound(obj)) => {
            tracing::debug!(kind, object = %obj, "object gone before its reconciliation");
        }
        Err(e) => tracing::warn!(kind, error = %e, "watching failed; retrying"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(5));
        assert_eq!(backoff(2), Duration::from_secs(10));
        assert_eq!(backoff(4), Duration::from_secs(40));
        assert_eq!(backoff(50), Duration::from_secs(300));
    }
}
