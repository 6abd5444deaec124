//! A real etcd member for tests (Debian's `etcd-server`, 3.4): on loopback ports chosen at run
//! time, data in a temporary directory, killed by its PID when the guard drops.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use detour_kit::process::ChildGuard;

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

/// A log file for a child's stderr (discarded when it cannot be made).
fn log_file(path: &Path) -> Stdio {
    std::fs::File::create(path).map_or_else(|_| Stdio::null(), Stdio::from)
}

/// A loopback port free now, for a process started next (etcd takes no port 0). Picked below
/// Linux's ephemeral range (32768–60999), so that no outgoing connection made meanwhile by any
/// test process can take it before etcd binds it; never handed out twice by one test process.
pub fn free_port() -> u16 {
    static GIVEN: detour_proto::sync::Mutex<Vec<u16>> = detour_proto::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock();
    for _ in 0..1000 {
        let port = fastrand::u16(20_000..32_000);
        if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.push(port);
            return port;
        }
    }
    panic!("no free loopback port in 20000..32000")
}

/// The command of etcd member `name`: data in `data`, clients served at `url`, peers at `peer`,
/// in the initial cluster `cluster` (`name=peer,…`); no output but to a log it is given.
pub(crate) fn member_command(
    name: &str,
    data: &Path,
    url: &str,
    peer: &str,
    cluster: &str,
) -> Command {
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", name, "--data-dir"])
        .arg(data)
        .args(["--listen-client-urls", url, "--advertise-client-urls", url])
        .args([
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
        ])
        .args(["--initial-cluster", cluster])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// The peer URL on loopback `port`, and the initial cluster of member `name` alone.
pub(crate) fn alone(name: &str, port: u16) -> (String, String) {
    let peer = format!("http://127.0.0.1:{port}");
    let cluster = format!("{name}={peer}");
    (peer, cluster)
}

/// Starts etcd member `cmd` as `what`; panics naming the package to install when there is no
/// `etcd`.
pub(crate) fn spawn_member(cmd: Command, what: &str) -> ChildGuard {
    ChildGuard::spawn(cmd, what)
        .unwrap_or_else(|e| panic!("{e} — install Debian's etcd-server (tests/setup.sh does it)"))
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
        let (peer, cluster) = alone("t1", peer_port);
        let cmd = member_command("t1", &data, &url, &peer, &cluster);
        let child = spawn_member(cmd, "etcd");
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

    /// The sum of etcd's own metric `name` over the series whose labels contain every one of
    /// `labels` (`grpc_method="Watch"`…), read from its `/metrics`.
    pub async fn metric(&self, name: &str, labels: &[&str]) -> f64 {
        metric_at(&self.url, name, labels).await
    }

    /// A raw client, for tests that write what Detour would not (garbage, compactions).
    pub async fn raw(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.url.as_str()], None)
            .await
            .expect("connect to etcd")
    }
}

/// The sum of metric `name` at etcd client URL `url` over the series whose labels contain each
/// of `labels`.
pub async fn metric_at(url: &str, name: &str, labels: &[&str]) -> f64 {
    let text = metrics_text(url).await.expect("read etcd's /metrics");
    sum_metric(&text, name, labels)
}

/// etcd's `/metrics` page at client URL `url`.
pub async fn metrics_text(url: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = url.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await?;
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await?;
    let mut text = String::new();
    conn.read_to_string(&mut text).await?;
    Ok(text)
}

