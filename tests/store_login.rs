//! How popgate logs in to a store.
//!
//! - A name and password (USER/PASS, AUTH PLAIN or AUTH LOGIN from the client) go to a store that offers
//!   SASL PLAIN as one `AUTH PLAIN` with an initial response: one round trip, where USER/PASS takes two.
//!   `backend_login: user_pass` keeps USER/PASS; a store without PLAIN gets USER/PASS; credentials too long
//!   for the 255-octet AUTH line (RFC 5034 §4) go after the store's empty challenge.
//! - To a store that offers PIPELINING, XCLIENT and USER may share a write, but the command carrying the
//!   credentials (PASS, AUTH) goes only after every earlier reply. Pipelined behind an unanswered command,
//!   its reply (sent after the store's credential lookup) waits for popgate's delayed ACK under the store's
//!   Nagle algorithm: 42 ms per login with Dovecot 2.3 on a fresh connection. The recording store below
//!   records what each of its reads returned, so the tests check the writes, not time.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use support::pop3::Pop3;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Per store connection, the text of each read, in order; [`CLOSED`] once popgate closed it.
type Reads = Arc<Mutex<Vec<Vec<String>>>>;

/// What the recording store records when popgate closes a connection.
const CLOSED: &str = "<closed by popgate>";

/// A store that greets with `[XCLIENT]`, offers PIPELINING and SASL PLAIN, accepts every command and
/// answers all the lines of one read in one write.
async fn recording_store() -> (SocketAddr, Reads) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reads: Reads = Arc::default();
    let record = reads.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let index = {
                    let mut all = record.lock().unwrap();
                    all.push(Vec::new());
                    all.len() - 1
                };
                if tcp
                    .write_all(b"+OK [XCLIENT] recording store\r\n")
                    .await
                    .is_err()
                {
                    return;
                }
                let mut buf = vec![0u8; 4096];
                let mut pending = String::new();
                loop {
                    let n = match tcp.read(&mut buf).await {
                        Ok(0) | Err(_) => {
                            record.lock().unwrap()[index].push(CLOSED.to_string());
                            return;
                        }
                        Ok(n) => n,
                    };
                    let chunk = String::from_utf8_lossy(&buf[..n]).into_owned();
                    record.lock().unwrap()[index].push(chunk.clone());
                    pending.push_str(&chunk);
                    let mut reply = Vec::new();
                    let mut quit = false;
                    while let Some(end) = pending.find("\r\n") {
                        let line: String = pending.drain(..end + 2).collect();
                        let verb = line
                            .split([' ', '\r'])
                            .next()
                            .unwrap_or("")
                            .to_ascii_uppercase();
                        reply.extend_from_slice(match verb.as_str() {
                            "CAPA" => {
                                b"+OK\r\nUSER\r\nSASL PLAIN\r\nPIPELINING\r\n.\r\n".as_slice()
                            }
                            // RFC 5034: AUTH without an initial response gets an empty challenge.
                            "AUTH" if line.trim_end().len() == "AUTH PLAIN".len() => b"+ \r\n",
                            "STAT" => b"+OK 0 0\r\n",
                            "QUIT" => {
                                quit = true;
                                b"+OK bye\r\n"
                            }
                            _ => b"+OK\r\n",
                        });
                    }
                    if tcp.write_all(&reply).await.is_err() || quit {
                        return;
                    }
                }
            });
        }
    });
    (addr, reads)
}

/// A recording store, and popgate in front of it with tenant `acme` (example.com, the default
/// `backend_login`) and tenant `legacy` (example.net, `backend_login: user_pass`), without a pool (each
/// login opens its own connection); popgate's plain listener.
async fn proxy() -> (popgate::Running, SocketAddr, Reads) {
    let (store, reads) = recording_store().await;
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\ntenants:\n  acme:\n    \
         domains: [example.com]\n    backends: [\"{store}\"]\n    plaintext_login: allow\n    \
         pool: {{min_idle: 0}}\n  legacy:\n    domains: [example.net]\n    backends: [\"{store}\"]\n    \
         plaintext_login: allow\n    pool: {{min_idle: 0}}\n    backend_login: user_pass\n"
    );
    let config = popgate::Config::from_yaml_str(&yaml, Path::new(".")).unwrap();
    let pg = popgate::start(config, CancellationToken::new())
        .await
        .unwrap();
    let addr = pg.local_addr("pop3").unwrap();
    (pg, addr, reads)
}

