//! What an operator sees of a running mesh: the per-service golden metrics, the process
//! metrics and `# HELP` texts, the scrapeable metrics listener (its token, its one endpoint,
//! kept across an upgrade), and JSON logs — on real sidecar processes.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::net::SocketAddr;
use std::time::Duration;

use detour_kit::process::ChildGuard;
use detour_proto::{ADDRESS_FILE, AppProtocol, ServiceName, SidecarAddresses};
use detour_tests::{Mesh, admin_get, body_text, caller_and_provider, metric, wait_until};
use detour_thin_sdk::body::empty;
use detour_thin_sdk::{Client, Dial};
use http::Request;

/// `GET path` on the metrics listener at `addr`, with `token` as a bearer token, naming a
/// host that is not loopback (as a central Prometheus does): status and body.
async fn scrape(addr: SocketAddr, path: &str, token: Option<&str>) -> (u16, String) {
    let client = Client::builder(Dial::Tcp(addr)).control(false).build();
    let host = ServiceName::new("prometheus.example").unwrap();
    let mut req = Request::get(path);
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = client
        .send(&host, req.body(empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status().as_u16();
    (status, body_text(resp).await)
}

#[tokio::test]
async fn each_service_has_its_golden_metrics_by_path_and_logs_are_json() {
    let (mesh, _p) = caller_and_provider("[log]\nformat = \"json\"\n").await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let hello = ServiceName::new("hello").unwrap();
    let (ca, pa) = (mesh.admin("h1"), mesh.admin("h2"));
    let out = r#"direction="outbound",service="hello",path="mesh""#;
    let inbound = r#"direction="inbound",service="hello",path="local",class="2xx""#;
    let count = |c, name, label| async move { metric(c, name, label).await.unwrap_or(0.0) };
    let before = (
        count(&ca, "detour_service_requests_total", out).await,
        count(&ca, "detour_service_response_seconds_count", out).await,
        count(&pa, "detour_service_requests_total", inbound).await,
    );
    for _ in 0..20 {
        let req = Request::get("/").body(empty()).unwrap();
        assert_eq!(client.send(&hello, req).await.unwrap().status(), 200);
    }
    let requests = count(&ca, "detour_service_requests_total", out).await;
    assert_eq!(
        requests - before.0,
        20.0,
        "20 requests to hello over the mesh"
    );
    let errors = format!("{out},class=\"5xx\"");
    assert_eq!(
        count(&ca, "detour_service_requests_total", &errors).await,
        0.0
    );
    let timed = count(&ca, "detour_service_response_seconds_count", out).await;
    assert_eq!(
        timed - before.1,
        20.0,
        "each one in the service's histogram"
    );
    let provided = count(&pa, "detour_service_requests_total", inbound).await;
    assert_eq!(provided - before.2, 20.0);

    let (_, text) = admin_get(&ca, "/metrics").await;
    for needle in [
        "# HELP detour_service_requests_total ",
        "# HELP detour_requests_total ",
        "# TYPE process_cpu_seconds_total counter",
        "detour_build_info{binary=\"detour-sidecar\"",
        "detour_service_response_seconds_bucket{direction=\"outbound\",service=\"hello\",path=\"mesh\",le=\"0.0001\"}",
    ] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }
    let rss = metric(&ca, "process_resident_memory_bytes", "")
        .await
        .unwrap();
    assert!(rss > 1_000_000.0, "resident memory {rss}");
    assert!(metric(&ca, "process_open_fds", "").await.unwrap() > 3.0);

    // Every line h1 logged is one JSON object with a level (no colour codes).
    let log = std::fs::read_to_string(mesh.root().join("h1/sidecar.log")).unwrap();
    let mut lines = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
        assert!(v["level"].is_string(), "{line}");
        lines += 1;
    }
    assert!(lines > 0, "h1 logged nothing");
}

