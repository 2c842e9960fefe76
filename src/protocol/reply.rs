//! Store replies: status lines (`+OK`, `-ERR [CODE] text`, `+ challenge`) and dot-terminated
//! multi-line bodies such as CAPA.

use std::fmt;

/// The kind of a store's status line.
#[derive(Clone, PartialEq, Eq)]
pub enum Status {
    /// `+OK ...`
    Ok,
    /// `-ERR ...`, with the RFC 2449 response code when present (`AUTH`, `SYS/TEMP`, `IN-USE`...).
    Err {
        /// The code inside the leading brackets, upper-cased.
        code: Option<String>,
    },
    /// `+ base64` SASL continuation (RFC 5034).
    Continue,
}

/// A status line that is none of the above.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("not a POP3 status line")]
pub struct NotAStatus;

impl Status {
    /// Classifies one line (CRLF removed).
    pub fn parse(line: &[u8]) -> Result<Self, NotAStatus> {
        if line.starts_with(b"+OK") && matches!(line.get(3), None | Some(b' ')) {
            return Ok(Status::Ok);
        }
        if line.starts_with(b"-ERR") && matches!(line.get(4), None | Some(b' ')) {
            let rest = line.get(5..).unwrap_or_default();
            let code = rest.strip_prefix(b"[").and_then(|r| {
                let end = r.iter().position(|&b| b == b']')?;
                let code = std::str::from_utf8(&r[..end]).ok()?;
                let valid = !code.is_empty()
                    && code
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'-');
                valid.then(|| code.to_ascii_uppercase())
            });
            return Ok(Status::Err { code });
        }
        if line == b"+" || line.starts_with(b"+ ") {
            return Ok(Status::Continue);
        }
        Err(NotAStatus)
    }

    /// True for `-ERR [SYS/TEMP]` and other codes that say "try again later".
    pub fn is_temporary(&self) -> bool {
        matches!(self, Status::Err { code: Some(c) } if c == "SYS/TEMP" || c == "IN-USE" || c == "LOGIN-DELAY")
    }
}

impl fmt::Debug for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Status::Ok => f.write_str("+OK"),
            Status::Err { code: Some(c) } => write!(f, "-ERR [{c}]"),
            Status::Err { code: None } => f.write_str("-ERR"),
            Status::Continue => f.write_str("+"),
        }
    }
}

/// Collects the lines of a dot-terminated multi-line body, undoing dot-stuffing (RFC 1939 §3).
#[derive(Debug, Default, Clone)]
pub struct MultiLine {
    lines: Vec<Vec<u8>>,
}

impl MultiLine {
    /// An empty body.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds one line; returns true when it was the terminating `.`.
    pub fn push(&mut self, line: &[u8]) -> bool {
        if line == b"." {
            return true;
        }
        let line = line.strip_prefix(b".").unwrap_or(line);
        self.lines.push(line.to_vec());
        false
    }

    /// The body's lines.
    pub fn lines(&self) -> &[Vec<u8>] {
        &self.lines
    }
}

/// Capabilities a store announced in its CAPA answer (RFC 2449).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// SASL mechanisms, upper-cased.
    pub sasl: Vec<String>,
    /// STLS offered.
    pub stls: bool,
    /// USER offered.
    pub user: bool,
    /// UTF8 (RFC 6856) offered.
    pub utf8: bool,
    /// PIPELINING (RFC 2449) offered: commands may be sent without waiting for each reply.
    pub pipelining: bool,
}

impl Capabilities {
    /// Reads the lines of a CAPA body.
    pub fn from_lines(lines: &[Vec<u8>]) -> Self {
        let mut caps = Self::default();
        for line in lines {
            let text = String::from_utf8_lossy(line);
            let mut words = text.split_ascii_whitespace();
            match words.next().map(str::to_ascii_uppercase).as_deref() {
                Some("SASL") => caps.sasl = words.map(str::to_ascii_uppercase).collect(),
                Some("STLS") => caps.stls = true,
                Some("USER") => caps.user = true,
                Some("UTF8") => caps.utf8 = true,
                Some("PIPELINING") => caps.pipelining = true,
                _ => {}
            }
        }
        caps
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn status_lines() {
        assert_eq!(Status::parse(b"+OK").unwrap(), Status::Ok);
        assert_eq!(Status::parse(b"+OK Dovecot ready.").unwrap(), Status::Ok);
        assert_eq!(
            Status::parse(b"-ERR [AUTH] Authentication failed.").unwrap(),
            Status::Err {
                code: Some("AUTH".into())
            }
        );
        assert_eq!(
            Status::parse(b"-ERR [sys/temp] later").unwrap(),
            Status::Err {
                code: Some("SYS/TEMP".into())
            }
        );
        assert_eq!(
            Status::parse(b"-ERR no code").unwrap(),
            Status::Err { code: None }
        );
        assert_eq!(
            Status::parse(b"-ERR [unterminated").unwrap(),
            Status::Err { code: None }
        );
        assert_eq!(Status::parse(b"+ ").unwrap(), Status::Continue);
        assert_eq!(Status::parse(b"+OKAY"), Err(NotAStatus));
        assert_eq!(Status::parse(b"* OK imap"), Err(NotAStatus));
        assert_eq!(Status::parse(b""), Err(NotAStatus));
        assert!(
            Status::parse(b"-ERR [IN-USE] locked")
                .unwrap()
                .is_temporary()
        );
        assert!(!Status::parse(b"-ERR [AUTH] no").unwrap().is_temporary());
    }

    #[test]
    fn capa_body() {
        let mut body = MultiLine::new();
        for l in [
            &b"CAPA"[..],
            b"TOP",
            b"SASL plain login",
            b"STLS",
            b"..dotted",
        ] {
            assert!(!body.push(l));
        }
        assert!(body.push(b"."));
        assert_eq!(body.lines()[4], b".dotted");
        let caps = Capabilities::from_lines(body.lines());
        assert_eq!(caps.sasl, vec!["PLAIN".to_string(), "LOGIN".to_string()]);
        assert!(caps.stls);
        assert!(!caps.user);
    }
}
