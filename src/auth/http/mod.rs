//! Login lookup against an HTTP service speaking nginx's mail `auth_http` protocol, so an ISP's auth
//! service written for the nginx mail proxy works with popgate unchanged.
//!
//! The exchange mirrors nginx's `ngx_mail_auth_http_module`: one `GET <path> HTTP/1.0` per lookup on a
//! fresh connection, with `Host`, `Auth-Method`, `Auth-User` and `Auth-Pass` (both escaped as nginx
//! does: `%XX` for space, `%` and control bytes), `Auth-Salt` (APOP/CRAM-MD5), `Auth-Protocol`,
//! `Auth-Login-Attempt`, `Client-IP`, `Client-Host` and the configured extra headers, in nginx's order.
//! The answer is read from the response headers whatever the HTTP status; the body is ignored.
//! `Auth-Status: OK` names the store (`Auth-Server`, `Auth-Port`) and optionally the name and password to
//! use there (`Auth-User`, `Auth-Pass`, taken verbatim as nginx does); `Auth-Status: WAIT` asks for the
//! same query again after `Auth-Wait` seconds; any other status is a refusal whose text goes to the
//! client, after `Auth-Wait` seconds when given. `Auth-Error-Code` is SMTP-only in nginx and ignored.
//!
//! Where popgate differs from nginx, on purpose: `Auth-Server` may be a host name; a response without
//! `Auth-Status` is an error (nginx would route it when server and port are present); a duplicated answer
//! header is an error; waits are capped at [`MAX_AUTH_WAIT`]; the refusal text is cut to printable ASCII.
//!
//! This module owns the client and its timeout; `wire` the request and response format (no I/O); `cache`
//! the bounded cache of answers. It must not log a
//! password, a client's digest or an `Auth-Pass` answer (they stay in [`Secret`] or are never formatted),
//! and must not keep a password in its cache: entries are keyed by an HMAC. It logs nothing about a
//! user above debug level. Deciding what `-ERR` a client gets is the caller's job.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ring::hmac;
use ring::rand::SystemRandom;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::secret::Secret;

mod cache;
mod wire;

use self::cache::{AnswerCache, CacheKey};
use self::wire::{encode_request, is_tchar, is_visible, parse_response, parse_url, trim_crlf};

/// Largest response head read; nginx itself reads at most 1 KiB.
const MAX_RESPONSE_HEAD: usize = 16 * 1024;
/// Most header lines accepted in a response.
const MAX_RESPONSE_HEADERS: usize = 64;
/// Longest refusal text passed on (a POP3 line holds 512 octets, `-ERR [AUTH] ` included).
const MAX_MESSAGE_LEN: usize = 200;
/// Shown when the service's refusal text is empty once sanitised.
const DEFAULT_REFUSAL: &str = "Authentication failed";
/// Longest `Auth-Wait` honoured, so a service cannot park a session past its pre-login timeout.
pub const MAX_AUTH_WAIT: Duration = Duration::from_secs(30);
/// `Auth-Status: WAIT` answers accepted in a row before the lookup fails.
const MAX_WAIT_ROUNDS: u32 = 3;

/// Where the service is and how its answers are kept.
#[derive(Clone)]
pub struct AuthHttpConfig {
    /// `http://host[:port]/path[?query]` (port 80 by default) or `https://…` (port 443).
    pub url: String,
    /// How an `https://` service is verified (its roots); `None`: the system's roots.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// For one exchange: resolving, connecting, sending and reading the response head.
    pub timeout: Duration,
    /// How long an `OK` answer is reused for the same credentials from the same client IP (0: never).
    pub cache_ttl: Duration,
    /// How long a refusal is reused for the same credentials from the same client IP (0: never).
    pub negative_cache_ttl: Duration,
    /// Answers kept at most (0: no cache); the oldest goes first when full. Lookups with a salt (APOP,
    /// CRAM-MD5) are never cached: the digest is only good for its own connection's challenge.
    pub cache_size: usize,
    /// Sent after nginx's headers on every request, like `auth_http_header` (typically a shared secret,
    /// so the values are masked in `Debug`).
    pub extra_headers: Vec<(String, String)>,
    /// The tenant's auth_http series (request time, errors, cache hits); `None` counts nothing.
    pub metrics: Option<crate::metrics::AuthHttpMetrics>,
}

