//! Gray rules that move a host's sidecar binary, and rules that outlive their registry, on
//! real processes: a version rule moves one watched host to another sidecar binary and
//! `rollback --version` moves it back; rules in etcd hold through its outage.
//!
//! The tests run one at a time (they share two cores with the processes they measure).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::process::Stdio;
use std::time::Duration;

use detour_kit::provider::DemoProvider;
use detour_kit::sidecar::find_binary;
use detour_registry::now_unix_ms;
use detour_tests::gray::{ok, path_of, set_h1_off, status};
use detour_tests::scenario::{at, spawn_load};
use detour_tests::{Mesh, Offer, admin_get_json, detourctl, dir_registry, wait_value};
use serde_json::Value;

#[tokio::test]
async fn a_version_rule_moves_one_host_and_rollback_version_moves_it_back() {
    let _serial = detour_tests::serial().await;
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    let other = mesh.root().join("detour-sidecar-v2");
    std::fs::copy(mesh.sidecar_binary(), &other).unwrap();
    mesh.start_watched(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr())],
        "",
        "",
        None,
    )
    .await;
    // Version rules may only name binaries of this directory (with their sha256).
    let binaries = format!("[upgrade]\nbinaries_dir = \"{}\"\n", mesh.root().display());
    mesh.start_watched("h1", "127.0.0.1", &[], "", &binaries, None)
        .await;
    mesh.start_watched("h3", "127.0.0.3", &[], "", &binaries, None)
        .await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client =
        detour_tests::ready_sdk(&mesh, "h1", "hello", &mesh.root().join("snap.json")).await;
    let reg = dir_registry(&mesh);
    let base = mesh.sidecar_binary().display().to_string();
    let other_s = other.display().to_string();
    let binary_of = |st: &Value, host: &str| {
        st["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["host"] == host)
            .map(|h| h["binary"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 14);
    at(t0, 2.0).await;
    let moved = now_unix_ms();
    ok(
        &reg,
        &[
            "gray",
            "set",
            "--id",
            "canary",
            "--sidecar-binary",
            &other_s,
            "--sidecar-version",
            "v2",
            "--hosts",
            "h1",
        ],
    )
    .await;
    let st = wait_value(
        "h1 on the v2 binary",
        Duration::from_secs(8),
        || status(&reg),
        |st| binary_of(st, "h1") == format!("{other_s} (v2)"),
    )
    .await;
    let moved_ms = now_unix_ms() - moved;
    assert_eq!(binary_of(&st, "h2"), base, "{st}");
    assert_eq!(binary_of(&st, "h3"), base, "{st}");
    // A rule naming a binary outside the binaries directory, then one in it with a wrong
    // sha256: h3's sidecar serves on, nothing of them runs, its watchdog says why.
    let h3_pid = mesh.watched("h3").sidecar_pid().unwrap();
    let zeros = "0".repeat(64);
    ok(
        &reg,
        &[
            "gray",
            "set",
            "--id",
            "typo",
            "--sidecar-binary",
            "/nonexistent/detour-sidecar",
            "--sidecar-sha256",
            &zeros,
            "--hosts",
            "h3",
        ],
    )
    .await;
    let w3 = mesh.watched("h3");
    wait_value(
        "h3's watchdog to refuse the missing binary",
        Duration::from_secs(5),
        || async {
            let (_, text) = detour_kit::watched::call(
                &detour_thin_sdk::Dial::Tcp(w3.admin),
                http::Method::GET,
                "/state",
                None,
                Duration::from_secs(2),
            )
            .await
            .unwrap();
            serde_json::from_str::<Value>(&text).unwrap()
        },
        |s| {
            s["watchdog"]["last_upgrade"]
                .as_str()
                .is_some_and(|u| u.contains("refused") && u.contains("not in the binaries"))
        },
    )
    .await;
    assert_eq!(mesh.watched("h3").sidecar_pid().unwrap(), h3_pid);
    let marker = mesh.root().join("evil-ran");
    let evil = mesh.root().join("evil-sidecar");
    std::fs::write(
        &evil,
        format!("#!/bin/sh\ntouch '{}'\nsleep 60\n", marker.display()),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&evil, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    ok(
        &reg,
        &[
            "gray",
            "set",
            "--id",
            "typo",
            "--sidecar-binary",
            "evil-sidecar",
            "--sidecar-sha256",
            &zeros,
            "--hosts",
            "h3",
        ],
    )
    .await;
    wait_value(
        "h3's watchdog to refuse the wrong sha256",
        Duration::from_secs(5),
        || async { status(&reg).await },
        |st| {
            st["hosts"].as_array().unwrap().iter().any(|h| {
                h["host"] == "h3" && h["refused"].as_str().is_some_and(|r| r.contains("sha256"))
            })
        },
    )
    .await;
    assert!(
        !marker.exists(),
        "the binary with the wrong sha256 never ran"
    );
    assert_eq!(mesh.watched("h3").sidecar_pid().unwrap(), h3_pid);
    ok(&reg, &["gray", "clear", "--id", "typo"]).await;
    // A manual upgrade of a host a version rule governs is refused (the rule would undo it).
    let w = mesh.watched("h1");
    let bin = find_binary("detourctl", "DETOURCTL_BIN").unwrap();
    let out = tokio::process::Command::new(bin)
        .args(["upgrade", "--rollback", "--watchdog"])
        .arg(&w.unix)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("gray rule \"canary\" decides"), "{err}");
    at(t0, 7.0).await;
    let rolled = now_unix_ms();
    let out = ok(
        &reg,
        &["rollback", "--version", "--reason", "v2 canary bad"],
    )
    .await;
    println!("GRAY version: {}", out.trim());
    let st = wait_value(
        "h1 back on its previous binary",
        Duration::from_secs(8),
        || status(&reg),
        |st| binary_of(st, "h1") == base,
    )
    .await;
    let back_ms = now_unix_ms() - rolled;
    assert_eq!(binary_of(&st, "h2"), base, "{st}");
    let s = load.await.unwrap();
    println!(
        "RESULT gray-version: sent={} ok={} failed={} mesh={} direct={} ca_direct={} moved_ms={moved_ms} rollback_version_ms={back_ms}",
        s.sent,
        s.ok,
        s.failed,
        s.paths.get("mesh").copied().unwrap_or(0),
        s.paths.get("direct").copied().unwrap_or(0),
        s.paths.get("ca_direct").copied().unwrap_or(0),
    );
    assert_eq!(s.sent, 7000);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    // (Usually every request stays on the mesh; when the machine is too busy for the probes
    // of a freshly started sidecar to be answered in time, some go around it — none fail.)
    assert!(
        s.paths.get("mesh").copied().unwrap_or(0) > 0,
        "{:?}",
        s.paths
    );
    let restarts = status(&reg).await["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "h1")
        .map(|h| h["restarts"].clone())
        .unwrap();
    assert_eq!(restarts, 0, "upgrades are not restarts");
}

/// The bytes of the directory registry's rules document.
#[tokio::test]
async fn rules_in_etcd_hold_through_its_outage() {
    let _serial = detour_tests::serial().await;
    let mut mesh = Mesh::new();
    let mut etcd = detour_tests::etcd::Etcd::start(mesh.root()).await;
    let reg = format!("etcd:{}", etcd.url);
    mesh.use_registry(&reg);
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr())])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client =
        detour_tests::ready_sdk(&mesh, "h1", "hello", &mesh.root().join("snap.json")).await;
    let admin = mesh.admin("h1");
    set_h1_off(&reg).await;
    let direct = || async { path_of(&client, "hello").await.as_str() };
    wait_value(
        "h1's SDK to call direct",
        Duration::from_secs(5),
        direct,
        |p| *p == "direct",
    )
    .await;
    etcd.stop().await;
    for args in [
        vec!["gray", "set", "--id", "x", "--mesh", "off"],
        vec!["gray", "clear", "--all"],
        vec!["rollback", "--undo"],
        vec!["rollback"],
        vec!["status"],
    ] {
        let (code, out, err) = detourctl(&reg, &args).await;
        assert_eq!(code, 3, "detourctl {args:?} with etcd down: {out}{err}");
        assert!(
            err.contains("unavailable") || err.contains("unreachable"),
            "{err}"
        );
    }
    // The sidecar keeps the rules it had: its SDK still calls direct, for a while.
    for _ in 0..10 {
        assert_eq!(direct().await, "direct");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let st = admin_get_json(&admin, "/state").await;
    assert_eq!(
        st["gray"]["rules"]["rules"][0]["id"], "h1-off",
        "{}",
        st["gray"]
    );
    etcd.restart().await;
    ok(&reg, &["gray", "clear", "--all"]).await;
    wait_value(
        "h1's SDK back on the mesh",
        Duration::from_secs(10),
        direct,
        |p| *p == "mesh",
    )
    .await;
}
