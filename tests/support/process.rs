//! Child processes and loopback ports, shared by the cluster test targets and the cluster
//! bench: a free port, a plain HTTP/1.0 GET, and a stop the way a kubelet stops a pod.
//!
//! Include it next to the control plane (`cluster.rs` uses it):
//!
//! ```ignore
//! #[path = "support/process.rs"]
//! mod process;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use std::io::{Read, Write};
use std::process::Child;
use std::time::{Duration, Instant};

/// A loopback port nobody listens on right now, and never handed out before by this process.
/// A port is only bound by whoever it is for later, so without the memory two picks made before
/// either is bound (a webhook's port, then the same operator's metrics port) could be the same
/// port, and the second server fails with "Address already in use".
pub fn free_port() -> u16 {
    static HANDED_OUT: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        if !handed_out.contains(&port) {
            handed_out.push(port);
            return port;
        }
    }
}

/// `GET path` on a loopback port with a minimal HTTP/1.0 client: (status, body). The probe and
/// metrics endpoints are plain text, and a test should not depend on the server's own HTTP
/// stack to check them.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())?;
    Some((status, body))
}

/// SIGKILL, and reap it, so the test leaves no process behind.
pub fn kill(mut child: Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGTERM (what a pod gets), then wait for the exit; SIGKILL after 30 s.
pub fn terminate(mut child: Child) {
    let pid = i32::try_from(child.id()).expect("pid");
    // SAFETY: plain kill(2) on our own child, which has not been reaped yet.
    unsafe {
        libc::kill(pid, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}
