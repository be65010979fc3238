//! Smoke test proving the cluster test harness talks to a real kube-apiserver: namespaces,
//! ServiceAccounts, TokenRequest, TokenReview (accept a real token, reject a tampered one) and
//! SubjectAccessReview with RBAC (deny an unprivileged user).
//!
//! Needs the control plane binaries (`bash hack/control-plane.sh install`) or
//! `KUBECONFIG_E2E` pointing at an existing cluster; see docs/control-plane.md.

#[path = "support/random.rs"]
mod random;

#[path = "support/control_plane.rs"]
mod control_plane;

#[path = "support/tokens.rs"]
mod tokens;

use k8s_openapi::api::authentication::v1::{
    TokenRequest, TokenRequestSpec, TokenReview, TokenReviewSpec,
};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use kube::api::{Api, ObjectMeta, PostParams};

fn audiences() -> Vec<String> {
    vec!["claw-secrets-smoke".to_owned()]
}

async fn review(
    client: &kube::Client,
    token: &str,
) -> k8s_openapi::api::authentication::v1::TokenReviewStatus {
    let review = TokenReview {
        spec: TokenReviewSpec {
            token: Some(token.to_owned()),
            audiences: Some(audiences()),
        },
        ..TokenReview::default()
    };
    Api::<TokenReview>::all(client.clone())
        .create(&PostParams::default(), &review)
        .await
        .expect("TokenReview create")
        .status
        .expect("TokenReview has a status")
}

#[tokio::test]
async fn real_apiserver_authn_authz_smoke() {
    let env = control_plane::test_env("smoke").await;
    let client = env.client.clone();
    let cp = control_plane::control_plane();

    // The version endpoint reports the pinned release (local control plane only).
    let version = client.apiserver_version().await.expect("GET /version");
    eprintln!("apiserver version {}", version.git_version);
    if !cp.is_external() {
        let pinned = control_plane::pinned_version("K8S_VERSION").expect("versions.env");
        assert_eq!(
            version.git_version, pinned,
            "/version reports the pinned release"
        );
    }

    // The namespace exists and is ours.
    let ns = Api::<Namespace>::all(client.clone())
        .get(&env.namespace)
        .await
        .expect("get namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some(env.namespace.as_str()));

    // A ServiceAccount, and a token for it from the TokenRequest API.
    let sas: Api<ServiceAccount> = env.api();
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some("smoke-sa".to_owned()),
            ..ObjectMeta::default()
        },
        ..ServiceAccount::default()
    };
    sas.create(&PostParams::default(), &sa)
        .await
        .expect("create ServiceAccount");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences(),
            expiration_seconds: Some(600),
            ..TokenRequestSpec::default()
        },
        ..TokenRequest::default()
    };
    let minted = sas
        .create_token_request("smoke-sa", &PostParams::default(), &request)
        .await
        .expect("TokenRequest");
    let token = minted.status.expect("TokenRequest status").token;
    assert!(!token.is_empty(), "TokenRequest returned a token");

    // TokenReview accepts the real token and names the ServiceAccount.
    let ok = review(&client, &token).await;
    assert_eq!(
        ok.authenticated,
        Some(true),
        "real token rejected: {:?}",
        ok.error
    );
    let user = ok.user.expect("authenticated user");
    assert_eq!(
        user.username.as_deref(),
        Some(format!("system:serviceaccount:{}:smoke-sa", env.namespace).as_str())
    );
    assert_eq!(ok.audiences, Some(audiences()));

    // ... and rejects a tampered one (payload changed, signature kept) and garbage.
    let forged = review(
        &client,
        &tokens::forge_subject(&token, "smoke-sa", "smoke-sb"),
    )
    .await;
    assert_ne!(
        forged.authenticated,
        Some(true),
        "tampered token accepted: {forged:?}"
    );
    assert!(
        forged.user.and_then(|u| u.username).is_none(),
        "tampered token yields no user"
    );
    let garbage = review(&client, "not-a-token").await;
    assert_ne!(garbage.authenticated, Some(true));

    // RBAC: an unprivileged user may not read Secrets in the namespace...
    let sars = Api::<SubjectAccessReview>::all(client.clone());
    let sar = |user: &str, groups: Vec<String>| SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(user.to_owned()),
            groups: Some(groups),
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(env.namespace.clone()),
                verb: Some("get".to_owned()),
                resource: Some("secrets".to_owned()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let denied = sars
        .create(
            &PostParams::default(),
            &sar(
                "smoke-unprivileged",
                vec!["system:authenticated".to_owned()],
            ),
        )
        .await
        .expect("SubjectAccessReview")
        .status
        .expect("SAR status");
    assert!(
        !denied.allowed,
        "unprivileged user may read secrets: {denied:?}"
    );

    // ... while a cluster admin may (the authorizer is really deciding, not denying all).
    let allowed = sars
        .create(
            &PostParams::default(),
            &sar("smoke-admin", vec!["system:masters".to_owned()]),
        )
        .await
        .expect("SubjectAccessReview")
        .status
        .expect("SAR status");
    assert!(allowed.allowed, "system:masters denied: {allowed:?}");

    env.cleanup().await;
}
