//! The one place that sees every stage of a session and composes them:
//! client TLS → AUTHORIZATION ([`session`](crate::session)) → route ([`router`](crate::router)) →
//! store login ([`upstream`](crate::upstream)) → [`relay`](crate::relay).
//!
//! Each stage returns a value; none calls back up. A refused store login goes back to the session,
//! which stays in AUTHORIZATION so the client can try again.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::{BackendLogin, ClientIpForwarding, Config, ListenerTls, PlaintextLogin};
use crate::metrics::TenantMetrics;
use crate::relay::{RelayConfig, RelayStats, relay};
use crate::router::{TenantId, TenantTable};
use crate::runtime::Registered;
use crate::runtime::{Context, SessionEntry};
use crate::secret::Secret;
use crate::session::driver::StartTls;
use crate::session::state::Limits;
use crate::session::{Authorization, ClientSession, SessionEnd, Transport};
use crate::session::{Credentials, Mechanism, Offer};
use crate::stream::Stream;
use crate::throttle::{Failure, MailboxGuard, Verdict};
use crate::tls::SniResolver;
use crate::upstream::backend::{ClientInfo, Connector};
use crate::upstream::backend::{Prepared, StoreAuth};
use crate::upstream::dns::{Discovery, DnsSettings};
use crate::upstream::group::ActiveSession;
use crate::upstream::group::{GroupError, StoreGroup};
use crate::upstream::{BackendTimeouts, LoginError};

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
    /// Listener facts by name.
    pub listeners: HashMap<String, Arc<ListenerInfo>>,
    /// What a connection not bound to one tenant can offer (every tenant can log in on it).
    unbound: Reach,
    /// Some tenant sends PROXY headers to its stores, which name the address the client connected to:
    /// only then is it asked of the socket (`getsockname(2)`) on every connection.
    proxy_headers_out: bool,
}

/// What a connection can offer, given which tenants can log in on it. Computed once per config
/// snapshot, so accepting a connection costs the same with one tenant or ten thousand.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// Mechanisms some of the tenants accept, sorted, without repeats.
    mechanisms: Vec<Mechanism>,
    /// Some tenant checks APOP/CRAM-MD5 itself (secrets): the greeting carries popgate's own timestamp.
    own_challenge: bool,
    /// The LOGIN-DELAY capability to announce.
    login_delay: Option<(u64, bool)>,
    /// Some tenant allows plaintext logins.
    plaintext: bool,
    /// Some tenant requires TLS before a login: on a plain connection, names that route nowhere are then
    /// answered as that tenant's are, so the answer does not tell hosted domains from unknown ones.
    tls_required: bool,
}

impl Reach {
    fn of<'a>(tenants: impl Iterator<Item = &'a TenantRuntime> + Clone) -> Self {
        let mut mechanisms: Vec<Mechanism> = tenants
            .clone()
            .flat_map(|t| t.mechanisms.iter().copied())
            .collect();
        mechanisms.sort();
        mechanisms.dedup();
        let secs = |t: &TenantRuntime| t.min_login_interval.map_or(0, |d| d.as_secs());
        let longest = tenants.clone().map(secs).max().unwrap_or(0);
        let shortest = tenants.clone().map(secs).min().unwrap_or(0);
        Self {
            mechanisms,
            own_challenge: tenants.clone().any(|t| {
                t.secrets.is_some()
                    && t.mechanisms
                        .iter()
                        .any(|m| matches!(m, Mechanism::Apop | Mechanism::CramMd5))
            }),
            // RFC 2449 §6.8: the tenants' interval when they agree, else the shortest with USER (it
            // varies by user); nothing when no tenant has one.
            login_delay: (longest > 0).then_some((shortest, shortest != longest)),
            plaintext: tenants
                .clone()
                .any(|t| t.plaintext == PlaintextLogin::Allow),
            tls_required: tenants
                .clone()
                .any(|t| t.plaintext == PlaintextLogin::RequireTls),
        }
    }
}

/// Per-tenant runtime state.
#[derive(Debug)]
pub struct TenantRuntime {
    /// The tenant's stores.
    pub group: Arc<StoreGroup>,
    /// Plaintext policy.
    pub plaintext: PlaintextLogin,
    /// Mechanisms the tenant accepts.
    pub mechanisms: Vec<Mechanism>,
    /// `mailbox → secret`, when the tenant has a secrets source.
    pub secrets: Option<HashMap<String, Secret>>,
    /// How popgate logs in to the tenant's stores.
    pub backend_login: BackendLogin,
    /// The tenant's nginx-style auth service, when it has one.
    pub auth_http: Option<Arc<crate::authhttp::AuthHttp>>,
    /// Logged-in sessions at once; 0 for no cap.
    pub max_sessions: usize,
    /// Minimum time between two logins of one mailbox (`-ERR [LOGIN-DELAY]`).
    pub min_login_interval: Option<std::time::Duration>,
    /// APOP passthrough, when the tenant turned it on: the cap on store connections held for greetings.
    pub passthrough: Option<Arc<crate::throttle::HeldCap>>,
    /// What a connection bound to this tenant alone can offer.
    reach: Reach,
}

/// Why the shared state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Certificates or CA bundles.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The DNS resolver.
    #[error("DNS: {0}")]
    Dns(#[from] crate::upstream::dns::DnsError),
    /// A secrets file.
    #[error("secrets: {0}")]
    Secrets(String),
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
    /// When set, a PROXY header is required, and only from these networks.
    pub proxy_from: Option<Vec<ipnet::IpNet>>,
}

