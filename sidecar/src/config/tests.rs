//! Config parsing and validation, problem by problem.

use super::*;

#[test]
fn minimal_config_gets_defaults() {
    let cfg = Config::parse("t", "host = \"h1\"\n", Vec::new()).unwrap();
    assert_eq!(cfg.balance, Balance::PeakEwma);
    assert_eq!(cfg.outbound_unix, Some(PathBuf::from("run/outbound.sock")));
    assert_eq!(cfg.drain_timeout, Duration::from_secs(10));
    assert_eq!(cfg.pa_protocol, AppProtocol::Http2);
}

#[test]
fn the_protocol_to_remote_pas_is_chosen_by_name() {
    let cfg = Config::parse(
        "t",
        "host = \"h1\"\n[proxy]\npa_protocol = \"http1\"\n",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(cfg.pa_protocol, AppProtocol::Http1);
    let err = Config::parse(
        "t",
        "host = \"h1\"\n[proxy]\npa_protocol = \"h3\"\n",
        Vec::new(),
    )
    .unwrap_err();
    assert!(err.to_string().contains("proxy.pa_protocol"), "{err}");
}

#[test]
fn idle_links_are_probed_at_their_own_pace_never_faster_than_busy_ones() {
    let cfg = Config::parse("t", "host = \"h1\"\n", Vec::new()).unwrap();
    assert_eq!(cfg.probe.interval, Duration::from_millis(200));
    assert_eq!(cfg.probe.idle_after, Duration::from_secs(10));
    assert_eq!(cfg.probe.idle_interval, Duration::from_secs(30));
    let text = "host = \"h1\"\n[link]\nprobe_interval_ms = 500\nidle_probe_interval_ms = 100\n";
    let err = Config::parse("t", text, Vec::new()).unwrap_err();
    assert!(
        err.to_string().contains("link.idle_probe_interval_ms"),
        "{err}"
    );
}

#[test]
fn the_traffic_policy_defaults_and_limits() {
    let cfg = Config::parse("t", "host = \"h1\"\n", Vec::new()).unwrap();
    assert_eq!(cfg.try_timeout, None);
    assert_eq!(cfg.max_concurrent_per_endpoint, 0);
    assert_eq!(cfg.outlier.panic_threshold_percent, 50);
    let cfg = Config::parse(
        "t",
        "host = \"h1\"\n[proxy]\ntry_timeout_ms = 250\nmax_concurrent_per_endpoint = 64\n[outlier]\npanic_threshold_percent = 0\n",
        Vec::new(),
    )
    .unwrap();
    assert_eq!(cfg.try_timeout, Some(Duration::from_millis(250)));
    assert_eq!(cfg.max_concurrent_per_endpoint, 64);
    assert_eq!(cfg.outlier.panic_threshold_percent, 0);
    let err = Config::parse(
        "t",
        "host = \"h1\"\n[outlier]\npanic_threshold_percent = 101\n[proxy]\ntry_timeout_ms = 99999999\n",
        Vec::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("outlier.panic_threshold_percent"), "{err}");
    assert!(err.contains("proxy.try_timeout_ms"), "{err}");
}

#[test]
fn providers_are_validated() {
    let text = r#"
host = "h1"
[[provide]]
service = "echo"
address = "127.0.0.1:8080"
protocol = "grpc"
"#;
    let cfg = Config::parse("t", text, Vec::new()).unwrap();
    assert_eq!(cfg.provide[0].protocol, AppProtocol::Http2);
    assert_eq!(cfg.provide[0].instance.as_str(), "h1-echo");
}

#[test]
fn every_problem_is_reported_at_once() {
    let text = r#"
host = "bad host"
registry = "zk:x"
[admin]
listen = "0.0.0.0:1"
[proxy]
balance = "random"
request_timeout_ms = 0
[[provide]]
service = "echo"
address = "nowhere"
protocol = "ftp"
"#;
    let err = Config::parse("t", text, Vec::new()).unwrap_err();
    let text = err.to_string();
    for needle in [
        "host:",
        "registry:",
        "admin.listen",
        "proxy.balance",
        "request_timeout_ms",
        "provide[0].address",
        "provide[0].protocol",
    ] {
        assert!(text.contains(needle), "{needle} missing from:\n{text}");
    }
}

#[test]
fn environment_overrides() {
    let env = vec![
        ("DETOUR_SIDECAR__HOST".to_string(), "h9".to_string()),
        (
            "DETOUR_SIDECAR__PROXY__BALANCE".to_string(),
            "round-robin".to_string(),
        ),
    ];
    let cfg = Config::parse("t", "host = \"h1\"\n", env).unwrap();
    assert_eq!(cfg.host.as_str(), "h9");
    assert_eq!(cfg.balance, Balance::RoundRobin);
    assert!(cfg.warnings.is_empty());
}

#[test]
fn variables_that_are_no_keys_stop_nothing() {
    let env: Vec<(String, String)> = [
        ("DETOUR_SIDECAR_CONFIG", "/etc/detour/sidecar.toml"),
        ("DETOUR_CONFIG", "/etc/detour/sidecar.toml"),
        ("DETOUR_SIDECAR_BIN", "/usr/bin/detour-sidecar"),
        ("DETOUR_WATCHDOG__ADMIN__LISTEN", "127.0.0.1:1"),
        ("DETOUR_SIDECAR__NO_SUCH_KEY", "1"),
    ]
    .iter()
    .map(|(a, b)| (a.to_string(), b.to_string()))
    .collect();
    let cfg = Config::parse("t", "host = \"h1\"\n", env).unwrap();
    assert_eq!(cfg.warnings.len(), 1, "{:?}", cfg.warnings);
    assert!(cfg.warnings[0].contains("DETOUR_SIDECAR__NO_SUCH_KEY"));
}

#[test]
fn etcd_registry_is_configured() {
    let text = "host = \"h1\"\nregistry = \"etcd:http://127.0.0.1:2379\"\n[registry_etcd]\nprefix = \"/x/y/\"\n";
    let cfg = Config::parse("t", text, Vec::new()).unwrap();
    assert_eq!(
        cfg.registry.spec,
        detour_registry::RegistrySpec::Etcd(vec!["http://127.0.0.1:2379".into()])
    );
    assert_eq!(cfg.registry.etcd_prefix, "/x/y");
    let bad = "host = \"h1\"\n[registry_etcd]\nprefix = \"x\"\nttl_ms = 0\n";
    let err = Config::parse("t", bad, Vec::new()).unwrap_err().to_string();
    assert!(
        err.contains("registry_etcd.prefix") && err.contains("registry_etcd.ttl_ms"),
        "{err}"
    );
}

#[test]
fn protection_has_global_defaults_and_per_service_overrides() {
    let text = r#"
host = "h1"
[protection]
threshold = 0.6
check_path = "/healthz"
[protection.service.payments]
threshold = 0.2
max_ms = 60000
[protection.service.ledger]
enabled = false
check_path = ""
"#;
    let cfg = Config::parse("t", text, Vec::new()).unwrap();
    let p = &cfg.protection;
    assert_eq!(p.default.protection.threshold, 0.6);
    assert_eq!(p.default.check.http_path.as_deref(), Some("/healthz"));
    let payments = p.for_service(&ServiceName::new("payments").unwrap());
    assert_eq!(payments.protection.threshold, 0.2);
    assert_eq!(payments.protection.max, Duration::from_secs(60));
    assert_eq!(
        payments.protection.window,
        Duration::from_secs(10),
        "default kept"
    );
    assert_eq!(
        payments.check.http_path.as_deref(),
        Some("/healthz"),
        "inherited"
    );
    let ledger = p.for_service(&ServiceName::new("ledger").unwrap());
    assert!(!ledger.protection.enabled);
    assert_eq!(ledger.check.http_path, None, "\"\" means connect only");
    let other = p.for_service(&ServiceName::new("other").unwrap());
    assert_eq!(other, &p.default);
}

#[test]
fn bad_protection_settings_are_reported_with_their_keys() {
    let text = r#"
host = "h1"
[protection]
check_path = "healthz"
[protection.service."bad name"]
threshold = 0.5
[protection.service.payments]
threshold = 1.5
window_ms = 0
thresold = 0.3
"#;
    let err = Config::parse("t", text, Vec::new())
        .unwrap_err()
        .to_string();
    for needle in [
        "protection.check_path",
        "protection.service.bad name",
        "protection.service.payments.threshold",
        "protection.service.payments.window_ms",
        "thresold",
    ] {
        assert!(err.contains(needle), "{needle} missing from:\n{err}");
    }
}

#[test]
fn the_example_deployment_config_is_valid() {
    let text = include_str!("../../../deploy/sidecar.toml");
    let cfg = Config::parse("deploy/sidecar.toml", text, Vec::new()).unwrap();
    let batch = cfg
        .protection
        .for_service(&ServiceName::new("batch-jobs").unwrap());
    assert_eq!(batch.protection.threshold, 0.9);
}

#[test]
fn limits_have_defaults_and_refuse_zero() {
    let cfg = Config::parse("t", "host = \"h1\"\n", Vec::new()).unwrap();
    assert_eq!(cfg.limits.max_connections, 20_000);
    assert_eq!(cfg.limits.idle_timeout, Duration::from_secs(600));
    assert_eq!(cfg.limits.max_concurrent_streams, 1024);
    assert_eq!(cfg.limits.max_in_flight_per_connection, 256);
    let err = Config::parse(
        "t",
        "host = \"h1\"\n[limits]\nidle_timeout_ms = 0\nmax_connections = 0\n",
        Vec::new(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("limits.idle_timeout_ms"), "{err}");
    assert!(err.contains("limits.max_connections"), "{err}");
}

#[test]
fn mutual_tls_is_the_default_and_plaintext_is_explicit() {
    use crate::config::tls::TlsMode;
    let cfg = Config::parse("t", "host = \"h1\"\nrun_dir = \"/r\"\n", Vec::new()).unwrap();
    let files = cfg.tls.files().unwrap();
    assert_eq!(files.trust_domain, "detour.local");
    assert_eq!(files.cert, std::path::PathBuf::from("/r/tls/cert.pem"));
    assert_eq!(files.bundle, std::path::PathBuf::from("/r/tls/bundle.pem"));
    let text = "host = \"h1\"\n[tls]\nmode = \"plaintext\"\n";
    let cfg = Config::parse("t", text, Vec::new()).unwrap();
    assert_eq!(cfg.tls, TlsMode::Plaintext);
    let text =
        "host = \"h1\"\n[tls]\nmode = \"tls\"\ntrust_domain = \"Bad Domain\"\nreload_ms = 0\n";
    let err = Config::parse("t", text, Vec::new())
        .unwrap_err()
        .to_string();
    for key in ["tls.mode", "tls.trust_domain", "tls.reload_ms"] {
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn allow_lists_name_identities_of_the_trust_domain_and_need_tls() {
    let text = r#"host = "h1"
[[provide]]
service = "a"
address = "127.0.0.1:1"
allow = ["spiffe://detour.local/host/h2"]
"#;
    let cfg = Config::parse("t", text, Vec::new()).unwrap();
    let allow = cfg.provide[0].allow.as_ref().unwrap();
    assert_eq!(allow[0].as_str(), "spiffe://detour.local/host/h2");
    let bad = r#"host = "h1"
[[provide]]
service = "a"
address = "127.0.0.1:1"
allow = ["spiffe://other.example/host/h2", "h2"]
"#;
    let err = Config::parse("t", bad, Vec::new()).unwrap_err().to_string();
    assert!(
        err.contains("not in the trust domain detour.local"),
        "{err}"
    );
    assert!(err.contains("\"h2\" is not a SPIFFE ID"), "{err}");
    let plain = format!("{text}[tls]\nmode = \"plaintext\"\n");
    let err = Config::parse("t", &plain, Vec::new())
        .unwrap_err()
        .to_string();
    assert!(err.contains("provide[0].allow"), "{err}");
}

#[test]
fn the_unix_socket_group_is_a_name_or_a_number() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("group");
    std::fs::write(&file, "root:x:0:\ncallers:x:1234:app\n").unwrap();
    let f = file.to_str().unwrap();
    assert_eq!(super::listen::group_id("callers", f), Ok(1234));
    assert_eq!(super::listen::group_id("77", f), Ok(77));
    assert!(
        super::listen::group_id("nobody-here", f)
            .unwrap_err()
            .contains("no group")
    );
    let text = "host = \"h1\"\n[outbound]\nunix_group = \"0\"\n";
    let cfg = Config::parse("t", text, Vec::new()).unwrap();
    assert_eq!(cfg.outbound_unix_group, Some(0));
    let bad = "host = \"h1\"\n[outbound]\nunix_group = \"no-such-group-here\"\n";
    let err = Config::parse("t", bad, Vec::new()).unwrap_err().to_string();
    assert!(err.contains("outbound.unix_group"), "{err}");
}
