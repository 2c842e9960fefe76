//! Client commands in the AUTHORIZATION state (RFC 1939, 2449, 2595, 5034).
//!
//! Only the commands popgate answers itself are modelled; every other verb is kept as
//! [`Command::Other`] so the session can refuse it by name.

use std::fmt;

/// A parsed client command line (without CRLF).
#[derive(Clone, PartialEq, Eq)]
pub enum Command {
    /// `CAPA`
    Capa,
    /// `STLS`
    Stls,
    /// `USER name`
    User(String),
    /// `PASS secret` — the whole rest of the line, spaces included (RFC 1939 allows them).
    Pass(Vec<u8>),
    /// `APOP name digest`
    Apop {
        /// Login name.
        name: String,
        /// Hex MD5 digest.
        digest: String,
    },
    /// `AUTH [mechanism [initial-response]]`
    Auth {
        /// Upper-cased mechanism; `None` for bare `AUTH` (list mechanisms).
        mechanism: Option<String>,
        /// Base64 initial response (RFC 5034), `=` meaning empty.
        initial: Option<Vec<u8>>,
    },
    /// `QUIT`
    Quit,
    /// `UTF8` (RFC 6856): the client will use UTF-8 in login names and accepts it in messages.
    Utf8,
    /// Any other verb, upper-cased (`NOOP`, `STAT`, `XYZ`...).
    Other(String),
}

/// Why a line is not a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CommandError {
    /// Empty line or a verb that is not 1-8 ASCII letters and digits starting with a letter.
    #[error("malformed command")]
    Malformed,
    /// A command that needs an argument lacks it, or has the wrong number.
    #[error("missing or extra arguments")]
    Arguments,
    /// A NUL, or a CR inside the line.
    #[error("control characters in command")]
    ControlCharacter,
}

impl Command {
    /// Parses one line (CRLF already removed).
    pub fn parse(line: &[u8]) -> Result<Self, CommandError> {
        if line.iter().any(|&b| b == 0 || b == b'\r' || b == b'\n') {
            return Err(CommandError::ControlCharacter);
        }
        let (verb, rest) = match line.iter().position(|&b| b == b' ') {
            Some(i) => (&line[..i], Some(&line[i + 1..])),
            None => (line, None),
        };
        // Letters and digits (RFC 6856's `UTF8` has one), starting with a letter.
        if verb.is_empty()
            || verb.len() > 8
            || !verb[0].is_ascii_alphabetic()
            || !verb.iter().all(u8::is_ascii_alphanumeric)
        {
            return Err(CommandError::Malformed);
        }
        let verb = String::from_utf8_lossy(verb).to_ascii_uppercase();
        let words = |rest: Option<&[u8]>| -> Vec<String> {
            rest.map(|r| {
                r.split(|&b| b == b' ')
                    .filter(|w| !w.is_empty())
                    .map(|w| String::from_utf8_lossy(w).into_owned())
                    .collect()
            })
            .unwrap_or_default()
        };
        Ok(match verb.as_str() {
            "CAPA" => no_args(rest, Command::Capa)?,
            "STLS" => no_args(rest, Command::Stls)?,
            "QUIT" => no_args(rest, Command::Quit)?,
            "UTF8" => no_args(rest, Command::Utf8)?,
            "USER" => {
                let arg = rest.ok_or(CommandError::Arguments)?;
                let name = std::str::from_utf8(arg)
                    .map_err(|_| CommandError::Malformed)?
                    .trim();
                if name.is_empty() || name.contains(' ') {
                    return Err(CommandError::Arguments);
                }
                Command::User(name.to_string())
            }
            "PASS" => match rest {
                Some(pw) if !pw.is_empty() => Command::Pass(pw.to_vec()),
                _ => return Err(CommandError::Arguments),
            },
            "APOP" => {
                // The name is routed on: bytes that are not UTF-8 are refused, never replaced.
                if rest.is_some_and(|r| std::str::from_utf8(r).is_err()) {
                    return Err(CommandError::Malformed);
                }
                let w = words(rest);
                match w.as_slice() {
                    [name, digest] => Command::Apop {
                        name: name.clone(),
                        digest: digest.clone(),
                    },
                    _ => return Err(CommandError::Arguments),
                }
            }
            "AUTH" => {
                let w = words(rest);
                match w.as_slice() {
                    [] => Command::Auth {
                        mechanism: None,
                        initial: None,
                    },
                    [mech] => Command::Auth {
                        mechanism: Some(mech.to_ascii_uppercase()),
                        initial: None,
                    },
                    [mech, ir] => Command::Auth {
                        mechanism: Some(mech.to_ascii_uppercase()),
                        initial: Some(ir.as_bytes().to_vec()),
                    },
                    _ => return Err(CommandError::Arguments),
                }
            }
            _ => Command::Other(verb),
        })
    }