const AUTH_FAILED: &[u8] = b"-ERR [AUTH] Authentication failed.\r\n";
const LOCKED_OUT: &[u8] = b"-ERR [AUTH] Too many failed logins; try again later\r\n";
const IN_USE: &[u8] = b"-ERR [IN-USE] Too many sessions for this mailbox\r\n";
const TENANT_FULL: &[u8] =
    b"-ERR [SYS/TEMP] Too many sessions for this domain, try again later\r\n";

/// Records a failed login with the edge defences; waits the growing delay before the `-ERR` goes out (slows
/// password guessing without holding a store connection), and turns the reply into a lockout notice once
/// the threshold is reached.
async fn throttle_failure(
    ctx: &Context,
    tenant: &str,
    ip: std::net::IpAddr,
    failure: Failure<'_>,
    reply: Vec<u8>,
) -> Vec<u8> {
    match ctx.throttle.failed(ip, failure) {
        crate::throttle::Verdict::Allow => reply,
        crate::throttle::Verdict::Delay(d) => {
            ctx.metrics.throttled(tenant, "failed_login_delay");
            tokio::select! {
                () = tokio::time::sleep(d) => {}
                () = ctx.draining.cancelled() => {}
            }
            reply
        }
        crate::throttle::Verdict::LockedOut { .. } => {
            ctx.metrics.throttled(tenant, "lockout");
            LOCKED_OUT.to_vec()
        }
    }
}

/// Waits about as long as the stores take to refuse a login, before a refusal popgate decided without
/// asking one (an unknown domain, a malformed name, a digest that does not match): the answer then takes
/// the same time as a wrong password would, so hosted domains cannot be told apart by timing.
async fn like_a_store_refusal(ctx: &Context, session: u64) {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let jitter = xxhash_rust::xxh3::xxh3_64(&session.to_le_bytes()) ^ u64::from(nanos);
    let wait = ctx.throttle.refusal_time(jitter);
    if wait.is_zero() {
        return;
    }
    tokio::select! {
        () = tokio::time::sleep(wait) => {}
        () = ctx.draining.cancelled() => {}
    }
}

/// What to send the store, owning what it needs (a secret looked up, a master login name built).
enum OwnedAuth {
    Password {
        user: String,
        password: Secret,
        authzid: Option<String>,
        plain: bool,
    },
    Apop {
        user: String,
        digest: String,
    },
    Secret {
        user: String,
        secret: Secret,
    },
    Sasl {
        mechanism: &'static str,
        initial: Secret,
    },
}

impl OwnedAuth {
    fn as_store_auth(&self) -> StoreAuth<'_> {
        match self {
            OwnedAuth::Password {
                user,
                password,
                authzid,
                plain,
            } => StoreAuth::Password {
                user,
                password,
                authzid: authzid.as_deref(),
                plain: *plain,
            },
            OwnedAuth::Apop { user, digest } => StoreAuth::ApopPassthrough { user, digest },
            OwnedAuth::Secret { user, secret } => StoreAuth::Secret { user, secret },
            OwnedAuth::Sasl { mechanism, initial } => StoreAuth::Sasl {
                mechanism,
                initial: initial.expose(),
            },
        }
    }
}

/// Decides how to log the client in at the store. APOP and CRAM-MD5 digests are checked here against the
/// tenant's secrets (Err when they do not match or no secret is known), unless APOP goes to the store the
/// client saw greeting it. Whenever popgate itself checked the client's secret (a digest, or a master
/// login), the store is asked for `checked_user`, the normalised mailbox whose secret that was, never the
/// name as typed: on a store that tells case or Unicode forms apart, the name as typed may be another
/// account.
fn store_auth(
    tenant: &TenantRuntime,
    creds: &Credentials,
    backend_user: &str,
    checked_user: impl FnOnce() -> String,
    mailbox_key: &str,
    passthrough: bool,
) -> Result<OwnedAuth, ()> {
    let secret = || {
        tenant
            .secrets
            .as_ref()
            .and_then(|s| s.get(mailbox_key))
            .cloned()
    };
    let verified_secret = match creds.mechanism {
        Mechanism::Apop if passthrough => {
            return Ok(OwnedAuth::Apop {
                user: backend_user.to_string(),
                digest: String::from_utf8_lossy(creds.password.expose()).into_owned(),
            });
        }
        Mechanism::Apop | Mechanism::CramMd5 => {
            let (secret, challenge) = (secret().ok_or(())?, creds.challenge.as_deref().ok_or(())?);
            let expected = if creds.mechanism == Mechanism::Apop {
                crate::protocol::sasl::apop_digest(challenge, secret.expose())
            } else {
                crate::protocol::sasl::cram_md5_digest(challenge, secret.expose())
            };
            let presented = String::from_utf8_lossy(creds.password.expose()).into_owned();
            if !crate::protocol::sasl::digests_match(&expected, &presented) {
                return Err(());
            }
            Some(secret)
        }
        _ => None,
    };
    if let BackendLogin::Master(master) = &tenant.backend_login {
        // Only after popgate itself checked the client: a master login ignores the user's password.
        let checked = verified_secret.is_some()
            || secret().is_some_and(|s| {
                creds.mechanism.reveals_secret() && s.matches(creds.password.expose())
            });
        if !checked {
            return Err(());
        }
        return Ok(OwnedAuth::Password {
            user: format!("{}{}{}", checked_user(), master.separator, master.user),
            password: Secret::new(master.password.expose().as_bytes().to_vec()),
            authzid: None,
            plain: false,
        });
    }
    if let Some(secret) = verified_secret {
        return Ok(OwnedAuth::Secret {
            user: checked_user(),
            secret,
        });
    }
    let sasl = |mechanism| OwnedAuth::Sasl {
        mechanism,
        initial: creds.password.clone(),
    };
    Ok(match creds.mechanism {
        Mechanism::Xoauth2 => sasl("XOAUTH2"),
        Mechanism::Oauthbearer => sasl("OAUTHBEARER"),
        Mechanism::ScramSha1 => sasl("SCRAM-SHA-1"),
        Mechanism::ScramSha256 => sasl("SCRAM-SHA-256"),
        _ => OwnedAuth::Password {
            user: backend_user.to_string(),
            password: creds.password.clone(),
            authzid: creds.authzid.clone(),
            plain: match tenant.backend_login {
                BackendLogin::AuthPlain => true,
                BackendLogin::UserPass => false,
                _ => creds.mechanism == Mechanism::Plain,
            },
        },
    })
}

