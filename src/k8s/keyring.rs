//! The master keyring in Kubernetes: a Secret in the operator's namespace, created by the
//! operator on first start. Agents read it and keep a 0600 copy in their data directory so
//! they can open secrets while the API server is unreachable (see docs/crypto.md).
//!
//! With a KMS v2 plugin (`--kms-plugin`), the Secret holds the keyring only wrapped by the
//! plugin ([`KMS_KEYRING_KEY`]), never in plaintext: every function here that reads the keyring
//! decrypts it through the plugin, every one that writes it encrypts it, and
//! [`load_or_create`] wraps a plaintext keyring it finds (the migration). Without a plugin, a
//! wrapped keyring is refused with [`KeyringError::Wrapped`].

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::BTreeMap;
use zeroize::Zeroize;

use crate::crypto::{Keyring, SharedKeyring};
use crate::kms::{KmsError, KmsPlugin, Wrapped};

/// The data key inside the Secret that holds the keyring document.
pub const KEYRING_KEY: &str = "keyring.json";

/// The data key that holds instead the keyring document wrapped by a KMS plugin: the plugin's
/// `EncryptResponse` of it (see [`Wrapped`]). A Secret has one or the other.
pub const KMS_KEYRING_KEY: &str = "keyring.kms.json";

/// The annotation on the keyring Secret saying when its active key was made active (absent:
/// since the Secret was created).
pub const ROTATED_AT: &str = "clawbernetes.io/key-rotated-at";

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("reading master key Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        #[source]
        source: kube::Error,
    },
    #[error(
        "master key Secret {namespace}/{name} does not exist; start the operator first (it creates it) or name an existing Secret"
    )]
    Missing { namespace: String, name: String },
    #[error(
        "master key Secret {namespace}/{name} has no valid keyring ({KEYRING_KEY}, or {KMS_KEYRING_KEY} with --kms-plugin): {reason}"
    )]
    Invalid {
        namespace: String,
        name: String,
        reason: String,
    },
    #[error(
        "master key Secret {namespace}/{name} holds the keyring wrapped by a KMS plugin ({KMS_KEYRING_KEY}); start with --kms-plugin unix:///path/to/plugin.sock (or CLAW_SECRETS_KMS_PLUGIN) naming the operator's KMS v2 plugin"
    )]
    Wrapped { namespace: String, name: String },
    #[error("master key Secret {namespace}/{name}: {source}")]
    Kms {
        namespace: String,
        name: String,
        #[source]
        source: KmsError,
    },
}

impl KeyringError {
    /// Worth trying again as it is: the API server or the KMS plugin could not be reached or
    /// did not answer in time.
    pub fn is_transient(&self) -> bool {
        match self {
            KeyringError::Api { .. } => true,
            KeyringError::Kms { source, .. } => matches!(
                source,
                KmsError::Connect { .. } | KmsError::Timeout { .. } | KmsError::Transport { .. }
            ),
            _ => false,
        }
    }

    fn is_conflict(&self) -> bool {
        matches!(self, KeyringError::Api { source: kube::Error::Api(status), .. } if status.code == 409)
    }
}

/// An API error about the keyring Secret `namespace/name`.
fn api_error<'a>(namespace: &'a str, name: &'a str) -> impl Fn(kube::Error) -> KeyringError + 'a {
    move |source| KeyringError::Api {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    }
}

fn kms_error<'a>(namespace: &'a str, name: &'a str) -> impl Fn(KmsError) -> KeyringError + 'a {
    move |source| KeyringError::Kms {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    }
}

