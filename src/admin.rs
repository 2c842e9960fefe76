//! The admin HTTP server, on its own bind (loopback by default): `/metrics`, `/livez`, `/readyz`, `/status`
//! (JSON), `POST /reload`, `POST /kick?mailbox=...`, and `/`, a small self-refreshing HTML status page.
//!
//! It reads the runtime's state and asks it to reload or kick; it owns no state of its own.
//!
//! # What it exposes, and to whom
//!
//! Without `admin.token` (the example config sets none) every GET endpoint answers anybody who reaches the
//! port: `/metrics` (Prometheus counters per tenant, listener and store), `/livez`, `/readyz`, `/status`
//! (JSON with tenant names, their domains, store addresses and health, session counts, listener addresses,
//! recent reload messages) and the status page `/` (the same as HTML). With a token the POST endpoints need
//! `Authorization: Bearer <token>`, and with `token_for_reads` the GET endpoints too.
//!
//! Whatever the token, two rules keep web pages out (a browser on the operator's machine can reach a
//! loopback port):
//!
//! - **Host.** The `Host` header (and the authority of an absolute-form request target), port ignored, must
//!   be an IP literal (IPv4, or IPv6 in brackets), `localhost`, or a name in `admin.hosts`, compared without
//!   case; anything else, or two `Host` headers, gets 421 before routing or the token check. A DNS-rebinding
//!   page needs a host *name* of its own, so it cannot read `/status`; probes and Prometheus send the pod IP.
//!   A request without `Host` (HTTP/1.0) is allowed: browsers always send one.
//! - **Writes.** Every request but GET and HEAD (so `POST /reload` and `POST /kick`) must carry
//!   `X-Popgate-Admin` (any value) or `Authorization: Bearer ...`, headers a page can only send cross-site
//!   after a CORS preflight, which this server never grants (it sends no CORS headers). Others get 403. Only
//!   the Bearer scheme counts: a browser may attach cached Basic credentials to a cross-site form by itself.
//!
//! Connections are bounded so the admin port cannot starve POP3 of descriptors: at most
//! `admin.max_connections` at once (past it an accepted connection is closed at once), `admin.header_timeout`
//! to send a request's headers (from connecting, and again after every response, so it also ends idle
//! keep-alive connections), and [`CONNECTION_LIFETIME`] for a connection as a whole.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE, HOST, HeaderName};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::AdminConfig;
use crate::context::{Context, ReloadRecord};
use crate::proxy::Shared;

/// What the admin server reads and asks of the running process. The process setup (`runtime`), the only
/// module that starts this server, implements it; the admin server depends on no process type.
pub trait Control: Send + Sync + 'static {
    /// Metrics, sessions, stop signals.
    fn context(&self) -> &Context;
    /// The config snapshot in force.
    fn snapshot(&self) -> Arc<Shared>;
    /// What `/readyz` answers.
    fn is_ready(&self) -> bool;
    /// Every listener's name and bound address.
    fn addrs(&self) -> Vec<(String, SocketAddr)>;
    /// Recent reloads, oldest first.
    fn reloads(&self) -> Vec<ReloadRecord>;
    /// Empties every tenant's auth_http answer cache; returns the answers dropped.
    fn flush_auth_cache(&self) -> usize;
    /// Why a reload was refused.
    type ReloadError: std::fmt::Display + Send;
    /// Re-reads the config file and swaps it in when valid.
    fn reload(
        self: Arc<Self>,
    ) -> impl std::future::Future<Output = Result<(), Self::ReloadError>> + Send;
}

/// The longest an admin connection stays open, whatever it does (a slow body, a client that does not read
/// the answer). Generous: a `POST /reload` waits for any reload already running and then for its own.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// The header that marks a write as sent by a tool rather than a web page (see the module docs).
const ADMIN_HEADER: HeaderName = HeaderName::from_static("x-popgate-admin");

type Reply = Response<Full<Bytes>>;

