//! Scale: thousands of logged-in idle sessions held through popgate at once (issue #6: 9,000).
//!
//! The in-repo maildrop store and the load tool run in this process; popgate runs as its own release
//! process, so its file descriptors (two per relayed session) and its memory are its own. For a plain
//! and an implicit-TLS client leg in turn: open the sessions (each logged in to a mailbox of its own),
//! hold them with a NOOP every 30 s, read popgate's VmRSS and descriptors, QUIT them all, and check
//! that popgate's descriptors come back. Memory per session = (VmRSS holding − VmRSS before) ÷ sessions.
//!
//! Run by `scripts/scale [SESSIONS] [SECONDS]`, which builds popgate in release and raises the fd limit.
//! Environment: POPGATE_BIN (default target/release/popgate), SCALE_SESSIONS (9000), SCALE_SECONDS (20).
//! Exits 1 when any session failed to open or to stay open.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark stops loudly where it stands

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use maildrop::{Maildrop, Settings};
use popload::hold::{self, HoldArgs};
use popload::{AccountArgs, TargetArgs, TlsMode};

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return; // `cargo bench -- --list` asks for benchmark names: this binary has none to list.
    }
    let sessions: usize = env_or("SCALE_SESSIONS", 9000);
    let seconds: f64 = env_or("SCALE_SECONDS", 20.0);
    let popgate_bin = std::env::var_os("POPGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/release/popgate"));
    assert!(
        popgate_bin.exists(),
        "{} not found: build it with `cargo build --release` (scripts/scale does)",
        popgate_bin.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // One mailbox per session (the store locks a mailbox while a session holds it).
    let store = Maildrop::new(Settings::default());
    let message = b"Subject: scale\r\n\r\nhello\r\n".to_vec();
    for n in 1..=sessions {
        store.add_mailbox(&format!("u{n}@example.com"), "pw", vec![message.clone()]);
    }
    let server = rt
        .block_on(store.bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0))))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let (plain, pop3s) = (free_port(), free_port());
    let config = dir.path().join("scale.yaml");
    fs::write(
        &config,
        format!(
            "listeners:\n  - {{name: pop3, bind: \"{plain}\", tls: none}}\n  - {{name: pop3s, bind: \"{pop3s}\", tls: implicit}}\n\
             limits:\n  max_connections: {}\n\
             tenants:\n  scale:\n    domains: [example.com]\n    backends: [\"{}\"]\n    plaintext_login: allow\n",
            sessions + 100,
            server.local_addr()
        ),
    )
    .unwrap();
    println!(
        "fd soft limit {}, {sessions} sessions per leg, held {seconds} s; a fresh popgate per leg",
        fd_limit()
    );

    let mut failures = 0;
    let mut panics = 0;
    let mut rows = Vec::new();
    for (label, addr, tls) in [
        ("plaintext", plain, TlsMode::None),
        ("implicit TLS", pop3s, TlsMode::Implicit),
    ] {
        // A fresh process per leg, so one leg's freed memory (kept by the allocator) is not counted as
        // the next leg's.
        let log = dir.path().join(format!("popgate-{}.log", rows.len()));
        let mut popgate = PopgateProcess::start(&popgate_bin, &config, &log, plain);
        let pid = popgate.child.id();
        let (rss_before, fds_before) = (rss_kib(pid), fd_count(pid));
        let args = HoldArgs {
            target: if tls == TlsMode::None {
                TargetArgs::plain(addr)
            } else {
                TargetArgs::insecure_tls(addr, tls)
            },
            accounts: AccountArgs::pattern("u{n}@example.com", "pw", sessions),
            sessions,
            seconds,
            noop_every: 30.0,
            open_concurrency: 100,
        };
        let held = rt.block_on(hold::open(&args)).unwrap();
        let opened = held.opened();
        let (rss_holding, fds_holding) = (rss_kib(pid), fd_count(pid));
        let report =
            rt.block_on(held.keep(Duration::from_secs_f64(seconds), Duration::from_secs(30)));
        // Sessions end with the clients' QUIT; popgate's side closes right after. Wait for it.
        let settled = Instant::now();
        while fd_count(pid) > fds_before && settled.elapsed() < Duration::from_secs(30) {
            std::thread::sleep(Duration::from_millis(100));
        }
        let (rss_after, fds_after) = (rss_kib(pid), fd_count(pid));
        let per_session = (rss_holding.saturating_sub(rss_before)) as f64 / opened.max(1) as f64;
        if opened < sessions || report.held < opened || fds_after > fds_before {
            failures += 1;
        }
        println!(
            "{label} (pid {pid}): opened {opened}/{sessions} in {:.1} s, held {} for {seconds} s ({} NOOPs), errors {:?}",
            report.open_time.as_secs_f64(),
            report.held,
            report.noops,
            report.error_samples
        );
        println!(
            "  popgate VmRSS {rss_before} KiB before, {rss_holding} KiB holding, {rss_after} KiB after; \
             fds {fds_before} → {fds_holding} → {fds_after}"
        );
        rows.push((label, opened, report.held, per_session, fds_holding));
        popgate.stop();
        panics += fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("panicked")
            .count();
    }
    println!();
    println!(
        "| client leg | sessions opened | held | popgate KiB per session | popgate fds holding |"
    );
    println!("|---|---|---|---|---|");
    for (label, opened, held, per, fds) in rows {
        println!("| {label} | {opened} | {held} | {per:.2} | {fds} |");
    }
    if panics > 0 || failures > 0 {
        eprintln!("scale: FAILED ({failures} legs short, {panics} panics)");
        std::process::exit(1);
    }
    println!("scale: ok");
}

struct PopgateProcess {
    child: Child,
}

impl PopgateProcess {
    fn start(bin: &PathBuf, config: &PathBuf, log: &PathBuf, plain: SocketAddr) -> Self {
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
        let started = Instant::now();
        loop {
            if let Ok(tcp) = TcpStream::connect(plain) {
                let mut greeting = String::new();
                tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                if BufReader::new(tcp).read_line(&mut greeting).is_ok()
                    && greeting.starts_with("+OK")
                {
                    break;
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "popgate did not greet on {plain}; log:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child }
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for PopgateProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    l.local_addr().unwrap()
}

fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
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
