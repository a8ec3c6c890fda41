//! Active health checks: a TCP connect, or an HTTP GET with an expected
//! status, per endpoint, every `interval` plus jitter. Thresholds of
//! successes and failures in a row flip the endpoint's verdict; each flip
//! is logged once.

use std::{collections::HashMap, net::SocketAddr, sync::Arc, time::Duration};

use log::{info, warn};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    task::JoinHandle,
};

use crate::{
    catalog::Catalog,
    config::{HealthCheck, Mode},
    drain::DrainWatch,
    lb::fast_random,
    netns::Netns,
    resilience::EndpointState,
};

/// The running checks; dropping it stops them. A check runs as long as its
/// endpoint, settings and namespace stay: a catalog change that leaves them
/// alone keeps the check and its count of passes and failures, so frequent
/// changes elsewhere never hold a verdict back.
#[derive(Debug, Default)]
pub struct HealthCheckers {
    running: HashMap<(String, SocketAddr), Running>,
}

#[derive(Debug)]
struct Running {
    task: JoinHandle<()>,
    state: Arc<EndpointState>,
    settings: HealthCheck,
    netns: Option<Arc<Netns>>,
}

impl Drop for HealthCheckers {
    fn drop(&mut self) {
        for r in self.running.values() {
            r.task.abort();
        }
    }
}

/// The same check, whatever line of a file it came from.
fn same_settings(a: &HealthCheck, b: &HealthCheck) -> bool {
    a.interval.get() == b.interval.get()
        && a.timeout.get() == b.timeout.get()
        && a.healthy_threshold.get() == b.healthy_threshold.get()
        && a.unhealthy_threshold.get() == b.unhealthy_threshold.get()
        && a.jitter == b.jitter
        && match (&a.http, &b.http) {
            (None, None) => true,
            (Some(x), Some(y)) => {
                x.path.get() == y.path.get() && x.expected_status.get() == y.expected_status.get()
            }
            _ => false,
        }
}

impl HealthCheckers {
    /// Starts a checker for every endpoint of every service that has a
    /// `health_check`. Endpoints of services without one stay healthy.
    pub fn start(catalog: &Catalog, mark: u32, drain: &DrainWatch) -> HealthCheckers {
        let mut checkers = HealthCheckers::default();
        checkers.sync(catalog, mark, drain);
        checkers
    }

    /// Brings the running checks in line with `catalog`: starts those of
    /// new endpoints (or of changed settings or namespace), stops those of
    /// endpoints gone, and leaves the rest running. Returns how many it
    /// started.
    pub fn sync(&mut self, catalog: &Catalog, mark: u32, drain: &DrainWatch) -> usize {
        let mut wanted: HashMap<(String, SocketAddr), Check> = HashMap::new();
        for service in catalog.services() {
            let Some(hc) = &service.policy.health_check else {
                for e in &service.endpoints {
                    e.state.set_healthy(true);
                }
                continue;
            };
            for e in &service.endpoints {
                // An endpoint on another node, reached through the mesh, is
                // that node's agent's to check: probing it here would go
                // around the mesh in plaintext (and a strict workload
                // refuses that). Outlier detection still sees every real
                // connect to it.
                if !e.local && e.peer.is_some() && service.mode != Mode::Plaintext {
                    e.state.set_healthy(true);
                    continue;
                }
                // A workload of this node is probed from inside its own
                // network namespace, as the agent delivers to it: the
                // capture hook refuses a probe from outside.
                let netns = catalog
                    .local_target(e.addr)
                    .and_then(|t| t.workload.netns.clone());
                let check = Check {
                    service: service.qualified_name(),
                    addr: e.addr,
                    state: e.state.clone(),
                    settings: hc.clone(),
                    mark,
                    netns,
                };
                wanted.insert((check.service.clone(), e.addr), check);
            }
        }
        self.running.retain(|key, r| {
            let keep = wanted.get(key).is_some_and(|c| {
                Arc::ptr_eq(&c.state, &r.state)
                    && same_settings(&c.settings, &r.settings)
                    && match (&c.netns, &r.netns) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        _ => false,
                    }
            });
            if keep {
                wanted.remove(key);
            } else {
                r.task.abort();
            }
            keep
        });
        let started = wanted.len();
        for (key, check) in wanted {
            let running = Running {
                state: check.state.clone(),
                settings: check.settings.clone(),
                netns: check.netns.clone(),
                task: tokio::spawn(check.run(drain.clone())),
            };
            self.running.insert(key, running);
        }
        started
    }

    /// Checkers running.
    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

struct Check {
    service: String,
    addr: SocketAddr,
    state: Arc<EndpointState>,
    settings: HealthCheck,
    mark: u32,
    /// The endpoint's workload's namespace, when it is a pod of this node.
    netns: Option<Arc<Netns>>,
}

fn jittered(base: Duration, jitter: Duration) -> Duration {
    let j = jitter.as_millis() as u64;
    base + Duration::from_millis(if j == 0 { 0 } else { fast_random() % (j + 1) })
}

