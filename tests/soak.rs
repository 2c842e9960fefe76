//! The soak: mixed POP3 load through popgate (the real binary, as a child process) to three real
//! Dovecot stores for a fixed time, while stores are killed and restarted and the config is reloaded,
//! then a check that no mail was lost or deleted without a client's QUIT, that popgate did not panic,
//! and that its file descriptors and memory came back to where they were.
//!
//! Run by `scripts/soak [SECONDS]` (it is `#[ignore]`d so `cargo test` skips it). Settings come from
//! the environment: `SOAK_SECONDS` (default 600), `SOAK_CLIENTS` (concurrent clients, default 12),
//! `SOAK_SEED` (default: the clock; printed so a run can be repeated), `SOAK_REPORT` (a file to write
//! the report to, besides stdout).
//!
//! # What it does
//! - Three Dovecot stores. Tenants `t0`, `t1`, `t2` have one store each; tenant `fleet` spreads its
//!   users over all three with `consistent_hash` (each fleet user has a mailbox on every store, its
//!   messages tagged with the store, so the client can see which store it reached).
//! - Every message carries an `X-Soak-Id` header. The driver keeps a ledger per (store, mailbox): what
//!   was delivered, which deletions were confirmed (DELE'd in a session whose QUIT got `+OK`) and which
//!   are uncertain (DELE'd in a session that sent QUIT but never saw the answer). Mail is delivered into
//!   the Maildirs directly, as an MTA would, to keep mailboxes from running dry.
//! - `SOAK_CLIENTS` clients run sessions back to back, each on a mailbox no other client holds:
//!   read-only sessions (RETR, verified byte for byte), DELE+QUIT, DELE then vanish (FIN or reset),
//!   DELE+QUIT then vanish before the answer, drops in the middle of a RETR, and drops before login.
//! - Every `min(60, SECONDS/10)` seconds one store (in turn) is killed (SIGKILL, sessions and all) and
//!   restarted after a short pause; every `min(30, SECONDS/20)` seconds the config is rewritten
//!   (alternating between two versions) and reloaded, alternately with `POST /reload` and SIGHUP.
//!
//! # What it checks
//! - For every (store, mailbox), the messages in the Maildir, by `X-Soak-Id`: every confirmed deletion
//!   is gone; everything gone was confirmed or uncertain; a QUIT sent outside any store outage was
//!   honoured even though the client vanished; nothing appeared that was not delivered; what remains is
//!   byte-identical to what was delivered.
//! - Every RETR returned the delivered bytes; every session of a mailbox reached its own store.
//! - Session failures happen only while the mailbox's store is down (or coming back).
//! - No reload was refused; popgate never panicked and exits cleanly on SIGTERM.
//! - popgate's open fds and RSS, measured idle after a warm-up and again idle after the run.
#![allow(clippy::unwrap_used, clippy::expect_used)] // the soak fails loudly where it stands

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use support::dovecot::{DovecotStore, StoreOptions, deliver_into};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const STORES: usize = 3;
const USERS_PER_TENANT: usize = 10;
const FLEET_USERS: usize = 10;
const PASSWORD: &str = "soak-pw";
const ADMIN_TOKEN: &str = "soak-token";
/// One client read (a reply line, a message body chunk).
const READ_LIMIT: Duration = Duration::from_secs(20);
/// After a store is back, how long its users may still see failures: popgate's health probes (every
/// second here) need `rise` (2) good results before a down store takes sessions again.
const RECOVERY_GRACE: Duration = Duration::from_secs(6);
/// Mailboxes are topped up to this many messages before a session.
const MIN_MESSAGES: usize = 4;

// === settings ===

#[derive(Debug, Clone, Copy)]
struct Params {
    seconds: u64,
    clients: usize,
    seed: u64,
    restart_every: Duration,
    down_for: Duration,
    reload_every: Duration,
}

impl Params {
    fn from_env() -> Self {
        let num = |name: &str, default: u64| -> u64 {
            std::env::var(name)
                .ok()
                .map(|v| {
                    v.parse()
                        .unwrap_or_else(|_| panic!("{name}={v:?} is not a number"))
                })
                .unwrap_or(default)
        };
        let seconds = num("SOAK_SECONDS", 600).max(10);
        let clock = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64;
        let restart_every = Duration::from_secs_f64((seconds as f64 / 10.0).min(60.0));
        Self {
            seconds,
            clients: num("SOAK_CLIENTS", 12).max(1) as usize,
            seed: num("SOAK_SEED", clock),
            restart_every,
            down_for: (restart_every / 4).min(Duration::from_secs(2)),
            reload_every: Duration::from_secs_f64((seconds as f64 / 20.0).min(30.0)),
        }
    }
}

// === small tools ===

/// xorshift64*: the soak's only randomness, reproducible from `SOAK_SEED`.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Self(seed.max(1))
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
    fn chance(&mut self, percent: u64) -> bool {
        self.next() % 100 < percent
    }
}

fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A message with its `X-Soak-Id`: a few hundred bytes to ~30 KiB, or 1 MiB when `big`; some lines
/// start with a dot, so dot-stuffing is exercised both ways.
fn make_message(id: &str, rng: &mut Rng, big: bool) -> Vec<u8> {
    let mut m = format!("X-Soak-Id: {id}\r\nSubject: soak {id}\r\nFrom: soak@example.net\r\n\r\n")
        .into_bytes();
    let target = if big {
        1 << 20
    } else {
        200 + rng.below(30_000)
    };
    let mut n = 0;
    while m.len() < target {
        if rng.chance(5) {
            m.extend_from_slice(b".");
        }
        let width = 10 + rng.below(66);
        for i in 0..width {
            m.push(b'a' + ((n + i + rng.below(3)) % 26) as u8);
        }
        m.extend_from_slice(b"\r\n");
        n += 1;
    }
    m
}

