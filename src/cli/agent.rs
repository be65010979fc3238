//! `claw-secrets agent`: the per-node agent (a DaemonSet in a cluster).

use clap::Args;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use crate::k8s::agent::{AgentConfig, DeliverySource, run};
use crate::k8s::component::Component;

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// The Node this agent serves, also its node id for node.invoke (required; in a pod, set
    /// NODE_NAME from spec.nodeName).
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// Where the node's encrypted store, cached keyring, saved token reviews and audit log
    /// live: the only place the agent writes.
    #[arg(
        long,
        env = "CLAW_SECRETS_DATA_DIR",
        default_value = "/var/lib/claw-secrets"
    )]
    data_dir: PathBuf,
    /// Address for node.invoke, over HTTPS only. Its certificate: --tls-cert/--tls-key if
    /// given, else one the operator signs (a CertificateSigningRequest for signer
    /// clawbernetes.io/agent-serving naming this node, kept in DATA_DIR/tls and renewed at two
    /// thirds of its lifetime).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// The master key Secret the operator creates, as NAMESPACE/NAME.
    #[arg(long, default_value = "claw-secrets/claw-secrets-master-key")]
    master_key_secret: String,
    /// Prepare --data-dir for an agent running as UID:GID, then exit: create it if missing and
    /// make UID:GID its owner. For an init container running as root with only CAP_CHOWN, so
    /// that the agent itself runs as that non-root user on a hostPath directory (which the
    /// kubelet creates owned by root).
    #[arg(long, value_name = "UID:GID")]
    prepare_data_dir: Option<String>,
    /// Set the node store's manifest aside and rebuild it from the entries on disk, each of
    /// which must still pass its own MAC (after the manifest was lost or damaged). The store
    /// mirrors the API server, which puts right whatever the entries get wrong.
    #[arg(long)]
    rebuild_store_manifest: bool,
    /// Begin a new audit chain when the audit log does not match what the data dir recorded of
    /// it (missing, cut short, edited or rewritten); the old file is kept aside as
    /// audit.log.reset-<time>, and the new chain's first record names the old head.
    #[arg(long)]
    accept_audit_reset: bool,
    /// Take this node's secrets from the operator's deliveries, sealed to the node's own key,
    /// instead of watching every ClawSecret: the file holds a ServiceAccount token of this
    /// agent's pod for the audience `claw-secrets-operator` (a projected volume; the chart
    /// mounts one), read again for every fetch.
    #[arg(long, env = "CLAW_SECRETS_DELIVERY_TOKEN_FILE", value_name = "PATH")]
    delivery_token_file: Option<PathBuf>,
    /// The operator's HTTPS Service that answers deliveries, as NAMESPACE/NAME:PORT, reached
    /// through the API server's service proxy (RBAC: `get` on `services/proxy` for it).
    #[arg(long, default_value = "claw-secrets/claw-secrets-webhook:443")]
    operator_service: String,
    #[command(flatten)]
    tls: super::serve_tls::ServeTlsArgs,
    #[command(flatten)]
    http: super::http_limits::HttpLimitArgs,
    #[command(flatten)]
    gateway: super::gateway::GatewayArgs,
    // Only an agent without --delivery-token-file reads the master keyring.
    #[command(flatten)]
    kms: super::kms::KmsArgs,
}

/// `--prepare-data-dir`: create `dir` (0700) if missing and hand it to `owner`. No chmod of an
/// existing directory: root without CAP_FOWNER may not, and the agent sets 0700 itself.
fn prepare_data_dir(dir: &Path, owner: &str) -> ExitCode {
    let parsed = owner
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)));
    let Some((uid, gid)) = parsed else {
        eprintln!("usage error: --prepare-data-dir must be UID:GID (numbers), not {owner:?}");
        return ExitCode::from(2);
    };
    let prepared = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .and_then(|()| std::os::unix::fs::chown(dir, Some(uid), Some(gid)))
    };
    match prepared {
        Ok(()) => {
            eprintln!("data dir {} prepared for {uid}:{gid}", dir.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: preparing {} for {uid}:{gid}: {e}", dir.display());
            ExitCode::FAILURE
        }
    }
}

/// `NAMESPACE/NAME:PORT`.
fn parse_service(s: &str) -> Option<(String, String, u16)> {
    let (namespace, rest) = s.split_once('/')?;
    let (name, port) = rest.rsplit_once(':')?;
    let valid = |part: &str| crate::domain::dns::is_label(part);
    (valid(namespace) && valid(name))
        .then(|| Some((namespace.to_owned(), name.to_owned(), port.parse().ok()?)))
        .flatten()
}

pub fn run_cli(args: AgentArgs) -> ExitCode {
    if let Some(owner) = &args.prepare_data_dir {
        return prepare_data_dir(&args.data_dir, owner);
    }
    let Some((ns, name)) = args.master_key_secret.split_once('/') else {
        eprintln!("usage error: --master-key-secret must be NAMESPACE/NAME");
        return ExitCode::from(2);
    };
    let deliveries = match args.delivery_token_file {
        None => None,
        Some(token_file) => match parse_service(&args.operator_service) {
            Some((namespace, service, port)) => Some(DeliverySource {
                namespace,
                service,
                port,
                token_file,
            }),
            None => {
                eprintln!(
                    "usage error: --operator-service must be NAMESPACE/NAME:PORT, not {:?}",
                    args.operator_service
                );
                return ExitCode::from(2);
            }
        },
    };
    let kms = match args.kms.plugin() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("usage error: {e}");
            return ExitCode::from(2);
        }
    };
    let gateway = match args.gateway.setup(
        &args.data_dir,
        format!("claw-secrets agent {}", args.node_name),
    ) {
        Ok(gateway) => gateway,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let config = AgentConfig {
        node_name: args.node_name,
        data_dir: args.data_dir,
        listen: args.listen,
        master_key_namespace: ns.to_owned(),
        master_key_secret: name.to_owned(),
        rebuild_store_manifest: args.rebuild_store_manifest,
        accept_audit_reset: args.accept_audit_reset,
        http: args.http.limits(),
        tls: args.tls.files().map_or(
            crate::k8s::agent::AgentTls::Issued,
            crate::k8s::agent::AgentTls::Files,
        ),
        deliveries,
        kms,
    };
    let Some(runtime) = super::runtime(true) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async move {
        // Building a client reads the kubeconfig (or the in-cluster account) only; it does not
        // contact the API server, so an agent starts serving reads while the server is down.
        let client = match kube::Config::infer().await {
            Ok(mut c) => {
                Component::Agent.identify(&mut c);
                c
            }
            Err(e) => {
                eprintln!("error: no Kubernetes credentials (KUBECONFIG or in-cluster): {e}");
                return ExitCode::FAILURE;
            }
        };
        // Not fatal here: an agent serves from its cached keyring with the plugin down; the
        // plugin is needed when the keyring Secret changes (or on a first start).
        if let Some(kms) = config.kms.clone() {
            tokio::spawn(async move {
                if let Err(e) = super::kms::check(&kms).await {
                    tracing::warn!(error = %e, "the KMS plugin is not usable yet");
                }
            });
        }
        match run(client, config, gateway, super::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
