//! Hot reload: what a reload changes (listeners, caps, certificates, the admin token), what it keeps (every
//! open session, the old certificate when the new one is broken), how a refused reload is told (status
//! code, log line naming the file, the status page), and that the file watcher reloads once per edit.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::time::Duration;

use support::admin;
use support::admin::config as admin_config;
use support::logs::logged_refusals;
use support::mailboxes::{maildrop, numbered};
use support::pop3::Pop3;
use support::popgate::{eventually, http, metric, plain_config, start_from_file, tenant};
use support::store::{Script, ScriptedStore};
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn reload_follows_file_changes_and_post_reload() {
    let (_a, server_a) = numbered(2, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("popgate.yaml");
    std::fs::write(&path, admin_config(server_a.local_addr(), "")).unwrap();
    let config_parsed = popgate::Config::load(&path).unwrap();
    let pg = popgate::start_from_file(config_parsed, path.clone(), CancellationToken::new())
        .await
        .unwrap();
    popgate::runtime::watch_config_dir(pg.runtime()).unwrap();
    // A second listener appears when the file changes.
    let with_listener = admin_config(server_a.local_addr(), "").replace(
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
async fn reload_under_500_sessions_drops_none_and_routes_new_logins() {
    const SESSIONS: usize = 500;
    let (_a, server_a) = numbered(SESSIONS + 1, 1).await;
    let (_b, server_b) = numbered(SESSIONS + 1, 2).await;
    let dir = tempfile::tempdir().unwrap();
    let pg = start_from_file(&admin_config(server_a.local_addr(), ""), dir.path()).await;
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
        admin_config(server_b.local_addr(), ""),
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

/// A listener replaced by one of another name on the same address needs the old socket closed before the new
/// one binds; a reload that fails after that brings the old one back. (The overlap rule itself, wildcards
/// included, is a unit test in `listener.rs`; this test stays on loopback and keeps the port held throughout,
/// so nothing else on the machine can take it between reloads.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_renamed_on_the_same_address_takes_over_its_socket() {
    let (_md, store) = numbered(1, 1).await;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_ip_and_global_caps_change_with_a_reload_and_keep_open_sessions() {
    let (_md, store) = maildrop(&["a@example.com", "b@example.com"], 2).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("popgate.yaml");
    let write = |per_ip: usize, global: usize| {
        let yaml = plain_config(
            &format!(
                "throttle:\n  trusted_networks: []\n  max_sessions_per_ip: {per_ip}\n\
                 limits:\n  max_connections: {global}\n"
            ),
            &tenant("acme", "example.com", store.local_addr(), ""),
        );
        std::fs::write(&path, yaml).unwrap();
    };
    write(1, 100);
    let config = popgate::Config::load(&path).unwrap();
    let pg = popgate::start_from_file(config, path.clone(), CancellationToken::new())
        .await
        .unwrap();
    let addr = pg.local_addr("pop3").unwrap();

    let (mut held, reply) = Pop3::login_reply(addr, "a@example.com", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    let mut refused = Pop3::connect(addr).await;
    let line = refused.try_line().await.unwrap_or_default();
    assert!(
        line.starts_with("-ERR"),
        "second connection from one address: {line:?}"
    );

    // Three per address now: the second connection is served; the held session was not touched.
    write(3, 100);
    pg.reload().await.unwrap();
    let (mut second, reply) = Pop3::login_reply(addr, "b@example.com", "pw").await;
    assert!(reply.starts_with("+OK"), "{reply}");
    held.ok("STAT").await;

    // The global cap down to 2 with two open: a third connection is refused, the two keep working.
    write(3, 2);
    pg.reload().await.unwrap();
    let mut third = Pop3::connect(addr).await;
    let line = third.try_line().await.unwrap_or_default();
    assert!(
        line.starts_with("-ERR"),
        "third connection past the global cap: {line:?}"
    );
    held.ok("STAT").await;
    second.ok("QUIT").await;
    assert!(second.until_eof().await.is_empty());
    held.ok("QUIT").await;
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
async fn admin_token_file_rotates_on_reload() {
    let (_md, server) = numbered(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("admin-token");
    std::fs::write(&token, "first-token\n").unwrap();
    let yaml = admin_config(server.local_addr(), "").replace(
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
async fn broken_certificate_reload_keeps_the_old_certificate_and_is_logged_and_counted() {
    support::logs::captured_log();
    let user = "alice@example.com";
    let (_md, server) = maildrop(&[user], 3).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let default_der = support::pki::write_self_signed(d, "default", &["localhost"]);
    let acme_der = support::pki::write_self_signed(d, "acme", &["pop.example.com"]);
    let yaml = format!(
        r#"listeners:
  - name: pop3s
    bind: 127.0.0.1:0
    tls: implicit
tls: {{certificate: default.crt, key: default.key}}
admin: {{bind: "127.0.0.1:0", token: s3cret}}
tenants:
  acme:
    domains: [example.com]
    backends: ["{}"]
    tls: {{certificate: acme.crt, key: acme.key, server_names: [pop.example.com]}}
"#,
        server.local_addr()
    );
    let pg = start_from_file(&yaml, d).await;
    let pop3s = pg.local_addr("pop3s").unwrap();
    let admin = format!("http://{}", pg.admin_addr().unwrap());
    let served = |sni: &'static str| async move {
        let mut c = Pop3::connect_tls(pop3s, sni).await;
        assert!(c.line().await.starts_with("+OK"));
        c.login(user, "pw").await;
        c.ok("QUIT").await;
        c.peer_cert.unwrap()
    };
    let reload = |admin: String| async move {
        tokio::task::spawn_blocking(move || {
            http("POST", &format!("{admin}/reload"), Some("s3cret"))
        })
        .await
        .unwrap()
    };
    assert_eq!(served("localhost").await, default_der);
    assert_eq!(served("pop.example.com").await, acme_der);

    // 1. The default certificate file is replaced by garbage.
    let good_default = std::fs::read(d.join("default.crt")).unwrap();
    std::fs::write(
        d.join("default.crt"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    let (code, body) = reload(admin.clone()).await;
    assert_eq!(code, 422, "reload with a broken certificate: {body}");
    assert_eq!(
        served("localhost").await,
        default_der,
        "the old default certificate is gone"
    );
    assert_eq!(served("pop.example.com").await, acme_der);
    std::fs::write(d.join("default.crt"), good_default).unwrap();

    // 2. The tenant's key is replaced by one that does not match its certificate.
    let other = rcgen::KeyPair::generate().unwrap();
    std::fs::write(d.join("acme.key"), other.serialize_pem()).unwrap();
    let (code, body) = reload(admin.clone()).await;
    assert_eq!(code, 422, "reload with a mismatched key: {body}");
    assert_eq!(
        served("pop.example.com").await,
        acme_der,
        "the old tenant certificate is gone"
    );
    assert_eq!(served("localhost").await, default_der);

    // Logged (once each, naming the field) and counted.
    let admin2 = admin.clone();
    let (_, metrics) =
        tokio::task::spawn_blocking(move || http("GET", &format!("{admin2}/metrics"), None))
            .await
            .unwrap();
    assert_eq!(
        metric(&metrics, "popgate_config_reloads_total{result=\"error\"}"),
        Some(2.0),
        "{metrics}"
    );
    let here = d.display().to_string();
    let refusals: Vec<String> = logged_refusals()
        .into_iter()
        .filter(|e| e.contains(&here))
        .collect();
    assert_eq!(refusals.len(), 2, "{refusals:#?}");
    assert!(
        refusals
            .iter()
            .any(|e| e.contains("tls.certificate") && !e.contains("tenants.")),
        "no logged refusal names the broken default certificate:\n{refusals:#?}"
    );
    assert!(
        refusals.iter().any(|e| e.contains("tenants.acme.tls")),
        "no logged refusal names the tenant with the mismatched key:\n{refusals:#?}"
    );

    // A good new certificate is then taken: the old one stayed because the new one was broken.
    let new_default = support::pki::write_self_signed(d, "default", &["localhost"]);
    std::fs::write(
        d.join("acme.key"),
        std::fs::read(d.join("default.key")).unwrap(),
    )
    .unwrap();
    support::pki::write_self_signed(d, "acme", &["pop.example.com"]);
    let (code, body) = reload(admin.clone()).await;
    assert_eq!(code, 200, "{body}");
    assert_eq!(served("localhost").await, new_default);
    eprintln!("refusals logged:\n{}", refusals.join("\n"));
    pg.shutdown();
}

/// The operator is told which file is broken. Today a corrupt certificate is reported as
/// `cannot load private key <key path>: invalid peer certificate: BadEncoding`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_refusal_names_the_broken_certificate_file() {
    support::logs::captured_log();
    let (_md, server) = maildrop(&["alice@example.com"], 3).await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    support::pki::write_self_signed(d, "default", &["localhost"]);
    let yaml = format!(
        "listeners:\n  - name: pop3s\n    bind: 127.0.0.1:0\n    tls: implicit\n\
         tls: {{certificate: default.crt, key: default.key}}\n\
         tenants:\n  acme:\n    domains: [example.com]\n    backends: [\"{}\"]\n",
        server.local_addr()
    );
    let pg = start_from_file(&yaml, d).await;
    std::fs::write(
        d.join("default.crt"),
        "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydGlmaWNhdGU=\n-----END CERTIFICATE-----\n",
    )
    .unwrap();
    assert!(pg.reload().await.is_err());
    let here = d.display().to_string();
    let entry = logged_refusals()
        .into_iter()
        .find(|e| e.contains(&here))
        .expect("the refusal was logged");
    assert!(
        entry.contains(&format!("{here}/default.crt")),
        "the log does not name the broken certificate file:\n{entry}"
    );
    assert!(
        !entry.contains("private key"),
        "the log blames the private key for a broken certificate:\n{entry}"
    );
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_error_reaches_the_status_page_only_as_text() {
    let store = ScriptedStore::start(Script::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let (pg, yaml) = admin::with_admin(store.addr, dir.path()).await;
    let admin = pg.admin_addr().unwrap();
    let path = dir.path().join("popgate.yaml");
    // The error names the unknown field: markup of the operator's (or an attacker's) choosing.
    std::fs::write(&path, format!("\"<script>alert(1)</script>\": 1\n{yaml}")).unwrap();
    let answer = admin::exchange(
        admin,
        admin::request("POST", "/reload", admin::TOKEN_HEADER),
    )
    .await;
    assert_eq!(admin::status_of(&answer), 422, "{answer}");
    assert!(answer.contains("<script>alert(1)</script>"), "{answer}");
    // The page is a static shell; its script puts /status's strings in the DOM as text, never as markup.
    let status = admin::exchange(admin, admin::request("GET", "/status", "")).await;
    assert!(status.contains("<script>alert(1)</script>"), "{status}");
    let page = admin::exchange(admin, admin::request("GET", "/", "")).await;
    assert_eq!(admin::status_of(&page), 200, "{page}");
    assert!(!page.contains("alert(1)"), "{page}");
    let lower = page.to_ascii_lowercase();
    assert_eq!(
        lower.matches("<script").count(),
        lower
            .matches("<script src=\"/status.js\" defer></script>")
            .count(),
        "an inline script on the page: {page}"
    );
    assert!(
        lower.contains("content-security-policy: default-src 'none'; script-src 'self'"),
        "{page}"
    );
    let script = admin::exchange(admin, admin::request("GET", "/status.js", "")).await;
    assert_eq!(admin::status_of(&script), 200, "{script}");
    for sink in [
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
    ] {
        assert!(!script.contains(sink), "the script uses {sink}");
    }
    pg.shutdown();
}

/// An operator edits the config once: popgate reloads (once, or twice for a write in two steps) and
/// then stays put. Found by the soak, where popgate reloaded ~2 times a second for the whole run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_config_edit_reloads_once_not_forever() {
    let (_md, server) = maildrop(&["alice@example.com"], 3).await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = plain_config("", &tenant("acme", "example.com", server.local_addr(), ""));
    let pg = start_from_file(&yaml, dir.path()).await;
    popgate::runtime::watch_config_dir(pg.runtime()).unwrap();
    std::fs::write(dir.path().join("popgate.yaml"), format!("{yaml}# edited\n")).unwrap();
    eventually(Duration::from_secs(10), "the edit to be reloaded", || {
        !pg.runtime().reloads().is_empty()
    })
    .await;
    // Nothing changes from here on; watch for six debounce periods of the watcher (500 ms each).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reloads = pg.runtime().reloads().len();
    assert!(
        reloads <= 2,
        "{reloads} reloads after one edit and 3 s of quiet"
    );
    pg.shutdown();
}

/// A reload rebuilds only the tenants it changed: an unchanged tenant keeps its runtime (its store
/// group, secrets, auth_http cache) even when an edit above it moves its lines, while a changed setting or
/// a changed secrets file rebuilds that tenant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rebuilds_only_the_tenants_it_changed() {
    let (_md, store) = numbered(1, 1).await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("secrets.yaml"), "u0@example.com: pw\n").unwrap();
    let acme = tenant(
        "acme",
        "example.com",
        store.local_addr(),
        "    secrets: secrets.yaml\n",
    );
    let other = |extra: &str| tenant("other", "other.example", store.local_addr(), extra);
    let pg = start_from_file(&plain_config("", &(acme.clone() + &other(""))), dir.path()).await;
    let runtime = |pg: &popgate::Running, name: &str| {
        let snapshot = pg.runtime().snapshot();
        let id = snapshot.table.tenant_by_name(name).unwrap();
        snapshot.tenant_arc(id).unwrap()
    };
    let (acme_before, other_before) = (runtime(&pg, "acme"), runtime(&pg, "other"));

    // A new tenant above both (every line moves) and a changed setting of `other`.
    let first = tenant("first", "first.example", store.local_addr(), "");
    std::fs::write(
        dir.path().join("popgate.yaml"),
        plain_config("", &(first + &acme + &other("    max_sessions: 5\n"))),
    )
    .unwrap();
    pg.reload().await.unwrap();
    assert!(
        std::sync::Arc::ptr_eq(&acme_before, &runtime(&pg, "acme")),
        "an unchanged tenant was rebuilt"
    );
    let said = pg.runtime().reloads().last().unwrap().message.clone();
    assert!(said.contains("3 tenants (2 rebuilt)"), "{said}");
    let other_after = runtime(&pg, "other");
    assert!(!std::sync::Arc::ptr_eq(&other_before, &other_after));
    assert_eq!(other_after.max_sessions, 5);

    // The secrets file changes: acme is rebuilt and logs in with the new password.
    std::fs::write(dir.path().join("secrets.yaml"), "u0@example.com: new\n").unwrap();
    pg.reload().await.unwrap();
    let acme_after = runtime(&pg, "acme");
    assert!(!std::sync::Arc::ptr_eq(&acme_before, &acme_after));
    let secrets = acme_after.secrets.as_ref().unwrap();
    assert!(secrets["u0@example.com"].matches(b"new"));
    pg.shutdown();
}
