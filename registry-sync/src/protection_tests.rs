//! Self-protection decisions, case by case.

use super::*;
use detour_proto::{HostId, ServiceName};

fn ep(i: usize) -> Endpoint {
    Endpoint::new(
        ServiceName::new("s").unwrap(),
        InstanceId::new(format!("i{i}")).unwrap(),
        HostId::new(format!("h{i}")).unwrap(),
        format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
    )
}

fn set(ids: &[usize]) -> Arc<EndpointSet> {
    Arc::new(EndpointSet::known(ids.iter().map(|i| ep(*i)).collect()))
}

fn ids(s: &EndpointSet) -> Vec<String> {
    s.endpoints.iter().map(|e| e.instance.to_string()).collect()
}

fn t(ms: u64) -> Instant {
    use std::sync::OnceLock;
    static T0: OnceLock<Instant> = OnceLock::new();
    *T0.get_or_init(Instant::now) + Duration::from_millis(ms)
}

#[test]
fn a_few_deregistrations_are_applied_at_once() {
    let mut p = Protection::new(ProtectionConfig::default());
    p.on_registry(&set(&[0, 1, 2, 3, 4]), t(0));
    let (out, change) = p.on_registry(&set(&[0, 1, 2, 3]), t(10));
    assert_eq!(change, None);
    assert_eq!(ids(&out), ["i0", "i1", "i2", "i3"]);
    let (out, change) = p.on_registry(&set(&[0, 1, 2]), t(20));
    assert_eq!(change, None, "2 of 5 in the window is under half");
    assert_eq!(out.endpoints.len(), 3);
}

#[test]
fn a_mass_deregistration_engages_protection_and_health_checks_decide() {
    let mut p = Protection::new(ProtectionConfig::default());
    p.on_registry(&set(&[0, 1, 2, 3, 4]), t(0));
    let (out, change) = p.on_registry(&set(&[0]), t(10));
    assert_eq!(change, Some(Change::Entered { kept: 4 }));
    assert_eq!(out.endpoints.len(), 5, "the last known set is kept");
    assert!(p.is_protected());
    // i1 fails its check: dropped; i2 passes: stays.
    let out = p.on_health(&InstanceId::new("i1").unwrap(), false).unwrap();
    assert_eq!(ids(&out), ["i0", "i2", "i3", "i4"]);
    assert!(p.on_health(&InstanceId::new("i2").unwrap(), true).is_none());
    // The registry shows them back: protection ends.
    let (out, change) = p.on_registry(&set(&[0, 1, 2, 3, 4]), t(2000));
    assert_eq!(change, Some(Change::Left(Ended::RegistryRecovered)));
    assert_eq!(out.endpoints.len(), 5);
    assert!(
        Arc::ptr_eq(&out, &p.output()),
        "unprotected, the registry's set is routed as is"
    );
}

#[test]
fn an_emptied_set_engages_protection_even_for_one_instance() {
    let mut p = Protection::new(ProtectionConfig::default());
    p.on_registry(&set(&[0]), t(0));
    let (out, change) = p.on_registry(&set(&[]), t(1));
    assert_eq!(change, Some(Change::Entered { kept: 1 }));
    assert_eq!(out.endpoints.len(), 1);
}

#[test]
fn protection_always_ends() {
    let cfg = ProtectionConfig {
        max: Duration::from_secs(60),
        ..ProtectionConfig::default()
    };
    let mut p = Protection::new(cfg);
    p.on_registry(&set(&[0, 1, 2, 3]), t(0));
    p.on_registry(&set(&[]), t(1));
    assert!(p.is_protected());
    assert_eq!(p.expire(t(30_000)), None);
    assert_eq!(p.expire(t(61_000)), Some(Change::Left(Ended::Expired)));
    assert!(
        p.output().endpoints.is_empty(),
        "the registry is trusted again"
    );

    let mut p = Protection::new(ProtectionConfig::default());
    p.on_registry(&set(&[0, 1]), t(0));
    p.on_registry(&set(&[]), t(1));
    assert_eq!(p.end_by_operator(), Some(Change::Left(Ended::Operator)));
    assert_eq!(p.end_by_operator(), None);
}

#[test]
fn slow_trickles_outside_the_window_do_not_engage() {
    let mut p = Protection::new(ProtectionConfig::default());
    p.on_registry(&set(&[0, 1, 2, 3]), t(0));
    assert_eq!(p.on_registry(&set(&[0, 1, 2]), t(0)).1, None);
    assert_eq!(p.on_registry(&set(&[0, 1]), t(11_000)).1, None);
    assert_eq!(p.on_registry(&set(&[0]), t(22_000)).1, None);
}

#[test]
fn disabled_protection_trusts_the_registry() {
    let mut p = Protection::new(ProtectionConfig {
        enabled: false,
        ..ProtectionConfig::default()
    });
    p.on_registry(&set(&[0, 1, 2]), t(0));
    let (out, change) = p.on_registry(&set(&[]), t(1));
    assert_eq!(change, None);
    assert!(out.endpoints.is_empty());
}

#[test]
fn a_mass_removal_arriving_one_by_one_keeps_every_vanished_instance() {
    let mut p = Protection::new(ProtectionConfig::default());
    p.on_registry(&set(&[0, 1, 2, 3, 4]), t(0));
    assert_eq!(p.on_registry(&set(&[0, 2, 3, 4]), t(1)).1, None);
    assert_eq!(p.on_registry(&set(&[0, 3, 4]), t(2)).1, None);
    let (out, change) = p.on_registry(&set(&[0, 4]), t(3));
    assert_eq!(change, Some(Change::Entered { kept: 3 }));
    assert_eq!(out.endpoints.len(), 5, "i1 and i2 come back with i3");
}
