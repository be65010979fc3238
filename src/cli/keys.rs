//! `claw-secrets keys`: the master keyring's lifecycle in a cluster (docs/crypto.md, "Keyring").

use clap::Subcommand;
use std::process::ExitCode;

use crate::k8s::component::Component;

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new master key active; the current one is kept, retired, to open what it sealed
    ///
    /// Writes a new key into the keyring Secret and makes it active (a write conditional on the
    /// Secret's resourceVersion: a rotation made meanwhile is never overwritten). The operator
    /// and the agents follow at once: from then on everything is sealed under the new key, and
    /// the operator re-encrypts every ClawSecret still under the old one in the background
    /// (progress: the claw_secrets_operator_sealed_objects metric, and a Reencrypted Event on
    /// the Secret when done). Credentials: KUBECONFIG, else the in-cluster account; it needs
    /// get and update on that Secret.
    #[command(after_help = "Example:
  claw-secrets keys rotate --namespace claw-secrets")]
    Rotate {
        /// The operator's namespace, where the keyring Secret is.
        #[arg(long, default_value = "claw-secrets")]
        namespace: String,
        /// The keyring Secret.
        #[arg(long, default_value = "claw-secrets-master-key")]
        secret: String,
    },
}

pub fn run(cmd: KeysCommand) -> ExitCode {
    let KeysCommand::Rotate { namespace, secret } = cmd;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let client = match Component::Cli.client().await {
            Ok(c) => c,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        };
        match crate::k8s::keyring::rotate(&client, &namespace, &secret).await {
            Ok((retired, active)) => {
                println!(
                    "master key {active} is active in {namespace}/{secret}; {retired} is retired (kept to open what it sealed)"
                );
                println!(
                    "the operator re-encrypts every ClawSecret under {retired} in the background: watch claw_secrets_operator_sealed_objects{{key_id=\"{retired}\"}} fall to 0, or the Reencrypted Event on the Secret"
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
