//! End to end with real software: two real Dovecot stores as the stores of two tenants, popgate in
//! front, and real clients (curl, Python's poplib) through it. What a client gets through popgate must
//! be byte-identical to what the same client gets from Dovecot directly.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::clients::{PopClient, PopMode, PopStep, curl_pop3, curl_retr, pop3_url, pop3s_url};
use support::dovecot::{DovecotStore, StoreOptions, pop3_retr_bytes};
use support::pop3::Pop3;
use support::popgate::Popgate;

const ALICE_1: &[u8] = b"From: bob@example.com\nTo: alice@example.com\nSubject: first\n\n\
Hello Alice.\n.leading dot\n..two dots\n.\nend\n";
const ALICE_2: &[u8] = b"Subject: second\r\nMIME-Version: 1.0\r\n\
Content-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\nsee attachment\r\n\
--b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\nAAECAwQFBgcICQ==\r\n--b--\r\n";
const ALICE_3: &[u8] = b"Subject: third\r\n\r\nno newline at the end";
const CAROL_1: &[u8] = b"Subject: for carol\n\nhi carol\n";
const CAROL_2: &[u8] = b"Subject: carol two\n\n.\n..\n";

fn start_popgate(com: &DovecotStore, net: &DovecotStore) -> Popgate {
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: starttls
  - name: pop3s
    bind: 127.0.0.1:0
    tls: implicit
tenants:
  com:
    domains: [example.com]
    backends: ["{}"]
    plaintext_login: allow
  net:
    domains: [example.net]
    backends: ["{}"]
"#,
        com.pop3_addr(),
        net.pop3_addr()
    );
    Popgate::start(&yaml, std::path::Path::new("."))
}

trait Listeners {
    fn pop3(&self) -> SocketAddr;
    fn pop3s(&self) -> SocketAddr;
}

impl Listeners for Popgate {
    fn pop3(&self) -> SocketAddr {
        self.addr("pop3")
    }
    fn pop3s(&self) -> SocketAddr {
        self.addr("pop3s")
    }
}

