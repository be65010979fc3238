//! `claw-secrets migrate-storage`: rewrite stored ClawSecrets and ClawConfigs in the CRDs'
//! storage version and prune `status.storedVersions` (docs/operator.md, "Versions").

use std::process::ExitCode;

use crate::k8s::migrate::migrate_storage;

pub fn run() -> ExitCode {
    super::with_cluster(|client| async move {
        let report = migrate_storage(&client).await.map_err(|e| e.to_string())?;
        for m in report {
            println!(
                "{}: {} objects rewritten; status.storedVersions {:?} -> {:?}",
                m.kind, m.objects, m.stored_before, m.stored_after
            );
        }
        Ok(())
    })
}
