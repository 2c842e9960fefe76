//! POP3 command lines (RFC 1939, 2449, 2595, 5034) turned into [`Command`]s.
//!
//! Pure parsing: bytes in, a value or a [`ParseError`] out. Whether a command is allowed in the
//! current state, and whether a message number exists, is the session's business, not this one's.

/// Longest command line accepted, CRLF included (RFC 2449 §4).
pub(crate) const COMMAND_LINE_LIMIT: usize = 255;

/// Longest SASL client response line accepted. RFC 5034 §4 exempts these from the 255-octet
/// command limit; this only bounds memory.
pub(crate) const SASL_RESPONSE_LIMIT: usize = 8 * 1024;

/// One client command. Arguments borrow from the line they were parsed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command<'a> {
    User(&'a str),
    /// Everything after "PASS ": RFC 1939 allows spaces in the password.
    Pass(&'a str),
    Apop {
        name: &'a str,
        digest: &'a str,
    },
    /// `AUTH` alone asks for the mechanism list (the RFC 1734 form many clients still send).
    Auth {
        mechanism: Option<&'a str>,
        initial_response: Option<&'a str>,
    },
    Capa,
    Stls,
    Quit,
    Stat,
    List(Option<MessageNumber>),
    Retr(MessageNumber),
    Dele(MessageNumber),
    Rset,
    Top {
        message: MessageNumber,
        lines: usize,
    },
    Uidl(Option<MessageNumber>),
    Noop,
}

/// A message number as the client wrote it, 1-based. Whether it names a message is checked by
/// the session, which knows the maildrop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct MessageNumber(pub(crate) usize);

/// Why a line is not a command; the `Display` text is what follows `-ERR `.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum ParseError {
    #[error("Unknown command")]
    Unknown,
    #[error("Command line is not valid UTF-8")]
    NotUtf8,
    #[error("Wrong arguments for this command")]
    Syntax,
    #[error("Invalid message number")]
    BadMessageNumber,
    #[error("Invalid line count")]
    BadLineCount,
}

/// The line without its CRLF (or a bare LF, which lenient clients send).
pub(crate) fn strip_line_ending(line: &[u8]) -> &[u8] {
    let line = line.strip_suffix(b"\n").unwrap_or(line);
    line.strip_suffix(b"\r").unwrap_or(line)
}

// === impl Command ===

impl<'a> Command<'a> {
    /// Parses one line, with or without its line ending. Keywords are case-insensitive; arguments
    /// are kept as written.
    pub(crate) fn parse(line: &'a [u8]) -> Result<Self, ParseError> {
        let line = std::str::from_utf8(strip_line_ending(line)).map_err(|_| ParseError::NotUtf8)?;
        let (keyword, rest) = match line.split_once(' ') {
            Some((keyword, rest)) => (keyword, Some(rest)),
            None => (line, None),
        };
        // Tolerate runs of spaces between arguments; RFC 1939 says one, some clients send more.
        let args: Vec<&str> = rest
            .unwrap_or_default()
            .split(' ')
            .filter(|arg| !arg.is_empty())
            .collect();

        let command = match keyword.to_ascii_uppercase().as_str() {
            "USER" => Command::User(exactly_one(&args)?),
            "PASS" => Command::Pass(rest.ok_or(ParseError::Syntax)?),
            "APOP" => match args[..] {
                [name, digest] => Command::Apop { name, digest },
                _ => return Err(ParseError::Syntax),
            },
            "AUTH" => match args[..] {
                [] => Command::Auth {
                    mechanism: None,
                    initial_response: None,
                },
                [mechanism] => Command::Auth {
                    mechanism: Some(mechanism),
                    initial_response: None,
                },
                [mechanism, initial_response] => Command::Auth {
                    mechanism: Some(mechanism),
                    initial_response: Some(initial_response),
                },
                _ => return Err(ParseError::Syntax),
            },
            "CAPA" => without_args(&args, Command::Capa)?,
            "STLS" => without_args(&args, Command::Stls)?,
            "QUIT" => without_args(&args, Command::Quit)?,
            "STAT" => without_args(&args, Command::Stat)?,
            "RSET" => without_args(&args, Command::Rset)?,
            "NOOP" => without_args(&args, Command::Noop)?,
            "LIST" => Command::List(optional_message_number(&args)?),
            "UIDL" => Command::Uidl(optional_message_number(&args)?),
            "RETR" => Command::Retr(message_number(exactly_one(&args)?)?),
            "DELE" => Command::Dele(message_number(exactly_one(&args)?)?),
            "TOP" => match args[..] {
                [message, lines] => Command::Top {
                    message: message_number(message)?,
                    lines: decimal(lines).ok_or(ParseError::BadLineCount)?,
                },
                _ => return Err(ParseError::Syntax),
            },
            _ => return Err(ParseError::Unknown),
        };
        Ok(command)
    }
}

