//! Bounded metric label values for service names: the first [`MAX_SERVICE_LABELS`] distinct
//! names a process labels a metric with keep their own value, every later one shares
//! [`OTHER`], so neither a registry with very many services nor a stream of names from the
//! network can grow a process's metrics without bound.

use crate::sync::Mutex;
use std::collections::HashSet;
use std::sync::OnceLock;

use crate::ServiceName;

/// Most distinct service label values per process.
pub const MAX_SERVICE_LABELS: usize = 1000;

/// The label value of the services beyond the bound.
pub const OTHER: &str = "other";

fn seen() -> &'static Mutex<HashSet<ServiceName>> {
    static SEEN: OnceLock<Mutex<HashSet<ServiceName>>> = OnceLock::new();
    SEEN.get_or_init(|| Mutex::new(HashSet::new()))
}

/// The `service` label value of `service`.
pub fn service(service: &ServiceName) -> String {
    label_in(&mut seen().lock(), service, MAX_SERVICE_LABELS)
}

fn label_in(seen: &mut HashSet<ServiceName>, service: &ServiceName, cap: usize) -> String {
    if seen.contains(service) {
        return service.to_string();
    }
    if seen.len() >= cap {
        return OTHER.to_owned();
    }
    seen.insert(service.clone());
    service.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_beyond_the_bound_share_other() {
        let mut seen = HashSet::new();
        let name = |i: usize| ServiceName::new(format!("s{i}")).unwrap();
        for i in 0..3 {
            assert_eq!(label_in(&mut seen, &name(i), 3), format!("s{i}"));
        }
        assert_eq!(label_in(&mut seen, &name(3), 3), OTHER);
        assert_eq!(
            label_in(&mut seen, &name(1), 3),
            "s1",
            "a labelled name keeps its label"
        );
        assert_eq!(seen.len(), 3);
    }
}
