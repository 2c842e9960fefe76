//! The AUTHORIZATION state machine driven the way `session::driver` drives it: a client byte stream
//! framed with `line_limit()`, logins answered at once (rejected or unavailable, as the input says),
//! STLS completed at once with the buffer and framer reset.
//!
//! Properties: credentials are never empty, never hold CR, LF or NUL, and are never taken on a plain
//! connection that requires TLS; STLS only when offered and not yet on; every reply is CRLF lines that
//! start `+OK`, `-ERR` or `+ `, or belong to a CAPA or AUTH listing that offers only what this transport
//! allows; `Login`, `StartTls` and `Close` end their batch (the driver acts on them at once); the
//! machine waits only while a login or handshake is outstanding; nothing follows `Close`; and it closes
//! at the failed-login bound.

use bytes::BytesMut;
use popgate::protocol::line::{Frame, LineFramer};
use popgate::session::state::{Action, Authorization, Credentials, Limits, Transport};

use super::has_line_break_or_nul;

const REJECTED: &[u8] = b"-ERR [AUTH] Authentication failed.\r\n";
const UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] Store unavailable, try again later\r\n";

/// Input layout: `[transport, limits, chunk, login outcomes (4), client stream...]`.
/// - transport bits: 0 TLS on, 1 STLS offered, 2 plaintext login allowed before TLS;
/// - limits: low nibble `max_bad_commands` (0..=15), bits 4-6 `max_failed_logins - 1` (1..=8);
/// - chunk: bytes per read (1..=255);
/// - login outcomes: bit n (little-endian, cycling) answers the n-th login: 1 rejected, 0 unavailable.
pub fn check(data: &[u8]) {
    let [transport, limits, chunk, o0, o1, o2, o3, stream @ ..] = data else {
        return;
    };
    let transport = Transport {
        tls: transport & 1 != 0,
        stls_offered: transport & 2 != 0,
        plaintext_before_tls: transport & 4 != 0,
    };
    let limits = Limits {
        max_bad_commands: u32::from(limits & 0x0f),
        max_failed_logins: 1 + u32::from((limits >> 4) & 0x07),
    };
    let mut session = Session::new(transport, limits, u32::from_le_bytes([*o0, *o1, *o2, *o3]));
    session.run(stream, usize::from(*chunk).max(1));
}

/// What the client is shown, checked line by line.
#[derive(Default)]
struct Transcript {
    /// Inside a multi-line listing (and which one).
    listing: Option<Listing>,
    /// Capabilities seen in the current CAPA listing.
    capa_user: bool,
    capa_stls: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Listing {
    Capa,
    AuthMechanisms,
}

struct Session {
    machine: Authorization,
    framer: LineFramer,
    buf: BytesMut,
    transcript: Transcript,
    tls: bool,
    stls_offered: bool,
    plaintext_before_tls: bool,
    limits: Limits,
    outcomes: u32,
    logins: u32,
    rejected: u32,
    closed: bool,
}

impl Session {
    fn new(transport: Transport, limits: Limits, outcomes: u32) -> Self {
        Self {
            machine: Authorization::new(transport, limits),
            framer: LineFramer::new(),
            buf: BytesMut::new(),
            transcript: Transcript::default(),
            tls: transport.tls,
            stls_offered: transport.stls_offered,
            plaintext_before_tls: transport.plaintext_before_tls,
            limits,
            outcomes,
            logins: 0,
            rejected: 0,
            closed: false,
        }
    }

    fn plaintext_ok(&self) -> bool {
        self.tls || self.plaintext_before_tls
    }

    fn stls_available(&self) -> bool {
        self.stls_offered && !self.tls
    }

    fn run(&mut self, stream: &[u8], chunk: usize) {
        let greeting = self.machine.greeting().to_vec();
        assert!(greeting.starts_with(b"+OK "));
        self.send(&greeting);
        assert!(self.transcript.listing.is_none());

        for piece in stream.chunks(chunk) {
            self.buf.extend_from_slice(piece);
            while !self.closed {
                assert!(
                    !self.machine.is_waiting(),
                    "waiting with nothing outstanding"
                );
                let limit = self.machine.line_limit();
                assert!(limit >= 255, "line limit {limit}");
                let actions = match self.framer.next_frame(&mut self.buf, limit) {
                    Some(Frame::Line(line)) => {
                        assert!(line.len() < limit);
                        self.machine.on_line(&line)
                    }
                    Some(Frame::TooLong) => self.machine.on_too_long(),
                    None => {
                        assert!(self.buf.len() < limit, "framer holds a whole limit");
                        break;
                    }
                };
                self.perform(actions);
            }
            if self.closed {
                break;
            }
        }

        if self.closed {
            // The driver stops feeding a closed machine; if it did not, nothing may come out.
            assert!(self.machine.is_closed() && self.machine.is_waiting());
            for line in [
                &b"CAPA"[..],
                b"USER a",
                b"PASS b",
                b"AUTH PLAIN AGEAYg==",
                b"STLS",
            ] {
                assert!(
                    self.machine.on_line(line).is_empty(),
                    "an action after Close"
                );
            }
            for line in self.buf[..].split(|&b| b == b'\n').take(16) {
                assert!(
                    self.machine.on_line(line).is_empty(),
                    "an action after Close"
                );
            }
        }
    }

