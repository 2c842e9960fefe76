//! The admin HTTP server's hardening: its own connection cap and header timeout (a flood of idle admin
//! connections cannot hold descriptors POP3 needs), the `Host` check (no DNS rebinding) and the rule that
//! a write carries a header a web page cannot send cross-site (no CSRF of `/reload` or `/kick`).
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use maildrop::{Maildrop, Server, Settings};
use support::admin;
use support::pop3::Pop3;
use support::popgate::{http, start_from_file};
use support::store::{Script, ScriptedStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// `admin.max_connections` in these tests.
const CAP: usize = 8;
/// `admin.header_timeout` in these tests.
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// A request whose headers never end (no blank line).
const PARTIAL: &[u8] = b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n";

async fn store() -> (Maildrop, Server) {
    let md = Maildrop::new(Settings {
        hostname: "store".into(),
        ..Settings::default()
    });
    for user in ["u0@example.com", "u1@example.com"] {
        md.add_mailbox(
            user,
            "pw",
            vec![b"Subject: one\r\n\r\nmessage one\r\n".to_vec()],
        );
    }
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

/// One plain POP3 listener, the admin server with a small cap and a short header timeout, no token unless
/// `admin_extra` adds one.
fn config(store: SocketAddr, admin_extra: &str) -> String {
    format!(
        r#"listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
admin:
  bind: 127.0.0.1:0
  max_connections: {CAP}
  header_timeout: {}s
  hosts: [popgate-admin.mail.svc]
{admin_extra}tenants:
  acme:
    domains: [example.com]
    backends: ["{store}"]
    plaintext_login: allow
    pool: {{min_idle: 0}}
"#,
        HEADER_TIMEOUT.as_secs()
    )
}

/// Reads until the server closes the connection (EOF or reset) or `deadline` passes: what was read, or
/// `None` when the connection is still open.
async fn closed_by(s: &mut TcpStream, deadline: Instant) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    tokio::time::timeout_at(deadline.into(), s.read_to_end(&mut buf))
        .await
        .ok()
        .map(|_| buf)
}

/// Sends `raw` on a fresh connection and reads the answer to the end: (status, body).
async fn request(addr: SocketAddr, raw: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(raw.as_bytes()).await.unwrap();
    let answer = closed_by(&mut s, Instant::now() + Duration::from_secs(10))
        .await
        .unwrap_or_else(|| panic!("no answer to {raw:?}"));
    let text = String::from_utf8_lossy(&answer).to_string();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer to {raw:?}: {text:?}"));
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// A request with this method, target and extra header lines (each ending in CRLF), closing afterwards.
fn raw(method: &str, target: &str, headers: &str) -> String {
    format!("{method} {target} HTTP/1.1\r\n{headers}Content-Length: 0\r\nConnection: close\r\n\r\n")
}

/// Finding A: connections past `admin.max_connections` are closed at once, the held ones at the header
/// timeout (whether they sent half a request or nothing), idle keep-alive connections too, and POP3 keeps
/// serving meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_connections_are_capped_and_timed_out_while_pop3_serves() {
    let (_md, server) = store().await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&config(server.local_addr(), ""), dir.path()).await;
    let admin = pg.admin_addr().unwrap();
    let pop3 = pg.local_addr("pop3").unwrap();

    // Fill the cap: half send a request whose headers never end, half send nothing at all. The server
    // accepts in arrival order, so these hold every permit before the next ones arrive.
    let opened = Instant::now();
    let mut held = Vec::new();
    for i in 0..CAP {
        let mut s = TcpStream::connect(admin).await.unwrap();
        if i % 2 == 0 {
            s.write_all(PARTIAL).await.unwrap();
        }
        held.push(s);
    }
    // Past the cap: closed by the server at once, long before the header timeout.
    let mut over = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(admin).await.unwrap();
        let _ = s.write_all(PARTIAL).await; // may already be reset
        over.push(s);
    }
    let prompt = Instant::now() + Duration::from_secs(1);
    for (i, s) in over.iter_mut().enumerate() {
        assert!(
            closed_by(s, prompt).await.is_some(),
            "admin connection {} (over the cap of {CAP}) was not closed at once",
            CAP + i + 1
        );
    }
    // The held ones are still open: the cap closed the others, not a timeout.
    for (i, s) in held.iter().enumerate() {
        let mut byte = [0u8; 1];
        match s.try_read(&mut byte) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            other => panic!(
                "held admin connection {i} ended early ({other:?}) after {:?}",
                opened.elapsed()
            ),
        }
    }

    // POP3 is untouched while the admin server is full.
    let mut c = Pop3::greeted(pop3).await;
    c.login("u0@example.com", "pw").await;
    assert!(c.ok("STAT").await.starts_with("+OK 1 "));
    c.ok("QUIT").await;

    // The header timeout closes every held connection, partial request or silent.
    let generous = Instant::now() + HEADER_TIMEOUT + Duration::from_secs(8);
    for (i, s) in held.iter_mut().enumerate() {
        let what = if i % 2 == 0 {
            "half a request"
        } else {
            "nothing"
        };
        assert!(
            closed_by(s, generous).await.is_some(),
            "held admin connection {i} (sent {what}) still open after {:?}",
            opened.elapsed()
        );
    }
    assert!(
        opened.elapsed() >= HEADER_TIMEOUT,
        "closed before the header timeout"
    );

    // The permits are back: a normal request works again.
    assert_eq!(
        request(admin, &raw("GET", "/livez", "Host: 127.0.0.1\r\n")).await,
        (200, "ok\n".to_string())
    );

    // A keep-alive connection that goes quiet after its answer is closed by the same timeout.
    let mut s = TcpStream::connect(admin).await.unwrap();
    s.write_all(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    while !answer.ends_with(b"\r\n\r\nok\n") {
        let mut chunk = [0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("no answer")
            .unwrap();
        assert!(
            n > 0,
            "closed before answering: {:?}",
            String::from_utf8_lossy(&answer)
        );
        answer.extend_from_slice(&chunk[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    let rest = closed_by(
        &mut s,
        Instant::now() + HEADER_TIMEOUT + Duration::from_secs(8),
    )
    .await;
    assert_eq!(
        rest.as_deref(),
        Some(&b""[..]),
        "an idle keep-alive admin connection stayed open"
    );
    pg.shutdown();
}

/// Finding B, DNS rebinding: a request must name this server in `Host`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_must_be_an_ip_localhost_or_a_configured_name() {
    let (_md, server) = store().await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&config(server.local_addr(), ""), dir.path()).await;
    let admin = pg.admin_addr().unwrap();
    let port = admin.port();

    for host in [
        "evil.example".to_string(),
        format!("evil.example:{port}"),
        format!("localhost.evil.example:{port}"),
        "127.0.0.1.evil.example".to_string(),
        "popgate-admin.mail.svc.evil.example".to_string(),
    ] {
        let (code, body) =
            request(admin, &raw("GET", "/status", &format!("Host: {host}\r\n"))).await;
        assert_eq!(code, 421, "Host: {host} got {body}");
        assert!(
            !body.contains("acme") && !body.contains("example.com"),
            "{body}"
        );
    }
    // Two Host headers, or an absolute-form target naming another host.
    let (code, _) = request(
        admin,
        &raw(
            "GET",
            "/status",
            "Host: 127.0.0.1\r\nHost: evil.example\r\n",
        ),
    )
    .await;
    assert_eq!(code, 421, "two Host headers");
    let (code, _) = request(
        admin,
        &raw(
            "GET",
            "http://evil.example/status",
            "Host: evil.example\r\n",
        ),
    )
    .await;
    assert_eq!(code, 421, "absolute-form target");

    for host in [
        format!("127.0.0.1:{port}"),
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        format!("LocalHost:{port}"),
        "popgate-admin.mail.svc".to_string(),
        format!("Popgate-Admin.Mail.Svc:{port}"),
        "[::1]".to_string(),
        format!("[::1]:{port}"),
    ] {
        let (code, body) =
            request(admin, &raw("GET", "/status", &format!("Host: {host}\r\n"))).await;
        assert_eq!(code, 200, "Host: {host} got {body}");
        let json: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["tenants"][0]["name"], "acme");
    }
    // HTTP/1.0 without Host (no browser sends that).
    let (code, body) = request(admin, "GET /livez HTTP/1.0\r\n\r\n").await;
    assert_eq!((code, body.as_str()), (200, "ok\n"));
    pg.shutdown();
}

/// Finding B, cross-site writes: with no token configured a POST still needs `X-Popgate-Admin` or a Bearer
/// `Authorization`, which a page cannot send without a preflight; with a token the token decides as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn writes_need_a_header_a_web_page_cannot_send() {
    let (_md, server) = store().await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&config(server.local_addr(), ""), dir.path()).await;
    let admin = pg.admin_addr().unwrap();
    let pop3 = pg.local_addr("pop3").unwrap();
    let mut session = Pop3::greeted(pop3).await;
    session.login("u0@example.com", "pw").await;

    // What a cross-site form or a simple fetch can send: refused, and nothing is kicked or reloaded.
    let form = "Host: 127.0.0.1\r\nOrigin: http://evil.example\r\n\
                Content-Type: application/x-www-form-urlencoded\r\n";
    let (code, body) = request(admin, &raw("POST", "/kick?mailbox=u0%40example.com", form)).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("X-Popgate-Admin"), "{body}");
    assert!(session.ok("STAT").await.starts_with("+OK 1 "));
    let (code, body) = request(admin, &raw("POST", "/reload", "Host: 127.0.0.1\r\n")).await;
    assert_eq!(code, 403, "{body}");
    // Basic credentials a browser may have cached and attaches by itself do not count.
    let basic = "Host: 127.0.0.1\r\nAuthorization: Basic dTpw\r\n";
    assert_eq!(request(admin, &raw("POST", "/reload", basic)).await.0, 403);
    assert!(pg.runtime().reloads().is_empty(), "a refused POST reloaded");
    // The Host check comes first.
    let evil = "Host: evil.example\r\nX-Popgate-Admin: 1\r\n";
    assert_eq!(request(admin, &raw("POST", "/reload", evil)).await.0, 421);
    // GETs need no header.
    assert_eq!(
        request(admin, &raw("GET", "/livez", "Host: 127.0.0.1\r\n"))
            .await
            .0,
        200
    );

    // With the custom header (any value) the writes work, token or not.
    let tool = "Host: 127.0.0.1\r\nX-Popgate-Admin: yes\r\n";
    assert_eq!(
        request(admin, &raw("POST", "/reload", tool)).await,
        (200, "{\"ok\":true}".to_string())
    );
    let url = format!("http://{admin}/reload");
    let (code, body) = tokio::task::spawn_blocking(move || http("POST", &url, None))
        .await
        .unwrap();
    assert_eq!((code, body.as_str()), (200, "{\"ok\":true}"), "curl helper");
    assert_eq!(
        request(admin, &raw("POST", "/kick?mailbox=u0%40example.com", tool)).await,
        (200, "{\"kicked\":1}".to_string())
    );
    assert!(session.until_eof().await.is_empty());

    // A token (taking effect at this reload): the header alone is not enough, a Bearer token is.
    std::fs::write(
        dir.path().join("popgate.yaml"),
        config(server.local_addr(), "  token: s3cret-token\n"),
    )
    .unwrap();
    assert_eq!(request(admin, &raw("POST", "/reload", tool)).await.0, 200);
    let (code, body) = request(admin, &raw("POST", "/reload", tool)).await;
    assert_eq!(code, 401, "{body}");
    let wrong = "Host: 127.0.0.1\r\nAuthorization: Bearer wrong\r\n";
    assert_eq!(request(admin, &raw("POST", "/reload", wrong)).await.0, 401);
    let bearer = "Host: 127.0.0.1\r\nAuthorization: Bearer s3cret-token\r\n";
    assert_eq!(
        request(admin, &raw("POST", "/reload", bearer)).await,
        (200, "{\"ok\":true}".to_string())
    );
    assert_eq!(
        request(admin, &raw("POST", "/reload", "Host: 127.0.0.1\r\n"))
            .await
            .0,
        403
    );
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_path_tricks_oversized_requests_and_smuggling_get_nowhere() {
    let store = ScriptedStore::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (pg, _) = admin::with_admin(store.addr, dir.path()).await;
    let admin = pg.admin_addr().unwrap();
    let token = admin::TOKEN_HEADER;
    let tool = "X-Popgate-Admin: 1\r\n";

    // Paths that only look like /reload: not found even with the token, refused without it.
    for target in [
        "//reload",
        "/reload/",
        "/%72eload",
        "/metrics/../reload",
        "/./reload",
        "/RELOAD",
        "/reload%00",
        "/reload;x",
        "/%2freload",
    ] {
        let answer = admin::exchange(admin, admin::request("POST", target, token)).await;
        assert!(
            matches!(admin::status_of(&answer), 400 | 404),
            "POST {target} with the token: {answer}"
        );
        let answer = admin::exchange(admin, admin::request("POST", target, tool)).await;
        assert_eq!(
            admin::status_of(&answer),
            401,
            "POST {target} without the token: {answer}"
        );
    }
    assert!(pg.runtime().reloads().is_empty(), "a trick path reloaded");

    // A MiB of headers: 431, or closed.
    let big = admin::request(
        "GET",
        "/livez",
        &format!("X-Big: {}\r\n", "a".repeat(1 << 20)),
    );
    let answer = admin::exchange(admin, big).await;
    assert!(
        answer.is_empty() || admin::status_of(&answer) == 431,
        "{}",
        answer.chars().take(300).collect::<String>()
    );

    // Content-Length and Transfer-Encoding together (request smuggling): the body as Content-Length
    // counts it ends where a chunk carrying a POST /reload begins. hyper goes by Transfer-Encoding and
    // closes after its answer (RFC 9112 §6.3), so exactly one request is answered and nothing reloads.
    let inner = format!(
        "POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\n{token}{tool}Content-Length: 0\r\n\r\n"
    );
    let size = format!("{:x}\r\n", inner.len());
    let smuggled = format!(
        "GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\
         Transfer-Encoding: chunked\r\n\r\n{size}{inner}\r\n0\r\n\r\n",
        size.len()
    );
    let answer = admin::exchange(admin, smuggled.into_bytes()).await;
    assert!(
        answer.matches("HTTP/1.1 ").count() <= 1
            && matches!(admin::status_of(&answer), 0 | 200 | 400),
        "CL + TE: {answer}"
    );
    assert!(
        pg.runtime().reloads().is_empty(),
        "a smuggled request reloaded"
    );

    // A 20 MiB body: answered or closed, not hung; the server serves on.
    let mut huge = format!(
        "POST /reload HTTP/1.1\r\nHost: 127.0.0.1\r\n{token}Content-Length: {}\r\nConnection: close\r\n\r\n",
        20 << 20
    )
    .into_bytes();
    huge.resize(huge.len() + (20 << 20), b'x');
    let answer = admin::exchange(admin, huge).await;
    assert!(
        answer.is_empty() || matches!(admin::status_of(&answer), 200 | 400 | 413),
        "{answer}"
    );
    let answer = admin::exchange(admin, admin::request("GET", "/livez", "")).await;
    assert_eq!(admin::status_of(&answer), 200, "{answer}");
    pg.shutdown();
}