/// One login to look up. Field values are nginx's.
#[derive(Clone, Copy)]
pub struct AuthRequest<'a> {
    /// `plain` (USER/PASS, AUTH PLAIN and LOGIN), `apop`, `cram-md5` or `external`.
    pub method: &'a str,
    /// The login name as the client gave it.
    pub user: &'a str,
    /// The password, or the client's digest for `apop` and `cram-md5`.
    pub pass: &'a [u8],
    /// The APOP timestamp or CRAM-MD5 challenge the client answered (a trailing CRLF is dropped); sent
    /// as `Auth-Salt` for methods other than `plain`.
    pub salt: Option<&'a str>,
    /// `pop3`.
    pub protocol: &'a str,
    /// `Auth-Login-Attempt`: 1 for the connection's first login, then 2, 3…
    pub attempt: u32,
    /// The client's address (an IPv4-mapped IPv6 address is sent as IPv4).
    pub client_ip: IpAddr,
    /// The client's host name when known (sent as `Client-Host`; left out unless printable ASCII).
    pub client_host: Option<&'a str>,
}

/// The service's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthAnswer {
    /// `Auth-Status: OK`: where to go and, optionally, what to send there.
    Ok {
        /// `Auth-Server`: an IP address or (unlike nginx) a host name.
        server: String,
        /// `Auth-Port`.
        port: u16,
        /// `Auth-User`: the name to log in with at the store instead of the client's.
        user: Option<String>,
        /// `Auth-Pass`: the password to use at the store instead of the client's. nginx requires it for
        /// `apop` and `cram-md5`, where the client's digest cannot be replayed to a store.
        pass: Option<Secret>,
    },
    /// Any other `Auth-Status`: the client gets `-ERR` with the message.
    Refused {
        /// The status text, cut to printable ASCII without CR/LF, at most 200 characters.
        message: String,
        /// `Auth-Wait` (capped at [`MAX_AUTH_WAIT`]): delay the `-ERR` this long and let the client try
        /// again. `None` when absent or zero, where nginx closes the connection after the `-ERR`.
        wait: Option<Duration>,
    },
}

/// Why a lookup gave no answer; the caller answers `-ERR [SYS/TEMP]`.
#[derive(Debug, thiserror::Error)]
pub enum AuthHttpError {
    /// No complete answer within the configured timeout.
    #[error("auth_http service did not answer in time")]
    Timeout,
    /// Resolving, connecting, sending or receiving failed.
    #[error("auth_http service unreachable: {0}")]
    Connect(String),
    /// The response was not a valid `auth_http` answer.
    #[error("auth_http service sent a bad response: {0}")]
    BadResponse(String),
    /// The request could not be put in HTTP headers (the field is named; its value never is).
    #[error("auth_http request has an unsendable {0}")]
    BadRequest(&'static str),
    /// [`AuthHttp::new`] refused the configuration.
    #[error("auth_http configuration: {0}")]
    Config(String),
    /// The configured `url` cannot be used.
    #[error("auth_http configuration: {0}")]
    Url(#[from] wire::UrlError),
}

impl AuthHttpError {
    /// The `reason` label of `auth_http_errors_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Timeout => "timeout",
            Self::Connect(_) => "connect",
            Self::BadResponse(_) => "bad_response",
            Self::BadRequest(_) | Self::Config(_) | Self::Url(_) => "bad_request",
        }
    }
}

/// Writes the request head and reads the response head on `stream`.
async fn exchange_on<S>(mut stream: S, request: &[u8]) -> Result<Reply, AuthHttpError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    stream
        .write_all(request)
        .await
        .map_err(|e| AuthHttpError::Connect(format!("sending the request: {e}")))?;
    let mut head = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    loop {
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|e| AuthHttpError::Connect(format!("reading the response: {e}")))?;
        if n == 0 {
            return Err(AuthHttpError::BadResponse(
                "connection closed before the end of the response headers".into(),
            ));
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(reply) = parse_response(&head).map_err(AuthHttpError::BadResponse)? {
            return Ok(reply);
        }
        if head.len() > MAX_RESPONSE_HEAD {
            return Err(AuthHttpError::BadResponse(format!(
                "response headers over {MAX_RESPONSE_HEAD} bytes"
            )));
        }
    }
}

