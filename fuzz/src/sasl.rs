//! SASL codecs: base64 decodes canonically, and no credential that comes out holds CR, LF or NUL
//! (so nothing inside base64 can become a second command at a store).
//!
//! The input is used twice: as the base64 text a client sends, and as the decoded message itself
//! (encoded first), which reaches the field checks far more often than random base64 does.

use popgate::protocol::sasl::{self, SaslError};
use popgate::secret::Secret;

use super::has_line_break_or_nul;

/// Checks all three decoders on `data` as base64, then PLAIN and LOGIN on `data` as decoded bytes.
pub fn check(data: &[u8]) {
    if let Ok(raw) = sasl::decode_b64(data) {
        let text = data.trim_ascii();
        if text == b"=" {
            assert!(raw.is_empty());
        } else {
            assert_eq!(
                sasl::encode_b64(&raw).as_bytes(),
                text,
                "non-canonical base64"
            );
        }
    }
    if let Ok(p) = sasl::decode_plain(data) {
        plain_ok(&p);
    }
    if let Ok(f) = sasl::decode_login_field(data) {
        assert!(!f.is_empty() && !has_line_break_or_nul(&f));
    }

    let b64 = sasl::encode_b64(data);
    let plain = sasl::decode_plain(b64.as_bytes());
    assert_eq!(plain, plain_oracle(data), "PLAIN message {data:?}");
    if let Ok(p) = &plain {
        plain_ok(p);
        let again = sasl::encode_plain(p.authzid.as_deref(), &p.authcid, &p.password);
        assert_eq!(sasl::decode_plain(again.as_bytes()).as_ref(), Ok(p));
    }
    let field = sasl::decode_login_field(b64.as_bytes());
    match &field {
        Ok(f) => assert_eq!(f.as_slice(), data),
        Err(e) if data.is_empty() => assert_eq!(*e, SaslError::Malformed),
        Err(e) => {
            assert!(has_line_break_or_nul(data));
            assert_eq!(*e, SaslError::ControlCharacter);
        }
    }
}

fn plain_ok(p: &sasl::PlainCredentials) {
    assert!(!p.authcid.is_empty() && !has_line_break_or_nul(p.authcid.as_bytes()));
    let pw = p.password.expose();
    assert!(!pw.is_empty() && !has_line_break_or_nul(pw));
    if let Some(z) = &p.authzid {
        assert!(!z.is_empty() && *z != p.authcid && !has_line_break_or_nul(z.as_bytes()));
    }
}

/// What RFC 4616 and popgate's rules say a decoded PLAIN message means.
fn plain_oracle(raw: &[u8]) -> Result<sasl::PlainCredentials, SaslError> {
    let fields: Vec<&[u8]> = raw.split(|&b| b == 0).collect();
    let [authzid, authcid, password] = fields.as_slice() else {
        return Err(SaslError::Malformed);
    };
    if [authzid, authcid, password]
        .iter()
        .any(|f| f.contains(&b'\r') || f.contains(&b'\n'))
    {
        return Err(SaslError::ControlCharacter);
    }
    if authcid.is_empty() || password.is_empty() {
        return Err(SaslError::Malformed);
    }
    let authzid = std::str::from_utf8(authzid).map_err(|_| SaslError::Utf8)?;
    let authcid = std::str::from_utf8(authcid).map_err(|_| SaslError::Utf8)?;
    Ok(sasl::PlainCredentials {
        authzid: (!authzid.is_empty() && authzid != authcid).then(|| authzid.to_string()),
        authcid: authcid.to_string(),
        password: Secret::new(password.to_vec()),
    })
}
