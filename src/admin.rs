//! The admin HTTP server, on its own bind (loopback by default): `/metrics`, `/livez`, `/readyz`, `/status`
//! (JSON), `POST /reload`, `POST /kick?mailbox=...`, and `/`, a small self-refreshing HTML status page.
//!
//! It reads the runtime's state and asks it to reload or kick; it owns no state of its own.

use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::UNIX_EPOCH;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::header::{AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::TcpListener;
use tracing::{debug, info};

use crate::config::AdminConfig;
use crate::runtime::{Runtime, StartError};

type Reply = Response<Full<Bytes>>;

/// Binds the admin server and serves it until the runtime stops. Returns the bound address.
pub async fn spawn(runtime: Arc<Runtime>, config: &AdminConfig) -> Result<SocketAddr, StartError> {
    let listener = TcpListener::bind(config.bind)
        .await
        .map_err(|source| StartError::Admin {
            addr: config.bind,
            source,
        })?;
    let addr = listener.local_addr().unwrap_or(config.bind);
    info!(addr = %addr, "admin server listening");
    let config = Arc::new(config.clone());
    let stop = runtime.context.stop.clone();
    tokio::spawn(async move {
        loop {
            let (tcp, _) = tokio::select! {
                () = stop.cancelled() => break,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        debug!(error = %e, "admin accept failed");
                        continue;
                    }
                },
            };
            let (runtime, config) = (runtime.clone(), config.clone());
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| {
                    let (runtime, config) = (runtime.clone(), config.clone());
                    async move { Ok::<_, Infallible>(route(&runtime, &config, req).await) }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

async fn route(runtime: &Arc<Runtime>, started: &AdminConfig, req: Request<Incoming>) -> Reply {
    let write = req.method() == Method::POST;
    // The token and token_for_reads follow reloads (a rotated token file takes effect on the next one); a
    // config that drops the admin section keeps the settings the server started with.
    let allowed = {
        let snapshot = runtime.snapshot();
        let config = snapshot.config.admin.as_ref().unwrap_or(started);
        !(write || config.token_for_reads) || authorized(config, &req)
    };
    if !allowed {
        return text(StatusCode::UNAUTHORIZED, "missing or wrong bearer token\n");
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => {
            for t in &runtime.snapshot().tenants {
                t.group.refresh_gauges();
            }
            let mut r = Response::new(Full::new(Bytes::from(runtime.context.metrics.render())));
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
            let mut r = Response::new(Full::new(Bytes::from(status(runtime).to_string())));
            set(&mut r, CONTENT_TYPE, "application/json");
            r
        }
        (&Method::POST, "/reload") => match runtime.reload().await {
            Ok(()) => json_reply(StatusCode::OK, json!({"ok": true})),
            Err(e) => json_reply(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!({"ok": false, "error": e}),
            ),
        },
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
                    let kicked = match &key {
                        Ok(key) => runtime.context.sessions.kick(key, true),
                        Err(_) => runtime.context.sessions.kick(&m, false),
                    };
                    info!(sessions = kicked, "kicked a mailbox's sessions");
                    json_reply(StatusCode::OK, json!({"kicked": kicked}))
                }
                _ => text(StatusCode::BAD_REQUEST, "need ?mailbox=local@domain\n"),
            }
        }
        (&Method::GET, "/") => {
            let mut r = Response::new(Full::new(Bytes::from(html(runtime))));
            set(&mut r, CONTENT_TYPE, "text/html; charset=utf-8");
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
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
pub fn status(runtime: &Runtime) -> serde_json::Value {
    let shared = runtime.snapshot();
    let per_tenant = runtime.context.sessions.per_tenant();
    let tenants: Vec<serde_json::Value> = shared
        .config
        .tenants
        .iter()
        .zip(&shared.tenants)
        .map(|((name, cfg), rt)| {
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
                "balance": crate::upstream::group::policy_name(cfg.value.balance),
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
        "draining": runtime.context.draining.is_cancelled(),
        "sessions": runtime.context.sessions.len(),
        "listeners": listeners,
        "tenants": tenants,
        "reloads": reloads,
    })
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A small status page in the spirit of HAProxy's: no scripts, no external assets, refreshes itself.
fn html(runtime: &Runtime) -> String {
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
}