/// Starts `host` with a metrics listener asking the token `token` (written to its run
/// directory first).
async fn with_metrics_listener(mesh: &mut Mesh, host: &str, ip: &str, token: &str) -> SocketAddr {
    let run_dir = mesh.root().join(host);
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::write(run_dir.join("metrics.token"), format!("{token}\n")).unwrap();
    let extra = "[metrics]\nlisten = \"127.0.0.1:0\"\ntoken_file = \"metrics.token\"\n";
    let cfg = mesh.config(host, ip, &[], extra);
    let sc = mesh.start_config(host, &cfg).await;
    sc.addrs
        .metrics
        .expect("the metrics listener's address in sidecar.json")
}

#[tokio::test]
async fn the_metrics_listener_serves_metrics_alone_to_those_with_its_token() {
    let mut mesh = Mesh::new();
    let addr = with_metrics_listener(&mut mesh, "h1", "127.0.0.1", "s3cret").await;
    assert_ne!(addr, mesh.admin_addr("h1"), "a listener of its own");
    assert_eq!(scrape(addr, "/metrics", None).await.0, 401);
    assert_eq!(scrape(addr, "/metrics", Some("wrong")).await.0, 401);
    let (status, text) = scrape(addr, "/metrics", Some("s3cret")).await;
    assert_eq!(status, 200);
    assert!(text.contains("detour_build_info"), "{text}");
    assert!(text.contains("process_cpu_seconds_total"), "{text}");
    // Nothing else of the admin API is served there, whatever the token.
    assert_eq!(scrape(addr, "/state", Some("s3cret")).await.0, 404);
    assert_eq!(scrape(addr, "/drain", Some("s3cret")).await.0, 404);
    let refused = metric(
        &mesh.admin("h1"),
        "detour_admin_refused_total",
        "metrics-token",
    )
    .await;
    assert_eq!(refused, Some(2.0));

    // A token file that cannot be read stops the start, saying which.
    let run_dir = mesh.root().join("h9");
    std::fs::create_dir_all(&run_dir).unwrap();
    let cfg = mesh.config(
        "h9",
        "127.0.0.9",
        &[],
        "[metrics]\nlisten = \"127.0.0.9:0\"\ntoken_file = \"missing.token\"\n",
    );
    std::fs::write(run_dir.join("sidecar.toml"), cfg).unwrap();
    let out = tokio::process::Command::new(mesh.sidecar_binary())
        .arg("--config")
        .arg(run_dir.join("sidecar.toml"))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(20), out)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(out.status.code(), Some(70));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("metrics.token_file"), "{stderr}");
}

