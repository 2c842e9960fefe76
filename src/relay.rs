//! After login: bytes both ways until one side ends.
//!
//! Store-to-client bytes pass untouched. Client-to-store bytes are forwarded as read and scanned for
//! command verbs on the way, so QUIT is seen. The rules that keep mail safe: popgate never writes a
//! command of its own to the store; when the client goes away without QUIT (EOF, error, idle timeout,
//! shutdown) the store connection is simply closed, so the store discards pending deletions.
//!
//! Memory: an idle session holds no data buffer. Both directions run in one future that waits for
//! readiness, reads into the worker thread's scratch buffer and writes straight on; only bytes a
//! destination could not take yet are copied into a per-session spill buffer, freed once drained. When
//! both legs are plain TCP (on Linux), a long store-to-client transfer goes through a pipe with
//! `splice(2)` instead (`splice.rs`). No `tokio::io::split`: one future owns both streams, so neither
//! needs a lock.

#[cfg(target_os = "linux")]
mod splice;

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep, sleep, timeout};
use tokio_util::sync::CancellationToken;

use crate::metrics::TenantMetrics;
use crate::stream::Stream;

/// The worker thread's read buffer: large enough for a TLS record's worth of plaintext several times over,
/// shared by every session the thread runs, and never held while a future waits.
const SCRATCH_LEN: usize = 64 * 1024;

thread_local! {
    static SCRATCH: RefCell<Box<[u8]>> = RefCell::new(vec![0u8; SCRATCH_LEN].into_boxed_slice());
}

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
/// `to_client` holds bytes the store sent behind its `+OK`. Both are sent before anything else.
///
/// Not an `async fn`: its arguments would be stored in the future beside the `Legs` made from them, and
/// an idle session is mostly this future.
pub fn relay(
    client: Stream,
    store: Stream,
    to_store: BytesMut,
    to_client: BytesMut,
    config: RelayConfig,
    metrics: Arc<TenantMetrics>,
    shutdown: CancellationToken,
) -> impl Future<Output = RelayStats> + Send + 'static {
    let legs = Legs::new(
        client,
        store,
        to_store,
        to_client,
        cfg!(target_os = "linux"),
    );
    run(legs, config, metrics, shutdown)
}

/// What ended the first phase of a relay.
enum First {
    /// The client-to-store direction ended: `Ok` on client EOF.
    Up(Result<(), RelayEnd>),
    /// The store-to-client direction ended: `Ok` on store EOF.
    Down(Result<(), RelayEnd>),
    Idle,
    Shutdown,
}

/// Not an `async fn` either, for the same reason: `legs` is kept once, as the future's own capture.
fn run(
    mut legs: Legs,
    config: RelayConfig,
    metrics: Arc<TenantMetrics>,
    shutdown: CancellationToken,
) -> impl Future<Output = RelayStats> + Send + 'static {
    legs.scanner
        .feed_with(&legs.up.spill, &mut |verb| metrics.command(verb));
    async move {
        let end = match until_one_side_ends(&mut legs, config, &metrics, &shutdown).await {
            // The client said QUIT, then its side failed: most clients close a TLS connection without
            // close_notify, or reset it, once they have the answer. The session ended by QUIT all the
            // same; the store still gets its time to finish UPDATE.
            First::Up(Err(RelayEnd::ClientError)) | First::Down(Err(RelayEnd::ClientError))
                if legs.scanner.quit =>
            {
                let _ = timeout(config.quit_drain, poll_fn(|cx| legs.poll_down(cx))).await;
                RelayEnd::QuitThenGone
            }
            First::Up(Err(e)) | First::Down(Err(e)) => e,
            First::Up(Ok(())) if legs.scanner.quit => {
                // The client said QUIT and hung up: let the store finish UPDATE and answer before closing.
                let _ = timeout(config.quit_drain, poll_fn(|cx| legs.poll_down(cx))).await;
                RelayEnd::QuitThenGone
            }
            First::Up(Ok(())) => RelayEnd::ClientGone,
            First::Down(Ok(())) if legs.scanner.quit => RelayEnd::Quit,
            First::Down(Ok(())) => RelayEnd::StoreClosed,
            First::Idle => RelayEnd::IdleTimeout,
            First::Shutdown => RelayEnd::Shutdown,
        };
        RelayStats {
            bytes_up: legs.up.bytes,
            bytes_down: legs.down.bytes,
            commands: legs.scanner.commands,
            end,
        }
    }
}

