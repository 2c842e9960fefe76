//! Stores as one shared fleet: many tenants on a few stores cost the stores nothing per tenant (one pool,
//! one probe loop, one health state per store), a reload keeps what it did not change (health, pools, DNS
//! answers), and a store that is down or silent is skipped rather than waited on.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use support::mailboxes::maildrop;
use support::pop3::Pop3;
use support::popgate::{eventually, plain_config, start, start_from_file};
use support::store::{Script, ScriptedStore, SilentStore};

/// Tenant `name` for `domain` on these stores, plaintext logins allowed, then `extra` tenant keys.
fn tenant_on(name: &str, domain: &str, stores: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = stores.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "  {name}:\n    domains: [{domain}]\n    backends: [{}]\n    plaintext_login: allow\n{extra}",
        list.join(", ")
    )
}

/// A silent store and a maildrop of `users` users (`user{i}@example.com`), both in tenant acme with
/// `extra` keys, behind a popgate with `backend_reply` as given. The maildrop is returned to keep it up.
async fn silent_and_good(
    users: usize,
    extra: &str,
    backend_reply: &str,
) -> (SilentStore, impl Sized, Vec<String>, popgate::Running) {
    let silent = SilentStore::start().await;
    let names: Vec<String> = (0..users).map(|i| format!("user{i}@example.com")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let (md, good) = maildrop(&refs, 1).await;
    let acme = tenant_on(
        "acme",
        "example.com",
        &[silent.addr, good.local_addr()],
        extra,
    );
    let pg = start(
        &plain_config(
            &format!("timeouts:\n  backend_reply: {backend_reply}\n"),
            &acme,
        ),
        std::path::Path::new("."),
    )
    .await;
    (silent, (md, good), names, pg)
}

/// Whether `store` is up as every tenant listing it sees it (None when no tenant lists it).
fn up_everywhere(pg: &popgate::Running, store: SocketAddr) -> Option<bool> {
    let seen: Vec<bool> = pg
        .stores()
        .iter()
        .flat_map(|(_, stores)| stores.iter().filter(|s| s.addr == store).map(|s| s.up))
        .collect();
    (!seen.is_empty()).then(|| seen.iter().all(|&up| up))
}

/// 500 tenants, half on store A, half on B, default pool and fast probes: each store gets one probe loop
/// and one pool (not 250 of each), logins of users of many tenants reach their tenant's store, and one
/// store's failure is seen by all its tenants at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_tenants_share_two_stores() {
    const TENANTS: usize = 500;
    let a = ScriptedStore::start(Script::default()).await;
    let b = ScriptedStore::start(Script::default()).await;
    let interval = Duration::from_millis(200);
    let tenants: String = (0..TENANTS)
        .map(|i| {
            let store = if i < TENANTS / 2 { a.addr } else { b.addr };
            tenant_on(
                &format!("t{i}"),
                &format!("t{i}.example"),
                &[store],
                "    health: {interval: 200ms}\n    pool: {min_idle: 2, max_idle: 4}\n",
            )
        })
        .collect();
    let pg = start(&plain_config("", &tenants), std::path::Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();
    let registry = &pg.runtime().context.stores;
    assert_eq!(registry.stores().len(), 2, "one store entry per store");

    // Idle: each store holds its pool (≤ max_idle) and one probe at a time, however many tenants list it.
    let before = (a.accepted(), b.accepted());
    let window = interval * 10;
    tokio::time::sleep(window).await; // an observation window: counting what happens in it
    for (store, accepted_before) in [(&a, before.0), (&b, before.1)] {
        assert!(
            store.open() <= 4 + 1,
            "{} connections held open to one store by 250 tenants",
            store.open()
        );
        // 10 intervals: 10 probes (+1 for timing), plus at most a pool refill or two.
        let new = store.accepted() - accepted_before;
        assert!(
            new <= 10 + 1 + 4,
            "{new} new connections to one store in 10 probe intervals"
        );
    }

    // Users of many tenants land on their tenant's store.
    for i in (0..TENANTS).step_by(25) {
        let user = format!("u{i}@t{i}.example");
        let mut c = Pop3::greeted(addr).await;
        c.login(&user, "pw").await;
        c.ok("QUIT").await;
        let (mine, other) = if i < TENANTS / 2 { (&a, &b) } else { (&b, &a) };
        assert!(
            mine.logins().contains(&user),
            "{user} did not reach its store"
        );
        assert!(
            !other.logins().contains(&user),
            "{user} reached another tenant's store"
        );
    }

    // Store A stops: every tenant on it sees it down at once (one health state), B's tenants do not.
    let a_addr = a.addr;
    drop(a);
    let _hold = std::net::TcpListener::bind(a_addr); // refuse, do not let another test take the port
    eventually(Duration::from_secs(10), "store A to be marked down", || {
        up_everywhere(&pg, a_addr) == Some(false)
    })
    .await;
    assert_eq!(up_everywhere(&pg, b.addr), Some(true));
    pg.shutdown();
}

/// A reload that changes nothing about a store keeps its health: a silent store marked down stays down,
/// so logins after the reload do not land on it (they used to: every reload reset health to up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_keeps_a_down_store_down_and_its_pool() {
    let silent = SilentStore::start().await;
    let (_md, good) = maildrop(&["u@example.com"], 1).await;
    let dir = tempfile::tempdir().unwrap();
    let acme = tenant_on(
        "acme",
        "example.com",
        &[silent.addr, good.local_addr()],
        "    health: {interval: 200ms, timeout: 150ms, fall: 2}\n",
    );
    let yaml = plain_config("timeouts:\n  backend_reply: 3s\n", &acme);
    let pg = start_from_file(&yaml, dir.path()).await;
    let addr = pg.local_addr("pop3").unwrap();
    eventually(
        Duration::from_secs(10),
        "the silent store to be marked down",
        || up_everywhere(&pg, silent.addr) == Some(false),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "the good store's pool to fill",
        || {
            pg.stores()
                .iter()
                .flat_map(|(_, s)| {
                    s.iter()
                        .filter(|s| s.addr == good.local_addr())
                        .map(|s| s.pool_idle)
                })
                .any(|idle| idle > 0)
        },
    )
    .await;
    let good_accepted = pg.stores();

    // An unrelated edit: another tenant.
    let other = tenant_on("other", "other.example", &[good.local_addr()], "");
    std::fs::write(
        dir.path().join("popgate.yaml"),
        plain_config("timeouts:\n  backend_reply: 3s\n", &(acme + &other)),
    )
    .unwrap();
    pg.reload().await.unwrap();
    assert_eq!(
        up_everywhere(&pg, silent.addr),
        Some(false),
        "the reload forgot that the store is down"
    );
    let idle_after: usize = pg
        .stores()
        .iter()
        .filter(|(t, _)| t == "acme")
        .flat_map(|(_, s)| {
            s.iter()
                .filter(|s| s.addr == good.local_addr())
                .map(|s| s.pool_idle)
        })
        .sum();
    assert!(
        idle_after > 0,
        "the reload dropped the pool: {good_accepted:?}"
    );

    let silent_before = silent.accepted();
    for _ in 0..20 {
        let mut c = Pop3::greeted(addr).await;
        c.login("u@example.com", "pw").await;
        c.ok("QUIT").await;
    }
    // Only probes (one per 200 ms) reach the silent store; no login waited on it.
    let probes = silent.accepted() - silent_before;
    assert!(
        probes <= 2 + 20 * 2,
        "{probes} connections to the silent store"
    );
    pg.shutdown();
}

