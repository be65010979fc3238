//! `--kms-plugin`: the KMS v2 plugin that wraps the master keyring in its Secret (operator,
//! agent without deliveries, `keys rotate|prune`; docs/crypto.md, "Keyring").

use clap::Args;

use crate::kms::{CALL_TIMEOUT, KmsPlugin};

#[derive(Debug, Clone, Args)]
pub struct KmsArgs {
    /// The KMS v2 plugin (the Kubernetes KMS plugin API) that wraps the master keyring:
    /// unix:///path/to/plugin.sock or a socket path. The keyring Secret then holds only the
    /// plugin's encryption of the keyring (data key keyring.kms.json), and every reader of the
    /// keyring needs this flag; an operator given it wraps a plaintext keyring in place.
    #[arg(long, env = "CLAW_SECRETS_KMS_PLUGIN", value_name = "ENDPOINT")]
    pub kms_plugin: Option<String>,
}

impl KmsArgs {
    /// The plugin, not contacted yet; `Err` for an endpoint that is not a Unix socket.
    pub fn plugin(&self) -> Result<Option<KmsPlugin>, String> {
        self.kms_plugin
            .as_deref()
            .filter(|e| !e.is_empty())
            .map(|e| KmsPlugin::new(e, CALL_TIMEOUT).map_err(|e| e.to_string()))
            .transpose()
    }
}

/// Asks the plugin for its `Status` and logs it; `Err` unless it is a healthy v2 plugin.
pub async fn check(plugin: &KmsPlugin) -> Result<(), String> {
    let status = plugin.check().await.map_err(|e| e.to_string())?;
    tracing::info!(endpoint = %plugin.endpoint(), version = %status.version,
        kms_key_id = %status.key_id, "KMS plugin healthy; the master keyring is wrapped with it");
    Ok(())
}
