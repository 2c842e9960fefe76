//! The figures of the performance issue: popgate against a direct connection to a real Dovecot store, in
//! the same run, interleaved, as medians of several rounds. `scripts/bench` builds popgate and runs this
//! (`cargo bench --bench load -- [--quick] [--rounds N] [--popgate PATH] [--serve SECONDS]`); it needs
//! Dovecot and root, as the end-to-end tests do.
//!
//! Layout: one Dovecot store (plain and implicit-TLS listeners, capacity settings for thousands of
//! sessions, see `start_store`); popgate as separate release processes, one per configuration (pool
//! on, pool off, and both again with the store reached over implicit TLS), so that each one's RSS and CPU
//! time can be read from /proc; HAProxy in TCP mode as a reference when it is installed (`haproxy` from
//! Debian; it is skipped otherwise); the load itself from `popload`, in this process, on a
//! single-threaded runtime. Memory per idle session is measured on a fresh proxy process per round, so
//! memory freed by earlier workloads cannot hide the sessions' cost. Loopback only; everything is bounded by
//! the counts and seconds of the chosen profile. Nothing here asserts a timing: it prints figures.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly where it stands

#[path = "../tests/support/directory.rs"]
#[allow(dead_code)]
mod directory;
#[path = "../tests/support/dovecot.rs"]
#[allow(dead_code)]
mod dovecot;
#[path = "../tests/support/redis.rs"]
#[allow(dead_code)]
mod redis;

use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Write as _};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dovecot::{DovecotStore, StoreOptions, TlsPem};
use popload::hold::{self, HoldArgs};
use popload::latency::{self, LatencyArgs};
use popload::logins::{self, LoginsArgs, LoginsReport};
use popload::retr::{self, RetrArgs};
use popload::stats::median;
use popload::{AccountArgs, TargetArgs, TlsMode};

/// Mailboxes the login and hold workloads cycle through.
const USERS: usize = 100;
const USER_PATTERN: &str = "u{n}@example.com";
const PASSWORD: &str = "bench-pw";
const BIG_USER: &str = "big@example.com";
const SMALL_USER: &str = "small@example.com";
const BIG_MIB: usize = 20;
/// The small message: 5.6 KiB.
const SMALL_OCTETS: usize = 5734;
const CONCURRENCY: usize = 50;
/// Where Debian's `haproxy` package puts the binary.
const HAPROXY: &str = "/usr/sbin/haproxy";

/// Sizes of one run.
#[derive(Debug, Clone, Copy)]
struct Profile {
    name: &'static str,
    rounds: usize,
    login_secs: f64,
    retr_count: usize,
    latency_count: usize,
    hold_sessions: usize,
    hold_secs: f64,
}

const FULL: Profile = Profile {
    name: "full",
    rounds: 3,
    login_secs: 8.0,
    retr_count: 5,
    latency_count: 2000,
    hold_sessions: 2000,
    // Long enough that every held session sends its NOOP (one each 30 s, spread over the first 30 s).
    hold_secs: 31.0,
};

const QUICK: Profile = Profile {
    name: "quick",
    rounds: 3,
    login_secs: 3.0,
    retr_count: 3,
    latency_count: 1000,
    hold_sessions: 500,
    hold_secs: 4.0,
};

/// A proxy configuration under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    /// popgate, plain store, pre-warmed connections (the default pool).
    Pool,
    /// popgate, plain store, `pool: {min_idle: 0}`.
    NoPool,
    /// popgate, store over implicit TLS, pool on.
    TlsPool,
    /// popgate, store over implicit TLS, pool off.
    TlsNoPool,
    /// HAProxy in TCP mode in front of the plain store (reference; no POP3 awareness).
    Haproxy,
    /// popgate, pool on, every edge limit in force for the clients (no trusted network): the baseline of
    /// the shared-state row.
    Limits,
    /// `Limits` with `cluster:` on a Redis on loopback: every limit checked fleet-wide.
    Shared,
    /// popgate, pool on, each mailbox placed by a map file (the placement rows' fastest source).
    Map,
    /// Placed by OpenLDAP: the answers cached (warm after the first round) or never (`cache.size: 0`).
    LdapWarm,
    LdapCold,
    /// Placed by PostgreSQL, warm or cold.
    PgWarm,
    PgCold,
    /// Placed by MariaDB, warm or cold.
    MariaWarm,
    MariaCold,
    /// popgate, pool on, the store 0.5 ms away (each chunk held 0.5 ms per direction by `Delay`).
    DelayPool,
    /// The same with `pool: {min_idle: 0}`: every login connects, greets and asks CAPA across the delay.
    DelayNoPool,
    /// `DelayPool` with `pool: {xclient_at_user: true}`: XCLIENT goes at the client's USER.
    DelayEarly,
    /// popgate, pool on, serving clients an RSA-2048 certificate (the others serve the self-signed ECDSA
    /// P-256 fallback): the `tls` section's certificate-kind rows.
    Rsa,
}

/// A store 0.5 ms away: a loopback forwarder that holds every chunk 0.5 ms in each direction (this kernel
/// has no `netem`). Two threads per connection, for as long as the bench runs.
struct Delay {
    addr: SocketAddr,
}

/// How long the forwarder holds each chunk, per direction.
const DELAY: Duration = Duration::from_micros(500);

/// How long the forwarder between a distant client and its server holds each chunk, per direction: a
/// client on the ISP's access network, its round trip (4 ms) well above the store's.
const CLIENT_DELAY: Duration = Duration::from_millis(2);

