//! `detourctl gray | rollback | status`: the operator's commands on the registry (the logic is
//! `ops.rs`), with their arguments, their text or `--json` output, and their exit statuses:
//! 0 done, 2 bad input (a malformed rule, an unknown service or host), 3 registry unreachable,
//! 4 a concurrent change or nothing to do.

use detour_registry::etcd_security::{EtcdSecurity, EtcdSecurityFiles};
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use detour_proto::{HostId, ServiceName};
use detour_registry::RegistrySpec;
use detour_registry::gray::{Mesh, Origin, Rule, SidecarVersion};

use crate::audit::Actor;
use crate::ops::{self, Ops, OpsError, RollbackRequest};
use crate::ops_view;

/// Where the registry is.
#[derive(Debug, Clone, Args)]
pub struct RegistryArgs {
    /// The registry: `dir:PATH` or `etcd:http://HOST:PORT[,http://HOST:PORT…]`.
    #[arg(
        long,
        global = true,
        env = "DETOUR_REGISTRY",
        default_value = "dir:/var/lib/detour/registry"
    )]
    pub registry: String,
    /// Key prefix in etcd.
    #[arg(long, global = true, default_value = "/detour/v1")]
    pub etcd_prefix: String,
    /// Time one registry request may take, in ms.
    #[arg(long, global = true, default_value_t = 2000)]
    pub timeout_ms: u64,
    /// The etcd members' CA (PEM): TLS, with https:// URLs.
    #[arg(long, global = true, env = "DETOUR_ETCD_CA", default_value = "")]
    pub etcd_ca: String,
    /// A client certificate (PEM) for etcd.
    #[arg(long, global = true, env = "DETOUR_ETCD_CERT", default_value = "")]
    pub etcd_cert: String,
    /// Its private key (PEM).
    #[arg(long, global = true, env = "DETOUR_ETCD_KEY", default_value = "")]
    pub etcd_key: String,
    /// An etcd user (with --etcd-password-file).
    #[arg(long, global = true, env = "DETOUR_ETCD_USER", default_value = "")]
    pub etcd_user: String,
    /// A file whose first line is the etcd user's password.
    #[arg(
        long,
        global = true,
        env = "DETOUR_ETCD_PASSWORD_FILE",
        default_value = ""
    )]
    pub etcd_password_file: String,
    /// Print JSON (for scripts).
    #[arg(long, global = true)]
    pub json: bool,
}

