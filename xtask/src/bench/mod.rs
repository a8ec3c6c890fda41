//! `cargo xtask bench`: Sluice side by side with HAProxy and nginx, in one
//! run, with the same load generator and backend, interleaved so that
//! machine drift hits every path alike. See ../shared/BENCH-NOTES.md for
//! why it pins CPUs and sets the halt-poll parameter.
//!
//! Paths: direct (the floor), Sluice proxy mode, Sluice kernel mode
//! (balanced by connect4, no proxy), Sluice with mTLS across two
//! network-namespace nodes, HAProxy (TCP mode), nginx (stream). Every proxy
//! gets one worker on CPU 0; the load generator and the backend share CPU 1.

mod http;
mod loadgen;
mod mesh;
mod report;
mod upgrade;

use std::{
    io::{BufRead, BufReader, Write},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicI32, Ordering as AtomicOrdering},
    time::Duration,
};

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use sluice_testkit::{
    config::{CircuitBreakers, Config, Endpoint, Mode, Service, Workload},
    netns::Netns,
    port::free_port,
};

pub use loadgen::LoadArgs;

/// Entry point of `xtask backend`: the echo backend alone, for profiling.
pub fn backend_main(listen: SocketAddr) -> anyhow::Result<()> {
    let addr = start_backend(std::net::TcpListener::bind(listen)?)?;
    println!("echo backend on {addr}");
    loop {
        std::thread::park();
    }
}

/// Entry point of `xtask loadgen`.
pub fn loadgen_main(args: LoadArgs) -> anyhow::Result<()> {
    loadgen::run(args)
}

use crate::run as run_cmd;

/// `cargo xtask bench` options.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// A smoke run of a few seconds per workload (CI checks that every
    /// path carried traffic, not how fast).
    #[arg(long)]
    pub quick: bool,
    /// Instead of the comparison: an agent upgrade under open connections
    /// (how long the handover takes, the largest pause a connection sees).
    #[arg(long)]
    pub upgrade: bool,
    /// Instead of the comparison: requests (HTTP/1.1 and HTTP/2) through
    /// Sluice's request and connection paths, HAProxy's HTTP mode and
    /// nginx as an HTTP proxy.
    #[arg(long)]
    pub http: bool,
    /// Only these paths of the comparison (comma-separated names as in
    /// the report, e.g. `sluice,sluice-tunnel`): for working on one path.
    /// The report then lacks the others' rows and ratios.
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// The agent binary under test; the release build when not set. The
    /// test command's smoke runs take the tests' build: its figures mean
    /// nothing either way, and a release build of its own would take CI
    /// four minutes.
    #[arg(skip)]
    pub binary: Option<PathBuf>,
}

impl BenchArgs {
    fn sluice(&self) -> PathBuf {
        (self.binary.clone()).unwrap_or_else(|| crate::target_dir().join("release/sluice"))
    }
}

/// One path under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Direct,
    Sluice,
    /// A `mode: kernel` service: balanced by connect4, no proxy hop.
    SluiceKernel,
    /// Proxy mode with the sockmap bypass on the workload-agent leg.
    SluiceSockmap,
    SluiceMtls,
    /// mTLS between the nodes in pooled HTTP/2 tunnels.
    SluiceTunnel,
    /// The same with one stream per pool connection: measured for memory
    /// only, to give a pool connection's cost.
    SluiceTunnelOne,
    Haproxy,
    Nginx,
}

impl Route {
    const ALL: [Route; 8] = [
        Route::Direct,
        Route::Sluice,
        Route::SluiceKernel,
        Route::SluiceSockmap,
        Route::SluiceMtls,
        Route::SluiceTunnel,
        Route::Haproxy,
        Route::Nginx,
    ];

    /// The paths `only` names, all of them when it names none.
    fn chosen(only: &[String]) -> anyhow::Result<Vec<Route>> {
        for name in only {
            if !Route::ALL
                .iter()
                .chain([&Route::SluiceTunnelOne])
                .any(|r| r.name() == name)
            {
                bail!("--only: no path is called {name:?}");
            }
        }
        Ok(Route::ALL
            .into_iter()
            .chain([Route::SluiceTunnelOne])
            .filter(|r| {
                if only.is_empty() {
                    *r != Route::SluiceTunnelOne
                } else {
                    only.iter().any(|n| n == r.name())
                }
            })
            .collect())
    }

