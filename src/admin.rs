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

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{
    AUTHORIZATION, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, HOST, HeaderName,
};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

use crate::config::AdminConfig;
use crate::context::{Context, MailboxMatch, ReloadRecord, SessionFilter};
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
        (&Method::GET, "/sessions") => {
            let q = query(&req);
            match session_filter(&**runtime, &q) {
                Ok(filter) => json_reply(StatusCode::OK, sessions(&**runtime, &filter, &q)),
                Err(e) => text_owned(StatusCode::BAD_REQUEST, e),
            }
        }
        (&Method::POST, "/kick") => {
            let q = query(&req);
            match session_filter(&**runtime, &q) {
                Ok(filter) if !filter.is_empty() => {
                    let here = Here(&**runtime);
                    let fleet = &runtime.context().fleet;
                    let body = fleet_reply(fleet.kick(&here, &filter).await, "kicked");
                    info!(sessions = %body["kicked"], "kicked sessions");
                    json_reply(StatusCode::OK, body)
                }
                Ok(_) => text(
                    StatusCode::BAD_REQUEST,
                    "need ?mailbox=local@domain (or a pattern with * and ?), ?tenant=, ?store= or ?network=\n",
                ),
                Err(e) => text_owned(StatusCode::BAD_REQUEST, e),
            }
        }
        (&Method::POST, "/stores/state") => {
            let q = query(&req);
            match store_request(&q) {
                Ok((store, state, weight)) => {
                    let here = Here(&**runtime);
                    let fleet = &runtime.context().fleet;
                    let result = fleet.store_control(&here, &store, state, weight).await;
                    let found = match &result {
                        Ok(r) => r.total,
                        Err((_, n)) => *n,
                    };
                    if found == 0 {
                        return text_owned(
                            StatusCode::NOT_FOUND,
                            format!("no store named {store:?} (see GET /status)\n"),
                        );
                    }
                    let mut body = fleet_reply(result, "stores");
                    body["store"] = json!(store);
                    body["state"] = json!(state);
                    body["weight"] = json!(weight);
                    json_reply(StatusCode::OK, body)
                }
                Err(e) => text_owned(StatusCode::BAD_REQUEST, e),
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
            let mut r = Response::new(Full::new(Bytes::from_static(STATUS_PAGE.as_bytes())));
            set(&mut r, CONTENT_TYPE, "text/html; charset=utf-8");
            set(&mut r, CONTENT_SECURITY_POLICY, STATUS_PAGE_CSP);
            r
        }
        (&Method::GET, "/status.js") => {
            let mut r = Response::new(Full::new(Bytes::from_static(STATUS_SCRIPT.as_bytes())));
            set(&mut r, CONTENT_TYPE, "text/javascript; charset=utf-8");
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// This replica, as the fleet's commands reach it.
struct Here<'a, R>(&'a R);

impl<R: Control> crate::cluster::FleetCommands for Here<'_, R> {
    fn kick(&self, matches: &dyn Fn(&crate::context::SessionFacts<'_>) -> bool) -> usize {
        self.0.context().sessions.kick_where(matches)
    }

    fn flush_auth_cache(&self) -> usize {
        self.0.flush_auth_cache()
    }

    fn store_control(&self, store: &str, state: Option<&str>, weight: Option<u32>) -> usize {
        self.0.context().control_store(store, state, weight)
    }
}

/// The request's query as decoded pairs (a key given twice: the last wins).
fn query<B>(req: &Request<B>) -> HashMap<String, String> {
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (percent_decode(k), percent_decode(v)))
        .collect()
}

