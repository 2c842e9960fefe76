//! One POP3 client connection for the load tool: connect (plain, STLS or implicit TLS), send commands,
//! read and check status lines and dot-terminated bodies.
//!
//! Every reply is checked against what RFC 1939 says it must be; anything else is a [`ClientError`] that
//! names the command and quotes the line, so a misbehaving proxy or store fails the run loudly instead of
//! being counted as fast. Nothing here allocates per command: the read buffer is reused and the caller
//! passes pre-formatted command lines.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use rustls_pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

use popgate::stream::Stream;

/// Longest status line accepted (RFC 2449 allows 512 octets for responses).
const MAX_STATUS_LINE: usize = 1024;
/// Read buffer of a session that only exchanges status lines (held sessions keep it: stay small).
const READ_BUFFER: usize = 4 * 1024;
/// Read buffer once a session reads a body: large reads, as a mail client's would be.
const BODY_BUFFER: usize = 256 * 1024;

/// TLS on the client leg of the load tool.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsMode {
    /// Plain POP3.
    None,
    /// Plain POP3, then `STLS` right after the greeting.
    Stls,
    /// TLS from the first byte (POP3S).
    Implicit,
}

impl TlsMode {
    /// The spelling used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            TlsMode::None => "none",
            TlsMode::Stls => "stls",
            TlsMode::Implicit => "implicit",
        }
    }
}

/// Why a connection or a command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// TCP connect failed.
    #[error("connect {addr}: {source}")]
    Connect {
        /// Target.
        addr: SocketAddr,
        /// Cause.
        source: io::Error,
    },
    /// The TLS handshake failed.
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    /// A read or write failed.
    #[error("{op}: {source}")]
    Io {
        /// The step (greeting, USER, RETR...).
        op: &'static str,
        /// Cause.
        source: io::Error,
    },
    /// No answer in time.
    #[error("{op}: no answer within {after:?}")]
    Timeout {
        /// The step.
        op: &'static str,
        /// The limit.
        after: Duration,
    },
    /// The server closed the connection.
    #[error("{op}: the server closed the connection")]
    Closed {
        /// The step.
        op: &'static str,
    },
    /// A status line that is not `+OK`.
    #[error("{op}: expected +OK, got {line:?}")]
    NotOk {
        /// The step.
        op: &'static str,
        /// The line as received (lossy UTF-8, CRLF trimmed).
        line: String,
    },
    /// Anything else the protocol does not allow (bad size, over-long line, bytes after STLS...).
    #[error("{op}: {detail}")]
    Protocol {
        /// The step.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
}

/// How to reach the server under test.
#[derive(Debug, Clone)]
pub struct Connector {
    /// Loopback address (checked by the caller).
    pub addr: SocketAddr,
    /// TLS mode.
    pub tls: TlsMode,
    /// Client TLS config when `tls` is not `None`.
    pub tls_config: Option<Arc<rustls::ClientConfig>>,
    /// Name sent as SNI and checked against the certificate (unless verification is off).
    pub server_name: ServerName<'static>,
    /// Limit on each connect, handshake, read and write.
    pub io_timeout: Duration,
    /// TLS handshakes that resumed a session (with `--resume`).
    pub resumed: Arc<std::sync::atomic::AtomicU64>,
}

/// A connected POP3 session (after the greeting, and after STLS when asked).
#[derive(Debug)]
pub struct Pop3 {
    stream: Stream,
    buf: Vec<u8>,
    start: usize,
    end: usize,
    io_timeout: Duration,
}

/// A dot-terminated body read by [`Pop3::multiline`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Body {
    /// Octets of the message after undoing dot-stuffing, without the terminating `.CRLF`: what LIST reports.
    pub payload: u64,
    /// Octets received on the wire for the body, terminator included.
    pub wire: u64,
}

/// Where the body scanner is within a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    LineStart,
    /// A `.` at the start of a line: stuffing, or the terminator's first octet.
    Dot,
    /// `.` CR at the start of a line: LF ends the body.
    DotCr,
    Mid,
}

