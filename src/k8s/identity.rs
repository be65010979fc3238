//! Who is calling, and may they: TokenReview for every bearer token, SubjectAccessReview on the
//! caller's own identity. The agent never substitutes its own permissions for the caller's.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use kube::api::{Api, PostParams};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::domain::{ErrorCode, Namespace, Workload};
use crate::invoke::{Caller, InvokeError};

/// A reviewed token is trusted without asking again for this long.
const FRESH_FOR: Duration = Duration::from_secs(10);
/// While the API server is unreachable, a token reviewed earlier stays usable up to its own
/// expiry, at most this long after the review: reads keep working through an outage, and a
/// revoked token stops working soon after the API server is back.
const STALE_FOR: Duration = Duration::from_secs(3600);
/// Upper bound on cached reviews, so a flood of distinct tokens cannot exhaust memory.
const MAX_CACHED: usize = 10_000;

struct Reviewed {
    caller: Caller,
    at: Instant,
    usable_until: Instant,
}

pub struct KubeIdentity {
    client: kube::Client,
    cache: Mutex<HashMap<[u8; 32], Reviewed>>,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> InvokeError {
    InvokeError::new(
        ErrorCode::Unavailable,
        format!("{what}: the API server could not be reached ({e}); retry shortly"),
    )
}

/// The `exp` claim of a JWT, read without verifying it: only used for a token the API server
/// has already verified.
fn jwt_expiry(token: &str) -> Option<SystemTime> {
    let payload = token.split('.').nth(1)?;
    let bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let claims: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    Some(UNIX_EPOCH + Duration::from_secs(claims.get("exp")?.as_u64()?))
}

/// The workload a ServiceAccount username stands for: `system:serviceaccount:<ns>:<name>`.
fn service_account(username: &str) -> Option<(Namespace, Workload)> {
    let rest = username.strip_prefix("system:serviceaccount:")?;
    let (ns, name) = rest.split_once(':')?;
    Some((Namespace::parse(ns).ok()?, Workload::parse(name).ok()?))
}

impl KubeIdentity {
    pub fn new(client: kube::Client) -> Self {
        KubeIdentity {
            client,
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Turns a bearer token into a caller with TokenReview, or UNAUTHENTICATED.
    pub async fn authenticate(&self, token: Option<&str>) -> Result<Caller, InvokeError> {
        let token = token.filter(|t| !t.is_empty()).ok_or_else(|| {
            InvokeError::new(
                ErrorCode::Unauthenticated,
                "missing bearer token: send 'Authorization: Bearer <token>' (a ServiceAccount token, or your own)",
            )
        })?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = Instant::now();
        if let Some(hit) = self.cache.lock().unwrap().get(&digest)
            && now.duration_since(hit.at) < FRESH_FOR
        {
            return Ok(hit.caller.clone());
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: None,
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let status = match api.create(&PostParams::default(), &review).await {
            Ok(r) => r.status.unwrap_or_default(),
            Err(e) => {
                // Stale-if-error: a token verified before the outage keeps working for a while.
                if let Some(hit) = self.cache.lock().unwrap().get(&digest)
                    && now < hit.usable_until
                {
                    tracing::debug!("API server unreachable; using an earlier token review");
                    return Ok(hit.caller.clone());
                }
                return Err(unavailable("the bearer token cannot be verified", e));
            }
        };
        let user = match (status.authenticated, status.user) {
            (Some(true), Some(user)) => user,
            _ => {
                self.cache.lock().unwrap().remove(&digest);
                return Err(InvokeError::new(
                    ErrorCode::Unauthenticated,
                    "the bearer token was rejected by the API server (TokenReview)",
                ));
            }
        };
        let username = user.username.unwrap_or_default();
        let (namespace, workload) = match service_account(&username) {
            Some((ns, w)) => (Some(ns), Some(w)),
            None => (None, None),
        };
        let caller = Caller {
            namespace,
            workload,
            groups: user.groups.unwrap_or_default(),
            uid: user.uid,
            extra: user.extra.unwrap_or_default(),
            ..Caller::named(username)
        };
        let stale_limit = now + STALE_FOR;
        let usable_until = jwt_expiry(token)
            .and_then(|exp| exp.duration_since(SystemTime::now()).ok())
            .map_or(now + FRESH_FOR, |left| (now + left).min(stale_limit));
        let mut cache = self.cache.lock().unwrap();
        if cache.len() >= MAX_CACHED {
            cache.retain(|_, r| now < r.usable_until);
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
        }
        cache.insert(
            digest,
            Reviewed {
                caller: caller.clone(),
                at: now,
                usable_until,
            },
        );
        Ok(caller)
    }

    /// Asks the API server whether `caller` (its own identity, never the agent's) may `verb`
    /// the `resource` in `namespace`.
    pub async fn allowed(
        &self,
        caller: &Caller,
        verb: &str,
        resource: &str,
        namespace: &Namespace,
        name: Option<&str>,
    ) -> Result<bool, InvokeError> {
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(caller.subject.clone()),
                groups: Some(caller.groups.clone()),
                uid: caller.uid.clone(),
                extra: (!caller.extra.is_empty()).then(|| caller.extra.clone()),
                resource_attributes: Some(ResourceAttributes {
                    group: Some(super::crd::GROUP.to_owned()),
                    resource: Some(resource.to_owned()),
                    verb: Some(verb.to_owned()),
                    namespace: Some(namespace.to_string()),
                    name: name.map(str::to_owned),
                    ..ResourceAttributes::default()
                }),
                ..SubjectAccessReviewSpec::default()
            },
            ..SubjectAccessReview::default()
        };
        let api: Api<SubjectAccessReview> = Api::all(self.client.clone());
        let status = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("access cannot be checked", e))?
            .status
            .unwrap_or_default();
        Ok(status.allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_account_usernames_become_workloads() {
        let (ns, w) = service_account("system:serviceaccount:prod:api-server").unwrap();
        assert_eq!((ns.as_str(), w.as_str()), ("prod", "api-server"));
        assert!(service_account("alice@example.com").is_none());
        assert!(service_account("system:serviceaccount:prod").is_none());
    }

    #[test]
    fn expiry_is_read_from_the_payload() {
        let payload = URL_SAFE_NO_PAD.encode(br#"{"exp": 2000000000}"#);
        let exp = jwt_expiry(&format!("h.{payload}.s")).unwrap();
        assert_eq!(exp, UNIX_EPOCH + Duration::from_secs(2_000_000_000));
        assert!(jwt_expiry("not-a-jwt").is_none());
    }
}
