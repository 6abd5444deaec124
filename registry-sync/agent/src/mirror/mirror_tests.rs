use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use detour_proto::{Endpoint, HostId, InstanceId, ServiceName};

use super::plan::{Current, Held as Entry};
use super::*;
use crate::legacy::{Providers, SourceView};

fn ep(svc: &str, i: usize) -> Endpoint {
    Endpoint::new(
        ServiceName::new(svc).unwrap(),
        InstanceId::new(format!("i{i}")).unwrap(),
        HostId::new(format!("h{i}")).unwrap(),
        format!("127.0.0.1:{}", 1000 + i).parse().unwrap(),
    )
}

fn view(eps: &[Endpoint], connected: bool) -> SourceView {
    let mut p = Providers::new();
    for e in eps {
        p.entry(e.service.clone())
            .or_default()
            .insert(e.instance.clone(), e.clone());
    }
    SourceView {
        connected,
        listed: true,
        providers: Arc::new(p),
        observed: Arc::new(HashMap::new()),
        problem: None,
    }
}

fn ids(m: &Mirror) -> Vec<String> {
    m.desired().keys().map(|(_, i)| i.to_string()).collect()
}

#[test]
fn single_removals_flow_through_and_mass_removals_are_held() {
    let mut m = Mirror::new(ProtectionPolicy::default());
    let all: Vec<Endpoint> = (0..10).map(|i| ep("s", i)).collect();
    let t = Instant::now();
    assert!(m.on_source(&view(&all, true), t).is_empty());
    assert_eq!(m.desired().len(), 10);
    // One removal: applied at once.
    m.on_source(&view(&all[1..], true), t + Duration::from_secs(1));
    assert_eq!(m.desired().len(), 9);
    assert!(m.held().is_empty());
    // Later (outside the window), 8 of the 9 left vanish: held.
    let changes = m.on_source(&view(&all[9..], true), t + Duration::from_secs(12));
    assert!(
        matches!(changes[0].1, Change::Entered { .. }),
        "{changes:?}"
    );
    assert_eq!(m.desired().len(), 9, "nothing deleted while held");
    assert_eq!(m.held()[0].kept.len(), 8);
    // A held instance that fails its check is removed; the others stay.
    let s = ServiceName::new("s").unwrap();
    assert!(m.on_health(&s, &InstanceId::new("i3").unwrap(), false));
    assert_eq!(m.desired().len(), 8);
    assert!(!ids(&m).contains(&"i3".to_owned()));
}

#[test]
fn a_disconnected_or_unlisted_source_deletes_nothing() {
    let mut m = Mirror::new(ProtectionPolicy::default());
    let all: Vec<Endpoint> = (0..4).map(|i| ep("s", i)).collect();
    let t = Instant::now();
    m.on_source(&view(&all, true), t);
    m.on_source(&view(&[], false), t + Duration::from_secs(1));
    assert_eq!(m.desired().len(), 4);
    let mut unlisted = view(&[], true);
    unlisted.listed = false;
    m.on_source(&unlisted, t + Duration::from_secs(2));
    assert_eq!(m.desired().len(), 4);
}

#[test]
fn a_successor_judges_the_source_against_what_was_mirrored() {
    let mut current = Current::default();
    let all: Vec<Endpoint> = (0..5).map(|i| ep("s", i)).collect();
    for e in &all {
        current.ours.insert(
            (e.service.clone(), e.instance.clone()),
            Entry {
                endpoint: e.clone(),
                revision: 1,
                lease: 1,
            },
        );
    }
    let mut m = Mirror::new(ProtectionPolicy::default());
    let t = Instant::now();
    m.seed(&current, t);
    assert_eq!(m.desired().len(), 5, "adopted before the source is listed");
    // The source comes back with one of five: protection, not deletion.
    let changes = m.on_source(&view(&all[..1], true), t + Duration::from_millis(10));
    assert_eq!(changes.len(), 1);
    assert_eq!(m.desired().len(), 5);
    let expected: BTreeMap<_, _> = all
        .iter()
        .map(|e| ((e.service.clone(), e.instance.clone()), e.clone()))
        .collect();
    assert_eq!(m.desired(), expected);
}

#[test]
fn services_gone_for_good_are_forgotten() {
    let mut m = Mirror::new(ProtectionPolicy::default());
    let t = Instant::now();
    m.on_source(
        &view(&[ep("a", 1), ep("b", 2), ep("b", 3), ep("b", 4)], true),
        t,
    );
    // "a" loses its only instance: emptied, so protected (held).
    m.on_source(&view(&[ep("b", 2), ep("b", 3), ep("b", 4)], true), t);
    assert_eq!(m.held().len(), 1);
    assert!(m.on_health(
        &ServiceName::new("a").unwrap(),
        &InstanceId::new("i1").unwrap(),
        false
    ));
    assert_eq!(m.desired().len(), 3);
}
