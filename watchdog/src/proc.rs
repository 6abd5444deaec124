//! The sidecar process as the watchdog sees it: one it started (its child), or one it adopted —
//! found running after a restart of the watchdog, from the pid file the previous watchdog left.
//! Either way its exit is noticed at once: a child's through `wait`, an adopted one's through a
//! pidfd. A started sidecar is in its own process group and writes its log to a file, so that
//! neither a signal to the watchdog's group nor the watchdog's death reaches it.

use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use tokio::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;

/// The file, in the run directory, where the watchdog notes which sidecar process it runs.
pub const PID_FILE: &str = "sidecar.pid";

/// The environment variable through which a started sidecar learns its watchdog's socket.
pub const WATCHDOG_SOCKET_VAR: &str = "DETOUR_SIDECAR__WATCHDOG__SOCKET";

/// How a sidecar process ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
    /// An adopted process exited (its status went to its real parent).
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exit code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s}"),
            Exit::Unknown => f.write_str("exited (adopted: status unknown)"),
        }
    }
}

/// What the pid file holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PidFile {
    /// The sidecar's process id.
    pub pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
}

/// One sidecar process.
pub struct SidecarProc {
    /// Its process id.
    pub pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
    /// When it was started (or adopted).
    pub since: Instant,
    /// Whether it was adopted rather than started.
    pub adopted: bool,
    child: Option<tokio::process::Child>,
    pidfd: Option<AsyncFd<OwnedFd>>,
    exit: Option<Exit>,
}

impl std::fmt::Debug for SidecarProc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SidecarProc")
            .field("pid", &self.pid)
            .field("binary", &self.binary)
            .field("adopted", &self.adopted)
            .finish()
    }
}

/// How to start a sidecar.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The binary.
    pub binary: &'a Path,
    /// Its config file.
    pub config: &'a Path,
    /// Where its log goes (appended).
    pub log: &'a Path,
    /// The watchdog's Unix socket, given to the sidecar (it publishes through it).
    pub watchdog_socket: &'a Path,
    /// Whether it takes the sockets over from the sidecar running now (an upgrade).
    pub take_over: bool,
}

impl SidecarProc {
    /// Starts a sidecar.
    pub fn spawn(l: &Launch<'_>) -> io::Result<SidecarProc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(l.log)?;
        let mut cmd = tokio::process::Command::new(l.binary);
        cmd.arg("--config")
            .arg(l.config)
            .env(WATCHDOG_SOCKET_VAR, l.watchdog_socket)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .kill_on_drop(false);
        if l.take_over {
            cmd.arg("--take-over");
        }
        let child = cmd.spawn().map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot start {}: {e}", l.binary.display()),
            )
        })?;
        let pid = child
            .id()
            .ok_or_else(|| io::Error::other("the sidecar exited at once"))?;
        Ok(SidecarProc {
            pid,
            binary: l.binary.to_owned(),
            since: Instant::now(),
            adopted: false,
            child: Some(child),
            pidfd: None,
            exit: None,
        })
    }

    /// Adopts the sidecar the pid file in `run_dir` names, if that process still runs the
    /// sidecar with `config` (a recycled pid is not adopted).
    pub fn adopt(run_dir: &Path, config: &Path) -> Option<SidecarProc> {
        let bytes = std::fs::read(run_dir.join(PID_FILE)).ok()?;
        let file: PidFile = serde_json::from_slice(&bytes).ok()?;
        let cmdline = std::fs::read(format!("/proc/{}/cmdline", file.pid)).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let ours = args.windows(2).any(|w| {
            w[0] == b"--config" && std::str::from_utf8(w[1]).is_ok_and(|s| Path::new(s) == config)
        });
        if !ours {
            return None;
        }
        let pid = rustix::process::Pid::from_raw(i32::try_from(file.pid).ok()?)?;
        let fd = rustix::process::pidfd_open(pid, rustix::process::PidfdFlags::empty()).ok()?;
        // `AsyncFd::new` is deprecated because a `T` could close or swap its descriptor behind
        // the reactor's back; an `OwnedFd` owned by the `AsyncFd` alone cannot.
        #[allow(deprecated)]
        let pidfd = AsyncFd::new(fd).ok()?;
        Some(SidecarProc {
            pid: file.pid,
            binary: file.binary,
            since: Instant::now(),
            adopted: true,
            child: None,
            pidfd: Some(pidfd),
            exit: None,
        })
    }

    /// Notes in `run_dir` that this is the sidecar the watchdog runs.
    pub fn write_pid_file(&self, run_dir: &Path) -> io::Result<()> {
        let file = PidFile {
            pid: self.pid,
            binary: self.binary.clone(),
        };
        let path = run_dir.join(PID_FILE);
        let tmp = run_dir.join(format!(".{PID_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(&file)?)?;
        std::fs::rename(tmp, path)
    }

    /// Resolves when the process has exited (at once if it already has).
    pub async fn exited(&mut self) -> Exit {
        if let Some(e) = &self.exit {
            return e.clone();
        }
        let exit = match (&mut self.child, &self.pidfd) {
            (Some(child), _) => match child.wait().await {
                Ok(st) => match (st.code(), st.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(s)) => Exit::Signal(s),
                    (None, None) => Exit::Unknown,
                },
                Err(_) => Exit::Unknown,
            },
            (None, Some(fd)) => {
                // A pidfd becomes readable when its process exits.
                let _ = fd.readable().await.map(|mut g| g.retain_ready());
                Exit::Unknown
            }
            (None, None) => Exit::Unknown,
        };
        self.exit = Some(exit.clone());
        exit
    }

    /// Sends `signal` (ignored once the process is gone).
    pub fn signal(&self, signal: Signal) {
        if self.exit.is_none() {
            let _ = kill(Pid::from_raw(self.pid as i32), signal);
        }
    }

    /// Its resident memory in bytes, when it can be read.
    pub fn rss_bytes(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid)).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kib * 1024)
    }
}