/// consistent_hash with shared_storage: a store known to be down is tried last, not first (every store
/// holds every mailbox). Passive ejection counts greeting timeouts: after `fall` logins timed out on
/// the silent store, no login waits on it again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_store_is_ejected_by_timeouts_and_skipped_by_consistent_hash() {
    let (silent, _good, users, pg) = silent_and_good(
        30,
        "    balance: consistent_hash\n    shared_storage: true\n    health: {enabled: false, fall: 2}\n    \
         pool: {min_idle: 0}\n",
        "1s",
    )
    .await;
    let addr = pg.local_addr("pop3").unwrap();
    for user in &users {
        let mut c = Pop3::greeted(addr).await;
        c.login(user, "pw").await;
        c.ok("QUIT").await;
    }
    // About half the users hash to the silent store first; only the first `fall` of them waited on it.
    assert_eq!(
        silent.accepted(),
        2,
        "logins kept trying the silent store after it was ejected"
    );
    assert_eq!(up_everywhere(&pg, silent.addr), Some(false));
    pg.shutdown();
}

/// `pool.max_logins_in_flight` bounds what a silent store can hold up: with two logins already waiting
/// on it, further logins whose first choice it is go to the other store at once. (The cap is per store,
/// so the logins here start one at a time: the good store never has more than two either.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_takes_no_more_logins_than_its_in_flight_cap() {
    let (silent, _good, users, pg) = silent_and_good(
        12,
        "    shared_storage: true\n    health: {enabled: false, fall: 1000}\n    \
         pool: {min_idle: 0, max_logins_in_flight: 2}\n",
        "6s",
    )
    .await;
    let addr = pg.local_addr("pop3").unwrap();
    let mut waiting = Vec::new();
    for user in users {
        let before = silent.accepted();
        let login = tokio::spawn(async move {
            let mut c = Pop3::greeted(addr).await;
            c.login(&user, "pw").await;
            c.ok("QUIT").await;
        });
        // Either it is done (it logged in at the good store) or it waits on the silent one.
        eventually(
            Duration::from_secs(5),
            "the login to finish or reach the silent store",
            || login.is_finished() || silent.accepted() > before,
        )
        .await;
        if login.is_finished() {
            login.await.unwrap();
        } else {
            waiting.push(login);
        }
    }
    assert_eq!(
        silent.accepted(),
        2,
        "logins beyond the cap waited on the silent store"
    );
    assert_eq!(waiting.len(), 2);
    // The two that waited fail over to the good store after backend_reply.
    for login in waiting {
        login.await.unwrap();
    }
    pg.shutdown();
}