/// A client with the system's trust anchors, for an `https://` service without `ca`.
fn system_roots_config() -> Result<Arc<rustls::ClientConfig>, AuthHttpError> {
    crate::certs::client_config_with_roots(crate::certs::system_roots())
        .map_err(|e| AuthHttpError::Config(format!("TLS client: {e}")))
}

/// A client for one `auth_http` service with its answer cache; share it via `Arc`.
pub struct AuthHttp {
    config: AuthHttpConfig,
    endpoint: Endpoint,
    /// For `https://`: the connector and the name the certificate must carry.
    tls: Option<(
        tokio_rustls::TlsConnector,
        rustls_pki_types::ServerName<'static>,
    )>,
    /// Keys the cache: a fresh random key per process, so the cache holds no password and keys cannot
    /// be predicted or collided from outside.
    cache_key: hmac::Key,
    cache: AnswerCache,
}

/// The parsed `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Endpoint {
    /// Host name or IP address, without IPv6 brackets.
    host: String,
    port: u16,
    /// What nginx sends as `Host`: the URL's host without the port.
    host_header: String,
    /// Path and query.
    path: String,
    /// `https://`.
    tls: bool,
}

/// A parsed response: an answer, or `Auth-Status: WAIT`.
#[derive(Debug, PartialEq, Eq)]
enum Reply {
    Answer(AuthAnswer),
    Wait(Duration),
}

// === impl AuthHttp ===

impl AuthHttp {
    /// Checks the configuration and makes the client.
    ///
    /// # Errors
    /// [`AuthHttpError::Config`] for a URL that is not `http://host…`, a zero timeout, or an extra header
    /// that is not a valid HTTP header.
    pub fn new(config: AuthHttpConfig) -> Result<Self, AuthHttpError> {
        let endpoint = parse_url(&config.url)?;
        let tls = if endpoint.tls {
            let client = match &config.tls {
                Some(c) => Arc::clone(c),
                None => system_roots_config()?,
            };
            let name = rustls_pki_types::ServerName::try_from(endpoint.host.clone())
                .map_err(|e| AuthHttpError::Config(format!("url host for TLS: {e}")))?;
            Some((tokio_rustls::TlsConnector::from(client), name))
        } else {
            None
        };
        if config.timeout.is_zero() {
            return Err(AuthHttpError::Config("timeout must be above zero".into()));
        }
        for (name, value) in &config.extra_headers {
            if name.is_empty() || !name.bytes().all(is_tchar) {
                return Err(AuthHttpError::Config(format!(
                    "extra header name {name:?} is not an HTTP token"
                )));
            }
            if !value.bytes().all(|b| b == b'\t' || is_visible(b)) {
                return Err(AuthHttpError::Config(format!(
                    "extra header {name} has a value that is not printable ASCII"
                )));
            }
        }
        let cache_key = hmac::Key::generate(hmac::HMAC_SHA256, &SystemRandom::new())
            .map_err(|_| AuthHttpError::Config("no randomness for the cache key".into()))?;
        Ok(Self {
            cache: AnswerCache::new(config.cache_size),
            endpoint,
            tls,
            cache_key,
            config,
        })
    }

    /// Asks the service (or the cache) about one login.
    ///
    /// # Errors
    /// [`AuthHttpError::Timeout`], [`AuthHttpError::Connect`] or [`AuthHttpError::BadResponse`] when the
    /// service gave no usable answer (the caller answers `-ERR [SYS/TEMP]`; errors are not cached), and
    /// [`AuthHttpError::BadRequest`] before any I/O when a field cannot go in a header.
    pub async fn lookup(&self, req: &AuthRequest<'_>) -> Result<AuthAnswer, AuthHttpError> {
        let metrics = self.config.metrics.as_ref();
        let request =
            encode_request(&self.endpoint, &self.config.extra_headers, req).inspect_err(|e| {
                if let Some(m) = metrics {
                    m.error(e.reason());
                }
            })?;
        // A digest answers one connection's own challenge: such an answer never repeats, so caching it
        // would only push out answers that can.
        let key = req.salt.is_none().then(|| self.cache_key(req));
        if let Some(answer) = key.and_then(|key| self.cache.get(&key, Instant::now())) {
            tracing::debug!(url = %self.config.url, "auth_http answer from cache");
            if let Some(m) = metrics {
                m.hit.inc();
            }
            return Ok(answer);
        }
        if let Some(m) = metrics {
            m.miss.inc();
        }
        let started = Instant::now();
        let asked = self.ask(&request).await;
        if let Some(m) = metrics {
            m.duration.observe(started.elapsed().as_secs_f64());
            if let Err(e) = &asked {
                m.error(e.reason());
            }
        }
        let answer = asked?;
        let ttl = match &answer {
            AuthAnswer::Ok { .. } => self.config.cache_ttl,
            AuthAnswer::Refused { .. } => self.config.negative_cache_ttl,
        };
        if let Some(key) = key {
            self.cache.insert(key, answer.clone(), ttl, Instant::now());
        }
        tracing::debug!(
            url = %self.config.url,
            ok = matches!(answer, AuthAnswer::Ok { .. }),
            "auth_http answer"
        );
        Ok(answer)
    }

