//! The auth_http wire format: the request head popgate sends, the response head it reads, the service
//! URL, and what may go in a header. No I/O.

use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use super::{
    AuthAnswer, AuthHttpError, AuthRequest, DEFAULT_REFUSAL, Endpoint, MAX_AUTH_WAIT,
    MAX_MESSAGE_LEN, MAX_RESPONSE_HEADERS, Reply,
};
use crate::secret::Secret;

// === wire format ===

/// The request head, byte for byte as nginx builds it (plus `Auth-Salt`'s CRLF, which nginx takes from
/// the salt itself).
pub(super) fn encode_request(
    endpoint: &Endpoint,
    extra_headers: &[(String, String)],
    req: &AuthRequest<'_>,
) -> Result<Vec<u8>, AuthHttpError> {
    let is_token = |s: &str| !s.is_empty() && s.bytes().all(is_tchar);
    if !is_token(req.method) {
        return Err(AuthHttpError::BadRequest("Auth-Method"));
    }
    if !is_token(req.protocol) {
        return Err(AuthHttpError::BadRequest("Auth-Protocol"));
    }
    let salt = match req.salt.map(trim_crlf) {
        Some(salt) if req.method != "plain" && !salt.is_empty() => {
            if !salt.bytes().all(is_visible) {
                return Err(AuthHttpError::BadRequest("Auth-Salt"));
            }
            Some(salt)
        }
        _ => None,
    };
    let client_host = req
        .client_host
        .filter(|h| !h.is_empty() && h.bytes().all(is_visible));

    let mut out = Vec::with_capacity(256 + req.user.len() * 3 + req.pass.len() * 3);
    out.extend_from_slice(format!("GET {} HTTP/1.0\r\n", endpoint.path).as_bytes());
    let mut header = |name: &str, value: &[u8]| {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    };
    header("Host", endpoint.host_header.as_bytes());
    header("Auth-Method", req.method.as_bytes());
    header("Auth-User", &escape(req.user.as_bytes()));
    header("Auth-Pass", &escape(req.pass));
    if let Some(salt) = salt {
        header("Auth-Salt", salt.as_bytes());
    }
    header("Auth-Protocol", req.protocol.as_bytes());
    header("Auth-Login-Attempt", req.attempt.to_string().as_bytes());
    let client_ip = req.client_ip.to_canonical().to_string();
    header("Client-IP", client_ip.as_bytes());
    if let Some(host) = client_host {
        header("Client-Host", host.as_bytes());
    }
    for (name, value) in extra_headers {
        header(name, value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
    Ok(out)
}

/// nginx's `NGX_ESCAPE_MAIL_AUTH`: `%XX` for control bytes, space and `%`; we add DEL, which no HTTP
/// header may carry. Other bytes, UTF-8 included, go as they are.
pub(super) fn escape(raw: &[u8]) -> Vec<u8> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = Vec::with_capacity(raw.len());
    for &b in raw {
        if b <= b' ' || b == b'%' || b == 0x7f {
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 0xf)]]);
        } else {
            out.push(b);
        }
    }
    out
}

/// The answer headers of one response, trimmed.
#[derive(Default)]
pub(super) struct AnswerFields<'h> {
    status: Option<&'h [u8]>,
    server: Option<&'h [u8]>,
    port: Option<&'h [u8]>,
    user: Option<&'h [u8]>,
    pass: Option<&'h [u8]>,
    wait: Option<&'h [u8]>,
}

/// The head with control bytes in the `Auth-Status` line turned into spaces. httparse refuses a header
/// value with a control byte, and a refusal text carrying one would then be a broken answer (a temporary
/// failure for the client) rather than the refusal it is; its text is cut to printable ASCII anyway.
pub(super) fn without_controls_in_status(head: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let is_control = |b: u8| (b < b' ' && b != b'\t') || b == 0x7f;
    let mut out: Option<Vec<u8>> = None;
    let mut start = 0;
    for line in head.split_inclusive(|&b| b == b'\n') {
        let end = start + line.len();
        let body = line
            .strip_suffix(b"\n")
            .map_or(line, |l| l.strip_suffix(b"\r").unwrap_or(l));
        if body.len() >= 12
            && body[..12].eq_ignore_ascii_case(b"auth-status:")
            && body.iter().any(|&b| is_control(b))
        {
            let copy = out.get_or_insert_with(|| head.to_vec());
            for b in &mut copy[start..start + body.len()] {
                if is_control(*b) {
                    *b = b' ';
                }
            }
        }
        start = end;
    }
    match out {
        Some(v) => std::borrow::Cow::Owned(v),
        None => std::borrow::Cow::Borrowed(head),
    }
}

