//! The agent's gateway principal: a ServiceAccount. Calls through the OpenClaw gateway act as
//! it, with a short-lived token of its own that the agent requests (TokenRequest), so that
//! TokenReview, SubjectAccessReview and the writes made as the caller treat it exactly like any
//! other caller. The agent's own rights are never used; what the agent needs is the right to
//! request that one account's tokens (`create` on `serviceaccounts/token`, for that name only),
//! which the chart grants when a principal is configured.

use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};
use std::time::{Duration, Instant};
use tokio::sync::Mutex;
use zeroize::Zeroizing;

use crate::domain::ErrorCode;
use crate::invoke::InvokeError;
use crate::invoke::gateway::{Principal, PrincipalIdentity};

/// The shortest lifetime the API server issues; renewed once 80 % of it has passed.
const TOKEN_LIFETIME: Duration = Duration::from_secs(600);
const RENEW_AFTER: Duration = Duration::from_secs(480);

pub struct ServiceAccountPrincipal {
    client: kube::Client,
    namespace: String,
    name: String,
    /// The current token (in memory only; wiped when replaced) and when to renew it.
    token: Mutex<Option<(Zeroizing<String>, Instant)>>,
}

impl ServiceAccountPrincipal {
    /// `NAMESPACE/NAME`.
    pub fn parse(client: kube::Client, spec: &str) -> Result<Self, String> {
        let valid = |part: &str| crate::domain::dns::is_label(part);
        match spec.split_once('/') {
            Some((namespace, name)) if valid(namespace) && valid(name) => {
                Ok(ServiceAccountPrincipal {
                    client,
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    token: Mutex::new(None),
                })
            }
            _ => Err(format!(
                "--gateway-principal must name a ServiceAccount as NAMESPACE/NAME, not {spec:?}"
            )),
        }
    }

    async fn request_token(&self) -> Result<Zeroizing<String>, InvokeError> {
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                // The API server's own audience: the token is for TokenReview and API calls.
                audiences: Vec::new(),
                expiration_seconds: Some(TOKEN_LIFETIME.as_secs() as i64),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let answered = api
            .create_token_request(&self.name, &PostParams::default(), &request)
            .await
            .map_err(|e| match &e {
                kube::Error::Api(status) if status.code == 403 || status.code == 404 => {
                    InvokeError::new(
                        ErrorCode::Unauthenticated,
                        format!(
                            "the gateway principal {} cannot act: the agent may not request its tokens, or it does not exist ({}); grant the agent `create` on `serviceaccounts/token` for that name (the chart does, with gateway.principal)",
                            self.describe(),
                            status.message
                        ),
                    )
                }
                _ => InvokeError::new(
                    ErrorCode::Unavailable,
                    format!(
                        "a token for the gateway principal {} could not be requested: {e}",
                        self.describe()
                    ),
                ),
            })?;
        answered
            .status
            .map(|s| Zeroizing::new(s.token))
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                InvokeError::new(ErrorCode::Unavailable, "the API server issued no token")
            })
    }
}

impl Principal for ServiceAccountPrincipal {
    async fn resolve(&self) -> Result<PrincipalIdentity, InvokeError> {
        let mut cached = self.token.lock().await;
        if let Some((token, renew_at)) = cached.as_ref()
            && Instant::now() < *renew_at
        {
            return Ok(PrincipalIdentity::Bearer(token.clone()));
        }
        let token = self.request_token().await?;
        *cached = Some((token.clone(), Instant::now() + RENEW_AFTER));
        Ok(PrincipalIdentity::Bearer(token))
    }

    fn describe(&self) -> String {
        format!("ServiceAccount {}/{}", self.namespace, self.name)
    }
}
