//! Writing a small file so that readers see either the old or the whole new contents, even
//! after a crash: write a temporary file beside it, fsync, rename over.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// Writes `bytes` to `path` atomically, the file created with permission bits `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.{}.tmp", std::process::id()));
    let written = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_the_contents_with_the_mode_asked_for() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.json");
        write_atomic(&p, b"one", 0o600).unwrap();
        write_atomic(&p, b"two", 0o600).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no temporary file left"
        );
    }
}

/// Makes directory `dir` (and its parents) and checks that this process's user owns it — and,
/// when `dir` is a symbolic link, the link too. In a directory of another user's, that user can
/// replace what this process puts there: the sockets apps connect to, the files other processes
/// read. Through a link of another user's, a directory of this user's that was never meant for
/// it (its mode is set next) would be taken.
pub fn own_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    std::fs::create_dir_all(dir)?;
    let me = rustix::process::geteuid().as_raw();
    let refused = |what: &str, uid: u32| {
        std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{what} belongs to uid {uid}, not to this process's user (uid {me}): another user could replace the sockets and files in it; give it to this user (or remove it)"
            ),
        )
    };
    let target = std::fs::metadata(dir)?;
    if target.uid() != me {
        return Err(refused("it", target.uid()));
    }
    let link = std::fs::symlink_metadata(dir)?;
    if link.file_type().is_symlink() && link.uid() != me {
        return Err(refused("the link", link.uid()));
    }
    Ok(())
}

#[cfg(test)]
mod own_dir_tests {
    use super::*;

    #[test]
    fn a_directory_or_link_of_another_user_is_refused() {
        let root = std::env::temp_dir().join(format!("detour-own-dir-{}", std::process::id()));
        let mine = root.join("mine");
        own_dir(&mine).expect("made and owned");
        own_dir(&mine).expect("owned when it exists");
        if rustix::process::geteuid().is_root() {
            // Another user's directory, and this user's directory behind another user's link.
            let theirs = root.join("theirs");
            std::fs::create_dir_all(&theirs).unwrap();
            let nobody = Some(rustix::fs::Uid::from_raw(65534));
            rustix::fs::chown(&theirs, nobody, None).unwrap();
            let e = own_dir(&theirs).unwrap_err();
            assert_eq!(e.kind(), std::io::ErrorKind::PermissionDenied);
            assert!(e.to_string().contains("uid 65534"), "{e}");
            let link = root.join("link");
            std::os::unix::fs::symlink(&mine, &link).unwrap();
            std::os::unix::fs::lchown(&link, Some(65534), None).unwrap();
            let e = own_dir(&link).unwrap_err();
            assert!(e.to_string().starts_with("the link"), "{e}");
        }
        std::fs::remove_dir_all(&root).unwrap();
    }
}
