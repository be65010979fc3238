//! Background re-encryption (docs/crypto.md, "Key lifecycle"): once the keyring's active master
//! key changes, every ClawSecret whose current version is sealed under another (retired) key is
//! sealed again under the active one: the same version number and data, a new envelope. The
//! leader runs it, at a bounded rate, after every keyring change and every [`RESYNC`].
//!
//! It keeps no state of its own, so it resumes wherever it stopped: after an operator restart
//! or under a new leader, the next pass finds the objects still sealed under a retired key.
//! Each write carries the `resourceVersion` it was computed from, so a concurrent write by a
//! user (a rotation, a new version from node.invoke) is never overwritten: the API server
//! answers 409 and the object is looked at again in the next pass.

use kube::api::{Api, ListParams, Patch};
use kube::{Resource, ResourceExt};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

use super::Context;
use crate::k8s::component::Component;
use crate::k8s::crd::ClawSecret;
use crate::k8s::{convert, sealing};

/// A pass also runs this long after the last one without a keyring change (objects restored
/// from a backup, a pass cut short by a lost leadership).
const RESYNC: Duration = Duration::from_secs(600);
const PAGE: u32 = 500;

/// What one pass found and did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Pass {
    /// The key it sealed under.
    pub active: String,
    /// Objects by the master key their current version is sealed under, after the pass.
    pub sealed_under: BTreeMap<String, usize>,
    pub resealed: usize,
    /// Changed by someone else since they were read, or waiting for the reconciler (new data
    /// to seal, a deletion): looked at again in a second.
    pub deferred: usize,
    /// Sealed under a key the keyring does not have, or not openable: reported, left as they are.
    pub failed: usize,
}

