//! `cargo xtask bench --upgrade`: an agent upgrade under open connections.
//! `conns` persistent connections through the agent each keep one 1 KiB
//! exchange going every 100 ms; a second agent is started over the first,
//! which hands every connection over and exits. Measured: how long the
//! handover takes (from the old agent's "handing over" to its "handed
//! over", and to its exit, as its log lines arrive here), and the longest
//! exchange any connection saw (the largest pause), against the same run's
//! median. No connection may fail.

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::Value;
use sluice_testkit::config::{CircuitBreakers, Endpoint, Service};

use sluice_testkit::netns::Netns;

use super::{Proc, mesh, node, start_agent, start_backend, wait_ready};

/// One agent, its log lines as they arrive (with when).
struct Logged {
    proc: Proc,
    lines: mpsc::Receiver<(Instant, String)>,
}

fn start_logged(sluice: &Path, config: &Path, name: &str) -> anyhow::Result<Logged> {
    let mut child = Command::new("taskset")
        .args(["-c", "0"])
        .arg(sluice)
        .args(["agent", "--config"])
        .arg(config)
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("start {name}"))?;
    let stderr = child.stderr.take().expect("piped");
    let (tx, lines) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send((Instant::now(), line));
        }
    });
    Ok(Logged {
        proc: Proc {
            child,
            name: name.to_owned(),
        },
        lines,
    })
}