enum AuthHttpOutcome {
    LoggedIn(crate::upstream::LoggedIn, String),
    /// The auth service or the store refused the credentials: a failed login.
    Refused(Vec<u8>),
    /// The store answered for now only (`[IN-USE]`, `[SYS/TEMP]`): not a failed login.
    Temporary(Vec<u8>),
    Unavailable(String),
}

/// nginx `auth_http`: the service checks the client and names the store (and possibly the name and
/// password to use there); popgate then connects and logs in as told.
async fn auth_http_login(
    service: &crate::authhttp::AuthHttp,
    tenant: &TenantRuntime,
    creds: &Credentials,
    auth: &OwnedAuth,
    backend_user: &str,
    client: &ClientInfo,
    relay: &mut ClientSession,
) -> AuthHttpOutcome {
    let method = match creds.mechanism {
        Mechanism::Apop => "apop",
        Mechanism::CramMd5 => "cram-md5",
        _ => "plain",
    };
    let request = crate::authhttp::AuthRequest {
        method,
        user: &creds.login,
        pass: creds.password.expose(),
        salt: creds.challenge.as_deref(),
        protocol: "pop3",
        attempt: 1,
        client_ip: client.peer.ip(),
        client_host: None,
    };
    let answer = match service.lookup(&request).await {
        Ok(a) => a,
        Err(e) => return AuthHttpOutcome::Unavailable(e.to_string()),
    };
    let (server, port, user, pass) = match answer {
        crate::authhttp::AuthAnswer::Ok {
            server,
            port,
            user,
            pass,
        } => (server, port, user, pass),
        crate::authhttp::AuthAnswer::Refused { message, wait } => {
            if let Some(wait) = wait {
                tokio::time::sleep(wait).await;
            }
            return AuthHttpOutcome::Refused(format!("-ERR [AUTH] {message}\r\n").into_bytes());
        }
    };
    let addr = match tokio::net::lookup_host((server.as_str(), port))
        .await
        .map(|mut a| a.next())
    {
        Ok(Some(addr)) => addr,
        _ => return AuthHttpOutcome::Unavailable(format!("cannot resolve Auth-Server {server}")),
    };
    let user = user.unwrap_or_else(|| backend_user.to_string());
    let store_auth = match (&pass, auth) {
        (Some(p), _) => StoreAuth::Password {
            user: &user,
            password: p,
            authzid: None,
            plain: false,
        },
        // A digest cannot be replayed to another store: nginx requires Auth-Pass for these methods.
        (None, _) if matches!(creds.mechanism, Mechanism::Apop | Mechanism::CramMd5) => {
            return AuthHttpOutcome::Unavailable(
                "auth_http gave no Auth-Pass for a digest login".into(),
            );
        }
        (None, OwnedAuth::Sasl { .. }) => auth.as_store_auth(),
        (None, _) => StoreAuth::Password {
            user: &user,
            password: &creds.password,
            authzid: None,
            plain: false,
        },
    };
    let endpoint = crate::upstream::dns::Endpoint {
        addr,
        host: server.clone(),
        priority: 0,
        weight: 1,
    };
    match tenant
        .group
        .login_direct(&endpoint, &store_auth, client, relay)
        .await
    {
        Ok(l) => AuthHttpOutcome::LoggedIn(l, format!("{server}:{port}")),
        Err(LoginError::Rejected(line)) => AuthHttpOutcome::Refused(line),
        Err(LoginError::Temporary(line)) => AuthHttpOutcome::Temporary(line),
        Err(LoginError::Unavailable(why) | LoginError::Dropped(why)) => {
            AuthHttpOutcome::Unavailable(why)
        }
    }
}

/// A fresh APOP timestamp / CRAM-MD5 challenge (RFC 1939: `<process-ID.clock@hostname>`), unique per session.
fn make_challenge(session: u64) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "popgate".into());
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-'))
        .collect();
    format!("<{}.{session}.{nanos}@{host}>", std::process::id())
}
const STORE_UNAVAILABLE: &[u8] = b"-ERR [SYS/TEMP] Mail store unavailable, try again later\r\n";

