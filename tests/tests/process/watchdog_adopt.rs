//! The watchdog on real processes, continued: a sidecar over its memory ceiling is replaced
//! without loss, a killed watchdog's successor adopts the running sidecar, and both binaries
//! start with their documented environment variables set.
//!
//! The tests run one at a time (they share two cores with the processes they measure).

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use detour_kit::sidecar::find_binary;
use detour_kit::watched::{WatchdogProcess, call};
use detour_tests::scenario::{at, spawn_load, summary};
use detour_tests::watchdog_host::{FAST, new_ready_sidecar, state, watched_caller};
use detour_tests::{Mesh, wait_value};
use detour_thin_sdk::{Client, Dial};
use http::Method;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

#[tokio::test]
async fn a_sidecar_over_its_memory_ceiling_is_replaced_without_loss() {
    let _serial = detour_tests::serial().await;
    // A ceiling every sidecar passes: it is replaced at every probe, by hand-over.
    let (mesh, _p, client) = watched_caller(&format!("{FAST}[memory]\nlimit_mb = 1\n")).await;
    let w = mesh.watched("h1");
    let first = w.sidecar_pid().unwrap();
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 6);
    at(t0, 6.0).await;
    let s = load.await.unwrap();
    summary("WATCHDOG", "memory-ceiling", &s, 0, 0);
    let st = state(w).await;
    println!("WATCHDOG memory-ceiling: {st}");
    assert!(
        st["watchdog"]["last_upgrade"]
            .as_str()
            .unwrap()
            .starts_with("ok"),
        "{st}"
    );
    assert_ne!(w.sidecar_pid(), Some(first), "replaced");
    assert_eq!(s.sent, 3000);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert_eq!(
        s.paths.get("mesh").copied().unwrap_or(0),
        3000,
        "{:?}",
        s.paths
    );
}

/// Processes whose command line runs the sidecar config `config`.
fn sidecars_running(config: &Path) -> usize {
    let want = config.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .bytes()
                .all(|b| b.is_ascii_digit())
        })
        .filter(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
                args.windows(2)
                    .any(|w| w[0] == b"--config" && w[1] == want.as_bytes())
            })
        })
        .count()
}

#[tokio::test]
async fn a_restarted_watchdog_adopts_the_running_sidecar() {
    let _serial = detour_tests::serial().await;
    let (mut mesh, _p, client) = watched_caller(FAST).await;
    let sidecar_config = mesh.root().join("h1").join("sidecar.toml");
    let pid = mesh.watched("h1").sidecar_pid().unwrap();
    // Count the sidecars of h1 every 20 ms throughout.
    let counting = {
        let cfg = sidecar_config.clone();
        tokio::spawn(async move {
            let mut most = 0;
            let end = tokio::time::Instant::now() + Duration::from_secs(13);
            while tokio::time::Instant::now() < end {
                most = most.max(sidecars_running(&cfg));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            most
        })
    };
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 500, 12);
    at(t0, 3.0).await;
    let w = mesh.watchdogs.remove("h1").unwrap();
    let (binary, run_dir, config) = (
        find_binary("detour-watchdog", "DETOUR_WATCHDOG_BIN").unwrap(),
        w.run_dir.clone(),
        w.config.clone(),
    );
    w.child.signal(Signal::SIGKILL).unwrap();
    let mut w = w;
    w.child.wait_exit(Duration::from_secs(5)).await.unwrap();
    std::mem::forget(w); // its drop would kill the sidecar too: the point is that it lives on
    at(t0, 6.0).await;
    let again = WatchdogProcess::start_with(&binary, &run_dir, &config, Duration::from_secs(10))
        .await
        .unwrap();
    let st = state(&again).await;
    assert_eq!(st["watchdog"]["adopted"], true, "{st}");
    assert_eq!(st["watchdog"]["sidecar_pid"], pid, "{st}");
    mesh.watchdogs.insert("h1".into(), again);
    let s = load.await.unwrap();
    let most = counting.await.unwrap();
    summary("WATCHDOG", "watchdog-kill9", &s, 0, 0);
    assert_eq!(most, 1, "exactly one sidecar ran throughout");
    assert_eq!(s.sent, 6000);
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    assert_eq!(
        s.paths.get("mesh").copied().unwrap_or(0),
        6000,
        "{:?}",
        s.paths
    );
    // The adopted sidecar's exit is seen too (it is not the new watchdog's child).
    kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let w = mesh.watched("h1");
    let new = new_ready_sidecar(w, pid, Duration::from_secs(10)).await;
    assert_ne!(new, pid);
}

