//! The AUTHORIZATION state machine: client lines in, [`Action`]s out. No I/O, no clocks, no config lookups.
//!
//! It answers CAPA, STLS, USER, AUTH, QUIT itself, collects credentials, and asks its driver to log in.
//! The driver reports back whether the store accepted them. SASL continuations are explicit phases,
//! not parser state, so a fresh parser after STLS cannot inherit a half-finished exchange.

use crate::protocol::command::{Command, CommandError};
use crate::protocol::sasl::{self, SaslError};
use crate::protocol::{MAX_COMMAND_LINE, MAX_SASL_LINE};
use crate::secret::Secret;

/// Facts about the connection the machine needs to decide what to offer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transport {
    /// TLS is established (implicit TLS, or after STLS).
    pub tls: bool,
    /// The listener offers STLS on plain connections.
    pub stls_offered: bool,
    /// Some tenant reachable here allows plaintext login without TLS.
    pub plaintext_before_tls: bool,
}

/// Per-connection bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Bad or out-of-state commands before the connection is closed.
    pub max_bad_commands: u32,
    /// Failed logins before the connection is closed.
    pub max_failed_logins: u32,
}

/// How the client logged in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// USER/PASS.
    UserPass,
    /// AUTH PLAIN.
    Plain,
    /// AUTH LOGIN.
    Login,
}

impl Mechanism {
    /// Lower-case name for logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Mechanism::UserPass => "user",
            Mechanism::Plain => "plain",
            Mechanism::Login => "login",
        }
    }
}

/// What the client presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The mechanism used.
    pub mechanism: Mechanism,
    /// Login name as sent (routed on).
    pub login: String,
    /// SASL authorization identity, when different from the login.
    pub authzid: Option<String>,
    /// The password (masked in Debug).
    pub password: Secret,
}

/// What the driver must do next, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Write these bytes to the client.
    Send(Vec<u8>),
    /// The `+OK` for STLS has been queued: flush it, then handshake, discard buffered input, fresh framer.
    StartTls,
    /// Route and log in with these credentials; report with `on_login_rejected` if it fails.
    Login(Credentials),
    /// Flush and close the connection.
    Close,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Phase {
    Idle,
    HaveUser(String),
    SaslPlain,
    SaslLoginUser,
    SaslLoginPass(String),
    LoginPending,
    StartingTls,
    Closed,
}

/// The AUTHORIZATION state of one client connection.
#[derive(Debug)]
pub struct Authorization {
    transport: Transport,
    limits: Limits,
    phase: Phase,
    bad_commands: u32,
    failed_logins: u32,
    quit: bool,
}

const GREETING: &[u8] = b"+OK popgate ready\r\n";

impl Authorization {
    /// A fresh machine for a new connection.
    pub fn new(transport: Transport, limits: Limits) -> Self {
        Self {
            transport,
            limits,
            phase: Phase::Idle,
            bad_commands: 0,
            failed_logins: 0,
            quit: false,
        }
    }