impl Shared {
    /// Builds the shared state for a validated config: certificates, DNS, and every tenant's store group
    /// (resolved once, probes and pools started). Background tasks stop with `shutdown`.
    pub async fn new(
        config: Arc<Config>,
        context: Arc<Context>,
        shutdown: CancellationToken,
    ) -> Result<Self, SharedError> {
        let table = TenantTable::new(&config);
        let discovery = Arc::new(Discovery::new(DnsSettings {
            nameservers: config.dns.nameservers.clone(),
            min_ttl: config.dns.min_ttl.get(),
            max_ttl: config.dns.max_ttl.get(),
            timeout: config.dns.timeout.get(),
        })?);
        let timeouts = BackendTimeouts {
            connect: config.timeouts.backend_connect.get(),
            reply: config.timeouts.backend_reply.get(),
        };
        let mut tenants = Vec::with_capacity(config.tenants.len());
        for (name, t) in &config.tenants {
            let t = &t.value;
            let tls = match Config::uses_store_tls(t) {
                false => None,
                true => {
                    if t.backend_tls.insecure_skip_verify {
                        warn!(tenant = %name, "backend_tls.insecure_skip_verify is set: store certificates are NOT verified");
                    }
                    Some(crate::tls::store_client_config(&t.backend_tls, &config)?)
                }
            };
            let connector = Arc::new(Connector {
                tls,
                server_name: t.backend_tls.server_name.clone(),
                client_ip: t.client_ip,
                timeouts,
            });
            let group = StoreGroup::start(
                name,
                t,
                connector,
                discovery.clone(),
                context.metrics.clone(),
                shutdown.clone(),
            )
            .await;
            let secrets = match &t.secrets {
                Some(path) => Some(
                    crate::config::load_secrets(&config.resolve_path(path), t.login_case)
                        .map_err(SharedError::Secrets)?,
                ),
                None => None,
            };
            let mechanisms = t.mechanisms.clone().unwrap_or_else(|| {
                let mut m = vec![
                    Mechanism::UserPass,
                    Mechanism::Plain,
                    Mechanism::Login,
                    Mechanism::Apop,
                ];
                if secrets.is_some() {
                    m.push(Mechanism::CramMd5);
                }
                m
            });
            tenants.push(TenantRuntime {
                reach: Reach::default(),
                max_sessions: t.max_sessions,
                min_login_interval: t.min_login_interval.map(|s| s.get()),
                passthrough: t
                    .apop_passthrough
                    .map(|p| crate::throttle::HeldCap::new(p.max_pending, p.max_pending_per_ip)),
                group,
                plaintext: t.plaintext_login,
                mechanisms,
                secrets,
                backend_login: t.backend_login.clone(),
                auth_http: match &t.auth_http {
                    Some(a) => Some(Arc::new(
                        crate::authhttp::AuthHttp::new(crate::authhttp::AuthHttpConfig {
                            url: a.url.clone(),
                            timeout: a.timeout.get(),
                            cache_ttl: a.cache_ttl.get(),
                            negative_cache_ttl: a.negative_cache_ttl.get(),
                            cache_size: a.cache_size,
                            extra_headers: Vec::new(),
                        })
                        .map_err(|e| SharedError::Secrets(format!("tenant {name}: {e}")))?,
                    )),
                    None => None,
                },
            });
        }
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
        let listeners = config
            .listeners
            .iter()
            .map(|l| {
                let l = &l.value;
                let info = ListenerInfo {
                    name: l.name.clone(),
                    tls: l.tls,
                    tenant: l.tenant.as_deref().and_then(|t| table.tenant_by_name(t)),
                    proxy_from: l
                        .proxy_protocol
                        .as_ref()
                        .map(|p| p.trusted_networks.clone()),
                };
                (l.name.clone(), Arc::new(info))
            })
            .collect();
        for t in &mut tenants {
            t.reach = Reach::of(std::iter::once(&*t));
        }
        let unbound = Reach::of(tenants.iter());
        let proxy_headers_out = config.tenants.values().any(|t| {
            matches!(
                t.value.client_ip,
                ClientIpForwarding::ProxyV1 | ClientIpForwarding::ProxyV2
            )
        });
        Ok(Self {
            config,
            table,
            tenants,
            tls,
            listeners,
            unbound,
            proxy_headers_out,
        })
    }

    /// What a connection bound to `tenant` (or to none) can offer.
    fn reach(&self, tenant: Option<TenantId>) -> &Reach {
        match tenant.and_then(|t| self.tenants.get(t)) {
            Some(t) => &t.reach,
            None => &self.unbound,
        }
    }

    /// Whether some tenant reachable through this listener allows plaintext login.
    fn plaintext_possible(&self, listener: &ListenerInfo) -> bool {
        self.reach(listener.tenant).plaintext
    }
}

