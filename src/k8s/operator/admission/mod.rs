//! The mutating admission webhook: ClawSecret data is sealed before the API server stores the
//! object, so plaintext never reaches etcd. Every replica serves it (leader or not); the
//! reconcile loop only seals what arrives stored anyway (webhook bypassed or not installed).
//!
//! - `review.rs`: one AdmissionReview in, a JSON patch (or a refusal naming the rule) out.
//! - `certs.rs`: the serving certificate (managed by the operator, or files from cert-manager).
//! - this file: the HTTPS server, and keeping its certificate current. The same server answers
//!   nodes' `GET /v1/deliveries` ([`super::deliveries`]).
//!
//! The chart's MutatingWebhookConfiguration sends only writes that carry data (a
//! `matchConditions` expression), with `failurePolicy: Fail`: while no replica answers,
//! plaintext is refused rather than stored, and every other write (status, finalizers,
//! sealed objects, deletion) goes through.

mod certs;
mod review;

pub use certs::CertSource;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::sign::CertifiedKey;

use super::deliveries::Deliveries;
use super::metrics::Metrics;
use super::writes::Writes;
use crate::crypto::SharedKeyring;
use crate::tls::ServingCert;
use zeroize::Zeroizing;

/// The path the webhook configuration calls.
pub const PATH: &str = "/seal";

/// Largest review body read: an object (at most ~3 MiB in etcd) and its previous state.
const MAX_BODY: usize = 8 << 20;

/// How often the certificate is looked at again (renewal, a new file from cert-manager).
const REFRESH: Duration = Duration::from_secs(600);

/// A TLS handshake or a request that takes longer than this is dropped (the API server's
/// webhook timeout is at most 30 s).
const IO_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub addr: SocketAddr,
    pub certs: CertSource,
}

fn certified_key(serving: &certs::Serving) -> Result<Arc<CertifiedKey>, String> {
    crate::tls::certified_key(
        serving.chain_pem.as_bytes(),
        serving.key_pem.as_bytes(),
        "the webhook's serving certificate",
    )
    .map_err(|e| e.to_string())
}

/// Binds the webhook's port and gets its certificate: both must work before the operator
/// reports itself started.
pub struct Webhook {
    listener: TcpListener,
    cert: Arc<ServingCert>,
    serving: certs::Serving,
    config: WebhookConfig,
}

impl Webhook {
    pub async fn bind(
        client: &kube::Client,
        namespace: &str,
        config: WebhookConfig,
    ) -> Result<Webhook, String> {
        let serving = certs::current(client, namespace, &config.certs)
            .await
            .map_err(|e| e.to_string())?;
        let cert = ServingCert::new(certified_key(&serving)?);
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|e| format!("cannot serve the admission webhook on {}: {e}", config.addr))?;
        Ok(Webhook {
            listener,
            cert,
            serving,
            config,
        })
    }

    /// Serves until `stop` resolves, re-reading the certificate every [`REFRESH`].
    pub async fn serve(
        self,
        client: kube::Client,
        namespace: String,
        keyring: SharedKeyring,
        metrics: Arc<Metrics>,
        nodes: NodeEndpoints,
        stop: impl Future<Output = ()> + Send + 'static,
    ) {
        let Webhook {
            listener,
            cert,
            mut serving,
            config,
        } = self;
        let refresher = {
            let cert = cert.clone();
            async move {
                loop {
                    tokio::time::sleep(REFRESH).await;
                    match certs::current(&client, &namespace, &config.certs).await {
                        Ok(next) if next != serving => match certified_key(&next) {
                            Ok(key) => {
                                cert.replace(key);
                                serving = next;
                                tracing::info!("the webhook serves a new certificate");
                            }
                            Err(e) => tracing::warn!(error = %e, "kept the webhook's certificate"),
                        },
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "could not check the webhook's certificate")
                        }
                    }
                }
            }
        };
        let acceptor = TlsAcceptor::from(crate::tls::server_config(cert));
        let accept = async move {
            loop {
                let (tcp, peer) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(error = %e, "webhook: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                let (acceptor, keyring, metrics, nodes) = (
                    acceptor.clone(),
                    keyring.clone(),
                    metrics.clone(),
                    nodes.clone(),
                );
                tokio::spawn(async move {
                    let Ok(Ok(tls)) = tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await
                    else {
                        tracing::debug!(%peer, "webhook: TLS handshake failed or timed out");
                        return;
                    };
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, keyring.clone(), metrics.clone(), nodes.clone())
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(IO_TIMEOUT)
                        .serve_connection(TokioIo::new(tls), service);
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "webhook: connection ended");
                    }
                });
            }
        };
        tokio::select! {
            () = accept => {}
            () = refresher => {}
            () = stop => {}
        }
    }
}

/// What the webhook's HTTPS server also answers for nodes' agents: their deliveries, and the
/// writes it carries for them (with a data dir).
#[derive(Clone)]
pub struct NodeEndpoints {
    pub deliveries: Arc<Deliveries>,
    pub writes: Option<Arc<Writes>>,
}

