use std::process::ExitCode;

use clap::Parser as _;
use sluice::cli::{self, Cli, Outcome};

fn main() -> ExitCode {
    // kube-rs logs each retry of a failing watch itself; the agent reports
    // each change of state once (discovery), so its lines stay quiet unless
    // RUST_LOG asks for them by name.
    env_logger::Builder::new()
        .filter_level(log::LevelFilter::Info)
        .filter_module("kube_client", log::LevelFilter::Off)
        .filter_module("kube_runtime", log::LevelFilter::Off)
        .parse_env(env_logger::Env::default())
        .format_target(false)
        .init();
    let cli = Cli::parse();
    match cli::run(cli) {
        Ok(Outcome::Success) => ExitCode::SUCCESS,
        Ok(Outcome::Invalid) => ExitCode::from(2),
        Ok(Outcome::Unreachable) => ExitCode::from(3),
        Ok(Outcome::NotReady) => ExitCode::from(4),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