    /// The verb, for logs and counters (never the arguments: they can hold secrets).
    pub fn verb(&self) -> &str {
        match self {
            Command::Capa => "CAPA",
            Command::Stls => "STLS",
            Command::User(_) => "USER",
            Command::Pass(_) => "PASS",
            Command::Apop { .. } => "APOP",
            Command::Auth { .. } => "AUTH",
            Command::Quit => "QUIT",
            Command::Utf8 => "UTF8",
            Command::Other(v) => v,
        }
    }
}

fn no_args(rest: Option<&[u8]>, cmd: Command) -> Result<Command, CommandError> {
    match rest {
        None => Ok(cmd),
        Some(r) if r.iter().all(|&b| b == b' ') => Ok(cmd),
        Some(_) => Err(CommandError::Arguments),
    }
}

// Arguments may hold passwords and tokens: Debug shows the verb only.
impl fmt::Debug for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::User(name) => write!(f, "USER {name}"),
            other => write!(f, "{}", other.verb()),
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn parses_authorization_commands() {
        assert_eq!(Command::parse(b"capa").unwrap(), Command::Capa);
        assert_eq!(Command::parse(b"STLS").unwrap(), Command::Stls);
        assert_eq!(
            Command::parse(b"USER alice@example.com").unwrap(),
            Command::User("alice@example.com".into())
        );
        assert_eq!(
            Command::parse(b"PASS two words").unwrap(),
            Command::Pass(b"two words".to_vec())
        );
        assert_eq!(
            Command::parse(b"AUTH").unwrap(),
            Command::Auth {
                mechanism: None,
                initial: None
            }
        );
        assert_eq!(
            Command::parse(b"auth plain AGEAYg==").unwrap(),
            Command::Auth {
                mechanism: Some("PLAIN".into()),
                initial: Some(b"AGEAYg==".to_vec())
            }
        );
        assert_eq!(
            Command::parse(b"APOP mrose c4c9334bac560ecc979e58001b3e22fb").unwrap(),
            Command::Apop {
                name: "mrose".into(),
                digest: "c4c9334bac560ecc979e58001b3e22fb".into()
            }
        );
        assert_eq!(
            Command::parse(b"noop").unwrap(),
            Command::Other("NOOP".into())
        );
        assert_eq!(Command::parse(b"utf8").unwrap(), Command::Utf8);
        assert_eq!(
            Command::parse("USER jörg@bücher.example".as_bytes()).unwrap(),
            Command::User("jörg@bücher.example".into())
        );
        assert_eq!(
            Command::parse("APOP jörg c4c9334bac560ecc979e58001b3e22fb".as_bytes()).unwrap(),
            Command::Apop {
                name: "jörg".into(),
                digest: "c4c9334bac560ecc979e58001b3e22fb".into()
            }
        );
    }

    #[test]
    fn refuses_bad_lines() {
        assert_eq!(Command::parse(b""), Err(CommandError::Malformed));
        assert_eq!(Command::parse(b" USER"), Err(CommandError::Malformed));
        assert_eq!(Command::parse(b"U$ER x"), Err(CommandError::Malformed));
        // Digits are allowed after the first letter (UTF8); an unknown verb is Other, refused by name.
        assert_eq!(
            Command::parse(b"US3R x").unwrap(),
            Command::Other("US3R".into())
        );
        assert_eq!(Command::parse(b"USER"), Err(CommandError::Arguments));
        assert_eq!(Command::parse(b"PASS"), Err(CommandError::Arguments));
        assert_eq!(Command::parse(b"CAPA x"), Err(CommandError::Arguments));
        assert_eq!(
            Command::parse(b"PASS a\0b"),
            Err(CommandError::ControlCharacter)
        );
        assert_eq!(
            Command::parse(b"PASS a\rb"),
            Err(CommandError::ControlCharacter)
        );
        assert_eq!(
            Command::parse(b"USER \xff\xfe"),
            Err(CommandError::Malformed)
        );
        assert_eq!(
            Command::parse(b"APOP j\xf6rg c4c9334bac560ecc979e58001b3e22fb"),
            Err(CommandError::Malformed)
        );
        assert_eq!(Command::parse(b"UTF8 USER"), Err(CommandError::Arguments));
        assert_eq!(Command::parse(b"8BIT"), Err(CommandError::Malformed));
    }

    #[test]
    fn debug_never_shows_secrets() {
        let shown = format!("{:?}", Command::parse(b"PASS hunter2").unwrap());
        assert!(!shown.contains("hunter2"));
        let shown = format!(
            "{:?}",
            Command::parse(b"AUTH PLAIN AGFsaWNlAGh1bnRlcjI=").unwrap()
        );
        assert!(!shown.contains("AGFsaWNl"));
    }
}