/// The keyring a Secret holds, decrypted through `kms` if it is wrapped; and whether it was.
async fn open(
    secret: &Secret,
    namespace: &str,
    name: &str,
    kms: Option<&KmsPlugin>,
) -> Result<(Keyring, bool), KeyringError> {
    let invalid = |reason: String| KeyringError::Invalid {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    let data = secret.data.as_ref();
    if let Some(wrapped) = data.and_then(|d| d.get(KMS_KEYRING_KEY)) {
        let Some(kms) = kms else {
            return Err(KeyringError::Wrapped {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            });
        };
        let wrapped = Wrapped::from_json(&wrapped.0).map_err(|e| invalid(e.to_string()))?;
        let json = kms
            .unwrap_key(&wrapped)
            .await
            .map_err(kms_error(namespace, name))?;
        return Keyring::from_json(&json)
            .map(|ring| (ring, true))
            .map_err(|e| invalid(format!("{KMS_KEYRING_KEY} decrypts to no keyring: {e}")));
    }
    let bytes = data
        .and_then(|d| d.get(KEYRING_KEY))
        .ok_or_else(|| invalid("missing".to_owned()))?;
    Keyring::from_json(&bytes.0)
        .map(|ring| (ring, false))
        .map_err(|e| invalid(e.to_string()))
}

/// What to store of `ring` in a keyring Secret's data: wrapped by `kms` under
/// [`KMS_KEYRING_KEY`] (and no [`KEYRING_KEY`]), else in plaintext under [`KEYRING_KEY`].
async fn store(
    data: &mut BTreeMap<String, ByteString>,
    ring: &Keyring,
    namespace: &str,
    name: &str,
    kms: Option<&KmsPlugin>,
) -> Result<(), KeyringError> {
    match kms {
        Some(kms) => {
            let wrapped = kms
                .wrap(&ring.to_json())
                .await
                .map_err(kms_error(namespace, name))?;
            data.insert(KMS_KEYRING_KEY.to_owned(), ByteString(wrapped.to_json()));
            if let Some(mut plain) = data.remove(KEYRING_KEY) {
                plain.0.zeroize();
            }
        }
        None => {
            data.insert(KEYRING_KEY.to_owned(), ByteString(ring.to_json().to_vec()));
        }
    }
    Ok(())
}

/// Reads the keyring Secret; `Ok(None)` if it does not exist. Returns the Secret (its key
/// bytes wiped, its `resourceVersion` kept for a conditional write back), the keyring, and
/// whether it was wrapped.
async fn read(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    kms: Option<&KmsPlugin>,
) -> Result<Option<(Secret, Keyring, bool)>, KeyringError> {
    let Some(mut secret) = api
        .get_opt(name)
        .await
        .map_err(api_error(namespace, name))?
    else {
        return Ok(None);
    };
    let opened = open(&secret, namespace, name, kms).await;
    wipe(&mut secret);
    let (ring, wrapped) = opened?;
    Ok(Some((secret, ring, wrapped)))
}

/// Reads the keyring Secret; `Ok(None)` if it does not exist. A wrapped keyring is decrypted
/// through `kms` (and refused without one).
pub async fn load(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    kms: Option<&KmsPlugin>,
) -> Result<Option<Keyring>, KeyringError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    Ok(read(&api, namespace, name, kms)
        .await?
        .map(|(_, ring, _)| ring))
}

/// Overwrites the key bytes a Secret object holds (the response it was read from, or the
/// object written), so no copy of the keyring outlives its use in this process's heap.
fn wipe(secret: &mut Secret) {
    for value in secret.data.iter_mut().flat_map(|d| d.values_mut()) {
        value.0.zeroize();
    }
}

/// How [`load_or_create`] came by the keyring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Read as it was.
    Loaded,
    /// Created (first start).
    Created,
    /// Found in plaintext and wrapped in place with the KMS plugin.
    Wrapped,
}

