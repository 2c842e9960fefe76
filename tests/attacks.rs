//! Attacks replayed against popgate: each sends the bytes an adversarial or fault-injection pass found
//! a weakness with, and pins what must hold instead. A new finding gets its test here, named for what
//! must hold. (Admin HTTP attacks are in tests/admin_http.rs; SNI overlaps and templates are refused at
//! config load, tested in src/config/tests.rs and src/router/tests.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use popgate::maildrop::{Maildrop, Server, Settings};
use support::pop3::Pop3;
use support::store::{Script, ScriptedStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const LOCKED_OUT: &str = "-ERR [AUTH] Too many failed logins; try again later";
const AUTH_FAILED: &str = "-ERR [AUTH] Authentication failed.";

fn b64(raw: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(raw)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn start(yaml: &str, base: &Path) -> popgate::Running {
    let config =
        popgate::Config::from_yaml_str(yaml, base).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    popgate::start(config, CancellationToken::new())
        .await
        .unwrap()
}

/// Edge defences that act on loopback (which is trusted by default), with no delays to wait out and no
/// connection-rate limit, so a test can hammer from 127.0.0.x.
const THROTTLE_ON_LOOPBACK: &str = "throttle:\n  trusted_networks: []\n  failed_login_delay: 0s\n  \
     lockout_after: 3\n  connection_burst: 0\n";

/// A plain listener named `pop3` and the given extra top-level YAML and tenants.
fn config(extra: &str, tenants: &str) -> String {
    format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\n{extra}\ntenants:\n{tenants}"
    )
}

/// A tenant with plaintext logins allowed, no pool and no health probes (so store connections are the
/// logins' own).
fn tenant(name: &str, domain: &str, store: SocketAddr, extra: &str) -> String {
    format!(
        "  {name}:\n    domains: [{domain}]\n    backends: [\"{store}\"]\n    plaintext_login: allow\n    \
         pool: {{min_idle: 0}}\n    health: {{enabled: false}}\n{extra}"
    )
}

async fn maildrop(users: &[(&str, &str)]) -> (Maildrop, Server) {
    let md = Maildrop::new(Settings::default());
    for (user, pass) in users {
        md.add_mailbox(user, pass, vec![b"Subject: x\r\n\r\nbody\r\n".to_vec()]);
    }
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

/// USER/PASS on a fresh connection from `from`; the PASS reply.
async fn login_from(addr: SocketAddr, from: &str, user: &str, pass: &str) -> String {
    let mut c = Pop3::greeted_from(addr, ip(from)).await;
    c.ok(&format!("USER {user}")).await;
    c.cmd(&format!("PASS {pass}")).await
}

// === Finding 1: failed-login bookkeeping cannot grow memory ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_out_address_cannot_grow_failed_login_bookkeeping() {
    let (_md, store) = maildrop(&[("alice@example.com", "right")]).await;
    let yaml = config(
        &format!("{THROTTLE_ON_LOOPBACK}limits:\n  max_failed_logins: 3\n"),
        &tenant("acme", "example.com", store.local_addr(), ""),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    let throttle = &pg.runtime().context.throttle;

    // Lock the address out with three wrong passwords of a real mailbox.
    for pass in ["w1", "w2", "w3"] {
        let reply = login_from(addr, "127.0.0.1", "alice@example.com", pass).await;
        assert!(reply.starts_with("-ERR"), "{reply}");
    }
    let reply = login_from(addr, "127.0.0.1", "alice@example.com", "right").await;
    assert_eq!(reply, LOCKED_OUT);
    let before = throttle.tracked_keys();

    // The attack: connect, three AUTH PLAIN with 9,000-character random names (a hosted domain and an
    // unknown one), close; again and again.
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for round in 0..150 {
        let mut c = Pop3::greeted_from(addr, ip("127.0.0.1")).await;
        for _ in 0..3 {
            let mut name = String::with_capacity(9_100);
            while name.len() < 9_000 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                name.push_str(&format!("{seed:016x}"));
            }
            name.push_str(if round % 2 == 0 {
                "@example.com"
            } else {
                "@unknown.test"
            });
            let reply = c
                .cmd(&format!(
                    "AUTH PLAIN {}",
                    b64(format!("\0{name}\0pw").as_bytes())
                ))
                .await;
            assert_eq!(reply, LOCKED_OUT, "round {round}");
        }
    }
    // Not one key more (the count of open sessions may have dropped by this client's last one): the
    // address was refused before any per-mailbox work.
    let after = throttle.tracked_keys();
    assert!(
        after <= before,
        "tracked keys grew from {before} to {after}"
    );
    pg.shutdown();
}

// === Finding 2: anonymous connects hold no store connections ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_connects_cannot_tie_up_store_connections() {
    let store = ScriptedStore::start(Script::default()).await;
    let tenants = |passthrough: &str| {
        tenant("mtview", "mtview.test", store.addr, passthrough) + "    mechanisms: [user, apop]\n"
    };
    let bound = "  - name: bound\n    bind: 127.0.0.1:0\n    tls: none\n    tenant: mtview\n";

    // Without apop_passthrough (the default), a bound listener opens no store connection before login.
    let yaml = format!(
        "listeners:\n{bound}{THROTTLE_ON_LOOPBACK}  max_sessions_per_ip: 0\ntenants:\n{}",
        tenants("")
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("bound").unwrap();
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut c = Pop3::connect(addr).await;
        let greeting = c.line().await;
        assert!(!greeting.contains('<'), "APOP offered: {greeting}");
        held.push(c);
    }
    assert_eq!(store.accepted(), 0, "store connections for silent clients");
    drop(held);
    pg.shutdown();

    // With it, store connections are held only up to the caps, and the greeting shows the store's
    // timestamp but none of its banner or capability tags.
    let yaml = format!(
        "listeners:\n{bound}{THROTTLE_ON_LOOPBACK}  max_sessions_per_ip: 0\ntenants:\n{}",
        tenants("    apop_passthrough: {max_pending: 6, max_pending_per_ip: 4}\n")
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("bound").unwrap();
    let mut held = Vec::new();
    let mut with_timestamp = 0;
    for i in 0..200 {
        // Half from one address, half from another.
        let from = if i % 2 == 0 { "127.0.0.1" } else { "127.0.0.2" };
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::new(ip(from), 0)).unwrap();
        let mut c = Pop3::from_tcp(socket.connect(addr).await.unwrap());
        let greeting = c.line().await;
        assert!(
            !greeting.contains("XCLIENT") && !greeting.contains("scripted"),
            "the store's banner reached the client: {greeting}"
        );
        if greeting.contains("<4242.1@store.test>") {
            with_timestamp += 1;
        }
        held.push(c);
    }
    // Three from each address (each under its cap of 4), until the tenant's 6 are held.
    assert_eq!(with_timestamp, 6);
    assert_eq!(store.accepted(), 6);
    assert!(store.open() <= 6);
    drop(held);
    pg.shutdown();
}

