//! The process's stores, shared by every tenant and every config snapshot.
//!
//! A store is one endpoint (address and host name) reached with one set of connection settings (a
//! [`Profile`]: TLS mode and verification, client certificate, client-IP mode, health and pool settings,
//! timeouts). Every tenant that lists it shares one [`Store`]: one health state and probe loop, one pool
//! of pre-warmed connections, one remembered CAPA, one set of store metrics. What differs per login
//! (XCLIENT, the login name) is sent after checkout, so one pool serves every tenant. The cost of stores
//! follows the number of stores and the login rate, not the number of tenants.
//!
//! The registry holds its entries weakly: a store lives while some tenant's group (of any snapshot)
//! holds it, so a reload that keeps a store keeps its pool, health and counters, and a store no tenant
//! lists any more is closed when the last snapshot using it goes. DNS names are followed the same way:
//! one [`NameWatch`] per name however many tenants list it, carried over a reload with its last good
//! answer, so a reload never waits on a lookup it has already made.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::connection::{AskCapa, Connector, KnownCaps, LoginError, Prepared};
use super::dns::{Discovery, DnsError, DnsSettings, Endpoint, Target};
use super::health::{self, HealthState, ProbeSettings};
use super::pool::{IdleBudget, Pool, PoolSettings};
use crate::config::{HealthConfig, PoolConfig, StoreTlsMode};
use crate::metrics::{Metrics, StoreMetrics};

/// How stores are reached and watched: shared by every store (of every tenant) with the same settings.
#[derive(Debug)]
pub struct Profile {
    /// What identifies these settings (no secret: paths, modes, numbers and file digests).
    key: String,
    /// Connects, does TLS and reads greetings.
    pub connector: Arc<Connector>,
    /// Probes and passive ejection.
    pub health: HealthConfig,
    /// Pre-warming.
    pub pool: PoolConfig,
}

impl Profile {
    /// The key two tenants' settings must share for their stores to be one.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// One store, shared by every tenant that lists it with the same [`Profile`].
#[derive(Debug)]
pub struct Store {
    /// Where it is: the address, and the DNS name or IP literal it came from (the TLS server name).
    /// Weight and priority are each tenant's own ([`super::group::Member`]).
    pub endpoint: Endpoint,
    /// Stable identity (`host:port`): what consistent hashing uses.
    pub id: String,
    /// The metric label and the name in logs and on the status page: `id`, with a suffix when another
    /// profile reaches the same endpoint.
    pub label: String,
    /// Up or down.
    pub health: Arc<HealthState>,
    /// TLS mode on the way to this store.
    pub tls_mode: StoreTlsMode,
    /// How it is reached.
    pub profile: Arc<Profile>,
    /// Its CAPA answer, so that new connections need not ask each time.
    pub(super) caps: Arc<KnownCaps>,
    /// Sessions logged in (least connections, across tenants).
    pub(super) active: AtomicUsize,
    /// Logins waiting on the store now (connect, greeting, login answer).
    in_flight: AtomicUsize,
    /// Pooled connections held for clients between their USER and PASS ([`Store::hold_for_introduction`]).
    introductions: AtomicUsize,
    /// The operator's runtime state (a [`StoreState`] as u8), held until the next reload.
    state: AtomicU8,
    /// The operator's runtime weight for every tenant listing the store (0: the configured weights).
    weight: AtomicU32,
    /// Bytes relayed client to store and store to client by ended sessions.
    bytes: [AtomicU64; 2],
    pub(super) pool: Option<Arc<Pool<Prepared>>>,
    pub(super) metrics: StoreMetrics,
    /// Cancels the probe and refill tasks when the last group lets go of the store.
    tasks: CancellationToken,
}

/// A store's runtime state, set by the operator through the admin API and held until the next reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StoreState {
    /// Takes new logins.
    Ready = 0,
    /// Takes no new logins; its sessions go on.
    Drain = 1,
    /// Takes no new logins; its sessions were ended (without QUIT, so nothing is committed).
    Maint = 2,
}

