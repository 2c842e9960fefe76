//! The one place that sees every stage of a session and composes them:
//! client TLS → AUTHORIZATION ([`session`](crate::session)) → route ([`router`](crate::router)) →
//! store login ([`upstream`](crate::upstream)) → [`relay`](crate::relay).
//!
//! Each stage returns a value; none calls back up. A refused store login goes back to the session,
//! which stays in AUTHORIZATION so the client can try again.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{Config, ListenerTls, PlaintextLogin};
use crate::relay::{RelayConfig, relay};
use crate::router::{TenantId, TenantTable};
use crate::session::driver::StartTls;
use crate::session::state::Limits;
use crate::session::{Authorization, ClientSession, SessionEnd, Transport};
use crate::stream::Stream;
use crate::tls::SniResolver;
use crate::upstream::{BackendGroup, BackendTimeouts, LoginError, backend};

/// What every session of one config snapshot shares.
#[derive(Debug)]
pub struct Shared {
    /// The validated config.
    pub config: Arc<Config>,
    /// Domain → tenant.
    pub table: TenantTable,
    /// Per tenant, indexed like `table.tenants()`.
    pub tenants: Vec<TenantRuntime>,
    /// TLS for the client leg, when any listener uses it.
    pub tls: Option<(Arc<rustls::ServerConfig>, Arc<SniResolver>)>,
    next_session: AtomicU64,
}

/// Per-tenant runtime state.
#[derive(Debug)]
pub struct TenantRuntime {
    /// The tenant's stores.
    pub group: BackendGroup,
    /// Plaintext policy.
    pub plaintext: PlaintextLogin,
}

/// A listener's facts that sessions need.
#[derive(Debug, Clone)]
pub struct ListenerInfo {
    /// Configured name.
    pub name: String,
    /// TLS mode.
    pub tls: ListenerTls,
    /// Tenant the listener is bound to.
    pub tenant: Option<TenantId>,
}

const AUTH_FAILED: &[u8] = b"-ERR [AUTH] Authentication failed.\r\n";
const STORE_UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] Mail store unavailable, try again later\r\n";

impl Shared {
    /// Builds the shared state for a validated config (loads certificates when a listener needs TLS).
    pub fn new(config: Arc<Config>) -> Result<Self, crate::tls::TlsError> {
        let table = TenantTable::new(&config);
        let tenants = config
            .tenants
            .values()
            .map(|t| TenantRuntime {
                group: BackendGroup::new(
                    t.value.backends.iter().map(|b| b.value.clone()).collect(),
                ),
                plaintext: t.value.plaintext_login,
            })
            .collect();
        let needs_tls = config
            .listeners
            .iter()
            .any(|l| l.value.tls != ListenerTls::None);
        let tls = if needs_tls {
            let resolver = Arc::new(SniResolver::from_config(&config)?);
            let server = crate::tls::server_config(resolver.clone())?;
            Some((server, resolver))
        } else {
            None
        };
        Ok(Self {
            config,
            table,
            tenants,
            tls,
            next_session: AtomicU64::new(1),
        })
    }

    /// Whether some tenant reachable through this listener allows plaintext login.
    fn plaintext_possible(&self, listener: &ListenerInfo) -> bool {
        match listener.tenant {
            Some(t) => self
                .tenants
                .get(t)
                .is_some_and(|t| t.plaintext == PlaintextLogin::Allow),
            None => self
                .tenants
                .iter()
                .any(|t| t.plaintext == PlaintextLogin::Allow),
        }
    }
}

/// Serves one accepted client connection to its end.
pub async fn serve(
    shared: Arc<Shared>,
    listener: Arc<ListenerInfo>,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    let id = shared.next_session.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("session", id, client = %peer, listener = %listener.name, tenant = tracing::field::Empty);
    async move {
        let started = Instant::now();
        let summary = run(&shared, &listener, tcp, &shutdown).await;
        let secs = started.elapsed().as_secs_f64();
        match summary {
            Summary::Relayed { tenant, backend, stats } => info!(
                tenant = %tenant,
                backend = %backend,
                bytes_in = stats.bytes_up,
                bytes_out = stats.bytes_down,
                commands = stats.commands,
                duration_s = secs,
                outcome = stats.end.as_str(),
                "session closed"
            ),
            Summary::NoLogin(end) => info!(duration_s = secs, outcome = end.as_str(), detail = %end, "session closed before login"),
        }
    }
    .instrument(span)
    .await
}

enum Summary {
    Relayed {
        tenant: String,
        backend: String,
        stats: crate::relay::RelayStats,
    },
    NoLogin(SessionEnd),
}

