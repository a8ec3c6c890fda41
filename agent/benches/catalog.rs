//! A catalog update from Kubernetes discovery at scale: 10,000 Services
//! with 100,000 endpoints, from the reflectors' objects to the catalog the
//! data plane reads (translate, parse and validate, build), and the memory
//! the built catalog holds. The 5 ms settle time that coalesces a burst of
//! watch events and the BPF map writes come on top; `report_watch_to_map`
//! times the whole way from a changed EndpointSlice to the SERVICES map.
//! Run: `cargo bench -p sluice --bench catalog`.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    hint::black_box,
    sync::{
        Arc,
        atomic::{AtomicIsize, Ordering},
    },
};

use criterion::{Criterion, criterion_group};
use k8s_openapi::{
    api::{
        core::v1::{Namespace, Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointConditions, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use sluice::{
    catalog::Catalog,
    config::{Config, Entries, KubeMode},
    discovery::{
        self, Objects,
        translate::{Settings, translate},
    },
};

/// Counts live heap bytes, to weigh the catalog.
struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const SERVICES: usize = 10_000;
const ENDPOINTS_PER_SERVICE: usize = 10;
const NAMESPACES: usize = 100;

fn meta(namespace: Option<String>, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace,
        ..Default::default()
    }
}

fn objects() -> Objects {
    let namespaces: Vec<Namespace> = (0..NAMESPACES)
        .map(|n| Namespace {
            metadata: ObjectMeta {
                annotations: Some(BTreeMap::from([(
                    "sluice.io/mode".to_owned(),
                    "plaintext".to_owned(),
                )])),
                ..meta(None, format!("ns-{n}"))
            },
            ..Default::default()
        })
        .collect();
    let mut services = Vec::with_capacity(SERVICES);
    let mut slices = Vec::with_capacity(SERVICES);
    for s in 0..SERVICES {
        let ns = format!("ns-{}", s % NAMESPACES);
        let name = format!("svc-{s}");
        services.push(Service {
            metadata: meta(Some(ns.clone()), name.clone()),
            spec: Some(ServiceSpec {
                // Virtual addresses in 127/8: data only, never dialled.
                cluster_ip: Some(format!("127.90.{}.{}", s / 256, s % 256)),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        });
        let endpoints = (0..ENDPOINTS_PER_SERVICE)
            .map(|e| {
                let i = s * ENDPOINTS_PER_SERVICE + e;
                Endpoint {
                    addresses: vec![format!("198.18.{}.{}", i / 256 % 256, i % 256)],
                    conditions: Some(EndpointConditions {
                        ready: Some(true),
                        ..Default::default()
                    }),
                    node_name: Some(format!("node-{}", i % 50)),
                    zone: Some(format!("z{}", i % 3)),
                    ..Default::default()
                }
            })
            .collect();
        slices.push(EndpointSlice {
            metadata: ObjectMeta {
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_owned(),
                    name.clone(),
                )])),
                ..meta(Some(ns), format!("{name}-abcde"))
            },
            address_type: "IPv4".into(),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            endpoints,
        });
    }
    Objects {
        services: services.into_iter().map(Arc::new).collect(),
        slices: slices.into_iter().map(Arc::new).collect(),
        pods: Vec::new(),
        namespaces: namespaces.into_iter().map(Arc::new).collect(),
    }
}

/// One update: objects to the catalog the data plane reads.
fn update(objects: &Objects) -> Catalog {
    let policies = sluice::discovery::policy::Compiled::default();
    let settings = Settings {
        node: "node-0",
        default_mode: KubeMode::Off,
        peer_nodes: &[],
        policies: &policies,
    };
    let translated = translate(objects, &settings, &mut |_| None);
    let config = Config::parse("node:\n  name: node-0\n", "bench.yaml").unwrap();
    let entries = discovery::entries(&config, &translated);
    discovery::check(&entries).expect("the discovered catalog validates");
    Catalog::build(&entries, &[], None)
}

fn catalog_update(c: &mut Criterion) {
    let objects = objects();
    let mut group = c.benchmark_group("catalog");
    group.sample_size(10);
    group.bench_function("update_10k_services_100k_endpoints", |b| {
        b.iter(|| black_box(update(black_box(&objects))))
    });
    group.finish();
}

fn report_memory() {
    let before = LIVE.load(Ordering::Relaxed);
    let objects = objects();
    let with_objects = LIVE.load(Ordering::Relaxed);
    let catalog = update(&objects);
    let after = LIVE.load(Ordering::Relaxed);
    assert_eq!(catalog.services().count(), SERVICES);
    println!(
        "memory: catalog of {SERVICES} services and {} endpoints: {:.1} MiB; the reflectors' \
         objects behind it: {:.1} MiB",
        SERVICES * ENDPOINTS_PER_SERVICE,
        (after - with_objects) as f64 / (1 << 20) as f64,
        (with_objects - before) as f64 / (1 << 20) as f64
    );
    report_map_sync(&catalog);
    drop(catalog);
}