impl Delay {
    /// A forwarder to `to` holding each chunk `hold` in each direction.
    fn start(to: SocketAddr, hold: Duration) -> Self {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let addr = listener.local_addr().unwrap();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(store) = TcpStream::connect(to) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = store.set_nodelay(true);
                for (from, into) in [
                    (client.try_clone(), store.try_clone()),
                    (store.try_clone(), client.try_clone()),
                ] {
                    let (Ok(mut from), Ok(mut into)) = (from, into) else {
                        continue;
                    };
                    std::thread::spawn(move || {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match std::io::Read::read(&mut from, &mut buf) {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            std::thread::sleep(hold);
                            if into.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = into.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Self { addr }
    }
}

/// The directories of the placement rows, each holding every login user's store.
struct Directories {
    slapd: directory::Slapd,
    pg: directory::Postgres,
    maria: directory::Mariadb,
    map: PathBuf,
    /// Bind and database passwords, one file each.
    files: PathBuf,
}

impl Directories {
    fn start(dir: &Path, store: SocketAddr) -> Self {
        let slapd = directory::Slapd::start();
        let pg = directory::Postgres::start();
        let maria = directory::Mariadb::start();
        let mut map = String::new();
        for n in 1..=USERS {
            let user = USER_PATTERN.replace("{n}", &n.to_string());
            let at = store.to_string();
            slapd.add_mailbox(&user, &at, None);
            pg.insert(&user, &at, None);
            maria.insert(&user, &at, None);
            let _ = writeln!(map, "{user} {at}");
        }
        let files = dir.join("directories");
        fs::create_dir_all(&files).unwrap();
        fs::write(files.join("ldap-pw"), directory::Slapd::ROOT_PW).unwrap();
        fs::write(files.join("pg-pw"), directory::Postgres::PASSWORD).unwrap();
        fs::write(files.join("maria-pw"), directory::Mariadb::PASSWORD).unwrap();
        let path = files.join("bench.map");
        fs::write(&path, map).unwrap();
        Self {
            slapd,
            pg,
            maria,
            map: path,
            files,
        }
    }

    /// The tenant's `placement:` block for `variant` (indented under the tenant).
    fn placement(&self, variant: Variant) -> String {
        let cache = match variant {
            Variant::LdapCold | Variant::PgCold | Variant::MariaCold => "\n      cache: {size: 0}",
            _ => "",
        };
        let files = self.files.display();
        let source = match variant {
            Variant::Map => format!("map: \"{}\"", self.map.display()),
            Variant::LdapWarm | Variant::LdapCold => format!(
                "ldap: {{urls: [\"{}\"], bind_dn: \"{}\", password_file: \"{files}/ldap-pw\", base: \"ou=people,{}\", \
                 attribute: mailHost}}",
                self.slapd.url(),
                directory::Slapd::ROOT_DN,
                directory::Slapd::SUFFIX
            ),
            Variant::PgWarm | Variant::PgCold => format!(
                "sql: {{url: \"{}\", password_file: \"{files}/pg-pw\", \
                 query: \"SELECT host FROM mailboxes WHERE address = $1\"}}",
                self.pg.url()
            ),
            _ => format!(
                "sql: {{url: \"{}\", password_file: \"{files}/maria-pw\", \
                 query: \"SELECT host FROM mailboxes WHERE address = ?\"}}",
                self.maria.url()
            ),
        };
        format!("\n    placement:\n      {source}{cache}")
    }
}

/// The placement rows: a label and the variant behind it.
const PLACED: [(&str, Variant); 7] = [
    ("place.map", Variant::Map),
    ("place.ldap.warm", Variant::LdapWarm),
    ("place.ldap.cold", Variant::LdapCold),
    ("place.pg.warm", Variant::PgWarm),
    ("place.pg.cold", Variant::PgCold),
    ("place.maria.warm", Variant::MariaWarm),
    ("place.maria.cold", Variant::MariaCold),
];

/// The edge limits of the shared-state rows: all on, none ever reached by the load (50 clients on one
/// address, 100 mailboxes), so every login pays for the checks and none is refused.
const LIMITS: &str = "throttle:\n  trusted_networks: []\n  max_sessions_per_ip: 1000\n  connection_burst: 100000\n  \
                      connections_per_second: 100000\n  max_sessions_per_mailbox: 100\n";

/// A proxy process: popgate in one configuration, or HAProxy.
struct Proxy {
    child: Child,
    /// Plain POP3 listener.
    plain: SocketAddr,
    /// popgate's implicit-TLS listener (self-signed fallback certificate).
    pop3s: SocketAddr,
    /// popgate's STARTTLS listener.
    stls: SocketAddr,
    /// popgate's admin HTTP listener (metrics); none for HAProxy.
    admin: Option<SocketAddr>,
    log: PathBuf,
}

/// What the run needs to start proxies.
struct Setup<'a> {
    popgate: &'a Path,
    haproxy: bool,
    dir: &'a Path,
    store: &'a DovecotStore,
    /// The shared state's server (for `Variant::Shared`).
    redis: &'a redis::Redis,
    /// The placement rows' directories (only when that section runs).
    directories: Option<&'a Directories>,
    /// The store 0.5 ms away (only when the `delay` section runs).
    delayed: Option<SocketAddr>,
}

/// One measured way to the store: a label for the figures, where to connect, and the proxy process (for CPU
/// time).
struct Via<'a> {
    name: &'static str,
    target: TargetArgs,
    process: Option<&'a Proxy>,
}

/// What `--only` can pick (default: all of them).
const SECTIONS: [&str; 7] = [
    "logins",
    "retr",
    "latency",
    "memory",
    "placement",
    "tls",
    "delay",
];

/// Per-round figures, keyed by name; medians are taken at the end.
#[derive(Default)]
struct Figures(Vec<(String, Vec<f64>)>);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut profile = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let mut popgate_bin = PathBuf::from("target/release/popgate");
    let mut serve: Option<u64> = None;
    let mut only: Option<Vec<String>> = None;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--rounds" => {
                profile.rounds = it.next().and_then(|v| v.parse().ok()).expect("--rounds N");
            }
            "--popgate" => popgate_bin = PathBuf::from(it.next().expect("--popgate PATH")),
            "--serve" => {
                serve = Some(
                    it.next()
                        .and_then(|v| v.parse().ok())
                        .expect("--serve SECONDS"),
                )
            }
            "--only" => {
                let list: Vec<String> = it
                    .next()
                    .expect("--only SECTIONS")
                    .split(',')
                    .map(str::to_owned)
                    .collect();
                for s in &list {
                    assert!(
                        SECTIONS.contains(&s.as_str()),
                        "--only: unknown section {s:?} (known: {SECTIONS:?})"
                    );
                }
                only = Some(list);
            }
            // `cargo bench` passes `--bench`; `--quick` is read above.
            _ => {}
        }
    }
    assert!(
        popgate_bin.exists(),
        "{} is missing: build it with `cargo build --release` (scripts/bench does)",
        popgate_bin.display()
    );
    let runs = |section: &str| only.as_ref().is_none_or(|l| l.iter().any(|s| s == section));
    let began = Instant::now();
    let store = start_store(profile);
    let work = tempfile::Builder::new()
        .prefix("popgate-bench-")
        .tempdir()
        .unwrap();
    let redis = redis::Redis::start();
    let directories = runs("placement").then(|| Directories::start(work.path(), store.pop3_addr()));
    let delay = runs("delay").then(|| Delay::start(store.pop3_addr(), DELAY));
    let setup = Setup {
        popgate: &popgate_bin,
        haproxy: Path::new(HAPROXY).exists(),
        dir: work.path(),
        store: &store,
        redis: &redis,
        directories: directories.as_ref(),
        delayed: delay.as_ref().map(|d| d.addr),
    };
    let mut variants = vec![
        Variant::Pool,
        Variant::NoPool,
        Variant::TlsPool,
        Variant::TlsNoPool,
        Variant::Limits,
        Variant::Shared,
    ];
    if directories.is_some() {
        variants.extend(PLACED.iter().map(|(_, v)| *v));
    }
    if delay.is_some() {
        variants.extend([
            Variant::DelayPool,
            Variant::DelayNoPool,
            Variant::DelayEarly,
        ]);
    }
    if runs("tls") {
        variants.push(Variant::Rsa);
    }
    if setup.haproxy {
        variants.push(Variant::Haproxy);
    }
    let procs: Vec<(Variant, Proxy)> = variants
        .iter()
        .map(|&v| (v, Proxy::start(&setup, v, &format!("{v:?}"))))
        .collect();
    println!(
        "# popgate vs direct: profile {} ({} rounds), {CONCURRENCY} concurrent logins, {} idle sessions held{}",
        profile.name,
        profile.rounds,
        profile.hold_sessions,
        if setup.haproxy {
            ", HAProxy as a reference"
        } else {
            " (no HAProxy reference: not installed)"
        }
    );
    if let Some(secs) = serve {
        serve_for(&store, &procs, secs);
        return;
    }

    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let proc_of = |v: Variant| procs.iter().find(|(w, _)| *w == v).map(|(_, p)| p);
    let via = |name: &'static str, v: Variant| {
        proc_of(v).map(|p| Via {
            name,
            target: TargetArgs::plain(p.plain),
            process: Some(p),
        })
    };
    let direct = || Via {
        name: "direct",
        target: TargetArgs::plain(store.pop3_addr()),
        process: None,
    };
    // Logins, plaintext store: direct, popgate with and without pool, HAProxy.
    let login_paths: Vec<Via<'_>> = [
        Some(direct()),
        via("pool", Variant::Pool),
        via("nopool", Variant::NoPool),
        via("haproxy", Variant::Haproxy),
        via("limits", Variant::Limits),
        via("shared", Variant::Shared),
    ]
    .into_iter()
    .flatten()
    .collect();
    // Logins, store over TLS: direct is a client speaking POP3S to the store; popgate takes plain clients.
    let tls_login_paths: Vec<Via<'_>> = [
        Some(Via {
            name: "tls.direct",
            target: TargetArgs::insecure_tls(store.pop3s_addr(), TlsMode::Implicit),
            process: None,
        }),
        via("tls.pool", Variant::TlsPool),
        via("tls.nopool", Variant::TlsNoPool),
    ]
    .into_iter()
    .flatten()
    .collect();
    // Client TLS, full handshakes and resumed sessions: Dovecot terminating TLS itself (direct), popgate on
    // its implicit-TLS and STARTTLS listeners (the store behind it plain).
    let resumed = |mut t: TargetArgs| {
        t.resume = true;
        t
    };
    let pool = proc_of(Variant::Pool);
    let client_tls_paths: Vec<Via<'_>> = [
        Some(Via {
            name: "ctls.direct.implicit",
            target: TargetArgs::insecure_tls(store.pop3s_addr(), TlsMode::Implicit),
            process: None,
        }),
        Some(Via {
            name: "ctls.direct.stls",
            target: TargetArgs::insecure_tls(store.pop3_addr(), TlsMode::Stls),
            process: None,
        }),
        pool.map(|p| Via {
            name: "ctls.popgate.implicit",
            target: TargetArgs::insecure_tls(p.pop3s, TlsMode::Implicit),
            process: Some(p),
        }),
        pool.map(|p| Via {
            name: "ctls.popgate.implicit.resumed",
            target: resumed(TargetArgs::insecure_tls(p.pop3s, TlsMode::Implicit)),
            process: Some(p),
        }),
        pool.map(|p| Via {
            name: "ctls.popgate.stls",
            target: TargetArgs::insecure_tls(p.stls, TlsMode::Stls),
            process: Some(p),
        }),
        pool.map(|p| Via {
            name: "ctls.popgate.stls.resumed",
            target: resumed(TargetArgs::insecure_tls(p.stls, TlsMode::Stls)),
            process: Some(p),
        }),
        proc_of(Variant::Rsa).map(|p| Via {
            name: "ctls.rsa.implicit",
            target: TargetArgs::insecure_tls(p.pop3s, TlsMode::Implicit),
            process: Some(p),
        }),
        proc_of(Variant::Rsa).map(|p| Via {
            name: "ctls.rsa.implicit.resumed",
            target: resumed(TargetArgs::insecure_tls(p.pop3s, TlsMode::Implicit)),
            process: Some(p),
        }),
    ]
    .into_iter()
    .flatten()
    .collect();
    // A store 0.5 ms away: direct through the same delay, popgate with and without the pool.
    let delay_paths: Vec<Via<'_>> = [
        delay.as_ref().map(|d| Via {
            name: "delay.direct",
            target: TargetArgs::plain(d.addr),
            process: None,
        }),
        via("delay.pool", Variant::DelayPool),
        via("delay.nopool", Variant::DelayNoPool),
    ]
    .into_iter()
    .flatten()
    .collect();
    // A client 2 ms away (one at a time only): to the store directly, or to popgate with the store 0.5 ms
    // behind it. The client's own round trip between USER and PASS is where popgate's XCLIENT goes.
    let client_delays: Vec<(&'static str, Delay, Option<&Proxy>)> = delay
        .as_ref()
        .map(|_| {
            let mut v = vec![(
                "far.direct",
                Delay::start(store.pop3_addr(), CLIENT_DELAY),
                None,
            )];
            if let Some(p) = proc_of(Variant::DelayPool) {
                v.push(("far.pool", Delay::start(p.plain, CLIENT_DELAY), Some(p)));
            }
            if let Some(p) = proc_of(Variant::DelayEarly) {
                v.push(("far.early", Delay::start(p.plain, CLIENT_DELAY), Some(p)));
            }
            v
        })
        .unwrap_or_default();
    let far_paths: Vec<Via<'_>> = client_delays
        .iter()
        .map(|(name, d, p)| Via {
            name,
            target: TargetArgs::plain(d.addr),
            process: *p,
        })
        .collect();
    // Placement: domain-only routing (pool) against each source, warm and cold.
    let placement_paths: Vec<Via<'_>> = std::iter::once(via("pool", Variant::Pool))
        .chain(PLACED.iter().map(|&(name, v)| via(name, v)))
        .flatten()
        .filter(|_| directories.is_some())
        .collect();
    // Throughput and latency: direct, popgate (pool), HAProxy.
    let session_paths: Vec<Via<'_>> = [
        Some(direct()),
        via("pool", Variant::Pool),
        via("haproxy", Variant::Haproxy),
    ]
    .into_iter()
    .flatten()
    .collect();

    // Warm-up: every path once (Dovecot indexes the mailboxes on first access; pools fill).
    for p in login_paths
        .iter()
        .chain(&tls_login_paths)
        .chain(&placement_paths)
        .chain(&client_tls_paths)
        .chain(&delay_paths)
        .chain(&far_paths)
    {
        let r = rt
            .block_on(logins::run(&logins_args(p.target.clone(), 1.0)))
            .unwrap();
        check_logins(&r, p.name);
    }

    let mut figs = Figures::default();
    for round in 0..profile.rounds {
        println!(
            "## round {} of {} ({:.0} s so far)",
            round + 1,
            profile.rounds,
            began.elapsed().as_secs_f64()
        );
        // Each list in an order that rotates every round, so neither side always goes first.
        let lists = [
            (&login_paths, "logins"),
            (&tls_login_paths, "logins"),
            (&placement_paths, "placement"),
            (&client_tls_paths, "tls"),
            (&delay_paths, "delay"),
        ];
        for paths in lists
            .into_iter()
            .filter(|(_, section)| runs(section))
            .map(|(paths, _)| paths)
        {
            for p in rotated(paths, round) {
                let cpu_before = p.process.map(|x| cpu_seconds(x.pid()));
                let machine_before = MachineCpu::now();
                let own_before = cpu_seconds(std::process::id());
                let admin = p.process.and_then(|x| x.admin);
                let pool_before = admin.map(pool_checkouts);
                let trips_before = admin.map(cluster_round_trips);
                let redis_before = redis.pid().map(cpu_seconds);
                let r = rt
                    .block_on(logins::run(&logins_args(
                        p.target.clone(),
                        profile.login_secs,
                    )))
                    .unwrap();
                check_logins(&r, p.name);
                let name = p.name;
                figs.add(&format!("logins.{name}.per_s"), r.sessions_per_sec());
                if r.tls != TlsMode::None {
                    figs.add(
                        &format!("logins.{name}.resumed_pct"),
                        100.0 * r.tls_resumed as f64 / r.sessions.max(1) as f64,
                    );
                }
                figs.add(&format!("logins.{name}.pass_p50_us"), us(r.pass.p50));
                figs.add(&format!("logins.{name}.session_p50_us"), us(r.session.p50));
                if let (Some(a), Some((h0, m0))) = (admin, pool_before) {
                    let (h1, m1) = pool_checkouts(a);
                    if h1 + m1 > h0 + m0 {
                        figs.add(
                            &format!("logins.{name}.pool_hit_pct"),
                            100.0 * (h1 - h0) / (h1 - h0 + m1 - m0),
                        );
                    }
                }
                // The whole machine's CPU per login, and how much of it stood idle: when nothing is idle, the
                // login rate is the machine's CPU divided by what every process spends on a login.
                let machine = MachineCpu::now().since(&machine_before);
                let per_login_ms = |secs: f64| 1000.0 * secs / r.sessions as f64;
                figs.add(
                    &format!("logins.{name}.machine_ms_per_login"),
                    per_login_ms(machine.busy_secs),
                );
                figs.add(&format!("logins.{name}.idle_pct"), machine.idle_pct);
                figs.add(
                    &format!("logins.{name}.loadgen_ms_per_login"),
                    per_login_ms(cpu_seconds(std::process::id()) - own_before),
                );
                if let (Some(x), Some(before)) = (p.process, cpu_before) {
                    let cpu = cpu_seconds(x.pid()) - before;
                    figs.add(
                        &format!("logins.{name}.cpu_s_per_1000"),
                        cpu / (r.sessions as f64 / 1000.0),
                    );
                }
                if name == "shared"
                    && let (Some(a), Some((w0, f0)), Some(r0)) = (admin, trips_before, redis_before)
                {
                    let (w1, f1) = cluster_round_trips(a);
                    let logins = r.sessions as f64;
                    figs.add("logins.shared.trips_awaited", (w1 - w0) / logins);
                    figs.add("logins.shared.trips_released", (f1 - f0) / logins);
                    let redis_cpu = redis.pid().map_or(0.0, cpu_seconds) - r0;
                    figs.add(
                        "logins.shared.redis_cpu_s_per_1000",
                        redis_cpu / (logins / 1000.0),
                    );
                }
                println!(
                    "  logins  {name:<11} {:>6.0}/s  PASS p50 {:>6.0} µs  session p50 {:>6.0} µs",
                    r.sessions_per_sec(),
                    us(r.pass.p50),
                    us(r.session.p50)
                );
            }
        }
        // One client at a time: latency-bound, not CPU-bound, so each login's own path shows (a stall
        // in the store login is invisible at 50 concurrent clients on two CPUs, not here).
        // The same for the store 0.5 ms away: there the pool's head start (connect, greeting, CAPA: two
        // round trips across the delay) is on every login's own path.
        let one_at_a_time = rotated(&login_paths, round)
            .filter(|_| runs("logins"))
            .chain(rotated(&delay_paths, round).filter(|_| runs("delay")))
            .chain(rotated(&far_paths, round).filter(|_| runs("delay")));
        for p in one_at_a_time {
            let r = rt
                .block_on(logins::run(&LoginsArgs {
                    concurrency: 1,
                    ..logins_args(p.target.clone(), profile.login_secs / 2.0)
                }))
                .unwrap();
            check_logins(&r, p.name);
            let name = p.name;
            figs.add(&format!("logins1.{name}.per_s"), r.sessions_per_sec());
            figs.add(&format!("logins1.{name}.pass_p50_us"), us(r.pass.p50));
            figs.add(&format!("logins1.{name}.session_p50_us"), us(r.session.p50));
            println!(
                "  logins1 {name:<11} {:>6.0}/s  PASS p50 {:>6.0} µs  session p50 {:>6.0} µs",
                r.sessions_per_sec(),
                us(r.pass.p50),
                us(r.session.p50)
            );
        }
        for p in rotated(&session_paths, round).filter(|_| runs("retr")) {
            let r = rt
                .block_on(retr::run(&RetrArgs {
                    target: p.target.clone(),
                    accounts: AccountArgs::single(BIG_USER, PASSWORD),
                    message: 1,
                    count: profile.retr_count,
                }))
                .unwrap();
            figs.add(&format!("retr.{}.mib_s", p.name), r.median_mib_per_sec());
            println!(
                "  retr    {:<11} {:>6.0} MiB/s",
                p.name,
                r.median_mib_per_sec()
            );
        }
        for p in rotated(&session_paths, round).filter(|_| runs("latency")) {
            let r = rt
                .block_on(latency::run(&LatencyArgs {
                    target: p.target.clone(),
                    accounts: AccountArgs::single(SMALL_USER, PASSWORD),
                    count: profile.latency_count,
                    message: 1,
                    warmup: 50,
                }))
                .unwrap();
            let name = p.name;
            figs.add(&format!("latency.{name}.noop_p50_us"), us(r.noop.p50));
            figs.add(&format!("latency.{name}.noop_p99_us"), us(r.noop.p99));
            figs.add(&format!("latency.{name}.list_p50_us"), us(r.list.p50));
            figs.add(&format!("latency.{name}.retr_p50_us"), us(r.retr.p50));
            figs.add(&format!("latency.{name}.retr_p99_us"), us(r.retr.p99));
            println!(
                "  latency {name:<11} NOOP p50 {:>5.0} µs  LIST p50 {:>5.0} µs  RETR {} B p50 {:>5.0} µs",
                us(r.noop.p50),
                us(r.list.p50),
                r.octets,
                us(r.retr.p50)
            );
        }
        // Memory per idle session on a fresh process each: popgate with plaintext and TLS clients, HAProxy.
        let mut holds = vec![
            ("plain", Variant::Pool, TlsMode::None),
            ("tls", Variant::Pool, TlsMode::Implicit),
        ];
        if setup.haproxy {
            holds.push(("haproxy", Variant::Haproxy, TlsMode::None));
        }
        if !runs("memory") {
            holds.clear();
        }
        for (name, variant, tls) in holds {
            hold_round(&rt, &setup, profile, &mut figs, name, variant, tls, round);
        }
    }

    for (_, p) in procs {
        p.stop();
    }
    println!();
    print!("{}", figs.table(profile, setup.haproxy));
    println!("\n(total {:.0} s)", began.elapsed().as_secs_f64());
}

