//! Operational state that survives faults, on real processes: a sidecar restarted while etcd is
//! down keeps the rollback and the traffic policy it had (from its state directory); corrupt
//! state files are counted and ignored; endpoints their PA marked unhealthy are not drawn at the
//! CA; the watchdog reads only the keys it needs of a newer sidecar's config and takes
//! publications of the neighbouring protocol versions; a restarted watchdog keeps a crash loop
//! marked; a frozen watchdog's registrations are kept alive by its sidecar and handed back.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use detour_kit::provider::DemoProvider;
use detour_kit::watched::call;
use detour_proto::AppProtocol;
use detour_tests::etcd::Etcd;
use detour_tests::scenario::{at, hello, spawn_load, summary};
use detour_tests::{
    Mesh, Offer, admin_get, admin_get_json, body_text, detourctl, metric, wait_value,
};
use detour_thin_sdk::body::empty;
use detour_thin_sdk::{Client, Dial, PathTaken};
use http::Method;
use nix::sys::signal::Signal;

/// One GET of `hello` through `client`: the path it took.
async fn path_of(client: &Client) -> PathTaken {
    let resp = client
        .send(&hello(), http::Request::get("/").body(empty()).unwrap())
        .await
        .unwrap();
    if resp.status() != 200 {
        let (status, headers) = (resp.status(), format!("{:?}", resp.headers()));
        panic!("{status} {headers} {}", body_text(resp).await);
    }
    detour_thin_sdk::path_taken(&resp).unwrap()
}

/// `detourctl ARGS` on `registry`; it must succeed.
async fn ctl(registry: &str, args: &[&str]) {
    let (code, out, err) = detourctl(registry, args).await;
    assert_eq!(code, 0, "detourctl {args:?}: {out}{err}");
}

/// Waits until `f` holds of `host`'s `/state`.
async fn wait_state(mesh: &Mesh, host: &str, what: &str, f: impl Fn(&serde_json::Value) -> bool) {
    let admin = mesh.admin(host);
    wait_value(
        what,
        Duration::from_secs(15),
        || {
            let admin = admin.clone();
            async move { admin_get_json(&admin, "/state").await }
        },
        |s| f(s),
    )
    .await;
}