fn soak_id(message: &[u8]) -> Option<String> {
    let head_end = message
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or(message.len());
    String::from_utf8_lossy(&message[..head_end])
        .lines()
        .find_map(|l| l.strip_prefix("X-Soak-Id: ").map(|v| v.trim().to_string()))
}

/// The store index an id was delivered to (`s<store>.<login>.<n>`).
fn store_of_id(id: &str) -> Option<usize> {
    id.strip_prefix('s')?.split('.').next()?.parse().ok()
}

/// Undoes dot-stuffing of a raw multi-line body and drops its terminator.
fn unstuff(raw: &[u8]) -> Vec<u8> {
    let body = raw.strip_suffix(b".\r\n").unwrap_or(raw);
    let mut out = Vec::with_capacity(body.len());
    for line in body.split_inclusive(|&b| b == b'\n') {
        out.extend_from_slice(line.strip_prefix(b".").unwrap_or(line));
    }
    out
}

// === the ledger ===

#[derive(Debug, Clone, Copy)]
struct Delivered {
    len: usize,
    hash: u64,
}

/// What the driver knows about one mailbox on one store.
#[derive(Debug, Default)]
struct Ledger {
    delivered: HashMap<String, Delivered>,
    /// DELE'd in a session whose QUIT got `+OK`: must be gone.
    confirmed: HashSet<String>,
    /// DELE'd in a session that sent QUIT and never saw the answer: may be gone.
    uncertain: HashSet<String>,
    /// Sessions that sent QUIT and vanished at once, with when and what they had DELE'd: outside a
    /// store outage their QUIT must have been honoured.
    quit_then_vanished: Vec<(Instant, Vec<String>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Home {
    /// Tenant `t<s>`: the one store.
    Single(usize),
    /// Tenant `fleet`: whichever store consistent hashing picks, learned from the first tagged message.
    Fleet(Option<usize>),
}

#[derive(Debug)]
struct Mailbox {
    login: String,
    home: Home,
    busy: bool,
    free_at: Instant,
}

/// A store outage: killed at `down`, greeting again at `up`.
#[derive(Debug, Clone, Copy)]
struct Outage {
    store: usize,
    down: Instant,
    up: Option<Instant>,
}

#[derive(Debug, Clone)]
struct Failure {
    started: Instant,
    at: Instant,
    login: String,
    home: Home,
    action: &'static str,
    stage: &'static str,
    detail: String,
}

#[derive(Debug, Default)]
struct Counters {
    sessions: BTreeMap<&'static str, u64>,
    logins_ok: u64,
    retr_verified: u64,
    retr_bytes: u64,
    dele_confirmed: u64,
    dele_uncertain: u64,
    dele_dropped: u64,
    delivered: u64,
}

/// Everything the clients, the controllers and the checker share.
struct World {
    params: Params,
    pop3: SocketAddr,
    store_dirs: Vec<PathBuf>,
    mailboxes: Mutex<Vec<Mailbox>>,
    ledgers: Mutex<HashMap<(usize, String), Ledger>>,
    outages: Mutex<Vec<Outage>>,
    failures: Mutex<Vec<Failure>>,
    violations: Mutex<Vec<String>>,
    counters: Mutex<Counters>,
    stop_load: AtomicBool,
    message_seq: AtomicU64,
}

impl World {
    fn violation(&self, text: String) {
        eprintln!("VIOLATION: {text}");
        lock(&self.violations).push(text);
    }

    fn count(&self, what: &'static str) {
        *lock(&self.counters).sessions.entry(what).or_default() += 1;
    }

    /// Stores a session's mail may be on: its home, or every store while a fleet home is unknown.
    fn stores_of(&self, home: Home) -> Vec<usize> {
        match home {
            Home::Single(s) | Home::Fleet(Some(s)) => vec![s],
            Home::Fleet(None) => (0..STORES).collect(),
        }
    }

    /// True if one of `stores` was down (or coming back) at some time in `[from, to]`.
    fn disturbed(&self, stores: &[usize], from: Instant, to: Instant) -> bool {
        lock(&self.outages).iter().any(|o| {
            let end = o.up.map_or(to + RECOVERY_GRACE, |up| up + RECOVERY_GRACE);
            stores.contains(&o.store) && o.down <= to && end >= from
        })
    }

    /// Delivers messages to `login` on `store` until the ledger expects at least [`MIN_MESSAGES`].
    fn top_up(&self, store: usize, login: &str, rng: &mut Rng) {
        let remaining = {
            let ledgers = lock(&self.ledgers);
            let l = &ledgers[&(store, login.to_string())];
            l.delivered
                .keys()
                .filter(|id| !l.confirmed.contains(*id) && !l.uncertain.contains(*id))
                .count()
        };
        for _ in remaining..MIN_MESSAGES {
            let n = self.message_seq.fetch_add(1, Ordering::Relaxed);
            let id = format!("s{store}.{login}.d{n}");
            let big = rng.chance(4);
            let message = make_message(&id, rng, big);
            deliver_into(&self.store_dirs[store], login, &message);
            lock(&self.ledgers)
                .get_mut(&(store, login.to_string()))
                .unwrap()
                .delivered
                .insert(
                    id,
                    Delivered {
                        len: message.len(),
                        hash: fnv64(&message),
                    },
                );
            lock(&self.counters).delivered += 1;
        }
    }
}

// === a POP3 client that reports instead of panicking ===

struct Conn {
    tcp: TcpStream,
    buf: Vec<u8>,
}

type Step<T> = Result<T, String>;

impl Conn {
    async fn connect(addr: SocketAddr) -> Step<Self> {
        let tcp = tokio::time::timeout(READ_LIMIT, TcpStream::connect(addr))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| format!("connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        Ok(Self {
            tcp,
            buf: Vec::new(),
        })
    }

    async fn fill(&mut self) -> Step<()> {
        let mut chunk = [0u8; 32 * 1024];
        let n = tokio::time::timeout(READ_LIMIT, self.tcp.read(&mut chunk))
            .await
            .map_err(|_| format!("no answer within {READ_LIMIT:?}"))?
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("connection closed".into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    async fn line(&mut self) -> Step<String> {
        loop {
            if let Some(i) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=i).collect();
                return Ok(String::from_utf8_lossy(&line).trim_end().to_string());
            }
            self.fill().await?;
        }
    }

    async fn send(&mut self, line: &str) -> Step<()> {
        self.tcp
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))
    }

    /// Sends a command and requires `+OK`.
    async fn ok(&mut self, line: &str) -> Step<String> {
        self.send(line).await?;
        let r = self.line().await?;
        if r.starts_with("+OK") {
            Ok(r)
        } else {
            Err(format!("{line:?} -> {r:?}"))
        }
    }

    /// Sends a command expecting `+OK` and a multi-line body; the raw body, terminator included.
    async fn multiline(&mut self, line: &str) -> Step<Vec<u8>> {
        self.ok(line).await?;
        loop {
            let end = if self.buf.starts_with(b".\r\n") {
                Some(3)
            } else {
                self.buf
                    .windows(5)
                    .position(|w| w == b"\r\n.\r\n")
                    .map(|i| i + 5)
            };
            if let Some(end) = end {
                return Ok(self.buf.drain(..end).collect());
            }
            self.fill().await?;
        }
    }

    /// Reads until at least `n` bytes are buffered.
    async fn read_at_least(&mut self, n: usize) -> Step<()> {
        while self.buf.len() < n {
            self.fill().await?;
        }
        Ok(())
    }

    /// Vanishes with a reset instead of a FIN.
    fn abort(self) {
        let _ = self.tcp.set_zero_linger();
    }
}

