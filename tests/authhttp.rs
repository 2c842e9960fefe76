//! nginx `auth_http` compatibility: popgate's lookups against a small auth service started on loopback,
//! which records every request head and answers like an nginx mail auth script.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test fails loudly where it stands

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

mod support;

use support::auth_service::Service;
use support::pop3::Pop3;
use support::popgate::{plain_config, tenant};

use popgate::auth::http::{AuthAnswer, AuthHttp, AuthHttpConfig, AuthHttpError, AuthRequest};
use tokio::net::TcpListener;

/// A header's value in a request head, raw.
fn header<'h>(head: &'h [u8], name: &str) -> Option<&'h [u8]> {
    head.split(|&b| b == b'\n').find_map(|line| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let colon = line.iter().position(|&b| b == b':')?;
        let (n, v) = line.split_at(colon);
        n.eq_ignore_ascii_case(name.as_bytes())
            .then(|| v[1..].trim_ascii())
    })
}

/// What an nginx auth script does with `Auth-User` and `Auth-Pass`: `rawurldecode`.
fn url_decode(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
            Some(byte) if raw[i] == b'%' => {
                out.push(byte);
                i += 3;
            }
            _ => {
                out.push(raw[i]);
                i += 1;
            }
        }
    }
    out
}

const JOHN: &str = "john doe%@example.com";
const JOHN_PASS: &[u8] = "p@ss word%\u{1}é".as_bytes();
const APOP_SALT: &str = "<1896.697170952@dbc.mtview.ca.us>";
const APOP_DIGEST: &[u8] = b"c4c9334bac560ecc979e58001b3e22fb";

/// An auth script as ISPs run behind nginx: john by password, mrose by APOP (answering with the
/// store's password, as nginx requires for APOP), everyone else refused with a wait.
fn nginx_script(head: &[u8]) -> Option<String> {
    let user = url_decode(header(head, "Auth-User").unwrap());
    let pass = url_decode(header(head, "Auth-Pass").unwrap());
    let method = header(head, "Auth-Method").unwrap();
    let ok = |extra: &str| {
        Some(format!(
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: localhost\r\nAuth-Port: 1110\r\n{extra}\r\n"
        ))
    };
    match (method, user.as_slice()) {
        (b"plain", b"hang@example.com") => None,
        (b"plain", u) if u == JOHN.as_bytes() && pass == JOHN_PASS => ok(""),
        (b"apop", b"mrose")
            if header(head, "Auth-Salt") == Some(APOP_SALT.as_bytes()) && pass == APOP_DIGEST =>
        {
            ok("Auth-User: mrose@store\r\nAuth-Pass: tanstaaf\r\n")
        }
        _ => Some(
            "HTTP/1.0 403 Forbidden\r\nAuth-Status: Invalid login or password\r\nAuth-Wait: 1\r\n\
             Content-Length: 6\r\n\r\nnope\r\n"
                .into(),
        ),
    }
}

fn config(url: String) -> AuthHttpConfig {
    AuthHttpConfig {
        url,
        tls: None,
        timeout: Duration::from_secs(5),
        cache_ttl: Duration::from_secs(60),
        negative_cache_ttl: Duration::from_secs(60),
        cache_size: 100,
        extra_headers: vec![("X-Auth-Key".into(), "shared-secret".into())],
        metrics: None,
    }
}

fn plain<'a>(user: &'a str, pass: &'a [u8]) -> AuthRequest<'a> {
    AuthRequest {
        method: "plain",
        user,
        pass,
        salt: None,
        protocol: "pop3",
        attempt: 1,
        client_ip: "192.0.2.7".parse().unwrap(),
        client_host: None,
    }
}

fn ok_at_localhost() -> AuthAnswer {
    AuthAnswer::Ok {
        server: "localhost".into(),
        port: 1110,
        user: None,
        pass: None,
    }
}

