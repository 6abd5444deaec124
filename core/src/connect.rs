//! The seam where the data path touches the network: opening a connection to a [`Dial`].
//! [`NetConnect`] dials real TCP and Unix sockets; unit tests plug in-memory upstreams in
//! instead (`testing::MemoryNet`, feature `test-util`).

use std::future::Future;
use std::io;
use std::pin::Pin;

use crate::dial::{Dial, Stream};

/// A boxed connect future.
pub type Connecting<'a> = Pin<Box<dyn Future<Output = io::Result<Stream>> + Send + 'a>>;

/// Opens connections.
pub trait Connect: Send + Sync + 'static {
    /// Connects to `dial`.
    fn connect<'a>(&'a self, dial: &'a Dial) -> Connecting<'a>;
}

/// Real sockets: TCP (with `TCP_NODELAY`) and Unix.
#[derive(Debug, Clone, Copy, Default)]
pub struct NetConnect;

impl Connect for NetConnect {
    fn connect<'a>(&'a self, dial: &'a Dial) -> Connecting<'a> {
        Box::pin(Stream::connect(dial))
    }
}
