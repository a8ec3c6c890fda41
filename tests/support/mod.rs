//! Helpers that let each integration test read as its scenario: real
//! backends on loopback, a real agent process with its own cgroup root and
//! pin directory, workloads run through `sluice exec`. Everything a test
//! creates is removed when its helpers drop, even if the test fails: the
//! guards are the test kit's (`sluice-testkit`), and `cargo xtask test`
//! fails if a run leaves anything behind.
#![allow(dead_code)] // each test binary uses a different subset

use std::{
    collections::HashMap,
    ffi::CString,
    io::{BufRead, BufReader, Write},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    thread,
    time::Duration,
};

use sluice::admin::client as admin_client;
#[allow(unused_imports)] // each test binary uses a different subset
pub use sluice_testkit::{
    cgroup::{self, CgroupTree},
    client::{Calls, Client},
    config::{
        self, Audit, Authorization, CircuitBreakers, Config, Decision, Endpoint, Fallback,
        HealthCheck, LbPolicy, Mode, OnAgentDown, OutlierDetection, PeerNode, RateLimit,
        RequestRule, Requests, Service, Timeouts, Workload,
    },
    metrics::Exposition,
    names::unique,
    netns::{self, Netns},
    pins::PinDir,
    port::free_port,
    process::{ChildGuard, SpawnGuarded},
    shell::sh,
    tempdir::TempDir,
    wait::wait_until,
};

pub mod client;
pub mod install;
pub mod kubeapi;
pub mod pods;

pub use client::Held;

/// The agent binary under test.
pub fn sluice_bin() -> &'static str {
    env!("CARGO_BIN_EXE_sluice")
}

/// A line-echo TCP server: for each line it receives it answers
/// `<name> <line>`. Counts the connections it accepted.
pub struct Backend {
    pub name: String,
    pub addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl Backend {
    pub fn start(name: &str) -> Backend {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap())
    }

    pub fn start_on(name: &str, addr: SocketAddr) -> Backend {
        let listener = TcpListener::bind(addr).expect("bind backend");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, s, n) = (accepted.clone(), stop.clone(), name.to_owned());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        a.fetch_add(1, Ordering::SeqCst);
                        let n = n.clone();
                        thread::spawn(move || echo_lines(&n, stream));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        Backend {
            name: name.to_owned(),
            addr,
            accepted,
            stop,
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::SeqCst)
    }
}

fn echo_lines(name: &str, stream: TcpStream) {
    stream.set_nonblocking(false).unwrap();
    let mut writer = stream.try_clone().unwrap();
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { return };
        // One write per reply: `writeln!` may split it, and Nagle would
        // then hold the rest for the peer's delayed ACK (40 ms).
        if writer
            .write_all(format!("{name} {line}\n").as_bytes())
            .is_err()
        {
            return;
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A server for [`Client::Stream`]: echoes what it reads as it reads it;
/// after the client's half-close, sends the tail
/// ([`sluice_testkit::client::stream_tail`]) a KiB at a time with `pace`
/// between, then closes. Counts the half-closes it saw.
pub struct StreamServer {
    pub addr: SocketAddr,
    half_closed: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
}

impl StreamServer {
    pub fn start(tail: usize, pace: Duration) -> StreamServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind stream server");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let half_closed = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (h, s) = (half_closed.clone(), stop.clone());
        thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let h = h.clone();
                        thread::spawn(move || stream_back(stream, tail, pace, &h));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        StreamServer {
            addr,
            half_closed,
            stop,
        }
    }

    /// Connections whose client has half-closed.
    pub fn half_closed(&self) -> usize {
        self.half_closed.load(Ordering::SeqCst)
    }
}

fn stream_back(mut stream: TcpStream, tail: usize, pace: Duration, half_closed: &AtomicUsize) {
    use std::io::Read;
    stream.set_nonblocking(false).unwrap();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if stream.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(_) => return,
        }
    }
    half_closed.fetch_add(1, Ordering::SeqCst);
    for chunk in sluice_testkit::client::stream_tail(tail).chunks(1024) {
        if stream.write_all(chunk).is_err() {
            return;
        }
        thread::sleep(pace);
    }
}

impl Drop for StreamServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// The meshed service `payments/<name>` at `vip` over these endpoints.
pub fn service(name: &str, vip: &str, endpoints: &[SocketAddr]) -> Service {
    Service::new(name, "payments", vip.parse().expect("vip"), endpoints)
}

