//! `detourctl stat`, pure: the per-service golden metrics of the sidecars' CAs
//! (`detour_service_requests_total`, `detour_service_response_seconds` with
//! `direction="outbound"`: the callers' view), scraped at the start and at the end of a window,
//! turned into rows — calls a second, success rate (answers that are not `5xx`), p50 and p99,
//! and the share of calls per path — per service, or per host and service.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;

/// What one scrape of one sidecar holds: counters by (service, path, class) and histogram
/// buckets by (service, path, upper bound).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sample {
    /// `detour_service_requests_total` by (service, path, class).
    pub requests: BTreeMap<(String, String, String), f64>,
    /// `detour_service_response_seconds_bucket` by (service, path) then upper bound.
    pub buckets: BTreeMap<(String, String), Vec<(f64, f64)>>,
}

/// The labels of a sample line `name{k="v",…} value`, and its value.
fn sample_line<'a>(line: &'a str, name: &str) -> Option<(BTreeMap<&'a str, String>, f64)> {
    let rest = line.strip_prefix(name)?.strip_prefix('{')?;
    let (labels, value) = rest.rsplit_once("} ")?;
    let value: f64 = value.trim().parse().ok()?;
    let mut out = BTreeMap::new();
    let mut s = labels;
    while !s.is_empty() {
        let (key, after) = s.split_once("=\"")?;
        let mut val = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => val.push(chars.next()?.1),
                (i, '"') => break i,
                (_, c) => val.push(c),
            }
        };
        out.insert(key, val);
        s = after[end + 1..]
            .strip_prefix(',')
            .unwrap_or(&after[end + 1..]);
    }
    Some((out, value))
}

/// Reads the outbound per-service samples of one sidecar's `/metrics` text.
pub fn parse(text: &str) -> Sample {
    let mut sample = Sample::default();
    for line in text.lines() {
        if let Some((l, v)) = sample_line(line, "detour_service_requests_total") {
            if l.get("direction").map(String::as_str) != Some("outbound") {
                continue;
            }
            let key = |k: &str| l.get(k).cloned().unwrap_or_default();
            *sample
                .requests
                .entry((key("service"), key("path"), key("class")))
                .or_default() += v;
        } else if let Some((l, v)) = sample_line(line, "detour_service_response_seconds_bucket") {
            if l.get("direction").map(String::as_str) != Some("outbound") {
                continue;
            }
            let le = match l.get("le").map(String::as_str) {
                Some("+Inf") => f64::INFINITY,
                Some(x) => match x.parse() {
                    Ok(x) => x,
                    Err(_) => continue,
                },
                None => continue,
            };
            let key = |k: &str| l.get(k).cloned().unwrap_or_default();
            sample
                .buckets
                .entry((key("service"), key("path")))
                .or_default()
                .push((le, v));
        }
    }
    sample
}

/// One row of `detourctl stat`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    /// The host (per-host rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The service.
    pub service: String,
    /// Calls answered in the window.
    pub requests: u64,
    /// Calls a second.
    pub rps: f64,
    /// Share of the calls answered with something other than a `5xx` (`None`: no call).
    pub success: Option<f64>,
    /// Median time to the response head, ms (from the histogram's buckets).
    pub p50_ms: Option<f64>,
    /// 99th percentile, ms.
    pub p99_ms: Option<f64>,
    /// Share of the calls by path (`mesh`, `ca_direct`, `none`).
    pub paths: BTreeMap<String, f64>,
}

