//! The OpenClaw gateway flags `dev` and `agent` share: where the gateway is, how this node
//! pairs with it, and who calls through it act as (docs/architecture.md, "node.invoke through
//! the OpenClaw gateway").

use clap::Args;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use zeroize::Zeroizing;

use crate::invoke::gateway::{
    DeviceIdentity, Endpoint, GatewayConfig, GatewaySetup, GatewayStatus, SetupCode,
};

#[derive(Debug, Clone, Args)]
pub struct GatewayArgs {
    /// Also serve node.invoke as a node of this OpenClaw gateway (ws://HOST:PORT, or wss://
    /// beyond loopback), beside HTTP. The node id callers name is printed at start and shown
    /// by /readyz: the hex SHA-256 of the node's device key, kept in the data dir.
    #[arg(long, value_name = "URL", env = "CLAW_SECRETS_GATEWAY")]
    pub gateway: Option<String>,
    /// The gateway's auth token (gateway.auth.token), read from this file. Used to pair the
    /// first time (the command surface then waits for `openclaw nodes approve`); the device
    /// token the gateway issues is saved and used from then on.
    #[arg(long, value_name = "PATH", env = "CLAW_SECRETS_GATEWAY_TOKEN_FILE")]
    pub gateway_token_file: Option<PathBuf>,
    /// A setup code for nodes (`openclaw gateway call device.pair.setupCode --params
    /// '{"bootstrapProfile":"node"}'`): pairs this node and approves its commands with no one
    /// approving by hand. Single use, valid about 10 minutes; its URL is used when --gateway
    /// is not given.
    #[arg(
        long,
        value_name = "CODE",
        env = "CLAW_SECRETS_GATEWAY_SETUP_CODE",
        hide_env_values = true
    )]
    pub gateway_setup_code: Option<String>,
    /// CA certificates (PEM) to verify a wss:// gateway with, instead of the system's.
    #[arg(long, value_name = "PATH")]
    pub gateway_ca_file: Option<PathBuf>,
    /// Who calls through the gateway act as (the gateway does not pass on its callers'
    /// identities). dev: a subject of the tokens file (e.g. admin); agent: a ServiceAccount as
    /// NAMESPACE/NAME, whose RBAC is checked like any caller's. Required with --gateway.
    #[arg(long, value_name = "PRINCIPAL", env = "CLAW_SECRETS_GATEWAY_PRINCIPAL")]
    pub gateway_principal: Option<String>,
}

impl GatewayArgs {
    /// `None` without --gateway or --gateway-setup-code; the node's identity is created in
    /// `data_dir` on first use.
    pub fn setup(
        &self,
        data_dir: &Path,
        display_name: String,
    ) -> Result<Option<GatewaySetup>, String> {
        let setup_code = self
            .gateway_setup_code
            .as_deref()
            .filter(|c| !c.trim().is_empty())
            .map(SetupCode::parse)
            .transpose()
            .map_err(|e| format!("--gateway-setup-code: {e}"))?;
        let url = match (
            &self.gateway,
            setup_code.as_ref().and_then(|c| c.url.clone()),
        ) {
            (Some(url), _) => url.clone(),
            (None, Some(url)) => url,
            (None, None) if setup_code.is_some() => {
                return Err("--gateway-setup-code holds no URL: pass --gateway too".to_owned());
            }
            (None, None) => {
                for (set, flag) in [
                    (self.gateway_token_file.is_some(), "--gateway-token-file"),
                    (self.gateway_ca_file.is_some(), "--gateway-ca-file"),
                    (self.gateway_principal.is_some(), "--gateway-principal"),
                ] {
                    if set {
                        return Err(format!("{flag} needs --gateway (the gateway's URL)"));
                    }
                }
                return Ok(None);
            }
        };
        let principal = self.gateway_principal.clone().ok_or_else(|| {
            "--gateway needs --gateway-principal: who calls through the gateway act as (dev: a subject of the tokens file, e.g. admin; agent: a ServiceAccount NAMESPACE/NAME)".to_owned()
        })?;
        let endpoint =
            Endpoint::parse(&url, self.gateway_ca_file.as_deref()).map_err(|e| e.to_string())?;
        let gateway_token = match &self.gateway_token_file {
            None => None,
            Some(path) => {
                let bytes = Zeroizing::new(
                    std::fs::read(path)
                        .map_err(|e| format!("--gateway-token-file {}: {e}", path.display()))?,
                );
                let token = std::str::from_utf8(&bytes)
                    .map_err(|_| format!("--gateway-token-file {}: not text", path.display()))?
                    .trim();
                if token.is_empty() {
                    return Err(format!("--gateway-token-file {} is empty", path.display()));
                }
                Some(Zeroizing::new(token.to_owned()))
            }
        };
        let identity = DeviceIdentity::load_or_create(data_dir).map_err(|e| e.to_string())?;
        let status = Arc::new(GatewayStatus::new(&identity, &endpoint));
        Ok(Some(GatewaySetup {
            config: GatewayConfig {
                endpoint,
                gateway_token,
                setup_code,
                display_name,
            },
            identity,
            status,
            principal,
        }))
    }
}