/// Binds the admin server and serves it until the runtime stops. Returns the bound address.
pub async fn spawn<R: Control>(
    runtime: Arc<R>,
    config: &AdminConfig,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(config.bind).await?;
    let addr = listener.local_addr().unwrap_or(config.bind);
    info!(addr = %addr, "admin server listening");
    if !addr.ip().is_loopback() && config.token.is_none() {
        warn!(
            addr = %addr,
            "the admin API listens beyond loopback without a token: whoever reaches it can reload, kick \
             sessions and read the status; set admin.token_file (and token_for_reads)"
        );
    }
    let config = Arc::new(config.clone());
    let stop = runtime.context().stop.clone();
    // Its own cap, apart from POP3's: a flood here must not hold the descriptors POP3 accepts with.
    let cap = config.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let permits = Arc::new(Semaphore::new(cap));
    let header_timeout = config.header_timeout.get();
    let lifetime = CONNECTION_LIFETIME.max(header_timeout);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = tokio::select! {
                () = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        // EMFILE and friends: back off briefly instead of spinning on the error.
                        debug!(error = %e, "admin accept failed");
                        tokio::select! {
                            () = stop.cancelled() => break,
                            () = tokio::time::sleep(Duration::from_millis(50)) => {}
                        }
                        continue;
                    }
                },
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                warn!(client = %peer, max_connections = cap, "admin connection cap reached; closing");
                drop(tcp);
                continue;
            };
            let (runtime, config, stop) = (runtime.clone(), config.clone(), stop.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let service = hyper::service::service_fn(move |req| {
                    let (runtime, config) = (runtime.clone(), config.clone());
                    async move { Ok::<_, Infallible>(route(&runtime, &config, req).await) }
                });
                // hyper starts the header timer at the first read of a request head: on a fresh connection
                // (one that sends nothing at all is closed too) and after every response (keep-alive idle).
                let conn = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout)
                    .serve_connection(TokioIo::new(tcp), service);
                tokio::select! {
                    () = stop.cancelled() => {}
                    r = tokio::time::timeout(lifetime, conn) => match r {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => debug!(client = %peer, error = %e, "admin connection ended"),
                        Err(_) => debug!(client = %peer, "admin connection closed: open too long"),
                    },
                }
            });
        }
    });
    Ok(addr)
}