impl StoreState {
    /// The name in the admin API, `/status` and the `state` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ready => "ready",
            Self::Drain => "drain",
            Self::Maint => "maint",
        }
    }

    /// The state a name stands for.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "ready" => Some(Self::Ready),
            "drain" => Some(Self::Drain),
            "maint" => Some(Self::Maint),
            _ => None,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Drain,
            2 => Self::Maint,
            _ => Self::Ready,
        }
    }
}

/// A login's hold on a store's in-flight count; released on drop.
#[derive(Debug)]
pub struct InFlight<'a>(&'a Store);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.metrics.in_flight.dec();
    }
}

/// A client's hold on one of a store's introduction slots; released on drop.
#[derive(Debug)]
pub struct IntroductionSlot(Arc<Store>);

impl IntroductionSlot {
    /// The store the slot is on.
    pub fn store(&self) -> &Arc<Store> {
        &self.0
    }
}

impl Drop for IntroductionSlot {
    fn drop(&mut self) {
        self.0.introductions.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Store {
    /// A slot to hold a pooled connection for a client between its USER and PASS, unless the store's
    /// pool's `max_idle` slots are held already: clients that send USER and never PASS hold at most that
    /// many of a store's connections, and a login without a slot is only one round trip slower.
    pub fn hold_for_introduction(self: &Arc<Self>) -> Option<IntroductionSlot> {
        let cap = self.profile.pool.max_idle;
        self.introductions
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()?;
        Some(IntroductionSlot(self.clone()))
    }

    /// Counts a login as waiting on this store, unless `max_logins_in_flight` (when set) is reached.
    pub fn begin_login(&self) -> Option<InFlight<'_>> {
        let cap = self.profile.pool.max_logins_in_flight;
        let taken = self
            .in_flight
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (cap == 0 || n < cap).then_some(n + 1)
            });
        if taken.is_err() {
            self.metrics.refused.inc();
            return None;
        }
        self.metrics.in_flight.inc();
        Some(InFlight(self))
    }

    /// The operator's runtime state.
    pub fn state(&self) -> StoreState {
        StoreState::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Whether the store takes new logins (its runtime state is `ready`).
    pub fn takes_logins(&self) -> bool {
        self.state() == StoreState::Ready
    }

    /// The operator's runtime weight, if set: it replaces every tenant's configured weight.
    pub fn weight(&self) -> Option<u32> {
        match self.weight.load(Ordering::Relaxed) {
            0 => None,
            w => Some(w),
        }
    }

    /// Sets the runtime state and, when given, the weight (`Some(0)` goes back to the configured ones).
    /// Logged; the gauges follow.
    pub fn control(&self, state: Option<StoreState>, weight: Option<u32>) {
        if let Some(state) = state {
            let was = StoreState::from_u8(self.state.swap(state as u8, Ordering::Relaxed));
            if was != state {
                info!(store = %self.label, from = was.as_str(), to = state.as_str(), "store state set by the operator");
            }
        }
        if let Some(w) = weight {
            self.weight.store(w, Ordering::Relaxed);
            info!(store = %self.label, weight = w, "store weight set by the operator (0: the configured weights)");
        }
        self.refresh_gauges();
    }

    /// Back to `ready` and the configured weights (a reload or config change ends runtime settings).
    fn reset_control(&self) {
        let was = StoreState::from_u8(self.state.swap(StoreState::Ready as u8, Ordering::Relaxed));
        let weight = self.weight.swap(0, Ordering::Relaxed);
        if was != StoreState::Ready || weight != 0 {
            info!(store = %self.label, "runtime store state and weight cleared by the reload");
        }
        self.refresh_gauges();
    }

    /// Counts an ended session's bytes (client to store, store to client).
    pub fn count_bytes(&self, up: u64, down: u64) {
        self.bytes[0].fetch_add(up, Ordering::Relaxed);
        self.bytes[1].fetch_add(down, Ordering::Relaxed);
    }

    /// Bytes relayed by ended sessions: (client to store, store to client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.bytes[0].load(Ordering::Relaxed),
            self.bytes[1].load(Ordering::Relaxed),
        )
    }

    /// Logins waiting on the store now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Connect and login p95 since the start (bucket upper bounds).
    pub fn p95s(&self) -> (Option<f64>, Option<f64>) {
        self.metrics.p95s()
    }

    /// Sessions logged in now, across tenants.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Idle pre-warmed connections now.
    pub fn pool_idle(&self) -> usize {
        self.pool.as_ref().map_or(0, |p| p.idle())
    }

    /// A login's connection was made (connect, TLS, greeting): the failure streak starts over.
    pub fn connected(&self) {
        self.health.record_connect(true, self.profile.health.fall);
    }

    /// A login's connect, greeting or login answer failed or timed out: `fall` in a row take the store
    /// down until probes bring it back. Logs the flip.
    pub fn failed(&self, why: &dyn std::fmt::Display) {
        if self.health.record_connect(false, self.profile.health.fall) == Some(false) {
            self.metrics.up.set(0);
            warn!(store = %self.label, reason = %why, "store is down (logins failed or timed out)");
        }
    }

    /// Sets the gauges read rather than counted (pool size, health), before a scrape.
    pub fn refresh_gauges(&self) {
        self.metrics.up.set(i64::from(self.health.is_up()));
        self.metrics.state(self.state().as_str());
        self.metrics
            .weight
            .set(i64::from(self.weight().unwrap_or(0)));
        self.metrics
            .idle
            .set(i64::try_from(self.pool_idle()).unwrap_or(i64::MAX));
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        self.tasks.cancel();
        debug!(store = %self.label, "store closed: no tenant lists it any more");
    }
}

