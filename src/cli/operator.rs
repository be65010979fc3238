//! `claw-secrets operator`: the cluster operator (a Deployment; replicas elect a leader).

use clap::Args;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use crate::k8s::component::Component;
use crate::k8s::operator::{CertSource, LeaseConfig, OperatorConfig, WebhookConfig, run};

#[derive(Debug, Args)]
pub struct OperatorArgs {
    /// Namespace of the operator: where the leader Lease and the master key Secret live.
    #[arg(long, env = "POD_NAMESPACE", default_value = "claw-secrets")]
    namespace: String,
    /// Name of the master key Secret (created on first start if absent).
    #[arg(long, default_value = "claw-secrets-master-key")]
    master_key_secret: String,
    /// Address for /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Name of the leader election Lease.
    #[arg(long, default_value = "claw-secrets-operator")]
    lease_name: String,
    /// How long a leader's Lease lasts without renewal before a standby may take over (2 to
    /// 3600).
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(2..=3600))]
    lease_duration_seconds: u64,
    /// This replica's identity in the Lease; must be unique per replica (default:
    /// HOSTNAME-PID).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// The replicas' identities are the names of their pods in --namespace (the chart sets
    /// this): a Lease holder whose pod no longer exists is taken over at once instead of after
    /// the lease expires. Needs `get` on pods in --namespace.
    #[arg(long)]
    lease_holders_are_pods: bool,
    /// Reconcile only the ClawSecrets and ClawConfigs of this namespace (default: every
    /// namespace).
    #[arg(long, env = "WATCH_NAMESPACE")]
    watch_namespace: Option<String>,
    /// Serve the admission webhook that seals ClawSecret data before it is stored, on this
    /// address (the chart sets it). Without it, plaintext is stored and then sealed by the
    /// reconcile loop.
    #[arg(long)]
    webhook_addr: Option<SocketAddr>,
    /// DNS names and IP addresses the webhook's certificate covers (the Service's names, or
    /// the host of the webhook configuration's url); repeat or separate with commas. Needed
    /// unless --webhook-cert-dir is given.
    #[arg(long, value_delimiter = ',')]
    webhook_host: Vec<String>,
    /// Secret in --namespace where the operator keeps the webhook's CA and serving
    /// certificate (created on first start).
    #[arg(long, default_value = "claw-secrets-webhook-tls")]
    webhook_cert_secret: String,
    /// The MutatingWebhookConfiguration whose caBundle the operator keeps equal to its CA.
    #[arg(long)]
    webhook_configuration: Option<String>,
    /// Serve tls.crt and tls.key from this directory instead (cert-manager writes them; its
    /// CA injector then keeps the caBundle). Re-read every 10 minutes.
    #[arg(long, conflicts_with_all = ["webhook_host", "webhook_configuration"])]
    webhook_cert_dir: Option<std::path::PathBuf>,
    /// The node agents' ServiceAccount, NAMESPACE/NAME (a NAME alone is in --namespace): the
    /// webhook's HTTPS server answers `GET /v1/deliveries` to its tokens bound to a node, with
    /// that node's deliveries, and the signer of the agents' certificates approves only its
    /// CertificateSigningRequests.
    #[arg(
        long,
        value_name = "[NAMESPACE/]NAME",
        default_value = "claw-secrets-agent"
    )]
    agent_service_account: String,
    /// Approve and sign the node agents' serving certificates (CertificateSigningRequests of
    /// signer clawbernetes.io/agent-serving), with a CA kept in Secret claw-secrets-agent-ca of
    /// --namespace and published in ConfigMap claw-secrets-agent-ca. Requests are
    /// cluster-wide, so one operator per cluster signs: by default one that reconciles every
    /// namespace does, one confined by --watch-namespace does not.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    agent_signer: Option<bool>,
    /// How long an agent's serving certificate is valid (30d, 12h, 90m, 45s; at most 365d).
    /// Agents renew theirs at two thirds of it.
    #[arg(long, value_name = "PERIOD", default_value = "30d", value_parser = parse_lifetime)]
    agent_certificate_lifetime: Duration,
    /// Carry the node agents' node.invoke writes (`POST /v1/writes` on the webhook's HTTPS
    /// server: agents hold no master keyring), keeping their audit log and the writes of
    /// deleted objects in this directory (the chart: an emptyDir). Without it, none are carried.
    #[arg(long, requires = "webhook_addr")]
    data_dir: Option<std::path::PathBuf>,
    /// After the active master key changes, re-encrypt at most this many ClawSecrets per
    /// second under it (each a write to the API server; the same version and data in a new
    /// envelope).
    #[arg(long, value_name = "N", default_value_t = 50, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    reencrypt_per_second: u32,
    /// Make a new master key active once the current one has been active this long (30d, 12h,
    /// 90m, 45s; 0: only by hand, with `claw-secrets keys rotate`). The old key stays, retired,
    /// and every ClawSecret is re-encrypted under the new one. Needs update on the keyring
    /// Secret.
    #[arg(long, value_name = "PERIOD", default_value = "30d", value_parser = super::duration::parse_period)]
    key_rotation_period: super::duration::Period,
    #[command(flatten)]
    kms: super::kms::KmsArgs,
}

