//! A real etcd member that takes only TLS clients with a certificate of a test CA
//! (`--client-cert-auth`), on loopback ports chosen at run time; its files and the client's
//! are written under the test's directory. Killed by its PID when the guard drops.

use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_kit::certs::Authority;
use detour_kit::process::ChildGuard;

use crate::etcd::{alone, free_port, member_command, spawn_member};

/// A running single-member etcd over TLS.
pub struct SecureEtcd {
    /// The process.
    pub child: ChildGuard,
    /// Client URL (`https://127.0.0.1:PORT`).
    pub url: String,
    /// The CA certificate (PEM file).
    pub ca: PathBuf,
    /// A client certificate and key the member accepts (PEM files).
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

impl SecureEtcd {
    /// Starts a member under `dir` with a server certificate from `ca`; waits until a client
    /// with the client certificate gets its status.
    pub async fn start(dir: &Path, ca: &Authority) -> SecureEtcd {
        let files = dir.join("etcd-tls");
        std::fs::create_dir_all(&files).expect("etcd-tls directory");
        let ip = "127.0.0.1".parse().expect("ip");
        let server = ca
            .issue_server(ip, Duration::from_secs(3600))
            .expect("server certificate");
        let client = ca
            .issue_server(ip, Duration::from_secs(3600))
            .expect("client certificate");
        let write = |name: &str, text: &str| {
            let p = files.join(name);
            std::fs::write(&p, text).expect("write a PEM file");
            p
        };
        let ca_file = write("ca.pem", ca.bundle_pem());
        let server_cert = write("server.pem", &server.cert_pem);
        let server_key = write("server-key.pem", &server.key_pem);
        let client_cert = write("client.pem", &client.cert_pem);
        let client_key = write("client-key.pem", &client.key_pem);
        let (client_port, peer_port) = (free_port(), free_port());
        let url = format!("https://127.0.0.1:{client_port}");
        let (peer, cluster) = alone("s1", peer_port);
        let data = dir.join("etcd-tls-data");
        let mut cmd = member_command("s1", &data, &url, &peer, &cluster);
        cmd.arg("--cert-file")
            .arg(&server_cert)
            .arg("--key-file")
            .arg(&server_key)
            .arg("--trusted-ca-file")
            .arg(&ca_file)
            .arg("--client-cert-auth");
        let child = spawn_member(cmd, "etcd-tls");
        let etcd = SecureEtcd {
            child,
            url,
            ca: ca_file,
            client_cert,
            client_key,
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut c) = etcd.client(None).await
                && c.status().await.is_ok()
            {
                return etcd;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "etcd at {} not healthy in 20 s",
                etcd.url
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client with the client certificate, and `user` (name, password) when given.
    pub async fn client(
        &self,
        user: Option<(&str, &str)>,
    ) -> Result<etcd_client::Client, etcd_client::Error> {
        let read = |p: &Path| std::fs::read(p).expect("read a PEM file");
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)))
            .identity(etcd_client::Identity::from_pem(
                read(&self.client_cert),
                read(&self.client_key),
            ));
        let mut opts = etcd_client::ConnectOptions::new()
            .with_tls(tls)
            .with_connect_timeout(Duration::from_secs(2));
        if let Some((u, p)) = user {
            opts = opts.with_user(u, p);
        }
        etcd_client::Client::connect([self.url.as_str()], Some(opts)).await
    }

    /// Turns on etcd's authentication with user `root` and `password`.
    pub async fn enable_auth(&self, password: &str) {
        let mut c = self.client(None).await.expect("connect to etcd");
        let _ = c.role_add("root").await; // exists already on some versions
        c.user_add("root", password, None).await.expect("user add");
        c.user_grant_role("root", "root")
            .await
            .expect("grant the root role");
        c.auth_enable().await.expect("auth enable");
    }
}
