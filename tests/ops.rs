//! Operations: the admin endpoints, metrics (checked by promtool on a real scrape), hot reload under load,
//! graceful drain, kicking a mailbox's sessions.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::admin::config as admin_config;
use support::mailboxes::numbered;
use support::pop3::Pop3;
use support::popgate::{http, start_from_file};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn admin_endpoints_metrics_and_promtool() {
    let (_md, server) = numbered(2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&admin_config(server.local_addr(), ""), dir.path()).await;
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
        "popgate_store_up{store=",
        "popgate_tenant_stores_up{tenant=\"acme\"} 1",
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
async fn drain_refuses_new_work_lets_relays_finish_then_closes_without_quit() {
    let (md, server) = numbered(3, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&admin_config(server.local_addr(), ""), dir.path()).await;
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
    let (md, server) = numbered(2, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&admin_config(server.local_addr(), ""), dir.path()).await;
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
    let (_md, server) = numbered(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&admin_config(server.local_addr(), ""), dir.path()).await;
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
    let (_md, server) = numbered(1, 1).await;
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