    /// The greeting line. No APOP timestamp: popgate cannot check APOP digests without a secrets source.
    pub fn greeting(&self) -> &'static [u8] {
        GREETING
    }

    /// The longest line accepted in the current phase (SASL responses may carry long tokens).
    pub fn line_limit(&self) -> usize {
        match self.phase {
            Phase::SaslPlain | Phase::SaslLoginUser | Phase::SaslLoginPass(_) => MAX_SASL_LINE,
            _ => MAX_COMMAND_LINE,
        }
    }

    /// True while waiting for the driver's login result or TLS handshake; no lines are consumed then.
    pub fn is_waiting(&self) -> bool {
        matches!(
            self.phase,
            Phase::LoginPending | Phase::StartingTls | Phase::Closed
        )
    }

    /// True once the machine asked to close.
    pub fn is_closed(&self) -> bool {
        self.phase == Phase::Closed
    }

    /// True when the close was the client's own QUIT.
    pub fn quit_requested(&self) -> bool {
        self.quit
    }

    /// The transport as the machine sees it.
    pub fn transport(&self) -> Transport {
        self.transport
    }

    fn plaintext_ok(&self) -> bool {
        self.transport.tls || self.transport.plaintext_before_tls
    }

    fn stls_available(&self) -> bool {
        self.transport.stls_offered && !self.transport.tls
    }

    /// Handles one complete client line (CRLF removed).
    pub fn on_line(&mut self, line: &[u8]) -> Vec<Action> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::SaslPlain => return self.sasl_plain_response(line),
            Phase::SaslLoginUser => return self.sasl_login_user(line),
            Phase::SaslLoginPass(user) => return self.sasl_login_pass(user, line),
            Phase::HaveUser(user) => self.phase = Phase::HaveUser(user),
            waiting @ (Phase::LoginPending | Phase::StartingTls | Phase::Closed) => {
                // The driver does not feed lines while waiting; stay put if it does.
                self.phase = waiting;
                return Vec::new();
            }
            Phase::Idle => {}
        }
        let cmd = match Command::parse(line) {
            Ok(cmd) => cmd,
            Err(CommandError::ControlCharacter) => {
                return self.bad("-ERR Invalid characters in command");
            }
            Err(CommandError::Arguments) => return self.bad("-ERR Wrong number of arguments"),
            Err(CommandError::Malformed) => return self.bad("-ERR Unknown command"),
        };
        match cmd {
            Command::Capa => vec![Action::Send(self.capa())],
            Command::Quit => {
                self.phase = Phase::Closed;
                self.quit = true;
                vec![
                    Action::Send(b"+OK popgate signing off\r\n".to_vec()),
                    Action::Close,
                ]
            }
            Command::Stls if self.transport.tls => self.bad("-ERR TLS is already active"),
            Command::Stls if !self.transport.stls_offered => {
                self.bad("-ERR STLS is not offered on this port")
            }
            Command::Stls => {
                self.phase = Phase::StartingTls;
                vec![
                    Action::Send(b"+OK Begin TLS negotiation\r\n".to_vec()),
                    Action::StartTls,
                ]
            }
            Command::User(_) if !self.plaintext_ok() => self.tls_required(),
            Command::User(name) => {
                // +OK whatever the name: refusing here would let anyone probe for names and domains.
                self.phase = Phase::HaveUser(name);
                vec![Action::Send(b"+OK\r\n".to_vec())]
            }
            Command::Pass(password) => match std::mem::replace(&mut self.phase, Phase::Idle) {
                Phase::HaveUser(login) => self.login(Credentials {
                    mechanism: Mechanism::UserPass,
                    login,
                    authzid: None,
                    password: Secret::new(password),
                }),
                _ => self.bad("-ERR USER first"),
            },
            Command::Apop { .. } => {
                self.phase = Phase::Idle;
                self.bad("-ERR [AUTH] APOP is not available here; use USER/PASS or AUTH")
            }
            Command::Auth {
                mechanism: None, ..
            } => {
                let mut reply = b"+OK Supported mechanisms follow\r\n".to_vec();
                if self.plaintext_ok() {
                    reply.extend_from_slice(b"PLAIN\r\nLOGIN\r\n");
                }
                reply.extend_from_slice(b".\r\n");
                vec![Action::Send(reply)]
            }
            Command::Auth {
                mechanism: Some(mech),
                initial,
            } => {
                self.phase = Phase::Idle;
                self.auth(&mech, initial)
            }
            Command::Other(_) => {
                self.bad("-ERR Not logged in; only CAPA, STLS, USER, PASS, AUTH and QUIT here")
            }
        }
    }

    /// The current line was longer than [`Self::line_limit`].
    pub fn on_too_long(&mut self) -> Vec<Action> {
        if matches!(
            self.phase,
            Phase::SaslPlain | Phase::SaslLoginUser | Phase::SaslLoginPass(_)
        ) {
            self.phase = Phase::Idle;
        }
        self.bad("-ERR Line too long")
    }

    /// The STLS handshake finished.
    pub fn on_tls_established(&mut self) {
        self.transport.tls = true;
        self.phase = Phase::Idle;
    }

    /// The store (or popgate's own routing or policy) refused the login; `reply` is the full `-ERR` line
    /// to show the client, CRLF included.
    pub fn on_login_rejected(&mut self, reply: Vec<u8>) -> Vec<Action> {
        self.failed_logins += 1;
        if self.failed_logins >= self.limits.max_failed_logins {
            self.phase = Phase::Closed;
            return vec![Action::Send(reply), Action::Close];
        }
        self.phase = Phase::Idle;
        vec![Action::Send(reply)]
    }

    /// A temporary failure (store down, timeout): the client may try again; not counted as a failed login.
    pub fn on_login_unavailable(&mut self, reply: Vec<u8>) -> Vec<Action> {
        self.phase = Phase::Idle;
        vec![Action::Send(reply)]
    }

    fn capa(&self) -> Vec<u8> {
        let mut r = b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\nPIPELINING\r\n".to_vec();
        if self.plaintext_ok() {
            r.extend_from_slice(b"USER\r\nSASL PLAIN LOGIN\r\n");
        }
        if self.stls_available() {
            r.extend_from_slice(b"STLS\r\n");
        }
        r.extend_from_slice(b"IMPLEMENTATION popgate\r\n.\r\n");
        r
    }

    fn auth(&mut self, mech: &str, initial: Option<Vec<u8>>) -> Vec<Action> {
        match mech {
            "PLAIN" | "LOGIN" if !self.plaintext_ok() => self.tls_required(),
            "PLAIN" => match initial {
                Some(ir) => self.sasl_plain_response(&ir),
                None => {
                    self.phase = Phase::SaslPlain;
                    vec![Action::Send(b"+ \r\n".to_vec())]
                }
            },
            "LOGIN" => match initial {
                Some(ir) => self.sasl_login_user(&ir),
                None => {
                    self.phase = Phase::SaslLoginUser;
                    // base64("Username:")
                    vec![Action::Send(b"+ VXNlcm5hbWU6\r\n".to_vec())]
                }
            },
            _ => self.bad("-ERR [AUTH] Unsupported authentication mechanism"),
        }
    }

    fn sasl_plain_response(&mut self, line: &[u8]) -> Vec<Action> {
        if line == b"*" {
            return self.cancelled();
        }
        match sasl::decode_plain(line) {
            Ok(p) => self.login(Credentials {
                mechanism: Mechanism::Plain,
                login: p.authcid,
                authzid: p.authzid,
                password: p.password,
            }),
            Err(e) => self.sasl_error(e),
        }
    }

    fn sasl_login_user(&mut self, line: &[u8]) -> Vec<Action> {
        if line == b"*" {
            return self.cancelled();
        }
        match sasl::decode_login_field(line)
            .and_then(|u| String::from_utf8(u).map_err(|_| SaslError::Utf8))
        {
            Ok(user) => {
                self.phase = Phase::SaslLoginPass(user);
                // base64("Password:")
                vec![Action::Send(b"+ UGFzc3dvcmQ6\r\n".to_vec())]
            }
            Err(e) => self.sasl_error(e),
        }
    }

    fn sasl_login_pass(&mut self, user: String, line: &[u8]) -> Vec<Action> {
        if line == b"*" {
            return self.cancelled();
        }
        match sasl::decode_login_field(line) {
            Ok(pw) => self.login(Credentials {
                mechanism: Mechanism::Login,
                login: user,
                authzid: None,
                password: Secret::new(pw),
            }),
            Err(e) => self.sasl_error(e),
        }
    }

    fn cancelled(&mut self) -> Vec<Action> {
        self.phase = Phase::Idle;
        vec![Action::Send(
            b"-ERR [AUTH] Authentication cancelled\r\n".to_vec(),
        )]
    }

    fn sasl_error(&mut self, e: SaslError) -> Vec<Action> {
        self.phase = Phase::Idle;
        match e {
            SaslError::ControlCharacter => {
                self.bad("-ERR [AUTH] Credentials contain forbidden characters")
            }
            _ => self.bad("-ERR [AUTH] Invalid SASL response"),
        }
    }

    fn login(&mut self, creds: Credentials) -> Vec<Action> {
        self.phase = Phase::LoginPending;
        vec![Action::Login(creds)]
    }

    fn tls_required(&mut self) -> Vec<Action> {
        let msg = if self.stls_available() {
            "-ERR [AUTH] TLS required: use STLS before logging in"
        } else {
            "-ERR [AUTH] TLS required: connect to the POP3S port"
        };
        self.bad(msg)
    }

    fn bad(&mut self, msg: &str) -> Vec<Action> {
        self.bad_commands += 1;
        let mut line = msg.as_bytes().to_vec();
        line.extend_from_slice(b"\r\n");
        if self.bad_commands >= self.limits.max_bad_commands {
            self.phase = Phase::Closed;
            return vec![
                Action::Send(line),
                Action::Send(b"-ERR Too many bad commands, closing\r\n".to_vec()),
                Action::Close,
            ];
        }
        vec![Action::Send(line)]
    }
}

#[cfg(test)]
mod tests;
