//! Store discovery by DNS against an in-test authoritative server on 127.0.0.1: A/AAAA names, IP
//! literals, SRV sets, following changes by TTL, keeping the last good answer through an outage, and
//! the TTL bounds that cap the query rate.
//!
//! Every query goes to the loopback [`TestDns`]; the addresses in its answers come from the
//! documentation ranges and are never connected to.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly instead of returning errors

mod support;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use popgate::store::dns::{Discovery, DnsError, DnsSettings, Endpoint, Target};
use support::dns::TestDns;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const SRV_NAME: &str = "_pop3._tcp.store.mail.test";

fn settings(dns: &TestDns) -> DnsSettings {
    DnsSettings {
        nameservers: vec![dns.addr()],
        min_ttl: Duration::from_millis(200),
        max_ttl: Duration::from_secs(60),
        timeout: Duration::from_millis(300),
    }
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn endpoint(addr: &str, host: &str, priority: u16, weight: u32) -> Endpoint {
    Endpoint {
        addr: addr.parse().unwrap(),
        host: host.to_owned(),
        priority,
        weight,
    }
}

fn srv() -> Target {
    Target::Srv {
        name: SRV_NAME.to_owned(),
    }
}

/// Polls `condition` until it holds; panics after `within`. For conditions with no channel to
/// wait on (the server's query counter).
async fn eventually(what: &str, within: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the published list is `want`, checking that no value on the way is empty.
async fn wait_for_list(rx: &mut watch::Receiver<Vec<Endpoint>>, want: &[Endpoint]) {
    let waited = tokio::time::timeout(
        Duration::from_secs(10),
        rx.wait_for(|list| {
            assert!(!list.is_empty(), "an empty store list was published");
            list == want
        }),
    )
    .await
    .map(|seen| seen.is_ok());
    match waited {
        Ok(true) => {}
        Ok(false) => panic!("discovery stopped publishing"),
        Err(_) => panic!("timed out; last list {:?}, wanted {want:?}", *rx.borrow()),
    }
}

/// Also shows the server and `Discovery` work from a plain test with a runtime of its own.
#[test]
fn names_resolve_with_a_and_aaaa() {
    let dns = TestDns::start("mail.test.");
    dns.set_a("store1", &[ip("192.0.2.10"), ip("2001:db8::10")], 3600);
    dns.set_a("store2", &[ip("192.0.2.20")], 45);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let discovery = Discovery::new(settings(&dns)).unwrap();
        let target = Target::Host {
            host: "store1.mail.test".into(),
            port: 110,
        };
        let (endpoints, ttl) = discovery.resolve(&target).await.unwrap();
        assert_eq!(
            endpoints,
            [
                endpoint("192.0.2.10:110", "store1.mail.test", 0, 1),
                endpoint("[2001:db8::10]:110", "store1.mail.test", 0, 1),
            ]
        );
        assert_eq!(ttl, Duration::from_secs(60), "3600 s clamped to max_ttl");
        assert_eq!(dns.query_count(), 2, "one A and one AAAA query");

        // Only an A record (AAAA is an empty answer, not a failure); a trailing dot is fine.
        let target = Target::Host {
            host: "store2.mail.test.".into(),
            port: 995,
        };
        let (endpoints, ttl) = discovery.resolve(&target).await.unwrap();
        assert_eq!(
            endpoints,
            [endpoint("192.0.2.20:995", "store2.mail.test", 0, 1)]
        );
        assert_eq!(ttl, Duration::from_secs(45));
    });
}

#[tokio::test]
async fn ip_literals_need_no_dns() {
    let dns = TestDns::start("mail.test.");
    let discovery = Discovery::new(settings(&dns)).unwrap();
    for (host, want) in [
        ("192.0.2.7", endpoint("192.0.2.7:110", "192.0.2.7", 0, 1)),
        (
            "2001:db8::7",
            endpoint("[2001:db8::7]:110", "2001:db8::7", 0, 1),
        ),
        (
            "[2001:db8::8]",
            endpoint("[2001:db8::8]:110", "2001:db8::8", 0, 1),
        ),
    ] {
        let target = Target::Host {
            host: host.into(),
            port: 110,
        };
        let (endpoints, ttl) = discovery.resolve(&target).await.unwrap();
        assert_eq!(endpoints, [want]);
        assert_eq!(ttl, Duration::from_secs(60), "literals wait max_ttl");
    }
    assert_eq!(dns.query_count(), 0);
}

