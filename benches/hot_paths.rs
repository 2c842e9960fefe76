//! Micro-benchmarks (divan) of the pure code every session runs: command parsing, line framing and status
//! parsing, the tenant lookup with 10,000 tenants, and store choice over 100 stores.
//! Run with `cargo bench --bench hot_paths`. No I/O, no Dovecot.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly where it stands

use std::hint::black_box;
use std::path::Path;

use bytes::BytesMut;
use divan::Bencher;
use popgate::protocol::MAX_COMMAND_LINE;
use popgate::protocol::command::Command;
use popgate::protocol::line::{Frame, LineFramer};
use popgate::protocol::reply::Status;
use popgate::router::TenantTable;
use popgate::store::balance::{Balancer, Candidate, Policy};

const TENANTS: usize = 10_000;
const STORES: usize = 100;

fn main() {
    divan::main();
}

// === protocol ===

#[divan::bench(args = [
    "USER alice@example.com",
    "PASS correct horse battery staple",
    "AUTH PLAIN AGFsaWNlQGV4YW1wbGUuY29tAHNlY3JldA==",
    "APOP alice@example.com c4c9334bac560ecc979e58001b3e22fb",
    "CAPA",
    "NOOP",
])]
fn command_parse(line: &str) -> bool {
    Command::parse(black_box(line.as_bytes())).is_ok()
}

/// A client's pipelined burst of 64 command lines, framed one by one from one buffer.
#[divan::bench]
fn line_framer_64_lines(bencher: Bencher) {
    let burst: Vec<u8> = (0..64)
        .flat_map(|i| format!("RETR {i}\r\n").into_bytes())
        .collect();
    bencher.bench_local(|| {
        let mut buf = BytesMut::from(black_box(burst.as_slice()));
        let mut framer = LineFramer::new();
        let mut lines = 0;
        while let Some(frame) = framer.next_frame(&mut buf, MAX_COMMAND_LINE) {
            if let Frame::Line(l) = frame {
                lines += l.len();
            }
        }
        lines
    });
}

/// One line arriving in 1-octet reads (the worst case of the resumable framer).
#[divan::bench]
fn line_framer_bytewise(bencher: Bencher) {
    let line = b"USER alice.with.a.long.name@subdomain.example.com\r\n";
    bencher.bench_local(|| {
        let mut buf = BytesMut::with_capacity(64);
        let mut framer = LineFramer::new();
        for &b in black_box(line.as_slice()) {
            buf.extend_from_slice(&[b]);
            if let Some(f) = framer.next_frame(&mut buf, MAX_COMMAND_LINE) {
                return Some(f);
            }
        }
        None
    });
}

#[divan::bench(args = [
    "+OK Dovecot ready. <1234.1@host>",
    "+OK Logged in.",
    "-ERR [AUTH] Authentication failed.",
    "-ERR [SYS/TEMP] Mail store unavailable",
    "+ ",
])]
fn status_parse(line: &str) -> bool {
    Status::parse(black_box(line.as_bytes())).is_ok()
}

// === routing with 10,000 tenants ===

/// Each tenant `tN` owns `tN.example` and `*.tN.example`; every tenant has its own store.
fn big_table() -> TenantTable {
    let mut yaml = String::from(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\ntenants:\n",
    );
    for i in 0..TENANTS {
        yaml.push_str(&format!(
            "  t{i}:\n    domains: [t{i}.example, \"*.t{i}.example\"]\n    backends: [\"127.1.{}.{}:110\"]\n    plaintext_login: allow\n",
            i / 250,
            i % 250 + 1
        ));
    }
    let config = popgate::Config::from_yaml_str(&yaml, Path::new(".")).unwrap();
    TenantTable::new(&config)
}

#[divan::bench(args = [
    "alice@t5000.example",
    "alice+t9999.example",
    "alice@mail.t5000.example",
    "alice@nobody.example",
])]
fn route_10k_tenants(bencher: Bencher, login: &str) {
    let table = big_table();
    bencher.bench_local(|| table.route(black_box(login), None).is_ok());
}

// === choosing among 100 stores ===

fn store_ids() -> Vec<String> {
    (0..STORES)
        .map(|i| format!("store-{i}.mail.svc:110"))
        .collect()
}

fn candidates(ids: &[String]) -> Vec<Candidate<'_>> {
    ids.iter()
        .enumerate()
        .map(|(i, id)| Candidate {
            id,
            weight: 1 + (i % 3) as u32,
            priority: 0,
            healthy: i % 10 != 0,
            active: i * 7 % 13,
        })
        .collect()
}

#[divan::bench(args = [Policy::ConsistentHash, Policy::RoundRobin, Policy::LeastConnections])]
fn choose_of_100_stores(bencher: Bencher, policy: Policy) {
    let ids = store_ids();
    let stores = candidates(&ids);
    let balancer = Balancer::new(policy);
    bencher.bench_local(|| {
        balancer
            .choose(black_box(&stores), black_box("alice@example.com"))
            .order[0]
    });
}
