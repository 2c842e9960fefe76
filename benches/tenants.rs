//! Tenants: what a tenant costs popgate and its stores, for 1, 100, 1,000 and 10,000 tenants on the same
//! two stores (README, "Stores as a fleet": tenants with the same store settings share one store entry).
//!
//! Two in-repo maildrop stores run in this process, each behind a counting TCP forwarder (popgate is
//! configured with the forwarders' ports, so every store connection popgate opens is counted at accept).
//! Tenant `t{i}` owns `t{i}.example`, lists both stores, allows plaintext logins and probes every second
//! (`health: {interval: 1s}`); everything else is default (`pool.min_idle` 2, `max_age` 20 s). From 1,000
//! tenants on, `metrics: {tenant_store_histograms: false}`. Each store holds, for every tenant, one mailbox
//! per load client, `u{c}@t{i}.example` / `pw` (c = 1..=TENANTS_CONCURRENCY): the store locks a mailbox
//! while a session holds it (RFC 1939), so 20 clients logging in to one tenant's only mailbox would mostly
//! get `-ERR [IN-USE]`; client c always logs in as `u{c}@` of the tenant it picked. popgate runs as its
//! own release process, one fresh process per tenant count; for each:
//!
//! 1. start: from spawning popgate until its POP3 port answers `+OK`;
//! 2. idle store connections after settling (ESTABLISHED sockets in /proc/net/tcp whose peer is the store);
//! 3. new store connections per second with no clients (the forwarders' accept counts) over a 20 s window:
//!    one `pool.max_age`, so each pre-warmed connection's retirement and replacement is counted once beside
//!    the probes (a 10 s window starting 5 s after start would see the probes only);
//! 4. popgate's VmRSS after start and settling;
//! 5. `POST /reload` timed from request to response: the first, and the median of 20; the config is
//!    unchanged (every tenant kept), or with TENANTS_RELOAD_CHANGE=all every tenant's `max_sessions`
//!    changes at each reload (every tenant rebuilt; the stores stay shared);
//! 6. VmRSS after 1 reload and after 20;
//! 7. logins/s: a fixed number of logins (or a time bound), 20 concurrent clients, each a fresh connection
//!    USER/PASS/QUIT as the client's user of a random tenant; the ratio to the 1-tenant row of the same
//!    run. The load clients, the forwarders and the stores share the machine's CPUs with popgate.
//!
//! Memory per idle tenant = (settled VmRSS at N − settled VmRSS at 1) ÷ (N − 1).
//!
//! Run by `scripts/tenants`, which builds popgate in release and writes the output to target/bench/.
//! Environment: POPGATE_BIN (default target/release/popgate), TENANTS_LIST ("1,100,1000,10000"),
//! TENANTS_LOGINS (10000), TENANTS_LOGIN_SECONDS (20), TENANTS_CONCURRENCY (20), TENANTS_SETTLE (5 s),
//! TENANTS_WINDOW (20 s), TENANTS_RELOADS (20), TENANTS_RELOAD_CHANGE (unset, or `all`). Exits 1 when popgate failed to start, a reload failed, a
//! login failed or popgate panicked.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark stops loudly where it stands

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener as StdListener, TcpStream as StdStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use maildrop::{Maildrop, Settings};
use popload::{Connector, TargetArgs};
use tokio::net::{TcpListener, TcpStream};