/// A recording store, and popgate in front of it with tenant `acme` (example.com) whose pool keeps
/// `idle` connections ready and sends XCLIENT at the client's USER (`pool.xclient_at_user`); returns once
/// the connections are ready.
async fn pooled_proxy(idle: usize) -> (popgate::Running, SocketAddr, Reads) {
    let (store, reads) = recording_store().await;
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\ntenants:\n  acme:\n    \
         domains: [example.com]\n    backends: [\"{store}\"]\n    plaintext_login: allow\n    \
         pool: {{min_idle: {idle}, xclient_at_user: true}}\n"
    );
    let config = popgate::Config::from_yaml_str(&yaml, Path::new(".")).unwrap();
    let pg = popgate::start(config, CancellationToken::new())
        .await
        .unwrap();
    support::popgate::eventually(Duration::from_secs(10), "the pool to fill", || {
        pg.stores()
            .iter()
            .flat_map(|(_, stores)| stores)
            .any(|s| s.pool_idle >= idle)
    })
    .await;
    let addr = pg.local_addr("pop3").unwrap();
    (pg, addr, reads)
}

/// The indexes of the store connections that have received an XCLIENT.
fn introduced(reads: &Reads) -> Vec<usize> {
    let reads = reads.lock().unwrap();
    (0..reads.len())
        .filter(|&i| reads[i].iter().any(|r| r.contains("XCLIENT ")))
        .collect()
}

/// A client greeted by popgate that has sent `USER alice@example.com`, and the store connection that
/// received the XCLIENT for it (waited for: the test fails if none comes).
async fn named_alice(addr: SocketAddr, reads: &Reads) -> (Pop3, usize) {
    let mut c = Pop3::greeted(addr).await;
    c.ok("USER alice@example.com").await;
    support::popgate::eventually(Duration::from_secs(5), "XCLIENT at USER", || {
        introduced(reads).len() == 1
    })
    .await;
    (c, introduced(reads)[0])
}

/// The lines one store connection received, in order, CRLF included.
fn lines_of(conn: &[String]) -> Vec<&str> {
    conn.iter()
        .flat_map(|r| r.split_inclusive("\r\n"))
        .collect()
}

fn b64(raw: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(raw)
}

/// One client session through popgate: USER/PASS, STAT, QUIT.
async fn session(addr: SocketAddr, user: &str, password: &str) {
    let mut c = Pop3::greeted(addr).await;
    c.login(user, password).await;
    c.ok("STAT").await;
    c.ok("QUIT").await;
}

