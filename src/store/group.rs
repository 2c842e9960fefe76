//! A tenant's stores: the current members (from config and DNS, swapped atomically when DNS changes),
//! each a [`Store`] shared through the process's [`Registry`] with every other tenant that lists it,
//! plus what is the tenant's own: weights, the balancing policy and whether its stores share mail. The
//! login procedure over them: choice, failover policy, the store's cap on logins in flight, pool
//! checkout, passive ejection.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arc_swap::ArcSwap;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::balance::{Balancer, Candidate, Policy};
use super::connection::{
    self, AskCapa, ClientInfo, LoggedIn, LoginError, Prepared, SaslRelay, StoreAuth,
};
use super::dns::{DnsError, DnsSettings, Endpoint, Target};
use super::registry::{IntroductionSlot, NameWatch, Profile, Registry, Store};
use crate::config::{ClientIpForwarding, StoreSpec, StoreTlsMode, TenantConfig};
use crate::metrics::Metrics;

/// One of a tenant's stores: the shared store and the tenant's own weight and priority for it.
#[derive(Debug, Clone)]
pub struct Member {
    /// The store (shared with other tenants).
    pub store: Arc<Store>,
    /// This tenant's weight for it (from its config, or SRV).
    pub weight: u32,
    /// SRV priority (lower is preferred); 0 for static stores.
    pub priority: u16,
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

/// A pooled connection held for one client between its USER and PASS, XCLIENT already sent
/// ([`StoreGroup::introduce`]).
#[derive(Debug)]
pub struct Introduced {
    prepared: Prepared,
    slot: IntroductionSlot,
}

/// A store as shown by status pages and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreStatus {
    /// The store's label (`host:port`).
    pub id: String,
    /// Resolved address.
    pub addr: std::net::SocketAddr,
    /// Health.
    pub up: bool,
    /// Sessions in flight, across every tenant using the store.
    pub active: usize,
    /// Pre-warmed connections waiting (shared by every tenant using the store).
    pub pool_idle: usize,
}

impl StoreStatus {
    /// The status of one store.
    pub fn of(store: &Store) -> Self {
        Self {
            id: store.label.clone(),
            addr: store.endpoint.addr,
            up: store.health.is_up(),
            active: store.active(),
            pool_idle: store.pool_idle(),
        }
    }
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
    members: ArcSwap<Vec<Member>>,
    balancer: Balancer,
    shared_storage: bool,
    profile: Arc<Profile>,
    registry: Arc<Registry>,
    names: Vec<Arc<NameWatch>>,
    weights: HashMap<(String, u16), (u32, StoreTlsMode)>,
    default_tls: StoreTlsMode,
    all_down: AtomicU64,
    /// Whether the last login found every store down (logged once per change, not per login).
    all_down_now: AtomicBool,
    metrics: Metrics,
    /// Ends the DNS-following tasks when the group goes (it may outlive the snapshot that built it).
    follow: CancellationToken,
}

impl Drop for StoreGroup {
    fn drop(&mut self) {
        self.follow.cancel();
    }
}

