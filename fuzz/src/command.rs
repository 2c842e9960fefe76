//! `Command::parse`: never panics, refuses control bytes, and what it accepts can go back on the wire.

use popgate::protocol::command::{Command, CommandError};

use super::has_line_break_or_nul;

/// Parses `data` as one command line.
pub fn check(data: &[u8]) {
    let parsed = Command::parse(data);
    if has_line_break_or_nul(data) {
        assert_eq!(parsed, Err(CommandError::ControlCharacter));
        return;
    }
    let Ok(cmd) = parsed else { return };

    // The verb is the first word, case-insensitively; the parse does not depend on its case.
    let verb_len = data.iter().position(|&b| b == b' ').unwrap_or(data.len());
    let verb = &data[..verb_len];
    assert!(
        (1..=8).contains(&verb.len())
            && verb[0].is_ascii_alphabetic()
            && verb.iter().all(u8::is_ascii_alphanumeric)
    );
    let mut upper = data.to_vec();
    upper[..verb_len].make_ascii_uppercase();
    assert_eq!(
        Command::parse(&upper),
        Ok(cmd.clone()),
        "verb case changed the parse"
    );
    assert!(
        cmd.verb()
            .eq_ignore_ascii_case(std::str::from_utf8(verb).unwrap_or_default())
    );

    match &cmd {
        Command::User(name) => {
            assert!(!name.is_empty() && !name.contains(' '), "USER {name:?}");
            assert!(!has_line_break_or_nul(name.as_bytes()));
        }
        Command::Pass(pw) => {
            assert!(!pw.is_empty() && !has_line_break_or_nul(pw));
            let shown = format!("{cmd:?}");
            assert!(pw.len() < 5 || !shown.as_bytes().windows(pw.len()).any(|w| w == pw));
        }
        Command::Apop { name, digest } => {
            for w in [name, digest] {
                assert!(!w.is_empty() && !w.contains(' '));
            }
        }
        Command::Auth { mechanism, initial } => {
            if let Some(m) = mechanism {
                assert!(!m.is_empty() && !m.contains(' ') && *m == m.to_ascii_uppercase());
            }
            if let Some(ir) = initial {
                assert!(mechanism.is_some() && !ir.is_empty() && !ir.contains(&b' '));
                let shown = format!("{cmd:?}");
                assert!(ir.len() < 5 || !shown.as_bytes().windows(ir.len()).any(|w| w == ir));
            }
        }
        Command::Other(v) => {
            assert!(!matches!(
                v.as_str(),
                "CAPA" | "STLS" | "USER" | "PASS" | "APOP" | "AUTH" | "QUIT" | "UTF8"
            ));
            assert_eq!(*v, v.to_ascii_uppercase());
        }
        Command::Capa | Command::Stls | Command::Quit | Command::Utf8 => {
            // No arguments: the rest of the line is at most spaces.
            assert!(data[verb_len..].iter().all(|&b| b == b' '));
        }
    }
}
