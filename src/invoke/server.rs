//! The HTTP face of the dispatcher: `POST /v1/invoke`, plus `GET /healthz`.

use axum::Router;
use axum::body::{Body, to_bytes};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;

use super::{Backend, Dispatcher, InvokeError, InvokeResponse, MAX_BODY_BYTES};

pub fn router<B: Backend>(dispatcher: Arc<Dispatcher<B>>) -> Router {
    Router::new()
        .route("/v1/invoke", post(invoke::<B>))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(dispatcher)
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

async fn invoke<B: Backend>(
    State(dispatcher): State<Arc<Dispatcher<B>>>,
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
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let resp = dispatcher.handle(bearer, &bytes).await;
    json_response(&resp)
}

/// Serves on `listener` until `shutdown` completes, finishing in-flight requests.
pub async fn serve<B: Backend>(
    listener: TcpListener,
    dispatcher: Arc<Dispatcher<B>>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(dispatcher))
        .with_graceful_shutdown(shutdown)
        .await
}