#[tokio::test]
async fn sends_the_nginx_header_set_for_a_password_login() {
    let service = Service::start(nginx_script).await;
    let auth = AuthHttp::new(config(service.url())).unwrap();
    let req = AuthRequest {
        // A dual-stack listener reports IPv4 clients like this; nginx's services expect the IPv4 form.
        client_ip: "::ffff:192.0.2.7".parse().unwrap(),
        client_host: Some("client.example.org"),
        ..plain(JOHN, JOHN_PASS)
    };
    assert_eq!(auth.lookup(&req).await.unwrap(), ok_at_localhost());
    let expected: &[u8] = b"GET /auth?tenant=a HTTP/1.0\r\n\
        Host: 127.0.0.1\r\n\
        Auth-Method: plain\r\n\
        Auth-User: john%20doe%25@example.com\r\n\
        Auth-Pass: p@ss%20word%25%01\xc3\xa9\r\n\
        Auth-Protocol: pop3\r\n\
        Auth-Login-Attempt: 1\r\n\
        Client-IP: 192.0.2.7\r\n\
        Client-Host: client.example.org\r\n\
        X-Auth-Key: shared-secret\r\n\
        \r\n";
    assert_eq!(
        String::from_utf8_lossy(&service.head(0)),
        String::from_utf8_lossy(expected)
    );
    assert_eq!(service.head(0), expected);
}

#[tokio::test]
async fn sends_the_salt_for_apop_and_takes_the_store_credentials() {
    let service = Service::start(nginx_script).await;
    let auth = AuthHttp::new(config(service.url())).unwrap();
    let req = AuthRequest {
        method: "apop",
        salt: Some(APOP_SALT),
        attempt: 2,
        client_ip: "2001:db8::7".parse().unwrap(),
        ..plain("mrose", APOP_DIGEST)
    };
    let AuthAnswer::Ok {
        server,
        port,
        user,
        pass,
    } = auth.lookup(&req).await.unwrap()
    else {
        panic!("APOP refused");
    };
    assert_eq!((server.as_str(), port), ("localhost", 1110));
    assert_eq!(user.as_deref(), Some("mrose@store"));
    assert_eq!(pass.unwrap().expose(), b"tanstaaf");
    auth.lookup(&req).await.unwrap();
    assert_eq!(
        service.requests(),
        2,
        "a digest for one challenge is not cached"
    );
    assert_eq!(auth.cache_len(), 0);
    let expected: &[u8] = b"GET /auth?tenant=a HTTP/1.0\r\n\
        Host: 127.0.0.1\r\n\
        Auth-Method: apop\r\n\
        Auth-User: mrose\r\n\
        Auth-Pass: c4c9334bac560ecc979e58001b3e22fb\r\n\
        Auth-Salt: <1896.697170952@dbc.mtview.ca.us>\r\n\
        Auth-Protocol: pop3\r\n\
        Auth-Login-Attempt: 2\r\n\
        Client-IP: 2001:db8::7\r\n\
        X-Auth-Key: shared-secret\r\n\
        \r\n";
    assert_eq!(
        String::from_utf8_lossy(&service.head(0)),
        String::from_utf8_lossy(expected)
    );
}

#[test]
fn the_client_can_be_shared_across_tasks() {
    fn shareable<T: Send + Sync>(_: &T) {}
    fn sendable<T: Send>(_: T) {}
    let auth = AuthHttp::new(config("http://127.0.0.1:1/".into())).unwrap();
    shareable(&auth);
    let req = plain(JOHN, JOHN_PASS);
    sendable(auth.lookup(&req));
}

#[tokio::test]
async fn a_refusal_carries_its_message_and_auth_wait() {
    let service = Service::start(nginx_script).await;
    let auth = AuthHttp::new(config(service.url())).unwrap();
    assert_eq!(
        auth.lookup(&plain(JOHN, b"wrong")).await.unwrap(),
        AuthAnswer::Refused {
            message: "Invalid login or password".into(),
            wait: Some(Duration::from_secs(1)),
        }
    );
}

#[tokio::test]
async fn a_silent_service_times_out_within_the_timeout() {
    let service = Service::start(nginx_script).await;
    let timeout = Duration::from_millis(300);
    let auth = AuthHttp::new(AuthHttpConfig {
        timeout,
        ..config(service.url())
    })
    .unwrap();
    let started = Instant::now();
    let err = auth
        .lookup(&plain("hang@example.com", b"pw"))
        .await
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(err, AuthHttpError::Timeout), "{err:?}");
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(2),
        "{took:?}"
    );
    assert_eq!(service.requests(), 1);
    assert_eq!(auth.cache_len(), 0, "errors are not cached");
}