// === impl Connector ===

impl Connector {
    /// Connects, reads the `+OK` greeting, and does TLS as configured. The timer covers each step.
    pub async fn connect(&self) -> Result<Pop3, ClientError> {
        let tcp = timeout(self.io_timeout, TcpStream::connect(self.addr))
            .await
            .map_err(|_| ClientError::Timeout {
                op: "connect",
                after: self.io_timeout,
            })?
            .map_err(|source| ClientError::Connect {
                addr: self.addr,
                source,
            })?;
        // POP3 is a string of small round trips: never wait for Nagle.
        tcp.set_nodelay(true).map_err(|source| ClientError::Io {
            op: "set TCP_NODELAY",
            source,
        })?;
        let stream = match self.tls {
            TlsMode::Implicit => self.handshake(tcp).await?,
            TlsMode::None | TlsMode::Stls => Stream::Plain(tcp),
        };
        let mut session = Pop3::new(stream, self.io_timeout);
        session.expect_ok("greeting").await?;
        if self.tls != TlsMode::Stls {
            return Ok(session);
        }
        session.command_ok(b"STLS\r\n", "STLS").await?;
        if session.start != session.end {
            return Err(ClientError::Protocol {
                op: "STLS",
                detail: "the server sent bytes after its +OK to STLS".into(),
            });
        }
        let Stream::Plain(tcp) = session.stream else {
            return Err(ClientError::Protocol {
                op: "STLS",
                detail: "already TLS".into(),
            });
        };
        let stream = self.handshake(tcp).await?;
        Ok(Pop3::new(stream, self.io_timeout))
    }

    async fn handshake(&self, tcp: TcpStream) -> Result<Stream, ClientError> {
        let Some(config) = self.tls_config.clone() else {
            return Err(ClientError::Protocol {
                op: "TLS",
                detail: "no TLS client configuration".into(),
            });
        };
        let connect =
            tokio_rustls::TlsConnector::from(config).connect(self.server_name.clone(), tcp);
        let tls = timeout(self.io_timeout, connect)
            .await
            .map_err(|_| ClientError::Timeout {
                op: "TLS handshake",
                after: self.io_timeout,
            })?
            .map_err(ClientError::Tls)?;
        if tls.get_ref().1.handshake_kind() == Some(rustls::HandshakeKind::Resumed) {
            self.resumed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(Stream::ClientTls(Box::new(tls)))
    }
}

// === impl Pop3 ===

impl Pop3 {
    fn new(stream: Stream, io_timeout: Duration) -> Self {
        Self {
            stream,
            buf: vec![0; READ_BUFFER],
            start: 0,
            end: 0,
            io_timeout,
        }
    }

    /// `USER` then `PASS`, both answered `+OK`; returns the PASS round trip (write to `+OK` read).
    pub async fn login(
        &mut self,
        user_line: &[u8],
        pass_line: &[u8],
    ) -> Result<Duration, ClientError> {
        self.command_ok(user_line, "USER").await?;
        let sent = Instant::now();
        self.command_ok(pass_line, "PASS").await?;
        Ok(sent.elapsed())
    }

    /// `STAT`: returns (messages, octets) after checking the answer's form.
    pub async fn stat(&mut self) -> Result<(u64, u64), ClientError> {
        let line = self.command_ok(b"STAT\r\n", "STAT").await?;
        let (count, size) =
            two_numbers(&self.buf[line.clone()]).ok_or_else(|| ClientError::Protocol {
                op: "STAT",
                detail: format!("not `+OK count octets`: {:?}", lossy(&self.buf[line])),
            })?;
        Ok((count, size))
    }

    /// `LIST n`: returns the message's size after checking the answer names message `n`.
    pub async fn list_one(&mut self, line_cmd: &[u8], message: u64) -> Result<u64, ClientError> {
        let line = self.command_ok(line_cmd, "LIST").await?;
        match two_numbers(&self.buf[line.clone()]) {
            Some((n, size)) if n == message => Ok(size),
            _ => Err(ClientError::Protocol {
                op: "LIST",
                detail: format!("not `+OK {message} octets`: {:?}", lossy(&self.buf[line])),
            }),
        }
    }

