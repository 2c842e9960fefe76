//! The config snapshot: what every session started under one config shares — the tenant table, each
//! tenant's stores and login rules, the client-side TLS, listener facts, and what a connection can offer
//! given the tenants that can log in on it. Built once per config (and per reload), read by every session.

use std::collections::HashMap;
use std::sync::Arc;

use tracing::warn;

use crate::config::{ClientIpForwarding, Config, ListenerTls, PlaintextLogin, StoreLogin};
use crate::context::Context;
use crate::router::{TenantId, TenantTable};
use crate::secret::Secret;
use crate::session::Mechanism;
use crate::store::StoreTimeouts;
use crate::store::connection::Connector;
use crate::store::dns::{Discovery, DnsSettings};
use crate::store::group::StoreGroup;
use crate::tls::SniResolver;

/// What every session of one config snapshot shares.
#[derive(Debug)]
pub struct Shared {
    /// The validated config.
    pub config: Arc<Config>,
    /// Domain → tenant.
    pub table: TenantTable,
    /// Per tenant, indexed like `table.tenants()`; a tenant whose settings a reload did not change is the
    /// same runtime in both snapshots.
    pub tenants: Vec<Arc<TenantRuntime>>,
    /// How many tenant runtimes this snapshot built (the others it took from the previous one).
    pub built: usize,
    /// TLS for the client leg, when any listener uses it.
    pub tls: Option<(Arc<rustls::ServerConfig>, Arc<SniResolver>)>,
    /// Listener facts by name.
    pub listeners: HashMap<String, Arc<ListenerInfo>>,
    /// What a connection not bound to one tenant can offer (every tenant can log in on it).
    pub(super) unbound: Reach,
    /// Some tenant sends PROXY headers to its stores, which name the address the client connected to:
    /// only then is it asked of the socket (`getsockname(2)`) on every connection.
    pub(super) proxy_headers_out: bool,
    /// Some tenant sends XCLIENT at the client's USER (`pool.xclient_at_user`): only then does a session
    /// report its USER names (`session::Step::Named`).
    pub(super) xclient_at_user: bool,
    /// popgate's resolver (`dns:`), for names given at run time (auth_http's `Auth-Server`).
    pub(super) discovery: Arc<Discovery>,
}

/// What a connection can offer, given which tenants can log in on it. Computed once per config
/// snapshot, so accepting a connection costs the same with one tenant or ten thousand.
#[derive(Debug, Clone, Default)]
pub struct Reach {
    /// Mechanisms some of the tenants accept, sorted, without repeats.
    pub(super) mechanisms: Vec<Mechanism>,
    /// Some tenant checks APOP/CRAM-MD5 itself (secrets): the greeting carries popgate's own timestamp.
    pub(super) own_challenge: bool,
    /// The LOGIN-DELAY capability to announce.
    pub(super) login_delay: Option<(u64, bool)>,
    /// Some tenant allows plaintext logins.
    pub(super) plaintext: bool,
    /// Some tenant requires TLS before a login: on a plain connection, names that route nowhere are then
    /// answered as that tenant's are, so the answer does not tell hosted domains from unknown ones.
    pub(super) tls_required: bool,
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
    pub backend_login: StoreLogin,
    /// The tenant's nginx-style auth service, when it has one.
    pub auth_http: Option<Arc<crate::auth::http::AuthHttp>>,
    /// Where the tenant's mailboxes live, when a directory says so.
    pub placement: Option<Arc<crate::placement::Placement>>,
    /// Logged-in sessions at once; 0 for no cap.
    pub max_sessions: usize,
    /// Minimum time between two logins of one mailbox (`-ERR [LOGIN-DELAY]`).
    pub min_login_interval: Option<std::time::Duration>,
    /// APOP passthrough, when the tenant turned it on: the cap on store connections held for greetings.
    pub passthrough: Option<Arc<crate::throttle::HeldCap>>,
    /// What a connection bound to this tenant alone can offer.
    reach: Reach,
    /// A digest of the files the runtime read (store TLS files, secrets): a reload keeps this runtime when
    /// the tenant's settings are the same and so is this.
    files: u64,
}

/// What building one tenant's runtime needs from the snapshot being built.
struct TenantSetup<'a> {
    config: &'a Config,
    dns: &'a DnsSettings,
    context: &'a Context,
    timeouts: StoreTimeouts,
}

