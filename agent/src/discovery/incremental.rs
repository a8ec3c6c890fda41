//! Translation that redoes only what changed. Each Service's entries are
//! kept with a fingerprint of everything they were made from (the
//! Service's and its EndpointSlices' resourceVersions, its namespace's
//! mode, and what every Service shares: the names of this node's
//! workloads, the known peers, the default mode). An event that changes one EndpointSlice then
//! translates one Service, and the rest of the result is the same shared
//! values as before, which lets the daemon apply only the difference.

use std::{
    borrow::Cow,
    collections::HashMap,
    hash::{DefaultHasher, Hash, Hasher},
    sync::Arc,
};

use super::translate::{
    MODE_ANNOTATION, Objects, PodPlace, Settings, Translated, annotation, orphan_slices,
    slices_by_service, translate,
};
use crate::config::ServiceSpec;

/// One Service's part of the translation.
#[derive(Debug)]
struct Cached {
    fingerprint: u64,
    /// The last translation that saw the Service.
    seen: u64,
    /// Its namespace and name.
    name: (String, String),
    entries: Vec<Arc<ServiceSpec>>,
    skipped: Vec<(String, String)>,
}

/// Keeps each Service's translation between events.
#[derive(Debug, Default)]
pub struct Translator {
    /// By the Service's uid (or `namespace/name` without one).
    services: HashMap<String, Cached>,
    /// Counts translations, to forget Services no longer seen.
    epoch: u64,
    /// Bumped for objects without a resourceVersion, which can never be
    /// told unchanged.
    nonce: u64,
}

impl Translator {
    /// Like [`translate`], translating again only the Services whose
    /// inputs changed since the last call.
    pub fn translate(
        &mut self,
        objects: &Objects,
        settings: &Settings<'_>,
        locate: &mut dyn FnMut(&str) -> Option<PodPlace>,
    ) -> Translated {
        // The workloads (this node's pods): few, always translated.
        let pods_only = Objects {
            pods: objects.pods.clone(),
            namespaces: objects.namespaces.clone(),
            ..Objects::default()
        };
        let mut out = translate(&pods_only, settings, locate);
        // A Service's entries name this node's workloads (its local
        // endpoints), nothing else of them.
        let shared = {
            let mut h = DefaultHasher::new();
            format!("{:?}", settings.default_mode).hash(&mut h);
            settings.peer_nodes.hash(&mut h);
            for w in &out.workloads {
                w.name.hash(&mut h);
            }
            h.finish()
        };
        let modes: HashMap<&str, Option<&str>> = objects
            .namespaces
            .iter()
            .filter_map(|n| {
                let name = n.metadata.name.as_deref()?;
                Some((name, annotation(&n.metadata, MODE_ANNOTATION)))
            })
            .collect();
        let slices = slices_by_service(&objects.slices);

        // Fingerprint every Service; gather those that changed.
        self.epoch += 1;
        let epoch = self.epoch;
        let mut order: Vec<Cow<'_, str>> = Vec::with_capacity(objects.services.len());
        let mut dirty = Objects {
            pods: objects.pods.clone(),
            namespaces: objects.namespaces.clone(),
            ..Objects::default()
        };
        let mut dirty_keys: HashMap<(String, String), (Cow<'_, str>, u64)> = HashMap::new();
        for service in &objects.services {
            let (Some(ns), Some(name)) = (&service.metadata.namespace, &service.metadata.name)
            else {
                continue;
            };
            let own = slices.get(&(ns.as_str(), name.as_str()));
            let mut h = DefaultHasher::new();
            shared.hash(&mut h);
            service.metadata.uid.hash(&mut h);
            self.version(&service.metadata.resource_version, &mut h);
            modes.get(ns.as_str()).hash(&mut h);
            for slice in own.into_iter().flatten() {
                slice.metadata.uid.hash(&mut h);
                slice.metadata.name.hash(&mut h);
                self.version(&slice.metadata.resource_version, &mut h);
            }
            let fingerprint = h.finish();
            // The uid when there is one: looked up without building a key.
            let key: Cow<'_, str> = match &service.metadata.uid {
                Some(uid) => Cow::Borrowed(uid.as_str()),
                None => Cow::Owned(format!("{ns}/{name}")),
            };
            match self.services.get_mut(key.as_ref()) {
                Some(c) if c.fingerprint == fingerprint => c.seen = epoch,
                _ => {
                    dirty.services.push(service.clone());
                    dirty
                        .slices
                        .extend(own.into_iter().flatten().map(|s| (*s).clone()));
                    dirty_keys.insert((ns.clone(), name.clone()), (key.clone(), fingerprint));
                }
            }
            order.push(key);
        }

        // Translate the changed ones together, and file the result.
        if !dirty.services.is_empty() {
            let fresh = translate(&dirty, settings, locate);
            let mut made: HashMap<(String, String), Cached> = dirty_keys
                .iter()
                .map(|(name, (_, fingerprint))| {
                    let cached = Cached {
                        fingerprint: *fingerprint,
                        seen: epoch,
                        name: name.clone(),
                        entries: Vec::new(),
                        skipped: Vec::new(),
                    };
                    (name.clone(), cached)
                })
                .collect();
            for (entry, source) in fresh.services.into_iter().zip(fresh.sources) {
                if let Some(c) = made.get_mut(&source) {
                    c.entries.push(entry);
                }
            }
            // Reasons name the Service ("service ns/name ...").
            for item in fresh.skipped {
                if let Some(c) = made.values_mut().find(|c| {
                    let prefix = format!("service {}/{}", c.name.0, c.name.1);
                    item.0 == prefix || item.0.starts_with(&format!("{prefix} "))
                }) {
                    c.skipped.push(item);
                }
            }
            for (name, cached) in made {
                if let Some((key, _)) = dirty_keys.get(&name) {
                    self.services.insert(key.to_string(), cached);
                }
            }
        }

        // The whole result, in the Services' order; forget Services gone.
        // Each entry's name once: a made-up one (`NAME-ipv6`, `NAME-port`)
        // may meet another Service's, translated at another time.
        let mut given = std::collections::HashSet::with_capacity(order.len());
        for key in &order {
            let Some(cached) = self.services.get(key.as_ref()) else {
                continue;
            };
            for entry in &cached.entries {
                let name = (entry.namespace.as_str(), entry.name.as_str());
                if !given.insert(name) {
                    out.skipped.push((
                        format!("service {}/{}", cached.name.0, cached.name.1),
                        format!(
                            "its entry `{}` has a name another service in {} already has; \
                             not meshed",
                            name.1, name.0
                        ),
                    ));
                    continue;
                }
                out.services.push(entry.clone());
            }
            out.skipped.extend(cached.skipped.iter().cloned());
        }
        self.services.retain(|_, c| c.seen == epoch);
        out.skipped.extend(orphan_slices(objects));
        out
    }

