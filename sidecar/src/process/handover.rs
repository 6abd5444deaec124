//! Socket hand-over, the heart of an upgrade without loss (`docs/upgrade.md` has the sequence).
//!
//! Every sidecar listens on `{run_dir}/handover.sock` (mode 0600). A successor started with
//! `--take-over` connects and writes `DETOUR-HANDOVER 1 <pid>`; the running sidecar answers with
//! one message: a JSON manifest naming each listening socket, and the sockets themselves as
//! `SCM_RIGHTS`. The successor serves on them and, once ready, writes `READY`; only then does the
//! running sidecar stop accepting, tell its SDKs to move, finish what is in flight and exit —
//! which closes the connection, so the successor knows its predecessor is gone. A successor that
//! goes away before `READY` changes nothing: the running sidecar carries on.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags, recvmsg, sendmsg,
};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};

use crate::process::lifecycle::Lifecycle;
use crate::process::listeners::{Listeners, ROLES};

const HELLO: &str = "DETOUR-HANDOVER 1";
const READY: &str = "READY";
/// How long each side waits for the other's next line before giving up on a hand-over.
const STEP: Duration = Duration::from_secs(60);

/// A hand-over that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoverError {
    /// The socket exchange failed.
    #[error("hand-over with {path}: {source}")]
    Io {
        /// The hand-over socket.
        path: String,
        /// What failed.
        #[source]
        source: std::io::Error,
    },
    /// The other side spoke something else.
    #[error("hand-over with {path}: {detail}")]
    Protocol {
        /// The hand-over socket.
        path: String,
        /// What was wrong.
        detail: String,
    },
}

/// The manifest that travels with the sockets.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// Protocol version (1).
    version: u32,
    /// The predecessor's process id.
    pid: u32,
    /// The role of each socket sent, in order (a subset of `ROLES`, in `ROLES` order).
    listeners: Vec<String>,
}

/// Serves hand-over requests for as long as the process runs. The first successor that reaches
/// `READY` gets a hand-off: `lifecycle.request_handover()`; its connection stays open until
/// this process exits.
pub async fn serve(listener: UnixListener, fds: Vec<Option<OwnedFd>>, lifecycle: Arc<Lifecycle>) {
    let fds = Arc::new(fds);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if lifecycle.handover_requested_now() {
            continue; // one successor only
        }
        let (fds, lifecycle) = (fds.clone(), lifecycle.clone());
        tokio::spawn(async move {
            match hand_over(stream, &fds).await {
                Ok(stream) => {
                    tracing::info!("successor ready: handing off");
                    lifecycle.request_handover();
                    // Held until this process exits: the successor's sign that it is gone.
                    let _keep = stream;
                    std::future::pending::<()>().await;
                }
                Err(e) => tracing::warn!(error = %e, "hand-over abandoned; serving on"),
            }
        });
    }
}

/// One exchange with a successor, up to its `READY`.
async fn hand_over(
    mut stream: UnixStream,
    fds: &[Option<OwnedFd>],
) -> Result<UnixStream, HandoverError> {
    let path = "successor".to_owned();
    let io = |source| HandoverError::Io {
        path: path.clone(),
        source,
    };
    let hello = read_line(&mut stream).await.map_err(io)?;
    if !hello.starts_with(HELLO) {
        return Err(HandoverError::Protocol {
            path,
            detail: format!("unexpected greeting {hello:?}"),
        });
    }
    tracing::info!(successor = %hello.trim_start_matches(HELLO).trim(), "a successor asks for the sockets");
    let listeners = ROLES
        .iter()
        .zip(fds)
        .filter(|(_, fd)| fd.is_some())
        .map(|(r, _)| (*r).to_owned())
        .collect();
    let manifest = Manifest {
        version: 1,
        pid: std::process::id(),
        listeners,
    };
    let mut bytes = serde_json::to_vec(&manifest).map_err(|e| io(e.into()))?;
    bytes.push(b'\n');
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().flatten().map(AsFd::as_fd).collect();
    send_with_fds(&stream, &bytes, &borrowed)
        .await
        .map_err(io)?;
    let answer = read_line(&mut stream).await.map_err(io)?;
    if answer != READY {
        return Err(HandoverError::Protocol {
            path,
            detail: format!("expected READY, got {answer:?}"),
        });
    }
    Ok(stream)
}

/// The predecessor, while a successor starts.
#[derive(Debug)]
pub struct Predecessor {
    stream: UnixStream,
    /// Its process id.
    pub pid: u32,
}

impl Predecessor {
    /// Tells the predecessor this process is ready: it stops accepting and hands off.
    pub async fn ready(&mut self) -> std::io::Result<()> {
        self.stream.write_all(format!("{READY}\n").as_bytes()).await
    }

    /// Resolves once the predecessor has exited (its end of the connection closed).
    pub async fn gone(mut self) {
        let mut buf = [0u8; 64];
        while matches!(self.stream.read(&mut buf).await, Ok(n) if n > 0) {}
    }
}

