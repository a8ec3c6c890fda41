//! The `sluice` command line: the daemon and the node-local tools.

mod exec;
mod inspect;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{config::Config, daemon, redirect};
pub use inspect::Output;
use inspect::View;

/// Where the config is looked for when `--config` is not given.
pub const DEFAULT_CONFIG: &str = "/etc/sluice/sluice.yaml";

/// Sidecar-less service-mesh agent for one node.
#[derive(Debug, Parser)]
#[command(name = "sluice", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent: attach the redirect and serve until SIGTERM. If an
    /// agent already runs with the same state directory (and network
    /// namespace), take over from it without refusing a connection (it
    /// drains and exits).
    Agent {
        /// Config file.
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Require a running agent to take over from (fail otherwise).
        #[arg(long)]
        upgrade: bool,
        /// After handing over to a successor and draining, stay (holding
        /// nothing) until SIGTERM instead of exiting: under a supervisor
        /// that restarts exited processes (a Kubernetes pod), an exit would
        /// start this version again, which would take the sockets back.
        #[arg(long)]
        stay_after_handover: bool,
        /// This node's name, over `node.name` in the file: one config for
        /// every node of a DaemonSet, the name from the pod's spec.nodeName.
        #[arg(long, env = "SLUICE_NODE_NAME")]
        node_name: Option<String>,
    },
    /// Work with config files.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Run a command inside a workload's cgroup, so that its connections
    /// are meshed.
    Exec {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Workload name from the config.
        #[arg(long, short)]
        workload: String,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        command: Vec<String>,
    },
    /// Show the pinned maps: records waiting for the agent and the
    /// programs' counters. Works while the agent is down.
    Maps {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        #[arg(long, short, value_enum, default_value = "table")]
        output: Output,
    },
    /// The agent: programs and where they are attached, listeners, version,
    /// uptime, totals. Exit 0 when ready, 4 when starting or stopping.
    Status(Ask),
    /// Meshed services: address, mode, endpoints eligible, connections.
    Services(Ask),
    /// Endpoints: health, breaker state, ejected until, in flight, weight,
    /// node.
    Endpoints {
        #[command(flatten)]
        ask: Ask,
        /// Only this service (`name` or `namespace/name`).
        service: Option<String>,
    },
    /// Live connections: source workload, destination, security, bytes, age.
    Conns(Ask),
    /// Circuit breakers: connections against thresholds, fast failures,
    /// retries, ejections.
    Breakers(Ask),
    /// Certificates: identities and when they expire.
    Certs(Ask),
    /// Workloads this agent meshes, with their identities.
    Workloads(Ask),
    /// Tunnel pools to peer agents (`mesh.tunnels.enabled`): connections,
    /// streams, connections closing, connections whose streams can move,
    /// the last failed dial.
    Tunnels(Ask),
    /// Follow the redirect decisions of the eBPF programs live (switches
    /// their log events on for the duration).
    Trace {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Stop after this many seconds (Ctrl-C stops earlier).
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
    /// The local certificate authority of the single-machine default.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Switch the eBPF programs' log events on or off, at run time.
    EbpfLog {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        state: Switch,
    },
}

/// How to reach the running agent, and what to print.
#[derive(Debug, clap::Args)]
pub struct Ask {
    /// Config file, to find the admin address.
    #[arg(long, short, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG)]
    pub config: PathBuf,
    /// The admin address (overrides the config's `agent.admin`).
    #[arg(long)]
    pub admin: Option<std::net::SocketAddr>,
    #[arg(long, short, value_enum, default_value = "table")]
    pub output: Output,
}

