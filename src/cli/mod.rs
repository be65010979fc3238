//! The `claw-secrets` command line: wiring only; behaviour lives in the layers below.

mod agent;
mod audit;
mod completions;
mod dev;
mod dev_control;
mod dev_keys;
mod duration;
mod gateway;
mod http_limits;
mod invoke;
mod keys;
mod kms;
mod kubeconfig;
mod migrate;
mod operator;
mod paths;
pub mod seal;
mod serve_tls;
mod token;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub use paths::{ClientConfig, client_config_path, default_data_dir};

/// Secrets and configuration manager for Clawbernetes nodes.
///
/// Encrypted secrets (versioned, scoped to the workloads allowed to read them, every access
/// written to a hash-chained audit log) and plain configs, served through the node.invoke API.
///
/// One binary, two shapes. `claw-secrets dev` runs the whole API on one machine on an embedded
/// encrypted store: no cluster needed. In Kubernetes, `claw-secrets operator` (a Deployment)
/// and `claw-secrets agent` (a DaemonSet, one per node) serve the same API from ClawSecret and
/// ClawConfig custom resources; `claw-secrets crd` prints those resources' definitions.
///
/// Logs go to stderr; CLAW_SECRETS_LOG (else RUST_LOG; any tracing filter, default `info`) sets
/// the level. No level ever logs a secret's value.
#[derive(Debug, Parser)]
#[command(
    name = "claw-secrets",
    version,
    max_term_width = 100,
    after_help = r#"Quick start:
  claw-secrets dev                 # terminal 1: a local server on 127.0.0.1:7070
  claw-secrets invoke local secret.create '{"name":"db.password","data":{"password":"s3cret"}}'
  claw-secrets help <command>      # more: README.md and docs/ in the source repository"#
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the node.invoke API on this machine, backed by an encrypted local store
    ///
    /// Runs the whole node.invoke API on this machine: encrypted secrets and plain configs in a
    /// local store, bearer-token access and a hash-chained audit log. No cluster needed. It
    /// speaks plain HTTP, so keep it on loopback. Ctrl-C (or SIGTERM) stops it cleanly.
    ///
    /// State lives in the data directory (--data-dir): master.key (the master key), admin.token,
    /// tokens.json (token hashes), audit.log, node-id and the encrypted store; keys and tokens
    /// are files of mode 0600. One server at a time may use a data directory. On start it also
    /// writes $XDG_CONFIG_HOME/claw-secrets/dev.json (default ~/.config/claw-secrets/dev.json),
    /// holding the address and the admin token's path, never the token, so that
    /// `claw-secrets invoke` finds this server.
    #[command(after_help = "Examples:
  claw-secrets dev
  claw-secrets dev --node-id node-1 --data-dir /tmp/claw-dev --listen 127.0.0.1:7071")]
    Dev(dev::DevArgs),
    /// Call a node's node.invoke API and print the answer
    ///
    /// Calls a node's node.invoke API: `claw-secrets invoke <node-id> <command> '<json params>'`.
    /// On success it prints the payload as JSON on stdout and exits 0; on failure it prints
    /// `CODE: message` on stderr (e.g. NOT_FOUND, PERMISSION_DENIED) and exits 1, or 2 for a
    /// usage error. It keeps no state of its own.
    #[command(after_help = r#"Examples:
  claw-secrets invoke local secret.create '{"name":"db.password","data":{"password":"s3cret"}}'
  claw-secrets invoke local secret.get '{"name":"db.password"}'
  claw-secrets invoke local config.list '{"prefix":"app."}'
  claw-secrets invoke local secret.rotate - < params.json   # params from stdin, not shell history"#)]
    Invoke(invoke::InvokeArgs),
    /// Work with audit logs (see `claw-secrets audit verify --help`)
    #[command(
        subcommand,
        after_help = "Example:\n  claw-secrets audit verify ~/.local/share/claw-secrets/dev/audit.log"
    )]
    Audit(audit::AuditCommand),
    /// Manage dev-mode bearer tokens (see `claw-secrets token create --help`)
    #[command(
        subcommand,
        after_help = "Example:\n  claw-secrets token create --workload api-server"
    )]
    Token(token::TokenCommand),
    /// Run the per-node agent: mirror this node's secrets and configs, serve node.invoke
    ///
    /// Runs the node agent (in Kubernetes, a DaemonSet: one per node). It mirrors the
    /// ClawSecrets and ClawConfigs selected for this node into an encrypted local store and
    /// serves node.invoke on --listen: reads come from the local store, so they keep working
    /// while the API server is down; writes go through the API server as the caller. Callers
    /// are authenticated with TokenReview and authorized with SubjectAccessReview, or by the
    /// secret's allowed_workloads for a workload reading its own namespace's secret.
    ///
    /// State lives in --data-dir and nowhere else: the encrypted store, a cached copy of the
    /// master keyring (to start without the API server), saved token reviews and this node's
    /// audit log (audit.log); a read-only root filesystem is fine. The master keyring itself
    /// is read from the Secret the operator creates. Kubernetes credentials come from
    /// KUBECONFIG, else the in-cluster ServiceAccount.
    #[command(after_help = "Examples:
  claw-secrets agent --node-name \"$NODE_NAME\"   # in a pod: NODE_NAME from the downward API
  claw-secrets agent --node-name node-a --data-dir /tmp/claw-agent-a --listen 127.0.0.1:7443")]
    Agent(agent::AgentArgs),
    /// Run the operator: seal ClawSecrets, guard ClawConfigs, report status and Events
    ///
    /// Runs the operator (in Kubernetes, a Deployment). It seals the plaintext data of every
    /// ClawSecret with the master key and removes the plaintext in the same write, moves a
    /// secret's version forward on every change, refuses data changes to immutable
    /// ClawConfigs, and keeps status conditions and Events on both. Replicas elect a leader
    /// through a Lease; run two or more for failover.
    ///
    /// State lives in the cluster, not on disk: the master key Secret (--master-key-secret in
    /// --namespace, created on first start if absent) and the leader Lease. It serves
    /// /metrics, /healthz and /readyz on --metrics-addr. Kubernetes credentials come from
    /// KUBECONFIG, else the in-cluster ServiceAccount. Two operators must never reconcile the
    /// same namespaces with different master keys.
    #[command(after_help = "Examples:
  claw-secrets operator         # in a pod: POD_NAMESPACE and POD_NAME from the downward API
  claw-secrets operator --metrics-addr 127.0.0.1:8080 --watch-namespace team-a")]
    Operator(operator::OperatorArgs),
    /// Print the ClawSecret and ClawConfig CustomResourceDefinitions as YAML
    ///
    /// Prints the ClawSecret and ClawConfig CustomResourceDefinitions (API group
    /// clawbernetes.io) as YAML on stdout, generated from the types this binary was built with;
    /// they match crds/crds.yaml in the source. Apply them before starting the operator and
    /// the agents. It reads and writes nothing else and needs no cluster.
    #[command(after_help = "Examples:
  claw-secrets crd | kubectl apply -f -
  claw-secrets crd > crds.yaml")]
    Crd,
    /// Rewrite stored ClawSecrets and ClawConfigs in the CRDs' storage version
    ///
    /// After an upgrade that changed the CRDs' storage version (v1alpha1 to v1beta1), objects
    /// written before are still encoded in the old version in etcd, and the CRDs'
    /// status.storedVersions still names it. This rewrites every ClawSecret and ClawConfig in
    /// every namespace as it is (nothing it says changes; its resourceVersion moves) and then
    /// prunes status.storedVersions to the storage version, so a later release may stop serving
    /// the old one. Run it once after `kubectl apply` of the new CRDs, with a cluster admin's
    /// kubeconfig; it is safe to run again.
    #[command(after_help = "Example:
  claw-secrets crd | kubectl apply --server-side -f -
  claw-secrets migrate-storage")]
    MigrateStorage,
    /// The master keyring in a cluster: rotate the active key, prune retired keys (or a dev
    /// data dir's, with --data-dir)
    #[command(
        subcommand,
        after_help = "Example:\n  claw-secrets keys rotate --namespace claw-secrets\n  claw-secrets keys rotate --data-dir ~/.local/share/claw-secrets/dev"
    )]
    Keys(keys::KeysCommand),
    /// Encrypt a ClawSecret's data to the cluster's key: a manifest safe to commit
    ///
    /// Reads a plaintext ClawSecret manifest (-f, YAML or JSON), or data given with
    /// --from-literal/--from-file and --name/--namespace, and writes the same ClawSecret with
    /// spec.data replaced by spec.encryptedData: the data encrypted (HPKE: X25519,
    /// HKDF-SHA256, ChaCha20-Poly1305) to the cluster's public sealing key. Only the operator
    /// of that cluster can open it, and only for this namespace and object name: the same
    /// file applied under another name or in another namespace is refused. Commit the output;
    /// `kubectl apply` it, and the operator seals it under the master key as it would
    /// spec.data. Plaintext stays on this machine.
    ///
    /// The public key comes from --key FILE, else from the cluster (ConfigMap
    /// claw-secrets-sealing-key in --operator-namespace, read with your kubeconfig);
    /// `--fetch-key -o FILE` saves it once, for sealing offline later. Exits 1 on failure (2
    /// for a usage error) with the reason on stderr; the reason never quotes a value.
    #[command(after_help = "Examples:
  claw-secrets seal --fetch-key -o sealing-key.txt        # once: save the cluster's public key
  claw-secrets seal --key sealing-key.txt -f db-secret.yaml -o db-secret.sealed.yaml
  claw-secrets seal --key sealing-key.txt --namespace team-a --name db \\
      --from-file password=./password.txt --from-literal user=admin > db.sealed.yaml
  kubectl apply -f db-secret.sealed.yaml")]
    Seal(seal::SealArgs),
    /// Print a shell completion script for bash, zsh, fish, powershell or elvish
    ///
    /// Prints a completion script for SHELL on stdout, covering every subcommand and flag. It
    /// writes no files: redirect the output to where your shell loads completions from (see
    /// the examples), then start a new shell.
    #[command(after_help = r#"Examples:
  claw-secrets completions bash > ~/.local/share/bash-completion/completions/claw-secrets
  claw-secrets completions zsh > ~/.zfunc/_claw-secrets   # with fpath+=(~/.zfunc) before compinit
  claw-secrets completions fish > ~/.config/fish/completions/claw-secrets.fish
  source <(claw-secrets completions bash)                 # this bash session only"#)]
    Completions(completions::CompletionsArgs),
}

