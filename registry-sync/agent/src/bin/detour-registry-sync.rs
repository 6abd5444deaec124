//! `detour-registry-sync --config FILE`: mirrors a legacy registry (ZooKeeper in Dubbo's layout,
//! or a directory registry) into etcd. See `docs/registry-sync.md`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use detour_registry_sync::agent::{config::Config, run_agent};

/// Mirrors a legacy registry into Detour's etcd registry.
#[derive(Debug, Parser)]
#[command(name = "detour-registry-sync", version)]
struct Args {
    /// The configuration file (TOML).
    #[arg(long, short = 'c')]
    config: PathBuf,
}

fn main() -> ExitCode {
    let args = Args::parse();
    detour_registry::telemetry::init_logging();
    let cfg = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("detour-registry-sync: {e}");
            return ExitCode::from(64);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("detour-registry-sync: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run_agent(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("detour-registry-sync: {e}");
            ExitCode::FAILURE
        }
    }
}