/// The store connections that carried credentials (a PASS or an AUTH).
fn logins(reads: &Reads) -> Vec<Vec<String>> {
    reads
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.iter().any(|c| c.contains("PASS ") || c.contains("AUTH ")))
        .cloned()
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_password_login_is_one_auth_plain_where_the_store_offers_it() {
    let (pg, addr, reads) = proxy().await;

    // USER/PASS, AUTH PLAIN and AUTH LOGIN from the client, for the default tenant.
    session(addr, "alice@example.com", "secret-one").await;
    let mut c = Pop3::greeted(addr).await;
    let plain = b64(b"\0bob@example.com\0secret-two");
    assert!(
        c.cmd(&format!("AUTH PLAIN {plain}"))
            .await
            .starts_with("+OK")
    );
    c.ok("QUIT").await;
    let mut c = Pop3::greeted(addr).await;
    assert!(c.cmd("AUTH LOGIN").await.starts_with('+'));
    assert!(c.cmd(&b64(b"carol@example.com")).await.starts_with('+'));
    assert!(c.cmd(&b64(b"secret-three")).await.starts_with("+OK"));
    c.ok("QUIT").await;
    pg.shutdown();

    let logins = logins(&reads);
    let sent: Vec<String> = logins
        .iter()
        .map(|conn| {
            lines_of(conn)
                .into_iter()
                .filter(|l| !l.starts_with("XCLIENT ") && !l.starts_with("CAPA"))
                .take_while(|l| !l.starts_with("STAT") && !l.starts_with("QUIT"))
                .collect()
        })
        .collect();
    assert_eq!(
        sent,
        [
            format!("AUTH PLAIN {}\r\n", b64(b"\0alice@example.com\0secret-one")),
            format!("AUTH PLAIN {plain}\r\n"),
            format!(
                "AUTH PLAIN {}\r\n",
                b64(b"\0carol@example.com\0secret-three")
            ),
        ],
        "{logins:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_too_long_for_the_auth_line_go_after_the_challenge() {
    let (pg, addr, reads) = proxy().await;
    // 180 octets of password: the base64 of the PLAIN message alone is over 255 octets.
    let password = "p".repeat(180);
    let mut c = Pop3::greeted(addr).await;
    c.login("alice@example.com", &password).await;
    c.ok("QUIT").await;
    pg.shutdown();

    let logins = logins(&reads);
    assert_eq!(logins.len(), 1, "{logins:?}");
    let lines = lines_of(&logins[0]);
    let auth = lines.iter().position(|l| l.starts_with("AUTH")).unwrap();
    let message = b64(format!("\0alice@example.com\0{password}").as_bytes());
    assert_eq!(
        &lines[auth..auth + 2],
        ["AUTH PLAIN\r\n".to_string(), format!("{message}\r\n")],
        "{lines:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_go_only_after_every_earlier_reply() {
    let (pg, addr, reads) = proxy().await;

    // The default tenant: XCLIENT, then AUTH PLAIN.
    session(addr, "alice@example.com", "secret-one").await;
    // `backend_login: user_pass`: XCLIENT + USER to the store, then PASS.
    session(addr, "bob@example.net", "secret-two").await;
    pg.shutdown();

    let logins = logins(&reads);
    assert_eq!(logins.len(), 2, "two store logins: {logins:?}");
    for conn in &logins {
        // The read with the credentials holds that one command and nothing else.
        let credentials = conn
            .iter()
            .find(|c| c.contains("PASS ") || c.contains("AUTH "))
            .unwrap();
        assert_eq!(
            credentials.matches("\r\n").count(),
            1,
            "credentials pipelined behind another command: {conn:?}"
        );
        // XCLIENT still shares a write with what follows it when that is not the credentials.
        assert!(
            conn.iter().any(|c| c.starts_with("XCLIENT ")),
            "no XCLIENT: {conn:?}"
        );
    }
    let user_pass = logins
        .iter()
        .find(|c| c.iter().any(|r| r.contains("PASS ")))
        .unwrap();
    assert!(
        user_pass
            .iter()
            .any(|r| r.starts_with("XCLIENT ") && r.contains("\r\nUSER bob@example.net\r\n")),
        "XCLIENT and USER pipelined in one write: {user_pass:?}"
    );
    assert!(
        logins
            .iter()
            .any(|c| c.iter().any(|r| r.starts_with("AUTH PLAIN "))),
        "{logins:?}"
    );
}

/// A store that does not offer SASL PLAIN gets USER/PASS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_plain_gets_user_and_pass() {
    let store = support::store::ScriptedStore::start(support::store::Script {
        capa: vec!["USER".into(), "PIPELINING".into()],
        ..Default::default()
    })
    .await;
    let tenant = support::popgate::tenant("acme", "example.com", store.addr, "");
    let pg =
        support::popgate::start(&support::popgate::plain_config("", &tenant), Path::new(".")).await;
    let mut c = Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
    c.login("alice@example.com", "pw").await;
    c.ok("QUIT").await;
    pg.shutdown();
    let lines = store.lines();
    assert!(
        lines.contains(&"USER alice@example.com\r\n".to_string())
            && lines.contains(&"PASS pw\r\n".to_string())
            && !lines.iter().any(|l| l.starts_with("AUTH")),
        "{lines:?}"
    );
}

/// With `client_ip: xclient`, a store that does not offer XCLIENT to popgate is named in a warning once
/// (at the first connection, so at start when the pool pre-warms): it would see every client as popgate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_xclient_is_warned_about_once() {
    support::logs::captured_log();
    let (_md, store) = support::mailboxes::numbered(1, 1).await;
    let tenant = support::popgate::tenant(
        "acme",
        "example.com",
        store.local_addr(),
        "    client_ip: xclient\n",
    );
    let pg =
        support::popgate::start(&support::popgate::plain_config("", &tenant), Path::new(".")).await;
    for _ in 0..3 {
        let mut c = Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
        c.login("u0@example.com", "pw").await;
        c.ok("QUIT").await;
    }
    let needle = format!("store={}", store.local_addr());
    let warnings: Vec<String> = support::logs::captured_text()
        .lines()
        .filter(|l| l.contains("does not offer XCLIENT") && l.contains(&needle))
        .map(str::to_string)
        .collect();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("login_trusted_networks"),
        "{warnings:?}"
    );
    pg.shutdown();
}