/// Re-encrypts after every keyring change (and every [`RESYNC`]) until `stop`.
pub async fn run(
    ctx: Arc<Context>,
    api: Api<ClawSecret>,
    mut keyring_changes: watch::Receiver<u64>,
    per_second: u32,
    mut stop: watch::Receiver<bool>,
) {
    let mut reported_complete: Option<String> = None;
    // The active key the status ConfigMap names: a new one is published, with the counts as
    // they are, before its first re-encryption, so the status never says "complete" under a
    // key that is no longer active while a long pass runs.
    let mut published_active: Option<String> = None;
    loop {
        let active = ctx.keyring.current().active().id().to_string();
        if published_active.as_ref() != Some(&active) {
            let survey = tokio::select! {
                survey = survey(&api) => survey,
                _ = stop.wait_for(|stopped| *stopped) => return,
            };
            match survey {
                Ok(sealed_under) => {
                    ctx.metrics.set_sealed_under(&sealed_under);
                    if publish(&ctx, &active, &sealed_under).await {
                        published_active = Some(active);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not count the ClawSecrets per master key")
                }
            }
        }
        let pass = tokio::select! {
            pass = reencrypt(&ctx, &api, per_second) => pass,
            _ = stop.wait_for(|stopped| *stopped) => return,
        };
        match pass {
            Ok(pass) => {
                ctx.metrics.set_sealed_under(&pass.sealed_under);
                // The key the pass sealed under (a keyring change during it starts another).
                let active = pass.active.clone();
                if publish(&ctx, &active, &pass.sealed_under).await {
                    published_active = Some(active.clone());
                }
                let retired: usize = pass
                    .sealed_under
                    .iter()
                    .filter(|(id, _)| **id != active)
                    .map(|(_, n)| n)
                    .sum();
                tracing::info!(active_key = %active, resealed = pass.resealed, deferred = pass.deferred,
                    failed = pass.failed, under_retired_keys = retired, "re-encryption pass done");
                if retired == 0 && pass.deferred == 0 && reported_complete.as_ref() != Some(&active)
                {
                    if pass.resealed > 0 {
                        complete(&ctx, &active, pass.resealed).await;
                    }
                    reported_complete = Some(active);
                }
                if pass.deferred > 0 {
                    // Someone wrote meanwhile: look again soon rather than in RESYNC.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
            Err(e) => tracing::warn!(error = %e, "re-encryption pass failed; retrying"),
        }
        tokio::select! {
            _ = keyring_changes.changed() => {}
            _ = tokio::time::sleep(RESYNC) => {}
            _ = stop.wait_for(|stopped| *stopped) => return,
        }
    }
}

/// One pass over every ClawSecret in scope.
async fn reencrypt(
    ctx: &Context,
    api: &Api<ClawSecret>,
    per_second: u32,
) -> Result<Pass, kube::Error> {
    let keyring = ctx.keyring.current();
    // One write per tick: at most `per_second`, and as many as the API server takes when its
    // answers are slower than that (a pause after each write would add the two up).
    let mut ticks = tokio::time::interval(Duration::from_secs(1) / per_second.max(1));
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pass = Pass {
        active: keyring.active().id().to_string(),
        ..Pass::default()
    };
    let mut pages = Pages::default();
    while let Some(page) = pages.next(api).await? {
        for obj in &page {
            let Some(sealed) = obj.spec.sealed.as_ref() else {
                continue;
            };
            // Plaintext or encryptedData waiting to be sealed, or on its way out: the
            // reconciler's (it seals under the active key anyway).
            if obj.spec.data.is_some()
                || obj.spec.encrypted_data.is_some()
                || obj.meta().deletion_timestamp.is_some()
            {
                *pass.sealed_under.entry(sealed.key_id.clone()).or_default() += 1;
                if sealed.key_id != keyring.active().id().as_str() {
                    // Soon sealed anew (or gone): counted as it is now, looked at again soon.
                    pass.deferred += 1;
                }
                continue;
            }
            let Ok(key) = convert::secret_key(obj) else {
                continue;
            };
            let resealed = match sealing::reseal(&keyring, &key, sealed) {
                Ok(None) => {
                    *pass.sealed_under.entry(sealed.key_id.clone()).or_default() += 1;
                    continue;
                }
                Ok(Some(resealed)) => resealed,
                Err(e) => {
                    tracing::warn!(namespace = %key.namespace, name = %key.name, key_id = %sealed.key_id,
                        error = %e, "cannot re-encrypt: the version does not open");
                    *pass.sealed_under.entry(sealed.key_id.clone()).or_default() += 1;
                    pass.failed += 1;
                    continue;
                }
            };
            ticks.tick().await;
            let patch = serde_json::json!({
                "metadata": { "resourceVersion": obj.resource_version() },
                "spec": { "sealed": resealed },
            });
            let scoped: Api<ClawSecret> =
                Api::namespaced(api.clone().into_client(), key.namespace.as_str());
            match scoped
                .patch(
                    &obj.name_any(),
                    &Component::Operator.patch(),
                    &Patch::Merge(&patch),
                )
                .await
            {
                Ok(_) => {
                    ctx.metrics.reencrypted();
                    pass.resealed += 1;
                    *pass.sealed_under.entry(resealed.key_id).or_default() += 1;
                }
                Err(kube::Error::Api(status)) if status.code == 409 || status.code == 404 => {
                    pass.deferred += usize::from(status.code == 409);
                }
                Err(e) => return Err(e),
            }
        }
    }
    Ok(pass)
}

/// ClawSecrets in scope by the master key their current version is sealed under, as they are.
async fn survey(api: &Api<ClawSecret>) -> Result<BTreeMap<String, usize>, kube::Error> {
    let mut sealed_under = BTreeMap::new();
    let mut pages = Pages::default();
    while let Some(page) = pages.next(api).await? {
        for sealed in page.iter().filter_map(|obj| obj.spec.sealed.as_ref()) {
            *sealed_under.entry(sealed.key_id.clone()).or_default() += 1;
        }
    }
    Ok(sealed_under)
}

/// Every ClawSecret in scope, [`PAGE`] at a time (a list of 10,000 is not held at once).
#[derive(Default)]
struct Pages {
    continue_token: Option<String>,
    done: bool,
}

impl Pages {
    async fn next(
        &mut self,
        api: &Api<ClawSecret>,
    ) -> Result<Option<Vec<ClawSecret>>, kube::Error> {
        if self.done {
            return Ok(None);
        }
        let mut params = ListParams::default().limit(PAGE);
        if let Some(token) = &self.continue_token {
            params = params.continue_token(token);
        }
        let page = api.list(&params).await?;
        self.continue_token = page.metadata.continue_.filter(|t| !t.is_empty());
        self.done = self.continue_token.is_none();
        Ok(Some(page.items))
    }
}

/// Writes the keyring status ConfigMap; says whether it was written.
async fn publish(ctx: &Context, active: &str, sealed_under: &BTreeMap<String, usize>) -> bool {
    match crate::k8s::sealing_key::publish_status(
        &ctx.client,
        &ctx.operator_namespace,
        active,
        sealed_under,
    )
    .await
    {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "could not publish the keyring status");
            false
        }
    }
}

/// An Event on the keyring Secret: nothing in scope is sealed under a retired key any more.
async fn complete(ctx: &Context, active: &str, resealed: usize) {
    ctx.keyring_event(
        "Reencrypted",
        "Reencrypt",
        format!(
            "{resealed} ClawSecret versions sealed again under master key {active}; no ClawSecret is sealed under another key"
        ),
    )
    .await;
}
