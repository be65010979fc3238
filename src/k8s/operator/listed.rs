//! "This cache holds the whole list": a flag any number of tasks can wait on.
//!
//! kube's `Store::wait_until_ready` wakes only the task that polled it last: its readiness is a
//! one-shot channel, which keeps one waker, and every poll replaces it. With two waiters in two
//! tasks (a controller's applier and a delivery request, say) the other one sleeps forever, or
//! until its timeout. The operator's caches say they are listed through this instead, and a
//! kube store is only waited on once this says it is ready (so its one-shot already holds the
//! value and answers at the first poll).

use tokio::sync::watch;

/// Set once the cache's first list is in it; never unset (a relist keeps serving the list
/// before until the new one is whole).
#[derive(Clone)]
pub(crate) struct Listed(watch::Sender<bool>);

impl Listed {
    pub(crate) fn new() -> Listed {
        Listed(watch::channel(false).0)
    }

    /// Called once the writer has applied the list's end (`InitDone`).
    pub(crate) fn set(&self) {
        self.0
            .send_if_modified(|listed| !std::mem::replace(listed, true));
    }

    /// Waits until [`Listed::set`] has been called; every waiter is woken.
    pub(crate) async fn wait(&self) {
        let mut listed = self.0.subscribe();
        // Never an error: `self` holds the sender.
        let _ = listed.wait_for(|listed| *listed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn every_waiter_is_woken() {
        let listed = Listed::new();
        let waiters: Vec<_> = (0..3)
            .map(|_| {
                let listed = listed.clone();
                tokio::spawn(async move { listed.wait().await })
            })
            .collect();
        // Let each waiter start waiting before the flag is set.
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        assert!(waiters.iter().all(|w| !w.is_finished()));
        listed.set();
        for waiter in waiters {
            tokio::time::timeout(Duration::from_secs(10), waiter)
                .await
                .expect("a waiter was not woken")
                .expect("waiter");
        }
        // Once set, a wait returns at once.
        listed.wait().await;
    }
}