// === Finding 4: a local part cannot choose the domain a store sees ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_part_cannot_smuggle_another_domain() {
    let store = ScriptedStore::start(Script::default()).await;
    let yaml = config(
        "",
        &(tenant("net", "example.net", store.addr, "")
            + &tenant(
                "info",
                "example.info",
                store.addr,
                "    backend_username: local\n",
            )),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    for login in [
        "user150@example.net@example.info",
        "user150%example.net@example.info",
        "user150+example.net@example.info",
        "user150+example.net+example.info",
        "user150%example.net%example.info",
    ] {
        let reply = login_from(addr, "127.0.0.1", login, "pw").await;
        assert_eq!(reply, AUTH_FAILED, "{login}");
    }
    assert!(
        !store.lines().iter().any(|l| l.contains("user150")),
        "a smuggled name reached the store: {:?}",
        store.lines()
    );
    // A plain subaddress still logs in as typed.
    let reply = login_from(addr, "127.0.0.1", "user150+news@example.info", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(store.lines().contains(&"USER user150+news\r\n".to_string()));
    pg.shutdown();
}

// === Finding 5: a master login opens the mailbox whose secret was checked ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_login_logs_in_as_the_checked_mailbox() {
    let store = ScriptedStore::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("secrets.yaml"),
        "alice@example.dev: alice-pw\n\"j\u{f6}rg@example.dev\": joerg-pw\n",
    )
    .unwrap();
    let yaml = config(
        "",
        &tenant(
            "dev",
            "example.dev",
            store.addr,
            "    secrets: secrets.yaml\n    backend_login: {master: {user: popmaster, password: master-pw}}\n",
        ),
    );
    let pg = start(&yaml, dir.path()).await;
    let addr = pg.local_addr("pop3").unwrap();
    let mut c = Pop3::greeted(addr).await;
    c.send("UTF8").await;
    c.line().await;
    c.login("ALICE@Example.dev", "alice-pw").await;
    c.ok("QUIT").await;
    let mut c = Pop3::greeted(addr).await;
    c.ok("UTF8").await;
    // `o` + U+0308: the decomposed form of the name whose secret is stored precomposed.
    c.login("jo\u{308}rg@example.dev", "joerg-pw").await;
    c.ok("QUIT").await;
    let users: Vec<String> = store
        .lines()
        .into_iter()
        .filter(|l| l.starts_with("USER "))
        .collect();
    assert_eq!(
        users,
        [
            "USER alice@example.dev*popmaster\r\n",
            "USER j\u{f6}rg@example.dev*popmaster\r\n"
        ],
    );
    pg.shutdown();
}