/// One DNS name (or IP literal) followed by TTL, shared by every group that lists it; its last good
/// answer outlives DNS outages and reloads.
#[derive(Debug)]
pub struct NameWatch {
    /// The target.
    pub target: Target,
    answers: watch::Receiver<Vec<Endpoint>>,
    stop: CancellationToken,
}

impl NameWatch {
    /// A receiver of the name's current answer (the last good one while DNS fails).
    pub fn subscribe(&self) -> watch::Receiver<Vec<Endpoint>> {
        self.answers.clone()
    }
}

impl Drop for NameWatch {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct StoreKey {
    addr: SocketAddr,
    host: String,
    mode: StoreTlsMode,
    profile: String,
}

#[derive(Debug, Default)]
struct Inner {
    stores: HashMap<StoreKey, Weak<Store>>,
    profiles: HashMap<String, Weak<Profile>>,
    /// The resolver for the current `dns:` settings and the names it follows.
    discovery: Option<(DnsSettings, Arc<Discovery>)>,
    names: HashMap<Target, Weak<NameWatch>>,
}

/// The process's stores, profiles and followed names.
#[derive(Debug)]
pub struct Registry {
    metrics: Metrics,
    /// The process's stop: every store task ends with it at the latest.
    stop: CancellationToken,
    /// Idle connections across every store's pool (`limits.max_idle_store_connections`).
    idle_budget: Arc<IdleBudget>,
    inner: Mutex<Inner>,
}

impl Registry {
    /// An empty registry.
    pub fn new(metrics: Metrics, stop: CancellationToken) -> Self {
        Self {
            metrics,
            stop,
            idle_budget: IdleBudget::new(0),
            inner: Mutex::default(),
        }
    }

    /// Sets the cap on idle connections across every pool (0: none), from `limits`.
    pub fn set_idle_cap(&self, cap: usize) {
        self.idle_budget.set_cap(cap);
    }

