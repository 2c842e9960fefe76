//! RETR throughput of a 20 MiB message and NOOP round trips, through popgate and directly to a real
//! Dovecot store, measured in the same run and reported as ratios. Run with `cargo bench --bench retr`
//! (needs Dovecot, as the end-to-end tests do). Nothing here asserts a timing.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly where it stands

#[path = "../tests/support/dovecot.rs"]
#[allow(dead_code)]
mod dovecot;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use dovecot::{DovecotStore, StoreOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const MESSAGE_MIB: usize = 20;
const ROUNDS: usize = 7;
const NOOPS: usize = 2000;

fn big_message() -> Vec<u8> {
    let mut m = b"Subject: big\r\n\r\n".to_vec();
    let line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789abcdefghijklmnopqrstuv\r\n";
    while m.len() < MESSAGE_MIB << 20 {
        m.extend_from_slice(line);
    }
    m
}

struct Client {
    s: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    async fn login(addr: SocketAddr) -> Self {
        let s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        let mut c = Self {
            s,
            buf: Vec::with_capacity(64 << 20),
        };
        c.line().await;
        c.cmd(b"USER bench@example.com\r\n").await;
        c.cmd(b"PASS bench-pw\r\n").await;
        c
    }
    async fn line(&mut self) {
        self.buf.clear();
        loop {
            let mut chunk = [0u8; 512];
            let n = self.s.read(&mut chunk).await.unwrap();
            assert!(n > 0, "EOF");
            self.buf.extend_from_slice(&chunk[..n]);
            if self.buf.ends_with(b"\r\n") {
                assert!(
                    self.buf.starts_with(b"+OK"),
                    "{}",
                    String::from_utf8_lossy(&self.buf)
                );
                return;
            }
        }
    }
    async fn cmd(&mut self, c: &[u8]) {
        self.s.write_all(c).await.unwrap();
        self.line().await;
    }
    /// RETR 1, reading until the terminating dot; returns bytes received.
    async fn retr(&mut self) -> usize {
        self.s.write_all(b"RETR 1\r\n").await.unwrap();
        self.buf.clear();
        let mut total = 0;
        loop {
            let len = self.buf.len();
            self.buf.resize(len + (256 << 10), 0);
            let n = self.s.read(&mut self.buf[len..]).await.unwrap();
            self.buf.truncate(len + n);
            assert!(n > 0, "EOF in RETR");
            total += n;
            if self.buf.ends_with(b"\r\n.\r\n") {
                return total;
            }
            // Keep only a tail, so memory stays flat.
            if self.buf.len() > 8 << 20 {
                let keep = self.buf.split_off(self.buf.len() - 8);
                self.buf = keep;
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let store = DovecotStore::start(StoreOptions::new().user(
        "bench@example.com",
        "bench-pw",
        [big_message()],
    ));
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\ntenants:\n  bench:\n    domains: [example.com]\n    \
         backends: [\"{}\"]\n    plaintext_login: allow\n",
        store.pop3_addr()
    );
    let config = popgate::Config::from_yaml_str(&yaml, std::path::Path::new(".")).unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let running = popgate::start(config, CancellationToken::new()).await.unwrap();
        let proxy = running.local_addr("pop3").unwrap();
        let direct = store.pop3_addr();
        let mut speeds: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        let mut noops: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for round in 0..ROUNDS {
            // Alternate which goes first so warm-up and caches do not favour one side.
            let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for which in order {
                let addr = [direct, proxy][which];
                let mut c = Client::login(addr).await;
                let t = Instant::now();
                let bytes = c.retr().await;
                let secs = t.elapsed().as_secs_f64();
                speeds[which].push(bytes as f64 / secs / (1 << 20) as f64);
                c.cmd(b"QUIT\r\n").await;
            }
        }
        for which in [0, 1] {
            let mut c = Client::login([direct, proxy][which]).await;
            for _ in 0..NOOPS {
                let t = Instant::now();
                c.cmd(b"NOOP\r\n").await;
                noops[which].push(t.elapsed().as_secs_f64() * 1e6);
            }
            c.cmd(b"QUIT\r\n").await;
        }
        let [d, p] = speeds.map(median);
        let [dn, pn] = noops.map(median);
        println!("RETR {MESSAGE_MIB} MiB (median of {ROUNDS}): direct {d:.0} MiB/s, popgate {p:.0} MiB/s, ratio {:.2}x", p / d);
        println!("NOOP round trip p50 ({NOOPS}): direct {dn:.0} us, popgate {pn:.0} us, ratio {:.2}x", pn / dn);
        running.shutdown();
        tokio::time::timeout(Duration::from_secs(5), running.wait()).await.ok();
    });
}
