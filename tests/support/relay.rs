//! A TCP relay in front of the API server that a test can turn into a network partition.
//!
//! ```ignore
//! #[path = "support/relay.rs"]
//! mod relay;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The API server's address, from the `server:` line of `kubeconfig` (https://127.0.0.1:PORT).
pub fn apiserver_addr(kubeconfig: &Path) -> SocketAddr {
    let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .and_then(|a| a.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no https://IP:PORT server in {}", kubeconfig.display()))
}

/// A TCP relay to the API server that the test can turn into a black hole: from then on it
/// accepts connections and never answers, and bytes on open connections go nowhere (a network
/// partition drops packets; it does not refuse connections).
pub struct BlackHole {
    pub port: u16,
    black: std::sync::Arc<std::sync::atomic::AtomicBool>,
    accepting: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    pub async fn to(upstream: SocketAddr) -> BlackHole {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the relay");
        let port = listener.local_addr().unwrap().port();
        let black = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = black.clone();
        let accepting = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let black = flag.clone();
                tokio::spawn(async move {
                    if black.load(Ordering::SeqCst) {
                        // Accepted, held open, never answered.
                        match std::future::pending::<std::convert::Infallible>().await {}
                    }
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let (in_r, in_w) = inbound.into_split();
                    let (out_r, out_w) = outbound.into_split();
                    let pipe =
                        |black: std::sync::Arc<std::sync::atomic::AtomicBool>,
                         mut from: tokio::net::tcp::OwnedReadHalf,
                         mut to: tokio::net::tcp::OwnedWriteHalf| async move {
                            let mut buf = vec![0u8; 16 * 1024];
                            loop {
                                let n = match from.read(&mut buf).await {
                                    Ok(0) | Err(_) => return,
                                    Ok(n) => n,
                                };
                                if black.load(Ordering::SeqCst) {
                                    // Both ends stay open (owned by this future);
                                    // nothing is delivered.
                                    match std::future::pending::<std::convert::Infallible>().await {}
                                }
                                if to.write_all(&buf[..n]).await.is_err() {
                                    return;
                                }
                            }
                        };
                    tokio::join!(pipe(black.clone(), in_r, out_w), pipe(black, out_r, in_w));
                });
            }
        });
        BlackHole {
            port,
            black,
            accepting,
        }
    }

    /// A copy of `kubeconfig` (written next to it) that reaches the API server through this
    /// relay.
    pub fn kubeconfig(&self, kubeconfig: &Path) -> PathBuf {
        let text = std::fs::read_to_string(kubeconfig).expect("kubeconfig");
        let upstream = format!("127.0.0.1:{}", apiserver_addr(kubeconfig).port());
        let relayed = text.replace(&upstream, &format!("127.0.0.1:{}", self.port));
        assert_ne!(
            relayed, text,
            "the kubeconfig names the API server as {upstream}"
        );
        let path = kubeconfig.with_file_name(format!("kubeconfig-via-{}", self.port));
        std::fs::write(&path, relayed).expect("write the relayed kubeconfig");
        path
    }

    /// A relay to the API server of `kubeconfig`, and a copy of it that goes through the relay.
    pub async fn in_front_of(kubeconfig: &Path) -> (BlackHole, PathBuf) {
        let hole = BlackHole::to(apiserver_addr(kubeconfig)).await;
        let relayed = hole.kubeconfig(kubeconfig);
        (hole, relayed)
    }

    /// From now on nothing gets through, and nothing is refused.
    pub fn black_hole(&self) {
        self.black.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}
