//! SASL codecs for the mechanisms popgate routes: PLAIN (RFC 4616) and LOGIN.
//!
//! Decoded credentials are refused when they contain CR, LF or NUL (other than PLAIN's separators), so
//! nothing smuggled inside base64 can reach a store as a second command.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use crate::secret::Secret;

/// A SASL message that cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    /// Not valid base64.
    #[error("invalid base64")]
    Base64,
    /// Wrong number of fields, or an empty identity.
    #[error("malformed SASL message")]
    Malformed,
    /// CR, LF or NUL inside a field.
    #[error("control characters in credentials")]
    ControlCharacter,
    /// Not valid UTF-8 where a name is expected.
    #[error("name is not UTF-8")]
    Utf8,
}

/// The fields of a PLAIN message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlainCredentials {
    /// Authorization identity, when the client asked to act as someone else.
    pub authzid: Option<String>,
    /// Authentication identity: the login name popgate routes on.
    pub authcid: String,
    /// The password.
    pub password: Secret,
}

/// Decodes base64 where `=` alone stands for an empty message (RFC 5034 §4).
pub fn decode_b64(data: &[u8]) -> Result<Vec<u8>, SaslError> {
    let data = data.trim_ascii();
    if data == b"=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(data).map_err(|_| SaslError::Base64)
}

/// Encodes bytes as base64.
pub fn encode_b64(data: &[u8]) -> String {
    STANDARD.encode(data)
}

/// Decodes a base64 PLAIN message: `authzid NUL authcid NUL password`.
pub fn decode_plain(b64: &[u8]) -> Result<PlainCredentials, SaslError> {
    let raw = decode_b64(b64)?;
    let mut parts = raw.split(|&b| b == 0);
    let (Some(authzid), Some(authcid), Some(password), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(SaslError::Malformed);
    };
    for field in [authzid, authcid, password] {
        check_field(field)?;
    }
    if authcid.is_empty() || password.is_empty() {
        return Err(SaslError::Malformed);
    }
    let authzid = std::str::from_utf8(authzid).map_err(|_| SaslError::Utf8)?;
    let authcid = std::str::from_utf8(authcid).map_err(|_| SaslError::Utf8)?;
    Ok(PlainCredentials {
        authzid: (!authzid.is_empty() && authzid != authcid).then(|| authzid.to_string()),
        authcid: authcid.to_string(),
        password: Secret::new(password.to_vec()),
    })
}

/// Encodes a PLAIN message.
pub fn encode_plain(authzid: Option<&str>, authcid: &str, password: &Secret) -> String {
    let mut raw = Vec::with_capacity(authcid.len() * 2 + password.expose().len() + 2);
    raw.extend_from_slice(authzid.unwrap_or_default().as_bytes());
    raw.push(0);
    raw.extend_from_slice(authcid.as_bytes());
    raw.push(0);
    raw.extend_from_slice(password.expose());
    encode_b64(&raw)
}

/// Decodes one base64 LOGIN field (the user name or the password).
pub fn decode_login_field(b64: &[u8]) -> Result<Vec<u8>, SaslError> {
    let raw = decode_b64(b64)?;
    check_field(&raw)?;
    if raw.is_empty() {
        return Err(SaslError::Malformed);
    }
    Ok(raw)
}

fn check_field(field: &[u8]) -> Result<(), SaslError> {
    if field.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
        Err(SaslError::ControlCharacter)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn plain_round_trip() {
        let pw = Secret::new(b"s3cret word".to_vec());
        let msg = encode_plain(None, "alice@example.com", &pw);
        let got = decode_plain(msg.as_bytes()).unwrap();
        assert_eq!(got.authcid, "alice@example.com");
        assert_eq!(got.authzid, None);
        assert_eq!(got.password.expose(), b"s3cret word");
    }

    #[test]
    fn plain_refuses_smuggled_lines() {
        let evil = encode_b64(b"\0alice\0pw\r\nDELE 1");
        assert_eq!(
            decode_plain(evil.as_bytes()),
            Err(SaslError::ControlCharacter)
        );
        let evil = encode_b64(b"\0ali\rce\0pw");
        assert_eq!(
            decode_plain(evil.as_bytes()),
            Err(SaslError::ControlCharacter)
        );
        assert_eq!(
            decode_plain(encode_b64(b"\0alice").as_bytes()),
            Err(SaslError::Malformed)
        );
        assert_eq!(
            decode_plain(encode_b64(b"a\0b\0c\0d").as_bytes()),
            Err(SaslError::Malformed)
        );
        assert_eq!(
            decode_plain(encode_b64(b"\0\0pw").as_bytes()),
            Err(SaslError::Malformed)
        );
        assert_eq!(decode_plain(b"!!!"), Err(SaslError::Base64));
        assert_eq!(decode_plain(b"="), Err(SaslError::Malformed));
    }

    #[test]
    fn login_fields() {
        assert_eq!(decode_login_field(b"YWxpY2U=").unwrap(), b"alice");
        assert_eq!(
            decode_login_field(encode_b64(b"a\nb").as_bytes()),
            Err(SaslError::ControlCharacter)
        );
        assert_eq!(decode_login_field(b"="), Err(SaslError::Malformed));
    }
}
