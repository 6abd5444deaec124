//! A `detour-registry-sync` process for tests: its config written under a run directory, its
//! admin address read from the file it writes, killed by its PID when the guard drops.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_kit::process::ChildGuard;
use detour_kit::sidecar::find_binary;

use detour_kit::provider::DemoProvider;
use etcd_client::GetOptions;

use crate::wait_value;

/// Where Detour's service entries live in etcd.
pub const PREFIX: &str = "/detour/v1/services/";

/// A running sync agent.
pub struct SyncProcess {
    /// The process.
    pub child: ChildGuard,
    /// Its run directory (config, log, admin address).
    pub dir: PathBuf,
    /// Its admin address.
    pub admin: String,
}

/// A config for a ZooKeeper source into etcd; `extra` is appended.
pub fn zk_config(replica: &str, zk: &str, etcd: &str, extra: &str) -> String {
    format!(
        "name = \"zk\"\nreplica = \"{replica}\"\ncheck_interval_ms = 500\n\n\
         [source]\nkind = \"zookeeper\"\nservers = \"{zk}\"\nsession_timeout_ms = 10000\n\n\
         [target]\netcd = [\"{etcd}\"]\nelection_ttl_s = 2\nlease_ttl_s = 10\nrequest_timeout_ms = 1000\n\n\
         [admin]\nlisten = \"127.0.0.1:0\"\naddress_file = \"admin.addr\"\n{extra}"
    )
}

impl SyncProcess {
    /// Starts the agent with `config` under `root/name`; waits until its admin API answers.
    pub async fn start(root: &Path, name: &str, config: &str) -> SyncProcess {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("sync run dir");
        let cfg = dir.join("sync.toml");
        let config = config.replace(
            "address_file = \"admin.addr\"",
            &format!("address_file = \"{}\"", dir.join("admin.addr").display()),
        );
        std::fs::write(&cfg, config).expect("sync config");
        let _ = std::fs::remove_file(dir.join("admin.addr"));
        let bin = find_binary("detour-registry-sync", "DETOUR_REGISTRY_SYNC_BIN")
            .unwrap_or_else(|e| panic!("{e}"));
        let child = ChildGuard::spawn_with_config(&bin, &cfg, &dir, "sync.log", name)
            .expect("sync agent starts");
        let admin = wait_value(
            &format!("{name} admin address"),
            Duration::from_secs(10),
            || async { std::fs::read_to_string(dir.join("admin.addr")).unwrap_or_default() },
            |t| !t.trim().is_empty(),
        )
        .await
        .trim()
        .to_owned();
        SyncProcess { child, dir, admin }
    }

    /// `GET path` on the admin API: status and body (0 and "" when it does not answer).
    pub async fn get(&self, path: &str) -> (u16, String) {
        let probe = async {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let mut s = tokio::net::TcpStream::connect(&self.admin).await.ok()?;
            let req =
                format!("GET {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n");
            s.write_all(req.as_bytes()).await.ok()?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.ok()?;
            let text = String::from_utf8_lossy(&buf).into_owned();
            let status = text.get(9..12)?.parse().ok()?;
            let body = text
                .split_once("\r\n\r\n")
                .map(|(_, b)| b.to_owned())
                .unwrap_or_default();
            Some((status, body))
        };
        tokio::time::timeout(Duration::from_secs(2), probe)
            .await
            .ok()
            .flatten()
            .unwrap_or((0, String::new()))
    }

    /// `/state` as JSON (`null` when it does not answer).
    pub async fn state(&self) -> serde_json::Value {
        serde_json::from_str(&self.get("/state").await.1).unwrap_or(serde_json::Value::Null)
    }

    /// Waits until `/state` says `role`.
    pub async fn wait_role(&self, role: &str, within: Duration) -> serde_json::Value {
        wait_value(
            &format!("role {role}"),
            within,
            || self.state(),
            |s| s["role"] == role,
        )
        .await
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sync.log")).unwrap_or_default()
    }
}

/// The entries mirrored from ZooKeeper (`source = sync:zk`), by key.
pub async fn synced(etcd: &mut etcd_client::Client) -> BTreeMap<String, serde_json::Value> {
    let r = etcd
        .get(PREFIX, Some(GetOptions::new().with_prefix()))
        .await
        .expect("list etcd");
    r.kvs()
        .iter()
        .filter_map(|kv| {
            let v: serde_json::Value = serde_json::from_slice(kv.value()).ok()?;
            let key = kv.key_str().ok()?.to_owned();
            (v["endpoint"]["source"] == "sync:zk").then(|| (key, v["endpoint"].clone()))
        })
        .collect()
}

/// Waits until exactly `n` entries are mirrored; returns them.
pub async fn wait_synced(
    etcd: &mut etcd_client::Client,
    n: usize,
    within: Duration,
) -> BTreeMap<String, serde_json::Value> {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let s = synced(etcd).await;
        if s.len() == n {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} entries mirrored, not {n}",
            s.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A Dubbo provider URL of the `rest` protocol.
pub fn url(addr: impl std::fmt::Display, iface: &str, weight: u32) -> String {
    format!("rest://{addr}/{iface}?application=app&weight={weight}&version=1.0&side=provider")
}

/// Demo providers on `(ip, instance)` pairs, any port.
pub async fn providers(specs: impl Iterator<Item = (String, String)>) -> Vec<DemoProvider> {
    let mut out = Vec::new();
    for (ip, name) in specs {
        out.push(
            DemoProvider::start(format!("{ip}:0").parse().expect("ip"), &name)
                .await
                .expect("demo provider starts"),
        );
    }
    out
}