/// `--serve`: the same store and proxies, left running for `perf`, `strace` or `popgate-bench` by hand.
fn serve_for(store: &DovecotStore, procs: &[(Variant, Proxy)], secs: u64) {
    println!(
        "store: plain {} implicit TLS {} (users {USER_PATTERN} for 1..={USERS}, {BIG_USER}, {SMALL_USER}; password {PASSWORD})",
        store.pop3_addr(),
        store.pop3s_addr()
    );
    for (v, p) in procs {
        println!(
            "{v:?}: pid {} plain {} implicit TLS {} admin {:?} log {}",
            p.pid(),
            p.plain,
            p.pop3s,
            p.admin,
            p.log.display()
        );
    }
    println!("serving for {secs} s (Ctrl-C or SIGTERM stops everything sooner)");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(secs)) => {}
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    });
}

/// Opens the profile's idle sessions on a fresh proxy process and records its RSS growth per session.
#[allow(clippy::too_many_arguments)]
fn hold_round(
    rt: &tokio::runtime::Runtime,
    setup: &Setup<'_>,
    profile: Profile,
    figs: &mut Figures,
    name: &str,
    variant: Variant,
    tls: TlsMode,
    round: usize,
) {
    let store_procs = dovecot::instance_processes(setup.store.instance_name()).len();
    let fresh = Proxy::start(setup, variant, &format!("hold-{name}-{round}"));
    let target = match tls {
        TlsMode::None => TargetArgs::plain(fresh.plain),
        TlsMode::Stls | TlsMode::Implicit => TargetArgs::insecure_tls(fresh.pop3s, tls),
    };
    // Warm the process on the same path first: runtime threads, TLS config, allocator arenas.
    let r = rt
        .block_on(logins::run(&LoginsArgs {
            max_sessions: Some(200),
            ..logins_args(target.clone(), 5.0)
        }))
        .unwrap();
    check_logins(&r, "hold warm-up");
    std::thread::sleep(Duration::from_millis(500));
    let before = rss_kib(fresh.pid());
    let args = HoldArgs {
        target,
        accounts: AccountArgs::pattern(USER_PATTERN, PASSWORD, USERS),
        sessions: profile.hold_sessions,
        seconds: profile.hold_secs,
        noop_every: 30.0,
        open_concurrency: CONCURRENCY,
    };
    let (report, during, opened) = rt.block_on(async {
        let held = hold::open(&args).await.unwrap();
        let opened = held.opened();
        tokio::time::sleep(Duration::from_secs(1)).await;
        let during = rss_kib(fresh.pid());
        let report = held
            .keep(
                Duration::from_secs_f64(args.seconds),
                Duration::from_secs(30),
            )
            .await;
        (report, during, opened)
    });
    assert!(
        report.held == report.requested,
        "hold {name}: {} of {} held: {:?}",
        report.held,
        report.requested,
        report.error_samples
    );
    let per_session = (during as f64 - before as f64) / opened as f64;
    figs.add(&format!("memory.{name}.kib_per_session"), per_session);
    figs.add(&format!("memory.{name}.held"), report.held as f64);
    println!(
        "  hold    {name:<11} {} sessions held {:.0} s: RSS {before} → {during} KiB, {per_session:.2} KiB/session ({} NOOPs)",
        report.held,
        report.hold_time.as_secs_f64(),
        report.noops
    );
    fresh.stop();
    settle_store(setup.store, store_procs);
}

