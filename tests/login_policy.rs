//! Login policy at the edge: UTF-8 login names (RFC 6856) to real Dovecot and to a store that offers
//! UTF8, per-tenant case rules, the minimum interval between logins (`[LOGIN-DELAY]`), the per-tenant
//! session cap, a master-user login to real Dovecot, and the edge defences (brute force slowed and locked
//! out per address while other clients keep their latency). Edge limits changed by a reload are in
//! reload.rs; the security findings' replays in attacks.rs.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use maildrop::{Maildrop, Server, Settings};
use support::clients::{PopClient, PopMode, PopStep};
use support::dovecot::{DovecotStore, StoreOptions};
use support::pop3::Pop3;
use support::popgate::{Popgate, plain_config as config, start, tenant};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

fn message(subject: &str) -> Vec<u8> {
    format!("From: a@example.org\r\nSubject: {subject}\r\n\r\nbody of {subject}\r\n").into_bytes()
}

async fn maildrop(users: &[(&str, &str)]) -> (Maildrop, Server) {
    let md = Maildrop::new(Settings::default());
    for (user, pass) in users {
        md.add_mailbox(user, pass, vec![message("one"), message("two")]);
    }
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

/// USER/PASS on a fresh connection; the PASS reply.
async fn login_reply(addr: SocketAddr, user: &str, pass: &str) -> (Pop3, String) {
    let mut c = Pop3::greeted(addr).await;
    assert!(c.cmd(&format!("USER {user}")).await.starts_with("+OK"));
    let reply = c.cmd(&format!("PASS {pass}")).await;
    (c, reply)
}

// === UTF-8 login names ===

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn utf8_login_names_reach_dovecot_after_the_utf8_command() {
    let user = "jörg@example.com";
    // Dovecot allows only ASCII name characters unless told otherwise: an empty list allows all.
    let store = DovecotStore::start(
        StoreOptions::new()
            .user(user, "pässwort", [message("für jörg")])
            .extra_config("auth_username_chars ="),
    );
    let yaml = config("", &tenant("acme", "example.com", store.pop3_addr(), ""));
    let pg = Popgate::start(&yaml, Path::new("."));
    let client = PopClient::new(pg.addr("pop3"), PopMode::Plain);

    // Without UTF8 first, popgate refuses the name itself; after it, Dovecot logs the user in.
    let t = client.run(&[
        PopStep::Capa,
        PopStep::login(user, "pässwort"),
        PopStep::Utf8,
        PopStep::login(user, "pässwort"),
        PopStep::Stat,
        PopStep::Retr(1),
    ]);
    assert!(
        t.reply(0).text_lines().iter().any(|l| l == "UTF8"),
        "CAPA lacks UTF8:\n{t}"
    );
    let refused = &t.reply(1);
    assert!(
        !refused.ok && refused.status.starts_with("-ERR [AUTH]") && refused.status.contains("UTF8"),
        "{t}"
    );
    assert!(t.reply(2).ok, "{t}");
    assert!(t.reply(3).ok, "{t}\n{}", store.log_text());
    assert_eq!(t.reply(4).stat_counts().0, 1, "{t}");
    assert!(
        String::from_utf8_lossy(&t.reply(5).body()).contains("body of für jörg"),
        "{t}"
    );
    assert!(t.quit.as_ref().is_some_and(|q| q.ok), "{t}");
    // Dovecot saw the UTF-8 name itself.
    store.wait_for_log(
        "user=<jörg@example.com>",
        std::time::Duration::from_secs(10),
    );
}

/// Every line each connection to a scripted store sent, a list per connection.
type Seen = Arc<Mutex<Vec<Vec<String>>>>;

/// The recorded connections that logged in (sent USER): health probes and idle pooled ones left out.
fn store_logins(seen: &Seen) -> Vec<Vec<String>> {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|s| s.iter().any(|l| l.starts_with("USER ")))
        .cloned()
        .collect()
}

