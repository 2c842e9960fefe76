//! The `popgate` binary: `check` exit codes and messages, and that `run` never logs a secret.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use maildrop::{Maildrop, Settings};
use popgate::protocol::sasl::encode_b64;
use support::pop3::Pop3;
use support::popgate::Process;

const BIN: &str = env!("CARGO_BIN_EXE_popgate");

fn check(yaml: &str) -> (bool, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("popgate.yaml");
    std::fs::write(&path, yaml).unwrap();
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

const GOOD: &str = "listeners:
  - name: pop3
    bind: 127.0.0.1:1110
tenants:
  acme:
    domains: [example.com]
    backends: [\"127.0.0.1:2110\"]
";

#[test]
fn check_accepts_the_shipped_example() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config/example.yaml");
    let out = Command::new(BIN)
        .args(["check", "-c"])
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
    assert!(check(GOOD).0);
}

#[test]
fn check_names_field_and_line_of_each_error() {
    let (ok, msg) = check(&GOOD.replace("    domains:", "    domain:"));
    assert!(!ok);
    assert!(
        msg.contains("unknown field `domain`") && msg.contains("line 6"),
        "{msg}"
    );

    let (ok, msg) = check(&format!(
        "{GOOD}  acme:\n    domains: [example.org]\n    backends: [\"127.0.0.1:1\"]\n"
    ));
    assert!(!ok);
    assert!(
        msg.contains("duplicate") && msg.contains("acme") && msg.contains("line 8"),
        "{msg}"
    );

    let (ok, msg) = check(&GOOD.replace("127.0.0.1:1110", "127.0.0.1:70000"));
    assert!(!ok);
    assert!(msg.contains("bind") && msg.contains("line 3"), "{msg}");

    let (ok, msg) = check(&GOOD.replace("127.0.0.1:2110", "127.0.0.1:http"));
    assert!(!ok);
    assert!(
        msg.contains("backends") && msg.contains("line 7") && msg.contains("port"),
        "{msg}"
    );

    let (ok, msg) = check("listeners: []\ntenants: {}\n");
    assert!(!ok);
    assert!(
        msg.contains("listeners") && msg.contains("tenants"),
        "{msg}"
    );
}

#[test]
fn check_fails_for_a_missing_file() {
    let out = Command::new(BIN)
        .args(["check", "-c", "/nonexistent/popgate.yaml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read"));
}

/// Runs the binary against an in-memory store, logs in every way it supports (right and wrong), and
/// checks that neither a password nor its base64 form appears in any log line, even at debug level.
#[test]
fn run_logs_sessions_but_never_secrets() {
    const SECRET: &str = "Zebra-Pw-4242";
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Maildrop::new(Settings {
        hostname: "store".into(),
        ..Settings::default()
    });
    store.add_mailbox(
        "alice@example.com",
        SECRET,
        vec![b"Subject: x\r\n\r\nbody\r\n".to_vec()],
    );
    let server = rt
        .block_on(store.bind("127.0.0.1:0".parse().unwrap()))
        .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("popgate.yaml");
    std::fs::write(
        &config,
        format!(
            "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\ntenants:\n  acme:\n    domains: [example.com]\n    \
             backends: [\"{}\"]\n    plaintext_login: allow\n",
            server.local_addr()
        ),
    )
    .unwrap();
    let mut child = Process(
        Command::new(BIN)
            .args(["run", "-c"])
            .arg(&config)
            .env("POPGATE_LOG", "debug")
            .env_remove("NO_COLOR")
            .env_remove("MALLOC_ARENA_MAX")
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let (tx, rx) = mpsc::channel::<String>();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut log = Vec::new();
    let addr = loop {
        let line = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("popgate did not report its listener");
        log.push(line.clone());
        if let (true, Some(i)) = (line.contains("listening"), line.find("addr=")) {
            let addr = line[i + 5..].split_whitespace().next().unwrap();
            break addr.parse::<std::net::SocketAddr>().unwrap();
        }
    };

    // The process serving (the same PID: popgate re-executed itself) runs with glibc's arenas capped.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let environ = std::fs::read(format!("/proc/{}/environ", child.id())).unwrap();
        assert!(
            environ
                .split(|&b| b == 0)
                .any(|v| v == b"MALLOC_ARENA_MAX=1"),
            "popgate runs without MALLOC_ARENA_MAX=1"
        );
    }
    rt.block_on(async {
        let mut c = Pop3::greeted(addr).await;
        c.ok("USER alice@example.com").await;
        assert!(
            c.cmd(&format!("PASS {SECRET}-wrong"))
                .await
                .starts_with("-ERR")
        );
        c.login("alice@example.com", SECRET).await;
        c.ok("QUIT").await;
        let mut c = Pop3::greeted(addr).await;
        c.ok(&format!(
            "AUTH PLAIN {}",
            encode_b64(format!("\0alice@example.com\0{SECRET}").as_bytes())
        ))
        .await;
        c.ok("QUIT").await;
        let mut c = Pop3::greeted(addr).await;
        c.ok("USER nobody@unknown.test").await;
        assert!(
            c.cmd(&format!("PASS {SECRET}"))
                .await
                .starts_with("-ERR [AUTH]")
        );
        c.ok("QUIT").await;
    });

    // Three sessions end with a summary line each; wait for them rather than for time to pass.
    let mut summaries = 0;
    while summaries < 3 {
        let Ok(line) = rx.recv_timeout(Duration::from_secs(20)) else {
            panic!(
                "missing session summary lines; log so far:\n{}",
                log.join("\n")
            );
        };
        if line.contains("session closed") {
            summaries += 1;
        }
        log.push(line);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let log = log.join("\n");
    let b64_fragment = &encode_b64(format!("\0alice@example.com\0{SECRET}").as_bytes())[8..24];
    assert!(!log.contains("Zebra"), "a password reached the log:\n{log}");
    assert!(
        !log.contains(b64_fragment),
        "an encoded password reached the log:\n{log}"
    );
    assert!(
        log.contains("tenant=acme") && log.contains("outcome=\"quit\""),
        "{log}"
    );
    assert!(log.contains("bytes_out="), "{log}");
    // The closing line of a relayed session is in a span with the session's fields, written as the login lines' span writes them.
    assert!(
        log.lines().any(|l| l.contains("session{id=")
            && l.contains("tenant=\"acme\"}")
            && l.contains("session closed")
            && l.contains("outcome=\"quit\"")),
        "{log}"
    );
    // stderr is a pipe here, not a terminal: no colour codes.
    assert!(
        !log.contains('\u{1b}'),
        "escape codes in a piped log:\n{log}"
    );
}

/// A trace log written into the config's own directory must not feed itself: each flush of the log is a
/// change in the watched directory, and the watcher's library used to log every such event.
#[test]
fn a_trace_log_beside_the_config_does_not_log_other_files_events() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("popgate.yaml");
    let yaml = "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\ntenants:\n  acme:\n    \
                domains: [example.com]\n    backends: [\"127.0.0.1:9\"]\n    health: {enabled: false}\n    \
                pool: {min_idle: 0}\n";
    std::fs::write(&config, yaml).unwrap();
    let log_path = dir.path().join("popgate.log");
    let log_file = std::fs::File::create(&log_path).unwrap();
    let mut child = Process(
        Command::new(BIN)
            .args(["--log-format", "json", "run", "-c"])
            .arg(&config)
            .env("POPGATE_LOG", "trace")
            .stderr(Stdio::from(log_file))
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let read_log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let wait_for = |what: &str| {
        let start = std::time::Instant::now();
        while !read_log().contains(what) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "no {what:?} in the log:\n{}",
                read_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for("listening");
    // Other files change beside the config; then the config itself changes. Events arrive in order, so
    // once the reload is logged every earlier event has been seen.
    for i in 0..20 {
        std::fs::write(dir.path().join("unrelated.txt"), format!("{i}")).unwrap();
    }
    std::fs::write(&config, format!("{yaml}# edited\n")).unwrap();
    wait_for("config directory changed; reloading");
    child.kill().unwrap();
    child.wait().unwrap();
    let log = read_log();
    assert!(
        !log.contains("unrelated.txt") && !log.contains("inotify event"),
        "events of other files were logged:\n{}",
        log.lines()
            .filter(|l| l.contains("inotify") || l.contains("unrelated"))
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
}