#[tokio::test]
async fn a_service_that_is_down_is_a_connect_error() {
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let auth = AuthHttp::new(config(format!("http://{addr}/auth"))).unwrap();
    let err = auth.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap_err();
    assert!(matches!(err, AuthHttpError::Connect(_)), "{err:?}");
}

#[tokio::test]
async fn answers_are_cached_both_ways() {
    let service = Service::start(nginx_script).await;
    let auth = AuthHttp::new(config(service.url())).unwrap();
    for _ in 0..3 {
        assert_eq!(
            auth.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap(),
            ok_at_localhost()
        );
    }
    assert_eq!(service.requests(), 1, "a positive answer is reused");
    for _ in 0..3 {
        assert!(matches!(
            auth.lookup(&plain(JOHN, b"wrong")).await.unwrap(),
            AuthAnswer::Refused { .. }
        ));
    }
    assert_eq!(service.requests(), 2, "a refusal is reused");
    // The attempt number is not part of the key; the client's address is.
    let later = AuthRequest {
        attempt: 3,
        ..plain(JOHN, JOHN_PASS)
    };
    auth.lookup(&later).await.unwrap();
    assert_eq!(service.requests(), 2);
    let elsewhere = AuthRequest {
        client_ip: IpAddr::from([198, 51, 100, 1]),
        ..plain(JOHN, JOHN_PASS)
    };
    auth.lookup(&elsewhere).await.unwrap();
    assert_eq!(service.requests(), 3);
    assert_eq!(auth.cache_len(), 3);
}

