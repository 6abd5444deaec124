//! What the fleet benchmark reads: etcd's own counters (every member), a process's CPU and
//! RSS from `/proc`, a sidecar's applied registry revision from its admin `/state`, and the
//! quantiles it prints.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

use detour_tests::etcd::{metrics_text, sum_metric};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// etcd's counters and gauges summed over the members that answered.
#[derive(Debug, Clone, Copy, Default)]
pub struct EtcdSample {
    /// Messages received from clients: unary requests, watch and keep-alive stream messages.
    pub messages: f64,
    /// Of which on watch streams (creates, progress requests).
    pub watch_messages: f64,
    /// Of which on keep-alive streams.
    pub keepalive_messages: f64,
    /// Streams and unary calls started.
    pub started: f64,
    /// Keys written (puts, including those of transactions).
    pub puts: f64,
    /// Watchers held (every member).
    pub watchers: f64,
    /// Keys in the store (the largest member's count).
    pub keys: f64,
    /// Database size, bytes (the largest member's).
    pub db_bytes: f64,
    /// CPU seconds used (every member).
    pub cpu_secs: f64,
    /// Resident memory, bytes (every member).
    pub rss_bytes: f64,
    /// Members that answered.
    pub members: usize,
}

/// Reads every member's `/metrics`; a member that does not answer counts nothing.
pub async fn etcd_sample(urls: &[String]) -> EtcdSample {
    let mut s = EtcdSample::default();
    for url in urls {
        let Ok(Ok(text)) = tokio::time::timeout(Duration::from_secs(2), metrics_text(url)).await
        else {
            continue;
        };
        let m = |name: &str, labels: &[&str]| sum_metric(&text, name, labels);
        s.members += 1;
        s.messages += m("grpc_server_msg_received_total", &[]);
        s.watch_messages += m("grpc_server_msg_received_total", &["grpc_method=\"Watch\""]);
        s.keepalive_messages += m(
            "grpc_server_msg_received_total",
            &["grpc_method=\"LeaseKeepAlive\""],
        );
        s.started += m("grpc_server_started_total", &[]);
        s.puts = s.puts.max(m("etcd_mvcc_put_total", &[]));
        s.watchers += m("etcd_debugging_mvcc_watcher_total", &[]);
        s.keys = s.keys.max(m("etcd_debugging_mvcc_keys_total", &[]));
        s.db_bytes = s.db_bytes.max(m("etcd_mvcc_db_total_size_in_bytes", &[]));
        s.cpu_secs += m("process_cpu_seconds_total", &[]);
        s.rss_bytes += m("process_resident_memory_bytes", &[]);
    }
    s
}

/// One process's CPU time and RSS.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcSample {
    /// User + system CPU, seconds.
    pub cpu_secs: f64,
    /// Resident set, bytes.
    pub rss_bytes: u64,
}

/// Reads `/proc/PID/stat` and `/proc/PID/status` (zeros for a process that is gone).
pub fn proc_sample(pid: u32) -> ProcSample {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is the 1st, utime the 12th.
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    let cpu_secs = (ticks(11) + ticks(12)) / 100.0;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or(0);
    ProcSample {
        cpu_secs,
        rss_bytes: rss_kb * 1024,
    }
}

/// The registry revision a sidecar applied and when (Unix ms), from its `/state`.
pub async fn applied(admin: SocketAddr) -> Option<(u64, u64)> {
    let body = admin_get(admin, "/state").await?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let a = v.get("registry")?.get("applied")?;
    Some((a.get("revision")?.as_u64()?, a.get("at_unix_ms")?.as_u64()?))
}

/// `GET path` on a sidecar's admin listener; the body of a 200.
async fn admin_get(admin: SocketAddr, path: &str) -> Option<String> {
    let fetch = async {
        let mut conn = tokio::net::TcpStream::connect(admin).await.ok()?;
        let req = format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
        conn.write_all(req.as_bytes()).await.ok()?;
        let mut text = String::new();
        conn.read_to_string(&mut text).await.ok()?;
        let (head, body) = text.split_once("\r\n\r\n")?;
        (head.split(' ').nth(1) == Some("200")).then(|| body.to_owned())
    };
    tokio::time::timeout(Duration::from_secs(5), fetch)
        .await
        .ok()
        .flatten()
}

/// Quantile `q` of `values` (sorted in place); 0 when empty.
pub fn quantile(values: &mut [f64], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_by(f64::total_cmp);
    let idx = ((values.len() as f64 - 1.0) * q).round() as usize;
    values[idx.min(values.len() - 1)]
}

/// `p50/p99/max` of `values`, formatted.
pub fn spread(values: &mut [f64]) -> String {
    format!(
        "p50={:.0} p99={:.0} max={:.0}",
        quantile(values, 0.5),
        quantile(values, 0.99),
        quantile(values, 1.0)
    )
}

/// Per-second rates of a counter sampled over time: `(elapsed, value)` in order.
pub fn per_second(samples: &[(Instant, f64)]) -> Vec<f64> {
    samples
        .windows(2)
        .map(|w| {
            let dt = w[1].0.duration_since(w[0].0).as_secs_f64().max(1e-3);
            ((w[1].1 - w[0].1) / dt).max(0.0)
        })
        .collect()
}
