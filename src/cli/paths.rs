//! Where dev mode keeps its state, and where it tells the CLI how to reach it.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

fn home() -> PathBuf {
    std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from)
}

/// `$XDG_DATA_HOME/claw-secrets/dev`, else `~/.local/share/claw-secrets/dev`.
pub fn default_data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map_or_else(|| home().join(".local/share"), PathBuf::from)
        .join("claw-secrets/dev")
}

/// `$XDG_CONFIG_HOME/claw-secrets/dev.json`, else `~/.config/claw-secrets/dev.json`.
pub fn client_config_path() -> PathBuf {
    std::env::var_os("XDG_CONFIG_HOME")
        .map_or_else(|| home().join(".config"), PathBuf::from)
        .join("claw-secrets/dev.json")
}

/// What `claw-secrets dev` writes for the current user so `claw-secrets invoke` finds it.
/// Holds the token's path, not the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClientConfig {
    pub addr: String,
    pub node_id: String,
    pub token_file: PathBuf,
    pub data_dir: PathBuf,
}
