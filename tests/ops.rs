//! Operations: the admin endpoints, metrics (checked by promtool on a real scrape), hot reload under load,
//! graceful drain, kicking a mailbox's sessions.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use maildrop::{Maildrop, Server, Settings};
use support::pop3::Pop3;
use support::popgate::{http, start_from_file};
use tokio_util::sync::CancellationToken;

async fn store(users: usize, messages: usize) -> (Maildrop, Server) {
    let md = Maildrop::new(Settings {
        hostname: "store".into(),
        ..Settings::default()
    });
    for i in 0..users {
        let msgs = (0..messages)
            .map(|m| format!("Subject: {m}\r\n\r\nmessage {m} for u{i}\r\n").into_bytes())
            .collect();
        md.add_mailbox(&format!("u{i}@example.com"), "pw", msgs);
    }
    let server = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    (md, server)
}

fn config(store: SocketAddr, extra: &str) -> String {
    format!(
        r#"listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
admin:
  bind: 127.0.0.1:0
  token: s3cret-token
timeouts:
  shutdown_grace: 3s
tenants:
  acme:
    domains: [example.com]
    backends: ["{store}"]
    plaintext_login: allow
    health: {{interval: 200ms}}
{extra}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn admin_endpoints_metrics_and_promtool() {
    let (_md, server) = store(2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&config(server.local_addr(), ""), dir.path()).await;
    let admin = format!("http://{}", pg.admin_addr().unwrap());
    let pop3 = pg.local_addr("pop3").unwrap();

    let mut c = Pop3::greeted(pop3).await;
    c.login("u0@example.com", "pw").await;
    c.ok("STAT").await;
    c.multiline("RETR 1").await;
    c.ok("QUIT").await;
    let mut c = Pop3::greeted(pop3).await;
    c.ok("USER u0@example.com").await;
    assert!(c.cmd("PASS wrong").await.starts_with("-ERR"));

    let admin2 = admin.clone();
    let (metrics, status, live, ready, page, kick_unauth) =
        tokio::task::spawn_blocking(move || {
            (
                http("GET", &format!("{admin2}/metrics"), None),
                http("GET", &format!("{admin2}/status"), None),
                http("GET", &format!("{admin2}/livez"), None),
                http("GET", &format!("{admin2}/readyz"), None),
                http("GET", &format!("{admin2}/"), None),
                http(
                    "POST",
                    &format!("{admin2}/kick?mailbox=u0%40example.com"),
                    None,
                ),
            )
        })
        .await
        .unwrap();
    assert_eq!(metrics.0, 200);
    let m = &metrics.1;
    for needle in [
        "popgate_logins_total{mechanism=\"user\",result=\"ok\",tenant=\"acme\"} 1",
        "popgate_logins_total{mechanism=\"user\",result=\"rejected\",tenant=\"acme\"} 1",
        "popgate_sessions_total{listener=\"pop3\",outcome=\"quit\",tenant=\"acme\"} 1",
        "popgate_commands_total{command=\"RETR\",tenant=\"acme\"} 1",
        "popgate_backend_up{backend=",
        "popgate_bytes_total{direction=\"to_client\",tenant=\"acme\"}",
        "process_resident_memory_bytes",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    assert!(!m.contains("u0@example.com"), "a user name became a label");
    // promtool lints the real scrape.
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is needed by this test");
    use std::io::Write;
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(m.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    assert_eq!(status.0, 200);
    let json: serde_json::Value = serde_json::from_str(&status.1).unwrap();
    assert_eq!(json["tenants"][0]["name"], "acme");
    assert_eq!(json["tenants"][0]["stores"][0]["up"], true);
    assert_eq!(live.0, 200);
    assert_eq!(ready.0, 200);
    assert_eq!(page.0, 200);
    assert!(
        page.1.contains("tenant-acme") && page.1.contains("UP"),
        "{}",
        page.1
    );
    assert_eq!(kick_unauth.0, 401, "POST without the token must be refused");
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn reload_under_500_sessions_drops_none_and_routes_new_logins() {
    const SESSIONS: usize = 500;
    let (_a, server_a) = store(SESSIONS + 1, 1).await;
    let (_b, server_b) = store(SESSIONS + 1, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&config(server_a.local_addr(), ""), dir.path()).await;
    let pop3 = pg.local_addr("pop3").unwrap();

    let mut sessions = Vec::with_capacity(SESSIONS);
    for i in 0..SESSIONS {
        let mut c = Pop3::greeted(pop3).await;
        c.login(&format!("u{i}@example.com"), "pw").await;
        sessions.push(c);
    }
    // A bad config is refused and the running one stays.
    std::fs::write(dir.path().join("popgate.yaml"), "listeners: [\n").unwrap();
    assert!(pg.reload().await.is_err());
    // Move the tenant to store b.
    std::fs::write(
        dir.path().join("popgate.yaml"),
        config(server_b.local_addr(), ""),
    )
    .unwrap();
    pg.reload().await.unwrap();

    // Every session in flight still talks to store a (one message each), and ends cleanly.
    for (i, c) in sessions.iter_mut().enumerate() {
        let stat = c.ok("STAT").await;
        assert!(stat.starts_with("+OK 1 "), "session {i}: {stat}");
        c.ok("QUIT").await;
    }
    // New logins see the new route (store b has two messages per mailbox).
    let mut c = Pop3::greeted(pop3).await;
    c.login(&format!("u{SESSIONS}@example.com"), "pw").await;
    assert!(c.ok("STAT").await.starts_with("+OK 2 "));
    c.ok("QUIT").await;

    let admin = format!("http://{}/metrics", pg.admin_addr().unwrap());
    let (_, m) = tokio::task::spawn_blocking(move || http("GET", &admin, None))
        .await
        .unwrap();
    assert!(
        m.contains("popgate_config_reloads_total{result=\"error\"} 1"),
        "{m}"
    );
    assert!(
        m.contains("popgate_config_reloads_total{result=\"ok\"} 1"),
        "{m}"
    );
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn reload_follows_file_changes_and_post_reload() {
    let (_a, server_a) = store(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("popgate.yaml");
    std::fs::write(&path, config(server_a.local_addr(), "")).unwrap();
    let config_parsed = popgate::Config::load(&path).unwrap();
    let pg = popgate::start_from_file(config_parsed, path.clone(), CancellationToken::new())
        .await
        .unwrap();
    popgate::runtime::watch_config_dir(pg.runtime()).unwrap();
    // A second listener appears when the file changes.
    let with_listener = config(server_a.local_addr(), "").replace(
        "admin:",
        "  - name: extra\n    bind: 127.0.0.1:0\n    tls: none\nadmin:",
    );
    std::fs::write(&path, &with_listener).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while pg.local_addr("extra").is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the file change did not reload"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut c = Pop3::greeted(pg.local_addr("extra").unwrap()).await;
    c.login("u1@example.com", "pw").await;
    c.ok("QUIT").await;
    // POST /reload with the token.
    let url = format!("http://{}/reload", pg.admin_addr().unwrap());
    let (code, body) =
        tokio::task::spawn_blocking(move || http("POST", &url, Some("s3cret-token")))
            .await
            .unwrap();
    assert_eq!(code, 200, "{body}");
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn admin_token_file_rotates_on_reload() {
    let (_md, server) = store(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "first-token\n").unwrap();
    let yaml = config(server.local_addr(), "").replace(
        "  token: s3cret-token",
        "  token_file: admin-token\n  token_for_reads: true",
    );
    let pg = start_from_file(&yaml, dir.path()).await;
    let admin = pg.admin_addr().unwrap();
    let call = |method: &'static str, path: &'static str, token: Option<&'static str>| {
        let url = format!("http://{admin}{path}");
        tokio::task::spawn_blocking(move || http(method, &url, token))
    };
    let status = |token| async move { call("GET", "/status", token).await.unwrap().0 };

    assert_eq!(status(None).await, 401);
    assert_eq!(status(Some("wrong")).await, 401);
    assert_eq!(status(Some("first-token")).await, 200);

    // The Secret behind the file is rotated; the next reload (here POST /reload with the old token) reads it.
    std::fs::write(&token, "second-token\n").unwrap();
    let (code, body) = call("POST", "/reload", Some("first-token")).await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert_eq!(status(Some("first-token")).await, 401);
    assert_eq!(status(Some("second-token")).await, 200);

    // An emptied token file is a bad config: the reload is refused and the running token stays.
    std::fs::write(&token, "").unwrap();
    let (code, body) = call("POST", "/reload", Some("second-token")).await.unwrap();
    assert_ne!(code, 200, "{body}");
    assert!(body.contains("admin.token_file"), "{body}");
    assert!(!body.contains("second-token"), "token echoed: {body}");
    assert_eq!(status(Some("second-token")).await, 200);
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn drain_refuses_new_work_lets_relays_finish_then_closes_without_quit() {
    let (md, server) = store(3, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&config(server.local_addr(), ""), dir.path()).await;
    let pop3 = pg.local_addr("pop3").unwrap();
    let ready = format!("http://{}/readyz", pg.admin_addr().unwrap());

    let mut relayed = Pop3::greeted(pop3).await;
    relayed.login("u0@example.com", "pw").await;
    relayed.ok("DELE 1").await;
    let mut pre_login = Pop3::greeted(pop3).await;
    pre_login.ok("USER u1@example.com").await;

    let draining = {
        let pg = pg.clone();
        tokio::spawn(async move { pg.drain(Duration::from_secs(3)).await })
    };
    // The pre-login session is told to come back later.
    let rest = String::from_utf8_lossy(&pre_login.until_eof().await).to_string();
    assert!(rest.starts_with("-ERR [SYS/TEMP]"), "{rest}");
    let r = ready.clone();
    let (code, _) = tokio::task::spawn_blocking(move || http("GET", &r, None))
        .await
        .unwrap();
    assert_eq!(code, 503, "readiness must be false while draining");
    // New connections are not accepted.
    assert!(
        tokio::net::TcpStream::connect(pop3).await.is_err() || {
            let mut c = Pop3::connect(pop3).await;
            c.until_eof().await.is_empty()
        }
    );
    // The relayed session keeps working during the grace period...
    assert!(relayed.ok("STAT").await.starts_with("+OK 1 "));
    // ...and is closed at its end, without QUIT: the DELE is not committed.
    assert!(relayed.until_eof().await.is_empty());
    draining.await.unwrap();
    assert_eq!(
        md.messages("u0@example.com").unwrap().len(),
        2,
        "drain committed a deletion"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn kick_closes_a_mailboxs_sessions_without_quit() {
    let (md, server) = store(2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&config(server.local_addr(), ""), dir.path()).await;
    let pop3 = pg.local_addr("pop3").unwrap();
    let mut kicked = Pop3::greeted(pop3).await;
    kicked.login("u0@example.com", "pw").await;
    kicked.ok("DELE 2").await;
    let mut other = Pop3::greeted(pop3).await;
    other.login("u1@example.com", "pw").await;

    // Named another way than the login was (SDPS `%` form, other case): the same mailbox.
    let url = format!(
        "http://{}/kick?mailbox=U0%25example.com",
        pg.admin_addr().unwrap()
    );
    let (code, body) =
        tokio::task::spawn_blocking(move || http("POST", &url, Some("s3cret-token")))
            .await
            .unwrap();
    assert_eq!((code, body.as_str()), (200, "{\"kicked\":1}"));
    assert!(kicked.until_eof().await.is_empty());
    assert!(other.ok("STAT").await.starts_with("+OK 2 "));
    other.ok("QUIT").await;
    // The store saw no QUIT from the kicked session: nothing deleted.
    let mut again = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while again.is_none() {
        let mut c = Pop3::greeted(pop3).await;
        c.ok("USER u0@example.com").await;
        if c.cmd("PASS pw").await.starts_with("+OK") {
            again = Some(c);
        } else {
            assert!(
                tokio::time::Instant::now() < deadline,
                "mailbox stayed locked"
            );
            tokio::task::yield_now().await;
        }
    }
    assert_eq!(md.messages("u0@example.com").unwrap().len(), 2);
    pg.shutdown();
}

/// The status page in a real browser: headless Chromium renders it; the DOM shows the tenant and its store,
/// and a screenshot is kept as a test artefact (target/artifacts/status-page.png).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn status_page_renders_in_headless_chromium() {
    let (_md, server) = store(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&config(server.local_addr(), ""), dir.path()).await;
    let url = format!("http://{}/", pg.admin_addr().unwrap());
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("status-page.png");
    let _ = std::fs::remove_file(&shot);
    let profile = tempfile::tempdir().unwrap();
    let profile_dir = profile.path().to_path_buf();
    let chromium = move |extra: &[&str]| {
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-quic",
            &format!("--user-data-dir={}", profile_dir.display()),
            "--window-size=1100,900",
        ]);
        cmd.args(extra).arg(&url);
        cmd.output()
            .expect("chromium (Debian package chromium) is needed by this test")
    };
    let (dom, png) = tokio::task::spawn_blocking({
        let shot = shot.clone();
        move || {
            let dom = chromium(&["--dump-dom"]);
            let png = chromium(&[&format!("--screenshot={}", shot.display())]);
            (dom, png)
        }
    })
    .await
    .unwrap();
    let html = String::from_utf8_lossy(&dom.stdout);
    assert!(
        html.contains("id=\"tenant-acme\""),
        "{html}\n{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert!(html.contains("class=\"store up\""), "{html}");
    assert!(html.contains(&server.local_addr().to_string()), "{html}");
    assert!(
        png.status.success(),
        "{}",
        String::from_utf8_lossy(&png.stderr)
    );
    let bytes = std::fs::read(&shot).expect("screenshot written");
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 5_000,
        "screenshot too small: {}",
        bytes.len()
    );
    pg.shutdown();
}

/// One tenant's outage must not take the replica out of the load balancer for every tenant: by default
/// `/readyz` needs some tenant with a store up; `all_tenants` asks for every tenant, `listening` for none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn readiness_follows_ready_when_not_one_tenants_outage() {
    let (_md, server) = store(1, 1).await;
    // A loopback port nothing listens on: its stores fail every probe.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let health = "health: {interval: 50ms, timeout: 1s, rise: 1, fall: 1}";
    let acme = format!(
        "  acme:\n    domains: [example.com]\n    backends: [\"{}\"]\n    {health}\n",
        server.local_addr()
    );
    let gone =
        format!("  gone:\n    domains: [gone.example]\n    backends: [\"{dead}\"]\n    {health}\n");
    let cases = [
        // (admin.ready_when, tenants, /readyz status)
        (None, format!("{acme}{gone}"), 200),
        (Some("all_tenants"), format!("{acme}{gone}"), 503),
        (Some("any_tenant"), gone.clone(), 503),
        (Some("listening"), gone.clone(), 200),
    ];
    for (ready_when, tenants, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let line = ready_when.map_or(String::new(), |w| format!("  ready_when: {w}\n"));
        let yaml = format!(
            "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\nadmin:\n  bind: 127.0.0.1:0\n{line}tenants:\n{tenants}"
        );
        let pg = start_from_file(&yaml, dir.path()).await;
        // Stores start up; wait until the probes have marked the dead one down.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while pg
            .stores()
            .iter()
            .any(|(t, stores)| t == "gone" && stores.iter().any(|s| s.up))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the dead store was never marked down"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let url = format!("http://{}/readyz", pg.admin_addr().unwrap());
        let (code, body) = tokio::task::spawn_blocking(move || http("GET", &url, None))
            .await
            .unwrap();
        assert_eq!(code, expected, "ready_when {ready_when:?}: {body}");
        pg.shutdown();
    }
}

/// A listener replaced by one of another name on the same address needs the old socket closed before the new
/// one binds; a reload that fails after that brings the old one back. (The overlap rule itself, wildcards
/// included, is a unit test in `listener.rs`; this test stays on loopback and keeps the port held throughout,
/// so nothing else on the machine can take it between reloads.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_renamed_on_the_same_address_takes_over_its_socket() {
    let (_md, store) = store(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("popgate.yaml");
    let yaml = |listeners: &str| {
        format!(
            "listeners:\n{listeners}tenants:\n  acme:\n    domains: [example.com]\n    backends: [\"{}\"]\n    \
             plaintext_login: allow\n",
            store.local_addr()
        )
    };
    let listener =
        |name: &str, bind: &str| format!("  - name: {name}\n    bind: {bind}\n    tls: none\n");
    std::fs::write(&path, yaml(&listener("pop3", "127.0.0.1:0"))).unwrap();
    let config = popgate::Config::load(&path).unwrap();
    let pg = popgate::start_from_file(config, path.clone(), CancellationToken::new())
        .await
        .unwrap();
    let addr = pg.local_addr("pop3").unwrap();

    std::fs::write(&path, yaml(&listener("pop3-new", &addr.to_string()))).unwrap();
    pg.reload().await.unwrap();
    assert_eq!(pg.local_addr("pop3"), None);
    assert_eq!(pg.local_addr("pop3-new"), Some(addr));
    let mut c = Pop3::greeted(addr).await;
    c.login("u0@example.com", "pw").await;
    c.ok("QUIT").await;

    // Renaming back while adding a listener on a port somebody else holds: the reload fails, and the
    // listener that was stopped for it serves again where it was.
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let both = listener("pop3", &addr.to_string())
        + &listener("extra", &held.local_addr().unwrap().to_string());
    std::fs::write(&path, yaml(&both)).unwrap();
    let err = pg.reload().await.unwrap_err().to_string();
    assert!(err.contains("extra"), "{err}");
    assert_eq!(pg.local_addr("pop3-new"), Some(addr));
    assert_eq!(pg.local_addr("pop3"), None);
    let mut c = Pop3::greeted(addr).await;
    c.login("u0@example.com", "pw").await;
    c.ok("QUIT").await;
    pg.shutdown();
}