/// The client's USER already gets a pooled store connection ready: XCLIENT goes out then, and the
/// client's PASS waits for one store round trip (the login), not two (XCLIENT, then the login). The
/// credentials still go in a write of their own, after XCLIENT's reply.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xclient_goes_at_the_clients_user_and_the_password_after_its_reply() {
    let (pg, addr, reads) = pooled_proxy(1).await;
    let (mut c, conn) = named_alice(addr, &reads).await;
    let before_pass = reads.lock().unwrap()[conn].clone();
    assert!(
        !before_pass
            .iter()
            .any(|r| r.contains("AUTH ") || r.contains("PASS ")),
        "{before_pass:?}"
    );
    c.ok("PASS secret-one").await;
    c.ok("STAT").await;
    c.ok("QUIT").await;
    pg.shutdown();

    let reads = reads.lock().unwrap();
    let lines = lines_of(&reads[conn]);
    let xclient: Vec<&&str> = lines.iter().filter(|l| l.starts_with("XCLIENT ")).collect();
    assert_eq!(xclient.len(), 1, "one XCLIENT: {lines:?}");
    assert!(
        xclient[0].starts_with("XCLIENT ADDR=127.0.0.1 PORT=")
            && xclient[0].contains(" SESSION=popgate-"),
        "{lines:?}"
    );
    let auth = reads[conn]
        .iter()
        .position(|r| r.contains("AUTH "))
        .expect("the login went on the introduced connection");
    assert_eq!(
        reads[conn][auth],
        format!("AUTH PLAIN {}\r\n", b64(b"\0alice@example.com\0secret-one")),
        "the credentials alone in their write: {:?}",
        reads[conn]
    );
    let carried: Vec<usize> = (0..reads.len())
        .filter(|&i| {
            reads[i]
                .iter()
                .any(|r| r.contains("AUTH ") || r.contains("PASS "))
        })
        .collect();
    assert_eq!(carried, [conn], "{reads:?}");
}

/// A client that leaves after USER leaves the store connection made ready for it closed, never sent QUIT
/// (QUIT would be the client's word, which it did not give).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_after_user_closes_its_store_connection_without_quit() {
    let (pg, addr, reads) = pooled_proxy(1).await;
    let (mut c, conn) = named_alice(addr, &reads).await;
    c.ok("QUIT").await;
    support::popgate::eventually(
        Duration::from_secs(5),
        "the store connection closed",
        || reads.lock().unwrap()[conn].last().map(String::as_str) == Some(CLOSED),
    )
    .await;
    let got = reads.lock().unwrap()[conn].clone();
    assert!(!got.iter().any(|r| r.contains("QUIT")), "{got:?}");
    pg.shutdown();
}

/// One store connection is made ready per login attempt, however often the client repeats USER: a client
/// cannot make popgate churn a store's pool by naming itself over and over. A name other than the one
/// made ready logs in as usual.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_user_makes_one_connection_ready_per_attempt() {
    let (pg, addr, reads) = pooled_proxy(4).await;
    let mut c = Pop3::greeted(addr).await;
    for name in ["alice", "bob", "carol", "dave"] {
        c.ok(&format!("USER {name}@example.com")).await;
    }
    // CAPA's answer comes after popgate has acted on every USER before it.
    c.multiline("CAPA").await;
    c.ok("PASS secret").await;
    c.ok("STAT").await;
    c.ok("QUIT").await;
    pg.shutdown();

    let ready = introduced(&reads);
    let reads = reads.lock().unwrap();
    // alice's, made ready and closed unused, and the connection dave logged in on.
    assert_eq!(ready.len(), 2, "{reads:?}");
    let logged_in: Vec<&usize> = ready
        .iter()
        .filter(|&&i| reads[i].iter().any(|r| r.contains("AUTH ")))
        .collect();
    assert_eq!(logged_in.len(), 1, "{reads:?}");
    assert!(
        reads[*logged_in[0]]
            .iter()
            .any(|r| *r == format!("AUTH PLAIN {}\r\n", b64(b"\0dave@example.com\0secret"))),
        "{reads:?}"
    );
}
