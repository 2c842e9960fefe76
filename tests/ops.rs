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
        // The operator's signals: build, connections against the cap, logins as clients see them, the
        // last reload, the stores' runtime state and weight.
        "popgate_connections_open ",
        "popgate_connections_max 10000",
        "popgate_login_duration_seconds_count{result=\"ok\",tenant=\"acme\"} 1",
        "popgate_login_duration_seconds_count{result=\"rejected\",tenant=\"acme\"} 1",
        "popgate_config_last_reload_successful 1",
        "popgate_config_last_reload_success_timestamp_seconds ",
        "popgate_store_weight{store=",
    ] {
        assert!(m.contains(needle), "missing {needle} in\n{m}");
    }
    let build = format!(
        "popgate_build_info{{tls_provider=\"{}\",version=\"{}\"}} 1",
        popgate::certs::PROVIDER_NAME,
        env!("CARGO_PKG_VERSION")
    );
    assert!(m.contains(&build), "missing {build} in\n{m}");
    let store = server.local_addr();
    assert_eq!(
        support::popgate::metric(
            m,
            &format!("popgate_store_state{{state=\"ready\",store=\"{store}\"}}")
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        support::popgate::metric(
            m,
            &format!("popgate_store_state{{state=\"drain\",store=\"{store}\"}}")
        ),
        Some(0.0),
        "{m}"
    );
    // Still open: the session that failed its login.
    assert!(
        support::popgate::metric(m, "popgate_connections_open").is_some_and(|n| n >= 1.0),
        "{m}"
    );
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
    assert!(page.1.contains("<script src=\"/status.js\""), "{}", page.1);
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
    let (_md, server) = numbered(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = admin_config(server.local_addr(), "");
    let pg = start_from_file(&yaml, dir.path()).await;
    let admin = format!("http://{}", pg.admin_addr().unwrap());
    let store = server.local_addr().to_string();
    // One session open, one login refused; the store drained by the operator; one reload refused whose
    // error carries markup (it must show as text).
    let mut open = Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
    open.login("u0@example.com", "pw").await;
    let mut refused = Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
    refused.ok("USER u1@example.com").await;
    assert!(refused.cmd("PASS wrong").await.starts_with("-ERR"));
    std::fs::write(
        dir.path().join("popgate.yaml"),
        format!("\"<b>bold</b>\": 1\n{yaml}"),
    )
    .unwrap();
    let url = format!("{admin}/");
    let (drained, reload, status) = tokio::task::spawn_blocking({
        let admin = admin.clone();
        let store = store.clone();
        move || {
            let token = Some(support::admin::TOKEN);
            (
                http(
                    "POST",
                    &format!("{admin}/stores/state?store={store}&state=drain&weight=3"),
                    token,
                ),
                http("POST", &format!("{admin}/reload"), token),
                http("GET", &format!("{admin}/status"), None),
            )
        }
    })
    .await
    .unwrap();
    assert_eq!(drained.0, 200, "{}", drained.1);
    assert_eq!(reload.0, 422, "{}", reload.1);
    let status: serde_json::Value = serde_json::from_str(&status.1).unwrap();

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
            "--window-size=1400,1100",
            // Virtual time: the page's script runs its fetches and two timed refreshes before the dump.
            "--virtual-time-budget=11000",
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
    let stderr = String::from_utf8_lossy(&dom.stderr);
    // Drawn from /status, and redrawn by the timer without reloading the page.
    let refreshes: u32 = between(&html, "data-refreshes=\"", "\"")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("the page never drew /status:\n{html}\n{stderr}"));
    assert!(refreshes >= 2, "drawn {refreshes} times:\n{html}");
    assert!(!html.contains("http-equiv=\"refresh\""), "{html}");
    assert_eq!(
        between(&html, "<span id=\"version\" class=\"muted\">", "<"),
        status["version"].as_str(),
        "{html}"
    );
    assert_eq!(
        between(&html, "<b id=\"sessions\">", "<"),
        Some(status["sessions"].to_string().as_str()),
        "{html}"
    );
    assert_eq!(status["sessions"], 1);
    // The tenant's row: its sessions now, logins since the start by result, rates once redrawn.
    let tenant = between(&html, "<tr data-tenant=\"acme\">", "</tr>").expect("the tenant's row");
    assert!(
        tenant.contains("<td class=\"num sessions\">1</td>"),
        "{tenant}"
    );
    assert!(
        tenant.contains("<td class=\"num logins-ok\">1 ok / 1 refused / 0 failed</td>"),
        "{tenant}"
    );
    assert!(
        tenant.contains("<td class=\"num ok-rate\">0.0</td>"),
        "no rate after a redraw: {tenant}"
    );
    // The store's row: health with its age, the operator's state and weight, and the controls.
    let row = between(
        &html,
        &format!("<tr data-store=\"{store}\" class=\"up\">"),
        "</tr>",
    )
    .unwrap_or_else(|| panic!("the store's row:\n{html}"));
    assert!(row.contains("<td class=\"health\">UP for "), "{row}");
    assert!(row.contains("<b class=\"state-name\">drain</b>"), "{row}");
    assert!(
        row.contains("<span class=\"weight-value\">3</span>"),
        "{row}"
    );
    for state in ["ready", "maint"] {
        assert!(
            row.contains(&format!(
                "data-store=\"{store}\" data-state=\"{state}\" type=\"button\">{state}</button>"
            )),
            "no {state} button: {row}"
        );
    }
    assert!(row.contains("<td class=\"num sessions\">1</td>"), "{row}");
    assert_eq!(status["stores"][0]["state"], "drain");
    assert_eq!(status["stores"][0]["weight"], 3);
    // The refused reload's error, as text: the markup is escaped in the DOM, never an element.
    assert!(html.contains("&lt;b&gt;bold&lt;/b&gt;"), "{html}");
    assert!(!html.contains("<b>bold</b>"), "{html}");
    assert!(html.contains("<form id=\"kick\">"), "{html}");
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
    open.ok("QUIT").await;
    pg.shutdown();
}