/// Both directions, the idle timer and shutdown. A function of its own so that its timer and shutdown
/// waiter share space in the relay's future with the QUIT drain's timer.
async fn until_one_side_ends(
    legs: &mut Legs,
    config: RelayConfig,
    metrics: &TenantMetrics,
    shutdown: &CancellationToken,
) -> First {
    // One timer, armed for `idle` after the last byte. Activity only sets a flag; the clock is read at most
    // once per wakeup that moved bytes, and the timer is re-armed only when it fires early.
    let idle = sleep(config.idle);
    tokio::pin!(idle);
    let cancelled = shutdown.cancelled();
    tokio::pin!(cancelled);
    let mut last_active = Instant::now();
    poll_fn(|cx| {
        if let Poll::Ready(r) = legs.poll_up(cx, metrics) {
            return Poll::Ready(First::Up(r));
        }
        if let Poll::Ready(r) = legs.poll_down(cx) {
            return Poll::Ready(First::Down(r));
        }
        if std::mem::take(&mut legs.moved) {
            last_active = Instant::now();
        }
        if idle_expired(idle.as_mut(), cx, last_active + config.idle) {
            return Poll::Ready(First::Idle);
        }
        if cancelled.as_mut().poll(cx).is_ready() {
            return Poll::Ready(First::Shutdown);
        }
        Poll::Pending
    })
    .await
}

/// Whether the idle timer ran out with no activity since `due - idle`; re-arms it at `due` otherwise.
fn idle_expired(mut timer: Pin<&mut Sleep>, cx: &mut Context<'_>, due: Instant) -> bool {
    loop {
        if timer.as_mut().poll(cx).is_pending() {
            return false;
        }
        if timer.deadline() >= due {
            return true;
        }
        timer.as_mut().reset(due);
    }
}

/// Both streams, what each direction owes, and the command scanner: everything a relay holds.
#[derive(Debug)]
struct Legs {
    client: Stream,
    store: Stream,
    /// Client to store.
    up: Direction,
    /// Store to client.
    down: Direction,
    scanner: CommandScanner,
    /// Long store-to-client transfers by `splice(2)` (both legs plain TCP, on Linux).
    zero_copy: bool,
    /// The pipe while a long transfer streams.
    #[cfg(target_os = "linux")]
    pipe: Option<splice::Pipe>,
    /// Bytes moved since the idle clock was last read.
    moved: bool,
}

/// Which side an I/O error in one direction belongs to.
#[derive(Debug, Clone, Copy)]
struct Sides {
    read: RelayEnd,
    write: RelayEnd,
}

const UP: Sides = Sides {
    read: RelayEnd::ClientError,
    write: RelayEnd::StoreError,
};
const DOWN: Sides = Sides {
    read: RelayEnd::StoreError,
    write: RelayEnd::ClientError,
};

/// Why a copy through memory stopped, other than an error or nothing ready.
#[derive(Debug)]
enum Copied {
    /// The source ended and everything is delivered.
    Eof,
    /// A read filled the scratch buffer: a long transfer is streaming.
    Bulk,
}

/// One direction: bytes read but not yet taken by the destination (empty, unallocated, whenever the
/// destination keeps up), whether a flush is owed, and the total delivered.
#[derive(Debug, Default)]
struct Direction {
    spill: BytesMut,
    unflushed: bool,
    /// The source ended; the destination is being shut down (store to client only).
    closing: bool,
    bytes: u64,
}

// === impl Legs ===

