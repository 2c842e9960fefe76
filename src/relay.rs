//! After login: bytes both ways until one side ends.
//!
//! Store-to-client bytes pass untouched. Client-to-store bytes are forwarded as read and scanned for
//! command verbs on the way, so QUIT is seen. The rules that keep mail safe: popgate never writes a
//! command of its own to the store; when the client goes away without QUIT (EOF, error, idle timeout,
//! shutdown) the store connection is simply closed, so the store discards pending deletions.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, sleep_until, timeout};
use tokio_util::sync::CancellationToken;

use crate::metrics::TenantMetrics;
use crate::stream::Stream;

/// How a relayed session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayEnd {
    /// The client sent QUIT and the store closed after answering.
    Quit,
    /// The client sent QUIT and disconnected; the store's answer was awaited and it closed.
    QuitThenGone,
    /// The client disconnected without QUIT; the store connection was closed without QUIT.
    ClientGone,
    /// The store closed the connection (without a client QUIT).
    StoreClosed,
    /// No bytes either way for the idle timeout.
    IdleTimeout,
    /// popgate is shutting down.
    Shutdown,
    /// A read or write failed on the client side.
    ClientError,
    /// A read or write failed on the store side.
    StoreError,
}

impl RelayEnd {
    /// A bounded label for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            RelayEnd::Quit => "quit",
            RelayEnd::QuitThenGone => "quit",
            RelayEnd::ClientGone => "client_gone",
            RelayEnd::StoreClosed => "store_closed",
            RelayEnd::IdleTimeout => "idle_timeout",
            RelayEnd::Shutdown => "shutdown",
            RelayEnd::ClientError => "client_error",
            RelayEnd::StoreError => "store_error",
        }
    }
}

/// Totals for the session summary.
#[derive(Debug, Clone, Copy)]
pub struct RelayStats {
    /// Client-to-store bytes.
    pub bytes_up: u64,
    /// Store-to-client bytes.
    pub bytes_down: u64,
    /// Complete command lines the client sent after login.
    pub commands: u64,
    /// How it ended.
    pub end: RelayEnd,
}

/// Relay settings.
#[derive(Debug, Clone, Copy)]
pub struct RelayConfig {
    /// Close after this long without a byte either way.
    pub idle: Duration,
    /// After QUIT and client EOF, how long the store gets to finish UPDATE and close.
    pub quit_drain: Duration,
}

/// Finds command verbs in the client's byte stream, across reads of any size.
#[derive(Debug, Default)]
pub struct CommandScanner {
    verb: [u8; 4],
    len: usize,
    in_verb: bool,
    mid_line: bool,
    is_quit: bool,
    /// Complete command lines seen.
    pub commands: u64,
    /// A complete `QUIT` line was seen.
    pub quit: bool,
}

impl CommandScanner {
    /// Feeds bytes as the client sent them.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.feed_with(bytes, &mut |_| {});
    }

    /// Feeds bytes and reports each complete command line's verb (up to 4 letters; longer ones as empty).
    pub fn feed_with(&mut self, bytes: &[u8], on_command: &mut impl FnMut(&[u8])) {
        for &b in bytes {
            if b == b'\n' {
                if self.mid_line {
                    self.commands += 1;
                    on_command(self.verb.get(..self.len).unwrap_or_default());
                    if self.is_quit
                        || (self.in_verb
                            && self.len == 4
                            && self.verb.eq_ignore_ascii_case(b"QUIT"))
                    {
                        self.quit = true;
                    }
                }
                *self = Self {
                    commands: self.commands,
                    quit: self.quit,
                    ..Self::default()
                };
                continue;
            }
            if !self.mid_line {
                self.mid_line = true;
                self.in_verb = true;
            }
            if self.in_verb {
                if b == b' ' || b == b'\r' {
                    self.is_quit = self.len == 4 && self.verb.eq_ignore_ascii_case(b"QUIT");
                    self.in_verb = false;
                } else if self.len < 4 {
                    self.verb[self.len] = b;
                    self.len += 1;
                } else {
                    self.in_verb = false;
                    self.len = 5;
                }
            }
        }
    }
}