/// The text between the first `start` and the next `end` after it.
fn between<'a>(text: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = text.find(start)? + start.len();
    let len = text[from..].find(end)?;
    Some(&text[from..from + len])
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

/// `GET /sessions` lists the logged-in sessions (no secrets), filtered by tenant, store, mailbox pattern
/// and client network, and paged; `POST /kick` takes the same filters and ends exactly those sessions,
/// without QUIT (a DELE of a kicked session is not committed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn sessions_are_listed_and_kicked_by_pattern_tenant_store_and_network() {
    let (md, com) = numbered(3, 1).await;
    let (_md2, net) = support::mailboxes::maildrop(&["u0@example.net"], 1).await;
    let beta = format!(
        "  beta:\n    domains: [example.net]\n    backends: [\"{}\"]\n    plaintext_login: allow\n",
        net.local_addr()
    );
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&admin_config(com.local_addr(), &beta), dir.path()).await;
    let pop3 = pg.local_addr("pop3").unwrap();
    let admin = format!("http://{}", pg.admin_addr().unwrap());
    let mut a0 = Pop3::greeted(pop3).await;
    a0.login("u0@example.com", "pw").await;
    a0.ok("DELE 1").await;
    let mut a1 = Pop3::greeted(pop3).await;
    a1.login("u1@example.com", "pw").await;
    let mut a2 = Pop3::greeted_from(pop3, "127.0.0.2".parse().unwrap()).await;
    a2.login("u2@example.com", "pw").await;
    let mut b0 = Pop3::greeted(pop3).await;
    b0.login("u0@example.net", "pw").await;

    let call = |method: &'static str, path: String| {
        let url = format!("{admin}{path}");
        tokio::task::spawn_blocking(move || http(method, &url, Some(support::admin::TOKEN)))
    };
    let json = |(code, body): (u16, String)| -> serde_json::Value {
        assert_eq!(code, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    };
    let all = json(call("GET", "/sessions".into()).await.unwrap());
    assert_eq!(all["total"], 4, "{all}");
    let text = all.to_string();
    assert!(!text.contains("\"pw\""), "a password in /sessions: {text}");
    let first = &all["sessions"][0];
    assert_eq!(first["mailbox"], "u0@example.com", "oldest first: {all}");
    assert_eq!(first["tenant"], "acme");
    assert_eq!(first["store"], com.local_addr().to_string());
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["listener"], "pop3");
    assert!(first["since"].as_u64().is_some() && first["age_seconds"].as_u64().is_some());

    let beta_only = json(call("GET", "/sessions?tenant=beta".into()).await.unwrap());
    assert_eq!(beta_only["total"], 1, "{beta_only}");
    assert_eq!(beta_only["sessions"][0]["mailbox"], "u0@example.net");
    let store = net.local_addr().to_string();
    let by_store = json(
        call("GET", format!("/sessions?store={store}"))
            .await
            .unwrap(),
    );
    assert_eq!(
        by_store["sessions"][0]["mailbox"], "u0@example.net",
        "{by_store}"
    );
    let page = json(
        call(
            "GET",
            "/sessions?mailbox=u*%40example.com&limit=2&offset=1".into(),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        (
            page["total"].as_u64(),
            page["sessions"].as_array().map(Vec::len)
        ),
        (Some(3), Some(2)),
        "{page}"
    );
    assert_eq!(page["sessions"][0]["mailbox"], "u1@example.com", "{page}");
    let from = json(
        call("GET", "/sessions?network=127.0.0.2/32".into())
            .await
            .unwrap(),
    );
    assert_eq!(from["total"], 1, "{from}");
    assert_eq!(from["sessions"][0]["mailbox"], "u2@example.com");
    let (code, _) = call("GET", "/sessions?network=nowhere".into())
        .await
        .unwrap();
    assert_eq!(code, 400);
    let (code, _) = call("POST", "/kick".into()).await.unwrap();
    assert_eq!(code, 400, "a kick without a filter would end every session");

    // A pattern (any case) from one network: u0 and u1, not u2 (another address) nor beta's u0.
    let kicked = json(
        call(
            "POST",
            "/kick?mailbox=U%3F%40EXAMPLE.COM&network=127.0.0.1".into(),
        )
        .await
        .unwrap(),
    );
    assert_eq!(kicked["kicked"], 2, "{kicked}");
    assert!(a0.until_eof().await.is_empty());
    assert!(a1.until_eof().await.is_empty());
    assert!(a2.ok("STAT").await.starts_with("+OK"));
    assert!(b0.ok("STAT").await.starts_with("+OK"));
    let kicked = json(call("POST", format!("/kick?store={store}")).await.unwrap());
    assert_eq!(kicked["kicked"], 1, "{kicked}");
    assert!(b0.until_eof().await.is_empty());
    let kicked = json(call("POST", "/kick?tenant=acme".into()).await.unwrap());
    assert_eq!(kicked["kicked"], 1, "{kicked}");
    assert!(a2.until_eof().await.is_empty());
    // The registry lets go of a session as its relay ends, a moment after the client saw the close.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let left = json(call("GET", "/sessions".into()).await.unwrap());
        if left["total"] == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "sessions left: {left}"
        );
    }
    // The kicked session's DELE was never committed (the store only deletes at QUIT).
    assert_eq!(md.messages("u0@example.com").unwrap().len(), 1);

    // A store's runtime state and weight last until the next reload.
    let set = json(
        call(
            "POST",
            format!("/stores/state?store={store}&state=drain&weight=7"),
        )
        .await
        .unwrap(),
    );
    assert_eq!(
        (set["stores"].as_u64(), set["state"].as_str()),
        (Some(1), Some("drain")),
        "{set}"
    );
    let state_of = |st: &serde_json::Value| {
        let row = st["stores"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["store"] == store.as_str())
            .unwrap();
        (row["state"].clone(), row["weight"].clone())
    };
    let st = json(call("GET", "/status".into()).await.unwrap());
    assert_eq!(
        state_of(&st),
        (serde_json::json!("drain"), serde_json::json!(7)),
        "{st}"
    );
    json(call("POST", "/reload".into()).await.unwrap());
    let st = json(call("GET", "/status".into()).await.unwrap());
    assert_eq!(
        state_of(&st),
        (serde_json::json!("ready"), serde_json::Value::Null),
        "{st}"
    );
    let (code, _) = call("POST", format!("/stores/state?store={store}&state=off"))
        .await
        .unwrap();
    assert_eq!(code, 400);
    pg.shutdown();
}

