//! Placement lookups end to end: a tenant's directory (a map file, OpenLDAP, PostgreSQL, MariaDB, each a
//! real server started here) names the Dovecot store of each mailbox, and real clients log in through
//! popgate. Also: names built to break a filter or a query find nothing, a directory that stops serves
//! cached answers for their stale window and `[SYS/TEMP]` otherwise, an answer outside the tenant is
//! refused, and a map of a million mailboxes loads and reloads under logins.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use support::clients::{curl_pop3, pop3_url};
use support::dovecot::{DovecotStore, StoreOptions};
use support::pop3::Pop3;
use support::popgate::Popgate;

const MSG: &[u8] = b"Subject: placed\r\n\r\nwhere am I\r\n";

/// Two Dovecot stores holding the same users: one message each on `a`, two on `b`, so a LIST says
/// which store a login reached.
fn two_stores(users: &[&str]) -> (DovecotStore, DovecotStore) {
    let (mut on_a, mut on_b) = (StoreOptions::new(), StoreOptions::new());
    for u in users {
        on_a = on_a.user(u, "pw", [MSG]);
        on_b = on_b.user(u, "pw", [MSG, MSG]);
    }
    (DovecotStore::start(on_a), DovecotStore::start(on_b))
}

/// popgate with one tenant `acme` (example.com) over both stores and this `placement:` block (YAML
/// indented under `placement:`).
fn popgate(a: &DovecotStore, b: &DovecotStore, placement: &str, base: &Path) -> Popgate {
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\nadmin:\n  bind: 127.0.0.1:0\n\
         tenants:\n  acme:\n    domains: [example.com]\n    plaintext_login: allow\n    \
         backends: [\"{}\", \"{}\"]\n    placement:\n{placement}",
        a.pop3_addr(),
        b.pop3_addr()
    );
    Popgate::start(&yaml, base)
}

/// How many messages `user` sees through popgate (curl's LIST): 1 on store a, 2 on store b; the error
/// when curl could not log in.
fn listed(pop3: SocketAddr, user: &str) -> Result<usize, String> {
    let out = curl_pop3(
        &pop3_url(pop3, ""),
        user,
        "pw",
        &["--login-options", "AUTH=PLAIN"],
    );
    if out.code != Some(0) {
        return Err(out.stderr);
    }
    Ok(String::from_utf8_lossy(&out.stdout).lines().count())
}

/// The answer to `PASS` for `user` through popgate (QUIT after a +OK).
fn pass_reply(pg: &Popgate, user: &str) -> String {
    let addr = pg.addr("pop3");
    pg.rt.block_on(async {
        let mut c = Pop3::greeted(addr).await;
        let r = c.cmd(&format!("USER {user}")).await;
        if !r.starts_with("+OK") {
            return r;
        }
        let r = c.cmd("PASS pw").await;
        if r.starts_with("+OK") {
            c.ok("QUIT").await;
        }
        r
    })
}

fn logins_in_log(store: &DovecotStore, user: &str) -> usize {
    store
        .log_text()
        .matches(&format!("Login: user=<{user}>"))
        .count()
}

fn scrape(pg: &Popgate) -> String {
    let admin = pg.running.admin_addr().unwrap();
    support::popgate::http("GET", &format!("http://{admin}/metrics"), None).1
}

fn status(pg: &Popgate) -> serde_json::Value {
    let admin = pg.running.admin_addr().unwrap();
    serde_json::from_str(&support::popgate::http("GET", &format!("http://{admin}/status"), None).1)
        .unwrap()
}