    /// Sends a command whose answer is one `+OK` line (NOOP, USER, DELE...).
    pub async fn simple(&mut self, line_cmd: &[u8], op: &'static str) -> Result<(), ClientError> {
        self.command_ok(line_cmd, op).await.map(|_| ())
    }

    /// `RETR n` (or `TOP`): `+OK`, then the body, whose un-stuffed size must be `expected` when given.
    pub async fn retr(
        &mut self,
        line_cmd: &[u8],
        expected: Option<u64>,
    ) -> Result<Body, ClientError> {
        self.command_ok(line_cmd, "RETR").await?;
        let body = self.multiline("RETR").await?;
        if let Some(want) = expected
            && body.payload != want
        {
            return Err(ClientError::Protocol {
                op: "RETR",
                detail: format!("LIST said {want} octets, the body had {}", body.payload),
            });
        }
        Ok(body)
    }

    /// `QUIT`, answered `+OK`. The connection is dropped afterwards by the caller.
    pub async fn quit(&mut self) -> Result<(), ClientError> {
        self.command_ok(b"QUIT\r\n", "QUIT").await.map(|_| ())
    }

    /// Writes a whole command line and reads its `+OK` status line; returns the line's range in the buffer.
    async fn command_ok(
        &mut self,
        line: &[u8],
        op: &'static str,
    ) -> Result<Range<usize>, ClientError> {
        match timeout(self.io_timeout, self.stream.write_all(line)).await {
            Err(_) => {
                return Err(ClientError::Timeout {
                    op,
                    after: self.io_timeout,
                });
            }
            Ok(Err(source)) => return Err(ClientError::Io { op, source }),
            Ok(Ok(())) => {}
        }
        self.expect_ok(op).await
    }

    /// Reads one status line and checks it is `+OK` (followed by a space or the line end).
    async fn expect_ok(&mut self, op: &'static str) -> Result<Range<usize>, ClientError> {
        let line = self.read_line(op).await?;
        let text = &self.buf[line.clone()];
        let ok = text.starts_with(b"+OK") && matches!(text.get(3), Some(b' ' | b'\r' | b'\n'));
        if !ok {
            return Err(ClientError::NotOk {
                op,
                line: lossy(text),
            });
        }
        Ok(line)
    }

    /// One CRLF-terminated line, bounded.
    async fn read_line(&mut self, op: &'static str) -> Result<Range<usize>, ClientError> {
        loop {
            let unread = &self.buf[self.start..self.end];
            if let Some(i) = unread.iter().position(|&b| b == b'\n') {
                let line = self.start..self.start + i + 1;
                self.start = line.end;
                if self.buf[line.clone()].ends_with(b"\r\n") {
                    return Ok(line);
                }
                return Err(ClientError::Protocol {
                    op,
                    detail: format!(
                        "status line ends in a bare LF: {:?}",
                        lossy(&self.buf[line])
                    ),
                });
            }
            if unread.len() > MAX_STATUS_LINE {
                return Err(ClientError::Protocol {
                    op,
                    detail: format!("status line longer than {MAX_STATUS_LINE} octets"),
                });
            }
            self.fill(op).await?;
        }
    }

    /// Reads a dot-terminated body, undoing dot-stuffing only to count octets. Bytes after the terminator
    /// stay buffered for the next reply.
    async fn multiline(&mut self, op: &'static str) -> Result<Body, ClientError> {
        if self.buf.len() < BODY_BUFFER {
            self.buf.resize(BODY_BUFFER, 0);
        }
        let mut state = BodyState::LineStart;
        let mut body = Body {
            payload: 0,
            wire: 0,
        };
        loop {
            let chunk = &self.buf[self.start..self.end];
            let (used, done) = scan_body(chunk, &mut state, &mut body.payload);
            body.wire += used as u64;
            self.start += used;
            if done {
                return Ok(body);
            }
            self.fill(op).await?;
        }
    }

