//! gRPC through the mesh: a tower service that tonic-generated clients can use as a channel.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use detour_proto::{AppProtocol, ServiceName};
use http::{Request, Response};

use detour_core::body::{BoxBody, BoxError, boxed};

use crate::client::Client;

/// A channel to one service for tonic clients (`FooClient::new(client.grpc(service))`).
#[derive(Clone, Debug)]
pub struct GrpcChannel {
    client: Client,
    service: ServiceName,
}

impl Client {
    /// A gRPC channel to `service` for tonic-generated clients.
    pub fn grpc(&self, service: ServiceName) -> GrpcChannel {
        GrpcChannel {
            client: self.clone(),
            service,
        }
    }
}

impl tower::Service<Request<tonic::body::Body>> for GrpcChannel {
    type Response = Response<BoxBody>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Response<BoxBody>, BoxError>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> Self::Future {
        let client = self.client.clone();
        let service = self.service.clone();
        Box::pin(async move {
            client
                .send_via(&service, AppProtocol::Http2, req.map(boxed))
                .await
                .map_err(Into::into)
        })
    }
}
