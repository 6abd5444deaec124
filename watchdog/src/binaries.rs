//! Which sidecar binary a gray version rule may make this watchdog run. A registry write must
//! never name code to run: the rule names a file of the configured local directory
//! (`upgrade.binaries_dir`) and its sha256, and the watchdog runs it only when
//! - the directory and the file belong to root or to the watchdog's own user, and neither is
//!   writable by its group or by others (nobody else can swap the file);
//! - the file is a regular, executable file (not a symbolic link), directly in that directory;
//! - its sha256 is the one the rule names.
//!
//! Anything else is refused with the reason, which the watchdog reports (`/state`
//! `last_upgrade`, and `detourctl status`).

use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The largest binary hashed.
const MAX_BINARY_BYTES: u64 = 1 << 30;

/// The binary `rule_binary` (a file name, or an absolute path in `dir`) of `dir`, checked
/// against `sha256` (64 hexadecimal digits); the reason when it may not run.
pub fn verify(dir: &Path, rule_binary: &str, sha256: &str) -> Result<PathBuf, String> {
    let want = sha256.to_ascii_lowercase();
    if want.len() != 64 || !want.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("the rule names no sha256 of the binary (64 hexadecimal digits)".into());
    }
    let dir = dir
        .canonicalize()
        .map_err(|e| format!("binaries directory {}: {e}", dir.display()))?;
    let given = Path::new(rule_binary);
    let name = given
        .file_name()
        .ok_or_else(|| format!("{rule_binary:?} names no file"))?;
    let in_dir = match given.parent() {
        None => true,
        Some(p) if p.as_os_str().is_empty() => true,
        Some(p) => p.canonicalize().is_ok_and(|p| p == dir),
    };
    if !in_dir {
        return Err(format!(
            "{rule_binary} is not in the binaries directory {}",
            dir.display()
        ));
    }
    let path = dir.join(name);
    guarded(&dir, true)?;
    let meta = std::fs::symlink_metadata(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.file_type().is_file() {
        return Err(format!("{} is not a regular file", path.display()));
    }
    guarded(&path, false)?;
    if meta.permissions().mode() & 0o111 == 0 {
        return Err(format!("{} is not executable", path.display()));
    }
    let found = sha256_of(&path)?;
    if found != want {
        return Err(format!(
            "{} has sha256 {found}, the rule names {want}",
            path.display()
        ));
    }
    Ok(path)
}

/// Checks that `path` belongs to root or to this process's user and is not writable by its
/// group or others.
fn guarded(path: &Path, dir: bool) -> Result<(), String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if dir && !meta.is_dir() {
        return Err(format!("{} is not a directory", path.display()));
    }
    let me = rustix::process::geteuid().as_raw();
    if meta.uid() != 0 && meta.uid() != me {
        return Err(format!(
            "{} belongs to uid {}, not to root or this watchdog's user",
            path.display(),
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{} is writable by its group or by others (mode {:o})",
            path.display(),
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

/// The sha256 of a file, in lowercase hexadecimal.
pub fn sha256_of(path: &Path) -> Result<String, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut reader = file.take(MAX_BINARY_BYTES);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    Ok(ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup() -> (tempfile::TempDir, PathBuf, String) {
        let dir = tempfile::tempdir().unwrap();
        let bin = dir.path().join("detour-sidecar-2");
        std::fs::write(&bin, b"#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let sum = sha256_of(&bin).unwrap();
        (dir, bin, sum)
    }

    #[test]
    fn a_listed_binary_with_its_sha256_runs_and_anything_else_is_refused() {
        let (dir, bin, sum) = setup();
        let d = dir.path();
        assert_eq!(verify(d, "detour-sidecar-2", &sum).unwrap(), bin);
        assert_eq!(verify(d, bin.to_str().unwrap(), &sum).unwrap(), bin);
        let wrong = "0".repeat(64);
        assert!(
            verify(d, "detour-sidecar-2", &wrong)
                .unwrap_err()
                .contains("sha256")
        );
        assert!(
            verify(d, "detour-sidecar-2", "")
                .unwrap_err()
                .contains("sha256")
        );
        assert!(
            verify(d, "/bin/sh", &sum)
                .unwrap_err()
                .contains("not in the binaries")
        );
        assert!(verify(d, "../x", &sum).is_err());
        assert!(verify(d, "missing", &sum).is_err());
        // A symbolic link to it is not the file.
        std::os::unix::fs::symlink(&bin, d.join("link")).unwrap();
        assert!(verify(d, "link", &sum).unwrap_err().contains("regular"));
        // Writable by others: anyone could swap it.
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            verify(d, "detour-sidecar-2", &sum)
                .unwrap_err()
                .contains("writable")
        );
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            verify(d, "detour-sidecar-2", &sum)
                .unwrap_err()
                .contains("writable")
        );
    }
}
