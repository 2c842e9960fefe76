//! Edge defences and external auth through popgate: brute force throttled and locked out per client address
//! while other clients keep their normal latency; an nginx-style auth_http service deciding logins.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use maildrop::{Maildrop, Server, Settings};
use support::pop3::Pop3;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

async fn store() -> (Maildrop, Server) {
    let md = Maildrop::new(Settings::default());
    md.add_mailbox(
        "victim@example.com",
        "right",
        vec![b"Subject: v\r\n\r\nv\r\n".to_vec()],
    );
    md.add_mailbox(
        "other@example.com",
        "pw",
        vec![b"Subject: o\r\n\r\no\r\n".to_vec()],
    );
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn brute_force_is_throttled_and_locked_out_per_address_and_the_lockout_expires() {
    let (_md, server) = store().await;
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
throttle:
  trusted_networks: []
  failed_login_delay: 10ms
  failed_login_max_delay: 40ms
  lockout_after: 20
  lockout_for: 2s
  connection_burst: 0
  max_sessions_per_ip: 0
limits:
  max_failed_logins: 200
tenants:
  example:
    domains: [example.com]
    backends: ["{}"]
    plaintext_login: allow
"#,
        server.local_addr()
    );
    let config = popgate::Config::from_yaml_str(&yaml, Path::new(".")).unwrap();
    let pg = popgate::start(config, CancellationToken::new())
        .await
        .unwrap();
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

/// An nginx-style auth service: accepts `password` for any user, sends `Auth-User`/`Auth-Pass` for the store,
/// refuses `wait-me` with Auth-Wait, names the store by host name.
async fn auth_service(store: SocketAddr, requests: Arc<AtomicUsize>) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut tcp, _)) = l.accept().await else {
                return;
            };
            let requests = requests.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = tcp.read(&mut chunk).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                }
                requests.fetch_add(1, Ordering::SeqCst);
                let req = String::from_utf8_lossy(&buf).to_string();
                let header = |name: &str| {
                    req.lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                        .unwrap_or_default()
                        .to_string()
                };
                assert_eq!(header("Auth-Protocol"), "pop3");
                assert_eq!(header("Client-IP"), "127.0.0.1");
                let reply = match header("Auth-Pass").as_str() {
                    "password" => format!(
                        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: localhost\r\nAuth-Port: {}\r\n\
                         Auth-User: other@example.com\r\nAuth-Pass: pw\r\n\r\n",
                        store.port()
                    ),
                    "wait-me" => {
                        "HTTP/1.0 200 OK\r\nAuth-Status: Try later\r\nAuth-Wait: 1\r\n\r\n"
                            .to_string()
                    }
                    _ => "HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n\r\n"
                        .to_string(),
                };
                let _ = tcp.write_all(reply.as_bytes()).await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_http_service_decides_logins_and_names_the_store() {
    let (_md, server) = store().await;
    let requests = Arc::new(AtomicUsize::new(0));
    let service = auth_service(server.local_addr(), requests.clone()).await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
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
    backends: ["127.0.0.1:1"]
    plaintext_login: allow
    health: {{enabled: false}}
    pool: {{min_idle: 0}}
    auth_http: {{url: "http://{service}/auth", timeout: 2s}}
  down:
    domains: [down.test]
    backends: ["127.0.0.1:1"]
    plaintext_login: allow
    health: {{enabled: false}}
    pool: {{min_idle: 0}}
    auth_http: {{url: "http://{dead}/auth", timeout: 1s}}
"#
    );
    let config = popgate::Config::from_yaml_str(&yaml, Path::new(".")).unwrap();
    let pg = popgate::start(config, CancellationToken::new())
        .await
        .unwrap();
    let addr = pg.local_addr("pop3").unwrap();

    // The service says OK and which store and account to use.
    let mut c = Pop3::greeted(addr).await;
    c.login("anyone@example.com", "password").await;
    assert!(c.ok("STAT").await.starts_with("+OK 1 "));
    c.ok("QUIT").await;
    // Its refusal text reaches the client; Auth-Wait delays it.
    let mut c = Pop3::greeted(addr).await;
    c.ok("USER anyone@example.com").await;
    assert_eq!(
        c.cmd("PASS nope").await,
        "-ERR [AUTH] Invalid login or password"
    );
    let t = Instant::now();
    c.ok("USER anyone@example.com").await;
    assert_eq!(c.cmd("PASS wait-me").await, "-ERR [AUTH] Try later");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // A cached answer does not ask the service again.
    let before = requests.load(Ordering::SeqCst);
    let mut c = Pop3::greeted(addr).await;
    c.login("anyone@example.com", "password").await;
    c.ok("QUIT").await;
    assert_eq!(requests.load(Ordering::SeqCst), before);
    // The service is down: -ERR [SYS/TEMP].
    let mut c = Pop3::greeted(addr).await;
    c.ok("USER x@down.test").await;
    let r = c.cmd("PASS password").await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    pg.shutdown();
}
