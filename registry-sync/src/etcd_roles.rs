//! Least-privilege etcd roles for Detour's clients: what each kind of client may read and
//! write under the key prefix, as a plan (pure), and applying a plan to an etcd with
//! authentication (`detourctl etcd-roles`).
//!
//! - A **host** (its sidecar and watchdog) reads the whole prefix and writes only its own keys:
//!   `{prefix}/hosts/{host}` and `{prefix}/services/{service}/{instance}` for each provider it
//!   registers (exact keys: a host cannot publish an endpoint, a status or a PA address in
//!   another host's name, nor write the gray rules, the policy or the audit trail).
//! - An **operator** (`detourctl gray | policy | rollback`) reads and writes the whole prefix.
//! - A **sync** agent (`detour-registry-sync`) reads the whole prefix and writes the endpoints
//!   (`{prefix}/services/`) and its election keys (`{prefix}/sync/`).

use detour_proto::{HostId, InstanceId, ServiceName};
use etcd_client::{Client, Permission};

/// Who a role is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grantee {
    /// One host, with the providers it registers.
    Host {
        /// The host.
        host: HostId,
        /// Its registrations: service and instance.
        provides: Vec<(ServiceName, InstanceId)>,
    },
    /// Operators.
    Operator,
    /// A registry-sync agent.
    Sync,
}

/// Read, or read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

/// One permission: a key, or every key under a prefix.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Grant {
    /// The key, or the prefix.
    pub key: String,
    /// Whether `key` is a prefix.
    pub prefix: bool,
    /// What may be done.
    pub access: Access,
}

/// A role and its permissions.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RolePlan {
    /// The role's name (`detour-host-{host}`, `detour-operator`, `detour-sync`).
    pub role: String,
    /// Its permissions, replacing any it had.
    pub grants: Vec<Grant>,
}

/// The role for `who` under `prefix` (as configured, without the trailing `/`).
pub fn plan(prefix: &str, who: &Grantee) -> RolePlan {
    let read_all = Grant {
        key: format!("{prefix}/"),
        prefix: true,
        access: Access::Read,
    };
    match who {
        Grantee::Host { host, provides } => {
            let mut grants = vec![
                read_all,
                Grant {
                    key: format!("{prefix}/hosts/{host}"),
                    prefix: false,
                    access: Access::ReadWrite,
                },
            ];
            grants.extend(provides.iter().map(|(service, instance)| Grant {
                key: format!("{prefix}/services/{service}/{instance}"),
                prefix: false,
                access: Access::ReadWrite,
            }));
            RolePlan {
                role: format!("detour-host-{host}"),
                grants,
            }
        }
        Grantee::Operator => RolePlan {
            role: "detour-operator".into(),
            grants: vec![Grant {
                access: Access::ReadWrite,
                ..read_all
            }],
        },
        Grantee::Sync => RolePlan {
            role: "detour-sync".into(),
            grants: vec![
                read_all,
                Grant {
                    key: format!("{prefix}/services/"),
                    prefix: true,
                    access: Access::ReadWrite,
                },
                Grant {
                    key: format!("{prefix}/sync/"),
                    prefix: true,
                    access: Access::ReadWrite,
                },
            ],
        },
    }
}

/// A client of the etcd members `urls`, with `security` (TLS, and the user managing roles).
pub async fn connect(
    urls: &[String],
    security: &crate::etcd_security::EtcdSecurity,
    timeout: std::time::Duration,
) -> Result<Client, etcd_client::Error> {
    let opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(timeout)
        .with_timeout(timeout);
    Client::connect(urls, Some(security.apply(opts))).await
}

/// What applying a plan did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Applied {
    /// The role.
    pub role: String,
    /// The user given the role.
    pub user: String,
    /// Whether the user was created (rather than given a new password).
    pub user_created: bool,
}

/// Creates (or replaces) the role of `plan` and gives it to `user` with `password`, created if
/// absent: re-running it after a host's providers change updates its role in place. Needs a
/// client with the right to manage users and roles (etcd's `root`).
pub async fn apply(
    client: &mut Client,
    plan: &RolePlan,
    user: &str,
    password: &str,
) -> Result<Applied, etcd_client::Error> {
    // Replace, not merge: a removed provider's key must stop being writable.
    if client.role_get(plan.role.as_str()).await.is_ok() {
        client.role_delete(plan.role.as_str()).await?;
    }
    client.role_add(plan.role.as_str()).await?;
    for g in &plan.grants {
        let p = match g.access {
            Access::Read => Permission::read(g.key.as_str()),
            Access::ReadWrite => Permission::read_write(g.key.as_str()),
        };
        let p = if g.prefix { p.with_prefix() } else { p };
        client.role_grant_permission(plan.role.as_str(), p).await?;
    }
    let user_created = match client.user_get(user).await {
        Ok(_) => {
            client.user_change_password(user, password).await?;
            false
        }
        Err(_) => {
            client.user_add(user, password, None).await?;
            true
        }
    };
    client.user_grant_role(user, plan.role.as_str()).await?;
    Ok(Applied {
        role: plan.role.clone(),
        user: user.to_owned(),
        user_created,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn a_host_writes_only_its_own_keys() {
        let who = Grantee::Host {
            host: HostId::new("h2").unwrap(),
            provides: vec![(
                ServiceName::new("hello").unwrap(),
                InstanceId::new("h2-hello").unwrap(),
            )],
        };
        let p = plan("/detour/v1", &who);
        assert_eq!(p.role, "detour-host-h2");
        let writes: Vec<(&str, bool)> = p
            .grants
            .iter()
            .filter(|g| g.access == Access::ReadWrite)
            .map(|g| (g.key.as_str(), g.prefix))
            .collect();
        assert_eq!(
            writes,
            [
                ("/detour/v1/hosts/h2", false),
                ("/detour/v1/services/hello/h2-hello", false)
            ]
        );
        assert!(p.grants.contains(&Grant {
            key: "/detour/v1/".into(),
            prefix: true,
            access: Access::Read
        }));
    }

    #[test]
    fn operators_write_everything_and_sync_only_endpoints_and_elections() {
        let op = plan("/p", &Grantee::Operator);
        assert_eq!(
            op.grants,
            [Grant {
                key: "/p/".into(),
                prefix: true,
                access: Access::ReadWrite
            }]
        );
        let sync = plan("/p", &Grantee::Sync);
        let writes: Vec<&str> = sync
            .grants
            .iter()
            .filter(|g| g.access == Access::ReadWrite)
            .map(|g| g.key.as_str())
            .collect();
        assert_eq!(writes, ["/p/services/", "/p/sync/"]);
    }
}
