//! One accepted connection: the greeting and its faults, reading lines, writing replies, and the
//! TLS handshakes (implicit, or after STLS).
//!
//! All socket I/O for a session lives here and nothing else does: what a line means and what to
//! answer is [`Session`]'s job. After STLS the line reader is rebuilt on the TLS stream and any
//! bytes the client sent behind the STLS command are thrown away, so plaintext injected before the
//! handshake can never be read as a command sent under TLS.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{
    AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader,
};
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::Shared;
use super::session::{Payload, Session, Then};

/// RFC 1939 §3: an idle client is logged out after at least 10 minutes.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// How long a client gets to finish a TLS handshake, implicit or after STLS.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Replies to pipelined commands are gathered into one write up to this size.
const WRITE_COALESCE_LIMIT: usize = 64 * 1024;

/// Why a connection ended other than by QUIT or the client closing it.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ConnectionError {
    #[error("connection I/O failed: {0}")]
    Io(#[from] io::Error),
    #[error("TLS handshake did not finish within {0:?}")]
    TlsHandshakeTimeout(Duration),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(#[source] io::Error),
}

/// What reading one line produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Framed {
    /// A complete line, LF included, is in the buffer.
    Line,
    /// A line longer than the limit was read and thrown away, up to and including its LF.
    TooLong,
    /// The client closed its side; a partial line, if any, is dropped.
    Eof,
}

/// Replies waiting to be written, so a burst of pipelined commands gets one write, not one each.
#[derive(Debug, Default)]
struct Outbox {
    pending: Vec<u8>,
}

/// Runs one connection to its end. The session (and so any mailbox lock) is dropped when this
/// returns, whatever the reason.
pub(crate) async fn serve_connection(
    shared: Arc<Shared>,
    tcp: TcpStream,
) -> Result<(), ConnectionError> {
    // Replies are complete lines or complete responses when written; Nagle would only delay them.
    tcp.set_nodelay(true)?;
    let mut session = Session::new(Arc::clone(&shared), shared.next_timestamp());

    if let Some(config) = shared.implicit_tls() {
        let mut tls = handshake(config, tcp).await?;
        session.on_tls_established();
        if greet(&mut tls, &session, &shared).await? {
            // STLS is refused once TLS is up, so no second upgrade can come back from here.
            converse(tls, &mut session).await?;
        }
        return Ok(());
    }

    let mut tcp = tcp;
    if !greet(&mut tcp, &session, &shared).await? {
        return Ok(());
    }
    let Some(tcp) = converse(tcp, &mut session).await? else {
        return Ok(());
    };
    // The session only asks for STLS when TLS is configured.
    let Some(config) = &shared.tls else {
        return Ok(());
    };
    let tls = handshake(config, tcp).await?;
    session.on_tls_established();
    converse(tls, &mut session).await?;
    Ok(())
}

/// Sends the greeting, or whatever the faults say instead. Returns false when the `no_greeting`
/// fault kept the server silent until the client left; there is nothing more to do then.
async fn greet<S>(stream: &mut S, session: &Session, shared: &Shared) -> io::Result<bool>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (delay, silent, replacement) = shared.with_faults(|faults| {
        (
            faults.greeting_delay,
            faults.no_greeting,
            faults.greeting_override.clone(),
        )
    });
    if let Some(delay) = delay {
        tokio::time::sleep(delay).await;
    }
    if silent {
        // Read and discard until the client gives up, so its close is noticed and the task ends.
        let mut sink = [0u8; 1024];
        while stream.read(&mut sink).await? != 0 {}
        return Ok(false);
    }
    // After an override greeting the session carries on as usual: the test decides what to do
    // with a garbage or -ERR greeting, the server does not.
    let greeting = replacement.unwrap_or_else(|| session.greeting());
    stream.write_all(&greeting).await?;
    stream.flush().await?;
    Ok(true)
}

/// Reads commands and writes replies until the session ends. Returns the bare stream, with
/// anything buffered after the command discarded, when the client asked for STLS.
async fn converse<S>(stream: S, session: &mut Session) -> Result<Option<S>, ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut stream = BufReader::new(stream);
    let mut line = Vec::with_capacity(256);
    let mut outbox = Outbox::default();
    loop {
        // Everything answered so far must be on the wire before a read that may wait for the
        // client, or a client waiting for those answers would deadlock with us.
        if !stream.buffer().contains(&b'\n') {
            outbox.flush(&mut stream).await?;
        }

        let limit = session.line_limit();
        let framed = match tokio::time::timeout(
            IDLE_TIMEOUT,
            read_line(&mut stream, &mut line, limit),
        )
        .await
        {
            Ok(framed) => framed,
            Err(_elapsed) => {
                session.on_disconnect();
                // Best effort: the client is idle and may well be gone.
                let _ = stream
                    .write_all(b"-ERR Disconnected for inactivity.\r\n")
                    .await;
                return Ok(None);
            }
        };
        let reply = match framed {
            Ok(Framed::Line) => session.on_line(&line),
            Ok(Framed::TooLong) => session.on_overlong_line(),
            Ok(Framed::Eof) => {
                session.on_disconnect();
                return Ok(None);
            }
            Err(error) => {
                session.on_disconnect();
                return Err(error.into());
            }
        };

        outbox.push(&mut stream, reply.payload).await?;
        match reply.then {
            Then::Continue => {}
            Then::Close => {
                outbox.flush(&mut stream).await?;
                // The client may already have closed; the connection ends either way.
                let _ = stream.shutdown().await;
                return Ok(None);
            }
            Then::StartTls => {
                outbox.flush(&mut stream).await?;
                // into_inner drops BufReader's buffer: bytes sent before the handshake die here.
                return Ok(Some(stream.into_inner()));
            }
        }
    }
}

