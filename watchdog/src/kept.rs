//! What the watchdog keeps on disk so that restarting it changes nothing a user can see
//! (`{state_dir}/watchdog-state.json`, written with write + fsync + rename on every change):
//! the binaries (current, previous, baseline), the crash history and the `failed` mark, the
//! restart count, and what it last reported (last exit, last upgrade, the rule's version
//! label). A file that cannot be read or parsed is logged, counted
//! (`detour_state_file_errors_total`) and ignored: the watchdog then starts afresh, as before
//! this file existed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use detour_registry::docs::state_file_error;
use detour_registry::now_unix_ms;
use serde::{Deserialize, Serialize};

use crate::supervise::Memory;

/// The file, in the state directory.
pub const STATE_FILE: &str = "watchdog-state.json";

/// The file, in the run directory, where watchdogs before this format kept the binaries (read
/// when there is no state file yet).
pub const LEGACY_BINARIES_FILE: &str = "watchdog-binaries.json";

/// The binary the sidecar runs, the one before it, and the one it ran before a gray version
/// rule moved it (where it goes back when the rule goes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Binaries {
    /// The binary running.
    pub current: PathBuf,
    /// The binary before the last upgrade.
    pub previous: Option<PathBuf>,
    /// The binary before a version rule moved the host.
    #[serde(default)]
    pub baseline: Option<PathBuf>,
}

/// The watchdog's state as kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kept {
    /// Format (1).
    pub format: u32,
    /// The binaries.
    pub binaries: Binaries,
    /// When each unplanned exit in the crash-loop window happened (ms since the epoch).
    #[serde(default)]
    pub crashes_unix_ms: Vec<u64>,
    /// Whether the host is marked `failed`.
    #[serde(default)]
    pub crash_loop: bool,
    /// The next restart delay (ms).
    #[serde(default)]
    pub backoff_ms: u64,
    /// Restarts so far.
    #[serde(default)]
    pub restarts: u64,
    /// How the last sidecar ended.
    #[serde(default)]
    pub last_exit: Option<String>,
    /// How the last upgrade ended.
    #[serde(default)]
    pub last_upgrade: Option<String>,
    /// The version label of the rule that chose the binary.
    #[serde(default)]
    pub rule_version: String,
}

impl Kept {
    /// A state with these binaries and nothing else.
    pub fn new(binaries: Binaries) -> Kept {
        Kept {
            format: 1,
            binaries,
            crashes_unix_ms: Vec::new(),
            crash_loop: false,
            backoff_ms: 0,
            restarts: 0,
            last_exit: None,
            last_upgrade: None,
            rule_version: String::new(),
        }
    }

    /// The supervisor's memory, as of now.
    pub fn memory(&self) -> Memory {
        let now_ms = now_unix_ms();
        Memory {
            crash_ages: self
                .crashes_unix_ms
                .iter()
                .map(|t| Duration::from_millis(now_ms.saturating_sub(*t)))
                .collect(),
            crash_loop: self.crash_loop,
            backoff: Duration::from_millis(self.backoff_ms),
        }
    }

    /// Takes the supervisor's memory (taken at `now`).
    pub fn set_memory(&mut self, m: &Memory) {
        let now_ms = now_unix_ms();
        self.crashes_unix_ms = m
            .crash_ages
            .iter()
            .map(|a| now_ms.saturating_sub(a.as_millis() as u64))
            .collect();
        self.crash_loop = m.crash_loop;
        self.backoff_ms = m.backoff.as_millis() as u64;
    }
}

/// Reads the kept state: the state file in `state_dir`, else the binaries a watchdog of the
/// earlier format kept in `run_dir`; `None` when there is neither (or they are unusable).
pub fn load(state_dir: &Path, run_dir: &Path) -> Option<Kept> {
    let path = state_dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice::<Kept>(&bytes) {
            Ok(k) if k.format == 1 => return Some(k),
            Ok(k) => return state_file_error(&path, &format!("unknown format {}", k.format)),
            Err(e) => return state_file_error(&path, &e.to_string()),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return state_file_error(&path, &e.to_string()),
    }
    let legacy = run_dir.join(LEGACY_BINARIES_FILE);
    let bytes = std::fs::read(&legacy).ok()?;
    match serde_json::from_slice::<Binaries>(&bytes) {
        Ok(b) => Some(Kept::new(b)),
        Err(e) => state_file_error(&legacy, &e.to_string()),
    }
}

/// Writes the state (write, fsync, rename).
pub fn save(state_dir: &Path, kept: &Kept) -> std::io::Result<()> {
    let bytes = serde_json::to_vec_pretty(kept).map_err(std::io::Error::other)?;
    std::fs::create_dir_all(state_dir)?;
    detour_proto::files::write_atomic(&state_dir.join(STATE_FILE), &bytes, 0o600)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_legacy_and_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let (state, run) = (dir.path().join("state"), dir.path().join("run"));
        std::fs::create_dir_all(&run).unwrap();
        assert!(load(&state, &run).is_none());
        // The earlier format's binaries file is read when there is no state file.
        std::fs::write(
            run.join(LEGACY_BINARIES_FILE),
            br#"{"current":"/a","previous":null,"baseline":"/b"}"#,
        )
        .unwrap();
        let legacy = load(&state, &run).unwrap();
        assert_eq!(legacy.binaries.baseline, Some(PathBuf::from("/b")));
        let mut k = Kept::new(legacy.binaries.clone());
        k.set_memory(&Memory {
            crash_ages: vec![Duration::from_secs(5)],
            crash_loop: true,
            backoff: Duration::from_millis(400),
        });
        k.restarts = 7;
        save(&state, &k).unwrap();
        let back = load(&state, &run).unwrap();
        assert_eq!(back, k);
        let m = back.memory();
        assert!(m.crash_loop);
        assert!(m.crash_ages[0] >= Duration::from_secs(5));
        // A damaged state file is ignored (the legacy file is not used over it).
        std::fs::write(state.join(STATE_FILE), b"{garbage").unwrap();
        assert!(load(&state, &run).is_none());
    }
}