    fn name(self) -> &'static str {
        match self {
            Route::Direct => "direct",
            Route::Sluice => "sluice",
            Route::SluiceKernel => "sluice-kernel",
            Route::SluiceSockmap => "sluice-sockmap",
            Route::SluiceMtls => "sluice-mtls",
            Route::SluiceTunnel => "sluice-tunnel",
            Route::SluiceTunnelOne => "sluice-tunnel-1",
            Route::Haproxy => "haproxy",
            Route::Nginx => "nginx",
        }
    }
}

struct Settings {
    rounds: usize,
    latency_seconds: f64,
    latency_rate: u64,
    latency_conns: usize,
    throughput_seconds: f64,
    throughput_conns: usize,
    churn_seconds: f64,
    churn_conns: usize,
    idle_conns: usize,
}

impl Settings {
    fn new(quick: bool) -> Settings {
        if quick {
            Settings {
                rounds: 1,
                latency_seconds: 1.0,
                latency_rate: 500,
                latency_conns: 4,
                throughput_seconds: 1.0,
                throughput_conns: 64,
                churn_seconds: 1.0,
                churn_conns: 16,
                idle_conns: 200,
            }
        } else {
            Settings {
                rounds: 3,
                latency_seconds: 10.0,
                latency_rate: 1000,
                latency_conns: 8,
                throughput_seconds: 5.0,
                throughput_conns: 64,
                churn_seconds: 5.0,
                churn_conns: 16,
                // The hard limit on open files is 20,000 and a proxy holds
                // two per connection.
                idle_conns: 9_800,
            }
        }
    }
}

const HALTPOLL: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// Sets the guest halt-poll time for the run and restores it, also when
/// the run is interrupted.
struct HaltPoll {
    old: Option<String>,
}

static HALTPOLL_OLD: std::sync::OnceLock<std::ffi::CString> = std::sync::OnceLock::new();

/// The agents this run started and has not stopped (a pid, or minus a
/// process group's id), for an interrupted run to stop: each attaches
/// programs to a bench cgroup that the next run uses, so one left behind
/// would take the next run's connections.
static RUNNING_AGENTS: [AtomicI32; 64] = [const { AtomicI32::new(0) }; 64];

fn remember_agent(target: i32) {
    for slot in &RUNNING_AGENTS {
        if slot
            .compare_exchange(0, target, AtomicOrdering::AcqRel, AtomicOrdering::Relaxed)
            .is_ok()
        {
            return;
        }
    }
}

fn forget_agent(target: i32) {
    for slot in &RUNNING_AGENTS {
        let _ = slot.compare_exchange(target, 0, AtomicOrdering::AcqRel, AtomicOrdering::Relaxed);
    }
}

/// Where to signal a child: its process group when it leads one of its
/// own (an agent under a profiler: the profiler and the agent it runs;
/// killing the profiler alone would leave the agent behind), else itself.
fn signal_target(pid: u32) -> i32 {
    let pid = pid as i32;
    // SAFETY: getpgid(2) on our own child.
    if unsafe { libc::getpgid(pid) } == pid {
        -pid
    } else {
        pid
    }
}

extern "C" fn restore_haltpoll_and_exit(_: libc::c_int) {
    for slot in &RUNNING_AGENTS {
        let target = slot.load(AtomicOrdering::Acquire);
        if target != 0 {
            // SAFETY: kill(2) is async-signal-safe; SIGTERM lets the agent
            // detach its programs and remove its pins.
            unsafe { libc::kill(target, libc::SIGTERM) };
        }
    }
    if let Some(old) = HALTPOLL_OLD.get() {
        // SAFETY: open/write/close/_exit are async-signal-safe; the strings
        // were prepared before the handler was installed.
        unsafe {
            let fd = libc::open(
                c"/sys/module/haltpoll/parameters/guest_halt_poll_ns".as_ptr(),
                libc::O_WRONLY,
            );
            if fd >= 0 {
                libc::write(fd, old.as_ptr().cast(), old.as_bytes().len());
                libc::close(fd);
            }
        }
    }
    // SAFETY: ends the process at once, as an interrupted run should.
    unsafe { libc::_exit(130) };
}

