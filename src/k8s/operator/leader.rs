//! Leader election with a coordination.k8s.io/v1 Lease, so that two replicas never both act.
//!
//! The same protocol as client-go's leader election, written out because kube-runtime has none:
//!
//! - A candidate takes the Lease when it does not exist (create; 409 means another candidate
//!   won), when its holder released it (empty `holderIdentity`), when it names this candidate
//!   itself (a restarted container of the same pod), or when its record has not changed for
//!   `leaseDurationSeconds` *as measured on this replica's own clock*. Expiry is never judged
//!   by comparing `renewTime` with the local wall clock, because two nodes' clocks may differ.
//!   Taking over is a replace carrying the observed `resourceVersion`: 409 means someone else
//!   moved first.
//! - The leader renews every third of the lease duration. If it cannot renew for two thirds of
//!   the duration (counted from when its last successful renewal was *sent*), it gives up:
//!   [`LeaderElector::hold`] returns, the caller drops its controllers and stands by again, so
//!   the leader has stopped acting before any standby can consider the Lease expired.
//! - On a clean shutdown the leader clears `holderIdentity`, so a standby takes over at its
//!   next poll instead of waiting out the lease.
//!
//! Identities must be unique per replica (the pod name is): two processes claiming the same
//! identity would both consider themselves the holder.

use jiff::Timestamp;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta};

use crate::k8s::component::Component;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::error::{Error, is_conflict};

#[derive(Debug, Clone)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// This replica's identity (its pod name); unique per replica.
    pub identity: String,
    pub duration: Duration,
    /// Identities are the names of pods in `namespace` (the chart's Deployment): a holder whose
    /// pod no longer exists is not waited for. Set only where that holds, since a holder that
    /// is not a pod would look gone.
    pub holders_are_pods: bool,
}

impl LeaseConfig {
    /// How often a standby looks at the Lease.
    fn retry_period(&self) -> Duration {
        (self.duration / 6).max(Duration::from_millis(200))
    }

    fn renew_period(&self) -> Duration {
        self.duration / 3
    }

    /// How long the leader may fail to renew before it stops acting.
    fn renew_deadline(&self) -> Duration {
        self.duration * 2 / 3
    }
}

pub struct LeaderElector {
    api: Api<Lease>,
    /// The pods of `namespace`, when holders are pods.
    pods: Option<Api<Pod>>,
    config: LeaseConfig,
    /// The Lease as this replica last wrote it; its resourceVersion guards the next write.
    held: Option<Lease>,
    /// The other holder's record as last seen (resourceVersion) and when it was first seen.
    observed: Option<(String, Instant)>,
}

enum RenewError {
    Lost(String),
    Failed(String),
}

impl LeaderElector {
    pub fn new(client: kube::Client, config: LeaseConfig) -> Self {
        Self {
            pods: config
                .holders_are_pods
                .then(|| Api::namespaced(client.clone(), &config.namespace)),
            api: Api::namespaced(client, &config.namespace),
            config,
            held: None,
            observed: None,
        }
    }

