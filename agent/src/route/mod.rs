//! Where a new connection goes: the one place an endpoint is chosen. The
//! eligible set (outlier state and health, from [`crate::resilience`]),
//! locality and panic mode narrow the service's endpoints; the service's
//! balancing policy ([`crate::lb`]) picks among them. [`choose`] for the
//! proxy, [`kernel_set`] for what the kernel fast path may pick from, and
//! the active health checks that feed eligibility ([`health`]).

pub mod health;

use log::{info, warn};

use crate::{
    catalog::{Service, TIER_ANYWHERE},
    clock::Millis,
    config::Panic,
    lb::PickContext,
    resilience::{Admission, Outcome, Phase, Transition},
};

/// Most endpoints one connection may try (its first attempt and retries).
pub const MAX_ATTEMPTS: usize = crate::config::policy::MAX_CONNECT_ATTEMPTS as usize;

/// Endpoints a connection has already tried; retries go elsewhere.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tried {
    indices: [usize; MAX_ATTEMPTS],
    len: usize,
}

impl Tried {
    pub fn add(&mut self, i: usize) {
        if self.len < MAX_ATTEMPTS {
            self.indices[self.len] = i;
            self.len += 1;
        }
    }

    pub fn contains(&self, i: usize) -> bool {
        self.indices[..self.len].contains(&i)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An endpoint chosen for one connect attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Chosen {
    pub index: usize,
    pub admission: Admission,
}

/// Why no endpoint was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoEndpoint {
    /// Every endpoint not yet tried is ineligible and the panic policy is
    /// fail_closed.
    FailClosed,
    /// Nothing left to try (no endpoints, or all tried).
    Exhausted,
}

/// Chooses an endpoint of `service` for one connect attempt, skipping those
/// in `tried`. Prefers eligible endpoints (closed, or half-open with a probe
/// slot, and healthy), nearest locality tier first when locality is on.
/// When none is eligible the service's panic policy decides.
pub fn choose(
    service: &Service,
    ctx: &PickContext<'_>,
    tried: &Tried,
    now: Millis,
) -> Result<Chosen, NoEndpoint> {
    let endpoints = &service.endpoints;
    let policy = &service.policy;
    let n = endpoints.len();
    let first_tier = if policy.locality { 0 } else { TIER_ANYWHERE };
    let load = |i: usize, ewma: bool| endpoints[i].state.load(ewma);
    let weight = |i: usize| endpoints[i].weight;
    for tier in first_tier..=TIER_ANYWHERE {
        // A half-open slot can be taken between the check and the admit;
        // then try another endpoint of the same tier.
        let mut raced = Tried::default();
        for _ in 0..3 {
            let ok = |i: usize| {
                !tried.contains(i)
                    && !raced.contains(i)
                    && endpoints[i].tier <= tier
                    && endpoints[i].state.is_eligible(now, &policy.outlier)
            };
            let Some(index) = service.balancer.pick(n, ctx, ok, load, weight) else {
                break;
            };
            if let Some(admission) = endpoints[index].state.admit(now, &policy.outlier) {
                if service.state.set_panicking(false) {
                    info!(
                        "service {}: endpoints eligible again; panic mode over",
                        service.qualified_name()
                    );
                }
                return Ok(Chosen { index, admission });
            }
            raced.add(index);
        }
    }

    // Nothing eligible among the endpoints not yet tried.
    let untried = (0..n).any(|i| !tried.contains(i));
    if !untried {
        return Err(NoEndpoint::Exhausted);
    }
    if service.state.set_panicking(true) {
        warn!(
            "service {}: no endpoint is eligible (all ejected or unhealthy); {}",
            service.qualified_name(),
            match policy.panic {
                Panic::RouteToAll => "routing to all endpoints (panic mode)",
                Panic::FailClosed => "refusing new connections (panic: fail_closed)",
            }
        );
    }
    match policy.panic {
        Panic::FailClosed => Err(NoEndpoint::FailClosed),
        Panic::RouteToAll => service
            .balancer
            .pick(n, ctx, |i| !tried.contains(i), load, weight)
            .map(|index| Chosen {
                index,
                admission: Admission::Normal,
            })
            .ok_or(NoEndpoint::Exhausted),
    }
}

/// Feeds a connection's outcome to its endpoint and logs what it changed.
pub fn report(service: &Service, chosen: Chosen, outcome: Outcome, now: Millis) {
    let endpoint = &service.endpoints[chosen.index];
    let policy = &service.policy;
    let may_eject = || {
        let total = service.endpoints.len() as u64;
        let ejected = service
            .endpoints
            .iter()
            .filter(|e| e.state.phase() != Phase::Closed)
            .count() as u64;
        (ejected + 1) * 100 <= u64::from(policy.outlier.max_ejection_percent) * total
    };
    match endpoint
        .state
        .report(chosen.admission, outcome, now, &policy.outlier, may_eject)
    {
        Transition::None => {}
        Transition::Ejected { for_ms } => warn!(
            "service {}: endpoint {} ejected for {}ms after {}",
            service.qualified_name(),
            endpoint.addr,
            for_ms,
            match (chosen.admission, outcome) {
                (Admission::Probe, _) => "a failed half-open probe".to_owned(),
                _ => format!(
                    "{} consecutive failures",
                    policy.outlier.consecutive_failures
                ),
            }
        ),
        Transition::Restored => info!(
            "service {}: endpoint {} passed its half-open probe; trusted again",
            service.qualified_name(),
            endpoint.addr
        ),
        Transition::EjectionRefused => {}
    }
}

/// Endpoints the service would send new connections to now: the set the
/// kernel fast path loads, and what `sluice endpoints` marks eligible.
pub fn eligible_endpoints(service: &Service, now: Millis) -> Vec<usize> {
    (0..service.endpoints.len())
        .filter(|&i| {
            service.endpoints[i]
                .state
                .is_eligible(now, &service.policy.outlier)
        })
        .collect()
}

/// The endpoints the kernel may send new connections to now: the eligible
/// ones, only the nearest locality tier that has any when locality is on,
/// and when none is eligible what the panic policy says (all endpoints, or
/// none so that the kernel refuses).
pub fn kernel_set(service: &Service, now: Millis) -> Vec<usize> {
    let mut set = eligible_endpoints(service, now);
    if service.policy.locality
        && let Some(nearest) = set.iter().map(|&i| service.endpoints[i].tier).min()
    {
        set.retain(|&i| service.endpoints[i].tier == nearest);
    }
    if set.is_empty() && service.policy.panic == Panic::RouteToAll {
        set = (0..service.endpoints.len()).collect();
    }
    set
}

/// Feeds the outcome of a connect the kernel balanced. The kernel admits
/// without asking, so an endpoint whose ejection time has passed takes its
/// half-open step here: this outcome is its probe.
pub fn report_kernel(service: &Service, index: usize, outcome: Outcome, now: Millis) {
    let state = &service.endpoints[index].state;
    let admission = state
        .admit(now, &service.policy.outlier)
        .unwrap_or(Admission::Normal);
    report(service, Chosen { index, admission }, outcome, now);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::{catalog::Catalog, clock, config::Config};

    fn service(extra: &str) -> std::sync::Arc<Service> {
        let text = format!(
            "node:\n  name: n1\nservices:\n  - name: pay\n    address: 127.0.0.9\n    port: 80\n    \
             endpoints:\n      - address: 127.0.0.1\n        port: 1\n      - address: 127.0.0.1\n        \
             port: 2\n      - address: 127.0.0.1\n        port: 3\n{extra}"
        );
        let config = Config::parse(&text, "t.yaml").unwrap();
        config.validate().unwrap();
        let catalog = Catalog::from_config(&config, &[], None);
        catalog.services().next().unwrap().clone()
    }

    fn ctx() -> PickContext<'static> {
        PickContext {
            source_workload: None,
            source_addr: "127.0.0.1".parse().unwrap(),
        }
    }