impl Legs {
    fn new(
        client: Stream,
        store: Stream,
        to_store: BytesMut,
        to_client: BytesMut,
        zero_copy: bool,
    ) -> Self {
        let zero_copy = zero_copy && !client.is_tls() && !store.is_tls();
        Legs {
            client,
            store,
            up: Direction::owing(to_store),
            down: Direction::owing(to_client),
            scanner: CommandScanner::default(),
            zero_copy,
            #[cfg(target_os = "linux")]
            pipe: None,
            moved: false,
        }
    }

    /// Client to store; `Ready(Ok)` when the client has closed its side and everything it sent is delivered.
    fn poll_up(
        &mut self,
        cx: &mut Context<'_>,
        metrics: &TenantMetrics,
    ) -> Poll<Result<(), RelayEnd>> {
        let scanner = &mut self.scanner;
        let copied = self.up.poll_copy(
            cx,
            &mut self.client,
            &mut self.store,
            UP,
            &mut |bytes| scanner.feed_with(bytes, &mut |verb| metrics.command(verb)),
            &mut self.moved,
            false,
        );
        ready!(copied)?;
        Poll::Ready(Ok(()))
    }

    /// Store to client; `Ready(Ok)` when the store has closed, everything is delivered and, on TLS, the
    /// client's side is shut down (plain TCP gets its FIN when the relay drops the socket).
    fn poll_down(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RelayEnd>> {
        if !self.down.closing {
            ready!(self.poll_down_copy(cx))?;
            self.down.closing = true;
        }
        // TLS ends with close_notify. Plain TCP needs no shutdown(2) of its own: the relay ends here and
        // closing the socket sends the FIN, one system call fewer per session.
        if self.client.is_tls() {
            // Errors here do not matter: everything has been delivered.
            let _ = ready!(Pin::new(&mut self.client).poll_shutdown(cx));
        }
        Poll::Ready(Ok(()))
    }

    /// Store to client until the store has nothing ready (`Pending`) or has ended (`Ready(Ok)`).
    fn poll_down_copy(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), RelayEnd>> {
        loop {
            #[cfg(target_os = "linux")]
            if let Some(pipe) = self.pipe.as_mut() {
                // Owed bytes first, so the order holds when a transfer moves into the pipe.
                ready!(
                    self.down
                        .poll_drain(cx, &mut self.client, DOWN.write, &mut self.moved)
                )?;
                if let (Stream::Plain(store), Stream::Plain(client)) = (&self.store, &self.client) {
                    let before = self.down.bytes;
                    let step = splice::poll_splice(cx, store, client, pipe, &mut self.down.bytes);
                    self.moved |= self.down.bytes != before;
                    match ready!(step) {
                        splice::Spliced::StoreEof => return Poll::Ready(Ok(())),
                        splice::Spliced::StoreError => {
                            return Poll::Ready(Err(RelayEnd::StoreError));
                        }
                        splice::Spliced::ClientError => {
                            return Poll::Ready(Err(RelayEnd::ClientError));
                        }
                        splice::Spliced::Quiet => {}
                    }
                }
                // The transfer paused with the pipe empty: close it, so that an idle session holds none.
                self.pipe = None;
            }
            let copied = self.down.poll_copy(
                cx,
                &mut self.store,
                &mut self.client,
                DOWN,
                &mut |_| {},
                &mut self.moved,
                self.zero_copy,
            );
            match ready!(copied)? {
                Copied::Eof => return Poll::Ready(Ok(())),
                Copied::Bulk => self.open_pipe(),
            }
        }
    }

    /// A long reply is streaming: the rest goes through a pipe. Without one (descriptors exhausted), it
    /// goes on through memory.
    #[cfg(target_os = "linux")]
    fn open_pipe(&mut self) {
        self.pipe = splice::Pipe::new().ok();
    }

    #[cfg(not(target_os = "linux"))]
    fn open_pipe(&mut self) {}
}

// === impl Direction ===

impl Direction {
    fn owing(bytes: BytesMut) -> Self {
        Direction {
            spill: bytes,
            ..Direction::default()
        }
    }

