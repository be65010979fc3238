//! The node's lasting identity on the gateway, kept in the data dir: its Ed25519 device key
//! (`gateway/device.json`, 0600; the node id is derived from it, so it survives restarts) and
//! the device token the gateway issued at pairing (`gateway/device-token`, 0600), which later
//! connections present instead of the gateway token or a setup code.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use zeroize::Zeroizing;

use super::GatewayError;
use crate::crypto::DeviceKey;
use crate::store::{create_private_dir, ensure_private_file, write_private_file_atomic};

const DIR: &str = "gateway";
const KEY_FILE: &str = "device.json";
const TOKEN_FILE: &str = "device-token";

/// `device.json`. The public key and device id are there for people (and checked on load, so a
/// damaged file is noticed rather than becoming another node).
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct KeyFile {
    algorithm: String,
    /// The 32-byte Ed25519 seed, unpadded base64url.
    private_key: Zeroizing<String>,
    public_key: String,
    device_id: String,
}

pub struct DeviceIdentity {
    key: DeviceKey,
    dir: PathBuf,
}

impl DeviceIdentity {
    /// The identity saved in `data_dir`, or a new one saved there (first start).
    pub fn load_or_create(data_dir: &Path) -> Result<Self, GatewayError> {
        let dir = data_dir.join(DIR);
        create_private_dir(&dir).map_err(|e| GatewayError::Identity(e.to_string()))?;
        let path = dir.join(KEY_FILE);
        ensure_private_file(&path).map_err(|e| GatewayError::Identity(e.to_string()))?;
        let key = match std::fs::read(&path) {
            Ok(bytes) => read_key(&Zeroizing::new(bytes))
                .map_err(|why| GatewayError::Identity(format!("{}: {why}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key =
                    DeviceKey::generate().map_err(|e| GatewayError::Identity(e.to_string()))?;
                let file = KeyFile {
                    algorithm: "Ed25519".to_owned(),
                    private_key: Zeroizing::new(B64URL.encode(key.seed().as_ref())),
                    public_key: key.public_key_base64url(),
                    device_id: key.device_id(),
                };
                let text = Zeroizing::new(serde_json::to_vec_pretty(&file).expect("json"));
                write_private_file_atomic(&path, &text)
                    .map_err(|e| GatewayError::Identity(e.to_string()))?;
                key
            }
            Err(e) => {
                return Err(GatewayError::Identity(format!(
                    "cannot read {}: {e}",
                    path.display()
                )));
            }
        };
        Ok(DeviceIdentity { key, dir })
    }

    pub fn key(&self) -> &DeviceKey {
        &self.key
    }

    /// The node id callers name in `node.invoke` (the device id).
    pub fn node_id(&self) -> String {
        self.key.device_id()
    }

    /// The device token saved at the last pairing, if any.
    pub fn device_token(&self) -> Option<Zeroizing<String>> {
        let path = self.dir.join(TOKEN_FILE);
        ensure_private_file(&path).ok()?;
        let bytes = Zeroizing::new(std::fs::read(&path).ok()?);
        let text = std::str::from_utf8(&bytes).ok()?.trim();
        (!text.is_empty()).then(|| Zeroizing::new(text.to_owned()))
    }

    pub fn save_device_token(&self, token: &str) -> Result<(), GatewayError> {
        write_private_file_atomic(&self.dir.join(TOKEN_FILE), token.as_bytes())
            .map_err(|e| GatewayError::Identity(e.to_string()))
    }
}

fn read_key(bytes: &[u8]) -> Result<DeviceKey, String> {
    let file: KeyFile = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "not a device key file ({})",
            crate::invoke::sanitize_serde_message(&e.to_string())
        )
    })?;
    if file.algorithm != "Ed25519" {
        return Err(format!("algorithm {:?} is not Ed25519", file.algorithm));
    }
    let seed = Zeroizing::new(
        B64URL
            .decode(file.private_key.as_bytes())
            .map_err(|_| "privateKey is not unpadded base64url".to_owned())?,
    );
    let seed: &[u8; 32] = seed
        .as_slice()
        .try_into()
        .map_err(|_| "privateKey is not 32 bytes".to_owned())?;
    let key = DeviceKey::from_seed(seed);
    if key.public_key_base64url() != file.public_key || key.device_id() != file.device_id {
        return Err(
            "publicKey or deviceId does not match privateKey: the file is damaged; restore it from a backup, or remove it to pair as a new node"
                .to_owned(),
        );
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn the_identity_is_created_once_private_and_reloaded_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let first = DeviceIdentity::load_or_create(dir.path()).unwrap();
        let path = dir.path().join("gateway/device.json");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let again = DeviceIdentity::load_or_create(dir.path()).unwrap();
        assert_eq!(first.node_id(), again.node_id());
        assert_eq!(first.node_id().len(), 64);

        assert!(first.device_token().is_none());
        first.save_device_token("tok-1").unwrap();
        assert_eq!(
            again.device_token().as_deref().map(String::as_str),
            Some("tok-1")
        );
        assert_eq!(
            std::fs::metadata(dir.path().join("gateway/device-token"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }

    #[test]
    fn a_damaged_or_exposed_identity_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        DeviceIdentity::load_or_create(dir.path()).unwrap();
        let path = dir.path().join("gateway/device.json");
        let mut file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        file["deviceId"] = serde_json::json!("00");
        std::fs::write(&path, file.to_string()).unwrap();
        let err = DeviceIdentity::load_or_create(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("does not match"), "{err}");

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = DeviceIdentity::load_or_create(dir.path())
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("644") || err.contains("others"), "{err}");
    }
}
