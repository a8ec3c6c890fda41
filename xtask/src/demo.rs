//! `cargo xtask demo`: the story Sluice exists for, on the local default
//! (config/sluice.yaml), in well under a minute.
//!
//! 1. Three payment backends listen on loopback; a bash client inside the
//!    `checkout` workload calls the service's virtual address, and the
//!    calls go round robin.
//! 2. payments-2 dies: its listening socket closes, so every connect to it
//!    is refused, as after a crash. The client keeps calling. The agent
//!    retries each refused connect on another backend, outlier detection
//!    ejects payments-2 after five refusals in a row, and the health checks
//!    mark it unhealthy. Not one call fails.
//! 3. `sluice status` and `sluice endpoints`, as the CLI prints them.
//! 4. The lines of the agent's /metrics that tell the same story.
//! 5. SIGTERM: the agent exits 0 and leaves no program attached, no pinned
//!    map and no cgroup.
//!
//! Every claim is checked; a false one ends the demo with a message and a
//! non-zero exit. Waits are on conditions, each with a deadline. The demo
//! drives the client one call at a time, so the backend dies between two
//! calls: a call already carried to a backend when it dies fails with it,
//! and no proxy at the connection level could save that one.
//!
//! The names and addresses below mirror config/sluice.yaml.

use std::{
    collections::BTreeMap,
    io::{BufRead, BufReader, Read as _, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::fd::{AsRawFd as _, RawFd},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, ExitStatus, Stdio},
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;

use crate::workspace_root;

const CONFIG: &str = "config/sluice.yaml";
const BACKENDS: [(&str, u16); 3] = [
    ("payments-1", 9101),
    ("payments-2", 9102),
    ("payments-3", 9103),
];
/// Which backend dies: payments-2.
const KILLED: usize = 1;
const SERVICE: &str = "payments/payments";
const VIP: (&str, u16) = ("127.77.0.10", 8080);
const WORKLOAD: &str = "checkout";
/// `agent.metrics`: Prometheus's listener, which serves /metrics alone.
const METRICS: &str = "127.0.0.1:15090";
const PIN_DIR: &str = "/sys/fs/bpf/sluice";
const CGROUP_ROOT: &str = "sluice";
/// `outlier_detection.consecutive_failures`: refusals that eject.
const CONSECUTIVE_FAILURES: u64 = 5;
/// Calls of the first step, three rounds over three backends.
const ROUND_ROBIN_CALLS: usize = 9;
/// Calls shown one by one once payments-2 is out.
const CALLS_AFTER: usize = 6;
/// Between two calls while the agent finds out: pace, not correctness.
/// Fast enough that the real calls reach five refusals (well under a
/// second) before the health checks' three failures (two seconds at least).
const PACE: Duration = Duration::from_millis(20);
/// How often a condition is looked at while waiting for it.
const POLL: Duration = Duration::from_millis(50);

pub fn run() -> anyhow::Result<()> {
    if !crate::setup::is_root() {
        bail!("the demo attaches eBPF programs and creates cgroups: run it as root");
    }
    let started = Instant::now();
    let cli = Cli {
        sluice: crate::target_dir().join("release/sluice"),
        config: workspace_root().join(CONFIG),
    };

    let ports: Vec<u16> = BACKENDS.iter().map(|(_, port)| *port).collect();
    println!("\n== demo: three payment backends on 127.0.0.1:{ports:?}");
    let backends = BACKENDS
        .iter()
        .map(|(name, port)| Backend::start(name, *port))
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("== demo: starting `sluice agent --config {CONFIG}`");
    let mut agent = Agent::start(&cli)?;
    agent.wait_ready(&cli)?;
    // Declared after the agent, so dropped before it on an early return:
    // a process left in the workload's cgroup would keep the cgroup alive.
    let mut client = Client::start(&cli)?;

    round_robin(&mut client, &agent)?;
    lose_a_backend(&backends[KILLED], &mut client, &agent, &cli)?;
    what_the_agent_says(&backends[KILLED], &cli)?;
    println!("\n== 4. the agent's /metrics (http://{METRICS}/metrics), the lines that tell it");
    Metrics::settled(client.calls)?.show_and_check(client.calls)?;

    println!("\n== 5. SIGTERM to the agent (drain, detach, clean up)");
    client.stop()?;
    let status = agent.stop()?;
    if !status.success() {
        bail!("the agent exited with {status}");
    }
    check_nothing_left()?;
    println!(
        "== demo: done in {:.1} s; the agent exited 0 and left no program attached, no pinned \
         map, no cgroup",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Step 1: calls in turn. The first round names each backend once, and
/// every later call repeats the call three before it.
fn round_robin(client: &mut Client, agent: &Agent) -> anyhow::Result<()> {
    println!(
        "\n== 1. round robin: a bash client in workload `{WORKLOAD}` (`sluice exec`) calls {}:{}",
        VIP.0, VIP.1
    );
    let mut order = Vec::new();
    for _ in 0..ROUND_ROBIN_CALLS {
        match client.call()? {
            Reply::Answered { backend, text } => {
                println!("   client  | call {} -> {text}", client.calls);
                order.push(backend);
            }
            Reply::Failed(why) => {
                bail!("call {} failed with every backend up: {why}", client.calls)
            }
        }
    }
    agent.print_log();
    let n = BACKENDS.len();
    let first_round_distinct = BACKENDS
        .iter()
        .all(|(name, _)| order[..n].iter().any(|b| b == name));
    let in_turn = order.iter().enumerate().all(|(i, b)| *b == order[i % n]);
    if !first_round_distinct || !in_turn {
        bail!("the calls did not go round robin over the three backends: {order:?}");
    }
    println!(
        "   demo    | each backend answered {} of {ROUND_ROBIN_CALLS} calls, in turn",
        ROUND_ROBIN_CALLS / n
    );
    Ok(())
}

/// Step 2: the backend dies between two calls and the calls go on, until
/// outlier detection has ejected it and the health checks have marked it
/// unhealthy (in that order: the real calls find it first); then a few
/// more. Any failed call ends the demo.
fn lose_a_backend(
    killed: &Backend,
    client: &mut Client,
    agent: &Agent,
    cli: &Cli,
) -> anyhow::Result<()> {
    println!(
        "\n== 2. {} ({}) is killed: its port now refuses connections. The calls go on",
        killed.name, killed.addr
    );
    killed.kill()?;
    let mut since = Tally::default();
    let (mut ejected, mut unhealthy) = (false, false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ejected || !unhealthy {
        if Instant::now() > deadline {
            bail!(
                "{} was still {} 20 s after it was killed ({} calls since, none failed)",
                killed.name,
                if ejected {
                    "healthy according to the health checks"
                } else {
                    "not ejected by outlier detection"
                },
                since.calls
            );
        }
        let reply = client.call()?;
        since.record(client.calls, reply, killed.name)?;
        agent.print_log();
        let state = cli.endpoint(killed.addr)?;
        if !ejected && state["breaker"] == "open" {
            ejected = true;
            agent.print_log_until("ejected");
            println!(
                "   demo    | {} ejected by outlier detection at call {}, {} calls after the \
                 kill; every one answered",
                killed.name, client.calls, since.calls
            );
        }
        if !unhealthy && state["healthy"] == false {
            unhealthy = true;
            if !ejected {
                bail!(
                    "the health checks marked {} unhealthy before outlier detection ejected it: \
                     the real calls should have found it first",
                    killed.name
                );
            }
            agent.print_log_until("unhealthy");
            println!(
                "   demo    | {} marked unhealthy by the health checks at call {}, {} calls \
                 after the kill; every one answered",
                killed.name, client.calls, since.calls
            );
        }
        thread::sleep(PACE);
    }
    if since.calls < CONSECUTIVE_FAILURES {
        bail!(
            "{} was ejected before it could have failed {CONSECUTIVE_FAILURES} times",
            killed.name
        );
    }
    for _ in 0..CALLS_AFTER {
        let reply = client.call()?;
        if let Reply::Answered { text, .. } = &reply {
            println!("   client  | call {} -> {text}", client.calls);
        }
        since.record(client.calls, reply, killed.name)?;
    }
    agent.print_log();
    for (name, _) in BACKENDS {
        if name != killed.name && since.answered(name) == 0 {
            bail!(
                "{name} answered none of the {} calls since the kill",
                since.calls
            );
        }
    }
    println!(
        "   demo    | since the kill: {} calls, {}, {} 0; failed: 0",
        since.calls,
        since.summary(),
        killed.name
    );
    Ok(())
}

/// Step 3: the CLI's own tables, and the same view as JSON to check that
/// it lists the dead backend as out.
fn what_the_agent_says(killed: &Backend, cli: &Cli) -> anyhow::Result<()> {
    println!("\n== 3. what the agent says: `sluice status` and `sluice endpoints`");
    cli.show(&["status"])?;
    cli.show(&["endpoints"])?;
    let state = cli.endpoint(killed.addr)?;
    if state["healthy"] != false || state["breaker"] != "open" || state["eligible"] != false {
        bail!(
            "`sluice endpoints` should list {} as unhealthy, ejected and not eligible: {state}",
            killed.name
        );
    }
    Ok(())
}

/// A payment backend: answers each line with its name and address.
struct Backend {
    name: &'static str,
    addr: SocketAddr,
    /// The listening socket, owned by the accept thread.
    fd: RawFd,
}

impl Backend {
    fn start(name: &'static str, port: u16) -> anyhow::Result<Backend> {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("port {port} is taken; stop what uses it and retry"))?;
        let addr = listener.local_addr()?;
        let fd = listener.as_raw_fd();
        thread::spawn(move || {
            for stream in listener.incoming().map_while(Result::ok) {
                thread::spawn(move || answer(stream, name, addr));
            }
            // The listener closes here, after `kill`.
        });
        Ok(Backend { name, addr, fd })
    }

    /// Stops listening, as a crashed process does: the kernel refuses
    /// every connect from now on. Then checks that it does.
    fn kill(&self) -> anyhow::Result<()> {
        // SAFETY: shutdown(2) on the listening socket, which the accept
        // thread keeps open until its accept fails, which this call causes;
        // called once, so the descriptor cannot have been reused.
        if unsafe { libc::shutdown(self.fd, libc::SHUT_RDWR) } != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot stop {}'s listener", self.name));
        }
        wait_for(
            &format!("{} to refuse connections", self.name),
            Duration::from_secs(2),
            || Ok(TcpStream::connect(self.addr).is_err()),
        )
    }
}

fn answer(stream: TcpStream, name: &str, addr: SocketAddr) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        if writeln!(writer, "{name} ({addr}) approved {line}").is_err() {
            return;
        }
    }
}

/// Runs `check` every [`POLL`] until it holds; fails after `within`.
fn wait_for(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !check()? {
        if Instant::now() > deadline {
            bail!("waited {within:?} for {what}");
        }
        thread::sleep(POLL);
    }
    Ok(())
}

/// The `sluice` command line, pointed at the demo's config.
struct Cli {
    sluice: PathBuf,
    config: PathBuf,
}

impl Cli {
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.sluice);
        cmd.args(args).arg("--config").arg(&self.config);
        cmd
    }

    /// Runs `sluice ARGS` and prints what it prints, as a person sees it.
    fn show(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = self.output(args)?;
        println!("   $ sluice {} --config {CONFIG}", args.join(" "));
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            println!("   {line}");
        }
        Ok(())
    }

    /// Runs `sluice ARGS`; fails, with its stderr, unless it exits 0.
    fn output(&self, args: &[&str]) -> anyhow::Result<std::process::Output> {
        let out = self
            .command(args)
            .output()
            .with_context(|| format!("cannot start {}", self.sluice.display()))?;
        if !out.status.success() {
            bail!(
                "`sluice {}` failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out)
    }

    /// One endpoint of the service as `sluice endpoints -o json` gives it.
    fn endpoint(&self, addr: SocketAddr) -> anyhow::Result<Value> {
        let out = self.output(&["endpoints", SERVICE, "-o", "json"])?;
        let list: Value = serde_json::from_slice(&out.stdout)
            .context("`sluice endpoints -o json` printed no JSON")?;
        list.as_array()
            .into_iter()
            .flatten()
            .find(|e| e["address"] == addr.to_string())
            .cloned()
            .with_context(|| format!("`sluice endpoints` does not list {addr}: {list}"))
    }
}

/// The agent under test, its log passed on by a thread. Stopped with
/// SIGTERM if the demo fails halfway.
struct Agent {
    child: Child,
    log: mpsc::Receiver<String>,
    pump: Option<thread::JoinHandle<()>>,
}

impl Agent {
    fn start(cli: &Cli) -> anyhow::Result<Agent> {
        let mut child = cli
            .command(&["agent"])
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {}", cli.sluice.display()))?;
        let stderr = child.stderr.take().expect("stderr is piped");
        let (tx, log) = mpsc::channel();
        let pump = thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        Ok(Agent {
            child,
            log,
            pump: Some(pump),
        })
    }

    /// Prints what the agent logged since the last call, so that its lines
    /// land between the demo's where they happened.
    fn print_log(&self) {
        for line in self.log.try_iter() {
            println!("   agent   | {line}");
        }
    }

    /// Prints the log until a line containing `text` (the agent's own
    /// word for a change the demo has just seen in its state), or for at
    /// most a second: only so that the story reads in order, never a check.
    fn print_log_until(&self, text: &str) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            let Ok(line) = self.log.recv_timeout(left) else {
                return;
            };
            println!("   agent   | {line}");
            if line.contains(text) {
                return;
            }
        }
    }

    /// Waits until `sluice status` says ready (exit 0).
    fn wait_ready(&mut self, cli: &Cli) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            self.print_log();
            if let Some(status) = self.child.try_wait()? {
                bail!("the agent exited before it was ready ({status}); see its log above");
            }
            let status = cli
                .command(&["status"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()?;
            if status.success() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the agent was not ready within 20 s (`sluice status`: {status})");
            }
            thread::sleep(POLL);
        }
    }

    /// SIGTERM, then waits for the exit, printing the log to its end.
    fn stop(&mut self) -> anyhow::Result<ExitStatus> {
        let status = self.terminate()?;
        if let Some(pump) = self.pump.take() {
            let _ = pump.join();
        }
        self.print_log();
        Ok(status)
    }

    fn terminate(&mut self) -> anyhow::Result<ExitStatus> {
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("the agent did not stop within 15 s of SIGTERM");
            }
            self.print_log();
            thread::sleep(POLL);
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        // A clean stop leaves nothing for the next run; kill as a last resort.
        if self.terminate().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        self.print_log();
    }
}

