//! The node agent: one per node. It keeps the ClawSecrets and ClawConfigs its node should hold
//! in the node-local store (the same crash-safe store as dev mode), and serves `node.invoke` on
//! the node: reads from the store, writes through the API server.
//!
//! Two ways to hold secrets. With deliveries (`AgentConfig::deliveries`, the chart's default),
//! the node holds only its own key: the operator delivers the node's secrets sealed to it
//! ([`receive`]), the store is sealed under it, and writes are passed on to the operator, which
//! holds the master keyring (`carrier.rs`). Without, the agent caches the master keyring, watches
//! every ClawSecret (`sync.rs`) and makes writes itself ([`crate::k8s::backend`]). ClawConfigs
//! (plain) are watched either way.
//!
//! Start-up order matters for the "serve reads within 100 ms, API server down" target: the node
//! key (or the cached keyring), the store, the saved token reviews and the audit log are local,
//! so the server listens before the agent has talked to the API server at all; syncing runs in
//! the background. Only an agent without deliveries and without a cached keyring (its first
//! start) waits for the API server: its store can be neither checked nor opened without one.

mod carrier;
pub mod deliveries;
mod metrics;
pub mod node_key;
pub mod receive;
mod rekey;
mod serving_cert;
mod store_keys;
mod sync;

pub use metrics::AgentMetrics;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use crate::crypto::{Keyring, SharedKeyring};
use crate::invoke::gateway::{GatewayNode, GatewaySetup};
use crate::invoke::{CommandCore, Dispatcher};
use crate::k8s::backend::{InvokeEvents, KubeAuthorizer, KubeRepository, ServiceAccountPrincipal};
use crate::k8s::crd::{ClawConfig, ClawSecret};
use crate::k8s::identity::KubeIdentity;
use crate::store::{OpenOptions, Store, create_private_dir, write_private_file_atomic};
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The Node this agent serves (its node id for node.invoke).
    pub node_name: String,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    /// Namespace and name of the master key Secret the operator created.
    pub master_key_namespace: String,
    pub master_key_secret: String,
    /// See [`crate::store::OpenOptions::rebuild_manifest`].
    pub rebuild_store_manifest: bool,
    /// See `claw-secrets agent --accept-audit-reset`.
    pub accept_audit_reset: bool,
    /// What the node.invoke server allows a client.
    pub http: crate::invoke::HttpLimits,
    /// Where node.invoke's serving certificate comes from (HTTPS only).
    pub tls: AgentTls,
    /// Where the node's secrets come from: the operator's deliveries (sealed to this node's
    /// key), or, without, a watch of every ClawSecret opened with the master keyring.
    pub deliveries: Option<DeliverySource>,
    /// The KMS v2 plugin the keyring Secret is wrapped with (`--kms-plugin`); only an agent
    /// without deliveries reads the keyring.
    pub kms: Option<crate::kms::KmsPlugin>,
}

/// Where the agent's serving certificate comes from.
#[derive(Debug, Clone)]
pub enum AgentTls {
    /// Issued through the CertificateSigningRequest API ([`serving_cert`]): the default.
    Issued,
    /// Files kept by someone else (cert-manager, a test's CA), read again when replaced.
    Files(crate::tls::CertFiles),
}

/// The operator's delivery endpoint, reached through the API server's service proxy, and the
/// node's token for it.
#[derive(Debug, Clone)]
pub struct DeliverySource {
    /// The operator's webhook Service: namespace, name, port.
    pub namespace: String,
    pub service: String,
    pub port: u16,
    /// A ServiceAccount token for the audience `claw-secrets-operator`, bound to this agent's
    /// pod (a projected volume the kubelet renews); read again for every fetch.
    pub token_file: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    Setup(String),
    #[error("the node.invoke server failed: {0}")]
    Serve(std::io::Error),
    /// A background task ended (or panicked): the agent stops rather than serve data it no
    /// longer keeps current; the kubelet restarts it.
    #[error("the agent's {task} task {how}; exiting so the agent is restarted")]
    TaskEnded {
        task: &'static str,
        how: &'static str,
    },
}