async fn route<R: Control>(
    runtime: &Arc<R>,
    started: &AdminConfig,
    req: Request<Incoming>,
) -> Reply {
    let write = req.method() == Method::POST;
    // The token, token_for_reads and hosts follow reloads (a rotated token file takes effect on the next
    // one); a config that drops the admin section keeps the settings the server started with.
    let (host_ok, allowed) = {
        let snapshot = runtime.snapshot();
        let config = snapshot.config.admin.as_ref().unwrap_or(started);
        (
            names_this_server(&req, &config.hosts),
            !needs_token(config, write, req.uri().path()) || authorized(config, &req),
        )
    };
    if !host_ok {
        return text(
            StatusCode::MISDIRECTED_REQUEST,
            "Host must be an IP address, localhost or a name in admin.hosts\n",
        );
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) && !sent_by_a_tool(&req) {
        return text(
            StatusCode::FORBIDDEN,
            "send the header X-Popgate-Admin (any value) or Authorization: Bearer <token> with a POST\n",
        );
    }
    if !allowed {
        // Logged and counted (never the token sent): someone without the token is trying the admin API.
        warn!(method = %req.method(), path = req.uri().path(), "admin request refused: missing or wrong bearer token");
        runtime.context().metrics.admin_auth_failed();
        return text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            // Each store once, however many tenants list it.
            for store in runtime.context().stores.stores() {
                store.refresh_gauges();
            }
            for t in &runtime.snapshot().tenants {
                t.group.refresh_gauges();
            }
            let mut r = Response::new(Full::new(Bytes::from(runtime.context().metrics.render())));
            set(&mut r, CONTENT_TYPE, "text/plain; version=0.0.4");
            r
        }
        (&Method::GET, "/livez") => text(StatusCode::OK, "ok\n"),
        (&Method::GET, "/readyz") => {
            if runtime.is_ready() {
                text(StatusCode::OK, "ready\n")
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n")
            }
        }
        (&Method::GET, "/status") => {
            let mut r = Response::new(Full::new(Bytes::from(status(&**runtime).to_string())));
            set(&mut r, CONTENT_TYPE, "application/json");
            r
        }
        (&Method::POST, "/reload") => {
            // In a task of its own: a client that hangs up, or the connection lifetime, must not cancel a
            // reload half done.
            let reload = tokio::spawn({
                let runtime = runtime.clone();
                async move { runtime.reload().await }
            });
            match reload.await {
                Ok(Ok(())) => json_reply(StatusCode::OK, json!({"ok": true})),
                Ok(Err(e)) => json_reply(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!({"ok": false, "error": e.to_string()}),
                ),
                Err(e) => json_reply(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    json!({"ok": false, "error": format!("the reload failed: {e}")}),
                ),
            }
        }
        (&Method::POST, "/kick") => {
            let mailbox = req.uri().query().and_then(|q| {
                q.split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .find(|(k, _)| *k == "mailbox")
                    .map(|(_, v)| percent_decode(v))
            });
            match mailbox {
                Some(m) if !m.is_empty() => {
                    // Keyed as a login is (SDPS forms, IDNA domain, case rule, NFC), so any way the user
                    // could have typed the name finds the sessions; a name that no longer routes (its
                    // tenant was removed by a reload) is compared as given.
                    let key = runtime.snapshot().table.route(&m, None).map(|r| r.key);
                    let (name, fold) = match &key {
                        Ok(key) => (key.as_str(), false),
                        Err(_) => (m.as_str(), true),
                    };
                    let here = Here(&**runtime);
                    let fleet = &runtime.context().fleet;
                    let body = fleet_reply(fleet.kick(&here, name, fold).await, "kicked");
                    info!(sessions = %body["kicked"], "kicked a mailbox's sessions");
                    json_reply(StatusCode::OK, body)
                }
                _ => text(StatusCode::BAD_REQUEST, "need ?mailbox=local@domain\n"),
            }
        }
        (&Method::POST, "/auth-cache/flush") => {
            let here = Here(&**runtime);
            let fleet = &runtime.context().fleet;
            let body = fleet_reply(fleet.flush_auth_cache(&here).await, "flushed");
            info!(answers = %body["flushed"], "flushed the auth_http answer caches");
            json_reply(StatusCode::OK, body)
        }
        (&Method::GET, "/") => {
            let mut r = Response::new(Full::new(Bytes::from(html(&**runtime))));
            set(&mut r, CONTENT_TYPE, "text/html; charset=utf-8");
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// This replica, as the fleet's commands reach it.
struct Here<'a, R>(&'a R);

impl<R: Control> crate::cluster::FleetCommands for Here<'_, R> {
    fn kick(&self, matches: &dyn Fn(&str) -> bool) -> usize {
        self.0.context().sessions.kick_where(matches)
    }

    fn flush_auth_cache(&self) -> usize {
        self.0.flush_auth_cache()
    }
}

/// A fleet command's answer: `{<what>: total, replicas_answered, replicas_expected}`, or when the shared
/// state could not be asked, this replica's count and `"complete": false` (off: `{<what>: count}`, this
/// replica being the fleet).
fn fleet_reply(
    result: Result<crate::cluster::FleetResult, (crate::cluster::Unavailable, usize)>,
    what: &str,
) -> serde_json::Value {
    match result {
        Ok(r) => json!({
            what: r.total,
            "replicas_answered": r.replicas_answered,
            "replicas_expected": r.replicas_expected,
            "complete": r.replicas_answered >= r.replicas_expected,
        }),
        // Without `cluster:` the answer is what it always was.
        Err((crate::cluster::Unavailable::Off, n)) => json!({ what: n }),
        Err((crate::cluster::Unavailable::Degraded, n)) => json!({
            what: n, "replicas_answered": 1, "complete": false,
            "error": "shared state unavailable: only this replica was reached",
        }),
    }
}

