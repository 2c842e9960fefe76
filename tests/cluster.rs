//! Replicas that act as one: several popgate replicas sharing one real Redis (standalone, a Redis Cluster
//! of three masters, or a master found through Sentinel) enforce lockouts, session caps and LOGIN-DELAY
//! over the whole fleet, carry `/kick` to the replica that holds the session, free a dead replica's
//! sessions within the lease TTL, and go on (per their policy) while Redis is down, converging when it is
//! back. Stores are real Dovecot; clients come from several loopback addresses, none trusted.
#![cfg(feature = "external-tools")]
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use support::dovecot::{DovecotStore, StoreOptions};
use support::pop3::Pop3;
use support::popgate::{eventually, http, plain_config, start};
use support::redis::{Redis, RedisCluster, key_secret};

/// A Dovecot store with `users` users `user{i}@example.com` (password `pw`).
fn store(users: usize) -> DovecotStore {
    let mut opts = StoreOptions::new();
    for i in 0..users {
        opts = opts.user(
            &format!("user{i}@example.com"),
            "pw",
            [b"Subject: hi\r\n\r\nhello\r\n".to_vec()],
        );
    }
    DovecotStore::start(opts)
}

/// The `cluster:` block for `servers` (mode and more keys in `extra`, indented two spaces).
fn cluster_block(dir: &Path, servers: &[String], extra: &str) -> String {
    let list: Vec<String> = servers.iter().map(|s| format!("\"{s}\"")).collect();
    format!(
        "cluster:\n  servers: [{}]\n  key_secret_file: {}\n  lease_ttl: 3s\n{extra}",
        list.join(", "),
        key_secret(dir).display()
    )
}

/// A replica's config: the cluster block, no trusted network, no connection rate, no delays, an admin
/// server, `throttle` extra keys, and tenant acme on `store` with `tenant_extra`.
fn replica_config(cluster: &str, throttle: &str, store: SocketAddr, tenant_extra: &str) -> String {
    let extra = format!(
        "{cluster}admin:\n  bind: 127.0.0.1:0\nthrottle:\n  trusted_networks: []\n  connection_burst: 0\n  \
         failed_login_delay: 0s\n  failed_login_max_delay: 0s\n  lockout_after: 10\n{throttle}"
    );
    let tenant = format!(
        "  acme:\n    domains: [example.com]\n    backends: [\"{store}\"]\n    plaintext_login: allow\n    \
         pool: {{min_idle: 0}}\n{tenant_extra}"
    );
    plain_config(&extra, &tenant)
}

/// `n` replicas of one config.
async fn replicas(n: usize, yaml: &str, dir: &Path) -> Vec<popgate::Running> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.push(start(yaml, dir).await);
    }
    out
}

fn pop3(r: &popgate::Running) -> SocketAddr {
    r.local_addr("pop3").unwrap()
}

fn client_ip(i: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, i])
}

/// One login attempt on a fresh connection from `from`: the answer to PASS.
async fn attempt(addr: SocketAddr, from: IpAddr, user: &str, pass: &str) -> String {
    let mut c = Pop3::greeted_from(addr, from).await;
    let u = c.cmd(&format!("USER {user}")).await;
    assert!(u.starts_with("+OK"), "USER -> {u}");
    let answer = c.cmd(&format!("PASS {pass}")).await;
    if answer.starts_with("+OK") {
        c.ok("QUIT").await;
    }
    answer
}

/// Sends up to 100 wrong passwords round-robin over the replicas, each from `from(i)` for `user(i)`;
/// returns how many were answered before the first lockout notice.
async fn failures_until_locked(
    fleet: &[popgate::Running],
    from: impl Fn(usize) -> IpAddr,
    user: impl Fn(usize) -> String,
) -> usize {
    for i in 0..100 {
        let r = &fleet[i % fleet.len()];
        let answer = attempt(pop3(r), from(i), &user(i), &format!("wrong{i}")).await;
        if answer.contains("Too many failed logins") {
            return i;
        }
        assert!(answer.starts_with("-ERR [AUTH]"), "attempt {i}: {answer}");
    }
    panic!("100 wrong passwords over the fleet locked nothing");
}

