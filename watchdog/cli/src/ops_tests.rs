//! The operator's commands on a directory store: rollback and undo, the undo refused once the
//! rules changed, two operators racing, and bad input refused before anything is written.

use std::time::Duration;

use detour_proto::{Endpoint, HostId, InstanceId, ServiceName};
use detour_registry::dir::{DirOptions, DirRegistry};
use detour_registry::gray::{Mesh, Origin, Rule};
use detour_registry::{Registry, RegistrySpec, store};

use super::*;

fn ops(dir: &std::path::Path) -> Ops {
    Ops::new(store::open(
        &RegistrySpec::Dir(dir.to_owned()),
        "/detour/v1",
        Duration::from_secs(1),
        Default::default(),
    ))
}

fn rule(id: &str, mesh: Mesh) -> Rule {
    Rule {
        id: id.into(),
        mesh: Some(mesh),
        sidecar: None,
        service: None,
        hosts: None,
        percent: None,
        origin: Origin::Gray,
    }
}

fn actor() -> Actor {
    Actor {
        user: "ops".into(),
        reason: "test".into(),
    }
}

fn request(service: Option<&str>) -> RollbackRequest {
    RollbackRequest {
        service: service.map(|s| ServiceName::new(s).unwrap()),
        host: None,
        version: false,
        reason: "why".into(),
        user: "ops".into(),
    }
}

/// A registry with host `web-1` offering `orders`.
async fn registry(dir: &std::path::Path) -> DirRegistry {
    let host = HostId::new("web-1").unwrap();
    let r = DirRegistry::open(dir, host.clone(), DirOptions::default())
        .await
        .unwrap();
    r.register(Endpoint::new(
        ServiceName::new("orders").unwrap(),
        InstanceId::new("web-1-orders").unwrap(),
        host,
        "127.0.0.1:8080".parse().unwrap(),
    ))
    .await
    .unwrap();
    r
}

#[tokio::test]
async fn a_rollback_is_recorded_and_undone_to_the_rules_it_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let _r = registry(dir.path()).await;
    let ops = ops(dir.path());
    ops.gray_set(rule("base", Mesh::Off), &actor())
        .await
        .unwrap();
    let before = ops.rules().await.unwrap().doc.unwrap().bytes;
    let rec = ops.rollback(request(Some("orders"))).await.unwrap();
    assert_eq!(
        rec.replaced.as_deref().map(str::as_bytes),
        Some(&before[..])
    );
    let set = ops.rules().await.unwrap().set;
    assert_eq!(set.rules.len(), 2);
    assert_eq!(set.rules[1].origin, Origin::Rollback);
    assert_eq!(set.rules[1].service.as_deref(), Some("orders"));
    let undone = ops.undo("ops2".into()).await.unwrap();
    assert_eq!(undone.undone.as_ref().unwrap().user, "ops2");
    assert_eq!(ops.rules().await.unwrap().doc.unwrap().bytes, before);
    let history = ops.history().await.unwrap();
    assert_eq!(history.len(), 1);
    assert!(history[0].undone.is_some());
    assert!(matches!(
        ops.undo("ops".into()).await,
        Err(OpsError::Refused(_))
    ));
    // Every change left an audit record, in order, with the documents before and after.
    let trail = crate::audit::list(ops.store()).await.unwrap();
    let commands: Vec<&str> = trail.iter().map(|r| r.command.as_str()).collect();
    assert_eq!(commands, ["gray set", "rollback", "rollback undo"]);
    assert!(trail[0].before.is_none());
    assert_eq!(
        trail[1].before.as_deref().map(str::as_bytes),
        Some(&before[..])
    );
    assert_eq!(trail[1].reason, "why");
    assert_eq!(
        trail[2].after.as_deref().map(str::as_bytes),
        Some(&before[..])
    );
    assert_eq!(trail[2].user, "ops2");
}

