use clap::Subcommand;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Check a log's hash chain: prints OK with the record count and head hash, or the first
    /// broken record, and exits 1.
    Verify {
        /// The audit log, e.g. <data-dir>/audit.log.
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