/// How long popgate may take to greet, and to become ready, before the bench gives up on that count.
const START_LIMIT: Duration = Duration::from_secs(120);
/// Failed logins after which a login run stops early.
const MAX_LOGIN_ERRORS: u64 = 100;

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks for benchmark names: this binary has none to list.
    }
    let counts: Vec<usize> = std::env::var("TENANTS_LIST")
        .ok()
        .filter(|s| !s.trim().is_empty())
        .map(|s| {
            s.split(',')
                .map(|n| {
                    n.trim()
                        .parse()
                        .expect("TENANTS_LIST: comma-separated counts")
                })
                .collect()
        })
        .unwrap_or_else(|| vec![1, 100, 1000, 10000]);
    assert!(
        counts.iter().all(|&n| n >= 1),
        "TENANTS_LIST: counts are at least 1"
    );
    let params = Params {
        logins: env_or("TENANTS_LOGINS", 10000),
        login_seconds: env_or("TENANTS_LOGIN_SECONDS", 20.0),
        concurrency: env_or::<usize>("TENANTS_CONCURRENCY", 20).max(1),
        settle: Duration::from_secs_f64(env_or("TENANTS_SETTLE", 5.0)),
        window: Duration::from_secs_f64(env_or("TENANTS_WINDOW", 20.0)),
        reloads: env_or::<usize>("TENANTS_RELOADS", 20).max(1),
        change_all: std::env::var("TENANTS_RELOAD_CHANGE").is_ok_and(|v| v == "all"),
    };
    let popgate_bin = std::env::var_os("POPGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/popgate"));
    assert!(
        popgate_bin.exists(),
        "{} not found: build it with `cargo build --release` (scripts/tenants does)",
        popgate_bin.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Two stores, each holding every tenant's users (one per load client), each behind a counting forwarder.
    let max_tenants = counts.iter().copied().max().unwrap_or(1);
    let message = b"Subject: tenants\r\n\r\nhello\r\n".to_vec();
    let mut stores = Vec::new();
    for _ in 0..2 {
        let store = Maildrop::new(Settings::default());
        for i in 1..=max_tenants {
            for c in 1..=params.concurrency {
                store.add_mailbox(&format!("u{c}@t{i}.example"), "pw", vec![message.clone()]);
            }
        }
        let server = rt
            .block_on(store.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
            .unwrap();
        let forwarder = rt.block_on(Forwarder::start(server.local_addr()));
        stores.push((store, server, forwarder));
    }
    let forwarders: Vec<&Forwarder> = stores.iter().map(|(_, _, f)| f).collect();
    println!(
        "stores (maildrop) at {} and {}, popgate connects to their forwarders at {} and {}; \
         {} logins per count (at most {} s), {} concurrent; settle {:.0} s, window {:.0} s, {} reloads; \
         fd soft limit {}",
        stores[0].1.local_addr(),
        stores[1].1.local_addr(),
        forwarders[0].addr,
        forwarders[1].addr,
        params.logins,
        params.login_seconds,
        params.concurrency,
        params.settle.as_secs_f64(),
        params.window.as_secs_f64(),
        params.reloads,
        fd_limit()
    );

    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<Row> = Vec::new();
    let mut failed = false;
    for &n in &counts {
        println!();
        println!("== {n} tenants");
        match measure(&rt, &popgate_bin, dir.path(), n, &forwarders, &params) {
            Ok(row) => {
                failed |= row.failed();
                rows.push(row);
            }
            Err(why) => {
                println!("  FAILED: {why}");
                failed = true;
            }
        }
    }

    print!("{}", table(&rows, &params));
    if failed {
        eprintln!("tenants: FAILED (see above)");
        std::process::exit(1);
    }
    println!("tenants: ok");
}

struct Params {
    logins: u64,
    login_seconds: f64,
    concurrency: usize,
    settle: Duration,
    window: Duration,
    reloads: usize,
    /// Each reload changes every tenant (its `max_sessions`), so every tenant is rebuilt; otherwise the
    /// file is reloaded unchanged and every tenant is kept.
    change_all: bool,
}

/// One tenant count's figures.
struct Row {
    tenants: usize,
    start: Duration,
    ready: Duration,
    idle_conns: [usize; 2],
    conns_per_sec: [f64; 2],
    rss_settled: u64,
    metrics_bytes: usize,
    reload_first: Duration,
    reload_median: Duration,
    reload_max: Duration,
    reload_failures: usize,
    reload_conns_per_sec: f64,
    rss_reload_1: u64,
    rss_reload_all: u64,
    rss_after_logins: u64,
    metrics_bytes_after_logins: usize,
    logins: LoginRun,
    panics: usize,
    log_warnings: usize,
}

impl Row {
    fn failed(&self) -> bool {
        self.reload_failures > 0 || self.logins.errors > 0 || self.panics > 0
    }
}

fn measure(
    rt: &tokio::runtime::Runtime,
    bin: &Path,
    dir: &Path,
    tenants: usize,
    forwarders: &[&Forwarder],
    params: &Params,
) -> Result<Row, String> {
    // The config in a directory of its own (popgate watches the config's directory), the log beside it.
    let conf_dir = dir.join(format!("n{tenants}"));
    fs::create_dir_all(&conf_dir).unwrap();
    let config = conf_dir.join("popgate.yaml");
    let log = dir.join(format!("popgate-{tenants}.log"));
    let (pop3, admin) = (free_port(), free_port());
    let yaml = config_yaml(tenants, pop3, admin, forwarders, 0);
    fs::write(&config, &yaml).unwrap();
    println!("  config {} KiB; log {}", yaml.len() / 1024, log.display());

    // 1. Start: spawn → greeting.
    let began = Instant::now();
    let mut popgate = Popgate::spawn(bin, &config, &log);
    let pid = popgate.pid();
    let start = loop {
        if greets(pop3) {
            break began.elapsed();
        }
        if let Some(status) = popgate.exited() {
            return Err(format!(
                "popgate exited ({status}) before greeting; log:\n{}",
                tail(&log, 40)
            ));
        }
        if began.elapsed() > START_LIMIT {
            return Err(format!(
                "popgate did not greet on {pop3} within {} s; log:\n{}",
                START_LIMIT.as_secs(),
                tail(&log, 40)
            ));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let ready = loop {
        if http(admin, "GET", "/readyz").is_ok_and(|r| r.status == 200) {
            break began.elapsed();
        }
        if began.elapsed() > START_LIMIT || popgate.exited().is_some() {
            return Err(format!(
                "popgate never became ready; log:\n{}",
                tail(&log, 40)
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    println!(
        "  pid {pid}: greeting after {:.0} ms, /readyz 200 after {:.0} ms, VmRSS {} KiB at greeting",
        ms(start),
        ms(ready),
        rss_kib(pid)
    );

    // 2 and 4. Settle, then idle store connections and memory.
    std::thread::sleep(params.settle);
    let idle_conns = [0, 1].map(|s| established_to(forwarders[s].addr.port()));
    let forwarded_open = [0, 1].map(|s| forwarders[s].open.load(Ordering::Relaxed));
    let rss_settled = rss_kib(pid);
    println!(
        "  settled: idle store connections {} + {} (forwarders see {} + {} open), VmRSS {rss_settled} KiB, \
         threads {}, fds {}",
        idle_conns[0],
        idle_conns[1],
        forwarded_open[0],
        forwarded_open[1],
        proc_status(pid, "Threads:").unwrap_or(0),
        fd_count(pid)
    );

    // 3. New store connections per second with no clients.
    let before = [0, 1].map(|s| forwarders[s].accepted.load(Ordering::Relaxed));
    let window_began = Instant::now();
    std::thread::sleep(params.window);
    let secs = window_began.elapsed().as_secs_f64();
    let conns_per_sec =
        [0, 1].map(|s| (forwarders[s].accepted.load(Ordering::Relaxed) - before[s]) as f64 / secs);
    println!(
        "  idle {secs:.1} s: {:.2} + {:.2} new store connections/s; VmRSS {} KiB",
        conns_per_sec[0],
        conns_per_sec[1],
        rss_kib(pid)
    );

    // The scrape's size (the per-tenant series are most of it).
    let scrape_began = Instant::now();
    let metrics_bytes = match http(admin, "GET", "/metrics") {
        Ok(r) if r.status == 200 => r.body.len(),
        Ok(r) => return Err(format!("GET /metrics: HTTP {}", r.status)),
        Err(e) => return Err(format!("GET /metrics: {e}")),
    };
    println!(
        "  GET /metrics: {} KiB in {:.0} ms",
        metrics_bytes / 1024,
        ms(scrape_began.elapsed())
    );

    // 5 and 6. Reloads of the unchanged file.
    let accepted_before = forwarders
        .iter()
        .map(|f| f.accepted.load(Ordering::Relaxed))
        .sum::<u64>();
    let reloads_began = Instant::now();
    let mut times = Vec::with_capacity(params.reloads);
    let mut reload_failures = 0;
    let mut rss_reload_1 = 0;
    let mut rss_trail = Vec::with_capacity(params.reloads);
    for i in 0..params.reloads {
        if params.change_all {
            fs::write(
                &config,
                config_yaml(tenants, pop3, admin, forwarders, i + 1),
            )
            .unwrap();
        }
        let t = Instant::now();
        match http(admin, "POST", "/reload") {
            Ok(r) if r.status == 200 && r.body.contains("\"ok\":true") => {}
            Ok(r) => {
                reload_failures += 1;
                println!("  reload {}: HTTP {} {}", i + 1, r.status, r.body.trim());
            }
            Err(e) => {
                reload_failures += 1;
                println!("  reload {}: {e}", i + 1);
            }
        }
        times.push(t.elapsed());
        rss_trail.push(rss_kib(pid));
        if i == 0 {
            // After the first reload: let what it spawned or dropped settle, then read memory.
            std::thread::sleep(Duration::from_secs(1));
            rss_reload_1 = rss_kib(pid);
        }
    }
    let reload_span = reloads_began.elapsed().as_secs_f64();
    std::thread::sleep(Duration::from_secs(1));
    let rss_reload_all = rss_kib(pid);
    let accepted_during = forwarders
        .iter()
        .map(|f| f.accepted.load(Ordering::Relaxed))
        .sum::<u64>()
        - accepted_before;
    let reload_conns_per_sec = accepted_during as f64 / (reload_span + 1.0);
    let reload_first = times[0];
    let reload_max = times.iter().copied().max().unwrap_or_default();
    let mut sorted = times.clone();
    sorted.sort();
    let reload_median = sorted[sorted.len() / 2];
    println!(
        "  {} reloads in {reload_span:.1} s: first {:.1} ms, median {:.1} ms, max {:.1} ms, {reload_failures} failed; \
         store connections opened meanwhile {accepted_during} ({reload_conns_per_sec:.2}/s); \
         VmRSS {rss_reload_1} KiB after 1, {rss_reload_all} KiB after {}; idle store connections now {} + {}",
        params.reloads,
        ms(reload_first),
        ms(reload_median),
        ms(reload_max),
        params.reloads,
        established_to(forwarders[0].addr.port()),
        established_to(forwarders[1].addr.port()),
    );
    println!(
        "  reload times (ms): {}",
        times
            .iter()
            .map(|t| format!("{:.1}", ms(*t)))
            .collect::<Vec<_>>()
            .join(" ")
    );
    println!(
        "  VmRSS right after each reload (KiB): {}",
        rss_trail
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(" ")
    );

    // 7. Logins as users of random tenants.
    let connector = Arc::new(TargetArgs::plain(pop3).connector().unwrap());
    let logins = rt.block_on(login_run(
        connector,
        tenants,
        params.logins,
        Duration::from_secs_f64(params.login_seconds),
        params.concurrency,
        0x5eed ^ tenants as u64,
    ));
    std::thread::sleep(Duration::from_secs(1));
    let rss_after_logins = rss_kib(pid);
    let metrics_bytes_after_logins = http(admin, "GET", "/metrics").map_or(0, |r| r.body.len());
    println!(
        "  logins: {} ok, {} failed in {:.2} s = {:.0}/s (p50 {:.1} ms, p99 {:.1} ms); VmRSS {rss_after_logins} KiB \
         after, /metrics then {} KiB{}",
        logins.ok,
        logins.errors,
        logins.elapsed.as_secs_f64(),
        logins.per_sec(),
        ms(logins.p50),
        ms(logins.p99),
        metrics_bytes_after_logins / 1024,
        if logins.error_samples.is_empty() {
            String::new()
        } else {
            format!("; errors: {:?}", logins.error_samples)
        }
    );

    popgate.stop();
    let text = fs::read_to_string(&log).unwrap_or_default();
    let panics = text.matches("panicked").count();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    println!(
        "  log: {} KiB, {} lines, {} WARN/ERROR lines, {panics} panics",
        text.len() / 1024,
        text.lines().count(),
        warnings.len()
    );
    for w in warnings.iter().take(5) {
        println!("    {}", truncate(w, 300));
    }
    Ok(Row {
        tenants,
        start,
        ready,
        idle_conns,
        conns_per_sec,
        rss_settled,
        metrics_bytes,
        reload_first,
        reload_median,
        reload_max,
        reload_failures,
        reload_conns_per_sec,
        rss_reload_1,
        rss_reload_all,
        logins,
        panics,
        rss_after_logins,
        metrics_bytes_after_logins,
        log_warnings: warnings.len(),
    })
}

fn config_yaml(
    tenants: usize,
    pop3: SocketAddr,
    admin: SocketAddr,
    stores: &[&Forwarder],
    generation: usize,
) -> String {
    let mut y = String::with_capacity(200 + tenants * 160);
    writeln!(
        y,
        "listeners:\n  - {{name: pop3, bind: \"{pop3}\", tls: none}}"
    )
    .unwrap();
    writeln!(y, "admin: {{bind: \"{admin}\"}}").unwrap();
    if tenants >= 1000 {
        writeln!(y, "metrics: {{tenant_store_histograms: false}}").unwrap();
    }
    writeln!(y, "tenants:").unwrap();
    let backends = stores
        .iter()
        .map(|f| format!("\"{}\"", f.addr))
        .collect::<Vec<_>>()
        .join(", ");
    for i in 1..=tenants {
        writeln!(
            y,
            "  t{i}: {{domains: [t{i}.example], backends: [{backends}], plaintext_login: allow, health: {{interval: 1s}}, \
             max_sessions: {}}}",
            100_000 + generation
        )
        .unwrap();
    }
    y
}

fn table(rows: &[Row], params: &Params) -> String {
    let base_rss = rows.iter().find(|r| r.tenants == 1).map(|r| r.rss_settled);
    let base_logins = rows
        .iter()
        .find(|r| r.tenants == 1)
        .map(|r| r.logins.per_sec());
    let mut t = String::new();
    writeln!(t).unwrap();
    writeln!(
        t,
        "| tenants | start ms | idle store conns (s1+s2) | new store conns/s idle (s1+s2) | RSS settled MiB | \
         KiB per idle tenant | /metrics KiB | reload first ms | reload median ms (max) | RSS after 1 reload MiB | \
         RSS after {} reloads MiB | ratio | logins/s | vs 1 tenant | failed logins | RSS after logins MiB | \
         /metrics KiB after logins |",
        params.reloads
    )
    .unwrap();
    writeln!(
        t,
        "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    .unwrap();
    for r in rows {
        let per_tenant = match base_rss {
            Some(base) if r.tenants > 1 => format!(
                "{:.2}",
                (r.rss_settled as f64 - base as f64) / (r.tenants - 1) as f64
            ),
            _ => "–".into(),
        };
        let vs = match base_logins {
            Some(b) if b > 0.0 => format!("{:.2}", r.logins.per_sec() / b),
            _ => "–".into(),
        };
        writeln!(
            t,
            "| {} | {:.0} | {} + {} | {:.2} + {:.2} | {:.1} | {per_tenant} | {} | {:.1} | {:.1} ({:.0}) | {:.1} | {:.1} | {:.3} | {:.0} | {vs} | {} | {:.1} | {} |",
            r.tenants,
            ms(r.start),
            r.idle_conns[0],
            r.idle_conns[1],
            r.conns_per_sec[0],
            r.conns_per_sec[1],
            mib(r.rss_settled),
            r.metrics_bytes / 1024,
            ms(r.reload_first),
            ms(r.reload_median),
            ms(r.reload_max),
            mib(r.rss_reload_1),
            mib(r.rss_reload_all),
            r.rss_reload_all as f64 / r.rss_reload_1.max(1) as f64,
            r.logins.per_sec(),
            r.logins.errors,
            mib(r.rss_after_logins),
            r.metrics_bytes_after_logins / 1024,
        )
        .unwrap();
    }
    writeln!(t).unwrap();
    writeln!(
        t,
        "ready (/readyz 200) after start: {}; store connections/s during the reloads: {}; WARN/ERROR log lines: {}",
        rows.iter()
            .map(|r| format!("{} tenants {:.0} ms", r.tenants, ms(r.ready)))
            .collect::<Vec<_>>()
            .join(", "),
        rows.iter()
            .map(|r| format!("{:.2}", r.reload_conns_per_sec))
            .collect::<Vec<_>>()
            .join(" / "),
        rows.iter()
            .map(|r| r.log_warnings.to_string())
            .collect::<Vec<_>>()
            .join(" / "),
    )
    .unwrap();
    t
}

// === the counting forwarder ===

/// Accepts on a port of its own, counts, and relays each connection to the store.
struct Forwarder {
    addr: SocketAddr,
    /// Connections accepted since the start.
    accepted: Arc<AtomicU64>,
    /// Connections being relayed now.
    open: Arc<AtomicI64>,
}

impl Forwarder {
    async fn start(store: SocketAddr) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let open = Arc::new(AtomicI64::new(0));
        let (count, gauge) = (accepted.clone(), open.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                count.fetch_add(1, Ordering::Relaxed);
                gauge.fetch_add(1, Ordering::Relaxed);
                let gauge = gauge.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(store).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                    gauge.fetch_sub(1, Ordering::Relaxed);
                });
            }
        });
        Self {
            addr,
            accepted,
            open,
        }
    }
}

// === logins ===

#[derive(Default)]
struct LoginRun {
    ok: u64,
    errors: u64,
    error_samples: Vec<String>,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
}

impl LoginRun {
    fn per_sec(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `concurrency` clients, client c looping connect → USER/PASS → QUIT as `u{c}@t{random}.example`, until
/// `total` logins were started or `limit` passed.
async fn login_run(
    connector: Arc<Connector>,
    tenants: usize,
    total: u64,
    limit: Duration,
    concurrency: usize,
    seed: u64,
) -> LoginRun {
    let next = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let began = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for client in 1..=concurrency {
        let (connector, next, failed) = (connector.clone(), next.clone(), failed.clone());
        workers.spawn(async move {
            let mut times = Vec::new();
            let mut errors = Vec::new();
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= total
                    || began.elapsed() >= limit
                    || failed.load(Ordering::Relaxed) >= MAX_LOGIN_ERRORS
                {
                    return (times, errors);
                }
                let tenant = 1 + splitmix64(seed.wrapping_add(n)) % tenants as u64;
                let user = format!("USER u{client}@t{tenant}.example\r\n");
                let t = Instant::now();
                let result = async {
                    let mut pop = connector.connect().await?;
                    pop.login(user.as_bytes(), b"PASS pw\r\n").await?;
                    pop.quit().await
                }
                .await;
                match result {
                    Ok(()) => times.push(t.elapsed()),
                    Err(e) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                        errors.push(format!("u{client}@t{tenant}: {e}"));
                    }
                }
            }
        });
    }
    let mut run = LoginRun::default();
    let mut times = Vec::new();
    while let Some(done) = workers.join_next().await {
        let (mut t, e) = done.unwrap();
        times.append(&mut t);
        run.errors += e.len() as u64;
        for e in e {
            if run.error_samples.len() < 5 {
                run.error_samples.push(e);
            }
        }
    }
    run.elapsed = began.elapsed();
    run.ok = times.len() as u64;
    times.sort();
    if !times.is_empty() {
        run.p50 = times[times.len() / 2];
        run.p99 = times[(times.len() * 99 / 100).min(times.len() - 1)];
    }
    run
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

// === popgate ===

struct Popgate {
    child: Child,
}

impl Popgate {
    fn spawn(bin: &Path, config: &Path, log: &Path) -> Self {
        let out = fs::File::create(log).unwrap();
        let child = Command::new(bin)
            .arg("run")
            .arg("-c")
            .arg(config)
            .env("POPGATE_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self { child }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL if it has not exited within 20 s.
    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let began = Instant::now();
        while self.exited().is_none() {
            if began.elapsed() > Duration::from_secs(20) {
                println!("  popgate did not exit within 20 s of SIGTERM: killed");
                let _ = self.child.kill();
                let _ = self.child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Popgate {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn greets(addr: SocketAddr) -> bool {
    let Ok(tcp) = StdStream::connect(addr) else {
        return false;
    };
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = String::new();
    let ok = BufReader::new(&tcp).read_line(&mut greeting).is_ok() && greeting.starts_with("+OK");
    if ok {
        let _ = (&tcp).write_all(b"QUIT\r\n");
    }
    ok
}

struct HttpReply {
    status: u16,
    body: String,
}

/// One HTTP/1.1 request on a connection of its own (the admin POSTs need `X-Popgate-Admin`).
fn http(addr: SocketAddr, method: &str, path: &str) -> Result<HttpReply, String> {
    let mut tcp = StdStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    write!(
        tcp,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nX-Popgate-Admin: 1\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let raw = String::from_utf8_lossy(&raw);
    let (head, body) = raw.split_once("\r\n\r\n").ok_or("no HTTP head")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or("no HTTP status")?;
    Ok(HttpReply {
        status,
        body: body.to_owned(),
    })
}

// === /proc ===

/// ESTABLISHED IPv4 sockets whose peer port is `port` (popgate's ends of its store connections: only
/// popgate connects to the forwarders).
fn established_to(port: u16) -> usize {
    fs::read_to_string("/proc/net/tcp")
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            f.len() > 3
                && f[3] == "01"
                && f[2]
                    .rsplit_once(':')
                    .and_then(|(_, p)| u16::from_str_radix(p, 16).ok())
                    == Some(port)
        })
        .count()
}

fn proc_status(pid: u32, key: &str) -> Option<u64> {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn rss_kib(pid: u32) -> u64 {
    proc_status(pid, "VmRSS:").unwrap_or(0)
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn fd_limit() -> String {
    fs::read_to_string("/proc/self/limits")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| l.split_whitespace().nth(3).unwrap_or("?").to_string())
        .unwrap_or_default()
}

// === small things ===

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> SocketAddr {
    let l = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}
