//! Integration: clients through popgate to in-repo maildrop stores. Behaviour and fault handling;
//! the real-Dovecot end-to-end tests live in `e2e_dovecot.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly instead of returning errors

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use maildrop::{Faults, Maildrop, Server, Settings};
use support::pop3::{Pop3, unstuff};
use tokio_util::sync::CancellationToken;

struct Harness {
    running: popgate::Running,
    com: Maildrop,
    com_server: Server,
    net: Maildrop,
    _net_server: Server,
    acme_cert: Vec<u8>,
    default_cert: Vec<u8>,
    _dir: tempfile::TempDir,
}

impl Harness {
    fn pop3(&self) -> SocketAddr {
        self.running.local_addr("pop3").expect("pop3 listener")
    }
    fn pop3s(&self) -> SocketAddr {
        self.running.local_addr("pop3s").expect("pop3s listener")
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.running.shutdown();
    }
}

fn messages(user: &str) -> Vec<Vec<u8>> {
    vec![
        format!("Subject: one for {user}\r\n\r\nfirst body\r\n").into_bytes(),
        format!("Subject: dots\r\n\r\n.leading dot\r\n..two dots\r\n.\r\nend {user}\r\n")
            .into_bytes(),
        {
            let mut big = b"Subject: big\r\n\r\n".to_vec();
            for i in 0..20_000 {
                big.extend_from_slice(
                    format!("line {i} of a larger message for {user}\r\n").as_bytes(),
                );
            }
            big
        },
    ]
}

/// A loopback port with nothing listening on it.
fn closed_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

async fn store(domain: &str, users: &[(&str, &str)]) -> (Maildrop, Server) {
    let md = Maildrop::new(Settings {
        hostname: format!("store.{domain}"),
        ..Settings::default()
    });
    for (u, p) in users {
        md.add_mailbox(u, p, messages(u));
    }
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

async fn harness_with(extra_limits: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let default_cert = support::pki::write_self_signed(dir.path(), "default", &["localhost"]);
    let acme_cert = support::pki::write_self_signed(dir.path(), "acme", &["pop.example.com"]);
    let (com, com_server) = store(
        "example.com",
        &[
            ("alice@example.com", "alice-pw"),
            ("dave@example.com", "dave-pw"),
        ],
    )
    .await;
    let (net, net_server) = store("example.net", &[("carol@example.net", "carol-pw")]).await;
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: starttls
  - name: pop3s
    bind: 127.0.0.1:0
    tls: implicit
tls:
  certificate: default.crt
  key: default.key
{extra_limits}
tenants:
  acme:
    domains: [example.com]
    backends: ["{}"]
    plaintext_login: allow
    tls:
      certificate: acme.crt
      key: acme.key
  globex:
    domains: [example.net]
    backends: ["{}"]
  dead:
    domains: [down.test]
    backends: ["127.0.0.1:{}"]
    plaintext_login: allow
"#,
        com_server.local_addr(),
        net_server.local_addr(),
        closed_port()
    );
    let config = popgate::Config::from_yaml_str(&yaml, dir.path()).unwrap();
    let running = popgate::start(config, CancellationToken::new())
        .await
        .unwrap();
    Harness {
        running,
        com,
        com_server,
        net,
        _net_server: net_server,
        acme_cert,
        default_cert,
        _dir: dir,
    }
}

async fn harness() -> Harness {
    harness_with("").await
}

#[tokio::test]
async fn all_name_forms_retrieve_byte_identical_messages() {
    let h = harness().await;
    // What the store itself answers, read directly (one session at a time: the store locks the mailbox).
    async fn transcript(c: &mut Pop3) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for n in 1..=3 {
            out.push(c.multiline(&format!("RETR {n}")).await);
        }
        out.push(c.cmd("STAT").await.into_bytes());
        out.push(c.multiline("LIST").await);
        out.push(c.multiline("UIDL").await);
        out.push(c.multiline("TOP 2 1").await);
        out.push(c.cmd("LIST 2").await.into_bytes());
        c.ok("QUIT").await;
        out
    }
    let mut direct = Pop3::greeted(h.com_server.local_addr()).await;
    direct.login("alice@example.com", "alice-pw").await;
    let want = transcript(&mut direct).await;
    for (raw, stored) in want.iter().zip(messages("alice@example.com")) {
        assert_eq!(unstuff(raw), stored);
    }
    for login in [
        "alice@example.com",
        "alice+example.com",
        "alice%example.com",
    ] {
        let mut c = Pop3::greeted(h.pop3()).await;
        c.login(login, "alice-pw").await;
        assert_eq!(transcript(&mut c).await, want, "{login}");
    }
    // The second tenant, over STLS (it requires TLS).
    let mut c = Pop3::greeted(h.pop3()).await;
    c.starttls("localhost").await;
    c.login("carol%example.net", "carol-pw").await;
    assert_eq!(
        unstuff(&c.multiline("RETR 2").await),
        messages("carol@example.net")[1]
    );
    c.ok("QUIT").await;
}

