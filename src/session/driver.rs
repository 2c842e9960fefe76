//! Runs the AUTHORIZATION state machine on a client socket: reads and frames lines, writes replies,
//! performs STLS, and enforces the pre-login deadline on every read, write and handshake.
//!
//! It returns credentials to its caller (`proxy.rs`) and is told the outcome; it never routes or
//! talks to a store itself.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::{Instant, timeout, timeout_at};
use tokio_rustls::TlsAcceptor;

use super::state::{Action, Authorization, Credentials};
use crate::protocol::line::{Frame, LineFramer};
use crate::stream::Stream;
use crate::tls::SniResolver;
use crate::vocab::TenantId;

/// Why a client session ended before a successful login.
#[derive(Debug, thiserror::Error)]
pub enum SessionEnd {
    /// The client sent QUIT.
    #[error("client quit")]
    Quit,
    /// The client closed the connection.
    #[error("client disconnected")]
    Disconnected,
    /// The pre-login deadline passed.
    #[error("pre-login timeout")]
    Timeout,
    /// Too many bad commands or failed logins.
    #[error("closed by policy: too many bad commands or failed logins")]
    Policy,
    /// Popgate is shutting down.
    #[error("shutting down")]
    Shutdown,
    /// The STLS handshake failed or timed out.
    #[error("STLS handshake failed: {0}")]
    Tls(String),
    /// A socket error.
    #[error("client I/O: {0}")]
    Io(#[from] std::io::Error),
}

impl SessionEnd {
    /// A bounded label for logs and metrics.
    pub fn as_str(&self) -> &'static str {
        match self {
            SessionEnd::Quit => "quit_before_login",
            SessionEnd::Disconnected => "client_gone_before_login",
            SessionEnd::Timeout => "login_timeout",
            SessionEnd::Policy => "policy_close",
            SessionEnd::Shutdown => "shutdown",
            SessionEnd::Tls(_) => "tls_error",
            SessionEnd::Io(_) => "client_io_error",
        }
    }
}

/// What the client did that its driver's caller acts on.
#[derive(Debug)]
pub enum Step {
    /// Sent USER with this name (answered `+OK`); its password is still to come.
    Named(String),
    /// Presented credentials: log in.
    Login(Credentials),
}

/// TLS material for STLS on this connection.
#[derive(Clone, Debug)]
pub struct StartTls {
    /// The server configuration (certificates by SNI).
    pub server_config: Arc<rustls::ServerConfig>,
    /// The resolver, to learn which tenant the client's SNI named.
    pub resolver: Arc<SniResolver>,
    /// Bound on the handshake itself.
    pub handshake_timeout: Duration,
}

/// A client connection in the AUTHORIZATION state.
#[derive(Debug)]
pub struct ClientSession {
    stream: Option<Stream>,
    buf: BytesMut,
    framer: LineFramer,
    machine: Authorization,
    starttls: Option<StartTls>,
    deadline: Instant,
    sni_tenant: Option<TenantId>,
    out: Vec<u8>,
    /// Whether [`ClientSession::next_step`] reports a USER ([`Step::Named`]).
    names: bool,
}

impl ClientSession {
    /// Wraps a connected (and, for implicit TLS, handshaken) client.
    pub fn new(
        stream: Stream,
        machine: Authorization,
        starttls: Option<StartTls>,
        deadline: Instant,
        sni_tenant: Option<TenantId>,
    ) -> Self {
        Self {
            stream: Some(stream),
            buf: BytesMut::with_capacity(512),
            framer: LineFramer::new(),
            machine,
            starttls,
            deadline,
            sni_tenant,
            out: Vec::new(),
            names: false,
        }
    }

    /// Whether [`Self::next_step`] reports each USER as [`Step::Named`] (off: it returns credentials only).
    pub fn report_names(&mut self, on: bool) {
        self.names = on;
    }

    /// The tenant named by SNI, if the client's TLS server name selected a tenant certificate.
    pub fn sni_tenant(&self) -> Option<TenantId> {
        self.sni_tenant
    }

