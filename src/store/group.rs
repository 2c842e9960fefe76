//! A tenant's stores at runtime: the current set (from config and DNS, swapped atomically when DNS
//! changes), each store's health, active sessions and pool of pre-warmed connections, and the login
//! procedure over them (choice, failover policy, pool checkout, passive ejection).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::balance::{Balancer, Candidate, Policy};
use super::connection::{
    self, AskCapa, ClientInfo, Connector, KnownCaps, LoggedIn, LoginError, Prepared, SaslRelay,
    StoreAuth,
};
use super::dns::{Discovery, Endpoint, Target};
use super::health::{self, HealthState, ProbeSettings};
use super::pool::{Pool, PoolSettings};
use crate::config::{HealthConfig, PoolConfig, StoreSpec, StoreTlsMode, TenantConfig};
use crate::metrics::Metrics;

/// One store of a group.
#[derive(Debug)]
pub struct Store {
    /// Where it is.
    pub endpoint: Endpoint,
    /// Stable identity (`host:port`): what consistent hashing uses, and the log/metric label.
    pub id: String,
    /// Up or down.
    pub health: Arc<HealthState>,
    /// TLS mode on the way to this store.
    pub tls_mode: StoreTlsMode,
    /// Its CAPA answer, so that new connections (pooled or not) need not ask each time.
    caps: Arc<KnownCaps>,
    active: AtomicUsize,
    pool: Option<Arc<Pool<Prepared>>>,
    /// Cancels this store's probe and refill tasks when it leaves the group.
    tasks: CancellationToken,
}

/// A session's hold on a store, for least-connections accounting; released on drop.
#[derive(Debug)]
pub struct ActiveSession(Arc<Store>);

impl ActiveSession {
    fn new(store: Arc<Store>) -> Self {
        store.active.fetch_add(1, Ordering::Relaxed);
        Self(store)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.0
    }
}

impl Drop for ActiveSession {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A store as shown by status pages and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// `host:port`.
    pub id: String,
    /// Resolved address.
    pub addr: std::net::SocketAddr,
    /// Health.
    pub up: bool,
    /// Sessions in flight.
    pub active: usize,
    /// Pre-warmed connections waiting.
    pub pool_idle: usize,
}

