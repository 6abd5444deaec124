//! The one writer of a sidecar's config for tests, chaos scenarios, benchmarks and the demo
//! (`detourctl sidecar-config` for the scripts): a host on one loopback address, every
//! listener on port 0, the outbound Unix socket, the registry, mutual TLS from a directory of
//! certificates (or plaintext), providers, and extra sections as each caller needs.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// The `[tls]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TlsFiles {
    /// `cert.pem`, `key.pem` and `bundle.pem` in `dir` (as [`crate::certs`] writes them), in
    /// `trust_domain` when set, re-read every `reload_ms` when set.
    Dir {
        /// The host's certificate directory.
        dir: PathBuf,
        /// `trust_domain`, when not the default.
        trust_domain: Option<String>,
        /// `reload_ms`, when not the default.
        reload_ms: Option<u64>,
    },
    /// `mode = "plaintext"`.
    Plaintext,
    /// No `[tls]` section (the caller's extra sections have one).
    Omitted,
}

/// A sidecar config, built up and rendered once.
#[derive(Debug, Clone)]
pub struct SidecarToml {
    host: String,
    ip: String,
    run_dir: PathBuf,
    state_dir: Option<PathBuf>,
    registry: String,
    catalog_cache: Option<String>,
    zone: Option<String>,
    unix: String,
    tls: TlsFiles,
    registry_dir: String,
    provides: Vec<(String, String, Option<String>)>,
    extra: String,
}

impl SidecarToml {
    /// Host `host` with every listener on `ip` (port 0), its run directory `run_dir`, on the
    /// directory registry `dir:<run_dir>/../registry`, plaintext until [`SidecarToml::tls`].
    pub fn new(host: &str, ip: &str, run_dir: &Path) -> SidecarToml {
        let registry = run_dir
            .parent()
            .map(|p| format!("dir:{}", p.join("registry").display()))
            .unwrap_or_else(|| "dir:registry".to_owned());
        SidecarToml {
            host: host.to_owned(),
            ip: ip.to_owned(),
            run_dir: run_dir.to_owned(),
            state_dir: None,
            registry,
            catalog_cache: None,
            zone: None,
            unix: "outbound.sock".to_owned(),
            tls: TlsFiles::Plaintext,
            registry_dir: String::new(),
            provides: Vec::new(),
            extra: String::new(),
        }
    }

    /// The host's zone (top-level `zone`).
    pub fn zone(mut self, zone: &str) -> Self {
        self.zone = Some(zone.to_owned());
        self
    }

    /// The registry (`dir:PATH` or `etcd:URL,…`).
    pub fn registry(mut self, spec: &str) -> Self {
        self.registry = spec.to_owned();
        self
    }