/// `detourctl gray …`
#[derive(Debug, Subcommand)]
pub enum GrayCmd {
    /// Adds a rule, or replaces the rule with the same id.
    Set {
        /// The rule's id.
        #[arg(long)]
        id: String,
        /// Mesh on or off for the scope.
        #[arg(long, value_parser = ["on", "off"], conflicts_with = "sidecar_binary")]
        mesh: Option<String>,
        /// The sidecar binary the hosts in scope run (a version rule): a file of each host
        /// watchdog's `upgrade.binaries_dir`, by name or absolute path.
        #[arg(long)]
        sidecar_binary: Option<String>,
        /// The version label of that binary.
        #[arg(long, requires = "sidecar_binary")]
        sidecar_version: Option<String>,
        /// The binary's sha256 (a watchdog runs nothing else); default: computed from the file
        /// when it exists where detourctl runs.
        #[arg(long, requires = "sidecar_binary")]
        sidecar_sha256: Option<String>,
        /// The services it covers (a name or a glob; default: every service).
        #[arg(long)]
        service: Option<String>,
        /// The hosts it covers (a name or a glob; default: every host).
        #[arg(long, conflicts_with = "percent")]
        hosts: Option<String>,
        /// The share of hosts it covers, 0–100 (always the same hosts).
        #[arg(long)]
        percent: Option<u8>,
        /// Why (kept in the audit record).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Lists the rules in force.
    List,
    /// Removes a rule, or every rule.
    Clear {
        /// The rule's id.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<String>,
        /// Every rule.
        #[arg(long)]
        all: bool,
        /// Why (kept in the audit record).
        #[arg(long, default_value = "")]
        reason: String,
    },
}

/// `detourctl rollback …`
#[derive(Debug, Args)]
pub struct RollbackArgs {
    /// Only this service (default: every service).
    #[arg(long)]
    pub service: Option<String>,
    /// Only this host (default: every host).
    #[arg(long)]
    pub host: Option<String>,
    /// Why (recorded).
    #[arg(long, default_value = "")]
    pub reason: String,
    /// Send the sidecars in scope back to the binary they ran before a version rule moved them.
    #[arg(long, conflicts_with_all = ["undo", "history"])]
    pub version: bool,
    /// Restore the rules the last rollback replaced.
    #[arg(long, conflicts_with_all = ["service", "host", "history"])]
    pub undo: bool,
    /// List every rollback.
    #[arg(long, conflicts_with_all = ["service", "host"])]
    pub history: bool,
    #[command(flatten)]
    pub reg: RegistryArgs,
}

pub(crate) fn open(reg: &RegistryArgs) -> Result<Ops, OpsError> {
    let (spec, security) = spec_and_security(reg)?;
    Ok(Ops::new(detour_registry::store::open(
        &spec,
        &reg.etcd_prefix,
        Duration::from_millis(reg.timeout_ms),
        security,
    )))
}

/// The registry of `reg`, and the TLS and credentials of its etcd (none for a directory).
pub(crate) fn spec_and_security(
    reg: &RegistryArgs,
) -> Result<(RegistrySpec, EtcdSecurity), OpsError> {
    let spec: RegistrySpec = reg
        .registry
        .parse()
        .map_err(|e: detour_registry::RegistryError| OpsError::Malformed(e.to_string()))?;
    let files = EtcdSecurityFiles {
        ca: reg.etcd_ca.clone(),
        cert: reg.etcd_cert.clone(),
        key: reg.etcd_key.clone(),
        user: reg.etcd_user.clone(),
        password_file: reg.etcd_password_file.clone(),
    };
    let security = match &spec {
        RegistrySpec::Etcd(urls) => {
            let mut problems = Vec::new();
            files.validate("--etcd", urls, &mut problems);
            if !problems.is_empty() {
                return Err(OpsError::Malformed(problems.join("; ")));
            }
            files
                .load(std::path::Path::new("."))
                .map_err(OpsError::Malformed)?
        }
        RegistrySpec::Dir(_) => EtcdSecurity::default(),
    };
    Ok((spec, security))
}

pub(crate) fn fail(e: &OpsError) -> ExitCode {
    // An error may quote the registry (a malformed document, a refused rule).
    eprintln!("detourctl: {}", ops_view::terminal_safe(&e.to_string()));
    ExitCode::from(e.exit_code())
}

/// Runs `detourctl gray CMD`.
pub async fn gray(cmd: GrayCmd, reg: RegistryArgs) -> ExitCode {
    let ops = match open(&reg) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let percent = match &cmd {
        GrayCmd::Set { percent, .. } => *percent,
        _ => None,
    };
    let result = match cmd {
        GrayCmd::Set {
            id,
            mesh,
            sidecar_binary,
            sidecar_version,
            sidecar_sha256,
            service,
            hosts,
            percent,
            reason,
        } => {
            let sha256 = match binary_sha256(sidecar_binary.as_deref(), sidecar_sha256) {
                Ok(s) => s,
                Err(e) => return fail(&e),
            };
            let rule = Rule {
                id,
                mesh: mesh.map(|m| if m == "on" { Mesh::On } else { Mesh::Off }),
                sidecar: sidecar_binary.map(|binary| SidecarVersion {
                    binary,
                    sha256,
                    version: sidecar_version.unwrap_or_default(),
                    baseline: false,
                }),
                service,
                hosts,
                percent,
                origin: Origin::Gray,
            };
            ops.gray_set(rule, &Actor::current(reason)).await
        }
        GrayCmd::Clear { id, reason, .. } => {
            ops.gray_clear(id.as_deref(), &Actor::current(reason)).await
        }
        GrayCmd::List => return gray_list(&ops, reg.json).await,
    };
    match result {
        Ok(set) => {
            if reg.json {
                println!("{}", ops_view::json(&set));
            } else {
                print!("{}", ops_view::rules_table(&set));
                // A share is taken by host hash: say which live hosts it covers now.
                if let Some(p) = percent
                    && let Ok((covered, total)) = ops.sample(p).await
                {
                    println!(
                        "{p}% covers {} of {total} live hosts now: {}",
                        covered.len(),
                        if covered.is_empty() {
                            "-".into()
                        } else {
                            covered.join(", ")
                        }
                    );
                }
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// The sha256 a version rule names: the one given, else the named binary's own (printed).
fn binary_sha256(binary: Option<&str>, given: Option<String>) -> Result<String, OpsError> {
    match (binary, given) {
        (_, Some(s)) => Ok(s.to_ascii_lowercase()),
        (Some(b), None) => match detour_watchdog::binaries::sha256_of(std::path::Path::new(b)) {
            Ok(s) => {
                eprintln!("sha256 of {b}: {s}");
                Ok(s)
            }
            Err(e) => Err(OpsError::Malformed(format!(
                "--sidecar-sha256 is needed: {e}"
            ))),
        },
        (None, None) => Ok(String::new()),
    }
}

/// `detourctl gray list`: the rules, and those left out as malformed.
async fn gray_list(ops: &Ops, json: bool) -> ExitCode {
    let r = match ops.rules().await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if json {
        let malformed = r.malformed.iter().map(ToString::to_string).collect();
        println!(
            "{}",
            ops_view::json(&ops_view::RulesJson {
                rules: &r.set.rules,
                malformed,
            })
        );
    } else {
        print!("{}", ops_view::rules_table(&r.set));
        for m in &r.malformed {
            println!(
                "malformed (left out): {}",
                ops_view::printable(&m.to_string())
            );
        }
    }
    ExitCode::SUCCESS
}

/// Runs `detourctl rollback …`.
pub async fn rollback(a: RollbackArgs) -> ExitCode {
    let ops = match open(&a.reg) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    if a.history {
        return match ops.history().await {
            Ok(h) if a.reg.json => {
                println!("{}", ops_view::json(&h));
                ExitCode::SUCCESS
            }
            Ok(h) => {
                for r in &h {
                    println!("{}", ops_view::record_line(r));
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    let outcome = if a.undo {
        ops.undo(ops::os_user()).await
    } else {
        let service = match a.service.map(ServiceName::new).transpose() {
            Ok(s) => s,
            Err(e) => return fail(&OpsError::Malformed(e.to_string())),
        };
        let host = match a.host.map(HostId::new).transpose() {
            Ok(h) => h,
            Err(e) => return fail(&OpsError::Malformed(e.to_string())),
        };
        ops.rollback(RollbackRequest {
            service,
            host,
            version: a.version,
            reason: a.reason,
            user: ops::os_user(),
        })
        .await
    };
    match outcome {
        Ok(r) if a.reg.json => {
            println!("{}", ops_view::json(&r));
            ExitCode::SUCCESS
        }
        Ok(r) => {
            let what = if a.undo { "undone" } else { "rolled back" };
            println!("{what}: {}", ops_view::record_line(&r));
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    }
}

/// Runs `detourctl history`: every audit record (gray, rollback, policy changes), oldest first;
/// `limit` keeps only the newest that many.
pub async fn history(reg: RegistryArgs, limit: Option<usize>) -> ExitCode {
    let ops = match open(&reg) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let mut trail = match crate::audit::list(ops.store()).await {
        Ok(t) => t,
        Err(e) => return fail(&e),
    };
    if let Some(n) = limit {
        let skip = trail.len().saturating_sub(n);
        trail.drain(..skip);
    }
    if reg.json {
        println!("{}", ops_view::json(&trail));
    } else if trail.is_empty() {
        println!("no changes recorded");
    } else {
        for r in &trail {
            println!("{}", crate::audit::line(r));
        }
    }
    ExitCode::SUCCESS
}

/// Runs `detourctl status`; `admin` (a local sidecar's admin address) adds its protection view.
pub async fn status(reg: RegistryArgs, admin: Option<std::net::SocketAddr>) -> ExitCode {
    let ops = match open(&reg) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let mut report = match ops.status().await {
        Ok(r) => r,
        Err(e) => return fail(&e),
    };
    if let Some(admin) = admin
        && let Ok((status, text)) = detour_kit::watched::call(
            &detour_core::Dial::Tcp(admin),
            http::Method::GET,
            "/state",
            None,
            Duration::from_secs(2),
        )
        .await
        && status == http::StatusCode::OK
        && let Ok(state) = serde_json::from_str::<serde_json::Value>(&text)
    {
        for s in &mut report.services {
            s.protected = state["services"][&s.service]["protected"].as_bool();
        }
    }
    if reg.json {
        println!("{}", ops_view::json(&report));
    } else {
        print!("{}", ops_view::terminal_safe(&report.table()));
    }
    ExitCode::SUCCESS
}