impl HaltPoll {
    fn set() -> HaltPoll {
        let Ok(old) = std::fs::read_to_string(HALTPOLL) else {
            return HaltPoll { old: None };
        };
        let old = old.trim().to_owned();
        if std::fs::write(HALTPOLL, "1000000").is_err() {
            return HaltPoll { old: None };
        }
        let _ = HALTPOLL_OLD.set(std::ffi::CString::new(old.clone()).unwrap_or_default());
        // SAFETY: installs a handler that only makes async-signal-safe calls.
        unsafe {
            libc::signal(
                libc::SIGTERM,
                restore_haltpoll_and_exit as *const () as libc::sighandler_t,
            );
            libc::signal(
                libc::SIGINT,
                restore_haltpoll_and_exit as *const () as libc::sighandler_t,
            );
        }
        HaltPoll { old: Some(old) }
    }

    fn note(&self) -> String {
        match &self.old {
            Some(old) => format!("guest_halt_poll_ns set to 1000000 for the run (was {old})"),
            None => "guest_halt_poll_ns not set (no haltpoll module here)".to_owned(),
        }
    }
}

impl Drop for HaltPoll {
    fn drop(&mut self) {
        if let Some(old) = &self.old {
            let _ = std::fs::write(HALTPOLL, old);
        }
    }
}

/// A child process killed on drop.
struct Proc {
    child: Child,
    name: String,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let target = signal_target(self.child.id());
        forget_agent(target);
        // SIGTERM first: the agent detaches its programs and removes pins.
        // SAFETY: kill(2) on our own child (or its group).
        unsafe { libc::kill(target, libc::SIGTERM) };
        for _ in 0..100 {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("   {} did not stop; killing it", self.name);
        // SAFETY: as above.
        unsafe { libc::kill(target, libc::SIGKILL) };
        let _ = self.child.wait();
    }
}

fn pin_self_to_cpu(cpu: usize) {
    // SAFETY: sched_setaffinity on this process with a local cpu_set_t.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// CPU time (user + system) of a process, in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let ticks = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let f: Vec<&str> = after.split_whitespace().collect();
            Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
        })
        .unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    ticks as f64 / hz
}

fn install_peers() -> anyhow::Result<()> {
    crate::setup::ensure_packages(&["haproxy", "nginx-core", "libnginx-mod-stream"]).map(|_| ())
}

/// The echo backend: writes back what it reads, on each connection. A
/// read takes what has come, up to 64 KiB: a bulk transfer read 1 KiB at
/// a time kept this one thread busy enough to hold the latency
/// connection's echo up by milliseconds (the head-of-line row measured
/// the backend: direct's latency p99 rose 10.6x beside the bulk).
fn start_backend(listener: std::net::TcpListener) -> anyhow::Result<SocketAddr> {
    let addr = listener.local_addr()?;
    listener.set_nonblocking(true)?;
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("backend runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("backend listener");
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    continue;
                };
                let _ = s.set_nodelay(true);
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    // Read into its spare capacity: pages are touched only
                    // as far as reads fill them.
                    let mut buf = Vec::with_capacity(64 * loadgen::MESSAGE);
                    loop {
                        buf.clear();
                        match s.read_buf(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(_) => {}
                        }
                        if s.write_all(&buf).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
    });
    Ok(addr)
}

/// Everything the run started; the processes stop before the namespaces
/// they run in go.
struct Rig {
    dir: PathBuf,
    sluice: PathBuf,
    targets: Vec<(Route, SocketAddr)>,
    /// Processes whose memory and CPU count for each path.
    pids: Vec<(Route, Vec<u32>)>,
    sluice_config: PathBuf,
    sockmap_config: PathBuf,
    _procs: Vec<Proc>,
    // After the processes: their namespaces.
    mtls: mesh::MeshPair,
    tunnel: mesh::MeshPair,
    tunnel_one: mesh::MeshPair,
}

