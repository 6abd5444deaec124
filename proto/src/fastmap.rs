//! The map of the request path's lookups (services, hosts, endpoints, connections): std's
//! `HashMap` with foldhash in place of SipHash — a fraction of the cost per lookup of a short
//! key. Its seed is random per process; the keys come from the registry and the config, never
//! from a request alone.

/// A `HashMap` hashed with foldhash; build it with `FastMap::default()`.
pub type FastMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
