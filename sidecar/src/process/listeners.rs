//! A sidecar's listening sockets, by role: bound from the config at a normal start, or rebuilt
//! from the sockets a predecessor handed over (`handover.rs`), and duplicated so that they can
//! be handed on again.

use std::net::SocketAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use detour_core::{LISTEN_BACKLOG, listen_tcp};
use tokio::net::{TcpListener, UnixListener};

use crate::config::Config;

/// The file name, in the run directory, of the hand-over socket.
pub const HANDOVER_SOCKET: &str = "handover.sock";

/// A socket that could not be bound or rebuilt.
#[derive(Debug, thiserror::Error)]
#[error("cannot bind the {listener} listener on {addr}: {source}")]
pub struct BindError {
    /// Which listener.
    pub listener: &'static str,
    /// Where.
    pub addr: String,
    /// The socket error.
    #[source]
    pub source: std::io::Error,
}

/// Every listening socket of one sidecar.
#[derive(Debug)]
pub struct Listeners {
    /// The admin API (loopback TCP).
    pub admin: TcpListener,
    /// The PA's listener for remote sidecars.
    pub inbound: TcpListener,
    /// The CA's loopback TCP listener, if configured.
    pub outbound_tcp: Option<TcpListener>,
    /// The CA's Unix socket, if configured.
    pub outbound_unix: Option<UnixListener>,
    /// Where a successor asks for these sockets.
    pub handover: UnixListener,
    /// The scrapeable metrics listener, if configured.
    pub metrics: Option<TcpListener>,
}

/// The roles, in the order sockets travel in a hand-over (a role a version does not know is
/// passed over by it; `metrics` is last so that earlier versions read the others as before).
pub const ROLES: [&str; 6] = [
    "admin",
    "inbound",
    "outbound",
    "outbound-unix",
    "handover",
    "metrics",
];

impl Listeners {
    /// Binds every listener `cfg` names.
    pub fn bind(cfg: &Config) -> Result<Listeners, BindError> {
        let tcp = |listener: &'static str, addr: SocketAddr| {
            listen_tcp(addr).map_err(|source| BindError {
                listener,
                addr: addr.to_string(),
                source,
            })
        };
        Ok(Listeners {
            admin: tcp("admin", cfg.admin)?,
            inbound: tcp("inbound", cfg.inbound)?,
            outbound_tcp: cfg.outbound_tcp.map(|a| tcp("outbound", a)).transpose()?,
            outbound_unix: cfg
                .outbound_unix
                .as_deref()
                .map(|p| {
                    let l = bind_unix(p, "outbound-unix", 0o660)?;
                    if let Some(gid) = cfg.outbound_unix_group {
                        rustix::fs::chown(p, None, Some(rustix::fs::Gid::from_raw(gid))).map_err(
                            |e| BindError {
                                listener: "outbound-unix",
                                addr: p.display().to_string(),
                                source: std::io::Error::from(e),
                            },
                        )?;
                    }
                    Ok(l)
                })
                .transpose()?,
            handover: bind_unix(&cfg.run_dir.join(HANDOVER_SOCKET), "handover", 0o600)?,
            metrics: cfg.metrics.listen.map(|a| tcp("metrics", a)).transpose()?,
        })
    }

    /// After a take-over: the metrics listener as `cfg` wants it — the one handed over, a new
    /// one when the predecessor had none, none when the config names none.
    pub fn settle_metrics(&mut self, cfg: &Config) -> Result<(), BindError> {
        match (cfg.metrics.listen, &self.metrics) {
            (None, _) => self.metrics = None,
            (Some(addr), None) => {
                self.metrics = Some(listen_tcp(addr).map_err(|source| BindError {
                    listener: "metrics",
                    addr: addr.to_string(),
                    source,
                })?);
            }
            (Some(_), Some(_)) => {}
        }
        Ok(())
    }

    /// Rebuilds the listeners from sockets received in `ROLES` order (`None` where the
    /// predecessor had none).
    pub fn from_fds(mut fds: Vec<Option<OwnedFd>>) -> std::io::Result<Listeners> {
        fds.resize_with(ROLES.len(), || None);
        let mut it = fds.into_iter();
        let mut next = || it.next().flatten();
        let tcp = |fd: Option<OwnedFd>| -> std::io::Result<Option<TcpListener>> {
            fd.map(|fd| {
                let l = std::net::TcpListener::from(fd);
                l.set_nonblocking(true)?;
                TcpListener::from_std(l)
            })
            .transpose()
        };
        let unix = |fd: Option<OwnedFd>| -> std::io::Result<Option<UnixListener>> {
            fd.map(|fd| {
                let l = std::os::unix::net::UnixListener::from(fd);
                l.set_nonblocking(true)?;
                UnixListener::from_std(l)
            })
            .transpose()
        };
        let missing = |role| std::io::Error::other(format!("no {role} socket was handed over"));
        Ok(Listeners {
            admin: tcp(next())?.ok_or_else(|| missing("admin"))?,
            inbound: tcp(next())?.ok_or_else(|| missing("inbound"))?,
            outbound_tcp: tcp(next())?,
            outbound_unix: unix(next())?,
            handover: unix(next())?.ok_or_else(|| missing("handover"))?,
            metrics: tcp(next())?,
        })
    }

    /// Duplicates of every socket, in `ROLES` order, to hand over later.
    pub fn dup(&self) -> std::io::Result<Vec<Option<OwnedFd>>> {
        let one = |fd: Option<std::os::fd::BorrowedFd<'_>>| {
            fd.map(|fd| fd.try_clone_to_owned()).transpose()
        };
        Ok(vec![
            one(Some(self.admin.as_fd()))?,
            one(Some(self.inbound.as_fd()))?,
            one(self.outbound_tcp.as_ref().map(AsFd::as_fd))?,
            one(self.outbound_unix.as_ref().map(AsFd::as_fd))?,
            one(Some(self.handover.as_fd()))?,
            one(self.metrics.as_ref().map(AsFd::as_fd))?,
        ])
    }
}

/// Binds this process's liveness socket, `{run_dir}/health-{pid}.sock` (mode 0600), after
/// removing those of processes that are gone (a sidecar killed with -9 leaves its own).
pub fn bind_health(run_dir: &Path) -> Result<(std::path::PathBuf, UnixListener), BindError> {
    if let Ok(dir) = std::fs::read_dir(run_dir) {
        for e in dir.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("health-")
                && name.ends_with(".sock")
                && std::os::unix::net::UnixStream::connect(e.path()).is_err()
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let path = run_dir.join(format!("health-{}.sock", std::process::id()));
    let l = bind_unix(&path, "health", 0o600)?;
    Ok((path, l))
}

/// Binds a Unix listener at `path` with `mode`, replacing a stale socket file left by a dead
/// process (a live one is an error).
fn bind_unix(path: &Path, listener: &'static str, mode: u32) -> Result<UnixListener, BindError> {
    let err = |source| BindError {
        listener,
        addr: path.display().to_string(),
        source,
    };
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                "another process serves this socket",
            )));
        }
        std::fs::remove_file(path).map_err(err)?;
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let socket = tokio::net::UnixSocket::new_stream().map_err(err)?;
    socket.bind(path).map_err(err)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    socket.listen(LISTEN_BACKLOG).map_err(err)
}