/// What the window added at one sidecar: `after` minus `before` (a counter that went down,
/// a restarted sidecar, counts from zero).
fn delta(before: Option<&Sample>, after: &Sample) -> Sample {
    let mut d = Sample::default();
    for (k, v) in &after.requests {
        let b = before
            .and_then(|s| s.requests.get(k))
            .copied()
            .unwrap_or(0.0);
        let v = if *v >= b { v - b } else { *v };
        d.requests.insert(k.clone(), v);
    }
    for (k, buckets) in &after.buckets {
        let old = before.and_then(|s| s.buckets.get(k));
        let reset = old.is_some_and(|o| o.iter().zip(buckets).any(|(a, b)| b.1 < a.1));
        let out = buckets
            .iter()
            .map(|(le, v)| {
                let b = match (old, reset) {
                    (Some(o), false) => o.iter().find(|x| x.0 == *le).map_or(0.0, |x| x.1),
                    _ => 0.0,
                };
                (*le, v - b)
            })
            .collect();
        d.buckets.insert(k.clone(), out);
    }
    d
}

/// The `q` quantile of cumulative `buckets` (upper bound, count), interpolated within its
/// bucket as Prometheus's `histogram_quantile` does; seconds.
pub fn quantile(buckets: &[(f64, f64)], q: f64) -> Option<f64> {
    let mut b: Vec<(f64, f64)> = buckets.to_vec();
    b.sort_by(|x, y| x.0.total_cmp(&y.0));
    let total = b.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for (le, count) in b {
        if count >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let within = count - prev.1;
            let share = if within > 0.0 {
                (rank - prev.1) / within
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * share);
        }
        prev = (le, count);
    }
    None
}

/// The rows for scrapes `before` and `after` of each host over `window`; `by_host`: a row per
/// host and service, else per service; `service`: that one only.
pub fn rows(
    before: &BTreeMap<String, Sample>,
    after: &BTreeMap<String, Sample>,
    window: Duration,
    by_host: bool,
    service: Option<&str>,
) -> Vec<Row> {
    // (host or "", service) → summed requests by (path, class), and buckets by upper bound.
    type Acc = (BTreeMap<(String, String), f64>, BTreeMap<u64, (f64, f64)>);
    let mut acc: BTreeMap<(String, String), Acc> = BTreeMap::new();
    for (host, now) in after {
        let d = delta(before.get(host), now);
        let host_key = if by_host { host.clone() } else { String::new() };
        for ((svc, path, class), v) in d.requests {
            if service.is_some_and(|s| s != svc) {
                continue;
            }
            let entry = acc.entry((host_key.clone(), svc)).or_default();
            *entry.0.entry((path, class)).or_default() += v;
        }
        for ((svc, _path), buckets) in d.buckets {
            if service.is_some_and(|s| s != svc) {
                continue;
            }
            let entry = acc.entry((host_key.clone(), svc)).or_default();
            for (le, v) in buckets {
                let slot = entry.1.entry(le.to_bits()).or_insert((le, 0.0));
                slot.1 += v;
            }
        }
    }
    let secs = window.as_secs_f64().max(0.001);
    acc.into_iter()
        .map(|((host, svc), (requests, buckets))| {
            let total: f64 = requests.values().sum();
            let ok: f64 = requests
                .iter()
                .filter(|((_, class), _)| class != "5xx")
                .map(|(_, v)| v)
                .sum();
            let mut paths = BTreeMap::new();
            for ((path, _), v) in &requests {
                *paths.entry(path.clone()).or_insert(0.0) += v;
            }
            if total > 0.0 {
                paths.values_mut().for_each(|v| *v /= total);
            }
            paths.retain(|_, v| *v > 0.0);
            let b: Vec<(f64, f64)> = buckets.into_values().collect();
            Row {
                host: by_host.then_some(host),
                service: svc,
                requests: total.round() as u64,
                rps: total / secs,
                success: (total > 0.0).then(|| ok / total),
                p50_ms: quantile(&b, 0.5).map(|s| s * 1000.0),
                p99_ms: quantile(&b, 0.99).map(|s| s * 1000.0),
                paths,
            }
        })
        .filter(|r| r.requests > 0)
        .collect()
}

#[cfg(test)]
#[path = "stat_tests.rs"]
mod tests;