/// Reads the keyring Secret, creating it with a fresh key if it does not exist. Safe for
/// several replicas at once: creation is atomic, and the loser reads the winner's key. With
/// `kms`, a keyring found in plaintext is wrapped in place (a write conditional on the
/// Secret's `resourceVersion` that removes the plaintext), and one created is created wrapped.
pub async fn load_or_create(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    kms: Option<&KmsPlugin>,
) -> Result<(Keyring, Origin), KeyringError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let written = match read(&api, namespace, name, kms).await? {
            Some((secret, ring, wrapped)) => match kms {
                Some(kms) if !wrapped => {
                    write_back(&api, namespace, name, secret, &ring, Some(kms))
                        .await
                        .map(|()| (ring, Origin::Wrapped))
                }
                _ => return Ok((ring, Origin::Loaded)),
            },
            None => create(&api, namespace, name, kms)
                .await
                .map(|ring| (ring, Origin::Created)),
        };
        match written {
            // Created or wrapped by another replica meanwhile: read what it wrote.
            Err(e) if e.is_conflict() && attempts < 5 => continue,
            other => return other,
        }
    }
}

/// Creates the keyring Secret with a fresh keyring (a 409 if it exists).
async fn create(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    kms: Option<&KmsPlugin>,
) -> Result<Keyring, KeyringError> {
    let ring = Keyring::generate().map_err(|e| KeyringError::Invalid {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    let mut data = BTreeMap::new();
    store(&mut data, &ring, namespace, name, kms).await?;
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            namespace: Some(namespace.to_owned()),
            labels: Some(BTreeMap::from([(
                "app.kubernetes.io/name".to_owned(),
                "claw-secrets".to_owned(),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".to_owned()),
        data: Some(data),
        ..Secret::default()
    };
    let created = api.create(&PostParams::default(), &secret).await;
    wipe(&mut secret);
    created
        .map(|mut s| wipe(&mut s))
        .map_err(api_error(namespace, name))?;
    Ok(ring)
}

/// Keeps `keys` equal to the keyring Secret `namespace/name` for the life of the process: a
/// watch of that one Secret (RBAC: `list` and `watch` limited to its name), and each version of
/// it that differs from the keyring held replaces it, after which `changed` is called with the
/// new keyring. A version that cannot be read is logged and the keyring held is kept: sealing
/// goes on under a key that still opens, rather than stop. A wrapped keyring is decrypted
/// through `kms` only when its wrapped text changes (not again at each re-list of the watch).
pub async fn follow<F, Fut>(
    client: kube::Client,
    namespace: String,
    name: String,
    kms: Option<KmsPlugin>,
    keys: SharedKeyring,
    changed: F,
) where
    F: Fn(std::sync::Arc<Keyring>) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    use futures::StreamExt;
    use kube::runtime::{WatchStreamExt, watcher};
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    let mut versions = std::pin::pin!(watcher(api, config).default_backoff().applied_objects());
    // The wrapped text whose keyring is held (not secret: only the KMS opens it).
    let mut held_wrapped: Option<Vec<u8>> = None;
    while let Some(version) = versions.next().await {
        let mut secret = match version {
            Ok(secret) => secret,
            Err(e) => {
                tracing::debug!(error = %e, "watching the keyring Secret; retrying");
                continue;
            }
        };
        let wrapped = secret
            .data
            .as_ref()
            .and_then(|d| d.get(KMS_KEYRING_KEY))
            .map(|w| w.0.clone());
        if kms.is_some() && wrapped.is_some() && wrapped == held_wrapped {
            wipe(&mut secret);
            continue;
        }
        // The KMS plugin unreachable: tried again (the watch would not bring this version back),
        // the keyring held used meanwhile.
        let mut delay = std::time::Duration::from_secs(1);
        let parsed = loop {
            match open(&secret, &namespace, &name, kms.as_ref()).await {
                Err(e) if e.is_transient() => {
                    tracing::warn!(error = %e, retry_in_s = delay.as_secs(),
                        "cannot open the keyring Secret's new version yet; keeping the keyring held");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(std::time::Duration::from_secs(30));
                }
                other => break other,
            }
        };
        wipe(&mut secret);
        match parsed {
            Ok((ring, _)) => {
                held_wrapped = wrapped;
                let active = ring.active().id().to_string();
                if keys.replace(ring) {
                    tracing::info!(secret = %format!("{namespace}/{name}"), active_key = %active,
                        keys = keys.current().key_ids().count(), "the master keyring changed; following it");
                    changed(keys.current()).await;
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "the keyring Secret changed to something unreadable; keeping the keyring held")
            }
        }
    }
}

/// Makes a new master key the keyring Secret's active key; the one it replaces stays as a
/// retired key (what it sealed must still open). The write is conditional on the Secret's
/// `resourceVersion`, so a rotation made meanwhile by someone else is never overwritten.
/// Returns the retired and the new active key ids.
pub async fn rotate(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    kms: Option<&KmsPlugin>,
) -> Result<(String, String), KeyringError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let (mut secret, mut ring) = read_for_update(&api, namespace, name, kms).await?;
    let retired = ring.active().id().to_string();
    let key = crate::crypto::MasterKey::generate().map_err(|e| KeyringError::Invalid {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    let active = key.id().to_string();
    ring.rotate_to(key);
    secret
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(ROTATED_AT.to_owned(), jiff::Timestamp::now().to_string());
    write_back(&api, namespace, name, secret, &ring, kms).await?;
    Ok((retired, active))
}

/// The keyring Secret as read for an update (its `resourceVersion` kept, so that the write
/// back is conditional on it), its key bytes wiped, and the keyring they held.
async fn read_for_update(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    kms: Option<&KmsPlugin>,
) -> Result<(Secret, Keyring), KeyringError> {
    read(api, namespace, name, kms)
        .await?
        .map(|(secret, ring, _)| (secret, ring))
        .ok_or_else(|| KeyringError::Missing {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
}

/// Writes `ring` into `secret` (wrapped by `kms` if given, see [`store`]) and replaces the
/// Secret with it: a 409 if the Secret changed since it was read. Every copy of the key bytes
/// this makes is wiped.
async fn write_back(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    mut secret: Secret,
    ring: &Keyring,
    kms: Option<&KmsPlugin>,
) -> Result<(), KeyringError> {
    store(
        secret.data.get_or_insert_with(BTreeMap::new),
        ring,
        namespace,
        name,
        kms,
    )
    .await?;
    let written = api
        .replace(name, &PostParams::default(), &secret)
        .await
        .map(|mut s| wipe(&mut s));
    wipe(&mut secret);
    written.map_err(api_error(namespace, name))
}

/// When the keyring Secret's active key was made active: its [`ROTATED_AT`] annotation, else
/// the Secret's creation. `Ok(None)` if the Secret does not exist.
pub async fn last_rotation(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<jiff::Timestamp>, KeyringError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let Some(mut secret) = api
        .get_opt(name)
        .await
        .map_err(api_error(namespace, name))?
    else {
        return Ok(None);
    };
    wipe(&mut secret);
    let annotated = secret
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(ROTATED_AT))
        .and_then(|t| t.parse::<jiff::Timestamp>().ok());
    Ok(annotated.or(secret.metadata.creation_timestamp.map(|t| t.0)))
}

/// Removes from the keyring Secret every retired key not in `in_use` (the caller has checked
/// what still needs which key). The write is conditional on the Secret's `resourceVersion`.
/// Returns the ids removed (none: nothing written).
pub async fn prune(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    in_use: &std::collections::BTreeSet<String>,
    kms: Option<&KmsPlugin>,
) -> Result<Vec<String>, KeyringError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let (secret, mut ring) = read_for_update(&api, namespace, name, kms).await?;
    let unused: Vec<crate::crypto::KeyId> = ring
        .key_ids()
        .filter(|id| *id != ring.active().id() && !in_use.contains(id.as_str()))
        .cloned()
        .collect();
    let removed: Vec<String> = unused
        .into_iter()
        .filter(|id| ring.remove_retired(id))
        .map(|id| id.to_string())
        .collect();
    if !removed.is_empty() {
        write_back(&api, namespace, name, secret, &ring, kms).await?;
    }
    Ok(removed)
}
