//! Services, workloads and nodes from two sources read side by side: the
//! config file's, and a second source's (Kubernetes discovery). Neither
//! is written into the other: validation and the catalog read both
//! through [`Entries`], the file's first, so an entry of the second source
//! is checked by the very rules the file's are, against everything it
//! names, without a copy of the file being made for it.

use std::sync::Arc;

use super::{Config, HealthCheck, PeerNode, Problem, ServiceSpec, WorkloadSpec};

/// The file's entries, then a second source's.
#[derive(Debug)]
pub struct Entries<'a> {
    /// The file, which also gives the node, agent and mesh settings.
    pub file: &'a Config,
    services: Vec<&'a ServiceSpec>,
    workloads: Vec<&'a WorkloadSpec>,
    nodes: Vec<&'a PeerNode>,
    /// How many of `services` are the file's (they come first).
    file_services: usize,
    /// How many of `workloads` are the file's (they come first).
    file_workloads: usize,
}

/// Which source an entry came from, with its index in the joined list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    File,
    Second,
}

impl<'a> Entries<'a> {
    /// The file's entries alone.
    pub fn file(file: &'a Config) -> Entries<'a> {
        Entries::with(file, &[], &[], &[])
    }

    /// The file's entries and a second source's. A node the file lists
    /// keeps the file's address.
    pub fn with(
        file: &'a Config,
        services: &'a [Arc<ServiceSpec>],
        workloads: &'a [WorkloadSpec],
        nodes: &'a [PeerNode],
    ) -> Entries<'a> {
        let mut all_nodes: Vec<&PeerNode> = file.nodes.iter().collect();
        all_nodes.extend(
            nodes
                .iter()
                .filter(|n| !file.nodes.iter().any(|f| f.name.get() == n.name.get())),
        );
        Entries {
            file,
            services: file
                .services
                .iter()
                .chain(services.iter().map(|s| &**s))
                .collect(),
            workloads: file.workloads.iter().chain(workloads).collect(),
            nodes: all_nodes,
            file_services: file.services.len(),
            file_workloads: file.workloads.len(),
        }
    }

    pub fn services(&self) -> &[&'a ServiceSpec] {
        &self.services
    }

    pub fn workloads(&self) -> &[&'a WorkloadSpec] {
        &self.workloads
    }

    pub fn nodes(&self) -> &[&'a PeerNode] {
        &self.nodes
    }

    /// The second source's services.
    pub fn second_services(&self) -> &[&'a ServiceSpec] {
        &self.services[self.file_services..]
    }

    /// Where service `index` came from.
    pub fn service_origin(&self, index: usize) -> Origin {
        if index < self.file_services {
            Origin::File
        } else {
            Origin::Second
        }
    }

    /// Where workload `index` came from.
    pub fn workload_origin(&self, index: usize) -> Origin {
        if index < self.file_workloads {
            Origin::File
        } else {
            Origin::Second
        }
    }