/// Libraries whose most detailed log lines print what they carry: tungstenite traces every
/// WebSocket frame, and a gateway frame can hold a secret's values (a `secret.get` answer, a
/// `secret.create` request). Their lines are never more detailed than debug, whatever the
/// filter asks for.
const FRAME_LOGGING_TARGETS: [&str; 2] = ["tungstenite", "tokio_tungstenite"];

fn logs_frames(target: &str) -> bool {
    FRAME_LOGGING_TARGETS.iter().any(|t| {
        target
            .strip_prefix(t)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// Logs go to stderr; `CLAW_SECRETS_LOG` (or `RUST_LOG`) sets the filter, else `default`
/// (`info` for the servers; for `invoke`, whose stderr carries the answer's error, only this
/// crate's warnings: a library's own error line would repeat that error in another shape).
fn init_logging(default: &str) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = std::env::var("CLAW_SECRETS_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_owned());
    let no_frames = tracing_subscriber::filter::filter_fn(|meta| {
        *meta.level() <= tracing::Level::DEBUG || !logs_frames(meta.target())
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .finish()
        .with(no_frames)
        .try_init();
}

/// The async runtime of a command: a worker per core for the servers, one thread for a
/// one-shot command. `None` (said on stderr) if the OS refuses it.
fn runtime(servers: bool) -> Option<tokio::runtime::Runtime> {
    let mut builder = if servers {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    builder
        .enable_all()
        .build()
        .map_err(|e| eprintln!("error: could not start the async runtime: {e}"))
        .ok()
}

/// Runs `work` with a client of the cluster (KUBECONFIG, else the in-cluster account), on a
/// runtime of its own: the one-shot cluster commands (`keys`, `migrate-storage`). Its error is
/// printed as `error: ...`.
fn with_cluster<F, Fut>(work: F) -> ExitCode
where
    F: FnOnce(kube::Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>>,
{
    let Some(runtime) = runtime(false) else {
        return ExitCode::FAILURE;
    };
    runtime.block_on(async {
        let result = match crate::k8s::component::Component::Cli.client().await {
            Ok(client) => work(client).await,
            Err(e) => Err(e.to_string()),
        };
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::Dev(args) => {
            init_logging("info");
            if let Err(e) = harden_process() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            dev::run(args)
        }
        Commands::Invoke(args) => {
            init_logging("claw_secrets=warn");
            invoke::run(args)
        }
        Commands::Audit(cmd) => audit::run(cmd),
        Commands::Token(cmd) => token::run(cmd),
        Commands::Agent(args) => {
            init_logging("info");
            if let Err(e) = harden_process() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            agent::run_cli(args)
        }
        Commands::Operator(args) => {
            init_logging("info");
            if let Err(e) = harden_process() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            operator::run_cli(args)
        }
        Commands::Crd => {
            print!("{}", crate::k8s::crd::crds_yaml());
            ExitCode::SUCCESS
        }
        Commands::MigrateStorage => {
            init_logging("claw_secrets=warn");
            migrate::run()
        }
        Commands::Keys(cmd) => {
            init_logging("claw_secrets=warn");
            // It holds the keyring while it works: no core dump of it.
            if let Err(e) = harden_process() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            keys::run(cmd)
        }
        Commands::Seal(args) => {
            init_logging("claw_secrets=warn");
            // It holds plaintext while it works: no core dump of it either.
            if let Err(e) = harden_process() {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            seal::run(args)
        }
        Commands::Completions(args) => completions::run(args),
    }
}

/// The servers hold keys and, while they work, plaintext: a core dump would put both on disk,
/// and a debugger of the same user could read them. So no core file (RLIMIT_CORE 0, hard limit
/// too) and not dumpable (which also refuses ptrace from non-root and makes /proc/PID/mem
/// root's). Refused start if either cannot be set.
fn harden_process() -> Result<(), String> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit, set_dumpable_behavior, setrlimit};
    setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )
    .map_err(|e| format!("cannot turn core dumps off (RLIMIT_CORE): {e}"))?;
    set_dumpable_behavior(DumpableBehavior::NotDumpable)
        .map_err(|e| format!("cannot make the process non-dumpable (PR_SET_DUMPABLE): {e}"))
}

/// Completes on Ctrl-C or SIGTERM (what a pod gets on deletion). The handlers are installed
/// when this is called, not when it is first polled, so a signal that arrives while the server
/// is still printing its banner is not lost. Call it inside the runtime.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
    async move {
        tokio::select! {
            _ = int.recv() => {},
            _ = term.recv() => {},
        }
        tracing::info!("shutting down: finishing requests in flight");
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_websocket_libraries_are_the_targets_kept_from_tracing_frames() {
        for target in [
            "tungstenite",
            "tungstenite::protocol",
            "tokio_tungstenite::compat",
        ] {
            assert!(super::logs_frames(target), "{target}");
        }
        for target in ["claw_secrets::invoke::gateway", "tungstenitex", "hyper"] {
            assert!(!super::logs_frames(target), "{target}");
        }
    }

    use super::Cli;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    /// Every argument of every subcommand says what it is for, and every subcommand has a
    /// one-line summary (`--help` shows defaults and env vars next to it).
    #[test]
    fn every_argument_and_subcommand_is_documented() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            if cmd.get_about().is_none() {
                missing.push(format!("{path}: no about"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}: no doc comment"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() != "help" {
                    walk(sub, &format!("{path} {}", sub.get_name()), missing);
                }
            }
        }
        let mut missing = Vec::new();
        let mut cmd = Cli::command();
        cmd.build();
        walk(&cmd, "claw-secrets", &mut missing);
        assert!(missing.is_empty(), "{}", missing.join("\n"));
    }
}