/// The sum of metric `name` in a Prometheus text page over the series whose labels contain
/// each of `labels`.
pub fn sum_metric(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']))
                && labels.iter().all(|want| l.contains(want))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A 3-member etcd cluster on loopback.
pub struct EtcdCluster {
    members: Vec<Option<ChildGuard>>,
    /// Client URLs, one per member.
    pub urls: Vec<String>,
    peers: Vec<String>,
    dir: PathBuf,
}

impl EtcdCluster {
    /// Starts three members under `dir`; waits until every one answers.
    pub async fn start(dir: &Path) -> EtcdCluster {
        let urls: Vec<String> = (0..3)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let peers: Vec<String> = (0..3)
            .map(|_| format!("http://127.0.0.1:{}", free_port()))
            .collect();
        let mut c = EtcdCluster {
            members: vec![None, None, None],
            urls,
            peers,
            dir: dir.to_owned(),
        };
        for i in 0..3 {
            c.spawn(i);
        }
        for i in 0..3 {
            c.wait_member(i).await;
        }
        c
    }

    fn spawn(&mut self, i: usize) {
        let cluster: Vec<String> = (0..3).map(|j| format!("e{j}={}", self.peers[j])).collect();
        let name = format!("e{i}");
        let data = self.dir.join(&name);
        let (url, peer) = (&self.urls[i], &self.peers[i]);
        let mut cmd = member_command(&name, &data, url, peer, &cluster.join(","));
        cmd.args(["--initial-cluster-token", "detour-test"])
            .args(["--initial-cluster-state", "new"])
            .stderr(log_file(&self.log(i)));
        self.members[i] = Some(spawn_member(cmd, &format!("etcd {name}")));
    }

    fn log(&self, i: usize) -> PathBuf {
        self.dir.join(format!("e{i}.log"))
    }

    async fn wait_member(&mut self, i: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(mut c) = etcd_client::Client::connect([self.urls[i].as_str()], None).await
                && c.status().await.is_ok_and(|s| s.leader() != 0)
            {
                return;
            }
            let exited = self.members[i]
                .as_mut()
                .is_some_and(|m| matches!(m.try_wait(), Ok(Some(_))));
            let log = || {
                let text = std::fs::read_to_string(self.log(i)).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                tail.join("\n")
            };
            assert!(
                !exited,
                "etcd e{i} exited; its log, last lines first:\n{}",
                log()
            );
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd e{i} not healthy in 30 s; its log, last lines first:\n{}",
                log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The `etcd:` registry spec naming every member.
    pub fn spec(&self) -> String {
        format!("etcd:{}", self.urls.join(","))
    }

    /// The index of the current leader, asked of any live member.
    pub async fn leader(&self) -> usize {
        for (i, url) in self.urls.iter().enumerate() {
            if self.members[i].is_none() {
                continue;
            }
            if let Ok(mut c) = etcd_client::Client::connect([url.as_str()], None).await
                && let Ok(s) = c.status().await
                && s.leader() == s.header().map_or(0, |h| h.member_id())
            {
                return i;
            }
        }
        panic!("no member says it leads");
    }

    /// Sends `signal` to member `i` (SIGSTOP freezes it like a partition: connections are
    /// accepted by the kernel and never answered; SIGCONT thaws it).
    pub fn signal(&self, i: usize, signal: nix::sys::signal::Signal) {
        if let Some(m) = &self.members[i] {
            m.signal(signal).expect("signal etcd member");
        }
    }

    /// Kills member `i` (SIGKILL).
    pub async fn kill(&mut self, i: usize) {
        if let Some(mut m) = self.members[i].take() {
            let _ = m.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = m.wait_exit(Duration::from_secs(10)).await;
        }
    }

    /// Kills every member (SIGKILL): the whole cluster is down.
    pub async fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i).await;
        }
    }

    /// Starts every member that is not running, with its data, and waits until each has a
    /// leader again.
    pub async fn start_all(&mut self) {
        let down: Vec<usize> = (0..self.members.len())
            .filter(|&i| self.members[i].is_none())
            .collect();
        for &i in &down {
            self.spawn(i);
        }
        for &i in &down {
            self.wait_member(i).await;
        }
    }

    /// Restarts member `i` with the same data; it rejoins.
    pub async fn restart(&mut self, i: usize) {
        self.kill(i).await;
        self.spawn(i);
        self.wait_member(i).await;
    }
}
