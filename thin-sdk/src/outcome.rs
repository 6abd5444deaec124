//! Reading what comes back from the mesh — which path answered, and the mesh error a response
//! carries — and the window of recent errors the local sidecar blamed on itself ("sick
//! sidecar").

use detour_proto::sync::Mutex;
use std::collections::VecDeque;

use detour_core::{MeshErrorKind, PathTaken};
use http::Response;

/// The path a response came over, as the SDK recorded it.
pub fn path_taken<B>(resp: &Response<B>) -> Option<PathTaken> {
    resp.extensions().get::<PathTaken>().copied()
}

/// The error the mesh produced in place of a provider's answer, if this response is one.
///
/// Only the caller's own sidecar can mark a response this way: sidecars remove every
/// `x-detour-*` header a provider sets, and responses from the direct path are never marked.
pub fn mesh_error<B>(resp: &Response<B>) -> Option<MeshErrorKind> {
    resp.extensions().get::<MeshErrorKind>().copied()
}

/// The recent share of mesh responses that carried an error the local sidecar blamed on
/// itself (its registry view could not route).
#[derive(Default)]
pub(crate) struct ErrorWindow {
    recent: Mutex<VecDeque<bool>>,
}

impl ErrorWindow {
    const SIZE: usize = 50;
    const MIN: usize = 20;

    /// Records one mesh response; returns true when errors reached half of a full-enough
    /// window (the window then starts again).
    pub(crate) fn record(&self, local_error: bool) -> bool {
        let mut w = self.recent.lock();
        if !local_error && w.is_empty() {
            return false;
        }
        w.push_back(local_error);
        if w.len() > Self::SIZE {
            w.pop_front();
        }
        let bad = w.iter().filter(|b| **b).count();
        if w.len() >= Self::MIN && bad * 2 >= w.len() {
            w.clear();
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_window_trips_at_half_of_a_full_window() {
        let w = ErrorWindow::default();
        for _ in 0..9 {
            assert!(!w.record(true));
            assert!(!w.record(false));
        }
        assert!(!w.record(false));
        assert!(w.record(true), "10 of 20 are errors");
        for _ in 0..100 {
            assert!(!w.record(false), "provider answers never trip it");
        }
    }
}