/// `Ok(None)` while the head is incomplete.
pub(super) fn parse_response(head: &[u8]) -> Result<Option<Reply>, String> {
    let head = &*without_controls_in_status(head);
    let mut headers = [httparse::EMPTY_HEADER; MAX_RESPONSE_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    match response.parse(head) {
        Ok(httparse::Status::Partial) => return Ok(None),
        Ok(httparse::Status::Complete(_)) => {}
        Err(e) => return Err(format!("not an HTTP response head: {e}")),
    }

    let mut fields = AnswerFields::default();
    for h in response.headers.iter() {
        let slot = match h.name.to_ascii_lowercase().as_str() {
            "auth-status" => &mut fields.status,
            "auth-server" => &mut fields.server,
            "auth-port" => &mut fields.port,
            "auth-user" => &mut fields.user,
            "auth-pass" => &mut fields.pass,
            "auth-wait" => &mut fields.wait,
            _ => continue,
        };
        if slot.replace(h.value.trim_ascii()).is_some() {
            return Err(format!("{} appears twice", h.name));
        }
    }

    // nginx ignores an Auth-Wait that is not a number, and so do we.
    let wait = fields
        .wait
        .and_then(|w| std::str::from_utf8(w).ok())
        .filter(|w| !w.is_empty() && w.bytes().all(|b| b.is_ascii_digit()))
        .map(|w| w.parse::<u64>().map_or(MAX_AUTH_WAIT, Duration::from_secs))
        .map(|w| w.min(MAX_AUTH_WAIT));

    let status = fields.status.ok_or("no Auth-Status header")?;
    match status {
        b"OK" => {}
        b"WAIT" => return Ok(Some(Reply::Wait(wait.unwrap_or(Duration::ZERO)))),
        message => {
            return Ok(Some(Reply::Answer(AuthAnswer::Refused {
                message: sanitise(message),
                wait: wait.filter(|w| !w.is_zero()),
            })));
        }
    }

    let server = fields.server.ok_or("Auth-Status: OK without Auth-Server")?;
    let server =
        parse_server(server).ok_or("Auth-Server is neither an IP address nor a host name")?;
    let port = fields
        .port
        .ok_or("Auth-Status: OK without Auth-Port")
        .map(parse_port)?
        .ok_or("Auth-Port is not a port number")?;
    let user = match fields.user {
        None => None,
        Some(b"") => return Err("empty Auth-User".into()),
        Some(user) => Some(
            String::from_utf8(user.to_vec()).map_err(|_| "Auth-User is not UTF-8".to_string())?,
        ),
    };
    let pass = fields.pass.map(|p| Secret::new(p.to_vec()));
    Ok(Some(Reply::Answer(AuthAnswer::Ok {
        server,
        port,
        user,
        pass,
    })))
}

/// An IP address (IPv6 with or without brackets) or a DNS host name.
pub(super) fn parse_server(raw: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(raw).ok()?;
    let bare = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .unwrap_or(text);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    is_host_name(text).then(|| text.to_owned())
}

pub(super) fn parse_port(raw: &[u8]) -> Option<u16> {
    if raw.is_empty() || raw.len() > 5 || !raw.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(raw)
        .ok()?
        .parse::<u16>()
        .ok()
        .filter(|p| *p != 0)
}

/// Printable ASCII only, at most [`MAX_MESSAGE_LEN`] characters; anything else becomes `?`.
pub(super) fn sanitise(raw: &[u8]) -> String {
    let text: String = raw
        .iter()
        .take(MAX_MESSAGE_LEN)
        .map(|&b| if is_visible(b) { char::from(b) } else { '?' })
        .collect();
    let text = text.trim();
    if text.is_empty() {
        DEFAULT_REFUSAL.to_owned()
    } else {
        text.to_owned()
    }
}

/// Why an auth_http `url` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("url must start with http:// or https://")]
    NoScheme,
    #[error("url scheme {0:?} is not supported: use http:// or https://")]
    Scheme(String),
    #[error("url path must be printable ASCII without spaces (percent-encode the rest)")]
    Path,
    #[error("url must not carry user info")]
    UserInfo,
    #[error("url has an unclosed [")]
    UnclosedBracket,
    #[error("url host [{0}] is not an IPv6 address")]
    BadIpv6(String),
    #[error("url has junk after ]")]
    AfterBracket,
    #[error("url has no host")]
    NoHost,
    #[error("url host {0:?} is not a host name")]
    BadHost(String),
    #[error("url port {0:?} is not a port number")]
    BadPort(String),
}

pub(super) fn parse_url(url: &str) -> Result<Endpoint, UrlError> {
    let scheme_end = url.find("://").ok_or(UrlError::NoScheme)?;
    let scheme = &url[..scheme_end];
    let tls = if scheme.eq_ignore_ascii_case("https") {
        true
    } else if scheme.eq_ignore_ascii_case("http") {
        false
    } else {
        return Err(UrlError::Scheme(scheme.to_owned()));
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, target) = rest.split_at(authority_end);
    let target = target.split('#').next().unwrap_or("");
    let path = match target {
        "" => "/".to_owned(),
        t if t.starts_with('?') => format!("/{t}"),
        t => t.to_owned(),
    };
    if !path.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(UrlError::Path);
    }
    if authority.contains('@') {
        return Err(UrlError::UserInfo);
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (ip, after) = v6.split_once(']').ok_or(UrlError::UnclosedBracket)?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| UrlError::BadIpv6(ip.to_owned()))?;
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or(UrlError::AfterBracket)?),
        };
        (ip, port)
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    if host.is_empty() {
        return Err(UrlError::NoHost);
    }
    if !authority.starts_with('[') && host.parse::<IpAddr>().is_err() && !is_host_name(host) {
        return Err(UrlError::BadHost(host.to_owned()));
    }
    let port = match port {
        None if tls => 443,
        None => 80,
        Some(p) => parse_port(p.as_bytes()).ok_or_else(|| UrlError::BadPort(p.to_owned()))?,
    };
    let host_header = if authority.starts_with('[') {
        format!("[{host}]")
    } else {
        host.to_owned()
    };
    Ok(Endpoint {
        host: host.to_owned(),
        port,
        host_header,
        path,
        tls,
    })
}

/// Letters, digits, `-` and `_` in dot-separated labels of 1 to 63, 253 at most, a final dot allowed.
pub(super) fn is_host_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

pub(super) fn trim_crlf(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

/// Visible ASCII and space.
pub(super) fn is_visible(b: u8) -> bool {
    (b' '..=b'~').contains(&b)
}

/// RFC 9110 `tchar`.
pub(super) fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}
