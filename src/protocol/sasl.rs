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

/// Decodes base64 where `=` alone stands for an empty message (RFC 5034 §4). Spaces and tabs around it
/// are tolerated; a CR, LF or NUL anywhere (a stray CR before the line's CRLF) is refused.
pub fn decode_b64(data: &[u8]) -> Result<Vec<u8>, SaslError> {
    if data.iter().any(|&b| matches!(b, 0 | b'\r' | b'\n')) {
        return Err(SaslError::ControlCharacter);
    }
    let data = data.trim_ascii();
    if data == b"=" {
        return Ok(Vec::new());
    }
    STANDARD.decode(data).map_err(|_| SaslError::Base64)
}

/// A client's SASL response as popgate relays it to a store (XOAUTH2, OAUTHBEARER, SCRAM): validated
/// and encoded anew by popgate, so only the token reaches the store, never the client's framing
/// (whitespace, a stray CR). `*` (the client cancels), an empty line (an empty continuation response) and
/// `=` (an empty initial response, RFC 5034 §4) keep their meaning.
pub fn relayable(line: &[u8]) -> Result<Vec<u8>, SaslError> {
    if line == b"*" {
        return Ok(line.to_vec());
    }
    let raw = decode_b64(line)?;
    if !raw.is_empty() {
        return Ok(encode_b64(&raw).into_bytes());
    }
    // Empty either way: `=` where the client wrote one, else an empty line.
    Ok(if line.trim_ascii() == b"=" {
        b"=".to_vec()
    } else {
        Vec::new()
    })
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

/// The client side of a relayed SASL exchange: shows the store's challenge line to the client and returns the
/// client's answer line (None when the client went away).
pub trait SaslRelay: Send {
    /// One round trip with the client.
    fn exchange(
        &mut self,
        challenge_line: Vec<u8>,
    ) -> impl std::future::Future<Output = Option<Vec<u8>>> + Send;
}

/// For logins that need no client round trip.
#[derive(Debug)]
pub struct NoRelay;

impl SaslRelay for NoRelay {
    async fn exchange(&mut self, _challenge_line: Vec<u8>) -> Option<Vec<u8>> {
        None
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn relayed_responses_are_re_encoded_and_stray_cr_is_refused() {
        let token = encode_b64(b"user=a@example.com\x01auth=Bearer t\x01\x01");
        assert_eq!(
            relayable(format!("{token}\t ").as_bytes()).unwrap(),
            token.as_bytes()
        );
        assert_eq!(
            relayable(format!("{token}\t\r").as_bytes()),
            Err(SaslError::ControlCharacter)
        );
        assert_eq!(relayable(b"*").unwrap(), b"*");
        assert_eq!(relayable(b"=").unwrap(), b"=");
        assert_eq!(relayable(b"").unwrap(), b"");
        assert_eq!(relayable(b"  ").unwrap(), b"");
        assert_eq!(relayable(b"not base64!"), Err(SaslError::Base64));
        assert_eq!(decode_b64(b"AAAA\r"), Err(SaslError::ControlCharacter));
    }

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

/// The routing facts of an OAuth SASL message (XOAUTH2 or OAUTHBEARER, RFC 7628): who it is for. The
/// token itself is relayed to the store unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OauthIdentity {
    /// The user the token is presented for.
    pub user: String,
}

/// Decodes an XOAUTH2 initial response: `user=NAME ^A auth=Bearer TOKEN ^A ^A`.
pub fn decode_xoauth2(b64: &[u8]) -> Result<OauthIdentity, SaslError> {
    let raw = decode_b64(b64)?;
    let mut user = None;
    let mut auth = false;
    for field in raw.split(|&b| b == 0x01).filter(|f| !f.is_empty()) {
        check_field(field)?;
        if let Some(u) = field.strip_prefix(b"user=") {
            user = Some(
                std::str::from_utf8(u)
                    .map_err(|_| SaslError::Utf8)?
                    .to_string(),
            );
        } else if field.starts_with(b"auth=") {
            auth = true;
        }
    }
    match (user, auth) {
        (Some(user), true) if !user.is_empty() => Ok(OauthIdentity { user }),
        _ => Err(SaslError::Malformed),
    }
}

/// Decodes an OAUTHBEARER initial response (RFC 7628): `n,a=USER,^Ahost=..^Aport=..^Aauth=Bearer TOKEN^A^A`.
/// Channel binding (`p=`) is refused: popgate terminates TLS, so a binding could never match.
pub fn decode_oauthbearer(b64: &[u8]) -> Result<OauthIdentity, SaslError> {
    let raw = decode_b64(b64)?;
    let mut parts = raw.splitn(2, |&b| b == 0x01);
    let gs2 = parts.next().unwrap_or_default();
    let rest = parts.next().ok_or(SaslError::Malformed)?;
    check_field(gs2)?;
    let gs2 = std::str::from_utf8(gs2).map_err(|_| SaslError::Utf8)?;
    let mut fields = gs2.split(',');
    match fields.next() {
        Some("n" | "y") => {}
        _ => return Err(SaslError::Malformed),
    }
    let user = fields
        .next()
        .and_then(|a| a.strip_prefix("a="))
        .map(decode_saslname)
        .transpose()?
        .ok_or(SaslError::Malformed)?;
    if !rest.split(|&b| b == 0x01).any(|f| f.starts_with(b"auth=")) || user.is_empty() {
        return Err(SaslError::Malformed);
    }
    for f in rest.split(|&b| b == 0x01) {
        check_field(f)?;
    }
    Ok(OauthIdentity { user })
}

/// Decodes a SCRAM client-first message (RFC 5802): `n,,n=USER,r=NONCE`. Returns the user name.
/// Channel binding (`p=`, the -PLUS variants) is refused for the same reason as above.
pub fn decode_scram_client_first(b64: &[u8]) -> Result<String, SaslError> {
    let raw = decode_b64(b64)?;
    check_field(&raw)?;
    let text = std::str::from_utf8(&raw).map_err(|_| SaslError::Utf8)?;
    let mut fields = text.splitn(3, ',');
    match fields.next() {
        Some("n" | "y") => {}
        _ => return Err(SaslError::Malformed),
    }
    let _authzid = fields.next().ok_or(SaslError::Malformed)?;
    let bare = fields.next().ok_or(SaslError::Malformed)?;
    let mut bare_fields = bare.split(',');
    let user = bare_fields
        .next()
        .and_then(|n| n.strip_prefix("n="))
        .map(decode_saslname)
        .transpose()?
        .ok_or(SaslError::Malformed)?;
    if user.is_empty() || !bare_fields.any(|f| f.starts_with("r=")) {
        return Err(SaslError::Malformed);
    }
    Ok(user)
}

/// SCRAM/GS2 `saslname`: `=2C` is a comma, `=3D` an equals sign; any other `=` is an error.
fn decode_saslname(s: &str) -> Result<String, SaslError> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(&rest[..i]);
        match rest.get(i..i + 3) {
            Some("=2C") => out.push(','),
            Some("=3D") => out.push('='),
            _ => return Err(SaslError::Malformed),
        }
        rest = &rest[i + 3..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Decodes a CRAM-MD5 response (RFC 2195): base64 of `USER SP HEXDIGEST`.
pub fn decode_cram_md5(b64: &[u8]) -> Result<(String, String), SaslError> {
    let raw = decode_b64(b64)?;
    check_field(&raw)?;
    let text = std::str::from_utf8(&raw).map_err(|_| SaslError::Utf8)?;
    let (user, digest) = text.rsplit_once(' ').ok_or(SaslError::Malformed)?;
    if user.is_empty() || digest.len() != 32 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(SaslError::Malformed);
    }
    Ok((user.to_string(), digest.to_ascii_lowercase()))
}

/// Lowercase hex of MD5(`salt` + `secret`): the APOP digest (RFC 1939 §7).
pub fn apop_digest(salt: &str, secret: &[u8]) -> String {
    use md5::{Digest, Md5};
    let mut h = Md5::new();
    h.update(salt.as_bytes());
    h.update(secret);
    hex(&h.finalize())
}

/// Lowercase hex of HMAC-MD5(`secret`, `challenge`): the CRAM-MD5 digest (RFC 2195).
pub fn cram_md5_digest(challenge: &str, secret: &[u8]) -> String {
    use hmac::{Hmac, KeyInit, Mac};
    // HMAC takes keys of any length, so this never fails; an empty digest would match nothing anyway.
    let Ok(mut mac) = <Hmac<md5::Md5> as KeyInit>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(challenge.as_bytes());
    hex(&mac.finalize().into_bytes())
}

/// Compares two hex digests in constant time, ignoring the case of `b` (clients may send upper-case hex).
pub fn digests_match(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    let b = b.to_ascii_lowercase();
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

#[cfg(test)]
mod mechanism_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn rfc_vectors_for_apop_and_cram_md5() {
        // RFC 1939 §7 and RFC 2195 §2.
        assert_eq!(
            apop_digest("<1896.697170952@dbc.mtview.ca.us>", b"tanstaaf"),
            "c4c9334bac560ecc979e58001b3e22fb"
        );
        assert_eq!(
            cram_md5_digest(
                "<1896.697170952@postoffice.reston.mci.net>",
                b"tanstaaftanstaaf"
            ),
            "b913a602c7eda7a495b4e6e7334d3890"
        );
        let (user, digest) =
            decode_cram_md5(encode_b64(b"tim b913a602c7eda7a495b4e6e7334d3890").as_bytes())
                .unwrap();
        assert_eq!(
            (user.as_str(), digest.as_str()),
            ("tim", "b913a602c7eda7a495b4e6e7334d3890")
        );
        assert!(digests_match(
            "b913a602c7eda7a495b4e6e7334d3890",
            "B913A602C7EDA7A495B4E6E7334D3890"
        ));
        assert!(!digests_match(
            "b913a602c7eda7a495b4e6e7334d3891",
            "b913a602c7eda7a495b4e6e7334d3890"
        ));
    }

    #[test]
    fn oauth_and_scram_identities() {
        let x = encode_b64(b"user=alice@example.com\x01auth=Bearer ya29.token\x01\x01");
        assert_eq!(
            decode_xoauth2(x.as_bytes()).unwrap().user,
            "alice@example.com"
        );
        let o = encode_b64(
            b"n,a=bob@example.com,\x01host=pop.example.com\x01port=995\x01auth=Bearer tok\x01\x01",
        );
        assert_eq!(
            decode_oauthbearer(o.as_bytes()).unwrap().user,
            "bob@example.com"
        );
        let bound = encode_b64(b"p=tls-unique,a=bob,\x01auth=Bearer tok\x01\x01");
        assert_eq!(
            decode_oauthbearer(bound.as_bytes()),
            Err(SaslError::Malformed)
        );
        let s = encode_b64(b"n,,n=carol=2Cx@example.com,r=fyko+d2lbbFgONRv9qkxdawL");
        assert_eq!(
            decode_scram_client_first(s.as_bytes()).unwrap(),
            "carol,x@example.com"
        );
        let plus = encode_b64(b"p=tls-server-end-point,,n=carol,r=abc");
        assert_eq!(
            decode_scram_client_first(plus.as_bytes()),
            Err(SaslError::Malformed)
        );
        let bad = encode_b64(b"n,,n=car=ol,r=abc");
        assert_eq!(
            decode_scram_client_first(bad.as_bytes()),
            Err(SaslError::Malformed)
        );
        let smuggled = encode_b64(b"user=a\r\nDELE 1\x01auth=Bearer t\x01\x01");
        assert_eq!(
            decode_xoauth2(smuggled.as_bytes()),
            Err(SaslError::ControlCharacter)
        );
    }
}
