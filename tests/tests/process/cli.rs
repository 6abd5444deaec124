//! `detourctl demo` and `detourctl load` as an operator runs them.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::process::Command;

use detour_kit::sidecar::find_binary;
use detour_tests::caller_and_provider;

fn detourctl() -> Command {
    Command::new(find_binary("detourctl", "DETOURCTL_BIN").unwrap())
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("{key} missing in {line:?}"))
        .parse()
        .unwrap()
}

#[test]
fn demo_runs_a_mesh_and_ends_with_its_summary() {
    let out = detourctl()
        .args(["demo", "--duration", "3", "--rate", "100"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = stdout.lines().last().unwrap();
    assert!(last.starts_with("demo: sent="), "{last}");
    assert!(
        last.contains(" p50_ms=") && last.contains(" p99_ms="),
        "{last}"
    );
    assert_eq!(field(last, "failed"), 0);
    assert!(field(last, "ok") >= 250, "{last}");
    assert!(
        stdout.contains("h2-hello=") && stdout.contains("h3-hello="),
        "{stdout}"
    );
}

#[tokio::test]
async fn load_reports_outcomes_through_the_mesh_and_direct() {
    let (mesh, p) = caller_and_provider("").await;
    let sidecar = mesh.sidecar("h1").outbound().to_string();
    let direct = format!("http://{}", p.addr());
    let runs = [
        vec![
            "--sidecar",
            sidecar.as_str(),
            "--method",
            "MIX",
            "--body-bytes",
            "512",
        ],
        vec!["--direct", direct.as_str()],
    ];
    for extra in runs {
        let mut cmd = detourctl();
        cmd.args([
            "load",
            "--service",
            "hello",
            "--rate",
            "200",
            "--duration",
            "2",
        ])
        .args(&extra);
        let out = tokio::task::spawn_blocking(move || cmd.output())
            .await
            .unwrap()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "{stdout}");
        let summary = stdout.lines().find(|l| l.starts_with("load: ")).unwrap();
        assert_eq!(field(summary, "sent"), 400, "{summary}");
        assert_eq!(field(summary, "ok"), 400, "{summary}");
        assert_eq!(stdout.lines().last(), Some("failures: none"));
    }

    // Failures are counted by kind: a service nobody provides.
    let mut cmd = detourctl();
    cmd.args([
        "load",
        "--service",
        "nosuch",
        "--rate",
        "50",
        "--duration",
        "1",
        "--sidecar",
    ])
    .arg(&sidecar);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(stdout.contains("mesh:unknown-service=50"), "{stdout}");
}

#[test]
fn status_shows_registry_text_escaped_never_raw_to_the_terminal() {
    // A host record whose free text would clear the operator's screen, retitle the window and
    // forge a row of a healthy host.
    let dir = tempfile::tempdir().unwrap();
    let now = detour_registry::now_unix_ms();
    let evil = "1.0\u{1b}[2J\u{1b}]0;pwned\u{7}\nh8    ready";
    let record = serde_json::json!({
        "format": 1, "host": "h9", "heartbeat_unix_ms": now, "ttl_ms": 600_000,
        "status": {
            "host": "h9", "sidecar": "ready", "version": evil, "updated_unix_ms": now,
            "watchdog": {
                "binary": "/bin/x\u{1b}[31m", "since_unix_ms": now, "restarts": 0,
                "links": {}, "refused": "refused\u{1b}[1A\rh7 ok"
            }
        },
        "endpoints": []
    });
    std::fs::write(dir.path().join("h9.json"), record.to_string()).unwrap();
    let registry = format!("dir:{}", dir.path().display());
    let out = detourctl()
        .args(["status", "--registry", registry.as_str()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(!stdout.contains(['\u{1b}', '\u{7}', '\r']), "{stdout:?}");
    assert!(stdout.contains("1.0\\u{1b}[2J"), "{stdout}");
    assert!(stdout.contains("/bin/x\\u{1b}[31m"), "{stdout}");
    assert!(
        !stdout.lines().any(|l| l.starts_with("h8")),
        "a forged row: {stdout}"
    );
}