/// Relays until one side ends. `to_store` holds commands the client pipelined behind its login;
/// `to_client` holds bytes the store sent behind its `+OK`.
pub async fn relay(
    client: Stream,
    store: Stream,
    to_store: BytesMut,
    to_client: BytesMut,
    config: RelayConfig,
    metrics: &TenantMetrics,
    shutdown: CancellationToken,
) -> RelayStats {
    let (mut client_rd, mut client_wr) = tokio::io::split(client);
    let (mut store_rd, mut store_wr) = tokio::io::split(store);
    let start = Instant::now();
    let last_activity = AtomicU64::new(0);
    let touch = || last_activity.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let up_bytes = AtomicU64::new(0);
    let down_bytes = AtomicU64::new(0);
    let commands = AtomicU64::new(0);
    let quit_seen = AtomicBool::new(false);

    let up = async {
        let mut scanner = CommandScanner::default();
        let mut buf = vec![0u8; 4096];
        let mut pending = to_store;
        loop {
            if !pending.is_empty() {
                scanner.feed_with(&pending, &mut |verb| metrics.command(verb));
                commands.store(scanner.commands, Ordering::Relaxed);
                quit_seen.store(scanner.quit, Ordering::Relaxed);
                store_wr
                    .write_all(&pending)
                    .await
                    .map_err(|_| RelayEnd::StoreError)?;
                up_bytes.fetch_add(pending.len() as u64, Ordering::Relaxed);
                touch();
                pending.clear();
            }
            let n = client_rd
                .read(&mut buf)
                .await
                .map_err(|_| RelayEnd::ClientError)?;
            if n == 0 {
                return Ok::<(), RelayEnd>(());
            }
            pending.extend_from_slice(&buf[..n]);
        }
    };
    let down = async {
        if !to_client.is_empty() {
            client_wr
                .write_all(&to_client)
                .await
                .map_err(|_| RelayEnd::ClientError)?;
            down_bytes.fetch_add(to_client.len() as u64, Ordering::Relaxed);
        }
        let mut buf = vec![0u8; 32 * 1024];
        loop {
            let n = store_rd
                .read(&mut buf)
                .await
                .map_err(|_| RelayEnd::StoreError)?;
            if n == 0 {
                let _ = client_wr.shutdown().await;
                return Ok::<(), RelayEnd>(());
            }
            client_wr
                .write_all(&buf[..n])
                .await
                .map_err(|_| RelayEnd::ClientError)?;
            down_bytes.fetch_add(n as u64, Ordering::Relaxed);
            touch();
        }
    };
    let idle = async {
        loop {
            let last = Duration::from_millis(last_activity.load(Ordering::Relaxed));
            let due = start + last + config.idle;
            if Instant::now() >= due {
                return;
            }
            sleep_until(due).await;
        }
    };
    tokio::pin!(up, down, idle);

    let end = tokio::select! {
        r = &mut up => match r {
            Err(e) => e,
            Ok(()) if quit_seen.load(Ordering::Relaxed) => {
                // The client said QUIT and hung up: let the store finish UPDATE before closing.
                match timeout(config.quit_drain, &mut down).await {
                    Ok(_) => RelayEnd::QuitThenGone,
                    Err(_) => RelayEnd::QuitThenGone,
                }
            }
            Ok(()) => RelayEnd::ClientGone,
        },
        r = &mut down => match r {
            Err(e) => e,
            Ok(()) if quit_seen.load(Ordering::Relaxed) => RelayEnd::Quit,
            Ok(()) => RelayEnd::StoreClosed,
        },
        () = &mut idle => RelayEnd::IdleTimeout,
        () = shutdown.cancelled() => RelayEnd::Shutdown,
    };
    RelayStats {
        bytes_up: up_bytes.load(Ordering::Relaxed),
        bytes_down: down_bytes.load(Ordering::Relaxed),
        commands: commands.load(Ordering::Relaxed),
        end,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_chunked(input: &[u8], chunk: usize) -> (u64, bool) {
        let mut s = CommandScanner::default();
        for piece in input.chunks(chunk) {
            s.feed(piece);
        }
        (s.commands, s.quit)
    }

    #[test]
    fn quit_is_seen_whatever_the_chunking() {
        let input = b"STAT\r\nRETR 1\r\nquit\r\n";
        for chunk in 1..=input.len() {
            assert_eq!(scan_chunked(input, chunk), (3, true), "chunk {chunk}");
        }
    }

    #[test]
    fn near_misses_are_not_quit() {
        for input in [
            &b"QUITE\r\n"[..],
            b"QUI\r\n",
            b"XQUIT\r\n",
            b"DELE 1\r\nQUIT",
            b"NOOP QUIT\r\n",
        ] {
            for chunk in 1..=input.len() {
                assert!(
                    !scan_chunked(input, chunk).1,
                    "{:?} chunk {chunk}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        assert!(scan_chunked(b"QUIT\n", 2).1);
        assert!(scan_chunked(b"QUIT \r\n", 3).1);
    }
}