impl Check {
    async fn run(self, mut drain: DrainWatch) {
        let interval = self.settings.interval.0;
        let jitter = self.settings.jitter.0;
        let healthy_after = self.settings.healthy_threshold.get();
        let unhealthy_after = self.settings.unhealthy_threshold.get();
        let (mut successes, mut failures) = (0u32, 0u32);
        // Start at a random point of the first interval, so checkers
        // started together do not fire together.
        let mut wait = jittered(Duration::ZERO, interval);
        loop {
            tokio::select! {
                _ = drain.draining() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = jittered(interval, jitter);
            if self.probe().await {
                successes = successes.saturating_add(1);
                failures = 0;
                if successes >= *healthy_after
                    && !self.state.is_healthy()
                    && self.state.set_healthy(true)
                {
                    info!(
                        "service {}: endpoint {} passed {successes} health checks; healthy",
                        self.service, self.addr
                    );
                }
            } else {
                failures = failures.saturating_add(1);
                successes = 0;
                if failures >= *unhealthy_after
                    && self.state.is_healthy()
                    && self.state.set_healthy(false)
                {
                    warn!(
                        "service {}: endpoint {} failed {failures} health checks; unhealthy",
                        self.service, self.addr
                    );
                }
            }
        }
    }

    async fn probe(&self) -> bool {
        let timeout = self.settings.timeout.0;
        let attempt = async {
            let mut stream = crate::connect::connect_marked(
                self.addr,
                self.mark,
                timeout,
                self.netns.as_deref(),
            )
            .await?;
            let Some(http) = &self.settings.http else {
                return Ok::<bool, std::io::Error>(true);
            };
            let request = format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: sluice-health-check\r\nConnection: close\r\n\r\n",
                http.path.get(),
                self.addr
            );
            stream.write_all(request.as_bytes()).await?;
            // The status line is all we need: "HTTP/1.1 200 OK".
            let mut buf = [0u8; 64];
            let mut len = 0;
            while len < 12 {
                let n = stream.read(&mut buf[len..]).await?;
                if n == 0 {
                    break;
                }
                len += n;
            }
            let status = std::str::from_utf8(&buf[..len])
                .ok()
                .and_then(|s| s.split_whitespace().nth(1))
                .and_then(|code| code.parse::<u16>().ok());
            Ok(status == Some(*http.expected_status.get()))
        };
        matches!(tokio::time::timeout(timeout, attempt).await, Ok(Ok(true)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU16, Ordering};

    use tokio::net::TcpListener;

    use super::*;
    use crate::config::Config;

    /// An HTTP server on loopback answering every request with `status`.
    async fn http_server(status: Arc<AtomicU16>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let code = status.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 512];
                    let _ = s.read(&mut buf).await;
                    let _ = s
                        .write_all(
                            format!("HTTP/1.1 {code} X\r\ncontent-length: 0\r\n\r\n").as_bytes(),
                        )
                        .await;
                });
            }
        });
        addr
    }

    /// Real checks over real sockets (root: they carry the agent's mark).
    #[tokio::test]
    async fn http_checks_flip_the_verdict_after_the_thresholds() {
        let status = Arc::new(AtomicU16::new(200));
        let addr = http_server(status.clone()).await;
        let text = format!(
            "node:\n  name: n\nservices:\n  - name: s\n    address: 127.0.0.9\n    port: 80\n    \
             endpoints:\n      - address: {}\n        port: {}\n    health_check:\n      interval: 20ms\n      \
             timeout: 200ms\n      jitter: 5ms\n      healthy_threshold: 2\n      unhealthy_threshold: 3\n      \
             http:\n        path: /healthz\n",
            addr.ip(),
            addr.port()
        );
        let config = Config::parse(&text, "t.yaml").unwrap();
        config.validate().unwrap();
        let catalog = Catalog::from_config(&config, &[], None);
        let state = catalog.services().next().unwrap().endpoints[0]
            .state
            .clone();
        let (_trigger, watch) = crate::drain::channel();
        let checkers = HealthCheckers::start(&catalog, 0x51ce, &watch);
        assert_eq!(checkers.len(), 1);

        let wait_for = |healthy: bool| {
            let state = state.clone();
            async move {
                for _ in 0..200 {
                    if state.is_healthy() == healthy {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                false
            }
        };
        assert!(state.is_healthy());
        status.store(503, Ordering::SeqCst);
        assert!(wait_for(false).await, "503s make it unhealthy");
        status.store(200, Ordering::SeqCst);
        assert!(wait_for(true).await, "200s make it healthy again");
        drop(checkers);
    }

    #[tokio::test]
    async fn a_closed_port_fails_tcp_checks() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let text = format!(
            "node:\n  name: n\nservices:\n  - name: s\n    address: 127.0.0.9\n    port: 80\n    \
             endpoints:\n      - address: 127.0.0.1\n        port: {port}\n    health_check:\n      \
             interval: 10ms\n      jitter: 0ms\n      unhealthy_threshold: 2\n"
        );
        let config = Config::parse(&text, "t.yaml").unwrap();
        let catalog = Catalog::from_config(&config, &[], None);
        let state = catalog.services().next().unwrap().endpoints[0]
            .state
            .clone();
        let (_trigger, watch) = crate::drain::channel();
        let _checkers = HealthCheckers::start(&catalog, 0x51ce, &watch);
        let mut unhealthy = false;
        for _ in 0..200 {
            if !state.is_healthy() {
                unhealthy = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(unhealthy);
    }
}