// === one session ===

/// The scripts a client can follow, with their weights (percent).
const ACTIONS: &[(&str, u64)] = &[
    ("drop_before_login", 6),
    ("read_quit", 24),
    ("dele_quit", 30),
    ("dele_drop", 12),
    ("dele_reset", 5),
    ("retr_drop", 11),
    ("dele_quit_vanish", 12),
];

fn pick_action(rng: &mut Rng) -> &'static str {
    let mut roll = rng.below(100) as u64;
    for &(name, weight) in ACTIONS {
        if roll < weight {
            return name;
        }
        roll -= weight;
    }
    ACTIONS[1].0
}

/// What a session learned about a message: its number in this session and its id.
async fn identify(c: &mut Conn, n: usize) -> Step<String> {
    let head = c.multiline(&format!("TOP {n} 0")).await?;
    soak_id(&unstuff(&head)).ok_or_else(|| format!("message {n} has no X-Soak-Id"))
}

async fn run_session(world: &World, index: usize, rng: &mut Rng) {
    let (login, home) = {
        let m = &lock(&world.mailboxes)[index];
        (m.login.clone(), m.home)
    };
    for store in world.stores_of(home) {
        world.top_up(store, &login, rng);
    }
    let action = pick_action(rng);
    let started = Instant::now();
    let mut quit_sent_for: Option<(usize, Vec<String>)> = None;
    let result = session_script(world, &login, home, index, action, rng, &mut quit_sent_for).await;
    let clean = matches!(result, Ok(true));
    if let Err((stage, detail)) = result {
        // A QUIT that went out and got no answer leaves its deletions uncertain.
        if let Some((store, ids)) = quit_sent_for.take() {
            let mut ledgers = lock(&world.ledgers);
            let l = ledgers.get_mut(&(store, login.clone())).unwrap();
            lock(&world.counters).dele_uncertain += ids.len() as u64;
            l.uncertain.extend(ids);
        }
        world.count("failed");
        let home = lock(&world.mailboxes)[index].home;
        lock(&world.failures).push(Failure {
            started,
            at: Instant::now(),
            login: login.clone(),
            home,
            action,
            stage,
            detail,
        });
    } else {
        world.count(action);
    }
    let mut boxes = lock(&world.mailboxes);
    let m = &mut boxes[index];
    m.busy = false;
    // A session that did not end with an answered QUIT may still be ending at the store: give it a
    // moment before the mailbox's next session, as a real client would not reconnect within
    // milliseconds either.
    m.free_at = Instant::now()
        + if clean {
            Duration::ZERO
        } else {
            Duration::from_millis(500)
        };
}