    /// Reads more bytes after the unread ones, compacting or growing the buffer when it is full.
    async fn fill(&mut self, op: &'static str) -> Result<(), ClientError> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                self.buf.resize(self.buf.len() * 2, 0);
            }
        }
        let read = timeout(self.io_timeout, self.stream.read(&mut self.buf[self.end..]));
        match read.await {
            Err(_) => Err(ClientError::Timeout {
                op,
                after: self.io_timeout,
            }),
            Ok(Err(source)) => Err(ClientError::Io { op, source }),
            Ok(Ok(0)) => Err(ClientError::Closed { op }),
            Ok(Ok(n)) => {
                self.end += n;
                Ok(())
            }
        }
    }
}

/// Advances the body scanner over `chunk`: returns how many octets belong to the body and whether the
/// terminating `.CRLF` was among them. `payload` counts octets after undoing dot-stuffing.
fn scan_body(chunk: &[u8], state: &mut BodyState, payload: &mut u64) -> (usize, bool) {
    let mut i = 0;
    while i < chunk.len() {
        match *state {
            BodyState::LineStart => {
                if chunk[i] == b'.' {
                    *state = BodyState::Dot;
                    i += 1;
                } else {
                    *state = BodyState::Mid;
                }
            }
            BodyState::Dot => {
                if chunk[i] == b'\r' {
                    *state = BodyState::DotCr;
                    i += 1;
                } else {
                    // A stuffed dot: dropped from the payload, the rest of the line counts.
                    *state = BodyState::Mid;
                }
            }
            BodyState::DotCr => {
                if chunk[i] == b'\n' {
                    return (i + 1, true);
                }
                // `.` CR then something other than LF: the dot was stuffing, the CR is payload.
                *payload += 1;
                *state = BodyState::Mid;
            }
            BodyState::Mid => match chunk[i..].iter().position(|&b| b == b'\n') {
                Some(j) => {
                    *payload += j as u64 + 1;
                    i += j + 1;
                    *state = BodyState::LineStart;
                }
                None => {
                    *payload += (chunk.len() - i) as u64;
                    i = chunk.len();
                }
            },
        }
    }
    (i, false)
}

/// `+OK a b ...` → (a, b).
fn two_numbers(line: &[u8]) -> Option<(u64, u64)> {
    let text = std::str::from_utf8(line).ok()?;
    let mut words = text.trim_end().strip_prefix("+OK ")?.split(' ');
    let a = words.next()?.parse().ok()?;
    let b = words.next()?.parse().ok()?;
    Some((a, b))
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan_chunked(input: &[u8], chunk: usize) -> (u64, usize, bool) {
        let mut state = BodyState::LineStart;
        let mut payload = 0;
        let mut used = 0;
        for piece in input.chunks(chunk) {
            let (n, done) = scan_body(piece, &mut state, &mut payload);
            used += n;
            if done {
                return (payload, used, true);
            }
        }
        (payload, used, false)
    }

    #[test]
    fn body_octets_undo_stuffing_whatever_the_chunking() {
        // Message "a\r\n.b\r\n..\r\n" (11 octets) is sent stuffed as "a\r\n..b\r\n...\r\n" then ".\r\n".
        let wire = b"a\r\n..b\r\n...\r\n.\r\nNEXT";
        for chunk in 1..=wire.len() {
            assert_eq!(
                scan_chunked(wire, chunk),
                (11, wire.len() - 4, true),
                "chunk {chunk}"
            );
        }
    }

    #[test]
    fn empty_body_and_unterminated_body() {
        assert_eq!(scan_chunked(b".\r\n", 1), (0, 3, true));
        assert_eq!(scan_chunked(b"abc\r\n.\r", 2), (5, 7, false));
    }

    #[test]
    fn status_numbers() {
        assert_eq!(two_numbers(b"+OK 3 120\r\n"), Some((3, 120)));
        assert_eq!(two_numbers(b"+OK 3 120 extra\r\n"), Some((3, 120)));
        assert_eq!(two_numbers(b"+OK three\r\n"), None);
    }
}
