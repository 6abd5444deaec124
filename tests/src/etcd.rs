//! A real etcd member for tests (Debian's `etcd-server`, 3.4): on loopback ports chosen at run
//! time, data in a temporary directory, killed by its PID when the guard drops.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use detour_watchdog::process::ChildGuard;

/// A running single-member etcd.
pub struct Etcd {
    /// The process.
    pub child: ChildGuard,
    /// Client URL (`http://127.0.0.1:PORT`).
    pub url: String,
    data: PathBuf,
    client_port: u16,
    peer_port: u16,
}

/// A port that was free a moment ago (etcd cannot report a port 0 it bound itself).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

impl Etcd {
    /// Starts a member with its data under `dir`; waits until it answers `/health`.
    pub async fn start(dir: &Path) -> Etcd {
        let (client_port, peer_port) = (free_port(), free_port());
        let data = dir.join("etcd-data");
        Self::launch(data, client_port, peer_port).await
    }

    async fn launch(data: PathBuf, client_port: u16, peer_port: u16) -> Etcd {
        let url = format!("http://127.0.0.1:{client_port}");
        let mut cmd = Command::new("etcd");
        cmd.args(["--name", "t1", "--data-dir"])
            .arg(&data)
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-advertise-peer-urls",
                &format!("http://127.0.0.1:{peer_port}"),
            ])
            .args([
                "--initial-cluster",
                &format!("t1=http://127.0.0.1:{peer_port}"),
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = ChildGuard::spawn(cmd, "etcd").unwrap_or_else(|e| {
            panic!("{e} — install Debian's etcd-server (tests/setup.sh does it)")
        });
        let etcd = Etcd {
            child,
            url,
            data,
            client_port,
            peer_port,
        };
        etcd.wait_healthy().await;
        etcd
    }

    async fn wait_healthy(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([self.url.as_str()], None).await
                && c.status().await.is_ok()
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd at {} not healthy in 20 s",
                self.url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Stops the member (SIGTERM) and waits for it to exit.
    pub async fn stop(&mut self) {
        let _ = self.child.stop(Duration::from_secs(10)).await;
    }

    /// Starts it again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.stop().await;
        let again = Self::launch(self.data.clone(), self.client_port, self.peer_port).await;
        *self = again;
    }

    /// A raw client, for tests that write what Detour would not (garbage, compactions).
    pub async fn raw(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url.as_str()], None)
            .await
            .expect("connect to etcd")
    }
}