fn stores() -> (DovecotStore, DovecotStore) {
    let com = DovecotStore::start(
        StoreOptions::new()
            .user(
                "alice@example.com",
                "alice-secret",
                [ALICE_1, ALICE_2, ALICE_3],
            )
            .user(
                "dave@example.com",
                "dave-secret",
                [ALICE_1, ALICE_2, ALICE_3],
            ),
    );
    let net = DovecotStore::start(StoreOptions::new().user(
        "carol@example.net",
        "carol-secret",
        [CAROL_1, CAROL_2],
    ));
    (com, net)
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn curl_through_popgate_matches_dovecot_byte_for_byte() {
    let (com, net) = stores();
    let pg = start_popgate(&com, &net);
    for (n, stored) in [(1, ALICE_1), (2, ALICE_2), (3, ALICE_3)] {
        let direct = curl_retr(
            &pop3_url(com.pop3_addr(), &n.to_string()),
            "alice@example.com",
            "alice-secret",
            &[],
        );
        assert_eq!(direct, pop3_retr_bytes(stored));
        for login in [
            "alice@example.com",
            "alice+example.com",
            "alice%example.com",
        ] {
            let path = n.to_string();
            let plain = curl_retr(&pop3_url(pg.pop3(), &path), login, "alice-secret", &[]);
            assert_eq!(plain, direct, "plain, {login}, message {n}");
            let stls = curl_retr(
                &pop3_url(pg.pop3(), &path),
                login,
                "alice-secret",
                &["--ssl-reqd", "-k"],
            );
            assert_eq!(stls, direct, "STLS, {login}, message {n}");
            let implicit = curl_retr(
                &pop3s_url(pg.pop3s(), &path),
                login,
                "alice-secret",
                &["-k"],
            );
            assert_eq!(implicit, direct, "pop3s, {login}, message {n}");
        }
    }
    // AUTH LOGIN through popgate; the listing (no message number) matches too.
    let list_direct = curl_retr(
        &pop3_url(com.pop3_addr(), ""),
        "alice@example.com",
        "alice-secret",
        &[],
    );
    let list = curl_retr(
        &pop3_url(pg.pop3(), ""),
        "alice@example.com",
        "alice-secret",
        &["--login-options", "AUTH=LOGIN"],
    );
    assert_eq!(list, list_direct);

    // The other tenant requires TLS: plaintext is refused, STLS and pop3s work.
    let refused = curl_pop3(
        &pop3_url(pg.pop3(), "1"),
        "carol@example.net",
        "carol-secret",
        &[],
    );
    assert_ne!(
        refused.code,
        Some(0),
        "plaintext login to a require_tls tenant succeeded"
    );
    let direct = curl_retr(
        &pop3_url(net.pop3_addr(), "2"),
        "carol@example.net",
        "carol-secret",
        &[],
    );
    let stls = curl_retr(
        &pop3_url(pg.pop3(), "2"),
        "carol%example.net",
        "carol-secret",
        &["--ssl-reqd", "-k"],
    );
    assert_eq!(stls, direct);
    let implicit = curl_retr(
        &pop3s_url(pg.pop3s(), "2"),
        "carol+example.net",
        "carol-secret",
        &["-k"],
    );
    assert_eq!(implicit, direct);

    // Wrong password: curl is refused (login denied), and Dovecot logged popgate's attempt.
    let denied = curl_pop3(&pop3_url(pg.pop3(), "1"), "alice@example.com", "wrong", &[]);
    assert_eq!(denied.code, Some(67), "{}", denied.stderr);
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn poplib_through_popgate_sees_what_dovecot_serves() {
    let (com, net) = stores();
    let pg = start_popgate(&com, &net);
    let steps = [
        PopStep::Stat,
        PopStep::List,
        PopStep::Uidl,
        PopStep::Retr(1),
        PopStep::Retr(2),
        PopStep::Top(2, 1),
        PopStep::Raw("LIST 3".into()),
        PopStep::Noop,
    ];
    let mut with_login = vec![PopStep::login("alice@example.com", "alice-secret")];
    with_login.extend_from_slice(&steps);
    let direct = PopClient::new(com.pop3_addr(), PopMode::Plain).run(&with_login);
    direct.assert_all_ok();
    assert_eq!(direct.reply(4).body(), pop3_retr_bytes(ALICE_1));
    for (addr, mode) in [
        (pg.pop3(), PopMode::Plain),
        (pg.pop3(), PopMode::Stls),
        (pg.pop3s(), PopMode::Implicit),
    ] {
        for login in [
            "alice@example.com",
            "alice+example.com",
            "alice%example.com",
        ] {
            let mut script = vec![PopStep::login(login, "alice-secret")];
            script.extend_from_slice(&steps);
            let t = PopClient::new(addr, mode).sni("localhost").run(&script);
            t.assert_all_ok();
            // Everything after the login is the store's own answer, relayed unchanged.
            assert_eq!(t.replies[1..], direct.replies[1..], "{mode:?} {login}");
        }
    }
    // Carol over STLS (her tenant requires TLS).
    let t = PopClient::new(pg.pop3(), PopMode::Stls)
        .sni("localhost")
        .run(&[
            PopStep::login("carol@example.net", "carol-secret"),
            PopStep::Retr(2),
        ]);
    t.assert_all_ok();
    assert_eq!(t.reply(1).body(), pop3_retr_bytes(CAROL_2));
    let t = PopClient::new(pg.pop3(), PopMode::Plain)
        .run(&[PopStep::login("carol@example.net", "carol-secret")]);
    assert!(
        t.reply(0).status.starts_with("-ERR [AUTH] TLS required"),
        "{t}"
    );
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn dovecot_deletes_only_on_the_clients_quit() {
    let (com, net) = stores();
    let pg = start_popgate(&com, &net);
    assert_eq!(com.maildir_message_count("dave@example.com"), 3);

    // DELE, then the client vanishes: Dovecot sees the connection close (not a QUIT) and deletes nothing
    // (its summary line counts deleted messages: del=0 of 3; `top=` marks a logged-in session's line, unlike
    // the pre-login lines of pooled connections and health probes).
    pg.rt.block_on(async {
        let mut c = Pop3::greeted(pg.pop3()).await;
        c.login("dave@example.com", "dave-secret").await;
        c.ok("DELE 1").await;
        c.ok("DELE 2").await;
    });
    let log = com.wait_for_log("Connection closed top=", Duration::from_secs(15));
    assert!(log.contains("del=0/3"), "{log}");
    assert_eq!(
        com.maildir_message_count("dave@example.com"),
        3,
        "mail deleted without QUIT"
    );

    // DELE then QUIT through popgate: Dovecot deletes before it answers the QUIT.
    pg.rt.block_on(async {
        let mut c = Pop3::greeted(pg.pop3()).await;
        c.login("dave+example.com", "dave-secret").await;
        c.ok("DELE 1").await;
        c.ok("QUIT").await;
    });
    assert_eq!(com.maildir_message_count("dave@example.com"), 2);

    // A wrong password shows Dovecot's own -ERR line; the same connection then logs in.
    pg.rt.block_on(async {
        let mut c = Pop3::greeted(pg.pop3()).await;
        c.ok("USER dave@example.com").await;
        let r = c.cmd("PASS nope").await;
        assert!(r.starts_with("-ERR [AUTH]"), "{r}");
        c.login("dave@example.com", "dave-secret").await;
        assert!(c.ok("STAT").await.starts_with("+OK 2 "));
        c.ok("QUIT").await;
    });
}
