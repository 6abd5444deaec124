//! The watchdog on real processes, under steady SDK load with every request counted: a killed
//! or hung sidecar is restarted, a crash-looping host is marked `failed` (and its providers stay
//! reachable however long its sidecar is down), a sidecar is upgraded and rolled back by socket
//! hand-over without losing a request (`watchdog_adopt.rs`: the memory ceiling, a watchdog's
//! successor adopting the running sidecar, the documented environment variables).
//!
//! The tests run one at a time (they share two cores with the processes they measure).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use detour_kit::load::Stats;
use detour_kit::provider::DemoProvider;
use detour_kit::sidecar::find_binary;
use detour_registry::now_unix_ms;
use detour_tests::scenario::{at, spawn_load, summary};
use detour_tests::watchdog_host::{FAST, new_ready_sidecar, state, watched_caller};
use detour_tests::{Mesh, Offer, admin_get_json, wait_value};
use detour_thin_sdk::Client;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

fn assert_only_in_flight_lost(s: &Stats) {
    assert_eq!(s.sent, 5000, "every request was sent");
    assert_eq!(s.failed_idempotent, 0, "{:?}", s.failures);
    assert_eq!(s.failed, s.unknown_outcome, "{:?}", s.failures);
    assert!(s.failed <= 50, "{:?}", s.failures);
}

#[tokio::test]
async fn a_killed_sidecar_is_restarted_by_its_watchdog() {
    let _serial = detour_tests::serial().await;
    let (mesh, _p, client) = watched_caller(FAST).await;
    let w = mesh.watched("h1");
    let old = w.sidecar_pid().unwrap();
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 10);
    at(t0, 3.0).await;
    let fault = now_unix_ms();
    kill(Pid::from_raw(old as i32), Signal::SIGKILL).unwrap();
    let new = new_ready_sidecar(w, old, Duration::from_secs(10)).await;
    let ready_ms = now_unix_ms() - fault;
    let s = load.await.unwrap();
    summary("WATCHDOG", "sidecar-kill9", &s, fault, fault + ready_ms);
    println!("WATCHDOG sidecar-kill9: kill → ready again in {ready_ms} ms (pid {old} → {new})");
    assert_only_in_flight_lost(&s);
    let st = state(w).await;
    assert_eq!(st["watchdog"]["restarts"], 1, "{st}");
    assert!(
        st["watchdog"]["last_exit"]
            .as_str()
            .unwrap()
            .contains("signal 9"),
        "{st}"
    );
    assert!(s.paths.get("mesh").copied().unwrap_or(0) > 0);
    assert!(
        s.paths.get("direct").copied().unwrap_or(0) > 0,
        "{:?}",
        s.paths
    );
}

#[tokio::test]
async fn a_hung_sidecar_is_killed_and_replaced() {
    let _serial = detour_tests::serial().await;
    let (mesh, _p, client) = watched_caller(FAST).await;
    let w = mesh.watched("h1");
    let old = w.sidecar_pid().unwrap();
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 10);
    at(t0, 3.0).await;
    let fault = now_unix_ms();
    // Stopped and never resumed: only the watchdog can end it.
    kill(Pid::from_raw(old as i32), Signal::SIGSTOP).unwrap();
    let new = new_ready_sidecar(w, old, Duration::from_secs(15)).await;
    let replaced_ms = now_unix_ms() - fault;
    let s = load.await.unwrap();
    summary("WATCHDOG", "sidecar-hang", &s, fault, fault + replaced_ms);
    println!(
        "WATCHDOG sidecar-hang: stop → replaced and ready in {replaced_ms} ms (pid {old} → {new})"
    );
    // Idempotent calls waiting on the stopped sidecar were sent direct; POSTs sent to it
    // before the probes gave up on it (≈ 0.7 s) ended unknown when it was killed — never
    // sent twice.
    assert_eq!(s.sent, 5000);
    assert_eq!(s.failed_idempotent, 0, "{:?}", s.failures);
    assert_eq!(s.failed, s.unknown_outcome, "{:?}", s.failures);
    assert!(
        s.failed <= 400,
        "more than the POSTs of the detection time: {:?}",
        s.failures
    );
    let st = state(w).await;
    assert!(
        st["watchdog"]["last_exit"]
            .as_str()
            .unwrap()
            .starts_with("hung"),
        "{st}"
    );
}