/// A certificate for `names` valid until midnight UTC of `(year, month, day)`, written as `dir/stem.crt`
/// and `.key`; returns its notAfter in Unix seconds.
fn certificate_until(dir: &Path, stem: &str, names: &[&str], (y, m, d): (i32, u8, u8)) -> i64 {
    let mut params =
        rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    params.not_after = rcgen::date_time_ymd(y, m, d);
    let not_after = params.not_after.unix_timestamp();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    std::fs::write(dir.join(format!("{stem}.crt")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{stem}.key")), key.serialize_pem()).unwrap();
    not_after
}

/// Every served certificate's notAfter is a series (the default one and each tenant's), in `/status`
/// too, and a renewed certificate shows its new date after the reload that picks it up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn certificate_expiry_is_exported_per_served_certificate() {
    let (_md, server) = numbered(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let default_until =
        certificate_until(dir.path(), "default", &["pop.example.net"], (2031, 5, 6));
    let acme_until = certificate_until(dir.path(), "acme", &["pop.example.com"], (2030, 1, 2));
    let yaml = format!(
        "listeners:\n  - name: pop3s\n    bind: 127.0.0.1:0\n    tls: implicit\n\
         tls: {{certificate: default.crt, key: default.key}}\n\
         admin:\n  bind: 127.0.0.1:0\n\
         tenants:\n  acme:\n    domains: [example.com]\n    backends: [\"{}\"]\n    \
         tls: {{certificate: acme.crt, key: acme.key}}\n",
        server.local_addr()
    );
    let pg = start_from_file(&yaml, dir.path()).await;
    let admin = format!("http://{}", pg.admin_addr().unwrap());
    let scrape = |admin: String| async move {
        tokio::task::spawn_blocking(move || http("GET", &format!("{admin}/metrics"), None).1)
            .await
            .unwrap()
    };
    // Labelled with the file as the config names it.
    let series = |tenant: &str, file: &str| {
        format!(
            "popgate_tls_certificate_expiry_timestamp_seconds{{certificate=\"{file}\",tenant=\"{tenant}\"}}"
        )
    };
    let m = scrape(admin.clone()).await;
    assert_eq!(
        support::popgate::metric(&m, &series("_default", "default.crt")),
        Some(default_until as f64),
        "{m}"
    );
    assert_eq!(
        support::popgate::metric(&m, &series("acme", "acme.crt")),
        Some(acme_until as f64),
        "{m}"
    );
    // Renewed on disk: the reload serves the new certificate and exports its date.
    let renewed = certificate_until(dir.path(), "acme", &["pop.example.com"], (2032, 7, 8));
    pg.reload().await.unwrap();
    let m = scrape(admin.clone()).await;
    assert_eq!(
        support::popgate::metric(&m, &series("acme", "acme.crt")),
        Some(renewed as f64),
        "{m}"
    );
    let (_, status) =
        tokio::task::spawn_blocking(move || http("GET", &format!("{admin}/status"), None))
            .await
            .unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let acme = status["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["tenant"] == "acme")
        .unwrap();
    assert_eq!(acme["not_after"], renewed, "{status}");
    pg.shutdown();
}