/// `tenant`, `store`, `mailbox` (exact, keyed as a login is, or a pattern with `*` and `?`) and `network`
/// (an address or CIDR) from the query; empty values count as absent.
fn session_filter<R: Control>(
    runtime: &R,
    q: &HashMap<String, String>,
) -> Result<SessionFilter, String> {
    let given = |k: &str| q.get(k).filter(|v| !v.is_empty()).cloned();
    let network = match given("network") {
        None => None,
        Some(n) => Some(
            n.parse::<ipnet::IpNet>()
                .or_else(|_| n.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| format!("network {n:?} is not an address or a CIDR network\n"))?,
        ),
    };
    let mailbox = given("mailbox").map(|m| {
        // Keyed as a login is (SDPS forms, IDNA domain, case rule, NFC), so any way the user could have
        // typed the name finds the sessions; a name that no longer routes (its tenant was removed by a
        // reload) is compared as given, ignoring case.
        MailboxMatch::parse(&m, |m| {
            runtime.snapshot().table.route(m, None).ok().map(|r| r.key)
        })
    });
    Ok(SessionFilter {
        tenant: given("tenant"),
        store: given("store"),
        mailbox,
        network,
    })
}

/// Most sessions one `GET /sessions` page holds.
const MAX_PAGE: usize = 1000;

/// A page of sessions: `offset` (default 0) and `limit` (default and most 1000), oldest first.
fn sessions<R: Control>(
    runtime: &R,
    filter: &SessionFilter,
    q: &HashMap<String, String>,
) -> serde_json::Value {
    let number = |k: &str, default: usize| {
        q.get(k)
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or(default)
    };
    let offset = number("offset", 0);
    let limit = number("limit", MAX_PAGE).clamp(1, MAX_PAGE);
    let all = runtime.context().sessions.list(filter);
    let now = SystemTime::now();
    let page: Vec<serde_json::Value> = all
        .iter()
        .skip(offset)
        .take(limit)
        .map(|(id, e)| {
            let since = e
                .since
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            json!({
                "id": id,
                "tenant": e.tenant,
                "mailbox": e.mailbox,
                "store": e.store,
                "client": e.client.ip().to_string(),
                "listener": e.listener,
                "since": since,
                "age_seconds": now.duration_since(e.since).map_or(0, |d| d.as_secs()),
            })
        })
        .collect();
    json!({
        "total": all.len(),
        "offset": offset,
        "limit": limit,
        "sessions": page,
        "complete": true,
        "note": "this replica's sessions only",
    })
}

/// `store`, `state` (`ready`, `drain`, `maint`) and `weight` (0: back to the configured weights) from
/// the query: a store and at least one of the others.
fn store_request(
    q: &HashMap<String, String>,
) -> Result<(String, Option<&'static str>, Option<u32>), String> {
    let store = q
        .get("store")
        .filter(|s| !s.is_empty())
        .ok_or("need ?store=<label from GET /status>\n")?;
    let state = match q.get("state").filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(
            crate::store::registry::StoreState::parse(s)
                .ok_or_else(|| format!("state {s:?}: use ready, drain or maint\n"))?
                .as_str(),
        ),
    };
    let weight = match q.get("weight").filter(|s| !s.is_empty()) {
        None => None,
        Some(w) => Some(
            w.parse::<u32>()
                .ok()
                .filter(|w| *w <= 1000)
                .ok_or_else(|| format!("weight {w:?}: a number from 0 (configured) to 1000\n"))?,
        ),
    };
    if state.is_none() && weight.is_none() {
        return Err("need ?state=ready|drain|maint and/or ?weight=N\n".into());
    }
    Ok((store.clone(), state, weight))
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
            && !matches!(path, "/livez" | "/readyz" | "/" | "/status.js")
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

fn text_owned(status: StatusCode, body: String) -> Reply {
    text_body(status, Bytes::from(body))
}

fn text(status: StatusCode, body: &'static str) -> Reply {
    text_body(status, Bytes::from_static(body.as_bytes()))
}

