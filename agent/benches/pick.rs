//! One endpoint choice per policy over 1,000 endpoints: the balancer plus
//! the eligibility checks the proxy pays on every connection.
//! Run: `cargo bench -p sluice --bench pick`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use sluice::{
    catalog::Catalog,
    clock::now_ms,
    config::Config,
    lb::PickContext,
    route::{Tried, choose},
};

const ENDPOINTS: usize = 1_000;

fn catalog(load_balancer: &str) -> Catalog {
    let mut text = format!(
        "node:\n  name: n1\nworkloads:\n  - name: checkout\nservices:\n  - name: pay\n    address: 127.0.0.9\n    \
         port: 80\n    load_balancer:\n{load_balancer}    endpoints:\n"
    );
    for i in 0..ENDPOINTS {
        text.push_str(&format!(
            "      - address: 127.{}.{}.{}\n        port: 8080\n        weight: {}\n",
            i / 65_536,
            (i / 256) % 256,
            i % 256,
            1 + i % 7
        ));
    }
    let config = Config::parse(&text, "bench.yaml").expect("bench config parses");
    config.validate().expect("bench config is valid");
    let place = sluice::catalog::Placement {
        cgroup: "/sys/fs/cgroup/x".into(),
        cgroup_id: 1,
        netns: None,
    };
    Catalog::from_config(&config, &[place], None)
}

fn picks(c: &mut Criterion) {
    let policies = [
        ("round_robin", "      policy: round_robin\n"),
        (
            "weighted_round_robin",
            "      policy: weighted_round_robin\n",
        ),
        ("random", "      policy: random\n"),
        ("least_request", "      policy: least_request\n"),
        (
            "least_request_ewma",
            "      policy: least_request\n      ewma: true\n",
        ),
        (
            "consistent_hash_workload",
            "      policy: consistent_hash\n      hash_key: source_workload\n",
        ),
        (
            "consistent_hash_address",
            "      policy: consistent_hash\n      hash_key: source_address\n",
        ),
    ];
    let ctx = PickContext {
        source_workload: Some("checkout"),
        source_addr: "127.0.0.1".parse().expect("literal address"),
    };
    let mut group = c.benchmark_group("pick_1000_endpoints");
    for (name, lb) in policies {
        let catalog = catalog(lb);
        let service = catalog.services().next().expect("one service");
        let tried = Tried::default();
        group.bench_function(name, |b| {
            b.iter(|| {
                let chosen = choose(black_box(service), &ctx, &tried, now_ms());
                black_box(chosen)
            })
        });
    }
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
