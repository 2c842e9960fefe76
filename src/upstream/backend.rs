//! One store connection: connect, read the greeting, log in with the client's credentials.
//!
//! A failed login closes the store connection without QUIT: nothing was done there, and popgate never
//! sends QUIT on a client's behalf.

use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};

use crate::config::BackendAddr;
use crate::protocol::MAX_REPLY_LINE;
use crate::protocol::line::{Frame, LineFramer};
use crate::protocol::reply::{Capabilities, MultiLine, Status};
use crate::protocol::sasl;
use crate::session::{Credentials, Mechanism};
use crate::stream::Stream;

/// Time limits for talking to a store before login.
#[derive(Debug, Clone, Copy)]
pub struct BackendTimeouts {
    /// TCP connect.
    pub connect: Duration,
    /// Each reply (greeting, CAPA, login answers).
    pub reply: Duration,
}

/// A store session in the TRANSACTION state.
#[derive(Debug)]
pub struct LoggedIn {
    /// The connection.
    pub stream: Stream,
    /// The store's `+OK` to the login, CRLF included, to show the client.
    pub reply: Vec<u8>,
    /// Bytes the store sent after its `+OK` (normally none), owed to the client.
    pub leftover: BytesMut,
}

/// Why a store login did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The store refused the credentials; the line (CRLF included, response code kept) goes to the client.
    #[error("store refused the login")]
    Rejected(Vec<u8>),
    /// The store answered with a temporary failure (`[SYS/TEMP]`, `[IN-USE]`, `[LOGIN-DELAY]`): passed on,
    /// not counted as a failed login.
    #[error("store refused the login for now")]
    Temporary(Vec<u8>),
    /// The store could not be reached or did not speak POP3 properly.
    #[error("store unavailable: {0}")]
    Unavailable(String),
}

impl LoginError {
    /// A bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            LoginError::Rejected(_) => "rejected",
            LoginError::Temporary(_) => "temporary",
            LoginError::Unavailable(_) => "unavailable",
        }
    }
}

/// A store connection before login, with its read buffer.
struct Conn {
    stream: Stream,
    buf: BytesMut,
    framer: LineFramer,
    reply_timeout: Duration,
}

impl Conn {
    async fn read_line(&mut self) -> Result<Vec<u8>, LoginError> {
        let deadline = Instant::now() + self.reply_timeout;
        loop {
            match self.framer.next_frame(&mut self.buf, MAX_REPLY_LINE) {
                Some(Frame::Line(line)) => return Ok(line),
                Some(Frame::TooLong) => {
                    return Err(LoginError::Unavailable("over-long reply line".into()));
                }
                None => {}
            }
            self.buf.reserve(1024);
            match timeout_at(deadline, self.stream.read_buf(&mut self.buf)).await {
                Err(_) => {
                    return Err(LoginError::Unavailable(
                        "timed out waiting for a reply".into(),
                    ));
                }
                Ok(Ok(0)) => {
                    return Err(LoginError::Unavailable(
                        "store closed the connection".into(),
                    ));
                }
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(LoginError::Unavailable(format!("read: {e}"))),
            }
        }
    }

    async fn status(&mut self) -> Result<(Status, Vec<u8>), LoginError> {
        let line = self.read_line().await?;
        let status = Status::parse(&line)
            .map_err(|_| LoginError::Unavailable("reply is not POP3".into()))?;
        Ok((status, line))
    }

    async fn send(&mut self, bytes: &[u8]) -> Result<(), LoginError> {
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        match timeout(self.reply_timeout, write).await {
            Err(_) => Err(LoginError::Unavailable("timed out writing".into())),
            Ok(r) => r.map_err(|e| LoginError::Unavailable(format!("write: {e}"))),
        }
    }

    async fn capabilities(&mut self) -> Result<Capabilities, LoginError> {
        self.send(b"CAPA\r\n").await?;
        match self.status().await? {
            (Status::Ok, _) => {}
            _ => return Ok(Capabilities::default()),
        }
        let mut body = MultiLine::new();
        while !body.push(&self.read_line().await?) {
            if body.lines().len() > 100 {
                return Err(LoginError::Unavailable("CAPA reply too long".into()));
            }
        }
        Ok(Capabilities::from_lines(body.lines()))
    }
}

/// Connects to `addr`, checks the greeting and logs in as `user` with the client's password.
pub async fn login(
    addr: &BackendAddr,
    user: &str,
    creds: &Credentials,
    timeouts: BackendTimeouts,
) -> Result<LoggedIn, LoginError> {
    if user.is_empty() || user.bytes().any(|b| b.is_ascii_control()) {
        return Err(LoginError::Rejected(
            b"-ERR [AUTH] Authentication failed.\r\n".to_vec(),
        ));
    }
    let tcp = timeout(
        timeouts.connect,
        TcpStream::connect((addr.host.as_str(), addr.port)),
    )
    .await
    .map_err(|_| LoginError::Unavailable("connect timed out".into()))?
    .map_err(|e| LoginError::Unavailable(format!("connect: {e}")))?;
    // Commands and short replies must not wait for Nagle: a POP3 session is a string of small round trips.
    let _ = tcp.set_nodelay(true);
    let mut conn = Conn {
        stream: Stream::Plain(tcp),
        buf: BytesMut::with_capacity(1024),
        framer: LineFramer::new(),
        reply_timeout: timeouts.reply,
    };
    match conn.status().await? {
        (Status::Ok, _) => {}
        _ => return Err(LoginError::Unavailable("store greeting was not +OK".into())),
    }

    let use_plain = creds.mechanism == Mechanism::Plain
        && conn.capabilities().await?.sasl.iter().any(|m| m == "PLAIN");
    let (status, line) = if use_plain {
        let b64 = sasl::encode_plain(creds.authzid.as_deref(), user, &creds.password);
        conn.send(format!("AUTH PLAIN {b64}\r\n").as_bytes())
            .await?;
        conn.status().await?
    } else {
        conn.send(format!("USER {user}\r\n").as_bytes()).await?;
        match conn.status().await? {
            (Status::Ok, _) => {}
            (Status::Err { .. }, line) => return Err(refusal(line)),
            (Status::Continue, _) => {
                return Err(LoginError::Unavailable("unexpected continuation".into()));
            }
        }
        let mut pass = Vec::with_capacity(creds.password.expose().len() + 7);
        pass.extend_from_slice(b"PASS ");
        pass.extend_from_slice(creds.password.expose());
        pass.extend_from_slice(b"\r\n");
        conn.send(&pass).await?;
        conn.status().await?
    };
    match status {
        Status::Ok => Ok(LoggedIn {
            stream: conn.stream,
            reply: with_crlf(line),
            leftover: conn.buf,
        }),
        Status::Err { .. } => Err(refusal(line)),
        Status::Continue => Err(LoginError::Unavailable("unexpected continuation".into())),
    }
}

fn refusal(line: Vec<u8>) -> LoginError {
    let temporary = Status::parse(&line).is_ok_and(|s| s.is_temporary());
    let line = with_crlf(line);
    if temporary {
        LoginError::Temporary(line)
    } else {
        LoginError::Rejected(line)
    }
}

fn with_crlf(mut line: Vec<u8>) -> Vec<u8> {
    line.extend_from_slice(b"\r\n");
    line
}
