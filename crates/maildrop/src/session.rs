//! One POP3 session as a state machine: lines in, [`Reply`]s out (RFC 1939 §3–§7, RFC 2449 CAPA,
//! RFC 2595 STLS, RFC 5034 SASL).
//!
//! No sockets here. The connection reads a line, hands it to [`Session::on_line`], writes the
//! reply's bytes and then does what [`Then`] says (carry on, close, or start TLS). A SASL exchange
//! is an explicit state, so the line after `AUTH PLAIN` is never mistaken for a command.
//!
//! Whenever the session answers [`Then::Close`], or is told the client went away, it has already
//! left TRANSACTION: the mailbox lock is released before the socket closes, so a client that sees
//! EOF can log straight back in.

use std::fmt::Display;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::Shared;
use super::command::{
    COMMAND_LINE_LIMIT, Command, MessageNumber, SASL_RESPONSE_LIMIT, strip_line_ending,
};
use super::store::{Credential, MailboxLock, Message, OpenError};

/// What to send back, and what the connection does after sending it.
#[derive(Debug)]
pub(crate) struct Reply {
    pub(crate) payload: Payload,
    pub(crate) then: Then,
}

/// Reply bytes: built for this reply, or shared with the store (a whole RETR response) so large
/// messages are written without being copied.
#[derive(Debug)]
pub(crate) enum Payload {
    Owned(Vec<u8>),
    Shared(Arc<[u8]>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Then {
    Continue,
    /// Close the connection; the session has already committed or abandoned its changes.
    Close,
    /// Discard anything the client sent after STLS, run the TLS handshake, then call
    /// [`Session::on_tls_established`] and carry on.
    StartTls,
}

/// A POP3 session from greeting to close.
#[derive(Debug)]
pub(crate) struct Session {
    shared: Arc<Shared>,
    /// The APOP timestamp announced in this session's greeting.
    timestamp: String,
    tls_active: bool,
    state: State,
}

#[derive(Debug)]
enum State {
    Authorization {
        /// Name given by USER, waiting for PASS.
        user: Option<String>,
    },
    /// After an AUTH command: the next line is a SASL response, not a command.
    Sasl(SaslStep),
    Transaction(Transaction),
    /// After QUIT, a fault, or the client going away.
    Closed,
}

/// Which client response a SASL exchange is waiting for.
#[derive(Debug)]
enum SaslStep {
    PlainResponse,
    LoginUsername,
    LoginPassword { username: String },
}

#[derive(Debug, Clone, Copy)]
enum Mechanism {
    Plain,
    Login,
}

/// The TRANSACTION state: the locked mailbox and which of its messages are marked for deletion.
#[derive(Debug)]
struct Transaction {
    mailbox: MailboxLock,
    /// Indexed like `mailbox.messages()`.
    deleted: Vec<bool>,
}

const AUTH_FAILED: &str = "[AUTH] Authentication failed.";
const NO_SUCH_MESSAGE: &str = "no such message";
/// AUTH LOGIN prompts, base64 of "Username:" and "Password:" as clients expect them.
const LOGIN_USERNAME_PROMPT: &str = "VXNlcm5hbWU6";
const LOGIN_PASSWORD_PROMPT: &str = "UGFzc3dvcmQ6";

// === impl Reply ===

impl Reply {
    fn ok(text: impl Display) -> Self {
        Self::status("+OK", text)
    }

    fn err(text: impl Display) -> Self {
        Self::status("-ERR", text)
    }

    fn status(indicator: &str, text: impl Display) -> Self {
        let text = text.to_string();
        let line = if text.is_empty() {
            format!("{indicator}\r\n")
        } else {
            format!("{indicator} {text}\r\n")
        };
        Self::owned(line.into_bytes())
    }

    /// A `+OK` line followed by `lines` and the terminating dot. Lines here are never message
    /// content, so none starts with "." and none needs stuffing.
    fn multiline(status: impl Display, lines: impl IntoIterator<Item = String>) -> Self {
        let mut out = format!("+OK {status}\r\n");
        for line in lines {
            out.push_str(&line);
            out.push_str("\r\n");
        }
        out.push_str(".\r\n");
        Self::owned(out.into_bytes())
    }

    /// A SASL server challenge (RFC 5034 §4): "+ " and base64, possibly empty.
    fn challenge(base64: &str) -> Self {
        Self::owned(format!("+ {base64}\r\n").into_bytes())
    }

    fn owned(bytes: Vec<u8>) -> Self {
        Self {
            payload: Payload::Owned(bytes),
            then: Then::Continue,
        }
    }

    fn then(mut self, then: Then) -> Self {
        self.then = then;
        self
    }
}

// === impl Session ===

impl Session {
    pub(crate) fn new(shared: Arc<Shared>, timestamp: String) -> Self {
        Self {
            shared,
            timestamp,
            tls_active: false,
            state: State::Authorization { user: None },
        }
    }

    /// The greeting; it always carries the APOP timestamp (RFC 1939 §7).
    pub(crate) fn greeting(&self) -> Vec<u8> {
        format!(
            "+OK {} maildrop ready {}\r\n",
            self.shared.hostname, self.timestamp
        )
        .into_bytes()
    }

    /// Longest line the next read may return, line ending included.
    pub(crate) fn line_limit(&self) -> usize {
        match self.state {
            State::Sasl(_) => SASL_RESPONSE_LIMIT,
            _ => COMMAND_LINE_LIMIT,
        }
    }

    /// Handles one line as read from the client, line ending included or not.
    pub(crate) fn on_line(&mut self, line: &[u8]) -> Reply {
        // The SASL step is moved out by value (it may own the LOGIN username); any other state
        // goes straight back.
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Sasl(step) => self.sasl_response(step, strip_line_ending(line)),
            other => {
                self.state = other;
                match Command::parse(line) {
                    Ok(command) => self.on_command(command),
                    Err(error) => Reply::err(error),
                }
            }
        }
    }

    /// The client sent a line longer than [`Session::line_limit`]; it has been discarded.
    pub(crate) fn on_overlong_line(&mut self) -> Reply {
        if matches!(self.state, State::Sasl(_)) {
            self.state = State::Authorization { user: None };
            return Reply::err("Line too long; authentication cancelled.");
        }
        Reply::err("Line too long.")
    }

    /// The STLS handshake finished, or the connection was TLS from the start. Anything learned
    /// before TLS is forgotten (RFC 2595 §4).
    pub(crate) fn on_tls_established(&mut self) {
        self.tls_active = true;
        if !matches!(self.state, State::Transaction(_)) {
            self.state = State::Authorization { user: None };
        }
    }

    /// The client went away or timed out: nothing is committed and the lock is released now.
    pub(crate) fn on_disconnect(&mut self) {
        self.state = State::Closed;
    }

    fn on_command(&mut self, command: Command<'_>) -> Reply {
        match command {
            Command::Capa => return self.capabilities(),
            Command::Quit => return self.quit(),
            // RFC 1939 only lists NOOP for TRANSACTION; answering it everywhere keeps clients
            // that use it as a keep-alive happy and costs nothing.
            Command::Noop => return Reply::ok(""),
            _ => {}
        }
        match self.state {
            State::Authorization { .. } => self.authorization(command),
            State::Transaction(_) => self.transaction(command),
            State::Sasl(_) | State::Closed => Reply::err("Command not valid in this state."),
        }
    }

    fn authorization(&mut self, command: Command<'_>) -> Reply {
        let wants_login = matches!(
            command,
            Command::Pass(_)
                | Command::Apop { .. }
                | Command::Auth {
                    mechanism: Some(_),
                    ..
                }
        );
        if wants_login && self.shared.logins_refused() {
            self.state = State::Authorization { user: None };
            return Reply::err("[SYS/TEMP] logins refused");
        }

        match command {
            Command::User(name) => {
                // Always +OK: answering -ERR for unknown names would let anyone list mailboxes.
                self.state = State::Authorization {
                    user: Some(name.to_owned()),
                };
                Reply::ok("send PASS")
            }
            Command::Pass(password) => {
                let user = match &mut self.state {
                    State::Authorization { user } => user.take(),
                    _ => None,
                };
                match user {
                    Some(user) => self.log_in(&user, Credential::Password(password)),
                    None => Reply::err("USER first."),
                }
            }
            Command::Apop { name, digest } => {
                let timestamp = self.timestamp.clone();
                self.log_in(
                    name,
                    Credential::ApopDigest {
                        timestamp: &timestamp,
                        digest,
                    },
                )
            }
            Command::Auth {
                mechanism: None, ..
            } => Reply::multiline(
                "SASL mechanisms follow",
                ["PLAIN".to_owned(), "LOGIN".to_owned()],
            ),
            Command::Auth {
                mechanism: Some(mechanism),
                initial_response,
            } => self.start_sasl(mechanism, initial_response),
            Command::Stls => self.start_tls(),
            _ => Reply::err("Not logged in."),
        }
    }

    fn start_tls(&mut self) -> Reply {
        if self.tls_active {
            return Reply::err("Command not permitted when TLS active.");
        }
        if self.shared.tls.is_none() {
            return Reply::err("STLS not available.");
        }
        self.state = State::Authorization { user: None };
        Reply::ok("Begin TLS negotiation").then(Then::StartTls)
    }

    fn start_sasl(&mut self, mechanism: &str, initial_response: Option<&str>) -> Reply {
        // AUTH starts over: a USER given earlier does not carry into it.
        self.state = State::Authorization { user: None };
        let mechanism = if mechanism.eq_ignore_ascii_case("PLAIN") {
            Mechanism::Plain
        } else if mechanism.eq_ignore_ascii_case("LOGIN") {
            Mechanism::Login
        } else {
            return Reply::err("Unsupported SASL mechanism.");
        };
        let step = match mechanism {
            Mechanism::Plain => SaslStep::PlainResponse,
            Mechanism::Login => SaslStep::LoginUsername,
        };
        match initial_response {
            Some(response) => self.sasl_response(step, response.as_bytes()),
            None => {
                let prompt = match mechanism {
                    Mechanism::Plain => "",
                    Mechanism::Login => LOGIN_USERNAME_PROMPT,
                };
                self.state = State::Sasl(step);
                Reply::challenge(prompt)
            }
        }
    }

    /// One SASL client response, from a continuation line or an AUTH initial response.
    fn sasl_response(&mut self, step: SaslStep, response: &[u8]) -> Reply {
        self.state = State::Authorization { user: None };
        if response == b"*" {
            return Reply::err("Authentication cancelled.");
        }
        // "=" is how an initial response says "empty" (RFC 5034 §4).
        let decoded = if response == b"=" {
            Ok(Vec::new())
        } else {
            BASE64.decode(response)
        };
        let Ok(decoded) = decoded else {
            return Reply::err("Invalid base64 data.");
        };
        match step {
            SaslStep::PlainResponse => match parse_plain(&decoded) {
                Some((user, password)) => self.log_in(user, Credential::Password(password)),
                None => Reply::err(AUTH_FAILED),
            },
            SaslStep::LoginUsername => match String::from_utf8(decoded) {
                Ok(username) => {
                    self.state = State::Sasl(SaslStep::LoginPassword { username });
                    Reply::challenge(LOGIN_PASSWORD_PROMPT)
                }
                Err(_) => Reply::err(AUTH_FAILED),
            },
            SaslStep::LoginPassword { username } => match std::str::from_utf8(&decoded) {
                Ok(password) => self.log_in(&username, Credential::Password(password)),
                Err(_) => Reply::err(AUTH_FAILED),
            },
        }
    }

    fn log_in(&mut self, user: &str, credential: Credential<'_>) -> Reply {
        match self.shared.store.open(user, credential) {
            Ok(mailbox) => {
                let transaction = Transaction::new(mailbox);
                let (count, octets) = transaction.totals();
                self.state = State::Transaction(transaction);
                tracing::debug!(user, "maildrop session logged in");
                Reply::ok(format_args!(
                    "maildrop has {count} messages ({octets} octets)"
                ))
            }
            Err(error) => {
                self.state = State::Authorization { user: None };
                tracing::debug!(user, %error, "maildrop login rejected");
                match error {
                    OpenError::BadCredentials => Reply::err(AUTH_FAILED),
                    OpenError::Locked => Reply::err("[IN-USE] Mailbox is locked."),
                }
            }
        }
    }

    fn transaction(&mut self, command: Command<'_>) -> Reply {
        let State::Transaction(transaction) = &mut self.state else {
            return Reply::err("Not logged in.");
        };
        match command {
            Command::Stat => {
                let (count, octets) = transaction.totals();
                Reply::ok(format_args!("{count} {octets}"))
            }
            Command::List(None) => {
                let (count, octets) = transaction.totals();
                Reply::multiline(
                    format_args!("{count} messages ({octets} octets)"),
                    transaction
                        .visible_messages()
                        .map(|(number, message)| format!("{number} {}", message.size())),
                )
            }
            Command::List(Some(number)) => match transaction.visible(number) {
                Some(message) => Reply::ok(format_args!("{} {}", number.0, message.size())),
                None => Reply::err(NO_SUCH_MESSAGE),
            },
            Command::Uidl(None) => Reply::multiline(
                "unique-id listing follows",
                transaction
                    .visible_messages()
                    .map(|(number, message)| format!("{number} {}", message.uid())),
            ),
            Command::Uidl(Some(number)) => match transaction.visible(number) {
                Some(message) => Reply::ok(format_args!("{} {}", number.0, message.uid())),
                None => Reply::err(NO_SUCH_MESSAGE),
            },
            Command::Retr(number) => match transaction.visible(number) {
                Some(message) => {
                    let response = message.retr_response();
                    self.retrieve(response)
                }
                None => Reply::err(NO_SUCH_MESSAGE),
            },
            Command::Top { message, lines } => match transaction.visible(message) {
                Some(message) => Reply::owned(message.top_response(lines)),
                None => Reply::err(NO_SUCH_MESSAGE),
            },
            Command::Dele(number) => {
                if transaction.delete(number) {
                    Reply::ok(format_args!("message {} deleted", number.0))
                } else {
                    Reply::err(NO_SUCH_MESSAGE)
                }
            }
            Command::Rset => {
                transaction.undelete_all();
                let (count, octets) = transaction.totals();
                Reply::ok(format_args!(
                    "maildrop has {count} messages ({octets} octets)"
                ))
            }
            Command::User(_)
            | Command::Pass(_)
            | Command::Apop { .. }
            | Command::Auth { .. }
            | Command::Stls => Reply::err("Already logged in."),
            // Answered before the state is looked at.
            Command::Capa | Command::Quit | Command::Noop => Reply::err("Unexpected command."),
        }
    }

    /// The RETR response, unless the `drop_mid_retr_after` fault cuts it short: then only the
    /// first bytes go out and the connection closes with nothing committed.
    fn retrieve(&mut self, response: Arc<[u8]>) -> Reply {
        let cut = self.shared.with_faults(|faults| faults.drop_mid_retr_after);
        match cut {
            None => Reply {
                payload: Payload::Shared(response),
                then: Then::Continue,
            },
            Some(cut) => {
                tracing::debug!(cut, "maildrop fault: dropping connection mid-RETR");
                self.state = State::Closed;
                let prefix = response.get(..cut).unwrap_or(&response);
                Reply::owned(prefix.to_vec()).then(Then::Close)
            }
        }
    }

    /// QUIT: in TRANSACTION this is the UPDATE state, which commits deletions before answering.
    fn quit(&mut self) -> Reply {
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Transaction(transaction) => {
                let left = transaction.commit();
                Reply::ok(format_args!("maildrop signing off ({left} messages left)"))
            }
            _ => Reply::ok("maildrop signing off"),
        }
        .then(Then::Close)
    }

