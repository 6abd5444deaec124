//! `detourctl`: the operator CLI. `demo` runs a small mesh on loopback, each host under its own
//! watchdog; `gray`, `rollback` and `status` work on the registry (gray rules, the one-command
//! rollback, every host and service); `upgrade` replaces the local sidecar without loss (or
//! rolls it back); `shutdown` takes the host out of the mesh; `load` drives a fixed request rate through the SDK (or
//! straight at one provider) and reports every outcome; `provider` runs the demo provider as a
//! process for scripts; `certs` issues sidecar certificates from a throw-away CA; `etcd-roles` sets up
//! least-privilege etcd users.

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};
use detour_ctl::cli_ops::{self, GrayCmd, RegistryArgs, RollbackArgs};
use detour_kit::certs;
use detour_kit::demo::{self, DemoOptions};
use detour_kit::load::{self, LoadSpec, MethodMix, Stats, Target};
use detour_kit::provider::DemoProvider;
use detour_kit::watched;
use detour_proto::{AppProtocol, ServiceName};
use detour_registry_sync::legacy::zk_publish;
use detour_thin_sdk::{Client, Dial, TraceConfig};
use detour_watchdog::api::UpgradeRequest;

#[derive(Debug, Parser)]
#[command(version, about = "Detour operator CLI")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start a three-host mesh on loopback and drive traffic through it.
    Demo {
        /// Stop after this many seconds (default: run until Ctrl-C).
        #[arg(long)]
        duration: Option<u64>,
        /// Requests per second.
        #[arg(long, default_value_t = 200)]
        rate: u32,
    },
    /// Drive a fixed request rate at a service and report every outcome.
    Load(LoadArgs),
    /// Replace the local sidecar by another binary without losing a request (the local
    /// watchdog hands the sockets over), or go back to the previous one.
    Upgrade {
        /// The binary to run.
        #[arg(
            long,
            conflicts_with = "rollback",
            required_unless_present = "rollback"
        )]
        binary: Option<std::path::PathBuf>,
        /// Go back to the binary before the last upgrade.
        #[arg(long)]
        rollback: bool,
        /// The local watchdog's Unix socket.
        #[arg(
            long,
            env = "DETOUR_WATCHDOG_SOCKET",
            default_value = "/run/detour/watchdog.sock"
        )]
        watchdog: std::path::PathBuf,
    },
    /// Gray rules: the mesh on or off, and the sidecar binary, by service and by host.
    Gray {
        #[command(subcommand)]
        cmd: GrayCmd,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Per-service traffic policy in the registry (timeouts, retry budget, outlier ejection,
    /// in-flight limit per endpoint), applied by every sidecar without a restart.
    Policy {
        #[command(subcommand)]
        cmd: detour_ctl::cli_policy::PolicyCmd,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Routes by version and label in the registry: subsets of a service's endpoints, match
    /// rules, canary weights, pinning by header or cookie — the same on the mesh and direct
    /// paths (docs/routing.md).
    Route {
        #[command(subcommand)]
        cmd: detour_ctl::cli_route::RouteCmd,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Turn the mesh off for a scope in one command (or sidecar versions back), undo it, or
    /// list what was done.
    Rollback(RollbackArgs),
    /// Every change an operator made to the gray rules, rollbacks, traffic policy and routes: who,
    /// when, why, and the document before and after (the audit trail), oldest first.
    History {
        /// Only the newest N records.
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Least-privilege etcd roles: a host writes only its own keys, operators write rules and
    /// policy, the sync agent writes endpoints (run with etcd's root credentials).
    EtcdRoles(detour_ctl::cli_roles::EtcdRolesArgs),
    /// Every host and service: states, versions, restarts, links, instances, mesh on or off.
    Status {
        /// A local sidecar's admin address, to show its catalog's protection too.
        #[arg(long)]
        admin: Option<std::net::SocketAddr>,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Per service (or per host): calls a second, success rate, p50/p99 and the share of each
    /// path over a window, from the metrics listeners of the sidecars the registry names.
    Stat {
        #[command(flatten)]
        args: detour_ctl::cli_stat::StatArgs,
        #[command(flatten)]
        reg: RegistryArgs,
    },
    /// Drain the local sidecar, withdraw the host's registrations and stop its watchdog.
    Shutdown {
        /// The local watchdog's Unix socket.
        #[arg(
            long,
            env = "DETOUR_WATCHDOG_SOCKET",
            default_value = "/run/detour/watchdog.sock"
        )]
        watchdog: std::path::PathBuf,
    },
    /// Run the demo provider (for scripts and benchmarks) until SIGINT/SIGTERM.
    Provider {
        /// Address to listen on (port 0 for any).
        #[arg(long)]
        listen: std::net::SocketAddr,
        /// Instance name reported in `x-served-by`.
        #[arg(long)]
        instance: String,
        /// Write the bound address to this file once listening.
        #[arg(long)]
        addr_file: Option<std::path::PathBuf>,
        /// Also register in this ZooKeeper (`host:port,…`) as a Dubbo application does (an
        /// ephemeral `rest://` provider URL), and on SIGTERM/SIGINT de-register first.
        #[arg(long, requires = "interface")]
        zookeeper: Option<String>,
        /// The Dubbo interface to register under (`/dubbo/{interface}/providers`).
        #[arg(long)]
        interface: Option<String>,
        /// Time to keep serving between the de-registration and the stop, milliseconds (as
        /// Dubbo's graceful shutdown wait).
        #[arg(long, default_value_t = 0)]
        release_grace_ms: u64,
        /// Wait this long before every answer, milliseconds (a slow provider).
        #[arg(long, default_value_t = 0)]
        delay_ms: u64,
        /// Keep the records of idempotency keys in this directory, which instances share
        /// (a request repeated at another instance is not carried out again); default: in
        /// memory, for this instance alone.
        #[arg(long)]
        dedupe_dir: Option<std::path::PathBuf>,
        /// How long a record of an idempotency key is kept, seconds (a repeat after that runs
        /// again).
        #[arg(long, default_value_t = 3600)]
        dedupe_ttl_secs: u64,
    },
    /// Print a sidecar config for a trial host (what tests, chaos and bench scripts start):
    /// every listener on --ip, port 0; the outbound Unix socket; mutual TLS from
    /// `<pki>/<host>/` (as `certs` writes it) unless --plaintext.
    SidecarConfig(SidecarConfigArgs),
    /// Issue sidecar certificates from a throw-away CA kept in --dir (made on first use):
    /// `<dir>/ca.pem`, `<dir>/ca-key.pem`, and per host `<dir>/<host>/{cert,key,bundle}.pem`.
    Certs {
        /// Where the CA and the hosts' files go.
        #[arg(long)]
        dir: std::path::PathBuf,
        /// The SPIFFE trust domain (`[tls] trust_domain`).
        #[arg(long, default_value = "detour.local")]
        trust_domain: String,
        /// A host to issue a certificate for (repeat for more).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        /// Validity of the hosts' certificates, days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

#[derive(Debug, Args)]
struct SidecarConfigArgs {
    /// The host's id.
    #[arg(long)]
    host: String,
    /// The loopback address of its listeners.
    #[arg(long, default_value = "127.0.0.1")]
    ip: String,
    /// Its run directory.
    #[arg(long)]
    run_dir: std::path::PathBuf,
    /// Its state directory (default: the run directory).
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// The registry (default: `dir:` beside the run directory, `<run-dir>/../registry`).
    #[arg(long)]
    registry: Option<String>,
    /// The catalog's disk cache (`""`: none).
    #[arg(long)]
    catalog_cache: Option<String>,
    /// The host's zone (callers prefer providers of their own zone).
    #[arg(long)]
    zone: Option<String>,
    /// The outbound Unix socket (`""`: none).
    #[arg(long, default_value = "outbound.sock")]
    unix: String,
    /// The certificate directory of `certs` (the host's files in `<pki>/<host>/`).
    #[arg(
        long,
        conflicts_with = "plaintext",
        required_unless_present = "plaintext"
    )]
    pki: Option<std::path::PathBuf>,
    /// No TLS between sidecars.
    #[arg(long)]
    plaintext: bool,
    /// Lines of `[registry_dir]` (`key = value`, newline-separated).
    #[arg(long, default_value = "")]
    registry_dir: String,
    /// A provider: `SERVICE=ADDRESS` or `SERVICE=ADDRESS@PROTOCOL` (repeat for more).
    #[arg(long = "provide")]
    provides: Vec<String>,
    /// TOML appended as is.
    #[arg(long, default_value = "")]
    extra: String,
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// The local sidecar's outbound address (ip:port or unix:/path): calls go through the SDK.
    #[arg(long, conflicts_with = "direct", required_unless_present = "direct")]
    sidecar: Option<String>,
    /// Call one provider straight (http://ip:port), without the mesh.
    #[arg(long)]
    direct: Option<String>,
    /// Service name.
    #[arg(long, default_value = "hello")]
    service: String,
    /// Requests per second.
    #[arg(long)]
    rate: u32,
    /// Seconds to send for.
    #[arg(long)]
    duration: u64,
    /// GET, POST, PUT, GRPC (unary gRPC calls), STREAM (long streams of about 2 s), MIX (GET
    /// and POST alternately) or SOAK (of every 20: one long stream, two gRPC calls, GET and
    /// POST).
    #[arg(long, default_value = "GET")]
    method: String,
    /// Body size of POST/PUT requests.
    #[arg(long, default_value_t = 0)]
    body_bytes: usize,
    /// Most requests in flight at once.
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Request path and query.
    #[arg(long, default_value = "/")]
    path: String,
    /// Protocol to the sidecar or provider: http1 or http2.
    #[arg(long, default_value = "http1")]
    protocol: String,
    /// Per-request timeout in milliseconds.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Print a line every second (`t=Ns …`), and who answered in it (`served_at: UNIX_MS
    /// NAME=COUNT@LAST_UNIX_MS …`).
    #[arg(long)]
    progress: bool,
    /// List every answered request slower than this many milliseconds, one `slow:` line each
    /// (long streams apart; at most 100,000).
    #[arg(long, value_parser = slow_ms)]
    list_slow_ms: Option<f64>,
    /// Give every POST, PUT and gRPC call an idempotency key (`idempotency-key: RUN-N`, RUN
    /// random per run): the provider carries each out once, and the mesh may send it again
    /// when its outcome is unknown. Their failures then count as idempotent ones.
    #[arg(long)]
    keys: bool,
}

/// `--list-slow-ms`: a finite, positive number of milliseconds.
fn slow_ms(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v < 3_600_000.0 => Ok(v),
        _ => Err(format!(
            "{s:?}: expected milliseconds, more than 0 and under an hour"
        )),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let format = detour_registry::telemetry::LogFormat::from_env();
    detour_registry::telemetry::init_logging_as(format, "warn");
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("detourctl: {e}");
            return ExitCode::from(70);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("detourctl: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn ctrl_c() {
    if tokio::signal::ctrl_c().await.is_err() {
        std::future::pending::<()>().await;
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::SidecarConfig(a) => {
            print!("{}", sidecar_config(a)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Certs {
            dir,
            trust_domain,
            hosts,
            days,
        } => certs_cmd(&dir, &trust_domain, &hosts, days),
        Command::Provider {
            listen,
            instance,
            addr_file,
            zookeeper,
            interface,
            release_grace_ms,
            delay_ms,
            dedupe_dir,
            dedupe_ttl_secs,
        } => {
            let zk = zookeeper.zip(interface);
            provider_cmd(
                listen,
                &instance,
                addr_file,
                zk,
                (release_grace_ms, delay_ms),
                (dedupe_dir, std::time::Duration::from_secs(dedupe_ttl_secs)),
            )
            .await
        }
        Command::Upgrade {
            binary,
            rollback,
            watchdog,
        } => upgrade_cmd(binary, rollback, &watchdog).await,
        Command::Gray { cmd, reg } => Ok(cli_ops::gray(cmd, reg).await),
        Command::Policy { cmd, reg } => Ok(detour_ctl::cli_policy::policy(cmd, reg).await),
        Command::Route { cmd, reg } => Ok(detour_ctl::cli_route::route(cmd, reg).await),
        Command::Rollback(args) => Ok(cli_ops::rollback(args).await),
        Command::Status { admin, reg } => Ok(cli_ops::status(reg, admin).await),
        Command::Stat { args, reg } => Ok(detour_ctl::cli_stat::stat(args, reg).await),
        Command::History { limit, reg } => Ok(cli_ops::history(reg, limit).await),
        Command::EtcdRoles(args) => Ok(detour_ctl::cli_roles::run(args).await),
        Command::Shutdown { watchdog } => match watched::shutdown(&watchdog).await {
            Ok(()) => {
                println!("shutdown: done");
                Ok(ExitCode::SUCCESS)
            }
            Err(reason) => {
                eprintln!("detourctl: shutdown failed: {reason}");
                Ok(ExitCode::from(1))
            }
        },
        Command::Demo { duration, rate } => demo_cmd(duration, rate).await,
        Command::Load(args) => load_cmd(args).await,
    }
}

/// `detourctl certs`: a certificate per host from the throw-away CA in `dir`.
fn certs_cmd(
    dir: &std::path::Path,
    trust_domain: &str,
    hosts: &[String],
    days: u64,
) -> anyhow::Result<ExitCode> {
    let validity = Duration::from_secs(days.max(1) * 24 * 3600);
    let ca = certs::open_or_create(dir, trust_domain)?;
    for host in hosts {
        let host = detour_proto::HostId::new(host.clone())?;
        let to = dir.join(host.as_str());
        ca.write_host(&to, host.as_str(), validity)?;
        println!(
            "certs: spiffe://{trust_domain}/host/{host} in {}",
            to.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// `detourctl provider`: the demo provider until SIGTERM or Ctrl-C, registered in ZooKeeper
/// as a Dubbo provider when `zk` (servers, interface) is given.
async fn provider_cmd(
    listen: std::net::SocketAddr,
    instance: &str,
    addr_file: Option<std::path::PathBuf>,
    zk: Option<(String, String)>,
    (release_grace_ms, delay_ms): (u64, u64),
    (dedupe_dir, dedupe_ttl): (Option<std::path::PathBuf>, std::time::Duration),
) -> anyhow::Result<ExitCode> {
    use detour_thin_sdk::dedupe::{Dedupe, DirStore, MemoryStore};
    let dedupe = match dedupe_dir {
        Some(dir) => Dedupe::new(
            DirStore::open(&dir, dedupe_ttl)
                .map_err(|e| anyhow::anyhow!("dedupe directory {}: {e}", dir.display()))?,
        ),
        None => Dedupe::new(MemoryStore::new(100_000, dedupe_ttl)),
    };
    let provider = DemoProvider::start_with(listen, instance, dedupe).await?;
    provider.set_delay_ms(delay_ms);
    let registration = zk.map(|(servers, iface)| {
        let url = zk_publish::provider_url(provider.addr(), &iface, instance, 100);
        zk_publish::ZkRegistration::hold(servers, "/dubbo", &iface, &url)
    });
    if let Some(path) = addr_file {
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, provider.addr().to_string())?;
        std::fs::rename(&tmp, &path)?;
    }
    println!("provider: {instance} listening on {}", provider.addr());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = ctrl_c() => {}
        _ = term.recv() => {}
    }
    if let Some(r) = registration {
        r.withdraw().await;
        println!("provider: {instance} de-registered; serving {release_grace_ms} ms more");
        tokio::time::sleep(std::time::Duration::from_millis(release_grace_ms)).await;
    }
    println!(
        "provider: {instance} served {} ({} keyed requests replayed)",
        provider.served(),
        provider.replayed()
    );
    Ok(ExitCode::SUCCESS)
}

/// `detourctl upgrade`: asks the watchdog at `watchdog` to hand the sidecar over to `binary`
/// (or back to the previous one).
async fn upgrade_cmd(
    binary: Option<std::path::PathBuf>,
    rollback: bool,
    watchdog: &std::path::Path,
) -> anyhow::Result<ExitCode> {
    let binary = match binary {
        Some(b) => Some(
            std::fs::canonicalize(&b)
                .with_context(|| format!("--binary {}: no such file", b.display()))?,
        ),
        None => None,
    };
    let req = UpgradeRequest { binary, rollback };
    match watched::upgrade(watchdog, &req).await {
        Ok(done) => {
            println!(
                "upgrade: pid={} binary={} previous={} ready_ms={} done_ms={}",
                done.pid,
                done.binary.display(),
                done.previous.display(),
                done.ready_ms,
                done.done_ms
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(reason) => {
            eprintln!("detourctl: upgrade failed: {reason}");
            Ok(ExitCode::from(1))
        }
    }
}

/// `detourctl demo`: the demo mesh under load.
async fn demo_cmd(duration: Option<u64>, rate: u32) -> anyhow::Result<ExitCode> {
    let opts = DemoOptions {
        duration: duration.map(Duration::from_secs),
        rate,
    };
    let stats = demo::run(&opts, ctrl_c()).await?;
    println!("{}", stats.failure_line());
    println!(
        "demo: sent={} ok={} failed={} p50_ms={:.2} p99_ms={:.2}",
        stats.sent,
        stats.ok,
        stats.failed,
        stats.ms(0.5),
        stats.ms(0.99)
    );
    Ok(exit_for(&stats))
}

/// `detourctl load`: steady load through the SDK or straight to a provider, with its summary
/// lines and every failed request.
async fn load_cmd(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let protocol = AppProtocol::parse(&args.protocol)
        .with_context(|| format!("--protocol {:?}: expected http1 or http2", args.protocol))?;
    let target = match (&args.sidecar, &args.direct) {
        (Some(s), _) => {
            let dial: Dial = s.parse().map_err(anyhow::Error::msg)?;
            let mut client = Client::builder(dial)
                .protocol(protocol)
                .app("detourctl-load")
                .timeout(Duration::from_millis(args.timeout_ms));
            // The OpenTelemetry variables turn the SDK's trace export on.
            if let Some(cfg) = TraceConfig::from_env("detourctl-load", std::env::vars())
                .map_err(anyhow::Error::msg)?
            {
                client = client.tracing(cfg);
            }
            Target::Sdk(client.build())
        }
        (None, Some(url)) => {
            let hostport = url
                .strip_prefix("http://")
                .unwrap_or(url)
                .trim_end_matches('/');
            let addr = hostport
                .parse()
                .with_context(|| format!("--direct {url:?}: expected http://ip:port"))?;
            Target::Direct {
                dial: Dial::Tcp(addr),
                protocol,
            }
        }
        (None, None) => anyhow::bail!("one of --sidecar and --direct is required"),
    };
    let spec = LoadSpec {
        service: ServiceName::new(args.service.clone())?,
        rate: args.rate,
        duration: Duration::from_secs(args.duration),
        methods: args
            .method
            .parse::<MethodMix>()
            .map_err(anyhow::Error::msg)?,
        body_bytes: args.body_bytes,
        concurrency: args.concurrency,
        path: args.path.clone(),
        timeout: Duration::from_millis(args.timeout_ms),
        slow: args
            .list_slow_ms
            .map(|ms| Duration::from_secs_f64(ms / 1000.0)),
        keys: args
            .keys
            .then(|| detour_thin_sdk::dedupe::IdempotencyKey::random().to_string()),
    };
    let progress = args.progress;
    let stats = load::run(
        &spec,
        &target,
        |s, w| {
            if progress {
                println!("{}", w.summary(&format!("t={s}s")));
                if !w.served_by.is_empty() {
                    // Who answered in that second: `served_at: UNIX_MS NAME=COUNT@LAST …`.
                    let line = w.served_line();
                    let who = line.strip_prefix("served: ").unwrap_or(&line);
                    println!("served_at: {} {who}", detour_registry::now_unix_ms());
                }
            }
        },
        ctrl_c(),
    )
    .await;
    println!("{}", stats.served_line());
    println!("{}", stats.path_line());
    println!("{}", stats.gap_line());
    println!("{}", stats.latency_line());
    println!("{}", stats.kinds_line());
    println!("{}", stats.summary("load"));
    println!("{}", stats.failure_line());
    for f in &stats.failed_requests {
        println!("{}", f.line());
    }
    for s in &stats.slow_requests {
        println!("{}", s.line());
    }
    Ok(exit_for(&stats))
}

fn exit_for(stats: &Stats) -> ExitCode {
    if stats.failed == 0 && stats.ok > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    }
}

/// The config text `detourctl sidecar-config` prints.
fn sidecar_config(a: SidecarConfigArgs) -> anyhow::Result<String> {
    use detour_kit::sidecar_config::{SidecarToml, TlsFiles};
    let mut t = SidecarToml::new(&a.host, &a.ip, &a.run_dir).unix(&a.unix);
    if let Some(r) = &a.registry {
        t = t.registry(r);
    }
    if let Some(d) = &a.state_dir {
        t = t.state_dir(d);
    }
    if let Some(c) = &a.catalog_cache {
        t = t.catalog_cache(c);
    }
    if let Some(z) = &a.zone {
        t = t.zone(z);
    }
    t = t.tls(match &a.pki {
        Some(pki) => TlsFiles::Dir {
            dir: pki.join(&a.host),
            trust_domain: None,
            reload_ms: None,
        },
        None => TlsFiles::Plaintext,
    });
    for p in &a.provides {
        let (service, rest) = p.split_once('=').ok_or_else(|| {
            anyhow::anyhow!("--provide {p:?}: expected SERVICE=ADDRESS[@PROTOCOL]")
        })?;
        let (address, protocol) = match rest.split_once('@') {
            Some((a, proto)) => (a, Some(proto)),
            None => (rest, None),
        };
        t = t.provide(service, address, protocol);
    }
    Ok(t.registry_dir(&a.registry_dir).extra(&a.extra).render())
}