#[tokio::test]
async fn the_metrics_listener_is_handed_to_the_successor_at_an_upgrade() {
    let mut mesh = Mesh::new();
    let addr = with_metrics_listener(&mut mesh, "h1", "127.0.0.1", "t0k3n").await;
    let old_pid = mesh.sidecar("h1").addrs.pid;
    let run_dir = mesh.sidecar("h1").run_dir.clone();
    let config = mesh.sidecar("h1").config.clone();
    let mut cmd = std::process::Command::new(mesh.sidecar_binary());
    cmd.arg("--config")
        .arg(&config)
        .arg("--take-over")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _successor = ChildGuard::spawn(cmd, "successor").unwrap();
    wait_until("the successor ready", Duration::from_secs(20), || {
        std::fs::read(run_dir.join(ADDRESS_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<SidecarAddresses>(&b).ok())
            .is_some_and(|a| a.pid != old_pid)
    })
    .await;
    let predecessor = &mut mesh.sidecars.get_mut("h1").unwrap().child;
    let exited = predecessor
        .wait_exit(Duration::from_secs(20))
        .await
        .unwrap();
    assert!(exited.is_some(), "the predecessor handed off and exited");
    let bytes = std::fs::read(run_dir.join(ADDRESS_FILE)).unwrap();
    let now: SidecarAddresses = serde_json::from_slice(&bytes).unwrap();
    assert_eq!(now.metrics, Some(addr), "the same listener, handed over");
    let (status, text) = scrape(addr, "/metrics", Some("t0k3n")).await;
    assert_eq!(status, 200, "{text}");
}

/// The repository root.
fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `promtool ARGS` in `deploy/observability`: its success and output.
fn promtool(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(repo().join("deploy/observability"))
        .output()
        .unwrap_or_else(|e| {
            panic!("promtool: {e} (Debian's prometheus package has it; tests/setup.sh installs it)")
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The `detour_…` metric names in `text`, without the `_bucket`/`_count`/`_sum` a histogram
/// adds.
fn metric_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for (i, _) in text.match_indices("detour_") {
        let before = text[..i].chars().next_back();
        if before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let base = ["_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        out.insert(base);
    }
    out
}

#[test]
fn the_shipped_alert_rules_pass_promtool_and_its_unit_tests() {
    let (ok, text) = promtool(&["check", "rules", "alert-rules.yml"]);
    assert!(ok, "{text}");
    let (ok, text) = promtool(&["test", "rules", "alert-rules.test.yml"]);
    assert!(ok, "{text}");
}

#[test]
fn the_dashboard_and_the_rules_name_only_metrics_the_mesh_emits() {
    let doc = std::fs::read_to_string(repo().join("docs/metrics.md")).unwrap();
    let documented: std::collections::BTreeSet<&str> = detour_registry::telemetry::documented(&doc)
        .into_iter()
        .map(|d| d.0)
        .collect();
    let dir = repo().join("deploy/observability");
    let dashboard = std::fs::read_to_string(dir.join("detour-dashboard.json")).unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).unwrap();
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    let rules = std::fs::read_to_string(dir.join("alert-rules.yml")).unwrap();
    for (file, text) in [("dashboard", &dashboard), ("rules", &rules)] {
        let names = metric_names(text);
        assert!(names.len() >= 5, "{file}: {names:?}");
        for name in names {
            assert!(
                documented.contains(name.as_str()),
                "{file} names {name}, which docs/metrics.md does not list"
            );
        }
    }
}

#[tokio::test]
async fn detourctl_stat_reports_what_callers_on_two_hosts_sent() {
    use tokio::io::AsyncBufReadExt;
    let provider =
        detour_kit::provider::DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
            .await
            .unwrap();
    let mut mesh = Mesh::new();
    let listener = |ip: &str| format!("[metrics]\nlisten = \"{ip}:0\"\n");
    let offer = [detour_tests::Offer::http1("hello", provider.addr())];
    mesh.start_with("h2", "127.0.0.2", &offer, &listener("127.0.0.2"))
        .await;
    mesh.start_with("h1", "127.0.0.1", &[], &listener("127.0.0.1"))
        .await;
    mesh.start_with("h3", "127.0.0.3", &[], &listener("127.0.0.3"))
        .await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    mesh.wait_endpoints("h3", "hello", 1).await;
    let bin = detour_kit::sidecar::find_binary("detourctl", "DETOURCTL_BIN").unwrap();
    let registry = detour_tests::dir_registry(&mesh);
    let mut stat = tokio::process::Command::new(bin)
        .args(["stat", "--window", "5", "--json", "--registry", &registry])
        .env_remove("DETOUR_REGISTRY")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The load starts once stat has its first scrape of every sidecar.
    let mut stderr = tokio::io::BufReader::new(stat.stderr.take().unwrap()).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), stderr.next_line())
        .await
        .unwrap()
        .unwrap()
        .unwrap_or_default();
    assert!(first.starts_with("stat: 3 sidecars scraped"), "{first}");
    let hello = ServiceName::new("hello").unwrap();
    let mut sent = 0;
    for (host, calls) in [("h1", 150), ("h3", 100)] {
        let client = mesh.client(host, AppProtocol::Http1);
        for _ in 0..calls {
            let req = Request::get("/").body(empty()).unwrap();
            assert_eq!(client.send(&hello, req).await.unwrap().status(), 200);
            sent += 1;
        }
    }
    let out = tokio::time::timeout(Duration::from_secs(20), stat.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(out.status.success());
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = rows
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "hello")
        .unwrap_or_else(|| panic!("no hello row: {rows}"));
    let counted = row["requests"].as_u64().unwrap();
    assert!(
        counted.abs_diff(sent) * 100 <= sent,
        "stat counted {counted} calls, the callers sent {sent}: {row}"
    );
    assert_eq!(row["success"], 1.0, "{row}");
    assert_eq!(row["paths"]["mesh"], 1.0, "{row}");
    assert!(row["p99_ms"].as_f64().unwrap() > 0.0, "{row}");
}

/// The JSON lines of `file` (none when it does not exist).
fn json_lines(file: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

#[tokio::test]
async fn each_request_has_an_access_log_line_at_the_ca_and_the_pa() {
    let provider =
        detour_kit::provider::DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
            .await
            .unwrap();
    let mut mesh = Mesh::new();
    let log = "[access_log]\npath = \"access.log\"\nmax_per_second = 0\n";
    let offer = [detour_tests::Offer::http1("hello", provider.addr())];
    mesh.start_with("h2", "127.0.0.2", &offer, log).await;
    mesh.start_with("h1", "127.0.0.1", &[], log).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let hello = ServiceName::new("hello").unwrap();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let send = || async {
        let req = Request::post("/orders?card=4111")
            .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
            .body(detour_thin_sdk::body::full("x"))
            .unwrap();
        assert_eq!(client.send(&hello, req).await.unwrap().status(), 200);
    };
    for _ in 0..10 {
        send().await;
    }
    let (ca_log, pa_log) = (
        mesh.root().join("h1/access.log"),
        mesh.root().join("h2/access.log"),
    );
    wait_until("10 lines at each side", Duration::from_secs(10), || {
        json_lines(&ca_log).len() >= 10 && json_lines(&pa_log).len() >= 10
    })
    .await;
    let ca = json_lines(&ca_log);
    let line = &ca[9];
    for (key, want) in [
        ("direction", "outbound"),
        ("service", "hello"),
        ("method", "POST"),
        ("path", "/orders"),
        ("link", "mesh"),
        ("trace_id", trace),
        ("endpoint", "h2-hello"),
    ] {
        assert_eq!(line[key], want, "{key} in {line}");
    }
    assert_eq!(
        (line["status"].as_u64(), line["attempts"].as_u64()),
        (Some(200), Some(1))
    );
    assert!(line["duration_ms"].as_f64().unwrap() > 0.0, "{line}");
    let pa = json_lines(&pa_log);
    assert_eq!(pa[9]["direction"], "inbound", "{}", pa[9]);
    assert_eq!(
        pa[9]["caller"], "spiffe://detour.local/host/h1",
        "{}",
        pa[9]
    );
    assert_eq!(pa[9]["link"], "local", "{}", pa[9]);
    assert_eq!(
        pa[9]["trace_id"], trace,
        "the PA sees the caller's traceparent"
    );

    // logrotate: the file moved away, then SIGHUP; new lines go to a new file.
    std::fs::rename(&ca_log, mesh.root().join("h1/access.log.1")).unwrap();
    mesh.signal("h1", nix::sys::signal::Signal::SIGHUP);
    let mut tries = 0;
    while json_lines(&ca_log).is_empty() {
        tries += 1;
        assert!(tries < 100, "no line in a new access.log after SIGHUP");
        send().await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(mesh.sidecar("h1").addrs.pid > 0);
    assert_eq!(
        detour_tests::admin_get(&mesh.admin("h1"), "/live").await.0,
        200,
        "SIGHUP left it running"
    );
}