    /// The active health check of a service: its own for the file's, the
    /// `kubernetes` section's for the second source's (a Kubernetes
    /// Service has no field for one).
    pub fn health_check(
        &self,
        origin: Origin,
        service: &'a ServiceSpec,
    ) -> Option<&'a HealthCheck> {
        match origin {
            Origin::File => service.health_check.as_ref(),
            Origin::Second => self.file.kubernetes.as_ref()?.health_check.as_ref(),
        }
    }

    /// Leaves out the second source's workloads that `keep` refuses (pods
    /// that cannot be placed). The file's are always kept.
    pub fn retain_second_workloads(&mut self, mut keep: impl FnMut(&WorkloadSpec) -> bool) {
        let file_workloads = self.file_workloads;
        let mut index = 0;
        self.workloads.retain(|w| {
            index += 1;
            index <= file_workloads || keep(w)
        });
    }

    /// Checks what serde cannot: references, uniqueness, ranges, over both
    /// sources together. Returns every problem, not just the first; a
    /// field path indexes the joined lists (`services[3]` is the second
    /// source's first when the file has three).
    pub fn validate(&self) -> Result<(), Vec<Problem>> {
        super::validate::all(self)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::{EndpointSpec, Mode};

    const FILE: &str = "\
node:
  name: node-a
kubernetes:
  health_check:
    interval: 2s
nodes:
  - name: node-b
    address: 198.18.99.2
workloads:
  - name: batch
    namespace: shop
    service_account: batch
services:
  - name: payments
    address: 10.96.0.10
    port: 8080
    health_check:
      interval: 5s
    endpoints:
      - address: 127.0.0.1
        port: 9001
";

    fn discovered_service() -> Arc<ServiceSpec> {
        Arc::new(ServiceSpec::new(
            "checkout".into(),
            "shop".into(),
            "10.96.0.11".parse().unwrap(),
            8080,
            Mode::default(),
            vec![EndpointSpec::new("198.18.0.1".parse().unwrap(), 80)],
        ))
    }

    fn pod(name: &str) -> WorkloadSpec {
        WorkloadSpec::new(
            name.into(),
            "shop".into(),
            "default".into(),
            format!("kubepods/{name}"),
            "/proc/1/ns/net".into(),
        )
    }

    /// The file's entries come first and keep their own settings; the
    /// second source's take the `kubernetes` section's health check, and a
    /// node both list keeps the file's address. The file is not changed.
    #[test]
    fn the_second_source_reads_beside_the_file_without_changing_it() {
        let file = Config::parse(FILE, "t.yaml").unwrap();
        let services = [discovered_service()];
        let workloads = [pod("shop/checkout-1"), pod("shop/checkout-2")];
        let nodes = [
            PeerNode::new("node-b".into(), "198.18.99.9".parse().unwrap()),
            PeerNode::new("node-c".into(), "198.18.99.3".parse().unwrap()),
        ];
        let mut entries = Entries::with(&file, &services, &workloads, &nodes);
        entries.validate().unwrap();

        let names: Vec<&str> = entries.services().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["payments", "checkout"]);
        assert_eq!(entries.service_origin(0), Origin::File);
        assert_eq!(entries.service_origin(1), Origin::Second);
        let interval = |i: usize| {
            let s = entries.services()[i];
            entries
                .health_check(entries.service_origin(i), s)
                .map(|h| h.interval.get().0.as_secs())
        };
        assert_eq!((interval(0), interval(1)), (Some(5), Some(2)));
        let nodes: Vec<String> = entries
            .nodes()
            .iter()
            .map(|n| format!("{}={}", n.name.get(), n.address))
            .collect();
        assert_eq!(nodes, ["node-b=198.18.99.2", "node-c=198.18.99.3"]);

        // Leaving pods out never leaves out the file's workloads.
        entries.retain_second_workloads(|w| w.name.get() != "shop/checkout-1");
        entries.retain_second_workloads(|w| w.name.get() == "batch");
        let left: Vec<&str> = entries
            .workloads()
            .iter()
            .map(|w| w.name.as_str())
            .collect();
        assert_eq!(left, ["batch"]);
        assert_eq!(file.services.len(), 1);
        assert_eq!(file.workloads.len(), 1);
        assert_eq!(file.nodes.len(), 1);
    }

    /// A second source's entry is checked against the file's: its index
    /// follows theirs, and the message names the file's entry it meets.
    #[test]
    fn a_second_source_entry_is_checked_against_the_files() {
        let file = Config::parse(FILE, "t.yaml").unwrap();
        let services = [discovered_service()];
        let same_name = [pod("batch")];
        let problems = Entries::with(&file, &services, &same_name, &[])
            .validate()
            .unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(problems[0].field, "workloads[1].name");
        assert!(
            problems[0]
                .message
                .contains("already defined by workloads[0]")
        );
    }

    /// The `kubernetes` section's health check is the file's to get right:
    /// refused at load, naming its own field, before any Service is seen.
    #[test]
    fn the_discovery_health_check_is_checked_with_the_file() {
        let text = FILE.replace("interval: 2s", "interval: 0s");
        let problems = Config::parse(&text, "t.yaml")
            .unwrap()
            .validate()
            .unwrap_err();
        let fields: Vec<&str> = problems.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["kubernetes.health_check.interval"]);
    }
}