/// The lockout tests, against any deployment of Redis: wrong passwords for one mailbox from many
/// addresses lock the mailbox at the configured count over the whole fleet (each replica alone saw a
/// third of them), and the lock holds on every replica, for the right password too; wrong passwords
/// from one address for many mailboxes lock the address the same way.
async fn lockouts_are_fleet_wide(cluster: &str, dir: &Path) {
    let store = store(12);
    let yaml = replica_config(cluster, "", store.pop3_addr(), "");
    let fleet = replicas(3, &yaml, dir).await;
    // One mailbox, a new address each time: only the mailbox's count can lock.
    let n = failures_until_locked(
        &fleet,
        |i| client_ip(10 + (i % 200) as u8),
        |_| "user0@example.com".into(),
    )
    .await;
    assert_eq!(
        n, 9,
        "the 10th failure over the fleet must lock the mailbox"
    );
    for r in &fleet {
        let answer = attempt(pop3(r), client_ip(250), "user0@example.com", "pw").await;
        assert!(
            answer.contains("Too many failed logins"),
            "the lock must hold on every replica: {answer}"
        );
    }
    // One address, a new mailbox each time: only the address's count can lock.
    let n = failures_until_locked(
        &fleet,
        |_| client_ip(2),
        |i| format!("user{}@example.com", 1 + i % 11),
    )
    .await;
    assert_eq!(
        n, 9,
        "the 10th failure over the fleet must lock the address"
    );
    for r in &fleet {
        let answer = attempt(pop3(r), client_ip(2), "user11@example.com", "pw").await;
        assert!(
            answer.contains("Too many failed logins"),
            "the address lock must hold everywhere: {answer}"
        );
    }
    // Another address still logs in to another mailbox: nothing else was locked.
    let answer = attempt(pop3(&fleet[1]), client_ip(3), "user11@example.com", "pw").await;
    assert!(answer.starts_with("+OK"), "{answer}");
    for r in fleet {
        r.shutdown();
    }
}

/// A per-mailbox cap of one holds across replicas, and frees as soon as the session ends; LOGIN-DELAY
/// set by a login on one replica is answered on another; a per-address cap of one holds across replicas.
async fn caps_and_login_delay_are_fleet_wide(cluster: &str, dir: &Path) {
    let store = store(2);
    let yaml = replica_config(
        cluster,
        "  max_sessions_per_mailbox: 1\n",
        store.pop3_addr(),
        "",
    );
    let fleet = replicas(2, &yaml, dir).await;
    let (a, b) = (pop3(&fleet[0]), pop3(&fleet[1]));
    let mut held = Pop3::greeted_from(a, client_ip(20)).await;
    held.login("user0@example.com", "pw").await;
    let answer = attempt(b, client_ip(21), "user0@example.com", "pw").await;
    assert!(
        answer.starts_with("-ERR [IN-USE]"),
        "the cap must hold on the other replica: {answer}"
    );
    held.ok("QUIT").await;
    // The release is sent when the session ends; the next login finds the slot free.
    let start = Instant::now();
    loop {
        let answer = attempt(b, client_ip(21), "user0@example.com", "pw").await;
        if answer.starts_with("+OK") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the slot was not freed: {answer}"
        );
    }
    for r in fleet {
        r.shutdown();
    }

    let yaml = replica_config(
        cluster,
        "",
        store.pop3_addr(),
        "    min_login_interval: 60s\n",
    );
    let fleet = replicas(2, &yaml, dir).await;
    let answer = attempt(pop3(&fleet[0]), client_ip(22), "user1@example.com", "pw").await;
    assert!(answer.starts_with("+OK"), "{answer}");
    let answer = attempt(pop3(&fleet[1]), client_ip(23), "user1@example.com", "pw").await;
    assert!(
        answer.starts_with("-ERR [LOGIN-DELAY]"),
        "LOGIN-DELAY must hold on the other replica: {answer}"
    );
    for r in fleet {
        r.shutdown();
    }

    // One session per address over the fleet: the other replica has none from it, and still refuses.
    let yaml = replica_config(cluster, "  max_sessions_per_ip: 1\n", store.pop3_addr(), "");
    let fleet = replicas(2, &yaml, dir).await;
    let mut held = Pop3::greeted_from(pop3(&fleet[0]), client_ip(90)).await;
    held.login("user0@example.com", "pw").await;
    let answer = attempt(pop3(&fleet[1]), client_ip(90), "user1@example.com", "pw").await;
    assert!(
        answer.contains("Too many connections from your address"),
        "the per-address cap must hold on the other replica: {answer}"
    );
    held.ok("QUIT").await;
    for r in fleet {
        r.shutdown();
    }
}

