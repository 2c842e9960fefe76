//! Invariant checks behind popgate's fuzz targets: one module per target, each with a `check(&[u8])`.
//!
//! A check drives one parser (or the login state machine) of the `popgate` library with arbitrary bytes
//! and panics when a property breaks; libFuzzer records that panic as a crash. The root package's
//! `tests/fuzz_regressions.rs` includes this file by path and replays every committed seed and every
//! kept crash input through the same functions, so `cargo test` and the fuzzers check the same things.
//!
//! Only `popgate`, `bytes` and std may be used here: the root package has no other dependency to offer.
//! Nothing here does I/O, except that `config` may read certificate files a YAML input names.

// A failed check must panic: that is how a finding reaches libFuzzer and the test harness.
#![allow(clippy::unwrap_used, clippy::expect_used)]

pub mod command;
pub mod config;
pub mod line_framer;
pub mod login_name;
pub mod proxy_header;
pub mod reply;
pub mod sasl;
pub mod state_machine;

/// A target's check: panics when a property breaks.
pub type Check = fn(&[u8]);

/// Every target by name: the fuzz binary, its seed folder `fuzz/corpus/<name>/`, and its check.
pub const TARGETS: &[(&str, Check)] = &[
    ("command", command::check),
    ("line_framer", line_framer::check),
    ("reply", reply::check),
    ("sasl", sasl::check),
    ("login_name", login_name::check),
    ("proxy_header", proxy_header::check),
    ("config", config::check),
    ("state_machine", state_machine::check),
];

/// CR, LF and NUL: the bytes that would let a value start a second command on a POP3 connection.
fn has_line_break_or_nul(bytes: &[u8]) -> bool {
    bytes.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n'))
}