// === Finding 6: relayed SASL responses are popgate's own framing ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_sasl_tokens_are_validated_and_re_framed() {
    let store = ScriptedStore::start(Script::default()).await;
    let yaml = config(
        "",
        &tenant(
            "acme",
            "example.com",
            store.addr,
            "    mechanisms: [xoauth2]\n",
        ),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    let token = b64(b"user=bob@example.com\x01auth=Bearer t0ken\x01\x01");

    // Trailing whitespace: the store gets the token alone.
    let mut c = Pop3::greeted(addr).await;
    assert!(c.cmd("AUTH XOAUTH2").await.starts_with('+'));
    c.send_raw(format!("{token}\t \r\n").as_bytes()).await;
    assert!(c.line().await.starts_with("+OK"));
    c.ok("QUIT").await;
    assert!(
        store.lines().contains(&format!("AUTH XOAUTH2 {token}\r\n")),
        "{:?}",
        store.lines()
    );
    // A stray CR before the CRLF: refused, nothing sent.
    let before = store.lines().len();
    let mut c = Pop3::greeted(addr).await;
    assert!(c.cmd("AUTH XOAUTH2").await.starts_with('+'));
    c.send_raw(format!("{token}\t\r\r\n").as_bytes()).await;
    let reply = c.line().await;
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    assert_eq!(store.lines().len(), before, "{:?}", store.lines());
    pg.shutdown();
}

