use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::backends::local::tokens::{TokenEntry, add_token};
use crate::domain::{Namespace, Workload};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a bearer token for a workload (read-only, scoped by allowed_workloads) or an admin,
    /// and print it. The running server picks it up at once.
    Create {
        /// The dev server's data directory.
        #[arg(long, default_value_os_t = super::default_data_dir())]
        data_dir: PathBuf,
        /// The workload the token stands for (checked against allowed_workloads).
        #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
        workload: Option<String>,
        /// The workload's namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Create an admin token instead (every command).
        #[arg(long)]
        admin: bool,
    },
}

pub fn run(cmd: TokenCommand) -> ExitCode {
    let TokenCommand::Create {
        data_dir,
        workload,
        namespace,
        admin,
    } = cmd;
    let namespace = match Namespace::parse(&namespace) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("INVALID_ARGUMENT: {e}");
            return ExitCode::from(2);
        }
    };
    let workload = match workload.as_deref().map(Workload::parse).transpose() {
        Ok(w) => w,
        Err(e) => {
            eprintln!("INVALID_ARGUMENT: {e}");
            return ExitCode::from(2);
        }
    };
    let subject = match &workload {
        Some(w) => format!("workload:{namespace}/{w}"),
        None => "admin".to_owned(),
    };
    let entry = TokenEntry {
        sha256: String::new(),
        subject,
        namespace: Some(namespace),
        workload,
        admin,
    };
    if let Err(e) = crate::store::create_private_dir(&data_dir) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    match add_token(&data_dir.join("tokens.json"), entry) {
        Ok(token) => {
            println!("{}", token.as_str());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