#[tokio::test]
async fn dele_then_quit_deletes_but_dele_then_drop_does_not() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.login("dave@example.com", "dave-pw").await;
    c.ok("DELE 1").await;
    drop(c);
    // The store holds the mailbox lock until the proxied session is gone, so a successful new login proves
    // the old session ended; its DELE must not have been committed.
    let mut c = login_when_unlocked(&h, "dave@example.com", "dave-pw").await;
    assert!(
        c.ok("STAT").await.starts_with("+OK 3 "),
        "deletion committed without QUIT"
    );
    assert_eq!(h.com.messages("dave@example.com").unwrap().len(), 3);

    c.ok("DELE 1").await;
    c.ok("DELE 3").await;
    c.ok("QUIT").await;
    let left = h.com.messages("dave@example.com").unwrap();
    assert_eq!(left, vec![messages("dave@example.com")[1].clone()]);
}

async fn login_when_unlocked(h: &Harness, user: &str, pass: &str) -> Pop3 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut c = Pop3::greeted(h.pop3()).await;
        c.ok(&format!("USER {user}")).await;
        let r = c.cmd(&format!("PASS {pass}")).await;
        if r.starts_with("+OK") {
            return c;
        }
        assert!(r.contains("[IN-USE]"), "unexpected: {r}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "mailbox stayed locked"
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn client_quit_then_vanish_still_commits() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.login("dave@example.com", "dave-pw").await;
    c.ok("DELE 2").await;
    c.send("QUIT").await;
    drop(c);
    let mut c = login_when_unlocked(&h, "dave@example.com", "dave-pw").await;
    assert!(c.ok("STAT").await.starts_with("+OK 2 "));
    c.ok("QUIT").await;
}

#[tokio::test]
async fn wrong_password_passes_store_error_and_retry_works() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.ok("USER alice@example.com").await;
    let r = c.cmd("PASS wrong").await;
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
    c.login("alice@example.com", "alice-pw").await;
    assert!(c.ok("STAT").await.starts_with("+OK 3"));
    c.ok("QUIT").await;
}

#[tokio::test]
async fn unknown_domain_is_refused_like_a_wrong_password() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    assert_eq!(c.cmd("USER x@nowhere.invalid").await, "+OK");
    let r = c.cmd("PASS whatever").await;
    assert!(r.starts_with("-ERR [AUTH]"), "{r}");
}

#[tokio::test]
async fn stls_discards_pipelined_commands_and_then_logs_in() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    let capa = c.multiline("CAPA").await;
    assert!(String::from_utf8_lossy(&capa).contains("STLS\r\n"));
    // STARTTLS injection: commands after STLS in the same packet must not be executed after the handshake.
    c.send_raw(b"STLS\r\nUSER alice@example.com\r\nPASS alice-pw\r\n")
        .await;
    let r = c.line().await;
    assert!(r.starts_with("+OK"), "{r}");
    let mut c = upgrade(c).await;
    let capa = String::from_utf8_lossy(&c.multiline("CAPA").await).to_string();
    assert!(!capa.contains("STLS") && capa.contains("USER"), "{capa}");
    // If the injected USER had been kept, PASS alone would log in; it must say USER first.
    let r = c.cmd("PASS alice-pw").await;
    assert!(r.starts_with("-ERR"), "injected USER survived STLS: {r}");
    c.login("alice@example.com", "alice-pw").await;
    c.ok("QUIT").await;
}

async fn upgrade(mut c: Pop3) -> Pop3 {
    c.starttls_after_ok("localhost").await;
    c
}

#[tokio::test]
async fn second_stls_is_refused() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.starttls("localhost").await;
    assert!(c.cmd("STLS").await.starts_with("-ERR"));
    let mut s = Pop3::connect_tls(h.pop3s(), "localhost").await;
    assert!(s.line().await.starts_with("+OK"));
    assert!(s.cmd("STLS").await.starts_with("-ERR"));
}

#[tokio::test]
async fn implicit_tls_picks_certificate_by_sni() {
    let h = harness().await;
    let mut c = Pop3::connect_tls(h.pop3s(), "pop.example.com").await;
    assert_eq!(c.peer_cert.as_deref(), Some(h.acme_cert.as_slice()));
    assert!(c.line().await.starts_with("+OK"));
    c.login("alice@example.com", "alice-pw").await;
    c.ok("QUIT").await;

    let mut c = Pop3::connect_tls(h.pop3s(), "localhost").await;
    assert_eq!(c.peer_cert.as_deref(), Some(h.default_cert.as_slice()));
    assert!(c.line().await.starts_with("+OK"));
    c.login("carol@example.net", "carol-pw").await;
    c.ok("QUIT").await;

    // SNI bound the connection to acme: another tenant's user is refused there.
    let mut c = Pop3::connect_tls(h.pop3s(), "pop.example.com").await;
    assert!(c.line().await.starts_with("+OK"));
    c.ok("USER carol@example.net").await;
    assert!(c.cmd("PASS carol-pw").await.starts_with("-ERR [AUTH]"));
}