/// The last step of an update: writing the catalog's services into the
/// pinned SERVICES map (needs root: real maps in a scratch pin directory).
fn report_map_sync(catalog: &Catalog) {
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/sluice-bench-catalog-{}",
        std::process::id()
    ));
    let mut redirect = match sluice::redirect::Redirect::load(&pins) {
        Ok(r) => r,
        Err(e) => return println!("map sync: not measured ({e})"),
    };
    let entries = sluice::redirect::entries::kernel_entries(catalog, sluice::clock::now_ms());
    let started = std::time::Instant::now();
    redirect.sync_services(&entries).expect("map sync");
    let first = started.elapsed();
    let started = std::time::Instant::now();
    redirect.sync_services(&entries).expect("map sync");
    let again = started.elapsed();
    println!(
        "map sync: {} services written in {:.1} ms; an unchanged catalog in {:.1} ms",
        entries.len(),
        first.as_secs_f64() * 1e3,
        again.as_secs_f64() * 1e3
    );
    redirect.detach();
}

/// Watch event to kernel map, as the daemon goes through it for one
/// EndpointSlice that changed: the translation (only the changed Service
/// again), the difference from what is in force, the check of the
/// changed services beside the file's entries, workloads and nodes, the
/// catalog with just those built anew, and the SERVICES map brought in
/// line. The 5 ms settle that coalesces a burst of events comes on top.
/// p50 and p99 over 100 changes, each to a different slice (one endpoint's
/// readiness).
fn report_watch_to_map() {
    let pins = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/sluice-bench-watch-{}",
        std::process::id()
    ));
    let mut redirect = match sluice::redirect::Redirect::load(&pins) {
        Ok(r) => r,
        Err(e) => return println!("watch to map: not measured ({e})"),
    };
    let mut objects = objects();
    for (i, slice) in objects.slices.iter_mut().enumerate() {
        Arc::make_mut(slice).metadata.resource_version = Some(format!("{i}"));
    }
    for (i, service) in objects.services.iter_mut().enumerate() {
        Arc::make_mut(service).metadata.resource_version = Some(format!("s{i}"));
    }
    let policies = sluice::discovery::policy::Compiled::default();
    let settings = Settings {
        node: "node-0",
        default_mode: KubeMode::Off,
        peer_nodes: &[],
        policies: &policies,
    };
    let base = "node:\n  name: node-0\n";
    let before = LIVE.load(Ordering::Relaxed);
    let mut translator = discovery::incremental::Translator::default();
    let mut applied = translator.translate(&objects, &settings, &mut |_| None);
    println!(
        "memory: the translation kept between events (each Service's entries): {:.1} MiB",
        (LIVE.load(Ordering::Relaxed) - before) as f64 / (1 << 20) as f64
    );
    let config = Config::parse(base, "bench.yaml").unwrap();
    let entries = discovery::entries(&config, &applied);
    discovery::check(&entries).expect("the discovered catalog validates");
    let mut running = Catalog::build(&entries, &[], None);
    redirect
        .sync_services(&sluice::redirect::entries::kernel_entries(
            &running,
            sluice::clock::now_ms(),
        ))
        .expect("map sync");
    let mut took = Vec::new();
    // Per stage: translate, difference, check, catalog, map.
    let mut stages: [Vec<std::time::Duration>; 5] = Default::default();
    for i in 0..100 {
        let slice = Arc::make_mut(&mut objects.slices[i * 97 % SERVICES]);
        let ready = &mut slice.endpoints[0].conditions.get_or_insert_default().ready;
        *ready = Some(!ready.unwrap_or(true));
        slice.metadata.resource_version = Some(format!("change-{i}"));
        let started = std::time::Instant::now();
        let mut lap = started;
        let mut stage = |n: usize| {
            let now = std::time::Instant::now();
            stages[n].push(now - lap);
            lap = now;
        };
        let found = translator.translate(&objects, &settings, &mut |_| None);
        stage(0);
        let changes = discovery::service_changes(&applied, &found).expect("only services changed");
        stage(1);
        let changed = Entries::with(&config, &changes.changed, &found.workloads, &found.nodes);
        discovery::check(&changed).expect("the changed services validate");
        stage(2);
        let specs = changed.second_services();
        let catalog = running.with_services(&changed, &changes.removed);
        stage(3);
        let named: Vec<(&str, &str)> = specs
            .iter()
            .map(|s| (s.namespace.as_str(), s.name.as_str()))
            .chain(
                changes
                    .removed
                    .iter()
                    .map(|(ns, n)| (ns.as_str(), n.as_str())),
            )
            .collect();
        let (write, drop) = sluice::redirect::entries::kernel_delta(
            &running,
            &catalog,
            &named,
            sluice::clock::now_ms(),
        );
        redirect.update_services(&write, &drop).expect("map update");
        stage(4);
        took.push(started.elapsed());
        running = catalog;
        applied = found;
    }
    took.sort();
    let ms = |d: std::time::Duration| d.as_secs_f64() * 1e3;
    println!(
        "watch to map (one EndpointSlice changed, {SERVICES} services, {} endpoints): \
         p50 {:.1} ms, p99 {:.1} ms, plus the 5 ms settle",
        SERVICES * ENDPOINTS_PER_SERVICE,
        ms(took[took.len() / 2]),
        ms(took[took.len() * 99 / 100])
    );
    let median = |v: &mut Vec<std::time::Duration>| {
        v.sort();
        ms(v[v.len() / 2])
    };
    let [t, d, m, c, k] = &mut stages;
    println!(
        "  median per stage: translate {:.1} ms, difference {:.1} ms, check {:.1} ms, \
         catalog {:.1} ms, map {:.1} ms",
        median(t),
        median(d),
        median(m),
        median(c),
        median(k)
    );
    redirect.detach();
}

criterion_group!(benches, catalog_update);

fn main() {
    report_memory();
    report_watch_to_map();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
