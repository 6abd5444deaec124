//! Stable hashing for pinned routing: the same key gives the same subset and endpoint in every
//! process and build (FNV-1a and SplitMix64, no per-process seed), and weighted rendezvous
//! hashing moves only the keys of an endpoint that leaves.

use detour_proto::Endpoint;

/// The hash of a pinning key's bytes (FNV-1a 64, then mixed).
pub fn key_hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    mix(h)
}

/// The split roll a key's hash gives (independent of the endpoint order's hash).
pub fn roll_of(key: u64) -> u64 {
    mix(key ^ 0x5851_f42d_4c95_7f2d)
}

/// SplitMix64's finaliser.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The score of `e` for `key`: the highest score wins (weighted rendezvous hashing, `w / -ln u`).
fn score(key: u64, e: &Endpoint) -> f64 {
    let h = mix(key ^ key_hash(e.instance.as_str().as_bytes()));
    // u in (0, 1): 53 random bits, never 0.
    let u = ((h >> 11) | 1) as f64 / (1u64 << 53) as f64;
    f64::from(e.weight.max(1)) / -u.ln()
}

/// Indexes of `endpoints` for `key`, best first: the first is the key's endpoint, the next the
/// one it moves to if the first is gone or fails.
pub fn rendezvous_order(key: u64, endpoints: &[&Endpoint]) -> Vec<usize> {
    let mut scored: Vec<(f64, usize)> = endpoints
        .iter()
        .enumerate()
        .map(|(i, e)| (score(key, e), i))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().map(|(_, i)| i).collect()
}

/// The index of the best of `endpoints` for `key` that `ok` accepts.
pub fn rendezvous_best(
    key: u64,
    endpoints: &[&Endpoint],
    ok: impl Fn(&Endpoint) -> bool,
) -> Option<usize> {
    endpoints
        .iter()
        .enumerate()
        .filter(|(_, e)| ok(e))
        .map(|(i, e)| (score(key, e), i))
        .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.cmp(&a.1)))
        .map(|(_, i)| i)
}
