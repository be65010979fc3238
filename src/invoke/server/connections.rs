//! Accepting and keeping connections: hyper's HTTP/1 server, with its header-read timer on,
//! under a cap on open connections that sheds the oldest idle one for a new one.
//!
//! Every connection is tracked: how many requests it has in flight, and when it was last busy.
//! A connection with none in flight is idle (a keep-alive connection between requests, or one
//! that has not sent a request yet). At the cap, a new connection closes the idle connection
//! that has been idle longest; if none is idle, the new one is closed at once. The cap sits below
//! the process's file-descriptor limit, so connections that send nothing cannot exhaust the
//! descriptors the server needs for its own files and for the callers it should serve.

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

use super::HttpLimits;

/// File descriptors kept free of connections: the store, the audit log, the tokens and review
/// files, the API server's connections.
const RESERVED_DESCRIPTORS: u64 = 128;

/// At most one warning per this long while accepting keeps failing.
const ACCEPT_WARNING_EVERY: Duration = Duration::from_secs(10);

/// The default cap: the soft file-descriptor limit minus what the server keeps for itself.
pub(super) fn default_max_connections() -> usize {
    let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile)
        .current
        .unwrap_or(65_536);
    usize::try_from(soft.saturating_sub(RESERVED_DESCRIPTORS).clamp(16, 65_536)).unwrap_or(16)
}

/// One open connection, as the cap sees it.
struct Tracked {
    in_flight: AtomicUsize,
    /// Told to close (shed, or shutting down): not counted against the cap, not shed twice.
    closing: AtomicBool,
    /// Milliseconds since the server started, when it last began or finished a request.
    last_busy: AtomicU64,
    close: Notify,
}

struct Registry {
    started: Instant,
    next_id: AtomicU64,
    open: Mutex<HashMap<u64, Arc<Tracked>>>,
}

impl Registry {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Connections open and not told to close.
    fn len(&self) -> usize {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .filter(|c| !c.closing.load(Ordering::Acquire))
            .count()
    }

    /// Closes the connection idle the longest; false if none is idle.
    fn shed_oldest_idle(&self) -> bool {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let oldest = open
            .values()
            .filter(|c| {
                c.in_flight.load(Ordering::Acquire) == 0 && !c.closing.load(Ordering::Acquire)
            })
            .min_by_key(|c| c.last_busy.load(Ordering::Relaxed));
        match oldest {
            Some(c) => {
                c.closing.store(true, Ordering::Release);
                // Ends its idle wait; `notify_one` keeps the signal for a connection not
                // waiting yet.
                c.close.notify_one();
                true
            }
            None => false,
        }
    }

    fn add(&self) -> (u64, Arc<Tracked>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let tracked = Arc::new(Tracked {
            in_flight: AtomicUsize::new(0),
            closing: AtomicBool::new(false),
            last_busy: AtomicU64::new(self.now_ms()),
            close: Notify::new(),
        });
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, tracked.clone());
        (id, tracked)
    }

    fn remove(&self, id: u64) {
        self.open
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }

    fn close_all(&self) {
        for c in self.open.lock().unwrap_or_else(|e| e.into_inner()).values() {
            c.closing.store(true, Ordering::Release);
            c.close.notify_one();
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes; then stops accepting, lets each
/// connection finish the request it is on, and waits for them (at most a header timeout).
/// With `tls`, every connection is TLS: its handshake must end within the header timeout,
/// which counts against the same cap as a request's headers.
pub(super) async fn serve(
    listener: TcpListener,
    app: Router,
    limits: HttpLimits,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let registry = Arc::new(Registry {
        started: Instant::now(),
        next_id: AtomicU64::new(0),
        open: Mutex::new(HashMap::new()),
    });
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_accept_warning = None;
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => accepted,
            // Reap finished connection tasks as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors (or another transient failure): make room, breathe, go on.
                // Logged once per burst, not once per attempt.
                if last_accept_warning.is_none_or(|at: Instant| at.elapsed() > ACCEPT_WARNING_EVERY)
                {
                    tracing::warn!(error = %e, "accepting a connection failed; closing the connection idle longest");
                    last_accept_warning = Some(Instant::now());
                }
                registry.shed_oldest_idle();
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        if registry.len() >= limits.max_connections && !registry.shed_oldest_idle() {
            tracing::warn!(
                max = limits.max_connections,
                "connection refused: every open connection is busy"
            );
            drop(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let (id, tracked) = registry.add();
        let (registry, app, tls) = (registry.clone(), app.clone(), tls.clone());
        tasks.spawn(async move {
            match tls {
                None => serve_connection(stream, app, limits, &registry, &tracked).await,
                Some(tls) => {
                    // A client that never finishes its handshake is cut off like one that never
                    // sends its headers; a shed or a shutdown ends the wait too.
                    let handshake = tokio::time::timeout(limits.header_timeout, tls.accept(stream));
                    let accepted = tokio::select! {
                        accepted = handshake => accepted,
                        () = tracked.close.notified() => Ok(Err(std::io::ErrorKind::Interrupted.into())),
                    };
                    match accepted {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, app, limits, &registry, &tracked).await
                        }
                        Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                }
            }
            registry.remove(id);
        });
    }
    drop(listener);
    registry.close_all();
    let _ = tokio::time::timeout(limits.header_timeout.max(limits.body_timeout), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    Ok(())
}

async fn serve_connection<S>(
    stream: S,
    app: Router,
    limits: HttpLimits,
    registry: &Registry,
    tracked: &Arc<Tracked>,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let counted = tracked.clone();
    let started = registry.started;
    let service = hyper::service::service_fn(move |request: hyper::Request<Incoming>| {
        let counted = counted.clone();
        counted.in_flight.fetch_add(1, Ordering::AcqRel);
        let app = app.clone();
        async move {
            let response = app.oneshot(request.map(axum::body::Body::new)).await;
            counted.in_flight.fetch_sub(1, Ordering::AcqRel);
            let now = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
            counted.last_busy.store(now, Ordering::Relaxed);
            response
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .keep_alive(true);
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    tokio::select! {
        result = connection.as_mut() => {
            if let Err(e) = result {
                tracing::debug!(error = %e, "connection ended");
            }
        }
        () = tracked.close.notified() => {
            // Shed or shutting down: finish the request in flight, if any, then close.
            connection.as_mut().graceful_shutdown();
            let _ = connection.await;
        }
    }
}