async fn run(
    shared: &Shared,
    listener: &ListenerInfo,
    tcp: TcpStream,
    shutdown: &CancellationToken,
) -> Summary {
    let config = &shared.config;
    let deadline = Instant::now() + config.timeouts.pre_login.get();
    let _ = tcp.set_nodelay(true);

    // Implicit TLS: handshake inside this task, under its own timeout.
    let mut sni_tenant = None;
    let stream = if listener.tls == ListenerTls::Implicit {
        let Some((server_config, resolver)) = &shared.tls else {
            return Summary::NoLogin(SessionEnd::Tls("no TLS configuration".into()));
        };
        let acceptor = TlsAcceptor::from(server_config.clone());
        let limit = config
            .timeouts
            .tls_handshake
            .get()
            .min(config.timeouts.pre_login.get());
        match timeout(limit, acceptor.accept(tcp)).await {
            Err(_) => return Summary::NoLogin(SessionEnd::Tls("handshake timed out".into())),
            Ok(Err(e)) => return Summary::NoLogin(SessionEnd::Tls(e.to_string())),
            Ok(Ok(tls)) => {
                sni_tenant = tls
                    .get_ref()
                    .1
                    .server_name()
                    .and_then(|n| resolver.tenant_for(n));
                Stream::ServerTls(Box::new(tls))
            }
        }
    } else {
        Stream::Plain(tcp)
    };
    if let Some(v) = stream.tls_version() {
        debug!(version = v, "client TLS established");
    }

    let transport = Transport {
        tls: stream.is_tls(),
        stls_offered: listener.tls == ListenerTls::Starttls && shared.tls.is_some(),
        plaintext_before_tls: shared.plaintext_possible(listener),
    };
    let limits = Limits {
        max_bad_commands: config.limits.max_bad_commands,
        max_failed_logins: config.limits.max_failed_logins,
    };
    let starttls = shared
        .tls
        .as_ref()
        .map(|(server_config, resolver)| StartTls {
            server_config: server_config.clone(),
            resolver: resolver.clone(),
            handshake_timeout: config.timeouts.tls_handshake.get(),
        });
    let mut session = ClientSession::new(
        stream,
        Authorization::new(transport, limits),
        starttls,
        deadline,
        sni_tenant,
    );
    if let Err(e) = session.greet().await {
        return Summary::NoLogin(e);
    }

    let timeouts = BackendTimeouts {
        connect: config.timeouts.backend_connect.get(),
        reply: config.timeouts.backend_reply.get(),
    };
    loop {
        let creds = tokio::select! {
            r = session.next_login() => match r {
                Ok(c) => c,
                Err(e) => return Summary::NoLogin(e),
            },
            () = shutdown.cancelled() => {
                session.shutting_down().await;
                return Summary::NoLogin(SessionEnd::Shutdown);
            }
        };
        let bound = listener.tenant.or(session.sni_tenant());
        let route = match shared.table.route(&creds.login, bound) {
            Ok(r) => r,
            Err(e) => {
                info!(mechanism = creds.mechanism.as_str(), reason = %e, "login refused: no route");
                if let Err(end) = session.reject(AUTH_FAILED.to_vec()).await {
                    return Summary::NoLogin(end);
                }
                continue;
            }
        };
        let tenant_name = &shared.table.tenants()[route.tenant].name;
        tracing::Span::current().record("tenant", tenant_name.as_str());
        let Some(tenant) = shared.tenants.get(route.tenant) else {
            return Summary::NoLogin(SessionEnd::Policy);
        };
        if !session.is_tls() && tenant.plaintext == PlaintextLogin::RequireTls {
            let msg = if transport.stls_offered {
                b"-ERR [AUTH] TLS required: use STLS before logging in\r\n".to_vec()
            } else {
                b"-ERR [AUTH] TLS required: connect to the POP3S port\r\n".to_vec()
            };
            if let Err(end) = session.reject(msg).await {
                return Summary::NoLogin(end);
            }
            continue;
        }
        let Some(addr) = tenant.group.pick() else {
            if let Err(end) = session.unavailable(STORE_UNAVAILABLE.to_vec()).await {
                return Summary::NoLogin(end);
            }
            continue;
        };
        let attempt = tokio::select! {
            r = backend::login(addr, &route.backend_user, &creds, timeouts) => r,
            () = shutdown.cancelled() => {
                session.shutting_down().await;
                return Summary::NoLogin(SessionEnd::Shutdown);
            }
        };
        let logged_in = match attempt {
            Ok(l) => l,
            Err(e) => {
                let result = match e {
                    LoginError::Rejected(line) => {
                        info!(backend = %addr, mechanism = creds.mechanism.as_str(), "login refused by store");
                        session.reject(line).await
                    }
                    LoginError::Temporary(line) => {
                        info!(backend = %addr, "store refused login for now");
                        session.unavailable(line).await
                    }
                    LoginError::Unavailable(why) => {
                        warn!(backend = %addr, reason = %why, "store unavailable");
                        session.unavailable(STORE_UNAVAILABLE.to_vec()).await
                    }
                };
                if let Err(end) = result {
                    return Summary::NoLogin(end);
                }
                continue;
            }
        };
        info!(backend = %addr, mechanism = creds.mechanism.as_str(), "logged in");
        let Some((mut client, pipelined)) = session.into_parts() else {
            return Summary::NoLogin(SessionEnd::Disconnected);
        };
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut client, &logged_in.reply).await {
            return Summary::NoLogin(SessionEnd::Io(e));
        }
        let stats = relay(
            client,
            logged_in.stream,
            pipelined,
            logged_in.leftover,
            RelayConfig {
                idle: config.timeouts.idle.get(),
                quit_drain: config.timeouts.quit_drain.get(),
            },
            shutdown.clone(),
        )
        .await;
        return Summary::Relayed {
            tenant: tenant_name.clone(),
            backend: addr.to_string(),
            stats,
        };
    }
}
