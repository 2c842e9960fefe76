//! Store replies: `Status::parse`, `MultiLine` and `Capabilities::from_lines` never panic, and what
//! they report matches the bytes.

use popgate::protocol::reply::{Capabilities, MultiLine, Status};

/// Reads `data` as a status line, then as a dot-terminated body of LF-separated lines (CR stripped),
/// and the body as a CAPA answer.
pub fn check(data: &[u8]) {
    let first = data.split(|&b| b == b'\n').next().unwrap_or_default();
    let first = first.strip_suffix(b"\r").unwrap_or(first);
    status(first);

    let mut body = MultiLine::new();
    let mut pushed = 0;
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let end = body.push(line);
        assert_eq!(end, line == b".", "only a lone dot ends a body");
        if end {
            break;
        }
        pushed += 1;
        let kept = body.lines().last().expect("a pushed line is kept");
        let unstuffed = line.strip_prefix(b".").unwrap_or(line);
        assert_eq!(kept.as_slice(), unstuffed, "dot-stuffing undone once");
    }
    assert_eq!(body.lines().len(), pushed);

    let caps = Capabilities::from_lines(body.lines());
    let first_word = |l: &Vec<u8>| -> Option<String> {
        String::from_utf8_lossy(l)
            .split_ascii_whitespace()
            .next()
            .map(str::to_ascii_uppercase)
    };
    let words: Vec<Option<String>> = body.lines().iter().map(first_word).collect();
    assert_eq!(
        caps.stls,
        words.iter().any(|w| w.as_deref() == Some("STLS"))
    );
    assert_eq!(
        caps.user,
        words.iter().any(|w| w.as_deref() == Some("USER"))
    );
    for mech in &caps.sasl {
        assert!(!mech.is_empty() && *mech == mech.to_ascii_uppercase());
        assert!(!mech.contains(|c: char| c.is_ascii_whitespace()));
    }
    if !words.iter().any(|w| w.as_deref() == Some("SASL")) {
        assert!(caps.sasl.is_empty());
    }
}

fn status(line: &[u8]) {
    let Ok(status) = Status::parse(line) else {
        assert!(!line.starts_with(b"+OK ") && !line.starts_with(b"-ERR ") && line != b"+OK");
        return;
    };
    let _ = format!("{status:?}");
    match &status {
        Status::Ok => assert!(line.starts_with(b"+OK")),
        Status::Continue => {
            assert!(line == b"+" || line.starts_with(b"+ "));
            assert!(!status.is_temporary());
        }
        Status::Err { code } => {
            assert!(line.starts_with(b"-ERR"));
            if let Some(code) = code {
                assert!(!code.is_empty() && *code == code.to_ascii_uppercase());
                assert!(
                    code.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'/' || b == b'-')
                );
                // The code is the one written right after `-ERR [`.
                let written = line.get(6..6 + code.len()).unwrap_or_default();
                assert!(written.eq_ignore_ascii_case(code.as_bytes()));
                assert_eq!(line.get(6 + code.len()), Some(&b']'));
            }
        }
    }
}