    /// Idle connections and refill connects in progress, across every pool.
    pub fn idle_connections(&self) -> usize {
        self.idle_budget.used()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The profile for `key`, made by `make` when no live one has that key.
    pub fn profile<E>(
        &self,
        key: String,
        make: impl FnOnce() -> Result<(Connector, HealthConfig, PoolConfig), E>,
    ) -> Result<Arc<Profile>, E> {
        if let Some(p) = self.lock().profiles.get(&key).and_then(Weak::upgrade) {
            return Ok(p);
        }
        let (connector, health, pool) = make()?;
        let profile = Arc::new(Profile {
            key: key.clone(),
            connector: Arc::new(connector),
            health,
            pool,
        });
        let mut inner = self.lock();
        inner.profiles.retain(|_, p| p.strong_count() > 0);
        // Another builder may have won the race: theirs is as good, keep one.
        if let Some(p) = inner.profiles.get(&key).and_then(Weak::upgrade) {
            return Ok(p);
        }
        inner.profiles.insert(key, Arc::downgrade(&profile));
        Ok(profile)
    }

    /// The process's resolver for `settings`: the one in use, or a new one when the `dns:` settings
    /// changed (names are then followed afresh with it; groups of older snapshots keep their watches
    /// until they go). Store names and auth_http's `Auth-Server` names are resolved with it.
    pub fn discovery(&self, settings: &DnsSettings) -> Result<Arc<Discovery>, DnsError> {
        let mut inner = self.lock();
        if let Some((s, d)) = &inner.discovery
            && s == settings
        {
            return Ok(d.clone());
        }
        let d = Arc::new(Discovery::new(settings.clone())?.with_metrics(self.metrics.clone()));
        inner.discovery = Some((settings.clone(), d.clone()));
        inner.names.clear();
        Ok(d)
    }

    /// Watches for `targets` with a resolver for `settings`: names already followed are shared (their
    /// last answer at once, no lookup); new ones are looked up now, concurrently.
    pub async fn names(
        &self,
        settings: &DnsSettings,
        targets: &[Target],
    ) -> Result<Vec<Arc<NameWatch>>, DnsError> {
        let discovery = self.discovery(settings)?;
        let mut out: Vec<Option<Arc<NameWatch>>> = {
            let inner = self.lock();
            targets
                .iter()
                .map(|t| inner.names.get(t).and_then(Weak::upgrade))
                .collect()
        };
        let missing: Vec<usize> = (0..targets.len()).filter(|&i| out[i].is_none()).collect();
        let mut made = tokio::task::JoinSet::new();
        for i in missing {
            let (discovery, target, stop) = (
                discovery.clone(),
                targets[i].clone(),
                self.stop.child_token(),
            );
            made.spawn(async move {
                let answers = discovery.watch(vec![target.clone()], stop.clone()).await;
                (
                    i,
                    NameWatch {
                        target,
                        answers,
                        stop,
                    },
                )
            });
        }
        while let Some(joined) = made.join_next().await {
            let Ok((i, watch)) = joined else { continue };
            let watch = Arc::new(watch);
            let mut inner = self.lock();
            let kept = match inner.names.get(&watch.target).and_then(Weak::upgrade) {
                Some(existing) => existing,
                None => {
                    inner
                        .names
                        .insert(watch.target.clone(), Arc::downgrade(&watch));
                    watch
                }
            };
            out[i] = Some(kept);
        }
        self.lock().names.retain(|_, w| w.strong_count() > 0);
        Ok(out.into_iter().flatten().collect())
    }

    /// The store at `endpoint` reached with `profile` (in TLS `mode`): the live one, or a new one with its
    /// probe loop and pool started.
    pub fn store(
        &self,
        endpoint: &Endpoint,
        mode: StoreTlsMode,
        profile: &Arc<Profile>,
    ) -> Arc<Store> {
        let key = StoreKey {
            addr: endpoint.addr,
            host: endpoint.host.clone(),
            mode,
            profile: profile.key.clone(),
        };
        let mut inner = self.lock();
        if let Some(s) = inner.stores.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        inner.stores.retain(|_, s| s.strong_count() > 0);
        let id = if endpoint.host.contains(':') {
            format!("[{}]:{}", endpoint.host, endpoint.addr.port())
        } else {
            format!("{}:{}", endpoint.host, endpoint.addr.port())
        };
        // Two profiles reaching one endpoint are two stores: their series must not collide, so a twin
        // takes the first label no live twin has (`id`, `id#2`, `id#3`, …).
        let taken: Vec<String> = inner
            .stores
            .values()
            .filter_map(Weak::upgrade)
            .filter(|s| s.id == id)
            .map(|s| s.label.clone())
            .collect();
        let label = std::iter::once(id.clone())
            .chain((2..).map(|n| format!("{id}#{n}")))
            .find(|l| !taken.contains(l))
            .unwrap_or_else(|| id.clone());
        let store = Arc::new(self.start_store(endpoint, id, label, mode, profile.clone()));
        inner.stores.insert(key, Arc::downgrade(&store));
        info!(store = %store.label, addr = %store.endpoint.addr, "store added");
        store
    }

    /// Every live store, for status pages and scrapes.
    pub fn stores(&self) -> Vec<Arc<Store>> {
        let mut v: Vec<Arc<Store>> = self
            .lock()
            .stores
            .values()
            .filter_map(Weak::upgrade)
            .collect();
        v.sort_by(|a, b| a.label.cmp(&b.label));
        v
    }

    /// The stores named `name` (a label, or an id when several profiles reach the same endpoint).
    pub fn stores_named(&self, name: &str) -> Vec<Arc<Store>> {
        self.stores()
            .into_iter()
            .filter(|s| s.label == name || s.id == name)
            .collect()
    }

    /// Ends every runtime state and weight (a reload or config change): every store back to `ready`.
    pub fn reset_controls(&self) {
        for store in self.stores() {
            store.reset_control();
        }
    }

    fn start_store(
        &self,
        endpoint: &Endpoint,
        id: String,
        label: String,
        mode: StoreTlsMode,
        profile: Arc<Profile>,
    ) -> Store {
        let tasks = self.stop.child_token();
        let health = Arc::new(HealthState::default());
        let caps = Arc::new(KnownCaps::default());
        let metrics = self.metrics.store(&label);
        metrics.up.set(1);
        let cfg = &profile.pool;
        let pool = (cfg.min_idle > 0 && profile.connector.can_prewarm()).then(|| {
            let pool = Pool::with_budget(
                PoolSettings {
                    min_idle: cfg.min_idle,
                    max_idle: cfg.max_idle,
                    max_age: cfg.max_age.get(),
                    // Enough in flight to keep up with a busy store's logins once the pool has grown to its
                    // demand (each connect waits for a greeting and CAPA), few enough that a restarted store
                    // is not hit with a burst.
                    max_concurrent_connects: 8,
                },
                Some(self.idle_budget.clone()),
            );
            let (connector, ep, known, store_label) = (
                profile.connector.clone(),
                endpoint.clone(),
                caps.clone(),
                label.clone(),
            );
            pool.spawn_refill(
                move || {
                    let (connector, ep, known) = (connector.clone(), ep.clone(), known.clone());
                    async move {
                        connector
                            .prepare(&ep, mode, None, AskCapa::Unless(&known))
                            .await
                    }
                },
                move |e: LoginError| {
                    debug!(store = %store_label, error = %e, "pre-warming a connection failed");
                },
                tasks.clone(),
            );
            pool
        });
        if profile.health.enabled {
            let h = &profile.health;
            let settings = ProbeSettings {
                interval: h.interval.get(),
                timeout: h.timeout.get(),
                rise: h.rise,
                fall: h.fall,
            };
            let (up_gauge, store_label) = (metrics.up.clone(), label.clone());
            tokio::spawn(health::probe_loop(
                health::ProbeTarget {
                    connector: profile.connector.clone(),
                    endpoint: endpoint.clone(),
                    mode,
                    caps: caps.clone(),
                },
                health.clone(),
                settings,
                move |up, reason| {
                    up_gauge.set(i64::from(up));
                    if up {
                        info!(store = %store_label, "store is up");
                    } else {
                        warn!(store = %store_label, reason = %reason, "store is down");
                    }
                },
                tasks.clone(),
            ));
        }
        Store {
            endpoint: Endpoint {
                priority: 0,
                weight: 1,
                ..endpoint.clone()
            },
            id,
            label,
            health,
            tls_mode: mode,
            profile,
            caps,
            active: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            introductions: AtomicUsize::new(0),
            state: AtomicU8::new(StoreState::Ready as u8),
            weight: AtomicU32::new(0),
            bytes: [AtomicU64::new(0), AtomicU64::new(0)],
            pool,
            metrics,
            tasks,
        }
    }
}