    /// The service's answer, after at most [`MAX_WAIT_ROUNDS`] `WAIT`s.
    async fn ask(&self, request: &[u8]) -> Result<AuthAnswer, AuthHttpError> {
        let mut waits = 0;
        loop {
            let reply = tokio::time::timeout(self.config.timeout, self.exchange(request))
                .await
                .map_err(|_| AuthHttpError::Timeout)??;
            match reply {
                Reply::Answer(answer) => return Ok(answer),
                Reply::Wait(_) if waits == MAX_WAIT_ROUNDS => {
                    return Err(AuthHttpError::BadResponse(format!(
                        "Auth-Status: WAIT {} times in a row",
                        waits + 1
                    )));
                }
                Reply::Wait(wait) => {
                    waits += 1;
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    /// Answers held in the cache (expired ones included until they are looked up or evicted).
    pub fn cache_len(&self) -> usize {
        self.cache.len()
    }

    /// Empties the cache (after a password change pushed by the operator, say).
    pub fn clear_cache(&self) {
        self.cache.clear();
    }

    /// One request on a fresh connection, as nginx does (HTTP/1.0, no keep-alive), over TLS for
    /// `https://`.
    async fn exchange(&self, request: &[u8]) -> Result<Reply, AuthHttpError> {
        let tcp = self.connect().await?;
        match &self.tls {
            None => exchange_on(tcp, request).await,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|e| AuthHttpError::Connect(format!("TLS handshake: {e}")))?;
                exchange_on(tls, request).await
            }
        }
    }

    async fn connect(&self) -> Result<TcpStream, AuthHttpError> {
        let Endpoint { host, port, .. } = &self.endpoint;
        let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
            Ok(ip) => vec![SocketAddr::new(ip, *port)],
            Err(_) => tokio::net::lookup_host((host.as_str(), *port))
                .await
                .map_err(|e| AuthHttpError::Connect(format!("resolving {host}: {e}")))?
                .collect(),
        };
        let mut last = format!("{host} resolved to no address");
        for addr in addrs {
            match TcpStream::connect(addr).await {
                Ok(stream) => {
                    // One small request: send it at once.
                    let _ = stream.set_nodelay(true);
                    return Ok(stream);
                }
                Err(e) => last = format!("connecting to {addr}: {e}"),
            }
        }
        Err(AuthHttpError::Connect(last))
    }

    /// HMAC-SHA256 of everything the answer may depend on except the attempt number, each field
    /// length-prefixed so no two requests share an input.
    fn cache_key(&self, req: &AuthRequest<'_>) -> CacheKey {
        let mut ctx = hmac::Context::with_key(&self.cache_key);
        let client_ip = req.client_ip.to_canonical().to_string();
        let salt = req.salt.map(trim_crlf);
        for field in [
            req.method.as_bytes(),
            req.protocol.as_bytes(),
            req.user.as_bytes(),
            req.pass,
            salt.unwrap_or("").as_bytes(),
            if salt.is_some() { b"salt" } else { b"none" },
            client_ip.as_bytes(),
        ] {
            ctx.update(&(field.len() as u64).to_be_bytes());
            ctx.update(field);
        }
        let mut key = [0u8; 32];
        key.copy_from_slice(ctx.sign().as_ref());
        key
    }
}

impl fmt::Debug for AuthHttp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthHttp")
            .field("config", &self.config)
            .field("cache_len", &self.cache_len())
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AuthHttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let extra: Vec<(&str, &str)> = self
            .extra_headers
            .iter()
            .map(|(name, _)| (name.as_str(), "MASKED"))
            .collect();
        f.debug_struct("AuthHttpConfig")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field("cache_ttl", &self.cache_ttl)
            .field("negative_cache_ttl", &self.negative_cache_ttl)
            .field("cache_size", &self.cache_size)
            .field("extra_headers", &extra)
            .finish()
    }
}