/// `POST /kick` on one replica ends the session held on another, and says so.
async fn kick_reaches_the_whole_fleet(cluster: &str, dir: &Path) {
    let store = store(1);
    let yaml = replica_config(cluster, "", store.pop3_addr(), "");
    let fleet = replicas(2, &yaml, dir).await;
    let mut held = Pop3::greeted_from(pop3(&fleet[1]), client_ip(30)).await;
    held.login("user0@example.com", "pw").await;
    // Both replicas' heartbeats are in before the command goes out.
    let admin = fleet[0].admin_addr().unwrap();
    let status_url = format!("http://{admin}/status");
    eventually(Duration::from_secs(10), "both replicas to be seen", || {
        let (_, body) = http("GET", &status_url, None);
        body.contains("\"replicas\":2")
    })
    .await;
    let (code, body) = tokio::task::spawn_blocking(move || {
        http(
            "POST",
            &format!("http://{admin}/kick?mailbox=user0@example.com"),
            None,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["kicked"], 1, "{body}");
    assert_eq!(reply["replicas_answered"], 2, "{body}");
    assert!(
        held.until_eof().await.is_empty(),
        "the kicked session must end"
    );
    let post = |path: String| async move {
        let (code, body) = tokio::task::spawn_blocking(move || {
            http("POST", &format!("http://{admin}{path}"), None)
        })
        .await
        .unwrap();
        assert_eq!(code, 200, "{body}");
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    // A pattern and a network reach the other replica too.
    let mut held = Pop3::greeted_from(pop3(&fleet[1]), client_ip(31)).await;
    held.login("user0@example.com", "pw").await;
    let reply = post(format!(
        "/kick?mailbox=USER*%40example.com&network={}",
        client_ip(31)
    ))
    .await;
    assert_eq!(
        (
            reply["kicked"].as_u64(),
            reply["replicas_answered"].as_u64()
        ),
        (Some(1), Some(2)),
        "{reply}"
    );
    assert!(held.until_eof().await.is_empty());
    // A store drained on one replica is drained on every one: the other refuses new logins there.
    let label = store.pop3_addr().to_string();
    let reply = post(format!("/stores/state?store={label}&state=drain")).await;
    assert_eq!(
        (
            reply["stores"].as_u64(),
            reply["replicas_answered"].as_u64()
        ),
        (Some(2), Some(2)),
        "{reply}"
    );
    let other = format!("http://{}/status", fleet[1].admin_addr().unwrap());
    let (_, body) = tokio::task::spawn_blocking(move || http("GET", &other, None))
        .await
        .unwrap();
    let st: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(st["stores"][0]["state"], "drain", "{st}");
    let answer = attempt(pop3(&fleet[1]), client_ip(32), "user0@example.com", "pw").await;
    assert!(answer.starts_with("-ERR [SYS/TEMP]"), "{answer}");
    post(format!("/stores/state?store={label}&state=ready")).await;
    // The auth_http cache flush goes the same way (no tenant here uses auth_http: nothing to drop).
    let (code, body) = tokio::task::spawn_blocking(move || {
        http("POST", &format!("http://{admin}/auth-cache/flush"), None)
    })
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let reply: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(reply["replicas_answered"], 2, "{body}");
    assert_eq!(reply["flushed"], 0, "{body}");
    for r in fleet {
        r.shutdown();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_redis_makes_lockouts_fleet_wide() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    lockouts_are_fleet_wide(&cluster_block(dir.path(), &[redis.addr()], ""), dir.path()).await;
    // Nothing in the key space names a mailbox or an address.
    let keys = redis.keys();
    assert!(!keys.is_empty());
    for k in keys {
        assert!(
            !k.contains("example") && !k.contains("user") && !k.contains("127."),
            "{k}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_redis_makes_caps_and_login_delay_fleet_wide() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    caps_and_login_delay_are_fleet_wide(
        &cluster_block(dir.path(), &[redis.addr()], ""),
        dir.path(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_redis_carries_kick_to_every_replica() {
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    kick_reaches_the_whole_fleet(&cluster_block(dir.path(), &[redis.addr()], ""), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_cluster_of_three_masters_makes_limits_fleet_wide() {
    let cluster = RedisCluster::start();
    let dir = tempfile::tempdir().unwrap();
    // One key prefix per scenario: the lockouts of the first must not lock the users of the next.
    let block = |prefix: &str| {
        cluster_block(
            dir.path(),
            &cluster.addrs(),
            &format!("  mode: cluster\n  key_prefix: \"{prefix}\"\n"),
        )
    };
    lockouts_are_fleet_wide(&block("locks:"), dir.path()).await;
    caps_and_login_delay_are_fleet_wide(&block("caps:"), dir.path()).await;
    kick_reaches_the_whole_fleet(&block("kick:"), dir.path()).await;
    // The keys spread over the masters (hash tags keep one entity's keys together, not all keys).
    let holding = cluster
        .nodes
        .iter()
        .filter(|n| !n.keys().is_empty())
        .count();
    assert!(holding >= 2, "keys on {holding} of 3 masters");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_found_through_sentinel_makes_limits_fleet_wide() {
    let master = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let sentinel = Redis::sentinel(&format!(
        "sentinel monitor popgate 127.0.0.1 {} 1\n",
        master.port
    ));
    let block = cluster_block(
        dir.path(),
        &[sentinel.addr()],
        "  mode: sentinel\n  sentinel_service: popgate\n",
    );
    caps_and_login_delay_are_fleet_wide(&block, dir.path()).await;
    assert!(
        !master.keys().is_empty(),
        "the state must live on the master the sentinel names"
    );
}

/// The shared-state block of a replica's `/status`.
fn cluster_status(r: &popgate::Running) -> serde_json::Value {
    let (_, body) = http(
        "GET",
        &format!("http://{}/status", r.admin_addr().unwrap()),
        None,
    );
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["cluster"].clone()
}

/// One login (connect, USER, PASS, QUIT) on a fresh connection; how long it took and the PASS answer.
async fn timed_login(addr: SocketAddr, from: IpAddr, user: &str) -> (Duration, String) {
    let began = Instant::now();
    let answer = attempt(addr, from, user, "pw").await;
    (began.elapsed(), answer)
}

/// Redis killed under a login load: no login waits on it beyond a bound (the timeout is 100 ms; the bound
/// only catches a hang), every login goes on (the open policy), the mode shows in `/status` and the
/// metrics; Redis back (empty): the replicas see it again without a restart and the per-mailbox cap
/// holds across them again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_go_on_while_redis_is_down_and_fleet_limits_come_back_with_it() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let store = store(8);
    let block = cluster_block(dir.path(), &[redis.addr()], "  timeout: 100ms\n");
    let yaml = replica_config(
        &block,
        "  max_sessions_per_mailbox: 1\n",
        store.pop3_addr(),
        "",
    );
    let fleet = replicas(2, &yaml, dir.path()).await;
    let addrs: Vec<SocketAddr> = fleet.iter().map(pop3).collect();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut load = Vec::new();
    for t in 0..4u8 {
        let (addrs, done) = (addrs.clone(), done.clone());
        load.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for k in 0..15usize {
                let user = format!("user{}@example.com", usize::from(t) * 2 + k % 2);
                let r = timed_login(addrs[k % 2], client_ip(40 + t), &user).await;
                done.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                results.push(r);
            }
            results
        }));
    }
    eventually(
        Duration::from_secs(20),
        "some logins before Redis dies",
        || done.load(std::sync::atomic::Ordering::Relaxed) >= 12,
    )
    .await;
    redis.kill();
    let mut slowest = Duration::ZERO;
    for task in load {
        for (took, answer) in task.await.unwrap() {
            assert!(
                answer.starts_with("+OK"),
                "a login failed while Redis was down: {answer}"
            );
            slowest = slowest.max(took);
        }
    }
    assert!(
        slowest < Duration::from_secs(3),
        "a login hung on Redis: {slowest:?}"
    );
    for r in &fleet {
        assert_eq!(cluster_status(r)["degraded"], true);
        let (_, metrics) = http(
            "GET",
            &format!("http://{}/metrics", r.admin_addr().unwrap()),
            None,
        );
        assert_eq!(
            support::popgate::metric(&metrics, "popgate_cluster_degraded"),
            Some(1.0)
        );
    }
    redis.restart();
    for r in &fleet {
        eventually(
            Duration::from_secs(10),
            "the replica to see Redis again",
            || cluster_status(r)["degraded"] == false,
        )
        .await;
    }
    let mut held = Pop3::greeted_from(addrs[0], client_ip(50)).await;
    held.login("user7@example.com", "pw").await;
    let answer = attempt(addrs[1], client_ip(51), "user7@example.com", "pw").await;
    assert!(
        answer.starts_with("-ERR [IN-USE]"),
        "the cap must hold again: {answer}"
    );
    held.ok("QUIT").await;
    for r in fleet {
        r.shutdown();
    }
}

/// `when_unavailable: {lockouts: closed}`: while Redis is down logins are refused for now (not hung, not
/// let through unchecked), and they work again once it is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lockouts_closed_logins_wait_for_redis() {
    let mut redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let store = store(1);
    let block = cluster_block(
        dir.path(),
        &[redis.addr()],
        "  timeout: 100ms\n  when_unavailable: {lockouts: closed}\n",
    );
    let yaml = replica_config(&block, "", store.pop3_addr(), "");
    let r = start(&yaml, dir.path()).await;
    let addr = pop3(&r);
    assert!(
        attempt(addr, client_ip(60), "user0@example.com", "pw")
            .await
            .starts_with("+OK")
    );
    redis.kill();
    let answer = attempt(addr, client_ip(60), "user0@example.com", "pw").await;
    assert!(answer.starts_with("-ERR [SYS/TEMP]"), "{answer}");
    redis.restart();
    eventually(Duration::from_secs(10), "Redis to be seen again", || {
        cluster_status(&r)["degraded"] == false
    })
    .await;
    assert!(
        attempt(addr, client_ip(60), "user0@example.com", "pw")
            .await
            .starts_with("+OK")
    );
    r.shutdown();
}

/// A replica killed with SIGKILL while it holds a session: the session's lease is gone within the lease
/// TTL (3 s here), so the mailbox's cap of one lets the user in through another replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_replica_frees_its_sessions_within_the_lease_ttl() {
    use std::io::BufRead;
    let redis = Redis::start();
    let dir = tempfile::tempdir().unwrap();
    let store = store(1);
    let block = cluster_block(dir.path(), &[redis.addr()], "");
    let yaml = replica_config(
        &block,
        "  max_sessions_per_mailbox: 1\n",
        store.pop3_addr(),
        "",
    );
    let path = dir.path().join("popgate.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let mut child = support::popgate::Process(
        std::process::Command::new(env!("CARGO_BIN_EXE_popgate"))
            .args(["run", "-c"])
            .arg(&path)
            .env("POPGATE_LOG", "info")
            .stderr(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let doomed: SocketAddr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("the replica did not report its listener");
        if line.contains("listening")
            && line.contains("pop3")
            && let Some(i) = line.find("addr=")
        {
            break line[i + 5..]
                .split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap();
        }
    };
    let mut held = Pop3::greeted_from(doomed, client_ip(70)).await;
    held.login("user0@example.com", "pw").await;
    let other = start(&yaml, dir.path()).await;
    let answer = attempt(pop3(&other), client_ip(71), "user0@example.com", "pw").await;
    assert!(answer.starts_with("-ERR [IN-USE]"), "{answer}");
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();
    loop {
        let answer = attempt(pop3(&other), client_ip(71), "user0@example.com", "pw").await;
        if answer.starts_with("+OK") {
            break;
        }
        assert!(answer.starts_with("-ERR [IN-USE]"), "{answer}");
        assert!(
            killed.elapsed() < Duration::from_secs(3 + 3),
            "the dead replica's lease outlived the TTL"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    drop(held);
    other.shutdown();
}

/// TLS to Redis with a CA of the operator's, and a password from a file: a rotated password (Redis told
/// first, then the file) is taken at the next reload, and the replica reconnects with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_a_rotated_password_file_reach_redis() {
    let dir = tempfile::tempdir().unwrap();
    let ca = support::pki::TestCa::new("redis test CA");
    let leaf = ca.leaf(&["127.0.0.1", "redis.test"]);
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (ca_pem, cert, key) = (
        file("ca.pem", &ca.cert_pem()),
        file("redis.crt", &leaf.cert_pem),
        file("redis.key", &leaf.key_pem),
    );
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
        .to_string();
    let redis = Redis::start_with(&[
        "--tls-port",
        &tls_port,
        "--tls-cert-file",
        &cert,
        "--tls-key-file",
        &key,
        "--tls-ca-cert-file",
        &ca_pem,
        "--tls-auth-clients",
        "no",
    ]);
    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "requirepass", "old-password"])
            .as_deref(),
        Some("+OK")
    );
    let password = file("redis.password", "old-password\n");
    let store = store(2);
    let block = cluster_block(
        dir.path(),
        &[format!("127.0.0.1:{tls_port}")],
        &format!("  password_file: {password}\n  tls: {{ca: {ca_pem}}}\n"),
    );
    let yaml = replica_config(&block, "", store.pop3_addr(), "");
    let r = support::popgate::start_from_file(&yaml, dir.path()).await;
    let admin = r.admin_addr().unwrap();
    let logins_counted = || {
        let (_, m) = http("GET", &format!("http://{admin}/metrics"), None);
        support::popgate::metric(
            &m,
            "popgate_cluster_round_trip_seconds_count{op=\"after_login\"}",
        )
        .unwrap_or(0.0)
    };
    assert_eq!(cluster_status(&r)["degraded"], false);
    assert!(
        attempt(pop3(&r), client_ip(80), "user0@example.com", "pw")
            .await
            .starts_with("+OK")
    );
    assert_eq!(
        logins_counted(),
        1.0,
        "the login's check must have reached Redis over TLS"
    );

    // Rotate: Redis first (open connections stay authenticated), then the file, then a reload.
    let rotate = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "-a",
            "old-password",
            "--no-auth-warning",
        ])
        .args(["CONFIG", "SET", "requirepass", "new-password"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&rotate.stdout).contains("OK"));
    std::fs::write(&password, "new-password\n").unwrap();
    let (code, body) =
        tokio::task::spawn_blocking(move || http("POST", &format!("http://{admin}/reload"), None))
            .await
            .unwrap();
    assert_eq!(code, 200, "{body}");
    // Every connection dropped: only the new password gets the replica back in.
    let kill = std::process::Command::new("redis-cli")
        .args([
            "-p",
            &redis.port.to_string(),
            "-a",
            "new-password",
            "--no-auth-warning",
        ])
        .args(["CLIENT", "KILL", "TYPE", "normal"])
        .output()
        .unwrap();
    assert!(kill.status.success());
    let mut n = 1.0;
    let began = Instant::now();
    loop {
        assert!(
            attempt(pop3(&r), client_ip(80), "user1@example.com", "pw")
                .await
                .starts_with("+OK")
        );
        if cluster_status(&r)["degraded"] == false && logins_counted() > n {
            break;
        }
        n = logins_counted();
        assert!(
            began.elapsed() < Duration::from_secs(10),
            "the replica did not get back in with the new password"
        );
    }
    r.shutdown();
}
