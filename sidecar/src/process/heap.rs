//! Gives the free pages of the heap back to the system after a burst of traffic.
//!
//! glibc's allocator keeps what a burst freed (connection buffers, response heads) for later use,
//! and can only shrink its heap from the top, so a sidecar's resident set stays where the burst
//! left it. Every [`TRIM_EVERY`], `malloc_trim(0)` hands the whole free pages inside the heap
//! back (`MADV_DONTNEED`); what is still allocated is untouched. Envoy's overload manager has
//! the same action (`shrink_heap`). Under steady load the call finds few free pages; its cost
//! is measured in docs/performance.md. Only with glibc, and not with the `mimalloc` feature.

use std::time::Duration;

/// How often the free heap is given back.
pub const TRIM_EVERY: Duration = Duration::from_secs(10);

/// Every [`TRIM_EVERY`], runs [`trim`] (where [`supported`]) and unmaps the code pages not in
/// use ([`super::code::drop_unused`], whatever the allocator); call once per process inside the
/// runtime.
pub fn spawn_trim() {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tick.tick().await;
            if supported() {
                let started = tokio::time::Instant::now();
                let released = trim();
                tracing::trace!(
                    released,
                    took_us = started.elapsed().as_micros(),
                    "heap trimmed"
                );
                if released {
                    metrics::counter!("detour_heap_trims_total").increment(1);
                }
            }
            super::code::drop_unused();
        }
    });
}

/// Whether this build gives free heap pages back (glibc's allocator in use).
pub const fn supported() -> bool {
    cfg!(all(
        target_os = "linux",
        target_env = "gnu",
        not(feature = "mimalloc")
    ))
}

/// Gives the heap's free pages back now; true when some were.
#[cfg(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc")))]
pub fn trim() -> bool {
    // SAFETY: malloc_trim takes no pointers and is thread-safe (it holds each arena's lock);
    // it only releases memory no allocation holds.
    #[allow(unsafe_code)]
    let released = unsafe { libc::malloc_trim(0) };
    released != 0
}

/// Gives the heap's free pages back now; true when some were (never, in this build).
#[cfg(not(all(target_os = "linux", target_env = "gnu", not(feature = "mimalloc"))))]
pub fn trim() -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_freed_burst_is_given_back() {
        if !supported() {
            return;
        }
        // Many small blocks (below the allocator's mmap threshold, so on the heap), then one
        // kept at the end so the heap cannot simply shrink from the top.
        let burst: Vec<Vec<u8>> = (0..4096).map(|i| vec![(i % 251) as u8; 1024]).collect();
        let keep = vec![1u8; 1024];
        drop(burst);
        assert!(
            trim(),
            "4 MiB freed inside the heap: some whole pages go back"
        );
        assert_eq!(keep[0], 1);
    }
}
