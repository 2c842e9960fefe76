//! The fleet with real Dovecot stores: TLS and STLS to stores verified against a test CA, failover and
//! mailbox affinity when a store stops, health flips, client addresses through XCLIENT and PROXY v2, and
//! store discovery through SRV records that change at runtime.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::path::Path;
use std::time::Duration;

use support::dns::TestDns;
use support::dovecot::{DovecotStore, StoreOptions, TlsPem, pop3_retr_bytes};
use support::pki::TestCa;
use support::pop3::{Pop3, unstuff};
use support::popgate::Popgate;

const MSG: &[u8] = b"Subject: fleet\r\n\r\nhello from the fleet\r\n";

/// Logs in through popgate and returns the PASS answer; QUITs when it was +OK.
fn try_login(pg: &Popgate, listener: &str, user: &str, pass: &str) -> String {
    let addr = pg.addr(listener);
    pg.rt.block_on(async {
        let mut c = Pop3::greeted(addr).await;
        c.ok(&format!("USER {user}")).await;
        let r = c.cmd(&format!("PASS {pass}")).await;
        if r.starts_with("+OK") {
            c.ok("QUIT").await;
        }
        r
    })
}

/// Users `s0..s5@shared.test` with one message each and `a0..@affine.test` (`affine` of them) with
/// `messages`, all with password `pw`.
fn shared_and_affine_users(affine: usize, messages: &[&[u8]]) -> StoreOptions {
    let mut opts = StoreOptions::new();
    for i in 0..6 {
        opts = opts.user(&format!("s{i}@shared.test"), "pw", [MSG]);
    }
    for i in 0..affine {
        opts = opts.user(&format!("a{i}@affine.test"), "pw", messages.to_vec());
    }
    opts
}

fn logins_in_log(store: &DovecotStore, user: &str) -> usize {
    store
        .log_text()
        .matches(&format!("Login: user=<{user}>"))
        .count()
}

