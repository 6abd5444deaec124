//! A host run as the shipped unit runs it: the watchdog, and so its sidecar, as an
//! unprivileged user with no capabilities (`deploy/detour-watchdog.service`: `User=detour`, an
//! empty ambient set, hardening). It serves with mutual TLS, registers its provider, and is
//! restarted as the same user after a crash: nothing in Detour needs root.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

use detour_kit::provider::DemoProvider;
use detour_kit::watched::WatchdogProcess;
use detour_proto::AppProtocol;
use detour_tests::scenario::hello;
use detour_tests::{Mesh, Offer};
use detour_thin_sdk::body::empty;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const NOBODY: u32 = 65534;

/// `Uid` (real) and `CapEff` of a process, from `/proc`.
fn uid_and_caps(pid: u32) -> (u32, String) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let uid = field("Uid:")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    (uid, field("CapEff:"))
}

fn chown_all(path: &Path, uid: u32) {
    let ok = std::process::Command::new("chown")
        .args(["-R", &format!("{uid}:{uid}")])
        .arg(path)
        .status()
        .unwrap()
        .success();
    assert!(ok, "chown -R {}", path.display());
}

#[tokio::test]
async fn a_host_runs_as_an_unprivileged_user_without_capabilities() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("skipped: needs root to switch to an unprivileged user");
        return;
    }
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    let root = mesh.root().to_owned();
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
    // The binaries where the user can run them, as an install would put them.
    let bin = root.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let sidecar = bin.join("detour-sidecar");
    std::fs::copy(mesh.sidecar_binary(), &sidecar).unwrap();
    let watchdog = bin.join("detour-watchdog");
    std::fs::copy(
        detour_kit::sidecar::find_binary("detour-watchdog", "DETOUR_WATCHDOG_BIN").unwrap(),
        &watchdog,
    )
    .unwrap();
    // What the unit does: a user of its own, no capabilities (bounding and inheritable).
    let as_nobody = root.join("as-nobody");
    std::fs::write(
        &as_nobody,
        format!(
            "#!/bin/sh\nexec setpriv --reuid={NOBODY} --regid={NOBODY} --clear-groups --inh-caps=-all --bounding-set=-all {} \"$@\"\n",
            watchdog.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&as_nobody, std::fs::Permissions::from_mode(0o755)).unwrap();

    let cfg = mesh.config(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr())],
        "",
    );
    // The host's own directories are the user's (the unit's RuntimeDirectory= and
    // StateDirectory=), its certificate and key readable by it.
    let run_dir = root.join("h2");
    std::fs::create_dir_all(&run_dir).unwrap();
    std::fs::create_dir_all(root.join("registry")).unwrap();
    std::fs::set_permissions(root.join("pki"), std::fs::Permissions::from_mode(0o755)).unwrap();
    for p in [run_dir.clone(), root.join("registry"), mesh.pki_dir("h2")] {
        chown_all(&p, NOBODY);
    }
    let w = WatchdogProcess::start(
        &as_nobody,
        &sidecar,
        &run_dir,
        &cfg,
        "127.0.0.2",
        "",
        Duration::from_secs(30),
    )
    .await
    .unwrap();
    mesh.watchdogs.insert("h2".into(), w);
    let (watchdog_pid, first) = {
        let w = mesh.watched("h2");
        (w.child.pid(), w.sidecar_pid().unwrap())
    };
    for pid in [watchdog_pid, first] {
        let (uid, caps) = uid_and_caps(pid);
        assert_eq!(uid, NOBODY, "pid {pid}");
        assert_eq!(caps, "0000000000000000", "pid {pid} has no capability");
    }

    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let call = || async {
        let req = http::Request::get("/").body(empty()).unwrap();
        let resp = client.send(&hello(), req).await.unwrap();
        (
            resp.status().as_u16(),
            resp.headers()["x-detour-path"].to_str().unwrap().to_owned(),
        )
    };
    assert_eq!(call().await, (200, "mesh".to_owned()));

    // A crash: the watchdog, itself unprivileged, starts a new sidecar as the same user.
    let w = mesh.watched("h2");
    kill(Pid::from_raw(first as i32), Signal::SIGKILL).unwrap();
    detour_tests::wait_until("a new sidecar", Duration::from_secs(20), || {
        w.sidecar_pid().is_some_and(|p| p != first)
            && std::fs::metadata(run_dir.join(detour_proto::ADDRESS_FILE)).is_ok()
    })
    .await;
    let second = w.sidecar_pid().unwrap();
    assert_eq!(uid_and_caps(second).0, NOBODY);
    detour_tests::wait_until(
        "the new sidecar serves the mesh",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(run_dir.join("sidecar.log"))
                .is_ok_and(|l| l.matches("sidecar ready").count() >= 2)
        },
    )
    .await;
    assert_eq!(call().await.0, 200);
}