fn start_agent(
    sluice: &Path,
    config: &Path,
    netns: Option<&Netns>,
    name: &str,
) -> anyhow::Result<Proc> {
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", "0"]);
    // For profiling the agents where the bench runs them, e.g.
    // `valgrind --tool=callgrind`: a command (split at spaces) they run
    // under. The figures then measure the profiler.
    if let Ok(prefix) = std::env::var("SLUICE_BENCH_AGENT_UNDER") {
        cmd.args(prefix.split_whitespace());
        // Stopped with its profiler (see `Proc`'s drop).
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    }
    cmd.arg(sluice)
        .args(["agent", "--config"])
        .arg(config)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some(ns) = netns {
        ns.enter_on_exec(&mut cmd)?;
    }
    let mut child = cmd.spawn().with_context(|| format!("start {name}"))?;
    remember_agent(signal_target(child.id()));
    let stderr = child.stderr.take().expect("piped");
    let proc = Proc {
        child,
        name: name.to_owned(),
    };
    // Forward the agent's warnings; wait until it answers on its admin API
    // (RUST_LOG=warn hides the ready line).
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("   {line}");
        }
    });
    Ok(proc)
}

fn wait_ready(sluice: &Path, config: &Path, netns: Option<&Netns>) -> anyhow::Result<()> {
    // An agent under a profiler (SLUICE_BENCH_AGENT_UNDER) starts slower.
    let tries = match std::env::var_os("SLUICE_BENCH_AGENT_UNDER") {
        Some(_) => 2_000,
        None => 200,
    };
    for _ in 0..tries {
        let mut cmd = Command::new(sluice);
        cmd.args(["status", "--config"])
            .arg(config)
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(ns) = netns {
            ns.enter_on_exec(&mut cmd)?;
        }
        if cmd.status()?.success() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the agent on {} did not become ready", config.display())
}

fn setup(sluice: &Path) -> anyhow::Result<Rig> {
    let dir = crate::target_dir().join("bench");
    std::fs::create_dir_all(&dir)?;
    let mut procs = Vec::new();

    // Backend for the single-node paths, in this process (CPU 1).
    let backend = start_backend(std::net::TcpListener::bind("127.0.0.1:0")?)?;

    // Sluice, one node.
    let state = dir.join("state");
    let sluice_config = dir.join("sluice.yaml");
    let echo = echo_service;
    let local_echo = Endpoint::new(backend);
    let mut one = node("bench", "sluice-bench", "one", &state)?;
    one.services = vec![
        echo("127.77.9.10:8080", local_echo.clone())?,
        Service {
            name: "echo-kernel".into(),
            ..echo("127.77.9.12:8080", local_echo.clone())?
        }
        .mode(Mode::Kernel),
    ];
    one.write(&sluice_config)?;
    if !state.join("ca/ca.pem").exists() {
        run_cmd(
            Command::new(sluice)
                .args(["ca", "init", "--config"])
                .arg(&sluice_config),
        )?;
    }
    procs.push(start_agent(sluice, &sluice_config, None, "sluice")?);
    wait_ready(sluice, &sluice_config, None)?;
    let sluice_pid = procs.last().map(Proc::pid).unwrap_or(0);

    // Sluice proxy mode again, with the sockmap bypass: its own agent,
    // cgroup root and pins, the same backend.
    let sockmap_config = dir.join("sluice-sockmap.yaml");
    let mut sockmap = node("bench", "sluice-bench-sockmap", "sockmap", &state)?;
    sockmap.agent.sockmap = Some(true);
    sockmap.services = vec![echo("127.77.9.13:8080", local_echo)?];
    sockmap.write(&sockmap_config)?;
    procs.push(start_agent(
        sluice,
        &sockmap_config,
        None,
        "sluice-sockmap",
    )?);
    wait_ready(sluice, &sockmap_config, None)?;
    let sockmap_pid = procs.last().map(Proc::pid).unwrap_or(0);

    // Sluice with mTLS: two nodes in network namespaces joined by veth;
    // again with tunnels.
    let mtls = mesh::start(
        &dir,
        sluice,
        &state,
        ("mtls", 77, "127.77.9.11:8080"),
        None,
        &mut procs,
    )?;
    let tunnel = mesh::start(
        &dir,
        sluice,
        &state,
        ("tun", 78, "127.77.9.14:8080"),
        Some(100),
        &mut procs,
    )?;
    let tunnel_one = mesh::start(
        &dir,
        sluice,
        &state,
        ("tun1", 79, "127.77.9.15:8080"),
        Some(1),
        &mut procs,
    )?;

    // HAProxy, TCP mode, one thread.
    let haproxy_port = free_port()?;
    let haproxy_cfg = dir.join("haproxy.cfg");
    std::fs::write(
        &haproxy_cfg,
        format!(
            "global\n  nbthread 1\n  maxconn 9950\n  ulimit-n 20000\n\ndefaults\n  mode tcp\n  timeout connect 1s\n  \
             timeout client 1h\n  timeout server 1h\n\nlisten bench\n  bind 127.0.0.1:{haproxy_port}\n  \
             option tcp-smart-accept\n  option tcp-smart-connect\n  server echo 127.0.0.1:{}\n",
            backend.port()
        ),
    )?;
    let haproxy = Command::new("taskset")
        .args(["-c", "0", "haproxy", "-db", "-f"])
        .arg(&haproxy_cfg)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start haproxy")?;
    procs.push(Proc {
        child: haproxy,
        name: "haproxy".into(),
    });
    let haproxy_pid = procs.last().map(Proc::pid).unwrap_or(0);

    // nginx stream, one worker, no master.
    let nginx_port = free_port()?;
    let nginx_cfg = dir.join("nginx.conf");
    std::fs::write(
        &nginx_cfg,
        format!(
            "load_module /usr/lib/nginx/modules/ngx_stream_module.so;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n\
             pid {}/nginx.pid;\nerror_log stderr error;\nevents {{ worker_connections 20000; }}\n\
             stream {{ server {{ listen 127.0.0.1:{nginx_port}; proxy_pass 127.0.0.1:{}; tcp_nodelay on; \
             proxy_timeout 1h; }} }}\n",
            dir.display(),
            backend.port()
        ),
    )?;
    let nginx = Command::new("taskset")
        .args(["-c", "0", "nginx", "-c"])
        .arg(&nginx_cfg)
        .args(["-g", "daemon off; master_process off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start nginx")?;
    procs.push(Proc {
        child: nginx,
        name: "nginx".into(),
    });
    let nginx_pid = procs.last().map(Proc::pid).unwrap_or(0);
    std::thread::sleep(Duration::from_millis(300));

    Ok(Rig {
        dir,
        sluice: sluice.to_path_buf(),
        targets: vec![
            (Route::Direct, backend),
            (Route::Sluice, "127.77.9.10:8080".parse()?),
            (Route::SluiceKernel, "127.77.9.12:8080".parse()?),
            (Route::SluiceSockmap, "127.77.9.13:8080".parse()?),
            (Route::SluiceMtls, "127.77.9.11:8080".parse()?),
            (Route::SluiceTunnel, "127.77.9.14:8080".parse()?),
            (Route::SluiceTunnelOne, "127.77.9.15:8080".parse()?),
            (
                Route::Haproxy,
                SocketAddr::from(([127, 0, 0, 1], haproxy_port)),
            ),
            (Route::Nginx, SocketAddr::from(([127, 0, 0, 1], nginx_port))),
        ],
        pids: vec![
            (Route::Direct, vec![]),
            (Route::Sluice, vec![sluice_pid]),
            // The agent is not in the kernel path; its CPU would only show
            // the outcome events it reads.
            (Route::SluiceKernel, vec![]),
            (Route::SluiceSockmap, vec![sockmap_pid]),
            (Route::SluiceMtls, mtls.pids.clone()),
            (Route::SluiceTunnel, tunnel.pids.clone()),
            (Route::SluiceTunnelOne, tunnel_one.pids.clone()),
            (Route::Haproxy, vec![haproxy_pid]),
            (Route::Nginx, vec![nginx_pid]),
        ],
        sluice_config,
        sockmap_config,
        _procs: procs,
        mtls,
        tunnel,
        tunnel_one,
    })
}

/// The bench's echo service at `vip` with one endpoint, its breakers out
/// of the way.
fn echo_service(vip: &str, endpoint: Endpoint) -> anyhow::Result<Service> {
    let breakers = CircuitBreakers {
        max_connections: Some(100_000),
        max_pending_connects: Some(100_000),
        ..CircuitBreakers::default()
    };
    Ok(Service::new("echo", "bench", vip.parse()?, &[])
        .circuit_breakers(breakers)
        .endpoints(vec![endpoint]))
}

/// A bench node's config: one workload `bench` (bench/client), its agent on
/// free ports with its own pins `sluice-bench-<pins>`, one worker thread, a
/// 2 s drain.
fn node(name: &str, cgroup_root: &str, pins: &str, state: &Path) -> anyhow::Result<Config> {
    let mut config = Config::new(name, cgroup_root);
    config.agent.outbound = Some(SocketAddr::from(([127, 0, 0, 1], free_port()?)));
    config.agent.admin = Some(SocketAddr::from(([127, 0, 0, 1], free_port()?)));
    config.agent.inbound_port = Some(free_port()?);
    config.agent.pin_dir = Some(PathBuf::from(format!("/sys/fs/bpf/sluice-bench-{pins}")));
    config.agent.state_dir = Some(state.to_owned());
    config.agent.worker_threads = Some(1);
    config.agent.drain_timeout = Some(Duration::from_secs(2));
    config.workloads = vec![Workload::new("bench", "bench", "client")];
    Ok(config)
}

impl Rig {
    fn target(&self, p: Route) -> SocketAddr {
        self.targets
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, a)| *a)
            .expect("every path has a target")
    }

    fn pids(&self, p: Route) -> &[u32] {
        self.pids
            .iter()
            .find(|(q, _)| *q == p)
            .map(|(_, v)| v.as_slice())
            .unwrap_or(&[])
    }

    /// The loadgen command for `path`: through `sluice exec` (and the node
    /// namespace) where the path is meshed; on CPU 1 always.
    fn loadgen(&self, path: Route, args: &[String]) -> anyhow::Result<Command> {
        let me = std::env::current_exe()?;
        let mut cmd = Command::new("taskset");
        cmd.args(["-c", "1"]);
        match path {
            Route::Sluice
            | Route::SluiceKernel
            | Route::SluiceSockmap
            | Route::SluiceMtls
            | Route::SluiceTunnel
            | Route::SluiceTunnelOne => {
                let pair = match path {
                    Route::SluiceMtls => Some(&self.mtls),
                    Route::SluiceTunnel => Some(&self.tunnel),
                    Route::SluiceTunnelOne => Some(&self.tunnel_one),
                    _ => None,
                };
                let config = match (path, pair) {
                    (_, Some(pair)) => &pair.config,
                    (Route::SluiceSockmap, _) => &self.sockmap_config,
                    _ => &self.sluice_config,
                };
                cmd.arg(&self.sluice)
                    .args(["exec", "--workload", "bench", "--config"])
                    .arg(config)
                    .arg("--");
                if let Some(pair) = pair {
                    pair.netns[0].enter_on_exec(&mut cmd)?;
                }
            }
            _ => {}
        }
        cmd.arg(me).arg("loadgen").args(args);
        Ok(cmd)
    }

    fn measure(&self, path: Route, args: Vec<String>) -> anyhow::Result<Value> {
        let out = self
            .loadgen(path, &args)?
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            bail!("loadgen on {} failed ({})", path.name(), out.status);
        }
        let text = String::from_utf8_lossy(&out.stdout);
        serde_json::from_str(text.lines().last().unwrap_or(""))
            .with_context(|| format!("loadgen said {text}"))
    }

    /// Head-of-line blocking: one latency connection's p99 alone, then
    /// beside a bulk transfer of 800 x 64 KiB a second (52 MB/s, well
    /// within what every path carries) from the same workload: on
    /// `SluiceTunnel`, in the same pool connection; elsewhere, on a
    /// connection of its own.
    fn head_of_line(&self, path: Route, s: &Settings) -> anyhow::Result<Value> {
        let latency = |seconds: f64| {
            vec![
                "--target".to_owned(),
                self.target(path).to_string(),
                "--workload".into(),
                "latency".into(),
                "--conns".into(),
                "1".into(),
                "--rate".into(),
                "500".into(),
                "--seconds".into(),
                seconds.to_string(),
            ]
        };
        let alone = self.measure(path, latency(s.latency_seconds))?;
        let bulk_args = vec![
            "--target".to_owned(),
            self.target(path).to_string(),
            "--workload".into(),
            "bulk".into(),
            "--conns".into(),
            "1".into(),
            "--rate".into(),
            "800".into(),
            "--seconds".into(),
            (s.latency_seconds + 1.0).to_string(),
        ];
        let bulk = self
            .loadgen(path, &bulk_args)?
            .stdout(Stdio::piped())
            .spawn()
            .context("start the bulk transfer")?;
        std::thread::sleep(Duration::from_millis(300));
        let beside = self.measure(path, latency(s.latency_seconds))?;
        let out = bulk.wait_with_output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let bulk: Value =
            serde_json::from_str(text.lines().last().unwrap_or("")).unwrap_or_default();
        Ok(json!({
            "alone_p99_us": alone["p99_us"],
            "beside_bulk_p99_us": beside["p99_us"],
            "alone_p50_us": alone["p50_us"],
            "beside_bulk_p50_us": beside["p50_us"],
            "errors": beside["errors"],
            "bulk_mb_per_s": bulk["mb_per_s"],
        }))
    }

    /// Resident memory per idle connection, in bytes, for a proxy path.
    fn memory(&self, path: Route, conns: usize) -> anyhow::Result<Value> {
        let pids = self.pids(path).to_vec();
        let before: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
        let args = vec![
            "--target".into(),
            self.target(path).to_string(),
            "--workload".into(),
            "idle".into(),
            "--conns".into(),
            conns.to_string(),
        ];
        let mut child = self
            .loadgen(path, &args)?
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let first = lines.next().transpose()?.unwrap_or_default();
        if !first.contains("held") {
            let _ = child.kill();
            bail!("idle loadgen on {}: {first}", path.name());
        }
        std::thread::sleep(Duration::from_millis(500));
        let after: Vec<u64> = pids.iter().map(|p| rss_kib(*p)).collect();
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(b"\n");
        }
        let _ = child.wait();
        std::thread::sleep(Duration::from_millis(500));
        // Each agent's own growth too: a two-node path's target is per
        // agent, and one agent may hold more than the other.
        let per_agent: Vec<f64> = before
            .iter()
            .zip(&after)
            .map(|(b, a)| (a.saturating_sub(*b) * 1024) as f64 / conns as f64)
            .collect();
        Ok(json!({
            "connections": conns,
            "rss_before_kib": before.iter().sum::<u64>(),
            "rss_after_kib": after.iter().sum::<u64>(),
            "bytes_per_connection": per_agent.iter().sum::<f64>(),
            "bytes_per_connection_per_agent": per_agent,
            "largest_agent_bytes_per_connection": per_agent.iter().copied().fold(0.0, f64::max),
        }))
    }
}