#[tokio::test]
async fn both_binaries_start_with_their_documented_variables_set() {
    let _serial = detour_tests::serial().await;
    let mesh = Mesh::new();
    let run_dir = mesh.root().join("h1");
    std::fs::create_dir_all(&run_dir).unwrap();
    let cfg = mesh.config("h1", "127.0.0.1", &[], "");
    std::fs::write(run_dir.join("sidecar.toml"), &cfg).unwrap();
    let documented = [
        ("DETOUR_CONFIG", "/nonexistent/old-name.toml"),
        ("DETOUR_SIDECAR_BIN", "/nonexistent/detour-sidecar"),
        ("DETOUR_WATCHDOG_BIN", "/nonexistent/detour-watchdog"),
        ("DETOUR_WATCHDOG_SOCKET", "/nonexistent/watchdog.sock"),
        ("DETOUR_SIDECAR__NOT_A_KEY", "1"),
        ("DETOUR_WATCHDOG__NOT_A_KEY", "1"),
        ("DETOUR_SIDECAR__LINK__PROBE_INTERVAL_MS", "150"),
        ("DETOUR_WATCHDOG__PROBE__INTERVAL_MS", "200"),
    ];
    // The sidecar, with its config named by DETOUR_SIDECAR_CONFIG alone.
    let mut cmd = std::process::Command::new(mesh.sidecar_binary());
    cmd.env("DETOUR_SIDECAR_CONFIG", run_dir.join("sidecar.toml"))
        .envs(documented)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(run_dir.join("sidecar.log")).unwrap());
    let mut sidecar = detour_kit::process::ChildGuard::spawn(cmd, "sidecar").unwrap();
    let file = run_dir.join("sidecar.json");
    let text = wait_value(
        "the sidecar ready",
        Duration::from_secs(15),
        || async { std::fs::read_to_string(&file).unwrap_or_default() },
        |t| !t.is_empty(),
    )
    .await;
    let log = std::fs::read_to_string(run_dir.join("sidecar.log")).unwrap_or_default();
    assert!(
        sidecar.try_wait().unwrap().is_none(),
        "the sidecar exited:\n{log}"
    );
    let addrs: detour_proto::SidecarAddresses = serde_json::from_str(&text).unwrap();
    let log = std::fs::read_to_string(run_dir.join("sidecar.log")).unwrap();
    assert!(
        log.contains("DETOUR_SIDECAR__NOT_A_KEY"),
        "the stray key is named: {log}"
    );
    let admin = Client::builder(Dial::Tcp(addrs.admin))
        .control(false)
        .build();
    let (status, _) = detour_tests::admin_get(&admin, "/ready").await;
    assert_eq!(status, 200);
    sidecar.stop(Duration::from_secs(10)).await.unwrap();

    // The watchdog, with its config named by DETOUR_WATCHDOG_CONFIG alone.
    let wd_cfg = run_dir.join("watchdog.toml");
    std::fs::write(
        &wd_cfg,
        format!(
            "[sidecar]\nbinary = \"{}\"\nconfig = \"sidecar.toml\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            mesh.sidecar_binary().display()
        ),
    )
    .unwrap();
    let mut cmd =
        std::process::Command::new(find_binary("detour-watchdog", "DETOUR_WATCHDOG_BIN").unwrap());
    cmd.env("DETOUR_WATCHDOG_CONFIG", &wd_cfg)
        .envs(documented)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(run_dir.join("watchdog.log")).unwrap());
    let watchdog = detour_kit::process::ChildGuard::spawn(cmd, "watchdog").unwrap();
    let info: serde_json::Value = wait_value(
        "the watchdog running",
        Duration::from_secs(15),
        || async { std::fs::read_to_string(run_dir.join("watchdog.json")).unwrap_or_default() },
        |t| !t.is_empty(),
    )
    .await
    .parse()
    .unwrap();
    let admin: std::net::SocketAddr = info["admin"].as_str().unwrap().parse().unwrap();
    let ready = wait_value(
        "the watchdog's sidecar ready",
        Duration::from_secs(15),
        || async {
            call(
                &Dial::Tcp(admin),
                Method::GET,
                "/ready",
                None,
                Duration::from_secs(2),
            )
            .await
            .map(|(s, _)| s.as_u16())
            .unwrap_or(0)
        },
        |s| *s == 200,
    )
    .await;
    assert_eq!(ready, 200);
    let log = std::fs::read_to_string(run_dir.join("watchdog.log")).unwrap();
    assert!(log.contains("DETOUR_WATCHDOG__NOT_A_KEY"), "{log}");
    drop(watchdog);
    if let Ok(t) = std::fs::read_to_string(run_dir.join("sidecar.pid")) {
        let v: serde_json::Value = serde_json::from_str(&t).unwrap();
        let _ = kill(
            Pid::from_raw(v["pid"].as_i64().unwrap() as i32),
            Signal::SIGKILL,
        );
    }
}
