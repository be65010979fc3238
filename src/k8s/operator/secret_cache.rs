//! The one cache of ClawSecrets a replica keeps (docs/operator.md, "Memory").
//!
//! With the delivery endpoint, every replica watches every ClawSecret for it, and the leader's
//! ClawSecret controller used to watch and cache them all a second time. Now the controller
//! reads the deliveries' cache and is triggered from its watch ([`SharedSecrets::controller`]):
//! one watch and one copy of each object per process. Without the endpoint the controller
//! keeps a cache of its own, trimmed the same way ([`lean`]).
//!
//! Each cached object keeps what one of its readers reads, nothing else (see [`lean`]).

use futures::StreamExt;
use kube::core::DeserializeGuard;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;

use super::listed::Listed;

use crate::k8s::crd::ClawSecret;
use crate::k8s::last_applied;

/// A cached ClawSecret: as this version reads it, or why it cannot (the controller reports
/// that; deliveries skip it).
pub(crate) type Cached = DeserializeGuard<ClawSecret>;

/// Drops what no reader of the cache reads, before an object is cached:
///
/// - `managedFields`, labels, owner references, `generateName`, `selfLink`: never read;
/// - annotations, except kubectl's last-applied copy while the object holds data to seal (the
///   seal write removes the plaintext from it; nothing else reads annotations);
///
/// Kept: name, namespace, uid, resourceVersion, generation, creationTimestamp, deletion,
/// finalizers (the legacy one is removed), the spec (the seal, selectors, workloads) and the
/// status (the controller compares it with what it would write).
pub(crate) fn lean(obj: &mut Cached) {
    match &mut obj.0 {
        Ok(secret) => {
            let to_seal = secret.spec.data.is_some() || secret.spec.encrypted_data.is_some();
            let meta = &mut secret.metadata;
            meta.annotations = meta
                .annotations
                .take()
                .filter(|_| to_seal)
                .and_then(|mut all| {
                    let applied = all.remove(last_applied::ANNOTATION)?;
                    Some([(last_applied::ANNOTATION.to_owned(), applied)].into())
                });
            lean_meta(meta);
        }
        Err(invalid) => {
            invalid.metadata.annotations = None;
            lean_meta(&mut invalid.metadata);
        }
    }
}

fn lean_meta(meta: &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) {
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = None;
    meta.generate_name = None;
    meta.self_link = None;
}

/// Where the leader's controller is told of the watch's events while it leads.
struct Follower {
    /// The controller's namespace (`--watch-namespace`); `None`: all.
    scope: Option<String>,
    /// Objects to reconcile: applied, or (re)listed once the list is in the cache.
    changed: mpsc::UnboundedSender<ObjectRef<Cached>>,
    /// Objects the watch saw deleted (their Deleted Event).
    deleted: mpsc::UnboundedSender<Cached>,
}

impl Follower {
    fn in_scope(&self, obj: &Cached) -> bool {
        in_scope(self.scope.as_deref(), obj)
    }
}

/// Whether `obj` is in the namespace `scope` (`None`: every namespace).
pub(crate) fn in_scope(scope: Option<&str>, obj: &Cached) -> bool {
    use kube::Resource;
    scope.is_none_or(|ns| obj.meta().namespace.as_deref() == Some(ns))
}

/// The replica's ClawSecret cache, for the controller to follow.
#[derive(Clone)]
pub(crate) struct SharedSecrets {
    store: Store<Cached>,
    follower: Arc<Mutex<Option<Follower>>>,
    /// Set once the first list is in the cache (waited on instead of the store's own
    /// readiness, which wakes one waiter only: see [`Listed`]).
    listed: Listed,
}

impl SharedSecrets {
    pub(crate) fn new(store: Store<Cached>) -> SharedSecrets {
        SharedSecrets {
            store,
            follower: Arc::default(),
            listed: Listed::new(),
        }
    }

    /// Waits until the cache holds the whole first list.
    pub(crate) async fn wait_listed(&self) {
        self.listed.wait().await;
    }

