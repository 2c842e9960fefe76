//! The AUTHORIZATION state machine: client lines in, [`Action`]s out. No I/O, no clocks, no config lookups.
//!
//! It answers CAPA, STLS, USER, AUTH, QUIT itself, collects credentials, and asks its driver to log in.
//! The driver reports back whether the store accepted them. SASL continuations are explicit phases,
//! not parser state, so a fresh parser after STLS cannot inherit a half-finished exchange.

use crate::protocol::command::{Command, CommandError};
use crate::protocol::sasl::{self, SaslError};
use crate::protocol::{MAX_COMMAND_LINE, MAX_SASL_LINE};
use crate::secret::Secret;
pub use crate::vocab::Mechanism;

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

/// What this connection offers: mechanisms that can work here, the greeting, and the challenge used by
/// APOP and CRAM-MD5. Built by the driver from the config and the connection (no I/O here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Offer {
    /// Mechanisms some tenant reachable on this connection accepts (before the plaintext policy).
    pub mechanisms: Vec<Mechanism>,
    /// The greeting line, CRLF included (popgate's own, or a store's in APOP passthrough).
    pub greeting: Vec<u8>,
    /// The APOP timestamp in the greeting / the CRAM-MD5 challenge, when those can work here.
    pub challenge: Option<String>,
    /// Whether `UTF8` (RFC 6856) is offered: after it, login names may be UTF-8.
    pub utf8: bool,
    /// The `LOGIN-DELAY` capability (RFC 2449) to announce: the minimum seconds between logins, and
    /// whether it varies by user (the `USER` tag) because tenants reachable here differ.
    pub login_delay: Option<(u64, bool)>,
}

