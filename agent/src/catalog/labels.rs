//! A connection's metric labels come from the catalog: which service, which
//! endpoint and which workload it is. The handles are resolved once per
//! kind of connection and cached on the service, so the accept path only
//! reads a map.

use std::sync::Arc;

use super::{Service, Workload};
use crate::{
    config::Mode,
    telemetry::{ConnectionMetrics, Metrics, metrics::ConnectionLabels, metrics::ServiceLabels},
};

impl Service {
    /// The metric handles for connections from `source` to endpoint
    /// `endpoint` of this service (None: before an endpoint is chosen).
    pub fn connection_metrics(
        &self,
        metrics: &Metrics,
        source: Option<&Workload>,
        endpoint: Option<usize>,
    ) -> Arc<ConnectionMetrics> {
        let key = (
            source.map_or(0, |w| w.cgroup_id),
            endpoint.unwrap_or(usize::MAX),
        );
        self.metrics.get_or_insert(key, || {
            let (labels, service) = self.labels(source, endpoint);
            metrics.handles(labels, service)
        })
    }

    fn labels(
        &self,
        source: Option<&Workload>,
        endpoint: Option<usize>,
    ) -> (ConnectionLabels, ServiceLabels) {
        let ep = endpoint.and_then(|i| self.endpoints.get(i));
        let mtls = ep.is_some_and(|e| {
            !e.local && e.peer.is_some() && matches!(self.mode, Mode::Mtls | Mode::Permissive)
        });
        let security = if mtls { "mutual_tls" } else { "plaintext" };
        let labels = ConnectionLabels {
            source_workload: source.map_or_else(|| "unknown".into(), |w| w.name.clone()),
            source_workload_namespace: source
                .map_or_else(|| "unknown".into(), |w| w.namespace.clone()),
            destination_service: self.name.clone(),
            destination_service_namespace: self.namespace.clone(),
            destination_workload: ep
                .and_then(|e| {
                    e.workload
                        .clone()
                        .or_else(|| e.identity.as_ref().map(|i| i.service_account.clone()))
                })
                .unwrap_or_else(|| "unknown".into()),
            connection_security_policy: security,
            mode: if self.mode == Mode::Kernel {
                "kernel"
            } else {
                "proxy"
            },
        };
        let service = ServiceLabels {
            destination_service: self.name.clone(),
            destination_service_namespace: self.namespace.clone(),
            connection_security_policy: security,
        };
        (labels, service)
    }
}
