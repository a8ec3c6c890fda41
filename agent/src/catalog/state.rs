//! What a catalog's endpoints have learnt (ejections, failure counts,
//! health verdicts), as it travels to the next agent in an upgrade, so an
//! endpoint ejected by the old agent stays ejected in the new one. Only
//! endpoints whose state differs from a new one's travel.

use std::{collections::HashMap, net::SocketAddr};

use serde::{Deserialize, Serialize};

use super::Catalog;
use crate::{clock::Millis, resilience::EndpointSnapshot};

/// Endpoint states by service.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointStates {
    pub services: Vec<ServiceEndpoints>,
}

/// One service's endpoints that have something to say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceEndpoints {
    pub namespace: String,
    pub name: String,
    pub endpoints: Vec<(SocketAddr, EndpointSnapshot)>,
}

impl Catalog {
    /// The states worth carrying over, at `now`.
    pub fn endpoint_states(&self, now: Millis) -> EndpointStates {
        let services = self
            .services()
            .filter_map(|s| {
                let endpoints: Vec<(SocketAddr, EndpointSnapshot)> = s
                    .endpoints
                    .iter()
                    .map(|e| (e.addr, e.state.snapshot(now)))
                    .filter(|(_, snapshot)| !snapshot.is_fresh())
                    .collect();
                (!endpoints.is_empty()).then(|| ServiceEndpoints {
                    namespace: s.namespace.clone(),
                    name: s.name.clone(),
                    endpoints,
                })
            })
            .collect();
        EndpointStates { services }
    }

    /// Takes on `states` for the endpoints this catalog has (by service
    /// and address); returns how many.
    pub fn restore_endpoint_states(&self, states: &EndpointStates, now: Millis) -> usize {
        let by_name: HashMap<(&str, &str), _> = self
            .services()
            .map(|s| ((s.namespace.as_str(), s.name.as_str()), s))
            .collect();
        let mut restored = 0;
        for carried in &states.services {
            let Some(service) = by_name.get(&(carried.namespace.as_str(), carried.name.as_str()))
            else {
                continue;
            };
            for (addr, snapshot) in &carried.endpoints {
                if let Some(e) = service.endpoints.iter().find(|e| e.addr == *addr) {
                    e.state.restore(snapshot, now);
                    restored += 1;
                }
            }
        }
        restored
    }
}
