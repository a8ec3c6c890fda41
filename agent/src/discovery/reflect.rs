//! The watch plumbing: one reflector per resource (list, then watch;
//! re-list after an error or a 410 Gone, keeping the last state
//! meanwhile), each waking the rebuild when its objects change, and
//! reporting a failing watch once per change of state, not once per retry.

use std::{fmt::Debug, sync::Arc};

use futures::StreamExt;
use kube::{
    Api, Resource,
    runtime::{WatchStreamExt, reflector, watcher},
};
use log::{error, info, warn};
use tokio::sync::Notify;

use crate::drain::DrainWatch;

/// One resource's reflector: its store, and a task that keeps it fed.
pub(super) struct Reflected<K: Resource + Clone + 'static>
where
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    store: reflector::Store<K>,
}

impl<K> Reflected<K>
where
    K: Resource + Clone + 'static,
    K::DynamicType: std::hash::Hash + Eq + Clone,
{
    /// Listed completely at least once.
    pub(super) fn is_ready(&self) -> bool {
        futures::FutureExt::now_or_never(self.store.wait_until_ready()).is_some_and(|r| r.is_ok())
    }

    /// The objects as the store holds them (shared, not copied).
    pub(super) fn snapshot(&self) -> Vec<Arc<K>> {
        self.store.state()
    }
}

/// Starts a reflector of `api`'s objects (those `config` selects), which
/// wakes `changed` at every change and stops when `drain` starts.
pub(super) fn reflect<K>(
    api: Api<K>,
    config: watcher::Config,
    changed: &Arc<Notify>,
    drain: &DrainWatch,
) -> Reflected<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + Debug
        + Send
        + Sync
        + serde::de::DeserializeOwned
        + 'static,
{
    let plural = K::plural(&()).into_owned();
    let (store, writer) = reflector::store::<K>();
    let stream = reflector(writer, watcher(api, config)).default_backoff();
    let changed = changed.clone();
    let mut drain = drain.clone();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        // Logged once per change of state, not once per retry.
        let mut failing = false;
        loop {
            let next = tokio::select! {
                _ = drain.draining() => return,
                next = stream.next() => next,
            };
            match next {
                // The start of a (re-)list says nothing yet about success.
                Some(Ok(watcher::Event::Init | watcher::Event::InitApply(_))) => {}
                Some(Ok(_)) => {
                    if failing {
                        failing = false;
                        info!("kubernetes: watching {plural} again");
                    }
                    changed.notify_one();
                }
                Some(Err(e)) => {
                    if !failing {
                        failing = true;
                        report(&plural, &e);
                    }
                }
                None => return,
            }
        }
    });
    Reflected { store }
}

/// One line that says what is wrong: a missing RBAC right names the
/// resource and verb to grant.
fn report(plural: &str, e: &watcher::Error) {
    let text = e.to_string();
    let forbidden = match e {
        watcher::Error::InitialListFailed(k)
        | watcher::Error::WatchStartFailed(k)
        | watcher::Error::WatchFailed(k) => {
            matches!(k, kube::Error::Api(s) if s.code == 403)
        }
        watcher::Error::WatchError(s) => s.code == 403,
        _ => false,
    };
    if forbidden {
        let verb = if matches!(e, watcher::Error::InitialListFailed(_)) {
            "list"
        } else {
            "watch"
        };
        error!(
            "kubernetes: the API server refused to {verb} {plural} (403 Forbidden): the agent's \
             ClusterRole must grant get, list, watch on {plural}; keeping the last catalog and retrying"
        );
    } else {
        warn!(
            "kubernetes: cannot watch {plural} ({text}); keeping the last catalog and retrying with backoff"
        );
    }
}
