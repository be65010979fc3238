//! `claw-secrets agent`: the per-node agent (a DaemonSet in a cluster).

use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::k8s::agent::{AgentConfig, run};

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
    /// Address for node.invoke (plain HTTP).
    #[arg(long, default_value = "0.0.0.0:7443")]
    listen: SocketAddr,
    /// The master key Secret the operator creates, as NAMESPACE/NAME.
    #[arg(long, default_value = "claw-secrets/claw-secrets-master-key")]
    master_key_secret: String,
}

pub fn run_cli(args: AgentArgs) -> ExitCode {
    let Some((ns, name)) = args.master_key_secret.split_once('/') else {
        eprintln!("usage error: --master-key-secret must be NAMESPACE/NAME");
        return ExitCode::from(2);
    };
    let config = AgentConfig {
        node_name: args.node_name,
        data_dir: args.data_dir,
        listen: args.listen,
        master_key_namespace: ns.to_owned(),
        master_key_secret: name.to_owned(),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Building a client reads the kubeconfig (or the in-cluster account) only; it does not
        // contact the API server, so an agent starts serving reads while the server is down.
        let client = match kube::Client::try_default().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: no Kubernetes credentials (KUBECONFIG or in-cluster): {e}");
                return ExitCode::FAILURE;
            }
        };
        match run(client, config, super::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