/// Waits until the store is back to `procs` processes: Dovecot takes seconds to end the `pop3` processes of
/// thousands of held sessions, and a login run that starts meanwhile measures that instead of its path (the
/// first path of the next round ran at a third of its rate before this wait).
fn settle_store(store: &DovecotStore, procs: usize) {
    let began = Instant::now();
    let mut left = dovecot::instance_processes(store.instance_name()).len();
    while left > procs && began.elapsed() < Duration::from_secs(120) {
        std::thread::sleep(Duration::from_millis(50));
        left = dovecot::instance_processes(store.instance_name()).len();
    }
    println!(
        "  settle  store back to {left} processes (had {procs} before the hold) in {:.1} s",
        began.elapsed().as_secs_f64()
    );
}

/// The paths starting at `round` (mod their number).
fn rotated<'p, 'a>(paths: &'p [Via<'a>], round: usize) -> impl Iterator<Item = &'p Via<'a>> {
    (0..paths.len()).map(move |k| &paths[(k + round) % paths.len()])
}

fn logins_args(target: TargetArgs, secs: f64) -> LoginsArgs {
    LoginsArgs {
        target,
        accounts: AccountArgs::pattern(USER_PATTERN, PASSWORD, USERS),
        concurrency: CONCURRENCY,
        duration: secs,
        max_sessions: None,
        max_errors: 10,
    }
}