    /// Carries out one batch of actions as the driver does.
    fn perform(&mut self, actions: Vec<Action>) {
        let last = actions.len().saturating_sub(1);
        let mut outstanding = None;
        for (i, action) in actions.into_iter().enumerate() {
            assert!(!self.closed, "an action after Close");
            match action {
                Action::Send(bytes) => self.send(&bytes),
                Action::StartTls => {
                    assert_eq!(i, last, "StartTls must end its batch");
                    assert!(self.stls_available(), "StartTls when STLS is not available");
                    outstanding = Some(Outstanding::Tls);
                }
                Action::Login(creds) => {
                    assert_eq!(i, last, "Login must end its batch");
                    self.check_credentials(&creds);
                    outstanding = Some(Outstanding::Login);
                }
                Action::Close => {
                    assert_eq!(i, last, "Close must end its batch");
                    assert!(self.machine.is_closed(), "Close without the machine closed");
                    self.closed = true;
                }
            }
        }
        assert!(
            self.transcript.listing.is_none(),
            "a listing left unterminated"
        );
        assert_eq!(
            self.machine.is_closed(),
            self.closed,
            "closed without Close"
        );

        match outstanding {
            None => {}
            Some(Outstanding::Tls) => {
                assert!(self.machine.is_waiting() && !self.machine.is_closed());
                // As the driver: nothing sent before the handshake is read after it.
                self.buf.clear();
                self.framer = LineFramer::new();
                self.machine.on_tls_established();
                self.tls = true;
            }
            Some(Outstanding::Login) => {
                assert!(self.machine.is_waiting() && !self.machine.is_closed());
                let rejected = self.outcomes >> (self.logins % 32) & 1 == 1;
                self.logins += 1;
                let answer = if rejected {
                    self.rejected += 1;
                    self.machine.on_login_rejected(REJECTED.to_vec())
                } else {
                    self.machine.on_login_unavailable(UNAVAILABLE.to_vec())
                };
                assert!(
                    answer
                        .iter()
                        .all(|a| matches!(a, Action::Send(_) | Action::Close)),
                    "a login answer may only send and close"
                );
                self.perform(answer);
                if self.rejected >= self.limits.max_failed_logins {
                    assert!(
                        self.closed,
                        "still open after {} failed logins",
                        self.rejected
                    );
                }
            }
        }
    }

    fn check_credentials(&self, creds: &Credentials) {
        assert!(
            self.plaintext_ok(),
            "credentials taken on a connection that requires TLS"
        );
        assert!(!creds.login.is_empty(), "empty login");
        assert!(
            !has_line_break_or_nul(creds.login.as_bytes()),
            "login {:?}",
            creds.login
        );
        let pw = creds.password.expose();
        assert!(!pw.is_empty(), "empty password");
        assert!(!has_line_break_or_nul(pw), "password with CR, LF or NUL");
        if let Some(z) = &creds.authzid {
            assert!(
                !z.is_empty() && !has_line_break_or_nul(z.as_bytes()),
                "authzid {z:?}"
            );
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        let Some(body) = bytes.strip_suffix(b"\r\n") else {
            panic!(
                "a reply not ending in CRLF: {:?}",
                String::from_utf8_lossy(bytes)
            );
        };
        for line in split_crlf(body) {
            assert!(
                !has_line_break_or_nul(line),
                "bare CR, LF or NUL in a reply line: {:?}",
                String::from_utf8_lossy(line)
            );
            match self.transcript.listing {
                Some(listing) => self.listing_line(listing, line),
                None => self.status_line(line),
            }
        }
    }

    fn status_line(&mut self, line: &[u8]) {
        assert!(
            line.starts_with(b"+OK") || line.starts_with(b"-ERR") || line.starts_with(b"+ "),
            "not a status line: {:?}",
            String::from_utf8_lossy(line)
        );
        match line {
            b"+OK Capability list follows" => {
                self.transcript.listing = Some(Listing::Capa);
                self.transcript.capa_user = false;
                self.transcript.capa_stls = false;
            }
            b"+OK Supported mechanisms follow" => {
                self.transcript.listing = Some(Listing::AuthMechanisms)
            }
            _ => {}
        }
    }

    fn listing_line(&mut self, listing: Listing, line: &[u8]) {
        if line == b"." {
            if listing == Listing::Capa {
                assert_eq!(self.transcript.capa_user, self.plaintext_ok(), "CAPA USER");
                assert_eq!(
                    self.transcript.capa_stls,
                    self.stls_available(),
                    "CAPA STLS"
                );
            }
            self.transcript.listing = None;
            return;
        }
        assert!(
            !line.is_empty() && !line.starts_with(b"."),
            "listing line {line:?}"
        );
        match listing {
            Listing::Capa => {
                let text = String::from_utf8_lossy(line);
                let mut words = text.split(' ');
                match words.next() {
                    Some("USER") => self.transcript.capa_user = true,
                    Some("STLS") => self.transcript.capa_stls = true,
                    Some("SASL") => {
                        assert!(self.plaintext_ok(), "SASL offered where TLS is required");
                    }
                    _ => {}
                }
            }
            Listing::AuthMechanisms => {
                assert!(
                    self.plaintext_ok(),
                    "mechanisms offered where TLS is required"
                );
            }
        }
    }
}

enum Outstanding {
    Tls,
    Login,
}

/// Splits on CRLF (not on a lone CR or LF, which the caller then finds inside a line).
fn split_crlf(bytes: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while let Some(i) = rest.windows(2).position(|w| w == b"\r\n") {
        out.push(&rest[..i]);
        rest = &rest[i + 2..];
    }
    out.push(rest);
    out
}