impl Ask {
    /// The admin address: --admin, else the config's, else the default.
    fn admin(&self) -> std::net::SocketAddr {
        self.admin.unwrap_or_else(|| {
            Config::load(&self.config)
                .map(|c| *c.agent.admin)
                .unwrap_or_else(|_| *crate::config::AgentConfig::default().admin)
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate a config file without running anything.
    Check {
        /// The file to check.
        file: PathBuf,
    },
}

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Write a new CA into `agent.state_dir/ca` (refuses to replace one).
    /// Copy that directory to every node that must trust the others.
    Init {
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

/// What a command asks of the process when it ends.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// Bad input: config errors, unknown names (exit code 2).
    Invalid,
    /// The agent cannot be reached (exit code 3).
    Unreachable,
    /// The agent answers but is not ready (exit code 4).
    NotReady,
}

fn ask(result: Result<Outcome, inspect::InspectError>) -> anyhow::Result<Outcome> {
    match result {
        Ok(o) => Ok(o),
        Err(e) => {
            eprintln!("{e}");
            Ok(if e.exit_code() == 3 {
                Outcome::Unreachable
            } else {
                Outcome::Invalid
            })
        }
    }
}

/// Runs one command. Errors are for the caller to print.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Agent {
            config,
            upgrade,
            stay_after_handover,
            node_name,
        } => {
            let Some(mut config) = load_or_report(&config) else {
                return Ok(Outcome::Invalid);
            };
            if let Some(name) = &node_name {
                config.node.name.get_mut().clone_from(name);
            }
            daemon::run(
                config,
                daemon::Options {
                    upgrade,
                    stay_after_handover,
                    node_name,
                },
            )?;
            Ok(Outcome::Success)
        }
        Command::Config {
            command: ConfigCommand::Check { file },
        } => Ok(match load_or_report(&file) {
            Some(config) => {
                println!(
                    "{}: ok ({} workloads, {} services)",
                    file.display(),
                    config.workloads.len(),
                    config.services.len()
                );
                for s in config
                    .services
                    .iter()
                    .filter(|s| s.mode == crate::config::Mode::Kernel)
                {
                    println!(
                        "note: service {}/{} is mode: kernel: its connections carry no identity, \
                         so they are neither encrypted nor authorized",
                        s.namespace,
                        s.name.get()
                    );
                }
                Outcome::Success
            }
            None => Outcome::Invalid,
        }),
        Command::Exec {
            config,
            workload,
            command,
        } => {
            let Some(config) = load_or_report(&config) else {
                return Ok(Outcome::Invalid);
            };
            exec::exec(&config, &workload, &command)
        }
        Command::Ca {
            command: CaCommand::Init { config },
        } => {
            let Some(config) = load_or_report(&config) else {
                return Ok(Outcome::Invalid);
            };
            let dir = crate::tls::local_ca::ca_dir(&config.agent.state_dir);
            let cert = crate::tls::local_ca::init(&dir, config.mesh.trust_domain.get())?;
            println!(
                "wrote a new CA for trust domain {}: {} (key beside it, mode 0600)",
                config.mesh.trust_domain.get(),
                cert.display()
            );
            Ok(Outcome::Success)
        }
        Command::Maps { config, output } => {
            let config = load_or_report(&config).ok_or_else(|| anyhow!("invalid config"))?;
            print_maps(&config.agent.pin_dir, output)?;
            Ok(Outcome::Success)
        }
        Command::Status(a) => ask(inspect::status(a.admin(), a.output)),
        Command::Services(a) => ask(inspect::list(a.admin(), View::Services, None, a.output)),
        Command::Endpoints { ask: a, service } => ask(inspect::list(
            a.admin(),
            View::Endpoints,
            service.as_deref(),
            a.output,
        )),
        Command::Conns(a) => ask(inspect::list(a.admin(), View::Conns, None, a.output)),
        Command::Breakers(a) => ask(inspect::list(a.admin(), View::Breakers, None, a.output)),
        Command::Certs(a) => ask(inspect::list(a.admin(), View::Certs, None, a.output)),
        Command::Workloads(a) => ask(inspect::list(a.admin(), View::Workloads, None, a.output)),
        Command::Tunnels(a) => ask(inspect::list(a.admin(), View::Tunnels, None, a.output)),
        Command::Trace { config, seconds } => {
            let Some(config) = load_or_report(&config) else {
                return Ok(Outcome::Invalid);
            };
            trace(&config, seconds)
        }
        Command::EbpfLog { config, state } => {
            let config = load_or_report(&config).ok_or_else(|| anyhow!("invalid config"))?;
            redirect::set_pinned_log(&config.agent.pin_dir, matches!(state, Switch::On))
                .with_context(|| {
                    format!(
                        "is the agent running? nothing usable is pinned in {}",
                        config.agent.pin_dir.display()
                    )
                })?;
            println!("eBPF log events {state:?}");
            Ok(Outcome::Success)
        }
    }
}

static INTERRUPTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_interrupt(_: libc::c_int) {
    INTERRUPTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// `sluice trace`: switches the programs' events on, prints them as the
/// agent streams them, and switches them off again (unless the config
/// keeps them on), also on Ctrl-C.
fn trace(config: &Config, seconds: u64) -> anyhow::Result<Outcome> {
    let pin_dir = &config.agent.pin_dir;
    redirect::set_pinned_log(pin_dir, true).with_context(|| {
        format!(
            "is the agent running? nothing usable is pinned in {}",
            pin_dir.display()
        )
    })?;
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(
            libc::SIGINT,
            on_interrupt as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    eprintln!("tracing redirect decisions for {seconds}s (Ctrl-C to stop)");
    let result = crate::admin::client::stream_lines(
        *config.agent.admin.get(),
        &format!("/debug/trace?seconds={seconds}"),
        || INTERRUPTED.load(std::sync::atomic::Ordering::Relaxed),
        |line| println!("{line}"),
    );
    if !config.agent.ebpf_log {
        let _ = redirect::set_pinned_log(pin_dir, false);
    }
    match result {
        Ok(()) => Ok(Outcome::Success),
        Err(e) => {
            eprintln!("{e}");
            Ok(Outcome::Unreachable)
        }
    }
}

/// Loads a config, printing every problem to stderr if it is invalid.
fn load_or_report(path: &Path) -> Option<Config> {
    match Config::load(path) {
        Ok(config) => Some(config),
        Err(e) => {
            eprintln!("{e}");
            None
        }
    }
}

fn print_maps(pin_dir: &Path, output: Output) -> anyhow::Result<()> {
    let (by_cookie, by_peer) = redirect::pinned_record_counts(pin_dir)
        .with_context(|| format!("no Sluice maps are pinned in {}", pin_dir.display()))?;
    let stats = redirect::ProgramStats::from_pin(pin_dir)?;
    if output == Output::Json {
        let counters: serde_json::Map<String, serde_json::Value> = stats
            .totals()
            .iter()
            .map(|(s, n)| (s.name().to_owned(), serde_json::json!(n)))
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "pin_dir": pin_dir.display().to_string(),
                "records": {"orig_by_cookie": by_cookie, "orig_by_peer": by_peer},
                "counters": counters,
            })
        );
        return Ok(());
    }
    println!("pin_dir          {}", pin_dir.display());
    println!("records pending  {by_cookie} (connecting), {by_peer} (waiting for accept)");
    for (stat, n) in stats.totals() {
        println!("{:<16} {n}", stat.name());
    }
    Ok(())
}