/// A scripted store that offers UTF8 and records every line each connection sent.
async fn utf8_store() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let record = record.clone();
            tokio::spawn(async move {
                let index = {
                    let mut all = record.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                let (rd, mut wr) = tcp.into_split();
                let mut lines = BufReader::new(rd).lines();
                wr.write_all(b"+OK scripted store\r\n").await.unwrap();
                while let Ok(Some(line)) = lines.next_line().await {
                    record.lock().unwrap()[index].push(line.clone());
                    let verb = line.split(' ').next().unwrap_or("").to_ascii_uppercase();
                    let reply: &[u8] = match verb.as_str() {
                        "CAPA" => b"+OK\r\nUSER\r\nUTF8\r\nPIPELINING\r\n.\r\n",
                        "STAT" => b"+OK 0 0\r\n",
                        "QUIT" => {
                            let _ = wr.write_all(b"+OK bye\r\n").await;
                            return;
                        }
                        _ => b"+OK\r\n",
                    };
                    if wr.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn utf8_mode_is_asked_of_a_store_that_offers_it_and_only_for_utf8_clients() {
    let (store, seen) = utf8_store().await;
    let pg = start(
        &config("", &tenant("acme", "example.com", store, "")),
        Path::new("."),
    )
    .await;
    let addr = pg.local_addr("pop3").unwrap();

    let mut c = Pop3::greeted(addr).await;
    assert_eq!(c.cmd("UTF8").await, "+OK UTF8 enabled");
    c.ok("USER zoë@example.com").await;
    c.ok("PASS pw").await;
    c.ok("STAT").await;
    c.ok("QUIT").await;

    let (mut plain, reply) = login_reply(addr, "zoe@example.com", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    plain.ok("STAT").await;
    plain.ok("QUIT").await;
    pg.shutdown();

    let sessions = store_logins(&seen);
    let of = |name: &str| {
        sessions
            .iter()
            .find(|s| s.iter().any(|l| l == &format!("USER {name}")))
            .unwrap_or_else(|| panic!("no store session for {name}: {sessions:?}"))
            .clone()
    };
    let utf8 = of("zoë@example.com");
    let at = |s: &[String], verb: &str| s.iter().position(|l| l == verb);
    let (u, user) = (at(&utf8, "UTF8"), at(&utf8, "USER zoë@example.com"));
    assert!(
        u.is_some() && u < user,
        "UTF8 was not sent before USER: {utf8:?}"
    );
    let ascii = of("zoe@example.com");
    assert!(
        at(&ascii, "UTF8").is_none(),
        "UTF8 sent for a client that did not ask: {ascii:?}"
    );
}

/// A store's CAPA answer is remembered (health probes refresh it): logins after the first do not ask
/// again, and still act on what it said (UTF8 sent before USER for a UTF8 client).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_capabilities_are_remembered_not_asked_per_login() {
    let (store, seen) = utf8_store().await;
    let pg = start(
        &config("", &tenant("acme", "example.com", store, "")),
        Path::new("."),
    )
    .await;
    let addr = pg.local_addr("pop3").unwrap();
    for n in 0..4 {
        let (mut c, reply) = login_reply(addr, &format!("u{n}@example.com"), "pw").await;
        assert!(reply.starts_with("+OK"), "{reply}");
        c.ok("QUIT").await;
    }
    let mut c = Pop3::greeted(addr).await;
    assert_eq!(c.cmd("UTF8").await, "+OK UTF8 enabled");
    c.ok("USER zoë@example.com").await;
    c.ok("PASS pw").await;
    c.ok("QUIT").await;
    pg.shutdown();

    let logins = store_logins(&seen);
    assert_eq!(logins.len(), 5, "{logins:?}");
    let asked = logins
        .iter()
        .filter(|s| s.iter().any(|l| l == "CAPA"))
        .count();
    assert!(
        asked <= 1,
        "{asked} of 5 store logins asked CAPA: {logins:?}"
    );
    let utf8 = logins
        .iter()
        .find(|s| s.iter().any(|l| l == "USER zoë@example.com"))
        .unwrap();
    assert_eq!(
        utf8.iter().position(|l| l == "UTF8"),
        Some(0),
        "UTF8 was not the first command: {utf8:?}"
    );
}

// === case rules ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_rules_decide_what_the_store_sees_and_what_counts_as_one_mailbox() {
    let (_md, store) = maildrop(&[("john@lower.test", "pw"), ("John@exact.test", "pw")]).await;
    let yaml = config(
        "throttle:\n  max_sessions_per_mailbox: 1\n",
        &[
            tenant(
                "lower",
                "lower.test",
                store.local_addr(),
                "    login_case: lower\n",
            ),
            tenant(
                "exact",
                "exact.test",
                store.local_addr(),
                "    login_case: sensitive\n",
            ),
        ]
        .concat(),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    // `lower`: the store (whose user is lowercase) gets `john` whatever the client typed, and
    // `JOHN` and `john` are one mailbox for the per-mailbox cap.
    let (_held, reply) = login_reply(addr, "JOHN@lower.test", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    let (_c, reply) = login_reply(addr, "john@LOWER.test", "pw").await;
    assert!(reply.starts_with("-ERR [IN-USE]"), "{reply}");
    // `sensitive`: the store gets the name as typed, so only the exact case exists there.
    let (_held2, reply) = login_reply(addr, "John@exact.test", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    let (_c, reply) = login_reply(addr, "john@exact.test", "pw").await;
    assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    pg.shutdown();
}

// === LOGIN-DELAY ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_login_within_the_interval_gets_login_delay_and_commits_nothing() {
    let (md, store) = maildrop(&[("alice@example.com", "pw"), ("bob@example.com", "pw")]).await;
    let pg = start(
        &config(
            "",
            &tenant(
                "acme",
                "example.com",
                store.local_addr(),
                "    min_login_interval: 1h\n",
            ),
        ),
        Path::new("."),
    )
    .await;
    let addr = pg.local_addr("pop3").unwrap();

    let mut c = Pop3::greeted(addr).await;
    let capa = String::from_utf8(c.multiline("CAPA").await).unwrap();
    assert!(capa.contains("LOGIN-DELAY 3600\r\n"), "{capa}");
    c.login("alice@example.com", "pw").await;
    c.ok("DELE 1").await;
    c.ok("QUIT").await;
    assert_eq!(md.messages("alice@example.com").unwrap().len(), 1);

    // Within the hour: the right password gets [LOGIN-DELAY] (after the store accepted it, so the
    // code says nothing to someone without the password), a wrong one plain [AUTH].
    let (mut again, reply) = login_reply(addr, "alice@example.com", "pw").await;
    assert!(reply.starts_with("-ERR [LOGIN-DELAY]"), "{reply}");
    let wrong = again.cmd("USER alice@example.com").await;
    assert!(wrong.starts_with("+OK"));
    let wrong = again.cmd("PASS nope").await;
    assert!(wrong.starts_with("-ERR [AUTH]"), "{wrong}");
    // The refused session reached the store but sent no QUIT: alice's message 2 is still there.
    assert_eq!(md.messages("alice@example.com").unwrap().len(), 1);
    // Another mailbox is not held back.
    let (_bob, reply) = login_reply(addr, "bob@example.com", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    let text = String::from_utf8(pg.runtime().context.metrics.render()).unwrap();
    assert!(
        text.contains("popgate_throttled_total{reason=\"login_delay\",tenant=\"acme\"} 1"),
        "{text}"
    );
    pg.shutdown();
}

// === per-tenant session cap ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_at_its_session_cap_answers_sys_temp_while_others_log_in() {
    let (_md, store) = maildrop(&[
        ("a@small.test", "pw"),
        ("b@small.test", "pw"),
        ("c@small.test", "pw"),
        ("d@big.test", "pw"),
    ])
    .await;
    let yaml = config(
        "",
        &[
            tenant(
                "small",
                "small.test",
                store.local_addr(),
                "    max_sessions: 2\n",
            ),
            tenant("big", "big.test", store.local_addr(), ""),
        ]
        .concat(),
    );
    let pg = start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    let (mut first, r1) = login_reply(addr, "a@small.test", "pw").await;
    let (_second, r2) = login_reply(addr, "b@small.test", "pw").await;
    assert!(
        r1.starts_with("+OK") && r2.starts_with("+OK"),
        "{r1} / {r2}"
    );
    let (mut third, r3) = login_reply(addr, "c@small.test", "pw").await;
    assert!(r3.starts_with("-ERR [SYS/TEMP]"), "{r3}");
    let (_other, r4) = login_reply(addr, "d@big.test", "pw").await;
    assert!(r4.starts_with("+OK"), "{r4}");
    // A session ends: its slot is free for the client that was refused (same connection).
    first.ok("QUIT").await;
    assert!(first.until_eof().await.is_empty());
    third.ok("USER c@small.test").await;
    let again = third.cmd("PASS pw").await;
    assert!(again.starts_with("+OK"), "{again}");
    pg.shutdown();
}

// === master user to real Dovecot ===

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn master_user_login_to_dovecot_after_popgate_checked_the_client() {
    let masters = tempfile::tempdir().unwrap();
    std::fs::write(
        masters.path().join("master-users"),
        "popgate:master-secret\n",
    )
    .unwrap();
    // Dovecot's own password for alice is one the client never knows: only the master login works.
    let store = DovecotStore::start(
        StoreOptions::new()
            .user("alice@example.com", "only-the-store-knows", [message("hello")])
            .extra_config(&format!(
                "auth_master_user_separator = *\npassdb {{\n  driver = passwd-file\n  master = yes\n  \
                 args = scheme=PLAIN {}/master-users\n  pass = yes\n}}",
                masters.path().display()
            )),
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("secrets.yaml"),
        "alice@example.com: client-password\n",
    )
    .unwrap();
    let yaml = config(
        "",
        &tenant(
            "acme",
            "example.com",
            store.pop3_addr(),
            "    secrets: secrets.yaml\n    backend_login:\n      master:\n        user: popgate\n        \
             password: master-secret\n",
        ),
    );
    let pg = Popgate::start(&yaml, dir.path());
    let client = PopClient::new(pg.addr("pop3"), PopMode::Plain);
    let t = client.run(&[
        PopStep::login("alice@example.com", "client-password"),
        PopStep::Stat,
        PopStep::Retr(1),
    ]);
    t.assert_all_ok();
    assert_eq!(t.reply(1).stat_counts().0, 1);
    assert!(String::from_utf8_lossy(&t.reply(2).body()).contains("body of hello"));
    // Dovecot logged the master login for alice.
    store.wait_for_log(
        "Master user logging in as alice@example.com",
        std::time::Duration::from_secs(10),
    );

    // The wrong client password never reaches the store as a master login.
    let t = client.run(&[PopStep::login("alice@example.com", "only-the-store-knows")]);
    assert!(
        !t.reply(0).ok && t.reply(0).status.starts_with("-ERR [AUTH]"),
        "{t}"
    );
}

// === edge limits follow a reload ===

/// A maildrop with `victim@example.com` (password `right`) and `other@example.com` (password `pw`).
async fn victim_and_other() -> (Maildrop, Server) {
    let md = Maildrop::new(Settings::default());
    md.add_mailbox("victim@example.com", "right", vec![message("v")]);
    md.add_mailbox("other@example.com", "pw", vec![message("o")]);
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

// === Edge defences ===

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_throttled_and_locked_out_per_address_and_the_lockout_expires() {
    let (_md, server) = victim_and_other().await;
    let yaml = config(
        "throttle:\n  trusted_networks: []\n  failed_login_delay: 10ms\n  failed_login_max_delay: 40ms\n  \
         lockout_after: 20\n  lockout_for: 2s\n  connection_burst: 0\n  max_sessions_per_ip: 0\n\
         limits:\n  max_failed_logins: 200\n",
        &tenant("example", "example.com", server.local_addr(), ""),
    );
    let pg = support::popgate::start(&yaml, Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    let attacker: IpAddr = "127.0.0.1".parse().unwrap();
    let bystander: IpAddr = "127.0.0.2".parse().unwrap();

    // A bystander's login latency before the attack, as the baseline.
    let timed_login = |from: IpAddr| async move {
        let t = Instant::now();
        let mut c = Pop3::greeted_from(addr, from).await;
        c.login("other@example.com", "pw").await;
        c.ok("QUIT").await;
        t.elapsed()
    };
    let baseline = timed_login(bystander).await;

    let mut c = Pop3::greeted_from(addr, attacker).await;
    let mut answers = Vec::new();
    let started = Instant::now();
    for i in 0..100 {
        c.ok("USER victim@example.com").await;
        answers.push(c.cmd(&format!("PASS guess{i}")).await);
    }
    let attack_time = started.elapsed();
    let locked = answers
        .iter()
        .filter(|a| a.contains("Too many failed logins"))
        .count();
    assert!(answers[0].starts_with("-ERR [AUTH]"), "{:?}", answers[0]);
    assert!(locked >= 80, "lockout did not engage: {answers:?}");
    // The growing delay applied before the lockout (19 delayed failures of 10..40 ms).
    assert!(
        attack_time >= Duration::from_millis(19 * 10),
        "{attack_time:?}"
    );
    // Even the right password is refused while locked out.
    c.ok("USER victim@example.com").await;
    assert!(c.cmd("PASS right").await.contains("Too many failed logins"));

    // Another address, another mailbox: normal service, no added delay to speak of.
    let during = timed_login(bystander).await;
    assert!(
        during < baseline + Duration::from_millis(500),
        "bystander slowed: {during:?} vs {baseline:?}"
    );

    // The lockout expires.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Pop3::greeted_from(addr, attacker).await;
        c.ok("USER victim@example.com").await;
        if c.cmd("PASS right").await.starts_with("+OK") {
            c.ok("QUIT").await;
            break;
        }
        assert!(Instant::now() < deadline, "lockout never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    pg.shutdown();
}
