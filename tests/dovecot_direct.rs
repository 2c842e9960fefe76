//! Proves the Dovecot test harness on its own: real stores, real clients (curl, poplib, raw TCP),
//! no proxy. If these fail, end-to-end failures through the proxy mean nothing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use support::clients::{
    PopClient, PopMode, PopStep, curl_pop3, curl_retr, pop3_url, pop3s_url, poplib_session,
};
use support::dovecot::{
    DovecotStore, StoreOptions, TlsPem, instance_processes, pop3_retr_bytes, pop3_size,
};

/// LF line ends, a line starting with ".", one with "..", and a line that is only ".".
const ALICE_1: &[u8] = b"From: bob@example.com\nTo: alice@example.com\nSubject: first\n\n\
Hello Alice.\n.leading dot\n..two dots\n.\nend\n";
/// CRLF line ends and no line end after the last line.
const ALICE_2: &[u8] = b"Subject: second\r\n\r\nno newline at the end";
const BOB_1: &[u8] = b"Subject: for bob\n\nhi bob\n";

fn two_users() -> StoreOptions {
    StoreOptions::new()
        .user("alice@example.com", "secret", [ALICE_1, ALICE_2])
        .user("bob@example.org", "hunter2", [BOB_1])
}

/// A minimal line-at-a-time POP3 conversation for what curl and poplib cannot send.
struct RawPop3 {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl RawPop3 {
    fn connect(addr: SocketAddr, preamble: &[u8]) -> Self {
        let mut writer = TcpStream::connect(addr).unwrap();
        writer
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        writer.write_all(preamble).unwrap();
        let reader = BufReader::new(writer.try_clone().unwrap());
        RawPop3 { reader, writer }
    }

    fn line(&mut self) -> String {
        let mut line = String::new();
        self.reader.read_line(&mut line).unwrap();
        line
    }

