//! Tests of the directory registry against a real temporary directory.

use super::*;
use detour_proto::{AppProtocol, SidecarState, Source};

fn ep(service: &str, host: &str, port: u16) -> Endpoint {
    Endpoint {
        service: ServiceName::new(service).unwrap(),
        instance: InstanceId::new(format!("{host}-{service}")).unwrap(),
        host: HostId::new(host).unwrap(),
        app_address: format!("127.0.0.1:{port}").parse().unwrap(),
        pa_address: Some("127.0.0.1:1".parse().unwrap()),
        protocol: AppProtocol::Http1,
        weight: 1,
        zone: String::new(),
        version: String::new(),
        source: Source::Native,
        labels: Default::default(),
        healthy: true,
        no_direct: false,
    }
}

fn fast() -> DirOptions {
    DirOptions {
        ttl: Duration::from_secs(5),
        poll_interval: Duration::from_millis(50),
    }
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<EndpointSet>>,
    pred: impl Fn(&EndpointSet) -> bool,
) -> Arc<EndpointSet> {
    tokio::time::timeout(Duration::from_secs(1), async {
        loop {
            let cur = rx.borrow_and_update().clone();
            if pred(&cur) {
                return cur;
            }
            rx.changed().await.unwrap();
        }
    })
    .await
    .expect("change not visible within 1 s")
}

#[tokio::test]
async fn registration_is_seen_by_another_host_within_a_second() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = DirRegistry::open(dir.path(), HostId::new("h1").unwrap(), fast())
        .await
        .unwrap();
    let h2 = DirRegistry::open(dir.path(), HostId::new("h2").unwrap(), fast())
        .await
        .unwrap();
    let echo = ServiceName::new("echo").unwrap();
    let mut rx = h2.watch(&echo).await.unwrap();
    assert!(!rx.borrow().known);

    h1.register(ep("echo", "h1", 8080)).await.unwrap();
    let set = wait_for(&mut rx, |s| s.endpoints.len() == 1).await;
    assert!(set.known);

    h1.deregister(&echo, &InstanceId::new("h1-echo").unwrap())
        .await
        .unwrap();
    let set = wait_for(&mut rx, |s| s.endpoints.is_empty()).await;
    assert!(
        set.known,
        "a service once seen stays known while its host lives"
    );

    h1.withdraw().await.unwrap();
    assert!(!h1.own_file().exists());
}

#[tokio::test]
async fn cannot_register_for_another_host() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = DirRegistry::open(dir.path(), HostId::new("h1").unwrap(), fast())
        .await
        .unwrap();
    let err = h1.register(ep("echo", "h2", 1)).await.unwrap_err();
    assert!(matches!(err, RegistryError::Refused(_)), "{err}");
}

#[tokio::test]
async fn host_status_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = DirRegistry::open(dir.path(), HostId::new("h1").unwrap(), fast())
        .await
        .unwrap();
    let status = HostStatus {
        host: HostId::new("h1").unwrap(),
        sidecar: SidecarState::Ready,
        version: "1".into(),
        updated_unix_ms: now_unix_ms(),
        watchdog: None,
        metrics: None,
    };
    h1.set_host_status(status.clone()).await.unwrap();
    let h2 = DirRegistry::open(dir.path(), HostId::new("h2").unwrap(), fast())
        .await
        .unwrap();
    assert_eq!(
        h2.host_status(&status.host).await.unwrap(),
        Some(status.clone())
    );
    assert_eq!(
        h2.host_status(&HostId::new("h9").unwrap()).await.unwrap(),
        None
    );
}