    /// Hashes a resourceVersion as it identifies a version; none: a fresh
    /// value each time (always changed).
    fn version(&mut self, rv: &Option<String>, h: &mut DefaultHasher) {
        match rv {
            Some(rv) => rv.hash(h),
            None => {
                self.nonce += 1;
                self.nonce.hash(h);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

    use super::*;
    use crate::config::KubeMode;

    fn service(n: usize) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": format!("s{n}"), "namespace": "shop", "uid": format!("u{n}"),
                              "resourceVersion": "1", "annotations": { "sluice.io/mode": "plaintext" } },
                "spec": { "clusterIP": format!("10.96.0.{n}"), "ports": [{ "port": 80, "protocol": "TCP" }] }
            }))
            .unwrap(),
        )
    }

    fn slice(n: usize, rv: &str, address: &str) -> Arc<EndpointSlice> {
        Arc::new(
            serde_json::from_value(serde_json::json!({
                "metadata": { "name": format!("s{n}-x"), "namespace": "shop", "uid": format!("e{n}"),
                              "resourceVersion": rv, "labels": { "kubernetes.io/service-name": format!("s{n}") } },
                "addressType": "IPv4",
                "ports": [{ "port": 8080, "protocol": "TCP" }],
                "endpoints": [{ "addresses": [address], "nodeName": "node-a" }]
            }))
            .unwrap(),
        )
    }

    /// The same result as a whole translation, and what did not change is
    /// the very same value as before.
    #[test]
    fn only_the_changed_service_is_translated_again() {
        let mut objects = Objects {
            services: (0..3).map(service).collect(),
            slices: (0..3)
                .map(|n| slice(n, "1", &format!("198.18.0.{n}")))
                .collect(),
            ..Objects::default()
        };
        let none = crate::discovery::policy::Compiled::default();
        let settings = Settings {
            node: "node-a",
            default_mode: KubeMode::Off,
            peer_nodes: &[],
            policies: &none,
        };
        let mut translator = Translator::default();
        let first = translator.translate(&objects, &settings, &mut |_| None);
        let whole = translate(&objects, &settings, &mut |_| None);
        let values = |t: &Translated| format!("{:?}", t.services);
        assert_eq!(values(&first), values(&whole));
        assert_eq!(first.services.len(), 3);

        objects.slices[1] = slice(1, "2", "198.18.0.99");
        let second = translator.translate(&objects, &settings, &mut |_| None);
        assert_eq!(
            values(&second),
            values(&translate(&objects, &settings, &mut |_| None))
        );
        assert!(Arc::ptr_eq(&first.services[0], &second.services[0]));
        assert!(!Arc::ptr_eq(&first.services[1], &second.services[1]));
        assert!(Arc::ptr_eq(&first.services[2], &second.services[2]));
        assert_eq!(
            second.services[1].endpoints[0].address.to_string(),
            "198.18.0.99"
        );

        // A Service gone is gone from the result.
        objects.services.remove(2);
        let third = translator.translate(&objects, &settings, &mut |_| None);
        assert_eq!(third.services.len(), 2);
        assert_eq!(third.services[1].name.get(), "s1");
    }
}
