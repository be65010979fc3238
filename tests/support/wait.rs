//! Waiting for what should happen, never asserting how fast it did: one patience for every
//! test (the machine is shared with builds), polled often.
//!
//! ```ignore
//! #[path = "support/wait.rs"]
//! mod wait;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use std::future::Future;
use std::time::{Duration, Instant};

/// Guard against hanging forever while waiting for something that should happen; never a
/// performance assertion.
pub const PATIENCE: Duration = Duration::from_secs(120);

/// Polls `check` every 50 ms until it returns `Ok`; fails the test with `what` and the last
/// state after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + PATIENCE;
    loop {
        match check().await {
            Ok(v) => return v,
            Err(last) if Instant::now() >= deadline => {
                panic!("timed out after {PATIENCE:?} waiting for {what}; last state: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}