/// The tenant's auth_http series: lookups that went to the service (timed), cache hits and misses, and
/// errors by reason.
#[tokio::test]
async fn lookups_are_counted_by_cache_result_and_error_reason() {
    let metrics = popgate::metrics::Metrics::new().unwrap();
    let service = Service::start(nginx_script).await;
    let auth = AuthHttp::new(AuthHttpConfig {
        metrics: Some(metrics.auth_http("acme")),
        ..config(service.url())
    })
    .unwrap();
    for _ in 0..3 {
        auth.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap();
    }
    let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let down = AuthHttp::new(AuthHttpConfig {
        metrics: Some(metrics.auth_http("acme")),
        ..config(format!("http://{addr}/auth"))
    })
    .unwrap();
    down.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap_err();
    let text = String::from_utf8(metrics.render()).unwrap();
    let value = |series: &str| support::popgate::metric(&text, series);
    assert_eq!(
        value("popgate_auth_http_cache_total{result=\"hit\",tenant=\"acme\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("popgate_auth_http_cache_total{result=\"miss\",tenant=\"acme\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("popgate_auth_http_request_duration_seconds_count{tenant=\"acme\"}"),
        Some(2.0),
        "{text}"
    );
    assert_eq!(
        value("popgate_auth_http_errors_total{reason=\"connect\",tenant=\"acme\"}"),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        value("popgate_auth_http_errors_total{reason=\"timeout\",tenant=\"acme\"}"),
        Some(0.0),
        "{text}"
    );
}

#[tokio::test]
async fn a_changed_password_is_a_cache_miss() {
    let service = Service::start(nginx_script).await;
    let auth = AuthHttp::new(config(service.url())).unwrap();
    assert!(matches!(
        auth.lookup(&plain(JOHN, b"old password")).await.unwrap(),
        AuthAnswer::Refused { .. }
    ));
    assert_eq!(
        auth.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap(),
        ok_at_localhost()
    );
    assert_eq!(service.requests(), 2);
    // And a password that merely shares a prefix is another key too.
    let mut longer = JOHN_PASS.to_vec();
    longer.push(b'x');
    assert!(matches!(
        auth.lookup(&plain(JOHN, &longer)).await.unwrap(),
        AuthAnswer::Refused { .. }
    ));
    assert_eq!(service.requests(), 3);
}

#[tokio::test]
async fn the_cache_is_bounded_and_forgets_the_oldest() {
    let service = Service::start(nginx_script).await;
    let auth = AuthHttp::new(AuthHttpConfig {
        cache_size: 2,
        ..config(service.url())
    })
    .unwrap();
    for user in ["a@example.com", "b@example.com", "c@example.com"] {
        auth.lookup(&plain(user, b"pw")).await.unwrap();
    }
    assert_eq!(service.requests(), 3);
    assert_eq!(auth.cache_len(), 2);
    auth.lookup(&plain("c@example.com", b"pw")).await.unwrap();
    assert_eq!(service.requests(), 3, "the newest is kept");
    auth.lookup(&plain("a@example.com", b"pw")).await.unwrap();
    assert_eq!(service.requests(), 4, "the oldest was evicted");
    assert_eq!(auth.cache_len(), 2);
}

#[tokio::test]
async fn zero_ttls_and_size_turn_caching_off() {
    let service = Service::start(nginx_script).await;
    let no_negative = AuthHttp::new(AuthHttpConfig {
        negative_cache_ttl: Duration::ZERO,
        ..config(service.url())
    })
    .unwrap();
    for _ in 0..2 {
        no_negative.lookup(&plain(JOHN, b"wrong")).await.unwrap();
        no_negative.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap();
    }
    assert_eq!(
        service.requests(),
        3,
        "refusals asked each time, the OK once"
    );
    let no_cache = AuthHttp::new(AuthHttpConfig {
        cache_size: 0,
        ..config(service.url())
    })
    .unwrap();
    for _ in 0..2 {
        no_cache.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap();
    }
    assert_eq!(service.requests(), 5);
    assert_eq!(no_cache.cache_len(), 0);
}

#[tokio::test]
async fn auth_status_wait_asks_again() {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&calls);
    let service = Service::start(move |_| {
        Some(if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            "HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\nAuth-Wait: 0\r\n\r\n".into()
        } else {
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 192.0.2.10\r\nAuth-Port: 110\r\n\r\n"
                .into()
        })
    })
    .await;
    let auth = AuthHttp::new(config(service.url())).unwrap();
    assert_eq!(
        auth.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap(),
        AuthAnswer::Ok {
            server: "192.0.2.10".into(),
            port: 110,
            user: None,
            pass: None
        }
    );
    assert_eq!(service.requests(), 2);
    assert_eq!(service.head(0), service.head(1), "the same query again");

    let always_wait =
        Service::start(|_| Some("HTTP/1.0 200 OK\r\nAuth-Status: WAIT\r\n\r\n".into())).await;
    let auth = AuthHttp::new(config(always_wait.url())).unwrap();
    let err = auth.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap_err();
    assert!(matches!(err, AuthHttpError::BadResponse(_)), "{err:?}");
    assert_eq!(always_wait.requests(), 4, "three waits, then give up");
}

#[tokio::test]
async fn bad_responses_are_errors_not_answers() {
    for response in [
        // Nothing at all.
        "",
        // Not HTTP.
        "+OK POP3 ready\r\n\r\n",
        // No Auth-Status.
        "HTTP/1.0 500 Internal Server Error\r\nContent-Type: text/html\r\n\r\n<h1>oops</h1>",
        // OK without a port.
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: localhost\r\n\r\n",
        // A store name that is not a host name.
        "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: store/1\r\nAuth-Port: 110\r\n\r\n",
    ] {
        let service = Service::start(move |_| Some(response.to_owned())).await;
        let auth = AuthHttp::new(config(service.url())).unwrap();
        let err = auth.lookup(&plain(JOHN, JOHN_PASS)).await.unwrap_err();
        assert!(
            matches!(err, AuthHttpError::BadResponse(_)),
            "{response:?}: {err:?}"
        );
        assert_eq!(auth.cache_len(), 0);
    }
}