/// Runs one session; `Ok(true)` when it ended with an answered QUIT, `Ok(false)` when it ended on
/// purpose without one, `Err((stage, why))` when something failed.
#[allow(clippy::too_many_arguments)]
async fn session_script(
    world: &World,
    login: &str,
    home: Home,
    index: usize,
    action: &'static str,
    rng: &mut Rng,
    quit_sent_for: &mut Option<(usize, Vec<String>)>,
) -> Result<bool, (&'static str, String)> {
    let mut c = Conn::connect(world.pop3)
        .await
        .map_err(|e| ("connect", e))?;
    let greeting = c.line().await.map_err(|e| ("greeting", e))?;
    if !greeting.starts_with("+OK") {
        return Err(("greeting", greeting));
    }
    if action == "drop_before_login" {
        if rng.chance(50) {
            c.ok(&format!("USER {login}"))
                .await
                .map_err(|e| ("user", e))?;
        }
        if rng.chance(50) {
            c.abort();
        }
        return Ok(false);
    }
    c.ok(&format!("USER {login}"))
        .await
        .map_err(|e| ("user", e))?;
    c.ok(&format!("PASS {PASSWORD}"))
        .await
        .map_err(|e| ("login", e))?;
    lock(&world.counters).logins_ok += 1;

    // LIST: message numbers and sizes.
    let list = c.multiline("LIST").await.map_err(|e| ("list", e))?;
    let sizes: Vec<(usize, usize)> = String::from_utf8_lossy(&list)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            Some((f.next()?.parse().ok()?, f.next()?.parse().ok()?))
        })
        .collect();
    if sizes.is_empty() {
        c.ok("QUIT").await.map_err(|e| ("quit", e))?;
        return Ok(true);
    }
    // Which store this is: every id names the store it was delivered to.
    let (first_n, _) = sizes[rng.below(sizes.len())];
    let first_id = identify(&mut c, first_n).await.map_err(|e| ("top", e))?;
    let store = store_of_id(&first_id).ok_or(("top", format!("bad id {first_id}")))?;
    match home {
        Home::Single(s) | Home::Fleet(Some(s)) if s != store => {
            world.violation(format!(
                "{login}: session reached store {store}, but the mailbox lives on store {s}"
            ));
        }
        Home::Fleet(None) => {
            lock(&world.mailboxes)[index].home = Home::Fleet(Some(store));
        }
        _ => {}
    }
    let key = (store, login.to_string());
    let pick = |rng: &mut Rng, k: usize| -> Vec<usize> {
        let mut ns: Vec<usize> = sizes.iter().map(|&(n, _)| n).collect();
        let mut out = Vec::new();
        while out.len() < k && !ns.is_empty() {
            out.push(ns.swap_remove(rng.below(ns.len())));
        }
        out
    };

    match action {
        "read_quit" => {
            let k = 1 + rng.below(2);
            for n in pick(rng, k) {
                let id = identify(&mut c, n).await.map_err(|e| ("top", e))?;
                let raw = c
                    .multiline(&format!("RETR {n}"))
                    .await
                    .map_err(|e| ("retr", e))?;
                let body = unstuff(&raw);
                let want = lock(&world.ledgers)[&key].delivered.get(&id).copied();
                match want {
                    Some(w) if w.len == body.len() && w.hash == fnv64(&body) => {
                        let mut counters = lock(&world.counters);
                        counters.retr_verified += 1;
                        counters.retr_bytes += body.len() as u64;
                    }
                    Some(w) => world.violation(format!(
                        "{login} on store {store}: RETR {n} ({id}) returned {} bytes (hash {:x}); {} bytes (hash {:x}) were delivered",
                        body.len(),
                        fnv64(&body),
                        w.len,
                        w.hash
                    )),
                    None => world.violation(format!(
                        "{login} on store {store}: RETR {n} returned {id}, which was never delivered there"
                    )),
                }
            }
            c.ok("QUIT").await.map_err(|e| ("quit", e))?;
            Ok(true)
        }
        "dele_quit" | "dele_drop" | "dele_reset" | "dele_quit_vanish" => {
            let mut ids = Vec::new();
            let k = 1 + rng.below(3);
            for n in pick(rng, k) {
                let id = identify(&mut c, n).await.map_err(|e| ("top", e))?;
                c.ok(&format!("DELE {n}")).await.map_err(|e| ("dele", e))?;
                ids.push(id);
            }
            match action {
                "dele_quit" => {
                    c.send("QUIT").await.map_err(|e| ("quit", e))?;
                    *quit_sent_for = Some((store, ids.clone()));
                    let r = c.line().await.map_err(|e| ("quit", e))?;
                    if !r.starts_with("+OK") {
                        return Err(("quit", r));
                    }
                    *quit_sent_for = None;
                    let mut ledgers = lock(&world.ledgers);
                    let l = ledgers.get_mut(&key).unwrap();
                    lock(&world.counters).dele_confirmed += ids.len() as u64;
                    l.confirmed.extend(ids);
                    Ok(true)
                }
                "dele_quit_vanish" => {
                    c.send("QUIT").await.map_err(|e| ("quit", e))?;
                    let mut ledgers = lock(&world.ledgers);
                    let l = ledgers.get_mut(&key).unwrap();
                    lock(&world.counters).dele_uncertain += ids.len() as u64;
                    l.uncertain.extend(ids.iter().cloned());
                    l.quit_then_vanished.push((Instant::now(), ids));
                    Ok(false)
                }
                "dele_reset" => {
                    lock(&world.counters).dele_dropped += ids.len() as u64;
                    c.abort();
                    Ok(false)
                }
                _ => {
                    lock(&world.counters).dele_dropped += ids.len() as u64;
                    Ok(false)
                }
            }
        }
        "retr_drop" => {
            let &(n, size) = sizes.iter().max_by_key(|&&(_, size)| size).unwrap();
            c.ok(&format!("RETR {n}")).await.map_err(|e| ("retr", e))?;
            c.read_at_least((size / 2).min(64 * 1024))
                .await
                .map_err(|e| ("retr", e))?;
            Ok(false)
        }
        other => unreachable!("{other}"),
    }
}

