//! How a request on an HTTP/2 connection ends when the peer sends GOAWAY: a stream above the
//! GOAWAY's last id was never processed (RFC 9113 §6.8) and may go elsewhere, one at or below
//! it that the connection then loses has an unknown outcome. Against a server written frame by
//! frame, so the GOAWAY's last id is exactly what the test says.

use std::time::Duration;

use bytes::Bytes;
use http::Request;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use super::*;

const SETTINGS: u8 = 0x4;
const HEADERS: u8 = 0x1;
const GOAWAY: u8 = 0x7;

async fn write_frame(s: &mut TcpStream, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    s.write_all(&f).await.unwrap();
}

/// Reads one frame: its type and stream id (the payload is skipped).
async fn read_frame(s: &mut TcpStream) -> Option<(u8, u32)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.ok()?;
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
    let mut payload = vec![0u8; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((head[3], stream))
}

/// Accepts one connection, waits for the first request's HEADERS, answers GOAWAY with
/// `last_id` (NO_ERROR), then either keeps the socket open (`close: false`) until the client
/// closes it, or closes it at once.
async fn goaway_server(last_id: u32, close: bool) -> (Dial, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dial = Dial::Tcp(l.local_addr().unwrap());
    let task = tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut preface = [0u8; 24];
        s.read_exact(&mut preface).await.unwrap();
        assert_eq!(&preface[..3], b"PRI");
        write_frame(&mut s, SETTINGS, 0, 0, &[]).await;
        while let Some((kind, stream)) = read_frame(&mut s).await {
            if kind == SETTINGS {
                write_frame(&mut s, SETTINGS, 0x1, 0, &[]).await;
            }
            if kind == HEADERS && stream != 0 {
                let mut goaway = last_id.to_be_bytes().to_vec();
                goaway.extend_from_slice(&0u32.to_be_bytes());
                write_frame(&mut s, GOAWAY, 0, 0, &goaway).await;
                if close {
                    return;
                }
            }
        }
    });
    (dial, task)
}

fn post() -> Request<BoxBody> {
    Request::post("http://provider/orders")
        .body(crate::body::full(Bytes::from_static(b"one order")))
        .unwrap()
}

/// One POST over HTTP/2 to the GOAWAY server, which must fail.
async fn post_failing(last_id: u32, close: bool) -> (Failed, tokio::task::JoinHandle<()>) {
    let (dial, server) = goaway_server(last_id, close).await;
    let pool = Pool::new(PoolOptions::default());
    let failed = tokio::time::timeout(
        Duration::from_secs(5),
        pool.send_once(&dial, AppProtocol::Http2, post()),
    )
    .await
    .expect("answered within 5 s")
    .unwrap_err();
    (failed, server)
}

#[tokio::test]
async fn a_stream_above_the_goaways_last_id_was_never_processed() {
    let (failed, server) = post_failing(0, false).await;
    assert!(
        matches!(failed.error, TransportError::Refused { .. }),
        "{}",
        failed.error
    );
    assert!(failed.error.never_left(), "{}", failed.error);
    assert_eq!(
        failed.outcome(Part::Provider),
        crate::decide::Outcome::NeverReached(Part::Provider)
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), server).await;
}

#[tokio::test]
async fn a_stream_the_goaway_kept_and_the_connection_lost_has_an_unknown_outcome() {
    let (failed, server) = post_failing(1, true).await;
    assert!(
        matches!(failed.error, TransportError::AfterSent { .. }),
        "{}",
        failed.error
    );
    assert!(!failed.error.never_left());
    assert_eq!(
        failed.outcome(Part::Provider),
        crate::decide::Outcome::Lost(Part::Provider)
    );
    let _ = server.await;
}