#[tokio::test]
async fn audit_records_cannot_be_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    let _r = registry(dir.path()).await;
    let ops = ops(dir.path());
    ops.gray_set(rule("a", Mesh::Off), &actor()).await.unwrap();
    let trail = crate::audit::list(ops.store()).await.unwrap();
    let key = format!("{}{}", crate::audit::AUDIT_PREFIX, trail[0].id);
    // A write that expects the record to be absent (the only kind the commands make) fails.
    let again = ops
        .store()
        .put(&key, b"{}".to_vec(), detour_registry::store::Expect::Absent)
        .await;
    assert!(again.is_err());
    assert_eq!(crate::audit::list(ops.store()).await.unwrap(), trail);
}

#[tokio::test]
async fn undo_is_refused_once_the_rules_changed() {
    let dir = tempfile::tempdir().unwrap();
    let _r = registry(dir.path()).await;
    let ops = ops(dir.path());
    ops.rollback(request(None)).await.unwrap();
    ops.gray_set(rule("later", Mesh::On), &actor())
        .await
        .unwrap();
    let after = ops.rules().await.unwrap().doc.unwrap().bytes;
    let e = ops.undo("ops".into()).await.unwrap_err();
    assert_eq!(e.exit_code(), 4, "{e}");
    assert!(e.to_string().contains("changed since rollback"), "{e}");
    assert_eq!(ops.rules().await.unwrap().doc.unwrap().bytes, after);
}

#[tokio::test]
async fn bad_input_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let _r = registry(dir.path()).await;
    let ops = ops(dir.path());
    let mut r = rule("x", Mesh::Off);
    r.percent = Some(101);
    assert_eq!(ops.gray_set(r, &actor()).await.unwrap_err().exit_code(), 2);
    let mut r = rule("x", Mesh::Off);
    r.service = Some("payments".into());
    assert!(matches!(
        ops.gray_set(r, &actor()).await,
        Err(OpsError::UnknownService(_))
    ));
    let mut req = request(None);
    req.host = Some(HostId::new("web-9").unwrap());
    assert!(matches!(
        ops.rollback(req).await,
        Err(OpsError::UnknownHost(_))
    ));
    let mut req = request(Some("orders"));
    req.version = true;
    assert!(matches!(ops.rollback(req).await, Err(OpsError::Refused(_))));
    assert!(ops.rules().await.unwrap().doc.is_none());
    assert!(ops.history().await.unwrap().is_empty());
    assert!(matches!(
        ops.gray_clear(Some("nope"), &actor()).await,
        Err(OpsError::Refused(_))
    ));
}

#[tokio::test]
async fn of_two_operators_writing_from_the_same_rules_one_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _r = registry(dir.path()).await;
    let ops = ops(dir.path());
    ops.gray_set(rule("a", Mesh::Off), &actor()).await.unwrap();
    // Both read the same document, then both write.
    let seen = ops.rules().await.unwrap();
    let mut mine = seen.set.clone();
    mine.rules.push(rule("mine", Mesh::On));
    let mut theirs = seen.set.clone();
    theirs.rules.push(rule("theirs", Mesh::On));
    ops.write_rules(&seen.doc, &theirs, Vec::new(), &actor(), "gray set")
        .await
        .unwrap();
    let e = ops
        .write_rules(&seen.doc, &mine, Vec::new(), &actor(), "gray set")
        .await
        .unwrap_err();
    assert_eq!(e.exit_code(), 4, "{e}");
    let now = ops.rules().await.unwrap().set;
    assert!(now.rules.iter().any(|r| r.id == "theirs"));
    assert!(!now.rules.iter().any(|r| r.id == "mine"));
}

#[tokio::test]
async fn an_unreachable_registry_is_told_apart_from_an_empty_one() {
    let dir = tempfile::tempdir().unwrap();
    let ops = ops(&dir.path().join("missing"));
    let e = ops.rules().await.unwrap_err();
    assert_eq!(e.exit_code(), 3, "{e}");
    let e = ops.rollback(request(None)).await.unwrap_err();
    assert_eq!(e.exit_code(), 3, "{e}");
}