/// Writes `text` to `path` in one rename, as a deploy tool (or a Kubernetes volume) would.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn a_map_file_places_mailboxes_reloads_and_refuses_what_is_not_the_tenants() {
    let users = [
        "alice@example.com",
        "bob@example.com",
        "carol@example.com",
        "dave@example.com",
    ];
    let (a, b) = two_stores(&users);
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("acme.map");
    let outside = "127.0.0.1:1";
    replace_file(
        &map,
        &format!(
            "# mailbox store\nAlice@Example.com {}\nbob@example.com {}\ndave@example.com {outside}\n",
            a.pop3_addr(),
            b.pop3_addr()
        ),
    );
    let pg = popgate(
        &a,
        &b,
        "      map: acme.map\n      not_found: refuse\n",
        dir.path(),
    );
    let pop3 = pg.addr("pop3");
    assert_eq!(listed(pop3, "alice@example.com"), Ok(1), "alice lives on a");
    assert_eq!(listed(pop3, "bob@example.com"), Ok(2), "bob lives on b");
    // Not in the map, refused as a wrong password would be; no store was asked.
    let r = pass_reply(&pg, "carol@example.com");
    assert_eq!(r, "-ERR [AUTH] Authentication failed.", "{r}");
    assert_eq!(
        logins_in_log(&a, "carol@example.com") + logins_in_log(&b, "carol@example.com"),
        0
    );
    // A store that is not the tenant's: refused, counted, never connected to.
    let r = pass_reply(&pg, "dave@example.com");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    let m = scrape(&pg);
    let series = |result: &str| {
        format!(
            "popgate_placement_lookups_total{{result=\"{result}\",source=\"map\",tenant=\"acme\"}}"
        )
    };
    assert_eq!(
        support::popgate::metric(&m, &series("found")),
        Some(3.0),
        "{m}"
    );
    assert_eq!(
        support::popgate::metric(&m, &series("not_found")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        support::popgate::metric(&m, &series("refused")),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        support::popgate::metric(&m, "popgate_placement_map_entries{tenant=\"acme\"}"),
        Some(3.0)
    );

    // A session open across the reload goes on; alice moves to b; a bad file leaves the map as it was.
    let mut held = pg.rt.block_on(async {
        let mut c = Pop3::greeted(pop3).await;
        c.login("bob@example.com", "pw").await;
        c
    });
    replace_file(&map, &format!("alice@example.com {}\n", b.pop3_addr()));
    pg.wait_until(Duration::from_secs(10), "alice to move to b", |_| {
        listed(pop3, "alice@example.com") == Ok(2)
    });
    replace_file(&map, "this line has no store\n");
    assert_eq!(status(&pg)["tenants"][0]["placement"]["source"], "map");
    pg.wait_until(Duration::from_secs(10), "the bad map to be read", |pg| {
        // The refused file leaves the running map (one mailbox) in place.
        status(pg)["tenants"][0]["placement"]["mailboxes"] == 1
    });
    assert_eq!(listed(pop3, "alice@example.com"), Ok(2));
    pg.rt.block_on(async {
        assert!(held.ok("STAT").await.starts_with("+OK 2 "));
        held.ok("QUIT").await;
    });
}

/// A map of a million mailboxes: its load time and memory are reported (not asserted: figures go to
/// BENCHMARKS.md), it answers right, and swapping it for another million while logins run drops none.
#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn a_million_mailbox_map_loads_and_reloads_under_logins() {
    const N: usize = 1_000_000;
    let users = ["u0@example.com", "u1@example.com"];
    let (a, b) = two_stores(&users);
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("big.map");
    let write_map = |first: SocketAddr, second: SocketAddr| {
        let mut text = String::with_capacity(N * 40);
        text.push_str(&format!(
            "u0@example.com {first}\nu1@example.com {second}\n"
        ));
        for i in 2..N {
            text.push_str(&format!(
                "user{i}@example.com store-{}.mail.internal:110\n",
                i % 7
            ));
        }
        replace_file(&map, &text);
    };
    write_map(a.pop3_addr(), b.pop3_addr());

    let started = Instant::now();
    let index =
        popgate::placement::map::MapIndex::load(&map, popgate::vocab::LoginCase::Insensitive)
            .unwrap();
    let took = started.elapsed();
    assert_eq!(index.len(), N);
    assert_eq!(
        index.get("user999999@example.com"),
        Some(("store-0.mail.internal:110", None)) // 999999 = 7 × 142857
    );
    eprintln!(
        "placement map: {N} mailboxes loaded in {took:?} (debug build), {} bytes, {:.1} bytes per mailbox",
        index.heap_bytes(),
        index.heap_bytes() as f64 / N as f64
    );
    drop(index);

    let pg = popgate(&a, &b, "      map: big.map\n", dir.path());
    let pop3 = pg.addr("pop3");
    assert_eq!(listed(pop3, "u0@example.com"), Ok(1));
    let mut held = pg.rt.block_on(async {
        let mut c = Pop3::greeted(pop3).await;
        c.login("u1@example.com", "pw").await;
        c
    });
    // Logins keep coming while the map is swapped for one that places u0 on b.
    std::thread::scope(|s| {
        let logins = s.spawn(|| {
            let mut seen_b = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while Instant::now() < deadline {
                let n = listed(pop3, "u0@example.com").expect("a login failed during the swap");
                assert!(n == 1 || n == 2, "{n}");
                if n == 2 {
                    seen_b += 1;
                    if seen_b == 3 {
                        break;
                    }
                }
            }
            seen_b
        });
        write_map(b.pop3_addr(), b.pop3_addr());
        assert_eq!(logins.join().unwrap(), 3, "the new map never took effect");
    });
    pg.rt.block_on(async {
        assert!(
            held.ok("STAT").await.starts_with("+OK 2 "),
            "a session was dropped"
        );
        held.ok("QUIT").await;
    });
}

