//! `detourctl etcd-roles host | operator | sync`: creates the least-privilege etcd role of a
//! host, of operators or of a registry-sync agent (`detour_registry::etcd_roles`) and
//! gives it to a user. Run with etcd's `root` credentials (`--etcd-user root`). Exit statuses:
//! 0 done, 2 bad input, 3 etcd unreachable or the change refused.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Subcommand};
use detour_proto::{HostId, InstanceId, ServiceName};
use detour_registry::RegistrySpec;
use detour_registry::etcd_roles::{self, Access, Grantee, RolePlan};

use crate::cli_ops::{RegistryArgs, spec_and_security};

/// `detourctl etcd-roles …`
#[derive(Debug, Args)]
pub struct EtcdRolesArgs {
    #[command(subcommand)]
    pub who: RolesFor,
    /// Print the role without changing etcd.
    #[arg(long, global = true)]
    pub dry_run: bool,
    #[command(flatten)]
    pub reg: RegistryArgs,
}

/// Whose role.
#[derive(Debug, Subcommand)]
pub enum RolesFor {
    /// A host's sidecar and watchdog: read everything, write only the host's status and its
    /// own registrations. Run again when the host's providers change.
    Host {
        /// The host (the sidecar's `host`).
        #[arg(long)]
        host: String,
        /// A provider it registers: SERVICE, or SERVICE/INSTANCE (the default instance is
        /// HOST-SERVICE, as the sidecar's). Repeat for each.
        #[arg(long)]
        provide: Vec<String>,
        /// The etcd user (default: detour-host-HOST).
        #[arg(long)]
        user: Option<String>,
        /// A file whose first line is the user's password.
        #[arg(long)]
        password_file: PathBuf,
    },
    /// Operators (`detourctl gray | policy | rollback`): read and write everything.
    Operator {
        /// The etcd user.
        #[arg(long)]
        user: String,
        /// A file whose first line is the user's password.
        #[arg(long)]
        password_file: PathBuf,
    },
    /// `detour-registry-sync`: read everything, write endpoints and its election.
    Sync {
        /// The etcd user.
        #[arg(long)]
        user: String,
        /// A file whose first line is the user's password.
        #[arg(long)]
        password_file: PathBuf,
    },
}

fn bad(msg: String) -> ExitCode {
    eprintln!("detourctl: {msg}");
    ExitCode::from(2)
}

/// `SERVICE` or `SERVICE/INSTANCE` of `host`.
fn provided(host: &HostId, text: &str) -> Result<(ServiceName, InstanceId), String> {
    let (service, instance) = match text.split_once('/') {
        Some((s, i)) => (s, i.to_owned()),
        None => (text, format!("{host}-{text}")),
    };
    let service = ServiceName::new(service).map_err(|e| format!("--provide {text:?}: {e}"))?;
    let instance = InstanceId::new(instance).map_err(|e| format!("--provide {text:?}: {e}"))?;
    Ok((service, instance))
}

/// Who, the user and the password file.
fn grantee(who: RolesFor) -> Result<(Grantee, String, PathBuf), String> {
    Ok(match who {
        RolesFor::Host {
            host,
            provide,
            user,
            password_file,
        } => {
            let host = HostId::new(host).map_err(|e| format!("--host: {e}"))?;
            let provides = provide
                .iter()
                .map(|p| provided(&host, p))
                .collect::<Result<Vec<_>, _>>()?;
            let user = user.unwrap_or_else(|| format!("detour-host-{host}"));
            (Grantee::Host { host, provides }, user, password_file)
        }
        RolesFor::Operator {
            user,
            password_file,
        } => (Grantee::Operator, user, password_file),
        RolesFor::Sync {
            user,
            password_file,
        } => (Grantee::Sync, user, password_file),
    })
}

fn password(file: &PathBuf) -> Result<String, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    match text.lines().next() {
        Some(p) if !p.is_empty() => Ok(p.to_owned()),
        _ => Err(format!("{}: empty password", file.display())),
    }
}

fn describe(plan: &RolePlan) -> String {
    let mut out = format!("role {}:\n", plan.role);
    for g in &plan.grants {
        let what = match g.access {
            Access::Read => "read ",
            Access::ReadWrite => "write",
        };
        let kind = if g.prefix { "every key under" } else { "key" };
        out.push_str(&format!("  {what} {kind} {}\n", g.key));
    }
    out
}

/// Runs `detourctl etcd-roles …`.
pub async fn run(args: EtcdRolesArgs) -> ExitCode {
    let (who, user, password_file) = match grantee(args.who) {
        Ok(g) => g,
        Err(e) => return bad(e),
    };
    let plan = etcd_roles::plan(&args.reg.etcd_prefix, &who);
    if args.dry_run {
        if args.reg.json {
            println!("{}", serde_json::json!({ "plan": plan, "user": user }));
        } else {
            print!("{}", describe(&plan));
        }
        return ExitCode::SUCCESS;
    }
    let password = match password(&password_file) {
        Ok(p) => p,
        Err(e) => return bad(e),
    };
    let (urls, security) = match spec_and_security(&args.reg) {
        Ok((RegistrySpec::Etcd(urls), s)) => (urls, s),
        Ok((RegistrySpec::Dir(_), _)) => {
            return bad("etcd-roles needs an etcd registry (--registry etcd:URL)".into());
        }
        Err(e) => return crate::cli_ops::fail(&e),
    };
    let timeout = Duration::from_millis(args.reg.timeout_ms);
    let applied = match etcd_roles::connect(&urls, &security, timeout).await {
        Ok(mut c) => etcd_roles::apply(&mut c, &plan, &user, &password).await,
        Err(e) => Err(e),
    };
    match applied {
        Ok(a) => {
            if args.reg.json {
                println!("{}", serde_json::json!({ "plan": plan, "applied": a }));
            } else {
                print!("{}", describe(&plan));
                let how = if a.user_created {
                    "created"
                } else {
                    "password replaced"
                };
                println!("user {} ({how}) has role {}", a.user, a.role);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("detourctl: etcd-roles: {e}");
            ExitCode::from(3)
        }
    }
}