#[tokio::test]
async fn srv_brings_priorities_weights_ports_and_target_addresses() {
    let dns = TestDns::start("mail.test.");
    dns.set_srv(
        SRV_NAME,
        &[
            (10, 60, 1110, "a"),
            (10, 0, 1111, "b"),
            (20, 5, 1112, "c"),
            (20, 5, 1113, "c"),
            (30, 1, 1114, "gone"),
        ],
        30,
    );
    dns.set_a("a", &[ip("192.0.2.1"), ip("2001:db8::1")], 300);
    dns.set_a("b", &[ip("192.0.2.2")], 20);
    dns.set_a("c", &[ip("192.0.2.3")], 300);
    let want = [
        endpoint("192.0.2.1:1110", "a.mail.test", 10, 60),
        // Weight 0 still gets a share.
        endpoint("192.0.2.2:1111", "b.mail.test", 10, 1),
        endpoint("192.0.2.3:1112", "c.mail.test", 20, 5),
        endpoint("192.0.2.3:1113", "c.mail.test", 20, 5),
        endpoint("[2001:db8::1]:1110", "a.mail.test", 10, 60),
    ];
    let discovery = Discovery::new(settings(&dns)).unwrap();

    // Addresses from the additional section, so only the target without any is looked up
    // (A and AAAA); it is left out and the others serve.
    let (endpoints, ttl) = discovery.resolve(&srv()).await.unwrap();
    assert_eq!(endpoints, want);
    assert_eq!(ttl, Duration::from_secs(20), "the smallest TTL on the way");
    assert_eq!(dns.query_count(), 1 + 2);

    // Without glue each distinct target is looked up once: 1 + 4 × 2 queries.
    dns.set_glue(false);
    let (endpoints, ttl) = discovery.resolve(&srv()).await.unwrap();
    assert_eq!(endpoints, want);
    assert_eq!(ttl, Duration::from_secs(20));
    assert_eq!(dns.query_count(), 3 + 1 + 4 * 2);
}