/// Which of `stores` logged `user` in (polls their logs: Dovecot writes the line a moment later).
fn store_of(stores: &[&DovecotStore], user: &str) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(i) = stores.iter().position(|s| logins_in_log(s, user) > 0) {
            return i;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no store logged {user} in"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn stores_over_implicit_tls_and_stls_are_verified_against_the_tenant_ca() {
    let ca = TestCa::new("popgate test CA");
    let leaf = ca.leaf(&["localhost", "127.0.0.1"]);
    let tls = TlsPem {
        cert_pem: leaf.cert_pem,
        key_pem: leaf.key_pem,
    };
    let users = || StoreOptions::new().user("alice@example.com", "alice-pw", [MSG]);
    let implicit = DovecotStore::start(users().tls(tls.clone()));
    // `ssl = required`: this store refuses any login that did not come over TLS, so a success proves STLS.
    let stls = DovecotStore::start(users().tls(tls).extra_config("ssl = required\n"));

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(
        dir.path().join("other-ca.pem"),
        TestCa::new("someone else").cert_pem(),
    )
    .unwrap();
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
tenants:
  secure:
    domains: [example.com]
    plaintext_login: allow
    backends:
      - {{address: "{}", tls: implicit}}
      - {{address: "{}", tls: starttls}}
    backend_tls: {{ca: ca.pem}}
  mistrusted:
    domains: [example.org]
    plaintext_login: allow
    backends:
      - {{address: "{}", tls: implicit}}
    backend_tls: {{ca: other-ca.pem}}
    pool: {{min_idle: 0}}
"#,
        implicit.pop3s_addr(),
        stls.pop3_addr(),
        implicit.pop3s_addr()
    );
    let pg = Popgate::start(&yaml, dir.path());
    let addr = pg.addr("pop3");
    for _ in 0..4 {
        let body = pg.rt.block_on(async {
            let mut c = Pop3::greeted(addr).await;
            c.login("alice@example.com", "alice-pw").await;
            let body = c.multiline("RETR 1").await;
            c.ok("QUIT").await;
            body
        });
        assert_eq!(unstuff(&body), pop3_retr_bytes(MSG));
    }
    // Round robin used both stores, each over TLS (Dovecot marks TLS logins with "TLS").
    for store in [&implicit, &stls] {
        let log = store.wait_for_log("Login: user=<alice@example.com>", Duration::from_secs(10));
        let login = log
            .lines()
            .find(|l| l.contains("Login: user=<alice@example.com>"))
            .unwrap();
        assert!(login.contains(", TLS,"), "{login}");
    }
    // A store whose certificate the tenant's CA did not sign is not trusted.
    let r = try_login(&pg, "pop3", "bob@example.org", "whatever");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert_eq!(logins_in_log(&implicit, "bob@example.org"), 0);
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn a_stopped_store_fails_over_with_shared_storage_and_not_with_affinity() {
    let opts = shared_and_affine_users(12, &[MSG]);
    let a = DovecotStore::start(opts.clone());
    let mut b = DovecotStore::start(opts.clone());
    let c = DovecotStore::start(opts);
    let (a_addr, b_addr, c_addr) = (a.pop3_addr(), b.pop3_addr(), c.pop3_addr());
    let health = "{interval: 200ms, timeout: 1s, rise: 2, fall: 2}";
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
tenants:
  shared:
    domains: [shared.test]
    plaintext_login: allow
    backends: ["{a_addr}", "{b_addr}", "{c_addr}"]
    shared_storage: true
    health: {health}
  affine:
    domains: [affine.test]
    plaintext_login: allow
    backends: ["{a_addr}", "{b_addr}", "{c_addr}"]
    balance: consistent_hash
    health: {health}
"#
    );
    let pg = Popgate::start(&yaml, Path::new("."));

    // Where each affine user lives, as the stores themselves saw it.
    let home: Vec<usize> = (0..12)
        .map(|i| {
            let user = format!("a{i}@affine.test");
            let r = try_login(&pg, "pop3", &user, "pw");
            assert!(r.starts_with("+OK"), "{user}: {r}");
            store_of(&[&a, &b, &c], &user)
        })
        .collect();
    assert!(
        home.contains(&1),
        "no affine user lives on store b: {home:?}"
    );
    // The same users land on the same stores again.
    for (i, &h) in home.iter().enumerate() {
        let user = format!("a{i}@affine.test");
        let before = logins_in_log([&a, &b, &c][h], &user);
        assert!(try_login(&pg, "pop3", &user, "pw").starts_with("+OK"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while logins_in_log([&a, &b, &c][h], &user) == before {
            assert!(
                std::time::Instant::now() < deadline,
                "{user} moved away from its store"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    // A load of short sessions while store b stops: with shared storage every one succeeds.
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let stopped_at = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut failures = Vec::new();
            for n in 0..40 {
                if n == 8 {
                    started_tx.send(()).unwrap();
                }
                let user = format!("s{}@shared.test", n % 6);
                let r = try_login(&pg, "pop3", &user, "pw");
                if !r.starts_with("+OK") {
                    failures.push(r);
                }
            }
            failures
        });
        started_rx.recv().unwrap();
        b.stop();
        let stopped_at = std::time::Instant::now();
        let failures = load.join().unwrap();
        assert!(
            failures.is_empty(),
            "sessions failed while a shared store stopped: {failures:?}"
        );
        stopped_at
    });

    // Health marks b down within fall x interval (plus one probe timeout and scheduling slack).
    let b_id = format!("127.0.0.1:{}", b_addr.port());
    pg.wait_until(Duration::from_secs(10), "store b down", |pg| {
        pg.health("affine")
            .iter()
            .any(|(id, up)| *id == b_id && !up)
    });
    let took = stopped_at.elapsed();
    assert!(
        took < Duration::from_millis(2 * 200 + 1000 + 1500),
        "down after {took:?}"
    );

    // Affinity: b's users get [SYS/TEMP], everyone else is untouched.
    for (i, &h) in home.iter().enumerate() {
        let r = try_login(&pg, "pop3", &format!("a{i}@affine.test"), "pw");
        if h == 1 {
            assert!(r.starts_with("-ERR [SYS/TEMP]"), "a{i}: {r}");
        } else {
            assert!(r.starts_with("+OK"), "a{i}: {r}");
        }
    }

    // b comes back: health flips up after `rise` good probes, and its users are served there again.
    b.restart();
    pg.wait_until(Duration::from_secs(10), "store b up", |pg| {
        pg.health("affine")
            .iter()
            .any(|(id, up)| *id == b_id && *up)
    });
    for (i, _) in home.iter().enumerate().filter(|(_, h)| **h == 1) {
        let r = try_login(&pg, "pop3", &format!("a{i}@affine.test"), "pw");
        assert!(r.starts_with("+OK"), "a{i} after restart: {r}");
    }
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn client_address_reaches_dovecot_through_xclient_and_proxy_v2() {
    let store = DovecotStore::start(
        StoreOptions::new()
            .user("u@x.test", "pw", [MSG])
            .user("u@p.test", "pw", [MSG])
            .haproxy(),
    );
    let yaml = format!(
        r#"
listeners:
  - name: lb
    bind: 127.0.0.1:0
    tls: none
    proxy_protocol: {{trusted_networks: ["127.0.0.0/8"]}}
  - name: lb-untrusted
    bind: 127.0.0.1:0
    tls: none
    proxy_protocol: {{trusted_networks: ["192.0.2.0/24"]}}
tenants:
  x:
    domains: [x.test]
    plaintext_login: allow
    backends: ["{}"]
    client_ip: xclient
    pool: {{xclient_at_user: true}}
  p:
    domains: [p.test]
    plaintext_login: allow
    backends: ["{}"]
    client_ip: proxy_v2
"#,
        store.pop3_addr(),
        store.haproxy_addr()
    );
    let pg = Popgate::start(&yaml, Path::new("."));
    let lb = pg.addr("lb");
    let via_balancer = |client: &str, user: &str| {
        let header = popgate::proxy_protocol::encode(2, client.parse().unwrap(), lb);
        pg.rt.block_on(async {
            let mut c = Pop3::connect(lb).await;
            c.send_raw(&header).await;
            assert!(c.line().await.starts_with("+OK"));
            c.login(user, "pw").await;
            c.ok("QUIT").await;
        });
    };
    // Inbound PROXY v2 names the client; XCLIENT hands it to Dovecot on a (possibly pre-warmed) connection.
    via_balancer("203.0.113.7:5555", "u@x.test");
    let log = store.wait_for_log("rip=203.0.113.7", Duration::from_secs(10));
    assert!(
        log.lines()
            .any(|l| l.contains("user=<u@x.test>") && l.contains("rip=203.0.113.7")),
        "{log}"
    );
    // With a pooled connection ready, XCLIENT goes at the client's USER and Dovecot answers it while the
    // client sends its password; the login that follows still carries the client's address.
    pg.wait_until(Duration::from_secs(10), "a pooled connection", |pg| {
        pg.running
            .stores()
            .iter()
            .any(|(t, stores)| t == "x" && stores.iter().any(|s| s.pool_idle > 0))
    });
    pg.rt.block_on(async {
        let header = popgate::proxy_protocol::encode(2, "203.0.113.8:5556".parse().unwrap(), lb);
        let mut c = Pop3::connect(lb).await;
        c.send_raw(&header).await;
        assert!(c.line().await.starts_with("+OK"));
        c.ok("USER u@x.test").await;
        // CAPA's answer comes after popgate sent XCLIENT for the USER before it.
        c.multiline("CAPA").await;
        c.ok("PASS pw").await;
        c.ok("STAT").await;
        c.ok("QUIT").await;
    });
    let log = store.wait_for_log("rip=203.0.113.8", Duration::from_secs(10));
    assert!(
        log.lines()
            .any(|l| l.contains("user=<u@x.test>") && l.contains("rip=203.0.113.8")),
        "{log}"
    );
    // PROXY v2 out, to Dovecot's haproxy listener.
    via_balancer("198.51.100.9:6666", "u@p.test");
    let log = store.wait_for_log("rip=198.51.100.9", Duration::from_secs(10));
    assert!(
        log.lines()
            .any(|l| l.contains("user=<u@p.test>") && l.contains("rip=198.51.100.9")),
        "{log}"
    );

    // Without a header, or from an untrusted network, popgate closes without a greeting.
    for listener in ["lb", "lb-untrusted"] {
        let addr = pg.addr(listener);
        let got = pg.rt.block_on(async {
            let mut c = Pop3::connect(addr).await;
            c.send_raw(b"USER u@x.test\r\n").await;
            c.until_eof().await
        });
        assert!(
            !got.starts_with(b"+OK"),
            "{listener}: {}",
            String::from_utf8_lossy(&got)
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn srv_records_add_and_remove_stores_without_restart() {
    let users = || StoreOptions::new().user("u@k8s.test", "pw", [MSG]);
    let s0 = DovecotStore::start(users());
    let s1 = DovecotStore::start(users());
    let dns = TestDns::start("mail.test.");
    let loopback = [std::net::IpAddr::from([127, 0, 0, 1])];
    dns.set_a("store-0.mail.test.", &loopback, 1);
    dns.set_a("store-1.mail.test.", &loopback, 1);
    let srv = "_pop3._tcp.stores.mail.test.";
    dns.set_srv(
        srv,
        &[(10, 1, s0.pop3_addr().port(), "store-0.mail.test.")],
        1,
    );
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
dns:
  nameservers: ["{}"]
  min_ttl: 200ms
  max_ttl: 1s
tenants:
  k8s:
    domains: [k8s.test]
    plaintext_login: allow
    backends: [{{srv: "_pop3._tcp.stores.mail.test"}}]
    health: {{interval: 200ms}}
"#,
        dns.addr()
    );
    let pg = Popgate::start(&yaml, Path::new("."));
    let ids = |pg: &Popgate| {
        pg.health("k8s")
            .into_iter()
            .map(|(id, _)| id)
            .collect::<Vec<_>>()
    };
    let id0 = format!("store-0.mail.test:{}", s0.pop3_addr().port());
    let id1 = format!("store-1.mail.test:{}", s1.pop3_addr().port());
    assert_eq!(ids(&pg), vec![id0.clone()]);
    assert!(try_login(&pg, "pop3", "u@k8s.test", "pw").starts_with("+OK"));
    s0.wait_for_log("Login: user=<u@k8s.test>", Duration::from_secs(10));

    // A store added to the SRV record starts taking sessions.
    dns.set_srv(
        srv,
        &[
            (10, 1, s0.pop3_addr().port(), "store-0.mail.test."),
            (10, 1, s1.pop3_addr().port(), "store-1.mail.test."),
        ],
        1,
    );
    pg.wait_until(Duration::from_secs(10), "store-1 to join", |pg| {
        ids(pg).len() == 2
    });
    for _ in 0..4 {
        assert!(try_login(&pg, "pop3", "u@k8s.test", "pw").starts_with("+OK"));
    }
    s1.wait_for_log("Login: user=<u@k8s.test>", Duration::from_secs(10));

    // A removed one stops taking them.
    dns.set_srv(
        srv,
        &[(10, 1, s1.pop3_addr().port(), "store-1.mail.test.")],
        1,
    );
    pg.wait_until(Duration::from_secs(10), "store-0 to leave", |pg| {
        ids(pg) == vec![id1.clone()]
    });
    let before0 = logins_in_log(&s0, "u@k8s.test");
    let before1 = logins_in_log(&s1, "u@k8s.test");
    for _ in 0..4 {
        assert!(try_login(&pg, "pop3", "u@k8s.test", "pw").starts_with("+OK"));
    }
    pg.wait_until(
        Duration::from_secs(10),
        "store-1 to log 4 more logins",
        |_| logins_in_log(&s1, "u@k8s.test") >= before1 + 4,
    );
    assert_eq!(
        logins_in_log(&s0, "u@k8s.test"),
        before0,
        "a removed store still took sessions"
    );

    // DNS stops answering: the last good answer keeps serving.
    dns.stop();
    assert!(try_login(&pg, "pop3", "u@k8s.test", "pw").starts_with("+OK"));
    assert_eq!(ids(&pg), vec![id1]);
}

/// The operator's runtime store states with real Dovecot stores and sessions in flight: `drain` takes no
/// new logins and lets sessions go on; `maint` also ends them, without QUIT, so a DELE they sent is not
/// committed; `ready` takes logins again. A user whose mail lives on a store that takes no logins is
/// refused (never sent to a store without their mail); with shared storage, logins go to the others.
#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn runtime_store_states_drain_keeps_sessions_and_maint_ends_them_without_quit() {
    use support::popgate::http;
    let opts = shared_and_affine_users(8, &[MSG, MSG]);
    let a = DovecotStore::start(opts.clone());
    let b = DovecotStore::start(opts);
    let (a_addr, b_addr) = (a.pop3_addr(), b.pop3_addr());
    let yaml = format!(
        r#"
listeners:
  - name: pop3
    bind: 127.0.0.1:0
    tls: none
admin:
  bind: 127.0.0.1:0
tenants:
  shared:
    domains: [shared.test]
    plaintext_login: allow
    backends: ["{a_addr}", "{b_addr}"]
    shared_storage: true
  affine:
    domains: [affine.test]
    plaintext_login: allow
    backends: ["{a_addr}", "{b_addr}"]
    balance: consistent_hash
"#
    );
    let pg = Popgate::start(&yaml, Path::new("."));
    let admin = format!("http://{}", pg.running.admin_addr().unwrap());
    let a_label = a_addr.to_string();
    let set = |query: &str| {
        let (code, body) = http("POST", &format!("{admin}/stores/state?{query}"), None);
        assert_eq!(code, 200, "{query}: {body}");
    };
    let status = || -> serde_json::Value {
        serde_json::from_str(&http("GET", &format!("{admin}/status"), None).1).unwrap()
    };
    // An affine user whose mail lives on a, found as the stores saw it.
    let on_a = (0..8)
        .map(|i| format!("a{i}@affine.test"))
        .find(|user| {
            assert!(try_login(&pg, "pop3", user, "pw").starts_with("+OK"));
            store_of(&[&a, &b], user) == 0
        })
        .expect("no affine user lives on store a");
    let pop3 = pg.addr("pop3");
    let mut session = pg.rt.block_on(async {
        let mut c = Pop3::greeted(pop3).await;
        c.login(&on_a, "pw").await;
        c.ok("DELE 1").await;
        c
    });

    set(&format!("store={a_label}&state=drain"));
    let st = status();
    let row = st["stores"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["store"] == a_label.as_str())
        .unwrap()
        .clone();
    assert_eq!(row["state"], "drain", "{st}");
    assert_eq!(row["sessions"], 1, "{st}");
    let (_, metrics) = http("GET", &format!("{admin}/metrics"), None);
    assert_eq!(
        support::popgate::metric(
            &metrics,
            &format!("popgate_store_state{{state=\"drain\",store=\"{a_label}\"}}")
        ),
        Some(1.0)
    );
    // The session on the drained store goes on.
    pg.rt.block_on(async {
        assert!(session.ok("STAT").await.starts_with("+OK 1 "));
    });
    // New logins: the affine user is refused for now (a is where its mail is), shared users go to b.
    let r = try_login(&pg, "pop3", &on_a, "pw");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    let before: Vec<usize> = (0..6)
        .map(|i| logins_in_log(&a, &format!("s{i}@shared.test")))
        .collect();
    for i in 0..6 {
        let r = try_login(&pg, "pop3", &format!("s{i}@shared.test"), "pw");
        assert!(r.starts_with("+OK"), "s{i} while a drains: {r}");
    }
    let after: Vec<usize> = (0..6)
        .map(|i| logins_in_log(&a, &format!("s{i}@shared.test")))
        .collect();
    assert_eq!(before, after, "a drained store took new logins");

    // Maintenance ends the session, without QUIT: its DELE is not committed.
    // Dovecot's summary of a session: a line naming the user with `del=`.
    let summaries = |store: &DovecotStore| -> Vec<String> {
        store
            .log_text()
            .lines()
            .filter(|l| l.contains(&format!("({on_a})")) && l.contains("del="))
            .map(str::to_string)
            .collect()
    };
    let sessions_before = summaries(&a).len();
    set(&format!("store={a_label}&state=maint"));
    pg.rt.block_on(async {
        assert!(session.until_eof().await.is_empty());
    });
    // The kicked session's summary: nothing deleted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while summaries(&a).len() < sessions_before + 1 {
        assert!(std::time::Instant::now() < deadline, "{}", a.log_text());
        std::thread::sleep(Duration::from_millis(20));
    }
    let last = summaries(&a).pop().unwrap();
    assert!(last.contains("del=0/2"), "{last}");
    assert_eq!(a.maildir_message_count(&on_a), 2, "maint committed a DELE");

    // Ready again: the user's logins reach a.
    set(&format!("store={a_label}&state=ready"));
    let r = try_login(&pg, "pop3", &on_a, "pw");
    assert!(r.starts_with("+OK"), "{r}");
    let (code, body) = http(
        "POST",
        &format!("{admin}/stores/state?store=nowhere:1&state=drain"),
        None,
    );
    assert_eq!(code, 404, "{body}");
}
