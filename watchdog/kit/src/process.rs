//! Child processes owned by a guard: signalled and reaped by their own PID, killed when the
//! guard drops, so nothing is left behind.

use std::io;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::Duration;
use tokio::time::Instant;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

/// A running child process, killed (SIGKILL) and reaped on drop if still running.
#[derive(Debug)]
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    /// Spawns `cmd`.
    pub fn spawn(mut cmd: Command, name: impl Into<String>) -> io::Result<Self> {
        let name = name.into();
        let child = cmd
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {name}: {e}")))?;
        Ok(Self { child, name })
    }

    /// Spawns `binary --config CONFIG` with its standard error appended to `run_dir/LOG` (no
    /// input, output discarded): how the demo and the tests start a sidecar or a watchdog.
    pub fn spawn_with_config(
        binary: &Path,
        config: &Path,
        run_dir: &Path,
        log: &str,
        name: impl Into<String>,
    ) -> io::Result<Self> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(run_dir.join(log))?;
        let mut cmd = Command::new(binary);
        cmd.arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        Self::spawn(cmd, name)
    }

    /// The child's PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The name given at spawn.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sends `signal` to the child.
    pub fn signal(&self, signal: Signal) -> io::Result<()> {
        let pid = Pid::from_raw(self.child.id() as i32);
        kill(pid, signal).map_err(io::Error::from)
    }

    /// Whether it has exited (reaping it if so).
    pub fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.child.try_wait()
    }

    /// Waits up to `limit` for the child to exit.
    pub async fn wait_exit(&mut self, limit: Duration) -> io::Result<Option<ExitStatus>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.child.try_wait()? {
                return Ok(Some(st));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within `grace`. Returns the exit status.
    pub async fn stop(&mut self, grace: Duration) -> io::Result<ExitStatus> {
        if let Some(st) = self.child.try_wait()? {
            return Ok(st);
        }
        let _ = self.signal(Signal::SIGTERM);
        if let Some(st) = self.wait_exit(grace).await? {
            return Ok(st);
        }
        let _ = self.child.kill();
        self.child.wait()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