#[tokio::test]
async fn garbage_files_and_endpoints_poison_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("junk.json"), b"{not json").unwrap();
    let now = now_unix_ms();
    let mixed = serde_json::json!({
        "format": 1, "host": "h3", "heartbeat_unix_ms": now, "ttl_ms": 60000,
        "endpoints": [
            serde_json::to_value(ep("echo", "h3", 9)).unwrap(),
            {"service": "echo", "instance": "broken"},
            serde_json::to_value(ep("echo", "h4", 10)).unwrap(),
        ]
    });
    std::fs::write(dir.path().join("h3.json"), mixed.to_string()).unwrap();
    let h2 = DirRegistry::open(dir.path(), HostId::new("h2").unwrap(), fast())
        .await
        .unwrap();
    let rx = h2.watch(&ServiceName::new("echo").unwrap()).await.unwrap();
    let set = rx.borrow().clone();
    assert_eq!(set.endpoints.len(), 1, "{set:?}");
    assert_eq!(set.endpoints[0].host.as_str(), "h3");
}

#[test]
fn expired_records_keep_the_service_known_but_empty() {
    let raw = |hb: u64| HostRecordIn {
        format: FORMAT,
        host: HostId::new("h1").unwrap(),
        heartbeat_unix_ms: hb,
        ttl_ms: 1000,
        status: Some(HostStatus {
            host: HostId::new("h1").unwrap(),
            sidecar: SidecarState::Ready,
            version: String::new(),
            updated_unix_ms: hb,
            watchdog: None,
            metrics: None,
        }),
        endpoints: vec![serde_json::to_value(ep("echo", "h1", 1)).unwrap()],
    };
    let echo = ServiceName::new("echo").unwrap();
    let live = build_view(vec![raw(10_000)], 10_900);
    assert_eq!(live.services[&echo].endpoints.len(), 1);
    assert_eq!(live.hosts.len(), 1);
    let dead = build_view(vec![raw(10_000)], 11_001);
    assert!(dead.services[&echo].known);
    assert!(dead.services[&echo].endpoints.is_empty());
    assert!(dead.hosts.is_empty());
}

#[tokio::test]
async fn a_fifo_a_forged_record_and_an_oversized_file_are_skipped_and_routing_continues() {
    let dir = tempfile::tempdir().unwrap();
    let h1 = DirRegistry::open(dir.path(), HostId::new("h1").unwrap(), fast())
        .await
        .unwrap();
    let reader = DirRegistry::open(dir.path(), HostId::new("r").unwrap(), fast())
        .await
        .unwrap();
    h1.register(ep("echo", "h1", 8080)).await.unwrap();
    // A FIFO (no writer: opening it for reading would block a plain reader for ever).
    rustix::fs::mknodat(
        rustix::fs::CWD,
        dir.path().join("fifo.json"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from_raw_mode(0o644),
        0,
    )
    .unwrap();
    // A record of h1 written into h9's file (a forged registration of another host).
    let forged = std::fs::read_to_string(h1.own_file())
        .unwrap()
        .replace("8080", "9999")
        .replace("h1-echo", "h9-echo");
    std::fs::write(dir.path().join("h9.json"), forged).unwrap();
    // A file over the size limit.
    std::fs::write(
        dir.path().join("big.json"),
        vec![b' '; MAX_RECORD_BYTES as usize + 1],
    )
    .unwrap();
    // A symbolic link out of the directory.
    std::os::unix::fs::symlink("/etc/hostname", dir.path().join("link.json")).unwrap();
    let mut bad = Vec::new();
    let view = read_records(dir.path(), |p, _, why| {
        bad.push(format!("{}: {why}", p.display()))
    })
    .unwrap();
    assert_eq!(bad.len(), 4, "{bad:?}");
    let echo = view
        .services
        .get(&ServiceName::new("echo").unwrap())
        .unwrap();
    assert_eq!(echo.endpoints.len(), 1);
    assert_eq!(echo.endpoints[0].app_address.port(), 8080);
    // A registry client keeps scanning past them.
    let mut rx = reader
        .watch(&ServiceName::new("echo").unwrap())
        .await
        .unwrap();
    h1.register(ep("more", "h1", 8081)).await.unwrap();
    let _ = wait_for(&mut rx, |s| s.endpoints.len() == 1).await;
    let mut more = reader
        .watch(&ServiceName::new("more").unwrap())
        .await
        .unwrap();
    let _ = wait_for(&mut more, |s| s.endpoints.len() == 1).await;
}
