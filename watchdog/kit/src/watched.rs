//! A host run the production way — a `detour-watchdog` that starts and keeps its sidecar —
//! for `detourctl demo`, the tests and the chaos scripts: start it and wait until its sidecar is
//! ready; and the client side of a watchdog's Unix socket (`detourctl upgrade`, `shutdown`).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_core::body::{empty, full};
use detour_core::{BoxBody, Dial, Pool, PoolOptions};
use detour_proto::{ADDRESS_FILE, AppProtocol, SidecarAddresses};
use http::{Method, Request, StatusCode};
use http_body_util::BodyExt;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::process::ChildGuard;
use crate::started::{Announced, Start};
use detour_watchdog::api::{UpgradeDone, UpgradeRequest};
use detour_watchdog::proc::{PID_FILE, PidFile};

/// A running watchdog and the host it keeps.
#[derive(Debug)]
pub struct WatchdogProcess {
    /// The watchdog process.
    pub child: ChildGuard,
    /// The host's run directory.
    pub run_dir: PathBuf,
    /// The watchdog's config file.
    pub config: PathBuf,
    /// Its Unix socket.
    pub unix: PathBuf,
    /// Its loopback admin address.
    pub admin: SocketAddr,
}

/// Where `watchdog.json` says a watchdog listens.
#[derive(Debug, serde::Deserialize)]
struct Info {
    pid: u32,
    admin: SocketAddr,
    unix: PathBuf,
}

impl Announced for Info {
    fn pid(&self) -> u32 {
        self.pid
    }
    fn admin(&self) -> SocketAddr {
        self.admin
    }
}

impl WatchdogProcess {
    /// Writes `{run_dir}/sidecar.toml` (`sidecar_toml`) and `{run_dir}/watchdog.toml` (running
    /// `sidecar_binary`, its admin API on `admin_ip`, `extra` appended), starts `binary` with
    /// it, and waits up to `within` until the watchdog reports its sidecar ready.
    pub async fn start(
        binary: &Path,
        sidecar_binary: &Path,
        run_dir: &Path,
        sidecar_toml: &str,
        admin_ip: &str,
        extra: &str,
        within: Duration,
    ) -> io::Result<WatchdogProcess> {
        std::fs::create_dir_all(run_dir)?;
        std::fs::write(run_dir.join("sidecar.toml"), sidecar_toml)?;
        let config = run_dir.join("watchdog.toml");
        let text = format!(
            "[sidecar]\nbinary = \"{}\"\nconfig = \"sidecar.toml\"\n[admin]\nlisten = \"{admin_ip}:0\"\n{extra}\n",
            sidecar_binary.display()
        );
        std::fs::write(&config, text)?;
        Self::start_with(binary, run_dir, &config, within).await
    }

    /// Starts `binary` with an existing config file and waits until its sidecar is ready.
    pub async fn start_with(
        binary: &Path,
        run_dir: &Path,
        config: &Path,
        within: Duration,
    ) -> io::Result<WatchdogProcess> {
        let start = Start {
            kind: "watchdog",
            binary,
            config,
            run_dir,
            announce: "watchdog.json",
        };
        let (child, info) = start.ready::<Info>(within).await?;
        Ok(WatchdogProcess {
            child,
            run_dir: run_dir.to_owned(),
            config: config.to_owned(),
            unix: info.unix,
            admin: info.admin,
        })
    }

    /// The sidecar's addresses (from its address file), once it has written them.
    pub fn sidecar(&self) -> io::Result<SidecarAddresses> {
        let bytes = std::fs::read(self.run_dir.join(ADDRESS_FILE))?;
        serde_json::from_slice(&bytes).map_err(io::Error::other)
    }

    /// The pid of the sidecar the watchdog runs (from its pid file).
    pub fn sidecar_pid(&self) -> Option<u32> {
        let bytes = std::fs::read(self.run_dir.join(PID_FILE)).ok()?;
        serde_json::from_slice::<PidFile>(&bytes)
            .ok()
            .map(|f| f.pid)
    }

    /// The outbound address an SDK on this host uses.
    pub fn outbound(&self) -> io::Result<Dial> {
        let a = self.sidecar()?;
        Ok(match (a.outbound_unix, a.outbound_tcp) {
            (Some(p), _) => Dial::Unix(p),
            (None, Some(t)) => Dial::Tcp(t),
            (None, None) => Dial::Tcp(a.inbound),
        })
    }
}

impl Drop for WatchdogProcess {
    fn drop(&mut self) {
        // The sidecar is in its own process group and outlives its watchdog on purpose: stop it
        // by its own pid (the watchdog itself goes with its guard) — the one in the pid file,
        // and any other started with this host's files (a successor in the middle of a
        // hand-over, or one whose pid file is gone).
        let _ = self.child.signal(Signal::SIGKILL);
        let mut pids = processes_naming(&self.run_dir);
        pids.extend(self.sidecar_pid());
        for pid in pids {
            if pid != std::process::id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
            }
        }
    }
}

/// The processes with an argument under `dir` (from `/proc/*/cmdline`).
fn processes_naming(dir: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let dir = dir.as_os_str().as_encoded_bytes();
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|cmd| {
                cmd.split(|b| *b == 0).any(|arg| {
                    arg.starts_with(dir) && arg.get(dir.len()).is_none_or(|b| *b == b'/')
                })
            })
        })
        .collect()
}

/// One request to a watchdog's Unix socket (or admin port): status and body text.
pub async fn call(
    dial: &Dial,
    method: Method,
    path: &str,
    body: Option<Vec<u8>>,
    within: Duration,
) -> io::Result<(StatusCode, String)> {
    let body: BoxBody = body.map(full).unwrap_or_else(empty);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, "detour.watchdog")
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .map_err(io::Error::other)?;
    let pool = Pool::new(PoolOptions::default());
    let exchange = async {
        let resp = pool
            .send(dial, AppProtocol::Http1, req)
            .await
            .map_err(|f| io::Error::other(format!("{dial}: {}", f.error)))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(io::Error::other)?
            .to_bytes();
        Ok((status, String::from_utf8_lossy(&bytes).into_owned()))
    };
    tokio::time::timeout(within, exchange).await.map_err(|_| {
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("{dial}: no answer within {within:?}"),
        )
    })?
}

/// Asks the watchdog behind `socket` for an upgrade (or rollback) and waits for its outcome.
pub async fn upgrade(socket: &Path, req: &UpgradeRequest) -> Result<UpgradeDone, String> {
    let body = serde_json::to_vec(req).map_err(|e| e.to_string())?;
    let dial = Dial::Unix(socket.to_owned());
    let within = Duration::from_secs(180);
    let (status, text) = call(&dial, Method::POST, "/v1/upgrade", Some(body), within)
        .await
        .map_err(|e| format!("cannot reach the watchdog: {e}"))?;
    if status == StatusCode::OK {
        serde_json::from_str(text.trim()).map_err(|e| format!("unreadable answer {text:?}: {e}"))
    } else {
        Err(format!("{status}: {}", text.trim()))
    }
}

/// Asks the watchdog behind `socket` to drain its sidecar, withdraw its host and stop.
pub async fn shutdown(socket: &Path) -> Result<(), String> {
    let dial = Dial::Unix(socket.to_owned());
    let (status, text) = call(
        &dial,
        Method::POST,
        "/v1/shutdown",
        None,
        Duration::from_secs(60),
    )
    .await
    .map_err(|e| format!("cannot reach the watchdog: {e}"))?;
    if status == StatusCode::OK {
        Ok(())
    } else {
        Err(format!("{status}: {}", text.trim()))
    }
}