    /// Writes what is owed and flushes; `Ready(Ok)` once the destination has taken everything.
    fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        dst: &mut Stream,
        err: RelayEnd,
        moved: &mut bool,
    ) -> Poll<Result<(), RelayEnd>> {
        while !self.spill.is_empty() {
            match Pin::new(&mut *dst).poll_write(cx, &self.spill) {
                Poll::Ready(Ok(n)) if n > 0 => {
                    self.spill.advance(n);
                    self.bytes += n as u64;
                    self.unflushed = true;
                    *moved = true;
                }
                Poll::Ready(_) => return Poll::Ready(Err(err)),
                Poll::Pending => return Poll::Pending,
            }
        }
        if self.spill.capacity() > 0 {
            // Drained: give the memory back, so that an idle session holds none.
            self.spill = BytesMut::new();
        }
        if self.unflushed {
            // TLS: rustls may still hold the last record.
            ready!(Pin::new(&mut *dst).poll_flush(cx)).map_err(|_| err)?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }

    /// Copies `src` to `dst` through the worker's scratch buffer until `src` has nothing ready (`Pending`),
    /// has ended and everything is delivered (`Eof`), or, with `stop_on_bulk`, a read filled the whole
    /// scratch buffer (`Bulk`). `on_read` sees every byte read, in order.
    #[allow(clippy::too_many_arguments)] // two streams, their roles, and three things the caller owns
    fn poll_copy(
        &mut self,
        cx: &mut Context<'_>,
        src: &mut Stream,
        dst: &mut Stream,
        sides: Sides,
        on_read: &mut impl FnMut(&[u8]),
        moved: &mut bool,
        stop_on_bulk: bool,
    ) -> Poll<Result<Copied, RelayEnd>> {
        loop {
            ready!(self.poll_drain(cx, dst, sides.write, moved))?;
            let read = SCRATCH.with_borrow_mut(|buf| {
                let mut buf = ReadBuf::new(&mut buf[..]);
                match Pin::new(&mut *src).poll_read(cx, &mut buf) {
                    Poll::Pending => Poll::Pending,
                    Poll::Ready(Err(_)) => Poll::Ready(Err(sides.read)),
                    Poll::Ready(Ok(())) => {
                        let bytes = buf.filled();
                        if bytes.is_empty() {
                            return Poll::Ready(Ok(Some(Copied::Eof)));
                        }
                        on_read(bytes);
                        *moved = true;
                        let bulk = stop_on_bulk && bytes.len() == SCRATCH_LEN;
                        let copied = self.forward(cx, bytes, dst, sides.write);
                        Poll::Ready(copied.map(|()| bulk.then_some(Copied::Bulk)))
                    }
                }
            });
            if let Some(copied) = ready!(read)? {
                return Poll::Ready(Ok(copied));
            }
        }
    }

    /// Writes `bytes` to `dst` as far as it takes them now and keeps the rest in the spill buffer.
    fn forward(
        &mut self,
        cx: &mut Context<'_>,
        bytes: &[u8],
        dst: &mut Stream,
        err: RelayEnd,
    ) -> Result<(), RelayEnd> {
        let mut written = 0;
        while written < bytes.len() {
            match Pin::new(&mut *dst).poll_write(cx, &bytes[written..]) {
                Poll::Ready(Ok(n)) if n > 0 => written += n,
                Poll::Ready(_) => return Err(err),
                Poll::Pending => {
                    self.spill.extend_from_slice(&bytes[written..]);
                    break;
                }
            }
        }
        self.bytes += written as u64;
        self.unflushed = true;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

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

    /// A connected loopback pair: (the far end, popgate's end).
    async fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (far, near) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let (far, near) = (far.unwrap(), near.unwrap().0);
        far.set_nodelay(true).unwrap();
        near.set_nodelay(true).unwrap();
        (far, near)
    }

    struct Setup {
        /// The POP3 client's socket.
        client: TcpStream,
        /// The store's socket.
        store: TcpStream,
        legs: Legs,
        metrics: Arc<TenantMetrics>,
    }

    const CONFIG: RelayConfig = RelayConfig {
        idle: Duration::from_secs(600),
        quit_drain: Duration::from_secs(5),
    };

    async fn setup(zero_copy: bool, to_store: &[u8], to_client: &[u8]) -> Setup {
        let (client, client_leg) = pair().await;
        let (store, store_leg) = pair().await;
        let metrics = crate::metrics::Metrics::new().unwrap().tenant("t");
        let legs = Legs::new(
            Stream::Plain(client_leg),
            Stream::Plain(store_leg),
            BytesMut::from(to_store),
            BytesMut::from(to_client),
            zero_copy,
        );
        Setup {
            client,
            store,
            legs,
            metrics,
        }
    }

    async fn read_to_end(s: &mut TcpStream) -> Vec<u8> {
        let mut v = Vec::new();
        s.read_to_end(&mut v).await.unwrap();
        v
    }

    #[tokio::test]
    async fn relays_in_order_and_ends_on_quit() {
        for zero_copy in [false, true] {
            let s = setup(zero_copy, b"STAT\r\n", b"+OK owed\r\n").await;
            let (mut client, mut store) = (s.client, s.store);
            let script = async {
                client.write_all(b"NOOP\r\nQUIT\r\n").await.unwrap();
                let mut got = [0u8; 18];
                store.read_exact(&mut got).await.unwrap();
                assert_eq!(&got, b"STAT\r\nNOOP\r\nQUIT\r\n");
                store
                    .write_all(b"+OK 1 2\r\n+OK\r\n+OK bye\r\n")
                    .await
                    .unwrap();
                drop(store);
                read_to_end(&mut client).await
            };
            let (stats, seen) = tokio::join!(
                run(s.legs, CONFIG, s.metrics.clone(), CancellationToken::new()),
                script
            );
            assert_eq!(
                seen, b"+OK owed\r\n+OK 1 2\r\n+OK\r\n+OK bye\r\n",
                "{zero_copy}"
            );
            assert_eq!(stats.end, RelayEnd::Quit, "{zero_copy}");
            assert_eq!((stats.bytes_up, stats.bytes_down), (18, 33), "{zero_copy}");
            assert_eq!(stats.commands, 3);
        }
    }

    #[tokio::test]
    async fn a_client_gone_without_quit_gets_the_store_closed_without_a_word() {
        for zero_copy in [false, true] {
            let s = setup(zero_copy, b"", b"").await;
            let (mut client, mut store) = (s.client, s.store);
            let script = async {
                client.write_all(b"DELE 1\r\n").await.unwrap();
                let mut got = [0u8; 8];
                store.read_exact(&mut got).await.unwrap();
                store.write_all(b"+OK\r\n").await.unwrap();
                let mut reply = [0u8; 5];
                client.read_exact(&mut reply).await.unwrap();
                drop(client);
                read_to_end(&mut store).await
            };
            let (stats, rest) = tokio::join!(
                run(s.legs, CONFIG, s.metrics.clone(), CancellationToken::new()),
                script
            );
            assert_eq!(stats.end, RelayEnd::ClientGone, "{zero_copy}");
            assert!(rest.is_empty(), "the store got {rest:?} after DELE");
        }
    }

    #[tokio::test]
    async fn quit_then_hang_up_lets_the_store_answer() {
        for zero_copy in [false, true] {
            let s = setup(zero_copy, b"", b"").await;
            let (mut client, mut store) = (s.client, s.store);
            let script = async {
                client.write_all(b"QUIT\r\n").await.unwrap();
                client.shutdown().await.unwrap();
                let mut got = [0u8; 6];
                store.read_exact(&mut got).await.unwrap();
                store.write_all(b"+OK bye\r\n").await.unwrap();
                drop(store);
                read_to_end(&mut client).await
            };
            let (stats, seen) = tokio::join!(
                run(s.legs, CONFIG, s.metrics.clone(), CancellationToken::new()),
                script
            );
            assert_eq!(stats.end, RelayEnd::QuitThenGone, "{zero_copy}");
            assert_eq!(seen, b"+OK bye\r\n");
        }
    }

    #[tokio::test]
    async fn the_store_closing_ends_the_client_too() {
        for zero_copy in [false, true] {
            let s = setup(zero_copy, b"", b"").await;
            let (mut client, store) = (s.client, s.store);
            let script = async {
                drop(store);
                read_to_end(&mut client).await
            };
            let (stats, seen) = tokio::join!(
                run(s.legs, CONFIG, s.metrics.clone(), CancellationToken::new()),
                script
            );
            assert_eq!(stats.end, RelayEnd::StoreClosed, "{zero_copy}");
            assert!(seen.is_empty());
        }
    }

    #[tokio::test]
    async fn shutdown_closes_the_store_without_quit() {
        for zero_copy in [false, true] {
            let s = setup(zero_copy, b"", b"").await;
            let (_client, mut store) = (s.client, s.store);
            let stop = CancellationToken::new();
            stop.cancel();
            let stats = run(s.legs, CONFIG, s.metrics.clone(), stop).await;
            assert_eq!(stats.end, RelayEnd::Shutdown);
            assert!(read_to_end(&mut store).await.is_empty());
        }
    }

    /// Real time (tokio's test-util is not enabled in this crate): only lower bounds are tight, as timers
    /// never fire early; the upper bound is loose for a busy machine.
    #[tokio::test]
    async fn idle_time_counts_from_the_last_byte() {
        let idle = Duration::from_millis(400);
        let one = |zero_copy| async move {
            let s = setup(zero_copy, b"", b"").await;
            let (mut client, mut store) = (s.client, s.store);
            let config = RelayConfig { idle, ..CONFIG };
            let start = Instant::now();
            let script = async {
                // A gap, then one round trip: the idle time starts again from it.
                tokio::time::sleep(idle / 2).await;
                client.write_all(b"NOOP\r\n").await.unwrap();
                let sent = Instant::now();
                let mut got = [0u8; 6];
                store.read_exact(&mut got).await.unwrap();
                store.write_all(b"+OK\r\n").await.unwrap();
                let seen = read_to_end(&mut client).await;
                (sent, seen, read_to_end(&mut store).await)
            };
            let (stats, (sent, seen, rest)) = tokio::join!(
                run(s.legs, config, s.metrics.clone(), CancellationToken::new()),
                script
            );
            let ended = Instant::now();
            assert_eq!(stats.end, RelayEnd::IdleTimeout, "{zero_copy}");
            assert!(
                ended - sent >= idle,
                "closed {:?} after the last byte",
                ended - sent
            );
            assert!(ended - start < Duration::from_secs(10));
            assert_eq!(seen, b"+OK\r\n");
            assert!(rest.is_empty(), "the store got {rest:?}");
        };
        tokio::join!(one(false), one(true));
    }

    #[tokio::test]
    async fn a_large_message_arrives_whole_under_backpressure() {
        for zero_copy in [false, true] {
            let s = setup(zero_copy, b"", b"").await;
            let (mut client, mut store) = (s.client, s.store);
            let message: Vec<u8> = (0..12 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
            let script = async {
                // The store writes it all before the client reads a byte: the relay must hold back.
                let writer = async {
                    store.write_all(&message).await.unwrap();
                    drop(store);
                };
                let reader = async {
                    let mut first = [0u8; 1];
                    client.read_exact(&mut first).await.unwrap();
                    let mut rest = read_to_end(&mut client).await;
                    rest.insert(0, first[0]);
                    rest
                };
                tokio::join!(writer, reader).1
            };
            let (stats, seen) = tokio::join!(
                run(s.legs, CONFIG, s.metrics.clone(), CancellationToken::new()),
                script
            );
            assert_eq!(stats.end, RelayEnd::StoreClosed, "{zero_copy}");
            assert_eq!(stats.bytes_down, message.len() as u64);
            assert!(
                seen == message,
                "{zero_copy}: the message changed on the way"
            );
        }
    }
}
