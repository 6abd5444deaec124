//! A real ZooKeeper for tests (Debian's `zookeeper` package, run without its system service):
//! one server on a loopback port chosen at run time, data in a temporary directory, killed by
//! its PID when the guard drops.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use detour_kit::process::ChildGuard;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use zookeeper_client as zk;

use crate::etcd::free_port;

/// The jars of Debian's package.
const CLASSPATH: &str =
    "/usr/share/java/zookeeper.jar:/usr/share/java/slf4j-log4j12.jar:/usr/share/java/log4j-1.2.jar";

/// A running ZooKeeper server.
pub struct ZooKeeper {
    child: Option<ChildGuard>,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    dir: PathBuf,
}

impl ZooKeeper {
    /// Starts a server with its data under `dir`; waits until it answers `ruok`.
    pub async fn start(dir: &Path) -> ZooKeeper {
        let dir = dir.join("zookeeper");
        std::fs::create_dir_all(dir.join("data")).expect("zookeeper dir");
        let port = free_port();
        let cfg = format!(
            "tickTime=500\ndataDir={}\nclientPort={port}\nclientPortAddress=127.0.0.1\n\
             admin.enableServer=false\n4lw.commands.whitelist=ruok\nmaxSessionTimeout=20000\n",
            dir.join("data").display()
        );
        std::fs::write(dir.join("zoo.cfg"), cfg).expect("zoo.cfg");
        let mut zk = ZooKeeper {
            child: None,
            addr: format!("127.0.0.1:{port}"),
            dir,
        };
        zk.launch().await;
        zk
    }

    async fn launch(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("zookeeper.log"))
            .map_or_else(|_| Stdio::null(), Stdio::from);
        let mut cmd = Command::new("java");
        cmd.arg("-Xmx256m")
            .arg("-cp")
            .arg(format!("{}:{CLASSPATH}", self.dir.display()))
            .arg("org.apache.zookeeper.server.quorum.QuorumPeerMain")
            .arg(self.dir.join("zoo.cfg"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        let child = ChildGuard::spawn(cmd, "zookeeper").unwrap_or_else(|e| {
            panic!("{e} — install Debian's zookeeper (tests/setup.sh does it)")
        });
        self.child = Some(child);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !self.ruok().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "ZooKeeper at {} not answering in 30 s; log: {}",
                self.addr,
                std::fs::read_to_string(self.dir.join("zookeeper.log")).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn ruok(&self) -> bool {
        let probe = async {
            let mut s = tokio::net::TcpStream::connect(&self.addr).await.ok()?;
            s.write_all(b"ruok").await.ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            Some(buf == b"imok")
        };
        matches!(
            tokio::time::timeout(Duration::from_secs(1), probe).await,
            Ok(Some(true))
        )
    }

    /// Stops the server (SIGKILL: sessions are kept in its data and restored on restart).
    pub async fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.signal(nix::sys::signal::Signal::SIGKILL);
            let _ = c.wait_exit(Duration::from_secs(10)).await;
        }
    }

    /// Starts it again on the same port with the same data.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }

    /// A client session (10 s session timeout).
    pub async fn client(&self) -> zk::Client {
        zk::Client::connector()
            .with_session_timeout(Duration::from_secs(10))
            .connect(&self.addr)
            .await
            .expect("connect to ZooKeeper")
    }
}

pub use detour_registry_sync::legacy::dubbo::percent_encode as encode;

/// Registers providers the way a Dubbo application does: ephemeral children of
/// `/dubbo/{interface}/providers`, held by this registrar's session.
pub struct Registrar {
    /// Its session.
    pub client: zk::Client,
}

impl Registrar {
    /// A registrar with its own session.
    pub async fn new(zk: &ZooKeeper) -> Registrar {
        Registrar {
            client: zk.client().await,
        }
    }

    fn path(interface: &str, url: &str) -> String {
        format!("/dubbo/{interface}/providers/{}", encode(url))
    }

    /// Registers `url` under `interface` (creating the parents as persistent nodes).
    pub async fn register(&self, interface: &str, url: &str) {
        let parent = format!("/dubbo/{interface}/providers");
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        match self.client.mkdir(&parent, &persistent).await {
            Ok(()) | Err(zk::Error::NodeExists) => {}
            Err(e) => panic!("mkdir {parent}: {e}"),
        }
        let eph = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        match self
            .client
            .create(&Self::path(interface, url), b"", &eph)
            .await
        {
            Ok(_) | Err(zk::Error::NodeExists) => {}
            Err(e) => panic!("create {url}: {e}"),
        }
    }

    /// Registers a raw child name (for malformed entries).
    pub async fn register_raw(&self, interface: &str, child: &str) {
        let parent = format!("/dubbo/{interface}/providers");
        let persistent = zk::CreateMode::Persistent.with_acls(zk::Acls::anyone_all());
        let _ = self.client.mkdir(&parent, &persistent).await;
        let eph = zk::CreateMode::Ephemeral.with_acls(zk::Acls::anyone_all());
        self.client
            .create(&format!("{parent}/{child}"), b"", &eph)
            .await
            .unwrap_or_else(|e| panic!("create {child}: {e}"));
    }

    /// Removes `url` from `interface`.
    pub async fn deregister(&self, interface: &str, url: &str) {
        match self.client.delete(&Self::path(interface, url), None).await {
            Ok(()) | Err(zk::Error::NoNode) => {}
            Err(e) => panic!("delete {url}: {e}"),
        }
    }
}