/// Why a group could not log a client in.
#[derive(Debug, thiserror::Error)]
pub enum GroupError {
    /// The store's own refusal, to pass on.
    #[error(transparent)]
    Login(#[from] LoginError),
    /// No store can take this user now (none configured or resolved, or the user's store is down and the
    /// stores do not share mail).
    #[error("no store available: {0}")]
    NoStore(String),
}

/// A tenant's stores and how to use them.
#[derive(Debug)]
pub struct StoreGroup {
    tenant: String,
    stores: ArcSwap<Vec<Arc<Store>>>,
    balancer: Balancer,
    shared_storage: bool,
    connector: Arc<Connector>,
    health: HealthConfig,
    pool: PoolConfig,
    weights: HashMap<(String, u16), (u32, StoreTlsMode)>,
    default_tls: StoreTlsMode,
    shutdown: CancellationToken,
    all_down: AtomicU64,
    metrics: Metrics,
}

impl StoreGroup {
    /// Resolves the tenant's stores once, starts health probes and pools, and keeps following DNS.
    pub async fn start(
        tenant: &str,
        config: &TenantConfig,
        connector: Arc<Connector>,
        discovery: Arc<Discovery>,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let mut targets = Vec::new();
        let mut weights = HashMap::new();
        for spec in &config.backends {
            match &spec.value {
                StoreSpec::Host { addr, weight, tls } => {
                    weights.insert(
                        (addr.host.clone(), addr.port),
                        (*weight, tls.unwrap_or(config.backend_tls.mode)),
                    );
                    targets.push(Target::Host {
                        host: addr.host.clone(),
                        port: addr.port,
                    });
                }
                StoreSpec::Srv { name } => targets.push(Target::Srv { name: name.clone() }),
            }
        }
        let group = Arc::new(Self {
            tenant: tenant.to_string(),
            stores: ArcSwap::from_pointee(Vec::new()),
            balancer: Balancer::new(config.balance),
            shared_storage: crate::config::Config::shared_storage(config),
            connector,
            health: config.health.clone(),
            pool: config.pool.clone(),
            weights,
            default_tls: config.backend_tls.mode,
            shutdown: shutdown.clone(),
            all_down: AtomicU64::new(0),
            metrics,
        });
        let mut updates = discovery.watch(targets, shutdown.clone()).await;
        group.apply(&updates.borrow_and_update());
        let weak = Arc::downgrade(&group);
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    changed = updates.changed() => if changed.is_err() { break },
                }
                let Some(group) = weak.upgrade() else { break };
                let endpoints = updates.borrow_and_update().clone();
                group.apply(&endpoints);
            }
        });
        group
    }

    /// The tenant's name.
    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// How often every store was down when a login came (they were tried anyway).
    pub fn all_down_count(&self) -> u64 {
        self.all_down.load(Ordering::Relaxed)
    }

    /// The current stores.
    pub fn status(&self) -> Vec<StoreStatus> {
        self.stores
            .load()
            .iter()
            .map(|s| StoreStatus {
                id: s.id.clone(),
                addr: s.endpoint.addr,
                up: s.health.is_up(),
                active: s.active.load(Ordering::Relaxed),
                pool_idle: s.pool.as_ref().map_or(0, |p| p.idle()),
            })
            .collect()
    }

    /// Swaps in a new endpoint list, keeping the state of stores that stay.
    fn apply(&self, endpoints: &[Endpoint]) {
        let current = self.stores.load_full();
        let mut next = Vec::with_capacity(endpoints.len());
        for ep in endpoints {
            if let Some(s) = current
                .iter()
                .find(|s| s.endpoint.addr == ep.addr && s.endpoint.host == ep.host)
            {
                next.push(s.clone());
                continue;
            }
            let store = self.new_store(ep.clone());
            info!(tenant = %self.tenant, store = %store.id, addr = %ep.addr, "store joined the group");
            next.push(store);
        }
        for gone in current
            .iter()
            .filter(|s| !next.iter().any(|n| Arc::ptr_eq(n, s)))
        {
            info!(tenant = %self.tenant, store = %gone.id, "store left the group");
            gone.tasks.cancel();
            self.metrics.backend_gone(&self.tenant, &gone.id);
        }
        if next.is_empty() && !current.is_empty() {
            warn!(tenant = %self.tenant, "the group has no stores now");
        }
        self.stores.store(Arc::new(next));
    }

    fn new_store(&self, mut endpoint: Endpoint) -> Arc<Store> {
        let mut tls_mode = self.default_tls;
        if let Some((w, mode)) = self
            .weights
            .get(&(endpoint.host.clone(), endpoint.addr.port()))
        {
            endpoint.weight = *w;
            tls_mode = *mode;
        }
        let id = if endpoint.host.contains(':') {
            format!("[{}]:{}", endpoint.host, endpoint.addr.port())
        } else {
            format!("{}:{}", endpoint.host, endpoint.addr.port())
        };
        let tasks = self.shutdown.child_token();
        let health = Arc::new(HealthState::default());
        let caps = Arc::new(KnownCaps::default());
        let pool = (self.pool.min_idle > 0 && self.connector.can_prewarm()).then(|| {
            let pool = Pool::new(PoolSettings {
                min_idle: self.pool.min_idle,
                max_idle: self.pool.max_idle,
                max_age: self.pool.max_age.get(),
                // Enough in flight to keep up with a busy tenant's logins once the pool has grown to
                // its demand (each connect waits for a greeting and CAPA), few enough that a restarted
                // store is not hit with a burst.
                max_concurrent_connects: 8,
            });
            let (connector, ep, tenant, store_id, known) = (
                self.connector.clone(),
                endpoint.clone(),
                self.tenant.clone(),
                id.clone(),
                caps.clone(),
            );
            pool.spawn_refill(
                move || {
                    let (connector, ep, known) = (connector.clone(), ep.clone(), known.clone());
                    async move {
                        connector
                            .prepare(&ep, tls_mode, None, AskCapa::Unless(&known))
                            .await
                    }
                },
                move |e: LoginError| {
                    tracing::debug!(tenant = %tenant, store = %store_id, error = %e, "pre-warming a connection failed")
                },
                tasks.clone(),
            );
            pool
        });
        if self.health.enabled {
            let settings = ProbeSettings {
                interval: self.health.interval.get(),
                timeout: self.health.timeout.get(),
                rise: self.health.rise,
                fall: self.health.fall,
            };
            let (tenant, store_id, metrics) =
                (self.tenant.clone(), id.clone(), self.metrics.clone());
            tokio::spawn(health::probe_loop(
                health::ProbeTarget {
                    connector: self.connector.clone(),
                    endpoint: endpoint.clone(),
                    mode: tls_mode,
                    caps: caps.clone(),
                },
                health.clone(),
                settings,
                move |up, reason| {
                    metrics.backend_up(&tenant, &store_id, up);
                    if up {
                        info!(tenant = %tenant, store = %store_id, "store is up");
                    } else {
                        warn!(tenant = %tenant, store = %store_id, reason = %reason, "store is down");
                    }
                },
                tasks.clone(),
            ));
        }
        Arc::new(Store {
            endpoint,
            id,
            health,
            tls_mode,
            caps,
            active: AtomicUsize::new(0),
            pool,
            tasks,
        })
    }

    /// Logs `user` in on a store chosen for `mailbox` (the normalised mailbox, for consistent hashing).
    /// Fails over to another store before login only when the stores share mail.
    pub async fn login(
        &self,
        mailbox: &str,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<(LoggedIn, ActiveSession), GroupError> {
        let stores = self.stores.load_full();
        if stores.is_empty() {
            return Err(GroupError::NoStore("the group has no stores".into()));
        }
        let candidates: Vec<Candidate<'_>> = stores
            .iter()
            .map(|s| Candidate {
                id: &s.id,
                weight: s.endpoint.weight.max(1),
                priority: s.endpoint.priority,
                healthy: s.health.is_up(),
                active: s.active.load(Ordering::Relaxed),
            })
            .collect();
        let choice = self.balancer.choose(&candidates, mailbox);
        if choice.all_down {
            self.all_down.fetch_add(1, Ordering::Relaxed);
            self.metrics.all_down(&self.tenant);
            warn!(tenant = %self.tenant, "every store is marked down; trying them anyway");
        }
        let attempts = if self.shared_storage {
            choice.order.len().min(3)
        } else {
            1
        };
        let mut last = None;
        for &i in choice.order.iter().take(attempts) {
            let Some(store) = stores.get(i) else { continue };
            if !self.shared_storage && !choice.all_down && !store.health.is_up() {
                // This user's mail lives on a store that is down; another store would show an empty mailbox.
                return Err(GroupError::NoStore(format!("{} is down", store.id)));
            }
            let session = ActiveSession::new(store.clone());
            match self.login_on(store, auth, client, relay).await {
                Ok(logged_in) => return Ok((logged_in, session)),
                Err(LoginError::Temporary(line)) if self.shared_storage && is_sys_temp(&line) => {
                    last = Some(LoginError::Temporary(line));
                }
                Err(e @ (LoginError::Unavailable(_) | LoginError::Dropped(_))) => {
                    warn!(tenant = %self.tenant, store = %store.id, error = %e, "store unavailable");
                    last = Some(e);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map_or_else(
            || GroupError::NoStore("no store could be tried".into()),
            GroupError::from,
        ))
    }

    async fn login_on(
        &self,
        store: &Store,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<LoggedIn, LoginError> {
        let forwarding = self.connector.client_ip;
        if let Some(pool) = &store.pool {
            let taken = pool.take().await;
            self.metrics
                .pool_checkout(&self.tenant, &store.id, taken.is_some());
            if let Some(prepared) = taken {
                let started = std::time::Instant::now();
                let result =
                    connection::login(prepared, auth, Some(client), forwarding, relay).await;
                self.metrics.backend_login(
                    &self.tenant,
                    &store.id,
                    started.elapsed().as_secs_f64(),
                );
                match result {
                    // A pooled connection can go stale between the check and the use (the store closed
                    // it): a fresh one decides. A store that did not answer in time gets no second wait.
                    Err(LoginError::Dropped(_)) => {}
                    other => return other,
                }
            }
        }
        let started = std::time::Instant::now();
        let prepared = self
            .connector
            .prepare(
                &store.endpoint,
                store.tls_mode,
                Some(client),
                AskCapa::Unless(&store.caps),
            )
            .await;
        self.metrics
            .backend_connect(&self.tenant, &store.id, started.elapsed().as_secs_f64());
        let prepared = match prepared {
            Ok(p) => {
                store.health.record_connect(true, self.health.fall);
                p
            }
            Err(e) => {
                if store.health.record_connect(false, self.health.fall) == Some(false) {
                    warn!(tenant = %self.tenant, store = %store.id, reason = %e, "store is down (failed connects)");
                }
                return Err(e);
            }
        };
        let started = std::time::Instant::now();
        let result = connection::login(prepared, auth, Some(client), forwarding, relay).await;
        self.metrics
            .backend_login(&self.tenant, &store.id, started.elapsed().as_secs_f64());
        result
    }

    /// A connection to the group's only store, made before the client is greeted, so the client can be shown
    /// that store's own greeting (APOP passthrough). None when the group has not exactly one store up.
    pub async fn prepare_for_greeting(
        &self,
        client: &ClientInfo,
    ) -> Option<(Prepared, ActiveSession)> {
        let stores = self.stores.load_full();
        let [store] = stores.as_slice() else {
            return None;
        };
        if !store.health.is_up() {
            return None;
        }
        let session = ActiveSession::new(store.clone());
        if let Some(pool) = &store.pool
            && let Some(p) = pool.take().await
        {
            self.metrics.pool_checkout(&self.tenant, &store.id, true);
            return Some((p, session));
        }
        let p = self
            .connector
            .prepare(
                &store.endpoint,
                store.tls_mode,
                Some(client),
                AskCapa::Unless(&store.caps),
            )
            .await
            .ok()?;
        Some((p, session))
    }

    /// Logs in on a connection from [`Self::prepare_for_greeting`].
    pub async fn login_prepared(
        &self,
        prepared: Prepared,
        store: &Store,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<LoggedIn, LoginError> {
        let started = std::time::Instant::now();
        let result = connection::login(
            prepared,
            auth,
            Some(client),
            self.connector.client_ip,
            relay,
        )
        .await;
        self.metrics
            .backend_login(&self.tenant, &store.id, started.elapsed().as_secs_f64());
        result
    }

    /// Logs in on a store named by someone else (an auth_http answer), with the tenant's connector.
    pub async fn login_direct(
        &self,
        endpoint: &Endpoint,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<LoggedIn, LoginError> {
        let prepared = self
            .connector
            .prepare(endpoint, self.default_tls, Some(client), AskCapa::Always)
            .await?;
        connection::login(
            prepared,
            auth,
            Some(client),
            self.connector.client_ip,
            relay,
        )
        .await
    }

    /// Sets the gauges that are read rather than counted (health, pool size), before a scrape.
    pub fn refresh_gauges(&self) {
        for s in self.stores.load().iter() {
            self.metrics
                .backend_up(&self.tenant, &s.id, s.health.is_up());
            if let Some(pool) = &s.pool {
                self.metrics.pool_idle(&self.tenant, &s.id, pool.idle());
            }
        }
    }
}

fn is_sys_temp(line: &[u8]) -> bool {
    matches!(crate::protocol::reply::Status::parse(line.strip_suffix(b"\r\n").unwrap_or(line)),
        Ok(crate::protocol::reply::Status::Err { code: Some(c) }) if c == "SYS/TEMP")
}

impl Drop for StoreGroup {
    fn drop(&mut self) {
        for s in self.stores.load().iter() {
            s.tasks.cancel();
        }
    }
}

/// The policy a group uses, for logs.
pub fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::RoundRobin => "round_robin",
        Policy::LeastConnections => "least_connections",
        Policy::ConsistentHash => "consistent_hash",
    }
}
