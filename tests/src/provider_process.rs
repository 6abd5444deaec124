//! A demo provider in a process of its own, for the faults only a process shows.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use detour_kit::process::ChildGuard;
use detour_kit::sidecar::find_binary;

use crate::wait_value;

/// A demo provider in its own process (`detourctl provider`), for faults only a process shows
/// (kill -9).
#[derive(Debug)]
pub struct ProviderProcess {
    /// The process.
    pub child: ChildGuard,
    /// Where it listens.
    pub addr: SocketAddr,
}

impl ProviderProcess {
    /// Starts one as `instance` on `listen` (port 0 for any); waits until it listens.
    pub async fn start(listen: SocketAddr, instance: &str, dir: &Path) -> ProviderProcess {
        let bin = find_binary("detourctl", "DETOURCTL_BIN").unwrap_or_else(|e| panic!("{e}"));
        let file = dir.join(format!("{instance}.{}.addr", fastrand::u64(..)));
        let mut cmd = std::process::Command::new(bin);
        cmd.args([
            "provider",
            "--listen",
            &listen.to_string(),
            "--instance",
            instance,
        ])
        .arg("--addr-file")
        .arg(&file)
        .stdout(std::process::Stdio::null());
        let child = ChildGuard::spawn(cmd, instance).expect("provider process starts");
        let text = wait_value(
            &format!("{instance} listening"),
            Duration::from_secs(10),
            || async { std::fs::read_to_string(&file).unwrap_or_default() },
            |t| !t.trim().is_empty(),
        )
        .await;
        let addr = text.trim().parse().expect("provider address");
        ProviderProcess { child, addr }
    }
}
