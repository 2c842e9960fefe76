//! Attacks replayed against popgate: each sends the bytes an adversarial or fault-injection pass found
//! a weakness with, and pins what must hold instead. A new finding gets its test here, named for what
//! must hold. (Admin HTTP findings are in tests/admin_http.rs, admin attacks that held up at the end of
//! this file; SNI overlaps and templates are refused at config load, tested in src/config/tests.rs and
//! src/router/tests.rs.)
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use maildrop::{Maildrop, Server, Settings};
use support::auth_service::Service;
use support::pop3::Pop3;
use support::popgate::{plain_config as config, start};
use support::store::{Script, ScriptedStore};
use tokio::net::TcpStream;

const LOCKED_OUT: &str = "-ERR [AUTH] Too many failed logins; try again later";
const AUTH_FAILED: &str = "-ERR [AUTH] Authentication failed.";

fn b64(raw: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(raw)
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

/// Edge defences that act on loopback (which is trusted by default), with no delays to wait out and no
/// connection-rate limit, so a test can hammer from 127.0.0.x.
const THROTTLE_ON_LOOPBACK: &str = "throttle:\n  trusted_networks: []\n  failed_login_delay: 0s\n  \
     lockout_after: 3\n  connection_burst: 0\n";

/// A tenant as `support::popgate::tenant` makes it, with no health probes either (so store connections
/// are the logins' own).
fn tenant(name: &str, domain: &str, store: SocketAddr, extra: &str) -> String {
    let extra = format!("    health: {{enabled: false}}\n{extra}");
    support::popgate::tenant(name, domain, store, &extra)
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
        store.logins().is_empty() && !store.lines().iter().any(|l| l.contains("user150")),
        "a smuggled name reached the store: {:?}",
        store.lines()
    );
    // A plain subaddress still logs in as typed.
    let reply = login_from(addr, "127.0.0.1", "user150+news@example.info", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    assert_eq!(store.logins(), ["user150+news"], "{:?}", store.lines());
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
    assert_eq!(
        store.logins(),
        ["x{domain}y{login}!example.org!x{domain}y{login}@example.org"],
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_http_refusals_with_control_bytes_are_refusals() {
    let service = Service::start(|_| {
        Some("HTTP/1.0 200 OK\r\nAuth-Status: Invalid\x01 login\x1b[0m\r\n\r\n".into())
    })
    .await;
    let yaml = config(
        "",
        &tenant(
            "acme",
            "example.com",
            "127.0.0.1:9".parse().unwrap(),
            &format!("    auth_http: {{url: \"{}\"}}\n", service.url()),
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
    let response = format!(
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {}\r\n\r\n",
        store.addr.port()
    );
    let service = Service::start(move |_| Some(response.clone())).await;
    let yaml = config(
        &THROTTLE_ON_LOOPBACK.replace("lockout_after: 3", "lockout_after: 2"),
        &tenant(
            "acme",
            "example.com",
            store.addr,
            &format!("    auth_http: {{url: \"{}\"}}\n", service.url()),
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

// === Held up: attacks that failed, kept failing ===
//
// A review replayed these and popgate withstood them; each test below keeps one group failing. Groups it
// listed that were already pinned stay where they are: STLS with USER queued, a second STLS, STLS on POP3S
// (proxy_maildrop.rs: stls_discards_pipelined_commands_and_then_logs_in, second_stls_is_refused);
// slowloris (faults.rs: slowloris_is_closed_at_the_pre_login_timeout_while_others_log_in); MiB command
// lines (faults.rs: megabyte_lines_without_crlf_are_refused_without_being_buffered); the admin token
// matrix (admin_http.rs: writes_need_a_header_a_web_page_cannot_send; ops.rs:
// admin_token_file_rotates_on_reload); DELE then a FIN, a reset, a kick or a drain (faults.rs:
// vanishing_clients_delete_only_what_they_quit_with; proxy_maildrop.rs:
// dele_then_quit_deletes_but_dele_then_drop_does_not; ops.rs: kick_closes_a_mailboxs_sessions_without_quit,
// drain_refuses_new_work_lets_relays_finish_then_closes_without_quit).

/// Sends each line (CRLF added), reading a reply to each; returns the first `-ERR`, or the reply to the
/// last line.
async fn attempt(c: &mut Pop3, lines: &[Vec<u8>]) -> String {
    let mut reply = String::new();
    for (i, line) in lines.iter().enumerate() {
        let mut raw = line.clone();
        raw.extend_from_slice(b"\r\n");
        c.send_raw(&raw).await;
        reply = c.line().await;
        if i + 1 < lines.len() && reply.starts_with("-ERR") {
            break;
        }
    }
    reply
}

/// `attempt` on a fresh plain connection to `addr`.
async fn attempt_fresh(addr: SocketAddr, lines: &[Vec<u8>]) -> String {
    let mut c = Pop3::greeted(addr).await;
    attempt(&mut c, lines).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_bytes_and_bad_utf8_in_credentials_never_reach_a_store() {
    let store = ScriptedStore::start(Script::default()).await;
    let apop_store = ScriptedStore::start(Script::default()).await;
    // APOP goes to the store unchecked only through passthrough (a listener bound to a one-store tenant),
    // so that is where an APOP name must be judged.
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\n  - name: apop\n    \
         bind: 127.0.0.1:0\n    tls: none\n    tenant: mtview\ntenants:\n{}{}",
        tenant("acme", "example.com", store.addr, ""),
        tenant("mtview", "mtview.test", apop_store.addr, "")
            + "    mechanisms: [user, apop]\n    apop_passthrough: {max_pending: 64, max_pending_per_ip: 64}\n",
    );
    let pg = start(&yaml, Path::new(".")).await;
    let (addr, apop_addr) = (
        pg.local_addr("pop3").unwrap(),
        pg.local_addr("apop").unwrap(),
    );
    let digest = "c4c9334bac560ecc979e58001b3e22fb";
    let apop = |name: &[u8]| {
        let mut line = b"APOP ".to_vec();
        line.extend_from_slice(name);
        line.extend_from_slice(format!(" {digest}").as_bytes());
        line
    };
    let line = |s: &[u8]| s.to_vec();
    let plain = |raw: &[u8]| format!("AUTH PLAIN {}", b64(raw)).into_bytes();
    let plain_fields: [&[u8]; 10] = [
        // NUL: a fourth field.
        b"\0alice@example.com\0alice-pw\0",
        b"ad\rmin\0alice@example.com\0alice-pw",
        b"ad\nmin\0alice@example.com\0alice-pw",
        b"\0ali\rce@example.com\0alice-pw",
        b"\0ali\nce@example.com\0alice-pw",
        b"\0alice@example.com\0alice-pw\r\nDELE 1",
        b"\0alice@example.com\0alice\npw",
        // Not UTF-8: the authcid, the authzid.
        b"\0\xffalice@example.com\0alice-pw",
        b"\0al\xc3\x28ice@example.com\0alice-pw",
        b"\xff\0alice@example.com\0alice-pw",
    ];
    let mut attacks: Vec<Vec<Vec<u8>>> = vec![
        // USER and PASS with NUL or CR inside (an LF would just end the line).
        vec![line(b"USER ali\0ce@example.com"), line(b"PASS alice-pw")],
        vec![line(b"USER alice\r@example.com"), line(b"PASS alice-pw")],
        vec![line(b"USER alice@example.com"), line(b"PASS alice\0pw")],
        vec![line(b"USER alice@example.com"), line(b"PASS alice\rpw")],
        // Not UTF-8; not ASCII before UTF8.
        vec![line(b"USER \xff\xfe@example.com"), line(b"PASS alice-pw")],
        vec![
            line(b"USER al\xc3\x28ice@example.com"),
            line(b"PASS alice-pw"),
        ],
        vec![
            line("USER j\u{f6}rg@example.com".as_bytes()),
            line(b"PASS pw"),
        ],
        // AUTH LOGIN: the user name and the password.
        vec![
            line(b"AUTH LOGIN"),
            b64(b"ali\0ce@example.com").into_bytes(),
            b64(b"alice-pw").into_bytes(),
        ],
        vec![
            line(b"AUTH LOGIN"),
            b64(b"alice@example.com\r\nDELE 1").into_bytes(),
            b64(b"alice-pw").into_bytes(),
        ],
        vec![
            line(b"AUTH LOGIN"),
            b64(b"\xffalice@example.com").into_bytes(),
            b64(b"alice-pw").into_bytes(),
        ],
        vec![
            line(b"AUTH LOGIN"),
            b64(b"alice@example.com").into_bytes(),
            b64(b"alice\0pw").into_bytes(),
        ],
        vec![
            line(b"AUTH LOGIN"),
            b64(b"alice@example.com").into_bytes(),
            b64(b"alice-pw\r\nDELE 1").into_bytes(),
        ],
    ];
    for fields in plain_fields {
        // With an initial response, and as the continuation of a bare AUTH PLAIN.
        attacks.push(vec![plain(fields)]);
        attacks.push(vec![line(b"AUTH PLAIN"), b64(fields).into_bytes()]);
    }
    let apop_attacks = [
        apop(b"ali\0ce@mtview.test"),
        apop(b"alice\r@mtview.test"),
        apop(b"\xffalice@mtview.test"),
        apop(b"al\xc3\x28ice@mtview.test"),
        apop("j\u{f6}rg@mtview.test".as_bytes()),
    ];
    let shown = |lines: &[Vec<u8>]| -> Vec<String> {
        lines
            .iter()
            .map(|l| String::from_utf8_lossy(l).into_owned())
            .collect()
    };
    for lines in &attacks {
        let reply = attempt_fresh(addr, lines).await;
        assert!(reply.starts_with("-ERR"), "{:?} -> {reply}", shown(lines));
    }
    for line in &apop_attacks {
        let mut c = Pop3::greeted(apop_addr).await;
        let reply = attempt(&mut c, std::slice::from_ref(line)).await;
        assert!(
            reply.starts_with("-ERR"),
            "{:?} -> {reply}",
            shown(std::slice::from_ref(line))
        );
    }
    assert_eq!(
        store.accepted(),
        0,
        "a refused credential reached the store: {:?}",
        store.lines()
    );
    assert!(
        !apop_store.lines().iter().any(|l| l.starts_with("APOP")),
        "a refused APOP reached the store: {:?}",
        apop_store.lines()
    );

    // The same logins done right reach the stores: the refusals above were the bytes'.
    for lines in [
        vec![line(b"USER alice@example.com"), line(b"PASS alice-pw")],
        vec![plain(b"\0alice@example.com\0alice-pw")],
        vec![
            line(b"AUTH PLAIN"),
            b64(b"\0alice@example.com\0alice-pw").into_bytes(),
        ],
        vec![
            line(b"AUTH LOGIN"),
            b64(b"alice@example.com").into_bytes(),
            b64(b"alice-pw").into_bytes(),
        ],
        vec![
            line(b"UTF8"),
            line("USER j\u{f6}rg@example.com".as_bytes()),
            line(b"PASS pw"),
        ],
    ] {
        let reply = attempt_fresh(addr, &lines).await;
        assert!(reply.starts_with("+OK"), "{:?} -> {reply}", shown(&lines));
    }
    assert_eq!(store.accepted(), 5, "{:?}", store.lines());
    for (lines, sent) in [
        (vec![apop(b"alice@mtview.test")], "alice@mtview.test"),
        (
            vec![line(b"UTF8"), apop("j\u{f6}rg@mtview.test".as_bytes())],
            "j\u{f6}rg@mtview.test",
        ),
    ] {
        let mut c = Pop3::greeted(apop_addr).await;
        let reply = attempt(&mut c, &lines).await;
        assert!(reply.starts_with("+OK"), "{:?} -> {reply}", shown(&lines));
        let want = format!("APOP {sent} {digest}\r\n");
        assert!(
            apop_store.lines().contains(&want),
            "{:?}",
            apop_store.lines()
        );
    }
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn look_alike_domain_forms_reach_their_own_tenant() {
    let com = ScriptedStore::start(Script::default()).await;
    let net = ScriptedStore::start(Script::default()).await;
    let yaml = config(
        "",
        &(tenant("com", "example.com", com.addr, "") + &tenant("net", "example.net", net.addr, "")),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    let forms = [
        // Fullwidth letters.
        "bob@\u{ff45}\u{ff58}\u{ff41}\u{ff4d}\u{ff50}\u{ff4c}\u{ff45}.com",
        "bob@\u{ff25}\u{ff38}\u{ff21}\u{ff2d}\u{ff30}\u{ff2c}\u{ff25}.\u{ff23}\u{ff2f}\u{ff2d}",
        // A soft hyphen, which IDNA ignores.
        "bob@exam\u{ad}ple.com",
        // The ideographic full stop as a label separator.
        "bob@example\u{3002}com",
        // A trailing dot, and case.
        "bob@example.com.",
        "bob@EXAMPLE.CoM",
    ];
    for login in forms {
        let mut c = Pop3::greeted(addr).await;
        c.ok("UTF8").await;
        c.ok(&format!("USER {login}")).await;
        let reply = c.cmd("PASS pw").await;
        assert!(reply.starts_with("+OK"), "{login}: {reply}");
        c.ok("QUIT").await;
    }
    assert_eq!(
        com.logins(),
        vec!["bob@example.com".to_string(); forms.len()]
    );
    assert_eq!(net.accepted(), 0, "{:?}", net.lines());
    // And the other tenant's fullwidth form reaches the other store.
    let mut c = Pop3::greeted(addr).await;
    c.ok("UTF8").await;
    c.login("bob@example.\u{ff4e}\u{ff45}\u{ff54}", "pw").await;
    c.ok("QUIT").await;
    assert_eq!(net.logins(), ["bob@example.net"], "{:?}", net.lines());
    pg.shutdown();
}

/// A self-signed certificate for `pop.example.com` in `dir`, and the YAML naming it.
fn server_tls(dir: &Path) -> &'static str {
    support::pki::write_self_signed(dir, "server", &["pop.example.com"]);
    "tls:\n  certificate: server.crt\n  key: server.key\n"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_behind_stls_are_never_answered() {
    let store = ScriptedStore::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: starttls\n{}tenants:\n{}",
        server_tls(dir.path()),
        tenant("acme", "example.com", store.addr, "")
    );
    let pg = start(&yaml, dir.path()).await;
    let addr = pg.local_addr("pop3").unwrap();
    for queued in [
        &b"CAPA\r\n"[..],
        b"CAPA\r\nNOOP\r\n",
        b"USER bob@example.com\r\n",
    ] {
        let mut c = Pop3::greeted(addr).await;
        let mut packet = b"STLS\r\n".to_vec();
        packet.extend_from_slice(queued);
        c.send_raw(&packet).await;
        let reply = c.line().await;
        assert!(reply.starts_with("+OK"), "{reply}");
        // Panics if anything came after the +OK in plaintext.
        c.starttls_after_ok("pop.example.com").await;
        // Over TLS, the first thing popgate says answers the first thing said over TLS.
        c.send("QUIT").await;
        let rest = c.until_eof().await;
        assert_eq!(
            String::from_utf8_lossy(&rest),
            "+OK popgate signing off\r\n",
            "queued {:?} was answered after the handshake",
            String::from_utf8_lossy(queued)
        );
    }
    assert_eq!(store.accepted(), 0, "{:?}", store.lines());
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downgrades_on_a_tls_only_tenant_never_reach_its_store() {
    let open = ScriptedStore::start(Script::default()).await;
    let strict = ScriptedStore::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // `pop3` reaches both tenants (so plaintext is possible there); `strict` is bound to the TLS-only one.
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: starttls\n  - name: strict\n    \
         bind: 127.0.0.1:0\n    tls: starttls\n    tenant: strict\n{}tenants:\n{}{}",
        server_tls(dir.path()),
        tenant("open", "open.test", open.addr, ""),
        tenant("strict", "strict.test", strict.addr, "")
            .replace("plaintext_login: allow", "plaintext_login: require_tls"),
    );
    let pg = start(&yaml, dir.path()).await;
    let user = "bob@strict.test";
    let logins: Vec<Vec<Vec<u8>>> = vec![
        vec![format!("USER {user}").into_bytes(), b"PASS pw".to_vec()],
        vec![format!("AUTH PLAIN {}", b64(format!("\0{user}\0pw").as_bytes())).into_bytes()],
        vec![
            b"AUTH PLAIN".to_vec(),
            b64(format!("\0{user}\0pw").as_bytes()).into_bytes(),
        ],
        vec![
            b"AUTH LOGIN".to_vec(),
            b64(user.as_bytes()).into_bytes(),
            b64(b"pw").into_bytes(),
        ],
    ];
    for listener in ["pop3", "strict"] {
        let addr = pg.local_addr(listener).unwrap();
        for lines in &logins {
            let reply = attempt_fresh(addr, lines).await;
            assert!(
                reply.starts_with("-ERR [AUTH] TLS required"),
                "{listener}: {:?} -> {reply}",
                String::from_utf8_lossy(&lines[0])
            );
        }
    }
    assert_eq!(strict.accepted(), 0, "{:?}", strict.lines());
    // After STLS each of them logs in.
    for listener in ["pop3", "strict"] {
        let addr = pg.local_addr(listener).unwrap();
        for lines in &logins {
            let mut c = Pop3::greeted(addr).await;
            c.starttls("pop.example.com").await;
            let reply = attempt(&mut c, lines).await;
            assert!(reply.starts_with("+OK"), "{listener}: {reply}");
        }
    }
    assert_eq!(strict.accepted(), 2 * logins.len());
    assert_eq!(open.accepted(), 0);
    pg.shutdown();
}

/// A ClientHello record offering `legacy` as its version and, when given, a supported_versions extension;
/// ECDHE-ECDSA suites (the test certificate's key is ECDSA) and the extensions a TLS 1.2 server needs.
fn client_hello(legacy: [u8; 2], supported_versions: Option<&[[u8; 2]]>) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, kind: u16, data: &[u8]) {
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&u16::try_from(data.len()).unwrap().to_be_bytes());
        out.extend_from_slice(data);
    }
    let mut exts = Vec::new();
    ext(&mut exts, 0x000a, &[0, 4, 0x00, 0x1d, 0x00, 0x17]); // groups: x25519, secp256r1
    ext(&mut exts, 0x000b, &[1, 0]); // EC point formats: uncompressed
    ext(&mut exts, 0x000d, &[0, 4, 0x04, 0x03, 0x08, 0x04]); // ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256
    if let Some(versions) = supported_versions {
        let mut data = vec![u8::try_from(2 * versions.len()).unwrap()];
        data.extend(versions.iter().flatten());
        ext(&mut exts, 0x002b, &data);
    }
    let mut body = legacy.to_vec();
    body.extend_from_slice(&[7u8; 32]); // random
    body.push(0); // no session id
    let suites = [0xc0, 0x2b, 0xc0, 0x2c, 0xc0, 0x09, 0xc0, 0x0a]; // ECDHE-ECDSA, GCM and CBC
    body.extend_from_slice(&u16::try_from(suites.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&suites);
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&u16::try_from(exts.len()).unwrap().to_be_bytes());
    body.extend_from_slice(&exts);
    let mut handshake = vec![1]; // ClientHello
    handshake.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&u16::try_from(handshake.len()).unwrap().to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_1_0_and_1_1_client_hellos_are_refused() {
    let store = ScriptedStore::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = format!(
        "listeners:\n  - name: pop3s\n    bind: 127.0.0.1:0\n    tls: implicit\n  - name: pop3\n    \
         bind: 127.0.0.1:0\n    tls: starttls\n{}tenants:\n{}",
        server_tls(dir.path()),
        tenant("acme", "example.com", store.addr, "")
    );
    let pg = start(&yaml, dir.path()).await;
    let (tls10, tls11, tls12) = ([3, 1], [3, 2], [3, 3]);
    // The first record popgate answers `hello` with, on POP3S and after STLS.
    let (pop3s, pop3) = (
        pg.local_addr("pop3s").unwrap(),
        pg.local_addr("pop3").unwrap(),
    );
    let answer = move |hello: Vec<u8>| async move {
        let mut answers = Vec::new();
        for stls in [false, true] {
            let mut c = if stls {
                let mut c = Pop3::greeted(pop3).await;
                assert!(c.cmd("STLS").await.starts_with("+OK"));
                c
            } else {
                Pop3::connect(pop3s).await
            };
            c.send_raw(&hello).await;
            answers.push(c.take_bytes(7).await);
        }
        answers
    };
    // What a client limited to TLS 1.0 or 1.1 sends (OpenSSL's -tls1 / -tls1_1: no supported_versions),
    // and a client listing only those versions there: a fatal protocol_version alert (21, ..., 2, 70).
    for (what, hello) in [
        ("TLS 1.0", client_hello(tls10, None)),
        ("TLS 1.1", client_hello(tls11, None)),
        (
            "TLS 1.0-1.1 listed",
            client_hello(tls12, Some(&[tls11, tls10])),
        ),
    ] {
        for got in answer(hello).await {
            assert!(
                got[0] == 0x15 && got[5] == 2 && got[6] == 70,
                "{what}: not a protocol_version alert: {got:02x?}"
            );
        }
    }
    // The same hello offering TLS 1.2 gets a ServerHello (handshake record, message type 2).
    for got in answer(client_hello(tls12, None)).await {
        assert!(got[0] == 0x16 && got[5] == 2, "TLS 1.2: {got:02x?}");
    }
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_tls_handshakes_are_closed_at_the_handshake_timeout() {
    const HANDSHAKE: Duration = Duration::from_secs(1);
    let store = ScriptedStore::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // pre_login is long: a close near one second is the handshake timeout's.
    let yaml = format!(
        "listeners:\n  - name: pop3s\n    bind: 127.0.0.1:0\n    tls: implicit\n  - name: pop3\n    \
         bind: 127.0.0.1:0\n    tls: starttls\n{}timeouts:\n  tls_handshake: 1s\n  pre_login: 60s\ntenants:\n{}",
        server_tls(dir.path()),
        tenant("acme", "example.com", store.addr, "")
    );
    let pg = start(&yaml, dir.path()).await;
    let (pop3s, pop3) = (
        pg.local_addr("pop3s").unwrap(),
        pg.local_addr("pop3").unwrap(),
    );
    let hello = client_hello([3, 3], None);
    let mut stalls = tokio::task::JoinSet::new();
    for (what, listener, sent) in [
        ("POP3S, nothing sent", pop3s, Vec::new()),
        (
            "POP3S, half a ClientHello",
            pop3s,
            hello[..hello.len() / 2].to_vec(),
        ),
        ("STLS, nothing sent", pop3, Vec::new()),
        (
            "STLS, half a ClientHello",
            pop3,
            hello[..hello.len() / 2].to_vec(),
        ),
    ] {
        stalls.spawn(async move {
            let mut c = if listener == pop3 {
                let mut c = Pop3::greeted(listener).await;
                assert!(c.cmd("STLS").await.starts_with("+OK"));
                c
            } else {
                Pop3::connect(listener).await
            };
            let started = Instant::now();
            c.send_raw(&sent).await;
            let rest = c.until_eof().await;
            (what, started.elapsed(), rest)
        });
    }
    while let Some(done) = stalls.join_next().await {
        let (what, took, rest) = done.unwrap();
        assert!(
            took + Duration::from_millis(100) >= HANDSHAKE && took < HANDSHAKE * 8,
            "{what}: closed after {took:?}; tls_handshake is {HANDSHAKE:?}"
        );
        assert!(
            !rest.starts_with(b"+OK") && !rest.starts_with(b"\x16"),
            "{what}: {rest:02x?}"
        );
    }
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlong_auth_lines_are_refused_before_they_end() {
    let store = ScriptedStore::start(Script::default()).await;
    let yaml = config("", &tenant("acme", "example.com", store.addr, ""));
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    let mib = vec![b'A'; 1 << 20];
    // A MiB without LF: as an AUTH line with its initial response, as a PLAIN continuation, as a LOGIN
    // user name and password. The -ERR comes while the line has not ended, so it was not held whole.
    let mut c = Pop3::greeted(addr).await;
    for lead in [
        &[][..],
        b"AUTH PLAIN",
        b"AUTH LOGIN",
        b"AUTH LOGIN\r\nYm9iQGV4YW1wbGUuY29t",
    ] {
        let mut steps = 0;
        if !lead.is_empty() {
            let mut raw = lead.to_vec();
            raw.extend_from_slice(b"\r\n");
            c.send_raw(&raw).await;
            for _ in 0..raw.windows(2).filter(|w| w == b"\r\n").count() {
                assert!(c.line().await.starts_with("+ "), "{lead:?}");
                steps += 1;
            }
        }
        let prefix: &[u8] = if steps == 0 { b"AUTH PLAIN " } else { b"" };
        c.send_raw(prefix).await;
        c.send_raw(&mib).await;
        let reply = c.line().await;
        assert_eq!(reply, "-ERR Line too long", "after {lead:?}");
        // The line ends; the session is in the AUTHORIZATION state again, still usable.
        c.send_raw(b"\r\n").await;
        assert!(c.multiline("CAPA").await.ends_with(b".\r\n"));
    }
    c.ok("QUIT").await;
    pg.shutdown();
    // Just under the bound, without an end: no answer, and the connection goes at pre_login.
    let yaml = config(
        "timeouts:\n  pre_login: 1s\n",
        &tenant("acme", "example.com", store.addr, ""),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let mut c = Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
    c.send_raw(b"AUTH PLAIN ").await;
    c.send_raw(&mib[..popgate::protocol::MAX_SASL_LINE - 100])
        .await;
    let rest = String::from_utf8_lossy(&c.until_eof().await).into_owned();
    assert_eq!(rest, "-ERR Login timeout, closing\r\n");
    assert_eq!(store.accepted(), 0, "{:?}", store.lines());
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_proxy_headers_get_no_greeting() {
    let store = ScriptedStore::start(Script::default()).await;
    // The header wait is long: a close now is a refusal, not a timeout.
    let yaml = format!(
        "listeners:\n  - name: lb\n    bind: 127.0.0.1:0\n    tls: none\n    \
         proxy_protocol: {{trusted_networks: [\"127.0.0.0/8\"]}}\ntimeouts:\n  tls_handshake: 60s\n  \
         pre_login: 60s\ntenants:\n{}",
        tenant("acme", "example.com", store.addr, "")
    );
    let pg = start(&yaml, Path::new(".")).await;
    let lb = pg.local_addr("lb").unwrap();
    let client: SocketAddr = "192.0.2.7:40000".parse().unwrap();
    let v2 = popgate::proxy_protocol::encode(2, client, lb);
    let with = |at: usize, byte: u8| {
        let mut h = v2.clone();
        h[at] = byte;
        h
    };
    let mut long_v1 = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110 ".to_vec();
    long_v1.resize(300, b'9');
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("POP3 instead", b"USER bob@example.com\r\n".to_vec()),
        (
            "HTTP instead",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        ),
        ("v1 garbage", b"PROXY TCP4 1.2.3.4 nonsense\r\n".to_vec()),
        (
            "v1 bad address",
            b"PROXY TCP4 999.0.0.1 127.0.0.1 40000 110\r\n".to_vec(),
        ),
        (
            "v1 bad port",
            b"PROXY TCP4 192.0.2.7 127.0.0.1 99999 110\r\n".to_vec(),
        ),
        (
            "v1 family mismatch",
            b"PROXY TCP6 192.0.2.7 127.0.0.1 40000 110\r\n".to_vec(),
        ),
        (
            "v1 lone LF",
            b"PROXY UNKNOWN \nUSER bob@example.com\r\n".to_vec(),
        ),
        ("v1 over 107 octets", long_v1),
        ("v2 version 1", with(12, 0x11)),
        ("v2 unknown command", with(12, 0x2f)),
        ("v2 length 65535", {
            let mut h = with(14, 0xff);
            h[15] = 0xff;
            h
        }),
    ];
    for (what, bytes) in &cases {
        let mut c = Pop3::connect(lb).await;
        c.send_raw(bytes).await;
        let got = c.until_eof().await;
        assert!(
            got.is_empty(),
            "{what}: {:?}",
            String::from_utf8_lossy(&got)
        );
    }
    // A well-formed header gets the greeting.
    for version in [1, 2] {
        let mut c = Pop3::connect(lb).await;
        c.send_raw(&popgate::proxy_protocol::encode(version, client, lb))
            .await;
        assert!(c.line().await.starts_with("+OK"), "v{version}");
    }
    assert_eq!(store.accepted(), 0);
    pg.shutdown();
}

/// Waits until the store lets `user` log in again (the proxied session ended and released the mailbox
/// lock), then returns STAT's answer, straight from the store.
async fn stat_once_unlocked(store: SocketAddr, user: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Pop3::greeted(store).await;
        c.ok(&format!("USER {user}")).await;
        let reply = c.cmd("PASS pw").await;
        if reply.starts_with("+OK") {
            let stat = c.ok("STAT").await;
            c.ok("QUIT").await;
            return stat;
        }
        assert!(reply.contains("[IN-USE]"), "{user}: {reply}");
        assert!(
            Instant::now() < deadline,
            "{user}: the mailbox stayed locked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dele_then_vanishing_without_quit_deletes_nothing() {
    let users = [
        "half-close@example.com",
        "qu-reset@example.com",
        "quit-no-lf@example.com",
        "quit-cr-reset@example.com",
        "idle@example.com",
        "quit@example.com",
    ];
    let (md, store) = maildrop(&users.map(|u| (u, "pw"))).await;
    let acme = tenant("acme", "example.com", store.local_addr(), "");
    let pg = start(&config("", &acme), Path::new(".")).await;
    let idle = start(&config("timeouts:\n  idle: 1s\n", &acme), Path::new(".")).await;
    let logged_in = |addr: SocketAddr, user: &'static str| async move {
        let tcp = TcpStream::connect(addr).await.unwrap();
        // A second handle on the socket, to half-close it while the client still reads.
        let std = tcp.into_std().unwrap();
        let handle = std.try_clone().unwrap();
        let mut c = Pop3::from_tcp(TcpStream::from_std(std).unwrap());
        assert!(c.line().await.starts_with("+OK"));
        c.login(user, "pw").await;
        c.ok("DELE 1").await;
        (c, handle)
    };
    let addr = pg.local_addr("pop3").unwrap();

    // Half-close: FIN sent, still reading. popgate closes its side without a QUIT to the store.
    let (mut c, handle) = logged_in(addr, users[0]).await;
    handle.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(c.until_eof().await.is_empty());
    // Half a QUIT, then a reset. (The second handle is closed first, so the socket really goes.)
    let (mut c, handle) = logged_in(addr, users[1]).await;
    drop(handle);
    c.send_raw(b"QU").await;
    c.abort();
    // QUIT without its line end, then a FIN; QUIT and a lone CR, then a reset.
    let (mut c, handle) = logged_in(addr, users[2]).await;
    drop(handle);
    c.send_raw(b"QUIT").await;
    drop(c);
    let (mut c, handle) = logged_in(addr, users[3]).await;
    drop(handle);
    c.send_raw(b"QUIT\r").await;
    c.abort();
    // Silent past the idle timeout: closed by popgate.
    let (mut c, handle) = logged_in(idle.local_addr("pop3").unwrap(), users[4]).await;
    drop(handle);
    assert!(c.until_eof().await.is_empty());

    for user in &users[..5] {
        let stat = stat_once_unlocked(store.local_addr(), user).await;
        assert!(
            stat.starts_with("+OK 1 "),
            "{user}: deleted without QUIT ({stat})"
        );
        assert_eq!(md.messages(user).unwrap().len(), 1, "{user}");
    }
    // With the QUIT, the same DELE deletes: the check above sees deletions.
    let (mut c, handle) = logged_in(addr, users[5]).await;
    drop(handle);
    c.ok("QUIT").await;
    let stat = stat_once_unlocked(store.local_addr(), users[5]).await;
    assert!(stat.starts_with("+OK 0 "), "{stat}");
    pg.shutdown();
    idle.shutdown();
}
