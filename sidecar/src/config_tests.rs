//! Config parsing and validation, problem by problem.

use super::*;

#[test]
fn minimal_config_gets_defaults() {
    let cfg = Config::parse("t", "host = \"h1\"\n", Vec::new()).unwrap();
    assert_eq!(cfg.balance, Balance::P2c);
    assert_eq!(cfg.outbound_unix, Some(PathBuf::from("run/outbound.sock")));
    assert_eq!(cfg.drain_timeout, Duration::from_secs(10));
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
        ("DETOUR_HOST".to_string(), "h9".to_string()),
        (
            "DETOUR_PROXY__BALANCE".to_string(),
            "round-robin".to_string(),
        ),
    ];
    let cfg = Config::parse("t", "host = \"h1\"\n", env).unwrap();
    assert_eq!(cfg.host.as_str(), "h9");
    assert_eq!(cfg.balance, Balance::RoundRobin);
}

#[test]
fn etcd_registry_is_configured() {
    let text = "host = \"h1\"\nregistry = \"etcd:http://127.0.0.1:2379\"\n[registry_etcd]\nprefix = \"/x/y/\"\n";
    let cfg = Config::parse("t", text, Vec::new()).unwrap();
    assert_eq!(
        cfg.registry,
        RegistrySpec::Etcd(vec!["http://127.0.0.1:2379".into()])
    );
    assert_eq!(cfg.etcd_prefix, "/x/y");
    let bad = "host = \"h1\"\n[registry_etcd]\nprefix = \"x\"\nttl_ms = 0\n";
    let err = Config::parse("t", bad, Vec::new()).unwrap_err().to_string();
    assert!(
        err.contains("registry_etcd.prefix") && err.contains("registry_etcd.ttl_ms"),
        "{err}"
    );
}