    fn command(&mut self, command: &str) -> String {
        self.writer
            .write_all(format!("{command}\r\n").as_bytes())
            .unwrap();
        self.line()
    }
}

#[test]
fn retr_bytes_are_crlf_lines_ending_in_crlf() {
    // Pin the harness's notion of "what a client receives" to literal bytes once.
    assert_eq!(
        pop3_retr_bytes(ALICE_1),
        b"From: bob@example.com\r\nTo: alice@example.com\r\nSubject: first\r\n\r\n\
Hello Alice.\r\n.leading dot\r\n..two dots\r\n.\r\nend\r\n"
    );
    assert_eq!(
        pop3_retr_bytes(ALICE_2),
        b"Subject: second\r\n\r\nno newline at the end\r\n"
    );
    assert_eq!(pop3_size(ALICE_1), ALICE_1.len() + 9);
    assert_eq!(pop3_size(ALICE_2), ALICE_2.len());
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn raw_retr_is_dot_stuffed_on_the_wire() {
    let store = DovecotStore::start(two_users());
    let mut pop = RawPop3::connect(store.pop3_addr(), b"");
    pop.line();
    pop.command("USER alice@example.com");
    assert!(pop.command("PASS secret").starts_with("+OK"));
    let status = pop.command("RETR 1");
    assert_eq!(status, format!("+OK {} octets\r\n", pop3_size(ALICE_1)));
    let mut wire = Vec::new();
    loop {
        let line = pop.line();
        assert!(!line.is_empty(), "connection closed mid-RETR");
        wire.extend_from_slice(line.as_bytes());
        if line == ".\r\n" {
            break;
        }
    }
    assert_eq!(
        wire,
        b"From: bob@example.com\r\nTo: alice@example.com\r\nSubject: first\r\n\r\n\
Hello Alice.\r\n..leading dot\r\n...two dots\r\n..\r\nend\r\n.\r\n"
    );
    assert!(pop.command("QUIT").starts_with("+OK"));
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn curl_retrieves_exact_messages_with_every_login_method() {
    let store = DovecotStore::start(two_users());
    eprintln!("store started in {:?}", store.startup_time());
    let addr = store.pop3_addr();

    // Default: curl picks CRAM-MD5, the strongest SASL mechanism Dovecot offers.
    for (n, stored) in [(1, ALICE_1), (2, ALICE_2)] {
        let got = curl_retr(
            &pop3_url(addr, &n.to_string()),
            "alice@example.com",
            "secret",
            &[],
        );
        assert_eq!(got, pop3_retr_bytes(stored), "message {n}");
    }
    for login_options in ["AUTH=PLAIN", "AUTH=LOGIN", "AUTH=+APOP"] {
        let got = curl_retr(
            &pop3_url(addr, "1"),
            "alice@example.com",
            "secret",
            &["--login-options", login_options],
        );
        assert_eq!(got, pop3_retr_bytes(ALICE_1), "{login_options}");
    }
    let bob = curl_retr(&pop3_url(addr, "1"), "bob@example.org", "hunter2", &[]);
    assert_eq!(bob, pop3_retr_bytes(BOB_1));

    // Without a message number curl LISTs: sizes are CRLF sizes.
    let list = curl_retr(&pop3_url(addr, ""), "alice@example.com", "secret", &[]);
    let expected = format!("1 {}\r\n2 {}\r\n", pop3_size(ALICE_1), pop3_size(ALICE_2));
    assert_eq!(String::from_utf8(list).unwrap(), expected);

    store.wait_for_log("method=CRAM-MD5", Duration::from_secs(5));
    let log = store.wait_for_log("method=APOP", Duration::from_secs(5));
    assert!(log.contains("rip=127.0.0.1"), "{log}");
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn failed_logins_do_not_slow_down_later_logins() {
    let store = DovecotStore::start(two_users());
    let url = pop3_url(store.pop3_addr(), "1");
    for _ in 0..3 {
        let denied = curl_pop3(
            &url,
            "alice@example.com",
            "wrong",
            &["--login-options", "AUTH=PLAIN"],
        );
        assert_eq!(denied.code, Some(67), "curl: {}", denied.stderr);
    }
    // With Dovecot's auth penalty on, this login would wait several seconds.
    let started = Instant::now();
    curl_retr(&url, "alice@example.com", "secret", &[]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "login after failures took {took:?}"
    );
    store.wait_for_log("Password mismatch", Duration::from_secs(5));
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn poplib_sees_counts_sizes_uidls_and_content() {
    let store = DovecotStore::start(two_users());
    let steps = [
        PopStep::Stat,
        PopStep::List,
        PopStep::Uidl,
        PopStep::Retr(1),
        PopStep::Retr(2),
        PopStep::Top(1, 0),
        PopStep::Raw("LIST 2".into()),
    ];
    let t = poplib_session(
        store.pop3_addr(),
        PopMode::Plain,
        "alice@example.com",
        "secret",
        &steps,
    );
    t.assert_all_ok();
    assert!(t.greeting.as_deref().unwrap().contains("[XCLIENT]"), "{t}");

    let (count, octets) = t.reply(1).stat_counts();
    assert_eq!(count, 2);
    assert_eq!(octets, (pop3_size(ALICE_1) + pop3_size(ALICE_2)) as u64);
    assert_eq!(
        t.reply(2).text_lines(),
        [
            format!("1 {}", pop3_size(ALICE_1)),
            format!("2 {}", pop3_size(ALICE_2))
        ]
    );
    let uidls = t.reply(3).text_lines();
    assert_eq!(uidls.len(), 2);
    for (i, line) in uidls.iter().enumerate() {
        let (n, uidl) = line.split_once(' ').unwrap();
        assert_eq!(n, (i + 1).to_string());
        // pop3_uidl_format = %08Xu%08Xv: UID then UIDVALIDITY, 8 hex digits each.
        assert_eq!(uidl.len(), 16, "{line}");
        assert!(uidl.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
        assert!(uidl.starts_with(&format!("{:08X}", i + 1)), "{line}");
    }
    assert_eq!(t.reply(4).body(), pop3_retr_bytes(ALICE_1));
    assert_eq!(t.reply(5).body(), pop3_retr_bytes(ALICE_2));
    assert_eq!(
        t.reply(6).body(),
        b"From: bob@example.com\r\nTo: alice@example.com\r\nSubject: first\r\n\r\n"
    );
    assert_eq!(t.reply(7).status, format!("+OK 2 {}", pop3_size(ALICE_2)));

    let bob = poplib_session(
        store.pop3_addr(),
        PopMode::Plain,
        "bob@example.org",
        "hunter2",
        &[PopStep::Stat],
    );
    bob.assert_all_ok();
    assert_eq!(bob.reply(1).stat_counts(), (1, pop3_size(BOB_1) as u64));

    let denied = poplib_session(
        store.pop3_addr(),
        PopMode::Plain,
        "bob@example.org",
        "nope",
        &[PopStep::Stat],
    );
    assert!(!denied.reply(0).ok, "{denied}");
    assert!(denied.reply(0).status.starts_with("-ERR"), "{denied}");
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn maildir_count_sees_what_is_really_stored() {
    let store = DovecotStore::start(two_users());
    let alice = "alice@example.com";
    assert_eq!(store.maildir_message_count(alice), 2);

    // RETR and even DELE without QUIT (RSET, then dropped) delete nothing.
    let t = PopClient::new(store.pop3_addr(), PopMode::Plain).run(&[
        PopStep::login(alice, "secret"),
        PopStep::Retr(1),
        PopStep::Dele(1),
        PopStep::Rset,
    ]);
    t.assert_all_ok();
    assert_eq!(store.maildir_message_count(alice), 2);

    let t = poplib_session(
        store.pop3_addr(),
        PopMode::Plain,
        alice,
        "secret",
        &[PopStep::Dele(1)],
    );
    t.assert_all_ok();
    assert_eq!(store.maildir_message_count(alice), 1);
    assert_eq!(store.maildir_message_count("bob@example.org"), 1);

    let t = poplib_session(
        store.pop3_addr(),
        PopMode::Plain,
        alice,
        "secret",
        &[PopStep::Retr(1)],
    );
    assert_eq!(t.reply(1).body(), pop3_retr_bytes(ALICE_2));
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn messages_keep_the_order_they_were_given_in() {
    // Enough files that directory order (hashed on ext4) would show if Dovecot used it.
    let messages: Vec<String> = (1..=40)
        .map(|n| format!("Subject: message {n}\n\nbody {n}\n"))
        .collect();
    let store =
        DovecotStore::start(StoreOptions::new().user("many@example.com", "pw", messages.clone()));
    let steps: Vec<PopStep> = (1..=40).map(PopStep::Retr).collect();
    let t = poplib_session(
        store.pop3_addr(),
        PopMode::Plain,
        "many@example.com",
        "pw",
        &steps,
    );
    t.assert_all_ok();
    for (i, message) in messages.iter().enumerate() {
        assert_eq!(
            t.reply(i + 1).body(),
            pop3_retr_bytes(message.as_bytes()),
            "message {}",
            i + 1
        );
    }
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn tls_store_serves_stls_and_pop3s() {
    let store = DovecotStore::start(two_users().tls(TlsPem::self_signed(&["localhost"])));
    let user = "alice@example.com";
    let expected = pop3_retr_bytes(ALICE_1);

    let stls = curl_retr(
        &pop3_url(store.pop3_addr(), "1"),
        user,
        "secret",
        &["--ssl-reqd", "-k"],
    );
    assert_eq!(stls, expected);
    let implicit = curl_retr(&pop3s_url(store.pop3s_addr(), "1"), user, "secret", &["-k"]);
    assert_eq!(implicit, expected);

    for (addr, mode) in [
        (store.pop3_addr(), PopMode::Stls),
        (store.pop3s_addr(), PopMode::Implicit),
    ] {
        let t = PopClient::new(addr, mode)
            .sni("localhost")
            .run(&[PopStep::login(user, "secret"), PopStep::Retr(1)]);
        t.assert_all_ok();
        assert_eq!(t.reply(1).body(), expected, "{mode:?}");
    }
    assert!(
        poplib_session(store.pop3_addr(), PopMode::Stls, user, "secret", &[])
            .assert_all_ok()
            .stls
            .is_some()
    );
    store.wait_for_log("TLS", Duration::from_secs(5));
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn xclient_and_haproxy_forward_the_client_address() {
    let store = DovecotStore::start(two_users().haproxy());

    // Loopback is a trusted network: XCLIENT before login sets the logged remote address.
    let mut pop = RawPop3::connect(store.pop3_addr(), b"");
    assert!(pop.line().contains("[XCLIENT]"));
    let reply = pop.command("XCLIENT ADDR=192.0.2.9 PORT=4242");
    assert!(reply.starts_with("+OK"), "{reply}");
    assert!(pop.command("USER bob@example.org").starts_with("+OK"));
    assert!(pop.command("PASS hunter2").starts_with("+OK"));
    assert!(pop.command("QUIT").starts_with("+OK"));
    store.wait_for_log("rip=192.0.2.9", Duration::from_secs(5));

    // The haproxy listener takes the address from a PROXY v1 header.
    let header = b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 110\r\n";
    let mut pop = RawPop3::connect(store.haproxy_addr(), header);
    assert!(pop.line().starts_with("+OK"));
    assert!(pop.command("USER bob@example.org").starts_with("+OK"));
    assert!(pop.command("PASS hunter2").starts_with("+OK"));
    assert!(pop.command("QUIT").starts_with("+OK"));
    store.wait_for_log("rip=192.0.2.7", Duration::from_secs(5));
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn stores_run_side_by_side_and_leave_nothing_behind() {
    let stores: Vec<DovecotStore> = std::thread::scope(|s| {
        let starting: Vec<_> = (0..3)
            .map(|i| {
                s.spawn(move || {
                    let login = format!("user{i}@tenant{i}.test");
                    let message = format!("Subject: {i}\n\nstore {i}\n");
                    DovecotStore::start(StoreOptions::new().user(&login, "pw", [message]))
                })
            })
            .collect();
        starting.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut seen = Vec::new();
    for (i, store) in stores.iter().enumerate() {
        eprintln!("store {i} started in {:?}", store.startup_time());
        let got = curl_retr(
            &pop3_url(store.pop3_addr(), "1"),
            &format!("user{i}@tenant{i}.test"),
            "pw",
            &[],
        );
        assert_eq!(
            got,
            format!("Subject: {i}\r\n\r\nstore {i}\r\n").into_bytes()
        );
        seen.push(store.pop3_addr());
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 3);

    for store in stores {
        let instance = store.instance_name().to_owned();
        let dir = store.dir().to_owned();
        assert!(!instance_processes(&instance).is_empty());
        drop(store);
        assert!(
            instance_processes(&instance).is_empty(),
            "{instance} left processes"
        );
        assert!(!dir.exists(), "{} was not removed", dir.display());
    }
}

#[test]
#[cfg_attr(
    not(feature = "external-tools"),
    ignore = "needs Dovecot, curl, poplib, Chromium or promtool: scripts/test turns on external-tools"
)]
fn extra_config_overrides_a_default() {
    let store = DovecotStore::start(
        two_users()
            .extra_config("mail_max_userip_connections = 3")
            .extra_config("login_greeting = popgate test store"),
    );
    // Written once by the harness (1000) and once by extra_config: the later one wins.
    assert_eq!(store.effective_setting("mail_max_userip_connections"), "3");
    let mut pop = RawPop3::connect(store.pop3_addr(), b"");
    let greeting = pop.line();
    assert!(greeting.contains("popgate test store"), "{greeting}");
    assert!(pop.command("QUIT").starts_with("+OK"));
}