    /// The negotiated TLS version on the client leg.
    pub fn tls_version(&self) -> Option<&'static str> {
        self.stream.as_ref().and_then(Stream::tls_version)
    }

    /// How the client leg's TLS handshake went: `full`, `resumed`, or `none` before TLS.
    pub fn tls_handshake_kind(&self) -> &'static str {
        self.stream
            .as_ref()
            .map_or("none", Stream::tls_handshake_kind)
    }

    /// True once the client sent `UTF8` (RFC 6856).
    pub fn utf8_enabled(&self) -> bool {
        self.machine.utf8_enabled()
    }

    /// True once TLS is established on the client leg.
    pub fn is_tls(&self) -> bool {
        self.stream.as_ref().is_some_and(Stream::is_tls)
    }

    /// Sends the greeting.
    pub async fn greet(&mut self) -> Result<(), SessionEnd> {
        self.out.extend_from_slice(self.machine.greeting());
        self.flush().await
    }

    /// Reads and answers commands until the client presents credentials or, when asked to report names,
    /// names itself with USER (its `+OK` sent), or the session ends.
    pub async fn next_step(&mut self) -> Result<Step, SessionEnd> {
        loop {
            while !self.machine.is_waiting() {
                // AUTH lines may carry long initial responses (OAuth tokens), like SASL continuations.
                let limit = if self.buf.len() >= 5 && self.buf[..5].eq_ignore_ascii_case(b"AUTH ") {
                    crate::protocol::MAX_SASL_LINE
                } else {
                    self.machine.line_limit()
                };
                let actions = match self.framer.next_frame(&mut self.buf, limit) {
                    Some(Frame::Line(line)) => self.machine.on_line(&line),
                    Some(Frame::TooLong) => self.machine.on_too_long(),
                    None => break,
                };
                if let Some(creds) = self.perform(actions).await? {
                    return Ok(Step::Login(creds));
                }
                if let Some(name) = self.machine.take_named()
                    && self.names
                {
                    self.flush().await?;
                    return Ok(Step::Named(name));
                }
            }
            self.flush().await?;
            self.read_more().await?;
        }
    }

    /// Tells the client its login was refused (`reply` is a full `-ERR` line); it may try again.
    pub async fn reject(&mut self, reply: Vec<u8>) -> Result<(), SessionEnd> {
        let actions = self.machine.on_login_rejected(reply);
        self.perform(actions).await.map(drop)
    }

    /// Tells the client the store is unavailable; not counted as a failed login.
    pub async fn unavailable(&mut self, reply: Vec<u8>) -> Result<(), SessionEnd> {
        let actions = self.machine.on_login_unavailable(reply);
        self.perform(actions).await.map(drop)
    }

    /// Says goodbye before closing for shutdown.
    pub async fn shutting_down(&mut self) {
        self.out
            .extend_from_slice(b"-ERR [SYS/TEMP] popgate is shutting down, try again\r\n");
        self.deadline = self.deadline.min(Instant::now() + Duration::from_secs(1));
        let _ = self.flush().await;
    }

    /// The stream and whatever the client pipelined after its login command, for the relay.
    pub fn into_parts(self) -> Option<(Stream, BytesMut)> {
        self.stream.map(|s| (s, self.buf))
    }

    /// Executes actions in order; returns credentials when a login was asked for.
    async fn perform(&mut self, actions: Vec<Action>) -> Result<Option<Credentials>, SessionEnd> {
        for action in actions {
            match action {
                Action::Send(bytes) => self.out.extend_from_slice(&bytes),
                Action::StartTls => self.start_tls().await?,
                Action::Login(creds) => {
                    self.flush().await?;
                    return Ok(Some(creds));
                }
                Action::Close => {
                    self.flush().await?;
                    if let Some(s) = self.stream.as_mut() {
                        let _ = timeout(Duration::from_secs(1), s.shutdown()).await;
                    }
                    return Err(if self.machine.quit_requested() {
                        SessionEnd::Quit
                    } else {
                        SessionEnd::Policy
                    });
                }
            }
        }
        Ok(None)
    }

    async fn start_tls(&mut self) -> Result<(), SessionEnd> {
        self.flush().await?;
        // STARTTLS command injection (CVE-2011-0411 class): nothing sent before the handshake may be
        // read as a command after it.
        self.buf.clear();
        self.framer = LineFramer::new();
        let (Some(tls), Some(Stream::Plain(tcp))) = (self.starttls.clone(), self.stream.take())
        else {
            return Err(SessionEnd::Tls(
                "STLS requested on a connection that cannot upgrade".into(),
            ));
        };
        let limit = Instant::now() + tls.handshake_timeout;
        let accepted = timeout_at(
            limit.min(self.deadline),
            TlsAcceptor::from(tls.server_config).accept(tcp),
        )
        .await
        .map_err(|_| SessionEnd::Tls("handshake timed out".into()))?
        .map_err(|e| SessionEnd::Tls(e.to_string()))?;
        self.sni_tenant = accepted
            .get_ref()
            .1
            .server_name()
            .and_then(|n| tls.resolver.tenant_for(n));
        self.stream = Some(Stream::ServerTls(Box::new(accepted)));
        self.machine.on_tls_established();
        Ok(())
    }

    async fn read_more(&mut self) -> Result<(), SessionEnd> {
        let stream = self.stream.as_mut().ok_or(SessionEnd::Disconnected)?;
        self.buf.reserve(1024);
        match timeout_at(self.deadline, stream.read_buf(&mut self.buf)).await {
            Err(_) => {
                self.out
                    .extend_from_slice(b"-ERR Login timeout, closing\r\n");
                self.deadline = Instant::now() + Duration::from_secs(1);
                let _ = self.flush().await;
                Err(SessionEnd::Timeout)
            }
            Ok(Ok(0)) => Err(SessionEnd::Disconnected),
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(SessionEnd::Io(e)),
        }
    }

    async fn flush(&mut self) -> Result<(), SessionEnd> {
        if self.out.is_empty() {
            return Ok(());
        }
        let stream = self.stream.as_mut().ok_or(SessionEnd::Disconnected)?;
        let out = std::mem::take(&mut self.out);
        match timeout_at(self.deadline, async {
            stream.write_all(&out).await?;
            stream.flush().await
        })
        .await
        {
            Err(_) => Err(SessionEnd::Timeout),
            Ok(r) => r.map_err(SessionEnd::Io),
        }
    }
}

/// Relays a store's SASL challenges to the client and returns the client's answers (SCRAM, OAuth errors).
impl crate::protocol::sasl::SaslRelay for ClientSession {
    async fn exchange(&mut self, challenge_line: Vec<u8>) -> Option<Vec<u8>> {
        self.out.extend_from_slice(&challenge_line);
        self.flush().await.ok()?;
        loop {
            match self
                .framer
                .next_frame(&mut self.buf, crate::protocol::MAX_SASL_LINE)
            {
                // Encoded anew (see `sasl::relayable`); a response that is not base64 cancels the exchange.
                Some(Frame::Line(line)) => {
                    return Some(
                        crate::protocol::sasl::relayable(&line).unwrap_or_else(|_| b"*".to_vec()),
                    );
                }
                Some(Frame::TooLong) => return Some(b"*".to_vec()),
                None => {}
            }
            self.read_more().await.ok()?;
        }
    }
}