/// Whether a request needs the token (when one is set): every write; with `token_for_reads` every read
/// too, except the probes' `/livez` and `/readyz` (a kubelet sends no token, and a replica restarted for
/// lack of one helps nobody) and, with `metrics_without_token`, `/metrics`.
fn needs_token(config: &AdminConfig, write: bool, path: &str) -> bool {
    write
        || (config.token_for_reads
            && !matches!(path, "/livez" | "/readyz")
            && !(config.metrics_without_token && path == "/metrics"))
}

fn authorized(config: &AdminConfig, req: &Request<Incoming>) -> bool {
    let Some(token) = &config.token else {
        return true;
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    token.matches(presented.as_bytes())
}

/// Whether the request names this server: every `Host` (at most one) and an absolute-form target's authority
/// is an IP literal, `localhost` or one of `extra`. No `Host` at all (HTTP/1.0) passes.
fn names_this_server<B>(req: &Request<B>, extra: &[String]) -> bool {
    let mut hosts = req.headers().get_all(HOST).iter();
    let header_ok = match (hosts.next(), hosts.next()) {
        (None, _) => true,
        (Some(v), None) => v.to_str().is_ok_and(|v| host_allowed(v, extra)),
        (Some(_), Some(_)) => false,
    };
    header_ok
        && req
            .uri()
            .authority()
            .is_none_or(|a| host_allowed(a.as_str(), extra))
}

/// Whether a `Host` value (`name`, `name:port`, `192.0.2.1:port`, `[2001:db8::1]:port`) is allowed.
fn host_allowed(value: &str, extra: &[String]) -> bool {
    let port_ok = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split_once(']').is_some_and(|(ip, after)| {
            ip.parse::<Ipv6Addr>().is_ok()
                && (after.is_empty() || after.strip_prefix(':').is_some_and(port_ok))
        });
    }
    let (host, port) = value.rsplit_once(':').unwrap_or((value, ""));
    if host.is_empty() || host.contains(':') || !port_ok(port) {
        return false;
    }
    if host.parse::<Ipv4Addr>().is_ok() {
        return true;
    }
    // Lowercased and IDNA-normalised, a trailing dot dropped, on both sides.
    let Some(name) = crate::router::normalize_domain(host) else {
        return false;
    };
    name == "localhost"
        || extra
            .iter()
            .any(|h| crate::router::normalize_domain(h).is_some_and(|h| h == name))
}