/// Serves one accepted client connection to its end; `keep` (the connection's admission guards) is held
/// until then.
///
/// Not an `async fn`: its arguments would be stored in the task beside the block that moves them. The
/// session's span lives through the login phase only: an idle relayed session keeps no span (its slot and
/// formatted fields), and the closing line is logged in a fresh span with the same fields.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn would store its arguments beside the block's own copies (rust-lang/rust#62958)"
)]
pub fn serve<K: Send + 'static>(
    ctx: Arc<Context>,
    shared: Arc<Shared>,
    listener: Arc<ListenerInfo>,
    tcp: TcpStream,
    peer: SocketAddr,
    keep: K,
) -> impl Future<Output = ()> + Send + 'static {
    async move {
        let id = ctx.next_session_id();
        let started = Instant::now();
        let span = info_span!("session", id, client = %peer, listener = %listener.name, tenant = tracing::field::Empty);
        // Boxed, and dropped at the end of this statement: the login phase's state (session driver, offer,
        // credentials) is freed before relaying, so an idle logged-in session keeps only what the relay needs.
        let summary = Box::pin(run(&ctx, &shared, &listener, tcp, peer, id))
            .instrument(span.clone())
            .await;
        let metrics = &ctx.metrics;
        match summary {
            Summary::LoggedIn(handover) => {
                drop(span);
                let client = handover.client;
                let Relayed {
                    tenant,
                    backend,
                    stats,
                } = handover.relay().await;
                let secs = started.elapsed().as_secs_f64();
                metrics.session_ended(&tenant, &listener.name, stats.end.as_str());
                let t = metrics.tenant(&tenant);
                t.duration.observe(secs);
                t.bytes_to_store.inc_by(stats.bytes_up);
                t.bytes_to_client.inc_by(stats.bytes_down);
                let span = info_span!("session", id, client = %client, listener = %listener.name, tenant = tenant.as_str());
                let _entered = span.enter();
                info!(
                    tenant = %tenant,
                    backend = %backend,
                    bytes_in = stats.bytes_up,
                    bytes_out = stats.bytes_down,
                    commands = stats.commands,
                    duration_s = secs,
                    outcome = stats.end.as_str(),
                    "session closed"
                )
            }
            Summary::NoLogin(tenant, end) => {
                let secs = started.elapsed().as_secs_f64();
                let tenant = tenant.as_deref().unwrap_or(crate::metrics::UNKNOWN_TENANT);
                metrics.session_ended(tenant, &listener.name, end.as_str());
                let _entered = span.enter();
                info!(duration_s = secs, outcome = end.as_str(), detail = %end, "session closed before login")
            }
        }
        drop(keep);
    }
}

/// A store connection taken before the greeting for APOP passthrough, and the slot it holds.
struct Passthrough {
    prepared: Prepared,
    active: ActiveSession,
    tenant: TenantId,
    _held: crate::throttle::Held,
}

enum Summary<'c> {
    /// Logged in; the relay is still to run (see `serve`).
    LoggedIn(Box<Handover<'c>>),
    /// The session ended before a login; the tenant, when one was routed to.
    NoLogin(Option<String>, SessionEnd),
}

/// A logged-in session on its way to the relay: the relay, and what must live as long as it.
struct Handover<'c> {
    /// Boxed: allocated once at its own size, not stored again in each future that awaits it.
    relay: Pin<Box<dyn Future<Output = RelayStats> + Send>>,
    /// The client's address (from the PROXY header when there was one), for the closing log line.
    client: SocketAddr,
    metrics: Arc<TenantMetrics>,
    _active: Option<ActiveSession>,
    _registered: Registered<'c>,
    _mailbox_slot: MailboxGuard,
    _tenant_slot: crate::throttle::TenantGuard,
}

/// A relayed session's summary.
struct Relayed {
    tenant: String,
    backend: String,
    stats: RelayStats,
}

impl Handover<'_> {
    /// Kept boxed while it runs: the session's task holds a pointer, not the handover.
    async fn relay(mut self: Box<Self>) -> Relayed {
        let stats = self.relay.as_mut().await;
        self.metrics.active.dec();
        let entry = self._registered.entry();
        Relayed {
            tenant: entry.tenant.clone(),
            backend: entry.store.clone(),
            stats,
        }
    }
}