#[tokio::test]
async fn missing_names_and_bad_settings_are_errors() {
    let dns = TestDns::start("mail.test.");
    let discovery = Discovery::new(settings(&dns)).unwrap();

    let error = discovery.resolve(&srv()).await.unwrap_err();
    assert!(matches!(error, DnsError::NoRecords { .. }), "{error}");
    assert_eq!(error.as_str(), "no_records");
    assert!(error.to_string().contains(SRV_NAME), "{error}");

    let host = Target::Host {
        host: "nowhere.mail.test".into(),
        port: 110,
    };
    let error = discovery.resolve(&host).await.unwrap_err();
    assert!(matches!(error, DnsError::NoAddresses { .. }), "{error}");
    assert!(error.to_string().contains("nowhere.mail.test"), "{error}");

    // SRV records whose targets all lack addresses give nothing to serve.
    dns.set_srv(SRV_NAME, &[(10, 1, 110, "gone")], 30);
    let error = discovery.resolve(&srv()).await.unwrap_err();
    assert!(matches!(error, DnsError::NoAddresses { .. }), "{error}");

    // Outside the served zone the test server refuses: a failure, not an empty answer.
    let outside = Target::Host {
        host: "store.elsewhere.test".into(),
        port: 110,
    };
    let error = discovery.resolve(&outside).await.unwrap_err();
    assert!(matches!(error, DnsError::Lookup { .. }), "{error}");

    let mut bad = settings(&dns);
    bad.min_ttl = Duration::ZERO;
    assert!(matches!(
        Discovery::new(bad).unwrap_err(),
        DnsError::InvalidSettings { .. }
    ));
    let mut bad = settings(&dns);
    bad.max_ttl = Duration::from_millis(100);
    assert!(matches!(
        Discovery::new(bad).unwrap_err(),
        DnsError::InvalidSettings { .. }
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_follows_srv_changes_and_is_quiet_while_nothing_changes() {
    let dns = TestDns::start("mail.test.");
    // TTL 0: re-resolved every min_ttl (200 ms).
    dns.set_srv(SRV_NAME, &[(10, 1, 110, "a"), (10, 1, 110, "b")], 0);
    dns.set_a("a", &[ip("192.0.2.1")], 0);
    dns.set_a("b", &[ip("192.0.2.2")], 0);
    let literal = Target::Host {
        host: "192.0.2.99".into(),
        port: 110,
    };
    let fixed = endpoint("192.0.2.99:110", "192.0.2.99", 0, 1);
    let discovery = Arc::new(Discovery::new(settings(&dns)).unwrap());
    let shutdown = CancellationToken::new();
    let mut rx = discovery
        .watch(vec![srv(), literal], shutdown.clone())
        .await;
    assert_eq!(
        *rx.borrow_and_update(),
        [
            endpoint("192.0.2.1:110", "a.mail.test", 10, 1),
            endpoint("192.0.2.2:110", "b.mail.test", 10, 1),
            fixed.clone(),
        ]
    );

    // Several re-resolutions with the same answer publish nothing.
    let before = dns.query_count();
    eventually("three re-resolutions", Duration::from_secs(5), || {
        dns.query_count() >= before + 3
    })
    .await;
    assert!(
        !rx.has_changed().unwrap(),
        "an unchanged answer was published"
    );

    // A target joins, another leaves.
    dns.set_a("c", &[ip("192.0.2.3")], 0);
    dns.set_srv(SRV_NAME, &[(10, 1, 110, "b"), (10, 1, 110, "c")], 0);
    wait_for_list(
        &mut rx,
        &[
            endpoint("192.0.2.2:110", "b.mail.test", 10, 1),
            endpoint("192.0.2.3:110", "c.mail.test", 10, 1),
            fixed.clone(),
        ],
    )
    .await;

    // An address change behind an unchanged SRV set is seen too.
    dns.set_a("b", &[ip("192.0.2.22")], 0);
    wait_for_list(
        &mut rx,
        &[
            endpoint("192.0.2.3:110", "c.mail.test", 10, 1),
            endpoint("192.0.2.22:110", "b.mail.test", 10, 1),
            fixed,
        ],
    )
    .await;

    // Cancelling ends the tasks: the sender goes away and the receiver sees it.
    shutdown.cancel();
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while rx.changed().await.is_ok() {}
    })
    .await;
    assert!(ended.is_ok(), "watch tasks still running after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_keeps_the_last_good_list_while_dns_is_down() {
    let dns = TestDns::start("mail.test.");
    dns.set_srv(SRV_NAME, &[(10, 1, 110, "a"), (10, 1, 110, "b")], 0);
    dns.set_a("a", &[ip("192.0.2.1")], 0);
    dns.set_a("b", &[ip("192.0.2.2")], 0);
    let discovery = Arc::new(Discovery::new(settings(&dns)).unwrap());
    let shutdown = CancellationToken::new();
    let mut rx = discovery.watch(vec![srv()], shutdown.clone()).await;
    let good = rx.borrow_and_update().clone();
    assert_eq!(good.len(), 2);

    // Silent nameserver: lookups time out and are retried; the list stays, nothing is published.
    dns.stop();
    let before = dns.query_count();
    eventually(
        "retries against the silent server",
        Duration::from_secs(10),
        || dns.query_count() >= before + 6,
    )
    .await;
    assert!(
        !rx.has_changed().unwrap(),
        "a value was published during the outage"
    );
    assert_eq!(*rx.borrow(), good);

    // An NXDOMAIN (the SRV name removed) is an empty answer: also kept over.
    dns.resume();
    dns.remove(SRV_NAME);
    let before = dns.query_count();
    eventually(
        "lookups of the removed name",
        Duration::from_secs(5),
        || dns.query_count() >= before + 3,
    )
    .await;
    assert!(!rx.has_changed().unwrap(), "an empty answer was published");

    // Answers again with a new set: updates resume.
    dns.set_srv(SRV_NAME, &[(10, 1, 110, "b")], 0);
    wait_for_list(&mut rx, &[endpoint("192.0.2.2:110", "b.mail.test", 10, 1)]).await;
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_starts_empty_when_dns_is_down_and_fills_in_later() {
    let dns = TestDns::start("mail.test.");
    dns.stop();
    dns.set_srv(SRV_NAME, &[(10, 1, 110, "a")], 0);
    dns.set_a("a", &[ip("192.0.2.1")], 0);
    let discovery = Arc::new(Discovery::new(settings(&dns)).unwrap());
    let shutdown = CancellationToken::new();
    let mut rx = discovery.watch(vec![srv()], shutdown.clone()).await;
    assert!(rx.borrow_and_update().is_empty());
    dns.resume();
    tokio::time::timeout(Duration::from_secs(10), rx.changed())
        .await
        .expect("no list after DNS came back")
        .unwrap();
    assert_eq!(
        *rx.borrow(),
        [endpoint("192.0.2.1:110", "a.mail.test", 10, 1)]
    );
    shutdown.cancel();
}

/// Counting queries over a fixed window is the point here (an upper bound on load), so this test
/// sleeps for that window rather than waiting on an event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_zero_ttl_is_not_requeried_faster_than_min_ttl() {
    let dns = TestDns::start("mail.test.");
    // With glue, one resolution is one query.
    dns.set_srv(SRV_NAME, &[(10, 1, 110, "a")], 0);
    dns.set_a("a", &[ip("192.0.2.1")], 0);
    let mut settings = settings(&dns);
    settings.min_ttl = Duration::from_millis(300);
    let discovery = Arc::new(Discovery::new(settings).unwrap());
    let shutdown = CancellationToken::new();
    let _rx = discovery.watch(vec![srv()], shutdown.clone()).await;

    let window = Duration::from_millis(1500);
    let before = dns.query_count();
    tokio::time::sleep(window).await;
    let queries = dns.query_count() - before;
    // 1500 ms / 300 ms = 5, plus one for where the window edges fall.
    assert!(queries <= 6, "{queries} queries in {window:?}");
    assert!(
        queries >= 3,
        "only {queries} queries in {window:?}: not re-resolving"
    );
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_ttl_is_requeried_after_max_ttl() {
    let dns = TestDns::start("mail.test.");
    dns.set_a("store", &[ip("192.0.2.1")], 86_400);
    let mut settings = settings(&dns);
    settings.min_ttl = Duration::from_millis(100);
    settings.max_ttl = Duration::from_millis(300);
    let discovery = Arc::new(Discovery::new(settings).unwrap());
    let shutdown = CancellationToken::new();
    let target = Target::Host {
        host: "store.mail.test".into(),
        port: 110,
    };
    let mut rx = discovery.watch(vec![target], shutdown.clone()).await;
    assert_eq!(rx.borrow_and_update().len(), 1);

    dns.set_a("store", &[ip("192.0.2.2")], 86_400);
    wait_for_list(
        &mut rx,
        &[endpoint("192.0.2.2:110", "store.mail.test", 0, 1)],
    )
    .await;
    shutdown.cancel();
}

/// Each lookup of a store name is counted per name, and so is each failure; IP literals are not lookups.
#[tokio::test]
async fn lookups_and_failures_are_counted_per_name() {
    let dns = TestDns::start("mail.test.");
    dns.set_a("store1", &[ip("192.0.2.10")], 60);
    let metrics = popgate::metrics::Metrics::new().unwrap();
    let discovery = Discovery::new(settings(&dns))
        .unwrap()
        .with_metrics(metrics.clone());
    let host = |h: &str| Target::Host {
        host: h.into(),
        port: 110,
    };
    discovery.resolve(&host("store1.mail.test")).await.unwrap();
    discovery.resolve(&host("store1.mail.test")).await.unwrap();
    discovery
        .resolve(&host("gone.mail.test"))
        .await
        .unwrap_err();
    discovery.resolve(&host("192.0.2.7")).await.unwrap();
    let text = String::from_utf8(metrics.render()).unwrap();
    let value = |series: &str| support::popgate::metric(&text, series);
    assert_eq!(
        value("popgate_dns_lookups_total{name=\"store1.mail.test\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("popgate_dns_lookup_failures_total{name=\"store1.mail.test\"}"),
        None,
        "{text}"
    );
    assert_eq!(
        value("popgate_dns_lookups_total{name=\"gone.mail.test\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value("popgate_dns_lookup_failures_total{name=\"gone.mail.test\"}"),
        Some(1.0),
        "{text}"
    );
    assert!(!text.contains("192.0.2.7"), "{text}");
}
