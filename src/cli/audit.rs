use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check an audit log's hash chain and report the first broken record
    ///
    /// Checks an audit log's hash chain. Each record is one JSON line (who, what, which secret
    /// and version, the decision, never a value) carrying the hash of the record before it, so
    /// an edited, removed or reordered record breaks the chain. Prints `OK: N records, chain
    /// intact; head HASH` and exits 0, or `BROKEN: FILE: ...` naming the first bad line and
    /// exits 1. It only reads the file.
    ///
    /// Audit logs live in a data directory: `claw-secrets dev` writes <data-dir>/audit.log
    /// (default ~/.local/share/claw-secrets/dev/audit.log), and every agent writes its node's
    /// log to <data-dir>/audit.log on that node (default /var/lib/claw-secrets/audit.log).
    /// Keep the head hash somewhere else to detect a log cut short at its end.
    #[command(after_help = "Examples:
  claw-secrets audit verify ~/.local/share/claw-secrets/dev/audit.log
  claw-secrets audit verify /var/lib/claw-secrets/audit.log      # on a node, as root")]
    Verify {
        /// The audit log to check, e.g. <data-dir>/audit.log (no default).
        file: PathBuf,
    },
}

pub fn run(cmd: AuditCommand) -> ExitCode {
    match cmd {
        AuditCommand::Verify { file } => match crate::audit::verify(&file) {
            Ok(report) => {
                println!(
                    "OK: {} records, chain intact; head {}",
                    report.records, report.head
                );
                ExitCode::SUCCESS
            }
            Err(failure) => {
                eprintln!("BROKEN: {}: {failure}", file.display());
                ExitCode::FAILURE
            }
        },
    }
}
