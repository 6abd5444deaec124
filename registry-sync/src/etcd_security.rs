//! How Detour's etcd clients prove who they are and protect the connection: TLS with the
//! cluster's CA (and, for `--client-cert-auth`, a client certificate), and etcd's user/password
//! authentication. The files are named in config and read once, at start.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The files as configured (`[registry_etcd]` of the sidecar, `[target]` of registry-sync).
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(default)]
pub struct EtcdSecurityFiles {
    /// The CA certificate(s) that signed the members' certificates (PEM); set: `https://` URLs.
    pub ca: String,
    /// A client certificate (PEM), for members started with `--client-cert-auth`.
    pub cert: String,
    /// Its private key (PEM).
    pub key: String,
    /// An etcd user (`etcdctl user add`), with `password_file`.
    pub user: String,
    /// A file holding the user's password (its first line).
    pub password_file: String,
}

/// What the etcd clients use.
#[derive(Clone, Default)]
pub struct EtcdSecurity {
    tls: Option<Tls>,
    credentials: Option<(String, String)>,
}

#[derive(Clone)]
struct Tls {
    ca: Vec<u8>,
    identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl std::fmt::Debug for EtcdSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSecurity")
            .field("tls", &self.tls.is_some())
            .field(
                "client_certificate",
                &self.tls.as_ref().is_some_and(|t| t.identity.is_some()),
            )
            .field("user", &self.credentials.as_ref().map(|c| &c.0))
            .finish()
    }
}

/// The most a certificate, key or password file may hold.
const MAX_FILE_BYTES: u64 = 1 << 20;

impl EtcdSecurityFiles {
    /// Checks the settings against `urls` (the members), pushing each problem onto `p` with
    /// keys under `section`.
    pub fn validate(&self, section: &str, urls: &[String], p: &mut Vec<String>) {
        if self.cert.is_empty() != self.key.is_empty() {
            p.push(format!(
                "{section}.cert and {section}.key: set both or neither"
            ));
        }
        if !self.cert.is_empty() && self.ca.is_empty() {
            p.push(format!("{section}.cert: needs {section}.ca (TLS)"));
        }
        if self.user.is_empty() != self.password_file.is_empty() {
            p.push(format!(
                "{section}.user and {section}.password_file: set both or neither"
            ));
        }
        let tls = !self.ca.is_empty();
        if let Some(bad) = urls.iter().find(|u| u.starts_with("https://") != tls) {
            p.push(if tls {
                format!("{section}.ca is set: the etcd URLs must be https:// ({bad:?} is not)")
            } else {
                format!("{bad:?} is https://: set {section}.ca to the CA of the etcd members")
            });
        }
    }

    /// Reads the files; paths are relative to `base` unless absolute.
    pub fn load(&self, base: &Path) -> Result<EtcdSecurity, String> {
        let path = |s: &str| {
            let p = PathBuf::from(s);
            if p.is_absolute() { p } else { base.join(p) }
        };
        let read = |s: &str| -> Result<Vec<u8>, String> {
            let p = path(s);
            let meta = std::fs::metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
            if !meta.is_file() || meta.len() > MAX_FILE_BYTES {
                return Err(format!(
                    "{}: not a regular file of at most {MAX_FILE_BYTES} bytes",
                    p.display()
                ));
            }
            std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))
        };
        let tls = if self.ca.is_empty() {
            None
        } else {
            let identity = if self.cert.is_empty() {
                None
            } else {
                Some((read(&self.cert)?, read(&self.key)?))
            };
            Some(Tls {
                ca: read(&self.ca)?,
                identity,
            })
        };
        let credentials = if self.user.is_empty() {
            None
        } else {
            let bytes = read(&self.password_file)?;
            let text = String::from_utf8(bytes)
                .map_err(|_| format!("{}: the password is not UTF-8", self.password_file))?;
            let password = text.lines().next().unwrap_or("").to_owned();
            if password.is_empty() {
                return Err(format!("{}: empty password", self.password_file));
            }
            Some((self.user.clone(), password))
        };
        Ok(EtcdSecurity { tls, credentials })
    }
}

impl EtcdSecurity {
    /// Adds TLS and credentials to `opts`.
    pub(crate) fn apply(
        &self,
        mut opts: etcd_client::ConnectOptions,
    ) -> etcd_client::ConnectOptions {
        if let Some(tls) = &self.tls {
            let mut t = etcd_client::TlsOptions::new()
                .ca_certificate(etcd_client::Certificate::from_pem(&tls.ca));
            if let Some((cert, key)) = &tls.identity {
                t = t.identity(etcd_client::Identity::from_pem(cert, key));
            }
            opts = opts.with_tls(t);
        }
        if let Some((user, password)) = &self.credentials {
            opts = opts.with_user(user.clone(), password.clone());
        }
        opts
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn settings_are_checked_together() {
        let urls = vec!["http://127.0.0.1:2379".to_owned()];
        let mut p = Vec::new();
        EtcdSecurityFiles {
            cert: "c.pem".into(),
            user: "detour".into(),
            ..Default::default()
        }
        .validate("registry_etcd", &urls, &mut p);
        let all = p.join("\n");
        assert!(
            all.contains("registry_etcd.cert and registry_etcd.key"),
            "{all}"
        );
        assert!(all.contains("needs registry_etcd.ca"), "{all}");
        assert!(all.contains("password_file"), "{all}");
        let mut p = Vec::new();
        EtcdSecurityFiles::default().validate("t", &["https://127.0.0.1:2379".to_owned()], &mut p);
        assert!(p[0].contains("set t.ca"), "{p:?}");
    }

    #[test]
    fn files_are_read_and_the_password_is_its_first_line() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pw"), "s3cret\nignored\n").unwrap();
        let files = EtcdSecurityFiles {
            user: "detour".into(),
            password_file: "pw".into(),
            ..Default::default()
        };
        let s = files.load(dir.path()).unwrap();
        assert_eq!(s.credentials.as_ref().unwrap().1, "s3cret");
        assert!(!format!("{s:?}").contains("s3cret"), "Debug never shows it");
        let missing = EtcdSecurityFiles {
            ca: "nope.pem".into(),
            ..Default::default()
        };
        assert!(missing.load(dir.path()).unwrap_err().contains("nope.pem"));
    }
}
