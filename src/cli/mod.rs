//! The `claw-secrets` command line: wiring only; behaviour lives in the layers below.

mod agent;
mod audit;
mod dev;
mod invoke;
mod operator;
mod paths;
mod token;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

pub use paths::{ClientConfig, client_config_path, default_data_dir};

/// Secrets and configuration manager for Clawbernetes nodes.
///
/// Start a local server with `claw-secrets dev`, then call it with
/// `claw-secrets invoke local secret.create '{"name":"db.password","data":{"password":"s3cret"}}'`.
#[derive(Debug, Parser)]
#[command(name = "claw-secrets", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Debug, Subcommand)]
enum Commands {
    /// Run the node.invoke API on this machine, backed by an encrypted local store.
    Dev(dev::DevArgs),
    /// Call a node's node.invoke API: `claw-secrets invoke <node-id> <command> '<json params>'`.
    Invoke(invoke::InvokeArgs),
    /// Work with audit logs.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// Manage dev-mode bearer tokens.
    #[command(subcommand)]
    Token(token::TokenCommand),
    /// Run the node agent: mirror this node's secrets and configs, serve node.invoke.
    Agent(agent::AgentArgs),
    /// Run the operator: seal ClawSecrets, guard ClawConfigs, keep their status and Events
    /// (leader-elected; run several replicas for failover).
    Operator(operator::OperatorArgs),
    /// Print the ClawSecret and ClawConfig CustomResourceDefinitions as YAML
    /// (`claw-secrets crd | kubectl apply -f -`).
    Crd,
}

/// Logs go to stderr; `CLAW_SECRETS_LOG` (or `RUST_LOG`) sets the filter, default `info`.
fn init_logging() {
    let filter = std::env::var("CLAW_SECRETS_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| "info".to_owned());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Commands::Dev(args) => {
            init_logging();
            dev::run(args)
        }
        Commands::Invoke(args) => invoke::run(args),
        Commands::Audit(cmd) => audit::run(cmd),
        Commands::Token(cmd) => token::run(cmd),
        Commands::Agent(args) => {
            init_logging();
            agent::run_cli(args)
        }
        Commands::Operator(args) => {
            init_logging();
            operator::run_cli(args)
        }
        Commands::Crd => {
            print!("{}", crate::k8s::crd::crds_yaml());
            ExitCode::SUCCESS
        }
    }
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