#[tokio::test]
async fn a_sidecar_restarted_while_etcd_is_down_keeps_the_rollback_and_the_policy() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    let mut etcd = Etcd::start(mesh.root()).await;
    let registry = format!("etcd:{}", etcd.url);
    mesh.use_registry(&registry);
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr())])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    // A plain client (no control session): the CA itself decides the path.
    let plain = Client::builder(mesh.outbound("h1"))
        .control(false)
        .timeout(Duration::from_secs(10))
        .build();
    assert_eq!(path_of(&plain).await, PathTaken::Mesh);

    ctl(
        &registry,
        &["rollback", "--service", "hello", "--reason", "test"],
    )
    .await;
    ctl(
        &registry,
        &[
            "policy",
            "set",
            "--service",
            "hello",
            "--request-timeout-ms",
            "4321",
        ],
    )
    .await;
    wait_state(&mesh, "h1", "the rollback and the policy applied", |s| {
        s["gray"]["rules"]["rules"][0]["service"] == "hello"
            && s["policy_overrides"]["hello"]["request_timeout_ms"] == 4321
            && s["documents"]["gray/rules"]["source"] == "registry"
    })
    .await;
    assert_eq!(path_of(&plain).await, PathTaken::CaDirect);

    // What a kill -9 may lose is the last 100 ms of catalog changes: wait until `hello` is in
    // the disk cache. Then etcd goes away, then the sidecar dies and starts again.
    detour_tests::wait_metric(
        &mesh.admin("h1"),
        "detour_catalog_cache_writes_total",
        "",
        1.0,
    )
    .await;
    etcd.stop().await;
    mesh.stop_with("h1", Signal::SIGKILL).await;
    mesh.restart("h1").await;
    let admin = mesh.admin("h1");
    let st = admin_get_json(&admin, "/state").await;
    assert_eq!(st["documents"]["gray/rules"]["source"], "disk", "{st}");
    assert_eq!(st["documents"]["policy/services"]["source"], "disk", "{st}");
    assert_eq!(
        st["policy_overrides"]["hello"]["request_timeout_ms"], 4321,
        "{st}"
    );
    let plain = Client::builder(mesh.outbound("h1"))
        .control(false)
        .timeout(Duration::from_secs(10))
        .build();
    for _ in 0..10 {
        assert_eq!(
            path_of(&plain).await,
            PathTaken::CaDirect,
            "the rollback holds after the restart"
        );
    }
    // The gray rules, the policy and the route document (absent from the registry: known to be
    // absent).
    assert_eq!(st["documents"]["routes/services"]["source"], "disk", "{st}");
    assert_eq!(
        metric(&admin, "detour_document_source", "source=\"disk\"").await,
        Some(3.0)
    );

    // etcd back: the registry's word (the same rules) takes over; the undo then applies.
    etcd.restart().await;
    wait_state(&mesh, "h1", "the registry read again", |s| {
        s["documents"]["gray/rules"]["source"] == "registry"
    })
    .await;
    ctl(&registry, &["rollback", "--undo"]).await;
    wait_state(&mesh, "h1", "the undo applied", |s| {
        s["gray"]["rules"]["rules"]
            .as_array()
            .is_some_and(Vec::is_empty)
    })
    .await;
    assert_eq!(path_of(&plain).await, PathTaken::Mesh);
    // Every change left an audit record.
    let (code, out, err) = detourctl(&registry, &["history", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let trail: serde_json::Value = serde_json::from_str(&out).unwrap();
    let commands: Vec<&str> = trail
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["command"].as_str().unwrap())
        .collect();
    assert_eq!(
        commands,
        ["rollback", "policy set", "rollback undo"],
        "{out}"
    );
}

#[tokio::test]
async fn corrupt_state_files_are_counted_and_ignored() {
    let mut mesh = Mesh::new();
    // An etcd nobody listens on: nothing but the state directory could say anything.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    mesh.use_registry(&format!("etcd:http://{}", dead.local_addr().unwrap()));
    drop(dead);
    let docs = mesh.root().join("h1").join("docs");
    std::fs::create_dir_all(&docs).unwrap();
    std::fs::write(docs.join("gray-rules.json"), b"\x00{not json").unwrap();
    std::fs::write(
        docs.join("policy-services.json"),
        br#"{"format":1,"doc":"policy/services","revision":3,"saved_unix_ms":1,"content":"{broken"}"#,
    )
    .unwrap();
    mesh.start("h1", "127.0.0.1", &[]).await;
    let admin = mesh.admin("h1");
    assert_eq!(admin_get(&admin, "/ready").await.0, 200);
    let st = admin_get_json(&admin, "/state").await;
    assert_eq!(st["documents"]["gray/rules"]["source"], "default", "{st}");
    assert_eq!(
        st["documents"]["policy/services"]["source"], "default",
        "{st}"
    );
    for file in ["gray-rules.json", "policy-services.json"] {
        assert_eq!(
            metric(
                &admin,
                "detour_state_file_errors_total",
                &format!("file=\"{file}\"")
            )
            .await,
            Some(1.0),
            "{file}"
        );
    }
    let log = std::fs::read_to_string(mesh.root().join("h1").join("sidecar.log")).unwrap();
    assert!(log.contains("ignoring an unusable state file"), "{log}");
    assert!(
        log.contains("no saved copy of the document"),
        "the defaults are announced: {log}"
    );
}

