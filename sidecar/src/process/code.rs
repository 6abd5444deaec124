//! Unmaps the pages of the sidecar's own machine code that it mapped but does not run.
//!
//! The kernel maps an executable's code around each page fault (fault-around: 64 KiB by
//! default, from the page cache), so starting — config, command line, registry client, TLS
//! set-up — leaves most of the code resident although the request path runs a small part of
//! it: about 6.5 MiB of the sidecar's 8 MiB of code, half of its resident set.
//!
//! [`drop_unused`] tells the kernel to unmap the code mapping's pages (`MADV_DONTNEED`: they
//! are clean pages of the file, mapped again from the page cache on their next use) and to
//! expect random access to them (`MADV_RANDOM`: no read-ahead for later faults). Only the
//! executable mapping (`r-xp`) of the sidecar's own binary is touched: it is never written, so
//! nothing is lost. Runs on the heap trim's tick, every [`super::heap::TRIM_EVERY`], whatever
//! the allocator.

/// The address range of the executable mapping that holds this function.
#[cfg(target_os = "linux")]
fn own_code() -> Option<(usize, usize)> {
    let here = own_code as fn() -> Option<(usize, usize)> as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let perms = fields.next()?;
        let (start, end) = (
            usize::from_str_radix(start, 16).ok()?,
            usize::from_str_radix(end, 16).ok()?,
        );
        (perms == "r-xp" && (start..end).contains(&here)).then_some((start, end))
    })
}

/// Unmaps the code pages not in use; the bytes of code mapped before, or `None` when the
/// mapping was not found or the kernel refused.
#[cfg(target_os = "linux")]
pub fn drop_unused() -> Option<usize> {
    let (start, end) = own_code()?;
    let len = end - start;
    // SAFETY: the range is a whole private, read-only, executable mapping of this process's
    // own binary (found in /proc/self/maps), never written: MADV_DONTNEED only unmaps clean
    // pages that the next access maps again from the same file, and MADV_RANDOM only changes
    // the kernel's read-ahead for the mapping. No memory this process wrote is touched.
    #[allow(unsafe_code)]
    let ok = unsafe {
        let addr = start as *mut libc::c_void;
        libc::madvise(addr, len, libc::MADV_RANDOM) == 0
            && libc::madvise(addr, len, libc::MADV_DONTNEED) == 0
    };
    ok.then_some(len)
}

/// Unmaps the code pages not in use (not on this platform).
#[cfg(not(target_os = "linux"))]
pub fn drop_unused() -> Option<usize> {
    None
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    fn code_rss_kib() -> u64 {
        let (start, _) = own_code().expect("the code mapping");
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("/proc/self/smaps");
        let head = format!("{start:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&head));
        lines
            .find_map(|l| l.strip_prefix("Rss:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("Rss of the code mapping")
    }

    #[test]
    fn the_code_mapping_is_found_and_its_unused_pages_go() {
        let before = code_rss_kib();
        let len = drop_unused().expect("madvise on the code mapping");
        assert!(len >= 4096);
        // The test keeps running: the pages it needs come back one by one.
        let after = code_rss_kib();
        assert!(
            after < before,
            "code resident: {before} KiB before, {after} KiB after"
        );
    }
}
