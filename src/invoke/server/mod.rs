//! The HTTP face of the dispatcher: `POST /v1/invoke`, plus `GET /healthz` (the process
//! serves), `GET /readyz` (the backend can answer every command, see
//! [`Repository::readiness`]) and `GET /metrics` (OpenMetrics text; no values, no names).
//!
//! The agent's port is open to every pod of its node, so the server holds under hostile
//! clients ([`HttpLimits`], docs/architecture.md "Limits and timeouts"): headers must arrive in
//! time (the same clock closes idle keep-alive connections), bodies too; past a cap the oldest
//! idle connection is shed for a new one; the caller is authenticated from the headers before
//! the body is read, and a caller that is not gets at most a few KiB read; bodies buffered at
//! once are bounded in bytes.

mod connections;

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use super::{Authorizer, Dispatcher, InvokeError, InvokeResponse, MAX_BODY_BYTES, Repository};
use crate::domain::ErrorCode;

/// What the server allows a client. See the defaults for the reasons.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HttpLimits {
    /// From a connection's start, or the end of its previous response, until a request's
    /// headers are complete. It is also how long an idle keep-alive connection stays open.
    pub header_timeout: Duration,
    /// How long a request's body may take to arrive, once its headers have.
    pub body_timeout: Duration,
    /// Connections open at once; past it, the oldest idle connection is closed for a new one
    /// (and a new one is refused if none is idle).
    pub max_connections: usize,
    /// Bytes of request bodies read into memory at once, over all connections; a request whose
    /// body does not fit waits (within the body timeout), then answers UNAVAILABLE.
    pub max_body_buffer: usize,
}

/// How much of a body is read for a caller that is not authenticated: enough for any
/// well-formed request without data (its command is recorded in the audit log), nothing more.
pub const UNAUTHENTICATED_BODY_BYTES: usize = 8 * 1024;

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            header_timeout: Duration::from_secs(15),
            body_timeout: Duration::from_secs(30),
            max_connections: connections::default_max_connections(),
            max_body_buffer: 64 * 1024 * 1024,
        }
    }
}

/// What the routes share.
struct App<A, R> {
    dispatcher: Arc<Dispatcher<A, R>>,
    limits: HttpLimits,
    /// Permits are KiB of request body being read or handled.
    bodies: Semaphore,
}

pub fn router<A: Authorizer, R: Repository>(
    dispatcher: Arc<Dispatcher<A, R>>,
    limits: HttpLimits,
) -> Router {
    let app = Arc::new(App {
        dispatcher,
        limits,
        bodies: Semaphore::new(kib(limits.max_body_buffer).max(kib(MAX_BODY_BYTES))),
    });
    Router::new()
        .route("/v1/invoke", post(invoke::<A, R>))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<A, R>))
        .route("/metrics", get(metrics::<A, R>))
        .with_state(app)
}

fn kib(bytes: usize) -> usize {
    bytes.div_ceil(1024)
}

async fn readyz<A: Authorizer, R: Repository>(State(app): State<Arc<App<A, R>>>) -> Response {
    let (status, mut text) = match app.dispatcher.core().repository().readiness() {
        Ok(()) => (StatusCode::OK, "ok\n".to_owned()),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    };
    // Detail that does not decide readiness: HTTP callers are served either way.
    for note in app.dispatcher.readiness_notes() {
        text.push_str(&note);
        text.push('\n');
    }
    (status, text).into_response()
}

async fn metrics<A: Authorizer, R: Repository>(State(app): State<Arc<App<A, R>>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.dispatcher.metrics_text(),
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

/// A failure answered before the dispatcher saw the request, with its own HTTP status.
fn refused(status: StatusCode, code: ErrorCode, message: String, close: bool) -> Response {
    let resp = InvokeResponse::failure(String::new(), InvokeError::new(code, message));
    let mut r = json_response(&resp);
    *r.status_mut() = status;
    if close {
        // The body was not read: the connection cannot carry another request.
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
    }
    r
}

async fn invoke<A: Authorizer, R: Repository>(
    State(app): State<Arc<App<A, R>>>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(length) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<usize>().ok())
    else {
        return refused(
            StatusCode::LENGTH_REQUIRED,
            ErrorCode::InvalidArgument,
            "send the body with a Content-Length".to_owned(),
            true,
        );
    };
    if length > MAX_BODY_BYTES {
        return refused(
            StatusCode::PAYLOAD_TOO_LARGE,
            ErrorCode::InvalidArgument,
            format!(
                "request body is larger than {} MiB; secret and config data is limited to 1 MiB",
                MAX_BODY_BYTES / (1024 * 1024)
            ),
            true,
        );
    }
    // Who is calling is settled from the headers before a byte of the body is read.
    let caller = app.dispatcher.authenticate(bearer_token(&headers)).await;
    if let Err(e) = &caller
        && length > UNAUTHENTICATED_BODY_BYTES
    {
        let resp = app.dispatcher.refuse_unread(e.clone());
        let mut r = json_response(&resp);
        r.headers_mut().insert(
            header::CONNECTION,
            header::HeaderValue::from_static("close"),
        );
        return r;
    }
    let limit = app.limits.body_timeout;
    let permits = u32::try_from(kib(length)).unwrap_or(u32::MAX);
    let _buffer = match tokio::time::timeout(limit, app.bodies.acquire_many(permits)).await {
        Ok(Ok(permit)) => permit,
        _ => {
            return refused(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorCode::Unavailable,
                "too many request bodies are being read at once; retry shortly".to_owned(),
                true,
            );
        }
    };
    let bytes = match tokio::time::timeout(limit, to_bytes(body, length)).await {
        Ok(Ok(bytes)) => bytes,
        Ok(Err(_)) => {
            return refused(
                StatusCode::BAD_REQUEST,
                ErrorCode::InvalidArgument,
                "the request body did not match its Content-Length".to_owned(),
                true,
            );
        }
        Err(_) => {
            return refused(
                StatusCode::REQUEST_TIMEOUT,
                ErrorCode::InvalidArgument,
                format!(
                    "the request body did not arrive within {} s",
                    limit.as_secs()
                ),
                true,
            );
        }
    };
    let resp = app.dispatcher.handle_as(caller, &bytes).await;
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

/// Serves on `listener` until `shutdown` completes, then finishes the requests in flight.
/// With `tls`, HTTPS only, presenting whatever certificate `tls` holds at each handshake.
pub async fn serve<A: Authorizer, R: Repository>(
    listener: TcpListener,
    dispatcher: Arc<Dispatcher<A, R>>,
    limits: HttpLimits,
    tls: Option<Arc<crate::tls::ServingCert>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let tls = tls.map(|cert| tokio_rustls::TlsAcceptor::from(crate::tls::server_config(cert)));
    connections::serve(listener, router(dispatcher, limits), limits, tls, shutdown).await
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