/// A reload while DNS does not answer: each name keeps its last good answer (no store vanishes) and the
/// reload asks DNS nothing for names it already follows, so logins go on through and after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_during_a_dns_outage_keeps_every_resolved_store() {
    let (_md, server) = maildrop(&["alice@example.com", "bob@two.example"], 1).await;
    let dns = support::dns::TestDns::start("mail.test.");
    dns.set_a(
        "store.mail.test.",
        &[std::net::IpAddr::from([127, 0, 0, 1])],
        1,
    );
    let dir = tempfile::tempdir().unwrap();
    let extra = format!(
        "dns:\n  nameservers: [\"{}\"]\n  min_ttl: 200ms\n  max_ttl: 1h\n  timeout: 300ms\n",
        dns.addr()
    );
    let store = format!("store.mail.test:{}", server.local_addr().port());
    let tenant = |name: &str, domain: &str| {
        format!(
            "  {name}:\n    domains: [{domain}]\n    backends: [\"{store}\"]\n    plaintext_login: allow\n"
        )
    };
    let pg = start_from_file(
        &plain_config(&extra, &tenant("acme", "example.com")),
        dir.path(),
    )
    .await;
    let addr = pg.local_addr("pop3").unwrap();
    let login = |user: &'static str| async move {
        let mut c = Pop3::greeted(addr).await;
        c.login(user, "pw").await;
        c.ok("QUIT").await;
    };
    login("alice@example.com").await;

    dns.stop();
    let queries = dns.query_count();
    // Another tenant on the same name joins: it gets the name's last good answer.
    std::fs::write(
        dir.path().join("popgate.yaml"),
        plain_config(
            &extra,
            &(tenant("acme", "example.com") + &tenant("two", "two.example")),
        ),
    )
    .unwrap();
    pg.reload().await.unwrap();
    assert_eq!(
        dns.query_count(),
        queries,
        "the reload looked up a name it already follows"
    );
    for (t, stores) in pg.stores() {
        assert_eq!(stores.len(), 1, "tenant {t} lost its store in the reload");
    }
    login("alice@example.com").await;
    login("bob@two.example").await;
    dns.resume();
    pg.shutdown();
}

/// `limits.max_idle_store_connections` caps pre-warmed connections across all stores: three stores
/// wanting 3 each hold 4 in all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_of_all_stores_stay_within_the_global_cap() {
    let stores = [
        ScriptedStore::start(Script::default()).await,
        ScriptedStore::start(Script::default()).await,
        ScriptedStore::start(Script::default()).await,
    ];
    let tenants: String = stores
        .iter()
        .enumerate()
        .map(|(i, s)| {
            tenant_on(
                &format!("t{i}"),
                &format!("t{i}.example"),
                &[s.addr],
                "    health: {enabled: false}\n    pool: {min_idle: 3, max_idle: 3}\n",
            )
        })
        .collect();
    let pg = start(
        &plain_config("limits:\n  max_idle_store_connections: 4\n", &tenants),
        std::path::Path::new("."),
    )
    .await;
    let registry = &pg.runtime().context.stores;
    let idle = || -> usize { registry.stores().iter().map(|s| s.pool_idle()).sum() };
    eventually(
        Duration::from_secs(10),
        "the pools to fill up to the cap",
        || idle() == 4,
    )
    .await;
    // Four idle hold all four slots: no connect is in flight, and none can start.
    assert_eq!(registry.idle_connections(), 4);
    let open: usize = stores.iter().map(ScriptedStore::open).sum();
    assert!(open <= 4, "{open} connections open to the stores");
    pg.shutdown();
}

/// Two tenants reaching one store with different settings are two stores (pools, health, series kept
/// apart), labelled `host:port` and `host:port#2`; tenants with the same settings share one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn different_settings_keep_two_tenants_apart_on_one_store() {
    let store = ScriptedStore::start(Script::default()).await;
    let tenants = tenant_on("a", "a.example", &[store.addr], "    pool: {min_idle: 1}\n")
        + &tenant_on("b", "b.example", &[store.addr], "    pool: {min_idle: 1}\n")
        + &tenant_on("c", "c.example", &[store.addr], "    pool: {min_idle: 2}\n");
    let pg = start(&plain_config("", &tenants), std::path::Path::new(".")).await;
    let mut labels: Vec<String> = pg
        .runtime()
        .context
        .stores
        .stores()
        .iter()
        .map(|s| s.label.clone())
        .collect();
    labels.sort();
    assert_eq!(
        labels,
        [store.addr.to_string(), format!("{}#2", store.addr)]
    );
    pg.shutdown();
}