/// A sidecar binary that exits at once while `{dir}/crash` exists, and is `real` otherwise.
fn flaky_binary(dir: &Path, real: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("flaky-sidecar");
    let script = format!(
        "#!/bin/sh\nif [ -e '{crash}' ]; then echo 'flaky-sidecar: crashing on purpose' >&2; exit 3; fi\nexec '{real}' \"$@\"\n",
        crash = dir.join("crash").display(),
        real = real.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// The host status `host` has in the directory registry.
fn registry_status(mesh: &Mesh, host: &str) -> String {
    let text = std::fs::read_to_string(mesh.root().join("registry").join(format!("{host}.json")))
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    v["status"]["sidecar"].as_str().unwrap_or("-").to_owned()
}

/// A caller h1 (plain sidecar) and a provider host h2 run by a watchdog whose sidecar binary
/// crashes on demand; `ttl_ms` for the directory registry.
async fn flaky_provider_host(ttl_ms: u64, watchdog_extra: &str) -> (Mesh, DemoProvider, Client) {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    let flaky = flaky_binary(mesh.root(), mesh.sidecar_binary());
    let ttl = format!("ttl_ms = {ttl_ms}");
    let h2 = mesh
        .config(
            "h2",
            "127.0.0.2",
            &[Offer::http1("hello", provider.addr())],
            "",
        )
        .replace("ttl_ms = 10000", &ttl);
    let h1 = mesh
        .config("h1", "127.0.0.1", &[], "")
        .replace("ttl_ms = 10000", &ttl);
    // The watchdog reads the sidecar config it is given: write h2's with the short TTL.
    mesh.start_watched_config("h2", "127.0.0.2", &h2, watchdog_extra, Some(&flaky))
        .await;
    mesh.start_config("h1", &h1).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let snap = mesh.root().join("sdk-snapshot.json");
    let client = detour_tests::ready_sdk(&mesh, "h1", "hello", &snap).await;
    (mesh, provider, client)
}

#[tokio::test]
async fn a_crash_looping_host_is_marked_failed_and_its_providers_stay_reachable() {
    let _serial = detour_tests::serial().await;
    let extra = "[crash_loop]\ncrashes = 3\nretry_ms = 1000\nclear_after_ms = 2000\n";
    let (mesh, _p, client) = flaky_provider_host(10_000, extra).await;
    let w = mesh.watched("h2");
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 11);
    at(t0, 3.0).await;
    std::fs::write(mesh.root().join("crash"), b"").unwrap();
    let fault = now_unix_ms();
    // A graceful stop (nothing in flight is lost); every restart then crashes at once.
    kill(
        Pid::from_raw(w.sidecar_pid().unwrap() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    let st = wait_value(
        "the crash loop",
        Duration::from_secs(8),
        || state(w),
        |s| s["watchdog"]["crash_loop"] == true,
    )
    .await;
    let marked_ms = now_unix_ms() - fault;
    assert_eq!(registry_status(&mesh, "h2"), "failed", "{st}");
    at(t0, 6.0).await;
    std::fs::remove_file(mesh.root().join("crash")).unwrap();
    let healed = now_unix_ms();
    wait_value(
        "the mark cleared",
        Duration::from_secs(8),
        || state(w),
        |s| s["watchdog"]["crash_loop"] == false && s["watchdog"]["sidecar_state"] == "ready",
    )
    .await;
    let cleared_ms = now_unix_ms() - healed;
    let s = load.await.unwrap();
    summary("WATCHDOG", "crash-loop", &s, fault, healed);
    println!(
        "WATCHDOG crash-loop: marked failed {marked_ms} ms after the first crash, cleared {cleared_ms} ms after the binary was fixed"
    );
    assert_eq!(s.sent, 5500);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert!(
        s.paths.get("ca_direct").copied().unwrap_or(0) > 0,
        "{:?}",
        s.paths
    );
    assert_eq!(registry_status(&mesh, "h2"), "ready");
}

#[tokio::test]
async fn a_sidecar_down_for_three_ttls_keeps_its_providers_registered_and_reachable() {
    let _serial = detour_tests::serial().await;
    let extra = "[crash_loop]\ncrashes = 100\n[restart]\nmax_backoff_ms = 400\n";
    let (mesh, _p, client) = flaky_provider_host(1000, extra).await;
    let w = mesh.watched("h2");
    let admin = mesh.admin("h1");
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 10);
    at(t0, 3.0).await;
    std::fs::write(mesh.root().join("crash"), b"").unwrap();
    let fault = now_unix_ms();
    kill(
        Pid::from_raw(w.sidecar_pid().unwrap() as i32),
        Signal::SIGTERM,
    )
    .unwrap();
    // Down for 4 s (4 TTLs): the caller sees h2's provider all along.
    let mut checks = 0;
    while now_unix_ms() < fault + 4000 {
        let st = admin_get_json(&admin, "/state").await;
        let n = st["services"]["hello"]["endpoints"]
            .as_array()
            .map_or(0, Vec::len);
        assert_eq!(n, 1, "h2's provider left the registry: {st}");
        checks += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(state(w).await["watchdog"]["sidecar_state"] == "down");
    std::fs::remove_file(mesh.root().join("crash")).unwrap();
    let healed = now_unix_ms();
    let s = load.await.unwrap();
    summary("WATCHDOG", "sidecar-down-long", &s, fault, healed);
    println!(
        "WATCHDOG sidecar-down-long: {checks} checks of the caller's catalog over 4 s (TTL 1 s)"
    );
    assert_eq!(s.sent, 5000);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert!(
        s.paths.get("ca_direct").copied().unwrap_or(0) > 0,
        "{:?}",
        s.paths
    );
}

/// `detourctl upgrade …` against `socket`: exit status, stdout and stderr.
async fn detourctl_upgrade(socket: &Path, args: &[&str]) -> (bool, String, String) {
    let bin = find_binary("detourctl", "DETOURCTL_BIN").unwrap();
    let out = tokio::process::Command::new(bin)
        .arg("upgrade")
        .args(args)
        .arg("--watchdog")
        .arg(socket)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn upgrades_and_rollbacks_lose_nothing_and_a_bad_binary_changes_nothing() {
    let _serial = detour_tests::serial().await;
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    // "Another version": a copy of the sidecar at another path.
    let other = mesh.root().join("detour-sidecar-other");
    std::fs::copy(mesh.sidecar_binary(), &other).unwrap();
    let offers = [Offer::http1("hello", provider.addr())];
    mesh.start_watched("h2", "127.0.0.2", &offers, "", FAST, None)
        .await;
    mesh.start_watched("h1", "127.0.0.1", &[], "", FAST, None)
        .await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let snap = mesh.root().join("sdk-snapshot.json");
    let client = detour_tests::ready_sdk(&mesh, "h1", "hello", &snap).await;
    let (w1, w2) = (mesh.watched("h1"), mesh.watched("h2"));
    let other_s = other.display().to_string();
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 1000, 10);
    let mut lines = Vec::new();
    for (when, w, args) in [
        (1.5, w1, vec!["--binary", other_s.as_str()]),
        (3.5, w2, vec!["--binary", other_s.as_str()]),
        (5.5, w1, vec!["--rollback"]),
        (7.5, w2, vec!["--rollback"]),
    ] {
        at(t0, when).await;
        let (ok, out, err) = detourctl_upgrade(&w.unix, &args).await;
        assert!(ok, "detourctl upgrade {args:?}: {out}{err}");
        println!(
            "WATCHDOG upgrade {} {args:?}: {}",
            w.run_dir.display(),
            out.trim()
        );
        lines.push(out);
    }
    let s = load.await.unwrap();
    summary("WATCHDOG", "sidecar-upgrade", &s, 0, 0);
    assert_eq!(s.sent, 10_000);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert_eq!(
        s.paths.get("mesh").copied().unwrap_or(0),
        10_000,
        "every request stayed on the mesh (no connection refused): {:?}",
        s.paths
    );
    for w in [w1, w2] {
        let st = state(w).await;
        assert_eq!(
            st["watchdog"]["binary"],
            mesh.sidecar_binary().display().to_string(),
            "{st}"
        );
    }
    // A binary that cannot become ready: the command fails with the reason, the running
    // sidecar serves on.
    let broken = mesh.root().join("broken-sidecar");
    std::fs::write(
        &broken,
        "#!/bin/sh\necho 'broken-sidecar: no' >&2\nexit 5\n",
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&broken, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let before = w1.sidecar_pid().unwrap();
    let (ok, out, err) =
        detourctl_upgrade(&w1.unix, &["--binary", &broken.display().to_string()]).await;
    assert!(!ok, "{out}");
    assert!(err.contains("ended before it was ready"), "{err}");
    assert!(
        err.contains("broken-sidecar: no"),
        "the reason shows its log: {err}"
    );
    assert_eq!(w1.sidecar_pid(), Some(before));
    let resp = client
        .send(
            &detour_tests::scenario::hello(),
            http::Request::get("/")
                .body(detour_thin_sdk::body::empty())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        detour_thin_sdk::path_taken(&resp),
        Some(detour_thin_sdk::PathTaken::Mesh)
    );
}