/// Takes the listening sockets over from the sidecar serving the hand-over socket at `path`.
pub async fn take_over(path: &Path) -> Result<(Listeners, Predecessor), HandoverError> {
    let shown = path.display().to_string();
    let io = |source| HandoverError::Io {
        path: shown.clone(),
        source,
    };
    let mut stream = UnixStream::connect(path).await.map_err(io)?;
    let hello = format!("{HELLO} {}\n", std::process::id());
    stream.write_all(hello.as_bytes()).await.map_err(io)?;
    let (bytes, fds) = recv_with_fds(&stream).await.map_err(io)?;
    let text = String::from_utf8_lossy(&bytes);
    let manifest: Manifest =
        serde_json::from_str(text.trim_end()).map_err(|e| HandoverError::Protocol {
            path: shown.clone(),
            detail: format!("unreadable manifest {text:?}: {e}"),
        })?;
    if manifest.version != 1 || manifest.listeners.len() != fds.len() {
        return Err(HandoverError::Protocol {
            path: shown,
            detail: format!(
                "manifest {manifest:?} does not match the {} sockets received",
                fds.len()
            ),
        });
    }
    let mut by_role: Vec<Option<OwnedFd>> = ROLES.iter().map(|_| None).collect();
    for (role, fd) in manifest.listeners.iter().zip(fds) {
        if let Some(i) = ROLES.iter().position(|r| r == role) {
            by_role[i] = Some(fd);
        }
    }
    let listeners = Listeners::from_fds(by_role).map_err(io)?;
    tracing::info!(predecessor = manifest.pid, sockets = ?manifest.listeners, "took the sockets over");
    Ok((
        listeners,
        Predecessor {
            stream,
            pid: manifest.pid,
        },
    ))
}

/// Reads one line (without its newline), a byte at a time: nothing after it is consumed.
async fn read_line(stream: &mut UnixStream) -> std::io::Result<String> {
    let read = async {
        let mut line = Vec::new();
        loop {
            let b = stream.read_u8().await?;
            if b == b'\n' {
                return Ok(String::from_utf8_lossy(&line).into_owned());
            }
            if line.len() >= 4096 {
                return Err(std::io::Error::other("line too long"));
            }
            line.push(b);
        }
    };
    tokio::time::timeout(STEP, read)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer"))?
}

async fn send_with_fds(
    stream: &UnixStream,
    bytes: &[u8],
    fds: &[BorrowedFd<'_>],
) -> std::io::Result<()> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(fds.len()))];
    loop {
        stream.writable().await?;
        let sent = stream.try_io(Interest::WRITABLE, || {
            let mut control = SendAncillaryBuffer::new(&mut space);
            if !control.push(SendAncillaryMessage::ScmRights(fds)) {
                return Err(std::io::Error::other("too many sockets for one message"));
            }
            let iov = [IoSlice::new(bytes)];
            Ok(sendmsg(stream, &iov, &mut control, SendFlags::empty())?)
        });
        match sent {
            Ok(n) if n == bytes.len() => return Ok(()),
            Ok(n) => {
                return Err(std::io::Error::other(format!(
                    "sent {n} of {} manifest bytes",
                    bytes.len()
                )));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Receives the manifest line and the sockets that came with it.
async fn recv_with_fds(stream: &UnixStream) -> std::io::Result<(Vec<u8>, Vec<OwnedFd>)> {
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(ROLES.len()))];
    let mut buf = vec![0u8; 4096];
    let mut fds = Vec::new();
    let mut got = Vec::new();
    let wait = async {
        while !got.ends_with(b"\n") {
            stream.readable().await?;
            let read = stream.try_io(Interest::READABLE, || {
                let mut control = RecvAncillaryBuffer::new(&mut space);
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg = recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
                for m in control.drain() {
                    if let RecvAncillaryMessage::ScmRights(received) = m {
                        fds.extend(received);
                    }
                }
                Ok(msg.bytes)
            });
            match read {
                Ok(0) => return Err(std::io::Error::other("closed before the manifest")),
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    };
    tokio::time::timeout(STEP, wait)
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "no manifest"))??;
    Ok((got, fds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_travel_and_keep_accepting() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "host = \"h1\"\nrun_dir = \"{}\"\n[outbound]\nlisten = \"127.0.0.1:0\"\n[inbound]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().display()
        );
        let cfg = crate::config::Config::parse("t", &text, Vec::new()).unwrap();
        let old = Listeners::bind(&cfg).unwrap();
        let inbound = old.inbound.local_addr().unwrap();
        let fds = old.dup().unwrap();
        let lifecycle = Lifecycle::new();
        let server = tokio::spawn(serve(old.handover, fds, lifecycle.clone()));
        let path = dir.path().join(crate::process::listeners::HANDOVER_SOCKET);
        let (new, mut pred) = take_over(&path).await.unwrap();
        assert_eq!(pred.pid, std::process::id());
        assert_eq!(new.inbound.local_addr().unwrap(), inbound);
        assert!(new.outbound_unix.is_some() && new.outbound_tcp.is_some());
        // The same socket: a connection made now is accepted by the successor's copy.
        drop(old.inbound);
        let client = tokio::net::TcpStream::connect(inbound).await.unwrap();
        let (accepted, _) = new.inbound.accept().await.unwrap();
        assert_eq!(accepted.peer_addr().unwrap(), client.local_addr().unwrap());
        assert!(!lifecycle.handover_requested_now());
        pred.ready().await.unwrap();
        lifecycle.handover_requested().await;
        server.abort();
    }
}