/// The files and names of one test's node: its own cgroup root, pin dir
/// and ports. On drop, whatever still runs in its cgroup tree is killed and
/// the tree, the pins and the files are removed.
pub struct AgentConfig {
    pub dir: PathBuf,
    pub path: PathBuf,
    pub cgroup_root: String,
    pub pin_dir: PathBuf,
    pub outbound_port: u16,
    pub inbound_port: u16,
    pub admin_port: u16,
    pub capture_port: u16,
    // Dropped in this order: the processes go before the pins, and the
    // files they may have open last.
    cgroup: CgroupTree,
    pins: PinDir,
    files: TempDir,
}

impl AgentConfig {
    /// [`Self::base`] with these services, written.
    pub fn new(services: &[Service]) -> AgentConfig {
        Self::with(|c| c.base(services))
    }

    /// The config `build` makes from this node's names and ports, written.
    pub fn with(build: impl FnOnce(&AgentConfig) -> Config) -> AgentConfig {
        let files = TempDir::create("cfg").unwrap();
        // One name for the files, the cgroup root and the pins.
        let name = files.name().to_owned();
        let cgroup = CgroupTree::adopt(cgroup::mount().unwrap().join(&name));
        let pins = PinDir::named(&name);
        let config = AgentConfig {
            path: files.join("sluice.yaml"),
            dir: files.path().to_owned(),
            pin_dir: pins.path().to_owned(),
            cgroup_root: name,
            outbound_port: free_port().unwrap(),
            inbound_port: free_port().unwrap(),
            admin_port: free_port().unwrap(),
            capture_port: free_port().unwrap(),
            cgroup,
            pins,
            files,
        };
        config.write(&build(&config));
        config
    }

    /// Node `test` with one workload, `client` (payments/client), and
    /// these services; the agent on this node's ports, giving up on a
    /// connect after 300 ms.
    pub fn base(&self, services: &[Service]) -> Config {
        let mut config = Config::new("test", &self.cgroup_root);
        config.agent = config::Agent {
            connect_timeout: Some(Duration::from_millis(300)),
            drain_timeout: Some(Duration::from_secs(10)),
            capture: Some(SocketAddr::from(([127, 0, 0, 1], self.capture_port))),
            ..self.agent(&self.dir.join("state"), self.inbound_port)
        };
        config.workloads = vec![Workload::new("client", "payments", "client")];
        config.services = services.to_vec();
        config
    }

    /// This node's agent: its outbound, admin and pins, `state_dir` and
    /// `inbound_port` (nodes of one mesh share both), connects given up
    /// after 1 s, a drain of 5 s at the most.
    pub fn agent(&self, state_dir: &Path, inbound_port: u16) -> config::Agent {
        config::Agent {
            outbound: Some(SocketAddr::from(([127, 0, 0, 1], self.outbound_port))),
            pin_dir: Some(self.pin_dir.clone()),
            connect_timeout: Some(Duration::from_secs(1)),
            drain_timeout: Some(Duration::from_secs(5)),
            inbound_port: Some(inbound_port),
            state_dir: Some(state_dir.to_owned()),
            admin: Some(self.admin()),
            ..config::Agent::default()
        }
    }

    /// [`Self::base`] with these services and the audit trail in
    /// [`Self::audit_path`].
    pub fn audited(services: &[Service]) -> AgentConfig {
        Self::with(|c| Config {
            audit: Some(Audit {
                output: c.audit_path(),
                requests: false,
            }),
            ..c.base(services)
        })
    }

    /// Where [`Self::audited`] writes the audit trail.
    pub fn audit_path(&self) -> PathBuf {
        self.dir.join("audit.jsonl")
    }

    /// Node `name` at `address` in a two-node mesh with `peer`: the agent
    /// as [`Self::agent`] makes it, inbound handshakes given 1 s.
    pub fn mesh_node(
        &self,
        (name, address): (&str, IpAddr),
        state_dir: &Path,
        inbound_port: u16,
        (peer, peer_address): (&str, IpAddr),
    ) -> Config {
        let mut config = Config::new(name, &self.cgroup_root);
        config.node.address = Some(address);
        config.agent = self.agent(state_dir, inbound_port);
        config.mesh = Some(config::Mesh {
            inbound_handshake_timeout: Some(Duration::from_secs(1)),
            certificates: None,
            tunnels: None,
        });
        config.nodes = vec![PeerNode {
            name: peer.to_owned(),
            address: peer_address,
        }];
        config
    }

