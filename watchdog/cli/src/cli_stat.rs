//! `detourctl stat`: the sidecars with a metrics listener are found through the registry (their
//! host status names it), scraped at the start and at the end of each window, and their CAs'
//! per-service numbers printed ([`crate::stat`] does the arithmetic).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use detour_proto::ServiceName;
use detour_thin_sdk::{Client, Dial};

use crate::cli_ops::{RegistryArgs, fail, open};
use crate::ops::OpsError;
use crate::ops_view;
use crate::stat::{self, Row, Sample};

/// `detourctl stat` arguments.
#[derive(Debug, Clone, Args)]
pub struct StatArgs {
    /// One service only.
    #[arg(long)]
    pub service: Option<String>,
    /// A row per host and service (the callers' hosts), not per service.
    #[arg(long)]
    pub by_host: bool,
    /// The window, seconds.
    #[arg(long, default_value_t = 10)]
    pub window: u64,
    /// Print a new table at the end of every window until interrupted.
    #[arg(long)]
    pub watch: bool,
    /// A file whose text is the metrics listeners' bearer token (`metrics.token_file`).
    #[arg(long)]
    pub token_file: Option<std::path::PathBuf>,
}

/// Runs `detourctl stat`.
pub async fn stat(args: StatArgs, reg: RegistryArgs) -> ExitCode {
    let token = match &args.token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(t) => Some(t.trim().to_owned()),
            Err(e) => {
                eprintln!("detourctl: --token-file {}: {e}", path.display());
                return ExitCode::from(2);
            }
        },
        None => None,
    };
    let window = Duration::from_secs(args.window.max(1));
    let mut before = match scrape_all(&reg, token.as_deref()).await {
        Ok(s) => s,
        Err(e) => return fail(&e),
    };
    if before.is_empty() {
        eprintln!(
            "detourctl: no sidecar in the registry has a metrics listener (set [metrics] listen)"
        );
        return ExitCode::from(4);
    }
    eprintln!(
        "stat: {} sidecars scraped; numbers in {} s",
        before.len(),
        window.as_secs()
    );
    loop {
        tokio::time::sleep(window).await;
        let after = match scrape_all(&reg, token.as_deref()).await {
            Ok(s) => s,
            Err(e) => return fail(&e),
        };
        let rows = stat::rows(
            &before,
            &after,
            window,
            args.by_host,
            args.service.as_deref(),
        );
        if reg.json {
            println!("{}", ops_view::json(&rows));
        } else {
            print!("{}", table(&rows, args.by_host));
        }
        if !args.watch {
            return ExitCode::SUCCESS;
        }
        before = after;
    }
}

/// Every reachable metrics listener's sample, by host (one that does not answer is said on
/// stderr and left out).
async fn scrape_all(
    reg: &RegistryArgs,
    token: Option<&str>,
) -> Result<BTreeMap<String, Sample>, OpsError> {
    let ops = open(reg)?;
    let hosts = ops.store().hosts().await?;
    let mut out = BTreeMap::new();
    for h in hosts {
        let Some(addr) = h.metrics else { continue };
        match scrape(addr, token).await {
            Ok(text) => {
                out.insert(h.host.to_string(), stat::parse(&text));
            }
            Err(e) => eprintln!("detourctl: {} ({addr}): {e}", h.host),
        }
    }
    Ok(out)
}

/// The largest `/metrics` page read (a 1,000-service sidecar's is about 5 MiB).
const MAX_PAGE: usize = 32 << 20;

/// `GET /metrics` of the listener at `addr`.
async fn scrape(addr: SocketAddr, token: Option<&str>) -> Result<String, String> {
    let client = Client::builder(Dial::Tcp(addr))
        .control(false)
        .timeout(Duration::from_secs(5))
        .build();
    let host = ServiceName::new("detourctl").map_err(|e| e.to_string())?;
    let mut req = http::Request::get("/metrics");
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req
        .body(detour_thin_sdk::body::empty())
        .map_err(|e| e.to_string())?;
    let resp = client.send(&host, req).await.map_err(|e| e.to_string())?;
    let status = resp.status();
    use http_body_util::BodyExt;
    // A sidecar's page is a few hundred KiB at most; a listener sending more is not read on.
    let body = http_body_util::Limited::new(resp.into_body(), MAX_PAGE)
        .collect()
        .await
        .map_err(|e| format!("/metrics: {e}"))?
        .to_bytes();
    if !status.is_success() {
        return Err(format!("/metrics answered {status}"));
    }
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The rows as a table.
fn table(rows: &[Row], by_host: bool) -> String {
    let pct = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{:.2}%", v * 100.0));
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    let mut head = vec![
        "SERVICE",
        "RPS",
        "SUCCESS",
        "P50_MS",
        "P99_MS",
        "MESH",
        "CA_DIRECT",
        "NONE",
        "REQUESTS",
    ];
    if by_host {
        head.insert(0, "HOST");
    }
    let body: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let share = |p: &str| pct(Some(r.paths.get(p).copied().unwrap_or(0.0)));
            let mut row = vec![
                r.service.clone(),
                format!("{:.1}", r.rps),
                pct(r.success),
                ms(r.p50_ms),
                ms(r.p99_ms),
                share("mesh"),
                share("ca_direct"),
                share("none"),
                r.requests.to_string(),
            ];
            if by_host {
                row.insert(0, r.host.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    ops_view::render(&head, &body)
}