/// The auth matrix with a token and `token_for_reads`: the probes' endpoints never need the token (a
/// kubelet sends none), every other read and every write does, `metrics_without_token` opens `/metrics`
/// alone, and each refusal is counted in `popgate_admin_auth_failures_total` (the token never logged).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_token_for_reads_the_probes_stay_open_and_refusals_are_counted() {
    let (_md, server) = store().await;
    let dir = tempfile::tempdir().unwrap();
    support::logs::captured_log();
    let yaml = config(
        server.local_addr(),
        "  token: matrix-token\n  token_for_reads: true\n",
    );
    let pg = start_from_file(&yaml, dir.path()).await;
    let admin = pg.admin_addr().unwrap();
    let get =
        |path: &str, headers: &str| raw("GET", path, &format!("Host: 127.0.0.1\r\n{headers}"));
    let bearer = "Authorization: Bearer matrix-token\r\n";
    let wrong = "Authorization: Bearer not-the-token\r\n";
    for (path, open) in [
        ("/livez", true),
        ("/readyz", true),
        ("/metrics", false),
        ("/status", false),
        ("/sessions", false),
        // The page's shell and script hold no data: the page asks for the token itself.
        ("/", true),
        ("/status.js", true),
    ] {
        let (code, _) = request(admin, &get(path, "")).await;
        let expected = if open { [200, 503] } else { [401, 401] };
        assert!(
            expected.contains(&code),
            "GET {path} without a token: {code}"
        );
        let (code, _) = request(admin, &get(path, wrong)).await;
        assert!(
            open == (code != 401),
            "GET {path} with a wrong token: {code}"
        );
        let (code, _) = request(admin, &get(path, bearer)).await;
        assert_ne!(code, 401, "GET {path} with the token");
    }
    let post = |headers: &str| {
        raw(
            "POST",
            "/kick?mailbox=u0%40example.com",
            &format!("Host: 127.0.0.1\r\nX-Popgate-Admin: 1\r\n{headers}"),
        )
    };
    assert_eq!(request(admin, &post("")).await.0, 401);
    assert_eq!(request(admin, &post(bearer)).await.0, 200);
    // 3 reads without, 3 with a wrong token, 1 write: 7 refusals, counted and logged without the token.
    let (_, metrics) = request(admin, &get("/metrics", bearer)).await;
    assert_eq!(
        support::popgate::metric(&metrics, "popgate_admin_auth_failures_total"),
        Some(7.0)
    );
    let text = support::logs::captured_text();
    assert!(text.contains("admin request refused"), "{text}");
    assert!(!text.contains("not-the-token") && !text.contains("matrix-token"));
    pg.shutdown();

    // metrics_without_token: /metrics opens, /status stays closed.
    let yaml = config(
        server.local_addr(),
        "  token: matrix-token\n  token_for_reads: true\n  metrics_without_token: true\n",
    );
    let pg = start_from_file(&yaml, dir.path()).await;
    let admin = pg.admin_addr().unwrap();
    assert_eq!(request(admin, &get("/metrics", "")).await.0, 200);
    assert_eq!(request(admin, &get("/status", "")).await.0, 401);
    pg.shutdown();
}
