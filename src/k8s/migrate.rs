//! Storage migration: after an upgrade that moved the CRDs' storage version (v1alpha1 to
//! v1beta1), objects written before stay encoded in the old version in etcd, and the CRD's
//! `status.storedVersions` keeps naming it, so the old version could never stop being served.
//! `claw-secrets migrate-storage` rewrites every ClawSecret and ClawConfig (a replace with the
//! object as read: the API server encodes it in the storage version, and since the stored bytes
//! differ, it writes them), then prunes `status.storedVersions` to the storage version, as
//! Kubernetes' storage version migrator and cert-manager's `cmctl upgrade migrate-api-version` do.
//!
//! The rewrite changes nothing an object says (the spec, the status, the generation stay; only
//! the resourceVersion moves), carries no data (so the admission webhook is not called), and is
//! idempotent: run it again at any time.

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, Patch};
use kube::core::NamespaceResourceScope;
use kube::{CustomResourceExt, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

use crate::k8s::component::Component;
use crate::k8s::crd::{ClawConfig, ClawSecret};

/// What was migrated of one kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Migrated {
    pub kind: String,
    /// Objects rewritten in the storage version.
    pub objects: usize,
    pub stored_before: Vec<String>,
    pub stored_after: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error(
        "{what}: {source}; migrate-storage needs list and update on clawsecrets and clawconfigs in every namespace, and get and patch on customresourcedefinitions/status (a cluster admin)"
    )]
    Api {
        what: String,
        #[source]
        source: kube::Error,
    },
}

/// Migrates both kinds; see the module's documentation.
pub async fn migrate_storage(client: &kube::Client) -> Result<Vec<Migrated>, MigrateError> {
    Ok(vec![
        migrate::<ClawSecret>(client).await?,
        migrate::<ClawConfig>(client).await?,
    ])
}

async fn migrate<K>(client: &kube::Client) -> Result<Migrated, MigrateError>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + CustomResourceExt
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let kind = K::kind(&()).into_owned();
    let storage = K::version(&()).into_owned();
    let api_error = |what: String| move |source| MigrateError::Api { what, source };
    let all: Api<K> = Api::all(client.clone());
    let mut objects = 0;
    let mut params = ListParams::default().limit(500);
    loop {
        let page = all
            .list(&params)
            .await
            .map_err(api_error(format!("listing {kind}s")))?;
        for obj in page.items {
            if rewrite(client, obj)
                .await
                .map_err(api_error(format!("rewriting a {kind}")))?
            {
                objects += 1;
            }
        }
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => break,
        }
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let name = K::crd_name();
    let crd = crds
        .get(name)
        .await
        .map_err(api_error(format!("reading CRD {name}")))?;
    let stored_before = crd
        .status
        .and_then(|s| s.stored_versions)
        .unwrap_or_default();
    let stored_after = vec![storage.clone()];
    if stored_before != stored_after {
        crds.patch_status(
            name,
            &Component::Cli.patch(),
            &Patch::Merge(serde_json::json!({ "status": { "storedVersions": stored_after } })),
        )
        .await
        .map_err(api_error(format!(
            "pruning status.storedVersions of CRD {name}"
        )))?;
    }
    Ok(Migrated {
        kind,
        objects,
        stored_before,
        stored_after,
    })
}

/// Replaces `obj` with itself (re-reading it after a conflict); `false` when it is gone.
async fn rewrite<K>(client: &kube::Client, mut obj: K) -> Result<bool, kube::Error>
where
    K: Resource<DynamicType = (), Scope = NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let name = obj.name_any();
    loop {
        // managedFields are the API server's to keep; sent back as read they would be taken
        // as a request to set them.
        obj.meta_mut().managed_fields = None;
        match api.replace(&name, &Component::Cli.post(), &obj).await {
            Ok(_) => return Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => return Ok(false),
            Err(kube::Error::Api(s)) if s.code == 409 => match api.get_opt(&name).await? {
                Some(fresh) => obj = fresh,
                None => return Ok(false),
            },
            Err(e) => return Err(e),
        }
    }
}