#[tokio::test]
async fn refusal_text_reaches_the_client_sanitised() {
    let service = Service::start(|_| {
        Some(format!(
            "HTTP/1.0 200 OK\r\nAuth-Status: Konto gesperrt \u{2013} {}\r\n\r\n",
            "x".repeat(400)
        ))
    })
    .await;
    let auth = AuthHttp::new(config(service.url())).unwrap();
    let AuthAnswer::Refused { message, wait } = auth.lookup(&plain(JOHN, b"pw")).await.unwrap()
    else {
        panic!("expected a refusal");
    };
    assert!(message.starts_with("Konto gesperrt ??? xxx"), "{message}");
    assert_eq!(message.len(), 200);
    assert!(message.bytes().all(|b| (b' '..=b'~').contains(&b)));
    assert_eq!(wait, None, "no Auth-Wait: nginx would close the connection");
}

#[tokio::test]
async fn unsendable_requests_and_configs_are_refused_up_front() {
    let service = Service::start(nginx_script).await;
    let auth = AuthHttp::new(config(service.url())).unwrap();
    let req = AuthRequest {
        method: "apop",
        salt: Some("<a\nb@c>"),
        ..plain("mrose", APOP_DIGEST)
    };
    let err = auth.lookup(&req).await.unwrap_err();
    assert!(
        matches!(err, AuthHttpError::BadRequest("Auth-Salt")),
        "{err:?}"
    );
    assert_eq!(service.requests(), 0);

    for bad in [
        AuthHttpConfig {
            url: "ftp://127.0.0.1/auth".into(),
            ..config(service.url())
        },
        AuthHttpConfig {
            timeout: Duration::ZERO,
            ..config(service.url())
        },
        AuthHttpConfig {
            extra_headers: vec![("X-Key".into(), "a\r\nInjected: 1".into())],
            metrics: None,
            ..config(service.url())
        },
        AuthHttpConfig {
            extra_headers: vec![("Bad Name".into(), "v".into())],
            ..config(service.url())
        },
    ] {
        assert!(matches!(
            AuthHttp::new(bad),
            Err(AuthHttpError::Config(_) | AuthHttpError::Url(_))
        ));
    }
}

// === auth_http through popgate ===

