//! Every login mechanism through popgate: APOP both ways (store greeting passthrough with the RFC 1939 seed
//! dialog, and popgate's own check against a secrets file), CRAM-MD5, SCRAM relayed to real Dovecot,
//! XOAUTH2/OAUTHBEARER relayed unchanged, master-user logins.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use maildrop::{Maildrop, Server, Settings};
use popgate::protocol::sasl::encode_b64;
use support::clients::{curl_pop3, curl_retr, pop3_url};
use support::dovecot::{DovecotStore, StoreOptions, pop3_retr_bytes};
use support::pop3::Pop3;
use support::popgate::Popgate;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const SEED_TIMESTAMP: &str = "<1896.697170952@dbc.mtview.ca.us>";

/// Two messages of 120 and 200 octets, as in RFC 1939's example maildrop.
fn seed_messages() -> Vec<Vec<u8>> {
    let sized = |subject: &str, size: usize| {
        let mut m = format!("Subject: {subject}\r\n\r\n").into_bytes();
        while m.len() < size - 2 {
            m.push(b'x');
        }
        m.extend_from_slice(b"\r\n");
        m
    };
    vec![sized("first", 120), sized("second", 200)]
}

async fn seed_store() -> (Maildrop, Server) {
    let md = Maildrop::new(Settings {
        hostname: "dbc.mtview.ca.us".into(),
        apop_timestamp: Some(SEED_TIMESTAMP.into()),
        ..Settings::default()
    });
    md.add_mailbox("mrose", "tanstaaf", seed_messages());
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

/// The seed dialog, raw: every line the server sent, in order.
async fn seed_dialog(addr: SocketAddr) -> Vec<String> {
    let mut c = Pop3::connect(addr).await;
    let mut seen = vec![c.line().await];
    for cmd in [
        "APOP mrose c4c9334bac560ecc979e58001b3e22fb",
        "STAT",
        "LIST",
    ] {
        seen.push(c.cmd(cmd).await);
        if cmd == "LIST" {
            seen.push(String::from_utf8(c.body_raw().await).unwrap());
        }
    }
    seen.push(c.cmd("RETR 1").await);
    seen.push(String::from_utf8(c.body_raw().await).unwrap());
    seen.push(c.cmd("DELE 1").await);
    seen.push(c.cmd("QUIT").await);
    assert!(c.until_eof().await.is_empty());
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rfc1939_apop_seed_dialog_through_popgate_byte_for_byte() {
    let (direct_md, direct) = seed_store().await;
    let (proxied_md, proxied) = seed_store().await;
    let yaml = format!(
        r#"
listeners:
  - name: mtview
    bind: 127.0.0.1:0
    tls: none
    tenant: mtview
tenants:
  mtview:
    domains: [dbc.mtview.ca.us]
    backends: ["{}"]
    plaintext_login: allow
    apop_passthrough: {{}}
"#,
        proxied.local_addr()
    );
    let config = popgate::Config::from_yaml_str(&yaml, Path::new(".")).unwrap();
    let pg = popgate::start(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let want = seed_dialog(direct.local_addr()).await;
    assert!(want[0].ends_with(SEED_TIMESTAMP), "{want:?}");
    assert!(want[1].starts_with("+OK"), "{want:?}");
    let got = seed_dialog(pg.local_addr("mtview").unwrap()).await;
    // The greeting is popgate's own text around the store's timestamp (the store's banner stays private);
    // everything after it is the store's, byte for byte.
    assert_eq!(got[0], format!("+OK popgate ready {SEED_TIMESTAMP}"));
    assert_eq!(got[1..], want[1..]);
    assert_eq!(
        proxied_md.messages("mrose").unwrap(),
        vec![seed_messages()[1].clone()]
    );
    assert_eq!(direct_md.messages("mrose").unwrap().len(), 1);
    pg.shutdown();
}

fn poplib_apop(addr: SocketAddr, user: &str, secret: &str) -> String {
    let script = r#"
import poplib, sys
p = poplib.POP3(sys.argv[1], int(sys.argv[2]), timeout=20)
try:
    print(p.apop(sys.argv[3], sys.argv[4]).decode())
    print(p.stat())
    p.quit()
except poplib.error_proto as e:
    print("ERR", e)
"#;
    let out = Command::new("python3")
        .args([
            "-c",
            script,
            &addr.ip().to_string(),
            &addr.port().to_string(),
            user,
            secret,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn apop_and_cram_md5_checked_by_popgate_against_a_secrets_file() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let md = Maildrop::new(Settings::default());
    md.add_mailbox("alice@example.com", "alice-secret", seed_messages());
    let server = rt
        .block_on(md.bind("127.0.0.1:0".parse().unwrap()))
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("secrets.yaml"),
        "alice@example.com: alice-secret\n",
    )
    .unwrap();
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
tenants:
  example:
    domains: [example.com]
    backends: ["{}"]
    plaintext_login: allow
    secrets: secrets.yaml
"#,
        server.local_addr()
    );
    let pg = Popgate::start(&yaml, dir.path());
    let addr = pg.addr("pop3");
    // Python's poplib computes the digest from popgate's own greeting timestamp.
    let out = poplib_apop(addr, "alice@example.com", "alice-secret");
    assert!(out.starts_with("+OK") && out.contains("(2, 320)"), "{out}");
    let out = poplib_apop(addr, "alice+example.com", "wrong");
    assert!(out.contains("ERR") && out.contains("[AUTH]"), "{out}");
    // curl's CRAM-MD5 against popgate's challenge; popgate then logs in to the store with the secret.
    let body = curl_retr(
        &pop3_url(addr, "2"),
        "alice@example.com",
        "alice-secret",
        &["--login-options", "AUTH=CRAM-MD5"],
    );
    assert_eq!(body, seed_messages()[1]);
    let denied = curl_pop3(
        &pop3_url(addr, "2"),
        "alice@example.com",
        "nope",
        &["--login-options", "AUTH=CRAM-MD5"],
    );
    assert_eq!(denied.code, Some(67), "{}", denied.stderr);
    drop(server);
}

/// A SCRAM-SHA-256 client written with Python's standard library (poplib and curl do not speak SCRAM).
const SCRAM_CLIENT: &str = r#"
import base64, hashlib, hmac, os, socket, sys
host, port, user, password = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
s = socket.create_connection((host, port), timeout=20); f = s.makefile("rb")
def line(): return f.readline().decode().rstrip("\r\n")
def send(x): s.sendall((x + "\r\n").encode())
print(line())
nonce = base64.b64encode(os.urandom(18)).decode()
bare = "n=" + user.replace("=", "=3D").replace(",", "=2C") + ",r=" + nonce
send("AUTH SCRAM-SHA-256 " + base64.b64encode(("n,," + bare).encode()).decode())
first = line(); assert first.startswith("+ "), first
server_first = base64.b64decode(first[2:]).decode()
attrs = dict(kv.split("=", 1) for kv in server_first.split(","))
salted = hashlib.pbkdf2_hmac("sha256", password.encode(), base64.b64decode(attrs["s"]), int(attrs["i"]))
client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
stored = hashlib.sha256(client_key).digest()
without_proof = "c=biws,r=" + attrs["r"]
auth_msg = ",".join([bare, server_first, without_proof]).encode()
sig = hmac.new(stored, auth_msg, hashlib.sha256).digest()
proof = bytes(a ^ b for a, b in zip(client_key, sig))
send(base64.b64encode((without_proof + ",p=" + base64.b64encode(proof).decode()).encode()).decode())
final = line()
if final.startswith("+ "):
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()
    expect = "v=" + base64.b64encode(hmac.new(server_key, auth_msg, hashlib.sha256).digest()).decode()
    assert base64.b64decode(final[2:]).decode() == expect, "server signature mismatch"
    send("")
    final = line()
print(final)
if final.startswith("+OK"):
    send("STAT"); print(line()); send("QUIT"); print(line())
"#;

fn scram(addr: SocketAddr, user: &str, password: &str) -> String {
    let out = Command::new("python3")
        .args([
            "-c",
            SCRAM_CLIENT,
            &addr.ip().to_string(),
            &addr.port().to_string(),
            user,
            password,
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr)
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn real_dovecot_apop_passthrough_cram_md5_via_secrets_and_scram_relay() {
    const MSG: &[u8] = b"Subject: mechanisms\n\nhello\n";
    let store = DovecotStore::start(
        StoreOptions::new()
            .user("alice@example.com", "alice-secret", [MSG])
            .user("bob@example.net", "bob-secret", [MSG, MSG])
            .extra_config(
                "auth_mechanisms = plain login apop cram-md5 scram-sha-1 scram-sha-256\n",
            ),
    );
    // SCRAM works directly against this store (so a failure below is popgate's).
    let direct = scram(store.pop3_addr(), "alice@example.com", "alice-secret");
    assert!(direct.contains("+OK 1 "), "{direct}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("net-secrets.yaml"),
        "bob@example.net: bob-secret\n",
    )
    .unwrap();
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
  - name: com-only
    bind: 127.0.0.1:0
    tls: none
    tenant: com
tenants:
  com:
    domains: [example.com]
    backends: ["{addr}"]
    plaintext_login: allow
    mechanisms: [user, plain, login, apop, scram-sha-1, scram-sha-256]
    apop_passthrough: {{}}
  net:
    domains: [example.net]
    backends: ["{addr}"]
    plaintext_login: allow
    secrets: net-secrets.yaml
"#,
        addr = store.pop3_addr()
    );
    let pg = Popgate::start(&yaml, dir.path());
    // APOP passthrough: on the listener bound to `com`, the client sees Dovecot's own greeting and timestamp.
    let out = poplib_apop(pg.addr("com-only"), "alice@example.com", "alice-secret");
    assert!(out.starts_with("+OK") && out.contains("(1, "), "{out}");
    store.wait_for_log("method=APOP", Duration::from_secs(10));
    // On the shared listener `com` has no secrets, so APOP cannot work there and is not offered.
    let out = poplib_apop(pg.addr("pop3"), "alice@example.com", "alice-secret");
    assert!(out.contains("ERR"), "{out}");
    // CRAM-MD5 for `net`, checked by popgate with its secrets; Dovecot then sees an APOP login from popgate.
    let body = curl_retr(
        &pop3_url(pg.addr("pop3"), "2"),
        "bob@example.net",
        "bob-secret",
        &["--login-options", "AUTH=CRAM-MD5"],
    );
    assert_eq!(body, pop3_retr_bytes(MSG));
    let log = store.wait_for_log(
        "user=<bob@example.net>, method=APOP",
        Duration::from_secs(10),
    );
    assert!(log.contains("rip=127.0.0.1"), "{log}");
    // SCRAM-SHA-256 relayed unchanged between the client and Dovecot (popgate routes on n=).
    let via = scram(pg.addr("pop3"), "alice@example.com", "alice-secret");
    assert!(via.contains("+OK 1 "), "{via}");
    let wrong = scram(pg.addr("pop3"), "alice@example.com", "wrong");
    assert!(!wrong.contains("+OK 1 "), "{wrong}");
    store.wait_for_log("method=SCRAM-SHA-256", Duration::from_secs(10));
}

/// A store that speaks just enough POP3 to check what popgate relays for XOAUTH2 and OAUTHBEARER.
async fn oauth_store(expected: Vec<String>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let expected = expected.clone();
            tokio::spawn(async move {
                let (rd, mut wr) = tcp.into_split();
                let mut rd = BufReader::new(rd);
                wr.write_all(b"+OK oauth store ready\r\n").await.unwrap();
                let mut line = String::new();
                while rd.read_line(&mut line).await.unwrap_or(0) > 0 {
                    let cmd = line.trim_end().to_string();
                    line.clear();
                    let reply: &[u8] = if cmd == "CAPA" {
                        b"+OK\r\nSASL XOAUTH2 OAUTHBEARER\r\n.\r\n"
                    } else if let Some(rest) = cmd.strip_prefix("AUTH ") {
                        if expected.iter().any(|e| e == rest) {
                            b"+OK token accepted\r\n"
                        } else {
                            // The OAuth error challenge; the client answers with an empty line.
                            wr.write_all(b"+ eyJzdGF0dXMiOiI0MDEifQ==\r\n")
                                .await
                                .unwrap();
                            let mut empty = String::new();
                            rd.read_line(&mut empty).await.unwrap();
                            assert_eq!(empty, "\r\n");
                            b"-ERR [AUTH] invalid token\r\n"
                        }
                    } else if cmd == "STAT" {
                        b"+OK 0 0\r\n"
                    } else if cmd == "QUIT" {
                        b"+OK bye\r\n"
                    } else {
                        b"-ERR unknown\r\n"
                    };
                    if wr.write_all(reply).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn xoauth2_and_oauthbearer_route_on_the_user_and_relay_the_token() {
    let xoauth = encode_b64(b"user=alice@example.com\x01auth=Bearer good-token\x01\x01");
    let bearer = encode_b64(b"n,a=alice@example.com,\x01auth=Bearer good-token\x01\x01");
    let store = oauth_store(vec![
        format!("XOAUTH2 {xoauth}"),
        format!("OAUTHBEARER {bearer}"),
    ])
    .await;
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
tenants:
  example:
    domains: [example.com]
    backends: ["{store}"]
    plaintext_login: allow
    mechanisms: [xoauth2, oauthbearer]
    pool: {{min_idle: 0}}
"#
    );
    let config = popgate::Config::from_yaml_str(&yaml, Path::new(".")).unwrap();
    let pg = popgate::start(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let addr = pg.local_addr("pop3").unwrap();
    let mut c = Pop3::greeted(addr).await;
    let capa = String::from_utf8(c.multiline("CAPA").await).unwrap();
    assert!(
        capa.contains("SASL XOAUTH2 OAUTHBEARER\r\n") && !capa.contains("USER"),
        "{capa}"
    );
    c.ok(&format!("AUTH XOAUTH2 {xoauth}")).await;
    c.ok("STAT").await;
    c.ok("QUIT").await;
    let mut c = Pop3::greeted(addr).await;
    c.ok(&format!("AUTH OAUTHBEARER {bearer}")).await;
    c.ok("QUIT").await;
    // A bad token: the store's error challenge reaches the client, its empty answer reaches the store.
    let bad = encode_b64(b"user=alice@example.com\x01auth=Bearer expired\x01\x01");
    let mut c = Pop3::greeted(addr).await;
    assert_eq!(
        c.cmd(&format!("AUTH XOAUTH2 {bad}")).await,
        "+ eyJzdGF0dXMiOiI0MDEifQ=="
    );
    assert_eq!(c.cmd("").await, "-ERR [AUTH] invalid token");
    // A 10 KiB token fits (tokens can be long); a token for a user of no tenant is refused.
    let long = encode_b64(
        format!(
            "user=alice@example.com\x01auth=Bearer {}\x01\x01",
            "t".repeat(10_000)
        )
        .as_bytes(),
    );
    let r = c.cmd(&format!("AUTH XOAUTH2 {long}")).await;
    assert!(r.starts_with("+ ") || r.starts_with("-ERR [AUTH]"), "{r}");
    pg.shutdown();
}