fn text_body(status: StatusCode, body: Bytes) -> Reply {
    let mut r = Response::new(Full::new(body));
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
    let logins = runtime.context().metrics.logins_by_tenant();
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
                "logins": logins.get(name.as_str()).cloned().unwrap_or_default(),
                "domains": cfg.value.domains.iter().map(|d| d.value.clone()).collect::<Vec<_>>(),
                "balance": crate::store::group::policy_name(cfg.value.balance),
                "sessions": per_tenant.get(name).copied().unwrap_or(0),
                "all_down_logins": rt.group.all_down_count(),
                "placement": rt.placement.as_ref().map(|p| p.status()),
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
    let ctx = runtime.context();
    // Which tenants list each store, from one pass over the tenants.
    let mut tenants_of: HashMap<String, Vec<String>> = HashMap::new();
    for id in shared.table.ids() {
        let Some(t) = shared.tenant(id) else { continue };
        for s in t.group.status() {
            tenants_of
                .entry(s.id)
                .or_default()
                .push(shared.table.tenant(id).name.clone());
        }
    }
    let stores: Vec<serde_json::Value> = ctx
        .stores
        .stores()
        .iter()
        .map(|s| {
            let (connect_p95, login_p95) = s.p95s();
            let (bytes_up, bytes_down) = s.bytes();
            let probe = s.health.last_probe();
            json!({
                "store": s.label,
                "addr": s.endpoint.addr.to_string(),
                "up": s.health.is_up(),
                "up_since": s.health.changed_at(),
                "last_probe_at": probe.map(|(at, _)| at),
                "last_probe_ok": probe.map(|(_, ok)| ok),
                "state": s.state().as_str(),
                "weight": s.weight(),
                "sessions": s.active(),
                "pool_idle": s.pool_idle(),
                "logins_in_flight": s.in_flight(),
                "connect_p95_seconds": connect_p95,
                "login_p95_seconds": login_p95,
                "bytes_to_store": bytes_up,
                "bytes_to_client": bytes_down,
                "tenants": tenants_of.get(&s.label).cloned().unwrap_or_default(),
            })
        })
        .collect();
    let certificates: Vec<serde_json::Value> = shared
        .certificates()
        .iter()
        .map(
            |c| json!({"tenant": c.tenant, "certificate": c.certificate, "not_after": c.not_after}),
        )
        .collect();
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let now = SystemTime::now();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "now": unix(now),
        "started_at": unix(ctx.started),
        "uptime_seconds": now.duration_since(ctx.started).map_or(0, |d| d.as_secs()),
        "stores": stores,
        "certificates": certificates,
        "ready": runtime.is_ready(),
        "draining": runtime.context().draining.is_cancelled(),
        "sessions": runtime.context().sessions.len(),
        "listeners": listeners,
        "tenants": tenants,
        "reloads": reloads,
        "cluster": runtime.context().fleet.status(),
    })
}

/// The status page's shell: it holds no data (its script reads `GET /status`), so it is served without
/// the token even with `token_for_reads`, and the page asks for the token when `/status` wants one.
const STATUS_PAGE: &str = include_str!("admin/status.html");
/// The status page's script.
const STATUS_SCRIPT: &str = include_str!("admin/status.js");
/// Scripts only from this server, no inline script, no framing, requests only to this server.
const STATUS_PAGE_CSP: &str = "default-src 'none'; script-src 'self'; connect-src 'self'; \
     style-src 'unsafe-inline'; form-action 'none'; frame-ancestors 'none'; base-uri 'none'";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_decoding_and_escaping() {
        assert_eq!(percent_decode("alice%40example.com"), "alice@example.com");
        assert_eq!(percent_decode("a%4"), "a%4");
    }

    #[test]
    fn store_requests_need_a_store_and_a_valid_change() {
        let q = |s: &str| -> HashMap<String, String> {
            let req = Request::builder()
                .uri(format!("/stores/state?{s}"))
                .body(())
                .unwrap_or_default();
            query(&req)
        };
        assert_eq!(
            store_request(&q("store=10.0.0.1%3A110&state=drain")),
            Ok(("10.0.0.1:110".to_string(), Some("drain"), None))
        );
        assert_eq!(
            store_request(&q("store=s&weight=0")),
            Ok(("s".to_string(), None, Some(0)))
        );
        for bad in [
            "state=drain",
            "store=s",
            "store=s&state=off",
            "store=s&weight=-1",
            "store=s&weight=1001",
            "store=&state=drain",
        ] {
            assert!(store_request(&q(bad)).is_err(), "{bad} accepted");
        }
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