fn cached_keyring(path: &Path) -> Option<Keyring> {
    if let Err(e) = crate::store::ensure_private_file(path) {
        // Not used, as ssh would not use such a key: the API server's copy is fetched instead.
        tracing::error!(error = %e, "the cached keyring is open to other users; not using it");
        return None;
    }
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).ok()?);
    match Keyring::from_json(&bytes) {
        Ok(k) => Some(k),
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cached keyring is unreadable; waiting for the API server");
            None
        }
    }
}

/// Waits for the keyring Secret (first start: nothing cached), retrying with backoff; a
/// keyring wrapped by a KMS plugin this agent was not given is fatal (it needs --kms-plugin).
async fn first_keyring(client: &kube::Client, config: &AgentConfig) -> Result<Keyring, AgentError> {
    let mut delay = Duration::from_millis(500);
    loop {
        match crate::k8s::keyring::load(
            client,
            &config.master_key_namespace,
            &config.master_key_secret,
            config.kms.as_ref(),
        )
        .await
        {
            Ok(Some(ring)) => {
                let cache = config.data_dir.join("master.key");
                if let Err(e) = write_private_file_atomic(&cache, &ring.to_json()) {
                    tracing::error!(error = %e, "could not cache the keyring");
                }
                tracing::info!("master keyring loaded from the API server");
                return Ok(ring);
            }
            Ok(None) => {
                tracing::warn!(namespace = %config.master_key_namespace, name = %config.master_key_secret,
                "master key Secret not found yet; is the operator running?")
            }
            Err(e @ crate::k8s::keyring::KeyringError::Wrapped { .. }) => {
                return Err(AgentError::Setup(e.to_string()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "no cached keyring, and the API server has not given one yet; retrying")
            }
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}

/// Follows the keyring Secret (a watch of it; a new master key is used as soon as it is
/// written), caching each version on disk for restarts without the API server, and telling
/// `changed`'s receivers (the store's re-encryption, [`store_keys`]).
async fn refresh_keyring(
    client: kube::Client,
    config: AgentConfig,
    keys: SharedKeyring,
    changed: watch::Sender<()>,
) {
    let cache = config.data_dir.join("master.key");
    let changed = Arc::new(changed);
    crate::k8s::keyring::follow(
        client,
        config.master_key_namespace.clone(),
        config.master_key_secret.clone(),
        config.kms.clone(),
        keys,
        move |ring| {
            let (cache, changed) = (cache.clone(), changed.clone());
            async move {
                if let Err(e) = write_private_file_atomic(&cache, &ring.to_json()) {
                    tracing::error!(error = %e, "could not cache the keyring");
                }
                changed.send_replace(());
            }
        },
    )
    .await;
}

/// Runs the agent until `shutdown` completes.
/// How long a call the agent makes on a caller's behalf (a write, a read of the object to
/// write) may wait for the API server to connect, and then to answer.
pub const API_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
pub const API_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the agent until `shutdown` completes. Two clients from `kube_config`: one for the
/// watches (long-lived, idle-timed by the watcher) and one for calls on a caller's behalf,
/// bounded by [`API_CONNECT_TIMEOUT`] and [`API_READ_TIMEOUT`], so a partitioned API server
/// makes a write fail in seconds rather than hang (token and access reviews have their own,
/// shorter bound).
pub async fn run(
    kube_config: kube::Config,
    config: AgentConfig,
    gateway: Option<GatewaySetup>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), AgentError> {
    let setup = |e: String| AgentError::Setup(e);
    // Start-up is a target (serve reads within 50 ms of a restart): each step's share is logged.
    let started = std::time::Instant::now();
    let client = kube::Client::try_from(kube_config.clone())
        .map_err(|e| setup(format!("cannot build a Kubernetes client: {e}")))?;
    let mut bounded_config = kube_config;
    bounded_config.connect_timeout = Some(API_CONNECT_TIMEOUT);
    bounded_config.read_timeout = Some(API_READ_TIMEOUT);
    bounded_config.reset_reader_on_write = true;
    let bounded = kube::Client::try_from(bounded_config.clone())
        .map_err(|e| setup(format!("cannot build a Kubernetes client: {e}")))?;
    let clients_built = started.elapsed();
    create_private_dir(&config.data_dir).map_err(|e| setup(e.to_string()))?;
    let node_key = node_key::load_or_create(&config.data_dir).map_err(setup)?;
    let options = OpenOptions {
        rebuild_manifest: config.rebuild_store_manifest,
    };
    // With deliveries, the node holds only its own key: its store is sealed under it, and its
    // writes are carried by the operator. Without, it holds the master keyring (cached beside
    // the store), as before.
    let (keys, master_keys, (store, report)) = match &config.deliveries {
        Some(_) => (
            SharedKeyring::new(node_key.clone()),
            None,
            rekey::open_node_store(&config.data_dir, &node_key, options).map_err(setup)?,
        ),
        None => {
            let keyring = match cached_keyring(&config.data_dir.join("master.key")) {
                Some(ring) => ring,
                None => first_keyring(&client, &config).await?,
            };
            let keys = SharedKeyring::new(keyring);
            let opened = Store::open(&config.data_dir, keys.clone(), options)
                .map_err(|e| setup(e.to_string()))?;
            (keys.clone(), Some(keys), opened)
        }
    };
    let store = Arc::new(store);
    let store_opened = started.elapsed();
    let (audit, _) = crate::audit::open_anchored(
        &config.data_dir.join("audit.log"),
        &config.node_name,
        &store,
        config.accept_audit_reset,
    )
    .map_err(|e| setup(e.to_string()))?;

    let audit_opened = started.elapsed();
    // A certificate that does not load stops the start: never plain HTTP in its place.
    let (tls, follow_tls) = match &config.tls {
        AgentTls::Files(files) => {
            let cert =
                crate::tls::ServingCert::new(files.load().map_err(|e| setup(e.to_string()))?);
            let follow = files.clone().follow(cert.clone(), crate::tls::FOLLOW_EVERY);
            (cert, futures::future::Either::Left(follow))
        }
        AgentTls::Issued => {
            let (cert, renew) =
                serving_cert::obtain(bounded.clone(), config.node_name.clone(), &config.data_dir)
                    .await
                    .map_err(setup)?;
            (cert, futures::future::Either::Right(renew))
        }
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| setup(format!("cannot listen on {}: {e}", config.listen)))?;
    let addr = listener.local_addr().map_err(|e| setup(e.to_string()))?;
    let ms = |d: std::time::Duration| (d.as_secs_f64() * 1e4).round() / 10.0;
    tracing::info!(node = %config.node_name, %addr, secrets = report.secrets, configs = report.configs,
        refused = report.refused.len(), from_image = report.from_image,
        clients_ms = ms(clients_built), store_open_ms = ms(store_opened - clients_built),
        audit_open_ms = ms(audit_opened - store_opened),
        listening_after_ms = ms(started.elapsed()),
        "agent serving node.invoke from its local store");

    let (labels_tx, labels_rx) = watch::channel(None);
    let metrics = Arc::new(AgentMetrics::default());
    let mut background = Supervised::default();
    background.spawn("serving certificate renewal", follow_tls);
    background.spawn(
        "audit anchor",
        crate::audit::keep_anchored(audit.clone(), store.clone()),
    );
    let (keyring_changed, keyring_changes) = watch::channel(());
    if let Some(master_keys) = &master_keys {
        background.spawn(
            "keyring refresh",
            refresh_keyring(
                client.clone(),
                config.clone(),
                master_keys.clone(),
                keyring_changed,
            ),
        );
    } else {
        drop(keyring_changed);
    }
    background.spawn(
        "store key report",
        store_keys::keep_reported(
            client.clone(),
            config.node_name.clone(),
            store.clone(),
            master_keys.clone(),
            keyring_changes,
        ),
    );
    background.spawn(
        "node key publication",
        node_key::publish(
            client.clone(),
            config.node_name.clone(),
            config.data_dir.clone(),
            node_key.clone(),
        ),
    );
    background.spawn(
        "node label watch",
        sync::watch_node_labels(client.clone(), config.node_name.clone(), labels_tx),
    );
    match &config.deliveries {
        Some(source) => background.spawn(
            "deliveries",
            receive::follow(
                deliveries::DeliveryClient::new(
                    client.clone(),
                    &source.namespace,
                    &source.service,
                    source.port,
                    source.token_file.clone(),
                ),
                store.clone(),
                node_key.clone(),
                keys.clone(),
                metrics.clone(),
            ),
        ),
        None => background.spawn(
            "ClawSecret mirror",
            sync::mirror::<ClawSecret>(
                client.clone(),
                store.clone(),
                master_keys.clone(),
                metrics.clone(),
                labels_rx.clone(),
            ),
        ),
    }
    background.spawn(
        "ClawConfig mirror",
        sync::mirror::<ClawConfig>(
            client.clone(),
            store.clone(),
            master_keys.clone(),
            metrics.clone(),
            labels_rx,
        ),
    );

    let events = InvokeEvents::new(
        bounded.clone(),
        crate::k8s::component::Component::Agent,
        &config.node_name,
        store.clone(),
    );
    let identity = KubeIdentity::new(bounded.clone())
        .with_review_file(config.data_dir.join("token-reviews.json"))
        .with_metrics(metrics.token_reviews());
    let audit_handle = audit.clone();
    let anchored_store = store.clone();
    let carried_store = store.clone();
    let repository = KubeRepository::new(
        bounded.clone(),
        &bounded_config,
        store,
        keys.clone(),
        events.clone(),
    );
    let core = CommandCore::new(
        KubeAuthorizer::new(identity, events),
        repository,
        audit,
        config.node_name.clone(),
        keys,
    );
    let mut dispatcher = Dispatcher::new(core);
    if let Some(source) = &config.deliveries {
        dispatcher = dispatcher.with_carrier(Arc::new(carrier::OperatorCarrier::new(
            bounded.clone(),
            source,
            &config.node_name,
            carried_store,
        )));
    }
    metrics.register(dispatcher.registry_mut());
    if let Some(g) = &gateway {
        dispatcher = dispatcher.with_readiness_note(g.readiness_note());
    }
    let dispatcher = Arc::new(dispatcher);
    let stop_gateway = CancellationToken::new();
    let gateway_node = match gateway {
        None => None,
        Some(g) => {
            let principal =
                ServiceAccountPrincipal::parse(bounded.clone(), &g.principal).map_err(setup)?;
            let node = GatewayNode::new(dispatcher.clone(), principal, g)
                .map_err(|e| setup(e.to_string()))?;
            tracing::info!(
                node_id = node.node_id(),
                "serving node.invoke through the OpenClaw gateway too"
            );
            Some(tokio::spawn(node.run(stop_gateway.clone())))
        }
    };
    let result = tokio::select! {
        served = crate::invoke::serve(listener, dispatcher, config.http, Some(tls), shutdown) => served.map_err(AgentError::Serve),
        ended = background.first_to_end() => Err(ended),
    };
    // The gateway's calls in flight are answered (and audited) before the log is flushed.
    stop_gateway.cancel();
    if let Some(node) = gateway_node {
        let _ = node.await;
    }
    if let Err(e) = &result {
        tracing::error!(error = %e, "agent stopping");
    }
    // Outcome records of the last writes are queued, not yet synced: write them before exiting,
    // and anchor the last one.
    if let Err(e) = audit_handle.flush().await {
        tracing::error!(error = %e, "the audit log could not be flushed");
    } else if let Err(e) = crate::audit::anchor_head(&audit_handle, &anchored_store) {
        tracing::error!(error = %e, "the audit log's head could not be anchored");
    }
    result
}

/// The agent's background tasks. Each runs for the life of the process; the first one to end,
/// or panic, ends the agent. Aborted when dropped.
#[derive(Default)]
struct Supervised {
    tasks: tokio::task::JoinSet<()>,
    names: std::collections::HashMap<tokio::task::Id, &'static str>,
}

impl Supervised {
    fn spawn(
        &mut self,
        name: &'static str,
        task: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let handle = self.tasks.spawn(task);
        self.names.insert(handle.id(), name);
    }

    async fn first_to_end(&mut self) -> AgentError {
        let (id, how) = match self.tasks.join_next_with_id().await {
            Some(Ok((id, ()))) => (Some(id), "ended"),
            Some(Err(e)) if e.is_panic() => (Some(e.id()), "panicked"),
            Some(Err(e)) => (Some(e.id()), "was cancelled"),
            None => (None, "ended"),
        };
        let task = id
            .and_then(|id| self.names.get(&id).copied())
            .unwrap_or("background");
        AgentError::TaskEnded { task, how }
    }
}
