//! `claw-secrets invoke <node-id> <command> '<json params>'`.

use clap::Args;
use serde_json::Value;
use std::io::Read;
use std::path::PathBuf;
use std::process::ExitCode;

use super::{ClientConfig, client_config_path};
use crate::invoke::{ClientError, InvokeClient};

#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The node to call: the id `claw-secrets dev` printed, or `local`.
    node_id: String,
    /// One of secret.create, secret.get, secret.delete, secret.list, secret.rotate,
    /// config.create, config.get, config.update, config.delete, config.list.
    command: String,
    /// The command's parameters as JSON; `-` reads them from stdin (keeps values out of shell history).
    #[arg(default_value = "{}")]
    params: String,
    /// Server address (default: $CLAW_SECRETS_ADDR, then what `claw-secrets dev` wrote).
    #[arg(long)]
    addr: Option<String>,
    /// Bearer token (default: $CLAW_SECRETS_TOKEN, then --token-file, then dev's admin token).
    #[arg(long)]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Makes retrying this write safe: the server applies it once.
    #[arg(long)]
    idempotency_key: Option<String>,
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("usage error: {msg}");
    ExitCode::from(2)
}

fn read_token_file(path: &std::path::Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))
}

pub fn run(args: InvokeArgs) -> ExitCode {
    let raw = if args.params == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            return usage(format!("cannot read params from stdin: {e}"));
        }
        s
    } else {
        args.params.clone()
    };
    let params: Value = match serde_json::from_str(&raw) {
        Ok(v) => v,
        Err(e) => {
            return usage(format!(
                "params are not valid JSON (line {}, column {}); quote them in single quotes: '{{\"name\":\"x\"}}'",
                e.line(),
                e.column()
            ));
        }
    };

    let dev_config: Option<ClientConfig> = std::fs::read(client_config_path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let addr = args
        .addr
        .or_else(|| std::env::var("CLAW_SECRETS_ADDR").ok())
        .or_else(|| dev_config.as_ref().map(|c| c.addr.clone()));
    let Some(addr) = addr else {
        return usage(
            "no server address: pass --addr, set CLAW_SECRETS_ADDR, or start `claw-secrets dev`",
        );
    };
    let token = match (&args.token, std::env::var("CLAW_SECRETS_TOKEN").ok(), &args.token_file) {
        (Some(t), _, _) => Ok(t.clone()),
        (None, Some(t), _) => Ok(t),
        (None, None, Some(f)) => read_token_file(f),
        (None, None, None) => match &dev_config {
            Some(c) => read_token_file(&c.token_file),
            None => Err("no token: pass --token or --token-file, set CLAW_SECRETS_TOKEN, or start `claw-secrets dev`".to_owned()),
        },
    };
    let token = match token {
        Ok(t) => t,
        Err(e) => return usage(e),
    };

    let client = match InvokeClient::new(&addr, &token) {
        Ok(c) => c,
        Err(e) => return usage(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("INTERNAL: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(client.invoke(
        &args.node_id,
        &args.command,
        params,
        args.idempotency_key.as_deref(),
    ));
    match result {
        Ok(payload) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&payload).expect("json prints")
            );
            ExitCode::SUCCESS
        }
        Err(ClientError::Remote(err)) => {
            eprintln!("{}: {}", err.code, err.message);
            ExitCode::FAILURE
        }
        Err(ClientError::Usage(msg)) => usage(msg),
        Err(e) => {
            eprintln!("UNAVAILABLE: {e}");
            ExitCode::FAILURE
        }
    }
}