/// What one call came back with.
enum Reply {
    /// The backend's answer, and its name.
    Answered { backend: String, text: String },
    /// No answer: the connection was refused or reset, or stayed silent.
    Failed(String),
}

/// A bash client inside the workload, one call per line on its stdin:
/// connect to the virtual address, send a charge, read the answer, close.
struct Client {
    child: Child,
    requests: Option<ChildStdin>,
    replies: BufReader<ChildStdout>,
    /// Calls made so far; the last one's number.
    calls: u64,
}

impl Client {
    fn start(cli: &Cli) -> anyhow::Result<Client> {
        let script = format!(
            "while read -r n; do \
               if exec 3<>/dev/tcp/{ip}/{port}; then \
                 echo \"charge #$n\" >&3; \
                 if read -r -t 5 reply <&3; then echo \"ok $reply\"; \
                 else echo \"failed: no answer (reset, closed or silent for 5 s)\"; fi; \
                 exec 3>&-; \
               else echo \"failed: connect refused\"; fi; \
             done",
            ip = VIP.0,
            port = VIP.1
        );
        let mut child = Command::new(&cli.sluice)
            .args(["exec", "--config"])
            .arg(&cli.config)
            .args(["--workload", WORKLOAD, "--", "bash", "-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .context("cannot start the client with `sluice exec`")?;
        let requests = child.stdin.take();
        let replies = BufReader::new(child.stdout.take().expect("stdout is piped"));
        Ok(Client {
            child,
            requests,
            replies,
            calls: 0,
        })
    }

    /// Makes the next call and waits for its outcome.
    fn call(&mut self) -> anyhow::Result<Reply> {
        self.calls += 1;
        let n = self.calls;
        let stdin = self.requests.as_mut().context("the client is stopped")?;
        writeln!(stdin, "{n}")
            .and_then(|()| stdin.flush())
            .context("the client exited")?;
        let mut line = String::new();
        if self.replies.read_line(&mut line)? == 0 {
            bail!("the client exited before answering call {n}");
        }
        let line = line.trim_end();
        Ok(match line.strip_prefix("ok ") {
            Some(text) => Reply::Answered {
                backend: text.split_whitespace().next().unwrap_or("").to_owned(),
                text: text.to_owned(),
            },
            None => Reply::Failed(line.to_owned()),
        })
    }

    /// Ends the client's loop (end of its input) and waits for its exit.
    fn stop(&mut self) -> anyhow::Result<()> {
        drop(self.requests.take());
        wait_for("the client to exit", Duration::from_secs(5), || {
            Ok(self.child.try_wait()?.is_some())
        })
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        if self.stop().is_err() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Calls since the kill, by the backend that answered.
#[derive(Default)]
struct Tally {
    calls: u64,
    by_backend: BTreeMap<String, u64>,
}

impl Tally {
    /// Counts an answer; a failed call, or an answer from the backend that
    /// is dead, ends the demo.
    fn record(&mut self, n: u64, reply: Reply, killed: &str) -> anyhow::Result<()> {
        self.calls += 1;
        match reply {
            Reply::Failed(why) => bail!(
                "call {n} failed after {killed} was killed ({why}): the agent should have \
                 retried its connect on another backend"
            ),
            Reply::Answered { backend, .. } if backend == killed => {
                bail!("call {n} was answered by {killed}, which is dead")
            }
            Reply::Answered { backend, .. } => *self.by_backend.entry(backend).or_default() += 1,
        }
        Ok(())
    }

    fn answered(&self, backend: &str) -> u64 {
        self.by_backend.get(backend).copied().unwrap_or(0)
    }

    fn summary(&self) -> String {
        let parts: Vec<String> = self
            .by_backend
            .iter()
            .map(|(backend, n)| format!("{backend} {n}"))
            .collect();
        parts.join(", ")
    }
}

/// One scrape of the agent's /metrics (Prometheus text format).
struct Metrics {
    text: String,
}

const OPENED: &str = "sluice_tcp_connections_opened_total";
const CLOSED: &str = "sluice_tcp_connections_closed_total";
const RETRIES: &str = "sluice_connect_retries_total";
const EJECTIONS: &str = "sluice_endpoint_ejections_total";
const ENDPOINTS: &str = "sluice_endpoints";
/// Ways a proxied connection ends that mean a failed call.
const FAILED: [&str; 5] = [
    "connect_failed",
    "no_endpoint",
    "overflow",
    "upstream_reset",
    "denied",
];

impl Metrics {
    /// Scrapes until every call the client made is counted as closed: the
    /// agent counts a connection when both sides are done, a moment after
    /// the client has its answer.
    fn settled(calls: u64) -> anyhow::Result<Metrics> {
        let mut last = None;
        wait_for(
            &format!("the metrics to count {calls} closed connections"),
            Duration::from_secs(5),
            || {
                let m = Metrics {
                    text: http_get(METRICS, "/metrics")?,
                };
                let closed = m.sum(CLOSED, &[]);
                last = Some(m);
                Ok(closed >= calls)
            },
        )?;
        Ok(last.expect("scraped at least once"))
    }

    /// The service's samples of `name` whose labels include every one of
    /// `labels` (`key="value"`).
    fn samples<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [&'a str],
    ) -> impl Iterator<Item = (&'a str, u64)> + 'a {
        self.text.lines().filter_map(move |line| {
            let (series, value) = line.rsplit_once(' ')?;
            let rest = series.strip_prefix(name)?.strip_prefix('{')?;
            let wanted = rest.contains("destination_service=\"payments\"")
                && labels.iter().all(|l| rest.contains(l));
            Some((line, value.parse::<f64>().ok()? as u64)).filter(|_| wanted)
        })
    }

    fn sum(&self, name: &str, labels: &[&str]) -> u64 {
        self.samples(name, labels).map(|(_, v)| v).sum()
    }

    /// Prints the story's lines and checks what they say: every call
    /// opened and closed normally, none failed, retries made, the killed
    /// backend ejected and out of the healthy set.
    fn show_and_check(&self, calls: u64) -> anyhow::Result<()> {
        let reason = |r: &str| format!("reason=\"{r}\"");
        let shown = [
            (OPENED, None),
            (CLOSED, Some(reason("closed"))),
            (CLOSED, Some(reason("connect_failed"))),
            (RETRIES, None),
            (EJECTIONS, None),
            (ENDPOINTS, None),
        ];
        for (name, label) in &shown {
            let labels: Vec<&str> = label.iter().map(String::as_str).collect();
            for (line, _) in self.samples(name, &labels) {
                println!("   metrics | {line}");
            }
        }
        let closed = |r: &str| self.sum(CLOSED, &[&reason(r)]);
        let failed: u64 = FAILED.iter().map(|r| closed(r)).sum();
        let healthy = BACKENDS.len() as u64 - 1;
        for (what, got, want) in [
            ("connections opened", self.sum(OPENED, &[]), calls),
            ("connections closed normally", closed("closed"), calls),
            ("connections failed", failed, 0),
            ("endpoints ejected", self.sum(EJECTIONS, &[]), 1),
            (
                "healthy endpoints",
                self.sum(ENDPOINTS, &["state=\"healthy\""]),
                healthy,
            ),
        ] {
            if got != want {
                bail!("the metrics say {got} {what}; the demo expected {want}");
            }
        }
        let retries = self.sum(RETRIES, &[]);
        if retries < CONSECUTIVE_FAILURES {
            bail!(
                "the metrics count {retries} connect retries; each of the {CONSECUTIVE_FAILURES} \
                 refusals before the ejection should have been retried"
            );
        }
        println!(
            "   demo    | {calls} calls, {calls} closed normally, 0 failed; {retries} connects \
             retried; 1 endpoint ejected, {healthy} healthy"
        );
        Ok(())
    }
}

/// GETs `path` from `addr` over HTTP/1.1; the body of a 200 answer.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let mut stream =
        TcpStream::connect(addr).with_context(|| format!("nothing answers on {addr}"))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: sluice\r\nconnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("reading {addr}{path}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .with_context(|| format!("{addr}{path}: not an HTTP answer"))?;
    let status = head.lines().next().unwrap_or("");
    if status.split_whitespace().nth(1) != Some("200") {
        bail!("{addr}{path} answered `{status}`");
    }
    Ok(body.to_owned())
}

/// Fails naming what the agent left behind: pins, or its cgroup root.
fn check_nothing_left() -> anyhow::Result<()> {
    let mut left = Vec::new();
    if Path::new(PIN_DIR).exists() {
        left.push(format!("pins in {PIN_DIR}"));
    }
    if let Some(cgroup) = sluice_testkit::cgroup::mount()
        .ok()
        .map(|m| m.join(CGROUP_ROOT))
        && cgroup.exists()
    {
        left.push(format!("cgroup {}", cgroup.display()));
    }
    if !left.is_empty() {
        bail!("the agent left {} behind", left.join(" and "));
    }
    Ok(())
}
