//! The mesh most process tests start from: `h1` (127.0.0.1) calling the service `hello` of `h2`
//! (127.0.0.2), whose one provider speaks HTTP/1.1.

use detour_kit::provider::DemoProvider;

use crate::{Mesh, Offer};

/// Starts a demo provider that answers as `name` on `ip` (a port the system chooses), then `h2`
/// offering it as `hello` over HTTP/1.1, then `h1` with nothing to offer; returns once `h1`
/// knows the endpoint.
pub async fn hello_mesh(ip: &str, name: &str) -> (DemoProvider, Mesh) {
    let at = format!("{ip}:0").parse().expect("an IP address");
    let provider = DemoProvider::start(at, name)
        .await
        .expect("the provider starts");
    let mut mesh = Mesh::new();
    mesh.start("h2", "127.0.0.2", &[Offer::http1("hello", provider.addr())])
        .await;
    mesh.start("h1", "127.0.0.1", &[]).await;
    mesh.wait_endpoints("h1", "hello", 1).await;
    (provider, mesh)
}