fn check_logins(r: &LoginsReport, what: &str) {
    assert!(
        r.errors == 0 && r.sessions > 0,
        "logins {what}: {} errors, {} sessions: {:?}",
        r.errors,
        r.sessions,
        r.error_samples
    );
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

// === the store ===

fn start_store(profile: Profile) -> DovecotStore {
    let small = message(SMALL_OCTETS, "small");
    let big = message(BIG_MIB << 20, "big");
    let mut opts = StoreOptions::new()
        .tls(TlsPem::self_signed(&["localhost", "127.0.0.1"]))
        .user(BIG_USER, PASSWORD, [big])
        .user(SMALL_USER, PASSWORD, [small.clone()]);
    for n in 1..=USERS {
        opts = opts.user(
            &USER_PATTERN.replace("{n}", &n.to_string()),
            PASSWORD,
            [small.clone(), small.clone()],
        );
    }
    // Capacity for thousands of sessions: long-lived login processes,
    // a small default process limit (Dovecot sums the limits into RLIMIT_NPROC), pop3 processes reused.
    let sessions = profile.hold_sessions + 2 * CONCURRENCY + 200;
    let opts = opts.extra_config(&format!(
        "default_process_limit = 100\n\
         default_client_limit = {clients}\n\
         default_vsz_limit = 1G\n\
         mail_max_userip_connections = {sessions}\n\
         service pop3-login {{\n  service_count = 0\n  process_min_avail = 2\n  client_limit = 8000\n}}\n\
         service pop3 {{\n  process_limit = {sessions}\n  service_count = 1000\n  idle_kill = 3 secs\n}}\n\
         service anvil {{\n  client_limit = {clients}\n}}\n\
         service auth {{\n  client_limit = {clients}\n}}",
        clients = sessions + 8000,
    ));
    let store = DovecotStore::start(opts);
    println!(
        "Dovecot store {} up in {:.1} s",
        store.instance_name(),
        store.startup_time().as_secs_f64()
    );
    store
}

/// A message of exactly `octets` octets with CRLF line ends (its LIST size is `octets`).
fn message(octets: usize, subject: &str) -> Vec<u8> {
    let mut m =
        format!("From: bench@example.com\r\nTo: you@example.com\r\nSubject: {subject}\r\n\r\n")
            .into_bytes();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuv\r\n";
    while m.len() + line.len() + 2 <= octets {
        m.extend_from_slice(line);
    }
    m.resize(octets - 2, b'x');
    m.extend_from_slice(b"\r\n");
    m
}

// === proxy processes ===

impl Proxy {
    fn start(setup: &Setup<'_>, variant: Variant, label: &str) -> Self {
        let (plain, pop3s, stls) = (free_port(), free_port(), free_port());
        let mut admin = None;
        // Logs in a directory of their own: popgate watches its config's directory, and each log line
        // written beside the config would wake its watcher.
        let logs = setup.dir.join("logs");
        fs::create_dir_all(&logs).unwrap();
        let log = logs.join(format!("{label}.log"));
        let config = setup.dir.join(format!("{label}.cfg"));
        let store = setup.store;
        let mut command = if variant == Variant::Haproxy {
            // TCP mode, as the peer table measured it; maxconn within the fd limit (2 per session).
            fs::write(
                &config,
                format!(
                    "# {label}: written by benches/load.rs\nglobal\n    maxconn 9000\ndefaults\n    mode tcp\n    \
                     timeout connect 5s\n    timeout client 10m\n    timeout server 10m\nfrontend pop3\n    bind {plain}\n    \
                     default_backend store\nbackend store\n    server store {}\n",
                    store.pop3_addr()
                ),
            )
            .unwrap();
            let mut c = Command::new(HAPROXY);
            c.arg("-db").arg("-f").arg(&config);
            c
        } else {
            let plain_store = format!("\"{}\"", store.pop3_addr());
            let delayed_store = setup
                .delayed
                .map(|a| format!("\"{a}\""))
                .unwrap_or_default();
            let tls_store = format!("{{address: \"{}\", tls: implicit}}", store.pop3s_addr());
            let placement = setup
                .directories
                .map(|d| d.placement(variant))
                .unwrap_or_default();
            let (backend, extra) = match variant {
                Variant::Pool | Variant::Limits | Variant::Shared => (plain_store, ""),
                Variant::DelayPool => (delayed_store, ""),
                Variant::DelayNoPool => (delayed_store, "\n    pool: {min_idle: 0}"),
                Variant::DelayEarly => (delayed_store, "\n    pool: {xclient_at_user: true}"),
                Variant::Rsa => (plain_store, ""),
                Variant::NoPool => (plain_store, "\n    pool: {min_idle: 0}"),
                Variant::TlsPool => (tls_store, "\n    backend_tls: {insecure_skip_verify: true}"),
                Variant::TlsNoPool => (
                    tls_store,
                    "\n    pool: {min_idle: 0}\n    backend_tls: {insecure_skip_verify: true}",
                ),
                _ => (plain_store, placement.as_str()),
            };
            fs::write(
                &config,
                format!(
                    "# {label}: written by benches/load.rs\nlisteners:\n  - name: pop3\n    bind: \"{plain}\"\n    tls: none\n  \
                     - name: pop3s\n    bind: \"{pop3s}\"\n    tls: implicit\n  - name: stls\n    bind: \"{stls}\"\n    tls: starttls\n\
                     tenants:\n  bench:\n    domains: [example.com]\n    \
                     backends: [{backend}]\n    plaintext_login: allow{extra}\n"
                ),
            )
            .unwrap();
            let admin_addr = free_port();
            admin = Some(admin_addr);
            let yaml = fs::read_to_string(&config).unwrap();
            fs::write(&config, format!("{yaml}admin:\n  bind: \"{admin_addr}\"\n")).unwrap();
            let extra = match variant {
                Variant::Limits => LIMITS.to_owned(),
                Variant::Shared => {
                    let key = setup.dir.join("cluster.key");
                    fs::write(&key, "bench-key-of-more-than-16-bytes\n").unwrap();
                    format!(
                        "{LIMITS}cluster:\n  servers: [\"{}\"]\n  key_secret_file: {}\n",
                        setup.redis.addr(),
                        key.display()
                    )
                }
                _ => String::new(),
            };
            let extra = match variant {
                Variant::Rsa => format!("{extra}{}", rsa_certificate(setup.dir)),
                _ => extra,
            };
            let yaml = fs::read_to_string(&config).unwrap();
            fs::write(&config, format!("{yaml}{extra}")).unwrap();
            let mut c = Command::new(setup.popgate);
            c.arg("run").arg("-c").arg(&config);
            // Production logging (one line per login and per session end) unless the caller says otherwise.
            c.env(
                "POPGATE_LOG",
                std::env::var("POPGATE_LOG").unwrap_or_else(|_| "info".into()),
            );
            c
        };
        let child = command
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(fs::File::options().append(true).open(&log).unwrap())
            .spawn()
            .unwrap();
        let p = Proxy {
            child,
            plain,
            pop3s,
            stls,
            admin,
            log,
        };
        p.wait_ready();
        p
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(s) = TcpStream::connect(self.plain) {
                s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
                let mut line = String::new();
                if BufReader::new(&s).read_line(&mut line).is_ok() && line.starts_with("+OK") {
                    let _ = (&s).write_all(b"QUIT\r\n");
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not greet on {}; log:\n{}",
                self.plain,
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the process (also on a panic, so a failed run leaves nothing running).
    fn stop(self) {
        drop(self);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Every series of the family `name` in popgate's metrics now: (the series' labels, its value).
fn series(admin: SocketAddr, name: &str) -> Vec<(String, f64)> {
    let mut s = TcpStream::connect(admin).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut text = String::new();
    std::io::Read::read_to_string(&mut s, &mut text).unwrap();
    let prefix = format!("{name}{{");
    text.lines()
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (labels, value) = rest.rsplit_once(' ')?;
            Some((labels.to_owned(), value.parse().ok()?))
        })
        .collect()
}

/// popgate's pool checkouts so far, from its metrics: (hits, misses).
fn pool_checkouts(admin: SocketAddr) -> (f64, f64) {
    let (mut hits, mut misses) = (0.0, 0.0);
    for (labels, value) in series(admin, "popgate_store_pool_checkouts_total") {
        if labels.contains("result=\"hit\"") {
            hits += value;
        } else if labels.contains("result=\"miss\"") {
            misses += value;
        }
    }
    (hits, misses)
}

/// The shared state's round trips so far, from popgate's metrics: (awaited by a login, lease-release
/// calls sent after sessions ended).
fn cluster_round_trips(admin: SocketAddr) -> (f64, f64) {
    let (mut awaited, mut released) = (0.0, 0.0);
    for (labels, value) in series(admin, "popgate_cluster_round_trip_seconds_count") {
        if labels.contains("op=\"release\"") {
            released += value;
        } else if ["before_login", "after_login", "failed"]
            .iter()
            .any(|op| labels.contains(&format!("op=\"{op}\"")))
        {
            awaited += value;
        }
    }
    (awaited, released)
}

/// A self-signed RSA-2048 certificate for localhost (rcgen on ring cannot make RSA keys; `openssl` is on
/// every Debian machine with ca-certificates, and scripts/bench installs it otherwise), as popgate's
/// top-level `tls:` block.
fn rsa_certificate(dir: &Path) -> String {
    let (cert, key) = (dir.join("rsa.crt"), dir.join("rsa.key"));
    if !cert.exists() {
        let status = Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            ])
            .args([
                "-subj",
                "/CN=localhost",
                "-addext",
                "subjectAltName=DNS:localhost",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl (Debian's openssl package) makes the RSA certificate");
        assert!(status.success(), "openssl req failed");
    }
    format!(
        "tls:\n  certificate: {}\n  key: {}\n",
        cert.display(),
        key.display()
    )
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap()
}

/// VmRSS of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// utime + stime of a process (all threads), seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name is in parentheses and may contain spaces: count fields after it.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 after "pid (comm) ".
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks()
}

/// Jiffies of the machine's CPUs from the `cpu` line of /proc/stat: busy (user, nice, system, irq,
/// softirq, steal) and idle (idle, iowait).
struct MachineCpu {
    busy: u64,
    idle: u64,
}

/// CPU the machine spent between two readings.
struct MachineCpuUse {
    busy_secs: f64,
    idle_pct: f64,
}

impl MachineCpu {
    fn now() -> Self {
        let stat = fs::read_to_string("/proc/stat").unwrap();
        let line = stat.lines().find(|l| l.starts_with("cpu ")).unwrap();
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|v| v.parse().unwrap())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is already inside user).
        Self {
            busy: f[0] + f[1] + f[2] + f[5] + f[6] + f[7],
            idle: f[3] + f[4],
        }
    }

    fn since(&self, before: &Self) -> MachineCpuUse {
        let busy = self.busy - before.busy;
        let idle = self.idle - before.idle;
        MachineCpuUse {
            busy_secs: busy as f64 / clock_ticks(),
            idle_pct: 100.0 * idle as f64 / (busy + idle).max(1) as f64,
        }
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

// === the table ===

/// Three significant figures, or whole numbers when larger.
fn figure(v: f64) -> String {
    match v.abs() {
        a if a < 10.0 => format!("{v:.2}"),
        a if a < 100.0 => format!("{v:.1}"),
        _ => format!("{v:.0}"),
    }
}

/// A figure, or a dash when it was not measured.
fn shown(v: Option<f64>) -> String {
    v.map_or_else(|| "—".to_owned(), figure)
}

/// `a ÷ b` as `1.23×`, or a dash when either was not measured.
fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{:.2}×", a / b),
        _ => "—".into(),
    }
}

impl Figures {
    fn add(&mut self, key: &str, value: f64) {
        match self.0.iter_mut().find(|(k, _)| k == key) {
            Some((_, v)) => v.push(value),
            None => self.0.push((key.to_owned(), vec![value])),
        }
    }

    fn median(&self, key: &str) -> Option<f64> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| median(v))
    }

    /// Shared state on against off, the same limits in force (`LIMITS`), 50 concurrent plaintext logins.
    fn shared_table(&self) -> String {
        let mut out = String::from(
            "\n## Shared state (`cluster:` on a Redis on loopback) against off, same limits\n\n\
             | figure | off | on | on ÷ off | target |\n|---|---|---|---|---|\n",
        );
        for (label, key, target) in [
            ("logins/s, 50 concurrent", "per_s", "≥ 0.90×"),
            ("popgate CPU s per 1,000 logins", "cpu_s_per_1000", ""),
            ("PASS round trip p50 µs", "pass_p50_us", ""),
            ("whole session p50 µs", "session_p50_us", ""),
        ] {
            let off = self.median(&format!("logins.limits.{key}"));
            let on = self.median(&format!("logins.shared.{key}"));
            let ratio = ratio(on, off);
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {ratio} | {target} |",
                shown(off),
                shown(on)
            );
        }
        for (label, key, target) in [
            (
                "Redis round trips awaited per successful login",
                "trips_awaited",
                "≤ 2",
            ),
            (
                "lease-release round trips per login (batched, not awaited)",
                "trips_released",
                "",
            ),
            (
                "Redis server CPU s per 1,000 logins",
                "redis_cpu_s_per_1000",
                "",
            ),
        ] {
            let _ = writeln!(
                out,
                "| {label} | — | {} | — | {target} |",
                shown(self.median(&format!("logins.shared.{key}")))
            );
        }
        out
    }

    /// A store 0.5 ms away: popgate with and without its pool against a direct connection through the same
    /// delay.
    fn delay_table(&self) -> String {
        if self.median("logins.delay.direct.per_s").is_none() {
            return String::new();
        }
        let mut out = String::from(
            "\n## A store 0.5 ms away (user-space delay, each chunk held 0.5 ms per direction), same run\n\n\
             | path | logins/s | ÷ direct | PASS p50 µs | ÷ direct | session p50 µs | ÷ direct |\n|---|---|---|---|---|---|---|\n",
        );
        // 50 concurrent clients (`logins.`), then one at a time (`logins1.`).
        for (kind, clients) in [("logins", "50 concurrent"), ("logins1", "1 client")] {
            for name in ["delay.direct", "delay.pool", "delay.nopool"] {
                self.path_row(&mut out, kind, name, "delay.direct", clients);
            }
        }
        if self.median("logins1.far.direct.per_s").is_some() {
            out.push_str(
                "\nThe client 2 ms away (one at a time), to the store directly or to popgate with the store 0.5 ms \
                 behind it (`far.early`: `pool.xclient_at_user`):\n\n| path | logins/s | ÷ direct | PASS p50 µs | ÷ direct | session p50 µs | ÷ direct |\n\
                 |---|---|---|---|---|---|---|\n",
            );
            for name in ["far.direct", "far.pool", "far.early"] {
                self.path_row(&mut out, "logins1", name, "far.direct", "1 client");
            }
        }
        out
    }

    /// One row of a login table: logins/s, PASS p50 and session p50 of `name`, each with its ratio to `base`.
    fn path_row(&self, out: &mut String, kind: &str, name: &str, base: &str, clients: &str) {
        let get = |n: &str, k: &str| self.median(&format!("{kind}.{n}.{k}"));
        let _ = writeln!(
            out,
            "| {name}, {clients} | {} | {} | {} | {} | {} | {} |",
            shown(get(name, "per_s")),
            ratio(get(name, "per_s"), get(base, "per_s")),
            shown(get(name, "pass_p50_us")),
            ratio(get(name, "pass_p50_us"), get(base, "pass_p50_us")),
            shown(get(name, "session_p50_us")),
            ratio(get(name, "session_p50_us"), get(base, "session_p50_us")),
        );
    }

    /// Client TLS: full handshakes against Dovecot terminating TLS itself, and resumed sessions against
    /// full ones, each on implicit TLS and STARTTLS, 50 concurrent logins.
    fn client_tls_table(&self) -> String {
        if self.median("logins.ctls.popgate.implicit.per_s").is_none() {
            return String::new();
        }
        let mut out = String::from(
            "\n## Client TLS: full and resumed handshakes, same run\n\n\
             | path | logins/s | ÷ direct (full) | ÷ popgate full | resumed % | PASS p50 µs | CPU s per 1,000 logins |\n\
             |---|---|---|---|---|---|---|\n",
        );
        for mode in ["implicit", "stls"] {
            let direct = self.median(&format!("logins.ctls.direct.{mode}.per_s"));
            // popgate with its ECDSA P-256 certificate, then (implicit TLS only) with RSA-2048.
            let mut names = vec![
                format!("ctls.direct.{mode}"),
                format!("ctls.popgate.{mode}"),
                format!("ctls.popgate.{mode}.resumed"),
            ];
            if mode == "implicit" {
                names.extend([
                    "ctls.rsa.implicit".to_owned(),
                    "ctls.rsa.implicit.resumed".to_owned(),
                ]);
            }
            for name in names {
                let full = self.median(&format!(
                    "logins.{}.per_s",
                    name.trim_end_matches(".resumed")
                ));
                let rate = self.median(&format!("logins.{name}.per_s"));
                let _ = writeln!(
                    out,
                    "| {name} | {} | {} | {} | {} | {} | {} |",
                    shown(rate),
                    ratio(rate, direct),
                    if !name.starts_with("ctls.direct") {
                        ratio(rate, full)
                    } else {
                        "—".into()
                    },
                    shown(self.median(&format!("logins.{name}.resumed_pct"))),
                    shown(self.median(&format!("logins.{name}.pass_p50_us"))),
                    shown(self.median(&format!("logins.{name}.cpu_s_per_1000"))),
                );
            }
        }
        out
    }

    /// Each placement source against domain-only routing (the pool row) in the same run, 50 concurrent
    /// plaintext logins over 100 mailboxes.
    fn placement_table(&self) -> String {
        if self.median("logins.place.map.per_s").is_none() {
            return String::new();
        }
        let mut out = String::from(
            "\n## Placement lookups against domain-only routing, same run\n\n\
             | source | logins/s | ÷ domain-only | PASS p50 µs | ÷ domain-only | CPU s per 1,000 logins |\n\
             |---|---|---|---|---|---|\n",
        );
        let base_rate = self.median("logins.pool.per_s");
        let base_pass = self.median("logins.pool.pass_p50_us");
        for name in std::iter::once("pool").chain(PLACED.iter().map(|(n, _)| *n)) {
            let rate = self.median(&format!("logins.{name}.per_s"));
            let pass = self.median(&format!("logins.{name}.pass_p50_us"));
            let cpu = self.median(&format!("logins.{name}.cpu_s_per_1000"));
            let label = if name == "pool" { "domain only" } else { name };
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {} | {} | {} |",
                shown(rate),
                ratio(rate, base_rate),
                shown(pass),
                ratio(pass, base_pass),
                shown(cpu)
            );
        }
        out
    }

    /// The markdown table of medians and ratios, then every round's values.
    fn table(&self, profile: Profile, haproxy: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "## Figures (medians of {} rounds, profile {})\n",
            profile.rounds, profile.name
        );
        let _ = writeln!(
            out,
            "| figure | direct | popgate | popgate ÷ direct | HAProxy ÷ direct | target |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|");
        let mut row = |label: &str,
                       direct: Option<&str>,
                       gate: &str,
                       reference: Option<&str>,
                       target: &str| {
            let d = direct.and_then(|k| self.median(k));
            let g = self.median(gate);
            let h = reference.filter(|_| haproxy).and_then(|k| self.median(k));
            let to_direct = |x: Option<f64>| match (x, d) {
                (Some(x), Some(d)) => format!("{:.2}×", x / d),
                (Some(x), None) => figure(x),
                _ => "—".into(),
            };
            let _ = writeln!(
                out,
                "| {label} | {} | {} | {} | {} | {target} |",
                shown(d),
                shown(g),
                if d.is_some() {
                    to_direct(g)
                } else {
                    "—".into()
                },
                to_direct(h)
            );
        };
        let d = Some("logins.direct.per_s");
        row(
            "logins/s, 50 concurrent, pool on",
            d,
            "logins.pool.per_s",
            Some("logins.haproxy.per_s"),
            "≥ 1.0×",
        );
        row(
            "logins/s, 50 concurrent, pool off",
            d,
            "logins.nopool.per_s",
            Some("logins.haproxy.per_s"),
            "≥ 0.95×",
        );
        row(
            "pool hits, % of pool-on logins",
            None,
            "logins.pool.pool_hit_pct",
            None,
            "",
        );
        let d = Some("logins.direct.pass_p50_us");
        row(
            "PASS round trip p50 µs, pool on",
            d,
            "logins.pool.pass_p50_us",
            Some("logins.haproxy.pass_p50_us"),
            "",
        );
        row(
            "PASS round trip p50 µs, pool off",
            d,
            "logins.nopool.pass_p50_us",
            None,
            "",
        );
        let d = Some("logins.direct.session_p50_us");
        row(
            "whole session p50 µs, pool on",
            d,
            "logins.pool.session_p50_us",
            Some("logins.haproxy.session_p50_us"),
            "",
        );
        row(
            "whole session p50 µs, pool off",
            d,
            "logins.nopool.session_p50_us",
            None,
            "",
        );
        let d = Some("logins1.direct.per_s");
        row(
            "logins/s, 1 client at a time, pool on",
            d,
            "logins1.pool.per_s",
            Some("logins1.haproxy.per_s"),
            "",
        );
        row(
            "logins/s, 1 client at a time, pool off",
            d,
            "logins1.nopool.per_s",
            Some("logins1.haproxy.per_s"),
            "",
        );
        let d = Some("logins1.direct.pass_p50_us");
        row(
            "PASS round trip p50 µs, 1 client, pool on",
            d,
            "logins1.pool.pass_p50_us",
            Some("logins1.haproxy.pass_p50_us"),
            "",
        );
        row(
            "PASS round trip p50 µs, 1 client, pool off",
            d,
            "logins1.nopool.pass_p50_us",
            None,
            "",
        );
        let d = Some("logins.tls.direct.per_s");
        row(
            "logins/s, store over TLS, pool on ¹",
            d,
            "logins.tls.pool.per_s",
            None,
            "",
        );
        row(
            "logins/s, store over TLS, pool off ¹",
            d,
            "logins.tls.nopool.per_s",
            None,
            "",
        );
        row(
            "pool hits, % of pool-on logins, store over TLS",
            None,
            "logins.tls.pool.pool_hit_pct",
            None,
            "",
        );
        let d = Some("logins.tls.direct.pass_p50_us");
        row(
            "PASS p50 µs, store over TLS, pool on ¹",
            d,
            "logins.tls.pool.pass_p50_us",
            None,
            "",
        );
        row(
            "PASS p50 µs, store over TLS, pool off ¹",
            d,
            "logins.tls.nopool.pass_p50_us",
            None,
            "",
        );
        row(
            &format!("RETR {BIG_MIB} MiB, MiB/s"),
            Some("retr.direct.mib_s"),
            "retr.pool.mib_s",
            Some("retr.haproxy.mib_s"),
            "≥ 1.0×",
        );
        row(
            "NOOP p50 µs",
            Some("latency.direct.noop_p50_us"),
            "latency.pool.noop_p50_us",
            Some("latency.haproxy.noop_p50_us"),
            "≤ 1.2×",
        );
        row(
            "NOOP p99 µs",
            Some("latency.direct.noop_p99_us"),
            "latency.pool.noop_p99_us",
            Some("latency.haproxy.noop_p99_us"),
            "",
        );
        row(
            "LIST 1 p50 µs",
            Some("latency.direct.list_p50_us"),
            "latency.pool.list_p50_us",
            Some("latency.haproxy.list_p50_us"),
            "",
        );
        row(
            "RETR 5.6 KiB p50 µs",
            Some("latency.direct.retr_p50_us"),
            "latency.pool.retr_p50_us",
            Some("latency.haproxy.retr_p50_us"),
            "≤ 1.2×",
        );
        row(
            "RETR 5.6 KiB p99 µs",
            Some("latency.direct.retr_p99_us"),
            "latency.pool.retr_p99_us",
            Some("latency.haproxy.retr_p99_us"),
            "",
        );
        let held = profile.hold_sessions;
        row(
            &format!("memory per idle plaintext session, KiB ({held} held) ²"),
            None,
            "memory.plain.kib_per_session",
            Some("memory.haproxy.kib_per_session"),
            "≤ 3 KiB",
        );
        row(
            &format!("memory per idle TLS session, KiB ({held} held) ²"),
            None,
            "memory.tls.kib_per_session",
            None,
            "≤ 40 KiB",
        );
        row(
            "CPU s per 1,000 logins, pool on ³",
            None,
            "logins.pool.cpu_s_per_1000",
            Some("logins.haproxy.cpu_s_per_1000"),
            "report",
        );
        row(
            "CPU s per 1,000 logins, pool off ³",
            None,
            "logins.nopool.cpu_s_per_1000",
            None,
            "report",
        );
        row(
            "CPU s per 1,000 logins, store over TLS, pool on ³",
            None,
            "logins.tls.pool.cpu_s_per_1000",
            None,
            "report",
        );
        row(
            "CPU s per 1,000 logins, store over TLS, pool off ³",
            None,
            "logins.tls.nopool.cpu_s_per_1000",
            None,
            "report",
        );
        let d = Some("logins.direct.machine_ms_per_login");
        row(
            "machine CPU ms per login, all processes, pool on ⁴",
            d,
            "logins.pool.machine_ms_per_login",
            Some("logins.haproxy.machine_ms_per_login"),
            "",
        );
        row(
            "machine CPU ms per login, all processes, pool off ⁴",
            d,
            "logins.nopool.machine_ms_per_login",
            None,
            "",
        );
        let d = Some("logins.direct.loadgen_ms_per_login");
        row(
            "load tool's CPU ms per login ⁴",
            d,
            "logins.pool.loadgen_ms_per_login",
            Some("logins.haproxy.loadgen_ms_per_login"),
            "",
        );
        let _ = writeln!(
            out,
            "\n¹ direct: the client speaks POP3S to the store; through popgate: plain client, popgate → store over TLS.\n\
             ² (proxy RSS with the sessions open − RSS before) ÷ sessions, on a fresh process; the HAProxy column is \
             HAProxy's own figure, not a ratio.\n\
             ³ the proxy's utime + stime during the run ÷ thousands of sessions; the HAProxy column is HAProxy's own figure.\n\
             ⁴ from /proc/stat over the login run, all CPUs: busy time (user, system, irq, softirq, steal) ÷ \
             logins, and the idle share; the load tool is this process (one thread)."
        );
        let idle: Vec<String> = ["direct", "pool", "nopool", "haproxy"]
            .iter()
            .filter_map(|p| {
                self.median(&format!("logins.{p}.idle_pct"))
                    .map(|v| format!("{p} {v:.1} %"))
            })
            .collect();
        if !idle.is_empty() {
            let _ = writeln!(
                out,
                "\nIdle share of the machine's CPUs during the plaintext login runs (medians): {}.",
                idle.join(", ")
            );
        }
        out.push_str(&self.shared_table());
        out.push_str(&self.placement_table());
        out.push_str(&self.client_tls_table());
        out.push_str(&self.delay_table());
        let _ = writeln!(out, "\n## Every round\n");
        for (k, values) in &self.0 {
            let each: Vec<String> = values.iter().map(|v| figure(*v)).collect();
            let _ = writeln!(
                out,
                "- {k}: {} (median {})",
                each.join(" / "),
                figure(median(values))
            );
        }
        out
    }
}