    /// The agent's admin API.
    pub fn admin(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.admin_port))
    }

    /// Replaces the file with `config`, in one rename so a watching agent
    /// never reads half a file.
    pub fn write(&self, config: &Config) {
        config.write(&self.path).unwrap();
    }

    /// Replaces the file with [`Self::base`] with these services.
    pub fn rewrite(&self, services: &[Service]) {
        self.write(&self.base(services));
    }

    /// Replaces the file with `text` (a broken file, a shipped one),
    /// atomically.
    pub fn write_raw(&self, text: &str) {
        let tmp = self.dir.join("sluice.yaml.new");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.path).unwrap();
    }

    /// Absolute path of the node's cgroup root.
    pub fn cgroup_root_path(&self) -> PathBuf {
        self.cgroup.path().to_owned()
    }

    /// Runs `sluice ARGS --config FILE` to its end.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(sluice_bin())
            .args(args)
            .arg("--config")
            .arg(&self.path)
            .output()
            .expect("run sluice")
    }

    /// `sluice ca init` for this config: a CA in its state directory, which
    /// other nodes sharing that directory then trust too.
    pub fn ca_init(&self) {
        let out = self.run(&["ca", "init"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// A running `sluice agent`. Its stderr is collected for assertions.
pub struct Agent {
    child: Child,
    log: Arc<Mutex<String>>,
    pub config_path: PathBuf,
    /// The node's network namespace, when the agent runs in one.
    netns: Option<PathBuf>,
    /// Its admin API, as its config file says (inside `netns`).
    admin: SocketAddr,
}

impl Agent {
    /// Starts the agent and waits until it reports ready.
    pub fn start(config: &AgentConfig) -> Agent {
        Self::spawn(config, None, None)
    }

    /// Starts the agent as a process inside `cgroup` (which must exist).
    pub fn start_in_cgroup(config: &AgentConfig, cgroup: &Path) -> Agent {
        Self::spawn(config, Some(cgroup), None)
    }

    /// Starts the agent inside network namespace `netns` (a node).
    pub fn start_in_netns(config: &AgentConfig, netns: &Netns) -> Agent {
        Self::spawn(config, None, Some(netns))
    }

    /// Starts the agent with more command-line arguments.
    pub fn start_with_args(config: &AgentConfig, extra: &[&str]) -> Agent {
        Self::spawn_with(config, None, None, extra, &[])
    }

    /// Starts the agent inside `netns` with these environment variables
    /// (as a DaemonSet's pod spec sets them).
    pub fn start_in_netns_with_env(
        config: &AgentConfig,
        netns: &Netns,
        env: &[(&str, &str)],
    ) -> Agent {
        Self::spawn_with(config, None, Some(netns), &[], env)
    }

    fn spawn(config: &AgentConfig, cgroup: Option<&Path>, netns: Option<&Netns>) -> Agent {
        Self::spawn_with(config, cgroup, netns, &[], &[])
    }

    fn spawn_with(
        config: &AgentConfig,
        cgroup: Option<&Path>,
        netns: Option<&Netns>,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut cmd = Command::new(sluice_bin());
        cmd.args(["agent", "--config"])
            .arg(&config.path)
            .args(extra)
            .envs(env.iter().copied())
            // A flaky test's agents can say more: SLUICE_TEST_AGENT_LOG
            // takes RUST_LOG's form.
            .env("RUST_LOG", agent_log_filter())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(ns) = netns {
            ns.enter_on_exec(&mut cmd).unwrap();
        }
        if let Some(cg) = cgroup {
            cgroup::enter_on_exec(&mut cmd, cg);
        }
        let mut child = cmd.spawn().expect("spawn sluice agent");
        let log = Arc::new(Mutex::new(String::new()));
        let ready = Arc::new(AtomicBool::new(false));
        let stderr = child.stderr.take().unwrap();
        let (l, r) = (log.clone(), ready.clone());
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[agent] {line}");
                if line.contains("sluice agent ready") {
                    r.store(true, Ordering::SeqCst);
                }
                let mut log = l.lock().unwrap();
                log.push_str(&line);
                log.push('\n');
            }
        });
        let mut agent = Agent {
            child,
            log,
            config_path: config.path.clone(),
            netns: netns.map(|n| n.path()),
            admin: admin_of(&config.path),
        };
        let started = wait_until(Duration::from_secs(20), || {
            ready.load(Ordering::SeqCst) || agent.child.try_wait().ok().flatten().is_some()
        });
        assert!(
            started && ready.load(Ordering::SeqCst),
            "agent did not become ready; log:\n{}",
            agent.log()
        );
        agent
    }

    /// Everything the agent wrote to stderr so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits (up to 5 s) until the log contains `needle`; the log arrives
    /// through a pipe, a little after the event it reports.
    pub fn wait_for_log(&self, needle: &str) -> bool {
        wait_until(Duration::from_secs(5), || self.log().contains(needle))
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the agent with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Runs another `sluice` subcommand against this agent's config, in
    /// the agent's network namespace if it has one.
    pub fn sluice(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(sluice_bin());
        if let Some(path) = &self.netns {
            netns::enter_on_exec(&mut cmd, path).unwrap();
        }
        cmd.args(args)
            .env("SLUICE_CONFIG", &self.config_path)
            .output()
            .expect("run sluice")
    }

    pub fn sigterm(&self) {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_none()
    }

    /// Waits for the agent to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        let mut status = None;
        wait_until(timeout, || {
            status = child.try_wait().ok().flatten();
            status.is_some()
        });
        status.unwrap_or_else(|| panic!("agent did not exit within {timeout:?}"))
    }

    /// Runs `script` with bash as the workload `client`, through
    /// `sluice exec`, and returns its output.
    pub fn run_as_client(&self, script: &str) -> Output {
        self.client_command(script)
            .output()
            .expect("run sluice exec")
    }

    /// The `sluice exec` command for `script`, to spawn in the background.
    pub fn client_command(&self, script: &str) -> Command {
        self.workload_command("client", script)
    }

    /// `sluice exec` of `script` as workload `workload`, in the agent's
    /// network namespace if it has one.
    pub fn workload_command(&self, workload: &str, script: &str) -> Command {
        let mut cmd = self.exec(workload);
        // Bounds every client run, so a broken redirect fails the test
        // instead of hanging it.
        cmd.args(["timeout", "--signal=KILL", "60", "bash", "-c", script]);
        cmd
    }

    /// `sluice exec ... --workload WORKLOAD --`, in the agent's network
    /// namespace if it has one: the command to run as that workload
    /// follows.
    fn exec(&self, workload: &str) -> Command {
        let mut cmd = Command::new(sluice_bin());
        if let Some(path) = &self.netns {
            netns::enter_on_exec(&mut cmd, path).unwrap();
        }
        cmd.args(["exec", "--config"])
            .arg(&self.config_path)
            .args(["--workload", workload, "--"]);
        cmd
    }

    /// `sluice maps`: the pinned maps as an operator reads them, with the
    /// agent running or not.
    fn maps(&self) -> serde_json::Value {
        let out = self.sluice(&["maps", "-o", "json"]);
        assert!(
            out.status.success(),
            "sluice maps: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("sluice maps prints JSON")
    }

    /// `client` run as workload `workload` through `sluice exec` (in the
    /// agent's namespace if it has one), for 60 s at the most.
    pub fn client(&self, workload: &str, client: impl Into<Client>) -> Command {
        let mut cmd = self.exec(workload);
        cmd.args(client::argv(&client.into(), 60))
            .env(sluice_testkit::client::CLIENT_VAR, "1");
        cmd
    }

    /// The lines `client` prints, run as workload `workload`.
    pub fn run_client(&self, workload: &str, client: impl Into<Client>) -> Vec<String> {
        lines(
            &self
                .client(workload, client)
                .output()
                .expect("run sluice exec"),
        )
    }

    /// `n` calls to `to` as workload `client`, one connection each: each
    /// reply line, or `FAILED`.
    pub fn calls(&self, to: SocketAddr, n: usize) -> Vec<String> {
        self.run_client("client", Calls::new(to, n))
    }

    /// A connection to `to` held open by workload `workload`.
    pub fn hold(&self, workload: &str, to: SocketAddr) -> Held {
        Held::start(self.client(workload, Client::Hold { to }))
    }

    /// (records by cookie, records by peer) in the pinned maps.
    pub fn record_counts(&self) -> (u64, u64) {
        let records = &self.maps()["records"];
        let count = |name: &str| records[name].as_u64().expect("a record count");
        (count("orig_by_cookie"), count("orig_by_peer"))
    }

    /// The programs' counter `stat`, summed over CPUs.
    pub fn stat(&self, stat: sluice_maps::Stat) -> u64 {
        self.maps()["counters"][stat.name()]
            .as_u64()
            .unwrap_or_else(|| panic!("no counter {} in sluice maps", stat.name()))
    }

    /// GETs `path` from the agent's admin API (from inside its namespace):
    /// the status and the body, or None when nothing answers.
    pub fn admin_get(&self, path: &str) -> Option<(u16, String)> {
        let (admin, path) = (self.admin, path.to_owned());
        let get = move || admin_client::get(admin, &path).ok();
        match &self.netns {
            Some(netns) => netns::run_in(netns.clone(), get),
            None => get(),
        }
    }

    /// The admin API's JSON view at `path` (`/debug/status`, ...).
    pub fn view(&self, path: &str) -> serde_json::Value {
        let (status, body) = self
            .admin_get(path)
            .unwrap_or_else(|| panic!("the admin API does not answer {path}"));
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    }

    /// The `/debug/endpoints` entry of the endpoint at `addr`.
    pub fn endpoint(&self, addr: SocketAddr) -> serde_json::Value {
        let all = self.view("/debug/endpoints");
        all.as_array()
            .and_then(|all| all.iter().find(|e| e["address"] == addr.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("{addr} not in {all}"))
    }

    /// The workloads, as `/debug/workloads` (`sluice workloads`) shows them.
    pub fn workloads(&self) -> Vec<serde_json::Value> {
        self.view("/debug/workloads")
            .as_array()
            .cloned()
            .expect("a list of workloads")
    }

    /// `/readyz`: None while it answers 200, else the reasons it gives.
    pub fn not_ready(&self) -> Option<Vec<String>> {
        let Some((status, body)) = self.admin_get("/readyz") else {
            return Some(vec!["the admin API does not answer".to_owned()]);
        };
        if status == 200 {
            return None;
        }
        let reasons = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|b| b["reasons"].as_array().cloned())
            .map(|r| {
                r.iter()
                    .filter_map(|r| r.as_str().map(str::to_owned))
                    .collect()
            });
        Some(reasons.unwrap_or_else(|| vec![body]))
    }

    /// Waits (up to 10 s) until `/readyz` answers 200 (with Kubernetes:
    /// once discovery has listed everything); panics with the reasons it
    /// gives and the log if it does not.
    pub fn assert_ready(&self) {
        assert!(
            wait_until(Duration::from_secs(10), || self.not_ready().is_none()),
            "not ready: {:?}\n{}",
            self.not_ready(),
            self.log()
        );
    }

    /// Whether the agent says it is stopping (draining after SIGTERM).
    pub fn stopping(&self) -> bool {
        self.not_ready()
            .is_some_and(|why| why.iter().any(|r| r.starts_with("stopping")))
    }

    /// Config reloads the agent counted with `result` (`success`,
    /// `failure`).
    pub fn reloads(&self, result: &str) -> f64 {
        self.metrics()
            .sum("sluice_config_reloads_total", &[("result", result)])
    }

    /// The agent's metrics, from its admin API.
    pub fn metrics(&self) -> Exposition {
        let admin = self.admin;
        match &self.netns {
            Some(netns) => netns::run_in(netns.clone(), move || scrape(admin)),
            None => scrape(admin),
        }
    }
}

/// The metrics of the agent whose admin API (or metrics listener) is at
/// `addr`.
pub fn scrape(addr: SocketAddr) -> Exposition {
    let (status, body) = admin_client::get(addr, "/metrics").expect("the agent answers");
    assert_eq!(status, 200, "{body}");
    Exposition::parse(&body)
}

/// The admin API address the config file at `path` gives the agent
/// (`agent.admin`, 127.0.0.1:15020 when it names none).
fn admin_of(path: &Path) -> SocketAddr {
    let text = std::fs::read_to_string(path).expect("the agent's config");
    let config: serde_json::Value = serde_saphyr::from_str(&text).expect("a YAML config");
    config["agent"]["admin"]
        .as_str()
        .unwrap_or("127.0.0.1:15020")
        .parse()
        .expect("agent.admin is an address")
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Stdout of a finished command as lines; panics with stderr on failure.
pub fn lines(output: &Output) -> Vec<String> {
    assert!(
        output.status.success(),
        "command failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A server that accepts connections and then never reads or answers.
pub struct SilentBackend {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl SilentBackend {
    pub fn start() -> SilentBackend {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind silent backend");
        let addr = listener.local_addr().unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        thread::spawn(move || {
            let mut held = Vec::new();
            while !s.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(_) => thread::sleep(Duration::from_millis(2)),
                }
            }
        });
        SilentBackend { addr, stop }
    }
}

impl Drop for SilentBackend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Which backend answered each reply line (`<name> <rest>`).
pub fn answered_by(replies: &[String]) -> Vec<&str> {
    replies
        .iter()
        .map(|r| r.split_whitespace().next().unwrap_or(""))
        .collect()
}

/// Two nodes in their own network namespaces, joined by a veth pair:
/// `a` at 198.18.N.1 on interface `a_if`, `b` at 198.18.N.2 (198.18.0.0/15
/// is the range set aside for benchmarks, and only these namespaces use it).
pub struct NodePair {
    pub a: Netns,
    pub b: Netns,
    pub a_addr: std::net::IpAddr,
    pub b_addr: std::net::IpAddr,
    pub a_if: String,
}

impl NodePair {
    pub fn new() -> NodePair {
        static NEXT: AtomicUsize = AtomicUsize::new(1);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let subnet = (std::process::id() as usize * 7 + n) % 250 + 1;
        let pair = NodePair {
            a: Netns::create(&unique("node-a")).unwrap(),
            b: Netns::create(&unique("node-b")).unwrap(),
            a_addr: format!("198.18.{subnet}.1").parse().unwrap(),
            b_addr: format!("198.18.{subnet}.2").parse().unwrap(),
            a_if: "va".to_owned(),
        };
        netns::veth(&pair.a, "va", &pair.b, "vb").unwrap();
        let a_addr = format!("{}/24", pair.a_addr);
        let b_addr = format!("{}/24", pair.b_addr);
        pair.a.ip(&["addr", "add", &a_addr, "dev", "va"]).unwrap();
        pair.b.ip(&["addr", "add", &b_addr, "dev", "vb"]).unwrap();
        pair
    }
}

/// A raw capture of the frames crossing one interface of a namespace.
pub struct Capture {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<Vec<u8>>>,
}

impl Capture {
    /// Starts capturing every frame on `interface` inside `netns`.
    pub fn start(netns: &Netns, interface: &str) -> Capture {
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let ifname = CString::new(interface).unwrap();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let handle = netns.spawn(move || {
            // SAFETY: plain socket calls on buffers we own.
            unsafe {
                let proto = (libc::ETH_P_ALL as u16).to_be() as i32;
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, proto);
                assert!(
                    fd >= 0,
                    "AF_PACKET socket: {}",
                    std::io::Error::last_os_error()
                );
                let mut sll: libc::sockaddr_ll = std::mem::zeroed();
                sll.sll_family = libc::AF_PACKET as u16;
                sll.sll_protocol = proto as u16;
                sll.sll_ifindex = libc::if_nametoindex(ifname.as_ptr()) as i32;
                let rc = libc::bind(
                    fd,
                    (&sll as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(rc, 0, "bind capture: {}", std::io::Error::last_os_error());
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 50_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&tv as *const libc::timeval).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                ready_tx.send(()).unwrap();
                let mut seen = Vec::new();
                let mut buf = vec![0u8; 65_536];
                while !s.load(Ordering::Relaxed) {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 {
                        seen.extend_from_slice(&buf[..n as usize]);
                    }
                }
                libc::close(fd);
                seen
            }
        });
        ready_rx.recv().unwrap();
        Capture {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops and returns every byte of every frame seen.
    pub fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.take().unwrap().join().unwrap()
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

impl Backend {
    /// Starts a backend listening on `addr` inside `netns`.
    pub fn start_in(name: &str, addr: SocketAddr, netns: &Netns) -> Backend {
        let name = name.to_owned();
        netns.run(move || Backend::start_on(&name, addr))
    }
}

/// An echo server for one connection at a time: reads to EOF, sends it all
/// back, closes. Serves `conns` connections on a thread, listening on
/// `addr` in `netns`.
pub fn eof_echo(netns: &Netns, addr: SocketAddr, conns: usize) -> thread::JoinHandle<()> {
    let listener = netns.run(move || TcpListener::bind(addr).expect("bind echo"));
    thread::spawn(move || {
        use std::io::Read;
        for _ in 0..conns {
            let (mut s, _) = listener.accept().expect("accept");
            let mut all = Vec::new();
            s.read_to_end(&mut all).expect("read to EOF");
            s.write_all(&all).expect("echo");
        }
    })
}

/// What a plaintext caller in `netns` (outside every workload cgroup) gets
/// from `addr` for a line: the reply line, `closed`, or how it failed
/// (`refused: <error kind>`, `reset[: <error kind>]`).
pub fn plain_call(netns: &Netns, addr: SocketAddr) -> String {
    netns.run(move || {
        let mut stream = match TcpStream::connect_timeout(&addr, Duration::from_secs(3)) {
            Ok(s) => s,
            Err(e) => return format!("refused: {}", e.kind()),
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        if writeln!(stream, "plain").is_err() {
            return "reset".into();
        }
        let mut line = String::new();
        match BufReader::new(stream).read_line(&mut line) {
            Ok(0) => "closed".into(),
            Ok(_) => line.trim().to_owned(),
            Err(e) => format!("reset: {}", e.kind()),
        }
    })
}

/// Received bytes of the loopback device in `netns`.
pub fn loopback_bytes(netns: &Netns) -> u64 {
    let out = netns.ip(&["-s", "-j", "link", "show", "lo"]).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).expect("ip -j");
    v[0]["stats64"]["rx"]["bytes"].as_u64().expect("rx bytes")
}

/// The distinct items, sorted.
pub fn distinct<T: Ord>(items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut items: Vec<T> = items.into_iter().collect();
    items.sort();
    items.dedup();
    items
}

/// How often each item occurs.
pub fn counts<T: std::hash::Hash + Eq>(items: impl IntoIterator<Item = T>) -> HashMap<T, usize> {
    let mut counts = HashMap::new();
    for item in items {
        *counts.entry(item).or_default() += 1;
    }
    counts
}

/// The lines of the audit trail at `path` with `reason`, once there are
/// `n` of them (or what there is after 10 s).
pub fn audit_lines(path: &Path, reason: &str, n: usize) -> Vec<serde_json::Value> {
    let mut found = Vec::new();
    wait_until(Duration::from_secs(10), || {
        found = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|v| v["reason"] == reason)
            .collect();
        found.len() >= n
    });
    found
}

/// Writes what a node-level certificate issuer (SPIRE's agent, cert-manager)
/// would leave for the agent's `mesh.certificates.files` source: a CA's
/// certificate as `dir/bundle.pem`, and for each (namespace, service
/// account) `dir/<namespace>/<sa>/tls.crt` and `tls.key` for its SPIFFE ID
/// in `trust_domain`. Nodes given the same `ca` trust each other.
pub fn write_workload_certs(
    dir: &Path,
    ca: &(rcgen::Certificate, rcgen::KeyPair),
    trust_domain: &str,
    accounts: &[(&str, &str)],
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("bundle.pem"), ca.0.pem()).unwrap();
    let key = rcgen::KeyPair::from_pem(&ca.1.serialize_pem()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(&ca.0.pem(), key).unwrap();
    for (ns, sa) in accounts {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::default();
        let uri = format!("spiffe://{trust_domain}/ns/{ns}/sa/{sa}");
        params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &issuer).unwrap();
        let base = dir.join(ns).join(sa);
        std::fs::create_dir_all(&base).unwrap();
        std::fs::write(base.join("tls.crt"), cert.pem()).unwrap();
        std::fs::write(base.join("tls.key"), key.serialize_pem()).unwrap();
    }
}

/// A CA for [`write_workload_certs`].
pub fn test_ca() -> (rcgen::Certificate, rcgen::KeyPair) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sluice test CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
    ];
    let cert = params.self_signed(&key).unwrap();
    (cert, key)
}

/// The agents' log filter: `info`, unless `SLUICE_TEST_AGENT_LOG` says
/// otherwise.
fn agent_log_filter() -> String {
    std::env::var("SLUICE_TEST_AGENT_LOG").unwrap_or_else(|_| "info".into())
}
