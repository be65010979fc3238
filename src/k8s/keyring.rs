//! The master keyring in Kubernetes: a Secret in the operator's namespace, created by the
//! operator on first start. Agents read it and keep a 0600 copy in their data directory so
//! they can open secrets while the API server is unreachable (see docs/crypto.md).

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, PostParams};
use std::collections::BTreeMap;
use zeroize::Zeroize;

use crate::crypto::{Keyring, SharedKeyring};

/// The data key inside the Secret that holds the keyring document.
pub const KEYRING_KEY: &str = "keyring.json";

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
        "master key Secret {namespace}/{name} has no {KEYRING_KEY} entry or it is invalid: {reason}"
    )]
    Invalid {
        namespace: String,
        name: String,
        reason: String,
    },
}

/// An API error about the keyring Secret `namespace/name`.
fn api_error<'a>(namespace: &'a str, name: &'a str) -> impl Fn(kube::Error) -> KeyringError + 'a {
    move |source| KeyringError::Api {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        source,
    }
}

fn parse(secret: &Secret, namespace: &str, name: &str) -> Result<Keyring, KeyringError> {
    let invalid = |reason: String| KeyringError::Invalid {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason,
    };
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(KEYRING_KEY))
        .ok_or_else(|| invalid("missing".to_owned()))?;
    Keyring::from_json(&bytes.0).map_err(|e| invalid(e.to_string()))
}

/// Reads the keyring Secret; `Ok(None)` if it does not exist.
pub async fn load(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<Option<Keyring>, KeyringError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret = api
        .get_opt(name)
        .await
        .map_err(api_error(namespace, name))?;
    let Some(mut secret) = secret else {
        return Ok(None);
    };
    let parsed = parse(&secret, namespace, name);
    wipe(&mut secret);
    parsed.map(Some)
}

/// Overwrites the key bytes a Secret object holds (the response it was read from, or the
/// object written), so no copy of the keyring outlives its use in this process's heap.
fn wipe(secret: &mut Secret) {
    for value in secret.data.iter_mut().flat_map(|d| d.values_mut()) {
        value.0.zeroize();
    }
}

/// Reads the keyring Secret, creating it with a fresh key if it does not exist. Safe for
/// several replicas at once: creation is atomic, and the loser reads the winner's key.
pub async fn load_or_create(
    client: &kube::Client,
    namespace: &str,
    name: &str,
) -> Result<(Keyring, bool), KeyringError> {
    if let Some(ring) = load(client, namespace, name).await? {
        return Ok((ring, false));
    }
    let ring = Keyring::generate().map_err(|e| KeyringError::Invalid {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        reason: e.to_string(),
    })?;
    let json = ring.to_json();
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
        data: Some(BTreeMap::from([(
            KEYRING_KEY.to_owned(),
            ByteString(json.to_vec()),
        )])),
        ..Secret::default()
    };
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let created = api.create(&PostParams::default(), &secret).await;
    wipe(&mut secret);
    match created.map(|mut s| wipe(&mut s)) {
        Ok(_) => Ok((ring, true)),
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let ring =
                load(client, namespace, name)
                    .await?
                    .ok_or_else(|| KeyringError::Missing {
                        namespace: namespace.to_owned(),
                        name: name.to_owned(),
                    })?;
            Ok((ring, false))
        }
        Err(source) => Err(api_error(namespace, name)(source)),
    }
}

/// Keeps `keys` equal to the keyring Secret `namespace/name` for the life of the process: a
/// watch of that one Secret (RBAC: `list` and `watch` limited to its name), and each version of
/// it that differs from the keyring held replaces it, after which `changed` is called with the
/// new keyring. A version that cannot be read is logged and the keyring held is kept: sealing
/// goes on under a key that still opens, rather than stop.
pub async fn follow<F, Fut>(
    client: kube::Client,
    namespace: String,
    name: String,
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
    while let Some(version) = versions.next().await {
        let mut secret = match version {
            Ok(secret) => secret,
            Err(e) => {
                tracing::debug!(error = %e, "watching the keyring Secret; retrying");
                continue;
            }
        };
        let parsed = parse(&secret, &namespace, &name);
        wipe(&mut secret);
        match parsed {
            Ok(ring) => {
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
) -> Result<(String, String), KeyringError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let (mut secret, mut ring) = read_for_update(&api, namespace, name).await?;
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
    write_back(&api, namespace, name, secret, &ring).await?;
    Ok((retired, active))
}

/// The keyring Secret as read for an update (its `resourceVersion` kept, so that the write
/// back is conditional on it), its key bytes wiped, and the keyring they held.
async fn read_for_update(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> Result<(Secret, Keyring), KeyringError> {
    let mut secret = api
        .get_opt(name)
        .await
        .map_err(api_error(namespace, name))?
        .ok_or_else(|| KeyringError::Missing {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })?;
    let parsed = parse(&secret, namespace, name);
    wipe(&mut secret);
    Ok((secret, parsed?))
}

/// Writes `ring` into `secret` and replaces the Secret with it: a 409 if the Secret changed
/// since it was read. Every copy of the key bytes this makes is wiped.
async fn write_back(
    api: &Api<Secret>,
    namespace: &str,
    name: &str,
    mut secret: Secret,
    ring: &Keyring,
) -> Result<(), KeyringError> {
    secret
        .data
        .get_or_insert_with(BTreeMap::new)
        .insert(KEYRING_KEY.to_owned(), ByteString(ring.to_json().to_vec()));
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
) -> Result<Vec<String>, KeyringError> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let (secret, mut ring) = read_for_update(&api, namespace, name).await?;
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
        write_back(&api, namespace, name, secret, &ring).await?;
    }
    Ok(removed)
}