async fn handshake(
    config: &Arc<rustls::ServerConfig>,
    tcp: TcpStream,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, ConnectionError> {
    let acceptor = TlsAcceptor::from(Arc::clone(config));
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Ok(tls),
        Ok(Err(error)) => Err(ConnectionError::TlsHandshake(error)),
        Err(_elapsed) => Err(ConnectionError::TlsHandshakeTimeout(TLS_HANDSHAKE_TIMEOUT)),
    }
}

/// Reads one line, LF included, into `line`.
///
/// A line longer than `limit` (LF included) is consumed up to its LF and reported as
/// [`Framed::TooLong`], so the next read starts on a fresh line and memory stays bounded.
async fn read_line<R>(reader: &mut R, line: &mut Vec<u8>, limit: usize) -> io::Result<Framed>
where
    R: AsyncBufRead + Unpin,
{
    line.clear();
    let mut too_long = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            if too_long || !line.is_empty() {
                tracing::debug!("client closed the connection part way through a line");
            }
            return Ok(Framed::Eof);
        }
        let (chunk, complete) = match available.iter().position(|&b| b == b'\n') {
            Some(end) => (&available[..=end], true),
            None => (available, false),
        };
        let used = chunk.len();
        if !too_long {
            if line.len() + used > limit {
                too_long = true;
                line.clear();
            } else {
                line.extend_from_slice(chunk);
            }
        }
        reader.consume(used);
        if complete {
            return Ok(if too_long {
                Framed::TooLong
            } else {
                Framed::Line
            });
        }
    }
}

// === impl Outbox ===

impl Outbox {
    async fn push<W>(&mut self, writer: &mut W, payload: Payload) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        match payload {
            Payload::Owned(bytes) if self.pending.is_empty() => self.pending = bytes,
            Payload::Owned(bytes) => self.pending.extend_from_slice(&bytes),
            // Shared payloads are whole messages: written in place rather than copied in.
            Payload::Shared(bytes) => {
                self.write_pending(writer).await?;
                writer.write_all(&bytes).await?;
            }
        }
        if self.pending.len() >= WRITE_COALESCE_LIMIT {
            self.write_pending(writer).await?;
        }
        Ok(())
    }

    async fn flush<W>(&mut self, writer: &mut W) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        self.write_pending(writer).await?;
        // TLS streams hold written data in records until flushed.
        writer.flush().await
    }

    async fn write_pending<W>(&mut self, writer: &mut W) -> io::Result<()>
    where
        W: AsyncWrite + Unpin,
    {
        if !self.pending.is_empty() {
            writer.write_all(&self.pending).await?;
            self.pending.clear();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// Frames `input` with a reader that hands out at most `chunk` bytes at a time.
    async fn frame_all(input: &[u8], chunk: usize, limit: usize) -> Vec<(Framed, Vec<u8>)> {
        let mut reader = BufReader::with_capacity(chunk, input);
        let mut line = Vec::new();
        let mut frames = Vec::new();
        loop {
            let framed = read_line(&mut reader, &mut line, limit).await.unwrap();
            frames.push((framed, line.clone()));
            if framed == Framed::Eof {
                return frames;
            }
        }
    }

    #[tokio::test]
    async fn framing_is_the_same_for_every_chunk_size() {
        let long = format!("NOOP {}\r\n", "x".repeat(300));
        let input = format!("USER a\r\nPASS b c\r\n{long}STAT\nLIST 1\r\npartial");
        let expected = vec![
            (Framed::Line, b"USER a\r\n".to_vec()),
            (Framed::Line, b"PASS b c\r\n".to_vec()),
            (Framed::TooLong, Vec::new()),
            (Framed::Line, b"STAT\n".to_vec()),
            (Framed::Line, b"LIST 1\r\n".to_vec()),
            (Framed::Eof, b"partial".to_vec()),
        ];
        for chunk in 1..=512 {
            assert_eq!(
                frame_all(input.as_bytes(), chunk, 255).await,
                expected,
                "chunk size {chunk}"
            );
        }
    }

    #[tokio::test]
    async fn limit_counts_the_line_ending() {
        let exactly = format!("{}\r\n", "a".repeat(253));
        let over = format!("{}\r\n", "a".repeat(254));
        let frames = frame_all(format!("{exactly}{over}").as_bytes(), 64, 255).await;
        assert_eq!(frames[0].0, Framed::Line);
        assert_eq!(frames[1].0, Framed::TooLong);
        assert_eq!(frames[2].0, Framed::Eof);
    }
}