impl StoreGroup {
    /// The tenant's stores from the registry (names already followed answer at once; new ones are looked
    /// up now), following DNS changes while the group lives (and until `stop`, the process's end).
    pub async fn start(
        tenant: &str,
        config: &TenantConfig,
        profile: Arc<Profile>,
        registry: Arc<Registry>,
        dns: &DnsSettings,
        metrics: Metrics,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, DnsError> {
        let mut targets = Vec::new();
        let mut weights = HashMap::new();
        for spec in &config.backends {
            let target = match &spec.value {
                StoreSpec::Host { addr, weight, tls } => {
                    weights.insert(
                        (addr.host.clone(), addr.port),
                        (*weight, tls.unwrap_or(config.backend_tls.mode)),
                    );
                    Target::Host {
                        host: addr.host.clone(),
                        port: addr.port,
                    }
                }
                StoreSpec::Srv { name } => Target::Srv { name: name.clone() },
            };
            if !targets.contains(&target) {
                targets.push(target);
            }
        }
        let names = registry.names(dns, &targets).await?;
        let group = Arc::new(Self {
            tenant: tenant.to_string(),
            members: ArcSwap::from_pointee(Vec::new()),
            balancer: Balancer::new(config.balance),
            shared_storage: crate::config::Config::shared_storage(config),
            profile,
            registry,
            names,
            weights,
            default_tls: config.backend_tls.mode,
            all_down: AtomicU64::new(0),
            all_down_now: AtomicBool::new(false),
            metrics,
            follow: stop.child_token(),
        });
        group.apply();
        for name in &group.names {
            // Static names never change: nothing to follow.
            if matches!(&name.target, Target::Host { host, .. } if host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok())
            {
                continue;
            }
            let mut updates = name.subscribe();
            let (weak, shutdown) = (Arc::downgrade(&group), group.follow.clone());
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        changed = updates.changed() => if changed.is_err() { break },
                    }
                    let Some(group) = weak.upgrade() else { break };
                    group.apply();
                }
            });
        }
        Ok(group)
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
        self.members
            .load()
            .iter()
            .map(|m| StoreStatus::of(&m.store))
            .collect()
    }

    /// Rebuilds the member list from the names' current answers, keeping every store that stays.
    fn apply(&self) {
        let mut endpoints: Vec<Endpoint> = self
            .names
            .iter()
            .flat_map(|n| n.subscribe().borrow().clone())
            .collect();
        endpoints.sort();
        endpoints.dedup();
        let current = self.members.load_full();
        let next: Vec<Member> = endpoints
            .iter()
            .map(|ep| {
                let (weight, mode) = self
                    .weights
                    .get(&(ep.host.clone(), ep.addr.port()))
                    .copied()
                    .unwrap_or((ep.weight, self.default_tls));
                let store = current
                    .iter()
                    .find(|m| {
                        m.store.endpoint.addr == ep.addr
                            && m.store.endpoint.host == ep.host
                            && m.store.tls_mode == mode
                    })
                    .map(|m| m.store.clone())
                    .unwrap_or_else(|| self.registry.store(ep, mode, &self.profile));
                Member {
                    store,
                    weight: weight.max(1),
                    priority: ep.priority,
                }
            })
            .collect();
        for gone in current
            .iter()
            .filter(|m| !next.iter().any(|n| Arc::ptr_eq(&n.store, &m.store)))
        {
            info!(tenant = %self.tenant, store = %gone.store.label, "store left the tenant's group");
            self.metrics.backend_gone(&self.tenant, &gone.store.label);
        }
        if next.is_empty() && !current.is_empty() {
            warn!(tenant = %self.tenant, "the group has no stores now");
        }
        self.members.store(Arc::new(next));
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
        let members = self.members.load_full();
        if members.is_empty() {
            return Err(GroupError::NoStore("the group has no stores".into()));
        }
        let candidates = candidates(&members);
        let mut choice = self.balancer.choose(&candidates, mailbox);
        self.note_all_down(choice.all_down);
        let closed = |i: &usize| members.get(*i).is_some_and(|m| !m.store.takes_logins());
        if choice.order.iter().any(closed) {
            match choice.order.first() {
                // This user's mail lives on that store: another one would show an empty mailbox.
                Some(first) if closed(first) && !self.shared_storage && self.hashes_mailboxes() => {
                    let label = members.get(*first).map_or("", |m| m.store.label.as_str());
                    return Err(GroupError::NoStore(format!(
                        "{label} takes no new logins (operator: drain or maint)"
                    )));
                }
                _ => choice.order.retain(|i| !closed(i)),
            }
            if choice.order.is_empty() {
                return Err(GroupError::NoStore(
                    "every store takes no new logins (operator: drain or maint)".into(),
                ));
            }
        }
        if self.shared_storage && !choice.all_down {
            // Every store holds the mail: a store known to be down is tried last, whatever the policy
            // (consistent hashing ranks by mailbox alone, to keep users where their mail is).
            choice.order.sort_by_key(|&i| !candidates[i].healthy);
        }
        let attempts = if self.shared_storage {
            choice.order.len().min(3)
        } else {
            1
        };
        let mut last = None;
        for &i in choice.order.iter().take(attempts) {
            let Some(member) = members.get(i) else {
                continue;
            };
            let store = &member.store;
            if !self.shared_storage && !choice.all_down && !store.health.is_up() {
                // This user's mail lives on a store that is down; another store would show an empty mailbox.
                return Err(GroupError::NoStore(format!("{} is down", store.label)));
            }
            let Some(_waiting) = store.begin_login() else {
                last = Some(LoginError::Unavailable(format!(
                    "{} has max_logins_in_flight logins waiting",
                    store.label
                )));
                continue;
            };
            let session = ActiveSession::new(store.clone());
            match self.login_on(store, auth, client, relay).await {
                Ok(logged_in) => return Ok((logged_in, session)),
                Err(LoginError::Temporary(line)) if self.shared_storage && is_sys_temp(&line) => {
                    last = Some(LoginError::Temporary(line));
                }
                Err(e @ (LoginError::Unavailable(_) | LoginError::Dropped(_))) => {
                    warn!(tenant = %self.tenant, store = %store.label, error = %e, "store unavailable");
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

    /// Takes an idle pooled connection on the store a login for `mailbox` would go to now and sends it
    /// XCLIENT for `client`: done at the client's USER, the client's PASS then costs one store round trip
    /// instead of two. None where the tenant did not ask for it (`pool.xclient_at_user`), or where that
    /// gains nothing or costs a connection of its own: `client_ip` is not `xclient` or the store does not
    /// offer it, the store has no idle pooled connection, is down or takes no logins, every store is down,
    /// or the store's introduction slots are all held (see [`Store::hold_for_introduction`]).
    pub async fn introduce(&self, mailbox: &str, client: &ClientInfo) -> Option<Introduced> {
        if !self.profile.pool.xclient_at_user
            || self.profile.connector.client_ip != ClientIpForwarding::Xclient
        {
            return None;
        }
        let members = self.members.load_full();
        // The login that uses the connection will not choose again: the round-robin turn is taken only
        // once the connection is.
        let choice = self.balancer.peek(&candidates(&members), mailbox);
        if choice.all_down {
            return None;
        }
        let store = &members.get(*choice.order.first()?)?.store;
        let pool = store.pool.as_ref()?;
        let ready = store.health.is_up() && store.takes_logins() && store.caps.offers_xclient();
        if !ready || pool.idle() == 0 {
            return None;
        }
        let slot = store.hold_for_introduction()?;
        let mut prepared = pool.take().await?;
        self.balancer.take_turn();
        store.metrics.checkout(true);
        // A connection whose greeting did not offer XCLIENT is still this client's to log in on.
        if prepared.offers_xclient() && prepared.introduce(client).await.is_err() {
            return None;
        }
        Some(Introduced { prepared, slot })
    }

    /// Logs in on the connection [`Self::introduce`] prepared when its store is still one of the group's,
    /// up and taking logins; otherwise, or when the store closed that connection meanwhile, as
    /// [`Self::login`] does.
    pub async fn login_introduced(
        &self,
        introduced: Introduced,
        mailbox: &str,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<(LoggedIn, ActiveSession), GroupError> {
        let Introduced { prepared, slot } = introduced;
        let store = slot.store().clone();
        drop(slot);
        let member = self
            .members
            .load()
            .iter()
            .any(|m| Arc::ptr_eq(&m.store, &store));
        if member
            && store.health.is_up()
            && store.takes_logins()
            && let Some(_waiting) = store.begin_login()
        {
            let session = ActiveSession::new(store.clone());
            match self
                .timed_login(&store, prepared, auth, client, relay)
                .await
            {
                // Closed while the client typed its password: a fresh connection decides, as in `login_on`.
                Err(LoginError::Dropped(_)) => {}
                other => return Ok((other?, session)),
            }
        }
        self.login(mailbox, auth, client, relay).await
    }

    /// Whether the group places mailboxes by consistent hashing (a user's mail is on one store).
    fn hashes_mailboxes(&self) -> bool {
        matches!(
            self.balancer.policy(),
            super::balance::Policy::ConsistentHash
        )
    }

    /// The store a placement answer names: a store's label or id, its endpoint as `ip:port` or
    /// `host:port` (`port` defaulting to `default_port`), or a host alone (its first store).
    pub fn member_named(&self, name: &str, default_port: u16) -> Option<Arc<Store>> {
        let members = self.members.load();
        let (host, port) = crate::vocab::split_host_port(name, default_port);
        let by_name = members
            .iter()
            .find(|m| m.store.label == name || m.store.id == name);
        let by_endpoint = || {
            members.iter().find(|m| {
                let e = &m.store.endpoint;
                e.addr.port() == port
                    && (e.host.eq_ignore_ascii_case(host) || e.addr.ip().to_string() == host)
            })
        };
        by_name.or_else(by_endpoint).map(|m| m.store.clone())
    }

    /// Logs in on `store`, one of the group's (a placement answer): no other store is tried, since the
    /// mailbox lives there. A store that is down or takes no logins (drain, maint) is no store now.
    pub async fn login_at(
        &self,
        store: &Arc<Store>,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<(LoggedIn, ActiveSession), GroupError> {
        if !store.takes_logins() {
            return Err(GroupError::NoStore(format!(
                "{} takes no new logins (operator: drain or maint)",
                store.label
            )));
        }
        if !store.health.is_up() {
            return Err(GroupError::NoStore(format!("{} is down", store.label)));
        }
        let Some(_waiting) = store.begin_login() else {
            return Err(GroupError::Login(LoginError::Unavailable(format!(
                "{} has max_logins_in_flight logins waiting",
                store.label
            ))));
        };
        let session = ActiveSession::new(store.clone());
        let logged_in = self.login_on(store, auth, client, relay).await?;
        Ok((logged_in, session))
    }

    /// Counts a login that found every store down, logging when that starts and when it ends (one
    /// line per change, not per login).
    fn note_all_down(&self, all_down: bool) {
        if all_down {
            self.all_down.fetch_add(1, Ordering::Relaxed);
            self.metrics.all_down(&self.tenant);
            if !self.all_down_now.swap(true, Ordering::Relaxed) {
                warn!(tenant = %self.tenant, "every store is marked down; trying them anyway until one is up");
            }
        } else if self.all_down_now.swap(false, Ordering::Relaxed) {
            info!(tenant = %self.tenant, "a store is up again");
        }
    }

    async fn login_on(
        &self,
        store: &Store,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<LoggedIn, LoginError> {
        let connector = &self.profile.connector;
        if let Some(pool) = &store.pool {
            let taken = pool.take().await;
            store.metrics.checkout(taken.is_some());
            if let Some(prepared) = taken {
                let result = self.timed_login(store, prepared, auth, client, relay).await;
                match result {
                    // A pooled connection can go stale between the check and the use (the store closed
                    // it): a fresh one decides. A store that did not answer in time gets no second wait.
                    Err(LoginError::Dropped(_)) => {}
                    other => return other,
                }
            }
        }
        let started = std::time::Instant::now();
        let prepared = connector
            .prepare(
                &store.endpoint,
                store.tls_mode,
                Some(client),
                AskCapa::Unless(&store.caps),
            )
            .await;
        let secs = started.elapsed().as_secs_f64();
        store.metrics.connect.observe(secs);
        self.metrics
            .backend_connect(&self.tenant, &store.label, secs);
        let prepared = match prepared {
            Ok(p) => {
                store.connected();
                p
            }
            Err(e) => {
                store.failed(&e);
                return Err(e);
            }
        };
        self.timed_login(store, prepared, auth, client, relay).await
    }

    /// The login on a prepared connection, timed; a store that does not answer in time counts towards
    /// its passive ejection.
    async fn timed_login(
        &self,
        store: &Store,
        prepared: Prepared,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<LoggedIn, LoginError> {
        let started = std::time::Instant::now();
        let result = connection::login(
            prepared,
            auth,
            Some(client),
            self.profile.connector.client_ip,
            relay,
        )
        .await;
        let secs = started.elapsed().as_secs_f64();
        store.metrics.login.observe(secs);
        self.metrics.backend_login(&self.tenant, &store.label, secs);
        if let Err(e @ LoginError::Unavailable(_)) = &result {
            store.failed(e);
        }
        result
    }

    /// A connection to the group's only store, made before the client is greeted, so the client can be shown
    /// that store's own greeting (APOP passthrough). None when the group has not exactly one store up.
    pub async fn prepare_for_greeting(
        &self,
        client: &ClientInfo,
    ) -> Option<(Prepared, ActiveSession)> {
        let members = self.members.load_full();
        let [member] = members.as_slice() else {
            return None;
        };
        let store = &member.store;
        if !store.health.is_up() || !store.takes_logins() {
            return None;
        }
        let session = ActiveSession::new(store.clone());
        if let Some(pool) = &store.pool
            && let Some(p) = pool.take().await
        {
            store.metrics.checkout(true);
            return Some((p, session));
        }
        let p = self
            .profile
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
        self.timed_login(store, prepared, auth, client, relay).await
    }

    /// Logs in on a store named by someone else (an auth_http answer), with the tenant's connector.
    pub async fn login_direct(
        &self,
        endpoint: &Endpoint,
        auth: &StoreAuth<'_>,
        client: &ClientInfo,
        relay: &mut impl SaslRelay,
    ) -> Result<LoggedIn, LoginError> {
        let connector = &self.profile.connector;
        let prepared = connector
            .prepare(endpoint, self.default_tls, Some(client), AskCapa::Always)
            .await?;
        connection::login(prepared, auth, Some(client), connector.client_ip, relay).await
    }

    /// Sets the tenant's gauges that are read rather than counted (its stores, and how many are up),
    /// before a scrape. The stores' own gauges are the registry's.
    pub fn refresh_gauges(&self) {
        let members = self.members.load();
        let up = members.iter().filter(|m| m.store.health.is_up()).count();
        self.metrics.tenant_stores(&self.tenant, members.len(), up);
    }
}

fn is_sys_temp(line: &[u8]) -> bool {
    matches!(crate::protocol::reply::Status::parse(line.strip_suffix(b"\r\n").unwrap_or(line)),
        Ok(crate::protocol::reply::Status::Err { code: Some(c) }) if c == "SYS/TEMP")
}

/// The balancer's view of the members: a store the operator drains or maintains counts as down (and
/// [`StoreGroup::login`] then leaves it out).
fn candidates(members: &[Member]) -> Vec<Candidate<'_>> {
    members
        .iter()
        .map(|m| Candidate {
            id: &m.store.id,
            weight: m.store.weight().unwrap_or(m.weight),
            priority: m.priority,
            healthy: m.store.health.is_up() && m.store.takes_logins(),
            active: m.store.active(),
        })
        .collect()
}

/// The policy a group uses, for logs.
pub fn policy_name(p: Policy) -> &'static str {
    match p {
        Policy::RoundRobin => "round_robin",
        Policy::LeastConnections => "least_connections",
        Policy::ConsistentHash => "consistent_hash",
    }
}