impl fmt::Debug for AuthRequest<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthRequest")
            .field("method", &self.method)
            .field("user", &self.user)
            .field("pass", &"MASKED")
            .field("salt", &self.salt)
            .field("protocol", &self.protocol)
            .field("attempt", &self.attempt)
            .field("client_ip", &self.client_ip)
            .field("client_host", &self.client_host)
            .finish()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands
mod tests {
    use super::wire::*;
    use super::*;

    fn ok(server: &str, port: u16) -> AuthAnswer {
        AuthAnswer::Ok {
            server: server.into(),
            port,
            user: None,
            pass: None,
        }
    }

    fn key(n: u8) -> CacheKey {
        [n; 32]
    }

    #[test]
    fn escapes_like_nginx_mail_auth() {
        assert_eq!(
            escape(b"a b%c\x00\x1f\x7f+?#&/:@\xc3\xa9"),
            b"a%20b%25c%00%1F%7F+?#&/:@\xc3\xa9"
        );
    }

    #[test]
    fn parses_urls() {
        let e = parse_url("http://127.0.0.1:9000/auth?x=1").unwrap();
        assert_eq!(
            e,
            Endpoint {
                host: "127.0.0.1".into(),
                port: 9000,
                host_header: "127.0.0.1".into(),
                path: "/auth?x=1".into(),
                tls: false,
            }
        );
        let e = parse_url("HTTP://auth.mail.svc.cluster.local").unwrap();
        assert_eq!((e.port, e.path.as_str(), e.tls), (80, "/", false));
        let e = parse_url("https://auth.mail.svc/check").unwrap();
        assert_eq!((e.port, e.path.as_str(), e.tls), (443, "/check", true));
        let e = parse_url("http://[::1]:8080?q#frag").unwrap();
        assert_eq!(
            (
                e.host.as_str(),
                e.host_header.as_str(),
                e.port,
                e.path.as_str()
            ),
            ("::1", "[::1]", 8080, "/?q")
        );
        for bad in [
            "ftp://auth/",
            "auth:9000/x",
            "http://user:pw@auth/",
            "http://auth:0/",
            "http://auth:99999/",
            "http://:80/",
            "http://[::1/",
            "http://a b/",
            "http://auth/a b",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_answers() {
        let parse = |s: &str| parse_response(s.as_bytes());
        assert_eq!(
            parse(
                "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 192.0.2.1\r\nAuth-Port: 110\r\n\r\n"
            ),
            Ok(Some(Reply::Answer(ok("192.0.2.1", 110))))
        );
        // Any status code, header names in any case, an IPv6 store, the body ignored.
        assert_eq!(
            parse(
                "HTTP/1.1 404 Not Found\r\nauth-status: OK\r\nAUTH-SERVER: [2001:db8::1]\r\nauth-port:  995 \r\n\r\nbody"
            ),
            Ok(Some(Reply::Answer(ok("2001:db8::1", 995))))
        );
        assert_eq!(
            parse("HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 2\r\n\r\n"),
            Ok(Some(Reply::Wait(Duration::from_secs(2))))
        );
        assert_eq!(
            parse(
                "HTTP/1.0 200 OK\r\nAuth-Status: Go away\r\nAuth-Wait: 99999999999999999999\r\n\r\n"
            ),
            Ok(Some(Reply::Answer(AuthAnswer::Refused {
                message: "Go away".into(),
                wait: Some(MAX_AUTH_WAIT)
            })))
        );
        assert_eq!(
            parse(
                "HTTP/1.0 200 OK\r\nAuth-Status: No\r\nAuth-Wait: 0\r\nAuth-Error-Code: 535 5.7.8\r\n\r\n"
            ),
            Ok(Some(Reply::Answer(AuthAnswer::Refused {
                message: "No".into(),
                wait: None
            }))),
            "Auth-Wait: 0 is nginx's close"
        );
        assert_eq!(
            parse("HTTP/1.0 200 OK\r\nAuth-Status: No\r\nAuth-Wait: soon\r\n\r\n"),
            Ok(Some(Reply::Answer(AuthAnswer::Refused {
                message: "No".into(),
                wait: None
            })))
        );
        // A refusal text with control bytes is still a refusal, its text cut to printable ASCII.
        assert_eq!(
            parse("HTTP/1.0 200 OK\r\nAuth-Status: Bad\x01pass\x1b[0m\x7f\r\nAuth-Wait: 3\r\n\r\n"),
            Ok(Some(Reply::Answer(AuthAnswer::Refused {
                message: "Bad pass [0m".into(),
                wait: Some(Duration::from_secs(3))
            })))
        );
        assert_eq!(parse("HTTP/1.0 200 OK\r\nAuth-Status: OK\r\n"), Ok(None));
        for bad in [
            "HTTP/1.0 200 OK\r\n\r\n",
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Port: 110\r\n\r\n",
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: a b\r\nAuth-Port: 110\r\n\r\n",
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 0\r\n\r\n",
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: h\r\nAuth-Port: 110\r\nAuth-User:\r\n\r\n",
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Status: No\r\n\r\n",
            "SSH-2.0-OpenSSH\r\n\r\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn refusal_text_is_printable_and_bounded() {
        assert_eq!(sanitise(b"caf\xc3\xa9 \t closed"), "caf?? ? closed");
        assert_eq!(sanitise(b"   "), DEFAULT_REFUSAL);
        assert_eq!(sanitise(&[b'x'; 1000]).len(), MAX_MESSAGE_LEN);
    }

    #[test]
    fn cache_entries_expire() {
        let cache = AnswerCache::new(10);
        let t0 = Instant::now();
        cache.insert(key(1), ok("a", 1), Duration::from_secs(60), t0);
        assert_eq!(
            cache.get(&key(1), t0 + Duration::from_secs(59)),
            Some(ok("a", 1))
        );
        assert_eq!(cache.get(&key(1), t0 + Duration::from_secs(60)), None);
        assert_eq!(cache.len(), 0, "an expired entry is dropped when found");
        cache.insert(key(2), ok("a", 1), Duration::ZERO, t0);
        assert_eq!(cache.len(), 0, "a zero ttl caches nothing");
    }

    #[test]
    fn cache_evicts_the_oldest() {
        let cache = AnswerCache::new(3);
        let t0 = Instant::now();
        let ttl = Duration::from_secs(60);
        for n in 1..=3 {
            cache.insert(key(n), ok("a", u16::from(n)), ttl, t0);
        }
        // Refreshing 1 makes 2 the oldest.
        cache.insert(key(1), ok("b", 1), ttl, t0);
        cache.insert(key(4), ok("a", 4), ttl, t0);
        assert_eq!(cache.len(), 3);
        assert_eq!(cache.get(&key(2), t0), None);
        assert_eq!(cache.get(&key(1), t0), Some(ok("b", 1)));
        for _ in 0..1000 {
            cache.insert(key(1), ok("b", 1), ttl, t0);
        }
        assert_eq!(cache.len(), 3);
        assert!(AnswerCache::new(0).get(&key(1), t0).is_none());
    }

    #[test]
    fn nothing_secret_in_debug_output() {
        let config = AuthHttpConfig {
            url: "http://127.0.0.1:1/".into(),
            tls: None,
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::ZERO,
            negative_cache_ttl: Duration::ZERO,
            cache_size: 0,
            extra_headers: vec![("X-Auth-Key".into(), "shared-secret".into())],
            metrics: None,
        };
        let client = AuthHttp::new(config).unwrap();
        let req = AuthRequest {
            method: "plain",
            user: "u",
            pass: b"hunter2",
            salt: None,
            protocol: "pop3",
            attempt: 1,
            client_ip: IpAddr::from([192, 0, 2, 1]),
            client_host: None,
        };
        let answer = AuthAnswer::Ok {
            server: "s".into(),
            port: 1,
            user: None,
            pass: Some(Secret::new(b"store-pw".to_vec())),
        };
        let text = format!("{client:?} {req:?} {answer:?}");
        for secret in ["shared-secret", "hunter2", "store-pw"] {
            assert!(!text.contains(secret), "{text}");
        }
    }
}