#[tokio::test]
async fn endpoints_their_pa_marked_unhealthy_are_not_drawn_at_the_ca() {
    let good = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "good")
        .await
        .unwrap();
    let sick = DemoProvider::start("127.0.0.3:0".parse().unwrap(), "sick")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", good.addr())])
        .await;
    // h3's provider is health-checked with `GET /healthz` every 100 ms.
    let h3 = mesh
        .config("h3", "127.0.0.3", &[], "")
        .replace("[inbound]\n", "[inbound]\ncheck_interval_ms = 100\n")
        + &format!(
            "[[provide]]\nservice = \"hello\"\naddress = \"{}\"\ncheck_path = \"/healthz\"\n",
            sick.addr()
        );
    mesh.start_config("h3", &h3).await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 2).await;
    // The provider on h3 fails its health checks (it still answers requests): its PA marks it
    // unhealthy in the registry.
    sick.set_healthy(false);
    wait_state(&mesh, "h1", "h3's endpoint marked unhealthy", |s| {
        s["services"]["hello"]["endpoints"]
            .as_array()
            .is_some_and(|e| e.iter().any(|e| e["healthy"] == false))
    })
    .await;
    let before = sick.served();
    let plain = Client::builder(mesh.outbound("h1"))
        .control(false)
        .timeout(Duration::from_secs(10))
        .build();
    for _ in 0..40 {
        let resp = plain
            .send(&hello(), http::Request::get("/").body(empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(body_text(resp).await, "hello from good\n");
    }
    assert_eq!(
        sick.served(),
        before,
        "no request went to the unhealthy endpoint"
    );
}

/// A sidecar binary standing for a *newer* release: its config carries a key this build does not
/// know, which the wrapper strips before running the real sidecar.
fn newer_sidecar(dir: &std::path::Path, real: &std::path::Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = dir.join("newer-sidecar");
    let script = format!(
        "#!/bin/sh\n# args: --config FILE [more]\ncfg=\"$2\"; shift 2\ngrep -v '^feature_of_tomorrow' \"$cfg\" > \"$cfg.today\"\nexec '{real}' --config \"$cfg.today\" \"$@\"\n",
        real = real.display()
    );
    std::fs::write(&path, script).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

#[tokio::test]
async fn a_watchdog_runs_a_newer_sidecar_and_takes_neighbouring_protocols() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    let newer = newer_sidecar(mesh.root(), mesh.sidecar_binary());
    let cfg = mesh
        .config(
            "h2",
            "127.0.0.2",
            &[Offer::http1("hello", provider.addr())],
            "",
        )
        .replacen("host = ", "feature_of_tomorrow = 1\nhost = ", 1);
    mesh.start_watched_config("h2", "127.0.0.2", &cfg, "", Some(&newer))
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    // The watchdog's socket takes publications of protocol N-1 (no field), N and N+1, and
    // refuses others with a reason; it states its own.
    let socket = Dial::Unix(mesh.watched("h2").unix.clone());
    let publication = |protocol: Option<u32>| {
        let mut v = serde_json::json!({"pid": 1, "endpoints": []});
        if let Some(p) = protocol {
            v["protocol"] = p.into();
        }
        v.to_string()
    };
    let n = detour_proto::PUBLICATION_PROTOCOL;
    for (protocol, ok) in [
        (None, true),
        (Some(n - 1), true),
        (Some(n), true),
        (Some(n + 1), true),
        (Some(n + 2), false),
        (Some(0), false),
    ] {
        let (status, text) = call(
            &socket,
            Method::PUT,
            "/v1/publication",
            Some(publication(protocol).into_bytes()),
            Duration::from_secs(5),
        )
        .await
        .unwrap();
        assert_eq!(status.is_success(), ok, "{protocol:?}: {status} {text}");
        if !ok {
            assert!(text.contains("protocol"), "{text}");
        }
    }
    // The real sidecar publishes again within a second: its provider stays reachable.
    mesh.wait_endpoints("h1", "hello", 1).await;
    let client = mesh.client("h1", AppProtocol::Http1);
    let resp = client
        .send(&hello(), http::Request::get("/").body(empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// The watchdog's `/state`.
async fn watchdog_state(mesh: &Mesh, host: &str) -> serde_json::Value {
    let (_, text) = call(
        &Dial::Tcp(mesh.watched(host).admin),
        Method::GET,
        "/state",
        None,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[tokio::test]
async fn a_frozen_watchdogs_registrations_are_kept_by_its_sidecar_and_handed_back() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    let etcd = Etcd::start(mesh.root()).await;
    mesh.use_registry(&format!("etcd:{}", etcd.url));
    let ttl = "[registry_etcd]\nttl_ms = 4000\n";
    mesh.start_watched(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr())],
        ttl,
        "",
        None,
    )
    .await;
    mesh.start_with("h1", "127.0.0.1", &[], ttl).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    let snap = mesh.root().join("sdk-snapshot.json");
    let client = detour_tests::ready_sdk(&mesh, "h1", "hello", &snap).await;
    let mut raw = etcd.raw().await;
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    let t0 = tokio::time::Instant::now();
    let load = spawn_load(&client, 200, 19);
    at(t0, 2.0).await;
    let watchdog = &mesh.watched("h2").child;
    watchdog.signal(Signal::SIGSTOP).unwrap();
    let fault = detour_registry::now_unix_ms();
    // Frozen for 13 s (over three TTLs): the provider's key is in etcd at every look.
    let mut looks = 0;
    while detour_registry::now_unix_ms() < fault + 13_000 {
        let n = raw
            .get("/detour/v1/services/hello/", Some(opts.clone()))
            .await
            .unwrap()
            .count();
        assert_eq!(
            n,
            1,
            "h2's provider left etcd {} ms into the freeze",
            detour_registry::now_unix_ms() - fault
        );
        looks += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    watchdog.signal(Signal::SIGCONT).unwrap();
    let healed = detour_registry::now_unix_ms();
    let h2 = mesh.admin("h2");
    assert!(
        metric(&h2, "detour_watchdog_takeovers_total", "event=\"taken\"")
            .await
            .unwrap_or(0.0)
            >= 1.0
    );
    detour_tests::wait_metric(
        &h2,
        "detour_watchdog_takeovers_total",
        "event=\"returned\"",
        1.0,
    )
    .await;
    let s = load.await.unwrap();
    summary("STATE", "watchdog-frozen", &s, fault, healed);
    println!(
        "STATE watchdog-frozen: {looks} looks at etcd over the freeze, every one found the provider"
    );
    assert_eq!(s.failed, 0, "{:?}", s.failures);
    // Handed back: with the sidecar gone for good (kill -9), the watchdog's lease alone keeps the
    // registration (the sidecar's lease runs out within 4 s).
    let pid = mesh.watched("h2").sidecar_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    let gone = tokio::time::Instant::now();
    while gone.elapsed() < Duration::from_secs(7) {
        let n = raw
            .get("/detour/v1/services/hello/", Some(opts.clone()))
            .await
            .unwrap()
            .count();
        assert_eq!(n, 1, "the watchdog holds the registration again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let st = watchdog_state(&mesh, "h2").await;
    assert_eq!(
        st["publication_protocol"],
        detour_proto::PUBLICATION_PROTOCOL
    );
}

#[tokio::test]
async fn a_restarted_watchdog_keeps_the_crash_loop_mark() {
    let provider = DemoProvider::start("127.0.0.2:0".parse().unwrap(), "h2-hello")
        .await
        .unwrap();
    let mut mesh = Mesh::new();
    // A binary that crashes while `crash` exists.
    let flaky = mesh.root().join("flaky-sidecar");
    {
        use std::os::unix::fs::PermissionsExt;
        let script = format!(
            "#!/bin/sh\nif [ -e '{crash}' ]; then exit 3; fi\nexec '{real}' \"$@\"\n",
            crash = mesh.root().join("crash").display(),
            real = mesh.sidecar_binary().display()
        );
        std::fs::write(&flaky, script).unwrap();
        std::fs::set_permissions(&flaky, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let extra = "[crash_loop]\ncrashes = 3\nretry_ms = 500\nclear_after_ms = 3000\n[restart]\nbackoff_ms = 50\n";
    mesh.start_watched(
        "h2",
        "127.0.0.2",
        &[Offer::http1("hello", provider.addr())],
        "",
        extra,
        Some(&flaky),
    )
    .await;
    let registry = mesh.root().join("registry").join("h2.json");
    let status = || {
        let text = std::fs::read_to_string(&registry).unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        v["status"]["sidecar"].as_str().unwrap_or("-").to_owned()
    };
    std::fs::write(mesh.root().join("crash"), b"").unwrap();
    let pid = mesh.watched("h2").sidecar_pid().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_value(
        "the crash loop",
        Duration::from_secs(10),
        || async { watchdog_state(&mesh, "h2").await["watchdog"]["crash_loop"].clone() },
        |v| *v == true,
    )
    .await;
    assert_eq!(status(), "failed");
    let before = watchdog_state(&mesh, "h2").await;
    // The watchdog dies and a new one starts, with the binary fixed meanwhile: the sidecar it
    // starts is ready at once, yet the host stays `failed` until it has been ready 3 s.
    let w = mesh.watchdogs.remove("h2").unwrap();
    let (run_dir, config) = (w.run_dir.clone(), w.config.clone());
    w.child.signal(Signal::SIGKILL).unwrap();
    let mut w = w;
    w.child.wait_exit(Duration::from_secs(5)).await.unwrap();
    drop(w);
    std::fs::remove_file(mesh.root().join("crash")).unwrap();
    let binary =
        detour_kit::sidecar::find_binary("detour-watchdog", "DETOUR_WATCHDOG_BIN").unwrap();
    let again = detour_kit::watched::WatchdogProcess::start_with(
        &binary,
        &run_dir,
        &config,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    mesh.watchdogs.insert("h2".into(), again);
    let st = watchdog_state(&mesh, "h2").await;
    assert_eq!(st["watchdog"]["crash_loop"], true, "{st}");
    assert_eq!(
        st["watchdog"]["restarts"], before["watchdog"]["restarts"],
        "the restart count carries on: {st}"
    );
    assert_eq!(
        status(),
        "failed",
        "still marked after the watchdog's restart"
    );
    wait_value(
        "the mark cleared",
        Duration::from_secs(10),
        || async { watchdog_state(&mesh, "h2").await["watchdog"]["crash_loop"].clone() },
        |v| *v == false,
    )
    .await;
    wait_value(
        "the host ready again",
        Duration::from_secs(5),
        || async { status() },
        |s| s == "ready",
    )
    .await;
    // A damaged state file is counted and ignored by the next watchdog.
    let state_file = run_dir.join(detour_watchdog::kept::STATE_FILE);
    assert!(state_file.exists());
    let w = mesh.watchdogs.remove("h2").unwrap();
    w.child.signal(Signal::SIGKILL).unwrap();
    let mut w = w;
    w.child.wait_exit(Duration::from_secs(5)).await.unwrap();
    drop(w);
    std::fs::write(&state_file, b"{garbage").unwrap();
    let again = detour_kit::watched::WatchdogProcess::start_with(
        &binary,
        &run_dir,
        &config,
        Duration::from_secs(20),
    )
    .await
    .unwrap();
    let (_, metrics) = call(
        &Dial::Tcp(again.admin),
        Method::GET,
        "/metrics",
        None,
        Duration::from_secs(2),
    )
    .await
    .unwrap();
    mesh.watchdogs.insert("h2".into(), again);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("detour_state_file_errors_total")
                && l.contains("watchdog-state.json")),
        "{metrics}"
    );
}