    fn capabilities(&self) -> Reply {
        let mut lines: Vec<String> = [
            "TOP",
            "UIDL",
            "USER",
            "RESP-CODES",
            "AUTH-RESP-CODE",
            "PIPELINING",
            "SASL PLAIN LOGIN",
        ]
        .into_iter()
        .map(str::to_owned)
        .collect();
        let stls_offered = self.shared.tls.is_some()
            && !self.tls_active
            && matches!(self.state, State::Authorization { .. });
        if stls_offered {
            lines.push("STLS".to_owned());
        }
        lines.push("IMPLEMENTATION maildrop".to_owned());
        Reply::multiline("Capability list follows", lines)
    }
}

/// Splits a PLAIN message (RFC 4616): authzid NUL authcid NUL passwd. Acting as another user
/// (an authzid different from the authcid) is not supported.
fn parse_plain(message: &[u8]) -> Option<(&str, &str)> {
    let mut parts = message.split(|&b| b == 0);
    let (authzid, authcid, password) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || authcid.is_empty() {
        return None;
    }
    if !authzid.is_empty() && authzid != authcid {
        return None;
    }
    Some((
        std::str::from_utf8(authcid).ok()?,
        std::str::from_utf8(password).ok()?,
    ))
}

// === impl Transaction ===

