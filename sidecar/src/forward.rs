//! One forwarding attempt to an upstream (a PA or a local provider), shared by both
//! directions: set the target, send with a timeout, clean the response.

use std::sync::Arc;
use std::time::Duration;

use detour_proto::AppProtocol;
use detour_thin_sdk::transport::set_target;
use detour_thin_sdk::{BoxBody, Dial, Failed, Pool};
use http::{Request, Response};

use crate::headers::strip_hop_by_hop;
use crate::respond::MeshError;

/// Why an attempt produced no response.
#[derive(Debug)]
pub enum AttemptError {
    /// Nothing usable came back; the request is lost to this attempt.
    Fatal(MeshError),
    /// The upstream refused the stream without processing it (HTTP/2 `REFUSED_STREAM`, or a
    /// stream above a GOAWAY's last id): safe to send again elsewhere, whatever the method.
    Refused(MeshError),
    /// The request never left and is handed back (a connect failure, a refused stream).
    NeverLeft {
        /// What happened.
        error: MeshError,
        /// The request, to send elsewhere (boxed: it is much larger than the other variant).
        request: Box<Request<BoxBody>>,
    },
}

/// Sends `req` to `dial` over `protocol` with `authority` as its target.
pub async fn attempt(
    pool: &Arc<Pool>,
    dial: &Dial,
    protocol: AppProtocol,
    authority: &str,
    req: Request<BoxBody>,
    timeout: Duration,
) -> Result<Response<BoxBody>, AttemptError> {
    let req = set_target(authority, protocol, req)
        .map_err(|e| AttemptError::Fatal(MeshError::Malformed(e.to_string())))?;
    match tokio::time::timeout(timeout, pool.send(dial, protocol, req)).await {
        Err(_) => Err(AttemptError::Fatal(MeshError::Timeout(
            timeout.as_millis() as u64
        ))),
        Ok(Ok(mut resp)) => {
            strip_hop_by_hop(resp.headers_mut());
            Ok(resp)
        }
        Ok(Err(Failed { error, request })) => match request {
            Some(request) => Err(AttemptError::NeverLeft {
                error: MeshError::UpstreamConnect(error.to_string()),
                request: Box::new(request),
            }),
            None if was_refused(&error) => Err(AttemptError::Refused(MeshError::UpstreamReset(
                error.to_string(),
            ))),
            None => Err(AttemptError::Fatal(MeshError::UpstreamReset(
                error.to_string(),
            ))),
        },
    }
}

/// Whether an HTTP/2 error says the stream was not processed (RFC 9113 §8.7).
fn was_refused(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = cur {
        if let Some(h2) = e.downcast_ref::<h2::Error>()
            && h2.reason() == Some(h2::Reason::REFUSED_STREAM)
        {
            return true;
        }
        cur = e.source();
    }
    false
}