#[tokio::test]
async fn long_lines_nul_and_transaction_commands_get_err() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    let long = format!("USER {}", "a".repeat(300));
    let r = c.cmd(&long).await;
    assert!(r.starts_with("-ERR"), "{r}");
    assert!(c.cmd("STAT").await.starts_with("-ERR"));
    c.send_raw(b"US\0ER a\r\n").await;
    assert!(c.line().await.starts_with("-ERR"));
    c.send_raw(b"USER \xff\xfe\r\n").await;
    assert!(c.line().await.starts_with("-ERR"));
    // Still usable afterwards.
    c.login("alice@example.com", "alice-pw").await;
    c.ok("QUIT").await;
}

#[tokio::test]
async fn plaintext_login_refused_before_stls_where_tenant_requires_tls() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.ok("USER carol@example.net").await;
    let r = c.cmd("PASS carol-pw").await;
    assert!(r.starts_with("-ERR [AUTH] TLS required"), "{r}");
    c.starttls("localhost").await;
    c.login("carol@example.net", "carol-pw").await;
    c.ok("QUIT").await;
}

#[tokio::test]
async fn store_down_gives_sys_temp() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.ok("USER someone@down.test").await;
    let r = c.cmd("PASS pw").await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    // The connection stays usable.
    c.login("alice@example.com", "alice-pw").await;
    c.ok("QUIT").await;
}

#[tokio::test]
async fn commands_pipelined_behind_login_reach_the_store_in_order() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.send_raw(b"USER alice@example.com\r\nPASS alice-pw\r\nSTAT\r\nLIST 1\r\nQUIT\r\n")
        .await;
    assert_eq!(c.line().await, "+OK");
    assert!(c.line().await.starts_with("+OK"), "PASS");
    assert!(c.line().await.starts_with("+OK 3 "), "STAT");
    assert!(c.line().await.starts_with("+OK 1 "), "LIST 1");
    assert!(c.line().await.starts_with("+OK"), "QUIT");
    assert!(c.until_eof().await.is_empty());
}

#[tokio::test]
async fn auth_plain_and_login_route_and_log_in() {
    use popgate::protocol::sasl::encode_b64;
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.ok(&format!(
        "AUTH PLAIN {}",
        encode_b64(b"\0alice+example.com\0alice-pw")
    ))
    .await;
    assert!(c.ok("STAT").await.starts_with("+OK 3"));
    c.ok("QUIT").await;

    let mut c = Pop3::greeted(h.pop3()).await;
    assert!(c.cmd("AUTH LOGIN").await.starts_with("+ "));
    assert!(
        c.cmd(&encode_b64(b"alice@example.com"))
            .await
            .starts_with("+ ")
    );
    c.ok(&encode_b64(b"alice-pw")).await;
    c.ok("QUIT").await;

    let mut c = Pop3::greeted(h.pop3()).await;
    assert!(c.cmd("AUTH PLAIN").await.starts_with("+ "));
    assert!(c.cmd("*").await.starts_with("-ERR"));
    let bad = encode_b64(b"\0alice@example.com\0alice-pw\r\nDELE 1");
    assert!(
        c.cmd(&format!("AUTH PLAIN {bad}"))
            .await
            .starts_with("-ERR [AUTH]")
    );
}

#[tokio::test]
async fn store_refusing_logins_and_dying_mid_retr() {
    let h = harness().await;
    h.net.set_faults(Faults {
        refuse_logins: true,
        ..Faults::default()
    });
    let mut c = Pop3::greeted(h.pop3()).await;
    c.starttls("localhost").await;
    c.ok("USER carol@example.net").await;
    let r = c.cmd("PASS carol-pw").await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");

    h.com.set_faults(Faults {
        drop_mid_retr_after: Some(1000),
        ..Faults::default()
    });
    let mut c = Pop3::greeted(h.pop3()).await;
    c.login("alice@example.com", "alice-pw").await;
    c.ok("DELE 1").await;
    c.send("RETR 3").await;
    let got = c.until_eof().await;
    assert!(
        got.len() < messages("alice@example.com")[2].len(),
        "the store died, yet the whole message came"
    );
    h.com.set_faults(Faults::default());
    assert_eq!(
        h.com.messages("alice@example.com").unwrap().len(),
        3,
        "mail lost"
    );
}

#[tokio::test]
async fn pre_login_timeout_closes_with_err() {
    let h = harness_with("timeouts:\n  pre_login: 1s\n").await;
    let mut c = Pop3::greeted(h.pop3()).await;
    c.send_raw(b"US").await;
    let rest = String::from_utf8_lossy(&c.until_eof().await).to_string();
    assert!(rest.starts_with("-ERR"), "{rest:?}");
}

#[tokio::test]
async fn too_many_bad_commands_close_the_connection() {
    let h = harness().await;
    let mut c = Pop3::greeted(h.pop3()).await;
    for _ in 0..9 {
        assert!(c.cmd("NOOP").await.starts_with("-ERR"));
    }
    c.send("NOOP").await;
    let rest = String::from_utf8_lossy(&c.until_eof().await).to_string();
    assert!(rest.contains("Too many bad commands"), "{rest}");
}
