use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

use crate::backends::local::tokens::{TokenEntry, add_token};
use crate::domain::{Namespace, Workload};

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a dev-mode bearer token for a workload or an admin, and print it
    ///
    /// Creates a bearer token for `claw-secrets dev`, prints it on stdout and adds its SHA-256
    /// (never the token itself) to <data-dir>/tokens.json; a running dev server accepts it at
    /// once, no restart needed. A workload token may only read, in its own namespace: configs,
    /// and the secrets whose allowed_workloads are empty or name the workload. An admin token
    /// may run every command in every namespace. The token is printed once and stored nowhere:
    /// keep it.
    ///
    /// Dev mode only. In Kubernetes, callers use their ServiceAccount tokens (for example
    /// `kubectl create token api-server -n team-a`) and RBAC instead.
    #[command(after_help = r#"Examples:
  export API_TOKEN=$(claw-secrets token create --workload api-server)
  claw-secrets invoke local secret.get '{"name":"db.password"}' --token "$API_TOKEN"
  claw-secrets token create --workload worker --namespace team-a
  claw-secrets token create --admin --data-dir /tmp/claw-dev"#)]
    Create {
        /// The dev server's data directory: the same --data-dir (or CLAW_SECRETS_DATA_DIR) as
        /// `claw-secrets dev`.
        #[arg(long, env = "CLAW_SECRETS_DATA_DIR", default_value_os_t = super::default_data_dir())]
        data_dir: PathBuf,
        /// The workload name the token stands for, matched against each secret's
        /// allowed_workloads; required unless --admin.
        #[arg(long, conflicts_with = "admin", required_unless_present = "admin")]
        workload: Option<String>,
        /// The workload's namespace.
        #[arg(long, default_value = "default")]
        namespace: String,
        /// Create an admin token instead: it may run every command, in every namespace.
        #[arg(long)]
        admin: bool,
        /// Who holds the admin token, as the audit log names its calls (default: admin). Give
        /// each person or tool its own, so the log tells them apart.
        #[arg(long, requires = "admin")]
        subject: Option<String>,
    },
}

pub fn run(cmd: TokenCommand) -> ExitCode {
    let TokenCommand::Create {
        data_dir,
        workload,
        namespace,
        admin,
        subject,
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
    if let Some(s) = &subject
        && (s.is_empty() || s.len() > 253 || !s.chars().all(|c| c.is_ascii_graphic()))
    {
        eprintln!(
            "INVALID_ARGUMENT: --subject must be 1-253 printable ASCII characters without spaces"
        );
        return ExitCode::from(2);
    }
    let subject = match (&workload, subject) {
        (Some(w), _) => format!("workload:{namespace}/{w}"),
        (None, Some(s)) => s,
        (None, None) => "admin".to_owned(),
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