/// popgate with one tenant (`example.com`) whose logins go through the auth service at `url`.
async fn popgate_asking(url: &str, extra: &str) -> Result<popgate::Running, popgate::StartError> {
    let yaml = format!(
        "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\n{extra}tenants:\n  acme:\n    \
         domains: [example.com]\n    backends: [\"127.0.0.1:9\"]\n    plaintext_login: allow\n    \
         health: {{enabled: false}}\n    pool: {{min_idle: 0}}\n    auth_http: {{url: \"{url}\"}}\n"
    );
    let config = popgate::Config::from_yaml_str(&yaml, std::path::Path::new(".")).unwrap();
    popgate::start(config, tokio_util::sync::CancellationToken::new()).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_login_attempt_on_a_connection_is_numbered() {
    let service = Service::start(|_| {
        Some("HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n\r\n".into())
    })
    .await;
    let pg = popgate_asking(&service.url(), "").await.unwrap();
    let mut c = support::pop3::Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
    for pass in ["first-guess", "second-guess"] {
        c.ok("USER bob@example.com").await;
        let reply = c.cmd(&format!("PASS {pass}")).await;
        assert!(reply.starts_with("-ERR [AUTH]"), "{reply}");
    }
    assert_eq!(service.requests(), 2);
    assert_eq!(
        header(&service.head(0), "Auth-Login-Attempt"),
        Some(&b"1"[..])
    );
    assert_eq!(
        header(&service.head(1), "Auth-Login-Attempt"),
        Some(&b"2"[..])
    );
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_server_names_resolve_with_popgates_own_dns() {
    let md = maildrop::Maildrop::new(maildrop::Settings::default());
    md.add_mailbox(
        "bob@example.com",
        "pw",
        vec![b"Subject: x\r\n\r\nhi\r\n".to_vec()],
    );
    let store = md.bind("127.0.0.1:0".parse().unwrap()).await.unwrap();
    // A name only popgate's configured nameserver knows; the system resolver has never heard of it.
    let dns = support::dns::TestDns::start("mail.test.");
    dns.set_a("store.mail.test.", &["127.0.0.1".parse().unwrap()], 60);
    let port = store.local_addr().port();
    let service = Service::start(move |_| {
        Some(format!(
            "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: store.mail.test\r\nAuth-Port: {port}\r\n\r\n"
        ))
    })
    .await;
    let extra = format!("dns:\n  nameservers: [\"{}\"]\n", dns.addr());
    let pg = popgate_asking(&service.url(), &extra).await.unwrap();
    let mut c = support::pop3::Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
    c.login("bob@example.com", "pw").await;
    assert!(c.ok("STAT").await.starts_with("+OK 1 "));
    c.ok("QUIT").await;
    assert!(
        dns.query_count() > 0,
        "popgate did not ask its own nameserver"
    );
    pg.shutdown();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_auth_http_setting_is_reported_as_such() {
    let Err(e) = popgate_asking("ftp://auth.example/check", "").await else {
        panic!("popgate started with an ftp:// auth_http url");
    };
    let text = e.to_string();
    assert!(
        text.contains("tenant acme: auth_http:")
            && text.contains("scheme")
            && !text.contains("secrets"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_http_service_decides_logins_and_names_the_store() {
    let (_md, server) = support::mailboxes::maildrop(&["other@example.com"], 1).await;
    let store_port = server.local_addr().port();
    // Accepts `password` for anyone and names the store by host name with the account to use there;
    // refuses `wait-me` with Auth-Wait, anything else outright.
    let service = Service::start(move |head| {
        let head = String::from_utf8_lossy(head).into_owned();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                .unwrap_or_default()
                .to_string()
        };
        assert_eq!(header("Auth-Protocol"), "pop3");
        assert_eq!(header("Client-IP"), "127.0.0.1");
        Some(match header("Auth-Pass").as_str() {
            "password" => format!(
                "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: localhost\r\nAuth-Port: {store_port}\r\n\
                 Auth-User: other@example.com\r\nAuth-Pass: pw\r\n\r\n"
            ),
            "wait-me" => {
                "HTTP/1.0 200 OK\r\nAuth-Status: Try later\r\nAuth-Wait: 1\r\n\r\n".to_string()
            }
            _ => "HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n\r\n".to_string(),
        })
    })
    .await;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let nowhere = "127.0.0.1:1".parse().unwrap();
    let asking = |url: String, timeout: &str| {
        format!(
            "    health: {{enabled: false}}\n    auth_http: {{url: \"{url}\", timeout: {timeout}}}\n"
        )
    };
    let yaml = plain_config(
        "",
        &(tenant(
            "example",
            "example.com",
            nowhere,
            &asking(format!("http://{}/auth", service.addr), "2s"),
        ) + &tenant(
            "down",
            "down.test",
            nowhere,
            &asking(format!("http://{dead}/auth"), "1s"),
        )),
    );
    let pg = support::popgate::start(&yaml, std::path::Path::new(".")).await;
    let addr = pg.local_addr("pop3").unwrap();

    // The service says OK and which store and account to use.
    let mut c = Pop3::greeted(addr).await;
    c.login("anyone@example.com", "password").await;
    assert!(c.ok("STAT").await.starts_with("+OK 1 "));
    c.ok("QUIT").await;
    // Its refusal text reaches the client; Auth-Wait delays it.
    let mut c = Pop3::greeted(addr).await;
    c.ok("USER anyone@example.com").await;
    assert_eq!(
        c.cmd("PASS nope").await,
        "-ERR [AUTH] Invalid login or password"
    );
    let t = Instant::now();
    c.ok("USER anyone@example.com").await;
    assert_eq!(c.cmd("PASS wait-me").await, "-ERR [AUTH] Try later");
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // A cached answer does not ask the service again.
    let before = service.requests();
    let mut c = Pop3::greeted(addr).await;
    c.login("anyone@example.com", "password").await;
    c.ok("QUIT").await;
    assert_eq!(service.requests(), before);
    // The service is down: -ERR [SYS/TEMP].
    let mut c = Pop3::greeted(addr).await;
    c.ok("USER x@down.test").await;
    let r = c.cmd("PASS password").await;
    assert!(r.starts_with("-ERR [SYS/TEMP]"), "{r}");
    pg.shutdown();
}

/// popgate in nginx's place: an auth service written for nginx's protocol, reached over HTTPS (checked
/// against the configured CA), with nginx's `auth_http_header` extras from the config (one from a file),
/// and a tenant with no store of its own: the service names it. The requests are nginx's, byte for byte.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn popgate_is_a_drop_in_for_nginx_over_https_without_a_placeholder_store() {
    let (_md, store) = support::mailboxes::maildrop(&["john@example.com"], 1).await;
    let store_port = store.local_addr().port();
    let ca = support::pki::TestCa::new("auth CA");
    let leaf = ca.leaf(&["127.0.0.1"]);
    let service = Service::start_tls(
        move |head| {
            let ok = String::from_utf8_lossy(head).contains("\r\nAuth-Pass: pw\r\n");
            Some(if ok {
                format!(
                    "HTTP/1.0 200 OK\r\nAuth-Status: OK\r\nAuth-Server: 127.0.0.1\r\nAuth-Port: {store_port}\r\n\r\n"
                )
            } else {
                "HTTP/1.0 200 OK\r\nAuth-Status: Invalid login or password\r\n\r\n".to_string()
            })
        },
        &leaf.cert_pem,
        &leaf.key_pem,
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("auth-ca.pem"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("auth-key"), "k3y-from-a-file\n").unwrap();
    let yaml = |ca_file: &str| {
        format!(
            "listeners:\n  - name: pop3\n    bind: 127.0.0.1:0\n    tls: none\ntenants:\n  acme:\n    \
             domains: [example.com]\n    plaintext_login: allow\n    auth_http:\n      \
             url: \"https://127.0.0.1:{}/auth?tenant=acme\"\n      ca: {ca_file}\n      headers:\n        \
             - {{name: X-Auth-Key, value_file: auth-key}}\n        - {{name: X-Popgate, value: \"1\"}}\n",
            service.addr.port()
        )
    };
    let config = popgate::Config::from_yaml_str(&yaml("auth-ca.pem"), dir.path()).unwrap();
    let pg = popgate::start(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    assert!(
        pg.runtime().is_ready(),
        "an auth_http tenant has no store to wait for"
    );
    let mut c = support::pop3::Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
    c.ok("USER john@example.com").await;
    let refused = c.cmd("PASS wrong").await;
    assert!(refused.starts_with("-ERR"), "{refused}");
    c.ok("USER john@example.com").await;
    c.ok("PASS pw").await;
    assert!(c.ok("STAT").await.starts_with("+OK 1 "));
    c.ok("QUIT").await;
    let expected = |pass: &str, attempt: u32| {
        format!(
            "GET /auth?tenant=acme HTTP/1.0\r\n\
             Host: 127.0.0.1\r\n\
             Auth-Method: plain\r\n\
             Auth-User: john@example.com\r\n\
             Auth-Pass: {pass}\r\n\
             Auth-Protocol: pop3\r\n\
             Auth-Login-Attempt: {attempt}\r\n\
             Client-IP: 127.0.0.1\r\n\
             X-Auth-Key: k3y-from-a-file\r\n\
             X-Popgate: 1\r\n\
             \r\n"
        )
    };
    assert_eq!(service.requests(), 2);
    assert_eq!(
        String::from_utf8_lossy(&service.head(0)),
        expected("wrong", 1)
    );
    assert_eq!(String::from_utf8_lossy(&service.head(1)), expected("pw", 2));
    pg.shutdown();

    // Checked against the CA: a service whose certificate another CA signed is not asked at all.
    std::fs::write(
        dir.path().join("other-ca.pem"),
        support::pki::TestCa::new("other").cert_pem(),
    )
    .unwrap();
    let config = popgate::Config::from_yaml_str(&yaml("other-ca.pem"), dir.path()).unwrap();
    let pg = popgate::start(config, tokio_util::sync::CancellationToken::new())
        .await
        .unwrap();
    let mut c = support::pop3::Pop3::greeted(pg.local_addr("pop3").unwrap()).await;
    c.ok("USER john@example.com").await;
    let answer = c.cmd("PASS pw").await;
    assert!(answer.starts_with("-ERR [SYS/TEMP]"), "{answer}");
    assert_eq!(
        service.requests(),
        2,
        "a request went to an unverified service"
    );
    pg.shutdown();
}