impl Offer {
    /// popgate's plain greeting and the classic mechanisms only (USER, PLAIN, LOGIN).
    pub fn basic() -> Self {
        Self {
            mechanisms: vec![Mechanism::UserPass, Mechanism::Plain, Mechanism::Login],
            greeting: b"+OK popgate ready\r\n".to_vec(),
            challenge: None,
            utf8: true,
            login_delay: None,
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
    /// The secret material (masked in Debug): the password (USER, PLAIN, LOGIN); the client's digest
    /// (APOP, CRAM-MD5); the client's base64 initial response, relayed unchanged (XOAUTH2, OAUTHBEARER,
    /// SCRAM client-first).
    pub password: Secret,
    /// The challenge the digest answers (APOP timestamp, CRAM-MD5 challenge).
    pub challenge: Option<String>,
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
    /// Waiting for the client's first response to an AUTH without initial response.
    SaslInitial(Mechanism),
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
    offer: Offer,
    phase: Phase,
    bad_commands: u32,
    failed_logins: u32,
    quit: bool,
    utf8: bool,
    /// The name of a USER just accepted, until the driver takes it ([`Authorization::take_named`]).
    named: Option<String>,
}

impl Authorization {
    /// A fresh machine offering USER, PLAIN and LOGIN with popgate's own greeting.
    pub fn new(transport: Transport, limits: Limits) -> Self {
        Self::with_offer(transport, limits, Offer::basic())
    }

    /// A fresh machine with what this connection offers.
    pub fn with_offer(transport: Transport, limits: Limits, offer: Offer) -> Self {
        Self {
            transport,
            limits,
            offer,
            phase: Phase::Idle,
            bad_commands: 0,
            failed_logins: 0,
            quit: false,
            utf8: false,
            named: None,
        }
    }

    /// The greeting line (with an APOP timestamp only where APOP can work).
    pub fn greeting(&self) -> &[u8] {
        &self.offer.greeting
    }

    /// Whether `m` can be used on this connection now (offered, and TLS up if it reveals a secret).
    fn usable(&self, m: Mechanism) -> bool {
        let challenge_ok =
            !matches!(m, Mechanism::Apop | Mechanism::CramMd5) || self.offer.challenge.is_some();
        self.offer.mechanisms.contains(&m)
            && challenge_ok
            && (!m.reveals_secret() || self.plaintext_ok())
    }

    fn sasl_list(&self) -> Vec<&'static str> {
        let mut v: Vec<Mechanism> = self.offer.mechanisms.clone();
        v.sort();
        v.dedup();
        v.into_iter()
            .filter(|m| self.usable(*m))
            .filter_map(Mechanism::sasl_name)
            .collect()
    }

    /// The longest line accepted in the current phase (SASL responses may carry long tokens).
    pub fn line_limit(&self) -> usize {
        match self.phase {
            Phase::SaslInitial(_) | Phase::SaslLoginPass(_) => MAX_SASL_LINE,
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

    /// True once the client sent `UTF8` (RFC 6856); the store is asked for UTF-8 mode too.
    pub fn utf8_enabled(&self) -> bool {
        self.utf8
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

    /// The name of the USER the last line was, once: the driver may get the store ready for it while the
    /// client sends its password.
    pub fn take_named(&mut self) -> Option<String> {
        self.named.take()
    }

    /// Handles one complete client line (CRLF removed).
    pub fn on_line(&mut self, line: &[u8]) -> Vec<Action> {
        match std::mem::replace(&mut self.phase, Phase::Idle) {
            Phase::SaslInitial(m) => return self.sasl_initial(m, line),
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
        self.on_command(cmd)
    }

    /// One parsed command in the AUTHORIZATION state, no login exchange under way.
    fn on_command(&mut self, cmd: Command) -> Vec<Action> {
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
            Command::User(_) if !self.offer.mechanisms.contains(&Mechanism::UserPass) => {
                self.bad("-ERR [AUTH] USER/PASS is not available here")
            }
            Command::User(_) if !self.plaintext_ok() => self.tls_required(),
            Command::User(name) if !name.is_ascii() && !self.utf8 => self.needs_utf8(),
            Command::User(name) => {
                // +OK whatever the name: refusing here would let anyone probe for names and domains.
                self.named = Some(name.clone());
                self.phase = Phase::HaveUser(name);
                vec![Action::Send(b"+OK\r\n".to_vec())]
            }
            Command::Pass(password) => match std::mem::replace(&mut self.phase, Phase::Idle) {
                Phase::HaveUser(login) => self.login(Credentials {
                    mechanism: Mechanism::UserPass,
                    login,
                    authzid: None,
                    password: Secret::new(password),
                    challenge: None,
                }),
                _ => self.bad("-ERR USER first"),
            },
            Command::Apop { name, .. } if !name.is_ascii() && !self.utf8 => {
                self.phase = Phase::Idle;
                self.needs_utf8()
            }
            Command::Apop { name, digest } => {
                self.phase = Phase::Idle;
                self.apop(name, &digest)
            }
            Command::Auth {
                mechanism: None, ..
            } => vec![Action::Send(self.auth_list())],
            Command::Auth {
                mechanism: Some(mech),
                initial,
            } => {
                self.phase = Phase::Idle;
                self.auth(&mech, initial)
            }
            Command::Utf8 if self.offer.utf8 => {
                // RFC 6856: accepted in the AUTHORIZATION state; repeating it changes nothing.
                self.utf8 = true;
                vec![Action::Send(b"+OK UTF8 enabled\r\n".to_vec())]
            }
            Command::Utf8 => self.bad("-ERR UTF8 is not offered here"),
            Command::Other(_) => self.bad(
                "-ERR Not logged in; only CAPA, STLS, UTF8, USER, PASS, APOP, AUTH and QUIT here",
            ),
        }
    }

    /// APOP: a login when the greeting carried a challenge and APOP is offered, else a refusal.
    fn apop(&mut self, name: String, digest: &str) -> Vec<Action> {
        let valid = digest.len() == 32 && digest.bytes().all(|b| b.is_ascii_hexdigit());
        match (&self.offer.challenge, self.usable(Mechanism::Apop)) {
            (Some(challenge), true) if valid => {
                let challenge = challenge.clone();
                self.login(Credentials {
                    mechanism: Mechanism::Apop,
                    login: name,
                    authzid: None,
                    password: Secret::new(digest.to_ascii_lowercase().into_bytes()),
                    challenge: Some(challenge),
                })
            }
            (Some(_), true) => self.bad("-ERR [AUTH] Malformed APOP digest"),
            _ => self.bad("-ERR [AUTH] APOP is not available here; use USER/PASS or AUTH"),
        }
    }

    /// AUTH without a mechanism: the list of SASL mechanisms offered here.
    fn auth_list(&self) -> Vec<u8> {
        let mut reply = b"+OK Supported mechanisms follow\r\n".to_vec();
        for name in self.sasl_list() {
            reply.extend_from_slice(name.as_bytes());
            reply.extend_from_slice(b"\r\n");
        }
        reply.extend_from_slice(b".\r\n");
        reply
    }

    /// The current line was longer than [`Self::line_limit`].
    pub fn on_too_long(&mut self) -> Vec<Action> {
        if matches!(self.phase, Phase::SaslInitial(_) | Phase::SaslLoginPass(_)) {
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
        if self.usable(Mechanism::UserPass) {
            r.extend_from_slice(b"USER\r\n");
        }
        let sasl = self.sasl_list();
        if !sasl.is_empty() {
            r.extend_from_slice(b"SASL ");
            r.extend_from_slice(sasl.join(" ").as_bytes());
            r.extend_from_slice(b"\r\n");
        }
        if self.stls_available() {
            r.extend_from_slice(b"STLS\r\n");
        }
        if self.offer.utf8 {
            r.extend_from_slice(b"UTF8\r\n");
        }
        match self.offer.login_delay {
            Some((secs, true)) => {
                r.extend_from_slice(format!("LOGIN-DELAY {secs} USER\r\n").as_bytes())
            }
            Some((secs, false)) => {
                r.extend_from_slice(format!("LOGIN-DELAY {secs}\r\n").as_bytes())
            }
            None => {}
        }
        r.extend_from_slice(b"IMPLEMENTATION popgate\r\n.\r\n");
        r
    }

    fn auth(&mut self, name: &str, initial: Option<Vec<u8>>) -> Vec<Action> {
        let Some(mech) = Mechanism::from_sasl(name) else {
            return self.bad("-ERR [AUTH] Unsupported authentication mechanism");
        };
        if !self.offer.mechanisms.contains(&mech) {
            return self.bad("-ERR [AUTH] Unsupported authentication mechanism");
        }
        if mech.reveals_secret() && !self.plaintext_ok() {
            return self.tls_required();
        }
        if !self.usable(mech) {
            return self.bad("-ERR [AUTH] Unsupported authentication mechanism");
        }
        match (mech, initial) {
            // CRAM-MD5 is server-first: an initial response is a protocol error (RFC 5034 §4).
            (Mechanism::CramMd5, Some(_)) => {
                self.bad("-ERR [AUTH] CRAM-MD5 takes no initial response")
            }
            (Mechanism::CramMd5, None) => {
                self.phase = Phase::SaslInitial(mech);
                let challenge = self.offer.challenge.clone().unwrap_or_default();
                let mut line = b"+ ".to_vec();
                line.extend_from_slice(sasl::encode_b64(challenge.as_bytes()).as_bytes());
                line.extend_from_slice(b"\r\n");
                vec![Action::Send(line)]
            }
            (_, Some(ir)) => self.sasl_initial(mech, &ir),
            (Mechanism::Login, None) => {
                self.phase = Phase::SaslInitial(mech);
                // base64("Username:")
                vec![Action::Send(b"+ VXNlcm5hbWU6\r\n".to_vec())]
            }
            (_, None) => {
                self.phase = Phase::SaslInitial(mech);
                vec![Action::Send(b"+ \r\n".to_vec())]
            }
        }
    }

    /// The client's first SASL response (initial response or answer to the first challenge).
    fn sasl_initial(&mut self, mech: Mechanism, line: &[u8]) -> Vec<Action> {
        if line == b"*" {
            return self.cancelled();
        }
        let creds = |login: String, password: Vec<u8>, challenge: Option<String>| Credentials {
            mechanism: mech,
            login,
            authzid: None,
            password: Secret::new(password),
            challenge,
        };
        let parsed = match mech {
            Mechanism::Plain => sasl::decode_plain(line).map(|p| Credentials {
                mechanism: mech,
                login: p.authcid,
                authzid: p.authzid,
                password: p.password,
                challenge: None,
            }),
            Mechanism::Login => {
                return match sasl::decode_login_field(line)
                    .and_then(|u| String::from_utf8(u).map_err(|_| SaslError::Utf8))
                {
                    Ok(user) => {
                        self.phase = Phase::SaslLoginPass(user);
                        // base64("Password:")
                        vec![Action::Send(b"+ UGFzc3dvcmQ6\r\n".to_vec())]
                    }
                    Err(e) => self.sasl_error(e),
                };
            }
            Mechanism::CramMd5 => sasl::decode_cram_md5(line).map(|(user, digest)| {
                creds(user, digest.into_bytes(), self.offer.challenge.clone())
            }),
            // Relayed to the store: what goes is the token encoded anew, never the client's line.
            Mechanism::Xoauth2 => sasl::decode_xoauth2(line)
                .and_then(|id| Ok(creds(id.user, sasl::relayable(line)?, None))),
            Mechanism::Oauthbearer => sasl::decode_oauthbearer(line)
                .and_then(|id| Ok(creds(id.user, sasl::relayable(line)?, None))),
            Mechanism::ScramSha1 | Mechanism::ScramSha256 => sasl::decode_scram_client_first(line)
                .and_then(|user| Ok(creds(user, sasl::relayable(line)?, None))),
            Mechanism::UserPass | Mechanism::Apop => Err(SaslError::Malformed),
        };
        match parsed {
            Ok(c) => self.login(c),
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
                challenge: None,
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

    /// A non-ASCII login name in USER or APOP before the client sent `UTF8` (RFC 6856 §3).
    fn needs_utf8(&mut self) -> Vec<Action> {
        let msg = if self.offer.utf8 {
            "-ERR [AUTH] Login names outside ASCII need the UTF8 command first"
        } else {
            "-ERR [AUTH] Login names outside ASCII are not accepted here"
        };
        self.bad(msg)
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