/// A certificate lifetime: a period (as --key-rotation-period) that is not off, at most a year.
fn parse_lifetime(text: &str) -> Result<Duration, String> {
    match super::duration::parse_period(text)?.0 {
        None => Err(format!("{text:?}: a certificate lifetime cannot be 0")),
        Some(d) if d > Duration::from_secs(365 * 86_400) => {
            Err(format!("{text:?} is longer than 365d"))
        }
        Some(d) => Ok(d),
    }
}

/// The agents' ServiceAccount as the username of its tokens, from `[NAMESPACE/]NAME`.
fn agent_user(account: &str, namespace: &str) -> Result<String, String> {
    let (ns, name) = account.split_once('/').unwrap_or((namespace, account));
    if ns.is_empty() || name.is_empty() || name.contains('/') {
        return Err(format!(
            "--agent-service-account {account:?} must be NAMESPACE/NAME or NAME"
        ));
    }
    Ok(format!("system:serviceaccount:{ns}:{name}"))
}

fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "claw-secrets-operator".to_owned());
    format!("{host}-{}", std::process::id())
}

/// The webhook's settings, or why they do not hold together.
fn webhook(args: &OperatorArgs) -> Result<Option<WebhookConfig>, String> {
    let Some(addr) = args.webhook_addr else {
        return Ok(None);
    };
    let certs = match &args.webhook_cert_dir {
        Some(dir) => CertSource::Files { dir: dir.clone() },
        None => {
            let hosts: Vec<String> = args
                .webhook_host
                .iter()
                .map(|h| h.trim().to_owned())
                .filter(|h| !h.is_empty())
                .collect();
            if hosts.is_empty() {
                return Err("--webhook-addr needs --webhook-host (the names the API server calls the webhook by) or --webhook-cert-dir".into());
            }
            CertSource::Managed {
                secret: args.webhook_cert_secret.clone(),
                hosts,
                configuration: args.webhook_configuration.clone(),
            }
        }
    };
    Ok(Some(WebhookConfig { addr, certs }))
}

pub fn run_cli(args: OperatorArgs) -> ExitCode {
    let webhook = match webhook(&args) {
        Ok(w) => w,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let agent_user = match agent_user(&args.agent_service_account, &args.namespace) {
        Ok(u) => u,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    let kms = match args.kms.plugin() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("usage error: {e}");
            return ExitCode::from(2);
        }
    };
    let watch_namespace = args.watch_namespace.filter(|n| !n.is_empty());
    let config = OperatorConfig {
        webhook,
        agent_user,
        agent_signer: args.agent_signer.unwrap_or(watch_namespace.is_none()),
        agent_certificate_lifetime: args.agent_certificate_lifetime,
        lease: LeaseConfig {
            namespace: args.namespace.clone(),
            name: args.lease_name,
            identity: args
                .identity
                .filter(|i| !i.is_empty())
                .unwrap_or_else(default_identity),
            duration: Duration::from_secs(args.lease_duration_seconds),
            holders_are_pods: args.lease_holders_are_pods,
        },
        namespace: args.namespace,
        master_key_secret: args.master_key_secret,
        metrics_addr: args.metrics_addr,
        watch_namespace,
        data_dir: args.data_dir,
        reencrypt_per_second: args.reencrypt_per_second,
        key_rotation_period: args.key_rotation_period.0,
        kms,
    };
    let Some(runtime) = super::runtime(true) else {
        return ExitCode::FAILURE;
    };
    let code = runtime.block_on(async move {
        let client = match Component::Operator.client().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(identity = %config.lease.identity, namespace = %config.namespace,
            "claw-secrets operator starting");
        if let Some(kms) = &config.kms
            && let Err(e) = super::kms::check(kms).await
        {
            tracing::error!(error = %e, "the KMS plugin is not usable");
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
        match run(client, config, super::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "operator stopped");
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    });
    // Whatever is still running (a reconcile cut short by a lost Lease) must not outlive the
    // decision to stop.
    runtime.shutdown_timeout(Duration::from_secs(1));
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agents_service_account_may_name_its_namespace() {
        assert_eq!(
            agent_user("claw-secrets-agent", "ops").unwrap(),
            "system:serviceaccount:ops:claw-secrets-agent"
        );
        assert_eq!(
            agent_user("claw-secrets/claw-secrets-agent", "ops").unwrap(),
            "system:serviceaccount:claw-secrets:claw-secrets-agent"
        );
        for bad in ["", "/a", "a/", "a/b/c"] {
            assert!(agent_user(bad, "ops").is_err(), "{bad:?}");
        }
    }

    #[test]
    fn certificate_lifetimes() {
        assert_eq!(
            parse_lifetime("30d").unwrap(),
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(parse_lifetime("90s").unwrap(), Duration::from_secs(90));
        assert!(parse_lifetime("0").is_err());
        assert!(parse_lifetime("366d").is_err());
        assert!(parse_lifetime("5x").is_err());
    }
}
