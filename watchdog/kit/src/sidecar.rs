//! Starting a `detour-sidecar` process from a config and waiting until it is ready: its
//! address file exists and its admin API answers `/ready` with 200.

use std::io;
use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_core::Dial;
use detour_proto::{ADDRESS_FILE, SidecarAddresses};

use crate::process::ChildGuard;
pub use crate::started::is_ready;
use crate::started::{Announced, Start};

/// Where the `detour-sidecar` binary is: `$DETOUR_SIDECAR_BIN`, else beside the current
/// executable, else one directory up (test binaries live in `target/<profile>/deps`).
pub fn find_sidecar_binary() -> io::Result<PathBuf> {
    find_binary("detour-sidecar", "DETOUR_SIDECAR_BIN")
}

/// Finds the workspace binary `name`: `$env_var` if set, else beside the current executable,
/// else one directory up.
pub fn find_binary(name: &str, env_var: &str) -> io::Result<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    Err(io::Error::new(
        io::ErrorKind::NotFound,
        format!(
            "{name} not found beside this program; build it with `cargo build --bins` \
             (or set {env_var})"
        ),
    ))
}

/// A sidecar process and where it listens.
#[derive(Debug)]
pub struct SidecarProcess {
    /// The process.
    pub child: ChildGuard,
    /// Its listeners.
    pub addrs: SidecarAddresses,
    /// Its run directory.
    pub run_dir: PathBuf,
    /// Its config file.
    pub config: PathBuf,
}

impl SidecarProcess {
    /// Writes `config_toml` to `{run_dir}/sidecar.toml`, starts `binary` with it (stderr to
    /// `{run_dir}/sidecar.log`), and waits up to `within` for readiness.
    pub async fn start(
        binary: &Path,
        run_dir: &Path,
        config_toml: &str,
        within: Duration,
    ) -> io::Result<SidecarProcess> {
        std::fs::create_dir_all(run_dir)?;
        let config = run_dir.join("sidecar.toml");
        std::fs::write(&config, config_toml)?;
        Self::start_with(binary, run_dir, &config, within).await
    }

    /// Starts `binary` with an existing config file and waits for readiness.
    pub async fn start_with(
        binary: &Path,
        run_dir: &Path,
        config: &Path,
        within: Duration,
    ) -> io::Result<SidecarProcess> {
        let start = Start {
            kind: "sidecar",
            binary,
            config,
            run_dir,
            announce: ADDRESS_FILE,
        };
        let (child, addrs) = start.ready::<SidecarAddresses>(within).await?;
        Ok(SidecarProcess {
            child,
            addrs,
            run_dir: run_dir.to_owned(),
            config: config.to_owned(),
        })
    }

    /// The outbound address an SDK should use (the Unix socket when there is one).
    pub fn outbound(&self) -> Dial {
        match (&self.addrs.outbound_unix, self.addrs.outbound_tcp) {
            (Some(p), _) => Dial::Unix(p.clone()),
            (None, Some(a)) => Dial::Tcp(a),
            (None, None) => Dial::Tcp(self.addrs.inbound),
        }
    }
}

impl Announced for SidecarAddresses {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn admin(&self) -> std::net::SocketAddr {
        self.admin
    }
}