/// Set in the environment of the release build's run, which the debug
/// build's set up and built for.
const RELEASE_RERUN: &str = "SLUICE_BENCH_RELEASE_RERUN";

/// Whether this is the release build's run of [`in_release_build`].
pub fn is_release_rerun() -> bool {
    std::env::var_os(RELEASE_RERUN).is_some()
}

/// Runs this bench again from a release build of xtask, with the same
/// arguments: the load generator and the echo backend are xtask, and a
/// debug build of them (what `cargo xtask` runs) would bound every path's
/// throughput and add to every latency. The smoke runs (`--quick`) keep
/// the debug build: their figures mean nothing.
pub fn in_release_build() -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt as _;
    crate::run(crate::cargo().args(["build", "--release", "--package", "xtask"]))?;
    let release = crate::target_dir().join("release/xtask");
    let err = Command::new(&release)
        .args(std::env::args_os().skip(1))
        .env(RELEASE_RERUN, "1")
        .exec();
    Err(anyhow::Error::new(err).context(format!("run {}", release.display())))
}

/// Runs the whole comparison and writes the report.
pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if !crate::setup::is_root() {
        bail!(
            "the bench attaches eBPF programs, makes network namespaces and pins CPUs: run it as root"
        );
    }
    // Online CPUs, not this process's affinity: an earlier run in the same
    // process pinned it to one.
    // SAFETY: sysconf(3) reads a system constant.
    if unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) } < 2 {
        bail!("the bench needs two CPUs: one for the proxy, one for load and backend");
    }
    if args.upgrade {
        let haltpoll = HaltPoll::set();
        println!("== bench (upgrade): {}", haltpoll.note());
        pin_self_to_cpu(1);
        return upgrade::run(&args.sluice(), args.quick);
    }
    if args.http {
        let haltpoll = HaltPoll::set();
        println!("== bench (http): {}", haltpoll.note());
        pin_self_to_cpu(1);
        return http::run(&args.sluice(), args.quick);
    }
    install_peers()?;
    let s = Settings::new(args.quick);
    let haltpoll = HaltPoll::set();
    println!(
        "== bench ({}): {}",
        if args.quick { "quick" } else { "full" },
        haltpoll.note()
    );
    pin_self_to_cpu(1);
    let chosen = Route::chosen(&args.only)?;
    mesh::remove_stale_namespaces();
    let rig = setup(&args.sluice())?;

    let mut results: Vec<(Route, &'static str, Value)> = Vec::new();
    let workloads: [(&'static str, Vec<String>); 3] = [
        (
            "latency",
            vec![
                "--workload".into(),
                "latency".into(),
                "--conns".into(),
                s.latency_conns.to_string(),
                "--rate".into(),
                s.latency_rate.to_string(),
                "--seconds".into(),
                s.latency_seconds.to_string(),
            ],
        ),
        (
            "throughput",
            vec![
                "--workload".into(),
                "throughput".into(),
                "--conns".into(),
                s.throughput_conns.to_string(),
                "--seconds".into(),
                s.throughput_seconds.to_string(),
            ],
        ),
        (
            "churn",
            vec![
                "--workload".into(),
                "churn".into(),
                "--conns".into(),
                s.churn_conns.to_string(),
                "--seconds".into(),
                s.churn_seconds.to_string(),
            ],
        ),
    ];
    for (name, wargs) in &workloads {
        for round in 0..s.rounds {
            // Interleaved: every path once per round, in turn.
            for path in chosen
                .iter()
                .copied()
                .filter(|p| *p != Route::SluiceTunnelOne)
            {
                let mut a = vec!["--target".to_owned(), rig.target(path).to_string()];
                a.extend(wargs.iter().cloned());
                let cpu_before: Vec<f64> = rig.pids(path).iter().map(|p| cpu_seconds(*p)).collect();
                let mut v = rig.measure(path, a)?;
                // Each agent's own, too: on a two-node path, what one node pays.
                let cpu: Vec<f64> = rig
                    .pids(path)
                    .iter()
                    .zip(&cpu_before)
                    .map(|(p, before)| cpu_seconds(*p) - before)
                    .collect();
                v["proxy_cpu_seconds"] = json!(cpu.iter().sum::<f64>());
                v["proxy_cpu_seconds_per_agent"] = json!(cpu);
                println!(
                    "   {name:<10} round {} {:<12} {}",
                    round + 1,
                    path.name(),
                    report::brief(name, &v)
                );
                results.push((path, name, v));
            }
        }
    }
    // Before the memory step: its 9,800 connections leave the agents
    // busy closing them for a while.
    // Direct and the plain proxy path too: the load generator and the
    // backend carry the same bulk with no proxy, and the plain path's one
    // agent with no TLS and no shared connection, so their ratios are
    // what the bench and the shared core do to the latency stream
    // whatever the transport. In rounds, as the other workloads: one pair
    // of ten-second runs reads this machine's stalls as often as the
    // paths.
    for round in 0..s.rounds {
        for path in [
            Route::Direct,
            Route::Sluice,
            Route::SluiceMtls,
            Route::SluiceTunnel,
        ]
        .into_iter()
        .filter(|p| chosen.contains(p))
        {
            let v = rig.head_of_line(path, &s)?;
            println!(
                "   {:<10} round {} {:<12} {}",
                "hol",
                round + 1,
                path.name(),
                report::brief("hol", &v)
            );
            results.push((path, "hol", v));
        }
    }
    // Memory per idle connection of the proxy processes; the kernel path
    // has no proxy process.
    let memory_too = args.only.is_empty().then_some(Route::SluiceTunnelOne);
    for path in chosen
        .iter()
        .copied()
        .chain(memory_too)
        .filter(|p| !matches!(p, Route::Direct | Route::SluiceKernel))
    {
        let v = rig.memory(path, s.idle_conns)?;
        println!(
            "   {:<10} {:<20} {}",
            "memory",
            path.name(),
            report::brief("memory", &v)
        );
        results.push((path, "memory", v));
    }
    let summary = report::write(&rig.dir, &results, args.quick, &haltpoll.note())?;
    println!("\n{summary}");
    report::check_every_path_carried_traffic(&results)?;
    Ok(())
}