    /// Passes one watch event (already applied to the cache) on to the controller, if one
    /// follows. A (re)listed object is passed on when the whole list is in the cache
    /// (`InitDone`): until then the cache holds the list before.
    pub(crate) fn saw(&self, event: &watcher::Event<Cached>) {
        let mut follower = self.follower.lock().unwrap_or_else(|p| p.into_inner());
        if matches!(event, watcher::Event::InitDone) {
            // Under the lock: a controller starting now either lists the cache itself or
            // is sent the list below, never neither.
            self.listed.set();
        }
        let Some(f) = follower.as_ref() else {
            return;
        };
        let sent = match event {
            watcher::Event::Apply(obj) if f.in_scope(obj) => {
                f.changed.send(ObjectRef::from_obj(obj)).is_ok()
            }
            watcher::Event::Delete(obj) if f.in_scope(obj) => f.deleted.send(obj.clone()).is_ok(),
            watcher::Event::InitDone => self
                .store
                .state()
                .iter()
                .filter(|obj| f.in_scope(obj))
                .all(|obj| f.changed.send(ObjectRef::from_obj(obj.as_ref())).is_ok()),
            _ => true,
        };
        if !sent {
            // The controller is gone (the leadership ended).
            *follower = None;
        }
    }

    /// The leader's ClawSecret controller over this cache, once it holds the first list:
    /// every cached object in `scope` is reconciled once at the start (as a controller's own
    /// first list would have it), then every change the watch sees; deletions are sent to
    /// `deleted`. It follows until it is dropped (another call replaces it).
    ///
    /// The controller is made only once the cache is listed, so that its applier's wait for
    /// the store's readiness returns at once: kube's readiness wakes one waiter only, and the
    /// deliveries' requests wait on the same store.
    pub(crate) async fn controller(
        &self,
        scope: Option<String>,
        deleted: mpsc::UnboundedSender<Cached>,
    ) -> Controller<Cached> {
        self.wait_listed().await;
        let (changed, mut changes) = mpsc::unbounded_channel();
        // Following and listing under the lock `saw` takes: every object applied before is in
        // the list, every one after is sent (one in between may be reconciled twice).
        let cached: Vec<ObjectRef<Cached>> = {
            let mut follower = self.follower.lock().unwrap_or_else(|p| p.into_inner());
            *follower = Some(Follower {
                scope: scope.clone(),
                changed,
                deleted,
            });
            self.store
                .state()
                .iter()
                .filter(|obj| in_scope(scope.as_deref(), obj))
                .map(|obj| ObjectRef::from_obj(obj.as_ref()))
                .collect()
        };
        let followed = futures::stream::poll_fn(move |cx| changes.poll_recv(cx));
        Controller::for_stream(futures::stream::pending(), self.store.clone())
            .reconcile_on(futures::stream::iter(cached).chain(followed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::k8s::crd::{ClawSecretSpec, ClawSecretStatus, Condition};
    use kube::runtime::reflector;
    use std::collections::BTreeMap;

    fn secret(namespace: &str, name: &str, data: bool) -> Cached {
        let mut s = ClawSecret::new(
            name,
            ClawSecretSpec {
                name: None,
                data: data.then(|| BTreeMap::from([("k".to_owned(), "canary-9".to_owned())])),
                encrypted_data: None,
                allowed_workloads: vec!["api".to_owned()],
                node_selector: Some(BTreeMap::from([("gpu".to_owned(), "true".to_owned())])),
                sealed: None,
            },
        );
        s.metadata.namespace = Some(namespace.to_owned());
        s.metadata.resource_version = Some("7".to_owned());
        s.metadata.uid = Some("u-1".to_owned());
        s.metadata.generation = Some(2);
        s.metadata.labels = Some(BTreeMap::from([("team".to_owned(), "a".to_owned())]));
        s.metadata.annotations = Some(BTreeMap::from([
            (last_applied::ANNOTATION.to_owned(), "{}".to_owned()),
            ("other".to_owned(), "x".to_owned()),
        ]));
        s.metadata.managed_fields = Some(vec![Default::default()]);
        s.metadata.finalizers = Some(vec![super::super::LEGACY_FINALIZER.to_owned()]);
        s.status = Some(ClawSecretStatus {
            version: Some(1),
            observed_generation: Some(2),
            conditions: vec![Condition {
                type_: "Ready".to_owned(),
                status: "True".to_owned(),
                reason: "Sealed".to_owned(),
                message: "m".to_owned(),
                last_transition_time: "2026-01-01T00:00:00Z".to_owned(),
                observed_generation: Some(2),
            }],
        });
        DeserializeGuard(Ok(s))
    }

    #[test]
    fn the_cache_keeps_what_the_controller_and_deliveries_read() {
        let whole = secret("team-a", "db", true);
        let mut lean_one = whole.clone();
        lean(&mut lean_one);
        let (w, l) = (whole.0.unwrap(), lean_one.0.unwrap());
        assert_eq!((&l.spec, &l.status), (&w.spec, &w.status));
        let (wm, lm) = (&w.metadata, &l.metadata);
        assert_eq!(
            (&lm.name, &lm.namespace, &lm.uid, &lm.resource_version),
            (&wm.name, &wm.namespace, &wm.uid, &wm.resource_version)
        );
        assert_eq!(
            (lm.generation, &lm.finalizers),
            (wm.generation, &wm.finalizers)
        );
        assert!(lm.managed_fields.is_none() && lm.labels.is_none());
        // The seal write removes the plaintext from kubectl's copy: kept while there is data.
        assert_eq!(
            lm.annotations,
            Some(BTreeMap::from([(
                last_applied::ANNOTATION.to_owned(),
                "{}".to_owned()
            )]))
        );
        let mut sealed = secret("team-a", "db", false);
        lean(&mut sealed);
        assert!(sealed.0.unwrap().metadata.annotations.is_none());
    }

    fn refs(rx: &mut mpsc::UnboundedReceiver<ObjectRef<Cached>>) -> Vec<String> {
        let mut names = Vec::new();
        while let Ok(r) = rx.try_recv() {
            names.push(format!("{}/{}", r.namespace.unwrap_or_default(), r.name));
        }
        names.sort();
        names
    }

    #[test]
    fn the_controller_is_told_of_changes_in_its_scope_once_cached() {
        let (store, mut writer) = reflector::store::<Cached>();
        let shared = SharedSecrets::new(store);
        let apply = |writer: &mut reflector::store::Writer<Cached>,
                     event: watcher::Event<Cached>| {
            writer.apply_watcher_event(&event);
            shared.saw(&event);
        };
        // Nobody follows: nothing is kept for a controller.
        apply(&mut writer, watcher::Event::Init);
        apply(
            &mut writer,
            watcher::Event::InitApply(secret("team-a", "x", false)),
        );
        apply(&mut writer, watcher::Event::InitDone);

        let (changed, mut changes) = mpsc::unbounded_channel();
        let (deleted, mut deletions) = mpsc::unbounded_channel();
        *shared.follower.lock().unwrap() = Some(Follower {
            scope: Some("team-a".to_owned()),
            changed,
            deleted,
        });
        apply(
            &mut writer,
            watcher::Event::Apply(secret("team-a", "a", false)),
        );
        apply(
            &mut writer,
            watcher::Event::Apply(secret("team-b", "b", false)),
        );
        assert_eq!(refs(&mut changes), ["team-a/a"]);
        apply(
            &mut writer,
            watcher::Event::Delete(secret("team-b", "b", false)),
        );
        apply(
            &mut writer,
            watcher::Event::Delete(secret("team-a", "a", false)),
        );
        let gone = deletions.try_recv().unwrap();
        assert_eq!(gone.0.unwrap().metadata.name.as_deref(), Some("a"));
        assert!(deletions.try_recv().is_err());

        // A relist: its objects once the whole list is in the cache, not before.
        apply(&mut writer, watcher::Event::Init);
        apply(
            &mut writer,
            watcher::Event::InitApply(secret("team-a", "c", false)),
        );
        apply(
            &mut writer,
            watcher::Event::InitApply(secret("team-b", "d", false)),
        );
        assert!(refs(&mut changes).is_empty());
        apply(&mut writer, watcher::Event::InitDone);
        assert_eq!(refs(&mut changes), ["team-a/c"]);

        // The controller gone (leadership lost): no longer followed.
        drop(changes);
        apply(
            &mut writer,
            watcher::Event::Apply(secret("team-a", "e", false)),
        );
        assert!(shared.follower.lock().unwrap().is_none());
    }

    /// Runs `controller`, recording the name of each object it reconciles.
    async fn record_reconciles(controller: Controller<Cached>, seen: Arc<Mutex<Vec<String>>>) {
        controller
            .run(
                move |obj: Arc<Cached>, _ctx: Arc<()>| {
                    let seen = seen.clone();
                    async move {
                        use kube::Resource;
                        seen.lock()
                            .unwrap()
                            .push(obj.meta().name.clone().unwrap_or_default());
                        Ok::<_, std::convert::Infallible>(
                            kube::runtime::controller::Action::await_change(),
                        )
                    }
                },
                |_, _, _| kube::runtime::controller::Action::await_change(),
                Arc::new(()),
            )
            .for_each(|_| async {})
            .await;
    }

    #[tokio::test]
    async fn a_new_controller_starts_from_everything_cached_in_its_scope() {
        let (store, mut writer) = reflector::store::<Cached>();
        let shared = SharedSecrets::new(store);
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(secret("team-a", "a", false)),
            watcher::Event::InitApply(secret("team-b", "b", false)),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
            shared.saw(&event);
        }
        let (deleted, _deletions) = mpsc::unbounded_channel();
        let controller = shared.controller(Some("team-a".to_owned()), deleted).await;
        let reconciled = Arc::new(Mutex::new(Vec::new()));
        let mut run = Box::pin(record_reconciles(controller, reconciled.clone()));
        let follow = async {
            while reconciled.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
            // A change after the start reaches it through the watch.
            let event = watcher::Event::Apply(secret("team-a", "c", false));
            writer.apply_watcher_event(&event);
            shared.saw(&event);
            while reconciled.lock().unwrap().len() < 2 {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            () = &mut run => panic!("the controller ended"),
            () = follow => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(10)) => panic!("not reconciled"),
        }
        assert_eq!(*reconciled.lock().unwrap(), ["a", "c"]);
    }

    /// The CI failure of the first version of this cache: the controller (made before the
    /// watch's first list was done) waited on the store's readiness alongside a delivery
    /// request, kube's readiness woke only the request, and no ClawSecret was reconciled.
    #[tokio::test]
    async fn a_controller_asked_for_before_the_list_reconciles_it_though_others_wait_too() {
        let (store, mut writer) = reflector::store::<Cached>();
        let shared = SharedSecrets::new(store.clone());
        let apply = |writer: &mut reflector::store::Writer<Cached>,
                     event: watcher::Event<Cached>| {
            writer.apply_watcher_event(&event);
            shared.saw(&event);
        };
        apply(&mut writer, watcher::Event::Init);
        let reconciled = Arc::new(Mutex::new(Vec::new()));
        let (deleted, _deletions) = mpsc::unbounded_channel();
        let (leader, seen) = (shared.clone(), reconciled.clone());
        let mut run = Box::pin(async move {
            let controller = leader.controller(None, deleted).await;
            record_reconciles(controller, seen).await;
        });
        let list = async {
            // The controller waits first, then a delivery request in another task.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            let request = tokio::spawn(async move { store.wait_until_ready().await });
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            apply(
                &mut writer,
                watcher::Event::InitApply(secret("team-a", "a", false)),
            );
            apply(&mut writer, watcher::Event::InitDone);
            request.await.expect("request").expect("ready");
            while reconciled.lock().unwrap().is_empty() {
                tokio::task::yield_now().await;
            }
        };
        tokio::select! {
            () = &mut run => panic!("the controller ended"),
            () = list => {}
            () = tokio::time::sleep(std::time::Duration::from_secs(10)) => panic!("not reconciled"),
        }
        assert_eq!(*reconciled.lock().unwrap(), ["a"]);
    }
}
