//! The HTTP face of the dispatcher: `POST /v1/invoke`, plus `GET /healthz` (the process
//! serves), `GET /readyz` (the backend can answer every command, see
//! [`Repository::readiness`]) and `GET /metrics` (OpenMetrics text; no values, no names).

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

use super::{Authorizer, Dispatcher, InvokeError, InvokeResponse, MAX_BODY_BYTES, Repository};

pub fn router<A: Authorizer, R: Repository>(dispatcher: Arc<Dispatcher<A, R>>) -> Router {
    Router::new()
        .route("/v1/invoke", post(invoke::<A, R>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<A, R>))
        .route("/metrics", get(metrics::<A, R>))
        .with_state(dispatcher)
}

async fn readyz<A: Authorizer, R: Repository>(
    State(dispatcher): State<Arc<Dispatcher<A, R>>>,
) -> Response {
    match dispatcher.core().repository().readiness() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

async fn metrics<A: Authorizer, R: Repository>(
    State(dispatcher): State<Arc<Dispatcher<A, R>>>,
) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        dispatcher.metrics_text(),
    )
        .into_response()
}

fn json_response(resp: &InvokeResponse) -> Response {
    let status =
        StatusCode::from_u16(resp.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let body = serde_json::to_vec(resp).unwrap_or_else(|_| {
        br#"{"id":"","ok":false,"error":{"code":"INTERNAL","message":"response could not be encoded"}}"#
            .to_vec()
    });
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn invoke<A: Authorizer, R: Repository>(
    State(dispatcher): State<Arc<Dispatcher<A, R>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let bytes = match to_bytes(body, MAX_BODY_BYTES).await {
        Ok(b) => b,
        Err(_) => {
            let resp = InvokeResponse::failure(
                String::new(),
                InvokeError::invalid(format!(
                    "request body is larger than {} MiB; secret and config data is limited to 1 MiB",
                    MAX_BODY_BYTES / (1024 * 1024)
                )),
            );
            let mut r = json_response(&resp);
            *r.status_mut() = StatusCode::PAYLOAD_TOO_LARGE;
            return r;
        }
    };
    let resp = dispatcher.handle(bearer_token(&headers), &bytes).await;
    json_response(&resp)
}

/// The header that carries the caller's bearer token when `Authorization` cannot: the API
/// server's pod proxy authenticates the caller with `Authorization` and removes it before
/// forwarding, so `claw-secrets invoke` sends the same token in this header as well
/// (docs/architecture.md, "Invoking through the API server"). It is checked exactly like
/// `Authorization` (TokenReview in Kubernetes), so it grants nothing that header would not.
pub const FORWARDED_AUTHORIZATION: &str = "x-claw-secrets-authorization";

/// The bearer token of `Authorization`, else of [`FORWARDED_AUTHORIZATION`].
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let bearer = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim)
    };
    bearer(header::AUTHORIZATION.as_str()).or_else(|| bearer(FORWARDED_AUTHORIZATION))
}

/// Serves on `listener` until `shutdown` completes, finishing in-flight requests.
pub async fn serve<A: Authorizer, R: Repository>(
    listener: TcpListener,
    dispatcher: Arc<Dispatcher<A, R>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(dispatcher))
        .with_graceful_shutdown(shutdown)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_forwarded_header_carries_a_token_when_authorization_does_not() {
        assert_eq!(
            bearer_token(&headers(&[("authorization", "Bearer a")])),
            Some("a")
        );
        assert_eq!(
            bearer_token(&headers(&[("x-claw-secrets-authorization", "Bearer f")])),
            Some("f")
        );
        assert_eq!(
            bearer_token(&headers(&[("X-Claw-Secrets-Authorization", "bearer f ")])),
            Some("f")
        );
        // Authorization wins when both are sent (a direct call).
        assert_eq!(
            bearer_token(&headers(&[
                ("authorization", "Bearer a"),
                ("x-claw-secrets-authorization", "Bearer f"),
            ])),
            Some("a")
        );
        assert_eq!(bearer_token(&headers(&[])), None);
        assert_eq!(
            bearer_token(&headers(&[("x-claw-secrets-authorization", "Basic Zm9v")])),
            None
        );
    }
}