/// Whether a write carries a header a web page cannot send cross-site without a CORS preflight:
/// `X-Popgate-Admin`, or `Authorization` with the Bearer scheme (browsers attach cached Basic credentials
/// to cross-site forms themselves, never a Bearer token).
fn sent_by_a_tool<B>(req: &Request<B>) -> bool {
    req.headers().contains_key(ADMIN_HEADER)
        || req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.as_bytes().get(..7))
            .is_some_and(|scheme| scheme.eq_ignore_ascii_case(b"bearer "))
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn set(r: &mut Reply, name: hyper::header::HeaderName, value: &'static str) {
    r.headers_mut()
        .insert(name, hyper::header::HeaderValue::from_static(value));
    r.headers_mut().insert(
        CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    set(&mut r, CONTENT_TYPE, "text/plain; charset=utf-8");
    r
}

fn json_reply(status: StatusCode, body: serde_json::Value) -> Reply {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    set(&mut r, CONTENT_TYPE, "application/json");
    r
}

/// Everything an operator wants at a glance, as JSON.
pub fn status<R: Control>(runtime: &R) -> serde_json::Value {
    let shared = runtime.snapshot();
    let per_tenant = runtime.context().sessions.per_tenant();
    // Each tenant by its id: its name from the table, its settings and state looked up with it.
    let tenants: Vec<serde_json::Value> = shared
        .table
        .ids()
        .filter_map(|id| {
            let name = &shared.table.tenant(id).name;
            Some((name, shared.config.tenants.get(name)?, shared.tenant(id)?))
        })
        .map(|(name, cfg, rt)| {
            let stores: Vec<serde_json::Value> = rt
                .group
                .status()
                .into_iter()
                .map(|s| {
                    json!({"id": s.id, "addr": s.addr.to_string(), "up": s.up, "sessions": s.active,
                           "pool_idle": s.pool_idle})
                })
                .collect();
            json!({
                "name": name,
                "domains": cfg.value.domains.iter().map(|d| d.value.clone()).collect::<Vec<_>>(),
                "balance": crate::store::group::policy_name(cfg.value.balance),
                "sessions": per_tenant.get(name).copied().unwrap_or(0),
                "all_down_logins": rt.group.all_down_count(),
                "stores": stores,
            })
        })
        .collect();
    let listeners: Vec<serde_json::Value> = runtime
        .addrs()
        .into_iter()
        .map(|(name, addr)| {
            let tls = shared
                .listeners
                .get(&name)
                .map(|l| format!("{:?}", l.tls).to_lowercase());
            json!({"name": name, "addr": addr.to_string(), "tls": tls})
        })
        .collect();
    let reloads: Vec<serde_json::Value> = runtime
        .reloads()
        .into_iter()
        .map(|r| {
            let at =
                r.at.duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
            json!({"at_unix": at, "ok": r.ok, "message": r.message})
        })
        .collect();
    json!({
        "ready": runtime.is_ready(),
        "draining": runtime.context().draining.is_cancelled(),
        "sessions": runtime.context().sessions.len(),
        "listeners": listeners,
        "tenants": tenants,
        "reloads": reloads,
        "cluster": runtime.context().fleet.status(),
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A small status page in the spirit of HAProxy's: no scripts, no external assets, refreshes itself.
fn html<R: Control>(runtime: &R) -> String {
    let st = status(runtime);
    let mut h = String::from(
        "<!doctype html><html><head><meta charset=\"utf-8\"><meta http-equiv=\"refresh\" content=\"5\">\
         <title>popgate status</title><style>\
         body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}\
         table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}\
         th{background:#eee}.up{background:#d7f5d7}.down{background:#f8d0d0}h2{margin-bottom:.2em}\
         </style></head><body><h1>popgate</h1>",
    );
    let ready = st["ready"].as_bool().unwrap_or(false);
    let _ = write!(
        h,
        "<p id=\"summary\">state: <b class=\"{}\">{}</b> &middot; sessions: <b id=\"sessions\">{}</b></p>",
        if ready { "up" } else { "down" },
        if st["draining"].as_bool().unwrap_or(false) {
            "draining"
        } else if ready {
            "ready"
        } else {
            "not ready"
        },
        st["sessions"]
    );
    h.push_str("<h2>Listeners</h2><table><tr><th>name</th><th>address</th><th>TLS</th></tr>");
    for l in st["listeners"].as_array().into_iter().flatten() {
        let _ = write!(
            h,
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(l["name"].as_str().unwrap_or("")),
            esc(l["addr"].as_str().unwrap_or("")),
            esc(l["tls"].as_str().unwrap_or(""))
        );
    }
    h.push_str("</table><h2>Tenants</h2>");
    for t in st["tenants"].as_array().into_iter().flatten() {
        let name = esc(t["name"].as_str().unwrap_or(""));
        let domains: Vec<String> = t["domains"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|d| d.as_str().map(esc))
            .collect();
        let _ = write!(
            h,
            "<h3 class=\"tenant\" id=\"tenant-{name}\">{name}</h3><p>domains: {} &middot; balance: {} &middot; sessions: {}</p>\
             <table><tr><th>store</th><th>address</th><th>health</th><th>sessions</th><th>pool idle</th></tr>",
            domains.join(", "),
            esc(t["balance"].as_str().unwrap_or("")),
            t["sessions"]
        );
        for s in t["stores"].as_array().into_iter().flatten() {
            let up = s["up"].as_bool().unwrap_or(false);
            let _ = write!(
                h,
                "<tr class=\"store {}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                if up { "up" } else { "down" },
                esc(s["id"].as_str().unwrap_or("")),
                esc(s["addr"].as_str().unwrap_or("")),
                if up { "UP" } else { "DOWN" },
                s["sessions"],
                s["pool_idle"]
            );
        }
        h.push_str("</table>");
    }
    h.push_str("<h2>Recent reloads</h2><table><tr><th>time (unix)</th><th>result</th><th>message</th></tr>");
    for r in st["reloads"].as_array().into_iter().flatten().rev() {
        let ok = r["ok"].as_bool().unwrap_or(false);
        let _ = write!(
            h,
            "<tr class=\"{}\"><td>{}</td><td>{}</td><td>{}</td></tr>",
            if ok { "up" } else { "down" },
            r["at_unix"],
            if ok { "ok" } else { "refused" },
            esc(r["message"].as_str().unwrap_or(""))
        );
    }
    h.push_str("</table><p><a href=\"/metrics\">metrics</a> &middot; <a href=\"/status\">status JSON</a></p></body></html>");
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding_and_escaping() {
        assert_eq!(percent_decode("alice%40example.com"), "alice@example.com");
        assert_eq!(percent_decode("a%4"), "a%4");
        assert_eq!(esc("<b>&\""), "&lt;b&gt;&amp;&quot;");
    }

    #[test]
    fn host_must_be_an_ip_localhost_or_a_configured_name() {
        let extra = vec!["popgate-admin.mail.svc".to_string()];
        for ok in [
            "127.0.0.1",
            "127.0.0.1:9110",
            "10.1.2.3:9110",
            "[::1]",
            "[::1]:9110",
            "[2001:db8::7]:80",
            "localhost",
            "LocalHost:9110",
            "localhost.",
            "popgate-admin.mail.svc",
            "POPGATE-ADMIN.Mail.Svc:9110",
        ] {
            assert!(host_allowed(ok, &extra), "{ok} refused");
        }
        for bad in [
            "",
            ":9110",
            "evil.example",
            "evil.example:9110",
            "localhost.evil.example",
            "127.0.0.1.evil.example",
            "popgate-admin.mail.svc.evil.example",
            "::1",
            "[::1",
            "[::1]x",
            "[evil.example]",
            "127.0.0.1:x",
            "user@127.0.0.1",
            "local host",
        ] {
            assert!(!host_allowed(bad, &extra), "{bad:?} accepted");
        }
        assert!(!host_allowed("popgate-admin.mail.svc", &[]));
    }

    #[test]
    fn host_header_and_target_authority_are_both_checked() {
        let req = |target: &str, hosts: &[&str]| {
            let mut b = Request::builder().uri(target);
            for h in hosts {
                b = b.header(HOST, *h);
            }
            b.body(()).map(|r| names_this_server(&r, &[]))
        };
        assert_eq!(req("/status", &["127.0.0.1:9110"]).ok(), Some(true));
        assert_eq!(req("/status", &[]).ok(), Some(true), "HTTP/1.0, no Host");
        assert_eq!(req("/status", &["evil.example"]).ok(), Some(false));
        assert_eq!(
            req("/status", &["127.0.0.1", "evil.example"]).ok(),
            Some(false),
            "two Host headers"
        );
        assert_eq!(
            req("http://evil.example/status", &["127.0.0.1"]).ok(),
            Some(false),
            "an absolute-form target names the host"
        );
        assert_eq!(
            req("http://localhost:9110/status", &["localhost:9110"]).ok(),
            Some(true)
        );
    }

    #[test]
    fn writes_need_a_header_a_page_cannot_send() {
        let sent = |name: &str, value: &str| {
            Request::builder()
                .method(Method::POST)
                .header(name, value)
                .body(())
                .map(|r| sent_by_a_tool(&r))
                .ok()
        };
        assert_eq!(sent("X-Popgate-Admin", "1"), Some(true));
        assert_eq!(sent("x-popgate-admin", ""), Some(true));
        assert_eq!(sent("Authorization", "Bearer t0ken"), Some(true));
        assert_eq!(sent("Authorization", "bearer t0ken"), Some(true));
        assert_eq!(sent("Authorization", "Basic dTpw"), Some(false));
        assert_eq!(
            sent("Content-Type", "application/x-www-form-urlencoded"),
            Some(false)
        );
    }
}
