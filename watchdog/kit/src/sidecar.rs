//! Starting a `detour-sidecar` process from a config and waiting until it is ready: its
//! address file exists and its admin API answers `/ready` with 200.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use detour_core::body::empty;
use detour_core::transport::set_target;
use detour_core::{Dial, Pool, PoolOptions};
use detour_proto::{ADDRESS_FILE, AppProtocol, SidecarAddresses};
use http::Request;

use crate::process::ChildGuard;

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
        let _ = std::fs::remove_file(run_dir.join(ADDRESS_FILE));
        let mut child = ChildGuard::spawn_with_config(
            binary,
            config,
            run_dir,
            "sidecar.log",
            format!("sidecar {}", run_dir.display()),
        )?;
        let addrs = wait_ready(&mut child, run_dir, within).await?;
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

/// Waits for the address file, then for `/ready` to answer 200.
async fn wait_ready(
    child: &mut ChildGuard,
    run_dir: &Path,
    within: Duration,
) -> io::Result<SidecarAddresses> {
    let deadline = Instant::now() + within;
    let pool = Pool::new(PoolOptions::default());
    loop {
        if let Some(st) = child.try_wait()? {
            let log = std::fs::read_to_string(run_dir.join("sidecar.log")).unwrap_or_default();
            return Err(io::Error::other(format!(
                "sidecar exited during start-up ({st}); its log:\n{log}"
            )));
        }
        if let Ok(bytes) = std::fs::read(run_dir.join(ADDRESS_FILE))
            && let Ok(addrs) = serde_json::from_slice::<SidecarAddresses>(&bytes)
            && addrs.pid == child.pid()
            && is_ready(&pool, addrs.admin).await
        {
            return Ok(addrs);
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "sidecar in {} not ready within {within:?}",
                    run_dir.display()
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether the admin API at `admin` answers `GET /ready` with 200.
pub async fn is_ready(pool: &Arc<Pool>, admin: std::net::SocketAddr) -> bool {
    let Ok(req) = Request::get("/ready").body(empty()) else {
        return false;
    };
    let Ok(req) = set_target("localhost", AppProtocol::Http1, req) else {
        return false;
    };
    match pool.send(&Dial::Tcp(admin), AppProtocol::Http1, req).await {
        Ok(resp) => {
            let ok = resp.status().is_success();
            let _ = http_body_util::BodyExt::collect(resp.into_body()).await;
            ok
        }
        Err(_) => false,
    }
}
