//! `claw-secrets migrate-storage`: rewrite stored ClawSecrets and ClawConfigs in the CRDs'
//! storage version and prune `status.storedVersions` (docs/operator.md, "Versions").

use std::process::ExitCode;

use crate::k8s::component::Component;
use crate::k8s::migrate::migrate_storage;

pub fn run() -> ExitCode {
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
        match migrate_storage(&client).await {
            Ok(report) => {
                for m in report {
                    println!(
                        "{}: {} objects rewritten; status.storedVersions {:?} -> {:?}",
                        m.kind, m.objects, m.stored_before, m.stored_after
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