    /// The state directory.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_owned());
        self
    }

    /// The catalog's disk cache (`""`: none).
    pub fn catalog_cache(mut self, path: &str) -> Self {
        self.catalog_cache = Some(path.to_owned());
        self
    }

    /// The outbound Unix socket (`""`: none).
    pub fn unix(mut self, path: &str) -> Self {
        self.unix = path.to_owned();
        self
    }

    /// The `[tls]` section.
    pub fn tls(mut self, tls: TlsFiles) -> Self {
        self.tls = tls;
        self
    }

    /// Lines (`key = value`) of `[registry_dir]`.
    pub fn registry_dir(mut self, lines: &str) -> Self {
        self.registry_dir.push_str(lines.trim());
        self.registry_dir.push('\n');
        self
    }

    /// A `[[provide]]` entry: `service` at `address`, in `protocol` (`None`: the default).
    pub fn provide(mut self, service: &str, address: &str, protocol: Option<&str>) -> Self {
        self.provides.push((
            service.to_owned(),
            address.to_owned(),
            protocol.map(str::to_owned),
        ));
        self
    }

    /// TOML appended as is (sections of its own).
    pub fn extra(mut self, text: &str) -> Self {
        self.extra.push_str(text);
        self.extra.push('\n');
        self
    }

    /// The config text.
    pub fn render(&self) -> String {
        let mut t = String::new();
        let (host, ip) = (&self.host, &self.ip);
        let _ = writeln!(t, "host = {}", quote(host));
        let _ = writeln!(
            t,
            "run_dir = {}",
            quote(&self.run_dir.display().to_string())
        );
        if let Some(s) = &self.state_dir {
            let _ = writeln!(t, "state_dir = {}", quote(&s.display().to_string()));
        }
        let _ = writeln!(t, "registry = {}", quote(&self.registry));
        if let Some(z) = &self.zone {
            let _ = writeln!(t, "zone = {}", quote(z));
        }
        if let Some(c) = &self.catalog_cache {
            let _ = writeln!(t, "catalog_cache = {}", quote(c));
        }
        let _ = writeln!(
            t,
            "[outbound]\nlisten = \"{ip}:0\"\nunix = {}",
            quote(&self.unix)
        );
        let _ = writeln!(
            t,
            "[inbound]\nlisten = \"{ip}:0\"\n[admin]\nlisten = \"{ip}:0\""
        );
        match &self.tls {
            TlsFiles::Dir {
                dir,
                trust_domain,
                reload_ms,
            } => {
                t.push_str("[tls]\n");
                if let Some(d) = trust_domain {
                    let _ = writeln!(t, "trust_domain = {}", quote(d));
                }
                for (key, file) in [
                    ("cert", "cert.pem"),
                    ("key", "key.pem"),
                    ("bundle", "bundle.pem"),
                ] {
                    let path = dir.join(file).display().to_string();
                    let _ = writeln!(t, "{key} = {}", quote(&path));
                }
                if let Some(ms) = reload_ms {
                    let _ = writeln!(t, "reload_ms = {ms}");
                }
            }
            TlsFiles::Plaintext => t.push_str("[tls]\nmode = \"plaintext\"\n"),
            TlsFiles::Omitted => {}
        }
        if !self.registry_dir.trim().is_empty() {
            let _ = write!(t, "[registry_dir]\n{}", self.registry_dir);
        }
        for (service, address, protocol) in &self.provides {
            let _ = writeln!(
                t,
                "[[provide]]\nservice = {}\naddress = {}",
                quote(service),
                quote(address)
            );
            if let Some(p) = protocol {
                let _ = writeln!(t, "protocol = {}", quote(p));
            }
        }
        t.push_str(&self.extra);
        t
    }
}

/// `s` as a TOML basic string.
fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_config_the_sidecar_accepts() {
        let text = SidecarToml::new("h1", "127.0.0.1", Path::new("/tmp/x/h1"))
            .tls(TlsFiles::Dir {
                dir: PathBuf::from("/tmp/x/pki/h1"),
                trust_domain: Some("detour.local".into()),
                reload_ms: Some(200),
            })
            .registry_dir("poll_ms = 50")
            .provide("hello", "127.0.0.1:8080", Some("http2"))
            .extra("[proxy]\nrequest_timeout_ms = 5000")
            .render();
        let value: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert_eq!(value["host"].as_str(), Some("h1"));
        assert_eq!(value["registry"].as_str(), Some("dir:/tmp/x/registry"));
        assert_eq!(
            value["tls"]["cert"].as_str(),
            Some("/tmp/x/pki/h1/cert.pem")
        );
        assert_eq!(value["registry_dir"]["poll_ms"].as_integer(), Some(50));
        assert_eq!(value["provide"][0]["protocol"].as_str(), Some("http2"));
        assert_eq!(
            value["proxy"]["request_timeout_ms"].as_integer(),
            Some(5000)
        );
    }

    #[test]
    fn a_path_with_quotes_stays_one_string() {
        let text = SidecarToml::new("h1", "127.0.0.1", Path::new("/tmp/a\"b/h1")).render();
        let value: toml::Value = toml::from_str(&text).expect("valid TOML");
        assert_eq!(value["run_dir"].as_str(), Some("/tmp/a\"b/h1"));
    }
}