    /// Chooses until endpoint `index` comes up, reports `outcome` for it.
    fn hit(s: &Service, index: usize, outcome: Outcome) -> Chosen {
        for _ in 0..100 {
            let c = choose(s, &ctx(), &Tried::default(), clock::now_ms()).unwrap();
            if c.index == index {
                report(s, c, outcome, clock::now_ms());
                return c;
            }
            s.endpoints[c.index].state.cancel(c.admission);
        }
        panic!("endpoint {index} never chosen");
    }

    #[tokio::test(start_paused = true)]
    async fn ejection_goes_closed_open_half_open_closed_on_the_clock() {
        let s = service(
            "    outlier_detection:\n      consecutive_failures: 2\n      base_ejection_time: 10s\n      \
             max_ejection_time: 40s\n      max_ejection_percent: 34\n",
        );
        let e = &s.endpoints[1].state;
        hit(&s, 1, Outcome::ConnectFailed);
        assert_eq!(e.phase(), Phase::Closed);
        hit(&s, 1, Outcome::ConnectFailed);
        assert_eq!(e.phase(), Phase::Open);
        assert_eq!(eligible_endpoints(&s, clock::now_ms()), [0, 2]);
        for _ in 0..50 {
            let c = choose(&s, &ctx(), &Tried::default(), clock::now_ms()).unwrap();
            assert_ne!(c.index, 1, "an open endpoint gets nothing");
        }

        // max_ejection_percent 34 of 3: a second ejection is refused.
        hit(&s, 0, Outcome::ConnectFailed);
        hit(&s, 0, Outcome::ConnectFailed);
        assert_eq!(s.endpoints[0].state.phase(), Phase::Closed);

        tokio::time::advance(Duration::from_millis(9_999)).await;
        assert_eq!(e.phase(), Phase::Open);
        assert!(!e.is_eligible(clock::now_ms(), &s.policy.outlier));
        tokio::time::advance(Duration::from_millis(1)).await;
        let probe = hit(&s, 1, Outcome::ConnectFailed);
        assert_eq!(probe.admission, Admission::Probe);
        assert_eq!(e.phase(), Phase::Open, "a failed probe reopens");
        assert_eq!(
            e.ejected_until(),
            clock::now_ms() + 20_000,
            "for twice as long"
        );

        tokio::time::advance(Duration::from_secs(20)).await;
        let probe = hit(&s, 1, Outcome::Connected { micros: 80 });
        assert_eq!(probe.admission, Admission::Probe);
        assert_eq!(e.phase(), Phase::Closed);
        assert_eq!(eligible_endpoints(&s, clock::now_ms()), [0, 1, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn panic_mode_routes_to_all_or_fails_closed() {
        for (panic, expect_ok) in [("route_to_all", true), ("fail_closed", false)] {
            let s = service(&format!(
                "    panic: {panic}\n    outlier_detection:\n      consecutive_failures: 1\n      \
                 max_ejection_percent: 100\n"
            ));
            for i in 0..3 {
                hit(&s, i, Outcome::ConnectFailed);
            }
            assert!(eligible_endpoints(&s, clock::now_ms()).is_empty());
            let r = choose(&s, &ctx(), &Tried::default(), clock::now_ms());
            assert_eq!(r.is_ok(), expect_ok, "{panic}");
            assert!(s.state.is_panicking());
        }
    }

    #[tokio::test(start_paused = true)]
    async fn locality_prefers_this_node_and_spills_over() {
        let text = "node:\n  name: n1\n  zone: z1\nservices:\n  - name: pay\n    address: 127.0.0.9\n    \
             port: 80\n    mode: plaintext\n    load_balancer:\n      locality: true\n    outlier_detection:\n      \
             consecutive_failures: 1\n      max_ejection_percent: 100\n    endpoints:\n      \
             - address: 127.0.0.1\n        port: 1\n        node: n2\n        zone: z2\n      \
             - address: 127.0.0.1\n        port: 2\n        node: n3\n        zone: z1\n      \
             - address: 127.0.0.1\n        port: 3\n";
        let config = Config::parse(text, "t.yaml").unwrap();
        config.validate().unwrap();
        let catalog = Catalog::from_config(&config, &[], None);
        let s = catalog.services().next().unwrap();
        assert_eq!(
            s.endpoints.iter().map(|e| e.tier).collect::<Vec<_>>(),
            [2, 1, 0]
        );
        let pick = || {
            choose(s, &ctx(), &Tried::default(), clock::now_ms())
                .unwrap()
                .index
        };
        assert!((0..20).all(|_| pick() == 2), "this node first");
        hit(s, 2, Outcome::ConnectFailed);
        assert!((0..20).all(|_| pick() == 1), "then this zone");
        hit(s, 1, Outcome::ConnectFailed);
        assert!((0..20).all(|_| pick() == 0), "then anywhere");
    }

    #[tokio::test(start_paused = true)]
    async fn retries_skip_endpoints_already_tried() {
        let s = service("");
        let mut tried = Tried::default();
        for _ in 0..3 {
            let c = choose(&s, &ctx(), &tried, clock::now_ms()).unwrap();
            assert!(!tried.contains(c.index));
            tried.add(c.index);
        }
        assert_eq!(
            choose(&s, &ctx(), &tried, clock::now_ms()),
            Err(NoEndpoint::Exhausted)
        );
    }
}