// === Finding 7: placeholders typed by a client are not expanded ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn placeholders_typed_by_a_client_reach_the_store_as_typed() {
    let store = ScriptedStore::start(Script::default()).await;
    let yaml = config(
        "",
        &tenant(
            "org",
            "example.org",
            store.addr,
            "    backend_username: {template: \"{local}!{domain}!{login}\"}\n",
        ),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    let reply = login_from(addr, "127.0.0.1", "x{domain}y{login}@example.org", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(
        store.lines().contains(
            &"USER x{domain}y{login}!example.org!x{domain}y{login}@example.org\r\n".to_string()
        ),
        "{:?}",
        store.lines()
    );
    pg.shutdown();
}

// === Finding 8: hosted domains cannot be told from unknown ones ===

/// Tenants `open` (plaintext allowed; also bound to the listener `open-only`) and `strict` (TLS required)
/// on a store that takes 300 ms to refuse a password, as one checking a real password database does.
async fn two_tenants_on_a_slow_store() -> (popgate::Running, ScriptedStore) {
    let slow = ScriptedStore::start(Script {
        credentials: Arc::new(|_| "-ERR [AUTH] Authentication failed.\r\n".into()),
        credentials_delay: Duration::from_millis(300),
        ..Script::default()
    })
    .await;
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\n  - name: open-only\n    \
         bind: 127.0.0.1:0\n    tls: none\n    tenant: open\ntenants:\n{}{}",
        tenant("open", "open.test", slow.addr, ""),
        tenant("strict", "strict.test", slow.addr, "")
            .replace("plaintext_login: allow", "plaintext_login: require_tls"),
    );
    (start(&yaml, Path::new(".")).await, slow)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_is_refused_alike_for_unknown_and_tls_only_domains() {
    let (pg, _slow) = two_tenants_on_a_slow_store().await;
    let addr = pg.local_addr("pop3").unwrap();
    // Plaintext: an unknown domain gets what a TLS-only tenant's domain gets.
    let strict = login_from(addr, "127.0.0.1", "bob@strict.test", "pw").await;
    let unknown = login_from(addr, "127.0.0.1", "bob@unknown.test", "pw").await;
    assert!(strict.starts_with("-ERR [AUTH] TLS required"), "{strict}");
    assert_eq!(unknown, strict);
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_domains_are_refused_as_slowly_as_a_store_refuses() {
    let (pg, _slow) = two_tenants_on_a_slow_store().await;
    // Where plaintext is allowed (a listener bound to the open tenant): a store's refusal takes 300 ms,
    // and an unknown domain's refusal then takes about as long.
    let addr = pg.local_addr("open-only").unwrap();
    let hosted = login_from(addr, "127.0.0.1", "bob@open.test", "pw").await;
    assert_eq!(hosted, AUTH_FAILED);
    for name in [
        "bob@unknown.test",
        "bob@strict.test",
        "bob@example.net@open.test",
    ] {
        let started = Instant::now();
        let reply = login_from(addr, "127.0.0.1", name, "pw").await;
        let took = started.elapsed();
        assert_eq!(reply, AUTH_FAILED, "{name}");
        assert!(
            took >= Duration::from_millis(220),
            "{name} was refused in {took:?}; a store takes 300 ms"
        );
    }
    pg.shutdown();
}

// === Finding 9: strangers cannot lock a mailbox out for its owner ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_lock_a_mailbox_out_for_its_owner() {
    let (_md, store) = maildrop(&[
        ("carol@example.com", "carol-pw"),
        ("dave@example.com", "dave-pw"),
    ])
    .await;
    let yaml = config(
        THROTTLE_ON_LOOPBACK,
        &tenant("acme", "example.com", store.local_addr(), ""),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();

    // The owner logs in from its usual address.
    let ok = login_from(addr, "127.0.0.1", "carol@example.com", "carol-pw").await;
    assert!(ok.starts_with("+OK"), "{ok}");
    // Strangers at three addresses guess: the mailbox is locked out.
    for (i, from) in ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
        .iter()
        .enumerate()
    {
        let reply = login_from(addr, from, "carol@example.com", &format!("guess{i}")).await;
        assert!(reply.starts_with("-ERR"), "{reply}");
    }
    let reply = login_from(addr, "127.0.0.14", "carol@example.com", "carol-pw").await;
    assert_eq!(reply, LOCKED_OUT, "a new address must meet the lock");
    // The owner's address still gets in with the right password.
    let ok = login_from(addr, "127.0.0.1", "carol@example.com", "carol-pw").await;
    assert!(ok.starts_with("+OK"), "{ok}");

    // A client polling with an old password: the same wrong password, over and over, counts once.
    for _ in 0..10 {
        let reply = login_from(addr, "127.0.0.21", "dave@example.com", "old-pw").await;
        assert_eq!(reply, AUTH_FAILED);
    }
    let ok = login_from(addr, "127.0.0.21", "dave@example.com", "dave-pw").await;
    assert!(ok.starts_with("+OK"), "{ok}");
    pg.shutdown();
}

// === Finding 13: QUIT then a close without close_notify is a quit ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_then_a_close_without_close_notify_counts_as_quit() {
    // The store answers QUIT and leaves closing to popgate, so the client's close is seen first.
    let store = ScriptedStore::start(Script {
        hold_after_quit: true,
        ..Script::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    support::pki::write_self_signed(dir.path(), "server", &["pop.example.com"]);
    // A short QUIT drain: this store never closes by itself.
    let yaml = format!(
        "listeners:\n  - name: pop3s\n    bind: 127.0.0.1:0\n    tls: implicit\n\
         tls:\n  certificate: server.crt\n  key: server.key\ntimeouts:\n  quit_drain: 1s\ntenants:\n{}",
        tenant("acme", "example.com", store.addr, "")
    );
    let pg = start(&yaml, dir.path()).await;
    let addr = pg.local_addr("pop3s").unwrap();
    for _ in 0..3 {
        let mut c = Pop3::connect_tls(addr, "pop.example.com").await;
        assert!(c.line().await.starts_with("+OK"));
        c.login("bob@example.com", "pw").await;
        c.ok("STAT").await;
        c.ok("QUIT").await;
        // Dropped without close_notify, as most clients do.
        drop(c);
    }
    let metrics = || String::from_utf8_lossy(&pg.runtime().context.metrics.render()).into_owned();
    let ended = |m: &str, outcome: &str| {
        m.lines()
            .filter(|l| {
                l.starts_with("popgate_sessions_total")
                    && l.contains(&format!("outcome=\"{outcome}\""))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let m = metrics();
        if ended(&m, "quit") + ended(&m, "client_error") >= 3.0 {
            assert_eq!(ended(&m, "quit"), 3.0, "{m}");
            assert_eq!(ended(&m, "client_error"), 0.0, "{m}");
            break;
        }
        assert!(Instant::now() < deadline, "sessions did not end:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    pg.shutdown();
}

// === Finding 14: auth_http refusals stay refusals; a store's temporary reply is not a failure ===

/// An auth_http service answering every request with `response`.
async fn auth_service(response: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.ends_with(b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = conn.write_all(response.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_http_refusals_with_control_bytes_are_refusals() {
    let service =
        auth_service("HTTP/1.0 200 OK\r\nAuth-Status: Invalid\x01 login\x1b[0m\r\n\r\n").await;
    let yaml = config(
        "",
        &tenant(
            "acme",
            "example.com",
            "127.0.0.1:9".parse().unwrap(),
            &format!("    auth_http: {{url: \"http://{service}/auth\"}}\n"),
        ),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let reply = login_from(
        pg.local_addr("pop3").unwrap(),
        "127.0.0.1",
        "bob@example.com",
        "pw",
    )
    .await;
    assert!(reply.starts_with("-ERR [AUTH] Invalid"), "{reply}");
    assert!(
        !reply.contains('\x1b') && !reply.contains('\x01'),
        "{reply:?}"
    );
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stores_temporary_reply_via_auth_http_is_not_a_failed_login() {
    let store = ScriptedStore::start(Script {
        credentials: Arc::new(|_| "-ERR [IN-USE] Mailbox locked by another session\r\n".into()),
        ..Script::default()
    })
    .await;
    let response: &'static str = Box::leak(
        format!(
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {}\r\n\r\n",
            store.addr.port()
        )
        .into_boxed_str(),
    );
    let service = auth_service(response).await;
    let yaml = config(
        &THROTTLE_ON_LOOPBACK.replace("lockout_after: 3", "lockout_after: 2"),
        &tenant(
            "acme",
            "example.com",
            store.addr,
            &format!("    auth_http: {{url: \"http://{service}/auth\"}}\n"),
        ),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    // Were these failed logins, the second would lock the mailbox and the address out.
    for _ in 0..4 {
        let reply = login_from(addr, "127.0.0.1", "bob@example.com", "pw").await;
        assert!(reply.starts_with("-ERR [IN-USE]"), "{reply}");
    }
    pg.shutdown();
}