/// A directory under test: how to add a mailbox's row or entry, and stop and start it.
trait Directory {
    /// `mailbox` lives on `store`, logging in there as `login` when given.
    fn add(&self, mailbox: &str, store: &str, login: Option<&str>);
    fn stop(&mut self);
    fn restart(&mut self);
}

impl Directory for support::directory::Slapd {
    /// An entry named by its mail, the login (when given) in `description`.
    fn add(&self, mailbox: &str, store: &str, login: Option<&str>) {
        let mut ldif = format!(
            "dn: cn={mailbox},{}\nobjectClass: inetOrgPerson\nobjectClass: inetLocalMailRecipient\n\
             cn: {mailbox}\nsn: {mailbox}\nmail: {mailbox}\nmailHost: {store}\n",
            support::directory::Slapd::PEOPLE
        );
        if let Some(login) = login {
            ldif.push_str(&format!("description: {login}\n"));
        }
        self.add_ldif(&ldif);
    }
    fn stop(&mut self) {
        support::directory::Slapd::stop(self);
    }
    fn restart(&mut self) {
        support::directory::Slapd::restart(self);
    }
}

impl Directory for support::directory::Postgres {
    fn add(&self, mailbox: &str, store: &str, login: Option<&str>) {
        self.insert(mailbox, store, login);
    }
    fn stop(&mut self) {
        support::directory::Postgres::stop(self);
    }
    fn restart(&mut self) {
        support::directory::Postgres::restart(self);
    }
}

impl Directory for support::directory::Mariadb {
    fn add(&self, mailbox: &str, store: &str, login: Option<&str>) {
        self.insert(mailbox, store, login);
    }
    fn stop(&mut self) {
        support::directory::Mariadb::stop(self);
    }
    fn restart(&mut self) {
        support::directory::Mariadb::restart(self);
    }
}

/// Names built to widen an LDAP filter or a string-built SQL query to every entry; each must find nothing.
const TRICKY: [&str; 4] = [
    "*@example.com",
    "x)(mail=*@example.com",
    "x'OR'a'<'b@example.com",
    "back\\slash@example.com",
];