    /// Waits until this replica holds the Lease. `on_standby` runs once another holder has
    /// been seen (this replica is then a healthy standby).
    pub async fn acquire(&mut self, on_standby: impl Fn()) {
        let mut standing_by = false;
        loop {
            match self.try_acquire().await {
                Ok(None) => {
                    tracing::info!(
                        lease = %format_args!("{}/{}", self.config.namespace, self.config.name),
                        identity = %self.config.identity,
                        "acquired the leader Lease"
                    );
                    return;
                }
                Ok(Some(holder)) => {
                    if !standing_by {
                        tracing::info!(%holder, identity = %self.config.identity,
                            "another replica leads; standing by");
                        standing_by = true;
                        on_standby();
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read or write the leader Lease; retrying")
                }
            }
            tokio::time::sleep(self.config.retry_period()).await;
        }
    }

    /// One election round: `Ok(None)` when this replica now holds the Lease, else the holder.
    async fn try_acquire(&mut self) -> Result<Option<String>, kube::Error> {
        let me = self.config.identity.clone();
        let Some(current) = self.api.get_opt(&self.config.name).await? else {
            let lease = self.record(Timestamp::now(), 0, None);
            return match self.api.create(&Component::Operator.post(), &lease).await {
                Ok(written) => {
                    self.held = Some(written);
                    Ok(None)
                }
                Err(e) if is_conflict(&e) => Ok(Some("another replica".to_owned())),
                Err(e) => Err(e),
            };
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let version = current.resource_version().unwrap_or_default();
        let free = match holder.as_deref() {
            None => true,
            Some(h) if h == me => true,
            Some(h) if self.pod_is_gone(h).await => {
                tracing::info!(holder = %h, "the leader Lease names a pod that no longer exists; not waiting for it to expire");
                true
            }
            Some(_) => {
                if self
                    .observed
                    .as_ref()
                    .is_none_or(|(seen, _)| *seen != version)
                {
                    self.observed = Some((version.clone(), Instant::now()));
                }
                let duration = spec
                    .lease_duration_seconds
                    .and_then(|s| u64::try_from(s).ok())
                    .filter(|s| *s > 0)
                    .map_or(self.config.duration, Duration::from_secs);
                self.observed
                    .as_ref()
                    .is_some_and(|(_, since)| since.elapsed() >= duration)
            }
        };
        if !free {
            return Ok(holder);
        }
        let taking_over = holder.as_deref() != Some(me.as_str());
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(taking_over);
        let acquired = match (&spec.acquire_time, taking_over) {
            (Some(t), false) => t.0,
            _ => Timestamp::now(),
        };
        let lease = self.record(acquired, transitions, Some(version));
        match self
            .api
            .replace(&self.config.name, &Component::Operator.post(), &lease)
            .await
        {
            Ok(written) => {
                if let Some(previous) = holder.filter(|_| taking_over) {
                    tracing::info!(%previous, "took over the leader Lease");
                }
                self.held = Some(written);
                Ok(None)
            }
            Err(e) if is_conflict(&e) => Ok(Some("another replica".to_owned())),
            Err(e) => Err(e),
        }
    }

    /// Whether `holder` is known to be a pod that no longer exists (a leader that could not
    /// release the Lease: its rights were deleted before it, as `helm uninstall` does). Only
    /// when holders are pods; any error reading the pod means "not known".
    async fn pod_is_gone(&self, holder: &str) -> bool {
        let Some(pods) = &self.pods else {
            return false;
        };
        match pods.get_opt(holder).await {
            Ok(None) => true,
            Ok(Some(_)) => false,
            Err(e) => {
                tracing::debug!(%holder, error = %e, "cannot tell whether the Lease holder's pod exists");
                false
            }
        }
    }

    /// The Lease naming this replica as holder, renewed now.
    fn record(&self, acquired: Timestamp, transitions: i32, version: Option<String>) -> Lease {
        Lease {
            metadata: ObjectMeta {
                name: Some(self.config.name.clone()),
                namespace: Some(self.config.namespace.clone()),
                resource_version: version,
                labels: Some(BTreeMap::from([(
                    "app.kubernetes.io/name".to_owned(),
                    "claw-secrets".to_owned(),
                )])),
                ..ObjectMeta::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.config.identity.clone()),
                lease_duration_seconds: Some(
                    i32::try_from(self.config.duration.as_secs().max(1)).unwrap_or(i32::MAX),
                ),
                acquire_time: Some(MicroTime(acquired)),
                renew_time: Some(MicroTime(Timestamp::now())),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    /// Keeps renewing the Lease; returns only when leadership is lost (the caller must stop
    /// acting at once). Cancel-safe: drop it to stop renewing, then call [`Self::release`].
    pub async fn hold(&mut self) -> Error {
        let deadline = self.config.renew_deadline();
        let mut last_renewed = Instant::now();
        let mut wait = self.config.renew_period();
        loop {
            tokio::time::sleep(wait).await;
            let sent = Instant::now();
            let remaining = deadline
                .saturating_sub(last_renewed.elapsed())
                .max(Duration::from_millis(100));
            let failure = match tokio::time::timeout(remaining, self.renew()).await {
                Ok(Ok(())) => {
                    last_renewed = sent;
                    wait = self.config.renew_period();
                    continue;
                }
                Ok(Err(RenewError::Lost(holder))) => {
                    return self.lost(format!("{holder} holds it now"));
                }
                Ok(Err(RenewError::Failed(e))) => e,
                Err(_) => "the API server did not answer in time".to_owned(),
            };
            if last_renewed.elapsed() >= deadline {
                return self.lost(format!(
                    "could not renew it for {:.1}s: {failure}",
                    last_renewed.elapsed().as_secs_f64()
                ));
            }
            tracing::warn!(error = %failure, "renewing the leader Lease failed; retrying");
            wait = Duration::from_millis(500).min(self.config.renew_period());
        }
    }

    fn lost(&self, reason: String) -> Error {
        Error::LeaseLost {
            namespace: self.config.namespace.clone(),
            name: self.config.name.clone(),
            reason,
        }
    }

    async fn renew(&mut self) -> Result<(), RenewError> {
        let failed = |e: kube::Error| RenewError::Failed(e.to_string());
        // Two attempts: a 409 caused by someone else touching the Lease (labels, say) while it
        // still names this replica is retried with the fresh resourceVersion.
        for _ in 0..2 {
            let mut lease = match self.held.clone() {
                Some(l) => l,
                None => self.api.get(&self.config.name).await.map_err(failed)?,
            };
            if let Some(spec) = lease.spec.as_mut() {
                spec.renew_time = Some(MicroTime(Timestamp::now()));
            }
            match self
                .api
                .replace(&self.config.name, &Component::Operator.post(), &lease)
                .await
            {
                Ok(written) => {
                    self.held = Some(written);
                    return Ok(());
                }
                Err(e) if is_conflict(&e) => {
                    let current = self.api.get(&self.config.name).await.map_err(failed)?;
                    let holder = current
                        .spec
                        .as_ref()
                        .and_then(|s| s.holder_identity.clone())
                        .unwrap_or_default();
                    if holder != self.config.identity {
                        return Err(RenewError::Lost(if holder.is_empty() {
                            "nobody".to_owned()
                        } else {
                            holder
                        }));
                    }
                    self.held = Some(current);
                }
                Err(e) => return Err(failed(e)),
            }
        }
        Err(RenewError::Failed(
            "the Lease kept changing under this replica".to_owned(),
        ))
    }

    /// Gives the Lease up (clears the holder), so a standby takes over at its next poll.
    /// Best effort: failing to release only delays failover by one lease duration.
    pub async fn release(&mut self) {
        let release = async {
            let mut lease = self.api.get(&self.config.name).await?;
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(false);
            }
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.renew_time = Some(MicroTime(Timestamp::now()));
            self.api
                .replace(&self.config.name, &Component::Operator.post(), &lease)
                .await?;
            Ok::<_, kube::Error>(true)
        };
        match tokio::time::timeout(Duration::from_secs(5), release).await {
            Ok(Ok(true)) => tracing::info!("released the leader Lease"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "could not release the leader Lease"),
            Err(_) => tracing::warn!("could not release the leader Lease: timed out"),
        }
        self.held = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_gives_up_before_a_standby_may_take_over() {
        let c = LeaseConfig {
            namespace: "ns".into(),
            name: "lease".into(),
            identity: "me".into(),
            duration: Duration::from_secs(15),
            holders_are_pods: false,
        };
        assert!(c.renew_period() < c.renew_deadline());
        assert!(c.renew_deadline() < c.duration);
        assert_eq!(c.retry_period(), Duration::from_millis(2500));
    }
}
