//! The `sluice` command line: the daemon and the node-local tools.

mod exec;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, anyhow};
use clap::{Parser, Subcommand, ValueEnum};

use crate::{config::Config, daemon, redirect};

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
    /// Run the agent: attach the redirect and serve until SIGTERM.
    Agent {
        /// Config file.
        #[arg(long, short, env = "SLUICE_CONFIG", default_value = DEFAULT_CONFIG)]
        config: PathBuf,
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
}

/// Runs one command. Errors are for the caller to print.
pub fn run(cli: Cli) -> anyhow::Result<Outcome> {
    match cli.command {
        Command::Agent { config } => {
            let Some(config) = load_or_report(&config) else {
                return Ok(Outcome::Invalid);
            };
            daemon::run(config)?;
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
            let cert = crate::tls::local_ca::init(&dir, &config.mesh.trust_domain.value)?;
            println!(
                "wrote a new CA for trust domain {}: {} (key beside it, mode 0600)",
                config.mesh.trust_domain.value,
                cert.display()
            );
            Ok(Outcome::Success)
        }
        Command::Maps { config } => {
            let config = load_or_report(&config).ok_or_else(|| anyhow!("invalid config"))?;
            print_maps(&config.agent.pin_dir)?;
            Ok(Outcome::Success)
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

fn print_maps(pin_dir: &Path) -> anyhow::Result<()> {
    let (by_cookie, by_peer) = redirect::pinned_record_counts(pin_dir)
        .with_context(|| format!("no Sluice maps are pinned in {}", pin_dir.display()))?;
    let stats = redirect::ProgramStats::from_pin(pin_dir)?;
    println!("pin_dir          {}", pin_dir.display());
    println!("records pending  {by_cookie} (connecting), {by_peer} (waiting for accept)");
    for (stat, n) in stats.totals() {
        println!("{:<16} {n}", stat.name());
    }
    Ok(())
}
