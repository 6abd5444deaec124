//! Names from the network leave no state behind: a control session naming thousands of
//! services no one provides, while a mesh-off rule is in force, is answered for each name and
//! leaves the sidecar's gray decisions holding only services its catalog has.

#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

use std::time::Duration;

use detour_proto::control::SessionRequest;
use detour_proto::control::local_control_client::LocalControlClient;
use detour_tests::{admin_get_json, detourctl, dir_registry};

#[tokio::test]
async fn a_control_session_naming_unknown_services_leaves_no_gray_decision() {
    let (mesh, _provider) = detour_tests::caller_and_provider("").await;
    let reg = dir_registry(&mesh);
    let (code, out, err) = detourctl(&reg, &["gray", "set", "--id", "off", "--mesh", "off"]).await;
    assert_eq!(code, 0, "{out}{err}");
    let admin = mesh.admin("h1");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while admin_get_json(&admin, "/state").await["gray"]["rules"]["rules"]
        .as_array()
        .is_none_or(|r| r.is_empty())
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "h1 follows the rule"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let outbound = mesh.sidecars["h1"].addrs.outbound_tcp.unwrap();
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{outbound}"))
        .unwrap()
        .origin("http://detour.control".parse().unwrap())
        .connect()
        .await
        .unwrap();
    let mut names: Vec<String> = (0..3000).map(|i| format!("nobody-{i}")).collect();
    names.push("hello".into());
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(SessionRequest {
        app: "names".into(),
        services: names.clone(),
    })
    .await
    .unwrap();
    let mut events = LocalControlClient::new(channel)
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    // Names are taken in order: once `hello` (the last) is decided, every other name was.
    let mut got = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while admin_get_json(&admin, "/state").await["gray"]["mesh"]["hello"].is_null() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "hello decided within 30 s"
        );
        while let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::from_millis(20), events.message()).await
        {
            got += 1;
        }
    }
    assert!(got > names.len(), "a switch for every name: {got} events");
    let state = admin_get_json(&admin, "/state").await;
    let kept: Vec<&String> = state["gray"]["mesh"].as_object().unwrap().keys().collect();
    assert!(
        kept.len() == 1 && kept[0] == "hello",
        "only a service the catalog has is kept: {} kept, the first {:?}",
        kept.len(),
        &kept[..kept.len().min(5)]
    );
    assert_eq!(state["gray"]["mesh"]["hello"], false);
    drop(tx);
}