impl Transaction {
    fn new(mailbox: MailboxLock) -> Self {
        let deleted = vec![false; mailbox.messages().len()];
        Self { mailbox, deleted }
    }

    fn index(&self, number: MessageNumber) -> Option<usize> {
        let index = number.0.checked_sub(1)?;
        (!*self.deleted.get(index)?).then_some(index)
    }

    /// The message with this number, unless it does not exist or is marked deleted.
    fn visible(&self, number: MessageNumber) -> Option<&Message> {
        let index = self.index(number)?;
        self.mailbox.messages().get(index).map(|message| &**message)
    }

    /// Messages not marked deleted, with their 1-based numbers.
    fn visible_messages(&self) -> impl Iterator<Item = (usize, &Message)> {
        self.mailbox
            .messages()
            .iter()
            .zip(&self.deleted)
            .enumerate()
            .filter(|(_, (_, deleted))| !**deleted)
            .map(|(index, (message, _))| (index + 1, &**message))
    }

    fn totals(&self) -> (usize, usize) {
        self.visible_messages()
            .fold((0, 0), |(count, octets), (_, message)| {
                (count + 1, octets + message.size())
            })
    }

    fn delete(&mut self, number: MessageNumber) -> bool {
        match self.index(number) {
            Some(index) => {
                self.deleted[index] = true;
                true
            }
            None => false,
        }
    }

    fn undelete_all(&mut self) {
        self.deleted.fill(false);
    }

    /// Enters UPDATE: removes the marked messages from the store and releases the lock.
    /// Returns how many messages are left.
    fn commit(self) -> usize {
        let (doomed, kept): (Vec<_>, Vec<_>) = self
            .mailbox
            .messages()
            .iter()
            .zip(&self.deleted)
            .partition(|(_, deleted)| **deleted);
        let doomed: Vec<Arc<Message>> = doomed
            .into_iter()
            .map(|(message, _)| Arc::clone(message))
            .collect();
        let left = kept.len();
        self.mailbox.commit(&doomed);
        left
    }
}
