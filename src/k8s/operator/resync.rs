//! The periodic look at every object (a safety net against a missed watch event; a reconcile
//! writes nothing when nothing changed), as one paced sweep per period rather than a timer per
//! object.
//!
//! A healthy object used to end its reconcile with `Action::requeue(RESYNC)`: kube's scheduler
//! then keeps a timer per object, about 520 B each (the object's reference with its
//! resourceVersion and uid, twice, and a delay-queue slot): 5 MiB of the operator's memory at
//! 10,000 ClawSecrets, held all the time. The sweep holds one short name per object while a pass
//! runs, and spreads the pass over the period, so the reconciles do not come all at once either.

use futures::Stream;
use kube::Resource;
use kube::runtime::reflector::{ObjectRef, Store};
use std::collections::VecDeque;
use std::time::Duration;

/// Every object of `store` once per `period`, one at a time, evenly spaced over the period; the
/// first pass starts one period from now (every object is reconciled when the controller
/// starts). Objects created during a pass wait for the next one; deleted ones are skipped by
/// the controller (it finds no object to reconcile).
pub(crate) fn sweep<K>(store: Store<K>, period: Duration) -> impl Stream<Item = ObjectRef<K>> + Send
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    let first = tokio::time::Instant::now() + period;
    let idle = Pass {
        due: VecDeque::new(),
        gap: period,
    };
    futures::stream::unfold(
        (store, idle, first),
        move |(store, mut pass, mut next)| async move {
            loop {
                if let Some((namespace, name)) = pass.due.pop_front() {
                    tokio::time::sleep(pass.gap).await;
                    let r = ObjectRef::new(&name);
                    let r = match namespace {
                        Some(ns) => r.within(&ns),
                        None => r,
                    };
                    return Some((r, (store, pass, next)));
                }
                tokio::time::sleep_until(next).await;
                pass = Pass::of(&store, period);
                next += period;
            }
        },
    )
}

/// What a pass has left to look at, and the time between two objects.
struct Pass {
    due: VecDeque<(Option<Box<str>>, Box<str>)>,
    gap: Duration,
}

impl Pass {
    fn of<K>(store: &Store<K>, period: Duration) -> Pass
    where
        K: Resource<DynamicType = ()> + Clone + 'static,
    {
        let due: VecDeque<_> = store
            .state()
            .iter()
            .map(|obj| {
                let meta = obj.meta();
                (
                    meta.namespace.as_deref().map(Box::from),
                    Box::from(meta.name.as_deref().unwrap_or_default()),
                )
            })
            .collect();
        // n objects, n + 1 gaps: the last object a gap before the next pass (at most one object
        // a millisecond).
        let count = u32::try_from(due.len() + 1).unwrap_or(u32::MAX);
        let gap = (period / count).max(Duration::from_millis(1));
        Pass { due, gap }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::runtime::{reflector, watcher};

    fn config_map(namespace: &str, name: &str) -> ConfigMap {
        let mut cm = ConfigMap::default();
        cm.metadata.namespace = Some(namespace.to_owned());
        cm.metadata.name = Some(name.to_owned());
        cm
    }

    #[tokio::test]
    async fn each_object_once_per_period_spread_over_it() {
        let (store, mut writer) = reflector::store::<ConfigMap>();
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(config_map("a", "one")),
            watcher::Event::InitApply(config_map("b", "two")),
            watcher::Event::InitApply(config_map("a", "three")),
            watcher::Event::InitDone,
        ] {
            writer.apply_watcher_event(&event);
        }
        let period = Duration::from_millis(400);
        let start = tokio::time::Instant::now();
        let mut sweep = Box::pin(sweep(store, period));
        let mut seen = Vec::new();
        for _ in 0..6 {
            let r = sweep.next().await.expect("the sweep never ends");
            seen.push((
                start.elapsed(),
                format!("{}/{}", r.namespace.unwrap_or_default(), r.name),
            ));
        }
        // Nothing before the first period and a gap (a quarter of it) are over, and the second
        // pass begins a period after the first: lower bounds, which sleeping guarantees.
        let gap = period / 4;
        for (i, (at, _)) in seen.iter().enumerate() {
            let pass = u32::try_from(i / 3).unwrap() + 1;
            let within = u32::try_from(i % 3).unwrap() + 1;
            assert!(*at >= period * pass + gap * within, "{i}: {at:?}");
        }
        let mut first: Vec<&str> = seen[..3].iter().map(|(_, n)| n.as_str()).collect();
        first.sort();
        assert_eq!(first, ["a/one", "a/three", "b/two"]);
        let mut second: Vec<&str> = seen[3..].iter().map(|(_, n)| n.as_str()).collect();
        second.sort();
        assert_eq!(first, second);
    }
}