/// One client: sessions back to back on free mailboxes until the load stops.
async fn client(world: Arc<World>, mut rng: Rng) {
    while !world.stop_load.load(Ordering::Relaxed) {
        let picked = {
            let mut boxes = lock(&world.mailboxes);
            let now = Instant::now();
            let free: Vec<usize> = (0..boxes.len())
                .filter(|&i| !boxes[i].busy && boxes[i].free_at <= now)
                .collect();
            if free.is_empty() {
                None
            } else {
                let i = free[rng.below(free.len())];
                boxes[i].busy = true;
                Some(i)
            }
        };
        match picked {
            Some(i) => run_session(&world, i, &mut rng).await,
            None => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

// === popgate as a child process ===

fn config_yaml(stores: &[SocketAddr], variant: bool) -> String {
    let mut y = String::from(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\n\
         admin:\n  bind: 127.0.0.1:0\n  token: soak-token\n\
         timeouts:\n  backend_connect: 2s\n  backend_reply: 10s\n  shutdown_grace: 5s\n",
    );
    // The second version changes a timeout and adds a tenant without pools or probes, so both
    // versions hold the same store connections and the fd count can be compared across reloads.
    if variant {
        y.push_str("  idle: 9m\n");
    }
    y.push_str("tenants:\n");
    for (s, addr) in stores.iter().enumerate() {
        let _ = write!(
            y,
            "  t{s}:\n    domains: [t{s}.test]\n    backends: [\"{addr}\"]\n    plaintext_login: allow\n    health: {{interval: 1s}}\n"
        );
    }
    let all: Vec<String> = stores.iter().map(|a| format!("\"{a}\"")).collect();
    let _ = write!(
        y,
        "  fleet:\n    domains: [fleet.test]\n    backends: [{}]\n    balance: consistent_hash\n    plaintext_login: allow\n    health: {{interval: 1s}}\n",
        all.join(", ")
    );
    if variant {
        let _ = write!(
            y,
            "  spare:\n    domains: [spare.test]\n    backends: [\"{}\"]\n    pool: {{min_idle: 0}}\n    health: {{enabled: false}}\n",
            stores[0]
        );
    }
    y
}

/// Writes the config atomically (popgate watches the directory and may read it at any moment).
fn write_config(path: &Path, yaml: &str) {
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

struct Popgate {
    child: Child,
    log: PathBuf,
    pop3: SocketAddr,
    admin: SocketAddr,
}

impl Popgate {
    fn start(config: &Path, log: &Path) -> Self {
        let out = std::fs::File::create(log).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_popgate"))
            .args(["run", "-c"])
            .arg(config)
            .env("POPGATE_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("start popgate");
        let mut pg = Self {
            child,
            log: log.to_path_buf(),
            pop3: SocketAddr::from(([0, 0, 0, 0], 0)),
            admin: SocketAddr::from(([0, 0, 0, 0], 0)),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = pg.log_text();
            let addr_in = |needle: &str| -> Option<SocketAddr> {
                let line = text.lines().find(|l| l.contains(needle))?;
                let at = line.find(" addr=")? + 6;
                line[at..].split_whitespace().next()?.parse().ok()
            };
            if let (Some(pop3), Some(admin)) = (
                addr_in("listening listener=pop3"),
                addr_in("admin server listening"),
            ) {
                pg.pop3 = pop3;
                pg.admin = admin;
                return pg;
            }
            if let Ok(Some(status)) = pg.child.try_wait() {
                panic!("popgate exited at start with {status}:\n{text}");
            }
            assert!(Instant::now() < deadline, "popgate did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// popgate's log so far, without terminal colour codes.
    fn log_text(&self) -> String {
        let raw =
            String::from_utf8_lossy(&std::fs::read(&self.log).unwrap_or_default()).into_owned();
        let mut out = String::with_capacity(raw.len());
        let mut chars = raw.chars();
        while let Some(ch) = chars.next() {
            if ch == '\u{1b}' {
                // CSI: ESC [ parameters final-byte
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                out.push(ch);
            }
        }
        out
    }

    fn rss(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|n| n.parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    }

    fn fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// The lowest fd count and RSS over `samples` readings 200 ms apart: health probes and pool refills
    /// open store connections for a moment, and a single reading could catch one.
    fn idle_footprint(&self, samples: usize) -> (usize, u64) {
        let mut fds = usize::MAX;
        let mut rss = u64::MAX;
        for i in 0..samples {
            if i > 0 {
                std::thread::sleep(Duration::from_millis(200));
            }
            fds = fds.min(self.fds());
            rss = rss.min(self.rss());
        }
        (fds, rss)
    }

    fn http(&self, method: &str, path: &str) -> (u16, String) {
        let out = Command::new("curl")
            .args([
                "-s",
                "--max-time",
                "20",
                "-X",
                method,
                "-w",
                "\n%{http_code}",
            ])
            .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
            .arg(format!("http://{}{path}", self.admin))
            .output()
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse().unwrap_or(0), body.to_string())
    }

    fn metric_sum(&self, prefix: &str) -> f64 {
        let (_, text) = self.http("GET", "/metrics");
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.pid().to_string()])
            .status();
    }

    /// SIGTERM, then the exit status (or `None` if it had not exited 20 s later).
    fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        self.signal("-TERM");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                return None;
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

// === the run ===

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Runs client sessions for `duration` on `runtime` (or until `world.stop_load`).
fn run_load(
    world: &Arc<World>,
    runtime: &tokio::runtime::Runtime,
    duration: Duration,
    rng: &mut Rng,
) {
    world.stop_load.store(false, Ordering::Relaxed);
    let handles: Vec<_> = (0..world.params.clients)
        .map(|_| runtime.spawn(client(world.clone(), Rng::new(rng.next()))))
        .collect();
    let until = Instant::now() + duration;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100).min(until - Instant::now()));
    }
    world.stop_load.store(true, Ordering::Relaxed);
    runtime.block_on(async {
        for h in handles {
            h.await.unwrap();
        }
    });
}

#[test]
#[ignore = "long-running soak: run it with scripts/soak [SECONDS]"]
fn soak() {
    let params = Params::from_env();
    let mut rng = Rng::new(params.seed);
    let mut report = String::new();
    let _ = writeln!(
        report,
        "popgate soak: {} s, {} clients, seed {} (SOAK_SEED), store restart every {:.1} s (down {:.1} s), reload every {:.1} s",
        params.seconds,
        params.clients,
        params.seed,
        params.restart_every.as_secs_f64(),
        params.down_for.as_secs_f64(),
        params.reload_every.as_secs_f64()
    );
    eprint!("{report}");

    // Mailboxes and their first messages.
    let mut mailboxes = Vec::new();
    let mut per_store: Vec<StoreOptions> = (0..STORES)
        .map(|_| {
            StoreOptions::new().extra_config(
                "service pop3-login {\n  service_count = 0\n  process_min_avail = 2\n  client_limit = 1000\n}\n\
                 service pop3 {\n  service_count = 100\n  idle_kill = 3 secs\n}",
            )
        })
        .collect();
    let mut ledgers: HashMap<(usize, String), Ledger> = HashMap::new();
    let mut seq = 0u64;
    let mut add_user =
        |store: usize, login: &str, per_store: &mut Vec<StoreOptions>, rng: &mut Rng| {
            let mut ledger = Ledger::default();
            let mut messages = Vec::new();
            for k in 0..6 {
                seq += 1;
                let id = format!("s{store}.{login}.i{seq}");
                let m = make_message(&id, rng, k == 0);
                ledger.delivered.insert(
                    id,
                    Delivered {
                        len: m.len(),
                        hash: fnv64(&m),
                    },
                );
                messages.push(m);
            }
            let opts = std::mem::take(&mut per_store[store]);
            per_store[store] = opts.user(login, PASSWORD, messages);
            ledgers.insert((store, login.to_string()), ledger);
        };
    for s in 0..STORES {
        for u in 0..USERS_PER_TENANT {
            let login = format!("u{u}@t{s}.test");
            add_user(s, &login, &mut per_store, &mut rng);
            mailboxes.push(Mailbox {
                login,
                home: Home::Single(s),
                busy: false,
                free_at: Instant::now(),
            });
        }
    }
    for u in 0..FLEET_USERS {
        let login = format!("f{u}@fleet.test");
        for s in 0..STORES {
            add_user(s, &login, &mut per_store, &mut rng);
        }
        mailboxes.push(Mailbox {
            login,
            home: Home::Fleet(None),
            busy: false,
            free_at: Instant::now(),
        });
    }
    let stores: Vec<DovecotStore> = per_store.into_iter().map(DovecotStore::start).collect();
    let store_addrs: Vec<SocketAddr> = stores.iter().map(DovecotStore::pop3_addr).collect();
    let store_dirs: Vec<PathBuf> = stores.iter().map(|s| s.dir().to_path_buf()).collect();
    let stores = Arc::new(Mutex::new(stores));

    // The config gets a directory of its own: popgate reloads on any change in it, its own log included.
    let dir = tempfile::Builder::new()
        .prefix("popgate-soak-")
        .tempdir()
        .unwrap();
    std::fs::create_dir(dir.path().join("etc")).unwrap();
    let config_path = dir.path().join("etc").join("popgate.yaml");
    write_config(&config_path, &config_yaml(&store_addrs, false));
    let mut pg = Popgate::start(&config_path, &dir.path().join("popgate.log"));
    let world = Arc::new(World {
        params,
        pop3: pg.pop3,
        store_dirs,
        mailboxes: Mutex::new(mailboxes),
        ledgers: Mutex::new(ledgers),
        outages: Mutex::default(),
        failures: Mutex::default(),
        violations: Mutex::default(),
        counters: Mutex::default(),
        stop_load: AtomicBool::new(false),
        message_seq: AtomicU64::new(0),
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // Warm up, let everything settle, and take the baseline.
    let warmup = Duration::from_secs((params.seconds / 20).clamp(3, 20));
    run_load(&world, &runtime, warmup, &mut rng);
    std::thread::sleep(Duration::from_secs(2));
    let (fds_base, rss_base) = pg.idle_footprint(10);
    let warm_sessions: u64 = lock(&world.counters).sessions.values().sum();
    let warm_failures = lock(&world.failures).len();

    // The soak proper, with the store killer, the reloader and a sampler alongside.
    let started = Instant::now();
    let end = started + Duration::from_secs(params.seconds);
    let peak = Arc::new(Mutex::new((0usize, 0u64)));
    let reloads_requested = Arc::new(AtomicU64::new(0));
    let reload_failures = Arc::new(Mutex::new(Vec::<String>::new()));
    let controllers = {
        let restarter = {
            let (world, stores) = (world.clone(), stores.clone());
            std::thread::spawn(move || {
                let mut next = Instant::now() + world.params.restart_every;
                let mut which = 0;
                while next + world.params.down_for < end {
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    let down = Instant::now();
                    lock(&stores)[which].stop();
                    lock(&world.outages).push(Outage {
                        store: which,
                        down,
                        up: None,
                    });
                    std::thread::sleep(world.params.down_for);
                    lock(&stores)[which].restart();
                    let up = Instant::now();
                    if let Some(o) = lock(&world.outages).last_mut() {
                        o.up = Some(up);
                    }
                    eprintln!(
                        "[{:>6.1}s] store {which} killed and restarted ({:.1} s without it)",
                        down.duration_since(started).as_secs_f64(),
                        (up - down).as_secs_f64()
                    );
                    which = (which + 1) % STORES;
                    next += world.params.restart_every;
                }
            })
        };
        let reloader = {
            let (world, requested, failures) = (
                world.clone(),
                reloads_requested.clone(),
                reload_failures.clone(),
            );
            let (config_path, admin, pid) = (config_path.clone(), pg.admin, pg.pid());
            let addrs = store_addrs.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                let mut next = Instant::now() + world.params.reload_every;
                while next < end {
                    std::thread::sleep(next.saturating_duration_since(Instant::now()));
                    n += 1;
                    write_config(&config_path, &config_yaml(&addrs, n % 2 == 1));
                    if n % 2 == 1 {
                        let out = Command::new("curl")
                            .args([
                                "-s",
                                "--max-time",
                                "20",
                                "-X",
                                "POST",
                                "-w",
                                "\n%{http_code}",
                            ])
                            .args(["-H", &format!("Authorization: Bearer {ADMIN_TOKEN}")])
                            .arg(format!("http://{admin}/reload"))
                            .output()
                            .expect("curl");
                        let text = String::from_utf8_lossy(&out.stdout).to_string();
                        if !text.ends_with("\n200") {
                            lock(&failures).push(format!("POST /reload #{n}: {text:?}"));
                        }
                    } else {
                        let _ = Command::new("kill")
                            .args(["-HUP", &pid.to_string()])
                            .status();
                    }
                    requested.fetch_add(1, Ordering::Relaxed);
                    next += world.params.reload_every;
                }
                // End on the first version, so the end state compares with the baseline.
                if n % 2 == 1 {
                    write_config(&config_path, &config_yaml(&addrs, false));
                    let _ = Command::new("kill")
                        .args(["-HUP", &pid.to_string()])
                        .status();
                    requested.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let sampler = {
            let (peak, pid) = (peak.clone(), pg.pid());
            std::thread::spawn(move || {
                while Instant::now() < end {
                    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count());
                    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
                        .unwrap_or_default()
                        .lines()
                        .find_map(|l| l.strip_prefix("VmRSS:"))
                        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                        .unwrap_or(0)
                        * 1024;
                    let mut p = lock(&peak);
                    *p = (p.0.max(fds), p.1.max(rss));
                    drop(p);
                    std::thread::sleep(Duration::from_millis(500));
                }
            })
        };
        [restarter, reloader, sampler]
    };
    run_load(
        &world,
        &runtime,
        end.saturating_duration_since(Instant::now()),
        &mut rng,
    );
    let load_ended = Instant::now();
    for c in controllers {
        c.join().unwrap();
    }

    // Quiet again: every store running, every session over, popgate idle.
    for (i, store) in lock(&stores).iter_mut().enumerate() {
        if !store.is_running() {
            eprintln!("store {i} was not running at the end; restarting it");
            store.restart();
        }
    }
    let settle_deadline = Instant::now() + Duration::from_secs(60);
    let (fds_end, rss_end) = loop {
        let (fds, rss) = pg.idle_footprint(10);
        if fds <= fds_base + 4 || Instant::now() > settle_deadline {
            break (fds, rss);
        }
    };
    let settled_in = load_ended.elapsed();
    let (fds_peak, rss_peak) = *lock(&peak);

    // popgate's own account.
    let reloads_ok = pg.metric_sum("popgate_config_reloads_total{result=\"ok\"}") + 0.0;
    let reloads_err = pg.metric_sum("popgate_config_reloads_total{result=\"error\"}") + 0.0;
    let alive = pg.child.try_wait().ok().flatten().is_none();
    let exit = pg.terminate();
    let log = pg.log_text();
    let panics: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panicked") || l.contains("RUST_BACKTRACE"))
        .collect();

    // The mail, counted on the stores.
    let mut violations = std::mem::take(&mut *lock(&world.violations));
    let outages = lock(&world.outages).clone();
    let stores = lock(&stores);
    let ledgers = lock(&world.ledgers);
    let (mut present_total, mut expected_total, mut uncertain_gone, mut uncertain_kept) =
        (0, 0, 0, 0);
    let mut mailboxes_checked = 0;
    let mut per_mailbox = String::new();
    let mut keys: Vec<&(usize, String)> = ledgers.keys().collect();
    keys.sort();
    for key in keys {
        let (store, login) = key;
        let l = &ledgers[key];
        mailboxes_checked += 1;
        let mut present: HashMap<String, Vec<u8>> = HashMap::new();
        for m in stores[*store].maildir_messages(login) {
            let Some(id) = soak_id(&m) else {
                violations.push(format!(
                    "{login} on store {store}: a message without X-Soak-Id"
                ));
                continue;
            };
            if present.insert(id.clone(), m).is_some() {
                violations.push(format!("{login} on store {store}: {id} is there twice"));
            }
        }
        present_total += present.len();
        for (id, m) in &present {
            match l.delivered.get(id) {
                None => violations.push(format!(
                    "{login} on store {store}: {id} appeared, never delivered"
                )),
                Some(d) if d.len != m.len() || d.hash != fnv64(m) => {
                    violations.push(format!(
                        "{login} on store {store}: {id} changed on the store"
                    ));
                }
                Some(_) => {}
            }
        }
        for id in &l.confirmed {
            if present.contains_key(id) {
                violations.push(format!(
                    "{login} on store {store}: {id} is still there although a QUIT got +OK after its DELE"
                ));
            }
        }
        for id in l.delivered.keys() {
            let gone = !present.contains_key(id);
            if gone && !l.confirmed.contains(id) && !l.uncertain.contains(id) {
                violations.push(format!(
                    "{login} on store {store}: {id} is gone without a client's QUIT (LOST)"
                ));
            }
            if !gone && !l.confirmed.contains(id) {
                expected_total += 1;
            }
            if l.uncertain.contains(id) && !l.confirmed.contains(id) {
                if gone {
                    uncertain_gone += 1;
                } else {
                    uncertain_kept += 1;
                }
            }
        }
        let must_remain = l
            .delivered
            .keys()
            .filter(|id| !l.confirmed.contains(*id) && !l.uncertain.contains(*id))
            .count();
        let may_remain = l
            .delivered
            .keys()
            .filter(|id| !l.confirmed.contains(*id))
            .count();
        let verdict = if (must_remain..=may_remain).contains(&present.len()) {
            "ok"
        } else {
            "WRONG"
        };
        let _ = writeln!(
            per_mailbox,
            "  store {store} {login:<16} delivered {:>4}, deleted by QUIT +OK {:>4}, on the store {:>3} \
             (must be at least {must_remain}, at most {may_remain}): {verdict}",
            l.delivered.len(),
            l.confirmed.len(),
            present.len(),
        );
        for (at, ids) in &l.quit_then_vanished {
            let disturbed = outages.iter().any(|o| {
                o.store == *store
                    && o.down <= *at + Duration::from_secs(5)
                    && o.up.is_none_or(|up| up >= *at - Duration::from_secs(1))
            });
            if disturbed {
                continue;
            }
            for id in ids {
                if present.contains_key(id) {
                    violations.push(format!(
                        "{login} on store {store}: {id} is still there although the client sent QUIT after its DELE (and no store was down)"
                    ));
                }
            }
        }
    }

    // Session failures: expected only while the mailbox's store was out.
    let failures = lock(&world.failures).clone();
    let (mut expected_failures, mut unexpected) = (0, Vec::new());
    for f in &failures {
        if world.disturbed(&world.stores_of(f.home), f.started, f.at) {
            expected_failures += 1;
        } else {
            unexpected.push(f);
        }
    }
    for f in unexpected.iter().take(20) {
        violations.push(format!(
            "session failed with no store outage: {} ({}) at {} after {:.1} s into the soak: {}",
            f.login,
            f.action,
            f.stage,
            f.at.saturating_duration_since(started).as_secs_f64(),
            f.detail
        ));
    }
    if unexpected.len() > 20 {
        violations.push(format!(
            "... and {} more unexpected session failures",
            unexpected.len() - 20
        ));
    }
    for r in lock(&reload_failures).iter() {
        violations.push(format!("reload refused: {r}"));
    }
    if reloads_err > 0.0 {
        violations.push(format!("popgate counted {reloads_err} refused reloads"));
    }
    let requested = reloads_requested.load(Ordering::Relaxed);
    if reloads_ok < requested as f64 {
        violations.push(format!(
            "{requested} reloads requested, popgate counted {reloads_ok} done"
        ));
    }
    // Each requested reload is one file replacement (which the directory watcher may act on, up to
    // twice) plus one POST or SIGHUP: at most three reloads each. More means popgate reloads by itself.
    if reloads_ok > (3 * requested + 3) as f64 {
        violations.push(format!(
            "popgate reloaded {reloads_ok} times for {requested} requested reloads: it keeps reloading on its own"
        ));
    }
    if !alive {
        violations.push("popgate was no longer running at the end".into());
    }
    match exit {
        Some(s) if s.success() => {}
        other => violations.push(format!(
            "popgate did not exit cleanly on SIGTERM: {other:?}"
        )),
    }
    for p in panics.iter().take(5) {
        violations.push(format!("popgate log: {p}"));
    }
    // fds: the same config and store connections as at the baseline; a few may be a probe in flight.
    if fds_end > fds_base + 4 {
        violations.push(format!(
            "popgate holds {fds_end} fds at the end, {fds_base} at the baseline"
        ));
    }
    // RSS: allocator pools and caches may keep what the peak load needed, but not grow with the
    // number of sessions: the bound is the baseline plus half of what the peak added, plus 16 MiB.
    let rss_bound = rss_base + rss_peak.saturating_sub(rss_base) / 2 + (16 << 20);
    if rss_end > rss_bound {
        violations.push(format!(
            "popgate's RSS is {:.1} MiB at the end: baseline {:.1} MiB, peak {:.1} MiB, bound {:.1} MiB",
            mib(rss_end),
            mib(rss_base),
            mib(rss_peak),
            mib(rss_bound)
        ));
    }

    // The report.
    let c = lock(&world.counters);
    let sessions: u64 = c.sessions.values().sum::<u64>() - warm_sessions;
    let _ = writeln!(
        report,
        "ran {:.0} s after a {:.0} s warm-up; load ended, popgate idle again {:.1} s later",
        load_ended.duration_since(started).as_secs_f64(),
        warmup.as_secs_f64(),
        settled_in.as_secs_f64()
    );
    let _ = writeln!(
        report,
        "sessions: {sessions} ({:.0}/s), by script:",
        sessions as f64 / params.seconds as f64
    );
    for (name, n) in &c.sessions {
        let _ = writeln!(report, "  {name:<18} {n}");
    }
    let _ = writeln!(
        report,
        "logins ok {}; RETR verified byte for byte {} ({:.1} MiB)",
        c.logins_ok,
        c.retr_verified,
        mib(c.retr_bytes)
    );
    let _ = writeln!(
        report,
        "messages: delivered {} during the run, deletions confirmed by QUIT +OK {}, DELE'd then dropped without QUIT {}, uncertain (QUIT sent, no answer) {} (gone {uncertain_gone}, kept {uncertain_kept})",
        c.delivered, c.dele_confirmed, c.dele_dropped, c.dele_uncertain
    );
    let _ = writeln!(
        report,
        "mailboxes checked on the stores: {mailboxes_checked}; messages there {present_total}, expected at least {expected_total}"
    );
    report.push_str(&per_mailbox);
    let _ = writeln!(
        report,
        "store restarts: {}; reloads: {requested} requested, popgate counted {reloads_ok} ok and {reloads_err} refused",
        outages.len()
    );
    let _ = writeln!(
        report,
        "session failures: {} ({expected_failures} during a store outage, {} otherwise; {warm_failures} in the warm-up)",
        failures.len(),
        unexpected.len()
    );
    let mut by_stage: BTreeMap<String, usize> = BTreeMap::new();
    for f in &failures {
        let reason = f
            .detail
            .split(" -> ")
            .last()
            .unwrap_or("")
            .chars()
            .take(60)
            .collect::<String>();
        *by_stage
            .entry(format!("{} at {}: {reason}", f.action, f.stage))
            .or_default() += 1;
    }
    for (what, n) in by_stage.iter().take(15) {
        let _ = writeln!(report, "  {n:>6}  {what}");
    }
    let _ = writeln!(
        report,
        "popgate fds: baseline {fds_base}, peak {fds_peak}, end {fds_end}"
    );
    let _ = writeln!(
        report,
        "popgate RSS: baseline {:.1} MiB, peak {:.1} MiB, end {:.1} MiB (bound {:.1} MiB)",
        mib(rss_base),
        mib(rss_peak),
        mib(rss_end),
        mib(rss_bound)
    );
    let _ = writeln!(
        report,
        "popgate: panics in log {}, exit on SIGTERM {exit:?}",
        panics.len()
    );
    if violations.is_empty() {
        let _ = writeln!(
            report,
            "RESULT: PASS (nothing lost, nothing deleted without a client's QUIT)"
        );
    } else {
        let _ = writeln!(report, "RESULT: FAIL, {} violations:", violations.len());
        for v in violations.iter().take(50) {
            let _ = writeln!(report, "  - {v}");
        }
    }
    println!("\n{report}");
    if let Ok(path) = std::env::var("SOAK_REPORT") {
        let _ = std::fs::write(&path, &report);
    }
    if !violations.is_empty() {
        let keep = dir.keep();
        panic!(
            "soak failed; popgate's config and log are kept in {}",
            keep.display()
        );
    }
}
