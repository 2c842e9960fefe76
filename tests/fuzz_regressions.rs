//! The fuzz targets' checks under `cargo test`: every committed seed in `fuzz/corpus/<target>/` is
//! replayed through the same check the fuzzer runs (`fuzz/src/`, included by path), and every input a
//! fuzzer found is kept here as a test of its own.
//!
//! A finding whose fix is still pending is `#[ignore = "fuzz finding: ..."]`; the fix removes the
//! attribute. Run the fuzzers themselves with `scripts/fuzz`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../fuzz/src/lib.rs"]
mod checks;

use std::fs;
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn check_of(target: &str) -> checks::Check {
    checks::TARGETS
        .iter()
        .find(|(name, _)| *name == target)
        .map(|(_, check)| *check)
        .unwrap_or_else(|| panic!("no fuzz target named {target}"))
}

/// Replays every seed of one target; the seed's path is printed first so a failure names it.
fn replay_seeds(target: &str) {
    let check = check_of(target);
    let dir = fuzz_dir().join("corpus").join(target);
    let mut seeds: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|p| p.is_file())
        .collect();
    seeds.sort();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    for seed in seeds {
        eprintln!("replaying {}", seed.display());
        check(&fs::read(&seed).unwrap());
    }
}

#[test]
fn every_fuzz_target_has_a_check_and_seeds() {
    let mut binaries: Vec<String> = fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    binaries.sort();
    let mut names: Vec<String> = checks::TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    names.sort();
    assert_eq!(
        binaries, names,
        "fuzz_targets/*.rs and checks::TARGETS differ"
    );
    for name in &names {
        assert!(
            fuzz_dir().join("corpus").join(name).is_dir(),
            "fuzz/corpus/{name}/ is missing"
        );
    }
}

#[test]
fn seeds_command() {
    replay_seeds("command");
}

#[test]
fn seeds_line_framer() {
    replay_seeds("line_framer");
}

#[test]
fn seeds_reply() {
    replay_seeds("reply");
}

#[test]
fn seeds_sasl() {
    replay_seeds("sasl");
}

#[test]
fn seeds_login_name() {
    replay_seeds("login_name");
}

#[test]
fn seeds_proxy_header() {
    replay_seeds("proxy_header");
}

#[test]
fn seeds_config() {
    replay_seeds("config");
}

#[test]
fn seeds_state_machine() {
    replay_seeds("state_machine");
}

// === findings ===

// Found by `proxy_header` (artifact crash-3b57958270d06b82e99a686466a6413cdddc50e4), fixed in
// proxy_protocol::parse: ppp ends a v1 `PROXY UNKNOWN` header at a lone " \n" when that is the end of
// the input, but at the next CRLF when more bytes are buffered, so one stream had two header lengths,
// and `read_header` (which stops at the first LF) passed bytes of the header to the POP3 session.
#[test]
fn proxy_v1_header_ended_by_a_lone_lf() {
    checks::proxy_header::check(b"PROXY UNKNOWN \nX\r\n");
}

#[test]
fn proxy_v1_fuzz_artifact_3b579582() {
    checks::proxy_header::check(
        b"PROXY UNKNOWN ffff:f...f:ffff \n05534\r\nT\n!\x01\0-\xe0\xe0\xe0\xe0\0\0\0\0\0\0\0\x12\xe0552&\n05534\r\nT\n!\x01\0-\xe0\xe0\xe0\xe0\0\0\0\0\0\0\0\x12\xe0\xe0\xe0\xe0\xe0\xe0",
    );
}

// Found by `login_name` (artifact crash-77060973f2305be1c68fa14d0441cd7691eed688) after local parts that
// name a hosted domain were refused: the check still expected every split error to be `Malformed`. The
// check now knows `LocalPartNamesDomain`; this input (`bob@exatple.net.alice+ex@mple.com`: `+ex` would not
// route, but the split at `@` leaves an `@` in the local part) must be refused with it.
#[test]
fn login_name_fuzz_artifact_77060973() {
    checks::login_name::check(b"bob@exatple.net.alice+ex@mple.com");
}

// Found while writing the `config` check (the fuzzer did not reach it; its dictionary now has the value),
// fixed by capping durations at a year: a timeout of u64::MAX seconds passed validation, then
// `Instant::now() + timeout` (pre-login deadline, STLS handshake, store reply) panicked per connection.
#[test]
fn config_timeout_beyond_the_clock_is_refused() {
    let yaml = "listeners:\n  - name: pop3\n    bind: 127.0.0.1:1110\ntimeouts:\n  pre_login: 18446744073709551615\ntenants:\n  acme:\n    domains: [example.com]\n    backends: [\"127.0.0.1:1100\"]\n";
    checks::config::check(yaml.as_bytes());
}
