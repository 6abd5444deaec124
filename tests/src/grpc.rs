//! The gRPC test provider (`detour.test.echo.Echo`), served by tonic on a real port.

use std::net::SocketAddr;
use std::pin::Pin;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::Stream;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

/// Generated code of the test service.
pub mod pb {
    #![allow(missing_docs, clippy::all, clippy::unwrap_used)]
    tonic::include_proto!("detour.test.echo");
}

use pb::echo_server::{Echo, EchoServer};
use pb::{CountRequest, EchoReply, EchoRequest};

struct EchoService {
    name: String,
}

#[tonic::async_trait]
impl Echo for EchoService {
    async fn say(&self, req: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        Ok(Response::new(EchoReply {
            text: req.into_inner().text,
            served_by: self.name.clone(),
        }))
    }

    type CountStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

    async fn count(
        &self,
        req: Request<CountRequest>,
    ) -> Result<Response<Self::CountStream>, Status> {
        let n = req.into_inner().n;
        let name = self.name.clone();
        let items = (1..=n).map(move |i| {
            Ok(EchoReply {
                text: i.to_string(),
                served_by: name.clone(),
            })
        });
        Ok(Response::new(Box::pin(tokio_stream::iter(items))))
    }
}

/// A running gRPC provider; stops when dropped.
pub struct GrpcProvider {
    /// Where it listens.
    pub addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for GrpcProvider {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl GrpcProvider {
    /// Serves the echo service on `ip` (port chosen by the OS) as `name`.
    pub async fn start(ip: &str, name: &str) -> GrpcProvider {
        let listener = TcpListener::bind((ip, 0))
            .await
            .expect("bind gRPC provider");
        let addr = listener.local_addr().expect("local addr");
        let svc = EchoServer::new(EchoService { name: name.into() });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        GrpcProvider { addr, task }
    }
}
