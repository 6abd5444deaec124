//! The start-up wait the kit's sidecar and watchdog starters share: spawn the binary on its
//! config, then wait until the file it announces itself in names its PID and its admin API
//! answers `GET /ready` with 200.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use detour_core::body::empty;
use detour_core::transport::set_target;
use detour_core::{Dial, Pool, PoolOptions};
use detour_proto::AppProtocol;
use http::Request;
use serde::de::DeserializeOwned;

use crate::process::ChildGuard;

/// What a process writes once it listens: its PID and its admin address.
pub(crate) trait Announced: DeserializeOwned {
    /// The PID of the process that wrote it.
    fn pid(&self) -> u32;
    /// Its admin API.
    fn admin(&self) -> SocketAddr;
}

/// A process to start: `binary --config config` in `run_dir`, its standard error in
/// `{run_dir}/{kind}.log`, announcing itself in `{run_dir}/{announce}`.
pub(crate) struct Start<'a> {
    pub(crate) kind: &'a str,
    pub(crate) binary: &'a Path,
    pub(crate) config: &'a Path,
    pub(crate) run_dir: &'a Path,
    pub(crate) announce: &'a str,
}

impl Start<'_> {
    /// Starts the process and waits up to `within` until it is ready. An exit during start-up
    /// is an error with its log; so is the time running out, with the sidecar's log (a
    /// watchdog is ready when its sidecar is).
    pub(crate) async fn ready<A: Announced>(self, within: Duration) -> io::Result<(ChildGuard, A)> {
        let Start {
            kind,
            binary,
            config,
            run_dir,
            announce,
        } = self;
        let log = |name: &str| std::fs::read_to_string(run_dir.join(name)).unwrap_or_default();
        let _ = std::fs::remove_file(run_dir.join(announce));
        let own_log = format!("{kind}.log");
        let name = format!("{kind} {}", run_dir.display());
        let mut child = ChildGuard::spawn_with_config(binary, config, run_dir, &own_log, name)?;
        let deadline = Instant::now() + within;
        let pool = Pool::new(PoolOptions::default());
        loop {
            if let Some(st) = child.try_wait()? {
                return Err(io::Error::other(format!(
                    "{kind} exited during start-up ({st}); its log:\n{}",
                    log(&own_log)
                )));
            }
            if let Ok(bytes) = std::fs::read(run_dir.join(announce))
                && let Ok(a) = serde_json::from_slice::<A>(&bytes)
                && a.pid() == child.pid()
                && is_ready(&pool, a.admin()).await
            {
                return Ok((child, a));
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "{kind} in {} not ready within {within:?}; the sidecar's log:\n{}",
                        run_dir.display(),
                        log("sidecar.log")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Whether the admin API at `admin` answers `GET /ready` with 200.
pub async fn is_ready(pool: &Arc<Pool>, admin: SocketAddr) -> bool {
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