async fn run<'c>(
    ctx: &'c Context,
    shared: &Shared,
    listener: &ListenerInfo,
    mut tcp: TcpStream,
    peer: SocketAddr,
    id: u64,
) -> Summary<'c> {
    let config = &shared.config;
    let metrics = &ctx.metrics;
    let mut routed_tenant: Option<String> = None;
    let deadline = Instant::now() + config.timeouts.pre_login.get();
    let _ = tcp.set_nodelay(true);
    let local = if shared.proxy_headers_out {
        Some(tcp.local_addr().unwrap_or(peer))
    } else {
        None
    };

    // PROXY protocol from a trusted balancer: the client address is the one it names.
    let mut client_addr = peer;
    if let Some(trusted) = &listener.proxy_from {
        if !trusted.iter().any(|net| net.contains(&peer.ip())) {
            warn!(
                "PROXY header expected, but the connection is not from a trusted network; closing"
            );
            return Summary::NoLogin(routed_tenant.clone(), SessionEnd::Policy);
        }
        match crate::proxy_protocol::read_header(&mut tcp, config.timeouts.tls_handshake.get())
            .await
        {
            Ok(Some(addr)) => {
                client_addr = addr;
                tracing::Span::current().record("client", tracing::field::display(addr));
            }
            Ok(None) => {}
            Err(e) => {
                info!(error = %e, "refused: bad PROXY header");
                return Summary::NoLogin(routed_tenant.clone(), SessionEnd::Policy);
            }
        }
    }
    let client_info = ClientInfo {
        peer: client_addr,
        local,
        session: id,
        utf8: false,
    };

    // Implicit TLS: handshake inside this task, under its own timeout.
    let mut sni_tenant = None;
    let stream = if listener.tls == ListenerTls::Implicit {
        let Some((server_config, resolver)) = &shared.tls else {
            return Summary::NoLogin(
                routed_tenant.clone(),
                SessionEnd::Tls("no TLS configuration".into()),
            );
        };
        let acceptor = TlsAcceptor::from(server_config.clone());
        let limit = config
            .timeouts
            .tls_handshake
            .get()
            .min(config.timeouts.pre_login.get());
        match timeout(limit, acceptor.accept(tcp)).await {
            Err(_) => {
                metrics.tls_handshake(&listener.name, false, "none");
                return Summary::NoLogin(
                    routed_tenant.clone(),
                    SessionEnd::Tls("handshake timed out".into()),
                );
            }
            Ok(Err(e)) => {
                metrics.tls_handshake(&listener.name, false, "none");
                return Summary::NoLogin(routed_tenant.clone(), SessionEnd::Tls(e.to_string()));
            }
            Ok(Ok(tls)) => {
                let version = tls
                    .get_ref()
                    .1
                    .protocol_version()
                    .and_then(|v| v.as_str())
                    .unwrap_or("unknown");
                metrics.tls_handshake(&listener.name, true, version);
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
    // What this connection can offer depends on which tenants can log in here.
    let bound_before_greeting = listener.tenant.or(sni_tenant);
    let reach = shared.reach(bound_before_greeting);
    let mechanisms = reach.mechanisms.clone();
    let utf8 = config.routing.utf8;
    let login_delay = reach.login_delay;
    // APOP passthrough, where the tenant turned it on: the route is fixed before the greeting and the tenant
    // has one store and no secrets: greet the client with that store's APOP timestamp, so the client's
    // digest is valid there. The store connection is held until the client logs in or leaves, so a client
    // address may hold only a few and the tenant only so many (past them popgate greets alone, without
    // APOP). The greeting's text is popgate's own: the store's banner and capability tags stay private.
    let mut passthrough: Option<Passthrough> = None;
    if let Some(t) = bound_before_greeting
        && let Some(tenant) = shared.tenants.get(t)
        && let Some(cap) = &tenant.passthrough
        && tenant.secrets.is_none()
        && tenant.mechanisms.contains(&Mechanism::Apop)
        && let Some(held) = cap.take(client_info.peer.ip())
        && let Some((prepared, active)) = tenant.group.prepare_for_greeting(&client_info).await
        && prepared.timestamp().is_some()
    {
        passthrough = Some(Passthrough {
            prepared,
            active,
            tenant: t,
            _held: held,
        });
    }
    let own_challenge = reach.own_challenge;
    let offer = match &passthrough {
        Some(p) => {
            let timestamp = p.prepared.timestamp().unwrap_or_default();
            Offer {
                mechanisms,
                greeting: format!("+OK popgate ready {timestamp}\r\n").into_bytes(),
                challenge: Some(timestamp.to_string()),
                utf8,
                login_delay,
            }
        }
        None if own_challenge => {
            let challenge = make_challenge(id);
            Offer {
                mechanisms,
                greeting: format!("+OK popgate ready {challenge}\r\n").into_bytes(),
                challenge: Some(challenge),
                utf8,
                login_delay,
            }
        }
        None => Offer {
            mechanisms: mechanisms
                .into_iter()
                .filter(|m| !matches!(m, Mechanism::Apop | Mechanism::CramMd5))
                .collect(),
            utf8,
            login_delay,
            ..Offer::basic()
        },
    };
    let mut session = ClientSession::new(
        stream,
        Authorization::with_offer(transport, limits, offer),
        starttls,
        deadline,
        sni_tenant,
    );
    if let Err(e) = session.greet().await {
        return Summary::NoLogin(routed_tenant.clone(), e);
    }

    let mut stls_counted = false;
    loop {
        let next = tokio::select! {
            r = session.next_login() => r,
            () = ctx.draining.cancelled() => {
                session.shutting_down().await;
                return Summary::NoLogin(routed_tenant.clone(), SessionEnd::Shutdown);
            }
        };
        if listener.tls == ListenerTls::Starttls && !stls_counted {
            match (&next, session.is_tls()) {
                (Err(SessionEnd::Tls(_)), _) => {
                    metrics.tls_handshake(&listener.name, false, "none")
                }
                (_, true) => {
                    stls_counted = true;
                    metrics.tls_handshake(
                        &listener.name,
                        true,
                        session.tls_version().unwrap_or("unknown"),
                    );
                }
                _ => {}
            }
        }
        let creds = match next {
            Ok(c) => c,
            Err(e) => return Summary::NoLogin(routed_tenant.clone(), e),
        };
        let mechanism = creds.mechanism.as_str();
        let client_ip = client_info.peer.ip();
        // A locked-out address is refused before its name is even routed: it costs no per-mailbox work.
        if let Verdict::LockedOut { .. } = ctx.throttle.check_ip(client_ip) {
            let label = routed_tenant
                .as_deref()
                .unwrap_or(crate::metrics::UNKNOWN_TENANT);
            metrics.throttled(label, "lockout");
            metrics.login(label, mechanism, "throttled");
            if let Err(end) = session.reject(LOCKED_OUT.to_vec()).await {
                return Summary::NoLogin(routed_tenant.clone(), end);
            }
            continue;
        }
        let bound = listener.tenant.or(session.sni_tenant());
        let route = shared.table.route(&creds.login, bound);
        // Plaintext refused alike for every name before routing reveals anything: a name that routes nowhere
        // gets the same "TLS required" as a tenant that requires TLS, wherever such a tenant is reachable.
        if !session.is_tls() {
            let tls_required = match &route {
                Ok(r) => shared
                    .tenants
                    .get(r.tenant)
                    .is_none_or(|t| t.plaintext == PlaintextLogin::RequireTls),
                Err(_) => shared.reach(bound).tls_required,
            };
            if tls_required {
                let msg = if transport.stls_offered {
                    b"-ERR [AUTH] TLS required: use STLS before logging in\r\n".to_vec()
                } else {
                    b"-ERR [AUTH] TLS required: connect to the POP3S port\r\n".to_vec()
                };
                let label = match &route {
                    Ok(r) => shared.table.tenants()[r.tenant].name.as_str(),
                    Err(_) => crate::metrics::UNKNOWN_TENANT,
                };
                metrics.login(label, mechanism, "tls_required");
                if let Err(end) = session.reject(msg).await {
                    return Summary::NoLogin(routed_tenant.clone(), end);
                }
                continue;
            }
        }
        let route = match route {
            Ok(r) => r,
            Err(e) => {
                info!(mechanism, reason = %e, "login refused: no route");
                metrics.login(crate::metrics::UNKNOWN_TENANT, mechanism, "no_route");
                // As long as a store's refusal takes, and counted against the address only: an unrouted
                // name gets no state of its own.
                like_a_store_refusal(ctx, id).await;
                let reply = throttle_failure(
                    ctx,
                    crate::metrics::UNKNOWN_TENANT,
                    client_ip,
                    Failure {
                        mailbox: None,
                        secret: Some(creds.password.expose()),
                    },
                    AUTH_FAILED.to_vec(),
                )
                .await;
                if let Err(end) = session.reject(reply).await {
                    return Summary::NoLogin(routed_tenant.clone(), end);
                }
                continue;
            }
        };
        let tenant_name = &shared.table.tenants()[route.tenant].name;
        tracing::Span::current().record("tenant", tenant_name.as_str());
        routed_tenant = Some(tenant_name.clone());
        let Some(tenant) = shared.tenants.get(route.tenant) else {
            return Summary::NoLogin(routed_tenant.clone(), SessionEnd::Policy);
        };
        let mailbox_key = route.key.clone();
        let failure = Failure {
            mailbox: Some(&mailbox_key),
            secret: Some(creds.password.expose()),
        };
        // Per login: whether the client asked for UTF-8 mode, which the store is then asked for too.
        let client_info = ClientInfo {
            utf8: session.utf8_enabled(),
            ..client_info
        };
        if !tenant.mechanisms.contains(&creds.mechanism) {
            metrics.login(tenant_name, mechanism, "rejected");
            like_a_store_refusal(ctx, id).await;
            if let Err(end) = session.reject(AUTH_FAILED.to_vec()).await {
                return Summary::NoLogin(routed_tenant.clone(), end);
            }
            continue;
        }
        if let Verdict::LockedOut { .. } = ctx.throttle.check_login(client_ip, &mailbox_key) {
            metrics.throttled(tenant_name, "lockout");
            metrics.login(tenant_name, mechanism, "throttled");
            if let Err(end) = session.reject(LOCKED_OUT.to_vec()).await {
                return Summary::NoLogin(routed_tenant.clone(), end);
            }
            continue;
        }
        // The tenant's session cap, before any store is asked.
        let _tenant_slot = match ctx
            .throttle
            .tenant_session(tenant_name, tenant.max_sessions)
        {
            Ok(slot) => slot,
            Err(reason) => {
                metrics.throttled(tenant_name, reason);
                metrics.login(tenant_name, mechanism, "throttled");
                if let Err(end) = session.unavailable(TENANT_FULL.to_vec()).await {
                    return Summary::NoLogin(routed_tenant.clone(), end);
                }
                continue;
            }
        };
        let via_passthrough = passthrough
            .as_ref()
            .is_some_and(|p| p.tenant == route.tenant);
        let auth = match store_auth(
            tenant,
            &creds,
            &route.backend_user,
            || shared.table.checked_user(&route),
            &mailbox_key,
            via_passthrough,
        ) {
            Ok(a) => a,
            Err(()) => {
                info!(mechanism, "login refused: digest does not match");
                metrics.login(tenant_name, mechanism, "rejected");
                like_a_store_refusal(ctx, id).await;
                let reply =
                    throttle_failure(ctx, tenant_name, client_ip, failure, AUTH_FAILED.to_vec())
                        .await;
                if let Err(end) = session.reject(reply).await {
                    return Summary::NoLogin(routed_tenant.clone(), end);
                }
                continue;
            }
        };
        let asked_store = Instant::now();
        let attempt = match passthrough.take() {
            Some(Passthrough {
                prepared,
                active,
                tenant: t,
                _held,
            }) if t == route.tenant => tenant
                .group
                .login_prepared(
                    prepared,
                    active.store(),
                    &auth.as_store_auth(),
                    &client_info,
                    &mut session,
                )
                .await
                .map(|l| {
                    let id = active.store().id.clone();
                    (l, Some(active), id)
                })
                .map_err(GroupError::from),
            other => {
                passthrough = other;
                match &tenant.auth_http {
                    Some(service) => {
                        match auth_http_login(
                            service,
                            tenant,
                            &creds,
                            &auth,
                            &route.backend_user,
                            &client_info,
                            &mut session,
                        )
                        .await
                        {
                            AuthHttpOutcome::LoggedIn(l, id) => Ok((l, None, id)),
                            AuthHttpOutcome::Refused(line) => {
                                Err(GroupError::Login(LoginError::Rejected(line)))
                            }
                            AuthHttpOutcome::Temporary(line) => {
                                Err(GroupError::Login(LoginError::Temporary(line)))
                            }
                            AuthHttpOutcome::Unavailable(why) => Err(GroupError::NoStore(why)),
                        }
                    }
                    None => tenant
                        .group
                        .login(
                            &mailbox_key,
                            &auth.as_store_auth(),
                            &client_info,
                            &mut session,
                        )
                        .await
                        .map(|(l, active)| {
                            let id = active.store().id.clone();
                            (l, Some(active), id)
                        }),
                }
            }
        };
        let (logged_in, active, addr) = match attempt {
            Ok(l) => l,
            Err(e) => {
                let result_label = match &e {
                    GroupError::Login(l) => l.as_str(),
                    GroupError::NoStore(_) => "unavailable",
                };
                metrics.login(tenant_name, mechanism, result_label);
                let result = match e {
                    GroupError::Login(LoginError::Rejected(line)) => {
                        info!(mechanism, "login refused by store");
                        ctx.throttle.store_refused_after(asked_store.elapsed());
                        let reply =
                            throttle_failure(ctx, tenant_name, client_ip, failure, line).await;
                        session.reject(reply).await
                    }
                    GroupError::Login(LoginError::Temporary(line)) => {
                        info!("store refused login for now");
                        session.unavailable(line).await
                    }
                    GroupError::Login(LoginError::Unavailable(why) | LoginError::Dropped(why))
                    | GroupError::NoStore(why) => {
                        warn!(reason = %why, "no store available");
                        session.unavailable(STORE_UNAVAILABLE.to_vec()).await
                    }
                };
                if let Err(end) = result {
                    return Summary::NoLogin(routed_tenant.clone(), end);
                }
                continue;
            }
        };
        let _mailbox_slot = match ctx.throttle.login_ok(client_ip, &mailbox_key) {
            Ok(slot) => slot,
            Err(reason) => {
                // Too many sessions for this mailbox at the edge: close the store session without QUIT.
                drop(logged_in);
                metrics.throttled(tenant_name, reason);
                metrics.login(tenant_name, mechanism, "throttled");
                if let Err(end) = session.unavailable(IN_USE.to_vec()).await {
                    return Summary::NoLogin(routed_tenant.clone(), end);
                }
                continue;
            }
        };
        // The credentials were right (the store said so); now the minimum interval between logins.
        if let Some(min) = tenant.min_login_interval
            && let Err(left) = ctx.throttle.login_interval(&mailbox_key, min)
        {
            // Close the store session without QUIT: nothing it did may be committed.
            drop(logged_in);
            metrics.throttled(tenant_name, "login_delay");
            metrics.login(tenant_name, mechanism, "throttled");
            info!(
                wait_s = left.as_secs(),
                "login refused: minimum interval between logins"
            );
            let reply = format!(
                "-ERR [LOGIN-DELAY] Logged in too recently; try again in {} seconds\r\n",
                left.as_secs().max(1)
            );
            if let Err(end) = session.unavailable(reply.into_bytes()).await {
                return Summary::NoLogin(routed_tenant.clone(), end);
            }
            continue;
        }
        metrics.login(tenant_name, mechanism, "ok");
        info!(backend = %addr, mechanism, "logged in");
        let kick = ctx.stop.child_token();
        let _registered = ctx.sessions.register(
            id,
            SessionEntry {
                tenant: tenant_name.clone(),
                mailbox: mailbox_key.clone(),
                store: addr,
                kick: kick.clone(),
            },
        );
        let tenant_metrics = metrics.tenant(tenant_name);
        let Some((mut client, pipelined)) = session.into_parts() else {
            return Summary::NoLogin(routed_tenant.clone(), SessionEnd::Disconnected);
        };
        if let Err(e) = tokio::io::AsyncWriteExt::write_all(&mut client, &logged_in.reply).await {
            return Summary::NoLogin(routed_tenant.clone(), SessionEnd::Io(e));
        }
        // Counted from here: `Handover::relay` takes it off when the relay ends.
        tenant_metrics.active.inc();
        return Summary::LoggedIn(Box::new(Handover {
            relay: Box::pin(relay(
                client,
                logged_in.stream,
                pipelined,
                logged_in.leftover,
                RelayConfig {
                    idle: config.timeouts.idle.get(),
                    quit_drain: config.timeouts.quit_drain.get(),
                },
                tenant_metrics.clone(),
                kick,
            )),
            client: client_addr,
            metrics: tenant_metrics,
            _active: active,
            _registered,
            _mailbox_slot,
            _tenant_slot,
        }));
    }
}