impl TenantRuntime {
    /// One tenant's stores (resolved once, probes and pools started), secrets, mechanisms and auth
    /// service.
    async fn build(
        name: &str,
        t: &crate::config::TenantConfig,
        setup: TenantSetup<'_>,
        files: u64,
    ) -> Result<Self, SharedError> {
        let profile = setup
            .context
            .stores
            .profile(profile_key(t, setup.config, setup.timeouts), || {
                let tls = match Config::uses_store_tls(t) {
                    false => None,
                    true => {
                        if t.backend_tls.insecure_skip_verify {
                            warn!(tenant = %name, "backend_tls.insecure_skip_verify is set: store certificates are NOT verified");
                        }
                        Some(crate::tls::store_client_config(
                            &t.backend_tls,
                            setup.config,
                        )?)
                    }
                };
                let connector = Connector {
                    tls,
                    server_name: t.backend_tls.server_name.clone(),
                    client_ip: t.client_ip,
                    timeouts: setup.timeouts,
                };
                Ok::<_, SharedError>((connector, t.health.clone(), t.pool.clone()))
            })?;
        let group = StoreGroup::start(
            name,
            t,
            profile,
            setup.context.stores.clone(),
            setup.dns,
            setup.context.metrics.clone(),
            setup.context.stop.clone(),
        )
        .await?;
        let secrets = match &t.secrets {
            Some(path) => Some(
                crate::secret::files::load_secrets(&setup.config.resolve_path(path), t.login_case)
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
        let mut runtime = TenantRuntime {
            reach: Reach::default(),
            files,
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
            placement: match &t.placement {
                Some(p) => Some(Arc::new(
                    crate::placement::Placement::new(
                        p,
                        setup.config,
                        name,
                        t.login_case,
                        &setup.context.metrics,
                    )
                    .map_err(|source| SharedError::Placement {
                        tenant: name.to_string(),
                        source,
                    })?,
                )),
                None => None,
            },
            auth_http: match &t.auth_http {
                Some(a) => Some(Arc::new(
                    auth_http_client(a, setup.config, &setup.context.metrics, name).map_err(
                        |source| SharedError::AuthHttp {
                            tenant: name.to_string(),
                            source,
                        },
                    )?,
                )),
                None => None,
            },
        };
        runtime.reach = Reach::of(std::iter::once(&runtime));
        Ok(runtime)
    }
}

/// A tenant's auth_http client: its TLS roots, its extra headers (files read now) and its series.
fn auth_http_client(
    a: &crate::config::AuthHttpSettings,
    config: &Config,
    metrics: &crate::metrics::Metrics,
    tenant: &str,
) -> Result<crate::auth::http::AuthHttp, crate::auth::http::AuthHttpError> {
    crate::auth::http::AuthHttp::new(crate::auth::http::AuthHttpConfig {
        url: a.url.clone(),
        tls: auth_http_tls(a, config)?,
        timeout: a.timeout.get(),
        cache_ttl: a.cache_ttl.get(),
        negative_cache_ttl: a.negative_cache_ttl.get(),
        cache_size: a.cache_size,
        extra_headers: auth_http_headers(a, config)?,
        metrics: Some(metrics.auth_http(tenant)),
    })
}

/// The roots an `https://` auth_http service is checked against: its `ca`, else the system's (`None`).
fn auth_http_tls(
    a: &crate::config::AuthHttpSettings,
    config: &Config,
) -> Result<Option<Arc<rustls::ClientConfig>>, crate::auth::http::AuthHttpError> {
    let Some(ca) = &a.ca else { return Ok(None) };
    let fail = |e: crate::certs::TlsError| crate::auth::http::AuthHttpError::Config(e.to_string());
    let roots = crate::certs::load_roots(&config.resolve_path(ca)).map_err(fail)?;
    crate::certs::client_config_with_roots(roots)
        .map(Some)
        .map_err(fail)
}

/// The extra request headers, each value given or read from its file.
fn auth_http_headers(
    a: &crate::config::AuthHttpSettings,
    config: &Config,
) -> Result<Vec<(String, String)>, crate::auth::http::AuthHttpError> {
    a.headers
        .iter()
        .map(|h| {
            let value = match (&h.value, &h.value_file) {
                (Some(v), _) => v.expose().to_string(),
                (None, Some(path)) => {
                    crate::secret::files::read_token_file(&config.resolve_path(path))
                        .map_err(|e| {
                            crate::auth::http::AuthHttpError::Config(format!(
                                "header {}: {e}",
                                h.name
                            ))
                        })?
                        .expose()
                        .to_string()
                }
                (None, None) => String::new(),
            };
            Ok((h.name.clone(), value))
        })
        .collect()
}

/// A digest of the contents of the files a tenant's runtime reads (store CA, client certificate and key,
/// secrets, auth_http's CA and header files): a rotated file rebuilds the tenant at the next reload. 0
/// when it names none.
fn files_digest(t: &crate::config::TenantConfig, config: &Config) -> u64 {
    let tls = &t.backend_tls;
    let auth: Vec<&Option<std::path::PathBuf>> = t
        .auth_http
        .iter()
        .flat_map(|a| std::iter::once(&a.ca).chain(a.headers.iter().map(|h| &h.value_file)))
        .collect();
    // The placement map file is watched on its own; its directory's password and CA files are not.
    let placement: Vec<&Option<std::path::PathBuf>> = t
        .placement
        .iter()
        .flat_map(|p| {
            let ldap = p.ldap.iter().flat_map(|l| [&l.ca, &l.password_file]);
            ldap.chain(p.sql.iter().map(|s| &s.password_file))
        })
        .collect();
    digest_files(
        config,
        [&tls.ca, &tls.certificate, &tls.key, &t.secrets]
            .into_iter()
            .chain(auth)
            .chain(placement),
    )
}

/// One digest of the contents of the files named (a file that cannot be read counts as 1, so its
/// coming back is a change).
fn digest_files<'a>(
    config: &Config,
    paths: impl IntoIterator<Item = &'a Option<std::path::PathBuf>>,
) -> u64 {
    paths
        .into_iter()
        .flatten()
        .map(|p| {
            std::fs::read(config.resolve_path(p))
                .map_or(1, |bytes| xxhash_rust::xxh3::xxh3_64(&bytes))
        })
        .fold(0u64, |acc, h| acc.rotate_left(17) ^ h)
}

/// What a tenant's store settings must match for its stores to be another tenant's: every setting of
/// how stores are reached and watched, and a digest of the TLS files' contents (a rotated CA or client
/// certificate is another profile). Paths, modes and numbers only: no secret.
fn profile_key(
    t: &crate::config::TenantConfig,
    config: &Config,
    timeouts: StoreTimeouts,
) -> String {
    let tls = &t.backend_tls;
    let files = digest_files(config, [&tls.ca, &tls.certificate, &tls.key]);
    format!(
        "{:?}|{:?}|{:?}|{:?}|{:?}|{files:016x}",
        tls, t.client_ip, t.health, t.pool, timeouts
    )
}

/// Why the shared state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    /// Certificates or CA bundles.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// The DNS resolver.
    #[error("DNS: {0}")]
    Dns(#[from] crate::store::dns::DnsError),
    /// A secrets file.
    #[error("secrets: {0}")]
    Secrets(#[from] crate::secret::files::FileError),
    /// The tenant table names a tenant the config does not have (cannot happen: both come from one
    /// config).
    #[error("tenant {0} is in the tenant table but not in the config")]
    NoSuchTenant(String),
    /// A tenant's auth_http service settings.
    #[error("tenant {tenant}: auth_http: {source}")]
    AuthHttp {
        /// The tenant.
        tenant: String,
        /// What is wrong.
        source: crate::auth::http::AuthHttpError,
    },
    /// The session ticket secret file.
    #[error("tls_sessions.ticket_secret_file: {0}")]
    TicketSecret(String),
    /// A tenant's placement source.
    #[error("tenant {tenant}: placement: {source}")]
    Placement {
        /// The tenant.
        tenant: String,
        /// What is wrong.
        source: crate::placement::PlacementSetupError,
    },
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

impl Shared {
    /// Every certificate the client TLS serves (none without a TLS listener).
    pub fn certificates(&self) -> &[crate::metrics::CertificateInfo] {
        self.tls.as_ref().map_or(&[], |(_, r)| r.certificates())
    }

    /// Builds the shared state for a validated config: certificates, DNS, and every tenant's store group
    /// (resolved once, probes and pools started). Background tasks stop with `shutdown`.
    /// A reload passes the running snapshot as `previous`: each tenant whose settings (and files) did not
    /// change keeps its runtime, with its store group, secrets and auth_http cache, so a reload of 10,000
    /// tenants that changes one builds one.
    pub async fn new(
        config: Arc<Config>,
        context: Arc<Context>,
        previous: Option<&Shared>,
    ) -> Result<Self, SharedError> {
        let table = TenantTable::new(&config);
        let dns = DnsSettings {
            nameservers: config.dns.nameservers.clone(),
            min_ttl: config.dns.min_ttl.get(),
            max_ttl: config.dns.max_ttl.get(),
            timeout: config.dns.timeout.get(),
        };
        // The process's resolver (the store registry's), also for auth_http's Auth-Server names.
        let discovery = context.stores.discovery(&dns)?;
        context
            .metrics
            .set_tenant_store_histograms(config.metrics.tenant_store_histograms);
        context
            .stores
            .set_idle_cap(config.limits.max_idle_store_connections);
        let timeouts = StoreTimeouts {
            connect: config.timeouts.backend_connect.get(),
            reply: config.timeouts.backend_reply.get(),
        };
        // In the table's order, each looked up by its name: an id means the same tenant in the table and
        // here by construction.
        let mut tenants = Vec::with_capacity(table.tenants().len());
        let mut rebuilt = 0;
        // What every tenant runtime is also built from: when it changed, every tenant is rebuilt.
        let reusable = previous.filter(|p| {
            let c = &p.config;
            c.base_dir == config.base_dir
                && c.dns == config.dns
                && c.timeouts.backend_connect == config.timeouts.backend_connect
                && c.timeouts.backend_reply == config.timeouts.backend_reply
        });
        for id in table.ids() {
            let name = &table.tenant(id).name;
            let Some(t) = config.tenants.get(name) else {
                return Err(SharedError::NoSuchTenant(name.clone()));
            };
            let setup = TenantSetup {
                config: &config,
                dns: &dns,
                context: &context,
                timeouts,
            };
            let files = files_digest(&t.value, &config);
            let kept = reusable.and_then(|p| {
                let old = p.tenant_arc(p.table.tenant_by_name(name)?)?;
                let before = &p.config.tenants.get(name)?.value;
                (old.files == files && before.same_settings(&t.value)).then_some(old)
            });
            tenants.push(match kept {
                Some(old) => old,
                None => {
                    rebuilt += 1;
                    Arc::new(TenantRuntime::build(name, &t.value, setup, files).await?)
                }
            });
            if tenants.len() % 64 == 0 {
                // Thousands of tenants take a while to build: let this worker's other tasks (sessions)
                // run in between rather than wait for the whole snapshot.
                tokio::task::yield_now().await;
            }
        }
        let needs_tls = config
            .listeners
            .iter()
            .any(|l| l.value.tls != ListenerTls::None);
        let tls = if needs_tls {
            let resolver = Arc::new(SniResolver::from_config(&config, |name| {
                table.tenant_by_name(name)
            })?);
            let secret = match &config.tls_sessions.ticket_secret_file {
                Some(path) => Some(
                    crate::certs::read_ticket_secret(&config.resolve_path(path))
                        .map_err(|e| SharedError::TicketSecret(e.to_string()))?,
                ),
                None => None,
            };
            let server = crate::tls::server_config(
                resolver.clone(),
                &config.tls_sessions,
                secret.as_deref(),
            )?;
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
        let unbound = Reach::of(tenants.iter().map(|t| &**t));
        let proxy_headers_out = config.tenants.values().any(|t| {
            matches!(
                t.value.client_ip,
                ClientIpForwarding::ProxyV1 | ClientIpForwarding::ProxyV2
            )
        });
        let xclient_at_user = config.tenants.values().any(|t| {
            t.value.client_ip == ClientIpForwarding::Xclient && t.value.pool.xclient_at_user
        });
        Ok(Self {
            config,
            table,
            tenants,
            built: rebuilt,
            tls,
            listeners,
            unbound,
            proxy_headers_out,
            xclient_at_user,
            discovery,
        })
    }

    /// What a connection bound to `tenant` (or to none) can offer.
    /// A tenant's runtime state.
    pub fn tenant(&self, id: TenantId) -> Option<&TenantRuntime> {
        self.tenants.get(id.index()).map(|t| &**t)
    }

    /// A tenant's runtime state, shared.
    pub fn tenant_arc(&self, id: TenantId) -> Option<Arc<TenantRuntime>> {
        self.tenants.get(id.index()).cloned()
    }

    pub(super) fn reach(&self, tenant: Option<TenantId>) -> &Reach {
        match tenant.and_then(|t| self.tenant(t)) {
            Some(t) => &t.reach,
            None => &self.unbound,
        }
    }

    /// Whether some tenant reachable through this listener allows plaintext login.
    pub(super) fn plaintext_possible(&self, listener: &ListenerInfo) -> bool {
        self.reach(listener.tenant).plaintext
    }
}