async fn handle(
    req: Request<Incoming>,
    keyring: SharedKeyring,
    metrics: Arc<Metrics>,
    nodes: NodeEndpoints,
) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    let reply = |status: StatusCode, body: Vec<u8>, json: bool| {
        let mut r = Response::new(Full::new(Bytes::from(body)));
        *r.status_mut() = status;
        if json {
            r.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
        }
        Ok(r)
    };
    if req.uri().path() == crate::k8s::delivery::PATH {
        if req.method() != Method::GET {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                b"GET only\n".to_vec(),
                false,
            );
        }
        return Ok(nodes
            .deliveries
            .answer(req.headers(), req.uri().query())
            .await);
    }
    if req.uri().path() == crate::k8s::forward::PATH {
        if req.method() != Method::POST {
            return reply(
                StatusCode::METHOD_NOT_ALLOWED,
                b"POST only\n".to_vec(),
                false,
            );
        }
        return match nodes.writes {
            Some(writes) => Ok(writes.answer(req).await),
            None => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                b"this operator replica carries no writes: it runs without --data-dir\n".to_vec(),
                false,
            ),
        };
    }
    if req.uri().path() != PATH {
        return reply(StatusCode::NOT_FOUND, b"not found\n".to_vec(), false);
    }
    if req.method() != Method::POST {
        return reply(
            StatusCode::METHOD_NOT_ALLOWED,
            b"POST only\n".to_vec(),
            false,
        );
    }
    let body = match tokio::time::timeout(
        IO_TIMEOUT,
        Limited::new(req.into_body(), MAX_BODY).collect(),
    )
    .await
    {
        Ok(Ok(collected)) => collected.to_bytes(),
        _ => {
            return reply(
                StatusCode::BAD_REQUEST,
                b"the review could not be read (over 8 MiB, or too slow)\n".to_vec(),
                false,
            );
        }
    };
    // The request holds plaintext: copied once into a buffer wiped on drop, and the original
    // wiped where it is ours alone.
    let body = wipe_after_copy(body);
    match review::review(&body, &keyring.current()) {
        Ok(answer) => {
            if let Some(result) = answer.result {
                metrics.admitted(result);
            }
            if let Some(s) = &answer.sealed {
                metrics.sealed(s.version == 1);
                tracing::info!(namespace = %s.namespace, name = %s.name, version = s.version,
                    key_id = %s.key_id, "sealed at admission; the plaintext was never stored");
            }
            reply(StatusCode::OK, answer.body, true)
        }
        Err(message) => reply(StatusCode::BAD_REQUEST, message.into_bytes(), false),
    }
}

/// The body in a buffer wiped on drop; the received one wiped too when no one else holds it.
fn wipe_after_copy(body: Bytes) -> Zeroizing<Vec<u8>> {
    let copy = Zeroizing::new(body.to_vec());
    if let Ok(mut owned) = body.try_into_mut() {
        zeroize::Zeroize::zeroize(&mut owned[..]);
    }
    copy
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_rustls::TlsConnector;

    /// A TLS handshake with the server's configuration serving `serving`, by a client that
    /// trusts only `ca_pem` (as the API server trusts only the caBundle) and asks for `host`.
    async fn handshake(serving: &certs::Serving, ca_pem: &str, host: &str) -> Result<(), String> {
        let cert = ServingCert::new(certified_key(serving)?);
        let acceptor = TlsAcceptor::from(crate::tls::server_config(cert));
        let client = crate::tls::client_config(ca_pem.as_bytes(), "the CA").unwrap();
        let connector = TlsConnector::from(client);
        let (a, b) = tokio::io::duplex(64 * 1024);
        let name = crate::tls::server_name(host).unwrap();
        let (server, client) = tokio::join!(acceptor.accept(a), connector.connect(name, b));
        client.map_err(|e| e.to_string())?;
        server.map_err(|e| e.to_string())?;
        Ok(())
    }

    #[tokio::test]
    async fn the_serving_certificate_verifies_against_the_ca_for_its_hosts_only() {
        let (ca, ca_key) = certs::tests::new_ca_for_tests();
        let hosts = [
            "claw-secrets-webhook.claw-secrets.svc".to_owned(),
            "127.0.0.1".to_owned(),
        ];
        let first = certs::tests::issue_for_tests(&ca_key, &hosts);
        let renewed = certs::tests::issue_for_tests(&ca_key, &hosts);
        assert!(first.chain_pem != renewed.chain_pem);
        for serving in [&first, &renewed] {
            for host in &hosts {
                handshake(serving, &ca, host).await.unwrap();
            }
            let wrong = handshake(serving, &ca, "other.claw-secrets.svc").await;
            assert!(wrong.is_err(), "a name the certificate does not cover");
        }
        let (other_ca, _) = certs::tests::new_ca_for_tests();
        assert!(
            handshake(&first, &other_ca, &hosts[0]).await.is_err(),
            "another CA"
        );
    }
}