fn without_args<'a>(args: &[&str], command: Command<'a>) -> Result<Command<'a>, ParseError> {
    if args.is_empty() {
        Ok(command)
    } else {
        Err(ParseError::Syntax)
    }
}

fn exactly_one<'a>(args: &[&'a str]) -> Result<&'a str, ParseError> {
    match args {
        [arg] => Ok(arg),
        _ => Err(ParseError::Syntax),
    }
}

fn optional_message_number(args: &[&str]) -> Result<Option<MessageNumber>, ParseError> {
    match args {
        [] => Ok(None),
        [arg] => message_number(arg).map(Some),
        _ => Err(ParseError::Syntax),
    }
}

fn message_number(arg: &str) -> Result<MessageNumber, ParseError> {
    decimal(arg)
        .map(MessageNumber)
        .ok_or(ParseError::BadMessageNumber)
}

/// Plain ASCII digits only: `usize::from_str` would also take a leading "+".
fn decimal(arg: &str) -> Option<usize> {
    if arg.is_empty() || !arg.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    arg.parse().ok()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn parse(line: &str) -> Result<Command<'_>, ParseError> {
        Command::parse(line.as_bytes())
    }

    #[test]
    fn keywords_are_case_insensitive() {
        assert_eq!(parse("stat\r\n"), Ok(Command::Stat));
        assert_eq!(parse("StAt"), Ok(Command::Stat));
        assert_eq!(parse("user Alice\r\n"), Ok(Command::User("Alice")));
    }

    #[test]
    fn pass_keeps_spaces() {
        assert_eq!(
            parse("PASS  two words \r\n"),
            Ok(Command::Pass(" two words "))
        );
        assert_eq!(parse("PASS \r\n"), Ok(Command::Pass("")));
        assert_eq!(parse("PASS\r\n"), Err(ParseError::Syntax));
    }

    #[test]
    fn message_numbers() {
        assert_eq!(parse("RETR 12"), Ok(Command::Retr(MessageNumber(12))));
        assert_eq!(parse("LIST"), Ok(Command::List(None)));
        assert_eq!(parse("UIDL 0"), Ok(Command::Uidl(Some(MessageNumber(0)))));
        assert_eq!(parse("RETR"), Err(ParseError::Syntax));
        assert_eq!(parse("RETR 1 2"), Err(ParseError::Syntax));
        assert_eq!(parse("RETR x"), Err(ParseError::BadMessageNumber));
        assert_eq!(parse("RETR +1"), Err(ParseError::BadMessageNumber));
        assert_eq!(parse("RETR -1"), Err(ParseError::BadMessageNumber));
        assert_eq!(
            parse("DELE 99999999999999999999999999"),
            Err(ParseError::BadMessageNumber)
        );
        assert_eq!(
            parse("TOP 1 10"),
            Ok(Command::Top {
                message: MessageNumber(1),
                lines: 10
            })
        );
        assert_eq!(parse("TOP 1 -1"), Err(ParseError::BadLineCount));
        assert_eq!(parse("TOP 1"), Err(ParseError::Syntax));
    }

    #[test]
    fn auth_forms() {
        assert_eq!(
            parse("AUTH"),
            Ok(Command::Auth {
                mechanism: None,
                initial_response: None
            })
        );
        assert_eq!(
            parse("auth plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: Some("plain"),
                initial_response: Some("AGEAYg==")
            })
        );
        assert_eq!(parse("AUTH a b c"), Err(ParseError::Syntax));
    }

    #[test]
    fn garbage() {
        assert_eq!(parse(""), Err(ParseError::Unknown));
        assert_eq!(parse("\r\n"), Err(ParseError::Unknown));
        assert_eq!(parse("XYZZY"), Err(ParseError::Unknown));
        assert_eq!(parse("NOOP extra"), Err(ParseError::Syntax));
        assert_eq!(
            Command::parse(b"USER \xff\xfe\r\n"),
            Err(ParseError::NotUtf8)
        );
    }
}