/// The same checks for every directory: two mailboxes on two stores, a login name from the directory,
/// tricky names that find nothing, the directory stopped (cached answers serve, uncached ones get
/// `[SYS/TEMP]` within the timeout) and back (lookups resume without a restart).
fn a_directory_places_mailboxes(
    directory: &mut dyn Directory,
    source: &str,
    placement: &str,
    files: &[(&str, String)],
) {
    let (a, b) = two_stores(&["alice@example.com", "bob@example.com", "dave@example.com"]);
    let (at_a, at_b) = (a.pop3_addr().to_string(), b.pop3_addr().to_string());
    directory.add("alice@example.com", &at_a, None);
    directory.add("bob@example.com", &at_b, None);
    // carol's mail is alice's mailbox on a: the directory names the account to log in with.
    directory.add("carol@example.com", &at_a, Some("alice@example.com"));
    directory.add("dave@example.com", &at_a, None);
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in files {
        std::fs::write(dir.path().join(name), content).unwrap();
    }
    let pg = popgate(&a, &b, placement, dir.path());
    let pop3 = pg.addr("pop3");
    assert_eq!(listed(pop3, "alice@example.com"), Ok(1), "alice lives on a");
    assert_eq!(listed(pop3, "bob@example.com"), Ok(2), "bob lives on b");
    let before = logins_in_log(&a, "alice@example.com");
    assert_eq!(listed(pop3, "carol@example.com"), Ok(1));
    assert_eq!(
        logins_in_log(&a, "alice@example.com"),
        before + 1,
        "carol logged in as alice"
    );

    for name in TRICKY {
        let r = pass_reply(&pg, name);
        assert_eq!(r, "-ERR [AUTH] Authentication failed.", "{name}: {r}");
    }
    let m = scrape(&pg);
    let series = |result: &str| {
        format!(
            "popgate_placement_lookups_total{{result=\"{result}\",source=\"{source}\",tenant=\"acme\"}}"
        )
    };
    assert_eq!(
        support::popgate::metric(&m, &series("not_found")),
        Some(TRICKY.len() as f64),
        "every tricky name was looked up and found nothing:\n{m}"
    );
    for name in TRICKY {
        assert_eq!(
            logins_in_log(&a, name) + logins_in_log(&b, name),
            0,
            "{name}"
        );
    }
    assert_eq!(
        logins_in_log(&b, "alice@example.com"),
        0,
        "alice never reached b"
    );

    // The directory stops: alice's answer (cached, past its TTL) still serves; dave was never asked.
    directory.stop();
    assert_eq!(
        listed(pop3, "alice@example.com"),
        Ok(1),
        "a stale answer serves"
    );
    let asked = Instant::now();
    let r = pass_reply(&pg, "dave@example.com");
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    assert!(
        asked.elapsed() < Duration::from_secs(4),
        "{:?}",
        asked.elapsed()
    );
    let st = status(&pg);
    assert_eq!(st["tenants"][0]["placement"]["failing"], true, "{st}");
    let m = scrape(&pg);
    let stale = format!(
        "popgate_placement_cache_total{{result=\"stale\",source=\"{source}\",tenant=\"acme\"}}"
    );
    assert!(
        support::popgate::metric(&m, &stale).is_some_and(|n| n >= 1.0),
        "{m}"
    );

    // Back: lookups resume without a restart.
    directory.restart();
    pg.wait_until(Duration::from_secs(30), "lookups to resume", |_| {
        listed(pop3, "dave@example.com") == Ok(1)
    });
    assert_eq!(status(&pg)["tenants"][0]["placement"]["failing"], false);
}

/// The cache settings every directory test uses: answers go stale at once, so each login after the first
/// asks the directory again, and a stale one serves for an hour while it fails.
const CACHE: &str = "      timeout: 2s\n      not_found: refuse\n      cache: {ttl: 1ms, negative_ttl: 1ms, stale_for: 1h}\n";

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn ldap_places_mailboxes_over_ldaps_with_failover() {
    let ca = support::pki::TestCa::new("ldap CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let mut slapd = support::directory::Slapd::start_tls(&leaf.cert_pem, &leaf.key_pem);
    // The first URL answers nothing: the second is used.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let placement = format!(
        "      ldap:\n        urls: [\"ldap://{dead}\", \"{}\"]\n        ca: ldap-ca.pem\n        \
         bind_dn: \"{}\"\n        password_file: ldap-pw\n        base: \"ou=people,{}\"\n        \
         filter: \"(mail={{mailbox}})\"\n        attribute: mailHost\n        login_attribute: description\n{CACHE}",
        slapd.ldaps_url().unwrap(),
        support::directory::Slapd::ROOT_DN,
        support::directory::Slapd::SUFFIX,
    );
    let files = [
        ("ldap-ca.pem", ca.cert_pem()),
        ("ldap-pw", support::directory::Slapd::ROOT_PW.to_string()),
    ];
    a_directory_places_mailboxes(&mut slapd, "ldap", &placement, &files);
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn postgresql_places_mailboxes_with_a_bound_parameter() {
    let mut db = support::directory::Postgres::start();
    let placement = format!(
        "      sql:\n        url: \"{}\"\n        password_file: db-pw\n        \
         query: \"SELECT host, login FROM mailboxes WHERE address = $1\"\n{CACHE}",
        db.url(),
    );
    let files = [("db-pw", support::directory::Postgres::PASSWORD.to_string())];
    a_directory_places_mailboxes(&mut db, "sql", &placement, &files);
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn mariadb_places_mailboxes_with_a_bound_parameter() {
    let mut db = support::directory::Mariadb::start();
    let placement = format!(
        "      sql:\n        url: \"{}\"\n        password_file: db-pw\n        \
         query: \"SELECT host, login FROM mailboxes WHERE address = ?\"\n{CACHE}",
        db.url(),
    );
    let files = [("db-pw", support::directory::Mariadb::PASSWORD.to_string())];
    a_directory_places_mailboxes(&mut db, "sql", &placement, &files);
}
