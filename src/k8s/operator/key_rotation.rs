//! Scheduled rotation of the master key: once the active key has been active for
//! `--key-rotation-period` (default 30 days, as Sealed Secrets renews its key), the leader makes
//! a new key active (`crate::k8s::keyring::rotate`, the same write as `claw-secrets keys
//! rotate`). When the key was made active is an annotation on the keyring Secret, so the
//! schedule survives restarts and leader changes. Every replica then follows the Secret, and
//! re-encryption moves every ClawSecret to the new key.

use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::Context;
use crate::k8s::keyring;

/// Checked at least this often (a period changed by a restart, a rotation by hand).
const RECHECK: Duration = Duration::from_secs(3600);

pub async fn run(
    ctx: Arc<Context>,
    namespace: String,
    name: String,
    kms: Option<crate::kms::KmsPlugin>,
    period: Duration,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let wait = match keyring::last_rotation(&ctx.client, &namespace, &name).await {
            Ok(Some(at)) => {
                let age = jiff::Timestamp::now().duration_since(at).unsigned_abs();
                if age >= period {
                    match keyring::rotate(&ctx.client, &namespace, &name, kms.as_ref()).await {
                        Ok((retired, active)) => {
                            tracing::info!(%retired, %active, period_s = period.as_secs(),
                                "rotated the master key on schedule");
                            ctx.keyring_event(
                                "KeyRotated",
                                "Rotate",
                                format!(
                                    "master key {active} is active, {retired} retired after {} days (--key-rotation-period); every ClawSecret is re-encrypted under {active}",
                                    age.as_secs() / 86_400
                                ),
                            )
                            .await;
                            period.min(RECHECK)
                        }
                        Err(e) => {
                            // A 409: rotated by someone else meanwhile; look again soon.
                            tracing::warn!(error = %e, "scheduled master key rotation failed; retrying");
                            Duration::from_secs(30)
                        }
                    }
                } else {
                    (period - age).min(RECHECK)
                }
            }
            Ok(None) => Duration::from_secs(60),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the keyring Secret for its rotation schedule");
                Duration::from_secs(60)
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}