impl Logged {
    /// When a line containing `text` arrived, waiting at most `within`.
    fn wait_for(&self, text: &str, within: Duration) -> anyhow::Result<(Instant, String)> {
        let until = Instant::now() + within;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok((at, line)) if line.contains(text) => return Ok((at, line)),
                Ok(_) => {}
                Err(_) => bail!(
                    "{}: no line with {text:?} within {within:?}",
                    self.proc.name
                ),
            }
        }
    }

    /// When the process exited, waiting at most `within`.
    fn exited(&mut self, within: Duration) -> anyhow::Result<Instant> {
        let until = Instant::now() + within;
        while Instant::now() < until {
            if self.proc.child.try_wait()?.is_some() {
                return Ok(Instant::now());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        bail!("{} did not exit within {within:?}", self.proc.name)
    }
}

type Lines = std::io::Lines<BufReader<std::process::ChildStdout>>;

/// The pauses load through the agent: `conns` connections, one exchange
/// each every 100 ms for `seconds`, started once all are connected; from
/// `netns` when the agent's node is one.
fn start_load(
    sluice: &Path,
    (config, netns): (&Path, Option<&Netns>),
    vip: &str,
    conns: usize,
    seconds: u32,
) -> anyhow::Result<(std::process::Child, Lines)> {
    let me = std::env::current_exe()?;
    let mut load = Command::new("taskset");
    if let Some(ns) = netns {
        ns.enter_on_exec(&mut load)?;
    }
    let mut load = load
        .args(["-c", "1"])
        .arg(sluice)
        .args(["exec", "--workload", "bench", "--config"])
        .arg(config)
        .arg("--")
        .arg(me)
        .args([
            "loadgen",
            "--workload",
            "pauses",
            "--target",
            vip,
            "--conns",
            &conns.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--interval-ms",
            "100",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .context("start the load")?;
    let mut out = BufReader::new(load.stdout.take().expect("piped")).lines();
    let first = out.next().transpose()?.unwrap_or_default();
    if !first.contains("connected") {
        let _ = load.kill();
        bail!("the load did not connect: {first}");
    }
    Ok((load, out))
}

/// The load's result, once it ends.
fn result_of(load: &mut std::process::Child, out: &mut Lines) -> anyhow::Result<Value> {
    let last = out
        .last()
        .transpose()?
        .context("the load printed no result")?;
    let status = load.wait()?;
    if !status.success() {
        bail!("the load failed: {status}");
    }
    Ok(serde_json::from_str(&last)?)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

/// Runs the measurement and prints it.
pub fn run(sluice: &Path, quick: bool) -> anyhow::Result<()> {
    let conns = if quick { 100 } else { 1000 };
    let dir = crate::target_dir().join("bench-upgrade");
    std::fs::create_dir_all(&dir)?;
    let backend = start_backend(std::net::TcpListener::bind("127.0.0.1:0")?)?;
    let vip = "127.77.9.30:8080";
    let config_path = dir.join("sluice.yaml");
    let mut config = node(
        "bench",
        "sluice-bench-upgrade",
        "upgrade",
        &dir.join("state"),
    )?;
    config.services = vec![
        Service::new("echo", "bench", vip.parse()?, &[])
            .circuit_breakers(CircuitBreakers {
                max_connections: Some(100_000),
                max_pending_connects: Some(100_000),
                ..CircuitBreakers::default()
            })
            .endpoints(vec![Endpoint::new(backend)]),
    ];
    config.agent.drain_timeout = Some(Duration::from_secs(30));
    config.write(&config_path)?;
    let mut old = start_logged(sluice, &config_path, "old agent")?;
    wait_ready(sluice, &config_path, None)?;

    // The same load without an upgrade first: what pauses this machine
    // gives anyway.
    let (mut baseline, mut out) = start_load(sluice, (&config_path, None), vip, conns, 3)?;
    let baseline_result = result_of(&mut baseline, &mut out)?;
    let (mut load, mut out) = start_load(sluice, (&config_path, None), vip, conns, 6)?;
    // A second of steady exchanges before the upgrade.
    std::thread::sleep(Duration::from_secs(1));
    let new = start_logged(sluice, &config_path, "new agent")?;
    let (started, _) =
        old.wait_for("handing the open connections over", Duration::from_secs(20))?;
    let (sent, line) = old.wait_for("open connections handed over", Duration::from_secs(30))?;
    let exited = old.exited(Duration::from_secs(30))?;
    let (_, taken) = new.wait_for("open connections taken over", Duration::from_secs(30))?;
    let result = result_of(&mut load, &mut out)?;
    let errors = result["errors"].as_u64().unwrap_or(u64::MAX);
    println!("== upgrade under {conns} open connections");
    println!("   old agent: {}", line.trim());
    println!("   new agent: {}", taken.trim());
    println!(
        "   handover (handing over -> all sent): {}",
        ms(sent - started)
    );
    println!(
        "   handover to the old agent's exit: {}",
        ms(exited - started)
    );
    for (what, r) in [
        ("without an upgrade", &baseline_result),
        ("across the upgrade", &result),
    ] {
        println!(
            "   {what}: exchanges {}, errors {}; p50 {} us, p99 {} us, largest pause {} us",
            r["exchanges"], r["errors"], r["p50_us"], r["p99_us"], r["max_us"]
        );
    }
    for (agent, logged) in [("old", &old), ("new", &new)] {
        for (_, line) in logged.lines.try_iter() {
            if line.contains("WARN") || line.contains("ERROR") {
                println!("   {agent} agent said: {line}");
            }
        }
    }
    drop(new.proc);
    if errors != 0 {
        bail!("{errors} connections failed across the upgrade");
    }
    tunnelled(quick, sluice)
}

/// The same load between two nodes in tunnels (`mesh.tunnels`): node A's
/// agent is upgraded, then node B's, each while the exchanges go on. Every
/// connection's stream is paused with the peer agent and taken up by the
/// successor. Measured: how long each old agent takes to exit after its
/// successor starts, and the largest pause; no connection may fail.
fn tunnelled(quick: bool, sluice: &Path) -> anyhow::Result<()> {
    let conns = if quick { 100 } else { 1000 };
    let dir = crate::target_dir().join("bench-upgrade-tunnel");
    std::fs::create_dir_all(&dir)?;
    let vip = "127.77.9.31:8080";
    let mut procs = Vec::new();
    let pair = mesh::start(
        &dir,
        sluice,
        &dir.join("state"),
        ("upt", 41, vip),
        Some(100),
        &mut procs,
    )?;
    let configs = [&pair.config, &pair.config_b];
    let load_from = (pair.config.as_path(), Some(&pair.netns[0]));
    let (mut baseline, mut out) = start_load(sluice, load_from, vip, conns, 3)?;
    let baseline_result = result_of(&mut baseline, &mut out)?;
    let (mut load, mut out) = start_load(sluice, load_from, vip, conns, 8)?;
    let mut exits = Vec::new();
    for (i, node) in ["A (calling)", "B (called)"].into_iter().enumerate() {
        std::thread::sleep(Duration::from_secs(1));
        let started = Instant::now();
        let name = format!("node {node}'s new agent");
        let next = start_agent(sluice, configs[i], Some(&pair.netns[i]), &name)?;
        let old = &mut procs[i];
        let until = started + Duration::from_secs(30);
        while old.child.try_wait()?.is_none() {
            if Instant::now() > until {
                bail!("node {node}'s old agent did not exit within 30 s");
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        exits.push((node, started.elapsed()));
        procs[i] = next;
    }
    let result = result_of(&mut load, &mut out)?;
    let errors = result["errors"].as_u64().unwrap_or(u64::MAX);
    println!("== upgrades of both agents under {conns} open connections in tunnels");
    for (node, took) in exits {
        println!(
            "   node {node}: new agent started -> old agent exited: {}",
            ms(took)
        );
    }
    for (what, r) in [
        ("without an upgrade", &baseline_result),
        ("across both upgrades", &result),
    ] {
        println!(
            "   {what}: exchanges {}, errors {}; p50 {} us, p99 {} us, largest pause {} us",
            r["exchanges"], r["errors"], r["p50_us"], r["p99_us"], r["max_us"]
        );
    }
    drop(procs);
    if errors != 0 {
        bail!("{errors} tunnelled connections failed across the upgrades");
    }
    Ok(())
}
