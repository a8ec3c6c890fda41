//! `cargo xtask demo`: Sluice's main job on the local default.
//!
//! Three payment backends on loopback, the agent on config/sluice.yaml, and
//! a plain bash client in the `checkout` workload that dials the service's
//! virtual address. Each reply says which backend answered. Then SIGTERM,
//! and a check that nothing is left attached, pinned or created.
//!
//! The addresses below mirror config/sluice.yaml.

use std::{
    io::{BufRead, BufReader, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

use crate::workspace_root;

const CONFIG: &str = "config/sluice.yaml";
const BACKENDS: [u16; 3] = [9101, 9102, 9103];
const VIP: (&str, u16) = ("127.77.0.10", 8080);
const WORKLOAD: &str = "checkout";
const PIN_DIR: &str = "/sys/fs/bpf/sluice";
const CGROUP_ROOT: &str = "sluice";
const CALLS: usize = 9;

/// Kills the agent if the demo fails halfway.
struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

pub fn run() -> anyhow::Result<()> {
    if !crate::setup::is_root() {
        bail!("the demo attaches eBPF programs and creates cgroups: run it as root");
    }
    let root = workspace_root();
    let sluice = root.join("target/release/sluice");
    let config = root.join(CONFIG);

    println!("\n== demo: three payment backends on 127.0.0.1:{BACKENDS:?}");
    for (i, port) in BACKENDS.into_iter().enumerate() {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .with_context(|| format!("port {port} is taken; stop what uses it and retry"))?;
        let name = format!("payments-{}", i + 1);
        thread::spawn(move || serve_backend(listener, name));
    }

    println!("== demo: starting `sluice agent --config {CONFIG}`");
    let mut child = Command::new(&sluice)
        .args(["agent", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {}", sluice.display()))?;
    let stderr = child.stderr.take().expect("stderr is piped");
    let mut agent = AgentProcess(child);
    let ready = Arc::new(AtomicBool::new(false));
    let ready_flag = ready.clone();
    let log_pump = thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            println!("   agent | {line}");
            if line.contains("sluice agent ready") {
                ready_flag.store(true, Ordering::SeqCst);
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ready.load(Ordering::SeqCst) {
        if let Some(status) = agent.0.try_wait()? {
            bail!("the agent exited before it was ready ({status}); see its log above");
        }
        if Instant::now() > deadline {
            bail!("the agent was not ready within 20 s; see its log above");
        }
        thread::sleep(Duration::from_millis(20));
    }

    println!(
        "== demo: `sluice exec --workload {WORKLOAD}` runs a bash client that calls {}:{} {CALLS} times",
        VIP.0, VIP.1
    );
    let script = format!(
        "for i in $(seq 1 {CALLS}); do \
           exec 3<>/dev/tcp/{ip}/{port} || exit 1; \
           echo \"charge #$i\" >&3; read -r reply <&3; exec 3>&-; \
           echo \"   client | call $i to {ip}:{port} -> $reply\"; \
         done",
        ip = VIP.0,
        port = VIP.1
    );
    let client = Command::new(&sluice)
        .args(["exec", "--config"])
        .arg(&config)
        .args(["--workload", WORKLOAD, "--", "bash", "-c", &script])
        .status()?;
    if !client.success() {
        bail!("the client failed ({client})");
    }
    std::io::stdout().flush()?;

    println!("== demo: SIGTERM to the agent (drain, detach, clean up)");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.0.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = agent.0.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            bail!("the agent did not stop within 15 s of SIGTERM");
        }
        thread::sleep(Duration::from_millis(20));
    };
    let _ = log_pump.join();
    if !status.success() {
        bail!("the agent exited with {status}");
    }

    let cgroup = cgroup2_mount().map(|m| m.join(CGROUP_ROOT));
    let mut left = Vec::new();
    if PathBuf::from(PIN_DIR).exists() {
        left.push(format!("pins in {PIN_DIR}"));
    }
    if let Some(cg) = cgroup.filter(|c| c.exists()) {
        left.push(format!("cgroup {}", cg.display()));
    }
    if !left.is_empty() {
        bail!("the agent left {} behind", left.join(" and "));
    }
    println!(
        "== demo: done; the agent exited 0 and left no program attached, no pinned map, no cgroup"
    );
    Ok(())
}

/// Answers each line with the backend's name and address.
fn serve_backend(listener: TcpListener, name: String) {
    let addr = listener
        .local_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    for stream in listener.incoming().map_while(Result::ok) {
        let (name, addr) = (name.clone(), addr.clone());
        thread::spawn(move || answer(stream, &name, &addr));
    }
}

fn answer(stream: TcpStream, name: &str, addr: &str) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    for line in BufReader::new(stream).lines().map_while(Result::ok) {
        if writeln!(writer, "{name} ({addr}) approved {line}").is_err() {
            return;
        }
    }
}

fn cgroup2_mount() -> Option<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, at, fstype) = (f.next()?, f.next()?, f.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(at))
    })
}
